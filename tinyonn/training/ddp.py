"""Data-parallel training: the same loop on every rank of a torchrun launch, through PyTorch's
DistributedDataParallel.

    torchrun --nproc_per_node 2 -m tinyonn train --run R        # or python -m torch.distributed.run

Every rank builds the same deterministic data plan (`tinyonn.training.batches`) and takes a disjoint
slice of every optimiser step: micro-batch m of the step goes to rank m % N. A step whose
micro-batches do not divide evenly gives the ranks with fewer a zero-weight pass (the step's
shortest sample, its loss multiplied by 0), so every rank runs the same number of forward/backward
passes; all but the last run under `no_sync`, and the last one's backward all-reduces the
accumulated gradients. The all-reduce SUMS them (a DDP comm hook; DDP's default averages): every
micro-batch's loss is already normalised by the whole step's token counts, so the sum over ranks is
exactly the gradient a single process computes over the whole step (up to the order of the float
sums). The step's loss parts and per-expert token counts are summed over the ranks the same way,
before anything reads them.

So everything the update rule reads — each expert's surprise (from `.grad` after the all-reduce),
PI (from the summed loss, entropy and the global gradient norm), act_k (from the summed token counts)
and the non-finite check — is the same on every rank, every rank zeroes the same experts' gradients
and `MaskedAdamW` makes the same update: the replicas stay identical without another broadcast.

Rank 0 alone writes the run's files (`log.jsonl`, checkpoints, `model/`, `summary.json`); rank r > 0
logs into `ranks/log-rank<r>.jsonl` (the same reduced values: a check that the ranks agree). A
resumed run loads rank 0's newest checkpoint on every rank. A SIGTERM/SIGINT on any rank stops every
rank at the end of the same step (an all-reduce of the flag), rank 0 checkpoints, and each rank then
re-raises the signal. Held-out evaluation runs on rank 0 only.
"""

from __future__ import annotations

import inspect
import signal
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tinyonn import distributed
from tinyonn.training.batches import MicroBatch, PlannedStep
from tinyonn.training.loop import Trainer


class IdleRankWarning(RuntimeWarning):
    """Some training steps have fewer micro-batches than ranks x passes: GPU time goes to zero-weight passes."""


def sum_allreduce_hook(process_group, bucket):
    """DDP comm hook: all-reduce a gradient bucket (`dist.GradBucket`) as a SUM (DDP's default
    divides by the world size); returns the future of the reduced buffer. (No annotations: DDP
    checks them against the real classes, and this module's are strings.)"""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def rank_share(count: int, world: distributed.World) -> list[int]:
    """The micro-batches (indices into a step's `count`) that `world.rank` runs: m % size == rank."""
    return list(range(world.rank, count, world.size))


def passes_per_rank(count: int, world: distributed.World) -> int:
    """Forward/backward passes every rank makes in a step of `count` micro-batches (ceil(count / N))."""
    return max(1, -(-count // world.size))


def _no_buffer_sync() -> dict:
    """DDP's option that skips broadcasting the buffers before every forward (they are the same
    static tables on every rank): `forward_sync_buffers` where this torch has it, else the older
    `broadcast_buffers`."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class DistributedTrainer(Trainer):
    """`Trainer` on one rank of a data-parallel run (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.world = distributed.init(self.device)
        self.device = distributed.rank_device(self.config.device, self.world)
        self.use_autocast = self.config.autocast and self.device.type == "cuda"
        if not self.world.main:  # rank 0 writes the run's files and evaluates
            self.validation = []
            self.log_path = self.out_dir / "ranks" / f"log-rank{self.world.rank}.jsonl"
        short = sum(len(planned.layout) % self.world.size != 0 for planned in self.plan)
        if short and self.world.main:
            warnings.warn(f"{short} of {len(self.plan)} steps do not split into {self.world.size} equal shares of "
                          f"micro-batches: ranks with fewer make zero-weight passes (idle GPU time); set "
                          f"step_tokens (packed: a multiple of {self.world.size} x micro_batch_tokens) or grad_accum "
                          f"to a multiple of {self.world.size}", IdleRankWarning, stacklevel=3)

    # -- set-up

    def _clear_outputs(self) -> None:
        if self.world.main:
            super()._clear_outputs()
        else:
            self.log_path.unlink(missing_ok=True)

    def _resume_log(self) -> None:
        """Rank 0's log is cut back to the checkpoint; another rank's log restarts at the resume."""
        if self.world.main:
            super()._resume_log()
        else:
            self.log_path.unlink(missing_ok=True)

    def _prepare(self, resume: bool) -> None:
        distributed.barrier(self.world)  # nobody reads or clears the outputs while another rank still sets up
        if not self.world.main:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        super()._prepare(resume)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # find_unused_parameters: a parameter no pass reached (an empty shared expert) is not waited for
        self.ddp = DistributedDataParallel(self.model, device_ids=device_ids, find_unused_parameters=True,
                                           **_no_buffer_sync())
        self.ddp.register_comm_hook(None, sum_allreduce_hook)
        self.forward_model = self.ddp
        if self.config.compile:
            self.forward_model = torch.compile(self.ddp, backend=self.config.compile_backend if self.layers
                                               else "inductor")
        distributed.barrier(self.world)

    # -- one step

    def _accumulate(self, planned: PlannedStep, sums: dict) -> None:
        """This rank's micro-batches of the step (the last pass all-reduces the gradients), then the
        step's sums added over the ranks."""
        mine = [planned.layout[m] for m in rank_share(len(planned.layout), self.world)]
        passes = passes_per_rank(len(planned.layout), self.world)
        work: list[tuple[MicroBatch, bool]] = [(micro, True) for micro in mine]
        work += [(self._idle_micro_batch(planned), False)] * (passes - len(mine))
        for index, (micro, counted) in enumerate(work):
            last = index == len(work) - 1
            with self.ddp.no_sync() if not last else nullcontext():
                if counted:
                    self._micro_batch(micro, planned, sums)
                else:
                    self._micro_batch(micro, planned, {key: value.clone() for key, value in sums.items()}, scale=0.0)
        keys = sorted(sums)
        flat = torch.cat([sums[key].reshape(-1).to(torch.float64) for key in keys])
        distributed.all_reduce_sum(flat, self.world)
        at = 0
        for key in keys:
            size = sums[key].numel()
            sums[key] = flat[at:at + size].reshape(sums[key].shape).to(sums[key].dtype)
            at += size

    def _idle_micro_batch(self, planned: PlannedStep) -> MicroBatch:
        """A one-sample micro-batch of the step (its shortest sample): the pass a rank with no
        micro-batch left makes, weighted 0, so that every rank joins the gradient all-reduce."""
        samples = [i for micro in planned.layout for i in micro.samples]
        shortest = min(samples, key=lambda i: (len(self.arrays[i].ids), i))
        length = -(-len(self.arrays[shortest].ids) // self.config.pad_to_multiple) * self.config.pad_to_multiple
        return MicroBatch(rows=((shortest,),), length=length, num_rows=1)

    def _stop_requested(self, signals) -> bool:
        """Stop when any rank received SIGTERM/SIGINT; a rank that did not gets SIGTERM recorded,
        so every rank checkpoints (rank 0 writes) and re-raises the same way."""
        if distributed.any_rank(signals.received is not None, self.world):
            if signals.received is None:
                signals.received = signal.SIGTERM
            return True
        return False

    # -- outputs: rank 0 only

    def _checkpoint(self) -> None:
        if self.world.main:
            super()._checkpoint()
            return
        if self._last_saved_step != self.state.step:
            self._flush()
            self._log_file.flush()
            self._last_saved_step = self.state.step

    def _finish(self, resumed_from: int | None) -> dict:
        if self.world.main:
            summary = super()._finish(resumed_from)
        else:
            summary = self._summary(resumed_from, interrupted=False)
        distributed.barrier(self.world)  # the saved model exists for every rank once this returns
        summary["world_size"] = self.world.size
        return summary
