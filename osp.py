"""Online self-preferring (OSP) language models (paper 2, Algorithm 1): the policy samples K responses
per prompt, the SFT model judges them itself (LLM-as-a-judge, the logits of "A"/"B"), responses are
paired by rank, and the soft preference strengths are learned with the SPCE loss.

    # (optional, paper 2 needs it for small models) preference augmentation: SFT on judge instructions
    python -m data.convert --format judge --input data/builtin/pairs_train.jsonl --output data/builtin/judge_sft.jsonl
    python sft.py --model runs/builtin/sft --data data/builtin/judge_sft.jsonl --out runs/builtin/judge
    # or the same A/B objective through train_rm.py (records its template; run.sh does this, paper 1's format)
    python train_rm.py train --type pairwise --model runs/builtin/sft --pairs data/builtin/pairs_train.jsonl \\
        --out runs/builtin/judge

    # OSP from the SFT model, judged by the augmented SFT model
    python osp.py --model runs/builtin/sft --judge runs/builtin/judge --prompts data/builtin/prompts_iter1.jsonl \\
        --out runs/builtin/osp --steps 100 --gold
    torchrun --nproc_per_node 8 osp.py --model /ckpt/tinyllama-sft --judge /ckpt/tinyllama-judge \\
        --prompts prompts.jsonl --out runs/osp --steps 2000

Each step, for a batch of prompts x (Algorithm 1, lines 5-10), one function each below:
  1. rollout: sample K responses y_1..y_K from the current policy π_θ (on-policy; --sampling sft
     samples π_SFT);
  2. judge: the judge (frozen) scores each response against the empty response, s_i = p(y_i ≻ ∅ | x),
     the judge instruction asked in both A/B orders and averaged;
  3. pairs: ranked pairing, highest with lowest, second highest with second lowest, ... → K//2 pairs,
     O(K) judge calls instead of O(K²) for all pairs (paper 2 §3.2); and the target strength of each
     pair p = p(y_hi ≻ y_lo | x): the judge's softmax over the "A"/"B" logits, both orders averaged;
  4. update: SPCE (paper 2, eq. (8); Algorithm 1 steps by its gradient, eq. (9)) with implicit strength
     σ(β h) (eq. (7)) and reference π_SFT;
  5. log: loss, target and implicit strengths, the drift from π_SFT on the pairs (pair_kl), length (and with --gold, the built-in
     task's gold reward and the judge's agreement with it) to metrics.jsonl and a step line.
The policy starts from --model (π_SFT), which is also the reference; the judge is --judge (π_SFT
after preference augmentation; --model itself when omitted). Paper 2's TinyLlama settings are the
defaults: K = 7, β = 0.001, lr 2e-6, batch 16 prompts, top-p 0.9, temperature 0.7.
Ablations: --loss spce|dpo|ipo (DPO/IPO take the higher-ranked response as chosen), --pairing
ranked|random|best (best = RAFT: NLL on the top-ranked response only), --sampling policy|sft.
Data parallelism: FSDP2 by default (the policy, the reference and the judge sharded; each is
gathered whole once for a rollout or a judging pass, parallel.gathered), or DDP. Paper 2's own setup,
Mistral-7B on one 48 GB GPU, is LoRA: --lora-rank 64 --lora-alpha 32 --lr 2e-5 --beta 0.1; the
reference and the judge are then the policy with its adapters off. A rerun with a finished model
in --out does nothing (--overwrite trains again).
"""
import argparse
import contextlib
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from parallel import add_lora_flags, add_scale_flags, default_dtype, destroy_distributed, gathered, gradient_sync, init_distributed, load_for_training, load_frozen, lora_settings, save_checkpoint, scale_settings, unwrap
from runs import InputError, MetricsLogger, add_tracking_flags, already_trained, fraction, non_negative_float, non_negative_int, positive_float, positive_fraction, positive_int, print0, run_cli
from tokens import load_tokenizer, stop_token_ids
from training import StepSums, add_resume_flag, autocast, cosine_lr, finish_training_state, load_training_state, make_optimizer, optimizer_step, save_training_state, seed_everything, set_lr
from data.judge import JUDGE_TEMPLATES
from data.schema import load_records
from losses import best_index, k3_kl, per_token_nll, preference_loss, preference_margin, token_logps
from generate import Engine, encode_prompts, generate_records
from memory_plan import print_stage_plan
from rewards import judge_template, pairwise_preference

# ----------------------------------------------------------------------------------------------
# Pairing


def ranked_pairs(scores):
    """Paper 2 §3.2, ranked pairing: sort by score (descending; ties keep the lower index first) and
    pair the i-th highest with the i-th lowest: [(high_index, low_index), ...], K//2 pairs. With odd
    K the median response is left out."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return [(order[i], order[-1 - i]) for i in range(len(scores) // 2)]


def random_pairs(scores, rng):
    """The ablation baseline: K//2 disjoint pairs of random responses, oriented by score so that
    DPO/IPO still take the judge's favourite as chosen (SPCE uses the soft target either way)."""
    order = list(range(len(scores)))
    rng.shuffle(order)
    pairs = [(order[2 * i], order[2 * i + 1]) for i in range(len(scores) // 2)]
    return [(a, b) if scores[a] >= scores[b] else (b, a) for a, b in pairs]


def best_response(scores):
    """RAFT's choice: the top-ranked response (ties: the lower index, as in ranked_pairs)."""
    return best_index(scores)


# ----------------------------------------------------------------------------------------------
# One step of Algorithm 1: rollout → judge → pairs → update → log


def prompt_batches(num_prompts, batch_size, seed):
    """Global batches of prompt indices, one per step, without end: the prompts cycle through the
    file, reshuffled each pass (a batch may straddle two passes)."""
    rng, order = random.Random(seed), []
    while True:
        while len(order) < batch_size:
            epoch = list(range(num_prompts))
            rng.shuffle(epoch)
            order += epoch
        yield order[:batch_size]
        order = order[batch_size:]


@contextlib.contextmanager
def sft_view(frozen, policy):
    """π_SFT for a no-grad forward: the frozen model (reference or judge), or with LoRA (frozen is
    None) the policy itself with its adapters off: no second copy of the model."""
    if frozen is not None:
        yield frozen
    else:
        with unwrap(policy).adapters_disabled():
            yield unwrap(policy)


def rollout(engine, tokenizer, prompt_records, args, step, device):
    """1. K responses per prompt from the sampler (the current policy, or π_SFT): texts, a list of
    K per prompt; their token ids as sampled (the stop token included when one was: what the update
    scores); whether each was cut at --max-new-tokens without a stop token (the same shape);
    and the tokens generated per second (this rank's, for the progress bar).
    Seeds come from (seed, step, prompt id, sample index): no dependence on ranks.
    A sharded sampler is gathered whole once for the rollout (parallel.gathered), not per token."""
    engine.model.eval()
    t0 = time.time()
    with gathered(engine.model), autocast(engine.model, device):
        samples = generate_records(engine, tokenizer, prompt_records, args.k, args.max_new_tokens,
                                   args.temperature, top_p=args.top_p,
                                   seed=args.seed * 1_000_003 + step)
    tokens = sum(sum(record["num_tokens"]) for record in samples)
    cut = [[reason == "length" for reason in record["finish_reasons"]] for record in samples]
    texts = [record["responses"] for record in samples]
    ids = [record["response_ids"] for record in samples]
    return texts, ids, cut, tokens / (time.time() - t0)


@torch.no_grad()
def judge_self_scores(judge, judge_tokenizer, template, prompt_messages, responses, device):
    """2. Each response against the empty one, s_i = p(y_i ≻ ∅ | x): a list of K floats per prompt
    (read on the host: the ranking is done there)."""
    flat_prompts = [messages for messages, texts in zip(prompt_messages, responses) for _ in texts]
    flat_responses = [text for texts in responses for text in texts]
    empty_responses = [""] * len(flat_responses)
    with autocast(judge, device):
        scores = pairwise_preference(judge, judge_tokenizer, flat_prompts, flat_responses,
                                     empty_responses, device, template)
    return scores.view(len(responses), -1).tolist()


def penalise_missing_eos(self_scores, cut, penalty):
    """--missing-eos-penalty c: a response cut at --max-new-tokens without a stop token scores c lower
    (TRL's missing_eos_penalty, there on a reward), so that it ranks below the answers that ended.
    It changes which responses pair up, and for DPO / IPO which one is chosen; a pair's target
    strength stays the judge's own."""
    return [[s - penalty * c for s, c in zip(scores, cuts)]
            for scores, cuts in zip(self_scores, cut)]


def make_pairs(self_scores, pairing, rng):
    """3a. The training pairs from the self-scores: (row, chosen index, rejected index) with `row`
    the prompt's place in this rank's batch; with --pairing best, (row, best index, None)."""
    if pairing == "best":
        return [(row, best_response(scores), None) for row, scores in enumerate(self_scores)]
    make = ranked_pairs if pairing == "ranked" else lambda scores: random_pairs(scores, rng)
    return [(row, hi, lo) for row, scores in enumerate(self_scores) for hi, lo in make(scores)]


@torch.no_grad()
def target_strengths(judge, judge_tokenizer, template, prompt_messages, responses, pairs, device):
    """3b. The judge's p = p(y_chosen ≻ y_rejected | x) of each pair (P,), both A/B orders averaged;
    1 for RAFT's single responses (the best is taken as simply right)."""
    if pairs and pairs[0][2] is None:
        return torch.ones(len(pairs), device=device)
    prompts = [prompt_messages[row] for row, _, _ in pairs]
    chosen = [responses[row][hi] for row, hi, _ in pairs]
    rejected = [responses[row][lo] for row, _, lo in pairs]
    with autocast(judge, device):
        return pairwise_preference(judge, judge_tokenizer, prompts, chosen, rejected, device, template)


def pair_losses(policy, reference, prompt_tokens, chosen_tokens, rejected_tokens, targets, args, pad_id,
                device):
    """The loss of each pair of a micro-batch (B,), with h (B,), the implicit preference's argument,
    and pair_kl (B,): Schulman's k3 of log π_SFT / π_θ on each pair's responses, averaged (both
    detached, for the metrics). pair_kl tracks how far π_θ drifted from π_SFT on what it trains on;
    it is no unbiased KL(π_θ‖π_SFT): the responses were sampled at --temperature / --top-p, not from
    π_θ itself, and picked as the ranking's extremes. rejected_tokens None: RAFT, per-token NLL of
    the best response. reference None: the policy with its adapters off (LoRA)."""
    responses = chosen_tokens if rejected_tokens is None else chosen_tokens + rejected_tokens
    prompts = prompt_tokens * (len(responses) // len(prompt_tokens))
    # RAFT: the best responses; otherwise chosen and rejected in one forward: (2B, T)
    logps = token_logps(policy, prompts, responses, pad_id, device)                  # (2B, T)
    with torch.no_grad(), sft_view(reference, policy) as sft_model:
        ref_logps = token_logps(sft_model, prompts, responses, pad_id, device)
    kl = k3_kl(logps.detach(), ref_logps)                                             # (2B,)
    sums, ref_sums = logps.sum(1), ref_logps.sum(1)
    counts = torch.tensor([len(r) for r in responses], device=device)
    if rejected_tokens is None:
        return per_token_nll(sums, counts), torch.zeros_like(ref_sums), kl
    n = len(prompt_tokens)
    # The token counts make IPO use length-normalised log-probs (losses.preference_loss, as in dpo.py).
    per_pair = preference_loss(sums[:n], sums[n:], ref_sums[:n], ref_sums[n:], args.beta, args.loss,
                               targets, chosen_tokens=counts[:n], rejected_tokens=counts[n:])
    h = preference_margin(sums[:n].detach(), sums[n:].detach(), ref_sums[:n], ref_sums[n:], args.loss,
                          chosen_tokens=counts[:n], rejected_tokens=counts[n:])   # the h of the loss
    return per_pair, h, kl.view(2, n).mean(0)


def pair_ids(ids, pairs):
    """The token ids of each pair's responses, exactly as sampled (no re-encoding of the decoded text:
    tokens.response_ids): [(chosen ids, rejected ids or None for RAFT)]."""
    return [(ids[row][hi], None if lo is None else ids[row][lo]) for row, hi, lo in pairs]


def update(policy, reference, optimizer, prompt_tokens, pairs, pair_tokens, targets, args, step, world_size,
           pad_id, device):
    """4. One optimizer step of the loss, averaged over all pairs of the global batch (every rank
    holds the same number, from its own prompts). pairs: (row, chosen, rejected) as make_pairs gives
    them, pair_tokens: their token ids (pair_ids), prompt_tokens: this rank's prompts' ids by row.
    Returns the step's metric sums (StepSums, still on the device) and the gradient norm (a tensor):
    no host read here, so memory_trace.py runs this same function on fake tensors."""
    policy.train()
    set_lr(optimizer, cosine_lr(step, args.steps, args.lr, args.warmup_ratio))
    global_pairs = len(pairs) * world_size
    micro_batches = [range(start, min(start + args.micro_batch_size, len(pairs)))
                     for start in range(0, len(pairs), args.micro_batch_size)]
    sums = StepSums()
    for m, indices in enumerate(micro_batches):
        chosen = [pair_tokens[i][0] for i in indices]
        rejected = None if args.pairing == "best" else [pair_tokens[i][1] for i in indices]
        prompt_ids = [prompt_tokens[pairs[i][0]] for i in indices]
        micro_targets = targets[indices.start:indices.stop]
        with gradient_sync(policy, sync=m == len(micro_batches) - 1), autocast(policy, device):
            per_pair, h, pair_kl = pair_losses(policy, reference, prompt_ids, chosen, rejected, micro_targets,
                                          args, pad_id, device)
            # Mean over the global batch's pairs (× world size: gradients are averaged over ranks).
            (per_pair.sum() / global_pairs * world_size).backward()
        sums.add(loss=per_pair, target=micro_targets, implicit=torch.sigmoid(args.beta * h),
                 pair_kl=pair_kl, pairs=len(indices))
    grad_norm = optimizer_step(policy, optimizer, args.grad_clip)
    return sums, grad_norm


def gold_sums(prompt_messages, responses, pairs, targets):
    """The built-in task's gold reward r* of the step's samples, and on the pairs whose gold scores
    differ by more than data.task.GOLD_GAP (as in reward_vs_gold) and the judge is not indifferent,
    whether the judge's target sides with gold. Sums, for StepSums; the comparison with the targets
    stays on the device."""
    from data.task import GOLD_GAP, score as gold_score
    gold = [[gold_score(messages, text) for text in texts]
            for messages, texts in zip(prompt_messages, responses)]
    sums = dict(gold=sum(map(sum, gold)))
    if pairs and pairs[0][2] is not None:
        signs = [float(gold[row][hi] > gold[row][lo] + GOLD_GAP) - float(gold[row][hi] < gold[row][lo] - GOLD_GAP)
                 for row, hi, lo in pairs]
        gold_sign = torch.tensor(signs, device=targets.device)  # (P,) +1, −1 or 0
        decided = (gold_sign != 0) & (targets != 0.5)
        agrees = decided & ((gold_sign > 0) == (targets > 0.5))
        sums.update(judge_decided=decided, judge_agrees=agrees)
    return sums


def log_step(metrics, totals, step, lr, seconds, args, is_main):
    """5. The step's metrics line (metrics.jsonl) from the reduced sums, and a step line every --log-every."""
    pairs, responses = totals["pairs"], totals["responses"]
    line = dict(step=step + 1, loss=totals["loss"] / pairs, target_strength=totals["target"] / pairs,
                implicit_strength=totals["implicit"] / pairs, pair_kl=totals["pair_kl"] / pairs,
                grad_norm=totals["grad_norm"], lr=lr,
                mean_length_chars=totals["length_chars"] / responses,
                missing_eos=totals["missing_eos"] / responses, ms=seconds * 1000)
    if args.gold:
        line["gold_mean"] = totals["gold"] / responses
        decided = totals.get("judge_decided", 0)
        line["judge_gold_agreement"] = totals["judge_agrees"] / decided if decided else float("nan")
        line["judge_gold_pairs"] = int(decided)
    metrics.log(**line)
    if is_main and (step % args.log_every == 0 or step == args.steps - 1):
        gold_text = (f" | gold {line['gold_mean']:.3f}"
                     f" | judge~gold {line['judge_gold_agreement']:.2f}" if args.gold else "")
        tqdm.write(f"step {step + 1}/{args.steps} | loss {line['loss']:.4f} | "
                   f"target {line['target_strength']:.3f} | "
                   f"implicit {line['implicit_strength']:.3f} | "
                   f"pair-kl {line['pair_kl']:+.3f} | len {line['mean_length_chars']:.1f}{gold_text} | "
                   f"grad {line['grad_norm']:.3f} | lr {lr:.2e} | {line['ms']:.0f} ms")


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", required=True,
                        help="π_SFT: the initial policy and the reference")
    parser.add_argument("--judge", default=None,
                        help="the judge (π_SFT after preference augmentation); default --model")
    parser.add_argument("--prompts", required=True, help="prompts JSONL (id, messages)")
    parser.add_argument("--out", required=True, help="output checkpoint folder (+ metrics.jsonl)")
    parser.add_argument("--overwrite", action="store_true",
                        help="train again even if --out already holds a model")
    add_scale_flags(parser)
    add_lora_flags(parser)
    add_tracking_flags(parser)
    add_resume_flag(parser)
    parser.add_argument("--parallel", choices=["fsdp", "ddp"], default="fsdp",
                        help="data parallelism of the policy under torchrun "
                             "(fsdp: the reference and judge are sharded too)")
    parser.add_argument("--steps", type=positive_int, default=100,
                        help="training steps (one batch of prompts each)")
    parser.add_argument("--batch-size", type=positive_int, default=16,
                        help="prompts per step, over all ranks (paper 2: 16)")
    parser.add_argument("--micro-batch-size", type=positive_int, default=8,
                        help="pairs per forward per rank")
    parser.add_argument("--k", type=positive_int, default=7,
                        help="responses sampled per prompt (paper 2: K = 7)")
    parser.add_argument("--loss", choices=["spce", "dpo", "ipo"], default="spce",
                        help="preference loss (ablation)")
    parser.add_argument("--pairing", choices=["ranked", "random", "best"], default="ranked",
                        help="pair construction (ablation)")
    parser.add_argument("--sampling", choices=["policy", "sft"], default="policy",
                        help="sample from the current policy (on-policy) or π_SFT")
    parser.add_argument("--beta", type=positive_float, default=0.001,
                        help="β (paper 2: 0.001 dialogue, 0.02 summarization)")
    parser.add_argument("--lr", type=positive_float, default=2e-6,
                        help="peak learning rate (paper 2: 2e-6)")
    parser.add_argument("--warmup-ratio", type=fraction, default=0.03,
                        help="linear warmup fraction of the cosine schedule")
    parser.add_argument("--temperature", type=positive_float, default=0.7,
                        help="sampling temperature (paper 2: 0.7); "
                             "> 0, since greedy decoding gives K identical responses")
    parser.add_argument("--top-p", type=positive_fraction, default=0.9,
                        help="nucleus sampling mass (paper 2: 0.9)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=512,
                        help="response length cap (paper 2: 512/768)")
    parser.add_argument("--missing-eos-penalty", type=non_negative_float, default=0.0,
                        help="subtract this from the self-score of a response cut at --max-new-tokens "
                             "without a stop token, before ranking (TRL's missing_eos_penalty); "
                             "metrics.jsonl's missing_eos: their share")
    parser.add_argument("--max-prompt-length", type=positive_int, default=None,
                        help="skip (and count) prompts longer than this many tokens; "
                             "default: only the context limits them")
    parser.add_argument("--judge-template", default=None,
                        help=f"judge instruction: one of {sorted(JUDGE_TEMPLATES)} or a text file with "
                             f"{{context}}, {{response_a}}, {{response_b}}; "
                             "default: the judge's judge_template.txt (a train_rm.py pairwise model), "
                             "else 'dialogue'")
    parser.add_argument("--gold", action="store_true",
                        help="log agreement of the judge with the built-in task's gold scorer")
    parser.add_argument("--grad-clip", type=non_negative_float, default=1.0,
                        help="max gradient norm (0: off)")
    parser.add_argument("--snapshot-every", type=non_negative_int, default=0,
                        help="also save the policy as an HF checkpoint in OUT/step{N}/ every N steps "
                             "(0: only at the end)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0,
                        help="global seed (prompt order, sampling streams)")
    parser.add_argument("--log-every", type=positive_int, default=1,
                        help="print a step line every N steps")
    args = parser.parse_args(argv)
    if args.k < 2 and args.pairing != "best":
        parser.error(f"--k {args.k}: pairs need at least 2 responses per prompt "
                     "(or --pairing best)")
    return args


def main(argv=None):
    args = parse_args(argv)

    # ----------------------------------------------------------------------------------------------
    # Distributed init

    dist_info = init_distributed(args.device)
    device, world_size = dist_info.device, dist_info.world_size
    seed_everything(args.seed)
    if args.batch_size % world_size:
        raise InputError(f"--batch-size {args.batch_size} must be a multiple of "
                         f"the number of ranks ({world_size})")
    if already_trained(args.out, args.overwrite):
        return destroy_distributed()
    # The policy (FSDP or DDP), π_SFT as reference and judge beside it (with LoRA: the policy with its
    # adapters off), and the sampling cache (prompt length: --max-prompt-length, or 512 tokens assumed).
    checkpointing, save_dtype = scale_settings(args, device)
    lora = lora_settings(args)
    sequence = (args.max_prompt_length or 512) + args.max_new_tokens
    print_stage_plan(args.model, "osp", dist_info, args.micro_batch_size, sequence, args.parallel,
                     checkpointing, lora=lora, prompts_per_rank=args.batch_size // world_size,
                     k=args.k, prompt_len=args.max_prompt_length or 512,
                     separate_judge=args.judge not in (None, args.model))
    if args.dry_run:
        return destroy_distributed()

    # ----------------------------------------------------------------------------------------------
    # Data and judge template

    prompts = load_records(args.prompts, "prompts")
    template = judge_template(args.judge or args.model, args.judge_template, default="dialogue")

    # ----------------------------------------------------------------------------------------------
    # Models: the policy (trained, fp32 master weights), the reference π_SFT and the judge (frozen, in
    # the compute dtype; sharded under FSDP). None stands for "the policy with its adapters off".

    compute_dtype = default_dtype(device)
    tokenizer = load_tokenizer(args.model)
    policy = load_for_training(args.model, args.parallel, dist_info,
                               activation_checkpointing=checkpointing, lora=lora)
    reference = None if lora is not None else load_frozen(args.model, args.parallel, dist_info)
    same_judge = args.judge in (None, args.model)
    judge = reference if same_judge else load_frozen(args.judge, args.parallel, dist_info)
    judge_tokenizer = tokenizer if same_judge else load_tokenizer(args.judge)
    optimizer = make_optimizer(policy, args.lr)
    # Every prompt is checked against the context up front, on every rank (generate.encode_prompts);
    # those over --max-prompt-length are left out of the prompts the steps draw from.
    context = unwrap(policy).config.max_position_embeddings
    prompts, prompt_tokens = encode_prompts(tokenizer, prompts, args.max_new_tokens, context,
                                            args.prompts, args.max_prompt_length)
    local_batch = args.batch_size // world_size
    # The sampler reads the policy's (or π_SFT's) weights in place: after each optimizer step the next
    # samples come from the updated policy, with no copy to keep in sync.
    # --sampling sft: π_SFT, the reference, or with LoRA the policy with its adapters off (sft_view below).
    sampler = unwrap(policy) if args.sampling == "policy" or reference is None else reference
    engine = Engine(sampler, local_batch * args.k, stop_token_ids(tokenizer), dtype=compute_dtype)

    # ----------------------------------------------------------------------------------------------
    # Training loop: Algorithm 1, one batch of prompts per step

    batches = prompt_batches(len(prompts), args.batch_size, args.seed)
    pairing_rng = random.Random(args.seed * 7919 + dist_info.rank)
    # After a crash: the latest --save-every state, and the step to go on from (0: none); the prompt
    # batches are a function of the seed, so the ones done are skipped.
    start = load_training_state(args.out, policy, optimizer, args, rng=pairing_rng)
    for _ in range(start):
        next(batches)
    metrics_path = Path(args.out) / "metrics.jsonl"
    metrics = MetricsLogger(metrics_path, enabled=dist_info.is_main, report_to=args.report_to,
                            run_name=f"osp {args.out}", config=vars(args), resume_step=start)
    bar = tqdm(range(start, args.steps), desc=f"osp ({args.loss}, {args.pairing})", initial=start,
               total=args.steps, disable=not dist_info.is_main)
    for step in bar:
        t0 = time.time()
        global_batch = next(batches)
        mine = global_batch[dist_info.rank * local_batch:(dist_info.rank + 1) * local_batch]
        messages = [prompts[i]["messages"] for i in mine]
        prompt_records = [prompts[i] for i in mine]
        with sft_view(reference, policy) if args.sampling == "sft" else contextlib.nullcontext():
            responses, ids, cut, tokens_per_second = rollout(engine, tokenizer, prompt_records, args, step, device)
        bar.set_postfix_str(f"rollout {tokens_per_second:,.0f} tok/s", refresh=False)
        # the judge is read at one position per query, outside forward: gathered whole (parallel.gathered)
        with sft_view(judge, policy) as judge_model, gathered(judge_model):
            self_scores = judge_self_scores(judge_model, judge_tokenizer, template,
                                            messages, responses, device)
            self_scores = penalise_missing_eos(self_scores, cut, args.missing_eos_penalty)
            pairs = make_pairs(self_scores, args.pairing, pairing_rng)
            targets = target_strengths(judge_model, judge_tokenizer, template,
                                       messages, responses, pairs, device)
        my_prompt_tokens = [prompt_tokens[i] for i in mine]
        pair_tokens = pair_ids(ids, pairs)
        sums, grad_norm = update(policy, reference, optimizer, my_prompt_tokens, pairs, pair_tokens,
                                 targets, args, step, world_size, tokenizer.pad_token_id, device)
        sums.add(length_chars=sum(len(text) for texts in responses for text in texts),
                 responses=sum(map(len, responses)), missing_eos=sum(map(sum, cut)))
        if args.gold:
            sums.add(**gold_sums(messages, responses, pairs, targets))
        totals = sums.reduce(device, grad_norm=grad_norm)  # the step's one all-reduce and host read
        lr = optimizer.param_groups[0]["lr"]
        seconds = time.time() - t0
        log_step(metrics, totals, step, lr, seconds, args, dist_info.is_main)
        if args.snapshot_every and (step + 1) % args.snapshot_every == 0 and step + 1 < args.steps:
            snapshot_dir = Path(args.out) / f"step{step + 1}"
            save_checkpoint(policy, snapshot_dir, tokenizer, source_dir=args.model, dtype=save_dtype)
        save_training_state(args.out, step + 1, args.steps, policy, optimizer, args, rng=pairing_rng)

    # ----------------------------------------------------------------------------------------------
    # Save

    metrics.close()
    save_checkpoint(policy, args.out, tokenizer, source_dir=args.model, dtype=save_dtype,
                    save_adapter=args.save_adapter)
    finish_training_state(args.out)
    print0(f"saved {args.out}")
    destroy_distributed()


if __name__ == "__main__":
    run_cli(main)
