"""Convert the papers' public datasets, as the Hugging Face `datasets` library exports them
(`Dataset.to_json`: JSONL, or a JSON list with lines=False), into this project's JSONL schemas
(data/schema.py, data/README.md). No network: download/export the data elsewhere, convert here.
Run from the repo root:

    python -m data.convert --format hh-rlhf --input hh_train.jsonl --output data/hh/pairs.jsonl
    python -m data.convert --format ultrafeedback --input uf.jsonl --output data/uf/pairs.jsonl \\
        --min-margin 1.0
    python -m data.convert --format shp --input shp_train.json --output data/shp/pairs.jsonl
    python -m data.convert --format helpsteer --input helpsteer.jsonl \\
        --output data/hs/pairs.jsonl --helpsteer-attribute helpfulness
    python -m data.convert --format tldr --input comparisons.jsonl --output data/tldr/pairs.jsonl
    python -m data.convert --format prompts --input any.jsonl --output data/hh/prompts.jsonl
    python -m data.convert --format judge --input pairs.jsonl --output judge_sft.jsonl \\
        --template dialogue
    # add --strict to stop at the first malformed record (an error naming file:line)

Every input record is accounted for: the summary prints how many were read and written, and how many
were skipped for each reason, with up to 5 examples (file:line). Two kinds of skips:
  - malformed: the record does not have the published shape (bad JSON, missing or mistyped fields,
    a transcript that cannot be parsed). Skipped and counted, or with --strict an error.
  - filtered: the record is well formed but carries no usable preference (empty or identical
    responses, tied scores, a margin below --min-margin, SHP score ratio ≤ 2, ...). Always counted,
    never an error: real datasets contain such records.
Formats and choices (details in data/README.md):
  hh-rlhf        full transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..." → shared prompt + final
                 responses
  ultrafeedback  binarized (H4: chosen/rejected message lists, score_chosen/score_rejected) or raw
                 (openbmb: instruction + completions), detected per record; all non-tied pairs
  shp            score_ratio > 2, at most 5 pairs per post_id (highest ratios first)
  helpsteer      responses to the same prompt paired when --helpsteer-attribute differs by
                 ≥ --min-margin
  tldr           "SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:" + the two
                 summaries (no TITLE line for a post without a title)
  prompts        a prompt set from any of the above (or chat `messages` records), deduplicated
  judge          preference augmentation (paper 2): each pair → two LLM-as-a-judge SFT examples
                 (A/B orders)
Same input + flags (+ --seed with --shuffle) → the same output bytes.
"""
import argparse
import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

from runs import write_jsonl
from data.judge import JUDGE_TEMPLATES, judge_sft_records
from data.schema import ROLES, validate_record

FORMATS = ("hh-rlhf", "ultrafeedback", "shp", "helpsteer", "tldr", "prompts", "judge")
DEFAULT_MIN_MARGIN = {"ultrafeedback": 1.0, "helpsteer": 1.0}  # the formats with absolute scores
SHP_MIN_RATIO = 2.0        # paper 1 (after UltraFeedback): keep SHP pairs with score ratio > 2 ...
SHP_MAX_PAIRS_PER_POST = 5  # ... and at most 5 pairs per post
HELPSTEER_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


# ----------------------------------------------------------------------------------------------
# Bookkeeping: nothing is dropped silently.


class Malformed(Exception):
    """A record that does not have the published shape."""


class Report:
    """Counts records read / written and skips by reason, keeps a few examples, and in --strict
    mode turns the first malformed record into an error naming file:line."""

    def __init__(self, strict, max_examples=5):
        self.strict, self.max_examples = strict, max_examples
        self.read, self.written = 0, 0
        self.malformed, self.filtered = Counter(), Counter()
        self.examples = []

    def _example(self, location, reason):
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{location}: {reason}")

    def skip_malformed(self, location, reason):
        if self.strict:
            raise ValueError(f"{location}: {reason}")
        # "completions[2]" and "[3]" count as one reason
        self.malformed[re.sub(r"\d+", "N", reason)] += 1
        self._example(location, reason)

    def skip_filtered(self, location, reason):
        self.filtered[reason] += 1
        self._example(location, reason)

    def summary(self, fmt, input_path, output_path):
        lines = [f"{fmt}: read {self.read} records from {input_path}, wrote {self.written} to "
                 f"{output_path}"]
        for title, counter in (("skipped as malformed (--strict makes these errors)",
                                self.malformed),
                               ("skipped by filters (counted per record or per candidate pair)",
                                self.filtered)):
            if counter:
                lines.append(f"  {title}: {sum(counter.values())}")
                lines += [f"    {count:>7}  {reason}"
                          for reason, count in sorted(counter.items(),
                                                      key=lambda kv: (-kv[1], kv[0]))]
        if self.examples:
            lines.append("  examples:")
            lines += [f"    {example}" for example in self.examples]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Reading: JSONL (one object a line) or one JSON list; each record keeps its location "file:line".


def read_text(path):
    """The file decoded as UTF-8; a byte that is not UTF-8 is an error naming its line and column
    (a bare UnicodeDecodeError gives only an offset into the whole file)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        newline = b"\n"
        line, line_start = data.count(newline, 0, e.start) + 1, data.rfind(newline, 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column "
                         f"{e.start - line_start + 1})") from None


def read_input(path, report):
    """[(location, record)] of a JSONL file or a JSON list file. A JSONL line that is not a JSON
    object is malformed (skipped, or an error with --strict); a broken JSON list cannot be resynced
    and is always an error."""
    text = read_text(path)
    items = []
    if text.lstrip().startswith("["):
        # A JSON list: decode item by item to know the line each one starts on (a list written on a
        # single line, as `to_json(lines=False)` does, also names the item's index).
        decoder, position = json.JSONDecoder(), text.index("[") + 1
        while True:
            while position < len(text) and text[position] in " \t\r\n,":
                position += 1
            if position >= len(text):
                raise ValueError(f"{path}: JSON list is not closed with ']'")
            if text[position] == "]":
                break
            line = text.count("\n", 0, position) + 1
            try:
                record, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{text.count(chr(10), 0, e.pos) + 1}: not valid JSON "
                                 f"({e.msg})") from None
            items.append((f"{path}:{line} (item {len(items) + 1})", record))
    else:
        # split on "\n" only: str.splitlines() would also split inside strings at U+2028 & co.,
        # which JSON writers with ensure_ascii=False leave unescaped.
        for line_number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                items.append((f"{path}:{line_number}", json.loads(line)))
            except json.JSONDecodeError as e:
                report.read += 1
                report.skip_malformed(f"{path}:{line_number}", f"not valid JSON: {e.msg}")
    report.read += len(items)
    kept = []
    for location, record in items:
        if isinstance(record, dict):
            kept.append((location, record))
        else:
            report.skip_malformed(location, f"not a JSON object: got {type(record).__name__}")
    return kept


# ----------------------------------------------------------------------------------------------
# Small helpers shared by the converters.


def field(record, name, kind=str):
    """record[name], which must be of type `kind` (a number: int or float, never bool)."""
    if name not in record or record[name] is None:
        raise Malformed(f"missing field '{name}'")
    value = record[name]
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Malformed(f"field '{name}': expected a number, got {type(value).__name__}")
        return float(value)
    if not isinstance(value, kind):
        raise Malformed(f"field '{name}': expected {kind.__name__}, got {type(value).__name__}")
    return value


def user(text):
    return [{"role": "user", "content": text.strip()}]


def content_id(*parts):
    """A short stable id: the hash of the content, so ids do not depend on file order or subsets."""
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return hashlib.sha1(blob).hexdigest()[:16]


def make_pair(prompt, chosen, rejected, source, margin=None):
    """A pairs record. Response texts are stripped of surrounding whitespace (in every format that
    is layout noise, e.g. HH's space after "Assistant:" or a summary's leading space)."""
    chosen, rejected = chosen.strip(), rejected.strip()
    pair = {"id": content_id(prompt, chosen, rejected), "prompt": prompt, "chosen": chosen,
            "rejected": rejected}
    if margin is not None:
        pair["margin"] = margin
    pair["source"] = source
    return pair


def pair_filter_reason(chosen, rejected):
    """Why a candidate pair carries no preference signal, or None."""
    if not chosen.strip() or not rejected.strip():
        return "empty response"
    if chosen.strip() == rejected.strip():
        return "identical responses"
    return None


def scored_pairs(location, prompt, responses, scores, min_margin, source, report):
    """All pairs of responses whose scores differ by ≥ min_margin (ties never kept), higher score
    chosen, margin = score difference; responses in input order i < j, so output is
    deterministic."""
    pairs = []
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            high, low = (i, j) if scores[i] >= scores[j] else (j, i)
            margin = scores[high] - scores[low]
            reason = pair_filter_reason(responses[high], responses[low])
            if reason is None and margin == 0:
                reason = "tied scores"
            if reason is None and margin < min_margin:
                reason = f"score margin below --min-margin {min_margin:g}"
            if reason:
                report.skip_filtered(location, reason)
            else:
                pairs.append(make_pair(prompt, responses[high], responses[low], source, margin))
    return pairs


# ----------------------------------------------------------------------------------------------
# HH-RLHF (Anthropic/hh-rlhf): {"chosen": transcript, "rejected": transcript}. A turn starts at
# "\n\nHuman:" or "\n\nAssistant:"; "Human:" inside a turn without the blank line is plain text.

HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_transcript(text, name):
    """An HH transcript → messages (user/assistant alternating, starting with user, ending with the
    assistant response). Turn contents are stripped (removes the space after "Assistant:")."""
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text  # a handful of transcripts lack the leading blank line
    boundaries = list(HH_TURN.finditer(text))
    if not boundaries:
        raise Malformed(f"'{name}': no '\\n\\nHuman:' turn found")
    if text[:boundaries[0].start()].strip():
        raise Malformed(f"'{name}': text before the first turn")
    messages = []
    for k, boundary in enumerate(boundaries):
        end = boundaries[k + 1].start() if k + 1 < len(boundaries) else len(text)
        role = "user" if boundary.group(1) == "Human" else "assistant"
        messages.append({"role": role, "content": text[boundary.end():end].strip()})
    for k, message in enumerate(messages):
        if message["role"] != ("user" if k % 2 == 0 else "assistant"):
            raise Malformed(f"'{name}': turns do not alternate Human/Assistant (turn {k + 1} is "
                            f"{message['role']})")
    if messages[-1]["role"] != "assistant":
        raise Malformed(f"'{name}': transcript does not end with an Assistant turn")
    return messages


def hh_pair(location, record, report):
    chosen = parse_hh_transcript(field(record, "chosen"), "chosen")
    rejected = parse_hh_transcript(field(record, "rejected"), "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise Malformed("prompts of chosen and rejected differ "
                        "(transcripts share no common prefix)")
    prompt = chosen[:-1]
    if any(not m["content"] for m in prompt):
        # paper 1 drops "empty rounds"
        report.skip_filtered(location, "empty turn in the conversation")
        return []
    reason = pair_filter_reason(chosen[-1]["content"], rejected[-1]["content"])
    if reason:
        report.skip_filtered(location, reason)
        return []
    return [make_pair(prompt, chosen[-1]["content"], rejected[-1]["content"], "hh-rlhf")]


# ----------------------------------------------------------------------------------------------
# UltraFeedback: (a) HuggingFaceH4/ultrafeedback_binarized: prompt (str), chosen / rejected (message
# lists: the user turn(s) then the assistant response), score_chosen / score_rejected; (b) raw
# openbmb/UltraFeedback: instruction, completions [{model, response, overall_score,
# fine-grained_score, annotations}, ...]. The variant is detected per record.


def messages_field(record, name):
    value = field(record, name, list)
    for k, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"),
                                                           str) or "role" not in message:
            raise Malformed(f"field '{name}'[{k}]: expected a message with role and content")
        if message["role"] not in ROLES:
            raise Malformed(f"field '{name}'[{k}].role: expected one of {'/'.join(ROLES)}, got "
                            f"{message['role']!r}")
    return value


def ultrafeedback_binarized(location, record, args, report):
    chosen, rejected = messages_field(record, "chosen"), messages_field(record, "rejected")
    if (not chosen or not rejected or chosen[-1]["role"] != "assistant"
            or rejected[-1]["role"] != "assistant"):
        raise Malformed("'chosen'/'rejected' must end with an assistant message")
    prompt = [{"role": m["role"], "content": m["content"].strip()} for m in chosen[:-1]]
    if ([(m["role"], m["content"].strip()) for m in rejected[:-1]]
            != [(m["role"], m["content"]) for m in prompt]):
        raise Malformed("prompts of chosen and rejected differ")
    if not prompt:  # some exports keep only the assistant message in chosen/rejected
        prompt = user(field(record, "prompt"))
    score_chosen, score_rejected = field(record, "score_chosen",
                                         float), field(record, "score_rejected", float)
    if score_chosen < score_rejected:
        report.skip_filtered(location, "chosen scored below rejected")
        return []
    return scored_pairs(location, prompt, [chosen[-1]["content"], rejected[-1]["content"]],
                        [score_chosen, score_rejected], args.min_margin, "ultrafeedback", report)


def ultrafeedback_raw(location, record, args, report):
    prompt = user(field(record, "instruction"))
    completions = field(record, "completions", list)
    responses, scores = [], []
    for k, completion in enumerate(completions):
        if not isinstance(completion, dict):
            raise Malformed(f"field 'completions'[{k}]: expected an object")
        responses.append(field(completion, "response"))
        try:
            scores.append(field(completion, args.ultrafeedback_score, float))
        except Malformed as e:
            raise Malformed(f"completions[{k}]: {e} "
                            "(choose the score with --ultrafeedback-score)") from None
    if len(responses) < 2:
        raise Malformed("field 'completions': expected at least 2 completions, got "
                        f"{len(responses)}")
    return scored_pairs(location, prompt, responses, scores, args.min_margin, "ultrafeedback",
                        report)


def ultrafeedback_pairs(location, record, args, report):
    if isinstance(record.get("chosen"), list):
        return ultrafeedback_binarized(location, record, args, report)
    if "completions" in record:
        return ultrafeedback_raw(location, record, args, report)
    raise Malformed("neither binarized (chosen/rejected message lists) nor raw "
                    "(instruction/completions) UltraFeedback")


# ----------------------------------------------------------------------------------------------
# SHP (stanfordnlp/SHP): post_id, history (the post), human_ref_A / human_ref_B (two comments),
# labels (1: A preferred), score_A / score_B (upvotes), score_ratio (preferred / other).


def shp_candidate(location, record, report):
    """(post_id, score ratio, pair) or None when filtered."""
    post_id, history = field(record, "post_id"), field(record, "history")
    ref_a, ref_b = field(record, "human_ref_A"), field(record, "human_ref_B")
    label = field(record, "labels", int)
    if label not in (0, 1):
        raise Malformed(f"field 'labels': expected 0 or 1, got {label}")
    score_a, score_b = field(record, "score_A", float), field(record, "score_B", float)
    chosen, rejected, score_chosen, score_rejected = ((ref_a, ref_b, score_a, score_b) if label == 1
                                                      else (ref_b, ref_a, score_b, score_a))
    if score_chosen < score_rejected:
        # "incorrect labels (implied by the other features of the dataset) are eliminated" (paper 1)
        report.skip_filtered(location, "label disagrees with scores")
        return None
    if "score_ratio" in record and record["score_ratio"] is not None:
        ratio = field(record, "score_ratio", float)
    else:
        ratio = score_chosen / score_rejected if score_rejected > 0 else float("inf")
    reason = pair_filter_reason(chosen, rejected)
    if reason is None and not ratio > SHP_MIN_RATIO:
        reason = f"score ratio <= {SHP_MIN_RATIO:g}"
    if reason:
        report.skip_filtered(location, reason)
        return None
    return post_id, ratio, make_pair(user(history), chosen, rejected, "shp")


def convert_shp(items, args, report):
    candidates = []  # (input index, post_id, ratio, pair)
    for index, (location, record) in enumerate(items):
        try:
            candidate = shp_candidate(location, record, report)
        except Malformed as e:
            report.skip_malformed(location, str(e))
            continue
        if candidate:
            candidates.append((index, *candidate, location))
    # At most SHP_MAX_PAIRS_PER_POST per post: the highest ratios, ties broken by input order.
    kept, per_post = set(), Counter()
    for index, post_id, ratio, _, location in sorted(candidates, key=lambda c: (-c[2], c[0])):
        if per_post[post_id] < SHP_MAX_PAIRS_PER_POST:
            per_post[post_id] += 1
            kept.add(index)
        else:
            report.skip_filtered(location,
                                 f"more than {SHP_MAX_PAIRS_PER_POST} pairs for the post "
                                 "(lowest ratios dropped)")
    # output keeps input order
    return [pair for index, _, _, pair, _ in candidates if index in kept]


# ----------------------------------------------------------------------------------------------
# HelpSteer / HelpSteer2 (nvidia): one row per (prompt, response) with helpfulness, correctness,
# coherence, complexity, verbosity in 0..4. Rows with the same prompt are grouped and paired.
# HelpSteer2 writes earlier turns of multi-turn prompts inline: "...\n<extra_id_1>Assistant\n...".

HELPSTEER_TURN = re.compile(r"\s*<extra_id_1>(User|Assistant)\s*\n")


def parse_helpsteer_prompt(text):
    parts = HELPSTEER_TURN.split(text)
    messages = [{"role": "user", "content": parts[0].strip()}]
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": role.lower(), "content": content.strip()})
    return messages


def helpsteer_score(record, attribute):
    """The score a pair is built on: one attribute, or "mean" = mean of helpfulness, correctness
    and coherence (the attributes where higher is always better; complexity and verbosity are
    not)."""
    names = ("helpfulness", "correctness", "coherence") if attribute == "mean" else (attribute,)
    values = [field(record, name, float) for name in names]
    for name, value in zip(names, values):
        if not 0 <= value <= 4:
            raise Malformed(f"field '{name}': expected a score in 0..4, got {value:g}")
    return sum(values) / len(values)


def convert_helpsteer(items, args, report):
    groups = {}  # prompt text → (first location, [responses], [scores]); dicts keep insertion order
    for location, record in items:
        try:
            prompt, response = field(record, "prompt"), field(record, "response")
            score = helpsteer_score(record, args.helpsteer_attribute)
        except Malformed as e:
            report.skip_malformed(location, str(e))
            continue
        group = groups.setdefault(prompt, (location, [], []))
        group[1].append(response)
        group[2].append(score)
    pairs = []
    for prompt, (location, responses, scores) in groups.items():
        if len(responses) < 2:
            report.skip_filtered(location, "prompt has a single response")
            continue
        pairs += scored_pairs(location, parse_helpsteer_prompt(prompt), responses, scores,
                              args.min_margin, "helpsteer", report)
    return pairs


# ----------------------------------------------------------------------------------------------
# TL;DR comparisons (openai/summarize_from_feedback, "comparisons"): info {id, post, title,
# subreddit, article, site}, summaries [{text, policy, note}, {…}], choice (index of the better
# one).


def tldr_prompt_text(subreddit, title, post):
    """The usual TL;DR prompt. A post without a title (title null) is still a usable post: it is
    rendered without the TITLE line rather than dropped."""
    title_line = f"TITLE: {title.strip()}\n" if title is not None else ""
    return f"SUBREDDIT: r/{subreddit.strip()}\n{title_line}POST: {post.strip()}\nTL;DR:"


def tldr_prompt(record, report, location):
    info = field(record, "info", dict)
    if info.get("post") is None and info.get("article"):
        # The validation split also holds CNN/DailyMail news comparisons, which have no subreddit.
        report.skip_filtered(location, "not a reddit post (CNN/DM article)")
        return None
    title = field(info, "title") if info.get("title") is not None else None
    return user(tldr_prompt_text(field(info, "subreddit"), title, field(info, "post")))


def tldr_pair(location, record, report):
    prompt = tldr_prompt(record, report, location)
    if prompt is None:
        return []
    summaries = field(record, "summaries", list)
    if len(summaries) != 2 or not all(isinstance(s, dict) for s in summaries):
        raise Malformed("field 'summaries': expected 2 objects with 'text', "
                        f"got {len(summaries)} items")
    texts = [field(s, "text") for s in summaries]
    choice = field(record, "choice", int)
    if choice not in (0, 1):
        raise Malformed(f"field 'choice': expected 0 or 1, got {choice}")
    reason = pair_filter_reason(texts[choice], texts[1 - choice])
    if reason:
        report.skip_filtered(location, reason)
        return []
    return [make_pair(prompt, texts[choice], texts[1 - choice], "tldr")]


# ----------------------------------------------------------------------------------------------
# Prompt sets: the prompt of any record above (or of a chat record with `messages`), detected by its
# keys; identical prompts kept once (first occurrence); id = hash of the messages (stable across
# files, orderings and subsets, which generation seeds rely on).


def prompt_of(location, record, report):
    # Dataset-specific keys first: e.g. ultrafeedback_binarized records also carry `messages`.
    if isinstance(record.get("prompt"), list):             # our pairs / samples records
        return messages_field(record, "prompt")
    if isinstance(record.get("chosen"), str):              # HH-RLHF
        return parse_hh_transcript(record["chosen"], "chosen")[:-1]
    if isinstance(record.get("chosen"), list):             # UltraFeedback binarized
        prompt = messages_field(record, "chosen")[:-1]
        return [{"role": m["role"], "content": m["content"].strip()}
                for m in prompt] or user(field(record, "prompt"))
    if "instruction" in record:                            # UltraFeedback raw
        return user(field(record, "instruction"))
    if "history" in record:                                # SHP
        return user(field(record, "history"))
    if "info" in record:                                   # TL;DR
        return tldr_prompt(record, report, location)
    if "messages" in record:                               # chat SFT record / our prompts record
        messages = messages_field(record, "messages")
        last_user = max((k for k, m in enumerate(messages) if m.get("role") == "user"),
                        default=None)
        if last_user is None:
            raise Malformed("field 'messages': no user turn")
        return [{"role": m["role"], "content": m["content"]} for m in messages[:last_user + 1]]
    if isinstance(record.get("prompt"), str):              # HelpSteer(2), or any {"prompt": text}
        return parse_helpsteer_prompt(record["prompt"])
    raise Malformed(f"no prompt found (keys: {', '.join(sorted(record)) or 'none'})")


def convert_prompts(items, args, report):
    out, seen = [], {}
    for location, record in items:
        try:
            messages = prompt_of(location, record, report)
        except Malformed as e:
            report.skip_malformed(location, str(e))
            continue
        if messages is None:
            continue  # filtered (already counted)
        if any(not m["content"].strip() for m in messages):
            report.skip_filtered(location, "empty turn in the prompt")
            continue
        key = content_id(messages)
        if key in seen:
            report.skip_filtered(location, "duplicate prompt")
            continue
        seen[key] = location
        out.append({"id": key, "messages": messages})
    return out


# ----------------------------------------------------------------------------------------------
# Preference augmentation (paper 2): pairs → LLM-as-a-judge SFT examples, both A/B orders.


def convert_judge(items, args, report):
    template = JUDGE_TEMPLATES.get(args.template) or Path(args.template).read_text(encoding="utf-8")
    out = []
    for location, record in items:
        try:
            validate_record(record, "pairs")
        except ValueError as e:
            report.skip_malformed(location, f"not a pairs record: {e}")
            continue
        # One empty side is allowed (OSP asks the judge about responses against the empty one, ∅).
        reason = ("identical responses" if record["chosen"].strip() == record["rejected"].strip()
                  else None)
        if reason is None and record.get("p", 1.0) == 0.5:
            reason = "no preference (p = 0.5)"
        if reason:
            report.skip_filtered(location, reason)
            continue
        out += judge_sft_records(record, template)
    return out


# ----------------------------------------------------------------------------------------------
# Driver


def per_record(items, report, convert_one):
    """Apply convert_one(location, record) → list of outputs to each record; a Malformed record is
    reported (or raised under --strict) and the others go on."""
    out = []
    for location, record in items:
        try:
            out += convert_one(location, record)
        except Malformed as e:
            report.skip_malformed(location, str(e))
    return out


OUTPUT_KIND = {"prompts": "prompts", "judge": "sft"}  # every other format writes pairs


def convert(args):
    """Run one conversion; returns the Report (the CLI prints its summary)."""
    report = Report(args.strict)
    items = read_input(args.input, report)
    if args.format == "hh-rlhf":
        out = per_record(items, report, lambda loc, rec: hh_pair(loc, rec, report))
    elif args.format == "ultrafeedback":
        out = per_record(items, report,
                         lambda loc, rec: ultrafeedback_pairs(loc, rec, args, report))
    elif args.format == "shp":
        out = convert_shp(items, args, report)
    elif args.format == "helpsteer":
        out = convert_helpsteer(items, args, report)
    elif args.format == "tldr":
        out = per_record(items, report, lambda loc, rec: tldr_pair(loc, rec, report))
    elif args.format == "prompts":
        out = convert_prompts(items, args, report)
    else:
        out = convert_judge(items, args, report)
    # Every output record must fit its schema: a converter bug fails loudly here, not in a later
    # stage.
    kind = OUTPUT_KIND.get(args.format, "pairs")
    for k, record in enumerate(out):
        try:
            validate_record(record, kind)
        except ValueError as e:
            raise AssertionError(f"converter produced an invalid {kind} record #{k}: {e}") from None
    if args.shuffle:
        random.Random(args.seed).shuffle(out)
    if not out:
        raise SystemExit(f"{report.summary(args.format, args.input, args.output)}\n"
                         "no records to write; nothing written")
    write_jsonl(args.output, out)
    report.written = len(out)
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="the input's published format (or prompts / judge)")
    parser.add_argument("--input", required=True,
                        help="a JSONL file or a JSON list file, as `datasets` exports it")
    parser.add_argument("--output", required=True, help="the JSONL file to write (atomically)")
    parser.add_argument("--strict", action="store_true",
                        help="stop with an error naming file:line at the first malformed record")
    parser.add_argument("--min-margin", type=float, default=None,
                        help="ultrafeedback / helpsteer: keep pairs whose score difference is "
                             "≥ this (default 1.0 for both); ties are never kept")
    parser.add_argument("--ultrafeedback-score", default="fine-grained_score",
                        choices=("fine-grained_score", "overall_score"),
                        help="raw UltraFeedback: the completion score to compare "
                             "(fine-grained_score: mean of the 4 "
                             "aspect ratings, 1-5; overall_score: GPT-4's critique score, 1-10)")
    parser.add_argument("--helpsteer-attribute", default="helpfulness",
                        choices=HELPSTEER_ATTRIBUTES + ("mean",),
                        help="helpsteer: the attribute pairs are built on; 'mean' = mean of "
                             "helpfulness, correctness, coherence")
    parser.add_argument("--template", default="dialogue",
                        help=f"judge: the instruction, one of {sorted(JUDGE_TEMPLATES)} "
                             "or a text file with {context}, {response_a}, {response_b}")
    parser.add_argument("--shuffle", action="store_true",
                        help="shuffle the output records (seeded by --seed)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --shuffle")
    args = parser.parse_args(argv)
    if args.min_margin is None:
        args.min_margin = DEFAULT_MIN_MARGIN.get(args.format)
    elif args.format not in DEFAULT_MIN_MARGIN:
        parser.error(f"--min-margin applies to {' and '.join(DEFAULT_MIN_MARGIN)} only "
                     "(they have absolute scores)")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        report = convert(args)
    # --strict, a broken JSON list or file, a missing file: one clear line
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    print(report.summary(args.format, args.input, args.output))


if __name__ == "__main__":
    main()
