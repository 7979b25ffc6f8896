"""The expert plan: which teacher units each expert of each layer holds (provenance as data).

An `ExpertPlan` is what `tinyonn.clustering.cluster` produces and `tinyonn.model.assemble` consumes. Per layer it
lists the kept routed units packed expert by expert (`units[expert_offsets[e]:expert_offsets[e+1]]`
are expert e's teacher unit indices inside that layer), the router group of each expert (the main
router picks groups, sub-routers pick experts inside them), the concept cell each expert came from,
and the always-on shared expert's units. Saved as `plan.json` (readable summary, cells, config)
plus `plan_arrays.npz` (the index arrays) in the run folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer's experts."""

    layer: int
    units: np.ndarray
    """[U_l] int64 teacher unit indices (within the layer), packed expert by expert."""
    expert_offsets: np.ndarray
    """[E_l + 1] int64, starts at 0 and ends at len(units); an expert may be empty only if the
    caller allows it (cluster never emits empty experts)."""
    expert_group: np.ndarray
    """[E_l] int64 router group of each expert, 0..G_l-1 (groups follow the cell hierarchy)."""
    expert_cell: np.ndarray
    """[E_l] int64 concept cell each expert is a slice of (-1: built from noise / leftovers)."""
    shared_units: np.ndarray
    """[S_l] int64 units of the always-on shared expert (may be empty)."""

    @property
    def num_experts(self) -> int:
        return len(self.expert_offsets) - 1

    @property
    def num_groups(self) -> int:
        return int(self.expert_group.max()) + 1 if len(self.expert_group) else 0

    @property
    def expert_sizes(self) -> np.ndarray:
        return np.diff(self.expert_offsets)

    def expert_units(self, expert: int) -> np.ndarray:
        return self.units[self.expert_offsets[expert] : self.expert_offsets[expert + 1]]

    def validate(self, intermediate_size: int) -> None:
        """Raise ValueError if the arrays are inconsistent (naming the layer and the field)."""
        where = f"layer {self.layer}"
        offsets = self.expert_offsets
        if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(self.units) or np.any(np.diff(offsets) < 0):
            raise ValueError(f"{where}: expert_offsets must rise from 0 to len(units)={len(self.units)}")
        if len(self.expert_group) != self.num_experts or len(self.expert_cell) != self.num_experts:
            raise ValueError(f"{where}: expert_group/expert_cell need one entry per expert ({self.num_experts})")
        every = np.concatenate([self.units, self.shared_units])
        if len(np.unique(every)) != len(every):
            raise ValueError(f"{where}: a unit appears twice (routed units and shared_units must be disjoint)")
        if len(every) and (every.min() < 0 or every.max() >= intermediate_size):
            raise ValueError(f"{where}: unit index outside 0..{intermediate_size - 1}")


@dataclass(frozen=True)
class ExpertPlan:
    """Every layer's experts plus the record of how they were chosen."""

    layers: tuple[LayerPlan, ...]
    method: str
    """"pidiff-hdbscan", "random" or "coact-kmeans"."""
    intermediate_size: int
    cells: tuple[dict, ...] = ()
    """Per concept cell: id, size, layers spanned, mean score, dominant category, parent group."""
    info: dict = field(default_factory=dict)
    """Budget, kept fraction, size bounds, score used, seed, timings — whatever the builder records."""

    def validate(self) -> None:
        for layer in self.layers:
            layer.validate(self.intermediate_size)

    def kept_fraction(self) -> float:
        kept = sum(len(lp.units) + len(lp.shared_units) for lp in self.layers)
        return kept / (self.intermediate_size * len(self.layers))

    def summary(self) -> dict:
        return {
            "method": self.method,
            "layers": len(self.layers),
            "kept_fraction": self.kept_fraction(),
            "experts_per_layer": [lp.num_experts for lp in self.layers],
            "groups_per_layer": [lp.num_groups for lp in self.layers],
            "shared_per_layer": [int(len(lp.shared_units)) for lp in self.layers],
            "expert_size_min_mean_max": [
                [int(lp.expert_sizes.min()), float(lp.expert_sizes.mean()), int(lp.expert_sizes.max())]
                if lp.num_experts else [0, 0.0, 0] for lp in self.layers],
            "cells": len(self.cells),
        }

    def save(self, directory: str | Path) -> Path:
        """Write `plan.json` and `plan_arrays.npz` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for lp in self.layers:
            for name in ("units", "expert_offsets", "expert_group", "expert_cell", "shared_units"):
                arrays[f"layer{lp.layer}/{name}"] = np.asarray(getattr(lp, name), dtype=np.int64)
        np.savez_compressed(directory / "plan_arrays.npz", **arrays)
        meta = {"method": self.method, "intermediate_size": self.intermediate_size,
                "layers": [lp.layer for lp in self.layers], "summary": self.summary(),
                "cells": list(self.cells), "info": self.info}
        path = directory / "plan.json"
        path.write_text(json.dumps(meta, indent=1, default=_jsonable))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ExpertPlan:
        directory = Path(directory)
        meta = json.loads((directory / "plan.json").read_text())
        with np.load(directory / "plan_arrays.npz") as arrays:
            layers = tuple(
                LayerPlan(layer=layer, **{name: arrays[f"layer{layer}/{name}"] for name in
                                          ("units", "expert_offsets", "expert_group", "expert_cell", "shared_units")})
                for layer in meta["layers"])
        plan = cls(layers=layers, method=meta["method"], intermediate_size=meta["intermediate_size"],
                   cells=tuple(meta["cells"]), info=meta["info"])
        plan.validate()
        return plan


def _jsonable(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def full_plan(num_layers: int, intermediate_size: int, experts_per_layer: int, groups: int = 1,
              seed: int | None = None) -> ExpertPlan:
    """Every unit kept, split into equal contiguous (or shuffled, with `seed`) experts: for tests
    and for the 'keep everything' invariant."""
    rng = np.random.default_rng(seed) if seed is not None else None
    layers = []
    for layer in range(num_layers):
        units = np.arange(intermediate_size) if rng is None else rng.permutation(intermediate_size)
        offsets = np.linspace(0, intermediate_size, experts_per_layer + 1).round().astype(np.int64)
        layers.append(LayerPlan(layer=layer, units=units.astype(np.int64), expert_offsets=offsets,
                                expert_group=np.arange(experts_per_layer) % groups,
                                expert_cell=np.full(experts_per_layer, -1), shared_units=np.zeros(0, np.int64)))
    return ExpertPlan(layers=tuple(layers), method="full", intermediate_size=intermediate_size)
