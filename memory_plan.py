"""A memory plan before launch: the per-rank bytes of a training or sampling run, from the config
alone.

    python memory_plan.py --config path/to/config.json --world-size 8 --mode sft --seq-len 8192 \\
        --micro-batch-size 1
    python memory_plan.py --config path/to/config.json --world-size 8 --mode dpo --seq-len 2048 \\
        --micro-batch-size 1

    from memory_plan import memory_plan, format_memory_plan
    print(format_memory_plan(memory_plan(config, world_size=8, micro_batch_size=1, seq_len=8192,
                                         mode="sft")))

Notation: P parameters, L layers, H hidden, I intermediate, V vocab, nh / nkv heads, D head_dim,
W ranks, N tokens in one micro-batch (sequences × seq_len; dpo and rm run chosen + rejected in one
forward, so 2 × micro_batch_size sequences), b compute-dtype bytes (2: bf16 on GPU; 4: fp32 on
CPU), m master bytes. The plan is a step after the first (the AdamW state exists). It errs high in
one place: gradients are counted in full beside the peak activations, although they fill in as the
activations are freed. memory_trace.py checks it against the stages' real steps.
"""
import argparse
import os
from functools import partial

import torch

# the vocabulary chunk width the log-prob kernel picks, so the plan follows the kernel
from rlhf_kernels.logprob import _auto_vocab_chunk_size
from model import ModelConfig

GiB = 2**30


def parameter_counts(config, head="lm"):
    """(parameters of one decoder block, parameters outside: embedding, final norm, head)."""
    H, I, nh, nkv, D = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                        config.num_key_value_heads, config.head_dim)
    attention = (H * (nh + 2 * nkv) * D + nh * D * H + config.qkv_bias * (nh + 2 * nkv) * D
                 + config.o_bias * H)
    # Qwen3's q_norm, k_norm: one (D,) weight each, shared by the heads
    attention += config.qk_norm * 2 * D
    mlp = 3 * H * I + config.mlp_bias * (2 * I + H)
    head_params = H if head == "score" else config.vocab_size * H * (not config.tie_word_embeddings)
    # block: + its two RMSNorm weights
    return attention + mlp + 2 * H, config.vocab_size * H + H + head_params


def lora_parameters(config, lora, mode):
    """Trained parameters with LoRA: r × (in + out) per adapted Linear of every block (and a
    reward model's scalar head)."""
    H, I, D = config.hidden_size, config.intermediate_size, config.head_dim
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    sizes = {"q_proj": (H, nh * D), "k_proj": (H, nkv * D), "v_proj": (H, nkv * D),
             "o_proj": (nh * D, H), "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
    return (config.num_hidden_layers * sum(lora.rank * sum(sizes[t]) for t in lora.targets)
            + (H if mode == "rm" else 0))


def kv_cache_bytes(config, slots, positions, b):
    """A KV cache of `slots` rows × `positions`: k and v, every layer, in b-byte elements."""
    return slots * positions * config.kv_bytes_per_position(b)


def sampling_bytes(config, slots, b):
    """A decode step's (slots, V) logits and ~3 fp32 sampler temporaries (softmax, top-p mask)."""
    return slots * config.vocab_size * (b + 3 * 4)


def inference_transient_bytes(config, tokens, b):
    """One block's no-grad forward transients over N = `tokens`: gate, up, silu (N, I); 2 (N, H)."""
    return tokens * b * (3 * config.intermediate_size + 2 * config.hidden_size)


def sampling_rows(config, P, b, micro_batch_size, seq_len, slots, cache_len):
    """mode "sample": a full bf16 replica per rank (each rank samples its own prompts), its decode
    cache, a prefill of micro_batch_size prompts of seq_len tokens, a decode step's logits."""
    N = micro_batch_size * seq_len
    rows = {"weights": P * b, "KV cache": kv_cache_bytes(config, slots, cache_len, b)}
    # prefill of micro_batch_size prompts of seq_len tokens: their own cache, copied into the slots
    # after + the prefill's final hidden states (N, H) and its prompts' last-position logits
    # (prompts, V)
    rows["prefill"] = (kv_cache_bytes(config, micro_batch_size, seq_len, b)
                       + inference_transient_bytes(config, N, b) + N * config.hidden_size * b
                       + micro_batch_size * config.vocab_size * b)
    rows["logits + sampling"] = sampling_bytes(config, slots, b)
    return rows


def weight_rows(config, P, b, m, shard, mode, lora):
    """Weights, gradients and AdamW: fp32 master copies, sharded 1/W under FSDP (shard = W),
    whole under DDP. With LoRA only the adapters are trained; the rest is frozen in b.
    Returns (rows, trained parameters)."""
    rows = {}
    if lora is not None:
        P_trained = lora_parameters(config, lora, mode)
        rows["frozen base"] = P * b // shard
        rows["weights (master)"] = P_trained * m // shard
    else:
        P_trained = P
        rows["weights (master)"] = P * m // shard
    return rows, P_trained


def compute_copy(config, block, outside, P, b, m, parallel, mode, lora):
    """(the "compute copy (gathered)" row, the gathered weights alone).
    FSDP2 all-gathers a block's bf16 weights for its forward and backward while prefetching the
    next (2 blocks at a time); the root (embedding, final norm, LM head) stays gathered from its
    forward to the end of backward. Gradients in flight: the root's unsharded LM-head gradient
    (computed first, reduce-scattered last) and one block's bf16 gradients + fp32 reduce-scatter
    copy. With LoRA neither gradient exists (the head and the blocks' weights are frozen).
    Without FSDP, autocast caches a bf16 cast of every fp32 weight from forward to backward
    (LoRA's base is bf16 already)."""
    if parallel == "fsdp":
        gathered = (outside + 2 * block) * b
        V, H = config.vocab_size, config.hidden_size
        gradients_in_flight = (V * H * b if mode != "rm" else 0) + block * (b + 4)
        return gathered + (gradients_in_flight if lora is None else 0), gathered
    gathered = P * b if b != m and lora is None else 0
    return gathered, gathered


def activation_bytes_per_token(config, b, packed):
    """(bytes saved for backward per token of one decoder block, per token outside the blocks).
    Per token of one decoder block:
      2 RMSNorms: fp32 input (the input itself when b = 4), normalised, scaled  2 (4 H + 2 b H)
      attention:  q, k after rope, v (flash / SDPA's inputs), output            b (2 nh D + 2 nkv D)
                  logsumexp (fp32)                                              4 nh
                  packed: per-document outputs, then a copy for o_proj          b nh D
      SwiGLU MLP: gate, up, silu(gate), silu(gate)·up, each (N, I)              4 b I
    (the Linears save these same tensors; residual adds and rope's cos/sin products save
    nothing). Outside: the final RMSNorm; rope's cos, sin (shared)."""
    H, I, D = config.hidden_size, config.intermediate_size, config.head_dim
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    per_token_block = 2 * (4 * H + 2 * b * H) + b * (2 * nh * D + 2 * nkv * D) + 4 * nh \
        + packed * b * nh * D + 4 * b * I \
        + config.qk_norm * (nh + nkv) * D * (4 + 2 * b)   # Qwen3's per-head q/k RMSNorms
    per_token_outside = (4 * H + 2 * b * H) + 2 * D * b
    return per_token_block, per_token_outside


def working_set(config, N, b, per_token_block, activation_checkpointing, mode, device):
    """(a block's backward, the LM head's forward + backward, the kernel's vocabulary chunk): two
    phases that never overlap, on top of the kept activations.
    A block's backward: its recomputed tensors (with checkpointing) + the activation gradients in
    flight, ~ one (N, I) and one fp32 (N, H) (saved tensors are freed as their backward runs).
    The LM head (rlhf_kernels/logprob.py) never builds (N, V) logits: per vocabulary chunk of Vc
    columns, two (N, Vc) fp32 buffers (logits + logsumexp / softmax-gradient temporary) and the
    gradient's cast to b; plus the fp32 (N, H) grad_hidden accumulator. All N tokens counted (an
    upper bound: prompt and padding tokens are dropped before the matmuls). A reward model's
    (H -> 1) head: ~0."""
    H, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
    block_backward = N * (activation_checkpointing * per_token_block + b * I + 4 * H)
    chunk = _auto_vocab_chunk_size(N, V, torch.device(device))
    lm_head = 0 if mode == "rm" else N * chunk * (2 * 4 + (b if b != 4 else 0)) + N * H * 4
    return block_backward, lm_head, chunk


def memory_plan(config, world_size, micro_batch_size, seq_len, mode, *, parallel="fsdp",
                activation_checkpointing=True, param_dtype_bytes=2, master_dtype_bytes=4,
                packed=None, resident_reference=False, kv_cache_slots=None, kv_cache_len=None,
                device="cuda", lora=None):
    """Per-rank bytes: {"rows": {name: bytes}, "total", "peak", ...}. mode: "sft" | "dpo" | "rm" |
    "sample".
    param_dtype_bytes: the compute dtype (bf16 = 2 on GPU); 4 with master_dtype_bytes=4 is fp32 on
    a CPU.
    packed: documents packed into each sequence (sft.py packs; default: mode == "sft").
    resident_reference: a frozen bf16 reference kept beside the policy, as osp.py does. dpo.py does
    not: it computes the reference log-probs in a pass of its own before the policy loads,
    reported apart.
    kv_cache_slots / kv_cache_len: a sampling KV cache beside training (osp.py). mode "sample": the
    decode cache (default micro_batch_size slots × seq_len positions), and micro_batch_size prompts
    of seq_len tokens prefilled at once.
    lora (model.LoRASettings): only the adapters are trained (fp32 master, gradients, AdamW state);
    the base is frozen in the compute dtype, and a resident reference is the same model, adapters
    off."""
    assert mode in ("sft", "dpo", "rm", "sample") and parallel in ("fsdp", "ddp", "none")
    L, H = config.num_hidden_layers, config.hidden_size
    b, m = param_dtype_bytes, master_dtype_bytes
    block, outside = parameter_counts(config, head="score" if mode == "rm" else "lm")
    P = L * block + outside
    N = micro_batch_size * (2 if mode in ("dpo", "rm") else 1) * seq_len
    packed = mode == "sft" if packed is None else packed
    if kv_cache_slots is not None:
        slots = kv_cache_slots
    else:
        slots = micro_batch_size if mode == "sample" else 0
    cache_len = kv_cache_len if kv_cache_len is not None else seq_len
    if mode == "sample":
        rows = sampling_rows(config, P, b, micro_batch_size, seq_len, slots, cache_len)
        return finish(rows, mode, world_size)

    shard = world_size if parallel == "fsdp" else 1
    rows, P_trained = weight_rows(config, P, b, m, shard, mode, lora)
    rows["compute copy (gathered)"], gathered = compute_copy(config, block, outside, P, b, m,
                                                             parallel, mode, lora)
    # DDP: + its gradient buckets
    rows["gradients"] = P_trained * m // shard * (2 if parallel == "ddp" else 1)
    rows["AdamW state"] = 2 * P_trained * m // shard  # exp_avg, exp_avg_sq

    # Activations kept until the backward: each block's input (N, H) with checkpointing, else all
    # its tensors.
    per_token_block, per_token_outside = activation_bytes_per_token(config, b, packed)
    rows["activations (kept)"] = N * (L * (b * H if activation_checkpointing else per_token_block)
                                      + per_token_outside)
    # The working set on top of that: the larger of two phases that never overlap.
    block_backward, lm_head, chunk = working_set(config, N, b, per_token_block,
                                                 activation_checkpointing, mode, device)
    rows["working set"] = max(block_backward, lm_head)

    # The reference model and a sampling KV cache, when they live beside the policy.
    reference_pass = None
    no_grad_forward = inference_transient_bytes(config, N, b)
    if resident_reference:  # with LoRA: the policy itself with its adapters off, only transients
        rows["reference model"] = (P * b if lora is None else 0) + no_grad_forward
    elif mode == "dpo":  # its own pass before training: the same wrapped weights, no-grad forward
        rows["reference model"] = 0
        reference_pass = rows["weights (master)"] + gathered + no_grad_forward + N * chunk * 2 * 4
    if slots:
        rows["KV cache"] = kv_cache_bytes(config, slots, cache_len, b)
    return finish(rows, mode, world_size, reference_pass, lm_head=lm_head,
                  block_backward=block_backward)


def osp_memory_plan(config, world_size, micro_batch_size, seq_len, prompts_per_rank, k, *,
                    parallel="fsdp", lora=None, separate_judge=False, activation_checkpointing=True,
                    param_dtype_bytes=2, master_dtype_bytes=4, device="cuda", judge_batch=64,
                    prompt_len=None):
    """osp.py's step, phase by phase (its phases never overlap): what stays resident (the policy's
    master weights and AdamW state, π_SFT's frozen copies, the sampling KV cache) plus the largest
    of
      rollout: the sampler gathered whole (FSDP: a bf16 copy of the policy), a prefill of prompts
               of prompt_len tokens (default seq_len / 2) as generate.Engine batches them, a
               decode step's logits;
      judge:   the judge gathered whole (FSDP), one no-grad batch of pairwise queries (prompt + 2
               responses);
      update:  dpo's training step on micro_batch_size pairs (memory_plan "dpo") and the
               reference's no-grad forward.
    π_SFT (reference = judge unless separate_judge) is frozen in the compute dtype, sharded under
    FSDP; with LoRA it is the policy itself, adapters off: no copy at all."""
    from generate import PREFILL_TOKENS

    b, L = param_dtype_bytes, config.num_hidden_layers
    block, outside = parameter_counts(config)
    P = L * block + outside
    shard = world_size if parallel == "fsdp" else 1
    update = memory_plan(config, world_size, micro_batch_size, seq_len, "dpo", parallel=parallel,
                         lora=lora, activation_checkpointing=activation_checkpointing,
                         param_dtype_bytes=b, master_dtype_bytes=master_dtype_bytes, device=device)
    resident_names = ("weights (master)", "frozen base", "AdamW state")
    rows = {name: update["rows"][name] for name in resident_names if name in update["rows"]}
    frozen_copies = 0 if lora is not None else (1 + separate_judge) * P * b // shard
    rows["π_SFT (reference, judge)"] = frozen_copies
    slots, half = prompts_per_rank * k, prompt_len or seq_len // 2
    rows["KV cache"] = kv_cache_bytes(config, slots, seq_len, b)

    def no_grad_forward(tokens):
        return inference_transient_bytes(config, tokens, b)

    whole = P * b if parallel == "fsdp" else 0  # gathered whole for the phase (parallel.gathered)
    prefill_count = min(prompts_per_rank, max(1, PREFILL_TOKENS // half))
    phases = {
        "rollout": whole + kv_cache_bytes(config, prefill_count, half, b)
                   + no_grad_forward(prefill_count * half) + sampling_bytes(config, slots, b),
        "judge": whole + no_grad_forward(min(judge_batch, slots) * (half + 2 * (seq_len - half))),
        "update": sum(size for name, size in update["rows"].items()
                      if name not in resident_names and name != "reference model")
                  + no_grad_forward(2 * micro_batch_size * seq_len),
    }
    largest = max(phases, key=phases.get)
    rows[f"largest phase: {largest}"] = phases[largest]
    plan = finish(rows, "osp", world_size)
    plan["phases"] = phases
    return plan


def finish(rows, mode, world_size, reference_pass=None, **parts):
    total = sum(rows.values())
    return dict(rows=rows, total=total, peak=max(total, reference_pass or 0), mode=mode,
                world_size=world_size, reference_pass=reference_pass, **parts)


def format_memory_plan(plan, gpu_gib=80.0, memory_name="GPU"):
    """A small table: GiB per row, the total, and whether the peak fits a GPU of gpu_gib GiB."""
    lines = [f"memory plan per rank: {plan['mode']}, {plan['world_size']} rank(s)"]
    for name, size in plan["rows"].items():
        note = ""
        if name == "working set":  # say which phase it is
            note = (f"  (max of LM head {plan['lm_head'] / GiB:.2f}, block backward "
                    f"{plan['block_backward'] / GiB:.2f})")
        if name.startswith("largest phase"):
            note = "  (" + ", ".join(f"{phase} {size / GiB:.2f}"
                                     for phase, size in plan["phases"].items()) + ")"
        lines.append(f"  {name:<26}{size / GiB:8.2f} GiB{note}")
    lines.append(f"  {'total':<26}{plan['total'] / GiB:8.2f} GiB")
    if plan["reference_pass"] is not None:
        lines.append(f"  {'reference pass (before)':<26}{plan['reference_pass'] / GiB:8.2f} GiB  "
                     "(dpo.py frees it before training)")
    fits = plan["peak"] <= gpu_gib * GiB
    lines.append(f"  {'fits' if fits else 'does NOT fit'} {gpu_gib:g} GiB of {memory_name}: peak "
                 f"{plan['peak'] / GiB:.2f} GiB = {100 * plan['peak'] / (gpu_gib * GiB):.0f}%")
    return "\n".join(lines)


def print_stage_plan(model_path, mode, dist_info, micro_batch_size, seq_len, parallel,
                     activation_checkpointing, **extra):
    """What every training stage prints first, before it loads anything (and all that --dry-run
    does): the plan for its model's config.json and its own settings, on its device."""
    from runs import print0

    config = ModelConfig.from_path(model_path)
    on_gpu = dist_info.device.type == "cuda"
    parallel = parallel if dist_info.world_size > 1 else "none"
    plan = (osp_memory_plan if mode == "osp" else partial(memory_plan, mode=mode))(
        config, dist_info.world_size, micro_batch_size, seq_len, parallel=parallel,
        activation_checkpointing=activation_checkpointing, param_dtype_bytes=2 if on_gpu else 4,
        device=dist_info.device.type, **extra)
    if on_gpu:
        total = torch.cuda.get_device_properties(dist_info.device).total_memory
        print0(format_memory_plan(plan, total / GiB))
    else:
        host_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
        print0(format_memory_plan(plan, round(host_gib, 1), "host memory (CPU run)"))
    return plan


def main():
    parser = argparse.ArgumentParser(
        description="Per-rank memory plan of a training or sampling run.")
    parser.add_argument("--config", required=True,
                        help="an HF config.json, or a checkpoint folder holding one")
    parser.add_argument("--world-size", type=int, default=1, help="number of ranks (GPUs)")
    parser.add_argument("--mode", choices=["sft", "dpo", "rm", "sample"], default="sft",
                        help="the stage to plan")
    parser.add_argument("--seq-len", type=int, required=True,
                        help="tokens per sequence (dpo/rm: chosen or rejected; sample: prompt)")
    parser.add_argument("--micro-batch-size", type=int, default=1,
                        help="sequences (dpo/rm: pairs; sample: prompts prefilled at once)")
    parser.add_argument("--parallel", choices=["fsdp", "ddp", "none"], default="fsdp",
                        help="data parallelism")
    parser.add_argument("--no-activation-checkpointing", action="store_true",
                        help="keep every block's activations")
    parser.add_argument("--kv-cache-slots", type=int, default=None,
                        help="decode slots (sample: default micro-batch size)")
    parser.add_argument("--kv-cache-len", type=int, default=None,
                        help="cache positions per slot (default: seq len)")
    parser.add_argument("--gpu-gib", type=float, default=80.0,
                        help="GPU memory (GiB) to check the plan against")
    args = parser.parse_args()
    config = ModelConfig.from_path(args.config)
    plan = memory_plan(config, args.world_size, args.micro_batch_size, args.seq_len, args.mode,
                       parallel=args.parallel,
                       activation_checkpointing=not args.no_activation_checkpointing,
                       kv_cache_slots=args.kv_cache_slots, kv_cache_len=args.kv_cache_len)
    print(format_memory_plan(plan, args.gpu_gib))


if __name__ == "__main__":
    main()
