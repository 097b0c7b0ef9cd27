"""Which of this project's top-level names would shadow a package installed in this Python
environment.

    python tools/shadowed.py     # exit 0: none; exit 1: each clash on a line
                                 # (tools/setup.sh warns with it)

The stages run as scripts from the repository root, so the root is first on `sys.path`: a top-level
module or package of ours named like an installed one is found instead of it, by us and by every
library we load. That is how our old `kernels/` folder broke transformers 5.25, which imports
Hugging Face's `kernels` package (the folder is `rlhf_kernels/` since). A name clashes when an
installed distribution provides it (`importlib.metadata.packages_distributions()`), when the
standard library has it, or when Python started elsewhere finds it outside this folder (editable
installs through a .pth file, modules with no metadata). Only modules (`*.py`) and regular packages
(folders with `__init__.py`) count: a folder without one is a namespace package, which Python takes
only when no regular package of that name is found anywhere on the path. `tests`, `conftest` and
`test_all` are left out: no library imports them, and some distributions carelessly ship a
top-level `tests`.
"""
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORED = {"tests", "conftest", "test_all"}
FIND = """import importlib.util, json, sys
found = {}
for name in sys.argv[1:]:
    try:
        spec = importlib.util.find_spec(name)
    except Exception:  # a broken package still has the name
        found[name] = "?"
        continue
    if spec is not None:
        package = spec.origin in (None, "namespace")
        found[name] = list(spec.submodule_search_locations)[0] if package else spec.origin
print(json.dumps(found))"""


def top_level_names(root=ROOT):
    """The names `import NAME` finds in `root`: NAME.py files and NAME/ folders with an
    __init__.py."""
    names = {p.stem for p in root.glob("*.py")}
    names |= {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    return names


def found_elsewhere(names, root=ROOT):
    """{name: where Python finds it} when started outside `root`, with `root` off PYTHONPATH."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
             if p and Path(p).resolve() != root]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    with tempfile.TemporaryDirectory() as elsewhere:
        out = subprocess.run([sys.executable, "-c", FIND, *sorted(names)], cwd=elsewhere, env=env,
                             capture_output=True, text=True, check=True).stdout
    return {name: where for name, where in json.loads(out).items()
            if not Path(where).resolve().is_relative_to(root)}


def clashes(root=ROOT):
    """{our top-level name: [what else provides it]}."""
    ours = top_level_names(root) - IGNORED
    found = {}
    for name, dists in importlib.metadata.packages_distributions().items():
        if name in ours:
            found.setdefault(name, []).extend(f"the distribution {d}" for d in sorted(set(dists)))
    for name in ours & set(sys.stdlib_module_names):
        found.setdefault(name, []).append("the standard library")
    for name, where in found_elsewhere(ours, root).items():
        found.setdefault(name, []).append(where)
    return dict(sorted(found.items()))


if __name__ == "__main__":
    found = clashes()
    for name, others in found.items():
        print(f"{name}: this project's {name} shadows {'; '.join(others)}")
    sys.exit(1 if found else 0)
