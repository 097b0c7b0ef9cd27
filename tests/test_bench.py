"""Tests of bench.py at tiny shapes: every row runs and prints both sides, and a row whose two sides
disagree fails the command."""
import importlib.util

import pytest

import bench
import rlhf_kernels.logprob
import losses

HAS_TRL = importlib.util.find_spec("trl") is not None


@pytest.fixture
def bench_in_process(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the PyTorch paths, at full speed


@pytest.mark.usefixtures("bench_in_process")
def test_bench_tiny_runs_every_row_and_prints_both_sides(capsys):
    bench.main(["--tiny"])
    out = capsys.readouterr().out
    assert "greedy answers equal: 6/6" in out
    for line in ("greedy tokens/s", "sampled tokens/s", "seconds fwd + bwd",
                 "peak memory above the inputs"):
        assert line in out and "ours" in out.split(line)[1].splitlines()[0]
    assert out.count("max |ours - naive|") == 3 and "tok/s" in out.split("== sft step")[1]
    if HAS_TRL:  # the DPO rows: losses of each step side by side, both variants of the reference
        # reference precomputed or run each step, activation checkpointing on or off
        assert out.count("losses, step by step: 0.693147 / 0.693147") == 4
        assert out.count("seconds per step (median)") == 4
        assert out.count("activation checkpointing on on both sides") == 2
    else:
        assert "dpo: skipped, TRL is not installed (pip install trl)" in out


@pytest.mark.usefixtures("bench_in_process")
def test_bench_fails_when_the_two_sides_disagree(monkeypatch, capsys):
    real_generate, real_logprobs = bench.hf_generate, rlhf_kernels.logprob.token_logprobs
    # transformers' greedy answers one token longer; the kernel's log-probs off by 1e-2
    monkeypatch.setattr(bench, "hf_generate",
                        lambda *a, **k: [[s + [0] for s in samples]
                                         for samples in real_generate(*a, **k)])
    monkeypatch.setattr(rlhf_kernels.logprob, "token_logprobs",
                        lambda *a, **k: real_logprobs(*a, **k) + 1e-2)
    with pytest.raises(SystemExit, match="disagree in: generate, logprob"):
        bench.main(["--tiny", "--rows", "generate,logprob"])
    out = capsys.readouterr().out
    assert ("FAILED: generate: 6 greedy answers differ" in out
            and "FAILED: logprob: log-probs differ" in out)


@pytest.mark.skipif(not HAS_TRL, reason="TRL is not installed")
@pytest.mark.usefixtures("bench_in_process")
def test_bench_dpo_fails_when_the_losses_disagree(monkeypatch, capsys):
    import dpo
    real_loss = losses.preference_loss
    monkeypatch.setattr(dpo, "preference_loss", lambda *a, **k: real_loss(*a, **k) * 1.01)
    with pytest.raises(SystemExit, match="disagree in: dpo"):
        bench.main(["--tiny", "--rows", "dpo", "--steps", "1"])
    assert "FAILED: dpo: losses differ from TRL's" in capsys.readouterr().out


def test_bench_refuses_bad_flags(capsys):
    for argv, message in ((["--rows", "generate,speed"], "unknown speed"),
                          (["--tiny", "--model", "x"], "--tiny builds its own model"),
                          (["--gen-rows", "2", "--n", "4"], "must hold the --n 4 samples"),
                          (["--beta", "-0.1"], "--beta")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert message in capsys.readouterr().err


@pytest.mark.skipif(not HAS_TRL, reason="TRL is not installed")
@pytest.mark.usefixtures("bench_in_process")
def test_bench_dpo_trace_shows_what_checkpointing_keeps(capsys):
    """--trace prints our step's tensors at its peak by kind; with activation checkpointing (on
    both sides, TRL's default) the activations kept are fewer than without it."""
    bench.main(["--tiny", "--rows", "dpo", "--steps", "1", "--trace"])
    out = capsys.readouterr().out
    activations = {}
    for part in out.split("\n== dpo step")[1:]:
        setting = "on" if "activation checkpointing on" in part.splitlines()[0] else "off"
        assert "Optstate" in part and "Total" in part
        kept = float(part.split("Activation")[1].split()[0])
        activations.setdefault(setting, []).append(kept)
    assert len(activations["on"]) == len(activations["off"]) == 2
    assert max(activations["on"]) < min(activations["off"])
