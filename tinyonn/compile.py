"""The `tinyonn` torch.compile backend: MoE dispatch → ragged Triton kernels, the rest → Inductor.

    model = torch.compile(model, backend="tinyonn")   # found through the package's entry point

Dynamo hands the backend each captured FX graph. `substitute_moe_experts` finds the dense masked
expert computation of `tinyonn.model.moe_layer.moe_forward`,

    h = silu(linear(x, w_gate)) * linear(x, w_up)
    y = (h * expert_weight[:, unit_expert].to(h.dtype)) @ w_down

and replaces it with one call of `tinyonn::moe_experts` (`tinyonn.kernels.moe`), whose registered
autograd puts `tinyonn::moe_experts_backward` in the backward. Inductor's `compile_fx` then runs
aot_autograd, which splits the forward and backward graphs, and compiles everything around the
kernels. The latest aot graphs (at most `KEPT_GRAPHS` of each kind) are kept in `compiled_graphs`
for inspection. Without CUDA the same ops run their PyTorch references (the log says so).
"""

from __future__ import annotations

import logging
import operator
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx
from torch._dynamo import register_backend
from torch._inductor.compile_fx import compile_fx, compile_fx_inner

from tinyonn.kernels import moe as moe_kernels

log = logging.getLogger(__name__)

KEPT_GRAPHS = 64
"""How many of the latest graphs of each kind `compiled_graphs` keeps (older ones are dropped)."""

compiled_graphs: dict[str, deque[fx.GraphModule]] = {kind: deque(maxlen=KEPT_GRAPHS)
                                                     for kind in ("forward", "backward")}
"""The latest aot_autograd graphs handed to Inductor by `tinyonn` compiles, by kind, oldest first."""

_LINEAR = {F.linear, torch._C._nn.linear}
_SILU = {F.silu, torch._C._nn.silu}
_MUL = {operator.mul, torch.mul}
_MATMUL = {operator.matmul, torch.matmul}


@dataclass(frozen=True)
class MoEDispatch:
    """One matched dense masked expert computation: its inputs and the node giving y."""

    x: fx.Node
    expert_weight: fx.Node
    w_gate: fx.Node
    w_up: fx.Node
    w_down: fx.Node
    unit_expert: fx.Node
    output: fx.Node


def _call(node: object, targets: set) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _operands(node: fx.Node, targets: set) -> tuple | None:
    """The two operands of a binary call in `targets`, else None."""
    if _call(node, targets) and len(node.args) == 2 and not node.kwargs:
        return node.args
    return None


def _unit_weight(node: object) -> tuple[fx.Node, fx.Node] | None:
    """`expert_weight[:, unit_expert]` (optionally `.to(dtype)`) → (expert_weight, unit_expert)."""
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("to", "type_as"):
        node = node.args[0]
    if not _call(node, {operator.getitem}):
        return None
    source, index = node.args
    if (isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None)
            and isinstance(index[1], fx.Node)):
        return source, index[1]
    return None


def _swiglu(node: object) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """`silu(linear(x, w_gate)) * linear(x, w_up)` → (x, w_gate, w_up)."""
    pair = _operands(node, _MUL)
    if pair is None:
        return None
    for gate, up in (pair, pair[::-1]):
        if _call(gate, _SILU) and _call(gate.args[0], _LINEAR) and _call(up, _LINEAR):
            (x, w_gate), (x_up, w_up) = gate.args[0].args[:2], up.args[:2]
            if x is x_up and len(gate.args[0].args) == 2 and len(up.args) == 2:
                return x, w_gate, w_up
    return None


def find_moe_dispatch(graph: fx.Graph) -> list[MoEDispatch]:
    """Every dense masked expert computation in `graph` (see the module docstring)."""
    found = []
    for node in graph.nodes:
        pair = _operands(node, _MATMUL)
        masked = pair and _operands(pair[0], _MUL)
        if not masked:
            continue
        for h, weight in (masked, masked[::-1]):
            swiglu, unit = _swiglu(h), _unit_weight(weight)
            if swiglu and unit:
                found.append(MoEDispatch(swiglu[0], unit[0], swiglu[1], swiglu[2], pair[1], unit[1], node))
                break
    return found


def substitute_moe_experts(gm: fx.GraphModule) -> int:
    """Replace each match of `find_moe_dispatch` by `tinyonn::moe_experts`; returns how many."""
    matches = find_moe_dispatch(gm.graph)
    for match in matches:
        with gm.graph.inserting_before(match.output):
            call = gm.graph.call_function(torch.ops.tinyonn.moe_experts.default,
                                          (match.x, match.expert_weight, match.w_gate, match.w_up, match.w_down,
                                           match.unit_expert))
        call.meta.update(match.output.meta)
        match.output.replace_all_uses_with(call)
    if matches:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return len(matches)


def _inner_compile(gm: fx.GraphModule, example_inputs, **kwargs):
    compiled_graphs["backward" if kwargs.get("is_backward") else "forward"].append(gm)
    return compile_fx_inner(gm, example_inputs, **kwargs)


def tinyonn_backend(gm: fx.GraphModule, example_inputs):
    """Dynamo backend: substitute the MoE kernels, then Inductor (aot_autograd forward and backward)."""
    count = substitute_moe_experts(gm)
    log.info("tinyonn backend: %d MoE dispatch pattern(s) → tinyonn::moe_experts", count)
    devices = {value.device for value in example_inputs if isinstance(value, torch.Tensor)}
    if count and not any(moe_kernels.uses_triton(device) for device in devices):
        log.warning("tinyonn backend: no CUDA tensors; tinyonn::moe_experts runs its PyTorch reference path")
    # no aot_autograd cache: a cache hit would skip `_inner_compile`, leaving `compiled_graphs` empty
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, inner_compile=_inner_compile)


if "tinyonn" not in torch._dynamo.list_backends(exclude_tags=()):  # not installed: no entry point
    register_backend(tinyonn_backend, name="tinyonn")
