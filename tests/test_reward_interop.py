"""Reward models as other tools read them. A reward is read at the last token of the chat template's
full rendering of the conversation, as transformers' AutoModelForSequenceClassification reads
apply_chat_template(...) and TRL's RewardTrainer trains on it: checked for the ChatML, Llama-3 and
Mistral templates (tiny character tokenizers of each, tests/helpers.py), on exported reward models
in padded batches, and in dpo.py with a reward model whose tokenizer and template are not the
policy's."""
import json

import pytest
import torch

import dpo
import train_rm
from runs import read_jsonl, write_jsonl
from tokens import closing_ids, encode_prompt, encode_response, load_tokenizer
from data.judge import render_judge_prompt
from model import Transformer
from tests.helpers import build_template_tokenizer, tiny_config, write_pairs
import losses
import rewards

FAMILIES = ("chatml", "llama3", "mistral")
# the token each family's reward is read at
LAST_TOKEN = {"chatml": "\n", "llama3": "<|eot_id|>", "mistral": "</s>"}
# different lengths; a system turn, a second turn, spaces the Llama-3 template trims, an
# empty answer
CONVERSATIONS = [
    [{"role": "user", "content": "reverse abc"}, {"role": "assistant", "content": "cba"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": " hello there "}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}],
    [{"role": "user", "content": "say nothing"}, {"role": "assistant", "content": ""}],
]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_reward_is_read_at_the_last_token_of_the_templates_full_rendering(family, tmp_path):
    """Our scored ids = apply_chat_template(conversation) (transformers, TRL) = RLHFlow's
    get_rewards.py (the rendering without its BOS, the tokenizer adding it back): one BOS, and the
    last token is the newline after <|im_end|> (ChatML), <|eot_id|> (Llama-3), </s> (Mistral)."""
    build_template_tokenizer(tmp_path, family)
    tokenizer = load_tokenizer(tmp_path)
    for conversation in CONVERSATIONS:
        ids, truncated = rewards.pair_token_ids(tokenizer, conversation[:-1],
                                                conversation[-1]["content"], 2048)
        expected = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
        assert ids == expected and not truncated
        assert tokenizer.convert_ids_to_tokens(ids[-1]) == LAST_TOKEN[family]
        # the template writes BOS; tokenizer(text) alone would add a second one
        if tokenizer.bos_token is not None:
            text = tokenizer.apply_chat_template(conversation, tokenize=False)
            assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
            assert ids == tokenizer(text.replace(tokenizer.bos_token, ""))["input_ids"]
    # the policy's sequence ends at <|im_end|>; the reward model reads one token further
    if family == "chatml":
        prompt, response = CONVERSATIONS[0][:-1], CONVERSATIONS[0][-1]["content"]
        newline = tokenizer.convert_tokens_to_ids("\n")
        ids, _ = rewards.pair_token_ids(tokenizer, prompt, response, 2048)
        policy_ids = encode_prompt(tokenizer, prompt) + encode_response(tokenizer, response)
        assert ids == policy_ids + [newline]
    # The pairwise judge's query is already the full rendering of its user turn with the
    # generation prompt.
    prompt = CONVERSATIONS[0][:-1]
    query = [{"role": "user", "content": render_judge_prompt(prompt, "cba", "abc", "pairwise")}]
    expected = tokenizer.apply_chat_template(query, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
    assert rewards.pairwise_query_ids(tokenizer, prompt, "cba", "abc") == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_the_reward_models_pad_never_ends_a_scored_sequence(family, tmp_path):
    """transformers reads the last token that is not the pad id: even a checkpoint whose pad is the
    template's closing token (ChatML: the newline) gets another pad in the exported reward model."""
    build_template_tokenizer(tmp_path, family)
    tokenizer = load_tokenizer(tmp_path)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(closing_ids(tokenizer)[-1])
    assert rewards.unused_pad_id(tokenizer) not in closing_ids(tokenizer) + [tokenizer.eos_token_id]


# ----------------------------------------------------------------------------------------------
# Tiny models of each family (hidden 32, 2 layers; each numbers the characters differently), and a
# reward model exported by `train_rm.py train` from each (one step: the weights need not be good).


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """{family: (causal LM folder, exported reward model folder)}. The starting tokenizers pad with
    eos (Llama-3 and Mistral have no pad; the ChatML one is set to), as many checkpoints do."""
    from transformers import AutoTokenizer
    folders = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        start = root / "start"
        vocab_size = build_template_tokenizer(start, family)
        tokenizer = AutoTokenizer.from_pretrained(start)
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(start)
        torch.manual_seed(0)
        config = tiny_config(vocab_size, hidden_size=32, intermediate_size=64,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.eos_token_id,
                             bos_token_id=tokenizer.bos_token_id)
        Transformer.from_config(config).save_pretrained(start)
        write_pairs(root / "pairs.jsonl", 8)
        train_rm.main(["train", "--type", "bt", "--model", str(start), "--pairs",
                       str(root / "pairs.jsonl"), "--out", str(root / "rm"),
                       "--batch-size", "8", "--max-steps", "1", "--lr", "1e-2", "--device", "cpu"])
        folders[family] = (start, root / "rm")
    return folders


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_reward_model_scores_padded_batches_as_in_transformers(family, family_models):
    """The exported folder as a transformers user loads it: its tokenizer's apply_chat_template on a
    batch of conversations of different lengths, padded right and left, and
    AutoModelForSequenceClassification give our train_rm.py score of every conversation."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    _, rm = family_models[family]
    records = [{"id": str(i), "prompt": c[:-1], "responses": [c[-1]["content"]]}
               for i, c in enumerate(CONVERSATIONS)]
    model = rewards.load_for_inference(rm, "bt", torch.device("cpu"))
    ours = rewards.score_records(model, load_tokenizer(rm), records, torch.device("cpu"),
                                 batch_size=3, max_length=2048)
    ours = torch.tensor([r["rewards"][0] for r in ours])
    hf = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(rm)
    assert hf.config.pad_token_id == hf_tokenizer.pad_token_id not in closing_ids(hf_tokenizer)
    for side in ("right", "left"):
        hf_tokenizer.padding_side = side
        batch = hf_tokenizer.apply_chat_template(CONVERSATIONS, tokenize=True, padding=True,
                                                 return_dict=True, return_tensors="pt")
        lengths = batch["attention_mask"].sum(1)
        # really padded, a different amount each row
        assert len(set(lengths.tolist())) == len(CONVERSATIONS)
        with torch.no_grad():
            theirs = hf(**batch).logits[:, 0]
        assert (theirs - ours).abs().max().item() <= 1e-4, (side, theirs, ours)
    # the conversations get different rewards: the check above compares something
    assert ours.std() > 1e-3


@pytest.mark.parametrize("policy_family, rm_family", [("chatml", "llama3"), ("llama3", "chatml")])
def test_dpo_scores_with_a_reward_model_of_another_tokenizer_and_template(policy_family, rm_family,
                                                                          family_models, tmp_path,
                                                                          monkeypatch):
    """dpo.py --rm with a reward model whose vocabulary and chat template differ from the policy's
    (a ChatML policy and a Llama-3 reward model, and back): each sampled response is re-rendered
    from its text with the reward model's template, so its reward is the reward model's score of
    that conversation alone, in transformers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # stage code on CPU: the PyTorch kernels
    policy, _ = family_models[policy_family]
    _, rm = family_models[rm_family]
    write_jsonl(tmp_path / "prompts.jsonl",
                [{"id": f"q{i}", "messages": [{"role": "user", "content": f"reverse {w}"}]}
                 for i, w in enumerate(["abc", "fedc"])])
    dpo.main(["--iter", "1", "--run-dir", str(tmp_path / "run"), "--sft", str(policy),
              "--rm", str(rm), "--prompts", str(tmp_path / "prompts.jsonl"), "--iterations", "1",
              "--n", "2", "--max-new-tokens", "4", "--batch-size", "4", "--micro-batch-size", "4",
              "--epochs", "1", "--device", "cpu"])
    records = read_jsonl(tmp_path / "run" / "iter1" / "rewards.jsonl")
    hf = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(rm)
    policy_tokenizer = load_tokenizer(policy)
    for record in records:
        for response, reward in zip(record["responses"], record["rewards"]):
            conversation = record["prompt"] + [{"role": "assistant", "content": response}]
            alone = hf_tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                                     return_tensors="pt")
            with torch.no_grad():
                assert hf(**alone).logits[0, 0].item() == pytest.approx(reward, abs=1e-4)
            # ... and the policy's tokenizer would have given the reward model other tokens entirely
            policy_ids = policy_tokenizer.apply_chat_template(conversation, tokenize=True,
                                                              return_dict=False)
            assert policy_ids != alone["input_ids"][0].tolist()
    assert json.loads((tmp_path / "run" / "iter1" / "summary.json").read_text())["samples"] == 4


def test_dpo_scores_with_an_ensemble_of_reward_models_of_other_families(family_models, tmp_path,
                                                                        monkeypatch, capsys):
    """--rm A,B --ensemble mean_minus_std: each response's reward is the mean of the members' own
    transformers scores minus their standard deviation (Coste et al. 2023), each member reading the
    conversation with its own tokenizer and template. One member with mean_minus_std is refused."""
    import statistics
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # stage code on CPU: the PyTorch kernels
    policy, _ = family_models["chatml"]
    members = [family_models[family][1] for family in ("llama3", "chatml", "mistral")]
    write_jsonl(tmp_path / "prompts.jsonl",
                [{"id": "q0", "messages": [{"role": "user", "content": "reverse abc"}]}])
    argv = ["--iter", "1", "--run-dir", str(tmp_path / "run"), "--sft", str(policy),
            "--prompts", str(tmp_path / "prompts.jsonl"), "--iterations", "1", "--n", "3",
            "--max-new-tokens", "4", "--batch-size", "4", "--micro-batch-size", "4",
            "--epochs", "1", "--device", "cpu", "--ensemble", "mean_minus_std"]
    with pytest.raises(SystemExit):
        dpo.main(argv + ["--rm", str(members[0])])
    assert "--ensemble mean_minus_std needs two or more reward models" in capsys.readouterr().err
    dpo.main(argv + ["--rm", ",".join(map(str, members))])
    [record] = read_jsonl(tmp_path / "run" / "iter1" / "rewards.jsonl")
    scorers = [(AutoModelForSequenceClassification.from_pretrained(m).eval(),
                AutoTokenizer.from_pretrained(m)) for m in members]
    for response, reward in zip(record["responses"], record["rewards"]):
        conversation = record["prompt"] + [{"role": "assistant", "content": response}]
        with torch.no_grad():
            scores = [hf(**tok.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                                   return_tensors="pt")).logits[0, 0].item()
                      for hf, tok in scorers]
        assert statistics.stdev(scores) > 1e-3  # the members disagree, so the two modes differ
        assert reward == pytest.approx(statistics.mean(scores) - statistics.stdev(scores), abs=1e-4)
    # the default mode: the mean
    assert losses.ensemble_rewards([[1.0, 2.0], [3.0, 2.0]]) == [2.0, 2.0]
