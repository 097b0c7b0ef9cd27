"""A Llama-family decoder written from scratch: Llama-2/3, TinyLlama, Mistral, Qwen2, Qwen3 (dense),
SmolLM2.

    from model import Transformer
    model = Transformer.from_pretrained("path/to/hf_folder", device="cuda", dtype=torch.bfloat16)
    logits = model(input_ids)                 # (B, T, V)
    hidden = model.hidden_states(input_ids)   # (B, T, H) final-normed, for rlhf_kernels/logprob.py
    model.save_pretrained("out/")             # loads unchanged in transformers.AutoModelForCausalLM

Architecture (one decoder block):  x = x + Attn(RMSNorm(x));  x = x + MLP(RMSNorm(x))
  - RMSNorm computed in fp32 and cast back, as the reference implementation does;
  - rotary position embeddings on q and k (rotate-half layout), with Llama-3 "rope_scaling";
  - grouped-query attention (n_kv_heads ≤ n_heads) through F.scaled_dot_product_attention;
  - SwiGLU MLP: down(silu(gate(x)) * up(x));
  - optional q/k/v bias (Qwen2), optional per-head RMSNorm of q and k before rope (Qwen3),
    tied or untied input/output embeddings.

Parameter names deliberately equal the Hugging Face names (`model.layers.3.self_attn.q_proj.weight`,
...) so a checkpoint's state dict loads and saves with no renaming table to get wrong.
"""
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from rlhf_kernels import first_use_fallback
from rlhf_kernels.logprob import token_logprobs

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

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
    qkv_bias: bool                     # Qwen2 (always) or attention_bias (Llama, Qwen3)
    o_bias: bool                       # attention_bias (Llama, Qwen3) also biases o_proj
    mlp_bias: bool
    # Qwen3: RMSNorm (weights q_norm / k_norm, size head_dim) on each head's q, k
    qk_norm: bool
    # a token attends at most this many positions back (sliding_window_of)
    sliding_window: int | None
    raw: dict                          # the original config.json contents

    @classmethod
    def from_path(cls, path):
        """The config of a checkpoint folder (its config.json) or of a config.json file."""
        path = Path(path)
        return cls.from_dict(json.loads((path / "config.json" if path.is_dir()
                                         else path).read_text()))

    @classmethod
    def from_dict(cls, d):
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported (supported: "
                             f"{SUPPORTED_MODEL_TYPES})")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d.get('hidden_act')!r} is not supported "
                             "(only silu / SwiGLU)")
        # Two config styles exist: older `rope_theta` + `rope_scaling`, newer `rope_parameters`
        # (transformers >= 5) holding rope_type, rope_theta and the scaling keys together.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope scaling type {rope_type!r} is not supported "
                             "(default, linear, llama3)")
        attention_bias = bool(d.get("attention_bias", False))
        n_heads = d["num_attention_heads"]
        # transformers' Qwen3Config defaults head_dim to 128 whatever hidden_size /
        # num_attention_heads is
        default_head_dim = 128 if model_type == "qwen3" else d["hidden_size"] // n_heads
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or default_head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window_of(d, model_type),
            raw=dict(d),
        )

    def kv_bytes_per_position(self, itemsize):
        """KV-cache bytes of one position of one sequence: k and v, every layer, n_kv_heads ×
        head_dim elements of `itemsize` bytes each (Llama-3-8B in bf16: 128 KiB)."""
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim * itemsize


def sliding_window_of(d, model_type):
    """The sliding window of a config dict, or None; one window for every layer, as our attention
    has. Mistral: `sliding_window` unless use_sliding_window is false. Qwen2 / Qwen3, read as
    transformers' config reads them: a window only with use_sliding_window true, and then only on
    the layers that layer_types marks "sliding_attention" (default: the layers from
    max_window_layers on, 28 by default). A config that mixes full and sliding layers is refused
    rather than run with the wrong attention."""
    if model_type not in ("qwen2", "qwen3"):
        return d.get("sliding_window") if d.get("use_sliding_window",
                                                model_type == "mistral") else None
    window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
    if window is None:
        return None
    n_layers = d["num_hidden_layers"]
    layer_types = d.get("layer_types") or ["sliding_attention"
                                           if i >= d.get("max_window_layers", 28)
                                           else "full_attention"
                                           for i in range(n_layers)]
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown or len(layer_types) != n_layers:
        raise ValueError(f"{model_type} config: layer_types must be {n_layers} of "
                         "'full_attention' / 'sliding_attention' "
                         f"(got {unknown or len(layer_types)})")
    sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    if not sliding:
        return None
    if len(sliding) < n_layers:
        raise ValueError(f"{model_type} config: use_sliding_window puts a sliding window on "
                         f"layers {sliding} of {n_layers} only (max_window_layers / layer_types); "
                         "a window on some layers but not others is not supported, "
                         "only on all or none")
    return window


# ----------------------------------------------------------------------------------------------
# Rotary embeddings


def rope_inverse_frequencies(config):
    """inv_freq[i] = theta^(-2i/D), adjusted by the checkpoint's rope scaling. Shape (D/2,),
    fp32."""
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


def recomputed(fn, *inputs):
    """fn(*inputs), keeping for the backward only the inputs: the backward runs fn again and
    differentiates that, the same kernels in the same order, so the gradients are bit for bit those
    of fn itself. For cheap elementwise work (RMSNorm, SwiGLU's gate) whose intermediates would
    otherwise stay alive from the forward to the backward: per layer, one (tokens, hidden) and one
    (tokens, intermediate) tensor fewer. No randomness inside, so no RNG state is kept."""
    if not torch.is_grad_enabled():
        return fn(*inputs)
    return torch.utils.checkpoint.checkpoint(fn, *inputs, use_reentrant=False,
                                             preserve_rng_state=False)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return recomputed(self.normalise, x)

    def normalise(self, x):
        # Normalise in fp32 (bf16 variance loses precision), cast back, then scale. The scale is
        # cast to x's dtype: under autocast an fp32 master weight then computes exactly as its bf16
        # copy does (and the residual stream stays bf16); without autocast the dtypes already agree.
        x_float = x.float()
        x_float = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * x_float.to(x.dtype)


class KVCache:
    """A preallocated static cache: per layer k, v of shape (B, n_kv_heads, max_len, D), indexed by
    position. The key/value of the token at position p of row b live at [b, :, p]. Each row moves at
    its own pace: a forward with position_ids (B, T) writes the new tokens' keys/values at those
    positions and each query at position p attends to slots 0..p of its row. So rows need no
    padding bookkeeping: slots past a row's current position (stale or padding) are never attended,
    and are overwritten when the row reaches them. Fixed shapes, so a decode step can be
    compiled."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype)
                  for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype)
                  for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        if torch.device(device).type == "cuda":
            # A compiled decode step writes the cache in place: marked static, the buffers may live
            # in a CUDA graph (otherwise "mutated inputs" keep cudagraphs off), as HF's StaticCache
            # does.
            for buffer in self.k + self.v:
                torch._dynamo.mark_static_address(buffer)

    def first_rows(self, n):
        """A cache of the first n rows: views of this one's buffers (what a forward writes lands
        here)."""
        view = object.__new__(KVCache)
        view.k, view.v, view.max_len = [k[:n] for k in self.k], [v[:n]
                                                                 for v in self.v], self.max_len
        return view


# ----------------------------------------------------------------------------------------------
# Attention without dense masks. A (T × T) mask, or a mask together with enable_gqa, sends CUDA's
# SDPA to its math kernel (fp32 scores, K/V copied to every head): ~8 GiB per layer at T = 8192.
# So each case takes the path that keeps its structure implicit:
#   causal (training, prefill):  SDPA is_causal=True, K/V shared by GQA groups -> flash on GPU;
#   packed documents:            GPU: FlexAttention with a document-and-causal block mask (blocks of
#                                other documents are skipped, so cost ~ Σ doc_len², not T²); the
# twin
#                                everywhere else: one causal SDPA per document (the same cost);
#   KV-cache decode:             only the first `cache_len` slots are read; GQA is folded into the
#                                query rows so K/V are never repeated, and the mask is (B, 1, g·T,
# L);
#   sliding window (Mistral):    a key more than `window` positions back is hidden; only matters,
#                                and only costs anything, for sequences longer than the window.


@dataclass
class AttentionInputs:
    """What every layer's attention needs besides x, computed once per forward (hidden_states)."""
    position_ids: torch.Tensor        # (B, T)
    window: int | None = None         # the sliding window, if any
    document_ids: torch.Tensor | None = None  # packed blocks (B, T)
    block_mask: object = None         # packed, FlexAttention path (GPU): a BlockMask
    segments: list | None = None      # packed, twin path: per row, [(start, end)] of each document
    cache: "KVCache | None" = None
    cache_len: int | None = None      # decode: read cache slots [0, cache_len)
    cache_mask: torch.Tensor | None = None  # decode: cache_mask(...), built by the first layer
    prefill: bool = False             # cache given without positions: write at 0..T-1, causal


def causal_attention(q, k, v, window=None, inputs=None):
    """q (B, nh, T, D), k/v (B, nkv, T, D) -> (B, nh, T, D): each query sees itself and earlier keys
    (at most `window` back). Without a window in reach this is SDPA's is_causal (flash on GPU); with
    one, FlexAttention's block mask on GPU (blocks outside the band are skipped; the mask is kept in
    `inputs` for the other layers), else a dense mask."""
    T = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if window is None or T <= window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    def dense():
        # query − key
        offset = torch.arange(T, device=q.device)[:, None] - torch.arange(T, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(offset >= 0) & (offset < window),
                                              enable_gqa=gqa)

    if not use_flex(q.device):
        return dense()
    def flex():
        block_mask = (inputs.block_mask if inputs is not None and inputs.block_mask is not None
                      else attention_block_mask(None, T, q.device, window))
        if inputs is not None:
            inputs.block_mask = block_mask
        return compiled_flex(q, k, v, block_mask)

    return first_use_fallback("FlexAttention (sliding window)", flex, dense)


def document_segments(document_ids):
    """Per row, the [(start, end)] of its runs of equal document ids (packing writes each document
    as one run; padding is a run of its own). One host read per forward, shared by all layers."""
    B, T = document_ids.shape
    change = (document_ids[:, 1:] != document_ids[:, :-1]).cpu()
    segments = []
    for row in range(B):
        bounds = [0] + (change[row].nonzero()[:, 0] + 1).tolist() + [T]
        segments.append(list(zip(bounds[:-1], bounds[1:])))
    return segments


def packed_attention_twin(q, k, v, segments, window=None):
    """Packed documents, one causal attention per document: exact, and never more than one
    document's (len × len) scores at a time. The path on CPU and the fallback on GPU."""
    rows = [torch.cat([causal_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                                        window)
                       for s, e in segments[b]], dim=2) for b in range(q.shape[0])]
    return torch.cat(rows, dim=0)


try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch without FlexAttention: the twin everywhere
    flex_attention = None
_compiled_flex, _compiled_create_block_mask = [], []


def use_flex(device):
    return (flex_attention is not None and device.type == "cuda"
            and os.environ.get("RLHF_KERNELS") != "torch")


def attention_block_mask(document_ids, T, device, window=None):
    """FlexAttention's BlockMask: causal, within a document when document_ids (B, T) are given (else
    the same for every row), within the sliding window when there is one. Built once per forward at
    (128 × 128)-block granularity, so blocks with nothing to attend are never read."""
    def keep(b, h, q_index, kv_index):
        visible = kv_index <= q_index
        if document_ids is not None:
            visible = visible & (document_ids[b, q_index] == document_ids[b, kv_index])
        return visible & (q_index - kv_index < window) if window is not None else visible

    B = document_ids.shape[0] if document_ids is not None else None
    if torch.device(device).type != "cuda":  # CPU: eager, only tests build one here
        return create_block_mask(keep, B, None, T, T, device=device)
    # compiled: eager evaluates keep() over all (T × T) pairs at once
    if not _compiled_create_block_mask:
        _compiled_create_block_mask.append(torch.compile(create_block_mask))
    return _compiled_create_block_mask[0](keep, B, None, T, T, device=device)


def compiled_flex(q, k, v, block_mask):
    """FlexAttention compiled once per process (eager FlexAttention would materialise the
    scores)."""
    if not _compiled_flex:
        # lengths vary (DPO, RM): dynamic after the 2nd
        _compiled_flex.append(torch.compile(flex_attention))
    return _compiled_flex[0](q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def packed_attention(q, k, v, inputs):
    """Packed documents: FlexAttention on GPU, falling back to the twin if it fails on first use;
    the twin elsewhere."""
    def twin():
        if inputs.segments is None:
            inputs.segments = document_segments(inputs.document_ids)
        return packed_attention_twin(q, k, v, inputs.segments, inputs.window)

    if not use_flex(q.device):
        return twin()

    def flex():
        if inputs.block_mask is None:  # once per forward, shared by the layers
            inputs.block_mask = attention_block_mask(inputs.document_ids, q.shape[2], q.device,
                                                     inputs.window)
        return compiled_flex(q, k, v, inputs.block_mask)

    return first_use_fallback("FlexAttention (packed documents)", flex, twin)


def cache_mask(position_ids, cache_len, group, window=None):
    """(B, 1, g·T, L) boolean: which of the first L = cache_len cache slots each new token sees (its
    row's slots 0..its position, and only the last `window` of them), repeated for the g query heads
    folded into rows (cached_attention). The same for every layer: built once per forward."""
    B, T = position_ids.shape
    key_position = torch.arange(cache_len, device=position_ids.device)
    visible = key_position <= position_ids[..., None]                            # (B, T, L)
    if window is not None:
        visible &= key_position > position_ids[..., None] - window
    return visible[:, None].expand(B, group, T, cache_len).reshape(B, 1, group * T, cache_len)


def cached_attention(q, k_cache, v_cache, position_ids, cache_len, window=None, mask=None):
    """Decode (or any new tokens) against a KV cache: q (B, nh, T, D) at position_ids (B, T); the
    cache (B, nkv, max_len, D) holds every earlier key/value at its position. Only the first
    cache_len slots are read. The g = nh / nkv query heads that share a K/V head become g·T rows of
    that head, (B, nkv, g·T, D), so SDPA needs no enable_gqa and takes the mask on a fused kernel.
    `mask`: cache_mask(...) when the caller already has it (one per forward, not one per layer)."""
    B, nh, T, D = q.shape
    nkv = k_cache.shape[1]
    k, v = k_cache[:, :, :cache_len], v_cache[:, :, :cache_len]                  # (B, nkv, L, D)
    if mask is None:
        mask = cache_mask(position_ids, cache_len, nh // nkv, window)
    # (B, nkv, g·T, D)
    y = F.scaled_dot_product_attention(q.reshape(B, nkv, (nh // nkv) * T, D), k, v, attn_mask=mask)
    return y.reshape(B, nh, T, D)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads,
                                                        config.num_key_value_heads,
                                                        config.head_dim)
        H = config.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(H, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(H, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=config.o_bias)
        # Qwen3's QK-norm: q and k RMS-normalised per head (over D, one weight shared by the heads),
        # which keeps attention logits from growing in training
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x, cos, sin, inputs: AttentionInputs, layer_index=0):
        B, T, _ = x.shape
        # (B, nh, T, D)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        # (B, nkv, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # before rope, as Qwen3 does; before the branch, so every path below sees it
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache, window = inputs.cache, inputs.window
        # a fresh cache: keys/values at 0..T-1, plain causal
        if cache is not None and inputs.prefill:
            cache.k[layer_index][:, :, :T] = k
            cache.v[layer_index][:, :, :T] = v
            y = causal_attention(q, k, v, window)
        elif cache is not None:  # write the new keys/values at their positions, read the cache
            index = inputs.position_ids[:, None, :, None].expand(B, self.n_kv_heads, T,
                                                                 self.head_dim)
            cache.k[layer_index].scatter_(2, index, k.to(cache.k[layer_index].dtype))
            cache.v[layer_index].scatter_(2, index, v.to(cache.v[layer_index].dtype))
            if inputs.cache_mask is None:
                inputs.cache_mask = cache_mask(inputs.position_ids, inputs.cache_len,
                                               self.n_heads // self.n_kv_heads, window)
            y = cached_attention(q, cache.k[layer_index], cache.v[layer_index], inputs.position_ids,
                                 inputs.cache_len, mask=inputs.cache_mask)
        elif inputs.document_ids is not None:
            y = packed_attention(q, k, v, inputs)
        else:
            y = causal_attention(q, k, v, window, inputs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        H, I, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(H, I, bias=bias)
        self.up_proj = nn.Linear(H, I, bias=bias)
        self.down_proj = nn.Linear(I, H, bias=bias)

    def forward(self, x):
        if torch.is_grad_enabled():  # kept for the backward: the gate's and up's outputs only
            return self.down_proj(recomputed(swiglu, self.gate_proj(x), self.up_proj(x)))
        # no backward (sampling, reference passes): silu(gate) made before up exists, one
        # (tokens, intermediate) tensor fewer at once
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def swiglu(gate, up):
    """SwiGLU's gated activation (Shazeer 2020): silu(x W_gateᵀ) ⊙ x W_upᵀ."""
    return F.silu(gate) * up


# ----------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021): a frozen weight W plus a trained low-rank update, y = x Wᵀ + s · (x Aᵀ) Bᵀ
# with A (r, in), B (out, r) and s = alpha / r. B starts at zero, so an adapted model starts equal
# to its base. Paper 2 (Table 4) trains Mistral-7B this way: r = 64, alpha = 32. The adapted Linear
# keeps its HF parameter name (`q_proj.weight`) and adds `q_proj.lora_A` / `q_proj.lora_B`, so a
# merged state dict (merge_lora) is an ordinary checkpoint and PEFT's key names are one suffix away.

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRASettings:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple = LORA_TARGETS

    @property
    def scaling(self):
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """An nn.Linear with a LoRA adapter, built around an existing Linear (its weight and bias are
    taken over, not copied). `adapters_enabled` False: exactly the base Linear (the reference model
    of DPO and OSP is the same model with its adapters switched off)."""

    def __init__(self, linear: nn.Linear, lora: LoRASettings):
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a second weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.scaling, self.dropout = lora.scaling, nn.Dropout(lora.dropout)
        # the adapter is trained: fp32 master weights whatever the (frozen) base's dtype
        device = linear.weight.device
        self.lora_A = nn.Parameter(torch.empty(lora.rank, self.in_features, device=device,
                                               dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, lora.rank, device=device,
                                               dtype=torch.float32))
        self.adapters_enabled = True
        self.reset_lora()

    def reset_lora(self):
        """PEFT's default init: A Kaiming-uniform, B zero (so the update starts at exactly 0)."""
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.adapters_enabled:
            return y
        # (…, in) -> (…, r) -> (…, out): never forms the (out, in) product B A
        update = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)),
                          self.lora_B.to(x.dtype))
        return y + update * self.scaling


def merge_lora(state, scaling, dtype=None):
    """A state dict with LoRA tensors -> the plain checkpoint: W + s · B A for every adapted weight,
    lora_A / lora_B dropped. Computed in fp32, then cast to `dtype` (default: W's). Cast to W's
    dtype first and then to another, a bf16 W would lose every update smaller than its rounding
    step: merge into the dtype the checkpoint is saved in, from W as it is on disk
    (parallel.save_checkpoint)."""
    merged = {}
    for name, tensor in state.items():
        if name.endswith((".lora_A", ".lora_B")):
            continue
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and f"{prefix}.lora_A" in state:
            A, B = state[f"{prefix}.lora_A"].float(), state[f"{prefix}.lora_B"].float()
            tensor = (tensor.float() + scaling * (B @ A)).to(dtype or tensor.dtype)
        merged[name] = tensor
    return merged


# PEFT's on-disk format for an adapter (adapter_config.json + adapter_model.safetensors), so that
# `peft.PeftModel.from_pretrained(base, folder)` loads what we train: key `q_proj.lora_A` is saved
# as `base_model.model.<name>.lora_A.weight`; a reward model's new score head as a module to save.
PEFT_PREFIX = "base_model.model."


def save_adapter(path, state, lora: LoRASettings, head="lm", base_model=None):
    """Write the adapter tensors of a (full, gathered) state dict to `path` in PEFT's format,
    atomically."""
    from safetensors.torch import save_file

    tensors = {PEFT_PREFIX
               + (f"{name}.weight" if name.endswith((".lora_A", ".lora_B"))
                  else name): tensor.detach().cpu().contiguous()
               for name, tensor in state.items() if name.endswith((".lora_A", ".lora_B"))
               or name == "score.weight"}
    config = dict(peft_type="LORA", task_type="CAUSAL_LM" if head == "lm" else "SEQ_CLS",
                  r=lora.rank,
                  lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                  target_modules=sorted(lora.targets), bias="none",
                  fan_in_fan_out=False, inference_mode=True, init_lora_weights=True,
                  use_rslora=False, use_dora=False,
                  modules_to_save=None if head == "lm" else ["score"],
                  base_model_name_or_path=str(base_model) if base_model is not None else None)
    atomic_save_folder(path, lambda tmp: (
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"),
                  metadata={"format": "pt"}),
        Path(tmp, "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")))


def read_adapter(path):
    """(LoRASettings, {our parameter name: tensor}) of a PEFT LoRA adapter folder."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{path}/adapter_config.json not found: "
                                "expected a PEFT LoRA adapter folder")
    config = json.loads((path / "adapter_config.json").read_text())
    if (config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora")
            or config.get("rank_pattern") or config.get("alpha_pattern")):
        raise ValueError(f"{path}: only plain LoRA adapters are supported "
                         "(no DoRA, rsLoRA or per-module ranks)")
    lora = LoRASettings(config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
                        tuple(sorted(config["target_modules"])))
    state = {}
    for name, tensor in load_file(str(path / "adapter_model.safetensors")).items():
        name = name.removeprefix(PEFT_PREFIX)
        state[name.removesuffix(".weight") if name.endswith((".lora_A.weight", ".lora_B.weight"))
              else name] = tensor
    return lora, state

class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

        # Activation checkpointing (Transformer.set_activation_checkpointing): keep only this
        # block's input for the backward and recompute the rest. Inside forward, i.e. under FSDP's
        # hooks on the block, as torchtitan's checkpoint-then-fully_shard order has it: FSDP
        # gathers the block's weights before the backward that runs the recompute.
        self.checkpoint_activations = False

    def forward(self, x, cos, sin, inputs: AttentionInputs, layer_index=0):
        if self.checkpoint_activations and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.block, x, cos, sin, inputs, layer_index,
                                                     use_reentrant=False)
        return self.block(x, cos, sin, inputs, layer_index)

    def block(self, x, cos, sin, inputs, layer_index):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, inputs, layer_index)
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


ARCHITECTURES = {("llama", "lm"): "LlamaForCausalLM", ("mistral", "lm"): "MistralForCausalLM",
                 ("qwen2", "lm"): "Qwen2ForCausalLM",
                 ("qwen3", "lm"): "Qwen3ForCausalLM",
                 ("llama", "score"): "LlamaForSequenceClassification",
                 ("mistral", "score"): "MistralForSequenceClassification",
                 ("qwen2", "score"): "Qwen2ForSequenceClassification",
                 ("qwen3", "score"): "Qwen3ForSequenceClassification"}


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
        self.lora = None  # LoRASettings once add_lora has run
        # Not a parameter and not saved: recomputed from the config on every construction.
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    def add_lora(self, lora: LoRASettings, frozen_dtype=None):
        """Put a LoRA adapter on every target Linear of the decoder blocks and freeze the rest: only
        lora_A / lora_B are trained (and a reward model's `score` head, new and small). The frozen
        weights are cast to `frozen_dtype` (the compute dtype: bf16 on a GPU, so the base costs 2
        bytes a parameter and no gradient or AdamW state); trained ones are fp32 master weights.
        Works on the meta device too (FSDP builds there). Call it before wrapping for FSDP/DDP."""
        unknown = sorted(set(lora.targets) - set(LORA_TARGETS))
        if unknown or not lora.targets:
            raise ValueError(f"LoRA targets {unknown or '(none)'}: choose among "
                             f"{', '.join(LORA_TARGETS)}")
        if self.lora is not None:
            raise ValueError("this model already has LoRA adapters")
        for layer in self.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, linear in list(parent.named_children()):
                    if name in lora.targets:
                        setattr(parent, name, LoRALinear(linear, lora))
        self.lora = lora
        for name, parameter in self.named_parameters():
            trained = name.endswith((".lora_A", ".lora_B")) or name == "score.weight"
            parameter.requires_grad_(trained)
            parameter.data = parameter.data.to(torch.float32 if trained
                                               else (frozen_dtype or parameter.dtype))
        return self

    @contextmanager
    def adapters_disabled(self):
        """The base model inside this block: every LoRA adapter off (the DPO / OSP reference)."""
        adapted = [m for m in self.modules() if isinstance(m, LoRALinear)]
        for module in adapted:
            module.adapters_enabled = False
        try:
            yield self
        finally:
            for module in adapted:
                module.adapters_enabled = True

    @property
    def lm_head_weight(self):
        """(V, H) output projection; the embedding matrix itself when embeddings are tied."""
        if self.head != "lm":
            raise AttributeError("a reward model (head='score') has no LM head")
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def set_activation_checkpointing(self, enabled=True):
        """Recompute each decoder block in the backward instead of keeping its activations: a
        block then keeps only its input, (B, T, H), instead of ~(10 H + 3 I) · B · T values. Call it
        before FSDP wrapping (parallel.wrap_model); gradients are identical, the forward runs
        twice."""
        for layer in self.model.layers:
            layer.checkpoint_activations = enabled

    def hidden_states(self, input_ids, position_ids=None, document_ids=None, cache=None,
                      cache_len=None):
        """Final-normed hidden states (B, T, H).

        position_ids (B, T): default 0..T-1.
        document_ids (B, T): for packed blocks; a token attends only to earlier tokens with the same
            document id, so packed documents never see each other (pass positions restarting per
            doc). Each document must be one contiguous run of its id, as packing writes them.
        cache: a KVCache. Without position_ids, a prefill: the T tokens are written at cache
            positions 0..T-1 and attend causally among themselves. With position_ids, the new
            tokens' keys/values are written at those positions and each attends to its row's cache
            slots 0..its position (see KVCache), of which only the first `cache_len` (default: all)
            are read: pass an upper bound of the batch's positions + 1 to decode on a short prefix.
        """
        B, T = input_ids.shape
        device = input_ids.device
        prefill = cache is not None and position_ids is None
        if position_ids is None:
            position_ids = torch.arange(T, device=device).expand(B, T)
        inputs = AttentionInputs(position_ids, window=self.config.sliding_window, cache=cache,
                                 prefill=prefill,
                                 cache_len=min(cache_len or cache.max_len, cache.max_len)
                                 if cache is not None else None)
        if document_ids is not None and cache is None:
            inputs.document_ids = document_ids
        x = self.model.embed_tokens(input_ids)
        # the residual stream in the compute dtype, as bf16 weights give
        if torch.is_autocast_enabled(device.type):
            x = x.to(torch.get_autocast_dtype(device.type))
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, inputs, i)
        return self.model.norm(x)

    def forward(self, input_ids, position_ids=None, document_ids=None, cache=None, targets=None,
                temperature=1.0,
                cache_len=None, num_targets=None):
        """Logits (B, T, V) in the model's dtype (scores (B, T) for a reward model); or, given
        `targets` (B, T) (-100 = ignored), the per-token log-probs log p(target | prefix) (B, T) in
        fp32, computed by rlhf_kernels/logprob.py from the hidden states and the LM head without
        materialising the logits. The log-prob path goes through forward (not a separate method) so
        that FSDP's forward hooks gather the LM head. num_targets: the number of targets that are
        not -100, when the caller knows it on the host: the kernel then computes those rows only,
        without reading the device (see rlhf_kernels/logprob.py)."""
        hidden = self.hidden_states(input_ids, position_ids, document_ids, cache, cache_len)
        # a scalar per position (B, T); the caller reads the last real token
        if self.head == "score":
            return F.linear(hidden, self.score.weight).squeeze(-1).float()
        if targets is None:
            return F.linear(hidden, self.lm_head_weight)
        B, T, H = hidden.shape
        weight, device_type = self.lm_head_weight, hidden.device.type
        if torch.is_autocast_enabled(device_type):
            # Under autocast the LM head is an fp32 master weight (and `hidden` is bf16, see
            # hidden_states): cast both to the compute dtype, so the log-prob matmuls (forward and
            # backward) run in bf16 as a bf16 reference model's do; then leave autocast, so the
            # kernel keeps its own rule (fp32 logits from bf16 inputs) instead of bf16 logits.
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            logps = token_logprobs(hidden.reshape(B * T, H), weight, targets.reshape(B * T),
                                   temperature=temperature,
                                   num_valid=num_targets)
        # a copy, not a view: FSDP2 warns on every forward whose output is a view (an in-place op on
        # it would skip its hook)
        return logps.view(B, T).clone()

    def init_weights(self, std=None):
        """Random init for training from scratch: normal(0, initializer_range)
        linears/embeddings."""
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
        """A randomly initialised model from a config.json (path, folder or dict): training from
        scratch."""
        d = path_or_dict
        model = cls(ModelConfig.from_dict(d) if isinstance(d, dict) else ModelConfig.from_path(d),
                    head=head)
        model.init_weights()
        model = model.to(device=device, dtype=dtype)
        # fp32 whatever the weights' dtype
        model.inv_freq = rope_inverse_frequencies(model.config).to(device)
        return model

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
            raise FileNotFoundError(f"{path}/config.json not found: "
                                    "expected a Hugging Face checkpoint folder")
        config = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
        files = checkpoint_files(path)
        with torch.device("meta"):
            model = cls(config, head=head)
        expected = model.state_dict()
        state = {}
        for file in files:
            with safe_open(str(path / file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in expected:
                        state[name] = f.get_tensor(name).to(dtype)
                    elif not (name == "lm_head.weight"
                              and (config.tie_word_embeddings or head == "score")) \
                            and not name.endswith("rotary_emb.inv_freq"):
                        raise ValueError(f"{path}/{file}: unexpected tensor {name!r}")
        if head == "score" and "score.weight" not in state:
            std = config.raw.get("initializer_range", 0.02)
            state["score.weight"] = torch.randn(1, config.hidden_size, dtype=dtype) * std
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"{path}: checkpoint is missing {len(missing)} tensors, e.g. "
                             f"{missing[:3]}")
        model.load_state_dict(state, assign=True, strict=True)
        model.inv_freq = rope_inverse_frequencies(config)  # buffers built on meta need real values
        return model.to(device=device)

    def save_pretrained(self, path, state_dict=None, dtype=None, tokenizer=None):
        """Write config.json + model.safetensors (+ the tokenizer's files) atomically (temp folder,
        then rename), in a form transformers.AutoModelForCausalLM loads unchanged. `state_dict` lets
        a caller pass a full state dict gathered from FSDP shards; `dtype` casts the saved tensors.
        A model with LoRA adapters is saved merged (W + s·BA); parallel.save_checkpoint can add the
        adapter."""
        from safetensors.torch import save_file

        state = state_dict if state_dict is not None else self.state_dict()
        # an adapted model is saved merged: a plain checkpoint any stage loads
        if self.lora is not None:
            state = merge_lora(state, self.lora.scaling, dtype)
        state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()
                 if k != "inv_freq"}
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


def checkpoint_files(path):
    """The safetensors files of an HF checkpoint folder: model.safetensors, or the shards its index
    names."""
    path = Path(path)
    if (path / "model.safetensors.index.json").exists():
        return sorted(set(
            json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))
    if (path / "model.safetensors").exists():
        return ["model.safetensors"]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                            "(for a new model from a config.json use Transformer.from_config)")


def stored_tensors(path, names):
    """(name, tensor as stored on disk, in its stored dtype) for those of `names` in the checkpoint
    folder, one at a time (none when it holds no weights: a config-only folder, as sft.py --scratch
    starts from)."""
    from safetensors import safe_open

    has_weights = ((Path(path) / "model.safetensors").exists()
                   or (Path(path) / "model.safetensors.index.json").exists())
    for file in checkpoint_files(path) if has_weights else []:
        with safe_open(str(Path(path) / file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name in names:
                    yield name, f.get_tensor(name)


def atomic_save_folder(path, write_into):
    """Fill a fresh temp folder beside `path` with write_into(tmp), then swap it in. Files already
    in `path` that write_into did not produce (tokenizer files, metrics) are carried over, so saving
    a model into an existing checkpoint folder replaces weights and config but keeps the rest."""
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
