"""`Expert`, what every method produces per layer, and its packing into a `LayerPlan`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinyonn.clustering.plan import LayerPlan


@dataclass(frozen=True)
class Expert:
    """One expert of one layer under construction."""

    units: np.ndarray
    """Global unit positions in the store (ascending)."""
    group: int
    """Router group inside the layer."""
    cell: int
    """Concept cell it is a slice of (-1: none, as for the baselines)."""


def even_sizes(n: int, parts: int, block: int) -> list[int]:
    """`parts` sizes adding up to n, multiples of `block` but the last (which takes n % block)."""
    parts = max(1, min(parts, n))
    q, r = divmod(n, block)
    if q >= parts:
        base, extra = divmod(q, parts)
        sizes = [block * (base + (i < extra)) for i in range(parts)]
        sizes[-1] += r
        return sizes
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


def layer_plan(layer: int, index: np.ndarray, shared: np.ndarray, experts: list[Expert]) -> LayerPlan:
    """One layer's experts and shared units (global positions) as a `LayerPlan` of within-layer
    indices (`index`: [U] index of each store unit inside its layer), experts ordered by group."""
    experts = sorted(experts, key=lambda expert: expert.group)  # stable: keeps the order inside a group
    sizes = [len(expert.units) for expert in experts]
    units = np.concatenate([index[expert.units] for expert in experts]) if experts else np.zeros(0, np.int64)
    return LayerPlan(layer=int(layer), units=units.astype(np.int64),
                     expert_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                     expert_group=np.array([expert.group for expert in experts], dtype=np.int64),
                     expert_cell=np.array([expert.cell for expert in experts], dtype=np.int64),
                     shared_units=np.sort(index[shared]).astype(np.int64))
