"""The explain stage's figures (matplotlib, Agg): expert × category heatmaps, the 2-D unit map,
cells over layers, co-activation per layer."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tinyonn.explain.cells import SHARED  # noqa: E402

DPI = 110


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _layer_ticks(ax, counts: list[int], layers: list[int]) -> None:
    starts = np.concatenate([[0], np.cumsum(counts)])
    for edge in starts[1:-1]:
        ax.axvline(edge - 0.5, color="black", lw=0.8)
    ax.set_xticks((starts[:-1] + starts[1:]) / 2 - 0.5, [f"L{l}" for l in layers])


def plot_heatmaps(share: list[np.ndarray], uniform: list[float], activation: list[np.ndarray],
                  categories: tuple[str, ...], layers: list[int], path: Path) -> Path:
    """Two panels, categories × every expert of every layer: routing share ÷ the uniform rate k/E
    (log2 scale) and mean |h| of the expert's units."""
    ratio = np.concatenate([s / u if u else np.zeros_like(s) for s, u in zip(share, uniform)], axis=1)
    act = np.concatenate(activation, axis=1)
    counts = [s.shape[1] for s in share]
    width = min(22.0, 3 + 0.07 * ratio.shape[1])
    fig, axes = plt.subplots(2, 1, figsize=(width, 1.6 + 0.55 * len(categories) * 2), constrained_layout=True)
    log_ratio = np.log2(np.clip(ratio, 1 / 8, 8))
    panels = [(log_ratio, "routing share ÷ uniform k/E (log2)", "RdBu_r", dict(vmin=-3, vmax=3)),
              (act, "mean |h| of the expert's units", "viridis", {})]
    for ax, (values, title, cmap, limits) in zip(axes, panels):
        image = ax.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest", **limits)
        ax.set_yticks(range(len(categories)), categories)
        _layer_ticks(ax, counts, layers)
        ax.set_title(title)
        fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
    return _save(fig, path)


def cell_colours(cells: np.ndarray) -> dict[int, tuple]:
    """One colour per cell id (tab20, tab20b, tab20c in turn); shared and no-cell units grey."""
    palette = [plt.get_cmap(name)(i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)]
    colours = {SHARED: (0.35, 0.35, 0.35, 1.0), -1: (0.8, 0.8, 0.8, 1.0)}
    for n, cell in enumerate(sorted(c for c in set(cells.tolist()) if c >= 0)):
        colours[cell] = palette[n % len(palette)]
    return colours


def plot_projection(xy: np.ndarray, cells: np.ndarray, method: str, path: Path) -> Path:
    """The 2-D unit map, one colour per concept cell (cell ids written at their medians)."""
    colours = cell_colours(cells)
    fig, ax = plt.subplots(figsize=(8, 7), constrained_layout=True)
    order = np.argsort(cells >= 0, kind="stable")  # grey units underneath
    ax.scatter(xy[order, 0], xy[order, 1], s=4, c=[colours[c] for c in cells[order]], linewidths=0)
    for cell in sorted(c for c in set(cells.tolist()) if c >= 0):
        centre = np.median(xy[cells == cell], axis=0)
        ax.annotate(str(cell), centre, fontsize=7, ha="center", va="center", weight="bold")
    ax.set_title(f"{len(xy):,} units, {method.upper()}, coloured by concept cell "
                 f"(dark grey: shared; light grey: no cell)")
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, path)


def plot_cell_layers(spans: list[dict], layers: list[int], path: Path) -> Path:
    """Cells × layers: the routed units each cell holds in each layer."""
    table = np.zeros((max(len(spans), 1), len(layers)))
    column = {l: i for i, l in enumerate(layers)}
    for row, span in enumerate(spans):
        for layer, units in span["units_per_layer"].items():
            table[row, column[int(layer)]] = units
    fig, ax = plt.subplots(figsize=(2 + 0.5 * len(layers), 1.2 + 0.18 * len(table)), constrained_layout=True)
    image = ax.imshow(np.ma.masked_equal(table, 0), aspect="auto", cmap="magma_r", interpolation="nearest", vmin=0)
    ax.set_xticks(range(len(layers)), [f"L{l}" for l in layers])
    ax.set_yticks(range(len(spans)), [f"cell {s['cell']}" for s in spans], fontsize=7)
    ax.set_title("routed units of each concept cell per layer (blank: none)")
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    return _save(fig, path)


def plot_coactivation(matrices: list[np.ndarray], layers: list[int], path: Path) -> Path:
    """P(column expert selected | row expert selected), one panel per layer."""
    columns = min(4, len(matrices))
    rows = -(-len(matrices) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.0 * rows), squeeze=False,
                             constrained_layout=True)
    for ax in axes.flat[len(matrices):]:
        ax.axis("off")
    image = None
    for ax, matrix, layer in zip(axes.flat, matrices, layers):
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="Blues", interpolation="nearest")
        ax.set_title(f"L{layer}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        fig.colorbar(image, ax=axes, fraction=0.02, pad=0.01, label="P(j | i)")
    return _save(fig, path)


def plot_specialisation(summaries: list[dict], layers: list[int], path: Path) -> Path:
    """Per layer: domain peak share, token specialisation and co-activation beside the uniform router."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), constrained_layout=True)
    def values(key): return [s[key] for s in summaries]
    uniform = values("uniform_rate")
    panels = [("peak domain share (mean over experts)", values("domain_peak_share"), uniform),
              ("token-id specialisation", values("token_specialisation"), uniform),
              ("peak co-activation P(j|i)", values("coactivation_peak"), values("coactivation_uniform"))]
    for ax, (title, measured, baseline) in zip(axes, panels):
        ax.plot(layers, measured, "o-", label="model")
        ax.plot(layers, baseline, "--", color="grey", label="uniform router")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.05)
    axes[0].legend(fontsize=8)
    return _save(fig, path)
