"""Tests of train_rm.py."""
import json
import shutil

import pytest
import torch

import train_rm
from runs import read_jsonl, write_jsonl
from tokens import closing_ids, load_tokenizer, right_pad
from model import Transformer
from tests.helpers import (run_main_expecting_error, run_script, run_script_expecting_error,
                           tiny_config, write_pairs)
import losses
import rewards


# ----------------------------------------------------------------------------------------------
# The math


def test_bt_loss_hand_values_and_gradient():
    chosen = torch.tensor([1.0, 0.0, -2.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 1.0], requires_grad=True)
    loss = losses.bt_loss(chosen, rejected)
    # −log σ(d) = log(1 + e^−d): d = 1, 0, −3
    expected = torch.tensor([0.31326169, 0.69314718, 3.04858735])
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.sum().backward()
    # d/dr_w = −σ(−d) = −(1 − σ(d)); d/dr_l = +σ(−d)
    assert torch.allclose(chosen.grad, -torch.sigmoid(-torch.tensor([1.0, 0.0, -3.0])), atol=1e-6)
    assert torch.allclose(rejected.grad, -chosen.grad)
    with_margin = losses.bt_loss(torch.tensor([2.0]), torch.tensor([0.0]),
                                 margin=torch.tensor([1.0]))
    assert with_margin.item() == pytest.approx(0.31326169, abs=1e-6)
    centered = losses.bt_loss(torch.tensor([2.0]), torch.tensor([1.0]), center_coef=0.01)
    assert centered.item() == pytest.approx(0.31326169 + 0.01 * 9, abs=1e-6)
    # Large reward gaps stay finite (logsigmoid, not log(sigmoid)).
    assert torch.isfinite(losses.bt_loss(torch.tensor([-200.0]), torch.tensor([200.0]))).all()


def test_reward_is_read_at_last_real_token_even_when_pad_is_eos():
    torch.manual_seed(0)
    model = Transformer.from_config(tiny_config(50), head="score").eval()
    eos = 3
    sequences = [[5, 6, 7, eos], [8, 9, eos], [10, eos, eos, 11, 12, eos]]  # eos inside one too
    with torch.no_grad():
        batched = rewards.sequence_rewards(model, sequences, pad_id=eos, device="cpu")
        alone = torch.stack([rewards.sequence_rewards(model, [s], pad_id=eos, device="cpu")[0]
                             for s in sequences])
        full = torch.stack([model(torch.tensor([s]))[0, -1] for s in sequences])
    assert torch.allclose(batched, alone, atol=1e-5) and torch.allclose(batched, full, atol=1e-5)


def test_pairwise_preference_is_order_symmetric(tiny_model_dir):
    torch.manual_seed(0)
    model = Transformer.from_pretrained(tiny_model_dir).eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    prompts = [[{"role": "user", "content": "reverse abc"}], [{"role": "user", "content": "hi"}]]
    a, b = ["cba", "hello"], ["abc", ""]
    p_ab = rewards.pairwise_preference(model, tokenizer, prompts, a, b, "cpu")
    p_ba = rewards.pairwise_preference(model, tokenizer, prompts, b, a, "cpu")
    assert torch.allclose(p_ab + p_ba, torch.ones(2), atol=1e-6)
    assert ((p_ab > 0) & (p_ab < 1)).all()


@pytest.mark.parametrize("tied", [True, False])
def test_pairwise_logits_ab_equal_the_full_logits_at_the_last_real_token(tiny_model_dir, tied):
    """The judge projects only the last real position onto the "A"/"B" rows of the LM head; the
    numbers are those of the full (B, T, V) logits read there. Training's label log-prob (through
    forward(targets=...)) is the full-vocabulary log-softmax at that same position."""
    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    model = Transformer.from_config(tiny_config(len(tokenizer), tie_word_embeddings=tied)).eval()
    prompts = [[{"role": "user", "content": "reverse abc"}], [{"role": "user", "content": "hi"}],
               [{"role": "user", "content": "a longer question, padded the least"}]]
    queries = [rewards.pairwise_query_ids(tokenizer, p, a, b)
               for p, a, b in zip(prompts, ["cba", "hello", "x"], ["abc", "", "yz"])]
    labels = list(rewards.label_token_ids(tokenizer))
    pad_id = tokenizer.pad_token_id
    with torch.no_grad():
        logits_ab = rewards.pairwise_logits_ab(model, queries, labels, pad_id, "cpu")  # (B, 2)
        # (B, V), one query at a time
        full = torch.stack([model(torch.tensor([q]))[0, -1] for q in queries])
        input_ids, lengths = right_pad(queries, pad_id)
        targets = torch.full_like(input_ids, -100)
        targets[torch.arange(3), lengths - 1] = torch.tensor(labels[0])
        label_logps = model(input_ids, targets=targets).sum(1)                         # (B,)
    assert logits_ab.shape == (3, 2) and logits_ab.dtype == torch.float32
    assert torch.allclose(logits_ab, full[:, labels], atol=1e-5)
    assert torch.allclose(label_logps, full.log_softmax(-1)[:, labels[0]], atol=1e-5)


def test_length_bias_statistic():
    records = [{"responses": ["a", "bb", "ccc"], "rewards": [1.0, 2.0, 3.0]},  # +1
               {"responses": ["a", "bb", "ccc"], "rewards": [3.0, 2.0, 1.0]},  # −1
               # constant length: left out
               {"responses": ["a", "bb"], "num_tokens": [5, 5], "rewards": [0.0, 1.0]},
               # +1 (characters: no num_tokens)
               {"responses": ["a", "bbb", "cc"], "rewards": [0.0, 2.0, 1.0]}]
    mean, used, skipped = rewards.length_bias(records)
    assert (used, skipped) == (3, 1) and mean == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize("command, required, own, foreign", [
    ("train", ["--model", "m", "--pairs", "p", "--out", "o"],
     ["--type", "--eval-pairs", "--overwrite", "--batch-size", "--template", "--max-length"],
     ["--rm", "--samples", "--chunk-size"]),
    ("score", ["--rm", "r", "--samples", "s", "--out", "o"],
     ["--chunk-size", "--max-length", "--eval-batch-size"],
     ["--lr", "--pairs", "--type", "--overwrite", "--template"]),
    ("eval", ["--rm", "r", "--pairs", "p"],
     ["--samples", "--template", "--max-length"],
     ["--lr", "--out", "--chunk-size", "--type", "--overwrite"]),
])
def test_each_subcommand_has_help_with_only_its_own_flags(command, required, own, foreign, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_rm.build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: ") and f" {command} [-h]" in help_text.splitlines()[0], \
        help_text
    assert all(flag in help_text for flag in required[::2] + own), help_text
    assert not any(flag + " " in help_text for flag in foreign), help_text
    args = train_rm.build_parser().parse_args([command, *required, "--max-length", "5"])
    assert args.max_length == 5
    # no abbreviations: "--max-len" is not taken for --max-length
    with pytest.raises(SystemExit) as exit_info:
        train_rm.build_parser().parse_args([command, *required, "--max-len", "5"])
    assert exit_info.value.code == 2


def test_the_old_flag_style_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_rm.build_parser().parse_args(["--score", "--rm", "x", "--samples", "y", "--out", "z"])
    assert exit_info.value.code == 2
    assert "train,score,eval" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["bt", "pairwise"])
def test_empty_pairs_file_is_a_one_line_error(kind, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "pairs.jsonl").write_text("")
    argv = ["train", "--type", kind, "--model", str(tiny_model_dir),
            "--pairs", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "rm"),
            "--device", "cpu"]
    # One kind as a user runs the script, the other through main() in this process (no start-up
    # cost).
    if kind == "bt":
        error = run_script_expecting_error(["train_rm.py", *argv])
    else:
        error = run_main_expecting_error(train_rm.main, argv, capsys)
    assert str(tmp_path / "pairs.jsonl") in error
    assert not (tmp_path / "rm").exists()


def test_pairs_that_all_drop_are_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    """Pairs whose chosen and rejected are the same tokens (here: the same after truncation to 8
    tokens, all inside the prompt) carry no preference; when none is left, training stops."""
    write_pairs(tmp_path / "pairs.jsonl", 4)
    error = run_main_expecting_error(train_rm.main,
                                     ["train", "--type", "bt", "--model", str(tiny_model_dir),
                                      "--pairs", str(tmp_path / "pairs.jsonl"),
                                      "--out", str(tmp_path / "rm"), "--max-length", "8",
                                      "--device", "cpu"], capsys)
    assert str(tmp_path / "pairs.jsonl") in error and "4 read, 4 dropped" in error
    assert not (tmp_path / "rm").exists()


# ----------------------------------------------------------------------------------------------
# A Bradley-Terry model trained once on the tiny pairs (shared by the tests below). Its starting
# tokenizer pads with eos, as many real checkpoints do, so the exported RM must pick another pad.


@pytest.fixture(scope="module")
def bt_rm(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer
    folder = tmp_path_factory.mktemp("bt_rm")
    start = folder / "start"
    shutil.copytree(tiny_model_dir, start)
    tokenizer = AutoTokenizer.from_pretrained(start)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(start)
    config = json.loads((start / "config.json").read_text())
    (start / "config.json").write_text(json.dumps({**config,
                                                   "pad_token_id": tokenizer.eos_token_id}))
    write_pairs(folder / "pairs.jsonl", 64)
    write_pairs(folder / "eval.jsonl", 32, seed=1)
    rm = folder / "rm"
    out = run_script(["train_rm.py", "train", "--type", "bt", "--model", str(start),
                      "--pairs", str(folder / "pairs.jsonl"),
                      "--eval-pairs", str(folder / "eval.jsonl"), "--out", str(rm), "--lr", "3e-3",
                      "--batch-size", "16", "--micro-batch-size", "8", "--epochs", "4",
                      "--device", "cpu"])
    samples = [{"id": f"s{i}", "prompt": [{"role": "user", "content": f"reverse {w}"}],
                "responses": [w[::-1], w + "x", ""],
                "num_tokens": [len(w) + 1, len(w) + 1, 1], "finish_reasons": ["stop"] * 3}
               for i, w in enumerate(["abc", "fedcb", "aa", "abcdefabcdef"])]
    write_jsonl(folder / "samples.jsonl", samples)
    run_script(["train_rm.py", "score", "--rm", str(rm), "--samples", str(folder / "samples.jsonl"),
                "--out", str(folder / "rewards.jsonl"), "--device", "cpu", "--chunk-size", "3"])
    return dict(folder=folder, start=start, rm=rm, stdout=out, samples=samples,
                scored=read_jsonl(folder / "rewards.jsonl"))


def test_bt_reward_model_learns_the_tiny_pairs(bt_rm):
    assert "held-out accuracy" in bt_rm["stdout"]
    evaluation = json.loads((bt_rm["rm"] / "eval.json").read_text())
    assert evaluation["accuracy"] >= 0.9
    assert set(evaluation["accuracy_by_source"]) == {"even", "odd"}
    lines = read_jsonl(bt_rm["rm"] / "metrics.jsonl")
    # 64 pairs / 16 per step × 4 epochs
    assert [line["step"] for line in lines] == list(range(1, 17))
    assert all(0.0 <= line["accuracy"] <= 1.0 and line["grad_norm"] > 0 for line in lines)
    assert sum(line["loss"] for line in lines[-4:]) < 0.5 * sum(line["loss"] for line in lines[:4])
    # On the scored samples too, the reversed word (chosen in training) beats the word + "x"
    # (rejected).
    assert all(r["rewards"][0] > r["rewards"][1] for r in bt_rm["scored"])


def test_score_is_the_same_for_any_rank_count_and_chunking(bt_rm, tmp_path):
    """2 ranks and chunks of 1 give the records 1 rank and chunks of 3 gave; samples with only the
    required fields (id, prompt, responses: as other engines write them) score the same."""
    scored = bt_rm["scored"]
    assert [r["id"] for r in scored] == ["s0", "s1", "s2", "s3"]
    assert all(len(r["rewards"]) == 3 for r in scored)
    # other fields pass through
    assert all(r["num_tokens"] == s["num_tokens"] for r, s in zip(scored, bt_rm["samples"]))
    write_jsonl(tmp_path / "samples.jsonl",
                [{k: s[k] for k in ("id", "prompt", "responses")} for s in bt_rm["samples"]])
    run_script(["train_rm.py", "score", "--rm", str(bt_rm["rm"]),
                "--samples", str(tmp_path / "samples.jsonl"),
                "--out", str(tmp_path / "rewards.jsonl"), "--device", "cpu", "--chunk-size", "1"],
               nproc=2)
    two_ranks = read_jsonl(tmp_path / "rewards.jsonl")
    assert all(set(r) == {"id", "prompt", "responses", "rewards"} for r in two_ranks)
    assert [r["id"] for r in two_ranks] == [r["id"] for r in scored]
    assert torch.allclose(torch.tensor([r["rewards"] for r in two_ranks]),
                          torch.tensor([r["rewards"] for r in scored]), atol=1e-5)


def test_scoring_reads_only_id_prompt_and_responses(bt_rm):
    """score_records and length_bias work on samples without num_tokens / finish_reasons."""
    model = rewards.load_for_inference(bt_rm["rm"], "bt", torch.device("cpu"))
    tokenizer = load_tokenizer(bt_rm["rm"])
    bare = [{"id": s["id"], "prompt": s["prompt"], "responses": s["responses"]}
            for s in bt_rm["samples"]]
    scored = rewards.score_records(model, tokenizer, bare, torch.device("cpu"), batch_size=5,
                                   max_length=2048)
    assert [set(r) for r in scored] == [{"id", "prompt", "responses", "rewards"}] * len(bare)
    assert torch.allclose(torch.tensor([r["rewards"] for r in scored]),
                          torch.tensor([r["rewards"] for r in bt_rm["scored"]]), atol=1e-5)
    mean, used, skipped = rewards.length_bias(scored)
    assert used + skipped == len(bare) and -1.0 <= mean <= 1.0


def test_exported_rm_scores_batches_padded_by_its_tokenizer_in_transformers(bt_rm):
    """The saved folder as others use it: AutoTokenizer pads the texts of the chat template's full
    renderings (of different lengths; right and left padding), AutoModelForSequenceClassification
    scores them; the scores equal ours. The starting tokenizer padded with eos (<|im_end|>), so
    the RM's pad must be another id, in the config and the saved tokenizer alike.
    (tests/test_reward_interop.py checks the Llama-3 and Mistral templates the same way.)"""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    rm = bt_rm["rm"]
    hf = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(rm)
    assert hf.config.pad_token_id == hf_tokenizer.pad_token_id != hf_tokenizer.eos_token_id
    assert hf.config.pad_token_id not in closing_ids(hf_tokenizer)
    samples = bt_rm["samples"]
    texts = [hf_tokenizer.apply_chat_template(
                 s["prompt"] + [{"role": "assistant", "content": response}], tokenize=False)
             for s in samples for response in s["responses"]]
    ours_ids = [rewards.pair_token_ids(load_tokenizer(rm), s["prompt"], response, 2048)[0]
                for s in samples for response in s["responses"]]
    ours = torch.tensor([x for r in bt_rm["scored"] for x in r["rewards"]])
    for side in ("right", "left"):
        hf_tokenizer.padding_side = side
        batch = hf_tokenizer(texts, padding=True, return_tensors="pt")
        # The texts tokenize to exactly the sequences we scored, and the batch really is padded.
        real = batch["attention_mask"].bool()
        assert [row[mask].tolist() for row, mask in zip(batch["input_ids"], real)] == ours_ids
        lengths = real.sum(1).tolist()
        assert len(set(lengths)) > 3 and min(lengths) < batch["input_ids"].shape[1]
        with torch.no_grad():
            hf_scores = hf(**batch).logits[:, 0]
        assert (hf_scores - ours).abs().max().item() <= 1e-4, side


def test_eval_subcommand_writes_accuracy_and_length_bias(bt_rm, tmp_path, capsys):
    rm = tmp_path / "rm"
    shutil.copytree(bt_rm["rm"], rm)
    train_rm.main(["eval", "--rm", str(rm), "--pairs", str(bt_rm["folder"] / "eval.jsonl"),
                   "--samples", str(bt_rm["folder"] / "samples.jsonl"), "--device", "cpu"])
    out = capsys.readouterr().out
    evaluation = json.loads((rm / "eval.json").read_text())
    assert "held-out accuracy" in out and "reward-length Pearson correlation" in out
    # The same accuracy as the one measured right after training, and the length statistic over
    # 4 prompts.
    after_training = json.loads((bt_rm["rm"] / "eval.json").read_text())
    assert evaluation["accuracy"] == after_training["accuracy"]
    assert evaluation["length_correlation_prompts"] == 4
    assert -1.0 <= evaluation["length_correlation"] <= 1.0


def test_train_rerun_skips_and_overwrite_retrains(bt_rm, tmp_path, capsys):
    rm = tmp_path / "rm"
    shutil.copytree(bt_rm["rm"], rm)
    weights = (rm / "model.safetensors").read_bytes()
    argv = ["train", "--type", "bt", "--model", str(bt_rm["start"]),
            "--pairs", str(bt_rm["folder"] / "pairs.jsonl"), "--out", str(rm), "--lr", "3e-3",
            "--batch-size", "16", "--max-steps", "2", "--device", "cpu"]
    train_rm.main(argv)  # in this process: main() is what `python train_rm.py` runs
    assert "skipping" in capsys.readouterr().out
    assert (rm / "model.safetensors").read_bytes() == weights
    assert len(read_jsonl(rm / "metrics.jsonl")) == 16
    train_rm.main(argv + ["--overwrite"])
    assert "skipping" not in capsys.readouterr().out
    assert (rm / "model.safetensors").read_bytes() != weights
    assert [line["step"] for line in read_jsonl(rm / "metrics.jsonl")] == [1, 2]


def test_bt_training_on_two_ranks_matches_one_process(bt_rm, tmp_path):
    """FSDP2 on two gloo ranks gives the weights and logged metrics of one process (fp32 on CPU,
    1e-5 on every weight after 2 steps). 12 pairs a step over 2 ranks × micro-batches of 4: each
    rank runs 2 micro-batches and 4 of the 16 slots are padding, which must weigh nothing."""
    argv = ["train", "--type", "bt", "--model", str(bt_rm["start"]),
            "--pairs", str(bt_rm["folder"] / "pairs.jsonl"), "--lr", "1e-3", "--batch-size", "12",
            "--micro-batch-size", "4", "--max-steps", "2", "--parallel", "fsdp", "--device", "cpu"]
    train_rm.main(argv + ["--out", str(tmp_path / "one")])
    run_script(["train_rm.py", *argv, "--out", str(tmp_path / "two")], nproc=2)
    from safetensors.torch import load_file
    one = load_file(tmp_path / "one" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys() and "score.weight" in one
    for name in one:
        assert (one[name] - two[name]).abs().max().item() <= 1e-5, name
    lines_one = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    lines_two = read_jsonl(tmp_path / "two" / "metrics.jsonl")
    for key in ("loss", "accuracy", "grad_norm"):
        expected = pytest.approx([line[key] for line in lines_one], rel=1e-4, abs=1e-6)
        assert [line[key] for line in lines_two] == expected, key


# ----------------------------------------------------------------------------------------------
# The built-in task, and the pairwise model


def small_builtin_model_dir(task_dir, folder):
    """The built-in task's tokenizer with a smaller random-init Llama (hidden 64, 2 layers: ~0.1M
    parameters)."""
    shutil.copytree(task_dir / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4)
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    Transformer.from_config(folder).save_pretrained(folder)
    return folder


def held_out_accuracy_and_loss(model, tokenizer, pairs):
    """(fraction of pairs with r_chosen > r_rejected, mean BT loss) of a reward model."""
    chosen = [rewards.pair_token_ids(tokenizer, p["prompt"], p["chosen"], 128)[0] for p in pairs]
    rejected = [rewards.pair_token_ids(tokenizer, p["prompt"], p["rejected"], 128)[0]
                for p in pairs]
    with torch.no_grad():  # (N, 2): chosen, rejected
        scores = torch.cat([rewards.sequence_rewards(model, chosen[i:i + 128] + rejected[i:i + 128],
                                                     0, "cpu").view(2, -1).T
                            for i in range(0, len(pairs), 128)])
    return ((scores[:, 0] > scores[:, 1]).float().mean().item(),
            losses.bt_loss(scores[:, 0], scores[:, 1]).mean().item())


def test_bt_reward_model_learns_builtin_task_above_chance_and_the_untrained_model(task_dir,
                                                                                  tmp_path):
    """One epoch on 1,500 labelled pairs of the built-in task (94 steps of 16, a 0.1M-parameter
    backbone from random init), evaluated on 1,700 held-out pairs (the other 1,500 training pairs
    and the 200 eval pairs; no prompt repeats): accuracy clearly above chance and above the
    untrained model (the same backbone and head before training), held-out loss clearly below it.
    (The labels' agreement with the gold reward, the ceiling, is about 0.84; the longer response is
    chosen in ~63% of pairs, the shortcut such a short run mostly learns.)"""
    start = small_builtin_model_dir(task_dir, tmp_path / "start")
    pairs = read_jsonl(task_dir / "pairs_train.jsonl")
    write_jsonl(tmp_path / "train.jsonl", pairs[:1500])
    held_out = pairs[1500:] + read_jsonl(task_dir / "pairs_eval.jsonl")
    run_script(["train_rm.py", "train", "--type", "bt", "--model", str(start),
                "--pairs", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "rm"),
                "--lr", "3e-3", "--batch-size", "16", "--micro-batch-size", "16",
                "--max-length", "128", "--seed", "0", "--device", "cpu"])
    tokenizer = load_tokenizer(start)
    torch.manual_seed(0)  # the training run's seed: the same new head as training started from
    untrained = Transformer.from_pretrained(start, head="score").eval()
    untrained_accuracy, untrained_loss = held_out_accuracy_and_loss(untrained, tokenizer, held_out)
    trained = rewards.load_for_inference(tmp_path / "rm", "bt", torch.device("cpu"))
    accuracy, loss = held_out_accuracy_and_loss(trained, tokenizer, held_out)
    assert accuracy >= 0.62, accuracy  # chance is 0.5; the standard error on 1,700 pairs is 0.012
    assert accuracy >= untrained_accuracy + 0.04, (accuracy, untrained_accuracy)
    assert loss <= untrained_loss - 0.03, (loss, untrained_loss)
    assert untrained_loss == pytest.approx(0.693, abs=0.01), untrained_loss


def test_pairwise_model_learns_the_tiny_pairs_and_records_its_template(tiny_model_dir, tmp_path):
    from data.judge import PAIRWISE_TEMPLATE
    write_pairs(tmp_path / "pairs.jsonl", 64)
    write_pairs(tmp_path / "eval.jsonl", 32, seed=1)
    judge = tmp_path / "judge"
    run_script(["train_rm.py", "train", "--type", "pairwise", "--model", str(tiny_model_dir),
                "--pairs", str(tmp_path / "pairs.jsonl"),
                "--eval-pairs", str(tmp_path / "eval.jsonl"),
                "--out", str(judge), "--lr", "3e-3", "--batch-size", "16",
                "--micro-batch-size", "16", "--epochs", "4", "--device", "cpu"])
    assert (judge / "judge_template.txt").read_text() == PAIRWISE_TEMPLATE
    evaluation = json.loads((judge / "eval.json").read_text())
    assert evaluation["type"] == "pairwise" and evaluation["accuracy"] >= 0.9, evaluation
    lines = read_jsonl(judge / "metrics.jsonl")
    assert len(lines) == 16
    assert sum(line["loss"] for line in lines[-4:]) < 0.5 * sum(line["loss"] for line in lines[:4])
