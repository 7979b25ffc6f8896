"""Typed, frozen configuration objects for every stage.

Configs are plain frozen dataclasses: hashable, comparable, and turned into JSON with
`dataclasses.asdict` so that each stage records the exact config it ran with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


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


@dataclass(frozen=True)
class TeacherModelConfig:
    """Shape of the embedded Qwen3 teacher (see `tinyonn.pretrain`)."""

    vocab_size: int = 16384
    hidden_size: int = 384
    intermediate_size: int = 1536
    num_hidden_layers: int = 8
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True


@dataclass(frozen=True)
class PretrainConfig:
    """The teacher pretraining recipe: data mix, optimiser, schedule, checkpointing."""

    model: TeacherModelConfig = field(default_factory=TeacherModelConfig)
    seq_len: int = 512
    batch_size: int = 256
    """Sequences per optimiser step."""
    micro_batch_size: int = 256
    total_tokens: int = 210_000_000
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    sft_fraction: float = 0.08
    """Fraction of training sequences drawn from the probe train split in chat form."""
    seed: int = 1234
    checkpoint_every_s: float = 120.0
    compile: bool = True
    dtype: Literal["bfloat16", "float32"] = "bfloat16"


@dataclass(frozen=True)
class ProbeConfig:
    """How the probe measures the teacher's units (see `tinyonn.probe`)."""

    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=512, batch_size=8))
    chunk_samples: int = 256
    """Samples per store chunk: the unit of atomic writes and of resuming."""
    freq_threshold: float = 1.0
    """A unit fires on a token when |h| exceeds this multiple of the token's RMS of h over the layer."""
    per_sample: bool = True
    """Keep the per-sample [N, U] arrays (float16); False keeps only aggregates (`--aggregates-only`)."""
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
    sort_by_length: bool = True
    """Batch samples of similar length together inside a chunk (less padding); results keep the
    data set's order."""
