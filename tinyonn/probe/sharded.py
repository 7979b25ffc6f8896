"""The probe sharded over the ranks of a torchrun launch: one score store, disjoint chunks, no locks.

    torchrun --nproc_per_node N -m tinyonn probe --run R ...

Every rank loads the teacher (on cuda:LOCAL_RANK) and encodes the same samples. Rank 0 creates the
store (or resumes it, or replaces it with `overwrite`); after a barrier the other ranks open it and
every rank takes the chunks still to do from rank 0's list, rank r the r-th of every N
(`shard`: on a fresh store rank r probes chunks k with k % N == r). A probe chunk is whole Zarr
chunks of every array it touches, so the ranks write disjoint chunk files; each records its chunks
in its own progress file (`ScoreStoreWriter(rank=r)`). After a second barrier rank 0 finalizes:
the summaries are the per-chunk float64 partial sums added in chunk order, exactly as one process
adds them, so the store is bitwise the one a single process writes. A killed run resumes with any
number of ranks: the progress files together say which chunks are done, and the chunks left are
dealt out again.

An error on rank 0 while it creates or finalizes the store is raised on every rank (no rank is left
waiting at a barrier).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tinyonn import distributed
from tinyonn.distributed import World
from tinyonn.store.zarr_store import ScoreStore, ScoreStoreError, ScoreStoreWriter


class ShardedProbeError(ScoreStoreError):
    """Rank 0 could not create, resume or finalize the store of a sharded probe (raised on every rank)."""


def shard(chunks: list[int], world: World) -> list[int]:
    """This rank's share of `chunks` (in order): the rank-th of every `world.size`."""
    return list(chunks[world.rank::world.size])


def _on_main(action: Callable[[], object], world: World, what: str):
    """Run `action` on rank 0; every rank learns whether it failed (and raises if so)."""
    result, failure = None, None
    if world.main:
        try:
            result = action()
        except Exception as err:  # re-raised below on rank 0, reported to the other ranks
            failure = err
    message = distributed.broadcast(None if failure is None else f"{type(failure).__name__}: {failure}", world)
    if failure is not None:
        raise failure
    if message is not None:
        raise ShardedProbeError(f"rank 0 could not {what}: {message}")
    return result


def open_writer(open_store: Callable[[bool, int | None], ScoreStoreWriter], path: str | Path, overwrite: bool,
                world: World) -> tuple[ScoreStoreWriter, list[int]]:
    """The store's writer on this rank and the chunks this rank probes.

    `open_store(overwrite, rank)` is `ScoreStoreWriter.open` of the store at `path` with everything
    else bound. One process: the writer and all of its pending chunks. Several: rank 0 creates,
    resumes or (with `overwrite`) replaces the store, the others open it once that is done, and the
    pending chunks are rank 0's list dealt out by `shard`.
    """
    if not world.distributed:
        writer = open_store(overwrite, None)
        return writer, writer.pending_chunks()
    writer = _on_main(lambda: open_store(overwrite, world.rank), world, "open the score store")
    if not world.main:
        if not (Path(path) / "zarr.json").is_file():
            raise ShardedProbeError(f"rank {world.rank} does not see the score store rank 0 created at {path}: "
                                    "every rank must write to one store, on a filesystem all nodes share")
        writer = open_store(False, world.rank)
    pending = distributed.broadcast(writer.pending_chunks() if world.main else None, world)
    return writer, shard(pending, world)


def finish(writer: ScoreStoreWriter, finalize: Callable[[ScoreStoreWriter], ScoreStore], world: World) -> ScoreStore:
    """Once every rank has written its chunks: rank 0 finalizes; every rank gets the finished store."""
    if not world.distributed:
        return finalize(writer)
    distributed.barrier(world)
    _on_main(lambda: finalize(writer), world, "finalize the score store")
    return ScoreStore.open(Path(writer.path))
