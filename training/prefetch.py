"""Copying streamed weights to the GPU ahead of their use (``model.offload``), on a side stream.

``offload.OffloadedLinear`` layers kept in pinned CPU memory need their weight on the GPU for each forward and
backward use. Copied at the moment of use, on the compute stream, every copy stalls the GPU's compute: on a 24 GB
card training Qwen-Image that is tens of GB a step crossing PCIe while no kernel runs. A training step uses the
streamed layers in the same order every step (the forward, then the backward's recomputation and matmuls, in
autograd's fixed order), so :class:`WeightPrefetcher` records the order of one step and, from the next, copies
the coming weights on its own CUDA stream while the compute stream works on the current ones.

The copies go into one preallocated GPU buffer (the *arena*, ``arena_bytes``) used as a ring: each weight gets the
next free range; a range is written again only after the compute stream has passed the kernel that read the
weight there (an event recorded on the compute stream when the layer is :meth:`done <WeightPrefetcher.fetch>`
with it; the copy stream waits on it, the host never does). So the GPU memory for streaming is fixed at
``arena_bytes`` however far the host runs ahead of the GPU, and no host-side synchronization is added: the
caching allocator's per-stream pools would instead grow with every queued copy (``record_stream``) and, at a
memory cap, free its cache and synchronize.

A weight used twice close together (a recomputed block: its forward again in the backward, then the backward's
own products, which read the same weights) is copied once: where the range of its previous use in this step is
still in the ring when the second use is due, the second use is served from it (the range is then held until both
uses are done). With gradient checkpointing that saves one of the three crossings of each streamed block's weights
per step.

When a step uses the layers in another order than the last (the first step, which also builds the text encoder's
prefix cache; a sampling pass between steps), a layer not found further on in the last step's order is copied at
use on the compute stream, as without a prefetcher; a layer found further on resumes the order from there (what
was skipped is dropped). The step's own order is what the next step follows.

What a CPU cannot show (the copies there are synchronous): that ``done`` comes only after the readers are queued,
and the overlap itself; the ring's bookkeeping, the order tracking and the results are tested on the CPU
(``tests/test_prefetch.py``), the overlap measured on a GPU (docs/benchmarks.md). On a CPU device (the tests)
the streams are absent and every copy is immediate; the order tracking, the ring and the counters work the same.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

_ALIGN = 512  # bytes: every range starts aligned for any dtype and for vectorized kernels
_MAX_ORDER = 1 << 20  # fetches recorded at most between two steps (a step of Qwen-Image streams under 2,000)


@dataclass(eq=False)  # identity: two ranges are never the same range
class _Range:
    start: int
    end: int
    ready: object  # event recorded on the copy stream after the copy (None on a CPU device)
    waiting: int = 1  # coming fetches this range will serve (issued, not yet handed out)
    out: int = 0  # fetches handed out whose readers are not yet queued
    alive: bool = True  # False once a later copy overwrote (part of) it
    release: object = None  # event recorded on the compute stream after the latest use (CUDA)

    @property
    def busy(self) -> bool:
        """Not to be overwritten: a fetch still to come reads it, or one in use has its readers not queued yet."""
        return self.waiting > 0 or self.out > 0


class WeightPrefetcher:
    """Copies the weights of streamed layers into a fixed GPU ring buffer ahead of use (see the module docstring).

    ``fetch(owner)`` returns ``(tensor, done)``: the owner's stored weight on ``device`` (a list of them for an owner
    with ``parts``, copied as one range) and a callable to call once the kernels reading it are queued.
    ``begin_step()`` starts a training step: the order recorded since the last one becomes the order to prefetch in.
    """

    def __init__(self, device: torch.device, arena_bytes: int, share: bool = True):
        self.device = torch.device(device)
        self.share = bool(share)  # a second use served from the first's range while it is still in the ring
        if arena_bytes <= 0:
            raise ValueError(f"WeightPrefetcher: arena_bytes must be positive, got {arena_bytes}")
        self.arena_bytes = int(arena_bytes)
        self.cuda = self.device.type == "cuda"
        self.arena = torch.empty(self.arena_bytes, dtype=torch.uint8, device=self.device)
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        if self.cuda:  # freed with the prefetcher: the allocator then waits for copies still queued on this stream
            self.arena.record_stream(self.copy_stream)
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # after the arena's allocation
        self._order: list = []  # the layers in the order the last step fetched them
        self._seen: list = []  # this step's so far
        self._pos = 0  # index in _order of the next fetch expected
        self._next = 0  # index in _order of the next copy to issue
        self._head = 0  # arena offset after the newest range
        self._issued: dict[int, _Range] = {}  # index in _order -> its range, copied and not yet handed out
        self._live: list[_Range] = []  # every range the arena holds, oldest first
        self._where: dict[int, list[int]] = {}  # id(layer) -> its positions in _order
        self._prev: dict[int, int] = {}  # index in _order -> the index of the same layer's previous fetch there
        self._range_at: dict[int, _Range] = {}  # index in _order -> the range that served it, this step
        self.hits = 0  # fetches served from a copy made ahead
        self.misses = 0  # fetches copied at use (the first step, an order change, a weight larger than the arena)
        self.shared = 0  # fetches served ahead from the range of the same weight's previous use (no copy)
        self.bytes_copied = 0  # host-to-device bytes, ahead and at use
        self.block_fetch_warned = False  # offload.StreamedBlock's warning that a block does not fit: once per ring

    # ---- the step ----------------------------------------------------------------------------------------------
    def begin_step(self) -> None:
        for rng in self._live:  # handed out and never released (a step that failed mid-use): its readers, if
            if rng.out:  # any, were queued before now, so an event here releases it
                rng.out = 1
                self._release(rng)
        self._abandon()
        self._order, self._seen = self._seen, []
        self._where, self._prev, self._range_at = {}, {}, {}
        last: dict[int, int] = {}
        for i, owner in enumerate(self._order):
            self._where.setdefault(id(owner), []).append(i)
            if id(owner) in last:
                self._prev[i] = last[id(owner)]
            last[id(owner)] = i
        self._pos = self._next = 0
        self._top_up()  # the first weights start crossing while the host prepares the step

    def fetch(self, owner) -> tuple[torch.Tensor, object]:
        """``owner.stored`` (pinned CPU memory) on the GPU, and the callable to call once its readers are queued."""
        if len(self._seen) < _MAX_ORDER:  # (outside training, e.g. sampling after the last step, nothing resets it)
            self._seen.append(owner)
        idx = self._find(owner)
        if idx is not None:
            if idx != self._pos:  # the step skipped part of the last one's order (e.g. a first-step-only pass)
                for j in range(self._pos, idx):
                    skipped = self._issued.pop(j, None)
                    if skipped is not None:
                        skipped.waiting -= 1
                self._next = max(self._next, idx)
            self._pos = idx + 1
            if idx == self._next:  # not copied yet (the arena was full of weights still in use): try now
                self._issue_one()
            rng = self._issued.pop(idx, None)
            if rng is not None:
                self.hits += 1
                rng.waiting -= 1
                rng.out += 1
                if self.cuda:
                    torch.cuda.current_stream(self.device).wait_event(rng.ready)
                tensor = self._view(rng, owner)
                self._top_up()
                return tensor, self._release_once(rng)
            self._next = max(self._next, self._pos)  # copied at use below: the copies go on from the next one
        else:  # not in the rest of the last step's order: copied at use; the order resumes where a layer matches
            self._abandon()
        self.misses += 1
        parts = _parts(owner)
        self.bytes_copied += sum(t.numel() * t.element_size() for t in parts)
        tensor = [t.to(self.device, non_blocking=True) for t in parts]
        tensor = tensor if _is_multi(owner) else tensor[0]
        self._top_up()  # the next layers' copies start now (after a weight too large for the ring, say)
        return tensor, no_release

    def stats(self) -> dict:
        return {"arena_gib": round(self.arena_bytes / 2**30, 3), "hits": self.hits, "misses": self.misses,
                "shared": self.shared, "gib_copied": round(self.bytes_copied / 2**30, 3),
                "layers_per_step": len(self._order)}

    def _find(self, owner) -> int | None:
        """The first position at or after the expected one where the last step fetched ``owner``."""
        if self._pos < len(self._order) and self._order[self._pos] is owner:
            return self._pos
        places = self._where.get(id(owner), ())
        i = bisect.bisect_left(places, self._pos)
        return places[i] if i < len(places) else None

    # ---- the ring ----------------------------------------------------------------------------------------------
    def _release(self, rng: _Range) -> None:
        if rng.out <= 0:  # already released by begin_step (a step that failed mid-use)
            return
        rng.out -= 1
        # The latest use's event is the one the copy stream waits for before overwriting the range. It follows every
        # earlier use of a shared range because all of them release on the same (compute) stream: autograd runs a
        # backward on its forward's stream, and each ``done`` comes right after its kernel is queued.
        if self.cuda:
            rng.release = torch.cuda.Event()
            rng.release.record(torch.cuda.current_stream(self.device))

    def _release_once(self, rng: _Range):
        """The ``done`` callable of one fetch served from ``rng``: releases that fetch's use once, however often
        it is called (a range may serve two fetches, each with its own ``done``)."""
        pending = [True]

        def done() -> None:
            if pending[0]:
                pending[0] = False
                self._release(rng)
        return done

    def _abandon(self) -> None:
        """Copies made ahead that will not be used: their ranges may be overwritten (the copy stream's own order
        keeps a later copy after them)."""
        for rng in self._issued.values():
            rng.waiting -= 1
        self._issued.clear()
        self._next = self._pos

    def _top_up(self) -> None:
        # Keep the copy stream busy up to the arena's size ahead: stop at the first weight with no free range.
        while self._next < len(self._order) and self._issue_one():
            pass

    def _issue_one(self) -> bool:
        owner = self._order[self._next]
        prev = self._range_at.get(self._prev.get(self._next, -1)) if self.share else None
        if prev is not None and prev.alive:  # the same weight's previous use is still in the ring: no copy
            prev.waiting += 1
            self._range_at[self._next] = self._issued[self._next] = prev
            self._next += 1
            self.shared += 1
            return True
        parts = _parts(owner)
        offsets, span = _layout(parts)
        nbytes = sum(t.numel() * t.element_size() for t in parts)
        size = -(-span // _ALIGN) * _ALIGN
        if size > self.arena_bytes:
            logger.debug("prefetch: a %d-byte weight does not fit the %d-byte arena; copied at use", nbytes,
                         self.arena_bytes)
            return False
        start = self._head if self._head + size <= self.arena_bytes else 0
        end = start + size
        overlapping = [r for r in self._live if r.start < end and start < r.end]
        if any(r.busy for r in overlapping):
            return False  # a weight there is still waiting for its use, or in use with its readers not queued
        rng = _Range(start, end, None)
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                for r in overlapping:
                    if r.release is not None:
                        self.copy_stream.wait_event(r.release)
                for t, off in zip(parts, offsets):
                    self._at(rng.start + off, t).copy_(t, non_blocking=True)
                rng.ready = torch.cuda.Event()
                rng.ready.record(self.copy_stream)
        else:
            for t, off in zip(parts, offsets):
                self._at(rng.start + off, t).copy_(t)
        for r in overlapping:
            r.alive = False
        self.bytes_copied += nbytes
        self._live = [r for r in self._live if r not in overlapping] + [rng]
        self._head = end
        self._range_at[self._next] = self._issued[self._next] = rng
        self._next += 1
        return True

    def _view(self, rng: _Range, owner):
        """``owner``'s weight(s) where ``rng`` holds them: one tensor, or a list for an owner with ``parts``."""
        if not _is_multi(owner):
            return self._at(rng.start, owner.stored)
        parts = owner.parts
        return [self._at(rng.start + off, t) for t, off in zip(parts, _layout(parts)[0])]

    def _at(self, start: int, like: torch.Tensor) -> torch.Tensor:
        nbytes = like.numel() * like.element_size()
        return self.arena[start:start + nbytes].view(like.dtype).view(like.shape)


def _is_multi(owner) -> bool:
    """An owner of several weights fetched as one (``parts``: a streamed block's layers, offload.StreamedBlock)
    rather than one (``stored``)."""
    return getattr(owner, "parts", None) is not None


def _parts(owner) -> tuple:
    return owner.parts if _is_multi(owner) else (owner.stored,)


def _layout(parts) -> tuple[tuple[int, ...], int]:
    """Each part's byte offset in one range (each aligned) and the bytes the range spans."""
    offsets, at = [], 0
    for t in parts:
        at = -(-at // _ALIGN) * _ALIGN
        offsets.append(at)
        at += t.numel() * t.element_size()
    return tuple(offsets), at


def no_release() -> None:
    """The release callable of a weight that is not in the ring (copied at use): nothing to release."""
