"""Tests of eval_runs.py."""
import itertools
import json
import shutil

import pytest
import torch

from runs import read_jsonl, write_jsonl
from tokens import encode_prompt, load_tokenizer
from data.task import score
from model import Transformer
from tests.helpers import builtin_model_dir, run_script


def test_judge_statistics_on_a_known_case():
    from eval_runs import judge_statistics
    first, second = ["1 2 3", "4", "5 6", "7"], ["1 2", "8 9", "5 6", "3"]
    # pairs 0 and 1 differ in correctness; 2 and 3 do not (|Δ| ≤ 0.1)
    gold_difference = [0.5, -1.0, 0.0, 0.05]
    p_first = [0.9, 0.2, 0.7, 0.6]
    # unequal lengths: pairs 0 (prefers the longer first), 1 (prefers the longer second); 2 and 3
    # have equal lengths
    # gold: pair 0 sides with gold (Δ > 0, p > 1/2), pair 1 too (Δ < 0, p < 1/2)
    assert judge_statistics(first, second, gold_difference, p_first) == dict(
        pairs=4, prefers_longer=1.0, gold_agreement=1.0, gold_agreement_pairs=2)
    flipped = [1 - p for p in p_first]
    assert judge_statistics(first, second, gold_difference, flipped) == dict(
        pairs=4, prefers_longer=0.0, gold_agreement=0.0, gold_agreement_pairs=2)
    # no pair to measure on: no number, rather than a made-up 0
    assert judge_statistics(["1"], ["2"], [0.0], [0.9]) == dict(
        pairs=1, prefers_longer=None, gold_agreement=None, gold_agreement_pairs=0)
    # an indifferent judge (P = 1/2) votes for the second answer: right when it is gold's pick
    indifferent = judge_statistics(["1", "2"], ["3", "4"], [-0.5, 0.5], [0.5, 0.5])
    assert indifferent["gold_agreement"] == 0.5


def _make_eval_run(task_dir, tmp_path):
    """A run folder with SFT, an oracle iteration, an online iteration (SFT's weights) trained with
    a random BT reward model, an OSP run and an opinionated judge. Returns (run, rm, judge)."""
    run = tmp_path / "run"
    builtin_model_dir(task_dir, run / "sft")
    shutil.copytree(run / "sft", run / "online" / "iter1" / "policy")
    shutil.copytree(run / "sft", run / "osp_spce_ranked")
    # What the rewards the runs trained with got right on their own samples (dpo.py's
    # summary.json, osp.py's --gold lines).
    (run / "online" / "iter1" / "summary.json").write_text(
        json.dumps({"reward_vs_gold": {"accuracy": 0.61, "pairs": 10}}))
    write_jsonl(run / "osp_spce_ranked" / "metrics.jsonl",
                [dict(step=1, loss=0.7, judge_gold_agreement=0.5, judge_gold_pairs=2),
                 dict(step=2, loss=0.6, judge_gold_agreement=1.0, judge_gold_pairs=6),
                 dict(step=3, loss=0.6, judge_gold_agreement=float("nan"), judge_gold_pairs=0)])
    # a policy that differs from SFT
    builtin_model_dir(task_dir, run / "online_gold" / "iter1" / "policy", seed=2)
    # The reward model the "online" run trained with (a random scalar head): the proxy of its curve.
    rm = run / "rm_bt"
    shutil.copytree(task_dir / "model", rm)
    torch.manual_seed(3)
    Transformer.from_config(rm, head="score").save_pretrained(rm)
    (rm / "eval.json").write_text(json.dumps({"accuracy": 0.5, "accuracy_by_source": {}}))
    (run / "online" / "config.json").write_text(json.dumps({"rm": str(rm)}))
    # The judge: any causal LM can judge (A/B tokens exist in the task's tokenizer); larger weights
    # than the init's make an opinionated one, whose preferences are far from the 1/2 threshold.
    judge = builtin_model_dir(task_dir, run / "judge", seed=1)
    model = Transformer.from_pretrained(judge)
    torch.manual_seed(4)
    for weight in model.parameters():
        torch.nn.init.normal_(weight, std=0.3) if weight.dim() == 2 else None
    model.save_pretrained(judge)
    return run, rm, judge


def _check_checkpoints(run, results, tokenizer, limit, kept):
    """The table's rows: found in order, prompts over the limit left out, gold recomputed."""
    assert [r["label"] for r in results] == ["SFT", "iterative DPO, gold reward (oracle), t = 1",
                                             "iterative DPO, BT on SFT-like pairs, t = 1",
                                             "OSP (spce, ranked)"]
    answers = read_jsonl(run / "sft" / "eval_samples_T0.jsonl")
    assert [len(encode_prompt(tokenizer, a["prompt"])) <= limit for a in answers] == [True] * kept
    gold = [score(a["prompt"], a["responses"][0]) for a in answers]  # recomputed from the answers
    assert abs(results[0]["gold"] - sum(gold) / len(gold)) < 1e-9
    # the oracle: no proxy
    assert [r["reward_accuracy"] for r in results] == [None, None, 0.61, (0.5 * 2 + 1.0 * 6) / 8]
    assert "| 0.610 |" in (run / "results.md").read_text()
    # the same weights answer the same (greedy, and seeded samples)
    assert results[0]["gold"] == results[2]["gold"]
    assert results[0]["sampled_gold"] == results[2]["sampled_gold"]
    # paired with SFT
    assert results[2]["delta_gold"] == 0 and results[2]["delta_sampled_gold_stderr"] == 0
    oracle = [score(a["prompt"], a["responses"][0]) for a in
              read_jsonl(run / "online_gold" / "iter1" / "policy" / "eval_samples_T0.jsonl")]
    assert abs(results[1]["delta_gold"] - (sum(oracle) - sum(gold)) / len(gold)) < 1e-9
    assert "| SFT |" in (run / "results.md").read_text()


def _check_judge(run, judge, judged):
    """The judge's statistics, recomputed here from the cached sampled answers and the judge."""
    from rewards import pairwise_preference
    sampled = read_jsonl(run / "sft" / "eval_samples_T1.jsonl")
    prompts, first, second, gold_difference = [], [], [], []
    for record in sampled:
        gold = [score(record["prompt"], r) for r in record["responses"]]
        for i, j in itertools.combinations(range(4), 2):  # 4 sampled answers per prompt → 6 pairs
            prompts.append(record["prompt"])
            first.append(record["responses"][i])
            second.append(record["responses"][j])
            gold_difference.append(gold[i] - gold[j])
    with torch.no_grad():
        p_first = pairwise_preference(Transformer.from_pretrained(judge).eval(),
                                      load_tokenizer(judge), prompts, first, second, "cpu",
                                      "pairwise").tolist()
    # no pair that counts in a statistic lies near the threshold, so the counts below are exact
    assert min(abs(p - 0.5) for p, a, b, d in zip(p_first, first, second, gold_difference)
               if len(a) != len(b) or abs(d) > 0.1) > 1e-4
    longer = [(len(a) > len(b)) == (p > 0.5)
              for a, b, p in zip(first, second, p_first) if len(a) != len(b)]
    agree = [(d > 0) == (p > 0.5) for d, p in zip(gold_difference, p_first) if abs(d) > 0.1]
    assert longer and agree  # both statistics are measured on something
    assert judged["pairs"] == len(sampled) * 6 and judged["gold_agreement_pairs"] == len(agree)
    assert judged["prefers_longer"] == sum(longer) / len(longer)
    assert judged["gold_agreement"] == sum(agree) / len(agree)


def _check_versus_offline(run, args, results):
    """An offline DPO checkpoint on the SFT-like pairs (here the oracle's weights, with their cached
    answers) adds paper 1's comparison: the "online" run's last iteration (SFT's weights) minus it,
    paired per prompt. The rerun reuses the cached answers."""
    before = (run / "sft" / "eval_samples_T1.jsonl").stat().st_mtime_ns
    shutil.copytree(run / "online_gold" / "iter1" / "policy", run / "dpo_offline")
    run_script(args)
    assert (run / "sft" / "eval_samples_T1.jsonl").stat().st_mtime_ns == before
    [versus] = json.loads((run / "results.json").read_text())["versus_offline"]
    assert versus["label"] == ("iterative DPO, BT on SFT-like pairs, t = 1 − offline DPO, "
                               "SFT-like pairs, human labels (the ideal)")
    assert versus["delta_gold"] == pytest.approx(-results[1]["delta_gold"])
    assert versus["delta_sampled_gold"] == pytest.approx(-results[1]["delta_sampled_gold"])
    assert results[1]["delta_sampled_gold"] != 0  # the sign is tested
    row = (f"| {versus['label']} | {versus['delta_gold']:+.3f} ± "
           f"{versus['delta_gold_stderr']:.3f} | ")
    assert row in (run / "results.md").read_text()


def _sequence_logp(model, prompt, response):
    ids = torch.tensor([prompt + response])
    logps = torch.log_softmax(model(ids)[0, len(prompt) - 1:-1].double(), -1)
    return logps.gather(1, ids[0, len(prompt):, None]).sum().item()


def _check_curves(run, rm, tokenizer, evaluation):
    """The over-optimisation curves' inputs, recomputed one sequence at a time from the cached
    answers; and the reward model on SFT's own samples (on-policy), beside its held-out accuracy."""
    curves = evaluation["proxy_vs_gold"]
    assert list(curves) == ["online_gold", "online"]
    assert [p["t"] for p in curves["online"]] == [0, 1]
    # a copy of π_0 (log π from the sampler, log π_0 from a forward: equal up to rounding); gold
    # needs no proxy
    assert abs(curves["online"][1]["kl"]) < 1e-5 and "reward" not in curves["online_gold"][0]
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    policy, reference = (Transformer.from_pretrained(p).eval()
                         for p in (run / "online_gold" / "iter1" / "policy", run / "sft"))
    reward_model = Transformer.from_pretrained(rm, head="score").eval()
    samples = read_jsonl(run / "online_gold" / "iter1" / "policy" / "eval_samples_T1.jsonl")
    kl, rewards, golds = [], [], []
    with torch.no_grad():
        for record in read_jsonl(run / "sft" / "eval_samples_T1.jsonl"):
            for text in record["responses"]:
                ids = torch.tensor([encode_prompt(tokenizer, record["prompt"])
                                    + tokenizer.encode(text, add_special_tokens=False) + [end]])
                rewards.append(reward_model(ids)[0, -1].item())  # the score at the last token
        for record in samples:
            prompt = encode_prompt(tokenizer, record["prompt"])
            golds += [score(record["prompt"], text) for text in record["responses"]]
            for text, reason in zip(record["responses"], record["finish_reasons"]):
                response = (tokenizer.encode(text, add_special_tokens=False)
                            + ([end] if reason == "stop" else []))
                kl.append(_sequence_logp(policy, prompt, response)
                          - _sequence_logp(reference, prompt, response))
    assert abs(curves["online_gold"][1]["kl"] - sum(kl) / len(kl)) < 1e-4
    assert curves["online_gold"][1]["kl"] > 0.01
    assert abs(curves["online_gold"][1]["gold"] - sum(golds) / len(golds)) < 1e-9
    assert abs(curves["online"][0]["reward"] - sum(rewards) / len(rewards)) < 1e-4
    assert curves["online"][0]["reward"] == curves["online"][1]["reward"]
    assert (run / "over_optimisation.png").exists()
    assert "| iterative DPO, BT on SFT-like pairs | 1 | 0.00 |" in (run / "results.md").read_text()
    on_policy = evaluation["reward_models"]["Bradley-Terry (SFT-like pairs)"]["on_policy"]
    scored = [{"gold": [score(r["prompt"], y) for y in r["responses"]],
               "rewards": rewards[4 * i:4 * i + 4]}
              for i, r in enumerate(read_jsonl(run / "sft" / "eval_samples_T1.jsonl"))]
    from data.task import reward_vs_gold
    assert on_policy["pairs"] == reward_vs_gold(scored)["pairs"] > 0
    assert abs(on_policy["accuracy"] - reward_vs_gold(scored)["accuracy"]) < 1e-9


def test_evaluate_finds_checkpoints_scores_with_gold_and_caches(task_dir, tmp_path):
    run, rm, judge = _make_eval_run(task_dir, tmp_path)
    # --max-prompt-length leaves the longest prompts out, the same ones for every checkpoint
    tokenizer = load_tokenizer(run / "sft")
    lengths = [len(encode_prompt(tokenizer, p["messages"]))
               for p in read_jsonl(task_dir / "prompts_eval.jsonl")]
    limit = max(lengths) - 1
    kept = sum(length <= limit for length in lengths)
    args = ["eval_runs.py", "--run", str(run), "--prompts", str(task_dir / "prompts_eval.jsonl"),
            "--max-new-tokens", "8", "--device", "cpu", "--max-prompt-length", str(limit)]
    stdout = run_script(args)
    assert f"skipped {len(lengths) - kept} of {len(lengths)} prompts" in stdout
    assert f"Held-out prompts: {kept} " in stdout
    evaluation = json.loads((run / "results.json").read_text())
    results = evaluation["checkpoints"]
    _check_checkpoints(run, results, tokenizer, limit, kept)
    _check_judge(run, judge, evaluation["judge"])
    _check_versus_offline(run, args, results)
    _check_curves(run, rm, tokenizer, evaluation)
    # --gold with a verifier in TRL's convention (here an answer's length in characters) grades
    # the cached answers afresh: each checkpoint's greedy gold is then its mean answer length
    (tmp_path / "verify.py").write_text("def length(prompts, completions, **columns):\n"
                                        "    return [len(c[0]['content']) for c in completions]\n")
    run_script(args + ["--gold", f"{tmp_path / 'verify.py'}:length"])
    rows = json.loads((run / "results.json").read_text())["checkpoints"]
    assert len(rows) >= len(results)
    assert all(row["gold"] == pytest.approx(row["length"]) for row in rows)
    assert any(row["length"] > 1 for row in rows)  # not the built-in gold, which is at most 1


def test_across_runs_combines_paired_differences():
    from eval_runs import across_runs

    def run(delta, stderr):
        rows = [{"label": "SFT", "gold": 0.5, "sampled_gold": 0.4, "sampled_length": 10.0},
                {"label": "x", "gold": 0.5 + delta, "sampled_gold": 0.4, "sampled_length": 10.0,
                 "delta_gold": delta, "delta_gold_stderr": stderr, "delta_sampled_gold": 0.0,
                 "delta_sampled_gold_stderr": 0.01}]
        return {"checkpoints": rows, "references": {}, "reward_models": {},
                "length_correlations": {}, "judge": None, "proxy_vs_gold": {}}
    # Δ = +0.03 (s.e. 0.01: beyond 2 s.e.), +0.01 (0.01: not), −0.01 (0.004: beyond 2 s.e., but
    # against the mean)
    text = across_runs([run(0.03, 0.01), run(0.01, 0.01), run(-0.01, 0.004)], ["a", "b", "c"])
    combined = (0.01 ** 2 + 0.01 ** 2 + 0.004 ** 2) ** 0.5 / 3
    assert f"| +0.010 ± {combined:.3f} (1/3) |" in text


def test_versus_offline_pairs_the_last_iteration_with_offline_dpo_on_the_same_pairs():
    from eval_runs import across_runs, versus_offline
    rows = [dict(label="SFT", folder="r/sft", series=None, t=0),
            dict(label="offline DPO, off-policy pairs", folder="r/dpo_offline_offpolicy",
                 series=None, t=None),
            dict(label="BT off-policy, t = 1", folder="r/online_offpolicy/iter1/policy",
                 series="online_offpolicy", t=1),
            dict(label="BT off-policy, t = 2", folder="r/online_offpolicy/iter2/policy",
                 series="online_offpolicy", t=2),
            dict(label="oracle, t = 2", folder="r/online_gold/iter2/policy", series="online_gold",
                 t=2)]
    # (greedy gold, mean sampled gold) per prompt, 3 prompts
    per_prompt = {"r/sft": ([0.0] * 3, [0.0] * 3),
                  "r/dpo_offline_offpolicy": ([1.0, 0.5, 0.0], [0.5, 0.5, 0.5]),
                  # not the last iteration: unused
                  "r/online_offpolicy/iter1/policy": ([9.0] * 3, [9.0] * 3),
                  "r/online_offpolicy/iter2/policy": ([1.0, 1.0, 1.0], [0.25, 0.5, 0.75]),
                  "r/online_gold/iter2/policy": ([0.0] * 3, [0.0] * 3)}
    # the SFT-like pair (online, dpo_offline) is absent: no row, rather than a comparison with
    # something else
    [v] = versus_offline(rows, per_prompt)
    assert v["label"] == "BT off-policy, t = 2 − offline DPO, off-policy pairs"
    # greedy differences 0, 0.5, 1: mean 0.5, sample std 0.5, s.e. 0.5/√3; sampled −0.25, 0, 0.25:
    # mean 0, s.e. 0.25/√3
    assert v["delta_gold"] == pytest.approx(0.5)
    assert v["delta_gold_stderr"] == pytest.approx(0.5 / 3 ** 0.5)
    assert v["delta_sampled_gold"] == pytest.approx(0.0)
    assert v["delta_sampled_gold_stderr"] == pytest.approx(0.25 / 3 ** 0.5)
    evaluation = {"checkpoints": [], "versus_offline": [v], "references": {}, "reward_models": {},
                  "length_correlations": {}, "judge": None, "proxy_vs_gold": {}}
    text = across_runs([evaluation, evaluation], ["a", "b"])
    combined = (2 * (0.5 / 3 ** 0.5) ** 2) ** 0.5 / 2
    assert (f"| BT off-policy, t = 2 − offline DPO, off-policy pairs | +0.500 ± {combined:.3f} "
            "(0/2) |" in text)
    # results.json written before this comparison existed still combine (no row for it)
    old = {k: value for k, value in evaluation.items() if k != "versus_offline"}
    assert "paper 1's comparison" not in across_runs([old, evaluation], ["old", "b"])


def test_plots_render_from_synthetic_results(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread
    from eval_runs import plot, plot_proxy_vs_gold
    # A KL estimate just below 0 is drawn at √KL = 0; the gold-reward run alone has no proxy panel.
    gold_only = {"online_gold": [dict(t=0, gold=0.6, kl=0.0), dict(t=1, gold=0.7, kl=-0.003)]}
    (tmp_path / "gold").mkdir()
    [png] = plot_proxy_vs_gold(gold_only, tmp_path / "gold")
    both = gold_only | {"online": [dict(t=0, gold=0.6, kl=0.0, reward=1.5),
                                   dict(t=1, gold=0.65, kl=0.4, reward=1.9)]}
    [png_with_proxy] = plot_proxy_vs_gold(both, tmp_path)
    assert imread(png_with_proxy).shape[1] > 1.5 * imread(png).shape[1]  # two panels, one

    for folder in ("sft", "online/iter1/policy", "online/iter2/policy", "osp_spce_ranked"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n'
                                                         '{"step": 2, "loss": 0.6}\n')

    def row(label, series, t):
        return dict(label=label, series=series, t=t, gold=0.5, gold_stderr=0.01, sampled_gold=0.4,
                    sampled_gold_stderr=0.01)
    results = [row("SFT", None, 0), row("offline DPO", None, None),
               row("OSP (spce, ranked)", None, None),
               row("iterative DPO, BT on SFT-like pairs, t = 1", "online", 1),
               row("iterative DPO, BT reward model, t = 2", "online", 2)]
    assert [p.name for p in plot(tmp_path, results, tmp_path)] == ["gold_per_iteration.png",
                                                                   "training_curves.png"]


def test_sampled_kl_of_a_copy_of_the_reference(tiny_model_dir, tmp_path, monkeypatch):
    """KL of π_0's copy from π_0 on its own samples: in fp32 the sampler's log π(y|x) against a
    forward of π_ref, equal up to rounding; in bf16 both from the same forward, so exactly 0 (the
    sampler's bf16 numbers would leave a positive floor)."""
    import eval_runs
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    prompts = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"say {i}"}]}
               for i in range(3)]
    zero = (lambda prompts, completions, **columns: [0.0] * len(completions), "zero")
    cpu = torch.device("cpu")
    records = eval_runs.answers(copy, prompts, cpu, 8, 0, 2, 1.0, zero)
    assert all(len(r["logprobs"]) == 2 for r in records)
    assert abs(eval_runs.Scorer(cpu).sampled_kl(copy, tiny_model_dir, records)) < 1e-5
    monkeypatch.setattr(eval_runs, "default_dtype", lambda device: torch.bfloat16)
    assert eval_runs.Scorer(cpu).sampled_kl(copy, tiny_model_dir, records) == 0.0


def test_reward_accuracy_only_against_the_same_gold(tmp_path):
    """An online iteration's "reward acc." is its summary's, where that summary compared the reward
    with the gold this evaluation grades with (an older summary names none: the built-in r*)."""
    from eval_runs import training_reward_accuracy
    policy = tmp_path / "online" / "iter1" / "policy"
    policy.mkdir(parents=True)
    summary = dict(reward_vs_gold=dict(accuracy=0.75, pairs=8))
    (policy.parent / "summary.json").write_text(json.dumps(summary))
    assert training_reward_accuracy(policy, "online", 1) == 0.75
    assert training_reward_accuracy(policy, "online", 1, "v.py:f") is None
    (policy.parent / "summary.json").write_text(json.dumps(summary | dict(gold="v.py:f")))
    assert training_reward_accuracy(policy, "online", 1, "v.py:f") == 0.75
    assert training_reward_accuracy(policy, "online", 1) is None
    assert training_reward_accuracy(policy, "online_gold", 1, "v.py:f") is None


def test_prepare_answers_only_named_folders_and_rewards_in_order(tiny_model_dir, tmp_path):
    """--prepare caches the answers of the named folders' checkpoints only (and SFT's cooler ones),
    which the evaluation then reads; Scorer.rewards, which scores answers in length order, gives
    each answer its own reward, as score_records in the records' order does."""
    import eval_runs
    from rewards import score_records
    run = tmp_path / "run"
    for name in ("sft", "dpo_offline"):
        shutil.copytree(tiny_model_dir, run / name)
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"id": f"p{i}", "messages": [{"role": "user", "content": "ab" * i}]}
                          for i in range(1, 6)])
    verifier = tmp_path / "v.py"
    verifier.write_text("def length(completions, **kw):\n"
                        "    return [len(c[0]['content']) for c in completions]\n")
    eval_runs.main(["--run", str(run), "--prompts", str(prompts), "--max-new-tokens", "6",
                    "--samples", "3", "--device", "cpu", "--gold", f"{verifier}:length",
                    "--prepare", "sft"])
    assert sorted(p.name for p in (run / "sft").glob("eval_samples_*")) == [
        "eval_samples_T0.5.jsonl", "eval_samples_T0.jsonl", "eval_samples_T1.jsonl"]
    assert not list((run / "dpo_offline").glob("eval_samples_*"))
    records = read_jsonl(run / "sft" / "eval_samples_T1.jsonl")
    assert all(r["gold"] == [len(t) for t in r["responses"]] for r in records)
    # answers cut at another --max-new-tokens are not graded again: they are answered again
    zero = (lambda prompts, completions, **columns: [0.0] * len(completions), "zero")
    shorter = eval_runs.answers(run / "sft", read_jsonl(prompts), torch.device("cpu"), 2, 0, 3,
                                1.0, zero)
    assert max(n for r in shorter for n in r["num_tokens"]) <= 2 < max(
        n for r in records for n in r["num_tokens"])
    assert read_jsonl(run / "sft" / "eval_samples_T1.jsonl")[0]["max_new_tokens"] == 2
    rm = tmp_path / "rm"
    shutil.copytree(tiny_model_dir, rm)
    scorer = eval_runs.Scorer(torch.device("cpu"))
    model, tokenizer = scorer.model(rm, head="score")
    expected = score_records(model, tokenizer, records, torch.device("cpu"), 256, 1024)
    for got, want in zip(scorer.rewards(rm, run / "sft", records), expected):
        assert got["rewards"] == pytest.approx(want["rewards"], abs=1e-5)
        assert len(set(want["rewards"])) > 1  # distinct rewards: an order mix-up shows
