"""The fault suite: kill -9, Ctrl-C, disk full, damaged store chunks, NaN steps and bad inputs, each
checked against an uninterrupted run of the same pipeline.

    OMP_NUM_THREADS=1 python bench/faults.py                 # the long version → bench/results/faults.json
    OMP_NUM_THREADS=1 python bench/faults.py --quick          # a few cases of each kind
    python bench/faults.py --table bench/results/faults.json  # the README's table

The world: a tiny random Qwen3 teacher (tests/conftest.py's: 2 layers, 128 FFN units each, a
300-token byte-level BPE) saved to a folder, a JSONL data file (every 40th example of the builtin
probe set, 528 rows over 7 categories) and a `RunConfig` small enough for `tinyonn run` to take
~15 s on one CPU thread: 160 probe samples in 20 store chunks, co-activation k-means, learned
router + compensation, ~70 SMK steps with a checkpoint every 4, a light evaluation and explain.

Cases (each a `Case`: name, stage, kind, outcome, detail):

- `kill9`, `sigint`: `tinyonn run --config C` in a subprocess, signalled at a seeded random delay
  into a stage (measured from the stage's first log line; the reference run's stage time sets the
  range) or at a chosen progress point (the k-th finished probe chunk, the k-th training step,
  the moment a stage's temporary output folder appears). For a stage after probe the run folder
  starts as a copy of the reference run without that stage's outputs and those after it, so the
  signal lands in that stage. Then the same command again, to the end: `survived` when every
  output equals the uninterrupted run's (`compare_runs`), `lost` when the resume fails,
  `wrong` when it succeeds with different outputs.
- `enospc`: a write fails with OSError(ENOSPC). In-process: zarr's chunk writer, the training
  checkpoint writer (half a file written, then the error) or a stage record's atomic write raise
  once at a chosen point; `tmpfs` (long version, where `unshare -r -m` allows an unprivileged
  mount): the whole `tinyonn run` on a tmpfs too small for it, then the tmpfs grown and the same
  command run again. Every score store left behind must open (or refuse with a TinyONNError, if
  unfinished) and the rerun must equal the uninterrupted run.
- `deleted`, `truncated`, `bitflip`: one chunk file of a finished store (seeded choice over every
  array) is deleted, cut to half its length or has one bit flipped; `ScoreStore.open`, `summary()`,
  `verify()` and the cluster stage must raise an error that names the array and the chunk key.
  `before-resume` cases damage a partial (killed) probe before it resumes. Undetected damage whose
  cluster plan differs from the reference's is `wrong`.
- `nan`: a NaN forward and an inf gradient injected into training: both steps skipped (weights and
  Adam state unchanged), counted in the log, training goes on.
- `bad-input`: each entry of the bad-input catalogue (`tinyonn.testing.bad_inputs` or
  `tests/bad_inputs.py`, when present) run as it says; `clear-error` (or `skipped` with
  `--skip-bad`) counts it in `bad_input_kinds`.

What must be equal bitwise (`compare_runs`): every file of the uninterrupted run folder, present
in the resumed one — store arrays decoded (values, dtypes, shapes, chunk files, attributes),
safetensors, checkpoints, `.pth`, npz, PNGs and tokenizer files byte for byte, JSON and JSONL
parsed with paths made relative to the run folder. Left out, because they measure the machine
and differ between two uninterrupted runs (a control case checks that): JSON keys named `seconds`
or ending in `_s` (stage times, tok/s, `elapsed_s`) or holding `memory`, the per-step
`TIMING_FIELDS` of `train/log.jsonl`, `resumed_from_step` (the run's history, not its result),
the probe log's timings, and the checkpoint's Python `random` state (never seeded nor used by
training, so it differs between processes). The two renderings (`report/index.html`,
`release/README.md`) embed those times: they are compared with every number masked (their
numbers come from the JSON compared above). Temporary leftovers of a killed writer (`*.partial`,
`.tmp-*`, `*.tmp`, `*.old`) are counted, not failed.

Headline: `kills_survived` (kill -9 and SIGINT cases that resumed equal), `bad_input_kinds`,
`outputs_lost` (must be 0), `silent_wrong` (must be 0), `runtime_s`, `device`, `date`, `command`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import errno
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STAGES = ("probe", "cluster", "assemble", "train", "evaluate", "explain", "release")
STAGE_OUTPUTS = {
    "probe": ("scores.zarr", "probe_log.jsonl"),
    "cluster": ("plan", "plan.tmp"),
    "assemble": ("model", "model.tmp"),
    "train": ("train",),
    "evaluate": ("report/evaluate.json", "report/sparsity_quality.png"),
    "explain": ("report/explain.json", "report/explain", "report/index.html"),
    "release": ("release", "release.tmp", "release.old"),
}
"""What each stage writes in the run folder (removed, with its record, to rerun it)."""
IGNORED = re.compile(r"(^|/)[^/]*\.lock$")
"""Not outputs: the run folder's advisory lock file."""
LEFTOVER = re.compile(r"(\.partial$|(^|/)\.tmp-|\.tmp(-\d+)?$|(^|/)\.[^/]*\.tmp-\d+$|\.old(/|$)|\.tmp/)")
"""Temporary files of an interrupted writer: counted, not failed."""
OUTCOMES_OK = {"survived", "detected", "detected-on-read", "skipped-step", "clear-error", "skipped", "control-equal", "readable",
               "not-killed"}


@dataclass
class Case:
    """One fault and what came of it."""

    name: str
    stage: str
    kind: str
    outcome: str
    detail: str = ""
    seconds: float = 0.0
    leftovers: int = 0

    @property
    def ok(self) -> bool:
        return self.outcome in OUTCOMES_OK


# ---------------------------------------------------------------------------------------------
# the world: a tiny teacher, a data file, a small run config


@dataclass(frozen=True)
class World:
    root: Path
    teacher: Path
    data: Path
    fast: bool = False
    """The tests' smaller run: 48 probe samples (6 chunks), ~24 training steps."""

    def config(self, runs_dir: Path, run: str = "r"):
        """The `RunConfig` every case runs (only `runs_dir` differs between cases)."""
        from tinyonn.clustering import CalibrationConfig, ClusterConfig
        from tinyonn.config import DataConfig, ProbeConfig
        from tinyonn.evaluation.evaluate import EvaluateConfig
        from tinyonn.explain.config import ExplainConfig
        from tinyonn.pipeline import EvalConfig, RunConfig
        from tinyonn.training.config import Phase1Config, Phase2Config, TrainConfig

        return RunConfig(
            run=run, runs_dir=str(runs_dir), teacher=str(self.teacher), data=str(self.data),
            probe_samples=48 if self.fast else 160,
            probe=ProbeConfig(data=DataConfig(max_length=96, batch_size=4), chunk_samples=8),
            cluster=ClusterConfig(method="coact-kmeans", min_size=8, max_size=32, block=8, expert_size=16),
            calibration=CalibrationConfig(max_tokens=4096 if self.fast else 8192, max_examples=160,
                                          data=DataConfig(max_length=96, batch_size=8)),
            train=TrainConfig(rule="smk", max_tokens=8_000 if self.fast else 24_000, validation_per_category=0,
                              checkpoint_every=4,
                              data=DataConfig(max_length=96, batch_size=4), micro_batch_tokens=None, packing=False,
                              pad_to_multiple=8, warmup_steps=2, lr=1e-3, phase1=Phase1Config(steps=8),
                              phase2=Phase2Config(routing="budget"), progress=False),
            eval=EvalConfig(stride=4 if self.fast else 2, max_length=96, batch_size=8, items="none",
                            measure=EvaluateConfig(nf4=False, sweep=(0.5,), bench_prompt_length=8, bench_new_tokens=2)),
            explain=ExplainConfig(per_category=2, max_length=96, max_units=256, tsne_iterations=250, max_samples=64))

    def write_config(self, runs_dir: Path, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.config(runs_dir).to_dict(), indent=1))
        return path


def build_world(root: Path, teacher_dir: Path | None = None, fast: bool = False) -> World:
    """A tiny teacher folder (or `teacher_dir`, e.g. the tests' fixture) and the data file under `root`."""
    from tinyonn import load_probe_set

    root.mkdir(parents=True, exist_ok=True)
    if teacher_dir is None:
        import torch
        from transformers import Qwen3ForCausalLM

        from tests.conftest import build_tiny_tokenizer, tiny_qwen3_config

        teacher_dir = root / "teacher"
        if not (teacher_dir / "config.json").is_file():
            tokenizer = build_tiny_tokenizer()
            torch.manual_seed(0)
            Qwen3ForCausalLM(tiny_qwen3_config(len(tokenizer))).save_pretrained(teacher_dir)
            tokenizer.save_pretrained(teacher_dir)
    data = root / "data.jsonl"
    if not data.is_file():
        rows = [json.dumps({"messages": list(e.messages), "category": e.category})
                for e in load_probe_set("builtin", "train")[::40]]
        data.write_text("\n".join(rows) + "\n")
    return World(root=root, teacher=Path(teacher_dir), data=data, fast=fast)


# ---------------------------------------------------------------------------------------------
# running tinyonn


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
            "TOKENIZERS_PARALLELISM": "false"}


class Tinyonn:
    """`python -m tinyonn.cli ARGS` with stdout/stderr in files (read while it runs)."""

    def __init__(self, args: list[str], logs: Path):
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = logs / "stdout.txt", logs / "stderr.txt"
        self._out, self._err = open(self.stdout_path, "w"), open(self.stderr_path, "w")
        self.started = time.monotonic()
        # SIGINT back to its default in the child: a suite started in the background of a
        # non-interactive shell (nohup, `cmd &`) inherits it ignored, and Ctrl-C would then be a no-op
        self.proc = subprocess.Popen([sys.executable, "-m", "tinyonn.cli", *args], stdout=self._out,
                                     stderr=self._err, env=child_env(), cwd=REPO,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._out.close()
        self._err.close()
        return rc


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_command(config_path: Path, logs: Path, timeout: float = 600) -> tuple[int, str, str]:
    """`tinyonn run --config C` to its end: (exit code, stdout, stderr)."""
    process = Tinyonn(["run", "--config", str(config_path)], logs)
    rc = process.wait(timeout)
    return rc, process.stdout(), process.stderr()


STAGE_START = {stage: re.compile(rf"^\[{stage}\] (?!up to date|done in)", re.M) for stage in STAGES}
STAGE_START["release"] = re.compile(r"^\[explain\] done in", re.M)


@dataclass(frozen=True)
class Trigger:
    """When to signal: `delay` seconds after `stage`'s first log line, or at a progress point
    (`probe_chunks`: k finished probe chunks, `train_steps`: k logged steps, `path`: a file or
    folder of the run appears)."""

    stage: str
    kind: str
    value: float | int | str

    def describe(self) -> str:
        if self.kind == "delay":
            return f"{self.value:.2f} s into {self.stage}"
        return {"probe_chunks": f"after {self.value} probe chunks", "train_steps": f"after {self.value} steps",
                "path": f"when {self.value} appears"}[self.kind]


def _probe_chunks(run_dir: Path) -> int:
    try:
        return len(json.loads((run_dir / "scores.zarr" / "progress.json").read_text()).get("complete_chunks", []))
    except (OSError, ValueError):
        return 0


def _log_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def wait_for(trigger: Trigger, process: Tinyonn, run_dir: Path, timeout: float = 300) -> bool:
    """Block until the trigger fires (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    started_at = None
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            return False
        if trigger.kind == "delay":
            if started_at is None and STAGE_START[trigger.stage].search(process.stdout()):
                started_at = time.monotonic()
            if started_at is not None and time.monotonic() - started_at >= float(trigger.value):
                return True
        elif trigger.kind == "probe_chunks" and _probe_chunks(run_dir) >= int(trigger.value):
            return True
        elif trigger.kind == "train_steps" and _log_lines(run_dir / "train" / "log.jsonl") >= int(trigger.value):
            return True
        elif trigger.kind == "path" and (run_dir / str(trigger.value)).exists():
            return True
        time.sleep(0.003)
    return False


def running_stage(run_dir: Path) -> str:
    """The stage a run is in: the first without a record (a stage's record is removed as it
    starts and written as it ends)."""
    for stage in STAGES:
        if not (run_dir / "stages" / f"{stage}.json").is_file():
            return stage
    return "done"


def strip_from(run_dir: Path, stage: str) -> None:
    """Remove `stage`'s outputs and records and those of every stage after it."""
    for later in STAGES[STAGES.index(stage):]:
        (run_dir / "stages" / f"{later}.json").unlink(missing_ok=True)
        for output in STAGE_OUTPUTS[later]:
            path = run_dir / output
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def prepare_run(reference: Path, case_runs: Path, stage: str, run: str = "r") -> Path:
    """A run folder for a case at `stage`: empty for probe, else the reference's without `stage` on."""
    if case_runs.exists():
        shutil.rmtree(case_runs)
    case_runs.mkdir(parents=True)
    run_dir = case_runs / run
    if stage != "probe":
        shutil.copytree(reference / run, run_dir)
        strip_from(run_dir, stage)
    return run_dir


# ---------------------------------------------------------------------------------------------
# comparing a run folder with the uninterrupted one


def _volatile(key: str) -> bool:
    """JSON keys left out of the comparison (see the module docstring)."""
    return key == "seconds" or key.endswith("_s") or "memory" in key or key in (
        "step_seconds", "resumed_from_step", "produced")


def _strip(value, path: tuple[str, ...] = ()):
    """A JSON value without the machine-dependent fields (see the module docstring)."""
    if isinstance(value, dict):
        return {k: _strip(v, path + (k,)) for k, v in value.items()
                if not _volatile(k)}
    if isinstance(value, list):
        return [_strip(v, path) for v in value]
    return value


ROOTS: set[str] = set()
"""Every runs folder the suite made: paths inside outputs are compared relative to them."""


def _relative(text: str, *roots: Path) -> str:
    for root in sorted({str(r) for r in roots} | {str(Path(r).resolve()) for r in roots} | ROOTS, key=len, reverse=True):
        text = text.replace(root, "<RUNS>")
    return text


def _load_json(path: Path, root: Path):
    return json.loads(_relative(path.read_text(), root))


def _first_difference(a, b, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key, "<absent>") != b.get(key, "<absent>"):
                return _first_difference(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{where}/{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{index}]")
    return f"{where or '/'}: {str(a)[:60]} != {str(b)[:60]}"


def _compare_json(ref: Path, got: Path, ref_root: Path, got_root: Path) -> str | None:
    a, b = _strip(_load_json(ref, ref_root)), _strip(_load_json(got, got_root))
    return None if a == b else _first_difference(a, b)


def _compare_jsonl(ref: Path, got: Path, ref_root: Path, got_root: Path) -> str | None:
    def records(path: Path, root: Path) -> list:
        text = _relative(path.read_text(), root)
        return [_strip(json.loads(line)) for line in text.splitlines() if line.strip()]

    a, b = records(ref, ref_root), records(got, got_root)
    if ref.name == "probe_log.jsonl":  # a history of the processes that ran: its records where present
        want = {r.get("chunk"): r for r in a}
        wrong = [r for r in b if want.get(r.get("chunk")) != r]
        return f"chunk {wrong[0].get('chunk')}: {wrong[0]} != {want.get(wrong[0].get('chunk'))}" if wrong else None
    if a == b:
        return None
    if isinstance(a, list) and len(a) != len(b):
        return f"{len(b)} lines, want {len(a)}"
    return _first_difference(a, b)


def _compare_masked_text(ref: Path, got: Path, ref_root: Path, got_root: Path) -> str | None:
    def masked(path: Path, root: Path) -> list[str]:
        text = _relative(path.read_text(), root)
        return re.sub(r"\d[\d,.]*(e[-+]?\d+)?", "#", text).splitlines()

    a, b = masked(ref, ref_root), masked(got, got_root)
    if a == b:
        return None
    line = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"line {line + 1} differs (numbers masked)"


def _compare_bytes(ref: Path, got: Path) -> str | None:
    if ref.read_bytes() == got.read_bytes():
        return None
    if ref.suffix == ".safetensors":
        from safetensors.numpy import load_file

        a, b = load_file(str(ref)), load_file(str(got))
        if a.keys() != b.keys():
            return f"tensors {sorted(set(a) ^ set(b))[:3]} differ"
        changed = [k for k in a if a[k].tobytes() != b[k].tobytes()]
        return f"{len(changed)} tensors differ, e.g. {changed[:2]}" if changed else "metadata differs"
    return f"bytes differ ({ref.stat().st_size} vs {got.stat().st_size} bytes)"


def compare_stores(ref: Path, got: Path) -> list[str]:
    """Every array of two Zarr stores (values bitwise, dtype, shape), their attributes (machine
    fields left out) and the set of chunk files."""
    import numpy as np
    import zarr

    problems: list[str] = []
    files = lambda root: {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()  # noqa: E731
                          and not LEFTOVER.search(str(p.relative_to(root))) and not IGNORED.search(p.name)}
    missing = sorted(files(ref) - files(got))
    extra = sorted(files(got) - files(ref))
    if missing:
        problems.append(f"scores.zarr: {len(missing)} files missing, e.g. {missing[:3]}")
    if extra:
        problems.append(f"scores.zarr: {len(extra)} extra files, e.g. {extra[:3]}")
    a, b = zarr.open_group(ref, mode="r"), zarr.open_group(got, mode="r")
    if _strip(dict(a.attrs)) != _strip(dict(b.attrs)):
        problems.append("scores.zarr attrs: " + _first_difference(_strip(dict(a.attrs)), _strip(dict(b.attrs))))

    def arrays(group, prefix=""):
        for name, array in group.arrays():
            yield f"{prefix}{name}", array
        for name, sub in group.groups():
            yield from arrays(sub, f"{prefix}{name}/")

    theirs = dict(arrays(b))
    for name, array in arrays(a):
        other = theirs.get(name)
        if other is None:
            problems.append(f"scores.zarr/{name}: missing")
            continue
        try:
            x, y = array[...], other[...]
        except Exception as err:  # noqa: BLE001 - a damaged copy is a difference, named
            problems.append(f"scores.zarr/{name}: unreadable ({type(err).__name__}: {str(err)[:120]})")
            continue
        if x.dtype != y.dtype or x.shape != y.shape or np.asarray(x).tobytes() != np.asarray(y).tobytes():
            problems.append(f"scores.zarr/{name}: values differ")
    return problems


def compare_runs(ref_run: Path, got_run: Path) -> tuple[list[str], int]:
    """(differences, leftover temporary files) between a finished run folder and the uninterrupted
    one (see the module docstring for what is compared bitwise)."""
    ref_root, got_root = ref_run.parent, got_run.parent
    ROOTS.update({str(ref_root), str(got_root)})
    problems: list[str] = []
    if (ref_run / "scores.zarr").is_dir():
        if (got_run / "scores.zarr").is_dir():
            problems += compare_stores(ref_run / "scores.zarr", got_run / "scores.zarr")
        else:
            problems.append("scores.zarr: missing")
    def listed(run: Path) -> set[str]:
        names = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}
        return {n for n in names if not n.startswith("scores.zarr/") and not IGNORED.search(n)}

    ref_files, got_files = listed(ref_run), listed(got_run)
    leftovers = sorted(f for f in got_files - ref_files if LEFTOVER.search(f))
    leftovers += sorted(str(p.relative_to(got_run)) for p in (got_run / "scores.zarr").rglob("*")
                        if p.is_file() and LEFTOVER.search(p.name)) if (got_run / "scores.zarr").is_dir() else []
    extra = sorted(f for f in got_files - ref_files if not LEFTOVER.search(f))
    if extra:
        problems.append(f"{len(extra)} extra files, e.g. {extra[:3]}")
    for name in sorted(ref_files):
        ref, got = ref_run / name, got_run / name
        if not got.is_file():
            problems.append(f"{name}: missing")
            continue
        try:
            if ref.suffix == ".json":
                found = _compare_json(ref, got, ref_root, got_root)
            elif ref.suffix == ".jsonl":
                found = _compare_jsonl(ref, got, ref_root, got_root)
            elif ref.suffix in (".html", ".md"):
                found = _compare_masked_text(ref, got, ref_root, got_root)
            else:
                found = _compare_bytes(ref, got)
        except (OSError, ValueError) as err:
            found = f"unreadable ({type(err).__name__}: {str(err)[:120]})"
        if found:
            problems.append(f"{name}: {found}")
    return problems, len(leftovers)


# ---------------------------------------------------------------------------------------------
# signals: kill -9 and Ctrl-C at a point of a stage, then the same command to the end


def signal_case(world: World, reference: Path, work: Path, name: str, trigger: Trigger, signum: int,
                attempts: int = 3) -> Case:
    """Run, signal at `trigger`, rerun the same command to its end, compare with `reference`
    (the uninterrupted runs folder). A delay trigger the stage outruns is halved and retried."""
    started = time.monotonic()
    kind = "kill9" if signum == signal.SIGKILL else "sigint"
    case_dir = work / name
    landed, signalled, notes = trigger.stage, False, []
    for attempt in range(attempts):
        runs = case_dir / "runs"
        run_dir = prepare_run(reference, runs, trigger.stage)
        config = world.write_config(runs, case_dir / "config.json")
        process = Tinyonn(["run", "--config", str(config)], case_dir / f"signalled-{attempt}")
        fired = wait_for(trigger, process, run_dir)
        if fired and process.proc.poll() is None:
            landed = running_stage(run_dir)
            process.proc.send_signal(signum)
            rc = process.wait(timeout=180)
            signalled = True
            notes.append(f"signalled {trigger.describe()} (in {landed}), exit {rc}"
                         + (f": {last_line(process.stderr())}" if signum == signal.SIGINT else ""))
            break
        process.wait(timeout=300)
        if trigger.kind != "delay":
            break
        trigger = dataclasses.replace(trigger, value=float(trigger.value) / 2)
    if not signalled:
        return Case(name, trigger.stage, kind, "not-killed", f"the run ended before {trigger.describe()}",
                    time.monotonic() - started)
    rc, out, err = run_command(case_dir / "config.json", case_dir / "resumed")
    if rc != 0:
        return Case(name, landed, kind, "lost", "; ".join(notes) + f"; the rerun failed (exit {rc}): {last_line(err)}",
                    time.monotonic() - started)
    problems, leftovers = compare_runs(reference / "r", case_dir / "runs" / "r")
    outcome = "survived" if not problems else "wrong"
    detail = "; ".join(notes) + ("; rerun equal to the uninterrupted run" if not problems else
                                 f"; rerun differs: {'; '.join(problems[:4])}")
    shutil.rmtree(case_dir / "runs", ignore_errors=True) if not problems else None
    return Case(name, landed, kind, outcome, detail, time.monotonic() - started, leftovers)


def plan_signal_cases(rng: random.Random, stage_seconds: dict[str, float], per_stage: int, sigint_per_stage: int,
                      stages: tuple[str, ...]) -> list[tuple[str, Trigger, int]]:
    """Seeded kill points: per stage, `per_stage` kill -9 (random delays into the stage, plus one
    progress point) and `sigint_per_stage` Ctrl-C."""
    points = {"probe": Trigger("probe", "probe_chunks", rng.randint(2, 17)),
              "cluster": Trigger("cluster", "path", "plan.tmp"),
              "assemble": Trigger("assemble", "path", "model.tmp"),
              "train": Trigger("train", "train_steps", rng.randint(3, 60)),
              "evaluate": Trigger("evaluate", "path", "report/sparsity_quality.png"),
              "explain": Trigger("explain", "path", "report/explain"),
              "release": Trigger("release", "path", "release.tmp")}
    cases = []
    for stage in stages:
        span = max(stage_seconds.get(stage, 1.0), 0.2)
        kills = [points[stage]] + [Trigger(stage, "delay", round(rng.uniform(0.02, 1.0) * span, 3))
                                   for _ in range(per_stage - 1)]
        for index, trigger in enumerate(kills[:per_stage]):
            cases.append((f"kill9-{stage}-{index}", trigger, signal.SIGKILL))
        for index in range(sigint_per_stage):  # a stage shorter than a second: at its write
            short = stage_seconds.get(stage, 1.0) < 1.0
            trigger = points[stage] if index % 2 or short else \
                Trigger(stage, "delay", round(rng.uniform(0.02, 1.0) * span, 3))
            cases.append((f"sigint-{stage}-{index}", trigger, signal.SIGINT))
    return cases


# ---------------------------------------------------------------------------------------------
# disk full


class DiskFull:
    """Make one kind of write fail once with OSError(ENOSPC) at a chosen call (`after` calls that
    match go through first); half the bytes are written before the error where a writer would."""

    def __init__(self, target: str, after: int, match: str = ""):
        self.target, self.after, self.match = target, after, match
        self.calls, self.raised = 0, None

    def _due(self, what: str) -> bool:
        if self.raised is not None or self.match not in what:
            return False
        self.calls += 1
        return self.calls > self.after

    def _error(self, what: str) -> OSError:
        self.raised = what
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)

    @contextlib.contextmanager
    def active(self) -> Iterator[DiskFull]:
        patches: list[tuple[object, str, object]] = []
        if self.target == "zarr":
            import zarr.storage._local as local

            original = local._put

            def put(path, value, exclusive=False):
                if self._due(str(path)):
                    view = value.as_buffer_like()
                    with contextlib.suppress(OSError), local._atomic_write(path, "wb", exclusive=exclusive) as f:
                        f.write(bytes(view)[: len(view) // 2])
                        raise self._error(str(path))
                    raise self._error(str(path))
                return original(path, value, exclusive)

            patches.append((local, "_put", put))
        elif self.target == "checkpoint":
            import tinyonn.training.checkpoint as checkpoint

            original_save = checkpoint.save_file

            def save_file(tensors, filename, metadata=None):
                if self._due(str(filename)):
                    original_save(tensors, filename, metadata)
                    with open(filename, "r+b") as handle:
                        handle.truncate(os.path.getsize(filename) // 2)
                    raise self._error(str(filename))
                return original_save(tensors, filename, metadata)

            patches.append((checkpoint, "save_file", save_file))
        elif self.target == "record":  # every module's `write_text_atomic` (JSON records, summaries, reports)
            import tinyonn.files as files
            import tinyonn.pipeline  # noqa: F401  (imports the modules that hold the function by name)

            original_write = files.write_text_atomic

            def write_text_atomic(path, text):
                if self._due(str(path)):
                    temporary = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
                    temporary.write_text(text[: len(text) // 2])
                    raise self._error(str(path))
                return original_write(path, text)

            patches += [(module, "write_text_atomic", write_text_atomic) for name, module in list(sys.modules.items())
                        if name.startswith("tinyonn") and getattr(module, "write_text_atomic", None) is original_write]
        elif self.target == "progress":  # the probe's progress record
            import tinyonn.store.zarr_store as zarr_store

            original_progress = zarr_store._write_progress

            def write_progress(path, *args, **kwargs):
                if self._due(str(path)):
                    (Path(path) / ".progress.json.injected.tmp").write_text('{"fingerprint": ')
                    raise self._error(str(Path(path) / "progress.json"))
                return original_progress(path, *args, **kwargs)

            patches.append((zarr_store, "_write_progress", write_progress))
        else:
            raise ValueError(f"unknown disk-full target {self.target!r}")
        saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
        for owner, attr, value in patches:
            setattr(owner, attr, value)
        try:
            yield self
        finally:
            for owner, attr, value in saved:
                setattr(owner, attr, value)


def store_readable(path: Path) -> str | None:
    """None when a score store left behind opens (finished) or refuses with a TinyONNError
    (unfinished); else what went wrong."""
    from tinyonn.errors import TinyONNError
    from tinyonn.store import ScoreStore

    if not path.exists():
        return None
    try:
        store = ScoreStore.open(path)
        store.summary(file=None)
        if hasattr(store, "verify"):
            store.verify()
    except TinyONNError:
        return None
    except Exception as err:  # noqa: BLE001 - what a user would see as a crash
        return f"{type(err).__name__}: {str(err)[:150]}"
    return None


def run_in_process(config) -> dict:
    """`run_pipeline` with its printing silenced."""
    from tinyonn.pipeline import run_pipeline

    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        return run_pipeline(config, log=lambda *args: None)


def enospc_case(world: World, reference: Path, work: Path, name: str, stage: str, target: str, after: int,
                match: str = "") -> Case:
    """In-process: rerun `stage` onwards with one write failing with ENOSPC, check what is left
    is readable, run again, compare."""
    started = time.monotonic()
    case_dir = work / name
    runs = case_dir / "runs"
    run_dir = prepare_run(reference, runs, stage)
    config = world.config(runs)
    disk = DiskFull(target, after, match)
    error = None
    with disk.active():
        try:
            run_in_process(config)
        except Exception as err:  # noqa: BLE001 - the failure under test
            error = err
    if disk.raised is None:
        return Case(name, stage, "enospc", "not-injected", f"no {target} write matched after {after}",
                    time.monotonic() - started)
    landed = running_stage(run_dir)
    notes = [f"ENOSPC on {Path(disk.raised).relative_to(runs) if disk.raised.startswith(str(runs)) else disk.raised} "
             f"(in {landed}): " + (f"{type(error).__name__}: {str(error)[:120]}" if error else "no error raised")]
    if error is None:
        return Case(name, landed, "enospc", "wrong", notes[0] + " — the run reported success", time.monotonic() - started)
    unreadable = store_readable(run_dir / "scores.zarr")
    if unreadable:
        return Case(name, landed, "enospc", "lost", notes[0] + f"; store unreadable: {unreadable}",
                    time.monotonic() - started)
    try:
        run_in_process(config)
    except Exception as err:  # noqa: BLE001
        return Case(name, landed, "enospc", "lost", notes[0] + f"; the rerun failed: {type(err).__name__}: {err}",
                    time.monotonic() - started)
    problems, leftovers = compare_runs(reference / "r", run_dir)
    if problems:
        return Case(name, landed, "enospc", "wrong", notes[0] + f"; rerun differs: {'; '.join(problems[:4])}",
                    time.monotonic() - started, leftovers)
    shutil.rmtree(runs, ignore_errors=True)
    return Case(name, landed, "enospc", "survived", notes[0] + "; store readable; rerun equal to the uninterrupted run",
                time.monotonic() - started, leftovers)


def tmpfs_available() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null "
                            "|| mount -t tmpfs -o size=1m tmpfs \"$0\"", "/tmp"], capture_output=True)
    return probe.returncode == 0


def tmpfs_case(world: World, reference: Path, work: Path, name: str, size_kib: int, full_kib: int) -> Case:
    """The whole `tinyonn run` on a tmpfs of `size_kib` (inside `unshare -r -m`), then the tmpfs
    grown to `full_kib` and the same command again; the run folder is copied out and compared."""
    started = time.monotonic()
    case_dir = work / name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    mount, out = case_dir / "mnt", case_dir / "out"
    mount.mkdir(parents=True)
    ROOTS.add(str(mount / "runs"))  # where the outputs were written, then copied to `out`
    config = world.write_config(mount / "runs", case_dir / "config.json")
    python = sys.executable
    script = f"""
set -u
mount -t tmpfs -o size={size_kib}k tmpfs {mount}
cd {REPO}
{python} -m tinyonn.cli run --config {config} > {case_dir}/full.out 2> {case_dir}/full.err
echo $? > {case_dir}/full.rc
cp -r {mount}/runs {case_dir}/left 2>/dev/null
mount -o remount,size={full_kib}k {mount}
{python} -m tinyonn.cli run --config {config} > {case_dir}/rerun.out 2> {case_dir}/rerun.err
echo $? > {case_dir}/rerun.rc
mkdir -p {out} && cp -r {mount}/runs {out}/
"""
    subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], env=child_env(), timeout=900, check=False)
    read = lambda p: (case_dir / p).read_text().strip() if (case_dir / p).is_file() else ""  # noqa: E731
    first, second = read("full.rc"), read("rerun.rc")
    left = case_dir / "left" / "r"
    landed = running_stage(left) if left.is_dir() else "probe"
    detail = f"tmpfs {size_kib} KiB: exit {first}: {last_line(read('full.err'))}"
    if first == "0":
        return Case(name, "done", "enospc", "not-injected", detail + " (the run fit)", time.monotonic() - started)
    unreadable = store_readable(left / "scores.zarr") if left.is_dir() else None
    if unreadable:
        return Case(name, landed, "enospc", "lost", detail + f"; store unreadable: {unreadable}", time.monotonic() - started)
    if second != "0":
        return Case(name, landed, "enospc", "lost", detail + f"; rerun exit {second}: {last_line(read('rerun.err'))}",
                    time.monotonic() - started)
    problems, leftovers = compare_runs(reference / "r", out / "runs" / "r")
    outcome = "wrong" if problems else "survived"
    detail += "; rerun differs: " + "; ".join(problems[:4]) if problems else "; store readable; rerun after growing the tmpfs equal to the uninterrupted run"
    if not problems:
        shutil.rmtree(case_dir, ignore_errors=True)
    return Case(name, landed, "enospc", outcome, detail, time.monotonic() - started, leftovers)


# ---------------------------------------------------------------------------------------------
# damaged chunks


def chunk_files(store: Path) -> list[tuple[str, str]]:
    """(array path, chunk key) of every chunk file of a store ("per_sample/act", "c/1/0")."""
    found = []
    for meta in sorted(store.rglob("zarr.json")):
        array = meta.parent
        try:
            if json.loads(meta.read_text()).get("node_type") != "array":
                continue
        except ValueError:
            continue
        for chunk in sorted((array / "c").rglob("*")) if (array / "c").is_dir() else []:
            if chunk.is_file() and not LEFTOVER.search(chunk.name):
                found.append((str(array.relative_to(store)), str(chunk.relative_to(array))))
    return found


def damage(store: Path, array: str, chunk: str, kind: str, rng: random.Random) -> str:
    path = store / array / chunk
    data = path.read_bytes()
    if kind == "deleted":
        path.unlink()
        return f"deleted {array}/{chunk}"
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
        return f"cut {array}/{chunk} to {len(data) // 2} of {len(data)} bytes"
    if kind == "bitflip":
        position = rng.randrange(len(data) * 8)
        flipped = bytearray(data)
        flipped[position // 8] ^= 1 << (position % 8)
        path.write_bytes(bytes(flipped))
        return f"flipped bit {position} of {array}/{chunk} ({len(data)} bytes)"
    raise ValueError(kind)


def _names_chunk(message: str, array: str, chunk: str) -> bool:
    return array in message and chunk in message


def detect_damage(world: World, reference: Path, run_dir: Path, array: str, chunk: str,
                  cluster: bool = True) -> tuple[str, str]:
    """(outcome, detail) of reading a damaged store each way a user would: `ScoreStore.open`,
    `summary()`, `verify()`, and the cluster stage (its plan compared with the reference's when it
    succeeds; `cluster=False` skips it once `verify` has named the chunk). `wrong`: the cluster
    stage succeeded with another plan; `detected`: a step raised an error naming the array and the
    chunk key (and no step read the damage as data); `detected-unnamed`: errors, none naming them;
    `undetected`: every step succeeded and the plan is the reference's."""
    from tinyonn.pipeline import cluster_stage
    from tinyonn.store import ScoreStore

    store = run_dir / "scores.zarr"
    steps: list[tuple[str, Callable[[], object]]] = [
        ("open", lambda: ScoreStore.open(store)),
        ("summary", lambda: ScoreStore.open(store).summary(file=None)),
        ("verify", lambda: ScoreStore.open(store).verify()),
    ]
    results, named, raised = [], False, False
    for what, call in steps:
        try:
            call()
            results.append(f"{what} passed")
        except Exception as err:  # noqa: BLE001 - the detection under test
            raised = True
            named |= _names_chunk(str(err), array, chunk)
            results.append(f"{what} raised {type(err).__name__}: {str(err)[:500]}")
    plan_differs = None
    if cluster or not named:
        strip_from(run_dir, "cluster")
        try:
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                cluster_stage(world.config(run_dir.parent), log=lambda *args: None)
            plan_differs = compare_runs_subset(reference / "r" / "plan", run_dir / "plan")
            results.append("cluster passed, " + ("another plan" if plan_differs else "the reference's plan"))
        except Exception as err:  # noqa: BLE001
            raised = True
            named |= _names_chunk(str(err), array, chunk)
            results.append(f"cluster raised {type(err).__name__}: {str(err)[:500]}")
    detail = "; ".join(results)
    if plan_differs:
        return "wrong", detail
    if named:
        return "detected", detail
    return ("detected-unnamed" if raised else "undetected"), detail


def damage_case(world: World, reference: Path, work: Path, name: str, kind: str, array: str, chunk: str,
                rng: random.Random, cluster: bool = True) -> Case:
    started = time.monotonic()
    case_dir = work / name
    runs = case_dir / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    runs.mkdir(parents=True)
    run_dir = runs / "r"
    shutil.copytree(reference / "r", run_dir)
    what = damage(run_dir / "scores.zarr", array, chunk, kind, rng)
    outcome, detail = detect_damage(world, reference, run_dir, array, chunk, cluster)
    if outcome == "detected":
        shutil.rmtree(case_dir, ignore_errors=True)
    return Case(name, "store", kind, outcome, f"{what}: {detail}", time.monotonic() - started)


def compare_runs_subset(ref: Path, got: Path) -> list[str]:
    """Differences between two folders of outputs (plan/, model/) by `compare_runs`' rules."""
    problems = []
    for path in sorted(p for p in ref.rglob("*") if p.is_file()):
        other = got / path.relative_to(ref)
        if not other.is_file():
            problems.append(f"{path.relative_to(ref)}: missing")
        elif path.suffix == ".json":
            found = _compare_json(path, other, ref.parent.parent, got.parent.parent)
            problems += [f"{path.relative_to(ref)}: {found}"] if found else []
        elif path.suffix != ".png":
            found = _compare_bytes(path, other)
            problems += [f"{path.relative_to(ref)}: {found}"] if found else []
    return problems


class InjectedCrash(Exception):
    """Stands for a process that dies at this point (raised from a patched writer)."""


def damage_before_resume_case(world: World, reference: Path, work: Path, name: str, kind: str, array: str,
                              rng: random.Random, stop_after: int = 6) -> Case:
    """A probe stopped after `stop_after` chunks (an injected crash), one written chunk of `array`
    (of a complete probe chunk) damaged, then the probe resumed: it must refuse, naming the chunk,
    rather than finalise a store built on the damage."""
    from tinyonn.errors import TinyONNError

    started = time.monotonic()
    case_dir = work / name
    runs = case_dir / "runs"
    run_dir = prepare_run(reference, runs, "probe")
    config = world.config(runs)
    written: list[str] = []

    import zarr.storage._local as local

    original = local._put

    def put(path, value, exclusive=False):
        text = str(path)
        if "/partials/count/c/" in text:
            written.append(text)
            if len(written) > stop_after:
                raise InjectedCrash("the probe stops here")
        return original(path, value, exclusive)

    local._put = put
    try:
        run_in_process(config)
    except InjectedCrash:
        pass
    finally:
        local._put = original
    store = run_dir / "scores.zarr"
    progress = json.loads((store / "progress.json").read_text()).get("complete_chunks", [])
    candidates = [(a, c) for a, c in chunk_files(store) if a == array and int(c.split("/")[1]) in progress]
    if not candidates:
        return Case(name, "probe", kind, "not-injected", f"no written chunk of {array} among {progress}",
                    time.monotonic() - started)
    target_array, target_chunk = rng.choice(candidates)
    what = damage(store, target_array, target_chunk, kind, rng)
    try:
        run_in_process(config)
    except TinyONNError as err:
        named = _names_chunk(str(err), target_array, target_chunk)
        if named:
            shutil.rmtree(case_dir, ignore_errors=True)
        return Case(name, "probe", kind, "detected" if named else "detected-unnamed",
                    f"{what} after {len(progress)} probe chunks; the resume raised {type(err).__name__}: {str(err)[:300]}",
                    time.monotonic() - started)
    except Exception as err:  # noqa: BLE001
        return Case(name, "probe", kind, "detected-unnamed",
                    f"{what}; the resume crashed: {type(err).__name__}: {str(err)[:300]}", time.monotonic() - started)
    # the resume finished over the damage: is it still named when the store is read, and did any
    # output besides the damaged chunk itself come out different?
    problems, _ = compare_runs(reference / "r", run_dir)
    others = [p for p in problems if not p.startswith(f"scores.zarr/{target_array}:")]
    outcome, detail = detect_damage(world, reference, run_dir, target_array, target_chunk, cluster=False)
    if others:
        outcome = "wrong"
    elif outcome == "detected":
        outcome = "detected-on-read"
    return Case(name, "probe", kind, outcome,
                f"{what} after {len(progress)} probe chunks; the resume finished over it (it reads only the partial "
                f"sums); other outputs {'differ: ' + '; '.join(others[:3]) if others else 'equal the reference'}; "
                f"then {detail}", time.monotonic() - started)


# ---------------------------------------------------------------------------------------------
# NaN / inf steps


def nan_case(world: World, work: Path) -> Case:
    """A NaN forward (step 3) and an inf gradient (step 5) in a short training of the tiny model."""
    import math

    import torch

    from tinyonn import load_probe_set, load_teacher
    from tinyonn.clustering.plan import full_plan
    from tinyonn.config import DataConfig
    from tinyonn.model.assemble import assemble
    from tinyonn.model.routing import RoutingConfig
    from tinyonn.training import NonFiniteStepWarning, Phase1Config, Phase2Config, TrainConfig, train
    from tinyonn.training.checkpoint import load_checkpoint

    import warnings

    started = time.monotonic()
    teacher, tokenizer = load_teacher(world.teacher)
    model = assemble(teacher, full_plan(2, 128, 8, groups=2, seed=0), RoutingConfig(mode="all"))
    config = TrainConfig(data=DataConfig(max_length=64, batch_size=8), max_steps=7, max_tokens=None, lr=3e-3,
                         router_lr=1e-2, warmup_steps=1, progress=False, checkpoint_every=1, keep_checkpoints=10,
                         phase1=Phase1Config(steps=2), phase2=Phase2Config(routing="budget", active_fraction=0.5))
    state = {"next": 1}
    layer = model.moe_layers()[0]
    layer.register_forward_hook(lambda m, a, out: out * float("nan") if state["next"] == 3 else out)
    layer.w_up.register_hook(lambda g: g * float("inf") if state["next"] == 5 else g)
    out = work / "nan"
    shutil.rmtree(out, ignore_errors=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train(model, teacher, tokenizer, load_probe_set("builtin", "train")[::300], config, out,
                        on_step=lambda step, record: state.__setitem__("next", step + 1))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    checkpoints = {s: load_checkpoint(out / "checkpoints" / f"step-{s:08d}") for s in range(1, 8)}
    unchanged = all(all(torch.equal(checkpoints[s - 1].model[k], checkpoints[s].model[k]) for k in checkpoints[s].model)
                    and all(torch.equal(checkpoints[s - 1].optimizer[k], checkpoints[s].optimizer[k])
                            for k in checkpoints[s].optimizer) for s in (3, 5))
    moved = all(any(not torch.equal(checkpoints[s - 1].model[k], checkpoints[s].model[k]) for k in checkpoints[s].model)
                for s in (4, 6, 7))
    finite = all(torch.isfinite(t).all() for t in checkpoints[7].model.values())
    warned = sum(issubclass(w.category, NonFiniteStepWarning) for w in caught)
    skipped = [r["step"] for r in log if r.get("skipped")]
    ok = (skipped == [3, 5] and summary.get("skipped_steps") == 2 and unchanged and moved and finite and warned == 2
          and all(math.isfinite(r["loss"]) for r in log if r["step"] != 3))
    detail = (f"skipped steps {skipped}, summary skipped_steps {summary.get('skipped_steps')}, {warned} warnings; "
              f"weights and Adam state unchanged by the skipped steps: {unchanged}; later steps moved: {moved}; "
              f"final weights finite: {finite}")
    shutil.rmtree(out, ignore_errors=True)
    return Case("nan-forward-and-inf-gradient", "train", "nan", "skipped-step" if ok else "wrong", detail,
                time.monotonic() - started)


# ---------------------------------------------------------------------------------------------
# bad inputs


def load_bad_inputs():
    """The inputs-errors catalogue (`tinyonn.testing.bad_inputs` or `tests/bad_inputs.py`), or None."""
    import importlib

    for module in ("tinyonn.testing.bad_inputs", "tests.bad_inputs"):
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name not in (module, module.rsplit(".", 1)[0]):
                raise
    return None


def bad_input_cases(world: World, work: Path) -> list[Case]:
    """Run every catalogue entry (see `load_bad_inputs`); an entry is expected to provide its own
    runner (`run_entry` / `run_case`) that returns whether the error was clear."""
    catalogue = load_bad_inputs()
    if catalogue is None:
        return [Case("bad-input-catalogue", "inputs", "bad-input", "missing",
                     "no bad-input catalogue (tinyonn/testing/bad_inputs.py or tests/bad_inputs.py) yet")]
    return run_catalogue(catalogue, world, work)


def run_catalogue(catalogue, world: World, work: Path) -> list[Case]:
    """Each entry through the catalogue's own `run_entry` (its command in-process, the one-line
    error, no traceback, nothing written before lost); a bad data line also with `--skip-bad`."""
    if work.exists():
        shutil.rmtree(work)
    fixtures = catalogue.make_fixtures(work / "fixtures")
    cases = []
    for entry in catalogue.CATALOGUE:
        for skip_bad in (False, True) if entry.skip_bad is not None else (False,):
            started = time.monotonic()
            try:
                outcome = catalogue.run_entry(entry, work / (entry.name + ("-skip-bad" if skip_bad else "")), fixtures,
                                              skip_bad=skip_bad)
            except BaseException as err:  # noqa: BLE001 - an entry that escapes the CLI is a finding
                cases.append(Case(entry.name + (" --skip-bad" if skip_bad else ""), entry.area, "bad-input", "crash",
                                  f"{type(err).__name__}: {str(err)[:200]}", time.monotonic() - started))
                continue
            problems = list(outcome.problems)
            if not problems:
                result = "skipped" if skip_bad else "clear-error"
                detail = f"exit {outcome.exit_code}: " + (outcome.error_lines[0][:200] if outcome.error_lines
                                                          else f"{entry.skip_bad} bad line(s) skipped and counted")
            elif any("lost or changed" in p for p in problems):
                result, detail = "lost", "; ".join(problems)
            elif outcome.exit_code == 0 and not skip_bad:
                result, detail = "wrong", "accepted without an error: " + "; ".join(problems)
            else:
                result, detail = "unclear-error", "; ".join(problems)
            cases.append(Case(entry.name + (" --skip-bad" if skip_bad else ""), entry.area, "bad-input", result,
                              detail, time.monotonic() - started))
    shutil.rmtree(work, ignore_errors=True)
    return cases


# ---------------------------------------------------------------------------------------------
# the suite


def reference_runs(world: World, work: Path, reuse: bool = False) -> tuple[Path, dict[str, float], Case]:
    """Two uninterrupted `tinyonn run`s: the reference, and a control that must equal it (`reuse`:
    those a previous call left in `work`, when both finished)."""
    reference = work / "reference" / "runs"
    control = work / "control" / "runs"
    for runs, label in ((reference, "reference"), (control, "control")):
        if reuse and (runs / "r" / "stages" / "release.json").is_file():
            continue
        if runs.exists():
            shutil.rmtree(runs)
        config = world.write_config(runs, runs.parent / "config.json")
        started = time.monotonic()
        rc, out, err = run_command(config, runs.parent / "logs")
        if rc != 0:
            raise SystemExit(f"the {label} run failed (exit {rc}): {err[-2000:]}")
        print(f"{label} run: {time.monotonic() - started:.1f} s", flush=True)
    seconds = {stage: json.loads((reference / "r" / "stages" / f"{stage}.json").read_text())["seconds"] for stage in STAGES}
    problems, _ = compare_runs(reference / "r", control / "r")
    case = Case("control-two-uninterrupted-runs", "all", "control", "control-equal" if not problems else "wrong",
                "two uninterrupted runs are equal under the comparison's rules" if not problems
                else "; ".join(problems[:6]))
    return reference, seconds, case


def summarise(cases: list[Case], started: float, command: str) -> dict:
    import torch

    by_kind = Counter(c.kind for c in cases)
    kills = [c for c in cases if c.kind in ("kill9", "sigint") and c.outcome != "not-killed"]
    lost = [c for c in cases if c.outcome == "lost"]
    wrong = [c for c in cases if c.outcome == "wrong" or (c.kind == "control" and c.outcome != "control-equal")]
    bad = [c for c in cases if c.kind == "bad-input"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')})"
    return {
        "kills_survived": sum(c.outcome == "survived" for c in kills),
        "kills": len(kills),
        "kill_points_by_stage": dict(Counter(c.stage for c in kills if c.outcome != "not-killed")),
        "bad_input_kinds": len({c.name for c in bad if c.outcome == "clear-error"}),
        "bad_input_skipped_with_skip_bad": sum(c.outcome == "skipped" for c in bad),
        "outputs_lost": len(lost),
        "silent_wrong": len(wrong),
        "leftover_files": sum(c.leftovers for c in cases),
        "cases_by_kind": dict(by_kind),
        "failed": [c.name for c in cases if not c.ok],
        "runtime_s": round(time.monotonic() - started, 1),
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "cases": [dataclasses.asdict(c) | {"seconds": round(c.seconds, 1)} for c in cases],
    }


def table(result: dict) -> str:
    """The README's tables: the faults by kind and stage (outcome counts), the bad inputs by area,
    then the headline fields."""
    stages = [*STAGES, "store"]
    faults = [c for c in result["cases"] if c["kind"] not in ("bad-input", "control")]
    kinds = sorted({c["kind"] for c in faults}, key=["kill9", "sigint", "enospc", "deleted", "truncated", "bitflip",
                                                      "nan"].index)
    used = [s for s in stages if any(c["stage"] == s for c in faults)]
    lines = ["| fault | " + " | ".join(used) + " | outcomes |", "|---|" + "---:|" * len(used) + "---|"]
    for kind in kinds:
        mine = [c for c in faults if c["kind"] == kind]
        cells = [str(sum(c["stage"] == stage for c in mine) or "") for stage in used]
        outcomes = Counter(c["outcome"] for c in mine)
        lines.append(f"| {kind} | " + " | ".join(cells) + " | "
                     + ", ".join(f"{outcome} {n}" for outcome, n in sorted(outcomes.items())) + " |")
    bad = [c for c in result["cases"] if c["kind"] == "bad-input"]
    if bad:
        areas = sorted({c["stage"] for c in bad})
        lines += ["", "| bad input | " + " | ".join(areas) + " | outcomes |", "|---|" + "---:|" * len(areas) + "---|"]
        cells = [str(sum(c["stage"] == area for c in bad)) for area in areas]
        outcomes = Counter(c["outcome"] for c in bad)
        lines.append("| kinds (+ `--skip-bad` reruns) | " + " | ".join(cells) + " | "
                     + ", ".join(f"{outcome} {n}" for outcome, n in sorted(outcomes.items())) + " |")
    lines += ["", f"`kills_survived` {result['kills_survived']} of {result['kills']}, `bad_input_kinds` "
              f"{result['bad_input_kinds']}, `outputs_lost` {result['outputs_lost']}, `silent_wrong` "
              f"{result['silent_wrong']}, `runtime_s` {result['runtime_s']:.0f} ({result['device']}, {result['date'][:10]})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one case of each kind")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--work", default="/tmp/tinyonn-faults", help="scratch folder (cases that fail stay there)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "faults.json"))
    parser.add_argument("--only", default=None, help="comma-separated kinds: signals,enospc,damage,nan,bad-input")
    parser.add_argument("--reuse-reference", action="store_true",
                        help="reuse the uninterrupted runs a previous call left in --work (same code only)")
    parser.add_argument("--match", default=None, help="only the cases whose name matches this regex")
    parser.add_argument("--table", metavar="JSON", default=None, help="print the README table of a result file")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    started = time.monotonic()
    command = "OMP_NUM_THREADS=1 python bench/faults.py " + " ".join(argv if argv is not None else sys.argv[1:])
    kinds = set((args.only or "signals,enospc,damage,nan,bad-input").split(","))
    rngs = {kind: random.Random(f"{args.seed}-{kind}") for kind in ("signals", "damage")}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    world = build_world(work / "world")
    reference, seconds, control = reference_runs(world, work, args.reuse_reference)
    cases = [control]

    def wanted(name: str) -> bool:
        return args.match is None or re.search(args.match, name) is not None

    def record(case: Case) -> None:
        cases.append(case)
        print(f"[{case.kind}] {case.name}: {case.outcome} ({case.seconds:.1f} s) {case.detail[:240]}", flush=True)

    if "signals" in kinds:
        stages = STAGES
        per_stage, sigints = (1, 0) if args.quick else (4, 1)
        plan = plan_signal_cases(rngs["signals"], seconds, per_stage, sigints, stages)
        if not args.quick:  # explain and release: one kill -9 each is enough; the five stages get four
            plan = [p for p in plan if p[1].stage not in ("explain", "release") or p[0].endswith("-0")]
        for name, trigger, signum in filter(lambda p: wanted(p[0]), plan):
            record(signal_case(world, reference, work / "signals", name, trigger, signum))
    if "enospc" in kinds:
        points = [("enospc-probe-chunk", "probe", "zarr", 5, "/per_sample/act/c/"),
                  ("enospc-train-checkpoint", "train", "checkpoint", 3, "model.safetensors"),
                  ("enospc-cluster-record", "cluster", "record", 0, "stages/cluster.json")]
        if not args.quick:
            points += [("enospc-probe-progress", "probe", "progress", 5, "scores.zarr"),
                       ("enospc-probe-finalize", "probe", "zarr", 0, "/summary/"),
                       ("enospc-train-optimizer", "train", "checkpoint", 9, "optimizer.safetensors"),
                       ("enospc-assemble-record", "assemble", "record", 0, "stages/assemble.json"),
                       ("enospc-train-summary", "train", "record", 0, "summary.json")]
        for name, stage, target, after, match in filter(lambda p: wanted(p[0]), points):
            record(enospc_case(world, reference, work / "enospc", name, stage, target, after, match))
        if not args.quick and tmpfs_available():
            total = sum(p.stat().st_size for p in (reference / "r").rglob("*") if p.is_file()) // 1024
            for fraction in (0.15, 0.4, 0.6, 0.8, 0.95):
                if wanted(f"tmpfs-{int(fraction * 100)}pct"):
                        record(tmpfs_case(world, reference, work / "tmpfs", f"tmpfs-{int(fraction * 100)}pct",
                                      int(total * fraction), total * 4))
    if "damage" in kinds:
        rng = rngs["damage"]
        chunks = chunk_files(reference / "r" / "scores.zarr")
        count = 1 if args.quick else 4
        before_resume = {"deleted": "partials/act", "truncated": "per_sample/act", "bitflip": "samples/loss"}
        for kind in ("deleted", "truncated", "bitflip"):
            picks = [("units/layer", next(c for a, c in chunks if a == "units/layer"))] + \
                [rng.choice(chunks) for _ in range(count - 1)] if not args.quick else [rng.choice(chunks)]
            for index, (array, chunk) in enumerate(picks):
                if wanted(f"{kind}-{index}"):
                    record(damage_case(world, reference, work / "damage", f"{kind}-{index}", kind, array, chunk, rng))
            if not args.quick and wanted(f"{kind}-before-resume"):
                record(damage_before_resume_case(world, reference, work / "damage", f"{kind}-before-resume", kind,
                                                 before_resume[kind], rng))
    if "nan" in kinds and wanted("nan-forward-and-inf-gradient"):
        record(nan_case(world, work))
    if "bad-input" in kinds:
        for case in bad_input_cases(world, work / "bad"):
            record(case)
    result = summarise(cases, started, command)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"written {args.out}")
    return 0 if result["outputs_lost"] == 0 and result["silent_wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
