"""How sparse a TinyONN model really runs: FFN units active per token, measured from its routing."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tinyonn.config import DataConfig
from tinyonn.data import Example, encode_examples, iter_batches


class count_active_units:
    """Count each MoE layer's routed units per attended token during the forwards run inside the
    block (full-sequence forwards with an `attention_mask`, or none):

        with count_active_units(model) as counts:
            model(input_ids=ids, attention_mask=mask)
        counts.routed_per_layer()   # [layers] mean routed units per attended token

    Hooks on the model (to read the call's attention mask) and on each router (its 0/1 mask)."""

    def __init__(self, model):
        self.model = model
        self.layers = model.moe_layers()
        self.units = [0.0] * len(self.layers)
        self.tokens = [0] * len(self.layers)
        self._attended: torch.Tensor | None = None
        self._handles: list = []

    def _read_mask(self, module, args, kwargs) -> None:
        self._attended = kwargs.get("attention_mask")

    def _count(self, index: int, output) -> None:
        mask = output.mask
        attended = self._attended
        if attended is not None:
            rows = attended.shape[0]
            keep = attended[:, -(mask.shape[0] // rows):].reshape(-1).to(mask.device).bool()
            mask = mask[keep]
        sizes = self.layers[index].expert_sizes.to(mask.dtype)
        self.units[index] += float((mask @ sizes).sum())
        self.tokens[index] += int(mask.shape[0])

    def __enter__(self) -> count_active_units:
        self._handles.append(self.model.register_forward_pre_hook(self._read_mask, with_kwargs=True))
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.router.register_forward_hook(
                lambda module, args, output, index=index: self._count(index, output)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def routed_per_layer(self) -> list[float]:
        """Mean routed units per attended token, per layer."""
        return [units / max(tokens, 1) for units, tokens in zip(self.units, self.tokens)]

    def active_fraction(self, teacher_units: int) -> float:
        """Mean over layers of (shared + routed units) / `teacher_units`, as `active_unit_fraction`."""
        shared = [layer.shared_gate.shape[0] for layer in self.layers]
        return sum(r + s for r, s in zip(self.routed_per_layer(), shared)) / (len(self.layers) * teacher_units)


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
