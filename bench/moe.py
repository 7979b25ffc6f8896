"""Ragged grouped SwiGLU throughput (GPU): Triton kernels vs padded grouped_mm vs a loop vs dense.

For each case (d, tokens, E, top_k): experts get ragged unit counts (mean I/E, ±50%, not multiples
of the block), tokens are routed top-k at random and sorted by expert. *Useful* TFLOP/s counts only
the routed work, Σ_e tokens_e · units_e · 6d per forward (×3 with the backward):
  triton     tinyonn.kernels.ragged_swiglu (forward and backward in Triton)
  grouped_mm torch._grouped_mm with every expert padded to the largest one
  loop       the PyTorch reference: one matmul chain per expert
  dense      one SwiGLU over all kept units for every token (its own FLOPs; a ceiling, not an MoE)
Fields `compiled_ms` / `eager_ms` (the `tinyonn` compile backend) stay null until that backend exists.

    python bench/moe.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

INTERMEDIATE = {1024: 3072, 2560: 9728}


def make_case(d: int, tokens: int, experts: int, top_k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mean = INTERMEDIATE[d] // experts
    sizes = (mean * (0.5 + torch.rand(experts, generator=g))).long()
    routes = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]).flatten()
    counts = torch.bincount(routes, minlength=experts)
    dev = "cuda"
    token_offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(dev)
    unit_offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).to(dev)
    units = int(sizes.sum())
    x = torch.randn(int(counts.sum()), d, device=dev, dtype=torch.bfloat16)
    w = [torch.randn(units, d, device=dev, dtype=torch.bfloat16) / d**0.5 for _ in range(2)]
    wd = torch.randn(d, units, device=dev, dtype=torch.bfloat16) / units**0.5
    useful = float((counts * sizes).sum()) * 6 * d
    return dict(x=x, wg=w[0], wu=w[1], wd=wd, token_offsets=token_offsets, unit_offsets=unit_offsets,
                sizes=sizes, counts=counts, useful_fwd_flops=useful, tokens=tokens, units=units)


def padded_grouped_mm(case):
    """Closures running the padded grouped_mm SwiGLU (weights padded to the largest expert)."""
    sizes, d = case["sizes"], case["x"].shape[1]
    umax = int(-(-int(sizes.max()) // 16) * 16)
    e = len(sizes)
    wg = torch.zeros(e, d, umax, device="cuda", dtype=torch.bfloat16)
    wu, wd = torch.zeros_like(wg), torch.zeros(e, umax, d, device="cuda", dtype=torch.bfloat16)
    offsets = case["unit_offsets"].tolist()
    for i in range(e):
        n = offsets[i + 1] - offsets[i]
        wg[i, :, :n] = case["wg"][offsets[i]:offsets[i + 1]].detach().T
        wu[i, :, :n] = case["wu"][offsets[i]:offsets[i + 1]].detach().T
        wd[i, :n] = case["wd"][:, offsets[i]:offsets[i + 1]].detach().T
    wg, wu, wd = (t.transpose(-2, -1).contiguous().transpose(-2, -1) for t in (wg, wu, wd))
    params = [p.requires_grad_() for p in (wg, wu, wd)]
    offs = case["token_offsets"][1:].to(torch.int32)

    def forward(x):
        h = F.silu(torch._grouped_mm(x, params[0], offs=offs)) * torch._grouped_mm(x, params[1], offs=offs)
        return torch._grouped_mm(h, params[2], offs=offs)

    return forward, params


def bench_case(d, tokens, experts, top_k, quick: bool) -> list[dict]:
    from triton.testing import do_bench

    from tinyonn.kernels import reference
    from tinyonn.kernels.ragged_swiglu import ragged_swiglu

    case = make_case(d, tokens, experts, top_k)
    x = case["x"].requires_grad_()
    weights = [case[k].requires_grad_() for k in ("wg", "wu", "wd")]
    args = (case["token_offsets"], case["unit_offsets"])
    dy = torch.randn_like(case["x"])
    runs = {
        "triton": lambda: ragged_swiglu(x, args[0], weights[0], weights[1], weights[2], args[1]),
        "loop": lambda: reference.ragged_swiglu(x, args[0], weights[0], weights[1], weights[2], args[1]),
    }
    try:
        gm_forward, _ = padded_grouped_mm(case)
        runs["grouped_mm"] = lambda: gm_forward(x)
    except Exception as err:  # recorded, not hidden
        print(f"grouped_mm unavailable: {type(err).__name__}: {err}"[:300])
    dense_x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    runs["dense"] = lambda: F.linear(F.silu(F.linear(dense_x, weights[0])) * F.linear(dense_x, weights[1]), weights[2])
    dense_flops = 6.0 * tokens * d * case["units"]
    out = []
    for mode in ("fwd", "fwd+bwd"):
        row = {"d": d, "tokens": tokens, "E": experts, "top_k": top_k, "pass": mode, "units": case["units"],
               "compiled_ms": None, "eager_ms": None}
        scale = 1 if mode == "fwd" else 3
        for name, fn in runs.items():
            if quick and name == "loop" and experts > 16 and mode == "fwd+bwd":
                row["loop_tflops"] = None
                continue
            if mode == "fwd":
                step = lambda fn=fn: fn()  # noqa: E731
            else:
                def step(fn=fn, name=name):
                    y = fn()
                    y.backward(dy if name != "dense" else torch.ones_like(y))
            try:
                ms = do_bench(step, warmup=25, rep=100, return_mode="median")
            except Exception as err:
                print(f"{name} {mode} failed: {type(err).__name__}: {err}"[:300])
                row[f"{name}_tflops"] = None
                continue
            flops = (dense_flops if name == "dense" else case["useful_fwd_flops"]) * scale
            row[f"{name}_tflops"] = flops / (ms * 1e-3) / 1e12
            row[f"{name}_ms"] = ms
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16k tokens only, skip the slow loop backward at E=64")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/moe.py needs a CUDA GPU", file=sys.stderr)
        return 1
    token_counts = (16384,) if args.quick else (4096, 16384, 65536)
    cases = []
    for d in (1024, 2560):
        for tokens in token_counts:
            for experts in (16, 64):
                for top_k in ((8,) if args.quick else (2, 8)):
                    cases += bench_case(d, tokens, experts, top_k, args.quick)
    result = {"device": torch.cuda.get_device_name(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(["bench/moe.py"] + (argv if argv is not None else sys.argv[1:])),
              "torch": torch.__version__, "cases": cases}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'d':>5} {'tokens':>6} {'E':>3} {'k':>2} {'pass':<8} {'triton':>7} {'gmm':>7} {'loop':>7} {'dense':>7}  TFLOP/s")
    for c in cases:
        f = lambda key: f"{c[key]:7.1f}" if c.get(key) is not None else "      -"  # noqa: E731
        print(f"{c['d']:>5} {c['tokens']:>6} {c['E']:>3} {c['top_k']:>2} {c['pass']:<8} {f('triton_tflops')} "
              f"{f('grouped_mm_tflops')} {f('loop_tflops')} {f('dense_tflops')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
