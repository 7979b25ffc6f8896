"""Which parameters a run trains, and the optimiser's parameter groups.

Every parameter gets a role: "expert" (a MoE layer's `w_gate`/`w_up`/`w_down`), "shared" (its shared
expert), "router", "mlp" (a dense model's MLP: the experts of a dense fine-tune), "norm" (any
module whose class name says Norm), "embedding" (the input embeddings and the LM head) and
"attention" (everything else in the decoder). Experts and dense MLPs always train; the other roles
follow the `TrainConfig` flags.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tinyonn.model.moe_layer import MoELayer
from tinyonn.model.routing import HierarchicalRouter
from tinyonn.training.config import TrainConfig
from tinyonn.training.optim import MaskedAdamW

ROLES = ("expert", "shared", "router", "mlp", "norm", "embedding", "attention")


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """{parameter name: role} for every parameter of `model` (tied weights once, by their first name)."""
    embeddings = {id(p) for module in (model.get_input_embeddings(), model.get_output_embeddings())
                  if module is not None for p in module.parameters()}
    roles = {}
    for name, param in model.named_parameters():
        owner_name, attr = name.rsplit(".", 1) if "." in name else ("", name)
        owner = model.get_submodule(owner_name)
        routers = [m for m in _ancestors(model, owner_name) if isinstance(m, HierarchicalRouter)]
        if id(param) in embeddings:
            roles[name] = "embedding"
        elif routers:
            roles[name] = "router"
        elif isinstance(owner, MoELayer):
            roles[name] = "expert" if attr in ("w_gate", "w_up", "w_down") else "shared"
        elif "norm" in type(owner).__name__.lower():
            roles[name] = "norm"
        elif ".mlp." in f".{owner_name}.":
            roles[name] = "mlp"
        else:
            roles[name] = "attention"
    return roles


def _ancestors(model: nn.Module, module_name: str) -> list[nn.Module]:
    """The module at `module_name` and every module above it."""
    parts = module_name.split(".") if module_name else []
    return [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) + 1)]


def trains(role: str, config: TrainConfig) -> bool:
    """Whether parameters of `role` are trained under `config`."""
    return {"expert": True, "mlp": True, "shared": config.train_shared, "router": config.train_routers,
            "norm": config.train_norms, "embedding": config.train_embeddings,
            "attention": config.train_attention}[role]


@dataclass(frozen=True)
class TrainedParameters:
    """The trained parameters by name, their roles, and the reverse map for the optimiser state."""

    by_name: dict[str, nn.Parameter]
    roles: dict[str, str]

    @property
    def names(self) -> dict[nn.Parameter, str]:
        return {param: name for name, param in self.by_name.items()}

    def parameters(self) -> list[nn.Parameter]:
        return list(self.by_name.values())


def select_trained(model: nn.Module, config: TrainConfig) -> TrainedParameters:
    """Set `requires_grad` per role and return the trained parameters."""
    roles = parameter_roles(model)
    by_name = {}
    for name, param in model.named_parameters():
        keep = trains(roles[name], config)
        param.requires_grad_(keep)
        if keep:
            by_name[name] = param
    return TrainedParameters(by_name, {name: roles[name] for name in by_name})


def build_optimizer(trained: TrainedParameters, config: TrainConfig) -> MaskedAdamW:
    """MaskedAdamW with groups: routers at `router_lr`, the rest at `lr`; weight decay on matrices only."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in trained.by_name.items():
        groups.setdefault((trained.roles[name] == "router", param.dim() >= 2), []).append(param)
    param_groups = [
        {"params": params, "lr_scale": config.router_lr / config.lr if router else 1.0,
         "weight_decay": config.weight_decay if matrix else 0.0}
        for (router, matrix), params in sorted(groups.items())
    ]
    return MaskedAdamW(param_groups, lr=config.lr, betas=config.betas, eps=config.eps)


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every parameter (not the buffers: RoPE frequencies stay as they are) to `dtype`."""
    for param in model.parameters():
        if param.dtype != dtype and param.is_floating_point():
            param.data = param.data.to(dtype)
