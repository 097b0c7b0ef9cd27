"""Tests of the set-up: no top-level name of ours shadows an installed package (tools/shadowed.py),
and the README's commands install pinned versions (constraints.txt, tools/setup.sh)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# tools/ is no package: its scripts import as top-level modules here
sys.path.insert(0, str(ROOT / "tools"))
from pins import applicable_pins, canonical  # noqa: E402
from shadowed import top_level_names  # noqa: E402

sys.path.remove(str(ROOT / "tools"))


def run_shadowed(extra_path=None):
    env = None if extra_path is None else {**os.environ, "PYTHONPATH": str(extra_path)}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "shadowed.py")], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_no_top_level_name_shadows_an_installed_package():
    """transformers ≥ 5.25 imports Hugging Face's `kernels`: a `kernels/` package of ours, first on
    sys.path when a stage runs from the repository root, broke every stage. Checked against every
    distribution installed here (CI: requirements.txt + requirements-test.txt;
    tools/check_versions.sh newest adds evaluate, datasets, accelerate and liger-kernel)."""
    names = top_level_names()
    shared = {"runs", "parallel", "training", "tokens", "losses", "rewards", "model"}
    stages = {"sft", "train_rm", "dpo", "osp", "generate", "eval_runs"}
    assert shared | stages | {"data", "rlhf_kernels", "tests"} <= names, names
    # Hugging Face's: transformers needs one, many users have the other
    assert not {"kernels", "evaluate"} & names
    result = run_shadowed()
    assert result.returncode == 0, result.stdout + result.stderr


def test_shadow_check_names_a_clash(tmp_path):
    """The check can fail: a distribution installed with top-level `dpo`, `rlhf_kernels` (and
    `tests`, which is left out) is named, and so is a `runs.py` that Python finds with no metadata
    (as an editable install through a .pth file puts it on the path)."""
    info = tmp_path / "clashing_dist-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clashing-dist\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("dpo\nrlhf_kernels\ntests\nunrelated\n")
    (tmp_path / "runs.py").write_text("")
    result = run_shadowed(tmp_path)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["dpo", "rlhf_kernels", "runs"], lines
    assert all("the distribution clashing" in line for line in lines[:2]), lines
    assert str(tmp_path / "runs.py") in lines[2]


def test_pins_leave_another_torch_and_its_own_dependencies_alone():
    """tools/pins.py: constraints.txt was made with torch's CPU build. A CUDA build of the same
    version requires another triton, and torch 2.6 another sympy: their pins would make pip fail or
    swap the torch."""
    lines = ["# made on CPU", "sympy==1.14.0", "torch==2.13.0", "transformers==5.25.0",
             "triton==3.9.0"]
    assert applicable_pins(lines, "2.13.0+cpu", ["filelock", "sympy>=1.13.3"]) is None
    # macOS: PyPI's CPU wheel, no label
    assert applicable_pins(lines, "2.13.0", ["sympy>=1.13.3"]) is None
    cuda = ["sympy>=1.13.3", 'triton==3.7.1; platform_system == "Linux"', "nvidia-cublas==13.1.0.3"]
    assert applicable_pins(lines, "2.13.0", cuda) == ["# made on CPU", "transformers==5.25.0",
                                                      "torch==2.13.0"]
    assert applicable_pins(lines, "2.6.0+cpu", ["sympy==1.13.1"]) == [
        "# made on CPU", "transformers==5.25.0", "triton==3.9.0", "torch==2.6.0+cpu"]


def requirement_names(path):
    names = []
    for line in (ROOT / path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.append(re.match(r"[A-Za-z0-9_.-]+", line).group(0))
    return names


def test_constraints_pin_every_requirement():
    """constraints.txt pins an exact version of everything requirements.txt and
    requirements-test.txt ask for, torch at the CPU build tools/setup.sh installs, and transformers
    at or above requirements.txt's floor."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonical(name)] = version
    for name in requirement_names("requirements.txt") + requirement_names("requirements-test.txt"):
        assert canonical(name) in pins, f"constraints.txt does not pin {name}"
    # tools/setup.sh's CPU pin: the wheel on this project's CI machines
    assert pins["torch"] == "2.13.0"
    requirements = (ROOT / "requirements.txt").read_text()
    floor = re.search(r"^transformers>=([\d.]+)", requirements, re.M).group(1)
    version = tuple(int(part) for part in pins["transformers"].split(".")[:2])
    assert version >= tuple(int(part) for part in floor.split(".")[:2])


def test_compare_runs_leaves_out_timing_fields_and_nothing_else(tmp_path):
    """tools/compare_runs.py, the check that a rearrangement left a run's outputs unchanged: equal
    up to timing fields passes; a changed loss, a changed byte of a weights file, or a file in one
    folder only fails, naming the file."""
    from tools.compare_runs import main
    for name, loss in (("a", 0.5), ("b", 0.5)):
        (tmp_path / name / "logs").mkdir(parents=True)
        (tmp_path / name / "metrics.jsonl").write_text(
            json.dumps(dict(step=1, loss=loss, ms=10 + len(name), tokens_per_s=3.0)) + "\n")
        (tmp_path / name / "model.safetensors").write_bytes(b"\x00\x01")
        (tmp_path / name / "logs" / "lane.log").write_text(name)  # logs are skipped
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main([a, b]) == 0
    (tmp_path / "b" / "metrics.jsonl").write_text(json.dumps(dict(step=1, loss=0.25, ms=1)) + "\n")
    assert main([a, b]) == 1
    (tmp_path / "b" / "metrics.jsonl").write_text((tmp_path / "a" / "metrics.jsonl").read_text())
    (tmp_path / "b" / "model.safetensors").write_bytes(b"\x00\x02")
    assert main([a, b]) == 1
    (tmp_path / "b" / "model.safetensors").write_bytes(b"\x00\x01")
    (tmp_path / "b" / "extra.jsonl").write_text("{}\n")
    assert main([a, b]) == 1
