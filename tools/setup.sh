# Sourced by run.sh and test.sh: the Python environment, with what is missing installed at the versions
# the tests passed with.
#   - a virtual environment that is already active is used as it is; otherwise ./.venv is created
#     (python3 ≥ 3.11, or $PYTHON) or reused, and activated;
#   - torch, if missing: on a CPU-only machine the CPU build of the version constraints.txt pins (from
#     PyTorch's CPU index when it can be reached: a plain `pip install torch` on Linux pulls the CUDA build,
#     several GB; otherwise as pip is set up to find it); on a GPU node (nvidia-smi present) pip's default
#     build, the CUDA one. Set TORCH_SPEC to choose, e.g. TORCH_SPEC="torch==2.7.1";
#   - then requirements.txt under constraints.txt: the exact versions `bash test.sh` passed with (pip installs
#     what is missing and moves what differs to the pin). Where torch is not the CPU pin (a GPU node,
#     TORCH_SPEC), the torch, triton and nvidia-* pins are left out: that torch brings its own.
#     CONSTRAINTS_FILE=FILE: FILE's pins instead (tools/check_versions.sh tries other versions with it);
#   - last, tools/shadowed.py: a warning if a package installed here has the name of one of ours.
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    python=${PYTHON:-python3}
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
      echo "Python ≥ 3.11 is needed ($python is $("$python" --version 2>&1)); set PYTHON=/path/to/python3.x" >&2; exit 2; }
    echo "== creating .venv with $("$python" --version)"
    "$python" -m venv .venv
  fi
  source .venv/bin/activate
fi
TORCH_PIN=$(grep -E '^torch==' constraints.txt)  # torch==2.13.0: the CPU wheel CI installs
if ! python -c "import torch" 2>/dev/null; then
  echo "== installing torch"
  if [ -n "${TORCH_SPEC:-}" ]; then
    python -m pip install $TORCH_SPEC
  elif command -v nvidia-smi > /dev/null 2>&1; then
    python -m pip install torch
  elif python -c "import socket; socket.create_connection(('download.pytorch.org', 443), timeout=5)" 2>/dev/null; then
    python -m pip install -qq "$TORCH_PIN" --index-url https://download.pytorch.org/whl/cpu
  else  # PyTorch's index is out of reach (a mirror, a wheel folder): pip's own configuration decides
    python -m pip install -qq "$TORCH_PIN"
  fi
fi
CONSTRAINTS=${CONSTRAINTS_FILE:-constraints.txt}  # CONSTRAINTS_FILE: other pins (tools/check_versions.sh's)
if [ "$CONSTRAINTS" = constraints.txt ] && \
   [ "$(python -c 'import importlib.metadata as m; print("torch==" + m.version("torch").split("+")[0])')" != "$TORCH_PIN" ]; then
  CONSTRAINTS=$(mktemp)  # another torch (CUDA, TORCH_SPEC): every pin but torch's own stack
  grep -vE '^(torch|triton|nvidia-[a-z0-9-]*|cuda-[a-z0-9-]*)==' constraints.txt > "$CONSTRAINTS"
fi
echo "== installing what is missing from requirements.txt, at the versions of $CONSTRAINTS"
python -m pip install -qq -r requirements.txt -c "$CONSTRAINTS"  # -qq: errors only
python tools/shadowed.py >&2 || echo "warning: the names above shadow installed packages: uninstall those or expect" \
  "import errors (README, 'Why rlhf_kernels/')" >&2
echo "== python: $(command -v python) ($(python -c 'import sys, torch, transformers as t
print(sys.version.split()[0], "torch", torch.__version__, "transformers", t.__version__)'))"
