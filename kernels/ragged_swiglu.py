"""Ragged grouped SwiGLU in Triton: tokens sorted by expert, any number of units per expert (0 included).

Same signatures and layout as `reference.py`. Dispatch pads every expert's rows to a multiple of
`ROW_BLOCK` (= the kernels' row tile), so a row tile belongs to exactly one expert and sums over an
expert's tokens never need masks. Units stay ragged: all three weights are [U, d] (a unit is a row).
Every tile moves through TMA tensor descriptors built in the kernel; a descriptor over just the
expert's weight rows loads zeros past its last unit (and past d) and drops stores there, so the
main loops carry no masks.

Kernels (all accumulate in fp32; fp32 inputs use IEEE dots):
- `_units_kernel`  (row tile × unit tile, K = d): forward g = x·Wg^T, u = x·Wu^T, h = silu(g)·u;
  backward dh = dy·Wd^T and, from the saved g and u, dg and du. Columns past the expert's last
  unit are written as zeros, so the next kernel can sum over whole K tiles.
- `_rows_kernel`   (row tile × d tile, K = the expert's units): y = h·Wd, or dx = dg·Wg + du·Wu.
- `_weights_kernel` (unit tile × d tile, K = the expert's rows): dWg = dg^T·x and dWu = du^T·x, or
  dWd = h^T·dy, plus each tile's squared norm (summed per expert afterwards: SMK's surprise²).

The activation buffers h, g, u (and dg, du) are [R, H], H = `max_units` rounded up to `UNIT_PAD`:
column j of a row is unit `unit_offsets[e] + j` of the row's expert. Grids enumerate the largest
possible number of tiles and programs without work return at once, so nothing waits on the host.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from tinyonn.kernels.reference import ROW_BLOCK, SwiGLUGrads

UNIT_PAD = 128
"""The activation buffers' width is a multiple of this (≥ every unit tile of the kernels)."""

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_AUTOTUNE = os.environ.get("TINYONN_AUTOTUNE", "1") != "0"
"""`TINYONN_AUTOTUNE=0`: each kernel runs its first config (the best one measured on an H200)."""


def _configs(options: list[dict], warps: list[int], stages: list[int]) -> list[triton.Config]:
    if _INTERPRET:  # the interpreter runs each config: one small one keeps CPU tests fast
        return [triton.Config({key: min(option[key] for option in options) for key in options[0]}, num_warps=4)]
    configs = [triton.Config(option, num_warps=w, num_stages=s) for option in options for w in warps for s in stages]
    return configs if _AUTOTUNE else configs[:1]


# ---------------------------------------------------------------- kernels


@triton.autotune(configs=_configs([{"BN": 64, "BK": 64}, {"BN": 128, "BK": 64}], [4, 8], [3, 4, 5]),
                 key=["D", "H", "BACKWARD", "SAVE"])
@triton.jit
def _units_kernel(x_ptr, w1_ptr, w2_ptr, g_ptr, u_ptr, h_ptr, dg_ptr, du_ptr, tile_expert_ptr, unit_offsets_ptr,
                  R, D, H, max_units,
                  BACKWARD: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Forward: x, w1 = Wg, w2 = Wu → h (and g, u when SAVE). Backward: x = dy, w1 = Wd, saved g, u → dg, du.
    Pointers a mode does not use are None (`_launch_units_forward`, `_launch_units_backward`)."""
    pid = tl.program_id(0)
    unit_tiles = tl.cdiv(max_units, BN)
    tile, j = pid // unit_tiles, pid % unit_tiles
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    u0 = tl.load(unit_offsets_ptr + expert)
    n = tl.load(unit_offsets_ptr + expert + 1) - u0
    if j * BN >= n:
        return
    # descriptors over the expert's own weight rows: rows past its last unit (and columns past d) load as 0
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[R, D], strides=[D, 1], block_shape=[BM, BK])
    w1_desc = tl.make_tensor_descriptor(w1_ptr + u0.to(tl.int64) * D, shape=[n, D], strides=[D, 1],
                                        block_shape=[BN, BK])
    if not BACKWARD:
        w2_desc = tl.make_tensor_descriptor(w2_ptr + u0.to(tl.int64) * D, shape=[n, D], strides=[D, 1],
                                            block_shape=[BN, BK])
    acc1 = tl.full((BM, BN), 0.0, tl.float32)
    acc2 = tl.full((BM, BN), 0.0, tl.float32)
    for k in range(0, D, BK):
        a = x_desc.load([tile * BM, k])
        acc1 = tl.dot(a, w1_desc.load([j * BN, k]).T, acc1, input_precision=PREC)
        if not BACKWARD:
            acc2 = tl.dot(a, w2_desc.load([j * BN, k]).T, acc2, input_precision=PREC)
    valid = (j * BN + tl.arange(0, BN) < n)[None, :]
    at = [tile * BM, j * BN]
    if BACKWARD:
        g = tl.make_tensor_descriptor(g_ptr, shape=[R, H], strides=[H, 1], block_shape=[BM, BN]).load(at)
        u = tl.make_tensor_descriptor(u_ptr, shape=[R, H], strides=[H, 1], block_shape=[BM, BN]).load(at)
        g, u = g.to(tl.float32), u.to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        dg = acc1 * u * sig * (1.0 + g * (1.0 - sig))
        du = acc1 * g * sig
        dg_desc = tl.make_tensor_descriptor(dg_ptr, shape=[R, H], strides=[H, 1], block_shape=[BM, BN])
        du_desc = tl.make_tensor_descriptor(du_ptr, shape=[R, H], strides=[H, 1], block_shape=[BM, BN])
        dg_desc.store(at, tl.where(valid, dg, 0.0).to(dg_ptr.dtype.element_ty))
        du_desc.store(at, tl.where(valid, du, 0.0).to(du_ptr.dtype.element_ty))
    else:
        h = acc1 * (1.0 / (1.0 + tl.exp(-acc1))) * acc2
        h_desc = tl.make_tensor_descriptor(h_ptr, shape=[R, H], strides=[H, 1], block_shape=[BM, BN])
        h_desc.store(at, tl.where(valid, h, 0.0).to(h_ptr.dtype.element_ty))
        if SAVE:
            g_desc = tl.make_tensor_descriptor(g_ptr, shape=[R, H], strides=[H, 1], block_shape=[BM, BN])
            u_desc = tl.make_tensor_descriptor(u_ptr, shape=[R, H], strides=[H, 1], block_shape=[BM, BN])
            g_desc.store(at, tl.where(valid, acc1, 0.0).to(g_ptr.dtype.element_ty))
            u_desc.store(at, tl.where(valid, acc2, 0.0).to(u_ptr.dtype.element_ty))


@triton.autotune(configs=_configs([{"BN": 128, "BK": 32}, {"BN": 128, "BK": 64}, {"BN": 256, "BK": 64}],
                                  [4, 8], [3, 4, 5]),
                 key=["D", "H", "TWO"])
@triton.jit
def _rows_kernel(a1_ptr, w1_ptr, a2_ptr, w2_ptr, out_ptr, tile_expert_ptr, unit_offsets_ptr,
                 R, D, H,
                 TWO: tl.constexpr, PREC: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[rows, d tile] = a1·W1_e (+ a2·W2_e when TWO; else a2, w2 are None), K over the expert's units;
    zeros for unowned tiles."""
    pid = tl.program_id(0)
    d_tiles = tl.cdiv(D, BN)
    tile, j = pid // d_tiles, pid % d_tiles
    expert = tl.load(tile_expert_ptr + tile)
    acc = tl.full((BM, BN), 0.0, tl.float32)
    if expert >= 0:
        u0 = tl.load(unit_offsets_ptr + expert)
        n = tl.load(unit_offsets_ptr + expert + 1) - u0
        rows = tl.maximum(n, 1)  # a 0-unit expert runs no K step; its descriptor just needs a valid shape
        a1_desc = tl.make_tensor_descriptor(a1_ptr, shape=[R, H], strides=[H, 1], block_shape=[BM, BK])
        w1_desc = tl.make_tensor_descriptor(w1_ptr + u0.to(tl.int64) * D, shape=[rows, D], strides=[D, 1],
                                            block_shape=[BK, BN])
        if TWO:
            a2_desc = tl.make_tensor_descriptor(a2_ptr, shape=[R, H], strides=[H, 1], block_shape=[BM, BK])
            w2_desc = tl.make_tensor_descriptor(w2_ptr + u0.to(tl.int64) * D, shape=[rows, D], strides=[D, 1],
                                                block_shape=[BK, BN])
        for k in range(0, n, BK):  # weight rows past the expert load as 0
            acc = tl.dot(a1_desc.load([tile * BM, k]), w1_desc.load([k, j * BN]), acc, input_precision=PREC)
            if TWO:
                acc = tl.dot(a2_desc.load([tile * BM, k]), w2_desc.load([k, j * BN]), acc, input_precision=PREC)
    out_desc = tl.make_tensor_descriptor(out_ptr, shape=[R, D], strides=[D, 1], block_shape=[BM, BN])
    out_desc.store([tile * BM, j * BN], acc.to(out_ptr.dtype.element_ty))


@triton.autotune(configs=_configs([{"BU": 64, "BN": 128, "BK": 64}, {"BU": 128, "BN": 128, "BK": 64},
                                   {"BU": 128, "BN": 64, "BK": 64}], [4, 8], [3, 4]),
                 key=["D", "H", "TWO"], reset_to_zero=["sq_ptr"])
@triton.jit
def _weights_kernel(a1_ptr, a2_ptr, b_ptr, dw1_ptr, dw2_ptr, sq_ptr, segment_offsets_ptr, unit_offsets_ptr,
                    R, D, H, max_units, sq_stride,
                    TWO: tl.constexpr, PREC: tl.constexpr,
                    BU: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """dW1[expert's units, d tile] = a1^T·b (and dW2 = a2^T·b when TWO; else a2, dw2 are None), K over
    the expert's rows; the tile's squared norm goes to sq[expert, unit tile · d tile] (a row of
    `sq_stride` zeros per expert)."""
    pid = tl.program_id(0)
    unit_tiles, d_tiles = tl.cdiv(max_units, BU), tl.cdiv(D, BN)
    per_expert = unit_tiles * d_tiles
    expert, j, jd = pid // per_expert, (pid // d_tiles) % unit_tiles, pid % d_tiles
    u0 = tl.load(unit_offsets_ptr + expert)
    n = tl.load(unit_offsets_ptr + expert + 1) - u0
    if j * BU >= n:
        return
    r0 = tl.load(segment_offsets_ptr + expert)
    r1 = tl.load(segment_offsets_ptr + expert + 1)
    a1_desc = tl.make_tensor_descriptor(a1_ptr, shape=[R, H], strides=[H, 1], block_shape=[BK, BU])
    if TWO:
        a2_desc = tl.make_tensor_descriptor(a2_ptr, shape=[R, H], strides=[H, 1], block_shape=[BK, BU])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[R, D], strides=[D, 1], block_shape=[BK, BN])
    acc1 = tl.full((BU, BN), 0.0, tl.float32)
    acc2 = tl.full((BU, BN), 0.0, tl.float32)
    for r in range(r0, r1, BK):
        b = b_desc.load([r, jd * BN])
        acc1 = tl.dot(a1_desc.load([r, j * BU]).T, b, acc1, input_precision=PREC)
        if TWO:
            acc2 = tl.dot(a2_desc.load([r, j * BU]).T, b, acc2, input_precision=PREC)
    # the expert's rows only: the store drops rows past its last unit (they belong to the next expert)
    dw1_desc = tl.make_tensor_descriptor(dw1_ptr + u0.to(tl.int64) * D, shape=[n, D], strides=[D, 1],
                                         block_shape=[BU, BN])
    dw1_desc.store([j * BU, jd * BN], acc1.to(dw1_ptr.dtype.element_ty))
    valid = (j * BU + tl.arange(0, BU) < n)[:, None] & (jd * BN + tl.arange(0, BN) < D)[None, :]
    acc1 = tl.where(valid, acc1, 0.0)
    sq = tl.sum(tl.sum(acc1 * acc1, axis=1), axis=0)
    if TWO:
        dw2_desc = tl.make_tensor_descriptor(dw2_ptr + u0.to(tl.int64) * D, shape=[n, D], strides=[D, 1],
                                             block_shape=[BU, BN])
        dw2_desc.store([j * BU, jd * BN], acc2.to(dw2_ptr.dtype.element_ty))
        acc2 = tl.where(valid, acc2, 0.0)
        sq += tl.sum(tl.sum(acc2 * acc2, axis=1), axis=0)
    tl.store(sq_ptr + expert * sq_stride + pid % per_expert, sq)


# ---------------------------------------------------------------- launchers


def _precision(*tensors: torch.Tensor) -> str:
    return "ieee" if any(t.dtype == torch.float32 for t in tensors) else "tf32"


def _tile_expert(segment_offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows / ROW_BLOCK] int32: the expert owning each row tile, −1 past the last segment."""
    starts = torch.arange(0, rows, ROW_BLOCK, device=segment_offsets.device, dtype=segment_offsets.dtype)
    owner = torch.searchsorted(segment_offsets[1:].contiguous(), starts, right=True).to(torch.int32)
    return torch.where(starts < segment_offsets[-1], owner, -1)


def _check(x_sorted: torch.Tensor, weights: tuple[torch.Tensor, ...], max_units: int) -> None:
    if x_sorted.shape[0] % ROW_BLOCK:
        raise ValueError(f"x_sorted has {x_sorted.shape[0]} rows; dispatch pads to a multiple of {ROW_BLOCK}")
    for w in weights:
        if w.shape[1] != x_sorted.shape[1]:
            raise ValueError(f"weights are [U, d] with d = {x_sorted.shape[1]}; got {tuple(w.shape)}")
    if max_units < 0:
        raise ValueError("max_units must be ≥ 0")
    if x_sorted.shape[1] * x_sorted.element_size() % 16:
        raise ValueError(f"rows of {x_sorted.shape[1]} × {x_sorted.element_size()} bytes: TMA needs a multiple of 16 bytes")


def _width(max_units: int) -> int:
    return max(UNIT_PAD, -(-max_units // UNIT_PAD) * UNIT_PAD)


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the tensor descriptors the kernels build on the device."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _prepare(x: torch.Tensor) -> None:
    if x.is_cuda:
        triton.set_allocator(_tma_scratch)


def _units_grid(rows: int, max_units: int):
    tiles = rows // ROW_BLOCK
    return lambda meta: (tiles * triton.cdiv(max_units, meta["BN"]),)


def _launch_units_forward(x, w_gate, w_up, h, tile_expert, unit_offsets, max_units, prec, *, g=None, u=None):
    """h = silu(x·Wg^T)·(x·Wu^T); with `g` and `u`, the pre-activations are saved there too."""
    rows, d = x.shape
    _units_kernel[_units_grid(rows, max_units)](
        x_ptr=x, w1_ptr=w_gate, w2_ptr=w_up, g_ptr=g, u_ptr=u, h_ptr=h, dg_ptr=None, du_ptr=None,
        tile_expert_ptr=tile_expert, unit_offsets_ptr=unit_offsets, R=rows, D=d, H=h.shape[1], max_units=max_units,
        BACKWARD=False, SAVE=g is not None, PREC=prec, BM=ROW_BLOCK)


def _launch_units_backward(dy, w_down, g, u, dg, du, tile_expert, unit_offsets, max_units, prec):
    """dg, du from dh = dy·Wd^T and the saved pre-activations g, u."""
    rows, d = dy.shape
    _units_kernel[_units_grid(rows, max_units)](
        x_ptr=dy, w1_ptr=w_down, w2_ptr=None, g_ptr=g, u_ptr=u, h_ptr=None, dg_ptr=dg, du_ptr=du,
        tile_expert_ptr=tile_expert, unit_offsets_ptr=unit_offsets, R=rows, D=d, H=g.shape[1], max_units=max_units,
        BACKWARD=True, SAVE=False, PREC=prec, BM=ROW_BLOCK)


def _launch_rows(out, tile_expert, unit_offsets, prec, *, a1, w1, a2=None, w2=None):
    """out = a1·W1 (+ a2·W2 when given) per expert, K over the expert's units."""
    rows, d = out.shape
    tiles = rows // ROW_BLOCK
    _rows_kernel[lambda meta: (tiles * triton.cdiv(d, meta["BN"]),)](
        a1_ptr=a1, w1_ptr=w1, a2_ptr=a2, w2_ptr=w2, out_ptr=out, tile_expert_ptr=tile_expert,
        unit_offsets_ptr=unit_offsets, R=rows, D=d, H=a1.shape[1], TWO=a2 is not None, PREC=prec, BM=ROW_BLOCK)


def _launch_weights(b, segment_offsets, unit_offsets, max_units, prec, *, a1, dw1, a2=None, dw2=None) -> torch.Tensor:
    """dW1 = a1^T·b (and dW2 = a2^T·b when given) per expert; returns [E] Σ of the tiles' squared norms."""
    experts, d = unit_offsets.shape[0] - 1, b.shape[1]
    stride = triton.cdiv(max_units, 32) * triton.cdiv(d, 32)  # ≥ tiles per expert for any config
    sq = torch.zeros(experts, stride, device=b.device, dtype=torch.float32)
    _weights_kernel[lambda meta: (experts * triton.cdiv(max_units, meta["BU"]) * triton.cdiv(d, meta["BN"]),)](
        a1_ptr=a1, a2_ptr=a2, b_ptr=b, dw1_ptr=dw1, dw2_ptr=dw2, sq_ptr=sq, segment_offsets_ptr=segment_offsets,
        unit_offsets_ptr=unit_offsets, R=b.shape[0], D=d, H=a1.shape[1], max_units=max_units, sq_stride=stride,
        TWO=a2 is not None, PREC=prec)
    return sq.sum(1)


def ragged_swiglu(x_sorted: torch.Tensor, segment_offsets: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                  w_down: torch.Tensor, unit_offsets: torch.Tensor, max_units: int, save: bool = False):
    """y [R, d] = per expert (silu(x·Wg^T)·(x·Wu^T))·Wd; with `save`, (y, (g, u, h)) for the backward.

    `max_units` is the largest expert's unit count (a Python int: it sizes the grids and buffers).
    """
    _check(x_sorted, (w_gate, w_up, w_down), max_units)
    _prepare(x_sorted)
    x_sorted, w_gate, w_up, w_down = (t.contiguous() for t in (x_sorted, w_gate, w_up, w_down))
    rows = x_sorted.shape[0]
    tile_expert = _tile_expert(segment_offsets, rows)
    unit_offsets = unit_offsets.to(torch.int32)
    width = _width(max_units)
    h = x_sorted.new_empty(rows, width)
    g, u = (x_sorted.new_empty(rows, width), x_sorted.new_empty(rows, width)) if save else (None, None)
    y = torch.empty_like(x_sorted)
    prec = _precision(x_sorted, w_gate)
    if rows and max_units:
        _launch_units_forward(x_sorted, w_gate, w_up, h, tile_expert, unit_offsets, max_units, prec, g=g, u=u)
    if rows:
        _launch_rows(y, tile_expert, unit_offsets, prec, a1=h, w1=w_down)
    return (y, (g, u, h)) if save else y


def ragged_swiglu_backward(dy: torch.Tensor, x_sorted: torch.Tensor, segment_offsets: torch.Tensor,
                           w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                           unit_offsets: torch.Tensor, max_units: int, saved=None) -> SwiGLUGrads:
    """Gradients of `ragged_swiglu`. `saved` = the forward's (g, u, h) (recomputed when None).
    `dy` must be zero on padding rows."""
    _check(x_sorted, (w_gate, w_up, w_down), max_units)
    _prepare(x_sorted)
    dy, x_sorted, w_gate, w_up, w_down = (t.contiguous() for t in (dy, x_sorted, w_gate, w_up, w_down))
    if saved is None:
        _, saved = ragged_swiglu(x_sorted, segment_offsets, w_gate, w_up, w_down, unit_offsets, max_units, save=True)
    g, u, h = saved
    rows = x_sorted.shape[0]
    tile_expert = _tile_expert(segment_offsets, rows)
    segment_offsets, unit_offsets = segment_offsets.to(torch.int32), unit_offsets.to(torch.int32)
    prec = _precision(x_sorted, w_gate)
    dx = torch.empty_like(x_sorted)
    dw_gate, dw_up, dw_down = (torch.empty_like(w) for w in (w_gate, w_up, w_down))
    sq = torch.zeros(unit_offsets.shape[0] - 1, device=x_sorted.device, dtype=torch.float32)
    if rows and max_units:
        dg, du = torch.empty_like(g), torch.empty_like(u)
        _launch_units_backward(dy, w_down, g, u, dg, du, tile_expert, unit_offsets, max_units, prec)
        sq = (_launch_weights(x_sorted, segment_offsets, unit_offsets, max_units, prec,
                              a1=dg, dw1=dw_gate, a2=du, dw2=dw_up)
              + _launch_weights(dy, segment_offsets, unit_offsets, max_units, prec, a1=h, dw1=dw_down))
        _launch_rows(dx, tile_expert, unit_offsets, prec, a1=dg, w1=w_gate, a2=du, w2=w_up)
    elif rows:
        dx.zero_()
    return SwiGLUGrads(dx, dw_gate, dw_up, dw_down, sq)
