"""Tests of train_rm.py."""
import json

import pytest
import torch

import train_rm
from common import encode_prompt, encode_response, load_tokenizer, read_jsonl, write_jsonl
from model import Transformer
from tests.helpers import builtin_model_dir, run_script, tiny_config, write_pairs


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
