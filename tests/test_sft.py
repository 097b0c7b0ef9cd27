"""Tests of sft.py."""
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import sft
from runs import read_jsonl, write_jsonl
from tokens import load_tokenizer
from model import Transformer
from tests.helpers import (ROOT, run_main_expecting_error, stage_command, stage_env, run_script,
                           run_script_expecting_error, write_sft_data)


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    """A tiny model trained from scratch on 128 reversal conversations (4 epochs, blocks of 128)."""
    folder = tmp_path_factory.mktemp("sft")
    write_sft_data(folder / "sft.jsonl", n=128)
    out = folder / "out"
    stdout = run_script(["sft.py", "--model", str(tiny_model_dir), "--scratch",
                         "--data", str(folder / "sft.jsonl"), "--out", str(out),
                         "--block-size", "128", "--batch-size", "8", "--micro-batch-size", "4",
                         "--epochs", "4", "--lr", "3e-3", "--device", "cpu", "--log-every", "100"])
    return dict(data=folder / "sft.jsonl", out=out, stdout=stdout)


def test_sft_lowers_loss_and_counts_every_assistant_token_once_per_epoch(sft_run, tiny_model_dir):
    lines = read_jsonl(sft_run["out"] / "metrics.jsonl")
    assert [line["step"] for line in lines] == list(range(1, len(lines) + 1)) and len(lines) >= 12
    losses = [line["loss"] for line in lines]
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3
    assert all(line["grad_norm"] > 0 and line["tokens_per_s"] > 0 for line in lines)
    # The per-step count of trained tokens (a device tensor, all-reduced, read once per step) adds
    # up to 4 epochs × the assistant tokens of the data.
    documents, truncated, dropped = sft.tokenize_conversations(
        load_tokenizer(tiny_model_dir), read_jsonl(sft_run["data"]), 128, False)
    assert (truncated, dropped, len(documents)) == (0, 0, 128)
    assistant_tokens = sum(target != -100 for _, targets in documents for target in targets)
    assert sum(line["assistant_tokens"] for line in lines) == 4 * assistant_tokens


def test_sft_checkpoint_loads_in_transformers(sft_run):
    from transformers import AutoTokenizer
    out = sft_run["out"]
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "reverse abc"}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    generated = hf.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    ours = Transformer.from_pretrained(out)
    with torch.no_grad():
        assert (ours(generated) - hf(generated).logits).abs().max().item() <= 1e-4


def test_sft_rerun_skips_and_overwrite_retrains(sft_run, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(sft_run["out"], out)
    weights = (out / "model.safetensors").read_bytes()
    steps = len(read_jsonl(out / "metrics.jsonl"))
    args = ["--model", str(tiny_model_dir), "--data", str(sft_run["data"]), "--out", str(out),
            "--block-size", "128", "--batch-size", "8", "--max-steps", "1", "--lr", "1e-3",
            "--device", "cpu"]
    sft.main(args)  # in this process: the stage's main() is what `python sft.py` runs
    assert "skipping" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == weights
    assert len(read_jsonl(out / "metrics.jsonl")) == steps
    sft.main(args + ["--overwrite"])
    assert "skipping" not in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() != weights
    assert [line["step"] for line in read_jsonl(out / "metrics.jsonl")] == [1]


def test_sft_on_an_empty_file_stops_with_a_one_line_error(tiny_model_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("")
    error = run_script_expecting_error(["sft.py", "--model", str(tiny_model_dir), "--scratch",
                                        "--data", str(data),
                                        "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert str(data) in error
    assert not (tmp_path / "out").exists()


def test_sft_with_no_assistant_token_within_the_block_stops_with_a_one_line_error(tiny_model_dir,
                                                                                  tmp_path, capsys):
    data = tmp_path / "sft.jsonl"  # the assistant turn starts after the conversation's 8th token
    write_jsonl(data, [{"messages": [{"role": "user", "content": "reverse abcdef"},
                                     {"role": "assistant", "content": "fedcba"}]}])
    error = run_main_expecting_error(sft.main, ["--model", str(tiny_model_dir), "--scratch",
                                                "--data", str(data), "--out", str(tmp_path / "out"),
                                                "--block-size", "8", "--device", "cpu"], capsys)
    assert str(data) in error and "1 read, 1 with no assistant token within --block-size 8" in error
    assert not (tmp_path / "out").exists()


def test_sft_plain_text_records_train_on_every_token(tiny_model_dir, tmp_path):
    """{"text": ...} (pretraining): bos + text + eos, every token after bos is a target; a chat
    record in the same file keeps its loss on the assistant tokens only; the stage trains on a
    mixed file."""
    tokenizer = load_tokenizer(tiny_model_dir)
    records = [{"text": "add 5 7 = 12"},
               {"messages": [{"role": "user", "content": "abc"},
                             {"role": "assistant", "content": "cba"}]}]
    documents, truncated, dropped = sft.tokenize_conversations(tokenizer, records, 128,
                                                               show_progress=False)
    (ids, targets), (chat_ids, chat_targets) = documents
    text_ids = tokenizer("add 5 7 = 12", add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    assert ids == bos + text_ids + [tokenizer.eos_token_id] and (truncated, dropped) == (0, 0)
    # every next token, the first text token (after bos) included
    assert targets == ids[1:] + [-100]
    answer_tokens = len(tokenizer("cba", add_special_tokens=False)["input_ids"])
    assert sum(t != -100 for t in chat_targets) == answer_tokens + 1  # + end of turn
    write_jsonl(tmp_path / "mixed.jsonl", records * 8)
    sft.main(["--model", str(tiny_model_dir), "--scratch", "--data", str(tmp_path / "mixed.jsonl"),
              "--out", str(tmp_path / "out"), "--block-size", "64", "--batch-size", "2",
              "--micro-batch-size", "2", "--max-steps", "2", "--device", "cpu"])
    lines = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert len(lines) == 2 and sum(line["assistant_tokens"] for line in lines) > 0


# 18 steps (3 epochs of 6), a resumable state every 4 (test_sft_killed_mid_training_...)
SHARED_DISTRIBUTED_ARGS = ["--block-size", "64", "--batch-size", "8", "--micro-batch-size", "2",
                           "--epochs", "3", "--save-every", "4", "--lr", "1e-3", "--device", "cpu",
                           "--log-every", "100"]


@pytest.fixture(scope="module")
def sft_single_process(tiny_model_dir, tmp_path_factory):
    """18 steps in one process: the reference for the distributed runs."""
    folder = tmp_path_factory.mktemp("sft_one")
    write_sft_data(folder / "sft.jsonl", n=48)
    run_script(["sft.py", "--model", str(tiny_model_dir), "--data", str(folder / "sft.jsonl"),
                "--out", str(folder / "one"), *SHARED_DISTRIBUTED_ARGS])
    return folder


def two_rank_args(tiny_model_dir, data_folder, out, parallel="fsdp"):
    return ["sft.py", "--model", str(tiny_model_dir), "--data", str(data_folder / "sft.jsonl"),
            "--out", str(out), "--parallel", parallel, *SHARED_DISTRIBUTED_ARGS]


@pytest.fixture(scope="module")
def sft_two_ranks(sft_single_process, tiny_model_dir):
    """The same 18 steps on two gloo ranks under FSDP2, uninterrupted."""
    out = sft_single_process / "two"
    run_script(two_rank_args(tiny_model_dir, sft_single_process, out), nproc=2)
    return out


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_sft_distributed_matches_single_process(parallel, sft_single_process, sft_two_ranks,
                                                tiny_model_dir, tmp_path):
    """Two gloo ranks (FSDP2 or DDP) on the same global batches give the same weights as one process
    (fp32 on CPU; tolerance 1e-5 absolute on every weight after 18 AdamW steps), and the same
    logged loss and trained-token count (each summed over ranks once per step)."""
    two_folder = sft_two_ranks
    if parallel == "ddp":
        two_folder = tmp_path / "two"
        run_script(two_rank_args(tiny_model_dir, sft_single_process, two_folder, "ddp"), nproc=2)
    from safetensors.torch import load_file
    one = load_file(sft_single_process / "one" / "model.safetensors")
    two = load_file(two_folder / "model.safetensors")
    assert one.keys() == two.keys()
    initial = load_file(tiny_model_dir / "model.safetensors")
    for name in one:
        assert (one[name] - two[name]).abs().max().item() <= 1e-5, name
    assert any((one[n] - initial[n]).abs().max() > 1e-4 for n in one)  # training moved the weights
    lines_one = read_jsonl(sft_single_process / "one" / "metrics.jsonl")
    lines_two = read_jsonl(two_folder / "metrics.jsonl")

    def column(lines, name):
        return [line[name] for line in lines]

    assert column(lines_two, "assistant_tokens") == column(lines_one, "assistant_tokens")
    assert column(lines_two, "loss") == pytest.approx(column(lines_one, "loss"), abs=1e-5)
    assert column(lines_two, "grad_norm") == pytest.approx(column(lines_one, "grad_norm"), rel=1e-4)


def test_sft_killed_mid_training_resumes_to_the_same_weights(sft_single_process, sft_two_ranks,
                                                            tiny_model_dir, tmp_path, capsys):
    """kill -9 of one of two gloo ranks mid-training, then the same command again: it goes on from
    the latest --save-every state (model, AdamW state, step, random streams; each rank its own
    shards) and ends with the weights and metrics of the uninterrupted run, bit for bit. The same
    state also resumes on one rank (resharded), and says that the result then differs."""
    from safetensors.torch import load_file
    out = tmp_path / "killed"
    args = two_rank_args(tiny_model_dir, sft_single_process, out)
    launcher = subprocess.Popen(stage_command(args, nproc=2), cwd=ROOT, env=stage_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    saved = tmp_path / "killed.resume"  # beside --out
    while (not (saved / "step4" / "state.json").exists() and launcher.poll() is None
           and time.time() < deadline):
        time.sleep(0.01)
    ranks = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                           text=True).stdout.split()
    assert ranks, "the ranks ended before their first saved state"
    os.kill(int(ranks[-1]), signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0 and not (out / "model.safetensors").exists()
    for folder in ("killed", "killed.resume"):
        shutil.copytree(tmp_path / folder, tmp_path / folder.replace("killed", "on_one_rank"))
    stdout = run_script(args, nproc=2)
    assert "resuming after step" in stdout and not saved.exists()
    whole = load_file(sft_two_ranks / "model.safetensors")
    resumed = load_file(out / "model.safetensors")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    steps = lambda folder: [(line["step"], line["loss"])  # noqa: E731
                            for line in read_jsonl(folder / "metrics.jsonl")]
    assert steps(out) == steps(sft_two_ranks)
    # in this process: one rank
    sft.main([str(tmp_path / "on_one_rank") if a == str(out) else a for a in args[1:]])
    assert "saved by 2 ranks, on 1" in capsys.readouterr().out
    assert [step for step, _ in steps(tmp_path / "on_one_rank")] == list(range(1, 19))
