"""Which of constraints.txt's pins apply to this environment (tools/setup.sh prints the file to
install under).

    python tools/pins.py OUT    # prints constraints.txt, or writes the pins that apply to OUT
                                # and prints OUT

constraints.txt was made with torch's CPU build. With that torch installed every pin applies. With
another torch (a CUDA or ROCm build, another version: a GPU node, TORCH_SPEC) the torch stays as it
is, and so does what it requires itself (triton, nvidia-*, sympy, ...): their pins are left out and
the installed torch's exact version is pinned instead, so that pip can never resolve a conflict by
swapping the torch for another.
"""
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def applicable_pins(lines, torch_version, torch_requires):
    """None when every line applies; otherwise the lines that do. lines: constraints.txt's;
    torch_version: the installed torch's ("2.13.0+cu130"); torch_requires: its requirement strings
    (importlib.metadata)."""
    pinned = next(line for line in lines if line.startswith("torch==")).split("==")[1]
    own = {canonical(re.match(r"[A-Za-z0-9_.-]+", req).group(0)) for req in torch_requires}
    gpu_build = any(re.match(r"(pytorch-)?triton|nvidia-|cuda-", name) for name in own)
    if torch_version.split("+")[0] == pinned and not gpu_build:
        return None
    keep = [line for line in lines
            if "==" not in line or canonical(line.split("==")[0]) not in own | {"torch"}]
    return keep + [f"torch=={torch_version}"]


if __name__ == "__main__":
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = applicable_pins(lines, importlib.metadata.version("torch"),
                           importlib.metadata.requires("torch") or [])
    if pins is None:
        print(ROOT / "constraints.txt")
    else:
        Path(sys.argv[1]).write_text("\n".join(pins) + "\n")
        print(sys.argv[1])
