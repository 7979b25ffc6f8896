"""`tinyonn` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from tinyonn.errors import TinyONNError

PIPELINE = ("probe", "cluster", "assemble", "train", "evaluate")


def built_stages() -> list[str]:
    """Pipeline stages whose code exists in this install."""
    import tinyonn

    return [stage for stage in PIPELINE if callable(getattr(tinyonn, stage, None))]


def cmd_run(args) -> int:
    """Run the pipeline stages built so far on a teacher and say which are not built yet."""
    import torch

    import tinyonn
    from tinyonn.evaluation.metrics import sample_answers
    from tinyonn.evaluation.extract import budget_routing, heldout_perplexity_by_category, routed_budgets
    from tinyonn.teacher import describe, load_teacher

    run_dir = Path(args.runs) / args.run
    run_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_teacher(args.teacher, quant=args.quant, dtype=torch.float32)
    summary = describe(model)
    print(f"teacher {args.teacher}: {summary['model_type']}, {summary['num_layers']} layers, "
          f"{summary['ffn_units']:,} FFN units, {summary['parameters']:,} parameters")
    answer = sample_answers(model, tokenizer, [args.prompt], max_new_tokens=32)[0]
    print(f"teacher answers {args.prompt!r}: {answer!r}")
    (run_dir / "teacher.json").write_text(json.dumps({"source": args.teacher, **summary}, indent=1))
    if args.samples > 0:
        examples = tinyonn.load_probe_set(args.data, "train") if args.data == "builtin" else tinyonn.read_examples(args.data)
        examples = examples[:: max(1, len(examples) // args.samples)][: args.samples]
        print(f"[probe] {len(examples)} samples spread over the probe set")
        store = tinyonn.probe(model, examples, tinyonn.ProbeConfig(), run_dir / "scores.zarr", tokenizer=tokenizer)
        store.summary()
        print("[cluster] PIDiff-guided HDBSCAN")
        plan = tinyonn.cluster(store, tinyonn.ClusterConfig())
        plan.save(run_dir / "plan")
        print(json.dumps(plan.summary()))
        print("[assemble] TinyONN model")
        moe = tinyonn.assemble(model, plan).eval()
        moe.save_pretrained(run_dir / "model")
        tokenizer.save_pretrained(run_dir / "model")
        validation = tinyonn.load_probe_set("builtin", "validation")[::25] if args.data == "builtin" else examples[:50]
        config = tinyonn.DataConfig(max_length=512, batch_size=16)
        dense = heldout_perplexity_by_category(model, tokenizer, validation, config)["all"]
        moe.set_routing(budget_routing(moe, routed_budgets(moe, 0.5, summary["intermediate_size"]), "oracle"))
        sparse = heldout_perplexity_by_category(moe, tokenizer, validation, config)["all"]
        print(f"held-out perplexity: teacher {dense:.2f}; TinyONN at 50% of FFN units per token "
              f"(oracle routing) {sparse:.2f}  [{len(validation)} validation samples]")
    done = built_stages()
    for stage in PIPELINE:
        print(f"  {stage:<9} {'built' if stage in done else 'not built yet'}")
    print(f"run folder: {run_dir}")
    return 0


def cmd_probe(args) -> int:
    """Probe a teacher into a Zarr score store (resumes an interrupted run)."""
    from tinyonn.config import DataConfig, ProbeConfig
    from tinyonn.probing.run import probe

    config = ProbeConfig(
        data=DataConfig(max_length=args.max_length, batch_size=args.batch_size),
        chunk_samples=args.chunk_samples, freq_threshold=args.freq_threshold,
        per_sample=not args.aggregates_only, heads=not args.no_heads, grad_method=args.grad_method,
        dtype=args.dtype, quant=args.quant, device=args.device, max_samples=args.max_samples,
    )
    out = Path(args.out) if args.out else Path(args.runs) / args.run / "scores.zarr"
    store = probe(args.teacher, args.data, config, out, overwrite=args.overwrite)
    store.summary()
    return 0


def cmd_cluster(args) -> int:
    """Cluster a score store's units into concept cells and per-layer experts (the plan)."""
    from tinyonn.clustering.cluster import ClusterConfig, cluster, plot_cells

    run_dir = Path(args.runs) / args.run
    store = args.store or str(run_dir / "scores.zarr")
    plan = cluster(store, ClusterConfig(method=args.method, keep_fraction=args.keep_fraction, seed=args.seed))
    out = run_dir / "plan"
    plan.save(out)
    plot_cells(plan, store, out / "cells.png")
    print(json.dumps(plan.summary(), indent=1))
    print(f"plan written to {out}")
    return 0


def cmd_assemble(args) -> int:
    """Build the TinyONN model of a plan from the teacher and save it (Hugging Face format)."""
    from tinyonn.model.assemble import assemble
    from tinyonn.clustering.plan import ExpertPlan

    run_dir = Path(args.runs) / args.run
    model = assemble(args.teacher, ExpertPlan.load(args.plan or run_dir / "plan"))
    from tinyonn.teacher import load_teacher

    _, tokenizer = load_teacher(args.teacher)
    model.save_pretrained(run_dir / "model")
    tokenizer.save_pretrained(run_dir / "model")
    print(f"TinyONN model written to {run_dir / 'model'}")
    return 0


def cmd_extract(args) -> int:
    """Compare the three partitions at a budget of active units (oracle and warmed router)."""
    from tinyonn.evaluation.extract import WarmupConfig, evaluate_partitions, report_table

    run_dir = Path(args.runs) / args.run
    report = evaluate_partitions(args.store or run_dir / "scores.zarr", args.teacher, run_dir,
                                 active_fraction=args.active_fraction,
                                 warmup=WarmupConfig(max_tokens=args.warmup_tokens),
                                 eval_per_category=args.eval_per_category or None)
    print(report_table(report))
    print(f"report: {run_dir / 'report' / 'extract.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyonn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline stages built so far")
    run.add_argument("--teacher", default="builtin", help="'builtin', a local model directory or a hub id")
    run.add_argument("--quant", default="none", choices=["none", "nf4", "int8"])
    run.add_argument("--run", default="default", help="run name (folder under --runs)")
    run.add_argument("--runs", default="stores/runs")
    run.add_argument("--prompt", default="What does the word \"harbour\" mean?")
    run.add_argument("--data", default="builtin", help="probe data: 'builtin' or a JSONL file")
    run.add_argument("--samples", type=int, default=600, help="probe samples (0: only load the teacher)")
    run.set_defaults(func=cmd_run)

    pr = sub.add_parser("probe", help="measure every FFN unit into a Zarr score store")
    pr.add_argument("--teacher", default="builtin")
    pr.add_argument("--data", default="builtin", help="'builtin' (train split) or a JSONL file")
    pr.add_argument("--run", default="default")
    pr.add_argument("--runs", default="stores/runs")
    pr.add_argument("--out", default=None, help="store path (default <runs>/<run>/scores.zarr)")
    pr.add_argument("--quant", default="none", choices=["none", "nf4", "int8"])
    pr.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    pr.add_argument("--device", default=None)
    pr.add_argument("--batch-size", type=int, default=8)
    pr.add_argument("--max-length", type=int, default=512)
    pr.add_argument("--max-samples", type=int, default=None)
    pr.add_argument("--chunk-samples", type=int, default=256)
    pr.add_argument("--freq-threshold", type=float, default=1.0)
    pr.add_argument("--grad-method", default="auto", choices=["auto", "gram", "direct"])
    pr.add_argument("--aggregates-only", action="store_true", help="skip the per-sample [N, U] arrays")
    pr.add_argument("--no-heads", action="store_true", help="skip attention-head statistics")
    pr.add_argument("--overwrite", action="store_true", help="replace a store probed with other inputs")
    pr.set_defaults(func=cmd_probe)

    cl = sub.add_parser("cluster", help="concept cells and per-layer experts from a score store")
    cl.add_argument("--run", default="default")
    cl.add_argument("--runs", default="stores/runs")
    cl.add_argument("--store", default=None, help="score store (default <runs>/<run>/scores.zarr)")
    cl.add_argument("--method", default="pidiff-hdbscan", choices=["pidiff-hdbscan", "random", "coact-kmeans"])
    cl.add_argument("--keep-fraction", type=float, default=1.0)
    cl.add_argument("--seed", type=int, default=0)
    cl.set_defaults(func=cmd_cluster)

    asm = sub.add_parser("assemble", help="build the TinyONN model of a plan")
    asm.add_argument("--teacher", default="builtin")
    asm.add_argument("--run", default="default")
    asm.add_argument("--runs", default="stores/runs")
    asm.add_argument("--plan", default=None, help="plan folder (default <runs>/<run>/plan)")
    asm.set_defaults(func=cmd_assemble)

    ex = sub.add_parser("extract", help="compare partitions at a budget (oracle and warmed router)")
    ex.add_argument("--teacher", default="builtin")
    ex.add_argument("--run", default="default")
    ex.add_argument("--runs", default="stores/runs")
    ex.add_argument("--store", default=None)
    ex.add_argument("--active-fraction", type=float, default=0.5)
    ex.add_argument("--warmup-tokens", type=int, default=60_000)
    ex.add_argument("--eval-per-category", type=int, default=100, help="0: the whole validation split")
    ex.set_defaults(func=cmd_extract)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TinyONNError as err:
        print(f"tinyonn: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"tinyonn: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
