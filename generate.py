"""Batched sampling with a static KV cache and continuous batching: the engine every online stage
samples with, and a command line.

    python generate.py --model runs/builtin/sft --prompts data/builtin/prompts_iter1.jsonl \\
        --out runs/builtin/samples.jsonl --n 8 --temperature 1.0 --max-new-tokens 64 --seed 0
    torchrun --nproc_per_node 8 generate.py --model /ckpt/llama3-8b-sft --prompts prompts.jsonl \\
        --out samples.jsonl --num-samples 8 --temperature 1.0 --top-p 1.0 --top-k 0 --max-new-tokens 2048
    python generate.py --bench        # GPU: tokens/s against transformers' generate

How it works:
  - a static KV cache of `--batch-size` slots × (longest prompt of the chunk + max new tokens)
    positions, allocated for the first chunk and again only for a chunk that needs more positions;
    one slot holds one sample; the cache is indexed by position (model.KVCache), so every slot
    decodes at its own position and nothing is padded. --batch-size 0 (the default): as many slots
    as fit in 80% of the free GPU memory, up to 512 (decode_slots); 64 on a CPU;
  - a prompt is admitted when n slots are free: prompts are prefilled together, once each
    (`prefill`, up to 8192 padded tokens a forward), and each prompt's keys/values are copied into
    its n slots (the n samples share the prefill);
  - every decode step (`decode_step`) runs all slots at one fixed shape (B, 1) and reads only the
    cache positions in use: the engine bounds them on the host (each slot's prompt length plus the
    steps since it was admitted) and rounds up to a multiple of 64; a slot whose sample ends (a stop
    token, or --max-new-tokens) is emptied and refilled from the waiting prompts (continuous
    batching), so the batch stays full until the queue runs dry;
  - `prefill` and `decode_step` are module-level functions of the model, as in gpt-fast: --compile
    swaps in a torch.compile'd decode_step (fixed shapes, one per cache length read: compiled and
    replayed as CUDA graphs);
  - sampling goes through kernels/sampling.py with one random stream per sample, seeded from
    (seed, prompt id, sample index) and the step: a sample does not depend on the batch size, the
    slot it lands in, or the number of ranks.
A prompt that leaves no room for --max-new-tokens in the model's context (max_position_embeddings)
stops the run with an error naming it, before anything is sampled. A prompt longer than
--max-prompt-length (tokens; default: no limit) is skipped and counted, never truncated: its record
is absent from the output.
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

from common import (InputError, default_dtype, destroy_distributed, encode_prompt, fraction, init_distributed, load_tokenizer,
                    non_negative_float, non_negative_int, positive_fraction, positive_int, print0, process_in_chunks, run_cli,
                    stop_token_ids)
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
    (count rows × width positions). Returns the logits at each prompt's last real token (count, V).
    No position_ids: the model's prefill path (positions 0..width-1, plain causal attention, flash
    on GPU); a padded row's keys past its length are never attended and get overwritten."""
    count, width = input_ids.shape
    hidden = model.hidden_states(input_ids, cache=cache)                               # (count, width, H)
    last = hidden[torch.arange(count, device=input_ids.device), lengths - 1]            # (count, H)
    return F.linear(last, model.lm_head_weight)                                          # (count, V)


def decode_step(model, cache, tokens, positions, cache_len, seeds, temperature, top_k, top_p, min_p):
    """One token for every slot: (B,) tokens at (B,) positions -> kernels.sampling.Sampled of (B,)
    tokens and log-probs. Only the first cache_len positions of the cache are read (a host-side
    bound, more than every position in use: see Engine.generate). Fixed shapes whatever the slots
    hold, and cache_len moves in steps of CACHE_LEN_STEP, so a compiled step sees few shapes."""
    logits = model(tokens[:, None], position_ids=positions[:, None], cache=cache, cache_len=cache_len)[:, 0]  # (B, V)
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

CACHE_LEN_STEP = 64          # cache lengths (allocated, and read per decode step) are multiples of this
MAX_AUTO_SLOTS = 512         # decode slots chosen from free GPU memory stop here: past a few hundred a
                             # decode step is compute-bound and more slots add little throughput
CACHE_MEMORY_FRACTION = 0.8  # of the free GPU memory, for the KV cache; the rest is for the prefill's
                             # and the sampler's temporaries and for fragmentation
PREFILL_TOKENS = 8192        # padded prompt tokens per prefill forward: bounds its activations and
                             # temporary cache (Llama-3-8B: ~2 GiB), and already saturates a GPU


def round_up(n, multiple):
    return -(-n // multiple) * multiple


def decode_slots(config, max_len, dtype, free_bytes, cap=MAX_AUTO_SLOTS):
    """How many decode slots of max_len positions fit in CACHE_MEMORY_FRACTION of free_bytes, at
    most cap. A slot holds the key and the value of every layer at every position:
    layers × 2 × n_kv_heads × head_dim × dtype bytes × max_len (Llama-3-8B, bf16, 4096 positions:
    512 MiB). May be 0: the caller says what does not fit."""
    bytes_per_slot = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * dtype.itemsize * max_len
    return min(cap, int(free_bytes * CACHE_MEMORY_FRACTION) // bytes_per_slot)


def free_memory_bytes(device):
    """What a new allocation on a GPU can use: the device's free memory plus what PyTorch's caching
    allocator holds unused (an old cache just dropped, for instance)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class Engine:
    def __init__(self, model, max_batch, stop_ids, dtype=None, cpu_slots=64):
        """model: a Transformer (eval mode, on its device). max_batch: decode slots; 0 or None: as
        many as fit in free GPU memory (decode_slots), `cpu_slots` on a CPU. stop_ids: tokens that
        end a sample. dtype: the KV cache's dtype (default: the weights'; bf16 for fp32 weights under
        autocast). The cache is allocated by generate(), for the call's longest prompt + its
        max_new_tokens, and kept for later calls that fit in it: a file of short prompts never pays
        for the longest prompt of another."""
        self.model, self.requested_slots, self.cpu_slots = model, max_batch, cpu_slots
        self.context_length = model.config.max_position_embeddings
        self.device = model.lm_head_weight.device
        self.dtype = dtype or model.lm_head_weight.dtype
        self.cache = None  # a model.KVCache of (slots, max_len), allocated by reserve()
        self.stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=self.device)

    def reserve(self, length):
        """A cache of at least `length` positions per slot (at most the context, which no sample may
        pass): the current one if long enough, else a new one, its length rounded up to a multiple of
        CACHE_LEN_STEP (so that chunks of similar prompts reuse it) and, without a fixed max_batch,
        its slots chosen from the memory free once the old one is gone."""
        if self.cache is not None and self.cache.max_len >= length:
            return
        self.cache = None
        max_len = min(round_up(length, CACHE_LEN_STEP), self.context_length)
        if self.requested_slots:
            slots = self.requested_slots
        elif self.device.type == "cuda":
            slots = decode_slots(self.model.config, max_len, self.dtype, free_memory_bytes(self.device))
        else:
            slots = self.cpu_slots
        self.cache = KVCache(self.model.config, slots, max_len, self.device, self.dtype)

    @torch.no_grad()
    def generate(self, prompts, n, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, base_seeds=None,
                 progress=None):
        """prompts: list of token-id lists. base_seeds: per prompt, a list of n ints (sample_seed),
        or None to use torch's global generator. Returns, per prompt, n dicts with `tokens` (list,
        the stop token included), `token_logprobs` (list) and `finish_reason`. Prompts must fit the
        context with max_new_tokens (users get that checked with names by encode_prompts)."""
        if not prompts:
            return []
        longest = max(map(len, prompts))
        if longest + max_new_tokens > self.context_length:
            raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the context ({self.context_length})")
        self.reserve(longest + max_new_tokens)
        B, device = self.cache.k[0].shape[0], self.device
        if n > B:
            how = "fit in free GPU memory" if not self.requested_slots else "were asked for"
            raise ValueError(f"n = {n} samples per prompt need at least n decode slots of {self.cache.max_len} positions; "
                             f"{B} {how}")
        results = [[None] * n for _ in prompts]
        # Per-slot state, all on the device so a decode step needs no host round trip.
        tokens = torch.zeros(B, dtype=torch.long, device=device)      # the token each slot feeds next
        positions = torch.zeros(B, dtype=torch.long, device=device)   # ... and its position
        steps = torch.zeros(B, dtype=torch.long, device=device)       # tokens generated so far
        active = torch.zeros(B, dtype=torch.bool, device=device)
        seeds = torch.zeros(B, dtype=torch.long, device=device)
        out_tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        out_logprobs = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
        # Host-side, per slot: the (prompt index, sample index) it holds, and the position it feeds
        # at the next decode step minus the decode steps run so far (prompt length − steps at
        # admission). The position is then known on the host without reading the device: it grows by
        # one per decode step until the slot is harvested, which bounds the cache positions in use.
        owner = [None] * B
        position_offset = [0] * B
        decode_steps = 0
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
            positions.masked_fill_(finished, 0)  # an empty slot decodes at position 0, inside any cache_len

        def admit():
            """Prefill as many waiting prompts as there are free groups of n slots, at most
            PREFILL_TOKENS padded tokens per forward (at least one prompt), so that the prefill's
            activations and its temporary cache stay small beside the decode cache."""
            free = [s for s in range(B) if owner[s] is None]
            while len(free) >= n and queue:
                batch = [queue.pop(0)]
                width = len(prompts[batch[0]])
                while queue and (len(batch) + 1) * n <= len(free) and \
                        (len(batch) + 1) * max(width, len(prompts[queue[0]])) <= PREFILL_TOKENS:
                    batch.append(queue.pop(0))
                    width = max(width, len(prompts[batch[-1]]))
                admit_batch(batch, free[:len(batch) * n])
                free = free[len(batch) * n:]

        def admit_batch(batch, free):
            """Prefill the prompts `batch` together and give each its n slots from `free`."""
            count = len(batch)
            lengths = torch.tensor([len(prompts[p]) for p in batch], device=device)
            width = max(len(prompts[p]) for p in batch)
            input_ids = torch.zeros(count, width, dtype=torch.long)
            for row, p in enumerate(batch):
                input_ids[row, :len(prompts[p])] = torch.tensor(prompts[p])
            prefill_cache = KVCache(self.model.config, count, width, device, self.cache.k[0].dtype)
            last_logits = prefill(self.model, prefill_cache, input_ids.to(device), lengths)  # (count, V)
            slots = torch.tensor(free, device=device)
            source_rows = torch.arange(count, device=device).repeat_interleave(n)
            for layer in range(len(self.cache.k)):  # each prompt's keys/values into its n slots
                self.cache.k[layer][slots, :, :width] = prefill_cache.k[layer][source_rows]
                self.cache.v[layer][slots, :, :width] = prefill_cache.v[layer][source_rows]
            for i, slot in enumerate(free):
                owner[slot] = (batch[i // n], i % n)
                position_offset[slot] = len(prompts[batch[i // n]]) - decode_steps
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
        while queue or any(o is not None for o in owner):
            if all(o is None for o in owner):  # every sample ended on its first token: refill before decoding
                admit()
                harvest()
                continue
            # Every position in use is below cache_len: the next decode step writes and reads no further.
            in_use = max(position_offset[s] for s in range(B) if owner[s] is not None) + decode_steps + 1
            cache_len = min(round_up(in_use, CACHE_LEN_STEP), self.cache.max_len)
            sampled = decode_step(self.model, self.cache, tokens, positions, cache_len, step_seeds(), temperature, top_k,
                                  top_p, min_p)
            decode_steps += 1
            # Empty slots decode garbage at position 0 (fixed shapes); it is never recorded.
            record(sampled, active)
            positions.copy_(torch.where(active, positions + 1, 0))
            harvest()
            admit()
            harvest()
        return results


# ----------------------------------------------------------------------------------------------
# Prompts records -> samples records


def encode_prompts(tokenizer, records, max_new_tokens, context_length, source=None, max_prompt_length=None):
    """(records, token ids) of the prompts generation samples, ids as generation is fed them
    (common.encode_prompt). A prompt longer than max_prompt_length tokens (None: no limit) is
    skipped, never truncated (a cut prompt asks another question): it is left out of both lists,
    and the skipped are counted in one line. A kept prompt that leaves no room for max_new_tokens
    in the model's context is a user error naming it (`source`, the prompts file, when known): its
    samples could only be cut short or run past the positions the model was trained on."""
    kept, prompts = [], []
    for record in records:
        ids = encode_prompt(tokenizer, record["messages"])
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            continue
        if len(ids) + max_new_tokens > context_length:
            where = f"{source}: " if source else ""
            raise InputError(f"{where}prompt id {record['id']!r} is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} "
                             f"it needs {len(ids) + max_new_tokens} positions, more than the model's context of {context_length} "
                             "(max_position_embeddings): lower --max-new-tokens or drop the prompt")
        kept.append(record)
        prompts.append(ids)
    if len(kept) < len(records):
        where = f" in {source}" if source else ""
        print0(f"skipped {len(records) - len(kept)} of {len(records)} prompts{where} longer than --max-prompt-length "
               f"{max_prompt_length} tokens")
        if not kept:
            raise InputError(f"{source or 'prompts'}: all {len(records)} prompts are longer than --max-prompt-length "
                             f"{max_prompt_length} tokens: nothing to sample")
    return kept, prompts


def response_text(tokenizer, tokens, stop_ids):
    """A sample's text: its tokens decoded without the final stop token, if it ended on one. The
    stop token is not part of the response (training re-adds the end-of-turn token when it encodes
    the response, common.encode_response)."""
    return tokenizer.decode(tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens)


def generate_records(engine, tokenizer, records, n, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0,
                     logprobs=False):
    """Samples records (see the module docstring) for a list of prompts records: n responses per
    prompt, sample i of prompt `id` seeded by sample_seed(seed, id, i)."""
    _, prompts = encode_prompts(tokenizer, records, max_new_tokens, engine.context_length)
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", help="HF checkpoint folder of the policy")
    parser.add_argument("--prompts", help="prompts JSONL (id, messages)")
    parser.add_argument("--out", help="output samples JSONL")
    # --num-samples is the spelling to use under torchrun: its argument parser takes "--n" for an
    # abbreviation of its own --nnodes/--nproc-per-node/... and stops with "ambiguous option".
    parser.add_argument("--n", "--num-samples", dest="n", type=positive_int, default=8, help="samples per prompt (paper 1: 8; paper 2: K = 7)")
    parser.add_argument("--temperature", type=non_negative_float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=positive_fraction, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--top-k", type=non_negative_int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--min-p", type=fraction, default=0.0, help="drop tokens below min_p × the top probability (0 = off)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="a sample that reaches it ends with finish_reason 'length'")
    parser.add_argument("--seed", type=int, default=0, help="global seed; each sample's stream comes from (seed, prompt id, sample index)")
    parser.add_argument("--batch-size", type=non_negative_int, default=0,
                        help="decode slots (concurrent samples) per rank; 0: as many as fit in free GPU memory (64 on a CPU)")
    parser.add_argument("--max-prompt-length", type=positive_int, default=None,
                        help="skip (and count) prompts longer than this many tokens; default: only the context limits them")
    parser.add_argument("--chunk-size", type=positive_int, default=256, help="prompts per resumable chunk")
    parser.add_argument("--logprobs", action="store_true", help="store per-token and summed log-probs of the samples")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--bench", action="store_true", help="GPU benchmark against transformers' generate")
    args = parser.parse_args(argv)
    if args.bench:
        return benchmark()
    if not (args.model and args.prompts and args.out):
        parser.error("--model, --prompts and --out are required")
    if args.batch_size and args.n > args.batch_size:
        parser.error(f"--n {args.n} samples per prompt need --batch-size {args.n} or more (it is {args.batch_size})")

    dist_info = init_distributed(args.device)
    if Path(args.out).exists():
        print0(f"{args.out} exists; skipping")
        return destroy_distributed()
    records = load_records(args.prompts, "prompts")
    tokenizer = load_tokenizer(args.model)
    model = Transformer.from_pretrained(args.model, device=dist_info.device, dtype=default_dtype(dist_info.device)).eval()
    # Every rank checks every prompt (not only its chunks), so a bad one stops all ranks at once.
    records, _ = encode_prompts(tokenizer, records, args.max_new_tokens, model.config.max_position_embeddings, args.prompts,
                                args.max_prompt_length)
    if args.compile:
        compile_decode_step()
    engine = Engine(model, args.batch_size, stop_token_ids(tokenizer))
    sampling = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p, seed=args.seed, logprobs=args.logprobs)
    t0 = time.time()
    # The settings are recorded beside the finished chunks: a resume with other ones stops instead
    # of mixing two sets of samples in one file (the batch size is not one: samples do not depend on it).
    process_in_chunks(records, args.out, lambda chunk: generate_records(engine, tokenizer, chunk, **sampling), dist_info,
                      chunk_size=args.chunk_size, desc="generating",
                      settings=dict(model=str(Path(args.model).resolve()), max_prompt_length=args.max_prompt_length, **sampling))
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
            engine = Engine(ours, batch, stop_ids=[])
            seeds = [[i] for i in range(batch)]
            # Warm-up: one sample through every cache length the timed run reads (each is a shape to
            # compile and record), at the same number of slots.
            engine.generate(prompts[:1].tolist(), 1, new_tokens, base_seeds=seeds[:1])
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
