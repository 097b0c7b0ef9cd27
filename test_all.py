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
    # Stage scripts use the PyTorch kernels on CPU: the Triton ones run under the (slow) interpreter only in
    # the kernel tests, which compare them with these.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
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
    ids = torch.full((len(sequences), max(map(len, sequences))), hf.config.pad_token_id)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
    with torch.no_grad():
        hf_scores = hf(ids, attention_mask=(ids != hf.config.pad_token_id).long()).logits[:, 0]
    ours = torch.tensor([x for r in scored for x in r["rewards"]])
    assert (hf_scores - ours).abs().max().item() <= 1e-4
    assert hf.config.pad_token_id not in encode_response(tokenizer, "x")  # pad never inside a sequence


def test_bt_reward_model_learns_builtin_task_above_chance(task_dir, tmp_path):
    """A short run from a random-init backbone on 3,000 labelled pairs of the built-in task: held-out
    accuracy on 200 pairs is clearly above chance (0.5); the labels' own agreement with the gold
    reward, the ceiling, is about 0.84."""
    start = builtin_model_dir(task_dir, tmp_path / "init")
    run_script(["train_rm.py", "--type", "bt", "--model", str(start), "--pairs", str(task_dir / "pairs_train.jsonl"),
                "--eval-pairs", str(task_dir / "pairs_eval.jsonl"), "--out", str(tmp_path / "rm"), "--lr", "1e-3",
                "--batch-size", "64", "--micro-batch-size", "64", "--max-length", "128", "--device", "cpu"])
    accuracy = json.loads((tmp_path / "rm" / "eval.json").read_text())["accuracy"]
    assert accuracy >= 0.6, accuracy


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


def test_online_iterations_on_builtin_task_with_gold_reward(task_dir, tmp_path):
    """run.sh's oracle control: two online iterations on the built-in task scored by the gold reward."""
    sft = builtin_model_dir(task_dir, tmp_path / "sft")
    run_dir = tmp_path / "run"
    for t in (1, 2):
        write_jsonl(tmp_path / f"prompts_{t}.jsonl", read_jsonl(task_dir / f"prompts_iter{t}.jsonl")[:6])
        run_script(["dpo.py", "--iter", str(t), "--run-dir", str(run_dir), "--sft", str(sft), "--rm", "gold",
                    "--prompts", str(tmp_path / "prompts_{t}.jsonl"), "--n", "3", "--max-new-tokens", "12", "--batch-size", "4",
                    "--micro-batch-size", "4", "--lr", "1e-3", "--epochs", "1", "--device", "cpu"])
    for t in (1, 2):
        rewards = read_jsonl(run_dir / f"iter{t}" / "rewards.jsonl")
        assert len(rewards) == 6 and all(r["rewards"] == [score(r["prompt"], y) for y in r["responses"]] for r in rewards)
    assert (run_dir / "iter2" / "policy" / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# osp.py


def test_ranked_pairs_odd_and_even_k():
    from osp import ranked_pairs
    # K = 6: ranks 1 (index 3), 2 (0), 3 (5), 4 (1), 5 (4), 6 (2)
    assert ranked_pairs([0.8, 0.3, 0.1, 0.9, 0.2, 0.5]) == [(3, 2), (0, 4), (5, 1)]
    # K = 7: the median (index 6, score 0.5) is left out
    assert ranked_pairs([0.8, 0.3, 0.1, 0.9, 0.2, 0.6, 0.5]) == [(3, 2), (0, 4), (5, 1)]
    # ties keep the lower index first; K = 1 gives no pair
    assert ranked_pairs([0.5, 0.5, 0.5, 0.5]) == [(0, 3), (1, 2)]
    assert ranked_pairs([0.7]) == []


def test_random_pairs_are_disjoint_and_oriented_by_score():
    from osp import random_pairs
    import random as random_module
    scores = [0.2, 0.9, 0.4, 0.7, 0.1]
    pairs = random_pairs(scores, random_module.Random(0))
    used = [i for pair in pairs for i in pair]
    assert len(pairs) == 2 and len(set(used)) == 4
    assert all(scores[hi] >= scores[lo] for hi, lo in pairs)


def builtin_model_dir(task_dir, folder, seed=0):
    """A random-init checkpoint of the built-in task's tiny model, with its tokenizer."""
    import shutil
    shutil.copytree(task_dir / "model", folder)
    torch.manual_seed(seed)
    Transformer.from_config(folder).save_pretrained(folder)
    return folder


def test_judge_targets_are_symmetric_under_ab_swap(task_dir, tmp_path):
    from train_rm import pairwise_preference
    folder = builtin_model_dir(task_dir, tmp_path / "judge")
    judge, tokenizer = Transformer.from_pretrained(folder).eval(), load_tokenizer(folder)
    torch.manual_seed(1)
    for weight in judge.parameters():  # larger weights than the init's: an opinionated random judge
        torch.nn.init.normal_(weight, std=0.3) if weight.dim() == 2 else None
    prompts = [p["messages"] for p in read_jsonl(task_dir / "prompts_eval.jsonl")[:4]]
    a, b = ["12 3", "", "7", "1 2 3 4"], ["3 12", "5", "", "4 3 2 1"]
    with torch.no_grad():
        p_ab = pairwise_preference(judge, tokenizer, prompts, a, b, "cpu", "dialogue")
        p_ba = pairwise_preference(judge, tokenizer, prompts, b, a, "cpu", "dialogue")
    assert torch.allclose(p_ab + p_ba, torch.ones(4), atol=1e-6)
    assert (p_ab - 0.5).abs().max() > 1e-4  # a random judge is not indifferent, so the test can fail


@pytest.mark.parametrize("loss,pairing,nproc", [("spce", "ranked", 1), ("dpo", "random", 2), ("ipo", "ranked", 1), ("spce", "best", 1)])
def test_osp_steps_run_on_builtin_task_and_change_the_policy(loss, pairing, nproc, task_dir, tmp_path):
    from data.judge import PAIRWISE_TEMPLATE
    from safetensors.torch import load_file
    sft = builtin_model_dir(task_dir, tmp_path / "sft")
    out = tmp_path / "osp"
    args = ["osp.py", "--model", str(sft), "--prompts", str(task_dir / "prompts_iter1.jsonl"), "--out", str(out),
            "--steps", "2", "--batch-size", "2", "--k", "3", "--max-new-tokens", "10", "--lr", "1e-3", "--beta", "0.1",
            "--loss", loss, "--pairing", pairing, "--gold", "--device", "cpu"]
    if (loss, pairing) == ("spce", "ranked"):  # the judge: a pairwise model trained by train_rm.py, which records its template
        judge = tmp_path / "judge"
        run_script(["train_rm.py", "--type", "pairwise", "--model", str(sft), "--pairs", str(task_dir / "pairs_eval.jsonl"),
                    "--out", str(judge), "--max-steps", "2", "--batch-size", "8", "--lr", "1e-3", "--device", "cpu",
                    "--eval-pairs", str(task_dir / "pairs_eval.jsonl")])
        assert (judge / "judge_template.txt").read_text() == PAIRWISE_TEMPLATE
        assert 0.0 <= json.loads((judge / "eval.json").read_text())["accuracy"] <= 1.0
        args += ["--judge", str(judge)]
    run_script(args, nproc=nproc)
    lines = read_jsonl(out / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert math.isfinite(line["loss"]) and 0.0 < line["target_strength"] <= 1.0 and math.isfinite(line["kl"])
        assert -1.0 <= line["gold_mean"] <= 1.0 and line["mean_length_chars"] > 0
    if pairing == "best":
        assert all(line["target_strength"] == 1.0 for line in lines)
    before, after = load_file(sft / "model.safetensors"), load_file(out / "model.safetensors")
    assert max((after[n] - before[n]).abs().max().item() for n in before) > 1e-4
    AutoModelForCausalLM.from_pretrained(out)  # the trained policy is a valid HF checkpoint
    assert "skipping" in run_script(args, nproc=1)  # a finished run is not redone


# ----------------------------------------------------------------------------------------------
# evaluate.py


def test_evaluate_finds_checkpoints_scores_with_gold_and_caches(task_dir, tmp_path):
    import shutil
    run = tmp_path / "run"
    builtin_model_dir(task_dir, run / "sft")
    shutil.copytree(run / "sft", run / "online" / "iter1" / "policy")
    shutil.copytree(run / "sft", run / "osp_spce_ranked")
    shutil.copytree(run / "sft", run / "judge")  # any causal LM can judge (A/B tokens exist in the task's tokenizer)
    args = ["evaluate.py", "--run", str(run), "--prompts", str(task_dir / "prompts_eval.jsonl"), "--max-new-tokens", "8",
            "--device", "cpu"]
    run_script(args)
    results = json.loads((run / "results.json").read_text())["checkpoints"]
    assert [r["label"] for r in results] == ["SFT", "iterative DPO, t = 1", "OSP (spce, ranked)"]
    answers = read_jsonl(run / "sft" / "eval_samples_T0.jsonl")
    assert len(answers) == len(read_jsonl(task_dir / "prompts_eval.jsonl"))
    gold = [score(a["prompt"], a["responses"][0]) for a in answers]  # recomputed here from the answers
    assert abs(results[0]["gold"] - sum(gold) / len(gold)) < 1e-9
    assert results[0]["gold"] == results[1]["gold"]  # the same weights answer the same (greedy, and seeded samples)
    assert results[0]["sampled_gold"] == results[1]["sampled_gold"]
    assert "| SFT |" in (run / "results.md").read_text()
    judge = json.loads((run / "results.json").read_text())["judge"]
    assert judge["pairs"] == len(answers) * 6  # 4 sampled answers per prompt → 6 pairs
    assert 0.0 <= judge["prefers_longer"] <= 1.0 and 0.0 <= judge["gold_agreement"] <= 1.0
    before = (run / "sft" / "eval_samples_T1.jsonl").stat().st_mtime_ns
    run_script(args)  # a rerun reuses the cached answers
    assert (run / "sft" / "eval_samples_T1.jsonl").stat().st_mtime_ns == before


# ----------------------------------------------------------------------------------------------
# Kernels: token log-probs (kernels/logprob.py)

import kernels.logprob as logprob
from kernels.logprob import token_logprobs, token_logprobs_reference

IGNORE = -100
# (atol, rtol) per dtype; gradients are compared after dividing by their largest entry. Forward: every path
# computes fp32 logits from the same inputs, so bf16 inputs agree as closely as fp32 (measured ~1e-6).
# Gradients in bf16: G is rounded to bf16 before the two gradient matmuls, as cuBLAS will read it, and the
# result is rounded again (measured ~6e-3 of the largest entry; bf16 epsilon is 3.9e-3).
TOLERANCES = {
    torch.float32: {"logp": (1e-5, 1e-5), "grad": (5e-6, 1e-4)},
    torch.bfloat16: {"logp": (1e-5, 1e-5), "grad": (1e-2, 2e-2)},
}


def make_inputs(N=47, V=123, H=32, dtype=torch.float32, ignore_fraction=0.25, seed=0, logit_scale=1.0):
    """hidden (N, H), weight (V, H) with logits of std ~ 1.7 * logit_scale, targets (N,) with ignored
    positions mixed in, and a non-uniform upstream gradient (N,) of both signs."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=generator).to(dtype)
    weight = (0.3 * logit_scale * torch.randn(V, H, generator=generator)).to(dtype)
    targets = torch.randint(0, V, (N,), generator=generator)
    targets[torch.rand(N, generator=generator) < ignore_fraction] = IGNORE
    grad_output = torch.randn(N, generator=generator)
    return hidden, weight, targets, grad_output


def logps_and_grads(fn, hidden, weight, targets, grad_output, **kwargs):
    """Run fn forward + backward with the given upstream gradient; return (logp, d hidden, d weight) in fp32."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    logps = fn(hidden, weight, targets, **kwargs)
    logps.backward(grad_output)
    return logps.detach().float(), hidden.grad.float(), weight.grad.float()


def assert_close(actual, expected, tolerance, what):
    atol, rtol = tolerance
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def check_against_reference(impl, dtype, temperature=1.0, vocab_chunk_size=None, **input_kwargs):
    hidden, weight, targets, grad_output = make_inputs(dtype=dtype, **input_kwargs)
    expected = logps_and_grads(token_logprobs_reference, hidden, weight, targets, grad_output, temperature=temperature)
    actual = logps_and_grads(token_logprobs, hidden, weight, targets, grad_output, temperature=temperature,
                             impl=impl, vocab_chunk_size=vocab_chunk_size)
    tolerance = TOLERANCES[dtype]
    for name, a, e in zip(("logp", "grad_hidden", "grad_weight"), actual, expected):
        # Gradients are compared relative to their own scale (bf16 keeps ~3 significant digits).
        scale = 1.0 if name == "logp" else max(e.abs().max().item(), 1e-6)
        assert_close(a / scale, e / scale, tolerance["logp" if name == "logp" else "grad"], f"{impl} {dtype} {name}")
    ignored = targets == IGNORE
    assert (actual[0][ignored] == 0).all() and (actual[1][ignored] == 0).all(), "ignored rows must be exactly 0"
    return actual


# ----------------------------------------------------------------------------------------------
# The reference, and the chunked math in float64, against finite differences.

def test_logprob_reference_gradcheck_float64():
    hidden, weight, targets, _ = make_inputs(N=7, V=11, H=5, dtype=torch.float64, ignore_fraction=0.3, seed=1)
    assert (targets == IGNORE).any() and (targets != IGNORE).any()
    hidden.requires_grad_(), weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: token_logprobs_reference(h, w, targets, temperature=0.7), (hidden, weight))


def test_logprob_chunked_gradcheck_float64():
    # vocab_chunk_size=4 splits V=11 into 4 + 4 + 3: the online logsumexp and per-chunk gradients are exercised.
    hidden, weight, targets, _ = make_inputs(N=7, V=11, H=5, dtype=torch.float64, ignore_fraction=0.3, seed=1)
    hidden.requires_grad_(), weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w: token_logprobs(h, w, targets, temperature=0.7, impl="chunked", vocab_chunk_size=4), (hidden, weight))


# ----------------------------------------------------------------------------------------------
# Triton (interpreted) and chunked PyTorch paths against the reference: forward and both gradients.

@pytest.mark.parametrize("impl", ["triton", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab_chunk_size, temperature", [(None, 1.0), (48, 0.7)], ids=["one_chunk", "chunks48_T0.7"])
def test_logprob_matches_reference(impl, dtype, vocab_chunk_size, temperature):
    # V=123 is not a multiple of anything: one chunk is 123 columns in a 128-wide tile; chunks of 48 leave 27.
    check_against_reference(impl, dtype, temperature=temperature, vocab_chunk_size=vocab_chunk_size)


@pytest.mark.parametrize("vocab_chunk_size", [None, 50])
def test_logprob_triton_tiles_narrower_than_chunk(monkeypatch, vocab_chunk_size):
    # With 16-column tiles each kernel loops over several tiles inside a chunk, the last one partial.
    monkeypatch.setattr(logprob, "_MAX_BLOCK_V", 16)
    check_against_reference("triton", torch.float32, temperature=1.3, vocab_chunk_size=vocab_chunk_size)


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_logprob_large_logits_stay_finite(impl):
    # Logits of std ~ 85: a naive exp() would overflow; the online logsumexp must not.
    logps = check_against_reference(impl, torch.float32, logit_scale=50.0)[0]
    assert torch.isfinite(logps).all() and (logps <= 0).all()


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_logprob_probabilities_sum_to_one(impl):
    # One context scored against every vocabulary id: sum_v p(v) = 1, i.e. logsumexp over targets = 0.
    hidden, weight, _, _ = make_inputs(N=1, V=123)
    every_target = torch.arange(123)
    logps = token_logprobs(hidden.expand(123, -1), weight, every_target, temperature=0.8, impl=impl, vocab_chunk_size=40)
    assert abs(torch.logsumexp(logps, dim=0).item()) < 1e-5


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_logprob_all_ignored(impl):
    hidden, weight, targets, grad_output = make_inputs(N=9, V=123)
    targets[:] = IGNORE
    logps, grad_hidden, grad_weight = logps_and_grads(token_logprobs, hidden, weight, targets, grad_output, impl=impl)
    assert logps.shape == (9,) and (logps == 0).all()
    assert (grad_hidden == 0).all() and (grad_weight == 0).all()


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_logprob_tied_weights(impl):
    # The LM head is the embedding matrix: its gradient from token_logprobs adds to the embedding lookup's.
    hidden, weight, targets, _ = make_inputs(N=47, V=123, H=32)
    input_ids = torch.randint(0, 123, (47,), generator=torch.Generator().manual_seed(3))
    projection = torch.randn(32, 32, generator=torch.Generator().manual_seed(4)) / 32**0.5

    def loss_and_grad(fn, **kwargs):
        embedding = weight.clone().requires_grad_()
        hidden_states = torch.tanh(embedding[input_ids] @ projection) + hidden  # (N, H), depends on embedding
        loss = -fn(hidden_states, embedding, targets, **kwargs).sum()  # .sum() hands back a stride-0 gradient
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
        assert_close(token_logprobs(hidden, weight, targets, impl=impl), expected[0], (2e-5, 1e-5), "no_grad logp")


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
    assert logprob.resolve_impl(hidden, impl="chunked") == "chunked"  # the argument wins over the env var
    with pytest.raises(AssertionError):
        logprob.resolve_impl(hidden, impl="cuda")


def test_logprob_rejects_out_of_range_targets():
    hidden, weight, targets, _ = make_inputs(N=5, V=11, H=4)
    targets[0] = 11
    with pytest.raises(AssertionError):
        token_logprobs(hidden, weight, targets, impl="chunked")


# ----------------------------------------------------------------------------------------------
# Kernels: sampling (kernels/sampling.py)

import argparse

import kernels.sampling as sampling
from kernels.sampling import sample, sample_reference

IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not sampling.HAS_TRITON, reason="no triton"))]


@pytest.fixture
def small_triton_sizes(monkeypatch):
    # Under the interpreter a 1024-candidate sort costs ~1 s per row; 16 keeps a row at ~0.1 s.
    monkeypatch.setattr(sampling, "_CANDIDATES", 16)
    monkeypatch.setattr(sampling, "_MAX_BLOCK_V", 32)


def tied_logits(B, V, seed, scale=2.0):
    """Logits on a 0.25 grid: ~50 distinct values over V = 123, so most tokens are tied with others."""
    generator = torch.Generator().manual_seed(seed)
    return torch.round(scale * 4 * torch.randn(B, V, generator=generator)) / 4


def row_seeds(n, offset=0):
    return (torch.arange(n, dtype=torch.int64) + offset) * 0x1E3779B97F4A7C15 - 12345  # wraps: spread, some negative


def exact_truncated(logits, temperature, top_k, top_p, min_p):
    """q (B, V) float64 per the module docstring, from the same fp32 z = logits * (1/T) the samplers use.
    Also returns the margin by which the top-p and min-p cuts are decided (to reject ambiguous test data)."""
    B, V = logits.shape
    params = [p if isinstance(p, torch.Tensor) else torch.full((B,), p) for p in (temperature, top_k, top_p, min_p)]
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


SETTINGS = {  # name: (temperature, top_k, top_p, min_p), chosen so no cut is decided within fp32 rounding
    "plain": (0.7, 0, 1.0, 0.0),
    "top-k": (1.0, 7, 1.0, 0.0),
    "top-k, tie at the cut": (1.0, 6, 1.0, 0.0),      # the 5th-7th largest are tied: 7 kept
    "top-p": (0.7, 0, 0.6, 0.0),
    "top-p, tie at the cut": (0.7, 0, 0.72, 0.0),     # the mass reaches 0.72 inside a 3-way tie: 7 kept, not 6
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
    logits[2, 40] = logits[2, 90] = logits[2].max() + 1.0  # a tie at the max: greedy takes the lowest id
    seeds = row_seeds(5)
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        out = sample(x, temperature=0.0, top_p=0.5, top_k=3, seeds=seeds, impl=impl)  # truncation is moot
        assert torch.equal(out.tokens, x.float().argmax(dim=-1)) and out.tokens[2] == 40
        assert torch.equal(out.logprobs, torch.zeros(5)) and torch.equal(out.logprobs_untruncated, torch.zeros(5))
    untied = [0, 1, 3, 4]
    for temperature in (1.0, 0.5):
        out = sample(logits, temperature=temperature, top_k=1, seeds=seeds, impl=impl)
        assert torch.equal(out.tokens[untied], logits[untied].argmax(dim=-1))
        assert out.tokens[2] in (40, 90)  # top-k = 1 keeps both tied maxima (documented tie rule)
        assert torch.allclose(out.logprobs[untied], torch.zeros(4), atol=1e-6)
        expected = log_softmax_exact(logits, temperature).gather(1, out.tokens[:, None]).squeeze(1).float()
        assert torch.allclose(out.logprobs_untruncated, expected, atol=1e-5)


@pytest.mark.usefixtures("small_triton_sizes")
def test_sampling_top1_tie_at_the_max_is_uniform():
    """Both tied maxima are kept by top-k = 1 and drawn equally often (each ~1000 of 2000, sd 22)."""
    logits = torch.randn(1, 123, generator=torch.Generator().manual_seed(0)).repeat(2000, 1)
    logits[:, 40] = logits[:, 90] = 10.0
    tokens = sample_reference(logits, top_k=1, seeds=row_seeds(2000)).tokens
    assert set(tokens.tolist()) == {40, 90} and abs(int((tokens == 40).sum()) - 1000) < 150


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.usefixtures("small_triton_sizes")
def test_sampling_reference_never_leaves_kept_set_and_matches_distribution(setting):
    """40000 draws from one row with many ties. Every token must have q > 0 (q from the float64 oracle),
    and the counts must pass a chi-square test against q at false-alarm rate 1e-6 (bins with expected
    count < 5 merged). The seeds are fixed, so the test is deterministic; a correct sampler would fail it
    for 1 seed choice in a million. A sampler that mixed up the kept set, dropped ties or biased the noise
    by even 5% on a 1%-token fails it by a wide margin."""
    temperature, top_k, top_p, min_p = SETTINGS[setting]
    N = 40000
    row = tied_logits(1, 123, seed=1)
    q, margin = exact_truncated(row, temperature, top_k, top_p, min_p)
    assert margin > 1e-5, "test data puts a cut within rounding; pick another seed"
    tokens = sample_reference(row.expand(N, -1), temperature, top_k, top_p, min_p, seeds=row_seeds(N)).tokens
    counts = torch.bincount(tokens, minlength=123).double()
    assert counts[q[0] == 0].sum() == 0, "sampled a token outside the kept set"
    expected = N * q[0]
    big = expected >= 5
    observed_bins = torch.cat([counts[big], counts[~big].sum()[None]])
    expected_bins = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected_bins > 0
    chi2 = float(((observed_bins - expected_bins)[keep] ** 2 / expected_bins[keep]).sum())
    df = int(keep.sum()) - 1
    z = 4.753  # one-sided normal quantile for 1e-6; Wilson-Hilferty approximation of the chi-square quantile
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < critical, f"chi2 {chi2:.1f} >= {critical:.1f} with {df} degrees of freedom"
    assert int((q[0] > 0).sum()) == KEPT_IN_DISTRIBUTION_ROW[setting]  # the oracle's tie rule, pinned down


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.usefixtures("small_triton_sizes")
def test_sampling_stays_in_kept_set_with_exact_logprobs(impl):
    """Odd shapes (B=5, V=123), ties, -inf and -1e9 logits, bf16 and per-row parameters: every token lies in
    the float64 oracle's kept set, and both log-probs equal the oracle's at that token."""
    repeats = 40 if impl == "torch" else 3
    base = tied_logits(5, 123, seed=2)
    base[1, ::2] = float("-inf")  # masked tokens: never sampled, and must not break the search
    base[3, :60] = -1e9           # a huge range of values for the pivots to cut through
    cases = [(name, dict(zip(("temperature", "top_k", "top_p", "min_p"), params)), torch.float32)
             for name, params in SETTINGS.items() if name != "plain"]
    per_row = dict(temperature=torch.tensor([0.7, 0.0, 1.3, 1.0, 0.5]), top_k=torch.tensor([0, 3, 10, 200, 1]),
                   top_p=torch.tensor([0.9, 1.0, 0.5, 0.3, 1.0]), min_p=torch.tensor([0.0, 0.1, 0.0, 0.05, 0.5]))
    cases.append(("per-row", per_row, torch.float32))
    cases.append(("bf16 top-p", dict(temperature=1.0, top_k=0, top_p=0.75, min_p=0.0), torch.bfloat16))
    for name, params, dtype in cases:
        logits = base.to(dtype).repeat(repeats, 1)
        expanded = {k: v.repeat(repeats) if isinstance(v, torch.Tensor) else v for k, v in params.items()}
        q, margin = exact_truncated(logits[:5], **params)
        assert margin > 1e-5, f"{name}: test data puts a cut within rounding"
        q = q.repeat(repeats, 1)
        out = sample(logits, seeds=row_seeds(len(logits)), impl=impl, **expanded)
        q_token = q.gather(1, out.tokens[:, None]).squeeze(1)
        assert (q_token > 0).all(), f"{name}: sampled outside the kept set at rows {(q_token == 0).nonzero().tolist()}"
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
    """Same seeds -> the same tokens (both draw the same noise), log-probs equal to fp32 rounding."""
    cases = []
    logits = tied_logits(6, 123, seed=3)
    logits[0, :] = 0.5                      # all tokens tied: every cut keeps the whole vocabulary
    logits[1, 100:] = float("-inf")
    logits[2, 10:70] = 1.0                  # 60 tied tokens at the top-k = 65 boundary: a bracket that ...
    logits[2, :10] = torch.arange(10) + 3.0  # ... stays larger than the 16-slot buffer, with one value
    logits[2, 70:] = -2.0 - torch.arange(53) * 0.1
    cases += [(logits, dict(temperature=t, top_k=k, top_p=p, min_p=mp))
              for (t, k, p, mp) in [(1.0, 0, 1.0, 0.0), (0.7, 65, 1.0, 0.0), (0.7, 0, 0.9, 0.0), (1.3, 0, 0.3, 0.0),
                                    (1.0, 5, 0.8, 0.1), (0.9, 0, 1.0, 0.3)]]
    cases.append((torch.randn(3, 5, generator=torch.Generator().manual_seed(4)), dict(top_p=0.7)))  # V < tile
    cases.append((torch.randn(2, 1), dict(top_k=1, top_p=0.5)))                                      # V = 1
    cases.append((tied_logits(4, 300, seed=5).to(torch.bfloat16), dict(temperature=0.6, top_p=0.95)))
    for logits, params in cases:
        seeds = row_seeds(len(logits), offset=7)
        want = sample_reference(logits, seeds=seeds, **params)
        got = sample(logits, seeds=seeds, impl="triton", **params)
        assert torch.equal(got.tokens, want.tokens), (params, got.tokens.tolist(), want.tokens.tolist())
        assert torch.allclose(got.logprobs, want.logprobs, atol=1e-5), params
        assert torch.allclose(got.logprobs_untruncated, want.logprobs_untruncated, atol=1e-5), params


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.usefixtures("small_triton_sizes")
def test_sampling_row_depends_only_on_its_own_seed(impl):
    """A row's token and log-probs do not change when other rows change, the batch is reordered, or it
    is sampled alone; different seeds give different draws."""
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
    same_row = sample(logits[:1].expand(12, -1), seeds=row_seeds(12, offset=100), impl=impl, **params)
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
    assert a.tokens.dtype == torch.int64 and a.logprobs.dtype == torch.float32 and a.tokens.shape == (4,)


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


@pytest.mark.usefixtures("small_triton_sizes")
def test_sampling_noise_is_the_documented_hash():
    """The random stream is exactly the documented 32-bit hash of (seed, token id), for any int64 seed,
    and E = -log(1 - u) is Exp(1) down to small values (what decides whether a 1e-4 token wins)."""
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
            assert math.isclose(float(log_e[row, j]), math.log(-math.log1p(-u)), rel_tol=1e-5, abs_tol=1e-5)
    keys = sampling._row_keys(row_seeds(100))
    e = sampling._log_exponential_noise(keys, torch.arange(10000, dtype=torch.int32)).exp()  # (100, 10000)
    assert abs(float(e.mean()) - 1) < 0.005                       # 1e6 draws: sd of the mean 0.001
    assert 70 < int((e < 1e-4).sum()) < 130                       # P(E < 1e-4) = 1e-4: 100 expected, sd 10


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
import kernels.sampling as sampling
names = list(inspect.signature(sampling._sample_kernel.fn).parameters)
for per_row in (False, True):
    scalar_types = ("*fp32", "*i8", "*i32", "*fp32", "*fp32") if per_row else ("fp32", "i32", "i32", "fp32", "fp32")
    types = ["*bf16", "i32", "i32", "*i64", *scalar_types, "*fp32", "*i32", "*i64", "*fp32", "*fp32"]
    constants = {"PER_ROW": per_row, "BLOCK_V": 1024, "NUM_PIVOTS": 8, "CANDIDATES": 1024}
    try:
        source = ASTSource(fn=sampling._sample_kernel, signature=dict(zip(names, types + ["constexpr"] * 4)),
                           constexprs={(names.index(k),): v for k, v in constants.items()})
    except TypeError as error:
        sys.exit(f"SKIP a different ASTSource API: {error}")
    assert "cubin" in compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm
print("OK")
"""


@pytest.mark.skipif(not sampling.HAS_TRITON, reason="no triton")
@pytest.mark.usefixtures("small_triton_sizes")
def test_sampling_kernel_compiles_for_h100():
    """The interpreter does not type-check like the compiler does, so compile the real kernel for sm_90
    (Triton's bundled ptxas needs no GPU): both parameter layouts, bf16 logits, the default sizes. In a
    subprocess, since this process runs Triton in interpreter mode. Skipped when this Triton's
    ahead-of-time API differs from the one it was written against (3.x)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], env=env, capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)), timeout=300)
    if result.returncode != 0 and "SKIP" in result.stderr:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# Data: schemas, converters, judge augmentation

from data import convert as convert_module
from data.judge import DIALOGUE_TEMPLATE, JUDGE_TEMPLATES, judge_sft_records, render_judge_prompt
from data.schema import load_records, render_context, validate

# ----------------------------------------------------------------------------------------------
# Samples in the published formats


HH_RECORDS = [
    # 0: multi-turn, shared prefix, "Human:" mid-text without the blank line (not a turn boundary)
    {"chosen": "\n\nHuman: What should I name my cat?\n\nAssistant: How about Whiskers?\n\nHuman: Something more "
               "unusual. My friend said Human: is a funny name.\n\nAssistant: Maybe Tiberius or Pixel.",
     "rejected": "\n\nHuman: What should I name my cat?\n\nAssistant: How about Whiskers?\n\nHuman: Something more "
                 "unusual. My friend said Human: is a funny name.\n\nAssistant: Cat."},
    # 1: non-ASCII text (incl. U+2028, a line separator that str.splitlines would split on), single turn
    {"chosen": "\n\nHuman: ¿Cómo se dice «gracias» en japonés?\n\nAssistant: Se dice «ありがとう» (arigatō).\u2028",
     "rejected": "\n\nHuman: ¿Cómo se dice «gracias» en japonés?\n\nAssistant: No lo sé."},
    # 2: empty final response
    {"chosen": "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road?",
     "rejected": "\n\nHuman: Tell me a joke.\n\nAssistant:"},
    # 3: identical chosen / rejected
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!"},
    # 4: prefixes differ
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hey\n\nAssistant: Yo."},
]

UF_BINARIZED = [
    {"prompt": "Write a haiku about rain.", "prompt_id": "abc123",
     "chosen": [{"content": "Write a haiku about rain.", "role": "user"},
                {"content": " Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky", "role": "assistant"}],
     "rejected": [{"content": "Write a haiku about rain.", "role": "user"},
                  {"content": "Rain is wet.", "role": "assistant"}],
     "messages": [{"content": "Write a haiku about rain.", "role": "user"},
                  {"content": "Soft rain on the roof", "role": "assistant"}],
     "score_chosen": 8.5, "score_rejected": 4.0},
    # a tie: dropped
    {"prompt": "Say hi.", "prompt_id": "t1",
     "chosen": [{"content": "Say hi.", "role": "user"}, {"content": "Hi!", "role": "assistant"}],
     "rejected": [{"content": "Say hi.", "role": "user"}, {"content": "Hello!", "role": "assistant"}],
     "messages": [{"content": "Say hi.", "role": "user"}, {"content": "Hi!", "role": "assistant"}],
     "score_chosen": 7.0, "score_rejected": 7.0},
]


def uf_completion(model, response, fine, overall):
    return {"annotations": {"helpfulness": {"Rating": "4", "Rationale": "..."}}, "critique": "...",
            "custom_system_prompt": "You are a helpful assistant.", "fine-grained_score": fine, "model": model,
            "overall_score": overall, "principle": "helpfulness", "response": response}


UF_RAW = [{"source": "evol_instruct", "instruction": "Name a prime number greater than 10.", "models": ["a", "b", "c", "d"],
           "completions": [uf_completion("a", "11", 5.0, 9.0), uf_completion("b", "13 is prime.", 4.5, 8.0),
                           uf_completion("c", "12", 1.25, 2.0), uf_completion("d", "Eleven", 5.0, 8.5)],
           "correct_answers": ["None"], "incorrect_answers": ["None"]}]


def shp_record(post_id, a, b, label, score_a, score_b, with_ratio=True):
    record = {"post_id": post_id, "domain": "askscience_train", "upvote_ratio": 0.99,
              "history": f"Post {post_id}: why is the sky blue?", "c_root_id_A": "ca", "c_root_id_B": "cb",
              "created_at_utc_A": 1, "created_at_utc_B": 2, "score_A": score_a, "score_B": score_b,
              "human_ref_A": a, "human_ref_B": b, "labels": label, "seconds_difference": 1.0}
    if with_ratio:
        record["score_ratio"] = max(score_a, score_b) / min(score_a, score_b)
    return record


SHP_RECORDS = (
    # post p1: 7 candidate pairs, ratios 3..9 → only the 5 highest (5..9) kept
    [shp_record("p1", f"answer A{k}", f"answer B{k}", 1, 3 + k, 1) for k in range(7)]
    # post p2: ratio 1.5 (dropped), label 0 with ratio computed from scores (kept), label disagreeing with scores
    + [shp_record("p2", "meh", "fine", 1, 3, 2),
       shp_record("p2", "short", "Rayleigh scattering of sunlight.", 0, 2, 10, with_ratio=False),
       shp_record("p2", "x", "y", 1, 2, 10)])

HELPSTEER_RECORDS = [
    {"prompt": "Explain gravity.", "response": "Mass attracts mass.", "helpfulness": 3, "correctness": 3,
     "coherence": 4, "complexity": 1, "verbosity": 1},
    {"prompt": "Explain gravity.", "response": "Gravity is a force.", "helpfulness": 3, "correctness": 4,
     "coherence": 4, "complexity": 1, "verbosity": 1},
    {"prompt": "Explain gravity.", "response": "Idk.", "helpfulness": 0, "correctness": 1, "coherence": 2,
     "complexity": 0, "verbosity": 0},
    # HelpSteer2 multi-turn prompt
    {"prompt": "Hi there\n<extra_id_1>Assistant\nHello! How can I help?\n<extra_id_1>User\nList two colors.",
     "response": "Red and blue.", "helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 1, "verbosity": 1},
    {"prompt": "Hi there\n<extra_id_1>Assistant\nHello! How can I help?\n<extra_id_1>User\nList two colors.",
     "response": "Red.", "helpfulness": 2, "correctness": 2, "coherence": 4, "complexity": 1, "verbosity": 0},
]

TLDR_RECORDS = [
    {"info": {"id": "t3_abc", "post": "I adopted a dog last week and he keeps chewing my shoes. What do I do?  ",
              "title": "Dog chews shoes", "subreddit": "dogs", "site": None, "article": None},
     "split": "train", "summaries": [{"text": " New dog chews shoes, need advice.", "policy": "sup2", "note": None},
                                     {"text": " dog", "policy": "ref", "note": None}],
     "choice": 0, "worker": "w1", "batch": "batch3", "extra": {"confidence": 8}},
    {"info": {"id": "t3_def", "post": "My roommate never cleans.", "title": "Roommate", "subreddit": "relationships",
              "site": None, "article": None},
     "split": "train", "summaries": [{"text": "roommate", "policy": "a", "note": None},
                                     {"text": "Roommate never cleans; how to talk to them?", "policy": "b", "note": None}],
     "choice": 1, "worker": "w2", "batch": "batch3", "extra": {"confidence": 9}},
    # a CNN/DM record from the validation split: no post
    {"info": {"id": "cnn-1", "post": None, "title": "News", "subreddit": None, "site": "cnn", "article": "Breaking..."},
     "split": "valid2", "summaries": [{"text": "a", "policy": "a", "note": None}, {"text": "b", "policy": "b", "note": None}],
     "choice": 0, "worker": "w3", "batch": "batch9", "extra": {}},
]


def write_jsonl_lines(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def run_convert(tmp_path, fmt, records, *flags, name="in.jsonl", as_list=False):
    """Run the converter in-process; returns (output records, report, printed summary)."""
    path = tmp_path / name
    if as_list:
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    else:
        write_jsonl_lines(path, records)
    out = tmp_path / f"out_{fmt}.jsonl"
    args = convert_module.parse_args(["--format", fmt, "--input", str(path), "--output", str(out), *flags])
    report = convert_module.convert(args)
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()], report


# ----------------------------------------------------------------------------------------------
# Converters


def test_data_hh_rlhf(tmp_path):
    pairs, report = run_convert(tmp_path, "hh-rlhf", HH_RECORDS)
    assert len(pairs) == 2 and report.read == 5
    first = pairs[0]
    assert first["prompt"] == [
        {"role": "user", "content": "What should I name my cat?"},
        {"role": "assistant", "content": "How about Whiskers?"},
        {"role": "user", "content": "Something more unusual. My friend said Human: is a funny name."}]
    assert first["chosen"] == "Maybe Tiberius or Pixel." and first["rejected"] == "Cat."  # leading space stripped
    assert first["source"] == "hh-rlhf"
    assert pairs[1]["chosen"] == "Se dice «ありがとう» (arigatō)."                           # non-ASCII kept
    assert "ありがとう" in (tmp_path / "out_hh-rlhf.jsonl").read_text(encoding="utf-8")     # as UTF-8, not \\u escapes
    assert report.filtered == {"empty response": 1, "identical responses": 1}
    assert sum(report.malformed.values()) == 1 and "prompts of chosen and rejected differ" in next(iter(report.malformed))
    assert any(e.startswith(f"{tmp_path / 'in.jsonl'}:5:") for e in report.examples)  # line numbers in examples
    load_records(tmp_path / "out_hh-rlhf.jsonl", "pairs")


def test_data_hh_rlhf_strict_names_file_and_line(tmp_path):
    with pytest.raises(ValueError, match=r"in\.jsonl:5: prompts of chosen and rejected differ"):
        run_convert(tmp_path, "hh-rlhf", HH_RECORDS, "--strict")
    # filters are not errors under --strict: records 0-3 alone convert fine
    pairs, _ = run_convert(tmp_path, "hh-rlhf", HH_RECORDS[:4], "--strict")
    assert len(pairs) == 2


def test_data_bad_json_line_is_counted_or_strict_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(HH_RECORDS[0]) + "\n\n{not json\n[1, 2]\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    report = convert_module.convert(convert_module.parse_args(["--format", "hh-rlhf", "--input", str(path), "--output", str(out)]))
    assert report.read == 3 and report.written == 1 and sum(report.malformed.values()) == 2
    assert any(e.startswith(f"{path}:3: not valid JSON") for e in report.examples)
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        convert_module.convert(convert_module.parse_args(["--format", "hh-rlhf", "--input", str(path), "--output", str(out), "--strict"]))


def test_data_json_list_input_same_as_jsonl(tmp_path):
    from_jsonl, _ = run_convert(tmp_path, "hh-rlhf", HH_RECORDS)
    from_list, report = run_convert(tmp_path, "hh-rlhf", HH_RECORDS, name="in.json", as_list=True)
    assert from_list == from_jsonl
    assert any("(item 5)" in e for e in report.examples)


def test_data_ultrafeedback_binarized_and_raw(tmp_path):
    pairs, report = run_convert(tmp_path, "ultrafeedback", UF_BINARIZED + UF_RAW)
    binarized = pairs[0]
    assert binarized["prompt"] == [{"role": "user", "content": "Write a haiku about rain."}]
    assert binarized["chosen"].startswith("Soft rain") and binarized["rejected"] == "Rain is wet."
    assert binarized["margin"] == 4.5 and binarized["source"] == "ultrafeedback"
    # raw, fine-grained scores a=5, b=4.5, c=1.25, d=5: (a,d) tied; margins ≥ 1: (a,c), (b,c), (d,c)
    raw = [(p["chosen"], p["rejected"], p["margin"]) for p in pairs[1:]]
    assert raw == [("11", "12", 3.75), ("13 is prime.", "12", 3.25), ("Eleven", "12", 3.75)]
    assert report.filtered["tied scores"] == 2                     # one binarized tie, one raw tie
    assert report.filtered["score margin below --min-margin 1"] == 2  # (a,b) and (b,d): 0.5
    pairs, _ = run_convert(tmp_path, "ultrafeedback", UF_RAW, "--min-margin", "0")
    assert len(pairs) == 5                                          # every non-tied pair
    pairs, _ = run_convert(tmp_path, "ultrafeedback", UF_RAW, "--ultrafeedback-score", "overall_score")
    assert [(p["chosen"], p["rejected"], p["margin"]) for p in pairs] == [
        ("11", "13 is prime.", 1.0), ("11", "12", 7.0), ("13 is prime.", "12", 6.0), ("Eleven", "12", 6.5)]


def test_data_ultrafeedback_malformed_records(tmp_path):
    record = json.loads(json.dumps(UF_RAW[0]))
    del record["completions"][2]["fine-grained_score"]
    with pytest.raises(ValueError, match=r"in\.jsonl:1: completions\[2\]: missing field 'fine-grained_score'"):
        run_convert(tmp_path, "ultrafeedback", [record], "--strict")
    bad_role = json.loads(json.dumps(UF_BINARIZED[0]))
    bad_role["rejected"][0]["role"] = "bot"
    with pytest.raises(ValueError, match=r"in\.jsonl:2: field 'rejected'\[0\]\.role: expected one of system/user/assistant, got 'bot'"):
        run_convert(tmp_path, "ultrafeedback", [UF_BINARIZED[0], bad_role], "--strict")
    pairs, report = run_convert(tmp_path, "ultrafeedback", [UF_BINARIZED[0], bad_role, {"foo": 1}])
    assert len(pairs) == 1 and sum(report.malformed.values()) == 2 and report.read == 3


def test_data_shp_ratio_filter_and_per_post_cap(tmp_path):
    pairs, report = run_convert(tmp_path, "shp", SHP_RECORDS)
    p1 = [p for p in pairs if p["prompt"][0]["content"].startswith("Post p1")]
    assert [p["chosen"] for p in p1] == [f"answer A{k}" for k in range(2, 7)]  # ratios 5..9, input order kept
    p2 = [p for p in pairs if p["prompt"][0]["content"].startswith("Post p2")]
    assert [(p["chosen"], p["rejected"]) for p in p2] == [("Rayleigh scattering of sunlight.", "short")]  # labels 0 = B
    assert report.filtered["score ratio <= 2"] == 1
    assert report.filtered["label disagrees with scores"] == 1
    assert report.filtered["more than 5 pairs for the post (lowest ratios dropped)"] == 2
    assert all(p["source"] == "shp" for p in pairs)


def test_data_helpsteer_groups_and_margins(tmp_path):
    pairs, report = run_convert(tmp_path, "helpsteer", HELPSTEER_RECORDS)
    assert [(p["chosen"], p["rejected"], p["margin"]) for p in pairs] == [
        ("Mass attracts mass.", "Idk.", 3.0), ("Gravity is a force.", "Idk.", 3.0), ("Red and blue.", "Red.", 2.0)]
    assert report.filtered["tied scores"] == 1
    assert pairs[2]["prompt"] == [{"role": "user", "content": "Hi there"},
                                  {"role": "assistant", "content": "Hello! How can I help?"},
                                  {"role": "user", "content": "List two colors."}]
    pairs, _ = run_convert(tmp_path, "helpsteer", HELPSTEER_RECORDS, "--min-margin", "2.5")
    assert len(pairs) == 2
    pairs, _ = run_convert(tmp_path, "helpsteer", HELPSTEER_RECORDS, "--helpsteer-attribute", "mean", "--min-margin", "0.3")
    assert ("Gravity is a force.", "Mass attracts mass.") in [(p["chosen"], p["rejected"]) for p in pairs]


def test_data_tldr(tmp_path):
    pairs, report = run_convert(tmp_path, "tldr", TLDR_RECORDS)
    assert pairs[0]["prompt"] == [{"role": "user", "content": "SUBREDDIT: r/dogs\nTITLE: Dog chews shoes\nPOST: I adopted a "
                                   "dog last week and he keeps chewing my shoes. What do I do?\nTL;DR:"}]
    assert pairs[0]["chosen"] == "New dog chews shoes, need advice." and pairs[0]["rejected"] == "dog"
    assert pairs[1]["chosen"] == "Roommate never cleans; how to talk to them?" and pairs[1]["rejected"] == "roommate"
    assert report.filtered == {"not a reddit post (CNN/DM article)": 1} and len(pairs) == 2


def test_data_prompts_from_every_format(tmp_path):
    sft = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}]},
           {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]}]
    mixed = HH_RECORDS + UF_BINARIZED + UF_RAW + SHP_RECORDS + HELPSTEER_RECORDS + TLDR_RECORDS + sft
    prompts, report = run_convert(tmp_path, "prompts", mixed)
    texts = [p["messages"][-1]["content"] for p in prompts]
    assert len(texts) == len(set(json.dumps(p["messages"]) for p in prompts))            # deduplicated
    assert texts[:3] == ["Something more unusual. My friend said Human: is a funny name.",
                         "¿Cómo se dice «gracias» en japonés?", "Tell me a joke."]
    assert "Write a haiku about rain." in texts and "Post p1: why is the sky blue?" in texts and "List two colors." in texts
    assert prompts[-1]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert [{"role": "user", "content": "Hi"}] in [p["messages"] for p in prompts]       # HH's "Hi" = the last sft's
    assert report.filtered["duplicate prompt"] > 0
    load_records(tmp_path / "out_prompts.jsonl", "prompts")                                # unique ids, valid
    again, _ = run_convert(tmp_path, "prompts", list(reversed(mixed)))
    assert {p["id"]: p["messages"] for p in again} == {p["id"]: p["messages"] for p in prompts}  # ids = content hash


# ----------------------------------------------------------------------------------------------
# Judge (preference augmentation)


def test_data_judge_template_exact_and_both_orders(tmp_path):
    pairs_path = write_jsonl_lines(tmp_path / "pairs.jsonl", [
        {"prompt": [{"role": "user", "content": "sort 3 1 2"}], "chosen": "1 2 3", "rejected": "3 2 1"},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "", "p": 0.9},
        {"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b", "p": 0.2},  # rejected preferred
        {"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b", "p": 0.5},  # no preference
        {"prompt": [{"role": "user", "content": "x"}], "chosen": "same", "rejected": "same"}])
    out = tmp_path / "judge.jsonl"
    report = convert_module.convert(convert_module.parse_args(["--format", "judge", "--input", str(pairs_path), "--output", str(out)]))
    records = load_records(out, "sft")
    assert len(records) == 6 and report.filtered == {"no preference (p = 0.5)": 1, "identical responses": 1}
    expected = ("You are an expert rater of helpful and honest assistant responses. Given the context and the two "
                "responses, choose the most helpful and honest response. Context: sort 3 1 2\n\nRESPONSE A:1 2 3\n\n"
                "RESPONSE B:3 2 1\n\nWhich response is better? RESPONSE")
    assert records[0]["messages"] == [{"role": "user", "content": expected}, {"role": "assistant", "content": "A"}]
    assert records[1]["messages"][0]["content"] == expected.replace("A:1 2 3", "A:3 2 1").replace("B:3 2 1", "B:1 2 3")
    assert records[1]["messages"][1]["content"] == "B"
    assert records[3]["messages"][0]["content"].endswith("RESPONSE A:\n\nRESPONSE B:Hello!\n\nWhich response is better? RESPONSE")
    assert records[3]["messages"][1]["content"] == "B"                        # empty response renders fine
    assert "RESPONSE A:b\n\n" in records[4]["messages"][0]["content"] and records[4]["messages"][1]["content"] == "A"


def test_data_judge_templates_match_paper_and_render_safely():
    seed = next((ROOT.parent / "shared" / "seeds").glob("002_*[0-9a-f].txt"), None) if (ROOT.parent / "shared").exists() else None
    if seed is None:
        seed = next(Path("/work/shared/seeds").glob("002_*[0-9a-f].txt"), None)
    if seed is not None:  # the paper's Figures 6 and 7, placeholders replaced, "<A/B>" cut
        lines = seed.read_text(encoding="utf-8").splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("You are an expert rater"))
        dialogue = "\n".join(lines[start:start + 7])
        for old, new in (("<Prompt>", "{context}"), ("<Response A>", "{response_a}"), ("<Response B>", "{response_b}"), (" <A/B>", "")):
            dialogue = dialogue.replace(old, new)
        assert dialogue == JUDGE_TEMPLATES["dialogue"]
        start = next(i for i, line in enumerate(lines) if line.startswith("A good summary is"))
        summary = "\n".join(lines[start:start + 7])
        for old, new in (("<Prompt>", "{context}"), ("<Summary A>", "{response_a}"), ("<Summary B>", "{response_b}"), (" <A/B>", "")):
            summary = summary.replace(old, new)
        assert summary == JUDGE_TEMPLATES["summarization"]
    # braces and placeholder names inside the texts are not substituted again
    text = render_judge_prompt([{"role": "user", "content": "f({x})"}], "{response_b}", "{}", template="dialogue")
    assert "Context: f({x})\n\nRESPONSE A:{response_b}\n\nRESPONSE B:{}\n\n" in text
    # multi-turn contexts render as a Human/Assistant transcript; a template can be given as text
    context = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert render_context(context) == "Human: Hi\n\nAssistant: Hello\n\nHuman: Bye"
    assert render_judge_prompt(context, "a", "b", template="[{context}|{response_a}|{response_b}]") == \
        "[Human: Hi\n\nAssistant: Hello\n\nHuman: Bye|a|b]"
    with pytest.raises(ValueError, match="judge template"):
        render_judge_prompt(context, "a", "b", template="no placeholders")
    summary = judge_sft_records({"prompt": [{"role": "user", "content": "POST"}], "chosen": "c", "rejected": "r"}, "summarization")
    assert summary[0]["messages"][0]["content"].endswith("Text: POST\n\nSUMMARY A:c\n\nSUMMARY B:r\n\nWhich summary is better? SUMMARY")
    assert DIALOGUE_TEMPLATE is JUDGE_TEMPLATES["dialogue"]


# ----------------------------------------------------------------------------------------------
# Validator


@pytest.mark.parametrize("kind,record,message", [
    ("prompts", {"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                                         {"role": "bot", "content": "z"}]},
     "field 'messages'[2].role: expected one of system/user/assistant, got 'bot'"),
    ("prompts", {"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "field 'messages': must end with a user turn"),
    ("prompts", {"messages": [{"role": "user", "content": "x"}]}, "missing field 'id'"),
    ("sft", {"messages": [{"role": "user", "content": "x"}]}, "at least one assistant turn"),
    ("sft", {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
     "field 'messages'[0].content: expected a string, got int"),
    ("pairs", {"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b", "p": 1.5}, "field 'p'"),
    ("pairs", {"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": None}, "field 'rejected': expected a string"),
    ("pairs", {"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b", "margin": True}, "field 'margin'"),
    ("samples", {"id": "s", "prompt": [{"role": "user", "content": "x"}], "responses": ["a", "b"], "num_tokens": [1],
                 "finish_reasons": ["stop", "stop"]}, "field 'num_tokens': expected 2 items"),
    ("samples", {"id": "s", "prompt": [{"role": "user", "content": "x"}], "responses": ["a"], "num_tokens": [1],
                 "finish_reasons": ["eos"]}, "field 'finish_reasons'[0]: expected one of stop/length, got 'eos'"),
    ("samples", {"id": "s", "prompt": [{"role": "user", "content": "x"}], "responses": [], "num_tokens": [],
                 "finish_reasons": []}, "field 'responses': expected at least one item"),
    ("rewards", {"id": "s", "prompt": [{"role": "user", "content": "x"}], "responses": ["a"], "num_tokens": [1],
                 "finish_reasons": ["length"], "rewards": [float("nan")]}, "field 'rewards'[0]: expected a finite number"),
])
def test_data_validator_names_file_line_field(tmp_path, kind, record, message):
    good = {"sft": {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "prompts": {"id": "ok", "messages": [{"role": "user", "content": "x"}]},
            "pairs": {"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b"},
            "samples": {"id": "ok", "prompt": [{"role": "user", "content": "x"}], "responses": ["a"], "num_tokens": [2],
                        "finish_reasons": ["stop"], "logprobs": [-1.5]},
            "rewards": {"id": "ok", "prompt": [{"role": "user", "content": "x"}], "responses": ["a"], "num_tokens": [2],
                        "finish_reasons": ["stop"], "rewards": [0.5], "extra": "kept"}}[kind]
    path = tmp_path / f"{kind}.jsonl"
    # line 1 good, line 2 blank, line 3 broken: the message names line 3
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as error:
        load_records(path, kind)
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)
    assert validate([good], kind, "x.jsonl") == [good]


def test_data_validator_duplicate_prompt_ids():
    records = [{"id": "a", "messages": [{"role": "user", "content": "x"}]}, {"id": "a", "messages": [{"role": "user", "content": "y"}]}]
    with pytest.raises(ValueError, match=r"prompts\.jsonl:2: field 'id': duplicate id 'a' \(first at line 1\)"):
        validate(records, "prompts", "prompts.jsonl")


# ----------------------------------------------------------------------------------------------
# Determinism and the command line


def test_data_convert_deterministic_and_cli(tmp_path, capsys):
    source = write_jsonl_lines(tmp_path / "uf.jsonl", UF_BINARIZED + UF_RAW)
    outputs = []
    for k in range(2):
        out, judge = tmp_path / f"pairs{k}.jsonl", tmp_path / f"judge{k}.jsonl"
        convert_module.main(["--format", "ultrafeedback", "--input", str(source), "--output", str(out), "--min-margin", "0"])
        convert_module.main(["--format", "judge", "--input", str(out), "--output", str(judge), "--shuffle", "--seed", "3"])
        outputs.append((out.read_bytes(), judge.read_bytes()))
    assert outputs[0] == outputs[1]
    printed = capsys.readouterr().out
    assert "judge: read 6 records" in printed and "wrote 12" in printed and "tied scores" in printed
    with pytest.raises(SystemExit, match=r"hh\.jsonl:5: prompts of chosen and rejected differ"):
        convert_module.main(["--format", "hh-rlhf", "--input", str(write_jsonl_lines(tmp_path / "hh.jsonl", HH_RECORDS)),
                             "--output", str(tmp_path / "x.jsonl"), "--strict"])
    assert not (tmp_path / "x.jsonl").exists()
    # the script itself, as users run it (sys.path set up from data/)
    result = subprocess.run([sys.executable, str(ROOT / "data" / "convert.py"), "--format", "prompts", "--input", str(source),
                             "--output", str(tmp_path / "prompts.jsonl")], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert "prompts: read 3 records" in result.stdout and len(load_records(tmp_path / "prompts.jsonl", "prompts")) == 3


# ----------------------------------------------------------------------------------------------
# Data: the built-in task

import random

from data.task import TASKS, TAU, build, main as task_main, parse_prompt, score

SMALL = dict(seed=0, sft_examples=800, prompts_per_iter=40, eval_prompts=24, pairs_train=3000, pairs_eval=200)
TASK_FILES = ("sft.jsonl", "prompts_iter1.jsonl", "prompts_iter2.jsonl", "prompts_iter3.jsonl", "prompts_eval.jsonl",
              "pairs_train.jsonl", "pairs_eval.jsonl", "stats.json", "model/tokenizer.json",
              "model/tokenizer_config.json", "model/config.json", "model/generation_config.json")


def _read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin")
    build(out, **SMALL)
    return out


def _user(text):
    return [{"role": "user", "content": text}]


def test_task_score_hand_checked():
    sort = _user("sort 31 7 18")  # target 7 18 31
    assert score(sort, "7 18 31") == 1.0
    assert score(sort, "7 31 18") == pytest.approx(2 / 3)       # one misplaced: LCS 2 of 3
    assert score(sort, "7 18") == pytest.approx(2 / 3)          # one missing
    assert score(sort, "7 18 31 31") == pytest.approx(3 / 4)    # one extra
    assert score(sort, "7, 18, 31") == pytest.approx(1 - 0.002 * 2)  # two commas are extra characters
    assert score(sort, "Sure! 7 18 31") == pytest.approx(1 - 0.002 * 6)
    assert score(sort, "Sure! 7 18 31 Hope this helps!") == pytest.approx(1 - 0.002 * 23)
    assert score(_user("reverse 1 2 3"), "3 2 1") == 1.0
    assert score(_user("reverse 1 2 3"), "1 2 3") == pytest.approx(1 / 3)
    assert score(_user("evens 83 12 55 7 40"), "12 40") == 1.0
    assert score(_user("evens 83 12 55 7 40"), "12 55 40") == pytest.approx(2 / 3)
    assert score(_user("add 385 97"), "482") == 1.0
    assert score(_user("add 385 97"), "472") == pytest.approx(2 / 3)   # right-aligned digits
    assert score(_user("add 385 97"), "1482") == pytest.approx(3 / 4)
    assert score(_user("add 385 97"), "482 482") == pytest.approx(1 / 2)  # the answer is one number
    # empty, garbage, padding, and things that are not prompts of the task
    assert score(sort, "") == 0.0
    assert score(sort, "asdf") == pytest.approx(-0.008)
    assert score(sort, "x" * 100000) == -1.0                   # the penalty is capped at 1
    assert score(sort, "7 18 31" + " ok" * 1000) == pytest.approx(0.0)
    assert score(sort, "٧ ١٨ ٣١") == pytest.approx(-0.014)      # non-ASCII digits are not numbers
    assert score(_user("hello"), "7 18 31") == 0.0
    assert score(_user("sort " + "9" * 5000), "1") == 0.0      # absurd prompts are not task prompts
    assert score(None, "1") == 0.0 and score(sort, None) == 0.0 and score("sort 31 7 18", "7 18 31") == 1.0
    # the last user turn is the prompt; a system turn is fine
    assert score([{"role": "system", "content": "be brief"}] + sort, "7 18 31") == 1.0


def test_task_score_never_raises_on_garbage():
    rng = random.Random(0)
    alphabet = "0123456789 ,.-+abcXYZ\n\t<|end|>é٣"
    for _ in range(300):
        response = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        prompt = _user(rng.choice(["sort 5 3 9", "add 99 1", "evens 1 2", "reverse 7", "junk", ""]))
        value = score(prompt, response)
        assert isinstance(value, float) and math.isfinite(value) and -1.0 <= value <= 1.0


def test_task_build_is_deterministic(tmp_path, task_dir):
    build(tmp_path / "again", **SMALL)
    for name in TASK_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (task_dir / name).read_bytes(), name
    build(tmp_path / "other", **{**SMALL, "seed": 1})
    assert (tmp_path / "other" / "sft.jsonl").read_bytes() != (task_dir / "sft.jsonl").read_bytes()


def test_task_prompt_splits_are_disjoint(task_dir):
    ids, texts = [], {}
    for split in ("iter1", "iter2", "iter3", "eval"):
        records = _read(task_dir / f"prompts_{split}.jsonl")
        assert len(records) == (SMALL["eval_prompts"] if split == "eval" else SMALL["prompts_per_iter"])
        for r in records:
            assert r["messages"][-1]["role"] == "user" and parse_prompt(r["messages"][-1]["content"]) is not None
        ids += [r["id"] for r in records]
        texts[split] = {r["messages"][-1]["content"] for r in records}
        assert len(texts[split]) == len(records)
        assert {parse_prompt(t)[0] for t in texts[split]} == set(TASKS)  # every sub-task in every split
    texts["sft"] = {r["messages"][0]["content"] for r in _read(task_dir / "sft.jsonl")}
    for split in ("train", "eval"):
        pairs = _read(task_dir / f"pairs_{split}.jsonl")
        ids += [p["id"] for p in pairs]
        texts[f"pairs_{split}"] = {p["prompt"][-1]["content"] for p in pairs}
    assert len(ids) == len(set(ids))
    names = sorted(texts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not texts[a] & texts[b], (a, b)


def test_task_tokenizer_and_chat_template(task_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(task_dir / "model"))
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.eos_token == "<|end|>"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort 3 1 2"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|system|>be brief<|end|><|user|>sort 3 1 2<|end|><|assistant|>"
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "1 2 3"}], tokenize=False)
    assert full == prompt + "1 2 3<|end|>"  # assistant turn = header + content + ONE end-of-turn token
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    # prompt and response tokenized separately = the whole conversation tokenized at once
    assert encode(full) == encode(prompt) + encode("1 2 3") + [tokenizer.eos_token_id]
    assert encode(prompt)[:2] == [1, 4] and encode(prompt)[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    for text in ("sort 31 7 18", "Sure!  7, 18\n31 Hope this helps!", " leading and trailing ", "“quotes” — …"):
        assert tokenizer.decode(encode(text)) == text  # one token per character, exact round trip
        assert len(encode(text)) == len(text)
    assert len(encode("A")) == 1 and len(encode("B")) == 1  # judge / pairwise labels
    assert tokenizer.decode(encode(full), skip_special_tokens=True) == "be briefsort 3 1 21 2 3"


def test_task_config_builds_llama(task_dir):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(task_dir / "model"))
    config = LlamaConfig.from_pretrained(str(task_dir / "model"))
    assert config.vocab_size == len(tokenizer) and config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    generation_config = json.loads((task_dir / "model" / "generation_config.json").read_text())
    assert generation_config["eos_token_id"] == tokenizer.eos_token_id
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 5e6
    longest = max(len(tokenizer(tokenizer.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)["input_ids"])
                  for r in _read(task_dir / "sft.jsonl"))
    assert longest <= 128 <= config.max_position_embeddings  # conversations fit in sft.py --block-size 128
    ids = tokenizer(tokenizer.apply_chat_template(_user("add 1 2"), tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_task_pair_labels_follow_bernoulli(task_dir):
    pairs = _read(task_dir / "pairs_train.jsonl")
    assert {p["source"] for p in pairs} == set(TASKS)
    for p in pairs[:500]:
        assert p["chosen"] != p["rejected"] and p["margin"] != 0
        assert p["margin"] == pytest.approx(score(p["prompt"], p["chosen"]) - score(p["prompt"], p["rejected"]), abs=1e-6)
    # y ~ Bernoulli(σ(Δ/τ)): P(label agrees with r*) = σ(|Δ|/τ) per pair; the count of agreements is
    # a sum of independent Bernoullis, so it lies within 4 standard deviations of its mean.
    agree_probs = [1 / (1 + math.exp(-abs(p["margin"]) / TAU)) for p in pairs]
    expected = sum(agree_probs)
    std = math.sqrt(sum(q * (1 - q) for q in agree_probs))
    observed = sum(p["margin"] > 0 for p in pairs)
    assert abs(observed - expected) < 4 * std
    assert 0.75 < observed / len(pairs) < 0.92  # noisy, like human labels, but mostly right
    # the length hook: in the offline data the longer response is usually the chosen one
    longer = [len(p["chosen"]) > len(p["rejected"]) for p in pairs if len(p["chosen"]) != len(p["rejected"])]
    assert sum(longer) / len(longer) > 0.6


def test_task_demonstrations_have_controlled_noise(task_dir):
    records = _read(task_dir / "sft.jsonl")
    exact = verbose = 0
    for r in records:
        user, assistant = r["messages"]
        target = " ".join(parse_prompt(user["content"])[1])
        numbers = " ".join(tok for tok in assistant["content"].split() if tok.isdigit())
        exact += numbers == target
        verbose += any(c.isalpha() for c in assistant["content"])
    n = len(records)
    assert abs(exact / n - 0.8) < 4 * math.sqrt(0.16 / n)    # P(mistake) = 0.2
    assert abs(verbose / n - 0.3) < 4 * math.sqrt(0.21 / n)  # P(verbose) = 0.3


def test_task_score_command(tmp_path, capsys):
    samples = [{"id": "s0", "prompt": _user("sort 3 1 2"), "responses": ["1 2 3", "Sure! 1 2 3", "3 2 1"],
                "num_tokens": [6, 12, 6], "finish_reasons": ["stop"] * 3},
               {"id": "s1", "prompt": _user("add 5 7"), "responses": ["12"], "num_tokens": [3],
                "finish_reasons": ["length"]}]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    task_main(["score", "--samples", str(tmp_path / "samples.jsonl"), "--out", str(tmp_path / "scored.jsonl")])
    scored = _read(tmp_path / "scored.jsonl")
    assert scored[0]["gold"] == pytest.approx([1.0, 1 - 0.012, 1 / 3]) and scored[1]["gold"] == [1.0]
    assert scored[0]["responses"] == samples[0]["responses"]
    assert "mean gold 0.8303" in capsys.readouterr().out  # (1 + 0.988 + 1/3 + 1) / 4, over responses
