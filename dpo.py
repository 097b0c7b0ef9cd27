"""DPO / IPO / SPCE: preference optimisation of a policy π against a frozen reference π_0, offline
on a pairs file, or as one iteration of online iterative DPO (paper 1, RLHF Workflow, Algorithm 1).

With h = [log π(a_w|x) − log π_0(a_w|x)] − [log π(a_l|x) − log π_0(a_l|x)] (losses.py):
  DPO   −log σ(βh)                              Rafailov et al. 2023, eq. 7; paper 1 eq. (3)
  IPO   (h − 1/(2β))², per-token log-probs      Azar et al. 2023, eq. 17
  SPCE  −[p log σ(βh) + (1 − p) log σ(−βh)]     paper 2, eq. (8): soft label p; p = 1 is DPO
  cDPO  --label-smoothing ε: SPCE with p = 1 − ε.  RPO: + α · the chosen response's per-token NLL

One online iteration t (run_iteration), each step skipped on a rerun once its output is complete:
  1. sample   n responses per prompt of chunk t from π_{t−1} (π_0 = the SFT model)
  2. score    every response by the reward model (or an ensemble), or by a verifier: a Python
              function in TRL's convention, --rm FILE.py:function (--rm gold: the task's r*)
  3. pair     per prompt, the best vs the worst response by reward − λ·length (losses.select_pairs)
  4. ref      log π_0 of each pair's chosen and rejected response, once, without gradients
  5. train    DPO from π_{t−1}, reference π_0, on the pairs so far

    # offline (paper 1's "DPO baseline"); online, one whole iteration per call
    python dpo.py --pairs data/builtin/pairs_train.jsonl --model runs/builtin/sft --out OUT
    python dpo.py --iter 1 --run-dir runs/builtin/online --sft runs/builtin/sft \\
        --rm runs/builtin/rm --prompts 'data/builtin/prompts_iter{t}.jsonl'
    python dpo.py --iter 2 --run-dir runs/builtin/online     # settings read back, or given anew
    torchrun --nproc_per_node 8 dpo.py --iter 2 --run-dir runs/NAME   # not --run: torchrun's

The files of an iteration, where each setting comes from, LoRA, and where we differ from TRL's
DPOTrainer: docs/dpo.md.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

import generate
from parallel import (add_adapter, add_lora_flags, add_scale_flags, barrier, default_dtype,
                      destroy_distributed, gradient_sync, init_distributed, load_for_training,
                      lora_settings, save_checkpoint, scale_settings)
from runs import (InputError, MetricsLogger, add_tracking_flags, already_trained,
                  atomic_write_text, check_settings, checked_number, fraction,
                  given_on_command_line, has_model, non_negative_float, non_negative_int,
                  positive_float, positive_fraction, positive_int, print0, print_settings,
                  process_in_chunks, read_back_settings, record_iteration_settings,
                  recording_flags, require_model, run_cli, step_limit, write_jsonl)
from tokens import load_tokenizer, response_ids, stop_token_ids, tokenize_pairs
from training import (StepSums, add_resume_flag, autocast, batch_schedule, cosine_lr,
                      ensure_reference_logps, finish_training_state, load_training_state,
                      make_optimizer, optimizer_step, rank_micro_batches, save_training_state,
                      seed_everything, set_lr)
from data.schema import load_records
from data.task import format_reward_vs_gold
from memory_plan import print_stage_plan
from model import ModelConfig, Transformer
from losses import (PAIR_SELECTIONS, implicit_reward, per_token_nll, preference_loss,
                    select_pairs, sequence_logps)
from rewards import (ensemble_scorer, is_reward_function, load_reward_function,
                     reward_function_settings, reward_models, samples_summary, verifier_flag,
                     verifier_scorer)


# ----------------------------------------------------------------------------------------------
# The flags (where each setting of an online run comes from: resolve_settings, at the bottom)


def build_parser(flags=None):
    """dpo.py's flags. `flags`, a dict, gets each flag's argparse.Action by its dest: the values
    resolve_settings reads back from a run get the checks argparse gives a flag's text."""
    flags = {} if flags is None else flags
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)

    def group(title):  # an argument group whose add_argument also fills `flags`
        return recording_flags(parser.add_argument_group(title), flags)

    at_least_two = checked_number(int, "≥ 2 (a pair needs two responses)", lambda n: n >= 2)
    smoothing = checked_number(float, "in [0, 0.5)", lambda e: 0 <= e < 0.5)
    flag = group("offline").add_argument
    flag("--pairs", help="preference pairs JSONL")
    flag("--model", help="the starting policy, also the reference (the SFT model)")
    flag("--out", help="output folder")
    flag("--overwrite", action="store_true", help="train again even if --out holds a model")
    flag = group("online").add_argument
    flag("--iter", type=positive_int, help="run online iteration t (1-based)")
    flag("--run-dir", "--run", dest="run_dir", help="the run's folder (iter{t}/, config.json)")
    flag("--sft", help="the SFT model: π_0, the first policy and the reference")
    flag("--rm", help="reward model folder(s), comma-separated (an ensemble); or a verifier, "
         "FILE.py:function or package.module:function in TRL's reward-function convention "
         "(rewards.py); or 'gold', the built-in task's gold reward")
    flag("--gold", type=verifier_flag, metavar="VERIFIER",
         help="a verifier (as --rm) that summary.json compares the reward with on the policy's "
         "samples (reward_vs_gold; default: the built-in task's r* on its prompts)")
    flag("--ensemble", choices=["mean", "mean_minus_std"], default="mean",
         help="an ensemble's reward: the mean, or mean − std (Coste et al. 2023)")
    flag("--prompts", help="prompts JSONL; with '{t}' in the name, one file per iteration")
    flag("--iterations", type=positive_int, default=3, help="slices of a single --prompts file")
    flag("--n", "--num-samples", dest="n", type=at_least_two, default=8,
         help="responses per prompt (paper 1: 8)")
    flag("--temperature", type=positive_float, default=1.0, help="sampling temperature (> 0)")
    flag("--top-p", type=positive_fraction, default=1.0, help="nucleus mass (1 = off)")
    flag("--top-k", type=non_negative_int, default=0, help="top-k (0 = off)")
    flag("--max-new-tokens", type=positive_int, default=2048, help="response length cap")
    flag("--max-prompt-length", type=positive_int, help="skip (and count) longer prompts")
    flag("--pair-selection", choices=PAIR_SELECTIONS, default="max_min",
         help="best vs worst (paper 1), best vs a random other, or two random ones")
    flag("--length-penalty", type=non_negative_float, default=0.0,
         help="λ in r − λ·characters (paper 1's concise run: 0.001)")
    flag("--missing-eos-penalty", type=non_negative_float, default=0.0,
         help="subtracted from the reward of a response cut without a stop token")
    flag("--reward-tolerance", type=non_negative_float, default=0.0,
         help="drop a prompt when best − worst reward ≤ this")
    flag("--history", choices=["all", "last"], default="all",
         help="train on all pairs so far (paper) or the newest only (authors' code)")
    flag("--gen-batch-size", type=non_negative_int, default=0,
         help="decode slots per rank (0: as many as fit)")
    flag("--chunk-size", type=positive_int, default=256, help="prompts per resumable chunk")
    flag = (training := group("training")).add_argument
    flag("--loss", choices=["dpo", "ipo", "spce"], default="dpo", help="preference loss")
    flag("--beta", type=positive_float, default=0.1, help="β (paper 1: 0.1)")
    flag("--label-smoothing", type=smoothing, default=0.0, help="cDPO ε (makes the loss spce)")
    flag("--nll-coef", type=non_negative_float, default=0.0, help="RPO: weight of the chosen NLL")
    flag("--lr", type=positive_float, default=5e-7, help="peak learning rate (paper 1: 5e-7)")
    flag("--epochs", type=positive_float, default=2.0, help="passes over the pairs (paper 1: 2)")
    flag("--batch-size", type=positive_int, default=128, help="global batch in pairs (paper: 128)")
    flag("--micro-batch-size", type=positive_int, default=4, help="pairs per forward per rank")
    flag("--max-length", type=positive_int, default=4096, help="prompt + response tokens")
    flag("--max-steps", type=step_limit, default=-1, help="stop after this many steps (-1: off)")
    flag("--warmup-ratio", type=fraction, default=0.03, help="warmup fraction of the schedule")
    flag("--weight-decay", type=non_negative_float, default=0.0, help="AdamW weight decay")
    flag("--grad-clip", type=non_negative_float, default=1.0, help="max gradient norm (0: off)")
    flag("--parallel", choices=["fsdp", "ddp"], default="fsdp", help="under torchrun")
    flag("--device", default=None, help="cpu or cuda (default: cuda if available)")
    flag("--seed", type=int, default=0, help="data order; sampling seeds derive from it and t")
    flag("--log-every", type=positive_int, default=10, help="print a step line every N steps")
    for add_shared_flags in (add_scale_flags, add_lora_flags, add_tracking_flags, add_resume_flag):
        add_shared_flags(training)
    return parser


def main(argv=None):
    args, sources = resolve_settings(argv)
    dist_info = init_distributed(args.device)
    seed_everything(args.seed)
    print_memory_plan(args, dist_info)
    if args.dry_run:
        return destroy_distributed()
    if args.iter is not None:
        run_iteration(args, sources, dist_info)
    else:
        run_offline(args, sources, dist_info)
    destroy_distributed()


# ----------------------------------------------------------------------------------------------
# One online iteration: sample → score → pair → reference log-probs → train


def run_iteration(args, sources, dist_info):
    """Online iteration t in runs/NAME/iter{t}/; a rerun goes on where a crash stopped."""
    t = args.iter
    here, previous_policy, prompts = start_iteration(args, sources, dist_info)
    if prompts is not None:
        sample(args, dist_info, previous_policy, prompts, here)
    if not (here / "rewards.jsonl").exists():
        score_samples(args, dist_info, here)
    if not (here / "pairs.jsonl").exists() or summarised_against(here) != (args.gold or "gold"):
        make_pairs(args, dist_info, here)  # again when --gold changed: summary.json says which
    if not has_model(here / "policy"):
        pairs, example_groups = pairs_so_far(args, here)
        # With LoRA, π_{t−1} = π_0 + the adapter so far: π_0 is this same model, adapters off.
        start = args.sft if args.lora_rank else previous_policy
        adapter = previous_adapter(args, previous_policy) if args.lora_rank and t > 1 else None
        # train: the reference log-probs (step 4, once per iteration's pairs), then the update
        train(args, dist_info, start, args.sft, pairs, example_groups, here / "policy", adapter)
    print0(f"iteration {t} complete: {here}")


def sample(args, dist_info, previous_policy, prompts, here):
    """1. n responses per prompt from π_{t−1} to samples.jsonl (seeded per prompt and sample)."""
    t, device = args.iter, dist_info.device
    tokenizer = load_tokenizer(previous_policy)
    policy = sampling_policy(args, previous_policy, device, default_dtype(device))
    engine = generate.Engine(policy, args.gen_batch_size, stop_token_ids(tokenizer))
    sampling = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed * 1000 + t)
    process_in_chunks(prompts, here / "samples.jsonl",
                      lambda chunk, bar: generate.generate_records(engine, tokenizer, chunk,
                                                                   progress=bar, **sampling),
                      dist_info, chunk_size=args.chunk_size, desc=f"iter {t}: sampling",
                      settings={"policy": str(previous_policy), **sampling},
                      reports_progress=True)


def score_samples(args, dist_info, here):
    """2. Each response's reward, to rewards.jsonl: the reward model's, an ensemble's, or a
    verifier's (rewards.verifier_rewards; --rm gold: the built-in task's r*, the oracle control)."""
    samples = load_records(here / "samples.jsonl", "samples")
    if is_reward_function(args.rm):
        scorer = verifier_scorer(args.rm)
    else:
        scorer = ensemble_scorer(reward_models(args.rm), args.ensemble, dist_info.device,
                                 args.micro_batch_size * 4, args.max_length)
    process_in_chunks(samples, here / "rewards.jsonl", scorer, dist_info,
                      chunk_size=args.chunk_size, desc=f"iter {args.iter}: scoring",
                      settings=dict(**reward_function_settings(args.rm),
                                    max_length=args.max_length))


def make_pairs(args, dist_info, here):
    """3. One (chosen, rejected) pair per prompt (losses.select_pairs) to pairs.jsonl, and the
    samples' summary.json. Cheap and deterministic: rank 0 writes, the others wait."""
    t = args.iter
    scored = load_records(here / "rewards.jsonl", "rewards")
    # the token ids training will score, for records of other samplers too (tokens.response_ids)
    tokenizer = load_tokenizer(args.sft)
    scored = [{**rec, "response_ids": response_ids(tokenizer, rec)} for rec in scored]
    pairs, dropped = select_pairs(scored, args.pair_selection, args.length_penalty,
                                  args.missing_eos_penalty, args.reward_tolerance,
                                  source=f"iter{t}")
    summary, gold = samples_summary(t, scored, pairs, dropped, args.gold)
    if dist_info.is_main:
        atomic_write_text(here / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_jsonl(here / "pairs.jsonl", pairs)
        print0(f"iter {t}: mean reward {summary['mean_reward']:.4f}, "
               f"mean length {summary['mean_length_chars']:.1f} chars, "
               f"{len(pairs)} pairs kept, dropped {dropped}")
        if gold is not None and args.rm != (args.gold or "gold"):
            run_name = f"{Path(args.run_dir).name}, iteration {t}"
            samples_name = f"π_{t - 1}'s samples ({run_name})"
            print0(format_reward_vs_gold(summary["reward_vs_gold"], samples_name))
    barrier()


def summarised_against(here):
    """The gold reward iter{t}/summary.json compared the reward with ("gold": the built-in r*;
    older summaries name none and used r*); None without a summary."""
    summary = here / "summary.json"
    return json.loads(summary.read_text()).get("gold", "gold") if summary.exists() else None


def pairs_so_far(args, here):
    """The pairs iteration t trains on: of every iteration so far (--history all, the paper's
    algorithm) or of this one only (--history last, the authors' code). Returns (pairs, groups):
    a group is (tokenized pairs of one iteration, the path of their reference log-probs)."""
    run, t = Path(args.run_dir), args.iter
    tokenizer = load_tokenizer(args.sft)
    pairs, example_groups = [], []
    pair_iterations = range(1, t + 1) if args.history == "all" else [t]
    pairs_files = [run / f"iter{i}" / "pairs.jsonl" for i in pair_iterations]
    for path in pairs_files:
        iteration_pairs = load_records(path, "pairs", allow_empty=True)  # empty: all dropped
        kept, iteration_examples = tokenize_pairs(tokenizer, iteration_pairs, args.max_length)
        if iteration_examples:
            example_groups.append((iteration_examples, path.with_name("ref_logps.jsonl")))
        pairs += kept
    if not example_groups:
        files = ", ".join(map(str, pairs_files))
        raise InputError(f"no pairs to train on in {files}: every prompt's best and worst "
                         f"responses were the same text or tied (see {here / 'summary.json'}); "
                         f"delete {here} and rerun with a larger --n or --temperature, "
                         "or a smaller --reward-tolerance")
    return pairs, example_groups


def run_offline(args, sources, dist_info):
    """DPO of --model on the --pairs file, --model also the reference; the result in --out."""
    require_model(args.model, "--model")
    if already_trained(args.out, args.overwrite):
        return
    print_settings(args, sources, ("pairs", "model") + TRAINING_SETTINGS + ("micro_batch_size",),
                   f"offline {args.loss} settings (from the command line or the default):")
    out = Path(args.out)
    pairs = load_records(args.pairs, "pairs")
    kept, examples = tokenize_pairs(load_tokenizer(args.model), pairs, args.max_length)
    if not examples:
        dropped_note = (f", all dropped because their prompt alone fills "
                        f"--max-length {args.max_length}" if pairs else "")
        raise InputError(f"{args.pairs}: no pairs to train on ({len(pairs)} read"
                         + dropped_note + ")")
    if args.overwrite and dist_info.is_main:  # start over: record and reference log-probs too
        for name in ("settings.json", "ref_logps.jsonl"):
            (out / name).unlink(missing_ok=True)
    barrier()
    # ref_logps.jsonl survives a crash for the rerun to reuse, so it is recorded with its settings
    offline_settings = {k: getattr(args, k) for k in ("pairs", "model") + TRAINING_SETTINGS}
    check_settings(out / "settings.json", offline_settings, start_over=out)
    groups = [(examples, out / "ref_logps.jsonl")]
    train(args, dist_info, args.model, args.model, kept, groups, out)


# ----------------------------------------------------------------------------------------------
# Training: reference log-probs, then the optimizer steps


class PairBatch(NamedTuple):
    """A micro-batch of b pairs on one rank; padding slots (the global batch's remainder) re-use
    pair 0 with weight 0."""
    prompts: list                # b prompts' token ids
    chosen: list                 # b chosen responses' token ids
    rejected: list               # b rejected responses' token ids
    weight: torch.Tensor         # (b,) 1 for a pair, 0 for a padding slot
    ref_chosen: torch.Tensor     # (b,) log π_0 of the chosen response
    ref_rejected: torch.Tensor   # (b,) log π_0 of the rejected response
    target: torch.Tensor         # (b,) SPCE's soft label p (None or 1: DPO's hard label)


def train(args, dist_info, start_model, reference, pairs, example_groups, out_dir, adapter=None):
    """Preference optimisation of `start_model` (with LoRA: + `adapter`, a PEFT folder to continue)
    against `reference` on tokenized pairs, in groups [(examples, their ref_logps.jsonl path)].
    Saves an HF checkpoint and metrics.jsonl to out_dir."""
    device, world_size = dist_info.device, dist_info.world_size
    tokenizer = load_tokenizer(start_model)
    lora = lora_settings(args)
    checkpointing, save_dtype = scale_settings(args, device)
    examples = [e for group, _ in example_groups for e in group]

    def reference_pass(policy=None):  # step 4: log π_0 of each group's pairs, computed once
        return [r for group, path in example_groups
                for r in ensure_reference_logps(group, path, reference, dist_info, args.parallel,
                                                args.micro_batch_size, policy)]
    if lora is None:  # before the policy loads: each pass with its own short-lived model
        ref = reference_pass()
    model = load_for_training(start_model, args.parallel, dist_info,
                              activation_checkpointing=checkpointing, lora=lora, adapter=adapter)
    if lora is not None:  # the reference is this model with its adapters off
        ref = reference_pass(model)
    loss_type, targets = loss_and_targets(args, pairs)
    ref_table = torch.tensor(ref, dtype=torch.float32)         # (N, 2): log π_0 of chosen, rejected
    target_table = torch.tensor(targets, dtype=torch.float32)  # (N,)
    schedule = batch_schedule(len(examples), args.batch_size, args.epochs, args.seed,
                              args.max_steps)
    total_steps = len(schedule)
    switched = f" (--loss {args.loss} + --label-smoothing = cDPO)" if loss_type != args.loss else ""
    print0(f"{len(examples)} pairs, {total_steps} steps of {args.batch_size} pairs, "
           f"loss {loss_type}{switched}, β {args.beta}"
           + (f", cDPO ε {args.label_smoothing}" if args.label_smoothing else "")
           + (f", RPO α {args.nll_coef}" if args.nll_coef else ""))
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    # After a crash: the latest --save-every state, and the step to go on from (0: none).
    start = load_training_state(out_dir, model, optimizer, args)
    metrics = MetricsLogger(Path(out_dir) / "metrics.jsonl", enabled=dist_info.is_main,
                            report_to=args.report_to, run_name=f"dpo {out_dir}",
                            config=vars(args), resume_step=start)
    model.train()
    for step in tqdm(range(start, total_steps), desc=f"{loss_type} training", initial=start,
                     total=total_steps, disable=not dist_info.is_main):
        batch = schedule[step]
        t0 = time.time()
        lr = cosine_lr(step, total_steps, args.lr, args.warmup_ratio)
        set_lr(optimizer, lr)
        micro_batches = pair_batches(batch, examples, ref_table, target_table, dist_info,
                                     args.micro_batch_size)
        sums, grad_norm = train_step(model, optimizer, micro_batches, beta=args.beta,
                                     loss_type=loss_type, nll_coef=args.nll_coef,
                                     grad_clip=args.grad_clip, global_pairs=len(batch),
                                     pad_id=tokenizer.pad_token_id, world_size=world_size,
                                     device=device)
        totals = sums.reduce(device, grad_norm=grad_norm)  # the step's only host sync
        line = step_metrics(step, totals, len(batch), lr, time.time() - t0)
        metrics.log(**line)
        if dist_info.is_main and (step % args.log_every == 0 or step == total_steps - 1):
            tqdm.write(format_step(line, total_steps))
        save_training_state(out_dir, step + 1, total_steps, model, optimizer, args)
    metrics.close()
    # online with LoRA the adapter is always kept: the next iteration continues it
    save_checkpoint(model, out_dir, tokenizer, source_dir=start_model, dtype=save_dtype,
                    save_adapter=args.save_adapter or args.iter is not None)
    finish_training_state(out_dir)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()


def loss_and_targets(args, pairs):
    """The loss train_step computes, and each pair's target p (SPCE: the pair's soft label p,
    default 1; DPO: 1). cDPO's --label-smoothing ε (Mitchell 2023) is SPCE with the target
    p(1 − ε) + (1 − p)ε: with ε > 0 the loss is spce, whether --loss is dpo or spce."""
    targets = [float(pair.get("p", 1.0)) if args.loss == "spce" else 1.0 for pair in pairs]
    if args.label_smoothing:
        eps = args.label_smoothing
        return "spce", [t * (1 - eps) + (1 - t) * eps for t in targets]
    return args.loss, targets


def pair_batches(batch, examples, ref_table, target_table, dist_info, micro_batch_size):
    """This rank's PairBatches of one global batch of pair indices (padding: index −1)."""
    device = dist_info.device
    micro_batches = []
    for micro in rank_micro_batches(batch, dist_info.rank, dist_info.world_size, micro_batch_size):
        index = [max(i, 0) for i in micro]  # padding slots (-1) re-use example 0 with weight 0
        weight = torch.tensor([float(i >= 0) for i in micro], device=device)  # (b,)
        ref_chosen, ref_rejected = ref_table[index].to(device).unbind(1)      # (b,) each
        micro_batches.append(PairBatch(prompts=[examples[i].prompt for i in index],
                                       chosen=[examples[i].chosen for i in index],
                                       rejected=[examples[i].rejected for i in index],
                                       weight=weight, ref_chosen=ref_chosen,
                                       ref_rejected=ref_rejected,
                                       target=target_table[index].to(device)))
    return micro_batches


def train_step(model, optimizer, micro_batches, *, beta, loss_type, nll_coef, grad_clip,
               global_pairs, pad_id, world_size, device):
    """One optimizer step on this rank's micro-batches (PairBatch). Returns the step's StepSums (on
    the device) and the gradient norm (no host read here: memory_trace.py runs this function)."""
    sums = StepSums()
    for m, batch in enumerate(micro_batches):
        b = len(batch.prompts)
        with gradient_sync(model, sync=m == len(micro_batches) - 1):
            with autocast(model, device):
                # chosen and rejected in one forward: (2b, T)
                logps, num_tokens = sequence_logps(model, batch.prompts * 2,
                                                   batch.chosen + batch.rejected, pad_id, device)
            chosen, rejected = logps.float().split(b)  # (b,) each
            chosen_tokens, rejected_tokens = num_tokens.split(b)
            per_pair = preference_loss(chosen, rejected, batch.ref_chosen, batch.ref_rejected,
                                       beta, loss_type, batch.target, chosen_tokens,
                                       rejected_tokens)
            if nll_coef:  # RPO: keep the chosen response likely (its per-token NLL)
                per_pair = per_pair + per_token_nll(chosen, chosen_tokens, weight=nll_coef)
            # Mean over the global batch's pairs (× world size: gradients are averaged over ranks).
            loss = (per_pair * batch.weight).sum() / global_pairs * world_size
            loss.backward()
        with torch.no_grad():
            chosen_reward = implicit_reward(chosen, batch.ref_chosen, beta)
            rejected_reward = implicit_reward(rejected, batch.ref_rejected, beta)
            # log_ratio: the mean log π/π_0 of the training responses. Not a KL estimate: the
            # responses were sampled from π_{t−1}, not π, so it can be negative (README).
            log_ratio = ((chosen - batch.ref_chosen) + (rejected - batch.ref_rejected)) / 2
            weight = batch.weight
            sums.add(loss=per_pair * weight,
                     chosen_reward=chosen_reward * weight,
                     rejected_reward=rejected_reward * weight,
                     accuracy=(chosen_reward > rejected_reward) * weight,
                     log_ratio=log_ratio * weight,
                     tokens=(chosen_tokens + rejected_tokens) * weight)
    grad_norm = optimizer_step(model, optimizer, grad_clip)
    return sums, grad_norm


def step_metrics(step, totals, global_pairs, lr, seconds):
    """A step's line of metrics.jsonl: means over the global batch's pairs (TRL's names)."""
    averaged = ("loss", "chosen_reward", "rejected_reward", "accuracy", "log_ratio")
    mean = {k: totals[k] / global_pairs for k in averaged}
    return dict(step=step + 1, loss=mean["loss"],
                rewards_chosen=mean["chosen_reward"], rewards_rejected=mean["rejected_reward"],
                reward_accuracy=mean["accuracy"],
                reward_margin=mean["chosen_reward"] - mean["rejected_reward"],
                log_ratio=mean["log_ratio"], grad_norm=totals["grad_norm"], lr=lr,
                tokens_per_s=totals["tokens"] / seconds, ms=seconds * 1000)


def format_step(line, total_steps):
    return (f"step {line['step']}/{total_steps} | loss {line['loss']:.4f} | "
            f"chosen {line['rewards_chosen']:+.4f} | rejected {line['rewards_rejected']:+.4f} | "
            f"acc {line['reward_accuracy']:.3f} | log-ratio {line['log_ratio']:+.3f} | "
            f"grad {line['grad_norm']:.3f} | lr {line['lr']:.2e} | "
            f"{line['tokens_per_s']:,.0f} tok/s")


# ----------------------------------------------------------------------------------------------
# Run management: the settings of a run, starting an iteration, its prompts and models

# Settings that decide what an online iteration produces: recorded in iter{t}/settings.json (a
# rerun or resume with other values stops) and saved in config.json as the next one's defaults.
INPUT_SETTINGS = ("sft", "rm", "ensemble", "prompts", "iterations")
# + seed (the samples' seeds derive from it); max_prompt_length decides which prompts are sampled.
SAMPLING_SETTINGS = ("n", "temperature", "top_p", "top_k", "max_new_tokens", "max_prompt_length")
PAIRING_SETTINGS = ("pair_selection", "length_penalty", "missing_eos_penalty", "reward_tolerance",
                    "history")
TRAINING_SETTINGS = ("loss", "beta", "label_smoothing", "nll_coef", "lr", "epochs", "batch_size",
                     "max_length", "max_steps", "warmup_ratio", "weight_decay", "grad_clip", "seed",
                     "save_dtype", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
RESULT_SETTINGS = INPUT_SETTINGS + SAMPLING_SETTINGS + PAIRING_SETTINGS + TRAINING_SETTINGS
# Throughput settings: the same result whatever their value, up to floating-point summation order.
# Saved in config.json (a batch size that fits the memory should carry over), free on a resume.
THROUGHPUT_SETTINGS = ("micro_batch_size", "gen_batch_size", "chunk_size",
                       "activation_checkpointing", "save_every")
# What summary.json reports: saved in config.json, free on a resume (run_iteration makes the
# summary again when it names another gold).
REPORT_SETTINGS = ("gold",)
RUN_SETTINGS = RESULT_SETTINGS + THROUGHPUT_SETTINGS + REPORT_SETTINGS


def resolve_settings(argv=None):
    """Parse argv for an offline run or online iteration t. Returns (args, sources): sources[name]
    is where each setting came from, in this order of precedence: "command line",
    "iter{t}/settings.json" (a rerun or resume), "config.json" (the run's latest), "default"."""
    argv = sys.argv[1:] if argv is None else list(argv)
    flags = {}
    parser = build_parser(flags)
    args = parser.parse_args(argv)  # a bad flag stops here, before anything is read
    given = given_on_command_line(parser, argv)
    sources = {name: "command line" if name in given else "default" for name in vars(args)}
    if args.iter is not None and args.run_dir is not None:
        run = Path(args.run_dir)
        records = (run / "config.json", run / f"iter{args.iter}" / "settings.json")  # later wins
        read_back_settings(args, sources, flags, RUN_SETTINGS, records, root=run)
    check_mode(parser, args)
    return args, sources


def check_mode(parser, args):
    """Offline needs --pairs, --model and --out; online --iter, --run-dir and (given or read back)
    --sft, --rm and --prompts; and the settings that only work together."""
    if args.iter is not None:
        if args.run_dir is None:
            parser.error("--iter needs --run-dir")
        if args.overwrite:
            parser.error("--overwrite is for offline mode; "
                         "to redo an online iteration delete its folder")
        if not (args.sft and args.rm and args.prompts):
            parser.error(f"online mode needs --sft, --rm and --prompts: give them at iteration 1 "
                         f"(later iterations read them from {Path(args.run_dir) / 'config.json'})")
        if is_reward_function(args.rm):
            try:
                load_reward_function(args.rm)  # a verifier that cannot load stops here
            except InputError as error:
                parser.error(f"argument --rm: {error}")
        if args.ensemble != "mean" and (is_reward_function(args.rm)
                                        or len(reward_models(args.rm)) < 2):
            parser.error(f"--ensemble {args.ensemble} needs two or more reward models "
                         "(--rm A,B,...)")
    elif args.gold:
        parser.error("--gold is for online mode (--iter): it checks the online samples' rewards")
    elif not (args.pairs and args.model and args.out):
        parser.error("offline mode needs --pairs, --model and --out "
                     "(or --iter and --run-dir for online mode)")
    if args.iter is not None and args.gen_batch_size and args.n > args.gen_batch_size:
        parser.error(f"--n {args.n} samples per prompt need --gen-batch-size {args.n} or more "
                     f"(it is {args.gen_batch_size})")
    if args.label_smoothing and args.loss == "ipo":
        parser.error("--label-smoothing (cDPO) applies to --loss dpo or spce, not ipo")


def print_memory_plan(args, dist_info):
    """The per-rank memory plan of these settings (a missing model is left to the checks that name
    its flag, except under --dry-run, which prints only the plan)."""
    plan_model = args.sft if args.iter is not None else args.model
    if args.dry_run:
        require_model(plan_model, "--sft" if args.iter is not None else "--model")
    if plan_model is not None and has_model(plan_model):
        checkpointing, _ = scale_settings(args, dist_info.device)
        print_stage_plan(plan_model, "dpo", dist_info, args.micro_batch_size, args.max_length,
                         args.parallel, checkpointing, lora=lora_settings(args))


def start_iteration(args, sources, dist_info):
    """Check everything iteration t reads (models; prompts, when there is sampling to do) before
    anything is written, then record its settings (runs.record_iteration_settings). Returns
    (iteration folder, π_{t−1} folder, chunk t's prompts to sample or None when sampled)."""
    run, t = Path(args.run_dir), args.iter
    here = run / f"iter{t}"
    require_model(args.sft, "--sft", sources["sft"])
    if not is_reward_function(args.rm):  # a verifier was loaded by check_mode
        for folder in reward_models(args.rm):
            require_model(folder, "--rm", sources["rm"])
    previous_policy = Path(args.sft) if t == 1 else run / f"iter{t - 1}" / "policy"
    if t > 1 and not has_model(previous_policy):
        raise InputError(f"{previous_policy} holds no model: run iteration {t - 1} first "
                         f"(python dpo.py --iter {t - 1} --run-dir {run})")
    title = (f"iter {t} settings (from the command line, {run}/config.json, "
             f"{here.name}/settings.json or the default):")
    print_settings(args, sources, RUN_SETTINGS, title)
    prompts = None
    if not (here / "samples.jsonl").exists():
        records, path = prompt_chunk(args, t)
        # Each prompt must leave room for --max-new-tokens in the model's context (generate.py
        # says which does not); those over --max-prompt-length are skipped (counted).
        context = ModelConfig.from_path(previous_policy).max_position_embeddings
        prompts, _ = generate.encode_prompts(load_tokenizer(previous_policy), records,
                                             args.max_new_tokens, context, path,
                                             args.max_prompt_length)
    barrier()  # every rank has read config.json and the record before rank 0 writes them
    # The ensemble's mode matters only with two or more reward models: a one-model run records
    # none, as runs made before ensembles did, so they still resume.
    iteration_settings = {k: getattr(args, k) for k in RESULT_SETTINGS
                          if k != "ensemble" or len(reward_models(args.rm)) > 1}
    record_iteration_settings(run, t, iteration_settings,
                              {k: getattr(args, k) for k in RUN_SETTINGS})
    return here, previous_policy, prompts


def prompt_chunk(args, t):
    """Chunk t of the prompts, and the file it comes from: a file per iteration ('{t}' in
    --prompts), or the t-th of --iterations equal slices of one file."""
    if "{t}" in args.prompts:
        path = args.prompts.format(t=t)
        return load_records(path, "prompts"), path
    prompts = load_records(args.prompts, "prompts")
    size = math.ceil(len(prompts) / args.iterations)
    chunk = prompts[(t - 1) * size:t * size]
    if not chunk:
        raise InputError(f"{args.prompts}: its {len(prompts)} prompts cut into "
                         f"--iterations {args.iterations} slices leave none for iteration {t}")
    return chunk, args.prompts


def sampling_policy(args, previous_policy, device, dtype):
    """π_{t−1} to sample from: its checkpoint; with LoRA after iteration 1, π_0 + iteration t−1's
    adapter unmerged, the model that was trained (its merged checkpoint in bf16 rounds away most
    of a small update W + s·BA)."""
    if not (args.lora_rank and args.iter > 1):
        return Transformer.from_pretrained(previous_policy, device=device, dtype=dtype).eval()
    policy = Transformer.from_pretrained(args.sft, device=device, dtype=dtype)
    return add_adapter(policy, previous_adapter(args, previous_policy), dtype).eval()


def previous_adapter(args, previous_policy):
    """With LoRA, iteration t > 1 continues iteration t − 1's adapter: its folder, checked."""
    adapter = previous_policy / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise InputError(f"{adapter}: no LoRA adapter; with --lora-rank every iteration from the "
                         f"first must train with LoRA (delete {args.run_dir} and start over, or "
                         "drop --lora-rank)")
    return adapter


if __name__ == "__main__":
    run_cli(main)
