"""Ragged grouped SwiGLU in Triton: tokens sorted by expert, any number of units per expert (0 included).

Same signatures as `reference.py`. The launch grids enumerate tiles precomputed on the host from the
offsets, so ragged sizes need no padding of the weights: each tile knows its row range, column range
and reduction (K) range and masks everything beyond them. Three kernels:

- `_swiglu_h_kernel`: h = silu(x·Wg^T)·(x·Wu^T) for (token block × unit block) of one expert.
- `_swiglu_h_backward_kernel`: recomputes g, u and takes dh = dy·Wd in the same loop over d, then
  writes h, dg, du.
- `_ragged_matmul_kernel`: out[r, c] = Σ_{k in tile's K range} a[r, k]·b[k, c] (+ a2·b2), with strides
  and index shifts per operand; it does y = h·Wd^T, dx = dg·Wg + du·Wu, dWg = dg^T·x, dWu = du^T·x and
  dWd = (h^T·dy)^T.

h, dg, du live in an [M, max units] buffer whose column j is unit `unit_offsets[e] + j` of row's expert
(only the expert's own units are ever computed). Accumulation is fp32; fp32 inputs use IEEE dots.
The offsets are read on the host (one sync per call) to build the tiles.

The kernels use only Triton builtins (`tl.full`, `tl.exp`, not the `tl.zeros` / `tl.sigmoid` helpers of
triton.language.standard): those helpers are fixed as compiled or interpreted when triton is first
imported, so they would break `TRITON_INTERPRET=1` runs in a process that imported triton earlier
(e.g. torch.compile in another test).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 32
"""Default block size for rows, columns and K (tl.dot needs ≥ 16)."""


@triton.jit
def _unit_tile(tiles_ptr, BM: tl.constexpr, BN: tl.constexpr):
    """This program's (token rows × units) tile: indices, masks and the unit column base."""
    tile = tiles_ptr + tl.program_id(0) * 5
    r0, r_end = tl.load(tile), tl.load(tile + 1)
    c0, c_end, c_base = tl.load(tile + 2), tl.load(tile + 3), tl.load(tile + 4)
    rows = (r0 + tl.arange(0, BM)).to(tl.int64)
    units = (c0 + tl.arange(0, BN)).to(tl.int64)
    return rows, units, rows < r_end, units < c_end, c_base


@triton.jit
def _swiglu_h_kernel(tiles_ptr, x_ptr, wg_ptr, wu_ptr, h_ptr, D,
                     s_xm, s_xd, s_wu, s_wd, s_hm, s_hn,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    rows, units, rmask, umask, c_base = _unit_tile(tiles_ptr, BM, BN)
    acc_g = tl.full((BM, BN), 0.0, tl.float32)
    acc_u = tl.full((BM, BN), 0.0, tl.float32)
    for k in range(0, D, BK):
        ks = k + tl.arange(0, BK)
        kmask = ks < D
        x = tl.load(x_ptr + rows[:, None] * s_xm + ks[None, :] * s_xd, mask=rmask[:, None] & kmask[None, :], other=0.0)
        w_offs = units[None, :] * s_wu + ks[:, None] * s_wd
        w_mask = kmask[:, None] & umask[None, :]
        acc_g = tl.dot(x, tl.load(wg_ptr + w_offs, mask=w_mask, other=0.0), acc_g, input_precision=PREC)
        acc_u = tl.dot(x, tl.load(wu_ptr + w_offs, mask=w_mask, other=0.0), acc_u, input_precision=PREC)
    h = acc_g * (1.0 / (1.0 + tl.exp(-acc_g))) * acc_u
    h_offs = rows[:, None] * s_hm + (units - c_base)[None, :] * s_hn
    tl.store(h_ptr + h_offs, h.to(h_ptr.dtype.element_ty), mask=rmask[:, None] & umask[None, :])


@triton.jit
def _swiglu_h_backward_kernel(tiles_ptr, x_ptr, dy_ptr, wg_ptr, wu_ptr, wd_ptr, h_ptr, dg_ptr, du_ptr, D,
                              s_xm, s_xd, s_wu, s_wd, s_dd, s_du, s_hm, s_hn,
                              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    rows, units, rmask, umask, c_base = _unit_tile(tiles_ptr, BM, BN)
    acc_g = tl.full((BM, BN), 0.0, tl.float32)
    acc_u = tl.full((BM, BN), 0.0, tl.float32)
    acc_dh = tl.full((BM, BN), 0.0, tl.float32)
    for k in range(0, D, BK):
        ks = k + tl.arange(0, BK)
        kmask = ks < D
        x_mask = rmask[:, None] & kmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * s_xm + ks[None, :] * s_xd, mask=x_mask, other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * s_xm + ks[None, :] * s_xd, mask=x_mask, other=0.0)
        w_mask = kmask[:, None] & umask[None, :]
        w_offs = units[None, :] * s_wu + ks[:, None] * s_wd
        acc_g = tl.dot(x, tl.load(wg_ptr + w_offs, mask=w_mask, other=0.0), acc_g, input_precision=PREC)
        acc_u = tl.dot(x, tl.load(wu_ptr + w_offs, mask=w_mask, other=0.0), acc_u, input_precision=PREC)
        wd = tl.load(wd_ptr + ks[:, None] * s_dd + units[None, :] * s_du, mask=w_mask, other=0.0)
        acc_dh = tl.dot(dy, wd, acc_dh, input_precision=PREC)
    sig = (1.0 / (1.0 + tl.exp(-acc_g)))
    s = acc_g * sig
    du = acc_dh * s
    dg = acc_dh * acc_u * sig * (1.0 + acc_g * (1.0 - sig))
    offs = rows[:, None] * s_hm + (units - c_base)[None, :] * s_hn
    mask = rmask[:, None] & umask[None, :]
    tl.store(h_ptr + offs, (s * acc_u).to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ragged_matmul_kernel(tiles_ptr, a_ptr, b_ptr, a2_ptr, b2_ptr, out_ptr,
                          s_ar, s_ak, s_bk, s_bn, s_or, s_on, HAS_SECOND: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    # tile: rows [r0, r_end), cols [c0, c_end), K [k0, k_end); a is read at (r - a_r_shift, k - a_k_shift)
    tile = tiles_ptr + tl.program_id(0) * 8
    r0, r_end = tl.load(tile), tl.load(tile + 1)
    c0, c_end = tl.load(tile + 2), tl.load(tile + 3)
    k0, k_end = tl.load(tile + 4), tl.load(tile + 5)
    a_r_shift, a_k_shift = tl.load(tile + 6), tl.load(tile + 7)
    rows = (r0 + tl.arange(0, BM)).to(tl.int64)
    cols = (c0 + tl.arange(0, BN)).to(tl.int64)
    rmask, cmask = rows < r_end, cols < c_end
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for k in range(k0, k_end, BK):
        ks = (k + tl.arange(0, BK)).to(tl.int64)
        kmask = ks < k_end
        a_offs = (rows - a_r_shift)[:, None] * s_ar + (ks - a_k_shift)[None, :] * s_ak
        a_mask = rmask[:, None] & kmask[None, :]
        b_offs = ks[:, None] * s_bk + cols[None, :] * s_bn
        b_mask = kmask[:, None] & cmask[None, :]
        acc = tl.dot(tl.load(a_ptr + a_offs, mask=a_mask, other=0.0), tl.load(b_ptr + b_offs, mask=b_mask, other=0.0),
                     acc, input_precision=PREC)
        if HAS_SECOND:
            acc = tl.dot(tl.load(a2_ptr + a_offs, mask=a_mask, other=0.0),
                         tl.load(b2_ptr + b_offs, mask=b_mask, other=0.0), acc, input_precision=PREC)
    out_offs = rows[:, None] * s_or + cols[None, :] * s_on
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


# ---------------------------------------------------------------- host side: tiles and launches


def _bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    values = offsets.tolist()
    return list(zip(values[:-1], values[1:]))


def _tile_tensor(rows: list[tuple[int, ...]], width: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1, width)


def _unit_tiles(tokens, units, block, device):
    """(token block × unit block) of each expert: (r0, r_end, u0, u_end, expert's first unit)."""
    tiles = [(r, m1, c, u1, u0) for (m0, m1), (u0, u1) in zip(tokens, units)
             for r in range(m0, m1, block) for c in range(u0, u1, block)]
    return _tile_tensor(tiles, 5, device)


def _row_tiles(tokens, units, d, block, device):
    """(token block × d block), K = the expert's units (0 units: the tile writes zeros)."""
    tiles = [(r, m1, c, d, u0, u1, 0, u0) for (m0, m1), (u0, u1) in zip(tokens, units)
             for r in range(m0, m1, block) for c in range(0, d, block)]
    return _tile_tensor(tiles, 8, device)


def _weight_tiles(tokens, units, d, block, device):
    """(unit block × d block), K = the expert's tokens (0 tokens: the tile writes zeros)."""
    tiles = [(r, u1, c, d, m0, m1, u0, 0) for (m0, m1), (u0, u1) in zip(tokens, units)
             for r in range(u0, u1, block) for c in range(0, d, block)]
    return _tile_tensor(tiles, 8, device)


def _precision(*tensors: torch.Tensor) -> str:
    return "ieee" if any(t.dtype == torch.float32 for t in tensors) else "tf32"


def _matmul(tiles, a, b, out, a_strides, b_strides, out_strides, block, prec, a2=None, b2=None):
    if tiles.shape[0]:
        _ragged_matmul_kernel[(tiles.shape[0],)](
            tiles, a, b, a if a2 is None else a2, b if b2 is None else b2, out,
            *a_strides, *b_strides, *out_strides, HAS_SECOND=a2 is not None,
            BM=block, BN=block, BK=block, PREC=prec)


def _h_buffer(x: torch.Tensor, units) -> torch.Tensor:
    width = max([u1 - u0 for u0, u1 in units], default=0)
    return x.new_zeros(x.shape[0], max(width, 1))


def _forward(x, tokens, units, w_gate, w_up, w_down, block):
    d, prec = x.shape[1], _precision(x, w_gate)
    h = _h_buffer(x, units)
    tiles = _unit_tiles(tokens, units, block, x.device)
    if tiles.shape[0]:
        _swiglu_h_kernel[(tiles.shape[0],)](tiles, x, w_gate, w_up, h, d, x.stride(0), x.stride(1),
                                            w_gate.stride(0), w_gate.stride(1), h.stride(0), h.stride(1),
                                            BM=block, BN=block, BK=block, PREC=prec)
    y = x.new_zeros(x.shape[0], w_down.shape[0])
    _matmul(_row_tiles(tokens, units, w_down.shape[0], block, x.device), h, w_down, y,
            (h.stride(0), h.stride(1)), (w_down.stride(1), w_down.stride(0)), (y.stride(0), y.stride(1)), block, prec)
    return y


def _backward(dy, x, tokens, units, w_gate, w_up, w_down, block):
    d, prec = x.shape[1], _precision(x, w_gate)
    h, dg, du = _h_buffer(x, units), _h_buffer(x, units), _h_buffer(x, units)
    tiles = _unit_tiles(tokens, units, block, x.device)
    if tiles.shape[0]:
        _swiglu_h_backward_kernel[(tiles.shape[0],)](
            tiles, x, dy, w_gate, w_up, w_down, h, dg, du, d, x.stride(0), x.stride(1),
            w_gate.stride(0), w_gate.stride(1), w_down.stride(0), w_down.stride(1), h.stride(0), h.stride(1),
            BM=block, BN=block, BK=block, PREC=prec)
    hs = (h.stride(0), h.stride(1))
    dx = torch.zeros_like(x)
    _matmul(_row_tiles(tokens, units, d, block, x.device), dg, w_gate, dx, hs,
            (w_gate.stride(0), w_gate.stride(1)), (dx.stride(0), dx.stride(1)), block, prec, a2=du, b2=w_up)
    weight_tiles = _weight_tiles(tokens, units, d, block, x.device)
    hs_t = (h.stride(1), h.stride(0))  # a[unit, token] = buffer[token, unit - u0]
    dw_gate, dw_up, dw_down = torch.zeros_like(w_gate), torch.zeros_like(w_up), torch.zeros_like(w_down)
    _matmul(weight_tiles, dg, x, dw_gate, hs_t, (x.stride(0), x.stride(1)), (dw_gate.stride(0), dw_gate.stride(1)),
            block, prec)
    _matmul(weight_tiles, du, x, dw_up, hs_t, (x.stride(0), x.stride(1)), (dw_up.stride(0), dw_up.stride(1)),
            block, prec)
    _matmul(weight_tiles, h, dy, dw_down, hs_t, (dy.stride(0), dy.stride(1)),
            (dw_down.stride(1), dw_down.stride(0)), block, prec)
    return dx, dw_gate, dw_up, dw_down


class RaggedSwiGLU(torch.autograd.Function):
    """Autograd wrapper: forward and backward both in Triton (h is recomputed in the backward)."""

    @staticmethod
    def forward(ctx, x_sorted, token_offsets, w_gate, w_up, w_down, unit_offsets, block=BLOCK):
        x_sorted, w_gate, w_up, w_down = (t.contiguous() for t in (x_sorted, w_gate, w_up, w_down))
        ctx.tokens, ctx.units, ctx.block = _bounds(token_offsets), _bounds(unit_offsets), block
        ctx.save_for_backward(x_sorted, w_gate, w_up, w_down)
        return _forward(x_sorted, ctx.tokens, ctx.units, w_gate, w_up, w_down, block)

    @staticmethod
    def backward(ctx, dy):
        x_sorted, w_gate, w_up, w_down = ctx.saved_tensors
        dx, dw_gate, dw_up, dw_down = _backward(dy.contiguous(), x_sorted, ctx.tokens, ctx.units,
                                                w_gate, w_up, w_down, ctx.block)
        return dx, None, dw_gate, dw_up, dw_down, None, None


def ragged_swiglu(x_sorted: torch.Tensor, token_offsets: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                  w_down: torch.Tensor, unit_offsets: torch.Tensor, *, block: int = BLOCK) -> torch.Tensor:
    """y [M, d] of `reference.ragged_swiglu`, differentiable (Triton forward and backward)."""
    return RaggedSwiGLU.apply(x_sorted, token_offsets, w_gate, w_up, w_down, unit_offsets, block)


def ragged_swiglu_backward(dy: torch.Tensor, x_sorted: torch.Tensor, token_offsets: torch.Tensor,
                           w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                           unit_offsets: torch.Tensor, *, block: int = BLOCK
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw_gate, dw_up, dw_down) of `reference.ragged_swiglu_backward`, in Triton."""
    x_sorted, w_gate, w_up, w_down = (t.contiguous() for t in (x_sorted, w_gate, w_up, w_down))
    return _backward(dy.contiguous(), x_sorted, _bounds(token_offsets), _bounds(unit_offsets),
                     w_gate, w_up, w_down, block)
