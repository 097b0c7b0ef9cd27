"""What the tests share: a tiny character-level tokenizer and Llama checkpoint, the built-in task
built small, data writers, and `run_script` for stage scripts (optionally under torchrun on CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runs import read_jsonl, run_cli, write_jsonl
from data.task import build
from model import Transformer

ROOT = Path(__file__).resolve().parent.parent

torch.set_num_threads(min(2, os.cpu_count() or 1))

# ----------------------------------------------------------------------------------------------
# Fixtures: a tiny character-level tokenizer with a ChatML template, and tiny HF checkpoints.

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_char_tokenizer(folder):
    """A character-level HF tokenizer (every printable ASCII char + newline) with ChatML
    specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(folder)
    return len(vocab)


# Two more families' chat templates, copied whitespace and all: Llama-3-Instruct's, and
# Mistral-7B-Instruct's (v0.2/v0.3 style: " [INST] ... [/INST]", then " " + the answer + "</s>";
# add_generation_prompt changes nothing). Long lines are cut into adjacent strings, which Python
# joins: the text is the original's, byte for byte.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = ("""{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must """
                    """alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of """
                    """an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
""")


def build_template_tokenizer(folder, family):
    """A character-level HF tokenizer with the special tokens, chat template and BOS handling of a
    model family: "chatml" (build_char_tokenizer), "llama3" (specials after the characters, BOS
    <|begin_of_text|>, eos <|eot_id|>, no pad or unk) or "mistral" (<unk> <s> </s> first, the
    characters in reverse order). Like the real ones, the Llama-3 and Mistral tokenizers add BOS on
    tokenizer(text) and the template writes it too. Each family numbers the characters differently,
    so a sequence encoded with another family's tokenizer reads as other tokens. Returns the
    vocabulary size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if family == "chatml":
        return build_char_tokenizer(folder)
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    if family == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>"]
        tokens, template = chars + specials, LLAMA3_TEMPLATE
        names = dict(bos_token=specials[0], eos_token="<|eot_id|>")
    else:
        specials = ["<unk>", "<s>", "</s>"]
        tokens, template = specials + chars[::-1], MISTRAL_TEMPLATE
        names = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    vocab = {token: i for i, token in enumerate(tokens)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=names.get("unk_token", specials[-1])))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    bos = names["bos_token"]
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                        special_tokens=[(bos, vocab[bos])])
    additional = [t for t in specials if t not in names.values()]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, additional_special_tokens=additional,
                                        **names)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return len(vocab)


def tiny_config(vocab_size, **overrides):
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab_size,
                  hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=True, hidden_act="silu",
                  bos_token_id=None, eos_token_id=3, pad_token_id=0)
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama checkpoint + char tokenizer, saved by our own save_pretrained."""
    folder = tmp_path_factory.mktemp("tiny_model")
    vocab_size = build_char_tokenizer(folder)
    torch.manual_seed(0)
    model = Transformer.from_config(tiny_config(vocab_size))
    model.save_pretrained(folder)
    return folder


def stage_env():
    """The environment a stage script runs in as a user runs it: one thread, unbuffered output, and
    the PyTorch kernels on CPU (the Triton ones run under the slow interpreter only in the kernel
    tests, which compare them with these)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    return env


def stage_command(args, nproc=1):
    """python SCRIPT ARGS, or under torchrun on nproc CPU ranks."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", *args]
    return [sys.executable, *args]


def run_script(args, nproc=1, timeout=600):
    """Run a stage script (optionally under torchrun on CPU) and return its stdout; fail loudly."""
    command = stage_command(args, nproc)
    result = subprocess.run(command, cwd=ROOT, env=stage_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n"
                                    f"{result.stderr[-5000:]}")
    return result.stdout


def write_sft_data(path, n=64):
    """Conversations the tiny model can fit: echo a short string back reversed."""
    import random
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdef") for _ in range(rng.randint(3, 6)))
        rows.append({"messages": [{"role": "user", "content": f"reverse {word}"},
                                  {"role": "assistant", "content": word[::-1]}]})
    write_jsonl(path, rows)


def write_pairs(path, n, seed=0):
    """Pairs for a tiny RM: chosen = the reversed word, rejected = the word unchanged."""
    import random
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        word = "".join(rng.choice("abcdef") for _ in range(rng.randint(3, 6)))
        rows.append({"id": f"p{i}", "prompt": [{"role": "user", "content": f"reverse {word}"}],
                     "chosen": word[::-1], "rejected": word + "x",
                     "source": "even" if i % 2 == 0 else "odd"})
    write_jsonl(path, rows)


def builtin_model_dir(task_dir, folder, seed=0):
    """A random-init checkpoint of the built-in task's tiny model, with its tokenizer."""
    import shutil
    shutil.copytree(task_dir / "model", folder)
    torch.manual_seed(seed)
    Transformer.from_config(folder).save_pretrained(folder)
    return folder


SMALL = dict(seed=0, sft_examples=800, prompts_per_iter=40, eval_prompts=24, pairs_train=3000,
             pairs_eval=200, pretrain_texts=400)
TASK_FILES = ("sft.jsonl", "prompts_iter1.jsonl", "prompts_iter2.jsonl", "prompts_iter3.jsonl",
              "prompts_eval.jsonl", "prompts_dev.jsonl", "pairs_train.jsonl", "pairs_eval.jsonl",
              "pairs_sftlike_train.jsonl", "pairs_sftlike_eval.jsonl", "pretrain.jsonl",
              "pairs_offpolicy_train.jsonl", "pairs_offpolicy_eval.jsonl", "stats.json",
              "model/tokenizer.json", "model/tokenizer_config.json", "model/config.json",
              "model/generation_config.json")


def read_lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin")
    build(out, **SMALL)
    return out


def check_one_line_error(returncode, stderr):
    """A user error: exit status 2, one `error: ...` line on stderr, no traceback. Returns the
    line."""
    assert returncode == 2, f"exit status {returncode}:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), stderr
    return errors[0]


def run_script_expecting_error(args):
    """Run a stage script as a user would; it must stop on a user error (check_one_line_error)."""
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=stage_env(), capture_output=True,
                            text=True, timeout=300)
    return check_one_line_error(result.returncode, result.stderr)


def run_main_expecting_error(main, argv, capsys):
    """The same check in this process (no interpreter start-up): run_cli(main) as the script's
    __main__ does."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    return check_one_line_error(exit_info.value.code, capsys.readouterr().err)


def run_builtin_online(task_dir, tmp_path, *extra, lr="1e-3"):
    """Two online iterations of dpo.py on 4 built-in task prompts each, scored by the gold reward
    (run.sh's oracle control), in this process. Returns (sft folder, run folder)."""
    import dpo
    sft, run = builtin_model_dir(task_dir, tmp_path / "sft"), tmp_path / "run"
    for t in (1, 2):
        prompts = read_jsonl(task_dir / f"prompts_iter{t}.jsonl")[:4]
        write_jsonl(tmp_path / f"prompts_{t}.jsonl", prompts)
        dpo.main(["--iter", str(t), "--run-dir", str(run), "--sft", str(sft), "--rm", "gold",
                  "--prompts", str(tmp_path / "prompts_{t}.jsonl"), "--n", "3",
                  "--max-new-tokens", "8", "--batch-size", "4", "--micro-batch-size", "4",
                  "--lr", lr, "--epochs", "1", "--device", "cpu", *extra])
    return sft, run
