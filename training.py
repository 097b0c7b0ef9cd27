"""The training loop's parts, shared by sft.py, train_rm.py, dpo.py and osp.py: seeding, the batch
schedule and this rank's micro-batches, the optimizer and its step under the one mixed-precision
rule, per-step metric sums, the resumable training state (--save-every), and the frozen reference's
log-probs of preference pairs (dpo.py). The loops themselves stay in their stage files, where a
reader sees each stage's step whole.
"""
import json
import math
import pickle
import random
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from losses import sequence_logps
from parallel import (all_gather_by_index, barrier, default_dtype, emulating_gpu, is_fsdp,
                      load_for_training, unwrap)
from runs import (InputError, atomic_write_text, changed_settings, is_main, non_negative_int,
                  print0, rank_and_world_size, read_jsonl, write_jsonl)
from tokens import load_tokenizer

# ----------------------------------------------------------------------------------------------
# Seeding and the data: the global batches of a run, and this rank's share of each.


def seed_everything(seed):
    """Seed every random stream a stage draws from: Python's, numpy's and torch's."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_lr(step, total_steps, peak_lr, warmup_ratio=0.03, min_lr_ratio=0.0):
    """Linear warmup over ceil(warmup_ratio * total) steps, then cosine decay to
    min_lr_ratio * peak. `step` counts optimizer steps from 0."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5
                      * (1 + math.cos(math.pi * min(1.0, progress))))


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


# ----------------------------------------------------------------------------------------------
# One optimizer step: AdamW on fp32 master weights, the autocast rule, the clipped step, and the
# step's metrics summed over micro-batches and ranks.


def make_optimizer(model, lr, weight_decay=0.0):
    """AdamW, betas (0.9, 0.95), on the trained fp32 master weights; the fused kernel on GPU."""
    fused = next(model.parameters()).device.type == "cuda" or emulating_gpu()
    trained = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters only
    return torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                             fused=fused)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def autocast(model, device):
    """The one mixed-precision rule: bf16 compute on GPU over fp32 master weights. Under FSDP the
    MixedPrecisionPolicy already casts the parameters to bf16 (wrap_model); everything else (one
    device, DDP, frozen models) runs under torch.autocast. On CPU, fp32 and no autocast."""
    dtype = default_dtype(device)
    return torch.autocast(device.type, dtype=dtype,
                          enabled=dtype != torch.float32 and not is_fsdp(model))


def optimizer_step(model, optimizer, grad_clip):
    """Clip the global gradient norm (grad_clip 0: no clipping), step, zero the gradients. Returns
    the norm before clipping as a tensor: reading it is left to StepSums.reduce (no host sync here).
    Works on FSDP2's sharded (DTensor) gradients."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                          grad_clip if grad_clip > 0 else float("inf"))
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
            if not torch.is_tensor(value):
                value = torch.tensor(value, dtype=torch.float64)
            value = value.detach().double().sum()
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    def reduce(self, device, **already_global):
        """{name: float}: the sums over all ranks, plus `already_global` values (e.g. the gradient
        norm, the same on every rank) read in the same host transfer, not summed."""
        names = list(self.sums)
        if names:
            summed = torch.stack([self.sums[n].to(device) for n in names])
        else:
            summed = torch.zeros(0, dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(summed)
        extra = [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(1)
                 for v in already_global.values()]
        return dict(zip(names + list(already_global), torch.cat([summed, *extra]).tolist()))


# ----------------------------------------------------------------------------------------------
# Resumable training (--save-every N): every N optimizer steps the training state goes to
# OUT.resume/step{N}/, and a rerun of the same command continues from the latest one. (Beside OUT,
# not in it: saving the model into OUT carries OUT's files over, and these are large.) The step
# count fixes everything else: the LR schedule is a function of it, and every stage's batch
# schedule is fixed by its seed, so the data position is the step.

# Flags that change no result (and the output folder, which may have moved): a resume may change
# them. The throughput ones (how a step's work is cut up and how much memory it takes) change the
# result only up to floating-point summation order: a smaller micro-batch after running out of
# memory is what a resume is for.
RESUME_FREE_SETTINGS = {"out", "run_dir", "log_every", "report_to", "save_every", "snapshot_every",
                        "device", "overwrite", "dry_run", "micro_batch_size", "gen_batch_size",
                        "chunk_size", "eval_batch_size", "activation_checkpointing"}


def add_resume_flag(parser):
    parser.add_argument("--save-every", type=non_negative_int, default=0,
                        help="every N optimizer steps, save the training state (model, "
                             "optimizer, step, random streams) to OUT.resume/; a rerun of the "
                             "command continues from it (0: off)")


def resume_folder(out_dir):
    """OUT.resume/, beside the stage's output folder OUT."""
    return Path(out_dir).with_name(Path(out_dir).name + ".resume")


def resume_settings(args):
    """The settings a resume must share with the run it continues: every flag but
    RESUME_FREE_SETTINGS."""
    return {k: v for k, v in vars(args).items() if k not in RESUME_FREE_SETTINGS}


def save_training_state(out_dir, step, total_steps, model, optimizer, args, rng=None):
    """Called after every optimizer step; when `step` is a multiple of --save-every (and not the
    last step: the stage saves its model then), the training state goes to OUT.resume/step{step}/:
    the model and the optimizer by torch.distributed.checkpoint, each rank's random streams, and
    state.json (the step, the world size, the settings). Atomic: written to step{step}.tmp/ and
    renamed once every rank has written, then the older ones removed, so a crash during a save
    leaves the previous one whole. Collective: call it on every rank."""
    if not args.save_every or step % args.save_every or step == total_steps:
        return
    import torch.distributed.checkpoint as dcp
    settings = resume_settings(args)
    root = resume_folder(out_dir)
    temporary = root / f"step{step}.tmp"
    rank, world_size = rank_and_world_size()
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)  # a save that crashed half-way
    barrier()
    state, _ = checkpoint_state(model, optimizer)
    with single_process_checkpoint():
        dcp.save(state, checkpoint_id=temporary, no_dist=not dist.is_initialized())
    torch.save(random_streams(rng), temporary / f"random_rank{rank}.pt")
    barrier()
    if rank == 0:
        record = json.dumps(dict(step=step, world_size=world_size, settings=settings), indent=2,
                            default=str)
        atomic_write_text(temporary / "state.json", record + "\n")
        temporary.rename(root / f"step{step}")
        for old in saved_states(out_dir)[:-1]:
            shutil.rmtree(old)
    barrier()


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
    changed = changed_settings(saved["settings"], resume_settings(args))
    if changed:
        raise InputError(f"{latest} was saved with other settings ({'; '.join(changed)}): rerun "
                         f"with those to continue, or delete {latest.parent} to train from the "
                         "start")
    state, options = checkpoint_state(model, optimizer)
    with single_process_checkpoint():
        dcp.load(state, checkpoint_id=latest, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=options)
    rank, world_size = rank_and_world_size()
    streams = None
    if saved["world_size"] == world_size:
        try:  # tensors and numbers only: a file that would run code when unpickled is refused
            streams = torch.load(latest / f"random_rank{rank}.pt", weights_only=True)
        except pickle.UnpicklingError:
            print0(f"resuming after step {saved['step']} from {latest}, whose random streams were "
                   "saved by an older version as a pickle that could run code when loaded: they "
                   "are not loaded and start afresh, so the result will not be bit-identical to an "
                   "uninterrupted run")
            return saved["step"]
    if streams is not None:
        restore_random_streams(streams, rng)
        print0(f"resuming after step {saved['step']} from {latest}")
    else:
        print0(f"resuming after step {saved['step']} from {latest}, saved by {saved['world_size']} "
               f"ranks, on {world_size}: the weights and optimizer state are resharded; the random "
               "streams (one per rank) start afresh, so the result will not be bit-identical to an "
               "uninterrupted run")
    return saved["step"]


def finish_training_state(out_dir):
    """After the final save: the stage is done, its resume states go (rank 0)."""
    if is_main():
        shutil.rmtree(resume_folder(out_dir), ignore_errors=True)


def saved_states(out_dir):
    """The finished training states in OUT.resume/, oldest first."""
    found = [p for p in resume_folder(out_dir).glob("step*")
             if p.name[4:].isdigit() and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[4:]))


def checkpoint_state(model, optimizer):
    """The model's trainable weights and the optimizer's state, as torch.distributed.checkpoint
    saves and loads them: FSDP2's shards stay shards (each rank writes and reads its own), and a
    frozen LoRA base is left out (it is reloaded from the base model: hence strict=False on loading;
    DCP's load itself fails on any requested entry the checkpoint lacks)."""
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


def random_streams(rng=None):
    """Every random state a training step may draw from: torch's (CPU and CUDA), Python's, numpy's,
    and a stage's own random.Random (`rng`), as tensors and plain numbers only, so that the file
    loads with torch.load(weights_only=True): a resume folder from anyone can then run no code."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    numpy = (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss)
    return dict(torch=torch.get_rng_state(), cuda=cuda, python=random.getstate(), numpy=numpy,
                stage=rng.getstate() if rng else None)


def restore_random_streams(saved, rng=None):
    """Put back the random streams random_streams saved (a stage's own `rng` too, when given)."""
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
    random.setstate(saved["python"])
    kind, keys, position, has_gauss, gauss = saved["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    if rng is not None:
        rng.setstate(saved["stage"])


# ----------------------------------------------------------------------------------------------
# The frozen reference's log-probs of preference pairs (dpo.py's step 4): once per pairs file,
# without gradients, kept beside it (ref_logps.jsonl) for every later iteration and any rerun.


def ensure_reference_logps(examples, path, reference, dist_info, parallel, micro_batch_size,
                           policy=None):
    """The reference π_0's log-probs of each example's (tokens.TokenizedPair) chosen and rejected
    response, read from `path` or, the first time, computed there. Without LoRA the model
    `reference` is loaded (`parallel`: fsdp or ddp) only for this pass and freed before the policy
    is loaded: never two models in memory at once. With LoRA, `policy` (π_0 + adapters) is the
    reference with its adapters off."""
    if Path(path).exists():
        ref = [(r["ref_chosen_logp"], r["ref_rejected_logp"]) for r in read_jsonl(path)]
        if len(ref) != len(examples):
            raise InputError(f"{path} has {len(ref)} records for {len(examples)} pairs; "
                             f"delete it to recompute")
        return ref
    pad_id = load_tokenizer(reference).pad_token_id
    if policy is not None:
        with unwrap(policy).adapters_disabled():
            ref = reference_logps(policy, examples, pad_id, dist_info, micro_batch_size)
    else:
        model = load_for_training(reference, parallel, dist_info)
        ref = reference_logps(model, examples, pad_id, dist_info, micro_batch_size)
        del model
    if dist_info.is_main:
        write_jsonl(path, [{"ref_chosen_logp": c, "ref_rejected_logp": r} for c, r in ref])
    barrier()
    if dist_info.device.type == "cuda":
        torch.cuda.empty_cache()
    return ref


@torch.no_grad()
def reference_logps(model, examples, pad_id, dist_info, micro_batch_size):
    """log π_0 of every pair's chosen and rejected response, list of (chosen, rejected) floats in
    pair order, identical on every rank. Runs through the same (wrapped) model and dtype path as
    the policy's forward, so at step 0 of iteration 1 the policy's h is exactly 0. The results stay
    on the device until the pass ends (one host read)."""
    model.eval()
    device = dist_info.device
    batches = rank_micro_batches(range(len(examples)), dist_info.rank, dist_info.world_size,
                                 micro_batch_size)
    chosen, rejected = [], []
    for batch in tqdm(batches, desc="reference log-probs", disable=not dist_info.is_main):
        # padding (-1) re-uses example 0; its result is dropped
        rows = [examples[max(i, 0)] for i in batch]
        prompts = [e.prompt for e in rows] * 2
        responses = [e.chosen for e in rows] + [e.rejected for e in rows]
        with autocast(model, device):
            logps, _ = sequence_logps(model, prompts, responses, pad_id, device)
        chosen.append(logps[:len(rows)].float())
        rejected.append(logps[len(rows):].float())
    values = []
    if batches:
        values = torch.stack([torch.cat(chosen), torch.cat(rejected)], 1).tolist()  # (my pairs, 2)
    pair_indices = (i for batch in batches for i in batch)
    results = {i: tuple(v) for i, v in zip(pair_indices, values) if i >= 0}
    return all_gather_by_index(results, len(examples), dist_info.world_size)
