"""How sparse a TinyONN model really runs: FFN units active per token, measured from its routing."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tinyonn.config import DataConfig
from tinyonn.data import Example, encode_examples, iter_batches


@torch.no_grad()
def active_unit_fraction(model, tokenizer, examples: Sequence[Example], teacher_units: int,
                         config: DataConfig | None = None) -> float:
    """Mean over attended tokens and layers of (shared + selected routed units) / `teacher_units`
    (the teacher's FFN units per layer), as the model routes these examples."""
    config = config or DataConfig()
    samples, _ = encode_examples(tokenizer, list(examples), config)
    layers = model.moe_layers()
    shared = [layer.shared_gate.shape[0] for layer in layers]
    device = next(model.parameters()).device
    active, tokens = 0.0, 0
    for batch in iter_batches(samples, config.batch_size, tokenizer.pad_token_id, "right"):
        out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                    output_router_logits=True)
        attended = batch.attention_mask.reshape(-1).to(device).bool()
        for layer, routed, n_shared in zip(layers, out.router_outputs, shared):
            units = routed.mask[attended] @ layer.expert_sizes.to(routed.mask.dtype)
            active += float((units + n_shared).sum())
        tokens += int(attended.sum())
    return active / max(tokens * len(layers) * teacher_units, 1)
