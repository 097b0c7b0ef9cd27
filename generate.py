"""Batched sampling with a static KV cache and continuous batching: the engine every online stage
samples with, and a command line.

    python generate.py --model runs/builtin/sft --prompts data/builtin/prompts_iter1.jsonl \\
        --out runs/builtin/samples.jsonl --n 8 --temperature 1.0 --max-new-tokens 64 --seed 0
    torchrun --nproc_per_node 8 generate.py --model /ckpt/llama3-8b-sft --prompts prompts.jsonl \\
        --out samples.jsonl --num-samples 8 --temperature 1.0 --top-p 1.0 --top-k 0 \\
        --max-new-tokens 2048
    python generate.py --bench        # GPU: tokens/s against transformers' generate

How it works:
  - a static KV cache of `--batch-size` slots × (longest prompt of the chunk + max new tokens)
    positions, allocated for the first chunk and again only for a chunk that needs more positions;
    one slot holds one sample; the cache is indexed by position (model.KVCache), so every slot
    decodes at its own position and nothing is padded. --batch-size 0 (the default): as many slots
    as fit in 80% of the free GPU memory, up to 512 (decode_slots); 64 on a CPU;
  - Engine.generate is a loop of four steps, one method each. admit: a prompt is admitted when n
    slots are free; prefill_batch: prompts are prefilled together, once each (`prefill`, up to 8192
    padded tokens a forward), each prompt's keys/values copied into its n slots (the n samples
    share the prefill) and each sample's first token drawn; decode: one decode step (`decode_step`)
    runs all slots at one fixed shape (B, 1) and reads only the cache positions in use (the engine
    bounds them on the host: each slot's prompt length plus the steps since it was admitted,
    rounded up to a multiple of 64); retire: a slot whose sample ends (a stop token, or
    --max-new-tokens) is emptied, to be refilled from the waiting prompts (continuous batching), so
    the batch stays full until the queue runs dry; on a CPU (which compiles nothing and pays per
    row) a decode step runs only the first slots, up to the last busy one, and once the queue is dry
    the last samples are moved into the first slots, so the step shrinks as they end (decode_rows);
  - `prefill` and `decode_step` are module-level functions of the model, as in gpt-fast: --compile
    swaps in a torch.compile'd decode_step (fixed shapes, one per cache length read: compiled and
    replayed as CUDA graphs);
  - sampling goes through rlhf_kernels/sampling.py with one random stream per sample, seeded from
    (seed, prompt id, sample index) and the step: a sample does not depend on the batch size, the
    slot it lands in, or the number of ranks.
A prompt that leaves no room for --max-new-tokens in the model's context (max_position_embeddings)
stops the run with an error naming it, before anything is sampled. A prompt longer than
--max-prompt-length (tokens; default: no limit) is skipped and counted, never truncated: its record
is absent from the output.
Output: one JSONL record per prompt (data/README.md, "samples"): id, prompt, responses, response_ids
(the generated token ids, the stop token included: what training scores, tokens.response_ids),
num_tokens (their count), finish_reasons ("stop" | "length"), and with
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

from parallel import default_dtype, destroy_distributed, init_distributed
from runs import (InputError, fraction, non_negative_float, non_negative_int, positive_fraction,
                  positive_int, print0, process_in_chunks, run_cli)
from tokens import encode_prompt, load_tokenizer, stop_token_ids
from data.schema import load_records
from rlhf_kernels.sampling import sample
from model import KVCache, Transformer

# odd 61-bit constant: seed of step s = base seed + s · stride (int64)
SEED_STRIDE = 0x1E3779B97F4A7C15


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
    # (count, width, H)
    hidden = model.hidden_states(input_ids, cache=cache)
    last = hidden[torch.arange(count, device=input_ids.device), lengths - 1]            # (count, H)
    # (count, V)
    return F.linear(last, model.lm_head_weight)


def decode_step(model, cache, tokens, positions, cache_len, seeds, temperature, top_k, top_p,
                min_p):
    """One token for every slot: (B,) tokens at (B,) positions -> rlhf_kernels.sampling.Sampled of
    (B,) tokens and log-probs. Only the first cache_len positions of the cache are read (a host-side
    bound, more than every position in use: see Engine.decode). Fixed shapes whatever the slots
    hold, and cache_len moves in steps of CACHE_LEN_STEP, so a compiled step sees few shapes."""
    # (B, 1, V)
    logits = model(tokens[:, None], position_ids=positions[:, None], cache=cache,
                   cache_len=cache_len)
    return sample(logits[:, 0], temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                  seeds=seeds)


eager_decode_step = decode_step


def compile_decode_step():
    """--compile: from now on every Engine decodes with a torch.compile'd decode_step, CUDA graphs
    included ("reduce-overhead"). A second call changes nothing."""
    global decode_step
    if decode_step is eager_decode_step:
        decode_step = torch.compile(eager_decode_step, mode="reduce-overhead")


# ----------------------------------------------------------------------------------------------
# The engine

# cache lengths (allocated, and read per decode step) are multiples of this
CACHE_LEN_STEP = 64
# decode slots chosen from free GPU memory stop here: past a few hundred a
# decode step is compute-bound and more slots add little throughput
MAX_AUTO_SLOTS = 512
# of the free GPU memory, for the KV cache; the rest is for the prefill's
# and the sampler's temporaries and for fragmentation
CACHE_MEMORY_FRACTION = 0.8
# on a CPU, a decode step runs the first multiple of this many slots that
# holds every busy one (Engine.decode_rows)
DECODE_ROWS_STEP = 8
PREFILL_TOKENS = 8192        # padded prompt tokens per prefill forward: bounds its activations and
                             # temporary cache (Llama-3-8B: ~2 GiB), and already saturates a GPU


def round_up(n, multiple):
    return -(-n // multiple) * multiple


def decode_slots(config, max_len, dtype, free_bytes, cap=MAX_AUTO_SLOTS):
    """How many decode slots of max_len positions fit in CACHE_MEMORY_FRACTION of free_bytes, at
    most cap. A slot holds the key and the value of every layer at every position:
    layers × 2 × n_kv_heads × head_dim × dtype bytes × max_len (Llama-3-8B, bf16, 4096 positions:
    512 MiB). May be 0: the caller says what does not fit."""
    bytes_per_slot = config.kv_bytes_per_position(dtype.itemsize) * max_len
    return min(cap, int(free_bytes * CACHE_MEMORY_FRACTION) // bytes_per_slot)


def free_memory_bytes(device):
    """What a new allocation on a GPU can use: the device's free memory plus what PyTorch's caching
    allocator holds unused (an old cache just dropped, for instance)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class GenerationState:
    """One Engine.generate call: what it was asked, and what each of the B decode slots holds. The
    per-slot state lives on the device, so that a decode step needs no host round trip; the host
    keeps only what it knows without reading the device: which slots are busy, and where their
    positions are."""

    def __init__(self, prompts, n, max_new_tokens, sampling, base_seeds, progress, num_slots,
                 device):
        self.prompts, self.n, self.max_new_tokens = prompts, n, max_new_tokens
        # (temperature, top_k, top_p, min_p), in the order sample() takes them
        self.sampling = sampling
        # per prompt, n ints (sample_seed); None: torch's global generator
        self.base_seeds = base_seeds
        # a tqdm bar or None: one update per prompt whose n samples are done
        self.progress = progress
        self.queue = list(range(len(prompts)))        # prompts waiting for slots, in order
        self.results = [[None] * n for _ in prompts]  # per prompt, n dicts once its samples end
        self.samples_left = [n] * len(prompts)
        B = num_slots
        # (B,) what each slot feeds next
        self.tokens = torch.zeros(B, dtype=torch.long, device=device)
        # (B,) ... and at which position
        self.positions = torch.zeros(B, dtype=torch.long, device=device)
        # (B,) tokens generated so far
        self.steps = torch.zeros(B, dtype=torch.long, device=device)
        # (B,) the slot holds a sample
        self.active = torch.zeros(B, dtype=torch.bool, device=device)
        # (B,) the sample's base seed
        self.seeds = torch.zeros(B, dtype=torch.long, device=device)
        self.out_tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        self.out_logprobs = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
        self.rows = torch.arange(B, device=device)
        # Host-side, per slot: the (prompt index, sample index) it holds (None: empty), and the
        # position it feeds at the next decode step minus the decode steps run so far (prompt length
        # − steps at admission). A slot's position is then known without reading the device: it
        # grows by one per decode step until the slot is retired, which bounds the cache positions
        # in use.
        self.owner = [None] * B
        self.position_offset = [0] * B
        self.decode_steps = 0
        self.generated_tokens = 0  # for the progress bar's tokens/s
        self.started = time.perf_counter()

    def busy(self):
        return any(owner is not None for owner in self.owner)

    def step_seeds(self):
        """(B,) each slot's seed for its next token: base seed + step · SEED_STRIDE."""
        if self.base_seeds is None:
            return None
        return self.seeds + self.steps * SEED_STRIDE

    def record(self, sampled, slot_mask):
        """Store the sampled token and log-prob of every slot in slot_mask (B,); advance those
        slots. `sampled` may cover only the first b <= B slots (Engine.decode_rows): the rest are
        untouched."""
        b = sampled.tokens.shape[0]
        # views: written in place
        slot_mask, tokens, steps = slot_mask[:b], self.tokens[:b], self.steps[:b]
        # each slot's next output column
        at = (self.rows[:b], steps.clamp(max=self.max_new_tokens - 1))
        self.out_tokens[at] = torch.where(slot_mask, sampled.tokens, self.out_tokens[at])
        self.out_logprobs[at] = torch.where(slot_mask, sampled.logprobs_untruncated,
                                            self.out_logprobs[at])
        tokens.copy_(torch.where(slot_mask, sampled.tokens, tokens))
        steps.add_(slot_mask.long())

    def move(self, source, target, cache):
        """Move the sample in slot `source` to the empty slot `target`: its cache rows, its device
        state and the host's bookkeeping."""
        for buffer in cache.k + cache.v:
            buffer[target] = buffer[source]
        for tensor in (self.tokens, self.positions, self.steps, self.active, self.seeds,
                       self.out_tokens, self.out_logprobs):
            tensor[target] = tensor[source]
        self.active[source] = False
        self.positions[source] = 0
        self.owner[target], self.owner[source] = self.owner[source], None
        self.position_offset[target] = self.position_offset[source]

    def tokens_per_second(self):
        return self.generated_tokens / (time.perf_counter() - self.started)


class Engine:
    def __init__(self, model, max_batch, stop_ids, dtype=None, cpu_slots=64):
        """model: a Transformer (eval mode, on its device). max_batch: decode slots; 0 or None: as
        many as fit in free GPU memory (decode_slots), `cpu_slots` on a CPU. stop_ids: tokens that
        end a sample. dtype: the KV cache's dtype (default: the weights'; bf16 for fp32 weights
        under autocast). The cache is allocated by generate(), for the call's longest prompt + its
        max_new_tokens, and kept for later calls that fit in it: a file of short prompts never pays
        for the longest prompt of another."""
        self.model = model
        self.requested_slots, self.cpu_slots = max_batch, cpu_slots
        self.context_length = model.config.max_position_embeddings
        self.device = model.lm_head_weight.device
        self.dtype = dtype or model.lm_head_weight.dtype
        self.cache = None  # a model.KVCache of (slots, max_len), allocated by reserve()
        self.stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=self.device)

    def reserve(self, length):
        """A cache of at least `length` positions per slot (at most the context, which no sample may
        pass): the current one if long enough, else a new one, its length rounded up to a multiple
        of CACHE_LEN_STEP (so that chunks of similar prompts reuse it) and, without a fixed
        max_batch, its slots chosen from the memory free once the old one is gone."""
        if self.cache is not None and self.cache.max_len >= length:
            return
        self.cache = None
        max_len = min(round_up(length, CACHE_LEN_STEP), self.context_length)
        if self.requested_slots:
            slots = self.requested_slots
        elif self.device.type == "cuda":
            free_bytes = free_memory_bytes(self.device)
            slots = decode_slots(self.model.config, max_len, self.dtype, free_bytes)
        else:
            slots = self.cpu_slots
        self.cache = KVCache(self.model.config, slots, max_len, self.device, self.dtype)

    @torch.no_grad()
    def generate(self, prompts, n, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                 base_seeds=None, progress=None):
        """prompts: list of token-id lists. base_seeds: per prompt, a list of n ints (sample_seed),
        or None to use torch's global generator. Returns, per prompt, n dicts with `tokens` (list,
        the stop token included), `token_logprobs` (list) and `finish_reason`. Prompts must fit the
        context with max_new_tokens (users get that checked with names by encode_prompts).
        progress: a tqdm bar (or None), advanced by one as each prompt's n samples are done, its
        postfix the call's generated tokens per second."""
        if not prompts:
            return []
        longest = max(map(len, prompts))
        if longest + max_new_tokens > self.context_length:
            raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens "
                             f"exceeds the context ({self.context_length})")
        self.reserve(longest + max_new_tokens)
        num_slots = self.cache.k[0].shape[0]
        if n > num_slots:
            how = "fit in free GPU memory" if not self.requested_slots else "were asked for"
            raise ValueError(f"n = {n} samples per prompt need at least n decode slots of "
                             f"{self.cache.max_len} positions; {num_slots} {how}")
        sampling = (temperature, top_k, top_p, min_p)
        state = GenerationState(prompts, n, max_new_tokens, sampling, base_seeds, progress,
                                num_slots, self.device)
        # Continuous batching: fill the free slots, decode every slot one token, retire the
        # finished, refill, ... until the queue runs dry and the last sample ends.
        self.admit(state)
        self.retire(state)  # samples that ended on their first token
        while state.queue or state.busy():
            if state.busy():  # else every sample ended on its first token: refill before decoding
                self.decode(state)
                self.retire(state)
            self.admit(state)
            self.retire(state)
        return state.results

    def admit(self, state):
        """Give waiting prompts the free slots, n each, prefilling them in batches of at most
        PREFILL_TOKENS padded tokens a forward (at least one prompt), so that the prefill's
        activations and its temporary cache stay small beside the decode cache."""
        n, prompts, queue = state.n, state.prompts, state.queue
        free = [slot for slot, owner in enumerate(state.owner) if owner is None]
        while len(free) >= n and queue:
            batch = [queue.pop(0)]
            width = len(prompts[batch[0]])
            while queue and (len(batch) + 1) * n <= len(free):
                wider = max(width, len(prompts[queue[0]]))
                if (len(batch) + 1) * wider > PREFILL_TOKENS:
                    break
                batch.append(queue.pop(0))
                width = wider
            self.prefill_batch(state, batch, free[:len(batch) * n])
            free = free[len(batch) * n:]

    def prefill_batch(self, state, batch, new_slots):
        """Prefill the prompts `batch` (indices) in one forward, copy each one's keys/values into
        its n slots (the next n of the list `new_slots`), and sample each of those slots' first
        token."""
        device, n, count = self.device, state.n, len(batch)
        lengths = [len(state.prompts[p]) for p in batch]
        width = max(lengths)
        input_ids = torch.zeros(count, width, dtype=torch.long)  # (count, width), right-padded
        for row, p in enumerate(batch):
            input_ids[row, :lengths[row]] = torch.tensor(state.prompts[p])
        lengths = torch.tensor(lengths, device=device)  # (count,)
        prefill_cache = KVCache(self.model.config, count, width, device, self.cache.k[0].dtype)
        # (count, V)
        last_logits = prefill(self.model, prefill_cache, input_ids.to(device), lengths)

        slots = torch.tensor(new_slots, device=device)                         # (count·n,)
        # (count·n,) their prompt's row
        source_rows = torch.arange(count, device=device).repeat_interleave(n)
        for layer in range(len(self.cache.k)):
            self.cache.k[layer][slots, :, :width] = prefill_cache.k[layer][source_rows]
            self.cache.v[layer][slots, :, :width] = prefill_cache.v[layer][source_rows]
        # (prompt index, sample index) of each slot
        owners = [(p, i) for p in batch for i in range(n)]
        for slot, (p, i) in zip(new_slots, owners):
            state.owner[slot] = (p, i)
            state.position_offset[slot] = len(state.prompts[p]) - state.decode_steps
        if state.base_seeds is not None:
            state.seeds[slots] = torch.tensor([state.base_seeds[p][i] for p, i in owners],
                                              device=device)
        slot_mask = torch.zeros_like(state.active)  # (B,) the slots just filled
        slot_mask[slots] = True
        state.steps.masked_fill_(slot_mask, 0)
        state.positions[slots] = lengths[source_rows]
        state.active.logical_or_(slot_mask)

        # The first token of each sample, from its prompt's last-position logits. All B rows go to
        # the sampler (the others zeros, not recorded), as in a decode step.
        logits = last_logits.new_zeros(len(state.owner), last_logits.shape[-1])  # (B, V)
        logits[slots] = last_logits[source_rows]
        state.record(sample(logits, *state.sampling, seeds=state.step_seeds()), slot_mask)
        state.generated_tokens += len(new_slots)

    def decode(self, state):
        """One token for every busy slot: a decode step at the fixed shape (b, 1) over the first b
        slots (decode_rows). Empty slots among them decode garbage at position 0, never recorded."""
        busy = [offset for offset, owner in zip(state.position_offset, state.owner)
                if owner is not None]
        # Every position in use is below cache_len: the step writes and reads no further.
        in_use = max(busy) + state.decode_steps + 1
        cache_len = min(round_up(in_use, CACHE_LEN_STEP), self.cache.max_len)
        b = self.decode_rows(state)
        cache = self.cache if b == len(state.owner) else self.cache.first_rows(b)
        seeds = state.step_seeds()
        sampled = decode_step(self.model, cache, state.tokens[:b], state.positions[:b], cache_len,
                              # (b,) tokens, log-probs
                              None if seeds is None else seeds[:b], *state.sampling)
        state.decode_steps += 1
        state.generated_tokens += len(busy)
        state.record(sampled, state.active)
        state.positions.copy_(torch.where(state.active, state.positions + 1, 0))

    def decode_rows(self, state):
        """How many slots, from the first, a decode step runs: all B on a GPU (one shape, so a
        compiled step is captured once per cache length). On a CPU, which compiles nothing and pays
        per row, up to the last busy slot, rounded up to a multiple of DECODE_ROWS_STEP: admit fills
        the lowest free slots first, and once no prompt waits the last samples are moved into the
        first slots, so the step shrinks as they end."""
        B = len(state.owner)
        if self.device.type != "cpu" or decode_step is not eager_decode_step:
            return B
        busy = [slot for slot, owner in enumerate(state.owner) if owner is not None]
        # the last samples: gather them into the first slots (a few MB of copies)
        if not state.queue:
            free = [slot for slot in range(len(busy)) if state.owner[slot] is None]
            for source, target in zip(reversed([slot for slot in busy if slot >= len(busy)]), free):
                state.move(source, target, self.cache)
            busy = range(len(busy))
        return min(round_up(busy[-1] + 1, DECODE_ROWS_STEP), B)

    def retire(self, state):
        """Empty the slots whose sample just ended (a stop token, or max_new_tokens) and hand their
        results back: one host sync."""
        stopped = torch.isin(state.tokens, self.stop_ids)                           # (B,)
        finished = state.active & (stopped | (state.steps >= state.max_new_tokens))  # (B,)
        for slot in finished.nonzero()[:, 0].tolist():
            length = int(state.steps[slot])
            ids = state.out_tokens[slot, :length].tolist()
            prompt_index, sample_index = state.owner[slot]
            state.results[prompt_index][sample_index] = {
                "tokens": ids, "token_logprobs": state.out_logprobs[slot, :length].tolist(),
                "finish_reason": "stop" if ids[-1] in self.stop_ids.tolist() else "length"}
            state.owner[slot] = None
            state.samples_left[prompt_index] -= 1
            if state.progress is not None and state.samples_left[prompt_index] == 0:
                state.progress.set_postfix_str(f"{state.tokens_per_second():,.0f} tok/s",
                                               refresh=False)
                state.progress.update(1)
        state.active.logical_and_(~finished)
        # an empty slot decodes at position 0, inside any cache_len
        state.positions.masked_fill_(finished, 0)


# ----------------------------------------------------------------------------------------------
# Prompts records -> samples records


def encode_prompts(tokenizer, records, max_new_tokens, context_length, source=None,
                   max_prompt_length=None):
    """(records, token ids) of the prompts generation samples, ids as generation is fed them
    (tokens.encode_prompt). A prompt longer than max_prompt_length tokens (None: no limit) is
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
            raise InputError(f"{where}prompt id {record['id']!r} is {len(ids)} tokens; "
                             f"with --max-new-tokens {max_new_tokens} it needs "
                             f"{len(ids) + max_new_tokens} positions, "
                             f"more than the model's context of {context_length} "
                             "(max_position_embeddings): "
                             "lower --max-new-tokens or drop the prompt")
        kept.append(record)
        prompts.append(ids)
    if len(kept) < len(records):
        where = f" in {source}" if source else ""
        print0(f"skipped {len(records) - len(kept)} of {len(records)} prompts{where} "
               f"longer than --max-prompt-length {max_prompt_length} tokens")
        if not kept:
            raise InputError(f"{source or 'prompts'}: all {len(records)} prompts are "
                             f"longer than --max-prompt-length {max_prompt_length} tokens: "
                             "nothing to sample")
    return kept, prompts


def response_text(tokenizer, tokens, stop_ids):
    """A sample's text: its tokens decoded without the final stop token, if it ended on one. The
    stop token is not part of the text; training scores the record's response_ids, which keep it."""
    return tokenizer.decode(tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens)


def prompt_columns(record):
    """A prompt record's fields besides id and messages (an `answer` a verifier checks, say)."""
    return {key: value for key, value in record.items() if key not in ("id", "messages")}


def generate_records(engine, tokenizer, records, n, max_new_tokens, temperature=1.0, top_k=0,
                     top_p=1.0, min_p=0.0,
                     seed=0, logprobs=False, progress=None):
    """Samples records (see the module docstring) for a list of prompts records: n responses per
    prompt, sample i of prompt `id` seeded by sample_seed(seed, id, i). progress: see
    Engine.generate."""
    _, prompts = encode_prompts(tokenizer, records, max_new_tokens, engine.context_length)
    base_seeds = [[sample_seed(seed, r["id"], i) for i in range(n)] for r in records]
    outputs = engine.generate(prompts, n, max_new_tokens, temperature, top_k, top_p, min_p,
                              base_seeds, progress)
    stop_ids = set(engine.stop_ids.tolist())
    samples = []
    for record, outs in zip(records, outputs):
        sample_record = {"id": record["id"], "prompt": record["messages"],
                         "responses": [response_text(tokenizer, o["tokens"], stop_ids)
                                       for o in outs],
                         "response_ids": [o["tokens"] for o in outs],
                         "num_tokens": [len(o["tokens"]) for o in outs],
                         "finish_reasons": [o["finish_reason"] for o in outs]}
        columns = prompt_columns(record)
        if columns:  # the prompt record's other fields, for a verifier (rewards.verifier_rewards)
            sample_record["columns"] = columns
        if logprobs:
            sample_record["logprobs"] = [sum(o["token_logprobs"]) for o in outs]
            sample_record["token_logprobs"] = [o["token_logprobs"] for o in outs]
        samples.append(sample_record)
    return samples


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", help="HF checkpoint folder of the policy")
    parser.add_argument("--prompts", help="prompts JSONL (id, messages)")
    parser.add_argument("--out", help="output samples JSONL")
    # --num-samples is the spelling to use under torchrun: its argument parser takes "--n" for an
    # abbreviation of its own --nnodes/--nproc-per-node/... and stops with "ambiguous option".
    parser.add_argument("--n", "--num-samples", dest="n", type=positive_int, default=8,
                        help="samples per prompt (paper 1: 8; paper 2: K = 7)")
    parser.add_argument("--temperature", type=non_negative_float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=positive_fraction, default=1.0,
                        help="nucleus sampling mass (1 = off)")
    parser.add_argument("--top-k", type=non_negative_int, default=0,
                        help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--min-p", type=fraction, default=0.0,
                        help="drop tokens below min_p × the top probability (0 = off)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256,
                        help="a sample that reaches it ends with finish_reason 'length'")
    parser.add_argument("--seed", type=int, default=0,
                        help="global seed; each sample's stream comes from "
                             "(seed, prompt id, sample index)")
    parser.add_argument("--batch-size", type=non_negative_int, default=0,
                        help="decode slots (concurrent samples) per rank; 0: as many as fit in "
                             "free GPU memory (64 on a CPU)")
    parser.add_argument("--max-prompt-length", type=positive_int, default=None,
                        help="skip (and count) prompts longer than this many tokens; default: "
                             "only the context limits them")
    parser.add_argument("--chunk-size", type=positive_int, default=256,
                        help="prompts per resumable chunk")
    parser.add_argument("--logprobs", action="store_true",
                        help="store per-token and summed log-probs of the samples")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (CUDA graphs)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--bench", action="store_true",
                        help="GPU benchmark against transformers' generate")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bench:
        return benchmark()
    if not (args.model and args.prompts and args.out):
        parser.error("--model, --prompts and --out are required")
    if args.batch_size and args.n > args.batch_size:
        parser.error(f"--n {args.n} samples per prompt need --batch-size {args.n} or more (it is "
                     f"{args.batch_size})")

    dist_info = init_distributed(args.device)
    if Path(args.out).exists():
        print0(f"{args.out} exists; skipping")
        return destroy_distributed()
    records = load_records(args.prompts, "prompts")
    tokenizer = load_tokenizer(args.model)
    device = dist_info.device
    model = Transformer.from_pretrained(args.model, device=device,
                                        dtype=default_dtype(device)).eval()
    # Every rank checks every prompt (not only its chunks), so a bad one stops all ranks at once.
    context = model.config.max_position_embeddings
    records, _ = encode_prompts(tokenizer, records, args.max_new_tokens, context, args.prompts,
                                args.max_prompt_length)
    if args.compile:
        compile_decode_step()
    engine = Engine(model, args.batch_size, stop_token_ids(tokenizer))
    sampling = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
                    logprobs=args.logprobs)
    t0 = time.time()
    # The settings are recorded beside the finished chunks: a resume with other ones stops instead
    # of mixing two sets of samples in one file (not the batch size: samples do not depend on it).
    settings = dict(model=str(Path(args.model).resolve()), max_prompt_length=args.max_prompt_length,
                    **sampling)
    process_in_chunks(records, args.out,
                      lambda chunk, bar: generate_records(engine, tokenizer, chunk, progress=bar,
                                                          **sampling),
                      dist_info, chunk_size=args.chunk_size, desc="generating", settings=settings,
                      reports_progress=True)
    print0(f"wrote {args.out}: {len(records)} prompts × {args.n} samples "
           f"in {time.time() - t0:.1f} s")
    destroy_distributed()


# ----------------------------------------------------------------------------------------------
# Benchmark (GPU): random-init bf16 models, 128-token prompts, 256 new tokens, every row forced to
# full length, sampling at temperature 1.0; tokens/s against transformers' generate in the same run.

BENCH_SHAPES = {
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0),
    "TinyLlama-1.1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
                           rope_theta=10000.0),
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                       rope_theta=500000.0),
}


def benchmark(prompt_len=128, new_tokens=256, batches=(64, 256)):
    if not torch.cuda.is_available():
        print("generate.py --bench needs a CUDA GPU")
        return
    from transformers import LlamaConfig, LlamaForCausalLM
    device = torch.device("cuda")
    compile_decode_step()
    for name, shape in BENCH_SHAPES.items():
        config = dict(model_type="llama", max_position_embeddings=4096, rms_norm_eps=1e-5,
                      hidden_act="silu", **shape)
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
                hf.generate(prompts[:, :8], do_sample=True, max_new_tokens=8, min_new_tokens=8,
                            top_k=0, top_p=1.0)
                torch.cuda.synchronize()
                t0 = time.time()
                hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                            temperature=1.0, top_k=0,
                            top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            pad_token_id=0)
                torch.cuda.synchronize()
            hf_tps = batch * new_tokens / (time.time() - t0)
            # Bandwidth roofline: every step reads the weights once plus each row's KV cache
            # (mean length). bf16
            kv_bytes = batch * (prompt_len + new_tokens / 2) * ours.config.kv_bytes_per_position(2)
            roofline = batch / ((weight_bytes + kv_bytes) / 3.35e12)
            print(f"{name:15s} batch {batch:4d}: ours {ours_tps:9,.0f} tok/s | "
                  f"HF generate {hf_tps:8,.0f} tok/s | {ours_tps / hf_tps:5.2f}x | "
                  f"{100 * ours_tps / roofline:5.1f}% of the {roofline:,.0f} tok/s "
                  "bandwidth roofline")
        del ours, hf, engine
        torch.cuda.empty_cache()


if __name__ == "__main__":
    run_cli(main)
