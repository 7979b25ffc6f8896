"""Ragged grouped SwiGLU throughput (GPU): Triton kernels vs padded grouped_mm vs a loop vs dense.

For each case (d, tokens, E, top_k): experts get ragged unit counts (mean `--units` per expert, each
drawn from ±50% of it, not multiples of any block), tokens are routed top-k at random and sorted by
expert. *Useful* TFLOP/s counts only the routed work, Σ_e tokens_e · units_e · 6d per forward (×3 for
forward + backward):
  triton      tinyonn.kernels.ragged_swiglu (forward and backward in Triton; rows padded per expert)
  grouped_mm  torch._grouped_mm with every expert's units padded to the largest expert
  loop        one matmul chain per expert (the reference, autograd for the backward)
  dense       one SwiGLU over all units for every token (its own FLOPs: the dense bf16 ceiling)
and for a whole MoE layer (router, dispatch, experts, combine; `tinyonn.model.moe_layer.moe_forward`):
  compiled_ms torch.compile(backend="tinyonn"), eager_ms the eager layer (dense masked reference),
  inductor_ms torch.compile with Inductor alone.

    python bench/moe.py [--quick] [--no-layer]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def ragged_sizes(total: int, parts: int, gen: torch.Generator) -> torch.Tensor:
    """`parts` sizes summing to `total`, each within about ±50% of the mean."""
    raw = 0.5 + torch.rand(parts, generator=gen, dtype=torch.float64)
    sizes = (raw / raw.sum() * total).floor().long()
    sizes[: total - int(sizes.sum())] += 1
    return sizes


def make_case(d: int, tokens: int, experts: int, top_k: int, mean_units: int, seed: int = 0) -> dict:
    from tinyonn.kernels.reference import ROW_BLOCK

    gen = torch.Generator().manual_seed(seed)
    sizes = ragged_sizes(mean_units * experts, experts, gen)
    routes = torch.rand(tokens, experts, generator=gen).topk(top_k, dim=1).indices.flatten()
    counts = torch.bincount(routes, minlength=experts)
    padded = -(-counts // ROW_BLOCK) * ROW_BLOCK
    segment = torch.cat([torch.zeros(1, dtype=torch.long), padded.cumsum(0)])
    token_offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    units = int(sizes.sum())
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(int(counts.sum()), d, device=dev, dtype=bf16)
    x_sorted = torch.zeros(int(segment[-1]), d, device=dev, dtype=bf16)
    for e in range(experts):  # the dispatch layout: each expert's rows padded with zeros
        x_sorted[segment[e]:segment[e] + counts[e]] = x[token_offsets[e]:token_offsets[e + 1]]
    weights = [torch.randn(units, d, device=dev, dtype=bf16) / d**0.5 for _ in range(3)]
    return {"x": x, "x_sorted": x_sorted, "weights": weights, "sizes": sizes, "counts": counts,
            "segment_offsets": segment.to(dev), "token_offsets": token_offsets.to(dev),
            "unit_offsets": torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).to(dev),
            "max_units": int(sizes.max()), "units": units,
            "useful_fwd_flops": float((counts * sizes).sum()) * 6 * d}


def padded_grouped_mm(case: dict):
    """(forward, params): the SwiGLU through torch._grouped_mm with weights padded to the largest expert."""
    sizes, d, e = case["sizes"], case["x"].shape[1], len(case["sizes"])
    umax = -(-int(sizes.max()) // 16) * 16
    padded = [torch.zeros(e, umax, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    bounds = case["unit_offsets"].tolist()
    for i in range(e):
        for dst, src in zip(padded, case["weights"]):
            dst[i, : bounds[i + 1] - bounds[i]] = src[bounds[i]:bounds[i + 1]]
    wg, wu = (w.transpose(1, 2).requires_grad_() for w in padded[:2])  # [E, d, umax] views, column-major
    wd = padded[2].requires_grad_()  # [E, umax, d]
    offs = case["token_offsets"][1:].to(torch.int32)

    def forward(x):
        h = F.silu(torch._grouped_mm(x, wg, offs=offs)) * torch._grouped_mm(x, wu, offs=offs)
        return torch._grouped_mm(h, wd, offs=offs)

    return forward, (wg, wu, wd)


def kernel_rows(d, tokens, experts, top_k, mean_units, quick: bool) -> list[dict]:
    from tinyonn.kernels import reference
    from tinyonn.kernels.ragged_swiglu import ragged_swiglu, ragged_swiglu_backward
    from triton.testing import do_bench

    case = make_case(d, tokens, experts, top_k, mean_units)
    wg, wu, wd = case["weights"]
    seg, uo, mu = case["segment_offsets"], case["unit_offsets"], case["max_units"]
    x_sorted = case["x_sorted"]
    dy_sorted = torch.randn_like(x_sorted) * (x_sorted.abs().sum(1, keepdim=True) > 0)  # zero on padding rows
    leaves = [t.detach().clone().requires_grad_() for t in (case["x"], wg, wu, wd)]
    dy = torch.randn_like(case["x"])

    def triton_fwd_bwd():
        _, saved = ragged_swiglu(x_sorted, seg, wg, wu, wd, uo, mu, save=True)
        return ragged_swiglu_backward(dy_sorted, x_sorted, seg, wg, wu, wd, uo, mu, saved)

    runs = {"triton": (lambda: ragged_swiglu(x_sorted, seg, wg, wu, wd, uo, mu), triton_fwd_bwd)}
    loop = lambda: reference.ragged_swiglu(leaves[0], case["token_offsets"], *leaves[1:], uo, mu)
    runs["loop"] = (loop, lambda: loop().backward(dy))
    gmm, _ = padded_grouped_mm(case)
    x_leaf = leaves[0]
    runs["grouped_mm"] = (lambda: gmm(x_leaf), lambda: gmm(x_leaf).backward(dy))
    dense_x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dense = lambda: (F.silu(dense_x @ leaves[1].T) * (dense_x @ leaves[2].T)) @ leaves[3]
    dense_dy = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    runs["dense"] = (dense, lambda: dense().backward(dense_dy))
    dense_flops = 6.0 * tokens * d * case["units"]
    rows = []
    for index, mode in enumerate(("fwd", "fwd+bwd")):
        row = {"d": d, "tokens": tokens, "E": experts, "top_k": top_k, "pass": mode, "units": case["units"],
               "max_units": mu}
        for name, fns in runs.items():
            fn = fns[index]
            if index == 0:
                fn = torch.no_grad()(fn)
            try:
                ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            except Exception as err:  # noqa: BLE001  (recorded in the results, not hidden)
                print(f"{name} {mode} failed: {type(err).__name__}: {err}"[:400], flush=True)
                row[f"{name}_tflops"] = row[f"{name}_ms"] = None
                continue
            flops = (dense_flops if name == "dense" else case["useful_fwd_flops"]) * (1 if mode == "fwd" else 3)
            row[f"{name}_tflops"] = flops / (ms * 1e-3) / 1e12
            row[f"{name}_ms"] = ms
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def layer_times(d, tokens, experts, top_k, mean_units) -> dict[str, dict]:
    """ms of one MoE layer (router + experts) in eager, Inductor and tinyonn-compiled, fwd and fwd+bwd."""
    from triton.testing import do_bench

    import tinyonn.compile  # noqa: F401  (registers the backend)
    from tinyonn.model.moe_layer import moe_forward
    from tinyonn.model.routing import RoutingConfig

    gen = torch.Generator().manual_seed(0)
    sizes = ragged_sizes(mean_units * experts, experts, gen)
    groups = max(1, experts // 8)
    params = {name: (torch.randn(shape, generator=gen) * 0.02).to("cuda", torch.bfloat16).requires_grad_()
              for name, shape in [("w_gate", (int(sizes.sum()), d)), ("w_up", (int(sizes.sum()), d)),
                                  ("w_down", (int(sizes.sum()), d)), ("shared_gate", (0, d)),
                                  ("shared_up", (0, d)), ("shared_down", (d, 0)),
                                  ("router.main", (groups, d)), ("router.sub", (experts, d))]}
    buffers = {"expert_offsets": torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).cuda(),
               "unit_expert": torch.repeat_interleave(torch.arange(experts), sizes).cuda(),
               "router.expert_group": (torch.arange(experts) % groups).cuda()}
    routing = RoutingConfig(mode="topk", top_k=top_k)
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def layer(x):
        return moe_forward(params, buffers, x, routing)[0]

    variants = {"eager_ms": layer, "inductor_ms": torch.compile(layer, backend="inductor"),
                "compiled_ms": torch.compile(layer, backend="tinyonn")}
    out: dict[str, dict] = {"fwd": {}, "fwd+bwd": {}}
    for key, fn in variants.items():
        for mode in ("fwd", "fwd+bwd"):
            step = torch.no_grad()(lambda fn=fn: fn(x)) if mode == "fwd" else (lambda fn=fn: fn(x).sum().backward())
            try:
                out[mode][key] = do_bench(step, warmup=5, rep=60, return_mode="median")
            except Exception as err:  # noqa: BLE001  (recorded in the results, not hidden)
                print(f"layer {key} {mode} failed: {type(err).__name__}: {err}"[:400], flush=True)
                out[mode][key] = None
            torch._dynamo.reset() if mode == "fwd+bwd" and key != "eager_ms" else None
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16k tokens, top-8 only")
    parser.add_argument("--no-layer", action="store_true", help="skip the whole-layer compile timings")
    parser.add_argument("--units", type=int, default=384, help="mean units per expert")
    parser.add_argument("--d", type=int, nargs="+", default=[1024, 2560], help="hidden sizes")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts (default 4k, 16k, 64k)")
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--top-k", type=int, nargs="+", help="default 2 and 8")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/moe.py needs a CUDA GPU", file=sys.stderr)
        return 1
    token_counts = args.tokens or ((16384,) if args.quick else (4096, 16384, 65536))
    cases = []
    for d in args.d:
        for tokens in token_counts:
            for experts in args.experts:
                for top_k in args.top_k or ((8,) if args.quick else (2, 8)):
                    rows = kernel_rows(d, tokens, experts, top_k, args.units, args.quick)
                    anchor = tokens == 16384 and experts == 64 and top_k == 8 and (d == 2560 or args.quick)
                    layer = layer_times(d, tokens, experts, top_k, args.units) if anchor and not args.no_layer else {}
                    for row in rows:
                        row.update({key: None for key in ("compiled_ms", "eager_ms", "inductor_ms")})
                        row.update(layer.get(row["pass"], {}))
                    cases += rows
                    write(args, argv, cases)
    write(args, argv, cases)
    print_table(cases)
    return 0


def write(args, argv, cases: list[dict]) -> None:
    result = {"device": torch.cuda.get_device_name(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(["bench/moe.py"] + (argv if argv is not None else sys.argv[1:])),
              "torch": torch.__version__, "mean_units": args.units, "cases": cases}
    Path(args.out).write_text(json.dumps(result, indent=1))


def _cell(case: dict, key: str, width: int = 7) -> str:
    return f"{case[key]:{width}.1f}" if case.get(key) is not None else " " * (width - 1) + "-"


def _ratio(case: dict, key: str) -> str:
    return f"{case['triton_tflops'] / case[key]:5.2f}" if case.get(key) and case.get("triton_tflops") else "    -"


def print_table(cases: list[dict]) -> None:
    print(f"{'d':>5} {'tokens':>6} {'E':>3} {'k':>2} {'pass':<8} {'triton':>7} {'gmm':>7} {'loop':>7} {'dense':>7}"
          f" {'×gmm':>5} {'×dense':>6} {'×loop':>6} {'tinyonn':>8} {'eager':>8} {'inductor':>8}")
    for c in cases:
        print(f"{c['d']:>5} {c['tokens']:>6} {c['E']:>3} {c['top_k']:>2} {c['pass']:<8} {_cell(c, 'triton_tflops')} "
              f"{_cell(c, 'grouped_mm_tflops')} {_cell(c, 'loop_tflops')} {_cell(c, 'dense_tflops')} "
              f"{_ratio(c, 'grouped_mm_tflops')} {_ratio(c, 'dense_tflops'):>6} {_ratio(c, 'loop_tflops'):>6} "
              f"{_cell(c, 'compiled_ms', 8)} {_cell(c, 'eager_ms', 8)} {_cell(c, 'inductor_ms', 8)}")


if __name__ == "__main__":
    sys.exit(main())
