"""Reward modelling: a Bradley-Terry reward model or a pairwise preference model, their evaluation,
and reward scoring of sampled responses for the online loop (paper 1, RLHF Workflow, §2). Three
subcommands: train, score, eval (`python train_rm.py SUBCOMMAND --help` lists each one's flags).

    # train a Bradley-Terry RM from the SFT checkpoint (paper 1: 1 epoch, lr 2e-6, batch 512)
    python train_rm.py train --type bt --model runs/builtin/sft --pairs data/builtin/pairs_train.jsonl \\
        --eval-pairs data/builtin/pairs_eval.jsonl --out runs/builtin/rm
    torchrun --nproc_per_node 8 train_rm.py train --type bt --model runs/sft --pairs pairs.jsonl --out runs/rm

    # a pairwise preference model: "[CONTEXT] x [RESPONSE A] a1 [RESPONSE B] a2" -> "A" / "B"
    python train_rm.py train --type pairwise --model runs/builtin/sft --pairs data/builtin/pairs_train.jsonl \\
        --out runs/builtin/pm --lr 5e-6

    # score n samples per prompt for the online loop (batched, sharded under torchrun, resumable)
    python train_rm.py score --rm runs/builtin/rm --samples samples.jsonl --out rewards.jsonl

    # evaluate: held-out accuracy (overall and per `source`) and the length-bias statistic
    python train_rm.py eval --rm runs/builtin/rm --pairs data/builtin/pairs_eval.jsonl --samples samples.jsonl

A rerun of `train` with --out already holding a model skips training (--overwrite trains it again);
`score` skips when --out exists and resumes a crashed run from its finished chunks.

Bradley-Terry (paper 1, eq. (1)): P(a_w ≻ a_l | x) = σ(r(x, a_w) − r(x, a_l)), trained by
L = −log σ(r_w − r_l). The reward r(x, a) is a linear head on the backbone's last hidden state,
read at the last token of the chat template's full rendering of x + a, tokenized as one text
(tokens.encode_rendering: the ids of tokenizer.apply_chat_template(x + [a])). That token is the
newline after <|im_end|> for ChatML, <|eot_id|> for Llama-3, </s> for Mistral; it is where
transformers' AutoModelForSequenceClassification reads the same text, and the sequence TRL's
RewardTrainer trains on, so a reward model trained here or there scores the same everywhere. The
position is found from the sequence lengths, never by searching for the pad id, which many
checkpoints set equal to eos. Scoring re-renders each record's text with the reward model's own
tokenizer and template, which need not be the policy's.
The saved RM is an HF *ForSequenceClassification folder (num_labels=1, head `score`), so other
tools load it; transformers reads the last token that is not the pad id (left or right padding), so
its config's pad_token_id is an id that never ends a scored sequence, and its saved tokenizer pads
with that same id (apply_chat_template(conversations, padding=True) then gives transformers the
batch it expects).
"""
import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from parallel import add_lora_flags, add_scale_flags, destroy_distributed, gradient_sync, init_distributed, load_for_training, lora_settings, save_checkpoint, scale_settings, unwrap
from runs import InputError, MetricsLogger, add_tracking_flags, already_trained, atomic_write_text, fraction, non_negative_float, positive_float, positive_int, print0, process_in_chunks, run_cli, step_limit
from tokens import load_tokenizer, right_pad
from training import StepSums, add_resume_flag, autocast, batch_schedule, cosine_lr, finish_training_state, load_training_state, make_optimizer, optimizer_step, rank_micro_batches, save_training_state, seed_everything, set_lr
from data.schema import load_records
from memory_plan import print_stage_plan
from losses import bt_loss
from rewards import judge_template, label_token_ids, length_bias, load_for_inference, model_kind, pair_token_ids, pairwise_preference, pairwise_query_ids, score_records, sequence_rewards, unused_pad_id


# ----------------------------------------------------------------------------------------------
# Evaluation


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


# ----------------------------------------------------------------------------------------------
# Training


def training_examples(args, tokenizer, pairs, template, rng):
    """Token lists of each pair. BT: (chosen ids, rejected ids, margin); pairwise: (query ids, label
    id, 0) with the two responses in a random A/B order (fights position bias). A pair whose chosen
    and rejected are the same (after truncation, for BT) carries no preference and is dropped.
    Returns the examples, the number dropped and the number of truncated sequences."""
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
            examples.append((chosen, rejected, margin))
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
            examples.append((query[-args.max_length:], label, 0.0))
    return examples, dropped, truncated


def train_step(model, optimizer, micro_batches, kind, center_coef, grad_clip, global_pairs, pad_id,
               world_size, device):
    """One optimizer step on this rank's micro-batches [(examples, weight (b,))], an example being
    (chosen ids, rejected ids, margin) for kind "bt", (query ids, label id) for "pairwise". Returns
    the step's StepSums (on the device) and the gradient norm (memory_trace.py runs this function)."""
    sums = StepSums()
    for m, (items, weight) in enumerate(micro_batches):
        with gradient_sync(model, sync=m == len(micro_batches) - 1):
            with autocast(model, device):
                if kind == "bt":
                    chosen_and_rejected = [e[0] for e in items] + [e[1] for e in items]
                    rewards = sequence_rewards(model, chosen_and_rejected, pad_id, device)
                    chosen, rejected = rewards[:len(items)], rewards[len(items):]
                    margins = torch.tensor([e[2] for e in items], device=device)
                    per_pair = bt_loss(chosen, rejected, margins, center_coef)  # (B,)
                    correct = (chosen > rejected).float()
                else:  # cross-entropy on the label token, over the full vocabulary
                    input_ids, lengths = right_pad([e[0] for e in items], pad_id, device)
                    targets = torch.full_like(input_ids, -100)
                    labels = torch.tensor([e[1] for e in items], device=device)
                    targets[torch.arange(len(items), device=device), lengths - 1] = labels
                    label_logps = model(input_ids, targets=targets, num_targets=len(items))  # (B, T)
                    per_pair = -label_logps.sum(1)  # (B,)
                    correct = (per_pair < math.log(2)).float()  # the label has probability > 1/2
            # Mean over the global batch's pairs: divide by its size, × world size (the gradient
            # all-reduce averages over ranks).
            batch_loss = (per_pair * weight).sum() / global_pairs
            (batch_loss * world_size).backward()
        sums.add(loss=batch_loss, correct=correct * weight)  # summed over micro-batches and ranks
    grad_norm = optimizer_step(model, optimizer, grad_clip)
    return sums, grad_norm


def train(args, dist_info):
    device, world_size = dist_info.device, dist_info.world_size

    # ------------------------------------------------------------------------------------------
    # Data

    tokenizer = load_tokenizer(args.model)
    pairs = load_records(args.pairs, "pairs")
    template = (judge_template(args.model, args.template or "pairwise")
                if args.type == "pairwise" else None)
    ab_order_rng = torch.Generator().manual_seed(args.seed)
    examples, dropped, truncated = training_examples(args, tokenizer, pairs, template, ab_order_rng)
    if not examples:
        why = (f", {dropped} dropped: chosen and rejected identical after truncation to "
               f"--max-length {args.max_length}" if dropped else "")
        raise InputError(f"{args.pairs}: no preference pair to train on ({len(pairs)} read{why}); "
                         'expected JSONL records {"prompt": [...], "chosen": "...", "rejected": "..."}')
    if dropped:
        print0(f"warning: {dropped} of {len(pairs)} pairs have identical chosen and rejected "
               f"(after truncation to --max-length {args.max_length}): no preference to learn, dropped")
    if truncated:
        print0(f"warning: {truncated} sequences exceed --max-length {args.max_length} "
               f"and were truncated")
    schedule = batch_schedule(len(examples), args.batch_size, args.epochs, args.seed + 1,
                              args.max_steps)
    total_steps = len(schedule)
    first_micro_batches = rank_micro_batches(schedule[0], dist_info.rank, world_size,
                                             args.micro_batch_size)
    micro_steps = len(first_micro_batches)
    print0(f"{len(examples)} pairs, {total_steps} steps of {args.batch_size} pairs "
           f"({micro_steps} micro-batches of {args.micro_batch_size} per rank)")

    # ------------------------------------------------------------------------------------------
    # Model and optimizer (the cosine schedule is set each step)

    checkpointing, save_dtype = scale_settings(args, device)
    head = "score" if args.type == "bt" else "lm"
    model = load_for_training(args.model, args.parallel, dist_info, head=head,
                              activation_checkpointing=checkpointing, lora=lora_settings(args))
    optimizer = make_optimizer(model, args.lr, args.weight_decay)

    # ------------------------------------------------------------------------------------------
    # Training loop: one host read per step (StepSums.reduce).

    # After a crash: the latest --save-every state, and the step to go on from (0: none).
    start = load_training_state(args.out, model, optimizer, args)
    metrics_path = Path(args.out) / "metrics.jsonl"
    metrics = MetricsLogger(metrics_path, enabled=dist_info.is_main, report_to=args.report_to,
                            run_name=f"train_rm {args.out}", config=vars(args), resume_step=start)
    model.train()
    for step in tqdm(range(start, total_steps), desc=f"train_rm ({args.type})", initial=start,
                     total=total_steps, disable=not dist_info.is_main):
        batch = schedule[step]
        t0 = time.time()
        lr = cosine_lr(step, total_steps, args.lr, args.warmup_ratio)
        set_lr(optimizer, lr)
        index_groups = rank_micro_batches(batch, dist_info.rank, world_size, args.micro_batch_size)
        micro_batches = []
        for indices in index_groups:
            items = [examples[max(i, 0)] for i in indices]  # index -1: padding ...
            weight = torch.tensor([float(i >= 0) for i in indices], device=device)  # ... with weight 0
            micro_batches.append((items, weight))
        sums, grad_norm = train_step(model, optimizer, micro_batches, args.type, args.center_coef,
                                     args.grad_clip, len(batch), tokenizer.pad_token_id,
                                     world_size, device)
        totals = sums.reduce(device, grad_norm=grad_norm)
        line = dict(step=step + 1, loss=totals["loss"], accuracy=totals["correct"] / len(batch),
                    lr=lr, grad_norm=totals["grad_norm"], ms=(time.time() - t0) * 1000)
        metrics.log(**line)
        if dist_info.is_main and (step % args.log_every == 0 or step == total_steps - 1):
            tqdm.write(f"step {step + 1}/{total_steps} | loss {line['loss']:.4f} | "
                       f"acc {line['accuracy']:.3f} | lr {lr:.2e} | grad {line['grad_norm']:.3f} | "
                       f"{line['ms']:.0f} ms")
        save_training_state(args.out, step + 1, total_steps, model, optimizer, args)
    metrics.close()

    # ------------------------------------------------------------------------------------------
    # Save

    if args.type == "bt":
        # transformers' sequence classifier reads the last token that is not pad_token_id: pick a pad
        # that never ends a scored sequence, and let the saved tokenizer pad with that same id, so a
        # batch padded by it is read at the same (last real) token as ours.
        pad_id = unused_pad_id(tokenizer)
        unwrap(model).config.raw["pad_token_id"] = pad_id
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    elif dist_info.is_main:  # written first, so the atomic checkpoint save carries it into the folder
        atomic_write_text(Path(args.out) / "judge_template.txt", template)
    save_checkpoint(model, args.out, tokenizer, source_dir=args.model, dtype=save_dtype,
                    save_adapter=args.save_adapter)
    finish_training_state(args.out)
    print0(f"saved {args.out}")


def evaluate(path, pairs_path, samples_path, device, batch_size, max_length, template=None):
    """Print and save (eval.json in the model folder) accuracy and the length-bias statistic."""
    kind = model_kind(path)
    model = load_for_inference(path, kind, device)
    tokenizer = load_tokenizer(path)
    results = {"model": str(path), "type": kind}
    if pairs_path:
        pairs = load_records(pairs_path, "pairs")
        if not pairs:
            raise InputError(f"{pairs_path}: no preference pairs to evaluate on (the file is empty)")
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
# Command line: train | score | eval, each with its own flags.


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

    train_parser = commands.add_parser(
        "train", parents=[shared], allow_abbrev=False,
        help="train a Bradley-Terry reward model or a pairwise preference model",
        description="Train a Bradley-Terry reward model (--type bt) or a pairwise "
                    "preference model (--type pairwise) on preference pairs.")
    train_parser.add_argument("--type", choices=["bt", "pairwise"], default="bt",
                              help="Bradley-Terry RM or pairwise preference model")
    train_parser.add_argument("--model", required=True,
                              help="starting checkpoint folder (the SFT model)")
    train_parser.add_argument("--pairs", required=True, help="preference pairs JSONL to train on")
    train_parser.add_argument("--out", required=True, help="output model folder")
    train_parser.add_argument("--eval-pairs",
                              help="held-out pairs JSONL evaluated after training (eval.json in --out)")
    train_parser.add_argument("--template",
                              help="pairwise: the A/B instruction, one of data.judge.JUDGE_TEMPLATES or a "
                                   "text file (default 'pairwise'); recorded as judge_template.txt in --out")
    train_parser.add_argument("--lr", type=positive_float, default=2e-6,
                              help="peak learning rate (paper 1: 2e-6 BT, 5e-6 pairwise)")
    train_parser.add_argument("--epochs", type=positive_float, default=1.0,
                              help="passes over the pairs (fractions allowed)")
    train_parser.add_argument("--batch-size", type=positive_int, default=512,
                              help="global batch in pairs (paper 1: 512)")
    train_parser.add_argument("--micro-batch-size", type=positive_int, default=8,
                              help="pairs per forward pass on each rank")
    train_parser.add_argument("--max-steps", type=step_limit, default=-1,
                              help="stop after this many optimizer steps (-1: epochs decide)")
    train_parser.add_argument("--warmup-ratio", type=fraction, default=0.03,
                              help="linear warmup fraction of the cosine schedule")
    train_parser.add_argument("--weight-decay", type=non_negative_float, default=0.0,
                              help="AdamW weight decay")
    train_parser.add_argument("--grad-clip", type=non_negative_float, default=1.0,
                              help="max global gradient norm (0: off)")
    train_parser.add_argument("--use-margin", action="store_true",
                              help="BT: subtract each pair's `margin` inside the sigmoid")
    train_parser.add_argument("--center-coef", type=non_negative_float, default=0.0,
                              help="BT: reward-centering coefficient (0: off)")
    train_parser.add_argument("--parallel", choices=["fsdp", "ddp"], default="fsdp",
                              help="data parallelism under torchrun")
    train_parser.add_argument("--seed", type=int, default=0,
                              help="global seed (data order, A/B order, new head)")
    train_parser.add_argument("--log-every", type=positive_int, default=10,
                              help="print a step line every N steps")
    train_parser.add_argument("--overwrite", action="store_true",
                              help="retrain even if --out already holds a model")
    add_scale_flags(train_parser)
    add_lora_flags(train_parser)
    add_tracking_flags(train_parser)
    add_resume_flag(train_parser)

    score_parser = commands.add_parser(
        "score", parents=[shared], allow_abbrev=False,
        help="add a reward to every response of a samples file",
        description="Score every response of a samples file with a Bradley-Terry "
                    "reward model (chunked, sharded under torchrun, resumable).")
    score_parser.add_argument("--rm", required=True,
                              help="a trained Bradley-Terry reward model folder")
    score_parser.add_argument("--samples", required=True,
                              help="samples JSONL (id, prompt, responses)")
    score_parser.add_argument("--out", required=True,
                              help="output rewards JSONL (skipped when it exists)")
    score_parser.add_argument("--chunk-size", type=positive_int, default=256,
                              help="prompts per resumable chunk")

    eval_parser = commands.add_parser(
        "eval", parents=[shared], allow_abbrev=False,
        help="held-out accuracy and the length-bias statistic of a trained model",
        description="Held-out accuracy on --pairs (overall and per source) and, for a "
                    "Bradley-Terry model, the reward-length correlation on --samples; "
                    "written to eval.json in the model folder.")
    eval_parser.add_argument("--rm", required=True,
                             help="a trained model folder (a reward model or a pairwise model)")
    eval_parser.add_argument("--pairs", help="held-out preference pairs JSONL")
    eval_parser.add_argument("--samples",
                             help="samples JSONL for the length-bias statistic (Bradley-Terry models)")
    eval_parser.add_argument("--template",
                             help="pairwise: the A/B instruction (default: the model's judge_template.txt)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "eval" and not (args.pairs or args.samples):
        parser.error("eval needs --pairs and/or --samples")

    dist_info = init_distributed(args.device)
    device = dist_info.device
    if args.command == "train":
        seed_everything(args.seed)
        checkpointing, _ = scale_settings(args, device)
        # bt: chosen and rejected through the score head; pairwise: one (query, label) sequence each
        plan_stage = "rm" if args.type == "bt" else "sft"
        print_stage_plan(args.model, plan_stage, dist_info, args.micro_batch_size, args.max_length,
                         args.parallel, checkpointing, packed=False, lora=lora_settings(args))
        if args.dry_run:
            return destroy_distributed()
        if not already_trained(args.out, args.overwrite):
            train(args, dist_info)
        if args.eval_pairs and dist_info.is_main:
            evaluate(args.out, args.eval_pairs, None, device, args.eval_batch_size, args.max_length,
                     args.template)
    elif args.command == "score":
        if Path(args.out).exists():
            print0(f"{args.out} exists; skipping")
        else:
            records = load_records(args.samples, "samples")
            if not records:
                raise InputError(f"{args.samples}: no samples to score (the file is empty)")
            model = load_for_inference(args.rm, "bt", device)
            tokenizer = load_tokenizer(args.rm)
            process_in_chunks(records, args.out,
                              lambda chunk: score_records(model, tokenizer, chunk, device,
                                                         args.eval_batch_size, args.max_length),
                              dist_info, chunk_size=args.chunk_size, desc="scoring",
                              settings=dict(rm=str(args.rm), max_length=args.max_length))
            print0(f"wrote {args.out}")
    elif dist_info.is_main:  # eval
        evaluate(args.rm, args.pairs, args.samples, device, args.eval_batch_size, args.max_length,
                 args.template)
    destroy_distributed()


if __name__ == "__main__":
    run_cli(main)
