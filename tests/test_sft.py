"""Tests of sft.py."""
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import sft
from common import load_tokenizer, read_jsonl, write_jsonl
from model import Transformer
from tests.helpers import run_main_expecting_error, run_script, run_script_expecting_error, write_sft_data


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    """A tiny model trained from scratch on 128 reversal conversations (4 epochs, blocks of 128)."""
    folder = tmp_path_factory.mktemp("sft")
    write_sft_data(folder / "sft.jsonl", n=128)
    out = folder / "out"
    stdout = run_script(["sft.py", "--model", str(tiny_model_dir), "--scratch", "--data", str(folder / "sft.jsonl"),
                         "--out", str(out), "--block-size", "128", "--batch-size", "8", "--micro-batch-size", "4",
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
    documents, truncated, dropped = sft.tokenize_conversations(load_tokenizer(tiny_model_dir), read_jsonl(sft_run["data"]), 128, False)
    assert (truncated, dropped, len(documents)) == (0, 0, 128)
    assistant_tokens = sum(target != -100 for _, targets in documents for target in targets)
    assert sum(line["assistant_tokens"] for line in lines) == 4 * assistant_tokens


def test_sft_checkpoint_loads_in_transformers(sft_run):
    from transformers import AutoTokenizer
    out = sft_run["out"]
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "reverse abc"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
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
            "--block-size", "128", "--batch-size", "8", "--max-steps", "1", "--lr", "1e-3", "--device", "cpu"]
    sft.main(args)  # in this process: the stage's main() is what `python sft.py` runs
    assert "skipping" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == weights and len(read_jsonl(out / "metrics.jsonl")) == steps
    sft.main(args + ["--overwrite"])
    assert "skipping" not in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() != weights
    assert [line["step"] for line in read_jsonl(out / "metrics.jsonl")] == [1]


def test_sft_on_an_empty_file_stops_with_a_one_line_error(tiny_model_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("")
    error = run_script_expecting_error(["sft.py", "--model", str(tiny_model_dir), "--scratch", "--data", str(data),
                                        "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert str(data) in error
    assert not (tmp_path / "out").exists()


def test_sft_with_no_assistant_token_within_the_block_stops_with_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"  # the assistant turn starts after the first 8 tokens of the conversation
    write_jsonl(data, [{"messages": [{"role": "user", "content": "reverse abcdef"}, {"role": "assistant", "content": "fedcba"}]}])
    error = run_main_expecting_error(sft.main, ["--model", str(tiny_model_dir), "--scratch", "--data", str(data),
                                                "--out", str(tmp_path / "out"), "--block-size", "8", "--device", "cpu"], capsys)
    assert str(data) in error and "1 read, 1 with no assistant token within --block-size 8" in error
    assert not (tmp_path / "out").exists()


SHARED_DISTRIBUTED_ARGS = ["--block-size", "64", "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "3",
                           "--lr", "1e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def sft_single_process(tiny_model_dir, tmp_path_factory):
    """Three steps in one process: the reference for the distributed runs."""
    folder = tmp_path_factory.mktemp("sft_one")
    write_sft_data(folder / "sft.jsonl", n=48)
    run_script(["sft.py", "--model", str(tiny_model_dir), "--data", str(folder / "sft.jsonl"), "--out", str(folder / "one"),
                *SHARED_DISTRIBUTED_ARGS])
    return folder


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_sft_distributed_matches_single_process(parallel, sft_single_process, tiny_model_dir, tmp_path):
    """Two gloo ranks (FSDP2 or DDP) on the same global batches give the same weights as one process
    (fp32 on CPU; tolerance 1e-5 absolute on every weight after 3 AdamW steps), and the same
    logged loss and trained-token count (each summed over ranks once per step)."""
    run_script(["sft.py", "--model", str(tiny_model_dir), "--data", str(sft_single_process / "sft.jsonl"),
                "--out", str(tmp_path / "two"), "--parallel", parallel, *SHARED_DISTRIBUTED_ARGS], nproc=2)
    from safetensors.torch import load_file
    one, two = load_file(sft_single_process / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    initial = load_file(tiny_model_dir / "model.safetensors")
    for name in one:
        assert (one[name] - two[name]).abs().max().item() <= 1e-5, name
    assert any((one[n] - initial[n]).abs().max() > 1e-4 for n in one)  # training moved the weights
    lines_one = read_jsonl(sft_single_process / "one" / "metrics.jsonl")
    lines_two = read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [line["assistant_tokens"] for line in lines_two] == [line["assistant_tokens"] for line in lines_one]
    assert [line["loss"] for line in lines_two] == pytest.approx([line["loss"] for line in lines_one], abs=1e-5)
    assert [line["grad_norm"] for line in lines_two] == pytest.approx([line["grad_norm"] for line in lines_one], rel=1e-4)
