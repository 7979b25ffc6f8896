"""Ragged SwiGLU kernels and the `tinyonn::moe_experts` op vs their PyTorch references, on CPU
through the Triton interpreter, in fp32 (float64 for the gradient checks of the reference path)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run kernels on CPU

pytest.importorskip("triton")

from tinyonn.kernels import moe, reference
from tinyonn.kernels import ragged_swiglu as triton_swiglu
from tinyonn.kernels.reference import ROW_BLOCK

from tinyonn.model.moe_layer import MoELayer
from tinyonn.model.routing import RoutingConfig

# (tokens per expert, units per expert, d): empty experts (0 units), experts with 0 tokens, one-token
# experts, sizes that are not multiples of any block, more than one row tile per expert
CASES = [
    ([5, 0, 1, 14, 13, 7], [7, 0, 18, 1, 0, 19], 32),
    ([0, 3, 1, 36], [4, 0, 33, 17], 32),
    ([1, 0, 9, 22, 8], [0, 5, 16, 40, 3], 20),
    ([130, 6, 0, 11], [9, 135, 12, 0], 48),
]


def make_case(token_sizes: list[int], unit_sizes: list[int], d: int, seed: int = 0):
    """Dispatched rows (each expert's segment padded with zero rows, one unowned tile at the end),
    segment offsets, weights [U, d], unit offsets and the largest expert's size."""
    gen = torch.Generator().manual_seed(seed)
    padded = [-(-t // ROW_BLOCK) * ROW_BLOCK for t in token_sizes]
    segments = torch.tensor([0] + padded).cumsum(0)
    x = torch.zeros(int(segments[-1]) + ROW_BLOCK, d)
    for e, t in enumerate(token_sizes):
        x[segments[e]:segments[e] + t] = torch.randn(t, d, generator=gen)
    u = sum(unit_sizes)
    w_gate, w_up, w_down = (torch.randn(u, d, generator=gen) / d**0.5 for _ in range(3))
    dy = torch.randn(x.shape, generator=gen) * (x.abs().sum(1, keepdim=True) > 0)  # 0 on padding rows
    return x, segments, w_gate, w_up, w_down, torch.tensor([0] + unit_sizes).cumsum(0), max(unit_sizes), dy


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4):
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp_min(1e-6)
    assert (actual - expected).abs().max() <= rel * scale, (actual - expected).abs().max() / scale


@pytest.mark.parametrize("token_sizes, unit_sizes, d", CASES)
def test_triton_forward_matches_reference(token_sizes, unit_sizes, d):
    *args, _ = make_case(token_sizes, unit_sizes, d)
    expected = reference.ragged_swiglu(*args)
    actual, saved = triton_swiglu.ragged_swiglu(*args, save=True)
    assert_rel_close(actual, expected)
    assert len(saved) == 3 and reference.ragged_swiglu(*args, save=True)[1] is None
    segments = args[1].tolist()
    for e in range(len(unit_sizes)):
        if unit_sizes[e] == 0:  # an expert without units outputs zeros
            assert (actual[segments[e]:segments[e + 1]] == 0).all()
    assert (actual[segments[-1]:] == 0).all()  # rows no expert owns


@pytest.mark.parametrize("token_sizes, unit_sizes, d", CASES)
def test_triton_backward_matches_reference(token_sizes, unit_sizes, d):
    *args, dy = make_case(token_sizes, unit_sizes, d)
    expected = reference.ragged_swiglu_backward(dy, *args)
    _, saved = triton_swiglu.ragged_swiglu(*args, save=True)
    for grads in (triton_swiglu.ragged_swiglu_backward(dy, *args, saved),
                  triton_swiglu.ragged_swiglu_backward(dy, *args)):  # saved activations or recomputed
        for name, got, want in zip(expected._fields, grads, expected):
            assert_rel_close(got, want, 2e-4 if name == "expert_sq_norm" else 1e-4)


@pytest.mark.parametrize("token_sizes, unit_sizes, d", CASES[:3])
def test_reference_backward_matches_autograd(token_sizes, unit_sizes, d):
    x, segments, w_gate, w_up, w_down, unit_offsets, max_units, dy = make_case(token_sizes, unit_sizes, d)
    leaves = [t.double().requires_grad_() for t in (x, w_gate, w_up, w_down)]
    reference.ragged_swiglu(leaves[0], segments, *leaves[1:], unit_offsets, max_units).backward(dy.double())
    explicit = reference.ragged_swiglu_backward(dy.double(), *(t.detach() for t in leaves[:1]), segments,
                                                *(t.detach() for t in leaves[1:]), unit_offsets, max_units)
    for got, leaf in zip(explicit, leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-10, atol=1e-12)
    norms = reference.expert_grad_norms(*explicit[1:4], unit_offsets)
    torch.testing.assert_close(explicit.expert_sq_norm, norms**2)
    bounds = unit_offsets.tolist()
    for e in range(len(unit_sizes)):
        rows = slice(bounds[e], bounds[e + 1])
        flat = torch.cat([explicit[i][rows].flatten() for i in (1, 2, 3)])
        torch.testing.assert_close(norms[e], flat.norm().float())
        if unit_sizes[e] == 0 or token_sizes[e] == 0:
            assert norms[e] == 0


def test_bad_layout_is_rejected():
    x, segments, w_gate, w_up, w_down, unit_offsets, max_units, _ = make_case([3, 2], [4, 5], 32)
    with pytest.raises(ValueError, match="multiple of 128"):
        triton_swiglu.ragged_swiglu(x[:-1], segments, w_gate, w_up, w_down, unit_offsets, max_units)
    with pytest.raises(ValueError, match=r"\[U, d\]"):
        triton_swiglu.ragged_swiglu(x, segments, w_gate, w_up, w_down.T, unit_offsets, max_units)


# ---------------------------------------------------------------- the whole op


def make_layer(d: int = 32, shared: int = 0, top_k: int = 2) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(d, [6, 0, 17, 1, 9, 12], [0, 0, 1, 1, 1, 2], shared_size=shared,
                     routing=RoutingConfig(mode="topk", top_k=top_k))
    with torch.no_grad():
        for param in (layer.w_gate, layer.w_up, layer.w_down):
            param.normal_(std=0.3)
    return layer


def dense_expert_part(layer: MoELayer, x: torch.Tensor, expert_weight: torch.Tensor) -> torch.Tensor:
    h = torch.nn.functional.silu(x @ layer.w_gate.T) * (x @ layer.w_up.T)
    return (h * expert_weight[:, layer.unit_expert]) @ layer.w_down


@pytest.mark.parametrize("triton_on_cpu", [False, True])
def test_moe_experts_op_equals_dense_masked(monkeypatch, triton_on_cpu):
    monkeypatch.setattr(moe, "TRITON_ON_CPU", triton_on_cpu)
    layer = make_layer()
    n, experts = 21, layer.num_experts
    gen = torch.Generator().manual_seed(3)
    mask = torch.zeros(n, experts).scatter_(1, torch.rand(n, experts, generator=gen).topk(3).indices, 1.0)
    mask[4] = 0  # a token with no expert
    weight = (mask * torch.rand(n, experts, generator=gen)).requires_grad_()
    x = torch.randn(n, 32, generator=gen, requires_grad=True)
    dy = torch.randn(n, 32, generator=gen)
    params = [layer.w_gate, layer.w_up, layer.w_down]
    expected = dense_expert_part(layer, x, weight)
    want = torch.autograd.grad(expected, [x, weight, *params], dy)
    actual = moe.moe_experts(x, weight, *params, layer.unit_expert)
    got = torch.autograd.grad(actual, [x, weight, *params], dy)
    assert_rel_close(actual, expected)
    assert_rel_close(got[0], want[0])
    assert_rel_close(got[1], want[1] * mask)  # zero weights report a zero gradient
    for g, w in zip(got[2:], want[2:]):
        assert_rel_close(g, w)


def test_moe_experts_gradcheck():
    """torch.autograd.gradcheck of the op (every weight nonzero, so the selection is locally fixed)."""
    layer = make_layer(d=8)
    gen = torch.Generator().manual_seed(1)
    n = 5
    inputs = [torch.randn(n, 8, generator=gen, dtype=torch.float64),
              torch.rand(n, layer.num_experts, generator=gen, dtype=torch.float64) + 0.1,
              *(p.detach().double() for p in (layer.w_gate, layer.w_up, layer.w_down))]
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *a: moe.moe_experts(*a, layer.unit_expert), inputs)
