"""Reward modelling (paper 1, RLHF Workflow, §2): a Bradley-Terry reward model or a pairwise
preference model (a judge), learned from human preference pairs (x, a_w, a_l), a_w preferred.

Bradley-Terry (paper 1, eq. (1)): a preference comes from a scalar reward r(x, a),

    P(a_w ≻ a_l | x) = σ(r(x, a_w) − r(x, a_l)),

and r_θ is its maximum-likelihood fit (paper 1 §2.1; losses.bt_loss):

    L_RM(θ) = −E_(x, a_w, a_l) log σ(r_θ(x, a_w) − r_θ(x, a_l)).

r_θ is the SFT model with a linear head on its last hidden state, read at the last token of the
chat template's rendering of x + a. It stands in for the true reward r* of the KL-regularised
objective (paper 1, eq. (2)) that the online loop (dpo.py) optimises: there it scores n samples
per prompt (`score` below) and the best is paired with the worst.

Pairwise preference model (paper 1 §2.1): no reward at all. The instruction
"[CONTEXT] x [RESPONSE A] a1 [RESPONSE B] a2" is trained, as next-token prediction, to answer "A" or
"B", the two responses shown in a random order (against position bias); P(a1 ≻ a2 | x) is the
softmax over the "A"/"B" logits, both orders averaged (rewards.pairwise_preference). It is the
judge of OSP (osp.py; paper 2's preference augmentation, Algorithm 1 line 3).

Three subcommands: train, score, eval (`python train_rm.py SUBCOMMAND --help` lists each one's
flags).

    # train a Bradley-Terry RM from the SFT checkpoint (paper 1: 1 epoch, lr 2e-6, batch 512)
    python train_rm.py train --type bt --model runs/builtin/sft \\
        --pairs data/builtin/pairs_train.jsonl --eval-pairs data/builtin/pairs_eval.jsonl \\
        --out runs/builtin/rm
    torchrun --nproc_per_node 8 train_rm.py train --type bt --model runs/sft --pairs pairs.jsonl \\
        --out runs/rm

    # a pairwise preference model: "[CONTEXT] x [RESPONSE A] a1 [RESPONSE B] a2" -> "A" / "B"
    python train_rm.py train --type pairwise --model runs/builtin/sft \\
        --pairs data/builtin/pairs_train.jsonl --out runs/builtin/pm --lr 5e-6

    # score n samples per prompt for the online loop (batched, sharded under torchrun, resumable)
    python train_rm.py score --rm runs/builtin/rm --samples samples.jsonl --out rewards.jsonl

    # evaluate: held-out accuracy (overall and per `source`) and the length-bias statistic
    python train_rm.py eval --rm runs/builtin/rm --pairs data/builtin/pairs_eval.jsonl \\
        --samples samples.jsonl

A rerun of `train` with --out already holding a model skips training (--overwrite trains it again);
`score` skips when --out exists and resumes a crashed run from its finished chunks.
Where the reward is read, and how the saved model reads the same in transformers: docs/stages.md.
"""
import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from parallel import (add_lora_flags, add_scale_flags, destroy_distributed, gradient_sync,
                      init_distributed, load_for_training, lora_settings, save_checkpoint,
                      scale_settings, unwrap)
from runs import (InputError, MetricsLogger, add_tracking_flags, already_trained,
                  atomic_write_text, fraction, non_negative_float, positive_float, positive_int,
                  print0, process_in_chunks, run_cli, step_limit)
from tokens import load_tokenizer, right_pad
from training import (StepSums, add_resume_flag, autocast, batch_schedule, cosine_lr,
                      finish_training_state, load_training_state, make_optimizer, optimizer_step,
                      rank_micro_batches, save_training_state, seed_everything, set_lr)
from data.schema import load_records
from memory_plan import print_stage_plan
from losses import bt_loss
from rewards import (judge_template, label_token_ids, length_bias, load_for_inference, model_kind,
                     pair_token_ids, pairwise_preference, pairwise_query_ids, score_records,
                     sequence_rewards, unused_pad_id)

# ----------------------------------------------------------------------------------------------
# Flags: train | score | eval, each with its own.


def build_parser():
    # Flags every subcommand takes.
    shared = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    shared.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    shared.add_argument("--max-length", type=positive_int, default=2048,
                        help="tokens per sequence; longer ones are truncated (counted)")
    shared.add_argument("--eval-batch-size", type=positive_int, default=32,
                        help="sequences per forward when scoring or evaluating")

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,score,eval}")
    add_train_flags(commands.add_parser(
        "train", parents=[shared], allow_abbrev=False,
        help="train a Bradley-Terry reward model or a pairwise preference model",
        description="Train a Bradley-Terry reward model (--type bt) or a pairwise "
                    "preference model (--type pairwise) on preference pairs."))
    add_score_flags(commands.add_parser(
        "score", parents=[shared], allow_abbrev=False,
        help="add a reward to every response of a samples file",
        description="Score every response of a samples file with a Bradley-Terry "
                    "reward model (chunked, sharded under torchrun, resumable)."))
    add_eval_flags(commands.add_parser(
        "eval", parents=[shared], allow_abbrev=False,
        help="held-out accuracy and the length-bias statistic of a trained model",
        description="Held-out accuracy on --pairs (overall and per source) and, for a "
                    "Bradley-Terry model, the reward-length correlation on --samples; "
                    "written to eval.json in the model folder."))
    return parser


def add_train_flags(parser):
    parser.add_argument("--type", choices=["bt", "pairwise"], default="bt",
                        help="Bradley-Terry RM or pairwise preference model")
    parser.add_argument("--model", required=True,
                        help="starting checkpoint folder (the SFT model)")
    parser.add_argument("--pairs", required=True, help="preference pairs JSONL to train on")
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--eval-pairs",
                        help="held-out pairs JSONL evaluated after training (eval.json in --out)")
    parser.add_argument("--template",
                        help="pairwise: the A/B instruction, one of data.judge.JUDGE_TEMPLATES "
                             "or a text file (default 'pairwise'); recorded as judge_template.txt "
                             "in --out")
    parser.add_argument("--lr", type=positive_float, default=2e-6,
                        help="peak learning rate (paper 1: 2e-6 BT, 5e-6 pairwise)")
    parser.add_argument("--epochs", type=positive_float, default=1.0,
                        help="passes over the pairs (fractions allowed)")
    parser.add_argument("--batch-size", type=positive_int, default=512,
                        help="global batch in pairs (paper 1: 512)")
    parser.add_argument("--micro-batch-size", type=positive_int, default=8,
                        help="pairs per forward pass on each rank")
    parser.add_argument("--max-steps", type=step_limit, default=-1,
                        help="stop after this many optimizer steps (-1: epochs decide)")
    parser.add_argument("--warmup-ratio", type=fraction, default=0.03,
                        help="linear warmup fraction of the cosine schedule")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.0,
                        help="AdamW weight decay")
    parser.add_argument("--grad-clip", type=non_negative_float, default=1.0,
                        help="max global gradient norm (0: off)")
    parser.add_argument("--use-margin", action="store_true",
                        help="BT: subtract each pair's `margin` inside the sigmoid")
    parser.add_argument("--center-coef", type=non_negative_float, default=0.0,
                        help="BT: reward-centering coefficient (0: off)")
    parser.add_argument("--parallel", choices=["fsdp", "ddp"], default="fsdp",
                        help="data parallelism under torchrun")
    parser.add_argument("--seed", type=int, default=0,
                        help="global seed (data order, A/B order, new head)")
    parser.add_argument("--log-every", type=positive_int, default=10,
                        help="print a step line every N steps")
    parser.add_argument("--overwrite", action="store_true",
                        help="retrain even if --out already holds a model")
    add_scale_flags(parser)
    add_lora_flags(parser)
    add_tracking_flags(parser)
    add_resume_flag(parser)


def add_score_flags(parser):
    parser.add_argument("--rm", required=True,
                        help="a trained Bradley-Terry reward model folder")
    parser.add_argument("--samples", required=True,
                        help="samples JSONL (id, prompt, responses)")
    parser.add_argument("--out", required=True,
                        help="output rewards JSONL (skipped when it exists)")
    parser.add_argument("--chunk-size", type=positive_int, default=256,
                        help="prompts per resumable chunk")


def add_eval_flags(parser):
    parser.add_argument("--rm", required=True,
                        help="a trained model folder (a reward model or a pairwise model)")
    parser.add_argument("--pairs", help="held-out preference pairs JSONL")
    parser.add_argument("--samples",
                        help="samples JSONL for the length-bias statistic (Bradley-Terry models)")
    parser.add_argument("--template",
                        help="pairwise: the A/B instruction (default: the model's "
                             "judge_template.txt)")


# ----------------------------------------------------------------------------------------------
# The stage


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "eval" and not (args.pairs or args.samples):
        parser.error("eval needs --pairs and/or --samples")
    dist_info = init_distributed(args.device)
    if args.command == "train":
        train_command(args, dist_info)
    elif args.command == "score":
        score_command(args, dist_info)
    elif dist_info.is_main:  # eval
        evaluate(args.rm, args.pairs, args.samples, dist_info.device, args.eval_batch_size,
                 args.max_length, args.template)
    destroy_distributed()


def train_command(args, dist_info):
    """`train`: the memory plan (all of --dry-run), the model trained unless --out holds one, and
    its held-out evaluation with --eval-pairs."""
    seed_everything(args.seed)
    if not start_run(args, dist_info):
        return
    if not already_trained(args.out, args.overwrite):
        train(args, dist_info)
    if args.eval_pairs and dist_info.is_main:
        evaluate(args.out, args.eval_pairs, None, dist_info.device, args.eval_batch_size,
                 args.max_length, args.template)


def train(args, dist_info):
    """Pairs → examples → optimizer steps → the saved model (an HF folder)."""
    tokenizer = load_tokenizer(args.model)
    pairs = load_records(args.pairs, "pairs")
    template = (judge_template(args.model, args.template or "pairwise")
                if args.type == "pairwise" else None)
    examples, schedule = load_data(args, tokenizer, pairs, template, dist_info)
    checkpointing, save_dtype = scale_settings(args, dist_info.device)
    head = "score" if args.type == "bt" else "lm"  # a scalar reward, or the LM's "A"/"B" logits
    model = load_for_training(args.model, args.parallel, dist_info, head=head,
                              activation_checkpointing=checkpointing, lora=lora_settings(args))
    optimizer = make_optimizer(model, args.lr, args.weight_decay)  # the LR is set each step
    train_loop(args, dist_info, model, optimizer, examples, schedule, tokenizer.pad_token_id)
    save_trained_model(args, dist_info, model, tokenizer, template, save_dtype)


# ----------------------------------------------------------------------------------------------
# The losses: one optimizer step


class BTExample(NamedTuple):
    """A preference pair for the Bradley-Terry model: the tokens of prompt + each response."""
    chosen: list
    rejected: list
    margin: float  # --use-margin: the pair's `margin`, subtracted inside the sigmoid; else 0


class JudgeExample(NamedTuple):
    """A preference pair for the pairwise model: "[CONTEXT] x [RESPONSE A] a1 [RESPONSE B] a2" as
    tokens, and the token the model should answer: "A" or "B", the preferred response's letter."""
    query: list
    label: int


class MicroBatch(NamedTuple):
    examples: list         # BTExample or JudgeExample
    weight: torch.Tensor   # (b,) 1, or 0 for the padding that evens out the ranks' micro-batches


def train_step(model, optimizer, micro_batches, kind, center_coef, grad_clip, global_pairs, pad_id,
               world_size, device):
    """One optimizer step on this rank's MicroBatches (examples, weight (b,)): BTExamples for kind
    "bt", JudgeExamples for "pairwise". Returns the step's StepSums (on the device) and the
    gradient norm (memory_trace.py runs this function)."""
    sums = StepSums()
    for m, (examples, weight) in enumerate(micro_batches):
        with gradient_sync(model, sync=m == len(micro_batches) - 1):
            with autocast(model, device):
                if kind == "bt":
                    per_pair, correct = bt_losses(model, examples, center_coef, pad_id, device)
                else:
                    per_pair, correct = judge_losses(model, examples, pad_id, device)
            # Mean over the global batch's pairs: divide by its size, × world size (the gradient
            # all-reduce averages over ranks).
            batch_loss = (per_pair * weight).sum() / global_pairs
            (batch_loss * world_size).backward()
        sums.add(loss=batch_loss, correct=correct * weight)  # summed over micro-batches and ranks
    grad_norm = optimizer_step(model, optimizer, grad_clip)
    return sums, grad_norm


def bt_losses(model, examples, center_coef, pad_id, device):
    """Bradley-Terry: per pair (B,), −log σ(r_w − r_l − margin) (+ the centering term), with the
    rewards of chosen and rejected from one forward; and whether r_w > r_l."""
    chosen_ids, rejected_ids, margins = zip(*examples)
    rewards = sequence_rewards(model, [*chosen_ids, *rejected_ids], pad_id, device)
    chosen, rejected = rewards[:len(examples)], rewards[len(examples):]
    margins = torch.tensor(margins, device=device)
    per_pair = bt_loss(chosen, rejected, margins, center_coef)  # (B,)
    return per_pair, (chosen > rejected).float()


def judge_losses(model, examples, pad_id, device):
    """Pairwise model: per pair (B,), the cross-entropy of the label token after the query, over the
    full vocabulary (next-token prediction); and whether the label has probability > 1/2."""
    queries, labels = zip(*examples)
    input_ids, lengths = right_pad(list(queries), pad_id, device)
    targets = torch.full_like(input_ids, -100)
    labels = torch.tensor(labels, device=device)
    targets[torch.arange(len(examples), device=device), lengths - 1] = labels
    label_logps = model(input_ids, targets=targets, num_targets=len(examples))  # (B, T)
    per_pair = -label_logps.sum(1)  # (B,)
    return per_pair, (per_pair < math.log(2)).float()


# ----------------------------------------------------------------------------------------------
# Data: preference pairs → examples


def load_data(args, tokenizer, pairs, template, dist_info):
    """The examples of the pairs (a one-line error when none is left, warnings for what was dropped
    or truncated) and the batch schedule: one global batch of example indices per step."""
    ab_order_rng = torch.Generator().manual_seed(args.seed)
    examples, dropped, truncated = training_examples(args, tokenizer, pairs, template, ab_order_rng)
    if not examples:
        why = (f", {dropped} dropped: chosen and rejected identical after truncation to "
               f"--max-length {args.max_length}" if dropped else "")
        raise InputError(f"{args.pairs}: no preference pair to train on ({len(pairs)} read{why}); "
                         'expected JSONL records {"prompt": [...], "chosen": "...", '
                         '"rejected": "..."}')
    if dropped:
        print0(f"warning: {dropped} of {len(pairs)} pairs have identical chosen and rejected "
               f"(after truncation to --max-length {args.max_length}): no preference to learn, "
               f"dropped")
    if truncated:
        print0(f"warning: {truncated} sequences exceed --max-length {args.max_length} "
               f"and were truncated")
    schedule = batch_schedule(len(examples), args.batch_size, args.epochs, args.seed + 1,
                              args.max_steps)
    first_micro_batches = rank_micro_batches(schedule[0], dist_info.rank, dist_info.world_size,
                                             args.micro_batch_size)
    print0(f"{len(examples)} pairs, {len(schedule)} steps of {args.batch_size} pairs "
           f"({len(first_micro_batches)} micro-batches of {args.micro_batch_size} per rank)")
    return examples, schedule


def training_examples(args, tokenizer, pairs, template, rng):
    """The examples of each pair: BTExample (chosen ids, rejected ids, margin), or JudgeExample
    (query ids, label id) with the two responses in a random A/B order (fights position bias). A
    pair whose chosen and rejected are the same (after truncation, for BT) carries no preference
    and is dropped. Returns the examples, the number dropped and the number of truncated
    sequences."""
    examples, dropped, truncated = [], 0, 0
    if args.type == "bt":
        for p in pairs:
            chosen, t1 = pair_token_ids(tokenizer, p["prompt"], p["chosen"], args.max_length)
            rejected, t2 = pair_token_ids(tokenizer, p["prompt"], p["rejected"], args.max_length)
            truncated += t1 + t2
            if chosen == rejected:
                dropped += 1
                continue
            margin = float(p.get("margin", 0.0)) if args.use_margin else 0.0
            examples.append(BTExample(chosen, rejected, margin))
    else:
        first_label, second_label = label_token_ids(tokenizer)
        flips = (torch.rand(len(pairs), generator=rng) < 0.5).tolist()
        for p, chosen_second in zip(pairs, flips):
            if p["chosen"] == p["rejected"]:
                dropped += 1
                continue
            if chosen_second:
                first, second = p["rejected"], p["chosen"]
            else:
                first, second = p["chosen"], p["rejected"]
            query = pairwise_query_ids(tokenizer, p["prompt"], first, second, template)
            truncated += len(query) > args.max_length
            label = second_label if chosen_second else first_label
            examples.append(JudgeExample(query[-args.max_length:], label))
    return examples, dropped, truncated


def micro_batch(examples, indices, device):
    """The examples of one micro-batch of indices; index -1 (padding, so that every rank runs as
    many micro-batches) takes example 0 with weight 0."""
    weight = torch.tensor([float(i >= 0) for i in indices], device=device)
    return MicroBatch([examples[max(i, 0)] for i in indices], weight)


# ----------------------------------------------------------------------------------------------
# Training loop: one host read per step (StepSums.reduce).


def train_loop(args, dist_info, model, optimizer, examples, schedule, pad_id):
    """The optimizer steps of the schedule, from the step a crashed run saved (or 0)."""
    device, world_size = dist_info.device, dist_info.world_size
    total_steps = len(schedule)
    start, metrics = resume(args, dist_info, model, optimizer)
    model.train()
    for step in tqdm(range(start, total_steps), desc=f"train_rm ({args.type})", initial=start,
                     total=total_steps, disable=not dist_info.is_main):
        batch = schedule[step]
        t0 = time.time()
        lr = cosine_lr(step, total_steps, args.lr, args.warmup_ratio)
        set_lr(optimizer, lr)
        index_groups = rank_micro_batches(batch, dist_info.rank, world_size, args.micro_batch_size)
        micro_batches = [micro_batch(examples, indices, device) for indices in index_groups]
        sums, grad_norm = train_step(model, optimizer, micro_batches, args.type, args.center_coef,
                                     args.grad_clip, len(batch), pad_id, world_size, device)
        totals = sums.reduce(device, grad_norm=grad_norm)
        line = dict(step=step + 1, loss=totals["loss"], accuracy=totals["correct"] / len(batch),
                    lr=lr, grad_norm=totals["grad_norm"], ms=(time.time() - t0) * 1000)
        metrics.log(**line)
        if dist_info.is_main and (step % args.log_every == 0 or step == total_steps - 1):
            tqdm.write(f"step {step + 1}/{total_steps} | loss {line['loss']:.4f} | "
                       f"acc {line['accuracy']:.3f} | lr {lr:.2e} | "
                       f"grad {line['grad_norm']:.3f} | {line['ms']:.0f} ms")
        save_training_state(args.out, step + 1, total_steps, model, optimizer, args)
    metrics.close()


# ----------------------------------------------------------------------------------------------
# Scoring and evaluation


def score_command(args, dist_info):
    """`score`: a reward for every response of --samples, chunk by chunk (resumable), sharded over
    the ranks; skipped when --out exists."""
    if Path(args.out).exists():
        print0(f"{args.out} exists; skipping")
        return
    records = load_records(args.samples, "samples")
    if not records:
        raise InputError(f"{args.samples}: no samples to score (the file is empty)")
    device = dist_info.device
    model = load_for_inference(args.rm, "bt", device)
    tokenizer = load_tokenizer(args.rm)
    process_in_chunks(records, args.out,
                      lambda chunk: score_records(model, tokenizer, chunk, device,
                                                  args.eval_batch_size, args.max_length),
                      dist_info, chunk_size=args.chunk_size, desc="scoring",
                      settings=dict(rm=str(args.rm), max_length=args.max_length))
    print0(f"wrote {args.out}")


@torch.no_grad()
def preference_accuracy(model, tokenizer, pairs, kind, device, batch_size, max_length,
                        template="pairwise"):
    """Held-out accuracy: the fraction of pairs where the model prefers `chosen` (BT: r_w > r_l;
    pairwise: P(chosen ≻ rejected) > 0.5); ties count as half. Returns overall and per-source."""
    correct = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="eval", leave=False):
        batch = pairs[start:start + batch_size]
        if kind == "bt":
            chosen = [pair_token_ids(tokenizer, p["prompt"], p["chosen"], max_length)[0]
                      for p in batch]
            rejected = [pair_token_ids(tokenizer, p["prompt"], p["rejected"], max_length)[0]
                        for p in batch]
            rewards = sequence_rewards(model, chosen + rejected, tokenizer.pad_token_id, device)
            difference = rewards[:len(batch)] - rewards[len(batch):]
        else:
            prompts = [p["prompt"] for p in batch]
            chosen_texts = [p["chosen"] for p in batch]
            rejected_texts = [p["rejected"] for p in batch]
            p_chosen = pairwise_preference(model, tokenizer, prompts, chosen_texts, rejected_texts,
                                           device, template)
            difference = p_chosen - 0.5
        correct += ((difference > 0).float() + 0.5 * (difference == 0).float()).tolist()
    by_source = defaultdict(list)
    for pair, c in zip(pairs, correct):
        by_source[pair.get("source", "all")].append(c)
    accuracy = sum(correct) / max(1, len(correct))
    accuracy_by_source = {s: sum(v) / len(v) for s, v in sorted(by_source.items())}
    return accuracy, accuracy_by_source


def evaluate(path, pairs_path, samples_path, device, batch_size, max_length, template=None):
    """Print and save (eval.json in the model folder) accuracy and the length-bias statistic."""
    kind = model_kind(path)
    model = load_for_inference(path, kind, device)
    tokenizer = load_tokenizer(path)
    results = {"model": str(path), "type": kind}
    if pairs_path:
        pairs = load_records(pairs_path, "pairs")
        if not pairs:
            raise InputError(f"{pairs_path}: no preference pairs to evaluate on "
                             "(the file is empty)")
        resolved_template = judge_template(path, template)
        accuracy, by_source = preference_accuracy(model, tokenizer, pairs, kind, device, batch_size,
                                                  max_length, resolved_template)
        results.update(pairs=str(pairs_path), accuracy=accuracy, accuracy_by_source=by_source)
        per_source = "  ".join(f"{s}: {a:.4f}" for s, a in by_source.items())
        print0(f"held-out accuracy {accuracy:.4f}  " + per_source)
    if samples_path and kind == "bt":
        samples = load_records(samples_path, "samples")
        if not samples:
            raise InputError(f"{samples_path}: no samples to measure the length bias on "
                             "(the file is empty)")
        scored = score_records(model, tokenizer, samples, device, batch_size, max_length)
        mean, used, skipped = length_bias(scored)
        results.update(length_correlation=mean, length_correlation_prompts=used)
        print0(f"reward-length Pearson correlation: mean {mean:.4f} over {used} prompts "
               f"({skipped} with constant length or reward)")
    atomic_write_text(Path(path) / "eval.json", json.dumps(results, indent=2) + "\n")
    return results


# ----------------------------------------------------------------------------------------------
# Run management: the memory plan, resume after a crash, the saved model.


def start_run(args, dist_info):
    """The memory plan, printed before anything loads; False for --dry-run (the plan is all)."""
    checkpointing, _ = scale_settings(args, dist_info.device)
    # bt: chosen and rejected through the score head; pairwise: one (query, label) sequence each
    plan_stage = "rm" if args.type == "bt" else "sft"
    print_stage_plan(args.model, plan_stage, dist_info, args.micro_batch_size, args.max_length,
                     args.parallel, checkpointing, packed=False, lora=lora_settings(args))
    return not args.dry_run


def resume(args, dist_info, model, optimizer):
    """After a crash: the latest --save-every state loaded, and the step to go on from (0: none);
    with the metrics log, which keeps the lines up to that step."""
    start = load_training_state(args.out, model, optimizer, args)
    metrics = MetricsLogger(Path(args.out) / "metrics.jsonl", enabled=dist_info.is_main,
                            report_to=args.report_to, run_name=f"train_rm {args.out}",
                            config=vars(args), resume_step=start)
    return start, metrics


def save_trained_model(args, dist_info, model, tokenizer, template, save_dtype):
    """An HF folder: a *ForSequenceClassification (BT) or a causal LM with its judge_template.txt
    (pairwise)."""
    if args.type == "bt":
        # transformers' sequence classifier reads the last token that is not pad_token_id: pick a
        # pad that never ends a scored sequence, and let the saved tokenizer pad with that same
        # id, so a batch padded by it is read at the same (last real) token as ours.
        pad_id = unused_pad_id(tokenizer)
        unwrap(model).config.raw["pad_token_id"] = pad_id
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    elif dist_info.is_main:  # written first: the atomic checkpoint save carries it into the folder
        atomic_write_text(Path(args.out) / "judge_template.txt", template)
    save_checkpoint(model, args.out, tokenizer, source_dir=args.model, dtype=save_dtype,
                    save_adapter=args.save_adapter)
    finish_training_state(args.out)
    print0(f"saved {args.out}")


if __name__ == "__main__":
    run_cli(main)
