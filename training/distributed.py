"""Data-parallel training under ``torchrun`` / ``accelerate launch`` (any number of processes).

Every rank holds the whole (frozen) model and the same LoRA/token initialisation (seeded); each takes its own
slice of every global batch (``data.BatchPlan``); the LoRA and token-row gradients (and the loss, for logging)
are averaged across ranks in one flat all-reduce per step; only rank 0 writes checkpoints, samples and the
archive. Checkpoints hold the full state, so a run can resume with a different number of processes.

A rank that dies makes the others fail at their next all-reduce (gloo/NCCL report the closed peer, and the
process group's timeout bounds any wait), and ``torchrun`` stops the job: nothing hangs.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)
TIMEOUT_ENV = "QZP_DIST_TIMEOUT_S"


class RankLostError(RuntimeError):
    """Another training process exited or stopped answering during a collective operation."""


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def from_env() -> DistContext:
    """Join the process group torchrun / accelerate launch describe in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
        dist.init_process_group(backend=backend, timeout=timeout)
    logger.info("data parallel: rank %d of %d (local rank %d, backend %s)", rank, world, local_rank, dist.get_backend())
    return DistContext(rank, world, local_rank)


def average(ctx: DistContext, tensors: list[torch.Tensor], step: int) -> None:
    """In-place mean of ``tensors`` across ranks with one flat all-reduce."""
    if not ctx.enabled or not tensors:
        return
    import torch.distributed as dist

    flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
    try:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    except RuntimeError as e:  # gloo/NCCL report a closed peer or a timeout as (subclasses of) RuntimeError
        raise RankLostError(
            f"rank {ctx.rank}: lost the other training processes in the gradient all-reduce at step {step} "
            f"(a rank exited or was killed: see its log). Stopping; continue later with --resume from the last "
            f"checkpoint. ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    flat /= ctx.world
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset: offset + n].view_as(t).to(t.dtype))
        offset += n


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
