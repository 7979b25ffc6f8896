"""Oracle routing, router warm-up and the extract evaluation helpers on the tiny Qwen3."""

from __future__ import annotations

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
