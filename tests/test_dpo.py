"""Tests of dpo.py."""
import json
import math

import pytest
import torch

import dpo
from common import load_tokenizer, read_jsonl, write_jsonl
from data.task import score
from model import Transformer
from tests.helpers import builtin_model_dir, run_script, tiny_config, write_pairs


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
