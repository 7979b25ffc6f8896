"""The plan seen unit by unit and cell by cell: every kept unit's layer, expert and concept cell,
and each cell's span over the layers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinyonn.clustering.plan import ExpertPlan

SHARED = -2
"""The cell code of a layer's always-on shared units (-1 is a unit of no cell)."""


@dataclass(frozen=True)
class PlanUnits:
    """Every kept unit of a plan, [U] each."""

    layer: np.ndarray
    index: np.ndarray
    """Teacher unit index within its layer."""
    expert: np.ndarray
    """Expert within the layer (-1 for a shared unit)."""
    cell: np.ndarray
    """Concept cell (-1: none, SHARED: the shared expert)."""


def plan_units(plan: ExpertPlan) -> PlanUnits:
    layer, index, expert, cell = [], [], [], []
    for lp in plan.layers:
        sizes = lp.expert_sizes
        unit_expert = np.repeat(np.arange(lp.num_experts), sizes)
        layer += [np.full(len(lp.units) + len(lp.shared_units), lp.layer)]
        index += [lp.units, lp.shared_units]
        expert += [unit_expert, np.full(len(lp.shared_units), -1)]
        cell += [np.asarray(lp.expert_cell)[unit_expert], np.full(len(lp.shared_units), SHARED)]
    cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)  # noqa: E731
    return PlanUnits(layer=cat(layer), index=cat(index), expert=cat(expert), cell=cat(cell))


def cell_spans(plan: ExpertPlan) -> list[dict]:
    """Per concept cell: the layers its experts sit in, its first and last layer, its routed units
    per layer and its experts, with what the plan records about it (dominant category, score)."""
    known = {int(c["id"]): c for c in plan.cells if "id" in c}
    per_layer: dict[int, dict[int, int]] = {}
    experts: dict[int, int] = {}
    for lp in plan.layers:
        for e, cell in enumerate(np.asarray(lp.expert_cell).tolist()):
            if cell < 0:
                continue
            units = per_layer.setdefault(cell, {})
            units[lp.layer] = units.get(lp.layer, 0) + int(lp.expert_sizes[e])
            experts[cell] = experts.get(cell, 0) + 1
    spans = []
    for cell in sorted(per_layer):
        layers = sorted(per_layer[cell])
        info = known.get(cell, {})
        spans.append({"cell": cell, "layers": layers, "first_layer": layers[0], "last_layer": layers[-1],
                      "span": layers[-1] - layers[0] + 1, "units": sum(per_layer[cell].values()),
                      "experts": experts[cell], "units_per_layer": {str(l): per_layer[cell][l] for l in layers},
                      "dominant_category": info.get("dominant_category"), "mean_score": info.get("mean_score")})
    return spans
