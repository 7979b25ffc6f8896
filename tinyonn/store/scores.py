"""Unit scores from the probe's statistics: PIDiff (synergy), Wanda-like, Taylor and random.

All are pure functions of [U] arrays; `score_store` applies one to a finalized `ScoreStore`, and
`summary_score_fn` gives the same computation as the function `ScoreStoreWriter.finalize` stores in
`summary/score`, so `score_store(store, config)` equals that array bitwise for the same config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from tinyonn.store.zarr_store import ScoreStore

Norm = Literal["rank", "zscore", "none"]
ScoreMethod = Literal["pidiff", "wanda", "taylor", "random"]

PIDIFF_FORMULA = (
    "S = w1*N(A) + w2*N(1/(G+eps)) + w3*N(F); A = mean |h| (activation), F = activation frequency, "
    "G = mean per-sample gradient norm (L2) of the unit's parameters, means over all probe samples; "
    "N = the same normalisation (rank to [0,1], z-score, or none) applied to each term"
)
"""The PIDiff formula as stored in score store attrs."""


@dataclass(frozen=True)
class ScoreConfig:
    """Which score ranks the units, and its parameters."""

    method: ScoreMethod = "pidiff"
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """PIDiff weights (w1, w2, w3) of activation, inverse gradient and frequency."""
    eps: float = 1e-6
    """PIDiff: added to G before inverting."""
    norm: Norm = "rank"
    """PIDiff: how each term is normalised (wanda and taylor scores are kept raw)."""
    seed: int = 0
    """Random score: generator seed."""

    def __post_init__(self):
        if self.method not in ("pidiff", "wanda", "taylor", "random"):
            raise ValueError(f"ScoreConfig.method must be pidiff, wanda, taylor or random, got {self.method!r}")
        if self.norm not in ("rank", "zscore", "none"):
            raise ValueError(f"ScoreConfig.norm must be rank, zscore or none, got {self.norm!r}")
        if len(self.weights) != 3:
            raise ValueError(f"ScoreConfig.weights must be (w1, w2, w3), got {self.weights!r}")
        if not self.eps > 0:
            raise ValueError(f"ScoreConfig.eps must be > 0, got {self.eps!r}")


def normalise(values: np.ndarray, method: Norm = "rank") -> np.ndarray:
    """Normalise a 1-D array (float64 result; NaNs stay NaN and are ignored by the others).

    rank: average ranks (ties share their mean rank) scaled to [0, 1]; a single value gives 0.5.
    zscore: (x - mean) / std (population std); a constant array gives zeros. none: a float64 copy.
    """
    if method not in ("rank", "zscore", "none"):
        raise ValueError(f"normalise method must be rank, zscore or none, got {method!r}")
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"normalise expects a 1-D array, got shape {x.shape}")
    out = np.full(x.shape, np.nan)
    valid = ~np.isnan(x)
    v = x[valid]
    if method == "none":
        return x.copy()
    if v.size == 0:
        return out
    if method == "rank":
        uniq, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        first = np.cumsum(counts) - counts
        ranks = (first + (counts - 1) / 2.0)[inverse]
        out[valid] = ranks / (v.size - 1) if v.size > 1 else 0.5
    else:
        std = v.std()
        out[valid] = (v - v.mean()) / std if std > 0 else 0.0
    return out


def zscore_columns(x: np.ndarray) -> np.ndarray:
    """Column z-scores of a 2-D float64 array (a new array): (x - column mean) / the population std
    of the centred column; a constant column gives zeros. Unlike `normalise`, no NaN handling."""
    x = x - x.mean(axis=0)
    std = x.std(axis=0)
    np.divide(x, std, out=x, where=std > 0)
    x[:, std == 0] = 0.0
    return x


def pidiff(
    act: np.ndarray,
    freq: np.ndarray,
    grad: np.ndarray,
    w1: float = 1.0,
    w2: float = 1.0,
    w3: float = 1.0,
    eps: float = 1e-6,
    norm: Norm = "rank",
) -> np.ndarray:
    """PIDiff / synergy score: S = w1*N(A) + w2*N(1/(G+eps)) + w3*N(F) (float64 [U]).

    The design's `S = w1*A + w2/(G+eps) + w3*F` read with each of the three terms (activation A,
    inverse gradient 1/(G+eps), frequency F) normalised by the same method before weighting, so the
    weights mean something; `norm="none"` is the raw formula. High activation, low gradient (the unit
    is settled: the loss barely moves it) and high frequency score high. See `PIDIFF_FORMULA`.
    """
    act, freq, grad = (np.asarray(a, dtype=np.float64) for a in (act, freq, grad))
    if not act.shape == freq.shape == grad.shape or act.ndim != 1:
        raise ValueError(f"pidiff needs three 1-D arrays of one shape, got {act.shape}, {freq.shape}, {grad.shape}")
    return (w1 * normalise(act, norm) + w2 * normalise(1.0 / (grad + eps), norm)
            + w3 * normalise(freq, norm))


def wanda(act: np.ndarray, down_norm: np.ndarray) -> np.ndarray:
    """Wanda-like |W|·||x||: the unit's down_proj column norm times its mean |h| (float64 [U])."""
    act, down_norm = np.asarray(act, dtype=np.float64), np.asarray(down_norm, dtype=np.float64)
    if act.shape != down_norm.shape:
        raise ValueError(f"wanda: act has shape {act.shape}, down_norm {down_norm.shape}")
    return down_norm * act


def taylor(taylor_summary: np.ndarray, norm: Norm = "none") -> np.ndarray:
    """Taylor score: the stored mean |Σ_t h·∂l/∂h| per unit, optionally normalised (float64 [U])."""
    return normalise(np.asarray(taylor_summary, dtype=np.float64), norm)


def random_score(n_units: int, seed: int = 0) -> np.ndarray:
    """Uniform [0, 1) scores from `seed` (the ablation baseline), float64 [n_units]."""
    return np.random.default_rng(seed).random(n_units)


def summary_score_fn(config: ScoreConfig) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """The score function for `ScoreStoreWriter.finalize`: summary dict → float32 [U] scores.

    The dict holds "act", "freq", "grad", "taylor" and, when stored, "down_norm" (wanda needs it).
    """

    def score(summary: dict[str, np.ndarray]) -> np.ndarray:
        def need(key: str) -> np.ndarray:
            if key not in summary:
                hint = " (pass units_down_norm to ScoreStoreWriter.open)" if key == "down_norm" else ""
                raise ValueError(f"score method {config.method!r} needs summary {key!r}{hint}")
            return summary[key]

        if config.method == "pidiff":
            w1, w2, w3 = config.weights
            values = pidiff(need("act"), need("freq"), need("grad"), w1, w2, w3, config.eps, config.norm)
        elif config.method == "wanda":
            values = wanda(need("act"), need("down_norm"))
        elif config.method == "taylor":
            values = taylor(need("taylor"))
        else:
            values = random_score(len(need("act")), config.seed)
        return values.astype(np.float32)

    return score


def score_store(store: ScoreStore, config: ScoreConfig) -> np.ndarray:
    """Score every unit of a finalized store (float32 [U]); equals `summary/score` for the same config."""
    return summary_score_fn(config)(store.score_inputs())
