"""Tests of the shared modules (runs.py, parallel.py, training.py, tokens.py): chat encoding,
schedule and batches, step metrics, settings records, chunked processing, JSONL, user errors,
checkpoint folders."""
import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel import Dist
from runs import (InputError, atomic_write_text, changed_settings, check_settings,
                  process_in_chunks, read_jsonl, write_jsonl)
from tokens import (encode_conversation, encode_prompt, encode_response, end_of_turn_ids,
                    load_tokenizer, stop_token_ids)
from training import (StepSums, batch_schedule, cosine_lr, load_training_state, optimizer_step,
                      rank_micro_batches, save_training_state)
from model import Transformer
from tests.helpers import ROOT, run_script, tiny_config


def test_chat_encoding_masks_only_assistant_tokens(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6!"}]
    ids, is_assistant = encode_conversation(tokenizer, messages)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tokenizer) == [im_end]
    assert stop_token_ids(tokenizer) == [im_end]
    # The trained tokens are exactly each answer's characters followed by <|im_end|>.
    trained = [i for i, a in zip(ids, is_assistant) if a]
    assert trained == tokenizer.convert_tokens_to_ids(["4", "<|im_end|>", "6", "!", "<|im_end|>"])
    # The whole sequence decodes to the template's own rendering (minus its final newline).
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(ids) == rendered.rstrip("\n")
    # The first turn is split exactly as generation sees it: prompt ids, then response ids.
    prompt_ids = encode_prompt(tokenizer, messages[:2])
    response_ids = encode_response(tokenizer, "4")
    assert ids[:len(prompt_ids) + len(response_ids)] == prompt_ids + response_ids
    assert not any(is_assistant[:len(prompt_ids)])


# ----------------------------------------------------------------------------------------------
# The training loop's parts (training.py) and run management (runs.py)


def test_cosine_schedule_warmup_and_decay():
    lrs = [cosine_lr(s, 100, 1.0, warmup_ratio=0.03) for s in range(100)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # monotone decay after warmup
    last = 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 96 / 97)).item())
    assert lrs[-1] == pytest.approx(last, abs=1e-6)
    # min_lr_ratio: the decay runs from the peak down to min_lr_ratio × peak, the cosine rescaled
    # between them
    halfway = 2.0 * (0.1 + 0.9 * 0.5)
    assert cosine_lr(50, 100, 2.0, warmup_ratio=0.0, min_lr_ratio=0.1) == pytest.approx(halfway)
    assert cosine_lr(100, 100, 2.0, warmup_ratio=0.0, min_lr_ratio=0.1) == pytest.approx(0.2)
    assert cosine_lr(0, 100, 2.0, warmup_ratio=0.0, min_lr_ratio=0.1) == pytest.approx(2.0)


def test_batch_schedule_covers_every_item_once_per_epoch():
    schedule = batch_schedule(10, batch_size=4, epochs=2, seed=0)
    # an epoch's last batch is smaller, nothing dropped
    assert [len(b) for b in schedule] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(schedule[:3], [])) == list(range(10))
    assert sorted(sum(schedule[3:], [])) == list(range(10))
    assert schedule[:3] != schedule[3:]  # a fresh shuffle each epoch
    assert batch_schedule(10, 4, 2, seed=0) == schedule
    assert batch_schedule(10, 4, 2, seed=1) != schedule
    assert batch_schedule(10, 4, 1.5, seed=0) == schedule[:5]  # ceil(1.5 × 3) steps
    assert batch_schedule(10, 4, 2, seed=0, max_steps=2) == schedule[:2]
    with pytest.raises(InputError, match="no training examples"):
        batch_schedule(0, 4, 1, seed=0)


@pytest.mark.parametrize("batch_len,world_size,micro", [(7, 2, 2), (8, 2, 4), (3, 4, 2), (1, 2, 1)])
def test_rank_micro_batches_share_a_batch_exactly_once(batch_len, world_size, micro):
    batch = list(range(100, 100 + batch_len))
    shares = [rank_micro_batches(batch, rank, world_size, micro) for rank in range(world_size)]
    # the same number of micro-batches on every rank (FSDP needs it)
    assert len({len(s) for s in shares}) == 1
    assert all(len(m) == micro for s in shares for m in s)
    flat = [i for s in shares for m in s for i in m]
    assert sorted(i for i in flat if i >= 0) == batch  # every item once, the rest is padding (-1)
    assert flat[:batch_len] == batch  # contiguous shares in order: padding only at the end


def test_step_sums_one_reduce_and_global_values():
    sums = StepSums()
    sums.add(loss=torch.tensor(1.5), correct=torch.tensor([1.0, 0.0, 1.0]))
    sums.add(loss=torch.tensor(0.5), correct=torch.tensor([1.0]))
    totals = sums.reduce(torch.device("cpu"), grad_norm=torch.tensor(3.25), lr=0.1)
    assert totals == {"loss": 2.0, "correct": 3.0, "grad_norm": 3.25, "lr": pytest.approx(0.1)}


def test_optimizer_step_returns_the_unclipped_norm_and_clips():
    model = torch.nn.Linear(3, 1, bias=False)
    model.weight.data.zero_()
    model.weight.grad = torch.tensor([[3.0, 4.0, 0.0]])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    norm = optimizer_step(model, optimizer, grad_clip=1.0)
    assert isinstance(norm, torch.Tensor) and norm.item() == pytest.approx(5.0)
    # the step used the clipped gradient
    assert model.weight.data[0].tolist() == pytest.approx([-0.6, -0.8, 0.0])
    assert model.weight.grad is None


def test_check_settings_records_then_refuses_a_change(tmp_path):
    record = tmp_path / "step" / "settings.json"
    start_over = tmp_path / "step"
    check_settings(record, {"n": 2, "temperature": 1.0, "prompts": ("a", "b")}, start_over)
    before = record.read_text()
    # the same settings (a tuple is stored as a list): continue
    check_settings(record, {"n": 2, "temperature": 1.0, "prompts": ["a", "b"]}, start_over)
    with pytest.raises(InputError, match=r"n 2 → 4.*delete .*step"):
        check_settings(record, {"n": 4, "temperature": 1.0, "prompts": ["a", "b"]}, start_over)
    # the record is never rewritten
    assert record.read_text() == before and json.loads(before)["n"] == 2


def test_one_settings_diff_for_records_and_resumes(tmp_path):
    """runs.changed_settings, behind check_settings and the resume check: compared as JSON stores
    them (a tuple as a list, a path as text), a name the record lacks reads as None. A resume with
    another setting stops before loading anything (training.load_training_state)."""
    saved = {"lr": 0.001, "prompts": ["a"], "out": "runs/x"}
    assert changed_settings(saved, {"lr": 0.001, "prompts": ("a",), "out": Path("runs/x")}) == []
    changed = changed_settings(saved, {"lr": 0.5, "beta": 0.1})
    assert changed == ["beta None → 0.1", "lr 0.001 → 0.5"]  # sorted by name
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    args = argparse.Namespace(save_every=1, lr=0.1, out=str(tmp_path / "out"), micro_batch_size=2)
    save_training_state(tmp_path / "out", 1, 2, model, optimizer, args)
    args.micro_batch_size = 1  # a throughput flag (RESUME_FREE_SETTINGS): a resume may change it
    assert load_training_state(tmp_path / "out", model, optimizer, args) == 1
    args.lr = 0.5
    with pytest.raises(InputError, match=r"step1 was saved with other settings \(lr 0.1 → 0.5\): "
                                         r"rerun with those to continue, or delete .*out.resume"):
        load_training_state(tmp_path / "out", model, optimizer, args)


def test_process_in_chunks_resumes_without_loss_or_duplication(tmp_path):
    records = [{"id": i} for i in range(10)]
    calls = []

    def process(chunk):
        calls.append([r["id"] for r in chunk])
        if len(calls) == 3:
            raise RuntimeError("crash")
        return [{**r, "double": 2 * r["id"]} for r in chunk]

    single = Dist(0, 0, 1, torch.device("cpu"))
    with pytest.raises(RuntimeError):
        process_in_chunks(records, tmp_path / "out.jsonl", process, single, chunk_size=3)
    assert not (tmp_path / "out.jsonl").exists()
    calls.clear()

    def process_again(chunk):
        calls.append(chunk)
        return [{**r, "double": 2 * r["id"]} for r in chunk]

    process_in_chunks(records, tmp_path / "out.jsonl", process_again, single, chunk_size=3)
    # 10 records in 4 chunks of 3, 2, 3, 2: chunks 0 and 1 were kept from the crashed run
    assert [[r["id"] for r in chunk] for chunk in calls] == [[5, 6, 7], [8, 9]]
    assert read_jsonl(tmp_path / "out.jsonl") == [{"id": i, "double": 2 * i} for i in range(10)]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


@pytest.mark.parametrize("num_records,world_size,chunk_size",
                         [(7, 2, 64), (1, 2, 64), (0, 2, 4), (10, 3, 2), (100, 8, 64), (9, 8, 1)])
def test_process_in_chunks_gives_every_rank_an_equal_share(tmp_path, num_records, world_size,
                                                           chunk_size):
    """Ranks simulated one after the other in this process (no process group: no barriers); rank 0
    last, since it merges. Every rank's share is within one chunk's rounding of the others', every
    record is processed once, and the output is in input order."""
    records = [{"id": i} for i in range(num_records)]
    done_by = {}

    def process(chunk, rank):
        # never called for an empty chunk, never over chunk_size
        assert chunk and len(chunk) <= chunk_size
        done_by.update({r["id"]: rank for r in chunk})
        return [{**r, "rank": rank} for r in chunk]

    for rank in reversed(range(world_size)):
        process_in_chunks(records, tmp_path / "out.jsonl", lambda chunk: process(chunk, rank),
                          Dist(rank, rank, world_size, torch.device("cpu")), chunk_size=chunk_size)
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == list(range(num_records)) and len(done_by) == num_records
    shares = [sum(rank == r for r in done_by.values()) for rank in range(world_size)]
    chunks_per_rank = math.ceil(num_records / (world_size * chunk_size))
    # each of a rank's chunks is at most one record short
    assert max(shares) - min(shares) <= chunks_per_rank
    if num_records >= world_size:
        assert min(shares) > 0  # nobody idles while another rank works
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_process_in_chunks_under_torchrun_every_rank_works_or_finishes(tmp_path):
    """Two real ranks (gloo): 7 records split 4 + 3, and 1 record, which leaves rank 1 nothing to
    do; it must still reach the barriers (else rank 0 would wait into the timeout) and the output
    is right."""
    script = tmp_path / "chunks.py"
    script.write_text(f"""import sys
sys.path.insert(0, {str(ROOT)!r})
from parallel import destroy_distributed, init_distributed
from runs import process_in_chunks
dist_info = init_distributed("cpu")
def process(chunk):
    assert chunk, "called for an empty chunk"
    return [{{**r, "rank": dist_info.rank}} for r in chunk]
for n in (7, 1):
    process_in_chunks([{{"id": i}} for i in range(n)], {str(tmp_path)!r} + f"/out{{n}}.jsonl",
                      process, dist_info, chunk_size=64)
destroy_distributed()
""")
    run_script([str(script)], nproc=2, timeout=120)
    seven, one = read_jsonl(tmp_path / "out7.jsonl"), read_jsonl(tmp_path / "out1.jsonl")
    assert seven == [{"id": i, "rank": 0 if i < 4 else 1} for i in range(7)]
    assert one == [{"id": 0, "rank": 0}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunks.py", "out1.jsonl", "out7.jsonl"]


@pytest.mark.parametrize("outcome", ["done", "error"])
def test_ranks_leave_without_interpreter_teardown(outcome, tmp_path):
    """Under torchrun, run_cli leaves with os._exit once main() returns or fails: an FSDP run keeps
    the gloo group alive past destroy_process_group, and its threads racing the interpreter's
    teardown aborted a rank now and then in CI after the work was done. The atexit handlers still
    run (wandb's finish, a verifier's own: their file must appear); the teardown does not (an
    object's __del__, which it would call, must not write its file). The printed lines come out
    and the exit status is main()'s."""
    script = tmp_path / "leave.py"
    script.write_text(f"""import atexit, pathlib, sys
sys.path.insert(0, {str(ROOT)!r})
import torch
from torch.distributed.fsdp import fully_shard
from parallel import destroy_distributed, init_distributed
from runs import InputError, run_cli
class Teardown:
    def __del__(self):
        pathlib.Path({str(tmp_path)!r}, f"teardown{{self.rank}}").touch()
def main():
    dist_info = init_distributed("cpu")
    layer = torch.nn.Linear(4, 4)
    fully_shard(layer)
    layer(torch.ones(2, 4)).sum().backward()
    atexit.register(pathlib.Path({str(tmp_path)!r}, f"atexit{{dist_info.rank}}").touch)
    global marker
    marker = Teardown()
    marker.rank = dist_info.rank
    print(f"rank {{dist_info.rank}} done", end="")  # no newline: flushed by run_cli, not by print
    if {outcome!r} == "error":
        raise InputError("bad input")
    destroy_distributed()
run_cli(main)
""")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(script)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ("rank 0 done" in result.stdout) and ("rank 1 done" in result.stdout), result.stdout
    assert sorted(p.name for p in tmp_path.glob("atexit*")) == ["atexit0", "atexit1"]
    assert list(tmp_path.glob("teardown*")) == []
    if outcome == "done":
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        assert result.returncode != 0  # torchrun reports a failed rank with its own status
        assert "[rank 0] error: bad input" in result.stderr
        assert "exitcode  : 2" in result.stderr


def test_jsonl_roundtrip_atomic_and_errors_name_the_line(tmp_path):
    path = tmp_path / "x.jsonl"
    write_jsonl(path, [{"a": 1}, {"text": "héllo ✓"}])
    assert read_jsonl(path) == [{"a": 1}, {"text": "héllo ✓"}]
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]  # no temp file left behind
    atomic_write_text(path, '{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(ValueError, match=r"x.jsonl:3"):
        read_jsonl(path)
    atomic_write_text(path, '[1, 2]\n')
    with pytest.raises(ValueError, match=r"x.jsonl:1: expected a JSON object"):
        read_jsonl(path)
    path.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(InputError, match=r"x.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 11\)"):
        read_jsonl(path)


def test_user_errors_are_one_line_without_traceback(tmp_path):
    """run_cli: an InputError or a missing file becomes `error: ...` and exit status 2; a bug keeps
    its traceback."""
    code = "from runs import run_cli\nfrom tokens import load_tokenizer\n"
    missing = code + "run_cli(lambda: load_tokenizer({path!r}))".format(path=str(tmp_path / "nope"))
    result = subprocess.run([sys.executable, "-c", missing], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {tmp_path / 'nope'}: no such model folder "
                                     "(expected a local Hugging Face checkpoint folder)")
    bug = "from runs import run_cli\nrun_cli(lambda: 1 / 0)"
    result = subprocess.run([sys.executable, "-c", bug], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr


def test_checkpoint_save_cleans_crashed_temp_folders_and_uses_usual_permissions(tmp_path):
    model = Transformer.from_config(tiny_config(40))
    stale = tmp_path / ".ckpt.abc123"  # what a save killed mid-way leaves behind
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    umask = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "ckpt")
    finally:
        os.umask(umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "ckpt" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "ckpt" / "config.json").stat().st_mode & 0o777 == 0o644
