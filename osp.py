"""Online self-preferring (OSP) language models (paper 2, Algorithm 1): the policy samples K responses
per prompt, the SFT model judges them itself (LLM-as-a-judge, the logits of "A"/"B"), responses are
paired by rank, and the soft preference strengths are learned with the SPCE loss.

    # (optional, paper 2 needs it for small models) preference augmentation: SFT on judge instructions
    python data/convert.py --format judge --input data/builtin/pairs_train.jsonl --output data/builtin/judge_sft.jsonl
    python sft.py --model runs/builtin/sft --data data/builtin/judge_sft.jsonl --out runs/builtin/judge
    # or the same A/B objective through train_rm.py (records its template; run.sh does this, paper 1's format)
    python train_rm.py --type pairwise --model runs/builtin/sft --pairs data/builtin/pairs_train.jsonl --out runs/builtin/judge

    # OSP from the SFT model, judged by the augmented SFT model
    python osp.py --model runs/builtin/sft --judge runs/builtin/judge --prompts data/builtin/prompts_iter1.jsonl \\
        --out runs/builtin/osp --steps 100 --gold
    torchrun --nproc_per_node 8 osp.py --model /ckpt/tinyllama-sft --judge /ckpt/tinyllama-judge \\
        --prompts prompts.jsonl --out runs/osp --steps 2000

Each step, for a batch of prompts x (Algorithm 1, lines 5-10):
  1. sample K responses y_1..y_K from the current policy π_θ (on-policy; --sampling sft samples π_SFT);
  2. the judge (frozen) scores each response against the empty response, s_i = p(y_i ≻ ∅ | x), the
     judge instruction asked in both A/B orders and averaged;
  3. ranked pairing: highest with lowest, second highest with second lowest, ... → K//2 pairs, O(K)
     judge calls instead of O(K²) for all pairs (paper 2 §3.2);
  4. target strength of each pair p = p(y_hi ≻ y_lo | x): the judge's softmax over the "A"/"B"
     logits, both orders averaged;
  5. SPCE (paper 2, eq. (9)) with implicit strength σ(β h) (eq. (7)) and reference π_SFT; update.
The policy starts from --model (π_SFT), which is also the reference; the judge is --judge (π_SFT
after preference augmentation; --model itself when omitted). Paper 2's TinyLlama settings are the
defaults: K = 7, β = 0.001, lr 2e-6, batch 16 prompts, top-p 0.9, temperature 0.7.
Ablations: --loss spce|dpo|ipo (DPO/IPO take the higher-ranked response as chosen), --pairing
ranked|random|best (best = RAFT: NLL on the top-ranked response only), --sampling policy|sft.
Data parallelism is DDP: each rank samples with its own full replica of the policy.
"""
import argparse
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common import (MetricsLogger, all_reduce_sum, clip_grad_norm, cosine_lr, default_dtype, destroy_distributed,
                    encode_prompt, encode_response, end_of_turn_ids, gradient_sync, init_distributed, load_tokenizer,
                    print0, save_checkpoint, seed_everything, stop_token_ids, unwrap, wrap_model)
from data.judge import JUDGE_TEMPLATES
from data.schema import load_records
from dpo import preference_loss, sequence_logps
from generate import Engine, sample_seed
from model import Transformer
from train_rm import judge_template, pairwise_preference

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


def main():
    # ----------------------------------------------------------------------------------------------
    # Command line

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="π_SFT: the initial policy and the reference")
    parser.add_argument("--judge", default=None, help="the judge (π_SFT after preference augmentation); default --model")
    parser.add_argument("--prompts", required=True, help="prompts JSONL (id, messages)")
    parser.add_argument("--out", required=True, help="output checkpoint folder (+ metrics.jsonl)")
    parser.add_argument("--steps", type=int, default=100, help="training steps (one batch of prompts each)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per step, over all ranks (paper 2: 16)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="pairs per forward per rank")
    parser.add_argument("--k", type=int, default=7, help="responses sampled per prompt (paper 2: K = 7)")
    parser.add_argument("--loss", choices=["spce", "dpo", "ipo"], default="spce", help="preference loss (ablation)")
    parser.add_argument("--pairing", choices=["ranked", "random", "best"], default="ranked", help="pair construction (ablation)")
    parser.add_argument("--sampling", choices=["policy", "sft"], default="policy", help="sample from the current policy (on-policy) or π_SFT")
    parser.add_argument("--beta", type=float, default=0.001, help="β (paper 2: 0.001 dialogue, 0.02 summarization)")
    parser.add_argument("--lr", type=float, default=2e-6, help="peak learning rate (paper 2: 2e-6)")
    parser.add_argument("--warmup-ratio", type=float, default=0.03, help="linear warmup fraction of the cosine schedule")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (paper 2: 0.7)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (paper 2: 0.9)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="response length cap (paper 2: 512/768)")
    parser.add_argument("--judge-template", default=None,
                        help=f"judge instruction: one of {sorted(JUDGE_TEMPLATES)} or a text file with {{context}}, {{response_a}}, "
                             "{response_b}; default: the judge's judge_template.txt (a train_rm.py pairwise model), else 'dialogue'")
    parser.add_argument("--gold", action="store_true", help="log agreement of the judge with the built-in task's gold scorer")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    parser.add_argument("--save-every", type=int, default=0, help="also save a checkpoint every N steps (0: only at the end)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0, help="global seed (prompt order, sampling streams)")
    parser.add_argument("--log-every", type=int, default=1, help="print a step line every N steps")
    args = parser.parse_args()

    # ----------------------------------------------------------------------------------------------
    # Distributed init

    dist_info = init_distributed(args.device)
    device = dist_info.device
    compute_dtype = default_dtype(device)
    seed_everything(args.seed)
    if args.batch_size % dist_info.world_size:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the number of ranks ({dist_info.world_size})")
    if (Path(args.out) / "model.safetensors").exists():
        print0(f"{args.out} already holds a model; skipping")
        destroy_distributed()
        raise SystemExit(0)

    # ----------------------------------------------------------------------------------------------
    # Data and judge template

    prompts = load_records(args.prompts, "prompts")
    template = judge_template(args.judge or args.model, args.judge_template, default="dialogue")

    if args.gold:
        from data.task import score as gold_score

    # ----------------------------------------------------------------------------------------------
    # Models: the policy (trained, fp32 master weights, DDP), the reference π_SFT and the judge (frozen).

    tokenizer = load_tokenizer(args.model)
    end_of_turn = end_of_turn_ids(tokenizer)
    policy = Transformer.from_pretrained(args.model).float()
    policy = wrap_model(policy, "ddp", device)
    reference = Transformer.from_pretrained(args.model, device=device, dtype=compute_dtype).eval().requires_grad_(False)
    judge = reference if args.judge in (None, args.model) else \
        Transformer.from_pretrained(args.judge, device=device, dtype=compute_dtype).eval().requires_grad_(False)
    judge_tokenizer = tokenizer if args.judge in (None, args.model) else load_tokenizer(args.judge)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)

    prompt_ids = [encode_prompt(tokenizer, p["messages"]) for p in prompts]
    local_batch = args.batch_size // dist_info.world_size
    engine_max_len = max(map(len, prompt_ids)) + args.max_new_tokens
    # The sampler reads the policy's (or π_SFT's) weights in place: after each optimizer step the next
    # samples come from the updated policy, with no copy to keep in sync.
    sampler_model = unwrap(policy) if args.sampling == "policy" else reference
    engine = Engine(sampler_model, local_batch * args.k, engine_max_len, stop_token_ids(tokenizer), dtype=compute_dtype)

    # ----------------------------------------------------------------------------------------------
    # Training loop

    metrics = MetricsLogger(Path(args.out) / "metrics.jsonl", enabled=dist_info.is_main)
    order_rng = random.Random(args.seed)
    order = []
    pairing_rng = random.Random(args.seed * 7919 + dist_info.rank)
    for step in tqdm(range(args.steps), desc=f"osp ({args.loss}, {args.pairing})", disable=not dist_info.is_main):
        t0 = time.time()
        while len(order) < args.batch_size:  # prompts cycle through the file, reshuffled each pass
            epoch = list(range(len(prompts)))
            order_rng.shuffle(epoch)
            order += epoch
        batch, order = order[:args.batch_size], order[args.batch_size:]
        mine = batch[dist_info.rank * local_batch:(dist_info.rank + 1) * local_batch]

        # 1. K samples per prompt.
        sampler_model.eval()
        with torch.no_grad(), autocast:
            seeds = [[sample_seed(args.seed * 1_000_003 + step, prompts[i]["id"], j) for j in range(args.k)] for i in mine]
            outputs = engine.generate([prompt_ids[i] for i in mine], args.k, args.max_new_tokens, args.temperature,
                                      top_p=args.top_p, base_seeds=seeds)
        stop_set = set(engine.stop_ids.tolist())
        responses = [[tokenizer.decode(o["tokens"][:-1] if o["tokens"][-1] in stop_set else o["tokens"]) for o in outs] for outs in outputs]

        # 2-4. The judge: each response against the empty one, ranking, pairs, target strengths.
        with autocast:
            flat_prompts = [prompts[i]["messages"] for i in mine for _ in range(args.k)]
            flat_responses = [r for rs in responses for r in rs]
            self_scores = pairwise_preference(judge, judge_tokenizer, flat_prompts, flat_responses, [""] * len(flat_responses),
                                              device, template).view(len(mine), args.k).tolist()
        examples = []  # (prompt index, chosen text, rejected text)
        for row, i in enumerate(mine):
            scores = self_scores[row]
            if args.pairing == "ranked":
                pairs = ranked_pairs(scores)
            elif args.pairing == "random":
                pairs = random_pairs(scores, pairing_rng)
            else:  # RAFT: the top-ranked response alone
                pairs = [(ranked_pairs(scores)[0][0], None)]
            examples += [(i, responses[row][hi], None if lo is None else responses[row][lo]) for hi, lo in pairs]
        if args.pairing != "best":
            with autocast:
                targets = pairwise_preference(judge, judge_tokenizer, [prompts[i]["messages"] for i, _, _ in examples],
                                              [c for _, c, _ in examples], [r for _, _, r in examples], device, template)
        else:
            targets = torch.ones(len(examples), device=device)

        # 5. The update: SPCE (or the ablation's loss) over all pairs of the global batch.
        policy.train()
        global_pairs = len(examples) * dist_info.world_size  # equal on every rank
        lr = cosine_lr(step, args.steps, args.lr, args.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums = dict(loss=0.0, target=0.0, implicit=0.0, kl=0.0)
        micro = [examples[s:s + args.micro_batch_size] for s in range(0, len(examples), args.micro_batch_size)]
        for m, chunk in enumerate(micro):
            chunk_targets = targets[m * args.micro_batch_size:m * args.micro_batch_size + len(chunk)]
            prompt_tokens = [prompt_ids[i] for i, _, _ in chunk]
            chosen_tokens = [encode_response(tokenizer, c, end_of_turn) for _, c, _ in chunk]
            with gradient_sync(policy, sync=m == len(micro) - 1), autocast:
                if args.pairing == "best":  # RAFT: per-token NLL of the best response
                    logps, counts = sequence_logps(policy, prompt_tokens, chosen_tokens, tokenizer.pad_token_id, device)
                    per_pair, h = -logps / counts, torch.zeros_like(logps)
                    with torch.no_grad():
                        ref_logps, _ = sequence_logps(reference, prompt_tokens, chosen_tokens, tokenizer.pad_token_id, device)
                    log_ratios = logps.detach() - ref_logps
                else:
                    rejected_tokens = [encode_response(tokenizer, r, end_of_turn) for _, _, r in chunk]
                    logps, counts = sequence_logps(policy, prompt_tokens * 2, chosen_tokens + rejected_tokens, tokenizer.pad_token_id, device)
                    with torch.no_grad():
                        ref_logps, _ = sequence_logps(reference, prompt_tokens * 2, chosen_tokens + rejected_tokens, tokenizer.pad_token_id, device)
                    n = len(chunk)
                    policy_chosen, policy_rejected, ref_chosen, ref_rejected = logps[:n], logps[n:], ref_logps[:n], ref_logps[n:]
                    if args.loss == "ipo":  # length-normalised log-probs, as in dpo.py
                        per_pair = preference_loss(policy_chosen / counts[:n], policy_rejected / counts[n:], ref_chosen / counts[:n],
                                                   ref_rejected / counts[n:], args.beta, "ipo")
                    else:
                        per_pair = preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, args.beta, args.loss, chunk_targets)
                    h = ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)).detach()
                    log_ratios = (logps.detach() - ref_logps)
                loss = per_pair.sum() / global_pairs * dist_info.world_size
                loss.backward()
            sums["loss"] += loss.item() / dist_info.world_size
            sums["target"] += chunk_targets.sum().item()
            sums["implicit"] += torch.sigmoid(args.beta * h).sum().item()
            # k1 estimate of KL(π_θ‖π_SFT): the samples are on-policy, so the mean log-ratio is unbiased
            sums["kl"] += log_ratios.view(-1, len(chunk)).mean(0).sum().item()
        grad_norm = clip_grad_norm(policy, args.grad_clip if args.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        totals = {k: all_reduce_sum(v, device) / global_pairs for k, v in sums.items()}
        totals["loss"] *= global_pairs  # already a global mean
        lengths = [len(r) for rs in responses for r in rs]
        line = dict(step=step + 1, loss=totals["loss"], target_strength=totals["target"], implicit_strength=totals["implicit"],
                    kl=totals["kl"], grad_norm=grad_norm, lr=lr, mean_length_chars=all_reduce_sum(sum(lengths), device) / (len(lengths) * dist_info.world_size),
                    ms=(time.time() - t0) * 1000)
        if args.gold:
            gold = [[gold_score(prompts[i]["messages"], r) for r in responses[row]] for row, i in enumerate(mine)]
            line["gold_mean"] = all_reduce_sum(sum(map(sum, gold)), device) / (len(lengths) * dist_info.world_size)
            # judge agreement: on pairs whose gold scores differ, does the judge's target side with gold?
            agree = total = 0
            if args.pairing != "best":
                for (i, chosen, rejected), p in zip(examples, targets.tolist()):
                    g_chosen, g_rejected = gold_score(prompts[i]["messages"], chosen), gold_score(prompts[i]["messages"], rejected)
                    if g_chosen != g_rejected and p != 0.5:
                        total += 1
                        agree += (g_chosen > g_rejected) == (p > 0.5)
            total = all_reduce_sum(total, device)
            line["judge_gold_agreement"] = all_reduce_sum(agree, device) / total if total else float("nan")
        metrics.log(**line)
        if dist_info.is_main and (step % args.log_every == 0 or step == args.steps - 1):
            gold_text = f" | gold {line['gold_mean']:.3f} | judge~gold {line['judge_gold_agreement']:.2f}" if args.gold else ""
            tqdm.write(f"step {step + 1}/{args.steps} | loss {line['loss']:.4f} | target {line['target_strength']:.3f} | "
                       f"implicit {line['implicit_strength']:.3f} | kl {line['kl']:+.3f} | len {line['mean_length_chars']:.1f}"
                       f"{gold_text} | {line['ms']:.0f} ms")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_checkpoint(policy, Path(args.out) / f"step{step + 1}", tokenizer, source_dir=args.model)

    # ----------------------------------------------------------------------------------------------
    # Save

    metrics.close()
    save_checkpoint(policy, args.out, tokenizer, source_dir=args.model)
    print0(f"saved {args.out}")
    destroy_distributed()


if __name__ == "__main__":
    main()
