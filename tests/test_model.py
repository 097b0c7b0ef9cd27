"""Tests of model.py against transformers: logits parity (Llama, Qwen2, Qwen3), KV cache,
packing."""
import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig,
                          LlamaForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3ForSequenceClassification)

from model import KVCache, ModelConfig, Transformer
from tests.helpers import tiny_config

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
PARITY_CASES = {
    "llama-tied": (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=True)),
    "llama-untied-gqa": (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=False)),
    "llama3-rope-scaling": (LlamaForCausalLM, LlamaConfig,
                            dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "linear-rope-scaling": (LlamaForCausalLM, LlamaConfig,
                            dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "qwen2-untied": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=False)),
    "qwen2-tied": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=True)),
    # Qwen3: q_norm / k_norm, and a head_dim (32) that is not hidden_size / num_attention_heads (16)
    "qwen3-untied": (Qwen3ForCausalLM, Qwen3Config, dict(head_dim=32, tie_word_embeddings=False)),
    "qwen3-tied": (Qwen3ForCausalLM, Qwen3Config, dict(head_dim=32, tie_word_embeddings=True)),
    # a window on every layer (max_window_layers=0) shorter than the sequence
    "qwen3-sliding-window": (Qwen3ForCausalLM, Qwen3Config,
                             dict(head_dim=32, use_sliding_window=True, sliding_window=6,
                                                                 max_window_layers=0)),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_model_logits_match_transformers(case, tmp_path):
    hf_class, config_class, extra = PARITY_CASES[case]
    torch.manual_seed(0)
    config = config_class(vocab_size=123, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          **extra)
    reference = hf_class(config).eval()
    randomize_biases_and_norms(reference)
    reference.save_pretrained(tmp_path / "hf")
    ours = Transformer.from_pretrained(tmp_path / "hf").eval()
    input_ids = torch.randint(0, 123, (2, 47))
    with torch.no_grad():
        expected = reference(input_ids).logits
        got = ours(input_ids)
    assert got.shape == (2, 47, 123)
    assert (got - expected).abs().max().item() <= 1e-4
    # transformers' window, if in use
    assert ours.config.sliding_window == getattr(config, "sliding_window", None)
    # save → transformers load → the same logits
    ours.save_pretrained(tmp_path / "ours")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(reloaded) is hf_class
    with torch.no_grad():
        assert (reloaded(input_ids).logits - got).abs().max().item() <= 1e-4


def randomize_biases_and_norms(model):
    """Random (non-zero) biases and (non-one) norm weights, so Qwen2's q/k/v bias and Qwen3's
    q_norm / k_norm are actually exercised (transformers initialises them to 0 and 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif name.endswith("norm.weight"):
                p.normal_(1, 0.5)


QWEN3_TINY = dict(vocab_size=123, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=256, pad_token_id=0)


def test_qwen3_reward_model_export_scores_like_transformers(tmp_path):
    """A Qwen3 reward model (head="score") saved by us: AutoModelForSequenceClassification loads it
    as Qwen3ForSequenceClassification, and its score is ours at the last token."""
    torch.manual_seed(0)
    reference = Qwen3ForCausalLM(Qwen3Config(**QWEN3_TINY)).eval()
    randomize_biases_and_norms(reference)
    reference.save_pretrained(tmp_path / "hf")
    ours = Transformer.from_pretrained(tmp_path / "hf", head="score").eval()
    ours.save_pretrained(tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert type(hf) is Qwen3ForSequenceClassification
    input_ids = torch.randint(1, 123, (2, 13))  # no pad id (0): transformers scores the last token
    with torch.no_grad():
        assert (hf(input_ids).logits[:, 0] - ours(input_ids)[:, -1]).abs().max().item() <= 1e-4


def test_qwen3_config_reading():
    """head_dim defaults to 128 as in transformers' Qwen3Config; no q/k/v bias unless
    attention_bias; a sliding window only with use_sliding_window, and a window on some layers only
    is refused."""
    config = ModelConfig.from_dict({"model_type": "qwen3",
                                    **{k: v for k, v in QWEN3_TINY.items() if k != "head_dim"}})
    assert (config.head_dim, config.qk_norm, config.qkv_bias, config.o_bias,
            config.sliding_window) == (128, True, False, False, None)
    assert Transformer(config).model.layers[0].self_attn.q_norm.weight.shape == (128,)
    biased = ModelConfig.from_dict({"model_type": "qwen3", **QWEN3_TINY, "attention_bias": True})
    assert biased.qkv_bias and biased.o_bias  # as Qwen3Attention: attention_bias biases o_proj too
    assert not ModelConfig.from_dict({"model_type": "qwen2", **QWEN3_TINY}).qk_norm
    sliding = {"model_type": "qwen3", **QWEN3_TINY, "use_sliding_window": True, "sliding_window": 8}
    assert ModelConfig.from_dict({**sliding, "use_sliding_window": False}).sliding_window is None
    # max_window_layers 28 > 2 layers: all full
    assert ModelConfig.from_dict(sliding).sliding_window is None
    assert ModelConfig.from_dict({**sliding, "max_window_layers": 0}).sliding_window == 8
    assert ModelConfig.from_dict({**sliding,
                                  "layer_types": ["sliding_attention"] * 2}).sliding_window == 8
    with pytest.raises(ValueError, match="sliding window on layers \\[1\\]"):
        ModelConfig.from_dict({**sliding, "max_window_layers": 1})
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig.from_dict({**sliding, "layer_types": ["full_attention", "chunked_attention"]})


def test_model_loads_old_style_rope_config_sharded_and_bf16(tmp_path):
    """Older config.json style (rope_theta + rope_scaling keys), a sharded bf16 checkpoint."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=123, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, rope_scaling=LLAMA3_ROPE,
                         rope_theta=500000.0,
                         tie_word_embeddings=False)
    reference = LlamaForCausalLM(config).eval()
    reference.to(torch.bfloat16).save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    config_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    rope = config_json.pop("rope_parameters")
    config_json["rope_theta"] = rope.pop("rope_theta")
    config_json["rope_scaling"] = rope
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config_json))
    ours = Transformer.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    input_ids = torch.randint(0, 123, (1, 40))
    with torch.no_grad():
        # same bf16-rounded weights, computed in fp32
        expected = reference.float()(input_ids).logits
        assert (ours(input_ids) - expected).abs().max().item() <= 1e-4
    assert ours.model.layers[0].self_attn.k_proj.weight.dtype == torch.float32


def test_model_rejects_unsupported_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(10, model_type="gpt2")))
    with pytest.raises(ValueError, match="gpt2"):
        Transformer.from_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(10)))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Transformer.from_pretrained(tmp_path)


def tiny_model(model_type):
    """A random tiny model; Qwen3 with head_dim 32 (not 64 / 4) and random q_norm / k_norm
    weights."""
    torch.manual_seed(0)
    if model_type == "llama":
        return Transformer.from_config(tiny_config(50)).eval()
    model = Transformer.from_config(tiny_config(50, model_type="qwen3", head_dim=32)).eval()
    randomize_biases_and_norms(model)
    return model


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_kv_cache_incremental_decoding_equals_full_forward(model_type):
    model = tiny_model(model_type)
    input_ids = torch.randint(0, 50, (3, 20))
    positions = torch.arange(20).expand(3, 20)
    with torch.no_grad():
        full = model(input_ids)
        cache = KVCache(model.config, batch_size=3, max_len=32, device="cpu", dtype=torch.float32)
        pieces = [model(input_ids[:, :12], position_ids=positions[:, :12], cache=cache)]  # prefill
        # one token at a time
        for t in range(12, 20):
            pieces.append(model(input_ids[:, t:t + 1], position_ids=positions[:, t:t + 1],
                                cache=cache))
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-5


def test_kv_cache_rows_at_different_positions_match_unpadded():
    """Rows of different prompt lengths prefilled together (right-padded) and decoded at their own
    positions: each row's logits equal its own unpadded full forward. Stale slots are never read."""
    torch.manual_seed(0)
    model = Transformer.from_config(tiny_config(50)).eval()
    prompts = [torch.randint(0, 50, (n,)) for n in (7, 4)]
    continuation = torch.randint(0, 50, (2, 3))
    input_ids = torch.randint(0, 50, (2, 7))  # padding = random junk: it must not matter
    for row, prompt in enumerate(prompts):
        input_ids[row, :len(prompt)] = prompt
    cache = KVCache(model.config, batch_size=2, max_len=16, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        model(input_ids, position_ids=torch.arange(7).expand(2, 7), cache=cache)
        lengths = torch.tensor([len(p) for p in prompts])
        steps = [model(continuation[:, t:t + 1], position_ids=(lengths + t)[:, None], cache=cache)
                 for t in range(3)]
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, continuation[row]])[None])
            assert (torch.cat(steps, 1)[row] - alone[0, len(prompt):]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_packing_documents_do_not_see_each_other(model_type):
    """Changing document 1 leaves document 2's logits unchanged, and document 2 packed after
    document 1 (positions restarting) equals document 2 run alone."""
    model = tiny_model(model_type)
    doc1, doc1_changed, doc2 = torch.randint(0, 50,
                                             (9,)), torch.randint(0, 50,
                                                                  (9,)), torch.randint(0, 50, (6,))
    document_ids = torch.tensor([[0] * 9 + [1] * 6])
    position_ids = torch.cat([torch.arange(9), torch.arange(6)])[None]
    with torch.no_grad():
        packed = model(torch.cat([doc1, doc2])[None], position_ids=position_ids,
                       document_ids=document_ids)
        packed_changed = model(torch.cat([doc1_changed, doc2])[None], position_ids=position_ids,
                               document_ids=document_ids)
        alone = model(doc2[None])
    assert (packed[0, 9:] - packed_changed[0, 9:]).abs().max().item() == 0.0
    assert (packed[0, 9:] - alone[0]).abs().max().item() <= 1e-5
    assert (packed[0, :9] - packed_changed[0, :9]).abs().max().item() > 0  # document 1 did change


def test_model_targets_path_equals_log_softmax_of_logits():
    torch.manual_seed(0)
    model = Transformer.from_config(tiny_config(50)).eval()
    input_ids = torch.randint(0, 50, (2, 11))
    targets = torch.randint(0, 50, (2, 11))
    targets[0, :4] = -100
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids).float(),
                                     -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        expected = torch.where(targets == -100, 0.0, expected)
        got = model(input_ids, targets=targets)
    assert (got - expected).abs().max().item() <= 1e-5


def test_new_reward_head_is_initialised_like_transformers(tmp_path):
    """A reward head started on a causal-LM checkpoint: normal(0, initializer_range), as
    transformers' *ForSequenceClassification (and so TRL's RewardTrainer) initialises it; 0.02
    when the config has none."""
    for initializer_range in (0.02, 0.2):
        folder = tmp_path / str(initializer_range)
        torch.manual_seed(0)
        Transformer.from_config(tiny_config(64, hidden_size=256,
                                            initializer_range=initializer_range)).save_pretrained(folder)
        head = Transformer.from_pretrained(folder, head="score").score.weight
        assert head.shape == (1, 256) and abs(head.std().item() / initializer_range - 1) < 0.15


@pytest.mark.parametrize("precision", ["float32", "bf16 autocast", "activation checkpointing"])
def test_recomputed_norms_and_gates_give_the_same_gradients_bit_for_bit(precision, monkeypatch):
    """model.recomputed keeps only RMSNorm's and SwiGLU's inputs for the backward and runs them
    again there: every gradient and the loss equal, to the bit, those of the plain forward that
    keeps their intermediates (under autocast too, whose state the recompute must restore)."""
    import model as model_module

    def run():
        torch.manual_seed(0)
        model = Transformer.from_config(tiny_config(50, num_hidden_layers=3))
        randomize_biases_and_norms(model)
        model.set_activation_checkpointing(precision == "activation checkpointing")
        input_ids = torch.randint(0, 50, (3, 24))
        targets = torch.randint(0, 50, (3, 24))
        kept = {}  # the storages autograd keeps for the backward: bytes each

        def keep(tensor):
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16 autocast"), \
                torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            loss = model(input_ids, targets=targets).float().sum()
        loss.backward()
        return loss, {name: p.grad for name, p in model.named_parameters()}, sum(kept.values())

    loss, grads, kept = run()
    monkeypatch.setattr(model_module, "recomputed", lambda fn, *inputs: fn(*inputs))
    plain_loss, plain_grads, plain_kept = run()
    assert torch.equal(loss, plain_loss)
    assert all(torch.equal(grads[name], plain_grads[name]) for name in grads)
    if precision != "activation checkpointing":  # (there a block keeps only its input anyway)
        assert kept < plain_kept
