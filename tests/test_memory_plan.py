"""memory_plan.py: exact arithmetic facts, LoRA, the Llama-3-8B plans. (The plan against a traced
peak: tests/test_memory_trace.py.)"""
import json
import runpy
import sys

import torch

from memory_plan import GiB, format_memory_plan, memory_plan, parameter_counts
from model import KVCache, ModelConfig, Transformer
from tests.helpers import ROOT, tiny_config

SMALL = tiny_config(4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    tie_word_embeddings=False)
LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 8192,
             "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
             "hidden_act": "silu"}


# ----------------------------------------------------------------------------------------------
# Facts that hold exactly in the formulas


def test_parameter_counts_match_the_model():
    for overrides in ({}, {"tie_word_embeddings": True}, {"model_type": "qwen2"},
                      {"model_type": "qwen3"}, {"attention_bias": True, "mlp_bias": True}):
        for head in ("lm", "score"):
            config = ModelConfig.from_dict({**SMALL, **overrides})
            with torch.device("meta"):
                model = Transformer(config, head=head)
            block, outside = parameter_counts(config, head)
            assert (config.num_hidden_layers * block + outside
                    == model.num_parameters()), (overrides, head)
    block, outside = parameter_counts(ModelConfig.from_dict(LLAMA3_8B))
    assert 32 * block + outside == 8_030_261_248  # Meta-Llama-3-8B


def test_fsdp_shards_weights_gradients_and_optimizer_by_world_size():
    config = ModelConfig.from_dict(LLAMA3_8B)
    one = memory_plan(config, 1, 1, 2048, "sft")
    for world_size in (2, 8, 64):
        sharded = memory_plan(config, world_size, 1, 2048, "sft")
        for row in ("weights (master)", "gradients", "AdamW state"):
            assert sharded["rows"][row] == one["rows"][row] // world_size
        # per rank, not sharded
        for row in ("compute copy (gathered)", "activations (kept)", "working set"):
            assert sharded["rows"][row] == one["rows"][row]
        ddp = memory_plan(config, world_size, 1, 2048, "sft", parallel="ddp")
        assert ddp["rows"]["weights (master)"] == one["rows"]["weights (master)"]
        assert ddp["rows"]["gradients"] == 2 * one["rows"]["gradients"]  # + DDP's gradient buckets


def test_checkpointing_keeps_one_hidden_state_per_block():
    config = ModelConfig.from_dict(LLAMA3_8B)
    on, off = (memory_plan(config, 8, 1, 4096, "sft", activation_checkpointing=c)
               for c in (True, False))
    assert on["rows"]["activations (kept)"] < off["rows"]["activations (kept)"] / 10
    assert on["total"] < off["total"]
    # one more block keeps exactly one more (B·T, H) bf16 input
    deeper = ModelConfig.from_dict({**LLAMA3_8B, "num_hidden_layers": 33})
    more = (memory_plan(deeper, 8, 1, 4096, "sft")["rows"]["activations (kept)"]
            - on["rows"]["activations (kept)"])
    assert more == 4096 * 4096 * 2


def test_dpo_is_sft_with_twice_the_sequences():
    config = ModelConfig.from_dict(LLAMA3_8B)
    for checkpointing in (True, False):
        # a pair at T/2 holds as many tokens as one sequence at T: every row is the same
        dpo = memory_plan(config, 8, 1, 1024, "dpo", packed=False,
                          activation_checkpointing=checkpointing)
        sft = memory_plan(config, 8, 1, 2048, "sft", packed=False,
                          activation_checkpointing=checkpointing)
        assert {k: v for k, v in dpo["rows"].items() if k != "reference model"} == sft["rows"]
        # and at the same T, twice the activations of a micro-batch
        sft_same_length = memory_plan(config, 8, 1, 1024, "sft", packed=False,
                                      activation_checkpointing=checkpointing)
        assert (dpo["rows"]["activations (kept)"]
                == 2 * sft_same_length["rows"]["activations (kept)"])
        assert dpo["block_backward"] == 2 * sft_same_length["block_backward"]


def test_lm_head_never_materialises_the_logits():
    config = ModelConfig.from_dict(LLAMA3_8B)
    plan = memory_plan(config, 8, 1, 8192, "sft")
    # (N, V) fp32 logits would be 3.9 GiB
    assert plan["lm_head"] < 8192 * config.vocab_size * 4 / 4
    assert memory_plan(config, 8, 1, 8192, "rm")["lm_head"] == 0


def test_kv_cache_bytes_equal_the_models_cache():
    config = ModelConfig.from_dict(SMALL)
    cache = KVCache(config, batch_size=3, max_len=40, device="cpu", dtype=torch.bfloat16)
    actual = sum(t.nbytes for t in cache.k + cache.v)
    plan = memory_plan(config, 1, 3, 40, "sample")
    assert plan["rows"]["KV cache"] == actual
    assert plan["rows"]["weights"] == 2 * Transformer(config).num_parameters()
    beside_training = memory_plan(config, 1, 3, 40, "sft", kv_cache_slots=3, kv_cache_len=40)
    assert beside_training["rows"]["KV cache"] == actual
    # Llama-3-8B: 8192 positions of one sequence are exactly 1 GiB in bf16 (32 layers × 2 × 8
    # heads × 128: ModelConfig.kv_bytes_per_position)
    llama = ModelConfig.from_dict(LLAMA3_8B)
    assert llama.kv_bytes_per_position(2) == 128 * 1024
    assert memory_plan(llama, 1, 1, 8192, "sample")["rows"]["KV cache"] == GiB


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
    monkeypatch.setattr(sys, "argv", ["memory_plan.py", "--config", str(path), "--world-size", "8",
                                      "--mode", "dpo", "--seq-len", "2048",
                                      "--micro-batch-size", "1"])
    runpy.run_path(str(ROOT / "memory_plan.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "AdamW state" in out and "reference pass" in out and "fits 80 GiB of GPU" in out


def test_dry_run_prints_the_plan_and_loads_nothing(tiny_model_dir, tmp_path):
    """sft.py / dpo.py / train_rm.py train / osp.py --dry-run: the plan, exit 0, no output
    written."""
    from tests.helpers import run_script
    stages = {
        "sft": ["sft.py", "--model", str(tiny_model_dir), "--data", str(tmp_path / "absent.jsonl")],
        "dpo": ["dpo.py", "--model", str(tiny_model_dir), "--pairs",
                str(tmp_path / "absent.jsonl")],
        "rm": ["train_rm.py", "train", "--type", "bt", "--model", str(tiny_model_dir), "--pairs",
               str(tmp_path / "absent.jsonl")],
        "osp": ["osp.py", "--model", str(tiny_model_dir), "--prompts",
                str(tmp_path / "absent.jsonl")],
    }
    for name, args in stages.items():
        out = run_script(args + ["--out", str(tmp_path / name), "--dry-run", "--device", "cpu"])
        assert "memory plan per rank" in out and "AdamW state" in out, out
        assert not (tmp_path / name).exists()


def test_lora_trains_only_the_adapters_and_keeps_no_reference_copy():
    from memory_plan import osp_memory_plan
    from model import LoRASettings

    config = ModelConfig.from_dict(LLAMA3_8B)
    lora = LoRASettings(64, 32.0)
    plan = memory_plan(config, 1, 1, 2048, "dpo", parallel="none", lora=lora,
                       resident_reference=True)
    # q,k,v,o,gate,up,down at rank 64: 64 × (in + out) summed, 32 layers; fp32 master, gradient,
    # 2 AdamW moments
    adapters = 32 * 64 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 14336))
    assert plan["rows"]["weights (master)"] == 4 * adapters
    assert plan["rows"]["AdamW state"] == 8 * adapters
    assert plan["rows"]["frozen base"] == 2 * 8_030_261_248
    assert plan["rows"]["compute copy (gathered)"] == 0
    full = memory_plan(config, 1, 1, 2048, "dpo", parallel="none", resident_reference=True)
    # adapters off: no copy
    assert (plan["rows"]["reference model"]
            == full["rows"]["reference model"] - 2 * 8_030_261_248)
    osp = osp_memory_plan(config, 1, 2, 1024, 2, 7, parallel="none", lora=lora)
    assert osp["rows"]["π_SFT (reference, judge)"] == 0 and osp["peak"] < 48 * GiB
