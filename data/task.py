"""The built-in task: number puzzles whose answers a program can score (a gold reward r*), so the
whole RLHF workflow — SFT, reward model, iterative DPO, OSP — runs and can be *measured* on a
laptop with no downloads.

    python -m data.task                  # from the repo root: data/builtin/ in ~15 s (seed 0)
    python -m data.task --seed 1 --out /tmp/builtin  # another draw, elsewhere
    python -m data.task score --samples runs/builtin/iter1/samples.jsonl --out scored.jsonl
    python -m data.task gold-sft --prompts data/builtin/prompts_iter1.jsonl \
        --out gold_sft.jsonl                         # exact answers

    from data.task import score                      # r*(x, a) of one response
    score([{"role": "user", "content": "sort 31 7 18"}], "7 18 31")                  # 1.0
    score([{"role": "user", "content": "sort 31 7 18"}], "Sure! 7 18 31")            # 0.988

THE TASK. A prompt is one user turn "<op> <numbers>"; four sub-tasks (the `source` categories):
    reverse 83 12 55 7   →  7 55 12 83   easy: copy backwards            (3-8 numbers, 0-99)
    sort 83 12 55 7      →  7 12 55 83   medium: ascending order         (3-8 numbers, 0-99)
    evens 83 12 55 7 40  →  12 40        medium: copy under a constraint (3-8 numbers, 0-99)
    add 385 97           →  482          hard: carries                   (operands of 1-3 digits)
Text is tokenized one character per token (see TOKENIZER), so a conversation is ~40 tokens (at
most ~110). The 0.8M-parameter Llama of model/config.json, trained from scratch by sft.py on 2 CPU
cores for ~4 minutes (1 epoch, 1401 steps of 16 packed 128-token blocks, lr 2e-3), reaches mean
gold 0.74 greedy on the held-out prompts (exact 54%; reverse 0.98, sort 0.92, evens 0.88, add 0.18)
and 0.63 when sampling at temperature 1 (best of 4 samples by gold: 0.79): clearly imperfect, with
room for alignment to help.

THE GOLD REWARD r*(x, a) = correctness − min(1, 0.002 · extra characters), a float in [−1, 1].
  - The numbers of a response are its maximal runs of ASCII digits, in order.
  - correctness ∈ [0, 1], partial credit. reverse / sort / evens: LCS(numbers, target) /
    max(#numbers, #target), so one wrong, missing, extra or misplaced element costs about 1/n.
    add: the first number's digits against the sum's, right-aligned, matches / max(#digits),
    divided by the count of numbers given (the answer is one number): 482 vs 472 → 2/3.
  - extra characters = len(response) − len(" ".join(numbers)): everything beyond the bare answer
    ("Sure! ", " Hope this helps!", commas, newlines). The gold user wants the answer only, so
    politeness and padding cost a little (a 20-character preamble: −0.04) and length is never
    rewarded by itself.
  - A prompt not of the forms above (or with more than 64 numbers, or one longer than 18 digits)
    and a non-string response score 0.0. Any string scores a finite float; `score` never raises.

THE SFT DEMONSTRATIONS (sft.jsonl, 60k) come from a noisy demonstrator:
  - one systematic error: 60% of its sums drop every carry (385 + 97 → 372), a habit the SFT model
    copies and a reward that sees correctness can train away (docs/diagnosis.md);
  - with probability 0.2 the answer is corrupted: one mistake, then another with probability 0.3
    (at most 3). List mistakes: replace an element by a random 0-99 number, swap two neighbours,
    drop an element, duplicate an element. Sum mistakes: change a digit, a carry slip (± 10^k),
    drop a digit. Every mistake changes the answer.
  - independently, with probability 0.3 the answer gets a preamble, a closing or both
    ("Sure! 7 12 55 83 Hope this helps!"): verbosity is unrelated to correctness here.
  Mean gold of the demonstrations 0.875 (51% exact); a perfect answer scores 1.0 (stats.json).

THE OFFLINE PREFERENCE DATA (pairs_train.jsonl 20k, pairs_eval.jsonl 2k) comes from three
synthetic behaviour policies, none of them the SFT model (as UltraFeedback pools other models):
    policy    P(mistake)  P(one more)  P(truncated)  P(verbose)
    careful      0.08        0.2          0.0        0.40 + g      g = --verbosity-gap, 0.35
    average      0.35        0.3          0.1        0.40
    hasty        0.60        0.5          0.4        0.40 − g
("truncated": the answer stops early, a prefix of the list or of the digits.) Each prompt is
answered by two different policies (in the SFT-LIKE PAIRS, pairs_sftlike_*.jsonl: twice by the
demonstrator, so the pairs resemble the SFT model's own samples) and a simulated human labels the
pair
    y ~ Bernoulli(σ((r*(a1) − r*(a2)) / τ)),   τ = 0.1
so a gold gap of 0.1 is judged the right way 73% of the time, a gap of 0.3 95%; overall the label
agrees with r* on ~84% of pairs (the accuracy ceiling of any reward model; stats.json). Pairs of
equal gold carry no signal and are not kept. `margin` = r*(chosen) − r*(rejected) (negative when
the human erred); `source` = the sub-task.

WHY THE REQUIREMENTS HOLD (measured with seed 0 and run.sh's sizes; docs/diagnosis.md has the
tables):
  - learnable but imperfect: see THE TASK above; the demonstrations are themselves 49% inexact.
  - something for a reward to fix: the dropped carries. With the gold reward the online loop raises
    `add` from 0.18 to 0.32 greedy in three iterations.
  - a Bradley-Terry RM (SFT backbone + scalar head on the last token, 8000 SFT-like pairs, 1 epoch)
    reaches 62% held-out accuracy (the labels' ceiling there is 77%) and orders the SFT model's
    own samples as gold does 62% of the time: weak but above chance, on-policy.
  - length bias: in the offline pairs the careful policy is both the most accurate and the most
    verbose and the hasty one truncates, so the longer response is chosen 65% of the time, while
    r* itself *penalises* every extra character. A BT model of those pairs (68% held-out) rewards
    length (reward-length correlation 0.30 over SFT samples), its best-of-4 pick is no better than
    a random one, and iterative DPO with it lengthens answers and lowers gold. In the SFT-like
    pairs the longer response is chosen 45% of the time. --verbosity-gap 0 removes the shortcut.

FILES written to --out (default data/builtin/, gitignored):
  model/            tokenizer.json, tokenizer_config.json (with the chat template), config.json for
                    a tiny LlamaForCausalLM, generation_config.json; no weights (sft.py --scratch)
  sft.jsonl         {"messages": [user, assistant]}
  prompts_iter1.jsonl, prompts_iter2.jsonl, prompts_iter3.jsonl (1024 each), prompts_eval.jsonl
                    (512, the held-out prompts of the results tables), prompts_dev.jsonl (512,
                    where settings are chosen): {"id", "messages": [user]}
  pairs_train.jsonl, pairs_eval.jsonl: the offline pairs
                    {"id", "prompt", "chosen", "rejected", "margin", "source"}
  pairs_sftlike_train.jsonl, pairs_sftlike_eval.jsonl (20k, 2k): the same, two demonstrator
                    answers per prompt
  pairs_offpolicy_train.jsonl, pairs_offpolicy_eval.jsonl (20k, 2k): the behaviour policies
                    again, with a milder length bias (--offpolicy-verbosity-gap 0.15: the longer
                    answer chosen in 59% of pairs, against 65%): paper 1's off-policy data for its
                    reward model and its offline DPO baseline
  pretrain.jsonl    {"text"}: 16k worksheets of correct computations, no chat template
                    ("sort 7 3 = 3 7\nreverse 7 3 = 3 7"), for a pretraining stage (sft.py trains
                    on every token of a text record; docs/diagnosis.md §6 measures what it teaches
                    the 0.8M model: too little within run.sh's budget, so run.sh does not use it)
  stats.json        sizes, gold of the demonstrations, label/r* agreement, length statistics
No prompt text occurs twice anywhere (SFT, pairs, iteration chunks, eval, the worksheets' lines);
every sub-task has the same share of every file. The same --seed gives the same bytes.

TOKENIZER: one token per character (a BPE without merges), 112 ids:
  0 <|pad|>   1 <|bos|>   2 <|end|> (end of turn = eos)   3 <|unk|>   4 <|system|>   5 <|user|>
  6 <|assistant|>, then "\\t", "\\n", the 95 printable ASCII characters (" " = 9, "0"-"9" = 25-34,
  "A" = 42, "B" = 43) and ‘ ’ “ ” – — … é; anything else → <|unk|>.
  Chat template: <|bos|>, then per message <|role|>content<|end|>; add_generation_prompt appends
  <|assistant|>. So "sort 3 1 2" → <|bos|><|user|>sort 3 1 2<|end|><|assistant|> and the model
  answers "1 2 3<|end|>". Decoding never edits spaces (clean_up_tokenization_spaces false).
"""
import argparse
import itertools
import json
import math
import random
import re
import sys
from pathlib import Path
from typing import NamedTuple

from losses import best_index
from runs import atomic_write_text, read_jsonl, write_jsonl

TASKS = ("reverse", "sort", "evens", "add")
TAU = 0.1                  # temperature of the simulated human labeller, σ(Δr*/τ)
EXTRA_CHAR_PENALTY = 0.002  # gold cost per character beyond the bare answer
MAX_SCORED_CHARS = 20000   # longer responses are cut here before parsing (the penalty is capped)

PREAMBLES = ("Sure! ", "Here you go: ", "The answer is ", "Okay, here it is: ", "Of course. ")
CLOSINGS = (" Hope this helps!", " Done.", " Let me know if you need more.", " That is my answer.")

# ----------------------------------------------------------------------------------------------
# Prompts and their exact answers

# bounded: int() and LCS stay cheap
PROMPT_PATTERN = re.compile(r"^(reverse|sort|evens|add)((?: [0-9]{1,18}){1,64})$")


def make_prompt(rng, task):
    if task == "add":
        digits = (rng.randint(1, 3), rng.randint(1, 3))  # drawn first, then the two operands
        a, b = (rng.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1) for d in digits)
        return f"add {a} {b}"
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 8))]
    if task == "evens" and all(n % 2 for n in numbers):
        numbers[rng.randrange(len(numbers))] -= 1  # at least one even number: never an empty answer
    return f"{task} " + " ".join(map(str, numbers))


def parse_prompt(text):
    """'sort 3 1 2' → ('sort', ['1', '2', '3']): the sub-task and its exact answer as number
    strings. None for anything else."""
    match = PROMPT_PATTERN.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        return None
    task, operands = match.group(1), [int(s) for s in match.group(2).split()]
    if task == "reverse":
        answer = operands[::-1]
    elif task == "sort":
        answer = sorted(operands)
    elif task == "evens":
        answer = [n for n in operands if n % 2 == 0]
    else:
        answer = [sum(operands)]
    return task, [str(n) for n in answer]


def prompt_text(prompt):
    """The last user turn of a prompt given as messages (or a bare string), else None."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, (list, tuple)):
        return None
    for message in reversed(prompt):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else None
    return None


# ----------------------------------------------------------------------------------------------
# The gold reward r*(x, a)


def longest_common_subsequence(a, b):
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def digit_agreement(predicted, target):
    """Right-aligned digit matches / the longer length: '4482' vs '4472' → 0.75."""
    matches = sum(p == t for p, t in zip(reversed(predicted), reversed(target)))
    return matches / max(len(predicted), len(target))


def correctness(task, target, numbers):
    """Partial credit in [0, 1] for the numbers a response gives (see the module docstring)."""
    if not numbers:
        return 0.0
    if task == "add":
        return digit_agreement(numbers[0], target[0]) / len(numbers)
    return longest_common_subsequence(numbers, target) / max(len(numbers), len(target))


def score(prompt_messages, response_text):
    """Gold reward of one response: correctness − min(1, 0.002 · extra characters), in [−1, 1].
    Never raises: an unknown prompt or a non-string response gives 0.0."""
    parsed = parse_prompt(prompt_text(prompt_messages))
    if parsed is None or not isinstance(response_text, str):
        return 0.0
    task, target = parsed
    text = response_text[:MAX_SCORED_CHARS]
    numbers = re.findall(r"[0-9]+", text)  # ASCII digits only (\d would take any script's)
    extra_characters = len(response_text) - len(" ".join(numbers))
    penalty = min(1.0, EXTRA_CHAR_PENALTY * extra_characters)
    return float(correctness(task, target, numbers) - penalty)


def gold_reward(prompts, completions, **columns):
    """The gold reward r* (`score`) as a verifier in TRL's reward-function convention (dpo.py's
    `--rm gold`, rewards.verifier_rewards): a batch of prompts (message lists) and completions
    ([{"role": "assistant", "content": text}], or the text itself) → one float each."""
    return [score(prompt, completion if isinstance(completion, str) else completion[0]["content"])
            for prompt, completion in zip(prompts, completions)]


def gold_scored(records):
    """Samples records ({prompt, responses, ...}) with `gold` added, or None unless every prompt is
    a built-in task prompt (so a stage run on other data reports nothing rather than zeros)."""
    if not all(parse_prompt(prompt_text(r["prompt"])) for r in records):
        return None
    return [{**r, "gold": [score(r["prompt"], y) for y in r["responses"]]} for r in records]


def picked_gold(record):
    """The gold of the response a record's `rewards` pick as best of its n (the first of equals)."""
    rewards = record["rewards"]
    return record["gold"][best_index(rewards)]


# ----------------------------------------------------------------------------------------------
# Agreement with gold: how well a learned reward (or a judge) orders answers as r* does

GOLD_GAP = 0.1  # two answers "differ in correctness" when their gold differs by more than this


def gold_agreement(gold_differences, reward_differences):
    """The fraction of pairs of answers a reward orders as the gold reward does, and how many pairs
    it is measured on: (fraction or None without a pair, pairs). Only pairs whose gold differs by
    more than GOLD_GAP count (answers that differ in correctness, not in a few characters). A pair
    counts 1 when its reward difference has the gold difference's sign, 0 when the opposite, ½
    when the reward ties (0.5 = chance).
    gold_differences, reward_differences: per pair, r*(a) − r*(b) and reward(a) − reward(b).
    Who uses it, and why osp.py's --gold metrics keep their own rule: docs/tools.md."""
    agree = []
    for gold, reward in zip(gold_differences, reward_differences):
        if abs(gold) > GOLD_GAP:
            product = reward * gold
            agree.append(1.0 if product > 0 else 0.5 if product == 0 else 0.0)
    return (sum(agree) / len(agree) if agree else None), len(agree)


def reward_vs_gold(records):
    """How well a reward (records' `rewards`, one per response) ranks a prompt's responses compared
    with the gold reward (`gold`): gold_agreement over every pair of responses to a prompt; and the
    gold of the reward's best-of-n pick against the mean gold (a random pick) and gold's own
    best-of-n."""
    gold_differences, reward_differences = [], []
    for record in records:
        rewards, gold = record["rewards"], record["gold"]
        for i, j in itertools.combinations(range(len(gold)), 2):
            gold_differences.append(gold[i] - gold[j])
            reward_differences.append(rewards[i] - rewards[j])
    accuracy, pairs = gold_agreement(gold_differences, reward_differences)
    picked = [picked_gold(record) for record in records]
    mean = [sum(record["gold"]) / len(record["gold"]) for record in records]
    best = [max(record["gold"]) for record in records]
    average = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return dict(pairs=pairs, accuracy=accuracy, best_of_n_gold=average(picked),
                mean_gold=average(mean), gold_best_of_n=average(best))


def format_reward_vs_gold(stats, samples):
    """One line of reward_vs_gold's numbers."""
    if stats["accuracy"] is None:
        return f"reward vs gold on {samples}: no pair differs in correctness"
    return (f"reward vs gold on {samples}: orders {stats['accuracy']:.3f} of the {stats['pairs']} "
            f"pairs that differ in correctness (|Δr*| > {GOLD_GAP}) as gold does (0.5 = chance); "
            f"its best-of-n pick scores gold {stats['best_of_n_gold']:.3f} (a random pick "
            f"{stats['mean_gold']:.3f}, gold's own best {stats['gold_best_of_n']:.3f})")


# ----------------------------------------------------------------------------------------------
# Synthetic answerers: the noisy demonstrator (SFT data) and the behaviour policies (pairs)

class Policy(NamedTuple):
    """A synthetic answerer: how often it errs, cuts the answer short, and talks."""
    name: str
    p_error: float      # P(the answer gets a corruption)
    p_more: float       # P(one more corruption), applied up to twice
    p_truncate: float   # P(the answer stops early: a prefix of the list / of the digits)
    p_verbose: float    # P(a polite preamble and/or closing around the answer)
    # P(an `add` answer sums digit by digit and drops every carry: 385 + 97 → 372)
    p_no_carry: float = 0.0


# The demonstrator's one systematic, learnable error: it drops the carries in 60% of its sums. The
# SFT model copies the habit, so its samples differ in a way a reward (gold, or learned) can point
# at, and the online loop has something to fix beyond sharpening the distribution
# (docs/diagnosis.md).
DEMONSTRATOR = Policy("demonstrator", p_error=0.20, p_more=0.3, p_truncate=0.0, p_verbose=0.30,
                      p_no_carry=0.6)
# how much more often the careful policy talks than the average one (and the hasty one less)
VERBOSITY_GAP = 0.35
# the same in pairs_offpolicy_*: a milder length bias, paper 1's off-policy baseline data
OFFPOLICY_VERBOSITY_GAP = 0.15


def behaviour_policies(verbosity_gap=VERBOSITY_GAP):
    """The offline data's answerers. verbosity_gap sets how strongly verbosity goes with quality
    in the preference data (0: not at all, apart from truncation): the source of the RM's length
    bias."""
    return (
        Policy("careful", p_error=0.08, p_more=0.2, p_truncate=0.0,
               p_verbose=min(1.0, 0.40 + verbosity_gap)),
        Policy("average", p_error=0.35, p_more=0.3, p_truncate=0.1, p_verbose=0.40),
        Policy("hasty", p_error=0.60, p_more=0.5, p_truncate=0.4,
               p_verbose=max(0.0, 0.40 - verbosity_gap)),
    )


def corrupt_sum(rng, answer):
    """One mistake in a sum's digits: a changed digit, a carry slip (off by 10^k) or a dropped
    digit. May leave the answer unchanged (corrupt_once draws again)."""
    digits = list(answer[0])
    kind = rng.choice(("digit", "carry", "drop") if len(digits) > 1 else ("digit", "carry"))
    if kind == "digit":
        i = rng.randrange(len(digits))
        digits[i] = str(rng.randint(1 if i == 0 and len(digits) > 1 else 0, 9))
        new = "".join(digits)
    elif kind == "carry":  # a carry slip: off by 10^k
        slip = rng.choice((-1, 1)) * 10 ** rng.randrange(1, len(digits) + 1)
        new = str(max(0, int(answer[0]) + slip))
    else:
        del digits[rng.randrange(len(digits))]
        new = str(int("".join(digits)))
    return [new]


def corrupt_list(rng, answer):
    """One mistake in a list answer: a replaced, swapped, dropped or duplicated element. May leave
    the answer unchanged (corrupt_once draws again)."""
    candidate = list(answer)
    kind = rng.choice(("replace", "swap", "drop", "duplicate") if len(answer) > 1
                      else ("replace", "duplicate"))
    i = rng.randrange(len(candidate))
    if kind == "replace":
        candidate[i] = str(rng.randint(0, 99))
    elif kind == "swap":
        i = rng.randrange(len(candidate) - 1)
        candidate[i], candidate[i + 1] = candidate[i + 1], candidate[i]
    elif kind == "drop":
        del candidate[i]
    else:
        candidate.insert(i, candidate[i])
    return candidate


def corrupt_once(rng, task, answer):
    """One mistake, guaranteed to change the answer (a list of number strings)."""
    while True:
        candidate = corrupt_sum(rng, answer) if task == "add" else corrupt_list(rng, answer)
        if candidate != answer:
            return candidate


def sum_without_carries(operands):
    """Digit-wise sum, each column mod 10: the carry-dropping error (385 + 97 → 372)."""
    width = max(len(str(n)) for n in operands)
    columns = [sum(n // 10 ** k % 10 for n in operands) % 10 for k in range(width)]
    return str(int("".join(map(str, reversed(columns)))))


def worksheet(rng, prompt, seen):
    """A pretraining text: the prompt's exact computation, then the other computations on the same
    numbers (the list's other operations in a random order, or the sum with its operands swapped),
    one per line: "sort 7 3 = 3 7\nreverse 7 3 = 3 7". Copies of the numbers are predictable, so
    most of the text's loss is on what a model must learn (copying, ordering, carrying); a text of
    one computation alone is mostly unpredictable numbers (measured: two epochs of those did not
    teach the 0.8M model the task, docs/diagnosis.md). Lines whose prompt was drawn elsewhere are
    left out (and the rest are marked `seen`), so no prompt text occurs in two files."""
    task, operands = prompt.split(" ", 1)
    if task == "add":
        others = [f"add {' '.join(operands.split()[::-1])}"]
    else:
        others = [f"{op} {operands}"
                  for op in rng.sample([t for t in TASKS if t not in ("add", task)], 2)]
    lines = [prompt]
    for other in others:
        # evens of all-odd numbers: no answer
        if other not in seen and other != prompt and parse_prompt(other)[1]:
            seen.add(other)
            lines.append(other)
    return "\n".join(f"{p} = {' '.join(parse_prompt(p)[1])}" for p in lines)


def answer_as(rng, policy, prompt):
    """A response to `prompt` (text) by a synthetic policy: dropped carries, truncation,
    corruptions, politeness."""
    task, answer = parse_prompt(prompt)
    if task == "add" and policy.p_no_carry and rng.random() < policy.p_no_carry:
        # equals the sum when nothing carries
        answer = [sum_without_carries([int(s) for s in prompt.split()[1:]])]
    pieces = list(answer[0]) if task == "add" else answer  # digits of the sum, or list elements
    if len(pieces) > 1 and rng.random() < policy.p_truncate:
        pieces = pieces[:rng.randrange(1, len(pieces))]
        answer = ["".join(pieces)] if task == "add" else pieces
    if rng.random() < policy.p_error:
        answer = corrupt_once(rng, task, answer)
        for _ in range(2):
            if rng.random() >= policy.p_more:
                break
            answer = corrupt_once(rng, task, answer)
    body = " ".join(answer)
    if rng.random() >= policy.p_verbose:
        return body
    style = rng.randrange(3)  # 0: preamble, 1: closing, 2: both
    return ((rng.choice(PREAMBLES) if style != 1 else "") + body
            + (rng.choice(CLOSINGS) if style != 0 else ""))


def human_label(rng, pair_id, prompt, a1, a2, r1, r2, tau=TAU):
    """The simulated human's preference between two answers of gold r1 ≠ r2: a1 wins with
    probability σ((r1 − r2) / τ). Returns a pairs record."""
    first_wins = rng.random() < sigmoid((r1 - r2) / tau)
    chosen, rejected, margin = (a1, a2, r1 - r2) if first_wins else (a2, a1, r2 - r1)
    return {"id": pair_id, "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "margin": round(margin, 6), "source": parse_prompt(prompt_text(prompt))[0]}


def label_samples(records, seed=0, tau=TAU):
    """Preference pairs from sampled answers (a samples JSONL: {id, prompt, responses}), labelled by
    the simulated human: answers 0 and 1 of each prompt, 2 and 3, ...; a pair of equal gold carries
    no signal and is skipped. Labels on the policy's own samples, as InstructGPT's labellers did."""
    rng, pairs = random.Random(seed), []
    for record in records:
        responses = record["responses"]
        for i in range(0, len(responses) - 1, 2):
            a1, a2 = responses[i], responses[i + 1]
            r1, r2 = score(record["prompt"], a1), score(record["prompt"], a2)
            if r1 != r2:
                pairs.append(human_label(rng, f"{record['id']}-{i // 2}", record["prompt"],
                                         a1, a2, r1, r2, tau))
    return pairs


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


# ----------------------------------------------------------------------------------------------
# Tokenizer and tiny model config (HF format, loadable by transformers.AutoTokenizer / LlamaConfig)

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|end|>", "<|unk|>", "<|system|>", "<|user|>",
                  "<|assistant|>")
# the printable ASCII characters, then the typographic quotes etc. of the judge templates
CHARACTERS = ("\t", "\n") + tuple(chr(c) for c in range(32, 127)) + tuple("‘’“”–—…é")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
MODEL_CONFIG = dict(  # ~0.8M parameters; sized so SFT on 2 CPU cores takes minutes (see docstring)
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
)


def write_model_folder(folder):
    """tokenizer.json (a BPE with no merges = one token per character; unknown characters →
    <|unk|>), tokenizer_config.json with the chat template, config.json,
    generation_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    # concatenate characters back (the default would insert spaces)
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in SPECIAL_TOKENS])
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "tokenizer.json", tokenizer.to_str(pretty=True))
    ids = {name: vocab[f"<|{name}|>"] for name in ("pad", "bos", "end")}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "eos_token": "<|end|>", "pad_token": "<|pad|>",
        "unk_token": "<|unk|>",
        "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>"],
        "clean_up_tokenization_spaces": False,  # never edit spaces on decode: text must round-trip
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(vocab),
        **MODEL_CONFIG, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
        "initializer_range": 0.02, "bos_token_id": ids["bos"], "eos_token_id": ids["end"],
        "pad_token_id": ids["pad"], "torch_dtype": "float32",
    }
    generation_config = {"bos_token_id": ids["bos"], "eos_token_id": ids["end"],
                         "pad_token_id": ids["pad"]}
    for name, content in (("tokenizer_config.json", tokenizer_config), ("config.json", config),
                          ("generation_config.json", generation_config)):
        atomic_write_text(folder / name, json.dumps(content, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Building the data set


def user_turn(text):
    return [{"role": "user", "content": text}]


def preference_pairs(rng, split, texts, pool, tau):
    """A pairs record per prompt text: two answers of different gold (by two distinct behaviour
    policies of `pool`, or both by the demonstrator in the sftlike splits), labelled by the
    simulated human."""
    records = []
    for text in texts:
        while True:  # two responses of different gold
            if split.startswith("sftlike"):
                first, second = DEMONSTRATOR, DEMONSTRATOR
            else:
                first, second = rng.sample(pool, 2)
            a1, a2 = answer_as(rng, first, text), answer_as(rng, second, text)
            r1, r2 = score(text, a1), score(text, a2)
            if r1 != r2:
                break
        records.append(human_label(rng, f"pairs-{split}-{len(records):05d}", user_turn(text),
                                   a1, a2, r1, r2, tau))
    return records


def pair_statistics(records, tau):
    """How often could a perfect r* agree with the labels (the ceiling of any RM's accuracy), and
    how much does length alone say?"""
    margins = [r["margin"] for r in records] or [0.0]
    length_gap = [len(r["chosen"]) - len(r["rejected"]) for r in records]

    def agreement_of(task):
        return (sum(r["margin"] > 0 for r in records if r["source"] == task)
                / max(1, sum(r["source"] == task for r in records)))

    return {
        "n": len(records),
        "gold_agrees_with_label": sum(m > 0 for m in margins) / len(margins),
        "expected_gold_agreement": sum(sigmoid(abs(m) / tau) for m in margins) / len(margins),
        "longer_is_chosen": (sum(g > 0 for g in length_gap)
                             / max(1, sum(g != 0 for g in length_gap))),
        "by_source": {task: {"n": sum(r["source"] == task for r in records),
                             "gold_agrees_with_label": agreement_of(task)} for task in TASKS},
    }


def build(out, seed=0, sft_examples=60000, prompts_per_iter=1024, eval_prompts=512,
          pairs_train=20000, pairs_eval=2000, tau=TAU, verbosity_gap=VERBOSITY_GAP,
          pretrain_texts=16000, offpolicy_verbosity_gap=OFFPOLICY_VERBOSITY_GAP):
    """Write every file of the task into `out`; returns the stats (also saved as stats.json)."""
    out = Path(out)
    rng = random.Random(seed)
    seen = set()

    def fresh_prompts(n):
        """n prompt texts never drawn before, sub-tasks in turn (every split has the same mix)."""
        prompts = []
        while len(prompts) < n:
            text = make_prompt(rng, TASKS[len(prompts) % len(TASKS)])
            if text not in seen:
                seen.add(text)
                prompts.append(text)
        return prompts

    write_model_folder(out / "model")

    # SFT demonstrations from the noisy demonstrator.
    sft_prompts = fresh_prompts(sft_examples)
    demonstrations = [answer_as(rng, DEMONSTRATOR, p) for p in sft_prompts]
    write_jsonl(out / "sft.jsonl",
                [{"messages": user_turn(p) + [{"role": "assistant", "content": a}]}
                 for p, a in zip(sft_prompts, demonstrations)])
    demo_gold = [score(p, a) for p, a in zip(sft_prompts, demonstrations)]

    # Prompt pools for the online iterations and for evaluation.
    # dev: the prompts every setting is chosen on; eval: the held-out prompts of the results tables.
    for name, n in (("iter1", prompts_per_iter), ("iter2", prompts_per_iter),
                    ("iter3", prompts_per_iter), ("eval", eval_prompts), ("dev", eval_prompts)):
        write_jsonl(out / f"prompts_{name}.jsonl",
                    [{"id": f"{name}-{i:05d}", "messages": user_turn(p)}
                     for i, p in enumerate(fresh_prompts(n))])

    # Preference pairs labelled by a noisy BT "human": offline ones from the behaviour policies, and
    # SFT-like ones (two answers of the demonstrator, whose habits the SFT model copies).
    policies = behaviour_policies(verbosity_gap)
    stats = {"seed": seed, "tau": tau, "verbosity_gap": verbosity_gap,
             "offpolicy_verbosity_gap": offpolicy_verbosity_gap,
             "extra_char_penalty": EXTRA_CHAR_PENALTY,
             "sft_examples": sft_examples, "sft_mean_gold": sum(demo_gold) / max(1, len(demo_gold)),
             "sft_exact_fraction": sum(g == 1.0 for g in demo_gold) / max(1, len(demo_gold)),
             "sft_mean_chars": sum(map(len, demonstrations)) / max(1, len(demonstrations))}
    # Drawn in this order so that files added later (pretrain, offpolicy) left the earlier ones'
    # bytes unchanged.
    for split, n in (("train", pairs_train), ("eval", pairs_eval), ("sftlike_train", pairs_train),
                     ("sftlike_eval", pairs_eval), ("pretrain", pretrain_texts),
                     ("offpolicy_train", pairs_train), ("offpolicy_eval", pairs_eval)):
        if split == "pretrain":
            # Raw text of correct computations, no chat template: what a pretrained base has read
            # before SFT.
            write_jsonl(out / "pretrain.jsonl",
                        [{"text": worksheet(rng, p, seen)} for p in fresh_prompts(n)])
            stats["pretrain_texts"] = n
            continue
        offpolicy = split.startswith("offpolicy")
        pool = behaviour_policies(offpolicy_verbosity_gap) if offpolicy else policies
        records = preference_pairs(rng, split, fresh_prompts(n), pool, tau)
        write_jsonl(out / f"pairs_{split}.jsonl", records)
        stats[f"pairs_{split}"] = pair_statistics(records, tau)
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats


# ----------------------------------------------------------------------------------------------
# Command line: build (default) or score a samples file


def score_samples(samples_path, out_path=None):
    """Add `gold` (one float per response) to each samples record; print the means."""
    records = read_jsonl(samples_path)
    golds, lengths, by_task = [], [], {}
    for record in records:
        record["gold"] = [score(record.get("prompt"), r) for r in record.get("responses", [])]
        task = (parse_prompt(prompt_text(record.get("prompt"))) or ("other",))[0]
        by_task.setdefault(task, []).extend(record["gold"])
        golds += record["gold"]
        lengths += [len(r) if isinstance(r, str) else 0 for r in record.get("responses", [])]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    print(f"{samples_path}: {len(records)} prompts, {len(golds)} responses, mean gold "
          f"{mean(golds):.4f}, mean length {mean(lengths):.1f} chars, exact "
          f"{mean([g == 1.0 for g in golds]):.3f} | "
          + ", ".join(f"{task} {mean(v):.4f}" for task, v in sorted(by_task.items())))
    if out_path:
        write_jsonl(out_path, records)
    return mean(golds), mean(lengths)


def gold_demonstrations(prompt_records):
    """SFT examples answering each prompt exactly (r* = 1): the "SFT on the gold answers" control,
    which shows what the online loop adds beyond sharpening the distribution."""
    examples = []
    for record in prompt_records:
        parsed = parse_prompt(prompt_text(record["messages"]))
        if parsed is None:
            raise ValueError(f"{record.get('id')}: not a built-in task prompt")
        answer = {"role": "assistant", "content": " ".join(parsed[1])}
        examples.append({"messages": list(record["messages"]) + [answer]})
    return examples


def label_main(argv):
    """python -m data.task label: preference pairs from a samples file."""
    parser = argparse.ArgumentParser(
        prog="python -m data.task label",
        description="preference pairs from sampled answers, labelled by the simulated human")
    parser.add_argument("--samples", required=True,
                        help="samples JSONL ({id, prompt, responses}), e.g. from generate.py --n 2")
    parser.add_argument("--out", required=True, help="pairs JSONL to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the labeller's coin flips")
    args = parser.parse_args(argv)
    pairs = label_samples(read_jsonl(args.samples), args.seed)
    write_jsonl(args.out, pairs)
    print(f"wrote {args.out}: {len(pairs)} pairs (label agrees with r* on "
          f"{sum(p['margin'] > 0 for p in pairs) / max(1, len(pairs)):.3f})")


def gold_sft_main(argv):
    """python -m data.task gold-sft: exact answers to prompt files, as SFT data."""
    parser = argparse.ArgumentParser(
        prog="python -m data.task gold-sft",
        description="SFT data with the exact answers to the given prompt files")
    parser.add_argument("--prompts", nargs="+", required=True,
                        help="prompt JSONL files ({id, messages})")
    parser.add_argument("--out", required=True,
                        help="SFT JSONL to write ({messages: [user, assistant]})")
    args = parser.parse_args(argv)
    records = [r for path in args.prompts for r in read_jsonl(path)]
    write_jsonl(args.out, gold_demonstrations(records))


def score_main(argv):
    """python -m data.task score: gold scores of a samples file."""
    parser = argparse.ArgumentParser(
        prog="python -m data.task score",
        description="gold-score a samples JSONL ({id, prompt, responses, ...})")
    parser.add_argument("--samples", required=True, help="samples JSONL written by generate.py")
    parser.add_argument("--out", default=None,
                        help="write the records with `gold` (list of floats) added here")
    args = parser.parse_args(argv)
    score_samples(args.samples, args.out)


def build_parser():
    """The flags of python -m data.task (building the data set)."""
    parser = argparse.ArgumentParser(prog="python -m data.task", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "builtin"),
                        help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="everything is drawn from this seed")
    parser.add_argument("--sft-examples", type=int, default=60000,
                        help="demonstrations in sft.jsonl")
    parser.add_argument("--prompts-per-iter", type=int, default=1024,
                        help="prompts in each prompts_iter{1,2,3}.jsonl")
    parser.add_argument("--eval-prompts", type=int, default=512,
                        help="prompts in prompts_eval.jsonl, and in prompts_dev.jsonl")
    parser.add_argument("--pairs-train", type=int, default=20000,
                        help="preference pairs in pairs_train.jsonl, and in "
                             "pairs_sftlike_train.jsonl")
    parser.add_argument("--pairs-eval", type=int, default=2000,
                        help="preference pairs in pairs_eval.jsonl, and in "
                             "pairs_sftlike_eval.jsonl")
    parser.add_argument("--tau", type=float, default=TAU,
                        help="labeller temperature: P(a1 ≻ a2) = σ((r*(a1) − r*(a2)) / τ)")
    parser.add_argument("--verbosity-gap", type=float, default=VERBOSITY_GAP,
                        help="P(verbose) of the careful / hasty behaviour policy is 0.4 ± this: "
                             "how much verbosity goes with quality in the preference data (0 = "
                             "no length shortcut to learn)")
    parser.add_argument("--offpolicy-verbosity-gap", type=float, default=OFFPOLICY_VERBOSITY_GAP,
                        help="the same for pairs_offpolicy_*.jsonl (paper 1's off-policy "
                             "comparison: a milder length bias)")
    parser.add_argument("--pretrain-texts", type=int, default=16000,
                        help="plain-text worksheets (1-3 computations each) in pretrain.jsonl")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"label": label_main, "gold-sft": gold_sft_main, "score": score_main}
    if argv[:1] and argv[0] in commands:
        commands[argv[0]](argv[1:])
        return
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("sft_examples", "prompts_per_iter", "eval_prompts", "pairs_train", "pairs_eval",
                 "pretrain_texts"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("verbosity_gap", "offpolicy_verbosity_gap"):
        if not 0 <= getattr(args, flag) <= 0.4:
            parser.error(f"--{flag.replace('_', '-')} must be in [0, 0.4] (it shifts P(verbose) = "
                         "0.4 of the behaviour policies)")
    stats = build(args.out, args.seed, args.sft_examples, args.prompts_per_iter, args.eval_prompts,
                  args.pairs_train, args.pairs_eval, args.tau, args.verbosity_gap,
                  args.pretrain_texts, args.offpolicy_verbosity_gap)
    offline, sftlike = stats["pairs_eval"], stats["pairs_sftlike_eval"]
    offpolicy = stats["pairs_offpolicy_eval"]
    print(f"wrote {args.out}: {stats['sft_examples']} demonstrations (mean gold "
          f"{stats['sft_mean_gold']:.3f}, exact {stats['sft_exact_fraction']:.3f}), "
          f"3 × {args.prompts_per_iter} + 2 × {args.eval_prompts} prompts (eval, dev), "
          f"2 × ({args.pairs_train} + {args.pairs_eval}) pairs (label agrees with r* on "
          f"{offline['gold_agrees_with_label']:.3f} of offline eval pairs, the longer response "
          f"chosen in {offline['longer_is_chosen']:.3f}; SFT-like pairs: "
          f"{sftlike['gold_agrees_with_label']:.3f}, {sftlike['longer_is_chosen']:.3f}; "
          f"off-policy pairs: {offpolicy['gold_agrees_with_label']:.3f}, "
          f"{offpolicy['longer_is_chosen']:.3f}), {stats['pretrain_texts']} pretraining texts")


if __name__ == "__main__":
    main()
