"""The TinyONN model: the teacher's architecture with every MLP replaced by a MoE layer.

`TinyONNForCausalLM` builds the teacher's own causal LM from its config (`self.backbone`: embeddings,
attention, norms, head, KV cache, `generate` all as usual) and swaps each decoder layer's `mlp` for a
`MoELayer`. A MoE layer holds the kept teacher units packed expert by expert (`w_gate`, `w_up`
[U, d], `w_down` [d, U]), an always-on shared expert, and a `HierarchicalRouter`.

Every selected expert adds its units' outputs with weight 1:
    y = Σ_{units j of selected experts} down_j · silu(g_j)·u_j  +  shared(x)
so with every unit kept and every expert selected the layer is the teacher's MLP. Each unit's h is
multiplied by 1 + p − p.detach() (p = the probability of its expert): 1 in the forward, a gradient
to the router in the backward. `moe_forward` is that computation as a stateless function (dense
masked reference: every unit is computed, then masked); `MoELayer.forward` calls it with its own
parameters, so `torch.func.functional_call` works on it.

Importing this module registers "tinyonn" with `AutoConfig` and `AutoModelForCausalLM`.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast

from tinyonn.routing import HierarchicalRouter, RouterOutput, RoutingConfig, route
from tinyonn.teacher import decoder_layers


class TinyONNConfig(PreTrainedConfig):
    """The teacher's config (`text_config`, the Hugging Face name for a composite model's language
    model, so `generate` and the caches find it) plus each layer's expert layout and the routing."""

    model_type = "tinyonn"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3")}

    text_config: dict | PreTrainedConfig | None = None
    """The teacher's config; saved as a dict in config.json."""
    teacher_model_type: str | None = None
    expert_sizes: list[list[int]] | None = None
    """Per layer, the number of routed units of each expert (packing order)."""
    expert_group: list[list[int]] | None = None
    """Per layer, the router group of each expert."""
    shared_sizes: list[int] | None = None
    """Per layer, the number of units in the always-on shared expert."""
    routing: dict | None = None
    """A `RoutingConfig` as a dict."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        text = self.text_config
        layers, width = text.num_hidden_layers, text.intermediate_size
        self.teacher_model_type = self.teacher_model_type or text.model_type
        # defaults: one expert holding every unit (the teacher's MLP)
        self.expert_sizes = self.expert_sizes if self.expert_sizes is not None else [[width]] * layers
        self.expert_group = self.expert_group if self.expert_group is not None else [
            [0] * len(sizes) for sizes in self.expert_sizes]
        self.shared_sizes = self.shared_sizes if self.shared_sizes is not None else [0] * layers
        self.routing = asdict(RoutingConfig(**(self.routing or {})))
        if not len(self.expert_sizes) == len(self.expert_group) == len(self.shared_sizes) == layers:
            raise ValueError(f"expert_sizes, expert_group and shared_sizes need one entry per layer ({layers})")
        for layer, (sizes, groups) in enumerate(zip(self.expert_sizes, self.expert_group)):
            if len(sizes) != len(groups) or not sizes:
                raise ValueError(f"layer {layer}: expert_group needs one entry per expert and ≥ 1 expert")

    @property
    def teacher_config(self) -> PreTrainedConfig:
        return self.text_config

    @property
    def routing_config(self) -> RoutingConfig:
        return RoutingConfig(**self.routing)


# ---------------------------------------------------------------- the MoE layer


def swiglu_units(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """x [N, d] → h = silu(x·Wg^T) · (x·Wu^T), [N, units]."""
    return F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)


def moe_forward(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor,
                routing: RoutingConfig, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterOutput]:
    """The stateless MoE layer: x [..., d] → (y [..., d], RouterOutput over the N flattened tokens).

    `params`: `w_gate`, `w_up` [U, d], `w_down` [d, U], `shared_gate`, `shared_up` [S, d],
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
    y = F.linear(h * expert_weight[:, buffers["unit_expert"]].to(h.dtype), params["w_down"])
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
        self.w_down = nn.Parameter(torch.empty(hidden_size, units))
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


# ---------------------------------------------------------------- the model


def _router_shape(routing: RoutingConfig) -> tuple:
    return routing.router, routing.router_hidden if routing.router == "mlp" else None


class TinyONNForCausalLM(PreTrainedModel, GenerationMixin):
    """The teacher's causal LM (`self.backbone`) with a `MoELayer` in place of every MLP."""

    config_class = TinyONNConfig
    config: TinyONNConfig
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: TinyONNConfig):
        super().__init__(config)
        self.backbone = AutoModelForCausalLM.from_config(config.text_config)
        routing = config.routing_config
        hidden = config.text_config.hidden_size
        for index, block in enumerate(decoder_layers(self.backbone)):
            block.mlp = MoELayer(hidden, config.expert_sizes[index], config.expert_group[index],
                                 config.shared_sizes[index], routing)
        self.post_init()

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers in layer order."""
        return [block.mlp for block in decoder_layers(self.backbone)]

    def set_routing(self, routing: RoutingConfig) -> None:
        """Use `routing` in every layer (the router's architecture must stay the same)."""
        if _router_shape(routing) != _router_shape(self.config.routing_config):
            raise ValueError("set_routing cannot change the router architecture; assemble a new model")
        for layer in self.moe_layers():
            layer.router.config = routing
        self.config.routing = asdict(routing)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """The backbone's forward (KV cache, loss with `labels`, `logits_to_keep` as usual)."""
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                             logits_to_keep=logits_to_keep, **kwargs)


AutoConfig.register("tinyonn", TinyONNConfig, exist_ok=True)
AutoModelForCausalLM.register(TinyONNConfig, TinyONNForCausalLM, exist_ok=True)
