"""Tests of data/ from the interop review: optional sample fields, one-line errors for files that
are not UTF-8, missing or empty, TL;DR posts without a title, the judge labels' one definition, and
the data scripts run as modules (`python -m data.convert`) without installing anything."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data import convert as convert_module
from data.judge import JUDGE_LABELS, judge_sft_records
from data.schema import load_records

ROOT = Path(__file__).resolve().parent.parent
USER_X = [{"role": "user", "content": "x"}]


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# samples / rewards: only id, prompt and responses are required


def test_data_samples_from_other_engines_need_no_token_counts(tmp_path):
    # what a vLLM / TRL export can give
    bare = {"id": "s", "prompt": USER_X, "responses": ["a", "b"]}
    assert load_records(write_lines(tmp_path / "samples.jsonl", [bare]), "samples") == [bare]
    scored = {**bare, "rewards": [0.5, -1.0]}
    assert load_records(write_lines(tmp_path / "rewards.jsonl", [scored]), "rewards") == [scored]


@pytest.mark.parametrize("name,value,message", [
    ("num_tokens", [3], "field 'num_tokens': expected 2 items (one per response), got 1"),
    ("num_tokens", [3, -1], "field 'num_tokens'[1]: expected an integer ≥ 0, got -1"),
    ("finish_reasons", ["stop", "eos"],
     "field 'finish_reasons'[1]: expected one of stop/length, got 'eos'"),
    ("logprobs", [-1.0], "field 'logprobs': expected 2 items (one per response), got 1"),
])
def test_data_optional_sample_fields_checked_when_present(tmp_path, name, value, message):
    good = {"id": "ok", "prompt": USER_X, "responses": ["a", "b"]}
    path = write_lines(tmp_path / "samples.jsonl", [good, {**good, "id": "bad", name: value}])
    with pytest.raises(ValueError) as error:
        load_records(path, "samples")
    assert str(error.value) == f"{path}:2: {message}"
    # the rewards kind checks them too
    with pytest.raises(ValueError, match=rf":2: field '{name}'"):
        load_records(write_lines(tmp_path / "rewards.jsonl", [{**good, "rewards": [0, 1]},
                                                              {**good, name: value,
                                                               "rewards": [0, 1]}]), "rewards")


# ----------------------------------------------------------------------------------------------
# Files that cannot be read as records: one line naming the file (and the line)


def test_data_not_utf8_names_file_line_column(tmp_path):
    path = tmp_path / "x.jsonl"
    good = json.dumps({"id": "a", "messages": USER_X}).encode()
    path.write_bytes(good + b"\n\n" + b'{"id":\xff"b"}\n')  # line 3, the byte 0xff at column 7
    with pytest.raises(ValueError) as error:
        load_records(path, "prompts")
    assert str(error.value) == f"{path}:3: not valid UTF-8 (byte 0xff at column 7)"
    # no UnicodeDecodeError chained
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_data_not_json_and_not_object_name_file_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a", "messages": [{"role": "user", "content": "x"}]}\n{"id": \n',
                    encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: not valid JSON \("):
        load_records(path, "prompts")
    path.write_text("\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(ValueError,
                       match=rf"^{re.escape(str(path))}:2: expected a JSON object, got list$"):
        load_records(path, "prompts")


def test_data_missing_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as error:
        load_records(path, "prompts")
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_data_empty_file_is_an_error_unless_allowed(tmp_path, text):
    path = tmp_path / "x.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as error:
        load_records(path, "pairs")
    assert str(error.value) == f"{path}: no records (the file is empty)"
    assert load_records(path, "pairs", allow_empty=True) == []


# ----------------------------------------------------------------------------------------------
# Converters


def test_data_tldr_post_without_title_is_kept(tmp_path):
    record = {"info": {"id": "t3_x", "post": " My cat ignores me. ", "title": None,
                       "subreddit": "cats"},
              "summaries": [{"text": "cat ignores me"}, {"text": " Cat ignores owner; why? "}],
              "choice": 1}
    source, out = write_lines(tmp_path / "tldr.jsonl", [record]), tmp_path / "pairs.jsonl"
    report = convert_module.convert(convert_module.parse_args(["--format", "tldr", "--input",
                                                               str(source),
                                                               "--output", str(out), "--strict"]))
    assert report.written == 1 and not report.malformed and not report.filtered
    [pair] = load_records(out, "pairs")
    assert pair["prompt"] == [{"role": "user",
                               "content": "SUBREDDIT: r/cats\nPOST: My cat ignores me.\nTL;DR:"}]
    assert (pair["chosen"], pair["rejected"]) == ("Cat ignores owner; why?", "cat ignores me")


def test_data_convert_not_utf8_or_missing_input_is_one_line(tmp_path):
    path, missing, out = tmp_path / "in.jsonl", tmp_path / "nope.jsonl", tmp_path / "out.jsonl"
    path.write_bytes(b'{"history": "a"}\n{"history": "\xfe"}\n')
    with pytest.raises(SystemExit,
                       match=rf"^error: {re.escape(str(path))}:2: not valid UTF-8 \(byte 0xfe at "
                             r"column 14\)$"):
        convert_module.main(["--format", "prompts", "--input", str(path), "--output", str(out)])
    with pytest.raises(SystemExit,
                       match=rf"^error: .*No such file or directory: '{re.escape(str(missing))}'$"):
        convert_module.main(["--format", "prompts", "--input", str(missing), "--output", str(out)])


def test_data_judge_labels_are_the_sft_labels():
    pair = {"prompt": USER_X, "chosen": "good", "rejected": "bad"}
    assert tuple(r["messages"][1]["content"]
                 for r in judge_sft_records(pair)) == JUDGE_LABELS == ("A", "B")


# ----------------------------------------------------------------------------------------------
# The data scripts run as modules from the repo root, with nothing installed


@pytest.mark.parametrize("module", ["data.task", "data.convert", "data.smollm2"])
def test_data_scripts_run_as_modules(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m {module} ")


def test_data_convert_module_end_to_end(tmp_path):
    source = write_lines(tmp_path / "in.jsonl",
                         [{"history": "What is 2 + 2?"}, {"history": "What is 2 + 2?"}])
    result = subprocess.run([sys.executable, "-m", "data.convert", "--format", "prompts", "--input",
                             str(source),
                             "--output", str(tmp_path / "prompts.jsonl")], cwd=ROOT,
                            capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert ("prompts: read 2 records" in result.stdout
            and len(load_records(tmp_path / "prompts.jsonl", "prompts")) == 1)
