"""Oracle routing, router warm-up and the extract evaluation helpers on the tiny Qwen3."""

from __future__ import annotations

import pytest
import torch

from tinyonn import load_teacher
from tinyonn.model.assemble import assemble
from tinyonn.evaluation.extract import WarmupConfig, budget_routing, recall_at_k, routed_budgets, warm_up_routers
from tinyonn.model.moe_layer import expert_mass
from tinyonn.clustering.plan import full_plan


def _model(tiny_teacher_dir):
    teacher, _ = load_teacher(tiny_teacher_dir)
    return teacher, assemble(teacher, full_plan(2, 128, 8, groups=2, seed=0)).eval()


def test_expert_mass_sums_units():
    h = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    w_down = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]])  # [U, d]: row norms 1, 1, 2, 2
    mass = expert_mass(h, w_down, torch.tensor([0, 0, 1, 1]), 2)
    assert torch.allclose(mass, torch.tensor([[3.0, 7.0]]))


def test_oracle_routing_at_full_budget_equals_teacher(tiny_teacher_dir):
    teacher, model = _model(tiny_teacher_dir)
    ids = torch.randint(3, 200, (2, 10))
    with torch.no_grad():
        model.set_routing(budget_routing(model, routed_budgets(model, 1.0, 128), "oracle"))
        assert (model(input_ids=ids).logits - teacher(input_ids=ids).logits).abs().max() < 1e-4
        model.set_routing(budget_routing(model, routed_budgets(model, 0.5, 128), "oracle"))
        out = model(input_ids=ids, output_router_logits=True)
    assert (out.logits - teacher(input_ids=ids).logits).abs().max() > 1e-3
    active = (out.router_outputs[0].mask * model.moe_layers()[0].expert_sizes).sum(1)
    assert bool((active <= 64).all()) and bool((active == 64).all())  # 8 experts of 16: 4 fit exactly


def test_warm_up_raises_recall_and_budget_routing_works(tiny_teacher_dir):
    _, model = _model(tiny_teacher_dir)
    torch.manual_seed(0)
    data = []
    for layer in model.moe_layers():
        with torch.no_grad():  # plant experts that answer to distinct input directions
            directions = torch.nn.functional.normalize(torch.randn(layer.num_experts, 64), dim=1)
            planted = directions[layer.unit_expert] + 0.05 * torch.randn(128, 64)
            layer.w_gate.copy_(planted)
            layer.w_up.copy_(planted)
            x = torch.randn(3000, 64)
            mass = expert_mass(layer.dense_h(x), layer.w_down, layer.unit_expert, layer.num_experts)
        data.append({"x": x, "target": mass / mass.sum(1, keepdim=True), "mass": mass})
    metrics = warm_up_routers(model, data, WarmupConfig(epochs=30, batch_tokens=512, lr=1e-2, recall_k=2))
    for m in metrics:
        assert m["recall@2"] > m["recall@2_before"] + 0.1
        assert m["recall@2"] > 0.5
    model.set_routing(budget_routing(model, routed_budgets(model, 0.5, 128), "budget"))
    with torch.no_grad():
        routed = model(input_ids=torch.randint(3, 200, (2, 10)), output_router_logits=True).router_outputs
    assert bool(((routed[1].mask * model.moe_layers()[1].expert_sizes).sum(1) <= 64).all())


def test_recall_at_k():
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert recall_at_k(scores, torch.tensor([[9.0, 1.0, 8.0, 0.0]]), 2) == 0.5
    assert recall_at_k(scores, torch.tensor([[9.0, 8.0, 1.0, 0.0]]), 2) == 1.0


# ---------------------------------------------------------------- training-free conversion


def test_converted_model_saved_is_the_model_measured(tiny_teacher_dir, tiny_tokenizer, tmp_path):
    """`convert` → perplexity → `save_measured` → reload: the reloaded model gives the same
    perplexity (routing, router bias, warm-up and compensation are all saved state), and the fast
    `response_perplexity` equals the pipeline's `heldout_perplexity`."""
    from transformers import AutoModelForCausalLM

    from tinyonn.clustering import Calibration, CalibrationConfig
    from tinyonn.config import DataConfig
    from tinyonn.data import encode_examples, load_probe_set
    from tinyonn.evaluation.extract import convert, response_perplexity, save_measured
    from tinyonn.evaluation.metrics import heldout_perplexity

    teacher, _ = load_teacher(tiny_teacher_dir)
    calibration = Calibration.collect(teacher, tiny_tokenizer, load_probe_set("builtin", "train")[::400],
                                      CalibrationConfig(max_tokens=800))
    held_out = load_probe_set("builtin", "validation")[::50]
    samples, _ = encode_examples(tiny_tokenizer, held_out, DataConfig(max_length=128))
    plan = full_plan(2, 128, 8, groups=2, seed=0)
    for routing, compensation in (("analytic", True), ("learned", True), ("oracle", False)):
        model, info = convert(teacher, plan, calibration, 0.5, routing, compensation,
                              warmup=WarmupConfig(epochs=2, batch_tokens=256))
        assert {r.compensate for r in model.routing} == {compensation}
        assert {r.mode for r in model.routing} == {"oracle" if routing == "oracle" else "budget"}
        measured = response_perplexity(model, samples, tiny_tokenizer.pad_token_id, max_batch_tokens=512)
        reference = heldout_perplexity(model, tiny_tokenizer, held_out, DataConfig(max_length=128), batch_size=4)
        assert all(abs(measured[c] / reference[c]["ppl"] - 1) < 1e-4 for c in measured)
        save_measured(model, tiny_tokenizer, {"ppl_by_category": measured}, tmp_path / routing)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / routing).eval()
        again = response_perplexity(loaded, samples, tiny_tokenizer.pad_token_id, max_batch_tokens=512)
        assert again == measured, routing
        assert info["seconds"] > 0 and ("warmup" in info) == (routing == "learned")


def test_rank_rows_and_table():
    from tinyonn.evaluation.extract import rank_rows, report_table

    teacher = {"a": 2.0, "b": 4.0, "all": 3.0}
    rows = [{"partition": p, "routing": r, "compensation": c, "active_fraction": f,
             "ppl_by_category": {"a": 2.0 * x, "b": 4.0 * x, "all": 3.0 * x}, "ppl_ratio_max": x, "convert_seconds": 1.0}
            for p, r, c, f, x in [("cmoe", "analytic", True, 0.5, 1.2), ("cmoe", "analytic", True, 0.75, 1.0),
                                  ("random", "learned", False, 0.5, 1.5), ("random", "learned", False, 0.75, 1.3),
                                  ("random", "oracle", False, 0.5, 1.0)]]
    ranked = rank_rows(rows)
    assert [(r["partition"], r["routing"]) for r in ranked] == [("cmoe", "analytic"), ("random", "learned")]
    assert ranked[0]["geomean_ppl_ratio_max"] == pytest.approx(1.2 ** 0.5)
    table = report_table({"teacher_ppl_by_category": teacher, "rows": rows})
    assert table.count("\n") == 2 + len(rows) and "| 0.50 | cmoe | analytic | on | 2.40 | 4.80 | 3.60 | 1.200 | 1 |" in table
