"""Calibration tokens: the teacher's MLP inputs on a bounded number of probe tokens, with its FFN
weights, so any unit's per-token activation h = silu(x·g)·(x·u) can be recomputed.

The probe stores per-sample summaries; per-token quantities (CMoE's firing vectors, the analytic
router's load-balancing bias, output compensation, router warm-up targets) come from one forward
pass of the teacher over a few probe examples, kept here. Memory is bounded by `max_tokens`:
tokens × hidden × layers float32 values (32k tokens of the builtin teacher: 400 MB).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from tinyonn.config import DataConfig
from tinyonn.data import Example, encode_examples, iter_batches
from tinyonn.teacher import dequantize, ffn_layout


@dataclass(frozen=True)
class CalibrationConfig:
    """Which tokens calibrate: examples spread evenly over the given ones, up to `max_tokens`."""

    max_tokens: int = 32768
    """Tokens kept (every non-pad token of the examples read, prompt and response)."""
    max_examples: int = 1024
    """Examples read at most (evenly strided over the ones given)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=512, batch_size=16))

    def __post_init__(self):
        if self.max_tokens < 1 or self.max_examples < 1:
            raise ValueError("CalibrationConfig.max_tokens and max_examples must be >= 1")


@dataclass(frozen=True)
class Calibration:
    """Per decoder layer (in `layers` order): the MLP inputs [N, d] and the FFN weights, float32, CPU."""

    layers: tuple[int, ...]
    inputs: tuple[torch.Tensor, ...]
    """[N, d] MLP input of each calibration token."""
    gate: tuple[torch.Tensor, ...]
    """[I, d] gate_proj weight."""
    up: tuple[torch.Tensor, ...]
    """[I, d] up_proj weight."""
    down: tuple[torch.Tensor, ...]
    """[d, I] down_proj weight."""

    @property
    def n_tokens(self) -> int:
        return int(self.inputs[0].shape[0]) if self.inputs else 0

    def position(self, layer: int) -> int:
        """Index of decoder layer `layer` in this calibration's tuples."""
        return self.layers.index(int(layer))

    def activations(self, layer: int, units: torch.Tensor | None = None) -> torch.Tensor:
        """[N, units] h = silu(x·g)·(x·u) of decoder layer `layer` (all of its units by default)."""
        i = self.position(layer)
        gate, up = self.gate[i], self.up[i]
        if units is not None:
            gate, up = gate[units], up[units]
        x = self.inputs[i]
        return F.silu(x @ gate.T) * (x @ up.T)

    @classmethod
    @torch.no_grad()
    def collect(cls, teacher, tokenizer, examples: Sequence[Example],
                config: CalibrationConfig | None = None) -> Calibration:
        """One forward pass of `teacher` over examples spread evenly over `examples` (at most
        `max_examples`, then strided again so their tokens roughly fit `max_tokens`: every part of
        the data, e.g. every category of a split ordered by category, is represented), keeping
        every non-pad token's MLP input up to `config.max_tokens`."""
        config = config or CalibrationConfig()
        examples = list(examples)[:: max(1, len(examples) // config.max_examples)][: config.max_examples]
        samples, _ = encode_examples(tokenizer, examples, config.data)
        total = sum(len(sample.input_ids) for sample in samples)
        if total > config.max_tokens:  # evenly spread over every example given
            keep = np.linspace(0, len(samples) - 1, math.ceil(len(samples) * config.max_tokens / total))
            samples = [samples[i] for i in np.unique(keep.round().astype(np.int64))]
        layout = ffn_layout(teacher)
        device = teacher.get_input_embeddings().weight.device
        captured: list[list[torch.Tensor]] = [[] for _ in layout]
        current: dict[str, torch.Tensor] = {}

        def keep(index: int):
            def hook(module, args):
                x = args[0].reshape(-1, args[0].shape[-1])[current["mask"]]
                captured[index].append(x.float().cpu())
            return hook

        handles = [ffn.gate_proj.register_forward_pre_hook(keep(i)) for i, ffn in enumerate(layout)]
        tokens = 0
        try:
            for batch in iter_batches(samples, config.data.batch_size, tokenizer.pad_token_id, "right"):
                current["mask"] = batch.attention_mask.reshape(-1).bool().to(device)
                teacher(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
                tokens += int(batch.attention_mask.sum())
                if tokens >= config.max_tokens:
                    break
        finally:
            for handle in handles:
                handle.remove()
        if not tokens:
            raise ValueError("no calibration token: the examples encode to no sample")
        inputs = tuple(torch.cat(xs)[: config.max_tokens].contiguous() for xs in captured)
        return cls(layers=tuple(ffn.layer for ffn in layout), inputs=inputs,
                   gate=tuple(dequantize(ffn.gate_proj, torch.float32).cpu() for ffn in layout),
                   up=tuple(dequantize(ffn.up_proj, torch.float32).cpu() for ffn in layout),
                   down=tuple(dequantize(ffn.down_proj, torch.float32).cpu() for ffn in layout))
