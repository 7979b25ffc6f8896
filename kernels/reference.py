"""Plain-PyTorch references for the kernels (the ground truth the Triton versions are tested against).

Layout (as in `tinyonn.model.MoELayer`): routed units are packed expert by expert, so expert e owns
units `unit_offsets[e]:unit_offsets[e+1]` of `w_gate`, `w_up` [U, d] and the matching columns of
`w_down` [d, U]. Tokens are sorted by expert (`sort_by_expert`), so expert e owns rows
`token_offsets[e]:token_offsets[e+1]` of `x_sorted` [M, d]. Any expert may have 0 units or 0 tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (token, slot) expert ids [N·k] → (order [N·k], token_offsets [E+1]).

    `order` is a stable sort by expert: `x_sorted = x[order // k]`, and the rows of expert e are
    `token_offsets[e]:token_offsets[e+1]`. Scatter back with `y.index_add_(0, order // k, y_sorted)`.
    """
    expert_ids = expert_ids.reshape(-1)
    order = torch.sort(expert_ids, stable=True).indices
    counts = torch.bincount(expert_ids, minlength=num_experts)
    return order, torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _ranges(offsets: torch.Tensor) -> list[tuple[int, int]]:
    bounds = offsets.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def ragged_swiglu(x_sorted: torch.Tensor, token_offsets: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                  w_down: torch.Tensor, unit_offsets: torch.Tensor) -> torch.Tensor:
    """y [M, d]: rows of expert e → silu(x·Wg[e]^T) · (x·Wu[e]^T) · Wd[e]^T (zeros for a 0-unit expert)."""
    y = x_sorted.new_zeros(x_sorted.shape[0], w_down.shape[0])
    for (m0, m1), (u0, u1) in zip(_ranges(token_offsets), _ranges(unit_offsets)):
        if m1 > m0 and u1 > u0:
            x = x_sorted[m0:m1]
            h = F.silu(x @ w_gate[u0:u1].T) * (x @ w_up[u0:u1].T)
            y[m0:m1] = h @ w_down[:, u0:u1].T
    return y


def ragged_swiglu_backward(dy: torch.Tensor, x_sorted: torch.Tensor, token_offsets: torch.Tensor,
                           w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                           unit_offsets: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [M, d], dw_gate [U, d], dw_up [U, d], dw_down [d, U]) of `ragged_swiglu`, by explicit formulas.

    Per expert, with g = x·Wg^T, u = x·Wu^T, s = silu(g), h = s·u:
    dh = dy·Wd, dWd = dy^T·h, du = dh·s, dg = dh·u·σ(g)(1 + g(1 − σ(g))),
    dx = dg·Wg + du·Wu, dWg = dg^T·x, dWu = du^T·x.
    """
    dx = torch.zeros_like(x_sorted)
    dw_gate, dw_up, dw_down = torch.zeros_like(w_gate), torch.zeros_like(w_up), torch.zeros_like(w_down)
    for (m0, m1), (u0, u1) in zip(_ranges(token_offsets), _ranges(unit_offsets)):
        if m1 == m0 or u1 == u0:
            continue
        x, g_out = x_sorted[m0:m1], dy[m0:m1]
        g, u = x @ w_gate[u0:u1].T, x @ w_up[u0:u1].T
        sig = torch.sigmoid(g)
        s = g * sig
        dh = g_out @ w_down[:, u0:u1]
        dw_down[:, u0:u1] = g_out.T @ (s * u)
        du = dh * s
        dg = dh * u * sig * (1 + g * (1 - sig))
        dx[m0:m1] = dg @ w_gate[u0:u1] + du @ w_up[u0:u1]
        dw_gate[u0:u1] = dg.T @ x
        dw_up[u0:u1] = du.T @ x
    return dx, dw_gate, dw_up, dw_down


def expert_grad_norms(dw_gate: torch.Tensor, dw_up: torch.Tensor, dw_down: torch.Tensor,
                      unit_offsets: torch.Tensor) -> torch.Tensor:
    """[E] L2 norm of the gradient over each expert's parameters (SMK's surprise); 0 for a 0-unit expert."""
    per_unit = (dw_gate.float().square().sum(1) + dw_up.float().square().sum(1)
                + dw_down.float().square().sum(0))
    sizes = (unit_offsets[1:] - unit_offsets[:-1]).to(per_unit.device)
    expert = torch.repeat_interleave(torch.arange(len(sizes), device=per_unit.device), sizes,
                                     output_size=per_unit.shape[0])
    return per_unit.new_zeros(len(sizes)).index_add_(0, expert, per_unit).sqrt()
