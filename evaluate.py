"""Evaluation on the built-in task: each checkpoint of a run answers the held-out prompts (greedily,
and n samples at temperature 1, the distribution the online loop trains on), the gold scorer
(data/task.py, r* = correctness − 0.002 · extra characters) grades the answers, and a Markdown
table + JSON + PNG plots summarise the run. run.sh calls it last.

    python evaluate.py --run runs/builtin --prompts data/builtin/prompts_eval.jsonl
    python evaluate.py --run runs/builtin-small-seed{0,1,2} --summary runs/builtin-small-seeds.md   # over seeds

Checkpoints are found by their place in the run folder (those missing are left out of the table):
  sft/                         the SFT model (π_0)
  dpo_offline/                 offline DPO on the labelled pairs
  online/iter{t}/policy/       iterative DPO after t online iterations (BT reward model)
  online_lp/iter{t}/policy/    the same with a length penalty in pair selection
  online_gold/iter{t}/policy/  the same with the gold reward in place of the reward model (oracle control)
  osp_*/                       online self-preferring runs (the folder name is the variant)
Per checkpoint: gold mean ± standard error over prompts, mean answer length in characters, gold per
sub-task. Reward models: held-out accuracy (eval.json written by train_rm.py), the BT model's
reward–length correlation on the first online iteration's samples (paper 1's length-bias statistic),
and the OSP judge's preference for length and agreement with gold on the SFT model's samples.
Answers are kept in each checkpoint's folder (eval_samples_T0.jsonl, eval_samples_T1.jsonl), so a rerun only evaluates
what is new.
"""
import argparse
import itertools
import json
import math
from pathlib import Path

import torch

from common import InputError, atomic_write_text, default_dtype, has_model, load_tokenizer, read_jsonl, run_cli, stop_token_ids, write_jsonl
from data.schema import load_records
from data.task import parse_prompt, prompt_text, score
from generate import Engine, encode_prompts, generate_records
from model import ModelConfig, Transformer


ONLINE_SERIES = {"online": "iterative DPO", "online_lp": "iterative DPO + length penalty",
                 "online_gold": "iterative DPO, gold reward (oracle)"}


def checkpoints(run):
    """(label, folder, series, t) of every checkpoint present in the run folder, in the table's order."""
    found = [("SFT", run / "sft", None, 0), ("offline DPO", run / "dpo_offline", None, None)]
    for name, label in ONLINE_SERIES.items():
        found += [(f"{label}, t = {t}", p, name, t) for t, p in sorted(iteration_policies(run / name).items())]
    found += [(f"OSP ({p.name.removeprefix('osp_').replace('_', ', ')})", p, None, None) for p in sorted(run.glob("osp_*"))]
    return [f for f in found if has_model(f[1])]


def iteration_policies(folder):
    return {int(p.parent.name.removeprefix("iter")): p for p in folder.glob("iter*/policy")}


def answers(folder, prompts, device, max_new_tokens, batch_size, n, temperature):
    """The checkpoint's answers (n per prompt) with gold scores, cached in eval_samples_T{temperature}.jsonl."""
    cached = folder / f"eval_samples_T{temperature:g}.jsonl"
    # Answers written before the model (a checkpoint trained again with --overwrite) are stale.
    if cached.exists() and cached.stat().st_mtime >= (folder / "model.safetensors").stat().st_mtime:
        records = read_jsonl(cached)
        if [(r["id"], len(r["responses"])) for r in records] == [(p["id"], n) for p in prompts]:
            return records
    tokenizer = load_tokenizer(folder)
    model = Transformer.from_pretrained(folder, device=device, dtype=default_dtype(device)).eval()
    engine = Engine(model, batch_size, stop_token_ids(tokenizer), cpu_slots=256)
    records = generate_records(engine, tokenizer, prompts, n, max_new_tokens, temperature, seed=0)
    for record in records:
        record["gold"] = [score(record["prompt"], r) for r in record["responses"]]
    write_jsonl(cached, records)
    return records


def mean_and_std(values):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def mean_and_stderr(values):
    mean, std = mean_and_std(values)
    return mean, std / math.sqrt(len(values))


def summarise(greedy, sampled):
    """Greedy: gold mean ± s.e. over prompts, exact-answer rate, length, per sub-task. Sampled
    (temperature 1, the distribution the online loop trains on): gold and length, per-prompt means."""
    gold = [r["gold"][0] for r in greedy]
    mean, stderr = mean_and_stderr(gold)
    by_task = {}
    for record, g in zip(greedy, gold):
        by_task.setdefault(parse_prompt(prompt_text(record["prompt"]))[0], []).append(g)
    sampled_mean, sampled_stderr = mean_and_stderr([sum(r["gold"]) / len(r["gold"]) for r in sampled])
    return dict(gold=mean, gold_stderr=stderr, length=sum(len(r["responses"][0]) for r in greedy) / len(greedy),
                exact=sum(g >= 1.0 for g in gold) / len(gold), by_task={k: sum(v) / len(v) for k, v in sorted(by_task.items())},
                sampled_gold=sampled_mean, sampled_gold_stderr=sampled_stderr,
                sampled_length=sum(len(y) for r in sampled for y in r["responses"]) / sum(len(r["responses"]) for r in sampled))


def reward_model_rows(run):
    rows = []
    for name, label in (("rm_bt", "Bradley-Terry"), ("judge", "pairwise (OSP judge)")):
        path = run / name / "eval.json"
        if path.exists():
            rows.append((label, json.loads(path.read_text())))
    return rows


def judge_on_sft_samples(run, device):
    """The OSP judge (run/judge) on every pair of the SFT model's sampled answers to the held-out
    prompts: how often it prefers the longer answer, and how often it sides with the gold reward
    where the two answers differ in correctness (|Δr*| > 0.1, more than a length difference)."""
    judge, samples = run / "judge", run / "sft" / "eval_samples_T1.jsonl"
    if not (has_model(judge) and samples.exists()):
        return None
    from train_rm import judge_template, pairwise_preference
    prompts, first, second, gold_difference = [], [], [], []
    for record in read_jsonl(samples):
        for i, j in itertools.combinations(range(len(record["responses"])), 2):
            prompts.append(record["prompt"])
            first.append(record["responses"][i])
            second.append(record["responses"][j])
            gold_difference.append(record["gold"][i] - record["gold"][j])
    model = Transformer.from_pretrained(judge, device=device, dtype=default_dtype(device)).eval()
    with torch.no_grad():
        p_first = pairwise_preference(model, load_tokenizer(judge), prompts, first, second, device, judge_template(judge)).tolist()
    return judge_statistics(first, second, gold_difference, p_first)


def judge_statistics(first, second, gold_difference, p_first):
    """From the judge's P(first ≻ second) of each pair: the fraction of pairs of unequal length where
    it prefers the longer answer, and of pairs whose gold scores differ by more than 0.1 where it
    prefers the higher-scoring one (None where there is no such pair)."""
    longer = [(len(a) > len(b)) == (p > 0.5) for a, b, p in zip(first, second, p_first) if len(a) != len(b)]
    agree = [(d > 0) == (p > 0.5) for d, p in zip(gold_difference, p_first) if abs(d) > 0.1]
    return dict(pairs=len(p_first), prefers_longer=sum(longer) / len(longer) if longer else None,
                gold_agreement=sum(agree) / len(agree) if agree else None, gold_agreement_pairs=len(agree))


def fraction(value):
    return "n/a" if value is None else f"{value:.3f}"


def length_correlation(run):
    """Paper 1's length-bias statistic for the BT model on iteration 1's samples (π_0 = SFT)."""
    rewards = run / "online" / "iter1" / "rewards.jsonl"
    if not rewards.exists():
        return None
    from train_rm import length_bias
    return length_bias(read_jsonl(rewards))


def plot(run, results, out):
    """gold_per_iteration.png and training_curves.png (skipped, with a note, without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sft = next((r for r in results if r["label"] == "SFT"), None)
    for ax, key, title in ((axes[0], "gold", "greedy answers"), (axes[1], "sampled_gold", "sampled at temperature 1")):
        for series, label in ONLINE_SERIES.items():
            points = sorted((r["t"], r) for r in results if r["series"] == series)
            if points and sft:
                points = [(0, sft)] + points
                ax.errorbar([t for t, _ in points], [r[key] for _, r in points], yerr=[r[key + "_stderr"] for _, r in points],
                            fmt="o-", capsize=3, label=label)
        flat = [r for r in results if r["label"] == "offline DPO" or r["label"].startswith("OSP")]
        for i, r in enumerate(flat):  # single checkpoints: horizontal lines
            ax.axhline(r[key], linestyle=":", linewidth=1.2, label=r["label"], color=f"C{len(ONLINE_SERIES) + i}")
        ax.set_xticks(sorted({0} | {r["t"] for r in results if r["series"]}))
        ax.set_xlabel("online iteration t (0 = SFT)")
        ax.set_ylabel("gold score, held-out prompts")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gold_per_iteration.png", dpi=120)
    written.append(out / "gold_per_iteration.png")
    plt.close(fig)

    curves = [(label, p / "metrics.jsonl") for label, p in [("SFT", run / "sft")] +
              [(f"DPO iter {t}", p) for t, p in sorted(iteration_policies(run / "online").items())] +
              [(p.name, p) for p in sorted(run.glob("osp_*"))] if (p / "metrics.jsonl").exists()]
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3), squeeze=False)
        for ax, (label, path) in zip(axes[0], curves):
            lines = read_jsonl(path)
            ax.plot([line["step"] for line in lines], [line["loss"] for line in lines], linewidth=1)
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("step")
        axes[0][0].set_ylabel("training loss")
        fig.tight_layout()
        fig.savefig(out / "training_curves.png", dpi=120)
        written.append(out / "training_curves.png")
        plt.close(fig)
    return written


def evaluate_run(run, prompts, args, device):
    """Evaluate every checkpoint of one run; write results.md, results.json and the plots into it."""
    found = checkpoints(run)
    if not found:
        raise InputError(f"{run}: no checkpoints (sft/, dpo_offline/, online*/iter*/policy/, osp_*/ with a model.safetensors)")
    # Prompts over --max-prompt-length are skipped (counted), the same ones for every checkpoint: the
    # run's checkpoints share the first one's tokenizer, and the table compares them on one set.
    first = found[0][1]
    context = ModelConfig.from_dict(json.loads((first / "config.json").read_text())).max_position_embeddings
    prompts, _ = encode_prompts(load_tokenizer(first), prompts, args.max_new_tokens, context, args.prompts, args.max_prompt_length)
    results = []
    for label, folder, series, step in found:
        summary = summarise(answers(folder, prompts, device, args.max_new_tokens, args.batch_size, 1, 0.0),
                            answers(folder, prompts, device, args.max_new_tokens, args.batch_size, args.samples, 1.0))
        results.append(dict(label=label, folder=str(folder), series=series, t=step, **summary))
        print(f"{label:45s} greedy gold {summary['gold']:.4f} ± {summary['gold_stderr']:.4f}, length {summary['length']:.1f} | "
              f"sampled gold {summary['sampled_gold']:.4f} ± {summary['sampled_gold_stderr']:.4f}, length {summary['sampled_length']:.1f}")
    rms = reward_model_rows(run)
    correlation = length_correlation(run)
    judge = judge_on_sft_samples(run, device)

    tasks = sorted({t for r in results for t in r["by_task"]})
    lines = [f"Held-out prompts: {len(prompts)} ({args.prompts}); gold score r* in [-1, 1], mean ± standard error over "
             f"prompts; greedy answers, and {args.samples} answers per prompt sampled at temperature 1; exact = fraction of "
             "greedy answers with r* = 1; per-sub-task columns are greedy gold.", "",
             "| checkpoint | gold (greedy) | exact | length | gold (T = 1) | length (T = 1) | " + " | ".join(tasks) + " |",
             "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in tasks) + " |"]
    for r in results:
        lines.append(f"| {r['label']} | {r['gold']:.3f} ± {r['gold_stderr']:.3f} | {r['exact']:.3f} | {r['length']:.1f} | "
                     f"{r['sampled_gold']:.3f} ± {r['sampled_gold_stderr']:.3f} | {r['sampled_length']:.1f} | "
                     + " | ".join(f"{r['by_task'].get(t, float('nan')):.3f}" for t in tasks) + " |")
    if rms:
        lines += ["", "| reward model | held-out accuracy | " + " | ".join(tasks) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in tasks) + " |"]
        for label, e in rms:
            lines.append(f"| {label} | {e['accuracy']:.3f} | " + " | ".join(f"{e['accuracy_by_source'].get(t, float('nan')):.3f}" for t in tasks) + " |")
    if correlation:
        mean, used, _ = correlation
        lines += ["", f"Reward–length correlation of the BT model (mean per-prompt Pearson over the SFT model's samples, "
                      f"{used} prompts): {mean:.3f}"]
    if judge:
        lines += ["", f"OSP judge on {judge['pairs']} pairs of the SFT model's sampled answers: prefers the longer answer "
                      f"{fraction(judge['prefers_longer'])} of the time; sides with gold on {fraction(judge['gold_agreement'])} of the "
                      f"{judge['gold_agreement_pairs']} pairs that differ in correctness (|Δr*| > 0.1)"]
    plots = plot(run, results, run)
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    atomic_write_text(run / "results.md", "\n".join(lines) + "\n")
    evaluation = dict(checkpoints=results, reward_models=dict(rms), length_correlation=correlation, judge=judge)
    atomic_write_text(run / "results.json", json.dumps(evaluation, indent=2) + "\n")
    print("\n".join(lines))
    print(f"wrote {run / 'results.md'}")
    return evaluation


def across_runs(evaluations, runs):
    """Mean ± standard deviation over runs (seeds) of each checkpoint's numbers, as Markdown."""
    def cell(values, digits=3):
        if None in values:
            return "n/a"
        mean, std = mean_and_std(values)
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    lines = [f"Mean ± standard deviation over {len(runs)} runs ({', '.join(str(r) for r in runs)}).", "",
             "| checkpoint | gold (greedy) | gold (T = 1) | length (T = 1) |", "| --- | --- | --- | --- |"]
    for label in [r["label"] for r in evaluations[0]["checkpoints"]]:
        rows = [next((r for r in e["checkpoints"] if r["label"] == label), None) for e in evaluations]
        if None not in rows:
            lines.append(f"| {label} | {cell([r['gold'] for r in rows])} | {cell([r['sampled_gold'] for r in rows])} | "
                         f"{cell([r['sampled_length'] for r in rows], 1)} |")
    models = [m for m in evaluations[0]["reward_models"] if all(m in e["reward_models"] for e in evaluations)]
    if models:
        lines += ["", "| reward model | held-out accuracy |", "| --- | --- |"]
        lines += [f"| {m} | {cell([e['reward_models'][m]['accuracy'] for e in evaluations])} |" for m in models]
    if all(e["length_correlation"] for e in evaluations):
        lines += ["", f"Reward–length correlation of the BT model: {cell([e['length_correlation'][0] for e in evaluations])}"]
    if all(e["judge"] for e in evaluations):
        lines += ["", f"OSP judge on pairs of the SFT model's sampled answers: prefers the longer "
                      f"{cell([e['judge']['prefers_longer'] for e in evaluations])}; sides with gold where correctness differs "
                      f"{cell([e['judge']['gold_agreement'] for e in evaluations])}"]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--run", required=True, nargs="+", help="run folder(s) (sft/, online/, osp_*/ ...); several: seeds")
    parser.add_argument("--summary", help="with several --run: write the mean ± std over them to this Markdown file")
    parser.add_argument("--prompts", default=str(Path(__file__).resolve().parent / "data" / "builtin" / "prompts_eval.jsonl"),
                        help="held-out prompts of the built-in task")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="answer length cap")
    parser.add_argument("--samples", type=int, default=4, help="answers per prompt sampled at temperature 1")
    parser.add_argument("--batch-size", type=int, default=0, help="decode slots; 0: as many as fit in free GPU memory (256 on a CPU)")
    parser.add_argument("--max-prompt-length", type=int, default=None,
                        help="skip (and count) prompts longer than this many tokens; default: only the context limits them")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prompts = load_records(args.prompts, "prompts")
    runs = [Path(r) for r in args.run]
    evaluations = [evaluate_run(run, prompts, args, device) for run in runs]
    if args.summary:
        text = across_runs(evaluations, runs)
        atomic_write_text(args.summary, text)
        print(text + f"wrote {args.summary}")


if __name__ == "__main__":
    run_cli(main)
