"""Tests of generate.py."""

import torch
from transformers import AutoModelForCausalLM

import generate
from common import read_jsonl, write_jsonl
from model import Transformer
from tests.helpers import run_script


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
