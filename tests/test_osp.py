"""Tests of osp.py."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from runs import read_jsonl
from tokens import encode_prompt, load_tokenizer
from model import Transformer
from tests.helpers import builtin_model_dir, run_script, run_script_expecting_error


def test_ranked_pairs_odd_and_even_k():
    from osp import ranked_pairs
    # K = 6: ranks 1 (index 3), 2 (0), 3 (5), 4 (1), 5 (4), 6 (2)
    assert ranked_pairs([0.8, 0.3, 0.1, 0.9, 0.2, 0.5]) == [(3, 2), (0, 4), (5, 1)]
    # K = 7: the median (index 6, score 0.5) is left out
    assert ranked_pairs([0.8, 0.3, 0.1, 0.9, 0.2, 0.6, 0.5]) == [(3, 2), (0, 4), (5, 1)]
    # ties keep the lower index first; K = 1 gives no pair
    assert ranked_pairs([0.5, 0.5, 0.5, 0.5]) == [(0, 3), (1, 2)]
    assert ranked_pairs([0.7]) == []


def test_rollout_gives_the_sampled_ids_and_the_update_trains_on_them(tiny_model_dir):
    """osp.py scores each pair's responses as sampled: the rollout's ids are the engine's tokens (a
    cut one with no stop token), and pair_ids hands exactly those to the update, never the decoded
    text re-encoded."""
    from types import SimpleNamespace

    import generate
    from tokens import stop_token_ids
    from osp import pair_ids, rollout
    tokenizer = load_tokenizer(tiny_model_dir)
    model = Transformer.from_pretrained(tiny_model_dir).eval()
    engine = generate.Engine(model, 8, stop_token_ids(tokenizer))
    prompts = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"reverse {i} 7"}]}
               for i in range(2)]
    args = SimpleNamespace(k=4, max_new_tokens=3, temperature=1.0, top_p=1.0, seed=0)
    texts, ids, cut, _ = rollout(engine, tokenizer, prompts, args, step=0,
                                 device=torch.device("cpu"))
    reference = generate.generate_records(engine, tokenizer, prompts, 4, 3, 1.0, top_p=1.0,
                                          seed=0 * 1_000_003 + 0)
    assert ids == [r["response_ids"] for r in reference]
    assert texts == [r["responses"] for r in reference]
    stops = set(stop_token_ids(tokenizer))
    assert all((row[-1] not in stops) == c
               for rows, cuts in zip(ids, cut) for row, c in zip(rows, cuts))
    assert any(map(any, cut))  # at 3 new tokens some samples are cut
    assert pair_ids(ids, [(1, 2, 0), (0, 3, None)]) == [(ids[1][2], ids[1][0]), (ids[0][3], None)]


@pytest.mark.parametrize("loss", ["ipo", "dpo", "spce"])
def test_osp_logs_the_margin_its_loss_uses(tiny_model_dir, loss):
    """The h osp.py logs (implicit = σ(βh)) is the h of its loss: under IPO, of length-normalised
    log-probs (the loss is exactly (h − 1/(2β))²); under DPO / SPCE of summed ones."""
    from types import SimpleNamespace

    from osp import pair_losses
    torch.manual_seed(0)
    policy = Transformer.from_pretrained(tiny_model_dir)
    reference = Transformer.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    args = SimpleNamespace(beta=0.5, loss=loss)
    prompts = [[5, 6, 7], [8, 9]]
    chosen, rejected = [[10, 11, 12, 13, 14], [15]], [[16, 17], [18, 19, 20]]
    per_pair, h, _ = pair_losses(policy, reference, prompts, chosen, rejected,
                                 torch.full((2,), 0.7), args, 0, "cpu")
    if loss == "ipo":
        expected_ipo = ((h - 1 / (2 * args.beta)) ** 2).tolist()
        assert per_pair.detach() == pytest.approx(expected_ipo, abs=1e-6)
    else:
        p = 1.0 if loss == "dpo" else 0.7
        logsigmoid = torch.nn.functional.logsigmoid
        expected = -(p * logsigmoid(args.beta * h) + (1 - p) * logsigmoid(-args.beta * h))
        assert per_pair.detach() == pytest.approx(expected.tolist(), abs=1e-6)


def test_missing_eos_penalty_ranks_a_cut_response_lower():
    from osp import make_pairs, penalise_missing_eos
    # the judge's favourite never ended
    scores, cut = [[0.9, 0.8, 0.2, 0.1]], [[True, False, False, False]]
    assert penalise_missing_eos(scores, cut, 0.0) == scores
    penalised = penalise_missing_eos(scores, cut, 1.0)
    assert penalised[0] == pytest.approx([-0.1, 0.8, 0.2, 0.1])
    assert make_pairs(scores, "ranked", None) == [(0, 0, 3), (0, 1, 2)]
    # now the lowest: paired as rejected
    assert make_pairs(penalised, "ranked", None) == [(0, 1, 0), (0, 2, 3)]
    assert make_pairs(penalised, "best", None) == [(0, 1, None)]


def test_random_pairs_are_disjoint_and_oriented_by_score():
    import random as random_module

    from osp import random_pairs
    scores = [0.2, 0.9, 0.4, 0.7, 0.1]
    pairs = random_pairs(scores, random_module.Random(0))
    used = [i for pair in pairs for i in pair]
    assert len(pairs) == 2 and len(set(used)) == 4
    assert all(scores[hi] >= scores[lo] for hi, lo in pairs)


def test_judge_targets_are_symmetric_under_ab_swap(task_dir, tmp_path):
    from rewards import pairwise_preference
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
    # a random judge is not indifferent, so the test can fail
    assert (p_ab - 0.5).abs().max() > 1e-4


BETA = 0.1
# At step 1 the policy is the reference π_SFT, so h = 0 on every pair: SPCE's and DPO's loss is
# log 2 (SPCE whatever the target), IPO's (0 − 1/(2β))², the implicit strength σ(0) = 1/2, and the
# KL estimate 0. RAFT's (best) loss is the best response's per-token NLL: positive.
STEP_ONE_LOSS = {"spce": math.log(2), "dpo": math.log(2), "ipo": (1 / (2 * BETA)) ** 2}


@pytest.mark.parametrize("loss,pairing,nproc", [("spce", "ranked", 1), ("dpo", "random", 2),
                                                ("ipo", "ranked", 1), ("spce", "best", 1)])
def test_osp_steps_run_on_builtin_task_and_change_the_policy(loss, pairing, nproc, task_dir,
                                                             tmp_path):
    from safetensors.torch import load_file

    from data.judge import PAIRWISE_TEMPLATE
    sft = builtin_model_dir(task_dir, tmp_path / "sft")
    out = tmp_path / "osp"
    args = ["osp.py", "--model", str(sft), "--prompts", str(task_dir / "prompts_iter1.jsonl"),
            "--out", str(out), "--steps", "1", "--batch-size", "2", "--k", "3",
            "--max-new-tokens", "6", "--lr", "1e-3", "--beta", str(BETA),
            "--loss", loss, "--pairing", pairing, "--gold", "--device", "cpu"]
    if loss == "ipo":  # --gold with a verifier in TRL's convention: here the length in characters
        (tmp_path / "verify.py").write_text(
            "def length(prompts, completions, **columns):\n"
            "    return [len(c[0]['content']) for c in completions]\n")
        args.insert(args.index("--gold") + 1, f"{tmp_path / 'verify.py'}:length")
    # a separate judge folder recording its template, as train_rm.py writes it
    if (loss, pairing) == ("spce", "ranked"):
        judge = tmp_path / "judge"
        builtin_model_dir(task_dir, judge, seed=1)
        (judge / "judge_template.txt").write_text(PAIRWISE_TEMPLATE)
        args += ["--judge", str(judge)]
    if pairing == "best":  # prompts over --max-prompt-length are left out, and counted
        tokenizer = load_tokenizer(sft)
        lengths = sorted(len(encode_prompt(tokenizer, r["messages"]))
                         for r in read_jsonl(task_dir / "prompts_iter1.jsonl"))
        limit = lengths[len(lengths) // 2]
        skipped = sum(length > limit for length in lengths)
        assert skipped > 0
        args += ["--max-prompt-length", str(limit)]
    stdout = run_script(args, nproc=nproc)
    if pairing == "best":
        assert f"skipped {skipped} of {len(lengths)} prompts in " \
               f"{task_dir / 'prompts_iter1.jsonl'} longer than " \
               f"--max-prompt-length {limit} tokens" in stdout
    (line,) = read_jsonl(out / "metrics.jsonl")
    assert line["step"] == 1
    if pairing == "best":
        assert line["loss"] > 0 and line["target_strength"] == 1.0
        assert math.isnan(line["judge_gold_agreement"])
    else:
        assert line["loss"] == pytest.approx(STEP_ONE_LOSS[loss], rel=1e-6)
        # the judge's soft targets
        assert 0.0 < line["target_strength"] < 1.0 and line["target_strength"] != 0.5
    assert line["implicit_strength"] == pytest.approx(0.5, abs=1e-7) and abs(line["pair_kl"]) < 1e-6
    if loss == "ipo":
        assert line["gold_mean"] == pytest.approx(line["mean_length_chars"], rel=1e-6)
    else:
        assert -1.0 <= line["gold_mean"] <= 1.0
    assert line["mean_length_chars"] > 0 and line["grad_norm"] > 0
    assert 0.0 <= line["missing_eos"] <= 1.0
    before, after = load_file(sft / "model.safetensors"), load_file(out / "model.safetensors")
    assert max((after[n] - before[n]).abs().max().item() for n in before) > 1e-4
    AutoModelForCausalLM.from_pretrained(out)  # the trained policy is a valid HF checkpoint
    if loss == "ipo":
        saved = (out / "model.safetensors").stat().st_mtime_ns
        assert "skipping" in run_script(args)  # a finished run is not redone ...
        assert (out / "model.safetensors").stat().st_mtime_ns == saved
        assert "skipping" not in run_script(args + ["--overwrite"])  # ... unless asked
        assert (out / "model.safetensors").stat().st_mtime_ns != saved


def test_osp_empty_prompts_file_is_a_one_line_error(task_dir, tmp_path):
    (tmp_path / "prompts.jsonl").write_text("")
    sft = builtin_model_dir(task_dir, tmp_path / "sft")
    error = run_script_expecting_error(["osp.py", "--model", str(sft),
                                        "--prompts", str(tmp_path / "prompts.jsonl"),
                                        "--out", str(tmp_path / "osp"), "--device", "cpu"])
    assert str(tmp_path / "prompts.jsonl") in error and "max()" not in error
    assert not (tmp_path / "osp").exists()
