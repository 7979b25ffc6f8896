"""The TinyONN model: keeps the teacher's function with every unit and expert on, copies weights
bitwise, round-trips through save/from_pretrained, generates, routes sparsely with a router gradient."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tinyonn.model.assemble import assemble
from tinyonn.model.modeling import TinyONNConfig, TinyONNForCausalLM
from tinyonn.model.moe_layer import MoELayer, expert_mass, moe_forward, record_routing
from tinyonn.clustering.plan import ExpertPlan, LayerPlan, full_plan
from tinyonn.model.routing import RoutingConfig, budget_mask
from tinyonn.teacher import ffn_layout, load_teacher

ALL = RoutingConfig(mode="all")


def sparse_plan(num_layers: int = 2, width: int = 128, seed: int = 0) -> ExpertPlan:
    """Per layer: 16 shared units, 5 experts (sizes 8..24) in 2 groups, 28 units dropped."""
    rng = np.random.default_rng(seed)
    layers = []
    for layer in range(num_layers):
        order = rng.permutation(width)
        sizes = np.array([8, 24, 16, 20, 16])
        layers.append(LayerPlan(layer=layer, units=order[16:16 + sizes.sum()], shared_units=order[:16],
                                expert_offsets=np.concatenate([[0], sizes.cumsum()]),
                                expert_group=np.array([0, 1, 0, 1, 1]), expert_cell=np.arange(5)))
    return ExpertPlan(layers=tuple(layers), method="test", intermediate_size=width)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_teacher(tiny_teacher_dir)[0]


@pytest.fixture(scope="module")
def full_model(teacher):
    return assemble(teacher, full_plan(2, 128, 8, groups=3, seed=0), ALL)


def ids(vocab: int, shape=(2, 12), seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_all_experts_reproduce_the_tiny_teacher(teacher, full_model):
    tokens = ids(200)
    with torch.no_grad():
        reference = teacher(tokens).logits
        logits = full_model(tokens).logits
    assert (logits - reference).abs().max() <= 1e-4
    layer = full_model.moe_layers()[0]
    assert layer.num_experts == 8 and layer.router.num_groups == 3 and layer.w_gate.shape == (128, 64)
    with torch.no_grad():
        routed = full_model(tokens, output_router_logits=True).router_outputs
    assert len(routed) == 2 and routed[0].mask.shape == (24, 8) and (routed[0].mask == 1).all()


def test_all_experts_reproduce_the_builtin_teacher():
    teacher, tokenizer = load_teacher("builtin")
    model = assemble(teacher, full_plan(8, 1536, 16, groups=4, seed=1), ALL)
    assert sum(layer.w_gate.shape[0] for layer in model.moe_layers()) == 12288
    tokens = tokenizer("The harbour is a sheltered port where ships can stay.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (model(tokens).logits - teacher(tokens).logits).abs().max() <= 1e-4


def test_bf16_teacher_weights_are_copied_bitwise(tiny_teacher_dir):
    teacher, _ = load_teacher(tiny_teacher_dir, dtype=torch.bfloat16)
    plan = sparse_plan()
    model = assemble(teacher, plan, RoutingConfig(top_k=2))
    assert model.dtype == torch.bfloat16
    for layer, layer_plan, ffn in zip(model.moe_layers(), plan.layers, ffn_layout(teacher)):
        gate, up, down = ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight
        for expert in range(layer_plan.num_experts):
            units = torch.as_tensor(layer_plan.expert_units(expert))
            start, end = layer.expert_offsets[expert], layer.expert_offsets[expert + 1]
            assert torch.equal(layer.w_gate[start:end], gate[units])
            assert torch.equal(layer.w_up[start:end], up[units])
            assert torch.equal(layer.w_down[start:end], down[:, units].T)
            assert (layer.unit_expert[start:end] == expert).all()
        shared = torch.as_tensor(layer_plan.shared_units)
        assert torch.equal(layer.shared_gate, gate[shared]) and torch.equal(layer.shared_down, down[:, shared])
    mine = dict(model.backbone.named_parameters())
    for name, value in teacher.named_parameters():
        if ".mlp." not in name:
            assert torch.equal(mine[name], value), name
    assert model.backbone.lm_head.weight is model.backbone.model.embed_tokens.weight


def test_save_and_load_round_trip(teacher, tmp_path):
    model = assemble(teacher, sparse_plan(), RoutingConfig(mode="topk", top_k=2, top_groups=1), seed=3)
    tokens = ids(200)
    with torch.no_grad():
        reference = model(tokens).logits
    model.save_pretrained(tmp_path)
    for loader in (TinyONNForCausalLM, AutoModelForCausalLM):
        loaded = loader.from_pretrained(tmp_path)
        assert isinstance(loaded, TinyONNForCausalLM) and isinstance(loaded.config, TinyONNConfig)
        assert loaded.routing == (RoutingConfig(mode="topk", top_k=2, top_groups=1),) * 2
        assert loaded.config.expert_sizes == model.config.expert_sizes
        assert loaded.config.teacher_model_type == "qwen3"
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
        with torch.no_grad():
            assert torch.equal(loaded(tokens).logits, reference)


def test_routing_is_explicit_state_saved_and_reloaded(teacher, tmp_path):
    """Per-layer routing changes only through set_routing / routing_scope, is written to the config,
    and a save → reload gives the same routing and the same logits."""
    model = assemble(teacher, sparse_plan(), RoutingConfig(mode="topk", top_k=2), seed=1)
    tokens = ids(200)
    per_layer = [RoutingConfig(mode="budget", unit_budget=0.4), RoutingConfig(mode="topk", top_k=3)]
    with torch.no_grad():
        before = model(tokens).logits
        with model.routing_scope(RoutingConfig(mode="all")):
            assert all(layer.routing.mode == "all" for layer in model.moe_layers())
            assert not torch.equal(model(tokens).logits, before)
        assert model.routing == (RoutingConfig(mode="topk", top_k=2),) * 2  # restored
        assert torch.equal(model(tokens).logits, before)
        model.set_routing(per_layer)
        routed = model(tokens).logits
        masks = model(tokens, output_router_logits=True).router_outputs
    assert model.config.routing == [dataclasses.asdict(r) for r in per_layer]
    assert [layer.routing for layer in model.moe_layers()] == per_layer
    assert bool(((masks[0].mask * model.moe_layers()[0].expert_sizes).sum(1) <= 33).all())  # 0.4 of 84 units
    assert (masks[1].mask.sum(1) == 3).all()
    model.save_pretrained(tmp_path)
    loaded = TinyONNForCausalLM.from_pretrained(tmp_path)
    assert loaded.routing == tuple(per_layer)
    assert [layer.routing for layer in loaded.moe_layers()] == per_layer
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, routed)
    with pytest.raises(ValueError, match="router architecture"):
        model.set_routing(RoutingConfig(router="mlp"))
    with pytest.raises(ValueError, match="one RoutingConfig per layer"):
        model.set_routing(per_layer[:1])


def test_generate_with_all_experts_matches_the_teacher(teacher, full_model):
    prompt = ids(200, (2, 6), seed=1)
    settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    expected = teacher.generate(prompt, **settings)
    produced = full_model.generate(prompt, **settings)
    assert produced.shape[1] > prompt.shape[1]
    assert torch.equal(produced, expected)


def test_sparse_routing_changes_output_and_trains_the_router(teacher):
    model = assemble(teacher, sparse_plan(), RoutingConfig(mode="topk", top_k=2))
    tokens = ids(200)
    with torch.no_grad():
        assert (model(tokens).logits - teacher(tokens).logits).abs().max() > 1e-2
    model.train()
    out = model(tokens, labels=tokens, output_router_logits=True)
    out.loss.backward()
    for layer, routed in zip(model.moe_layers(), out.router_outputs):
        assert layer.router.main.grad.abs().sum() > 0 and layer.router.sub.grad.abs().sum() > 0
        picked = routed.mask.sum(0) > 0  # experts chosen by some token
        for expert in range(layer.num_experts):
            rows = layer.w_gate.grad[layer.expert_offsets[expert]:layer.expert_offsets[expert + 1]]
            assert (rows.abs().sum() > 0) == bool(picked[expert])
    model.zero_grad()
    model.set_routing(RoutingConfig(mode="topk", top_k=2, straight_through=False))
    model(tokens, labels=tokens).loss.backward()
    assert all(layer.router.main.grad is None or layer.router.main.grad.abs().sum() == 0
               for layer in model.moe_layers())


def test_given_mask_and_oracle_routing(teacher):
    plan = sparse_plan()
    model = assemble(teacher, plan, RoutingConfig(mode="topk", top_k=2))
    layer: MoELayer = model.moe_layers()[1]
    ffn = ffn_layout(teacher)[1]
    x = torch.randn(3, 4, 64)

    def teacher_units(units):
        units = torch.as_tensor(units)
        return F.linear(F.silu(F.linear(x, ffn.gate_proj.weight[units])) * F.linear(x, ffn.up_proj.weight[units]),
                        ffn.down_proj.weight[:, units])

    shared_only = teacher_units(plan.layers[1].shared_units)
    mask = torch.zeros(12, 5)
    with torch.no_grad():
        assert torch.allclose(layer(x, mask=mask), shared_only, atol=1e-6)
        mask[:, 3] = 1
        expected = shared_only + teacher_units(plan.layers[1].expert_units(3))
        assert torch.allclose(layer(x, mask=mask), expected, atol=1e-5)
        # oracle: the experts of largest true mass Σ|h|·‖w_down‖ within the budget (42 of 84 units)
        model.set_routing(RoutingConfig(mode="oracle", unit_budget=0.5))
        with record_routing([layer]) as routed:
            layer(x)
        h = layer.dense_h(x.reshape(-1, 64))
        mass = expert_mass(h, layer.w_down, layer.unit_expert, 5)
        assert torch.equal(routed[0][0].mask, budget_mask(mass.log(), layer.expert_sizes, 42))
        assert torch.equal(routed[0][0].mask.sum(1) > 0, torch.ones(12, dtype=torch.bool))


def test_moe_forward_is_stateless(full_model):
    layer = full_model.moe_layers()[0]
    x = torch.randn(5, 64)
    params = {name: value.detach().clone() for name, value in layer.named_parameters()}
    buffers = dict(layer.named_buffers())
    y, out = moe_forward(params, buffers, x, RoutingConfig(mode="topk", top_k=3))
    assert (out.mask.sum(-1) == 3).all()
    params["w_down"] = params["w_down"] * 2
    doubled = torch.func.functional_call(layer, (params, buffers), (x,))
    with torch.no_grad():
        assert torch.allclose(doubled, 2 * layer(x), atol=1e-5)


def test_model_compiled_with_tinyonn_matches_eager(teacher):
    """A whole TinyONN model under torch.compile(backend="tinyonn"): every layer's dispatch pattern
    becomes `tinyonn::moe_experts`, and loss, logits and every gradient equal eager."""
    from tinyonn import compile as tinyonn_compile

    model = assemble(teacher, sparse_plan(), RoutingConfig(mode="topk", top_k=2), seed=1).float()
    tokens = ids(200)

    def run(fn):
        model.zero_grad()
        out = fn(tokens, labels=tokens)
        out.loss.backward()
        return out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                                     if p.grad is not None}

    logits, grads = run(model)
    for graphs in tinyonn_compile.compiled_graphs.values():
        graphs.clear()
    compiled_logits, compiled_grads = run(torch.compile(model, backend="tinyonn"))
    torch.testing.assert_close(compiled_logits, logits, rtol=1e-4, atol=1e-4)
    assert compiled_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    calls = [node for graph in tinyonn_compile.compiled_graphs["forward"] for node in graph.graph.nodes
             if node.target == torch.ops.tinyonn.moe_experts.default]
    assert len(calls) == len(model.moe_layers())


# ---------------------------------------------------------------- training-free routing state


@pytest.fixture(scope="module")
def calibration(teacher, tiny_tokenizer):
    from tinyonn.clustering import Calibration, CalibrationConfig
    from tinyonn.data import load_probe_set

    return Calibration.collect(teacher, tiny_tokenizer, load_probe_set("builtin", "train")[::500],
                               CalibrationConfig(max_tokens=600))


def analytic_model(teacher, calibration, plan=None, routing=RoutingConfig(mode="all", router="analytic")):
    from tinyonn.model.calibrate import init_analytic_router

    model = assemble(teacher, plan or full_plan(2, 128, 8, groups=3, seed=0), routing)
    init_analytic_router(model, calibration)
    return model


def test_analytic_router_with_every_expert_reproduces_the_teacher(teacher, calibration):
    from tinyonn.model.calibrate import calibrate_compensation

    model = analytic_model(teacher, calibration)
    tokens = ids(200)
    with torch.no_grad():
        expected = teacher(tokens).logits
        assert (model(tokens).logits - expected).abs().max() < 1e-4
        # compensation is computed (non-zero for sparse routing) but a token routed to every expert gets none
        with model.routing_scope(RoutingConfig(mode="topk", top_k=2, router="analytic")):
            calibrate_compensation(model, calibration)
        assert all(layer.compensation.abs().sum() > 0 for layer in model.moe_layers())
        with model.routing_scope(RoutingConfig(mode="all", router="analytic", compensate=True)):
            assert (model(tokens).logits - expected).abs().max() < 1e-4


def test_analytic_router_scores_by_representative_units(teacher, calibration):
    from tinyonn.clustering.cmoe import firing, representatives

    model = analytic_model(teacher, calibration)
    layer = model.moe_layers()[0]
    x = calibration.inputs[0]
    h = torch.cat([layer.dense_h(x), torch.zeros(len(x), 0)], dim=1)
    rep = representatives(firing(h, round(0.1 * 128)), layer.unit_expert, layer.num_experts)
    assert torch.equal(layer.router.rep_gate, layer.w_gate[rep]) and torch.equal(layer.router.rep_up, layer.w_up[rep])
    assert all(int(layer.unit_expert[r]) == e for e, r in enumerate(rep.tolist()))  # each its own expert's
    with torch.no_grad():
        expected = (F.silu(x @ layer.w_gate[rep].T) * (x @ layer.w_up[rep].T)).abs().log_softmax(-1)
        assert torch.allclose(layer.router.scores(x), expected, atol=1e-5)
    assert (layer.router.expert_group == 0).all()  # one flat softmax over the experts


def test_compensation_adds_each_unrouted_experts_mean_output(teacher, calibration):
    from tinyonn.model.calibrate import calibrate_compensation

    routing = RoutingConfig(mode="topk", top_k=3, router="analytic")
    model = analytic_model(teacher, calibration, sparse_plan(), routing)
    layer = model.moe_layers()[1]
    with torch.no_grad():
        calibrate_compensation(model, calibration)
        x = calibration.inputs[1]
        mask = layer.select(x).mask
        h = layer.dense_h(x)
        for e in range(layer.num_experts):
            a, b = layer.expert_offsets[e], layer.expert_offsets[e + 1]
            unused = mask[:, e] == 0
            expected = (h[unused, a:b] @ layer.w_down[a:b]).mean(0)
            assert torch.allclose(layer.compensation[e], expected, atol=1e-5)
        tokens = torch.randn(7, 64)
        plain = layer(tokens)
        model.set_routing(dataclasses.replace(routing, compensate=True))
        compensated = layer(tokens)
        assert torch.allclose(compensated - plain, (1 - layer.select(tokens).mask) @ layer.compensation, atol=1e-5)


def test_bias_balancing_evens_the_load_and_state_round_trips(teacher, calibration, tmp_path):
    from tinyonn.model.calibrate import AnalyticConfig, balance_router_bias, calibrate_compensation

    routing = RoutingConfig(mode="topk", top_k=2, router="analytic", compensate=True)
    model = analytic_model(teacher, calibration, routing=routing)
    report = balance_router_bias(model, calibration, AnalyticConfig(balance_steps=200))
    for layer_report in report:
        assert layer_report["load_max_over_mean"] < layer_report["load_max_over_mean_before"]
        assert layer_report["load_max_over_mean"] < 1.6
    calibrate_compensation(model, calibration)
    tokens = ids(200)
    with torch.no_grad():
        reference = model(tokens).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.routing == (routing,) * 2
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, reference)
