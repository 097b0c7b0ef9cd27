#!/usr/bin/env bash
# The project with other versions than constraints.txt pins, in a throw-away environment: an upstream release
# that breaks something is seen the week it ships, and the oldest transformers requirements.txt allows is tested.
#
#   bash tools/check_versions.sh newest    # the newest releases pip serves of everything (torch stays at the CPU
#                                          # pin), plus the packages users install beside it: evaluate, datasets,
#                                          # accelerate, liger-kernel (for the name check)
#   bash tools/check_versions.sh oldest    # transformers at requirements.txt's floor, the rest as pip resolves it
#   LOCK=1 bash tools/check_versions.sh newest   # the whole suite instead of the quick subset and, if it passes,
#                                          # constraints.txt := this environment's versions (how the pins are refreshed)
#
# Quick subset (a few minutes on 2 cores): tools/shadowed.py, the parity tests against transformers, PEFT and TRL,
# and `SIZE=tiny bash run.sh` in a temporary folder (every stage once, no SmolLM2). It prints the versions it used
# and PASS or FAIL. The environment lives in a temporary folder, removed at the end (KEEP=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-newest}
case "$MODE" in newest|oldest) ;; *) echo "usage: bash tools/check_versions.sh newest|oldest" >&2; exit 2 ;; esac
WORK=$(mktemp -d "${TMPDIR:-/tmp}/online-rlhf-$MODE.XXXXXX")
[ -n "${KEEP:-}" ] || trap 'rm -rf "$WORK"' EXIT
FLOOR=$(grep -E '^transformers>=' requirements.txt | sed 's/.*>=//')

echo "== $MODE: a new environment in $WORK/venv"
"${PYTHON:-python3}" -m venv "$WORK/venv"
source "$WORK/venv/bin/activate"
export UNPINNED=1  # tools/setup.sh (here and in run.sh): requirements.txt's floors, not constraints.txt's pins
source tools/setup.sh > /dev/null  # torch at the CPU pin, as on a new machine
if [ "$MODE" = oldest ]; then
  python -m pip install -qq -r requirements-test.txt "transformers==$FLOOR"
elif [ -n "${LOCK:-}" ]; then  # the pins are made from what test.sh installs, nothing else
  python -m pip install -qq -U --upgrade-strategy eager -r requirements.txt -r requirements-test.txt
else
  python -m pip install -qq -U --upgrade-strategy eager -r requirements.txt -r requirements-test.txt \
    evaluate datasets accelerate liger-kernel
fi
python -m pip freeze --all | sort > "$WORK/freeze.txt"
echo "== versions ($(date -u +%Y-%m-%d), Python $(python -c 'import platform; print(platform.python_version())'))"
grep -iE '^(torch|transformers|tokenizers|safetensors|peft|numpy|trl|triton|kernels|huggingface.hub|accelerate|datasets|evaluate|liger.kernel)==' \
  "$WORK/freeze.txt" | tr '\n' ' '; echo

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
status=0
if [ -n "${LOCK:-}" ]; then
  python -m pytest -q test_all.py -p no:cacheprovider || status=$?
else
  python tools/shadowed.py || status=$?
  # parity: our model = transformers (Llama, Qwen2/3, Mistral, checkpoints both ways), rewards read where
  # transformers and TRL read them, PEFT loads our adapters, losses = TRL's formulas, the benchmark's three
  # peers (HF generate, TRL's DPOTrainer), the converters, and the set-up checks
  python -m pytest -q -p no:cacheprovider tests/test_setup.py tests/test_model.py tests/test_reward_interop.py \
    tests/test_bench.py "tests/test_lora.py::test_peft_loads_our_adapter" tests/test_dpo.py -k "not resume" || status=$?
  RUN="$WORK/tiny" SIZE=tiny bash run.sh > "$WORK/run.log" 2>&1 || { status=$?; tail -n 30 "$WORK/run.log"; }
  [ $status -ne 0 ] || tail -n 3 "$WORK/run.log"
fi
if [ $status -eq 0 ] && [ -n "${LOCK:-}" ]; then
  { echo "# The versions \`bash test.sh\` passed with: pip freeze of tools/check_versions.sh's environment on $(date -u +%Y-%m-%d)"
    echo "# (Python $(python -c 'import platform; print(platform.python_version())'), CPU). tools/setup.sh installs requirements.txt under these pins."
    echo "# Refresh: LOCK=1 bash tools/check_versions.sh newest (README, \"Versions\")."
    grep -vE '^(pip|setuptools|wheel)==' "$WORK/freeze.txt" | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > constraints.txt.tmp
  mv constraints.txt.tmp constraints.txt
  echo "== constraints.txt rewritten from this environment"
fi
echo "== $MODE: $([ $status -eq 0 ] && echo PASS || echo "FAIL ($status)")"
exit $status
