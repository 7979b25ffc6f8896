"""Update rules: which experts of a MoE layer keep their gradient in a step.

Named as in the seed author's PILF code:

- "smk":       the `min_k` experts with the lowest surprise among ALL of the layer's experts (an
               expert no token used has surprise 0, so it can be among them: it then moves only by
               the state it already has, which is what distinguishes smk from samk);
- "samk":      the `min_k` lowest-surprise experts among those activated in the step (selected for
               at least one attended token); all of them if fewer are activated;
- "selective": every activated expert (plain MoE training);
- "full":      every expert, activated or not (a plain optimiser step over everything).

Ties in surprise go to the lower expert index. The experts that do not keep their gradient have it
zeroed before clipping and the optimiser step, and the optimiser leaves their rows (weights, moments,
step counts) untouched (`tinyonn.training.optim.MaskedAdamW`).

`keep_grid` is `keep_experts` for all layers at once over the [L, E_max] grid of
`tinyonn.training.surprise.ExpertRows` (the same masks; tested against it), with min_k a tensor, so
the loop decides every layer's keep mask on the device without host syncs.
"""

from __future__ import annotations

import torch

from tinyonn.training.config import RULES


def lowest_surprise(surprise: torch.Tensor, eligible: torch.Tensor, count: int) -> torch.Tensor:
    """[E] bool: the `count` eligible experts of lowest surprise (ties: lower index first)."""
    ranked = torch.where(eligible, surprise.float(), torch.full_like(surprise, float("inf"), dtype=torch.float32))
    order = torch.sort(ranked, stable=True).indices
    keep = torch.zeros_like(eligible)
    chosen = order[: min(count, int(eligible.sum()))]
    keep[chosen] = True
    return keep


def keep_experts(rule: str, surprise: torch.Tensor, activated: torch.Tensor, min_k: int) -> torch.Tensor:
    """[E] bool: the experts of one layer whose gradient this step applies under `rule`."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    activated = activated.to(torch.bool)
    if rule == "full":
        return torch.ones_like(activated)
    if rule == "selective":
        return activated.clone()
    eligible = torch.ones_like(activated) if rule == "smk" else activated
    return lowest_surprise(surprise, eligible, max(int(min_k), 0))


def unit_mask(keep: torch.Tensor, unit_expert: torch.Tensor) -> torch.Tensor:
    """Expert keep mask [E] → row keep mask [U] of the layer's `w_gate`/`w_up`/`w_down`."""
    return keep.to(unit_expert.device)[unit_expert]


def expert_parameters(layer) -> tuple[torch.nn.Parameter, ...]:
    """The parameters whose rows belong to experts (one row per unit)."""
    return layer.w_gate, layer.w_up, layer.w_down


@torch.no_grad()
def mask_expert_gradients(layer, keep: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Zero the gradient rows of the experts not kept; returns {parameter: row keep mask [U]}, the
    masks `MaskedAdamW.step` takes so their optimiser state does not advance."""
    rows = unit_mask(keep, layer.unit_expert)
    masks = {}
    for param in expert_parameters(layer):
        if param.grad is not None:
            param.grad.masked_fill_(~rows.unsqueeze(1), 0)
        masks[param] = rows
    return masks


def keep_grid(rule: str, surprise: torch.Tensor, activated: torch.Tensor, min_k: torch.Tensor,
              valid: torch.Tensor) -> torch.Tensor:
    """`keep_experts` of every layer at once: surprise [L, E_max], activated and valid (real experts)
    [L, E_max] bool, min_k [L] integer tensor → [L, E_max] bool (padding never kept)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    activated = activated.to(torch.bool) & valid
    if rule == "full":
        return valid.clone()
    if rule == "selective":
        return activated
    eligible = valid if rule == "smk" else activated
    ranked = torch.where(eligible, surprise.float(), torch.full_like(surprise, float("inf"), dtype=torch.float32))
    order = torch.sort(ranked, dim=1, stable=True).indices  # padding (inf, last columns) sorts after the layer's own
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    count = torch.minimum(min_k.to(order.device).clamp_min(0), eligible.sum(1))
    return (rank < count.unsqueeze(1)) & valid


@torch.no_grad()
def zero_dropped_rows(params: list[torch.nn.Parameter], row_masks: list[torch.Tensor]) -> None:
    """Zero the gradient rows outside each parameter's row keep mask (`ExpertRows.row_masks`)."""
    for param, rows in zip(params, row_masks):
        if param.grad is not None:
            param.grad.masked_fill_(~rows.unsqueeze(1), 0)
