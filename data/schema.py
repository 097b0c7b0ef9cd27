"""The JSONL schemas every stage reads and writes, and the validator each stage runs on its inputs.

    from data.schema import load_records, validate, render_context
    prompts = load_records("data/builtin/prompts_iter1.jsonl", "prompts")  # read + validate
    validate(records, "pairs", "pairs.jsonl")                              # records already loaded

One JSON object per line. Extra fields are allowed everywhere (stages pass them through); the fields
below are required unless marked optional. A "message" is {"role": "system"|"user"|"assistant",
"content": str}; "messages" is a non-empty list of them. data/README.md has the full description.

    sft       messages (at least one assistant turn); or, for pretraining, text (a non-empty str):
              plain text, no chat template, the loss on every token
    prompts   id (str, unique in the file), messages (ending with a user turn)
    pairs     prompt (messages ending with a user turn), chosen (str), rejected (str),
              optional p (float in [0, 1] = P(chosen ≻ rejected), default 1),
              margin (finite float), source (str), id (str), chosen_ids and rejected_ids
              (non-empty lists of ints ≥ 0: the responses' token ids as sampled, which training
              scores instead of re-encoding the texts)
    samples   id (str), prompt (messages ending with a user turn), responses (list of n ≥ 1 str),
              optional response_ids (n non-empty lists of ints ≥ 0: each response's token ids as
              sampled, the stop token included when one was), num_tokens (n ints ≥ 0),
              finish_reasons (n of "stop"|"length"), logprobs (n floats: each response's summed
              log-prob), columns (an object: the prompt record's other fields, which a verifier
              reads, rewards.verifier_rewards)
    rewards   a samples record plus rewards (n finite floats)

Each kind requires only what its readers need: a scorer needs a prompt and responses, so samples
written by other engines (vLLM, TRL) are valid without generate.py's token counts and finish
reasons. An optional field that is present is checked like a required one.

A broken record raises InputError (a ValueError) naming the file, the line and the field, e.g.
    prompts.jsonl:17: field 'messages'[2].role: expected one of system/user/assistant, got 'bot'
and so does a file that is not UTF-8 or JSON at some line, or that holds no records at all. A record
missing a required field is shown what a record of its kind looks like (EXAMPLES).
"""
import json
import math

from runs import InputError, read_jsonl_numbered

ROLES = ("system", "user", "assistant")
FINISH_REASONS = ("stop", "length")
KINDS = ("sft", "prompts", "pairs", "samples", "rewards")
# The smallest valid record of each kind (the required fields only), quoted by the missing-field
# error.
EXAMPLES = {
    "sft": {"messages": [{"role": "user", "content": "..."},
                         {"role": "assistant", "content": "..."}]},
    "prompts": {"id": "p1", "messages": [{"role": "user", "content": "..."}]},
    "pairs": {"prompt": [{"role": "user", "content": "..."}], "chosen": "...", "rejected": "..."},
    "samples": {"id": "p1", "prompt": [{"role": "user", "content": "..."}],
                "responses": ["...", "..."]},
    "rewards": {"id": "p1", "prompt": [{"role": "user", "content": "..."}],
                "responses": ["...", "..."], "rewards": [0.5, -1.0]},
}


class _Invalid(Exception):
    """Raised by the checks below with the field path and the problem; validate() adds file:line."""

    def __init__(self, field, problem):
        super().__init__(f"field {field}: {problem}" if field else problem)


class _Missing(_Invalid):
    """A required field is absent: the record is probably of another kind or format."""


# ----------------------------------------------------------------------------------------------
# Field checks. Each takes the record, the field name and a human-readable field path for messages.


def _describe(value):
    """A short repr of a bad value for an error message (long strings and lists are cut)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value):
    # JSON true/false load as Python bools, which are ints; a bool is never a valid number here.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(record, name):
    if name not in record:
        raise _Missing("", f"missing field '{name}'")
    return record[name]


def _check_string(value, field):
    if not isinstance(value, str):
        raise _Invalid(field, f"expected a string, got {type(value).__name__} {_describe(value)}")


def _check_messages(value, field, ends_with_user):
    if not isinstance(value, list) or not value:
        raise _Invalid(field, f"expected a non-empty list of messages, got {_describe(value)}")
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise _Invalid(where,
                           f"expected an object with role and content, got {_describe(message)}")
        if "role" not in message:
            raise _Invalid(where, "missing key 'role'")
        if message["role"] not in ROLES:
            raise _Invalid(f"{where}.role",
                           f"expected one of {'/'.join(ROLES)}, got {_describe(message['role'])}")
        if "content" not in message:
            raise _Invalid(where, "missing key 'content'")
        _check_string(message["content"], f"{where}.content")
    if ends_with_user and value[-1]["role"] != "user":
        raise _Invalid(field, f"must end with a user turn, the last role is {value[-1]['role']!r}")


def _is_token_ids(value):
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value))


TOKEN_IDS = "a non-empty list of token ids (ints ≥ 0)"


def _check_list(value, field, length, item_ok, item_wanted):
    """A list of `length` items (any length ≥ 1 when length is None), each passing item_ok."""
    if not isinstance(value, list):
        raise _Invalid(field, f"expected a list, got {type(value).__name__} {_describe(value)}")
    if length is None and not value:
        raise _Invalid(field, "expected at least one item, got an empty list")
    if length is not None and len(value) != length:
        raise _Invalid(field, f"expected {length} items (one per response), got {len(value)}")
    for i, item in enumerate(value):
        if not item_ok(item):
            raise _Invalid(f"{field}[{i}]", f"expected {item_wanted}, got {_describe(item)}")


# ----------------------------------------------------------------------------------------------
# One check per kind.


def _check_sft(record):
    if "text" in record and "messages" not in record:  # a plain-text (pretraining) record
        _check_string(record["text"], "'text'")
        if not record["text"]:
            raise _Invalid("'text'", "expected a non-empty string (nothing to train on)")
        return
    messages = _require(record, "messages")
    _check_messages(messages, "'messages'", ends_with_user=False)
    if not any(m["role"] == "assistant" for m in messages):
        raise _Invalid("'messages'", "expected at least one assistant turn (nothing to train on)")


def _check_prompts(record):
    _check_string(_require(record, "id"), "'id'")
    _check_messages(_require(record, "messages"), "'messages'", ends_with_user=True)


def _check_pairs(record):
    _check_messages(_require(record, "prompt"), "'prompt'", ends_with_user=True)
    _check_string(_require(record, "chosen"), "'chosen'")
    _check_string(_require(record, "rejected"), "'rejected'")
    if "p" in record and not (_is_number(record["p"]) and 0.0 <= record["p"] <= 1.0):
        raise _Invalid("'p'",
                       "expected a number in [0, 1] (P(chosen ≻ rejected)), got "
                       f"{_describe(record['p'])}")
    if "margin" in record and not (_is_number(record["margin"])
                                   and math.isfinite(record["margin"])):
        raise _Invalid("'margin'", f"expected a finite number, got {_describe(record['margin'])}")
    for name in ("source", "id"):
        if name in record:
            _check_string(record[name], f"'{name}'")
    for name in ("chosen_ids", "rejected_ids"):
        if name in record and not _is_token_ids(record[name]):
            raise _Invalid(f"'{name}'", f"expected {TOKEN_IDS}, got {_describe(record[name])}")


def _check_samples(record):
    _check_string(_require(record, "id"), "'id'")
    _check_messages(_require(record, "prompt"), "'prompt'", ends_with_user=True)
    responses = _require(record, "responses")
    _check_list(responses, "'responses'", None, lambda r: isinstance(r, str), "a string")
    n = len(responses)
    # generate.py writes these (and columns); readers that use them fall back when absent.
    if "response_ids" in record:
        _check_list(record["response_ids"], "'response_ids'", n, _is_token_ids, TOKEN_IDS)
    if "num_tokens" in record:
        _check_list(record["num_tokens"], "'num_tokens'", n,
                    lambda t: isinstance(t, int) and not isinstance(t, bool) and t >= 0,
                    "an integer ≥ 0")
    if "finish_reasons" in record:
        _check_list(record["finish_reasons"], "'finish_reasons'", n,
                    lambda f: f in FINISH_REASONS, f"one of {'/'.join(FINISH_REASONS)}")
    if "logprobs" in record:
        # A summed log-prob may legitimately be very negative; NaN never is.
        _check_list(record["logprobs"], "'logprobs'", n, lambda x: _is_number(x)
                    and not math.isnan(x), "a number")
    if "columns" in record and not isinstance(record["columns"], dict):
        raise _Invalid("'columns'", f"expected an object, got {_describe(record['columns'])}")


def _check_rewards(record):
    _check_samples(record)
    _check_list(_require(record, "rewards"), "'rewards'", len(record["responses"]),
                lambda x: _is_number(x) and math.isfinite(x), "a finite number")


_CHECKS = {"sft": _check_sft, "prompts": _check_prompts, "pairs": _check_pairs,
           "samples": _check_samples, "rewards": _check_rewards}


# ----------------------------------------------------------------------------------------------
# Reading


# ----------------------------------------------------------------------------------------------
# Public API


def validate_record(record, kind):
    """Check one record; raise ValueError("field ...: problem") without a location (converters use
    it to decide whether to keep a record they built)."""
    if kind not in _CHECKS:
        raise ValueError(f"unknown record kind {kind!r} (one of {', '.join(KINDS)})")
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    try:
        _CHECKS[kind](record)
    except _Missing as e:
        raise ValueError(f"{e}; a {kind} record looks like {json.dumps(EXAMPLES[kind])} "
                         "(see data/README.md)") from None
    except _Invalid as e:
        raise ValueError(str(e)) from None


def validate(records, kind, path="<records>", line_numbers=None):
    """Check every record against `kind`'s schema; raise InputError "path:line: field ...: problem"
    at the first broken one. line_numbers[i] is record i's line in the file (default i + 1, exact
    for files without blank lines). Prompt ids must be unique within a file (generation seeds and
    resumable stages key on them). Returns the records, so `records = validate(...)` reads well."""
    line_numbers = line_numbers or range(1, len(records) + 1)
    first_line_of_id = {}
    for record, line in zip(records, line_numbers):
        try:
            validate_record(record, kind)
        except ValueError as e:
            raise InputError(f"{path}:{line}: {e}") from None
        if kind == "prompts":
            if record["id"] in first_line_of_id:
                raise InputError(f"{path}:{line}: field 'id': duplicate id {record['id']!r} "
                                 f"(first at line {first_line_of_id[record['id']]})")
            first_line_of_id[record["id"]] = line
    return records


def load_records(path, kind, allow_empty=False):
    """The validated records of a JSONL file of the given kind, or an InputError naming the file,
    the line and the field. A file without records is an error too (a stage handed an empty file
    would otherwise fail later, far from the cause), unless allow_empty: an output that may
    legitimately hold nothing, e.g. an online iteration in which no prompt gave a pair."""
    numbered = read_jsonl_numbered(path)
    if not numbered and not allow_empty:
        raise InputError(f"{path}: no records (the file is empty)")
    return validate([record for _, record in numbered], kind, str(path),
                    [line for line, _ in numbered])


def render_context(messages):
    """A conversation as plain text, for instructions that quote it (the pairwise preference model,
    the LLM-as-a-judge). A single user turn is its content verbatim (a TL;DR post, a task prompt);
    anything longer is the HH-RLHF transcript style, turns separated by a blank line:
        System: ...\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ..."""
    if isinstance(messages, str):
        return messages
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    speaker = {"system": "System", "user": "Human", "assistant": "Assistant"}
    return "\n\n".join(f"{speaker[m['role']]}: {m['content']}" for m in messages)
