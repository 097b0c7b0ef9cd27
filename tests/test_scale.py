"""Tests of the scale path in parallel.py and model.py: FSDP2 loading on the meta device with a
rank-0 broadcast (parallel.load_sharded: bit-identical to a single-process load), the sharded save
in the chosen dtype, the LM-head log-prob path's mixed precision under autocast, and the Triton
kernels' fallback to their PyTorch twins."""
import pytest
import torch

import model as model_module
from model import Transformer
from tests.helpers import ROOT, run_script, tiny_config

FSDP_LOAD_PROBE = """
import sys
sys.path.insert(0, sys.argv[2])  # the repository root (the script itself lives in a temp folder)
import pytest
import torch
import torch.distributed as dist
from parallel import (destroy_distributed, full_state_dict, init_distributed, load_for_training,
                      load_frozen)
from model import Transformer
path = sys.argv[1]
dist_info = init_distributed("cpu")
model = load_for_training(path, "fsdp", dist_info)
# each rank holds its shards only: about half of every parameter
local = sum(p.to_local().numel() for p in model.parameters())
total = sum(p.numel() for p in model.parameters())
assert local < 0.6 * total, (local, total)
gathered, gathered_bf16 = full_state_dict(model), full_state_dict(model, torch.bfloat16)
# a frozen model (reference, judge) takes the same sharded path: eval mode, no gradients
frozen = load_frozen(path, "fsdp", dist_info)
assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
assert sum(p.to_local().numel() for p in frozen.parameters()) == local
gathered_frozen = full_state_dict(frozen)
if dist_info.is_main:
    reference = Transformer.from_pretrained(path).state_dict()
    assert set(gathered) == set(reference), set(gathered) ^ set(reference)
    for name, tensor in reference.items():
        assert gathered[name].dtype == torch.float32 and torch.equal(gathered[name], tensor), name
        assert gathered_bf16[name].dtype == torch.bfloat16, name
        assert torch.equal(gathered_bf16[name], tensor.bfloat16()), name
        assert torch.equal(gathered_frozen[name], tensor), name
    print(f"identical: {len(reference)} tensors; rank 0 held {local} of {total} values")
else:
    assert gathered == {} and gathered_bf16 == {} and gathered_frozen == {}
destroy_distributed()
"""


def test_fsdp_meta_init_with_rank0_broadcast_equals_single_process_load(tiny_model_dir, tmp_path):
    """2 ranks (gloo): the model built on meta, sharded, and filled by rank 0's broadcast gathers
    back bit for bit to what one process loads, in fp32 and cast to bf16 for saving; a frozen model
    loaded the same way (load_frozen) too."""
    script = tmp_path / "probe.py"
    script.write_text(FSDP_LOAD_PROBE)
    out = run_script([str(script), str(tiny_model_dir), str(ROOT)], nproc=2)
    assert "identical:" in out


def test_lm_head_logprobs_run_in_the_autocast_dtype(monkeypatch):
    """Under autocast (bf16) with fp32 master weights, the hidden states and the LM head reach
    token_logprobs in bf16 (so its matmuls, forward and backward, are bf16 GEMMs with fp32 output),
    and the result equals a bf16 copy of the model's log-probs run on the same bf16 hidden
    states."""
    torch.manual_seed(0)
    model = Transformer.from_config(tiny_config(50))
    seen = []
    original = model_module.token_logprobs

    def recorded(h, w, t, **kw):
        seen.append((h.dtype, w.dtype))
        return original(h, w, t, **kw)

    monkeypatch.setattr(model_module, "token_logprobs", recorded)
    input_ids = torch.randint(0, 50, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps = model(input_ids, targets=input_ids)
        hidden = model.hidden_states(input_ids)
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert hidden.dtype == torch.bfloat16  # the residual stream runs in the compute dtype
    expected = original(hidden.reshape(18, -1), model.lm_head_weight.bfloat16(),
                        input_ids.reshape(18))
    assert torch.equal(logps.reshape(18), expected)
    logps.sum().backward()
    assert model.lm_head_weight.grad.dtype == torch.float32  # master weights keep fp32 gradients
    model.zero_grad()
    with torch.no_grad():
        seen.clear()
        model(input_ids, targets=input_ids)  # no autocast: fp32 as before
    assert seen == [(torch.float32, torch.float32)]


def test_a_triton_kernel_that_fails_on_first_use_falls_back_to_its_twin(monkeypatch):
    """rlhf_kernels.first_use_fallback: the sampling kernel raising on its first call (as a missing
    compiler would) gives one RuntimeWarning and the PyTorch twin's exact result, then and after;
    a kernel that has worked once is not hidden by the fallback."""
    import rlhf_kernels
    import rlhf_kernels.sampling as sampling

    def broken(*args, **kwargs):
        raise RuntimeError("triton: no C compiler")

    monkeypatch.setattr(rlhf_kernels, "_broken", set())
    monkeypatch.setattr(rlhf_kernels, "_proven", set())
    monkeypatch.setattr(sampling, "_sample_triton", broken)
    logits = torch.randn(4, 37, generator=torch.Generator().manual_seed(0))
    seeds = torch.arange(4)
    expected = sampling.sample_reference(logits, temperature=0.7, top_p=0.9, seeds=seeds)
    with pytest.warns(RuntimeWarning, match="failed on first use"):
        got = sampling.sample(logits, temperature=0.7, top_p=0.9, seeds=seeds, impl="triton")
    assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.logprobs, expected.logprobs)
    again = sampling.sample(logits, temperature=0.7, top_p=0.9, seeds=seeds, impl="triton")
    assert torch.equal(again.tokens, expected.tokens)
    rlhf_kernels._broken.clear()
    # once it has worked, a failure is a real error
    rlhf_kernels._proven.add("rlhf_kernels.sampling (Triton)")
    with pytest.raises(RuntimeError, match="no C compiler"):
        sampling.sample(logits, seeds=seeds, impl="triton")


def test_policy_under_autocast_equals_its_bf16_reference_at_step_zero(tiny_model_dir):
    """OSP / DPO on a GPU: the policy (fp32 master weights under bf16 autocast) and the reference
    (a bf16 copy) give bit-identical log-probs before any update, so h = 0 and the implicit
    preference strength is exactly 0.5 at step 0. Holds because the residual stream, the RMSNorm
    scale and the LM head all run in the compute dtype under autocast."""
    policy = Transformer.from_pretrained(tiny_model_dir)
    reference = Transformer.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    input_ids = torch.randint(0, policy.config.vocab_size, (3, 17),
                              generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            policy_logps = policy(input_ids, targets=input_ids)
            reference_logps = reference(input_ids, targets=input_ids)
        reference_plain = reference(input_ids, targets=input_ids)
    assert torch.equal(policy_logps, reference_logps) and torch.equal(policy_logps, reference_plain)
    bf16_model = Transformer.from_config(tiny_config(50), dtype=torch.bfloat16)
    assert bf16_model.inv_freq.dtype == torch.float32


def test_a_triton_backward_that_fails_on_first_use_falls_back_too(monkeypatch):
    """The log-prob kernel's forward is often proven under no_grad (reference log-probs) before any
    backward runs; a backward kernel that then fails on its first use still falls back to the
    chunked PyTorch loop, with gradients equal to the reference's."""
    import rlhf_kernels
    import rlhf_kernels.logprob as logprob

    def broken(*args, **kwargs):
        raise RuntimeError("triton: backward kernel failed to compile")

    monkeypatch.setattr(rlhf_kernels, "_broken", set())
    monkeypatch.setattr(rlhf_kernels, "_proven", {"rlhf_kernels.logprob (Triton)"})
    monkeypatch.setattr(logprob, "_softmax_grad_triton", broken)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=g, requires_grad=True)
    weight = torch.randn(37, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 37, (7,), generator=g)
    with pytest.warns(RuntimeWarning, match="backward.*failed on first use"):
        logprob.token_logprobs(hidden, weight, targets, impl="triton").sum().backward()
    expected_hidden, expected_weight = torch.autograd.grad(
        logprob.token_logprobs_reference(hidden, weight, targets).sum(), (hidden, weight))
    assert torch.allclose(hidden.grad, expected_hidden, atol=1e-5)
    assert torch.allclose(weight.grad, expected_weight, atol=1e-5)
