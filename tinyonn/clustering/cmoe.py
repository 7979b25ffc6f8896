"""CMoE-style partition: carve a dense FFN into a shared expert and equal routed experts from the
units' per-token firing, without training (after CMoE, 2025; written from its description).

Per calibration token a unit *fires* when it is among the token's top-K_a units of its layer by
|h| (K_a = `ClusterConfig.firing_top_k` × the layer's units). A unit's firing vector is its 0/1
firing over the calibration tokens, its firing rate the mean. Per layer, the kept units of highest
firing rate form the shared (always-on) expert, as many as the budget gives the layer (the same
count as every other method); the other kept units are split into equal-size experts by balanced
k-means on their firing vectors (k-means++ seeds, optimal balanced assignment by
`linear_sum_assignment`, `kmeans.balanced_kmeans`; the firing vectors are first re-expressed
isometrically in ≤ units dimensions, which leaves k-means unchanged). Router groups: k-means of
the centroids.

`representatives` gives each expert's representative unit (the member nearest to the expert's
centroid in firing space) for any partition: the analytic router scores an expert by it.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from tinyonn.clustering.baselines import expert_counts
from tinyonn.clustering.budget import KeptUnits
from tinyonn.clustering.calibration import Calibration
from tinyonn.clustering.config import ClusterConfig
from tinyonn.clustering.experts import Expert, even_sizes
from tinyonn.clustering.kmeans import balanced_kmeans, group_of_centres, initial_centres, isometric_embedding
from tinyonn.clustering.units import UnitTable


def firing(h: torch.Tensor, top_k: int) -> torch.Tensor:
    """[N, I] activations → [N, I] float32 0/1: 1 where the unit is among the token's `top_k` by |h|."""
    top_k = int(min(max(top_k, 1), h.shape[1]))
    out = torch.zeros(h.shape, dtype=torch.float32)
    return out.scatter_(1, h.abs().topk(top_k, dim=1).indices, 1.0)


def firing_top_k(config: ClusterConfig, width: int) -> int:
    """K_a of a layer of `width` units."""
    return max(1, round(config.firing_top_k * width))


def cmoe_experts(calibration: Calibration, units: UnitTable, kept: list[KeptUnits], config: ClusterConfig,
                 timings: dict[str, float]) -> tuple[list[KeptUnits], list[list[Expert]], dict]:
    """Per layer: the shared units re-chosen by firing rate among the kept ones (same count), and
    the routed rest as equal experts by balanced k-means of firing vectors. Returns the new kept
    units, the experts, and the info this method adds to the plan."""
    fire_s = fit_s = 0.0
    new_kept, experts, rounds = [], [], []
    routed_counts = expert_counts([k.routed for k in kept], config)
    for i, (layer, positions, k, count) in enumerate(zip(units.layers, units.layer_units, kept, routed_counts)):
        start = time.perf_counter()
        width = len(positions)
        fires = firing(calibration.activations(layer), firing_top_k(config, width))  # [N, I]
        rate = fires.mean(0).numpy()
        every = np.concatenate([k.shared, k.routed])
        within = units.index[every]
        order = np.lexsort((every, -rate[within]))  # highest firing rate first, ties by position
        shared = np.sort(every[order[: len(k.shared)]])
        routed = np.sort(every[order[len(k.shared):]])
        new_kept.append(KeptUnits(shared=shared, routed=routed))
        x = isometric_embedding(fires[:, units.index[routed]].T.contiguous().numpy())  # firing vectors
        fire_s += time.perf_counter() - start
        start = time.perf_counter()
        if not count:
            experts.append([])
            continue
        seed = config.seed + i
        sizes = even_sizes(len(routed), count, config.block)
        labels, centres, used = balanced_kmeans(x, initial_centres(x, count, seed), sizes, config.kmeans_iters)
        group_of = group_of_centres(centres, config.groups_per_layer, seed)
        rounds.append(used)
        layer_experts = [Expert(units=routed[labels == e], group=int(group_of[e]), cell=-1) for e in range(count)]
        experts.append(sorted(layer_experts, key=lambda expert: (expert.group, int(expert.units[0]))))
        fit_s += time.perf_counter() - start
    timings.update(firing_s=fire_s, kmeans_s=fit_s)
    info = {"cmoe": {"calibration_tokens": calibration.n_tokens, "firing_top_k": config.firing_top_k,
                     "balance_rounds": rounds, "shared_by": "firing rate"}}
    return new_kept, experts, info


def representatives(fires: torch.Tensor, unit_expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] position (within the given units) of each expert's member nearest to its centroid in
    firing space; `fires` [N, units] are the units' firing vectors, `unit_expert` [units] their expert."""
    x = fires.T.float()  # [units, N]
    counts = torch.bincount(unit_expert, minlength=num_experts).clamp_min(1).float()
    centres = torch.zeros(num_experts, x.shape[1]).index_add_(0, unit_expert, x) / counts[:, None]
    distance = ((x - centres[unit_expert]) ** 2).sum(1)
    best = torch.full((num_experts,), float("inf"))
    best = best.scatter_reduce(0, unit_expert, distance, "amin")
    candidates = (distance <= best[unit_expert]).nonzero().squeeze(1)  # ties: the first member
    out = torch.full((num_experts,), len(unit_expert), dtype=torch.int64)
    return out.scatter_reduce(0, unit_expert[candidates], candidates, "amin")
