"""Tests of data/: schemas, converters, judge templates."""
import json
import subprocess
import sys

import pytest

from data import convert as convert_module
from data.judge import DIALOGUE_TEMPLATE, JUDGE_TEMPLATES, judge_sft_records, render_judge_prompt
from data.schema import load_records, render_context, validate
from tests.helpers import ROOT

# ----------------------------------------------------------------------------------------------
# Samples in the published formats


HH_RECORDS = [
    # 0: multi-turn, shared prefix, "Human:" mid-text without the blank line (not a turn boundary)
    {"chosen": "\n\nHuman: What should I name my cat?\n\nAssistant: How about Whiskers?\n\nHuman: "
               "Something more "
               "unusual. My friend said Human: is a funny name.\n\nAssistant: Maybe Tiberius or "
               "Pixel.",
     "rejected": "\n\nHuman: What should I name my cat?\n\nAssistant: How about "
                 "Whiskers?\n\nHuman: Something more "
                 "unusual. My friend said Human: is a funny name.\n\nAssistant: Cat."},
    # 1: non-ASCII text (incl. U+2028, a line separator that str.splitlines would split on), single
    # turn
    {"chosen": "\n\nHuman: ¿Cómo se dice «gracias» en japonés?\n\nAssistant: Se dice «ありがとう» "
               "(arigatō).\u2028",
     "rejected": "\n\nHuman: ¿Cómo se dice «gracias» en japonés?\n\nAssistant: No lo sé."},
    # 2: empty final response
    {"chosen": "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road?",
     "rejected": "\n\nHuman: Tell me a joke.\n\nAssistant:"},
    # 3: identical chosen / rejected
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!"},
    # 4: prefixes differ
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!",
     "rejected": "\n\nHuman: Hey\n\nAssistant: Yo."},
]

UF_BINARIZED = [
    {"prompt": "Write a haiku about rain.", "prompt_id": "abc123",
     "chosen": [{"content": "Write a haiku about rain.", "role": "user"},
                {"content": " Soft rain on the roof\nwhispers to the sleeping town\npuddles hold "
                            "the sky", "role": "assistant"}],
     "rejected": [{"content": "Write a haiku about rain.", "role": "user"},
                  {"content": "Rain is wet.", "role": "assistant"}],
     "messages": [{"content": "Write a haiku about rain.", "role": "user"},
                  {"content": "Soft rain on the roof", "role": "assistant"}],
     "score_chosen": 8.5, "score_rejected": 4.0},
    # a tie: dropped
    {"prompt": "Say hi.", "prompt_id": "t1",
     "chosen": [{"content": "Say hi.", "role": "user"}, {"content": "Hi!", "role": "assistant"}],
     "rejected": [{"content": "Say hi.", "role": "user"},
                  {"content": "Hello!", "role": "assistant"}],
     "messages": [{"content": "Say hi.", "role": "user"}, {"content": "Hi!", "role": "assistant"}],
     "score_chosen": 7.0, "score_rejected": 7.0},
]


def uf_completion(model, response, fine, overall):
    return {"annotations": {"helpfulness": {"Rating": "4", "Rationale": "..."}}, "critique": "...",
            "custom_system_prompt": "You are a helpful assistant.", "fine-grained_score": fine,
            "model": model,
            "overall_score": overall, "principle": "helpfulness", "response": response}


UF_RAW = [{"source": "evol_instruct", "instruction": "Name a prime number greater than 10.",
           "models": ["a", "b", "c", "d"],
           "completions": [uf_completion("a", "11", 5.0, 9.0),
                           uf_completion("b", "13 is prime.", 4.5, 8.0),
                           uf_completion("c", "12", 1.25, 2.0),
                           uf_completion("d", "Eleven", 5.0, 8.5)],
           "correct_answers": ["None"], "incorrect_answers": ["None"]}]


def shp_record(post_id, a, b, label, score_a, score_b, with_ratio=True):
    record = {"post_id": post_id, "domain": "askscience_train", "upvote_ratio": 0.99,
              "history": f"Post {post_id}: why is the sky blue?", "c_root_id_A": "ca",
              "c_root_id_B": "cb",
              "created_at_utc_A": 1, "created_at_utc_B": 2, "score_A": score_a, "score_B": score_b,
              "human_ref_A": a, "human_ref_B": b, "labels": label, "seconds_difference": 1.0}
    if with_ratio:
        record["score_ratio"] = max(score_a, score_b) / min(score_a, score_b)
    return record


SHP_RECORDS = (
    # post p1: 7 candidate pairs, ratios 3..9 → only the 5 highest (5..9) kept
    [shp_record("p1", f"answer A{k}", f"answer B{k}", 1, 3 + k, 1) for k in range(7)]
    # post p2: ratio 1.5 (dropped), label 0 with ratio computed from scores (kept), label
    # disagreeing with scores
    + [shp_record("p2", "meh", "fine", 1, 3, 2),
       shp_record("p2", "short", "Rayleigh scattering of sunlight.", 0, 2, 10, with_ratio=False),
       shp_record("p2", "x", "y", 1, 2, 10)])

HELPSTEER_RECORDS = [
    {"prompt": "Explain gravity.", "response": "Mass attracts mass.", "helpfulness": 3,
     "correctness": 3,
     "coherence": 4, "complexity": 1, "verbosity": 1},
    {"prompt": "Explain gravity.", "response": "Gravity is a force.", "helpfulness": 3,
     "correctness": 4,
     "coherence": 4, "complexity": 1, "verbosity": 1},
    {"prompt": "Explain gravity.", "response": "Idk.", "helpfulness": 0, "correctness": 1,
     "coherence": 2,
     "complexity": 0, "verbosity": 0},
    # HelpSteer2 multi-turn prompt
    {"prompt": "Hi there\n<extra_id_1>Assistant\nHello! How can I help?\n<extra_id_1>User\nList "
               "two colors.",
     "response": "Red and blue.", "helpfulness": 4, "correctness": 4, "coherence": 4,
     "complexity": 1, "verbosity": 1},
    {"prompt": "Hi there\n<extra_id_1>Assistant\nHello! How can I help?\n<extra_id_1>User\nList "
               "two colors.",
     "response": "Red.", "helpfulness": 2, "correctness": 2, "coherence": 4, "complexity": 1,
     "verbosity": 0},
]

TLDR_RECORDS = [
    {"info": {"id": "t3_abc",
              "post": "I adopted a dog last week and he keeps chewing my shoes. What do I do?  ",
              "title": "Dog chews shoes", "subreddit": "dogs", "site": None, "article": None},
     "split": "train",
     "summaries": [{"text": " New dog chews shoes, need advice.", "policy": "sup2", "note": None},
                                     {"text": " dog", "policy": "ref", "note": None}],
     "choice": 0, "worker": "w1", "batch": "batch3", "extra": {"confidence": 8}},
    {"info": {"id": "t3_def", "post": "My roommate never cleans.", "title": "Roommate",
              "subreddit": "relationships",
              "site": None, "article": None},
     "split": "train", "summaries": [{"text": "roommate", "policy": "a", "note": None},
                                     {"text": "Roommate never cleans; how to talk to them?",
                                      "policy": "b", "note": None}],
     "choice": 1, "worker": "w2", "batch": "batch3", "extra": {"confidence": 9}},
    # a CNN/DM record from the validation split: no post
    {"info": {"id": "cnn-1", "post": None, "title": "News", "subreddit": None, "site": "cnn",
              "article": "Breaking..."},
     "split": "valid2",
     "summaries": [{"text": "a", "policy": "a", "note": None},
                   {"text": "b", "policy": "b", "note": None}],
     "choice": 0, "worker": "w3", "batch": "batch9", "extra": {}},
]


def write_jsonl_lines(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


def run_convert(tmp_path, fmt, records, *flags, name="in.jsonl", as_list=False):
    """Run the converter in-process; returns (output records, report, printed summary)."""
    path = tmp_path / name
    if as_list:
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    else:
        write_jsonl_lines(path, records)
    out = tmp_path / f"out_{fmt}.jsonl"
    args = convert_module.parse_args(["--format", fmt, "--input", str(path), "--output", str(out),
                                      *flags])
    report = convert_module.convert(args)
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()], report


# ----------------------------------------------------------------------------------------------
# Converters


def test_data_hh_rlhf(tmp_path):
    pairs, report = run_convert(tmp_path, "hh-rlhf", HH_RECORDS)
    assert len(pairs) == 2 and report.read == 5
    first = pairs[0]
    assert first["prompt"] == [
        {"role": "user", "content": "What should I name my cat?"},
        {"role": "assistant", "content": "How about Whiskers?"},
        {"role": "user",
         "content": "Something more unusual. My friend said Human: is a funny name."}]
    # leading space stripped
    assert first["chosen"] == "Maybe Tiberius or Pixel." and first["rejected"] == "Cat."
    assert first["source"] == "hh-rlhf"
    # non-ASCII kept
    assert pairs[1]["chosen"] == "Se dice «ありがとう» (arigatō)."
    # as UTF-8, not \\u escapes
    assert "ありがとう" in (tmp_path / "out_hh-rlhf.jsonl").read_text(encoding="utf-8")
    assert report.filtered == {"empty response": 1, "identical responses": 1}
    assert (sum(report.malformed.values()) == 1
            and "prompts of chosen and rejected differ" in next(iter(report.malformed)))
    # line numbers in examples
    assert any(e.startswith(f"{tmp_path / 'in.jsonl'}:5:") for e in report.examples)
    load_records(tmp_path / "out_hh-rlhf.jsonl", "pairs")


def test_data_hh_rlhf_strict_names_file_and_line(tmp_path):
    with pytest.raises(ValueError, match=r"in\.jsonl:5: prompts of chosen and rejected differ"):
        run_convert(tmp_path, "hh-rlhf", HH_RECORDS, "--strict")
    # filters are not errors under --strict: records 0-3 alone convert fine
    pairs, _ = run_convert(tmp_path, "hh-rlhf", HH_RECORDS[:4], "--strict")
    assert len(pairs) == 2


def test_data_bad_json_line_is_counted_or_strict_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(HH_RECORDS[0]) + "\n\n{not json\n[1, 2]\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    report = convert_module.convert(convert_module.parse_args(["--format", "hh-rlhf", "--input",
                                                               str(path), "--output", str(out)]))
    assert report.read == 3 and report.written == 1 and sum(report.malformed.values()) == 2
    assert any(e.startswith(f"{path}:3: not valid JSON") for e in report.examples)
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        convert_module.convert(convert_module.parse_args(["--format", "hh-rlhf", "--input",
                                                          str(path), "--output", str(out),
                                                          "--strict"]))


def test_data_json_list_input_same_as_jsonl(tmp_path):
    from_jsonl, _ = run_convert(tmp_path, "hh-rlhf", HH_RECORDS)
    from_list, report = run_convert(tmp_path, "hh-rlhf", HH_RECORDS, name="in.json", as_list=True)
    assert from_list == from_jsonl
    assert any("(item 5)" in e for e in report.examples)


def test_data_ultrafeedback_binarized_and_raw(tmp_path):
    pairs, report = run_convert(tmp_path, "ultrafeedback", UF_BINARIZED + UF_RAW)
    binarized = pairs[0]
    assert binarized["prompt"] == [{"role": "user", "content": "Write a haiku about rain."}]
    assert binarized["chosen"].startswith("Soft rain") and binarized["rejected"] == "Rain is wet."
    assert binarized["margin"] == 4.5 and binarized["source"] == "ultrafeedback"
    # raw, fine-grained scores a=5, b=4.5, c=1.25, d=5: (a,d) tied; margins ≥ 1: (a,c), (b,c), (d,c)
    raw = [(p["chosen"], p["rejected"], p["margin"]) for p in pairs[1:]]
    assert raw == [("11", "12", 3.75), ("13 is prime.", "12", 3.25), ("Eleven", "12", 3.75)]
    assert report.filtered["tied scores"] == 2                     # one binarized tie, one raw tie
    assert report.filtered["score margin below --min-margin 1"] == 2  # (a,b) and (b,d): 0.5
    pairs, _ = run_convert(tmp_path, "ultrafeedback", UF_RAW, "--min-margin", "0")
    assert len(pairs) == 5                                          # every non-tied pair
    pairs, _ = run_convert(tmp_path, "ultrafeedback", UF_RAW, "--ultrafeedback-score",
                           "overall_score")
    assert [(p["chosen"], p["rejected"], p["margin"]) for p in pairs] == [
        ("11", "13 is prime.", 1.0), ("11", "12", 7.0), ("13 is prime.", "12",
                                                         6.0), ("Eleven", "12", 6.5)]


def test_data_ultrafeedback_malformed_records(tmp_path):
    record = json.loads(json.dumps(UF_RAW[0]))
    del record["completions"][2]["fine-grained_score"]
    with pytest.raises(ValueError,
                       match=r"in\.jsonl:1: completions\[2\]: missing field 'fine-grained_score'"):
        run_convert(tmp_path, "ultrafeedback", [record], "--strict")
    bad_role = json.loads(json.dumps(UF_BINARIZED[0]))
    bad_role["rejected"][0]["role"] = "bot"
    with pytest.raises(ValueError,
                       match=r"in\.jsonl:2: field 'rejected'\[0\]\.role: expected one of "
                             r"system/user/assistant, got 'bot'"):
        run_convert(tmp_path, "ultrafeedback", [UF_BINARIZED[0], bad_role], "--strict")
    pairs, report = run_convert(tmp_path, "ultrafeedback", [UF_BINARIZED[0], bad_role, {"foo": 1}])
    assert len(pairs) == 1 and sum(report.malformed.values()) == 2 and report.read == 3


def test_data_shp_ratio_filter_and_per_post_cap(tmp_path):
    pairs, report = run_convert(tmp_path, "shp", SHP_RECORDS)
    p1 = [p for p in pairs if p["prompt"][0]["content"].startswith("Post p1")]
    # ratios 5..9, input order kept
    assert [p["chosen"] for p in p1] == [f"answer A{k}" for k in range(2, 7)]
    p2 = [p for p in pairs if p["prompt"][0]["content"].startswith("Post p2")]
    # labels 0 = B
    assert [(p["chosen"], p["rejected"])
            for p in p2] == [("Rayleigh scattering of sunlight.", "short")]
    assert report.filtered["score ratio <= 2"] == 1
    assert report.filtered["label disagrees with scores"] == 1
    assert report.filtered["more than 5 pairs for the post (lowest ratios dropped)"] == 2
    assert all(p["source"] == "shp" for p in pairs)


def test_data_helpsteer_groups_and_margins(tmp_path):
    pairs, report = run_convert(tmp_path, "helpsteer", HELPSTEER_RECORDS)
    assert [(p["chosen"], p["rejected"], p["margin"]) for p in pairs] == [
        ("Mass attracts mass.", "Idk.", 3.0), ("Gravity is a force.", "Idk.",
                                               3.0), ("Red and blue.", "Red.", 2.0)]
    assert report.filtered["tied scores"] == 1
    assert pairs[2]["prompt"] == [{"role": "user", "content": "Hi there"},
                                  {"role": "assistant", "content": "Hello! How can I help?"},
                                  {"role": "user", "content": "List two colors."}]
    pairs, _ = run_convert(tmp_path, "helpsteer", HELPSTEER_RECORDS, "--min-margin", "2.5")
    assert len(pairs) == 2
    pairs, _ = run_convert(tmp_path, "helpsteer", HELPSTEER_RECORDS, "--helpsteer-attribute",
                           "mean", "--min-margin", "0.3")
    assert ("Gravity is a force.", "Mass attracts mass.") in [(p["chosen"], p["rejected"])
                                                              for p in pairs]


def test_data_tldr(tmp_path):
    pairs, report = run_convert(tmp_path, "tldr", TLDR_RECORDS)
    assert pairs[0]["prompt"] == [{"role": "user",
                                   "content": "SUBREDDIT: r/dogs\nTITLE: Dog chews shoes\nPOST: I "
                                              "adopted a dog last week and he keeps chewing my "
                                              "shoes. What do I do?\nTL;DR:"}]
    assert (pairs[0]["chosen"] == "New dog chews shoes, need advice."
            and pairs[0]["rejected"] == "dog")
    assert (pairs[1]["chosen"] == "Roommate never cleans; how to talk to them?"
            and pairs[1]["rejected"] == "roommate")
    assert report.filtered == {"not a reddit post (CNN/DM article)": 1} and len(pairs) == 2


def test_data_prompts_from_every_format(tmp_path):
    sft = [{"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}]},
           {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hey"}]}]
    mixed = (HH_RECORDS + UF_BINARIZED + UF_RAW + SHP_RECORDS + HELPSTEER_RECORDS + TLDR_RECORDS
             + sft)
    prompts, report = run_convert(tmp_path, "prompts", mixed)
    texts = [p["messages"][-1]["content"] for p in prompts]
    # deduplicated
    assert len(texts) == len(set(json.dumps(p["messages"]) for p in prompts))
    assert texts[:3] == ["Something more unusual. My friend said Human: is a funny name.",
                         "¿Cómo se dice «gracias» en japonés?", "Tell me a joke."]
    assert ("Write a haiku about rain." in texts and "Post p1: why is the sky blue?" in texts
            and "List two colors." in texts)
    assert prompts[-1]["messages"] == [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Hi"}]
    # HH's "Hi" = the last sft's
    assert [{"role": "user", "content": "Hi"}] in [p["messages"] for p in prompts]
    assert report.filtered["duplicate prompt"] > 0
    # unique ids, valid
    load_records(tmp_path / "out_prompts.jsonl", "prompts")
    again, _ = run_convert(tmp_path, "prompts", list(reversed(mixed)))
    # ids = content hash
    assert {p["id"]: p["messages"] for p in again} == {p["id"]: p["messages"] for p in prompts}


# ----------------------------------------------------------------------------------------------
# Judge (preference augmentation)


def test_data_judge_template_exact_and_both_orders(tmp_path):
    pairs_path = write_jsonl_lines(tmp_path / "pairs.jsonl", [
        {"prompt": [{"role": "user", "content": "sort 3 1 2"}], "chosen": "1 2 3",
         "rejected": "3 2 1"},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "",
         "p": 0.9},
        # rejected preferred
        {"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b", "p": 0.2},
        # no preference
        {"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b", "p": 0.5},
        {"prompt": [{"role": "user", "content": "x"}], "chosen": "same", "rejected": "same"}])
    out = tmp_path / "judge.jsonl"
    report = convert_module.convert(convert_module.parse_args(["--format", "judge", "--input",
                                                               str(pairs_path), "--output",
                                                               str(out)]))
    records = load_records(out, "sft")
    assert len(records) == 6 and report.filtered == {"no preference (p = 0.5)": 1,
                                                     "identical responses": 1}
    expected = ("You are an expert rater of helpful and honest assistant responses. Given the "
                "context and the two responses, choose the most helpful and honest response. "
                "Context: sort 3 1 2\n\nRESPONSE A:1 2 3\n\nRESPONSE B:3 2 1\n\n"
                "Which response is better? RESPONSE")
    assert records[0]["messages"] == [{"role": "user", "content": expected},
                                      {"role": "assistant", "content": "A"}]
    assert records[1]["messages"][0]["content"] == (expected.replace("A:1 2 3", "A:3 2 1")
                                                    .replace("B:3 2 1", "B:1 2 3"))
    assert records[1]["messages"][1]["content"] == "B"
    assert records[3]["messages"][0]["content"].endswith("RESPONSE A:\n\nRESPONSE B:Hello!\n\n"
                                                         "Which response is better? RESPONSE")
    # empty response renders fine
    assert records[3]["messages"][1]["content"] == "B"
    assert ("RESPONSE A:b\n\n" in records[4]["messages"][0]["content"]
            and records[4]["messages"][1]["content"] == "A")


def paper_figure(name):
    """A judge instruction as printed in paper 2 (tests/paper2_judge_figures.txt), with its
    placeholders written as our templates write them and the "<A/B>" answer slot cut."""
    text = (ROOT / "tests" / "paper2_judge_figures.txt").read_text(encoding="utf-8")
    figure = text.split(f"=== {name} ===\n")[1].split("\n===")[0].rstrip("\n")
    for old, new in (("<Prompt>", "{context}"), ("<Response A>", "{response_a}"),
                     ("<Response B>", "{response_b}"),
                     ("<Summary A>", "{response_a}"), ("<Summary B>", "{response_b}"),
                     (" <A/B>", "")):
        figure = figure.replace(old, new)
    return figure


def test_data_judge_templates_match_paper_and_render_safely():
    assert JUDGE_TEMPLATES["dialogue"] == paper_figure("Figure 6 (dialogue)")
    assert JUDGE_TEMPLATES["summarization"] == paper_figure("Figure 7 (summarization)")
    seed = next((ROOT.parent / "shared" / "seeds").glob("002_*[0-9a-f].txt"), None)
    if seed is not None:  # beside a checkout that has the papers: the excerpt is the paper's text
        paper = seed.read_text(encoding="utf-8")
        for name in ("Figure 6 (dialogue)", "Figure 7 (summarization)"):
            excerpt = ((ROOT / "tests" / "paper2_judge_figures.txt").read_text(encoding="utf-8")
                       .split(f"=== {name} ===\n")[1])
            assert excerpt.split("\n===")[0].rstrip("\n") in paper
    # braces and placeholder names inside the texts are not substituted again
    text = render_judge_prompt([{"role": "user", "content": "f({x})"}], "{response_b}", "{}",
                               template="dialogue")
    assert "Context: f({x})\n\nRESPONSE A:{response_b}\n\nRESPONSE B:{}\n\n" in text
    # multi-turn contexts render as a Human/Assistant transcript; a template can be given as text
    context = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
               {"role": "user", "content": "Bye"}]
    assert render_context(context) == "Human: Hi\n\nAssistant: Hello\n\nHuman: Bye"
    assert render_judge_prompt(context, "a", "b",
                               template="[{context}|{response_a}|{response_b}]") == \
        "[Human: Hi\n\nAssistant: Hello\n\nHuman: Bye|a|b]"
    with pytest.raises(ValueError, match="judge template"):
        render_judge_prompt(context, "a", "b", template="no placeholders")
    summary = judge_sft_records({"prompt": [{"role": "user", "content": "POST"}], "chosen": "c",
                                 "rejected": "r"}, "summarization")
    assert summary[0]["messages"][0]["content"].endswith("Text: POST\n\nSUMMARY A:c\n\nSUMMARY "
                                                         "B:r\n\nWhich summary is better? SUMMARY")
    assert DIALOGUE_TEMPLATE is JUDGE_TEMPLATES["dialogue"]


# ----------------------------------------------------------------------------------------------
# Validator


@pytest.mark.parametrize("kind,record,message", [
    ("prompts",
     {"id": "a",
      "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                                         {"role": "bot", "content": "z"}]},
     "field 'messages'[2].role: expected one of system/user/assistant, got 'bot'"),
    ("prompts",
     {"id": "a",
      "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "field 'messages': must end with a user turn"),
    ("prompts", {"messages": [{"role": "user", "content": "x"}]}, "missing field 'id'"),
    ("sft", {"messages": [{"role": "user", "content": "x"}]}, "at least one assistant turn"),
    ("sft", {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
     "field 'messages'[0].content: expected a string, got int"),
    ("sft", {"text": ""}, "field 'text': expected a non-empty string"),
    ("sft", {"text": 3}, "field 'text': expected a string, got int"),
    ("pairs",
     {"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b", "p": 1.5},
     "field 'p'"),
    ("pairs", {"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": None},
     "field 'rejected': expected a string"),
    ("pairs",
     {"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b", "margin": True},
     "field 'margin'"),
    ("samples",
     {"id": "s", "prompt": [{"role": "user", "content": "x"}], "responses": ["a", "b"],
      "num_tokens": [1],
                 "finish_reasons": ["stop", "stop"]}, "field 'num_tokens': expected 2 items"),
    ("samples",
     {"id": "s", "prompt": [{"role": "user", "content": "x"}], "responses": ["a"],
      "num_tokens": [1],
                 "finish_reasons": ["eos"]},
     "field 'finish_reasons'[0]: expected one of stop/length, got 'eos'"),
    ("samples",
     {"id": "s", "prompt": [{"role": "user", "content": "x"}], "responses": [], "num_tokens": [],
                 "finish_reasons": []}, "field 'responses': expected at least one item"),
    ("rewards",
     {"id": "s", "prompt": [{"role": "user", "content": "x"}], "responses": ["a"],
      "num_tokens": [1],
                 "finish_reasons": ["length"], "rewards": [float("nan")]},
     "field 'rewards'[0]: expected a finite number"),
    ("samples", {"id": "s", "prompt": [{"role": "user", "content": "x"}], "responses": ["a", "b"],
                 "response_ids": [[3, 4]]}, "field 'response_ids': expected 2 items"),
    ("samples", {"id": "s", "prompt": [{"role": "user", "content": "x"}], "responses": ["a"],
                 "response_ids": [[]]},
     "field 'response_ids'[0]: expected a non-empty list of token ids"),
    ("pairs",
     {"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b",
      "chosen_ids": [1, -2]},
     "field 'chosen_ids': expected a non-empty list of token ids"),
    ("pairs",
     {"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b",
      "rejected_ids": "12"},
     "field 'rejected_ids': expected a non-empty list of token ids"),
])
def test_data_validator_names_file_line_field(tmp_path, kind, record, message):
    good = {"sft": {"messages": [{"role": "user", "content": "x"},
                                 {"role": "assistant", "content": "y"}]},
            "prompts": {"id": "ok", "messages": [{"role": "user", "content": "x"}]},
            "pairs": {"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b",
                      "chosen_ids": [7, 2], "rejected_ids": [8]},
            "samples": {"id": "ok", "prompt": [{"role": "user", "content": "x"}],
                        "responses": ["a"], "num_tokens": [2],
                        "finish_reasons": ["stop"], "logprobs": [-1.5], "response_ids": [[7, 2]]},
            "rewards": {"id": "ok", "prompt": [{"role": "user", "content": "x"}],
                        "responses": ["a"], "num_tokens": [2],
                        "finish_reasons": ["stop"], "rewards": [0.5], "extra": "kept"}}[kind]
    path = tmp_path / f"{kind}.jsonl"
    # line 1 good, line 2 blank, line 3 broken: the message names line 3
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as error:
        load_records(path, kind)
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)
    assert validate([good], kind, "x.jsonl") == [good]


def test_data_validator_duplicate_prompt_ids():
    records = [{"id": "a", "messages": [{"role": "user", "content": "x"}]},
               {"id": "a", "messages": [{"role": "user", "content": "y"}]}]
    with pytest.raises(ValueError,
                       match=r"prompts\.jsonl:2: field 'id': duplicate id 'a' \(first at line 1\)"):
        validate(records, "prompts", "prompts.jsonl")


# ----------------------------------------------------------------------------------------------
# Determinism and the command line


def test_data_convert_deterministic_and_cli(tmp_path, capsys):
    source = write_jsonl_lines(tmp_path / "uf.jsonl", UF_BINARIZED + UF_RAW)
    outputs = []
    for k in range(2):
        out, judge = tmp_path / f"pairs{k}.jsonl", tmp_path / f"judge{k}.jsonl"
        convert_module.main(["--format", "ultrafeedback", "--input", str(source), "--output",
                             str(out), "--min-margin", "0"])
        convert_module.main(["--format", "judge", "--input", str(out), "--output", str(judge),
                             "--shuffle", "--seed", "3"])
        outputs.append((out.read_bytes(), judge.read_bytes()))
    assert outputs[0] == outputs[1]
    printed = capsys.readouterr().out
    assert "judge: read 6 records" in printed and "wrote 12" in printed and "tied scores" in printed
    with pytest.raises(SystemExit, match=r"hh\.jsonl:5: prompts of chosen and rejected differ"):
        convert_module.main(["--format", "hh-rlhf", "--input",
                             str(write_jsonl_lines(tmp_path / "hh.jsonl", HH_RECORDS)),
                             "--output", str(tmp_path / "x.jsonl"), "--strict"])
    assert not (tmp_path / "x.jsonl").exists()
    # the script itself, as users run it: python -m data.convert from the repo root
    result = subprocess.run([sys.executable, "-m", "data.convert", "--format", "prompts",
                             "--input", str(source), "--output", str(tmp_path / "prompts.jsonl")],
                            check=True, capture_output=True, text=True, cwd=ROOT)
    assert ("prompts: read 3 records" in result.stdout
            and len(load_records(tmp_path / "prompts.jsonl", "prompts")) == 3)
