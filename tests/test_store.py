"""The score store: layout, summaries, bitwise resume, lazy reads, checksums, clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

import tinyonn.store.zarr_store as store_module
from tinyonn.store.scores import ScoreConfig, summary_score_fn
from tinyonn.store.zarr_store import ChunkStats, ScoreStore, ScoreStoreError, ScoreStoreNotFoundError, ScoreStoreWriter

N, U, H, CHUNK, UNIT_CHUNK = 50, 40, 6, 16, 16
CATEGORIES = ["math", "code", "chat", "unused"]  # "unused" has no samples: its by-category means are NaN
STATS = ("act", "freq", "grad", "taylor", "head_out", "head_grad")


def make_data(seed: int = 0, n_heads: int = H) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "act": rng.gamma(2.0, 0.5, (N, U)).astype(np.float32),
        "freq": rng.random((N, U)).astype(np.float32),
        "grad": (rng.exponential(1.0, (N, U)) * 1e-2).astype(np.float32),
        "taylor": rng.gamma(1.5, 0.1, (N, U)).astype(np.float32),
        "head_out": rng.random((N, n_heads)).astype(np.float32),
        "head_grad": rng.random((N, n_heads)).astype(np.float32),
        "loss": rng.gamma(3.0, 0.7, N).astype(np.float32),
        "n_tokens": rng.integers(1, 200, N).astype(np.int32),
        "category": rng.integers(0, 3, N).astype(np.int16),
        "down_norm": rng.random(U).astype(np.float32) + 0.5,
    }


def chunk_stats(data: dict[str, np.ndarray], start: int, stop: int) -> ChunkStats:
    return ChunkStats(**{name: data[name][start:stop] for name in STATS + ("loss", "n_tokens")})


def open_writer(path, data, *, fingerprint="run-a", per_sample=True, n_heads=H, chunk_samples=CHUNK,
                **kw) -> ScoreStoreWriter:
    return ScoreStoreWriter.open(
        path,
        units_layer=np.repeat([0, 1], U // 2), units_index=np.tile(np.arange(U // 2), 2),
        heads_layer=np.repeat([0, 1], n_heads // 2), heads_index=np.tile(np.arange(n_heads // 2), 2),
        categories=CATEGORIES, sample_category=data["category"], source_index=np.arange(N) * 3 + 7,
        chunk_samples=chunk_samples, per_sample=per_sample, unit_chunk=UNIT_CHUNK, units_down_norm=data["down_norm"],
        attrs={"fingerprint": fingerprint, "teacher": {"name": "tiny-teacher"}, "config": {"threshold": 0.1}},
        **kw)


def write_chunks(writer: ScoreStoreWriter, data, chunks) -> None:
    for k in chunks:
        writer.write_chunk(k, chunk_stats(data, *writer.chunk_range(k)))


def full_store(path, data, **kw) -> ScoreStore:
    writer = open_writer(path, data, **kw)
    write_chunks(writer, data, writer.pending_chunks())
    return writer.finalize(summary_score_fn(ScoreConfig()), score_attrs={"formula": "pidiff"})


def all_arrays(path) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return {name: np.asarray(node[...]) for name, node in group.members(max_depth=None)
            if isinstance(node, zarr.Array)}


def assert_stores_equal(a, b) -> None:
    arrays_a, arrays_b = all_arrays(a), all_arrays(b)
    assert sorted(arrays_a) == sorted(arrays_b)
    for name in arrays_a:
        x, y = arrays_a[name], arrays_b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        # bitwise: compare the raw bytes (NaN payloads included), not just values
        assert x.tobytes() == y.tobytes(), name
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name
    assert dict(zarr.open_group(a, mode="r").attrs) == dict(zarr.open_group(b, mode="r").attrs)


def test_layout_chunks_and_creation_arrays(tmp_path):
    data = make_data()
    writer = open_writer(tmp_path / "s.zarr", data)
    assert writer.n_chunks == 4
    assert [writer.chunk_range(k) for k in range(4)] == [(0, 16), (16, 32), (32, 48), (48, 50)]
    assert writer.pending_chunks() == [0, 1, 2, 3] and writer.completed_chunks() == set()
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    assert group["per_sample/grad"].shape == (N, U) and group["per_sample/grad"].chunks == (CHUNK, UNIT_CHUNK)
    assert group["per_sample/grad"].dtype == np.float16
    assert group["per_sample/head_out"].shape == (N, H)
    assert group["partials/act"].shape == (4, 4, U) and group["partials/act"].chunks == (1, 4, UNIT_CHUNK)
    assert group["partials/count"].shape == (4, 4)
    assert group["samples/category"].chunks == (CHUNK,)
    np.testing.assert_array_equal(group["samples/category"][:], data["category"])
    np.testing.assert_array_equal(group["samples/source_index"][:], np.arange(N) * 3 + 7)
    assert group["samples/source_index"].dtype == np.int64
    assert group.attrs["finalized"] is False and group.attrs["complete_chunks"] == []
    assert group.attrs["teacher"] == {"name": "tiny-teacher"}
    codecs = [type(c).__name__ for c in group["per_sample/act"].metadata.codecs]
    assert codecs == ["BytesCodec", "BloscCodec", "Crc32cCodec"]
    with pytest.raises(ScoreStoreError, match="ChunkStats.grad has shape"):
        bad = chunk_stats(data, 0, 16)
        writer.write_chunk(0, ChunkStats(**{**bad.__dict__, "grad": bad.grad[:, :5]}))
    with pytest.raises(ScoreStoreError, match="chunk 4 out of range"):
        writer.chunk_range(4)


def test_summaries_match_numpy(tmp_path):
    data = make_data()
    store = full_store(tmp_path / "s.zarr", data)
    assert store.finalized and store.n_samples == N and store.n_units == U and store.n_heads == H
    assert store.categories == CATEGORIES and store.has_per_sample
    cats = data["category"]
    for name in STATS:
        x = data[name].astype(np.float64)
        np.testing.assert_allclose(store.summary_of(name), x.mean(axis=0), rtol=1e-6)
        assert store.summary_of(name).dtype == np.float32
        by_cat = store.by_category(name)
        for c, cat in enumerate(CATEGORIES[:3]):
            np.testing.assert_allclose(by_cat[cat], x[cats == c].mean(axis=0), rtol=1e-6)
        assert np.isnan(by_cat["unused"]).all()
    # per-sample arrays are exactly the float16 cast of the inputs
    for name in STATS:
        np.testing.assert_array_equal(store.array(f"per_sample/{name}")[:], data[name].astype(np.float16))
    np.testing.assert_array_equal(store.array("samples/loss")[:], data["loss"])
    np.testing.assert_array_equal(store.array("samples/n_tokens")[:], data["n_tokens"])
    layer, index = store.units()
    assert layer.dtype == np.int16 and index.dtype == np.int32
    np.testing.assert_array_equal(layer, np.repeat([0, 1], 20))
    np.testing.assert_array_equal(store.heads()[1], [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(store.down_norm(), data["down_norm"])
    np.testing.assert_array_equal(store.array("summary/by_category/count")[:], [*np.bincount(cats, minlength=3), 0])
    # the stored score is the score function applied to the float32 summaries
    expected = summary_score_fn(ScoreConfig())({n: store.summary_of(n) for n in ("act", "freq", "grad", "taylor")})
    np.testing.assert_array_equal(store.summary_of("score"), expected)
    assert store.attrs["formula"] == "pidiff" and store.attrs["complete_chunks"] == [0, 1, 2, 3]
    assert store.category_counts() == {c: int((cats == i).sum()) for i, c in enumerate(CATEGORIES)}

    # the same through plain zarr
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    np.testing.assert_allclose(group["summary/grad"][:], data["grad"].astype(np.float64).mean(axis=0), rtol=1e-6)
    assert group["summary/by_category/act"].shape == (4, U)
    assert group.attrs["finalized"] is True and group.attrs["n_samples"] == N
    assert group.attrs["categories"] == CATEGORIES
    assert not (tmp_path / "s.zarr" / "progress.json").exists()  # finalize moved progress into the attrs


def test_resume_is_bitwise_equal(tmp_path):
    data = make_data()
    full_store(tmp_path / "full.zarr", data)

    writer = open_writer(tmp_path / "resumed.zarr", data)
    write_chunks(writer, data, [0, 2])
    del writer
    writer = open_writer(tmp_path / "resumed.zarr", data)
    assert writer.completed_chunks() == {0, 2} and writer.pending_chunks() == [1, 3]
    write_chunks(writer, data, writer.pending_chunks())
    writer.finalize(summary_score_fn(ScoreConfig()), score_attrs={"formula": "pidiff"})
    assert_stores_equal(tmp_path / "full.zarr", tmp_path / "resumed.zarr")


def test_crash_mid_chunk_is_overwritten_on_resume(tmp_path, monkeypatch):
    data = make_data()
    full_store(tmp_path / "full.zarr", data)
    path = tmp_path / "crashed.zarr"
    writer = open_writer(path, data)
    write_chunks(writer, data, [0])

    # chunk 1: every array gets garbage, then the process "dies" before the chunk is marked complete
    garbage = {k: (np.full_like(v, 1e4) if k not in ("category", "down_norm") else v) for k, v in data.items()}

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(store_module, "_write_progress", crash)
    with pytest.raises(RuntimeError, match="killed"):
        writer.write_chunk(1, chunk_stats(garbage, 16, 32))
    monkeypatch.undo()
    del writer
    assert float(zarr.open_group(path, mode="r")["per_sample/act"][20, 0]) == 1e4  # garbage is on disk

    writer = open_writer(path, data)
    assert writer.pending_chunks() == [1, 2, 3]
    write_chunks(writer, data, writer.pending_chunks())
    writer.finalize(summary_score_fn(ScoreConfig()), score_attrs={"formula": "pidiff"})
    assert_stores_equal(tmp_path / "full.zarr", path)


def test_fingerprint_mismatch_and_overwrite(tmp_path):
    data = make_data()
    path = tmp_path / "s.zarr"
    write_chunks(open_writer(path, data), data, [0])
    with pytest.raises(ScoreStoreError, match=r"s\.zarr.*another run.*overwrite=True"):
        open_writer(path, data, fingerprint="run-b")
    writer = open_writer(path, data, fingerprint="run-b", overwrite=True)
    assert writer.pending_chunks() == [0, 1, 2, 3]
    assert zarr.open_group(path, mode="r").attrs["fingerprint"] == "run-b"
    # same fingerprint but another chunk size: the fingerprint did not cover it
    with pytest.raises(ScoreStoreError, match="chunk_samples differs"):
        open_writer(path, data, fingerprint="run-b", chunk_samples=8)
    # refuses to delete something that is not a zarr store
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ScoreStoreError, match="not a Zarr"):
        open_writer(other, data, overwrite=True)
    assert (other / "keep.txt").exists()


def test_finalize_with_missing_chunks_names_them(tmp_path):
    data = make_data()
    writer = open_writer(tmp_path / "s.zarr", data)
    write_chunks(writer, data, [0, 2])
    with pytest.raises(ScoreStoreError, match=r"2 of 4 chunks are not written: 1, 3"):
        writer.finalize()
    partial = ScoreStore.open(tmp_path / "s.zarr")
    with pytest.raises(ScoreStoreError, match=r"not finalized \(2 of 4 chunks written\)"):
        partial.summary_of("act")
    text = partial.summary(file=None)
    assert "2/4 complete, NOT finalized" in text and "    0      20     3           -" in text
    # rows of finished chunks are readable; unwritten rows are NaN
    assert np.isnan(partial.array("per_sample/act")[16:32]).all()
    np.testing.assert_array_equal(partial.array("per_sample/act")[32:48], data["act"][32:48].astype(np.float16))


def test_finalized_store_is_returned_as_is(tmp_path):
    data = make_data()
    path = tmp_path / "s.zarr"
    full_store(path, data)
    before = all_arrays(path)
    writer = open_writer(path, data)
    assert writer.finalized and writer.pending_chunks() == []
    with pytest.raises(ScoreStoreError, match="finalized"):
        writer.write_chunk(0, chunk_stats(data, 0, 16))
    store = writer.finalize(summary_score_fn(ScoreConfig(method="random")))
    np.testing.assert_array_equal(store.summary_of("score"), before["summary/score"])


def test_slicing_reads_only_the_touched_chunk(tmp_path, monkeypatch):
    data = make_data()
    full_store(tmp_path / "s.zarr", data)
    store = ScoreStore.open(tmp_path / "s.zarr")
    grad = store.array("per_sample/grad")
    assert grad.chunks == (16, 16) and grad.nchunks == 4 * 3

    keys: list[str] = []
    original_get = LocalStore.get

    async def logged_get(self, key, *args, **kwargs):
        keys.append(key)
        return await original_get(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get", logged_get)
    block = grad[0:16, 0:8]
    np.testing.assert_array_equal(block, data["grad"][0:16, 0:8].astype(np.float16))
    assert keys == ["per_sample/grad/c/0/0"]
    keys.clear()
    grad[40:50, 20:30]
    assert sorted(keys) == ["per_sample/grad/c/2/1", "per_sample/grad/c/3/1"]


def test_corrupted_chunk_fails_its_checksum(tmp_path):
    data = make_data()
    path = tmp_path / "s.zarr"
    full_store(path, data)
    chunk_file = path / "per_sample" / "grad" / "c" / "1" / "0"
    raw = bytearray(chunk_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    chunk_file.write_bytes(bytes(raw))
    grad = ScoreStore.open(path).array("per_sample/grad")
    with pytest.raises(ValueError, match="checksum"):
        grad[16:32, 0:16]
    np.testing.assert_array_equal(grad[0:16, 0:16], data["grad"][0:16, 0:16].astype(np.float16))


def test_aggregates_only_without_heads(tmp_path):
    data = make_data(seed=1, n_heads=0)
    path = tmp_path / "agg.zarr"
    store = full_store(path, data, per_sample=False, n_heads=0)
    group = zarr.open_group(path, mode="r")
    assert "per_sample" not in group and "heads" not in group
    assert "partials/head_out" not in group and "summary/head_out" not in group
    assert not store.has_per_sample and store.n_heads == 0
    np.testing.assert_allclose(store.summary_of("freq"), data["freq"].astype(np.float64).mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(store.array("samples/loss")[:], data["loss"])
    assert "no (aggregates only)" in store.summary(file=None)
    with pytest.raises(ScoreStoreError, match="no array 'per_sample/act'"):
        store.array("per_sample/act")


def test_summary_table(tmp_path):
    data = make_data()
    store = full_store(tmp_path / "s.zarr", data)
    out = io.StringIO()
    text = store.summary(file=out)
    assert out.getvalue() == text + "\n"
    lines = text.splitlines()
    assert str(tmp_path / "s.zarr") in lines[0] and "tiny-teacher" in lines[1]
    assert "math: " in text and "unused: 0" in text and "per-sample   yes" in text and "4/4 complete" in text
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["layer", "units", "heads"])
    assert lines[header].split()[3:] == ["mean_act", "mean_freq", "mean_grad", "mean_score"]
    rows = [line.split() for line in lines[header + 1:]]
    assert [r[:3] for r in rows] == [["0", "20", "3"], ["1", "20", "3"], ["all", "40", "6"]]
    layer0_act = data["act"][:, :20].astype(np.float64).mean()
    assert float(rows[0][3]) == pytest.approx(layer0_act, rel=1e-3)


def test_open_errors(tmp_path):
    with pytest.raises(ScoreStoreNotFoundError, match="no score store"):
        ScoreStore.open(tmp_path / "missing.zarr")
    zarr.open_group(tmp_path / "plain.zarr", mode="w").attrs["x"] = 1
    with pytest.raises(ScoreStoreError, match="not a Tiny-ONN score store"):
        ScoreStore.open(tmp_path / "plain.zarr")
    data = make_data()
    with pytest.raises(ScoreStoreError, match="fingerprint"):
        ScoreStoreWriter.open(tmp_path / "x.zarr", units_layer=[0], units_index=[0], heads_layer=[], heads_index=[],
                              categories=["a"], sample_category=[0], source_index=[0], chunk_samples=1,
                              per_sample=False, attrs={})
    with pytest.raises(ScoreStoreError, match="may not set n_samples"):
        open_writer(tmp_path / "y.zarr", data).finalize(score_attrs={"n_samples": 3})
    with pytest.raises(ScoreStoreError, match=r"sample_category\[0\] = 5"):
        ScoreStoreWriter.open(tmp_path / "z.zarr", units_layer=[0], units_index=[0], heads_layer=[], heads_index=[],
                              categories=["a"], sample_category=[5], source_index=[0], chunk_samples=1,
                              per_sample=False, attrs={"fingerprint": "f"})
