"""Shared utilities for every stage: distributed start-up, devices, seeding, schedules,
JSONL I/O (atomic writes), metrics, FSDP2/DDP wrapping and HF-format checkpoints.

Numerics do not live here (the model is in model.py, log-probs in rlhf_kernels/logprob.py, each loss
in the stage that owns it); this module is the plumbing the stages share.
"""
import argparse
import json
import math
import os
import pickle
import random
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------
# User errors: a bad flag, file or record is reported as one line naming what to fix, and the stage
# exits with status 2; anything else is a bug and keeps its traceback.


class InputError(ValueError):
    """Bad input from the user (a missing file, a malformed record, settings that do not match a
    run's earlier ones). `run_cli` prints it as one line without a traceback."""


def run_cli(main):
    """Run a stage's main(): InputError and FileNotFoundError become `error: ...` on stderr, exit 2;
    Ctrl-C (KeyboardInterrupt) becomes one line saying how to resume, exit 130 (128 + SIGINT)."""
    rank = int(os.environ.get("RANK", 0))
    try:
        main()
    except (InputError, FileNotFoundError) as error:
        prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        print(f"{prefix}error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        # Under torchrun every rank gets the SIGINT: one line, from rank 0. Every output is written
        # atomically (a temp file, then a rename) and each stage skips the work already written, so
        # nothing finished is lost and nothing half-written is left behind.
        if rank == 0:
            print("\ninterrupted: the outputs finished so far are kept; rerun the same command to resume "
                  "(finished work is skipped; an unfinished training run starts over)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        if dist.is_initialized():
            # No destroy_process_group: it may wait on a rank that is gone. Skip the interpreter's
            # teardown too, for the same reason; the OS closes the connections.
            os._exit(130)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------
# Flag values are checked by argparse itself (`type=` below), so a bad one stops the stage at once
# with `error: argument --lr: must be > 0, got -1` (exit status 2), before any work or any file.


def checked_number(kind, must, ok):
    """An argparse `type=`: the flag's text converted by `kind` (int or float), accepted when finite and
    ok(value); otherwise an ArgumentTypeError saying what the value `must` be. Also takes a number
    (settings read back from a file, which argparse does not convert: dpo.resolve_settings)."""

    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            value = None
        if value is None or kind is int and not isinstance(text, str) and value != text:  # 2.5 read back is no int
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {must}, got {text}")
        return value

    return parse


positive_int = checked_number(int, "≥ 1", lambda n: n >= 1)                       # counts, sizes, lengths, steps
non_negative_int = checked_number(int, "≥ 0", lambda n: n >= 0)                   # 0: off or automatic
positive_float = checked_number(float, "> 0", lambda x: x > 0)                    # rates, β, epochs
non_negative_float = checked_number(float, "≥ 0", lambda x: x >= 0)               # 0: off
fraction = checked_number(float, "in [0, 1]", lambda x: 0 <= x <= 1)              # warmup ratio, min-p
positive_fraction = checked_number(float, "in (0, 1]", lambda x: 0 < x <= 1)      # top-p (1: off)
dropout_probability = checked_number(float, "in [0, 1)", lambda x: 0 <= x < 1)
step_limit = checked_number(int, "≥ 1, or -1 for no limit", lambda n: n >= 1 or n == -1)


# ----------------------------------------------------------------------------------------------
# JSONL: one JSON object per line. Reads name the file and line of a bad record; writes are atomic
# (temp file in the same folder + os.replace) so a crash never leaves a half-written file behind.


def read_jsonl_numbered(path):
    """[(1-based line number, record)] of a JSONL file, blank lines skipped. The file is decoded line
    by line, so a byte that is not UTF-8 or a line that is not a JSON object raises InputError naming
    the file and the line (not a bare UnicodeDecodeError); a missing file raises FileNotFoundError."""
    numbered = []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{line_number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            numbered.append((line_number, record))
    return numbered


def read_jsonl(path):
    """The list of records (dicts) in a JSONL file; errors as in read_jsonl_numbered."""
    return [record for _, record in read_jsonl_numbered(path)]


def atomic_write_text(path, text):
    """Write text to path atomically: a temp file beside it, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_jsonl(path, records):
    """Write records (dicts) as JSONL, atomically. Non-ASCII text is kept as UTF-8."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


class MetricsLogger:
    """Per-step metrics as JSONL (rank 0 only). A log, so lines are appended and flushed as they
    come; a rerun of a stage starts the file afresh, and one that resumes after step `resume_step`
    (load_training_state) keeps the lines up to that step.

    report_to "wandb" or "tensorboard" (--report-to, add_tracking_flags) also sends each line's
    numbers, with `step` as the x-axis, to one tracker run named `run_name` whose config is the
    stage's settings (`config`). Its files sit beside the JSONL: OUT/wandb/ (the project is
    $WANDB_PROJECT, default "online-rlhf"; WANDB_MODE=offline keeps it on disk) or OUT/tensorboard/.
    A resume continues the tracker's run as the JSONL: wandb the same run (its id is kept in
    OUT/wandb/run_id), TensorBoard with the events after `resume_step` purged, so no step shows twice.
    The package is imported only here, when asked; add_tracking_flags checked it is installed."""

    def __init__(self, path, enabled=True, report_to="none", run_name=None, config=None, resume_step=0):
        self.file = self.wandb_run = self.tensorboard = None
        if not enabled or path is None:
            return
        folder = Path(path).parent
        folder.mkdir(parents=True, exist_ok=True)
        kept = [line for line in read_jsonl(path) if line["step"] <= resume_step] if resume_step and Path(path).exists() else []
        self.file = open(path, "w", encoding="utf-8")
        self.file.writelines(json.dumps(line) + "\n" for line in kept)
        config = json.loads(json.dumps(config or {}, default=str))  # JSON-safe: paths (and anything else) as text
        if report_to == "wandb":
            import wandb
            # No symlinks (wandb/latest-run, debug.log): saving the checkpoint copies OUT's files into
            # the new folder, and a copy would follow them and store the run twice.
            id_file = folder / "wandb" / "run_id"
            run_id = id_file.read_text().strip() if resume_step and id_file.exists() else None
            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "online-rlhf"), name=run_name,
                                        config=config, dir=folder, settings=wandb.Settings(symlink=False),
                                        id=run_id, resume="allow" if run_id else None)
            atomic_write_text(id_file, self.wandb_run.id + "\n")
        elif report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            # TensorBoard names a run by its folder (`tensorboard --logdir runs/NAME` lists sft/tensorboard,
            # online/iter2/policy/tensorboard, ...); the name and the settings are also kept as text.
            # purge_step: the events of the steps after resume_step (all of them on a fresh start) are hidden
            self.tensorboard = SummaryWriter(folder / "tensorboard", purge_step=resume_step + 1)
            self.tensorboard.add_text("run_name", run_name or str(folder))
            self.tensorboard.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")  # markdown: keep the layout

    def log(self, **metrics):
        if self.file is not None:
            self.file.write(json.dumps(metrics) + "\n")
            self.file.flush()
        scalars = {name: value for name, value in metrics.items() if name != "step" and isinstance(value, (int, float))}
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=metrics["step"])
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, metrics["step"])
            self.tensorboard.flush()  # like the JSONL: a crashed run keeps every step logged so far

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


# ----------------------------------------------------------------------------------------------
# Distributed start-up: the same script runs as `python x.py` (one process) or under
# `torchrun --nproc_per_node N x.py`, which sets RANK / LOCAL_RANK / WORLD_SIZE.

@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device=None, timeout_minutes=None):
    """Start the process group if launched by torchrun (NCCL on GPU, gloo on CPU); pick the device.
    `device` overrides the choice ("cpu" / "cuda"). The collective timeout is long (default 60 min,
    env RLHF_DIST_TIMEOUT_MIN): one rank may sample or save a checkpoint while the others wait."""
    rank, local_rank, world_size = (int(os.environ.get(k, d)) for k, d in
                                    (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        minutes = timeout_minutes or float(os.environ.get("RLHF_DIST_TIMEOUT_MIN", 60))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=minutes))
    return Dist(rank, local_rank, world_size, dev)


def destroy_distributed():
    """Wait for every rank, then take the process group down: a rank that tears its connections down
    while another still talks to it can abort the other (gloo: "terminate called ...")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def barrier():
    """Wait for every rank (nothing to wait for in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def emulating_gpu():
    """RLHF_EMULATE_GPU=1: a CPU process takes the decisions a GPU run takes (bf16 compute, fused AdamW,
    the log-prob kernel's GPU chunk width), so that memory_trace.py's fake-tensor trace of a stage's
    step on the CPU shows what the step holds on a GPU."""
    return os.environ.get("RLHF_EMULATE_GPU") == "1"


def default_dtype(device):
    """bf16 on GPUs that support it (training keeps fp32 master weights, see wrap_model), fp32 on CPU
    (bf16 there too when emulating_gpu())."""
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported() or emulating_gpu():
        return torch.bfloat16
    return torch.float32


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def process_in_chunks(records, out_path, process, dist_info, chunk_size=64, desc="processing", settings=None,
                      reports_progress=False):
    """Apply `process(list of records) -> list of records` to `records` chunk by chunk and write the
    concatenated results, in input order, to out_path (JSONL). Crash-safe and rank-count-free:
      - every rank gets an equal share, so none idles into the collective timeout while another
        works: the records are cut into n_chunks = world_size × ceil(N / (world_size × chunk_size))
        contiguous chunks whose sizes differ by at most one (none is larger than chunk_size), and
        chunk c runs on rank c % world_size. 7 records with chunk_size 64 on 2 ranks: chunks of 4
        and 3, one per rank. A chunk with no records (1 record on 2 ranks) is written as an empty
        part without calling `process`;
      - each finished chunk is written atomically to OUT.parts-n{N}-chunks{n_chunks}/{c}.jsonl, and a
        rerun skips chunks already there (so no record is lost or done twice). N and n_chunks alone
        decide the split, so a rerun whose split differs (another chunk size or rank count) starts a
        fresh folder instead of mixing two splits, and one with the same split resumes on any number
        of ranks;
      - rank 0 finally merges the chunks into out_path (atomically) and removes the parts folder;
      - `settings` (a dict: model, sampling parameters, ...) are recorded in the parts folder, and a
        resume with different settings stops (check_settings) instead of mixing the two.
    Progress (rank 0): one bar over this rank's remaining records, one per prompt in every caller. It
    advances a chunk at a time, or with reports_progress as `process(chunk, bar)` advances it itself
    (generation: as each prompt's samples end, with tokens/s beside it).
    Collective under torchrun: every rank must call it. Returns nothing; read out_path."""
    out_path = Path(out_path)
    world_size = dist_info.world_size
    n_chunks = world_size * math.ceil(len(records) / (world_size * chunk_size))

    def start(c):  # ceil(c·N / n_chunks): chunk sizes differ by at most one, larger first (a lone record goes to rank 0)
        return -(-c * len(records) // n_chunks)

    parts = out_path.with_name(f"{out_path.name}.parts-n{len(records)}-chunks{n_chunks}")
    mine = [c for c in range(n_chunks) if c % world_size == dist_info.rank]
    if settings is not None:
        check_settings(parts / "settings.json", settings, start_over=parts)
    todo = [c for c in mine if not (parts / f"{c:06d}.jsonl").exists()]
    if len(todo) < len(mine):
        print0(f"{desc}: resuming, {len(mine) - len(todo)} of {len(mine)} chunks already done")
    remaining = sum(start(c + 1) - start(c) for c in todo)
    with tqdm(total=remaining, desc=desc, unit="prompt", disable=not dist_info.is_main) as bar:
        for c in todo:
            chunk = records[start(c):start(c + 1)]
            counted = bar.n
            if not chunk:
                results = []
            else:
                results = process(chunk, bar) if reports_progress else process(chunk)
            write_jsonl(parts / f"{c:06d}.jsonl", results)
            bar.update(len(chunk) - (bar.n - counted))  # what `process` did not count itself
    if dist.is_initialized():
        dist.barrier()
    if dist_info.is_main:
        merged = [r for c in range(n_chunks) for r in read_jsonl(parts / f"{c:06d}.jsonl")]
        write_jsonl(out_path, merged)
        shutil.rmtree(parts, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def right_pad(sequences, pad_id, device=None):
    """Token lists -> (ids (B, T) right-padded, lengths (B,)). Real tokens are found through
    `lengths`, never by comparing with pad_id (pad often equals eos)."""
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.full((len(sequences), max(map(len, sequences))), pad_id, dtype=torch.long)  # width from the host lists
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids.to(device), lengths.to(device)


# ----------------------------------------------------------------------------------------------
# The training loop's pieces, shared by sft.py, train_rm.py, dpo.py and osp.py: the batch schedule,
# this rank's micro-batches, the optimizer, the autocast rule and the per-step metrics. The loops
# themselves stay in their stage files.


def cosine_lr(step, total_steps, peak_lr, warmup_ratio=0.03, min_lr_ratio=0.0):
    """Linear warmup over ceil(warmup_ratio * total) steps, then cosine decay to min_lr_ratio * peak.
    `step` counts optimizer steps from 0."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_schedule(num_items, batch_size, epochs, seed, max_steps=-1):
    """The global batches of a run, one per optimizer step: a fresh shuffle of range(num_items) each
    epoch, cut into batches of `batch_size` (an epoch's last batch may be smaller: nothing dropped,
    nothing seen twice within an epoch). Fractional `epochs` keep the first steps of the last
    epoch; `max_steps` > 0 stops earlier."""
    if num_items == 0:
        raise InputError("no training examples")
    rng = torch.Generator().manual_seed(seed)
    schedule = []
    for _ in range(math.ceil(epochs)):
        permutation = torch.randperm(num_items, generator=rng).tolist()
        schedule += [permutation[i:i + batch_size] for i in range(0, num_items, batch_size)]
    total_steps = math.ceil(epochs * math.ceil(num_items / batch_size))
    return schedule[:min(total_steps, max_steps) if max_steps > 0 else total_steps]


def rank_micro_batches(batch, rank, world_size, micro_batch_size):
    """This rank's contiguous share of a global batch of indices, cut into micro-batches. Every rank
    gets the same number of micro-batches (FSDP's collectives need it): the short ones are padded
    with -1, which callers give weight 0."""
    per_rank = math.ceil(len(batch) / (world_size * micro_batch_size)) * micro_batch_size
    padded = list(batch) + [-1] * (per_rank * world_size - len(batch))
    mine = padded[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


def make_optimizer(model, lr, weight_decay=0.0):
    """AdamW, betas (0.9, 0.95), on the trained fp32 master weights; the fused kernel on GPU."""
    fused = next(model.parameters()).device.type == "cuda" or emulating_gpu()
    trained = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters only
    return torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, fused=fused)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def autocast(model, device):
    """The one mixed-precision rule: bf16 compute on GPU over fp32 master weights. Under FSDP the
    MixedPrecisionPolicy already casts the parameters to bf16 (wrap_model); everything else (one
    device, DDP, frozen models) runs under torch.autocast. On CPU, fp32 and no autocast."""
    dtype = default_dtype(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32 and not is_fsdp(model))


def optimizer_step(model, optimizer, grad_clip):
    """Clip the global gradient norm (grad_clip 0: no clipping), step, zero the gradients. Returns
    the norm before clipping as a tensor: reading it is left to StepSums.reduce (no host sync here).
    Works on FSDP2's sharded (DTensor) gradients."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class StepSums:
    """A step's metric sums, kept on the device while its micro-batches run (no host sync per
    micro-batch); `reduce` sums them over ranks with one all-reduce and reads them with one
    device-to-host copy."""

    def __init__(self):
        self.sums = {}

    def add(self, **values):
        """Add each value's sum (a tensor of any shape, or a number) to the metric of that name."""
        for name, value in values.items():
            value = (value.detach() if torch.is_tensor(value) else torch.tensor(value, dtype=torch.float64)).double().sum()
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    def reduce(self, device, **already_global):
        """{name: float}: the sums over all ranks, plus `already_global` values (e.g. the gradient
        norm, the same on every rank) read in the same host transfer, not summed."""
        names = list(self.sums)
        summed = torch.stack([self.sums[n].to(device) for n in names]) if names else torch.zeros(0, dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(summed)
        extra = [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(1) for v in already_global.values()]
        return dict(zip(names + list(already_global), torch.cat([summed, *extra]).tolist()))


def has_model(path):
    """A checkpoint folder Transformer.from_pretrained can load (single-file or sharded weights)."""
    path = Path(path)
    return (path / "config.json").exists() and any((path / f).exists() for f in ("model.safetensors", "model.safetensors.index.json"))


def already_trained(out_dir, overwrite):
    """True (and says so) when out_dir already holds a saved model and --overwrite was not given: a
    rerun of a finished stage does nothing."""
    if has_model(out_dir) and not overwrite:
        print0(f"{out_dir} already holds a model; skipping (pass --overwrite to train it again)")
        return True
    return False


# ----------------------------------------------------------------------------------------------
# Resumable training (--save-every N): every N optimizer steps the training state goes to
# OUT.resume/step{N}/, and a rerun of the same command continues from the latest one. (Beside OUT,
# not in it: saving the model into OUT carries OUT's files over, and these are large.) The step
# count fixes everything else: the LR schedule is a function of it, and every stage's batch
# schedule is fixed by its seed, so the data position is the step.

# Flags that change no result (and the output folder, which may have moved): a resume may change them. The
# throughput ones (how a step's work is cut up and how much memory it takes) change the result only up to
# floating-point summation order: a smaller micro-batch after running out of memory is what a resume is for.
RESUME_FREE_SETTINGS = {"out", "run_dir", "log_every", "report_to", "save_every", "snapshot_every", "device", "overwrite",
                        "dry_run", "micro_batch_size", "gen_batch_size", "chunk_size", "eval_batch_size",
                        "activation_checkpointing"}


def add_resume_flag(parser):
    parser.add_argument("--save-every", type=non_negative_int, default=0,
                        help="every N optimizer steps, save the training state (model, optimizer, step, random "
                             "streams) to OUT.resume/; a rerun of the command continues from it (0: off)")


def resume_folder(out_dir):
    """OUT.resume/, beside the stage's output folder OUT."""
    return Path(out_dir).with_name(Path(out_dir).name + ".resume")


def resume_settings(args):
    """The settings a resume must share with the run it continues: every flag but RESUME_FREE_SETTINGS."""
    return {k: v for k, v in vars(args).items() if k not in RESUME_FREE_SETTINGS}


def random_streams(rng=None):
    """Every random state a training step may draw from: torch's (CPU and CUDA), Python's, numpy's,
    and a stage's own random.Random (`rng`), as tensors and plain numbers only, so that the file
    loads with torch.load(weights_only=True): a resume folder from anyone can then run no code."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                python=random.getstate(), numpy=(kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
                stage=rng.getstate() if rng else None)


def restore_random_streams(saved, rng=None):
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
    random.setstate(saved["python"])
    kind, keys, position, has_gauss, gauss = saved["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    if rng is not None:
        rng.setstate(saved["stage"])


def checkpoint_state(model, optimizer):
    """The model's trainable weights and the optimizer's state, as torch.distributed.checkpoint saves
    and loads them: FSDP2's shards stay shards (each rank writes and reads its own), and a frozen
    LoRA base is left out (it is reloaded from the base model: hence strict=False on loading; DCP's
    load itself fails on any requested entry the checkpoint lacks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optimizer": optimizer_state}, options


@contextmanager
def single_process_checkpoint():
    """DCP in one process (no process group) works, but warns that it assumes so at every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_training_state(out_dir, step, total_steps, model, optimizer, args, rng=None):
    """Called after every optimizer step; when `step` is a multiple of --save-every (and not the last
    step: the stage saves its model then), the training state goes to OUT.resume/step{step}/: the
    model and the optimizer by torch.distributed.checkpoint, each rank's random streams, and
    state.json (the step, the world size, the settings). Atomic: written to step{step}.tmp/ and
    renamed once every rank has written, then the older ones removed, so a crash during a save
    leaves the previous one whole. Collective: call it on every rank."""
    if not args.save_every or step % args.save_every or step == total_steps:
        return
    import torch.distributed.checkpoint as dcp
    settings = resume_settings(args)
    root = resume_folder(out_dir)
    temporary = root / f"step{step}.tmp"
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)  # a save that crashed half-way
    barrier()
    state, _ = checkpoint_state(model, optimizer)
    with single_process_checkpoint():
        dcp.save(state, checkpoint_id=temporary, no_dist=not dist.is_initialized())
    torch.save(random_streams(rng), temporary / f"random_rank{rank}.pt")
    barrier()
    if rank == 0:
        atomic_write_text(temporary / "state.json", json.dumps(dict(step=step, world_size=world_size, settings=settings),
                                                               indent=2, default=str) + "\n")
        temporary.rename(root / f"step{step}")
        for old in saved_states(out_dir)[:-1]:
            shutil.rmtree(old)
    barrier()


def saved_states(out_dir):
    """The finished training states in OUT.resume/, oldest first."""
    found = [p for p in resume_folder(out_dir).glob("step*") if p.name[4:].isdigit() and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[4:]))


def load_training_state(out_dir, model, optimizer, args, rng=None):
    """Load the latest state in OUT.resume/ (if any) into model, optimizer and the random streams;
    returns the steps it was saved after (0: start from scratch). The stage's flags must be those it
    was saved with (resume_settings). Another world size is fine: DCP reshards the weights and the
    optimizer; only the random streams (one per rank) start afresh, so the run is then no longer
    identical to an uninterrupted one, and it says so."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    found = saved_states(out_dir)
    if not found:
        return 0
    latest = found[-1]
    saved = json.loads((latest / "state.json").read_text())
    settings = json.loads(json.dumps(resume_settings(args), default=str))
    changed = [f"{k} {saved['settings'].get(k)!r} → {v!r}" for k, v in sorted(settings.items()) if saved["settings"].get(k) != v]
    if changed:
        raise InputError(f"{latest} was saved with other settings ({'; '.join(changed)}): rerun with those to continue, "
                         f"or delete {latest.parent} to train from the start")
    state, options = checkpoint_state(model, optimizer)
    with single_process_checkpoint():
        dcp.load(state, checkpoint_id=latest, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    streams = None
    if saved["world_size"] == world_size:
        try:  # tensors and numbers only: a file that would run code when unpickled is refused
            streams = torch.load(latest / f"random_rank{rank}.pt", weights_only=True)
        except pickle.UnpicklingError:
            print0(f"resuming after step {saved['step']} from {latest}, whose random streams were saved by an older "
                   "version as a pickle that could run code when loaded: they are not loaded and start afresh, so "
                   "the result will not be bit-identical to an uninterrupted run")
            return saved["step"]
    if streams is not None:
        restore_random_streams(streams, rng)
        print0(f"resuming after step {saved['step']} from {latest}")
    else:
        print0(f"resuming after step {saved['step']} from {latest}, saved by {saved['world_size']} ranks, on {world_size}: "
               "the weights and optimizer state are resharded; the random streams (one per rank) start afresh, so the "
               "result will not be bit-identical to an uninterrupted run")
    return saved["step"]


def finish_training_state(out_dir):
    """After the final save: the stage is done, its resume states go (rank 0)."""
    if int(os.environ.get("RANK", 0)) == 0:
        shutil.rmtree(resume_folder(out_dir), ignore_errors=True)


def check_settings(path, settings, start_over):
    """Record at `path` (JSON) the settings an output is made with; when that record exists (a rerun,
    or a resume after a crash), stop unless the settings are the same, so one output never mixes
    two sets of settings and a finished step's record is never rewritten. `start_over` tells the
    user what to delete to redo the step with the new settings."""
    path = Path(path)
    settings = json.loads(json.dumps(settings))  # compare as JSON would store them (tuples → lists)
    if not path.exists():
        if int(os.environ.get("RANK", 0)) == 0:
            atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
        return
    saved = json.loads(path.read_text())
    changed = [f"{k} {saved.get(k)!r} → {v!r}" for k, v in sorted(settings.items()) if saved.get(k) != v]
    if changed:
        raise InputError(f"{path.parent} was made with other settings ({'; '.join(changed)}, recorded in {path}): rerun with "
                         f"the recorded values to continue, or delete {start_over} to start it over with the new ones")


# ----------------------------------------------------------------------------------------------
# Data parallelism: FSDP2 (`fully_shard` each decoder block, then the root) or DDP.


def wrap_model(model, mode, device, param_dtype=None):
    """mode: "fsdp" | "ddp" | "none". The model's own parameters stay fp32 (the optimizer's master
    weights); FSDP casts them to `param_dtype` (bf16 on GPU) for compute and reduces grads in fp32.
    A model on the meta device is sharded there (nothing is allocated): see load_for_training."""
    if mode == "none" or not dist.is_initialized():
        return model.to(device)
    if mode == "ddp":
        model.to(device)
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode != "fsdp":
        raise ValueError(f"unknown parallel mode {mode!r} (fsdp, ddp, none)")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype or torch.float32, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def load_for_training(path, parallel, dist_info, head="lm", scratch=False, activation_checkpointing=False, lora=None,
                      adapter=None):
    """The model a stage trains: fp32 master weights, activation checkpointing set, wrapped for data
    parallelism. `scratch`: a random init from path's config.json instead of its weights.
    `lora` (model.LoRASettings): adapters on the target Linears, everything else frozen in the
    compute dtype (model.Transformer.add_lora); `adapter`: a PEFT adapter folder to start from (its
    settings must equal `lora`'s).

    Under FSDP, the torchtitan order, so that no rank but one ever holds the full model: every rank
    builds the model on the meta device (no memory), shards each block then the root, and
    allocates only its own shards (to_empty); rank 0 alone reads the checkpoint (or draws the
    random init) into host memory and broadcasts it, each rank keeping its shards
    (set_model_state_dict with broadcast_from_rank0). For Llama-3-8B that is one 32 GB host copy
    on the node instead of 8, and no rank ever moves a full model to its GPU."""
    from model import ModelConfig, Transformer

    device, param_dtype = dist_info.device, default_dtype(dist_info.device)

    def read_full():
        # with LoRA the frozen base is read straight into the compute dtype (no fp32 copy of it)
        dtype = param_dtype if lora is not None else torch.float32
        model = Transformer.from_config(path, head=head, dtype=dtype) if scratch else \
            Transformer.from_pretrained(path, head=head, dtype=dtype)
        if lora is not None and adapter is not None:
            add_adapter(model, adapter, param_dtype, expected=lora)
        elif lora is not None:
            model.add_lora(lora, frozen_dtype=param_dtype)
        return model

    if parallel != "fsdp" or not dist.is_initialized():
        model = read_full()
        model.set_activation_checkpointing(activation_checkpointing)
        return wrap_model(model, parallel, device, param_dtype)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model = materialize(build_on_meta(ModelConfig.from_path(path), head, "fsdp", param_dtype, activation_checkpointing, lora), device)
    full_state = read_full().state_dict() if dist_info.is_main else {}
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full_state
    return model


def add_adapter(model, folder, frozen_dtype, expected=None):
    """`model` + the PEFT LoRA adapter saved in `folder` (model.add_lora with its settings, which must be
    `expected`'s when given; the rest frozen in `frozen_dtype`). An adapter tensor that fits no adapted
    Linear is an error: loaded leniently, B would stay 0 and the model silently be the base."""
    from model import read_adapter

    lora, state = read_adapter(folder)
    if expected is not None and lora != expected:
        raise InputError(f"{folder}: its LoRA settings {lora} differ from the run's {expected}")
    model.add_lora(lora, frozen_dtype=frozen_dtype)
    device = next(model.parameters()).device
    unexpected = model.load_state_dict({name: t.to(device) for name, t in state.items()}, strict=False).unexpected_keys
    if unexpected:
        raise InputError(f"{folder}: tensors {unexpected[:3]} fit no adapter of the model")
    return model


def load_frozen(path, parallel, dist_info, head="lm"):
    """A frozen model (a reference or a judge): eval mode, no gradients, weights in the compute dtype
    (bf16 on a GPU). Under FSDP it is sharded like a policy (each rank holds 1/W of it, gathered
    layer by layer in its forward; `gathered` makes it whole for sampling or judging); otherwise a
    full copy on every rank."""
    from model import ModelConfig, Transformer

    device, dtype = dist_info.device, default_dtype(dist_info.device)
    if parallel != "fsdp" or not dist.is_initialized():
        return Transformer.from_pretrained(path, device=device, dtype=dtype, head=head).eval().requires_grad_(False)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model = materialize(build_on_meta(ModelConfig.from_path(path), head, "fsdp", dtype, frozen=True), device)
    full_state = Transformer.from_pretrained(path, head=head, dtype=dtype).state_dict() if dist_info.is_main else {}
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model.eval()


@contextmanager
def gathered(model):
    """Inside this block an FSDP model is whole on every rank (all-gathered once, in the compute
    dtype) and its forwards run no collectives, as ZeRO-3 stacks do for generation: sampling calls
    the model a different number of times on each rank (its responses end at different lengths), so
    per-layer all-gathers in every decode step would deadlock, besides costing one all-gather per
    layer per token. Its parameters are resharded on exit. Other models: nothing to do."""
    if not is_fsdp(model):
        yield model
        return
    modules = [m for m in model.modules() if is_fsdp(m)]
    # FSDP makes the first module to run a forward the root. Sampling runs the blocks outside the
    # root's forward (generate.prefill calls hidden_states), so settle the root role now (private API).
    model._get_fsdp_state()._lazy_init()
    model.set_reshard_after_forward(False)
    for module in modules:
        module.unshard()
    try:
        yield model
    finally:
        for module in modules:
            module.reshard()
        model.set_reshard_after_forward(True)             # the blocks' setting (wrap_model's default) ...
        model.set_reshard_after_forward(False, recurse=False)  # ... and the root's: kept for the backward


def build_on_meta(config, head, parallel, param_dtype, activation_checkpointing=False, lora=None, frozen=False):
    """A model built on the meta device (no memory) as a stage will train or use it: LoRA adapters
    added (the base in param_dtype), or all of it frozen in param_dtype (`frozen`: a reference or a
    judge), checkpointing set, sharded with FSDP2 when parallel == "fsdp". Step one of loading under
    FSDP (load_for_training, load_frozen), and of memory_trace.py's fake-tensor trace of any stage."""
    from model import Transformer

    with torch.device("meta"):
        model = Transformer(config, head=head)
        if lora is not None:
            model.add_lora(lora, frozen_dtype=param_dtype)
        if frozen:
            model = model.to(param_dtype).requires_grad_(False).eval()
    model.set_activation_checkpointing(activation_checkpointing)
    return wrap_model(model, "fsdp", torch.device("meta"), param_dtype) if parallel == "fsdp" else model


def materialize(model, device):
    """Allocate a meta-built model's (local shards of) parameters on `device`, uninitialised, and
    recompute its one buffer (rope's inverse frequencies: not in the state dict)."""
    from model import rope_inverse_frequencies

    model.to_empty(device=device)
    model.inv_freq = rope_inverse_frequencies(model.config).to(device)
    return model


def add_tracking_flags(parser):
    """--report-to, shared by sft, train_rm, dpo and osp: where MetricsLogger also sends the metrics."""
    parser.add_argument("--report-to", type=installed_tracker, choices=("none", "wandb", "tensorboard"), default="none",
                        help="also send every step's metrics (as in metrics.jsonl) and the run's settings to Weights & Biases "
                             "(files in OUT/wandb; project $WANDB_PROJECT, default online-rlhf) or TensorBoard (OUT/tensorboard)")


def installed_tracker(name):
    """argparse `type=` of --report-to: the name, once the tracker's package is installed (checked at
    parse time, before any work; MetricsLogger imports it later, on rank 0 only)."""
    from importlib.util import find_spec

    if name in ("wandb", "tensorboard") and find_spec(name) is None:
        raise argparse.ArgumentTypeError(f"{name} is not installed; run: pip install {name}")
    return name


def add_lora_flags(parser):
    """LoRA's flags, shared by sft, train_rm, dpo and osp."""
    from model import LORA_TARGETS

    parser.add_argument("--lora-rank", type=non_negative_int, default=0,
                        help="train LoRA adapters of this rank instead of every weight (0: full fine-tuning; paper 2: 64)")
    parser.add_argument("--lora-alpha", type=positive_float, default=None,
                        help="LoRA scale alpha (update × alpha / rank; default: 2 × rank; paper 2: 32)")
    parser.add_argument("--lora-dropout", type=dropout_probability, default=0.0, help="dropout on the adapters' input")
    parser.add_argument("--lora-targets", type=lora_target_list, default=",".join(t.removesuffix("_proj") for t in LORA_TARGETS),
                        help="comma-separated Linears that get adapters, among q,k,v,o,gate,up,down")
    parser.add_argument("--save-adapter", action="store_true",
                        help="with LoRA: also write the adapter alone in PEFT's format to OUT/adapter (the model is saved merged)")


def lora_target_names(text):
    """'q,v,down' -> ('down_proj', 'q_proj', 'v_proj'): the Linears LoRA adapts (model.LORA_TARGETS)."""
    return tuple(sorted(t.strip() + "_proj" for t in text.split(",") if t.strip()))


def lora_target_list(text):
    """argparse `type=` of --lora-targets: the text itself, once every name is known (checked at parse time)."""
    from model import LORA_TARGETS

    unknown = [t.removesuffix("_proj") for t in lora_target_names(text) if t not in LORA_TARGETS]
    if unknown or not lora_target_names(text):
        raise argparse.ArgumentTypeError(f"unknown {unknown or 'none given'} in {text!r}; choose among q,k,v,o,gate,up,down")
    return text


def lora_settings(args):
    """model.LoRASettings from add_lora_flags' flags (their values already checked by their types), or
    None without --lora-rank."""
    from model import LoRASettings

    if not args.lora_rank:
        return None
    targets = lora_target_names(args.lora_targets)
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
    return LoRASettings(args.lora_rank, float(alpha), args.lora_dropout, targets)


def add_scale_flags(parser):
    """The flags every training stage shares for running at scale (sft, train_rm, dpo, osp)."""
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="recompute each decoder block in the backward (default: on with CUDA, off on CPU)")
    parser.add_argument("--save-dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="dtype of the saved weights (auto: the compute dtype, bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the per-rank memory plan for these settings and exit, loading nothing")


def scale_settings(args, device):
    """(activation_checkpointing, save dtype) from add_scale_flags' flags, for this device."""
    checkpointing = args.activation_checkpointing if args.activation_checkpointing is not None else device.type == "cuda"
    save_dtype = default_dtype(device) if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
    return checkpointing, save_dtype


def unwrap(model):
    """The Transformer inside a DDP wrapper (FSDP2 shards the module in place, so it is itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def is_fsdp(model):
    return hasattr(model, "set_requires_gradient_sync")


def gradient_sync(model, sync):
    """Context for one micro-batch of gradient accumulation. DDP: skip the gradient all-reduce on
    all but the last micro-batch (no_sync), which costs nothing extra since DDP keeps full
    gradients anyway. FSDP: reduce-scatter after every micro-batch, so each rank only ever holds
    its gradient shard; skipping it would keep unsharded fp32 gradients between micro-batches
    (+32 GiB per rank for an 8B model)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    return nullcontext()


def full_state_dict(model, dtype=None):
    """The whole model's state dict on rank 0, on CPU, cast to `dtype` (default: as trained); an
    empty dict on other ranks under FSDP. Under FSDP the shards are gathered one tensor at a time
    and cast on the way, so rank 0 holds one copy in the saved dtype plus one tensor in flight (not
    an fp32 copy and then a bf16 one). Every rank must call it."""
    if not is_fsdp(model):
        return {k: v.detach().to("cpu", dtype or v.dtype) for k, v in unwrap(model).state_dict().items()}
    state = {}
    for name, tensor in model.state_dict().items():
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # collective
        if dist.get_rank() == 0:
            state[name] = full.detach().to("cpu", dtype or full.dtype)
        del full
    return state


def save_checkpoint(model, out_dir, tokenizer, source_dir=None, dtype=None, save_adapter=False):
    """A full HF-format folder (config, safetensors, tokenizer, generation config) written by rank 0,
    weights in `dtype` (default: as trained). A LoRA model is saved merged, W + s·BA computed in fp32
    from W as `source_dir` stores it (the model holds its frozen W in the compute dtype, bf16 on a GPU,
    which would round most of a small update away) and cast once to `dtype`; the weights LoRA did not
    touch are the source's, bit for bit when `dtype` is theirs. With `save_adapter` the adapter also
    goes to OUT/adapter in PEFT's format (fp32). Collective: call it on every rank."""
    from model import save_adapter as write_adapter
    from model import stored_tensors

    # cast on the way (one copy in the saved dtype), except LoRA's: merged in fp32 first
    state = full_state_dict(model, dtype if unwrap(model).lora is None else None)
    if int(os.environ.get("RANK", 0)) == 0:
        lora = unwrap(model).lora
        if lora is not None and source_dir is not None:  # the frozen weights as stored, not as computed with
            frozen = {name for name in state if not name.endswith((".lora_A", ".lora_B")) and name != "score.weight"}
            # only where the model's frozen tensor is the stored one in its compute dtype (sft.py --scratch
            # trains adapters on a random base, which no file holds)
            for name, tensor in stored_tensors(source_dir, frozen):
                if torch.equal(tensor.to(state[name].dtype), state[name]):
                    state[name] = tensor
        if lora is not None and save_adapter:
            write_adapter(Path(out_dir) / "adapter", state, lora, unwrap(model).head, base_model=source_dir)
        unwrap(model).save_pretrained(out_dir, state_dict=state, dtype=dtype, tokenizer=tokenizer)
        generation_config = Path(source_dir or "", "generation_config.json")
        if source_dir is not None and generation_config.exists():
            atomic_write_text(Path(out_dir, "generation_config.json"), generation_config.read_text())
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Tokenizer and chat formatting.
#
# Token boundary rule (the one place it is decided): a (prompt, response) pair is encoded as
#     encode(render(prompt, add_generation_prompt=True)) + encode(response) + end_of_turn_ids
# with the prompt text and the response text tokenized SEPARATELY. Generation sees exactly the
# prompt ids and then produces response tokens one by one, so no BPE merge can ever straddle the
# boundary; encoding the two texts separately reproduces that split at training time (tokenizing
# the concatenated string could merge the last prompt characters with the first response ones).
# `add_special_tokens=False` everywhere: the chat template itself writes BOS where the model wants it.
#
# A reward model is the exception (encode_rendering): it reads text that already exists, so it gets
# the template's whole rendering of the finished conversation tokenized as one text, exactly what
# transformers' apply_chat_template returns, and its reward is read at that rendering's last token.


def load_tokenizer(path):
    """The checkpoint's tokenizer with its chat template (tokenizer_config.json or chat_template.jinja)."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():  # else transformers takes the path for a hub repo id and says so confusingly
        raise FileNotFoundError(f"{path}: no such model folder (expected a local Hugging Face checkpoint folder)")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        # Padding positions are always masked by explicit lengths, never found by comparing ids
        # (pad may equal eos in many checkpoints), so any id is safe here.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def render_chat(tokenizer, messages, add_generation_prompt):
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template: add one "
                         "(chat_template.jinja or tokenizer_config.json['chat_template'])")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_text(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def closing_ids(tokenizer):
    """The ids the chat template writes after the last assistant message's text, to the end of its
    rendering: <|im_end|> and a newline for ChatML, <|eot_id|> for Llama-3, </s> for Mistral. The
    last of them ends every full rendering (encode_rendering): the token a reward model is read at."""
    probe = "PROBE"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
    text = render_chat(tokenizer, messages, add_generation_prompt=False)
    return encode_text(tokenizer, text[text.rindex(probe) + len(probe):])


def end_of_turn_ids(tokenizer):
    """The ids the chat template writes right after an assistant message, up to and including its
    first special token (e.g. <|im_end|>, <|eot_id|>, </s>). This is what the model must learn to
    emit to end its turn, and what generation stops on. Falls back to [eos] if the template writes
    no special token there."""
    suffix_ids = closing_ids(tokenizer)
    special = set(tokenizer.all_special_ids)
    for i, token in enumerate(suffix_ids):
        if token in special:
            return suffix_ids[: i + 1]
    return [tokenizer.eos_token_id]


def stop_token_ids(tokenizer):
    """Tokens that end a generated response: the end-of-turn token and eos."""
    return sorted({end_of_turn_ids(tokenizer)[-1], tokenizer.eos_token_id})


def encode_prompt(tokenizer, messages):
    """Prompt ids exactly as generation is fed them: the chat template with the assistant header."""
    return encode_text(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=True))


def encode_response(tokenizer, response, end_of_turn=None):
    """Response ids: the response text tokenized alone, then the end-of-turn token(s)."""
    return encode_text(tokenizer, response) + list(end_of_turn if end_of_turn is not None else end_of_turn_ids(tokenizer))


def response_ids(tokenizer, record, end_of_turn=None):
    """The token ids of each response of a samples record, as training and scoring use them: the sampler's
    own `response_ids` when the record carries them (exactly the sampled tokens, with the stop token, eos or
    end-of-turn, only when one was sampled); otherwise each text re-encoded, with the end-of-turn token
    appended unless its finish_reason says it was cut at --max-new-tokens ("length"). generate.py writes
    the ids because decoding and re-encoding is not the identity: a word sampled as two tokens can come
    back as one, and a special token sampled inside a response comes back as a turn marker."""
    if "response_ids" in record:
        return record["response_ids"]
    end_of_turn = end_of_turn if end_of_turn is not None else end_of_turn_ids(tokenizer)
    reasons = record.get("finish_reasons", ["stop"] * len(record["responses"]))
    return [encode_response(tokenizer, text, end_of_turn if reason == "stop" else [])
            for text, reason in zip(record["responses"], reasons)]


def encode_rendering(tokenizer, messages):
    """A finished conversation as a reward model reads it: the chat template's whole rendering,
    tokenized as one text. These are exactly the ids of tokenizer.apply_chat_template(messages),
    which is what transformers users feed AutoModelForSequenceClassification and what TRL's
    RewardTrainer trains on, so our reward and theirs are read at the same last token (for ChatML
    the newline after <|im_end|>, a token the policy never generates). It differs from the policy's
    split where the template does more than concatenate (Llama-3 trims each message, Mistral writes
    a space before the answer), and it needs no tokenizer or template in common with the policy."""
    return encode_text(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=False))


def encode_conversation(tokenizer, messages, end_of_turn=None):
    """A whole chat for SFT: returns (ids, is_assistant) where is_assistant[i] marks the tokens the
    loss trains on (each assistant message's content and its end-of-turn token). Every assistant
    turn is split exactly as in encode_prompt + encode_response, so SFT, DPO and generation agree.
    Requires a template whose rendering of a conversation extends its rendering of every prefix
    (true of ChatML, Llama-3, Qwen2, SmolLM2, Mistral); otherwise raises ValueError."""
    end_of_turn = end_of_turn if end_of_turn is not None else end_of_turn_ids(tokenizer)
    eot_text = tokenizer.decode(end_of_turn)
    ids, is_assistant, rendered = [], [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        if not prompt_text.startswith(rendered):
            raise ValueError("chat template does not render conversations prefix-consistently; "
                             "cannot split this multi-turn chat into prompt/response tokens")
        context_ids = encode_text(tokenizer, prompt_text[len(rendered):])
        response_ids = encode_response(tokenizer, message["content"], end_of_turn)
        ids += context_ids + response_ids
        is_assistant += [False] * len(context_ids) + [True] * len(response_ids)
        rendered = prompt_text + message["content"] + eot_text
    return ids, is_assistant
