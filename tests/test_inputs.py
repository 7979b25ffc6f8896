"""Inputs read right or refused clearly: numeric options checked before any file is written,
compressed files cut short detected, held-out examples never probed, `--max-samples` spread over
the categories, `--skip-bad` counting, one-line errors with `--debug` tracebacks."""

from __future__ import annotations

import json

import pytest
import zstandard

from tinyonn.cli import main
from tinyonn.config import DataConfig, ProbeConfig
from tinyonn.data import Example, read_examples, split_probe_set, spread
from tinyonn.errors import DataFormatError

CATEGORIES = ("code", "math", "prose")


def _rows(count: int, categories=CATEGORIES) -> list[dict]:
    """Distinct rows, sorted by category (as the builtin set is)."""
    per = count // len(categories)
    return [{"prompt": f"{c} question {i}", "response": f"{c} answer number {i}.", "category": c}
            for c in categories for i in range(per)]


def _text(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


# ---------------------------------------------------------------- defect 3: compressed files cut short

def test_zstd_cut_after_a_complete_block_is_truncated_not_half_the_rows(tmp_path):
    text = _text(_rows(600))
    half = text.index(b"\n", len(text) // 2) + 1
    writer = zstandard.ZstdCompressor().compressobj()
    first_half = writer.compress(text[:half]) + writer.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    rest = writer.compress(text[half:]) + writer.flush()
    whole = tmp_path / "whole.jsonl.zst"
    whole.write_bytes(first_half + rest)
    assert len(read_examples(whole)) == 600
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(first_half)  # every row in it decompresses cleanly: only the frame's end is missing
    lines = text[:half].count(b"\n")
    with pytest.raises(DataFormatError, match=rf"cut\.jsonl\.zst:{lines + 1}: truncated: the file ends inside a "
                                              rf"zstd frame.*only {lines} complete lines"):
        read_examples(cut)


def test_zstd_cut_inside_a_block_says_truncated_not_malformed_json(tmp_path):
    data = zstandard.ZstdCompressor().compress(_text(_rows(600)))
    for keep in (len(data) // 3, len(data) - 3, 20):
        path = tmp_path / f"cut{keep}.jsonl.zst"
        path.write_bytes(data[:keep])
        with pytest.raises(DataFormatError, match=r"truncated: the file ends inside a zstd frame") as err:
            read_examples(path)
        assert "malformed JSON" not in str(err.value)


def test_zstd_with_several_frames_reads_every_frame(tmp_path):
    rows = _rows(300)
    compressor = zstandard.ZstdCompressor()
    frames = b"".join(compressor.compress(_text(rows[i : i + 100])) for i in range(0, 300, 100))
    path = tmp_path / "frames.jsonl.zst"
    path.write_bytes(frames)
    assert [e.messages[0]["content"] for e in read_examples(path)] == [r["prompt"] for r in rows]


def test_gzip_cut_short_says_truncated(tmp_path):
    import gzip

    data = gzip.compress(_text(_rows(600)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match=r"cut\.jsonl\.gz:\d+: truncated: the file ends inside a gzip stream"):
        read_examples(path)


# ---------------------------------------------------------------- --skip-bad

def test_skip_bad_passes_each_bad_line_on_and_keeps_the_good_ones(tmp_path):
    good = [json.dumps(row) for row in _rows(3)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([good[0], "{oops", good[1], '{"prompt": "x"}', good[2]]) + "\n")
    with pytest.raises(DataFormatError, match=r"mixed\.jsonl:2: malformed JSON"):
        read_examples(path)
    skipped: list[DataFormatError] = []
    examples = read_examples(path, on_bad=skipped.append)
    assert [e.messages[0]["content"] for e in examples] == [r["prompt"] for r in _rows(3)]
    assert [(error.line, str(error).split(": ", 1)[1][:14]) for error in skipped] == \
        [(2, "malformed JSON"), (4, "missing field ")]


def test_run_checks_the_data_before_writing_anything_and_reports_skipped_lines(tmp_path):
    from tinyonn.pipeline import RunConfig, check_data

    path = tmp_path / "data.jsonl"
    path.write_text(_text(_rows(30)).decode() + "{bad\n")
    with pytest.raises(DataFormatError, match=r"data\.jsonl:31: malformed JSON"):
        check_data(RunConfig(data=str(path), runs_dir=str(tmp_path / "runs")))
    assert main(["run", "--data", str(path), "--teacher", str(tmp_path / "missing"),
                 "--runs", str(tmp_path / "runs")]) == 2
    assert not (tmp_path / "runs" / "default").exists()  # the data fails before the run folder is made
    skipped = check_data(RunConfig(data=str(path), skip_bad=True))
    assert [error.line for error in skipped] == [31]


# ---------------------------------------------------------------- defect 8: held-out examples and sampling

def test_one_data_file_holds_out_examples_that_are_never_probed_nor_trained_on(tmp_path):
    from tinyonn.pipeline import EvalConfig, RunConfig, _examples, _training_examples

    path = tmp_path / "data.jsonl"
    path.write_bytes(_text(_rows(300)))
    config = RunConfig(data=str(path), probe_samples=60, eval=EvalConfig(stride=1))
    probed, held_out = _examples(config)
    trained = _training_examples(config)
    key = lambda e: e.messages[0]["content"]  # noqa: E731
    assert len(held_out) == 30 and len(probed) == 60 and len(trained) == 270
    assert not {key(e) for e in held_out} & ({key(e) for e in probed} | {key(e) for e in trained})
    assert {e.category for e in probed} == set(CATEGORIES)


def test_extract_on_one_data_file_evaluates_examples_it_did_not_calibrate_on(tmp_path, monkeypatch,
                                                                              tiny_teacher_dir):
    from tinyonn.evaluation import extract
    from tinyonn.teacher import load_teacher

    path = tmp_path / "data.jsonl"
    path.write_bytes(_text(_rows(90)))
    seen: dict[str, list] = {}

    class Stop(Exception):
        pass

    def collect(teacher, tokenizer, examples, config):
        seen["calibration"] = list(examples)
        raise Stop

    monkeypatch.setattr(extract, "encode_examples", lambda tok, examples, config: (seen.setdefault(
        "evaluated", list(examples)), None))
    monkeypatch.setattr(extract.Calibration, "collect", staticmethod(collect))
    with pytest.raises(Stop):
        extract.evaluate_partitions(object(), load_teacher(tiny_teacher_dir), tmp_path, data=str(path),
                                    eval_per_category=None)
    evaluated = {e.messages[0]["content"] for e in seen["evaluated"]}
    calibrated = {e.messages[0]["content"] for e in seen["calibration"]}
    assert len(evaluated) == 9 and len(calibrated) == 81 and not evaluated & calibrated


def test_spread_takes_every_category_of_a_sorted_set():
    examples = [Example(messages=({"role": "assistant", "content": str(i)},), category=c)
                for c in CATEGORIES for i in range(100)]
    assert [e.category for e in spread(examples, 6)] == ["code", "code", "math", "math", "prose", "prose"]
    assert spread(examples, None) == examples and spread(examples, 0) == [] and len(spread(examples, 500)) == 300
    train, held_out = split_probe_set(examples, holdout_every=4)
    assert len(train) == 225 and len(held_out) == 75 and not set(map(id, train)) & set(map(id, held_out))


def test_probe_max_samples_spreads_over_the_categories_and_reports_skipped(tmp_path, tiny_teacher_dir):
    from tinyonn.probe import probe

    rows = _rows(30)
    rows[0]["response"] = " "  # an empty response: skipped, and said so
    path = tmp_path / "data.jsonl"
    path.write_bytes(_text(rows))
    said: list[str] = []
    store = probe(str(tiny_teacher_dir), str(path), ProbeConfig(max_samples=6, device="cpu", heads=False),
                  tmp_path / "scores.zarr", progress=False, log=said.append)
    assert sorted(store.categories) == list(CATEGORIES)  # the first 6 rows would all be "code"
    assert store.n_samples == 5
    assert said == ["[probe] 1 of 6 examples give no sample and are skipped: 1 with an empty response, "
                    "0 whose response max_length=512 cuts away"]


# ---------------------------------------------------------------- defect 2: options checked before any file

@pytest.mark.parametrize("bad", [["--batch-size", "-1"], ["--batch-size", "0"], ["--max-length", "0"],
                                 ["--chunk-samples", "-3"], ["--max-samples", "0"], ["--freq-threshold", "-1"]])
def test_probe_refuses_a_bad_number_before_writing_anything(bad, tmp_path, capsys, tiny_teacher_dir):
    path = tmp_path / "data.jsonl"
    path.write_bytes(_text(_rows(6)))
    argv = ["probe", "--teacher", str(tiny_teacher_dir), "--data", str(path), "--runs", str(tmp_path / "runs"),
            "--device", "cpu"]
    assert main([*argv, *bad]) == 2
    err = capsys.readouterr().err
    assert f"argument {bad[0]}: expected" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
    if bad[0] == "--batch-size":  # the corrected rerun is not blocked by anything the bad one left
        assert main([*argv, "--batch-size", "2"]) == 0


def test_configs_refuse_out_of_range_numbers():
    for bad in (dict(batch_size=0), dict(batch_size=-1), dict(max_length=1), dict(truncation_side="middle")):
        with pytest.raises(ValueError, match=f"DataConfig.{next(iter(bad))}"):
            DataConfig(**bad)
    for bad in (dict(chunk_samples=0), dict(max_samples=0), dict(freq_threshold=float("nan")), dict(dtype="fp8")):
        with pytest.raises(ValueError, match=f"ProbeConfig.{next(iter(bad))}"):
            ProbeConfig(**bad)


# ---------------------------------------------------------------- defect 7: one line, --debug, exit codes

def test_an_error_is_one_line_and_debug_adds_the_traceback(tmp_path, capsys):
    argv = ["probe", "--device", "cuda:99", "--runs", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tinyonn: error: device 'cuda:99': ")
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "DeviceError" in err
    assert err.splitlines()[-1].startswith("tinyonn: error: device 'cuda:99'")
    assert main([*argv, "--debug"]) == 2 and "Traceback" in capsys.readouterr().err


def test_errors_map_to_exit_codes_and_name_the_path(capsys):
    import errno

    from tinyonn.cli import _fail, describe_error
    from tinyonn.errors import RunFailure, TinyONNError

    def wrapped(error: OSError) -> Exception:  # a library's own error raised while handling an OSError
        try:
            raise error
        except OSError:
            try:
                raise RuntimeError("write failed")
            except RuntimeError as outer:
                return outer

    full = OSError(errno.ENOSPC, "No space left on device", "/runs/r/scores.zarr/c/0")
    assert describe_error(full) == (1, "/runs/r/scores.zarr/c/0: no space left on device; free some space, then "
                                       "rerun the same command to resume")
    assert describe_error(wrapped(full))[0] == 1
    assert describe_error(OSError(errno.EROFS, "Read-only file system", "/ro/x")) == \
        (2, "/ro/x: read-only file system: give a writable folder (--runs, --out)")
    assert describe_error(PermissionError(errno.EACCES, "Permission denied", "/p")) == (2, "/p: permission denied")
    assert describe_error(FileNotFoundError(errno.ENOENT, "No such file or directory", "/f")) == \
        (2, "/f: No such file or directory")
    assert describe_error(TinyONNError("bad input")) == (2, "bad input")
    assert describe_error(RunFailure("the run failed")) == (1, "the run failed")
    assert describe_error(ValueError("X.y must be ≥ 1")) == (2, "X.y must be ≥ 1")
    code, message = describe_error(RuntimeError("something\nbroke"))
    assert code == 1 and _fail(code, message) == 1
    assert capsys.readouterr().err == "tinyonn: error: internal error: RuntimeError: something broke " \
                                      "(rerun with --debug for the traceback)\n"
