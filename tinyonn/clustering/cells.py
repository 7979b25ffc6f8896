"""pidiff-hdbscan: concept cells found by HDBSCAN on the principal components of the unit
features (cells may span layers; noise units join their most likely cell), each layer's cell
slices made into experts, router groups cut from one Ward tree of the cells, and a record per cell."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from tinyonn.clustering.config import ClusterConfig
from tinyonn.clustering.experts import Expert
from tinyonn.clustering.features import coactivation, pca_project, unit_features
from tinyonn.clustering.groups import cell_hierarchy, slice_groups
from tinyonn.clustering.profiles import profile_lookup, sample_rows
from tinyonn.clustering.slices import cell_slices, round_sizes
from tinyonn.clustering.units import UnitTable
from tinyonn.store.zarr_store import ScoreStore


@dataclass(frozen=True)
class Cells:
    """HDBSCAN's cells of the routed units."""

    clusterer: Any  # the fitted hdbscan.HDBSCAN
    fit_rows: np.ndarray  # [R] global positions of the routed units it was fit on
    labels: np.ndarray  # [U] cell of each unit; -1 noise, -2 not routed
    assigned: np.ndarray  # [U] labels with every noise unit in its most likely cell
    count: int


def hdbscan_experts(store: ScoreStore, units: UnitTable, routed: list[np.ndarray], config: ClusterConfig,
                    timings: dict[str, float]) -> tuple[list[list[Expert]], tuple[dict, ...], dict]:
    """Per layer the experts of the `routed` units (global positions), the cell records, and the
    info this method adds to the plan; `timings` gets the time of each step."""
    with _timed(timings, "coactivation_s"):
        coact, coact_info = (coactivation(store, config.coact_dims, config.coact_max_samples)
                             if store.has_per_sample and config.w_coact > 0 else (None, {"skipped": True}))
    with _timed(timings, "features_s"):
        features, spans = unit_features(store, config, units.score, coact)
        fit_rows = np.concatenate(routed)
        embedding, explained = pca_project(features, fit_rows, config.pca_dims, config.seed)
    with _timed(timings, "hdbscan_s"):
        clusterer, labels_fit, mcs, ms = _fit_hdbscan(embedding[fit_rows], config)
    with _timed(timings, "membership_s"):
        cells = _assign_noise(clusterer, fit_rows, labels_fit, len(units.layer))
    with _timed(timings, "experts_s"):
        rows = sample_rows(store.n_samples, config.coact_max_samples)
        cell_means = (np.stack([embedding[fit_rows][labels_fit == c].mean(axis=0) for c in range(cells.count)])
                      if cells.count else np.zeros((0, embedding.shape[1])))
        cuts = cell_hierarchy(cell_means)
        experts = []
        for positions in routed:
            order_key = profile_lookup(store, positions, rows) if coact is not None else (lambda u: embedding[u])
            slices = cell_slices(positions, cells.assigned, embedding, order_key, config)
            groups = slice_groups(slices, cuts, embedding, config.groups_per_layer)
            experts.append(round_sizes(slices, groups, embedding, config))
    with _timed(timings, "cells_s"):
        top = (cuts[:, min(config.groups_per_layer, max(1, cells.count)) - 1] if cells.count
               else np.zeros(0, np.int64))
        records = _cell_records(store, units, cells, top, experts)
    n_fit = len(fit_rows)
    info = {"hdbscan": {"cells": cells.count, "routed_units": int(n_fit),
                        "noise_fraction": float(np.mean(labels_fit < 0)) if n_fit else 0.0,
                        "min_cluster_size": mcs, "min_samples": ms,
                        "cluster_selection_method": config.cluster_selection_method,
                        "pca_dims": int(embedding.shape[1]), "pca_explained_variance": explained,
                        "feature_blocks": {k: [s.start, s.stop] for k, s in spans.items()}},
            "coactivation": coact_info}
    return experts, records, info


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the seconds the block takes as `timings[key]`."""
    start = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - start


def _fit_hdbscan(points: np.ndarray, config: ClusterConfig) -> tuple[Any, np.ndarray, int, int]:
    """(fitted clusterer, label of each point (-1 noise), min_cluster_size, min_samples used)."""
    import hdbscan

    n_fit = len(points)
    mcs = config.min_cluster_size or max(config.min_size, n_fit // 400)
    mcs = int(min(mcs, max(2, n_fit // 2)))
    ms = int(max(1, min(config.min_samples, n_fit - 1)))
    clusterer = hdbscan.HDBSCAN(min_cluster_size=mcs, min_samples=ms, prediction_data=True,
                                cluster_selection_method=config.cluster_selection_method,
                                approx_min_span_tree=False, core_dist_n_jobs=1)
    return clusterer, clusterer.fit_predict(points), mcs, ms


def _assign_noise(clusterer, fit_rows: np.ndarray, labels_fit: np.ndarray, n_units: int) -> Cells:
    """The cells over all `n_units` units, each noise unit also assigned to its most likely cell."""
    count = int(labels_fit.max()) + 1
    labels = np.full(n_units, -2, dtype=np.int64)
    labels[fit_rows] = labels_fit
    assigned = labels.copy()
    noise = fit_rows[labels_fit < 0]
    if count and len(noise):
        assigned[noise] = _membership(clusterer, labels_fit < 0, count).argmax(axis=1)
    return Cells(clusterer=clusterer, fit_rows=fit_rows, labels=labels, assigned=assigned, count=count)


def _membership(clusterer, noise_mask: np.ndarray, n_cells: int) -> np.ndarray:
    """Soft membership [n_noise, n_cells] of the noise points (all_points_membership_vectors)."""
    import hdbscan

    vectors = np.asarray(hdbscan.all_points_membership_vectors(clusterer), dtype=np.float64)
    vectors = vectors.reshape(len(noise_mask), -1)[:, :n_cells]
    return np.nan_to_num(vectors[noise_mask], nan=0.0)


def _cell_records(store: ScoreStore, units: UnitTable, cells: Cells, top_groups: np.ndarray,
                  experts: list[list[Expert]]) -> tuple[dict, ...]:
    """Per cell: id, size, layers spanned, mean score, dominant category, group (`top_groups`: the
    cell's group in the cut of the tree with `groups_per_layer` groups), and more."""
    if not cells.count:
        return ()
    table = np.stack(list(store.by_category("act").values())).astype(np.float64)  # [C, U]
    scale = np.nanmean(table, axis=1, keepdims=True)
    relative = np.divide(table, scale, out=np.full_like(table, np.nan), where=scale > 0)
    categories = store.categories
    persistence = np.asarray(getattr(cells.clusterer, "cluster_persistence_", np.zeros(cells.count)))
    outlier = np.full(len(cells.labels), np.nan)
    outlier[cells.fit_rows] = cells.clusterer.outlier_scores_
    n_experts = np.zeros(cells.count, dtype=np.int64)
    for layer_experts in experts:
        for expert in layer_experts:
            if expert.cell >= 0:
                n_experts[expert.cell] += 1
    records = []
    for c in range(cells.count):
        members = np.flatnonzero(cells.labels == c)
        layer_ids, counts = np.unique(units.layer[members], return_counts=True)
        by_cat = np.nanmean(relative[:, members], axis=1)
        dominant = categories[int(np.nanargmax(by_cat))] if np.isfinite(by_cat).any() else None
        records.append({
            "id": c, "size": int(len(members)), "size_with_noise": int(np.sum(cells.assigned == c)),
            "layers": [int(v) for v in layer_ids], "units_per_layer": [int(v) for v in counts],
            "mean_score": float(units.score[members].mean()), "dominant_category": dominant,
            "category_act": {name: round(float(v), 4) for name, v in zip(categories, by_cat)},
            "group": int(top_groups[c]), "experts": int(n_experts[c]),
            "persistence": float(persistence[c]) if c < len(persistence) else 0.0,
            "mean_outlier_score": float(np.nanmean(outlier[members])),
        })
    return tuple(records)
