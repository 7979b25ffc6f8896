"""The pipeline as an API: one `RunConfig` for a whole run, stage functions over the run folder.

    teacher ─ probe ─→ scores.zarr ─ cluster ─→ plan/ ─ assemble ─→ model/ ─ train ─→ train/model/
                                                                       ─ evaluate ─→ report/evaluate.json
                                                                       ─ explain ─→ report/explain.json, index.html

`run_pipeline(RunConfig(...))` writes the config to `<runs_dir>/<run>/run_config.json` and calls the
stages in order. Each stage is a function `stage(config) -> Path` that reads its inputs from the run
folder and writes its outputs there, so any stage can be run (or rerun) alone. Each records
`stages/<stage>.json`: a fingerprint of its config and of its inputs' fingerprints, its outputs,
its time, and the identity of what it produced. A stage whose record matches and whose outputs are
all present (and still the ones it produced: `tinyonn probe --overwrite` replaces a store behind
the records' back) is skipped; otherwise it runs again, and so does everything downstream of it
(their input fingerprints change).

A stage called alone (`tinyonn cluster/assemble/train/...`, or `cluster_stage(config)`) first checks
that every stage upstream of it is current for `config` — made from the outputs now upstream of it
and with the same settings — and raises `StaleOutputError` naming the stale output before anything
is written (`run_pipeline` reruns such stages instead). Every stage, `run_pipeline` and
`tinyonn.probe` hold the run folder's lock (`tinyonn.runlock`): a second writer gets
`RunInUseError` at once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import time
import typing
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tinyonn.clustering import CalibrationConfig, ClusterConfig
from tinyonn.config import ProbeConfig
from tinyonn.errors import TinyONNError
from tinyonn.evaluation.evaluate import EvaluateConfig
from tinyonn.explain.config import ExplainConfig
from tinyonn.files import write_text_atomic
from tinyonn.runlock import run_lock
from tinyonn.training.config import Phase1Config, Phase2Config, TrainConfig

STAGES = ("probe", "cluster", "assemble", "train", "evaluate", "explain", "release")
"""The stages `run_pipeline` chains, in order (train only when `RunConfig.train` is set)."""


def default_cluster_config() -> ClusterConfig:
    """The partition of `tinyonn run`: the one the extraction table ranks best with a router on the
    embedded default (`bench/results/extract_builtin.json`: co-activation k-means with the learned
    router and compensation, geometric mean of the worst-category ratio over 25/50/75% active)."""
    return ClusterConfig(method="coact-kmeans")


def small_train_config() -> TrainConfig:
    """The default training of `tinyonn run`: SMK (phase 1 → phase 2 at the run's unit budget) on a
    token budget a 2-core CPU trains in minutes; a GPU run raises `max_tokens`."""
    return TrainConfig(rule="smk", max_tokens=150_000, validation_per_category=0, checkpoint_every=50,
                       phase1=Phase1Config(steps=60), phase2=Phase2Config(routing="budget"), progress=True)


@dataclass(frozen=True)
class EvalConfig:
    """Which held-out examples the evaluation reads and how they are batched."""

    split: str = "validation"
    """The split of the builtin probe set (or of a probe-set directory) to evaluate on. For a
    single data file, every `holdout_every`-th example is held out of the probe instead."""
    stride: int = 25
    """Every `stride`-th example of the split (1: all of them)."""
    holdout_every: int = 10
    """For a single data file: examples i with i % holdout_every == holdout_every - 1 are held out."""
    max_length: int = 512
    batch_size: int = 16
    items: str = "builtin"
    """The multiple-choice evaluation set: "builtin", a JSONL path, or "none"."""
    measure: EvaluateConfig = field(default_factory=EvaluateConfig)
    """What `tinyonn.evaluate` measures (rows, sweep, items per category, speed benchmark); its
    `max_length` and `batch_size` are replaced by this config's."""

    def __post_init__(self):
        _check_positive(self, "stride", "holdout_every", "max_length", "batch_size")
        if self.holdout_every < 2:
            raise ValueError(f"EvalConfig.holdout_every must be ≥ 2, got {self.holdout_every}")


@dataclass(frozen=True)
class RunConfig:
    """Everything one run of the pipeline depends on (written into the run folder)."""

    run: str = "default"
    runs_dir: str = "stores/runs"
    teacher: str = "builtin"
    """"builtin", a local model directory or a hub id."""
    quant: Literal["none", "nf4", "int8"] = "none"
    data: str = "builtin"
    """Probe data: "builtin" (the embedded train split), a JSONL file or a directory of splits."""
    probe_samples: int = 600
    """Probe samples, spread evenly over the data (0: load the teacher and stop)."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    cluster: ClusterConfig = field(default_factory=default_cluster_config)
    """The partition (default: the extraction table's best, `default_cluster_config`)."""
    active_fraction: float = 0.5
    """Fraction of the teacher's FFN units active per token in the saved model (shared + routed)."""
    routing: Literal["oracle", "analytic", "learned"] = "learned"
    """How the saved model picks experts within that budget (`tinyonn.evaluation.extract.convert`;
    the default is the extraction table's best router):
    "analytic" (each expert scored by its representative unit, a load-balancing bias; no training),
    "learned" (that router warmed up on the teacher's per-token expert mass), or "oracle" (the
    experts of largest activation mass from the layer's dense activations: the best any router
    could do, not a sparse model)."""
    compensation: bool = True
    """Add each unselected expert's mean output (calibrated for the model's routing)."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    """The calibration tokens (from the probed examples) that the analytic router, its warm-up,
    compensation and the "cmoe" partition read."""
    train: TrainConfig | None = field(default_factory=small_train_config)
    """How the assembled model is trained (its phase 2 routes within `active_fraction`); None: the
    saved, evaluated model is the training-free one."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    """What the explain stage measures (held-out examples per category, projection) and the
    expert-label override file."""
    prompt: str = 'What does the word "harbour" mean?'
    """A chat prompt the teacher and the model answer in the evaluation report."""
    skip_bad: bool = False
    """Skip malformed data lines (counted, reported by `run_pipeline`) instead of stopping at the
    first (`--skip-bad`). The examples read are the same whenever both succeed, so it is no input of
    any stage's fingerprint."""

    def __post_init__(self):
        if not self.run or "/" in self.run or self.run in (".", ".."):
            raise ValueError(f"RunConfig.run must be a plain folder name, got {self.run!r}")
        if self.quant not in ("none", "nf4", "int8"):
            raise ValueError(f"RunConfig.quant must be none, nf4 or int8, got {self.quant!r}")
        if self.probe_samples < 0:
            raise ValueError(f"RunConfig.probe_samples must be ≥ 0, got {self.probe_samples}")
        if not 0 < self.active_fraction <= 1:
            raise ValueError(f"RunConfig.active_fraction must be in (0, 1], got {self.active_fraction}")
        if self.routing not in ("oracle", "analytic", "learned"):
            raise ValueError(f"RunConfig.routing must be oracle, analytic or learned, got {self.routing!r}")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """The inverse of `to_dict` (unknown fields are an error naming them)."""
        return _from_dict(cls, data, "RunConfig")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise TinyONNError(f"{path}: not a RunConfig JSON file ({err.msg}, line {err.lineno})") from None
        return cls.from_dict(data)


# ---------------------------------------------------------------- stage records


def fingerprint(value: object) -> str:
    """A short content hash of a JSON-able value (sorted keys, so dict order does not matter)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StaleOutputError(TinyONNError):
    """A stage's input was made from other inputs or settings than the run's now (e.g. `plan/` from an
    earlier probe): the message names the stale output and the command that remakes it."""


class MissingStageError(TinyONNError):
    """A stage's input is not in the run folder: the message names the command that makes it."""


@dataclass(frozen=True)
class StageRecord:
    """What a finished stage leaves in `stages/<stage>.json`."""

    stage: str
    fingerprint: str
    outputs: tuple[str, ...]
    """Paths relative to the run folder."""
    seconds: float
    inputs: dict
    produced: str | None = None
    """The identity of the stage's main output when it finished (`_output_fingerprint`: the store's
    fingerprint, a hash of plan.json, ...); None where there is none (and in older records)."""

    def complete(self, run_dir: Path) -> bool:
        return all((run_dir / output).exists() for output in self.outputs)

    def valid(self, run_dir: Path) -> bool:
        """Outputs all there and still the ones this stage produced (not replaced from outside)."""
        return self.complete(run_dir) and (self.produced is None
                                           or self.produced == _output_fingerprint(run_dir, self.stage))


def read_record(run_dir: Path, stage: str) -> StageRecord | None:
    path = run_dir / "stages" / f"{stage}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return StageRecord(stage=data["stage"], fingerprint=data["fingerprint"], outputs=tuple(data["outputs"]),
                       seconds=data["seconds"], inputs=data["inputs"], produced=data.get("produced"))


def _write_record(run_dir: Path, record: StageRecord) -> None:
    path = run_dir / "stages" / f"{record.stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(dataclasses.asdict(record), indent=1, default=str))


def _upstream(run_dir: Path, stage: str) -> str:
    """The fingerprint of a finished upstream stage: its record's, or, for outputs made outside the
    pipeline (e.g. `tinyonn probe --run R`), one read from the outputs themselves; else a clear
    error naming the command to run."""
    record = read_record(run_dir, stage)
    if record is not None and record.valid(run_dir):
        return record.fingerprint
    found = _output_fingerprint(run_dir, stage)
    if found is None:
        raise MissingStageError(f"run folder {run_dir} has no finished {stage} stage: run `tinyonn {stage} "
                           f"--run {run_dir.name} --runs {run_dir.parent}` (or `tinyonn run`) first")
    return found


def _output_fingerprint(run_dir: Path, stage: str) -> str | None:
    """The identity of a stage's main output as it is now (None: no such output, or an unfinished
    store)."""
    if stage == "probe" and (run_dir / "scores.zarr" / "zarr.json").is_file():
        from tinyonn.store import ScoreStore

        try:
            store = ScoreStore.open(run_dir / "scores.zarr")
        except Exception:  # a damaged store is no input
            return None
        return "store:" + str(store.attrs["fingerprint"]) if store.finalized else None
    files = {"cluster": run_dir / "plan" / "plan.json", "assemble": run_dir / "model" / "config.json",
             "evaluate": run_dir / "report" / "evaluate.json"}
    if stage in files and files[stage].is_file():
        return "file:" + hashlib.sha256(files[stage].read_bytes()).hexdigest()[:16]
    return None


def _stage_inputs(config: RunConfig, stage: str) -> dict:
    """The part of the config a stage depends on, plus its upstream stage's fingerprint."""
    run_dir = config.run_dir
    if stage == "probe":
        return {"teacher": config.teacher, "quant": config.quant, "data": config.data,
                "probe_samples": config.probe_samples, "probe": dataclasses.asdict(config.probe),
                "holdout_every": config.eval.holdout_every}
    if stage == "cluster":
        inputs = {"probe": _upstream(run_dir, "probe"), "cluster": dataclasses.asdict(config.cluster)}
        if config.cluster.method == "cmoe":
            inputs["calibration"] = dataclasses.asdict(config.calibration)
        return inputs
    if stage == "assemble":
        return {"cluster": _upstream(run_dir, "cluster"), "teacher": config.teacher, "quant": config.quant,
                "active_fraction": config.active_fraction, "routing": config.routing,
                "compensation": config.compensation, "calibration": dataclasses.asdict(config.calibration)}
    if stage == "train":
        return {"assemble": _upstream(run_dir, "assemble"), "teacher": config.teacher, "quant": config.quant,
                "data": config.data, "active_fraction": config.active_fraction,
                "train": _trained_part(config.train), "holdout_every": config.eval.holdout_every}
    if stage == "evaluate":
        upstream = "train" if config.train is not None else "assemble"
        return {upstream: _upstream(run_dir, upstream), "teacher": config.teacher, "quant": config.quant,
                "data": config.data, "eval": dataclasses.asdict(config.eval), "prompt": config.prompt}
    if stage == "explain":
        labels = config.explain.labels or run_dir / "labels.json"
        return {"evaluate": _upstream(run_dir, "evaluate"), "explain": dataclasses.asdict(config.explain),
                "labels": hashlib.sha256(Path(labels).read_bytes()).hexdigest()[:16] if Path(labels).is_file() else None}
    if stage == "release":
        return {"evaluate": _upstream(run_dir, "evaluate"), "teacher": config.teacher}
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


def _trained_part(train: TrainConfig | None) -> dict | None:
    """The training config minus what cannot change the trained weights (progress bar, checkpoint
    cadence)."""
    if train is None:
        return None
    values = train.to_dict()
    for name in ("progress", "checkpoint_every", "keep_checkpoints", "device", "log_every"):
        values.pop(name, None)
    return values


def stage_is_current(config: RunConfig, stage: str) -> bool:
    """Whether `stage` has finished with exactly these inputs and its outputs are all there."""
    try:
        inputs = _stage_inputs(config, stage)
    except TinyONNError:
        return False
    record = read_record(config.run_dir, stage)
    return record is not None and record.fingerprint == fingerprint(inputs) and record.valid(config.run_dir)


OUTPUT_NAMES = {"probe": "scores.zarr", "cluster": "plan/", "assemble": "model/", "train": "train/",
                "evaluate": "report/evaluate.json", "explain": "report/explain.json", "release": "release/"}
"""What each stage's output is called in messages."""


def upstream_stage(config: RunConfig, stage: str) -> str | None:
    """The stage whose output `stage` reads (None for the probe)."""
    if stage == "evaluate":
        return "train" if config.train is not None else "assemble"
    return {"cluster": "probe", "assemble": "cluster", "train": "assemble", "explain": "evaluate",
            "release": "evaluate"}.get(stage)


def check_upstream(config: RunConfig, stage: str) -> None:
    """Raise `StaleOutputError` unless every stage upstream of `stage` is current for `config`: its
    record's inputs — the identity of the output it read, and its settings — equal what they would be
    now. An output with no record to compare (made outside the pipeline, like a `tinyonn probe` store,
    or its record lost) is taken as it is and ends the check, as does an output whose own input is gone;
    but a plan that records another store's fingerprint is stale all the same."""
    run_dir = config.run_dir
    command = f"--run {run_dir.name} --runs {run_dir.parent}"
    below = stage
    link = upstream_stage(config, stage)
    while link is not None:
        record = read_record(run_dir, link)
        if record is None or not record.valid(run_dir):
            _upstream(run_dir, link)  # there (made outside the pipeline), or a clear error
            if link == "cluster":
                _check_plan_source(run_dir, command)
            return
        try:
            now = _normalised(_stage_inputs(config, link))
        except MissingStageError:
            return  # what it was made from is gone (e.g. plan/ deleted after assembling): nothing to compare
        changed = [key for key in sorted(set(record.inputs) | set(now)) if record.inputs.get(key) != now.get(key)]
        source = upstream_stage(config, link)
        if source in changed:
            raise StaleOutputError(
                f"{run_dir}/{OUTPUT_NAMES[link]} is stale: it was made from another {OUTPUT_NAMES[source]} than "
                f"the one there now (rerun with `tinyonn {link} {command}` and the stages after it, or "
                f"`tinyonn run {command}`), so {below} will not use it")
        if changed:
            detail = "; ".join(_differences(record.inputs, now))
            raise StaleOutputError(
                f"{run_dir}/{OUTPUT_NAMES[link]} was made with other settings than this run's ({detail}): "
                f"rerun `tinyonn {link} {command}` with them (and the stages after it), or `tinyonn run "
                f"{command}`; {below} will not use it")
        below, link = link, upstream_stage(config, link)


def _check_plan_source(run_dir: Path, command: str) -> None:
    """A plan records the fingerprint of the store it was clustered from: it must be the store's now."""
    try:
        made_from = json.loads((run_dir / "plan" / "plan.json").read_text())["info"].get("store_fingerprint")
    except (OSError, ValueError, KeyError, AttributeError):
        return
    store = _output_fingerprint(run_dir, "probe")
    if made_from is not None and store is not None and store != f"store:{made_from}":
        raise StaleOutputError(f"{run_dir / 'plan'} is stale: it was clustered from a score store with fingerprint "
                               f"{made_from[:16]}..., scores.zarr now has {store[6:22]}...; rerun `tinyonn cluster "
                               f"{command}` (and the stages after it)")


def _normalised(value):
    """`value` as a stage record holds it (through JSON: tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _differences(old, new, prefix: str = "", limit: int = 4) -> list[str]:
    """"key.sub: old → new" for each leaf where two JSON values differ (at most `limit`)."""
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        for key in sorted(set(old) | set(new)):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.", limit - len(found))
            if len(found) >= limit:
                break
        return found
    if old == new:
        return []
    return [f"{prefix.rstrip('.')}: {_short(old)} → {_short(new)}"]


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


DISTRIBUTED_STAGES = ("probe", "train")
"""The stages that spread over the ranks of a torchrun launch (the others run in one process)."""


def _one_process(what: str) -> None:
    """Refuse to run `what` in every rank of a torchrun launch (each would write the same outputs)."""
    from tinyonn import distributed

    if distributed.launched():
        raise TinyONNError(f"{what} runs in one process: start it without torchrun (under torchrun only "
                           f"`tinyonn {' and `tinyonn '.join(s + '`' for s in DISTRIBUTED_STAGES)} spread over the ranks)")


def _run_stage(config: RunConfig, stage: str, body: Callable[[RunConfig], list[Path]], log=print) -> Path:
    if stage not in DISTRIBUTED_STAGES:
        _one_process(f"the {stage} stage")
    run_dir = config.run_dir
    inputs = _stage_inputs(config, stage)
    check_upstream(config, stage)  # before anything is written
    (run_dir / "stages" / f"{stage}.json").unlink(missing_ok=True)  # stale from here on
    started = time.time()
    outputs = body(config)
    record = StageRecord(stage=stage, fingerprint=fingerprint(inputs), seconds=round(time.time() - started, 2),
                         outputs=tuple(str(path.relative_to(run_dir)) for path in outputs), inputs=inputs,
                         produced=_output_fingerprint(run_dir, stage))
    _write_record(run_dir, record)
    log(f"[{stage}] done in {record.seconds:.1f} s")
    return outputs[0]


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a freshly written folder into place (the old one goes only once the new one is whole)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


# ---------------------------------------------------------------- shared inputs


@functools.lru_cache(maxsize=2)
def _teacher(source: str, quant: str):
    from tinyonn.teacher import load_teacher

    return load_teacher(source, quant=quant)


_CALIBRATION: dict[str, object] = {}


def _calibration(config: RunConfig):
    """The teacher's MLP inputs on calibration tokens from the probed examples (kept in memory for
    the next stage of the same process)."""
    from tinyonn.clustering import Calibration

    key = fingerprint([config.teacher, config.quant, config.data, config.probe_samples, config.eval.holdout_every,
                       dataclasses.asdict(config.calibration)])
    if key not in _CALIBRATION:
        teacher, tokenizer = _teacher(config.teacher, config.quant)
        examples, _ = _examples(config)
        _CALIBRATION.clear()
        _CALIBRATION[key] = Calibration.collect(teacher, tokenizer, examples, config.calibration)
    return _CALIBRATION[key]


def _split(config: RunConfig) -> tuple[list, list]:
    """(train, held-out) examples of the run's data (`tinyonn.data.split_probe_set`: for one file,
    every `eval.holdout_every`-th example is held out, never probed nor trained on)."""
    from tinyonn.data import split_probe_set

    return split_probe_set(config.data, config.eval.split, config.eval.holdout_every,
                           (lambda error: None) if config.skip_bad else None)


def check_data(config: RunConfig) -> list:
    """Read the run's data before anything is written: a malformed line, a truncated file or a
    missing held-out split raises; with `skip_bad` the bad lines are returned instead."""
    from tinyonn.data import split_probe_set

    skipped: list = []
    split_probe_set(config.data, config.eval.split, config.eval.holdout_every,
                    skipped.append if config.skip_bad else None)
    return skipped


def _examples(config: RunConfig) -> tuple[list, list]:
    """(probe examples, held-out evaluation examples) of the run's data: `probe_samples` spread over
    the train part (`tinyonn.data.spread`, as `tinyonn probe --max-samples` takes them)."""
    from tinyonn.data import spread

    train, held_out = _split(config)
    return spread(train, config.probe_samples), held_out[:: config.eval.stride]


# ---------------------------------------------------------------- stages


def _holding_run_folder(function: Callable[..., typing.Any]) -> Callable[..., typing.Any]:
    """Run `function(config, ...)` holding the lock of `config.run_dir` (`tinyonn.runlock.run_lock`:
    another process writing the run gets `RunInUseError` at once; nested calls share the hold)."""

    @functools.wraps(function)
    def locked(config: RunConfig, *args, **kwargs):
        with run_lock(config.run_dir):
            return function(config, *args, **kwargs)

    return locked


@_holding_run_folder
def probe_stage(config: RunConfig, log=print) -> Path:
    """Probe the teacher on `probe_samples` examples spread over the data → `scores.zarr`."""
    from tinyonn.probe import probe

    replacing = read_record(config.run_dir, "probe") is not None

    def body(config: RunConfig) -> list[Path]:
        model, tokenizer = _teacher(config.teacher, config.quant)
        examples, _ = _examples(config)
        if not examples:
            raise TinyONNError("probe_samples is 0: nothing to probe")
        log(f"[probe] {len(examples)} samples spread over the probe set")
        store = probe(model, examples, config.probe, config.run_dir / "scores.zarr", tokenizer=tokenizer,
                      overwrite=replacing)  # a store this pipeline finished for other inputs
        store.summary()
        return [config.run_dir / "scores.zarr"]

    return _run_stage(config, "probe", body, log)


@_holding_run_folder
def cluster_stage(config: RunConfig, log=print) -> Path:
    """Concept cells and per-layer experts from the run's score store → `plan/` (+ `cells.png`)."""
    from tinyonn.clustering import cluster
    from tinyonn.clustering.plot import plot_cells
    from tinyonn.store import ScoreStore

    def body(config: RunConfig) -> list[Path]:
        log(f"[cluster] {config.cluster.method}")
        store = ScoreStore.open(config.run_dir / "scores.zarr")
        plan = cluster(store, config.cluster, _calibration(config) if config.cluster.method == "cmoe" else None)
        tmp = config.run_dir / "plan.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        plan.save(tmp)
        plot_cells(plan, store, tmp / "cells.png")
        _replace_dir(tmp, config.run_dir / "plan")
        log(json.dumps(plan.summary()))
        return [config.run_dir / "plan"]

    return _run_stage(config, "cluster", body, log)


@_holding_run_folder
def assemble_stage(config: RunConfig, log=print) -> Path:
    """The training-free TinyONN model of the plan (`tinyonn.evaluation.extract.convert`): analytic
    router from calibration tokens (warmed up for "learned"), routed within `active_fraction` as
    `routing` says, with output compensation if `compensation` → `model/` (+ `conversion.json`).
    The saved routing state is the one the evaluate stage measures."""
    from tinyonn.clustering import ExpertPlan
    from tinyonn.evaluation.extract import convert

    def body(config: RunConfig) -> list[Path]:
        log(f"[assemble] TinyONN model, {config.active_fraction:.0%} of FFN units per token ({routing_label(config)})")
        teacher, tokenizer = _teacher(config.teacher, config.quant)
        model, info = convert(teacher, ExpertPlan.load(config.run_dir / "plan"), _calibration(config),
                              config.active_fraction, config.routing, config.compensation)
        tmp = config.run_dir / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "conversion.json").write_text(json.dumps(info, indent=1))
        _replace_dir(tmp, config.run_dir / "model")
        return [config.run_dir / "model"]

    return _run_stage(config, "assemble", body, log)


def routing_label(config: RunConfig) -> str:
    """How the training-free model routes, in words ("learned routing + compensation")."""
    return f"{config.routing} routing" + (" + compensation" if config.compensation else "")


@_holding_run_folder
def train_stage(config: RunConfig, log=print, resume: bool = True) -> Path:
    """Train the assembled model (`model/`) with KD from the teacher, phase 2 routing within
    `active_fraction` → `train/` (`model/`, `log.jsonl`, `summary.json`, `checkpoints/`). An
    interrupted run resumes from its last checkpoint when its inputs are the same."""
    from tinyonn.training import train
    from tinyonn.weights import load_model

    if config.train is None:
        raise TinyONNError("this run's config has no training (RunConfig.train is None)")
    training = dataclasses.replace(config.train, phase2=dataclasses.replace(
        config.train.phase2, active_fraction=config.active_fraction))
    previous = read_record(config.run_dir, "train")

    def body(config: RunConfig) -> list[Path]:
        teacher, tokenizer = _teacher(config.teacher, config.quant)
        model = load_model(config.run_dir / "model")
        examples = _training_examples(config)
        out = config.run_dir / "train"
        same_inputs = previous is None or previous.fingerprint == fingerprint(_stage_inputs(config, "train"))
        if not same_inputs:  # another config trained here before: start afresh
            shutil.rmtree(out, ignore_errors=True)
        budget = " or ".join(f"{limit:,} {unit}" for limit, unit in ((training.max_tokens, "tokens"),
                                                                      (training.max_steps, "steps"))
                             if limit is not None) or "one epoch"
        log(f"[train] {training.rule} on up to {budget} of {len(examples):,} examples")
        summary = train(model, teacher, tokenizer, examples, training, out, resume=resume and same_inputs)
        log(f"[train] {summary['tokens']:,} tokens, {summary['steps']} steps, {summary['tok_per_s']:,.0f} tok/s")
        return [out / "model", out / "summary.json"]

    return _run_stage(config, "train", body, log)


def _training_examples(config: RunConfig) -> list:
    """The examples training reads: the data's train split (never the held-out ones)."""
    return _split(config)[0]


@_holding_run_folder
def evaluate_stage(config: RunConfig, log=print) -> Path:
    """The saved model (reloaded from `train/model/`, or from `model/` without training) against the
    teacher with `tinyonn.evaluate` (held-out perplexity and evaluation accuracy per category, the
    teacher in nf4, the sparsity–quality sweep, cost per token, speed and memory), plus both answers
    to the prompt → `report/evaluate.json`, `report/sparsity_quality.png`."""
    from tinyonn.data import load_eval_set
    from tinyonn.evaluation.evaluate import PLOT_NAME, evaluate
    from tinyonn.evaluation.metrics import sample_answers
    from tinyonn.weights import load_model

    def body(config: RunConfig) -> list[Path]:
        teacher, tokenizer = _teacher(config.teacher, config.quant)
        model_dir = config.run_dir / ("train/model" if config.train is not None else "model")
        _, held_out = _examples(config)
        items = [] if config.eval.items == "none" else load_eval_set(config.eval.items)
        measure = dataclasses.replace(config.eval.measure, max_length=config.eval.max_length,
                                      batch_size=config.eval.batch_size)
        routing = f"router, after {config.train.rule.upper()} training" if config.train else routing_label(config)
        model = load_model(model_dir).eval()
        extra = {
            "model_dir": str(model_dir.relative_to(config.run_dir)), "active_fraction": config.active_fraction,
            "routing": routing, "prompt": config.prompt,
            "teacher_answer": sample_answers(teacher, tokenizer, [config.prompt], max_new_tokens=32)[0],
            "model_answer": sample_answers(model, tokenizer, [config.prompt], max_new_tokens=32)[0],
        }
        del model
        report_dir = config.run_dir / "report"
        evaluate(model_dir, config.teacher, held_out, items, measure, out_dir=report_dir, tokenizer=tokenizer,
                 extra=extra, log=log)
        return [report_dir / "evaluate.json", report_dir / PLOT_NAME]

    return _run_stage(config, "evaluate", body, log)


@_holding_run_folder
def explain_stage(config: RunConfig, log=print) -> Path:
    """What the saved model's experts do on the held-out examples (`tinyonn.explain`) →
    `report/explain.json` and its PNGs, then the offline `report/index.html` of the whole run."""
    from tinyonn.explain import explain, write_report

    def body(config: RunConfig) -> list[Path]:
        _, held_out = _examples(config)
        model_dir = config.run_dir / ("train/model" if config.train is not None else "model")  # what evaluate measured
        explain(config.run_dir, config.explain, examples=held_out, model_dir=model_dir, log=log)
        report = config.run_dir / "report"
        return [report / "explain.json", write_report(config.run_dir), report / "explain"]

    path = _run_stage(config, "explain", body, log)
    write_report(config.run_dir)  # again, now that the stage times include this one
    return path


@_holding_run_folder
def release_stage(config: RunConfig, log=print) -> Path:
    """The evaluated model as a folder to publish (`tinyonn.release`: safetensors and a `.pth` in
    the teacher's dtype, config, tokenizer, provenance from the plan, a model card with the
    evaluation table) → `release/`."""
    from tinyonn.release import release

    def body(config: RunConfig) -> list[Path]:
        model_dir = config.run_dir / ("train/model" if config.train is not None else "model")  # what evaluate measured
        out = release(model_dir, config.run_dir / "release", config.run_dir / "plan", config.teacher,
                      report=config.run_dir / "report" / "evaluate.json")
        log(f"[release] {out}")
        return [out]

    return _run_stage(config, "release", body, log)


STAGE_FUNCTIONS: dict[str, Callable[..., Path]] = {
    "probe": probe_stage, "cluster": cluster_stage, "assemble": assemble_stage, "train": train_stage,
    "evaluate": evaluate_stage, "explain": explain_stage, "release": release_stage}


@_holding_run_folder
def run_pipeline(config: RunConfig, log=print) -> dict:
    """Run every stage whose outputs are missing or stale, skip the rest; returns what each did
    (`{"stages": {stage: "ran" | "skipped"}, "evaluate": report}`). `run_config.json` is written once
    the probe stage has passed (a probe that refuses the store there leaves the run as it was)."""
    from tinyonn.teacher import describe

    _one_process("tinyonn run (the whole pipeline)")
    run_dir = config.run_dir
    skipped = check_data(config)  # the data and the teacher are checked before anything is written
    if skipped:
        log(f"[data] skipped {len(skipped)} bad line(s) (skip_bad); the first: {skipped[0]}")
    teacher, _ = _teacher(config.teacher, config.quant)
    summary = describe(teacher)
    log(f"teacher {config.teacher}: {summary['model_type']}, {summary['num_layers']} layers, "
        f"{summary['ffn_units']:,} FFN units, {summary['parameters']:,} parameters")
    done: dict[str, str] = {}
    stages = [s for s in STAGES if s != "train" or config.train is not None] if config.probe_samples else []
    for stage in stages:
        if stage_is_current(config, stage):
            done[stage] = "skipped"
            log(f"[{stage}] up to date: skipped")
        else:
            STAGE_FUNCTIONS[stage](config, log)
            done[stage] = "ran"
        if stage == "probe":  # the store there is this config's now: record the config
            _write_run_config(config)
    if not stages:
        _write_run_config(config)
    result: dict = {"stages": done, "run_dir": str(run_dir), "skipped_lines": skipped}
    if "evaluate" in done:
        result["evaluate"] = json.loads((run_dir / "report" / "evaluate.json").read_text())
    return result


def _write_run_config(config: RunConfig) -> None:
    config.run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config.run_dir / "run_config.json", json.dumps(config.to_dict(), indent=1))


# ---------------------------------------------------------------- config plumbing


def _check_positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


def _from_dict(cls, data: dict, where: str):
    """Build a (nested) frozen dataclass from its `asdict` form; unknown keys are an error."""
    if not isinstance(data, dict):
        raise TinyONNError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TinyONNError(f"{where}: unknown field(s) {', '.join(unknown)}")
    values = {}
    for name, value in data.items():
        kind = hints[name]
        target = next((t for t in (kind, *typing.get_args(kind)) if dataclasses.is_dataclass(t)), None)
        if target is not None and isinstance(value, dict):
            value = _from_dict(target, value, f"{where}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise TinyONNError(f"{where}: {err}") from None


def stage_times(run_dir: Path) -> dict[str, float]:
    """Seconds each finished stage of a run took (from its records)."""
    times: dict[str, float] = defaultdict(float)
    for stage in STAGES:
        record = read_record(Path(run_dir), stage)
        if record is not None:
            times[stage] = record.seconds
    return dict(times)
