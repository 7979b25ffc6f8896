"""`plot_cells`: a PNG of a plan's cells (or router groups) per layer and in feature space."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tinyonn.clustering.config import ClusterConfig
from tinyonn.clustering.features import pca_project, unit_features
from tinyonn.clustering.plan import ExpertPlan
from tinyonn.clustering.units import open_store
from tinyonn.store.zarr_store import ScoreStore

PRUNED, SHARED, LEFTOVER = -3, -2, -1
"""Unit labels besides a cell (or group) id."""
SPECIAL_COLOURS = {PRUNED: "#e0e0e0", SHARED: "#202020", LEFTOVER: "#909090"}


def plot_cells(plan: ExpertPlan, store: ScoreStore | str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write a PNG of `plan`: each layer's units stacked by cell (shared, pruned and leftover units
    too) and a 2-D PCA of the units' cluster features coloured by cell. Plans without cells (the
    baselines) are coloured by router group. Uses the config recorded in `plan.info`; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    store = open_store(store)
    config = ClusterConfig.from_dict(plan.info.get("config") or {})
    by_cell = bool(plan.cells)
    label = _unit_labels(plan, store, by_cell)
    features, _ = unit_features(store, config)
    coords, _ = pca_project(features, np.flatnonzero(label >= LEFTOVER), 2, config.seed)
    colormap = _colormap(max(20, int(label.max()) + 1))
    colour = lambda c: SPECIAL_COLOURS.get(int(c)) or colormap(int(c))  # noqa: E731
    fig = Figure(figsize=(16, 7))
    FigureCanvasAgg(fig)
    bars, scatter = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
    _draw_layers(bars, plan, store.units()[0], label, colour, by_cell)
    _draw_features(scatter, plan, coords, label, colour, by_cell)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _draw_layers(bars, plan: ExpertPlan, layer_of: np.ndarray, label: np.ndarray, colour, by_cell: bool) -> None:
    """Stacked bars: each layer's units by label, with its expert and group counts."""
    from matplotlib.patches import Patch

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
    names = {SHARED: "shared", PRUNED: "pruned", LEFTOVER: "leftover"}
    bars.legend(handles=[Patch(color=SPECIAL_COLOURS[c], label=names[c]) for c in (SHARED, PRUNED, LEFTOVER)
                         if np.any(label == c)], loc="upper left", fontsize=8, ncols=3)


def _draw_features(scatter, plan: ExpertPlan, coords: np.ndarray, label: np.ndarray, colour, by_cell: bool) -> None:
    """Units on the top 2 principal components of their features, the 15 largest cells named."""
    order = np.argsort(label >= LEFTOVER, kind="stable")  # pruned and shared underneath
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


def _unit_labels(plan: ExpertPlan, store: ScoreStore, by_cell: bool) -> np.ndarray:
    """[U] per store unit: PRUNED, SHARED, LEFTOVER (cell -1), else its expert's cell (or group)."""
    layer_of, index_of = (np.asarray(a, dtype=np.int64) for a in store.units())
    label = np.full(len(layer_of), PRUNED, dtype=np.int64)
    for lp in plan.layers:
        positions = np.flatnonzero(layer_of == lp.layer)
        lookup = np.full(int(index_of[positions].max()) + 1, -1, dtype=np.int64)
        lookup[index_of[positions]] = positions
        label[lookup[lp.shared_units]] = SHARED
        values = lp.expert_cell if by_cell else lp.expert_group
        label[lookup[lp.units]] = np.repeat(values, lp.expert_sizes)
    return label


def _colormap(n: int):
    """A qualitative colormap of n colours (tab20, then tab20b / tab20c)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    colours = [c for name in ("tab20", "tab20b", "tab20c") for c in colormaps[name].colors]
    return ListedColormap([colours[i % len(colours)] for i in range(n)])
