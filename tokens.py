"""Tokenizer and chat formatting: how prompts and responses become token ids, the same way in every
stage and in generation (generate.py).
"""
from pathlib import Path
import torch


def right_pad(sequences, pad_id, device=None):
    """Token lists -> (ids (B, T) right-padded, lengths (B,)). Real tokens are found through
    `lengths`, never by comparing with pad_id (pad often equals eos)."""
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.full((len(sequences), max(map(len, sequences))), pad_id, dtype=torch.long)  # width from the host lists
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids.to(device), lengths.to(device)


# ----------------------------------------------------------------------------------------------
# Tokenizer and chat formatting.
#
# Token boundary rule (the one place it is decided): a (prompt, response) pair is encoded as
#     encode(render(prompt, add_generation_prompt=True)) + encode(response) + end_of_turn_ids
# with the prompt text and the response text tokenized SEPARATELY. Generation sees exactly the
# prompt ids and then produces response tokens one by one, so no BPE merge can ever straddle the
# boundary; encoding the two texts separately reproduces that split at training time (tokenizing
# the concatenated string could merge the last prompt characters with the first response ones).
# `add_special_tokens=False` everywhere: the chat template itself writes BOS where the model wants it.
#
# A reward model is the exception (encode_rendering): it reads text that already exists, so it gets
# the template's whole rendering of the finished conversation tokenized as one text, exactly what
# transformers' apply_chat_template returns, and its reward is read at that rendering's last token.


def load_tokenizer(path):
    """The checkpoint's tokenizer with its chat template (tokenizer_config.json or chat_template.jinja)."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():  # else transformers takes the path for a hub repo id and says so confusingly
        raise FileNotFoundError(f"{path}: no such model folder (expected a local Hugging Face checkpoint folder)")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        # Padding positions are always masked by explicit lengths, never found by comparing ids
        # (pad may equal eos in many checkpoints), so any id is safe here.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def render_chat(tokenizer, messages, add_generation_prompt):
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template: add one "
                         "(chat_template.jinja or tokenizer_config.json['chat_template'])")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_text(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def closing_ids(tokenizer):
    """The ids the chat template writes after the last assistant message's text, to the end of its
    rendering: <|im_end|> and a newline for ChatML, <|eot_id|> for Llama-3, </s> for Mistral. The
    last of them ends every full rendering (encode_rendering): the token a reward model is read at."""
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
    return encode_text(tokenizer, response) + list(end_of_turn if end_of_turn is not None else end_of_turn_ids(tokenizer))


def response_ids(tokenizer, record, end_of_turn=None):
    """The token ids of each response of a samples record, as training and scoring use them: the sampler's
    own `response_ids` when the record carries them (exactly the sampled tokens, with the stop token, eos or
    end-of-turn, only when one was sampled); otherwise each text re-encoded, with the end-of-turn token
    appended unless its finish_reason says it was cut at --max-new-tokens ("length"). generate.py writes
    the ids because decoding and re-encoding is not the identity: a word sampled as two tokens can come
    back as one, and a special token sampled inside a response comes back as a turn marker."""
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
