"""torch.distributed for Tiny-ONN: the process group of a `torchrun` launch and the few collectives
the sharded probe (`tinyonn.probe.sharded`) and data-parallel training (`tinyonn.training.ddp`) use.

    torchrun --nproc_per_node 2 -m tinyonn probe --run R ...     # or python -m torch.distributed.run

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process it
starts; `init` joins that group (nothing happens in a plain one-process run). The backend is NCCL
for CUDA tensors and gloo for CPU tensors (both in one group when CUDA is present, so barriers and
small host objects go through gloo); each rank uses the GPU `cuda:LOCAL_RANK`. The timeout of every
collective is `TINYONN_DIST_TIMEOUT` seconds (default 3600): a rank that waits at a barrier for a
slower one waits at most that long.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tinyonn.errors import TinyONNError

TIMEOUT_ENV = "TINYONN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600


class DistributedError(TinyONNError, RuntimeError):
    """The torchrun environment is inconsistent (a variable is missing or malformed)."""


@dataclass(frozen=True)
class World:
    """This process's place in the launch: rank, number of ranks, rank on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that creates, finalises and writes what is written once."""
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise DistributedError(f"WORLD_SIZE is set but {name} is not: launch with torchrun "
                                   "(or python -m torch.distributed.run), which sets RANK and LOCAL_RANK")
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def env_world() -> World:
    """The world torchrun's environment describes (WORLD_SIZE, RANK, LOCAL_RANK), whether or not the
    process group has been joined yet: one process without them."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World()
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < size:
        raise DistributedError(f"RANK={rank} is outside 0..WORLD_SIZE-1 ({size - 1})")
    return World(rank=rank, size=size, local_rank=local_rank)


def launched() -> bool:
    """Whether this process is one of several ranks (WORLD_SIZE > 1)."""
    return env_world().distributed


def world() -> World:
    """This process's world: the joined process group's, else the environment's."""
    if dist.is_available() and dist.is_initialized():
        return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=env_world().local_rank)
    return env_world()


def _timeout() -> timedelta:
    seconds = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        return timedelta(seconds=float(seconds))
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={seconds!r} is not a number of seconds") from None


def _uses_cuda(device: str | torch.device | None) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def init(device: str | torch.device | None = None) -> World:
    """Join the process group of a torchrun launch (a no-op in one process) and return the world.

    `device` is the device asked for (None: CUDA when available): on CUDA this rank's GPU becomes
    `cuda:LOCAL_RANK` and CUDA tensors go through NCCL; CPU tensors always go through gloo.
    """
    here = env_world()
    if not here.distributed:
        return here
    if not dist.is_initialized():
        if _uses_cuda(device):
            if torch.cuda.device_count() <= here.local_rank:
                raise DistributedError(f"LOCAL_RANK={here.local_rank} but this node has {torch.cuda.device_count()} "
                                       "GPU(s): start at most that many processes per node (--nproc_per_node)")
            torch.cuda.set_device(here.local_rank)
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=_timeout())
        _CPU_GROUP[:] = [None if backend == "gloo" else dist.new_group(backend="gloo", timeout=_timeout())]
        atexit.register(shutdown)
    return world()


def shutdown() -> None:
    """Leave the process group (registered at exit by `init`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUP.clear()


def rank_device(device: str | torch.device | None, here: World | None = None) -> torch.device:
    """This rank's device for a requested one: "cuda" (or None with CUDA present) → cuda:LOCAL_RANK
    when distributed; anything else as given."""
    here = here or world()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and here.distributed:
        return torch.device("cuda", here.local_rank)
    return device


def barrier(here: World | None = None) -> None:
    """Wait for every rank (a no-op in one process). Goes through gloo, so it works on any device."""
    here = here or world()
    if here.distributed:
        dist.barrier(group=_cpu_group())


def broadcast(value: Any, here: World | None = None, source: int = 0) -> Any:
    """`value` as rank `source` has it (any picklable object), on every rank."""
    here = here or world()
    if not here.distributed:
        return value
    box = [value if here.rank == source else None]
    dist.broadcast_object_list(box, src=source, group=_cpu_group())
    return box[0]


def all_reduce_sum(tensor: torch.Tensor, here: World | None = None) -> torch.Tensor:
    """Sum `tensor` over the ranks in place (every rank gets the same bits) and return it."""
    here = here or world()
    if here.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, here: World | None = None) -> bool:
    """Whether `flag` is true on at least one rank (the same answer everywhere)."""
    here = here or world()
    if not here.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_cpu_group())
    return bool(value.item())


_CPU_GROUP: list = []
"""[the gloo group of host-side collectives] once `init` has run (None: the default group is gloo)."""


def _cpu_group():
    """The gloo group of every rank for host-side collectives (None: the default group, when it
    is gloo or when the group was made outside `init`)."""
    return _CPU_GROUP[0] if _CPU_GROUP else None
