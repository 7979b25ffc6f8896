"""pidiff-hdbscan's unit features: score block, per-category block, co-activation embedding,
output contribution and layer position, each z-scored and weighted; and their principal components."""

from __future__ import annotations

import math

import numpy as np

from tinyonn.clustering.config import ClusterConfig
from tinyonn.clustering.profiles import activation_profiles, sample_rows, unit_blocks
from tinyonn.clustering.units import layer_positions
from tinyonn.store.scores import ScoreConfig, normalise, score_store, zscore_columns
from tinyonn.store.zarr_store import ScoreStore

FEATURE_BLOCKS = ("score", "category", "coact", "output", "layer")
"""The feature blocks, in column order."""


def coactivation(store: ScoreStore, dims: int = 16, max_samples: int = 4096) -> tuple[np.ndarray, dict]:
    """[U, dims] co-activation embedding of every unit and a small info dict.

    Each unit's standardised log activation profile over (at most `max_samples`) samples is
    projected on the top `dims` eigenvectors of the samples' Gram matrix Z Zᵀ (a truncated SVD of
    Zᵀ, computed exactly in two lazy passes over `per_sample/act`), scaled by 1/sqrt(n) so a
    coordinate is the unit's correlation with that component. Signs are fixed deterministically.
    """
    from scipy.linalg import eigh

    rows = sample_rows(store.n_samples, max_samples)
    n, n_units = len(rows), store.n_units
    blocks = unit_blocks(n_units, n)
    gram = np.zeros((n, n))
    for cols in blocks:
        z = activation_profiles(store, np.arange(cols.start, cols.stop), rows)
        gram += z @ z.T
    k = min(dims, n)
    values, vectors = eigh(gram, subset_by_index=[n - k, n - 1])
    values, vectors = values[::-1], vectors[:, ::-1]  # largest first
    vectors *= np.where(vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])] < 0, -1.0, 1.0)
    embedding = np.zeros((n_units, dims))
    for cols in blocks:
        z = activation_profiles(store, np.arange(cols.start, cols.stop), rows)
        embedding[cols, : vectors.shape[1]] = (z.T @ vectors) / math.sqrt(n)
    total = float(np.trace(gram))
    info = {"samples_used": int(n), "dims": int(dims),
            "explained_variance": float(values.clip(min=0).sum() / total) if total > 0 else 0.0}
    return embedding, info


def unit_features(store: ScoreStore, config: ClusterConfig, score: np.ndarray | None = None,
                  coact: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, slice]]:
    """[U, D] weighted feature matrix of every unit and the column range of each block.

    Columns are z-scored over units; block b is scaled by its weight / sqrt(width), so each block
    carries weight² of variance whatever its width. `score` defaults to the store's `summary/score`
    (PIDiff defaults if absent). `coact` (from `coactivation`) is computed when not given, if the
    store has per-sample arrays and `w_coact` > 0; else that block is left out.
    """
    layer, _ = (np.asarray(a, dtype=np.int64) for a in store.units())
    layers, layer_units = layer_positions(layer)
    if score is None:
        score = (store.summary_of("score") if store.has("summary/score") else score_store(store, ScoreConfig()))
    if coact is None and store.has_per_sample and config.w_coact > 0:
        coact, _ = coactivation(store, config.coact_dims, config.coact_max_samples)
    blocks = {"score": _score_block(store, score, layer_units), "category": _category_block(store, layer_units)}
    if coact is not None:
        blocks["coact"] = np.asarray(coact, dtype=np.float64)
    if store.down_norm() is not None and config.w_output > 0:
        blocks["output"] = _output_block(store, layer_units)
    position = np.searchsorted(layers, layer) / max(1, len(layers) - 1)
    blocks["layer"] = position[:, None].astype(np.float64)
    weights = {"score": config.w_score, "category": config.w_category, "coact": config.w_coact,
               "output": config.w_output, "layer": config.w_layer}
    out, spans, start = [], {}, 0
    for name in FEATURE_BLOCKS:
        if name not in blocks:
            continue
        x = zscore_columns(blocks[name])
        out.append(x * (weights[name] / math.sqrt(x.shape[1])))
        spans[name] = slice(start, start + x.shape[1])
        start += x.shape[1]
    return np.concatenate(out, axis=1), spans


def _rank_per_layer(values: np.ndarray, layer_units: tuple[np.ndarray, ...]) -> np.ndarray:
    """[U] ranks in [0, 1] within each layer (NaN → 0.5)."""
    out = np.zeros(len(values))
    for idx in layer_units:
        out[idx] = np.nan_to_num(normalise(values[idx], "rank"), nan=0.5)
    return out


def _score_block(store: ScoreStore, score: np.ndarray, layer_units: tuple[np.ndarray, ...]) -> np.ndarray:
    """[U, 4] per-layer ranks of the score, act, freq and grad."""
    parts = [score] + [store.summary_of(s) for s in ("act", "freq", "grad")]
    return np.stack([_rank_per_layer(np.asarray(p, np.float64), layer_units) for p in parts], axis=1)


def _category_block(store: ScoreStore, layer_units: tuple[np.ndarray, ...]) -> np.ndarray:
    """[U, 3 C] act, freq and grad of each category ranked per layer, centred per unit and statistic."""
    columns = []
    for stat in ("act", "freq", "grad"):
        table = np.stack(list(store.by_category(stat).values())).astype(np.float64)  # [C, U]
        table = table[~np.isnan(table).all(axis=1)]
        ranked = np.stack([_rank_per_layer(row, layer_units) for row in table], axis=1)  # [U, C]
        columns.append(ranked - ranked.mean(axis=1, keepdims=True))
    return np.concatenate(columns, axis=1)


def _output_block(store: ScoreStore, layer_units: tuple[np.ndarray, ...]) -> np.ndarray:
    """[U, 1 + C] output contribution mean |h|·‖W_down[:, j]‖ ranked per layer, then the same per
    category ranked per layer and centred per unit (where the unit writes more than elsewhere)."""
    down_norm = np.asarray(store.down_norm(), dtype=np.float64)
    overall = _rank_per_layer(store.summary_of("act").astype(np.float64) * down_norm, layer_units)
    table = np.stack(list(store.by_category("act").values())).astype(np.float64)  # [C, U]
    table = table[~np.isnan(table).all(axis=1)]
    ranked = np.stack([_rank_per_layer(row * down_norm, layer_units) for row in table], axis=1)
    return np.concatenate([overall[:, None], ranked - ranked.mean(axis=1, keepdims=True)], axis=1)


def pca_project(features: np.ndarray, fit_rows: np.ndarray, dims: int, seed: int) -> tuple[np.ndarray, float]:
    """Every row projected on the top `dims` principal components of `features[fit_rows]`, and the
    variance ratio they explain."""
    from sklearn.decomposition import PCA

    dims = max(1, min(dims, features.shape[1], len(fit_rows) - 1))
    pca = PCA(n_components=dims, svd_solver="full", random_state=seed).fit(features[fit_rows])
    return pca.transform(features), float(pca.explained_variance_ratio_.sum())
