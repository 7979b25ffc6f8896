"""Typed, frozen configuration objects for every stage.

Configs are plain frozen dataclasses: hashable, comparable, and turned into JSON with
`dataclasses.asdict` so that each stage records the exact config it ran with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


def _check_int(owner: object, name: str, minimum: int, optional: bool = False) -> None:
    value = getattr(owner, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{type(owner).__name__}.{name} must be an integer ≥ {minimum}"
                         f"{' or None' if optional else ''}, got {value!r}")


def _check_choice(owner: object, name: str, choices: tuple) -> None:
    value = getattr(owner, name)
    if value not in choices:
        raise ValueError(f"{type(owner).__name__}.{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """How probe examples become token batches."""

    max_length: int = 512
    """Longest sample in tokens (prompt + response + template tokens)."""
    truncation_side: Literal["left", "right"] = "left"
    """`left` drops the oldest prompt tokens first; `right` cuts the end (the response may go)."""
    padding_side: Literal["left", "right"] = "right"
    batch_size: int = 8
    use_chat_template: bool = True
    """Use the tokenizer's chat template when it has one; else a plain User/Assistant template."""
    system_prompt: str | None = None

    def __post_init__(self):
        _check_int(self, "max_length", 2)
        _check_int(self, "batch_size", 1)
        _check_choice(self, "truncation_side", ("left", "right"))
        _check_choice(self, "padding_side", ("left", "right"))


@dataclass(frozen=True)
class ProbeConfig:
    """How the probe measures the teacher's units (see `tinyonn.probe.run`)."""

    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=512, batch_size=8))
    chunk_samples: int = 256
    """Samples per store chunk: the unit of atomic writes and of resuming."""
    freq_threshold: float = 1.0
    """A unit fires on a token when |h| exceeds this multiple of the token's RMS of h over the layer."""
    per_sample: bool = True
    """Keep the per-sample [N, U] arrays (float16); False keeps only aggregates (`--aggregates-only`)."""
    per_sample_codec: Literal["zstd", "none"] = "zstd"
    """How the per-sample arrays are stored: Blosc/Zstd, or "none" (raw, memory-mappable by
    `ScoreStore.open(path, mmap=True)`; about 1.3x the disk); both checksummed."""
    heads: bool = True
    """Also measure attention heads (output norm, per-sample gradient norm of o_proj columns)."""
    grad_method: Literal["auto", "gram", "direct"] = "auto"
    """Per-sample norms through T×T Gram matrices or materialised per-sample gradients; auto picks
    the one with fewer FLOPs for the batch's shape."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quant: Literal["none", "nf4", "int8"] = "none"
    device: str | None = None
    max_samples: int | None = None
    compile: bool = False
    """Fuse the decoder's elementwise glue (norms, attention, SwiGLU) with torch.compile; the
    projections stay eager modules so the probe's hooks see them (worth it on a GPU)."""
    grad_target: Literal["label", "teacher"] = "label"
    """What the per-sample gradient (grad, taylor) is taken against: "label", the data's response
    tokens (the loss), or "teacher", targets drawn from the teacher's own next-token distribution
    at each response position (seeded by `target_seed`). The expected squared gradient of the
    latter is the Fisher information, the curvature of the KL to the teacher's distribution (whose
    own gradient at the teacher is 0): how much removing a unit moves the teacher's predictions,
    whatever the labels say. `samples/loss` is then the NLL of the drawn targets."""
    target_seed: int = 0
    """Seed of the "teacher" targets (per batch, from the batch's tokens: resumes draw the same)."""
    engine: Literal["auto", "hooks", "graph"] = "auto"
    """How a batch is probed: "hooks" (forward and tensor hooks on the projections, one vmapped
    statistics call per layer during the backward), "graph" (zero activation taps as inputs of one
    decoder graph, one backward to all taps, then the statistics; `tinyonn.probe.graph`; with
    `compile` one compiled forward and backward) or "auto": graph on a GPU for the decoder families
    it supports, hooks otherwise."""
    sort_by_length: bool = True
    """Batch samples of similar length together inside a chunk (less padding); results keep the
    data set's order."""

    def __post_init__(self):
        if not isinstance(self.data, DataConfig):
            raise ValueError(f"ProbeConfig.data must be a DataConfig, got {type(self.data).__name__}")
        _check_int(self, "chunk_samples", 1)
        _check_int(self, "max_samples", 1, optional=True)
        _check_int(self, "target_seed", 0)
        if isinstance(self.freq_threshold, bool) or not isinstance(self.freq_threshold, (int, float)) \
                or not math.isfinite(self.freq_threshold) or self.freq_threshold < 0:
            raise ValueError(f"ProbeConfig.freq_threshold must be a finite number ≥ 0, got {self.freq_threshold!r}")
        _check_choice(self, "per_sample_codec", ("zstd", "none"))
        _check_choice(self, "grad_method", ("auto", "gram", "direct"))
        _check_choice(self, "dtype", ("float32", "bfloat16", "float16"))
        _check_choice(self, "quant", ("none", "nf4", "int8"))
        _check_choice(self, "grad_target", ("label", "teacher"))
        if self.device is not None and (not isinstance(self.device, str) or not self.device.strip()):
            raise ValueError(f"ProbeConfig.device must be a device name (cpu, cuda, cuda:1, ...) or None, "
                             f"got {self.device!r}")
