"""The `tinyonn` torch.compile backend on CPU: it finds the MoE dispatch pattern, substitutes
`tinyonn::moe_experts` (forward and backward graphs), and the compiled layer matches eager."""

from __future__ import annotations

import logging

import torch
from torch import fx

from tinyonn import compile as tinyonn_compile
from tinyonn.model.moe_layer import MoELayer, moe_forward
from tinyonn.model.routing import RoutingConfig


def ops_in(graphs: list[fx.GraphModule]) -> set[str]:
    return {str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"}


def test_pattern_is_found_in_the_stateless_forward():
    layer = MoELayer(16, [3, 5, 0, 2], [0, 0, 1, 1], shared_size=2, routing=RoutingConfig(top_k=2))
    params, buffers = dict(layer.named_parameters()), dict(layer.named_buffers())
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(lambda x: moe_forward(params, buffers, x, layer.routing)[0], backend=capture)(torch.randn(4, 16))
    (gm,) = graphs
    (match,) = tinyonn_compile.find_moe_dispatch(gm.graph)
    assert tinyonn_compile.substitute_moe_experts(gm) == 1
    assert torch.ops.tinyonn.moe_experts.default in {n.target for n in gm.graph.nodes}
    assert not tinyonn_compile.find_moe_dispatch(gm.graph)  # the dense masked matmul is gone
    names = {field: getattr(match, field).name for field in ("w_gate", "w_up", "w_down", "unit_expert")}
    assert all(field in name for field, name in names.items()), names  # each operand in its place


def test_compiled_layer_matches_eager(caplog):
    torch.manual_seed(0)
    layer = MoELayer(32, [6, 0, 17, 1, 9], [0, 0, 1, 1, 1], shared_size=4,
                     routing=RoutingConfig(mode="topk", top_k=2))
    x = torch.randn(2, 7, 32, requires_grad=True)

    def run(fn):
        layer.zero_grad()
        x.grad = None
        y = fn(x)
        (y * y).sum().backward()
        return y.detach(), [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]

    expected, want = run(layer)
    for graphs in tinyonn_compile.compiled_graphs.values():
        graphs.clear()
    with caplog.at_level(logging.INFO, logger="tinyonn.compile"):
        actual, got = run(torch.compile(layer, backend="tinyonn"))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert "tinyonn.moe_experts.default" in ops_in(tinyonn_compile.compiled_graphs["forward"])
    assert "tinyonn.moe_experts_backward.default" in ops_in(tinyonn_compile.compiled_graphs["backward"])
    assert "1 MoE dispatch pattern" in caplog.text
    assert "runs its PyTorch reference path" in caplog.text  # no CUDA tensors here


def test_backend_is_registered_by_name():
    from torch._dynamo import lookup_backend

    assert lookup_backend("tinyonn") is tinyonn_compile.tinyonn_backend


def test_gradcheck_of_the_compiled_layer():
    """torch.autograd.gradcheck (float64) of a MoE layer compiled with the backend, with respect to
    the input and every expert weight (the router only selects: no straight-through path)."""
    torch.manual_seed(0)
    layer = MoELayer(8, [3, 5, 0, 2], [0, 0, 1, 1], shared_size=2,
                     routing=RoutingConfig(mode="topk", top_k=2, straight_through=False)).double()
    names = ["w_gate", "w_up", "w_down", "shared_gate", "shared_up", "shared_down"]
    params, buffers = dict(layer.named_parameters()), dict(layer.named_buffers())

    def layer_fn(x, *weights):
        return moe_forward({**params, **dict(zip(names, weights))}, buffers, x, layer.routing)[0]

    for graphs in tinyonn_compile.compiled_graphs.values():
        graphs.clear()
    compiled = torch.compile(layer_fn, backend="tinyonn")
    inputs = [torch.randn(6, 8, dtype=torch.float64, requires_grad=True)]
    inputs += [params[name].detach().clone().requires_grad_() for name in names]
    assert torch.autograd.gradcheck(compiled, inputs)
    assert any(node.target == torch.ops.tinyonn.moe_experts_backward.default
               for graph in tinyonn_compile.compiled_graphs["backward"] for node in graph.graph.nodes)


def test_compiled_graphs_keep_only_the_latest(monkeypatch):
    """`compiled_graphs` is bounded: after more compiles than `KEPT_GRAPHS`, the newest graphs remain."""
    monkeypatch.setattr(tinyonn_compile, "compile_fx_inner", lambda gm, example_inputs, **kwargs: gm)
    for graphs in tinyonn_compile.compiled_graphs.values():
        graphs.clear()
    made = [fx.GraphModule(torch.nn.Module(), fx.Graph()) for _ in range(tinyonn_compile.KEPT_GRAPHS + 5)]
    for gm in made:
        tinyonn_compile._inner_compile(gm, [], is_backward=True)
    assert list(tinyonn_compile.compiled_graphs["backward"]) == made[-tinyonn_compile.KEPT_GRAPHS:]
    assert not tinyonn_compile.compiled_graphs["forward"]
