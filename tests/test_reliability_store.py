"""Reliability of the store and the run folder (issue #15, defects 1, 4, 5, 6): damage is named, never
read as data; --overwrite deletes only what Tiny-ONN wrote; stale stage outputs are refused; one
writer per run folder."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

from test_store import CHUNK, N, make_data, open_writer, write_chunks, full_store
from tinyonn.store import StoreDamagedError
from tinyonn.store.mapped import MappedReadError
from tinyonn.store.zarr_store import STORE_FORMAT, ScoreStore, ScoreStoreError

# ---------------------------------------------------------------- defect 1: damaged chunks


@pytest.fixture()
def store_path(tmp_path):
    path = tmp_path / "s.zarr"
    full_store(path, make_data())
    return path


def test_deleted_units_layer_chunk_is_named_on_open(store_path):
    (store_path / "units" / "layer" / "c" / "0").unlink()  # zarr would read units 0..15 as layer 0
    with pytest.raises(StoreDamagedError, match=r"units/layer/c/0: chunk file is missing") as info:
        ScoreStore.open(store_path)
    assert (info.value.array, info.value.chunk, info.value.reason) == ("units/layer", "c/0", "missing")


@pytest.mark.parametrize("mmap", [False, True])
def test_deleted_per_sample_chunk_is_named_on_read(tmp_path, mmap):
    path = tmp_path / "s.zarr"
    data = make_data()
    full_store(path, data, per_sample_codec="none" if mmap else "zstd")
    (path / "per_sample" / "grad" / "c" / "1" / "0").unlink()
    store = ScoreStore.open(path, mmap=mmap)  # opening stays lazy: the per-sample arrays are checked on read
    grad = store.array("per_sample/grad")
    np.testing.assert_array_equal(grad[0:16, 0:16], data["grad"][0:16, 0:16].astype(np.float16))
    with pytest.raises(StoreDamagedError, match=r"chunk c/1/0 of array 'per_sample/grad'") as info:
        grad[16:32, 0:16]
    assert info.value.reason == "missing"
    with pytest.raises(StoreDamagedError, match=r"per_sample/grad/c/1/0: chunk file is missing"):
        store.verify()


def test_deleted_summary_chunk_fails_open_and_summary(store_path):
    store = ScoreStore.open(store_path)
    (store_path / "summary" / "grad" / "c" / "1").unlink()
    with pytest.raises(StoreDamagedError, match=r"summary/grad/c/1: chunk file is missing"):
        ScoreStore.open(store_path)
    with pytest.raises(StoreDamagedError, match=r"summary/grad/c/1"):  # a store opened before the damage
        store.summary(file=None)


def test_missing_partials_chunk_refuses_resume_and_finalize(tmp_path):
    data = make_data()
    path = tmp_path / "s.zarr"
    writer = open_writer(path, data)
    write_chunks(writer, data, [0, 1])
    (path / "partials" / "act" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(StoreDamagedError, match=r"partials/act/c/1/0/0: chunk file is missing") as info:
        open_writer(path, data)  # the resume refuses before computing anything
    assert (info.value.array, info.value.chunk) == ("partials/act", "c/1/0/0")
    write_chunks(writer, data, [2, 3])  # the writer that was open when the file went
    with pytest.raises(StoreDamagedError, match=r"chunk c/1/0/0 of array 'partials/act'"):
        writer.finalize()  # before: NaN means finalised without a word
    assert not ScoreStore.open(path).finalized


def test_resume_refuses_a_deleted_per_sample_chunk(tmp_path):
    data = make_data()
    path = tmp_path / "s.zarr"
    write_chunks(open_writer(path, data), data, [0, 2])
    (path / "per_sample" / "taylor" / "c" / "2" / "1").unlink()
    with pytest.raises(StoreDamagedError, match=r"per_sample/taylor/c/2/1"):
        open_writer(path, data)
    (path / "per_sample" / "act" / "c" / "1").mkdir()
    (path / "per_sample" / "act" / "c" / "1" / "0").write_bytes(b"partial")  # a killed write of pending chunk 1
    (path / "per_sample" / "taylor").rename(tmp_path / "moved")
    with pytest.raises(StoreDamagedError, match=r"array 'per_sample/taylor'") as info:
        open_writer(path, data)
    assert info.value.reason == "missing array"


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "empty"])
def test_bad_checksum_names_array_and_chunk(store_path, damage):
    chunk = store_path / "per_sample" / "act" / "c" / "2" / "1"
    raw = bytearray(chunk.read_bytes())
    if damage == "bitflip":
        raw[len(raw) // 3] ^= 0x10
    chunk.write_bytes(bytes(raw) if damage == "bitflip" else bytes(raw[: len(raw) // 2] if damage == "truncate" else b""))
    store = ScoreStore.open(store_path)
    with pytest.raises(StoreDamagedError, match=r"per_sample/act/c/2/1: .*(checksum|truncated)") as info:
        store.array("per_sample/act")[32:48, 16:32]
    assert (info.value.array, info.value.chunk, info.value.reason) == ("per_sample/act", "c/2/1", "checksum")
    with pytest.raises(StoreDamagedError, match=r"chunk c/2/1 of array 'per_sample/act'"):
        store.verify()
    assert store.verify(["per_sample/grad"]) == 4 * 3


def test_truncated_mapped_chunk_names_array_and_chunk(tmp_path):
    path = tmp_path / "s.zarr"
    full_store(path, make_data(), per_sample_codec="none")
    chunk = path / "per_sample" / "freq" / "c" / "0" / "2"
    chunk.write_bytes(chunk.read_bytes()[:-10])
    with pytest.raises(StoreDamagedError, match=r"freq/c/0/2: .*bytes, expected") as info:
        ScoreStore.open(path, mmap=True).array("per_sample/freq")[0:4, 32:40]
    assert isinstance(info.value, MappedReadError) and info.value.reason == "size"


def test_verify_names_a_missing_array(store_path):
    (store_path / "summary" / "by_category" / "freq" / "zarr.json").unlink()
    with pytest.raises(StoreDamagedError, match=r"array 'summary/by_category/freq'") as info:
        ScoreStore.open(store_path).verify()
    assert info.value.reason == "missing array"


def test_pending_chunks_still_read_as_fill_and_nan_chunks_are_files(tmp_path):
    data = make_data()
    data["act"][CHUNK:2 * CHUNK] = np.nan  # a chunk whose values equal the fill value is still written
    path = tmp_path / "s.zarr"
    writer = open_writer(path, data)
    write_chunks(writer, data, [0, 1])
    assert (path / "per_sample" / "act" / "c" / "1" / "0").is_file()
    partial = ScoreStore.open(path)
    assert np.isnan(partial.array("per_sample/act")[2 * CHUNK:N]).all()  # not written yet: no damage
    assert partial.verify() > 0
    write_chunks(writer, data, [2, 3])
    assert writer.finalize().verify() > 0


# ---------------------------------------------------------------- defect 4: --overwrite


def test_store_carries_its_format_mark(store_path):
    assert zarr.open_group(store_path, mode="r").attrs["store_format"] == STORE_FORMAT


def test_overwrite_refuses_a_foreign_zarr_store(tmp_path):
    data = make_data()
    foreign = tmp_path / "theirs.zarr"
    group = zarr.open_group(foreign, mode="w")
    group.attrs["owner"] = "someone else"
    group.create_array("x", shape=(4,), dtype="f4")[...] = 1.0
    with pytest.raises(ScoreStoreError, match="not a Tiny-ONN score store") as info:
        open_writer(foreign, data)
    assert "overwrite=True" not in str(info.value) and "--overwrite" not in str(info.value)  # no longer suggested
    with pytest.raises(ScoreStoreError, match="Tiny-ONN did not write; refusing to overwrite"):
        open_writer(foreign, data, overwrite=True)
    assert (foreign / "x" / "zarr.json").is_file() and zarr.open_group(foreign, mode="r").attrs["owner"]


def test_overwrite_refuses_a_store_with_files_beside_it(store_path):
    data = make_data()
    (store_path / "notes.txt").write_text("mine")
    (store_path / "units" / "extra.npy").write_bytes(b"x")
    with pytest.raises(ScoreStoreError, match=r"holds files a score store does not \(.*notes\.txt"):
        open_writer(store_path, data, fingerprint="run-b", overwrite=True)
    assert (store_path / "notes.txt").read_text() == "mine" and ScoreStore.open(store_path).finalized
    (store_path / "notes.txt").unlink()
    (store_path / "units" / "extra.npy").unlink()
    writer = open_writer(store_path, data, fingerprint="run-b", overwrite=True)  # only the store: replaced
    assert writer.pending_chunks() == [0, 1, 2, 3]


def test_overwrite_replaces_an_older_store_without_the_mark(store_path):
    group = zarr.open_group(store_path, mode="r+")
    attrs = dict(group.attrs)
    del attrs["store_format"]
    group.attrs.clear()
    group.update_attributes(attrs)
    writer = open_writer(store_path, make_data(), fingerprint="run-b", overwrite=True)
    assert writer.pending_chunks() == [0, 1, 2, 3]


# ---------------------------------------------------------------- run folders: a tiny probed run

PAIRS = [("What does the word harbour mean?", "A sheltered port where ships can stay."),
         ("Calculate: 23 + 19", "42"), ("def add(a, b):", "    return a + b\n"),
         ("Who was Ada?", "Ada Lovelace, who wrote the first published algorithm.")]


def _write_data(path, count: int, offset: int = 0) -> None:
    import json

    with open(path, "w") as f:
        for i in range(offset, offset + count):
            prompt, response = PAIRS[i % len(PAIRS)]
            f.write(json.dumps({"prompt": f"{prompt} ({i})", "response": response,
                                "category": ["code", "math", "prose"][i % 3]}) + "\n")


def _config(teacher_dir, runs, data):
    from tinyonn.config import DataConfig, ProbeConfig
    from tinyonn.pipeline import RunConfig

    return RunConfig(run="r", runs_dir=str(runs), teacher=str(teacher_dir), data=str(data), probe_samples=12,
                     probe=ProbeConfig(chunk_samples=4, data=DataConfig(max_length=48, batch_size=4)), train=None)


@pytest.fixture(scope="module")
def probed_run(tiny_teacher_dir, tmp_path_factory):
    """probe → cluster → assemble of a tiny teacher, built once (the tests copy it)."""
    from tinyonn.pipeline import assemble_stage, cluster_stage, probe_stage

    root = tmp_path_factory.mktemp("probed_run")
    _write_data(root / "data.jsonl", 30)
    _write_data(root / "other.jsonl", 30, offset=7)
    config = _config(tiny_teacher_dir, root / "runs", root / "data.jsonl")
    for stage in (probe_stage, cluster_stage, assemble_stage):
        stage(config, log=lambda *a: None)
    return root


@pytest.fixture()
def run(probed_run, tmp_path, tiny_teacher_dir):
    """A copy of the probed run folder (the data files stay where the run read them)."""
    import shutil

    shutil.copytree(probed_run / "runs", tmp_path / "runs")
    return _config(tiny_teacher_dir, tmp_path / "runs", probed_run / "data.jsonl")


def OTHER(config):
    """The other data file beside the run's."""
    return Path(config.data).parent / "other.jsonl"


def _probe_outside(config, data) -> None:
    """`tinyonn probe --run R --overwrite` with other data: the store is replaced behind the records."""
    from tinyonn.probe import probe

    probe(config.teacher, str(data), config.probe, config.run_dir / "scores.zarr", overwrite=True, progress=False)


# ---------------------------------------------------------------- defect 5: stale outputs


def test_plan_records_the_store_it_came_from(run):
    import json

    plan = json.loads((run.run_dir / "plan" / "plan.json").read_text())
    assert plan["info"]["store_fingerprint"] == ScoreStore.open(run.run_dir / "scores.zarr").attrs["fingerprint"]


def test_assemble_refuses_the_plan_of_an_earlier_probe(run):
    from tinyonn.pipeline import StaleOutputError, assemble_stage, cluster_stage, stage_is_current

    assert stage_is_current(run, "cluster") and stage_is_current(run, "assemble")
    model_config = (run.run_dir / "model" / "config.json").read_bytes()
    _probe_outside(run, OTHER(run))
    with pytest.raises(StaleOutputError, match=r"plan/ is stale: it was made from another scores\.zarr"):
        assemble_stage(run, log=lambda *a: None)
    assert (run.run_dir / "model" / "config.json").read_bytes() == model_config  # nothing written
    assert (run.run_dir / "stages" / "assemble.json").is_file()
    # run_pipeline's view: the probe record no longer vouches for the store, cluster and assemble rerun
    assert not stage_is_current(run, "probe") and not stage_is_current(run, "cluster")
    cluster_stage(run, log=lambda *a: None)  # a store probed outside the pipeline is taken as it is
    assemble_stage(run, log=lambda *a: None)
    import json

    fingerprint = ScoreStore.open(run.run_dir / "scores.zarr").attrs["fingerprint"]
    assert json.loads((run.run_dir / "plan" / "plan.json").read_text())["info"]["store_fingerprint"] == fingerprint


def test_a_plan_without_its_record_is_checked_against_the_store(run):
    from tinyonn.pipeline import StaleOutputError, assemble_stage

    (run.run_dir / "stages" / "cluster.json").unlink()  # e.g. killed between the plan and its record
    _probe_outside(run, OTHER(run))
    with pytest.raises(StaleOutputError, match=r"plan is stale: it was clustered from a score store with fingerprint"):
        assemble_stage(run, log=lambda *a: None)


def test_stage_refuses_an_upstream_made_with_other_settings(run):
    import dataclasses

    from tinyonn.clustering import ClusterConfig
    from tinyonn.errors import TinyONNError
    from tinyonn.pipeline import StaleOutputError, assemble_stage, check_upstream

    other = dataclasses.replace(run, cluster=ClusterConfig(method="random"))
    with pytest.raises(StaleOutputError, match=r"plan/ was made with other settings than this run.s \(cluster.method: \"coact-kmeans\" → \"random\"\)"):
        assemble_stage(other, log=lambda *a: None)
    other = dataclasses.replace(run, probe_samples=9)
    with pytest.raises(StaleOutputError, match=r"scores\.zarr was made with other settings .*probe_samples: 12 → 9"):
        assemble_stage(other, log=lambda *a: None)
    check_upstream(run, "evaluate")  # model/ ← plan/ ← scores.zarr, all current
    import shutil

    shutil.rmtree(run.run_dir / "plan")  # what model/ was made from is gone: nothing left to compare it with
    check_upstream(run, "evaluate")
    shutil.rmtree(run.run_dir / "model")
    with pytest.raises(TinyONNError, match="has no finished assemble stage: run `tinyonn assemble"):
        check_upstream(run, "evaluate")


def test_cli_stage_refusal_leaves_the_run_config(run, capsys):
    import json

    from tinyonn.cli import main

    settings = run.run_dir / "run_config.json"
    settings.write_text(json.dumps(run.to_dict(), indent=1))
    before = settings.read_bytes()
    _probe_outside(run, OTHER(run))
    assert main(["assemble", "--runs", run.runs_dir, "--run", "r", "--active-fraction", "0.25"]) == 2
    assert "plan/ is stale" in capsys.readouterr().err
    assert settings.read_bytes() == before


def test_run_refusing_the_store_leaves_the_run_config(run):
    import dataclasses

    from tinyonn.pipeline import run_pipeline

    for name in ("stages", "plan", "model"):  # a run folder holding only a store from `tinyonn probe`
        import shutil

        shutil.rmtree(run.run_dir / name)
    settings = run.run_dir / "run_config.json"
    settings.write_text("{\"the\": \"run's own settings\"}")
    other = dataclasses.replace(run, data=str(OTHER(run)))
    with pytest.raises(ScoreStoreError, match="belongs to another run"):
        run_pipeline(other, log=lambda *a: None)
    assert settings.read_text() == "{\"the\": \"run's own settings\"}"


# ---------------------------------------------------------------- defect 6: one writer per run folder

HOLDER = """
import sys, types
package = types.ModuleType("tinyonn")  # the lock module alone: no torch import, the holder starts at once
package.__path__ = [sys.argv[1]]
sys.modules["tinyonn"] = package
from tinyonn.runlock import run_lock
with run_lock(sys.argv[2], what="tinyonn probe (holder)"):
    print("ready", flush=True)
    sys.stdin.read()
"""


def test_a_second_writer_fails_fast_naming_the_pid(run, capsys):
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tinyonn.cli import main
    from tinyonn.pipeline import cluster_stage
    from tinyonn.probe import probe
    from tinyonn.runlock import RunInUseError

    package = Path(__file__).resolve().parent.parent / "tinyonn"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(package), str(run.run_dir)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        plan = (run.run_dir / "plan" / "plan.json").read_bytes()
        started = time.perf_counter()
        with pytest.raises(RunInUseError, match=rf"run .*r is in use by pid {holder.pid} since .*\(tinyonn probe "
                                                r"\(holder\)\); wait for it") as info:
            cluster_stage(run, log=lambda *a: None)
        assert info.value.pid == holder.pid and time.perf_counter() - started < 5  # no waiting
        with pytest.raises(RunInUseError, match=rf"in use by pid {holder.pid}"):  # before the teacher loads
            probe(run.teacher, run.data, run.probe, run.run_dir / "scores.zarr", overwrite=True, progress=False)
        assert main(["cluster", "--runs", run.runs_dir, "--run", "r"]) == 1
        assert f"is in use by pid {holder.pid}" in capsys.readouterr().err
        assert main(["extract", "--runs", run.runs_dir, "--run", "r", "--teacher", run.teacher]) == 1
        assert f"is in use by pid {holder.pid}" in capsys.readouterr().err
        assert (run.run_dir / "plan" / "plan.json").read_bytes() == plan and ScoreStore.open(run.run_dir / "scores.zarr")
    finally:
        holder.kill()  # kill -9: the system drops the lock with the process
        holder.wait()
    cluster_stage(run, log=lambda *a: None)


def test_run_lock_nests_in_a_thread_and_cleans_up(tmp_path, monkeypatch):
    from tinyonn.runlock import LOCK_FILE, OWNER_FILE, RunInUseError, read_owner, run_lock

    folder = tmp_path / "run"
    errors: list[BaseException] = []

    def other_thread():
        try:
            with run_lock(folder):
                pass
        except RunInUseError as error:
            errors.append(error)

    with run_lock(folder, what="outer"):
        with run_lock(folder, what="inner"):  # nested in one thread: shares the hold
            assert read_owner(folder)["command"] == "outer" and read_owner(folder)["pid"] == os.getpid()
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        (folder / "output.txt").write_text("x")
    assert len(errors) == 1 and f"in use by pid {os.getpid()}" in str(errors[0])
    assert not (folder / OWNER_FILE).exists() and (folder / LOCK_FILE).exists()
    with run_lock(folder):  # released: free again
        with monkeypatch.context() as env:  # rank 1 of a torchrun launch: its rank 0 holds the lock
            env.setenv("WORLD_SIZE", "2")
            env.setenv("RANK", "1")
            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join()
        assert len(errors) == 1
    fresh = tmp_path / "never-written"
    with pytest.raises(KeyError):
        with run_lock(fresh):
            raise KeyError("a failed command")
    assert not fresh.exists()  # a folder made only for the lock goes with it
