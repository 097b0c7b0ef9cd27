#!/usr/bin/env bash
# The whole workflow on the built-in task (data/task.py), from nothing to a results table:
#   task data → SFT from scratch → reward models (Bradley-Terry; pairwise = the OSP judge)
#   → offline DPO → 3 online iterations of iterative DPO (BT reward; with a length penalty; with the
#   gold reward as an oracle control) → OSP (SPCE with ranked pairs; DPO / IPO losses; random
#   pairing) → evaluation.
#
#   SIZE=tiny bash run.sh                # a smoke run: every stage once, tiny sizes, ~2 minutes on CPU
#   bash run.sh                          # SIZE=small: 2 CPU cores, about 19 minutes
#   SIZE=large SEED=1 bash run.sh        # one GPU: all the data, the papers' n = 8 / K = 7, longer OSP
#
# CPU runs use one thread per process unless OMP_NUM_THREADS says otherwise: the model is tiny, and on a
# shared 2-core machine torch's default thread count made SFT ~5× slower (14.2 s vs 2.5 s per step).
# Figures reproduce exactly only with the same thread count (float sums are ordered by threads).
#
# Every stage skips what it has already finished, so a rerun after a crash (or with a new stage
# added) continues where it stopped. Results: $RUN/results.md (+ results.json, PNG plots).
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

SIZE=${SIZE:-small}
SEED=${SEED:-0}
RUN=${RUN:-runs/builtin-$SIZE-seed$SEED}
DATA=data/builtin
# ITERS: online iterations; SFT_STEPS: SFT optimizer steps (-1: one epoch); EVAL_PROMPTS: held-out prompts
# graded; EVAL_PAIRS: held-out pairs the reward models are scored on (2000: all)
OSP_VARIANTS="spce_ranked dpo_ranked ipo_ranked spce_random"; ITERS=3; SFT_STEPS=-1; EVAL_PROMPTS=512; EVAL_PAIRS=2000
case "$SIZE" in
  tiny)  PROMPTS=32; BT_PAIRS=512; JUDGE_PAIRS=256; DPO_PAIRS=256; N=2; K=2; OSP_STEPS=3; OSP_BATCH=4
         OSP_VARIANTS=spce_ranked; ITERS=1; SFT_STEPS=100; EVAL_PROMPTS=16; EVAL_PAIRS=256 ;;
  small) PROMPTS=384; BT_PAIRS=8000; JUDGE_PAIRS=6000; DPO_PAIRS=4000; N=4; K=4; OSP_STEPS=30; OSP_BATCH=8 ;;
  large) PROMPTS=1024; BT_PAIRS=20000; JUDGE_PAIRS=20000; DPO_PAIRS=20000; N=8; K=7; OSP_STEPS=200; OSP_BATCH=16 ;;
  *) echo "SIZE must be tiny, small or large" >&2; exit 2 ;;
esac
# The tiny model trains from scratch, so its learning rates are far above the papers' (which are
# for fine-tuning 8B / 1.1B models): SFT 2e-3, reward models 1e-3, DPO / OSP 1e-4, β = 0.1.
COMMON=(--seed "$SEED")

echo "== 1. the built-in task ($SECONDS s)"
[ -f $DATA/stats.json ] || python -m data.task
mkdir -p "$RUN/data"
for t in $(seq $ITERS); do head -n $PROMPTS $DATA/prompts_iter$t.jsonl > "$RUN/data/prompts_iter$t.jsonl"; done
head -n $EVAL_PROMPTS $DATA/prompts_eval.jsonl > "$RUN/data/prompts_eval.jsonl"
head -n $EVAL_PAIRS $DATA/pairs_eval.jsonl > "$RUN/data/pairs_eval.jsonl"
head -n $BT_PAIRS $DATA/pairs_train.jsonl > "$RUN/data/pairs_bt.jsonl"
head -n $JUDGE_PAIRS $DATA/pairs_train.jsonl > "$RUN/data/pairs_judge.jsonl"
head -n $DPO_PAIRS $DATA/pairs_train.jsonl > "$RUN/data/pairs_dpo.jsonl"

echo "== 2. SFT from scratch ($SECONDS s)"
python sft.py --model $DATA/model --scratch --data $DATA/sft.jsonl --out "$RUN/sft" \
    --block-size 128 --batch-size 16 --micro-batch-size 16 --lr 2e-3 --max-steps $SFT_STEPS --log-every 200 "${COMMON[@]}"

echo "== 3. reward models: Bradley-Terry, and the pairwise model that judges for OSP ($SECONDS s)"
python train_rm.py train --type bt --model "$RUN/sft" --pairs "$RUN/data/pairs_bt.jsonl" --eval-pairs "$RUN/data/pairs_eval.jsonl" \
    --out "$RUN/rm_bt" --lr 1e-3 --batch-size 64 --micro-batch-size 64 --max-length 256 --log-every 50 "${COMMON[@]}"
python train_rm.py train --type pairwise --model "$RUN/sft" --pairs "$RUN/data/pairs_judge.jsonl" --eval-pairs "$RUN/data/pairs_eval.jsonl" \
    --out "$RUN/judge" --lr 1e-3 --batch-size 32 --micro-batch-size 32 --max-length 256 --log-every 50 "${COMMON[@]}"

echo "== 4. offline DPO on the labelled pairs ($SECONDS s)"
DPO=(--beta 0.1 --lr 1e-4 --batch-size 64 --micro-batch-size 32 --max-length 256 --log-every 20)
python dpo.py --model "$RUN/sft" --pairs "$RUN/data/pairs_dpo.jsonl" --out "$RUN/dpo_offline" --epochs 1 "${DPO[@]}" "${COMMON[@]}"

echo "== 5. online iterative DPO: sample n per prompt → BT rewards → best vs worst → DPO ($SECONDS s)"
ONLINE=(--sft "$RUN/sft" --rm "$RUN/rm_bt" --prompts "$RUN/data/prompts_iter{t}.jsonl" --n $N --max-new-tokens 64
        --gen-batch-size 256 --epochs 2 "${DPO[@]}" "${COMMON[@]}")
for t in $(seq $ITERS); do python dpo.py --iter $t --run-dir "$RUN/online" "${ONLINE[@]}"; done
# Length penalty (paper 1's concise variant): best/worst by r − λ·characters. λ is on the reward
# model's scale: here a prompt's rewards spread by ~0.6 and its answers' lengths by ~18 characters.
for t in $(seq $ITERS); do python dpo.py --iter $t --run-dir "$RUN/online_lp" --length-penalty 0.02 "${ONLINE[@]}"; done
# The control: the same loop with the gold reward r* in place of the reward model.
for t in $(seq $ITERS); do python dpo.py --iter $t --run-dir "$RUN/online_gold" "${ONLINE[@]}" --rm gold; done

echo "== 6. online self-preferring (the pairwise model judges; π_SFT is policy start and reference) ($SECONDS s)"
# Paper 2's ablations: SPCE vs DPO / IPO losses on the same ranked pairs, ranked vs random pairing.
for variant in $OSP_VARIANTS; do
  python osp.py --model "$RUN/sft" --judge "$RUN/judge" --prompts "$RUN/data/prompts_iter1.jsonl" --out "$RUN/osp_$variant" \
      --loss "${variant%_*}" --pairing "${variant#*_}" --steps $OSP_STEPS --batch-size $OSP_BATCH --k $K \
      --beta 0.1 --lr 1e-4 --max-new-tokens 64 --gold --log-every 10 "${COMMON[@]}"
done

echo "== 7. evaluation on held-out prompts with the gold scorer ($SECONDS s)"
python evaluate.py --run "$RUN" --prompts "$RUN/data/prompts_eval.jsonl"
echo "== done in $SECONDS s"
