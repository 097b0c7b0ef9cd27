#!/usr/bin/env bash
# The project with other versions than constraints.txt pins, in a throw-away environment: an upstream release
# that breaks something is seen the week it ships, and the oldest transformers requirements.txt allows is tested.
#
#   bash tools/check_versions.sh newest    # the newest releases pip serves of everything (torch stays at the CPU
#                                          # pin), plus the packages users install beside it: evaluate, datasets,
#                                          # accelerate, liger-kernel (for the name check)
#   bash tools/check_versions.sh oldest    # transformers at requirements.txt's floor, the rest as pip resolves it
#   FULL=1 bash tools/check_versions.sh oldest   # the whole suite (pytest test_all.py) instead of the quick subset
#   LOCK=1 bash tools/check_versions.sh newest   # the whole suite and, if it passes, constraints.txt := this
#                                          # environment's versions (how the pins are refreshed: README, "Versions")
#
# Quick subset (a few minutes on 2 cores): tools/shadowed.py, the parity tests against transformers, PEFT and TRL,
# and `SIZE=tiny bash run.sh` in a temporary folder (every stage once, no SmolLM2). It prints the versions it used
# and PASS or FAIL. The environment lives in a temporary folder, removed at the end (KEEP=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-newest}
case "$MODE" in newest|oldest) ;; *) echo "usage: bash tools/check_versions.sh newest|oldest" >&2; exit 2 ;; esac
if [ -n "${LOCK:-}" ]; then
  [ "$MODE" = newest ] || { echo "LOCK=1 makes the pins from the newest versions only" >&2; exit 2; }
  # the pins are CI's: a Linux x86_64 machine with torch's CPU build (no nvidia-*, the triton the tests interpret)
  [ "$(uname -sm)" = "Linux x86_64" ] || { echo "LOCK=1: the pins are made on Linux x86_64 (CI's machines)" >&2; exit 2; }
  FULL=1
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/online-rlhf-$MODE.XXXXXX")
[ -n "${KEEP:-}" ] || trap 'rm -rf "$WORK"' EXIT
FLOOR=$(grep -E '^transformers>=' requirements.txt | sed 's/.*>=//')

echo "== $MODE: a new environment in $WORK/venv"
"${PYTHON:-python3}" -m venv "$WORK/venv"
source "$WORK/venv/bin/activate"
# The pins of this check (tools/setup.sh, here and in run.sh, installs under them): torch at the CPU wheel of
# constraints.txt, and for `oldest` transformers at requirements.txt's floor; pip resolves the rest
export CONSTRAINTS_FILE="$WORK/pins.txt"
grep -E '^torch==' constraints.txt > "$CONSTRAINTS_FILE"
[ "$MODE" = newest ] || echo "transformers==$FLOOR" >> "$CONSTRAINTS_FILE"
source tools/setup.sh > /dev/null
if [ "$MODE" = oldest ] || [ -n "${LOCK:-}" ]; then  # LOCK: the pins are made from what test.sh installs, nothing else
  python -m pip install -qq -r requirements-test.txt -c "$CONSTRAINTS_FILE"
else
  python -m pip install -qq -U --upgrade-strategy eager -r requirements.txt -r requirements-test.txt -c "$CONSTRAINTS_FILE" \
    evaluate datasets accelerate liger-kernel
fi
python -m pip freeze --all | LC_ALL=C sort > "$WORK/freeze.txt"
echo "== versions ($(date -u +%Y-%m-%d), Python $(python -c 'import platform; print(platform.python_version())'))"
grep -iE '^(torch|transformers|tokenizers|safetensors|peft|numpy|trl|triton|kernels|huggingface.hub|accelerate|datasets|evaluate|liger.kernel)==' \
  "$WORK/freeze.txt" | tr '\n' ' '; echo

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
status=0
if [ -n "${FULL:-}" ]; then
  python -m pytest -q test_all.py -p no:cacheprovider || status=$?
else
  python tools/shadowed.py && echo "== names: none of ours shadows a package installed here" || status=$?
  # parity: our model = transformers (Llama, Qwen2/3, Mistral; checkpoints both ways; greedy decoding), rewards
  # read where transformers and TRL read them, PEFT loads our adapters, the losses = TRL's formulas, the
  # benchmark's peers (HF generate, TRL's DPOTrainer) agree with us, and the set-up checks
  python -m pytest -q -p no:cacheprovider tests/test_setup.py tests/test_model.py tests/test_reward_interop.py \
    tests/test_bench.py tests/test_generate.py::test_generate_greedy_equals_uncached_loop_and_transformers \
    tests/test_lora.py::test_a_lora_model_saves_merged_and_its_adapter_loads_in_peft \
    tests/test_lora.py::test_a_reward_model_adapter_carries_its_score_head \
    tests/test_dpo.py::test_preference_losses_match_trl_formulas || status=$?
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
