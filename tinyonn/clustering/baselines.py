"""The baselines, on the same budget as pidiff-hdbscan: "random" (LLaMA-MoE style: routed units
shuffled into equal experts) and "coact-kmeans" (MoEfication style: balanced k-means per layer on
the units' activation profiles; `kmeans.balanced_kmeans`)."""

from __future__ import annotations

import time

import numpy as np

from tinyonn.clustering.config import ClusterConfig
from tinyonn.clustering.experts import Expert, even_sizes
from tinyonn.clustering.kmeans import balanced_kmeans, group_of_centres
from tinyonn.clustering.profiles import activation_profiles, sample_rows
from tinyonn.store.zarr_store import ScoreStore


def expert_counts(routed: list[np.ndarray], config: ClusterConfig) -> list[int]:
    """Experts per layer: `config.experts_per_layer`, else routed units / `expert_size`; at least
    one and at most one per unit (0 for a layer with no routed unit)."""
    counts = config.experts_per_layer
    if counts is None:
        counts = [max(1, round(len(r) / config.expert_size)) for r in routed]
    elif isinstance(counts, int):
        counts = [counts] * len(routed)
    elif len(counts) != len(routed):
        raise ValueError(f"ClusterConfig.experts_per_layer has {len(counts)} entries for {len(routed)} layers")
    return [int(max(1, min(c, len(r)))) if len(r) else 0 for c, r in zip(counts, routed)]


def random_experts(routed: list[np.ndarray], config: ClusterConfig) -> list[list[Expert]]:
    """Routed units shuffled (seed, layer) into equal experts; groups are contiguous runs."""
    experts = []
    for layer, (positions, count) in enumerate(zip(routed, expert_counts(routed, config))):
        rng = np.random.default_rng([config.seed, layer])
        shuffled = positions[rng.permutation(len(positions))]
        bounds = np.cumsum([0] + even_sizes(len(positions), count, config.block)) if count else [0]
        groups = min(config.groups_per_layer, count)
        experts.append([Expert(units=np.sort(shuffled[a:b]), group=e * groups // count, cell=-1)
                        for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))])
    return experts


def kmeans_experts(store: ScoreStore, routed: list[np.ndarray], config: ClusterConfig,
                   timings: dict[str, float]) -> tuple[list[list[Expert]], dict]:
    """Balanced k-means per layer on the routed units' activation profiles (unit-normalised);
    groups: k-means of the centroids. Returns the experts and the info this method adds to the plan."""
    if not store.has_per_sample:
        raise ValueError(f"{store.path}: coact-kmeans needs the per-sample arrays (probe with per_sample=True)")
    rows = sample_rows(store.n_samples, config.coact_max_samples)
    experts, read_s, fit_s, rounds = [], 0.0, 0.0, []
    for layer, (positions, count) in enumerate(zip(routed, expert_counts(routed, config))):
        if not count:
            experts.append([])
            continue
        start = time.perf_counter()
        x = activation_profiles(store, positions, rows).T  # [units, samples]
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
        read_s += time.perf_counter() - start
        start = time.perf_counter()
        labels, group_of, used = _kmeans_layer(x, even_sizes(len(positions), count, config.block),
                                               config.seed + layer, config)
        rounds.append(used)
        fit_s += time.perf_counter() - start
        layer_experts = [Expert(units=np.sort(positions[labels == e]), group=int(group_of[e]), cell=-1)
                         for e in range(count)]
        experts.append(sorted(layer_experts, key=lambda expert: (expert.group, int(expert.units[0]))))
    timings.update(read_s=read_s, kmeans_s=fit_s)
    return experts, {"kmeans": {"samples_used": int(len(rows)), "balance_rounds": rounds}}


def _kmeans_layer(x: np.ndarray, sizes: list[int], seed: int,
                  config: ClusterConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """(expert of each row of `x`, exactly `sizes` rows per expert; group of each expert; balance rounds)."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=len(sizes), n_init=3, random_state=seed).fit(x)
    labels, centres, used = balanced_kmeans(x, km.cluster_centers_, sizes, config.kmeans_iters)
    return labels, group_of_centres(centres, config.groups_per_layer, seed), used
