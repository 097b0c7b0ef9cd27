"""Next-token sampling from a batch of last-position logits: temperature, top-k, top-p (nucleus) and
min-p, with one random stream per row and no host synchronisation.

    from rlhf_kernels.sampling import sample
    # logits (B, V); seeds (B,) int64, or None
    out = sample(logits, temperature=0.7, top_p=0.9, seeds=seeds)
    out.tokens                # (B,) int64 sampled ids
    out.logprobs              # (B,) fp32 log q(token), q = the distribution actually sampled from
    out.logprobs_untruncated  # (B,) fp32 log p(token), p = softmax(logits / T): temperature only

    python -m rlhf_kernels.sampling --bench        # H100: ours vs sort-based top-p, multinomial
    python -m rlhf_kernels.sampling --bench --cpu  # the PyTorch path on this machine's CPU

What is sampled. With z = logits * (1 / T) in fp32 and p = softmax(z), the kept set is
K = {i : z_i >= t}, t = max(t_k, t_p, t_min), where (list the tokens by decreasing z):
  - top-k (0 < k < V):   t_k = the k-th largest z. Every token tied with it is kept too, so on ties
                         |K| can exceed k (no arbitrary tie-break: K never depends on token order).
  - top-p (0 < p < 1):   t_p = z of the first token at which the running mass reaches top_p. That
                         is the smallest most-probable set with mass >= top_p, plus every token
                         tied with its last member (same reason).
  - min-p (0 < min_p <= 1): t_min = max z + log(min_p), i.e. keep p_i >= min_p * p_max.
All three are read off the same temperature-scaled p over the whole vocabulary and intersected
("joint" filtering, as FlashInfer's filter_apply_order="joint"). HF and vLLM compute top-p after
renormalising over the top-k set, so with top-k *and* top-p both on their set can be smaller than
ours; with one filter on, the sets are the same. q = p restricted to K and renormalised.
  - `logprobs` = log q(token) = z_token - logsumexp(z over K): the log-prob of what was sampled.
  - `logprobs_untruncated` = log p(token) = z_token - logsumexp(z): under temperature alone. This is
    the one to compare with a training-time forward pass at the same temperature.
  - temperature 0 (any row): greedy argmax of the logits (the lowest id among equal maxima); both
    log-probs are 0, since the distribution sampled from is a point mass.
  - -inf logits are never sampled (a row must have at least one finite logit).

How a token is drawn: the exponential race. If E_i ~ Exp(1) are independent, then
argmin_i E_i / q_i = argmax_i (z_i - log E_i) over K is a sample from q (gpt-fast samples this way
too). There is no cumulative sum to walk and no host round trip, and the truncation only enters as
a mask. E_i comes from a counter-based hash of (row seed, token id): both implementations compute
the same E_i, so for the same seeds they return the same tokens -- barring a race decided within a
rounding error of the log, or a cut where the running mass lies within fp32 rounding of top_p (each
implementation sums in its own order); the tests never meet either.

Seeds. `seeds` is a (B,) int64 tensor (any values, negative too): row b's noise is a function of
seeds[b] alone, so row b's token depends only on (logits[b], its parameters, seeds[b]) -- not on the
other rows, the batch size or its position. Equal seeds give equal noise: change the seed every
decode step (generate.py uses base seed + step * odd constant, per sample). seeds=None draws B seeds
from torch's generator for the logits' device (reproducible under torch.manual_seed, but then a row
does depend on the rest of the batch).

Implementations, same signature (pick with impl= or RLHF_KERNELS=...):
  - "torch":  sample_reference. Plain PyTorch: noise for every token, top-k via torch.topk, top-p
              via one sort + cumsum. The twin the tests trust; what CPU runs and CI use.
  - "triton": one program per row, never sorts the vocabulary (below).
  - "auto":   "triton" on CUDA (and on CPU under TRITON_INTERPRET=1, for tests), else "torch".

The Triton kernel, one launch (with Python-number parameters), one program per row, every loop
decided inside the kernel:
  1. One pass: max m, sum s = sum exp(z - m), the smallest finite z, and for rows that do not
     truncate the race winner over all tokens (greedy: the argmax): one read of the logits.
  2. Threshold search. Keep a bracket (lo, hi] known to hold t: "v >= t" is decided for any value v
     from count{z > v} < k, mass{z > v} < top_p * s and v >= t_min. Each pass scores NUM_PIVOTS
     evenly spaced pivots at once (counts and masses above each) and shrinks the bracket to the gap
     between two neighbouring pivots; it stops once the bracket holds <= CANDIDATES tokens (1-3
     passes for Gaussian logits at V = 128256, top-p 0.9 or top-k 50) or a single distinct value.
  3. One more pass: the race winner among tokens above the bracket (all kept), and the bracket's
     tokens compacted into a per-row buffer. Sorting that buffer (<= CANDIDATES values, in
     registers) gives t exactly, by the rule above; the winner among the buffered tokens >= t meets
     the first. log q needs the kept mass, which we now know exactly: mass{z > hi} + buffered
     tokens >= t.
"""
import argparse
import math
import os
import sys
import time
from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import is_fake

from rlhf_kernels import first_use_fallback

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # e.g. macOS / Windows wheels without Triton: the "torch" path still works
    HAS_TRITON = False

IMPLEMENTATIONS = ("auto", "triton", "torch")
# Triton tile and search sizes; module globals so the tests can shrink them to exercise every branch
# (several tiles, several search passes, a tie group bigger than the buffer) at V = 123.
_MAX_BLOCK_V = 1024   # logits per tile
_NUM_PIVOTS = 8       # thresholds scored per search pass: each pass narrows the bracket ~8x
_CANDIDATES = 1024    # bracket size at which the search stops and sorts (a power of two)
_NUM_WARPS = 8        # at 1024-wide tiles: 64 registers, no spills on sm_90 (ptxas -v)


class Sampled(NamedTuple):
    tokens: torch.Tensor                # (B,) int64
    # (B,) fp32 log q(token), q = truncated + renormalised (what was sampled)
    logprobs: torch.Tensor
    logprobs_untruncated: torch.Tensor  # (B,) fp32 log p(token), p = softmax(logits / T)


# ----------------------------------------------------------------------------------------------
# The random stream: a 32-bit counter-based hash of (row key, token id), the same bits in PyTorch
# and Triton. PyTorch has no usable uint32 arithmetic, so the PyTorch side works on int32 bit
# patterns: multiplication wraps modulo 2^32 in both, and ">> n" followed by a mask is a logical
# shift.

def _mix32(x):
    """A 32-bit integer hash (Wellons' "lowbias32" shape: xor-shift, multiply, xor-shift, multiply,
    xor-shift), a bijection on 32 bits. x: int32 tensor holding uint32 bit patterns, overwritten
    (in place: on a CPU each op is a pass over B x V entries, and fresh buffers cost as much
    again)."""
    x ^= (x >> 16).bitwise_and_(0xFFFF)
    x *= 0x21F0AAAD
    x ^= (x >> 15).bitwise_and_(0x1FFFF)
    x *= 0x735A2D97
    x ^= (x >> 15).bitwise_and_(0x1FFFF)
    return x


def _as_int32_bits(x):
    """int64 tensor with values in [0, 2^32) -> int32 tensor with the same 32 bits."""
    return ((x ^ 0x80000000) - 0x80000000).to(torch.int32)


def _row_keys(seeds):
    """(B,) int64 seeds -> (B, 2) int32 keys, each a hash of all 64 bits of the seed. A token's
    noise hashes its id twice, with key 0 and then key 1, so two rows share no structure unless both
    keys match (with a single key, rows whose keys differ in a few low bits would see permuted
    streams)."""
    low, high = _as_int32_bits(seeds & 0xFFFFFFFF), _as_int32_bits((seeds >> 32) & 0xFFFFFFFF)
    key_a = _mix32(low ^ _mix32(high ^ 0x2545F491))
    # (key_a ^ ... is a new tensor: key_a is kept)
    key_b = _mix32(high ^ _mix32(key_a ^ 0x68E31DA4))
    return torch.stack([key_a, key_b], dim=1)


def _log_exponential_noise(keys, index):
    """log E for E ~ Exp(1), one per (row, token): keys (B, 2) int32, index (V,) or (B, n) int32
    token ids
    -> (B, V) or (B, n) fp32. Written op for op like _race_keys_triton."""
    h = _mix32(index ^ keys[:, :1])
    h ^= keys[:, 1:]
    h = _mix32(h)
    u = h.bitwise_right_shift_(1).bitwise_and_(0x7FFFFFFF).float()       # 31 random bits
    # uniform in (0, 1), fine-grained near 0
    u.add_(0.5).mul_(2.0**-31).clamp_(max=1.0 - 2.0**-24)
    # E = -log(1 - u). For small u, 1 - u would round away u's low bits, and small E is what decides
    # whether an unlikely token wins; the series keeps them (error < u^5 / 5, below fp32 there):
    # u (1 + u (1/2 + u (1/3 + u / 4))), evaluated innermost first, as the Triton kernel does.
    series = (u * 0.25).add_(0.3333333333333333).mul_(u).add_(0.5).mul_(u).add_(1.0).mul_(u)
    e = torch.where(u < 0.0078125, series, torch.rsub(u, 1.0).log_().neg_())
    return e.log_()


# ----------------------------------------------------------------------------------------------
# Parameters: Python numbers (the common case: passed to the kernel as arguments, no tensor to
# build) or (B,) tensors, one value per row. The derived values (1/T, log min_p) are computed once,
# here, so both implementations multiply by the very same bits.

class _Params(NamedTuple):
    """All Python numbers, or all (B,) tensors (fp32, int8, int32, fp32, fp32)."""
    inv_temperature: object  # 1/T (1.0 where greedy)
    greedy: object           # 1 where T == 0, else 0
    top_k: object            # 0 = off
    top_p: object            # 1.0 = off
    log_min_p: object        # log(min_p), -inf = off


def _per_row(value, B, dtype, device):
    if isinstance(value, torch.Tensor):
        assert value.dim() == 0 or value.shape == (B,), \
            f"per-row parameters must be (B,) = ({B},), got {tuple(value.shape)}"
        return value.to(device=device, dtype=dtype).expand(B).contiguous()
    return torch.full((B,), value, dtype=dtype, device=device)


def _params(logits, temperature, top_k, top_p, min_p):
    assert logits.dim() == 2 and logits.is_floating_point(), \
        f"expected float logits (B, V), got {tuple(logits.shape)}"
    values = (temperature, top_k, top_p, min_p)
    # Scalars are checked here; per-row tensors are not (a check would need a host sync).
    if not isinstance(temperature, torch.Tensor):
        assert temperature >= 0, "temperature must be >= 0 (0 = greedy)"
    if not isinstance(top_k, torch.Tensor):
        assert top_k >= 0 and int(top_k) == top_k, "top_k must be a non-negative int (0 = off)"
    if not isinstance(top_p, torch.Tensor):
        assert 0 < top_p <= 1, "top_p must lie in (0, 1] (1 = off)"
    if not isinstance(min_p, torch.Tensor):
        assert 0 <= min_p <= 1, "min_p must lie in [0, 1] (0 = off)"
    if not any(isinstance(v, torch.Tensor) for v in values):
        return _Params(1.0 / temperature if temperature > 0 else 1.0, int(temperature == 0),
                       int(top_k), float(top_p), math.log(min_p) if min_p > 0 else float("-inf"))
    B, device = logits.shape[0], logits.device
    temperature = _per_row(temperature, B, torch.float32, device)
    greedy = temperature == 0
    return _Params(torch.where(greedy, 1.0, 1.0 / temperature), greedy.to(torch.int8),
                   _per_row(top_k, B, torch.int32, device),
                   _per_row(top_p, B, torch.float32, device),
                   _per_row(min_p, B, torch.float32, device).log())


def _seeds(seeds, B, device):
    # from torch's generator for this device: no host sync, reproducible under manual_seed
    if seeds is None:
        return torch.randint(0, 2**62, (B,), device=device)
    assert seeds.shape == (B,) and seeds.dtype == torch.int64, f"seeds must be (B,) = ({B},) int64"
    return seeds.to(device)


# ----------------------------------------------------------------------------------------------
# The reference: noise for every token, the kept set from torch.topk or one sort. Simple enough to
# trust.

def _kept_threshold(z, m, s, rows, top_k, top_p):
    """t (B, 1) such that the kept set is {z >= t}; z (B, V) fp32, m and s (B, 1) max and sum exp(z
    - m), rows: _Params of (B,) tensors, top_k and top_p: as the caller gave them (to pick the
    cheapest route)."""
    V = z.shape[1]
    threshold = m + rows.log_min_p[:, None]                         # min-p (-inf when off)
    # no top-p anywhere: no sort needed
    if not isinstance(top_p, torch.Tensor) and top_p >= 1:
        if not isinstance(top_k, torch.Tensor):
            if 0 < top_k < V:
                # k-th largest
                threshold = torch.maximum(threshold, z.topk(int(top_k), dim=-1).values[:, -1:])
            return threshold
    # General case: sort once, find the first position where the running count reaches k or the
    # running mass reaches top_p * s; the z there is the cut. A (B, V) sort: fine for a reference,
    # and on a CPU.
    ordered = z.sort(dim=-1, descending=True).values               # (B, V)
    position = torch.arange(V, device=z.device)
    k, p = rows.top_k[:, None], rows.top_p[:, None]                 # (B, 1)
    reached = (k > 0) & (k < V) & (position + 1 >= k)              # (B, V)
    reached |= (p < 1) & (torch.exp(ordered - m).cumsum(dim=-1) >= p * s)
    # (B, 1), V = never reached
    first = torch.where(reached, position, V).amin(dim=-1, keepdim=True)
    cut = ordered.gather(1, first.clamp(max=V - 1))
    cut = torch.where(first < V, cut, float("-inf"))
    return torch.maximum(threshold, cut)


def _sample_torch(logits, params, seeds, top_k, top_p):
    if _plain(params):
        return _sample_plain_torch(logits, params.inv_temperature, seeds)
    B, V = logits.shape
    dtypes = (torch.float32, torch.int8, torch.int32, torch.float32, torch.float32)
    # all (B,)
    rows = _Params(*(_per_row(v, B, dtype, logits.device) for v, dtype in zip(params, dtypes)))
    greedy = rows.greedy[:, None] != 0                              # (B, 1)
    z = logits.float() * rows.inv_temperature[:, None]              # (B, V) fp32
    m = z.amax(dim=-1, keepdim=True)                                # (B, 1)
    w = torch.exp(z - m)                                            # (B, V) unnormalised p
    s = w.sum(dim=-1, keepdim=True)                                 # (B, 1)
    kept = (z >= _kept_threshold(z, m, s, rows, top_k, top_p)) | greedy  # (B, V)
    index = torch.arange(V, dtype=torch.int32, device=z.device)
    # greedy: no noise
    race = torch.where(greedy, z, z - _log_exponential_noise(_row_keys(seeds), index))
    tokens = torch.where(kept, race, float("-inf")).argmax(dim=-1)  # (B,) first index on ties
    z_token = z.gather(1, tokens[:, None])                          # (B, 1)
    logprobs_untruncated = z_token - m - s.log()
    logprobs = z_token - m - torch.where(kept, w, 0.0).sum(dim=-1, keepdim=True).log()
    zero = torch.zeros_like(logprobs)
    return Sampled(tokens, torch.where(greedy, zero, logprobs).squeeze(1),
                   torch.where(greedy, zero, logprobs_untruncated).squeeze(1))


def _plain(params):
    """Every row samples from softmax(logits / T) untruncated (Python numbers, T > 0, no top-k,
    top-p or min-p): what the online loop samples with."""
    return (not any(isinstance(v, torch.Tensor) for v in params) and not params.greedy
            and params.top_k == 0 and params.top_p >= 1 and params.log_min_p == float("-inf"))


def _sample_plain_torch(logits, inv_temperature, seeds):
    """_sample_torch when nothing is truncated: the same race on the same noise, so the same tokens,
    without the kept-set mask and the passes over (B, V) that build and apply it; q = p, so both
    log-probs are log p(token). On a CPU (2 cores, B = 32, V = 49152): 14.6 vs 26 ms a call."""
    B, V = logits.shape
    z = logits.float()
    if inv_temperature != 1.0:
        # (B, V) fp32, the same bits as above
        z = z * inv_temperature
    m = z.amax(dim=-1, keepdim=True)                                # (B, 1)
    log_s = (z - m).exp_().sum(dim=-1, keepdim=True).log_()         # (B, 1)
    index = torch.arange(V, dtype=torch.int32, device=z.device)
    # z - log E, as z - noise above
    race = _log_exponential_noise(_row_keys(seeds), index).neg_().add_(z)
    tokens = race.argmax(dim=-1)                                    # (B,) first index on ties
    logprobs = (z.gather(1, tokens[:, None]) - m - log_s).squeeze(1)
    return Sampled(tokens, logprobs, logprobs.clone())


# ----------------------------------------------------------------------------------------------
# Public entry points and the implementation switch.

def resolve_impl(logits, impl=None):
    """Which implementation sample runs for these logits: impl= wins, then $RLHF_KERNELS, then
    "auto"."""
    if impl is None:
        impl = os.environ.get("RLHF_KERNELS", "auto")
        # e.g. "chunked" is meant for rlhf_kernels/logprob.py
        impl = impl if impl in IMPLEMENTATIONS else "auto"
    assert impl in IMPLEMENTATIONS, \
        f"unknown implementation {impl!r}, expected one of {IMPLEMENTATIONS}"
    if impl == "auto":
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        impl = "triton" if HAS_TRITON and (logits.is_cuda or interpreted) else "torch"
    # no memory for a kernel to read (memory_trace.py): the twin's shapes
    if impl == "triton" and is_fake(logits):
        impl = "torch"
    return impl


@torch.no_grad()
def sample(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None, impl=None):
    """Sample one token per row of logits (B, V) (fp32, bf16 or fp16; computed in fp32).

    temperature (0 = greedy), top_k (0 = off), top_p (1 = off), min_p (0 = off): Python numbers or
    (B,) tensors, one value per row. seeds: (B,) int64, one random stream per row, or None (see the
    module docstring for what "kept set", ties and seeds mean exactly). impl: "auto" | "triton" |
    "torch"; default $RLHF_KERNELS or "auto". Returns Sampled(tokens, logprobs,
    logprobs_untruncated), each (B,).
    """
    params = _params(logits, temperature, top_k, top_p, min_p)
    # drawn even when unused: the same global stream
    seeds = _seeds(seeds, logits.shape[0], logits.device)
    if not isinstance(temperature, torch.Tensor) and temperature == 0:
        return _greedy(logits)
    if resolve_impl(logits, impl) == "torch":
        return _sample_torch(logits, params, seeds, top_k, top_p)
    return first_use_fallback("rlhf_kernels.sampling (Triton)",
                              lambda: _sample_triton(logits, params, seeds),
                              lambda: _sample_torch(logits, params, seeds, top_k, top_p))


def _greedy(logits):
    """Temperature 0 for every row, known on the host: the argmax (first index on ties), which is
    what the race picks with no noise, without making the noise of B × V entries it would throw
    away. Log-probs are 0, as for the race's greedy rows."""
    tokens = logits.float().argmax(dim=-1)                          # (B,)
    zero = torch.zeros(tokens.shape, device=logits.device)
    return Sampled(tokens, zero, zero.clone())


def sample_reference(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None):
    """The plain PyTorch twin of sample: same arguments, same noise, same results."""
    return sample(logits, temperature, top_k, top_p, min_p, seeds, impl="torch")


# ----------------------------------------------------------------------------------------------
# Triton: one program per row, walking the row in BLOCK_V tiles (see the module docstring, steps
# 1-3).

if HAS_TRITON:

    @triton.jit
    # x: uint32. The same hash as _mix32 (here ">>" on uint32 is already logical).
    def _mix32_triton(x):
        x = x ^ (x >> 16)
        x = x * 0x21F0AAAD
        x = x ^ (x >> 15)
        x = x * 0x735A2D97
        return x ^ (x >> 15)

    @triton.jit
    def _race_keys_triton(z, index, key_a, key_b):
        """z - log E for token ids `index`: the race keys, op for op as in
        _log_exponential_noise."""
        h = _mix32_triton(_mix32_triton(index.to(tl.uint32) ^ key_a) ^ key_b)
        u = (h >> 1).to(tl.int32).to(tl.float32)
        u = tl.minimum((u + 0.5) * 4.656612873077393e-10, 0.99999994)  # 2^-31 and 1 - 2^-24
        series = u * (1.0 + u * (0.5 + u * (0.3333333333333333 + u * 0.25)))
        e = tl.where(u < 0.0078125, series, -tl.log(1.0 - u))
        return z - tl.log(e)

    @triton.jit
    def _row_keys_triton(seed):  # int64 seed -> the two uint32 keys of _row_keys
        seed = seed.to(tl.uint64, bitcast=True)
        low = (seed & 0xFFFFFFFF).to(tl.uint32)
        high = (seed >> 32).to(tl.uint32)
        key_a = _mix32_triton(low ^ _mix32_triton(high ^ 0x2545F491))
        return key_a, _mix32_triton(high ^ _mix32_triton(key_a ^ 0x68E31DA4))

    # a value of 1 must not become a compile-time constant
    @triton.jit(do_not_specialize=["greedy", "top_k"])
    def _sample_kernel(
        # (B, V) logits, any float dtype, unit column stride
        logits_ptr, logits_row_stride, V,
        seeds_ptr,                                   # (B,) int64 per-row seeds
        # 1/T, T == 0, k (0 off), top_p (1 off), log min_p
        inv_temperature, greedy, top_k, top_p, log_min_p,
        # (-inf off): numbers shared by all rows, or with PER_ROW pointers to (B,) fp32, int8,
        # int32, fp32, fp32
        candidate_value_ptr, candidate_index_ptr,    # (B, CANDIDATES) fp32 / int32 scratch
        tokens_ptr, logprobs_ptr, logprobs_untruncated_ptr,  # (B,) outputs
        PER_ROW: tl.constexpr, BLOCK_V: tl.constexpr, NUM_PIVOTS: tl.constexpr,
                       CANDIDATES: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * logits_row_stride
        lanes = tl.arange(0, BLOCK_V)                                  # (BLOCK_V,)
        if PER_ROW:
            inv_temperature = tl.load(inv_temperature + row)
            greedy = tl.load(greedy + row)
            top_k = tl.load(top_k + row)
            top_p = tl.load(top_p + row)
            log_min_p = tl.load(log_min_p + row)
        is_greedy = greedy != 0
        truncating = ((((top_k > 0) & (top_k < V)) | (top_p < 1.0) | (log_min_p > float("-inf")))
                      & (greedy == 0))
        plain = (greedy == 0) & (not truncating)  # the race over all tokens in step 1 is the answer
        key_a, key_b = _row_keys_triton(tl.load(seeds_ptr + row))

        # ---- 1. max m, sum s of exp(z - m) (online), smallest finite z, finite count; the argmax
        # of z (greedy) or of the race keys (plain sampling; truncating rows race in step 3
        # instead).
        m = -3.4028234663852886e38  # -FLT_MAX, not -inf: exp(m - m_new) stays 0 or 1, never NaN
        s = 0.0
        z_min = float("inf")
        n_finite = 0
        best_key = float("-inf")
        best_index = 0
        for start in range(0, V, BLOCK_V):
            index = start + lanes
            z = tl.load(row_ptr + index, mask=index < V,
                        other=float("-inf")).to(tl.float32) * inv_temperature
            m_new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
            finite = z > float("-inf")
            z_min = tl.minimum(z_min, tl.min(tl.where(finite, z, float("inf")), 0))
            n_finite += tl.sum(finite.to(tl.int32), 0)
            key = z
            if plain:  # a branch, not a where: greedy and truncating rows skip the hashing work
                key = _race_keys_triton(z, index, key_a, key_b)  # -inf where z = -inf
            tile_best = tl.max(key, 0)
            # strict: an earlier tile wins ties (lowest id, like torch.argmax)
            better = tile_best > best_key
            best_index = tl.where(better, start + tl.argmax(key, 0), best_index)
            best_key = tl.where(better, tile_best, best_key)
        log_s = tl.log(s)

        t_min = m + log_min_p    # min-p cut (-inf when off)
        k_on = (top_k > 0) & (top_k < V)
        p_on = top_p < 1.0
        token = best_index
        kept_log_mass = log_s  # log sum over the kept set of exp(z - m)
        if truncating:
            # ---- 2. Search for the cut t. "v >= t" for any value v <=> keeps(v) below, monotone
            # in v. Bracket invariant: keeps(hi) and not keeps(lo), so lo < t <= first token value
            # >= hi. count_lo / count_hi = count{z > lo} / count{z > hi}; mass_hi = mass{z > hi}.
            # low_value <= every token value in the bracket <= high_value (bounds measured a pass
            # ago).
            target = tl.where(p_on, top_p * s, float("inf"))  # mass{z > v} must stay below this
            k_limit = tl.where(k_on, top_k, V + 1)              # count{z > v} must stay below this
            lo = float("-inf")
            hi = m
            count_lo = n_finite
            count_hi = 0
            mass_hi = 0.0
            low_value = z_min
            high_value = m
            # (P,) 0, 1/P, ..., (P-1)/P
            fraction = tl.arange(0, NUM_PIVOTS).to(tl.float32) / NUM_PIVOTS
            # Termination: the pivots span [low_value, high_value], so each pass shrinks that range
            # ~P-fold (or ends the loop) until neighbouring floats stop it. There, pivot 0 =
            # low_value, which is a token value whenever lo did not move in the pass before, either
            # becomes hi (one value left: the loop stops) or becomes lo (that value leaves the
            # bracket). A bracket may also end up empty (hi below every token above lo): then every
            # token above lo is kept, which step 3 handles as is.
            while (count_lo - count_hi > CANDIDATES) & (low_value < high_value):
                pivots = low_value + (high_value - low_value) * fraction  # (P,)
                count_gt = tl.zeros((NUM_PIVOTS,), tl.int32)
                mass_gt = tl.zeros((NUM_PIVOTS,), tl.float32)
                bracket_min = float("inf")
                bracket_max = float("-inf")
                for start in range(0, V, BLOCK_V):
                    index = start + lanes
                    z = tl.load(row_ptr + index, mask=index < V,
                                other=float("-inf")).to(tl.float32) * inv_temperature
                    above = z[:, None] > pivots[None, :]                            # (BLOCK_V, P)
                    count_gt += tl.sum(above.to(tl.int32), 0)
                    mass_gt += tl.sum(tl.where(above, tl.exp(z - m)[:, None], 0.0), 0)
                    inside = (z > lo) & (z <= hi)
                    bracket_min = tl.minimum(bracket_min,
                                             tl.min(tl.where(inside, z, float("inf")), 0))
                    bracket_max = tl.maximum(bracket_max,
                                             tl.max(tl.where(inside, z, float("-inf")), 0))
                # Sums of non-negative terms round monotonically, so keeps is monotone in the pivot
                # even in fp32: every failing pivot lies below every passing one.
                keeps = (pivots >= t_min) & (count_gt < k_limit) & (mass_gt < target)
                any_fail = tl.max((~keeps).to(tl.int32), 0) > 0
                any_keep = tl.max(keeps.to(tl.int32), 0) > 0
                lo = tl.where(any_fail, tl.max(tl.where(keeps, float("-inf"), pivots), 0), lo)
                count_lo = tl.where(any_fail, tl.min(tl.where(keeps, 2147483647, count_gt), 0),
                                    count_lo)
                hi = tl.where(any_keep, tl.min(tl.where(keeps, pivots, float("inf")), 0), hi)
                count_hi = tl.where(any_keep, tl.max(tl.where(keeps, count_gt, -1), 0), count_hi)
                mass_hi = tl.where(any_keep, tl.max(tl.where(keeps, mass_gt, -1.0), 0), mass_hi)
                low_value = tl.maximum(bracket_min, lo)
                high_value = tl.minimum(bracket_max, hi)

            # ---- 3. Race above the bracket (all kept); race, mass and min inside it; compact it
            # to the buffer.
            buffer_offset = row * CANDIDATES
            n_inside = 0
            above_key = float("-inf")
            above_index = 0
            inside_key = float("-inf")
            inside_index = 0
            inside_mass = 0.0
            inside_min = float("inf")
            for start in range(0, V, BLOCK_V):
                index = start + lanes
                z = tl.load(row_ptr + index, mask=index < V,
                            other=float("-inf")).to(tl.float32) * inv_temperature
                key = _race_keys_triton(z, index, key_a, key_b)
                above = z > hi
                inside = (z > lo) & (z <= hi)
                key_above = tl.where(above, key, float("-inf"))
                better = tl.max(key_above, 0) > above_key
                above_index = tl.where(better, start + tl.argmax(key_above, 0), above_index)
                above_key = tl.where(better, tl.max(key_above, 0), above_key)
                key_inside = tl.where(inside, key, float("-inf"))
                better = tl.max(key_inside, 0) > inside_key
                inside_index = tl.where(better, start + tl.argmax(key_inside, 0), inside_index)
                inside_key = tl.where(better, tl.max(key_inside, 0), inside_key)
                inside_mass += tl.sum(tl.where(inside, tl.exp(z - m), 0.0), 0)
                inside_min = tl.minimum(inside_min, tl.min(tl.where(inside, z, float("inf")), 0))
                # Append this tile's bracket tokens in id order: slot = tokens before it + rank
                # within the tile.
                slot = n_inside + tl.cumsum(inside.to(tl.int32), 0) - 1
                write = inside & (slot < CANDIDATES)
                tl.store(candidate_value_ptr + buffer_offset + slot, z, mask=write)
                tl.store(candidate_index_ptr + buffer_offset + slot, index, mask=write)
                n_inside += tl.sum(inside.to(tl.int32), 0)
            tl.debug_barrier()  # the buffer was written by other threads of this program

            # The cut, from the buffer sorted by decreasing z: the first position where the running
            # count (count_hi + position + 1) reaches k or the running mass (mass_hi + ...) reaches
            # top_p * s. When the bracket overflowed the buffer it holds a single value, and any
            # CANDIDATES copies of it give the same answer.
            slots = tl.arange(0, CANDIDATES)                                # (C,)
            valid = slots < n_inside
            values = tl.load(candidate_value_ptr + buffer_offset + slots, mask=valid,
                             other=float("-inf"))
            indices = tl.load(candidate_index_ptr + buffer_offset + slots, mask=valid, other=0)
            # (C,), -inf padding last
            ordered = tl.sort(values, descending=True)
            ordered_mass = mass_hi + tl.cumsum(tl.exp(ordered - m), 0)
            reached = (count_hi + slots + 1 >= k_limit) | (ordered_mass >= target)
            first = tl.min(tl.where(reached & valid, slots, CANDIDATES), 0)
            # -inf if never reached
            cut = tl.max(tl.where(slots == first, ordered, float("-inf")), 0)
            threshold = tl.maximum(cut, t_min)

            # Kept inside the bracket: all of it (use the pass's race and mass) or the buffered
            # tokens >= t.
            whole_bracket = threshold <= inside_min
            from_buffer = valid & (values >= threshold)
            buffer_keys = tl.where(from_buffer, _race_keys_triton(values, indices, key_a, key_b),
                                   float("-inf"))
            # lowest slot on ties = lowest id (buffer is in id order)
            buffer_best = tl.argmax(buffer_keys, 0)
            buffer_index = tl.sum(tl.where(slots == buffer_best, indices, 0), 0)
            buffer_mass = tl.sum(tl.where(from_buffer, tl.exp(values - m), 0.0), 0)
            inside_key = tl.where(whole_bracket, inside_key, tl.max(buffer_keys, 0))
            inside_index = tl.where(whole_bracket, inside_index, buffer_index)
            inside_mass = tl.where(whole_bracket, inside_mass, buffer_mass)
            take_above = ((above_key > inside_key)
                          | ((above_key == inside_key) & (above_index < inside_index)))
            token = tl.where(take_above, above_index, inside_index)
            kept_log_mass = tl.log(mass_hi + inside_mass)

        z_token = tl.load(row_ptr + token).to(tl.float32) * inv_temperature
        tl.store(tokens_ptr + row, token.to(tl.int64))
        tl.store(logprobs_ptr + row, tl.where(is_greedy, 0.0, z_token - m - kept_log_mass))
        tl.store(logprobs_untruncated_ptr + row, tl.where(is_greedy, 0.0, z_token - m - log_s))


def _sample_triton(logits, params, seeds):
    assert HAS_TRITON, "impl='triton' needs the triton package"
    B, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    device = logits.device
    tokens = torch.empty(B, dtype=torch.int64, device=device)
    logprobs = torch.empty(B, dtype=torch.float32, device=device)
    logprobs_untruncated = torch.empty(B, dtype=torch.float32, device=device)
    # Scratch for step 3 (2 MB at B = 256); from the caching allocator, so no sync and CUDA-graph
    # safe.
    candidate_values = torch.empty(B, _CANDIDATES, dtype=torch.float32, device=device)
    candidate_indices = torch.empty(B, _CANDIDATES, dtype=torch.int32, device=device)
    block_v = max(16, min(_MAX_BLOCK_V, triton.next_power_of_2(V)))
    # With scalar parameters this is the only launch: no small tensors to build first (each would
    # cost a launch, ~5 us, as much as the whole kernel at batch 1).
    _sample_kernel[(B,)](
        logits, logits.stride(0), V, seeds, *params,
        candidate_values, candidate_indices, tokens, logprobs, logprobs_untruncated,
        PER_ROW=isinstance(params.top_k, torch.Tensor), BLOCK_V=block_v, NUM_PIVOTS=_NUM_PIVOTS,
        CANDIDATES=_CANDIDATES, num_warps=_NUM_WARPS)
    return Sampled(tokens, logprobs, logprobs_untruncated)


# ----------------------------------------------------------------------------------------------
# Benchmark: V = 128256 (Llama-3), fp32 logits, batch 1 / 64 / 256, against the usual PyTorch
# recipes.

def _sort_top_p_baseline(logits, temperature, top_p):
    """What most RLHF code does for nucleus sampling (HF's TopPLogitsWarper + multinomial)."""
    probs_sorted, order = torch.softmax(logits / temperature, dim=-1).sort(dim=-1, descending=True)
    # mass before the token already >= top_p
    drop = probs_sorted.cumsum(dim=-1) - probs_sorted >= top_p
    probs_sorted = probs_sorted.masked_fill(drop, 0.0)
    choice = torch.multinomial(probs_sorted / probs_sorted.sum(dim=-1, keepdim=True), 1)
    return order.gather(1, choice).squeeze(1)


def _multinomial_baseline(logits, temperature):
    return torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1).squeeze(1)


def bench(args):
    global _MAX_BLOCK_V, _NUM_WARPS
    if args.cpu:
        return _cpu_bench(args)
    if not torch.cuda.is_available():
        print("--bench needs a CUDA GPU (it times the Triton kernel against sort-based top-p and "
              "torch.multinomial); none is visible here. `--bench --cpu` times the PyTorch path on "
              "this CPU.")
        return 0
    _MAX_BLOCK_V, _NUM_WARPS = args.block_v, args.num_warps
    import triton.testing
    device, V = torch.device("cuda"), args.vocab
    print(f"sampling, V={V}, fp32 logits, {torch.cuda.get_device_name()}; "
          f"median ms (CUDA events, do_bench); tiles of {_MAX_BLOCK_V}, {_NUM_WARPS} warps")
    print(f"logits ~ N(0, {args.logit_std}^2) (LM-like: a nucleus of a few hundred tokens at "
          "T=0.7, p=0.9); 'flat' = N(0, 1): a nucleus of ~45% of the vocabulary")
    print(f"{'batch':>5} {'case':>24} {'ours':>8} {'sort top-p':>11} {'multinomial':>12} "
          f"{'vs sort':>8} {'vs multi':>9} {'tokens = ref':>13} {'max |dlogq|':>12}")
    cases = [("plain, T=0.7", dict(temperature=0.7), args.logit_std),
             ("top-k 50, T=0.7", dict(temperature=0.7, top_k=50), args.logit_std),
             ("top-p 0.9, T=0.7", dict(temperature=0.7, top_p=0.9), args.logit_std),
             ("top-p 0.9, T=0.7, flat", dict(temperature=0.7, top_p=0.9), 1.0)]
    for B in args.batch:
        generator = torch.Generator(device=device).manual_seed(0)
        seeds = torch.randint(0, 2**62, (B,), device=device, generator=generator)
        for name, params, std in cases:
            logits = std * torch.randn(B, V, device=device, generator=generator)

            def timed(fn):
                return triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms,
                                               return_mode="median")

            ours = timed(lambda: sample(logits, seeds=seeds, impl="triton", **params))
            sort_ms = timed(lambda: _sort_top_p_baseline(logits, 0.7, 0.9))
            multi_ms = timed(lambda: _multinomial_baseline(logits, 0.7))
            got = sample(logits, seeds=seeds, impl="triton", **params)
            want = sample(logits, seeds=seeds, impl="torch", **params)
            agree = (got.tokens == want.tokens).float().mean().item()
            same = got.tokens == want.tokens
            dlogq = ((got.logprobs - want.logprobs)[same].abs().max().item() if same.any()
                     else float("nan"))
            print(f"{B:>5} {name:>24} {ours:8.3f} {sort_ms:11.3f} {multi_ms:12.3f} "
                  f"{sort_ms / ours:7.1f}x {multi_ms / ours:8.1f}x {agree:13.4f} {dlogq:12.1e}")
    return 0


def _cpu_bench(args):
    """The PyTorch path on this machine's CPU (what CI and CPU runs use), at B = 64, V = 50000."""
    torch.manual_seed(0)
    B, V = 64, 50000
    logits = 3.0 * torch.randn(B, V)
    seeds = torch.arange(B, dtype=torch.int64)
    print(f"PyTorch path on the CPU ({torch.get_num_threads()} threads), B={B}, V={V}, fp32")
    for name, params in [("plain", dict(temperature=0.7)),
                         ("top-k 50", dict(temperature=0.7, top_k=50)),
                         ("top-p 0.9", dict(temperature=0.7, top_p=0.9))]:
        sample(logits, seeds=seeds, impl="torch", **params)
        t0 = time.perf_counter()
        for _ in range(3):
            sample(logits, seeds=seeds, impl="torch", **params)
        print(f"{name:>10}: {(time.perf_counter() - t0) / 3 * 1e3:7.1f} ms")
    t0 = time.perf_counter()
    for _ in range(3):
        _multinomial_baseline(logits, 0.7)
    print(f"{'torch.multinomial':>10}: {(time.perf_counter() - t0) / 3 * 1e3:7.1f} ms")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="Top-k / top-p / min-p sampling kernel: benchmark.")
    parser.add_argument("--bench", action="store_true",
                        help="time ours against sort-based top-p and torch.multinomial (CUDA)")
    parser.add_argument("--cpu", action="store_true",
                        help="with --bench: time the PyTorch path on the CPU instead")
    parser.add_argument("--vocab", type=int, default=128256,
                        help="V, vocabulary size (Llama-3: 128256)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256],
                        help="batch sizes to time")
    parser.add_argument("--logit-std", type=float, default=3.0,
                        help="std of the synthetic logits for the LM-like cases")
    parser.add_argument("--block-v", type=int, default=_MAX_BLOCK_V,
                        help="Triton tile width (a power of two)")
    parser.add_argument("--num-warps", type=int, default=_NUM_WARPS,
                        help="Triton warps per row program")
    parser.add_argument("--warmup-ms", type=int, default=100,
                        help="do_bench warm-up time per measurement (ms)")
    parser.add_argument("--rep-ms", type=int, default=500,
                        help="do_bench measuring time per measurement (ms)")
    args = parser.parse_args()
    if not args.bench:
        parser.print_help()
        sys.exit(0)
    sys.exit(bench(args))
