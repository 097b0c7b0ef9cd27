#!/usr/bin/env bash
# The whole workflow on the built-in task (data/task.py), from nothing to a results table:
#   task data → SFT from scratch → reward models (Bradley-Terry; pairwise = the OSP judge)
#   → offline DPO → 3 online iterations of iterative DPO (BT reward; with a length penalty; with the
#   gold reward as an oracle control) → OSP (SPCE with ranked pairs; DPO / IPO losses; random
#   pairing) → evaluation.
#
#   SIZE=tiny bash run.sh                # a smoke run: every stage once, tiny sizes, ~2 minutes on CPU
#   bash run.sh                          # SIZE=small: 2 CPU cores, about 15 minutes
#   SIZE=full bash run.sh                # small + paper 2's OSP ablations (DPO / IPO losses, random pairs)
#   SIZE=large SEED=1 bash run.sh        # one GPU: all the data, the papers' n = 8 / K = 7, longer OSP
#   EVAL_SPLIT=dev bash run.sh           # the table on the dev prompts, where the settings were chosen
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
# EVAL_SPLIT: the prompts the table is made on: eval (held out, the README's tables) or dev (where every
# setting below was chosen, docs/diagnosis.md). ITERS: online iterations; SFT_STEPS: SFT optimizer steps
# (-1: one epoch); EVAL_PROMPTS: prompts graded; EVAL_PAIRS: held-out pairs the reward models are scored on.
EVAL_SPLIT=${EVAL_SPLIT:-eval}
OSP_VARIANTS="spce_ranked"; ITERS=3; SFT_STEPS=-1; EVAL_PROMPTS=512; EVAL_PAIRS=2000
case "$SIZE" in
  tiny)  PROMPTS=32; RM_PAIRS=512; DPO_PAIRS=256; N=2; K=2; OSP_STEPS=3; OSP_BATCH=4
         ITERS=1; SFT_STEPS=100; EVAL_PROMPTS=16; EVAL_PAIRS=256 ;;
  small) PROMPTS=384; RM_PAIRS=8000; DPO_PAIRS=4000; N=4; K=4; OSP_STEPS=30; OSP_BATCH=8 ;;
  full)  PROMPTS=384; RM_PAIRS=8000; DPO_PAIRS=4000; N=4; K=4; OSP_STEPS=30; OSP_BATCH=8  # small + paper 2's ablations
         OSP_VARIANTS="spce_ranked dpo_ranked ipo_ranked spce_random" ;;
  large) PROMPTS=1024; RM_PAIRS=20000; DPO_PAIRS=20000; N=8; K=7; OSP_STEPS=200; OSP_BATCH=16
         OSP_VARIANTS="spce_ranked dpo_ranked ipo_ranked spce_random" ;;
  *) echo "SIZE must be tiny, small, full or large" >&2; exit 2 ;;
esac
# The tiny model trains from scratch, so its learning rates are far above the papers' (which are
# for fine-tuning 8B / 1.1B models): SFT 2e-3, reward models 1e-3. DPO: lr 3e-5, β 0.5 and an NLL term
# on the chosen answer (RPO, α = 1), chosen on the dev split (docs/diagnosis.md).
COMMON=(--seed "$SEED")

echo "== 1. the built-in task ($SECONDS s)"
[ -f $DATA/stats.json ] || python -m data.task
mkdir -p "$RUN/data"
for t in $(seq $ITERS); do head -n $PROMPTS $DATA/prompts_iter$t.jsonl > "$RUN/data/prompts_iter$t.jsonl"; done
head -n $EVAL_PROMPTS $DATA/prompts_$EVAL_SPLIT.jsonl > "$RUN/data/prompts_$EVAL_SPLIT.jsonl"
# Two kinds of human preference data: pairs of SFT-like answers (two demonstrator answers to a prompt,
# labelled by the simulated human), and the offline pairs of three other policies, where the longer
# answer usually wins (the length bias paper 1 warns about).
head -n $RM_PAIRS $DATA/pairs_sftlike_train.jsonl > "$RUN/data/pairs_rm.jsonl"
head -n $DPO_PAIRS $DATA/pairs_sftlike_train.jsonl > "$RUN/data/pairs_dpo.jsonl"
head -n $EVAL_PAIRS $DATA/pairs_sftlike_eval.jsonl > "$RUN/data/pairs_rm_eval.jsonl"
head -n $RM_PAIRS $DATA/pairs_train.jsonl > "$RUN/data/pairs_biased.jsonl"
head -n $EVAL_PAIRS $DATA/pairs_eval.jsonl > "$RUN/data/pairs_biased_eval.jsonl"

echo "== 2. SFT from scratch, and the control: SFT continued on the exact answers to the loop's prompts ($SECONDS s)"
python sft.py --model $DATA/model --scratch --data $DATA/sft.jsonl --out "$RUN/sft" \
    --block-size 128 --batch-size 16 --micro-batch-size 16 --lr 2e-3 --max-steps $SFT_STEPS --log-every 200 "${COMMON[@]}"
python -m data.task gold-sft --prompts $(seq -f "$RUN/data/prompts_iter%g.jsonl" $ITERS) --out "$RUN/data/sft_gold.jsonl"
python sft.py --model "$RUN/sft" --data "$RUN/data/sft_gold.jsonl" --out "$RUN/sft_gold" \
    --block-size 128 --batch-size 16 --micro-batch-size 16 --lr 3e-4 --epochs 2 --log-every 20 "${COMMON[@]}"

echo "== 3. reward models: Bradley-Terry (SFT-like pairs; offline pairs), and the pairwise model that judges for OSP ($SECONDS s)"
RM=(--lr 1e-3 --micro-batch-size 64 --max-length 256 --log-every 50 "${COMMON[@]}")
python train_rm.py train --type bt --model "$RUN/sft" --pairs "$RUN/data/pairs_rm.jsonl" --eval-pairs "$RUN/data/pairs_rm_eval.jsonl" \
    --out "$RUN/rm_bt" --batch-size 64 "${RM[@]}"
python train_rm.py train --type bt --model "$RUN/sft" --pairs "$RUN/data/pairs_biased.jsonl" --eval-pairs "$RUN/data/pairs_biased_eval.jsonl" \
    --out "$RUN/rm_biased" --batch-size 64 "${RM[@]}"
python train_rm.py train --type pairwise --model "$RUN/sft" --pairs "$RUN/data/pairs_rm.jsonl" --eval-pairs "$RUN/data/pairs_rm_eval.jsonl" \
    --out "$RUN/judge" --batch-size 32 "${RM[@]}"

echo "== 4. offline DPO on the SFT-like pairs ($SECONDS s)"
DPO=(--beta 0.5 --nll-coef 1.0 --lr 3e-5 --batch-size 64 --micro-batch-size 32 --max-length 256 --log-every 20)
python dpo.py --model "$RUN/sft" --pairs "$RUN/data/pairs_dpo.jsonl" --out "$RUN/dpo_offline" --epochs 1 "${DPO[@]}" "${COMMON[@]}"

echo "== 5. online iterative DPO: sample n per prompt → reward → best vs worst → DPO ($SECONDS s)"
ONLINE=(--sft "$RUN/sft" --prompts "$RUN/data/prompts_iter{t}.jsonl" --n $N --max-new-tokens 64
        --gen-batch-size 256 --epochs 2 "${DPO[@]}" "${COMMON[@]}")
# The oracle: the gold reward r* in place of a reward model (what the loop can do with a perfect reward).
for t in $(seq $ITERS); do python dpo.py --iter $t --run-dir "$RUN/online_gold" --rm gold "${ONLINE[@]}"; done
# The BT reward model trained on SFT-like pairs (dpo.py prints how it ranks the policy's own samples).
for t in $(seq $ITERS); do python dpo.py --iter $t --run-dir "$RUN/online" --rm "$RUN/rm_bt" "${ONLINE[@]}"; done
# Reward hacking: the BT model of the offline pairs rewards length; paper 1's remedy, a length penalty
# (best/worst by r − λ·characters; λ on that model's scale, where a prompt's rewards spread by ~0.6).
for t in $(seq $ITERS); do python dpo.py --iter $t --run-dir "$RUN/online_biased" --rm "$RUN/rm_biased" "${ONLINE[@]}"; done
for t in $(seq $ITERS); do python dpo.py --iter $t --run-dir "$RUN/online_biased_lp" --rm "$RUN/rm_biased" --length-penalty 0.02 "${ONLINE[@]}"; done

echo "== 6. online self-preferring (the pairwise model judges; π_SFT is policy start and reference) ($SECONDS s)"
# SIZE=full / large add paper 2's ablations: DPO / IPO losses on the same ranked pairs, random pairing.
for variant in $OSP_VARIANTS; do
  python osp.py --model "$RUN/sft" --judge "$RUN/judge" --prompts "$RUN/data/prompts_iter1.jsonl" --out "$RUN/osp_$variant" \
      --loss "${variant%_*}" --pairing "${variant#*_}" --steps $OSP_STEPS --batch-size $OSP_BATCH --k $K \
      --beta 0.1 --lr 1e-4 --max-new-tokens 64 --gold --log-every 10 "${COMMON[@]}"
done

echo "== 7. evaluation with the gold scorer on the $EVAL_SPLIT prompts ($SECONDS s)"
python evaluate.py --run "$RUN" --prompts "$RUN/data/prompts_$EVAL_SPLIT.jsonl"
echo "== done in $SECONDS s"
