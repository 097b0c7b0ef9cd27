"""Traced memory: the per-rank peak of a stage's REAL step, run on fake tensors at full shape, next
to the formula plan (memory_plan.py).

    python memory_trace.py --config llama3-8b --mode dpo --world-size 8 --seq-len 2048
    python memory_trace.py --config /ckpt/Mistral-7B --mode osp --world-size 1 --seq-len 1024 \\
        --micro-batch-size 2 --lora-rank 64 --lora-alpha 32            # paper 2's setup
    python memory_trace.py --table        # the README's table (~2.5 minutes)
    python memory_trace.py --self-check   # small shape: each stage's fake peak = its real peak
    python memory_trace.py --gpu-check    # on a GPU: the same steps measured (tools/gpu_check.sh)

How: FakeTensorMode runs every op for its shapes and dtypes only (no data, no memory), and torch's
memory trackers (torch.distributed._tools: MemTracker, and FSDPMemTracker for FSDP2 models) watch
each op's outputs and the storages' lifetimes, labelling every byte by what it is (parameter,
gradient, optimizer state, activation, ...). A fake process group of W ranks lets FSDP2 shard
exactly as on W GPUs while its collectives do nothing, so one CPU process sees one rank's tensors.
The models are built as the stages build them (parallel.build_on_meta: meta device, LoRA, FSDP2),
then given fake storage; the steps are the stages' own functions (trace_stage). Everything is on
the CPU device (this torch cannot fake CUDA tensors) and takes a GPU run's decisions (bf16
compute, fused AdamW, the log-prob kernel's GPU chunk width: emulated_gpu). Ops that read values
fail on fake tensors (.item(), .tolist(), bool(t), nonzero(), x[mask]): a traced step must not
read the device, which is also what keeps a GPU step free of host syncs.

The figures are the tracker's sums of tensor storages, not the CUDA caching allocator's
reservations: fits() adds an allowance for what a trace cannot see (CUDA context, NCCL and cuBLAS
workspaces, Triton and FlexAttention internals, fragmentation).

All private-API use of the project lives in this module (torch 2.13 is what it was written on);
docs/tools.md says which private pieces it relies on, and why.
"""
import argparse
import os
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
import rewards

try:  # private torch tools: say which one is missing instead of failing deep inside a trace
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule
    # importing it registers backend "fake"
    from torch.testing._internal.distributed.fake_pg import FakeStore
    _MISSING = None
except ImportError as error:
    _MISSING = error

GiB = 2**30
# our own row: frozen parameters (LoRA base, reference, judge) split out of "Parameter"
FROZEN = "Frozen weights"


def _require():
    if _MISSING is not None:
        raise RuntimeError(f"memory_trace needs torch's fake tensors, fake process group and "
                           f"memory trackers (torch.distributed._tools, written against torch "
                           f"2.13); this torch {torch.__version__} lacks one: {_MISSING}")


# ----------------------------------------------------------------------------------------------
# Fake ranks and fake tensors


@contextmanager
def fake_distributed(world_size, rank=0):
    """A process group of `world_size` ranks in which this process is `rank` and every collective
    is a no-op: fully_shard shards as on world_size GPUs, dist.all_reduce returns at once."""
    _require()
    if dist.is_initialized():
        raise RuntimeError("a process group already exists; fake_distributed needs to create its "
                           "own")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def fake_tensor_mode():
    """The FakeTensorMode to build and run models in. allow_non_fake_inputs: real tensors made
    before the mode was entered (a device mesh, a constant) may meet fake ones, as constants."""
    _require()
    return FakeTensorMode(allow_non_fake_inputs=True)


def materialize(model, fake_mode):
    """Give a model built on the meta device (and already wrapped: fully_shard must run OUTSIDE fake
    mode, it builds a real device mesh) fake CPU storage, in place. Returns the model."""
    with fake_mode:
        model.to_empty(device="cpu")
        if hasattr(model, "inv_freq"):  # rope's buffer is not a parameter: to_empty leaves it empty
            from model import rope_inverse_frequencies
            model.inv_freq = rope_inverse_frequencies(model.config)
    return model


# ----------------------------------------------------------------------------------------------
# The trace


class _NoHook:
    """Stands in for a gradient-hook handle on a frozen parameter (see _tracker)."""

    def remove(self):
        pass


def _storages(tensors):
    """{id: storage} of the tensors' untyped storages (a DTensor's local shard), each once."""
    found = {}
    for tensor in tensors:
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        found[id(tensor.untyped_storage())] = tensor.untyped_storage()
    return found


def _update_global_peak(tracker):
    """The trackers' _update_peak_stats without its per-module half, which costs O(ops × modules)
    (289 s instead of 16 s for Llama-3-8B with LoRA on one device, docs/tools.md). We read only
    the global peak."""
    def update(peak_state):
        for device, snap in tracker._curr_mem_snap.items():
            if tracker._peak_mem.get(device, 0) < snap["Total"]:
                tracker._peak_mem[device] = snap["Total"]
                # a flat dict of ints: a copy is a deep copy
                tracker._peak_mem_snap[device] = dict(snap)
    return update


def _reset_peak(tracker):
    """Forget the peak so far: the next one is the peak of what runs from now on (the trackers have
    no public call for it; this is what their __enter__ does)."""
    tracker._peak_mem_snap = tracker.get_tracker_snapshot()
    tracker._peak_mem = {device: snap["Total"] for device, snap in tracker._peak_mem_snap.items()}


# the trackers' private members trace_peak relies on
RELIED_ON = ("_update_peak_stats", "_curr_mem_snap", "_peak_mem", "_peak_mem_snap", "_WINFO",
             "_mod_tracker", "_param_to_grad_hook_handles", "_update_and_maybe_create_winfos",
             "memory_tracking")


def _tracker(model, optimizer, frozen, inputs):
    """The memory tracker for `model` (FSDPMemTracker for an FSDP2 model, else MemTracker), with
    the models beside it (`frozen`) and the `inputs` registered. MemTracker would hook every
    parameter for its gradient, which raises on a frozen one: those get a do-nothing handle."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        # DDP's constructor reads parameter data (_verify_param_shape_across_processes): fake
        # tensors have none
        raise ValueError("DDP cannot be built on fake tensors: trace its module unwrapped and add "
                         "DDP's gradient buckets (one more fp32 copy of the trained gradients)")
    is_fsdp = isinstance(model, FSDPModule)
    tracker = FSDPMemTracker(model, optimizer) if is_fsdp else MemTracker()
    missing = [name for name in RELIED_ON if not hasattr(tracker, name)]
    if missing:
        raise RuntimeError(f"torch {torch.__version__}'s {type(tracker).__name__} lacks {missing}, "
                           "which memory_trace relies on (written against torch 2.13): adapt "
                           "trace_peak to this version")
    # an instance attribute shadows the method
    tracker._update_peak_stats = _update_global_peak(tracker)
    if is_fsdp:
        # FSDPMemTracker finds the sharded parameters, gradients and optimizer state itself, but its
        # track_external is a no-op: models beside the FSDP one and the inputs are registered here.
        for other in frozen:
            for tensor in list(other.parameters()) + list(other.buffers()):
                tracker._update_and_maybe_create_winfos(tensor, _FSDPRefType.SHARDED_PARAM)
        tracker.track_inputs(tuple(inputs))
    else:
        tracker.track_external(model, *frozen, *([optimizer] if optimizer is not None else []),
                               *inputs)
        # MemTracker skips the parameters it already has a gradient-hook handle for.
        for parameter in model.parameters():
            if not parameter.requires_grad:
                tracker._param_to_grad_hook_handles[parameter] = (_NoHook(), _NoHook())
        for other in frozen:
            for parameter in other.parameters():
                tracker._param_to_grad_hook_handles[parameter] = (_NoHook(), _NoHook())
    return tracker


def _run_tracked(tracker, train_step, steps):
    """train_step() `steps` times under the tracker, the peak reset before each.
    Both trackers refuse a second forward of a module whose statistics they still hold (every
    micro-batch and step after the first); we read only the global peak, so a global pre-hook
    (which runs before the tracker's own) forgets a module's statistics as its forward begins —
    never in the backward, where a forward is the activation-checkpointing recompute."""
    def forget_module(module, args):
        if not tracker._mod_tracker.is_bw:
            tracker.memory_tracking.pop(module, None)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(forget_module)
    try:
        with tracker:
            for _ in range(steps):
                _reset_peak(tracker)
                train_step()
    finally:
        hook.remove()


def _peak_by_category(tracker, frozen_tensors):
    """The tracker's peak snapshot as {category: bytes, FROZEN: bytes, "Total": bytes}. Frozen
    weights are alive from start to end, so the bytes they add to a row at the peak are the bytes
    they hold now: they move row by row to their own."""
    snapshots = tracker.get_tracker_snapshot("peak")
    if len(snapshots) > 1:
        raise RuntimeError(f"tensors on several devices {list(snapshots)}: trace one device's "
                           "tensors")
    snapshot = next(iter(snapshots.values()), {"Total": 0})
    peak = {getattr(kind, "value", kind): size for kind, size in snapshot.items()
            if kind != "Total"}
    peak[FROZEN] = 0
    for storage in _storages(frozen_tensors).values():
        info, _ = tracker._WINFO.get(storage, (None, None))
        if info is not None:
            peak[info.reftype.value] -= info.mem_consumed
            peak[FROZEN] += info.mem_consumed
    peak["Total"] = snapshot["Total"]
    return peak


def trace_peak(train_step, model, optimizer=None, frozen=(), steps=2, inputs=()):
    """Run train_step() `steps` times under torch's memory tracker and return this rank's peak
    during the LAST call: {category: bytes, ..., "Total": bytes}. Read a step after the first: the
    AdamW state exists only from the first optimizer step on, and under FSDP2 step 0 is inflated
    by DTensor's one-off sharding propagation on global-shape fake tensors (~135 GiB instead of
    20.3 for Llama-3-8B; docs/tools.md); later steps are exact.

    train_step: a callable doing one optimizer step (any number of micro-batches: forward,
        backward, then optimizer step and zero_grad(set_to_none=True)), on the tensors of the mode
        it runs in.
    model: the trained model; an FSDP2 model (fully_shard) is traced with FSDPMemTracker, which
        knows sharded/unsharded parameters and gradients and the collectives' buffers; any other
        with MemTracker.
    optimizer: the model's optimizer (its state is "Optstate"/"OptState").
    frozen: models kept resident beside the trained one (reference, judge), frozen or not.
    inputs: tensors made outside train_step that live through it (counted as "Other"/"Inputs").

    Frozen parameters (requires_grad=False), inside `model` or in `frozen`, are reported as "Frozen
    weights" and taken out of the parameter row they are tracked in."""
    _require()
    tracker = _tracker(model, optimizer, frozen, inputs)
    frozen_tensors = [p for p in model.parameters() if not p.requires_grad]
    for other in frozen:
        frozen_tensors += list(other.parameters()) + list(other.buffers())
    _run_tracked(tracker, train_step, steps)
    return _peak_by_category(tracker, frozen_tensors)


def format_peak(peak, title="peak per rank"):
    rows = [f"{title}:"] + [f"  {kind:<22}{size / GiB:9.3f} GiB" for kind, size in peak.items()
                            if kind != "Total" and size]
    return "\n".join(rows + [f"  {'Total':<22}{peak['Total'] / GiB:9.3f} GiB"])


# ----------------------------------------------------------------------------------------------
# The stages' own steps, at any shape: build each stage's models as the stage does
# (parallel.build_on_meta, the meta-device half of load_for_training / load_frozen), then run the
# stage's own step function (sft.train_step, train_rm.train_step, dpo.train_step, osp's rollout →
# judge → update) on fake tensors.

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
            max_position_embeddings=512, tie_word_embeddings=False)
# the published config.json values (no hub here): Meta-Llama-3-8B and Mistral-7B-v0.1
LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                 tie_word_embeddings=False)
MISTRAL_7B = dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=32768,
                  sliding_window=4096, tie_word_embeddings=False)
KNOWN_CONFIGS = {"tiny": TINY, "llama3-8b": LLAMA3_8B, "mistral-7b": MISTRAL_7B}
MODES = ("sft", "rm", "dpo", "osp", "sample")


@contextmanager
def emulated_gpu():
    """RLHF_EMULATE_GPU=1 for the block (parallel.emulating_gpu): the stages take a GPU run's
    decisions on this CPU: bf16 compute, fused AdamW, the log-prob kernel's GPU chunk width."""
    before = os.environ.get("RLHF_EMULATE_GPU")
    os.environ["RLHF_EMULATE_GPU"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["RLHF_EMULATE_GPU"]
        else:
            os.environ["RLHF_EMULATE_GPU"] = before


def _build(config, head, parallel, activation_checkpointing, lora, frozen, fake_mode, device="cpu"):
    """A stage's model: parallel.build_on_meta, then storage: fake (fake_mode) or real (small)."""
    from parallel import build_on_meta
    from model import rope_inverse_frequencies

    model = build_on_meta(config, head, parallel, torch.bfloat16, activation_checkpointing, lora,
                          frozen)
    if fake_mode is not None:
        return materialize(model, fake_mode)
    model.to_empty(device=device)
    model.inv_freq = rope_inverse_frequencies(model.config).to(device)
    # real tensors (tiny shapes): any finite values will do, only sizes and lifetimes matter
    with torch.no_grad():
        for parameter in model.parameters():
            (parameter.to_local() if hasattr(parameter, "to_local") else parameter).normal_(0, 0.02)
    return model


def measure_cuda_peak(step, model, optimizer=None, frozen=(), steps=2):
    """What trace_peak reports, measured on a GPU: torch.cuda.max_memory_allocated during the last
    of `steps` calls of step(): the caching allocator's count of live tensor bytes, comparable."""
    for _ in range(steps):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
    torch.cuda.synchronize()
    return {"Total": torch.cuda.max_memory_allocated()}


def _stage_models(config, mode, parallel, activation_checkpointing, lora, fake_mode, device):
    """(the trained model, [models resident beside it]) as the stage builds them: sample, one bf16
    replica; osp without LoRA, π_SFT (reference = judge) frozen and sharded like the policy."""
    if mode == "sample":
        return _build(config, "lm", "none", False, None, True, fake_mode, device), []
    model = _build(config, "score" if mode == "rm" else "lm", parallel, activation_checkpointing,
                   lora, False, fake_mode, device)
    frozen_models = []
    if mode == "osp" and lora is None:
        frozen_models.append(_build(config, "lm", parallel, False, None, True, fake_mode, device))
    return model, frozen_models


def _sft_step(model, optimizer, micro_batch_size, seq_len, world_size, device):
    """sft.train_step on micro_batch_size sequences of seq_len tokens, every token a target."""
    import sft

    ids = torch.zeros(micro_batch_size, seq_len, dtype=torch.long)
    positions = torch.arange(seq_len).expand(micro_batch_size, seq_len)
    batch = (ids, ids.clone(), positions, None, ids.numel())

    def step():
        sft.train_step(model, optimizer, [batch], 1.0, world_size, device)
    return step


def _rm_step(model, optimizer, micro_batch_size, seq_len, world_size, device):
    """train_rm.train_step (Bradley-Terry) on micro_batch_size pairs of seq_len tokens each."""
    import train_rm

    items = [([1] * seq_len, [2] * seq_len, 0.0)] * micro_batch_size
    weight = torch.ones(micro_batch_size)

    def step():
        train_rm.train_step(model, optimizer, [(items, weight)], "bt", 0.0, 1.0,
                            micro_batch_size * world_size, 0, world_size, device)
    return step


def _rollout_phase(config, sampler, mode, slots, prompts_per_rank, seq_len, device):
    """The generation engine's own calls at full length: its KV cache reserved for `slots` rows,
    a prefill of prompts of seq_len / 2 tokens as the engine batches them, a decode step; the
    sampler gathered whole (osp under FSDP)."""
    import generate
    from model import KVCache
    from parallel import gathered
    from training import autocast

    half = seq_len // 2
    engine = generate.Engine(sampler, slots, [0], dtype=torch.bfloat16)
    prefill_count = min(slots if mode == "sample" else prompts_per_rank,
                        max(1, generate.PREFILL_TOKENS // half))
    tokens, seeds = torch.zeros(slots, dtype=torch.long), torch.arange(slots)
    positions = torch.full((slots,), seq_len - 1)

    # osp's own autocast rule (training.autocast: bf16 over a one-device fp32 policy, none under
    # FSDP, whose parameters are cast already); the sample mode's model always under bf16
    def amp():
        return (torch.autocast(device.type, torch.bfloat16) if mode == "sample"
                else autocast(sampler, device))

    def rollout_phase():
        with gathered(sampler), torch.no_grad(), amp():
            engine.reserve(seq_len)  # allocated once, then kept for the run (Engine.reserve)
            prefill_cache = KVCache(config, prefill_count, half, device, torch.bfloat16)
            generate.prefill(sampler, prefill_cache,
                             torch.zeros(prefill_count, half, dtype=torch.long),
                             torch.full((prefill_count,), half))
            del prefill_cache
            generate.decode_step(sampler, engine.cache, tokens, positions, engine.cache.max_len,
                                 seeds, 0.7, 0, 0.9, 0.0)
    return rollout_phase


def _osp_step(model, judge, optimizer, rollout_phase, prompts_per_rank, k, micro_batch_size,
              seq_len, steps, world_size, device):
    """One step of OSP's Algorithm 1: the rollout, the judge (gathered whole; one batch of
    pairwise queries), the update (osp.update, micro_batch_size pairs per forward)."""
    import argparse as _argparse

    import osp
    from parallel import gathered

    half = seq_len // 2
    args = _argparse.Namespace(micro_batch_size=micro_batch_size, pairing="ranked", beta=0.1,
                               loss="spce", steps=steps, lr=1e-5, warmup_ratio=0.0, grad_clip=1.0)
    pairs = [(row, 0, 1) for row in range(prompts_per_rank) for _ in range(k // 2)]
    pair_tokens = [([2] * (seq_len - half), [3] * (seq_len - half))] * len(pairs)
    prompt_tokens = [[1] * half] * prompts_per_rank
    targets = torch.full((len(pairs),), 0.6)
    judge_queries = [[1] * (half + 2 * (seq_len - half))] * min(64, prompts_per_rank * k)

    def step():
        rollout_phase()
        with osp.sft_view(judge, model) as judge_model, gathered(judge_model), torch.no_grad():
            rewards.pairwise_logits_ab(judge_model, judge_queries, (4, 5), 0, device)
        osp.update(model, judge, optimizer, prompt_tokens, pairs, pair_tokens, targets, args, 0,
                   world_size, 0, device)
    return step


def trace_stage(config, mode, world_size=1, seq_len=2048, micro_batch_size=1, lora=None,
                activation_checkpointing=True, fake=True, k=7, prompts_per_rank=2, steps=2,
                device="cpu"):
    """The peak per rank (trace_peak: {category: bytes, "Total": bytes}) of `steps` steps of a
    stage, FSDP2 over `world_size` fake ranks (one device, unwrapped, when 1), as on a GPU
    (emulated_gpu).
      sft:    micro_batch_size sequences of seq_len tokens, every token a target (packing into one
              document: the GPU's FlexAttention costs what one causal attention costs);
      rm:     micro_batch_size pairs, chosen and rejected of seq_len tokens each (Bradley-Terry);
      dpo:    micro_batch_size pairs, each response seq_len / 2 tokens after a seq_len / 2 prompt
              (reference log-probs precomputed, as dpo.py does);
      osp:    one step of Algorithm 1 on prompts_per_rank prompts of seq_len / 2 tokens, k samples
              of seq_len / 2 new tokens each: the rollout (the sampler gathered whole, its KV cache
              of prompts × k slots, a prefill and a decode step at full length), the judge
              (gathered whole; one batch of pairwise queries), the update (osp.update,
              micro_batch_size pairs per forward); reference and judge resident (sharded), or
              with LoRA the policy, adapters off;
      sample: a bf16 replica per rank, micro_batch_size decode slots of seq_len positions, a
              prefill of seq_len / 2-token prompts as the engine batches them and a decode step.
    lora: model.LoRASettings (sft, rm, dpo, osp). fake=False runs real tensors (tiny shapes only on
    a CPU); device="cuda" (real tensors, one device): the same steps measured on a GPU
    (measure_cuda_peak)."""
    import dpo
    from training import make_optimizer
    from model import ModelConfig

    assert mode in MODES, mode
    config = ModelConfig.from_dict(config) if isinstance(config, dict) else config
    parallel = "fsdp" if world_size > 1 else "none"
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    assert not (on_gpu and (fake or world_size > 1)), "on a GPU: real tensors, one device"
    with emulated_gpu(), fake_distributed(world_size) if world_size > 1 else nullcontext():
        fake_mode = fake_tensor_mode() if fake else None
        model, frozen_models = _stage_models(config, mode, parallel, activation_checkpointing, lora,
                                             fake_mode, device)
        optimizer = None
        with fake_mode if fake else nullcontext(), torch.device(device):
            if mode != "sample":
                optimizer = make_optimizer(model, 1e-5)
            half = seq_len // 2
            if mode == "sft":
                step = _sft_step(model, optimizer, micro_batch_size, seq_len, world_size, device)
            elif mode == "rm":
                step = _rm_step(model, optimizer, micro_batch_size, seq_len, world_size, device)
            elif mode == "dpo":
                zeros = torch.zeros(micro_batch_size)
                micro = dpo.PairBatch(prompts=[[1] * half] * micro_batch_size,
                                      chosen=[[2] * (seq_len - half)] * micro_batch_size,
                                      rejected=[[3] * (seq_len - half)] * micro_batch_size,
                                      weight=torch.ones(micro_batch_size), ref_chosen=zeros,
                                      ref_rejected=zeros.clone(),
                                      target=torch.ones(micro_batch_size))

                def step():
                    dpo.train_step(model, optimizer, [micro], beta=0.1, loss_type="dpo",
                                   nll_coef=0.0, grad_clip=1.0,
                                   global_pairs=micro_batch_size * world_size, pad_id=0,
                                   world_size=world_size, device=device)
            else:  # osp and sample: the generation engine's own calls
                slots = prompts_per_rank * k if mode == "osp" else micro_batch_size
                sampler = model  # osp: the current policy (--sampling policy, the default)
                step = _rollout_phase(config, sampler, mode, slots, prompts_per_rank, seq_len,
                                      device)
                if mode == "osp":
                    judge = frozen_models[0] if frozen_models else None
                    step = _osp_step(model, judge, optimizer, step, prompts_per_rank, k,
                                     micro_batch_size, seq_len, steps, world_size, device)
            measure = measure_cuda_peak if on_gpu else trace_peak
            return measure(step, model, optimizer, frozen=frozen_models, steps=steps)


def plan_for(config, mode, world_size, seq_len, micro_batch_size, lora=None, k=7,
             prompts_per_rank=2):
    """memory_plan's plan for the same stage and shape as trace_stage, as the stage prints it."""
    from memory_plan import memory_plan, osp_memory_plan
    from model import ModelConfig

    config = ModelConfig.from_dict(config) if isinstance(config, dict) else config
    parallel = "fsdp" if world_size > 1 else "none"
    if mode == "osp":  # osp.py's own plan
        return osp_memory_plan(config, world_size, micro_batch_size, seq_len, prompts_per_rank, k,
                               parallel=parallel, lora=lora)
    if mode == "sample":  # the prefill as generate.Engine batches it: PREFILL_TOKENS padded tokens
        from generate import PREFILL_TOKENS
        half = seq_len // 2
        return memory_plan(config, 1, min(micro_batch_size, max(1, PREFILL_TOKENS // half)), half,
                           "sample", kv_cache_slots=micro_batch_size, kv_cache_len=seq_len)
    # dpo's micro-batch of pairs: the plan's seq_len is each response's sequence (prompt + response)
    return memory_plan(config, world_size, micro_batch_size, seq_len, mode, parallel=parallel,
                       lora=lora, packed=False)


# Not seen by a trace: the CUDA context, NCCL's and cuBLAS's workspaces, Triton's and
# FlexAttention's own buffers, and the caching allocator's fragmentation. The allowance added
# before a row is said to fit:
ALLOWANCE_GIB, ALLOWANCE_FRACTION = 3.0, 0.10

# The README's table (python memory_trace.py --table): Llama-3-8B on 8 × 80 GB, and paper 2's
# setup. (name, config, mode, ranks, seq_len, micro-batch, LoRA (rank, alpha), GPU GiB)
TABLE = [
    ("SFT, 1 × 8192 tokens", "llama3-8b", "sft", 8, 8192, 1, None, 80),
    ("RM, 1 pair × 2 × 2048", "llama3-8b", "rm", 8, 2048, 1, None, 80),
    ("DPO, 1 pair × 2 × 2048", "llama3-8b", "dpo", 8, 2048, 1, None, 80),
    ("OSP, K = 7, 1024 tokens, 2 prompts/rank, 8 pairs/forward", "llama3-8b", "osp", 8, 1024, 8,
     None, 80),
    ("sampling, 64 slots × 4096", "llama3-8b", "sample", 1, 4096, 64, None, 80),
    ("DPO + LoRA r 64, 1 pair × 2 × 2048", "llama3-8b", "dpo", 8, 2048, 1, (64, 32.0), 80),
    ("Mistral-7B OSP + LoRA r 64 (paper 2), one GPU, K = 7, 1024 tokens, 2 prompts, "
     "2 pairs/forward", "mistral-7b", "osp", 1, 1024, 2, (64, 32.0), 48),
]


def with_allowance(traced_bytes):
    """GiB a GPU needs for a traced peak: the trace plus the allowance for what it cannot see."""
    return traced_bytes / GiB * (1 + ALLOWANCE_FRACTION) + ALLOWANCE_GIB


def fits(traced_bytes, gpu_gib):
    """(fits, margin GiB): the traced peak plus the allowance, against the GPU's memory."""
    return with_allowance(traced_bytes) <= gpu_gib, gpu_gib - with_allowance(traced_bytes)


def table(rows=TABLE):
    """Trace every row of TABLE; returns markdown lines (and prints each row as it finishes)."""
    from model import LoRASettings

    lines = ["| per rank | ranks | planned (GiB) | traced (GiB) | traced + allowance | GPU (GiB) | "
             "margin (GiB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, config_name, mode, world, seq_len, micro, lora_ra, gpu in rows:
        lora = LoRASettings(lora_ra[0], lora_ra[1]) if lora_ra else None
        start = time.perf_counter()
        peak = trace_stage(KNOWN_CONFIGS[config_name], mode, world, seq_len, micro, lora)
        plan = plan_for(KNOWN_CONFIGS[config_name], mode, world, seq_len, micro, lora)
        ok, margin = fits(peak["Total"], gpu)
        lines.append(f"| {name} | {world} | {plan['peak'] / GiB:.2f} | {peak['Total'] / GiB:.2f} | "
                     f"{with_allowance(peak['Total']):.2f} | {gpu} | "
                     f"{margin:+.2f}{'' if ok else ' (does NOT fit)'} |")
        print(lines[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)
    return lines


# (mode, ranks: FSDP2 over fake ranks or one device, LoRA, micro-batch)
SELF_CHECK_CASES = {"sft, FSDP2": ("sft", 2, False, 2), "rm, FSDP2": ("rm", 2, False, 2),
                    "dpo, FSDP2": ("dpo", 2, False, 2), "osp, FSDP2": ("osp", 2, False, 2),
                    "dpo + LoRA": ("dpo", 1, True, 2), "osp + LoRA": ("osp", 1, True, 2),
                    "sample": ("sample", 1, False, 8)}


def check_fake_matches_real(config=TINY, seq_len=32, cases=SELF_CHECK_CASES):
    """{case: (real-tensor peak, fake-tensor peak)} of each stage's own step (2 steps, K = 3, LoRA
    rank 4), at a shape small enough for real tensors on a CPU. tests/test_memory_trace.py asserts
    real == fake for each."""
    from model import LoRASettings

    def lora_of(lora):
        return LoRASettings(4, 8.0) if lora else None

    return {case: tuple(trace_stage(config, mode, world, seq_len, micro, lora_of(lora), fake=fake,
                                    k=3)
                        for fake in (False, True))
            for case, (mode, world, lora, micro) in cases.items()}


# tools/gpu_check.sh: the same steps measured on a GPU and traced here, at a real but small shape
# (TinyLlama-1.1B's config, one device, bf16); the CPU dry run compares real and fake CPU tensors
# instead.
TINYLLAMA = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                 num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=2048,
                 tie_word_embeddings=False)
GPU_CHECK = [("sft", None, 4, 1024), ("dpo", None, 2, 1024), ("osp", (16, 32.0), 4, 512)]


def gpu_check(dry_run=False):
    """One SFT, DPO and OSP + LoRA step each, measured (torch.cuda.max_memory_allocated) against
    the fake-tensor trace of the same step at the same shape. Returns the printed lines; raises if
    a measurement differs from its trace by more than 10%."""
    from model import LoRASettings

    config, device = (TINYLLAMA, "cuda") if not dry_run else (TINY, "cpu")
    lines, worst = [], 0.0
    for mode, lora_ra, micro, seq_len in GPU_CHECK:
        lora = LoRASettings(*lora_ra) if lora_ra else None
        seq_len = seq_len if not dry_run else 32
        traced = trace_stage(config, mode, 1, seq_len, micro, lora, k=3)["Total"]
        measured = trace_stage(config, mode, 1, seq_len, micro, lora, fake=False, k=3,
                               device=device)["Total"]
        worst = max(worst, abs(measured / traced - 1))
        lines.append(f"{mode}{' + LoRA' if lora else ''}, {micro} × {seq_len} tokens on {device}: "
                     f"measured {measured / GiB:.3f} GiB, traced {traced / GiB:.3f} GiB, "
                     f"measured / traced {measured / traced:.3f}")
        print(lines[-1], flush=True)
    if worst > 0.10:
        raise SystemExit(f"a measured peak differs from its trace by {worst:.0%} (> 10%): explain "
                         "it before trusting the table")
    return lines


def build_parser():
    from runs import checked_number, non_negative_int, positive_float, positive_int

    parser = argparse.ArgumentParser(description="Per-rank memory of a stage's real step at full "
                                                 "shape, on fake tensors, next to the formula plan "
                                                 "(memory_plan.py).")
    parser.add_argument("--config", default="llama3-8b",
                        help=f"one of {sorted(KNOWN_CONFIGS)}, or an HF config.json / checkpoint "
                             "folder")
    parser.add_argument("--mode", choices=MODES, default="sft", help="the stage to trace")
    parser.add_argument("--world-size", type=positive_int, default=8,
                        help="ranks (FSDP2 over fake ranks; 1: one device)")
    parser.add_argument("--seq-len", type=positive_int, default=2048,
                        help="tokens per sequence (dpo/osp: prompt + response)")
    parser.add_argument("--micro-batch-size", type=positive_int, default=1,
                        help="sequences / pairs per forward (sample: decode slots)")
    parser.add_argument("--lora-rank", type=non_negative_int, default=0,
                        help="LoRA adapters of this rank (0: full fine-tuning)")
    parser.add_argument("--lora-alpha", type=positive_float, default=None,
                        help="LoRA alpha (default 2 × rank)")
    parser.add_argument("--k", type=checked_number(int, "≥ 2", lambda n: n >= 2), default=7,
                        help="osp: samples per prompt")
    parser.add_argument("--prompts-per-rank", type=positive_int, default=2,
                        help="osp: prompts per rank per step")
    parser.add_argument("--gpu-gib", type=positive_float, default=80.0,
                        help="GPU memory to check the traced peak against")
    parser.add_argument("--table", action="store_true",
                        help="trace every row of the README's table")
    parser.add_argument("--self-check", action="store_true",
                        help="tiny shape: each stage's fake peak = its real peak")
    parser.add_argument("--gpu-check", action="store_true",
                        help="on a GPU: sft, dpo, osp + LoRA steps measured against their traces "
                             "(tools/gpu_check.sh)")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --gpu-check: tiny shapes on the CPU, real vs fake tensors")
    return parser


def main():
    parser = build_parser()
    args = parser.parse_args()
    if args.seq_len < 2:
        parser.error(f"argument --seq-len: must be ≥ 2 (a prompt and a response), got "
                     f"{args.seq_len}")
    if args.gpu_check:
        gpu_check(args.dry_run)
        return
    from model import LoRASettings, ModelConfig

    if args.self_check:
        for case, (real, fake) in check_fake_matches_real().items():
            print(f"tiny, {case}: real peak {real['Total']:,} B, fake peak {fake['Total']:,} B"
                  + (" (equal)" if real == fake else " DIFFER"))
        return
    if args.table:
        print("\n".join(table()))
        return
    config = KNOWN_CONFIGS.get(args.config) or ModelConfig.from_path(args.config)
    lora = None
    if args.lora_rank:
        lora = LoRASettings(args.lora_rank, args.lora_alpha or 2.0 * args.lora_rank)
    start = time.perf_counter()
    peak = trace_stage(config, args.mode, args.world_size, args.seq_len, args.micro_batch_size,
                       lora, k=args.k, prompts_per_rank=args.prompts_per_rank)
    plan = plan_for(config, args.mode, args.world_size, args.seq_len, args.micro_batch_size, lora,
                    args.k, args.prompts_per_rank)
    from memory_plan import format_memory_plan
    print(format_peak(peak, f"traced: {args.config} {args.mode}, {args.world_size} rank(s), peak "
                            "of step 2 per rank"))
    print(format_memory_plan(plan, args.gpu_gib))
    ok, margin = fits(peak["Total"], args.gpu_gib)
    print(f"traced {peak['Total'] / GiB:.2f} GiB + allowance ({ALLOWANCE_FRACTION:.0%} + "
          f"{ALLOWANCE_GIB:g} GiB for what a trace cannot see) {'fits' if ok else 'does NOT fit'} "
          f"{args.gpu_gib:g} GiB: margin {margin:+.2f} GiB "
          f"(traced in {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
