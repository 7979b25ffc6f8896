"""Balanced k-means: every cluster gets exactly its capacity, assigned optimally by
`scipy.optimize.linear_sum_assignment` (a min-cost matching of points to capacity slots)."""

from __future__ import annotations

import numpy as np


def sq_dist(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """[points, centres] squared Euclidean distances (clipped at 0)."""
    return np.maximum((x * x).sum(1)[:, None] - 2 * x @ centres.T + (centres * centres).sum(1)[None, :], 0.0)


def balanced_assign(d: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Labels of the points (rows of the [points, clusters] cost `d`) with exactly `capacity[c]`
    points in cluster c (Σ capacity = points) and the least total cost."""
    from scipy.optimize import linear_sum_assignment

    capacity = np.asarray(capacity, dtype=np.int64)
    if capacity.sum() != d.shape[0]:
        raise ValueError(f"capacities add up to {capacity.sum()}, not to the {d.shape[0]} points")
    owner = np.repeat(np.arange(len(capacity)), capacity)  # slot → cluster
    rows, slots = linear_sum_assignment(d[:, owner])
    labels = np.empty(d.shape[0], dtype=np.int64)
    labels[rows] = owner[slots]
    return labels


def balanced_kmeans(x: np.ndarray, centres: np.ndarray, sizes: list[int], iters: int = 10
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """Capacity-constrained k-means: labels with exactly `sizes[k]` points per cluster.

    Start from `centres`; the largest capacities go to the clusters that plain nearest-centre
    assignment fills most. Each round assigns points to clusters by an optimal balanced matching
    (`balanced_assign`), then moves the centres to their members' means; stops when labels no longer
    change. Returns (labels, centres, rounds used).
    """
    k = len(centres)
    d = sq_dist(x, centres)
    filled = np.bincount(d.argmin(axis=1), minlength=k)
    capacity = np.zeros(k, dtype=np.int64)
    capacity[np.lexsort((np.arange(k), -filled))] = sorted(sizes, reverse=True)
    labels = None
    for rounds in range(1, max(1, iters) + 1):
        new = balanced_assign(d, capacity)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centres = np.stack([x[labels == c].mean(axis=0) if capacity[c] else centres[c] for c in range(k)])
        d = sq_dist(x, centres)
    return labels, centres, rounds


def isometric_embedding(x: np.ndarray) -> np.ndarray:
    """Rows of `x` [n, D] re-expressed in at most n dimensions with the same pairwise (and
    point-to-mean) Euclidean distances: the eigenvectors of the Gram matrix x·xᵀ scaled by the
    square roots of their eigenvalues. Makes k-means on long vectors (a unit's firing over tens of
    thousands of tokens) cost O(n²) per round instead of O(n·D)."""
    if x.shape[1] <= x.shape[0]:
        return np.asarray(x, dtype=np.float64)
    gram = np.asarray(x @ x.T, dtype=np.float64)
    values, vectors = np.linalg.eigh(gram)
    return vectors * np.sqrt(np.clip(values, 0.0, None))[None, :]


def initial_centres(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means++ seeds (scikit-learn's `kmeans_plusplus`)."""
    from sklearn.cluster import kmeans_plusplus

    centres, _ = kmeans_plusplus(x, n_clusters=k, random_state=seed)
    return centres


def group_of_centres(centres: np.ndarray, groups: int, seed: int) -> np.ndarray:
    """Router group of each cluster: k-means of the centres into `groups` (all 0 for one group)."""
    from sklearn.cluster import KMeans

    groups = min(groups, len(centres))
    if groups <= 1:
        return np.zeros(len(centres), dtype=np.int64)
    return KMeans(n_clusters=groups, n_init=3, random_state=seed).fit_predict(centres).astype(np.int64)
