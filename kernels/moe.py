"""The routed experts of a MoE layer as one differentiable custom op, `tinyonn::moe_experts`.

    y = Σ_e expert_weight[:, e] · SwiGLU_e(x)   (experts with weight 0 are skipped)

with expert e's units at rows `unit_offsets[e]:unit_offsets[e+1]` of `w_gate`, `w_up`, `w_down` [U, d]
(`unit_expert` [U] names each unit's expert). This is the dense masked computation of
`tinyonn.model.moe_layer.moe_forward`, done sparsely: per token the experts of nonzero weight become slots,
slots are dispatched into padded per-expert row segments (`routing.dispatch_indices`, `gather_rows`),
the ragged SwiGLU runs on them (`ragged_swiglu`), and `combine_rows` weighs and sums the slots back.

On CUDA every step is a Triton kernel; elsewhere the PyTorch references run (same signatures). The
backward op recomputes the dispatch and the forward activations, then runs the kernels' backward.
The gradient of a zero `expert_weight` entry is reported as 0 (the dense reference would give
<SwiGLU_e(x), dy>); in `moe_forward` such entries are a 0/1 mask times the router's probability,
so the parameters' gradients are the same either way. Two host syncs per call read the largest
expert's unit count and the most experts any token uses (they size the buffers).

The backward kernels also give each expert's squared gradient norm of this call (`expert_sq_norm`);
the op does not return it. SMK's surprise (`tinyonn.training.surprise`) is the norm of the gradient
the optimiser applies: summed over micro-batches and, across GPUs, all-reduced. A norm per call
cannot be combined into that (‖Σ g‖ ≠ Σ ‖g‖), so the surprise is read from the parameters'
accumulated `.grad` instead, in a few batched kernels over all layers.
"""

from __future__ import annotations

from types import ModuleType

import torch
from tinyonn.kernels import reference, routing_reference
from tinyonn.kernels.reference import ROW_BLOCK

TRITON_ON_CPU = False
"""Run the Triton kernels on CPU tensors too (under `TRITON_INTERPRET=1`; for tests)."""


def uses_triton(device: torch.device) -> bool:
    """Whether tensors on `device` run the Triton kernels (else the PyTorch references)."""
    return device.type == "cuda" or TRITON_ON_CPU


def _kernels(device: torch.device) -> tuple[ModuleType, ModuleType]:
    if uses_triton(device):
        from tinyonn.kernels import ragged_swiglu, routing

        return ragged_swiglu, routing
    return reference, routing_reference


def _plan(x: torch.Tensor, expert_weight: torch.Tensor, unit_expert: torch.Tensor):
    """(slot ids [N, k] (−1: empty), slot weights [N, k] (fp32, fp64 for fp64 x), dispatch, unit_offsets,
    max_units)."""
    experts = expert_weight.shape[1]
    sizes = torch.bincount(unit_expert, minlength=experts)
    unit_offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
    max_units = int(sizes.max()) if experts else 0
    chosen = expert_weight != 0
    k = max(int(chosen.sum(1).max()), 1) if x.shape[0] else 1
    ids = torch.where(chosen, expert_weight.abs().float(), -1.0).topk(k, dim=1).indices
    ids = torch.where(chosen.gather(1, ids), ids, -1)
    acc = torch.promote_types(x.dtype, torch.float32)
    weights = torch.where(ids >= 0, expert_weight.gather(1, ids.clamp_min(0)).to(acc), 0.0)
    _, routing = _kernels(x.device)
    plan = routing.dispatch_indices(ids.to(torch.int32), experts, ROW_BLOCK)
    return ids, weights, plan, unit_offsets, max_units


@torch.library.custom_op("tinyonn::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, expert_weight: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                w_down: torch.Tensor, unit_expert: torch.Tensor) -> torch.Tensor:
    """x [N, d], expert_weight [N, E] → y [N, d] = Σ_e expert_weight[:, e] · SwiGLU_e(x)."""
    swiglu, routing = _kernels(x.device)
    _, weights, plan, unit_offsets, max_units = _plan(x, expert_weight, unit_expert)
    x_sorted = routing.gather_rows(x, plan.row_token)
    y_sorted = swiglu.ragged_swiglu(x_sorted, plan.segment_offsets, w_gate, w_up, w_down, unit_offsets, max_units)
    return routing.combine_rows(y_sorted, plan.slot_row, weights).to(x.dtype)


@moe_experts.register_fake
def _(x, expert_weight, w_gate, w_up, w_down, unit_expert):
    return torch.empty_like(x)


@torch.library.custom_op("tinyonn::moe_experts_backward", mutates_args=())
def moe_experts_backward(dy: torch.Tensor, x: torch.Tensor, expert_weight: torch.Tensor, w_gate: torch.Tensor,
                         w_up: torch.Tensor, w_down: torch.Tensor, unit_expert: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `moe_experts`: (dx, d expert_weight, dw_gate, dw_up, dw_down)."""
    swiglu, routing = _kernels(x.device)
    ids, weights, plan, unit_offsets, max_units = _plan(x, expert_weight, unit_expert)
    x_sorted = routing.gather_rows(x, plan.row_token)
    args = (plan.segment_offsets, w_gate, w_up, w_down, unit_offsets, max_units)
    y_sorted, saved = swiglu.ragged_swiglu(x_sorted, *args, save=True)
    dy_sorted, d_weights = routing.combine_rows_backward(dy.to(x.dtype), y_sorted, plan.slot_row, weights)
    grads = swiglu.ragged_swiglu_backward(dy_sorted, x_sorted, *args, saved)
    dx = routing.combine_rows(grads.dx, plan.slot_row, torch.ones_like(weights)).to(x.dtype)
    d_expert_weight = torch.zeros(expert_weight.shape, device=x.device, dtype=d_weights.dtype)
    d_expert_weight.scatter_add_(1, ids.clamp_min(0).long(), torch.where(ids >= 0, d_weights, 0.0))
    return dx, d_expert_weight.to(expert_weight.dtype), grads.dw_gate, grads.dw_up, grads.dw_down


@moe_experts_backward.register_fake
def _(dy, x, expert_weight, w_gate, w_up, w_down, unit_expert):
    return (torch.empty_like(x), torch.empty_like(expert_weight), torch.empty_like(w_gate),
            torch.empty_like(w_up), torch.empty_like(w_down))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    grads = torch.ops.tinyonn.moe_experts_backward(dy, *ctx.saved_tensors)
    return (*grads[:2], *grads[2:], None)


moe_experts.register_autograd(_backward, setup_context=_setup_context)
