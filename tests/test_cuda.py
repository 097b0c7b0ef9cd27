"""The checks to run on a GPU: every Triton kernel = its PyTorch twin, cached decode in bf16 = the
full forward, FlexAttention = the per-document twin, the engine's tokens on the GPU = its tokens on
the CPU.

    # on a GPU node: these, the benchmarks, one log
    bash tools/gpu_check.sh
    # these alone, with compiled Triton kernels
    TRITON_INTERPRET=0 python -m pytest -q tests/test_cuda.py -rs
    # on a CPU: the tiny variants (and the dry run)
    python -m pytest -q tests/test_cuda.py

Each check is one function of `device`, run on "cuda" (skipped without a GPU) and on "cpu" at tiny
shapes, so the normal suite keeps the checks themselves working. Triton runs compiled on a GPU and
interpreted on a CPU (TRITON_INTERPRET=1, set by conftest.py); a combination that would test
something else is skipped with the reason (e.g. the interpreter on a GPU). A fast path that falls
back to its twin (rlhf_kernels.first_use_fallback) fails the check: a silent fallback would compare
the twin with itself.

Test data is fixed on the CPU and then moved to the device, and every check that needs the two sides
to make the same discrete choice (a sampled token, an argmax) first proves on the CPU that the
choice is not decided within rounding: the top-p / min-p cuts
(tests.test_kernels_sampling.exact_truncated) and the race between the best two tokens. A failure on
the GPU is then a real difference, not a coin flip.
"""
import copy
import os
import subprocess
import sys
import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import generate
import rlhf_kernels
import rlhf_kernels.logprob as logprob
import rlhf_kernels.sampling as sampling
import model as model_module
from rlhf_kernels.logprob import token_logprobs, token_logprobs_reference
from rlhf_kernels.sampling import Sampled, sample, sample_reference
from model import (AttentionInputs, KVCache, Transformer, document_segments, packed_attention,
                   packed_attention_twin)
from tests.helpers import ROOT, tiny_config
from tests.test_kernels_logprob import IGNORE, logps_and_grads, make_inputs
from tests.test_kernels_sampling import exact_truncated

HAS_CUDA = torch.cuda.is_available()
# read once: Triton decides it when the kernels are defined
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# The CPU variants run inside `tools/gpu_check.sh --dry-run` (GPU_CHECK_DRY_RUN=1), which the suite
# runs once (test_gpu_check_dry_run_writes_every_section): not a second time on their own.
IN_DRY_RUN = os.environ.get("GPU_CHECK_DRY_RUN") == "1"
DEVICES = [pytest.param("cpu",
                        marks=pytest.mark.skipif(not IN_DRY_RUN,
                                                 reason="run by tools/gpu_check.sh --dry-run "
                                                        "(test_gpu_check_dry_run_writes_every_section)")),
           pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"))]


def size_for(device):
    """The shapes a check runs at: tiny on the CPU (the normal suite), larger on a GPU."""
    return "tiny" if device == "cpu" else "gpu"


def require_triton(device):
    """Skip unless Triton runs for real on `device`: compiled on a GPU, interpreted on a CPU."""
    if not logprob.HAS_TRITON:
        pytest.skip("triton is not installed")
    if device == "cuda" and INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 would interpret the kernels on the GPU too: run with "
                    "TRITON_INTERPRET=0 "
                    "(tools/gpu_check.sh does) to test the compiled kernels")
    if device == "cpu" and not INTERPRETED:
        pytest.skip("Triton runs on a CPU only under TRITON_INTERPRET=1 (conftest.py sets it)")


@contextmanager
def fast_path(prefix):
    """The block must run the fast paths whose first_use_fallback names start with `prefix` (a
    Triton kernel, compiled FlexAttention), not their PyTorch twins. Fails with the fallback's own
    message if one gives up."""
    already = sorted(name for name in rlhf_kernels._broken if name.startswith(prefix))
    assert not already, f"{already} fell back to the PyTorch twin earlier in this process"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    fallbacks = [str(w.message) for w in caught if "failed on first use" in str(w.message)]
    assert not fallbacks, "\n".join(fallbacks)
    assert not any(name.startswith(prefix)
                   for name in rlhf_kernels._broken), sorted(rlhf_kernels._broken)


@contextmanager
def kernels_env(value):
    """$RLHF_KERNELS = value inside the block (None: unset), as it was after."""
    before = os.environ.pop("RLHF_KERNELS", None)
    if value is not None:
        os.environ["RLHF_KERNELS"] = value
    try:
        yield
    finally:
        os.environ.pop("RLHF_KERNELS", None)
        if before is not None:
            os.environ["RLHF_KERNELS"] = before


def relative_error(actual, expected):
    """max |actual - expected| / max |expected|, in fp32."""
    actual, expected = actual.float(), expected.float()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12))


# ----------------------------------------------------------------------------------------------
# rlhf_kernels/logprob.py: Triton = the fp32 reference, forward and both gradients.

# (N, V, H, vocab chunk sizes): odd shapes; on a GPU also one with many 1024-wide tiles and 8 chunks
# (the last partial).
LOGPROB_SHAPES = {"tiny": [(47, 123, 32, (None, 48))],
                  "gpu": [(47, 123, 32, (None, 48)), (1031, 32003, 256, (None, 4096))]}
# (atol, rtol) for logp, and for the gradients divided by their largest entry. CPU: as
# tests/test_kernels_logprob.py. GPU: cuBLAS sums in its own order (fp32 logits, ~1e-6 relative);
# bf16 gradients round G and the result to bf16 (~6e-3 of the largest entry, bf16 epsilon 3.9e-3).
LOGPROB_TOLERANCES = {
    ("cpu", torch.float32): ((1e-5, 1e-5), (5e-6, 1e-4)),
                      ("cpu", torch.bfloat16): ((1e-5, 1e-5), (1e-2, 2e-2)),
    ("cuda", torch.float32): ((1e-4, 1e-4), (2e-5, 1e-3)),
                      ("cuda", torch.bfloat16): ((1e-4, 1e-4), (1e-2, 2e-2)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_logprob_triton_equals_reference(device, dtype):
    require_triton(device)
    check_logprob(device, dtype, size_for(device))


def check_logprob(device, dtype, size, impl="triton"):
    logp_tolerance, grad_tolerance = LOGPROB_TOLERANCES[device, dtype]
    if (device == "cuda" and dtype == torch.bfloat16
            and not logprob._cuda_fp32_output("mm", torch.device(device), dtype)):
        # PyTorch < 2.8: the logits are rounded to bf16 once (see _cuda_fp32_output)
        logp_tolerance = (5e-2, 1e-2)
    for N, V, H, chunk_sizes in LOGPROB_SHAPES[size]:
        # logit_scale keeps the logits' std ~1.7 at any H; a quarter of the targets ignored, mixed
        # in.
        inputs = make_inputs(N=N, V=V, H=H, dtype=dtype, logit_scale=(32 / H) ** 0.5, seed=N)
        hidden, weight, targets, grad_output = (x.to(device) for x in inputs)
        # from the CPU copy: what a caller knows on the host
        num_valid = int((inputs[2] != IGNORE).sum())
        assert 0 < num_valid < N
        expected = logps_and_grads(token_logprobs_reference, hidden, weight, targets, grad_output,
                                   temperature=0.7)
        for chunk in chunk_sizes:
            for given in (num_valid, None):
                case = f"N={N} V={V} H={H} {dtype} chunk={chunk} num_valid={given}"
                with fast_path("rlhf_kernels.logprob"):
                    actual = logps_and_grads(token_logprobs, hidden, weight, targets, grad_output,
                                             temperature=0.7,
                                             impl=impl, vocab_chunk_size=chunk, num_valid=given)
                for name, a, e in zip(("logp", "grad_hidden", "grad_weight"), actual, expected):
                    scale = 1.0 if name == "logp" else max(float(e.abs().max()), 1e-6)
                    atol, rtol = logp_tolerance if name == "logp" else grad_tolerance
                    torch.testing.assert_close(a / scale, e / scale, atol=atol, rtol=rtol,
                                               msg=lambda m: f"{case} {name}: {m}")
                ignored = targets == IGNORE
                assert (actual[0][ignored] == 0).all() and (actual[1][ignored] == 0).all(), \
                    f"{case}: ignored rows"


# ----------------------------------------------------------------------------------------------
# rlhf_kernels/sampling.py: Triton = the PyTorch twin, token for token with the same seeds.

SAMPLING_SETTINGS = {  # name: (temperature, top_k, top_p, min_p)
    "greedy": (0.0, 0, 1.0, 0.0),
    "temperature": (0.7, 0, 1.0, 0.0),
    "top-k": (0.7, 50, 1.0, 0.0),
    "top-p": (0.7, 0, 0.9, 0.0),
    "min-p": (1.0, 0, 1.0, 0.05),
    "joint": (0.8, 20, 0.8, 0.05),
}


def sampling_cases(size):
    """(name, logits (B, V) on the CPU, parameters). Gaussian logits of std 3 (LM-like: at T = 0.7,
    top-p 0.9 keeps a few hundred of 32k tokens). The CPU's are tiny: the interpreter costs ~0.1 s a
    row."""
    generator = torch.Generator().manual_seed(0)
    if size == "tiny":
        shapes = [(4, 123, torch.float32)]
    else:  # V < one tile; many tiles; Llama-3's vocabulary in bf16
        shapes = [(8, 123, torch.float32), (8, 32003, torch.float32), (4, 128256, torch.bfloat16)]
    cases = []
    for B, V, dtype in shapes:
        logits = (3.0 * torch.randn(B, V, generator=generator)).to(dtype)
        for name, (temperature, top_k, top_p, min_p) in SAMPLING_SETTINGS.items():
            top_k = min(top_k, V // 4)
            cases.append((f"{name} B={B} V={V} {dtype}", logits,
                          dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)))
        per_row = dict(temperature=torch.tensor([0.7, 0.0, 1.3, 1.0] * (B // 4)),
                       top_k=torch.tensor([0, 3, 10, 0] * (B // 4)),
                       top_p=torch.tensor([0.9, 1.0, 0.5, 0.95] * (B // 4)),
                       min_p=torch.tensor([0.0, 0.1, 0.0, 0.05] * (B // 4)))
        cases.append((f"per-row B={B} V={V} {dtype}", logits, per_row))
    return cases


def race_margin(logits, kept, temperature, seeds):
    """The smallest gap, over the rows that sample, between the best and second-best race key z -
    log E among the kept tokens: how far the draw is from being decided by rounding. kept: (B, V)
    bool; temperature: a number or (B,) tensor; seeds (B,) int64. inf when no row samples or keeps
    two tokens."""
    B, V = logits.shape
    temperature = torch.as_tensor(temperature, dtype=torch.float32).expand(B)
    sampled = temperature > 0
    if not sampled.any():
        return float("inf")
    z = logits.float() * (1.0 / temperature[:, None].clamp(min=1e-6))                  # (B, V)
    noise = sampling._log_exponential_noise(sampling._row_keys(seeds),
                                            torch.arange(V, dtype=torch.int32))
    # (rows sampled, V)
    keys = torch.where(kept, z - noise, float("-inf"))[sampled]
    best_two = keys.topk(min(2, V), dim=-1).values
    gaps = best_two[:, 0] - best_two[:, -1]
    return (float(gaps[best_two[:, -1] > float("-inf")].min())
            if (best_two[:, -1] > float("-inf")).any() else float("inf"))


def unambiguous_rows(logits, params, seeds):
    """(B,) bool: the rows whose token no rounding can change -- every top-p / min-p cut decided by
    more than 1e-5 of probability mass, and the race won by more than 1e-4. At V = 128k the tokens
    at a top-p cut carry ~1e-5 of mass each, so a few rows in a hundred are close calls: those are
    not compared."""
    clear = []
    for b in range(logits.shape[0]):
        row_params = {k: v[b:b + 1] if isinstance(v, torch.Tensor) else v
                      for k, v in params.items()}
        q, cut_margin = exact_truncated(logits[b:b + 1], **row_params)
        race = race_margin(logits[b:b + 1], q > 0, row_params["temperature"], seeds[b:b + 1])
        clear.append(cut_margin > 1e-5 and race > 1e-4)
    return torch.tensor(clear)


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_sampling_triton_equals_reference(device, monkeypatch):
    require_triton(device)
    # under the interpreter a 1024-candidate sort costs ~1 s a row: small sizes, every branch
    if device == "cpu":
        monkeypatch.setattr(sampling, "_CANDIDATES", 16)
        monkeypatch.setattr(sampling, "_MAX_BLOCK_V", 32)
    check_sampling(device, size_for(device))


def check_sampling(device, size):
    atol = 1e-5 if device == "cpu" else 1e-4  # the GPU's exp/log are not the CPU's to the last ulp
    compared = total = 0
    for name, logits, params in sampling_cases(size):
        # wraps, some negative
        seeds = (torch.arange(logits.shape[0], dtype=torch.int64) + 11) * 0x1E3779B97F4A7C15
        clear = unambiguous_rows(logits, params, seeds)
        logits_on_device, seeds_on_device = logits.to(device), seeds.to(device)
        want = sample_reference(logits_on_device, seeds=seeds_on_device, **params)
        with fast_path("rlhf_kernels.sampling"):
            got = sample(logits_on_device, seeds=seeds_on_device, impl="triton", **params)
        got, want = (Sampled(*(x.cpu() for x in out)) for out in (got, want))
        assert torch.equal(got.tokens[clear], want.tokens[clear]), (name, got.tokens.tolist(),
                                                                    want.tokens.tolist())
        # every clear row, and the close calls that came out the same
        same = got.tokens == want.tokens
        torch.testing.assert_close(got.logprobs[same], want.logprobs[same], atol=atol, rtol=0,
                                   msg=lambda m: f"{name} logq: {m}")
        torch.testing.assert_close(got.logprobs_untruncated[same], want.logprobs_untruncated[same],
                                   atol=atol, rtol=0,
                                   msg=lambda m: f"{name} logp: {m}")
        compared, total = compared + int(clear.sum()), total + len(clear)
    assert compared >= 0.9 * total, \
        f"only {compared} of {total} rows are clear calls: the test data needs another seed"


# ----------------------------------------------------------------------------------------------
# Cached decode in bf16 = the full forward in bf16: generate.prefill of right-padded prompts, then
# decode steps at per-row positions on a prefix of the cache, as the Engine runs them.

DECODE_SHAPES = {  # model config overrides, prompt lengths, decode steps
    "tiny": (dict(), (7, 12, 3), 8),
    "gpu": (dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2), (70, 129, 5), 40),
}
# bf16 keeps 8 bits: every layer rounds its activations (~2^-9 relative each), so the cached and the
# full bf16 forward differ by a few of those roundings. Measured on a CPU at both sizes: cached vs
# full 0.7-1.5% of the largest logit; each bf16 path 1.6-4.6% from the fp32 forward of the same
# weights. The bounds: cached vs full within 5% of the largest logit, and caching adds at most 2x
# the rounding error the full bf16 forward has anyway.
DECODE_TOLERANCE = 5e-2


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_cached_decode_bf16_equals_full_forward(device):
    check_cached_decode(device, size_for(device))


def check_cached_decode(device, size):
    overrides, prompt_lengths, steps = DECODE_SHAPES[size]
    torch.manual_seed(0)
    # Weights of std 1.6 / sqrt(hidden) (0.2 at the tiny width, not 0.02): attention far from
    # uniform, so a wrong key would show, but no layer amplifies rounding errors (std 0.2 at width
    # 256 makes bf16 ~10% off fp32).
    hidden_size = overrides.get("hidden_size", 64)
    config = tiny_config(211, initializer_range=1.6 / hidden_size ** 0.5, **overrides)
    model = Transformer.from_config(config, device=device, dtype=torch.bfloat16).eval()
    model_fp32 = copy.deepcopy(model).float()  # the same (bf16-rounded) weights, computed in fp32
    generator = torch.Generator().manual_seed(1)
    B, width = len(prompt_lengths), max(prompt_lengths)
    # right padding = junk, never attended
    input_ids = torch.randint(0, 211, (B, width), generator=generator)
    continuation = torch.randint(0, 211, (B, steps), generator=generator)
    lengths = torch.tensor(prompt_lengths)
    with torch.no_grad():
        # A cache longer than needed, so that decoding reads only a prefix of it (cache_len), as the
        # Engine's does.
        max_len = generate.round_up(width + steps,
                                    generate.CACHE_LEN_STEP) + 2 * generate.CACHE_LEN_STEP
        cache = KVCache(model.config, B, max_len, device, torch.bfloat16)
        # (B, V) at each last token
        cached = [generate.prefill(model, cache, input_ids.to(device), lengths.to(device))]
        for t in range(steps):
            positions = (lengths + t).to(device)
            # as the Engine bounds it
            cache_len = generate.round_up(int(lengths.max()) + t + 1, generate.CACHE_LEN_STEP)
            cached.append(model(continuation[:, t:t + 1].to(device),
                                position_ids=positions[:, None], cache=cache,
                                cache_len=cache_len)[:, 0])
        # (B, steps + 1, V)
        cached = torch.stack(cached, dim=1)
        for row, length in enumerate(prompt_lengths):
            sequence = torch.cat([input_ids[row, :length], continuation[row]])[None].to(device)
            # the positions whose next token the cached path predicted
            window = slice(length - 1, length + steps)
            full = model(sequence)[0, window]
            full_fp32 = model_fp32(sequence)[0, window]
            error_cached, error_full = (relative_error(cached[row], full_fp32),
                                        relative_error(full, full_fp32))
            assert relative_error(cached[row], full) <= DECODE_TOLERANCE, \
                (row, relative_error(cached[row], full))
            assert error_cached <= 2 * error_full + 1e-3, \
                f"row {row}: cached {error_cached:.2e} vs full {error_full:.2e}"


# ----------------------------------------------------------------------------------------------
# FlexAttention (packed documents) = the per-document twin, forward and backward. Flex runs only on
# CUDA in model.py; on a CPU tests/test_attention.py checks its block mask with eager FlexAttention
# instead.

def packed_layout(T):
    """Two rows of T tokens: documents of odd lengths, and a padding run (-1) at the end of row
    1."""
    row0 = [0] * 37 + [1] * 200 + [2] * 100
    row1 = [0] * 300
    return torch.tensor([row0 + [3] * (T - len(row0)), row1 + [-1] * (T - len(row1))])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [None, 64])
def test_cuda_flex_packed_attention_equals_twin(device, window):
    if device == "cpu":
        pytest.skip("FlexAttention runs only on CUDA in model.py (the CPU takes the twin itself)")
    if model_module.flex_attention is None:
        pytest.skip("this torch has no FlexAttention")
    if not model_module.use_flex(torch.device(device)):
        pytest.skip("RLHF_KERNELS=torch turns FlexAttention off")
    check_flex_packed_attention(device, window)


def check_flex_packed_attention(device, window):
    T, nh, nkv, D = 384, 8, 2, 64
    document_ids = packed_layout(T)
    B = document_ids.shape[0]
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, T, D, generator=generator) for n in (nh, nkv, nkv))
    upstream = torch.randn(B, nh, T, D, generator=generator)
    segments = document_segments(document_ids)

    def run(attention, dtype):
        leaves = [x.to(device, dtype).requires_grad_() for x in (q, k, v)]
        out = attention(*leaves)
        grads = torch.autograd.grad((out.float() * upstream.to(device)).sum(), leaves)
        return [x.detach().float() for x in (out, *grads)]

    positions = torch.arange(T).expand(B, T).to(device)
    with fast_path("FlexAttention"):
        flex = run(lambda *x: packed_attention(
                       *x, AttentionInputs(positions, window=window,
                                           document_ids=document_ids.to(device))),
                   torch.bfloat16)
    # the twin's per-document attention with a window would take Flex too
    with kernels_env("torch"):
        twin = run(lambda *x: packed_attention_twin(*x, segments, window), torch.bfloat16)
        exact = run(lambda *x: packed_attention_twin(*x, segments, window), torch.float32)
    for name, f, t, e in zip(("out", "grad_q", "grad_k", "grad_v"), flex, twin, exact):
        # Flex adds no error beyond bf16 rounding: within 3x the twin's own bf16 error of the fp32
        # twin (or 1% of the largest entry, whichever is larger).
        error_flex, error_twin = relative_error(f, e), relative_error(t, e)
        assert error_flex <= max(3 * error_twin,
                                 1e-2), f"{name}: flex {error_flex:.2e} vs twin {error_twin:.2e}"
    # Teeth: without the documents (plain causal attention over the row) the second document's
    # output differs.
    offset = torch.arange(T)[:, None] - torch.arange(T)[None, :]  # query - key
    visible = ((offset >= 0) & (offset < (window or T))).to(device)
    causal = F.scaled_dot_product_attention(*(x.to(device) for x in (q, k, v)), attn_mask=visible,
                                            enable_gqa=True)
    assert (causal[0, :, 37:237].float() - exact[0][0, :, 37:237]).abs().max() > 0.1


# ----------------------------------------------------------------------------------------------
# End to end: the Engine on the device (Triton sampling, device attention) = the Engine on the CPU
# with the PyTorch twins, token for token: greedy, and seeded sampling at temperature 1.


def step_margins(cpu_model, prompt, tokens, temperature, base_seed):
    """Teacher-forced on the CPU: at every generated token, the top-2 logit gap (greedy) or the race
    margin (sampling) -- how far each choice is from a tie that rounding on another device could
    flip."""
    with torch.no_grad():
        # (steps, V)
        logits = cpu_model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1].float()
    if temperature == 0:
        best_two = logits.topk(2, dim=-1).values
        return float((best_two[:, 0] - best_two[:, 1]).min())
    steps = torch.arange(len(tokens), dtype=torch.int64)
    # as the Engine: wraps in int64
    seeds = torch.tensor(base_seed, dtype=torch.int64) + steps * generate.SEED_STRIDE
    kept = torch.ones_like(logits, dtype=torch.bool)
    return race_margin(logits, kept, temperature, seeds)


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_engine_tokens_equal_cpu(device):
    if device == "cpu" and not (logprob.HAS_TRITON and INTERPRETED):
        pytest.skip("on a CPU the check compares the interpreted Triton sampler with the twin: "
                    "needs TRITON_INTERPRET=1")
    require_triton(device)
    check_engine(device, size_for(device))


def check_engine(device, size):
    torch.manual_seed(0)
    cpu_model = Transformer.from_config(tiny_config(99, initializer_range=0.2)).eval()
    prompts = [[5, 9, 13, 2], [7, 7], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]]
    max_new_tokens = {"tiny": 6, "gpu": 40}[size]
    seeds = [[generate.sample_seed(0, p, i) for i in range(2)] for p in range(len(prompts))]

    def run(engine_model):  # 3 slots, 3 prompts x 2 samples: slots get refilled mid-run
        engine = generate.Engine(engine_model, max_batch=3, stop_ids=[])
        greedy = engine.generate(prompts, 1, max_new_tokens, temperature=0.0)
        sampled = engine.generate(prompts, 2, max_new_tokens, temperature=1.0, base_seeds=seeds)
        return greedy, sampled

    with kernels_env("torch"):  # the reference: the CPU, every kernel its PyTorch twin
        want_greedy, want_sampled = run(cpu_model)
    with kernels_env(None), fast_path("rlhf_kernels.sampling"):
        got_greedy, got_sampled = run(copy.deepcopy(cpu_model).to(device))
    for p, prompt in enumerate(prompts):
        want = want_greedy[p][0]["tokens"]
        assert step_margins(cpu_model, prompt, want, 0.0,
                            None) > 1e-4, f"prompt {p}: a near-tie argmax; pick another seed"
        assert got_greedy[p][0]["tokens"] == want, f"greedy, prompt {p}"
        for i in range(2):
            want = want_sampled[p][i]["tokens"]
            assert step_margins(cpu_model, prompt, want, 1.0,
                                seeds[p][i]) > 1e-4, f"prompt {p} sample {i}: a near-tie race"
            assert got_sampled[p][i]["tokens"] == want, f"sampled, prompt {p} sample {i}"
            torch.testing.assert_close(torch.tensor(got_sampled[p][i]["token_logprobs"]),
                                       torch.tensor(want_sampled[p][i]["token_logprobs"]),
                                       atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# tools/gpu_check.sh --dry-run: every section, on the CPU, at tiny shapes, into one log.

GPU_CHECK_SECTIONS = ("a", "b", "c1", "c2", "c3", "d")


def test_gpu_check_dry_run_writes_every_section(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPU_CHECK_LOG_DIR": str(tmp_path),
           "PYTHON": sys.executable}
    result = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                            capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    (run_dir,) = tmp_path.iterdir()  # one timestamped folder per run
    log = (run_dir / "gpu_check.log").read_text()
    for section in GPU_CHECK_SECTIONS:
        assert f"===== [{section}]" in log, f"section {section} missing from the log"
        assert (run_dir / f"{section}.log").exists(), f"no per-section log for {section}"
    assert "passed" in (run_dir / "summary.txt").read_text()
    assert "gpu_check: all sections passed" in result.stdout
