"""Tests of data/task.py: the built-in task."""
import json
import math
import random
import re

import pytest
import torch

from data.task import TASKS, TAU, build, parse_prompt, score
from data.task import main as task_main
from tests.helpers import SMALL, TASK_FILES, read_lines


def _user(text):
    return [{"role": "user", "content": text}]


def test_task_score_hand_checked():
    sort = _user("sort 31 7 18")  # target 7 18 31
    assert score(sort, "7 18 31") == 1.0
    assert score(sort, "7 31 18") == pytest.approx(2 / 3)       # one misplaced: LCS 2 of 3
    assert score(sort, "7 18") == pytest.approx(2 / 3)          # one missing
    assert score(sort, "7 18 31 31") == pytest.approx(3 / 4)    # one extra
    # two commas are extra characters
    assert score(sort, "7, 18, 31") == pytest.approx(1 - 0.002 * 2)
    assert score(sort, "Sure! 7 18 31") == pytest.approx(1 - 0.002 * 6)
    assert score(sort, "Sure! 7 18 31 Hope this helps!") == pytest.approx(1 - 0.002 * 23)
    assert score(_user("reverse 1 2 3"), "3 2 1") == 1.0
    assert score(_user("reverse 1 2 3"), "1 2 3") == pytest.approx(1 / 3)
    assert score(_user("evens 83 12 55 7 40"), "12 40") == 1.0
    assert score(_user("evens 83 12 55 7 40"), "12 55 40") == pytest.approx(2 / 3)
    assert score(_user("add 385 97"), "482") == 1.0
    assert score(_user("add 385 97"), "472") == pytest.approx(2 / 3)   # right-aligned digits
    assert score(_user("add 385 97"), "1482") == pytest.approx(3 / 4)
    assert score(_user("add 385 97"), "482 482") == pytest.approx(1 / 2)  # the answer is one number
    # empty, garbage, padding, and things that are not prompts of the task
    assert score(sort, "") == 0.0
    assert score(sort, "asdf") == pytest.approx(-0.008)
    assert score(sort, "x" * 100000) == -1.0                   # the penalty is capped at 1
    assert score(sort, "7 18 31" + " ok" * 1000) == pytest.approx(0.0)
    assert score(sort, "٧ ١٨ ٣١") == pytest.approx(-0.014)      # non-ASCII digits are not numbers
    assert score(_user("hello"), "7 18 31") == 0.0
    assert score(_user("sort " + "9" * 5000), "1") == 0.0      # absurd prompts are not task prompts
    assert score(None, "1") == 0.0 and score(sort, None) == 0.0
    assert score("sort 31 7 18", "7 18 31") == 1.0
    # the last user turn is the prompt; a system turn is fine
    assert score([{"role": "system", "content": "be brief"}] + sort, "7 18 31") == 1.0


def test_task_score_never_raises_on_garbage():
    rng = random.Random(0)
    alphabet = "0123456789 ,.-+abcXYZ\n\t<|end|>é٣"
    for _ in range(300):
        response = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        prompt = _user(rng.choice(["sort 5 3 9", "add 99 1", "evens 1 2", "reverse 7", "junk", ""]))
        value = score(prompt, response)
        assert isinstance(value, float) and math.isfinite(value) and -1.0 <= value <= 1.0


def test_task_build_is_deterministic(tmp_path, task_dir):
    build(tmp_path / "again", **SMALL)
    for name in TASK_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (task_dir / name).read_bytes(), name
    build(tmp_path / "other", **{**SMALL, "seed": 1})
    assert (tmp_path / "other" / "sft.jsonl").read_bytes() != (task_dir / "sft.jsonl").read_bytes()


def test_task_prompt_splits_are_disjoint(task_dir):
    ids, texts = [], {}
    # dev: where settings are chosen, never eval's prompts
    for split in ("iter1", "iter2", "iter3", "eval", "dev"):
        records = read_lines(task_dir / f"prompts_{split}.jsonl")
        size = SMALL["eval_prompts"] if split in ("eval", "dev") else SMALL["prompts_per_iter"]
        assert len(records) == size
        for r in records:
            assert r["messages"][-1]["role"] == "user"
            assert parse_prompt(r["messages"][-1]["content"]) is not None
        ids += [r["id"] for r in records]
        texts[split] = {r["messages"][-1]["content"] for r in records}
        assert len(texts[split]) == len(records)
        # every sub-task in every split
        assert {parse_prompt(t)[0] for t in texts[split]} == set(TASKS)
    texts["sft"] = {r["messages"][0]["content"] for r in read_lines(task_dir / "sft.jsonl")}
    texts["pretrain"] = {r["text"].split(" = ")[0] for r in read_lines(task_dir / "pretrain.jsonl")}
    assert len(texts["pretrain"]) == SMALL["pretrain_texts"]
    for split in ("train", "eval", "sftlike_train", "sftlike_eval", "offpolicy_train",
                  "offpolicy_eval"):
        pairs = read_lines(task_dir / f"pairs_{split}.jsonl")
        ids += [p["id"] for p in pairs]
        texts[f"pairs_{split}"] = {p["prompt"][-1]["content"] for p in pairs}
    assert len(ids) == len(set(ids))
    names = sorted(texts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not texts[a] & texts[b], (a, b)


def test_task_tokenizer_and_chat_template(task_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(task_dir / "model"))
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.eos_token == "<|end|>"
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "sort 3 1 2"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|system|>be brief<|end|><|user|>sort 3 1 2<|end|><|assistant|>"
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "1 2 3"}],
                                         tokenize=False)
    # assistant turn = header + content + ONE end-of-turn token
    assert full == prompt + "1 2 3<|end|>"
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    # prompt and response tokenized separately = the whole conversation tokenized at once
    assert encode(full) == encode(prompt) + encode("1 2 3") + [tokenizer.eos_token_id]
    assert encode(prompt)[:2] == [1, 4]
    assert encode(prompt)[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    for text in ("sort 31 7 18", "Sure!  7, 18\n31 Hope this helps!", " leading and trailing ",
                 "“quotes” — …"):
        assert tokenizer.decode(encode(text)) == text  # one token per character, exact round trip
        assert len(encode(text)) == len(text)
    assert len(encode("A")) == 1 and len(encode("B")) == 1  # judge / pairwise labels
    assert tokenizer.decode(encode(full), skip_special_tokens=True) == "be briefsort 3 1 21 2 3"


def test_task_config_builds_llama(task_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(task_dir / "model"))
    config = LlamaConfig.from_pretrained(str(task_dir / "model"))
    assert config.vocab_size == len(tokenizer) and config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    generation_config = json.loads((task_dir / "model" / "generation_config.json").read_text())
    assert generation_config["eos_token_id"] == tokenizer.eos_token_id
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 5e6
    def length(messages):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    longest = max(length(r["messages"]) for r in read_lines(task_dir / "sft.jsonl"))
    # conversations fit in sft.py --block-size 128
    assert longest <= 128 <= config.max_position_embeddings
    prompt = tokenizer.apply_chat_template(_user("add 1 2"), tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


@pytest.mark.parametrize("split", ["train", "sftlike_train", "offpolicy_train"])
def test_task_pair_labels_follow_bernoulli(task_dir, split):
    pairs = read_lines(task_dir / f"pairs_{split}.jsonl")
    assert {p["source"] for p in pairs} == set(TASKS)
    for p in pairs[:500]:
        assert p["chosen"] != p["rejected"] and p["margin"] != 0
        gold_margin = score(p["prompt"], p["chosen"]) - score(p["prompt"], p["rejected"])
        assert p["margin"] == pytest.approx(gold_margin, abs=1e-6)
    # y ~ Bernoulli(σ(Δ/τ)): P(label agrees with r*) = σ(|Δ|/τ) per pair; the count of agreements is
    # a sum of independent Bernoullis, so it lies within 4 standard deviations of its mean.
    agree_probs = [1 / (1 + math.exp(-abs(p["margin"]) / TAU)) for p in pairs]
    expected = sum(agree_probs)
    std = math.sqrt(sum(q * (1 - q) for q in agree_probs))
    observed = sum(p["margin"] > 0 for p in pairs)
    assert abs(observed - expected) < 4 * std
    assert 0.7 < observed / len(pairs) < 0.92  # noisy, like human labels, but mostly right
    # the length hook: in the offline data the longer response is usually the chosen one (65%); in
    # the off-policy pairs less so (a milder verbosity gap: 60%); in pairs of two demonstrator
    # answers it is not (verbosity only costs gold there). 3000 pairs: one standard error ≈ 0.01.
    longer = [len(p["chosen"]) > len(p["rejected"])
              for p in pairs if len(p["chosen"]) != len(p["rejected"])]
    bounds = {"train": (0.62, 0.72), "offpolicy_train": (0.56, 0.64),
              "sftlike_train": (0.35, 0.55)}[split]
    assert bounds[0] < sum(longer) / len(longer) < bounds[1]


def test_task_pretraining_texts_are_correct_computations(task_dir):
    records = read_lines(task_dir / "pretrain.jsonl")
    assert len(records) == SMALL["pretrain_texts"] and set(records[0]) == {"text"}
    tasks, lines = [], 0
    for r in records:
        worksheet = [line.split(" = ") for line in r["text"].split("\n")]
        # exact, bare answers: the knowledge SFT's demonstrator lacks
        for prompt, answer in worksheet:
            assert score(_user(prompt), answer) == 1.0
        numbers = {prompt.split(" ", 1)[1] if not prompt.startswith("add")
                   else " ".join(sorted(prompt.split()[1:])) for prompt, _ in worksheet}
        # one set of numbers, no line twice
        assert len(numbers) == 1 and len({prompt for prompt, _ in worksheet}) == len(worksheet)
        tasks.append(parse_prompt(worksheet[0][0])[0])
        lines += len(worksheet)
    # first lines: every sub-task alike
    assert {t: tasks.count(t) for t in TASKS} == {t: SMALL["pretrain_texts"] // 4 for t in TASKS}
    assert lines > 2 * len(records)  # most texts are worksheets of several computations


def test_task_command_refuses_bad_sizes_at_parse_time(capsys):
    for flags in (["--pretrain-texts", "0"], ["--offpolicy-verbosity-gap", "0.5"]):
        with pytest.raises(SystemExit) as e:
            task_main(flags)
        assert e.value.code == 2 and flags[0] in capsys.readouterr().err


def test_task_sum_without_carries_hand_checked():
    from data.task import sum_without_carries
    assert sum_without_carries([385, 97]) == "372"   # 5+7 → 2, 8+9 → 7, 3+0 → 3
    assert sum_without_carries([99, 1]) == "90"
    assert sum_without_carries([5, 7]) == "2"
    assert sum_without_carries([12, 30]) == "42"     # nothing carries: the true sum
    assert sum_without_carries([500, 500]) == "0"    # leading zeros dropped, as a number is written


def test_task_demonstrations_have_controlled_noise(task_dir):
    from data.task import sum_without_carries
    records = read_lines(task_dir / "sft.jsonl")
    exact = verbose = 0
    carried = []  # add prompts whose sum carries: was the answer the carry-less sum?
    for r in records:
        user, assistant = r["messages"]
        target = " ".join(parse_prompt(user["content"])[1])
        numbers = " ".join(tok for tok in assistant["content"].split() if tok.isdigit())
        exact += numbers == target
        verbose += any(c.isalpha() for c in assistant["content"])
        if parse_prompt(user["content"])[0] == "add":
            operands = [int(s) for s in user["content"].split()[1:]]
            # something carries: 60% drop it, then 20% err
            if sum_without_carries(operands) != target:
                carried.append(numbers == sum_without_carries(operands))
    n = len(records)
    # exact: no mistake (0.8), and for a sum that carries, the carries kept too (0.4)
    assert abs(exact / n - 0.8 * (1 - 0.6 * len(carried) / n)) < 4 * math.sqrt(0.16 / n)
    assert abs(verbose / n - 0.3) < 4 * math.sqrt(0.21 / n)  # P(verbose) = 0.3
    assert len(carried) > 50
    assert abs(sum(carried) / len(carried) - 0.6 * 0.8) < 4 * math.sqrt(0.25 / len(carried))


def test_task_score_command(tmp_path, capsys):
    samples = [{"id": "s0", "prompt": _user("sort 3 1 2"),
                "responses": ["1 2 3", "Sure! 1 2 3", "3 2 1"],
                "num_tokens": [6, 12, 6], "finish_reasons": ["stop"] * 3},
               {"id": "s1", "prompt": _user("add 5 7"), "responses": ["12"], "num_tokens": [3],
                "finish_reasons": ["length"]}]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    task_main(["score", "--samples", str(tmp_path / "samples.jsonl"),
               "--out", str(tmp_path / "scored.jsonl")])
    scored = read_lines(tmp_path / "scored.jsonl")
    assert scored[0]["gold"] == pytest.approx([1.0, 1 - 0.012, 1 / 3])
    assert scored[1]["gold"] == [1.0]
    assert scored[0]["responses"] == samples[0]["responses"]
    # (1 + 0.988 + 1/3 + 1) / 4, over responses
    assert "mean gold 0.8303" in capsys.readouterr().out


def test_task_gold_sft_command_answers_exactly(tmp_path, task_dir):
    task_main(["gold-sft", "--prompts", str(task_dir / "prompts_iter1.jsonl"),
               str(task_dir / "prompts_iter2.jsonl"),
               "--out", str(tmp_path / "gold.jsonl")])
    examples = read_lines(tmp_path / "gold.jsonl")
    prompts = (read_lines(task_dir / "prompts_iter1.jsonl")
               + read_lines(task_dir / "prompts_iter2.jsonl"))
    assert [e["messages"][:1] for e in examples] == [p["messages"] for p in prompts]
    assert all(score(e["messages"][:1], e["messages"][1]["content"]) == 1.0 for e in examples)


def test_reward_vs_gold_hand_computed():
    from data.task import reward_vs_gold
    records = [
        # pairs whose gold differs by > 0.1: (0,1) the reward agrees, (0,2) it disagrees; (1,2)
        # |Δ| = 0.05 is skipped
        {"gold": [1.0, 0.5, 0.45], "rewards": [2.0, 1.0, 3.0]},
        # (0,1) disagrees, (0,2) a tie in reward counts half, (1,2) disagrees
        {"gold": [0.2, 0.9, 0.6], "rewards": [1.0, 0.0, 1.0]},
    ]
    stats = reward_vs_gold(records)
    assert stats["pairs"] == 5 and stats["accuracy"] == pytest.approx((1 + 0 + 0 + 0.5 + 0) / 5)
    # best-of-n picks: prompt 1 → index 2 (gold 0.45); prompt 2 → first of the two maxima, index 0
    # (gold 0.2)
    assert stats["best_of_n_gold"] == pytest.approx((0.45 + 0.2) / 2)
    assert stats["mean_gold"] == pytest.approx(((1.0 + 0.5 + 0.45) / 3 + (0.2 + 0.9 + 0.6) / 3) / 2)
    assert stats["gold_best_of_n"] == pytest.approx((1.0 + 0.9) / 2)
    # nothing to order
    assert reward_vs_gold([{"gold": [0.5, 0.5], "rewards": [0.0, 1.0]}])["accuracy"] is None


def test_gold_agreement_counts_only_pairs_that_differ_in_correctness():
    from data.task import GOLD_GAP, gold_agreement
    # gold differences: agree, disagree, tie in reward (½), within GOLD_GAP (not counted)
    agreement = gold_agreement([0.5, -0.3, 0.2, GOLD_GAP], [1.0, 2.0, 0.0, -1.0])
    assert agreement == ((1 + 0 + 0.5) / 3, 3)
    assert gold_agreement([0.05, -0.1], [1.0, 1.0]) == (None, 0)


def test_gold_scored_only_on_task_prompts():
    from data.task import gold_scored
    records = [{"prompt": _user("sort 3 1 2"), "responses": ["1 2 3", "3 2 1"]},
               {"prompt": _user("add 5 7"), "responses": ["12"]}]
    assert [r["gold"] for r in gold_scored(records)] == [[1.0, 1 / 3], [1.0]]
    assert gold_scored(records + [{"prompt": _user("write a poem"), "responses": ["no"]}]) is None


def test_label_samples_pairs_answers_and_skips_ties(tmp_path, capsys):
    from data.task import label_samples
    records = [{"id": "a", "prompt": _user("sort 3 1 2"),
                "responses": ["1 2 3", "3 2 1", "1 2 3", "Sure! 1 2 3", "2 1 3"]},
               {"id": "b", "prompt": _user("add 5 7"), "responses": ["12", "12"]}]
    pairs = label_samples(records, seed=0, tau=1e-9)  # a labeller with no noise: gold decides
    # answers (0, 1) and (2, 3) of "a" form pairs, the fifth is left over; "b"'s two answers tie in
    # gold
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("a-0", "1 2 3", "3 2 1"), ("a-1", "1 2 3", "Sure! 1 2 3")]
    assert pairs[1]["margin"] == pytest.approx(0.012) and {p["source"] for p in pairs} == {"sort"}
    one = {"id": "c", "prompt": _user("sort 3 1 2"), "responses": ["1 2 3", "1 3 2"]}
    # Δr* = 1/3: the human agrees with σ(3.33) = 0.966 of the time
    noisy = [label_samples([one], seed=s)[0] for s in range(400)]
    assert 0.93 < sum(p["chosen"] == "1 2 3" for p in noisy) / 400 < 0.99
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    task_main(["label", "--samples", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "p.jsonl")])
    assert len(read_lines(tmp_path / "p.jsonl")) == 2 and "2 pairs" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# data/arith.py: the real-model task (SmolLM2) and its verifier


def test_arith_verifier_hand_checked_in_trl_convention():
    from data.arith import correct, last_number
    assert last_number("The answer is 68.") == 68 and last_number("no digits") is None
    assert last_number("12 - 20 = -8") == -8
    completions = [[{"role": "assistant", "content": text}]
                   for text in ("68", "The answer is 68.", "23 + 45 = 68", "68 + 1 = 69",
                                "sixty-eight", "")]
    assert correct(prompts=[[]] * 6, completions=completions, answer=[68] * 6) == [
        1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert correct(prompts=[[]], completions=["It is 7"], answer=[7], task=["times"]) == [1.0]


def arith_answer(question):
    """The answer to a data/arith.py question, worked out from its text here."""
    numbers = [int(n) for n in re.findall(r"[0-9]+", question)]
    if "first" in question:
        return numbers[0]
    if "last" in question:
        return numbers[-1]
    if "largest" in question:
        return max(numbers)
    if "smallest" in question:
        return min(numbers)
    if re.search(r" x |times|Multiply", question):
        return numbers[0] * numbers[1]
    return numbers[0] + numbers[1]


def test_arith_answers_are_right_and_pairs_put_the_right_one_first(tmp_path):
    """Every prompt's answer worked out again from its question; the pairs' chosen side right and
    the rejected wrong by the verifier; the files pass the validator and depend only on the seed."""
    from data.arith import TASKS, build, correct
    from data.schema import load_records
    for folder in ("a", "b"):
        build(tmp_path / folder, seed=3, prompts_per_iter=20, eval_prompts=10, pairs_train=30,
              pairs_eval=10)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(names) == 8 and all((tmp_path / "a" / n).read_bytes()
                                   == (tmp_path / "b" / n).read_bytes() for n in names)
    ids = []
    for split in ("iter1", "iter2", "iter3", "dev", "eval"):
        for record in load_records(tmp_path / "a" / f"prompts_{split}.jsonl", "prompts"):
            assert record["answer"] == arith_answer(record["messages"][0]["content"])
            ids.append(record["id"])
    assert len(ids) == len(set(ids)) == 80
    pairs = load_records(tmp_path / "a" / "pairs_train.jsonl", "pairs")
    assert len(pairs) == 30 and {p["source"] for p in pairs} == set(TASKS)
    for pair in pairs:
        answer = arith_answer(pair["prompt"][0]["content"])
        assert correct([pair["prompt"]] * 2, [pair["chosen"], pair["rejected"]],
                       [answer] * 2) == [1.0, 0.0]
