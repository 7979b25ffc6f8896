"""The ragged grouped SwiGLU kernels on a GPU in bf16 against the fp32 reference (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("sizes", [[0, 130, 64, 1, 257, 96], [512] * 8])
def test_bf16_kernels_match_fp32_reference(sizes):
    from tinyonn.kernels import reference
    from tinyonn.kernels.ragged_swiglu import ragged_swiglu

    torch.manual_seed(0)
    d, e = 256, len(sizes)
    tokens = torch.randint(0, 300, (e,))
    tokens[0] = 0 if e > 6 else tokens[0]
    token_offsets = torch.cat([torch.zeros(1, dtype=torch.long), tokens.cumsum(0)]).cuda()
    unit_offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(sizes).cumsum(0)]).cuda()
    m, u = int(token_offsets[-1]), int(unit_offsets[-1])
    x = torch.randn(m, d, device="cuda")
    wg, wu = torch.randn(u, d, device="cuda") / d**0.5, torch.randn(u, d, device="cuda") / d**0.5
    wd = torch.randn(d, u, device="cuda") / u**0.5
    dy = torch.randn(m, d, device="cuda")
    inputs = [t.bfloat16().requires_grad_() for t in (x, wg, wu, wd)]
    y = ragged_swiglu(inputs[0], token_offsets, inputs[1], inputs[2], inputs[3], unit_offsets)
    y.backward(dy.bfloat16())
    ref_inputs = [t.bfloat16().float().requires_grad_() for t in (x, wg, wu, wd)]
    y_ref = reference.ragged_swiglu(ref_inputs[0], token_offsets, ref_inputs[1], ref_inputs[2], ref_inputs[3],
                                    unit_offsets)
    y_ref.backward(dy.bfloat16().float())
    assert (y.float() - y_ref).norm() / y_ref.norm() < 2e-2
    for ours, theirs in zip(inputs, ref_inputs):
        assert (ours.grad.float() - theirs.grad).norm() / theirs.grad.norm().clamp_min(1e-12) < 3e-2
