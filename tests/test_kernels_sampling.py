"""Tests of rlhf_kernels/sampling.py."""
import argparse
import math
import os
import subprocess
import sys

import pytest
import torch

import rlhf_kernels.sampling as sampling
from rlhf_kernels.sampling import sample, sample_reference
from tests.helpers import ROOT

IMPLS = ["torch",
         pytest.param("triton",
                      marks=pytest.mark.skipif(not sampling.HAS_TRITON, reason="no triton"))]


@pytest.fixture
def small_triton_sizes(monkeypatch):
    # Under the interpreter a 1024-candidate sort costs ~1 s per row; 16 keeps a row at ~0.1 s.
    monkeypatch.setattr(sampling, "_CANDIDATES", 16)
    monkeypatch.setattr(sampling, "_MAX_BLOCK_V", 32)


def tied_logits(B, V, seed, scale=2.0):
    """Logits on a 0.25 grid: ~50 distinct values over V = 123, so most tokens are tied with
    others."""
    generator = torch.Generator().manual_seed(seed)
    return torch.round(scale * 4 * torch.randn(B, V, generator=generator)) / 4


def row_seeds(n, offset=0):
    # wraps: spread, some negative
    return (torch.arange(n, dtype=torch.int64) + offset) * 0x1E3779B97F4A7C15 - 12345


def exact_truncated(logits, temperature, top_k, top_p, min_p):
    """q (B, V) float64 per the module docstring, from the same fp32 z = logits * (1/T) the samplers
    use. Also returns the margin by which the top-p and min-p cuts are decided (to reject ambiguous
    test data)."""
    B, V = logits.shape
    params = [p if isinstance(p, torch.Tensor) else torch.full((B,), p)
              for p in (temperature, top_k, top_p, min_p)]
    q, margin = torch.zeros(B, V, dtype=torch.float64), math.inf
    for b in range(B):
        T, k, p, mp = (float(x[b]) for x in params)
        if T == 0:
            q[b, int(logits[b].float().argmax())] = 1.0
            continue
        z = (logits[b].float() * (1.0 / torch.tensor(T, dtype=torch.float32))).double()
        probs = torch.softmax(z, 0)
        ordered, order = z.sort(descending=True, stable=True)
        cut = -math.inf
        if 0 < k < V:
            cut = max(cut, float(ordered[int(k) - 1]))
        if p < 1:
            running = probs[order].cumsum(0)
            first = int((running >= p).nonzero()[0])
            cut = max(cut, float(ordered[first]))
            margin = min(margin, float((running - p).abs().min()))
        if mp > 0:
            min_cut = float(ordered[0]) + math.log(mp)
            cut = max(cut, min_cut)
            margin = min(margin, float((z - min_cut).abs().min()))
        kept = z >= cut
        q[b] = torch.where(kept, probs, 0.0) / probs[kept].sum()
    return q, margin


def log_softmax_exact(logits, temperature):
    z = (logits.float() * (1.0 / torch.tensor(temperature, dtype=torch.float32))).double()
    return torch.log_softmax(z, dim=-1)


# name: (temperature, top_k, top_p, min_p), chosen so no cut is decided within fp32 rounding
SETTINGS = {
    "plain": (0.7, 0, 1.0, 0.0),
    "top-k": (1.0, 7, 1.0, 0.0),
    "top-k, tie at the cut": (1.0, 6, 1.0, 0.0),      # the 5th-7th largest are tied: 7 kept
    "top-p": (0.7, 0, 0.6, 0.0),
    # the mass reaches 0.72 inside a 3-way tie: 7 kept, not 6
    "top-p, tie at the cut": (0.7, 0, 0.72, 0.0),
    "min-p": (1.0, 0, 1.0, 0.2),
    "joint": (0.8, 20, 0.8, 0.05),
}
KEPT_IN_DISTRIBUTION_ROW = {"plain": 123, "top-k": 7, "top-k, tie at the cut": 7, "top-p": 4,
                            "top-p, tie at the cut": 7, "min-p": 7, "joint": 11}


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.usefixtures("small_triton_sizes")
def test_sampling_greedy_and_top1_are_argmax(impl):
    logits = torch.randn(5, 123, generator=torch.Generator().manual_seed(0))
    # a tie at the max: greedy takes the lowest id
    logits[2, 40] = logits[2, 90] = logits[2].max() + 1.0
    seeds = row_seeds(5)
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        # a Python 0 takes the argmax without noise; a per-row 0 goes through the kernel's noiseless
        # race
        for temperature in (0.0, torch.zeros(5)):
            # truncation is moot
            out = sample(x, temperature=temperature, top_p=0.5, top_k=3, seeds=seeds, impl=impl)
            assert torch.equal(out.tokens, x.float().argmax(dim=-1)) and out.tokens[2] == 40
            assert torch.equal(out.logprobs,
                               torch.zeros(5)) and torch.equal(out.logprobs_untruncated,
                                                               torch.zeros(5))
    untied = [0, 1, 3, 4]
    for temperature in (1.0, 0.5):
        out = sample(logits, temperature=temperature, top_k=1, seeds=seeds, impl=impl)
        assert torch.equal(out.tokens[untied], logits[untied].argmax(dim=-1))
        assert out.tokens[2] in (40, 90)  # top-k = 1 keeps both tied maxima (documented tie rule)
        assert torch.allclose(out.logprobs[untied], torch.zeros(4), atol=1e-6)
        expected = (log_softmax_exact(logits, temperature).gather(1, out.tokens[:, None])
                    .squeeze(1).float())
        assert torch.allclose(out.logprobs_untruncated, expected, atol=1e-5)


@pytest.mark.usefixtures("small_triton_sizes")
def test_sampling_top1_tie_at_the_max_is_uniform():
    """Both tied maxima are kept by top-k = 1 and drawn equally often (each ~1000 of 2000, sd
    22)."""
    logits = torch.randn(1, 123, generator=torch.Generator().manual_seed(0)).repeat(2000, 1)
    logits[:, 40] = logits[:, 90] = 10.0
    tokens = sample_reference(logits, top_k=1, seeds=row_seeds(2000)).tokens
    assert set(tokens.tolist()) == {40, 90} and abs(int((tokens == 40).sum()) - 1000) < 150


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.usefixtures("small_triton_sizes")
def test_sampling_reference_never_leaves_kept_set_and_matches_distribution(setting):
    """40000 draws from one row with many ties. Every token must have q > 0 (q from the float64
    oracle), and the counts must pass a chi-square test against q at false-alarm rate 1e-6 (bins
    with expected count < 5 merged). The seeds are fixed, so the test is deterministic; a correct
    sampler would fail it for 1 seed choice in a million. A sampler that mixed up the kept set,
    dropped ties or biased the noise by even 5% on a 1%-token fails it by a wide margin."""
    temperature, top_k, top_p, min_p = SETTINGS[setting]
    N = 40000
    row = tied_logits(1, 123, seed=1)
    q, margin = exact_truncated(row, temperature, top_k, top_p, min_p)
    assert margin > 1e-5, "test data puts a cut within rounding; pick another seed"
    tokens = sample_reference(row.expand(N, -1), temperature, top_k, top_p, min_p,
                              seeds=row_seeds(N)).tokens
    counts = torch.bincount(tokens, minlength=123).double()
    assert counts[q[0] == 0].sum() == 0, "sampled a token outside the kept set"
    expected = N * q[0]
    big = expected >= 5
    observed_bins = torch.cat([counts[big], counts[~big].sum()[None]])
    expected_bins = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected_bins > 0
    chi2 = float(((observed_bins - expected_bins)[keep] ** 2 / expected_bins[keep]).sum())
    df = int(keep.sum()) - 1
    # one-sided normal quantile for 1e-6; Wilson-Hilferty approximation of the chi-square quantile
    z = 4.753
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < critical, f"chi2 {chi2:.1f} >= {critical:.1f} with {df} degrees of freedom"
    # the oracle's tie rule, pinned down
    assert int((q[0] > 0).sum()) == KEPT_IN_DISTRIBUTION_ROW[setting]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.usefixtures("small_triton_sizes")
def test_sampling_stays_in_kept_set_with_exact_logprobs(impl):
    """Odd shapes (B=5, V=123), ties, -inf and -1e9 logits, bf16 and per-row parameters: every token
    lies in the float64 oracle's kept set, and both log-probs equal the oracle's at that token."""
    repeats = 40 if impl == "torch" else 3
    base = tied_logits(5, 123, seed=2)
    base[1, ::2] = float("-inf")  # masked tokens: never sampled, and must not break the search
    base[3, :60] = -1e9           # a huge range of values for the pivots to cut through
    cases = [(name, dict(zip(("temperature", "top_k", "top_p", "min_p"), params)), torch.float32)
             for name, params in SETTINGS.items() if name != "plain"]
    per_row = dict(temperature=torch.tensor([0.7, 0.0, 1.3, 1.0, 0.5]),
                   top_k=torch.tensor([0, 3, 10, 200, 1]),
                   top_p=torch.tensor([0.9, 1.0, 0.5, 0.3, 1.0]),
                   min_p=torch.tensor([0.0, 0.1, 0.0, 0.05, 0.5]))
    cases.append(("per-row", per_row, torch.float32))
    cases.append(("bf16 top-p", dict(temperature=1.0, top_k=0, top_p=0.75, min_p=0.0),
                  torch.bfloat16))
    for name, params, dtype in cases:
        logits = base.to(dtype).repeat(repeats, 1)
        expanded = {k: v.repeat(repeats) if isinstance(v, torch.Tensor) else v
                    for k, v in params.items()}
        q, margin = exact_truncated(logits[:5], **params)
        assert margin > 1e-5, f"{name}: test data puts a cut within rounding"
        q = q.repeat(repeats, 1)
        out = sample(logits, seeds=row_seeds(len(logits)), impl=impl, **expanded)
        q_token = q.gather(1, out.tokens[:, None]).squeeze(1)
        assert (q_token > 0).all(), \
            f"{name}: sampled outside the kept set at rows {(q_token == 0).nonzero().tolist()}"
        temperature = expanded["temperature"]
        greedy = torch.as_tensor(temperature) == 0
        want_logq = torch.where(greedy, 0.0, q_token.log()).float()
        assert torch.allclose(out.logprobs, want_logq, atol=2e-5), name
        for b in range(len(logits)):
            t = float(temperature[b]) if isinstance(temperature, torch.Tensor) else temperature
            want = 0.0 if t == 0 else float(log_softmax_exact(logits[b:b + 1], t)[0, out.tokens[b]])
            assert abs(float(out.logprobs_untruncated[b]) - want) < 2e-5, (name, b)


@pytest.mark.skipif(not sampling.HAS_TRITON, reason="no triton")
@pytest.mark.usefixtures("small_triton_sizes")
def test_sampling_triton_matches_reference():
    """Same seeds -> the same tokens (both draw the same noise), log-probs equal to fp32
    rounding."""
    cases = []
    logits = tied_logits(6, 123, seed=3)
    logits[0, :] = 0.5                      # all tokens tied: every cut keeps the whole vocabulary
    logits[1, 100:] = float("-inf")
    # 60 tied tokens at the top-k = 65 boundary: a bracket that ...
    logits[2, 10:70] = 1.0
    # ... stays larger than the 16-slot buffer, with one value
    logits[2, :10] = torch.arange(10) + 3.0
    logits[2, 70:] = -2.0 - torch.arange(53) * 0.1
    cases += [(logits, dict(temperature=t, top_k=k, top_p=p, min_p=mp))
              for (t, k, p, mp) in [(1.0, 0, 1.0, 0.0), (0.7, 65, 1.0, 0.0), (0.7, 0, 0.9, 0.0),
                                    (1.3, 0, 0.3, 0.0),
                                    (1.0, 5, 0.8, 0.1), (0.9, 0, 1.0, 0.3)]]
    # V < tile
    cases.append((torch.randn(3, 5, generator=torch.Generator().manual_seed(4)), dict(top_p=0.7)))
    # V = 1
    cases.append((torch.randn(2, 1), dict(top_k=1, top_p=0.5)))
    cases.append((tied_logits(4, 300, seed=5).to(torch.bfloat16),
                  dict(temperature=0.6, top_p=0.95)))
    for logits, params in cases:
        seeds = row_seeds(len(logits), offset=7)
        want = sample_reference(logits, seeds=seeds, **params)
        got = sample(logits, seeds=seeds, impl="triton", **params)
        assert torch.equal(got.tokens, want.tokens), (params, got.tokens.tolist(),
                                                      want.tokens.tolist())
        assert torch.allclose(got.logprobs, want.logprobs, atol=1e-5), params
        assert torch.allclose(got.logprobs_untruncated, want.logprobs_untruncated,
                              atol=1e-5), params


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.usefixtures("small_triton_sizes")
def test_sampling_row_depends_only_on_its_own_seed(impl):
    """A row's token and log-probs do not change when other rows change, the batch is reordered, or
    it is sampled alone; different seeds give different draws."""
    logits = tied_logits(6, 123, seed=6)
    seeds = row_seeds(6)
    params = dict(temperature=0.9, top_p=0.9)
    full = sample(logits, seeds=seeds, impl=impl, **params)
    order = torch.tensor([5, 2, 0, 4, 1, 3])
    shuffled = sample(logits[order], seeds=seeds[order], impl=impl, **params)
    assert torch.equal(shuffled.tokens, full.tokens[order])
    assert torch.allclose(shuffled.logprobs, full.logprobs[order], atol=1e-6)
    others = logits.clone()
    others[[0, 2, 5]] = tied_logits(3, 123, seed=7)
    changed = sample(others, seeds=seeds, impl=impl, **params)
    assert torch.equal(changed.tokens[[1, 3, 4]], full.tokens[[1, 3, 4]])
    alone = sample(logits[4:5], seeds=seeds[4:5], impl=impl, **params)
    assert torch.equal(alone.tokens, full.tokens[4:5])
    assert torch.allclose(alone.logprobs, full.logprobs[4:5], atol=1e-6)
    # Different seeds, same row: the draws differ (a 6-row nucleus of the same logits, 12 seeds).
    same_row = sample(logits[:1].expand(12, -1), seeds=row_seeds(12, offset=100), impl=impl,
                      **params)
    assert len(set(same_row.tokens.tolist())) > 1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.usefixtures("small_triton_sizes")
def test_sampling_seeds_none_uses_torch_generator(impl):
    logits = tied_logits(4, 123, seed=8)
    torch.manual_seed(123)
    a = sample(logits, top_k=20, impl=impl)
    torch.manual_seed(123)
    b = sample(logits, top_k=20, impl=impl)
    assert torch.equal(a.tokens, b.tokens)
    assert (a.tokens.dtype == torch.int64 and a.logprobs.dtype == torch.float32
            and a.tokens.shape == (4,))


@pytest.mark.usefixtures("small_triton_sizes")
def test_sampling_impl_switch(monkeypatch):
    logits = torch.zeros(2, 3)
    monkeypatch.setenv("RLHF_KERNELS", "torch")
    assert sampling.resolve_impl(logits) == "torch"
    assert sampling.resolve_impl(logits, "triton") == "triton"   # impl= wins over the environment
    monkeypatch.setenv("RLHF_KERNELS", "auto")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert sampling.resolve_impl(logits) == "torch"              # plain CPU: the PyTorch path
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert sampling.resolve_impl(logits) == ("triton" if sampling.HAS_TRITON else "torch")
    with pytest.raises(AssertionError):
        sample(logits, top_p=0.0)


def test_sampling_untruncated_fast_path_is_the_general_race():
    """Without top-k, top-p or min-p (what the online loop samples with) the PyTorch twin skips the
    kept-set mask; it must draw the same tokens with the same log-probs as the general path, which a
    per-row tensor parameter forces."""
    logits = tied_logits(6, 123, seed=3)
    seeds = row_seeds(6, offset=11)
    for temperature in (1.0, 0.7, 1.5):
        assert sampling._plain(sampling._params(logits, temperature, 0, 1.0, 0.0))
        plain = sample_reference(logits, temperature, seeds=seeds)
        general = sample_reference(logits, temperature, min_p=torch.zeros(6), seeds=seeds)
        assert torch.equal(plain.tokens, general.tokens)
        torch.testing.assert_close(plain.logprobs, general.logprobs, rtol=0, atol=1e-6)
        torch.testing.assert_close(plain.logprobs_untruncated, general.logprobs_untruncated, rtol=0,
                                   atol=1e-6)
    assert not sampling._plain(sampling._params(logits, 1.0, 5, 1.0, 0.0))


@pytest.mark.usefixtures("small_triton_sizes")
def test_sampling_noise_is_the_documented_hash():
    """The random stream is exactly the documented 32-bit hash of (seed, token id), for any int64
    seed, and E = -log(1 - u) is Exp(1) down to small values (what decides whether a 1e-4 token
    wins)."""
    M = 0xFFFFFFFF

    def mix(x):
        x ^= x >> 16
        x = (x * 0x21F0AAAD) & M
        x ^= x >> 15
        x = (x * 0x735A2D97) & M
        return x ^ (x >> 15)

    seeds = [0, 1, -1, 2**63 - 1, -(2**63), 0x123456789ABCDEF]
    keys = sampling._row_keys(torch.tensor(seeds, dtype=torch.int64))
    index = torch.tensor([0, 1, 122, 128255], dtype=torch.int32)
    log_e = sampling._log_exponential_noise(keys, index)
    for row, seed in enumerate(seeds):
        low, high = seed & M, (seed >> 32) & M
        key_a = mix(low ^ mix(high ^ 0x2545F491))
        key_b = mix(high ^ mix(key_a ^ 0x68E31DA4))
        assert [int(k) & M for k in keys[row]] == [key_a, key_b]
        for j, i in enumerate(index.tolist()):
            u = min(((mix(mix(i ^ key_a) ^ key_b) >> 1) + 0.5) * 2.0**-31, 1 - 2.0**-24)
            assert math.isclose(float(log_e[row, j]), math.log(-math.log1p(-u)), rel_tol=1e-5,
                                abs_tol=1e-5)
    keys = sampling._row_keys(row_seeds(100))
    # (100, 10000)
    e = sampling._log_exponential_noise(keys, torch.arange(10000, dtype=torch.int32)).exp()
    assert abs(float(e.mean()) - 1) < 0.005                       # 1e6 draws: sd of the mean 0.001
    # P(E < 1e-4) = 1e-4: 100 expected, sd 10
    assert 70 < int((e < 1e-4).sum()) < 130


@pytest.mark.usefixtures("small_triton_sizes")
def test_sampling_bench_without_cuda_exits_cleanly(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run for real")
    assert sampling.bench(argparse.Namespace(cpu=False)) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


COMPILE_FOR_H100 = """
import inspect, sys
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
except ImportError as error:
    sys.exit(f"SKIP no ahead-of-time compile API: {error}")
import rlhf_kernels.sampling as sampling
names = list(inspect.signature(sampling._sample_kernel.fn).parameters)
for per_row in (False, True):
    scalar_types = (("*fp32", "*i8", "*i32", "*fp32", "*fp32") if per_row
                    else ("fp32", "i32", "i32", "fp32", "fp32"))
    types = ["*bf16", "i32", "i32", "*i64", *scalar_types,
             "*fp32", "*i32", "*i64", "*fp32", "*fp32"]
    constants = {"PER_ROW": per_row, "BLOCK_V": 1024, "NUM_PIVOTS": 8, "CANDIDATES": 1024}
    try:
        source = ASTSource(fn=sampling._sample_kernel,
                           signature=dict(zip(names, types + ["constexpr"] * 4)),
                           constexprs={(names.index(k),): v for k, v in constants.items()})
    except TypeError as error:
        sys.exit(f"SKIP a different ASTSource API: {error}")
    assert "cubin" in compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 8}).asm
print("OK")
"""


@pytest.mark.skipif(not sampling.HAS_TRITON, reason="no triton")
@pytest.mark.usefixtures("small_triton_sizes")
def test_sampling_kernel_compiles_for_h100():
    """The interpreter does not type-check like the compiler does, so compile the real kernel for
    sm_90 (Triton's bundled ptxas needs no GPU): both parameter layouts, bf16 logits, the default
    sizes. In a subprocess, since this process runs Triton in interpreter mode. Skipped when this
    Triton's ahead-of-time API differs from the one it was written against (3.x)."""

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], env=env, capture_output=True,
                            text=True,
                            cwd=ROOT, timeout=300)
    if result.returncode != 0 and "SKIP" in result.stderr:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
