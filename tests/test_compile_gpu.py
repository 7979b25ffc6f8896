"""The `tinyonn` compile backend on a GPU: the compiled MoE layer matches eager (forward and
gradients), and running it launches the Triton kernels (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TRITON_KERNELS = {"_units_kernel", "_rows_kernel", "_weights_kernel", "_gather_rows_kernel",
                  "_combine_rows_kernel", "_combine_rows_backward_kernel", "_rank_kernel"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_layer_runs_triton_kernels_and_matches_eager(dtype):
    from tinyonn import compile as tinyonn_compile
    from tinyonn.model.moe_layer import MoELayer
    from tinyonn.model.routing import RoutingConfig

    torch.manual_seed(0)
    layer = MoELayer(256, [40, 0, 170, 1, 96, 300, 7, 64], [0, 0, 1, 1, 2, 2, 3, 3], shared_size=32,
                     routing=RoutingConfig(mode="topk", top_k=2)).cuda().to(dtype)
    x = torch.randn(3, 333, 256, device="cuda", dtype=dtype, requires_grad=True)

    def run(fn):
        layer.zero_grad()
        x.grad = None
        y = fn(x)
        y.float().square().sum().backward()
        return y.detach().float(), [p.grad.float() for p in layer.parameters()] + [x.grad.float()]

    expected, want = run(layer)
    for graphs in tinyonn_compile.compiled_graphs.values():
        graphs.clear()
    compiled = torch.compile(layer, backend="tinyonn")
    run(compiled)  # compile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        actual, got = run(compiled)
        torch.cuda.synchronize()
    launched = {event.name for event in prof.events()}
    assert TRITON_KERNELS <= launched, TRITON_KERNELS - launched
    fwd = {str(n.target) for g in tinyonn_compile.compiled_graphs["forward"] for n in g.graph.nodes}
    bwd = {str(n.target) for g in tinyonn_compile.compiled_graphs["backward"] for n in g.graph.nodes}
    assert "tinyonn.moe_experts.default" in fwd and "tinyonn.moe_experts_backward.default" in bwd
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    assert (actual - expected).norm() / expected.norm() < tol
    for g, w in zip(got, want):
        assert (g - w).norm() / w.norm().clamp_min(1e-12) < tol
