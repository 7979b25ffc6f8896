"""The deterministic data order of a run: which samples each optimiser step reads.

Epoch e visits the samples in the order `numpy.random.default_rng((seed, e)).permutation(n)`; the
epochs are concatenated into one stream, and each step takes the next `batch_size · grad_accum`
samples of it as `grad_accum` micro-batches (a step may span two epochs). The plan stops at
`max_steps`, or after the step that reaches `max_tokens` attended tokens, or (with neither limit) at
the end of the first epoch. The whole plan is a pure function of the sample lengths and the config,
so a resumed run reads exactly what an uninterrupted one would from step k on, and the cosine
schedule knows the total number of steps up front.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch.nn.functional as F

from tinyonn.data import IGNORE_INDEX, Batch, EncodedSample


@dataclass(frozen=True)
class PlannedStep:
    """One optimiser step's samples and where it starts in the data stream."""

    micro_batches: tuple[tuple[int, ...], ...]
    """Positions (in the encoded sample list) of each micro-batch's samples."""
    epoch: int
    """Epoch of the step's first sample."""
    offset: int
    """Position of the step's first sample in that epoch's permutation."""
    tokens: int
    """Attended tokens (prompt and response) of the step."""
    response_tokens: int
    """Tokens the CE scores (response labels after the causal shift)."""
    pairs: int
    """Positions with an attended next token (what the KL covers with kd_tokens="all")."""


def scored_tokens(sample: EncodedSample) -> int:
    """Response tokens of a sample that a next-token loss scores (the first position never is)."""
    return sum(label != IGNORE_INDEX for label in sample.labels[1:])


def plan_steps(samples: Sequence[EncodedSample], batch_size: int, grad_accum: int, seed: int,
               max_steps: int | None, max_tokens: int | None) -> list[PlannedStep]:
    """Every step of the run in order (see the module docstring)."""
    if not samples:
        raise ValueError("no training samples: every example was empty or truncated away")
    n = len(samples)
    lengths = [len(s.input_ids) for s in samples]
    scored = [scored_tokens(s) for s in samples]
    per_step = batch_size * grad_accum
    one_epoch = max_steps is None and max_tokens is None
    steps: list[PlannedStep] = []
    stream: list[tuple[int, int, int]] = []  # (sample, epoch, offset) not yet assigned to a step
    epoch, tokens_seen = 0, 0
    while True:
        if max_steps is not None and len(steps) >= max_steps:
            break
        if max_tokens is not None and tokens_seen >= max_tokens:
            break
        while len(stream) < per_step and not (one_epoch and epoch >= 1):
            order = np.random.default_rng((seed, epoch)).permutation(n)
            stream.extend((int(i), epoch, offset) for offset, i in enumerate(order))
            epoch += 1
        if not stream:
            break
        taken, stream = stream[:per_step], stream[per_step:]
        chosen = [i for i, _, _ in taken]
        tokens = sum(lengths[i] for i in chosen)
        steps.append(PlannedStep(
            micro_batches=tuple(tuple(chosen[s:s + batch_size]) for s in range(0, len(chosen), batch_size)),
            epoch=taken[0][1], offset=taken[0][2], tokens=tokens,
            response_tokens=sum(scored[i] for i in chosen), pairs=sum(lengths[i] - 1 for i in chosen)))
        tokens_seen += tokens
    return steps


def pad_to_multiple(batch: Batch, multiple: int, pad_token_id: int) -> Batch:
    """A right-padded batch padded further to a length that is a multiple of `multiple` (attention
    0, label −100: no loss term changes)."""
    extra = -batch.input_ids.shape[1] % multiple
    if not extra:
        return batch
    return Batch(input_ids=F.pad(batch.input_ids, (0, extra), value=pad_token_id),
                 attention_mask=F.pad(batch.attention_mask, (0, extra), value=0),
                 labels=F.pad(batch.labels, (0, extra), value=IGNORE_INDEX),
                 sample_index=batch.sample_index, categories=batch.categories)
