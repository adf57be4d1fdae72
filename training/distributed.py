"""Data-parallel training under ``torchrun`` / ``accelerate launch`` (any number of processes).

Every rank holds the whole (frozen) model and the same LoRA/token initialisation (seeded); each takes its own
slice of every global batch (``data.BatchPlan``); the LoRA and token-row gradients (and the loss, for logging)
are averaged across ranks, either in one flat all-reduce after the backward (:func:`average`,
``train.dp_allreduce: flat``) or in ~25 MB buckets launched from gradient hooks while the backward still runs
(:class:`OverlappedAverage`, ``overlap``, as DDP does); only rank 0 writes checkpoints, samples and the archive.
Checkpoints hold the full state, so a run can resume with a different number of processes.

A rank that dies makes the others fail at their next all-reduce (gloo/NCCL report the closed peer, and the
process group's timeout bounds any wait), and ``torchrun`` stops the job: nothing hangs. A failure of rank 0
before training (its output probe or run lock) is broadcast to the others (:func:`share_setup_result`), so they
stop at once with its message instead of waiting for the timeout.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)
TIMEOUT_ENV = "QZP_DIST_TIMEOUT_S"
BUCKET_ENV = "QZP_DP_BUCKET_MB"  # bucket size of ``dp_allreduce: overlap`` in MB (default 25, DDP's bucket_cap_mb)
DEFAULT_BUCKET_MB = 25.0
# NVLink multicast (NVLS) stays off in every process group this package starts or launches: a program using it can
# take a host's GPUs out of service. NCCL reads these when its communicators are created.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
_SETUP_BYTES = 4096  # rank 0's setup result: a flag byte and its error message (UTF-8, truncated)


class RankLostError(RuntimeError):
    """Another training process exited or stopped answering during a collective operation."""


class MainSetupError(RankLostError):
    """Rank 0 could not prepare the run (output folder, run lock): the other ranks stop with its message."""


def multicast_off_env(env: dict | None = None) -> dict:
    """``env`` (default: this process's environment) with NVLink multicast switched off, for a launcher's children."""
    return {**(os.environ if env is None else env), **MULTICAST_OFF}


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
            os.environ.update(MULTICAST_OFF)  # also when started by a launcher that did not set them
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
        dist.init_process_group(backend=backend, timeout=timeout)
    logger.info("data parallel: rank %d of %d (local rank %d, backend %s)", rank, world, local_rank, dist.get_backend())
    return DistContext(rank, world, local_rank)


def average(ctx: DistContext, tensors: list[torch.Tensor], step: int) -> None:
    """In-place mean of ``tensors`` across ranks with one flat all-reduce."""
    if not ctx.enabled or not tensors:
        return
    import torch.distributed as dist

    flat = _flatten(tensors)
    try:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    except RuntimeError as e:  # gloo/NCCL report a closed peer or a timeout as (subclasses of) RuntimeError
        raise _lost(ctx, step, e) from e
    _unflatten_mean(flat, tensors, ctx.world)


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])


def _unflatten_mean(flat: torch.Tensor, tensors: list[torch.Tensor], world: int) -> None:
    """``flat`` (the ranks' sum) divided by ``world``, copied back into ``tensors``: the same operations for the
    flat and the bucketed all-reduce, so both give the same bits."""
    flat /= world
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset: offset + n].view_as(t).to(t.dtype))
        offset += n


def _lost(ctx: DistContext, step: int, e: BaseException) -> RankLostError:
    return RankLostError(
        f"rank {ctx.rank}: lost the other training processes in the gradient all-reduce at step {step} "
        f"(a rank exited or was killed: see its log). Stopping; continue later with --resume from the last "
        f"checkpoint. ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    )


def bucket_bytes() -> int:
    """The overlap's bucket size in bytes: ``QZP_DP_BUCKET_MB`` (default 25 MB, DDP's ``bucket_cap_mb``)."""
    from .config import ConfigError

    raw = os.environ.get(BUCKET_ENV, "")
    try:
        mb = float(raw) if raw.strip() else DEFAULT_BUCKET_MB
    except ValueError:
        raise ConfigError(f"{BUCKET_ENV}={raw!r} is not a number of MB; unset it or set e.g. 25") from None
    if not 0 < mb < float("inf"):
        raise ConfigError(f"{BUCKET_ENV}={raw!r} must be a positive number of MB, e.g. 25")
    return max(1, int(mb * 2**20))


class OverlappedAverage:
    """The ranks' mean of ``params``' gradients, all-reduced in buckets while the backward still runs.

    As DDP's reducer: the parameters, in reverse of the order the forward uses them (pass them in forward order:
    the token rows, then the LoRA in module order), are split into buckets of about ``bucket_bytes`` (float32);
    a hook after each gradient's accumulation (``Tensor.register_post_accumulate_grad_hook``) counts down its
    bucket, and a bucket whose gradients are all there starts its asynchronous all-reduce at once, so the
    communication runs beside the rest of the backward. Buckets start strictly in order on every rank (a ready
    bucket waits for the one before it): collectives must be issued in the same order everywhere, and a rank
    whose batch leaves a parameter without gradient (it reaches the bucket only in :meth:`finish`, as zeros)
    must not reorder them. :meth:`finish` starts what is left, waits for every bucket (``work.wait()``: on CUDA
    the compute stream waits for NCCL's, the host does not) and writes the means back into ``.grad``. Each
    bucket's sum, division and cast back are :func:`average`'s, element by element, so the result is the flat
    all-reduce's. Nothing here reads a tensor's value on the host: which bucket starts when depends only on
    which hooks ran.

    Usage per step: ``begin(loss, step)``; ``loss.backward()``; ``loss = finish()`` (the mean loss, shape (1,)).
    """

    def __init__(self, ctx: DistContext, params: list[torch.Tensor], cap_bytes: int | None = None):
        self.ctx = ctx
        self.params = list(params)
        cap = cap_bytes or bucket_bytes()
        self.buckets: list[list[torch.Tensor]] = []
        current, size = [], 0
        for p in reversed(self.params):
            current.append(p)
            size += p.numel() * 4  # reduced in float32
            if size >= cap:
                self.buckets.append(current)
                current, size = [], 0
        if current:
            self.buckets.append(current)
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]
        self._armed = False
        self._reset(-1)

    def _reset(self, step: int) -> None:
        self.step = step
        self._waiting = [{id(p) for p in b} for b in self.buckets]  # parameters whose gradient has not arrived
        self._next = 0  # the next bucket to start (they start in order)
        self._works: list = []  # (work, flat, tensors) per started bucket
        self._error: BaseException | None = None
        self._late: torch.Tensor | None = None
        self._loss = None

    def begin(self, loss: torch.Tensor, step: int) -> None:
        """Before ``loss.backward()``: start the loss's all-reduce (first on every rank) and arm the hooks."""
        self._reset(step)
        loss = loss.detach().reshape(1).to(torch.float32).clone()
        self._loss = (self._start([loss]), loss)
        self._armed = True

    def _start(self, tensors: list[torch.Tensor]):
        import torch.distributed as dist

        if self._error is not None:  # an earlier start failed: finish() reports it
            return None
        flat = _flatten(tensors)
        try:
            return dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True), flat, tensors
        except RuntimeError as e:  # raised again by finish(), outside the autograd engine
            self._error = e
            return None

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._armed:
            return  # a backward outside a training step (none in this package): nothing to reduce
        i = self._bucket_of[id(p)]
        if i < self._next:  # a second accumulation into a gradient already sent (a reentrant backward)
            self._late = p
            return
        self._waiting[i].discard(id(p))
        while self._next < len(self.buckets) and not self._waiting[self._next]:
            self._launch(self._next)

    def _launch(self, i: int) -> None:
        grads = []
        for p in self.buckets[i]:
            if p.grad is None:  # no gradient on this rank this step (the flat path's zeros, too)
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        self._works.append(self._start(grads))
        self._next = i + 1

    def finish(self) -> torch.Tensor:
        """After ``loss.backward()``: start the buckets left, wait for all, write the means; the mean loss."""
        self._armed = False
        while self._next < len(self.buckets):
            self._launch(self._next)
        if self._late is not None:
            raise RuntimeError(
                f"train.dp_allreduce: overlap: a gradient (shape {list(self._late.shape)}) was accumulated again "
                "after its bucket was sent (the backward visits it twice); set train.dp_allreduce: flat")
        started = [self._loss[0], *self._works]
        if self._error is not None or any(s is None for s in started):
            raise _lost(self.ctx, self.step, self._error or RuntimeError("an all-reduce did not start"))
        for work, flat, tensors in started:
            try:
                work.wait()
            except RuntimeError as e:
                raise _lost(self.ctx, self.step, e) from e
            _unflatten_mean(flat, tensors, self.ctx.world)
        return self._loss[1]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._armed = False


class WaitTimer:
    """How long each step waits for its gradient all-reduce, read without syncing the host inside the step.

    On CUDA two events bracket the wait on the compute stream; a pair is read once the device has passed it
    (``query()``, non-blocking) or at the end of the run. Elsewhere (gloo on a CPU) the host's clock does: the
    wait blocks the host there anyway."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: list[float] = []
        self._pending: list = []
        self._t0 = 0.0

    def start(self) -> None:
        if self.cuda:
            self._collect(block=False)
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._pending.append([start, None])
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending[-1][1] = end
        else:
            self.seconds.append(time.perf_counter() - self._t0)

    def _collect(self, block: bool) -> None:
        while self._pending and self._pending[0][1] is not None and (block or self._pending[0][1].query()):
            start, end = self._pending.pop(0)
            if block:
                end.synchronize()
            self.seconds.append(start.elapsed_time(end) / 1000.0)

    def results(self) -> list[float]:
        """Every finished step's wait in seconds (on CUDA this waits for the last recorded events)."""
        self._collect(block=True)
        return list(self.seconds)


def share_setup_result(ctx: DistContext, error: BaseException | None) -> None:
    """Rank 0's setup outcome to every rank, before the others go on: ``error`` (rank 0's, or None) is raised
    again on rank 0; the other ranks raise :class:`MainSetupError` with its message instead of waiting for rank 0
    at their next collective until the timeout. Without data parallelism: raises ``error`` if any."""
    if not ctx.enabled:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    buf = torch.zeros(_SETUP_BYTES, dtype=torch.uint8)
    if ctx.is_main and error is not None:
        text = f"{error.__class__.__name__}: {error}".encode("utf-8")[: _SETUP_BYTES - 1]
        buf[0] = 1
        buf[1: 1 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    dev = ctx.device()
    payload = buf.to(dev)
    try:
        dist.broadcast(payload, src=0)
    except RuntimeError as e:
        if error is not None:
            raise error from e
        raise RankLostError(f"rank {ctx.rank}: lost the other training processes before training, while rank 0 "
                            f"checked the output folder ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if error is not None:
        raise error
    got = payload.cpu()
    if int(got[0]):
        message = bytes(got[1:].tolist()).rstrip(b"\0").decode("utf-8", errors="replace")
        raise MainSetupError(f"rank {ctx.rank}: stopping because rank 0 could not prepare the run: {message}")


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
