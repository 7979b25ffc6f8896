"""`TinyONNConfig`: the teacher's config plus each layer's expert layout and routing.

Routing is explicit state with one home: `routing` holds one `RoutingConfig` (as a dict) per layer;
`TinyONNForCausalLM.set_routing` is the only way it changes, and it is saved and reloaded with the
model. Works with transformers 5.17 (the GPU image's) and newer: the composite config is declared
both the old way (`sub_configs`) and the new (`sub_configs_defaults`).
"""

from __future__ import annotations

from dataclasses import asdict

from transformers import AutoConfig, PreTrainedConfig

try:  # transformers ≥ 5.2x; 5.17 (the GPU image's) declares sub-configs with `sub_configs` only
    from transformers.configuration_utils import SubConfigSpec
except ImportError:
    SubConfigSpec = None

from tinyonn.model.routing import RoutingConfig


class TinyONNConfig(PreTrainedConfig):
    """The teacher's config (`text_config`, the Hugging Face name for a composite model's language
    model, so `generate` and the caches find it) plus each layer's expert layout and the routing."""

    model_type = "tinyonn"
    sub_configs = {"text_config": AutoConfig}  # older transformers; a class property in newer ones
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3")} \
        if SubConfigSpec is not None else {}  # newer transformers build text_config from it

    text_config: dict | PreTrainedConfig | None = None
    """The teacher's config; saved as a dict in config.json."""
    teacher_model_type: str | None = None
    expert_sizes: list[list[int]] | None = None
    """Per layer, the number of routed units of each expert (packing order)."""
    expert_group: list[list[int]] | None = None
    """Per layer, the router group of each expert."""
    shared_sizes: list[int] | None = None
    """Per layer, the number of units in the always-on shared expert."""
    routing: list[dict] | dict | None = None
    """One `RoutingConfig` (as a dict) per layer; a single dict applies to every layer."""

    def __post_init__(self, **kwargs):
        if isinstance(self.text_config, dict):  # older transformers leave the sub-config to us
            text = dict(self.text_config)
            self.text_config = AutoConfig.for_model(text.pop("model_type", "qwen3"), **text)
        elif self.text_config is None:  # a default config (transformers builds one to diff against)
            self.text_config = AutoConfig.for_model("qwen3")
        super().__post_init__(**kwargs)
        text = self.text_config
        layers, width = text.num_hidden_layers, text.intermediate_size
        self.teacher_model_type = self.teacher_model_type or text.model_type
        # defaults: one expert holding every unit (the teacher's MLP)
        self.expert_sizes = self.expert_sizes if self.expert_sizes is not None else [[width]] * layers
        self.expert_group = self.expert_group if self.expert_group is not None else [
            [0] * len(sizes) for sizes in self.expert_sizes]
        self.shared_sizes = self.shared_sizes if self.shared_sizes is not None else [0] * layers
        routing = self.routing if self.routing is not None else {}
        routing = [routing] * layers if isinstance(routing, dict) else list(routing)
        if len(routing) != layers:
            raise ValueError(f"routing needs one entry per layer ({layers}), got {len(routing)}")
        self.routing = [asdict(r if isinstance(r, RoutingConfig) else RoutingConfig(**r)) for r in routing]
        if len({(r["router"], r["router_hidden"] if r["router"] == "mlp" else None) for r in self.routing}) > 1:
            raise ValueError("every layer's routing must use the same router architecture (router, router_hidden)")
        if not len(self.expert_sizes) == len(self.expert_group) == len(self.shared_sizes) == layers:
            raise ValueError(f"expert_sizes, expert_group and shared_sizes need one entry per layer ({layers})")
        for layer, (sizes, groups) in enumerate(zip(self.expert_sizes, self.expert_group)):
            if len(sizes) != len(groups) or not sizes:
                raise ValueError(f"layer {layer}: expert_group needs one entry per expert and ≥ 1 expert")

    @property
    def teacher_config(self) -> PreTrainedConfig:
        return self.text_config

    @property
    def routing_configs(self) -> tuple[RoutingConfig, ...]:
        """The routing of each layer."""
        return tuple(RoutingConfig(**r) for r in self.routing)


# ---------------------------------------------------------------- the model
