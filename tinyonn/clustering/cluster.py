"""Concept cells and experts: turn a score store into an `ExpertPlan` (DESIGN.md, "Clusters and experts").

Three methods, one budget. Every method keeps the same units per layer (a shared always-on expert
of the broadest units, then the highest-scoring others up to `keep_fraction`) and differs only in
how the kept routed units are split into experts:

- "pidiff-hdbscan": per-unit features (score and its parts, per-category behaviour, a co-activation
  embedding, layer position) → PCA → HDBSCAN. Clusters are concept cells and may span layers; an
  expert is a cell's slice in one layer, split / merged to `[min_size, max_size]` and rounded to a
  multiple of `block`. Router groups cut one Ward hierarchy of the cells.
- "random" (LLaMA-MoE style): routed units shuffled (seeded) into equal experts.
- "coact-kmeans" (MoEfication style): balanced k-means per layer on the units' activation profiles.

Everything is deterministic given `ClusterConfig.seed`. `plot_cells` draws a plan's cells.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from tinyonn.clustering.plan import ExpertPlan, LayerPlan
from tinyonn.store.scores import ScoreConfig, normalise, score_store
from tinyonn.store.zarr_store import ScoreStore

Method = Literal["pidiff-hdbscan", "random", "coact-kmeans"]
METHODS = ("pidiff-hdbscan", "random", "coact-kmeans")
FEATURE_BLOCKS = ("score", "category", "coact", "layer")


@dataclass(frozen=True)
class ClusterConfig:
    """How units become cells and experts (shared by all three methods unless marked)."""

    method: Method = "pidiff-hdbscan"
    seed: int = 0
    # -- budget: the same for every method
    keep_fraction: float = 1.0
    """Fraction of each layer's units kept (shared + routed), rounded to a multiple of `block`;
    the lowest-score units are pruned first."""
    score: ScoreConfig | None = None
    """Score that ranks units; None uses the store's `summary/score` (PIDiff defaults if absent)."""
    shared_freq: float = 0.99
    """Units with activation frequency >= this form the shared expert: a per-layer quantile of
    `summary/freq` (shared_by="quantile") or an absolute frequency (shared_by="threshold")."""
    shared_by: Literal["quantile", "threshold"] = "quantile"
    shared_max_fraction: float = 0.0625
    """At most this fraction of a layer's units are shared (the most frequent first); 0 disables."""
    # -- experts
    min_size: int = 32
    max_size: int = 128
    block: int = 16
    """Expert sizes are rounded to multiples of this where possible (kernel tile)."""
    groups_per_layer: int = 4
    experts_per_layer: int | tuple[int, ...] | None = None
    """random / coact-kmeans: experts per layer (one int, or one per layer); None: routed units /
    `expert_size`. Pass a pidiff-hdbscan plan's counts (`baseline_config`) for a fair comparison."""
    expert_size: int = 64
    """random / coact-kmeans: target expert size when `experts_per_layer` is None."""
    # -- pidiff-hdbscan features
    w_score: float = 0.5
    """Weight of the score block: rank-normalised score, act, freq, grad (per layer)."""
    w_category: float = 1.0
    """Weight of the per-category block: by-category act, freq, grad ranked per category and layer,
    centred per unit (what the unit does more in one category than in the others)."""
    w_coact: float = 3.0
    """Weight of the co-activation block: the unit's standardised log activation profile over
    samples projected on the top `coact_dims` sample-space components."""
    w_layer: float = 0.5
    """Weight of the layer position layer / (L - 1); small, so cells can span layers."""
    coact_dims: int = 16
    coact_max_samples: int = 4096
    """Co-activation uses at most this many samples (evenly strided) so its Gram matrix stays small."""
    pca_dims: int = 4
    """Weighted features are reduced to this many principal components before HDBSCAN (density
    clustering needs few dimensions: with more, nearly every unit of a real teacher is noise)."""
    min_cluster_size: int | None = None
    """HDBSCAN min_cluster_size; None: max(min_size, routed units / 400), so a cell can fill an expert."""
    min_samples: int = 1
    """HDBSCAN min_samples (larger: more conservative, more noise)."""
    cluster_selection_method: Literal["eom", "leaf"] = "leaf"
    """"leaf" gives many fine, homogeneous cells (what experts want); "eom" fewer, larger ones."""
    # -- coact-kmeans
    kmeans_iters: int = 10
    """Balanced k-means: rounds of (recompute centroids, capacity-constrained reassignment)."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"ClusterConfig.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"ClusterConfig.keep_fraction must be in (0, 1], got {self.keep_fraction!r}")
        if self.shared_by not in ("quantile", "threshold"):
            raise ValueError(f"ClusterConfig.shared_by must be quantile or threshold, got {self.shared_by!r}")
        if not 0 <= self.shared_max_fraction < 1:
            raise ValueError(f"ClusterConfig.shared_max_fraction must be in [0, 1), got {self.shared_max_fraction!r}")
        if self.block < 1 or self.min_size < 1:
            raise ValueError("ClusterConfig.block and min_size must be >= 1")
        if self.min_size % self.block or self.max_size % self.block:
            raise ValueError(f"ClusterConfig.min_size ({self.min_size}) and max_size ({self.max_size}) must be "
                             f"multiples of block ({self.block})")
        if self.max_size < 2 * self.min_size:
            raise ValueError(f"ClusterConfig.max_size ({self.max_size}) must be >= 2 * min_size ({self.min_size}) "
                             "so that a split of a too-large expert never gives a too-small one")
        if self.groups_per_layer < 1 or self.expert_size < 1:
            raise ValueError("ClusterConfig.groups_per_layer and expert_size must be >= 1")
        if self.cluster_selection_method not in ("eom", "leaf"):
            raise ValueError(f"ClusterConfig.cluster_selection_method must be eom or leaf, "
                             f"got {self.cluster_selection_method!r}")
        if min(self.w_score, self.w_category, self.w_coact, self.w_layer) < 0:
            raise ValueError("ClusterConfig feature weights must be >= 0")
        if self.min_samples < 1 or (self.min_cluster_size is not None and self.min_cluster_size < 2):
            raise ValueError("ClusterConfig.min_samples must be >= 1 and min_cluster_size >= 2")
        if self.coact_dims < 1 or self.pca_dims < 1 or self.coact_max_samples < 2:
            raise ValueError("ClusterConfig.coact_dims and pca_dims must be >= 1, coact_max_samples >= 2")


def baseline_config(config: ClusterConfig, plan: ExpertPlan, method: Method) -> ClusterConfig:
    """`config` for a baseline `method` with the same experts per layer as `plan` (a fair comparison)."""
    return replace(config, method=method, experts_per_layer=tuple(lp.num_experts for lp in plan.layers))


# --------------------------------------------------------------------------------------------
# Entry point


def cluster(store: ScoreStore | str | os.PathLike, config: ClusterConfig) -> ExpertPlan:
    """Build and validate the `ExpertPlan` of `config.method` from a finalized score store."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    store = ScoreStore.open(store) if not isinstance(store, ScoreStore) else store
    units = _UnitTable.read(store, config)
    kept = [_keep_layer(units.score[idx], units.freq[idx], idx, config) for idx in units.layer_units]
    timings["budget_s"] = time.perf_counter() - started
    routed = [k[1] for k in kept]
    info: dict = {}
    cells: tuple[dict, ...] = ()
    if config.method == "pidiff-hdbscan":
        experts, cells, extra = _hdbscan_experts(store, units, routed, config, timings)
    elif config.method == "random":
        experts, extra = _random_experts(routed, config), {}
    else:
        experts, extra = _kmeans_experts(store, routed, config, timings)
    layers = tuple(_layer_plan(layer, units.index, shared, layer_experts)
                   for layer, (shared, _), layer_experts in zip(units.layers, kept, experts))
    timings["total_s"] = time.perf_counter() - started
    info.update(_budget_info(units, kept, config), **extra)
    info.update(seed=config.seed, config=_config_dict(config), timings={k: round(v, 3) for k, v in timings.items()},
                store=str(store.path), n_samples=store.n_samples)
    plan = ExpertPlan(layers=layers, method=config.method, intermediate_size=units.intermediate_size,
                      cells=cells, info=info)
    plan.validate()
    return plan


@dataclass(frozen=True)
class _UnitTable:
    """The per-unit summaries every method needs, plus the layer bookkeeping."""

    layer: np.ndarray  # [U] layer id
    index: np.ndarray  # [U] index inside the layer
    layers: tuple[int, ...]  # sorted layer ids
    layer_units: tuple[np.ndarray, ...]  # per layer: global positions of its units (ascending)
    score: np.ndarray  # [U] float64
    freq: np.ndarray  # [U] float64
    score_source: dict
    intermediate_size: int

    @classmethod
    def read(cls, store: ScoreStore, config: ClusterConfig) -> _UnitTable:
        layer, index = (np.asarray(a, dtype=np.int64) for a in store.units())
        layers = tuple(int(v) for v in np.unique(layer))
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
        return cls(layer=layer, index=index, layers=layers,
                   layer_units=tuple(np.flatnonzero(layer == l) for l in layers),
                   score=np.nan_to_num(score, nan=-np.inf), freq=store.summary_of("freq").astype(np.float64),
                   score_source=source, intermediate_size=max(size, int(index.max()) + 1))


# --------------------------------------------------------------------------------------------
# Budget: shared expert and kept units (identical for every method)


def _keep_layer(score: np.ndarray, freq: np.ndarray, positions: np.ndarray,
                config: ClusterConfig) -> tuple[np.ndarray, np.ndarray]:
    """(shared, routed) global positions of one layer's kept units.

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
    return shared, routed


def _budget_info(units: _UnitTable, kept: list[tuple[np.ndarray, np.ndarray]], config: ClusterConfig) -> dict:
    per_layer = [len(idx) for idx in units.layer_units]
    shared = [len(s) for s, _ in kept]
    routed = [len(r) for _, r in kept]
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


# --------------------------------------------------------------------------------------------
# Activation profiles (read lazily, a block of units at a time)


def _sample_rows(n_samples: int, max_samples: int) -> np.ndarray:
    """Evenly strided sample rows, at most `max_samples`."""
    if n_samples <= max_samples:
        return np.arange(n_samples)
    return np.unique(np.linspace(0, n_samples - 1, max_samples).round().astype(np.int64))


def _profiles(store: ScoreStore, positions: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[len(rows), len(positions)] float64 standardised log(1 + act) columns (constant → 0)."""
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
    x = np.log1p(np.nan_to_num(np.asarray(raw, dtype=np.float64), nan=0.0))
    x -= x.mean(axis=0)
    std = x.std(axis=0)
    np.divide(x, std, out=x, where=std > 0)
    x[:, std == 0] = 0.0
    return x


def _unit_blocks(n_units: int, n_rows: int, budget_bytes: int = 128 << 20) -> list[slice]:
    width = max(1, budget_bytes // max(1, 8 * n_rows))
    return [slice(start, min(n_units, start + width)) for start in range(0, n_units, width)]


def coactivation(store: ScoreStore, dims: int = 16, max_samples: int = 4096) -> tuple[np.ndarray, dict]:
    """[U, dims] co-activation embedding of every unit and a small info dict.

    Each unit's standardised log activation profile over (at most `max_samples`) samples is
    projected on the top `dims` eigenvectors of the samples' Gram matrix Z Zᵀ (a truncated SVD of
    Zᵀ, computed exactly in two lazy passes over `per_sample/act`), scaled by 1/sqrt(n) so a
    coordinate is the unit's correlation with that component. Signs are fixed deterministically.
    """
    rows = _sample_rows(store.n_samples, max_samples)
    n, n_units = len(rows), store.n_units
    blocks = _unit_blocks(n_units, n)
    gram = np.zeros((n, n))
    for cols in blocks:
        z = _profiles(store, np.arange(cols.start, cols.stop), rows)
        gram += z @ z.T
    from scipy.linalg import eigh

    k = min(dims, n)
    values, vectors = eigh(gram, subset_by_index=[n - k, n - 1])
    values, vectors = values[::-1], vectors[:, ::-1]  # largest first
    vectors *= np.where(vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])] < 0, -1.0, 1.0)
    embedding = np.zeros((n_units, dims))
    for cols in blocks:
        z = _profiles(store, np.arange(cols.start, cols.stop), rows)
        embedding[cols, : vectors.shape[1]] = (z.T @ vectors) / math.sqrt(n)
    total = float(np.trace(gram))
    info = {"samples_used": int(n), "dims": int(dims),
            "explained_variance": float(values.clip(min=0).sum() / total) if total > 0 else 0.0}
    return embedding, info


# --------------------------------------------------------------------------------------------
# pidiff-hdbscan: features


def _rank_per_layer(values: np.ndarray, layer_units: tuple[np.ndarray, ...]) -> np.ndarray:
    out = np.zeros(len(values))
    for idx in layer_units:
        out[idx] = np.nan_to_num(normalise(values[idx], "rank"), nan=0.5)
    return out


def unit_features(store: ScoreStore, config: ClusterConfig, score: np.ndarray | None = None,
                  coact: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, slice]]:
    """[U, D] weighted feature matrix of every unit and the column range of each block.

    Columns are z-scored over units; block b is scaled by its weight / sqrt(width), so each block
    carries weight² of variance whatever its width. `coact` (from `coactivation`) is computed
    when not given, if the store has per-sample arrays and `w_coact` > 0; else that block is left out.
    """
    layer, _ = (np.asarray(a, dtype=np.int64) for a in store.units())
    layers = np.unique(layer)
    layer_units = tuple(np.flatnonzero(layer == l) for l in layers)
    if score is None:
        score = (store.summary_of("score") if store.has("summary/score") else score_store(store, ScoreConfig()))
    blocks: dict[str, np.ndarray] = {}
    parts = [score] + [store.summary_of(s) for s in ("act", "freq", "grad")]
    blocks["score"] = np.stack([_rank_per_layer(np.asarray(p, np.float64), layer_units) for p in parts], axis=1)
    columns = []
    for stat in ("act", "freq", "grad"):
        table = np.stack(list(store.by_category(stat).values())).astype(np.float64)  # [C, U]
        table = table[~np.isnan(table).all(axis=1)]
        ranked = np.stack([_rank_per_layer(row, layer_units) for row in table], axis=1)  # [U, C]
        columns.append(ranked - ranked.mean(axis=1, keepdims=True))
    blocks["category"] = np.concatenate(columns, axis=1)
    if coact is None and store.has_per_sample and config.w_coact > 0:
        coact, _ = coactivation(store, config.coact_dims, config.coact_max_samples)
    if coact is not None:
        blocks["coact"] = np.asarray(coact, dtype=np.float64)
    position = np.searchsorted(layers, layer) / max(1, len(layers) - 1)
    blocks["layer"] = position[:, None].astype(np.float64)
    weights = {"score": config.w_score, "category": config.w_category, "coact": config.w_coact,
               "layer": config.w_layer}
    out, spans, start = [], {}, 0
    for name in FEATURE_BLOCKS:
        if name not in blocks:
            continue
        x = blocks[name] - blocks[name].mean(axis=0)
        std = x.std(axis=0)
        np.divide(x, std, out=x, where=std > 0)
        x[:, std == 0] = 0.0
        out.append(x * (weights[name] / math.sqrt(x.shape[1])))
        spans[name] = slice(start, start + x.shape[1])
        start += x.shape[1]
    return np.concatenate(out, axis=1), spans


def _pca(features: np.ndarray, fit_rows: np.ndarray, dims: int, seed: int) -> tuple[np.ndarray, float]:
    """Project every row on the top `dims` principal components of `features[fit_rows]`."""
    from sklearn.decomposition import PCA

    dims = max(1, min(dims, features.shape[1], len(fit_rows) - 1))
    pca = PCA(n_components=dims, svd_solver="full", random_state=seed).fit(features[fit_rows])
    return pca.transform(features), float(pca.explained_variance_ratio_.sum())


# --------------------------------------------------------------------------------------------
# pidiff-hdbscan: cells → experts


def _hdbscan_experts(store: ScoreStore, units: _UnitTable, routed: list[np.ndarray], config: ClusterConfig,
                     timings: dict) -> tuple[list[list[tuple[np.ndarray, int, int]]], tuple[dict, ...], dict]:
    import hdbscan

    t = time.perf_counter()
    coact, coact_info = (coactivation(store, config.coact_dims, config.coact_max_samples)
                         if store.has_per_sample and config.w_coact > 0 else (None, {"skipped": True}))
    timings["coactivation_s"] = time.perf_counter() - t
    t = time.perf_counter()
    features, spans = unit_features(store, config, units.score, coact)
    fit_rows = np.concatenate(routed)
    embedding, explained = _pca(features, fit_rows, config.pca_dims, config.seed)
    timings["features_s"] = time.perf_counter() - t

    t = time.perf_counter()
    n_fit = len(fit_rows)
    mcs = config.min_cluster_size or max(config.min_size, n_fit // 400)
    mcs = int(min(mcs, max(2, n_fit // 2)))
    ms = int(max(1, min(config.min_samples, n_fit - 1)))
    clusterer = hdbscan.HDBSCAN(min_cluster_size=mcs, min_samples=ms, prediction_data=True,
                                cluster_selection_method=config.cluster_selection_method,
                                approx_min_span_tree=False, core_dist_n_jobs=1)
    labels_fit = clusterer.fit_predict(embedding[fit_rows])
    timings["hdbscan_s"] = time.perf_counter() - t
    n_cells = int(labels_fit.max()) + 1
    t = time.perf_counter()
    labels = np.full(len(units.layer), -2, dtype=np.int64)  # -2: not routed
    labels[fit_rows] = labels_fit
    assigned = labels.copy()
    noise = fit_rows[labels_fit < 0]
    if n_cells and len(noise):
        membership = _membership(clusterer, labels_fit < 0, n_cells)
        assigned[noise] = membership.argmax(axis=1)
    timings["membership_s"] = time.perf_counter() - t

    t = time.perf_counter()
    rows = _sample_rows(store.n_samples, config.coact_max_samples)
    cell_means = (np.stack([embedding[fit_rows][labels_fit == c].mean(axis=0) for c in range(n_cells)])
                  if n_cells else np.zeros((0, embedding.shape[1])))
    cuts = _cell_hierarchy(cell_means)
    experts = []
    for positions in routed:
        order_key = _profile_lookup(store, positions, rows) if coact is not None else (lambda u: embedding[u])
        slices = _cell_slices(positions, assigned, embedding, order_key, config)
        groups = _slice_groups(slices, cuts, embedding, config.groups_per_layer)
        slices = _round_sizes(slices, groups, embedding, config)
        experts.append(slices)
    timings["experts_s"] = time.perf_counter() - t
    t = time.perf_counter()
    top = cuts[:, min(config.groups_per_layer, max(1, n_cells)) - 1] if n_cells else np.zeros(0, np.int64)
    cells = _cell_records(store, units, labels, assigned, clusterer, fit_rows, top, experts)
    timings["cells_s"] = time.perf_counter() - t
    extra = {"hdbscan": {"cells": n_cells, "routed_units": int(n_fit),
                         "noise_fraction": float(np.mean(labels_fit < 0)) if n_fit else 0.0,
                         "min_cluster_size": mcs, "min_samples": ms,
                         "cluster_selection_method": config.cluster_selection_method,
                         "pca_dims": int(embedding.shape[1]), "pca_explained_variance": explained,
                         "feature_blocks": {k: [s.start, s.stop] for k, s in spans.items()}},
             "coactivation": coact_info}
    return experts, cells, extra


def _membership(clusterer, noise_mask: np.ndarray, n_cells: int) -> np.ndarray:
    """Soft membership [n_noise, n_cells] of the noise points (all_points_membership_vectors)."""
    import hdbscan

    vectors = np.asarray(hdbscan.all_points_membership_vectors(clusterer), dtype=np.float64)
    vectors = vectors.reshape(len(noise_mask), -1)[:, :n_cells]
    return np.nan_to_num(vectors[noise_mask], nan=0.0)


def _cell_hierarchy(cell_means: np.ndarray) -> np.ndarray:
    """[cells, cells] cut matrix of a Ward tree of the cell means: column k-1 = labels of the k-cluster cut."""
    n = len(cell_means)
    if n <= 1:
        return np.zeros((n, max(n, 1)), dtype=np.int64)
    from scipy.cluster.hierarchy import linkage

    tree = linkage(cell_means, method="ward")
    # replay the merges (scipy's cut_tree mislabels some ward trees): after m merges, n - m clusters;
    # labels are numbered in order of first appearance
    owner = np.arange(n)
    members = {i: [i] for i in range(n)}
    cuts = np.zeros((n, n), dtype=np.int64)
    cuts[:, n - 1] = owner
    for m, (a, b, _, _) in enumerate(tree):
        merged = members.pop(int(a)) + members.pop(int(b))
        members[n + m] = merged
        owner[merged] = n + m
        first: dict[int, int] = {}
        cuts[:, n - 2 - m] = [first.setdefault(int(v), len(first)) for v in owner]
    return cuts


@dataclass
class _Slice:
    """A working expert: its units (global positions) and the cell it came from."""

    units: np.ndarray
    cell: int


def _profile_lookup(store: ScoreStore, positions: np.ndarray, rows: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """units → their [n, samples] standardised activation profiles (one layer's, read once)."""
    profiles = _profiles(store, positions, rows).T
    return lambda units: profiles[np.searchsorted(positions, units)]


def _cell_slices(positions: np.ndarray, assigned: np.ndarray, embedding: np.ndarray,
                 order_key: Callable[[np.ndarray], np.ndarray], config: ClusterConfig) -> list[_Slice]:
    """One layer's routed units as cell slices, split to <= max_size and merged to >= min_size."""
    cells = assigned[positions]
    slices = []
    for cell in np.unique(cells):
        slices += [_Slice(part, int(cell)) for part in _split(positions[cells == cell], order_key, config)]
    while len(slices) > 1:
        sizes = np.array([len(s.units) for s in slices])
        small = np.flatnonzero(sizes < config.min_size)
        if not len(small):
            break
        i = int(small[np.lexsort(([slices[j].units[0] for j in small], sizes[small]))[0]])
        means = np.stack([embedding[s.units].mean(axis=0) for s in slices])
        dist = np.linalg.norm(means - means[i], axis=1)
        dist[i] = np.inf
        fits = (sizes + sizes[i] <= config.max_size) & (np.arange(len(slices)) != i)
        j = int(np.argmin(np.where(fits, dist, np.inf)) if fits.any() else np.argmin(dist))
        big = slices[j] if sizes[j] >= sizes[i] else slices[i]
        merged = np.sort(np.concatenate([slices[i].units, slices[j].units]))
        slices = [s for k, s in enumerate(slices) if k not in (i, j)]
        slices += [_Slice(part, big.cell) for part in _split(merged, order_key, config)]
    return slices


def _split(units: np.ndarray, order_key: Callable[[np.ndarray], np.ndarray], config: ClusterConfig) -> list[np.ndarray]:
    """Cut `units` into ceil(n / max_size) near-equal parts (block-rounded sizes) by recursive
    bisection along their first co-activation component (the top principal direction of their
    activation profiles `order_key(units)`, recomputed for each half)."""
    parts = math.ceil(len(units) / config.max_size)
    if parts <= 1:
        return [np.sort(units)]
    ordered = units[np.lexsort((units, _first_component(order_key(units))))]
    cut = sum(_even_sizes(len(units), parts, config.block)[: parts // 2])
    return _split(ordered[:cut], order_key, config) + _split(ordered[cut:], order_key, config)


def _first_component(x: np.ndarray) -> np.ndarray:
    """Coordinates of the rows of `x` on their top principal direction (largest |loading| positive)."""
    from scipy.linalg import eigh

    centred = np.asarray(x, dtype=np.float64) - np.mean(x, axis=0)
    n, d = centred.shape
    if n <= d:  # top eigenvector of the n × n Gram: the coordinates themselves
        _, vec = eigh(centred @ centred.T, subset_by_index=[n - 1, n - 1])
        direction = centred.T @ vec[:, 0]
    else:
        _, vec = eigh(centred.T @ centred, subset_by_index=[d - 1, d - 1])
        direction = vec[:, 0]
    direction *= 1.0 if direction[np.abs(direction).argmax()] >= 0 else -1.0
    return centred @ direction


def _even_sizes(n: int, parts: int, block: int) -> list[int]:
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


def _slice_groups(slices: list[_Slice], cuts: np.ndarray, embedding: np.ndarray, groups: int) -> np.ndarray:
    """Router group of each slice: the coarsest cut of the cell tree that gives this layer's cells
    min(groups, cells) groups; leftover slices (cell -1) join the nearest group."""
    cells = sorted({s.cell for s in slices if s.cell >= 0})
    out = np.full(len(slices), -1, dtype=np.int64)
    if cells:
        want = min(groups, len(cells))
        k = next(k for k in range(want, cuts.shape[1] + 1) if len(np.unique(cuts[cells, k - 1])) >= want)
        labels = cuts[:, k - 1]
        renumber = {g: i for i, g in enumerate(sorted({int(labels[c]) for c in cells}))}
        for i, s in enumerate(slices):
            if s.cell >= 0:
                out[i] = renumber[int(labels[s.cell])]
    leftover = np.flatnonzero(out < 0)
    if len(leftover) == len(slices):
        out[:] = _group_means(slices, embedding, groups)
    elif len(leftover):
        means = np.stack([embedding[s.units].mean(axis=0) for s in slices])
        centres = np.stack([means[out == g].mean(axis=0) for g in range(out.max() + 1)])
        for i in leftover:
            out[i] = int(np.argmin(np.linalg.norm(centres - means[i], axis=1)))
    return out


def _group_means(slices: list[_Slice], embedding: np.ndarray, groups: int) -> np.ndarray:
    """Ward groups of the slices' mean features (when no slice has a cell)."""
    if len(slices) <= 1:
        return np.zeros(len(slices), dtype=np.int64)
    means = np.stack([embedding[s.units].mean(axis=0) for s in slices])
    return _cell_hierarchy(means)[:, min(groups, len(slices)) - 1]


def _round_sizes(slices: list[_Slice], groups: np.ndarray, embedding: np.ndarray,
                 config: ClusterConfig) -> list[tuple[np.ndarray, int, int]]:
    """Sizes to multiples of `block` by moving units along a chain of neighbouring experts.

    Experts are ordered by (group, first PCA coordinate of their mean); each but the last rounds
    its size to the nearer multiple of `block` inside [min_size, max_size] by giving its units
    nearest the next expert to it, or taking the next expert's units nearest to itself. No unit is
    dropped; the last expert takes what is left. Returns (units, cell, group) in that order.
    """
    means = [embedding[s.units].mean(axis=0) for s in slices]
    order = sorted(range(len(slices)), key=lambda i: (groups[i], float(means[i][0]), int(slices[i].units[0])))
    members = [slices[i].units.copy() for i in order]
    block, lo, hi = config.block, config.min_size, config.max_size
    for a in range(len(members) - 1):
        size = len(members[a])
        down, up = size - size % block, size - size % block + block
        if size % block == 0:
            continue
        candidates = [t for t in (down, up) if lo <= t <= hi] or [down if down >= block else up]
        target = min(candidates, key=lambda t: (abs(t - size), t))
        b = a + 1
        if target < size:
            members[a], moved = _take_nearest(members[a], size - target, embedding[members[b]].mean(axis=0), embedding)
            members[b] = np.concatenate([members[b], moved])
        else:
            need = target - size
            while need > 0 and b < len(members):
                take = min(need, len(members[b]) - 1)
                members[b], moved = _take_nearest(members[b], take, embedding[members[a]].mean(axis=0), embedding)
                members[a] = np.concatenate([members[a], moved])
                need -= take
                b += 1
    return [(np.sort(m), slices[i].cell, int(groups[i])) for m, i in zip(members, order) if len(m)]


def _take_nearest(units: np.ndarray, count: int, centre: np.ndarray,
                  embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split `units` into (kept, the `count` units nearest `centre`)."""
    if count <= 0:
        return units, units[:0]
    dist = np.linalg.norm(embedding[units] - centre, axis=1)
    order = np.lexsort((units, dist))
    return units[np.sort(order[count:])], units[order[:count]]


def _cell_records(store: ScoreStore, units: _UnitTable, labels: np.ndarray, assigned: np.ndarray, clusterer,
                  fit_rows: np.ndarray, top_groups: np.ndarray, experts: list[list[tuple[np.ndarray, int, int]]]
                  ) -> tuple[dict, ...]:
    """Per cell: id, size, layers spanned, mean score, dominant category, group, and more."""
    n_cells = len(top_groups)
    if not n_cells:
        return ()
    table = np.stack(list(store.by_category("act").values())).astype(np.float64)  # [C, U]
    scale = np.nanmean(table, axis=1, keepdims=True)
    relative = np.divide(table, scale, out=np.full_like(table, np.nan), where=scale > 0)
    categories = store.categories
    persistence = np.asarray(getattr(clusterer, "cluster_persistence_", np.zeros(n_cells)))
    outlier = np.full(len(labels), np.nan)
    outlier[fit_rows] = clusterer.outlier_scores_
    n_experts = np.zeros(n_cells, dtype=np.int64)
    for layer_experts in experts:
        for _, cell, _ in layer_experts:
            if cell >= 0:
                n_experts[cell] += 1
    records = []
    for c in range(n_cells):
        members = np.flatnonzero(labels == c)
        kept = np.flatnonzero(assigned == c)
        layer_ids, counts = np.unique(units.layer[members], return_counts=True)
        by_cat = np.nanmean(relative[:, members], axis=1)
        dominant = categories[int(np.nanargmax(by_cat))] if np.isfinite(by_cat).any() else None
        records.append({
            "id": c, "size": int(len(members)), "size_with_noise": int(len(kept)),
            "layers": [int(v) for v in layer_ids], "units_per_layer": [int(v) for v in counts],
            "mean_score": float(units.score[members].mean()), "dominant_category": dominant,
            "category_act": {name: round(float(v), 4) for name, v in zip(categories, by_cat)},
            "group": int(top_groups[c]), "experts": int(n_experts[c]),
            "persistence": float(persistence[c]) if c < len(persistence) else 0.0,
            "mean_outlier_score": float(np.nanmean(outlier[members])),
        })
    return tuple(records)


# --------------------------------------------------------------------------------------------
# Baselines


def _expert_counts(routed: list[np.ndarray], config: ClusterConfig) -> list[int]:
    counts = config.experts_per_layer
    if counts is None:
        counts = [max(1, round(len(r) / config.expert_size)) for r in routed]
    elif isinstance(counts, int):
        counts = [counts] * len(routed)
    elif len(counts) != len(routed):
        raise ValueError(f"ClusterConfig.experts_per_layer has {len(counts)} entries for {len(routed)} layers")
    return [int(max(1, min(c, len(r)))) if len(r) else 0 for c, r in zip(counts, routed)]


def _random_experts(routed: list[np.ndarray], config: ClusterConfig) -> list[list[tuple[np.ndarray, int, int]]]:
    """Routed units shuffled (seed, layer) into equal experts; groups are contiguous runs."""
    experts = []
    for layer, (positions, count) in enumerate(zip(routed, _expert_counts(routed, config))):
        rng = np.random.default_rng([config.seed, layer])
        shuffled = positions[rng.permutation(len(positions))]
        bounds = np.cumsum([0] + _even_sizes(len(positions), count, config.block)) if count else [0]
        groups = min(config.groups_per_layer, count)
        experts.append([(np.sort(shuffled[a:b]), -1, e * groups // count)
                        for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))])
    return experts


def _kmeans_experts(store: ScoreStore, routed: list[np.ndarray], config: ClusterConfig,
                    timings: dict) -> tuple[list[list[tuple[np.ndarray, int, int]]], dict]:
    """Balanced k-means per layer on the routed units' activation profiles; groups: k-means of centroids."""
    from sklearn.cluster import KMeans

    if not store.has_per_sample:
        raise ValueError(f"{store.path}: coact-kmeans needs the per-sample arrays (probe with per_sample=True)")
    rows = _sample_rows(store.n_samples, config.coact_max_samples)
    experts, read_s, fit_s, rounds = [], 0.0, 0.0, []
    for layer, (positions, count) in enumerate(zip(routed, _expert_counts(routed, config))):
        if not count:
            experts.append([])
            continue
        t = time.perf_counter()
        x = _profiles(store, positions, rows).T  # [units, samples]
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
        read_s += time.perf_counter() - t
        t = time.perf_counter()
        sizes = _even_sizes(len(positions), count, config.block)
        km = KMeans(n_clusters=count, n_init=3, random_state=config.seed + layer).fit(x)
        labels, centres, used = balanced_kmeans(x, km.cluster_centers_, sizes, config.kmeans_iters)
        rounds.append(used)
        groups = min(config.groups_per_layer, count)
        group_of = (KMeans(n_clusters=groups, n_init=3, random_state=config.seed + layer).fit_predict(centres)
                    if groups > 1 else np.zeros(count, dtype=np.int64))
        fit_s += time.perf_counter() - t
        layer_experts = [(np.sort(positions[labels == e]), -1, int(group_of[e])) for e in range(count)]
        experts.append(sorted(layer_experts, key=lambda item: (item[2], int(item[0][0]))))
    timings.update(read_s=read_s, kmeans_s=fit_s)
    return experts, {"kmeans": {"samples_used": int(len(rows)), "balance_rounds": rounds}}


def balanced_kmeans(x: np.ndarray, centres: np.ndarray, sizes: list[int], iters: int = 10
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """Capacity-constrained k-means: labels with exactly `sizes[k]` points per cluster.

    Start from `centres`; the largest capacities go to the clusters k-means filled most. Each round
    assigns (point, cluster) pairs greedily in order of distance while capacity lasts, then moves
    the centres to their members' means; stops when labels no longer change. Returns (labels,
    centres, rounds used).
    """
    k = len(centres)
    d = _sq_dist(x, centres)
    filled = np.bincount(d.argmin(axis=1), minlength=k)
    capacity = np.zeros(k, dtype=np.int64)
    capacity[np.lexsort((np.arange(k), -filled))] = sorted(sizes, reverse=True)
    labels = None
    for rounds in range(1, max(1, iters) + 1):
        new = _greedy_assign(d, capacity)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centres = np.stack([x[labels == c].mean(axis=0) if capacity[c] else centres[c] for c in range(k)])
        d = _sq_dist(x, centres)
    return labels, centres, rounds


def _sq_dist(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    return np.maximum((x * x).sum(1)[:, None] - 2 * x @ centres.T + (centres * centres).sum(1)[None, :], 0.0)


def _greedy_assign(d: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Each point to the nearest cluster with room, pairs taken in increasing distance."""
    n, k = d.shape
    labels = np.full(n, -1, dtype=np.int64)
    room = capacity.copy()
    left = n
    for flat in np.argsort(d, axis=None, kind="stable"):
        i, c = divmod(int(flat), k)
        if labels[i] < 0 and room[c] > 0:
            labels[i] = c
            room[c] -= 1
            left -= 1
            if not left:
                break
    return labels


# --------------------------------------------------------------------------------------------
# Assembly


def _layer_plan(layer: int, index: np.ndarray, shared: np.ndarray,
                experts: list[tuple[np.ndarray, int, int]]) -> LayerPlan:
    """Pack one layer's experts (global positions) into a `LayerPlan` of within-layer indices, ordered by group."""
    experts = sorted(experts, key=lambda item: item[2])  # stable: keeps the order inside a group
    sizes = [len(u) for u, _, _ in experts]
    units = np.concatenate([index[u] for u, _, _ in experts]) if experts else np.zeros(0, np.int64)
    return LayerPlan(layer=int(layer), units=units.astype(np.int64),
                     expert_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                     expert_group=np.array([g for _, _, g in experts], dtype=np.int64),
                     expert_cell=np.array([c for _, c, _ in experts], dtype=np.int64),
                     shared_units=np.sort(index[shared]).astype(np.int64))


def _config_dict(config: ClusterConfig) -> dict:
    out = asdict(config)
    if isinstance(out.get("experts_per_layer"), tuple):
        out["experts_per_layer"] = list(out["experts_per_layer"])
    return out


# --------------------------------------------------------------------------------------------
# Plot


def plot_cells(plan: ExpertPlan, store: ScoreStore | str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write a PNG of `plan`: each layer's units stacked by cell (shared, pruned and leftover units
    too) and a 2-D PCA of the units' cluster features coloured by cell. Plans without cells (the
    baselines) are coloured by router group. Uses the config recorded in `plan.info`; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    store = ScoreStore.open(store) if not isinstance(store, ScoreStore) else store
    saved = {k: v for k, v in (plan.info.get("config") or {}).items()
             if k in ClusterConfig.__dataclass_fields__ and k != "score"}
    if isinstance(saved.get("experts_per_layer"), list):
        saved["experts_per_layer"] = tuple(saved["experts_per_layer"])
    config = ClusterConfig(**saved)
    by_cell = bool(plan.cells)
    label = _unit_labels(plan, store, by_cell)  # -3 pruned, -2 shared, -1 leftover, else cell / group
    features, _ = unit_features(store, config)
    coords, _ = _pca(features, np.flatnonzero(label >= -1), 2, config.seed)
    layer_of, _ = store.units()

    cmap = _colormap(max(20, int(label.max()) + 1))
    special = {-3: "#e0e0e0", -2: "#202020", -1: "#909090"}
    colour = lambda c: special.get(int(c)) or cmap(int(c))  # noqa: E731
    fig = Figure(figsize=(16, 7))
    FigureCanvasAgg(fig)
    bars, scatter = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
    layers = [lp.layer for lp in plan.layers]
    bottom = np.zeros(len(layers))
    for c in sorted({int(v) for v in np.unique(label)}):
        heights = np.array([np.sum((layer_of == l) & (label == c)) for l in layers], dtype=float)
        bars.bar(range(len(layers)), heights, bottom=bottom, color=colour(c), edgecolor="white", linewidth=0.3)
        bottom += heights
    for k, lp in enumerate(plan.layers):
        bars.text(k, bottom[k], f"{lp.num_experts}e\n{lp.num_groups}g", ha="center", va="bottom", fontsize=8)
    bars.set_ylim(0, bottom.max() * 1.12)
    bars.set_xticks(range(len(layers)), [str(l) for l in layers])
    bars.set_xlabel("layer (label: experts, router groups)")
    bars.set_ylabel("units")
    what = f"{len(plan.cells)} cells" if by_cell else "router groups"
    bars.set_title(f"{plan.method}: units per layer by {'cell' if by_cell else 'group'} ({what})")
    names = {-2: "shared", -3: "pruned", -1: "leftover"}
    bars.legend(handles=[Patch(color=special[c], label=names[c]) for c in (-2, -3, -1) if np.any(label == c)],
                loc="upper left", fontsize=8, ncols=3)
    order = np.argsort(label >= -1, kind="stable")  # pruned and shared underneath
    scatter.scatter(coords[order, 0], coords[order, 1], s=3, c=[colour(c) for c in label[order]], linewidths=0)
    largest = sorted(plan.cells, key=lambda rec: -rec.get("size_with_noise", rec["size"]))[:15]
    for rec in largest:
        members = label == rec["id"]
        if members.any():
            x, y = np.median(coords[members], axis=0)
            scatter.text(x, y, f"{rec['id']} {(rec.get('dominant_category') or '')[:6]}", fontsize=7, ha="center",
                         va="center", bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.75, "lw": 0})
    scatter.set_title("units on the top 2 principal components of the cluster features\n"
                      + ("colour = cell; labels: the 15 largest cells, id and dominant category" if by_cell
                         else "colour = router group"), fontsize=10)
    scatter.set_xlabel("PC1")
    scatter.set_ylabel("PC2")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _unit_labels(plan: ExpertPlan, store: ScoreStore, by_cell: bool) -> np.ndarray:
    """[U] per store unit: -3 pruned, -2 shared, -1 leftover, else its expert's cell (or group)."""
    layer_of, index_of = (np.asarray(a, dtype=np.int64) for a in store.units())
    label = np.full(len(layer_of), -3, dtype=np.int64)
    for lp in plan.layers:
        positions = np.flatnonzero(layer_of == lp.layer)
        lookup = np.full(int(index_of[positions].max()) + 1, -1, dtype=np.int64)
        lookup[index_of[positions]] = positions
        label[lookup[lp.shared_units]] = -2
        values = lp.expert_cell if by_cell else lp.expert_group
        label[lookup[lp.units]] = np.repeat(values, lp.expert_sizes)
    return label


def _colormap(n: int):
    """A qualitative colormap of n colours (tab20, then tab20b / tab20c)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    colours = [c for name in ("tab20", "tab20b", "tab20c") for c in colormaps[name].colors]
    return ListedColormap([colours[i % len(colours)] for i in range(n)])
