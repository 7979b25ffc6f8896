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

The training loop computes these for all layers at once, on the device and without host syncs:
`ExpertRows` lays every layer's experts out as an [L, E_max] grid (`stacked_surprise`), and
`min_k_tensor` is `min_k_from_pi` on tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

ENTROPY_CHUNK = 4096
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
    grads = [g.detach() for g in grads if g is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32) if all(g.is_floating_point() for g in grads) \
        else [g.float().norm() for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms))


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


def min_k_tensor(pi: torch.Tensor, act_k: torch.Tensor) -> torch.Tensor:
    """`min_k_from_pi` on the device: PI (float32 scalar) and act_k [L] (int64, ≥ 1) → [L] int64."""
    scaled = pi.double() * act_k.double()
    scaled = torch.where(torch.isfinite(scaled), scaled, torch.zeros_like(scaled))
    return torch.minimum(torch.ceil(scaled).clamp_min(1).to(torch.int64), act_k)


class ExpertRows:
    """Every MoE layer's experts as one [L, E_max] grid (layer l's experts in columns 0..E_l−1, the
    rest padding), and the expert parameters' rows mapped onto it, for per-step bookkeeping as a few
    tensor ops over all layers."""

    def __init__(self, layers):
        self.layers = list(layers)
        device = self.layers[0].unit_expert.device
        self.num_layers = len(self.layers)
        self.num_experts = [layer.num_experts for layer in self.layers]
        self.width = max(self.num_experts)
        self.params = [p for layer in self.layers for p in (layer.w_gate, layer.w_up, layer.w_down)]
        self.rows_per_param = [p.shape[0] for p in self.params]
        cell = [layer.unit_expert.to(device) + index * self.width for index, layer in enumerate(self.layers)]
        self.row_cell = torch.cat([c for c in cell for _ in range(3)])
        """[Σ rows] the grid cell (l·E_max + e) of every row of the expert parameters, in `params` order."""
        columns = torch.arange(self.width, device=device)
        counts = torch.tensor(self.num_experts, device=device)
        self.valid = columns < counts.unsqueeze(1)
        """[L, E_max] bool: real experts."""
        sizes = torch.zeros(self.num_layers, self.width, dtype=torch.float64, device=device)
        for index, layer in enumerate(self.layers):
            sizes[index, :layer.num_experts] = layer.expert_sizes.to(device, torch.float64)
        self.sizes = sizes
        """[L, E_max] float64 units per expert (0 for padding)."""
        self.shared = torch.tensor([float(layer.shared_gate.shape[0]) for layer in self.layers],
                                   dtype=torch.float64, device=device)
        self.experts = counts

    def stacked_surprise(self) -> torch.Tensor:
        """[L, E_max] float32 surprise of every expert (0 for padding, and for an expert whose
        parameters have no gradient): `expert_surprise` of all layers in a few kernels."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        rows = torch.linalg.vector_norm(torch.cat(grads), dim=1, dtype=torch.float32).square()
        total = torch.zeros(self.num_layers * self.width, dtype=torch.float32, device=rows.device)
        return total.index_add_(0, self.row_cell, rows).sqrt().view(self.num_layers, self.width)

    def row_masks(self, keep: torch.Tensor) -> list[torch.Tensor]:
        """[L, E_max] expert keep mask → one [rows] bool mask per parameter of `params`."""
        return list(torch.split(keep.reshape(-1)[self.row_cell], self.rows_per_param))

    def pad(self, values: list[torch.Tensor], fill: float) -> torch.Tensor:
        """Per-layer [..., E_l] tensors → one [L, ..., E_max] tensor, padded with `fill`."""
        return torch.stack([torch.nn.functional.pad(v, (0, self.width - v.shape[-1]), value=fill) for v in values])
