"""Memory-mapped reads (both per-sample codecs), checksums, dimension names, xarray."""

from __future__ import annotations

import mmap
import warnings

import numpy as np
import pytest
import zarr

import tinyonn.store.mapped as mapped_module
from tests.test_store import (CATEGORIES, CHUNK, STATS, UNIT_CHUNK, N, U, assert_stores_equal, full_store, make_data,
                               open_writer, write_chunks)
from tinyonn.store.mapped import MappedArray, MappedReadError
from tinyonn.store.scores import ScoreConfig, summary_score_fn
from tinyonn.store.zarr_store import ScoreStore, ScoreStoreError

SELECTIONS = [
    np.s_[:], np.s_[...], np.s_[:, 7], np.s_[3], np.s_[-1, -2], np.s_[5:37], np.s_[10:44, 3:29],
    np.s_[::3, 5:37:4], np.s_[[0, 17, 16, 49, 3], :], np.s_[:, [39, 0, 16, 15]],
    np.s_[np.arange(N) % 3 == 0, :], np.s_[..., 33], np.s_[40:50, 30:40], np.s_[7:7],
]
NEGATIVE_STEPS = [np.s_[::-2, 1], np.s_[49:0:-5], np.s_[30:2:-7, ::-3]]  # zarr refuses these; numpy's answer


@pytest.fixture(scope="module", params=["zstd", "none"])
def stores(request, tmp_path_factory):
    data = make_data()
    path = tmp_path_factory.mktemp(f"store_{request.param}") / "s.zarr"
    full_store(path, data, per_sample_codec=request.param)
    return request.param, path, data


def test_mmap_and_zarr_reads_are_identical(stores):
    codec, path, data = stores
    plain, mapped = ScoreStore.open(path), ScoreStore.open(path, mmap=True)
    assert plain.per_sample_codec == mapped.per_sample_codec == codec
    for name in STATS:
        a, b = plain.array(f"per_sample/{name}"), mapped.array(f"per_sample/{name}")
        assert isinstance(a, zarr.Array)
        assert isinstance(b, MappedArray) == (codec == "none") == mapped.is_mapped(f"per_sample/{name}")
        assert b.shape == a.shape and b.chunks == a.chunks and b.dtype == a.dtype
        expected = data[name].astype(np.float16)
        for key in SELECTIONS:
            try:
                expected[key]
            except IndexError:  # a column past the 6 heads
                with pytest.raises(IndexError):
                    b[key]
                continue
            x, y = np.asarray(a[key]), np.asarray(b[key])
            assert x.dtype == y.dtype and x.shape == y.shape == expected[key].shape, (name, key)
            assert x.tobytes() == y.tobytes() == expected[key].tobytes(), (name, key)
        if codec == "none":
            for key in NEGATIVE_STEPS[:2] if name.startswith("head") else NEGATIVE_STEPS:
                assert b[key].tobytes() == expected[key].tobytes(), (name, key)
        rows, cols = np.array([1, 20, 2, 48]), np.array([30, 0, 17]) % b.shape[1]
        np.testing.assert_array_equal(b.get_orthogonal_selection((rows, cols)), a.get_orthogonal_selection((rows, cols)))
        np.testing.assert_array_equal(np.asarray(b), expected)
    # arrays stored compressed go through zarr either way
    assert isinstance(mapped.array("samples/loss"), zarr.Array) and not mapped.is_mapped("summary/act")
    np.testing.assert_array_equal(mapped.summary_of("act"), plain.summary_of("act"))
    assert (f"yes ({'uncompressed, memory-mappable' if codec == 'none' else 'zstd'})"
            in mapped.summary(file=None))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    data = make_data()
    path = tmp_path_factory.mktemp("raw") / "s.zarr"
    full_store(path, data, per_sample_codec="none")
    return path, data


def test_uncompressed_layout_is_unit_major_and_checksummed(raw):
    path, data = raw
    group = zarr.open_group(path, mode="r")
    act = group["per_sample/act"]
    assert [type(c).__name__ for c in act.metadata.codecs] == ["TransposeCodec", "BytesCodec", "Crc32cCodec"]
    # the other arrays keep the default codecs
    assert [type(c).__name__ for c in group["partials/act"].metadata.codecs] == ["BytesCodec", "BloscCodec",
                                                                                  "Crc32cCodec"]
    raw = np.fromfile(path / "per_sample" / "act" / "c" / "1" / "2", dtype="<f2")
    assert raw.size == CHUNK * UNIT_CHUNK + 2  # values + 4 checksum bytes; the edge chunk is full size
    block = raw[:-2].reshape(UNIT_CHUNK, CHUNK)  # unit-major: one unit's samples are contiguous
    np.testing.assert_array_equal(block[:U - 2 * UNIT_CHUNK].T, data["act"][16:32, 32:].astype(np.float16))
    assert np.isnan(block[U - 2 * UNIT_CHUNK:]).all()
    chunk_files = [p for p in path.rglob("*") if p.is_file() and "c" in p.relative_to(path).parts]
    assert ScoreStore.open(path, mmap=True).verify() == len(chunk_files)  # every chunk carries a checksum


def test_column_read_maps_one_chunk_per_sample_chunk(raw, monkeypatch):
    path, data = raw
    opened = []
    original = mapped_module.mmap.mmap

    def logged(fd, size, *args, **kwargs):
        opened.append(size)
        return original(fd, size, *args, **kwargs)

    monkeypatch.setattr(mapped_module.mmap, "mmap", logged)
    column = ScoreStore.open(path, mmap=True).array("per_sample/grad")[:, 21]
    np.testing.assert_array_equal(column, data["grad"][:, 21].astype(np.float16))
    assert len(opened) == 4  # ceil(50 / 16) sample chunks, one unit chunk


def test_checksums_still_hold(tmp_path):
    data = make_data()
    path = tmp_path / "s.zarr"
    full_store(path, data, per_sample_codec="none")
    store = ScoreStore.open(path, mmap=True)
    assert store.verify() > 0
    chunk = path / "per_sample" / "grad" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[10] ^= 0x01
    chunk.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):  # zarr checks every chunk it decodes
        ScoreStore.open(path).array("per_sample/grad")[16:32, 0:16]
    with pytest.raises(ScoreStoreError, match=r"grad/c/1/0: crc32c checksum does not match"):
        store.verify()
    assert store.verify(["per_sample/act"]) > 0
    # a mapped read does not check (it would have to read the whole chunk), but a wrong size is caught
    store.array("per_sample/grad")[16:32, 0:16]
    chunk.write_bytes(bytes(raw[:-7]))
    with pytest.raises(MappedReadError, match="bytes, expected"):
        store.array("per_sample/grad")[16:32, 0:16]


def test_unwritten_chunks_read_as_nan_and_resume_is_bitwise(tmp_path):
    data = make_data()
    full_store(tmp_path / "full.zarr", data, per_sample_codec="none")
    path = tmp_path / "resumed.zarr"
    writer = open_writer(path, data, per_sample_codec="none")
    write_chunks(writer, data, [0, 2])
    partial = ScoreStore.open(path, mmap=True).array("per_sample/act")
    assert isinstance(partial, MappedArray)
    assert np.isnan(partial[16:32]).all()
    np.testing.assert_array_equal(partial[30:40], ScoreStore.open(path).array("per_sample/act")[30:40])
    with pytest.raises(ScoreStoreError, match="per_sample_codec differs"):
        open_writer(path, data, per_sample_codec="zstd")
    writer = open_writer(path, data, per_sample_codec="none")
    write_chunks(writer, data, writer.pending_chunks())
    writer.finalize(summary_score_fn(ScoreConfig()), score_attrs={"formula": "pidiff"})
    assert_stores_equal(tmp_path / "full.zarr", path)
    with pytest.raises(ScoreStoreError, match="per_sample_codec must be one of zstd, none"):
        open_writer(tmp_path / "x.zarr", data, per_sample_codec="lz4")


def test_every_array_has_dimension_names(stores):
    codec, path, _ = stores
    group = zarr.open_group(path, mode="r")
    arrays = {name: node for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}
    for name, array in arrays.items():
        dims = array.metadata.dimension_names
        assert dims is not None and len(dims) == array.ndim and all(dims), name
    assert arrays["per_sample/act"].metadata.dimension_names == ("sample", "unit")
    assert arrays["per_sample/head_grad"].metadata.dimension_names == ("sample", "head")
    assert arrays["summary/by_category/grad"].metadata.dimension_names == ("category", "unit")
    assert arrays["partials/count"].metadata.dimension_names == ("chunk", "category")
    assert arrays["samples/loss"].metadata.dimension_names == ("sample",)


def test_xarray_opens_the_store_labelled(stores):
    xr = pytest.importorskip("xarray")
    codec, path, data = stores
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warnings either
        per_sample = xr.open_zarr(path, group="per_sample", consolidated=False)
        by_category = xr.open_zarr(path, group="summary/by_category", consolidated=False)
        tree = xr.open_datatree(path, engine="zarr", consolidated=False)
    assert per_sample["act"].dims == ("sample", "unit") and per_sample["head_out"].dims == ("sample", "head")
    assert dict(per_sample.sizes) == {"sample": N, "unit": U, "head": 6}
    assert {"sample_category", "unit_layer", "unit_index", "head_layer", "head_index"} <= set(per_sample.coords)
    names = np.asarray(CATEGORIES)[data["category"]]
    assert list(per_sample["sample_category"].values) == list(names)
    np.testing.assert_array_equal(per_sample["unit_layer"].values, np.repeat([0, 1], U // 2))
    np.testing.assert_array_equal(per_sample["grad"].values, data["grad"].astype(np.float16))
    # labelled selection and grouping with no Tiny-ONN code
    layer1 = per_sample["act"].where(per_sample["unit_layer"] == 1, drop=True)
    assert layer1.sizes["unit"] == U // 2
    means = per_sample["act"].astype("float64").groupby("sample_category").mean()
    np.testing.assert_allclose(means.sel(sample_category="math").values,
                               by_category["act"].sel(category="math").values, rtol=2e-3)
    assert list(by_category["category"].values) == CATEGORIES and by_category["act"].dims == ("category", "unit")
    assert tree["summary"]["score"].dims == ("unit",) and tree["samples"]["loss"].dims == ("sample",)
    np.testing.assert_array_equal(tree["units"]["layer"].values, np.repeat([0, 1], U // 2))


def test_mapped_array_errors(stores):
    codec, path, _ = stores
    store = ScoreStore.open(path, mmap=True)
    if codec != "none":
        with pytest.raises(MappedReadError, match="cannot be memory-mapped"):
            MappedArray(zarr.open_group(path, mode="r")["per_sample/act"], path / "per_sample" / "act")
        return
    act = store.array("per_sample/act")
    with pytest.raises(IndexError, match="out of bounds"):
        act[N]
    with pytest.raises(IndexError, match="at most one index array"):
        act[[0, 1], [0, 1]]
    with pytest.raises(IndexError, match="too many indices"):
        act[0, 0, 0]
    assert "MappedArray(" in repr(act) and act.ndim == 2 and len(act) == N and act.nbytes == N * U * 2
    assert mmap.PAGESIZE > 0
