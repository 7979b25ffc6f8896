"""The baselines, on the same budget as pidiff-hdbscan: "random" (LLaMA-MoE style: routed units
shuffled into equal experts) and "coact-kmeans" (MoEfication style: balanced k-means per layer on
the units' activation profiles)."""

from __future__ import annotations

import time

import numpy as np

from tinyonn.clustering.config import ClusterConfig
from tinyonn.clustering.experts import Expert, even_sizes
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

    count = len(sizes)
    km = KMeans(n_clusters=count, n_init=3, random_state=seed).fit(x)
    labels, centres, used = balanced_kmeans(x, km.cluster_centers_, sizes, config.kmeans_iters)
    groups = min(config.groups_per_layer, count)
    group_of = (KMeans(n_clusters=groups, n_init=3, random_state=seed).fit_predict(centres)
                if groups > 1 else np.zeros(count, dtype=np.int64))
    return labels, group_of, used


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
    """[points, centres] squared Euclidean distances (clipped at 0)."""
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
