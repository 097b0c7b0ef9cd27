#!/usr/bin/env bash
# One prepared command for the day a GPU is at hand (one H100/H200, ~15 minutes of GPU time in all):
#
#     bash tools/gpu_check.sh              # on the GPU node: every section below, < 8 minutes, one log
#     bash tools/gpu_check.sh --dry-run    # on a CPU: the same sections at tiny shapes (~1 minute)
#
# Sections, in this order, each under its own `timeout` (one hang cannot eat the budget), all of them under
# GPU_CHECK_BUDGET_S (GPU: 450 s; a section cut by it says TIMEOUT, one that would start past it NOT RUN):
#   (a)  the machine: nvidia-smi, torch / triton / transformers versions, the device, the git commit
#   (b)  tests/test_cuda.py on the GPU: Triton kernels = their PyTorch twins, cached decode in bf16,
#        FlexAttention = the per-document twin, the engine's tokens = the CPU's
#   (c1) python -m rlhf_kernels.logprob --bench      (fused log-probs vs naive PyTorch and Liger, fwd + bwd)
#   (c2) python -m rlhf_kernels.sampling --bench     (sampling kernel vs sort-based top-p and multinomial)
#   (d)  python memory_trace.py --gpu-check     (training steps vs the fake-tensor trace), if it has the flag
#   (c3) python generate.py --bench             (engine tokens/s vs transformers' generate), last: it compiles
#        a decode step per model and batch, and the rows it printed before a timeout stay in the log
# --dry-run hides the GPU (CUDA_VISIBLE_DEVICES=) and runs (b) as the CPU variants of tests/test_cuda.py,
# (c1)/(c2) as the benchmarks' CPU modes, (d) with --dry-run added, and (c3) not at all (generate.py --bench
# has no CPU mode).
#
# Logs: $GPU_CHECK_LOG_DIR/<timestamp>/ (default gpu_check_logs/): gpu_check.log holds everything, <section>.log
# each section, summary.txt the table printed at the end. Exit status 0 only if every section passed
# (or was skipped for a stated reason); otherwise 1, and the last line names the sections that did not pass.
#
# Environment: PYTHON (default python); GPU_CHECK_LOG_DIR; GPU_CHECK_BUDGET_S; GPU_CHECK_GENERATE_MODELS: the
# generate.py benchmark's models (default "SmolLM2-135M TinyLlama-1.1B"; "all" runs plain `python generate.py
# --bench`, whose Llama-3-8B twins alone take minutes to initialise on the host).
set -uo pipefail

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (expected --dry-run or --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.." || exit 2  # the repository root: every command below is relative to it
command -v timeout > /dev/null || { echo "gpu_check.sh: needs GNU timeout (coreutils)" >&2; exit 2; }
PYTHON=${PYTHON:-python}
LOG_ROOT=${GPU_CHECK_LOG_DIR:-gpu_check_logs}
LOG_DIR="$LOG_ROOT/$(date +%Y%m%d-%H%M%S)"
[ -e "$LOG_DIR" ] && LOG_DIR="$LOG_DIR-$$"  # two runs in the same second
mkdir -p "$LOG_DIR" || exit 2
LOG="$LOG_DIR/gpu_check.log"

# Every Python section prints as it goes (a section cut by its timeout keeps what it printed), and picks
# its kernels itself: RLHF_KERNELS from the caller's shell would quietly swap in the PyTorch twins.
export PYTHONUNBUFFERED=1
unset RLHF_KERNELS
if [ "$DRY_RUN" = 1 ]; then
    MODE="dry run (CPU, tiny shapes)"
    export CUDA_VISIBLE_DEVICES=""  # the CPU variants even on a GPU node
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    BUDGET=${GPU_CHECK_BUDGET_S:-150}
    #           a   b  c1  c2  c3   d
    TIMEOUTS=( 30  90  30  30  10  60)
else
    MODE="GPU"
    # conftest.py sets TRITON_INTERPRET=1 unless it is set: 0 makes tests/test_cuda.py test the compiled kernels.
    export TRITON_INTERPRET=0
    BUDGET=${GPU_CHECK_BUDGET_S:-450}
    TIMEOUTS=( 60 200  60  90 180 150)
fi
DEADLINE=$((SECONDS + BUDGET))

IDS=() STATUSES=() TIMES=()

say() {  # a line to the terminal and the combined log
    echo "$*" | tee -a "$LOG"
}

say_section() {  # id, line: to the terminal, the combined log and the section's own log
    echo "$2" | tee -a "$LOG" "$LOG_DIR/$1.log"
}

header() {  # id, title: the banner that opens a section
    say ""
    say_section "$1" "===== [$1] $2 ====="
}

record() {  # id, status, seconds
    IDS+=("$1") STATUSES+=("$2") TIMES+=("$3")
    say_section "$1" "----- [$1] $2 (${3} s)"
}

skip_section() {  # id, title, why: a section that does not apply here (not a failure)
    header "$1" "$2"
    say_section "$1" "skipped $3"
    record "$1" "SKIPPED $3" 0
}

shell_words() {  # the command as one would type it, to copy from the log and rerun one section
    local out="" word
    for word in "$@"; do
        if [[ "$word" =~ ^[A-Za-z0-9_./=:,+-]+$ ]]; then
            out+="$word "
        elif [[ "$word" != *[\"\$\`\\]* ]]; then
            out+="\"$word\" "
        else
            out+="$(printf '%q' "$word") "
        fi
    done
    echo "${out% }"
}

run_section() {  # id, timeout (s), title, command...: run it under timeout, stream it to both logs
    local id=$1 limit=$2 title=$3
    shift 3
    header "$id" "$title"
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 5 ]; then
        say_section "$id" "not run: the ${BUDGET} s budget is spent"
        record "$id" "NOT RUN (budget spent)" 0
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say_section "$id" "\$ $(shell_words "$@")   # timeout ${limit} s"
    local start=$SECONDS
    # timeout signals the command's whole process group (pytest's and torch.compile's workers too), and
    # kills it 10 s later if it has not stopped.
    timeout --kill-after=10 "$limit" "$@" < /dev/null 2>&1 | tee -a "$LOG_DIR/$id.log" "$LOG"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - start))
    if [ "$rc" = 0 ]; then
        record "$id" "PASS" "$took"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        record "$id" "TIMEOUT after ${limit} s" "$took"
    else
        record "$id" "FAIL (exit $rc)" "$took"
    fi
}

# ----------------------------------------------------------------------------------------------
# (a) the machine

ENVIRONMENT_PY=$(cat <<'EOF'
import os, platform, sys
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()})")
for name in ("triton", "transformers", "liger_kernel"):
    try:
        print(f"{name} {getattr(__import__(name), '__version__', '(no __version__)')}")
    except ImportError:
        print(f"{name}: not installed")
print("env: " + ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in
                        ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "RLHF_KERNELS")))
if not torch.cuda.is_available():
    print("device: cpu, no CUDA device visible")
    sys.exit(0 if os.environ.get("GPU_CHECK_DRY_RUN") == "1" else "error: no CUDA device: nothing below tests a GPU")
properties = torch.cuda.get_device_properties(0)
print(f"device: cuda:0 {properties.name}, sm_{properties.major}{properties.minor}, "
      f"{properties.total_memory / 2**30:.0f} GiB, {properties.multi_processor_count} SMs, "
      f"{torch.cuda.device_count()} visible")
import model
from rlhf_kernels.logprob import _cuda_fp32_output
device = torch.device("cuda")
print(f"cuBLAS bf16 -> fp32 output: mm {_cuda_fp32_output('mm', device, torch.bfloat16)}, "
      f"addmm {_cuda_fp32_output('addmm', device, torch.bfloat16)}; FlexAttention {model.flex_attention is not None}")
EOF
)

environment() {  # nvidia-smi (GPU only), then the Python side
    if [ "$DRY_RUN" = 1 ]; then
        echo "nvidia-smi: not run (dry run)"
    elif command -v nvidia-smi > /dev/null; then
        nvidia-smi
    else
        echo "nvidia-smi: not found"
    fi
    GPU_CHECK_DRY_RUN=$DRY_RUN "$PYTHON" -c "$ENVIRONMENT_PY"
}
export -f environment
export ENVIRONMENT_PY DRY_RUN PYTHON

say "gpu_check: $MODE, $(date -Is), host $(hostname), logs in $LOG_DIR, budget ${BUDGET} s"
say "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(git status --porcelain 2>/dev/null | wc -l) files changed or untracked"

run_section a "${TIMEOUTS[0]}" "environment: nvidia-smi, versions, device" bash -c environment

# ----------------------------------------------------------------------------------------------
# (b) the GPU checks (on a CPU: their tiny variants). The dry-run test is left out: it runs this script.

if [ "$DRY_RUN" = 1 ]; then
    run_section b "${TIMEOUTS[1]}" "tests/test_cuda.py, CPU variants" \
        env TRITON_INTERPRET=1 GPU_CHECK_DRY_RUN=1 "$PYTHON" -m pytest -q tests/test_cuda.py -rs -p no:cacheprovider \
        -k "not gpu_check_dry_run" --durations=5
else
    run_section b "${TIMEOUTS[1]}" "tests/test_cuda.py on the GPU: Triton = twins, cached decode bf16, FlexAttention = twin" \
        "$PYTHON" -m pytest -q tests/test_cuda.py -rs -p no:cacheprovider -k "not gpu_check_dry_run" --durations=10
fi

# ----------------------------------------------------------------------------------------------
# (c) the benchmarks. On the GPU at their headline shapes (Llama-3's vocabulary), timed for ~1 s a method;
# on a CPU their CPU modes, with the PyTorch paths (TRITON_INTERPRET unset: the interpreter is for (b)).

GENERATE_MODELS=${GPU_CHECK_GENERATE_MODELS:-SmolLM2-135M TinyLlama-1.1B}
GENERATE_BENCH_PY="import generate; names = '$GENERATE_MODELS'.split(); \
generate.BENCH_SHAPES = {name: generate.BENCH_SHAPES[name] for name in names}; generate.benchmark()"

if [ "$DRY_RUN" = 1 ]; then
    run_section c1 "${TIMEOUTS[2]}" "rlhf_kernels.logprob benchmark (CPU smoke)" \
        env -u TRITON_INTERPRET "$PYTHON" -m rlhf_kernels.logprob --bench --cpu-smoke
    run_section c2 "${TIMEOUTS[3]}" "rlhf_kernels.sampling benchmark (CPU: the PyTorch path)" \
        env -u TRITON_INTERPRET "$PYTHON" -m rlhf_kernels.sampling --bench --cpu
else
    run_section c1 "${TIMEOUTS[2]}" "rlhf_kernels.logprob benchmark: N=16384, H=4096, V=128256, bf16, fwd + bwd" \
        "$PYTHON" -m rlhf_kernels.logprob --bench --all --warmup-ms 200 --rep-ms 1000
    run_section c2 "${TIMEOUTS[3]}" "rlhf_kernels.sampling benchmark: V=128256, batch 1/64/256" \
        "$PYTHON" -m rlhf_kernels.sampling --bench --warmup-ms 50 --rep-ms 250
fi

# ----------------------------------------------------------------------------------------------
# (d) training steps vs the fake-tensor trace: memory_trace.py's own check (guarded: the flag is newer than this
# script).

if grep -q -- --gpu-check memory_trace.py 2>/dev/null; then
    if [ "$DRY_RUN" = 1 ]; then
        run_section d "${TIMEOUTS[5]}" "training steps vs the fake-tensor trace (dry run)" \
            env -u TRITON_INTERPRET "$PYTHON" memory_trace.py --gpu-check --dry-run
    else
        run_section d "${TIMEOUTS[5]}" "training steps vs the fake-tensor trace" \
            "$PYTHON" memory_trace.py --gpu-check
    fi
else
    skip_section d "training steps vs the fake-tensor trace" "(memory_trace.py has no --gpu-check flag yet)"
fi

# ----------------------------------------------------------------------------------------------
# (c3) the engine benchmark, last: it compiles a decode step per model and batch (CUDA graphs), the least
# predictable section, and whatever rows it printed before a timeout stay in the log.

if [ "$DRY_RUN" = 1 ]; then
    skip_section c3 "generate.py benchmark" "on CPU: generate.py --bench has no CPU mode"
elif [ "$GENERATE_MODELS" = all ]; then
    run_section c3 "${TIMEOUTS[4]}" "generate.py benchmark: every model of BENCH_SHAPES" \
        "$PYTHON" generate.py --bench
else
    run_section c3 "${TIMEOUTS[4]}" "generate.py benchmark: $GENERATE_MODELS, batch 64/256" \
        "$PYTHON" -c "$GENERATE_BENCH_PY"
fi

# ----------------------------------------------------------------------------------------------
# Summary

FAILED=()
{
    echo
    echo "===== summary: $MODE, $((SECONDS)) s in all, logs in $LOG_DIR ====="
    for i in "${!IDS[@]}"; do
        printf '  %-3s %-50s %5s s   %s\n' "${IDS[$i]}" "${STATUSES[$i]}" "${TIMES[$i]}" "$LOG_DIR/${IDS[$i]}.log"
    done
} | tee -a "$LOG" > "$LOG_DIR/summary.txt"
cat "$LOG_DIR/summary.txt"
for i in "${!IDS[@]}"; do
    case "${STATUSES[$i]}" in
        PASS|SKIPPED*) ;;
        *) FAILED+=("${IDS[$i]}: ${STATUSES[$i]}") ;;
    esac
done
if [ "${#FAILED[@]}" = 0 ]; then
    say "gpu_check: all sections passed"
    echo "all sections passed" >> "$LOG_DIR/summary.txt"
    exit 0
fi
LIST=$(printf '%s; ' "${FAILED[@]}")
say "gpu_check: FAILED ${LIST%; }"
echo "FAILED ${LIST%; }" >> "$LOG_DIR/summary.txt"
exit 1
