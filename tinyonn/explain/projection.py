"""A 2-D map of the plan's units coloured by concept cell: each unit's activation profile over the
probe samples (log1p, standardised, PCA) embedded by UMAP when `umap-learn` is installed, else by
scikit-learn's t-SNE, with a fixed seed and at most `max_units` units."""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.preprocessing import StandardScaler

from tinyonn.explain.cells import PlanUnits
from tinyonn.store.zarr_store import ScoreStore

PCA_DIMS = 32


@dataclass(frozen=True)
class Projection:
    xy: np.ndarray
    """[n, 2] coordinates."""
    units: np.ndarray
    """[n] rows of the `PlanUnits` drawn."""
    method: str
    """"umap" or "tsne"."""
    features: str
    """What a unit's features were."""


def projection_method(choice: str) -> str:
    """"auto" → "umap" when umap-learn is importable, else "tsne"."""
    if choice == "auto":
        return "umap" if importlib.util.find_spec("umap") is not None else "tsne"
    return choice


def unit_features(store: ScoreStore, units: PlanUnits, rows: np.ndarray, max_samples: int) -> tuple[np.ndarray, str]:
    """[len(rows), F] features of the chosen plan units: their per-sample mean |h| over the first
    `max_samples` probe samples, or (without per-sample arrays) their per-category act/freq/grad."""
    layers, indices = store.units()
    position = {(int(l), int(i)): p for p, (l, i) in enumerate(zip(layers, indices))}
    missing = [(int(units.layer[r]), int(units.index[r])) for r in rows
               if (int(units.layer[r]), int(units.index[r])) not in position]
    if missing:
        raise ValueError(f"{store.path}: the plan's unit {missing[0][0]}:{missing[0][1]} is not in the store")
    columns = np.array([position[int(units.layer[r]), int(units.index[r])] for r in rows], dtype=np.int64)
    if store.has_per_sample:
        n = min(max_samples, store.n_samples)
        values = np.asarray(store.array("per_sample/act")[:n], dtype=np.float32)[:, columns].T
        return np.log1p(np.abs(values)), f"mean |h| over {n} probe samples"
    parts = [np.stack([store.by_category(stat)[c][columns] for c in store.categories], axis=1)
             for stat in ("act", "freq", "grad")]
    return np.nan_to_num(np.log1p(np.abs(np.concatenate(parts, axis=1)))), "per-category act, freq and grad"


def project_units(store: ScoreStore, units: PlanUnits, max_units: int, max_samples: int, method: str,
                  seed: int, tsne_iterations: int = 500) -> Projection:
    """Embed (a seeded sample of at most `max_units` of) the plan's units in 2-D."""
    total = len(units.layer)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(total, size=max_units, replace=False)) if total > max_units else np.arange(total)
    features, described = unit_features(store, units, rows, max_samples)
    features = StandardScaler().fit_transform(features)
    dims = min(PCA_DIMS, features.shape[0] - 1, features.shape[1])
    if dims >= 2:
        features = PCA(n_components=dims, random_state=seed).fit_transform(features)
    method = projection_method(method)
    if method == "umap":
        import umap

        xy = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(rows) - 1)).fit_transform(features)
    else:
        perplexity = float(min(30.0, max(2.0, (len(rows) - 1) / 3)))
        steps = "max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"  # sklearn < 1.5
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                  **{steps: tsne_iterations}).fit_transform(features)
    return Projection(xy=np.asarray(xy, dtype=np.float32), units=rows, method=method, features=described)
