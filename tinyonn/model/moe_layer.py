"""One MoE layer: the kept teacher units of a decoder layer's MLP, packed expert by expert.

A `MoELayer` holds `w_gate`, `w_up`, `w_down`, all [U, d] (a unit's three weight vectors are rows;
expert e owns rows `expert_offsets[e]:expert_offsets[e+1]`), an always-on shared expert and a
`HierarchicalRouter`. Every selected expert adds its units' outputs with weight 1, so with every unit
kept and every expert selected the layer is the teacher's MLP; each unit's h is multiplied by
1 + p − p.detach() (p = its expert's probability): 1 in the forward, a gradient to the router in the
backward. `moe_forward` is the stateless computation (the dense masked reference: every unit is
computed, then masked), which the `tinyonn` compile backend rewrites into the ragged kernels.

With `RoutingConfig.compensate`, every expert a token does not use adds its mean output (the
`compensation` buffer [E, d], a bias per expert set by `tinyonn.model.calibrate`); a token that
uses every expert gets no compensation. It is a separate term after the masked expert product,
which stays the pattern the compile backend matches.

The layer's routing policy (`self.routing`) is set only by `TinyONNForCausalLM.set_routing`; its
routing decisions are the router module's outputs, which `record_routing` collects (nothing is
left behind in attributes). This module needs no particular transformers version.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tinyonn.model.routing import HierarchicalRouter, RouterOutput, RoutingConfig, route


def swiglu_units(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """x [N, d] → h = silu(x·Wg^T) · (x·Wu^T), [N, units]."""
    return F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)


def expert_mass(h: torch.Tensor, w_down: torch.Tensor, unit_expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Activation mass of every expert per token: Σ_{j∈e} |h_j|·‖W_down[:, j]‖.  h [N, U] → [N, E]
    (`w_down` is [U, d], so a unit's down vector is a row)."""
    contribution = h.detach().abs().float() * w_down.detach().float().norm(dim=1)
    mass = torch.zeros(h.shape[0], num_experts, dtype=torch.float32, device=h.device)
    return mass.index_add_(1, unit_expert, contribution)


def _experts_and_routing(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor,
                         routing: RoutingConfig, router: Callable[..., RouterOutput],
                         mask: torch.Tensor | None) -> tuple[torch.Tensor, RouterOutput]:
    """The layer's computation with the router given as a callable (the module, or the functional
    `route` over `params`), so the module and `moe_forward` share one implementation."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    offsets = buffers["expert_offsets"]
    unit_expert = buffers["unit_expert"]
    h = swiglu_units(x, params["w_gate"], params["w_up"])
    oracle = None
    if routing.mode == "oracle" and mask is None:
        oracle = torch.log(expert_mass(h, params["w_down"], unit_expert, len(offsets) - 1) + 1e-30)
    out = router(x, routing, offsets[1:] - offsets[:-1], oracle, mask)

    expert_weight = out.mask
    if routing.straight_through:
        p = out.scores.exp()
        expert_weight = expert_weight * (1 + p - p.detach())
    y = (h * expert_weight[:, unit_expert].to(h.dtype)) @ params["w_down"]
    if routing.compensate:
        y = y + (1 - out.mask).to(y.dtype) @ buffers["compensation"].to(y.dtype)
    if params["shared_gate"].shape[0]:
        y = y + F.linear(swiglu_units(x, params["shared_gate"], params["shared_up"]), params["shared_down"])
    return y.reshape(shape), out


def moe_forward(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor,
                routing: RoutingConfig, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterOutput]:
    """The stateless MoE layer: x [..., d] → (y [..., d], RouterOutput over the N flattened tokens).

    `params`: `w_gate`, `w_up`, `w_down` [U, d], `shared_gate`, `shared_up` [S, d],
    `shared_down` [d, S], `router.*`; `buffers`: `expert_offsets` [E+1], `unit_expert` [U],
    `compensation` [E, d], `router.expert_group` [E]. A `mask` [N, E] replaces the router's selection.
    Dense reference: all units are computed and h is multiplied by each unit's expert weight.
    """
    router_params = {name[7:]: value for name, value in params.items() if name.startswith("router.")}
    router_buffers = {name[7:]: value for name, value in buffers.items() if name.startswith("router.")}

    def router(x, config, sizes, oracle, mask):
        return route(router_params, router_buffers, x, config, sizes, oracle, mask)

    return _experts_and_routing(params, buffers, x, routing, router, mask)


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
        self.register_buffer("compensation", torch.zeros(len(sizes), hidden_size))
        """[E, d] each expert's mean output, added for the experts a token does not use when the
        routing says `compensate` (zeros until `tinyonn.model.calibrate.calibrate_compensation`)."""
        self.router = HierarchicalRouter(hidden_size, expert_group, routing.router, routing.router_hidden)
        self.routing = routing
        """This layer's routing policy; set through `TinyONNForCausalLM.set_routing`."""
        with torch.no_grad():
            for param in (self.w_gate, self.w_up, self.w_down, self.shared_gate, self.shared_up, self.shared_down):
                nn.init.normal_(param, std=0.02)

    @property
    def num_experts(self) -> int:
        return len(self.expert_offsets) - 1

    @property
    def expert_sizes(self) -> torch.Tensor:
        return self.expert_offsets[1:] - self.expert_offsets[:-1]

    def dense_h(self, x: torch.Tensor) -> torch.Tensor:
        """h of every routed unit for tokens x [N, d] → [N, U] (what oracle routing and router
        distillation measure)."""
        return swiglu_units(x, self.w_gate, self.w_up)

    def select(self, x: torch.Tensor, routing: RoutingConfig | None = None) -> RouterOutput:
        """The routing this layer gives tokens x [N, d] (its own routing, or `routing`), without the
        experts' output: what the forward would select."""
        routing = routing or self.routing
        oracle = None
        if routing.mode == "oracle":
            oracle = torch.log(expert_mass(self.dense_h(x), self.w_down, self.unit_expert, self.num_experts) + 1e-30)
        return self.router(x, routing, self.expert_sizes, oracle)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        params, buffers = dict(self.named_parameters()), dict(self.named_buffers())
        y, _ = _experts_and_routing(params, buffers, x, self.routing, self.router, mask)
        return y


class record_routing:
    """Collect every MoE layer's `RouterOutput` during the forwards run inside the block:

        with record_routing(model.moe_layers()) as routed:
            model(input_ids)
        routed[i]   # list of RouterOutput of layer i, one per forward

    Forward hooks on the router modules, removed on exit (the way Hugging Face records router logits).
    """

    def __init__(self, layers: list[MoELayer]):
        self.layers = list(layers)
        self.outputs: list[list[RouterOutput]] = [[] for _ in self.layers]
        self._handles: list = []

    def __enter__(self) -> list[list[RouterOutput]]:
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.router.register_forward_hook(
                lambda module, args, output, index=index: self.outputs[index].append(output)))
        return self.outputs

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
