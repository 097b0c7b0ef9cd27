"""A new user's first hour: a bad flag stops a stage at once, naming the flag, before any work or
any file; Ctrl-C is one line saying how to resume; a record missing a field shows what one looks
like."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import dpo
import eval_runs
import generate
import osp
import sft
import train_rm
from runs import fraction, positive_int, run_cli, step_limit, write_jsonl
from data.schema import EXAMPLES, load_records, validate_record
from tests.helpers import ROOT, check_one_line_error

# ----------------------------------------------------------------------------------------------
# Numeric flags are checked by argparse: exit status 2, `error: argument --flag: must be ...`.

# Each stage's required flags; the paths do not exist, so any file the stage wrote would show
# up in tmp_path.
STAGES = {
    "sft": (sft.main, ["--model", "m", "--data", "d.jsonl", "--out", "out"]),
    "rm train": (train_rm.main, ["train", "--model", "m", "--pairs", "p.jsonl", "--out", "out"]),
    "rm score": (train_rm.main,
                 ["score", "--rm", "m", "--samples", "s.jsonl", "--out", "out.jsonl"]),
    "rm eval": (train_rm.main, ["eval", "--rm", "m", "--pairs", "p.jsonl"]),
    "dpo offline": (dpo.main, ["--pairs", "p.jsonl", "--model", "m", "--out", "out"]),
    "dpo online": (dpo.main, ["--iter", "1", "--run-dir", "out", "--sft", "m", "--rm", "gold",
                              "--prompts", "p.jsonl"]),
    "osp": (osp.main, ["--model", "m", "--prompts", "p.jsonl", "--out", "out"]),
    "generate": (generate.main, ["--model", "m", "--prompts", "p.jsonl", "--out", "out.jsonl"]),
    "evaluate": (eval_runs.main, ["--run", "out", "--summary", "summary.md"]),
    "evaluate one run": (eval_runs.main, ["--run", "out"]),
}

BAD_FLAGS = [  # (stage, flag, value, what the error says)
    ("sft", "--lr", "-1", "must be > 0, got -1"),
    ("sft", "--lr", "nan", "must be > 0"),
    ("sft", "--lr", "fast", "expected a number, got 'fast'"),
    ("sft", "--epochs", "0", "must be > 0"),
    ("sft", "--batch-size", "0", "must be ≥ 1"),
    ("sft", "--batch-size", "2.5", "expected an integer"),
    ("sft", "--micro-batch-size", "0", "must be ≥ 1"),
    ("sft", "--block-size", "-8", "must be ≥ 1"),
    ("sft", "--max-steps", "0", "must be ≥ 1, or -1 for no limit"),
    ("sft", "--warmup-ratio", "1.5", "must be in [0, 1]"),
    ("sft", "--min-lr-ratio", "-0.1", "must be in [0, 1]"),
    ("sft", "--weight-decay", "-0.1", "must be ≥ 0"),
    ("sft", "--grad-clip", "-1", "must be ≥ 0"),
    ("sft", "--log-every", "0", "must be ≥ 1"),
    ("sft", "--lora-rank", "-4", "must be ≥ 0"),
    ("sft", "--lora-alpha", "0", "must be > 0"),
    ("sft", "--lora-dropout", "1", "must be in [0, 1)"),
    ("rm train", "--lr", "0", "must be > 0"),
    ("rm train", "--micro-batch-size", "0", "must be ≥ 1"),
    ("rm train", "--max-steps", "-2", "or -1 for no limit"),
    ("rm train", "--center-coef", "-1", "must be ≥ 0"),
    ("rm train", "--max-length", "0", "must be ≥ 1"),
    ("rm score", "--chunk-size", "0", "must be ≥ 1"),
    ("rm score", "--eval-batch-size", "0", "must be ≥ 1"),
    ("rm eval", "--max-length", "-1", "must be ≥ 1"),
    ("dpo offline", "--beta", "0", "must be > 0"),
    ("dpo offline", "--label-smoothing", "0.5", "must be in [0, 0.5)"),
    ("dpo offline", "--nll-coef", "-1", "must be ≥ 0"),
    ("dpo offline", "--batch-size", "0", "must be ≥ 1"),
    ("dpo offline", "--lora-dropout", "-0.1", "must be in [0, 1)"),
    ("dpo online", "--iter", "0", "must be ≥ 1"),
    ("dpo online", "--iterations", "0", "must be ≥ 1"),
    ("dpo online", "--n", "1", "must be ≥ 2 (a pair needs two responses)"),
    ("dpo online", "--num-samples", "0", "must be ≥ 2"),
    ("dpo online", "--temperature", "0", "must be > 0"),
    ("dpo online", "--top-p", "0", "must be in (0, 1]"),
    ("dpo online", "--top-k", "-1", "must be ≥ 0"),
    ("dpo online", "--max-new-tokens", "0", "must be ≥ 1"),
    ("dpo online", "--max-prompt-length", "0", "must be ≥ 1"),
    ("dpo online", "--length-penalty", "-0.001", "must be ≥ 0"),
    ("dpo online", "--reward-tolerance", "-1", "must be ≥ 0"),
    ("dpo online", "--gen-batch-size", "-1", "must be ≥ 0"),
    ("dpo online", "--chunk-size", "0", "must be ≥ 1"),
    ("osp", "--steps", "0", "must be ≥ 1"),
    ("osp", "--k", "0", "must be ≥ 1"),
    ("osp", "--batch-size", "0", "must be ≥ 1"),
    ("osp", "--beta", "-0.1", "must be > 0"),
    ("osp", "--temperature", "0", "must be > 0"),
    ("osp", "--top-p", "1.5", "must be in (0, 1]"),
    ("osp", "--snapshot-every", "-1", "must be ≥ 0"),
    ("sft", "--save-every", "-1", "must be ≥ 0"),
    ("rm train", "--save-every", "x", "expected an integer"),
    ("dpo offline", "--save-every", "-2", "must be ≥ 0"),
    ("osp", "--save-every", "1.5", "expected an integer"),
    ("dpo online", "--missing-eos-penalty", "-1", "must be ≥ 0"),
    ("osp", "--missing-eos-penalty", "-0.5", "must be ≥ 0"),
    ("dpo online", "--pair-selection", "best_worst", "invalid choice: 'best_worst'"),
    ("sft", "--report-to", "mlflow", "invalid choice: 'mlflow'"),
    ("osp", "--lora-rank", "-1", "must be ≥ 0"),
    ("osp", "--lora-targets", "q,qkv", "unknown ['qkv']"),
    ("sft", "--lora-targets", ",", "unknown none given"),
    ("generate", "--n", "0", "must be ≥ 1"),
    ("generate", "--num-samples", "-3", "must be ≥ 1"),
    ("generate", "--temperature", "-1", "must be ≥ 0"),
    ("generate", "--top-p", "0", "must be in (0, 1]"),
    ("generate", "--top-k", "-1", "must be ≥ 0"),
    ("generate", "--min-p", "1.5", "must be in [0, 1]"),
    ("generate", "--max-new-tokens", "0", "must be ≥ 1"),
    ("generate", "--batch-size", "-1", "must be ≥ 0"),
    ("generate", "--chunk-size", "0", "must be ≥ 1"),
    ("evaluate", "--samples", "0", "must be ≥ 1"),
    ("evaluate", "--max-new-tokens", "0", "must be ≥ 1"),
    ("evaluate", "--batch-size", "-1", "must be ≥ 0"),
    # a verifier that cannot load (rewards.load_reward_function)
    ("dpo online", "--rm", "verify.py:reward", "verifier: no file verify.py"),
    ("dpo online", "--rm", "data.task:no_such", "data.task has no function no_such"),
    ("dpo online", "--gold", "verify.py:reward", "verifier: no file verify.py"),
    ("osp", "--gold", "verify.py:reward", "verifier: no file verify.py"),
    ("osp", "--gold", "no_such_module_x:f", "importing no_such_module_x failed"),
    ("evaluate", "--gold", "data.task:score x", "expected FILE.py:function or package.module"),
    ("evaluate one run", "--prepare", "onlne_gold", "no folder onlne_gold in the run"),
]


def flag_error(main, argv, capsys):
    """main(argv) as the script's __main__ runs it: an argparse error (exit status 2, no traceback).
    Returns stderr's error line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("stage, flag, value, message", BAD_FLAGS,
                         ids=[f"{s}{f}={v}" for s, f, v, _ in BAD_FLAGS])
def test_a_bad_number_stops_the_stage_before_any_work(stage, flag, value, message, tmp_path,
                                                      monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main, required = STAGES[stage]
    error = flag_error(main, required + [flag, value], capsys)
    # an alias: "argument --n/--num-samples: ..."
    assert f"argument {flag}" in error or f"/{flag}:" in error, error
    assert message in error, error
    assert list(tmp_path.iterdir()) == []  # no --out, no run folder, no settings record


def test_good_edge_values_are_accepted():
    args = sft.parse_args(["--model", "m", "--data", "d", "--out", "o", "--max-steps", "-1",
                           "--lora-rank", "0", "--grad-clip", "0", "--warmup-ratio", "1",
                           "--lora-dropout", "0"])
    assert (args.max_steps, args.lora_rank, args.grad_clip, args.warmup_ratio) == (-1, 0, 0.0, 1.0)
    args = dpo.build_parser().parse_args(["--top-p", "1", "--top-k", "0",
                                          "--label-smoothing", "0.49", "--gen-batch-size", "0"])
    assert (args.top_p, args.top_k, args.label_smoothing, args.gen_batch_size) == (1.0, 0, 0.49, 0)
    args = osp.parse_args(["--model", "m", "--prompts", "p", "--out", "o", "--k", "1",
                           "--pairing", "best"])
    assert args.k == 1
    # the checks also take numbers (settings read back from a file), and refuse a float for an int
    assert positive_int(3) == 3 and fraction(0) == 0 and step_limit(-1) == -1
    with pytest.raises(Exception, match="expected an integer, got 2.5"):
        positive_int(2.5)


def test_generate_greedy_is_allowed_and_n_must_fit_the_batch(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    required = STAGES["generate"][1]
    # --temperature 0 is greedy: accepted by argparse (the run then stops on the missing prompts
    # file, nothing written)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: generate.main(required + ["--temperature", "0", "--device", "cpu"]))
    assert exit_info.value.code == 2 and "p.jsonl" in capsys.readouterr().err
    error = flag_error(generate.main, required + ["--n", "8", "--batch-size", "4"], capsys)
    assert "--n 8 samples per prompt need --batch-size 8 or more" in error
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# dpo.py online: settings read back from config.json / iter{t}/settings.json get the same checks.


@pytest.mark.parametrize("setting, value, message", [
    ("lr", -1, "lr must be > 0, got -1; fix it there or give --lr on the command line"),
    ("n", 1, "n must be ≥ 2"),
    ("lora_dropout", 1.5, "lora_dropout must be in [0, 1)"),
    ("batch_size", 2.5, "batch_size expected an integer, got 2.5"),
    ("loss", "dpx", "loss must be one of dpo, ipo, spce, got 'dpx'"),
    ("seed", "abc", "seed invalid int value: 'abc'"),  # a plain type=int
])
def test_a_bad_value_read_back_from_the_run_is_a_one_line_error(setting, value, message, tmp_path,
                                                                capsys):
    run = tmp_path / "run"
    run.mkdir()
    config = {"sft": "sft", "rm": "gold", "prompts": "p.jsonl", setting: value}
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: dpo.main(["--iter", "2", "--run-dir", str(run)]))
    error = check_one_line_error(exit_info.value.code, capsys.readouterr().err)
    assert f"{run / 'config.json'}: {message}" in error, error
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    assert json.loads((run / "config.json").read_text()) == config
    # the command line wins over the file, so it also mends it
    flag = {"lr": ["--lr", "1e-6"], "n": ["--n", "2"], "lora_dropout": ["--lora-dropout", "0"],
            "batch_size": ["--batch-size", "2"], "loss": ["--loss", "dpo"],
            "seed": ["--seed", "1"]}[setting]
    args, sources = dpo.resolve_settings(["--iter", "2", "--run-dir", str(run)] + flag)
    assert sources[setting] == "command line"


# ----------------------------------------------------------------------------------------------
# Ctrl-C: one line on stderr, exit status 130 (128 + SIGINT), finished work kept.


def test_keyboard_interrupt_is_one_line_and_exit_130(capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_cli(interrupted)
    assert exit_info.value.code == 130
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert (len(lines) == 1 and lines[0].startswith("interrupted: ")
            and "rerun the same command to resume" in lines[0])
    # under torchrun every rank is interrupted: rank 0 alone says so (and leaves with os._exit,
    # which would end pytest here: made a SystemExit)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(os, "_exit", lambda status: sys.exit(status))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(interrupted)
    assert exit_info.value.code == 130 and capsys.readouterr().err == ""


def test_ctrl_c_during_generation_keeps_the_finished_chunks(tiny_model_dir, tmp_path):
    """A real SIGINT to `python generate.py` once its first chunk is written."""
    write_jsonl(tmp_path / "prompts.jsonl",
                [{"id": f"q{i}", "messages": [{"role": "user", "content": f"say {i}"}]}
                 for i in range(400)])
    out = tmp_path / "samples.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "generate.py", "--model", str(tiny_model_dir),
               "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(out), "--n", "4",
               "--max-new-tokens", "200", "--chunk-size", "4", "--device", "cpu"]
    # preexec_fn: Ctrl-C's default action even when pytest runs as a background job, which a
    # non-interactive shell starts with SIGINT ignored (inherited)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        first_chunk = "samples.jsonl.parts-*/000000.jsonl"
        while (not list(tmp_path.glob(first_chunk)) and process.poll() is None
               and time.time() < deadline):
            time.sleep(0.05)
        assert process.poll() is None, "generate.py ended before it could be interrupted"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "interrupted" in line]
    expected = ("interrupted: the outputs finished so far are kept; rerun the same command to "
                "resume (finished work is skipped; an unfinished training run starts over)")
    assert len(lines) == 1 and lines[0] == expected, stderr[-3000:]
    (parts,) = tmp_path.glob("samples.jsonl.parts-*")
    assert ((parts / "000000.jsonl").exists() and (parts / "settings.json").exists()
            and not out.exists())
    assert not list(parts.glob(".*.tmp"))  # nothing half-written


# ----------------------------------------------------------------------------------------------
# A record missing a field shows what a record of its kind looks like.


def test_a_missing_field_shows_an_example_record(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"id": "p1", "prompt": "hello"}) + "\n")
    with pytest.raises(ValueError) as error:
        load_records(path, "prompts")
    assert str(error.value) == (f"{path}:1: missing field 'messages'; a prompts record looks like "
                                '{"id": "p1", "messages": [{"role": "user", "content": "..."}]} '
                                '(see data/README.md)')
    for kind, example in EXAMPLES.items():  # every example is a valid record of its kind
        validate_record(example, kind)


def test_usage_texts_run_the_data_scripts_as_modules():
    # `python data/task.py` fails (its imports need the repo root on the path);
    # `python -m data.task` works. Every usage text a stage prints with --help, and the README,
    # must say the second.
    texts = {path.name: path.read_text()
             for path in [*ROOT.glob("*.py"), *ROOT.glob("data/*.py"), ROOT / "README.md"]}
    wrong = [name for name, text in texts.items() if "python data/" in text]
    assert not wrong, f"'python data/…' in {wrong}: write 'python -m data.…'"

