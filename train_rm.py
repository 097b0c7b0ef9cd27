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
(common.encode_rendering: the ids of tokenizer.apply_chat_template(x + [a])). That token is the
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
import torch.nn.functional as F
from tqdm import tqdm

from common import (InputError, MetricsLogger, StepSums, add_lora_flags, add_resume_flag, add_scale_flags,
                    add_tracking_flags, already_trained, atomic_write_text, autocast, batch_schedule,
                    closing_ids, cosine_lr, default_dtype, destroy_distributed, encode_prompt,
                    encode_rendering, finish_training_state, fraction, gradient_sync, init_distributed,
                    load_for_training, load_tokenizer, load_training_state, lora_settings, make_optimizer,
                    non_negative_float, optimizer_step, positive_float, positive_int, print0,
                    process_in_chunks, rank_micro_batches, right_pad, run_cli,
                    save_checkpoint, save_training_state, scale_settings, seed_everything, set_lr, step_limit,
                    unwrap)
from data.judge import JUDGE_LABELS, JUDGE_TEMPLATES, render_judge_prompt
from data.schema import load_records
from memory_plan import print_stage_plan
from model import Transformer

# ----------------------------------------------------------------------------------------------
# The math: the BT loss and how a reward is read off the model.


def bt_loss(chosen_rewards, rejected_rewards, margin=None, center_coef=0.0):
    """Per-pair Bradley-Terry loss −log σ(r_w − r_l − m)  (paper 1 §2.1; m is Llama-2's optional
    margin, 0 by default), plus the optional reward-centering term c·(r_w + r_l)² (Eisenstein et
    al. 2023) that pins the rewards' arbitrary offset near 0. Inputs (B,), output (B,)."""
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference)  # logsigmoid is stable for large |difference|
    if center_coef:
        loss = loss + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return loss


def sequence_rewards(model, sequences, pad_id, device):
    """Scalar reward of each token list (B,), read at its last real token (index length − 1).
    Sequences are right-padded, so padding comes after every real token and, under causal attention,
    cannot change the hidden state the reward is read from."""
    input_ids, lengths = right_pad(sequences, pad_id, device)
    scores = model(input_ids)                                    # (B, T)
    return scores.gather(1, (lengths - 1)[:, None]).squeeze(1)   # (B,)


def pair_token_ids(tokenizer, prompt, response, max_length):
    """The tokens a reward is read from: the chat template's full rendering of prompt + response
    (common.encode_rendering), the reward read at its last token. Truncation keeps the first
    max_length tokens; callers count and report it."""
    ids = encode_rendering(tokenizer, prompt + [{"role": "assistant", "content": response}])
    return ids[:max_length], len(ids) > max_length


# ----------------------------------------------------------------------------------------------
# Pairwise preference model: an LM asked which of two responses is better.


def pairwise_query_ids(tokenizer, prompt, response_a, response_b, template="pairwise"):
    """A comparison query as a user turn of the chat template; the model's next token is "A" or "B".
    The query is the template's full rendering of that turn with the generation prompt (the ids of
    apply_chat_template(turn, add_generation_prompt=True)), so a transformers user reads the A/B
    logits at the same position. `template` is a name in data.judge.JUDGE_TEMPLATES or a template
    text: paper 1's bare pairwise format by default, paper 2's judge instruction ("dialogue",
    "summarization") for osp.py."""
    query = render_judge_prompt(prompt, response_a, response_b, template)
    return encode_prompt(tokenizer, [{"role": "user", "content": query}])


def label_token_ids(tokenizer):
    """The ids of the two answer tokens (data.judge.JUDGE_LABELS: first / second response better)."""
    ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in JUDGE_LABELS]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the answer labels {JUDGE_LABELS} must each be a single token "
                         f"for the pairwise model, got {ids}")
    return ids[0][0], ids[1][0]


def pairwise_logits_ab(model, queries, label_ids, pad_id, device):
    """(B, 2) logits of the tokens "A" and "B" at the position after each query: the last real
    position's hidden state projected onto those two rows of the LM head only, not the (B, T, V)
    logits of every position (at B = 64, T = 2048, V = 128k that is 32 GiB in bf16 for 2 numbers a
    row). Inference only, on a plain model: the LM head is read outside forward, which FSDP would
    not have gathered. Training reads the label's log-prob through forward(targets=...), which
    computes it at the label position only (rlhf_kernels/logprob.py skips ignored positions)."""
    label_ids = torch.tensor(label_ids, device=device)                           # label_token_ids(tokenizer)
    input_ids, lengths = right_pad(queries, pad_id, device)
    hidden = model.hidden_states(input_ids)                                        # (B, T, H)
    last = hidden[torch.arange(len(queries), device=device), lengths - 1]          # (B, H)
    return F.linear(last, model.lm_head_weight[label_ids]).float()                 # (B, 2)


@torch.no_grad()
def pairwise_preference(model, tokenizer, prompts, responses_1, responses_2, device,
                        template="pairwise", batch_size=64):
    """P(response_1 ≻ response_2 | prompt) (B,): the softmax over the "A"/"B" logits, P("A") with
    response_1 shown first averaged with P("B") with the order swapped, so a position bias cancels
    (paper 1 §2.2; paper 2 §3.2 for the judge's target preference strength)."""
    first = [pairwise_query_ids(tokenizer, p, a, b, template)
             for p, a, b in zip(prompts, responses_1, responses_2)]
    swapped = [pairwise_query_ids(tokenizer, p, b, a, template)
               for p, a, b in zip(prompts, responses_1, responses_2)]
    probabilities = []
    labels = label_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id
    for start in range(0, len(first), batch_size):
        first_batch = first[start:start + batch_size]
        swapped_batch = swapped[start:start + batch_size]
        p_first = pairwise_logits_ab(model, first_batch, labels, pad_id, device).softmax(-1)[:, 0]
        p_swapped = pairwise_logits_ab(model, swapped_batch, labels, pad_id, device).softmax(-1)[:, 1]
        probabilities.append((p_first + p_swapped) / 2)
    return torch.cat(probabilities) if probabilities else torch.zeros(0, device=device)


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


def pearson(xs, ys):
    """Pearson correlation of two equal-length lists; None when either is constant."""
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.norm() * y.norm()).item()
    return None if denominator == 0 else (x @ y).item() / denominator


def length_bias(records):
    """Paper 1 Fig. 3: the mean over prompts of the Pearson correlation between the reward and the
    length (in tokens; characters when token counts are absent) of the n responses to a prompt.
    Prompts whose lengths or rewards are all equal have no correlation and are left out (counted)."""
    correlations = []
    for record in records:
        lengths = record.get("num_tokens") or [len(r) for r in record["responses"]]
        c = pearson(record["rewards"], lengths)
        if c is not None:
            correlations.append(c)
    mean = sum(correlations) / len(correlations) if correlations else float("nan")
    return mean, len(correlations), len(records) - len(correlations)


# ----------------------------------------------------------------------------------------------
# Scoring for the online loop


def score_records(model, tokenizer, records, device, batch_size, max_length):
    """Add `rewards` (one float per response) to each samples record. Reads only each record's
    `prompt` and `responses`; every other field is passed through unchanged. `tokenizer` is the
    reward model's own: each record is rendered from its text with the reward model's template."""
    flat = [(i, pair_token_ids(tokenizer, r["prompt"], response, max_length))
            for i, r in enumerate(records) for response in r["responses"]]
    truncated = sum(t for _, (_, t) in flat)
    if truncated:
        print0(f"warning: {truncated} responses exceed --max-length {max_length}; "
               f"scored on their first {max_length} tokens")
    rewards = []
    with torch.no_grad():
        for start in range(0, len(flat), batch_size):
            sequences = [ids for _, (ids, _) in flat[start:start + batch_size]]
            rewards += sequence_rewards(model, sequences, tokenizer.pad_token_id, device).tolist()
    out, position = [], 0
    for record in records:
        n = len(record["responses"])
        out.append({**record, "rewards": rewards[position:position + n]})
        position += n
    return out


def load_for_inference(path, kind, device):
    dtype = default_dtype(device)
    head = "score" if kind == "bt" else "lm"
    model = Transformer.from_pretrained(path, device=device, dtype=dtype, head=head)
    return model.eval()


def judge_template(path, template=None, default="pairwise"):
    """The A/B instruction of a pairwise model or judge: `template` (a name in data.judge.JUDGE_TEMPLATES
    or a text file) when given, else the one it was trained with (judge_template.txt in its folder,
    written by training), else `default`."""
    saved = Path(path) / "judge_template.txt"
    if not template and saved.exists():
        return saved.read_text()
    template = template or default
    return JUDGE_TEMPLATES.get(template) or Path(template).read_text()


def model_kind(path):
    """'bt' for a saved reward model (a sequence classifier), 'pairwise' for a causal LM."""
    architectures = json.loads((Path(path) / "config.json").read_text()).get("architectures", [""])
    return "bt" if architectures[0].endswith("ForSequenceClassification") else "pairwise"


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


def unused_pad_id(tokenizer):
    """A token id that never ends a scored sequence: the pad token when it is none of the tokens the
    template closes a conversation with (common.closing_ids) nor eos, else the unk token or the last
    vocabulary id."""
    used = set(closing_ids(tokenizer)) | {tokenizer.eos_token_id}
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, len(tokenizer) - 1):
        if candidate is not None and candidate not in used:
            return candidate
    raise ValueError("no token id is free to serve as the reward model's pad_token_id")


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
