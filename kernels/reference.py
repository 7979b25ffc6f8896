"""Plain-PyTorch references for the ragged SwiGLU kernels (the ground truth the Triton versions match).

Layout (as in `tinyonn.model.moe_layer.MoELayer`): routed units are packed expert by expert, so expert e owns
rows `unit_offsets[e]:unit_offsets[e+1]` of `w_gate`, `w_up` and `w_down`, all [U, d] (a unit's three
weight vectors are rows). Tokens are dispatched (`tinyonn.kernels.routing.dispatch_indices`) into
`x_sorted` [R, d]: expert e owns rows `segment_offsets[e]:segment_offsets[e+1]`, its tokens first, then
zero rows up to a multiple of `ROW_BLOCK`; rows past `segment_offsets[-1]` belong to nobody. Any expert
may have 0 units or 0 tokens.

`ragged_swiglu(x_sorted, segment_offsets, w_gate, w_up, w_down, unit_offsets, max_units, save)` returns
y_sorted [R, d] (zeros for rows past the last segment and for experts without units), and with
`save=True` also the activations the backward may reuse (the reference saves nothing: `None`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

ROW_BLOCK = 128
"""Every expert's segment of dispatched rows is padded to a multiple of this many rows."""


class SwiGLUGrads(NamedTuple):
    """Gradients of `ragged_swiglu` plus each expert's squared gradient norm (SMK's surprise²)."""

    dx: torch.Tensor
    """[R, d] gradient of x_sorted (zero rows where dy is zero)."""
    dw_gate: torch.Tensor
    dw_up: torch.Tensor
    dw_down: torch.Tensor
    """[U, d] each."""
    expert_sq_norm: torch.Tensor
    """[E] float32: Σ over expert e's rows of dw_gate² + dw_up² + dw_down²."""


def _segments(segment_offsets: torch.Tensor, unit_offsets: torch.Tensor):
    rows, units = segment_offsets.tolist(), unit_offsets.tolist()
    return [(e, rows[e], rows[e + 1], units[e], units[e + 1]) for e in range(len(units) - 1)]


def ragged_swiglu(x_sorted: torch.Tensor, segment_offsets: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                  w_down: torch.Tensor, unit_offsets: torch.Tensor, max_units: int, save: bool = False):
    """y [R, d]: rows of expert e → (silu(x·Wg_e^T) · (x·Wu_e^T)) · Wd_e; with `save`, (y, None)."""
    y = x_sorted.new_zeros(x_sorted.shape)
    for _, m0, m1, u0, u1 in _segments(segment_offsets, unit_offsets):
        if m1 > m0 and u1 > u0:
            x = x_sorted[m0:m1]
            h = F.silu(x @ w_gate[u0:u1].T) * (x @ w_up[u0:u1].T)
            y[m0:m1] = h @ w_down[u0:u1]
    return (y, None) if save else y


def ragged_swiglu_backward(dy: torch.Tensor, x_sorted: torch.Tensor, segment_offsets: torch.Tensor,
                           w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                           unit_offsets: torch.Tensor, max_units: int, saved=None) -> SwiGLUGrads:
    """Gradients of `ragged_swiglu` by explicit formulas (`saved` is ignored: g and u are recomputed).

    Per expert, with g = x·Wg^T, u = x·Wu^T, s = silu(g), h = s·u:
    dh = dy·Wd^T, dWd = h^T·dy, du = dh·s, dg = dh·u·σ(g)(1 + g(1 − σ(g))),
    dx = dg·Wg + du·Wu, dWg = dg^T·x, dWu = du^T·x.
    """
    dx = torch.zeros_like(x_sorted)
    dw_gate, dw_up, dw_down = torch.zeros_like(w_gate), torch.zeros_like(w_up), torch.zeros_like(w_down)
    for _, m0, m1, u0, u1 in _segments(segment_offsets, unit_offsets):
        if m1 == m0 or u1 == u0:
            continue
        x, g_out = x_sorted[m0:m1], dy[m0:m1]
        g, u = x @ w_gate[u0:u1].T, x @ w_up[u0:u1].T
        sig = torch.sigmoid(g)
        s = g * sig
        dh = g_out @ w_down[u0:u1].T
        dw_down[u0:u1] = (s * u).T @ g_out
        du = dh * s
        dg = dh * u * sig * (1 + g * (1 - sig))
        dx[m0:m1] = dg @ w_gate[u0:u1] + du @ w_up[u0:u1]
        dw_gate[u0:u1] = dg.T @ x
        dw_up[u0:u1] = du.T @ x
    return SwiGLUGrads(dx, dw_gate, dw_up, dw_down, expert_grad_norms(dw_gate, dw_up, dw_down, unit_offsets) ** 2)


def expert_grad_norms(dw_gate: torch.Tensor, dw_up: torch.Tensor, dw_down: torch.Tensor,
                      unit_offsets: torch.Tensor) -> torch.Tensor:
    """[E] L2 norm of the gradient over each expert's parameters (SMK's surprise); 0 for a 0-unit expert."""
    per_unit = dw_gate.float().square().sum(1) + dw_up.float().square().sum(1) + dw_down.float().square().sum(1)
    sizes = (unit_offsets[1:] - unit_offsets[:-1]).to(per_unit.device)
    expert = torch.repeat_interleave(torch.arange(len(sizes), device=per_unit.device), sizes,
                                     output_size=per_unit.shape[0])
    return per_unit.new_zeros(len(sizes)).index_add_(0, expert, per_unit).sqrt()
