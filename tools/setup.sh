# Sourced by run.sh and test.sh: the Python environment, with what is missing installed.
#   - a virtual environment that is already active is used as it is; otherwise ./.venv is created
#     (python3 ≥ 3.10, or $PYTHON) or reused, and activated;
#   - torch, if missing: on a GPU node (nvidia-smi present) pip's default build, the CUDA one; on a
#     CPU-only machine torch 2.13.0's CPU build (from PyTorch's CPU index when it can be reached: a
#     plain `pip install torch` on Linux pulls the CUDA build, several GB; otherwise as pip is set up
#     to find it). Set TORCH_SPEC to choose, e.g. TORCH_SPEC="torch==2.7.1";
#   - then requirements.txt (pip skips what is already there, in a few seconds).
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    python=${PYTHON:-python3}
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
      echo "Python ≥ 3.10 is needed ($python is $("$python" --version 2>&1)); set PYTHON=/path/to/python3.x" >&2; exit 2; }
    echo "== creating .venv with $("$python" --version)"
    "$python" -m venv .venv
  fi
  source .venv/bin/activate
fi
if ! python -c "import torch" 2>/dev/null; then
  echo "== installing torch"
  if [ -n "${TORCH_SPEC:-}" ]; then
    python -m pip install $TORCH_SPEC
  elif command -v nvidia-smi > /dev/null 2>&1; then
    python -m pip install torch
  elif python -c "import socket; socket.create_connection(('download.pytorch.org', 443), timeout=5)" 2>/dev/null; then
    python -m pip install -qq torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  else  # PyTorch's index is out of reach (a mirror, a wheel folder): pip's own configuration decides
    python -m pip install -qq torch==2.13.0
  fi
fi
echo "== installing what is missing from requirements.txt"
python -m pip install -qq -r requirements.txt  # -qq: errors only
echo "== python: $(command -v python) ($(python -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'))"
