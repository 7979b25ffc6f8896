"""Training-free routing state from calibration tokens (the teacher's MLP inputs, `Calibration`):
the analytic router's representative units and load-balancing bias, and output compensation.

- `init_analytic_router`: per expert, the representative unit is the member nearest to the
  expert's centroid in firing space (a unit fires on a token when it is among the token's top K_a
  units of the layer by |h|); the router scores the expert by |silu(x·g_rep)·(x·u_rep)|.
- `balance_router_bias`: with the model's routing in place, each expert's bias moves by
  ± rate × (spread of the logits) against its load (the share of tokens selecting it) until loads
  even out (DeepSeek-V3's auxiliary-loss-free rule, applied as a calibration pass).
- `calibrate_compensation`: each expert's mean output h·W_down over the calibration tokens on which
  the layer's routing does not select it ("unrouted", the default), or over all of them ("always",
  FLAP's plain mean); written to the layer's `compensation` buffer, used when the routing says
  `compensate`.

All of it is model state (router parameters, buffers), saved and reloaded with the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tinyonn.clustering.calibration import Calibration
from tinyonn.clustering.cmoe import firing, representatives
from tinyonn.model.moe_layer import swiglu_units


@dataclass(frozen=True)
class AnalyticConfig:
    """How the analytic router is set from calibration tokens."""

    firing_top_k: float = 0.1
    """K_a of the representatives' firing vectors, as a fraction of the layer's kept units."""
    balance_steps: int = 100
    """Bias updates of the load-balancing pass (0: no balancing)."""
    balance_rate: float = 0.02
    """Each update moves a bias by this fraction of the standard deviation of the router logits."""
    max_tokens: int = 8192
    """Calibration tokens the balancing pass uses (evenly strided)."""

    def __post_init__(self):
        if not 0 < self.firing_top_k <= 1 or self.balance_steps < 0 or self.balance_rate < 0 or self.max_tokens < 1:
            raise ValueError("AnalyticConfig: firing_top_k in (0, 1], balance_steps, balance_rate >= 0, "
                             "max_tokens >= 1")


def _layer_inputs(model, calibration: Calibration, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Calibration MLP inputs of each of the model's MoE layers (evenly strided to `max_tokens`)."""
    layers = model.moe_layers()
    if len(calibration.inputs) != len(layers):
        raise ValueError(f"the calibration has {len(calibration.inputs)} layers, the model {len(layers)}")
    device = next(model.parameters()).device
    step = max(1, calibration.n_tokens // max_tokens) if max_tokens else 1
    return [x[::step][:max_tokens].to(device, model.dtype) for x in calibration.inputs]


@torch.no_grad()
def init_analytic_router(model, calibration: Calibration, config: AnalyticConfig = AnalyticConfig()) -> list[int]:
    """Point every layer's analytic router at its experts' representative units; returns each
    layer's representatives (positions among the layer's routed units). Bias, `sub` and `main`
    are reset to 0."""
    reps = []
    for layer, x in zip(model.moe_layers(), _layer_inputs(model, calibration)):
        if layer.router.kind != "analytic":
            raise ValueError("init_analytic_router needs a model assembled with RoutingConfig(router='analytic')")
        h = torch.cat([layer.dense_h(x), swiglu_units(x, layer.shared_gate, layer.shared_up)], dim=1)
        fires = firing(h.float().cpu(), max(1, round(config.firing_top_k * h.shape[1])))[:, : layer.w_gate.shape[0]]
        rep = representatives(fires, layer.unit_expert.cpu(), layer.num_experts).to(layer.w_gate.device)
        router = layer.router
        router.rep_gate.copy_(layer.w_gate[rep])
        router.rep_up.copy_(layer.w_up[rep])
        for name in ("bias", "sub", "main"):
            getattr(router, name).zero_()
        reps.append(rep.tolist())
    return reps


@torch.no_grad()
def balance_router_bias(model, calibration: Calibration, config: AnalyticConfig = AnalyticConfig()) -> list[dict]:
    """Even out each layer's expert load under the model's routing by nudging the router `bias`
    (no auxiliary loss); returns per layer the max/min load ratio before and after."""
    report = []
    for layer, x in zip(model.moe_layers(), _layer_inputs(model, calibration, config.max_tokens)):
        bias = layer.router.bias
        spread = float(layer.router.scores(x).std())
        load = layer.select(x).mask.mean(0)
        before = float(load.max() / load.mean().clamp_min(1e-9))
        for _ in range(config.balance_steps):
            bias.add_(config.balance_rate * spread * torch.sign(load.mean() - load))
            load = layer.select(x).mask.mean(0)
        report.append({"load_max_over_mean_before": before,
                       "load_max_over_mean": float(load.max() / load.mean().clamp_min(1e-9))})
    return report


@torch.no_grad()
def calibrate_compensation(model, calibration: Calibration, given: Literal["unrouted", "always"] = "unrouted",
                           max_tokens: int | None = 8192, chunk: int = 4096) -> None:
    """Set every layer's `compensation` [E, d]: expert e's mean output Σ_{j∈e} h_j·W_down[:, j] over
    the calibration tokens (evenly strided to `max_tokens`; None: all) on which the layer's current
    routing does not select e ("unrouted"), or over every token ("always", FLAP's plain mean). An
    expert selected on every token gets 0."""
    if given not in ("unrouted", "always"):
        raise ValueError(f"calibrate_compensation: given must be 'unrouted' or 'always', got {given!r}")
    for layer, x in zip(model.moe_layers(), _layer_inputs(model, calibration, max_tokens)):
        unit_sum = torch.zeros(layer.w_gate.shape[0], dtype=torch.float64, device=x.device)
        count = torch.zeros(layer.num_experts, dtype=torch.float64, device=x.device)
        for start in range(0, x.shape[0], chunk):
            part = x[start : start + chunk]
            h = layer.dense_h(part).float()
            if given == "unrouted":
                unused = 1.0 - layer.select(part).mask.float()  # [n, E]
            else:
                unused = torch.ones(part.shape[0], layer.num_experts, device=x.device)
            unit_sum += (h * unused[:, layer.unit_expert]).sum(0).double()
            count += unused.sum(0).double()
        per_unit = unit_sum / count.clamp_min(1.0)[layer.unit_expert]
        out = torch.zeros(layer.num_experts, layer.w_down.shape[1], dtype=torch.float64, device=x.device)
        out.index_add_(0, layer.unit_expert, per_unit[:, None] * layer.w_down.double())
        layer.compensation.copy_(out.to(layer.compensation.dtype))


@torch.no_grad()
def clear_compensation(model) -> None:
    """Zero every layer's `compensation` (what a model without compensation carries)."""
    for layer in model.moe_layers():
        layer.compensation.zero_()
