"""A Llama-family decoder written from scratch: Llama-2/3, TinyLlama, Mistral, Qwen2, SmolLM2.

    from model import Transformer
    model = Transformer.from_pretrained("path/to/hf_folder", device="cuda", dtype=torch.bfloat16)
    logits = model(input_ids)                 # (B, T, V)
    hidden = model.hidden_states(input_ids)   # (B, T, H) final-normed, for kernels/logprob.py
    model.save_pretrained("out/")             # loads unchanged in transformers.AutoModelForCausalLM

Architecture (one decoder block):  x = x + Attn(RMSNorm(x));  x = x + MLP(RMSNorm(x))
  - RMSNorm computed in fp32 and cast back, as the reference implementation does;
  - rotary position embeddings on q and k (rotate-half layout), with Llama-3 "rope_scaling";
  - grouped-query attention (n_kv_heads ≤ n_heads) through F.scaled_dot_product_attention;
  - SwiGLU MLP: down(silu(gate(x)) * up(x));
  - optional q/k/v bias (Qwen2), tied or untied input/output embeddings.

Parameter names deliberately equal the Hugging Face names (`model.layers.3.self_attn.q_proj.weight`, ...)
so a checkpoint's state dict loads and saves with no renaming table to get wrong.
"""
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.logprob import token_logprobs

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# ----------------------------------------------------------------------------------------------
# Config: read from an HF config.json; the raw dict is kept so save_pretrained writes it back.


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None          # None, {"rope_type": "linear"|"llama3", ...}
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool                     # Qwen2 (always) or Llama's attention_bias
    o_bias: bool                       # Llama's attention_bias also biases o_proj
    mlp_bias: bool
    sliding_window: int | None         # Mistral; we only run sequences shorter than it
    raw: dict                          # the original config.json contents

    @classmethod
    def from_dict(cls, d):
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d.get('hidden_act')!r} is not supported (only silu / SwiGLU)")
        # Two config styles exist: older `rope_theta` + `rope_scaling`, newer `rope_parameters`
        # (transformers >= 5) holding rope_type, rope_theta and the scaling keys together.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope scaling type {rope_type!r} is not supported (default, linear, llama3)")
        attention_bias = bool(d.get("attention_bias", False))
        n_heads = d["num_attention_heads"]
        use_sliding = d.get("use_sliding_window", model_type == "mistral")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=d.get("sliding_window") if use_sliding else None,
            raw=dict(d),
        )


# ----------------------------------------------------------------------------------------------
# Rotary embeddings


def rope_inverse_frequencies(config):
    """inv_freq[i] = theta^(-2i/D), adjusted by the checkpoint's rope scaling. Shape (D/2,), fp32."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.float()
    if scaling["rope_type"] == "linear":  # position interpolation: positions / factor
        return (inv_freq / scaling["factor"]).float()
    # Llama-3.1 "llama3": long wavelengths are slowed by `factor`, short ones are kept, and the band
    # between low_freq_factor and high_freq_factor is interpolated smoothly (Meta's reference code).
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength, high_freq_wavelength = old_context / low, old_context / high
    scaled = torch.where(wavelength > low_freq_wavelength, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return torch.where(is_medium, smoothed, scaled).float()


def rope_cos_sin(inv_freq, position_ids, dtype):
    """cos/sin tables for the given positions: (B, T) -> two (B, 1, T, D) tensors (fp32 math)."""
    angles = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)          # (B, T, D): rotate-half layout
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    """x: (B, n_heads, T, D). Rotate-half form: pairs (i, i + D/2), as HF checkpoints expect."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ----------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32 (bf16 variance loses precision), cast back, then scale.
        x_float = x.float()
        x_float = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_float.to(x.dtype)


class KVCache:
    """A preallocated static cache: per layer k, v of shape (B, n_kv_heads, max_len, D), indexed by
    position. The key/value of the token at position p of row b live at [b, :, p]. Each row moves at
    its own pace: a forward with position_ids (B, T) writes the new tokens' keys/values at those
    positions and each query at position p attends to slots 0..p of its row. So rows need no
    padding bookkeeping: slots past a row's current position (stale or padding) are never attended,
    and are overwritten when the row reaches them. Fixed shapes, so a decode step can be compiled."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        if config.sliding_window is not None and max_len > config.sliding_window:
            raise ValueError(f"cache of {max_len} positions exceeds the sliding window ({config.sliding_window}), "
                             "which this implementation does not apply")
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        H = config.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(H, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(H, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=config.o_bias)

    def forward(self, x, cos, sin, attn_mask, cache=None, layer_index=0, position_ids=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, nh, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # write the new keys/values at their positions; attend over the whole cache
            index = position_ids[:, None, :, None].expand(B, self.n_kv_heads, T, self.head_dim)
            cache.k[layer_index].scatter_(2, index, k.to(cache.k[layer_index].dtype))
            cache.v[layer_index].scatter_(2, index, v.to(cache.v[layer_index].dtype))
            k, v = cache.k[layer_index], cache.v[layer_index]  # (B, nkv, max_len, D); attn_mask hides the rest
        # is_causal only when there is no explicit mask (the fast flash path on GPU).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        H, I, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(H, I, bias=bias)
        self.up_proj = nn.Linear(H, I, bias=bias)
        self.down_proj = nn.Linear(I, H, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask, cache=None, layer_index=0, position_ids=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, layer_index, position_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings + decoder blocks + final norm (HF's `model.` prefix)."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# ----------------------------------------------------------------------------------------------
# The model


ARCHITECTURES = {("llama", "lm"): "LlamaForCausalLM", ("mistral", "lm"): "MistralForCausalLM", ("qwen2", "lm"): "Qwen2ForCausalLM",
                 ("llama", "score"): "LlamaForSequenceClassification", ("mistral", "score"): "MistralForSequenceClassification",
                 ("qwen2", "score"): "Qwen2ForSequenceClassification"}


class Transformer(nn.Module):
    """head="lm": a causal LM (logits over the vocabulary).
    head="score": a reward model, the same backbone with a linear scalar head `score` (H -> 1, no
    bias) in place of the LM head, saved as HF's *ForSequenceClassification with num_labels=1."""

    def __init__(self, config: ModelConfig, head="lm"):
        super().__init__()
        if head not in ("lm", "score"):
            raise ValueError(f"head must be 'lm' or 'score', got {head!r}")
        self.config, self.head = config, head
        self.model = Backbone(config)
        self.lm_head = None
        if head == "lm" and not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if head == "score":
            self.score = nn.Linear(config.hidden_size, 1, bias=False)
        # Not a parameter and not saved: recomputed from the config on every construction.
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    @property
    def lm_head_weight(self):
        """(V, H) output projection; the embedding matrix itself when embeddings are tied."""
        if self.head != "lm":
            raise AttributeError("a reward model (head='score') has no LM head")
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, input_ids, position_ids=None, document_ids=None, cache=None):
        """Final-normed hidden states (B, T, H).

        position_ids (B, T): default 0..T-1; required with a cache (where to write, what to attend).
        document_ids (B, T): for packed blocks; a token attends only to earlier tokens with the same
            document id, so packed documents never see each other (pass positions restarting per doc).
        cache: a KVCache; the new tokens' keys/values are written at position_ids and each new token
            attends to its row's cache slots 0..its position (see KVCache).
        """
        B, T = input_ids.shape
        device = input_ids.device
        if cache is None and self.config.sliding_window is not None and T > self.config.sliding_window:
            raise ValueError(f"sequence of {T} tokens exceeds the sliding window ({self.config.sliding_window}), "
                             "which this implementation does not apply")
        if position_ids is None:
            if cache is not None:
                raise ValueError("position_ids are required with a KV cache")
            position_ids = torch.arange(T, device=device).expand(B, T)
        attn_mask = None  # None = plain causal
        if document_ids is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            same_document = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
            attn_mask = (same_document & causal)[:, None]                         # (B, 1, T, T)
        elif cache is not None:
            key_position = torch.arange(cache.max_len, device=device)
            attn_mask = (key_position <= position_ids[..., None])[:, None]        # (B, 1, T, max_len)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, attn_mask, cache, i, position_ids)
        return self.model.norm(x)

    def forward(self, input_ids, position_ids=None, document_ids=None, cache=None, targets=None, temperature=1.0):
        """Logits (B, T, V) in the model's dtype (scores (B, T) for a reward model); or, given `targets` (B, T) (-100 = ignored), the
        per-token log-probs log p(target | prefix) (B, T) in fp32, computed by kernels/logprob.py from
        the hidden states and the LM head without materialising the logits. The log-prob path goes
        through forward (not a separate method) so that FSDP's forward hooks gather the LM head."""
        hidden = self.hidden_states(input_ids, position_ids, document_ids, cache)
        if self.head == "score":  # a scalar per position (B, T); the caller reads the last real token
            return F.linear(hidden, self.score.weight).squeeze(-1).float()
        if targets is None:
            return F.linear(hidden, self.lm_head_weight)
        B, T, H = hidden.shape
        return token_logprobs(hidden.reshape(B * T, H), self.lm_head_weight, targets.reshape(B * T),
                              temperature=temperature).view(B, T)

    def init_weights(self, std=None):
        """Random init for training from scratch: normal(0, initializer_range) linears/embeddings."""
        std = std if std is not None else self.config.raw.get("initializer_range", 0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def num_parameters(self, exclude_embeddings=False):
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if exclude_embeddings else n

    # ------------------------------------------------------------------------------------------
    # HF-format checkpoints

    @classmethod
    def from_config(cls, path_or_dict, device="cpu", dtype=torch.float32, head="lm"):
        """A randomly initialised model from a config.json (path, folder or dict): training from scratch."""
        d = path_or_dict
        if not isinstance(d, dict):
            p = Path(d)
            d = json.loads((p / "config.json" if p.is_dir() else p).read_text())
        model = cls(ModelConfig.from_dict(d), head=head)
        model.init_weights()
        return model.to(device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, head="lm"):
        """Load an HF checkpoint folder: config.json + model.safetensors (or a sharded
        model.safetensors.index.json). Weights are cast to `dtype` (bf16 or fp32 on disk both work).
        head="score" from a causal-LM checkpoint drops its LM head and starts a new scalar head
        normal(0, initializer_range) (0.02 when the config has none), as transformers'
        *ForSequenceClassification init does (and so TRL's RewardTrainer); from a reward-model
        checkpoint it loads `score`."""
        from safetensors import safe_open

        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}/config.json not found: expected a Hugging Face checkpoint folder")
        config = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
        if (path / "model.safetensors.index.json").exists():
            weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (path / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                    "(for a new model from a config.json use Transformer.from_config)")
        with torch.device("meta"):
            model = cls(config, head=head)
        expected = model.state_dict()
        state = {}
        for file in files:
            with safe_open(str(path / file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in expected:
                        state[name] = f.get_tensor(name).to(dtype)
                    elif not (name == "lm_head.weight" and (config.tie_word_embeddings or head == "score")) \
                            and not name.endswith("rotary_emb.inv_freq"):
                        raise ValueError(f"{path}/{file}: unexpected tensor {name!r}")
        if head == "score" and "score.weight" not in state:
            std = config.raw.get("initializer_range", 0.02)
            state["score.weight"] = torch.randn(1, config.hidden_size, dtype=dtype) * std
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"{path}: checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
        model.load_state_dict(state, assign=True, strict=True)
        model.inv_freq = rope_inverse_frequencies(config)  # buffers built on meta need real values
        return model.to(device=device)

    def save_pretrained(self, path, state_dict=None, dtype=None, tokenizer=None):
        """Write config.json + model.safetensors (+ the tokenizer's files) atomically (temp folder,
        then rename), in a form transformers.AutoModelForCausalLM loads unchanged. `state_dict` lets a
        caller pass a full state dict gathered from FSDP shards; `dtype` casts the saved tensors."""
        from safetensors.torch import save_file

        state = state_dict if state_dict is not None else self.state_dict()
        state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items() if k != "inv_freq"}
        saved_dtype = next(iter(state.values())).dtype
        config = dict(self.config.raw)
        config["torch_dtype"] = str(saved_dtype).removeprefix("torch.")
        config.pop("dtype", None)
        config["architectures"] = [ARCHITECTURES[config.get("model_type", "llama"), self.head]]
        if self.head == "score":
            config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        atomic_save_folder(path, lambda tmp: (
            save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"}),
            Path(tmp, "config.json").write_text(json.dumps(config, indent=2) + "\n"),
            tokenizer.save_pretrained(tmp) if tokenizer is not None else None,
        ))


def atomic_save_folder(path, write_into):
    """Fill a fresh temp folder beside `path` with write_into(tmp), then swap it in. Files already in
    `path` that write_into did not produce (tokenizer files, metrics) are carried over, so saving a
    model into an existing checkpoint folder replaces weights and config but keeps the rest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*"):  # left by a save that crashed
        if stale.is_dir():
            print(f"removing {stale}, left by an interrupted save")
            shutil.rmtree(stale, ignore_errors=True)
    tmp = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        write_into(tmp)
        # mkdtemp makes the folder 0700 and safetensors writes 0600: give the checkpoint the usual
        # umask-respecting permissions, like any file the user creates.
        umask = os.umask(0)
        os.umask(umask)
        for folder, _, files in os.walk(tmp):
            os.chmod(folder, 0o777 & ~umask)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o666 & ~umask)
        if path.exists():
            for item in path.iterdir():
                if not Path(tmp, item.name).exists():
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, Path(tmp, item.name))
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
