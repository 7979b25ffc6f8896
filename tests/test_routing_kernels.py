"""Routing kernels vs their PyTorch references, on CPU through the Triton interpreter, in fp32."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run kernels on CPU

pytest.importorskip("triton")

from tinyonn.kernels import routing
from tinyonn.kernels import routing_reference as reference

from tinyonn.model.routing import hierarchical_scores, select


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, scale: float = 1e-6):
    """max |actual − expected| ≤ rel · max(|expected|.max(), scale)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if expected.numel():
        scale = expected.abs().max().clamp_min(scale)
        assert (actual - expected).abs().max() <= rel * scale, (actual - expected).abs().max() / scale


def assert_equal(actual: torch.Tensor, expected: torch.Tensor):
    assert actual.dtype == expected.dtype and torch.equal(actual, expected), (actual, expected)


def random_expert_ids(n: int, k: int, num_experts: int, seed: int = 0, unrouted: float = 0.2,
                      idle_expert: int | None = 1) -> torch.Tensor:
    """[N, k] int32 distinct experts per token, about `unrouted` of the slots -1, `idle_expert` never used."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, num_experts, generator=gen)
    if idle_expert is not None:
        scores[:, idle_expert] = -1.0
    ids = scores.topk(k, dim=1).indices.int()
    return ids.masked_fill(torch.rand(n, k, generator=gen) < unrouted, -1)


# ---------------------------------------------------------------- route_topk

# (N, expert_group, G, top_k, top_groups): groups without experts (1, 3, 5 in the third), one group,
# k = 1, k above the eligible experts (→ -1 slots) and above E, top_groups ≥ G, several token blocks
ROUTE_CASES = [
    (37, [0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 4], 5, 3, 0),
    (37, [0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 4], 5, 3, 2),
    (29, [0, 2, 2, 4, 0, 4, 4], 6, 2, 2),
    (20, [0, 0, 0, 0, 0], 1, 1, 0),
    (25, [0, 0, 1, 1, 2, 2, 3, 3, 4], 5, 4, 1),
    (9, [1, 0, 1], 2, 5, 0),
    (18, [0, 1, 1, 2, 0, 2], 3, 2, 3),
    (150, [3, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2], 4, 3, 2),
]


def make_logits(n: int, expert_group: list[int], num_groups: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    group_logits = 2 * torch.randn(n, num_groups, generator=gen)
    expert_logits = 2 * torch.randn(n, len(expert_group), generator=gen)
    return group_logits, expert_logits, torch.tensor(expert_group, dtype=torch.int64)


@pytest.mark.parametrize("n, expert_group, num_groups, top_k, top_groups", ROUTE_CASES)
def test_route_topk_matches_reference(n, expert_group, num_groups, top_k, top_groups):
    group_logits, expert_logits, groups = make_logits(n, expert_group, num_groups)
    scores, ids, probs = routing.route_topk(group_logits, expert_logits, groups, top_k, top_groups)
    ref_scores, ref_ids, ref_probs = reference.route_topk(group_logits, expert_logits, groups, top_k, top_groups)
    assert_rel_close(scores, ref_scores)
    assert_equal(ids, ref_ids)
    assert_rel_close(probs, ref_probs)
    assert (probs[ids < 0] == 0).all() and not probs.requires_grad


@pytest.mark.parametrize("n, expert_group, num_groups, top_k, top_groups", ROUTE_CASES)
def test_route_topk_reference_follows_select(n, expert_group, num_groups, top_k, top_groups):
    group_logits, expert_logits, groups = make_logits(n, expert_group, num_groups)
    scores, ids, probs = reference.route_topk(group_logits, expert_logits, groups, top_k, top_groups)
    assert torch.equal(scores, hierarchical_scores(group_logits, expert_logits, groups))
    mask = select(scores, top_k, groups, top_groups, num_groups=num_groups)
    slots = torch.where(ids >= 0, ids, mask.shape[1]).long()  # -1 → an extra column, dropped
    chosen = torch.zeros(n, mask.shape[1] + 1).scatter_(1, slots, 1.0)[:, :-1]
    assert torch.equal(chosen, mask)
    picked = torch.where(ids >= 0, scores.gather(1, ids.long().clamp_min(0)), -torch.inf)
    assert (picked[:, 1:] <= picked[:, :-1]).all()  # descending, -1 slots last
    torch.testing.assert_close(probs, torch.where(ids >= 0, picked.exp(), 0.0))


@pytest.mark.parametrize("n, expert_group, num_groups, top_k, top_groups", ROUTE_CASES[:4])
def test_route_topk_gradient_matches_autograd(n, expert_group, num_groups, top_k, top_groups):
    group_logits, expert_logits, groups = make_logits(n, expert_group, num_groups)
    d_scores = torch.randn(n, len(expert_group), generator=torch.Generator().manual_seed(1))
    leaves = [t.clone().requires_grad_() for t in (group_logits, expert_logits)]
    routing.route_topk(*leaves, groups, top_k, top_groups)[0].backward(d_scores)
    ref_leaves = [t.clone().requires_grad_() for t in (group_logits, expert_logits)]
    reference.route_topk(*ref_leaves, groups, top_k, top_groups)[0].backward(d_scores)
    for leaf, ref_leaf in zip(leaves, ref_leaves):  # relative to dscores: one group's gradient is ~0
        assert_rel_close(leaf.grad, ref_leaf.grad, scale=d_scores.abs().max())
    empty_groups = sorted(set(range(num_groups)) - set(expert_group))
    assert (leaves[0].grad[:, empty_groups] == 0).all()


def test_route_topk_ties_pick_lower_expert():
    gen = torch.Generator().manual_seed(0)
    expert_logits = torch.randint(0, 3, (40, 10), generator=gen).float()  # many exact ties
    groups = torch.tensor([0, 1] * 5)
    group_logits = torch.randn(40, 2, generator=gen)
    _, ids, _ = routing.route_topk(group_logits, expert_logits, groups, 4)
    assert_equal(ids, reference.route_topk(group_logits, expert_logits, groups, 4)[1])
    one_group = torch.zeros(10, dtype=torch.int64)  # equal logits → equal scores → ascending ids
    _, ids, _ = routing.route_topk(torch.zeros(3, 1), torch.zeros(3, 10), one_group, 4)
    assert ids.tolist() == [[0, 1, 2, 3]] * 3


def test_route_topk_no_tokens():
    groups = torch.tensor([0, 1, 1])
    scores, ids, probs = routing.route_topk(torch.zeros(0, 2), torch.zeros(0, 3), groups, 2, 1)
    assert scores.shape == (0, 3) and ids.shape == (0, 2) and probs.shape == (0, 2)
    assert ids.dtype == torch.int32 and scores.dtype == probs.dtype == torch.float32


# ---------------------------------------------------------------- dispatch_indices

# (N, k, E, block, unrouted fraction): k = 1, blocks larger than an expert's pairs, E not a power of
# two, all slots routed, no tokens, more pairs than one dispatch chunk
DISPATCH_CASES = [
    (37, 3, 7, 4, 0.2),
    (50, 1, 5, 16, 0.3),
    (64, 4, 12, 8, 0.0),
    (13, 2, 3, 1, 0.5),
    (0, 2, 4, 4, 0.0),
    (6000, 3, 6, 32, 0.1),
]


@pytest.mark.parametrize("n, k, num_experts, block, unrouted", DISPATCH_CASES)
def test_dispatch_indices_matches_reference(n, k, num_experts, block, unrouted):
    ids = random_expert_ids(n, k, num_experts, unrouted=unrouted)
    got = routing.dispatch_indices(ids, num_experts, block)
    want = reference.dispatch_indices(ids, num_experts, block)
    for field, actual, expected in zip(reference.Dispatch._fields, got, want):
        assert actual.dtype == torch.int32, field
        assert_equal(actual, expected)
    assert got.row_token.shape == (reference.dispatch_rows(n * k, num_experts, block),)


def test_dispatch_accepts_int64_ids():
    ids = random_expert_ids(21, 2, 5).long()
    for actual, expected in zip(routing.dispatch_indices(ids, 5, 4), reference.dispatch_indices(ids, 5, 4)):
        assert_equal(actual, expected)


@pytest.mark.parametrize("n, k, num_experts, block, unrouted", DISPATCH_CASES[:5])
def test_dispatch_reference_layout(n, k, num_experts, block, unrouted):
    ids = random_expert_ids(n, k, num_experts, unrouted=unrouted)
    rows = reference.dispatch_rows(n * k, num_experts, block)
    plan = reference.dispatch_indices(ids, num_experts, block)
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat[flat >= 0], minlength=num_experts)
    assert plan.counts.tolist() == counts.tolist()
    sizes = (plan.segment_offsets[1:] - plan.segment_offsets[:-1]).tolist()
    assert plan.segment_offsets[0] == 0 and sizes == [-(-c // block) * block for c in counts.tolist()]
    assert rows % block == 0 and plan.segment_offsets[-1] <= rows
    tiles = plan.tile_expert.tolist()
    for e in range(num_experts):
        start, end = plan.segment_offsets[e].item(), plan.segment_offsets[e + 1].item()
        pairs = (flat == e).nonzero().squeeze(1)  # ascending flat (token, slot) order
        used = start + len(pairs)
        assert plan.row_token[start:used].tolist() == (pairs // k).tolist()
        assert (plan.row_token[used:end] == -1).all()
        assert plan.slot_row.reshape(-1)[pairs].tolist() == list(range(start, used))
        assert tiles[start // block:end // block] == [e] * ((end - start) // block)
    past = plan.segment_offsets[-1].item()
    assert (plan.row_token[past:] == -1).all() and all(t == -1 for t in tiles[past // block:])
    assert torch.equal(plan.slot_row < 0, ids < 0)


# ---------------------------------------------------------------- gather / combine


def make_rows(n: int, k: int, num_experts: int, d: int, block: int = 4, seed: int = 0):
    """expert ids, their `Dispatch`, x [N, d], y_sorted [R, d], weights [N, k], dy [N, d]."""
    ids = random_expert_ids(n, k, num_experts, seed=seed)
    plan = reference.dispatch_indices(ids, num_experts, block)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, d, generator=gen)
    y_sorted = torch.randn(plan.row_token.shape[0], d, generator=gen)
    weights = torch.rand(n, k, generator=gen)
    return ids, plan, x, y_sorted, weights, torch.randn(n, d, generator=gen)


# (N, k, E, d): k = 1, d not a power of two and above one column block, no tokens
ROW_CASES = [(29, 3, 6, 20), (40, 1, 5, 48), (17, 4, 9, 7), (0, 2, 3, 8), (9, 2, 4, 130)]


@pytest.mark.parametrize("n, k, num_experts, d", ROW_CASES)
def test_gather_rows_matches_reference(n, k, num_experts, d):
    _, plan, x, *_ = make_rows(n, k, num_experts, d)
    x_sorted = routing.gather_rows(x, plan.row_token)
    assert_equal(x_sorted, reference.gather_rows(x, plan.row_token))
    assert (x_sorted[plan.row_token < 0] == 0).all()


@pytest.mark.parametrize("n, k, num_experts, d", ROW_CASES)
def test_gather_rows_gradient_is_combine_with_ones(n, k, num_experts, d):
    ids, plan, x, y_sorted, *_ = make_rows(n, k, num_experts, d)
    leaf = x.clone().requires_grad_()
    reference.gather_rows(leaf, plan.row_token).backward(y_sorted)
    ones = torch.ones(ids.shape)
    assert_rel_close(routing.combine_rows(y_sorted, plan.slot_row, ones), leaf.grad)


@pytest.mark.parametrize("n, k, num_experts, d", ROW_CASES)
def test_combine_rows_matches_reference(n, k, num_experts, d):
    _, plan, _, y_sorted, weights, _ = make_rows(n, k, num_experts, d)
    weights = weights.masked_fill(plan.slot_row < 0, torch.nan)  # -1 slots are skipped, weight unread
    expected = reference.combine_rows(y_sorted, plan.slot_row, weights)
    assert not expected.isnan().any()
    assert_rel_close(routing.combine_rows(y_sorted, plan.slot_row, weights), expected)


@pytest.mark.parametrize("n, k, num_experts, d", ROW_CASES)
def test_combine_rows_backward_matches_reference_and_autograd(n, k, num_experts, d):
    _, plan, _, y_sorted, weights, dy = make_rows(n, k, num_experts, d)
    dy_sorted, dweights = routing.combine_rows_backward(dy, y_sorted, plan.slot_row, weights)
    ref_dy_sorted, ref_dweights = reference.combine_rows_backward(dy, y_sorted, plan.slot_row, weights)
    assert_rel_close(dy_sorted, ref_dy_sorted)
    assert_rel_close(dweights, ref_dweights)
    unused = torch.ones(y_sorted.shape[0], dtype=torch.bool)
    unused[plan.slot_row[plan.slot_row >= 0].long()] = False
    assert (dy_sorted[unused] == 0).all() and (dweights[plan.slot_row < 0] == 0).all()

    leaves = [t.clone().requires_grad_() for t in (y_sorted, weights)]
    reference.combine_rows(leaves[0], plan.slot_row, leaves[1]).backward(dy)
    assert_rel_close(ref_dy_sorted, leaves[0].grad)
    assert_rel_close(ref_dweights, leaves[1].grad)


def test_route_dispatch_gather_combine_round_trip():
    """Experts that return their input: the combined output is Σ_j probs[n, j]·x[n]."""
    n, d, groups = 33, 12, torch.tensor([0, 0, 1, 1, 1, 2, 2])
    group_logits, expert_logits, _ = make_logits(n, groups.tolist(), 3)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(2))
    _, ids, probs = routing.route_topk(group_logits, expert_logits, groups, 3, top_groups=2)
    plan = routing.dispatch_indices(ids, len(groups), block=8)
    y = routing.combine_rows(routing.gather_rows(x, plan.row_token), plan.slot_row, probs)
    assert_rel_close(y, probs.sum(1, keepdim=True) * x)
