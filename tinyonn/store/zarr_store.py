"""The score store: the probe's per-sample × per-unit statistics as a resumable Zarr v3 group.

Layout (N samples, U units, H heads, C categories, K = ceil(N / chunk_samples) probe chunks)::

    per_sample/{act,freq,grad,taylor}   [N, U] float16   only with per_sample=True
    per_sample/{head_out,head_grad}     [N, H] float16   only with per_sample=True and H > 0
    samples/category [N] int16 (codes into attrs["categories"]), samples/source_index [N] int64,
    samples/n_tokens [N] int32, samples/loss [N] float32
    units/layer [U] int16, units/index [U] int32, units/down_norm [U] float32 (optional)
    heads/layer [H] int16, heads/index [H] int16                        (only when H > 0)
    partials/{act,freq,grad,taylor} [K, C, U] float64, partials/{head_out,head_grad} [K, C, H]
    partials/count [K, C] int64           per probe chunk: sum over its samples of each category
    summary/{act,...} [U] float32, summary/by_category/{act,...} [C, U] float32,
    summary/by_category/count [C] int64, summary/score [U] float32    written by finalize

Every array is chunked along samples by `chunk_samples` (one zarr chunk row per probe chunk) and
along units by `unit_chunk`, compressed with Blosc/Zstd and protected by a crc32c checksum. With
`per_sample_codec="none"` the per-sample arrays are stored raw instead, unit-major inside each chunk
(zarr's transpose codec) and still checksummed, so `ScoreStore.open(path, mmap=True)` maps them and
a unit's column is one contiguous run per chunk.

Every array carries zarr v3 `dimension_names` (sample, unit, head, category, chunk) and the groups
an analysis reads hold their own coordinates (`per_sample/{sample_category,unit_layer,unit_index,
head_layer,head_index}`, `summary/{unit_layer,...}`, `summary/by_category/{category,unit_layer,...}`,
named in each array's `coordinates` attribute), so `xarray.open_zarr(path, group="per_sample")` or
`xarray.open_datatree(path, engine="zarr")` gives labelled data with no Tiny-ONN code. Each
probe chunk writes whole zarr chunks only, so a rewritten chunk never depends on what a killed run
left behind. Progress lives in `progress.json` (replaced atomically after a chunk's arrays are all
written; finalize moves it into the root attrs and deletes the file); root attrs are written at
creation and at finalize only. Several writers may write disjoint chunks at once (the ranks of a
sharded probe, `tinyonn.probe.sharded`): writer `rank` r records its chunks in
`progress.rank-<r>.json`, every reader takes the union of the progress files, and one writer
finalizes once the others are done. Partial sums are float64 in a
fixed order, so a resumed probe gives a store bitwise equal to an uninterrupted one.

Damage is never read as data (`tinyonn.store.integrity`): every chunk the writer wrote is a file
(`write_empty_chunks`), the layout and the progress record say which ones those are, and each ends
in its crc32c; a missing, truncated or corrupted chunk raises `StoreDamagedError` naming the array
and the chunk key on open (the small arrays), on every read, on resume and on finalize, and
`ScoreStore.verify()` checks the whole store. The root attrs carry `store_format`, the mark that
lets `overwrite=True` delete a store this project wrote and nothing else.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec, ZstdCodec

from tinyonn.errors import TinyONNError
from tinyonn.files import fsync_path
from tinyonn.store.integrity import (
    CheckedStore,
    ChunkManifest,
    ScoreStoreError,
    StoreDamagedError,
    find_missing,
    verify_array,
)
from tinyonn.store.mapped import MappedArray, chunk_format

SCHEMA_VERSION = 1
UNIT_STATS = ("act", "freq", "grad", "taylor")
"""Per-unit statistics, each [n, U]."""
HEAD_STATS = ("head_out", "head_grad")
"""Per-head statistics, each [n, H]."""
PROGRESS_FILE = "progress.json"
RANK_PROGRESS = "progress.rank-{rank}.json"
"""The progress file of writer `rank` (one of several writing disjoint chunks)."""
PER_SAMPLE_CODECS = ("zstd", "none")
"""How the per-sample arrays are stored: Blosc/Zstd, or raw unit-major chunks (memory-mappable)."""
STORE_FORMAT = "tinyonn-score-store"
"""The root attr `store_format` of every store this project writes (what `overwrite` looks for)."""
RESERVED_ATTRS = ("schema_version", "store_format", "n_samples", "n_units", "n_heads", "chunk_samples",
                  "unit_chunk", "per_sample", "per_sample_codec", "categories", "complete_chunks", "finalized")
"""Root attrs the store owns; caller attrs may not use these names."""
PROBED_ARRAYS = frozenset(
    [f"per_sample/{name}" for name in UNIT_STATS + HEAD_STATS] + [f"partials/{name}" for name in UNIT_STATS + HEAD_STATS]
    + ["partials/count", "samples/n_tokens", "samples/loss"])
"""Arrays written one probe chunk at a time (chunk row k = probe chunk k); every other array is
written whole, at creation or at finalize."""

_SUMMARY_READ_BYTES = 256 << 20
"""How many bytes of partials finalize reads at a time."""


class ScoreStoreNotFoundError(TinyONNError, FileNotFoundError):
    """No score store at the given path."""


@dataclass(frozen=True)
class ChunkStats:
    """The probe's statistics for one chunk: rows are samples start..stop in order (n = stop - start).

    Float fields are float32 (other float dtypes are cast); `n_tokens` is integer.
    """

    act: np.ndarray
    """[n, U] mean |h| over the sample's response tokens."""
    freq: np.ndarray
    """[n, U] fraction of response tokens where the unit fires."""
    grad: np.ndarray
    """[n, U] exact per-sample gradient norm of unit j's parameters, one L2 norm over all three parts
    (not squared): sqrt(‖dl_i/dW_gate[j, :]‖² + ‖dl_i/dW_up[j, :]‖² + ‖dl_i/dW_down[:, j]‖²)."""
    taylor: np.ndarray
    """[n, U] |sum_t h * dl/dh|."""
    head_out: np.ndarray
    """[n, H] mean L2 norm of the head's output (its slice of o_proj's input) over the response tokens
    (H may be 0)."""
    head_grad: np.ndarray
    """[n, H] exact per-sample gradient norm (L2, not squared) of the head's o_proj columns, ‖dl_i/dW_o[:, head]‖."""
    loss: np.ndarray
    """[n] mean response NLL."""
    n_tokens: np.ndarray
    """[n] response tokens."""


# --------------------------------------------------------------------------------------------
# Writing


class ScoreStoreWriter:
    """Creates or resumes a score store and writes it one probe chunk at a time (one writer, or
    several writing disjoint chunks, each with its `rank`)."""

    def __init__(self, path: Path, layout: _Layout, complete: set[int], finalized: bool, rank: int | None = None):
        """Use `ScoreStoreWriter.open`."""
        self.path = path
        self._layout = layout
        self._complete = set(complete)
        self._finalized = finalized
        self._progress_file = PROGRESS_FILE if rank is None else RANK_PROGRESS.format(rank=int(rank))
        self.manifest = ChunkManifest(PROBED_ARRAYS, lambda: self._complete)
        self._group = _open_group(path, "r+", self.manifest)
        self._fingerprint = str(self._group.attrs["fingerprint"])

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        units_layer: Sequence[int] | np.ndarray,
        units_index: Sequence[int] | np.ndarray,
        heads_layer: Sequence[int] | np.ndarray,
        heads_index: Sequence[int] | np.ndarray,
        categories: Sequence[str],
        sample_category: Sequence[int] | np.ndarray,
        source_index: Sequence[int] | np.ndarray,
        chunk_samples: int,
        per_sample: bool,
        attrs: dict[str, Any],
        unit_chunk: int = 8192,
        units_down_norm: Sequence[float] | np.ndarray | None = None,
        overwrite: bool = False,
        per_sample_codec: str = "zstd",
        rank: int | None = None,
    ) -> ScoreStoreWriter:
        """Create the store at `path`, or resume the unfinished one there with the same fingerprint.

        `attrs` (JSON) go to the root attrs and must hold a `fingerprint` string identifying the run;
        an existing store with another fingerprint is an error unless `overwrite=True`. A finalized
        store with the same fingerprint is returned as is (every chunk complete). The attrs of the
        run that created the store are kept on resume. `per_sample_codec`: "zstd" (Blosc/Zstd) or
        "none" (raw unit-major chunks that `ScoreStore.open(path, mmap=True)` maps), both checksummed.
        `overwrite` deletes only a store this project wrote (its `store_format` mark, nothing else in
        the folder); resuming refuses a store with a missing or damaged chunk (`StoreDamagedError`).
        `rank`: this writer's number among several that write disjoint chunks of the same store at
        once (its progress goes to its own file; only one of them creates the store and finalizes).
        """
        path = Path(path)
        _check_attrs(attrs)
        layout = _Layout.build(
            units_layer=units_layer, units_index=units_index, heads_layer=heads_layer,
            heads_index=heads_index, categories=categories, sample_category=sample_category,
            source_index=source_index, chunk_samples=chunk_samples, per_sample=per_sample,
            unit_chunk=unit_chunk, units_down_norm=units_down_norm, per_sample_codec=per_sample_codec)
        fingerprint = attrs["fingerprint"]
        if path.exists() and not _is_empty_dir(path):
            if overwrite:
                _remove_store(path)
            else:
                return cls._resume(path, layout, fingerprint, rank)
        _create(path, layout, attrs)
        return cls(path, layout, set(), finalized=False, rank=rank)

    @classmethod
    def _resume(cls, path: Path, layout: _Layout, fingerprint: str, rank: int | None = None) -> ScoreStoreWriter:
        group = _open_tinyonn_group(path, mode="r+")
        stored = group.attrs.get("fingerprint")
        if stored != fingerprint:
            raise ScoreStoreError(
                f"{path}: the score store there belongs to another run (fingerprint {stored!r}, this run "
                f"{fingerprint!r}); rerun with --overwrite (API: overwrite=True) to replace it, or use another path")
        finalized = bool(group.attrs.get("finalized", False))
        complete = set(range(layout.n_chunks)) if finalized else _read_progress(path, fingerprint)
        writer = cls(path, layout, complete, finalized=finalized, rank=rank)
        layout.check_matches(writer._group, path)  # reads the creation arrays through the checked store
        _check_present(path, dict(group.attrs), writer.manifest)
        return writer

    # -- chunks

    @property
    def n_chunks(self) -> int:
        """Number of probe chunks, ceil(n_samples / chunk_samples)."""
        return self._layout.n_chunks

    def chunk_range(self, k: int) -> tuple[int, int]:
        """Samples [start, stop) of chunk k."""
        return self._layout.chunk_range(k)

    def completed_chunks(self) -> set[int]:
        """Chunks whose arrays are all written."""
        return set(self._complete)

    def pending_chunks(self) -> list[int]:
        """Chunks still to compute, in order."""
        return [k for k in range(self.n_chunks) if k not in self._complete]

    @property
    def finalized(self) -> bool:
        return self._finalized

    def write_chunk(self, k: int, stats: ChunkStats) -> None:
        """Write chunk k's per-sample rows, sample columns and partial sums, then mark it complete."""
        if self._finalized:
            raise ScoreStoreError(f"{self.path}: the store is finalized; chunk {k} cannot be rewritten")
        lay = self._layout
        start, stop = lay.chunk_range(k)
        arrays = _validate_stats(stats, stop - start, lay.n_units, lay.n_heads)
        with zarr.config.set({"array.write_empty_chunks": True}):  # every chunk written is a file
            self._write_arrays(k, start, stop, arrays)
        self._complete.add(k)
        _write_progress(self.path, self._fingerprint, self._complete, self._progress_file)

    def _write_arrays(self, k: int, start: int, stop: int, arrays: dict[str, np.ndarray]) -> None:
        lay, group = self._layout, self._group
        stat_names = UNIT_STATS + (HEAD_STATS if lay.n_heads else ())
        if lay.per_sample:
            for name in stat_names:
                group[f"per_sample/{name}"][start:stop] = arrays[name].astype(np.float16)
        group["samples/n_tokens"][start:stop] = arrays["n_tokens"]
        group["samples/loss"][start:stop] = arrays["loss"]
        cats = lay.sample_category[start:stop]
        masks = [cats == c for c in range(len(lay.categories))]
        for name in stat_names:
            group[f"partials/{name}"][k] = _category_sums(arrays[name], masks)
        group["partials/count"][k] = np.array([m.sum() for m in masks], dtype=np.int64)

    # -- finalize

    def finalize(
        self,
        score_fn: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None,
        score_attrs: dict[str, Any] | None = None,
    ) -> ScoreStore:
        """Write the summaries (means over all samples and per category) and `summary/score`.

        `score_fn` gets {"act", "freq", "grad", "taylor"[, "down_norm"]} as float32 [U] arrays
        and returns the [U] score; `score_attrs` (JSON) are merged into the root attrs. A store that
        is already finalized is returned unchanged (use `tinyonn.scores.score_store` to rescore).
        """
        if self._finalized:
            return ScoreStore.open(self.path)
        if score_attrs is not None:
            _check_attrs(score_attrs, need_fingerprint=False, what="score_attrs")
        self._complete |= _read_progress(self.path, self._fingerprint)  # other writers' chunks too
        missing = self.pending_chunks()
        if missing:
            raise ScoreStoreError(
                f"{self.path}: cannot finalize, {len(missing)} of {self.n_chunks} chunks are not written: "
                f"{_format_ids(missing)}")
        lay, group = self._layout, self._group
        counts = np.asarray(group["partials/count"][:], dtype=np.int64).sum(axis=0)
        if int(counts.sum()) != lay.n_samples:
            raise ScoreStoreError(f"{self.path}: partial counts add up to {int(counts.sum())} samples, "
                                  f"expected {lay.n_samples}; the store is damaged")
        _put(group, "summary/by_category/count", counts, chunks=counts.shape, dims=("category",))
        _put_coordinates(group, "summary", lay, sample_axis=False)
        _put_coordinates(group, "summary/by_category", lay, sample_axis=False, category_axis=True)
        means: dict[str, np.ndarray] = {}
        for name in UNIT_STATS + (HEAD_STATS if lay.n_heads else ()):
            sums = _sum_partials(group[f"partials/{name}"])
            by_category = np.full(sums.shape, np.nan)
            np.divide(sums, counts[:, None], out=by_category, where=counts[:, None] > 0)
            means[name] = (sums.sum(axis=0) / lay.n_samples).astype(np.float32)
            width = min(sums.shape[1], lay.unit_chunk)
            axis = "unit" if name in UNIT_STATS else "head"
            _put(group, f"summary/{name}", means[name], chunks=(width,), dims=(axis,),
                 attrs=_coordinates_attr(axis))
            _put(group, f"summary/by_category/{name}", by_category.astype(np.float32),
                 chunks=(len(lay.categories), width), dims=("category", axis), attrs=_coordinates_attr(axis))
        if score_fn is not None:
            inputs = score_inputs(means, lay.units_down_norm)
            score = np.asarray(score_fn(inputs), dtype=np.float32)
            if score.shape != (lay.n_units,):
                raise ScoreStoreError(f"score_fn returned shape {score.shape}, expected ({lay.n_units},)")
            _put(group, "summary/score", score, chunks=(min(lay.n_units, lay.unit_chunk),), dims=("unit",),
                 attrs=_coordinates_attr("unit"))
        final_attrs = dict(score_attrs or {})
        final_attrs.update(complete_chunks=list(range(self.n_chunks)), finalized=True)
        group.update_attributes(final_attrs)
        # root attrs now hold the progress; without the files, zarr's member listing has nothing foreign
        for progress in _progress_files(self.path):
            progress.unlink(missing_ok=True)
        self._finalized = True
        return ScoreStore.open(self.path)

    def __repr__(self) -> str:
        return (f"ScoreStoreWriter({str(self.path)!r}, {len(self._complete)}/{self.n_chunks} chunks"
                f"{', finalized' if self._finalized else ''})")


def score_inputs(means: dict[str, np.ndarray], down_norm: np.ndarray | None) -> dict[str, np.ndarray]:
    """The dict a score function receives: the float32 [U] unit summaries and `down_norm` if known."""
    inputs = {name: means[name] for name in UNIT_STATS}
    if down_norm is not None:
        inputs["down_norm"] = np.asarray(down_norm, dtype=np.float32)
    return inputs


# --------------------------------------------------------------------------------------------
# Reading


class ScoreStore:
    """A score store opened read-only; arrays are lazy (slicing reads only the chunks it touches)."""

    def __init__(self, path: Path, group: zarr.Group, mmap: bool = False, manifest: ChunkManifest | None = None):
        """Use `ScoreStore.open`."""
        self.path = path
        self._group = group
        self.mmap = mmap
        self.attrs: dict[str, Any] = dict(group.attrs)
        self._mapped: dict[str, MappedArray] = {}
        self.manifest = manifest or ChunkManifest(PROBED_ARRAYS, lambda: ())
        """Which chunks the writer wrote (as of opening): their absence is damage, not fill values."""

    @classmethod
    def open(cls, path: str | os.PathLike, mmap: bool = False) -> ScoreStore:
        """Open the store at `path` read-only.

        `mmap=True`: arrays stored uncompressed (the per-sample arrays of a store probed with
        `per_sample_codec="none"`) are read through memory maps of their chunk files (`MappedArray`:
        a read touches only the pages it needs and skips the chunk checksums; `verify()` checks them);
        every other array is read through zarr as usual, so any store opens either way.

        Every read refuses damage: a chunk the writer wrote that is missing, or (zarr reads) whose
        crc32c does not match, raises `StoreDamagedError` naming the array and chunk. Opening checks
        that the chunks of the small arrays (samples, units, heads, summaries) are all there.
        """
        path = Path(path)
        attrs = dict(_open_tinyonn_group(path, mode="r").attrs)
        if attrs.get("finalized", False):
            complete = frozenset(range(math.ceil(int(attrs["n_samples"]) / int(attrs["chunk_samples"]))))
        else:
            complete = frozenset(_read_progress(path, None))
        manifest = ChunkManifest(PROBED_ARRAYS, lambda: complete)
        group = _open_group(path, "r", manifest)
        _check_present(path, attrs, manifest, skip=("per_sample/", "partials/"))
        return cls(path, group, mmap=mmap, manifest=manifest)

    @property
    def n_samples(self) -> int:
        return int(self.attrs["n_samples"])

    @property
    def n_units(self) -> int:
        return int(self.attrs["n_units"])

    @property
    def n_heads(self) -> int:
        return int(self.attrs["n_heads"])

    @property
    def categories(self) -> list[str]:
        return list(self.attrs["categories"])

    @property
    def finalized(self) -> bool:
        return bool(self.attrs.get("finalized", False))

    @property
    def has_per_sample(self) -> bool:
        """Whether the [N, U] per-sample arrays were kept."""
        return bool(self.attrs.get("per_sample", False))

    @property
    def per_sample_codec(self) -> str:
        """"zstd" (compressed) or "none" (raw unit-major chunks, memory-mappable)."""
        return str(self.attrs.get("per_sample_codec", "zstd"))

    def has(self, name: str) -> bool:
        """Whether array `name` (e.g. "units/down_norm") exists."""
        try:
            node = self._group[name]
        except KeyError:
            return False
        return isinstance(node, zarr.Array)

    def array(self, name: str) -> zarr.Array | MappedArray:
        """The lazy array `name`, e.g. "per_sample/grad": a `MappedArray` when the store was opened
        with `mmap=True` and the array is stored uncompressed, else the zarr array."""
        if not self.has(name):
            raise ScoreStoreError(f"{self.path}: no array {name!r}; arrays: {', '.join(self._array_names())}")
        array = self._group[name]
        if not self.mmap:
            return array
        if name not in self._mapped and chunk_format(array) is not None:
            self._mapped[name] = MappedArray(array, self.path / name, name=name,
                                             expects=lambda coords: self.manifest.expects(name, coords))
        return self._mapped.get(name, array)

    def is_mapped(self, name: str) -> bool:
        """Whether `array(name)` reads through memory maps."""
        return isinstance(self.array(name), MappedArray)

    def verify(self, names: Sequence[str] | None = None) -> int:
        """Check the arrays `names` (default: every array, and that none the store should hold is
        missing) chunk by chunk: every chunk the writer wrote is there and its crc32c matches.
        Returns the number of chunk files checked; raises `StoreDamagedError` naming the array and
        chunk key of the first damage found ("missing", "checksum"; "missing array")."""
        if names is None:
            present = set(self._array_names())
            for name in _required_arrays(self.attrs):
                if name not in present:
                    raise StoreDamagedError(self.path, name, None, "missing array",
                                            "array folder or its zarr.json is missing")
            names = sorted(present)
        checked = 0
        for name in names:
            array = self._node(name)
            checksummed = any(isinstance(codec, Crc32cCodec) for codec in array.metadata.codecs)
            checked += verify_array(self.path, name, tuple(array.shape), tuple(array.chunks), checksummed,
                                    self.manifest)
        return checked

    def summary_of(self, stat: str) -> np.ndarray:
        """summary/<stat>: the mean over all samples ([U], or [H] for head stats; "score" too)."""
        return np.asarray(self._summary_array(f"summary/{stat}")[:])

    def by_category(self, stat: str) -> dict[str, np.ndarray]:
        """Category → mean of `stat` over that category's samples (NaN where it has none)."""
        table = np.asarray(self._summary_array(f"summary/by_category/{stat}")[:])
        return {name: table[c] for c, name in enumerate(self.categories)}

    def category_counts(self) -> dict[str, int]:
        """Category → number of samples."""
        counts = np.bincount(np.asarray(self._node("samples/category")[:]), minlength=len(self.categories))
        return {name: int(counts[c]) for c, name in enumerate(self.categories)}

    def units(self) -> tuple[np.ndarray, np.ndarray]:
        """(layer, index) of every unit, [U] each."""
        return np.asarray(self._node("units/layer")[:]), np.asarray(self._node("units/index")[:])

    def heads(self) -> tuple[np.ndarray, np.ndarray]:
        """(layer, index) of every attention head, [H] each (empty when H = 0)."""
        if not self.n_heads:
            return np.zeros(0, np.int16), np.zeros(0, np.int16)
        return np.asarray(self._node("heads/layer")[:]), np.asarray(self._node("heads/index")[:])

    def down_norm(self) -> np.ndarray | None:
        """units/down_norm [U] float32 (norm of each unit's down_proj column), or None if not stored."""
        return np.asarray(self._node("units/down_norm")[:]) if self.has("units/down_norm") else None

    def _node(self, name: str) -> zarr.Array:
        """Array `name`, which the store must hold (its absence is damage)."""
        try:
            node = self._group[name]
        except KeyError:
            node = None
        if not isinstance(node, zarr.Array):
            raise StoreDamagedError(self.path, name, None, "missing array", "array folder or its zarr.json is missing")
        return node

    def score_inputs(self) -> dict[str, np.ndarray]:
        """The dict `finalize` gave the score function: unit summaries and `down_norm` if stored."""
        return score_inputs({name: self.summary_of(name) for name in UNIT_STATS}, self.down_norm())

    def summary(self, file: TextIO | None = sys.stdout) -> str:
        """A readable table (also printed to `file` unless None): samples, then one row per layer."""
        text = _format_summary(self)
        if file is not None:
            print(text, file=file)
        return text

    def _summary_array(self, name: str) -> zarr.Array:
        if not self.finalized:
            done = len(_read_progress(self.path, None))
            raise ScoreStoreError(f"{self.path}: not finalized ({done} of "
                                  f"{math.ceil(self.n_samples / self.attrs['chunk_samples'])} chunks written); "
                                  "summaries exist only after the probe finishes")
        if name != "summary/score" and not self.has(name):
            self._node(name)  # a finalized store holds every summary: a missing one is damage
        return self.array(name)

    def _array_names(self) -> list[str]:
        with warnings.catch_warnings():  # progress files beside the arrays are ours, not stray objects
            warnings.filterwarnings("ignore", message=r"Object at progress(\.rank-\d+)?\.json is not recognized")
            return sorted(name for name, node in self._group.members(max_depth=None) if isinstance(node, zarr.Array))

    def __repr__(self) -> str:
        return (f"ScoreStore({str(self.path)!r}, samples={self.n_samples}, units={self.n_units}, "
                f"heads={self.n_heads}, finalized={self.finalized})")


def _format_summary(store: ScoreStore) -> str:
    attrs = store.attrs
    counts = store.category_counts()
    n_chunks = math.ceil(store.n_samples / attrs["chunk_samples"])
    done = n_chunks if store.finalized else len(_read_progress(store.path, None))
    lines = [
        f"score store  {store.path}",
        f"teacher      {_short(attrs.get('teacher'))}",
        f"samples      {store.n_samples}  (" + ", ".join(f"{c}: {n}" for c, n in counts.items()) + ")",
        f"chunks       {done}/{n_chunks} complete, {'finalized' if store.finalized else 'NOT finalized'}",
        "per-sample   " + (f"yes ({'uncompressed, memory-mappable' if store.per_sample_codec == 'none' else 'zstd'})"
                              if store.has_per_sample else "no (aggregates only)"),
    ]
    if "formula" in attrs:
        lines.append(f"formula      {attrs['formula']}")
    layer, _ = store.units()
    head_layer, _ = store.heads()
    layers = np.unique(layer)
    lookup = np.searchsorted(layers, layer)
    units_per = np.bincount(lookup, minlength=len(layers))
    heads_per = {int(l): int(n) for l, n in zip(*np.unique(head_layer, return_counts=True))}
    columns = ["act", "freq", "grad"] + (["score"] if store.has("summary/score") else [])
    means = {}
    if store.finalized:
        for name in columns:
            values = store.summary_of(name).astype(np.float64)
            means[name] = np.bincount(lookup, weights=values, minlength=len(layers)) / units_per
    header = f"{'layer':>5} {'units':>7} {'heads':>5}" + "".join(f" {'mean_' + c:>11}" for c in columns)
    lines += ["", header]
    for i, l in enumerate(layers):
        row = f"{int(l):>5} {int(units_per[i]):>7} {heads_per.get(int(l), 0):>5}"
        row += "".join(f" {means[c][i]:>11.4g}" if means else f" {'-':>11}" for c in columns)
        lines.append(row)
    lines.append(f"{'all':>5} {store.n_units:>7} {store.n_heads:>5}"
                 + "".join(f" {float(np.mean(store.summary_of(c), dtype=np.float64)):>11.4g}"
                           if means else f" {'-':>11}" for c in columns))
    return "\n".join(lines)


def _short(value: Any) -> str:
    if value is None:
        return "(not recorded)"
    if isinstance(value, dict):
        for key in ("name", "id", "path"):
            if key in value:
                return str(value[key])
        return json.dumps(value, sort_keys=True)[:100]
    return str(value)


# --------------------------------------------------------------------------------------------
# Layout: validated creation arguments


@dataclass(frozen=True)
class _Layout:
    units_layer: np.ndarray
    units_index: np.ndarray
    units_down_norm: np.ndarray | None
    heads_layer: np.ndarray
    heads_index: np.ndarray
    categories: tuple[str, ...]
    sample_category: np.ndarray
    source_index: np.ndarray
    chunk_samples: int
    per_sample: bool
    unit_chunk: int
    per_sample_codec: str = "zstd"

    @classmethod
    def build(cls, *, units_layer, units_index, heads_layer, heads_index, categories, sample_category,
              source_index, chunk_samples, per_sample, unit_chunk, units_down_norm,
              per_sample_codec="zstd") -> _Layout:
        units_layer = _int_vector(units_layer, np.int16, "units_layer")
        units_index = _int_vector(units_index, np.int32, "units_index")
        if len(units_layer) == 0 or len(units_index) != len(units_layer):
            raise ScoreStoreError(f"units_layer and units_index must have the same length > 0, got "
                                  f"{len(units_layer)} and {len(units_index)}")
        heads_layer = _int_vector(heads_layer, np.int16, "heads_layer")
        heads_index = _int_vector(heads_index, np.int16, "heads_index")
        if len(heads_index) != len(heads_layer):
            raise ScoreStoreError(f"heads_layer and heads_index must have the same length, got "
                                  f"{len(heads_layer)} and {len(heads_index)}")
        categories = tuple(categories)
        if not categories or not all(isinstance(c, str) for c in categories) or len(set(categories)) != len(categories):
            raise ScoreStoreError(f"categories must be distinct strings, at least one; got {list(categories)!r}")
        sample_category = _int_vector(sample_category, np.int16, "sample_category")
        if len(sample_category) == 0:
            raise ScoreStoreError("sample_category is empty: a score store needs at least one sample")
        bad = (sample_category < 0) | (sample_category >= len(categories))
        if bad.any():
            raise ScoreStoreError(f"sample_category[{int(np.argmax(bad))}] = {int(sample_category[bad][0])} is not "
                                  f"a code into the {len(categories)} categories")
        source_index = _int_vector(source_index, np.int64, "source_index")
        if len(source_index) != len(sample_category):
            raise ScoreStoreError(f"source_index has {len(source_index)} entries, sample_category "
                                  f"{len(sample_category)}: both must have one per sample")
        if int(chunk_samples) < 1 or int(unit_chunk) < 1:
            raise ScoreStoreError(f"chunk_samples and unit_chunk must be >= 1, got {chunk_samples}, {unit_chunk}")
        if units_down_norm is not None:
            units_down_norm = np.asarray(units_down_norm, dtype=np.float32)
            if units_down_norm.shape != units_layer.shape:
                raise ScoreStoreError(f"units_down_norm has shape {units_down_norm.shape}, expected "
                                      f"({len(units_layer)},)")
        if per_sample_codec not in PER_SAMPLE_CODECS:
            raise ScoreStoreError(f"per_sample_codec must be one of {', '.join(PER_SAMPLE_CODECS)}, "
                                  f"got {per_sample_codec!r}")
        return cls(units_layer, units_index, units_down_norm, heads_layer, heads_index, categories,
                   sample_category, source_index, int(chunk_samples), bool(per_sample), int(unit_chunk),
                   per_sample_codec)

    @property
    def n_samples(self) -> int:
        return len(self.sample_category)

    @property
    def n_units(self) -> int:
        return len(self.units_layer)

    @property
    def n_heads(self) -> int:
        return len(self.heads_layer)

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_samples / self.chunk_samples)

    def chunk_range(self, k: int) -> tuple[int, int]:
        if not 0 <= k < self.n_chunks:
            raise ScoreStoreError(f"chunk {k} out of range: the store has chunks 0..{self.n_chunks - 1}")
        return k * self.chunk_samples, min(self.n_samples, (k + 1) * self.chunk_samples)

    def root_attrs(self) -> dict[str, Any]:
        return dict(schema_version=SCHEMA_VERSION, store_format=STORE_FORMAT, n_samples=self.n_samples,
                    n_units=self.n_units,
                    n_heads=self.n_heads, chunk_samples=self.chunk_samples, unit_chunk=self.unit_chunk,
                    per_sample=self.per_sample, per_sample_codec=self.per_sample_codec,
                    categories=list(self.categories), complete_chunks=[], finalized=False)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays written at creation."""
        arrays = {"samples/category": self.sample_category, "samples/source_index": self.source_index,
                  "units/layer": self.units_layer, "units/index": self.units_index}
        if self.units_down_norm is not None:
            arrays["units/down_norm"] = self.units_down_norm
        if self.n_heads:
            arrays["heads/layer"] = self.heads_layer
            arrays["heads/index"] = self.heads_index
        return arrays

    def check_matches(self, group: zarr.Group, path: Path) -> None:
        """Raise if the store in `group` was created with other samples, units or settings."""
        expected = self.root_attrs()
        for key in ("n_samples", "n_units", "n_heads", "chunk_samples", "unit_chunk", "per_sample",
                    "per_sample_codec", "categories"):
            stored = group.attrs.get(key, "zstd" if key == "per_sample_codec" else None)  # older stores: zstd
            if stored != expected[key]:
                raise ScoreStoreError(
                    f"{path}: same fingerprint but {key} differs (store {stored!r}, this run "
                    f"{expected[key]!r}); the fingerprint must cover it — pass overwrite=True or another path")
        arrays = self.arrays()
        for name in sorted(set(arrays) | {"units/down_norm"}):
            want = arrays.get(name)
            have = np.asarray(group[name][:]) if name in group else None
            if (want is None) != (have is None) or (want is not None and not np.array_equal(want, have)):
                raise ScoreStoreError(
                    f"{path}: same fingerprint but {name} differs from this run's; pass overwrite=True or "
                    "another path")


# --------------------------------------------------------------------------------------------
# Creation and progress


def _create(path: Path, layout: _Layout, attrs: dict[str, Any]) -> None:
    """Build the whole store in a sibling temp folder, then move it into place (never half-created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.creating-{uuid.uuid4().hex[:8]}"
    try:
        group = zarr.open_group(tmp, mode="w-")
        n, u, h, c, k = layout.n_samples, layout.n_units, layout.n_heads, len(layout.categories), layout.n_chunks
        cs, uc = layout.chunk_samples, min(layout.n_units, layout.unit_chunk)
        for name, values in layout.arrays().items():
            axis = name.split("/")[0].removesuffix("s")  # samples/ → sample, units/ → unit, heads/ → head
            _put(group, name, values, chunks=(cs,) if axis == "sample" else (min(len(values), uc),), dims=(axis,))
        _empty(group, "samples/n_tokens", (n,), (cs,), np.int32, fill=-1, dims=("sample",))
        _empty(group, "samples/loss", (n,), (cs,), np.float32, dims=("sample",))
        if layout.per_sample:
            _put_coordinates(group, "per_sample", layout, sample_axis=True)
        stats = [(name, u, uc, "unit") for name in UNIT_STATS] + [(name, h, h, "head") for name in HEAD_STATS if h]
        for name, width, w_chunk, axis in stats:
            if layout.per_sample:
                _empty(group, f"per_sample/{name}", (n, width), (cs, w_chunk), np.float16, dims=("sample", axis),
                       codec=layout.per_sample_codec, attrs=_coordinates_attr(axis, sample=True))
            _empty(group, f"partials/{name}", (k, c, width), (1, c, w_chunk), np.float64,
                   dims=("chunk", "category", axis))
        _empty(group, "partials/count", (k, c), (1, c), np.int64, fill=0, dims=("chunk", "category"))
        group.update_attributes({**attrs, **layout.root_attrs()})
        _write_progress(tmp, attrs["fingerprint"], set())
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def array_codecs(dtype: np.dtype, codec: str = "zstd", ndim: int = 1) -> dict[str, Any]:
    """`create_array` codec arguments of the store's arrays, each ending in a crc32c checksum.

    "zstd": Blosc/Zstd (bit-shuffled for float16). "none": raw bytes, and for 2-D arrays the chunk
    stored transposed (unit-major), so a column of a chunk is one contiguous run a memory map can
    read without touching the rest.
    """
    if codec == "none":
        filters = [TransposeCodec(order=tuple(reversed(range(ndim))))] if ndim > 1 else None
        return {"filters": filters, "compressors": [Crc32cCodec()]}
    if np.dtype(dtype).kind in "OTU":
        return {"compressors": [ZstdCodec(level=5), Crc32cCodec()]}
    shuffle = "bitshuffle" if np.dtype(dtype) == np.float16 else "shuffle"
    return {"compressors": [BloscCodec(cname="zstd", clevel=5, shuffle=shuffle), Crc32cCodec()]}


def _empty(group: zarr.Group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype,
           fill: Any = None, dims: tuple[str, ...] | None = None, codec: str = "zstd",
           attrs: dict[str, Any] | None = None) -> zarr.Array:
    """Create an array (float fill: NaN, so unwritten rows stand out)."""
    if fill is None:
        fill = np.nan if np.issubdtype(dtype, np.floating) else ("" if np.dtype(dtype).kind in "OTU" else 0)
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                              dimension_names=dims, overwrite=True, attributes=attrs,
                              config={"write_empty_chunks": True}, **array_codecs(dtype, codec, len(shape)))


def _put(group: zarr.Group, name: str, values: np.ndarray, chunks: tuple[int, ...],
         dims: tuple[str, ...] | None = None, attrs: dict[str, Any] | None = None) -> None:
    dtype = str if values.dtype.kind == "U" else values.dtype
    array = _empty(group, name, values.shape, chunks, dtype, dims=dims, attrs=attrs)
    array[...] = values


def _coordinates_attr(axis: str, sample: bool = False) -> dict[str, str]:
    """The `coordinates` attribute (CF, read by xarray) of an array over `axis` (unit or head)."""
    return {"coordinates": " ".join((["sample_category"] if sample else []) + [f"{axis}_layer", f"{axis}_index"])}


def _put_coordinates(group: zarr.Group, prefix: str, layout: _Layout, sample_axis: bool,
                     category_axis: bool = False) -> None:
    """Coordinate arrays beside a group's data: unit and head layer/index, the sample's category name
    (`sample_axis`) and the category names as the `category` dimension's index (`category_axis`)."""
    uc = min(layout.n_units, layout.unit_chunk)
    _put(group, f"{prefix}/unit_layer", layout.units_layer, chunks=(uc,), dims=("unit",))
    _put(group, f"{prefix}/unit_index", layout.units_index, chunks=(uc,), dims=("unit",))
    if layout.n_heads:
        _put(group, f"{prefix}/head_layer", layout.heads_layer, chunks=(layout.n_heads,), dims=("head",))
        _put(group, f"{prefix}/head_index", layout.heads_index, chunks=(layout.n_heads,), dims=("head",))
    names = np.asarray(layout.categories, dtype=str)
    if sample_axis:
        _put(group, f"{prefix}/sample_category", names[layout.sample_category], chunks=(layout.chunk_samples,),
             dims=("sample",))
    if category_axis:
        _put(group, f"{prefix}/category", names, chunks=(len(names),), dims=("category",))


def _write_progress(path: Path, fingerprint: str, complete: set[int], name: str = PROGRESS_FILE) -> None:
    """Replace the progress file `name` atomically (temp file, fsync, os.replace, fsync of the folder)."""
    target = path / name
    tmp = path / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as f:
        json.dump({"fingerprint": fingerprint, "complete_chunks": sorted(complete)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fsync_path(path)


_PROGRESS_NAME = re.compile(r"\.?progress(\.rank-\d+)?\.json(\.[0-9a-f]{8}\.tmp)?")
"""A progress file (progress.json, progress.rank-<r>.json) or one of their temp files."""


def _progress_files(path: Path) -> list[Path]:
    """progress.json and every writer's progress.rank-<r>.json in the store's folder."""
    return sorted(p for p in path.glob("progress*.json") if _PROGRESS_NAME.fullmatch(p.name))


def _read_progress(path: Path, fingerprint: str | None) -> set[int]:
    """The complete chunks: the union of every progress file's."""
    complete: set[int] = set()
    for target in _progress_files(path):
        try:
            progress = json.loads(target.read_text())
        except json.JSONDecodeError as e:
            raise ScoreStoreError(f"{target}: unreadable progress file ({e})") from e
        if fingerprint is not None and progress.get("fingerprint") != fingerprint:
            raise ScoreStoreError(f"{target}: progress belongs to fingerprint {progress.get('fingerprint')!r}, "
                                  f"the store to {fingerprint!r}; the store is damaged")
        complete |= {int(k) for k in progress.get("complete_chunks", [])}
    return complete


def _open_tinyonn_group(path: Path, mode: str) -> zarr.Group:
    if not path.exists():
        raise ScoreStoreNotFoundError(f"{path}: no score store there")
    foreign = ("Tiny-ONN replaces only the stores it wrote: choose another path, or move it away yourself")
    if not (path / "zarr.json").is_file():
        raise ScoreStoreError(f"{path}: not a Zarr group, so not a Tiny-ONN score store; {foreign}")
    group = zarr.open_group(path, mode=mode)
    version = group.attrs.get("schema_version")
    if version is None or "n_units" not in group.attrs:
        raise ScoreStoreError(f"{path}: a Zarr group but not a Tiny-ONN score store; {foreign}")
    if version != SCHEMA_VERSION:
        raise ScoreStoreError(f"{path}: score store schema {version}, this Tiny-ONN reads {SCHEMA_VERSION}")
    return group


def _open_group(path: Path, mode: str, manifest: ChunkManifest) -> zarr.Group:
    """The store's root group, read through a `CheckedStore` (damage raises instead of reading as fill)."""
    return zarr.open_group(store=CheckedStore(path, read_only=mode == "r", manifest=manifest), mode=mode)


def _required_arrays(attrs: dict[str, Any]) -> list[str]:
    """The arrays a store with these root attrs holds (optional ones, units/down_norm and summary/score,
    left out)."""
    heads = int(attrs.get("n_heads", 0)) > 0
    stats = UNIT_STATS + (HEAD_STATS if heads else ())
    coordinates = ["unit_layer", "unit_index"] + (["head_layer", "head_index"] if heads else [])
    names = ["samples/category", "samples/source_index", "samples/n_tokens", "samples/loss", "units/layer",
             "units/index", "partials/count"] + [f"partials/{s}" for s in stats]
    names += ["heads/layer", "heads/index"] if heads else []
    if attrs.get("per_sample", False):
        names += [f"per_sample/{s}" for s in stats] + [f"per_sample/{c}" for c in coordinates + ["sample_category"]]
    if attrs.get("finalized", False):
        names += [f"summary/{s}" for s in stats] + [f"summary/{c}" for c in coordinates]
        names += [f"summary/by_category/{s}" for s in stats + ("count",)]
        names += [f"summary/by_category/{c}" for c in coordinates + ["category"]]
    return names


def _check_present(path: Path, attrs: dict[str, Any], manifest: ChunkManifest, skip: tuple[str, ...] = (),
                   require: bool = True) -> None:
    """Raise `StoreDamagedError` for the first chunk the writer wrote that is not there, by listing the
    array folders (no chunk is read). `skip`: array-name prefixes left out (the large arrays, on open);
    `require`: a missing array is damage too (else only the arrays present are checked)."""
    for name in _required_arrays(attrs) + ["units/down_norm", "summary/score"]:
        if name.startswith(skip):
            continue
        try:  # the geometry straight from zarr.json: opening each array through zarr costs ~0.5 ms
            meta = json.loads((path / name / "zarr.json").read_bytes())
            shape, chunks = tuple(meta["shape"]), tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        except FileNotFoundError:
            if require and name not in ("units/down_norm", "summary/score"):
                raise StoreDamagedError(path, name, None, "missing array",
                                        "array folder or its zarr.json is missing") from None
            continue
        except (ValueError, KeyError, TypeError) as e:
            raise StoreDamagedError(path, name, "zarr.json", "metadata", f"unreadable array metadata ({e})") from e
        missing = find_missing(path, name, shape, chunks, manifest)
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise StoreDamagedError(path, name, missing[0], "missing",
                                    f"chunk file is missing (deleted?) although the writer wrote it{more}")


STORE_GROUPS = ("per_sample", "samples", "units", "heads", "partials", "summary")
"""The top-level groups of a score store."""


def _foreign_files(path: Path, limit: int = 5) -> list[str]:
    """Files under a store folder that its writer would not have written (at most `limit`)."""
    foreign: list[str] = []
    for folder, dirs, files in os.walk(path):
        rel = Path(folder).relative_to(path)
        if rel.parts and rel.parts[0] not in STORE_GROUPS:
            foreign.append(f"{rel}/")
            dirs[:] = []
            continue
        for name in files:
            ours = name == "zarr.json" or "c" in rel.parts[1:] or (not rel.parts and _PROGRESS_NAME.fullmatch(name))
            if not ours:
                foreign.append(str(rel / name))
        if len(foreign) >= limit:
            break
    return foreign[:limit]


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _remove_store(path: Path) -> None:
    """Delete the score store at `path` if this project wrote it (its `store_format` mark, or an older
    store's schema attrs) and the folder holds nothing else; refuse anything else."""
    keep = "remove it yourself or choose another path"
    if not (path.is_dir() and (path / "zarr.json").is_file()):
        raise ScoreStoreError(f"{path}: exists and is not a Zarr store; refusing to overwrite it — {keep}")
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes") or {}
    except (OSError, ValueError) as e:
        raise ScoreStoreError(f"{path}: unreadable zarr.json ({e}); refusing to overwrite it — {keep}") from e
    ours = attrs.get("store_format") == STORE_FORMAT or (
        attrs.get("store_format") is None and "schema_version" in attrs and "n_units" in attrs
        and isinstance(attrs.get("fingerprint"), str))
    if not ours:
        raise ScoreStoreError(f"{path}: a Zarr store that Tiny-ONN did not write; refusing to overwrite it — {keep}")
    foreign = _foreign_files(path)
    if foreign:
        raise ScoreStoreError(f"{path}: holds files a score store does not ({', '.join(foreign)}); refusing to "
                              f"overwrite it — {keep}")
    shutil.rmtree(path)


# --------------------------------------------------------------------------------------------
# Small helpers


def _check_attrs(attrs: dict[str, Any], need_fingerprint: bool = True, what: str = "attrs") -> None:
    if not isinstance(attrs, dict):
        raise ScoreStoreError(f"{what} must be a dict, got {type(attrs).__name__}")
    if need_fingerprint and not (isinstance(attrs.get("fingerprint"), str) and attrs["fingerprint"]):
        raise ScoreStoreError(f'{what} must hold a non-empty "fingerprint" string identifying the run '
                              "(it decides whether an existing store is resumed)")
    clash = sorted(set(attrs) & set(RESERVED_ATTRS))
    if clash:
        raise ScoreStoreError(f"{what} may not set {', '.join(clash)}: the store writes these itself")
    try:
        json.dumps(attrs)
    except (TypeError, ValueError) as e:
        raise ScoreStoreError(f"{what} must be JSON-serialisable: {e}") from e


def _int_vector(values, dtype, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ScoreStoreError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ScoreStoreError(f"{name} must hold integers, got dtype {array.dtype}")
    info = np.iinfo(dtype)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise ScoreStoreError(f"{name} has values outside {np.dtype(dtype).name}")
    return array.astype(dtype)


def _validate_stats(stats: ChunkStats, n: int, n_units: int, n_heads: int) -> dict[str, np.ndarray]:
    """Check every field's shape and dtype; return float32 / int32 arrays by field name."""
    shapes = {name: (n, n_units) for name in UNIT_STATS} | {name: (n, n_heads) for name in HEAD_STATS}
    shapes |= {"loss": (n,), "n_tokens": (n,)}
    out = {}
    for f in fields(ChunkStats):
        value = np.asarray(getattr(stats, f.name))
        if value.shape != shapes[f.name]:
            raise ScoreStoreError(f"ChunkStats.{f.name} has shape {value.shape}, expected {shapes[f.name]}")
        if f.name == "n_tokens":
            if value.size and not np.issubdtype(value.dtype, np.integer):
                raise ScoreStoreError(f"ChunkStats.n_tokens must be integer, got {value.dtype}")
            out[f.name] = value.astype(np.int32)
        else:
            if value.size and not np.issubdtype(value.dtype, np.floating):
                raise ScoreStoreError(f"ChunkStats.{f.name} must be floating point, got {value.dtype}")
            out[f.name] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def _category_sums(values: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    """[C, width] float64 sums of the rows of each category, in a fixed order."""
    return np.stack([values[m].sum(axis=0, dtype=np.float64) for m in masks])


def _sum_partials(array: zarr.Array) -> np.ndarray:
    """Sum [K, C, W] partials over chunks strictly in order 0..K-1, reading a block at a time."""
    k, c, w = array.shape
    total = np.zeros((c, w), dtype=np.float64)
    block = max(1, _SUMMARY_READ_BYTES // max(1, c * w * 8))
    for start in range(0, k, block):
        for row in np.asarray(array[start:start + block]):
            total += row
    return total


def _format_ids(ids: list[int], limit: int = 20) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")
