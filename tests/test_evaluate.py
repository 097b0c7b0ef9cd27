"""Tests of evaluate.py."""
import json

from common import read_jsonl
from data.task import score
from tests.helpers import builtin_model_dir, run_script


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
