"""Assemble a TinyONN model from a teacher and an expert plan.

Embeddings, attention, norms and head are copied from the teacher (bitwise for a float teacher of
the same dtype); each layer's `w_gate`/`w_up`/`w_down` rows are the teacher's gate/up rows and
down columns gathered by the plan's unit indices (nf4/int8 teachers are dequantised first);
routers start small-random from a seed.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from tinyonn.clustering.plan import ExpertPlan
from tinyonn.model.config import TinyONNConfig
from tinyonn.model.modeling import TinyONNForCausalLM
from tinyonn.model.moe_layer import MoELayer
from tinyonn.model.routing import RoutingConfig
from tinyonn.teacher import dequantize, ffn_layout, load_teacher


def _is_quantised(model: nn.Module) -> bool:
    return getattr(model, "quantization_config", None) is not None or getattr(
        model.config, "quantization_config", None) is not None


def tinyonn_config(teacher: nn.Module, plan: ExpertPlan, routing: RoutingConfig, dtype: torch.dtype) -> TinyONNConfig:
    """The TinyONN config for `teacher` split as `plan` says (the plan itself stays in the run folder)."""
    text = teacher.config.to_dict()
    text.pop("quantization_config", None)  # the TinyONN weights are plain tensors
    text["dtype"] = str(dtype).removeprefix("torch.")
    return TinyONNConfig(
        text_config=text,
        teacher_model_type=teacher.config.model_type,
        expert_sizes=[[int(n) for n in lp.expert_sizes] for lp in plan.layers],
        expert_group=[[int(g) for g in lp.expert_group] for lp in plan.layers],
        shared_sizes=[len(lp.shared_units) for lp in plan.layers],
        routing=asdict(routing),
        dtype=dtype,
    )


def _copy_backbone(model: TinyONNForCausalLM, teacher: nn.Module, dtype: torch.dtype) -> None:
    """Every parameter and buffer outside the MLPs, from the teacher module at the same path."""
    for name, tensor in [*model.backbone.named_parameters(), *model.backbone.named_buffers()]:
        if ".mlp." in name:
            continue
        module_name, attr = name.rsplit(".", 1)
        source = teacher.get_submodule(module_name)
        value = dequantize(source, dtype) if attr == "weight" else getattr(source, attr).detach()
        tensor.data.copy_(value)


def _fill_layer(layer: MoELayer, teacher_ffn, units: torch.Tensor, shared: torch.Tensor, dtype: torch.dtype) -> None:
    gate = dequantize(teacher_ffn.gate_proj, dtype)
    up = dequantize(teacher_ffn.up_proj, dtype)
    down = dequantize(teacher_ffn.down_proj, dtype)
    units, shared = units.to(gate.device), shared.to(gate.device)
    layer.w_gate.data.copy_(gate[units])
    layer.w_up.data.copy_(up[units])
    layer.w_down.data.copy_(down[:, units].T)
    layer.shared_gate.data.copy_(gate[shared])
    layer.shared_up.data.copy_(up[shared])
    layer.shared_down.data.copy_(down[:, shared])


def assemble(teacher: nn.Module | str | Path, plan: ExpertPlan, routing: RoutingConfig | None = None,
             dtype: torch.dtype | None = None, seed: int = 0) -> TinyONNForCausalLM:
    """Build a TinyONN model from `teacher` (a causal LM or a source for `load_teacher`) and `plan`.

    `dtype` defaults to the teacher's float dtype (bf16 for a quantised teacher). Routers are
    initialised small-random from `seed`. The model is returned in eval mode on the teacher's device.
    """
    if isinstance(teacher, (str, Path)):
        teacher, _ = load_teacher(teacher, dtype=dtype or torch.float32)
    routing = routing or RoutingConfig()
    layout = ffn_layout(teacher)
    if len(plan.layers) != len(layout) or plan.intermediate_size != layout[0].intermediate_size:
        raise ValueError(f"the plan has {len(plan.layers)} layers of {plan.intermediate_size} units, the teacher "
                         f"{len(layout)} of {layout[0].intermediate_size}")
    plan.validate()
    if dtype is None:
        dtype = torch.bfloat16 if _is_quantised(teacher) else teacher.get_input_embeddings().weight.dtype
    device = teacher.get_input_embeddings().weight.device

    config = tinyonn_config(teacher, plan, routing, dtype)
    with torch.device(device):
        model = TinyONNForCausalLM._from_config(config, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _copy_backbone(model, teacher, dtype)
        for layer, layer_plan, ffn in zip(model.moe_layers(), plan.layers, layout):
            _fill_layer(layer, ffn, torch.as_tensor(layer_plan.units), torch.as_tensor(layer_plan.shared_units), dtype)
            layer.router.reset_parameters(generator)
    if getattr(teacher, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(teacher.generation_config)
    return model.eval()
