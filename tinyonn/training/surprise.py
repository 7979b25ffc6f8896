"""Surprise and PI: per-expert gradient norms, the global gradient norm, and the predictive integrity.

surprise_e of expert e in a MoE layer = the L2 norm of the loss gradient over e's parameters (its
rows of `w_gate`, `w_up`, `w_down`), read from the parameters' `.grad` after backward: the gradient
the optimiser applies (after accumulation, and after a data-parallel all-reduce). It is a segment sum
of squared row norms over `unit_expert`.

PI = exp(−α·((1−γ)·ε/τ + γ·S)) with ε the loss, τ the mean entropy of the logits and S the global
gradient norm, written as the seed's ΣPI toolkit (PyPI `sigma-pi`) computes it (same ε/(τ + 1e-9),
same entropy with log(p + 1e-9)); tests compare the two.

In phase 2, min_k = f(PI, act_k) = clamp(ceil(PI · act_k), 1, act_k): a confident step (PI near
1) updates as many experts as a token uses; a surprised one (PI near 0) only the single
least-surprised expert.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

ENTROPY_CHUNK = 1024
"""Rows of logits turned into probabilities at a time (bounds the float32 copy)."""


def segment_sq_norms(grad: torch.Tensor, unit_expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[U, d] gradient rows and each row's expert [U] → [E] float32 sums of squared row norms."""
    rows = grad.float().square().sum(dim=1)
    return torch.zeros(num_experts, dtype=torch.float32, device=grad.device).index_add_(0, unit_expert, rows)


def expert_surprise(layer) -> torch.Tensor:
    """[E] float32 L2 norm of each expert's gradient (its rows of `w_gate`, `w_up`, `w_down`) from
    the layer's `.grad`; an expert without gradient has surprise 0."""
    total = torch.zeros(layer.num_experts, dtype=torch.float32, device=layer.unit_expert.device)
    for param in (layer.w_gate, layer.w_up, layer.w_down):
        if param.grad is not None:
            total += segment_sq_norms(param.grad, layer.unit_expert, layer.num_experts)
    return total.sqrt()


def global_surprise(grads: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """S: the L2 norm of all gradients together (float32 scalar; `None` entries are skipped)."""
    squares = [g.detach().float().square().sum() for g in grads if g is not None]
    if not squares:
        return torch.tensor(0.0)
    return torch.stack(squares).sum().sqrt()


def entropy_sum(logits: torch.Tensor) -> torch.Tensor:
    """Σ over rows of −Σ p·log(p + 1e-9), p = softmax of each row of [..., V] logits (float32)."""
    rows = logits.detach().reshape(-1, logits.shape[-1])
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, rows.shape[0], ENTROPY_CHUNK):
        probs = rows[start:start + ENTROPY_CHUNK].float().softmax(dim=-1)
        total += -(probs * torch.log(probs + 1e-9)).sum()
    return total


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """τ: the mean over rows of the entropy of softmax(logits) (sigma-pi's definition)."""
    rows = logits.numel() // logits.shape[-1]
    return entropy_sum(logits) / max(rows, 1)


def pi_score(epsilon: torch.Tensor | float, tau: torch.Tensor | float, surprise: torch.Tensor | float,
             alpha: float, gamma: float) -> torch.Tensor:
    """PI = exp(−α·((1−γ)·ε/(τ + 1e-9) + γ·S)) as a float32 tensor."""
    epsilon, tau, surprise = (torch.as_tensor(v, dtype=torch.float32) for v in (epsilon, tau, surprise))
    cost = (1 - gamma) * (epsilon / (tau + 1e-9)) + gamma * surprise
    return torch.exp(-alpha * cost)


def min_k_from_pi(pi: float, act_k: int) -> int:
    """f(PI, act_k) = clamp(ceil(PI · act_k), 1, act_k) (act_k ≥ 1)."""
    act_k = max(int(act_k), 1)
    scaled = pi * act_k if math.isfinite(pi) else 0.0
    return min(act_k, max(1, math.ceil(scaled)))
