"""A readable decoder forward for Llama-family models (Qwen3, Qwen2, Llama, Mistral).

The same function as the Hugging Face forward, written out so that two things hold:
- every linear layer is called as its own module (bf16, nf4 or int8 alike), so forward hooks and
  tensor gradient hooks on the FFN and attention projections see x, g, u, h, z and their gradients;
- the elementwise glue between the projections (RMSNorm, q/k norms, rotary embedding, attention,
  SwiGLU, residual adds) are small pure tensor functions that `torch.compile` fuses once and
  reuses for every layer.

Tests check it against the Hugging Face forward; the probe runs on it.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's RMSNorm: normalise in fp32, cast back, scale."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm(residual: torch.Tensor, update: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add followed by RMSNorm: (new residual, its normalised copy)."""
    hidden = residual + update
    return hidden, rms_norm(hidden, weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm: torch.Tensor | None,
                   k_norm: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                   head_dim: int, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Projected q/k/v [B, T, heads·hd] → attention output z [B, T, H·hd] (before o_proj).

    Per-head RMSNorm of q and k when the model has it (Qwen3), rotary embedding, causal grouped
    attention (`mask` [B, 1, T, T] bool when there is left padding, else plain causal).
    """
    b, t, _ = q.shape
    q = q.view(b, t, -1, head_dim)
    k = k.view(b, t, -1, head_dim)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(b, t, -1, head_dim).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2).reshape(b, t, -1)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


class Kernels:
    """The elementwise pieces, eager or compiled (one compile each, shared by all layers)."""

    def __init__(self, compile: bool):
        wrap = (lambda fn: torch.compile(fn, dynamic=True)) if compile else (lambda fn: fn)
        self.rms_norm = wrap(rms_norm)
        self.add_rms_norm = wrap(add_rms_norm)
        self.attention_core = wrap(attention_core)
        self.swiglu = wrap(swiglu)


_KERNELS: dict[bool, Kernels] = {}


def kernels(compile: bool) -> Kernels:
    if compile not in _KERNELS:
        _KERNELS[compile] = Kernels(compile)
    return _KERNELS[compile]


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] 0/1 → [B, 1, T, T] bool: causal and not a pad key; a pad query sees itself (no NaN)."""
    t = attention_mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    allowed |= torch.eye(t, dtype=torch.bool, device=attention_mask.device)[None]
    return allowed[:, None]


def decoder_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          compile: bool = False) -> torch.Tensor:
    """Final normalised hidden states [B, T, d] of a Llama-family causal LM.

    `attention_mask` None means no padding, or right padding only (then no real token sees a pad).
    """
    k = kernels(compile)
    inner = model.model
    config = model.config
    if getattr(config, "sliding_window", None) and input_ids.shape[1] > config.sliding_window and getattr(
            config, "use_sliding_window", True):
        raise NotImplementedError("sequences longer than the model's sliding window are not supported")
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        raise NotImplementedError(f"hidden_act {config.hidden_act!r}")
    hidden = inner.embed_tokens(input_ids)
    if hasattr(config, "embedding_multiplier"):
        raise NotImplementedError("embedding multipliers are not supported")
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)
    cos, sin = inner.rotary_emb(hidden, positions)
    mask = padding_mask(attention_mask) if attention_mask is not None else None
    eps = config.rms_norm_eps
    normed = k.rms_norm(hidden, inner.layers[0].input_layernorm.weight, eps)
    for index, layer in enumerate(inner.layers):
        attn = layer.self_attn
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        z = k.attention_core(attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed),
                             q_norm.weight if q_norm is not None else None,
                             k_norm.weight if k_norm is not None else None,
                             cos, sin, eps, attn.head_dim, attn.scaling, mask)
        hidden, x = k.add_rms_norm(hidden, attn.o_proj(z), layer.post_attention_layernorm.weight, eps)
        mlp = layer.mlp
        y = mlp.down_proj(k.swiglu(mlp.gate_proj(x), mlp.up_proj(x)))
        following = inner.layers[index + 1].input_layernorm.weight if index + 1 < len(inner.layers) else inner.norm.weight
        hidden, normed = k.add_rms_norm(hidden, y, following, eps)
    return normed


FAMILIES = ("qwen3", "qwen2", "llama", "mistral")
"""The `model_type`s whose decoder this module writes out."""


def supports(model) -> bool:
    """Whether `decoder_hidden_states` can run this model (a Llama-family decoder)."""
    inner = getattr(model, "model", None)
    return (inner is not None and hasattr(inner, "rotary_emb") and hasattr(inner, "layers")
            and all(hasattr(layer.self_attn, "scaling") for layer in inner.layers)
            and model.config.model_type in FAMILIES
            and type(model).__module__ in sys.modules)
