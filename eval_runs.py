"""Evaluation on the built-in task: each checkpoint of a run answers the held-out prompts (greedily,
and n samples at temperature 1, the distribution the online loop trains on), the gold scorer
(data/task.py, r* = correctness − 0.002 · extra characters) grades the answers, and a Markdown
table + JSON + PNG plots summarise the run. run.sh calls it last.

    python eval_runs.py --run runs/builtin --prompts data/builtin/prompts_eval.jsonl
    python eval_runs.py --run runs/builtin-small-seed{0,1,2} \\
        --summary runs/builtin-small-seeds.md                          # over seeds

Checkpoints are found by their place in the run folder (those missing are left out of the table):
  sft/                               the SFT model (π_0)
  sft_gold/                          control: SFT continued on the exact answers to the loop's
                                     prompts
  dpo_offline_offpolicy/             offline DPO on the off-policy pairs (paper 1's baseline)
  dpo_offline/                       offline DPO on the SFT-like pairs with human labels (the ideal)
  online_gold/iter{t}/policy/        iterative DPO after t online iterations, gold reward r*
                                     (oracle)
  online_offpolicy/iter{t}/policy/   the same with a Bradley-Terry reward model of the off-policy
                                     pairs (rm_offpolicy/)
  online/iter{t}/policy/             the same with a BT model of the SFT-like pairs (rm_bt/)
  online_biased/iter{t}/policy/      the same with a length-biased BT reward model (rm_biased/)
  online_biased_lp/iter{t}/policy/   the same with a length penalty in pair selection
  osp_*/                             online self-preferring runs (the folder name is the variant)
Per checkpoint: gold mean ± standard error over prompts, its paired difference from SFT (± the
paired standard error), mean answer length in characters, gold per sub-task; paper 1's comparison:
each online loop's last iteration minus offline DPO on the same pairs, paired per prompt.
Reference points that need no training: SFT sampled at T = 0.5, SFT best-of-n picked by gold and
by each reward model. Reward models: held-out accuracy on labelled pairs (eval.json written by
train_rm.py) beside the on-policy accuracy, on every pair of the SFT model's own samples whose
gold differs (data.task.reward_vs_gold); the BT model's reward–length correlation (paper 1's
length-bias statistic); the judge's preference for length. Over-optimisation (Gao et al. 2023's
"proxy vs gold"): per online run and iteration, the reward model's mean reward of the policy's
samples, their gold, and the KL to π_0 (over_optimisation.png). Answers are kept in each
checkpoint's folder (eval_samples_T{temperature}.jsonl), so a rerun only evaluates what is new;
`--prepare NAME ...` only writes those answers, for the checkpoints under the run's folders NAME
(a workflow answers with what it has finished while the rest still trains; tools/run_smollm2.sh).
"""
import argparse
import itertools
import json
import math
from pathlib import Path

import torch

from parallel import default_dtype
from runs import (InputError, atomic_write_text, has_model, non_negative_int, positive_int,
                  read_jsonl, run_cli, write_jsonl)
from tokens import encode_prompt, load_tokenizer, response_ids, stop_token_ids
from data.schema import load_records
from data.task import (GOLD_GAP, gold_agreement, parse_prompt, picked_gold, prompt_text,
                       reward_vs_gold)
from generate import Engine, encode_prompts, generate_records, prompt_columns
from rewards import load_reward_function, verifier_flag, verifier_rewards
from model import ModelConfig, Transformer


ONLINE_SERIES = {"online_gold": "iterative DPO, gold reward (oracle)",
                 "online_offpolicy": "iterative DPO, BT on off-policy pairs",
                 "online": "iterative DPO, BT on SFT-like pairs",
                 "online_biased": "iterative DPO, length-biased BT",
                 "online_biased_lp": "iterative DPO, length-biased BT + length penalty"}
# The single checkpoints (no iterations): folder, label.
SINGLE_CHECKPOINTS = {"sft_gold": "SFT on the gold answers (control)",
                      "dpo_offline_offpolicy": "offline DPO, off-policy pairs",
                      "dpo_offline": "offline DPO, SFT-like pairs, human labels (the ideal)"}
# Paper 1's comparison (its Table 2): an online loop at its last iteration against offline DPO on
# the same preference data (the reward model's training pairs), paired per prompt. Online series →
# offline checkpoint.
VERSUS_OFFLINE = {"online_offpolicy": "dpo_offline_offpolicy", "online": "dpo_offline"}
# the SFT reference point "sampled at a lower temperature" (sharpening without training)
COOLER_TEMPERATURE = 0.5
REWARD_MODELS = {"rm_offpolicy": "Bradley-Terry (off-policy pairs)",
                 "rm_bt": "Bradley-Terry (SFT-like pairs)",
                 "rm_biased": "Bradley-Terry (offline pairs: length-biased)",
                 "judge": "pairwise (OSP judge)"}


def checkpoints(run):
    """(label, folder, series, t) of every checkpoint in the run folder, in the table's order."""
    found = [("SFT", run / "sft", None, 0)]
    found += [(label, run / name, None, None) for name, label in SINGLE_CHECKPOINTS.items()]
    for name, label in ONLINE_SERIES.items():
        found += [(f"{label}, t = {t}", p, name, t)
                  for t, p in sorted(iteration_policies(run / name).items())]
    found += [(f"OSP ({p.name.removeprefix('osp_').replace('_', ', ')})", p, None, None)
              for p in sorted(run.glob("osp_*"))]
    return [f for f in found if has_model(f[1])]


def iteration_policies(folder):
    return {int(p.parent.name.removeprefix("iter")): p for p in folder.glob("iter*/policy")}


def answers(folder, prompts, device, max_new_tokens, batch_size, n, temperature, gold):
    """The checkpoint's answers (n per prompt), cached in eval_samples_T{temperature}.jsonl, with
    their `gold`: the rewards of --gold's verifier (rewards.verifier_rewards; default the built-in
    task's r*), computed afresh each time, so cached answers are never graded by another one.
    Answers sampled at T = 1 keep each one's summed log-prob log π(y|x) (`logprobs`, the sampler's:
    Scorer.sampled_kl's first term). Each record keeps the `max_new_tokens` it was answered with:
    answers cut at another cap are answered again. `gold`: (function, spec)."""
    cached = folder / f"eval_samples_T{temperature:g}.jsonl"
    # Answers written before the model (a checkpoint trained again with --overwrite) are stale.
    records = None
    if cached.exists() and cached.stat().st_mtime >= (folder / "model.safetensors").stat().st_mtime:
        records = read_jsonl(cached)
        if ([(r["id"], len(r["responses"]), r.get("max_new_tokens")) for r in records]
                != [(p["id"], n, max_new_tokens) for p in prompts]
                or (temperature == 1 and not all("logprobs" in r for r in records))):
            records = None
    fresh = records is None
    if fresh:
        tokenizer = load_tokenizer(folder)
        model = Transformer.from_pretrained(folder, device=device,
                                            dtype=default_dtype(device)).eval()
        engine = Engine(model, batch_size, stop_token_ids(tokenizer), cpu_slots=256)
        records = generate_records(engine, tokenizer, prompts, n, max_new_tokens, temperature,
                                   seed=0, logprobs=temperature == 1)
        for record in records:
            record.pop("token_logprobs", None)
            record["max_new_tokens"] = max_new_tokens
    # the prompts' own fields, not the cache's: an answer corrected since is graded as it is now
    columns = [prompt_columns(prompt) for prompt in prompts]
    for record, rewards in zip(records, verifier_rewards(*gold, records, columns)):
        record["gold"] = rewards
    if fresh:
        write_jsonl(cached, records)
    return records


def mean_and_std(values):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def mean_and_stderr(values):
    mean, std = mean_and_std(values)
    return mean, std / math.sqrt(len(values))


def sub_task(record):
    """A built-in prompt's sub-task; for other prompts their `task` column, else "all"."""
    parsed = parse_prompt(prompt_text(record["prompt"]))
    return parsed[0] if parsed else str(record.get("columns", {}).get("task", "all"))


def summarise(greedy, sampled):
    """Greedy: gold mean ± s.e. over prompts, exact-answer rate, length, per sub-task. Sampled
    (temperature 1, what the online loop trains on): gold and length, per-prompt means."""
    gold = [r["gold"][0] for r in greedy]
    mean, stderr = mean_and_stderr(gold)
    by_task = {}
    for record, g in zip(greedy, gold):
        by_task.setdefault(sub_task(record), []).append(g)
    sampled_mean, sampled_stderr = mean_and_stderr([sum(r["gold"]) / len(r["gold"])
                                                    for r in sampled])
    sampled_length = (sum(len(y) for r in sampled for y in r["responses"])
                      / sum(len(r["responses"]) for r in sampled))
    return dict(gold=mean, gold_stderr=stderr,
                length=sum(len(r["responses"][0]) for r in greedy) / len(greedy),
                exact=sum(g >= 1.0 for g in gold) / len(gold),
                by_task={k: sum(v) / len(v) for k, v in sorted(by_task.items())},
                sampled_gold=sampled_mean, sampled_gold_stderr=sampled_stderr,
                sampled_length=sampled_length)


def per_prompt_gold(greedy, sampled):
    """(greedy gold, mean sampled gold) per prompt, in the prompts' order."""
    return [r["gold"][0] for r in greedy], [sum(r["gold"]) / len(r["gold"]) for r in sampled]


def paired_difference(values, baseline, key):
    """Mean per-prompt difference from the baseline (same prompts) ± its paired standard error."""
    mean, stderr = mean_and_stderr([v - b for v, b in zip(values, baseline, strict=True)])
    return {f"delta_{key}": mean, f"delta_{key}_stderr": stderr}


def versus_offline(results, per_prompt):
    """Each online series of VERSUS_OFFLINE at its last iteration minus the offline DPO checkpoint
    trained on the same pairs: per-prompt paired differences (greedy and sampled gold), in the
    Δ SFT columns' format. per_prompt: folder → per_prompt_gold's (greedy gold, mean sampled
    gold) per prompt."""
    offline = {Path(r["folder"]).name: r for r in results if r["series"] is None}
    comparisons = []
    for series, name in VERSUS_OFFLINE.items():
        online = [r for r in results if r["series"] == series]
        if online and name in offline:
            last = max(online, key=lambda r: r["t"])
            a, b = per_prompt[last["folder"]], per_prompt[offline[name]["folder"]]
            comparisons.append(dict(label=f"{last['label']} − {offline[name]['label']}",
                                    **paired_difference(a[0], b[0], "gold"),
                                    **paired_difference(a[1], b[1], "sampled_gold")))
    return comparisons


def reference_points(sampled, cooler, scored):
    """What the SFT model gives with no training: sampled at a lower temperature, and best-of-n
    picked by gold (the ceiling of reranking its samples) and by each reward model.
    {label: (mean, s.e.)}."""
    n = len(sampled[0]["gold"])
    points = {f"SFT sampled at T = {COOLER_TEMPERATURE:g}":
              mean_and_stderr([sum(r["gold"]) / len(r["gold"]) for r in cooler]),
              f"SFT best of {n} (T = 1), picked by gold":
              mean_and_stderr([max(r["gold"]) for r in sampled])}
    for name, records in scored.items():
        points[f"SFT best of {n}, picked by {REWARD_MODELS[name]}"] = mean_and_stderr(
            [picked_gold(r) for r in records])
    return points


def training_reward_accuracy(folder, series, t, gold="gold"):
    """How well the reward a checkpoint was trained with ordered that training's own samples as
    gold does (data.task.reward_vs_gold): an online iteration t's reward model on π_{t−1}'s
    samples (its summary.json), an OSP run's judge on the policy's samples over all its steps
    (metrics.jsonl, --gold: each step's agreement weighted by its decided pairs); else None. An
    online iteration's only where its summary compared with the same `gold` as this evaluation."""
    if series is not None:
        path = folder.parent / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        stats = summary.get("reward_vs_gold")
        same_gold = summary.get("gold", "gold") == gold
        return stats["accuracy"] if stats and same_gold and series != "online_gold" else None
    metrics = folder / "metrics.jsonl"
    if folder.name.startswith("osp_") and metrics.exists():
        # a step with no decided pair logs NaN
        steps = [r for r in read_jsonl(metrics) if r.get("judge_gold_pairs")]
        decided = sum(r["judge_gold_pairs"] for r in steps)
        if not decided:
            return None
        return sum(r["judge_gold_agreement"] * r["judge_gold_pairs"] for r in steps) / decided
    return None


def reward_model_rows(run, on_policy):
    """(label, held-out eval.json, on-policy reward_vs_gold or None) of each reward model found."""
    rows = []
    for name, label in REWARD_MODELS.items():
        path = run / name / "eval.json"
        if path.exists():
            rows.append((label, json.loads(path.read_text()), on_policy.get(name)))
    return rows


class Scorer:
    """Loads each model once per evaluation: reward models' scores, log-probs of sampled answers."""

    def __init__(self, device):
        self.device, self.models, self.scores = device, {}, {}

    def model(self, folder, head="lm"):
        key = (str(folder), head)
        if key not in self.models:
            model = Transformer.from_pretrained(folder, device=self.device,
                                                dtype=default_dtype(self.device), head=head)
            self.models[key] = (model.eval(), load_tokenizer(folder))
        return self.models[key]

    def rewards(self, rm, policy, records):
        """The policy's answer records with `rewards` from the BT reward model in folder rm; once
        per (rm, policy): π_SFT's answers are the t = 0 point of several runs and the on-policy
        test set."""
        from rewards import score_records
        key = (str(rm), str(policy))
        if key not in self.scores:
            model, tokenizer = self.model(rm, head="score")
            # one answer at a time, in batches of about the same length (less padding)
            single = [((i, j), {**record, "responses": [text]})
                      for i, record in enumerate(records)
                      for j, text in enumerate(record["responses"])]
            single.sort(key=lambda item: len(str(item[1]["prompt"])) + len(item[1]["responses"][0]))
            scored = score_records(model, tokenizer, [r for _, r in single], self.device, 32, 1024)
            rewards = [[None] * len(record["responses"]) for record in records]
            for ((i, j), _), record in zip(single, scored):
                rewards[i][j] = record["rewards"][0]
            self.scores[key] = [{**record, "rewards": own} for record, own in zip(records, rewards)]
        return self.scores[key]

    @torch.no_grad()
    def sampled_kl(self, policy, reference, records, batch_size=32):
        """KL(π ‖ π_ref) estimated on answers sampled from π at temperature 1: the mean over
        answers of log π(y|x) − log π_ref(y|x) (each sequence's summed log-probs, its end-of-turn
        token included when it stopped there; an unbiased estimate of the sequence-level KL).
        In fp32 (a CPU) log π(y|x) is the one the sampler computed (answers' `logprobs`), so only
        π_ref runs; in bf16 the sampler's numbers are not a forward's, whose rounding would not
        cancel in the difference, so π runs too. Batches of answers of about the same length."""
        from losses import sequence_logps
        reference_model, tokenizer = self.model(reference)
        exact = default_dtype(self.device) == torch.float32
        models = [reference_model] if exact else [reference_model, self.model(policy)[0]]
        prompts, responses = [], []
        for record in records:
            ids = response_ids(tokenizer, record)  # as sampled (tokens.response_ids)
            prompts += [encode_prompt(tokenizer, record["prompt"])] * len(ids)
            responses += ids
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
        totals = [0.0] * len(models)  # Σ log π_ref(y|x) [, Σ log π(y|x)]
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = ([prompts[i] for i in rows], [responses[i] for i in rows],
                     tokenizer.pad_token_id, self.device)
            for k, model in enumerate(models):
                totals[k] += sequence_logps(model, *batch)[0].sum().item()
        if not exact:
            del self.models[(str(policy), "lm")]  # each policy is scored once; the reference stays
        policy_logps = (sum(x for record in records for x in record["logprobs"]) if exact
                        else totals[1])
        return (policy_logps - totals[0]) / len(prompts)


REWARD_ACCURACY_NOTE = (
    "reward acc.: how well the reward the checkpoint was trained with ordered the answers it was "
    f"trained on as gold does (pairs whose gold differs by more than {GOLD_GAP}; 0.5 = chance): "
    "an online iteration t's reward model on π_{t−1}'s samples, an OSP judge on its ranked pairs "
    "over all steps.")

VERSUS_HEADER = ("| paper 1's comparison: online at its last iteration − offline DPO on the same "
                 "pairs, paired per prompt | Δ gold (greedy) | Δ gold (T = 1) |")
# The proxy-vs-gold table's header, and what its KL column is (Scorer.sampled_kl).
CURVE_HEADER = "| online run | t | KL (k1) | reward model | gold (T = 1) |"
KL_NOTE = ("KL (k1): the mean over the sampled answers of log π_t(y|x) − log π_SFT(y|x); "
           "unbiased, but an average of few answers can fall slightly below 0 (t = 0 is π_SFT "
           "itself: exactly 0).")


def series_setting(run, series, name):
    """A model folder an online run names in its config.json ("rm", "sft"): as written, or in the
    run folder under its own name (a run folder moved elsewhere). None if absent or "gold"."""
    config = run / series / "config.json"
    value = json.loads(config.read_text()).get(name) if config.exists() else None
    if value in (None, "gold"):
        return None
    return next((p for p in (Path(value), run / Path(value).name) if has_model(p)), None)


def series_reward_model(run, series):
    """The BT reward model folder an online run trained with, None for the gold reward."""
    return series_setting(run, series, "rm")


def proxy_vs_gold(run, sampled_answers, scorer):
    """Gao et al.'s over-optimisation picture, per online run and iteration t (t = 0: SFT): the
    mean reward its reward model gives the policy's sampled answers to the held-out prompts
    (`reward`, absent for the gold-reward run), their mean gold, and the KL from π_0
    (Scorer.sampled_kl)."""
    curves = {}
    for series in ONLINE_SERIES:
        policies = sorted(iteration_policies(run / series).items())
        if not policies:
            continue
        rm = series_reward_model(run, series)
        sft = series_setting(run, series, "sft") or run / "sft"  # π_0: the run's reference
        points = []
        for t, folder in [(0, sft)] + policies:
            records = sampled_answers(folder)
            gold = [g for r in records for g in r["gold"]]
            kl = scorer.sampled_kl(folder, sft, records) if t else 0.0
            point = dict(t=t, gold=sum(gold) / len(gold), kl=kl)
            if rm is not None:
                rewards = [x for r in scorer.rewards(rm, folder, records) for x in r["rewards"]]
                point["reward"] = sum(rewards) / len(rewards)
            points.append(point)
        curves[series] = points
    return curves


def judge_on_sft_samples(run, device):
    """The OSP judge (run/judge) on every pair of the SFT model's sampled answers to the held-out
    prompts: how often it prefers the longer answer, and how often it sides with the gold reward
    where the two answers differ in correctness (|Δr*| > 0.1, more than a length difference)."""
    judge, samples = run / "judge", run / "sft" / "eval_samples_T1.jsonl"
    if not (has_model(judge) and samples.exists()):
        return None
    from rewards import judge_template, pairwise_preference
    prompts, first, second, gold_difference = [], [], [], []
    for record in read_jsonl(samples):
        for i, j in itertools.combinations(range(len(record["responses"])), 2):
            prompts.append(record["prompt"])
            first.append(record["responses"][i])
            second.append(record["responses"][j])
            gold_difference.append(record["gold"][i] - record["gold"][j])
    model = Transformer.from_pretrained(judge, device=device, dtype=default_dtype(device)).eval()
    with torch.no_grad():
        p_first = pairwise_preference(model, load_tokenizer(judge), prompts, first, second, device,
                                      judge_template(judge)).tolist()
    return judge_statistics(first, second, gold_difference, p_first)


def judge_statistics(first, second, gold_difference, p_first):
    """From the judge's P(first ≻ second) of each pair: the fraction of pairs of unequal length
    where it prefers the longer answer, and its agreement with gold (data.task.gold_agreement) on
    the pairs whose gold scores differ by more than GOLD_GAP (None where there is no such pair).
    The judge votes for the first answer when P > 0.5, else for the second (P = 0.5 included):
    it never ties (docs/tools.md)."""
    longer = [(len(a) > len(b)) == (p > 0.5)
              for a, b, p in zip(first, second, p_first) if len(a) != len(b)]
    votes = [1.0 if p > 0.5 else -1.0 for p in p_first]  # +1: first, −1: second
    agreement, decided = gold_agreement(gold_difference, votes)
    return dict(pairs=len(p_first), prefers_longer=sum(longer) / len(longer) if longer else None,
                gold_agreement=agreement, gold_agreement_pairs=decided)


def fraction(value):
    return "n/a" if value is None else f"{value:.3f}"


def length_correlations(run):
    """Paper 1's length-bias statistic for each online run's reward model, on its first
    iteration's samples (π_0 = SFT): {series: (mean per-prompt Pearson, prompts used, ...)}."""
    from rewards import length_bias
    found, seen = {}, set()
    for series in ONLINE_SERIES:
        rewards, rm = run / series / "iter1" / "rewards.jsonl", series_reward_model(run, series)
        if rm is not None and rm not in seen and rewards.exists():  # one line per reward model
            found[series] = length_bias(read_jsonl(rewards))
            seen.add(rm)
    return found


# ----------------------------------------------------------------------------------------------
# Plots


def matplotlib_pyplot():
    """matplotlib.pyplot with a file backend, or None (with a note) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return None
    return plt


def series_style(series):
    """An online run's colour and marker, the same in every plot."""
    i = list(ONLINE_SERIES).index(series)
    return dict(color=f"C{i}", marker="osD^v"[i])


def reference_style(i):
    """The i-th horizontal reference line's colour and dash pattern: no two alike, none in an
    online run's colour."""
    dashes = ["--", ":", "-.", (0, (6, 2, 1, 2, 1, 2)), (0, (1, 3)), (0, (10, 3))]
    return dict(color=f"C{len(ONLINE_SERIES) + i % 5}", linestyle=dashes[i % len(dashes)])


def label_iterations(ax, series, xs, ys, points, labelled):
    """Write t = … beside each point in the run's colour, once per spot (the runs share their
    t = 0 point, π_SFT); two of the runs' labels go below their points, so that nearby points of
    two runs keep readable labels."""
    offset = (5, -12 if series in ("online", "online_biased") else 5)  # points
    for x, y, p in zip(xs, ys, points):
        spot = (round(x, 3), round(y, 3), p["t"])
        if spot not in labelled:
            labelled.add(spot)
            ax.annotate(f"t={p['t']}", (x, y), fontsize=7, color=series_style(series)["color"],
                        textcoords="offset points", xytext=offset,
                        bbox=dict(boxstyle="square,pad=0.1", facecolor="white", edgecolor="none",
                                  alpha=0.7))


def gold_name(spec):
    """What the plots and tables call the gold reward: the built-in task's r*, or the verifier."""
    return "gold r*" if spec == "gold" else f"gold ({spec})"


def plot_proxy_vs_gold(curves, out, gold="gold r*"):
    """over_optimisation.png, after Gao et al. 2023 (fig. 1): the mean gold (left) and the mean
    reward of the run's own reward model (right) of each online run's sampled answers, against
    √KL(π_t ‖ π_SFT); one line per run, each point labelled with its iteration t. A BT reward is
    defined only up to a shift, so the right panel shows the change since t = 0 (every reward
    model starts at 0)."""
    plt = matplotlib_pyplot() if curves else None
    if plt is None:
        return []
    # not the gold-reward run
    proxied = {s: points for s, points in curves.items() if all("reward" in p for p in points)}
    fig, axes = plt.subplots(1, 2 if proxied else 1, figsize=(11 if proxied else 6, 4.6),
                             squeeze=False, layout="constrained")
    gold_ax, proxy_ax = axes[0][0], axes[0][-1]
    labelled = {ax: set() for ax in axes[0]}  # (x, y, t) of the labels written
    for series, points in curves.items():
        # an estimate of a KL near 0 can come out just below 0
        root_kl = [math.sqrt(max(p["kl"], 0.0)) for p in points]
        golds = [p["gold"] for p in points]
        gold_ax.plot(root_kl, golds, "-", label=ONLINE_SERIES[series], **series_style(series))
        label_iterations(gold_ax, series, root_kl, golds, points, labelled[gold_ax])
        if series in proxied:
            rewards = [p["reward"] - points[0]["reward"] for p in points]
            proxy_ax.plot(root_kl, rewards, "--", **series_style(series))
            label_iterations(proxy_ax, series, root_kl, rewards, points, labelled[proxy_ax])
    gold_ax.set(title=f"{gold} (held-out prompts, sampled at T = 1)", ylabel=f"mean {gold}")
    if proxied:
        proxy_ax.set(title="proxy: the run's own reward model",
                     ylabel="mean reward − its value at t = 0")
    for ax in axes[0]:
        ax.set_xlabel("√KL(π_t ‖ π_SFT), KL in nats")
        ax.margins(x=0.12, y=0.1)  # room for the t labels inside the frame
        ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    fig.savefig(out / "over_optimisation.png", dpi=120)
    plt.close(fig)
    return [out / "over_optimisation.png"]


def plot(run, results, out, gold="gold r*"):
    """gold_per_iteration.png: the gold of greedy and of sampled answers per online iteration
    (± s.e.), the single checkpoints as horizontal lines, the legends below the panels; and
    training_curves.png (both skipped, with a note, without matplotlib)."""
    plt = matplotlib_pyplot()
    if plt is None:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.4), layout="constrained")
    sft = next((r for r in results if r["label"] == "SFT"), None)
    flat = [r for r in results
            if r["label"] in SINGLE_CHECKPOINTS.values() or r["label"].startswith("OSP")]
    for ax, key, title in ((axes[0], "gold", "greedy answers"),
                           (axes[1], "sampled_gold", "sampled at temperature 1")):
        for i, (series, label) in enumerate(ONLINE_SERIES.items()):
            points = sorted((r["t"], r) for r in results if r["series"] == series)
            if points and sft:
                points = [(0, sft)] + points
                # side by side, so that the error bars do not hide each other
                nudge = 0.04 * (i - (len(ONLINE_SERIES) - 1) / 2)
                ax.errorbar([t + nudge for t, _ in points], [r[key] for _, r in points],
                            yerr=[r[key + "_stderr"] for _, r in points],
                            capsize=3, label=label, **series_style(series))
        for i, r in enumerate(flat):  # single checkpoints: horizontal lines
            ax.axhline(r[key], linewidth=1.5, label=r["label"], **reference_style(i))
        ax.set_xticks(sorted({0} | {r["t"] for r in results if r["series"]}))
        ax.set(xlabel="online iteration t (0 = SFT)", ylabel=f"mean {gold}, held-out prompts",
               title=title)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    handles = dict(zip(labels, handles))
    online = [label for label in ONLINE_SERIES.values() if label in handles]
    for ax, title, labels in ((axes[0], "online runs (t = 0: SFT)", online),
                              (axes[1], "single checkpoints", [r["label"] for r in flat])):
        if labels:  # below the panel, clear of the data
            ax.legend([handles[label] for label in labels], labels, loc="upper center",
                      bbox_to_anchor=(0.5, -0.15), title=title,
                      fontsize=8, title_fontsize=8, handlelength=4)
    fig.savefig(out / "gold_per_iteration.png", dpi=120)
    plt.close(fig)
    return [out / "gold_per_iteration.png"] + plot_training_curves(plt, run, out)


def plot_training_curves(plt, run, out):
    """training_curves.png: the training loss per optimizer step of each run that logged one
    (metrics.jsonl); an online run's iterations share a panel, one line each."""
    panels = [("SFT (sft/)", "cross-entropy, nats per token", {"": run / "sft"})]
    panels += [(f"{label}\n({series}/iter*/policy)", "training loss, mean per pair",
                {f"t = {t}": p for t, p in sorted(iteration_policies(run / series).items())})
               for series, label in ONLINE_SERIES.items()]
    panels += [(f"OSP ({p.name}/)", "training loss, mean per pair", {"": p})
               for p in sorted(run.glob("osp_*"))]
    panels = [(title, ylabel, {name: p / "metrics.jsonl" for name, p in lines.items()
                               if (p / "metrics.jsonl").exists()})
              for title, ylabel, lines in panels]
    panels = [panel for panel in panels if panel[2]]
    if not panels:
        return []
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.remove()
    for ax, (title, ylabel, lines) in zip(axes.flat, panels):
        for name, path in lines.items():
            records = read_jsonl(path)
            ax.plot([r["step"] for r in records], [r["loss"] for r in records], linewidth=1,
                    label=name or None)
        ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.title.set_fontsize(9)
        if any(lines):  # an online run's iterations
            ax.legend(fontsize=7)
    fig.savefig(out / "training_curves.png", dpi=120)
    plt.close(fig)
    return [out / "training_curves.png"]


# ----------------------------------------------------------------------------------------------
# One run: answers, scores, results.md and results.json


def held_out_prompts(first, prompts, args):
    """The prompts every checkpoint answers: those over --max-prompt-length are skipped (counted),
    the same ones for every checkpoint, since a run's checkpoints share the first one's tokenizer
    and the table compares them on one set."""
    config = json.loads((first / "config.json").read_text())
    context = ModelConfig.from_dict(config).max_position_embeddings
    prompts, _ = encode_prompts(load_tokenizer(first), prompts, args.max_new_tokens, context,
                                args.prompts, args.max_prompt_length)
    return prompts


def score_checkpoints(found, greedy_answers, sampled_answers, gold):
    """Each checkpoint's summary (summarise), its paired difference from SFT's answers to the same
    prompts, and the accuracy of the reward it was trained with; printed one line each. Returns
    (results, per_prompt: folder → per_prompt_gold)."""
    results, baseline, per_prompt = [], None, {}
    for label, folder, series, step in found:
        greedy, sampled = greedy_answers(folder), sampled_answers(folder)
        summary = summarise(greedy, sampled)
        values = per_prompt[str(folder)] = per_prompt_gold(greedy, sampled)
        baseline = baseline or (values if label == "SFT" else None)
        if baseline and label != "SFT":  # paired with SFT's answers to the same prompts
            summary |= (paired_difference(values[0], baseline[0], "gold")
                        | paired_difference(values[1], baseline[1], "sampled_gold"))
        results.append(dict(label=label, folder=str(folder), series=series, t=step, **summary,
                            reward_accuracy=training_reward_accuracy(folder, series, step,
                                                                     gold)))
        print(f"{label:50s} greedy gold {summary['gold']:.4f} ± {summary['gold_stderr']:.4f}, "
              f"length {summary['length']:.1f} | sampled gold {summary['sampled_gold']:.4f} ± "
              f"{summary['sampled_gold_stderr']:.4f}, length {summary['sampled_length']:.1f}")
    return results, per_prompt


def sft_reward_checks(run, sampled_answers, scorer):
    """The reward models on the SFT model's own samples (on-policy: reward_vs_gold per model), and
    the SFT reference points. ({}, {}) without an SFT model."""
    if not has_model(run / "sft"):
        return {}, {}
    sft_samples = sampled_answers(run / "sft")
    scored = {name: scorer.rewards(run / name, run / "sft", sft_samples)
              for name in REWARD_MODELS if name != "judge" and has_model(run / name)}
    on_policy = {name: reward_vs_gold(records) for name, records in scored.items()}
    cooler = sampled_answers(run / "sft", COOLER_TEMPERATURE)
    return on_policy, reference_points(sft_samples, cooler, scored)


def signed(row, key):
    """A paired difference ± its standard error ("+0.012 ± 0.004"), "" where the row has none."""
    if "delta_" + key not in row:
        return ""
    return f"{row['delta_' + key]:+.3f} ± {row['delta_' + key + '_stderr']:.3f}"


def checkpoint_table(results, tasks, prompt_count, args):
    """results.md's opening note and its table of checkpoints."""
    gold, exact = (("gold score r* in [-1, 1]", "r* = 1") if args.gold == "gold" else
                   (f"gold = the verifier {args.gold}'s reward", "gold = 1"))
    lines = [f"Held-out prompts: {prompt_count} ({args.prompts}); {gold}, mean ± "
             "standard error over prompts; greedy answers, and "
             f"{args.samples} answers per prompt sampled at temperature 1; Δ SFT = the paired "
             "difference from the SFT model on the same prompts ± its standard error; exact = "
             f"fraction of greedy answers with {exact}; per-sub-task columns are greedy gold. "
             + REWARD_ACCURACY_NOTE, "",
             "| checkpoint | gold (greedy) | Δ SFT | exact | length | gold (T = 1) | Δ SFT | "
             "length (T = 1) | reward acc. | " + " | ".join(tasks) + " |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | "
             + " | ".join("---" for _ in tasks) + " |"]
    for r in results:
        accuracy = fraction(r["reward_accuracy"]) if r["reward_accuracy"] is not None else "—"
        lines.append(f"| {r['label']} | {r['gold']:.3f} ± {r['gold_stderr']:.3f} | "
                     f"{signed(r, 'gold')} | {r['exact']:.3f} | {r['length']:.1f} | "
                     f"{r['sampled_gold']:.3f} ± {r['sampled_gold_stderr']:.3f} | "
                     f"{signed(r, 'sampled_gold')} | {r['sampled_length']:.1f} | {accuracy} | "
                     + " | ".join(f"{r['by_task'].get(t, float('nan')):.3f}" for t in tasks)
                     + " |")
    return lines


def reward_model_table(rms, tasks):
    """results.md's reward models: held-out and on-policy accuracy, held-out per sub-task."""
    lines = ["", "Reward models. Held-out: accuracy on labelled pairs like those it was trained "
                 "on. On-policy: on every pair of the SFT model's sampled answers whose gold "
                 f"differs by more than {GOLD_GAP}, how often it orders them as gold does (0.5 = "
                 "chance).", "",
             "| reward model | held-out accuracy | on-policy accuracy (pairs) | "
             + " | ".join(tasks) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in tasks) + " |"]
    for label, e, policy in rms:
        on_policy = f"{fraction(policy['accuracy'])} ({policy['pairs']})" if policy else "n/a"
        lines.append(f"| {label} | {e['accuracy']:.3f} | " + on_policy + " | "
                     + " | ".join(f"{e['accuracy_by_source'].get(t, float('nan')):.3f}"
                                  for t in tasks) + " |")
    return lines


def curve_table(curves):
    """results.md's over-optimisation table: per online run and iteration, KL, reward and gold."""
    lines = ["", "Over-optimisation (proxy vs gold): per online run and iteration t, its reward "
                 "model's mean reward of the policy's sampled answers to the held-out prompts, "
                 "their mean gold, and KL(π_t ‖ π_SFT) in nats.",
             KL_NOTE, "", CURVE_HEADER, "| --- | --- | --- | --- | --- |"]
    for series, points in curves.items():
        lines += [f"| {ONLINE_SERIES[series]} | {p['t']} | {p['kl']:.2f} | "
                  + (f"{p['reward']:.3f}" if "reward" in p else "—") + f" | {p['gold']:.3f} |"
                  for p in points]
    return lines


def results_markdown(results, prompt_count, args, versus, references, rms, correlations, judge,
                     curves):
    """results.md's lines (without the plots): the tables in the order a reader compares them."""
    tasks = sorted({t for r in results for t in r["by_task"]})
    lines = checkpoint_table(results, tasks, prompt_count, args)
    if versus:
        lines += ["", VERSUS_HEADER, "| --- | --- | --- |"]
        lines += [f"| {v['label']} | {signed(v, 'gold')} | {signed(v, 'sampled_gold')} |"
                  for v in versus]
    if references:
        lines += ["", "| reference point (the SFT model, no training) | gold |", "| --- | --- |"]
        lines += [f"| {label} | {mean:.3f} ± {stderr:.3f} |"
                  for label, (mean, stderr) in references.items()]
    if rms:
        lines += reward_model_table(rms, tasks)
    for series, (mean, used, _) in correlations.items():
        lines += ["", "Reward–length correlation of the reward model of "
                      f"\"{ONLINE_SERIES[series]}\" (mean per-prompt Pearson over the SFT model's "
                      f"samples, {used} prompts): {mean:.3f}"]
    if judge:
        lines += ["", f"OSP judge on {judge['pairs']} pairs of the SFT model's sampled answers: "
                      f"prefers the longer answer {fraction(judge['prefers_longer'])} of the time"]
    if curves:
        lines += curve_table(curves)
    return lines


def answer_sets(run, prompts, args, device):
    """(the run's checkpoints, the prompts they answer (held_out_prompts), greedy_answers(folder),
    sampled_answers(folder, temperature)): the answers every table is made of, cached in each
    checkpoint's folder (`answers`)."""
    found = checkpoints(run)
    if not found:
        raise InputError(f"{run}: no checkpoints (sft/, dpo_offline/, online*/iter*/policy/, "
                         "osp_*/ with a model.safetensors)")
    prompts = held_out_prompts(found[0][1], prompts, args)
    gold = (load_reward_function(args.gold), args.gold)

    def greedy_answers(folder):
        return answers(folder, prompts, device, args.max_new_tokens, args.batch_size, 1, 0.0,
                       gold)

    def sampled_answers(folder, temperature=1.0):
        return answers(folder, prompts, device, args.max_new_tokens, args.batch_size,
                       args.samples, temperature, gold)

    return found, prompts, greedy_answers, sampled_answers


def prepare_answers(run, names, prompts, args, device):
    """--prepare: the answers of the checkpoints under the run's folders `names`, and the SFT
    model's at the cooler temperature too, cached for the evaluation; nothing else."""
    found, _, greedy_answers, sampled_answers = answer_sets(run, prompts, args, device)
    for label, folder, _, _ in found:
        if folder.relative_to(run).parts[0] in names:
            greedy_answers(folder), sampled_answers(folder)
            if label == "SFT":
                sampled_answers(folder, COOLER_TEMPERATURE)
            print(f"answers of {label} ready ({folder})")


def evaluate_run(run, prompts, args, device):
    """Evaluate every checkpoint of one run; write results.md, results.json and the plots."""
    found, prompts, greedy_answers, sampled_answers = answer_sets(run, prompts, args, device)
    results, per_prompt = score_checkpoints(found, greedy_answers, sampled_answers, args.gold)
    versus = versus_offline(results, per_prompt)
    scorer = Scorer(device)
    on_policy, references = sft_reward_checks(run, sampled_answers, scorer)
    judge = judge_on_sft_samples(run, device)
    if judge:
        on_policy["judge"] = dict(accuracy=judge["gold_agreement"],
                                  pairs=judge["gold_agreement_pairs"])
    rms = reward_model_rows(run, on_policy)
    correlations = length_correlations(run)
    curves = proxy_vs_gold(run, sampled_answers, scorer)

    lines = results_markdown(results, len(prompts), args, versus, references, rms, correlations,
                             judge, curves)
    plots = (plot(run, results, run, gold_name(args.gold))
             + plot_proxy_vs_gold(curves, run, gold_name(args.gold)))
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    atomic_write_text(run / "results.md", "\n".join(lines) + "\n")
    evaluation = dict(checkpoints=results, versus_offline=versus,
                      reward_models={label: dict(held_out=e, on_policy=policy)
                                     for label, e, policy in rms},
                      references={label: dict(mean=m, stderr=se)
                                  for label, (m, se) in references.items()},
                      length_correlations=correlations, judge=judge, proxy_vs_gold=curves)
    atomic_write_text(run / "results.json", json.dumps(evaluation, indent=2) + "\n")
    print("\n".join(lines))
    print(f"wrote {run / 'results.md'}")
    return evaluation


# ----------------------------------------------------------------------------------------------
# Several runs (seeds): mean ± standard deviation


def cell(values, digits=3):
    """Mean ± standard deviation over runs, "n/a" where a run has no value."""
    if not values or None in values:
        return "n/a"
    mean, std = mean_and_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def delta_over_runs(rows, key):
    """The mean over runs of a paired difference ± the combined paired standard error
    √(Σ s.e.²) / runs, and how many runs show a difference beyond 2 of their s.e. in the mean's
    direction; "" unless every run has it."""
    if not all("delta_" + key in r for r in rows):
        return ""
    deltas = [r["delta_" + key] for r in rows]
    errors = [r["delta_" + key + "_stderr"] for r in rows]
    sign = 1 if sum(deltas) >= 0 else -1
    # beyond 2 s.e. in the mean's direction
    significant = sum(sign * d > 2 * e for d, e in zip(deltas, errors))
    combined = math.sqrt(sum(e * e for e in errors)) / len(rows)
    return f"{sum(deltas) / len(rows):+.3f} ± {combined:.3f} ({significant}/{len(rows)})"


def in_every_run(evaluations, key):
    """The entries of evaluations[0][key] that every run has, in its order."""
    return [name for name in evaluations[0][key] if all(name in e[key] for e in evaluations)]


def checkpoints_over_runs(evaluations):
    """The table of checkpoints, each row over the runs that all have it."""
    lines = []
    for label in [r["label"] for r in evaluations[0]["checkpoints"]]:
        rows = [next((r for r in e["checkpoints"] if r["label"] == label), None)
                for e in evaluations]
        if None not in rows:
            accuracy = ("—" if all(r.get("reward_accuracy") is None for r in rows)
                        else cell([r.get("reward_accuracy") for r in rows]))
            lines.append(f"| {label} | {cell([r['gold'] for r in rows])} | "
                         f"{delta_over_runs(rows, 'gold')} | "
                         f"{cell([r['sampled_gold'] for r in rows])} | "
                         f"{delta_over_runs(rows, 'sampled_gold')} | "
                         f"{cell([r['sampled_length'] for r in rows], 1)} | "
                         + accuracy + " |")
    return lines


def curves_over_runs(evaluations, curves):
    """The over-optimisation table's rows, each point over the runs that all have it."""
    lines = []
    for series in curves:
        for i, point in enumerate(evaluations[0]["proxy_vs_gold"][series]):
            points = [e["proxy_vs_gold"][series][i] for e in evaluations
                      if len(e["proxy_vs_gold"][series]) > i]
            if len(points) == len(evaluations):
                reward = (cell([p["reward"] for p in points])
                          if all("reward" in p for p in points) else "—")
                lines.append(f"| {ONLINE_SERIES[series]} | {point['t']} | "
                             f"{cell([p['kl'] for p in points], 2)} | "
                             + reward + f" | {cell([p['gold'] for p in points])} |")
    return lines


def across_runs(evaluations, runs):
    """Mean ± standard deviation over runs (seeds) of each checkpoint's numbers, as Markdown. The
    Δ SFT columns: the mean over runs of the paired difference from SFT ± the combined paired
    standard error √(Σ s.e.²) / runs, and how many runs show a difference of more than two of
    their s.e. in the mean's direction (delta_over_runs)."""
    names = ", ".join(str(r) for r in runs)
    lines = [f"Mean ± standard deviation over {len(runs)} runs ({names}). Δ SFT: mean paired "
             "difference from SFT ± its combined standard error (runs whose Δ exceeds 2 of their "
             "s.e. in the mean's direction).", "",
             REWARD_ACCURACY_NOTE, "",
             "| checkpoint | gold (greedy) | Δ SFT | gold (T = 1) | Δ SFT | length (T = 1) | "
             "reward acc. |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += checkpoints_over_runs(evaluations)
    versus = [v["label"] for v in evaluations[0].get("versus_offline", [])]
    versus = [[next((v for v in e.get("versus_offline", []) if v["label"] == label), None)
               for e in evaluations] for label in versus]
    versus = [rows for rows in versus if None not in rows]
    if versus:
        lines += ["", VERSUS_HEADER, "| --- | --- | --- |"]
        lines += [f"| {rows[0]['label']} | {delta_over_runs(rows, 'gold')} | "
                  f"{delta_over_runs(rows, 'sampled_gold')} |" for rows in versus]
    references = in_every_run(evaluations, "references")
    if references:
        lines += ["", "| reference point (the SFT model, no training) | gold |", "| --- | --- |"]
        lines += [f"| {label} | {cell([e['references'][label]['mean'] for e in evaluations])} |"
                  for label in references]
    models = in_every_run(evaluations, "reward_models")
    if models:
        lines += ["", "| reward model | held-out accuracy | on-policy accuracy (pairs of SFT "
                      "samples) |", "| --- | --- | --- |"]
        for m in models:
            policy = [(e["reward_models"][m]["on_policy"] or {}).get("accuracy")
                      for e in evaluations]
            held_out = cell([e['reward_models'][m]['held_out']['accuracy'] for e in evaluations])
            lines.append(f"| {m} | {held_out} | {cell(policy)} |")
    for series in in_every_run(evaluations, "length_correlations"):
        lines += ["", f"Reward–length correlation of the reward model of "
                      f"\"{ONLINE_SERIES[series]}\": "
                      f"{cell([e['length_correlations'][series][0] for e in evaluations])}"]
    if all(e["judge"] for e in evaluations):
        lines += ["", "OSP judge on pairs of the SFT model's sampled answers: prefers the longer "
                      f"{cell([e['judge']['prefers_longer'] for e in evaluations])}"]
    curves = in_every_run(evaluations, "proxy_vs_gold")
    if curves:
        lines += ["", KL_NOTE, "", CURVE_HEADER, "| --- | --- | --- | --- | --- |"]
        lines += curves_over_runs(evaluations, curves)
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--run", required=True, nargs="+",
                        help="run folder(s) (sft/, online/, osp_*/ ...); several: seeds")
    parser.add_argument("--summary",
                        help="with several --run: write the mean ± std over them to this Markdown "
                             "file")
    parser.add_argument("--prompts",
                        default=str(Path(__file__).resolve().parent / "data" / "builtin"
                                    / "prompts_eval.jsonl"),
                        help="held-out prompts of the built-in task")
    parser.add_argument("--max-new-tokens", type=positive_int, default=96, help="answer length cap")
    parser.add_argument("--samples", type=positive_int, default=4,
                        help="answers per prompt sampled at temperature 1")
    parser.add_argument("--batch-size", type=non_negative_int, default=0,
                        help="decode slots; 0: as many as fit in free GPU memory (256 on a CPU)")
    parser.add_argument("--max-prompt-length", type=positive_int, default=None,
                        help="skip (and count) prompts longer than this many tokens; default: only "
                             "the context limits them")
    parser.add_argument("--gold", default="gold", metavar="VERIFIER", type=verifier_flag,
                        help="what grades the answers: a verifier, FILE.py:function or "
                             "package.module:function in TRL's reward-function convention "
                             "(rewards.py); default: the built-in task's gold reward")
    parser.add_argument("--prepare", nargs="+", metavar="NAME",
                        help="only answer (and cache) with the checkpoints under these folders of "
                             "the run (sft, online_gold, ...): an evaluation later uses them")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.prepare and (len(args.run) > 1 or args.summary):
        parser.error("--prepare takes one --run and no --summary")
    for name in args.prepare or ():
        if not (Path(args.run[0]) / name).is_dir():
            parser.error(f"argument --prepare: no folder {name} in the run {args.run[0]}")
    if args.batch_size and args.samples > args.batch_size:
        parser.error(f"--samples {args.samples} per prompt need --batch-size {args.samples} or "
                     f"more (it is {args.batch_size})")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prompts = load_records(args.prompts, "prompts")
    runs = [Path(r) for r in args.run]
    if args.prepare:
        return prepare_answers(runs[0], set(args.prepare), prompts, args, device)
    evaluations = [evaluate_run(run, prompts, args, device) for run in runs]
    if args.summary:
        text = across_runs(evaluations, runs)
        atomic_write_text(args.summary, text)
        print(text + f"wrote {args.summary}")


if __name__ == "__main__":
    run_cli(main)
