"""Look inside a run: its score store's summary, one unit, the top units, one expert.

Each question is a function returning plain JSON-able data, with a `format_*` function for the text
`tinyonn inspect` prints. `source` is a run folder (holding `scores.zarr` and, after clustering,
`plan/`), a store path, or an open `ScoreStore`. Stores open with `mmap=True`, so a store probed
with `per_sample_codec="none"` reads a unit's per-sample column by mapping only its pages.

    tinyonn inspect --run R                          summary
    tinyonn inspect --run R --unit 3:117             one unit: statistics, per category, expert, cell
    tinyonn inspect --run R --top 20 --by grad [--category math]
    tinyonn inspect --run R --expert 3:5             an expert's units and what they respond to
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinyonn.clustering.plan import ExpertPlan
from tinyonn.store.scores import ScoreConfig, summary_score_fn
from tinyonn.store.zarr_store import UNIT_STATS, ScoreStore, ScoreStoreError, ScoreStoreNotFoundError

RANK_BY = ("score", "act", "grad", "freq", "taylor")
"""What `top_units` can rank by."""
TOP_SAMPLES = 5
"""Samples listed per unit or expert (highest activation)."""


@dataclass(frozen=True)
class Run:
    """A score store and, when the run has been clustered, its plan."""

    store: ScoreStore
    plan: ExpertPlan | None = None

    def unit_position(self, layer: int, index: int) -> int:
        """The store's unit number of teacher unit (layer, index)."""
        positions = self.layer_positions(layer)
        if not 0 <= index < len(positions) or positions[index] < 0:
            raise ScoreStoreError(f"{self.store.path}: no unit {layer}:{index} (layer {layer} has units "
                                  f"0..{len(positions) - 1})")
        return int(positions[index])

    def layer_positions(self, layer: int) -> np.ndarray:
        """Index within the layer → store unit number (-1 where absent)."""
        layers, indices = self.store.units()
        mask = layers == layer
        if not mask.any():
            raise ScoreStoreError(f"{self.store.path}: no layer {layer}; layers: "
                                  f"{', '.join(str(v) for v in np.unique(layers))}")
        positions = np.full(int(indices[mask].max()) + 1, -1, dtype=np.int64)
        positions[indices[mask]] = np.flatnonzero(mask)
        return positions


def open_run(source: str | os.PathLike | ScoreStore | Run, plan: ExpertPlan | str | os.PathLike | None = None) -> Run:
    """A `Run` from a run folder, a store path or an open store (plan: given, or the run's `plan/`)."""
    if isinstance(source, Run):
        return source if plan is None else Run(source.store, _load_plan(plan))
    if isinstance(source, ScoreStore):
        store, run_dir = source, source.path.parent
    else:
        path = Path(source)
        if (path / "zarr.json").is_file():
            store, run_dir = ScoreStore.open(path, mmap=True), path.parent
        elif (path / "scores.zarr").exists():
            store, run_dir = ScoreStore.open(path / "scores.zarr", mmap=True), path
        else:
            raise ScoreStoreNotFoundError(f"{path}: neither a run folder with scores.zarr nor a score store")
    if plan is None and (run_dir / "plan" / "plan.json").is_file():
        plan = run_dir / "plan"
    return Run(store, _load_plan(plan) if plan is not None else None)


def parse_pair(text: str, what: str = "unit") -> tuple[int, int | str]:
    """"L:J" → (L, J); for experts J may be "shared"."""
    layer, sep, item = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(layer), (item if what == "expert" and item == "shared" else int(item))
    except ValueError:
        raise ScoreStoreError(f"{what} {text!r}: expected LAYER:{'EXPERT' if what == 'expert' else 'INDEX'}, "
                              "e.g. 3:117") from None


# --------------------------------------------------------------------------------------------
# Questions


def run_summary(source) -> str:
    """The store's summary table, how its arrays are stored, and the plan's shape when there is one."""
    run = open_run(source)
    store = run.store
    lines = [store.summary(file=None)]
    mapped = [name for name in ("per_sample/act",) if store.has(name) and store.is_mapped(name)]
    lines.append(f"\nreads        {'memory-mapped per-sample arrays' if mapped else 'through zarr (compressed)'}")
    if run.plan is not None:
        plan = run.plan
        experts = [lp.num_experts for lp in plan.layers]
        lines.append(f"plan         {plan.method}: {sum(experts)} experts ({min(experts)}-{max(experts)} a layer), "
                     f"{len(plan.cells)} cells, {plan.kept_fraction():.0%} of units kept")
    else:
        lines.append("plan         none (run `tinyonn cluster` for experts and cells)")
    return "\n".join(lines)


def unit_report(source, layer: int, index: int) -> dict[str, Any]:
    """One unit: its statistics overall and per category, its ranks, expert and cell, and (when the
    store kept them) the samples where it is most active."""
    run = open_run(source)
    store = run.store
    position = run.unit_position(layer, index)
    stats = [name for name in UNIT_STATS + ("score",) if store.has(f"summary/{name}")]
    overall = {name: float(store.array(f"summary/{name}")[position]) for name in stats}
    report: dict[str, Any] = {"unit": f"{layer}:{index}", "layer": layer, "index": index, "position": position,
                              "overall": overall}
    down_norm = store.down_norm()
    if down_norm is not None:
        overall["down_norm"] = float(down_norm[position])
    if "score" in stats:
        scores = store.summary_of("score")
        layers, _ = store.units()
        report["score_rank"] = int((scores > scores[position]).sum()) + 1
        report["score_rank_in_layer"] = int((scores[layers == layer] > scores[position]).sum()) + 1
        report["units_in_layer"] = int((layers == layer).sum())
    counts = store.category_counts()
    by_category = {}
    tables = {name: store.by_category(name) for name in ("act", "freq", "grad")}
    for category in store.categories:
        row = {name: _float(tables[name][category][position]) for name in tables}
        row["samples"] = counts[category]
        row["act_lift"] = _ratio(row["act"], overall["act"])
        by_category[category] = row
    report["by_category"] = by_category
    report["plan"] = _unit_in_plan(run, layer, index)
    if store.has_per_sample:
        report["top_samples"] = _top_samples(store, [position])
    return report


def top_units(source, n: int = 10, by: str = "score", category: str | None = None) -> list[dict[str, Any]]:
    """The `n` units with the highest `by` (score, act, grad, freq or taylor), over all samples or
    over one category's (for `score`, the run's score formula applied to that category's means)."""
    if by not in RANK_BY:
        raise ScoreStoreError(f"--by {by!r}: choose one of {', '.join(RANK_BY)}")
    run = open_run(source)
    store = run.store
    values = _ranking_values(store, by, category)
    order = np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")[: max(0, n)]
    layers, indices = store.units()
    scores = store.summary_of("score") if store.has("summary/score") else None
    expert_of = _expert_lookup(run.plan)
    rows = []
    for rank, position in enumerate(order, start=1):
        layer, index = int(layers[position]), int(indices[position])
        row = {"rank": rank, "unit": f"{layer}:{index}", "layer": layer, "index": index, by: _float(values[position])}
        if scores is not None and by != "score":
            row["score"] = _float(scores[position])
        row["expert"] = expert_of.get((layer, index), "-" if run.plan is None else "pruned")
        rows.append(row)
    return rows


def expert_report(source, layer: int, expert: int | str) -> dict[str, Any]:
    """One expert (or "shared"): its units by score, its cell, how strongly its units respond to each
    category compared with their layer, and the samples where they are most active together."""
    run = open_run(source)
    store, plan = run.store, run.plan
    if plan is None:
        raise ScoreStoreError(f"{store.path}: no plan beside this store; run `tinyonn cluster` first")
    layer_plan = next((lp for lp in plan.layers if lp.layer == layer), None)
    if layer_plan is None:
        raise ScoreStoreError(f"the plan has no layer {layer}")
    report: dict[str, Any] = {"expert": f"{layer}:{expert}", "layer": layer, "method": plan.method}
    if expert == "shared":
        units = np.sort(layer_plan.shared_units)
    else:
        if not 0 <= int(expert) < layer_plan.num_experts:
            raise ScoreStoreError(f"layer {layer} has experts 0..{layer_plan.num_experts - 1}")
        units = np.sort(layer_plan.expert_units(int(expert)))
        cell = int(layer_plan.expert_cell[int(expert)])
        report.update(group=int(layer_plan.expert_group[int(expert)]), cell=cell,
                      cell_info=_cell_record(plan, cell))
    report["size"] = int(len(units))
    positions = run.layer_positions(layer)[units]
    layer_all = np.flatnonzero(store.units()[0] == layer)
    scores = store.summary_of("score") if store.has("summary/score") else None
    summaries = {name: store.summary_of(name) for name in ("act", "freq", "grad")}
    table = [{"unit": f"{layer}:{int(u)}", "index": int(u),
              **({"score": _float(scores[p])} if scores is not None else {}),
              **{name: _float(values[p]) for name, values in summaries.items()}}
             for u, p in zip(units, positions)]
    table.sort(key=lambda row: -row.get("score", row["act"]))
    report["units"] = table
    responds = {}
    act, freq = store.by_category("act"), store.by_category("freq")
    for category in store.categories:
        mine, theirs = _mean(act[category][positions]), _mean(act[category][layer_all])
        mine_f, theirs_f = _mean(freq[category][positions]), _mean(freq[category][layer_all])
        responds[category] = {"act": mine, "act_lift": _ratio(mine, theirs),
                              "freq": mine_f, "freq_lift": _ratio(mine_f, theirs_f)}
    report["responds_to"] = dict(sorted(responds.items(), key=lambda kv: -np.nan_to_num(kv[1]["act_lift"] or 0)))
    if store.has_per_sample and len(positions):
        report["top_samples"] = _top_samples(store, positions)
    return report


# --------------------------------------------------------------------------------------------
# Text


def format_unit(report: dict[str, Any]) -> str:
    overall = report["overall"]
    lines = [f"unit {report['unit']}  (store unit {report['position']})"]
    lines.append("overall      " + "  ".join(f"{k} {v:.4g}" for k, v in overall.items()))
    if "score_rank" in report:
        lines.append(f"score rank   {report['score_rank']} of all units, {report['score_rank_in_layer']} of "
                     f"{report['units_in_layer']} in layer {report['layer']}")
    lines.append(_plan_line(report["plan"]))
    lines += ["", f"{'category':<14} {'samples':>7} {'act':>10} {'freq':>10} {'grad':>10} {'act_lift':>9}"]
    for category, row in report["by_category"].items():
        lines.append(f"{category:<14} {row['samples']:>7} {_num(row['act'])} {_num(row['freq'])} {_num(row['grad'])} "
                     f"{_num(row['act_lift'], 9, '.2f')}")
    lines += _format_samples(report.get("top_samples"))
    return "\n".join(lines)


def format_top(rows: list[dict[str, Any]], by: str, category: str | None = None) -> str:
    title = f"top {len(rows)} units by {by}" + (f" in category {category}" if category else " over all samples")
    extra = "score" if rows and "score" in rows[0] and by != "score" else None
    header = f"{'rank':>4} {'unit':>10} {by:>11}" + (f" {extra:>11}" if extra else "") + f"  {'expert':<8}"
    lines = [title, header]
    for row in rows:
        lines.append(f"{row['rank']:>4} {row['unit']:>10} {_num(row[by], 11)}"
                     + (f" {_num(row[extra], 11)}" if extra else "") + f"  {row['expert']:<8}")
    return "\n".join(lines)


def format_expert(report: dict[str, Any]) -> str:
    head = f"expert {report['expert']}  ({report['method']}, {report['size']} units"
    if "group" in report:
        head += f", router group {report['group']}, " + (f"cell {report['cell']}" if report["cell"] >= 0 else "no cell")
    lines = [head + ")"]
    cell = report.get("cell_info")
    if cell:
        lines.append(f"cell         {cell.get('size')} units over layers {cell.get('layers')}, dominant category "
                     f"{cell.get('dominant_category')}, mean score {cell.get('mean_score', float('nan')):.4g}")
    lines += ["", "responds to (mean act of its units ÷ their layer's, per category)",
              f"{'category':<14} {'act':>10} {'act_lift':>9} {'freq':>10} {'freq_lift':>9}"]
    for category, row in report["responds_to"].items():
        lines.append(f"{category:<14} {_num(row['act'])} {_num(row['act_lift'], 9, '.2f')} {_num(row['freq'])} "
                     f"{_num(row['freq_lift'], 9, '.2f')}")
    lines += ["", f"{'unit':>10} {'score':>10} {'act':>10} {'freq':>10} {'grad':>10}"]
    shown = report["units"][:20]
    for row in shown:
        lines.append(f"{row['unit']:>10} {_num(row.get('score'))} {_num(row['act'])} {_num(row['freq'])} "
                     f"{_num(row['grad'])}")
    if len(report["units"]) > len(shown):
        lines.append(f"{'':>10} ... {len(report['units']) - len(shown)} more (--json lists all)")
    lines += _format_samples(report.get("top_samples"), "summed act of its units")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Helpers


def _load_plan(plan: ExpertPlan | str | os.PathLike) -> ExpertPlan:
    return plan if isinstance(plan, ExpertPlan) else ExpertPlan.load(plan)


def _ranking_values(store: ScoreStore, by: str, category: str | None) -> np.ndarray:
    if category is None:
        return store.summary_of(by).astype(np.float64)
    if category not in store.categories:
        raise ScoreStoreError(f"no category {category!r}; categories: {', '.join(store.categories)}")
    if by != "score":
        return store.by_category(by)[category].astype(np.float64)
    config = ScoreConfig(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in store.attrs.get("score_config", {}).items()})
    inputs = {name: store.by_category(name)[category] for name in UNIT_STATS}
    if store.down_norm() is not None:
        inputs["down_norm"] = store.down_norm()
    return summary_score_fn(config)(inputs).astype(np.float64)


def _expert_lookup(plan: ExpertPlan | None) -> dict[tuple[int, int], str]:
    lookup: dict[tuple[int, int], str] = {}
    if plan is None:
        return lookup
    for lp in plan.layers:
        for e in range(lp.num_experts):
            for u in lp.expert_units(e):
                lookup[(lp.layer, int(u))] = f"{lp.layer}:{e}"
        for u in lp.shared_units:
            lookup[(lp.layer, int(u))] = f"{lp.layer}:shared"
    return lookup


def _unit_in_plan(run: Run, layer: int, index: int) -> dict[str, Any] | None:
    if run.plan is None:
        return None
    info: dict[str, Any] = {"method": run.plan.method}
    lp = next((lp for lp in run.plan.layers if lp.layer == layer), None)
    if lp is not None and index in set(lp.shared_units.tolist()):
        return {**info, "role": "shared", "expert": "shared", "expert_size": int(len(lp.shared_units))}
    hit = np.flatnonzero(lp.units == index) if lp is not None else []
    if not len(hit):
        return {**info, "role": "pruned"}
    expert = int(np.searchsorted(lp.expert_offsets, hit[0], side="right") - 1)
    cell = int(lp.expert_cell[expert])
    return {**info, "role": "routed", "expert": expert, "expert_size": int(lp.expert_sizes[expert]),
            "group": int(lp.expert_group[expert]), "cell": cell, "cell_info": _cell_record(run.plan, cell)}


def _cell_record(plan: ExpertPlan, cell: int) -> dict[str, Any] | None:
    return next((dict(c) for c in plan.cells if c.get("id") == cell), None) if cell >= 0 else None


def _top_samples(store: ScoreStore, positions) -> list[dict[str, Any]]:
    """The samples where the units' summed act is highest (reads only their per-sample columns)."""
    act = store.array("per_sample/act")
    positions = np.asarray(positions)
    if len(positions) == 1:
        column = np.asarray(act[:, int(positions[0])], dtype=np.float64)
    else:
        column = np.asarray(act.get_orthogonal_selection((slice(None), positions)), dtype=np.float64).sum(axis=1)
    order = np.argsort(-np.nan_to_num(column, nan=-np.inf), kind="stable")[:TOP_SAMPLES]
    categories = np.asarray(store.array("samples/category")[:])
    source = np.asarray(store.array("samples/source_index")[:])
    return [{"sample": int(i), "source_index": int(source[i]), "category": store.categories[int(categories[i])],
             "act": _float(column[i])} for i in order]


def _format_samples(samples: list[dict[str, Any]] | None, what: str = "act") -> list[str]:
    if not samples:
        return []
    lines = ["", f"most active samples ({what})", f"{'sample':>7} {'source':>7} {'category':<14} {'act':>10}"]
    for s in samples:
        lines.append(f"{s['sample']:>7} {s['source_index']:>7} {s['category']:<14} {_num(s['act'])}")
    return lines


def _plan_line(plan: dict[str, Any] | None) -> str:
    if plan is None:
        return "expert       - (no plan: run `tinyonn cluster`)"
    if plan["role"] == "pruned":
        return f"expert       pruned ({plan['method']} plan keeps it in no expert)"
    if plan["role"] == "shared":
        return f"expert       shared (always on, {plan['expert_size']} units)"
    line = (f"expert       {plan['expert']} ({plan['expert_size']} units, router group {plan['group']}), "
            + (f"cell {plan['cell']}" if plan["cell"] >= 0 else "no cell (built from noise or leftovers)"))
    cell = plan.get("cell_info")
    if cell:
        line += f" ({cell.get('size')} units, dominant category {cell.get('dominant_category')})"
    return line


def _mean(values: np.ndarray) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else None


def _float(value) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value


def _ratio(a, b) -> float | None:
    a, b = float(a) if a is not None else np.nan, float(b) if b is not None else np.nan
    return float(a / b) if np.isfinite(a) and np.isfinite(b) and b > 0 else None


def _num(value, width: int = 10, spec: str = ".4g") -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"
