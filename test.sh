#!/usr/bin/env bash
# The tests, on a fresh clone: creates or reuses .venv, installs what is missing at the tested versions
# (tools/setup.sh, constraints.txt), then runs `pytest test_all.py`. Arguments go to pytest: bash test.sh -k dpo -x
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup.sh
# wandb and tensorboard, for tests/test_tracking.py; TRL, for the benchmark's DPO row; ruff, the lint
# below; pinned as requirements.txt
python -m pip install -qq -r requirements-test.txt -c "$CONSTRAINTS"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# Lines of at most 100 characters and pyflakes' checks, every .py file (ruff.toml)
python -m ruff check --quiet .
python -m pytest -q test_all.py --durations=10 "$@"
