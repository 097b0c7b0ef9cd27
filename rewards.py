"""Scoring responses, in reading order:
  1. a Bradley-Terry reward model's scalar (train_rm.py trains it), and the scorer of dpo.py's
     online iteration (one model or an ensemble);
  2. a verifier: a Python function in TRL's reward-function convention (`--rm FILE.py:function`;
     the built-in task's gold reward r* is one, `--rm gold`);
  3. a pairwise judge's preference probability (paper 2's P(a ≻ b | x) from the judge's label
     tokens);
  4. statistics of scored samples: how a reward relates to length, and an iteration's summary.
"""
import argparse
import asyncio
import copy
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import sys
from pathlib import Path
import torch
import torch.nn.functional as F
from parallel import default_dtype
from runs import InputError, print0
from tokens import closing_ids, encode_prompt, encode_rendering, load_tokenizer, right_pad
from data.judge import JUDGE_LABELS, JUDGE_TEMPLATES, render_judge_prompt
from data.task import gold_scored, reward_vs_gold
from losses import ensemble_rewards
from model import Transformer

# ----------------------------------------------------------------------------------------------
# 1. Bradley-Terry reward models


def reward_models(text):
    """--rm's folders: one, or an ensemble written as folders separated by commas."""
    return [folder for folder in text.split(",") if folder]


def model_kind(path):
    """'bt' for a saved reward model (a sequence classifier), 'pairwise' for a causal LM."""
    architectures = json.loads((Path(path) / "config.json").read_text()).get("architectures", [""])
    return "bt" if architectures[0].endswith("ForSequenceClassification") else "pairwise"


def load_for_inference(path, kind, device):
    """A saved reward model ('bt': its score head) or pairwise model (an LM), for inference."""
    dtype = default_dtype(device)
    head = "score" if kind == "bt" else "lm"
    model = Transformer.from_pretrained(path, device=device, dtype=dtype, head=head)
    return model.eval()


def unused_pad_id(tokenizer):
    """A token id that never ends a scored sequence: the pad token when it is none of the tokens the
    template closes a conversation with (tokens.closing_ids) nor eos, else the unk token or the last
    vocabulary id."""
    used = set(closing_ids(tokenizer)) | {tokenizer.eos_token_id}
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, len(tokenizer) - 1):
        if candidate is not None and candidate not in used:
            return candidate
    raise ValueError("no token id is free to serve as the reward model's pad_token_id")


def pair_token_ids(tokenizer, prompt, response, max_length):
    """The tokens a reward is read from: the chat template's full rendering of prompt + response
    (tokens.encode_rendering), the reward read at its last token. Truncation keeps the first
    max_length tokens; callers count and report it."""
    ids = encode_rendering(tokenizer, prompt + [{"role": "assistant", "content": response}])
    return ids[:max_length], len(ids) > max_length


def sequence_rewards(model, sequences, pad_id, device):
    """Scalar reward of each token list (B,), read at its last real token (index length − 1).
    Sequences are right-padded, so padding comes after every real token and, under causal attention,
    cannot change the hidden state the reward is read from."""
    input_ids, lengths = right_pad(sequences, pad_id, device)
    scores = model(input_ids)                                    # (B, T)
    return scores.gather(1, (lengths - 1)[:, None]).squeeze(1)   # (B,)


def score_records(model, tokenizer, records, device, batch_size, max_length):
    """Add `rewards` (one float per response) to each samples record. Reads only each record's
    `prompt` and `responses`; every other field is passed through unchanged. `tokenizer` is the
    reward model's own: each record is rendered from its text with the reward model's template."""
    flat = [(i, pair_token_ids(tokenizer, r["prompt"], response, max_length))
            for i, r in enumerate(records) for response in r["responses"]]
    truncated = sum(t for _, (_, t) in flat)
    if truncated:
        print0(f"warning: {truncated} responses exceed --max-length {max_length}; "
               f"scored on their first {max_length} tokens")
    rewards = []
    with torch.no_grad():
        for start in range(0, len(flat), batch_size):
            sequences = [ids for _, (ids, _) in flat[start:start + batch_size]]
            rewards += sequence_rewards(model, sequences, tokenizer.pad_token_id, device).tolist()
    out, position = [], 0
    for record in records:
        n = len(record["responses"])
        out.append({**record, "rewards": rewards[position:position + n]})
        position += n
    return out


def ensemble_scorer(folders, mode, device, batch_size, max_length):
    """The scorer of dpo.py's online iteration: loads the reward models in `folders` and returns
    scorer(chunk of samples records) → the records with `rewards`, one per response: each model's
    reward (score_records, with the model's own tokenizer and template) combined over the models
    by losses.ensemble_rewards (`mode`: "mean" or "mean_minus_std"; one model: its own reward)."""
    dtype = default_dtype(device)
    members = [(Transformer.from_pretrained(folder, device=device, dtype=dtype,
                                            head="score").eval(), load_tokenizer(folder))
               for folder in folders]

    def scorer(chunk):
        scored = [score_records(rm, rm_tokenizer, chunk, device, batch_size, max_length)
                  for rm, rm_tokenizer in members]
        return [{**r, "rewards": ensemble_rewards([s[i]["rewards"] for s in scored], mode)}
                for i, r in enumerate(chunk)]
    return scorer


# ----------------------------------------------------------------------------------------------
# 2. Verifiers: a Python function in TRL's reward-function convention
#
# `--rm FILE.py:function` or `--rm package.module:function` (`--rm gold`: data.task.gold_reward,
# the built-in task's r*). The function is called on a batch, as TRL's trainers call their
# `reward_funcs`:   function(prompts=[...], completions=[...], **columns) -> list[float]
# Our prompts are conversations, so, as in TRL's conversational format, a prompt is its list of
# messages and a completion a one-message list [{"role": "assistant", "content": text}], each a
# copy of its own; `columns` are the prompt records' other fields (an `answer` field of
# prompts.jsonl, say) and their `id`, one list each, aligned with the completions (TRL passes every
# dataset column but the prompt). An `async def` function is awaited. Also as TRL passes them:
# `completion_ids` (the sampled token ids, when the records carry them), `trainer_state` (None:
# there is no TRL trainer here) and `log_extra` / `log_metric` (accepted and dropped).
# A value may be any real number (numpy and 0-d tensor scalars too); None counts 0.0, as in TRL's
# OnlineDPOTrainer (which sums the functions' rewards with nansum).

ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra",
             "log_metric")


def is_reward_function(spec):
    """--rm names a function (gold, FILE.py:name or package.module:name), not model folders (one,
    or an ensemble separated by commas, where a folder's name may hold a ':')."""
    return spec == "gold" or ("," not in spec and ":" in spec and not Path(spec).is_dir())


@functools.lru_cache(maxsize=None)
def load_reward_function(spec):
    """The function a verifier spec names, loaded once per process; InputError, saying why, when
    it cannot be. A FILE.py is imported as a module named after the file, with its folder on
    sys.path (after ours), so it can import files beside it and pickle its functions (a process
    pool that puts a timeout on each check)."""
    if spec == "gold":
        spec = "data.task:gold_reward"
    source, _, name = spec.rpartition(":")
    if not source or not name.isidentifier():
        raise InputError(f"verifier {spec}: expected FILE.py:function or package.module:function")
    try:
        if source.endswith(".py"):
            module = import_file(Path(source))
        else:
            module = importlib.import_module(source)
    except InputError:
        raise
    except Exception as error:  # an ImportError, or whatever the module raised as it loaded
        raise InputError(f"verifier {spec}: importing {source} failed: {type(error).__name__}: "
                         f"{error}") from error
    function = getattr(module, name, None)
    if not callable(function):
        raise InputError(f"verifier {spec}: {source} has no function {name}")
    return function


def verifier_flag(spec):
    """An argparse `type=` for a verifier flag (osp.py / eval_runs.py --gold): the spec, once its
    function loads; otherwise the flag's error, at parse time, before any work or file."""
    try:
        load_reward_function(spec)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return spec


def import_file(path):
    if not path.is_file():
        raise InputError(f"verifier: no file {path}")
    path = path.resolve()
    name = path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) != str(path):
        # the name is another module's (a library's, or another verifier's): a private one
        name = f"{name}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before it runs: dataclasses and pickling look it up there
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def reward_function_settings(spec):
    """What a run records of --rm: the spec, and for a FILE.py the hash of its source, so a resume
    after the file changed stops (runs.check_settings) instead of mixing two verifiers' rewards."""
    source = spec.rpartition(":")[0]
    if source.endswith(".py") and Path(source).is_file():
        return dict(rm=spec, rm_sha256=hashlib.sha256(Path(source).read_bytes()).hexdigest())
    return dict(rm=spec)


def verifier_rewards(function, spec, records, columns=None):
    """One reward per response of each record ({id, prompt, responses[, response_ids]}), from one
    call of `function` on all of them; a list of lists. `columns`: per record, the prompt record's
    other fields (default: the record's `columns`, as generate.py wrote them). InputError naming
    the record when the function raises, returns the wrong number of values or one that is not a
    finite number; a failing batch is retried record by record to find which."""
    if columns is None:
        columns = [record.get("columns", {}) for record in records]
    names = sorted({name for fields in columns for name in fields})
    clashes = [name for name in names if name in ARGUMENTS]
    if clashes:
        raise InputError(f"verifier {spec}: the prompts' field {clashes[0]!r} would replace the "
                         f"verifier's own argument of that name; rename the field")
    owners = [(record, fields) for record, fields in zip(records, columns)
              for _ in record["responses"]]
    batch = dict(prompts=[copy.deepcopy(record["prompt"]) for record, _ in owners],
                 completions=[[{"role": "assistant", "content": text}]
                              for record in records for text in record["responses"]],
                 trainer_state=None, log_extra=ignore, log_metric=ignore)
    if all("response_ids" in record for record in records):
        batch["completion_ids"] = [list(ids) for record in records
                                   for ids in record["response_ids"]]
    batch.update({name: [copy.deepcopy(fields.get(name)) for _, fields in owners]
                  for name in names})
    batch.setdefault("id", [record["id"] for record, _ in owners])
    try:
        values = function(**batch)
        if inspect.isawaitable(values):  # an async def verifier, as TRL's GRPOTrainer awaits it
            values = asyncio.run(values)
    except Exception as error:
        if len(records) > 1:  # which record? each alone: the first that fails says
            for i in range(len(records)):
                verifier_rewards(function, spec, records[i:i + 1], columns[i:i + 1])
            raise InputError(f"verifier {spec} raised on the batch of records "
                             f"{records[0]['id']!r} to {records[-1]['id']!r}, though on no record "
                             f"alone: {type(error).__name__}: {error}") from error
        raise InputError(f"verifier {spec} raised on record {records[0]['id']!r}: "
                         f"{type(error).__name__}: {error}") from error
    try:  # a list, tuple, generator, numpy array or tensor
        values = None if isinstance(values, (str, bytes, dict)) else list(values)
    except TypeError:  # not iterable
        values = None
    if values is None or len(values) != len(owners):
        got = "no list" if values is None else f"{len(values)} values"
        raise InputError(f"verifier {spec} returned {got} for {len(owners)} completions "
                         f"(records {records[0]['id']!r} to {records[-1]['id']!r}); it must "
                         f"return one number per completion")
    rewards, k = [], 0
    for record in records:
        n = len(record["responses"])
        own = [reward_value(value, spec, record) for value in values[k:k + n]]
        k += n
        rewards.append(own)
    return rewards


def reward_value(value, spec, record):
    """A verifier's value as a float: any finite real number (a numpy or 0-d tensor scalar too);
    None is 0.0 (TRL's OnlineDPOTrainer: nansum)."""
    if value is None:
        return 0.0
    if hasattr(value, "item") and not isinstance(value, numbers.Real):
        value = value.item()  # a 0-d tensor or numpy value
    try:
        number = float(value) if isinstance(value, numbers.Real) else math.nan
    except OverflowError:  # an int beyond float's range
        number = math.inf
    if not math.isfinite(number):
        raise InputError(f"verifier {spec} returned {value!r} for a response of record "
                         f"{record['id']!r}: a reward must be a finite number")
    return number


def ignore(*args, **kwargs):
    """TRL's log_extra / log_metric, which have nowhere to go here."""


def verifier_scorer(spec):
    """dpo.py's scorer for a verifier: records → the records with their `rewards`."""
    function = load_reward_function(spec)

    def scorer(chunk):
        rewards = verifier_rewards(function, spec, chunk)
        return [{**record, "rewards": values} for record, values in zip(chunk, rewards)]
    return scorer


# ----------------------------------------------------------------------------------------------
# 3. Pairwise preference model: an LM asked which of two responses is better


def pairwise_query_ids(tokenizer, prompt, response_a, response_b, template="pairwise"):
    """A comparison query as a user turn of the chat template; the model's next token is "A" or "B".
    The query is the template's full rendering of that turn with the generation prompt (the ids of
    apply_chat_template(turn, add_generation_prompt=True)), so a transformers user reads the A/B
    logits at the same position. `template` is a name in data.judge.JUDGE_TEMPLATES or a template
    text: paper 1's bare pairwise format by default, paper 2's judge instruction ("dialogue",
    "summarization") for osp.py."""
    query = render_judge_prompt(prompt, response_a, response_b, template)
    return encode_prompt(tokenizer, [{"role": "user", "content": query}])


def label_token_ids(tokenizer):
    """The ids of the two answer tokens (data.judge.JUDGE_LABELS: first / second response
    better)."""
    ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in JUDGE_LABELS]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the answer labels {JUDGE_LABELS} must each be a single token "
                         f"for the pairwise model, got {ids}")
    return ids[0][0], ids[1][0]


def pairwise_logits_ab(model, queries, label_ids, pad_id, device):
    """(B, 2) logits of the tokens "A" and "B" at the position after each query: the last real
    position's hidden state projected onto those two rows of the LM head only, not the (B, T, V)
    logits of every position (at B = 64, T = 2048, V = 128k that is 32 GiB in bf16 for 2 numbers a
    row). Inference only, on a plain model: the LM head is read outside forward, which FSDP would
    not have gathered. Training reads the label's log-prob through forward(targets=...), which
    computes it at the label position only (rlhf_kernels/logprob.py skips ignored positions)."""
    label_ids = torch.tensor(label_ids, device=device)                    # label_token_ids(...)
    input_ids, lengths = right_pad(queries, pad_id, device)
    hidden = model.hidden_states(input_ids)                                 # (B, T, H)
    last = hidden[torch.arange(len(queries), device=device), lengths - 1]   # (B, H)
    return F.linear(last, model.lm_head_weight[label_ids]).float()          # (B, 2)


@torch.no_grad()
def pairwise_preference(model, tokenizer, prompts, responses_1, responses_2, device,
                        template="pairwise", batch_size=64):
    """P(response_1 ≻ response_2 | prompt) (B,): the softmax over the "A"/"B" logits, P("A") with
    response_1 shown first averaged with P("B") with the order swapped, so a position bias cancels
    (paper 1 §2.2; paper 2 §3.2 for the judge's target preference strength)."""
    first = [pairwise_query_ids(tokenizer, p, a, b, template)
             for p, a, b in zip(prompts, responses_1, responses_2)]
    swapped = [pairwise_query_ids(tokenizer, p, b, a, template)
               for p, a, b in zip(prompts, responses_1, responses_2)]
    probabilities = []
    labels = label_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id
    for start in range(0, len(first), batch_size):
        first_batch = first[start:start + batch_size]
        swapped_batch = swapped[start:start + batch_size]
        p_first = pairwise_logits_ab(model, first_batch, labels, pad_id,
                                     device).softmax(-1)[:, 0]
        p_swapped = pairwise_logits_ab(model, swapped_batch, labels, pad_id,
                                       device).softmax(-1)[:, 1]
        probabilities.append((p_first + p_swapped) / 2)
    return torch.cat(probabilities) if probabilities else torch.zeros(0, device=device)


def judge_template(path, template=None, default="pairwise"):
    """The A/B instruction of a pairwise model or judge: `template` (a name in
    data.judge.JUDGE_TEMPLATES or a text file) when given, else the one it was trained with
    (judge_template.txt in its folder, written by training), else `default`."""
    saved = Path(path) / "judge_template.txt"
    if not template and saved.exists():
        return saved.read_text()
    template = template or default
    return JUDGE_TEMPLATES.get(template) or Path(template).read_text()


# ----------------------------------------------------------------------------------------------
# 4. Statistics of scored samples


def pearson(xs, ys):
    """Pearson correlation of two equal-length lists; None when either is constant."""
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.norm() * y.norm()).item()
    return None if denominator == 0 else (x @ y).item() / denominator


def length_bias(records):
    """Paper 1 Fig. 3: the mean over prompts of the Pearson correlation between the reward and the
    length (in tokens; characters when token counts are absent) of the n responses to a prompt.
    Prompts whose lengths or rewards are all equal have no correlation and are left out
    (counted)."""
    correlations = []
    for record in records:
        lengths = record.get("num_tokens") or [len(r) for r in record["responses"]]
        c = pearson(record["rewards"], lengths)
        if c is not None:
            correlations.append(c)
    mean = sum(correlations) / len(correlations) if correlations else float("nan")
    return mean, len(correlations), len(records) - len(correlations)


def samples_summary(t, scored, pairs, dropped, gold_spec=None):
    """summary.json of dpo.py's iteration t: the samples' mean reward and length, how many were cut
    at --max-new-tokens without a stop token, pairs kept and dropped (by reason); and how the reward
    agrees with a gold reward on the policy's own samples (data.task.reward_vs_gold): the verifier
    `gold_spec` (dpo.py --gold), else on the built-in task its r*. Returns (summary, the
    gold-scored records or None)."""
    all_rewards = [r for rec in scored for r in rec["rewards"]]
    total_chars = sum(len(x) for rec in scored for x in rec["responses"])
    summary = dict(iteration=t, prompts=len(scored), samples=len(all_rewards),
                   mean_reward=sum(all_rewards) / len(all_rewards),
                   mean_length_chars=total_chars / len(all_rewards))
    if all("num_tokens" in rec for rec in scored):  # samples of other generators may lack it
        total_tokens = sum(n for rec in scored for n in rec["num_tokens"])
        summary["mean_tokens"] = total_tokens / len(all_rewards)
    # samples cut at --max-new-tokens without a stop token (--missing-eos-penalty lowers their r̃)
    finish_reasons = [reason for rec in scored for reason in rec.get("finish_reasons", [])]
    summary["missing_eos"] = sum(reason == "length" for reason in finish_reasons)
    summary.update(pairs_kept=len(pairs), pairs_dropped=dropped)
    if gold_spec is None:
        gold = gold_scored(scored)
    else:
        function = load_reward_function(gold_spec)
        gold = [{**record, "gold": values} for record, values in
                zip(scored, verifier_rewards(function, gold_spec, scored))]
    if gold is not None:
        summary["reward_vs_gold"] = reward_vs_gold(gold)
        summary["gold"] = gold_spec or "gold"
    return summary, gold
