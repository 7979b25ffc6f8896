"""Exact per-sample statistics of FFN units and attention heads, as pure functions of one sample.

For one sample with T positions, MLP input x [T, d], gate/up pre-activations g, u [T, I],
h = silu(g) * u [T, I], and the loss gradients δ = ∂l/∂y [T, d], a = ∂l/∂g, b = ∂l/∂u [T, I]:

    ‖∂l/∂W_down[:, j]‖² = h_jᵀ (δ δᵀ) h_j      ‖∂l/∂W_gate[j, :]‖² = a_jᵀ (x xᵀ) a_j      (b likewise)

so two T×T Gram matrices give every unit's exact per-sample gradient norm without forming a
weight gradient (`gram`), or the per-sample gradient is formed and its columns summed (`direct`);
`choose_method` picks the cheaper for the shape (units and heads alike). Every function here works on a single sample;
`torch.func.vmap` maps them over a batch.
"""

from __future__ import annotations

import torch


def gram_flops(t: int, d: int, i: int) -> int:
    """FLOPs of the units' Gram route for one sample and layer: two T×T Grams, three T×T×I products."""
    return 2 * t * t * d * 2 + 3 * 2 * t * t * i


def direct_flops(t: int, d: int, i: int) -> int:
    """FLOPs of materialising the units' three per-sample weight gradients (d×I each)."""
    return 3 * 2 * t * d * i


def head_gram_flops(t: int, d: int, width: int) -> int:
    """FLOPs of the heads' Gram route for one sample and layer (o_proj: width = H·hd inputs, d outputs):
    the T×T Gram of ∂l/∂o and the per-head T×T Grams of z."""
    return 2 * t * t * (d + width)


def head_direct_flops(t: int, d: int, width: int) -> int:
    """FLOPs of materialising o_proj's per-sample weight gradient (d × width)."""
    return 2 * t * d * width


def choose_method(method: str, gram_cost: int, direct_cost: int) -> str:
    """`method` ("gram" or "direct"), or for "auto" the one with the smaller FLOP count
    (`gram_flops`/`direct_flops` for units, `head_gram_flops`/`head_direct_flops` for heads)."""
    if method != "auto":
        return method
    return "gram" if gram_cost < direct_cost else "direct"


def _weighted_gram_norms(gram: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """cᵀ G c for every column c of `columns` [T, I] → [I], summed in fp32."""
    return ((gram @ columns) * columns).sum(0, dtype=torch.float32)


def unit_grad_sq(x: torch.Tensor, h: torch.Tensor, delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 method: str = "gram") -> torch.Tensor:
    """Squared per-sample gradient norm of every unit's parameters (gate row, up row, down column).

    x [T, d], h [T, I], delta [T, d], a [T, I], b [T, I] → [I] in fp32. Positions that do not
    influence the loss have δ = a = b = 0 and contribute nothing.
    """
    if method == "gram":
        down = _weighted_gram_norms(delta @ delta.T, h)
        gram_x = x @ x.T
        return down + _weighted_gram_norms(gram_x, a) + _weighted_gram_norms(gram_x, b)
    if method == "direct":
        down = (delta.T @ h).square().sum(0, dtype=torch.float32)
        gate = (a.T @ x).square().sum(1, dtype=torch.float32)
        up = (b.T @ x).square().sum(1, dtype=torch.float32)
        return down + gate + up
    raise ValueError(f"unknown gradient method {method!r}: use 'gram' or 'direct'")


def unit_activation_stats(h: torch.Tensor, dh: torch.Tensor, response: torch.Tensor,
                          valid: torch.Tensor, freq_threshold: float) -> tuple[torch.Tensor, ...]:
    """Mean |h|, firing frequency over the response tokens, and the Taylor term |Σ_t h·∂l/∂h|.

    h, dh [T, I]; response, valid [T] (0/1). A unit fires on a token when |h| exceeds
    `freq_threshold` times the token's RMS of h over the layer's units. Token sums are mat-vecs in
    h's dtype (fp32 accumulation on tensor cores); results are fp32.
    """
    weight = response.to(h.dtype)
    count = response.sum().float().clamp_min(1.0)
    magnitude = h.abs()
    act = (weight @ magnitude).float() / count
    rms = torch.linalg.vector_norm(h, dim=-1, dtype=torch.float32) / h.shape[-1] ** 0.5
    fires = (magnitude > (freq_threshold * rms).to(h.dtype)[:, None]).to(h.dtype)
    freq = (weight @ fires).float() / count
    taylor = (valid.to(h.dtype) @ (h * dh)).float().abs()
    return act, freq, taylor


def layer_unit_stats(x: torch.Tensor, h: torch.Tensor, dh: torch.Tensor, delta: torch.Tensor, a: torch.Tensor,
                     b: torch.Tensor, response: torch.Tensor, valid: torch.Tensor, freq_threshold: float,
                     method: str) -> tuple[torch.Tensor, ...]:
    """Everything the probe records for one layer's units and one sample: act, freq, taylor, grad."""
    act, freq, taylor = unit_activation_stats(h, dh, response, valid, freq_threshold)
    grad = unit_grad_sq(x, h, delta, a, b, method).clamp_min(0).sqrt()
    return act, freq, taylor, grad


def head_stats(z: torch.Tensor, delta_o: torch.Tensor, response: torch.Tensor, num_heads: int,
               method: str = "gram") -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: mean output norm over response tokens and per-sample ‖∂l/∂W_o[:, head]‖.

    z [T, H·hd] is the input of o_proj (the heads' outputs side by side), delta_o [T, d] the loss
    gradient of o_proj's output.
    """
    t = z.shape[0]
    zh = z.reshape(t, num_heads, -1)
    weight = response.float()
    norms = torch.linalg.vector_norm(zh, dim=-1, dtype=torch.float32)
    out_norm = (weight @ norms) / weight.sum().clamp_min(1.0)
    if method == "gram":
        gram_o = delta_o @ delta_o.T
        gram_z = torch.einsum("thk,shk->hts", zh, zh)
        grad_sq = (gram_z * gram_o).sum((1, 2), dtype=torch.float32)
    else:
        per_sample = torch.einsum("td,thk->hdk", delta_o, zh)
        grad_sq = per_sample.square().sum((1, 2), dtype=torch.float32)
    return out_norm, grad_sq.clamp_min(0).sqrt()
