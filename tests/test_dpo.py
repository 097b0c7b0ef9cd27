"""Tests of dpo.py: the losses by hand and against TRL's formulas, the settings of a run (every
flag spelling, what carries over to the next iteration, what a resume may not change), the user
errors, and offline and online runs end to end."""
import contextlib
import io
import json
import math
import subprocess
import sys

import pytest
import torch

import dpo
from parallel import init_distributed
from runs import InputError, process_in_chunks, read_jsonl, run_cli, write_jsonl
from tokens import encode_prompt, encode_response, load_tokenizer, stop_token_ids
from data.task import score
from model import Transformer
from tests.helpers import ROOT, run_builtin_online, run_script, tiny_config, write_pairs
import losses


def trl_sigmoid_loss(pc, pr, rc, rr, beta, label_smoothing=0.0):
    """The DPO "sigmoid" loss with label smoothing ε as TRL's DPOTrainer documented it before 1.x:
    −(1 − ε) log σ(βh) − ε log σ(−βh), Mitchell's cDPO ("A note on DPO with noisy preferences and
    relationship to IPO", 2023): the label is flipped with probability ε. Our cDPO is SPCE with
    target p = 1 − ε, which is exactly this formula. (TRL 1.16's "sigmoid" loss no longer reads
    label_smoothing, and its "robust"/... variants are other losses, so we test against the
    formula, written out here, not against the library.)"""
    logits = (pc - pr) - (rc - rr)
    return -torch.nn.functional.logsigmoid(beta * logits) * (1 - label_smoothing) \
        - torch.nn.functional.logsigmoid(-beta * logits) * label_smoothing


def trl_ipo_loss(pc, pr, rc, rr, beta):
    """TRL's "ipo" loss on log-probs it has already averaged over each response's tokens."""
    logits = (pc - pr) - (rc - rr)
    return (logits - 1 / (2 * beta)) ** 2


def test_preference_losses_hand_values():
    # h = (−1 − (−1.5)) − (−2 − (−1.5)) = 0.5 + 0.5 = 1
    args = [torch.tensor([-1.0]), torch.tensor([-2.0]),  # the policy's chosen, rejected log-probs
            torch.tensor([-1.5]), torch.tensor([-1.5]),  # the reference's
            0.1]                                         # β
    log_sigmoid = torch.nn.functional.logsigmoid
    dpo_loss = losses.preference_loss(*args, "dpo").item()
    assert dpo_loss == pytest.approx(-math.log(1 / (1 + math.exp(-0.1))), abs=1e-6)
    assert dpo_loss == pytest.approx(0.6443967, abs=1e-6)
    assert losses.preference_loss(*args, "ipo").item() == pytest.approx((1 - 5) ** 2, abs=1e-5)
    spce = losses.preference_loss(*args, "spce", target=0.7).item()
    assert spce == pytest.approx(-(0.7 * log_sigmoid(torch.tensor(0.1))
                                   + 0.3 * log_sigmoid(torch.tensor(-0.1))).item(), abs=1e-6)
    assert spce == pytest.approx(0.7 * 0.6443967 + 0.3 * 0.7443967, abs=1e-6)
    with pytest.raises(ValueError):
        losses.preference_loss(*args, "hinge-typo")


def test_preference_losses_match_trl_formulas():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64) * 5 for _ in range(4))
    for beta in (0.01, 0.1, 1.0):
        assert torch.allclose(losses.preference_loss(pc, pr, rc, rr, beta, "dpo"),
                              trl_sigmoid_loss(pc, pr, rc, rr, beta), atol=1e-6)
        assert torch.allclose(losses.preference_loss(pc, pr, rc, rr, beta, "ipo"),
                              trl_ipo_loss(pc, pr, rc, rr, beta), atol=1e-4)
        # cDPO (label smoothing ε) = SPCE with target 1 − ε
        assert torch.allclose(losses.preference_loss(pc, pr, rc, rr, beta, "spce", target=0.8),
                              trl_sigmoid_loss(pc, pr, rc, rr, beta, label_smoothing=0.2),
                              atol=1e-6)


def test_ipo_length_normalisation_lives_in_preference_loss():
    """With token counts, IPO divides each of the four log-probs by its response's token count
    (TRL's convention); DPO and SPCE, whose log-probs are sums, ignore the counts."""
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16) * 20 for _ in range(4))
    chosen_tokens, rejected_tokens = torch.randint(1, 30, (16,)), torch.randint(1, 30, (16,))
    ipo = losses.preference_loss(pc, pr, rc, rr, 0.1, "ipo", chosen_tokens=chosen_tokens,
                                 rejected_tokens=rejected_tokens)
    expected = trl_ipo_loss(pc / chosen_tokens, pr / rejected_tokens, rc / chosen_tokens,
                            rr / rejected_tokens, 0.1)
    assert torch.allclose(ipo, expected, atol=1e-5)
    # the counts matter
    assert not torch.allclose(ipo, losses.preference_loss(pc, pr, rc, rr, 0.1, "ipo"))
    for loss_type in ("dpo", "spce"):
        assert torch.equal(losses.preference_loss(pc, pr, rc, rr, 0.1, loss_type, 0.7,
                                                  chosen_tokens, rejected_tokens),
                           losses.preference_loss(pc, pr, rc, rr, 0.1, loss_type, 0.7))


def test_dpo_is_log2_at_the_reference_and_spce_p1_is_dpo():
    logps = torch.randn(8, requires_grad=True)
    other = torch.randn(8, requires_grad=True)
    loss = losses.preference_loss(logps, other, logps.detach(), other.detach(), 0.1, "dpo")
    assert torch.allclose(loss, torch.full((8,), math.log(2)), atol=1e-6)
    loss.sum().backward()
    # at policy = reference the gradient in h is −β·σ(0) = −β/2 per pair, not zero ...
    assert torch.allclose(logps.grad, torch.full((8,), -0.05))
    assert torch.allclose(other.grad, torch.full((8,), 0.05))
    # ... and zero only when the two responses coincide (or, for SPCE, when the target is 1/2)
    same = torch.randn(4, requires_grad=True)
    losses.preference_loss(same, same, same.detach(), same.detach(), 0.1, "dpo").sum().backward()
    assert same.grad.abs().max().item() == 0.0
    h_args = (torch.randn(16), torch.randn(16), torch.randn(16), torch.randn(16), 0.3)
    assert torch.allclose(losses.preference_loss(*h_args, "spce", target=torch.ones(16)),
                          losses.preference_loss(*h_args, "dpo"), atol=1e-7)


def test_spce_gradient_matches_formula_and_vanishes_at_target():
    """Paper 2: ∂L/∂h = β(σ(βh) − p); zero when the implicit strength σ(βh) equals the target p."""
    beta = 0.5
    h = torch.linspace(-4, 4, 17, requires_grad=True)
    p = torch.rand(17)
    zeros = torch.zeros(17)
    losses.preference_loss(h, zeros, zeros, zeros, beta, "spce", target=p).sum().backward()
    assert torch.allclose(h.grad, beta * (torch.sigmoid(beta * h.detach()) - p), atol=1e-6)
    p_star = torch.tensor([0.2, 0.5, 0.9])
    h_star = (torch.log(p_star / (1 - p_star)) / beta).requires_grad_()
    losses.preference_loss(h_star, torch.zeros(3), torch.zeros(3), torch.zeros(3), beta, "spce",
                           target=p_star).sum().backward()
    assert h_star.grad.abs().max().item() < 1e-6
    # float64 gradcheck of all three losses through all four inputs
    inputs = [torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    target = torch.full((5,), 0.3, dtype=torch.float64)
    for loss_type in ("dpo", "ipo", "spce"):
        def loss(*x, loss_type=loss_type):
            return losses.preference_loss(*x, 0.2, loss_type, target=target)
        assert torch.autograd.gradcheck(loss, inputs)


def test_ipo_minimum_is_at_half_inverse_beta():
    beta = 0.25
    h = torch.linspace(-2, 6, 801, requires_grad=True)
    zeros = torch.zeros(801)
    loss = losses.preference_loss(h, zeros, zeros, zeros, beta, "ipo")
    assert h[loss.argmin()].item() == pytest.approx(1 / (2 * beta), abs=0.011)
    at_minimum = torch.tensor([2.0], requires_grad=True)
    losses.preference_loss(at_minimum, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta,
                           "ipo").backward()
    assert at_minimum.grad.item() == 0.0


def test_sequence_logps_sum_only_response_tokens():
    torch.manual_seed(0)
    model = Transformer.from_config(tiny_config(50)).eval()
    prompts, responses = [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10, 11]]
    with torch.no_grad():
        logps, counts = losses.sequence_logps(model, prompts, responses, pad_id=0, device="cpu")
        for row, (p, r) in enumerate(zip(prompts, responses)):
            log_probs = torch.log_softmax(model(torch.tensor([p + r]))[0], -1)
            expected = sum(log_probs[len(p) - 1 + j, token] for j, token in enumerate(r))
            assert logps[row].item() == pytest.approx(expected.item(), abs=1e-5)
    assert counts.tolist() == [2, 4]


def test_k3_kl_hand_values_and_unbiased_on_policy():
    # one response of two tokens and a masked position: r − 1 − log r per token, 0 where masked
    logps = torch.tensor([[math.log(0.5), math.log(0.2), 0.0]])
    ref_logps = torch.tensor([[math.log(0.25), math.log(0.4), 0.0]])
    expected = (0.5 - 1 - math.log(0.5)) + (2.0 - 1 - math.log(2.0))
    assert losses.k3_kl(logps, ref_logps).item() == pytest.approx(expected, abs=1e-6)
    # over every token y of a vocabulary, weighted by π(y): the exact expectation is KL(π‖π_ref),
    # and no term is negative (k1's terms log π − log π_ref are, where π_ref > π)
    torch.manual_seed(0)
    log_pi, log_ref = torch.log_softmax(torch.randn(20), 0), torch.log_softmax(torch.randn(20), 0)
    terms = losses.k3_kl(log_pi[:, None], log_ref[:, None])  # (20,) one token each
    assert (terms >= 0).all() and ((log_pi - log_ref) < 0).any()
    kl = (log_pi.exp() * (log_pi - log_ref)).sum()
    assert (log_pi.exp() * terms).sum().item() == pytest.approx(kl.item(), rel=1e-5)


def test_select_pairs_best_worst_ties_and_length_penalty(tmp_path):
    records = [
        {"id": "a", "prompt": [{"role": "user", "content": "x"}], "responses": ["r0", "r1", "r2"],
         "rewards": [0.5, 2.0, -1.0]},
        {"id": "b", "prompt": [{"role": "user", "content": "y"}], "responses": ["same", "same"],
         "rewards": [1.0, 0.0]},
        {"id": "c", "prompt": [{"role": "user", "content": "z"}], "responses": ["p", "q", "s"],
         "rewards": [1.0, 1.0, 1.0]},
        {"id": "d", "prompt": [{"role": "user", "content": "w"}], "responses": ["u", "v"],
         "rewards": [0.30, 0.25]},
        # the longer answer wins on raw reward, the shorter one after a length penalty of 0.01/char
        {"id": "e", "prompt": [{"role": "user", "content": "v"}],
         "responses": ["short", "a much longer answer"], "rewards": [1.0, 1.1]},
    ]
    write_jsonl(tmp_path / "rewards.jsonl", records)
    records = read_jsonl(tmp_path / "rewards.jsonl")
    pairs, dropped = losses.select_pairs(records, reward_tolerance=0.1)
    chosen_rejected = [(p["id"], p["chosen"], p["rejected"]) for p in pairs]
    assert chosen_rejected == [("a", "r1", "r2"), ("e", "a much longer answer", "short")]
    assert dropped == {"same_text": 1, "reward_tie": 2, "empty_response": 0}
    assert pairs[0]["margin"] == pytest.approx(3.0)
    pairs, _ = losses.select_pairs(records, length_penalty=0.01, reward_tolerance=0.0)
    pair_e = [(p["chosen"], p["rejected"]) for p in pairs if p["id"] == "e"]
    assert pair_e == [("short", "a much longer answer")]
    assert [p["id"] for p in pairs] == ["a", "d", "e"]


def test_pair_selection_and_missing_eos_penalty():
    # rewards 0.5, 2.0, −1.0, 1.5: best 1, worst 2; responses 0 and 1 for "random"; best vs the
    # first other for "max_random"
    record = {"id": "a", "prompt": [{"role": "user", "content": "x"}],
              "responses": ["r0", "r1", "r2", "r3"],
              "rewards": [0.5, 2.0, -1.0, 1.5],
              "finish_reasons": ["stop", "length", "stop", "stop"]}

    def chosen_rejected(selection, **kw):
        pairs, _ = losses.select_pairs([record], selection, **kw)
        return [(p["chosen"], p["rejected"], p["margin"]) for p in pairs]

    assert chosen_rejected("max_min") == [("r1", "r2", 3.0)]
    assert chosen_rejected("max_random") == [("r1", "r0", 1.5)]
    assert chosen_rejected("random") == [("r1", "r0", 1.5)]
    # r1 hit the length cap: a penalty of 1 makes it 1.0, below r3 (1.5) and above r0 (0.5)
    assert chosen_rejected("max_min", missing_eos_penalty=1.0) == [("r3", "r2", 2.5)]
    assert chosen_rejected("max_random", missing_eos_penalty=1.0) == [("r3", "r0", 1.0)]
    assert chosen_rejected("random", missing_eos_penalty=1.0) == [("r1", "r0", 0.5)]
    assert chosen_rejected("random", missing_eos_penalty=2.0) == [("r0", "r1", 0.5)]
    # random pairs take the higher reward as chosen whichever comes first; equal rewards are a tie
    swapped = {**record, "rewards": [2.0, 0.5, -1.0, 1.5]}
    pairs, _ = losses.select_pairs([swapped], "random")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("r0", "r1")]
    tied = {**record, "rewards": [1.0, 1.0, 0.0, 0.0]}
    dropped = {"same_text": 0, "reward_tie": 1, "empty_response": 0}
    assert losses.select_pairs([tied], "random") == ([], dropped)


# ----------------------------------------------------------------------------------------------
# The settings of a run: every spelling of a flag counts, the run's settings carry over, a resume
# may not change them. resolve_settings and start_iteration are what `dpo.py --iter t` runs first.


@pytest.fixture
def dpo_stage_env(monkeypatch):
    """For tests that call dpo.main in this process: the environment run_script gives a stage script
    (the PyTorch kernels on CPU; the Triton interpreter, far slower, is for the kernel tests)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def cli_error(argv, capsys):
    """Run dpo.main(argv) as `python dpo.py` does (under run_cli); expect a user error: exit status
    2 and exactly one `error:` line on stderr (progress bars aside), no traceback. Returns that
    line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: dpo.main([str(a) for a in argv]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def write_config(run, **settings):
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(settings))


def test_settings_every_spelling_beats_the_runs_config_and_abbreviations_are_rejected(tmp_path,
                                                                                       capsys):
    run = tmp_path / "run"
    write_config(run, sft="sft", rm="gold", prompts="p.jsonl", lr=1e-3, temperature=0.7,
                 length_penalty=0.01, label_smoothing=0.1, nll_coef=0.5, micro_batch_size=2)
    base = ["--iter", "2", "--run-dir", str(run)]
    for spelling in (["--lr=0.5"], ["--lr", "0.5"]):
        args, sources = dpo.resolve_settings(base + spelling)
        assert args.lr == 0.5 and sources["lr"] == "command line"
        assert (args.temperature, args.label_smoothing, args.nll_coef,
                args.micro_batch_size) == (0.7, 0.1, 0.5, 2)
        assert sources["temperature"] == sources["label_smoothing"] == "config.json"
        assert args.n == 8 and sources["n"] == "default"
    # a flag given with the parser's default value still beats the run's config (the old bug
    # compared values/strings)
    args, sources = dpo.resolve_settings(base + ["--temperature", "1.0", "--num-samples", "3"])
    assert (args.temperature, args.n) == (1.0, 3)
    assert sources["temperature"] == sources["n"] == "command line"
    # --run is an alias, not an abbreviation
    assert dpo.resolve_settings(["--iter", "2", "--run", str(run)])[0].lr == 1e-3
    # the iteration's own record (a rerun or resume of iteration 2) comes before config.json
    (run / "iter2").mkdir()
    (run / "iter2" / "settings.json").write_text(json.dumps({"lr": 2e-3}))
    args, sources = dpo.resolve_settings(base)
    assert (args.lr == 2e-3 and sources["lr"] == "iter2/settings.json"
            and sources["temperature"] == "config.json")
    for abbreviation in (["--temp", "0.3"], ["--length-pen", "0.02"], ["--label-smooth=0"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            dpo.resolve_settings(base + abbreviation)
        assert (exit_info.value.code == 2
                and f"unrecognized arguments: {abbreviation[0]}" in capsys.readouterr().err)


def test_every_flag_is_a_run_setting_or_deliberately_not_one():
    """A new flag must be sorted: saved with the run (RUN_SETTINGS) or listed here with the
    reason."""
    dests = set(vars(dpo.build_parser().parse_args([])))
    not_saved = {"pairs", "model", "out", "overwrite",           # offline mode
                 "iter", "run_dir",                               # which iteration, not how
                 "device", "parallel", "log_every", "report_to",  # where it runs, what it prints
                 "dry_run",                                       # print the memory plan and exit
                 "save_adapter"}                                  # online, LoRA always saves it
    assert dests - set(dpo.RUN_SETTINGS) == not_saved
    assert set(dpo.RUN_SETTINGS) <= dests and len(set(dpo.RUN_SETTINGS)) == len(dpo.RUN_SETTINGS)


def write_prompts(path, count, prefix="q"):
    records = [{"id": f"{prefix}{i}", "messages": [{"role": "user", "content": f"reverse {w}"}]}
               for i, w in enumerate(["abc", "bd", "fed", "ca", "eeb", "dc"][:count])]
    write_jsonl(path, records)


def test_a_resume_with_other_settings_stops_and_one_with_the_same_continues(tiny_model_dir,
                                                                            tmp_path, capsys,
                                                                            dpo_stage_env):
    """Killed mid-sampling with --n 2, rerun with --n 4: stop (the old code mixed 2- and 4-response
    records in one samples.jsonl); rerun with --n 2: continue from the finished chunk."""
    write_prompts(tmp_path / "prompts_1.jsonl", 4)
    run = tmp_path / "run"
    argv = ["--iter", "1", "--run-dir", str(run), "--sft", str(tiny_model_dir), "--rm", "gold",
            "--prompts", str(tmp_path / "prompts_{t}.jsonl"), "--max-new-tokens", "4",
            "--batch-size", "8", "--micro-batch-size", "8", "--epochs", "1", "--device", "cpu",
            "--chunk-size", "2", "--gen-batch-size", "4"]
    # What a run killed after its first sampling chunk leaves: its settings record and one
    # finished chunk.
    args, sources = dpo.resolve_settings(argv + ["--n", "2"])
    dpo.start_iteration(args, sources, init_distributed("cpu"))
    prompts = read_jsonl(tmp_path / "prompts_1.jsonl")

    def killed_after_one_chunk(chunk):
        if chunk[0]["id"] != "q0":
            raise KeyboardInterrupt
        return [{"id": r["id"], "prompt": r["messages"], "responses": ["first", "second"]}
                for r in chunk]
    with pytest.raises(KeyboardInterrupt):
        process_in_chunks(prompts, run / "iter1" / "samples.jsonl", killed_after_one_chunk,
                          init_distributed("cpu"), chunk_size=2)
    parts = sorted(p for p in (run / "iter1").rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in parts}

    error = cli_error(argv + ["--n", "4"], capsys)
    assert "n 2 → 4" in error and str(run / "iter1") in error
    assert sorted(p for p in (run / "iter1").rglob("*") if p.is_file()) == parts
    assert all(p.read_bytes() == content for p, content in before.items())  # nothing touched

    # The same settings continue. (The gold reward gives 0 to prompts that are not the built-in
    # task's, so every prompt is a reward tie and the iteration then stops: no pairs to train on.)
    error = cli_error(argv + ["--n", "2"], capsys)
    samples = read_jsonl(run / "iter1" / "samples.jsonl")
    assert [r["id"] for r in samples] == ["q0", "q1", "q2", "q3"]
    assert all(len(r["responses"]) == 2 for r in samples)
    assert samples[0]["responses"] == ["first", "second"]  # the finished chunk was kept, not redone
    assert f"no pairs to train on in {run / 'iter1' / 'pairs.jsonl'}" in error
    summary = json.loads((run / "iter1" / "summary.json").read_text())
    assert summary["pairs_dropped"] == {"same_text": 0, "reward_tie": 4, "empty_response": 0}


def test_online_prompts_over_max_prompt_length_are_skipped_not_sampled(tiny_model_dir, tmp_path,
                                                                       capsys, dpo_stage_env):
    """--max-prompt-length: the longer prompts are counted in one line and absent from samples,
    rewards and the summary; the setting is recorded with the iteration."""
    # 30, 29, 30 and 29 tokens with the character tokenizer
    write_prompts(tmp_path / "prompts.jsonl", 4)
    run = tmp_path / "run"
    argv = ["--iter", "1", "--run-dir", run, "--sft", tiny_model_dir, "--rm", "gold",
            "--prompts", tmp_path / "prompts.jsonl", "--iterations", "1", "--n", "2",
            "--max-new-tokens", "4", "--device", "cpu", "--max-prompt-length", "29"]
    # The gold reward gives 0 to prompts that are not the built-in task's: every prompt is a tie,
    # and the iteration stops after pairing with nothing to train on.
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli(lambda: dpo.main([str(a) for a in argv]))
    printed = capsys.readouterr()
    assert f"no pairs to train on in {run / 'iter1' / 'pairs.jsonl'}" in printed.err
    assert (f"skipped 2 of 4 prompts in {tmp_path / 'prompts.jsonl'} longer than "
            f"--max-prompt-length 29 tokens" in printed.out)
    assert [r["id"] for r in read_jsonl(run / "iter1" / "samples.jsonl")] == ["q1", "q3"]
    assert [r["id"] for r in read_jsonl(run / "iter1" / "rewards.jsonl")] == ["q1", "q3"]
    assert json.loads((run / "iter1" / "summary.json").read_text())["prompts"] == 2
    assert json.loads((run / "iter1" / "settings.json").read_text())["max_prompt_length"] == 29


# ----------------------------------------------------------------------------------------------
# Errors a user can act on: exit status 2, one line naming the file or folder, no traceback.


def test_user_errors_name_what_to_fix(tiny_model_dir, tmp_path, capsys, dpo_stage_env):
    write_prompts(tmp_path / "prompts.jsonl", 2)

    def online(sft, rm="gold"):
        return ["--iter", "1", "--run-dir", tmp_path / "run", "--sft", sft, "--rm", rm,
                "--prompts", tmp_path / "prompts.jsonl", "--device", "cpu"]

    error = cli_error(online(tmp_path / "no_sft"), capsys)
    assert (f"--sft {tmp_path / 'no_sft'}: no such model folder" in error
            and "iteration 0" not in error)
    (tmp_path / "empty_folder").mkdir()
    error = cli_error(online(tmp_path / "empty_folder"), capsys)
    assert f"--sft {tmp_path / 'empty_folder'}: holds no model" in error
    error = cli_error(online(tiny_model_dir, tmp_path / "no_rm"), capsys)
    assert f"--rm {tmp_path / 'no_rm'}: no such model folder" in error
    # nothing recorded for a run that could not start
    assert not (tmp_path / "run" / "config.json").exists()
    # iteration 2 before iteration 1 has a policy: the settings come from config.json
    write_config(tmp_path / "run2", sft=str(tiny_model_dir), rm="gold",
                 prompts=str(tmp_path / "prompts.jsonl"))
    error = cli_error(["--iter", "2", "--run-dir", tmp_path / "run2", "--device", "cpu"], capsys)
    assert str(tmp_path / "run2" / "iter1" / "policy") in error and "run iteration 1 first" in error
    # offline: a missing model folder, an empty pairs file, pairs that all vanish at --max-length
    write_pairs(tmp_path / "pairs.jsonl", 4)
    (tmp_path / "empty.jsonl").write_text("")
    offline = ["--out", tmp_path / "out", "--device", "cpu"]
    error = cli_error(offline + ["--pairs", tmp_path / "pairs.jsonl",
                                 "--model", tmp_path / "no_model"], capsys)
    assert f"--model {tmp_path / 'no_model'}: no such model folder" in error
    error = cli_error(offline + ["--pairs", tmp_path / "empty.jsonl", "--model", tiny_model_dir],
                      capsys)
    assert str(tmp_path / "empty.jsonl") in error
    error = cli_error(offline + ["--pairs", tmp_path / "pairs.jsonl", "--model", tiny_model_dir,
                                 "--max-length", "5"], capsys)
    assert str(tmp_path / "pairs.jsonl") in error and "--max-length 5" in error
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_dpo_script_reports_user_errors_in_one_line(tmp_path):
    """The script itself runs main under run_cli: status 2, one line, no traceback."""
    write_pairs(tmp_path / "pairs.jsonl", 2)
    command = [sys.executable, "dpo.py", "--pairs", str(tmp_path / "pairs.jsonl"),
               "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--device", "cpu"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --model {tmp_path / 'nope'}: no such model folder"


# ----------------------------------------------------------------------------------------------
# End to end


@pytest.mark.parametrize("parallel", ["fsdp"])
def test_offline_dpo_two_ranks_match_one_and_move_toward_chosen(parallel, tiny_model_dir, tmp_path):
    write_pairs(tmp_path / "pairs.jsonl", 16)
    common_args = ["dpo.py", "--pairs", str(tmp_path / "pairs.jsonl"),
                   "--model", str(tiny_model_dir), "--beta", "0.5", "--lr", "1e-3",
                   "--batch-size", "8", "--micro-batch-size", "2", "--epochs", "2",
                   "--device", "cpu", "--parallel", parallel, "--log-every", "1"]
    run_in_process(common_args[1:] + ["--out", str(tmp_path / "one")])
    run_script(common_args + ["--out", str(tmp_path / "two")], nproc=2)
    from safetensors.torch import load_file
    one = load_file(tmp_path / "one" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model.safetensors")
    for name in one:
        assert (one[name] - two[name]).abs().max().item() <= 1e-5, name
    metrics = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    assert len(metrics) == 4
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 0: policy = reference
    assert (metrics[-1]["reward_margin"] > metrics[0]["reward_margin"]
            and metrics[-1]["loss"] < metrics[0]["loss"])
    assert {"rewards_chosen", "rewards_rejected", "reward_accuracy", "log_ratio", "grad_norm", "lr",
            "tokens_per_s"} <= set(metrics[0])
    assert len(read_jsonl(tmp_path / "one" / "ref_logps.jsonl")) == 16


def run_in_process(argv):
    """dpo.main(argv) in this process, as a stage script runs (see dpo_stage_env).
    Returns its stdout."""
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as out:
        patch.delenv("TRITON_INTERPRET", raising=False)
        dpo.main(argv)
    return out.getvalue()


@pytest.fixture(scope="module")
def dpo_online_run(tiny_model_dir, tmp_path_factory):
    """Two online iterations on a random reward model, shared by the tests below: iteration 1 with
    cDPO + RPO flags, iteration 2 with no flags but --device (everything read back)."""
    tmp = tmp_path_factory.mktemp("online")
    rm = Transformer.from_pretrained(tiny_model_dir, head="score")
    rm.save_pretrained(tmp / "rm", tokenizer=load_tokenizer(tiny_model_dir))
    for t in (1, 2):
        write_prompts(tmp / f"prompts_{t}.jsonl", 4, prefix=f"t{t}-")
    run = tmp / "run"
    first = ["--iter", "1", "--run-dir", str(run), "--sft", str(tiny_model_dir),
             "--rm", str(tmp / "rm"), "--prompts", str(tmp / "prompts_{t}.jsonl"),
             "--n", "4", "--max-new-tokens", "8", "--batch-size", "4", "--micro-batch-size", "2",
             "--lr", "1e-3", "--epochs", "1", "--device", "cpu", "--chunk-size", "2",
             "--label-smoothing", "0.1", "--nll-coef", "0.5", "--pair-selection", "max_random",
             "--missing-eos-penalty", "0.5"]
    outputs = [run_in_process(first),
               run_in_process(["--iter", "2", "--run-dir", str(run), "--device", "cpu"])]
    return run, outputs


def test_online_iterations_run_and_resume(dpo_online_run, capsys, dpo_stage_env):
    """Every sub-step's file appears, iteration 2 starts from iteration 1's policy and trains on
    both iterations' pairs, and a rerun skips what is finished."""
    run, _ = dpo_online_run
    for t in (1, 2):
        for name in ("settings.json", "samples.jsonl", "rewards.jsonl", "pairs.jsonl",
                     "ref_logps.jsonl", "summary.json", "policy/model.safetensors"):
            assert (run / f"iter{t}" / name).exists(), (t, name)
    summary = json.loads((run / "iter2" / "summary.json").read_text())
    assert summary["prompts"] == 4
    assert summary["pairs_kept"] + sum(summary["pairs_dropped"].values()) == 4
    # "reverse abc" is no built-in task prompt: no gold to compare with
    assert "reward_vs_gold" not in summary
    # iteration 1's pair selection and missing-EOS penalty, read back by iteration 2, decide
    # its pairs
    rewards = read_jsonl(run / "iter2" / "rewards.jsonl")
    cut = sum(r == "length" for rec in rewards for r in rec["finish_reasons"])
    assert summary["missing_eos"] == cut > 0
    settings = json.loads((run / "iter2" / "settings.json").read_text())
    assert (settings["pair_selection"], settings["missing_eos_penalty"]) == ("max_random", 0.5)
    expected, _ = losses.select_pairs(rewards, "max_random", missing_eos_penalty=0.5,
                                      source="iter2")
    assert read_jsonl(run / "iter2" / "pairs.jsonl") == expected
    samples = read_jsonl(run / "iter2" / "samples.jsonl")
    assert [r["id"] for r in samples] == [f"t2-{i}" for i in range(4)]
    assert all(len(r["responses"]) == 4 for r in samples)
    steps2 = len(read_jsonl(run / "iter2" / "policy" / "metrics.jsonl"))
    pairs_total = (len(read_jsonl(run / "iter1" / "pairs.jsonl"))
                   + len(read_jsonl(run / "iter2" / "pairs.jsonl")))
    # --history all: iteration 2 trains on both iterations' pairs
    assert steps2 == math.ceil(pairs_total / 4)
    before = (run / "iter2" / "policy" / "model.safetensors").stat().st_mtime_ns
    dpo.main(["--iter", "2", "--run-dir", str(run), "--device", "cpu"])
    assert "iteration 2 complete" in capsys.readouterr().out
    assert (run / "iter2" / "policy" / "model.safetensors").stat().st_mtime_ns == before


def test_online_cdpo_and_rpo_settings_survive_to_iteration_2(dpo_online_run, tiny_model_dir):
    """The old code forgot --label-smoothing and --nll-coef at iteration 2 (cDPO/RPO became DPO)."""
    run, (_, out2) = dpo_online_run
    record = json.loads((run / "iter2" / "settings.json").read_text())
    settings = (record["label_smoothing"], record["nll_coef"], record["lr"], record["n"])
    assert settings == (0.1, 0.5, 1e-3, 4)
    assert json.loads((run / "iter1" / "settings.json").read_text()) == record
    assert any(line.split()[:3] == ["label_smoothing", "0.1", "config.json"]
               for line in out2.splitlines())
    assert "cDPO ε 0.1, RPO α 0.5" in out2
    # RPO really is in the loss: at step 1 of iteration 1 (policy = reference, h = 0) cDPO's loss is
    # log 2 and RPO adds α × the mean per-token NLL of the chosen responses, read from log π_0.
    pairs = read_jsonl(run / "iter1" / "pairs.jsonl")
    ref = read_jsonl(run / "iter1" / "ref_logps.jsonl")
    assert 0 < len(pairs) <= 4  # one batch: step 1 sees every pair
    nll = [-r["ref_chosen_logp"] / len(p["chosen_ids"]) for p, r in zip(pairs, ref)]
    step1 = read_jsonl(run / "iter1" / "policy" / "metrics.jsonl")[0]
    assert step1["loss"] == pytest.approx(math.log(2) + 0.5 * sum(nll) / len(nll), abs=1e-4)


def test_online_pairs_score_exactly_the_sampled_tokens(dpo_online_run, tiny_model_dir):
    """A response cut at --max-new-tokens is scored without a stop token it never had, and every
    response as the token ids it was sampled as, not its decoded text re-encoded: each pair's ids
    are its samples' response_ids, and ref_logps.jsonl is log π_0 of exactly those tokens as
    transformers computes it."""
    from transformers import AutoModelForCausalLM
    run, _ = dpo_online_run
    tokenizer = load_tokenizer(tiny_model_dir)
    stops = set(stop_token_ids(tokenizer))
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    cut = 0
    for t in (1, 2):
        samples = {r["id"]: r for r in read_jsonl(run / f"iter{t}" / "samples.jsonl")}
        pairs = read_jsonl(run / f"iter{t}" / "pairs.jsonl")
        ref = read_jsonl(run / f"iter{t}" / "ref_logps.jsonl")
        assert pairs and len(pairs) == len(ref)
        for pair, logps in zip(pairs, ref):
            record = samples[pair["id"]]
            prompt = encode_prompt(tokenizer, pair["prompt"])
            for side in ("chosen", "rejected"):
                i = record["responses"].index(pair[side])
                ids = pair[f"{side}_ids"]
                assert ids == record["response_ids"][i] and len(ids) == record["num_tokens"][i]
                assert (ids[-1] in stops) == (record["finish_reasons"][i] == "stop")
                cut += record["finish_reasons"][i] == "length"
                with torch.no_grad():
                    logits = hf(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float()
                expected = logits.log_softmax(-1).gather(1, torch.tensor(ids)[:, None]).sum().item()
                recorded = logps[f"ref_{side}_logp"]
                assert recorded == pytest.approx(expected, abs=1e-4), (t, side, ids)
    assert cut > 0  # the fixture's --max-new-tokens 8 cuts some paired responses


def test_response_ids_are_the_sampled_ones_or_the_text_with_a_stop_only_where_it_stopped(
        tiny_model_dir):
    """tokens.response_ids and tokens.tokenize_pairs: a record's ids are used as they are (here ids
    that re-encoding the text would never give); without ids a text gets the end-of-turn token
    unless it was cut; a human pair (no ids) is a complete answer."""
    from tokens import end_of_turn_ids, response_ids, tokenize_pairs
    tokenizer = load_tokenizer(tiny_model_dir)
    eot = end_of_turn_ids(tokenizer)
    prompt = [{"role": "user", "content": "reverse 1 2"}]
    odd = encode_response(tokenizer, "2 1", [])[::-1]  # tokens the text does not re-encode to
    record = {"id": "a", "prompt": prompt, "responses": ["2 1", "2"],
              "finish_reasons": ["stop", "length"]}
    assert response_ids(tokenizer, record) == [encode_response(tokenizer, "2 1"),
                                               encode_response(tokenizer, "2", [])]
    assert response_ids(tokenizer, {**record, "response_ids": [odd, [5]]}) == [odd, [5]]
    no_reasons = {k: v for k, v in record.items() if k != "finish_reasons"}
    assert [ids[-len(eot):] for ids in response_ids(tokenizer, no_reasons)] == [eot, eot]
    scored = {**record, "response_ids": [odd, [5]], "rewards": [1.0, 0.0]}
    (pair,), _ = losses.select_pairs([scored])
    assert (pair["chosen_ids"], pair["rejected_ids"]) == (odd, [5])
    human = {"prompt": prompt, "chosen": "2 1", "rejected": "2"}
    _, examples = tokenize_pairs(tokenizer, [pair, human], max_length=64)
    assert examples[0] == (encode_prompt(tokenizer, prompt), odd, [5])
    assert examples[1][1:] == (encode_response(tokenizer, "2 1"), encode_response(tokenizer, "2"))
    # another sampler's empty text cut at once has no token to score: the prompt is dropped
    # and counted
    empty = {**record, "responses": ["2 1", ""], "rewards": [1.0, 0.0]}
    selected = losses.select_pairs([{**empty, "response_ids": response_ids(tokenizer, empty)}])
    assert selected == ([], {"same_text": 0, "reward_tie": 0, "empty_response": 1})
    # ids of another tokenizer's vocabulary: one line naming the pair, not an IndexError in
    # the forward
    with pytest.raises(InputError, match="not in the tokenizer's vocabulary"):
        tokenize_pairs(tokenizer, [{**pair, "rejected_ids": [len(tokenizer)]}], max_length=64)


def test_online_finished_iteration_rerun_with_a_new_flag_stops(dpo_online_run, capsys,
                                                               dpo_stage_env):
    """The old code printed "iteration 2 complete" and rewrote config.json with settings
    never used."""
    run, _ = dpo_online_run
    records = [run / "config.json", run / "iter2" / "settings.json",
               run / "iter2" / "policy" / "model.safetensors"]
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in records]
    error = cli_error(["--iter", "2", "--run-dir", run, "--device", "cpu", "--lr", "0.5"], capsys)
    assert "lr 0.001 → 0.5" in error and str(run / "iter2" / "settings.json") in error
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in records] == before


def test_online_iterations_on_builtin_task_with_gold_reward(task_dir, tmp_path, dpo_stage_env):
    """run.sh's oracle control: two online iterations on the built-in task scored by the gold
    reward. Every pair's chosen response has the higher gold score, and step 1 of iteration 1
    (policy = reference) has the DPO loss log 2."""
    _, run = run_builtin_online(task_dir, tmp_path)
    for t in (1, 2):
        rewards = read_jsonl(run / f"iter{t}" / "rewards.jsonl")
        assert len(rewards) == 4
        assert all(r["rewards"] == [score(r["prompt"], y) for y in r["responses"]]
                   for r in rewards)
        pairs = read_jsonl(run / f"iter{t}" / "pairs.jsonl")
        assert pairs and all(score(p["prompt"], p["chosen"]) > score(p["prompt"], p["rejected"])
                             for p in pairs)
    step1 = read_jsonl(run / "iter1" / "policy" / "metrics.jsonl")[0]
    assert step1["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert step1["rewards_chosen"] == pytest.approx(0, abs=1e-5)
    assert step1["log_ratio"] == pytest.approx(0, abs=1e-5)
    assert (run / "iter2" / "policy" / "model.safetensors").exists()


def test_per_token_nll_rounds_as_before_for_any_rpo_weight():
    """RPO's term, α · per-token NLL, is computed as −(α · log-prob sum) / tokens: bit for bit the
    expression training used before it moved to losses.py, for α that is no power of two too."""
    torch.manual_seed(0)
    logps, tokens = torch.randn(4096) * 50, torch.randint(1, 300, (4096,))
    per_pair = torch.randn(4096)
    for alpha in (0.3, 0.01, 1.0):
        assert torch.equal(per_pair + losses.per_token_nll(logps, tokens, weight=alpha),
                           per_pair - alpha * logps / tokens)
    assert torch.equal(losses.per_token_nll(logps, tokens), -logps / tokens)


# ----------------------------------------------------------------------------------------------
# Verifier rewards: --rm FILE.py:function in TRL's reward-function convention

VERIFIER = '''import json, math
LOG = {log!r}

def reward(prompts, completions, answer, level, **kwargs):
    """TRL's convention: conversational completions, the prompt records' columns by name."""
    with open(LOG, "a") as f:
        f.write(json.dumps(dict(prompts=prompts, completions=completions, answer=answer,
                                level=level, extra=sorted(kwargs))) + "\\n")
    return [float(c[0]["content"].count(a[0])) + 0.25 * len(c[0]["content"]) + 0.001 * l
            for c, a, l in zip(completions, answer, level)]

def shorter(completions, **kwargs):  # a second verifier, for --gold
    return [-float(len(c[0]["content"])) for c in completions]

def raises_on_q2(prompts, completions, answer, **kwargs):
    if "bac" in answer:  # q2's
        raise ValueError("cannot read this answer")
    return [1.0] * len(completions)

def one_short(completions, **kwargs):
    return [0.0] * (len(completions) - 1)

def not_a_number(completions, **kwargs):
    return [math.nan] + [0.0] * (len(completions) - 1)

def only_on_a_batch(completions, **kwargs):
    if len(completions) > 3:
        raise RuntimeError("batch too big")
    return [0.0] * len(completions)
'''


def write_verifier_task(tmp_path):
    """Four prompts with an `answer` and a `level` column, and the verifier file."""
    words = ["abc", "bca", "cab", "dab"]
    write_jsonl(tmp_path / "prompts.jsonl",
                [{"id": f"q{i}", "messages": [{"role": "user", "content": f"reverse {w}"}],
                  "answer": w[::-1], "level": i} for i, w in enumerate(words)])
    path = tmp_path / "verify.py"
    path.write_text(VERIFIER.format(log=str(tmp_path / "calls.jsonl")))
    return path


def test_verifier_in_trl_convention_scores_an_online_iteration(tiny_model_dir, tmp_path,
                                                                dpo_stage_env):
    """--rm verify.py:reward scores iteration 1: the function gets TRL's arguments (prompts,
    conversational completions, completion_ids, each prompt column as a list aligned with the
    completions), and rewards.jsonl holds exactly the values it returns, which then make the
    pairs as a reward model's would."""
    import importlib.util
    verifier = write_verifier_task(tmp_path)
    run = tmp_path / "run"
    dpo.main([str(a) for a in ["--iter", "1", "--run-dir", run, "--sft", tiny_model_dir,
                               "--rm", f"{verifier}:reward", "--prompts",
                               tmp_path / "prompts.jsonl", "--iterations", "1", "--n", "3",
                               "--max-new-tokens", "6", "--device", "cpu", "--max-steps", "1"]])
    samples = read_jsonl(run / "iter1" / "samples.jsonl")
    rewards = read_jsonl(run / "iter1" / "rewards.jsonl")
    assert [r["columns"] for r in samples] == [{"answer": w[::-1], "level": i}
                                               for i, w in enumerate(["abc", "bca", "cab", "dab"])]
    # the values rewards.jsonl holds are the function's own, recomputed here from the samples
    spec = importlib.util.spec_from_file_location("verify_again", verifier)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for record in rewards:
        expected = [float(text.count(record["columns"]["answer"][0])) + 0.25 * len(text)
                    + 0.001 * record["columns"]["level"] for text in record["responses"]]
        assert record["rewards"] == expected
    # what the function was called with: TRL's arguments, aligned response by response
    calls = read_jsonl(tmp_path / "calls.jsonl")
    flat = [(r["prompt"], text, r["columns"]["answer"], r["columns"]["level"])
            for r in samples for text in r["responses"]]
    called = [(p, c, a, level) for call in calls for p, c, a, level
              in zip(call["prompts"], call["completions"], call["answer"], call["level"])]
    assert called == [(p, [{"role": "assistant", "content": text}], a, level)
                      for p, text, a, level in flat]
    assert all(call["extra"] == ["completion_ids", "id", "log_extra", "log_metric",
                                 "trainer_state"]
               for call in calls)
    # the pairs: best against worst by the verifier's rewards, as for a reward model
    by_id = {r["id"]: r for r in rewards}
    for pair in read_jsonl(run / "iter1" / "pairs.jsonl"):
        record = by_id[pair["id"]]
        best = record["rewards"].index(max(record["rewards"]))
        assert pair["chosen"] == record["responses"][best]
    settings = json.loads((run / "iter1" / "settings.json").read_text())
    assert settings["rm"] == f"{verifier}:reward"


def test_gold_verifier_checks_the_reward_on_the_policys_samples(tiny_model_dir, tmp_path,
                                                                dpo_stage_env, capsys):
    """--gold VERIFIER: summary.json's reward_vs_gold compares the reward (--rm) with that
    verifier's values on the same samples, recomputed here with data.task.reward_vs_gold; the
    next iteration reads --gold back from config.json, and offline mode refuses it."""
    from data.task import reward_vs_gold
    verifier = write_verifier_task(tmp_path)
    run = tmp_path / "run"
    argv = ["--run-dir", run, "--sft", tiny_model_dir, "--rm", f"{verifier}:reward",
            "--gold", f"{verifier}:shorter", "--prompts", tmp_path / "prompts.jsonl",
            "--iterations", "1", "--n", "3", "--max-new-tokens", "6", "--device", "cpu",
            "--max-steps", "1"]
    dpo.main([str(a) for a in ["--iter", "1"] + argv])
    rewards = read_jsonl(run / "iter1" / "rewards.jsonl")
    gold = [{**r, "gold": [-float(len(text)) for text in r["responses"]]} for r in rewards]
    summary = json.loads((run / "iter1" / "summary.json").read_text())
    stats = summary["reward_vs_gold"]
    assert stats == reward_vs_gold(gold) and stats["pairs"] > 0
    assert summary["gold"] == f"{verifier}:shorter"
    assert "reward vs gold on π_0's samples" in capsys.readouterr().out
    # the finished iteration again with another --gold: its summary says the new one, and is it
    policy = (run / "iter1" / "policy" / "model.safetensors").stat().st_mtime_ns
    dpo.main(["--iter", "1", "--run-dir", str(run), "--gold", f"{verifier}:reward"])
    summary = json.loads((run / "iter1" / "summary.json").read_text())
    assert summary["gold"] == f"{verifier}:reward"
    assert summary["reward_vs_gold"]["accuracy"] == 1.0  # the reward against itself
    assert (run / "iter1" / "policy" / "model.safetensors").stat().st_mtime_ns == policy
    _, sources = dpo.resolve_settings(["--iter", "2", "--run-dir", str(run)])
    assert sources["gold"] == "config.json"
    with pytest.raises(SystemExit) as exit_info:
        dpo.main(["--pairs", "p.jsonl", "--model", str(tiny_model_dir), "--out",
                  str(tmp_path / "o"), "--gold", f"{verifier}:shorter"])
    assert exit_info.value.code == 2
    assert "error: --gold is for online mode" in capsys.readouterr().err


@pytest.mark.parametrize("name, message", [
    ("raises_on_q2", "raised on record 'q2': ValueError: cannot read this answer"),
    ("one_short", "returned 11 values for 12 completions"),
    ("not_a_number", "returned nan for a response of record 'q0'"),
    ("missing", "has no function missing"),
    ("only_on_a_batch", "raised on the batch of records 'q0' to 'q3', though on no record alone: "
                        "RuntimeError: batch too big"),
])
def test_a_failing_verifier_stops_with_the_record_and_nothing_half_written(
        name, message, tiny_model_dir, tmp_path, capsys, dpo_stage_env):
    verifier = write_verifier_task(tmp_path)
    run = tmp_path / "run"
    argv = ["--iter", "1", "--run-dir", run, "--sft", tiny_model_dir,
            "--rm", f"{verifier}:{name}", "--prompts", tmp_path / "prompts.jsonl",
            "--iterations", "1", "--n", "3", "--max-new-tokens", "4", "--device", "cpu"]
    if name == "missing":  # refused at parse time, as argparse refuses a flag: nothing written
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda: dpo.main([str(a) for a in argv]))
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and "error: argument --rm: verifier" in error, error
        assert not run.exists()
    else:
        error = cli_error(argv, capsys)
    assert message in error, error
    assert not (run / "iter1" / "rewards.jsonl").exists()


def test_verifier_values_arguments_and_imports_as_in_trl(tmp_path):
    """What TRL accepts, accepted here: numpy arrays, tensors, generators, None (0.0, as TRL's
    OnlineDPOTrainer's nansum), a `trainer_state` parameter; each completion gets its own copy of
    the prompt; a FILE.py imports a file beside it; a prompt field named like one of the
    verifier's own arguments stops with its name instead of replacing the argument."""
    import numpy as np
    from rewards import load_reward_function, verifier_rewards
    from runs import InputError
    (tmp_path / "helper_words.py").write_text("def size(text):\n    return len(text)\n")
    (tmp_path / "kinds.py").write_text(
        "import numpy as np, torch\n"
        "from helper_words import size\n"
        "def as_numpy(completions, **kw):\n"
        "    return np.array([size(c[0]['content']) for c in completions], dtype=np.float32)\n"
        "def as_tensor(completions, **kw):\n"
        "    return torch.tensor([float(size(c[0]['content'])) for c in completions])\n"
        "def as_generator(completions, **kw):\n"
        "    return (None if size(c[0]['content']) == 1 else True for c in completions)\n"
        "def with_state(prompts, completions, trainer_state, **kw):\n"
        "    assert trainer_state is None\n"
        "    kw['log_metric']('x', 1.0)\n"
        "    for p in prompts:\n"
        "        p.append({'role': 'assistant', 'content': 'seen'})\n"
        "    return [float(len(p)) for p in prompts]\n")
    records = [{"id": "a", "prompt": [{"role": "user", "content": "q"}], "responses": ["xy", "z"],
                "response_ids": [[1, 2], [3]]}]
    values = {name: verifier_rewards(load_reward_function(f"{tmp_path / 'kinds.py'}:{name}"),
                                     name, records)
              for name in ("as_numpy", "as_tensor", "as_generator", "with_state")}
    assert values == {"as_numpy": [[2.0, 1.0]], "as_tensor": [[2.0, 1.0]],
                      "as_generator": [[1.0, 0.0]], "with_state": [[2.0, 2.0]]}
    assert records[0]["prompt"] == [{"role": "user", "content": "q"}]  # the record's untouched
    assert all(type(v) is float for rows in values.values() for row in rows for v in row)
    gold = load_reward_function("gold")
    for name in ("completions", "prompts", "completion_ids"):
        with pytest.raises(InputError, match=f"the prompts' field '{name}' would replace"):
            verifier_rewards(gold, "gold", records, columns=[{name: [1]}])
    with pytest.raises(InputError, match="returned 10{400} for a response of record 'a'"):
        verifier_rewards(lambda completions, **kw: [10 ** 400, 0], "big", records)
    assert verifier_rewards(lambda **kw: [np.float64(0.5), 0], "np", records) == [[0.5, 0.0]]
    # the record's id is a column, as TRL passes every dataset column; an async verifier is awaited
    assert verifier_rewards(lambda completions, id, **kw: [float(i == "a") for i in id], "id",
                            records) == [[1.0, 1.0]]

    async def later(completions, **kw):
        return [float(len(c[0]["content"])) for c in completions]
    assert verifier_rewards(later, "async", records) == [[2.0, 1.0]]
