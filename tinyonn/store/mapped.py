"""Memory-mapped reads of uncompressed Zarr v3 arrays: numpy views over the chunk files themselves.

A chunk written with only the transpose, bytes and crc32c codecs is, on disk, the chunk's raw
little-endian values in the stored axis order followed by 4 checksum bytes. `MappedArray` maps each
chunk file a selection touches (`mmap`, read-only), views it as an array, copies the selected part
out and unmaps it, so a read faults in only the pages holding the values it asks for and never
decompresses or checks anything else: a unit's column of a unit-major chunk is one contiguous run
of `chunk_samples` values. Arrays with any other codec (Blosc, Zstd, ...) are not mappable
(`chunk_format` returns None) and are read through zarr.

Why not a zarr `Store` that hands out mmap-backed buffers: zarr's codec pipeline verifies the crc32c
of every chunk it decodes and copies the whole chunk, so every page of every touched chunk would be
read. Mapped reads skip the checksum (it needs the whole chunk); `ScoreStore.verify` checks them
all on demand, and plain zarr reads still check every chunk they decode. A chunk file of the wrong
size, or missing although the store's manifest says it was written, raises `StoreDamagedError`.
"""

from __future__ import annotations

import itertools
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, TransposeCodec
from zarr.storage import LocalStore

from tinyonn.store.integrity import MappedReadError, StoreDamagedError, chunk_key

__all__ = ["ChunkFormat", "MappedArray", "MappedReadError", "chunk_format"]


@dataclass(frozen=True)
class ChunkFormat:
    """How one chunk file lays out its values."""

    order: tuple[int, ...]
    """Stored axis order (the transpose codec's `order`; identity without one)."""
    dtype: np.dtype
    """Stored dtype, byte order included."""
    checksum: bool
    """Whether 4 crc32c bytes follow the values."""


def chunk_format(array: zarr.Array) -> ChunkFormat | None:
    """The on-disk layout of `array`'s chunks when they can be memory-mapped, else None.

    Mappable: a Zarr v3 array in a local directory, a regular chunk grid, a fixed-size dtype and the
    codecs [transpose]? bytes [crc32c]? (nothing compressed, no sharding).
    """
    metadata = array.metadata
    if getattr(metadata, "zarr_format", None) != 3 or not isinstance(array.store, LocalStore):
        return None
    if array.dtype.kind not in "biuf" or not hasattr(metadata.chunk_grid, "chunk_shape"):
        return None
    codecs = list(metadata.codecs)
    order = tuple(range(array.ndim))
    if codecs and isinstance(codecs[0], TransposeCodec):
        order = tuple(int(axis) for axis in codecs.pop(0).order)
    if not codecs or not isinstance(codecs[0], BytesCodec):
        return None
    endian = codecs.pop(0).endian
    checksum = bool(codecs) and isinstance(codecs[0], Crc32cCodec)
    if checksum:
        codecs.pop(0)
    if codecs:
        return None
    byte_order = ">" if endian is not None and endian.value == "big" else "<"
    dtype = array.dtype.newbyteorder(byte_order) if array.dtype.itemsize > 1 else array.dtype
    return ChunkFormat(order=order, dtype=dtype, checksum=checksum)


class MappedArray:
    """A read-only array whose reads map only the chunk files (and pages) they touch.

    Indexing: integers, slices (any step) and at most one integer or boolean array per
    `__getitem__` (numpy and zarr agree there); `get_orthogonal_selection` takes one per axis.
    Chunks not written yet read as the fill value, unless `expects` says the chunk was written:
    then its absence raises `StoreDamagedError`. Results are new numpy arrays.
    """

    def __init__(self, array: zarr.Array, directory: str | os.PathLike,
                 expects: Callable[[tuple[int, ...]], bool] | None = None, name: str | None = None):
        """`array`: the zarr array (for its metadata); `directory`: the folder of its zarr.json;
        `expects`: whether chunk `coords` was written (a store's `ChunkManifest`), else never;
        `name`: the array's path inside its store ("per_sample/act"), for error messages."""
        fmt = chunk_format(array)
        if fmt is None:
            raise MappedReadError(f"{directory}: array is compressed or not a local Zarr v3 array; "
                                  "it cannot be memory-mapped")
        self.path = Path(directory)
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.chunks: tuple[int, ...] = tuple(array.chunks)
        self.dtype: np.dtype = array.dtype
        self.fill_value = array.fill_value
        self.dimension_names = array.metadata.dimension_names
        self.attrs: dict[str, Any] = dict(array.attrs)
        self.format = fmt
        self._expects = expects
        self.name = name or self.path.name
        self._store_root = Path(*self.path.parts[:len(self.path.parts) - len(Path(self.name).parts)])
        self._encode_key = array.metadata.encode_chunk_key
        self._stored_shape = tuple(self.chunks[axis] for axis in fmt.order)
        self._inverse_order = tuple(int(i) for i in np.argsort(fmt.order))
        self._chunk_values = int(np.prod(self.chunks))
        self._file_size = self._chunk_values * fmt.dtype.itemsize + (4 if fmt.checksum else 0)

    # -- numpy-like surface

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def chunk_grid_shape(self) -> tuple[int, ...]:
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunks))

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        values = self[...]
        return values if dtype is None else values.astype(dtype)

    def __repr__(self) -> str:
        return f"MappedArray({str(self.path)!r}, shape={self.shape}, chunks={self.chunks}, dtype={self.dtype})"

    def __getitem__(self, key) -> np.ndarray:
        selection = _expand(key, self.shape)
        parts = key if isinstance(key, tuple) else (key,)
        if sum(not isinstance(k, (int, np.integer, slice)) and k is not Ellipsis for k in parts) > 1:
            raise IndexError("MappedArray[...] takes at most one index array; use get_orthogonal_selection "
                             "for one per axis")
        return self._read(selection)

    def get_orthogonal_selection(self, selection) -> np.ndarray:
        """Outer indexing, as zarr's: each axis selected independently (ints, slices or index arrays)."""
        return self._read(_expand(selection, self.shape))

    # -- reading

    def chunk_file(self, coords: tuple[int, ...]) -> Path:
        """The file holding chunk `coords`."""
        return self.path / self._encode_key(tuple(coords))

    def _read(self, selection: list) -> np.ndarray:
        pieces = [_pieces(s, c) for s, c in zip(selection, self.chunks)]
        out_shape = tuple(_length(s) for s in selection if not isinstance(s, int))
        out = np.empty(out_shape, dtype=self.dtype)  # every element is written below: no fill pass
        if out.size == 0:
            return out
        for combo in itertools.product(*pieces):
            coords = tuple(piece[0] for piece in combo)
            self._copy_chunk(coords, [piece[1] for piece in combo], [piece[2] for piece in combo if piece[2] is not None],
                             out)
        return out

    def _copy_chunk(self, coords: tuple[int, ...], local: list, target: list, out: np.ndarray) -> None:
        path = self.chunk_file(coords)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            if self._expects is not None and self._expects(coords):
                raise StoreDamagedError(self._store_root, self.name, chunk_key(coords), "missing",
                                        "chunk file is missing (deleted?) although the writer wrote it") from None
            out[_outer(target)] = self.fill_value  # never written
            return
        try:
            size = os.fstat(fd).st_size
            if size != self._file_size:
                raise StoreDamagedError(self._store_root, self.name, chunk_key(coords), "size",
                                        f"{size} bytes, expected {self._file_size} for a {self.chunks} "
                                        f"{self.format.dtype} chunk (truncated?)")
            mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        stored_local = [local[axis] for axis in self.format.order]
        if hasattr(mmap, "MADV_RANDOM"):
            sparse = _pages_touched(stored_local, self._stored_shape, self.dtype.itemsize) * mmap.PAGESIZE < size / 4
            mapped.madvise(mmap.MADV_RANDOM if sparse else mmap.MADV_WILLNEED)
        try:
            stored = np.frombuffer(mapped, dtype=self.format.dtype, count=self._chunk_values)
            view = stored.reshape(self._stored_shape).transpose(self._inverse_order)
            block = _take(view, local)
            _assign(out, _outer(target), block)
            del stored, view, block
        finally:
            mapped.close()


# --------------------------------------------------------------------------------------------
# Selections: per axis an int, a slice with start/stop/step resolved (step > 0) or an int64 array


def _expand(key, shape: tuple[int, ...]) -> list:
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        at = next(i for i, k in enumerate(key) if k is Ellipsis)
        fill = len(shape) - (len(key) - 1)
        key = key[:at] + (slice(None),) * fill + key[at + 1:]
    if len(key) > len(shape):
        raise IndexError(f"too many indices: {len(key)} for an array of {len(shape)} dimensions")
    key = key + (slice(None),) * (len(shape) - len(key))
    out = []
    for k, n in zip(key, shape):
        if isinstance(k, (int, np.integer)):
            k = int(k)
            if not -n <= k < n:
                raise IndexError(f"index {k} is out of bounds for an axis of size {n}")
            out.append(k % n)
        elif isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step > 0:
                out.append(slice(start, max(start, stop), step))
            else:
                out.append(np.arange(start, stop, step, dtype=np.int64))
        else:
            index = np.asarray(k)
            if index.dtype == bool:
                if index.shape != (n,):
                    raise IndexError(f"boolean index of shape {index.shape} for an axis of size {n}")
                index = np.flatnonzero(index)
            if index.ndim != 1 or (index.size and not np.issubdtype(index.dtype, np.integer)):
                raise IndexError("index arrays must be 1-D integers or booleans")
            index = index.astype(np.int64)
            if index.size and (index.min() < -n or index.max() >= n):
                raise IndexError(f"index array has entries outside an axis of size {n}")
            out.append(np.where(index < 0, index + n, index))
    return out


def _length(selection) -> int:
    if isinstance(selection, slice):
        return len(range(selection.start, selection.stop, selection.step))
    return len(selection)


def _pieces(selection, chunk: int) -> list[tuple[int, Any, Any]]:
    """(chunk number, selection inside the chunk, positions in the output or None) per touched chunk."""
    if isinstance(selection, int):
        return [(selection // chunk, selection % chunk, None)]
    if isinstance(selection, slice):
        start, stop, step = selection.start, selection.stop, selection.step
        pieces = []
        if start >= stop:
            return pieces
        for k in range(start // chunk, (stop - 1) // chunk + 1):
            lo = max(start, k * chunk)
            lo = start + -(-(lo - start) // step) * step
            hi = min(stop, (k + 1) * chunk)
            if lo >= hi:
                continue
            first = (lo - start) // step
            count = len(range(lo, hi, step))
            pieces.append((k, slice(lo - k * chunk, hi - k * chunk, step), slice(first, first + count)))
        return pieces
    order = np.argsort(selection // chunk, kind="stable")
    ids = selection[order] // chunk
    bounds = np.flatnonzero(np.diff(ids)) + 1
    return [(int(ids[group[0]]), selection[order[group]] - int(ids[group[0]]) * chunk, order[group])
            for group in np.split(np.arange(len(order)), bounds) if len(group)]


def _pages_touched(stored_local: list, stored_shape: tuple[int, ...], itemsize: int) -> int:
    """About how many pages a selection touches in a chunk (axes in stored order): one run of the
    innermost axis per selected outer position. It picks the kernel's read-ahead: a few scattered
    pages (a unit's column: one run per chunk) fault in alone (MADV_RANDOM; default read-around
    would read up to megabytes around each), a dense selection asks for the whole chunk at once."""
    def count_and_span(selection, length: int) -> tuple[int, int]:
        if isinstance(selection, int):
            return 1, 1
        if isinstance(selection, slice):
            n = len(range(selection.start, selection.stop, selection.step))
            return n, (n - 1) * abs(selection.step) + 1 if n else 0
        return len(selection), int(selection.max() - selection.min() + 1) if len(selection) else 0

    runs = 1
    for selection, length in zip(stored_local[:-1], stored_shape[:-1]):
        runs *= count_and_span(selection, length)[0]
    _, span = count_and_span(stored_local[-1], stored_shape[-1])
    total_pages = -(-int(np.prod(stored_shape)) * itemsize // mmap.PAGESIZE)
    return min(total_pages, runs * (-(-span * itemsize // mmap.PAGESIZE) + 1))


def _take(view: np.ndarray, local: list) -> np.ndarray:
    """Outer selection of a chunk view: basic indexing first, then one axis array at a time."""
    block = view[tuple(slice(None) if isinstance(s, np.ndarray) else s for s in local)]
    axis = 0
    for s in local:
        if isinstance(s, int):
            continue
        if isinstance(s, np.ndarray):
            block = np.take(block, s, axis=axis)
        axis += 1
    return block


def _assign(out: np.ndarray, index: tuple, block: np.ndarray, tile: int = 512) -> None:
    """out[index] = block; a large 2-D block read against its memory order (a unit-major chunk into
    sample-major rows) is copied in tiles of `tile` columns, which keeps the reads cache-friendly."""
    if (block.ndim != 2 or block.size < (1 << 20) or block.flags.c_contiguous or len(index) != 2
            or not isinstance(index[1], slice)):
        out[index] = block
        return
    start = index[1].start
    for first in range(0, block.shape[1], tile):
        width = min(tile, block.shape[1] - first)
        out[index[0], start + first:start + first + width] = block[:, first:first + width]


def _outer(target: list) -> tuple:
    """An output index placing a block at `target` (slices or position arrays, one per output axis)."""
    if sum(isinstance(t, np.ndarray) for t in target) <= 1:
        return tuple(target)
    return np.ix_(*[np.arange(t.start, t.stop) if isinstance(t, slice) else t for t in target])
