"""Supervised fine-tuning (SFT): next-token negative log-likelihood on the response tokens.

SFT is where both papers start (paper 1 §3.1 trains its initial policy π_0 this way; paper 2's
Algorithm 1 requires the SFT model π_SFT): the model learns to answer by imitating demonstrations.
For a conversation with prompt x and assistant reply y = (y_1, ..., y_T) the loss is the negative
log-likelihood of the reply's tokens, each predicted from everything before it,

    L(θ) = −(1/N) Σ_conversations Σ_t log π_θ(y_t | x, y_<t),

with N the number of assistant tokens in the whole global batch, so that every token weighs the
same however the tokens fall across micro-batches and ranks. Only the assistant's tokens are
targets: the model learns to answer, not to write the user's turns. A plain-text record
(pretraining) trains on every token after bos. The model trained here starts every later stage:
the reward model and the judge (train_rm.py), the DPO policy and its reference (dpo.py), OSP's
policy, reference and judge (osp.py).

Conversations are packed into blocks of --block-size tokens; a token attends only to earlier tokens
of its own conversation and positions restart at 0 for each one, so packing changes throughput, not
the math. Paper 1's settings are the defaults: lr 2e-5, cosine, warmup ratio 0.03, 1 epoch, global
batch 32 packed blocks (of 8192 tokens in the paper).

    # the built-in task: a tiny model from scratch on 2 CPU cores (data: python -m data.task)
    python sft.py --model data/builtin/model --scratch --data data/builtin/sft.jsonl \\
        --out runs/builtin/sft

    # a real checkpoint on one node (FSDP2, bf16 compute, fp32 master weights)
    torchrun --nproc_per_node 8 sft.py --model /ckpt/Meta-Llama-3-8B --data chat.jsonl \\
        --out runs/sft --block-size 8192 --batch-size 32 --micro-batch-size 1

    # LoRA: a frozen bf16 base, rank-64 adapters; saved merged, and in PEFT's format in OUT/adapter
    python sft.py --model /ckpt/Mistral-7B --data chat.jsonl --out runs/sft-lora \\
        --lora-rank 64 --lora-alpha 32 --save-adapter

Input: JSONL records {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}, the
loss on assistant tokens; or plain-text records {"text": "..."} (bos + text + eos, no chat template,
the loss on every token), as the built-in task's pretrain.jsonl. A file may mix the two.
Output: an HF-format folder (config.json, model.safetensors, tokenizer) + metrics.jsonl. A rerun
with --out already holding a model does nothing (--overwrite trains it again).
Design notes (packing, the global token count, MFU): docs/stages.md.
"""
import argparse
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from parallel import (add_lora_flags, add_scale_flags, default_dtype, destroy_distributed,
                      gradient_sync, init_distributed, load_for_training, lora_settings,
                      save_checkpoint, scale_settings, unwrap)
from runs import (InputError, MetricsLogger, add_tracking_flags, already_trained, fraction,
                  non_negative_float, positive_float, positive_int, print0, run_cli, step_limit)
from tokens import encode_conversation, encode_text, end_of_turn_ids, load_tokenizer
from training import (StepSums, add_resume_flag, autocast, batch_schedule, cosine_lr,
                      finish_training_state, load_training_state, make_optimizer, optimizer_step,
                      rank_micro_batches, save_training_state, seed_everything, set_lr)
from data.schema import load_records
from losses import per_token_nll
from memory_plan import print_stage_plan

# ----------------------------------------------------------------------------------------------
# Flags


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", required=True,
                        help="HF checkpoint folder (or, with --scratch, "
                             "a folder with config.json + tokenizer)")
    parser.add_argument("--scratch", action="store_true",
                        help="initialise weights randomly from the folder's config.json")
    parser.add_argument("--data", required=True, help="chat JSONL with a 'messages' list per line")
    parser.add_argument("--out", required=True, help="output checkpoint folder")
    parser.add_argument("--lr", type=positive_float, default=2e-5,
                        help="peak learning rate (paper 1: 2e-5)")
    parser.add_argument("--epochs", type=positive_float, default=1.0,
                        help="passes over the data (fractions allowed)")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="global batch, in packed blocks per optimizer step")
    parser.add_argument("--micro-batch-size", type=positive_int, default=4,
                        help="blocks per forward pass on each rank "
                             "(gradient accumulation makes up the rest)")
    parser.add_argument("--block-size", type=positive_int, default=2048,
                        help="tokens per packed block (paper 1: 8192)")
    parser.add_argument("--max-steps", type=step_limit, default=-1,
                        help="stop after this many optimizer steps (-1: epochs decide)")
    parser.add_argument("--warmup-ratio", type=fraction, default=0.03,
                        help="fraction of steps with linear warmup")
    parser.add_argument("--min-lr-ratio", type=fraction, default=0.0,
                        help="cosine decays to this fraction of --lr")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.0,
                        help="AdamW weight decay")
    parser.add_argument("--grad-clip", type=non_negative_float, default=1.0,
                        help="max global gradient norm (0: off)")
    parser.add_argument("--parallel", choices=["fsdp", "ddp"], default="fsdp",
                        help="data parallelism under torchrun")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0,
                        help="global seed (packing and data order, init)")
    parser.add_argument("--log-every", type=positive_int, default=10,
                        help="print a step line every N steps")
    parser.add_argument("--overwrite", action="store_true",
                        help="retrain even if --out already holds a checkpoint")
    add_scale_flags(parser)
    add_lora_flags(parser)
    add_tracking_flags(parser)
    add_resume_flag(parser)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# The stage: data → model → optimizer steps → checkpoint


def main(argv=None):
    args = parse_args(argv)
    dist_info = init_distributed(args.device)
    compute_dtype = default_dtype(dist_info.device)
    seed_everything(args.seed)
    scale = start_run(args, dist_info)  # None: already trained, or --dry-run
    if scale is None:
        return destroy_distributed()
    tokenizer = load_tokenizer(args.model)
    data = load_data(args, tokenizer, dist_info)
    model = load_model(args, dist_info, scale, compute_dtype)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)  # the LR is set each step
    train(args, dist_info, model, optimizer, data, tokenizer.pad_token_id)
    # a full HF-format checkpoint gathered on rank 0 (weights, config, tokenizer)
    save_checkpoint(model, args.out, tokenizer, source_dir=args.model, dtype=scale.save_dtype,
                    save_adapter=args.save_adapter)
    finish_training_state(args.out)
    print0(f"saved {args.out}")
    destroy_distributed()


# ----------------------------------------------------------------------------------------------
# The loss: one optimizer step


class Batch(NamedTuple):
    """One packed micro-batch (make_batch): tensors (B, block_size) on the device, and the number of
    targets that count (a host int, for the log-prob kernel)."""
    input_ids: torch.Tensor
    targets: torch.Tensor       # the next token where it is trained on, else -100
    position_ids: torch.Tensor  # restarting at 0 for each document
    document_ids: torch.Tensor  # which document of the block a token belongs to (-1: padding)
    num_targets: int


def train_step(model, optimizer, micro_batches, grad_clip, world_size, device):
    """One optimizer step on this rank's micro-batches (make_batch's Batch: input ids, targets,
    positions, document ids, number of targets). Returns the step's StepSums (on the device), the
    gradient norm and the global count of assistant tokens (tensors: no host read here;
    memory_trace.py runs this same function).

    Loss = −(sum of assistant-token log-probs) / (number of assistant tokens in the whole global
    batch): the per-token NLL of the global batch. Each rank divides by the global count and
    multiplies by world size because the gradient all-reduce averages over ranks."""
    rank_tokens = sum(num_targets for *_, num_targets in micro_batches)
    valid_tokens = torch.tensor(rank_tokens, device=device)  # ()
    if dist.is_initialized():
        dist.all_reduce(valid_tokens)  # the global count stays a device tensor (not read)
    sums = StepSums()
    for i, batch in enumerate(micro_batches):
        input_ids, targets, position_ids, document_ids, num_targets = batch
        with gradient_sync(model, sync=i == len(micro_batches) - 1):
            with autocast(model, device):
                logps = model(input_ids,
                              position_ids=position_ids,
                              document_ids=document_ids,
                              targets=targets,
                              num_targets=num_targets)  # (B, T)
            loss = per_token_nll(logps.sum(), valid_tokens.clamp(min=1)) * world_size
            loss.backward()
        # summed over micro-batches and ranks: the global mean loss
        sums.add(loss=loss / world_size)
    grad_norm = optimizer_step(model, optimizer, grad_clip)
    return sums, grad_norm, valid_tokens


# ----------------------------------------------------------------------------------------------
# Data: tokenize every conversation, mark the tokens the loss trains on, pack into blocks.


class Document(NamedTuple):
    """One tokenized conversation: its token ids, and per position the next token where that token
    is trained on, else -100."""
    ids: list
    targets: list


class SFTData(NamedTuple):
    documents: list  # Document per conversation
    blocks: list     # per packed block, the indices of its documents
    schedule: list   # per optimizer step, the global batch of block indices


def load_data(args, tokenizer, dist_info):
    """The records of --data tokenized (one-line errors and warnings for what cannot be trained on),
    packed into blocks, and the batch schedule: one global batch of block indices per step."""
    conversations = load_records(args.data, "sft")
    documents, truncated, dropped = tokenize_conversations(tokenizer, conversations,
                                                           args.block_size, dist_info.is_main)
    if not documents:
        dropped_note = (f", {dropped} with no assistant token within --block-size {args.block_size}"
                        if dropped else "")
        raise InputError(f"{args.data}: no conversation to train on ({len(conversations)} read"
                         + dropped_note
                         + "); SFT needs JSONL records {\"messages\": [...]} "
                           "with at least one assistant turn, or {\"text\": \"...\"}")
    if truncated:
        dropped_note = (f"; {dropped} of them kept no assistant token and were dropped"
                        if dropped else "")
        print0(f"warning: {truncated} of {len(conversations)} conversations were longer than "
               f"--block-size {args.block_size} and were truncated to it" + dropped_note)
    blocks = pack_blocks(documents, args.block_size, args.seed)
    # One global batch of block indices per optimizer step (its own seed: packing used args.seed).
    schedule = batch_schedule(len(blocks), args.batch_size, args.epochs, args.seed + 1,
                              args.max_steps)
    first_micro_batches = rank_micro_batches(schedule[0], dist_info.rank, dist_info.world_size,
                                             args.micro_batch_size)
    print0(f"{len(documents)} conversations → {len(blocks)} blocks of {args.block_size} tokens; "
           f"{len(schedule)} steps of {args.batch_size} blocks "
           f"({len(first_micro_batches)} micro-batches of {args.micro_batch_size} per rank)")
    return SFTData(documents, blocks, schedule)


def encode_plain_text(tokenizer, text):
    """A plain-text (pretraining) record: bos (if the tokenizer has one) + text + eos, every token
    trained on."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + encode_text(tokenizer, text) + [tokenizer.eos_token_id]
    return ids, [False] * len(bos) + [True] * (len(ids) - len(bos))


def tokenize_conversations(tokenizer, conversations, block_size, show_progress):
    """A Document (ids, targets) per conversation, cut to block_size tokens. targets[t] is the token
    t+1 where that token is assistant text — or any token after bos, in a plain-text record — (the
    model learns to predict it from the prefix), else -100.
    Returns the documents and how many were truncated / dropped (no assistant token left to train
    on)."""
    end_of_turn = end_of_turn_ids(tokenizer)
    documents, truncated, dropped = [], 0, 0
    for record in tqdm(conversations, desc="tokenizing", disable=not show_progress):
        if "messages" in record:
            ids, is_assistant = encode_conversation(tokenizer, record["messages"], end_of_turn)
        else:
            ids, is_assistant = encode_plain_text(tokenizer, record["text"])
        if len(ids) > block_size:
            truncated += 1
            ids, is_assistant = ids[:block_size], is_assistant[:block_size]
        targets = [ids[t + 1] if is_assistant[t + 1] else -100 for t in range(len(ids) - 1)]
        targets.append(-100)
        if all(target == -100 for target in targets):
            dropped += 1
            continue
        documents.append(Document(ids, targets))
    return documents, truncated, dropped


def pack_blocks(documents, block_size, seed):
    """Documents (in a seeded random order) greedily packed into blocks of at most block_size
    tokens; each block is a list of document indices."""
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    blocks, current, used = [], [], 0
    for i in order:
        if current and used + len(documents[i].ids) > block_size:
            blocks.append(current)
            current, used = [], 0
        current.append(i)
        used += len(documents[i].ids)
    if current:
        blocks.append(current)
    return blocks


def make_batch(block_indices, blocks, documents, block_size, pad_id, device):
    """A Batch of packed tensors (B, block_size): input ids, targets, positions restarting per
    document, and document ids, and the number of targets that count. Padding (and a padding
    block, index -1) gets document id -1 and target -100, so it never affects the loss."""
    B, T = len(block_indices), block_size
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    document_ids = torch.full((B, T), -1, dtype=torch.long)
    for row, block_index in enumerate(block_indices):
        start = 0
        for doc_number, doc in enumerate(blocks[block_index] if block_index >= 0 else []):
            ids, doc_targets = documents[doc]
            end = start + len(ids)
            input_ids[row, start:end] = torch.tensor(ids)
            targets[row, start:end] = torch.tensor(doc_targets)
            position_ids[row, start:end] = torch.arange(len(ids))
            document_ids[row, start:end] = doc_number
            start = end
    # counted here, on the host, before the copy to the device
    num_targets = int((targets != -100).sum())
    return Batch(*[t.to(device) for t in (input_ids, targets, position_ids, document_ids)],
                 num_targets)


# ----------------------------------------------------------------------------------------------
# Model and training loop: one host read per step (StepSums.reduce).


def load_model(args, dist_info, scale, compute_dtype):
    """fp32 master weights; bf16 compute on GPU (training.autocast / FSDP's policy). Under FSDP
    built on the meta device and loaded by rank 0 alone (parallel.load_for_training)."""
    model = load_for_training(args.model, args.parallel, dist_info, scratch=args.scratch,
                              activation_checkpointing=scale.checkpointing, lora=scale.lora)
    total_parameters = unwrap(model).num_parameters()
    print0(f"model: {total_parameters / 1e6:.2f}M parameters, compute dtype {compute_dtype}, "
           f"activation checkpointing {'on' if scale.checkpointing else 'off'}")
    return model


def train(args, dist_info, model, optimizer, data, pad_id):
    """The optimizer steps of data.schedule, from the step a crashed run saved (or 0)."""
    device, world_size = dist_info.device, dist_info.world_size
    total_steps = len(data.schedule)
    start, metrics = resume(args, dist_info, model, optimizer)
    flops_per_token = training_flops_per_token(unwrap(model), args.block_size)  # for the MFU
    model.train()
    for step in tqdm(range(start, total_steps), desc="sft", initial=start, total=total_steps,
                     disable=not dist_info.is_main):
        t0 = time.time()
        lr = cosine_lr(step, total_steps, args.lr, args.warmup_ratio, args.min_lr_ratio)
        set_lr(optimizer, lr)
        block_groups = rank_micro_batches(data.schedule[step], dist_info.rank, world_size,
                                          args.micro_batch_size)
        micro_batches = [make_batch(indices, data.blocks, data.documents, args.block_size, pad_id,
                                    device)
                         for indices in block_groups]
        sums, grad_norm, valid_tokens = train_step(model, optimizer, micro_batches, args.grad_clip,
                                                   world_size, device)
        totals = sums.reduce(device, grad_norm=grad_norm, assistant_tokens=valid_tokens)
        # reduce() waited for the step's work, so this is its real duration
        log_step(metrics, totals, step, total_steps, lr, time.time() - t0, len(micro_batches),
                 flops_per_token, args, dist_info)
        save_training_state(args.out, step + 1, total_steps, model, optimizer, args)
    metrics.close()


PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM, dense bf16: the MFU denominator


def training_flops_per_token(model, block_size):
    """6 × (parameters used in matmuls) + attention scores (12·L·H·T, halved by causality)."""
    config = model.config
    matmul_parameters = (model.num_parameters(exclude_embeddings=True)
                         + config.vocab_size * config.hidden_size * config.tie_word_embeddings)
    attention = (6 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
                 * block_size)
    return 6 * matmul_parameters + attention


def log_step(metrics, totals, step, total_steps, lr, dt, micro_steps, flops_per_token, args,
             dist_info):
    """The step's metrics line (metrics.jsonl: loss, throughput, MFU on CUDA) and, every
    --log-every steps, a step line."""
    world_size = dist_info.world_size
    tokens = micro_steps * args.micro_batch_size * world_size * args.block_size  # padding included
    tokens_per_s = tokens / dt
    line = dict(step=step + 1, loss=totals["loss"], lr=lr, grad_norm=totals["grad_norm"],
                ms=dt * 1000, tokens_per_s=tokens_per_s,
                assistant_tokens=int(totals["assistant_tokens"]))
    peak_flops = PEAK_BF16_FLOPS if dist_info.device.type == "cuda" else None
    if peak_flops:
        line["mfu"] = flops_per_token * tokens_per_s / (peak_flops * world_size)
    metrics.log(**line)
    if dist_info.is_main and (step % args.log_every == 0 or step == total_steps - 1):
        mfu = f" | MFU {line['mfu'] * 100:.1f}%" if peak_flops else ""
        tqdm.write(f"step {step + 1}/{total_steps} | loss {line['loss']:.4f} | "
                   f"lr {lr:.2e} | grad {line['grad_norm']:.3f} | "
                   f"{dt * 1000:.0f} ms | {tokens_per_s:,.0f} tok/s{mfu}")


# ----------------------------------------------------------------------------------------------
# Run management: skip a finished run, print the memory plan, resume after a crash.


class Scale(NamedTuple):
    checkpointing: bool    # activation checkpointing
    save_dtype: torch.dtype
    lora: object           # model.LoRASettings, or None: full fine-tuning


def start_run(args, dist_info):
    """What runs before anything loads: None when --out already holds a model (no --overwrite) or
    for --dry-run (the memory plan only); else the scale settings."""
    if already_trained(args.out, args.overwrite):
        return None
    checkpointing, save_dtype = scale_settings(args, dist_info.device)
    lora = lora_settings(args)
    print_stage_plan(args.model, "sft", dist_info, args.micro_batch_size, args.block_size,
                     args.parallel, checkpointing, lora=lora)
    return None if args.dry_run else Scale(checkpointing, save_dtype, lora)


def resume(args, dist_info, model, optimizer):
    """After a crash: the latest --save-every state loaded, and the step to go on from (0: none);
    with the metrics log, which keeps the lines up to that step."""
    start = load_training_state(args.out, model, optimizer, args)
    metrics = MetricsLogger(Path(args.out) / "metrics.jsonl", enabled=dist_info.is_main,
                            report_to=args.report_to, run_name=f"sft {args.out}", config=vars(args),
                            resume_step=start)
    return start, metrics


if __name__ == "__main__":
    run_cli(main)
