# Sourced by run.sh and test.sh: the Python environment, with what is missing installed at the versions
# the tests passed with.
#   - a virtual environment that is already active is used as it is; otherwise ./.venv is created
#     (python3, or $PYTHON) or reused, and activated. Python ≥ 3.11 (constraints.txt's numpy needs it);
#   - torch, if missing: on a CPU-only machine the CPU build of the version constraints.txt pins (from
#     PyTorch's CPU index when it can be reached: a plain `pip install torch` on Linux pulls the CUDA build,
#     several GB; otherwise as pip is set up to find it); on a GPU node (nvidia-smi present) pip's default
#     build, the CUDA one. Set TORCH_SPEC to choose, e.g. TORCH_SPEC="torch==2.7.1" (before torch is installed);
#   - then requirements.txt under constraints.txt: the exact versions `bash test.sh` passed with (pip installs
#     what is missing and moves what differs to the pin). With another torch than the pinned CPU build (a CUDA
#     build, TORCH_SPEC), that torch stays as it is and so do its own dependencies (tools/pins.py);
#     CONSTRAINTS_FILE=FILE: FILE's pins instead, torch always the CPU pin (tools/check_versions.sh);
#   - last, tools/shadowed.py: a warning if a package installed here has the name of one of ours.
fail() { echo "$*" >&2; exit 2; }
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    python=${PYTHON:-python3}
    echo "== creating .venv with $("$python" --version)"
    "$python" -m venv .venv
  fi
  source .venv/bin/activate
fi
[ "$(python -c 'import sys; print(sys.prefix)')" -ef "$VIRTUAL_ENV" ] ||
  fail "VIRTUAL_ENV is $VIRTUAL_ENV but \`python\` is $(command -v python): activate the environment again, or unset VIRTUAL_ENV"
python -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  fail "Python ≥ 3.11 is needed; $VIRTUAL_ENV has $(python --version 2>&1) (for ./.venv: rm -rf .venv; PYTHON=python3.11 bash $0)"
python -m pip --version > /dev/null 2>&1 || fail "$VIRTUAL_ENV has no pip (a uv environment?): install pip into it, or use ./.venv"
TORCH_PIN=$(grep -E '^torch==' constraints.txt) || fail "constraints.txt has no torch== line"
[ -z "${CONSTRAINTS_FILE:-}" ] || [ -f "$CONSTRAINTS_FILE" ] || fail "CONSTRAINTS_FILE=$CONSTRAINTS_FILE: no such file"
if ! python -c "import torch" 2>/dev/null; then
  echo "== installing torch"
  if [ -n "${TORCH_SPEC:-}" ] && [ -z "${CONSTRAINTS_FILE:-}" ]; then
    python -m pip install $TORCH_SPEC
  elif [ -z "${CONSTRAINTS_FILE:-}" ] && command -v nvidia-smi > /dev/null 2>&1; then
    python -m pip install torch
  elif python -c "import socket; socket.create_connection(('download.pytorch.org', 443), timeout=5)" 2>/dev/null; then
    python -m pip install -qq "$TORCH_PIN" --index-url https://download.pytorch.org/whl/cpu
  else  # PyTorch's index is out of reach (a mirror, a wheel folder): pip's own configuration decides
    python -m pip install -qq "$TORCH_PIN"
  fi
fi
# the pins that apply (tools/pins.py: all of constraints.txt with its CPU torch; with another torch, all but
# torch's own stack); CONSTRAINTS_FILE: tools/check_versions.sh's
CONSTRAINTS=${CONSTRAINTS_FILE:-$(python tools/pins.py "$VIRTUAL_ENV/online-rlhf-constraints.txt")}
echo "== installing what is missing from requirements.txt, at the versions of $CONSTRAINTS"
python -m pip install -qq -r requirements.txt -c "$CONSTRAINTS"  # -qq: errors only
python tools/shadowed.py >&2 || echo "warning: the names above shadow installed packages: uninstall those or expect" \
  "import errors (README, 'Why rlhf_kernels/')" >&2
echo "== python: $(command -v python) ($(python -c 'import sys, torch, transformers as t
print(sys.version.split()[0], "torch", torch.__version__, "transformers", t.__version__)'))"
