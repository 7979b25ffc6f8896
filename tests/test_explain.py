"""tinyonn.explain on a tiny run (tiny teacher probed, clustered, assembled with top-1 routing), the
offline report/index.html it writes, and that report opened in headless Chromium."""

from __future__ import annotations

import html.parser
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from tinyonn import DataConfig, Example, ExplainConfig, RoutingConfig, assemble, encode_examples, explain, load_teacher
from tinyonn.clustering import ClusterConfig, ExpertPlan, cluster
from tinyonn.clustering.plot import plot_cells
from tinyonn.config import ProbeConfig
from tinyonn.errors import TinyONNError
from tinyonn.explain.cells import SHARED, cell_spans, plan_units
from tinyonn.explain.labels import auto_label, dominant_categories, load_overrides, token_kind
from tinyonn.explain.projection import project_units, projection_method, unit_features
from tinyonn.explain.report import MISSING, json_tables, write_report
from tinyonn.explain.routing import RoutingRecord, pick_examples
from tinyonn.explain.specialisation import coactivation, domain_share, layer_summary, token_specialisation
from tinyonn.probe import probe
from tinyonn.store import ScoreStore

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "screenshot_report.py"
PAIRS = [
    ("What does the word harbour mean?", "A sheltered port where ships can stay."),
    ("Calculate: 23 + 19", "42 and 7 times 6 is 42"),
    ("def add(a, b):", "    return a + b\n"),
    ("Translate into English: Vosotros también los de Etiopía.", "Ye Ethiopians also."),
]
CATEGORIES = ["code", "math", "prose"]
EVALUATE = {"model_dir": "model", "examples": 18, "teacher_ppl": {"code": 5.5, "math": 4.25, "all": 6.0},
            "model_ppl": {"code": 7.5, "math": 5.125, "all": 8.0}, "curve": [{"top_k": 1, "ppl": 9.5},
            {"top_k": 2, "ppl": 7.25, "note": None}], "speed": {"bf16": {"prefill_tok_s": 1234.5}}, "empty": ""}


def _examples(count: int, offset: int = 0) -> list[Example]:
    return [Example(messages=({"role": "user", "content": f"{PAIRS[i % 4][0]} ({i})"},
                              {"role": "assistant", "content": PAIRS[i % 4][1] * (1 + i % 2)}),
                    category=CATEGORIES[i % 3]) for i in range(offset, offset + count)]


@pytest.fixture(scope="module")
def run_dir(tiny_teacher_dir, tmp_path_factory):
    """Probed, clustered, assembled (top-1 routing: one expert a token), with an evaluate.json, a
    figure of its own and stage records, as the pipeline leaves a run."""
    teacher, tokenizer = load_teacher(tiny_teacher_dir, dtype=torch.float32)
    run = tmp_path_factory.mktemp("runs") / "tiny"
    store = probe(teacher, _examples(18), ProbeConfig(data=DataConfig(max_length=48, batch_size=6), chunk_samples=6),
                  run / "scores.zarr", tokenizer=tokenizer, progress=False)
    plan = cluster(store, ClusterConfig(min_size=16, max_size=64, groups_per_layer=2, shared_freq=0.85,
                                        shared_max_fraction=0.125))
    plan.save(run / "plan")
    plot_cells(plan, store, run / "plan" / "cells.png")
    model = assemble(teacher, plan)
    model.set_routing(RoutingConfig(mode="topk", top_k=1))
    model.save_pretrained(run / "model")
    tokenizer.save_pretrained(run / "model")
    (run / "report").mkdir()
    (run / "report" / "evaluate.json").write_text(json.dumps(EVALUATE))
    matplotlib.image.imsave(run / "report" / "sparsity_curve.png", np.eye(8))
    (run / "stages").mkdir()
    for stage, seconds in (("probe", 1.5), ("evaluate", 2.25)):
        (run / "stages" / f"{stage}.json").write_text(json.dumps(
            {"stage": stage, "fingerprint": "f" * 16, "outputs": ["x"], "seconds": seconds, "inputs": {}}))
    (run / "labels.json").write_text(json.dumps({"L1·E0": "hand-written"}))
    return run


@pytest.fixture(scope="module")
def explained(run_dir):
    config = ExplainConfig(per_category=0, max_units=100, tsne_iterations=250, min_token_count=2)
    result = explain(run_dir, config, examples=_examples(12, offset=100), log=lambda *a: None)
    write_report(run_dir)
    return result


def test_explain_measures_the_saved_models_own_routing(run_dir, explained, tiny_teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan = ExpertPlan.load(run_dir / "plan")
    assert [e["expert"] for e in explained["experts"]] == [f"L{lp.layer}·E{e}" for lp in plan.layers
                                                            for e in range(lp.num_experts)]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    samples, _ = encode_examples(tokenizer, _examples(12, offset=100), DataConfig(max_length=256))
    # the same numbers, measured directly one unpadded sample at a time: tokens per category routed
    # to each expert of each layer, and the summed mean |h| of each expert's units (from the layer input)
    routed, activation, inputs = {}, {}, []
    layers = model.moe_layers()
    hooks = [layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0][0])) for layer in layers]
    with torch.no_grad():
        for sample in samples:
            inputs.clear()
            out = model(input_ids=torch.tensor([sample.input_ids]), output_router_logits=True)
            response = torch.tensor(sample.labels) != -100
            for layer, (r, x, moe) in enumerate(zip(out.router_outputs, inputs, layers)):
                key = (layer, sample.category)
                routed[key] = routed.get(key, 0) + r.mask[response].sum(0)
                h = (torch.nn.functional.silu(x @ moe.w_gate.T) * (x @ moe.w_up.T)).abs()[response]
                per_expert = torch.stack([h[:, moe.unit_expert == e].mean(1) for e in range(moe.num_experts)], 1)
                activation[key] = activation.get(key, 0) + per_expert.sum(0)
    for hook in hooks:
        hook.remove()
    tokens = {c: sum(int((torch.tensor(s.labels) != -100).sum()) for s in samples if s.category == c)
              for c in CATEGORIES}
    assert explained["tokens_per_category"] == tokens and explained["tokens"] == sum(tokens.values())
    for e in explained["experts"]:
        for c in CATEGORIES:
            assert e["routing_share"][c] == pytest.approx(float(routed[e["layer"], c][e["index"]]) / tokens[c])
            assert e["mean_activation"][c] == pytest.approx(float(activation[e["layer"], c][e["index"]]) / tokens[c],
                                                            rel=1e-4)
        assert e["label"].startswith(e["expert"] + " — ")
    for layer, summary in zip(plan.layers, explained["layers"]):
        assert summary["mean_selected"] == 1.0  # top-1: one expert a token
        assert summary["uniform_rate"] == pytest.approx(1 / layer.num_experts)
        shares = [sum(e["routing_share"][c] for e in explained["experts"] if e["layer"] == layer.layer)
                  for c in CATEGORIES]
        assert shares == pytest.approx([1.0] * 3)
    # the override file in the run folder names one expert; the rest are labelled from the data
    override = [e for e in explained["experts"] if e["label_source"] == "override"]
    assert [(e["expert"], e["label"]) for e in override] == [("L1·E0", "L1·E0 — hand-written")]
    # every kept unit in the projection (100 of them at most), cells as the plan has them
    units = plan_units(plan)
    assert explained["projection"] == {"method": "tsne", "units": 100, "of_units": len(units.layer),
                                       "features": "mean |h| over 18 probe samples", "seed": 0}
    assert (units.cell == SHARED).sum() == sum(len(lp.shared_units) for lp in plan.layers)
    assert explained["cells"] == json.loads(json.dumps(cell_spans(plan)))
    for span in explained["cells"]:
        holders = [lp.layer for lp in plan.layers if span["cell"] in lp.expert_cell.tolist()]
        assert span["layers"] == holders and span["span"] == holders[-1] - holders[0] + 1
    for name, image in explained["images"].items():
        pixels = matplotlib.image.imread(run_dir / "report" / image)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100, name
    on_disk = json.loads((run_dir / "report" / "explain.json").read_text())
    assert on_disk["experts"] == json.loads(json.dumps(explained["experts"]))


def test_projection_takes_umap_when_installed_and_category_features_without_per_sample_arrays(run_dir, monkeypatch):
    import importlib.machinery
    import types

    class UMAP:  # stands in for umap-learn: the first two feature columns
        def __init__(self, n_components, random_state, n_neighbors):
            assert (n_components, random_state) == (2, 3)

        def fit_transform(self, x):
            return x[:, :2]

    fake = types.ModuleType("umap")
    fake.__spec__ = importlib.machinery.ModuleSpec("umap", None)
    fake.UMAP = UMAP
    monkeypatch.setitem(sys.modules, "umap", fake)
    store = ScoreStore.open(run_dir / "scores.zarr")
    units = plan_units(ExpertPlan.load(run_dir / "plan"))
    projection = project_units(store, units, max_units=40, max_samples=100, method="auto", seed=3)
    assert projection.method == "umap" and projection.xy.shape == (40, 2) and len(set(projection.units)) == 40
    assert projection_method("tsne") == "tsne"
    # a store probed without per-sample arrays: each unit's per-category act, freq and grad
    monkeypatch.setattr(ScoreStore, "has_per_sample", property(lambda self: False))
    rows = np.array([0, 5])
    features, described = unit_features(store, units, rows, 100)
    layers, indices = store.units()
    position = [int(np.flatnonzero((layers == units.layer[r]) & (indices == units.index[r]))[0]) for r in rows]
    expected = [[store.by_category(stat)[c][p] for stat in ("act", "freq", "grad") for c in store.categories]
                for p in position]
    np.testing.assert_allclose(features, np.log1p(np.abs(expected)), rtol=1e-6)
    assert described == "per-category act, freq and grad"


def _record(masks: list[list[list[int]]], category: list[int], token_ids: list[int]) -> RoutingRecord:
    return RoutingRecord(categories=("a", "b"), token_ids=np.array(token_ids), category=np.array(category),
                         masks=tuple(np.array(m, dtype=bool) for m in masks),
                         activation=tuple(np.ones((len(category), len(m[0])), np.float32) for m in masks),
                         expert_sizes=tuple(np.full(len(m[0]), 16) for m in masks), examples=2)


def test_specialisation_metrics_on_a_known_routing():
    # 4 tokens, 3 experts, top-1: a-tokens go to expert 0, b-tokens split between 1 and 2
    record = _record([[[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]], category=[0, 0, 1, 1], token_ids=[7, 7, 8, 8])
    np.testing.assert_allclose(domain_share(record, 0), [[1, 0, 0], [0, 0.5, 0.5]])
    np.testing.assert_allclose(token_specialisation(record, 0, min_count=2, top=1), [1.0, 0.5, 0.5])
    summary = layer_summary(record, 0, min_count=2, top=1)
    assert summary["uniform_rate"] == pytest.approx(1 / 3) and summary["mean_selected"] == 1.0
    assert summary["domain_peak_share"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert summary["domain_peak_ratio"] == pytest.approx((1 + 0.5 + 0.5) / 3 * 3)
    assert summary["experts_2x_uniform"] == 1 and summary["never_selected"] == 0
    assert summary["coactivation_peak"] == 0.0 and summary["coactivation_uniform"] == 0.0
    # top-2 over 3 experts: expert 0 always with 1 or 2
    record = _record([[[1, 1, 0], [1, 0, 1], [1, 1, 0], [1, 1, 0]]], category=[0, 0, 1, 1], token_ids=[1, 2, 3, 4])
    np.testing.assert_allclose(coactivation(record, 0), [[1, 0.75, 0.25], [1, 1, 0], [1, 0, 1]])
    summary = layer_summary(record, 0, min_count=1, top=1)
    assert summary["coactivation_peak"] == pytest.approx((0.75 + 1 + 1) / 3)
    assert summary["coactivation_uniform"] == pytest.approx(0.5)


def test_labels_from_categories_and_tokens_and_the_override_file(tmp_path):
    assert token_kind(["1", " 2", "42", "x"]) == "digits"
    assert token_kind([" the", "of"]) is None
    assert auto_label(["math"], ["1", "2", "3"]) == "math digits"
    assert auto_label(["code", "math"], ["def", " return"]) == "code+math ‘def’ ‘return’"
    assert auto_label([], [",", ".", ";"]) == "mixed punctuation"
    assert dominant_categories(np.array([0.9, 0.1, 0.2]), ("code", "math", "prose")) == ["code"]
    assert dominant_categories(np.zeros(3), ("code", "math", "prose")) == []
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"L3·E5": "arithmetic digits", "2:7": "dates", "L0.E1": " x "}))
    assert load_overrides(path) == {(3, 5): "arithmetic digits", (2, 7): "dates", (0, 1): "x"}
    path.write_text(json.dumps({"expert five": "x"}))
    with pytest.raises(TinyONNError, match=f"{path}: entry 'expert five'"):
        load_overrides(path)
    path.write_text("{not json")
    with pytest.raises(TinyONNError, match=f"{path}: not JSON"):
        load_overrides(path)
    with pytest.raises(TinyONNError, match="label override file not found"):
        load_overrides(tmp_path / "missing.json")
    assert [e.category for e in pick_examples(_examples(9), 2)] == ["code", "math", "prose"] * 2


def test_explain_config_and_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="ExplainConfig.projection"):
        ExplainConfig(projection="pca")
    with pytest.raises(ValueError, match="ExplainConfig.tsne_iterations"):
        ExplainConfig(tsne_iterations=100)
    with pytest.raises(TinyONNError, match="has no scores.zarr: run `tinyonn probe"):
        explain(tmp_path)


class _Page(html.parser.HTMLParser):
    """The <img> sources, the text of every <td>/<th>, and whether anything points off the machine."""

    def __init__(self):
        super().__init__()
        self.images, self.cells, self.links, self.tables, self.body = [], [], [], 0, {}
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [v for k, v in attrs.items() if k in ("src", "href") and v]
        if tag == "img":
            self.images.append(attrs.get("src"))
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "table":
            self.tables += 1
        elif tag == "body":
            self.body = attrs

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell).strip())
            self._cell = None


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def test_report_has_every_image_and_every_cell_filled(run_dir, explained):
    index = run_dir / "report" / "index.html"
    text = index.read_text()
    page = _parse(text)
    assert page.tables >= 8 and page.images
    assert all(cell for cell in page.cells), "an empty table cell"
    for src in page.images:
        assert (index.parent / src).is_file(), src
    assert set(explained["images"].values()) | {"sparsity_curve.png", "../plan/cells.png"} == set(page.images)
    assert not [link for link in page.links if "://" in link], "the report must need no network"
    assert "<script" not in text and "stylesheet" not in text
    # every number is read from the run's files: evaluate.json drawn generically, stage times, experts
    for value in ("7.5", "5.125", "9.5", "7.25", "1,234.5", "2.25", "3.75", "L1·E0 — hand-written"):
        assert value in page.cells, value
    curve_row = page.cells.index("7.25")
    assert page.cells[curve_row + 1] == MISSING  # the missing "note" of a record
    assert json_tables({"a": {"x": 1}, "b": {"x": 2}}, "t")[1].count("<td") == 3


def _chromium_or_skip():
    spec = importlib.util.spec_from_file_location("screenshot_report", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    if script.chromium_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI (.ci/run installs it)")
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium)")
    return script


def test_report_renders_in_headless_chromium(run_dir, explained, tmp_path):
    script = _chromium_or_skip()
    report = run_dir / "report"
    # a copy of the page with a script that marks, once loaded, the images Chromium could not draw
    probe_page = report / "chromium_check.html"
    marker = ("<script>window.addEventListener('load', () => { const imgs = [...document.images]; "
              "document.body.setAttribute('data-images', imgs.length); document.body.setAttribute('data-broken', "
              "JSON.stringify(imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src')))); "
              "});</script></body>")
    probe_page.write_text((report / "index.html").read_text().replace("</body>", marker))
    try:
        page = _parse(script.dump_dom(probe_page))
    finally:
        probe_page.unlink()
    assert int(page.body["data-images"]) == len(explained["images"]) + 2
    assert json.loads(page.body["data-broken"]) == []
    assert page.tables >= 8 and all(page.cells)
    # the screenshot script, as a user runs it
    shot = tmp_path / "report.png"
    subprocess.run([sys.executable, str(SCRIPT), str(report / "index.html"), str(shot), "--window-size", "1200,1600"],
                   check=True, capture_output=True, timeout=180)
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1600, 1200) and pixels[..., :3].std() > 0.05  # not a blank page
