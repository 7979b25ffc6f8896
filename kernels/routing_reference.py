"""Plain-PyTorch references for the routing kernels (the ground truth `routing.py` is tested against).

A layer routes N tokens to E experts in G groups with `top_k` slots per token. The pipeline:

1. `route_topk`: router logits → scores [N, E] (log P(group) + log P(expert | group)), the chosen
   expert ids [N, k] (descending score, -1 for an empty slot) and their probabilities [N, k].
2. `dispatch_indices`: expert ids → a `Dispatch`, the row layout of the expert-sorted activations.
   Expert e owns rows `segment_offsets[e]:segment_offsets[e+1]`: its (token, slot) pairs in
   ascending flat order, then padding rows up to a multiple of `block`, so that every block of
   rows (a "tile") belongs to one expert (`tile_expert`). The number of rows R is the static bound
   `dispatch_rows(N·k, E, block)`; rows past the last segment are padding too.
3. `gather_rows`: x [N, d] → x_sorted [R, d] (padding rows are 0).
4. `combine_rows`: expert outputs y_sorted [R, d] → y [N, d], each token's slots weighted and summed;
   `combine_rows_backward` gives its gradients. The gradient of `gather_rows` is
   `combine_rows(dx_sorted, slot_row, ones)`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from tinyonn.model.routing import hierarchical_scores, select


class Dispatch(NamedTuple):
    """Where each (token, slot) pair of a routing lands in the expert-sorted rows (all int32)."""

    row_token: torch.Tensor
    """[R] token of each sorted row; -1 for padding rows."""
    slot_row: torch.Tensor
    """[N, k] row of each (token, slot); -1 where the expert id is -1."""
    segment_offsets: torch.Tensor
    """[E+1] expert e owns rows segment_offsets[e]:segment_offsets[e+1] (counts[e] rounded up to `block`)."""
    tile_expert: torch.Tensor
    """[R // block] expert owning each block of rows; -1 past the last segment."""
    counts: torch.Tensor
    """[E] (token, slot) pairs routed to each expert."""


def dispatch_rows(pairs: int, num_experts: int, block: int) -> int:
    """R: a static upper bound on the padded rows, round_up(pairs + num_experts·(block − 1), block)."""
    return -(-(pairs + num_experts * (block - 1)) // block) * block


def route_topk(group_logits: torch.Tensor, expert_logits: torch.Tensor, expert_group: torch.Tensor,
               top_k: int, top_groups: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores [N, E] float32, expert_ids [N, top_k] int32, probs [N, top_k] float32).

    `scores` is `hierarchical_scores` (differentiable); the ids are the `top_k` best experts by
    `select` (ties → lower index; only the best `top_groups` groups when > 0), sorted by descending
    score, -1 where fewer experts are eligible. `probs` = exp(score) of the chosen experts (0 for -1),
    detached.
    """
    scores = hierarchical_scores(group_logits, expert_logits, expert_group)
    chosen = select(scores, top_k, expert_group, top_groups, num_groups=group_logits.shape[-1]).bool()
    ranked = scores.detach().masked_fill(~chosen, -math.inf).argsort(dim=-1, descending=True, stable=True)[:, :top_k]
    picked = chosen.gather(1, ranked)
    expert_ids = torch.where(picked, ranked, -1).int()
    probs = torch.where(picked, scores.detach().gather(1, ranked).exp(), 0.0)
    missing = top_k - expert_ids.shape[1]  # top_k > E
    expert_ids = torch.nn.functional.pad(expert_ids, (0, missing), value=-1)
    return scores, expert_ids, torch.nn.functional.pad(probs, (0, missing))


def dispatch_indices(expert_ids: torch.Tensor, num_experts: int, block: int = 128) -> Dispatch:
    """Expert ids [N, k] (-1: no expert) → `Dispatch`, by a stable sort of the flat (token, slot) pairs."""
    num_slots = expert_ids.shape[1]
    flat = expert_ids.reshape(-1).long()
    device, pairs = flat.device, flat.shape[0]
    rows = dispatch_rows(pairs, num_experts, block)
    key = torch.where(flat >= 0, flat, num_experts)  # unrouted pairs sort last
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts].int()
    padded = (counts + block - 1) // block * block
    segment_offsets = torch.cat([counts.new_zeros(1), padded.cumsum(0, dtype=torch.int32)])
    pair_starts = counts.cumsum(0) - counts  # first sorted position of each expert (unpadded)
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    expert = sorted_key.clamp(max=num_experts - 1)
    row = segment_offsets[expert] + torch.arange(pairs, device=device) - pair_starts[expert]
    row = torch.where(sorted_key < num_experts, row, rows)  # row R: a dump for unrouted pairs
    row_token = torch.full((rows + 1,), -1, dtype=torch.int32, device=device)
    row_token = row_token.scatter(0, row, (order // num_slots).int())[:rows]
    slot_row = torch.full((pairs,), -1, dtype=torch.int32, device=device)
    slot_row = slot_row.scatter(0, order, torch.where(row < rows, row, -1).int()).view_as(expert_ids)
    tile_starts = torch.arange(0, rows, block, device=device, dtype=torch.int32)
    tile_expert = torch.searchsorted(segment_offsets[1:], tile_starts, right=True).int()
    tile_expert = torch.where(tile_expert < num_experts, tile_expert, -1)
    return Dispatch(row_token, slot_row, segment_offsets, tile_expert, counts)


def _padded_index(index: torch.Tensor, dump: int) -> torch.Tensor:
    """Int indices with -1 → `dump` (the index of an extra zero row), as int64."""
    return torch.where(index >= 0, index, dump).long()


def _accumulation(t: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (so gradient checks in double precision work)."""
    return torch.promote_types(t.dtype, torch.float32)


def gather_rows(x: torch.Tensor, row_token: torch.Tensor) -> torch.Tensor:
    """x [N, d] → [R, d]: row r is x[row_token[r]], zeros where row_token is -1 (differentiable)."""
    padded = torch.cat([x, x.new_zeros(1, x.shape[1])])
    return padded[_padded_index(row_token, x.shape[0])]


def combine_rows(y_sorted: torch.Tensor, slot_row: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y [N, d]: y[n] = Σ_j weights[n, j]·y_sorted[slot_row[n, j]] over slots ≠ -1, summed in float32
    (float64 for float64 inputs),
    returned in y_sorted's dtype (differentiable)."""
    rows = y_sorted.shape[0]
    acc = _accumulation(y_sorted)
    padded = torch.cat([y_sorted.to(acc), y_sorted.new_zeros(1, y_sorted.shape[1], dtype=acc)])
    weights = torch.where(slot_row >= 0, weights.to(acc), 0.0)
    picked = padded[_padded_index(slot_row, rows)]  # [N, k, d]
    return (weights[..., None] * picked).sum(1).to(y_sorted.dtype)


def combine_rows_backward(dy: torch.Tensor, y_sorted: torch.Tensor, slot_row: torch.Tensor,
                          weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `combine_rows`: (dy_sorted [R, d] in y_sorted's dtype, dweights [N, k] float32).

    dy_sorted[slot_row[n, j]] = weights[n, j]·dy[n], exactly 0 on every other row;
    dweights[n, j] = <y_sorted[slot_row[n, j]], dy[n]>, 0 for -1 slots.
    """
    rows, d = y_sorted.shape
    index = _padded_index(slot_row, rows)  # [N, k]
    acc = _accumulation(y_sorted)
    contributions = weights.to(acc)[..., None] * dy.to(acc)[:, None, :]  # [N, k, d]
    dy_sorted = dy.new_zeros(rows + 1, d, dtype=acc)
    dy_sorted = dy_sorted.index_put((index.reshape(-1),), contributions.reshape(-1, d), accumulate=True)
    dy_sorted = dy_sorted[:rows].to(y_sorted.dtype)
    padded = torch.cat([y_sorted.to(acc), y_sorted.new_zeros(1, d, dtype=acc)])
    dweights = (padded[index] * dy.to(acc)[:, None, :]).sum(-1)
    return dy_sorted, dweights
