"""memory_trace.py: each stage's own step traced on fake tensors. At a small shape the traced peak
equals the real-tensor peak byte for byte, and the formula plan (memory_plan.py) is never below the
trace and within 20% of it; at full Llama-3-8B shape one trace fits 80 GiB per rank."""
import pytest

from memory_trace import (GiB, LLAMA3_8B, SELF_CHECK_CASES, TINY, check_fake_matches_real, fits,
                          plan_for, trace_stage)
from model import LoRASettings
from tests.helpers import run_script

SMALL = dict(TINY, hidden_size=256, intermediate_size=640, num_hidden_layers=4, vocab_size=1024,
             num_attention_heads=8, num_key_value_heads=4)
# (mode, ranks, LoRA, micro-batch): FSDP2 over 2 fake ranks, or one device; K = 3
CASES = SELF_CHECK_CASES


@pytest.fixture(scope="module")
def traces():
    """{case: (real-tensor peak, fake-tensor peak)}: the stage's own step, 2 steps, peak of the
    second, sequences of 64 tokens. The PyTorch twins of the kernels, as stage runs on a CPU take
    (not Triton's interpreter)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        return check_fake_matches_real(SMALL, 64)


@pytest.mark.parametrize("case", list(CASES))
def test_traced_peak_equals_the_real_tensor_peak(case, traces):
    real, fake = traces[case]
    assert real == fake  # every category, to the byte
    # a real step's worth of memory was seen (the weights alone are ~9 MB in bf16)
    assert fake["Total"] > 1e6


@pytest.mark.parametrize("case", list(CASES))
def test_the_plan_is_never_below_the_trace_and_within_20_percent(case, traces):
    mode, world, lora, micro = CASES[case]
    plan = plan_for(SMALL, mode, world, 64, micro, LoRASettings(4, 8.0) if lora else None,
                    k=3)
    ratio = plan["peak"] / traces[case][1]["Total"]
    assert 1.0 <= ratio <= 1.2, (case, ratio)


def test_lora_trace_holds_the_frozen_base_in_bf16_and_no_reference_copy(traces):
    """The trace sees what LoRA promises: the frozen base in bf16 (2 bytes a weight), and OSP with
    LoRA holds no second model (reference and judge are the policy, adapters off)."""
    from model import ModelConfig
    from memory_plan import parameter_counts
    block, outside = parameter_counts(ModelConfig.from_dict(SMALL))
    base_bytes = 2 * (4 * block + outside)
    for case in ("dpo + LoRA", "osp + LoRA"):
        assert traces[case][1]["Frozen weights"] == base_bytes, case
    # π_SFT sharded over 2 ranks in bf16, and its rope buffer (head_dim / 2 fp32 frequencies)
    assert traces["osp, FSDP2"][1]["Frozen weights"] == base_bytes // 2 + 4 * 32 // 2


def test_llama3_8b_dpo_traced_at_full_shape_fits_80_gib_per_rank():
    """One optimizer step after the first of dpo.train_step for Llama-3-8B on 8 ranks (FSDP2,
    checkpointing), 1 pair × 2 × 2048 tokens: the traced peak plus the allowance for what a trace
    cannot see fits 80 GiB, and the plan is not below the trace."""
    peak = trace_stage(LLAMA3_8B, "dpo", 8, 2048, 1)
    ok, margin = fits(peak["Total"], 80)
    assert ok and margin > 40, (peak["Total"] / GiB, margin)
    assert 15 * GiB < peak["Total"] <= plan_for(LLAMA3_8B, "dpo", 8, 2048, 1)["peak"]
    # AdamW's two fp32 moments, 1/8
    assert peak["OptState"] == pytest.approx(2 * 4 * 8_030_261_248 / 8, rel=1e-3)


def test_command_line_prints_trace_and_plan():
    out = run_script(["memory_trace.py", "--config", "tiny", "--mode", "dpo", "--world-size", "2",
                      "--seq-len", "32", "--lora-rank", "4"])
    assert "traced: tiny dpo, 2 rank(s)" in out and "memory plan per rank: dpo" in out
    assert "fits 80 GiB" in out


def test_command_line_refuses_bad_numbers_naming_the_flag():
    import subprocess
    import sys
    from tests.helpers import ROOT
    for flag, value, message in (("--k", "1", "must be ≥ 2"), ("--world-size", "0", "must be ≥ 1"),
                                 ("--gpu-gib", "-8", "must be > 0")):
        result = subprocess.run([sys.executable, "memory_trace.py", flag, value], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert f"argument {flag}: {message}" in result.stderr, result.stderr


def test_osp_on_one_device_traces_its_rollout_under_its_own_autocast():
    """One device, no LoRA: osp's rollout runs the fp32 policy under bf16 autocast into a bf16 KV
    cache, as osp.py does (training.autocast); the trace once ran it without and stopped on a
    float query against bf16 keys."""
    peak = trace_stage(TINY, "osp", world_size=1, seq_len=32, k=3, micro_batch_size=2)
    assert peak["Total"] > 0
