"""Tokenizer and chat formatting: how prompts and responses become token ids, the same way in every
stage and in generation (generate.py), preference pairs as token ids, and how token lists become a
padded batch. The one place the boundary between a prompt's tokens and its response's is decided
(the rule below).
"""
from pathlib import Path
from typing import NamedTuple
import torch
from runs import InputError, print0


# ----------------------------------------------------------------------------------------------
# Tokenizer and chat formatting.
#
# Token boundary rule (the one place it is decided): a (prompt, response) pair is encoded as
#     encode(render(prompt, add_generation_prompt=True)) + encode(response) + end_of_turn_ids
# with the prompt text and the response text tokenized SEPARATELY. Generation sees exactly the
# prompt ids and then produces response tokens one by one, so no BPE merge can ever straddle the
# boundary; encoding the two texts separately reproduces that split at training time (tokenizing
# the concatenated string could merge the last prompt characters with the first response ones).
# `add_special_tokens=False` everywhere: the chat template itself writes BOS where the model wants
# it.
#
# A reward model is the exception (encode_rendering): it reads text that already exists, so it gets
# the template's whole rendering of the finished conversation tokenized as one text, exactly what
# transformers' apply_chat_template returns, and its reward is read at that rendering's last token.


def load_tokenizer(path):
    """The checkpoint's tokenizer with its chat template (tokenizer_config.json or
    chat_template.jinja)."""
    from transformers import AutoTokenizer

    # else transformers takes the path for a hub repo id and says so confusingly
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such model folder "
                                "(expected a local Hugging Face checkpoint folder)")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        # Padding positions are always masked by explicit lengths, never found by comparing ids
        # (pad may equal eos in many checkpoints), so any id is safe here.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def render_chat(tokenizer, messages, add_generation_prompt):
    """The chat template's text for `messages` (with the assistant header when
    add_generation_prompt)."""
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template: add one "
                         "(chat_template.jinja or tokenizer_config.json['chat_template'])")
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def encode_text(tokenizer, text):
    """The ids of `text` alone, no special tokens added (the template writes its own)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def closing_ids(tokenizer):
    """The ids the chat template writes after the last assistant message's text, to the end of its
    rendering: <|im_end|> and a newline for ChatML, <|eot_id|> for Llama-3, </s> for Mistral. The
    last of them ends every full rendering (encode_rendering): the token a reward model is read
    at."""
    probe = "PROBE"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
    text = render_chat(tokenizer, messages, add_generation_prompt=False)
    return encode_text(tokenizer, text[text.rindex(probe) + len(probe):])


def end_of_turn_ids(tokenizer):
    """The ids the chat template writes right after an assistant message, up to and including its
    first special token (e.g. <|im_end|>, <|eot_id|>, </s>). This is what the model must learn to
    emit to end its turn, and what generation stops on. Falls back to [eos] if the template writes
    no special token there."""
    suffix_ids = closing_ids(tokenizer)
    special = set(tokenizer.all_special_ids)
    for i, token in enumerate(suffix_ids):
        if token in special:
            return suffix_ids[: i + 1]
    return [tokenizer.eos_token_id]


def stop_token_ids(tokenizer):
    """Tokens that end a generated response: the end-of-turn token and eos."""
    return sorted({end_of_turn_ids(tokenizer)[-1], tokenizer.eos_token_id})


def encode_prompt(tokenizer, messages):
    """Prompt ids exactly as generation is fed them: the chat template with the assistant header."""
    return encode_text(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=True))


def encode_response(tokenizer, response, end_of_turn=None):
    """Response ids: the response text tokenized alone, then the end-of-turn token(s)."""
    end_of_turn = end_of_turn if end_of_turn is not None else end_of_turn_ids(tokenizer)
    return encode_text(tokenizer, response) + list(end_of_turn)


def response_ids(tokenizer, record, end_of_turn=None):
    """The token ids of each response of a samples record, as training and scoring use them: the
    sampler's own `response_ids` when the record carries them (exactly the sampled tokens, with the
    stop token, eos or end-of-turn, only when one was sampled); otherwise each text re-encoded, with
    the end-of-turn token appended unless its finish_reason says it was cut at --max-new-tokens
    ("length"). generate.py writes the ids because decoding and re-encoding is not the identity: a
    word sampled as two tokens can come back as one, and a special token sampled inside a response
    comes back as a turn marker."""
    if "response_ids" in record:
        return record["response_ids"]
    end_of_turn = end_of_turn if end_of_turn is not None else end_of_turn_ids(tokenizer)
    reasons = record.get("finish_reasons", ["stop"] * len(record["responses"]))
    return [encode_response(tokenizer, text, end_of_turn if reason == "stop" else [])
            for text, reason in zip(record["responses"], reasons)]


def encode_rendering(tokenizer, messages):
    """A finished conversation as a reward model reads it: the chat template's whole rendering,
    tokenized as one text. These are exactly the ids of tokenizer.apply_chat_template(messages),
    which is what transformers users feed AutoModelForSequenceClassification and what TRL's
    RewardTrainer trains on, so our reward and theirs are read at the same last token (for ChatML
    the newline after <|im_end|>, a token the policy never generates). It differs from the policy's
    split where the template does more than concatenate (Llama-3 trims each message, Mistral writes
    a space before the answer), and it needs no tokenizer or template in common with the policy."""
    return encode_text(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=False))


def encode_conversation(tokenizer, messages, end_of_turn=None):
    """A whole chat for SFT: returns (ids, is_assistant) where is_assistant[i] marks the tokens the
    loss trains on (each assistant message's content and its end-of-turn token). Every assistant
    turn is split exactly as in encode_prompt + encode_response, so SFT, DPO and generation agree.
    Requires a template whose rendering of a conversation extends its rendering of every prefix
    (true of ChatML, Llama-3, Qwen2, SmolLM2, Mistral); otherwise raises ValueError."""
    end_of_turn = end_of_turn if end_of_turn is not None else end_of_turn_ids(tokenizer)
    eot_text = tokenizer.decode(end_of_turn)
    ids, is_assistant, rendered = [], [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        if not prompt_text.startswith(rendered):
            raise ValueError("chat template does not render conversations prefix-consistently; "
                             "cannot split this multi-turn chat into prompt/response tokens")
        context_ids = encode_text(tokenizer, prompt_text[len(rendered):])
        response_ids = encode_response(tokenizer, message["content"], end_of_turn)
        ids += context_ids + response_ids
        is_assistant += [False] * len(context_ids) + [True] * len(response_ids)
        rendered = prompt_text + message["content"] + eot_text
    return ids, is_assistant


# ----------------------------------------------------------------------------------------------
# Preference pairs as token ids (dpo.py): a prompt, a chosen and a rejected response.


class TokenizedPair(NamedTuple):
    prompt: list     # the prompt's token ids (the chat template's rendering up to the response)
    chosen: list     # the chosen response's token ids
    rejected: list   # the rejected response's token ids


def tokenize_pairs(tokenizer, pairs, max_length):
    """Returns (kept pairs, TokenizedPairs). A pair made from samples carries its responses' ids
    (chosen_ids, rejected_ids: exactly the sampled tokens, a stop token only where one was
    sampled); a pair of texts (human preferences) is encoded, each response ending with the
    end-of-turn token. A response cut by max_length is kept truncated; a pair whose prompt leaves
    no room is dropped. Both are counted and reported."""
    end_of_turn = end_of_turn_ids(tokenizer)
    kept, examples, truncated, dropped = [], [], 0, 0
    for pair in pairs:
        prompt = encode_prompt(tokenizer, pair["prompt"])
        room = max_length - len(prompt)
        if room < 1:
            dropped += 1
            continue
        chosen = pair.get("chosen_ids") or encode_response(tokenizer, pair["chosen"], end_of_turn)
        rejected = (pair.get("rejected_ids")
                    or encode_response(tokenizer, pair["rejected"], end_of_turn))
        if max(chosen + rejected) >= len(tokenizer):
            raise InputError(f"pair {pair.get('id', len(kept) + dropped)}: token id "
                             f"{max(chosen + rejected)} is not in the tokenizer's vocabulary "
                             f"({len(tokenizer)} ids): its chosen_ids / rejected_ids come from "
                             "another tokenizer; delete them to train on the texts")
        truncated += (len(chosen) > room) + (len(rejected) > room)
        kept.append(pair)
        examples.append(TokenizedPair(prompt, chosen[:room], rejected[:room]))
    if truncated or dropped:
        print0(f"warning: {truncated} responses truncated to --max-length {max_length}; "
               f"{dropped} pairs dropped because their prompt alone fills it")
    return kept, examples


# ----------------------------------------------------------------------------------------------
# Token lists as one batch.


def right_pad(sequences, pad_id, device=None):
    """Token lists -> (ids (B, T) right-padded, lengths (B,)). Real tokens are found through
    `lengths`, never by comparing with pad_id (pad often equals eos)."""
    lengths = torch.tensor([len(s) for s in sequences])
    width = max(map(len, sequences))  # from the host lists, not the device
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids.to(device), lengths.to(device)
