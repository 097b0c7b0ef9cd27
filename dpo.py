"""DPO / IPO / SPCE preference optimisation: offline on a pairs file, or as one iteration of online
iterative RLHF (paper 1, RLHF Workflow, Algorithm 1 as practised in its §3.3).

    # offline DPO (the paper's "DPO baseline"): SFT model + a preference pairs file
    python dpo.py --pairs data/builtin/pairs_train.jsonl --model runs/builtin/sft --out runs/builtin/dpo_offline

    # online iterative DPO, one whole iteration per call (sample → score → pair → train)
    python dpo.py --iter 1 --run-dir runs/builtin/online --sft runs/builtin/sft --rm runs/builtin/rm \\
        --prompts 'data/builtin/prompts_iter{t}.jsonl'
    python dpo.py --iter 2 --run-dir runs/builtin/online          # the run's settings are read back
    python dpo.py --iter 3 --run-dir runs/builtin/online --lr 1e-6    # ... and may be changed for a new iteration
    torchrun --nproc_per_node 8 dpo.py --iter 2 --run-dir runs/NAME

(Under torchrun spell it --run-dir, not --run: torchrun's own argument parser reads "--run" as an
abbreviation of its --run-path option and stops with "ambiguous option". Flags must be spelled out
in full here too: an abbreviation such as --temp is an error, never a silent guess.)

Iteration t, in runs/NAME/iter{t}/, each sub-step skipped on rerun when its output is complete:
  settings.json    the settings the iteration is made with (written once its inputs are checked,
                   before its first output; never rewritten)
  samples.jsonl    n responses per prompt of chunk t from π_{t−1} (π_0 = SFT), generate.py's engine
  rewards.jsonl    the reward model's score of each response (train_rm.py)
  pairs.jsonl      (chosen, rejected) by reward − λ·characters (− c if cut without a stop token):
                   best vs worst, or --pair-selection's choice; prompts whose two responses are the
                   same text or within --reward-tolerance are dropped (and counted)
  ref_logps.jsonl  log π_0 of every pair's chosen and rejected response, computed once, no grad
  policy/          DPO from π_{t−1} with reference π_0 on the pairs so far (--history all, the
                   paper's algorithm) or only this iteration's (--history last, the authors' code)
  summary.json     mean reward and length of the samples, pairs kept and dropped
  policy.resume/   with --save-every N: the update's training state every N steps, so that a
                   crash mid-update costs at most N steps (training.save_training_state)

Settings of an online run. Each setting comes from, in order: the command line; the iteration's own
iter{t}/settings.json (a rerun or a resume of iteration t); the run's config.json; the default. The
start of every iteration prints each setting with its source.
  config.json          the defaults of the NEXT iteration: the settings of the latest iteration
                       started, rewritten each time that iteration runs. Iteration 1 needs --sft,
                       --rm and --prompts; later iterations read everything back from here.
  iter{t}/settings.json  the immutable record of the settings that decide what iteration t produces
                       (RESULT_SETTINGS below). A rerun or a resume with a different value stops
                       with an error naming the setting, so no output mixes two sets of settings.
The throughput settings (--micro-batch-size, --gen-batch-size, --chunk-size) change only how the
work is cut up (samples are seeded per prompt and sample index; losses are sums over the global
batch), so they are kept in config.json but may change on a resume, e.g. a smaller micro-batch after
running out of memory. --save-every (how often the update's training state is saved) is kept the
same way. --device, --parallel, --log-every and --report-to are never saved.
Offline, --out gets the same kind of record (settings.json beside ref_logps.jsonl, which a rerun
after a crash reuses); a --out that holds a model is skipped unless --overwrite.

LoRA (--lora-rank r, --lora-alpha, --lora-targets; model.add_lora): only the adapters train; the
reference π_0 is the same model with its adapters off (no second copy, as TRL does with PEFT).
Online, iteration t trains π_0 + the adapter of iteration t − 1, saved in iter{t−1}/policy/adapter/
(PEFT's format), and samples from that same π_0 + adapter, unmerged (sampling_policy); policy/ itself
holds the merged model, W + s·BA from π_0's weights as stored, in --save-dtype (bf16 on a GPU rounds
most of a small update away: use --save-dtype float32 for an export that keeps it).

Losses, with h = [log π(a_w|x) − log π_0(a_w|x)] − [log π(a_l|x) − log π_0(a_l|x)]:
  DPO   −log σ(βh)                               (Rafailov et al. 2023, eq. 7; paper 1 eq. (3))
  IPO   (h − 1/(2β))²                            (Azar et al. 2023, eq. 17) on length-normalised log-probs
  SPCE  −[p log σ(βh) + (1 − p) log σ(−βh)]      (paper 2, eq. (8); its gradient is eq. (9)): soft label p; p = 1 is DPO
  cDPO  SPCE with p = 1 − ε (--label-smoothing ε, with --loss dpo or spce);  RPO: + α · per-token NLL
        of the chosen response (--nll-coef α)

Two conventions where we knowingly differ from TRL 1.16's DPOTrainer, both chosen so that training
scores exactly the tokens that generation produced:
  - a response that stopped ends at its stop token (e.g. <|im_end|>): that is where sampling stops, so
    it is the last token the policy chose. TRL also trains the chat template's trailing newline after
    it, a token our samples never contain. A response cut at --max-new-tokens has no stop token, and
    none is added: the online pairs carry the sampled token ids (chosen_ids / rejected_ids, from the
    samples' response_ids; data/README.md), so nothing is re-encoded from the decoded text.
  - prompt and response are tokenized separately (tokens.encode_prompt + tokens.encode_response).
    Generation sees exactly the prompt's ids and appends response tokens one by one, so a sampled
    response never shares a token with its prompt; TRL's joint tokenization of prompt + response can
    merge a leading space or newline of the response into the prompt's last token, which scores a
    token sequence the sampler did not produce.
"""
import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import generate
from parallel import add_adapter, add_lora_flags, add_scale_flags, default_dtype, destroy_distributed, gradient_sync, init_distributed, load_for_training, lora_settings, save_checkpoint, scale_settings, unwrap
from runs import InputError, MetricsLogger, add_tracking_flags, already_trained, atomic_write_text, check_settings, checked_number, fraction, has_model, non_negative_float, non_negative_int, positive_float, positive_fraction, positive_int, print0, process_in_chunks, read_jsonl, run_cli, step_limit, write_jsonl
from tokens import encode_prompt, encode_response, end_of_turn_ids, load_tokenizer, response_ids, stop_token_ids
from training import StepSums, add_resume_flag, autocast, batch_schedule, cosine_lr, finish_training_state, load_training_state, make_optimizer, optimizer_step, rank_micro_batches, save_training_state, seed_everything, set_lr
from data.schema import load_records
from data.task import format_reward_vs_gold, gold_scored, reward_vs_gold, score
from memory_plan import print_stage_plan
from model import ModelConfig, Transformer
from losses import per_token_nll, PAIR_SELECTIONS, ensemble_rewards, preference_loss, select_pairs, sequence_logps
from rewards import reward_models


# ----------------------------------------------------------------------------------------------
# Pairs -> token ids; reference log-probs


def tokenize_pairs(tokenizer, pairs, max_length):
    """Returns (kept pairs, examples): an example is (prompt ids, chosen ids, rejected ids). A pair made
    from samples carries its responses' ids (chosen_ids, rejected_ids: exactly the sampled tokens, a stop
    token only where one was sampled); a pair of texts (human preferences) is encoded, each response
    ending with the end-of-turn token. A response cut by max_length is kept truncated; a pair whose
    prompt leaves no room is dropped. Both are counted and reported."""
    end_of_turn = end_of_turn_ids(tokenizer)
    kept, examples, truncated, dropped = [], [], 0, 0
    for pair in pairs:
        prompt = encode_prompt(tokenizer, pair["prompt"])
        room = max_length - len(prompt)
        if room < 1:
            dropped += 1
            continue
        chosen = pair.get("chosen_ids") or encode_response(tokenizer, pair["chosen"], end_of_turn)
        rejected = pair.get("rejected_ids") or encode_response(tokenizer, pair["rejected"], end_of_turn)
        if max(chosen + rejected) >= len(tokenizer):
            raise InputError(f"pair {pair.get('id', len(kept) + dropped)}: token id {max(chosen + rejected)} is not in the "
                             f"tokenizer's vocabulary ({len(tokenizer)} ids): its chosen_ids / rejected_ids come from "
                             "another tokenizer; delete them to train on the texts")
        truncated += (len(chosen) > room) + (len(rejected) > room)
        kept.append(pair)
        examples.append((prompt, chosen[:room], rejected[:room]))
    if truncated or dropped:
        print0(f"warning: {truncated} responses truncated to --max-length {max_length}; "
               f"{dropped} pairs dropped because their prompt alone fills it")
    return kept, examples


@torch.no_grad()
def reference_logps(model, examples, pad_id, dist_info, micro_batch_size):
    """log π_0 of every pair's chosen and rejected response, list of (chosen, rejected) floats in
    pair order, identical on every rank. Runs through the same (wrapped) model and dtype path as the
    policy's forward, so at step 0 of iteration 1 the policy's h is exactly 0. The results stay on
    the device until the pass ends (one host read)."""
    model.eval()
    device = dist_info.device
    batches = rank_micro_batches(range(len(examples)), dist_info.rank, dist_info.world_size,
                                 micro_batch_size)
    chosen, rejected = [], []
    for batch in tqdm(batches, desc="reference log-probs", disable=not dist_info.is_main):
        # padding (-1) re-uses example 0; its result is dropped
        rows = [examples[max(i, 0)] for i in batch]
        prompts = [e[0] for e in rows] * 2
        responses = [e[1] for e in rows] + [e[2] for e in rows]
        with autocast(model, device):
            logps, _ = sequence_logps(model, prompts, responses, pad_id, device)
        chosen.append(logps[:len(rows)].float())
        rejected.append(logps[len(rows):].float())
    values = []
    if batches:
        values = torch.stack([torch.cat(chosen), torch.cat(rejected)], 1).tolist()  # (my pairs, 2)
    pair_indices = (i for batch in batches for i in batch)
    results = {i: tuple(v) for i, v in zip(pair_indices, values) if i >= 0}
    if dist.is_initialized():
        gathered = [None] * dist_info.world_size
        dist.all_gather_object(gathered, results)
        results = {k: v for part in gathered for k, v in part.items()}
    return [results[i] for i in range(len(examples))]


# ----------------------------------------------------------------------------------------------
# Training


def ensure_reference_logps(args, dist_info, examples, path, policy=None):
    """The reference π_0's log-probs of every example's chosen and rejected response, read from
    `path` or, the first time, computed there (once, no grad). Without LoRA the reference model is
    loaded only for this pass and freed before the policy is loaded: never two models in memory at
    once. With LoRA, `policy` (π_0 + adapters) is the reference with its adapters off: no second copy."""
    if Path(path).exists():
        ref = [(r["ref_chosen_logp"], r["ref_rejected_logp"]) for r in read_jsonl(path)]
        if len(ref) != len(examples):
            raise InputError(f"{path} has {len(ref)} records for {len(examples)} pairs; "
                             f"delete it to recompute")
        return ref
    device = dist_info.device
    tokenizer = load_tokenizer(args.reference)
    pad_id = tokenizer.pad_token_id
    if policy is not None:
        with unwrap(policy).adapters_disabled():
            ref = reference_logps(policy, examples, pad_id, dist_info, args.micro_batch_size)
    else:
        reference = load_for_training(args.reference, args.parallel, dist_info)
        ref = reference_logps(reference, examples, pad_id, dist_info, args.micro_batch_size)
        del reference
    if dist_info.is_main:
        write_jsonl(path, [{"ref_chosen_logp": c, "ref_rejected_logp": r} for c, r in ref])
    if dist.is_initialized():
        dist.barrier()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ref


def train_step(model, optimizer, micro_batches, beta, loss_type, nll_coef, grad_clip, global_pairs,
               pad_id, world_size, device):
    """One optimizer step on this rank's micro-batches, each a tuple (prompt ids, chosen ids, rejected
    ids, weight (b,), ref chosen (b,), ref rejected (b,), target (b,)); padding slots have weight 0.
    Returns the step's StepSums (on the device) and the gradient norm (no host read here:
    memory_trace.py runs this same function)."""
    sums = StepSums()
    for m, micro_batch in enumerate(micro_batches):
        prompts, chosen_ids, rejected_ids, weight, ref_chosen, ref_rejected, target = micro_batch
        with gradient_sync(model, sync=m == len(micro_batches) - 1):
            with autocast(model, device):
                # chosen and rejected in one forward: (2b, T)
                logps, num_tokens = sequence_logps(model, prompts * 2, chosen_ids + rejected_ids,
                                                   pad_id, device)
            chosen, rejected = logps.float().split(len(prompts))  # (b,) each
            chosen_tokens, rejected_tokens = num_tokens.split(len(prompts))
            per_pair = preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type,
                                       target, chosen_tokens, rejected_tokens)
            if nll_coef:  # RPO: keep the chosen response likely (its per-token NLL)
                per_pair = per_pair + nll_coef * per_token_nll(chosen, chosen_tokens)
            # Mean over the global batch's pairs (× world size: gradients are averaged over ranks).
            loss = (per_pair * weight).sum() / global_pairs * world_size
            loss.backward()
        with torch.no_grad():
            chosen_reward = beta * (chosen - ref_chosen)
            rejected_reward = beta * (rejected - ref_rejected)
            # log_ratio: the mean log π/π_0 of the training responses. Not a KL estimate: the
            # responses were sampled from π_{t−1}, not π, so it can be negative (README, "step lines").
            sums.add(loss=per_pair * weight,
                     chosen_reward=chosen_reward * weight,
                     rejected_reward=rejected_reward * weight,
                     accuracy=(chosen_reward > rejected_reward) * weight,
                     log_ratio=((chosen - ref_chosen) + (rejected - ref_rejected)) / 2 * weight,
                     tokens=(chosen_tokens + rejected_tokens) * weight)
    grad_norm = optimizer_step(model, optimizer, grad_clip)
    return sums, grad_norm


def train(args, dist_info, start_model, pairs, example_groups, out_dir, adapter=None):
    """Preference optimisation of `start_model` (with LoRA: + `adapter`, a PEFT folder to continue)
    on tokenized examples (from tokenize_pairs), given as groups [(examples, ref_logps path)]: each
    group's reference log-probs are read from its path or computed there first. Saves an HF
    checkpoint (+ metrics.jsonl) to out_dir."""
    device, world_size = dist_info.device, dist_info.world_size
    tokenizer = load_tokenizer(start_model)
    lora = lora_settings(args)
    checkpointing, save_dtype = scale_settings(args, device)
    examples = [e for group, _ in example_groups for e in group]
    if lora is None:  # the reference passes first, each with its own short-lived model
        ref = [r for group, path in example_groups
               for r in ensure_reference_logps(args, dist_info, group, path)]
    model = load_for_training(start_model, args.parallel, dist_info,
                              activation_checkpointing=checkpointing, lora=lora, adapter=adapter)
    if lora is not None:  # the reference is this model with its adapters off
        ref = [r for group, path in example_groups
               for r in ensure_reference_logps(args, dist_info, group, path, policy=model)]
    # Soft labels: SPCE reads each pair's p (default 1); DPO's labels are hard (p = 1). cDPO: the
    # label is right with probability 1 − ε, i.e. SPCE with target p(1 − ε) + (1 − p)ε.
    targets = [float(pair.get("p", 1.0)) if args.loss == "spce" else 1.0 for pair in pairs]
    if args.label_smoothing:
        targets = [t * (1 - args.label_smoothing) + (1 - t) * args.label_smoothing for t in targets]
    loss_type = "spce" if args.label_smoothing else args.loss
    ref_table = torch.tensor(ref, dtype=torch.float32)         # (N, 2): log π_0 of chosen, rejected
    target_table = torch.tensor(targets, dtype=torch.float32)  # (N,)

    schedule = batch_schedule(len(examples), args.batch_size, args.epochs, args.seed,
                              args.max_steps)
    total_steps = len(schedule)
    cdpo_note = f", cDPO ε {args.label_smoothing}" if args.label_smoothing else ""
    rpo_note = f", RPO α {args.nll_coef}" if args.nll_coef else ""
    print0(f"{len(examples)} pairs, {total_steps} steps of {args.batch_size} pairs, "
           f"loss {loss_type}, β {args.beta}" + cdpo_note + rpo_note)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    # After a crash: the latest --save-every state, and the step to go on from (0: none).
    start = load_training_state(out_dir, model, optimizer, args)
    metrics_path = Path(out_dir) / "metrics.jsonl"
    metrics = MetricsLogger(metrics_path, enabled=dist_info.is_main, report_to=args.report_to,
                            run_name=f"dpo {out_dir}", config=vars(args), resume_step=start)

    # One host read per step: the metrics stay on the device (StepSums) until reduce().
    model.train()
    for step in tqdm(range(start, total_steps), desc=f"{loss_type} training", initial=start,
                     total=total_steps, disable=not dist_info.is_main):
        batch = schedule[step]
        t0 = time.time()
        lr = cosine_lr(step, total_steps, args.lr, args.warmup_ratio)
        set_lr(optimizer, lr)
        global_pairs = len(batch)
        micro_batches = []
        for micro in rank_micro_batches(batch, dist_info.rank, world_size, args.micro_batch_size):
            index = [max(i, 0) for i in micro]  # padding slots (-1) re-use example 0 with weight 0
            weight = torch.tensor([float(i >= 0) for i in micro], device=device)  # (b,)
            ref_chosen, ref_rejected = ref_table[index].to(device).unbind(1)      # (b,) each
            prompts = [examples[i][0] for i in index]
            chosen_ids = [examples[i][1] for i in index]
            rejected_ids = [examples[i][2] for i in index]
            target = target_table[index].to(device)
            micro_batches.append((prompts, chosen_ids, rejected_ids, weight,
                                  ref_chosen, ref_rejected, target))
        sums, grad_norm = train_step(model, optimizer, micro_batches, args.beta, loss_type,
                                     args.nll_coef, args.grad_clip, global_pairs,
                                     tokenizer.pad_token_id, world_size, device)
        totals = sums.reduce(device, grad_norm=grad_norm)  # the step's only host sync
        dt = time.time() - t0
        averaged = ("loss", "chosen_reward", "rejected_reward", "accuracy", "log_ratio")
        mean = {k: totals[k] / global_pairs for k in averaged}
        line = dict(step=step + 1, loss=mean["loss"],
                    rewards_chosen=mean["chosen_reward"], rewards_rejected=mean["rejected_reward"],
                    reward_accuracy=mean["accuracy"],
                    reward_margin=mean["chosen_reward"] - mean["rejected_reward"],
                    log_ratio=mean["log_ratio"], grad_norm=totals["grad_norm"], lr=lr,
                    tokens_per_s=totals["tokens"] / dt, ms=dt * 1000)
        metrics.log(**line)
        if dist_info.is_main and (step % args.log_every == 0 or step == total_steps - 1):
            tqdm.write(f"step {step + 1}/{total_steps} | loss {line['loss']:.4f} | "
                       f"chosen {line['rewards_chosen']:+.4f} | "
                       f"rejected {line['rewards_rejected']:+.4f} | "
                       f"acc {line['reward_accuracy']:.3f} | log-ratio {line['log_ratio']:+.3f} | "
                       f"grad {line['grad_norm']:.3f} | lr {lr:.2e} | "
                       f"{line['tokens_per_s']:,.0f} tok/s")
        save_training_state(out_dir, step + 1, total_steps, model, optimizer, args)
    metrics.close()
    # online with LoRA the adapter is always kept: the next iteration continues it
    save_checkpoint(model, out_dir, tokenizer, source_dir=start_model, dtype=save_dtype,
                    save_adapter=args.save_adapter or args.iter is not None)
    finish_training_state(out_dir)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()


def require_model(path, what):
    """Stop with one line naming `path` unless it holds a model."""
    if path is None:
        raise InputError(f"{what} is required")
    if not Path(path).is_dir():
        raise InputError(f"{what} {path}: no such model folder")
    if not has_model(path):
        raise InputError(f"{what} {path}: holds no model "
                         "(expected config.json and model.safetensors)")


def start_iteration(args, sources, dist_info):
    """Check everything iteration t reads before anything is written: the models, and the prompts
    when there is sampling to do. Then record its settings (iter{t}/settings.json; a rerun or resume
    that differs from the record stops) and, when it is the run's latest iteration, make them the
    next iteration's defaults (config.json). Returns (iteration folder, π_{t−1} folder, chunk t's
    prompts records to sample, or None when its samples are done)."""
    run, t = Path(args.run_dir), args.iter
    here = run / f"iter{t}"
    def read_back(name):  # " (from config.json)" when the value was read back, not given now
        return "" if sources[name] == "command line" else f" (from {sources[name]})"
    require_model(args.sft, f"--sft{read_back('sft')}")
    if args.rm != "gold":
        for folder in reward_models(args.rm):
            require_model(folder, f"--rm{read_back('rm')}")
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
        # Every prompt must leave room for --max-new-tokens in the model's context (generate.py says which does not).
        config_text = (previous_policy / "config.json").read_text()
        context = ModelConfig.from_dict(json.loads(config_text)).max_position_embeddings
        # Prompts over --max-prompt-length are skipped (counted): their records are absent from samples.jsonl on.
        policy_tokenizer = load_tokenizer(previous_policy)
        prompts, _ = generate.encode_prompts(policy_tokenizer, records, args.max_new_tokens, context,
                                             path, args.max_prompt_length)
    if dist.is_initialized():
        dist.barrier()  # every rank has read config.json and the record before rank 0 writes them
    # The ensemble's mode matters only with two or more reward models: a one-model run records none, as
    # runs made before ensembles did, so they still resume.
    iteration_settings = {k: getattr(args, k) for k in RESULT_SETTINGS
                          if k != "ensemble" or len(reward_models(args.rm)) > 1}
    check_settings(here / "settings.json", iteration_settings, start_over=here)
    started = [int(m.group(1)) for p in run.glob("iter*/settings.json")
               if (m := re.fullmatch(r"iter(\d+)", p.parent.name))]
    if dist_info.is_main and t >= max(started, default=t):
        run_settings = {k: getattr(args, k) for k in RUN_SETTINGS}
        atomic_write_text(run / "config.json", json.dumps(run_settings, indent=2) + "\n")
    return here, previous_policy, prompts


def sampling_policy(args, previous_policy, device, dtype):
    """π_{t−1} to sample from: its checkpoint; with LoRA after iteration 1, π_0 + iteration t−1's adapter
    unmerged, the model that was trained, computing as it trained. Its merged checkpoint in bf16 (a
    GPU's save dtype) is not that model: W + s·BA rounded to bf16 drops most of a small update."""
    if not (args.lora_rank and args.iter > 1):
        return Transformer.from_pretrained(previous_policy, device=device, dtype=dtype).eval()
    policy = Transformer.from_pretrained(args.sft, device=device, dtype=dtype)
    return add_adapter(policy, previous_adapter(args, previous_policy), dtype).eval()


def previous_adapter(args, previous_policy):
    """With LoRA, iteration t > 1 continues iteration t − 1's adapter: its folder, which must exist."""
    adapter = previous_policy / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise InputError(f"{adapter}: no LoRA adapter; with --lora-rank every iteration from the first must "
                         f"train with LoRA (delete {args.run_dir} and start over, or drop --lora-rank)")
    return adapter


def run_iteration(args, sources, dist_info):
    """Online iteration t, top to bottom: sample → score → pair → reference log-probs → train. Each
    sub-step is skipped when its output is complete, so a rerun continues where a crash stopped."""
    run, t = Path(args.run_dir), args.iter
    here, previous_policy, prompts = start_iteration(args, sources, dist_info)
    args.reference = args.sft
    device = dist_info.device

    # 1. Samples from π_{t−1}.
    if prompts is not None:
        tokenizer = load_tokenizer(previous_policy)
        dtype = default_dtype(device)
        policy = sampling_policy(args, previous_policy, device, dtype)
        engine = generate.Engine(policy, args.gen_batch_size, stop_token_ids(tokenizer))
        sampling = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed * 1000 + t)
        process_in_chunks(prompts, here / "samples.jsonl",
                          lambda chunk, bar: generate.generate_records(engine, tokenizer, chunk,
                                                                       progress=bar, **sampling),
                          dist_info, chunk_size=args.chunk_size, desc=f"iter {t}: sampling",
                          settings={"policy": str(previous_policy), **sampling},
                          reports_progress=True)
        del policy, engine
    # 2. Rewards: the reward model's, or (--rm gold, the built-in task's control) the gold reward r*.
    if not (here / "rewards.jsonl").exists():
        samples = load_records(here / "samples.jsonl", "samples")
        if args.rm == "gold":
            scorer = lambda chunk: [  # noqa: E731
                {**r, "rewards": [score(r["prompt"], y) for y in r["responses"]]} for r in chunk]
        else:
            dtype = default_dtype(device)
            members = [(Transformer.from_pretrained(folder, device=device, dtype=dtype, head="score").eval(),
                        load_tokenizer(folder)) for folder in reward_models(args.rm)]

            def scorer(chunk):
                scored = [rewards.score_records(rm, rm_tokenizer, chunk, device, args.micro_batch_size * 4, args.max_length)
                          for rm, rm_tokenizer in members]
                return [{**r, "rewards": ensemble_rewards([s[i]["rewards"] for s in scored], args.ensemble)}
                        for i, r in enumerate(chunk)]
        process_in_chunks(samples, here / "rewards.jsonl", scorer, dist_info,
                          chunk_size=args.chunk_size, desc=f"iter {t}: scoring",
                          settings=dict(rm=args.rm, max_length=args.max_length))
        scorer = members = None  # free the reward models before training
    # 3. Pairs (cheap and deterministic: rank 0 writes, the others wait).
    if not (here / "pairs.jsonl").exists():
        rewards = load_records(here / "rewards.jsonl", "rewards")
        # the token ids training will score, for records of other samplers too (tokens.response_ids)
        tokenizer = load_tokenizer(args.sft)
        rewards = [{**rec, "response_ids": response_ids(tokenizer, rec)} for rec in rewards]
        pairs, dropped = select_pairs(rewards, args.pair_selection, args.length_penalty,
                                      args.missing_eos_penalty, args.reward_tolerance, source=f"iter{t}")
        all_rewards = [r for rec in rewards for r in rec["rewards"]]
        total_chars = sum(len(x) for rec in rewards for x in rec["responses"])
        summary = dict(iteration=t, prompts=len(rewards), samples=len(all_rewards),
                       mean_reward=sum(all_rewards) / len(all_rewards),
                       mean_length_chars=total_chars / len(all_rewards))
        # optional: samples from other generators may lack it
        if all("num_tokens" in rec for rec in rewards):
            total_tokens = sum(n for rec in rewards for n in rec["num_tokens"])
            summary["mean_tokens"] = total_tokens / len(all_rewards)
        # samples that hit --max-new-tokens without a stop token (--missing-eos-penalty lowers their r̃)
        finish_reasons = [reason for rec in rewards for reason in rec.get("finish_reasons", [])]
        summary["missing_eos"] = sum(reason == "length" for reason in finish_reasons)
        summary.update(pairs_kept=len(pairs), pairs_dropped=dropped)
        # on the built-in task: how good is the reward on the policy's own samples?
        scored = gold_scored(rewards)
        if scored is not None:
            summary["reward_vs_gold"] = reward_vs_gold(scored)
        if dist_info.is_main:
            atomic_write_text(here / "summary.json", json.dumps(summary, indent=2) + "\n")
            write_jsonl(here / "pairs.jsonl", pairs)
            print0(f"iter {t}: mean reward {summary['mean_reward']:.4f}, "
                   f"mean length {summary['mean_length_chars']:.1f} chars, "
                   f"{len(pairs)} pairs kept, dropped {dropped}")
            if scored is not None and args.rm != "gold":
                run_name = f"{Path(args.run_dir).name}, iteration {t}"
                samples_name = f"π_{t - 1}'s samples ({run_name})"
                print0(format_reward_vs_gold(summary["reward_vs_gold"], samples_name))
        if dist.is_initialized():
            dist.barrier()
    # 4 + 5. Reference log-probs (once per iteration's pairs: π_0 never changes) and the policy update.
    if not has_model(here / "policy"):
        tokenizer = load_tokenizer(args.sft)
        pairs, example_groups = [], []
        pair_iterations = range(1, t + 1) if args.history == "all" else [t]
        pairs_files = [run / f"iter{i}" / "pairs.jsonl" for i in pair_iterations]
        for path in pairs_files:
            iteration_pairs = load_records(path, "pairs", allow_empty=True)  # empty: every prompt was dropped
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
        if args.lora_rank:
            # LoRA: π_0 with the adapter so far (π_{t−1} = π_0 + its adapter), so that the reference π_0
            # is this same model with its adapters off
            adapter = None if t == 1 else previous_adapter(args, previous_policy)
            train(args, dist_info, args.sft, pairs, example_groups, here / "policy", adapter=adapter)
        else:
            train(args, dist_info, previous_policy, pairs, example_groups, here / "policy")
    print0(f"iteration {t} complete: {here}")


def prompt_chunk(args, t):
    """Chunk t of the prompts, and the file it comes from: a file per iteration ('{t}' in --prompts),
    or the t-th of --iterations equal slices of one file."""
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


# ----------------------------------------------------------------------------------------------
# Command line and the run's settings

# Settings that decide what an online iteration produces: recorded in iter{t}/settings.json (a rerun
# or resume with other values stops) and saved in config.json as the next iteration's defaults.
INPUT_SETTINGS = ("sft", "rm", "ensemble", "prompts", "iterations")
# + seed (the samples' seeds derive from it); max_prompt_length decides which prompts are sampled.
SAMPLING_SETTINGS = ("n", "temperature", "top_p", "top_k", "max_new_tokens", "max_prompt_length")
PAIRING_SETTINGS = ("pair_selection", "length_penalty", "missing_eos_penalty", "reward_tolerance", "history")
TRAINING_SETTINGS = ("loss", "beta", "label_smoothing", "nll_coef", "lr", "epochs", "batch_size",
                     "max_length", "max_steps", "warmup_ratio", "weight_decay", "grad_clip", "seed",
                     "save_dtype", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
RESULT_SETTINGS = INPUT_SETTINGS + SAMPLING_SETTINGS + PAIRING_SETTINGS + TRAINING_SETTINGS
# Throughput settings: the same result whatever their value, up to floating-point summation order.
# Saved in config.json (a batch size that fits the memory should carry over), free on a resume.
THROUGHPUT_SETTINGS = ("micro_batch_size", "gen_batch_size", "chunk_size", "activation_checkpointing",
                       "save_every")
RUN_SETTINGS = RESULT_SETTINGS + THROUGHPUT_SETTINGS


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    offline = parser.add_argument_group("offline")
    offline.add_argument("--pairs", help="preference pairs JSONL (offline mode)")
    offline.add_argument("--model",
                         help="starting policy = reference (offline mode; the SFT model)")
    offline.add_argument("--out", help="output folder (offline mode)")
    offline.add_argument("--overwrite", action="store_true",
                         help="offline: train again even if --out holds a model "
                              "(online: delete an iteration's folder to redo it)")
    online = parser.add_argument_group("online")
    online.add_argument("--iter", type=positive_int, help="run online iteration t (1-based)")
    online.add_argument("--run-dir", "--run", dest="run_dir",
                        help="the run's folder (iter{t}/ sub-folders, config.json)")
    online.add_argument("--sft", help="the SFT checkpoint: π_0, the first policy and the reference")
    online.add_argument("--rm",
                        help="the Bradley-Terry reward model folder (train_rm.py), or several separated by "
                             "commas (an ensemble, see --ensemble); 'gold' scores with the built-in task's gold "
                             "reward instead (the oracle control of run.sh)")
    online.add_argument("--ensemble", choices=["mean", "mean_minus_std"], default="mean",
                        help="how an ensemble's rewards combine: their mean, or mean − std over the members "
                             "(Coste et al. 2023, against over-optimisation)")
    online.add_argument("--prompts",
                        help="prompts JSONL; with '{t}' in the name, one file per iteration")
    online.add_argument("--iterations", type=positive_int, default=3,
                        help="slices of a single --prompts file")
    at_least_two = checked_number(int, "≥ 2 (a pair needs two responses)", lambda n: n >= 2)
    online.add_argument("--n", "--num-samples", dest="n", type=at_least_two, default=8,
                        help="responses per prompt (paper 1: 8)")
    online.add_argument("--temperature", type=positive_float, default=1.0,
                        help="sampling temperature (paper 1: 1.0); "
                             "> 0, since greedy decoding gives n identical responses")
    online.add_argument("--top-p", type=positive_fraction, default=1.0,
                        help="nucleus mass (1 = off)")
    online.add_argument("--top-k", type=non_negative_int, default=0, help="top-k (0 = off)")
    online.add_argument("--max-new-tokens", type=positive_int, default=2048,
                        help="response length cap")
    online.add_argument("--max-prompt-length", type=positive_int, default=None,
                        help="skip (and count) prompts longer than this many tokens; "
                             "default: only the context limits them")
    online.add_argument("--pair-selection", choices=PAIR_SELECTIONS, default="max_min",
                        help="which two of a prompt's n responses make its pair (select_pairs): "
                             "best vs worst (paper 1), best vs a random other, or two random ones")
    online.add_argument("--length-penalty", type=non_negative_float, default=0.0,
                        help="λ in r − λ·characters (paper 1's concise run: 0.001)")
    online.add_argument("--missing-eos-penalty", type=non_negative_float, default=0.0,
                        help="subtract this from the reward of a response cut at --max-new-tokens "
                             "without a stop token (TRL's missing_eos_penalty); "
                             "their number is in summary.json")
    online.add_argument("--reward-tolerance", type=non_negative_float, default=0.0,
                        help="drop a prompt when best − worst reward ≤ this")
    online.add_argument("--history", choices=["all", "last"], default="all",
                        help="train on all pairs so far (paper) or the newest only (authors' code)")
    online.add_argument("--gen-batch-size", type=non_negative_int, default=0,
                        help="decode slots per rank when sampling; "
                             "0: as many as fit in free GPU memory (64 on a CPU)")
    online.add_argument("--chunk-size", type=positive_int, default=256,
                        help="prompts per resumable sampling/scoring chunk")
    training = parser.add_argument_group("training")
    training.add_argument("--loss", choices=["dpo", "ipo", "spce"], default="dpo",
                          help="preference loss")
    training.add_argument("--beta", type=positive_float, default=0.1, help="β (paper 1: 0.1)")
    smoothing_epsilon = checked_number(float, "in [0, 0.5)", lambda e: 0 <= e < 0.5)
    training.add_argument("--label-smoothing", type=smoothing_epsilon, default=0.0,
                          help="cDPO ε: the label is wrong with probability ε (dpo/spce)")
    training.add_argument("--nll-coef", type=non_negative_float, default=0.0,
                          help="weight of the chosen response's per-token NLL (RPO)")
    training.add_argument("--lr", type=positive_float, default=5e-7,
                          help="peak learning rate (paper 1: 5e-7)")
    training.add_argument("--epochs", type=positive_float, default=2.0,
                          help="passes over the pairs (paper 1: 2)")
    training.add_argument("--batch-size", type=positive_int, default=128,
                          help="global batch in pairs (paper 1: 128)")
    training.add_argument("--micro-batch-size", type=positive_int, default=4,
                          help="pairs per forward per rank")
    training.add_argument("--max-length", type=positive_int, default=4096,
                          help="prompt + response tokens; longer responses are truncated (counted)")
    training.add_argument("--max-steps", type=step_limit, default=-1,
                          help="stop after this many steps (-1: epochs decide)")
    training.add_argument("--warmup-ratio", type=fraction, default=0.03,
                          help="linear warmup fraction of the cosine schedule")
    training.add_argument("--weight-decay", type=non_negative_float, default=0.0,
                          help="AdamW weight decay")
    training.add_argument("--grad-clip", type=non_negative_float, default=1.0,
                          help="max gradient norm (0: off)")
    training.add_argument("--parallel", choices=["fsdp", "ddp"], default="fsdp",
                          help="data parallelism under torchrun")
    training.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    training.add_argument("--seed", type=int, default=0,
                          help="global seed (data order; sampling seeds derive from it and t)")
    training.add_argument("--log-every", type=positive_int, default=10,
                          help="print a step line every N steps")
    add_scale_flags(training)
    add_lora_flags(training)
    add_tracking_flags(training)
    add_resume_flag(training)
    return parser


def given_on_command_line(argv):
    """The settings argv spells out, in any spelling argparse accepts (--lr=0.5, --lr 0.5, an alias):
    argv parsed again by a copy of the parser whose defaults are all SUPPRESS, so only options that
    were given appear in the result."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def resolve_settings(argv=None):
    """Parse argv for an offline run or online iteration t. Returns (args, sources): sources[name] is
    where each setting came from, "command line", "iter{t}/settings.json" (the iteration's own record,
    on a rerun or resume), "config.json" (the run's, written by the latest iteration) or "default"."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # first pass: which run and iteration (and any flag error, at once)
    where = parser.parse_args(argv)
    sources = {action.dest: "default" for action in parser._actions}
    if where.iter is not None and where.run_dir is not None:
        # The run's saved settings become the parser's defaults: the command line still wins, in any spelling.
        run = Path(where.run_dir)
        saved = {}
        # later files win
        for path in (run / "config.json", run / f"iter{where.iter}" / "settings.json"):
            if path.exists():
                try:
                    values = json.loads(path.read_text())
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}: not valid JSON ({error.msg}); "
                                     "fix or delete it") from None
                for name in RUN_SETTINGS:
                    if name in values:
                        saved[name] = values[name]
                        sources[name] = str(path.relative_to(run))
        parser.set_defaults(**saved)
    args = parser.parse_args(argv)
    for name in given_on_command_line(argv):
        sources[name] = "command line"
    # argparse checked the flags given, not the values read back: the same checks on those, naming the file.
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        source = sources.get(action.dest)
        if source in (None, "command line", "default") or value is None:
            continue
        try:
            if action.type is not None:
                action.type(value)
            if action.choices is not None and value not in action.choices:
                choices = ", ".join(map(str, action.choices))
                raise argparse.ArgumentTypeError(f"must be one of {choices}, got {value!r}")
        except argparse.ArgumentTypeError as error:
            record_path = Path(args.run_dir) / source
            raise InputError(f"{record_path}: {action.dest} {error}; fix it there or give "
                             f"{action.option_strings[0]} on the command line") from None

    if args.iter is not None:
        if args.run_dir is None:
            parser.error("--iter needs --run-dir")
        if args.overwrite:
            parser.error("--overwrite is for offline mode; "
                         "to redo an online iteration delete its folder")
        if not (args.sft and args.rm and args.prompts):
            parser.error(f"online mode needs --sft, --rm and --prompts: give them at iteration 1 "
                         f"(later iterations read them from {Path(args.run_dir) / 'config.json'})")
        if args.ensemble != "mean" and len(reward_models(args.rm)) < 2:
            parser.error(f"--ensemble {args.ensemble} needs two or more reward models (--rm A,B,...)")
    elif not (args.pairs and args.model and args.out):
        parser.error("offline mode needs --pairs, --model and --out "
                     "(or --iter and --run-dir for online mode)")
    if args.iter is not None and args.gen_batch_size and args.n > args.gen_batch_size:
        parser.error(f"--n {args.n} samples per prompt need --gen-batch-size {args.n} or more "
                     f"(it is {args.gen_batch_size})")
    if args.label_smoothing and args.loss == "ipo":
        parser.error("--label-smoothing (cDPO) applies to --loss dpo or spce, not ipo")
    return args, sources


def print_settings(args, sources, names, title):
    """One line per setting: name, value, where it came from."""
    values = {name: str(getattr(args, name)) for name in names}
    name_width = max(map(len, names))
    value_width = min(40, max(map(len, values.values())))
    rows = [f"  {name:<{name_width}}  {values[name]:<{value_width}}  {sources[name]}"
            for name in names]
    print0("\n".join([title] + rows))


def run_offline(args, sources, dist_info):
    """DPO of --model on the --pairs file, with --model as the reference too; the result in --out."""
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
                         + dropped_note
                         + ")")
    # start over: the old record and reference log-probs go too
    if args.overwrite and dist_info.is_main:
        for name in ("settings.json", "ref_logps.jsonl"):
            (out / name).unlink(missing_ok=True)
    if dist.is_initialized():
        dist.barrier()
    # ref_logps.jsonl survives a crash for the rerun to reuse, so it is recorded with its settings
    offline_settings = {k: getattr(args, k) for k in ("pairs", "model") + TRAINING_SETTINGS}
    check_settings(out / "settings.json", offline_settings, start_over=out)
    args.reference = args.model
    train(args, dist_info, args.model, kept, [(examples, out / "ref_logps.jsonl")], out)


def main(argv=None):
    args, sources = resolve_settings(argv)
    dist_info = init_distributed(args.device)
    seed_everything(args.seed)
    # The memory plan first (a missing model is left to the checks below, which name the flag).
    plan_model = args.sft if args.iter is not None else args.model
    if args.dry_run:
        require_model(plan_model, "--sft" if args.iter is not None else "--model")
    if plan_model is not None and has_model(plan_model):
        checkpointing, _ = scale_settings(args, dist_info.device)
        print_stage_plan(plan_model, "dpo", dist_info, args.micro_batch_size, args.max_length,
                         args.parallel, checkpointing, lora=lora_settings(args))
    if args.dry_run:
        return destroy_distributed()
    if args.iter is not None:
        run_iteration(args, sources, dist_info)
    else:
        run_offline(args, sources, dist_info)
    destroy_distributed()


if __name__ == "__main__":
    run_cli(main)
