"""The store's units as every method sees them: layer bookkeeping, ranking score and frequency."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from tinyonn.clustering.config import ClusterConfig
from tinyonn.store.scores import ScoreConfig, score_store
from tinyonn.store.zarr_store import ScoreStore


def open_store(store: ScoreStore | str | os.PathLike) -> ScoreStore:
    """`store` itself, or the finalized store at that path."""
    return store if isinstance(store, ScoreStore) else ScoreStore.open(store)


def layer_positions(layer: np.ndarray) -> tuple[tuple[int, ...], tuple[np.ndarray, ...]]:
    """(sorted layer ids, per layer the global positions of its units, ascending) of a [U] layer array."""
    layers = tuple(int(v) for v in np.unique(layer))
    return layers, tuple(np.flatnonzero(layer == l) for l in layers)


@dataclass(frozen=True)
class UnitTable:
    """The per-unit summaries every method needs, plus the layer bookkeeping."""

    layer: np.ndarray  # [U] layer id
    index: np.ndarray  # [U] index inside the layer
    layers: tuple[int, ...]  # sorted layer ids
    layer_units: tuple[np.ndarray, ...]  # per layer: global positions of its units (ascending)
    score: np.ndarray  # [U] float64, NaN → -inf
    freq: np.ndarray  # [U] float64
    score_source: dict
    intermediate_size: int

    @classmethod
    def read(cls, store: ScoreStore, config: ClusterConfig) -> UnitTable:
        """Units of `store` scored by `config.score`, else by its `summary/score`, else by PIDiff defaults."""
        layer, index = (np.asarray(a, dtype=np.int64) for a in store.units())
        if config.score is not None:
            score = score_store(store, config.score).astype(np.float64)
            source = {"source": "ScoreConfig", **asdict(config.score)}
        elif store.has("summary/score"):
            score = store.summary_of("score").astype(np.float64)
            source = {"source": "summary/score", "score": store.attrs.get("score"),
                      "score_config": store.attrs.get("score_config"), "formula": store.attrs.get("formula")}
        else:
            score = score_store(store, ScoreConfig()).astype(np.float64)
            source = {"source": "ScoreConfig (store has no summary/score)", **asdict(ScoreConfig())}
        size = int((store.attrs.get("teacher_config") or {}).get("intermediate_size") or 0)
        layers, layer_units = layer_positions(layer)
        return cls(layer=layer, index=index, layers=layers, layer_units=layer_units,
                   score=np.nan_to_num(score, nan=-np.inf), freq=store.summary_of("freq").astype(np.float64),
                   score_source=source, intermediate_size=max(size, int(index.max()) + 1))
