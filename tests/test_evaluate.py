"""`tinyonn.evaluate` on the builtin teacher: every row on the same examples, the sweep, the cost
per token, speed and memory, the JSON and the PNG."""

from __future__ import annotations

import json

import pytest
import torch

from tinyonn import load_eval_set, load_probe_set, load_teacher
from tinyonn.clustering.plan import full_plan
from tinyonn.evaluation.efficiency import cost_per_token
from tinyonn.evaluation.evaluate import EvaluateConfig, evaluate, format_table, select_items
from tinyonn.evaluation.extract import budget_routing, routed_budgets
from tinyonn.model.assemble import assemble


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """The builtin teacher split into 16 experts per layer, oracle-routed within 50% of its units."""
    teacher, tokenizer = load_teacher("builtin", dtype=torch.bfloat16)
    model = assemble(teacher, full_plan(8, 1536, 16, groups=4, seed=1))
    model.set_routing(budget_routing(model, routed_budgets(model, 0.5, 1536), "oracle"))
    path = tmp_path_factory.mktemp("evaluate") / "model"
    model.save_pretrained(path)
    return path


def test_evaluate_rows_sweep_cost_and_report(saved_model, tmp_path):
    held_out = load_probe_set("builtin", "validation")[::300]
    items = load_eval_set("builtin")
    config = EvaluateConfig(sweep=(0.5, 1.0), items_per_category=1, bench_prompt_length=16, bench_new_tokens=4)
    report = evaluate(saved_model, "builtin", held_out, items, config, out_dir=tmp_path, extra={"run": "test"},
                      log=lambda *_: None)

    names = [row["name"] for row in report["rows"]]
    assert names == ["teacher bfloat16", "teacher nf4", "TinyONN (as saved)", "TinyONN at 100%"]  # 50% is the saved one
    teacher, nf4, saved, full = report["rows"]
    assert report["examples"] == len(held_out) == 8 and report["items"] == 7  # one item per category
    assert all(row["ppl"]["all"]["tokens"] == report["heldout_tokens"] for row in (teacher, saved, full))
    # every unit on: TinyONN is the teacher (bf16 rounding of a reordered sum apart)
    assert abs(full["ppl"]["all"]["ppl"] / teacher["ppl"]["all"]["ppl"] - 1) < 0.01
    assert full["measured_active_fraction"] == 1.0 and saved["nominal_fraction"] == 0.5
    assert 0.4 < saved["measured_active_fraction"] <= 0.5
    assert saved["ppl"]["all"]["ppl"] > teacher["ppl"]["all"]["ppl"]
    assert report["model_ppl"]["all"] == saved["ppl"]["all"]["ppl"] and report["run"] == "test"
    assert report["teacher_ppl"]["all"] == teacher["ppl"]["all"]["ppl"]
    # nf4: a real row on this CPU (or the reason it could not run)
    assert "error" in nf4 or abs(nf4["ppl"]["all"]["ppl"] / teacher["ppl"]["all"]["ppl"] - 1) < 0.2
    # accuracy beside chance: chance is the mean of 1/choices over the chosen items
    chosen = select_items(items, 1)
    assert teacher["mc"]["all"]["chance"] == pytest.approx(sum(1 / len(i["choices"]) for i in chosen) / 7)
    assert teacher["mc"]["all"]["mc_items"] == 7 and 0 <= teacher["mc"]["all"]["accuracy"] <= 1
    assert set(teacher["mc"]) == {i["category"] for i in chosen} | {"all"}
    # cost: the teacher's FFN is 8 layers × 1536 units × 3·384; TinyONN adds its routers
    assert teacher["ffn_units_per_layer"] == [1536.0] * 8
    ffn = 8 * 1536 * 3 * 384
    assert teacher["active_parameters"] == teacher["parts"]["outside_mlp_parameters"] + ffn
    assert teacher["active_parameters"] == sum(p.numel() for p in load_teacher("builtin")[0].parameters())
    assert full["active_parameters"] == teacher["active_parameters"] + full["parts"]["router_parameters"]
    saved_ffn = saved["parts"]["ffn_parameters"]
    assert saved_ffn == pytest.approx(ffn * saved["measured_active_fraction"], rel=1e-6)
    assert saved["flops_per_token"] < teacher["flops_per_token"]
    # the curve and the speed table
    assert [p["nominal_fraction"] for p in report["sweep"]] == [0.5, 1.0]
    for name in ("teacher", "tinyonn"):
        speed = report["efficiency"][name]
        assert speed["prefill_tok_s"] > 0 and speed["decode_tok_s"] > 0 and speed["batch"] == 1
        assert speed["peak_memory_mib"] is None or speed["peak_memory_mib"] > 40  # ≥ the bf16 weights
    written = json.loads((tmp_path / "evaluate.json").read_text())
    assert written["rows"][0]["ppl"]["all"]["ppl"] == teacher["ppl"]["all"]["ppl"]
    assert (tmp_path / written["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| TinyONN (as saved) |" in format_table(report)


def test_cost_of_a_dense_model_is_its_parameter_count():
    teacher, _ = load_teacher("builtin")
    cost = cost_per_token(teacher, context=1)
    linear = sum(m.weight.numel() for n, m in teacher.named_modules() if isinstance(m, torch.nn.Linear))
    heads = teacher.config.num_attention_heads * teacher.config.head_dim * 8
    assert cost["flops_per_token"] == 2 * linear + 2 * heads * 2  # every Linear (MLP included) + scores
    assert cost["active_parameters"] == sum(p.numel() for p in teacher.parameters())


def test_evaluate_config_rejects_bad_values():
    with pytest.raises(ValueError, match="sweep"):
        EvaluateConfig(sweep=(0.0,))
    with pytest.raises(ValueError, match="dtype"):
        EvaluateConfig(dtype="int8")
    with pytest.raises(ValueError, match="bench_new_tokens"):
        EvaluateConfig(bench_new_tokens=1)
