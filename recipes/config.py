"""Configs of the builtin teacher's recipe: its shape and its pretraining run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class TeacherModelConfig:
    """Shape of the embedded Qwen3 teacher (see `recipes.pretrain`)."""

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
