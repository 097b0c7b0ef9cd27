"""Batched sampling with a static KV cache and continuous batching: the engine every online stage
samples with, and a command line.

    python generate.py --model runs/builtin/sft --prompts data/builtin/prompts_iter1.jsonl \\
        --out runs/builtin/samples.jsonl --n 8 --temperature 1.0 --max-new-tokens 64 --seed 0
    torchrun --nproc_per_node 8 generate.py --model /ckpt/llama3-8b-sft --prompts prompts.jsonl \\
        --out samples.jsonl --num-samples 8 --temperature 1.0 --top-p 1.0 --top-k 0 --max-new-tokens 2048
    python generate.py --bench        # GPU: tokens/s against transformers' generate

How it works:
  - a preallocated KV cache of `--batch-size` slots × (longest prompt + max new tokens) positions;
    one slot holds one sample; the cache is indexed by position (model.KVCache), so every slot
    decodes at its own position and nothing is padded;
  - a prompt is admitted when n slots are free: prompts are prefilled together, once each
    (`prefill`), and each prompt's keys/values are copied into its n slots (the n samples share
    the prefill);
  - every decode step (`decode_step`) runs all slots at one fixed shape (B, 1); a slot whose sample
    ends (a stop token, or --max-new-tokens) is emptied and refilled from the waiting prompts
    (continuous batching), so the batch stays full until the queue runs dry;
  - `prefill` and `decode_step` are module-level functions of the model, as in gpt-fast: --compile
    swaps in a torch.compile'd decode_step (fixed shapes: compiled once, replayed as CUDA graphs);
  - sampling goes through kernels/sampling.py with one random stream per sample, seeded from
    (seed, prompt id, sample index) and the step: a sample does not depend on the batch size, the
    slot it lands in, or the number of ranks.
A prompt that leaves no room for --max-new-tokens in the model's context (max_position_embeddings)
stops the run with an error naming it, before anything is sampled.
Output: one JSONL record per prompt (data/README.md, "samples"): id, prompt, responses, num_tokens
(generated tokens, the stop token included), finish_reasons ("stop" | "length"), and with
--logprobs, logprobs (each response's summed log-prob) and token_logprobs (per token), both under
the temperature-scaled, untruncated distribution — what a teacher-forced forward with
`temperature` gives, which is what lets DPO/OSP trust them.
"""
import argparse
import hashlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (InputError, default_dtype, destroy_distributed, encode_prompt, init_distributed, load_tokenizer, print0,
                    process_in_chunks, run_cli, stop_token_ids)
from data.schema import load_records
from kernels.sampling import sample
from model import KVCache, Transformer

SEED_STRIDE = 0x1E3779B97F4A7C15  # odd 61-bit constant: seed of step s = base seed + s · stride (int64)


def sample_seed(seed, prompt_id, sample_index):
    """The base seed of one sample, from (global seed, prompt id, sample index) only."""
    digest = hashlib.sha256(f"{seed}/{prompt_id}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2  # 62 bits: positive in int64


# ----------------------------------------------------------------------------------------------
# The two model calls of generation. Module-level functions of the model (as in gpt-fast) rather
# than Engine methods, so that compiling one is a plain `decode_step = torch.compile(decode_step)`
# and every Engine picks the compiled one up (it looks the name up at call time).


def prefill(model, cache, input_ids, lengths):
    """Right-padded prompts (count, width) through the model, their keys/values written into `cache`
    (count rows × width positions). Returns the logits at each prompt's last real token (count, V)."""
    count, width = input_ids.shape
    positions = torch.arange(width, device=input_ids.device).expand(count, width)
    hidden = model.hidden_states(input_ids, position_ids=positions, cache=cache)       # (count, width, H)
    last = hidden[torch.arange(count, device=input_ids.device), lengths - 1]            # (count, H)
    return F.linear(last, model.lm_head_weight)                                          # (count, V)


def decode_step(model, cache, tokens, positions, seeds, temperature, top_k, top_p, min_p):
    """One token for every slot: (B,) tokens at (B,) positions -> kernels.sampling.Sampled of (B,)
    tokens and log-probs. Fixed shapes whatever the slots hold, so it compiles once."""
    logits = model(tokens[:, None], position_ids=positions[:, None], cache=cache)[:, 0]  # (B, V)
    return sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seeds=seeds)


eager_decode_step = decode_step


def compile_decode_step():
    """--compile: from now on every Engine decodes with a torch.compile'd decode_step, CUDA graphs
    included ("reduce-overhead"). A second call changes nothing."""
    global decode_step
    if decode_step is eager_decode_step:
        decode_step = torch.compile(eager_decode_step, mode="reduce-overhead")


# ----------------------------------------------------------------------------------------------
# The engine


class Engine:
    def __init__(self, model, max_batch, max_len, stop_ids, dtype=None):
        """model: a Transformer (eval mode, on its device). max_batch: decode slots. max_len: cache
        positions per slot (longest prompt + max new tokens; never more than the model's context,
        which no sample may pass). stop_ids: tokens that end a sample. dtype: the KV cache's dtype
        (default: the weights'; bf16 for fp32 weights under autocast)."""
        self.model, self.max_batch = model, max_batch
        self.context_length = model.config.max_position_embeddings
        self.max_len = min(max_len, self.context_length)
        self.device = model.lm_head_weight.device
        self.cache = KVCache(model.config, max_batch, self.max_len, self.device, dtype or model.lm_head_weight.dtype)
        self.stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=self.device)

    @torch.no_grad()
    def generate(self, prompts, n, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, base_seeds=None,
                 progress=None):
        """prompts: list of token-id lists. base_seeds: per prompt, a list of n ints (sample_seed),
        or None to use torch's global generator. Returns, per prompt, n dicts with `tokens` (list,
        the stop token included), `token_logprobs` (list) and `finish_reason`. Prompts must fit the
        cache with max_new_tokens (users get that checked with names by encode_prompts)."""
        B, device = self.max_batch, self.device
        if n > B:
            raise ValueError(f"n = {n} samples per prompt need at least n decode slots (--batch-size {B})")
        if not prompts:
            return []
        longest = max(map(len, prompts))
        if longest + max_new_tokens > self.max_len:
            raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the cache ({self.max_len})")
        results = [[None] * n for _ in prompts]
        # Per-slot state, all on the device so a decode step needs no host round trip.
        tokens = torch.zeros(B, dtype=torch.long, device=device)      # the token each slot feeds next
        positions = torch.zeros(B, dtype=torch.long, device=device)   # ... and its position
        steps = torch.zeros(B, dtype=torch.long, device=device)       # tokens generated so far
        active = torch.zeros(B, dtype=torch.bool, device=device)
        seeds = torch.zeros(B, dtype=torch.long, device=device)
        out_tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        out_logprobs = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
        owner = [None] * B  # host-side: (prompt index, sample index) held by each slot
        queue = list(range(len(prompts)))
        rows = torch.arange(B, device=device)

        def step_seeds():
            return seeds + steps * SEED_STRIDE if base_seeds is not None else None

        def record(sampled, slot_mask):
            """Store the sampled token of every slot in slot_mask and advance those slots."""
            index = steps.clamp(max=max_new_tokens - 1)
            out_tokens[rows, index] = torch.where(slot_mask, sampled.tokens, out_tokens[rows, index])
            out_logprobs[rows, index] = torch.where(slot_mask, sampled.logprobs_untruncated, out_logprobs[rows, index])
            tokens.copy_(torch.where(slot_mask, sampled.tokens, tokens))
            steps.add_(slot_mask.long())

        def harvest():
            """Empty the slots whose sample just ended and hand their results back (one host sync)."""
            finished = active & (torch.isin(tokens, self.stop_ids) | (steps >= max_new_tokens))
            for slot in finished.nonzero()[:, 0].tolist():
                length = int(steps[slot])
                ids = out_tokens[slot, :length].tolist()
                prompt_index, sample_index = owner[slot]
                results[prompt_index][sample_index] = {
                    "tokens": ids, "token_logprobs": out_logprobs[slot, :length].tolist(),
                    "finish_reason": "stop" if ids[-1] in self.stop_ids.tolist() else "length"}
                owner[slot] = None
                if progress is not None:
                    progress.update(1)
            active.logical_and_(~finished)

        def admit():
            """Prefill as many waiting prompts as there are free groups of n slots."""
            free = [s for s in range(B) if owner[s] is None]
            count = min(len(free) // n, len(queue))
            if count == 0:
                return
            batch = [queue.pop(0) for _ in range(count)]
            lengths = torch.tensor([len(prompts[p]) for p in batch], device=device)
            width = int(lengths.max())
            input_ids = torch.zeros(count, width, dtype=torch.long)
            for row, p in enumerate(batch):
                input_ids[row, :len(prompts[p])] = torch.tensor(prompts[p])
            prefill_cache = KVCache(self.model.config, count, width, device, self.cache.k[0].dtype)
            last_logits = prefill(self.model, prefill_cache, input_ids.to(device), lengths)  # (count, V)
            slots = torch.tensor(free[:count * n], device=device)
            source_rows = torch.arange(count, device=device).repeat_interleave(n)
            for layer in range(len(self.cache.k)):  # each prompt's keys/values into its n slots
                self.cache.k[layer][slots, :, :width] = prefill_cache.k[layer][source_rows]
                self.cache.v[layer][slots, :, :width] = prefill_cache.v[layer][source_rows]
            for i, slot in enumerate(free[:count * n]):
                owner[slot] = (batch[i // n], i % n)
                if base_seeds is not None:
                    seeds[slot] = base_seeds[batch[i // n]][i % n]
            slot_mask = torch.zeros(B, dtype=torch.bool, device=device)
            slot_mask[slots] = True
            steps.masked_fill_(slot_mask, 0)
            positions[slots] = lengths[source_rows]
            active.logical_or_(slot_mask)
            # The first token of each sample, from its prompt's last-position logits.
            logits = torch.zeros(B, last_logits.shape[-1], device=device, dtype=last_logits.dtype)
            logits[slots] = last_logits[source_rows]
            record(sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seeds=step_seeds()), slot_mask)

        admit()
        harvest()
        while queue or bool(active.any()):
            sampled = decode_step(self.model, self.cache, tokens, positions, step_seeds(), temperature, top_k, top_p, min_p)
            # Empty slots decode garbage at position 0 (fixed shapes); it is never recorded.
            record(sampled, active)
            positions.copy_(torch.where(active, positions + 1, 0))
            harvest()
            admit()
            harvest()
        return results


# ----------------------------------------------------------------------------------------------
# Prompts records -> samples records


def encode_prompts(tokenizer, records, max_new_tokens, context_length, source=None):
    """The token ids generation is fed for each prompts record (common.encode_prompt). A prompt
    that leaves no room for max_new_tokens in the model's context is a user error naming it
    (`source`, the prompts file, when known): its samples could only be cut short or run past the
    positions the model was trained on."""
    prompts = []
    for record in records:
        ids = encode_prompt(tokenizer, record["messages"])
        if len(ids) + max_new_tokens > context_length:
            where = f"{source}: " if source else ""
            raise InputError(f"{where}prompt id {record['id']!r} is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} "
                             f"it needs {len(ids) + max_new_tokens} positions, more than the model's context of {context_length} "
                             "(max_position_embeddings): lower --max-new-tokens or drop the prompt")
        prompts.append(ids)
    return prompts


def response_text(tokenizer, tokens, stop_ids):
    """A sample's text: its tokens decoded without the final stop token, if it ended on one. The
    stop token is not part of the response (training re-adds the end-of-turn token when it encodes
    the response, common.encode_response)."""
    return tokenizer.decode(tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens)


def generate_records(engine, tokenizer, records, n, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0,
                     logprobs=False):
    """Samples records (see the module docstring) for a list of prompts records: n responses per
    prompt, sample i of prompt `id` seeded by sample_seed(seed, id, i)."""
    prompts = encode_prompts(tokenizer, records, max_new_tokens, engine.context_length)
    base_seeds = [[sample_seed(seed, r["id"], i) for i in range(n)] for r in records]
    outputs = engine.generate(prompts, n, max_new_tokens, temperature, top_k, top_p, min_p, base_seeds)
    stop_ids = set(engine.stop_ids.tolist())
    samples = []
    for record, outs in zip(records, outputs):
        sample_record = {"id": record["id"], "prompt": record["messages"],
                         "responses": [response_text(tokenizer, o["tokens"], stop_ids) for o in outs],
                         "num_tokens": [len(o["tokens"]) for o in outs],
                         "finish_reasons": [o["finish_reason"] for o in outs]}
        if logprobs:
            sample_record["logprobs"] = [sum(o["token_logprobs"]) for o in outs]
            sample_record["token_logprobs"] = [o["token_logprobs"] for o in outs]
        samples.append(sample_record)
    return samples


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", help="HF checkpoint folder of the policy")
    parser.add_argument("--prompts", help="prompts JSONL (id, messages)")
    parser.add_argument("--out", help="output samples JSONL")
    # --num-samples is the spelling to use under torchrun: its argument parser takes "--n" for an
    # abbreviation of its own --nnodes/--nproc-per-node/... and stops with "ambiguous option".
    parser.add_argument("--n", "--num-samples", dest="n", type=int, default=8, help="samples per prompt (paper 1: 8; paper 2: K = 7)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p × the top probability (0 = off)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="a sample that reaches it ends with finish_reason 'length'")
    parser.add_argument("--seed", type=int, default=0, help="global seed; each sample's stream comes from (seed, prompt id, sample index)")
    parser.add_argument("--batch-size", type=int, default=64, help="decode slots (concurrent samples) per rank")
    parser.add_argument("--chunk-size", type=int, default=256, help="prompts per resumable chunk")
    parser.add_argument("--logprobs", action="store_true", help="store per-token and summed log-probs of the samples")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--bench", action="store_true", help="GPU benchmark against transformers' generate")
    args = parser.parse_args()
    if args.bench:
        return benchmark()
    if not (args.model and args.prompts and args.out):
        parser.error("--model, --prompts and --out are required")

    dist_info = init_distributed(args.device)
    if Path(args.out).exists():
        print0(f"{args.out} exists; skipping")
        return destroy_distributed()
    records = load_records(args.prompts, "prompts")
    tokenizer = load_tokenizer(args.model)
    model = Transformer.from_pretrained(args.model, device=dist_info.device, dtype=default_dtype(dist_info.device)).eval()
    # Every rank checks every prompt (not only its chunks), so a bad one stops all ranks at once.
    prompt_ids = encode_prompts(tokenizer, records, args.max_new_tokens, model.config.max_position_embeddings, args.prompts)
    if args.compile:
        compile_decode_step()
    engine = Engine(model, args.batch_size, max(map(len, prompt_ids)) + args.max_new_tokens, stop_token_ids(tokenizer))
    sampling = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p, seed=args.seed, logprobs=args.logprobs)
    t0 = time.time()
    # The settings are recorded beside the finished chunks: a resume with other ones stops instead
    # of mixing two sets of samples in one file (the batch size is not one: samples do not depend on it).
    process_in_chunks(records, args.out, lambda chunk: generate_records(engine, tokenizer, chunk, **sampling), dist_info,
                      chunk_size=args.chunk_size, desc="generating", settings=dict(model=str(Path(args.model).resolve()), **sampling))
    print0(f"wrote {args.out}: {len(records)} prompts × {args.n} samples in {time.time() - t0:.1f} s")
    destroy_distributed()


# ----------------------------------------------------------------------------------------------
# Benchmark (GPU): random-init bf16 models, 128-token prompts, 256 new tokens, every row forced to
# full length, sampling at temperature 1.0; tokens/s against transformers' generate in the same run.

BENCH_SHAPES = {
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "TinyLlama-1.1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, rope_theta=10000.0),
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}


def benchmark(prompt_len=128, new_tokens=256, batches=(64, 256)):
    if not torch.cuda.is_available():
        print("generate.py --bench needs a CUDA GPU")
        return
    from transformers import LlamaConfig, LlamaForCausalLM
    device = torch.device("cuda")
    compile_decode_step()
    for name, shape in BENCH_SHAPES.items():
        config = dict(model_type="llama", max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu", **shape)
        torch.manual_seed(0)
        ours = Transformer.from_config(config, device=device, dtype=torch.bfloat16).eval()
        hf = LlamaForCausalLM(LlamaConfig(**config)).to(device, torch.bfloat16).eval()
        hf.load_state_dict(ours.state_dict(), strict=False)
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
        for batch in batches:
            prompts = torch.randint(0, shape["vocab_size"], (batch, prompt_len), device=device)
            engine = Engine(ours, batch, prompt_len + new_tokens, stop_ids=[])
            seeds = [[i] for i in range(batch)]
            engine.generate(prompts[:, :8].tolist(), 1, 8, base_seeds=seeds)  # warm-up / compile
            torch.cuda.synchronize()
            t0 = time.time()
            engine.generate(prompts.tolist(), 1, new_tokens, temperature=1.0, base_seeds=seeds)
            torch.cuda.synchronize()
            ours_tps = batch * new_tokens / (time.time() - t0)
            with torch.no_grad():
                hf.generate(prompts[:, :8], do_sample=True, max_new_tokens=8, min_new_tokens=8, top_k=0, top_p=1.0)
                torch.cuda.synchronize()
                t0 = time.time()
                hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0, top_k=0,
                            top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
                torch.cuda.synchronize()
            hf_tps = batch * new_tokens / (time.time() - t0)
            # Bandwidth roofline: every step reads the weights once plus each row's KV cache (mean length).
            c = ours.config
            kv_bytes = batch * (prompt_len + new_tokens / 2) * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 2
            roofline = batch / ((weight_bytes + kv_bytes) / 3.35e12)
            print(f"{name:15s} batch {batch:4d}: ours {ours_tps:9,.0f} tok/s | HF generate {hf_tps:8,.0f} tok/s | "
                  f"{ours_tps / hf_tps:5.2f}x | {100 * ours_tps / roofline:5.1f}% of the {roofline:,.0f} tok/s bandwidth roofline")
        del ours, hf, engine
        torch.cuda.empty_cache()


if __name__ == "__main__":
    run_cli(main)
