"""Tests of LoRA (model.LoRALinear, Transformer.add_lora, merge_lora, PEFT's adapter format) and of
the stages trained with it: B = 0 starts at the base, only the adapters learn, merged = unmerged
(full forward and cached decode), adapters off = the base bit for bit, the PEFT export loads in the
real `peft` package to the same logits, and 2 ranks = 1 rank."""
import pytest
import torch
from safetensors.torch import load_file

import generate
from runs import read_jsonl
from model import (LoRALinear, LoRASettings, KVCache, Transformer, merge_lora, read_adapter,
                   save_adapter)
from tests.helpers import run_script, tiny_config, write_pairs, write_sft_data

LORA = LoRASettings(rank=4, alpha=8.0, dropout=0.0)


def adapted_model(seed=0, lora=LORA, head="lm", perturb=True):
    """A tiny random model with adapters; `perturb`: B drawn at random (as after training),
    not 0."""
    torch.manual_seed(seed)
    model = Transformer.from_config(tiny_config(50), head=head).add_lora(lora)
    if perturb:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LoRALinear):
                    module.lora_B.normal_(0, 0.2)
    return model.eval()


def test_fresh_adapters_equal_the_base_and_only_adapters_train():
    torch.manual_seed(0)
    base = Transformer.from_config(tiny_config(50))
    adapted = Transformer.from_config(tiny_config(50))
    adapted.load_state_dict(base.state_dict())
    adapted.add_lora(LORA)
    input_ids = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        assert torch.equal(adapted(input_ids), base(input_ids))  # B = 0: the update is exactly 0
    adapted.train()
    adapted(input_ids, targets=input_ids).sum().backward()
    trained = {n for n, p in adapted.named_parameters() if p.grad is not None}
    assert trained == {n for n, _ in adapted.named_parameters()
                       if n.endswith((".lora_A", ".lora_B"))}
    assert len(trained) == 2 * 7 * 2  # 7 targets × 2 layers, A and B each
    # B = 0 at init: A's gradient is 0 at step one, B's is not (as for PEFT)
    assert all(p.grad.abs().max() > 0 for n, p in adapted.named_parameters()
               if n.endswith(".lora_B"))


def test_adapters_off_is_the_base_model_bit_for_bit():
    model = adapted_model()
    base = Transformer.from_config(tiny_config(50))
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    input_ids = torch.randint(0, 50, (3, 9))
    with torch.no_grad():
        adapted = model(input_ids)
        with model.adapters_disabled():
            off = model(input_ids, targets=input_ids)
            off_logits = model(input_ids)
        assert torch.equal(off_logits, base(input_ids))
        assert torch.equal(off, base(input_ids, targets=input_ids))
        assert (adapted - off_logits).abs().max() > 1e-3  # the adapters do change the model
        assert torch.equal(model(input_ids), adapted)       # and are back on after the block


def test_merged_equals_unmerged_in_full_forward_and_cached_decode():
    model = adapted_model()
    merged = Transformer.from_config(tiny_config(50))
    merged.load_state_dict(merge_lora(model.state_dict(), LORA.scaling))
    merged.eval()
    input_ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(input_ids), merged(input_ids), atol=1e-5)
        # cached decode: prefill 8 tokens, then 4 one at a time, against the merged full forward
        cache = KVCache(model.config, 2, 16, "cpu", torch.float32)
        generate.prefill(model, cache, input_ids[:, :8], torch.tensor([8, 8]))
        for t in range(8, 12):
            positions = torch.full((2, 1), t)
            step_logits = model(input_ids[:, t:t + 1], position_ids=positions, cache=cache)[:, 0]
            assert torch.allclose(step_logits, merged(input_ids[:, :t + 1])[:, -1], atol=1e-5)


def test_a_lora_model_saves_merged_and_its_adapter_loads_in_peft(tmp_path, tiny_model_dir):
    """save_pretrained writes W + s·BA (transformers loads it to our logits); save_adapter writes
    PEFT's format, which peft.PeftModel.from_pretrained loads onto the base to the same logits; and
    read_adapter reads it back exactly."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    settings = LoRASettings(4, 8.0, 0.0, ("down_proj", "q_proj", "v_proj"))
    model = Transformer.from_pretrained(tiny_model_dir).add_lora(settings)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(0, 0.2)
    model.eval()
    model.save_pretrained(tmp_path / "merged")
    save_adapter(tmp_path / "adapter", model.state_dict(), model.lora, base_model=tiny_model_dir)
    assert not any("lora" in k for k in load_file(tmp_path / "merged" / "model.safetensors"))
    input_ids = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.no_grad():
        ours = model(input_ids)
        hf_merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert (hf_merged(input_ids).logits - ours).abs().max() < 1e-4
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        assert (with_adapter(input_ids).logits - ours).abs().max() < 1e-4
    lora, state = read_adapter(tmp_path / "adapter")
    assert lora == model.lora
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items() if "lora_" in k)


def test_a_reward_model_adapter_carries_its_score_head(tmp_path, tiny_model_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    model = Transformer.from_pretrained(tiny_model_dir, head="score").add_lora(LORA)
    assert model.score.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(0, 0.2)
    model.eval()
    save_adapter(tmp_path / "adapter", model.state_dict(), model.lora, head="score",
                 base_model=tiny_model_dir)
    input_ids = torch.randint(1, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir,
                                                                  num_labels=1).eval()
        with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        assert abs(with_adapter(input_ids).logits[0, 0] - model(input_ids)[0, -1]) < 1e-4


def test_lora_keeps_the_frozen_base_in_the_compute_dtype():
    torch.manual_seed(0)
    model = Transformer.from_config(tiny_config(50)).add_lora(LORA, frozen_dtype=torch.bfloat16)
    dtypes = {p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    with pytest.raises(ValueError, match="LoRA targets"):
        Transformer.from_config(tiny_config(50)).add_lora(LoRASettings(4, 8.0, targets=("qkv",)))


SFT_ARGS = ["--block-size", "64", "--batch-size", "8", "--micro-batch-size", "2",
            "--max-steps", "3", "--lr", "1e-2", "--device", "cpu", "--lora-rank", "4",
            "--lora-alpha", "8", "--lora-targets", "q,v,down", "--save-adapter"]


@pytest.fixture(scope="module")
def lora_sft_one(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_sft")
    write_sft_data(folder / "sft.jsonl", n=48)
    run_script(["sft.py", "--model", str(tiny_model_dir), "--data", str(folder / "sft.jsonl"),
                "--out", str(folder / "one"), *SFT_ARGS])
    return folder


def test_lora_sft_trains_only_adapters_and_saves_merged_plus_peft_adapter(lora_sft_one,
                                                                          tiny_model_dir):
    out = lora_sft_one / "one"
    merged = load_file(out / "model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert merged.keys() == initial.keys()
    changed = {n for n in merged if not torch.equal(merged[n], initial[n])}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))
                           for n in changed)
    lora, adapter = read_adapter(out / "adapter")
    assert (lora.rank, lora.alpha, lora.targets) == (4, 8.0, ("down_proj", "q_proj", "v_proj"))
    model = Transformer.from_pretrained(tiny_model_dir).add_lora(lora)
    model.load_state_dict(adapter, strict=False)
    assert all(torch.allclose(v, merged[k], atol=1e-6)
               for k, v in merge_lora(model.state_dict(), lora.scaling).items())
    assert len(read_jsonl(out / "metrics.jsonl")) == 3


# (DDP with LoRA: frozen parameters simply have no gradient bucket)
@pytest.mark.parametrize("parallel", ["fsdp"])
def test_lora_sft_on_two_ranks_equals_one(parallel, lora_sft_one, tiny_model_dir, tmp_path):
    run_script(["sft.py", "--model", str(tiny_model_dir), "--data", str(lora_sft_one / "sft.jsonl"),
                "--out", str(tmp_path / "two"), "--parallel", parallel, *SFT_ARGS], nproc=2)
    _, one = read_adapter(lora_sft_one / "one" / "adapter")
    _, two = read_adapter(tmp_path / "two" / "adapter")
    assert one.keys() == two.keys()
    for name in one:
        assert (one[name] - two[name]).abs().max().item() <= 1e-5, name


def test_lora_online_dpo_uses_the_same_model_adapters_off_as_reference(task_dir, tmp_path,
                                                                       monkeypatch):
    """Two online iterations with LoRA on the built-in task (gold reward): step 1 of iteration 1
    has the DPO loss log 2 (policy = reference, adapters fresh); iteration 2 continues iteration
    1's adapter on π_0, and its reference log-probs (adapters off) are those of a plain π_0."""
    from tokens import load_tokenizer, tokenize_pairs
    from losses import sequence_logps
    from tests.helpers import run_builtin_online

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sft, run = run_builtin_online(task_dir, tmp_path, "--lora-rank", "4", lr="1e-2")
    step1 = read_jsonl(run / "iter1" / "policy" / "metrics.jsonl")[0]
    assert step1["loss"] == pytest.approx(0.6931472, abs=1e-5)
    assert step1["log_ratio"] == pytest.approx(0, abs=1e-6)
    assert (run / "iter1" / "policy" / "adapter" / "adapter_config.json").exists()
    tokenizer = load_tokenizer(sft)
    _, examples = tokenize_pairs(tokenizer, read_jsonl(run / "iter2" / "pairs.jsonl"), 4096)
    pi0 = Transformer.from_pretrained(sft).eval()
    with torch.no_grad():
        logps, _ = sequence_logps(pi0, [e[0] for e in examples], [e[1] for e in examples],
                                  tokenizer.pad_token_id, "cpu")
    recorded = [r["ref_chosen_logp"] for r in read_jsonl(run / "iter2" / "ref_logps.jsonl")]
    assert recorded == pytest.approx(logps.tolist(), abs=1e-4)
    # iteration 2's policy = π_0 + the adapter trained over both iterations (merged on save)
    lora, adapter2 = read_adapter(run / "iter2" / "policy" / "adapter")
    _, adapter1 = read_adapter(run / "iter1" / "policy" / "adapter")
    assert any(not torch.equal(adapter1[k], adapter2[k]) for k in adapter1)
    model = Transformer.from_pretrained(sft).add_lora(lora)
    model.load_state_dict(adapter2, strict=False)
    merged = load_file(run / "iter2" / "policy" / "model.safetensors")
    assert all(torch.allclose(v, merged[k], atol=1e-6)
               for k, v in merge_lora(model.state_dict(), lora.scaling).items())


def osp_args(sft, prompts, out, *extra):
    return ["osp.py", "--model", str(sft), "--prompts", str(prompts), "--out", str(out),
            "--steps", "2", "--batch-size", "2", "--k", "3", "--max-new-tokens", "6",
            "--lr", "1e-2", "--beta", "0.1", "--device", "cpu", *extra]
# (--loss dpo in the rank comparison: SPCE's gradient β(σ(βh) − p) at h = 0 with a judge target
# p ≈ 0.5001 is a difference of nearly equal numbers, whose float noise AdamW then normalises up
# to full-size steps)


@pytest.fixture(scope="module")
def osp_sft(task_dir, tmp_path_factory):
    from tests.helpers import builtin_model_dir
    return builtin_model_dir(task_dir, tmp_path_factory.mktemp("osp_lora") / "sft")


@pytest.mark.parametrize("lora", [False, True])
def test_osp_fsdp_on_two_ranks_equals_one_and_lora_starts_at_the_reference(lora, osp_sft,
                                                                           task_dir, tmp_path):
    """Without LoRA: OSP with the policy, reference and judge under FSDP2 on 2 ranks (each rollout
    and judging pass on a gathered model) gives the update one process gives. With LoRA (paper 2's
    setup: the reference and the judge are the policy with its adapters off), one process: step 1 is
    at the reference and only the adapted weights move. Both: step 1 has loss log 2, implicit
    strength 1/2, KL 0. (LoRA's 2 ranks = 1 is test_lora_sft_on_two_ranks_equals_one.)"""
    lora_args = ["--lora-rank", "4", "--lora-targets", "q,o,up", "--save-adapter"]
    extra = ["--loss", "dpo"] + (lora_args if lora else [])
    prompts = task_dir / "prompts_iter1.jsonl"
    run_script(osp_args(osp_sft, prompts, tmp_path / "one", *extra))
    one = load_file(tmp_path / "one" / "model.safetensors")
    initial = load_file(osp_sft / "model.safetensors")
    update_one = torch.cat([(one[n] - initial[n]).flatten() for n in one])
    assert update_one.norm() > 1e-2
    line = read_jsonl(tmp_path / "one" / "metrics.jsonl")[0]
    assert line["loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert line["implicit_strength"] == pytest.approx(0.5, abs=1e-7)
    assert abs(line["pair_kl"]) < 1e-6
    if lora:
        moved = {n for n in one if (one[n] - initial[n]).abs().max() > 1e-6}
        assert moved and all(n.endswith(("q_proj.weight", "o_proj.weight", "up_proj.weight"))
                             for n in moved)
        assert (tmp_path / "one" / "adapter" / "adapter_model.safetensors").exists()
        return
    run_script(osp_args(osp_sft, prompts, tmp_path / "two", "--parallel", "fsdp", *extra), nproc=2)
    two = load_file(tmp_path / "two" / "model.safetensors")
    # The updates agree to 1% in norm. (Not weight by weight: AdamW's first steps move a weight by
    # ~lr whatever its gradient's size, so a gradient that is float noise, as on the embedding rows
    # of unused tokens, moves its weight by noise × lr / noise.)
    update_two = torch.cat([(two[n] - initial[n]).flatten() for n in one])
    assert (update_one - update_two).norm() <= 1e-2 * update_one.norm()
    metrics_one = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    metrics_two = read_jsonl(tmp_path / "two" / "metrics.jsonl")
    losses_one = [m["loss"] for m in metrics_one]
    assert [m["loss"] for m in metrics_two] == pytest.approx(losses_one, abs=1e-5)
    # AdamW would hide a gradient scaled wrongly across ranks; the gradient norm does not
    grad_norms_one = [m["grad_norm"] for m in metrics_one]
    assert [m["grad_norm"] for m in metrics_two] == pytest.approx(grad_norms_one, rel=1e-3)


def test_lora_reward_model_trains_its_adapters_and_score_head(tiny_model_dir, tmp_path):
    write_pairs(tmp_path / "pairs.jsonl", 16)
    run_script(["train_rm.py", "train", "--type", "bt", "--model", str(tiny_model_dir),
                "--pairs", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "rm"),
                "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "2", "--lr", "1e-2",
                "--device", "cpu", "--lora-rank", "4", "--save-adapter"])
    lora, adapter = read_adapter(tmp_path / "rm" / "adapter")
    assert "score.weight" in adapter and lora.rank == 4
    rm = Transformer.from_pretrained(tmp_path / "rm", head="score")
    assert torch.equal(rm.score.weight, adapter["score.weight"].to(rm.score.weight.dtype))
    initial = load_file(tiny_model_dir / "model.safetensors")
    saved = load_file(tmp_path / "rm" / "model.safetensors")
    # frozen
    assert torch.equal(saved["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])


def small_update_lora(source, scale=2e-3):
    """π_0 from `source` with frozen weights in bf16 (a GPU's compute dtype) and an adapter whose
    update is about as small as ~100 AdamW steps at lr 2e-5 make it: most of it is below bf16's
    rounding step of W."""
    torch.manual_seed(1)
    model = Transformer.from_pretrained(source).add_lora(LORA, frozen_dtype=torch.bfloat16)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=scale)
    return model


def test_lora_export_merges_into_the_asked_dtype_from_the_source_on_disk(tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    """--save-dtype float32 after LoRA training in bf16: W + s·BA from the fp32 source, to 1% of
    the update, and every weight LoRA did not touch the source's bit for bit. (Merged into the
    bf16 copy the model computes with, the export was off the exact merge by ~15× the update.)
    In bf16: rounded once."""
    from parallel import save_checkpoint
    monkeypatch.setenv("RLHF_EMULATE_GPU", "1")
    model = small_update_lora(tiny_model_dir)
    source = load_file(tiny_model_dir / "model.safetensors")
    state = model.state_dict()
    exact = {}
    for name, tensor in source.items():
        prefix = name.removesuffix(".weight")
        if f"{prefix}.lora_A" in state:
            update = LORA.scaling * (state[f"{prefix}.lora_B"] @ state[f"{prefix}.lora_A"])
            exact[name] = (tensor.float() + update, update)
    assert exact and all(t.dtype == torch.float32 for t in source.values())
    for dtype in (torch.float32, torch.bfloat16):
        save_checkpoint(model, tmp_path / str(dtype), None, source_dir=tiny_model_dir, dtype=dtype)
        saved = load_file(tmp_path / str(dtype) / "model.safetensors")
        assert saved.keys() == source.keys() and {t.dtype for t in saved.values()} == {dtype}
        for name, tensor in saved.items():
            if name not in exact:
                assert torch.equal(tensor, source[name].to(dtype)), name
            elif dtype == torch.float32:
                merged, update = exact[name]
                assert (tensor - merged).abs().max() <= 0.01 * update.abs().max(), name
            else:
                assert torch.equal(tensor, exact[name][0].to(dtype)), name


def test_lora_export_of_a_model_trained_from_scratch_keeps_its_own_base(tiny_model_dir, tmp_path):
    """sft.py --scratch --lora-rank: the frozen base is a random init, which no file holds. The
    export is that base + s·BA, from a config-only --model folder as from one that holds other
    weights."""
    import shutil

    from parallel import save_checkpoint
    (tmp_path / "config_only").mkdir()
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config_only")
    torch.manual_seed(2)
    model = Transformer.from_config(tiny_config(123)).add_lora(LORA)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.1)
    expected = merge_lora(model.state_dict(), LORA.scaling)
    for source in (tmp_path / "config_only", tiny_model_dir):
        save_checkpoint(model, tmp_path / source.name / "out", None, source_dir=source,
                        dtype=torch.float32)
        saved = load_file(tmp_path / source.name / "out" / "model.safetensors")
        assert all(torch.equal(saved[name], expected[name]) for name in saved), source


def test_online_lora_iteration_samples_from_pi0_plus_its_adapter_unmerged(tiny_model_dir,
                                                                          tmp_path, monkeypatch):
    """Iteration t + 1 samples from π_0 + iteration t's adapter, computing as training did (bf16
    base, adapter unmerged), not from the merged bf16 checkpoint, which loses most of a small
    update."""
    from types import SimpleNamespace

    from parallel import save_checkpoint
    from dpo import sampling_policy
    monkeypatch.setenv("RLHF_EMULATE_GPU", "1")
    model = small_update_lora(tiny_model_dir)
    policy_dir = tmp_path / "iter1" / "policy"
    save_checkpoint(model, policy_dir, None, source_dir=tiny_model_dir, dtype=torch.bfloat16,
                    save_adapter=True)
    args = SimpleNamespace(lora_rank=LORA.rank, iter=2, sft=tiny_model_dir)
    sampler = sampling_policy(args, policy_dir, "cpu", torch.bfloat16)
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad():
        trained, sampled = model.eval()(ids).float(), sampler(ids).float()
        merged = Transformer.from_pretrained(policy_dir, dtype=torch.bfloat16).eval()(ids).float()
        base = Transformer.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()(ids).float()
    assert torch.equal(sampled, trained)  # the trained model, as it computed
    update = (trained - base).abs().max()
    # what sampling from the export lost
    assert update > 0 and (merged - trained).abs().max() > 0.1 * update
    # without LoRA: the checkpoint
    checkpoint = sampling_policy(SimpleNamespace(lora_rank=0, iter=2, sft=tiny_model_dir),
                                 policy_dir, "cpu", torch.bfloat16)
    assert checkpoint(ids).float().equal(merged)
    from runs import InputError
    with pytest.raises(InputError, match="every iteration from the first must train with LoRA"):
        sampling_policy(SimpleNamespace(lora_rank=4, iter=2, sft=tiny_model_dir, run_dir=tmp_path),
                        tmp_path, "cpu", torch.bfloat16)
