#!/usr/bin/env bash
# The whole workflow on the built-in task (data/task.py), from nothing to a results table:
#   task data → SFT from scratch on a flawed demonstrator → controls
#   (SFT on the gold answers; offline DPO on off-policy pairs, paper 1's baseline, and on SFT-like pairs with
#   human labels, the ideal) → 3 online iterations of iterative DPO (gold reward: the oracle; a Bradley-Terry
#   reward model of the off-policy pairs; SIZE=full: one of the SFT-like pairs, and a length-biased one with
#   and without paper 1's length penalty) → OSP (a pairwise judge; SIZE=full: paper 2's ablations) →
#   evaluation, with the over-optimisation (proxy vs gold) curves.
#
#   SIZE=tiny bash run.sh                # a smoke run: every stage once, tiny sizes, a few minutes on 2 CPU cores
#   bash run.sh                          # SIZE=small: 2 CPU cores, 10-11 minutes (up to ~19 on a slower machine: README)
#   SIZE=full bash run.sh                # small + a BT model of the SFT-like pairs, reward hacking and its remedy,
#                                        # paper 2's OSP ablations (about 17 minutes)
#   SIZE=full RUN=runs/builtin-small-seed0 bash run.sh   # the same, adding to a finished small run
#   SIZE=large SEED=1 bash run.sh        # one GPU: all the data, the papers' n = 8 / K = 7, longer OSP
#   EVAL_SPLIT=dev bash run.sh           # the table on the dev prompts, where the settings were chosen
#
# CPU runs use one thread per process in the two lanes (stages 3-6) unless OMP_NUM_THREADS says
# otherwise: the model is tiny, and on a shared 2-core machine torch's default thread count made SFT ~5×
# slower (14.2 s vs 2.5 s per step). The stages that run alone (2, SFT, and 7, evaluation) take the
# lanes' threads together (2): SFT 187 vs 285 ms a step, the same weights bit for bit.
#
# Every stage skips what it has already finished, so a rerun after a crash (or with a new stage
# added) continues where it stopped. Results: $RUN/results.md (+ results.json, PNG plots).
set -euo pipefail
cd "$(dirname "$0")"
# SIZE=smollm2: the loop on a real pretrained model (SmolLM2-135M-Instruct) with a verifier, its own workflow
[ "${SIZE:-}" != smollm2 ] || exec bash tools/run_smollm2.sh
source tools/setup.sh  # .venv (or the active environment), with what is missing installed
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

SIZE=${SIZE:-small}
SEED=${SEED:-0}
RUN=${RUN:-runs/builtin-$SIZE-seed$SEED}
DATA=data/builtin
# EVAL_SPLIT: the prompts the table is made on: eval (held out, the README's tables) or dev (where every
# setting below was chosen, docs/diagnosis.md). ITERS: online iterations; SFT_STEPS: SFT optimizer steps
# (-1: one epoch); EVAL_PROMPTS: prompts graded; EVAL_PAIRS: held-out pairs the reward models are scored on.
EVAL_SPLIT=${EVAL_SPLIT:-eval}
# EXTRA_RM_RUNS=1: also the loop with a BT model of the SFT-like pairs and the reward-hacking runs (a length-biased
# reward model, with and without a length penalty).
# LANES: stages 3-6 run as two lanes side by side (CPU: one core each) or one after the other (1).
OSP_VARIANTS="spce_ranked"; ITERS=3; SFT_STEPS=-1; EVAL_PROMPTS=512; EVAL_PAIRS=2000; EXTRA_RM_RUNS=0
ABLATIONS="spce_ranked dpo_ranked ipo_ranked spce_random"
case "$SIZE" in
  tiny)  PROMPTS=32; RM_PAIRS=512; JUDGE_PAIRS=256; DPO_PAIRS=256; N=2; K=2; OSP_STEPS=3; OSP_BATCH=4
         ITERS=1; SFT_STEPS=100; EVAL_PROMPTS=16; EVAL_PAIRS=256 ;;
  small) PROMPTS=384; RM_PAIRS=8000; JUDGE_PAIRS=4000; DPO_PAIRS=4000; N=4; K=4; OSP_STEPS=30; OSP_BATCH=8 ;;
  full)  PROMPTS=384; RM_PAIRS=8000; JUDGE_PAIRS=4000; DPO_PAIRS=4000; N=4; K=4; OSP_STEPS=30; OSP_BATCH=8
         EXTRA_RM_RUNS=1; OSP_VARIANTS=$ABLATIONS ;;  # small + the reward-hacking runs + paper 2's ablations
  large) PROMPTS=1024; RM_PAIRS=20000; JUDGE_PAIRS=20000; DPO_PAIRS=20000; N=8; K=7; OSP_STEPS=200; OSP_BATCH=16
         EXTRA_RM_RUNS=1; OSP_VARIANTS=$ABLATIONS; LANES=${LANES:-1} ;;  # one GPU: one lane
  *) echo "SIZE must be tiny, small, full, large or smollm2" >&2; exit 2 ;;
esac
LANES=${LANES:-2}
SOLO_THREADS=$((OMP_NUM_THREADS * LANES))  # threads of a stage that runs alone (2, 7)
# The tiny model trains from scratch, so its learning rates are far above the papers' (which are
# for fine-tuning 8B / 1.1B models): SFT 2e-3, reward models 1e-3. DPO: lr 1e-4, β 0.5 and an NLL term
# on the chosen answer (RPO, α = 1), chosen on the dev split (docs/diagnosis.md).
COMMON=(--seed "$SEED")

echo "== 1. the built-in task ($SECONDS s)"
# (re)built when any file is missing, e.g. a data/builtin/ from before the dev split and the SFT-like pairs
[ -f $DATA/stats.json ] && [ -f $DATA/prompts_dev.jsonl ] && [ -f $DATA/pairs_offpolicy_eval.jsonl ] || python -m data.task
mkdir -p "$RUN/data"
for t in $(seq $ITERS); do head -n $PROMPTS $DATA/prompts_iter$t.jsonl > "$RUN/data/prompts_iter$t.jsonl"; done
head -n $EVAL_PROMPTS $DATA/prompts_$EVAL_SPLIT.jsonl > "$RUN/data/prompts_$EVAL_SPLIT.jsonl"
# Human preference data of three kinds: off-policy pairs (answers of three other policies, the longer chosen
# 59% of the time: paper 1's setting, its reward model's and its DPO baseline's data); pairs of SFT-like answers
# (two demonstrator answers to a prompt: on-policy human labels, the ideal that real projects cannot afford);
# and the offline pairs of the same policies with a strong length bias (65%), for the reward-hacking runs.
head -n $RM_PAIRS $DATA/pairs_sftlike_train.jsonl > "$RUN/data/pairs_rm.jsonl"
head -n $JUDGE_PAIRS $DATA/pairs_sftlike_train.jsonl > "$RUN/data/pairs_judge.jsonl"
head -n $DPO_PAIRS $DATA/pairs_sftlike_train.jsonl > "$RUN/data/pairs_dpo.jsonl"
head -n $EVAL_PAIRS $DATA/pairs_sftlike_eval.jsonl > "$RUN/data/pairs_rm_eval.jsonl"
head -n $RM_PAIRS $DATA/pairs_offpolicy_train.jsonl > "$RUN/data/pairs_offpolicy.jsonl"
head -n $DPO_PAIRS $DATA/pairs_offpolicy_train.jsonl > "$RUN/data/pairs_dpo_offpolicy.jsonl"
head -n $EVAL_PAIRS $DATA/pairs_offpolicy_eval.jsonl > "$RUN/data/pairs_offpolicy_eval.jsonl"
head -n $RM_PAIRS $DATA/pairs_train.jsonl > "$RUN/data/pairs_biased.jsonl"
head -n $EVAL_PAIRS $DATA/pairs_eval.jsonl > "$RUN/data/pairs_biased_eval.jsonl"

echo "== 2. SFT from scratch ($SECONDS s)"
OMP_NUM_THREADS=$SOLO_THREADS python sft.py --model $DATA/model --scratch --data $DATA/sft.jsonl --out "$RUN/sft" \
    --block-size 128 --batch-size 16 --micro-batch-size 16 --lr 2e-3 --max-steps $SFT_STEPS --log-every 200 "${COMMON[@]}"

RM=(--lr 1e-3 --micro-batch-size 64 --max-length 256 --log-every 50 "${COMMON[@]}")
DPO=(--beta 0.5 --nll-coef 1.0 --lr 1e-4 --batch-size 64 --micro-batch-size 32 --max-length 256 --log-every 20)
ONLINE=(--sft "$RUN/sft" --prompts "$RUN/data/prompts_iter{t}.jsonl" --n $N --max-new-tokens 64
        --gen-batch-size 256 --epochs 2 "${DPO[@]}" "${COMMON[@]}")

reward_model_lane() {
  echo "== 3. Bradley-Terry reward model on the off-policy pairs ($SECONDS s)"
  python train_rm.py train --type bt --model "$RUN/sft" --pairs "$RUN/data/pairs_offpolicy.jsonl" \
      --eval-pairs "$RUN/data/pairs_offpolicy_eval.jsonl" --out "$RUN/rm_offpolicy" --batch-size 64 "${RM[@]}"
  echo "== 5b. online iterative DPO: sample n per prompt → BT reward → best vs worst → DPO ($SECONDS s)"
  # dpo.py prints how the reward model ranks the policy's own samples against gold, before it trains.
  for t in $(seq $ITERS); do python dpo.py --iter $t --run-dir "$RUN/online_offpolicy" --rm "$RUN/rm_offpolicy" "${ONLINE[@]}"; done
  if [ "$EXTRA_RM_RUNS" = 1 ]; then
    echo "== 3b + 5c. the same with a BT model of the SFT-like pairs ($SECONDS s)"
    python train_rm.py train --type bt --model "$RUN/sft" --pairs "$RUN/data/pairs_rm.jsonl" --eval-pairs "$RUN/data/pairs_rm_eval.jsonl" \
        --out "$RUN/rm_bt" --batch-size 64 "${RM[@]}"
    for t in $(seq $ITERS); do python dpo.py --iter $t --run-dir "$RUN/online" --rm "$RUN/rm_bt" "${ONLINE[@]}"; done
    echo "== 3c + 5d. reward hacking: a BT model of the offline pairs (length-biased), with and without a length penalty ($SECONDS s)"
    python train_rm.py train --type bt --model "$RUN/sft" --pairs "$RUN/data/pairs_biased.jsonl" \
        --eval-pairs "$RUN/data/pairs_biased_eval.jsonl" --out "$RUN/rm_biased" --batch-size 64 "${RM[@]}"
    for t in $(seq $ITERS); do python dpo.py --iter $t --run-dir "$RUN/online_biased" --rm "$RUN/rm_biased" "${ONLINE[@]}"; done
    # Paper 1's length penalty: best/worst by r − λ·characters; λ = 0.05 chosen on the dev split over 0.02.
    for t in $(seq $ITERS); do
      python dpo.py --iter $t --run-dir "$RUN/online_biased_lp" --rm "$RUN/rm_biased" --length-penalty 0.05 "${ONLINE[@]}"
    done
  fi
}

policy_lane() {
  echo "== 4. controls: SFT continued on the exact answers to the loop's prompts; offline DPO on the off-policy pairs"\
       "(paper 1's baseline) and on the SFT-like pairs (on-policy human labels: the ideal) ($SECONDS s)"
  local prompts=(); for t in $(seq $ITERS); do prompts+=("$RUN/data/prompts_iter$t.jsonl"); done
  python -m data.task gold-sft --prompts "${prompts[@]}" --out "$RUN/data/sft_gold.jsonl"
  python sft.py --model "$RUN/sft" --data "$RUN/data/sft_gold.jsonl" --out "$RUN/sft_gold" \
      --block-size 128 --batch-size 16 --micro-batch-size 16 --lr 3e-4 --epochs 2 --log-every 20 "${COMMON[@]}"
  python dpo.py --model "$RUN/sft" --pairs "$RUN/data/pairs_dpo_offpolicy.jsonl" --out "$RUN/dpo_offline_offpolicy" --epochs 1 \
      "${DPO[@]}" "${COMMON[@]}"
  python dpo.py --model "$RUN/sft" --pairs "$RUN/data/pairs_dpo.jsonl" --out "$RUN/dpo_offline" --epochs 1 "${DPO[@]}" "${COMMON[@]}"
  echo "== 5a. online iterative DPO with the gold reward r* in place of a reward model: the oracle ($SECONDS s)"
  for t in $(seq $ITERS); do python dpo.py --iter $t --run-dir "$RUN/online_gold" --rm gold "${ONLINE[@]}"; done
  echo "== 6. online self-preferring: the pairwise model (SFT-like pairs) judges; π_SFT is policy start and reference ($SECONDS s)"
  python train_rm.py train --type pairwise --model "$RUN/sft" --pairs "$RUN/data/pairs_judge.jsonl" \
      --eval-pairs "$RUN/data/pairs_rm_eval.jsonl" --out "$RUN/judge" --batch-size 32 "${RM[@]}"
  # SIZE=full / large add paper 2's ablations: DPO / IPO losses on the same ranked pairs, random pairing.
  for variant in $OSP_VARIANTS; do
    python osp.py --model "$RUN/sft" --judge "$RUN/judge" --prompts "$RUN/data/prompts_iter1.jsonl" --out "$RUN/osp_$variant" \
        --loss "${variant%_*}" --pairing "${variant#*_}" --steps $OSP_STEPS --batch-size $OSP_BATCH --k $K \
        --beta 0.1 --lr 1e-4 --max-new-tokens 64 --gold --log-every 10 "${COMMON[@]}"
  done
}

# The two lanes are independent: on CPU they run side by side, one core each (LANES=1: one after the
# other, as on a GPU node). Each lane's output goes to $RUN/logs/<lane>.log; the terminal gets its
# stage headers and reward-vs-gold lines as they happen, prefixed by the lane.
mkdir -p "$RUN/logs"
headlines() {  # the lane's log, and its headlines on the terminal as they come
  tee "$RUN/logs/$1.log" | awk -v lane="[$1]" '/^== |^reward vs gold/ { print lane, $0; fflush() }'
}
if [ "$LANES" = 2 ]; then
  echo "== 3-6 in two lanes (one per core); all they print: tail -f $RUN/logs/reward_model_lane.log $RUN/logs/policy_lane.log"
  reward_model_lane 2>&1 | headlines reward_model_lane & first=$!
  policy_lane 2>&1 | headlines policy_lane & second=$!
  status=0
  wait $first || { status=1; echo "reward_model_lane failed:"; tail -n 30 "$RUN/logs/reward_model_lane.log"; }
  wait $second || { status=1; echo "policy_lane failed:"; tail -n 30 "$RUN/logs/policy_lane.log"; }
  [ $status = 0 ] || exit 1
else
  reward_model_lane 2>&1 | tee "$RUN/logs/reward_model_lane.log"
  policy_lane 2>&1 | tee "$RUN/logs/policy_lane.log"
fi

echo "== 7. evaluation with the gold scorer on the $EVAL_SPLIT prompts ($SECONDS s)"
OMP_NUM_THREADS=$SOLO_THREADS python eval_runs.py --run "$RUN" --prompts "$RUN/data/prompts_$EVAL_SPLIT.jsonl"
echo "== done in $SECONDS s"
