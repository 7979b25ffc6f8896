"""Reliability of the store and the run folder (issue #15, defects 1, 4, 5, 6): damage is named, never
read as data; --overwrite deletes only what Tiny-ONN wrote; stale stage outputs are refused; one
writer per run folder."""

from __future__ import annotations

import os
import threading

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
