"""`explain(run)`: what the run's saved model does, expert by expert → `report/explain.json` and
the PNGs in `report/explain/`.

It reads the run folder: the probe store (`scores.zarr`), the plan (`plan/`), the saved model (the
one `report/evaluate.json` names, else `train/model/`, else `model/`) with its tokenizer, and runs
the model on a few held-out examples per category with its own routing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tinyonn.clustering.plan import ExpertPlan
from tinyonn.config import DataConfig
from tinyonn.data import Example, split_probe_set
from tinyonn.errors import TinyONNError
from tinyonn.explain.cells import cell_spans, plan_units
from tinyonn.explain.config import ExplainConfig
from tinyonn.explain.labels import (auto_label, dominant_categories, expert_name, load_overrides,
                                    top_tokens)
from tinyonn.explain.routing import RoutingRecord, pick_examples, record_model_routing
from tinyonn.explain.specialisation import (coactivation, domain_share, layer_summary, mean_activation,
                                            token_share, token_specialisation, uniform_rate)
from tinyonn.files import write_text_atomic
from tinyonn.store.zarr_store import ScoreStore

IMAGES = {"heatmap": "explain/heatmap.png", "projection": "explain/projection.png",
          "cell_layers": "explain/cell_layers.png", "coactivation": "explain/coactivation.png",
          "specialisation": "explain/specialisation.png"}
"""The figures, relative to the run's `report/` folder."""


def saved_model_dir(run_dir: Path) -> Path:
    """The model the run measured: `report/evaluate.json`'s `model_dir`, else `train/model/`, else `model/`."""
    report = run_dir / "report" / "evaluate.json"
    if report.is_file():
        named = json.loads(report.read_text()).get("model_dir")
        if named and (run_dir / named / "config.json").is_file():  # relative to the run, or absolute
            return run_dir / named
    for candidate in ("train/model", "model"):
        if (run_dir / candidate / "config.json").is_file():
            return run_dir / candidate
    raise TinyONNError(f"run folder {run_dir} has no saved model (model/ or train/model/): run `tinyonn assemble "
                       f"--run {run_dir.name} --runs {run_dir.parent}` first")


def held_out_examples(run_dir: Path) -> list[Example]:
    """The run's held-out examples as its `run_config.json` describes them (the builtin validation
    split when there is no config)."""
    path = run_dir / "run_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    evaluation = config.get("eval", {})
    return split_probe_set(config.get("data", "builtin"), evaluation.get("split", "validation"),
                           evaluation.get("holdout_every", 10),
                           (lambda error: None) if config.get("skip_bad") else None)[1]


def explain(run_dir: str | Path, config: ExplainConfig = ExplainConfig(), examples: Sequence[Example] | None = None,
            model_dir: str | Path | None = None, log=print) -> dict:
    """Explain a run's saved model (see the module docstring); returns what `report/explain.json` holds.
    `examples`: the held-out examples to read (default: the run's own held-out set); `model_dir`:
    the model to explain (default: `saved_model_dir(run_dir)`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tinyonn.model.modeling  # noqa: F401  # registers "tinyonn" with the Auto classes
    from tinyonn.explain import plots  # matplotlib and t-SNE load only when a run is explained
    from tinyonn.explain.projection import project_units

    run_dir = Path(run_dir)
    started = time.time()
    seconds: dict[str, float] = {}
    for need, hint in (("scores.zarr", "probe"), ("plan/plan.json", "cluster")):
        if not (run_dir / need).exists():
            raise TinyONNError(f"run folder {run_dir} has no {need}: run `tinyonn {hint} --run {run_dir.name} "
                               f"--runs {run_dir.parent}` first")
    plan = ExpertPlan.load(run_dir / "plan")
    store = ScoreStore.open(run_dir / "scores.zarr")
    model_dir = Path(model_dir) if model_dir is not None else saved_model_dir(run_dir)
    shown = str(model_dir.relative_to(run_dir)) if model_dir.is_relative_to(run_dir) else str(model_dir)
    labels_path = config.labels or (run_dir / "labels.json" if (run_dir / "labels.json").is_file() else None)
    overrides = load_overrides(labels_path)

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    picked = pick_examples(held_out_examples(run_dir) if examples is None else examples, config.per_category)
    log(f"[explain] routing of {shown} on {len(picked)} held-out examples")
    record = record_model_routing(model, tokenizer, picked, DataConfig(max_length=config.max_length,
                                                                        batch_size=config.batch_size))
    seconds["routing"] = time.time() - started
    layers = [lp.layer for lp in plan.layers]
    if len(record.masks) != len(layers):
        raise TinyONNError(f"{model_dir}: {len(record.masks)} MoE layers, but the plan has {len(layers)}")

    summaries = [dict(layer=layer, **layer_summary(record, i, config.min_token_count, config.top_tokens))
                 for i, layer in enumerate(layers)]
    experts = _experts(record, plan, tokenizer, config, overrides)
    mark = time.time()
    units = plan_units(plan)
    projection = project_units(store, units, config.max_units, config.max_samples, config.projection, config.seed,
                               config.tsne_iterations)
    seconds["projection"] = time.time() - mark
    spans = cell_spans(plan)

    out = run_dir / "report"
    mark = time.time()
    shares = [domain_share(record, i) for i in range(len(layers))]
    plots.plot_heatmaps(shares, [uniform_rate(record, i) for i in range(len(layers))],
                        [mean_activation(record, i) for i in range(len(layers))], record.categories, layers,
                        out / IMAGES["heatmap"])
    plots.plot_projection(projection.xy, units.cell[projection.units], projection.method, out / IMAGES["projection"])
    plots.plot_cell_layers(spans, layers, out / IMAGES["cell_layers"])
    plots.plot_coactivation([coactivation(record, i) for i in range(len(layers))], layers, out / IMAGES["coactivation"])
    plots.plot_specialisation(summaries, layers, out / IMAGES["specialisation"])
    seconds["plots"] = time.time() - mark
    seconds["total"] = time.time() - started

    result = {
        "model_dir": shown, "examples": record.examples, "tokens": record.n_tokens,
        "categories": list(record.categories),
        "tokens_per_category": {c: int((record.category == i).sum()) for i, c in enumerate(record.categories)},
        "labels_file": str(labels_path) if labels_path else None,
        "projection": {"method": projection.method, "units": int(len(projection.units)),
                       "of_units": int(len(units.layer)), "features": projection.features, "seed": config.seed},
        "layers": summaries, "experts": experts, "cells": spans, "images": IMAGES,
        "config": {name: getattr(config, name) for name in config.__dataclass_fields__},
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "explain.json", json.dumps(result, indent=1, default=_jsonable))
    log(f"[explain] {len(experts)} experts labelled, {len(spans)} cells, {projection.method} of "
        f"{len(projection.units):,} units in {seconds['total']:.1f} s")
    return result


def _experts(record: RoutingRecord, plan: ExpertPlan, tokenizer, config: ExplainConfig,
             overrides: dict[tuple[int, int], str]) -> list[dict]:
    """One entry per routed expert: routing share and mean |h| per category, top tokens, label."""
    rows = []
    for i, lp in enumerate(plan.layers):
        share = domain_share(record, i)
        activation = mean_activation(record, i)
        uniform = uniform_rate(record, i)
        ids, counts, per_token = token_share(record, i, config.min_token_count)
        specialisation = token_specialisation(record, i, config.min_token_count, config.top_tokens)
        co = coactivation(record, i)
        rate = record.masks[i].mean(axis=0)
        for e in range(lp.num_experts):
            chosen = top_tokens(ids, counts, per_token[:, e], float(rate[e]), config.top_tokens)
            texts = [tokenizer.decode([int(ids[t])]) for t in chosen]
            dominant = dominant_categories(share[:, e], record.categories)
            name = expert_name(lp.layer, e)
            text = overrides.get((lp.layer, e))
            partners = co[e].copy()
            partners[e] = -1
            partner = int(np.argmax(partners)) if len(partners) > 1 else None
            rows.append({
                "expert": name, "layer": lp.layer, "index": e, "units": int(lp.expert_sizes[e]),
                "cell": int(lp.expert_cell[e]),
                "label": f"{name} — {text or auto_label(dominant, texts)}",
                "label_source": "override" if text else "auto",
                "selected_rate": float(rate[e]), "uniform_rate": uniform,
                "routing_share": {c: float(share[k, e]) for k, c in enumerate(record.categories)},
                "mean_activation": {c: float(activation[k, e]) for k, c in enumerate(record.categories)},
                "dominant_categories": dominant,
                "domain_peak_ratio": float(share[:, e].max() / uniform) if uniform else 0.0,
                "top_tokens": [{"token": text_, "id": int(ids[t]), "count": int(counts[t]),
                                "share": float(per_token[t, e])} for t, text_ in zip(chosen, texts)],
                "token_specialisation": None if np.isnan(specialisation[e]) else float(specialisation[e]),
                "top_coactive": None if partner is None or co[e, partner] <= 0 else
                {"expert": expert_name(lp.layer, partner), "p": float(co[e, partner])},
            })
    return rows


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.ndarray,)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
