"""Per-token log-probs log p(target | prefix) from the final hidden states and the LM head, without
materialising the [tokens x vocab] logits.

    from rlhf_kernels.logprob import token_logprobs
    # (N,) fp32; a position whose target is -100 (ignored) gets 0.0
    logps = token_logprobs(hidden, lm_head_weight, targets, temperature=1.0)
    # the same, computing only the n rows whose target != -100 (n: a host int the caller knows)
    logps = token_logprobs(hidden, lm_head_weight, targets, num_valid=n)

    python -m rlhf_kernels.logprob --bench              # H100: ours vs naive PyTorch vs Liger
    python -m rlhf_kernels.logprob --bench --cpu-smoke  # tiny run of the same code path on a CPU

The math, for token i with final hidden state h_i (H,), LM head W (V, H), target t_i, temperature T:

    z_ij     = (h_i . W_j) / T                        logits, (N, V) -- never stored whole
    lse_i    = log sum_j exp(z_ij)                     online over vocabulary chunks
    logp_i   = z_i,t_i - lse_i                         what we return (0 where t_i == ignore_index)
    dlogp_i / dz_ij = onehot(t_i)_j - p_ij,            p_ij = exp(z_ij - lse_i)

With an upstream gradient g_i per token (DPO weights every token of a sequence by its pair's
coefficient, SFT by 1/n_tokens), the chain rule gives G_ij = g_i (onehot - p_ij) / T and

    grad_hidden = G @ W        (N, H)          grad_weight = G^T @ hidden        (V, H)

Implementations, all with the same signature (pick one with impl= or RLHF_KERNELS=...):
  - "torch":   token_logprobs_reference: full fp32 logits, log_softmax, gather. The twin the
               tests trust.
  - "chunked": the algorithm below with plain PyTorch ops. Runs anywhere; what CPU runs and CI use.
  - "triton":  the same algorithm with two Triton kernels for the per-chunk softmax work.
  - "auto":    "triton" on CUDA (and on CPU under TRITON_INTERPRET=1, for tests), else "chunked".

Design (why it looks the way it does):
  1. Chunks run over the *vocabulary*, not over tokens. The weight gradient of a vocabulary chunk,
     G[:, chunk]^T @ hidden, is then complete after one matmul whose reduction over all N tokens
     happens in fp32 inside cuBLAS; it is written once, straight into grad_weight[chunk]. Chunking
     over tokens instead would add every token chunk's partial into grad_weight: in bf16 that is
     the rounding-after-every-add that Liger's fused CE does, in fp32 it is a [V, H] fp32
     temporary (2 GB for Llama-3-8B). We do neither. The price is that grad_hidden is a sum over
     vocabulary chunks, kept in an fp32 (N, H) accumulator -- activation-sized, 256 MB at N=16384.
  2. The matmuls are cuBLAS (torch.mm) with bf16 inputs and *fp32 outputs*, so the logits are
     never rounded to bf16 (a logit of 20 rounded to bf16 is off by up to 0.06, and a sequence
     log-prob sums hundreds of such errors; PyTorch < 2.8 lacks mm(out_dtype=) and falls back to
     bf16 logits, see _cuda_fp32_output). The per-chunk softmax work (an online logsumexp in
     the forward, the softmax gradient in the backward) is a memory-bound pass over the chunk's
     logits; a Triton kernel does it in one read instead of the ~5 passes of separate torch ops.
     A fully fused Triton tile (GEMM + online softmax in registers) would save the fp32 logits
     round trip (~7% of the time at the benchmark shape), but only if its GEMM kept up with
     cuBLAS's warp-specialised Hopper kernels; we keep cuBLAS and the readable kernels.
  3. Four matmuls: logits (forward), logits again (backward recompute), grad_hidden, grad_weight.
     The backward needs p, and storing p is the (N, V) tensor we refuse to store. Liger gets by with
     three because its loss is a mean, so it knows g_i = 1/n during the forward and computes the
     gradients there -- but that needs the full-vocabulary softmax of a token chunk before any
     gradient, i.e. token chunks and a cross-chunk grad_weight accumulation (point 1). A "fused,
     weights known in advance" variant is therefore not offered: under our accuracy rules it costs
     the same four matmuls. Gradients that are not needed are skipped (a frozen LM head: 3 matmuls;
     no grad at all, e.g. reference-model log-probs: 1).
  4. Ignored positions (target == ignore_index) are dropped before any matmul: prompts and padding
     are often half of an RLHF batch, and skipping them halves the work. But the matmul shapes are
     chosen on the host, so the host must know how many rows remain. Reading that count back from
     the GPU (nonzero()) makes the CPU wait for every queued kernel, once per call -- and a fake
     tensor (FakeTensorMode, torch.compile tracing) has no values to read at all. So the count comes
     from the caller, who built the targets from Python lists and knows it: num_valid=. Given it,
     nonzero_static picks those rows without a read back. Without it we still never read the device:
     every row goes through the matmuls, ignored ones zeroed and masked out -- correct, but paying
     for the ignored rows too. Nothing in forward or backward reads a device value: the target-range
     check is torch._assert_async on a GPU (a plain assert on a CPU, where reading costs nothing).
"""
import argparse
import math
import os
import sys
import time

import torch
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

from rlhf_kernels import first_use_fallback

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # e.g. macOS / Windows wheels without Triton: the "chunked" path still works
    HAS_TRITON = False

IMPLEMENTATIONS = ("auto", "triton", "chunked", "torch")
# Triton kernels walk a chunk row in tiles of at most this many columns (tests shrink it)
_MAX_BLOCK_V = 1024


# ----------------------------------------------------------------------------------------------
# The reference: full logits in fp32, log_softmax, gather, mask. Simple enough to trust.

def token_logprobs_reference(hidden, weight, targets, temperature=1.0, ignore_index=-100):
    """log p(targets) (N,) from hidden (N, H) and weight (V, H), materialising the (N, V) logits in
    fp32 (fp64 when the inputs are fp64, so gradcheck can use it). Ignored positions give 0 and no
    gradient."""
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).t() / temperature  # (N, V)
    logprobs_all = torch.log_softmax(logits, dim=-1)                                  # (N, V)
    valid = targets != ignore_index                                                   # (N,)
    # any in-range id; masked below
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logprobs = logprobs_all.gather(1, safe_targets[:, None]).squeeze(1)               # (N,)
    # where(): masked rows get zero gradient
    return torch.where(valid, logprobs, torch.zeros_like(logprobs))


# ----------------------------------------------------------------------------------------------
# Public entry point and the implementation switch.

def resolve_impl(hidden, impl=None):
    """Which implementation token_logprobs runs for this input: impl= wins, then $RLHF_KERNELS, then
    "auto"."""
    impl = impl or os.environ.get("RLHF_KERNELS", "auto")
    assert impl in IMPLEMENTATIONS, \
        f"unknown implementation {impl!r}, expected one of {IMPLEMENTATIONS}"
    if impl == "auto":
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        triton_runs_here = HAS_TRITON and (hidden.is_cuda or interpreted)
        # fp64 (gradcheck) stays on the chunked path: the Triton kernels compute in fp32.
        impl = "triton" if triton_runs_here and hidden.dtype != torch.float64 else "chunked"
    if impl == "triton" and is_fake(hidden):
        # A fake tensor has no memory for a kernel to read; the chunked loop gives the same shapes.
        # (Trying Triton would also make first_use_fallback give up on it for the rest of the
        # process.)
        impl = "chunked"
    return impl


def token_logprobs(hidden, weight, targets, temperature=1.0, ignore_index=-100, impl=None,
                   vocab_chunk_size=None,
                   num_valid=None):
    """Per-token log p(targets[i] | hidden[i]) under softmax(hidden @ weight.T / temperature).

    hidden (N, H) and weight (V, H) in bf16, fp16, fp32 (or fp64: chunked/torch only), same dtype;
    targets (N,) int64 with ignore_index marking positions to skip. Returns (N,) fp32 (fp64 for fp64
    inputs), 0.0 at ignored positions, differentiable w.r.t. hidden and weight for any upstream
    gradient. weight may be a tied embedding: its gradient here is simply added to the others.
    impl: "auto" | "triton" | "chunked" | "torch" (the reference); default $RLHF_KERNELS or "auto".
    vocab_chunk_size: logits columns per chunk; None picks one from the number of tokens.
    num_valid: how many targets are not ignore_index, as a host int (e.g. the sum of the response
    lengths the targets were built from). Given, only those rows are computed; None computes all N
    rows and masks the ignored ones (same result, more work). Never read from the device here: see
    point 4 above. A wrong num_valid fails an assert (at once on a CPU; on a GPU as a device-side
    assert at the next sync).
    """
    assert hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1], \
        (f"expected hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} and "
         f"{tuple(weight.shape)}")
    assert targets.shape == hidden.shape[:1], \
        f"targets {tuple(targets.shape)} must be (N,) = {hidden.shape[0]}"
    assert temperature > 0, "temperature must be positive"
    assert num_valid is None or (isinstance(num_valid, int)
                                 and 0 <= num_valid <= targets.shape[0]), \
        f"num_valid must be None or a host int in [0, {targets.shape[0]}], got {num_valid!r}"
    _check_targets(targets, weight.shape[0], ignore_index, num_valid)
    impl = resolve_impl(hidden, impl)
    if impl == "torch":
        return token_logprobs_reference(hidden, weight, targets, temperature, ignore_index)
    assert hidden.dtype == weight.dtype, f"hidden is {hidden.dtype} but weight is {weight.dtype}"
    def run(use_triton):
        return ChunkedTokenLogprobs.apply(hidden, weight, targets, float(temperature), ignore_index,
                                          use_triton, vocab_chunk_size, num_valid)

    # the kernels compile on first use; if that fails, the chunked PyTorch loop
    if impl == "triton":
        return first_use_fallback("rlhf_kernels.logprob (Triton)", lambda: run(True),
                                  lambda: run(False))
    return run(False)


# ----------------------------------------------------------------------------------------------
# The chunked algorithm: an autograd.Function whose loops are the same for both backends.

def _accumulate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _auto_vocab_chunk_size(n_rows, vocab_size, device):
    """Columns per chunk so that one chunk of logits is ~256 MB of fp32 on a GPU (16 MB on a CPU).
    At the benchmark shape (16384 tokens) that is 4096 columns: the matmuls stay large enough to run
    at full speed, and the (n_rows, chunk) buffers stay well under the 2 GB grad_weight itself."""
    # (memory_trace.py: a GPU's choices)
    on_gpu = device.type == "cuda" or os.environ.get("RLHF_EMULATE_GPU") == "1"
    budget = 2**26 if on_gpu else 2**22  # logits elements per chunk
    # a multiple of 256 keeps GEMM tiles whole
    chunk = max(256, (budget // max(n_rows, 1)) // 256 * 256)
    return min(chunk, vocab_size)


class ChunkedTokenLogprobs(torch.autograd.Function):
    """Forward: for each vocabulary chunk, logits = hidden @ W[chunk]^T in fp32, fold them into a
    running logsumexp and pick out the target logit. Saves only lse (n,). Backward: recompute each
    chunk's logits, turn them into G[:, chunk] (the softmax gradient), then grad_weight[chunk] = G^T
    @ hidden and grad_hidden += G @ W[chunk].

    Which n rows the loops see (point 4 of the module docstring), decided from host values only:
      num_valid == N:     all rows, as they are.
      num_valid < N:      rows = the num_valid non-ignored indices (nonzero_static), gathered;
                          results scattered back with index_copy_, ignored rows left at exactly 0.
      num_valid is None:  all N rows, "masked": ignored rows get hidden 0, target 0 and upstream
                          gradient 0, so they add exactly nothing to any gradient (even if their
                          hidden states are inf/NaN garbage), and their log-probs are set to 0 by a
                          where()."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, use_triton,
                vocab_chunk_size, num_valid):
        num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
        accumulate_dtype = _accumulate_dtype(weight.dtype)
        rows, valid = _select_rows(targets, ignore_index, num_valid)
        # host ints only: no device read sizes anything
        n = num_tokens if num_valid is None else num_valid
        logprobs = torch.zeros(num_tokens, dtype=accumulate_dtype, device=hidden.device)
        lse = torch.empty(0, dtype=accumulate_dtype, device=hidden.device)
        chunk = vocab_chunk_size or _auto_vocab_chunk_size(n, vocab_size, hidden.device)
        if n > 0:
            h = _take_rows(hidden, rows, valid)                   # (n, H)
            # (n,) all in [0, V), read by the Triton kernels
            t = _take_rows(targets, rows, valid).contiguous()
            lse, target_logit = _forward_chunks(h, weight, t, 1.0 / temperature, use_triton, chunk)
            if rows is not None:
                logprobs.index_copy_(0, rows, target_logit - lse)
            else:
                # masked rows -> 0 (no-op when valid is None)
                logprobs = _take_rows(target_logit - lse, None, valid)
        ctx.save_for_backward(hidden, weight, targets, rows, lse)
        ctx.temperature, ctx.use_triton, ctx.chunk = temperature, use_triton, chunk
        ctx.ignore_index, ctx.num_valid = ignore_index, num_valid
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs):
        hidden, weight, targets, rows, lse = ctx.saved_tensors
        need_grad_hidden, need_grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0] if ctx.num_valid is None else ctx.num_valid
        # the masked case, as in forward
        valid = targets != ctx.ignore_index if ctx.num_valid is None else None
        # Ignored rows get exact zeros; when the loops see every row, grad_hidden comes out of them
        # whole.
        grad_hidden = torch.zeros_like(hidden) if need_grad_hidden and rows is not None else None
        grad_weight = None
        # when n > 0, every row is written by exactly one chunk: no memset needed
        if need_grad_weight:
            make = torch.empty if n > 0 else torch.zeros
            grad_weight = make(weight.shape, dtype=weight.dtype, device=weight.device)
        # targets, temperature, ignore_index, use_triton, vocab_chunk_size, num_valid
        nones = (None,) * 6
        if n == 0:  # nothing counted: zero gradients (also covers N == 0)
            return (torch.zeros_like(hidden) if need_grad_hidden else None), grad_weight, *nones
        h = _take_rows(hidden, rows, valid)                     # (n, H)
        t = _take_rows(targets, rows, valid).contiguous()       # (n,)
        # (n,) upstream gradient, any values; 0 if masked
        g = _take_rows(grad_logprobs, rows, valid)
        g = g.to(lse.dtype).contiguous()  # contiguous: .sum()'s backward hands us a stride-0 expand
        # every grad_weight row is (re)written by its chunk: a failed try leaves nothing behind
        def run(use_triton):
            return _backward_chunks(h, weight, t, lse, g, 1.0 / ctx.temperature, use_triton,
                                    ctx.chunk, grad_weight, need_grad_hidden)

        grad_h = (first_use_fallback("rlhf_kernels.logprob backward (Triton)", lambda: run(True),
                                     lambda: run(False))
                  if ctx.use_triton else run(False))
        if need_grad_hidden:
            if rows is None:
                grad_hidden = grad_h.to(hidden.dtype)
            else:
                grad_hidden.index_copy_(0, rows, grad_h.to(hidden.dtype))
        return grad_hidden, grad_weight, *nones


# ----------------------------------------------------------------------------------------------
# Row selection and target checks, from host values only (see point 4 of the module docstring).

def _select_rows(targets, ignore_index, num_valid):
    """(rows, valid): the indices (num_valid,) of the non-ignored targets when only some count, else
    None; and the (N,) mask of non-ignored targets when the ignored rows must be masked (num_valid
    is None)."""
    if num_valid is None:
        return None, targets != ignore_index
    if num_valid == targets.shape[0]:
        return None, None
    return _first_true_rows(targets != ignore_index, num_valid), None


def _first_true_rows(mask, count):
    """Indices (count,) of the True entries of mask (N,), in order, where the caller knows how many
    there are. nonzero() would have to read the count from the device to size its output;
    nonzero_static is told it."""
    try:
        return torch.nonzero_static(mask, size=count).squeeze(1)
    # a PyTorch build without a CUDA nonzero_static: a stable sort puts True first
    except NotImplementedError:
        return torch.argsort((~mask).to(torch.uint8), stable=True)[:count]


def _take_rows(x, rows, valid):
    """The rows of x (N, ...) that the loops see: x[rows] when rows are picked, else x with the rows
    where valid is False set to 0 (for targets: id 0, any in-range id will do), else x itself."""
    if rows is not None:
        return x[rows]
    if valid is not None:
        # where(), not *: 0 * NaN would be NaN
        return torch.where(valid.view(-1, *[1] * (x.dim() - 1)), x, 0)
    return x


def _check_targets(targets, vocab_size, ignore_index, num_valid):
    """Every target is ignore_index or an id in [0, vocab_size), and num_valid (if given) counts the
    others. An id outside the vocabulary would otherwise just never match a column: a silent
    log-prob of -lse."""
    valid = targets != ignore_index
    in_range = (valid.logical_not() | ((targets >= 0) & (targets < vocab_size))).all()
    _assert_without_sync(in_range,
                         f"target ids must lie in [0, {vocab_size}) or equal "
                         f"ignore_index={ignore_index}")
    if num_valid is not None:
        _assert_without_sync(valid.sum() == num_valid,
                             f"num_valid={num_valid} is not the number of targets "
                                                       f"!= ignore_index={ignore_index}")


def _assert_without_sync(condition, message):
    """assert on a 0-dim bool tensor without waiting for the GPU. On a CPU the value is right there:
    a plain assert. On a GPU torch._assert_async queues the check as a kernel; if it fails, the
    process dies with a device-side assert (the message is printed from the device) at the next sync
    -- loud, but later and not catchable, like any out-of-bounds index on a GPU. Fake tensors have
    no values: their check is a no-op."""
    if (condition.device.type == "cpu" and not torch.compiler.is_compiling()
            and not is_fake(condition)):
        assert bool(condition), message
    else:
        torch._assert_async(condition, message)


def _forward_chunks(h, weight, targets, inv_temperature, use_triton, chunk):
    """lse (n,) and target logit (n,), both already divided by the temperature, over all vocabulary
    chunks."""
    n, vocab_size = h.shape[0], weight.shape[0]
    accumulate_dtype = _accumulate_dtype(weight.dtype)
    lse = torch.full((n,), -math.inf, dtype=accumulate_dtype, device=h.device)  # running logsumexp
    target_logit = torch.zeros(n, dtype=accumulate_dtype, device=h.device)
    h_mm = _matmul_operand(h)
    update = _lse_update_triton if use_triton else _lse_update_torch
    for start in range(0, vocab_size, chunk):
        # (Vc, H) contiguous rows
        weight_chunk = weight[start:start + chunk]
        # (n, Vc) raw, not yet / T
        logits = _matmul(h_mm, weight_chunk.t(), accumulate_dtype)
        # in place on lse, target_logit
        update(logits, targets, start, inv_temperature, lse, target_logit)
    return lse, target_logit


def _backward_chunks(h, weight, targets, lse, g, inv_temperature, use_triton, chunk, grad_weight,
                     need_grad_hidden):
    """Fills grad_weight (V, H) chunk by chunk (if given) and returns grad_hidden (n, H) in fp32 (or
    None)."""
    vocab_size = weight.shape[0]
    # (n, H)
    grad_h = torch.zeros(h.shape, dtype=lse.dtype, device=h.device) if need_grad_hidden else None
    h_mm = _matmul_operand(h)
    softmax_grad = _softmax_grad_triton if use_triton else _softmax_grad_torch
    for start in range(0, vocab_size, chunk):
        weight_chunk = weight[start:start + chunk]                              # (Vc, H)
        logits = _matmul(h_mm, weight_chunk.t(), lse.dtype)                     # (n, Vc) recomputed
        # G = g (onehot - p) / T, in the weight dtype because that is what the next two matmuls
        # read.
        grad_logits = softmax_grad(logits, targets, start, inv_temperature, lse, g, weight.dtype)
        # complete for this chunk: summed over all n tokens inside the matmul
        if grad_weight is not None:
            _matmul(grad_logits.t(), h_mm, weight.dtype, out=grad_weight[start:start + chunk])
        if grad_h is not None:       # a sum over chunks, accumulated in fp32
            _addmm_fp32_(grad_h, grad_logits, weight_chunk)
        del logits, grad_logits  # free before the next chunk allocates its own
    return grad_h


# ----------------------------------------------------------------------------------------------
# Matmuls: fp32 accumulation *and* fp32 results for bf16 inputs, on both devices.

def _matmul_operand(x):
    """On a CPU, upcast once up front (CPU bf16 matmuls are slow and their rounding is opaque)."""
    return x if x.is_cuda else x.to(_accumulate_dtype(x.dtype))


def _matmul(a, b, out_dtype, out=None):
    """a @ b, accumulated in fp32, returned (or written into `out`) in out_dtype."""
    if a.is_cuda and b.dtype == a.dtype:
        if out_dtype == a.dtype:
            return torch.mm(a, b, out=out)  # cuBLAS accumulates bf16 products in fp32 already
        if out is None and _cuda_fp32_output("mm", a.device, a.dtype):
            # bf16 x bf16 -> fp32 straight from the GEMM epilogue: the logits are never rounded to
            # bf16.
            return torch.mm(a, b, out_dtype=out_dtype)
        # PyTorch < 2.8 has no out_dtype: the logits get rounded to bf16 once, as in most RLHF code.
        result = torch.mm(a, b)
    else:
        accumulate_dtype = _accumulate_dtype(a.dtype)
        if out is not None and out.dtype == accumulate_dtype:  # straight into `out`: no copy
            return torch.mm(a.to(accumulate_dtype), b.to(accumulate_dtype), out=out)
        result = torch.mm(a.to(accumulate_dtype), b.to(accumulate_dtype))
    return result.to(out_dtype) if out is None else out.copy_(result)


def _addmm_fp32_(accumulator, a, b):
    """accumulator (fp32) += a @ b where a, b may be bf16, without rounding the product to bf16."""
    if not a.is_cuda or a.dtype == accumulator.dtype:
        return accumulator.addmm_(a.to(accumulator.dtype), b.to(accumulator.dtype))
    if _cuda_fp32_output("addmm", a.device, a.dtype):  # beta=1 in the GEMM epilogue: no extra pass
        return torch.addmm(accumulator, a, b, out_dtype=accumulator.dtype, out=accumulator)
    # older PyTorch: one (n, H) temporary per chunk
    return accumulator.add_(_matmul(a, b, accumulator.dtype))


_CUDA_FP32_OUTPUT = {}  # (op, device, dtype) -> bool, probed once


def _cuda_fp32_output(op, device, dtype):
    """Can cuBLAS give fp32 results from bf16/fp16 inputs here? torch.mm(..., out_dtype=) arrived in
    PyTorch 2.8, addmm into an fp32 accumulator later; requirements.txt allows older versions. Probe
    once, on real tensors even under FakeTensorMode (a fake probe cannot read its result and would
    cache "no")."""
    key = (op, str(device), dtype)
    if key not in _CUDA_FP32_OUTPUT:
        with unset_fake_temporarily():
            _CUDA_FP32_OUTPUT[key] = _probe_cuda_fp32_output(op, device, dtype)
    return _CUDA_FP32_OUTPUT[key]


def _probe_cuda_fp32_output(op, device, dtype):
    """Run op on a tiny bf16/fp16 input with an fp32 result and check the answer (one sync, once per
    process)."""
    try:
        mat = torch.ones(2, 3, device=device, dtype=dtype)
        if op == "mm":
            result = torch.mm(mat, mat.t(), out_dtype=torch.float32)
            return result.dtype == torch.float32 and bool((result == 3).all())
        accumulator = torch.ones(2, 2, device=device)
        torch.addmm(accumulator, mat, mat.t(), out_dtype=torch.float32, out=accumulator)
        return bool((accumulator == 4).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


# ----------------------------------------------------------------------------------------------
# Per-chunk softmax work, PyTorch version (the "chunked" path). In place where it can be, to stay
# within one (n, Vc) buffer on memory-tight CPUs.

def _lse_update_torch(logits, targets, start, inv_temperature, lse, target_logit):
    """Fold this chunk (n, Vc) into the running logsumexp lse (n,); record target logits that fall
    in it."""
    if inv_temperature != 1.0:  # (a pass over the chunk saved at T = 1)
        logits.mul_(inv_temperature)
    # logaddexp(-inf, x) = x on chunk 0
    lse.copy_(torch.logaddexp(lse, torch.logsumexp(logits, dim=1)))
    # target's column inside this chunk
    local = targets - start
    in_chunk = (local >= 0) & (local < logits.shape[1])
    picked = logits.gather(1, local.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
    target_logit.copy_(torch.where(in_chunk, picked, target_logit))


def _softmax_grad_torch(logits, targets, start, inv_temperature, lse, g, out_dtype):
    """G = g (onehot - p) / T for this chunk (n, Vc), with p = exp(logits / T - lse)."""
    scale = g * inv_temperature                                   # (n,) g_i / T
    grad = logits.mul_(inv_temperature) if inv_temperature != 1.0 else logits
    # (n, Vc) p, reusing the logits buffer
    grad = grad.sub_(lse[:, None]).exp_()
    grad.mul_(-scale[:, None])                                    # -g p / T
    local = targets - start
    in_chunk = (local >= 0) & (local < logits.shape[1])
    # + g / T at the target column (adds 0 on rows whose target lives in another chunk; no sync)
    grad.scatter_add_(1, local.clamp(0, logits.shape[1] - 1)[:, None], (scale * in_chunk)[:, None])
    return grad.to(out_dtype)


# ----------------------------------------------------------------------------------------------
# Per-chunk softmax work, Triton version. A program owns BLOCK_ROWS token rows and walks the chunk's
# columns in (BLOCK_ROWS, BLOCK_V) tiles, so each kernel reads the (n, Vc) fp32 logits exactly once
# and the backward writes G exactly once. Rows past n_rows in the last program re-read row n_rows -
# 1 (so no lane ever computes on garbage) and their results are not stored.

if HAS_TRITON:

    @triton.jit
    def _lse_update_kernel(
        logits_ptr, logits_row_stride,  # (n, Vc) fp32 raw logits of this vocabulary chunk
        # (n,) int64 target ids, all in [0, V) (ignored rows dropped or set to 0)
        targets_ptr,
        lse_ptr,                        # (n,) fp32 running logsumexp, read and updated
        # (n,) fp32 target logit / T, written by the chunk that holds it
        target_logit_ptr,
        n_rows, n_cols, vocab_start, inv_temperature,
        BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (BLOCK_ROWS,)
        row_mask = rows < n_rows                                          # guards the stores
        rows = tl.minimum(rows, n_rows - 1).to(tl.int64)  # int64: n * Vc may pass 2^31 elements
        row_ptrs = logits_ptr + rows[:, None] * logits_row_stride        # (BLOCK_ROWS, 1)
        cols = tl.arange(0, BLOCK_V)[None, :]                             # (1, BLOCK_V)
        # Online logsumexp over the chunk: per row, running max m and sum s of exp(x - m).
        m = tl.full((BLOCK_ROWS,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_ROWS,), tl.float32)
        for tile_start in range(0, n_cols, BLOCK_V):
            mask = tile_start + cols < n_cols
            x = tl.load(row_ptrs + tile_start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            # (BLOCK_ROWS, BLOCK_V)
            x = x * inv_temperature
            m_new = tl.maximum(m, tl.max(x, axis=1))
            # masked: exp(-inf) = 0
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
            m = m_new
        # Merge with the earlier chunks: lse = log(exp(lse_old) + s * exp(m)), stably.
        lse_old = tl.load(lse_ptr + rows)  # -inf before the first chunk
        m_all = tl.maximum(lse_old, m)
        lse = m_all + tl.log(tl.exp(lse_old - m_all) + s * tl.exp(m - m_all))
        tl.store(lse_ptr + rows, lse, mask=row_mask)
        # The target logit, for rows whose target id falls inside this chunk.
        local = tl.load(targets_ptr + rows) - vocab_start  # the target's column in this chunk
        in_chunk = row_mask & (local >= 0) & (local < n_cols)
        x_target = tl.load(logits_ptr + rows * logits_row_stride + local, mask=in_chunk, other=0.0)
        tl.store(target_logit_ptr + rows, x_target.to(tl.float32) * inv_temperature, mask=in_chunk)

    @triton.jit
    def _softmax_grad_kernel(
        logits_ptr, logits_row_stride,  # (n, Vc) fp32 raw logits of this chunk (recomputed)
        # (n, Vc) G in the weight dtype (may alias logits when both fp32)
        grad_ptr, grad_row_stride,
        # (n,) int64, (n,) fp32 full-vocabulary lse, (n,) fp32 upstream grad
        targets_ptr, lse_ptr, g_ptr,
        n_rows, n_cols, vocab_start, inv_temperature,
        BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < n_rows
        rows = tl.minimum(rows, n_rows - 1).to(tl.int64)
        row_ptrs = logits_ptr + rows[:, None] * logits_row_stride      # (BLOCK_ROWS, 1)
        grad_row_ptrs = grad_ptr + rows[:, None] * grad_row_stride
        cols = tl.arange(0, BLOCK_V)[None, :]                           # (1, BLOCK_V)
        lse = tl.load(lse_ptr + rows)[:, None]                          # (BLOCK_ROWS, 1)
        scale = (tl.load(g_ptr + rows) * inv_temperature)[:, None]      # g_i / T
        # target column; may lie outside
        local = (tl.load(targets_ptr + rows) - vocab_start)[:, None]
        for tile_start in range(0, n_cols, BLOCK_V):
            c = tile_start + cols
            mask = row_mask[:, None] & (c < n_cols)
            x = tl.load(row_ptrs + c, mask=mask, other=0.0).to(tl.float32) * inv_temperature
            p = tl.exp(x - lse)
            # each element read, then written, by us only
            grad = scale * (tl.where(c == local, 1.0, 0.0) - p)
            tl.store(grad_row_ptrs + c, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _launch_config(n_rows, n_cols):
    """Tiles of ~4096 logits: BLOCK_V columns wide (at most _MAX_BLOCK_V) and as many rows as fit.
    At the benchmark shape that is 4 rows x 1024 columns, 4096 programs: plenty for 132 SMs."""
    block_v = min(triton.next_power_of_2(n_cols), _MAX_BLOCK_V)
    block_rows = min(max(1, 4096 // block_v), triton.next_power_of_2(n_rows))
    return (triton.cdiv(n_rows, block_rows),), dict(BLOCK_ROWS=block_rows, BLOCK_V=block_v,
                                                    num_warps=8)


def _lse_update_triton(logits, targets, start, inv_temperature, lse, target_logit):
    n, n_cols = logits.shape
    grid, config = _launch_config(n, n_cols)
    _lse_update_kernel[grid](logits, logits.stride(0), targets, lse, target_logit,
                             n, n_cols, start, inv_temperature, **config)


def _softmax_grad_triton(logits, targets, start, inv_temperature, lse, g, out_dtype):
    n, n_cols = logits.shape
    grad = logits if out_dtype == logits.dtype else torch.empty(logits.shape, dtype=out_dtype,
                                                                device=logits.device)
    grid, config = _launch_config(n, n_cols)
    _softmax_grad_kernel[grid](logits, logits.stride(0), grad, grad.stride(0), targets, lse, g,
                               n, n_cols, start, inv_temperature, **config)
    return grad


# ----------------------------------------------------------------------------------------------
# Benchmark: forward + backward at the Llama-3-8B head shape, against naive PyTorch and Liger.

def _naive_logprobs(hidden, weight, targets, ignore_index=-100):
    """What most RLHF code does: bf16 logits (N, V), fp32 log_softmax, gather."""
    logits = hidden @ weight.t()                                                   # (N, V) bf16
    valid = targets != ignore_index
    logprobs = torch.log_softmax(logits.float(), dim=-1)                           # (N, V) fp32
    logprobs = logprobs.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(valid, logprobs, torch.zeros_like(logprobs))


def _measure(name, step, params, bench_fn):
    """Run step() once for warm-up, once under the peak-memory counter, then time it with bench_fn.
    Extra peak memory = peak during one fwd+bwd minus what was allocated before (inputs and
    weights); it includes the gradients themselves (grad_weight is 1 GB at the benchmark shape) for
    every method."""
    try:
        step()
        for p in params:
            p.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        extra_gb = (torch.cuda.max_memory_allocated() - base) / 2**30
        for p in params:
            p.grad = None
        ms = bench_fn(step)
    except torch.cuda.OutOfMemoryError:
        print(f"{name:>22}: out of memory, skipped")
        for p in params:
            p.grad = None
        torch.cuda.empty_cache()
        return None
    print(f"{name:>22}: {ms:8.2f} ms   extra peak memory {extra_gb:6.2f} GB")
    return ms, extra_gb


def bench(args):
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("--bench needs a CUDA GPU (it times cuBLAS + Triton against naive PyTorch and "
              "Liger-Kernel); none is visible here. "
              "Use `--bench --cpu-smoke` to exercise the code path on a CPU.")
        return 0
    if args.cpu_smoke:
        return _cpu_smoke()
    device, dtype = torch.device("cuda"), torch.bfloat16
    N, H, V = args.tokens, args.hidden, args.vocab
    torch.manual_seed(0)
    # Final-normed hidden states are O(1); a 0.02-std head gives logits with std ~1.3 at H=4096.
    hidden = torch.randn(N, H, device=device, dtype=dtype).requires_grad_()
    weight = (0.02 * torch.randn(V, H, device=device, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, V, (N,), device=device)
    if args.ignore_fraction > 0:
        targets[torch.rand(N, device=device) < args.ignore_fraction] = -100
    n_valid = int((targets != -100).sum())
    params = [hidden, weight]
    print(f"token log-probs, forward + backward: N={N} tokens ({n_valid} not ignored), H={H}, "
          f"V={V}, bf16, {torch.cuda.get_device_name()}")
    print(f"fp32 logits from the GEMM: {_cuda_fp32_output('mm', device, dtype)}; "
          f"grad_hidden accumulated inside the GEMM: {_cuda_fp32_output('addmm', device, dtype)}")

    import triton.testing

    # median of CUDA-event timings, L2 flushed before each run, grads reset to None
    def bench_fn(step):
        return triton.testing.do_bench(step, warmup=args.warmup_ms, rep=args.rep_ms,
                                       grad_to_none=params,
                                       return_mode="median")

    def make_step(logprob_fn):
        def step():
            # mean token NLL: the SFT loss, same work as Liger's
            loss = -logprob_fn().sum() / n_valid
            loss.backward()
        return step

    results = {}
    results["ours (triton)"] = _measure("ours (triton)", make_step(
        lambda: token_logprobs(hidden, weight, targets, impl="triton", num_valid=n_valid)),
        params, bench_fn)
    if args.all:
        results["ours (chunked torch)"] = _measure("ours (chunked torch)", make_step(
            lambda: token_logprobs(hidden, weight, targets, impl="chunked", num_valid=n_valid)),
            params, bench_fn)
        # all N rows, masked
        results["ours, no num_valid"] = _measure("ours, no num_valid", make_step(
            lambda: token_logprobs(hidden, weight, targets, impl="triton")), params, bench_fn)
    results["naive PyTorch"] = _measure("naive PyTorch", make_step(
        lambda: _naive_logprobs(hidden, weight, targets)), params, bench_fn)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")

        def liger_step():
            out = liger(weight, hidden, targets)
            (out[0] if isinstance(out, tuple) else out).backward()
        results["Liger fused linear CE"] = _measure("Liger fused linear CE", liger_step, params,
                                                    bench_fn)
    except ImportError:
        print(f"{'Liger fused linear CE':>22}: liger_kernel is not installed, skipped "
              "(pip install liger-kernel)")

    _print_ratios(results, n_valid, H, V)
    _print_accuracy(hidden, weight, targets)
    return 0


def _print_ratios(results, n_valid, H, V):
    """Our TFLOP/s, and our time and memory as ratios of each other side's."""
    ours = results["ours (triton)"]
    flops = 4 * 2 * n_valid * H * V  # logits, logits recomputed, grad_hidden, grad_weight
    if ours:
        print(f"ours: {flops / ours[0] / 1e9:.0f} TFLOP/s counting 4 matmuls of 2*N*H*V")
        for name, other in results.items():
            if other and name != "ours (triton)":
                print(f"ours / {name}: time {ours[0] / other[0]:.3f}x   memory "
                      f"{ours[1] / other[1]:.3f}x")


@torch.no_grad()
def _print_accuracy(hidden, weight, targets):
    """Accuracy on a slice, against the fp32 reference (the naive path's bf16 logits for scale)."""
    rows = slice(0, min(hidden.shape[0], 1024))
    reference = token_logprobs_reference(hidden[rows], weight, targets[rows])
    ours_logps = token_logprobs(hidden[rows], weight, targets[rows], impl="triton")
    naive_logps = _naive_logprobs(hidden[rows], weight, targets[rows])
    print(f"max |logp - fp32 reference| on {reference.numel()} tokens: ours "
          f"{(ours_logps - reference).abs().max():.2e}, "
          f"naive bf16 logits {(naive_logps - reference).abs().max():.2e}")


def _cpu_smoke():
    """Tiny shapes, whatever backend "auto" picks on this machine, checked against the reference."""
    torch.manual_seed(0)
    N, H, V = 512, 64, 1000  # V not a multiple of any block size
    hidden = torch.randn(N, H, requires_grad=True)
    weight = (0.1 * torch.randn(V, H)).requires_grad_()
    targets = torch.randint(0, V, (N,))
    targets[::5] = -100
    g = torch.randn(N)
    outputs = {}
    num_valid = int((targets != -100).sum())  # a CPU tensor: reading it is free
    for impl in ("torch", resolve_impl(hidden)):
        t0 = time.perf_counter()
        logps = token_logprobs(hidden, weight, targets, impl=impl, vocab_chunk_size=384,
                               num_valid=num_valid)
        (logps * g).sum().backward()
        ms = (time.perf_counter() - t0) * 1e3
        outputs[impl] = (logps.detach(), hidden.grad, weight.grad)
        hidden.grad = weight.grad = None
        print(f"cpu smoke, {impl:>8}: {ms:7.1f} ms  (N={N}, H={H}, V={V}, fwd + bwd)")
    (a, b) = outputs.values()
    errors = [float((x - y).abs().max()) for x, y in zip(a, b)]
    print(f"max abs difference to the reference: logp {errors[0]:.1e}, grad_hidden "
          f"{errors[1]:.1e}, "
          f"grad_weight {errors[2]:.1e}")
    return 0 if max(errors) < 1e-4 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Per-token log-probs from hidden states and the "
                                                 "LM head: benchmark.")
    parser.add_argument("--bench", action="store_true",
                        help="time forward + backward against naive PyTorch and Liger (CUDA)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="with --bench: a tiny CPU run of the code path instead")
    parser.add_argument("--tokens", type=int, default=16384, help="N, number of tokens")
    parser.add_argument("--hidden", type=int, default=4096, help="H, hidden size")
    parser.add_argument("--vocab", type=int, default=128256,
                        help="V, vocabulary size (Llama-3: 128256)")
    parser.add_argument("--ignore-fraction", type=float, default=0.0,
                        help="fraction of targets set to -100")
    parser.add_argument("--all", action="store_true",
                        help="also time the chunked pure-PyTorch path on the GPU")
    parser.add_argument("--warmup-ms", type=int, default=500,
                        help="do_bench warm-up time per method (ms)")
    parser.add_argument("--rep-ms", type=int, default=3000,
                        help="do_bench measuring time per method (ms)")
    args = parser.parse_args()
    if not args.bench:
        parser.print_help()
        sys.exit(0)
    sys.exit(bench(args))
