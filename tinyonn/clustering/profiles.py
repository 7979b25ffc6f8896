"""Activation profiles: each unit's standardised log activation over (an even stride of) the probe
samples, read lazily from a store's `per_sample/act`, a block of units at a time."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tinyonn.store.scores import zscore_columns
from tinyonn.store.zarr_store import ScoreStore


def sample_rows(n_samples: int, max_samples: int) -> np.ndarray:
    """Evenly strided sample rows, at most `max_samples`."""
    if n_samples <= max_samples:
        return np.arange(n_samples)
    return np.unique(np.linspace(0, n_samples - 1, max_samples).round().astype(np.int64))


def activation_profiles(store: ScoreStore, positions: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[len(rows), len(positions)] float64 column z-scores of log(1 + act) (constant → 0)."""
    array = store.array("per_sample/act")
    positions = np.asarray(positions)
    if len(positions) and np.all(np.diff(positions) == 1):
        cols = slice(int(positions[0]), int(positions[-1]) + 1)
        if len(rows) == array.shape[0]:
            raw = array[:, cols]
        else:
            raw = array.get_orthogonal_selection((rows, cols))
    else:
        raw = array.get_orthogonal_selection((rows, positions))
    return zscore_columns(np.log1p(np.nan_to_num(np.asarray(raw, dtype=np.float64), nan=0.0)))


def profile_lookup(store: ScoreStore, positions: np.ndarray, rows: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """units → their [n, samples] activation profiles (the units among `positions`, read once)."""
    profiles = activation_profiles(store, positions, rows).T
    return lambda units: profiles[np.searchsorted(positions, units)]


def unit_blocks(n_units: int, n_rows: int, budget_bytes: int = 128 << 20) -> list[slice]:
    """Consecutive unit ranges whose [n_rows, units] float64 profiles fit in `budget_bytes`."""
    width = max(1, budget_bytes // max(1, 8 * n_rows))
    return [slice(start, min(n_units, start + width)) for start in range(0, n_units, width)]
