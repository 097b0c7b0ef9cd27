"""Supervised fine-tuning on chat data, with the loss on assistant tokens only.

    # the built-in task: a tiny model from scratch on 2 CPU cores (python data/task.py writes the data)
    python sft.py --model data/builtin/model --scratch --data data/builtin/sft.jsonl --out runs/builtin/sft

    # a real checkpoint on one node (FSDP2, bf16 compute, fp32 master weights)
    torchrun --nproc_per_node 8 sft.py --model /ckpt/Meta-Llama-3-8B --data chat.jsonl --out runs/sft \\
        --block-size 8192 --batch-size 32 --micro-batch-size 1

Input: JSONL records {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}.
Output: an HF-format folder (config.json, model.safetensors, tokenizer) + metrics.jsonl.

Paper 1 (RLHF Workflow) settings are the defaults: lr 2e-5, cosine, warmup ratio 0.03, 1 epoch,
global batch 32 packed blocks. Conversations are packed into blocks of --block-size tokens; a
token attends only to earlier tokens of its own conversation and positions restart at 0 for each
conversation, so packing changes throughput, not the math.
"""
import argparse
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common import (MetricsLogger, all_reduce_sum, clip_grad_norm, cosine_lr, default_dtype, destroy_distributed,
                    encode_conversation, end_of_turn_ids, gradient_sync, init_distributed, load_tokenizer, print0,
                    save_checkpoint, seed_everything, wrap_model)
from data.schema import load_records
from model import Transformer

# ----------------------------------------------------------------------------------------------
# Arguments

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True, help="HF checkpoint folder (or, with --scratch, a folder with config.json + tokenizer)")
parser.add_argument("--scratch", action="store_true", help="initialise weights randomly from the folder's config.json")
parser.add_argument("--data", required=True, help="chat JSONL with a 'messages' list per line")
parser.add_argument("--out", required=True, help="output checkpoint folder")
parser.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (paper 1: 2e-5)")
parser.add_argument("--epochs", type=float, default=1.0, help="passes over the data (fractions allowed)")
parser.add_argument("--batch-size", type=int, default=32, help="global batch, in packed blocks per optimizer step")
parser.add_argument("--micro-batch-size", type=int, default=4, help="blocks per forward pass on each rank (gradient accumulation makes up the rest)")
parser.add_argument("--block-size", type=int, default=2048, help="tokens per packed block (paper 1: 8192)")
parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs decide)")
parser.add_argument("--warmup-ratio", type=float, default=0.03, help="fraction of steps with linear warmup")
parser.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine decays to this fraction of --lr")
parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
parser.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: off)")
parser.add_argument("--parallel", choices=["fsdp", "ddp"], default="fsdp", help="data parallelism under torchrun")
parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
parser.add_argument("--seed", type=int, default=0, help="global seed (data order, init)")
parser.add_argument("--log-every", type=int, default=10, help="print a step line every N steps")
parser.add_argument("--overwrite", action="store_true", help="retrain even if --out already holds a checkpoint")
args = parser.parse_args()

# ----------------------------------------------------------------------------------------------
# Distributed init

dist_info = init_distributed(args.device)
device = dist_info.device
compute_dtype = default_dtype(device)
seed_everything(args.seed)
if (Path(args.out) / "model.safetensors").exists() and not args.overwrite:
    print0(f"{args.out} already holds a checkpoint; skipping (pass --overwrite to retrain)")
    destroy_distributed()
    raise SystemExit(0)

# ----------------------------------------------------------------------------------------------
# Data: tokenize every conversation, mark assistant tokens, pack into blocks.

tokenizer = load_tokenizer(args.model)
conversations = load_records(args.data, "sft")
end_of_turn = end_of_turn_ids(tokenizer)
documents, truncated = [], 0
for record in tqdm(conversations, desc="tokenizing", disable=not dist_info.is_main):
    ids, is_assistant = encode_conversation(tokenizer, record["messages"], end_of_turn)
    if len(ids) > args.block_size:
        truncated += 1
        ids, is_assistant = ids[:args.block_size], is_assistant[:args.block_size]
    # Next-token targets: position t predicts token t+1, trained only where token t+1 is assistant text.
    targets = [ids[t + 1] if is_assistant[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]
    documents.append((ids, targets))
if truncated:
    print0(f"warning: {truncated} of {len(documents)} conversations were longer than --block-size "
           f"{args.block_size} and were truncated to it")

order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(args.seed)).tolist()
blocks, current = [], []  # each block: a list of documents that fit in block_size tokens
for i in order:
    if current and sum(len(documents[j][0]) for j in current) + len(documents[i][0]) > args.block_size:
        blocks.append(current)
        current = []
    current.append(i)
if current:
    blocks.append(current)


def make_batch(block_indices):
    """Packed tensors (B, block_size): input ids, targets, positions restarting per document, and
    document ids (padding gets id -1 and target -100, so it never affects the loss)."""
    B, T = len(block_indices), args.block_size
    input_ids = torch.full((B, T), tokenizer.pad_token_id, dtype=torch.long)
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
    return [t.to(device) for t in (input_ids, targets, position_ids, document_ids)]


steps_per_epoch = math.ceil(len(blocks) / args.batch_size)
total_steps = math.ceil(args.epochs * steps_per_epoch)
if args.max_steps > 0:
    total_steps = min(total_steps, args.max_steps)
# Each rank runs the same number of micro-batches every step (FSDP's collectives need it); a rank
# short of blocks in the last step runs empty blocks (index -1) that contribute no loss.
micro_steps = math.ceil(args.batch_size / (dist_info.world_size * args.micro_batch_size))
print0(f"{len(documents)} conversations → {len(blocks)} blocks of {args.block_size} tokens; "
       f"{total_steps} steps of {args.batch_size} blocks ({micro_steps} micro-batches of {args.micro_batch_size} per rank)")

# ----------------------------------------------------------------------------------------------
# Model

if args.scratch:
    model = Transformer.from_config(args.model)
else:
    model = Transformer.from_pretrained(args.model)
model.float()  # fp32 master weights; FSDP computes in bf16 on GPU
print0(f"model: {model.num_parameters() / 1e6:.2f}M parameters, compute dtype {compute_dtype}")
# Training FLOPs per token: 6 × (parameters used in matmuls) + attention scores (12·L·H·T, halved by causality).
config = model.config
flops_per_token = 6 * (model.num_parameters(exclude_embeddings=True) + config.vocab_size * config.hidden_size * config.tie_word_embeddings) \
    + 6 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * args.block_size
peak_flops = 989e12 if device.type == "cuda" else None  # H100 SXM dense bf16
model = wrap_model(model, args.parallel, device, param_dtype=compute_dtype)
# Without FSDP on GPU, autocast gives the same bf16 compute with fp32 weights.
autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32 and not hasattr(model, "set_requires_gradient_sync"))

# ----------------------------------------------------------------------------------------------
# Optimizer and schedule

optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                              fused=device.type == "cuda")

# ----------------------------------------------------------------------------------------------
# Training loop

metrics = MetricsLogger(Path(args.out) / "metrics.jsonl", enabled=dist_info.is_main)
model.train()
# The block order for the whole run: a fresh shuffle each epoch, cut into global batches; an
# epoch's last batch may be smaller (nothing dropped, nothing seen twice within an epoch).
shuffle_rng = torch.Generator().manual_seed(args.seed + 1)
schedule = []
for epoch in range(math.ceil(args.epochs)):
    permutation = torch.randperm(len(blocks), generator=shuffle_rng).tolist()
    schedule += [permutation[i:i + args.batch_size] for i in range(0, len(blocks), args.batch_size)]
progress = tqdm(range(total_steps), desc="sft", disable=not dist_info.is_main)
for step in progress:
    t0 = time.time()
    step_blocks = schedule[step]
    per_rank = micro_steps * args.micro_batch_size
    step_blocks = step_blocks + [-1] * (per_rank * dist_info.world_size - len(step_blocks))
    my_blocks = step_blocks[dist_info.rank * per_rank:(dist_info.rank + 1) * per_rank]
    micro_batches = [make_batch(my_blocks[i:i + args.micro_batch_size]) for i in range(0, per_rank, args.micro_batch_size)]

    # Loss = −(sum of assistant-token log-probs) / (number of assistant tokens in the whole global
    # batch). Each rank divides by the global count and multiplies by world size because the
    # gradient all-reduce averages over ranks; every token then weighs the same however the tokens
    # fall across ranks and micro-batches.
    valid_tokens = all_reduce_sum(sum((mb[1] != -100).sum().item() for mb in micro_batches), device)
    lr = cosine_lr(step, total_steps, args.lr, args.warmup_ratio, args.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = 0.0
    for i, (input_ids, targets, position_ids, document_ids) in enumerate(micro_batches):
        with gradient_sync(model, sync=i == len(micro_batches) - 1), autocast:
            logps = model(input_ids, position_ids=position_ids, document_ids=document_ids, targets=targets)  # (B, T)
            loss = -logps.sum() / max(valid_tokens, 1) * dist_info.world_size
            loss.backward()
        loss_sum += loss.item() / dist_info.world_size
    grad_norm = clip_grad_norm(model, args.grad_clip if args.grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    loss_value = all_reduce_sum(loss_sum, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t0
    tokens = per_rank * dist_info.world_size * args.block_size  # packed tokens processed, padding included
    tokens_per_s = tokens / dt
    line = dict(step=step + 1, loss=loss_value, lr=lr, grad_norm=grad_norm, ms=dt * 1000, tokens_per_s=tokens_per_s,
                assistant_tokens=valid_tokens)
    if peak_flops:
        line["mfu"] = flops_per_token * tokens_per_s / (peak_flops * dist_info.world_size)
    metrics.log(**line)
    if dist_info.is_main and (step % args.log_every == 0 or step == total_steps - 1):
        mfu = f" | MFU {line['mfu'] * 100:.1f}%" if peak_flops else ""
        tqdm.write(f"step {step + 1}/{total_steps} | loss {loss_value:.4f} | lr {lr:.2e} | grad {grad_norm:.3f} | "
                   f"{dt * 1000:.0f} ms | {tokens_per_s:,.0f} tok/s{mfu}")

# ----------------------------------------------------------------------------------------------
# Save: a full HF-format checkpoint gathered on rank 0 (weights, config, tokenizer).

metrics.close()
save_checkpoint(model, args.out, tokenizer, source_dir=args.model)
print0(f"saved {args.out}")
destroy_distributed()
