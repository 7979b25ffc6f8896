"""Routing kernels in Triton: the same functions and signatures as `routing_reference.py`.

- `route_topk`: one fused kernel, one program per block of tokens with the whole expert row (and
  group row) in registers, padded to powers of two (E ≤ 256, G ≤ 64 keep it in registers). It loops
  over the groups for the group-wise log-softmax, then picks the experts by repeated argmax (best
  score, lowest index on ties) and masks each pick. The scores' gradient (`_RouteTopK.backward`) is
  a few plain torch ops on the saved scores and group log-probabilities.
- `dispatch_indices`: deterministic, no atomics and no host sync. A grid of (expert × chunk of
  pairs) programs counts each expert's pairs per chunk; torch turns the counts into segment offsets
  and per-chunk bases (tiny cumsums); the same grid then ranks each pair within its expert by a
  running count and `tl.cumsum` over blocks of the flat ids, writing `slot_row` and `row_token`,
  and each expert's first program writes its tiles' `tile_expert`.
- `gather_rows`, `combine_rows`, `combine_rows_backward`: one program per block of rows (or tokens)
  looping over the columns in chunks; sums in float32, int64 offsets into the activations.

Like `ragged_swiglu.py`, the kernels use Triton builtins (`tl.full`, `tl.exp`) rather than the
`tl.zeros` / `tl.sigmoid` helpers of triton.language.standard.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .routing_reference import Dispatch, dispatch_rows

__all__ = ["Dispatch", "combine_rows", "combine_rows_backward", "dispatch_indices", "dispatch_rows",
           "gather_rows", "route_topk"]

ROUTE_ELEMENTS = 2048
"""Token block × padded experts of one `route_topk` program (2048: ~144 registers at E = 256, no spills)."""
DISPATCH_BLOCK = 1024
"""Flat (token, slot) pairs one dispatch step looks at."""
DISPATCH_CHUNK = 16 * DISPATCH_BLOCK
"""Pairs per dispatch program (one running count per expert and chunk)."""
GATHER_BLOCK = 16
"""Rows (or tokens) per program of the gather/combine kernels."""
COLUMN_BLOCK = 128
"""Widest column chunk of the gather/combine kernels."""


# ---------------------------------------------------------------- route_topk


@triton.jit
def _route_topk_kernel(group_ptr, expert_ptr, expert_group_ptr, scores_ptr, group_lp_ptr, ids_ptr, probs_ptr,
                       N, G, E, top_k, group_picks,
                       BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr,
                       PICK_GROUPS: tl.constexpr):
    neg_inf = float("-inf")
    tokens = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    token_ok = tokens < N
    rows = tokens.to(tl.int64)
    groups = tl.arange(0, BLOCK_G)
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < E
    expert_group = tl.load(expert_group_ptr + experts, mask=expert_ok, other=-1).to(tl.int32)

    # groups with at least one expert; P(group) is a softmax over those
    populated = groups < 0
    for g in range(G):
        has_expert = tl.max((expert_group == g).to(tl.int32), axis=0) > 0
        populated = populated | ((groups == g) & has_expert)
    group_mask = token_ok[:, None] & (groups < G)[None, :]
    group_logits = tl.load(group_ptr + rows[:, None] * G + groups[None, :], mask=group_mask, other=0.0)
    group_logits = tl.where(populated[None, :], group_logits.to(tl.float32), neg_inf)
    shifted = group_logits - tl.max(group_logits, axis=1)[:, None]
    group_lp = shifted - tl.log(tl.sum(tl.exp(shifted), axis=1))[:, None]
    tl.store(group_lp_ptr + rows[:, None] * G + groups[None, :], group_lp, mask=group_mask)

    # log P(expert | group) = logit − logsumexp of the group's logits (stabilised by the group's max)
    expert_mask = token_ok[:, None] & expert_ok[None, :]
    logits = tl.load(expert_ptr + rows[:, None] * E + experts[None, :], mask=expert_mask, other=0.0).to(tl.float32)
    peak = tl.full((BLOCK_N, BLOCK_E), 0.0, tl.float32)  # per expert: its group's max logit
    for g in range(G):
        member = (expert_group == g)[None, :]
        group_peak = tl.max(tl.where(member, logits, neg_inf), axis=1)
        peak = tl.where(member, group_peak[:, None], peak)
    exp_logits = tl.exp(logits - peak)
    lse = tl.full((BLOCK_N, BLOCK_E), 0.0, tl.float32)  # per expert: its group's logsumexp
    expert_lp = tl.full((BLOCK_N, BLOCK_E), 0.0, tl.float32)  # per expert: its group's log P(group)
    for g in range(G):
        member = (expert_group == g)[None, :]
        total = tl.maximum(tl.sum(tl.where(member, exp_logits, 0.0), axis=1), 1.0)  # ≥ 1 unless g is empty
        lse = tl.where(member, (tl.log(total) + tl.max(tl.where(member, peak, neg_inf), axis=1))[:, None], lse)
        lp = tl.sum(tl.where(groups[None, :] == g, group_lp, 0.0), axis=1)
        expert_lp = tl.where(member, lp[:, None], expert_lp)
    scores = tl.where(expert_ok[None, :], expert_lp + (logits - lse), neg_inf)
    tl.store(scores_ptr + rows[:, None] * E + experts[None, :], scores, mask=expert_mask)

    # the best `group_picks` groups by log P(group) (ties → lower group), then the experts
    if PICK_GROUPS:
        allowed = expert_mask & (experts < 0)[None, :]
        open_groups = group_mask
        for _ in range(group_picks):
            candidates = tl.where(open_groups, group_lp, neg_inf)
            best = tl.max(candidates, axis=1)
            pick = tl.min(tl.where(open_groups & (candidates == best[:, None]), groups[None, :], BLOCK_G), axis=1)
            open_groups = open_groups & (groups[None, :] != pick[:, None])
            allowed = allowed | (expert_group[None, :] == pick[:, None])
    else:
        allowed = expert_mask
    eligible = allowed & (scores > neg_inf)
    for slot in range(top_k):
        candidates = tl.where(eligible, scores, neg_inf)
        best = tl.max(candidates, axis=1)
        pick = tl.min(tl.where(eligible & (candidates == best[:, None]), experts[None, :], BLOCK_E), axis=1)
        found = pick < BLOCK_E
        tl.store(ids_ptr + rows * top_k + slot, tl.where(found, pick, -1), mask=token_ok)
        tl.store(probs_ptr + rows * top_k + slot, tl.where(found, tl.exp(best), 0.0), mask=token_ok)
        eligible = eligible & (experts[None, :] != pick[:, None])


class _RouteTopK(torch.autograd.Function):
    """Fused Triton forward; the backward is plain torch ops.

    With s[e] = lp[g(e)] + z[e] − lse_{g(e)}(z), lp = log_softmax over the populated groups of the
    group logits, q[e] = exp(s[e] − lp[g(e)]) = P(e | g(e)), S[g] = Σ_{e in g} ds[e] and P(g) = exp(lp[g]):
        dz[e] = ds[e] − q[e]·S[g(e)],    d(group logits)[g] = S[g] − P(g)·Σ_e ds[e]
    (an empty group has P(g) = 0 and S[g] = 0, hence no gradient).
    """

    @staticmethod
    def forward(ctx, group_logits, expert_logits, expert_group, top_k, top_groups):
        group_logits, expert_logits = group_logits.contiguous(), expert_logits.contiguous()
        (n, num_groups), num_experts = group_logits.shape, expert_logits.shape[1]
        device = expert_logits.device
        scores = torch.empty(n, num_experts, dtype=torch.float32, device=device)
        group_lp = torch.empty(n, num_groups, dtype=torch.float32, device=device)
        expert_ids = torch.empty(n, top_k, dtype=torch.int32, device=device)
        probs = torch.empty(n, top_k, dtype=torch.float32, device=device)
        group_picks = top_groups if 0 < top_groups < num_groups else 0
        if n:
            block_e, block_g = triton.next_power_of_2(num_experts), triton.next_power_of_2(num_groups)
            block_n = max(1, min(64, ROUTE_ELEMENTS // block_e))
            _route_topk_kernel[(triton.cdiv(n, block_n),)](
                group_ptr=group_logits, expert_ptr=expert_logits, expert_group_ptr=expert_group.contiguous(),
                scores_ptr=scores, group_lp_ptr=group_lp, ids_ptr=expert_ids, probs_ptr=probs,
                N=n, G=num_groups, E=num_experts, top_k=top_k, group_picks=group_picks,
                BLOCK_N=block_n, BLOCK_G=block_g, BLOCK_E=block_e, PICK_GROUPS=group_picks > 0)
        ctx.save_for_backward(scores, group_lp, expert_group)
        ctx.dtypes = group_logits.dtype, expert_logits.dtype
        ctx.mark_non_differentiable(expert_ids, probs)
        return scores, expert_ids, probs

    @staticmethod
    def backward(ctx, d_scores, _d_ids, _d_probs):
        scores, group_lp, expert_group = ctx.saved_tensors
        d_scores = d_scores.float()
        within = (scores - group_lp[:, expert_group]).exp()
        group_sum = torch.zeros_like(group_lp).index_add_(1, expert_group, d_scores)
        d_expert = d_scores - within * group_sum[:, expert_group]
        d_group = group_sum - group_lp.exp() * d_scores.sum(-1, keepdim=True)
        return d_group.to(ctx.dtypes[0]), d_expert.to(ctx.dtypes[1]), None, None, None


def route_topk(group_logits: torch.Tensor, expert_logits: torch.Tensor, expert_group: torch.Tensor,
               top_k: int, top_groups: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores [N, E] float32, expert_ids [N, top_k] int32, probs [N, top_k] float32) of
    `routing_reference.route_topk`; only the scores carry a gradient.

    With `top_groups` > 0 the groups are ranked by log P(group), which the reference's logsumexp of
    the group's scores equals up to rounding: groups tied within rounding may resolve differently.
    """
    return _RouteTopK.apply(group_logits, expert_logits, expert_group, top_k, top_groups)


# ---------------------------------------------------------------- dispatch_indices


@triton.jit
def _count_kernel(ids_ptr, partial_ptr, pairs, chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """partial[e, c] = pairs of chunk c routed to expert e."""
    expert, chunk = tl.program_id(0), tl.program_id(1)
    count = 0
    for start in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, pairs), BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offsets, mask=offsets < pairs, other=-1)
        count += tl.sum((ids == expert).to(tl.int32), axis=0)
    tl.store(partial_ptr + expert * chunks + chunk, count)


@triton.jit
def _rank_kernel(ids_ptr, base_ptr, segment_ptr, row_token_ptr, slot_row_ptr, tile_expert_ptr,
                 pairs, chunks, num_slots, block, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Rows of expert e's pairs in chunk c: from base[e, c] (the segment's start plus the pairs of
    earlier chunks) in flat order; program (e, 0) also marks the segment's tiles as e's."""
    expert, chunk = tl.program_id(0), tl.program_id(1)
    next_row = tl.load(base_ptr + expert * chunks + chunk)
    for start in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, pairs), BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offsets, mask=offsets < pairs, other=-1)
        mine = (ids == expert).to(tl.int32)
        rows = next_row + tl.cumsum(mine, axis=0) - 1
        tl.store(slot_row_ptr + offsets, rows, mask=mine > 0)
        tl.store(row_token_ptr + rows, offsets // num_slots, mask=mine > 0)
        next_row += tl.sum(mine, axis=0)
    if chunk == 0:
        first_tile = tl.load(segment_ptr + expert) // block
        end_tile = tl.load(segment_ptr + expert + 1) // block
        for tile in range(first_tile, end_tile, BLOCK):
            tiles = tile + tl.arange(0, BLOCK)
            tl.store(tile_expert_ptr + tiles, tl.full((BLOCK,), 0, tl.int32) + expert, mask=tiles < end_tile)


def dispatch_indices(expert_ids: torch.Tensor, num_experts: int, block: int = 128) -> Dispatch:
    """`Dispatch` of `routing_reference.dispatch_indices`, bit for bit, without a host sync."""
    n, num_slots = expert_ids.shape
    pairs, device = n * num_slots, expert_ids.device
    rows = dispatch_rows(pairs, num_experts, block)
    flat = expert_ids.reshape(-1).contiguous()
    chunks = triton.cdiv(pairs, DISPATCH_CHUNK)
    partial = torch.zeros(num_experts, chunks, dtype=torch.int32, device=device)
    grid = (num_experts, chunks)
    if chunks and num_experts:
        _count_kernel[grid](ids_ptr=flat, partial_ptr=partial, pairs=pairs, chunks=chunks,
                            CHUNK=DISPATCH_CHUNK, BLOCK=DISPATCH_BLOCK)
    counts = partial.sum(1, dtype=torch.int32)
    padded = (counts + block - 1) // block * block
    segment_offsets = torch.cat([counts.new_zeros(1), padded.cumsum(0, dtype=torch.int32)])
    chunk_base = segment_offsets[:-1, None] + partial.cumsum(1, dtype=torch.int32) - partial
    row_token = torch.full((rows,), -1, dtype=torch.int32, device=device)
    slot_row = torch.full((n, num_slots), -1, dtype=torch.int32, device=device)
    tile_expert = torch.full((rows // block,), -1, dtype=torch.int32, device=device)
    if chunks and num_experts:
        _rank_kernel[grid](ids_ptr=flat, base_ptr=chunk_base.contiguous(), segment_ptr=segment_offsets,
                           row_token_ptr=row_token, slot_row_ptr=slot_row, tile_expert_ptr=tile_expert,
                           pairs=pairs, chunks=chunks, num_slots=num_slots, block=block,
                           CHUNK=DISPATCH_CHUNK, BLOCK=DISPATCH_BLOCK)
    return Dispatch(row_token, slot_row, segment_offsets, tile_expert, counts)


# ---------------------------------------------------------------- gather / combine


def _column_block(d: int) -> int:
    return max(16, min(COLUMN_BLOCK, triton.next_power_of_2(d)))


@triton.jit
def _gather_rows_kernel(x_ptr, row_token_ptr, out_ptr, R, D, s_x, s_out,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    token = tl.load(row_token_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    source = token[:, None] * s_x
    target = rows.to(tl.int64)[:, None] * s_out
    for c in range(0, D, BLOCK_D):
        cols = c + tl.arange(0, BLOCK_D)
        col_ok = (cols < D)[None, :]
        values = tl.load(x_ptr + source + cols[None, :], mask=(token >= 0)[:, None] & col_ok, other=0.0)
        tl.store(out_ptr + target + cols[None, :], values, mask=row_ok[:, None] & col_ok)


def gather_rows(x: torch.Tensor, row_token: torch.Tensor) -> torch.Tensor:
    """x [N, d] → [R, d] of `routing_reference.gather_rows` (not differentiable: its gradient is
    `combine_rows(dx_sorted, slot_row, ones)`)."""
    x = x.contiguous()
    rows, d = row_token.shape[0], x.shape[1]
    out = x.new_empty(rows, d)
    if rows:
        _gather_rows_kernel[(triton.cdiv(rows, GATHER_BLOCK),)](
            x_ptr=x, row_token_ptr=row_token.contiguous(), out_ptr=out, R=rows, D=d, s_x=x.stride(0),
            s_out=out.stride(0), BLOCK_R=GATHER_BLOCK, BLOCK_D=_column_block(d))
    return out


@triton.jit
def _combine_rows_kernel(y_ptr, slot_row_ptr, weights_ptr, out_ptr, N, D, K, s_y, s_out,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    token_ok = tokens < N
    pair = tokens.to(tl.int64) * K
    target = tokens.to(tl.int64)[:, None] * s_out
    for c in range(0, D, BLOCK_D):
        cols = c + tl.arange(0, BLOCK_D)
        col_ok = (cols < D)[None, :]
        acc = tl.full((BLOCK_N, BLOCK_D), 0.0, tl.float32)
        for slot in range(K):
            row = tl.load(slot_row_ptr + pair + slot, mask=token_ok, other=-1).to(tl.int64)
            weight = tl.load(weights_ptr + pair + slot, mask=row >= 0, other=0.0).to(tl.float32)
            values = tl.load(y_ptr + row[:, None] * s_y + cols[None, :], mask=(row >= 0)[:, None] & col_ok, other=0.0)
            acc += weight[:, None] * values.to(tl.float32)
        tl.store(out_ptr + target + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=token_ok[:, None] & col_ok)


def combine_rows(y_sorted: torch.Tensor, slot_row: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y [N, d] of `routing_reference.combine_rows` (float32 sums, y_sorted's dtype)."""
    y_sorted = y_sorted.contiguous()
    (n, num_slots), d = slot_row.shape, y_sorted.shape[1]
    out = y_sorted.new_empty(n, d)
    if n:
        _combine_rows_kernel[(triton.cdiv(n, GATHER_BLOCK),)](
            y_ptr=y_sorted, slot_row_ptr=slot_row.contiguous(), weights_ptr=weights.contiguous(), out_ptr=out,
            N=n, D=d, K=num_slots, s_y=y_sorted.stride(0), s_out=out.stride(0),
            BLOCK_N=GATHER_BLOCK, BLOCK_D=_column_block(d))
    return out


@triton.jit
def _combine_rows_backward_kernel(dy_ptr, y_ptr, slot_row_ptr, weights_ptr, dy_sorted_ptr, dweights_ptr,
                                  N, D, K, s_dy, s_y,
                                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    token_ok = tokens < N
    pair = tokens.to(tl.int64) * K
    slots = tl.arange(0, BLOCK_K)
    dweights = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
    for c in range(0, D, BLOCK_D):
        cols = c + tl.arange(0, BLOCK_D)
        col_ok = (cols < D)[None, :]
        dy = tl.load(dy_ptr + tokens.to(tl.int64)[:, None] * s_dy + cols[None, :], mask=token_ok[:, None] & col_ok,
                     other=0.0).to(tl.float32)
        for slot in range(K):
            row = tl.load(slot_row_ptr + pair + slot, mask=token_ok, other=-1).to(tl.int64)
            weight = tl.load(weights_ptr + pair + slot, mask=row >= 0, other=0.0).to(tl.float32)
            offsets = row[:, None] * s_y + cols[None, :]
            mask = (row >= 0)[:, None] & col_ok
            values = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            dweights += tl.where(slots[None, :] == slot, tl.sum(values * dy, axis=1)[:, None], 0.0)
            tl.store(dy_sorted_ptr + offsets, (weight[:, None] * dy).to(dy_sorted_ptr.dtype.element_ty), mask=mask)
    tl.store(dweights_ptr + pair[:, None] + slots[None, :], dweights, mask=token_ok[:, None] & (slots < K)[None, :])


def combine_rows_backward(dy: torch.Tensor, y_sorted: torch.Tensor, slot_row: torch.Tensor,
                          weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy_sorted [R, d] in y_sorted's dtype, dweights [N, k] float32) of
    `routing_reference.combine_rows_backward`; rows no slot points at are 0."""
    dy, y_sorted = dy.contiguous(), y_sorted.contiguous()
    (n, num_slots), d = slot_row.shape, y_sorted.shape[1]
    dy_sorted = torch.zeros_like(y_sorted)
    dweights = torch.zeros(n, num_slots, dtype=torch.float32, device=dy.device)
    if n:
        _combine_rows_backward_kernel[(triton.cdiv(n, GATHER_BLOCK),)](
            dy_ptr=dy, y_ptr=y_sorted, slot_row_ptr=slot_row.contiguous(), weights_ptr=weights.contiguous(),
            dy_sorted_ptr=dy_sorted, dweights_ptr=dweights, N=n, D=d, K=num_slots, s_dy=dy.stride(0),
            s_y=y_sorted.stride(0), BLOCK_N=GATHER_BLOCK, BLOCK_D=_column_block(d),
            BLOCK_K=triton.next_power_of_2(num_slots))
    return dy_sorted, dweights
