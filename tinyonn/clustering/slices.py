"""One layer's cell slices → experts: slices split to <= max_size, merged to >= min_size, then
sizes rounded to multiples of `block` by moving units between neighbouring experts."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tinyonn.clustering.config import ClusterConfig
from tinyonn.clustering.experts import Expert, even_sizes

OrderKey = Callable[[np.ndarray], np.ndarray]
"""units → [n, d] rows whose top principal direction orders the units when a slice is cut."""


@dataclass(frozen=True)
class Slice:
    """A working expert: its units (global positions, ascending) and the cell it came from."""

    units: np.ndarray
    cell: int


def slice_means(slices: list[Slice], embedding: np.ndarray) -> np.ndarray:
    """[len(slices), d] mean embedding of each slice's units."""
    if not slices:
        return np.zeros((0, embedding.shape[1]))
    return np.stack([embedding[s.units].mean(axis=0) for s in slices])


def cell_slices(positions: np.ndarray, assigned: np.ndarray, embedding: np.ndarray, order_key: OrderKey,
                config: ClusterConfig) -> list[Slice]:
    """One layer's routed units (`positions`; `assigned`: [U] cell of each unit) as cell slices,
    split to <= max_size and merged to >= min_size (the smallest slice into its nearest one)."""
    cells = assigned[positions]
    slices = []
    for cell in np.unique(cells):
        slices += [Slice(part, int(cell)) for part in _split(positions[cells == cell], order_key, config)]
    while len(slices) > 1:
        sizes = np.array([len(s.units) for s in slices])
        small = np.flatnonzero(sizes < config.min_size)
        if not len(small):
            break
        i = int(small[np.lexsort(([slices[j].units[0] for j in small], sizes[small]))[0]])
        means = slice_means(slices, embedding)
        dist = np.linalg.norm(means - means[i], axis=1)
        dist[i] = np.inf
        fits = (sizes + sizes[i] <= config.max_size) & (np.arange(len(slices)) != i)
        j = int(np.argmin(np.where(fits, dist, np.inf)) if fits.any() else np.argmin(dist))
        big = slices[j] if sizes[j] >= sizes[i] else slices[i]
        merged = np.sort(np.concatenate([slices[i].units, slices[j].units]))
        slices = [s for k, s in enumerate(slices) if k not in (i, j)]
        slices += [Slice(part, big.cell) for part in _split(merged, order_key, config)]
    return slices


def _split(units: np.ndarray, order_key: OrderKey, config: ClusterConfig) -> list[np.ndarray]:
    """Cut `units` into ceil(n / max_size) near-equal parts (block-rounded sizes) by recursive
    bisection along their first co-activation component (the top principal direction of their
    activation profiles `order_key(units)`, recomputed for each half)."""
    parts = math.ceil(len(units) / config.max_size)
    if parts <= 1:
        return [np.sort(units)]
    ordered = units[np.lexsort((units, _first_component(order_key(units))))]
    cut = sum(even_sizes(len(units), parts, config.block)[: parts // 2])
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


def round_sizes(slices: list[Slice], groups: np.ndarray, embedding: np.ndarray, config: ClusterConfig) -> list[Expert]:
    """The slices as experts (`groups`: router group of each slice), sizes rounded to multiples of
    `block` by moving units along a chain of neighbouring experts.

    Experts are ordered by (group, first PCA coordinate of their mean); each but the last rounds
    its size to the nearer multiple of `block` inside [min_size, max_size] by giving its units
    nearest the next expert to it, or taking the next expert's units nearest to itself. No unit is
    dropped; the last expert takes what is left. Returns the experts in that order.
    """
    means = slice_means(slices, embedding)
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
    return [Expert(units=np.sort(m), group=int(groups[i]), cell=slices[i].cell)
            for m, i in zip(members, order) if len(m)]


def _take_nearest(units: np.ndarray, count: int, centre: np.ndarray,
                  embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split `units` into (kept, the `count` units nearest `centre`)."""
    if count <= 0:
        return units, units[:0]
    dist = np.linalg.norm(embedding[units] - centre, axis=1)
    order = np.lexsort((units, dist))
    return units[np.sort(order[count:])], units[order[:count]]
