"""Online self-preferring (OSP) language models (paper 2, Algorithm 1): the policy learns from its
own samples, judged by the SFT model itself, through soft preference strengths.

Each step, for a batch of prompts x (Algorithm 1, lines 5-10; one call each in osp_step below):
  1. rollout (line 6): sample K responses y_1..y_K from the current policy π_θ (on-policy);
  2. judge (line 7): the judge, frozen, scores each response against the empty one,
     s_i = p(y_i ≻ ∅ | x): the softmax over its "A"/"B" logits, both A/B orders averaged;
  3. pairs (line 7; ranked pairing, §3.2): sort by s, pair the highest with the lowest, the second
     highest with the second lowest, ... → K//2 pairs (y_h, y_l) that span strong and weak
     preferences, with O(K) judge calls instead of the O(K²) of all pairs;
  4. targets (line 8): the judge's preference strength of each pair, p = p(y_h ≻ y_l | x);
  5. update (lines 9-10): the policy's implicit strength relative to π_SFT (eq. (7))

         p̂ = σ(β h),   h = log π_θ(y_h|x)/π_SFT(y_h|x) − log π_θ(y_l|x)/π_SFT(y_l|x),

     trained towards p by the soft-preference cross-entropy (SPCE, eq. (8); losses.preference_loss)

         L_SPCE = −E[p log p̂ + (1 − p) log(1 − p̂)],

     whose gradient (eq. (9)) is ∝ (p̂ − p)(∇ log π_θ(y_h|x) − ∇ log π_θ(y_l|x)): it vanishes once
     the implicit strength matches the judge's, so a weak preference (p near 1/2) pushes little,
     where DPO (p = 1 for every pair) pushes every pair apart without end.

The policy starts from --model (π_SFT), which is also the reference; the judge is --judge (π_SFT
after preference augmentation, Algorithm 1 line 3; --model itself when omitted). Paper 2's
TinyLlama settings are the defaults: K = 7, β = 0.001, lr 2e-6, batch 16 prompts, top-p 0.9,
temperature 0.7. Ablations: --loss spce|dpo|ipo (DPO/IPO take the higher-ranked response as
chosen), --pairing ranked|random|best (best = RAFT: NLL on the top-ranked response only),
--sampling policy|sft (sft: sample π_SFT, off-policy).

    # (optional, paper 2 needs it for small models) preference augmentation: SFT on judge prompts
    python -m data.convert --format judge --input data/builtin/pairs_train.jsonl \\
        --output data/builtin/judge_sft.jsonl
    python sft.py --model runs/builtin/sft --data data/builtin/judge_sft.jsonl \\
        --out runs/builtin/judge
    # or the same A/B objective through train_rm.py (records its template; run.sh does this)
    python train_rm.py train --type pairwise --model runs/builtin/sft \\
        --pairs data/builtin/pairs_train.jsonl --out runs/builtin/judge

    # OSP from the SFT model, judged by the augmented SFT model
    python osp.py --model runs/builtin/sft --judge runs/builtin/judge \\
        --prompts data/builtin/prompts_iter1.jsonl --out runs/builtin/osp --steps 100 --gold
    torchrun --nproc_per_node 8 osp.py --model /ckpt/tinyllama-sft --judge /ckpt/tinyllama-judge \\
        --prompts prompts.jsonl --out runs/osp --steps 2000

A rerun with a finished model in --out does nothing (--overwrite trains again).
FSDP, LoRA (paper 2's Mistral-7B setup), the logged metrics: docs/stages.md.
"""
import argparse
import contextlib
import random
import time
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from parallel import (add_lora_flags, add_scale_flags, default_dtype, destroy_distributed,
                      gathered, gradient_sync, init_distributed, load_for_training, load_frozen,
                      lora_settings, save_checkpoint, scale_settings, unwrap)
from runs import (InputError, MetricsLogger, add_tracking_flags, already_trained, fraction,
                  non_negative_float, non_negative_int, positive_float, positive_fraction,
                  positive_int, print0, run_cli)
from tokens import load_tokenizer, stop_token_ids
from training import (StepSums, add_resume_flag, autocast, cosine_lr, finish_training_state,
                      load_training_state, make_optimizer, optimizer_step, save_training_state,
                      seed_everything, set_lr)
from data.judge import JUDGE_TEMPLATES
from data.schema import load_records
from data.task import GOLD_GAP
from losses import (best_index, k3_kl, per_token_nll, preference_loss, preference_margin,
                    token_logps)
from generate import Engine, encode_prompts, generate_records, prompt_columns
from memory_plan import print_stage_plan
from rewards import (judge_template, load_reward_function, pairwise_preference, verifier_flag,
                     verifier_rewards)

# ----------------------------------------------------------------------------------------------
# Flags


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
                        help="subtract this from the self-score of a response cut at "
                             "--max-new-tokens without a stop token, before ranking (TRL's "
                             "missing_eos_penalty); metrics.jsonl's missing_eos: their share")
    parser.add_argument("--max-prompt-length", type=positive_int, default=None,
                        help="skip (and count) prompts longer than this many tokens; "
                             "default: only the context limits them")
    parser.add_argument("--judge-template", default=None,
                        help=f"judge instruction: one of {sorted(JUDGE_TEMPLATES)} or a text file "
                             f"with {{context}}, {{response_a}}, {{response_b}}; default: the "
                             "judge's judge_template.txt (a train_rm.py pairwise model), "
                             "else 'dialogue'")
    parser.add_argument("--gold", nargs="?", const="gold", default=None, metavar="VERIFIER",
                        type=verifier_flag,
                        help="log each step's reward by a verifier and the judge's agreement with "
                             "it: FILE.py:function or package.module:function in TRL's "
                             "reward-function convention (rewards.py); bare --gold: the built-in "
                             "task's gold reward")
    parser.add_argument("--grad-clip", type=non_negative_float, default=1.0,
                        help="max gradient norm (0: off)")
    parser.add_argument("--snapshot-every", type=non_negative_int, default=0,
                        help="also save the policy as an HF checkpoint in OUT/step{N}/ every N "
                             "steps (0: only at the end)")
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


# ----------------------------------------------------------------------------------------------
# The stage: the models, then --steps steps of Algorithm 1, then the policy saved


def main(argv=None):
    args = parse_args(argv)
    dist_info = init_distributed(args.device)
    seed_everything(args.seed)
    scale = start_run(args, dist_info)  # None: already trained, or --dry-run
    if scale is None:
        return destroy_distributed()
    prompts = load_records(args.prompts, "prompts")
    template = judge_template(args.judge or args.model, args.judge_template, default="dialogue")
    models = load_models(args, dist_info, scale, template)
    optimizer = make_optimizer(models.policy, args.lr)
    # Every prompt is checked against the context up front, on every rank (generate.encode_prompts);
    # those over --max-prompt-length are left out of the prompts the steps draw from.
    context = unwrap(models.policy).config.max_position_embeddings
    prompts, prompt_tokens = encode_prompts(models.tokenizer, prompts, args.max_new_tokens, context,
                                            args.prompts, args.max_prompt_length)
    engine = sampling_engine(args, models, dist_info)
    train(args, dist_info, models, engine, optimizer, prompts, prompt_tokens, scale)
    save_checkpoint(models.policy, args.out, models.tokenizer, source_dir=args.model,
                    dtype=scale.save_dtype, save_adapter=args.save_adapter)
    finish_training_state(args.out)
    print0(f"saved {args.out}")
    destroy_distributed()


def train(args, dist_info, models, engine, optimizer, prompts, prompt_tokens, scale):
    """Algorithm 1's loop: one global batch of prompts per step, this rank's share of it through
    osp_step; one all-reduce and host read of the step's sums, then the metrics line."""
    device, world_size, rank = dist_info.device, dist_info.world_size, dist_info.rank
    local_batch = args.batch_size // world_size
    batches = prompt_batches(len(prompts), args.batch_size, args.seed)
    pairing_rng = random.Random(args.seed * 7919 + dist_info.rank)
    start, metrics = resume(args, dist_info, models.policy, optimizer, batches, pairing_rng)
    bar = tqdm(range(start, args.steps), desc=f"osp ({args.loss}, {args.pairing})", initial=start,
               total=args.steps, disable=not dist_info.is_main)
    for step in bar:
        t0 = time.time()
        mine = next(batches)[rank * local_batch:(rank + 1) * local_batch]
        sums, grad_norm, tokens_per_second = osp_step(
            args, step, [prompts[i] for i in mine], [prompt_tokens[i] for i in mine], models,
            engine, optimizer, pairing_rng, world_size, device)
        bar.set_postfix_str(f"rollout {tokens_per_second:,.0f} tok/s", refresh=False)
        totals = sums.reduce(device, grad_norm=grad_norm)  # the step's one all-reduce and host read
        lr = optimizer.param_groups[0]["lr"]
        log_step(metrics, totals, step, lr, time.time() - t0, args, dist_info.is_main)
        save_progress(args, step, models, optimizer, pairing_rng, scale)
    metrics.close()


# ----------------------------------------------------------------------------------------------
# One step of Algorithm 1: rollout → judge → pairs → targets → update


class Models(NamedTuple):
    """The models of a run. reference / judge None: the policy with its adapters off (LoRA)."""
    policy: torch.nn.Module  # π_θ, trained (fp32 master weights; FSDP or DDP)
    reference: object        # π_SFT, frozen (the compute dtype; sharded under FSDP), or None
    judge: object            # the judge, frozen: the reference itself unless --judge, or None
    tokenizer: object
    judge_tokenizer: object
    template: str            # the judge's A/B instruction
    gold: object = None      # --gold's verifier (rewards.load_reward_function), or None


def osp_step(args, step, prompt_records, prompt_ids, models, engine, optimizer, pairing_rng,
             world_size, device):
    """Algorithm 1, lines 5-10, on this rank's prompts. Returns the step's sums (StepSums, on the
    device), the gradient norm and the rollout's tokens per second."""
    messages = [record["messages"] for record in prompt_records]
    policy, reference, judge = models.policy, models.reference, models.judge
    # line 6: K responses per prompt from π_θ (--sampling sft: from π_SFT)
    with sft_view(reference, policy) if args.sampling == "sft" else contextlib.nullcontext():
        responses, ids, cut, tokens_per_second = rollout(engine, models.tokenizer, prompt_records,
                                                         args, step, device)
    # lines 7-8: rank by p(y ≻ ∅ | x), pair, and the pairs' target strengths. The judge is read at
    # one position per query, outside forward: gathered whole.
    with sft_view(judge, policy) as judge_model, gathered(judge_model):
        self_scores = judge_self_scores(judge_model, models.judge_tokenizer, models.template,
                                        messages, responses, device)
        self_scores = penalise_missing_eos(self_scores, cut, args.missing_eos_penalty)
        pairs = make_pairs(self_scores, args.pairing, pairing_rng)
        targets = target_strengths(judge_model, models.judge_tokenizer, models.template,
                                   messages, responses, pairs, device)
    # lines 9-10: the implicit strengths σ(βh) and a step of the SPCE loss towards the targets
    sums, grad_norm = update(policy, reference, optimizer, prompt_ids, pairs, pair_ids(ids, pairs),
                             targets, args, step, world_size, models.tokenizer.pad_token_id,
                             device)
    sums.add(length_chars=sum(len(text) for texts in responses for text in texts),
             responses=sum(map(len, responses)), missing_eos=sum(map(sum, cut)))
    if args.gold:
        sums.add(**gold_sums(models.gold, args.gold, prompt_records, responses, ids, pairs,
                             targets))
    return sums, grad_norm, tokens_per_second


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
    """--missing-eos-penalty c: a response cut at --max-new-tokens without a stop token scores c
    lower (TRL's missing_eos_penalty, there on a reward), so that it ranks below the answers that
    ended. It changes which responses pair up, and for DPO / IPO which one is chosen; a pair's
    target strength stays the judge's own."""
    return [[s - penalty * c for s, c in zip(scores, cuts)]
            for scores, cuts in zip(self_scores, cut)]


class Pair(NamedTuple):
    """A training pair: the prompt's row in this rank's batch, and the indices of the chosen and
    the rejected response among its K (rejected None: RAFT's single best response)."""
    row: int
    chosen: int
    rejected: object


def make_pairs(self_scores, pairing, rng):
    """3. The training Pairs from the self-scores; with --pairing best (RAFT's choice: the
    top-ranked response, ties to the lower index), one Pair(row, best index, None) per prompt."""
    if pairing == "best":
        return [Pair(row, best_index(scores), None) for row, scores in enumerate(self_scores)]
    make = ranked_pairs if pairing == "ranked" else lambda scores: random_pairs(scores, rng)
    return [Pair(row, hi, lo) for row, scores in enumerate(self_scores) for hi, lo in make(scores)]


def ranked_pairs(scores):
    """Paper 2 §3.2, ranked pairing: sort by score (descending; ties keep the lower index first)
    and pair the i-th highest with the i-th lowest: [(high_index, low_index), ...], K//2 pairs.
    With odd K the median response is left out."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return [(order[i], order[-1 - i]) for i in range(len(scores) // 2)]


def random_pairs(scores, rng):
    """The ablation baseline: K//2 disjoint pairs of random responses, oriented by score so that
    DPO/IPO still take the judge's favourite as chosen (SPCE uses the soft target either way)."""
    order = list(range(len(scores)))
    rng.shuffle(order)
    pairs = [(order[2 * i], order[2 * i + 1]) for i in range(len(scores) // 2)]
    return [(a, b) if scores[a] >= scores[b] else (b, a) for a, b in pairs]


@torch.no_grad()
def target_strengths(judge, judge_tokenizer, template, prompt_messages, responses, pairs, device):
    """4. The judge's p = p(y_chosen ≻ y_rejected | x) of each pair (P,), both A/B orders
    averaged; 1 for RAFT's single responses (the best is taken as simply right)."""
    if pairs and pairs[0].rejected is None:
        return torch.ones(len(pairs), device=device)
    prompts = [prompt_messages[row] for row, _, _ in pairs]
    chosen = [responses[row][hi] for row, hi, _ in pairs]
    rejected = [responses[row][lo] for row, _, lo in pairs]
    with autocast(judge, device):
        return pairwise_preference(judge, judge_tokenizer, prompts, chosen, rejected, device,
                                   template)


def pair_ids(ids, pairs):
    """The token ids of each pair's responses, exactly as sampled (no re-encoding of the decoded
    text: tokens.response_ids): [(chosen ids, rejected ids or None for RAFT)]."""
    return [(ids[row][hi], None if lo is None else ids[row][lo]) for row, hi, lo in pairs]


def update(policy, reference, optimizer, prompt_tokens, pairs, pair_tokens, targets, args, step,
           world_size, pad_id, device):
    """5. One optimizer step of the loss, averaged over all pairs of the global batch (every rank
    holds the same number, from its own prompts). pairs: (row, chosen, rejected) as make_pairs
    gives them, pair_tokens: their (chosen ids, rejected ids) (pair_ids), prompt_tokens: this
    rank's prompts' ids by row. Returns the step's metric sums (StepSums, still on the device)
    and the gradient norm (a tensor): no host read here, so memory_trace.py runs this same
    function on fake tensors."""
    policy.train()
    set_lr(optimizer, cosine_lr(step, args.steps, args.lr, args.warmup_ratio))
    global_pairs = len(pairs) * world_size
    micro_batches = [slice(start, min(start + args.micro_batch_size, len(pairs)))
                     for start in range(0, len(pairs), args.micro_batch_size)]
    sums = StepSums()
    for m, part in enumerate(micro_batches):
        chosen = [chosen_ids for chosen_ids, _ in pair_tokens[part]]
        rejected = (None if args.pairing == "best"
                    else [rejected_ids for _, rejected_ids in pair_tokens[part]])
        prompt_ids = [prompt_tokens[row] for row, _, _ in pairs[part]]
        micro_targets = targets[part]
        with gradient_sync(policy, sync=m == len(micro_batches) - 1), autocast(policy, device):
            per_pair, h, pair_kl = pair_losses(policy, reference, prompt_ids, chosen, rejected,
                                               micro_targets, args, pad_id, device)
            # Mean over the global batch's pairs (× world size: gradients are averaged over ranks).
            (per_pair.sum() / global_pairs * world_size).backward()
        sums.add(loss=per_pair, target=micro_targets, implicit=torch.sigmoid(args.beta * h),
                 pair_kl=pair_kl, pairs=len(chosen))
    grad_norm = optimizer_step(policy, optimizer, args.grad_clip)
    return sums, grad_norm


def pair_losses(policy, reference, prompt_tokens, chosen_tokens, rejected_tokens, targets, args,
                pad_id, device):
    """The loss of each pair of a micro-batch (B,), with h (B,), the implicit preference's argument
    (eq. (7): p̂ = σ(β h)), and pair_kl (B,): Schulman's k3 of log π_SFT / π_θ on each pair's
    responses, averaged (both detached, for the metrics; pair_kl is how far π_θ drifted from π_SFT
    on what it trains on, not an unbiased KL: docs/stages.md). rejected_tokens None: RAFT,
    per-token NLL of the best response. reference None: the policy with its adapters off (LoRA)."""
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
    # The token counts make IPO use length-normalised log-probs (losses.preference_loss).
    per_pair = preference_loss(sums[:n], sums[n:], ref_sums[:n], ref_sums[n:], args.beta,
                               args.loss, targets,
                               chosen_tokens=counts[:n], rejected_tokens=counts[n:])
    h = preference_margin(sums[:n].detach(), sums[n:].detach(), ref_sums[:n], ref_sums[n:],
                          args.loss, chosen_tokens=counts[:n], rejected_tokens=counts[n:])
    return per_pair, h, kl.view(2, n).mean(0)


@contextlib.contextmanager
def sft_view(frozen, policy):
    """π_SFT for a no-grad forward: the frozen model (reference or judge), or with LoRA (frozen is
    None) the policy itself with its adapters off: no second copy of the model."""
    if frozen is not None:
        yield frozen
    else:
        with unwrap(policy).adapters_disabled():
            yield unwrap(policy)


# ----------------------------------------------------------------------------------------------
# The step's metrics


def gold_sums(function, spec, prompt_records, responses, ids, pairs, targets):
    """The verifier's reward of the step's samples (--gold; bare, the built-in task's r*), and on
    the pairs whose rewards differ by more than data.task.GOLD_GAP (as in reward_vs_gold) and the
    judge is not indifferent, whether the judge's target sides with the verifier. Sums, for
    StepSums; the comparison with the targets stays on the device."""
    records = [{"id": record["id"], "prompt": record["messages"], "responses": texts,
                "response_ids": response_ids, "columns": prompt_columns(record)}
               for record, texts, response_ids in zip(prompt_records, responses, ids)]
    gold = verifier_rewards(function, spec, records)
    sums = dict(gold=sum(map(sum, gold)))
    if pairs and pairs[0].rejected is not None:
        signs = [float(gold[row][hi] > gold[row][lo] + GOLD_GAP)
                 - float(gold[row][hi] < gold[row][lo] - GOLD_GAP)
                 for row, hi, lo in pairs]
        gold_sign = torch.tensor(signs, device=targets.device)  # (P,) +1, −1 or 0
        decided = (gold_sign != 0) & (targets != 0.5)
        agrees = decided & ((gold_sign > 0) == (targets > 0.5))
        sums.update(judge_decided=decided, judge_agrees=agrees)
    return sums


def log_step(metrics, totals, step, lr, seconds, args, is_main):
    """The step's metrics line (metrics.jsonl) from the reduced sums: the loss, the mean target
    and implicit strengths, pair_kl, the response length and the share cut without a stop token
    (and with --gold, the gold reward and the judge's agreement with it); a step line every
    --log-every."""
    pairs, responses = totals["pairs"], totals["responses"]
    line = dict(step=step + 1, loss=totals["loss"] / pairs,
                target_strength=totals["target"] / pairs,
                implicit_strength=totals["implicit"] / pairs, pair_kl=totals["pair_kl"] / pairs,
                grad_norm=totals["grad_norm"], lr=lr,
                mean_length_chars=totals["length_chars"] / responses,
                missing_eos=totals["missing_eos"] / responses, ms=seconds * 1000)
    if args.gold:
        line["gold_mean"] = totals["gold"] / responses
        decided = totals.get("judge_decided", 0)
        line["judge_gold_agreement"] = (totals["judge_agrees"] / decided if decided
                                        else float("nan"))
        line["judge_gold_pairs"] = int(decided)
    metrics.log(**line)
    if is_main and (step % args.log_every == 0 or step == args.steps - 1):
        gold_text = (f" | gold {line['gold_mean']:.3f}"
                     f" | judge~gold {line['judge_gold_agreement']:.2f}" if args.gold else "")
        tqdm.write(f"step {step + 1}/{args.steps} | loss {line['loss']:.4f} | "
                   f"target {line['target_strength']:.3f} | "
                   f"implicit {line['implicit_strength']:.3f} | "
                   f"pair-kl {line['pair_kl']:+.3f} | "
                   f"len {line['mean_length_chars']:.1f}{gold_text} | "
                   f"grad {line['grad_norm']:.3f} | lr {lr:.2e} | {line['ms']:.0f} ms")


# ----------------------------------------------------------------------------------------------
# Models, sampler and prompts


def load_models(args, dist_info, scale, template):
    """The policy (trained, fp32 master weights), the reference π_SFT and the judge (frozen, in the
    compute dtype; sharded under FSDP), and their tokenizers. With LoRA, the reference is the
    policy with its adapters off (None), and so is the judge unless --judge names another model."""
    tokenizer = load_tokenizer(args.model)
    policy = load_for_training(args.model, args.parallel, dist_info,
                               activation_checkpointing=scale.checkpointing, lora=scale.lora)
    reference = (None if scale.lora is not None
                 else load_frozen(args.model, args.parallel, dist_info))
    same_judge = args.judge in (None, args.model)
    judge = reference if same_judge else load_frozen(args.judge, args.parallel, dist_info)
    judge_tokenizer = tokenizer if same_judge else load_tokenizer(args.judge)
    gold = load_reward_function(args.gold) if args.gold else None
    return Models(policy, reference, judge, tokenizer, judge_tokenizer, template, gold)


def sampling_engine(args, models, dist_info):
    """The generation engine, with a decode slot for each of this rank's prompts × K. It reads the
    sampler's weights in place: after each optimizer step the next samples come from the updated
    policy, with no copy to keep in sync. --sampling sft: π_SFT, the reference, or with LoRA the
    policy with its adapters off (osp_step's sft_view)."""
    policy, reference = models.policy, models.reference
    sampler = unwrap(policy) if args.sampling == "policy" or reference is None else reference
    local_batch = args.batch_size // dist_info.world_size
    return Engine(sampler, local_batch * args.k, stop_token_ids(models.tokenizer),
                  dtype=default_dtype(dist_info.device))


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


# ----------------------------------------------------------------------------------------------
# Run management: checks and the memory plan, resume after a crash, snapshots and saved states.


class Scale(NamedTuple):
    checkpointing: bool      # activation checkpointing
    save_dtype: torch.dtype
    lora: object             # model.LoRASettings, or None: full fine-tuning


def start_run(args, dist_info):
    """What runs before anything loads: the batch must split evenly over the ranks; None when
    --out already holds a model (no --overwrite) or for --dry-run (the memory plan only); else the
    scale settings. The plan covers the policy, π_SFT as reference and judge beside it (with LoRA:
    the policy with its adapters off), and the sampling cache (prompt length: --max-prompt-length,
    or 512 tokens assumed)."""
    world_size = dist_info.world_size
    if args.batch_size % world_size:
        raise InputError(f"--batch-size {args.batch_size} must be a multiple of "
                         f"the number of ranks ({world_size})")
    if already_trained(args.out, args.overwrite):
        return None
    checkpointing, save_dtype = scale_settings(args, dist_info.device)
    lora = lora_settings(args)
    sequence = (args.max_prompt_length or 512) + args.max_new_tokens
    print_stage_plan(args.model, "osp", dist_info, args.micro_batch_size, sequence, args.parallel,
                     checkpointing, lora=lora, prompts_per_rank=args.batch_size // world_size,
                     k=args.k, prompt_len=args.max_prompt_length or 512,
                     separate_judge=args.judge not in (None, args.model))
    return None if args.dry_run else Scale(checkpointing, save_dtype, lora)


def resume(args, dist_info, policy, optimizer, batches, pairing_rng):
    """After a crash: the latest --save-every state loaded (with the pairing stream), and the step
    to go on from (0: none); the prompt batches are a function of the seed, so the ones done are
    skipped. With the metrics log, which keeps the lines up to that step."""
    start = load_training_state(args.out, policy, optimizer, args, rng=pairing_rng)
    for _ in range(start):
        next(batches)
    metrics = MetricsLogger(Path(args.out) / "metrics.jsonl", enabled=dist_info.is_main,
                            report_to=args.report_to, run_name=f"osp {args.out}",
                            config=vars(args), resume_step=start)
    return start, metrics


def save_progress(args, step, models, optimizer, pairing_rng, scale):
    """After a step: every --snapshot-every steps the policy as an HF checkpoint in OUT/step{N}/,
    and every --save-every steps the resumable training state."""
    if args.snapshot_every and (step + 1) % args.snapshot_every == 0 and step + 1 < args.steps:
        save_checkpoint(models.policy, Path(args.out) / f"step{step + 1}", models.tokenizer,
                        source_dir=args.model, dtype=scale.save_dtype)
    save_training_state(args.out, step + 1, args.steps, models.policy, optimizer, args,
                        rng=pairing_rng)


if __name__ == "__main__":
    run_cli(main)
