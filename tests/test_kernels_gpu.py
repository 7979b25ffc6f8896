"""The ragged grouped SwiGLU kernels on a GPU in bf16 against the fp32 reference (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def dispatched(token_sizes: list[int], d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x_sorted with each expert's rows padded with zeros to the row block, and the segment offsets."""
    from tinyonn.kernels.reference import ROW_BLOCK

    padded = [-(-t // ROW_BLOCK) * ROW_BLOCK for t in token_sizes]
    segments = torch.tensor([0] + padded).cumsum(0)
    x = torch.zeros(int(segments[-1]) + ROW_BLOCK, d)  # one unowned tile at the end
    for e, t in enumerate(token_sizes):
        x[segments[e]:segments[e] + t] = torch.randn(t, d, generator=gen)
    return x, segments


@pytest.mark.parametrize("unit_sizes, d", [([0, 130, 64, 1, 257, 96], 256), ([512] * 8, 320), ([7, 300, 45], 200)])
def test_bf16_kernels_match_fp32_reference(unit_sizes, d):
    from tinyonn.kernels import reference
    from tinyonn.kernels.ragged_swiglu import ragged_swiglu, ragged_swiglu_backward

    gen = torch.Generator().manual_seed(0)
    token_sizes = torch.randint(0, 400, (len(unit_sizes),), generator=gen).tolist()
    token_sizes[-1], token_sizes[0] = 1, 0 if len(unit_sizes) > 6 else token_sizes[0]  # one-token, no-token
    x, segments = dispatched(token_sizes, d, gen)
    unit_offsets = torch.tensor([0] + unit_sizes).cumsum(0)
    units, max_units = sum(unit_sizes), max(unit_sizes)
    w = [torch.randn(units, d, generator=gen) / d**0.5 for _ in range(3)]
    dy = torch.randn(x.shape, generator=gen) * (x.abs().sum(1, keepdim=True) > 0)
    args = (segments.cuda(), *(t.cuda().bfloat16() for t in w), unit_offsets.cuda(), max_units)
    y, saved = ragged_swiglu(x.cuda().bfloat16(), *args, save=True)
    grads = ragged_swiglu_backward(dy.cuda().bfloat16(), x.cuda().bfloat16(), *args, saved)
    ref_args = (segments, *(t.bfloat16().float() for t in w), unit_offsets, max_units)
    x_ref, dy_ref = x.bfloat16().float(), dy.bfloat16().float()
    expected_y = reference.ragged_swiglu(x_ref, *ref_args)
    expected = reference.ragged_swiglu_backward(dy_ref, x_ref, *ref_args)
    assert (y.float().cpu() - expected_y).norm() / expected_y.norm() < 2e-2
    for name, got, want in zip(expected._fields, grads, expected):
        if name == "expert_sq_norm":  # compare the norms themselves (surprise), not their squares
            got, want = got.sqrt(), want.sqrt()
        err = (got.float().cpu() - want).norm() / want.norm().clamp_min(1e-12)
        assert err < 3e-2, (name, float(err))
