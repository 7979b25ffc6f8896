"""The budget, the same for every method: per layer the shared (always-on) units, the routed units
kept for experts, and the pruned rest."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinyonn.clustering.config import ClusterConfig
from tinyonn.clustering.units import UnitTable


@dataclass(frozen=True)
class KeptUnits:
    """One layer's kept units (global positions, ascending)."""

    shared: np.ndarray
    routed: np.ndarray


def keep_layer(score: np.ndarray, freq: np.ndarray, positions: np.ndarray, config: ClusterConfig) -> KeptUnits:
    """The shared and routed units of one layer.

    Shared: the units with freq >= the threshold (most frequent first, at most
    `shared_max_fraction`). Routed: the highest-score other units up to the budget. When the
    routed count is not a multiple of `block`, the budget is rounded up (more top-score units) or,
    when every unit is kept, the least frequent shared units move to the routed ones.
    """
    n, block = len(positions), config.block
    n_keep = n if config.keep_fraction >= 1 else int(np.clip(round(config.keep_fraction * n / block) * block, block, n))
    threshold = np.quantile(freq, config.shared_freq) if config.shared_by == "quantile" else config.shared_freq
    by_freq = np.lexsort((positions, -freq))  # most frequent first, ties by position
    cap = min(int(config.shared_max_fraction * n), n_keep - 1)
    n_shared = int(min(np.sum(freq >= threshold), max(cap, 0)))
    short = (-(n_keep - n_shared)) % block
    if short:
        if n_keep + short <= n and config.keep_fraction < 1:
            n_keep += short
        elif short <= n_shared:
            n_shared -= short
    shared = np.sort(positions[by_freq[:n_shared]])
    rest = np.setdiff1d(np.arange(n), by_freq[:n_shared])
    by_score = rest[np.lexsort((rest, -score[rest]))]
    routed = np.sort(positions[by_score[: n_keep - n_shared]])
    return KeptUnits(shared=shared, routed=routed)


def keep_units(units: UnitTable, config: ClusterConfig) -> list[KeptUnits]:
    """Every layer's kept units."""
    return [keep_layer(units.score[idx], units.freq[idx], idx, config) for idx in units.layer_units]


def budget_info(units: UnitTable, kept: list[KeptUnits], config: ClusterConfig) -> dict:
    """The budget as recorded in `ExpertPlan.info`: units kept, shared, routed and pruned per layer."""
    per_layer = [len(idx) for idx in units.layer_units]
    shared = [len(k.shared) for k in kept]
    routed = [len(k.routed) for k in kept]
    return {
        "budget": {"keep_fraction": config.keep_fraction, "units_per_layer": per_layer,
                   "kept_per_layer": [s + r for s, r in zip(shared, routed)], "shared_per_layer": shared,
                   "routed_per_layer": routed,
                   "pruned_per_layer": [p - s - r for p, s, r in zip(per_layer, shared, routed)],
                   "shared_rule": f"freq >= {config.shared_by} {config.shared_freq}, at most "
                                  f"{config.shared_max_fraction:g} of the layer"},
        "kept_fraction": sum(shared + routed) / max(1, sum(per_layer)),
        "size_bounds": [config.min_size, config.max_size], "block": config.block,
        "score": units.score_source,
    }
