"""A task for a small pretrained chat model (SmolLM2-135M-Instruct, data/smollm2.py): arithmetic and
list questions in plain English whose answer is one whole number, checked by a verifier. The
built-in task (data/task.py) is for a model trained from scratch; this one is for a model that
already reads English and partly solves it, so the online loop has right and wrong samples to learn
from. Generated locally, no hub.

    python -m data.arith --out data/arith              # prompts_{iter1,iter2,iter3,dev,eval}.jsonl,
                                                       # pairs_{train,eval}.jsonl, stats.json
    python dpo.py ... --rm data/arith.py:correct       # the verifier, in TRL's convention

A prompt record carries its answer and sub-task as columns, which the verifier reads (TRL passes a
dataset's other columns to its reward functions the same way; rewards.verifier_rewards):
    {"id": "iter1-00000", "messages": [{"role": "user", "content": "What is 7 + 5? ..."}],
     "answer": 12, "task": "sum"}

THE SUB-TASKS (the `task` column), each asked in one of a few phrasings, each ending in
"Answer with the number only.":
    sum       two one-digit numbers added             "What is 7 + 5?"
    times     the times tables, 2-12 × 2-12           "What is 7 times 8?"
    largest   the largest of three numbers 1-99       "Which is the largest: 12, 57, 33?"
    smallest  the smallest of three numbers 1-99      "Which is the smallest: 12, 57, 33?"
    first     the first of a list of four numbers     "What is the first number in this list: ...?"
    last      the last of a list of four numbers      "What is the last number in this list: ...?"
Chosen with SmolLM2-135M-Instruct (the Q4_1 GGUF, dequantized) on 16 prompts each, greedy / best
of 4 at T = 1: sum 0.62 / 0.38, times 0.56 / 0.44, largest 0.62 / 0.25, smallest 0.50 / 0.44,
first 0.81 / 0.50, last 0.81 / 0.50; left out because it scored (nearly) 0 both ways: two-digit
sums, differences, "what comes before / after", doubling, counting the words or numbers of a list.

THE VERIFIER `correct`: 1.0 when the last whole number in the reply is the answer, else 0.0 (a
reply "The answer is 12." is right; "12 + 1 = 13" is wrong). The last number, as in GSM8K-style
checkers, since a chat model often restates the question before answering.

THE OFF-POLICY PREFERENCE PAIRS (pairs_*.jsonl), for a Bradley-Terry reward model (paper 1's
setting: pairs not sampled from the policy): per prompt, a right answer against a wrong one (off
by 1-10), each written in one of the same few styles ("12", "The answer is 12.", "7 + 5 = 12"),
drawn independently of which side is right, so style says nothing about correctness. The chosen
side is the right one.
"""
import argparse
import json
import random
import re
from pathlib import Path

from runs import atomic_write_text, write_jsonl

TASKS = ("sum", "times", "largest", "smallest", "first", "last")
SUFFIX = " Answer with the number only."
PHRASINGS = {
    "sum": ("What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}."),
    "times": ("What is {a} times {b}?", "What is {a} x {b}?", "Multiply {a} by {b}."),
    "largest": ("Which is the largest: {items}?", "What is the largest number among {items}?"),
    "smallest": ("Which is the smallest: {items}?", "What is the smallest number among {items}?"),
    "first": ("What is the first number in this list: {items}?",),
    "last": ("What is the last number in this list: {items}?",),
}
LISTS = {"largest": (3, max), "smallest": (3, min), "first": (4, lambda xs: xs[0]),
         "last": (4, lambda xs: xs[-1])}
ANSWER_STYLES = ("{n}", "{n}.", "The answer is {n}.", "Answer: {n}", "{work} = {n}")
NUMBER = re.compile(r"-?[0-9]+")


def make_question(rng, task):
    """(question text, answer, the worked form "a + b" used by one answer style, or None)."""
    if task in LISTS:
        size, pick = LISTS[task]
        numbers = rng.sample(range(1, 100), size)
        text = rng.choice(PHRASINGS[task]).format(items=", ".join(map(str, numbers)))
        return text, pick(numbers), None
    if task == "times":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return rng.choice(PHRASINGS[task]).format(a=a, b=b), a * b, f"{a} x {b}"
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return rng.choice(PHRASINGS[task]).format(a=a, b=b), a + b, f"{a} + {b}"


def last_number(text):
    """The last whole number in a reply (a leading minus sign kept), or None."""
    found = NUMBER.findall(text)
    return int(found[-1]) if found else None


def correct(prompts, completions, answer, **columns):
    """The verifier, in TRL's reward-function convention (rewards.verifier_rewards): 1.0 when a
    completion's last whole number is its prompt's `answer` column, else 0.0. A completion is a
    one-message list [{"role": "assistant", "content": text}] (TRL's conversational format) or
    the text itself."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(last_number(text) == int(a)) for text, a in zip(texts, answer)]


def questions(rng, count):
    """`count` questions, the sub-tasks in turn (each equally often): (i, task, text with the
    suffix, answer, worked form or None)."""
    for i in range(count):
        task = TASKS[i % len(TASKS)]
        text, answer, work = make_question(rng, task)
        yield i, task, text + SUFFIX, answer, work


def prompt_records(rng, split, count):
    """`count` prompts of split `split`, the answer and sub-task as columns."""
    return [{"id": f"{split}-{i:05d}", "messages": [{"role": "user", "content": text}],
             "answer": answer, "task": task}
            for i, task, text, answer, _ in questions(rng, count)]


def wrong_answer(rng, answer):
    """A plausible wrong answer: off by 1-10 either way (never negative, never the answer)."""
    while True:
        wrong = answer + rng.choice((-1, 1)) * rng.randint(1, 10)
        if wrong >= 0 and wrong != answer:
            return wrong


def styled(rng, number, work):
    style = rng.choice(ANSWER_STYLES if work else ANSWER_STYLES[:-1])
    return style.format(n=number, work=work)


def preference_pairs(rng, split, count):
    """Off-policy pairs: a right answer (chosen) against a wrong one, styles drawn independently."""
    return [{"id": f"{split}-{i:05d}", "prompt": [{"role": "user", "content": text}],
             "chosen": styled(rng, answer, work),
             "rejected": styled(rng, wrong_answer(rng, answer), work), "source": task}
            for i, task, text, answer, work in questions(rng, count)]


def build(out, seed=0, prompts_per_iter=256, eval_prompts=240, pairs_train=4000, pairs_eval=500):
    """Write the task's files to `out`; returns the statistics written to stats.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    counts = {}
    for split, count in (("iter1", prompts_per_iter), ("iter2", prompts_per_iter),
                         ("iter3", prompts_per_iter), ("dev", eval_prompts),
                         ("eval", eval_prompts)):
        write_jsonl(out / f"prompts_{split}.jsonl", prompt_records(rng, split, count))
        counts[f"prompts_{split}"] = count
    for split, count in (("train", pairs_train), ("eval", pairs_eval)):
        pairs = preference_pairs(rng, f"pairs_{split}", count)
        write_jsonl(out / f"pairs_{split}.jsonl", pairs)
        counts[f"pairs_{split}"] = count
        # what a reward model could learn from length alone: how often the chosen side is longer
        counts[f"pairs_{split}_longer_is_chosen"] = (
            sum(len(p["chosen"]) > len(p["rejected"]) for p in pairs) / count)
    stats = {"seed": seed, "tasks": list(TASKS), **counts}
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--out", default="data/arith", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts-per-iter", type=int, default=256,
                        help="prompts in each of prompts_iter{1,2,3}.jsonl")
    parser.add_argument("--eval-prompts", type=int, default=240,
                        help="prompts in prompts_eval.jsonl and in prompts_dev.jsonl")
    parser.add_argument("--pairs-train", type=int, default=4000)
    parser.add_argument("--pairs-eval", type=int, default=500)
    args = parser.parse_args(argv)
    for flag in ("prompts_per_iter", "eval_prompts", "pairs_train", "pairs_eval"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    stats = build(args.out, args.seed, args.prompts_per_iter, args.eval_prompts,
                  args.pairs_train, args.pairs_eval)
    print(f"wrote {args.out}: 3 × {args.prompts_per_iter} + 2 × {args.eval_prompts} prompts, "
          f"{args.pairs_train} + {args.pairs_eval} pairs (the chosen side longer in "
          f"{stats['pairs_train_longer_is_chosen']:.3f} of the training pairs)")


if __name__ == "__main__":
    main()
