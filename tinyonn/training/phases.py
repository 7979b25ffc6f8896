"""The two SMK phases: each layer's routing, min_k and the phase switch.

Phase 1 routes every token to every expert (mode "all"); phase 2 routes as `Phase2Config` says. The
budget of phase 2 "budget" routing is the one the quality table compares: per layer, routed units ≤
active_fraction · (teacher FFN units) − shared units per token (as `tinyonn.evaluation.extract`'s
`routed_budgets`), as a fraction of the layer's routed units.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tinyonn.model.routing import RoutingConfig
from tinyonn.training.config import Phase1Config, Phase2Config, experts_for


def phase1_routing(base: Sequence[RoutingConfig]) -> list[RoutingConfig]:
    """Every expert of every layer on."""
    return [dataclasses.replace(routing, mode="all") for routing in base]


def budget_fraction(active_fraction: float, intermediate_size: int, shared_units: int, routed_units: int) -> float:
    """The layer's routed-unit budget as a fraction of its routed units, so that shared + routed ≤
    active_fraction · intermediate_size per token (clamped to (0, 1]; at least one expert is always kept)."""
    budget = max(active_fraction * intermediate_size - shared_units, 0.0)
    return min(max(budget / max(routed_units, 1), 1e-9), 1.0)


def phase2_routing(layers, base: Sequence[RoutingConfig], config: Phase2Config,
                   intermediate_size: int) -> list[RoutingConfig]:
    """Each layer's phase-2 routing (layers: the model's `MoELayer`s, base: their routing at the start)."""
    routing = []
    for layer, current in zip(layers, base):
        experts = layer.num_experts
        if config.routing == "dynamic":
            k_min = experts_for(config.k_min_fraction, experts)
            routing.append(dataclasses.replace(current, mode="dynamic", top_p=config.top_p, k_min=k_min,
                                               k_max=max(k_min, experts_for(config.k_max_fraction, experts))))
        elif config.routing == "topk":
            routing.append(dataclasses.replace(current, mode="topk", top_k=experts_for(config.top_k_fraction, experts)))
        else:
            fraction = budget_fraction(config.active_fraction, intermediate_size, layer.shared_gate.shape[0],
                                       int(layer.expert_sizes.sum()))
            routing.append(dataclasses.replace(current, mode="budget", unit_budget=fraction))
    return routing


def phase1_length(config: Phase1Config, total_steps: int) -> int:
    """Phase 1's upper bound in steps: `steps`, at most `max_run_fraction` of the run's steps."""
    return min(config.steps, int(config.max_run_fraction * total_steps))


def phase1_done(config: Phase1Config, steps_done: int, distill_history: Sequence[float],
                total_steps: int | None = None) -> bool:
    """Whether phase 1 is over after `steps_done` of its steps (`distill_history`: its router
    distillation losses, one per step; `total_steps`: the run's length, which caps phase 1 at
    `max_run_fraction` of it)."""
    if steps_done >= (config.steps if total_steps is None else phase1_length(config, total_steps)):
        return True
    if config.switch == "steps" or steps_done < config.min_steps:
        return False
    window = config.converge_window
    if len(distill_history) < 2 * window:
        return False
    before = sum(distill_history[-2 * window:-window]) / window
    recent = sum(distill_history[-window:]) / window
    return before - recent < config.converge_tol * abs(before)
