"""memory_plan.py: the estimate against a measured CPU peak, exact arithmetic facts, the Llama-3-8B plans."""
import gc
import json
import runpy
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from common import make_optimizer, optimizer_step
from memory_plan import GiB, format_memory_plan, memory_plan, parameter_counts
from model import KVCache, ModelConfig, Transformer
from tests.helpers import ROOT, tiny_config

SMALL = tiny_config(4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
             "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
             "tie_word_embeddings": False, "hidden_act": "silu"}


def cpu_plan(mode, micro_batch_size, seq_len, checkpointing, **overrides):
    """The plan of the measured setting: fp32 on one CPU, no separate compute copy, no wrapper."""
    return memory_plan(ModelConfig.from_dict(SMALL), 1, micro_batch_size, seq_len, mode, parallel="none",
                       activation_checkpointing=checkpointing, param_dtype_bytes=4, master_dtype_bytes=4,
                       device="cpu", **overrides)


def enable_checkpointing(model):
    """The model's activation-checkpointing switch, whichever form it has; False when it has none."""
    if hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(True)
        return True
    if hasattr(model, "activation_checkpointing"):
        model.activation_checkpointing = True
        return True
    return False


def measured_peak_bytes(mode, micro_batch_size, seq_len, checkpointing, trace_path):
    """Peak live CPU bytes of: build the model and AdamW, create AdamW's state (a step on zero
    gradients), then one training step (forward, backward, step) -- a step as every step after the
    first runs. Read from the profiler's allocation events ("Total Allocated" counts the bytes
    allocated and not yet freed since profiling began)."""
    torch.manual_seed(0)
    sequences = micro_batch_size * (2 if mode == "dpo" else 1)
    input_ids = torch.randint(0, SMALL["vocab_size"], (sequences, seq_len))
    targets = torch.randint(0, SMALL["vocab_size"], (sequences, seq_len))
    position_ids = document_ids = None
    if mode == "sft":  # two packed documents per row, as sft.py's blocks
        document_ids = (torch.arange(seq_len) >= seq_len // 3).long().expand(sequences, seq_len).contiguous()
        position_ids = torch.where(document_ids == 0, torch.arange(seq_len), torch.arange(seq_len) - seq_len // 3)
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = Transformer.from_config(SMALL)
        if checkpointing and not enable_checkpointing(model):
            pytest.skip("the model has no activation-checkpointing switch yet")
        optimizer = make_optimizer(model, lr=1e-4)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer_step(model, optimizer, grad_clip=1.0)  # exp_avg, exp_avg_sq now exist; grads are None again
        logps = model(input_ids, position_ids=position_ids, document_ids=document_ids, targets=targets)
        (-logps.mean()).backward()
        optimizer_step(model, optimizer, grad_clip=1.0)
        del model, optimizer, logps
    prof.export_chrome_trace(str(trace_path))
    events = [e["args"] for e in json.loads(trace_path.read_text())["traceEvents"]
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    baseline = events[0]["Total Allocated"] - events[0]["Bytes"]  # the count is process-wide: start from zero
    return max(e["Total Allocated"] for e in events) - baseline


@pytest.mark.parametrize("mode,micro_batch_size,checkpointing", [("sft", 2, False), ("sft", 2, True), ("dpo", 1, False)])
def test_estimate_within_25_percent_of_measured_cpu_peak(mode, micro_batch_size, checkpointing, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS", "chunked")  # the log-prob path CPU runs take (not Triton's interpreter)
    seq_len = 512
    measured = measured_peak_bytes(mode, micro_batch_size, seq_len, checkpointing, tmp_path / "trace.json")
    plan = cpu_plan(mode, micro_batch_size, seq_len, checkpointing)
    ratio = plan["total"] / measured
    print(f"{mode} checkpointing={checkpointing}: measured {measured / 2**20:.1f} MiB, "
          f"estimated {plan['total'] / 2**20:.1f} MiB, ratio {ratio:.3f}\n{format_memory_plan(plan)}")
    assert 0.75 < ratio < 1.25
    # The comparison can fail: plans with a clearly wrong element land outside the band.
    wrong_checkpointing = cpu_plan(mode, micro_batch_size, seq_len, not checkpointing)["total"] / measured
    assert not 0.75 < wrong_checkpointing < 1.25, wrong_checkpointing
    if checkpointing:  # without checkpointing the activations dwarf AdamW's state at this size
        no_optimizer = (plan["total"] - plan["rows"]["AdamW state"]) / measured
        assert not 0.75 < no_optimizer < 1.25, no_optimizer


# ----------------------------------------------------------------------------------------------
# Facts that hold exactly in the formulas


def test_parameter_counts_match_the_model():
    for overrides in ({}, {"tie_word_embeddings": True}, {"model_type": "qwen2"}, {"attention_bias": True, "mlp_bias": True}):
        for head in ("lm", "score"):
            config = ModelConfig.from_dict({**SMALL, **overrides})
            with torch.device("meta"):
                model = Transformer(config, head=head)
            block, outside = parameter_counts(config, head)
            assert config.num_hidden_layers * block + outside == model.num_parameters(), (overrides, head)
    block, outside = parameter_counts(ModelConfig.from_dict(LLAMA3_8B))
    assert 32 * block + outside == 8_030_261_248  # Meta-Llama-3-8B


def test_fsdp_shards_weights_gradients_and_optimizer_by_world_size():
    config = ModelConfig.from_dict(LLAMA3_8B)
    one = memory_plan(config, 1, 1, 2048, "sft")
    for world_size in (2, 8, 64):
        sharded = memory_plan(config, world_size, 1, 2048, "sft")
        for row in ("weights (master)", "gradients", "AdamW state"):
            assert sharded["rows"][row] == one["rows"][row] // world_size
        for row in ("compute copy (gathered)", "activations (kept)", "working set"):  # per rank, not sharded
            assert sharded["rows"][row] == one["rows"][row]
        ddp = memory_plan(config, world_size, 1, 2048, "sft", parallel="ddp")
        assert ddp["rows"]["weights (master)"] == one["rows"]["weights (master)"]
        assert ddp["rows"]["gradients"] == 2 * one["rows"]["gradients"]  # + DDP's gradient buckets


def test_checkpointing_keeps_one_hidden_state_per_block():
    config = ModelConfig.from_dict(LLAMA3_8B)
    on, off = (memory_plan(config, 8, 1, 4096, "sft", activation_checkpointing=c) for c in (True, False))
    assert on["rows"]["activations (kept)"] < off["rows"]["activations (kept)"] / 10
    assert on["total"] < off["total"]
    # one more block keeps exactly one more (B·T, H) bf16 input
    deeper = ModelConfig.from_dict({**LLAMA3_8B, "num_hidden_layers": 33})
    more = memory_plan(deeper, 8, 1, 4096, "sft")["rows"]["activations (kept)"] - on["rows"]["activations (kept)"]
    assert more == 4096 * 4096 * 2


def test_dpo_is_sft_with_twice_the_sequences():
    config = ModelConfig.from_dict(LLAMA3_8B)
    for checkpointing in (True, False):
        # a pair at T/2 holds as many tokens as one sequence at T: every row is the same
        dpo = memory_plan(config, 8, 1, 1024, "dpo", packed=False, activation_checkpointing=checkpointing)
        sft = memory_plan(config, 8, 1, 2048, "sft", packed=False, activation_checkpointing=checkpointing)
        assert {k: v for k, v in dpo["rows"].items() if k != "reference model"} == sft["rows"]
        # and at the same T, twice the activations of a micro-batch
        sft_same_length = memory_plan(config, 8, 1, 1024, "sft", packed=False, activation_checkpointing=checkpointing)
        assert dpo["rows"]["activations (kept)"] == 2 * sft_same_length["rows"]["activations (kept)"]
        assert dpo["block_backward"] == 2 * sft_same_length["block_backward"]


def test_lm_head_never_materialises_the_logits():
    config = ModelConfig.from_dict(LLAMA3_8B)
    plan = memory_plan(config, 8, 1, 8192, "sft")
    assert plan["lm_head"] < 8192 * config.vocab_size * 4 / 4   # (N, V) fp32 logits would be 3.9 GiB
    assert memory_plan(config, 8, 1, 8192, "rm")["lm_head"] == 0


def test_kv_cache_bytes_equal_the_models_cache():
    config = ModelConfig.from_dict(SMALL)
    cache = KVCache(config, batch_size=3, max_len=40, device="cpu", dtype=torch.bfloat16)
    actual = sum(t.nbytes for t in cache.k + cache.v)
    plan = memory_plan(config, 1, 3, 40, "sample")
    assert plan["rows"]["KV cache"] == actual
    assert plan["rows"]["weights"] == 2 * Transformer(config).num_parameters()
    assert memory_plan(config, 1, 3, 40, "sft", kv_cache_slots=3, kv_cache_len=40)["rows"]["KV cache"] == actual
    # Llama-3-8B: 8192 positions of one sequence are exactly 1 GiB in bf16 (32 layers × 2 × 8 heads × 128)
    assert memory_plan(ModelConfig.from_dict(LLAMA3_8B), 1, 1, 8192, "sample")["rows"]["KV cache"] == GiB


# ----------------------------------------------------------------------------------------------
# Llama-3-8B on 8 × 80 GiB


def test_llama3_8b_sft_and_dpo_fit_80_gib_per_rank():
    config = ModelConfig.from_dict(LLAMA3_8B)
    sft = memory_plan(config, 8, 1, 8192, "sft", parallel="fsdp", activation_checkpointing=True)
    dpo = memory_plan(config, 8, 1, 2048, "dpo", parallel="fsdp", activation_checkpointing=True)
    for plan in (sft, dpo):
        assert plan["peak"] < 80 * GiB, format_memory_plan(plan)
        assert "fits 80 GiB of GPU" in format_memory_plan(plan)
    assert dpo["reference_pass"] < dpo["total"]  # the reference pass never sets the peak
    # the same SFT on one rank (no sharding) does not fit
    assert memory_plan(config, 1, 1, 8192, "sft")["peak"] > 80 * GiB


def test_command_line_prints_the_plan(tmp_path, monkeypatch, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA3_8B))
    monkeypatch.setattr(sys, "argv", ["memory_plan.py", "--config", str(path), "--world-size", "8", "--mode", "dpo",
                                      "--seq-len", "2048", "--micro-batch-size", "1"])
    runpy.run_path(str(ROOT / "memory_plan.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "AdamW state" in out and "reference pass" in out and "fits 80 GiB of GPU" in out


def test_dry_run_prints_the_plan_and_loads_nothing(tiny_model_dir, tmp_path):
    """sft.py / dpo.py / train_rm.py train / osp.py --dry-run: the plan, exit 0, no output written."""
    from tests.helpers import run_script
    stages = {
        "sft": ["sft.py", "--model", str(tiny_model_dir), "--data", str(tmp_path / "absent.jsonl")],
        "dpo": ["dpo.py", "--model", str(tiny_model_dir), "--pairs", str(tmp_path / "absent.jsonl")],
        "rm": ["train_rm.py", "train", "--type", "bt", "--model", str(tiny_model_dir), "--pairs", str(tmp_path / "absent.jsonl")],
        "osp": ["osp.py", "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "absent.jsonl")],
    }
    for name, args in stages.items():
        out = run_script(args + ["--out", str(tmp_path / name), "--dry-run", "--device", "cpu"])
        assert "memory plan per rank" in out and "AdamW state" in out, out
        assert not (tmp_path / name).exists()
