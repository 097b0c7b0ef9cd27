"""Tests of rlhf_kernels/logprob.py."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import rlhf_kernels
import rlhf_kernels.logprob as logprob
from rlhf_kernels.logprob import token_logprobs, token_logprobs_reference

IGNORE = -100
# (atol, rtol) per dtype; gradients are compared after dividing by their largest entry. Forward:
# every path computes fp32 logits from the same inputs, so bf16 inputs agree as closely as fp32
# (measured ~1e-6). Gradients in bf16: G is rounded to bf16 before the two gradient matmuls, as
# cuBLAS will read it, and the result is rounded again (measured ~6e-3 of the largest entry; bf16
# epsilon is 3.9e-3).
TOLERANCES = {
    torch.float32: {"logp": (1e-5, 1e-5), "grad": (5e-6, 1e-4)},
    torch.bfloat16: {"logp": (1e-5, 1e-5), "grad": (1e-2, 2e-2)},
}


def make_inputs(N=47, V=123, H=32, dtype=torch.float32, ignore_fraction=0.25, seed=0,
                logit_scale=1.0):
    """hidden (N, H), weight (V, H) with logits of std ~ 1.7 * logit_scale, targets (N,) with
    ignored positions mixed in, and a non-uniform upstream gradient (N,) of both signs."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=generator).to(dtype)
    weight = (0.3 * logit_scale * torch.randn(V, H, generator=generator)).to(dtype)
    targets = torch.randint(0, V, (N,), generator=generator)
    targets[torch.rand(N, generator=generator) < ignore_fraction] = IGNORE
    grad_output = torch.randn(N, generator=generator)
    return hidden, weight, targets, grad_output


def logps_and_grads(fn, hidden, weight, targets, grad_output, **kwargs):
    """Run fn forward + backward with the given upstream gradient; return (logp, d hidden, d weight)
    in fp32."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    logps = fn(hidden, weight, targets, **kwargs)
    logps.backward(grad_output)
    return logps.detach().float(), hidden.grad.float(), weight.grad.float()


def assert_close(actual, expected, tolerance, what):
    atol, rtol = tolerance
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def count_valid(targets):
    """num_valid as a caller would pass it: a host int (here read from a CPU tensor, which costs
    nothing)."""
    return int((targets != IGNORE).sum())


def check_against_reference(impl, dtype, temperature=1.0, vocab_chunk_size=None,
                            pass_num_valid=True, **input_kwargs):
    """pass_num_valid: True computes only the counted rows (nonzero_static), False all rows with
    masking."""
    hidden, weight, targets, grad_output = make_inputs(dtype=dtype, **input_kwargs)
    expected = logps_and_grads(token_logprobs_reference, hidden, weight, targets, grad_output,
                               temperature=temperature)
    num_valid = count_valid(targets) if pass_num_valid else None
    actual = logps_and_grads(token_logprobs, hidden, weight, targets, grad_output,
                             temperature=temperature,
                             impl=impl, vocab_chunk_size=vocab_chunk_size, num_valid=num_valid)
    tolerance = TOLERANCES[dtype]
    for name, a, e in zip(("logp", "grad_hidden", "grad_weight"), actual, expected):
        # Gradients are compared relative to their own scale (bf16 keeps ~3 significant digits).
        scale = 1.0 if name == "logp" else max(e.abs().max().item(), 1e-6)
        assert_close(a / scale, e / scale, tolerance["logp" if name == "logp" else "grad"],
                     f"{impl} {dtype} {name}")
    ignored = targets == IGNORE
    assert (actual[0][ignored] == 0).all() and (actual[1][ignored] == 0).all(), \
        "ignored rows must be exactly 0"
    return actual


# ----------------------------------------------------------------------------------------------
# The reference, and the chunked math in float64, against finite differences.

def test_logprob_reference_gradcheck_float64():
    hidden, weight, targets, _ = make_inputs(N=7, V=11, H=5, dtype=torch.float64,
                                             ignore_fraction=0.3, seed=1)
    assert (targets == IGNORE).any() and (targets != IGNORE).any()
    hidden.requires_grad_(), weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w: token_logprobs_reference(h, w, targets, temperature=0.7), (hidden, weight))


def test_logprob_chunked_gradcheck_float64():
    # vocab_chunk_size=4 splits V=11 into 4 + 4 + 3: the online logsumexp and per-chunk gradients
    # are exercised.
    hidden, weight, targets, _ = make_inputs(N=7, V=11, H=5, dtype=torch.float64,
                                             ignore_fraction=0.3, seed=1)
    hidden.requires_grad_(), weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w: token_logprobs(h, w, targets, temperature=0.7, impl="chunked",
                                    vocab_chunk_size=4), (hidden, weight))


# ----------------------------------------------------------------------------------------------
# Triton (interpreted) and chunked PyTorch paths against the reference: forward and both gradients.

@pytest.mark.parametrize("impl", ["triton", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab_chunk_size, temperature", [(None, 1.0), (48, 0.7)],
                         ids=["one_chunk", "chunks48_T0.7"])
@pytest.mark.parametrize("pass_num_valid", [True, False], ids=["num_valid", "masked"])
def test_logprob_matches_reference(impl, dtype, vocab_chunk_size, temperature, pass_num_valid):
    # V=123 is not a multiple of anything: one chunk is 123 columns in a 128-wide tile; chunks of
    # 48 leave 27.
    check_against_reference(impl, dtype, temperature=temperature, vocab_chunk_size=vocab_chunk_size,
                            pass_num_valid=pass_num_valid)


@pytest.mark.parametrize("impl", ["triton", "chunked"])
@pytest.mark.parametrize("ignore_fraction", [0.0, 0.4, 1.0],
                         ids=["none_ignored", "some_ignored", "all_ignored"])
def test_logprob_num_valid_given_or_not_agree(impl, ignore_fraction):
    # The counted rows (gathered, computed, scattered back) and the masked rows (all N computed,
    # ignored ones zeroed) are the same math on the same rows: equal values and gradients, and both
    # equal the reference.
    hidden, weight, targets, grad_output = make_inputs(ignore_fraction=ignore_fraction, seed=2)
    counted = logps_and_grads(token_logprobs, hidden, weight, targets, grad_output, impl=impl,
                              vocab_chunk_size=48,
                              num_valid=count_valid(targets))
    masked = logps_and_grads(token_logprobs, hidden, weight, targets, grad_output, impl=impl,
                             vocab_chunk_size=48)
    expected = logps_and_grads(token_logprobs_reference, hidden, weight, targets, grad_output)
    for name, a, b, e in zip(("logp", "grad_hidden", "grad_weight"), counted, masked, expected):
        assert_close(a, b, (1e-6, 1e-5), f"{impl} {name}: num_valid given vs not")
        assert_close(a, e, (1e-5, 1e-4), f"{impl} {name}: num_valid given vs the reference")


@pytest.mark.parametrize("pass_num_valid", [True, False], ids=["num_valid", "masked"])
def test_logprob_garbage_in_ignored_rows_stays_out(pass_num_valid):
    # Hidden states at ignored positions (padding) may be anything, NaN included; they must not
    # reach the outputs or either gradient. (The masked path zeroes them: 0 * NaN would be NaN.)
    hidden, weight, targets, grad_output = make_inputs()
    ignored = targets == IGNORE
    expected = logps_and_grads(token_logprobs_reference, hidden, weight, targets, grad_output)
    hidden = hidden.masked_fill(ignored[:, None], float("nan"))
    num_valid = count_valid(targets) if pass_num_valid else None
    actual = logps_and_grads(token_logprobs, hidden, weight, targets, grad_output, impl="chunked",
                             num_valid=num_valid)
    for name, a, e in zip(("logp", "grad_hidden", "grad_weight"), actual, expected):
        assert_close(a, e, (1e-5, 1e-4), f"{name} with NaN hidden states at ignored positions")


@pytest.mark.parametrize("vocab_chunk_size", [None, 50])
def test_logprob_triton_tiles_narrower_than_chunk(monkeypatch, vocab_chunk_size):
    # With 16-column tiles each kernel loops over several tiles inside a chunk, the last one
    # partial.
    monkeypatch.setattr(logprob, "_MAX_BLOCK_V", 16)
    check_against_reference("triton", torch.float32, temperature=1.3,
                            vocab_chunk_size=vocab_chunk_size)


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_logprob_large_logits_stay_finite(impl):
    # Logits of std ~ 85: a naive exp() would overflow; the online logsumexp must not.
    logps = check_against_reference(impl, torch.float32, logit_scale=50.0)[0]
    assert torch.isfinite(logps).all() and (logps <= 0).all()


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_logprob_probabilities_sum_to_one(impl):
    # One context scored against every vocabulary id: sum_v p(v) = 1, i.e. logsumexp over targets =
    # 0.
    hidden, weight, _, _ = make_inputs(N=1, V=123)
    every_target = torch.arange(123)
    logps = token_logprobs(hidden.expand(123, -1), weight, every_target, temperature=0.8, impl=impl,
                           vocab_chunk_size=40)
    assert abs(torch.logsumexp(logps, dim=0).item()) < 1e-5


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_logprob_all_ignored(impl):
    hidden, weight, targets, grad_output = make_inputs(N=9, V=123)
    targets[:] = IGNORE
    logps, grad_hidden, grad_weight = logps_and_grads(token_logprobs, hidden, weight, targets,
                                                      grad_output, impl=impl)
    assert logps.shape == (9,) and (logps == 0).all()
    assert (grad_hidden == 0).all() and (grad_weight == 0).all()


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_logprob_tied_weights(impl):
    # The LM head is the embedding matrix: its gradient from token_logprobs adds to the embedding
    # lookup's.
    hidden, weight, targets, _ = make_inputs(N=47, V=123, H=32)
    input_ids = torch.randint(0, 123, (47,), generator=torch.Generator().manual_seed(3))
    projection = torch.randn(32, 32, generator=torch.Generator().manual_seed(4)) / 32**0.5

    def loss_and_grad(fn, **kwargs):
        embedding = weight.clone().requires_grad_()
        # (N, H), depends on embedding
        hidden_states = torch.tanh(embedding[input_ids] @ projection) + hidden
        # .sum() hands back a stride-0 gradient
        loss = -fn(hidden_states, embedding, targets, **kwargs).sum()
        loss.backward()
        return loss.detach(), embedding.grad

    expected_loss, expected_grad = loss_and_grad(token_logprobs_reference)
    actual_loss, actual_grad = loss_and_grad(token_logprobs, impl=impl, vocab_chunk_size=48)
    assert_close(actual_loss, expected_loss, (1e-4, 1e-5), "tied loss")
    assert_close(actual_grad, expected_grad, (1e-5, 1e-4), "tied embedding grad")


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_logprob_frozen_head_and_no_grad(impl):
    hidden, weight, targets, grad_output = make_inputs()
    expected = logps_and_grads(token_logprobs_reference, hidden, weight, targets, grad_output)
    hidden_leaf = hidden.clone().requires_grad_()
    logps = token_logprobs(hidden_leaf, weight, targets, impl=impl)  # weight does not require grad
    logps.backward(grad_output)
    assert_close(hidden_leaf.grad, expected[1], (2e-5, 1e-4), "grad_hidden with a frozen head")
    with torch.no_grad():  # reference-model log-probs
        assert_close(token_logprobs(hidden, weight, targets, impl=impl), expected[0], (2e-5, 1e-5),
                     "no_grad logp")


def test_logprob_dispatch(monkeypatch):
    hidden = torch.zeros(2, 4)
    monkeypatch.delenv("RLHF_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert logprob.resolve_impl(hidden) == ("triton" if logprob.HAS_TRITON else "chunked")
    assert logprob.resolve_impl(hidden.double()) == "chunked"  # the kernels compute in fp32
    monkeypatch.delenv("TRITON_INTERPRET")
    assert logprob.resolve_impl(hidden) == "chunked"  # a plain CPU: pure PyTorch
    monkeypatch.setenv("RLHF_KERNELS", "torch")
    assert logprob.resolve_impl(hidden) == "torch"
    # the argument wins over the env var
    assert logprob.resolve_impl(hidden, impl="chunked") == "chunked"
    with pytest.raises(AssertionError):
        logprob.resolve_impl(hidden, impl="cuda")


@pytest.mark.parametrize("num_valid", [None, 5])
def test_logprob_rejects_out_of_range_targets(num_valid):
    hidden, weight, targets, _ = make_inputs(N=5, V=11, H=4, ignore_fraction=0.0)
    targets[0] = 11
    with pytest.raises(AssertionError, match="target ids"):
        token_logprobs(hidden, weight, targets, impl="chunked", num_valid=num_valid)


def test_logprob_rejects_wrong_num_valid():
    # On a CPU the count is checked at once. (On a GPU the same check is a torch._assert_async: a
    # wrong count kills the process with a device-side assert at the next sync instead of a Python
    # AssertionError.)
    hidden, weight, targets, _ = make_inputs(N=9, V=11, H=4, ignore_fraction=0.5, seed=3)
    num_valid = count_valid(targets)
    assert 0 < num_valid < 9
    for wrong in (num_valid - 1, num_valid + 1):
        with pytest.raises(AssertionError, match="num_valid"):
            token_logprobs(hidden, weight, targets, impl="chunked", num_valid=wrong)
    # a device tensor would need the read we avoid
    with pytest.raises(AssertionError, match="host int"):
        token_logprobs(hidden, weight, targets, impl="chunked", num_valid=torch.tensor(num_valid))


def test_logprob_first_true_rows_without_nonzero_static(monkeypatch):
    # Builds whose CUDA lacks nonzero_static fall back to a stable sort; both give the True indices
    # in order.
    mask = make_inputs(N=47)[2] != IGNORE
    expected = mask.nonzero().squeeze(1)
    assert torch.equal(logprob._first_true_rows(mask, expected.numel()), expected)

    def missing(*args, **kwargs):
        raise NotImplementedError("Could not run 'aten::nonzero_static' with arguments from the "
                                  "'CUDA' backend")
    monkeypatch.setattr(torch, "nonzero_static", missing)
    assert torch.equal(logprob._first_true_rows(mask, expected.numel()), expected)


@pytest.mark.parametrize("num_valid", [None, 30, 47, 0], ids=["masked", "some", "all", "none"])
def test_logprob_runs_on_fake_tensors(num_valid):
    # Fake tensors carry shapes and no values, so any read of a device value (nonzero(), .tolist(),
    # bool()) raises: forward + backward running here means neither does one on a GPU. impl="auto"
    # would pick Triton under TRITON_INTERPRET=1; fake inputs must go to the chunked loop instead,
    # without marking Triton broken.
    broken_before = set(rlhf_kernels._broken)
    with FakeTensorMode():
        hidden = torch.randn(47, 32, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(123, 32, dtype=torch.bfloat16, requires_grad=True)
        targets = torch.randint(0, 123, (47,))
        assert logprob.resolve_impl(hidden) == "chunked"
        logps = token_logprobs(hidden, weight, targets, vocab_chunk_size=48, num_valid=num_valid)
        logps.sum().backward()
        assert logps.shape == (47,) and logps.dtype == torch.float32
        assert hidden.grad.shape == hidden.shape and hidden.grad.dtype == torch.bfloat16
        assert weight.grad.shape == weight.shape and weight.grad.dtype == torch.bfloat16
    assert rlhf_kernels._broken == broken_before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["triton", "chunked"])
@pytest.mark.parametrize("pass_num_valid", [True, False], ids=["num_valid", "masked"])
def test_logprob_no_host_sync_on_gpu(impl, pass_num_valid):
    # The fake-tensor test above in real life: forward + backward queue their kernels without the
    # CPU ever waiting for the GPU (sync debug mode raises on any device-to-host read or stream
    # sync).
    hidden, weight, targets, grad_output = (x.cuda() for x in make_inputs(dtype=torch.bfloat16))
    num_valid = count_valid(targets.cpu()) if pass_num_valid else None
    expected = logps_and_grads(token_logprobs_reference, hidden, weight, targets, grad_output)
    # Warm-up outside the check: Triton compiles and the fp32-output probe reads its answer once per
    # process.
    logps_and_grads(token_logprobs, hidden, weight, targets, grad_output, impl=impl,
                    num_valid=num_valid)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        actual = logps_and_grads(token_logprobs, hidden, weight, targets, grad_output, impl=impl,
                                 num_valid=num_valid)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Loose: PyTorch < 2.8 rounds the GPU logits to bf16 (see _cuda_fp32_output); accuracy is tested
    # on the CPU.
    assert_close(actual[0], expected[0], (5e-2, 1e-2), f"{impl} logp on the GPU")
