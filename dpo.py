"""DPO / IPO / SPCE preference optimisation: offline on a pairs file, or as one iteration of online
iterative RLHF (paper 1, RLHF Workflow, Algorithm 1 as practised in its §3.3).

    # offline DPO (the paper's "DPO baseline"): SFT model + a preference pairs file
    python dpo.py --pairs data/builtin/pairs_train.jsonl --model runs/builtin/sft --out runs/builtin/dpo_offline

    # online iterative DPO, one whole iteration per call (sample → score → pair → train)
    python dpo.py --iter 1 --run-dir runs/builtin/online --sft runs/builtin/sft --rm runs/builtin/rm \\
        --prompts 'data/builtin/prompts_iter{t}.jsonl'
    python dpo.py --iter 2 --run-dir runs/builtin/online          # the run's settings are read back
    torchrun --nproc_per_node 8 dpo.py --iter 2 --run-dir runs/NAME

(Under torchrun spell it --run-dir, not --run: torchrun's own argument parser reads "--run" as an
abbreviation of its --run-path option and stops with "ambiguous option".)

Iteration t, in runs/NAME/iter{t}/, each sub-step skipped on rerun when its output is complete:
  samples.jsonl    n responses per prompt of chunk t from π_{t−1} (π_0 = SFT), generate.py's engine
  rewards.jsonl    the reward model's score of each response (train_rm.py)
  pairs.jsonl      (best, worst) by reward − λ·characters; prompts whose best and worst are the
                   same text or within --reward-tolerance are dropped (and counted)
  ref_logps.jsonl  log π_0 of every pair's chosen and rejected response, computed once, no grad
  policy/          DPO from π_{t−1} with reference π_0 on the pairs so far (--history all, the
                   paper's algorithm) or only this iteration's (--history last, the authors' code)
  summary.json     mean reward and length of the samples, pairs kept and dropped

Losses, with h = [log π(a_w|x) − log π_0(a_w|x)] − [log π(a_l|x) − log π_0(a_l|x)]:
  DPO   −log σ(βh)                               (Rafailov et al. 2023, eq. 7; paper 1 eq. (3))
  IPO   (h − 1/(2β))²                            (Azar et al. 2023, eq. 17) on length-normalised log-probs
  SPCE  −[p log σ(βh) + (1 − p) log σ(−βh)]      (paper 2, eq. (9)): soft label p; p = 1 is DPO
  cDPO  SPCE with p = 1 − ε (--label-smoothing ε);  RPO: + α · NLL of the chosen response (--nll-coef)
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from common import (MetricsLogger, all_reduce_sum, atomic_write_text, clip_grad_norm, cosine_lr, default_dtype,
                    destroy_distributed, encode_prompt, encode_response, end_of_turn_ids, gradient_sync,
                    init_distributed, load_tokenizer, print0, process_in_chunks, read_jsonl, right_pad, save_checkpoint,
                    seed_everything, stop_token_ids, write_jsonl, wrap_model)
from data.schema import load_records
from model import Transformer

# ----------------------------------------------------------------------------------------------
# The math: sequence log-probs and the preference losses.


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                    loss_type="dpo", target=None):
    """Per-pair losses (B,). Log-probs are summed over response tokens (for IPO, pass length-
    normalised ones: dpo.py divides by the token count, as TRL does). `target` is the soft label
    p = P(chosen ≻ rejected) for SPCE (a tensor (B,) or a float); DPO is SPCE with p = 1."""
    # h > 0 when the policy raised the chosen response's likelihood, relative to the reference,
    # more than the rejected one's. β h is the difference of DPO's implicit rewards.
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "dpo":
        return -F.logsigmoid(beta * h)
    if loss_type == "spce":
        # Cross-entropy between the target strength p and the implicit strength σ(βh). Its gradient
        # in h is β(σ(βh) − p): zero exactly when the implicit strength equals the target.
        p = torch.as_tensor(1.0 if target is None else target, dtype=h.dtype, device=h.device)
        return -(p * F.logsigmoid(beta * h) + (1 - p) * F.logsigmoid(-beta * h))
    if loss_type == "ipo":
        # A squared loss that pulls h to 1/(2β) instead of pushing it to infinity.
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown loss_type {loss_type!r} (dpo, ipo, spce)")


def sequence_logps(model, prompts, responses, pad_id, device):
    """Summed log-probs of each response given its prompt: (logps (B,), num_tokens (B,)).
    prompts/responses: token-id lists; only response tokens are scored (prompt and padding are
    masked with -100), through the fused LM-head log-prob kernel (model.forward with targets)."""
    sequences = [p + r for p, r in zip(prompts, responses)]
    input_ids, lengths = right_pad(sequences, pad_id, device)
    targets = torch.full_like(input_ids, -100)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        # position t predicts token t+1: response token j (at position len(p)+j) is the target at len(p)+j−1
        targets[row, len(p) - 1:len(p) + len(r) - 1] = torch.tensor(r, device=device)
    token_logps = model(input_ids, targets=targets)                      # (B, T), 0 where ignored
    return token_logps.sum(1), torch.tensor([len(r) for r in responses], device=device)


# ----------------------------------------------------------------------------------------------
# Pairs -> token ids; reference log-probs


def tokenize_pairs(tokenizer, pairs, max_length):
    """Returns (kept pairs, examples): an example is (prompt ids, chosen ids, rejected ids), the
    responses ending with the end-of-turn token. A response cut by max_length is kept truncated; a
    pair whose prompt leaves no room is dropped. Both are counted and reported."""
    end_of_turn = end_of_turn_ids(tokenizer)
    kept, examples, truncated, dropped = [], [], 0, 0
    for pair in pairs:
        prompt = encode_prompt(tokenizer, pair["prompt"])
        room = max_length - len(prompt)
        if room < 1:
            dropped += 1
            continue
        chosen, rejected = (encode_response(tokenizer, pair[k], end_of_turn) for k in ("chosen", "rejected"))
        truncated += (len(chosen) > room) + (len(rejected) > room)
        kept.append(pair)
        examples.append((prompt, chosen[:room], rejected[:room]))
    if truncated or dropped:
        print0(f"warning: {truncated} responses truncated to --max-length {max_length}; "
               f"{dropped} pairs dropped because their prompt alone fills it")
    return kept, examples


def micro_batches_for_rank(indices, rank, world_size, micro_batch_size):
    """This rank's share of `indices`, cut into micro-batches; every rank gets the same number of
    micro-batches (FSDP's collectives need it), the short ones padded with -1 (weight 0)."""
    per_rank = math.ceil(len(indices) / (world_size * micro_batch_size)) * micro_batch_size
    padded = indices + [-1] * (per_rank * world_size - len(indices))
    mine = padded[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


@torch.no_grad()
def reference_logps(model, examples, pad_id, dist_info, micro_batch_size):
    """log π_0 of every pair's chosen and rejected response, list of (chosen, rejected) floats in
    pair order, identical on every rank. Runs through the same (wrapped) model and dtype path as the
    policy's forward, so at step 0 of iteration 1 the policy's h is exactly 0."""
    model.eval()
    results = {}
    batches = micro_batches_for_rank(list(range(len(examples))), dist_info.rank, dist_info.world_size, micro_batch_size)
    for batch in tqdm(batches, desc="reference log-probs", disable=not dist_info.is_main):
        rows = [examples[i] if i >= 0 else examples[0] for i in batch]
        logps, _ = sequence_logps(model, [e[0] for e in rows] * 2, [e[1] for e in rows] + [e[2] for e in rows],
                                  pad_id, dist_info.device)
        for j, i in enumerate(batch):
            if i >= 0:
                results[i] = (logps[j].item(), logps[len(rows) + j].item())
    if dist.is_initialized():
        gathered = [None] * dist_info.world_size
        dist.all_gather_object(gathered, results)
        results = {k: v for part in gathered for k, v in part.items()}
    return [results[i] for i in range(len(examples))]


# ----------------------------------------------------------------------------------------------
# Training


def load_for_training(path, args, device):
    """fp32 master weights, wrapped for data parallelism (FSDP computes in bf16 on GPU)."""
    model = Transformer.from_pretrained(path).float()
    return wrap_model(model, args.parallel, device, param_dtype=default_dtype(device))


def ensure_reference_logps(args, dist_info, examples, path):
    """The reference π_0's log-probs of every example's chosen and rejected response, read from
    `path` or, the first time, computed there (once, no grad). The reference model is loaded only
    for this pass and freed before the policy is loaded: never two models in memory at once."""
    if Path(path).exists():
        ref = [(r["ref_chosen_logp"], r["ref_rejected_logp"]) for r in read_jsonl(path)]
        if len(ref) != len(examples):
            raise ValueError(f"{path} has {len(ref)} records for {len(examples)} pairs; delete it to recompute")
        return ref
    device = dist_info.device
    tokenizer = load_tokenizer(args.reference)
    reference = load_for_training(args.reference, args, device)
    with torch.autocast(device.type, dtype=default_dtype(device), enabled=autocast_needed(args, device)):
        ref = reference_logps(reference, examples, tokenizer.pad_token_id, dist_info, args.micro_batch_size)
    if dist_info.is_main:
        write_jsonl(path, [{"ref_chosen_logp": c, "ref_rejected_logp": r} for c, r in ref])
    if dist.is_initialized():
        dist.barrier()
    del reference
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ref


def autocast_needed(args, device):
    """bf16 autocast on GPU unless FSDP's mixed-precision policy already computes in bf16."""
    return default_dtype(device) != torch.float32 and not (args.parallel == "fsdp" and dist.is_initialized())


def train(args, dist_info, start_model, pairs, examples, ref, out_dir):
    """Preference optimisation of `start_model` on tokenized `examples` (from tokenize_pairs) with
    reference log-probs `ref`; saves an HF checkpoint (+ metrics.jsonl) to out_dir."""
    device = dist_info.device
    compute_dtype = default_dtype(device)
    tokenizer = load_tokenizer(start_model)
    targets = [float(p.get("p", 1.0)) for p in pairs]
    if args.label_smoothing:  # cDPO: the label is right with probability 1 − ε
        targets = [t * (1 - args.label_smoothing) + (1 - t) * args.label_smoothing for t in targets]
    autocast_enabled = autocast_needed(args, device)
    model = load_for_training(start_model, args, device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    rng = torch.Generator().manual_seed(args.seed)
    schedule = []
    for _ in range(math.ceil(args.epochs)):
        permutation = torch.randperm(len(examples), generator=rng).tolist()
        schedule += [permutation[i:i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    total_steps = math.ceil(args.epochs * math.ceil(len(examples) / args.batch_size))
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)
    print0(f"{len(examples)} pairs, {total_steps} steps of {args.batch_size} pairs, loss {args.loss}, β {args.beta}")
    metrics = MetricsLogger(Path(out_dir) / "metrics.jsonl", enabled=dist_info.is_main)

    for step in tqdm(range(total_steps), desc=f"{args.loss} training", disable=not dist_info.is_main):
        t0 = time.time()
        global_pairs = len(schedule[step])
        lr = cosine_lr(step, total_steps, args.lr, args.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums = dict(loss=0.0, chosen_reward=0.0, rejected_reward=0.0, accuracy=0.0, kl=0.0, tokens=0.0)
        batches = micro_batches_for_rank(schedule[step], dist_info.rank, dist_info.world_size, args.micro_batch_size)
        for m, batch in enumerate(batches):
            rows = [examples[i] if i >= 0 else examples[0] for i in batch]
            weight = torch.tensor([float(i >= 0) for i in batch], device=device)
            ref_chosen = torch.tensor([ref[max(i, 0)][0] for i in batch], device=device)
            ref_rejected = torch.tensor([ref[max(i, 0)][1] for i in batch], device=device)
            target = torch.tensor([targets[max(i, 0)] for i in batch], device=device)
            with gradient_sync(model, sync=m == len(batches) - 1), \
                    torch.autocast(device.type, dtype=compute_dtype, enabled=autocast_enabled):
                # chosen and rejected in one forward: (2B, T)
                logps, num_tokens = sequence_logps(model, [e[0] for e in rows] * 2, [e[1] for e in rows] + [e[2] for e in rows],
                                                   tokenizer.pad_token_id, device)
                chosen, rejected = logps[:len(rows)], logps[len(rows):]
                chosen_tokens, rejected_tokens = num_tokens[:len(rows)], num_tokens[len(rows):]
                if args.loss == "ipo":  # IPO on per-token average log-probs (TRL's convention)
                    per_pair = preference_loss(chosen / chosen_tokens, rejected / rejected_tokens, ref_chosen / chosen_tokens,
                                               ref_rejected / rejected_tokens, args.beta, "ipo")
                else:
                    per_pair = preference_loss(chosen, rejected, ref_chosen, ref_rejected, args.beta, args.loss, target)
                if args.nll_coef:  # RPO: keep the chosen response likely (per-token NLL)
                    per_pair = per_pair - args.nll_coef * chosen / chosen_tokens
                # Mean over the global batch's pairs (× world size: gradients are averaged over ranks).
                loss = (per_pair * weight).sum() / global_pairs * dist_info.world_size
                loss.backward()
            with torch.no_grad():
                chosen_reward = args.beta * (chosen - ref_chosen)
                rejected_reward = args.beta * (rejected - ref_rejected)
                sums["loss"] += loss.item() / dist_info.world_size
                sums["chosen_reward"] += (chosen_reward * weight).sum().item()
                sums["rejected_reward"] += (rejected_reward * weight).sum().item()
                sums["accuracy"] += ((chosen_reward > rejected_reward).float() * weight).sum().item()
                # k1 estimate of KL(π‖π_0) on the training responses (exact in expectation only when they are on-policy)
                sums["kl"] += (((chosen - ref_chosen) + (rejected - ref_rejected)) / 2 * weight).sum().item()
                sums["tokens"] += ((chosen_tokens + rejected_tokens) * weight).sum().item()
        grad_norm = clip_grad_norm(model, args.grad_clip if args.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        totals = {k: all_reduce_sum(v, device) for k, v in sums.items()}
        dt = time.time() - t0
        line = dict(step=step + 1, loss=totals["loss"], rewards_chosen=totals["chosen_reward"] / global_pairs,
                    rewards_rejected=totals["rejected_reward"] / global_pairs, reward_accuracy=totals["accuracy"] / global_pairs,
                    reward_margin=(totals["chosen_reward"] - totals["rejected_reward"]) / global_pairs,
                    kl=totals["kl"] / global_pairs, grad_norm=grad_norm, lr=lr, tokens_per_s=totals["tokens"] / dt, ms=dt * 1000)
        metrics.log(**line)
        if dist_info.is_main and (step % args.log_every == 0 or step == total_steps - 1):
            tqdm.write(f"step {step + 1}/{total_steps} | loss {line['loss']:.4f} | chosen {line['rewards_chosen']:+.4f} | "
                       f"rejected {line['rewards_rejected']:+.4f} | acc {line['reward_accuracy']:.3f} | kl {line['kl']:+.3f} | "
                       f"grad {grad_norm:.3f} | lr {lr:.2e} | {line['tokens_per_s']:,.0f} tok/s")
    metrics.close()
    save_checkpoint(model, out_dir, tokenizer, source_dir=start_model)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Online iteration: sample → score → pair → train


def select_pairs(records, length_penalty=0.0, reward_tolerance=0.0, source=None):
    """Best-of-n vs worst-of-n per prompt by r̃ = r − λ·(characters) (paper 1 §3.3; λ = 0.001 in its
    "concise" run). A prompt is dropped when its best and worst responses are the same text or their
    r̃ differ by no more than reward_tolerance. Ties: best is the first maximum, worst the last minimum
    (so equal rewards count as a reward tie, not as one response paired with itself). Returns
    (pairs, counts of dropped prompts by reason)."""
    pairs, dropped = [], {"same_text": 0, "reward_tie": 0}
    for record in records:
        adjusted = [r - length_penalty * len(text) for r, text in zip(record["rewards"], record["responses"])]
        best = max(range(len(adjusted)), key=lambda i: (adjusted[i], -i))
        worst = min(range(len(adjusted)), key=lambda i: (adjusted[i], -i))
        if record["responses"][best] == record["responses"][worst]:
            dropped["same_text"] += 1
        elif adjusted[best] - adjusted[worst] <= reward_tolerance:
            dropped["reward_tie"] += 1
        else:
            pairs.append({"id": record["id"], "prompt": record["prompt"], "chosen": record["responses"][best],
                          "rejected": record["responses"][worst], "margin": adjusted[best] - adjusted[worst],
                          **({"source": source} if source else {})})
    return pairs, dropped


RUN_SETTINGS = ("sft", "rm", "prompts", "iterations", "n", "temperature", "top_p", "top_k", "max_new_tokens", "length_penalty",
                "reward_tolerance", "history", "loss", "beta", "lr", "epochs", "batch_size", "max_length", "seed")


def run_iteration(args, dist_info):
    run = Path(args.run_dir)
    config_path = run / "config.json"
    if config_path.exists():  # settings written by the first call; flags given now override them
        saved = json.loads(config_path.read_text())
        for key in RUN_SETTINGS:
            if key not in args.given and key in saved:
                setattr(args, key, saved[key])
    if not (args.sft and args.rm and args.prompts):
        raise SystemExit("the first iteration of a run needs --sft, --rm and --prompts")
    if dist_info.is_main:
        atomic_write_text(config_path, json.dumps({k: getattr(args, k) for k in RUN_SETTINGS}, indent=2) + "\n")
    t = args.iter
    here = run / f"iter{t}"
    previous_policy = Path(args.sft) if t == 1 else run / f"iter{t - 1}" / "policy"
    if not (previous_policy / "model.safetensors").exists():
        raise SystemExit(f"{previous_policy} has no model: run iteration {t - 1} first")
    args.reference = args.sft
    device = dist_info.device

    # 1. Samples from π_{t−1}.
    if not (here / "samples.jsonl").exists():
        import generate
        prompts = prompt_chunk(args, t)
        tokenizer = load_tokenizer(previous_policy)
        policy = Transformer.from_pretrained(previous_policy, device=device, dtype=default_dtype(device)).eval()
        longest = max(len(encode_prompt(tokenizer, r["messages"])) for r in prompts)
        engine = generate.Engine(policy, args.gen_batch_size, longest + args.max_new_tokens, stop_token_ids(tokenizer))
        settings = SimpleNamespace(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, min_p=0.0, seed=args.seed * 1000 + t, logprobs=False)
        process_in_chunks(prompts, here / "samples.jsonl", lambda chunk: generate.generate_records(engine, tokenizer, chunk, settings),
                          dist_info, chunk_size=args.chunk_size, desc=f"iter {t}: sampling")
        del policy, engine
    # 2. Rewards: the reward model's, or (--rm gold, the built-in task's control) the gold reward r*.
    if not (here / "rewards.jsonl").exists():
        samples = load_records(here / "samples.jsonl", "samples")
        if args.rm == "gold":
            from data.task import score
            scorer = lambda chunk: [{**r, "rewards": [score(r["prompt"], y) for y in r["responses"]]} for r in chunk]  # noqa: E731
        else:
            import train_rm
            rm = Transformer.from_pretrained(args.rm, device=device, dtype=default_dtype(device), head="score").eval()
            rm_tokenizer = load_tokenizer(args.rm)
            scorer = lambda chunk: train_rm.score_records(rm, rm_tokenizer, chunk, device, args.micro_batch_size * 4, args.max_length)  # noqa: E731
        process_in_chunks(samples, here / "rewards.jsonl", scorer, dist_info, chunk_size=args.chunk_size, desc=f"iter {t}: scoring")
        scorer = rm = None  # free the reward model before training
    # 3. Pairs (cheap and deterministic: rank 0 writes, the others wait).
    if not (here / "pairs.jsonl").exists():
        rewards = load_records(here / "rewards.jsonl", "rewards")
        pairs, dropped = select_pairs(rewards, args.length_penalty, args.reward_tolerance, source=f"iter{t}")
        all_rewards = [r for rec in rewards for r in rec["rewards"]]
        summary = dict(iteration=t, prompts=len(rewards), samples=len(all_rewards),
                       mean_reward=sum(all_rewards) / len(all_rewards),
                       mean_length_chars=sum(len(x) for rec in rewards for x in rec["responses"]) / len(all_rewards),
                       mean_tokens=sum(n for rec in rewards for n in rec["num_tokens"]) / len(all_rewards),
                       pairs_kept=len(pairs), pairs_dropped=dropped)
        if dist_info.is_main:
            atomic_write_text(here / "summary.json", json.dumps(summary, indent=2) + "\n")
            write_jsonl(here / "pairs.jsonl", pairs)
            print0(f"iter {t}: mean reward {summary['mean_reward']:.4f}, mean length {summary['mean_length_chars']:.1f} chars, "
                   f"{len(pairs)} pairs kept, dropped {dropped}")
        if dist.is_initialized():
            dist.barrier()
    # 4 + 5. Reference log-probs (once per iteration's pairs: π_0 never changes) and the policy update.
    if not (here / "policy" / "model.safetensors").exists():
        tokenizer = load_tokenizer(args.sft)
        pairs, examples, ref = [], [], []
        for i in (range(1, t + 1) if args.history == "all" else [t]):
            kept, iteration_examples = tokenize_pairs(tokenizer, load_records(run / f"iter{i}" / "pairs.jsonl", "pairs"), args.max_length)
            ref += ensure_reference_logps(args, dist_info, iteration_examples, run / f"iter{i}" / "ref_logps.jsonl")
            pairs += kept
            examples += iteration_examples
        train(args, dist_info, previous_policy, pairs, examples, ref, here / "policy")
    print0(f"iteration {t} complete: {here}")


def prompt_chunk(args, t):
    """Chunk t of the prompts: a file per iteration ('{t}' in --prompts), or the t-th of
    --iterations equal slices of one file."""
    if "{t}" in args.prompts:
        return load_records(args.prompts.format(t=t), "prompts")
    prompts = load_records(args.prompts, "prompts")
    size = math.ceil(len(prompts) / args.iterations)
    return prompts[(t - 1) * size:t * size]


# ----------------------------------------------------------------------------------------------
# Command line


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    offline = parser.add_argument_group("offline")
    offline.add_argument("--pairs", help="preference pairs JSONL (offline mode)")
    offline.add_argument("--model", help="starting policy = reference (offline mode; the SFT model)")
    offline.add_argument("--out", help="output folder (offline mode)")
    online = parser.add_argument_group("online")
    online.add_argument("--iter", type=int, help="run online iteration t (1-based)")
    online.add_argument("--run-dir", "--run", dest="run_dir", help="the run's folder (iter{t}/ sub-folders, config.json)")
    online.add_argument("--sft", help="the SFT checkpoint: π_0, the first policy and the reference")
    online.add_argument("--rm", help="the Bradley-Terry reward model folder (train_rm.py); 'gold' scores with the built-in "
                                     "task's gold reward instead (the oracle control of run.sh)")
    online.add_argument("--prompts", help="prompts JSONL; with '{t}' in the name, one file per iteration")
    online.add_argument("--iterations", type=int, default=3, help="slices of a single --prompts file")
    online.add_argument("--n", "--num-samples", dest="n", type=int, default=8, help="responses per prompt (paper 1: 8)")
    online.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (paper 1: 1.0)")
    online.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1 = off)")
    online.add_argument("--top-k", type=int, default=0, help="top-k (0 = off)")
    online.add_argument("--max-new-tokens", type=int, default=2048, help="response length cap")
    online.add_argument("--length-penalty", type=float, default=0.0, help="λ in r − λ·characters (paper 1's concise run: 0.001)")
    online.add_argument("--reward-tolerance", type=float, default=0.0, help="drop a prompt when best − worst reward ≤ this")
    online.add_argument("--history", choices=["all", "last"], default="all", help="train on all pairs so far (paper) or the newest only (authors' code)")
    online.add_argument("--gen-batch-size", type=int, default=64, help="decode slots per rank when sampling")
    online.add_argument("--chunk-size", type=int, default=256, help="prompts per resumable sampling/scoring chunk")
    training = parser.add_argument_group("training")
    training.add_argument("--loss", choices=["dpo", "ipo", "spce"], default="dpo", help="preference loss")
    training.add_argument("--beta", type=float, default=0.1, help="β (paper 1: 0.1)")
    training.add_argument("--label-smoothing", type=float, default=0.0, help="cDPO ε: the label is wrong with probability ε")
    training.add_argument("--nll-coef", type=float, default=0.0, help="weight of the chosen response's per-token NLL (RPO)")
    training.add_argument("--lr", type=float, default=5e-7, help="peak learning rate (paper 1: 5e-7)")
    training.add_argument("--epochs", type=float, default=2.0, help="passes over the pairs (paper 1: 2)")
    training.add_argument("--batch-size", type=int, default=128, help="global batch in pairs (paper 1: 128)")
    training.add_argument("--micro-batch-size", type=int, default=4, help="pairs per forward per rank")
    training.add_argument("--max-length", type=int, default=4096, help="prompt + response tokens; longer responses are truncated (counted)")
    training.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: epochs decide)")
    training.add_argument("--warmup-ratio", type=float, default=0.03, help="linear warmup fraction of the cosine schedule")
    training.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    training.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    training.add_argument("--parallel", choices=["fsdp", "ddp"], default="fsdp", help="data parallelism under torchrun")
    training.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    training.add_argument("--seed", type=int, default=0, help="global seed (data order; sampling seeds derive from it and t)")
    training.add_argument("--log-every", type=int, default=10, help="print a step line every N steps")
    args = parser.parse_args()
    args.given = {a.dest for a in parser._actions if any(s in sys.argv for s in a.option_strings)}

    dist_info = init_distributed(args.device)
    seed_everything(args.seed)
    if args.iter is not None:
        if not args.run_dir:
            parser.error("--iter needs --run-dir")
        run_iteration(args, dist_info)
    else:
        if not (args.pairs and args.model and args.out):
            parser.error("offline mode needs --pairs, --model and --out (or --iter and --run-dir for online mode)")
        if (Path(args.out) / "model.safetensors").exists():
            print0(f"{args.out} already holds a model; skipping")
        else:
            args.reference = args.model
            pairs, examples = tokenize_pairs(load_tokenizer(args.model), load_records(args.pairs, "pairs"), args.max_length)
            ref = ensure_reference_logps(args, dist_info, examples, Path(args.out) / "ref_logps.jsonl")
            train(args, dist_info, args.model, pairs, examples, ref, args.out)
    destroy_distributed()


if __name__ == "__main__":
    main()
