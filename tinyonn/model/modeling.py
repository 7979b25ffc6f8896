"""The TinyONN model: the teacher's architecture with every MLP replaced by a MoE layer.

`TinyONNForCausalLM` builds the teacher's own causal LM from its config (`self.backbone`: embeddings,
attention, norms, head, KV cache, `generate` all as usual) and swaps each decoder layer's `mlp` for a
`MoELayer` (`tinyonn.model.moe_layer`: the layer, its stateless `moe_forward`, and why the layer with every
unit kept and every expert selected is the teacher's MLP). Compiled with `backend="tinyonn"`
(`tinyonn.compile`), each layer's masked expert computation runs as the ragged Triton kernels.

Importing this module registers "tinyonn" with `AutoConfig` and `AutoModelForCausalLM`.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast

from tinyonn.model.moe_layer import MoELayer
from tinyonn.model.routing import RoutingConfig
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
