"""`tinyonn inspect` and tinyonn.inspection on a real probe store (tiny teacher) and its plan."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

from tinyonn import DataConfig, Example, load_teacher
from tinyonn.cli import main
from tinyonn.clustering import ClusterConfig, cluster
from tinyonn.config import ProbeConfig
from tinyonn.inspection import expert_report, open_run, parse_pair, run_summary, top_units, unit_report
from tinyonn.probe import probe
from tinyonn.probe.run import _fingerprint
from tinyonn.store.mapped import MappedArray
from tinyonn.store.zarr_store import ScoreStore, ScoreStoreError

PAIRS = [
    ("What does the word harbour mean?", "A sheltered port where ships can stay."),
    ("Calculate: 23 + 19", "42"),
    ("def add(a, b):", "    return a + b\n"),
    ("Translate into English: Vosotros también los de Etiopía.", "Ye Ethiopians also."),
]
CATEGORIES = ["code", "math", "prose"]


def _examples(count: int) -> list[Example]:
    return [Example(messages=({"role": "user", "content": f"{PAIRS[i % 4][0]} ({i})"},
                              {"role": "assistant", "content": PAIRS[i % 4][1] * (1 + i % 2)}),
                    category=CATEGORIES[i % 3]) for i in range(count)]


def _config(codec: str) -> ProbeConfig:
    return ProbeConfig(data=DataConfig(max_length=48, batch_size=4), chunk_samples=6, per_sample_codec=codec)


@pytest.fixture(scope="module")
def run_dir(tiny_teacher_dir, tmp_path_factory):
    """A probed (uncompressed per-sample arrays) and clustered run folder."""
    model, tokenizer = load_teacher(tiny_teacher_dir, dtype=torch.float32)
    run = tmp_path_factory.mktemp("runs") / "tiny"
    store = probe(model, _examples(15), _config("none"), run / "scores.zarr", tokenizer=tokenizer, progress=False)
    plan = cluster(store, ClusterConfig(min_size=16, max_size=64, groups_per_layer=2, shared_freq=0.85,
                                        shared_max_fraction=0.125, keep_fraction=0.75))  # 16 shared, 32 pruned
    plan.save(run / "plan")
    return run


def _inspect(capsys, run_dir, *args) -> str:
    assert main(["inspect", "--runs", str(run_dir.parent), "--run", run_dir.name, *args]) == 0
    return capsys.readouterr().out


def test_probe_writes_a_mappable_store_with_the_same_statistics(run_dir, tiny_teacher_dir, tmp_path):
    store = ScoreStore.open(run_dir / "scores.zarr", mmap=True)
    assert store.per_sample_codec == "none" and store.is_mapped("per_sample/act")
    plain = ScoreStore.open(run_dir / "scores.zarr")
    for name in ("act", "freq", "grad", "taylor", "head_out", "head_grad"):
        mapped = store.array(f"per_sample/{name}")
        assert isinstance(mapped, MappedArray)
        assert mapped[:].tobytes() == plain.array(f"per_sample/{name}")[:].tobytes()
        assert mapped[:, 3].tobytes() == plain.array(f"per_sample/{name}")[:, 3].tobytes()
    assert store.verify() > 0
    # the same probe, compressed: identical values, other bytes on disk
    model, tokenizer = load_teacher(tiny_teacher_dir, dtype=torch.float32)
    zstd = probe(model, _examples(15), _config("zstd"), tmp_path / "scores.zarr", tokenizer=tokenizer, progress=False)
    for name in ("act", "grad"):
        np.testing.assert_array_equal(ScoreStore.open(zstd.path, mmap=True).array(f"per_sample/{name}")[:],
                                      store.array(f"per_sample/{name}")[:])
    np.testing.assert_array_equal(zstd.summary_of("score"), store.summary_of("score"))
    assert zstd.attrs["fingerprint"] != store.attrs["fingerprint"]  # the codec is part of the run


def test_default_codec_keeps_older_fingerprints():
    samples = []
    config = ProbeConfig()
    older = hashlib.sha256()
    older.update(b"teacher")
    values = dataclasses.asdict(config)
    for name in ("per_sample_codec", "grad_target", "target_seed", "engine"):  # options added after stores were probed
        del values[name]
    older.update(json.dumps(values, sort_keys=True, default=str).encode())
    assert _fingerprint("teacher", samples, config) == older.hexdigest()
    assert _fingerprint("teacher", samples, dataclasses.replace(config, per_sample_codec="none")) != older.hexdigest()
    assert _fingerprint("teacher", samples, dataclasses.replace(config, grad_target="teacher")) != older.hexdigest()


def test_inspect_summary(run_dir, capsys):
    out = _inspect(capsys, run_dir)
    store = ScoreStore.open(run_dir / "scores.zarr")
    assert "per-sample   yes (uncompressed, memory-mappable)" in out
    assert "reads        memory-mapped per-sample arrays" in out
    assert "plan         pidiff-hdbscan:" in out and "15  (code: 5, math: 5, prose: 5)" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"], ["all"])]
    assert [r[:3] for r in rows] == [["0", "128", "4"], ["1", "128", "4"], ["all", "256", "8"]]
    assert out.strip() == run_summary(run_dir).strip()
    assert str(store.path) in out


def test_inspect_unit(run_dir, capsys):
    store = ScoreStore.open(run_dir / "scores.zarr")
    run = open_run(run_dir)
    position = run.unit_position(1, 5)
    assert position == 128 + 5
    out = _inspect(capsys, run_dir, "--unit", "1:5")
    lines = out.splitlines()
    assert lines[0] == f"unit 1:5  (store unit {position})"
    overall = lines[1].split()
    assert overall[0] == "overall" and overall[1:3] == ["act", f"{store.summary_of('act')[position]:.4g}"]
    rank = int((store.summary_of("score") > store.summary_of("score")[position]).sum()) + 1
    assert f"score rank   {rank} of all units" in out
    lp = run.plan.layers[1]
    if 5 in lp.shared_units:
        assert "expert       shared (always on, 16 units)" in out
    elif 5 not in lp.units:
        assert "expert       pruned (pidiff-hdbscan plan keeps it in no expert)" in out
    else:
        expert = next(e for e in range(lp.num_experts) if 5 in lp.expert_units(e))
        cell = int(lp.expert_cell[expert])
        assert f"expert       {expert} ({lp.expert_sizes[expert]} units, router group {lp.expert_group[expert]}), " \
               f"cell {cell}" in out
        assert unit_report(run_dir, 1, 5)["plan"]["cell_info"]["dominant_category"] in CATEGORIES
    table = {line.split()[0]: line.split() for line in lines if line.split()[:1] and line.split()[0] in CATEGORIES}
    by_cat = store.by_category("grad")
    for category in CATEGORIES:
        assert table[category][1] == "5"
        assert table[category][4] == f"{by_cat[category][position]:.4g}"
    # the most active samples come from the unit's per-sample column
    column = store.array("per_sample/act")[:, position].astype(np.float64)
    report = unit_report(run_dir, 1, 5)
    assert [s["sample"] for s in report["top_samples"]] == list(np.argsort(-column, kind="stable")[:5])
    assert "most active samples (act)" in out
    assert json.loads(_inspect(capsys, run_dir, "--unit", "1:5", "--json"))["by_category"]["math"]["samples"] == 5


def test_inspect_top(run_dir, capsys):
    store = ScoreStore.open(run_dir / "scores.zarr")
    layers, indices = store.units()
    grad = store.summary_of("grad")
    out = _inspect(capsys, run_dir, "--top", "4", "--by", "grad")
    lines = out.splitlines()
    assert lines[0] == "top 4 units by grad over all samples" and lines[1].split()[:3] == ["rank", "unit", "grad"]
    expected = np.argsort(-grad.astype(np.float64), kind="stable")[:4]
    assert [line.split()[1] for line in lines[2:]] == [f"{layers[p]}:{indices[p]}" for p in expected]
    assert [line.split()[2] for line in lines[2:]] == [f"{grad[p]:.4g}" for p in expected]
    math = store.by_category("act")["math"]
    out = _inspect(capsys, run_dir, "--top", "3", "--by", "act", "--category", "math")
    expected = np.argsort(-math.astype(np.float64), kind="stable")[:3]
    assert [line.split()[1] for line in out.splitlines()[2:]] == [f"{layers[p]}:{indices[p]}" for p in expected]
    rows = top_units(run_dir, 256, by="score", category="code")
    assert len(rows) == 256 and rows[0]["rank"] == 1 and all(r["expert"] != "-" for r in rows)


def test_inspect_expert(run_dir, capsys):
    plan = open_run(run_dir).plan
    units = sorted(int(u) for u in plan.layers[0].expert_units(1))
    out = _inspect(capsys, run_dir, "--expert", "0:1")
    cell = int(plan.layers[0].expert_cell[1])
    assert out.startswith(f"expert 0:1  (pidiff-hdbscan, {len(units)} units, router group "
                          f"{plan.layers[0].expert_group[1]}, cell {cell})")
    assert f"cell         {plan.cells[cell]['size']} units over layers" in out
    listed = [line.split()[0] for line in out.splitlines() if line.strip().startswith("0:")]
    assert len(listed) == min(20, len(units)) and set(listed) <= {f"0:{u}" for u in units}
    report = expert_report(run_dir, 0, 1)
    assert [row["index"] for row in sorted(report["units"], key=lambda r: r["index"])] == units
    assert set(report["responds_to"]) == set(CATEGORIES) and len(report["top_samples"]) == 5
    for category in CATEGORIES:
        assert any(line.split()[:1] == [category] for line in out.splitlines())
    shared = expert_report(run_dir, 0, "shared")
    assert shared["size"] == len(plan.layers[0].shared_units) == 16
    assert "expert 0:shared  (pidiff-hdbscan, 16 units)" in _inspect(capsys, run_dir, "--expert", "0:shared")
    roles = {unit_report(run_dir, 0, int(u))["plan"]["role"] for u in (plan.layers[0].shared_units[0],
                                                                        plan.layers[0].units[0])}
    pruned = sorted(set(range(128)) - set(plan.layers[0].units) - set(plan.layers[0].shared_units))
    assert len(pruned) == 32 and unit_report(run_dir, 0, pruned[0])["plan"]["role"] == "pruned"
    assert roles == {"shared", "routed"}


def test_inspect_errors(run_dir, capsys, tmp_path):
    assert main(["inspect", "--runs", str(run_dir.parent), "--run", run_dir.name, "--unit", "9:0"]) == 2
    assert "no layer 9" in capsys.readouterr().err
    assert main(["inspect", "--runs", str(tmp_path), "--run", "nothing"]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    with pytest.raises(ScoreStoreError, match="expected LAYER:INDEX"):
        parse_pair("7")
    assert parse_pair("3:shared", "expert") == (3, "shared")
    with pytest.raises(ScoreStoreError, match="choose one of"):
        top_units(run_dir, 3, by="loss")
