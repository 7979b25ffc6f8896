"""Router groups: one Ward tree of the cells, cut per layer into that layer's groups of experts."""

from __future__ import annotations

import numpy as np

from tinyonn.clustering.slices import Slice, slice_means


def cell_hierarchy(cell_means: np.ndarray) -> np.ndarray:
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


def slice_groups(slices: list[Slice], cuts: np.ndarray, embedding: np.ndarray, groups: int) -> np.ndarray:
    """Router group of each slice: the coarsest cut of the cell tree (`cuts`, from `cell_hierarchy`)
    that gives this layer's cells min(groups, cells) groups; leftover slices (cell -1) join the
    nearest group, and with no cell at all the slices are grouped by a Ward tree of their means."""
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
        out[:] = _ward_groups(slices, embedding, groups)
    elif len(leftover):
        means = slice_means(slices, embedding)
        centres = np.stack([means[out == g].mean(axis=0) for g in range(out.max() + 1)])
        for i in leftover:
            out[i] = int(np.argmin(np.linalg.norm(centres - means[i], axis=1)))
    return out


def _ward_groups(slices: list[Slice], embedding: np.ndarray, groups: int) -> np.ndarray:
    """Ward groups of the slices' mean features (when no slice has a cell)."""
    if len(slices) <= 1:
        return np.zeros(len(slices), dtype=np.int64)
    return cell_hierarchy(slice_means(slices, embedding))[:, min(groups, len(slices)) - 1]
