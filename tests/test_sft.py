"""Tests of sft.py."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from common import read_jsonl
from model import Transformer
from tests.helpers import run_script, write_sft_data


def test_sft_lowers_loss_and_checkpoint_loads_in_transformers(tiny_model_dir, tmp_path):
    write_sft_data(tmp_path / "sft.jsonl", n=128)
    out = tmp_path / "sft_out"
    run_script(["sft.py", "--model", str(tiny_model_dir), "--scratch", "--data", str(tmp_path / "sft.jsonl"),
                "--out", str(out), "--block-size", "128", "--batch-size", "8", "--micro-batch-size", "4",
                "--epochs", "4", "--lr", "3e-3", "--device", "cpu", "--log-every", "100"])
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3
    from transformers import AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "reverse abc"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = hf.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    ours = Transformer.from_pretrained(out)
    with torch.no_grad():
        assert (ours(generated) - hf(generated).logits).abs().max().item() <= 1e-4
    # A rerun with the checkpoint already there does nothing.
    assert "skipping" in run_script(["sft.py", "--model", str(tiny_model_dir), "--data", str(tmp_path / "sft.jsonl"),
                                     "--out", str(out), "--device", "cpu"])


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_sft_distributed_matches_single_process(parallel, tiny_model_dir, tmp_path):
    """Two gloo ranks (FSDP2 or DDP) on the same global batch give the same weights as one process
    (fp32 on CPU; tolerance 1e-5 absolute on every weight after 3 AdamW steps)."""
    write_sft_data(tmp_path / "sft.jsonl", n=48)
    common_args = ["sft.py", "--model", str(tiny_model_dir), "--data", str(tmp_path / "sft.jsonl"),
                   "--block-size", "64", "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "3",
                   "--lr", "1e-3", "--device", "cpu", "--parallel", parallel]
    run_script(common_args + ["--out", str(tmp_path / "one")], nproc=1)
    run_script(common_args + ["--out", str(tmp_path / "two")], nproc=2)
    from safetensors.torch import load_file
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    initial = load_file(tiny_model_dir / "model.safetensors")
    for name in one:
        assert (one[name] - two[name]).abs().max().item() <= 1e-5, name
    assert any((one[n] - initial[n]).abs().max() > 1e-4 for n in one)  # training moved the weights
