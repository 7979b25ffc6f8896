"""Triton kernels vs their PyTorch references, on CPU through the Triton interpreter, in fp32."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run kernels on CPU

pytest.importorskip("triton")

from tinyonn.kernels import reference  # noqa: E402
from tinyonn.kernels import ragged_swiglu as triton_swiglu  # noqa: E402
from tinyonn.model import MoELayer  # noqa: E402
from tinyonn.routing import RoutingConfig  # noqa: E402

# (tokens per expert, units per expert, d, block): empty experts (0 units), experts with 0 tokens,
# one-token experts, sizes that are not multiples of the block
CASES = [
    ([5, 0, 1, 14, 13, 7], [7, 0, 18, 1, 0, 19], 32, 16),
    ([0, 3, 1, 36], [4, 0, 33, 17], 32, 16),
    ([1, 0, 9, 22, 8], [0, 5, 16, 40, 3], 20, 16),
    ([17, 6, 0, 11], [9, 35, 12, 0], 32, 32),
]


def offsets(sizes: list[int]) -> torch.Tensor:
    return torch.tensor([0] + sizes).cumsum(0)


def make_case(token_sizes, unit_sizes, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m, u = sum(token_sizes), sum(unit_sizes)
    x = torch.randn(m, d, generator=gen)
    w_gate, w_up = (torch.randn(u, d, generator=gen) / d ** 0.5 for _ in range(2))
    w_down = torch.randn(d, u, generator=gen) / max(u, 1) ** 0.5
    return x, offsets(token_sizes), w_gate, w_up, w_down, offsets(unit_sizes)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4):
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp_min(1e-6)
    assert (actual - expected).abs().max() <= rel * scale, (actual - expected).abs().max() / scale


@pytest.mark.parametrize("token_sizes, unit_sizes, d, block", CASES)
def test_triton_forward_matches_reference(token_sizes, unit_sizes, d, block):
    x, tok, w_gate, w_up, w_down, units = make_case(token_sizes, unit_sizes, d)
    expected = reference.ragged_swiglu(x, tok, w_gate, w_up, w_down, units)
    actual = triton_swiglu.ragged_swiglu(x, tok, w_gate, w_up, w_down, units, block=block)
    assert_rel_close(actual, expected)
    for e, (m0, m1) in enumerate(zip(tok[:-1].tolist(), tok[1:].tolist())):
        if unit_sizes[e] == 0:  # an expert without units outputs zeros
            assert (actual[m0:m1] == 0).all()


@pytest.mark.parametrize("token_sizes, unit_sizes, d, block", CASES)
def test_triton_backward_matches_reference(token_sizes, unit_sizes, d, block):
    x, tok, w_gate, w_up, w_down, units = make_case(token_sizes, unit_sizes, d)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    expected = reference.ragged_swiglu_backward(dy, x, tok, w_gate, w_up, w_down, units)
    leaves = [t.clone().requires_grad_() for t in (x, w_gate, w_up, w_down)]
    y = triton_swiglu.ragged_swiglu(leaves[0], tok, *leaves[1:], units, block=block)
    y.backward(dy)
    for leaf, want in zip(leaves, expected):
        assert_rel_close(leaf.grad, want)
    direct = triton_swiglu.ragged_swiglu_backward(dy, x, tok, w_gate, w_up, w_down, units, block=block)
    for got, want in zip(direct, expected):
        assert_rel_close(got, want)


@pytest.mark.parametrize("token_sizes, unit_sizes, d, block", CASES)
def test_reference_backward_matches_autograd(token_sizes, unit_sizes, d, block):
    x, tok, w_gate, w_up, w_down, units = make_case(token_sizes, unit_sizes, d)
    x, w_gate, w_up, w_down = (t.double().requires_grad_() for t in (x, w_gate, w_up, w_down))
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference.ragged_swiglu(x, tok, w_gate, w_up, w_down, units).backward(dy)
    explicit = reference.ragged_swiglu_backward(dy, x.detach(), tok, w_gate.detach(), w_up.detach(),
                                                w_down.detach(), units)
    for got, leaf in zip(explicit, (x, w_gate, w_up, w_down)):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-10, atol=1e-12)


def test_expert_grad_norms():
    token_sizes, unit_sizes = [5, 0, 4, 3], [3, 6, 0, 5]
    x, tok, w_gate, w_up, w_down, units = make_case(token_sizes, unit_sizes, 32)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    grads = reference.ragged_swiglu_backward(dy, x, tok, w_gate, w_up, w_down, units)
    norms = reference.expert_grad_norms(*grads[1:], units)
    bounds = units.tolist()
    for e in range(len(unit_sizes)):
        u0, u1 = bounds[e], bounds[e + 1]
        flat = torch.cat([grads[1][u0:u1].flatten(), grads[2][u0:u1].flatten(), grads[3][:, u0:u1].flatten()])
        torch.testing.assert_close(norms[e], flat.norm())
    assert norms[1] == 0 and norms[2] == 0  # no tokens; no units


def test_sort_by_expert_round_trip():
    gen = torch.Generator().manual_seed(0)
    n, k, num_experts = 23, 3, 6
    expert_ids = torch.rand(n, num_experts, generator=gen).topk(k, dim=1).indices  # [N, k]
    expert_ids[expert_ids == 4] = 2  # expert 4 gets no tokens
    flat = expert_ids.reshape(-1)
    order, tok = reference.sort_by_expert(flat, num_experts)
    assert tok.tolist() == [0] + torch.bincount(flat, minlength=num_experts).cumsum(0).tolist()
    sorted_ids = flat[order]
    for e in range(num_experts):
        block = order[tok[e]:tok[e + 1]]
        assert (sorted_ids[tok[e]:tok[e + 1]] == e).all()
        assert (block[1:] > block[:-1]).all()  # stable: (token, slot) order kept within an expert
    x = torch.randn(n, 8, generator=gen)
    x_sorted = x[order // k]
    back = torch.zeros(n * k, 8).index_copy_(0, order, x_sorted).reshape(n, k, 8)
    assert torch.equal(back, x[:, None].expand(n, k, 8))


@pytest.mark.parametrize("mode", ["all", "topk"])
def test_ragged_swiglu_equals_moe_forward(mode):
    torch.manual_seed(0)
    d, expert_sizes, n = 32, [6, 0, 17, 1, 9], 11
    layer = MoELayer(d, expert_sizes, [0, 0, 1, 1, 1], shared_size=0,
                     routing=RoutingConfig(mode="oracle-mask", straight_through=False))
    with torch.no_grad():
        for param in (layer.w_gate, layer.w_up, layer.w_down):
            param.normal_(std=0.3)
    x = torch.randn(n, d)
    if mode == "all":  # every token routed to every expert: Σ_e expert outputs = dense SwiGLU over all units
        mask = torch.ones(n, len(expert_sizes))
    else:
        mask = torch.zeros(n, len(expert_sizes)).scatter_(1, torch.rand(n, len(expert_sizes)).topk(2).indices, 1.0)
    layer.oracle_mask = mask
    with torch.no_grad():
        expected = layer(x)
    pairs = mask.nonzero()  # (token, expert), token-major
    order, tok = reference.sort_by_expert(pairs[:, 1], len(expert_sizes))
    token = pairs[order, 0]
    y_sorted = triton_swiglu.ragged_swiglu(x[token], tok, layer.w_gate.detach(), layer.w_up.detach(),
                                           layer.w_down.detach(), layer.expert_offsets, block=16)
    actual = torch.zeros_like(x).index_add_(0, token, y_sorted)
    assert_rel_close(actual, expected)
