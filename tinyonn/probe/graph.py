"""The probe as one graph: activation taps instead of hooks.

Zero "tap" tensors are added, in every decoder layer, to the attention output (o = o_proj(z) + tap_o),
to the SwiGLU output (h = silu(g)·u + tap_h) and to the MLP output (y = down(h) + tap_y). They change
nothing in the forward pass, but they are inputs of the decoder's graph, so one backward of the loss
to the taps returns ∂l/∂o, ∂l/∂h and ∂l/∂y of every layer at once: under `torch.compile` that is a
single compiled forward and a single compiled backward, with no per-layer hooks. The forward also
returns each layer's MLP input x, its pre-activations g and u, and o_proj's input z; the statistics
recompute h = silu(g)·u and the gradients a = ∂l/∂g, b = ∂l/∂u elementwise from ∂l/∂h and g, u, then
run the same pure per-sample functions as the hook path (`tinyonn.probe.unit_stats`), compiled once
for all layers (one layer's shapes are every layer's).

The weights never need a gradient, so the backward computes only activation gradients (about 2/3
of a training step's backward). Quantised projections (bitsandbytes nf4/int8) are called as modules,
as in the eager decoder, and dequantise inside their own backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.func import vmap

from tinyonn.config import ProbeConfig
from tinyonn.probe import decoder
from tinyonn.probe.unit_stats import (choose_method, direct_flops, gram_flops, head_direct_flops, head_gram_flops,
                                      head_stats, layer_unit_stats)

BUCKET = 64
"""Compiled probes pad every batch's length up to a multiple of this, so ragged batches reuse a few
compiled graphs (right padding changes no statistic: pads carry no loss and no real token sees them)."""


def tapped_decoder(model, input_ids: torch.Tensor, mask: torch.Tensor | None, taps_o: Sequence[torch.Tensor],
                   taps_h: Sequence[torch.Tensor], taps_y: Sequence[torch.Tensor]):
    """The decoder forward of `decoder.decoder_hidden_states` with the taps added.

    Returns the final normalised hidden states [B, T, d] and, per layer, (x, g, u, z): the MLP input,
    the gate and up pre-activations, and o_proj's input (None when `taps_o` is empty: no head stats).
    """
    inner, config = model.model, model.config
    eps = config.rms_norm_eps
    hidden = inner.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)
    cos, sin = inner.rotary_emb(hidden, positions)
    normed = decoder.rms_norm(hidden, inner.layers[0].input_layernorm.weight, eps)
    saved = []
    for index, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        z = decoder.attention_core(attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed),
                                   q_norm.weight if q_norm is not None else None,
                                   k_norm.weight if k_norm is not None else None,
                                   cos, sin, eps, attn.head_dim, attn.scaling, mask)
        o = attn.o_proj(z)
        if taps_o:
            o = o + taps_o[index]
        hidden, x = decoder.add_rms_norm(hidden, o, layer.post_attention_layernorm.weight, eps)
        g, u = mlp.gate_proj(x), mlp.up_proj(x)
        h = F.silu(g) * u + taps_h[index]
        y = mlp.down_proj(h) + taps_y[index]
        following = inner.layers[index + 1].input_layernorm.weight if index + 1 < len(inner.layers) else inner.norm.weight
        hidden, normed = decoder.add_rms_norm(hidden, y, following, eps)
        saved.append((x, g, u, z if taps_o else None))
    return normed, saved


def unit_stats_from_taps(x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor, delta: torch.Tensor,
                         response: torch.Tensor, valid: torch.Tensor, freq_threshold: float,
                         method: str) -> tuple[torch.Tensor, ...]:
    """One layer's per-sample unit statistics [B, I] (act, freq, taylor, grad) from the tapped
    forward's x, g, u [B, T, ·] and the taps' gradients ∂l/∂h, ∂l/∂y.

    h = silu(g)·u, a = ∂l/∂h · u · silu'(g) and b = ∂l/∂h · silu(g) are computed in float32 and
    rounded once to the activations' dtype (what autograd's silu backward does).
    """
    g32, u32, dh32 = g.float(), u.float(), dh.float()
    sig = torch.sigmoid(g32)
    silu = g32 * sig
    h = (silu * u32).to(g.dtype)
    a = (dh32 * u32 * (sig * (1 + g32 * (1 - sig)))).to(g.dtype)
    b = (dh32 * silu).to(g.dtype)
    return vmap(layer_unit_stats, in_dims=(0, 0, 0, 0, 0, 0, 0, 0, None, None))(
        x, h, dh, delta, a, b, response, valid, freq_threshold, method)


def head_stats_batch(z: torch.Tensor, delta_o: torch.Tensor, response: torch.Tensor, num_heads: int,
                     method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's per-sample head statistics [B, H] (`unit_stats.head_stats` over the batch)."""
    return vmap(head_stats, in_dims=(0, 0, 0, None, None))(z, delta_o, response, num_heads, method)


class _Functions:
    """The three functions of the graph probe, compiled or eager (the compiled ones guard on the
    model and the shapes, so each model and length bucket compiles once)."""

    def __init__(self, compile: bool):
        if compile:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            wrap = lambda fn: torch.compile(fn, dynamic=False)  # noqa: E731
        else:
            wrap = lambda fn: fn  # noqa: E731
        self.forward = wrap(tapped_decoder)
        self.unit_stats = wrap(unit_stats_from_taps)
        self.head_stats = wrap(head_stats_batch)


_FUNCTIONS: dict[bool, _Functions] = {}


def _functions(compile: bool) -> _Functions:
    if compile not in _FUNCTIONS:
        _FUNCTIONS[compile] = _Functions(compile)
    return _FUNCTIONS[compile]


@contextlib.contextmanager
def _frozen(model):
    """Weights without gradients for the probe's duration (the backward then skips weight grads)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def pad_to_bucket(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, pad_id: int,
                  bucket: int = BUCKET) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch to a length that is a multiple of `bucket` (pads: mask 0, label -100)."""
    extra = -input_ids.shape[1] % bucket
    if not extra:
        return input_ids, attention_mask, labels
    return (F.pad(input_ids, (0, extra), value=pad_id), F.pad(attention_mask, (0, extra), value=0),
            F.pad(labels, (0, extra), value=-100))


def graph_probe_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      config: ProbeConfig) -> dict[str, torch.Tensor]:
    """Per-sample statistics of one batch on the model's device, through the tapped graph.

    Returns act, freq, taylor, grad [B, U] (layers concatenated), head_out, head_grad [B, H] (when
    `config.heads`) and loss [B]; `input_ids`, `attention_mask`, `labels` are on the model's device.
    """
    from tinyonn.data import per_sample_loss

    fns = _functions(config.compile)
    b, t = input_ids.shape
    # Right padding needs no mask (as in the hook path): no real token sees a pad, pads carry no loss.
    right_padded = bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
    mask = None if right_padded else decoder.padding_mask(attention_mask)
    layers = model.model.layers
    cfg = model.config
    dtype = model.model.embed_tokens.weight.dtype
    d = cfg.hidden_size
    sizes = [layer.mlp.gate_proj.out_features for layer in layers]
    device = input_ids.device
    taps_h = [torch.zeros(b, t, i, dtype=dtype, device=device, requires_grad=True) for i in sizes]
    taps_y = [torch.zeros(b, t, d, dtype=dtype, device=device, requires_grad=True) for _ in layers]
    taps_o = [torch.zeros(b, t, d, dtype=dtype, device=device, requires_grad=True) for _ in layers] if config.heads else []
    with _frozen(model), torch.enable_grad():
        hidden, saved = fns.forward(model, input_ids, mask, taps_o, taps_h, taps_y)
        losses = per_sample_loss(hidden, labels, head=model.get_output_embeddings())
        grads = list(torch.autograd.grad(losses.sum(), [*taps_h, *taps_y, *taps_o]))
    del taps_h, taps_y, taps_o, hidden
    with torch.no_grad():
        return _statistics(fns, saved, grads, losses.detach(), labels, attention_mask, config, cfg)


def _statistics(fns: _Functions, saved: list, grads: list, losses: torch.Tensor,
                labels: torch.Tensor, attention_mask: torch.Tensor, config: ProbeConfig, cfg) -> dict[str, torch.Tensor]:
    """Every layer's statistics from the forward's saved tensors and the taps' gradients (`grads`:
    ∂l/∂h of every layer, then ∂l/∂y, then ∂l/∂o), freeing each layer's tensors (the lists' items)
    once its statistics are taken."""
    n = len(saved)
    t, d = attention_mask.shape[1], cfg.hidden_size
    response = (labels != -100).long()
    valid = attention_mask.long()
    out: dict[str, list[torch.Tensor]] = {key: [] for key in ("act", "freq", "taylor", "grad", "head_out", "head_grad")}
    num_heads = cfg.num_attention_heads
    for index in range(n):
        x, g, u, z = saved[index]
        saved[index] = None  # free the layer as soon as its statistics are taken
        i = g.shape[-1]
        method = choose_method(config.grad_method, gram_flops(t, d, i), direct_flops(t, d, i))
        act, freq, taylor, grad = fns.unit_stats(x, g, u, grads[index], grads[n + index], response, valid,
                                                 config.freq_threshold, method)
        grads[index] = grads[n + index] = None
        for key, value in (("act", act), ("freq", freq), ("taylor", taylor), ("grad", grad)):
            out[key].append(value)
        if config.heads:
            head_method = choose_method(config.grad_method, head_gram_flops(t, d, z.shape[-1]),
                                        head_direct_flops(t, d, z.shape[-1]))
            head_out, head_grad = fns.head_stats(z, grads[2 * n + index], response, num_heads, head_method)
            grads[2 * n + index] = None
            out["head_out"].append(head_out)
            out["head_grad"].append(head_grad)
    result = {key: torch.cat(values, dim=1) for key, values in out.items() if values}
    result["loss"] = losses
    return result


def supports(model) -> bool:
    """Whether the graph probe can run this model (the readable decoder's families)."""
    return decoder.supports(model)
