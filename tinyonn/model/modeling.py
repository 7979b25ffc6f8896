"""The TinyONN model: the teacher's architecture with every MLP replaced by a MoE layer.

`TinyONNForCausalLM` builds the teacher's own causal LM from its config (`self.backbone`: embeddings,
attention, norms, head, KV cache, `generate` all as usual) and swaps each decoder layer's `mlp` for a
`MoELayer` (`tinyonn.model.moe_layer`: the layer, its stateless `moe_forward`, and why the layer with every
unit kept and every expert selected is the teacher's MLP). Compiled with `backend="tinyonn"`
(`tinyonn.compile`), each layer's masked expert computation runs as the ragged Triton kernels.

Routing is explicit state with one home, the config (`tinyonn.model.config`): `set_routing` is the
only way to change it (`routing_scope` changes it for a block and restores it).
`forward(..., output_router_logits=True)` returns every layer's `RouterOutput` in `router_outputs`.

Importing this module registers "tinyonn" with `AutoConfig` and `AutoModelForCausalLM`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from tinyonn.model.config import TinyONNConfig
from tinyonn.model.moe_layer import MoELayer, record_routing
from tinyonn.model.routing import RouterOutput, RoutingConfig
from tinyonn.teacher import decoder_layers


_CACHE_ARGUMENT = ("cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
                   else "past_key_values")
"""What this transformers version calls the KV cache argument of a causal LM's forward."""


def _router_shape(routing: RoutingConfig) -> tuple:
    return routing.router, routing.router_hidden if routing.router == "mlp" else None


@dataclass
class TinyONNCausalLMOutput(CausalLMOutputWithPast):
    """The backbone's output plus, with `output_router_logits=True`, each layer's routing."""

    router_outputs: tuple[RouterOutput, ...] | None = None
    """Per MoE layer: scores and mask over the N = batch × length tokens of this call."""


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
        hidden = config.text_config.hidden_size
        for index, (block, routing) in enumerate(zip(decoder_layers(self.backbone), config.routing_configs)):
            block.mlp = MoELayer(hidden, config.expert_sizes[index], config.expert_group[index],
                                 config.shared_sizes[index], routing)
        self.post_init()

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers in layer order."""
        return [block.mlp for block in decoder_layers(self.backbone)]

    @property
    def routing(self) -> tuple[RoutingConfig, ...]:
        """The routing of each layer (from the config, the one source of truth)."""
        return self.config.routing_configs

    def set_routing(self, routing: RoutingConfig | Sequence[RoutingConfig]) -> None:
        """Use `routing` in every layer, or `routing[i]` in layer i. The only way routing changes;
        it is written to the config, so `save_pretrained` keeps it. The router architecture
        (`router`, `router_hidden`) cannot change: assemble a new model for that."""
        layers = self.moe_layers()
        per_layer = [routing] * len(layers) if isinstance(routing, RoutingConfig) else list(routing)
        if len(per_layer) != len(layers):
            raise ValueError(f"set_routing needs one RoutingConfig per layer ({len(layers)}), got {len(per_layer)}")
        shape = _router_shape(self.routing[0])
        if any(_router_shape(r) != shape for r in per_layer):
            raise ValueError("set_routing cannot change the router architecture; assemble a new model")
        self.config.routing = [asdict(r) for r in per_layer]
        for layer, layer_routing in zip(layers, per_layer):
            layer.routing = layer_routing

    @contextmanager
    def routing_scope(self, routing: RoutingConfig | Sequence[RoutingConfig]) -> Iterator[None]:
        """Use `routing` inside the block and restore the previous routing on exit."""
        previous = self.routing
        self.set_routing(routing)
        try:
            yield
        finally:
            self.set_routing(previous)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                output_router_logits: bool = False, **kwargs) -> TinyONNCausalLMOutput:
        """The backbone's forward (KV cache, loss with `labels`, `logits_to_keep` as usual); with
        `output_router_logits`, each layer's `RouterOutput` in `router_outputs`. The KV cache is
        `cache` in newer transformers and `past_key_values` in older ones: either is passed on."""
        kv = cache if cache is not None else past_key_values
        if kv is not None:
            kwargs[_CACHE_ARGUMENT] = kv
        with record_routing(self.moe_layers() if output_router_logits else []) as routed:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                logits_to_keep=logits_to_keep, **kwargs)
        router_outputs = tuple(layer[-1] for layer in routed) if output_router_logits else None
        return TinyONNCausalLMOutput(**out, router_outputs=router_outputs)


AutoConfig.register("tinyonn", TinyONNConfig, exist_ok=True)
AutoModelForCausalLM.register(TinyONNConfig, TinyONNForCausalLM, exist_ok=True)
