"""`tinyonn` command line: a thin layer over the Python API.

`run` turns its arguments into a `RunConfig` and calls `tinyonn.run_pipeline`; `cluster`,
`assemble` and `evaluate` call one stage of the pipeline on a run folder; `probe` calls
`tinyonn.probe`; `extract` compares partitions (`tinyonn.evaluation.extract`).

Every error is one line, `tinyonn: error: ...`, naming the file, line or option at fault; the exit
code is 2 for bad input (a file, a folder, an option), 1 for a failure of the run itself (disk
full, out of memory, an internal error) and 130 for Ctrl-C. `tinyonn --debug ...` also prints the
traceback. Every numeric option is checked before any work starts or any file is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from typing import TYPE_CHECKING

from tinyonn.clustering.config import METHODS
from tinyonn.errors import DataFormatError, TinyONNError

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
    if getattr(args, "skip_bad", False):
        changes["skip_bad"] = True
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
    _report_skipped(result.get("skipped_lines", []))
    return 0


def cmd_probe(args) -> int:
    """Probe a teacher into a Zarr score store (resumes an interrupted run)."""
    from tinyonn.config import DataConfig, ProbeConfig
    from tinyonn.devices import resolve_device
    from tinyonn.probe import probe

    resolve_device(args.device)  # an unknown device, or CUDA on a machine without it: before any work
    config = ProbeConfig(
        data=DataConfig(max_length=args.max_length, batch_size=args.batch_size),
        chunk_samples=args.chunk_samples, freq_threshold=args.freq_threshold,
        per_sample=not args.aggregates_only, heads=not args.no_heads, grad_method=args.grad_method,
        dtype=args.dtype, quant=args.quant, device=args.device, max_samples=args.max_samples,
        per_sample_codec=args.per_sample_codec, grad_target=args.grad_target,
    )
    out = Path(args.out) if args.out else Path(args.runs) / args.run / "scores.zarr"
    skipped: list[DataFormatError] = []
    store = probe(args.teacher, args.data, config, out, overwrite=args.overwrite,
                  on_bad=skipped.append if args.skip_bad else None)
    store.summary()
    _report_skipped(skipped)
    return 0


def _report_skipped(errors: list) -> None:
    """The `--skip-bad` count, printed at the end of a command."""
    if errors:
        print(f"skipped {len(errors)} bad data line(s) (--skip-bad); the first: {errors[0]}")


def cmd_stage(args) -> int:
    """Run one pipeline stage (`cluster`, `assemble`, `train`, `evaluate`, `explain` or `release`) on a
    run folder."""
    from tinyonn.pipeline import STAGE_FUNCTIONS, check_upstream
    from tinyonn.runlock import run_lock

    from tinyonn.files import write_text_atomic

    config = run_config(args)
    if not config.run_dir.is_dir():  # no stage's inputs are there: the stage says which command to run
        return _print_stage(args.command, STAGE_FUNCTIONS[args.command](config))
    with run_lock(config.run_dir):  # one writer per run folder (RunInUseError at once)
        check_upstream(config, args.command)  # a stale or missing input: refused before anything is written
        path = config.run_dir / "run_config.json"
        previous = path.read_bytes() if path.is_file() else None
        write_text_atomic(path, json.dumps(config.to_dict(), indent=1))
        try:
            out = STAGE_FUNCTIONS[args.command](config)
        except BaseException:  # a failed command leaves the run's settings as they were
            if previous is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(previous)
            raise
    return _print_stage(args.command, out)


def _print_stage(command: str, out: Path) -> int:
    print(f"{command} written to {out}")
    return 0


def cmd_extract(args) -> int:
    """Compare the partitions × routings × compensation at budgets of active units, training-free."""
    from tinyonn.evaluation.extract import evaluate_partitions, report_table
    from tinyonn.runlock import run_lock

    run_dir = Path(args.runs) / args.run
    with run_lock(run_dir):  # it writes models/ and report/ into the run folder: one writer at a time
        report = evaluate_partitions(run_dir / "scores.zarr", args.teacher, run_dir,
                                     fractions=tuple(args.active_fraction),
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


# ---------------------------------------------------------------- option values


def _integer(minimum: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _number(low: float, high: float, what: str, low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what
    return parse


positive_int = _integer(1, "an integer ≥ 1")
nonnegative_int = _integer(0, "an integer ≥ 0")
fraction = _number(0.0, 1.0, "a fraction in (0, 1]", low_open=True)
nonnegative_number = _number(0.0, math.inf, "a finite number ≥ 0")


def _max_length(text: str) -> int:
    return _integer(2, "an integer ≥ 2 (tokens)")(text)


def _device(text: str) -> str:
    """A device name torch knows (its availability is checked when the command starts)."""
    import re

    if not re.fullmatch(r"(cpu|cuda|mps|xpu|hpu|npu|meta)(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: expected cpu, cuda, cuda:N or mps")
    return text


class UsageError(TinyONNError):
    """A command-line option is wrong (argparse's own errors, as one line)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors raise `UsageError` (one `tinyonn: error:` line, exit 2) instead of
    printing the usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _run_folder_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default=None, help="run name, a folder under --runs (default: default)")
    parser.add_argument("--runs", default=None, help="folder of runs (default: stores/runs)")
    parser.add_argument("--config", default=None, help="a RunConfig JSON (e.g. another run's run_config.json)")


def _teacher_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", default=None, help="'builtin' (default), a local model directory or a hub id")
    parser.add_argument("--quant", default=None, choices=["none", "nf4", "int8"])


def _cluster_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default=None, choices=METHODS, help="partition (default coact-kmeans: the extraction table's best)")
    parser.add_argument("--keep-fraction", type=fraction, default=None, help="fraction of units kept (default 1)")
    parser.add_argument("--seed", type=nonnegative_int, default=None)


def _train_options(parser: argparse.ArgumentParser) -> None:
    from tinyonn.training.config import RULES

    parser.add_argument("--rule", default=None, choices=RULES, help="expert update rule (default smk)")
    parser.add_argument("--train-tokens", type=positive_int, default=None, help="training token budget (default 150,000)")


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--active-fraction", type=fraction, default=None,
                        help="FFN units active per token, shared + routed (default 0.5)")
    parser.add_argument("--routing", default=None, choices=["analytic", "learned", "oracle"],
                        help="how the saved model picks experts (default learned: the analytic router warmed up)")
    parser.add_argument("--compensation", default=None, action=argparse.BooleanOptionalAction,
                        help="add each unselected expert's mean output (default on)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tinyonn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run every pipeline stage that is not up to date")
    _run_folder_options(run)
    _teacher_options(run)
    run.add_argument("--data", default=None, help="probe data: 'builtin' (default), a JSONL file or a folder of splits")
    run.add_argument("--samples", type=nonnegative_int, default=None,
                     help="probe samples (default 600; 0: only load the teacher)")
    run.add_argument("--prompt", default=None, help="a chat prompt both models answer in the report")
    _cluster_options(run)
    _model_options(run)
    _train_options(run)
    run.add_argument("--no-train", action="store_true", help="save and evaluate the training-free model")
    run.add_argument("--skip-bad", action="store_true",
                     help="skip malformed data lines (counted and reported at the end) instead of stopping")
    run.set_defaults(func=cmd_run)

    pr = sub.add_parser("probe", help="measure every FFN unit into a Zarr score store")
    pr.add_argument("--teacher", default="builtin")
    pr.add_argument("--data", default="builtin", help="'builtin' (train split), a JSONL file or a folder of splits")
    pr.add_argument("--run", default="default")
    pr.add_argument("--runs", default="stores/runs")
    pr.add_argument("--out", default=None, help="store path (default <runs>/<run>/scores.zarr)")
    pr.add_argument("--quant", default="none", choices=["none", "nf4", "int8"])
    pr.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    pr.add_argument("--device", type=_device, default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    pr.add_argument("--batch-size", type=positive_int, default=8)
    pr.add_argument("--max-length", type=_max_length, default=512)
    pr.add_argument("--max-samples", type=positive_int, default=None,
                    help="probe this many samples spread over the data (every category gets its share)")
    pr.add_argument("--chunk-samples", type=positive_int, default=256)
    pr.add_argument("--freq-threshold", type=nonnegative_number, default=1.0)
    pr.add_argument("--grad-method", default="auto", choices=["auto", "gram", "direct"])
    pr.add_argument("--aggregates-only", action="store_true", help="skip the per-sample [N, U] arrays")
    pr.add_argument("--per-sample-codec", default="zstd", choices=["zstd", "none"],
                    help="per-sample arrays compressed (zstd) or raw, for memory-mapped reads (none)")
    pr.add_argument("--grad-target", default="label", choices=["label", "teacher"],
                    help="per-sample gradients against the data's labels or against targets drawn from the "
                         "teacher's own next-token distribution (the KL / Fisher view)")
    pr.add_argument("--no-heads", action="store_true", help="skip attention-head statistics")
    pr.add_argument("--overwrite", action="store_true", help="replace a store probed with other inputs")
    pr.add_argument("--skip-bad", action="store_true",
                    help="skip malformed data lines (counted and reported at the end) instead of stopping")
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
    ex.add_argument("--active-fraction", type=fraction, nargs="+", default=[0.25, 0.5, 0.75])
    ex.add_argument("--eval-per-category", type=nonnegative_int, default=100, help="0: the whole validation split")
    ex.set_defaults(func=cmd_extract)

    ins = sub.add_parser("inspect", help="look inside a run's score store: summary, a unit, top units, an expert")
    ins.add_argument("--run", default="default")
    ins.add_argument("--runs", default="stores/runs")
    ins.add_argument("--store", default=None, help="a score store path instead of <runs>/<run>")
    what = ins.add_mutually_exclusive_group()
    what.add_argument("--unit", metavar="L:J", help="one unit: statistics overall and per category, expert, cell")
    what.add_argument("--top", type=positive_int, metavar="N", help="the N top units (--by, --category)")
    what.add_argument("--expert", metavar="L:E", help="an expert's units and what they respond to (E may be 'shared')")
    ins.add_argument("--by", default="score", choices=["score", "act", "grad", "freq", "taylor"])
    ins.add_argument("--category", default=None, help="rank within one category's samples")
    ins.add_argument("--json", action="store_true", help="print the result as JSON")
    ins.set_defaults(func=cmd_inspect)

    for command in sub.choices.values():  # `tinyonn probe --debug ...` as well as `tinyonn --debug probe ...`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def describe_error(err: BaseException) -> tuple[int, str]:
    """The exit code and the one-line message of an error (see the module docstring)."""
    if isinstance(err, TinyONNError):
        return err.exit_code, str(err)
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, OSError):  # a library's error wrapping an OSError
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.errno is not None:
        where = " → ".join(str(f) for f in (cause.filename, cause.filename2) if f is not None)
        where = f"{where}: " if where else ""
        if cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return 1, f"{where}no space left on device; free some space, then rerun the same command to resume"
        if cause.errno == errno.EROFS:
            return 2, f"{where}read-only file system: give a writable folder (--runs, --out)"
        if cause.errno in (errno.EACCES, errno.EPERM):
            return 2, f"{where}permission denied"
        if isinstance(cause, (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError)):
            return 2, f"{where}{cause.strerror or cause}"
        return 1, f"{where}{cause.strerror or cause}"
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return 1, f"out of memory: {err} (try a smaller --batch-size or --max-length)"
    if isinstance(err, ValueError):  # a config value out of range (their messages name the field)
        return 2, str(err)
    return 1, f"internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)"


def _fail(code: int, message: str) -> int:
    """Print one `tinyonn: error:` line (after closing any progress bar left open) and return `code`."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    sys.stdout.flush()
    print(f"tinyonn: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run one `tinyonn` command; returns its exit code (0 on success, see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        return _fail(2, str(err))
    except SystemExit as stop:  # --help
        return stop.code if isinstance(stop.code, int) else 0
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        return _fail(130, "interrupted; rerun the same command to resume")
    except Exception as err:
        if args.debug:
            traceback.print_exc()
        return _fail(*describe_error(err))


if __name__ == "__main__":
    sys.exit(main())
