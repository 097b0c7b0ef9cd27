"""Which of this project's top-level names would shadow a package installed in this Python environment.

    python tools/shadowed.py     # exit 0: none; exit 1: each clash on a line (tools/setup.sh warns with it)

The stages run as scripts from the repository root, so the root is first on `sys.path`: a top-level module
or package of ours named like an installed one is found instead of it, by us and by every library we load.
That is how our old `kernels/` folder broke transformers 5.25, which imports Hugging Face's `kernels`
package (the folder is `rlhf_kernels/` since). A name clashes when an installed distribution provides it
as an import name (`importlib.metadata.packages_distributions()`). Only modules (`*.py`) and regular
packages (folders with `__init__.py`) count: a folder without one is a namespace package, which Python
takes only when no regular package of that name is found anywhere on the path.
"""
import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def top_level_names(root=ROOT):
    """The names `import NAME` finds in `root`: NAME.py files and NAME/ folders with an __init__.py."""
    names = {p.stem for p in root.glob("*.py")}
    names |= {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    return names


def clashes(root=ROOT):
    """{our top-level name: [installed distributions that provide it]}."""
    installed = importlib.metadata.packages_distributions()
    return {name: sorted(set(installed[name])) for name in sorted(top_level_names(root)) if name in installed}


if __name__ == "__main__":
    found = clashes()
    for name, dists in found.items():
        print(f"{name}: this project's {name} shadows the import name {name!r} of the installed "
              f"distribution(s) {', '.join(dists)}")
    sys.exit(1 if found else 0)
