"""Concept cells and experts: turn a score store into an `ExpertPlan` (DESIGN.md, "Clusters and experts").

Four methods, one budget. Every method keeps the same units per layer (`budget`: a shared
always-on expert of the broadest units, then the highest-scoring others up to `keep_fraction`) and
differs only in how the kept routed units are split into experts:

- "pidiff-hdbscan" (`cells`): per-unit features (`features`: score and its parts, per-category
  behaviour, a co-activation embedding, layer position) → PCA → HDBSCAN. Clusters are concept cells
  and may span layers; an expert is a cell's slice in one layer, split / merged to
  `[min_size, max_size]` and rounded to a multiple of `block` (`slices`). Router groups cut one
  Ward hierarchy of the cells (`groups`).
- "random" (LLaMA-MoE style, `baselines`): routed units shuffled (seeded) into equal experts.
- "coact-kmeans" (MoEfication style, `baselines`): balanced k-means per layer on the units'
  activation profiles.
- "cmoe" (CMoE style, `cmoe`): the budget's shared count re-chosen by per-token firing rate, the
  rest split into equal experts by balanced k-means on firing vectors. Needs a `Calibration`
  (per-token MLP inputs of the teacher: `Calibration.collect(teacher, tokenizer, examples)`).

Everything is deterministic given `ClusterConfig.seed`. `plot.plot_cells` draws a plan's cells.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

from tinyonn.clustering.baselines import kmeans_experts, random_experts
from tinyonn.clustering.budget import budget_info, keep_units
from tinyonn.clustering.calibration import Calibration
from tinyonn.clustering.cells import hdbscan_experts
from tinyonn.clustering.cmoe import cmoe_experts
from tinyonn.clustering.config import ClusterConfig, Method
from tinyonn.clustering.experts import layer_plan
from tinyonn.clustering.plan import ExpertPlan
from tinyonn.clustering.units import UnitTable, open_store
from tinyonn.store.zarr_store import ScoreStore


def cluster(store: ScoreStore | str | os.PathLike, config: ClusterConfig,
            calibration: Calibration | None = None) -> ExpertPlan:
    """Build and validate the `ExpertPlan` of `config.method` from a finalized score store
    (and, for "cmoe", the teacher's per-token activations on calibration tokens)."""
    if config.method == "cmoe" and calibration is None:
        raise ValueError("method 'cmoe' needs per-token activations: pass calibration="
                         "tinyonn.clustering.Calibration.collect(teacher, tokenizer, probe_examples)")
    started = time.perf_counter()
    timings: dict[str, float] = {}
    store = open_store(store)
    units = UnitTable.read(store, config)
    kept = keep_units(units, config)
    timings["budget_s"] = time.perf_counter() - started
    routed = [k.routed for k in kept]
    cells: tuple[dict, ...] = ()
    if config.method == "pidiff-hdbscan":
        experts, cells, method_info = hdbscan_experts(store, units, routed, config, timings)
    elif config.method == "random":
        experts, method_info = random_experts(routed, config), {}
    elif config.method == "cmoe":
        kept, experts, method_info = cmoe_experts(calibration, units, kept, config, timings)
    else:
        experts, method_info = kmeans_experts(store, routed, config, timings)
    layers = tuple(layer_plan(layer, units.index, k.shared, layer_experts)
                   for layer, k, layer_experts in zip(units.layers, kept, experts))
    timings["total_s"] = time.perf_counter() - started
    info = {**budget_info(units, kept, config), **method_info,
            "seed": config.seed, "config": config.as_dict(), "timings": {k: round(v, 3) for k, v in timings.items()},
            "store": str(store.path), "n_samples": store.n_samples,
            "store_fingerprint": store.attrs.get("fingerprint")}  # what the pipeline checks a plan against
    plan = ExpertPlan(layers=layers, method=config.method, intermediate_size=units.intermediate_size,
                      cells=cells, info=info)
    plan.validate()
    return plan


def baseline_config(config: ClusterConfig, plan: ExpertPlan, method: Method) -> ClusterConfig:
    """`config` for a baseline `method` with the same experts per layer as `plan` (a fair comparison)."""
    return replace(config, method=method, experts_per_layer=tuple(lp.num_experts for lp in plan.layers))
