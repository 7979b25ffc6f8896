"""Two ranks on the CPU (gloo) against one process.

- The score store with two writers (ranks) of disjoint chunks, killed and resumed, finalizes to the
  one-writer store bitwise.
- `torchrun --nproc_per_node 2 -m tinyonn probe` writes the same score store as one process: every
  array bitwise, the summaries too (each rank writes its own chunks; rank 0 sums the partials in
  chunk order at finalize).
- A 2-rank probe with rank 1 killed -9 after its first chunk resumes (with 2 ranks) to that same
  store, probing only the chunks left.
- Data-parallel SMK training (DDP, 3 micro-batches a step over 2 ranks, so one rank also makes a
  zero-weight pass) gives one process's loss curve (every step's losses within 1e-5, the same
  experts updated) and its final weights; rank 1 logs the same values as rank 0.
- The one-process stages refuse to start under torchrun.

The ranks of the killed probe and of training are forked from this process (no new interpreter to
start); the first probe goes through torchrun and `python -m tinyonn` as a user would.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinyonn import distributed, load_probe_set, load_teacher
from tinyonn.clustering.plan import full_plan
from tinyonn.config import DataConfig
from tinyonn.model.assemble import assemble
from tinyonn.model.routing import RoutingConfig
from tinyonn.training import Phase1Config, Phase2Config, TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
NUMERIC = ("loss", "ce", "kd", "balance", "router_distill", "z_loss", "pi", "tau", "surprise", "grad_norm")
EXACT = ("step", "phase", "tokens", "response_tokens", "min_k", "act_k", "experts_updated", "skipped")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target, size: int, timeout: float = 120.0, expect_failure: bool = False) -> list[int]:
    """Run `target(rank)` in `size` forked processes joined into one gloo group; fail on any error
    (unless `expect_failure`: then the others are killed once one fails). Returns the exit codes."""
    import tempfile

    port = free_port()
    context = multiprocessing.get_context("fork")
    # each rank's traceback goes to its own file: a rank killed mid-write cannot leave the parent
    # blocked on a half-written queue message
    reports = Path(tempfile.mkdtemp(prefix="tinyonn-ranks-"))

    def body(rank: int) -> None:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port), TINYONN_DIST_TIMEOUT="60")
        code = 0
        try:
            target(rank)
        except BaseException:  # noqa: BLE001  (reported to the parent)
            (reports / f"rank{rank}.txt").write_text(f"rank {rank}: {traceback.format_exc()}")
            code = 1
        distributed.shutdown()
        os._exit(code)

    processes = [context.Process(target=body, args=(rank,)) for rank in range(size)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in processes):  # one failed: the others would wait for it
            break
        time.sleep(0.05)
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join()
    failures = [path.read_text() for path in sorted(reports.glob("rank*.txt"))]
    codes = [p.exitcode for p in processes]
    if not expect_failure:
        assert all(code == 0 for code in codes) and not failures, (codes, "\n".join(failures))
    return codes


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_teacher(tiny_teacher_dir)[0]


# ---------------------------------------------------------------- the store with several writers


def test_writers_of_disjoint_chunks_make_the_one_writer_store(tmp_path):
    from tests.test_store import assert_stores_equal, full_store, make_data, open_writer, write_chunks
    from tinyonn.store.scores import ScoreConfig, summary_score_fn
    from tinyonn.store.zarr_store import ScoreStore

    data = make_data()
    full_store(tmp_path / "one.zarr", data)
    path = tmp_path / "two.zarr"
    first, second = open_writer(path, data, rank=0), open_writer(path, data, rank=1)
    assert first.n_chunks == 4
    write_chunks(first, data, [0])
    write_chunks(second, data, [1])  # then both are killed
    assert sorted(p.name for p in path.glob("progress*")) == ["progress.json", "progress.rank-0.json", "progress.rank-1.json"]
    assert "2 of 4 chunks written" in str(pytest.raises(Exception, ScoreStore.open(path).summary_of, "act").value)
    resumed = [open_writer(path, data, rank=0), open_writer(path, data, rank=1)]
    assert resumed[0].pending_chunks() == resumed[1].pending_chunks() == [2, 3]
    write_chunks(resumed[1], data, [3])
    write_chunks(resumed[0], data, [2])  # rank 0 never saw chunk 3 written: finalize reads every progress file
    resumed[0].finalize(summary_score_fn(ScoreConfig()), score_attrs={"formula": "pidiff"})
    assert not list(path.glob("progress*"))
    assert_stores_equal(tmp_path / "one.zarr", path)


# ---------------------------------------------------------------- the sharded probe


@pytest.fixture(scope="module")
def probe_args(tmp_path_factory, tiny_teacher_dir) -> list[str]:
    """`tinyonn probe` options: the tiny teacher, 24 builtin examples in a JSONL file, 6 chunks of 4."""
    data = tmp_path_factory.mktemp("probe_data") / "probe.jsonl"
    examples = load_probe_set("builtin", "train")[::800][:24]
    data.write_text("".join(json.dumps({"messages": list(e.messages), "category": e.category}) + "\n" for e in examples))
    return ["probe", "--teacher", str(tiny_teacher_dir), "--data", str(data), "--chunk-samples", "4",
            "--batch-size", "4", "--max-length", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def one_process_store(tmp_path_factory, probe_args) -> Path:
    from tinyonn.cli import main

    out = tmp_path_factory.mktemp("one_process") / "scores.zarr"
    assert main([*probe_args, "--out", str(out)]) == 0
    return out


def test_torchrun_probe_writes_the_one_process_store(probe_args, one_process_store, tmp_path):
    from tests.test_store import assert_stores_equal

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "tinyonn", *probe_args, "--out", str(tmp_path / "scores.zarr")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert_stores_equal(one_process_store, tmp_path / "scores.zarr")
    chunks = [json.loads(line) for line in (tmp_path / "probe_log.jsonl").read_text().splitlines()]
    assert sorted((c["rank"], c["chunk"]) for c in chunks) == [(0, 0), (0, 2), (0, 4), (1, 1), (1, 3), (1, 5)]


def test_killed_two_rank_probe_resumes_to_the_one_process_store(probe_args, one_process_store, tmp_path):
    from tests.test_store import assert_stores_equal
    from tinyonn.cli import main
    from tinyonn.store.zarr_store import ScoreStoreWriter

    out = tmp_path / "scores.zarr"
    command = [*probe_args, "--out", str(out)]

    def killed(rank: int) -> None:
        if rank == 1:  # dies (kill -9: no handler, no clean-up) before writing its second chunk
            write_chunk, written = ScoreStoreWriter.write_chunk, []

            def write_once(self, k, stats):
                if written:
                    os._exit(9)
                written.append(k)
                write_chunk(self, k, stats)

            ScoreStoreWriter.write_chunk = write_once
        assert main(command) == 0

    codes = run_ranks(killed, 2, expect_failure=True)
    assert codes[1] == 9 and codes[0] != 0  # rank 0 cannot finish without rank 1
    assert json.loads((out / "progress.rank-1.json").read_text())["complete_chunks"] == [1]
    assert not json.loads((out / "zarr.json").read_text())["attributes"]["finalized"]
    done = {k for path in out.glob("progress*.json") for k in json.loads(path.read_text())["complete_chunks"]}
    logged = len((tmp_path / "probe_log.jsonl").read_text().splitlines())

    def resume(rank: int) -> None:
        assert main(command) == 0

    run_ranks(resume, 2)
    assert_stores_equal(one_process_store, out)
    resumed = [json.loads(line) for line in (tmp_path / "probe_log.jsonl").read_text().splitlines()[logged:]]
    assert sorted(c["chunk"] for c in resumed) == sorted(set(range(6)) - done)  # only the chunks left, once each


# ---------------------------------------------------------------- training


def test_ddp_training_matches_one_process(teacher, tiny_tokenizer, tmp_path):
    student = assemble(teacher, full_plan(2, 128, 8, groups=2, seed=0), RoutingConfig(mode="all"))
    examples = load_probe_set("builtin", "train")[::300]
    config = TrainConfig(data=DataConfig(max_length=64, batch_size=4), micro_batch_tokens=None, grad_accum=3,
                         max_steps=6, max_tokens=None, lr=3e-3, router_lr=1e-2, warmup_steps=1, z_loss_weight=1e-3,
                         progress=False, phase1=Phase1Config(steps=2, min_k_fraction=0.25),
                         phase2=Phase2Config(routing="budget", active_fraction=0.5), checkpoint_every=0,
                         validation_per_category=0, device="cpu")
    one = train(copy.deepcopy(student), teacher, tiny_tokenizer, examples, config, tmp_path / "one")
    run_ranks(lambda rank: train(student, teacher, tiny_tokenizer, examples, config, tmp_path / "ddp"), 2)

    logs = {name: [json.loads(line) for line in path.read_text().splitlines()]
            for name, path in (("one", tmp_path / "one" / "log.jsonl"), ("ddp", tmp_path / "ddp" / "log.jsonl"),
                               ("rank1", tmp_path / "ddp" / "ranks" / "log-rank1.jsonl"))}
    assert len(logs["one"]) == len(logs["ddp"]) == len(logs["rank1"]) == 6
    assert [r["phase"] for r in logs["ddp"]] == [1, 1, 2, 2, 2, 2]
    for mine, theirs in zip(logs["ddp"], logs["one"]):
        assert {k: mine[k] for k in EXACT} == {k: theirs[k] for k in EXACT}
        for key in NUMERIC:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (mine["step"], key)
        assert mine["surprise_mean"] == pytest.approx(theirs["surprise_mean"], rel=1e-5, abs=1e-7)
    assert all(a[k] == b[k] for a, b in zip(logs["ddp"], logs["rank1"]) for k in EXACT + NUMERIC)
    assert one["steps"] == 6 and (tmp_path / "ddp" / "summary.json").is_file()
    assert not (tmp_path / "ddp" / "ranks" / "checkpoints").exists()
    ours = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    reference = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    start = {name: value.detach() for name, value in student.state_dict().items()}
    assert ours.keys() == reference.keys()
    moved = max(float((reference[key] - start[key]).abs().max()) for key in reference if reference[key].numel())
    assert moved > 1e-3  # it trained
    for key in ours:  # the same update up to float sum order (Adam divides tiny gradients by their own size)
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=1e-3 * moved, msg=key)


def test_one_process_stages_refuse_a_torchrun_launch(monkeypatch, tmp_path):
    from tinyonn import TinyONNError
    from tinyonn.pipeline import RunConfig, cluster_stage, run_pipeline

    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    config = RunConfig(run="r", runs_dir=str(tmp_path))
    with pytest.raises(TinyONNError, match="the cluster stage runs in one process: start it without torchrun"):
        cluster_stage(config)
    with pytest.raises(TinyONNError, match=r"tinyonn run \(the whole pipeline\) runs in one process"):
        run_pipeline(config)
    assert not (tmp_path / "r" / "plan").exists() and not (tmp_path / "r" / "scores.zarr").exists()
