"""One process or many (torchrun): distributed start-up, devices and dtypes, FSDP2/DDP wrapping,
loading a model for training or as a frozen reference or judge (the FSDP load in torchtitan's
order), saving HF-format checkpoints, and the LoRA and scale flags of every training stage.

Sits on runs.py (it imports nothing else of ours at import time; model.py is imported inside the
functions that build models).
"""
import argparse
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
import torch
import torch.distributed as dist
from runs import (InputError, atomic_write_text, dropout_probability, is_main, non_negative_int,
                  positive_float, rank_and_world_size)

# ----------------------------------------------------------------------------------------------
# Distributed start-up: the same script runs as `python x.py` (one process) or under
# `torchrun --nproc_per_node N x.py`, which sets RANK / LOCAL_RANK / WORLD_SIZE.


@dataclass
class Dist:
    """This process's place in the run: its rank among world_size processes, its rank on this node
    (local_rank: which GPU), and the device it computes on."""
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
    rank, world_size = rank_and_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        minutes = timeout_minutes or float(os.environ.get("RLHF_DIST_TIMEOUT_MIN", 60))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=timedelta(minutes=minutes))
    return Dist(rank, local_rank, world_size, dev)


def destroy_distributed():
    """Wait for every rank, then take the process group down: a rank that tears its connections down
    while another still talks to it can abort the other (gloo: "terminate called ...")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier():
    """Wait for every rank (nothing to wait for in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def all_gather_by_index(results, count, world_size):
    """[results[i] for i in range(count)], where `results` holds this rank's share as a dict
    {index: value}: under torchrun the ranks' dicts are exchanged first, so every rank returns the
    whole list."""
    if dist.is_initialized():
        gathered = [None] * world_size
        dist.all_gather_object(gathered, results)
        results = {k: v for part in gathered for k, v in part.items()}
    return [results[i] for i in range(count)]


def emulating_gpu():
    """RLHF_EMULATE_GPU=1: a CPU process takes the decisions a GPU run takes (bf16 compute, fused
    AdamW, the log-prob kernel's GPU chunk width), so that memory_trace.py's fake-tensor trace of a
    stage's step on the CPU shows what the step holds on a GPU."""
    return os.environ.get("RLHF_EMULATE_GPU") == "1"


def default_dtype(device):
    """bf16 on GPUs that support it (training keeps fp32 master weights, see wrap_model), fp32 on
    CPU (bf16 there too when emulating_gpu())."""
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported() or emulating_gpu():
        return torch.bfloat16
    return torch.float32


# ----------------------------------------------------------------------------------------------
# Data parallelism: FSDP2 (`fully_shard` each decoder block, then the root) or DDP.


def wrap_model(model, mode, device, param_dtype=None):
    """mode: "fsdp" | "ddp" | "none". The model's own parameters stay fp32 (the optimizer's master
    weights); FSDP casts them to `param_dtype` (bf16 on GPU) for compute and reduces grads in fp32.
    A model on the meta device is sharded there (nothing is allocated): see load_sharded."""
    if mode == "none" or not dist.is_initialized():
        return model.to(device)
    if mode == "ddp":
        model.to(device)
        device_ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if mode != "fsdp":
        raise ValueError(f"unknown parallel mode {mode!r} (fsdp, ddp, none)")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype or torch.float32,
                                  reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


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


# ----------------------------------------------------------------------------------------------
# Loading: the model a stage trains (load_for_training) and the frozen ones it reads (load_frozen).
# Under FSDP both take one path (load_sharded): built on the meta device, filled by rank 0.


def load_for_training(path, parallel, dist_info, head="lm", scratch=False,
                      activation_checkpointing=False, lora=None, adapter=None):
    """The model a stage trains: fp32 master weights, activation checkpointing set, wrapped for data
    parallelism. `scratch`: a random init from path's config.json instead of its weights.
    `lora` (model.LoRASettings): adapters on the target Linears, everything else frozen in the
    compute dtype (model.Transformer.add_lora); `adapter`: a PEFT adapter folder to start from (its
    settings must equal `lora`'s). Under FSDP, no rank but one ever holds the full model
    (load_sharded)."""
    from model import Transformer

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
    return load_sharded(path, dist_info, head, param_dtype, read_full,
                        activation_checkpointing=activation_checkpointing, lora=lora)


def load_frozen(path, parallel, dist_info, head="lm"):
    """A frozen model (a reference or a judge): eval mode, no gradients, weights in the compute
    dtype (bf16 on a GPU). Under FSDP it is sharded like a policy (each rank holds 1/W of it,
    gathered layer by layer in its forward; `gathered` makes it whole for sampling or judging;
    load_sharded); otherwise a full copy on every rank."""
    from model import Transformer

    device, dtype = dist_info.device, default_dtype(dist_info.device)
    if parallel != "fsdp" or not dist.is_initialized():
        model = Transformer.from_pretrained(path, device=device, dtype=dtype, head=head)
        return model.eval().requires_grad_(False)
    read_full = partial(Transformer.from_pretrained, path, head=head, dtype=dtype)
    return load_sharded(path, dist_info, head, dtype, read_full, frozen=True).eval()


def load_sharded(path, dist_info, head, param_dtype, read_full, activation_checkpointing=False,
                 lora=None, frozen=False):
    """An FSDP model loaded in the torchtitan order, so that no rank but one ever holds the full
    model: every rank builds it on the meta device (no memory) and shards each block then the root
    (build_on_meta), then allocates only its own shards (materialize); rank 0 alone reads the full
    model (`read_full()`: the checkpoint, or the random init) into host memory and broadcasts it,
    each rank keeping its shards (set_model_state_dict with broadcast_from_rank0). For Llama-3-8B
    that is one 32 GB host copy on the node instead of 8, and no rank ever moves a full model to its
    GPU. The other arguments are build_on_meta's."""
    from model import ModelConfig
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model = build_on_meta(ModelConfig.from_path(path), head, "fsdp", param_dtype,
                          activation_checkpointing, lora, frozen)
    model = materialize(model, dist_info.device)
    full_state = read_full().state_dict() if dist_info.is_main else {}
    set_model_state_dict(model, full_state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full_state
    return model


def build_on_meta(config, head, parallel, param_dtype, activation_checkpointing=False, lora=None,
                  frozen=False):
    """A model built on the meta device (no memory) as a stage will train or use it: LoRA adapters
    added (the base in param_dtype), or all of it frozen in param_dtype (`frozen`: a reference or a
    judge), checkpointing set, sharded with FSDP2 when parallel == "fsdp". Step one of loading under
    FSDP (load_sharded), and of memory_trace.py's fake-tensor trace of any stage."""
    from model import Transformer

    with torch.device("meta"):
        model = Transformer(config, head=head)
        if lora is not None:
            model.add_lora(lora, frozen_dtype=param_dtype)
        if frozen:
            model = model.to(param_dtype).requires_grad_(False).eval()
    model.set_activation_checkpointing(activation_checkpointing)
    if parallel != "fsdp":
        return model
    return wrap_model(model, "fsdp", torch.device("meta"), param_dtype)


def materialize(model, device):
    """Allocate a meta-built model's (local shards of) parameters on `device`, uninitialised, and
    recompute its one buffer (rope's inverse frequencies: not in the state dict)."""
    from model import rope_inverse_frequencies

    model.to_empty(device=device)
    model.inv_freq = rope_inverse_frequencies(model.config).to(device)
    return model


def add_adapter(model, folder, frozen_dtype, expected=None):
    """`model` + the PEFT LoRA adapter saved in `folder` (model.add_lora with its settings, which
    must be `expected`'s when given; the rest frozen in `frozen_dtype`). An adapter tensor that fits
    no adapted Linear is an error: loaded leniently, B would stay 0 and the model silently be the
    base."""
    from model import read_adapter

    lora, state = read_adapter(folder)
    if expected is not None and lora != expected:
        raise InputError(f"{folder}: its LoRA settings {lora} differ from the run's {expected}")
    model.add_lora(lora, frozen_dtype=frozen_dtype)
    device = next(model.parameters()).device
    state = {name: t.to(device) for name, t in state.items()}
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise InputError(f"{folder}: tensors {unexpected[:3]} fit no adapter of the model")
    return model


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
    # root's forward (generate.prefill calls hidden_states), so settle the root role now (private
    # API).
    model._get_fsdp_state()._lazy_init()
    model.set_reshard_after_forward(False)
    for module in modules:
        module.unshard()
    try:
        yield model
    finally:
        for module in modules:
            module.reshard()
        # the blocks' setting (wrap_model's default) ... and the root's: kept for the backward
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)


# ----------------------------------------------------------------------------------------------
# Saving: the whole model gathered to rank 0 (one tensor at a time) and written in HF's format.


def full_state_dict(model, dtype=None):
    """The whole model's state dict on rank 0, on CPU, cast to `dtype` (default: as trained); an
    empty dict on other ranks under FSDP. Under FSDP the shards are gathered one tensor at a time
    and cast on the way, so rank 0 holds one copy in the saved dtype plus one tensor in flight (not
    an fp32 copy and then a bf16 one). Every rank must call it."""
    if not is_fsdp(model):
        return {k: v.detach().to("cpu", dtype or v.dtype)
                for k, v in unwrap(model).state_dict().items()}
    state = {}
    for name, tensor in model.state_dict().items():
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # collective
        if is_main():
            state[name] = full.detach().to("cpu", dtype or full.dtype)
        del full
    return state


def save_checkpoint(model, out_dir, tokenizer, source_dir=None, dtype=None, save_adapter=False):
    """A full HF-format folder (config, safetensors, tokenizer, generation config) written by rank
    0, weights in `dtype` (default: as trained). A LoRA model is saved merged, W + s·BA computed in
    fp32 from W as `source_dir` stores it (the model holds its frozen W in the compute dtype, bf16
    on a GPU, which would round most of a small update away) and cast once to `dtype`; the weights
    LoRA did not touch are the source's, bit for bit when `dtype` is theirs. With `save_adapter` the
    adapter also goes to OUT/adapter in PEFT's format (fp32). Collective: call it on every rank."""
    from model import save_adapter as write_adapter
    from model import stored_tensors

    lora = unwrap(model).lora
    # cast on the way (one copy in the saved dtype), except LoRA's: merged in fp32 first
    state = full_state_dict(model, dtype if lora is None else None)
    if is_main():
        if lora is not None and source_dir is not None:
            # the frozen weights as stored, not as computed with; only where the model's frozen
            # tensor is the stored one in its compute dtype (sft.py --scratch trains adapters on a
            # random base, which no file holds)
            frozen = {name for name in state
                      if not name.endswith((".lora_A", ".lora_B")) and name != "score.weight"}
            for name, tensor in stored_tensors(source_dir, frozen):
                if torch.equal(tensor.to(state[name].dtype), state[name]):
                    state[name] = tensor
        if lora is not None and save_adapter:
            write_adapter(Path(out_dir) / "adapter", state, lora, unwrap(model).head,
                          base_model=source_dir)
        unwrap(model).save_pretrained(out_dir, state_dict=state, dtype=dtype, tokenizer=tokenizer)
        generation_config = Path(source_dir or "", "generation_config.json")
        if source_dir is not None and generation_config.exists():
            atomic_write_text(Path(out_dir, "generation_config.json"),
                              generation_config.read_text())
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# The flags every training stage shares for LoRA and for running at scale.


def add_lora_flags(parser):
    """LoRA's flags, shared by sft, train_rm, dpo and osp."""
    from model import LORA_TARGETS

    parser.add_argument("--lora-rank", type=non_negative_int, default=0,
                        help="train LoRA adapters of this rank instead of every weight "
                             "(0: full fine-tuning; paper 2: 64)")
    parser.add_argument("--lora-alpha", type=positive_float, default=None,
                        help="LoRA scale alpha "
                             "(update × alpha / rank; default: 2 × rank; paper 2: 32)")
    parser.add_argument("--lora-dropout", type=dropout_probability, default=0.0,
                        help="dropout on the adapters' input")
    parser.add_argument("--lora-targets", type=lora_target_list,
                        default=",".join(t.removesuffix("_proj") for t in LORA_TARGETS),
                        help="comma-separated Linears that get adapters, "
                             "among q,k,v,o,gate,up,down")
    parser.add_argument("--save-adapter", action="store_true",
                        help="with LoRA: also write the adapter alone in PEFT's format to "
                             "OUT/adapter (the model is saved merged)")


def lora_target_names(text):
    """'q,v,down' -> ('down_proj', 'q_proj', 'v_proj'): the Linears LoRA adapts
    (model.LORA_TARGETS)."""
    return tuple(sorted(t.strip() + "_proj" for t in text.split(",") if t.strip()))


def lora_target_list(text):
    """argparse `type=` of --lora-targets: the text itself, once every name is known (checked at
    parse time)."""
    from model import LORA_TARGETS

    unknown = [t.removesuffix("_proj") for t in lora_target_names(text) if t not in LORA_TARGETS]
    if unknown or not lora_target_names(text):
        raise argparse.ArgumentTypeError(f"unknown {unknown or 'none given'} in {text!r}; "
                                         "choose among q,k,v,o,gate,up,down")
    return text


def lora_settings(args):
    """model.LoRASettings from add_lora_flags' flags (their values already checked by their types),
    or None without --lora-rank."""
    from model import LoRASettings

    if not args.lora_rank:
        return None
    targets = lora_target_names(args.lora_targets)
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
    return LoRASettings(args.lora_rank, float(alpha), args.lora_dropout, targets)


def add_scale_flags(parser):
    """The flags every training stage shares for running at scale (sft, train_rm, dpo, osp)."""
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="recompute each decoder block in the backward "
                             "(default: on with CUDA, off on CPU)")
    parser.add_argument("--save-dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="dtype of the saved weights "
                             "(auto: the compute dtype, bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the per-rank memory plan for these settings and exit, loading "
                             "nothing")


def scale_settings(args, device):
    """(activation_checkpointing, save dtype) from add_scale_flags' flags, for this device."""
    checkpointing = args.activation_checkpointing
    if checkpointing is None:
        checkpointing = device.type == "cuda"
    auto = args.save_dtype == "auto"
    return checkpointing, default_dtype(device) if auto else getattr(torch, args.save_dtype)
