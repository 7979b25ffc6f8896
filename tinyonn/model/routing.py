"""Hierarchical routing: a main router scores groups, sub-routers score experts inside them.

Per token, an expert's score is the log-probability `log P(group) + log P(expert | group)`: the main
router's softmax over the layer's groups times the sub-router's softmax over the experts of that
group, so `scores.exp()` sums to 1 over the experts. Selection turns scores into a 0/1 mask:

- "topk":   the `top_k` best experts per token (per-token k allowed, see `select`);
- "budget": experts in descending score order while their units stay within `unit_budget` of the
            layer's routed units (at least one expert);
- "dynamic": per token, the fewest best experts whose probability sums to `top_p`, at least
            `k_min` and at most `k_max` (SMK's adaptive top-k);
- "all":    every expert (with every unit kept, the MoE layer is then the teacher's MLP);
- "oracle": experts in descending order of their true activation mass in the layer's own dense
            computation, within `unit_budget` (the best any router could do for the partition);
            the router still scores, so a loss can train it.
A caller may also pass an explicit `mask` to `route` (functional use, tests).

With `top_groups > 0` only experts of the token's best `top_groups` groups can be selected.

Router kinds: "linear" (x → logits), "mlp" (x → silu(x·W_hidden) → logits), and "analytic", which
needs no training: each expert is scored by its representative teacher unit,
|silu(x·g_rep)·(x·u_rep)|, plus a per-expert `bias` (set by a load-balancing calibration, no
auxiliary loss) plus a linear term `sub` that starts at 0 (so warm-up can start from it). The
analytic router scores the experts flat: it has one group, and its scores are a softmax over all
experts (`tinyonn.model.calibrate` sets its units and bias).

`RoutingConfig.compensate` adds, for every expert a token does not use, that expert's mean output
(the MoE layer's `compensation` buffer, set by `tinyonn.model.calibrate`).
Everything is a pure function of tensors; `HierarchicalRouter` only holds the weights, and
`route(params, buffers, x, config)` is the stateless forward that `tinyonn.model.moe_layer` calls.
Which routing a model uses is explicit state of the model (`TinyONNForCausalLM.set_routing`): one
`RoutingConfig` per layer, saved in its config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("topk", "budget", "dynamic", "all", "oracle")
ROUTERS = ("linear", "mlp", "analytic")


@dataclass(frozen=True)
class RoutingConfig:
    """How a MoE layer picks its experts per token."""

    mode: str = "topk"
    """"topk", "budget", "dynamic", "all" or "oracle"."""
    top_k: int = 2
    """Experts per token for "topk"."""
    top_p: float = 0.5
    """For "dynamic": router probability mass each token's experts must reach."""
    k_min: int = 1
    """For "dynamic": fewest experts per token."""
    k_max: int = 8
    """For "dynamic": most experts per token."""
    top_groups: int = 0
    """Groups the main router keeps per token (0: all groups); applies to "topk" and "budget"."""
    unit_budget: float = 0.25
    """For "budget" and "oracle": fraction of the layer's routed units allowed active per token."""
    router: str = "linear"
    """"linear" (x → logits), "mlp" (x → silu(x·W_hidden) → logits) or "analytic" (representative
    units' |h| + bias + linear; see the module docstring)."""
    router_hidden: int = 256
    """Hidden width of the "mlp" router."""
    straight_through: bool = True
    """Multiply each selected unit by 1 + p − p.detach() (value 1, gradient to the router)."""
    compensate: bool = False
    """Add each unselected expert's mean output (the layer's `compensation` buffer) to the output."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"routing mode must be one of {MODES}, got {self.mode!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.top_k < 1 or self.top_groups < 0 or self.router_hidden < 1:
            raise ValueError("top_k and router_hidden must be ≥ 1, top_groups ≥ 0")
        if not 1 <= self.k_min <= self.k_max or not 0 < self.top_p <= 1:
            raise ValueError(f"dynamic routing needs 1 ≤ k_min ≤ k_max and top_p in (0, 1], got k_min={self.k_min}, "
                             f"k_max={self.k_max}, top_p={self.top_p}")
        if not 0 < self.unit_budget <= 1:
            raise ValueError(f"unit_budget is a fraction in (0, 1], got {self.unit_budget}")


class RouterOutput(NamedTuple):
    """One layer's routing for N tokens (a NamedTuple, so torch.func and compile see a pytree)."""

    scores: torch.Tensor
    """[N, E] float32 log P(group)·P(expert | group); logsumexp over experts is 0."""
    mask: torch.Tensor
    """[N, E] float32 0/1: the selected experts."""


# ---------------------------------------------------------------- scores


def group_logsumexp(values: torch.Tensor, expert_group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[N, E] values → [N, G] logsumexp over each group's experts (−inf for an empty group)."""
    index = expert_group.expand_as(values)
    peak = values.new_full((values.shape[0], num_groups), -math.inf)
    peak = peak.scatter_reduce(1, index, values.detach(), "amax").nan_to_num(neginf=0.0)  # a stabiliser only
    total = values.new_zeros(values.shape[0], num_groups).scatter_add(1, index, (values - peak[:, expert_group]).exp())
    return total.log() + peak


def hierarchical_scores(group_logits: torch.Tensor, expert_logits: torch.Tensor,
                        expert_group: torch.Tensor) -> torch.Tensor:
    """Main-router logits [N, G] and sub-router logits [N, E] → log P(group) + log P(expert | group).

    The sub-router's softmax runs within each group; groups without experts get probability 0.
    Computed in float32.
    """
    group_logits, expert_logits = group_logits.float(), expert_logits.float()
    num_groups = group_logits.shape[-1]
    populated = torch.zeros(num_groups, dtype=torch.bool, device=expert_group.device).index_fill(0, expert_group, True)
    group_lp = group_logits.masked_fill(~populated, -math.inf).log_softmax(-1)
    within = expert_logits - group_logsumexp(expert_logits, expert_group, num_groups)[:, expert_group]
    return group_lp[:, expert_group] + within


def router_logits(params: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Router weights (`main` [G, h], `sub` [E, h], `hidden` [h, d] for the mlp router; `rep_gate`,
    `rep_up` [E, d] and `bias` [E] for the analytic one) and tokens x [N, d] → (group logits
    [N, G], expert logits [N, E])."""
    features = F.silu(F.linear(x, params["hidden"])) if "hidden" in params else x
    expert_logits = F.linear(features, params["sub"])
    if "rep_gate" in params:
        rep = F.silu(F.linear(x, params["rep_gate"])) * F.linear(x, params["rep_up"])
        expert_logits = expert_logits + rep.abs() + params["bias"]
    return F.linear(features, params["main"]), expert_logits


# ---------------------------------------------------------------- selection


def _per_token(value: torch.Tensor | int | float, scores: torch.Tensor) -> torch.Tensor:
    """An int/float or [N] tensor → a [N, 1] column to compare against per-token ranks/sums."""
    return torch.as_tensor(value, device=scores.device).reshape(-1, 1)


def topk_mask(scores: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """[N, E] scores → 0/1 mask of each token's k best experts; k is an int or a per-token [N]
    tensor. Experts scored −inf (excluded) are never selected."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(dim=-1)
    keep = (rank < _per_token(k, scores)) & (scores > -math.inf)
    return keep.to(torch.float32)


def budget_mask(scores: torch.Tensor, sizes: torch.Tensor, budget_units: torch.Tensor | float) -> torch.Tensor:
    """[N, E] scores, [E] expert sizes → 0/1 mask: experts in descending score order while the
    cumulative unit count stays ≤ `budget_units` (a number or per-token [N]); at least the best
    expert. Experts scored −inf are never selected."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    used = sizes.to(scores.device, torch.float32)[order].cumsum(-1)  # exact for < 2^24 units
    keep = used <= _per_token(budget_units, scores)
    keep[:, 0] = True
    keep &= scores.gather(-1, order) > -math.inf
    return torch.zeros_like(keep).scatter(-1, order, keep).to(torch.float32)


def dynamic_k(scores: torch.Tensor, top_p: float, k_min: int, k_max: int) -> torch.Tensor:
    """[N, E] log-prob scores → [N] experts per token: the fewest whose probability reaches `top_p`,
    clamped to [k_min, k_max] (and to E)."""
    probs = scores.detach().float().exp().sort(dim=-1, descending=True).values
    before = probs.cumsum(-1) - probs  # mass of the better experts before each one
    k = (before < top_p).sum(-1)
    return k.clamp(min(k_min, scores.shape[-1]), min(k_max, scores.shape[-1]))


def group_mask(group_scores: torch.Tensor, expert_group: torch.Tensor, top_groups: int) -> torch.Tensor:
    """[N, G] group scores → [N, E] bool: experts whose group is among the token's `top_groups` best."""
    if top_groups <= 0 or top_groups >= group_scores.shape[-1]:
        return torch.ones(group_scores.shape[0], len(expert_group), dtype=torch.bool, device=group_scores.device)
    chosen = torch.zeros_like(group_scores, dtype=torch.bool)
    chosen.scatter_(-1, group_scores.topk(top_groups, dim=-1).indices, True)
    return chosen[:, expert_group]


def select(scores: torch.Tensor, k: torch.Tensor | int | float, expert_group: torch.Tensor, top_groups: int = 0,
           expert_sizes: torch.Tensor | None = None, num_groups: int | None = None) -> torch.Tensor:
    """Scores [N, E] → 0/1 mask [N, E] with a per-token capacity k (a number or an [N] tensor).

    Without `expert_sizes`, k counts experts (top-k); with them, k counts units (budget). With
    `top_groups > 0` only the best groups' experts (by group probability) are eligible.
    """
    scores = scores.detach()  # selection is not differentiable
    if top_groups > 0:
        num_groups = num_groups or int(expert_group.max()) + 1
        allowed = group_mask(group_logsumexp(scores, expert_group, num_groups), expert_group, top_groups)
        scores = scores.masked_fill(~allowed, -math.inf)
    if expert_sizes is None:
        return topk_mask(scores, k)
    return budget_mask(scores, expert_sizes, k)


def route(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor,
          config: RoutingConfig, expert_sizes: torch.Tensor | None = None,
          oracle_scores: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> RouterOutput:
    """The stateless router forward: tokens x [N, d] → `RouterOutput`.

    `params`/`buffers` are a `HierarchicalRouter`'s own (`main`, `sub`, optional `hidden`;
    `expert_group`). `expert_sizes` [E] is needed for "budget" and "oracle"; `oracle_scores` [N, E]
    (the log of each expert's true activation mass) for "oracle". A given `mask` [N, E] replaces
    the selection whatever the mode.
    """
    expert_group = buffers["expert_group"]
    scores = hierarchical_scores(*router_logits(params, x), expert_group)
    if mask is not None:
        return RouterOutput(scores, mask.to(scores.device, torch.float32))
    if config.mode == "all":
        return RouterOutput(scores, torch.ones_like(scores))
    num_groups = params["main"].shape[0]
    if config.mode == "topk":
        return RouterOutput(scores, select(scores, config.top_k, expert_group, config.top_groups,
                                           num_groups=num_groups))
    if config.mode == "dynamic":
        k = dynamic_k(scores, config.top_p, config.k_min, config.k_max)
        return RouterOutput(scores, select(scores, k, expert_group, config.top_groups, num_groups=num_groups))
    if expert_sizes is None:
        raise ValueError(f"routing mode {config.mode!r} needs expert_sizes")
    # units are whole: the floor of the budget (+ a hair for float rounding of fraction × total)
    budget = torch.floor(config.unit_budget * expert_sizes.sum().double() + 1e-6).float()
    if config.mode == "oracle":
        if oracle_scores is None:
            raise ValueError("routing mode 'oracle' needs the experts' activation mass (oracle_scores)")
        return RouterOutput(scores, budget_mask(oracle_scores, expert_sizes, budget))
    return RouterOutput(scores, select(scores, budget, expert_group, config.top_groups, expert_sizes, num_groups))


# ---------------------------------------------------------------- module


class HierarchicalRouter(nn.Module):
    """One layer's router weights: main router `main` [G, h] (groups), sub-routers `sub` [E, h]
    (one linear whose logits are read per group), for the "mlp" router `hidden` [h, d], for the
    "analytic" router `rep_gate`, `rep_up` [E, d] and `bias` [E] (one group: `expert_group` is all 0,
    `main` and `sub` start at 0).

    It holds weights only: the routing policy (`RoutingConfig`) is passed to each call, so the
    model's per-layer routing has one home (`TinyONNForCausalLM.set_routing`)."""

    def __init__(self, d: int, expert_group: Sequence[int], kind: str = "linear", hidden: int = 256):
        super().__init__()
        if kind not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {kind!r}")
        expert_group = [0] * len(expert_group) if kind == "analytic" else [int(group) for group in expert_group]
        self.kind = kind
        self.num_groups = max(expert_group) + 1
        width = hidden if kind == "mlp" else d
        if kind == "mlp":
            self.hidden = nn.Parameter(torch.empty(width, d))
        self.main = nn.Parameter(torch.empty(self.num_groups, width))
        self.sub = nn.Parameter(torch.empty(len(expert_group), width))
        if kind == "analytic":
            self.rep_gate = nn.Parameter(torch.empty(len(expert_group), d))
            self.rep_up = nn.Parameter(torch.empty(len(expert_group), d))
            self.bias = nn.Parameter(torch.empty(len(expert_group)))
        self.register_buffer("expert_group", torch.tensor(expert_group, dtype=torch.int64))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Small random weights (drawn on the CPU from `generator` so a seed gives the same router
        on any device); the mlp router's hidden layer gets a fan-in scaled init; the analytic
        router's `main`, `sub` and `bias` start at 0 (its units come from `tinyonn.model.calibrate`)."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                if self.kind == "analytic" and name in ("main", "sub", "bias"):
                    param.zero_()
                    continue
                scale = 1 / math.sqrt(param.shape[1]) if name == "hidden" else std
                draw = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, scale, generator=generator)
                param.copy_(draw)

    @property
    def num_experts(self) -> int:
        return len(self.expert_group)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [N, d] → [N, E] expert log-probs."""
        return hierarchical_scores(*router_logits(dict(self.named_parameters()), x), self.expert_group)

    def forward(self, x: torch.Tensor, config: RoutingConfig, expert_sizes: torch.Tensor | None = None,
                oracle_scores: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> RouterOutput:
        return route(dict(self.named_parameters()), dict(self.named_buffers()), x, config, expert_sizes,
                     oracle_scores, mask)
