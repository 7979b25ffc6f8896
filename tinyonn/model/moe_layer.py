"""One MoE layer: the kept teacher units of a decoder layer's MLP, packed expert by expert.

A `MoELayer` holds `w_gate`, `w_up`, `w_down`, all [U, d] (a unit's three weight vectors are rows;
expert e owns rows `expert_offsets[e]:expert_offsets[e+1]`), an always-on shared expert and a
`HierarchicalRouter`. Every selected expert adds its units' outputs with weight 1, so with every unit
kept and every expert selected the layer is the teacher's MLP; each unit's h is multiplied by
1 + p − p.detach() (p = its expert's probability): 1 in the forward, a gradient to the router in the
backward. `moe_forward` is the stateless computation (the dense masked reference: every unit is
computed, then masked), which the `tinyonn` compile backend rewrites into the ragged kernels.
This module needs no particular transformers version.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinyonn.model.routing import HierarchicalRouter, RouterOutput, RoutingConfig, route


def swiglu_units(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """x [N, d] → h = silu(x·Wg^T) · (x·Wu^T), [N, units]."""
    return F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)


def moe_forward(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor,
                routing: RoutingConfig, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterOutput]:
    """The stateless MoE layer: x [..., d] → (y [..., d], RouterOutput over the N flattened tokens).

    `params`: `w_gate`, `w_up`, `w_down` [U, d], `shared_gate`, `shared_up` [S, d],
    `shared_down` [d, S], `router.*`; `buffers`: `expert_offsets` [E+1], `unit_expert` [U],
    `router.expert_group` [E]. A `mask` [N, E] replaces the router's selection.
    Dense reference: all units are computed and h is multiplied by each unit's expert weight.
    """
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    router_params = {name[7:]: value for name, value in params.items() if name.startswith("router.")}
    router_buffers = {name[7:]: value for name, value in buffers.items() if name.startswith("router.")}
    offsets = buffers["expert_offsets"]
    out = route(router_params, router_buffers, x, routing, expert_sizes=offsets[1:] - offsets[:-1], mask=mask)

    expert_weight = out.mask
    if routing.straight_through:
        p = out.scores.exp()
        expert_weight = expert_weight * (1 + p - p.detach())
    h = swiglu_units(x, params["w_gate"], params["w_up"])
    y = (h * expert_weight[:, buffers["unit_expert"]].to(h.dtype)) @ params["w_down"]
    if params["shared_gate"].shape[0]:
        y = y + F.linear(swiglu_units(x, params["shared_gate"], params["shared_up"]), params["shared_down"])
    return y.reshape(shape), out


class MoELayer(nn.Module):
    """One decoder layer's experts: routed units packed by expert, a shared expert, a router."""

    def __init__(self, hidden_size: int, expert_sizes: list[int], expert_group: list[int], shared_size: int,
                 routing: RoutingConfig = RoutingConfig()):
        super().__init__()
        sizes = torch.tensor(expert_sizes, dtype=torch.int64)
        units = sum(expert_sizes)  # Python ints: the model may be built on the meta device
        self.w_gate = nn.Parameter(torch.empty(units, hidden_size))
        self.w_up = nn.Parameter(torch.empty(units, hidden_size))
        self.w_down = nn.Parameter(torch.empty(units, hidden_size))
        self.shared_gate = nn.Parameter(torch.empty(shared_size, hidden_size))
        self.shared_up = nn.Parameter(torch.empty(shared_size, hidden_size))
        self.shared_down = nn.Parameter(torch.empty(hidden_size, shared_size))
        self.register_buffer("expert_offsets", torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]))
        self.register_buffer("unit_expert", torch.repeat_interleave(torch.arange(len(sizes)), sizes,
                                                                   output_size=units))
        self.router = HierarchicalRouter(hidden_size, expert_group, routing)
        self.oracle_mask: torch.Tensor | None = None
        """[N, E] 0/1 mask to use instead of the router's selection (routing mode "oracle-mask")."""
        self.last_routing: RouterOutput | None = None
        """The latest forward's routing, for losses and metrics."""
        with torch.no_grad():
            for param in (self.w_gate, self.w_up, self.w_down, self.shared_gate, self.shared_up, self.shared_down):
                nn.init.normal_(param, std=0.02)

    @property
    def routing(self) -> RoutingConfig:
        return self.router.config

    @property
    def num_experts(self) -> int:
        return len(self.expert_offsets) - 1

    @property
    def expert_sizes(self) -> torch.Tensor:
        return self.expert_offsets[1:] - self.expert_offsets[:-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, self.last_routing = moe_forward(dict(self.named_parameters()), dict(self.named_buffers()), x,
                                           self.routing, self.oracle_mask)
        return y
