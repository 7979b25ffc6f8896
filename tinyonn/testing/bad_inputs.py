"""The catalogue of bad inputs: one entry per kind, each run through `tinyonn.cli.main` in-process.

Every entry builds its bad input (a data file, a teacher folder, a config, a run folder, an
injected fault) in a fresh folder, runs one `tinyonn` command on it and states what must happen:
the exit code (2 bad input, 1 a failure of the run, 130 Ctrl-C) and a regex the one
`tinyonn: error: ...` line on stderr must match. `run_entry` checks that, that no traceback is
printed, and that nothing written before the command (a finished score store, a file in the run
folder, the inputs) changed or went missing. An entry with `skip_bad` set is a bad data line:
run again with `--skip-bad`, the command succeeds and reports that many skipped lines.

    fixtures = make_fixtures(tmp / "fixtures")       # a tiny teacher, a probe file, a probed run
    for entry in CATALOGUE:
        outcome = run_entry(entry, tmp / entry.name, fixtures)
        assert outcome.ok, outcome.problems

Argument templates: {tmp} is the entry's folder, {runs} its runs folder (`--runs`), the run is
`r` ({run}), {teacher} a valid tiny teacher folder and {data} a valid probe file.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager
from unittest import mock

RUN = "r"
KEPT = "kept.txt"
"""A file written into the run folder before every command: it must survive it unchanged."""


@dataclass(frozen=True)
class Fixtures:
    """Valid inputs the entries start from (`make_fixtures`)."""

    teacher: Path
    """A tiny random Qwen3 with the builtin tokenizer (loads in a fraction of a second)."""
    data: Path
    """A valid probe JSONL file (16 examples, two categories)."""
    probed_run: Path
    """A run folder holding a finished probe of `teacher` on `data` (`scores.zarr`)."""


def _nothing(tmp: Path, fixtures: Fixtures) -> None:
    return None


@dataclass(frozen=True)
class BadInput:
    """One kind of bad input and what the command must do with it."""

    name: str
    area: str
    """data | teacher | config | flags | paths | checkpoints | environment"""
    argv: tuple[str, ...]
    """The command's arguments (templates: see the module docstring)."""
    exit_code: int
    message: str
    """A regex the one `tinyonn: error:` line must match (`re.search`)."""
    build: Callable[[Path, Fixtures], None] = _nothing
    """Writes the bad input under the entry's folder."""
    skip_bad: int | None = None
    """For a bad data line: with `--skip-bad` the command succeeds and reports this many skipped."""
    needs_probe: bool = False
    """Start from a copy of `Fixtures.probed_run` (a finished store that must survive)."""
    inject: Callable[[Path], ContextManager] | None = None
    """A fault injected while the command runs (disk full, read-only, Ctrl-C)."""
    check: Callable[[Path], str | None] | None = None
    """A further post-condition: a problem in words, or None."""


@dataclass(frozen=True)
class Outcome:
    """What running one entry gave; `ok` when nothing is wrong."""

    name: str
    area: str
    argv: tuple[str, ...]
    exit_code: int
    error_lines: tuple[str, ...]
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------- fixtures

_ROWS = [
    ("What is 2 + 3?", "2 + 3 = 5.", "math"),
    ("Define harbour.", "A sheltered port where ships can stay.", "definition"),
    ("What is 7 times 6?", "7 times 6 is 42.", "math"),
    ("Define meadow.", "A field of grass and flowers.", "definition"),
]


def _rows(count: int) -> list[dict]:
    return [{"prompt": p, "response": r, "category": c} for p, r, c in (_ROWS * (count // len(_ROWS) + 1))[:count]]


def _jsonl(rows: list) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def make_tiny_teacher(directory: Path) -> Path:
    """A random 2-layer Qwen3 (hidden 32, 64 FFN units per layer) with the builtin tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from tinyonn.assets import builtin_teacher_dir

    tokenizer = AutoTokenizer.from_pretrained(builtin_teacher_dir())
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_fixtures(root: Path) -> Fixtures:
    """Build the tiny teacher, the probe file and a probed run under `root` (a few seconds)."""
    from tinyonn.config import DataConfig, ProbeConfig
    from tinyonn.probe import probe

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    teacher = make_tiny_teacher(root / "teacher")
    data = root / "probe.jsonl"
    data.write_text(_jsonl(_rows(16)))
    run = root / "probed" / RUN
    config = ProbeConfig(data=DataConfig(max_length=64, batch_size=8), chunk_samples=8, device="cpu")
    with contextlib.redirect_stdout(io.StringIO()):
        probe(str(teacher), str(data), config, run / "scores.zarr", progress=False, log=lambda *_: None)
    return Fixtures(teacher=teacher, data=data, probed_run=run)


# ---------------------------------------------------------------- builders

def _write(relative: str, content: str | bytes) -> Callable[[Path, Fixtures], None]:
    def build(tmp: Path, fixtures: Fixtures) -> None:
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)

    return build


def _bad_line(relative: str, line: bytes | str) -> Callable[[Path, Fixtures], None]:
    """A probe file whose line 2 is `line` between three good ones."""
    raw = line.encode() if isinstance(line, str) else line
    good = [json.dumps(row).encode() for row in _rows(3)]
    return _write(relative, b"\n".join([good[0], raw, *good[1:]]) + b"\n")


def _gzip_truncated(tmp: Path, fixtures: Fixtures) -> None:
    data = gzip.compress(_jsonl(_rows(400)).encode())
    (tmp / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])


def _zstd_block_cut(tmp: Path, fixtures: Fixtures) -> None:
    """One zstd frame cut right after a complete block: the first half of the rows decompresses
    cleanly (zstandard's stream reader would hand them over without a word)."""
    import zstandard

    text = _jsonl(_rows(400)).encode()
    half = text.index(b"\n", len(text) // 2) + 1
    writer = zstandard.ZstdCompressor().compressobj()
    first = writer.compress(text[:half]) + writer.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    (tmp / "cut.jsonl.zst").write_bytes(first)


def _zstd_mid_block(tmp: Path, fixtures: Fixtures) -> None:
    import zstandard

    data = zstandard.ZstdCompressor().compress(_jsonl(_rows(400)).encode())
    (tmp / "cut.jsonl.zst").write_bytes(data[: len(data) * 2 // 3])


def _splits(*names: str) -> Callable[[Path, Fixtures], None]:
    def build(tmp: Path, fixtures: Fixtures) -> None:
        folder = tmp / "splits"
        folder.mkdir()
        for name in names:
            (folder / f"{name}.jsonl").write_text(_jsonl(_rows(8)))

    return build


def _teacher(change: Callable[[Path], None]) -> Callable[[Path, Fixtures], None]:
    """A copy of the tiny teacher at {tmp}/teacher, then `change` applied to it."""
    def build(tmp: Path, fixtures: Fixtures) -> None:
        shutil.copytree(fixtures.teacher, tmp / "teacher")
        change(tmp / "teacher")

    return build


def _remove(*names: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        for name in names:
            (folder / name).unlink()

    return change


def _edit_config(**values) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(values)
        (folder / "config.json").write_text(json.dumps(config))

    return change


def _truncate(name: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        path = folder / name
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size // 2)

    return change


def _edit_tensors(edit: Callable[[dict], dict]) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / "model.safetensors"))
        save_file(edit(tensors), str(folder / "model.safetensors"), metadata={"format": "pt"})

    return change


def _wrong_shape(tensors: dict) -> dict:
    import torch

    return {**tensors, "model.layers.0.mlp.gate_proj.weight": torch.zeros(10, 32)}


def _shard_index(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    from safetensors import safe_open

    with safe_open(str(folder / "model-00001-of-00002.safetensors"), "pt") as handle:
        names = list(handle.keys())
    weight_map = {name: "model-00001-of-00002.safetensors" for name in names}
    weight_map[names[-1]] = "model-00002-of-00002.safetensors"  # a shard that is not there
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


class _RunsCode:
    """A pickle that would create a file when unpickled by anything but a weights-only loader."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _pickled_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"model.embed_tokens.weight": _RunsCode(str(folder.parent / "PICKLE_RAN"))}, handle)


def _pickle_did_not_run(tmp: Path) -> str | None:
    return "the pickle's code ran" if (tmp / "PICKLE_RAN").exists() else None


def _run_config(**values) -> Callable[[Path, Fixtures], None]:
    """{tmp}/config.json: a RunConfig on the tiny teacher and probe file, with `values` on top."""
    def build(tmp: Path, fixtures: Fixtures) -> None:
        config = {"teacher": str(fixtures.teacher), "data": str(fixtures.data), **values}
        (tmp / "config.json").write_text(json.dumps(config, indent=1))

    return build


def _saved_model(change: Callable[[Path], None]) -> Callable[[Path, Fixtures], None]:
    """On the probed run (`needs_probe`): a plan and the run's `model/` (the saved model the train
    stage loads) from the tiny teacher, then `change`; plus the {tmp}/config.json the stage runs with."""
    def build(tmp: Path, fixtures: Fixtures) -> None:
        run = tmp / "runs" / RUN
        (run / "plan").mkdir()
        (run / "plan" / "plan.json").write_text(json.dumps({"method": "fixture", "info": {}}))
        model = run / "model"
        shutil.copytree(fixtures.teacher, model)
        change(model)
        _run_config(probe_samples=8, train={"rule": "full"})(tmp, fixtures)  # a plain model trains with "full"

    return build


def _checkpoint(change: Callable[[Path], None]) -> Callable[[Path, Fixtures], None]:
    """A run whose training stopped after a checkpoint (`train/checkpoints/step-*`), then `change`
    applied to that checkpoint: `tinyonn train` resumes from it."""
    def build(tmp: Path, fixtures: Fixtures) -> None:
        import torch

        from tinyonn.training.checkpoint import save_checkpoint

        _saved_model(lambda folder: None)(tmp, fixtures)
        folder = save_checkpoint(tmp / "runs" / RUN / "train" / "checkpoints", 3,
                                 {"w": torch.zeros(2)}, {"m": torch.zeros(2)}, {"phase": 1})
        change(folder)

    return build


def _raise_in(target: str, error: BaseException) -> Callable[[Path], ContextManager]:
    """Patch `target` (module.attribute) to raise `error` when called."""
    def inject(tmp: Path) -> ContextManager:
        return mock.patch(target, side_effect=error)

    return inject


def _disk_error(target: str, code: int, where: str) -> Callable[[Path], ContextManager]:
    def inject(tmp: Path) -> ContextManager:
        return mock.patch(target, side_effect=OSError(code, os.strerror(code), str(tmp / where)))

    return inject


# ---------------------------------------------------------------- the catalogue

PROBE = ("probe", "--teacher", "{teacher}", "--runs", "{runs}", "--run", RUN, "--device", "cpu")
"""A probe of the tiny teacher into the entry's run folder (add `--data ...`)."""


def _probe_data(name: str) -> tuple[str, ...]:
    return (*PROBE, "--data", "{tmp}/" + name)


def _probe_teacher() -> tuple[str, ...]:
    return ("probe", "--teacher", "{tmp}/teacher", "--data", "{data}", "--runs", "{runs}", "--run", RUN,
            "--device", "cpu")


def _flag(*argv: str) -> tuple[str, ...]:
    return (*argv, "--runs", "{runs}", "--run", RUN)


STAGE = ("--runs", "{runs}", "--run", RUN, "--config", "{tmp}/config.json")

CATALOGUE: tuple[BadInput, ...] = (
    # ---- data files
    BadInput("data-file-missing", "data", _probe_data("missing.jsonl"), 2, r"data file not found: .*missing\.jsonl"),
    BadInput("data-folder-without-splits", "data", _probe_data("folder"), 2,
             r"no probe splits \(\*\.jsonl.*\) found in .*folder", build=_write("folder/notes.txt", "not data\n")),
    BadInput("data-folder-missing-split", "data",
             ("run", "--teacher", "{teacher}", "--data", "{tmp}/splits", "--runs", "{runs}", "--run", RUN), 2,
             r"unknown split 'validation' in .*splits; available splits: train", build=_splits("train")),
    BadInput("data-empty-file", "data", _probe_data("empty.jsonl"), 2,
             r"empty\.jsonl: no examples \(the file is empty", build=_write("empty.jsonl", "")),
    BadInput("data-binary-file", "data", _probe_data("binary.jsonl"), 2,
             r"binary\.jsonl:1: (invalid UTF-8|malformed JSON)",
             build=_write("binary.jsonl", bytes(range(128, 256)) * 4)),
    BadInput("data-malformed-json", "data", _probe_data("bad.jsonl"), 2,
             r"bad\.jsonl:2: malformed JSON", build=_bad_line("bad.jsonl", '{"prompt": "x", '), skip_bad=1),
    BadInput("data-invalid-utf8", "data", _probe_data("latin.jsonl"), 2, r"latin\.jsonl:2: invalid UTF-8",
             build=_bad_line("latin.jsonl", '{"prompt": "caf\xe9", "response": "ok"}'.encode("latin-1")),
             skip_bad=1),
    BadInput("data-missing-field", "data", _probe_data("bad.jsonl"), 2, r"bad\.jsonl:2: missing field 'response'",
             build=_bad_line("bad.jsonl", '{"prompt": "x"}'), skip_bad=1),
    BadInput("data-wrong-type", "data", _probe_data("bad.jsonl"), 2,
             r"bad\.jsonl:2: field 'response' must be a string, found number",
             build=_bad_line("bad.jsonl", '{"prompt": "x", "response": 5}'), skip_bad=1),
    BadInput("data-not-an-object", "data", _probe_data("bad.jsonl"), 2,
             r"bad\.jsonl:2: expected a JSON object, found array", build=_bad_line("bad.jsonl", "[1, 2]"), skip_bad=1),
    BadInput("data-last-message-not-assistant", "data", _probe_data("bad.jsonl"), 2,
             r"bad\.jsonl:2: the last message must be from the assistant",
             build=_bad_line("bad.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]})),
             skip_bad=1),
    BadInput("data-unknown-role", "data", _probe_data("bad.jsonl"), 2, r"bad\.jsonl:2: field 'messages\[0\]\.role'",
             build=_bad_line("bad.jsonl", json.dumps({"messages": [{"role": "robot", "content": "x"},
                                                                   {"role": "assistant", "content": "y"}]})),
             skip_bad=1),
    BadInput("data-gzip-truncated", "data", _probe_data("cut.jsonl.gz"), 2,
             r"cut\.jsonl\.gz:\d+: truncated: the file ends inside a gzip stream", build=_gzip_truncated),
    BadInput("data-zstd-cut-at-block", "data", _probe_data("cut.jsonl.zst"), 2,
             r"cut\.jsonl\.zst:\d+: truncated: the file ends inside a zstd frame", build=_zstd_block_cut),
    BadInput("data-zstd-cut-mid-block", "data", _probe_data("cut.jsonl.zst"), 2,
             r"cut\.jsonl\.zst:\d+: truncated: the file ends inside a zstd frame", build=_zstd_mid_block),
    BadInput("data-zstd-corrupt", "data", _probe_data("bad.jsonl.zst"), 2, r"bad\.jsonl\.zst:1: cannot decompress",
             build=_write("bad.jsonl.zst", b"not zstandard data at all" * 8)),
    BadInput("data-gzip-corrupt", "data", _probe_data("bad.jsonl.gz"), 2, r"bad\.jsonl\.gz:1: cannot decompress",
             build=_write("bad.jsonl.gz", b"\x1f\x8b" + b"x" * 64)),
    BadInput("data-no-sample-after-encoding", "data", _probe_data("empty_responses.jsonl"), 2,
             r"no probe sample left after encoding .*: all 2 examples skipped \(2 with an empty response",
             build=_write("empty_responses.jsonl", _jsonl([{"prompt": "a", "response": ""},
                                                          {"prompt": "b", "response": "  "}]))),
    # ---- teacher folders
    BadInput("teacher-folder-missing", "teacher", _probe_teacher(), 2, r"teacher directory not found: .*teacher"),
    BadInput("teacher-is-a-file", "teacher", _probe_teacher(), 2, r"teacher source is a file",
             build=_write("teacher", "not a model\n")),
    BadInput("teacher-without-config", "teacher", _probe_teacher(), 2, r"teacher has no config\.json",
             build=_teacher(_remove("config.json"))),
    BadInput("teacher-config-not-json", "teacher", _probe_teacher(), 2, r"could not load a model config from .*teacher",
             build=_teacher(lambda folder: (folder / "config.json").write_text("{model_type: qwen3"))),
    BadInput("teacher-unsupported-architecture", "teacher", _probe_teacher(), 2, r"model_type 'gpt2' is not supported",
             build=_teacher(_edit_config(model_type="gpt2", architectures=["GPT2LMHeadModel"]))),
    BadInput("teacher-without-weights", "teacher", _probe_teacher(), 2, r"teacher has no weights",
             build=_teacher(_remove("model.safetensors"))),
    BadInput("teacher-without-tokenizer", "teacher", _probe_teacher(), 2, r"teacher has no tokenizer files",
             build=_teacher(_remove("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"))),
    BadInput("teacher-tokenizer-damaged", "teacher", _probe_teacher(), 2, r"teacher: (cannot load|damaged) .*tokenizer",
             build=_teacher(lambda folder: (folder / "tokenizer.json").write_text('{"version": "1.0", "model": '))),
    BadInput("teacher-tokenizer-of-another-model", "teacher", _probe_teacher(), 2,
             r"the tokenizer has 16384 tokens but the model's vocabulary only 1000",
             build=_teacher(_edit_config(vocab_size=1000))),
    BadInput("teacher-shard-truncated", "teacher", _probe_teacher(), 2,
             r"teacher/model\.safetensors: truncated safetensors file", build=_teacher(_truncate("model.safetensors"))),
    BadInput("teacher-shard-missing", "teacher", _probe_teacher(), 2,
             r"index\.json names shard\(s\) that are missing: model-00002-of-00002\.safetensors",
             build=_teacher(_shard_index)),
    BadInput("teacher-wrong-shapes", "teacher", _probe_teacher(), 2,
             r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \[10, 32\] but .* needs \[64, 32\]",
             build=_teacher(_edit_tensors(_wrong_shape))),
    BadInput("teacher-missing-tensors", "teacher", _probe_teacher(), 2,
             r"the weights lack 3 tensor\(s\) .*model\.layers\.1\.mlp\.down_proj\.weight",
             build=_teacher(_edit_tensors(lambda t: {k: v for k, v in t.items() if "layers.1.mlp" not in k}))),
    BadInput("teacher-pickle-that-runs-code", "teacher", _probe_teacher(), 2,
             r"pytorch_model\.bin: refused by torch\.load\(weights_only=True\)",
             build=_teacher(_pickled_weights), check=_pickle_did_not_run),
    # ---- flags
    BadInput("flag-batch-size-negative", "flags", _flag("probe", "--batch-size", "-1"), 2,
             r"argument --batch-size: expected an integer ≥ 1, got -1"),
    BadInput("flag-batch-size-zero", "flags", _flag("probe", "--batch-size", "0"), 2,
             r"argument --batch-size: expected an integer ≥ 1, got 0"),
    BadInput("flag-not-a-number", "flags", _flag("probe", "--batch-size", "eight"), 2,
             r"argument --batch-size: expected an integer ≥ 1, got 'eight'"),
    BadInput("flag-max-length-too-small", "flags", _flag("probe", "--max-length", "1"), 2,
             r"argument --max-length: expected an integer ≥ 2"),
    BadInput("flag-max-samples-zero", "flags", _flag("probe", "--max-samples", "0"), 2,
             r"argument --max-samples: expected an integer ≥ 1, got 0"),
    BadInput("flag-chunk-samples-zero", "flags", _flag("probe", "--chunk-samples", "0"), 2,
             r"argument --chunk-samples: expected an integer ≥ 1"),
    BadInput("flag-freq-threshold-nan", "flags", _flag("probe", "--freq-threshold", "nan"), 2,
             r"argument --freq-threshold: expected a finite number ≥ 0, got nan"),
    BadInput("flag-samples-negative", "flags", _flag("run", "--samples", "-5"), 2,
             r"argument --samples: expected an integer ≥ 0, got -5"),
    BadInput("flag-active-fraction-zero", "flags", _flag("run", "--active-fraction", "0"), 2,
             r"argument --active-fraction: expected a fraction in \(0, 1\], got 0"),
    BadInput("flag-active-fraction-above-one", "flags", _flag("assemble", "--active-fraction", "1.5"), 2,
             r"argument --active-fraction: expected a fraction in \(0, 1\], got 1\.5"),
    BadInput("flag-keep-fraction-above-one", "flags", _flag("cluster", "--keep-fraction", "2"), 2,
             r"argument --keep-fraction: expected a fraction"),
    BadInput("flag-train-tokens-zero", "flags", _flag("train", "--train-tokens", "0"), 2,
             r"argument --train-tokens: expected an integer ≥ 1, got 0"),
    BadInput("flag-eval-per-category-negative", "flags", _flag("extract", "--eval-per-category", "-1"), 2,
             r"argument --eval-per-category: expected an integer ≥ 0, got -1"),
    BadInput("flag-top-zero", "flags", _flag("inspect", "--top", "0"), 2, r"argument --top: expected an integer ≥ 1"),
    BadInput("flag-unknown-choice", "flags", _flag("probe", "--quant", "nf8"), 2,
             r"argument --quant: invalid choice: 'nf8'"),
    BadInput("flag-unknown-option", "flags", _flag("probe", "--batchsize", "8"), 2,
             r"unrecognized arguments: --batchsize"),
    BadInput("flag-unknown-device", "flags", _flag("probe", "--device", "tpu9"), 2,
             r"argument --device: unknown device 'tpu9'"),
    BadInput("flag-device-not-available", "environment", (*PROBE[:-2], "--device", "cuda:99", "--data", "{data}"), 2,
             r"device 'cuda:99': (CUDA is not available on this machine|this machine has \d+ CUDA device)"),
    BadInput("flag-bad-unit", "flags", ("inspect", "--runs", "{runs}", "--run", RUN, "--unit", "three"), 2,
             r"unit 'three': expected LAYER:INDEX", needs_probe=True),
    # ---- configs
    BadInput("config-not-json", "config", ("run", *STAGE), 2,
             r"config\.json: not a RunConfig JSON file \(.*line 2\)", build=_write("config.json", '{\n "run": x\n}\n')),
    BadInput("config-not-an-object", "config", ("run", *STAGE), 2, r"RunConfig: expected an object, got list",
             build=_write("config.json", "[1, 2]\n")),
    BadInput("config-unknown-field", "config", ("run", *STAGE), 2, r"RunConfig: unknown field\(s\) sampels",
             build=_run_config(sampels=4)),
    BadInput("config-value-out-of-range", "config", ("run", *STAGE), 2,
             r"RunConfig\.probe\.data: DataConfig\.batch_size must be an integer ≥ 1, got -1",
             build=_run_config(probe={"data": {"batch_size": -1}})),
    BadInput("config-missing-file", "config", ("run", *STAGE), 2, r"config\.json: No such file or directory"),
    BadInput("config-run-name-with-slash", "config", ("run", "--runs", "{runs}", "--run", "a/b"), 2,
             r"RunConfig\.run must be a plain folder name"),
    # ---- paths
    BadInput("paths-runs-is-a-file", "paths", ("probe", "--teacher", "{teacher}", "--data", "{data}", "--runs",
                                               "{tmp}/runs.txt", "--run", RUN, "--device", "cpu"), 2,
             r"runs\.txt.*: Not a directory", build=_write("runs.txt", "a file, not a folder\n")),
    BadInput("paths-stage-without-input", "paths", ("cluster", "--runs", "{runs}", "--run", RUN), 2,
             r"has no finished probe stage: run `tinyonn probe"),
    BadInput("paths-store-missing", "paths", ("inspect", "--store", "{tmp}/nowhere.zarr"), 2, r"nowhere\.zarr"),
    BadInput("paths-read-only", "environment", ("cluster", "--runs", "{runs}", "--run", RUN), 2,
             r"run_config\.json: read-only file system", needs_probe=True,
             inject=_disk_error("tinyonn.files.write_text_atomic", errno.EROFS, f"runs/{RUN}/run_config.json")),
    BadInput("paths-permission-denied", "environment", (*PROBE, "--data", "{data}"), 2,
             r"scores\.zarr: permission denied",
             inject=_disk_error("tinyonn.store.zarr_store.ScoreStoreWriter.open", errno.EACCES,
                                f"runs/{RUN}/scores.zarr")),
    BadInput("paths-disk-full", "environment", (*PROBE, "--data", "{data}"), 1,
             r"scores\.zarr/.*: no space left on device; free some space, then rerun the same command to resume",
             inject=_disk_error("tinyonn.store.zarr_store.ScoreStoreWriter.write_chunk", errno.ENOSPC,
                                f"runs/{RUN}/scores.zarr/chunk")),
    BadInput("interrupted", "environment", (*PROBE, "--data", "{data}"), 130,
             r"^tinyonn: error: interrupted; rerun the same command to resume$",
             inject=_raise_in("tinyonn.probe.run.probe_batch", KeyboardInterrupt())),
    # ---- saved models and checkpoints
    BadInput("checkpoint-model-truncated", "checkpoints", ("train", *STAGE), 2,
             r"model/model\.safetensors: truncated safetensors file",
             build=_saved_model(_truncate("model.safetensors")), needs_probe=True),
    BadInput("checkpoint-model-wrong-shapes", "checkpoints", ("train", *STAGE), 2,
             r"model: tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \[10, 32\]",
             build=_saved_model(_edit_tensors(_wrong_shape)), needs_probe=True),
    BadInput("checkpoint-model-pickle", "checkpoints", ("train", *STAGE), 2,
             r"pytorch_model\.bin: refused by torch\.load\(weights_only=True\)",
             build=_saved_model(_pickled_weights), check=lambda tmp: _pickle_did_not_run(tmp / "runs" / RUN),
             needs_probe=True),
    BadInput("checkpoint-training-truncated", "checkpoints", ("train", *STAGE), 2,
             r"step-00000003/optimizer\.safetensors: truncated safetensors file.*delete .*step-00000003 to resume",
             build=_checkpoint(_truncate("optimizer.safetensors")), needs_probe=True),
    BadInput("checkpoint-training-state-damaged", "checkpoints", ("train", *STAGE), 2,
             r"step-00000003/state\.json: damaged checkpoint state",
             build=_checkpoint(lambda folder: (folder / "state.json").write_text('{"step": 3,')), needs_probe=True),
)
"""Every kind of bad input, one entry each (names are unique)."""


# ---------------------------------------------------------------- running an entry

def _snapshot(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def run_entry(entry: BadInput, tmp: Path, fixtures: Fixtures, skip_bad: bool = False) -> Outcome:
    """Build `entry` under `tmp` (a fresh folder), run its command in-process and check the result
    (with `skip_bad`, the `--skip-bad` run of a bad data line: it must succeed and report it)."""
    from tinyonn.cli import main

    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    runs, run_dir = tmp / "runs", tmp / "runs" / RUN
    if entry.needs_probe:
        shutil.copytree(fixtures.probed_run, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / KEPT).write_text("written before the command: it must survive it\n")
    entry.build(tmp, fixtures)
    before = _snapshot(tmp)
    argv = [part.format(tmp=tmp, runs=runs, run=RUN, teacher=fixtures.teacher, data=fixtures.data)
            for part in entry.argv] + (["--skip-bad"] if skip_bad else [])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            (entry.inject(tmp) if entry.inject else contextlib.nullcontext()):
        code = main(argv)
    stderr = err.getvalue()
    errors = tuple(line for line in stderr.splitlines() if line.startswith("tinyonn: error:"))
    problems = []
    expected = 0 if skip_bad else entry.exit_code
    if code != expected:
        problems.append(f"exit code {code}, expected {expected}")
    if skip_bad:
        if errors:
            problems.append(f"--skip-bad still failed: {errors[0]}")
        if not re.search(rf"skipped {entry.skip_bad} bad data line\(s\)", out.getvalue()):
            problems.append(f"--skip-bad did not report {entry.skip_bad} skipped line(s)")
    elif len(errors) != 1:
        problems.append(f"{len(errors)} 'tinyonn: error:' lines on stderr, expected 1")
    elif not re.search(entry.message, errors[0]):
        problems.append(f"the error line does not match {entry.message!r}: {errors[0]}")
    if "Traceback (most recent call last)" in stderr:
        problems.append("a traceback was printed")
    after = _snapshot(tmp)
    lost = [name for name, digest in before.items() if after.get(name) != digest]
    if lost:
        problems.append(f"written before and lost or changed: {', '.join(lost[:5])}")
    if entry.check is not None and (problem := entry.check(tmp)):
        problems.append(problem)
    return Outcome(name=entry.name, area=entry.area, argv=tuple(argv), exit_code=code, error_lines=errors,
                   problems=tuple(problems))


def kinds() -> int:
    """How many kinds of bad input the catalogue holds (`bad_input_kinds` of the fault suite)."""
    return len({entry.name for entry in CATALOGUE})
