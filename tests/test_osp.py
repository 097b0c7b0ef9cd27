"""Tests of osp.py."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from common import load_tokenizer, read_jsonl
from model import Transformer
from tests.helpers import builtin_model_dir, run_script


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
    import random as random_module

    from osp import random_pairs
    scores = [0.2, 0.9, 0.4, 0.7, 0.1]
    pairs = random_pairs(scores, random_module.Random(0))
    used = [i for pair in pairs for i in pair]
    assert len(pairs) == 2 and len(set(used)) == 4
    assert all(scores[hi] >= scores[lo] for hi, lo in pairs)


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
    from safetensors.torch import load_file

    from data.judge import PAIRWISE_TEMPLATE
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
