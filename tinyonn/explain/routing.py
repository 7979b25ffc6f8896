"""What a saved TinyONN model does on held-out examples: per response token, its category, its
token id, and in every MoE layer the experts its own routing selected and each expert's mean |h|.

The model runs as saved (its `RoutingConfig` per layer, oracle or router), with
`output_router_logits=True` for the selections and a forward hook on each MoE layer that reads
the layer's input and computes every routed unit's h (`MoELayer.dense_h`) for the activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tinyonn.config import DataConfig
from tinyonn.data import Example, encode_examples, iter_batches


@dataclass(frozen=True)
class RoutingRecord:
    """Every held-out response token's routing, layer by layer (N tokens)."""

    categories: tuple[str, ...]
    token_ids: np.ndarray
    """[N] int64."""
    category: np.ndarray
    """[N] int64 index into `categories`."""
    masks: tuple[np.ndarray, ...]
    """Per MoE layer [N, E_l] bool: the experts the model selected for the token."""
    activation: tuple[np.ndarray, ...]
    """Per MoE layer [N, E_l] float32: the mean |h| over each expert's units (selected or not)."""
    expert_sizes: tuple[np.ndarray, ...]
    """Per MoE layer [E_l] units per expert."""
    examples: int

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def pick_examples(examples: Sequence[Example], per_category: int) -> list[Example]:
    """The first `per_category` examples of each category, in their order (0: all of them)."""
    if per_category == 0:
        return list(examples)
    taken: dict[str, int] = {}
    picked = []
    for example in examples:
        if taken.get(example.category, 0) < per_category:
            taken[example.category] = taken.get(example.category, 0) + 1
            picked.append(example)
    return picked


@torch.no_grad()
def record_model_routing(model, tokenizer, examples: Sequence[Example], data: DataConfig) -> RoutingRecord:
    """Run `model` (a `TinyONNForCausalLM`) on `examples` with its own routing and keep, for each
    response token, what every MoE layer selected and how strongly each expert's units fired."""
    samples, _ = encode_examples(tokenizer, list(examples), data)
    if not samples:
        raise ValueError("no held-out example left after encoding (all empty or truncated away)")
    categories = tuple(sorted({s.category for s in samples}))
    code = {name: i for i, name in enumerate(categories)}
    layers = model.moe_layers()
    device = next(model.parameters()).device
    response: list[torch.Tensor] = []  # the current batch's response-token mask, read by the hooks
    activation: list[list[torch.Tensor]] = [[] for _ in layers]

    def hook(index: int):
        def read(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])[response[0]]
            h = module.dense_h(x).abs().float()
            per_expert = h.new_zeros(h.shape[0], module.num_experts).index_add_(1, module.unit_expert, h)
            activation[index].append((per_expert / module.expert_sizes.clamp(min=1).float()).cpu())
        return read

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    token_ids, category, masks = [], [], [[] for _ in layers]
    try:
        for batch in iter_batches(samples, data.batch_size, tokenizer.pad_token_id, "right"):
            keep = (batch.labels != -100).reshape(-1).to(device)
            response[:] = [keep]
            out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                        output_router_logits=True)
            for index, routed in enumerate(out.router_outputs):
                masks[index].append(routed.mask[keep].bool().cpu())
            token_ids.append(batch.input_ids.reshape(-1)[keep.cpu()])
            rows = torch.tensor([code[c] for c in batch.categories]).repeat_interleave(batch.input_ids.shape[1])
            category.append(rows[keep.cpu()])
    finally:
        for handle in handles:
            handle.remove()
    return RoutingRecord(
        categories=categories, token_ids=torch.cat(token_ids).numpy().astype(np.int64),
        category=torch.cat(category).numpy().astype(np.int64),
        masks=tuple(torch.cat(m).numpy() for m in masks),
        activation=tuple(torch.cat(a).numpy() for a in activation),
        expert_sizes=tuple(layer.expert_sizes.cpu().numpy() for layer in layers), examples=len(samples))
