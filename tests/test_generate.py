"""Tests of generate.py."""
import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import runs
import generate
from parallel import init_distributed
from runs import InputError, read_jsonl, write_jsonl
from tokens import load_tokenizer
from rlhf_kernels.sampling import sample
from model import KVCache, ModelConfig, Transformer
from tests.helpers import run_script, run_script_expecting_error, tiny_config


def greedy_reference(model, prompt, steps):
    """A plain uncached argmax loop: the full forward over the whole sequence at every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_generate_greedy_equals_uncached_loop_and_transformers(tiny_model_dir, monkeypatch):
    model = Transformer.from_pretrained(tiny_model_dir).eval()
    prompts = [[5, 9, 13, 2], [7, 7], [20, 21, 22, 23, 24, 25, 26]]
    # The engine looks the module-level decode_step up at every call (what --compile relies on).
    calls = []
    monkeypatch.setattr(generate, "decode_step", lambda *a: calls.append(1)
                        or generate.eager_decode_step(*a))
    # 2 slots, 3 prompts: slots get refilled
    engine = generate.Engine(model, max_batch=2, stop_ids=[])
    outputs = engine.generate(prompts, n=1, max_new_tokens=12, temperature=0.0)
    assert len(calls) >= 11  # 12 tokens: the first from the prefill, the rest from decode steps
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for prompt, (out,) in zip(prompts, outputs):
        assert out["tokens"] == greedy_reference(model, prompt,
                                                 12) and out["finish_reason"] == "length"
        hf_tokens = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                                min_new_tokens=12,
                                pad_token_id=0)[0, len(prompt):].tolist()
        assert out["tokens"] == hf_tokens


def test_generate_stop_tokens_logprobs_and_n_samples(tiny_model_dir):
    torch.manual_seed(0)
    model = Transformer.from_pretrained(tiny_model_dir).eval()
    prompts = [[5, 9, 13], [7, 7, 8, 9]]
    stop = list(range(10, 60))  # many stop tokens so that most samples stop early
    engine = generate.Engine(model, max_batch=4, stop_ids=stop)
    seeds = [[generate.sample_seed(0, p, i) for i in range(3)] for p in range(2)]
    outputs = engine.generate(prompts, n=3, max_new_tokens=20, temperature=0.8, base_seeds=seeds)
    assert [len(o) for o in outputs] == [3, 3]
    reasons = [s["finish_reason"] for o in outputs for s in o]
    assert "stop" in reasons
    for prompt, samples in zip(prompts, outputs):
        for s in samples:
            body = s["tokens"][:-1] if s["finish_reason"] == "stop" else s["tokens"]
            assert not set(body) & set(stop)
            assert (s["tokens"][-1] in stop) == (s["finish_reason"] == "stop")
            # the log-probs are those of a teacher-forced forward at the same temperature
            with torch.no_grad():
                logits = model(torch.tensor([prompt + s["tokens"]]))[0, len(prompt) - 1:-1] / 0.8
            expected = (torch.log_softmax(logits, -1)
                        .gather(-1, torch.tensor(s["tokens"])[:, None])[:, 0])
            assert torch.allclose(torch.tensor(s["token_logprobs"]), expected, atol=1e-4)


def one_sample_reference(model, prompt, base_seed, max_new_tokens, stop, temperature, top_p):
    """One sample alone, as a plain loop: its prompt through generate.prefill into a cache of its
    own, then one cached forward per token, each token drawn with seed base_seed + step ·
    SEED_STRIDE. No slots, no batching, no refill. Returns (tokens, log-probs, finish reason)."""
    cache = KVCache(model.config, 1, len(prompt) + max_new_tokens, "cpu", torch.float32)
    with torch.no_grad():
        # (1, V)
        logits = generate.prefill(model, cache, torch.tensor([prompt]), torch.tensor([len(prompt)]))
        tokens, logprobs = [], []
        while True:
            # int64 wrap-around
            seeds = torch.tensor([base_seed]) + torch.tensor([len(tokens)]) * generate.SEED_STRIDE
            sampled = sample(logits, temperature, top_p=top_p, seeds=seeds)
            tokens.append(int(sampled.tokens))
            logprobs.append(float(sampled.logprobs_untruncated))
            if tokens[-1] in stop or len(tokens) == max_new_tokens:
                return tokens, logprobs, "stop" if tokens[-1] in stop else "length"
            position = torch.tensor([[len(prompt) + len(tokens) - 1]])
            logits = model(torch.tensor([tokens[-1:]]), position_ids=position, cache=cache)[:, 0]


@pytest.mark.parametrize("slots, rows_step", [(5, 8), (10, 1)])
def test_seeded_samples_equal_one_sample_at_a_time(tiny_model_dir, monkeypatch, slots, rows_step):
    """The engine shares slots, prefills prompts together and refills slots as samples end, and on a
    CPU decodes only the first slots that hold samples, moving the last samples there; none of that
    may change a sample: each equals the plain one-sample loop with the same seed."""
    # the PyTorch sampler, in the engine and the reference
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(generate, "DECODE_ROWS_STEP", rows_step)
    moves, rows, real_move, real_rows = ([], [], generate.GenerationState.move,
                                         generate.Engine.decode_rows)
    monkeypatch.setattr(generate.GenerationState, "move",
                        lambda *a: moves.append(a[1:3]) or real_move(*a))
    monkeypatch.setattr(generate.Engine, "decode_rows", lambda *a: rows.append(real_rows(*a))
                        or rows[-1])
    model = Transformer.from_pretrained(tiny_model_dir).eval()
    prompts = [[5 + (3 * p + j) % 50 for j in range(length)]
               for p, length in enumerate([3, 17, 9, 1, 30])]
    seeds = [[generate.sample_seed(5, p, i) for i in range(2)] for p in range(len(prompts))]
    stop = list(range(10, 25))
    # 5 slots: 5 prompts × 2 samples are prefilled 2 at once, queued, refilled. 10 slots: all at
    # once, then the step shrinks one row at a time as samples end.
    engine = generate.Engine(model, slots, stop_ids=stop)
    outputs = engine.generate(prompts, 2, max_new_tokens=12, temperature=0.9, top_p=0.9,
                              base_seeds=seeds)
    if rows_step == 1:
        assert moves and all(source > target for source, target in moves)
        assert rows[0] > 5 and min(rows) == 1 and rows == sorted(rows, reverse=True)
    reasons = set()
    for prompt, prompt_seeds, samples in zip(prompts, seeds, outputs):
        for seed, s in zip(prompt_seeds, samples):
            tokens, logprobs, reason = one_sample_reference(model, prompt, seed, 12, stop, 0.9, 0.9)
            assert (s["tokens"], s["finish_reason"]) == (tokens, reason)
            assert torch.allclose(torch.tensor(s["token_logprobs"]), torch.tensor(logprobs),
                                  atol=1e-5)
            reasons.add(reason)
    assert reasons == {"stop", "length"}


class FakeBar:
    """Stands in for a tqdm bar: keeps what it is told."""

    def __init__(self, total=None, **settings):
        self.total, self.settings, self.n, self.updates, self.postfix = total, settings, 0, [], None

    def update(self, count=1):
        self.n += count
        self.updates.append(count)

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


def test_progress_counts_prompts_as_their_samples_end(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = Transformer.from_pretrained(tiny_model_dir).eval()
    prompts = [[5 + p] * (2 + p) for p in range(5)]
    engine = generate.Engine(model, 4, stop_ids=[])  # 4 slots, 5 prompts × 2 samples: prompts wait
    # At each update, note how many prompts have all their samples (the call's state, spied on).
    events, bar, states = [], FakeBar(), []
    count, real_prefill, real_state = bar.update, generate.prefill, generate.GenerationState
    bar.update = lambda n=1: events.append(sum(all(samples)
                                               for samples in states[0].results)) or count(n)
    monkeypatch.setattr(generate, "prefill", lambda *args: events.append("prefill")
                        or real_prefill(*args))
    monkeypatch.setattr(generate, "GenerationState", lambda *args: states.append(real_state(*args))
                        or states[-1])
    engine.generate(prompts, 2, max_new_tokens=6, base_seeds=[[p, p + 1] for p in range(5)],
                    progress=bar)
    assert bar.updates == [1] * 5 and bar.postfix.endswith(" tok/s")
    # one update as each prompt's 2nd sample ends, not when the call returns: the first before the
    # last prefill
    assert [e for e in events if e != "prefill"] == [1, 2, 3, 4, 5]
    assert events.index(1) < len(events) - 1 - events[::-1].index("prefill")

    # process_in_chunks: one bar over this rank's remaining records (unit: prompt), advanced by the
    # process itself (reports_progress), and for what it did not count, a chunk at a time.
    bars = []
    monkeypatch.setattr(runs, "tqdm", lambda **settings: bars.append(FakeBar(**settings))
                        or bars[-1])
    records = [{"id": i} for i in range(7)]  # chunk_size 3: chunks of 3, 2 and 2
    single = init_distributed("cpu")

    def all_but_one_counted(chunk, bar):
        bar.update(len(chunk) - 1)
        return chunk

    runs.process_in_chunks(records, tmp_path / "a.jsonl", lambda chunk: chunk, single, chunk_size=3)
    runs.process_in_chunks(records, tmp_path / "b.jsonl", all_but_one_counted, single, chunk_size=3,
                             reports_progress=True)
    # a run that stopped after chunk 0
    write_jsonl(tmp_path / "c.jsonl.parts-n7-chunks3" / "000000.jsonl", records[:3])
    runs.process_in_chunks(records, tmp_path / "c.jsonl", lambda chunk: chunk, single, chunk_size=3)
    assert [(b.total, b.settings["unit"], b.updates) for b in bars] == [
        (7, "prompt", [3, 2, 2]), (7, "prompt", [2, 1, 1, 1, 1, 1]), (4, "prompt", [2, 2])]
    assert read_jsonl(tmp_path / "b.jsonl") == read_jsonl(tmp_path / "c.jsonl") == records


def test_response_text_drops_only_a_final_stop_token(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenizer("ab", add_special_tokens=False)["input_ids"]
    stop = {tokenizer.eos_token_id}
    # ended on a stop token
    assert generate.response_text(tokenizer, ids + [tokenizer.eos_token_id], stop) == "ab"
    # cut by max_new_tokens
    assert generate.response_text(tokenizer, ids, stop) == "ab"
    assert generate.response_text(tokenizer, [], stop) == ""


PROMPTS = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"reverse {w}"}]}
           for i, w in enumerate(["abc", "bd", "fedcba", "e", "cc"])]


def test_generate_cli_seeded_samples_do_not_depend_on_batch_size_or_ranks(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    base = ["generate.py", "--model", str(tiny_model_dir), "--prompts",
            str(tmp_path / "prompts.jsonl"), "--num-samples", "3",
            "--temperature", "1.0", "--max-new-tokens", "10", "--seed", "7", "--device", "cpu",
            "--logprobs"]
    run_script(base
               + ["--out", str(tmp_path / "a.jsonl"), "--batch-size", "3", "--chunk-size", "2"])
    run_script(base
               + ["--out", str(tmp_path / "c.jsonl"), "--batch-size", "6", "--chunk-size", "1"],
               nproc=2)
    a, c = (read_jsonl(tmp_path / f"{x}.jsonl") for x in "ac")
    # in process, 16 slots: every sample of every prompt decodes in one batch
    model = Transformer.from_pretrained(tiny_model_dir).eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    engine = generate.Engine(model, 16, [tokenizer.eos_token_id])
    b = generate.generate_records(engine, tokenizer, PROMPTS, 3, 10, temperature=1.0, seed=7,
                                  logprobs=True)
    assert [r["id"] for r in a] == [p["id"] for p in PROMPTS]
    assert [r["responses"] for r in a] == [r["responses"] for r in b] == [r["responses"] for r in c]
    assert all(len(r["responses"]) == 3 == len(r["num_tokens"]) == len(r["finish_reasons"])
               == len(r["logprobs"]) for r in a)
    # actually sampled, not one repeated answer
    assert len({resp for r in a for resp in r["responses"]}) > 5
    # a different seed gives different samples
    d = generate.generate_records(engine, tokenizer, PROMPTS, 3, 10, temperature=1.0, seed=8)
    assert [r["responses"] for r in d] != [r["responses"] for r in a]


def test_prompt_longer_than_the_context_is_a_one_line_error(tiny_model_dir, tmp_path):
    # The tiny model's context is 512 positions; the character tokenizer makes this prompt
    # 500+ tokens.
    prompts = PROMPTS[:2] + [{"id": "long", "messages": [{"role": "user", "content": "x" * 500}]}]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    error = run_script_expecting_error(["generate.py", "--model", str(tiny_model_dir),
                                        "--prompts", str(tmp_path / "prompts.jsonl"),
                                        "--out", str(tmp_path / "out.jsonl"),
                                        "--max-new-tokens", "16", "--device", "cpu"])
    assert (str(tmp_path / "prompts.jsonl") in error and "'long'" in error
            and "--max-new-tokens 16" in error)
    assert "512" in error and "drop the prompt" in error
    assert not (tmp_path / "out.jsonl").exists()
    # the same check guards generate_records, which dpo.py samples with
    model = Transformer.from_pretrained(tiny_model_dir).eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    engine = generate.Engine(model, 4, [tokenizer.eos_token_id])
    with pytest.raises(InputError, match="prompt id 'long'"):
        generate.generate_records(engine, tokenizer, prompts, 1, 16)
    assert len(generate.generate_records(engine, tokenizer, prompts[:2], 1, 16)) == 2
    engine.reserve(1024)
    assert engine.cache.max_len == 512  # never a cache longer than the context


def test_resume_with_other_settings_stops_and_names_them(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "out.jsonl"
    args = ["generate.py", "--model", str(tiny_model_dir), "--prompts",
            str(tmp_path / "prompts.jsonl"), "--out", str(out),
            "--max-new-tokens", "6", "--seed", "3", "--device", "cpu", "--chunk-size", "2"]
    # What a run with --n 3 that stopped after its first chunk leaves behind: its settings record.
    parts = tmp_path / "out.jsonl.parts-n5-chunks3"  # 5 prompts, --chunk-size 2, 1 rank: 3 chunks
    parts.mkdir()
    earlier = dict(model=str(tiny_model_dir.resolve()), n=3, max_new_tokens=6, temperature=1.0,
                   top_k=0, top_p=1.0, min_p=0.0,
                   seed=3, logprobs=False)
    (parts / "settings.json").write_text(json.dumps(earlier))
    error = run_script_expecting_error(args + ["--n", "2"])
    assert "(n 3 → 2, recorded in" in error and str(parts) in error  # n and only n differs
    assert not out.exists()
    run_script(args + ["--n", "3"])  # the recorded settings: the run goes on
    assert [len(r["responses"]) for r in read_jsonl(out)] == [3] * 5 and not parts.exists()


def test_empty_prompts_file_is_a_one_line_error(tiny_model_dir, tmp_path):
    (tmp_path / "prompts.jsonl").write_text("")
    error = run_script_expecting_error(["generate.py", "--model", str(tiny_model_dir), "--prompts",
                                        str(tmp_path / "prompts.jsonl"),
                         "--out", str(tmp_path / "out.jsonl"), "--device", "cpu"])
    assert str(tmp_path / "prompts.jsonl") in error


# ----------------------------------------------------------------------------------------------
# Memory: the cache sized by each call's prompts, decode slots from free memory, decode reading only
# the cache positions in use, prompts over --max-prompt-length skipped


def test_decode_slots_fit_the_free_memory():
    config = ModelConfig.from_dict(tiny_config(40))
    # a slot: 2 layers × (K, V) × 2 KV heads × 16 dims × 4 bytes (fp32) × 128 positions
    per_slot = 2 * 2 * 2 * 16 * 4 * 128
    free = 10.5 * per_slot / 0.8  # 80 % of it holds 10.5 slots
    assert generate.decode_slots(config, 128, torch.float32, free) == 10
    assert generate.decode_slots(config, 128, torch.bfloat16, free) == 21  # half the bytes a slot
    assert generate.decode_slots(config, 256, torch.float32, free) == 5    # twice the positions
    # 80 % of one slot: none (the engine says so)
    assert generate.decode_slots(config, 128, torch.float32, per_slot) == 0
    assert generate.decode_slots(config, 128, torch.float32, 1e15) == generate.MAX_AUTO_SLOTS
    assert generate.decode_slots(config, 128, torch.float32, free, cap=7) == 7
    # Llama-3-8B, bf16, 4096 positions: 32 layers × 2 × 8 KV heads × 128 dims × 2 bytes × 4096 = 512
    # MiB a slot
    llama = ModelConfig.from_dict(dict(model_type="llama", max_position_embeddings=8192,
                                       **generate.BENCH_SHAPES["Llama-3-8B"]))
    assert generate.decode_slots(llama, 4096, torch.bfloat16, 60 * 2**30) == 96


def test_engine_sizes_its_cache_per_call_and_reuses_it(tiny_model_dir, monkeypatch):
    # the PyTorch sampler: this test is about the cache
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = Transformer.from_pretrained(tiny_model_dir).eval()
    # 0: automatic, the CPU default here
    engine = generate.Engine(model, 0, stop_ids=[], cpu_slots=3)
    assert engine.cache is None  # nothing allocated before the first call
    engine.generate([[5] * 10, [6] * 4], 1, max_new_tokens=20)
    first = engine.cache
    # 10 + 20 positions, rounded up to 64; 3 slots
    assert first.max_len == 64 and first.k[0].shape[0] == 3
    engine.generate([[5] * 40], 1, max_new_tokens=20)  # 60 positions: the same cache
    assert engine.cache is first
    engine.generate([[5] * 50], 1, max_new_tokens=20)  # 70: a longer one
    assert engine.cache.max_len == 128
    engine.generate([[5] * 511], 1, max_new_tokens=1)  # exactly the context (512)
    assert engine.cache.max_len == 512
    with pytest.raises(ValueError, match="exceeds the context"):
        engine.generate([[5] * 511], 1, max_new_tokens=2)
    with pytest.raises(ValueError, match="n = 4 samples per prompt need at least n decode slots"):
        engine.generate([[5]], 4, max_new_tokens=2)


def test_decode_reads_only_the_cache_in_use_and_samples_do_not_change(tiny_model_dir, monkeypatch):
    """Each decode step reads cache_len = the largest position in use + 1, rounded up to 64 (known
    on the host, no device read), not the whole cache; the samples are those of decoding over the
    whole cache, and of prefilling one prompt per forward."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = Transformer.from_pretrained(tiny_model_dir).eval()
    prompts = [[5 + i % 7] * length for i, length in enumerate([3, 17, 40, 8, 25])]
    seeds = [[generate.sample_seed(0, p, i) for i in range(2)] for p in range(len(prompts))]
    stop = [10, 11, 12]  # samples end at different steps: slots are refilled at other positions

    def run():
        engine = generate.Engine(model, 4, stop_ids=stop)  # 4 slots, 5 prompts × 2 samples
        engine.reserve(512)  # a long cache, of which decoding should read only the start
        return engine.generate(prompts, 2, max_new_tokens=70, temperature=1.0, base_seeds=seeds)

    read = []

    def spy(model, cache, tokens, positions, cache_len, *rest):
        read.append((cache_len, int(positions.max())))
        return generate.eager_decode_step(model, cache, tokens, positions, cache_len, *rest)

    monkeypatch.setattr(generate, "decode_step", spy)
    outputs = run()
    assert all(cache_len == min(generate.round_up(top + 1, 64), 512) for cache_len, top in read)
    # of 512; positions stay below 40 + 70
    assert read[0][0] == 64 and {cache_len for cache_len, _ in read} == {64, 128}

    monkeypatch.setattr(generate, "decode_step",
                        lambda model, cache, tokens, positions, cache_len, *rest:
                        generate.eager_decode_step(model, cache, tokens, positions, cache.max_len,
                                                   *rest))
    whole_cache = run()
    monkeypatch.setattr(generate, "decode_step", generate.eager_decode_step)
    monkeypatch.setattr(generate, "PREFILL_TOKENS", 1)  # one prompt per prefill forward
    one_prompt_prefills = run()
    assert any(s["finish_reason"] == "stop" for o in outputs
               for s in o) and any(s["finish_reason"] == "length" for o in outputs for s in o)
    for other in (whole_cache, one_prompt_prefills):
        assert [[s["tokens"] for s in o] for o in other] == [[s["tokens"] for s in o]
                                                             for o in outputs]
        for o, p in zip(other, outputs):
            for s, t in zip(o, p):
                assert torch.allclose(torch.tensor(s["token_logprobs"]),
                                      torch.tensor(t["token_logprobs"]), atol=1e-5)


def test_prompts_over_max_prompt_length_are_skipped_and_counted(tiny_model_dir, tmp_path, capsys,
                                                                monkeypatch):
    tokenizer = load_tokenizer(tiny_model_dir)
    # The character tokenizer makes PROMPTS 30, 29, 33, 28 and 29 tokens long.
    kept, ids = generate.encode_prompts(tokenizer, PROMPTS, 16, 512, "p.jsonl",
                                        max_prompt_length=29)
    assert [r["id"] for r in kept] == ["q1", "q3", "q4"] and [len(i) for i in ids] == [29, 28, 29]
    assert ("skipped 2 of 5 prompts in p.jsonl longer than --max-prompt-length 29 tokens"
            in capsys.readouterr().out)
    # A skipped prompt is never truncated, nor an error when it would not fit the context ...
    too_long = PROMPTS + [{"id": "long", "messages": [{"role": "user", "content": "x" * 500}]}]
    kept, _ = generate.encode_prompts(tokenizer, too_long, 16, 512, max_prompt_length=40)
    assert [r["id"] for r in kept] == [p["id"] for p in PROMPTS]
    # ... no limit keeps every prompt and says nothing; a limit that leaves nothing is an error
    kept, _ = generate.encode_prompts(tokenizer, PROMPTS, 16, 512)
    assert kept == PROMPTS and capsys.readouterr().out.count("skipped") == 1
    with pytest.raises(InputError, match="all 5 prompts are longer than --max-prompt-length 10"):
        generate.encode_prompts(tokenizer, PROMPTS, 16, 512, max_prompt_length=10)

    # The command line: the skipped prompts' records are absent, the others in order.
    write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(sys, "argv",
                        ["generate.py", "--model", str(tiny_model_dir), "--prompts",
                         str(tmp_path / "prompts.jsonl"),
                                      "--out", str(tmp_path / "out.jsonl"), "--n", "2",
                                      "--max-new-tokens", "3", "--device", "cpu",
                                      "--max-prompt-length", "29"])
    generate.main()
    assert (f"skipped 2 of 5 prompts in {tmp_path / 'prompts.jsonl'} longer than "
            "--max-prompt-length 29 tokens" in capsys.readouterr().out)
    assert [(r["id"], len(r["responses"]))
            for r in read_jsonl(tmp_path / "out.jsonl")] == [("q1", 2), ("q3", 2), ("q4", 2)]


def test_engine_refills_when_every_sample_ends_on_its_first_token(tiny_model_dir):
    """max_new_tokens = 1 (or a policy that stops at once) with more prompts than slots: every slot
    empties right after admission while prompts wait; the engine refills instead of decoding."""
    model = Transformer.from_pretrained(tiny_model_dir).eval()
    prompts = [[5 + i % 7] * (3 + i) for i in range(10)]
    seeds = [[generate.sample_seed(0, p, i) for i in range(2)] for p in range(len(prompts))]
    outputs = generate.Engine(model, 4, stop_ids=[3]).generate(prompts, 2, max_new_tokens=1,
                                                               base_seeds=seeds)
    assert len(outputs) == 10 and all(len(s["tokens"]) == 1 for o in outputs for s in o)
