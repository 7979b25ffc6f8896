"""`tinyonn` command line: a thin layer over the Python API.

`run` turns its arguments into a `RunConfig` and calls `tinyonn.run_pipeline`; `cluster`,
`assemble` and `evaluate` call one stage of the pipeline on a run folder; `probe` calls
`tinyonn.probe`; `extract` compares partitions (`tinyonn.evaluation.extract`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from tinyonn.clustering.config import METHODS
from tinyonn.errors import TinyONNError

if TYPE_CHECKING:  # the pipeline is imported on use: the CLI starts fast
    from tinyonn.pipeline import RunConfig

PLANNED_STAGES: tuple[str, ...] = ()
"""Stages of DESIGN.md's pipeline not built yet (listed by `tinyonn run`)."""


def run_config(args) -> RunConfig:
    """A `RunConfig` from `--config FILE` (if given) with the command's own options on top."""
    from tinyonn.pipeline import RunConfig, default_cluster_config, small_train_config

    runs = Path(args.runs or "stores/runs") / (args.run or "default")
    if getattr(args, "config", None):
        base = RunConfig.load(args.config)
    elif args.command != "run" and (runs / "run_config.json").is_file():  # one stage: the run's own settings
        base = RunConfig.load(runs / "run_config.json")
    else:
        base = RunConfig()
    changes = {name: getattr(args, name) for name in ("run", "teacher", "quant", "data", "prompt",
                                                      "active_fraction", "routing", "compensation")
               if getattr(args, name, None) is not None}
    if getattr(args, "runs", None) is not None:
        changes["runs_dir"] = args.runs
    if getattr(args, "samples", None) is not None:
        changes["probe_samples"] = args.samples
    cluster = {name: getattr(args, name) for name in ("method", "keep_fraction", "seed")
               if getattr(args, name, None) is not None}
    if cluster:
        changes["cluster"] = dataclasses.replace(base.cluster or default_cluster_config(), **cluster)
    if getattr(args, "labels", None) is not None:
        changes["explain"] = dataclasses.replace(base.explain, labels=args.labels)
    if getattr(args, "no_train", False):
        changes["train"] = None
    else:
        training = {name: getattr(args, name) for name in ("rule",) if getattr(args, name, None) is not None}
        if getattr(args, "train_tokens", None) is not None:
            training["max_tokens"] = args.train_tokens
        if training:
            changes["train"] = dataclasses.replace(base.train or small_train_config(), **training)
    return dataclasses.replace(base, **changes)


def cmd_run(args) -> int:
    """Run every pipeline stage that is not up to date and report the evaluation."""
    from tinyonn.pipeline import run_pipeline

    config = run_config(args)
    result = run_pipeline(config)
    report = result.get("evaluate")
    if report is None:
        report_path = config.run_dir / "report" / "evaluate.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else None
    if report is not None:
        print(f"teacher answers {report['prompt']!r}: {report['teacher_answer']!r}")
        print(f"TinyONN answers {report['prompt']!r}: {report['model_answer']!r}")
        print(f"held-out perplexity: teacher {report['teacher_ppl']['all']:.2f}; TinyONN at "
              f"{report['active_fraction']:.0%} of FFN units per token ({report['routing']}) "
              f"{report['model_ppl']['all']:.2f}  [{report['examples']} validation samples; measured "
              f"{report['measured_active_fraction']:.1%} of FFN units active per token]")
    ran = [stage for stage, what in result["stages"].items() if what == "ran"]
    print("stages: " + ", ".join(f"{stage} {what}" for stage, what in result["stages"].items())
          + ("" if ran else "  (nothing to redo)"))
    if PLANNED_STAGES:
        print("not built yet: " + ", ".join(PLANNED_STAGES))
    print(f"run folder: {config.run_dir}")
    return 0


def cmd_probe(args) -> int:
    """Probe a teacher into a Zarr score store (resumes an interrupted run)."""
    from tinyonn.config import DataConfig, ProbeConfig
    from tinyonn.probe import probe

    config = ProbeConfig(
        data=DataConfig(max_length=args.max_length, batch_size=args.batch_size),
        chunk_samples=args.chunk_samples, freq_threshold=args.freq_threshold,
        per_sample=not args.aggregates_only, heads=not args.no_heads, grad_method=args.grad_method,
        dtype=args.dtype, quant=args.quant, device=args.device, max_samples=args.max_samples,
        per_sample_codec=args.per_sample_codec, grad_target=args.grad_target,
    )
    out = Path(args.out) if args.out else Path(args.runs) / args.run / "scores.zarr"
    store = probe(args.teacher, args.data, config, out, overwrite=args.overwrite)
    store.summary()
    return 0


def cmd_stage(args) -> int:
    """Run one pipeline stage (`cluster`, `assemble`, `train`, `evaluate`, `explain` or `release`) on a
    run folder."""
    from tinyonn.pipeline import STAGE_FUNCTIONS

    config = run_config(args)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    (config.run_dir / "run_config.json").write_text(json.dumps(config.to_dict(), indent=1))
    out = STAGE_FUNCTIONS[args.command](config)
    print(f"{args.command} written to {out}")
    return 0


def cmd_extract(args) -> int:
    """Compare the partitions × routings × compensation at budgets of active units, training-free."""
    from tinyonn.evaluation.extract import evaluate_partitions, report_table

    run_dir = Path(args.runs) / args.run
    report = evaluate_partitions(run_dir / "scores.zarr", args.teacher, run_dir, fractions=tuple(args.active_fraction),
                                 eval_per_category=args.eval_per_category or None, data=args.data)
    print(report_table(report))
    best = report["ranking"][0]
    print(f"best with a router: {best['partition']}, {best['routing']} routing, compensation "
          f"{'on' if best['compensation'] else 'off'} (worst-category ratio {best['geomean_ppl_ratio_max']:.3f}, "
          f"geometric mean over the fractions; saved models: {run_dir / 'models'}/<partition>)")
    print(f"report: {run_dir / 'report' / 'extract.json'}")
    return 0


def cmd_inspect(args) -> int:
    """Print a run's store summary, one unit, the top units or one expert (`tinyonn.inspection`)."""
    from tinyonn import inspection

    source = Path(args.store) if args.store else Path(args.runs) / args.run
    if args.unit:
        result = inspection.unit_report(source, *inspection.parse_pair(args.unit))
        text = inspection.format_unit(result)
    elif args.expert:
        result = inspection.expert_report(source, *inspection.parse_pair(args.expert, "expert"))
        text = inspection.format_expert(result)
    elif args.top is not None:
        result = inspection.top_units(source, args.top, by=args.by, category=args.category)
        text = inspection.format_top(result, args.by, args.category)
    else:
        result = text = inspection.run_summary(source)
    print(json.dumps(result, indent=1) if args.json else text)
    return 0


def _run_folder_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default=None, help="run name, a folder under --runs (default: default)")
    parser.add_argument("--runs", default=None, help="folder of runs (default: stores/runs)")
    parser.add_argument("--config", default=None, help="a RunConfig JSON (e.g. another run's run_config.json)")


def _teacher_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", default=None, help="'builtin' (default), a local model directory or a hub id")
    parser.add_argument("--quant", default=None, choices=["none", "nf4", "int8"])


def _cluster_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default=None, choices=METHODS, help="partition (default coact-kmeans: the extraction table's best)")
    parser.add_argument("--keep-fraction", type=float, default=None, help="fraction of units kept (default 1)")
    parser.add_argument("--seed", type=int, default=None)


def _train_options(parser: argparse.ArgumentParser) -> None:
    from tinyonn.training.config import RULES

    parser.add_argument("--rule", default=None, choices=RULES, help="expert update rule (default smk)")
    parser.add_argument("--train-tokens", type=int, default=None, help="training token budget (default 150,000)")


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--active-fraction", type=float, default=None,
                        help="FFN units active per token, shared + routed (default 0.5)")
    parser.add_argument("--routing", default=None, choices=["analytic", "learned", "oracle"],
                        help="how the saved model picks experts (default learned: the analytic router warmed up)")
    parser.add_argument("--compensation", default=None, action=argparse.BooleanOptionalAction,
                        help="add each unselected expert's mean output (default on)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyonn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run every pipeline stage that is not up to date")
    _run_folder_options(run)
    _teacher_options(run)
    run.add_argument("--data", default=None, help="probe data: 'builtin' (default), a JSONL file or a folder of splits")
    run.add_argument("--samples", type=int, default=None, help="probe samples (default 600; 0: only load the teacher)")
    run.add_argument("--prompt", default=None, help="a chat prompt both models answer in the report")
    _cluster_options(run)
    _model_options(run)
    _train_options(run)
    run.add_argument("--no-train", action="store_true", help="save and evaluate the training-free model")
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
    pr.add_argument("--per-sample-codec", default="zstd", choices=["zstd", "none"],
                    help="per-sample arrays compressed (zstd) or raw, for memory-mapped reads (none)")
    pr.add_argument("--grad-target", default="label", choices=["label", "teacher"],
                    help="per-sample gradients against the data's labels or against targets drawn from the "
                         "teacher's own next-token distribution (the KL / Fisher view)")
    pr.add_argument("--no-heads", action="store_true", help="skip attention-head statistics")
    pr.add_argument("--overwrite", action="store_true", help="replace a store probed with other inputs")
    pr.set_defaults(func=cmd_probe)

    cl = sub.add_parser("cluster", help="concept cells and per-layer experts from the run's score store")
    _run_folder_options(cl)
    _cluster_options(cl)
    cl.set_defaults(func=cmd_stage)

    asm = sub.add_parser("assemble", help="build the TinyONN model of the run's plan")
    _run_folder_options(asm)
    _teacher_options(asm)
    _model_options(asm)
    asm.set_defaults(func=cmd_stage)

    tr = sub.add_parser("train", help="train the run's assembled model (SMK by default) with KD from the teacher")
    _run_folder_options(tr)
    _teacher_options(tr)
    _train_options(tr)
    tr.set_defaults(func=cmd_stage)

    ev = sub.add_parser("evaluate", help="held-out perplexity of the run's model beside the teacher's")
    _run_folder_options(ev)
    _teacher_options(ev)
    ev.add_argument("--data", default=None, help="the data the run probed ('builtin' by default)")
    ev.set_defaults(func=cmd_stage)

    xp = sub.add_parser("explain", help="what the run's experts do: heatmaps, unit map, labels, report/index.html")
    _run_folder_options(xp)
    xp.add_argument("--labels", default=None, help="JSON of hand-written expert labels ({\"L3·E5\": \"...\"}; "
                    "default: the run folder's labels.json)")
    xp.set_defaults(func=cmd_stage)

    rl = sub.add_parser("release", help="the run's evaluated model as a folder to publish: safetensors and .pth in "
                        "the teacher's dtype, provenance, model card")
    _run_folder_options(rl)
    rl.set_defaults(func=cmd_stage)

    ex = sub.add_parser("extract", help="compare partitions × routings × compensation at budgets, training-free")
    ex.add_argument("--teacher", default="builtin")
    ex.add_argument("--data", default="builtin", help="probe data whose held-out split is evaluated")
    ex.add_argument("--run", default="default")
    ex.add_argument("--runs", default="stores/runs")
    ex.add_argument("--active-fraction", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ex.add_argument("--eval-per-category", type=int, default=100, help="0: the whole validation split")
    ex.set_defaults(func=cmd_extract)

    ins = sub.add_parser("inspect", help="look inside a run's score store: summary, a unit, top units, an expert")
    ins.add_argument("--run", default="default")
    ins.add_argument("--runs", default="stores/runs")
    ins.add_argument("--store", default=None, help="a score store path instead of <runs>/<run>")
    what = ins.add_mutually_exclusive_group()
    what.add_argument("--unit", metavar="L:J", help="one unit: statistics overall and per category, expert, cell")
    what.add_argument("--top", type=int, metavar="N", help="the N top units (--by, --category)")
    what.add_argument("--expert", metavar="L:E", help="an expert's units and what they respond to (E may be 'shared')")
    ins.add_argument("--by", default="score", choices=["score", "act", "grad", "freq", "taylor"])
    ins.add_argument("--category", default=None, help="rank within one category's samples")
    ins.add_argument("--json", action="store_true", help="print the result as JSON")
    ins.set_defaults(func=cmd_inspect)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (TinyONNError, FileNotFoundError) as err:
        print(f"tinyonn: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
