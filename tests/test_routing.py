"""Routing: top-k, budget and group masks, dynamic k, normalised hierarchical scores."""

from __future__ import annotations

import math

import pytest
import torch

from tinyonn.model.routing import (
    HierarchicalRouter,
    RoutingConfig,
    budget_mask,
    group_logsumexp,
    group_mask,
    hierarchical_scores,
    select,
    topk_mask,
)

NEG = -math.inf


def test_topk_mask_on_hand_made_scores():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9],
                           [2.0, -1.0, 0.0, 1.0],
                           [0.0, 0.0, 0.0, 0.0]])
    assert topk_mask(scores, 2).tolist() == [[0, 1, 0, 1], [1, 0, 0, 1], [1, 1, 0, 0]]  # ties: lowest index first
    assert topk_mask(scores, 1).tolist() == [[0, 0, 0, 1], [1, 0, 0, 0], [1, 0, 0, 0]]
    assert topk_mask(scores, 9).sum().item() == 12
    excluded = torch.tensor([[NEG, 0.5, NEG, 0.9]])
    assert topk_mask(excluded, 3).tolist() == [[0, 1, 0, 1]]  # −inf experts are never picked


def test_dynamic_per_token_k():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9],
                           [2.0, -1.0, 0.0, 1.0],
                           [0.4, 0.3, 0.2, 0.1]])
    mask = topk_mask(scores, torch.tensor([1, 3, 0]))
    assert mask.tolist() == [[0, 0, 0, 1], [1, 0, 1, 1], [0, 0, 0, 0]]
    ks = torch.tensor([1, 2, 4])
    assert select(scores, ks, torch.tensor([0, 0, 1, 1])).sum(-1).tolist() == [1, 2, 4]


def test_budget_mask_on_hand_made_scores():
    sizes = torch.tensor([4, 2, 3, 1])
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6],    # 4, then 4+2=6 ≤ 6, then 9 > 6: stop
                           [0.1, 0.2, 0.3, 0.4],    # 1, 4, 6 ≤ 6, then 10: stop
                           [0.9, 0.1, 0.2, 0.3]])   # 4 alone > 3.5 but at least one expert
    budgets = torch.tensor([6.0, 6.0, 3.5])
    assert budget_mask(scores, sizes, budgets).tolist() == [[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]]
    assert budget_mask(scores[:1], sizes, 100.0).tolist() == [[1, 1, 1, 1]]
    assert budget_mask(torch.tensor([[NEG, 0.5, 0.1, NEG]]), sizes, 100.0).tolist() == [[0, 1, 1, 0]]


def test_budget_never_exceeds_the_budget_and_picks_at_least_one():
    generator = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 40, (24,), generator=generator)
    scores = torch.randn(500, 24, generator=generator).log_softmax(-1)
    budgets = torch.rand(500, generator=generator) * sizes.sum()
    mask = budget_mask(scores, sizes, budgets)
    units = (mask * sizes).sum(-1)
    count = mask.sum(-1)
    assert (count >= 1).all()
    assert ((units <= budgets) | (count == 1)).all()
    # what is taken is a prefix of the score order: every selected expert outscores every other
    worst_taken = scores.masked_fill(mask == 0, math.inf).amin(-1)
    best_left = scores.masked_fill(mask == 1, NEG).amax(-1)
    assert (worst_taken >= best_left).all()
    # the next expert in order would have broken the budget
    next_size = sizes[scores.masked_fill(mask == 1, NEG).argmax(-1)]
    not_all = count < 24
    assert (units[not_all] + next_size[not_all] > budgets[not_all]).all()


def test_group_mask_and_group_restricted_selection():
    group_scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4]])
    expert_group = torch.tensor([0, 0, 1, 2, 2])
    assert group_mask(group_scores, expert_group, 1).tolist() == [[False, False, True, False, False],
                                                                  [True, True, False, False, False]]
    assert group_mask(group_scores, expert_group, 2).tolist() == [[False, False, True, True, True],
                                                                  [True, True, False, True, True]]
    assert group_mask(group_scores, expert_group, 0).all()
    # best single expert (0.35) sits in group 1, but group 0 holds more probability (0.6)
    scores = torch.tensor([[0.3, 0.3, 0.35, 0.05]]).log()
    groups = torch.tensor([0, 0, 1, 1])
    assert select(scores, 1, groups).tolist() == [[0, 0, 1, 0]]
    assert select(scores, 1, groups, top_groups=1).tolist() == [[1, 0, 0, 0]]
    assert select(scores, 3, groups, top_groups=1).tolist() == [[1, 1, 0, 0]]
    sizes = torch.tensor([5, 5, 1, 1])
    assert select(scores, 100.0, groups, top_groups=1, expert_sizes=sizes).tolist() == [[1, 1, 0, 0]]


def test_hierarchical_scores_are_normalised_log_probs():
    generator = torch.Generator().manual_seed(1)
    expert_group = torch.tensor([0, 2, 2, 0, 2, 3])  # group 1 has no experts
    group_logits = torch.randn(7, 4, generator=generator, requires_grad=True)
    expert_logits = (5 * torch.randn(7, 6, generator=generator)).requires_grad_()
    scores = hierarchical_scores(group_logits, expert_logits, expert_group)
    assert torch.allclose(scores.logsumexp(-1), torch.zeros(7), atol=1e-5)
    # group marginals = softmax over the populated groups; within a group, softmax of its experts
    group_probs = group_logsumexp(scores, expert_group, 4).exp()
    expected = group_logits.detach()[:, [0, 2, 3]].softmax(-1)
    assert torch.allclose(group_probs[:, [0, 2, 3]], expected, atol=1e-5)
    assert (group_probs[:, 1] == 0).all()
    within = (scores - scores[:, [0, 3]].logsumexp(-1, keepdim=True))[:, [0, 3]]
    assert torch.allclose(within, expert_logits.detach()[:, [0, 3]].log_softmax(-1), atol=1e-5)
    scores[:, 2].sum().backward()
    assert torch.isfinite(group_logits.grad).all() and torch.isfinite(expert_logits.grad).all()
    assert group_logits.grad[:, 1].abs().max() == 0


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_router_modes(kind):
    torch.manual_seed(0)
    expert_group = [0, 0, 1, 1, 1, 2]
    sizes = torch.tensor([3, 5, 2, 8, 4, 6])
    x = torch.randn(11, 16)
    router = HierarchicalRouter(16, expert_group, kind, hidden=12)
    router.reset_parameters(torch.Generator().manual_seed(3), std=0.5)
    out = router(x, RoutingConfig())
    assert out.scores.shape == out.mask.shape == (11, 6)
    assert torch.allclose(out.scores.logsumexp(-1), torch.zeros(11), atol=1e-5)
    assert (out.mask.sum(-1) == 2).all()  # default top_k=2
    assert torch.equal(out.mask, topk_mask(out.scores, 2))
    assert (router(x, RoutingConfig(mode="all")).mask == 1).all()
    mask = router(x, RoutingConfig(mode="budget", unit_budget=0.3), expert_sizes=sizes).mask
    assert ((mask * sizes).sum(-1) <= 0.3 * 28).all() and (mask.sum(-1) >= 1).all()
    mask = router(x, RoutingConfig(mode="topk", top_k=2, top_groups=1)).mask
    picked_groups = [{expert_group[e] for e in row.nonzero().flatten().tolist()} for row in mask]
    assert all(len(groups) == 1 for groups in picked_groups)
    # dynamic: the fewest best experts reaching top_p, clamped to [k_min, k_max]
    dynamic = RoutingConfig(mode="dynamic", top_p=0.6, k_min=2, k_max=4)
    out = router(x, dynamic)
    probs = out.scores.exp().sort(-1, descending=True).values
    for row, k in zip(probs, out.mask.sum(-1).long().tolist()):
        reach = int((row.cumsum(0) - row < 0.6).sum())
        assert k == min(max(reach, 2), 4)
    # oracle: experts by the given mass within the budget; the router still scores
    mass = torch.rand(11, 6)
    out = router(x, RoutingConfig(mode="oracle", unit_budget=0.5), expert_sizes=sizes, oracle_scores=mass.log())
    assert torch.equal(out.mask, budget_mask(mass.log(), sizes, 14))
    with pytest.raises(ValueError, match="oracle_scores"):
        router(x, RoutingConfig(mode="oracle"), expert_sizes=sizes)
    given = torch.zeros(11, 6)
    given[:, 4] = 1
    assert torch.equal(router(x, RoutingConfig(), mask=given).mask, given)


def test_router_init_is_seeded_and_config_validated():
    a = HierarchicalRouter(16, [0, 1, 1])
    b = HierarchicalRouter(16, [0, 1, 1])
    a.reset_parameters(torch.Generator().manual_seed(7))
    b.reset_parameters(torch.Generator().manual_seed(7))
    assert torch.equal(a.main, b.main) and torch.equal(a.sub, b.sub)
    assert a.main.shape == (2, 16) and a.sub.shape == (3, 16) and 0 < a.sub.std() < 0.05
    analytic = HierarchicalRouter(16, [0, 1, 1], "analytic")  # one flat softmax; bias and linear part start at 0
    assert analytic.num_groups == 1 and analytic.expert_group.tolist() == [0, 0, 0]
    assert all(getattr(analytic, name).abs().sum() == 0 for name in ("main", "sub", "bias"))
    x = torch.randn(5, 16)
    rep = (torch.nn.functional.silu(x @ analytic.rep_gate.T) * (x @ analytic.rep_up.T)).abs()
    assert torch.allclose(analytic.scores(x), rep.log_softmax(-1), atol=1e-5)
    for bad in (dict(mode="sometimes"), dict(router="tree"), dict(top_k=0), dict(unit_budget=0.0),
                dict(k_min=3, k_max=2), dict(top_p=0.0)):
        with pytest.raises(ValueError):
            RoutingConfig(**bad)
