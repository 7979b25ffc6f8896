"""Per-kernel GPU time of the ragged SwiGLU (forward, backward) at one bench case, with the configs
autotuning picked: where the time goes.

    python bench/moe_profile.py [--d 2560] [--experts 64] [--tokens 16384] [--top-k 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from moe import make_case


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=2560)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--units", type=int, default=384)
    args = parser.parse_args(argv)
    from tinyonn.kernels import ragged_swiglu as rs

    case = make_case(args.d, args.tokens, args.experts, args.top_k, args.units)
    wg, wu, wd = case["weights"]
    seg, uo, mu, x = case["segment_offsets"], case["unit_offsets"], case["max_units"], case["x_sorted"]
    dy = torch.randn_like(x) * (x.abs().sum(1, keepdim=True) > 0)

    def step():
        _, saved = rs.ragged_swiglu(x, seg, wg, wu, wd, uo, mu, save=True)
        rs.ragged_swiglu_backward(dy, x, seg, wg, wu, wd, uo, mu, saved)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    gemm = 2.0 * float((case["counts"] * case["sizes"]).sum()) * args.d  # one useful matmul
    print(f"one useful matmul = {gemm / 1e12:.3f} TFLOP; units fwd = 2, rows fwd = 1, units bwd = 1, "
          f"rows bwd = 2, weights = 2 + 1")
    for name in ("_units_kernel", "_rows_kernel", "_weights_kernel"):
        kernel = getattr(rs, name)
        print(name, {str(key): str(cfg) for key, cfg in kernel.cache.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
