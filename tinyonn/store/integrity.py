"""Which chunks a score store must hold, and the checks that they are there and intact.

Zarr reads a missing chunk file as the fill value, so a deleted chunk would pass for data (NaN
scores, or unit 0 of layer 0 for a missing `units/layer` chunk). A score store needs no separate
manifest to know better: every array is written with `write_empty_chunks`, so each chunk the
writer wrote is a file, and what it wrote follows from the layout and the progress record —

- the arrays written whole (at creation, or at finalize for `summary/`): every chunk;
- the probed arrays (`ChunkManifest.probed`: per-sample rows, per-sample loss and token counts,
  partial sums), whose first chunk index is the probe chunk: rows of the complete probe chunks
  (`progress.json`, atomically replaced after a probe chunk's arrays are all written; the root
  attrs once finalized).

Each chunk also ends in its own crc32c, so a bit flip or a truncation is caught by the chunk's
checksum. `CheckedStore` (what `ScoreStore` and the writer read through) applies both on every
chunk read and raises `StoreDamagedError` naming the array and the chunk key; `find_missing`
checks presence by listing folders (cheap: used on open and on resume) and `verify_array` reads
every chunk (`ScoreStore.verify`).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore

from tinyonn.errors import TinyONNError

DAMAGED_HINT = "the score store is damaged: probe again with --overwrite (API: overwrite=True)"


class ScoreStoreError(TinyONNError, ValueError):
    """A score store is missing pieces, does not match the run, or is not a Tiny-ONN store."""


class MappedReadError(TinyONNError, ValueError):
    """An array cannot be memory-mapped, or a mapped chunk file is damaged (`StoreDamagedError`)."""


class StoreDamagedError(ScoreStoreError, MappedReadError):
    """A chunk the writer wrote is missing, or its size or crc32c checksum is wrong (or a whole array
    is missing). `array` is the array's path in the store ("units/layer"), `chunk` the chunk key
    inside it ("c/0"; None for a missing array), `reason` one of "missing", "checksum", "size",
    "missing array", "metadata"."""

    def __init__(self, store: str | os.PathLike, array: str, chunk: str | None, reason: str, detail: str,
                 hint: str = DAMAGED_HINT):
        where = Path(store) / array / chunk if chunk is not None else Path(store) / array
        what = f"chunk {chunk} of array {array!r}" if chunk is not None else f"array {array!r}"
        super().__init__(f"{where}: {detail} ({what}); {hint}")
        self.store, self.array, self.chunk, self.reason = str(store), array, chunk, reason


@dataclass(frozen=True)
class ChunkManifest:
    """The chunks a score store's writer has written (see the module docstring)."""

    probed: frozenset[str]
    """Arrays written one probe chunk at a time; their first chunk index is the probe chunk."""
    complete: Callable[[], Collection[int]]
    """The complete probe chunks now (the writer's live set, or what a reader found on open)."""

    def expects(self, array: str, coords: tuple[int, ...]) -> bool:
        """Whether chunk `coords` of `array` was written (so its absence is damage)."""
        return array not in self.probed or (bool(coords) and coords[0] in self.complete())


def chunk_key(coords: tuple[int, ...]) -> str:
    """The default Zarr v3 chunk key ("c/1/0") of chunk `coords`."""
    return "/".join(["c", *map(str, coords)])


def _split_chunk_key(key: str) -> tuple[str, tuple[int, ...]] | None:
    """("per_sample/act", (1, 0)) for "per_sample/act/c/1/0"; None for any other key."""
    at = key.find("/c/")
    if at < 0:
        return None
    try:
        return key[:at], tuple(int(part) for part in key[at + 3:].split("/"))
    except ValueError:
        return None


def check_crc(data: np.ndarray | bytes, store: str | os.PathLike, array: str, key: str) -> None:
    """Raise `StoreDamagedError` unless the last 4 bytes of a chunk are the crc32c of the rest."""
    data = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    if len(data) < 4:
        raise StoreDamagedError(store, array, key, "checksum",
                                f"{len(data)} bytes, too short to hold its crc32c checksum (truncated)")
    body = data[:-4] if not data.flags.writeable else bytes(data[:-4])
    stored, computed = bytes(data[-4:]), np.uint32(google_crc32c.value(body)).tobytes()
    if stored != computed:
        raise StoreDamagedError(store, array, key, "checksum",
                                f"crc32c checksum does not match (stored {stored.hex()}, computed {computed.hex()}; "
                                "the chunk is truncated or corrupted)")


class CheckedStore(LocalStore):
    """A local Zarr store that refuses to read damage as data: a chunk the manifest says was written
    but is missing, or whose crc32c does not match, raises `StoreDamagedError` naming the array and
    chunk key (zarr itself would return the fill value, or an unnamed ValueError). Writes are plain."""

    def __init__(self, root: Path | str, *, read_only: bool = False, manifest: ChunkManifest | None = None):
        super().__init__(root, read_only=read_only)
        self.manifest = manifest
        self._checksummed: dict[str, bool] = {}  # array → last codec is crc32c (from the metadata zarr reads)

    def with_read_only(self, read_only: bool = False) -> CheckedStore:
        store = type(self)(self.root, read_only=read_only, manifest=self.manifest)
        store._checksummed = self._checksummed
        return store

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        buffer = await super().get(key, prototype, byte_range)
        if byte_range is not None:
            return buffer
        if key == "zarr.json" or key.endswith("/zarr.json"):
            if buffer is not None:
                self._note_metadata(key.removesuffix("zarr.json").rstrip("/"), buffer)
            return buffer
        parsed = _split_chunk_key(key)
        if parsed is None or parsed[0] not in self._checksummed:
            return buffer
        array, coords = parsed
        if buffer is None:
            if self.manifest is not None and self.manifest.expects(array, coords):
                raise StoreDamagedError(self.root, array, chunk_key(coords), "missing",
                                        "chunk file is missing (deleted?) although the writer wrote it")
        elif self._checksummed[array]:
            check_crc(buffer.as_numpy_array(), self.root, array, chunk_key(coords))
        return buffer

    def _note_metadata(self, array: str, buffer: Buffer) -> None:
        try:
            meta = json.loads(buffer.to_bytes())
        except ValueError:
            return
        if meta.get("node_type") != "array":
            return
        encoding = meta.get("chunk_key_encoding") or {}
        if encoding.get("name") != "default" or (encoding.get("configuration") or {}).get("separator", "/") != "/":
            return  # keys we do not parse: zarr's own checks only
        codecs = meta.get("codecs") or []
        self._checksummed[array] = bool(codecs) and (codecs[-1].get("name") if isinstance(codecs[-1], dict)
                                                     else codecs[-1]) == "crc32c"


def chunk_grid(shape: tuple[int, ...], chunks: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """Every chunk's coordinates, in order."""
    return itertools.product(*[range(-(-s // c)) for s, c in zip(shape, chunks)])


def present_chunks(directory: Path) -> set[tuple[int, ...]]:
    """The coordinates of the chunk files under an array folder (`directory/c/...`), by listing."""
    found: set[tuple[int, ...]] = set()
    root = directory / "c"

    def walk(folder: Path, prefix: tuple[int, ...]) -> None:
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if not entry.name.isdigit():
                continue
            coords = prefix + (int(entry.name),)
            if entry.is_dir(follow_symlinks=False):
                walk(Path(entry.path), coords)
            else:
                found.add(coords)

    walk(root, ())
    return found


def find_missing(store: Path, array: str, shape: tuple[int, ...], chunks: tuple[int, ...],
                 manifest: ChunkManifest) -> list[str]:
    """Chunk keys of `array` the manifest expects but the folder lacks (sorted by coordinates)."""
    present = present_chunks(store / array)
    return [chunk_key(coords) for coords in chunk_grid(shape, chunks)
            if coords not in present and manifest.expects(array, coords)]


def verify_array(store: Path, array: str, shape: tuple[int, ...], chunks: tuple[int, ...], checksummed: bool,
                 manifest: ChunkManifest) -> int:
    """Check every chunk of `array`: each one the manifest expects is there, and each one there has a
    good crc32c (when the array has the codec). Returns how many chunk files were checked."""
    checked = 0
    for coords in chunk_grid(shape, chunks):
        key = chunk_key(coords)
        try:
            data = (store / array / key).read_bytes()
        except FileNotFoundError:
            if manifest.expects(array, coords):
                raise StoreDamagedError(store, array, key, "missing",
                                        "chunk file is missing (deleted?) although the writer wrote it") from None
            continue
        if checksummed:
            check_crc(data, store, array, key)
        checked += 1
    return checked
