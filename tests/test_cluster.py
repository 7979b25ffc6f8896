"""Cells and experts: planted structure is recovered, budgets and bounds hold, methods are comparable."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

import torch

from tinyonn.clustering import Calibration, ClusterConfig, ExpertPlan, baseline_config, cluster
from tinyonn.clustering.cmoe import firing, representatives
from tinyonn.clustering.kmeans import balanced_assign, balanced_kmeans
from tinyonn.clustering.experts import Expert, even_sizes, layer_plan
from tinyonn.clustering.features import coactivation
from tinyonn.clustering.groups import cell_hierarchy
from tinyonn.clustering.plot import plot_cells
from tinyonn.store.scores import ScoreConfig, normalise, summary_score_fn, zscore_columns
from tinyonn.store.zarr_store import ChunkStats, ScoreStoreWriter

LAYERS, PER_LAYER, N, GROUPS, GROUP_UNITS, ALWAYS_ON, NOISE = 3, 64, 96, 4, 12, 8, 8
CATEGORIES = ["math", "code", "chat"]
ALWAYS, JUNK = -2, -3
SHARED = dict(shared_by="threshold", shared_freq=0.8, shared_max_fraction=0.25)
"""Test configs: the planted always-on units (freq ~0.95) are exactly the shared ones."""


def planted(seed: int = 0) -> dict[str, np.ndarray]:
    """3 layers x 64 units: per layer 4 planted groups of 12 units (a group shares one activation
    profile over samples in every layer, so its cell spans the layers), 8 always-on units and
    8 weak, high-gradient noise units."""
    rng = np.random.default_rng(seed)
    category = (np.arange(N) % len(CATEGORIES)).astype(np.int16)
    profiles = []
    for g in range(GROUPS):
        on = (rng.random(N) < 0.2) | ((category == g % len(CATEGORIES)) & (rng.random(N) < 0.7))
        profiles.append(np.where(on, 1.0, 0.03) * rng.uniform(0.8, 1.2, N))
    roles = np.concatenate([rng.permutation(np.repeat(np.r_[np.arange(GROUPS), ALWAYS, JUNK],
                                                      [GROUP_UNITS] * GROUPS + [ALWAYS_ON, NOISE]))
                            for _ in range(LAYERS)])
    u = LAYERS * PER_LAYER
    act, freq, grad = np.zeros((N, u)), np.zeros((N, u)), np.zeros((N, u))
    for j, role in enumerate(roles):
        if role >= 0:
            act[:, j] = rng.uniform(0.5, 1.5) * profiles[role] * rng.lognormal(0, 0.1, N)
            freq[:, j] = np.clip(0.4 * profiles[role] + rng.normal(0, 0.01, N), 0, 1)
            grad[:, j] = 0.05 * rng.lognormal(0, 0.3, N)
        elif role == ALWAYS:
            act[:, j] = 1.5 * rng.uniform(0.9, 1.1, N)
            freq[:, j] = np.clip(0.95 + rng.normal(0, 0.02, N), 0, 1)
            grad[:, j] = 0.02 * rng.lognormal(0, 0.3, N)
        else:
            act[:, j] = 0.01 * rng.random(N)
            freq[:, j] = 0.01 * rng.random(N)
            grad[:, j] = rng.lognormal(0, 0.3, N)
    return {"act": act, "freq": freq, "grad": grad, "taylor": act * grad, "category": category, "roles": roles,
            "loss": rng.gamma(3.0, 0.7, N), "n_tokens": rng.integers(5, 50, N)}


def write_store(path, data, per_sample: bool = True, down_norm: np.ndarray | None = None):
    u = LAYERS * PER_LAYER
    writer = ScoreStoreWriter.open(
        path, units_layer=np.repeat(np.arange(LAYERS), PER_LAYER), units_index=np.tile(np.arange(PER_LAYER), LAYERS),
        heads_layer=np.zeros(0, np.int16), heads_index=np.zeros(0, np.int16), categories=CATEGORIES,
        sample_category=data["category"], source_index=np.arange(N), chunk_samples=32, per_sample=per_sample,
        attrs={"fingerprint": "planted", "teacher_config": {"intermediate_size": PER_LAYER}}, unit_chunk=64,
        units_down_norm=down_norm)
    for k in writer.pending_chunks():
        a, b = writer.chunk_range(k)
        writer.write_chunk(k, ChunkStats(act=data["act"][a:b], freq=data["freq"][a:b], grad=data["grad"][a:b],
                                         taylor=data["taylor"][a:b], head_out=np.zeros((b - a, 0)),
                                         head_grad=np.zeros((b - a, 0)), loss=data["loss"][a:b],
                                         n_tokens=data["n_tokens"][a:b]))
    assert u == len(data["roles"])
    return writer.finalize(summary_score_fn(ScoreConfig()), score_attrs={"score": "pidiff"})


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.fixture(scope="module")
def store(tmp_path_factory, data):
    return write_store(tmp_path_factory.mktemp("planted") / "scores.zarr", data)


PLAN_CONFIG = ClusterConfig(keep_fraction=0.875, min_size=8, max_size=24, block=4, groups_per_layer=2,
                            min_cluster_size=16, **SHARED)
"""Prunes the 8 noise units of each layer, so the routed units are the planted ones; block 4 keeps
the planted 12-unit slices intact (12 is a multiple of 4, inside [8, 24]). A planted group is so
tight that its per-layer parts (12 units, told apart by the layer feature) are leaves of the
HDBSCAN tree; min_cluster_size 16 > 12 makes the whole cross-layer group the cell."""


@pytest.fixture(scope="module")
def plan(store):
    return cluster(store, PLAN_CONFIG)


def roles_of(data, layer: int) -> np.ndarray:
    return data["roles"][layer * PER_LAYER:(layer + 1) * PER_LAYER]


def unit_cells(plan: ExpertPlan) -> np.ndarray:
    """[layers * per_layer] cell of each routed unit (-9: not routed)."""
    out = np.full(len(plan.layers) * plan.intermediate_size, -9)
    for lp in plan.layers:
        for e in range(lp.num_experts):
            out[lp.layer * plan.intermediate_size + lp.expert_units(e)] = lp.expert_cell[e]
    return out


def kept_sets(plan: ExpertPlan) -> list[tuple[set, set]]:
    return [(set(lp.shared_units.tolist()), set(lp.units.tolist())) for lp in plan.layers]


# --------------------------------------------------------------------------------------------
# pidiff-hdbscan


def test_hdbscan_recovers_planted_cells_across_layers(plan, data):
    cells = unit_cells(plan)
    planted_units = data["roles"] >= 0
    assert adjusted_rand_score(data["roles"][planted_units], cells[planted_units]) >= 0.8
    assert len(plan.cells) == GROUPS
    for record in plan.cells:
        assert record["layers"] == list(range(LAYERS))  # a cell spans every layer it was planted in
        assert record["size"] == LAYERS * GROUP_UNITS
        assert record["dominant_category"] in CATEGORIES and 0 <= record["group"] < 2
        assert {"id", "mean_score", "units_per_layer", "experts"} <= set(record)
    for lp in plan.layers:
        assert lp.num_experts == GROUPS and sorted(lp.expert_sizes) == [GROUP_UNITS] * GROUPS
        assert lp.num_groups == 2 and set(lp.expert_group.tolist()) == {0, 1}
    assert plan.info["hdbscan"]["cells"] == GROUPS


def test_shared_expert_and_budget(plan, data):
    for lp in plan.layers:
        roles = roles_of(data, lp.layer)
        assert set(lp.shared_units.tolist()) == set(np.flatnonzero(roles == ALWAYS).tolist())
        assert set(lp.units.tolist()) == set(np.flatnonzero(roles >= 0).tolist())  # the noise units are pruned
    budget = plan.info["budget"]
    assert budget["kept_per_layer"] == [56] * LAYERS and budget["pruned_per_layer"] == [NOISE] * LAYERS
    assert plan.info["kept_fraction"] == pytest.approx(56 / 64) == plan.kept_fraction()
    assert plan.info["size_bounds"] == [8, 24] and plan.info["score"]["source"] == "summary/score"


def test_sizes_bounded_rounded_and_no_unit_lost(store):
    plan = cluster(str(store.path), ClusterConfig(min_size=8, max_size=16, block=8, **SHARED))  # noise units kept too
    assert 0 < plan.info["hdbscan"]["noise_fraction"] < 1
    for lp in plan.layers:
        assert np.all(lp.expert_cell >= 0)  # HDBSCAN noise joins its most likely cell
        sizes = lp.expert_sizes
        assert sizes.min() >= 8 and sizes.max() <= 16 and np.all(sizes % 8 == 0), sizes
        every = np.concatenate([lp.units, lp.shared_units])
        assert len(every) == len(set(every.tolist())) == PER_LAYER  # everything kept, nothing twice


def test_large_slices_split_small_ones_merged(store, data):
    split = cluster(store, replace(PLAN_CONFIG, min_size=4, max_size=8))
    merged = cluster(store, replace(PLAN_CONFIG, min_size=16, max_size=32, block=8))
    for lp in split.layers:
        assert lp.num_experts == 2 * GROUPS and set(lp.expert_sizes.tolist()) <= {4, 8}
        roles = roles_of(data, lp.layer)
        for e in range(lp.num_experts):  # a split stays inside its planted group
            assert len(set(roles[lp.expert_units(e)].tolist())) == 1
    for lp in merged.layers:
        assert lp.num_experts == 2 and sorted(lp.expert_sizes) == [24, 24]
        roles = roles_of(data, lp.layer)
        for e in range(lp.num_experts):  # two whole planted groups per merged expert
            assert sorted(np.bincount(roles[lp.expert_units(e)], minlength=GROUPS)) == [0, 0, 12, 12]


def test_deterministic(store):
    for method in ("pidiff-hdbscan", "random", "coact-kmeans"):
        config = ClusterConfig(method=method, min_size=8, max_size=16, block=8, experts_per_layer=5, seed=3, **SHARED)
        a, b = cluster(store, config), cluster(store, config)
        for x, y in zip(a.layers, b.layers):
            for name in ("units", "expert_offsets", "expert_group", "expert_cell", "shared_units"):
                np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=f"{method} {name}")
        assert a.cells == b.cells


# --------------------------------------------------------------------------------------------
# baselines


def test_baselines_keep_the_same_units_and_balance(store, plan):
    for method in ("random", "coact-kmeans"):
        other = cluster(store, baseline_config(PLAN_CONFIG, plan, method))
        other.validate()
        assert other.method == method and kept_sets(other) == kept_sets(plan)
        assert [lp.num_experts for lp in other.layers] == [lp.num_experts for lp in plan.layers]
        for lp in other.layers:
            assert lp.expert_sizes.max() - lp.expert_sizes.min() <= 4 and np.all(lp.expert_sizes % 4 == 0)
            assert np.all(lp.expert_cell == -1) and lp.num_groups == 2
        assert other.cells == ()


def test_coact_kmeans_recovers_planted_groups(store, data):
    plan = cluster(store, replace(PLAN_CONFIG, method="coact-kmeans", experts_per_layer=GROUPS))
    for lp in plan.layers:
        roles = roles_of(data, lp.layer)
        labels = np.repeat(np.arange(lp.num_experts), lp.expert_sizes)
        assert adjusted_rand_score(roles[lp.units], labels) == pytest.approx(1.0)


def test_random_differs_by_seed_and_is_balanced(store):
    config = ClusterConfig(method="random", experts_per_layer=(3, 4, 6), block=4, **SHARED)
    a, b = cluster(store, config), cluster(store, replace(config, seed=1))
    assert [lp.num_experts for lp in a.layers] == [3, 4, 6]
    assert [sorted(lp.expert_sizes) for lp in a.layers] == [[16, 20, 20], [12, 12, 16, 16], [8, 8, 8, 8, 12, 12]]
    assert not all(np.array_equal(x.units, y.units) for x, y in zip(a.layers, b.layers))
    assert kept_sets(a) == kept_sets(b)


def test_balanced_assignment_gives_equal_sizes_at_least_cost():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (24, 3)) + np.repeat(rng.normal(0, 4, (3, 3)), [16, 4, 4], axis=0)  # unequal blobs
    labels, centres, _ = balanced_kmeans(x, x[[0, 16, 20]], [8, 8, 8])
    assert np.bincount(labels, minlength=3).tolist() == [8, 8, 8]
    cost = ((x[:, None] - centres[None]) ** 2).sum(2)
    best = balanced_assign(cost, np.array([8, 8, 8]))
    assert np.bincount(best).tolist() == [8, 8, 8]
    # a tiny case against every assignment: 6 points into 2 clusters of 3
    small = rng.normal(size=(6, 2))
    d = ((small[:, None] - small[[0, 1]][None]) ** 2).sum(2)
    import itertools
    brute = min(sum(d[i, int(i in chosen)] for i in range(6)) for chosen in itertools.combinations(range(6), 3))
    labels = balanced_assign(d, np.array([3, 3]))
    assert np.bincount(labels).tolist() == [3, 3] and d[np.arange(6), labels].sum() == pytest.approx(brute)
    with pytest.raises(ValueError, match="capacities"):
        balanced_assign(d, np.array([3, 2]))


def test_balanced_kmeans_exact_capacities():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (30, 5)), rng.normal(3, 0.1, (10, 5))])
    labels, centres, _ = balanced_kmeans(x, x[[0, 35]], [20, 20])
    assert np.bincount(labels).tolist() == [20, 20] and centres.shape == (2, 5)
    assert np.all(labels[30:] == labels[35])  # the small blob stays together


# --------------------------------------------------------------------------------------------
# cmoe


def planted_calibration(data, tokens_per_group: int = 60, d: int = 16, seed: int = 0) -> Calibration:
    """Per-token MLP inputs and FFN weights matching the planted store: tokens come in 4 kinds
    (one per planted group) plus a direction every token shares; group g's units read direction g,
    the always-on units the shared one, the noise units nothing much."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0][: GROUPS + 1]  # orthonormal directions
    kind = np.repeat(np.arange(GROUPS), tokens_per_group)
    x = 3 * basis[kind] + 2 * basis[GROUPS] + 0.1 * rng.normal(size=(len(kind), d))
    gates, ups, downs = [], [], []
    for layer in range(LAYERS):
        roles = roles_of(data, layer)
        rows = np.where(roles[:, None] >= 0, basis[np.clip(roles, 0, None)],
                        np.where(roles[:, None] == ALWAYS, 0.9 * basis[GROUPS], 0.01 * rng.normal(size=(PER_LAYER, d))))
        rows = rows * rng.uniform(0.9, 1.1, (PER_LAYER, 1))
        gates.append(torch.tensor(rows, dtype=torch.float32))
        ups.append(torch.tensor(rows, dtype=torch.float32))
        downs.append(torch.tensor(rng.normal(size=(d, PER_LAYER)), dtype=torch.float32))
    inputs = tuple(torch.tensor(x, dtype=torch.float32) for _ in range(LAYERS))
    return Calibration(layers=tuple(range(LAYERS)), inputs=inputs, gate=tuple(gates), up=tuple(ups), down=tuple(downs))


CMOE_CONFIG = replace(PLAN_CONFIG, method="cmoe", experts_per_layer=GROUPS, firing_top_k=20 / 64)
"""K_a = 20 of 64: a token's 12 group units and 8 always-on units fire."""


def test_firing_marks_each_tokens_top_units():
    h = torch.tensor([[0.1, -3.0, 2.0, 0.5], [4.0, 0.0, -0.2, 1.0]])
    assert firing(h, 2).tolist() == [[0, 1, 1, 0], [1, 0, 0, 1]]


def test_cmoe_recovers_planted_groups_and_shared_units(store, data):
    calibration = planted_calibration(data)
    with pytest.raises(ValueError, match="calibration"):
        cluster(store, CMOE_CONFIG)
    plan = cluster(store, CMOE_CONFIG, calibration)
    plan.validate()
    assert plan.method == "cmoe" and plan.info["cmoe"]["calibration_tokens"] == GROUPS * 60
    for lp in plan.layers:
        roles = roles_of(data, lp.layer)
        assert np.all(roles[lp.shared_units] == ALWAYS)  # highest firing rate → shared
        assert lp.expert_sizes.tolist() == [12] * GROUPS  # equal experts
        labels = np.repeat(np.arange(lp.num_experts), lp.expert_sizes)
        assert adjusted_rand_score(roles[lp.units], labels) == pytest.approx(1.0)
    # the same budget as the other methods: the same units kept, as many shared per layer
    other = cluster(store, replace(PLAN_CONFIG, method="random", experts_per_layer=GROUPS))
    assert [s | r for s, r in kept_sets(plan)] == [s | r for s, r in kept_sets(other)]
    assert [len(s) for s, _ in kept_sets(plan)] == [len(s) for s, _ in kept_sets(other)]


def test_representative_is_the_member_nearest_the_centroid():
    fires = torch.tensor([[1, 1, 0, 0, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 0]], dtype=torch.float32)
    unit_expert = torch.tensor([0, 0, 0, 1, 1])  # expert 0: units 0-2 (unit 1 is the middle one)
    assert representatives(fires, unit_expert, 2).tolist() == [1, 3]


def test_output_contribution_feature_block(tmp_path, data):
    """With down_proj norms in the store, pidiff-hdbscan's features gain the output block
    (rank of mean |h|·‖W_down[:, j]‖ per layer, then per category centred)."""
    from tinyonn.clustering.features import unit_features

    u = LAYERS * PER_LAYER
    down = np.random.default_rng(5).uniform(0.5, 2.0, u)
    stored = write_store(tmp_path / "down.zarr", data, down_norm=down)
    features, spans = unit_features(stored, ClusterConfig(**SHARED))
    a, b = spans["output"].start, spans["output"].stop
    assert b - a == 1 + len(CATEGORIES)
    plain, plain_spans = unit_features(stored, ClusterConfig(w_output=0.0, **SHARED))
    assert "output" not in plain_spans and plain.shape[1] == features.shape[1] - (b - a)
    # the overall column orders a layer's units as act × down_norm does
    contribution = stored.summary_of("act") * down
    layer0 = np.arange(PER_LAYER)
    column = features[layer0, a]
    assert np.all(np.diff(column[np.argsort(contribution[layer0])]) >= 0)


# --------------------------------------------------------------------------------------------
# pieces, errors, files


def test_cell_hierarchy_cuts_are_nested():
    cuts = cell_hierarchy(np.random.default_rng(1).normal(size=(7, 4)))
    for k in range(1, 8):
        assert len(np.unique(cuts[:, k - 1])) == k
        if k > 1:  # every k-cut refines the (k-1)-cut
            assert all(len(np.unique(cuts[cuts[:, k - 1] == g, k - 2])) == 1 for g in range(k))


def test_even_sizes_are_block_multiples_but_the_last():
    assert even_sizes(70, 3, 16) == [32, 16, 22]
    assert even_sizes(10, 4, 16) == [3, 3, 2, 2]  # fewer blocks than parts: plain near-equal sizes
    assert even_sizes(5, 9, 4) == [1, 1, 1, 1, 1]  # never more parts than units


def test_layer_plan_packs_experts_by_group():
    index = np.array([5, 6, 7, 0, 1, 2, 3, 4])  # within-layer index of each global position
    experts = [Expert(units=np.array([0, 1]), group=1, cell=4), Expert(units=np.array([3]), group=0, cell=-1),
               Expert(units=np.array([2, 4]), group=1, cell=2)]
    lp = layer_plan(3, index, np.array([6, 5]), experts)
    assert lp.layer == 3 and lp.units.tolist() == [0, 5, 6, 7, 1] and lp.expert_offsets.tolist() == [0, 1, 3, 5]
    assert lp.expert_group.tolist() == [0, 1, 1] and lp.expert_cell.tolist() == [-1, 4, 2]
    assert lp.shared_units.tolist() == [2, 3]


def test_zscore_columns_matches_normalise_per_column():
    x = np.random.default_rng(2).lognormal(size=(50, 3))
    x[:, 1] = 7.0
    z = zscore_columns(x)
    np.testing.assert_allclose(z[:, [0, 2]], np.stack([normalise(x[:, j], "zscore") for j in (0, 2)], axis=1))
    assert np.all(z[:, 1] == 0) and x[0, 1] == 7.0  # constant column → 0; the input is left alone


def test_config_dict_round_trip():
    config = ClusterConfig(method="random", experts_per_layer=(3, 4), score=ScoreConfig(weights=(1.0, 2.0, 0.5)),
                           **SHARED)
    saved = json.loads(json.dumps(config.as_dict()))
    assert saved["experts_per_layer"] == [3, 4]
    assert ClusterConfig.from_dict({**saved, "no_longer_a_field": 1}) == config
    assert ClusterConfig.from_dict({}) == ClusterConfig()


def test_coactivation_embedding_separates_groups(store, data):
    embedding, info = coactivation(store, dims=4)
    assert embedding.shape == (LAYERS * PER_LAYER, 4) and info["samples_used"] == N
    planted_units = data["roles"] >= 0
    centres = np.stack([embedding[data["roles"] == g].mean(axis=0) for g in range(GROUPS)])
    nearest = np.linalg.norm(embedding[planted_units][:, None] - centres[None], axis=2).argmin(axis=1)
    assert np.mean(nearest == data["roles"][planted_units]) > 0.95


def test_without_per_sample_arrays(tmp_path, data):
    store = write_store(tmp_path / "agg.zarr", data, per_sample=False)
    plan = cluster(store, ClusterConfig(min_size=8, max_size=24, block=4, **SHARED))
    plan.validate()
    assert "coact" not in plan.info["hdbscan"]["feature_blocks"]
    with pytest.raises(ValueError, match="per-sample"):
        cluster(store, ClusterConfig(method="coact-kmeans", **SHARED))


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        ClusterConfig(method="kmeans")
    with pytest.raises(ValueError, match="multiples of block"):
        ClusterConfig(min_size=30)
    with pytest.raises(ValueError, match="2 \\* min_size"):
        ClusterConfig(min_size=64, max_size=96)
    with pytest.raises(ValueError, match="keep_fraction"):
        ClusterConfig(keep_fraction=0)


def test_save_load_and_plot(tmp_path, plan, store):
    plan.save(tmp_path / "run")
    loaded = ExpertPlan.load(tmp_path / "run")
    assert loaded.summary() == plan.summary() and loaded.cells == plan.cells
    assert loaded.info["config"]["method"] == "pidiff-hdbscan" and "timings" in loaded.info
    png = plot_cells(plan, store, tmp_path / "cells.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
