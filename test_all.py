"""The project's tests: CPU-first and hermetic (tiny models and tokenizers built here, Triton kernels
under TRITON_INTERPRET=1, distributed runs under torchrun with gloo). Run: pytest test_all.py"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from common import (atomic_write_text, cosine_lr, encode_conversation, encode_prompt, encode_response, end_of_turn_ids,
                    load_tokenizer, read_jsonl, stop_token_ids, write_jsonl)
from model import KVCache, Transformer

torch.set_num_threads(min(2, os.cpu_count() or 1))

# ----------------------------------------------------------------------------------------------
# Fixtures: a tiny character-level tokenizer with a ChatML template, and tiny HF checkpoints.

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_char_tokenizer(folder):
    """A character-level HF tokenizer (every printable ASCII char + newline) with ChatML specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(folder)
    return len(vocab)


def tiny_config(vocab_size, **overrides):
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab_size, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                  hidden_act="silu", bos_token_id=None, eos_token_id=3, pad_token_id=0)
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama checkpoint + char tokenizer, saved by our own save_pretrained."""
    folder = tmp_path_factory.mktemp("tiny_model")
    vocab_size = build_char_tokenizer(folder)
    torch.manual_seed(0)
    model = Transformer.from_config(tiny_config(vocab_size))
    model.save_pretrained(folder)
    return folder


def run_script(args, nproc=1, timeout=600):
    """Run a stage script (optionally under torchrun on CPU) and return its stdout; fail loudly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    else:
        command = [sys.executable, *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


# ----------------------------------------------------------------------------------------------
# model.py against transformers

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
PARITY_CASES = {
    "llama-tied": (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=True)),
    "llama-untied-gqa": (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=False)),
    "llama3-rope-scaling": (LlamaForCausalLM, LlamaConfig, dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "linear-rope-scaling": (LlamaForCausalLM, LlamaConfig, dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "qwen2-untied": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=False)),
    "qwen2-tied": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=True)),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_model_logits_match_transformers(case, tmp_path):
    hf_class, config_class, extra = PARITY_CASES[case]
    torch.manual_seed(0)
    config = config_class(vocab_size=123, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    reference = hf_class(config).eval()
    with torch.no_grad():  # random (non-zero) biases so Qwen2's q/k/v bias is actually exercised
        for name, p in reference.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    reference.save_pretrained(tmp_path / "hf")
    ours = Transformer.from_pretrained(tmp_path / "hf").eval()
    input_ids = torch.randint(0, 123, (2, 47))
    with torch.no_grad():
        expected = reference(input_ids).logits
        got = ours(input_ids)
    assert got.shape == (2, 47, 123)
    assert (got - expected).abs().max().item() <= 1e-4
    # save → transformers load → the same logits
    ours.save_pretrained(tmp_path / "ours")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(reloaded) is hf_class
    with torch.no_grad():
        assert (reloaded(input_ids).logits - got).abs().max().item() <= 1e-4


def test_model_loads_old_style_rope_config_sharded_and_bf16(tmp_path):
    """Older config.json style (rope_theta + rope_scaling keys), a sharded bf16 checkpoint."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=123, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0,
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
        expected = reference.float()(input_ids).logits  # same bf16-rounded weights, computed in fp32
        assert (ours(input_ids) - expected).abs().max().item() <= 1e-4
    assert ours.model.layers[0].self_attn.k_proj.weight.dtype == torch.float32


def test_model_rejects_unsupported_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(10, model_type="gpt2")))
    with pytest.raises(ValueError, match="gpt2"):
        Transformer.from_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(10)))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Transformer.from_pretrained(tmp_path)


def test_kv_cache_incremental_decoding_equals_full_forward():
    torch.manual_seed(0)
    model = Transformer.from_config(tiny_config(50)).eval()
    input_ids = torch.randint(0, 50, (3, 20))
    positions = torch.arange(20).expand(3, 20)
    with torch.no_grad():
        full = model(input_ids)
        cache = KVCache(model.config, batch_size=3, max_len=32, device="cpu", dtype=torch.float32)
        pieces = [model(input_ids[:, :12], position_ids=positions[:, :12], cache=cache)]  # prefill
        for t in range(12, 20):                                                           # one token at a time
            pieces.append(model(input_ids[:, t:t + 1], position_ids=positions[:, t:t + 1], cache=cache))
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
        steps = [model(continuation[:, t:t + 1], position_ids=(lengths + t)[:, None], cache=cache) for t in range(3)]
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, continuation[row]])[None])
            assert (torch.cat(steps, 1)[row] - alone[0, len(prompt):]).abs().max().item() <= 1e-5


def test_packing_documents_do_not_see_each_other():
    """Changing document 1 leaves document 2's logits unchanged, and document 2 packed after
    document 1 (positions restarting) equals document 2 run alone."""
    torch.manual_seed(0)
    model = Transformer.from_config(tiny_config(50)).eval()
    doc1, doc1_changed, doc2 = torch.randint(0, 50, (9,)), torch.randint(0, 50, (9,)), torch.randint(0, 50, (6,))
    document_ids = torch.tensor([[0] * 9 + [1] * 6])
    position_ids = torch.cat([torch.arange(9), torch.arange(6)])[None]
    with torch.no_grad():
        packed = model(torch.cat([doc1, doc2])[None], position_ids=position_ids, document_ids=document_ids)
        packed_changed = model(torch.cat([doc1_changed, doc2])[None], position_ids=position_ids, document_ids=document_ids)
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
        expected = torch.log_softmax(model(input_ids).float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        expected = torch.where(targets == -100, 0.0, expected)
        got = model(input_ids, targets=targets)
    assert (got - expected).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------------
# Tokenizer and chat formatting


def test_chat_encoding_masks_only_assistant_tokens(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6!"}]
    ids, is_assistant = encode_conversation(tokenizer, messages)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tokenizer) == [im_end]
    assert stop_token_ids(tokenizer) == [im_end]
    # The trained tokens are exactly each answer's characters followed by <|im_end|>.
    trained = [i for i, a in zip(ids, is_assistant) if a]
    assert trained == tokenizer.convert_tokens_to_ids(["4", "<|im_end|>", "6", "!", "<|im_end|>"])
    # The whole sequence decodes to the template's own rendering (minus its final newline).
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(ids) == rendered.rstrip("\n")
    # The first turn is split exactly as generation sees it: prompt ids, then response ids.
    prompt_ids = encode_prompt(tokenizer, messages[:2])
    response_ids = encode_response(tokenizer, "4")
    assert ids[:len(prompt_ids) + len(response_ids)] == prompt_ids + response_ids
    assert not any(is_assistant[:len(prompt_ids)])


# ----------------------------------------------------------------------------------------------
# common.py utilities


def test_cosine_schedule_warmup_and_decay():
    lrs = [cosine_lr(s, 100, 1.0, warmup_ratio=0.03) for s in range(100)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # monotone decay after warmup
    assert lrs[-1] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 96 / 97)).item()), abs=1e-6)
    assert cosine_lr(51, 100, 1.0, warmup_ratio=0.0, min_lr_ratio=0.1) < 0.56


def test_jsonl_roundtrip_atomic_and_errors_name_the_line(tmp_path):
    path = tmp_path / "x.jsonl"
    write_jsonl(path, [{"a": 1}, {"text": "héllo ✓"}])
    assert read_jsonl(path) == [{"a": 1}, {"text": "héllo ✓"}]
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]  # no temp file left behind
    atomic_write_text(path, '{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(ValueError, match=r"x.jsonl:3"):
        read_jsonl(path)
    atomic_write_text(path, '[1, 2]\n')
    with pytest.raises(ValueError, match=r"x.jsonl:1: expected a JSON object"):
        read_jsonl(path)


# ----------------------------------------------------------------------------------------------
# sft.py


def write_sft_data(path, n=64):
    """Conversations the tiny model can fit: echo a short string back reversed."""
    import random
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdef") for _ in range(rng.randint(3, 6)))
        rows.append({"messages": [{"role": "user", "content": f"reverse {word}"},
                                  {"role": "assistant", "content": word[::-1]}]})
    write_jsonl(path, rows)


def test_sft_lowers_loss_and_checkpoint_loads_in_transformers(tiny_model_dir, tmp_path):
    write_sft_data(tmp_path / "sft.jsonl", n=128)
    out = tmp_path / "sft_out"
    run_script(["sft.py", "--model", str(tiny_model_dir), "--scratch", "--data", str(tmp_path / "sft.jsonl"),
                "--out", str(out), "--block-size", "128", "--batch-size", "8", "--micro-batch-size", "4",
                "--epochs", "4", "--lr", "3e-3", "--device", "cpu", "--log-every", "100"])
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3
    from transformers import AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "reverse abc"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = hf.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    ours = Transformer.from_pretrained(out)
    with torch.no_grad():
        assert (ours(generated) - hf(generated).logits).abs().max().item() <= 1e-4
    # A rerun with the checkpoint already there does nothing.
    assert "skipping" in run_script(["sft.py", "--model", str(tiny_model_dir), "--data", str(tmp_path / "sft.jsonl"),
                                     "--out", str(out), "--device", "cpu"])


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_sft_distributed_matches_single_process(parallel, tiny_model_dir, tmp_path):
    """Two gloo ranks (FSDP2 or DDP) on the same global batch give the same weights as one process
    (fp32 on CPU; tolerance 1e-5 absolute on every weight after 3 AdamW steps)."""
    write_sft_data(tmp_path / "sft.jsonl", n=48)
    common_args = ["sft.py", "--model", str(tiny_model_dir), "--data", str(tmp_path / "sft.jsonl"),
                   "--block-size", "64", "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "3",
                   "--lr", "1e-3", "--device", "cpu", "--parallel", parallel]
    run_script(common_args + ["--out", str(tmp_path / "one")], nproc=1)
    run_script(common_args + ["--out", str(tmp_path / "two")], nproc=2)
    from safetensors.torch import load_file
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    initial = load_file(tiny_model_dir / "model.safetensors")
    for name in one:
        assert (one[name] - two[name]).abs().max().item() <= 1e-5, name
    assert any((one[n] - initial[n]).abs().max() > 1e-4 for n in one)  # training moved the weights


# ----------------------------------------------------------------------------------------------
# train_rm.py

import train_rm


def test_bt_loss_hand_values_and_gradient():
    chosen = torch.tensor([1.0, 0.0, -2.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 1.0], requires_grad=True)
    loss = train_rm.bt_loss(chosen, rejected)
    # −log σ(d) = log(1 + e^−d): d = 1, 0, −3
    expected = torch.tensor([0.31326169, 0.69314718, 3.04858735])
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.sum().backward()
    # d/dr_w = −σ(−d) = −(1 − σ(d)); d/dr_l = +σ(−d)
    assert torch.allclose(chosen.grad, -torch.sigmoid(-torch.tensor([1.0, 0.0, -3.0])), atol=1e-6)
    assert torch.allclose(rejected.grad, -chosen.grad)
    with_margin = train_rm.bt_loss(torch.tensor([2.0]), torch.tensor([0.0]), margin=torch.tensor([1.0]))
    assert with_margin.item() == pytest.approx(0.31326169, abs=1e-6)
    centered = train_rm.bt_loss(torch.tensor([2.0]), torch.tensor([1.0]), center_coef=0.01)
    assert centered.item() == pytest.approx(0.31326169 + 0.01 * 9, abs=1e-6)
    # Large reward gaps stay finite (logsigmoid, not log(sigmoid)).
    assert torch.isfinite(train_rm.bt_loss(torch.tensor([-200.0]), torch.tensor([200.0]))).all()


def test_reward_is_read_at_last_real_token_even_when_pad_is_eos():
    torch.manual_seed(0)
    model = Transformer.from_config(tiny_config(50), head="score").eval()
    eos = 3
    sequences = [[5, 6, 7, eos], [8, 9, eos], [10, eos, eos, 11, 12, eos]]  # eos inside a sequence too
    with torch.no_grad():
        batched = train_rm.sequence_rewards(model, sequences, pad_id=eos, device="cpu")
        alone = torch.stack([train_rm.sequence_rewards(model, [s], pad_id=eos, device="cpu")[0] for s in sequences])
        full = torch.stack([model(torch.tensor([s]))[0, -1] for s in sequences])
    assert torch.allclose(batched, alone, atol=1e-5) and torch.allclose(batched, full, atol=1e-5)


def write_pairs(path, n, seed=0):
    """Pairs for a tiny RM: chosen = the reversed word, rejected = the word unchanged."""
    import random
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        word = "".join(rng.choice("abcdef") for _ in range(rng.randint(3, 6)))
        rows.append({"id": f"p{i}", "prompt": [{"role": "user", "content": f"reverse {word}"}],
                     "chosen": word[::-1], "rejected": word + "x", "source": "even" if i % 2 == 0 else "odd"})
    write_jsonl(path, rows)


def test_reward_model_trains_exports_to_transformers_and_scores(tiny_model_dir, tmp_path):
    write_pairs(tmp_path / "pairs.jsonl", 64)
    write_pairs(tmp_path / "eval.jsonl", 32, seed=1)
    rm = tmp_path / "rm"
    out = run_script(["train_rm.py", "--model", str(tiny_model_dir), "--pairs", str(tmp_path / "pairs.jsonl"),
                      "--eval-pairs", str(tmp_path / "eval.jsonl"), "--out", str(rm), "--type", "bt", "--lr", "3e-3",
                      "--batch-size", "16", "--micro-batch-size", "8", "--epochs", "4", "--device", "cpu"])
    assert "held-out accuracy" in out
    evaluation = json.loads((rm / "eval.json").read_text())
    assert evaluation["accuracy"] > 0.75 and set(evaluation["accuracy_by_source"]) == {"even", "odd"}
    # Score a samples file with the CLI, then recompute with transformers' sequence classifier.
    samples = [{"id": f"s{i}", "prompt": [{"role": "user", "content": f"reverse {w}"}], "responses": [w[::-1], w, ""],
                "num_tokens": [len(w) + 1, len(w) + 1, 1], "finish_reasons": ["stop"] * 3}
               for i, w in enumerate(["abc", "fedcb", "aa"])]
    write_jsonl(tmp_path / "samples.jsonl", samples)
    run_script(["train_rm.py", "--score", "--rm", str(rm), "--samples", str(tmp_path / "samples.jsonl"),
                "--out", str(tmp_path / "rewards.jsonl"), "--device", "cpu", "--chunk-size", "2"])
    scored = read_jsonl(tmp_path / "rewards.jsonl")
    run_script(["train_rm.py", "--score", "--rm", str(rm), "--samples", str(tmp_path / "samples.jsonl"),
                "--out", str(tmp_path / "rewards2.jsonl"), "--device", "cpu", "--chunk-size", "1"], nproc=2)
    two_ranks = read_jsonl(tmp_path / "rewards2.jsonl")  # 2 ranks, other chunking: the same records
    assert [r["id"] for r in two_ranks] == [r["id"] for r in scored]
    assert torch.allclose(torch.tensor([r["rewards"] for r in two_ranks]), torch.tensor([r["rewards"] for r in scored]), atol=1e-5)
    assert [r["id"] for r in scored] == ["s0", "s1", "s2"] and all(len(r["rewards"]) == 3 for r in scored)
    from transformers import AutoModelForSequenceClassification
    hf = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    tokenizer = load_tokenizer(rm)
    sequences = [encode_prompt(tokenizer, r["prompt"]) + encode_response(tokenizer, resp) for r in samples for resp in r["responses"]]
    ids, lengths = torch.full((len(sequences), max(map(len, sequences))), hf.config.pad_token_id), []
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
    with torch.no_grad():
        hf_scores = hf(ids, attention_mask=(ids != hf.config.pad_token_id).long()).logits[:, 0]
    ours = torch.tensor([x for r in scored for x in r["rewards"]])
    assert (hf_scores - ours).abs().max().item() <= 1e-4
    assert hf.config.pad_token_id not in encode_response(tokenizer, "x")  # pad never inside a sequence


def test_pairwise_preference_is_order_symmetric(tiny_model_dir):
    torch.manual_seed(0)
    model = Transformer.from_pretrained(tiny_model_dir).eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    prompts = [[{"role": "user", "content": "reverse abc"}], [{"role": "user", "content": "hi"}]]
    a, b = ["cba", "hello"], ["abc", ""]
    p_ab = train_rm.pairwise_preference(model, tokenizer, prompts, a, b, "cpu")
    p_ba = train_rm.pairwise_preference(model, tokenizer, prompts, b, a, "cpu")
    assert torch.allclose(p_ab + p_ba, torch.ones(2), atol=1e-6)
    assert ((p_ab > 0) & (p_ab < 1)).all()


def test_length_bias_statistic():
    records = [{"responses": ["a", "bb", "ccc"], "rewards": [1.0, 2.0, 3.0]},       # +1
               {"responses": ["a", "bb", "ccc"], "rewards": [3.0, 2.0, 1.0]},       # −1
               {"responses": ["a", "bb"], "num_tokens": [5, 5], "rewards": [0.0, 1.0]},  # constant length: left out
               {"responses": ["a", "bbb", "cc"], "rewards": [0.0, 2.0, 1.0]}]      # +1
    mean, used, skipped = train_rm.length_bias(records)
    assert (used, skipped) == (3, 1) and mean == pytest.approx(1 / 3)


def test_process_in_chunks_resumes_without_loss_or_duplication(tmp_path):
    from common import Dist, process_in_chunks
    records = [{"id": i} for i in range(10)]
    calls = []

    def process(chunk):
        calls.append([r["id"] for r in chunk])
        if len(calls) == 3:
            raise RuntimeError("crash")
        return [{**r, "double": 2 * r["id"]} for r in chunk]

    single = Dist(0, 0, 1, torch.device("cpu"))
    with pytest.raises(RuntimeError):
        process_in_chunks(records, tmp_path / "out.jsonl", process, single, chunk_size=3)
    assert not (tmp_path / "out.jsonl").exists()
    calls.clear()
    process_in_chunks(records, tmp_path / "out.jsonl", lambda chunk: calls.append(chunk) or [{**r, "double": 2 * r["id"]} for r in chunk],
                      single, chunk_size=3)
    assert [[r["id"] for r in chunk] for chunk in calls] == [[6, 7, 8], [9]]  # chunks 0 and 1 kept from the crashed run
    assert read_jsonl(tmp_path / "out.jsonl") == [{"id": i, "double": 2 * i} for i in range(10)]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


# ----------------------------------------------------------------------------------------------
# generate.py

import generate


def greedy_reference(model, prompt, steps):
    """A plain uncached argmax loop: the full forward over the whole sequence at every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_generate_greedy_equals_uncached_loop_and_transformers(tiny_model_dir):
    model = Transformer.from_pretrained(tiny_model_dir).eval()
    prompts = [[5, 9, 13, 2], [7, 7], [20, 21, 22, 23, 24, 25, 26]]
    engine = generate.Engine(model, max_batch=2, max_len=32, stop_ids=[])  # 2 slots, 3 prompts: slots get refilled
    outputs = engine.generate(prompts, n=1, max_new_tokens=12, temperature=0.0)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for prompt, (out,) in zip(prompts, outputs):
        assert out["tokens"] == greedy_reference(model, prompt, 12) and out["finish_reason"] == "length"
        hf_tokens = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12,
                                pad_token_id=0)[0, len(prompt):].tolist()
        assert out["tokens"] == hf_tokens


def test_generate_stop_tokens_logprobs_and_n_samples(tiny_model_dir):
    torch.manual_seed(0)
    model = Transformer.from_pretrained(tiny_model_dir).eval()
    prompts = [[5, 9, 13], [7, 7, 8, 9]]
    stop = list(range(10, 60))  # many stop tokens so that most samples stop early
    engine = generate.Engine(model, max_batch=4, max_len=40, stop_ids=stop)
    seeds = [[generate.sample_seed(0, p, i) for i in range(3)] for p in range(2)]
    outputs = engine.generate(prompts, n=3, max_new_tokens=20, temperature=0.8, base_seeds=seeds)
    assert [len(o) for o in outputs] == [3, 3]
    reasons = [s["finish_reason"] for o in outputs for s in o]
    assert "stop" in reasons
    for prompt, samples in zip(prompts, outputs):
        for s in samples:
            body = s["tokens"][:-1] if s["finish_reason"] == "stop" else s["tokens"]
            assert not set(body) & set(stop)
            assert (s["tokens"][-1] in stop) == (s["finish_reason"] == "stop")
            # the log-probs are those of a teacher-forced forward at the same temperature
            with torch.no_grad():
                logits = model(torch.tensor([prompt + s["tokens"]]))[0, len(prompt) - 1:-1] / 0.8
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(s["tokens"])[:, None])[:, 0]
            assert torch.allclose(torch.tensor(s["token_logprobs"]), expected, atol=1e-4)


def test_generate_cli_seeded_samples_do_not_depend_on_batch_size_or_ranks(tiny_model_dir, tmp_path):
    prompts = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"reverse {w}"}]}
               for i, w in enumerate(["abc", "bd", "fedcba", "e", "cc"])]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    base = ["generate.py", "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "prompts.jsonl"), "--num-samples", "3",
            "--temperature", "1.0", "--max-new-tokens", "10", "--seed", "7", "--device", "cpu", "--logprobs"]
    run_script(base + ["--out", str(tmp_path / "a.jsonl"), "--batch-size", "3", "--chunk-size", "2"])
    run_script(base + ["--out", str(tmp_path / "b.jsonl"), "--batch-size", "16"])
    run_script(base + ["--out", str(tmp_path / "c.jsonl"), "--batch-size", "6", "--chunk-size", "1"], nproc=2)
    a, b, c = (read_jsonl(tmp_path / f"{x}.jsonl") for x in "abc")
    assert [r["id"] for r in a] == [p["id"] for p in prompts]
    assert [r["responses"] for r in a] == [r["responses"] for r in b] == [r["responses"] for r in c]
    assert all(len(r["responses"]) == 3 == len(r["num_tokens"]) == len(r["finish_reasons"]) for r in a)
    assert len({resp for r in a for resp in r["responses"]}) > 5  # actually sampled, not one repeated answer
    # a different seed gives different samples
    run_script(base[:-5] + ["--seed", "8", "--device", "cpu", "--out", str(tmp_path / "d.jsonl")])
    assert [r["responses"] for r in read_jsonl(tmp_path / "d.jsonl")] != [r["responses"] for r in a]


# ----------------------------------------------------------------------------------------------
# dpo.py

import dpo


def trl_sigmoid_loss(pc, pr, rc, rr, beta, label_smoothing=0.0):
    """TRL's documented DPOTrainer "sigmoid" loss (with cDPO label smoothing), written out here."""
    logits = (pc - pr) - (rc - rr)
    return -torch.nn.functional.logsigmoid(beta * logits) * (1 - label_smoothing) \
        - torch.nn.functional.logsigmoid(-beta * logits) * label_smoothing


def trl_ipo_loss(pc, pr, rc, rr, beta):
    logits = (pc - pr) - (rc - rr)
    return (logits - 1 / (2 * beta)) ** 2


def test_preference_losses_hand_values():
    # h = (−1 − (−1.5)) − (−2 − (−1.5)) = 0.5 + 0.5 = 1
    args = [torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), 0.1]
    log_sigmoid = torch.nn.functional.logsigmoid
    assert dpo.preference_loss(*args, "dpo").item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1))), abs=1e-6)
    assert dpo.preference_loss(*args, "dpo").item() == pytest.approx(0.6443967, abs=1e-6)
    assert dpo.preference_loss(*args, "ipo").item() == pytest.approx((1 - 5) ** 2, abs=1e-5)
    spce = dpo.preference_loss(*args, "spce", target=0.7).item()
    assert spce == pytest.approx(-(0.7 * log_sigmoid(torch.tensor(0.1)) + 0.3 * log_sigmoid(torch.tensor(-0.1))).item(), abs=1e-6)
    assert spce == pytest.approx(0.7 * 0.6443967 + 0.3 * 0.7443967, abs=1e-6)
    with pytest.raises(ValueError):
        dpo.preference_loss(*args, "hinge-typo")


def test_preference_losses_match_trl_formulas():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64) * 5 for _ in range(4))
    for beta in (0.01, 0.1, 1.0):
        assert torch.allclose(dpo.preference_loss(pc, pr, rc, rr, beta, "dpo"), trl_sigmoid_loss(pc, pr, rc, rr, beta), atol=1e-6)
        assert torch.allclose(dpo.preference_loss(pc, pr, rc, rr, beta, "ipo"), trl_ipo_loss(pc, pr, rc, rr, beta), atol=1e-4)
        # cDPO (label smoothing ε) = SPCE with target 1 − ε
        assert torch.allclose(dpo.preference_loss(pc, pr, rc, rr, beta, "spce", target=0.8),
                              trl_sigmoid_loss(pc, pr, rc, rr, beta, label_smoothing=0.2), atol=1e-6)


def test_dpo_is_log2_at_the_reference_and_spce_p1_is_dpo():
    logps = torch.randn(8, requires_grad=True)
    other = torch.randn(8, requires_grad=True)
    loss = dpo.preference_loss(logps, other, logps.detach(), other.detach(), 0.1, "dpo")
    assert torch.allclose(loss, torch.full((8,), math.log(2)), atol=1e-6)
    loss.sum().backward()
    # at policy = reference the gradient in h is −β·σ(0) = −β/2 per pair, not zero ...
    assert torch.allclose(logps.grad, torch.full((8,), -0.05)) and torch.allclose(other.grad, torch.full((8,), 0.05))
    # ... and zero only when the two responses coincide (or, for SPCE, when the target is 1/2)
    same = torch.randn(4, requires_grad=True)
    dpo.preference_loss(same, same, same.detach(), same.detach(), 0.1, "dpo").sum().backward()
    assert same.grad.abs().max().item() == 0.0
    h_args = (torch.randn(16), torch.randn(16), torch.randn(16), torch.randn(16), 0.3)
    assert torch.allclose(dpo.preference_loss(*h_args, "spce", target=torch.ones(16)), dpo.preference_loss(*h_args, "dpo"), atol=1e-7)


def test_spce_gradient_matches_formula_and_vanishes_at_target():
    """Paper 2: ∂L/∂h = β(σ(βh) − p); zero when the implicit strength σ(βh) equals the target p."""
    beta = 0.5
    h = torch.linspace(-4, 4, 17, requires_grad=True)
    p = torch.rand(17)
    zeros = torch.zeros(17)
    dpo.preference_loss(h, zeros, zeros, zeros, beta, "spce", target=p).sum().backward()
    assert torch.allclose(h.grad, beta * (torch.sigmoid(beta * h.detach()) - p), atol=1e-6)
    p_star = torch.tensor([0.2, 0.5, 0.9])
    h_star = (torch.log(p_star / (1 - p_star)) / beta).requires_grad_()
    dpo.preference_loss(h_star, torch.zeros(3), torch.zeros(3), torch.zeros(3), beta, "spce", target=p_star).sum().backward()
    assert h_star.grad.abs().max().item() < 1e-6
    # float64 gradcheck of all three losses through all four inputs
    inputs = [torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    for loss_type in ("dpo", "ipo", "spce"):
        assert torch.autograd.gradcheck(lambda *x: dpo.preference_loss(*x, 0.2, loss_type, target=torch.full((5,), 0.3, dtype=torch.float64)), inputs)


def test_ipo_minimum_is_at_half_inverse_beta():
    beta = 0.25
    h = torch.linspace(-2, 6, 801, requires_grad=True)
    zeros = torch.zeros(801)
    loss = dpo.preference_loss(h, zeros, zeros, zeros, beta, "ipo")
    assert h[loss.argmin()].item() == pytest.approx(1 / (2 * beta), abs=0.011)
    at_minimum = torch.tensor([2.0], requires_grad=True)
    dpo.preference_loss(at_minimum, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta, "ipo").backward()
    assert at_minimum.grad.item() == 0.0


def test_sequence_logps_sum_only_response_tokens():
    torch.manual_seed(0)
    model = Transformer.from_config(tiny_config(50)).eval()
    prompts, responses = [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10, 11]]
    with torch.no_grad():
        logps, counts = dpo.sequence_logps(model, prompts, responses, pad_id=0, device="cpu")
        for row, (p, r) in enumerate(zip(prompts, responses)):
            log_probs = torch.log_softmax(model(torch.tensor([p + r]))[0], -1)
            expected = sum(log_probs[len(p) - 1 + j, token] for j, token in enumerate(r))
            assert logps[row].item() == pytest.approx(expected.item(), abs=1e-5)
    assert counts.tolist() == [2, 4]


def test_select_pairs_best_worst_ties_and_length_penalty(tmp_path):
    records = [
        {"id": "a", "prompt": [{"role": "user", "content": "x"}], "responses": ["r0", "r1", "r2"], "rewards": [0.5, 2.0, -1.0]},
        {"id": "b", "prompt": [{"role": "user", "content": "y"}], "responses": ["same", "same"], "rewards": [1.0, 0.0]},
        {"id": "c", "prompt": [{"role": "user", "content": "z"}], "responses": ["p", "q", "s"], "rewards": [1.0, 1.0, 1.0]},
        {"id": "d", "prompt": [{"role": "user", "content": "w"}], "responses": ["u", "v"], "rewards": [0.30, 0.25]},
        # the longer answer wins on raw reward, the shorter one after a length penalty of 0.01/char
        {"id": "e", "prompt": [{"role": "user", "content": "v"}], "responses": ["short", "a much longer answer"], "rewards": [1.0, 1.1]},
    ]
    write_jsonl(tmp_path / "rewards.jsonl", records)
    records = read_jsonl(tmp_path / "rewards.jsonl")
    pairs, dropped = dpo.select_pairs(records, reward_tolerance=0.1)
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [("a", "r1", "r2"), ("e", "a much longer answer", "short")]
    assert dropped == {"same_text": 1, "reward_tie": 2}
    assert pairs[0]["margin"] == pytest.approx(3.0)
    pairs, _ = dpo.select_pairs(records, length_penalty=0.01, reward_tolerance=0.0)
    assert [(p["chosen"], p["rejected"]) for p in pairs if p["id"] == "e"] == [("short", "a much longer answer")]
    assert [p["id"] for p in pairs] == ["a", "d", "e"]


@pytest.mark.parametrize("parallel", ["fsdp"])
def test_offline_dpo_two_ranks_match_one_and_move_toward_chosen(parallel, tiny_model_dir, tmp_path):
    write_pairs(tmp_path / "pairs.jsonl", 24)
    common_args = ["dpo.py", "--pairs", str(tmp_path / "pairs.jsonl"), "--model", str(tiny_model_dir), "--beta", "0.5",
                   "--lr", "1e-3", "--batch-size", "8", "--micro-batch-size", "2", "--epochs", "2", "--device", "cpu",
                   "--parallel", parallel, "--log-every", "1"]
    run_script(common_args + ["--out", str(tmp_path / "one")], nproc=1)
    run_script(common_args + ["--out", str(tmp_path / "two")], nproc=2)
    from safetensors.torch import load_file
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name in one:
        assert (one[name] - two[name]).abs().max().item() <= 1e-5, name
    metrics = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 0: policy = reference
    assert metrics[-1]["reward_margin"] > metrics[0]["reward_margin"] and metrics[-1]["loss"] < metrics[0]["loss"]
    assert {"rewards_chosen", "rewards_rejected", "reward_accuracy", "kl", "grad_norm", "lr", "tokens_per_s"} <= set(metrics[0])
    assert len(read_jsonl(tmp_path / "one" / "ref_logps.jsonl")) == 24


def test_online_iterations_run_and_resume(tiny_model_dir, tmp_path):
    """Two online iterations on a random reward model: every sub-step's file appears, iteration 2
    starts from iteration 1's policy, and a rerun skips what is finished."""
    rm = Transformer.from_pretrained(tiny_model_dir, head="score")
    rm.save_pretrained(tmp_path / "rm", tokenizer=load_tokenizer(tiny_model_dir))
    for t in (1, 2):
        write_jsonl(tmp_path / f"prompts_{t}.jsonl", [{"id": f"t{t}-{i}", "messages": [{"role": "user", "content": f"reverse {w}"}]}
                                                      for i, w in enumerate(["abc", "bd", "fed", "ca", "eeb", "dc"])])
    run_dir = tmp_path / "run"
    first = ["dpo.py", "--iter", "1", "--run-dir", str(run_dir), "--sft", str(tiny_model_dir), "--rm", str(tmp_path / "rm"),
             "--prompts", str(tmp_path / "prompts_{t}.jsonl"), "--n", "4", "--max-new-tokens", "8", "--batch-size", "4",
             "--micro-batch-size", "2", "--lr", "1e-3", "--epochs", "1", "--device", "cpu", "--chunk-size", "4"]
    run_script(first)
    out = run_script(["dpo.py", "--iter", "2", "--run-dir", str(run_dir), "--device", "cpu"])  # settings read back
    for t in (1, 2):
        for name in ("samples.jsonl", "rewards.jsonl", "pairs.jsonl", "ref_logps.jsonl", "summary.json", "policy/model.safetensors"):
            assert (run_dir / f"iter{t}" / name).exists(), (t, name)
    summary = json.loads((run_dir / "iter2" / "summary.json").read_text())
    assert summary["prompts"] == 6 and summary["pairs_kept"] + sum(summary["pairs_dropped"].values()) == 6
    samples = read_jsonl(run_dir / "iter2" / "samples.jsonl")
    assert [r["id"] for r in samples] == [f"t2-{i}" for i in range(6)] and all(len(r["responses"]) == 4 for r in samples)
    policy2 = run_dir / "iter2" / "policy" / "metrics.jsonl"
    steps2 = len(read_jsonl(policy2))
    pairs_total = len(read_jsonl(run_dir / "iter1" / "pairs.jsonl")) + len(read_jsonl(run_dir / "iter2" / "pairs.jsonl"))
    assert steps2 == math.ceil(pairs_total / 4)  # --history all: iteration 2 trains on both iterations' pairs
    before = (run_dir / "iter2" / "policy" / "model.safetensors").stat().st_mtime_ns
    out = run_script(["dpo.py", "--iter", "2", "--run-dir", str(run_dir), "--device", "cpu"])
    assert "iteration 2 complete" in out
    assert (run_dir / "iter2" / "policy" / "model.safetensors").stat().st_mtime_ns == before
