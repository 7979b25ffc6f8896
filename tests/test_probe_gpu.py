"""The probe on a GPU in bf16 against the fp32 torch.func reference (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from tinyonn import load_teacher
from tinyonn.config import ProbeConfig
from tinyonn.probe.run import probe_batch
from tinyonn.probe.reference import per_sample_grad_norms

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("method", ["gram", "direct"])
def test_bf16_probe_on_gpu_matches_fp32_reference(tiny_teacher_dir, method, compile):
    from test_probe import _batch

    reference_model, tokenizer = load_teacher(tiny_teacher_dir, dtype=torch.float32, device="cuda")
    model, _ = load_teacher(tiny_teacher_dir, dtype=torch.bfloat16, device="cuda", attn_implementation="sdpa")
    batch = _batch(tokenizer, "left")
    fast = probe_batch(model, batch, ProbeConfig(dtype="bfloat16", grad_method=method, compile=compile))
    units, heads = per_sample_grad_norms(reference_model, batch)
    relative = (fast.grad - units).norm() / units.norm()
    assert relative < 3e-2, float(relative)  # bf16 weights and activations against fp32
    assert (fast.head_grad - heads).norm() / heads.norm() < 3e-2
