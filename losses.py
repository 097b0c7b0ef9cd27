"""The math of learning from preferences, in one place, imported by every stage. In reading order:
  1. sequence log-probs   log π(y|x) of a response, token by token and summed; per-token NLL; k3 KL
  2. preference losses    the margin h, DPO's implicit reward, DPO / IPO / SPCE, Bradley-Terry
  3. pairs from samples   an ensemble's reward, and which two of n scored responses make a pair
"""
import math
import torch
import torch.nn.functional as F
from tokens import right_pad

# ----------------------------------------------------------------------------------------------
# 1. Sequence log-probs


def token_logps(model, prompts, responses, pad_id, device):
    """The log-prob of each response token given its prompt and the response before it: (B, T),
    0 at prompt and padding positions. prompts/responses: token-id lists; only response tokens are
    scored (the rest is masked with -100), through the fused LM-head log-prob kernel."""
    sequences = [p + r for p, r in zip(prompts, responses)]
    input_ids, _ = right_pad(sequences, pad_id, device)                   # (B, T)
    targets = torch.full_like(input_ids, -100)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        # position t predicts token t+1: response token j (at position len(p) + j) is the target
        # at position len(p) + j − 1
        targets[row, len(p) - 1:len(p) + len(r) - 1] = torch.tensor(r, device=device)
    return model(input_ids, targets=targets, num_targets=sum(map(len, responses)))  # (B, T)


def sequence_logps(model, prompts, responses, pad_id, device):
    """Summed log-probs of each response given its prompt: (logps (B,), num_tokens (B,))."""
    logps = token_logps(model, prompts, responses, pad_id, device)
    return logps.sum(1), torch.tensor([len(r) for r in responses], device=device)


def per_token_nll(logps, num_tokens, weight=None):
    """The mean negative log-likelihood per token of each response (B,), from its summed log-probs
    (B,) and token counts (B,): SFT's loss, RAFT's in osp.py; with a `weight` α, α times it,
    rounded as −(α · log-probs) / tokens (RPO's added term in dpo.py)."""
    if weight is not None:
        logps = weight * logps
    return -logps / num_tokens


def k3_kl(logps, ref_logps):
    """KL(π‖π_ref) of each response (B,), by Schulman's k3 estimator on its tokens (B, T):
    Σ_t (r_t − 1 − log r_t) with r_t = π_ref(y_t|·) / π(y_t|·). Every term is ≥ 0, and on tokens
    sampled from π the sum is unbiased: E_π[r_t] = 1 leaves E[−log r_t], the per-token KL (k1 has
    the same mean, but a batch of it can be negative). A masked position (0 in both) adds 0."""
    log_r = ref_logps.float() - logps.float()
    return (log_r.exp() - 1 - log_r).sum(-1)


# ----------------------------------------------------------------------------------------------
# 2. Preference losses


def preference_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                      ref_rejected_logps, loss_type="dpo", chosen_tokens=None,
                      rejected_tokens=None):
    """h (B,), the argument of every preference loss, from summed response log-probs (B,):
        h = [log π(a_w|x) − log π_ref(a_w|x)] − [log π(a_l|x) − log π_ref(a_l|x)],
    > 0 when the policy raised the chosen response's likelihood, relative to the reference, more
    than the rejected one's (β h is the difference of DPO's implicit rewards, implicit_reward).
    IPO with `chosen_tokens` / `rejected_tokens` (B,) given: each of the four log-probs is first
    divided by its response's token count (TRL's convention: IPO on per-token mean log-probs, so
    the target margin 1/(2β) does not depend on response length). DPO and SPCE ignore the counts."""
    if loss_type == "ipo" and chosen_tokens is not None:
        policy_chosen_logps = policy_chosen_logps / chosen_tokens
        ref_chosen_logps = ref_chosen_logps / chosen_tokens
        policy_rejected_logps = policy_rejected_logps / rejected_tokens
        ref_rejected_logps = ref_rejected_logps / rejected_tokens
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def implicit_reward(policy_logps, ref_logps, beta):
    """DPO's implicit reward of each response (B,): r = β log π(y|x)/π_ref(y|x) (Rafailov et al.
    2023, eq. 5, less the β log Z(x) that cancels within a pair), so that β h = r_w − r_l.
    dpo.py logs it (TRL's rewards/chosen and rewards/rejected)."""
    return beta * (policy_logps - ref_logps)


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                    ref_rejected_logps, beta, loss_type="dpo", target=None, chosen_tokens=None,
                    rejected_tokens=None):
    """Per-pair losses (B,) from summed response log-probs (B,), of h = preference_margin(...).
    `target` is the soft label p = P(chosen ≻ rejected) for SPCE (a tensor (B,) or a float); DPO
    is SPCE with p = 1."""
    h = preference_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                          ref_rejected_logps, loss_type, chosen_tokens, rejected_tokens)
    if loss_type == "dpo":  # Rafailov et al. 2023, eq. 7
        return -F.logsigmoid(beta * h)
    if loss_type == "spce":  # paper 2, eq. (8)
        # Cross-entropy between the target strength p and the implicit strength σ(βh). Its gradient
        # in h is β(σ(βh) − p): zero exactly when the implicit strength equals the target.
        p = torch.as_tensor(1.0 if target is None else target, dtype=h.dtype, device=h.device)
        return -(p * F.logsigmoid(beta * h) + (1 - p) * F.logsigmoid(-beta * h))
    if loss_type == "ipo":  # Azar et al. 2023, eq. 17
        # A squared loss that pulls h to 1/(2β) instead of pushing it to infinity.
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown loss_type {loss_type!r} (dpo, ipo, spce)")


def bt_loss(chosen_rewards, rejected_rewards, margin=None, center_coef=0.0):
    """Per-pair Bradley-Terry loss −log σ(r_w − r_l − m)  (paper 1 §2.1; m is Llama-2's optional
    margin, 0 by default), plus the optional reward-centering term c·(r_w + r_l)² (Eisenstein et
    al. 2023) that pins the rewards' arbitrary offset near 0. Inputs (B,), output (B,)."""
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference)  # logsigmoid is stable for large |difference|
    if center_coef:
        loss = loss + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return loss


# ----------------------------------------------------------------------------------------------
# 3. Pairs from scored samples (the online iteration: sample → score → pair → train)


def ensemble_rewards(member_rewards, mode="mean"):
    """One reward per response from K reward models' (a list of K lists): their mean, or with
    mode "mean_minus_std" the mean minus their standard deviation over members (Coste et al. 2023,
    uncertainty-weighted optimisation with λ = 1: responses the members disagree on are trusted
    less, against over-optimisation). One member: its own rewards."""
    k = len(member_rewards)
    means = [sum(values) / k for values in zip(*member_rewards)]
    if mode == "mean" or k == 1:
        return means
    stds = [math.sqrt(sum((v - m) ** 2 for v in values) / (k - 1))
            for values, m in zip(zip(*member_rewards), means)]
    return [m - s for m, s in zip(means, stds)]


def best_index(values):
    """The index of the best value; of equal ones, the first."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def worst_index(values):
    """The index of the worst value; of equal ones, the last (so that with all values equal,
    best_index and worst_index differ: a tie, not a response paired with itself)."""
    return min(range(len(values)), key=lambda i: (values[i], -i))


PAIR_SELECTIONS = ("max_min", "max_random", "random")


def select_pairs(records, selection="max_min", length_penalty=0.0, missing_eos_penalty=0.0,
                 reward_tolerance=0.0, source=None):
    """One (chosen, rejected) pair per prompt, by the adjusted reward
        r̃ = r − λ·characters − c·[the response hit --max-new-tokens without a stop token]
    (λ: paper 1 §3.3, 0.001 in its "concise" run; c: TRL's missing_eos_penalty). `selection`, as in
    paper 1's code (RLHFlow's run_dpo.py, choose_type):
      max_min     the best vs the worst (paper 1); ties: best is the first maximum, worst the last
                  minimum, so equal rewards count as a reward tie, not one response paired with
                  itself;
      max_random  the best vs the first other response (the n samples are i.i.d., so a random one);
      random      responses 0 and 1, the higher r̃ chosen.
    A prompt is dropped when its two responses are the same text or their r̃ differ by no more than
    reward_tolerance. A record's response_ids go with the pair (chosen_ids, rejected_ids): training
    scores those tokens; a pair with a response of no tokens at all (an empty text cut at once,
    from another sampler) has nothing to score and is dropped. Returns (pairs, counts of dropped
    prompts by reason)."""
    pairs, dropped = [], {"same_text": 0, "reward_tie": 0, "empty_response": 0}
    for record in records:
        responses, rewards = record["responses"], record["rewards"]
        finish_reasons = record.get("finish_reasons", [None] * len(responses))
        cut = [reason == "length" for reason in finish_reasons]
        adjusted = [r - length_penalty * len(text) - missing_eos_penalty * c
                    for r, text, c in zip(rewards, responses, cut)]
        if selection == "random":
            first, second = 0, 1
        else:
            first = best_index(adjusted)
            if selection == "max_min":
                second = worst_index(adjusted)
            else:
                second = 1 if first == 0 else 0
        best, worst = (first, second) if adjusted[first] >= adjusted[second] else (second, first)
        if responses[best] == responses[worst]:
            dropped["same_text"] += 1
        elif adjusted[best] - adjusted[worst] <= reward_tolerance:
            dropped["reward_tie"] += 1
        elif (ids := record.get("response_ids")) and not (ids[best] and ids[worst]):
            dropped["empty_response"] += 1
        else:
            pairs.append({"id": record["id"], "prompt": record["prompt"], "chosen": responses[best],
                          "rejected": responses[worst], "margin": adjusted[best] - adjusted[worst],
                          **({"chosen_ids": ids[best], "rejected_ids": ids[worst]} if ids else {}),
                          **({"source": source} if source else {})})
    return pairs, dropped
