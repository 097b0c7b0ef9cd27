"""--save-every: a stage that dies mid-training and is run again goes on from its latest saved state
and ends exactly where an uninterrupted run ends. sft.py's test kills one of two gloo ranks with
kill -9 (tests/test_sft.py); here each other stage dies in this process right after a save."""
import pytest
import torch
from safetensors.torch import load_file

import dpo
import osp
import train_rm
from runs import read_jsonl
from tests.helpers import builtin_model_dir, write_pairs
import training


class Crash(Exception):
    pass


@pytest.fixture
def in_process_stage(monkeypatch):
    """A stage's main() in this process as `python STAGE.py` runs it: the PyTorch kernels on CPU
    (the Triton interpreter, far slower, is for the kernel tests)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def crash_after_first_save(monkeypatch, stage):
    """The stage's save_training_state, raising once the first state is on disk: a crash
    mid-training."""
    def save_then_crash(out_dir, *args, **kwargs):
        training.save_training_state(out_dir, *args, **kwargs)
        if training.saved_states(out_dir):
            raise Crash
    monkeypatch.setattr(stage, "save_training_state", save_then_crash)


def run_interrupted_and_whole(stage, argv, out, monkeypatch, capsys):
    """The stage run once whole (into OUT.whole) and once killed after its first saved state, then
    rerun; returns the two final weight files and metrics."""
    stage.main([*argv, "--out", f"{out}.whole"])
    with monkeypatch.context() as patch:
        crash_after_first_save(patch, stage)
        with pytest.raises(Crash):
            stage.main([*argv, "--out", str(out)])
    assert not (out / "model.safetensors").exists()
    capsys.readouterr()
    stage.main([*argv, "--out", str(out)])
    assert "resuming after step 2" in capsys.readouterr().out
    # a finished stage leaves no state behind
    assert not out.with_name(out.name + ".resume").exists()
    whole = f"{out}.whole"
    return (load_file(f"{whole}/model.safetensors"), load_file(out / "model.safetensors"),
            read_jsonl(f"{whole}/metrics.jsonl"), read_jsonl(out / "metrics.jsonl"))


def same_run(whole, resumed, whole_lines, resumed_lines):
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)

    def drop_timing(lines):
        return [{k: v for k, v in line.items() if k not in ("ms", "tokens_per_s")}
                for line in lines]
    assert drop_timing(resumed_lines) == drop_timing(whole_lines) and len(whole_lines) >= 4


def test_reward_model_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                      in_process_stage):
    write_pairs(tmp_path / "pairs.jsonl", 32)
    argv = ["train", "--type", "bt", "--model", str(tiny_model_dir),
            "--pairs", str(tmp_path / "pairs.jsonl"), "--batch-size", "8",
            "--micro-batch-size", "4", "--epochs", "1", "--lr", "1e-3", "--save-every", "2",
            "--device", "cpu"]
    same_run(*run_interrupted_and_whole(train_rm, argv, tmp_path / "rm", monkeypatch, capsys))


def test_dpo_with_lora_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                       in_process_stage):
    # LoRA: only the adapters (and their AdamW state) are saved; the frozen base comes from --model
    write_pairs(tmp_path / "pairs.jsonl", 32)
    argv = ["--model", str(tiny_model_dir), "--pairs", str(tmp_path / "pairs.jsonl"),
            "--batch-size", "8", "--micro-batch-size", "4", "--epochs", "1", "--lr", "1e-2",
            "--lora-rank", "4", "--lora-dropout", "0.1", "--save-every", "2", "--device", "cpu"]
    same_run(*run_interrupted_and_whole(dpo, argv, tmp_path / "dpo", monkeypatch, capsys))
    saved = next(iter(load_file(tmp_path / "dpo" / "model.safetensors").values()))
    assert saved.dtype == torch.float32


class RunsCode:
    def __reduce__(self):
        return (print, ("code ran",))


def test_random_streams_load_without_unpickling_code(tmp_path, capsys):
    """A resume reads each rank's random streams with torch.load(weights_only=True): they are
    tensors and plain numbers, round-trip exactly, and a file that would run code on load is
    refused."""
    import random

    import numpy as np
    rng = random.Random(3)
    torch.manual_seed(1), random.seed(2), np.random.seed(4)
    torch.save(training.random_streams(rng), tmp_path / "streams.pt")
    first = (torch.rand(3).tolist(), random.random(), np.random.rand(), rng.random())
    training.restore_random_streams(torch.load(tmp_path / "streams.pt", weights_only=True), rng)
    assert (torch.rand(3).tolist(), random.random(), np.random.rand(), rng.random()) == first
    torch.save({"torch": RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported"):
        torch.load(tmp_path / "evil.pt", weights_only=True)
    assert "code ran" not in capsys.readouterr().out


def test_a_state_saved_by_the_old_pickle_format_resumes_without_loading_it(tiny_model_dir,
                                                                           tmp_path, monkeypatch,
                                                                           capsys,
                                                                           in_process_stage):
    """Random streams that an older version saved with numpy arrays inside (a pickle weights_only
    refuses): the resume goes on with fresh streams and says so, instead of a traceback."""
    import numpy as np
    write_pairs(tmp_path / "pairs.jsonl", 16)
    argv = ["--model", str(tiny_model_dir), "--pairs", str(tmp_path / "pairs.jsonl"),
            "--batch-size", "8", "--micro-batch-size", "4", "--epochs", "1", "--lr", "1e-2",
            "--save-every", "1", "--device", "cpu", "--out", str(tmp_path / "dpo")]
    with monkeypatch.context() as patch:
        crash_after_first_save(patch, dpo)
        with pytest.raises(Crash):
            dpo.main(argv)
    (streams,) = (tmp_path / "dpo.resume").glob("step*/random_rank0.pt")
    torch.save(dict(torch=torch.get_rng_state(), cuda=None, numpy=np.random.get_state()), streams)
    capsys.readouterr()
    dpo.main(argv)
    assert "saved by an older version" in capsys.readouterr().out
    assert (tmp_path / "dpo" / "model.safetensors").exists()


def test_a_resume_may_take_a_smaller_micro_batch(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                 in_process_stage):
    """What a resume is for after running out of memory: the same run with --micro-batch-size 2
    instead of 4 (and activation checkpointing on) continues from the saved state and ends where the
    whole run ends, up to floating-point summation order."""
    write_pairs(tmp_path / "pairs.jsonl", 32)
    argv = ["--model", str(tiny_model_dir), "--pairs", str(tmp_path / "pairs.jsonl"),
            "--batch-size", "8", "--epochs", "1", "--lr", "1e-2", "--lora-rank", "4",
            "--save-every", "2", "--device", "cpu"]
    out = tmp_path / "dpo"
    dpo.main([*argv, "--micro-batch-size", "4", "--out", f"{out}.whole"])
    with monkeypatch.context() as patch:
        crash_after_first_save(patch, dpo)
        with pytest.raises(Crash):
            dpo.main([*argv, "--micro-batch-size", "4", "--out", str(out)])
    capsys.readouterr()
    dpo.main([*argv, "--micro-batch-size", "2", "--activation-checkpointing", "--out", str(out)])
    assert "resuming after step 2" in capsys.readouterr().out
    whole = load_file(f"{out}.whole/model.safetensors")
    resumed = load_file(out / "model.safetensors")
    assert all(torch.allclose(whole[name], resumed[name], atol=1e-5) for name in whole)
    assert any(not torch.equal(whole[name], load_file(tiny_model_dir / "model.safetensors")[name])
               for name in whole)


def test_osp_resumes_exactly(task_dir, tmp_path, monkeypatch, capsys, in_process_stage):
    # the prompt batches and the random pairing go on where they stopped; the samples are seeded
    # by step
    sft = builtin_model_dir(task_dir, tmp_path / "sft")
    argv = ["--model", str(sft), "--prompts", str(task_dir / "prompts_iter1.jsonl"),
            "--steps", "4", "--batch-size", "2", "--k", "4", "--max-new-tokens", "6",
            "--lr", "1e-2", "--beta", "0.1", "--loss", "dpo", "--pairing", "random",
            "--save-every", "2", "--device", "cpu"]
    same_run(*run_interrupted_and_whole(osp, argv, tmp_path / "osp", monkeypatch, capsys))
