"""Python's garbage collector kept off the model's objects while training.

CPython's cyclic collector runs a full collection every so often, walking every tracked object of the process. A
loaded and compiled Qwen-Image holds millions of them (modules, parameters, compiled graphs and their guards), so
one full collection took ~560 ms of host time, and the step it fell in ran that much longer (an H200 at 24 GiB,
`bench_step --mode capped`: 6 full collections in 8 offloaded steps, the three slowest steps 1.75-1.96 s against
1.23-1.55 s; 4.2 s of collections in all, 0.12 s with the heap frozen). The objects that exist once the first step
has run (the model, the optimizer, the compiled code) live as long as training does, so :class:`FrozenHeap` moves
them into the collector's permanent generation (``gc.freeze``) after that step, and again after the next two (with
one freeze after the first step, a full collection still took 0.7-0.9 s in 8 steps: the next steps create
long-lived objects too; freezing those is not yet measured on a GPU). Collections then walk only what later steps
create. Each freeze collects first, so no garbage is frozen; a frozen object that becomes cyclic garbage later is
not collected until :meth:`FrozenHeap.release`, which training calls when it ends (also on an error), so a long-lived
host such as ComfyUI gets its collector back.

Where something else froze objects before (the GPU machine's Python had 375 frozen before training started), the
model is frozen all the same: skipping the freeze there (as until session 23) left the full collections walking the
model's ~1M objects, ~0.6 s each at 24 GiB. ``gc.unfreeze`` cannot tell their objects from ours, so
:meth:`~FrozenHeap.release` hands theirs back to the collector too (logged). That only costs them the walks they had
saved (or, before a ``fork``, shared pages); keeping ours frozen instead would keep a released model's cyclic garbage,
GPU tensors included, alive for the rest of the process.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger(__name__)

FREEZE_STEPS = 3  # training freezes the heap after each of its first steps, up to this many


class FrozenHeap:
    """``freeze()`` (collect, then ``gc.freeze``; may be called again), ``release()`` at the end (``gc.unfreeze``)."""

    def __init__(self) -> None:
        self.frozen = False
        self.theirs = 0  # objects frozen by someone else before the first freeze

    def freeze(self) -> bool:
        """Collect, then freeze every object that exists now (again: what was created since the last call, the
        collection then walking only that); False (nothing done) where the collector is off."""
        if not gc.isenabled():
            return False
        if not self.frozen:
            self.theirs = gc.get_freeze_count()
        gc.collect()
        gc.freeze()
        self.frozen = True
        logger.debug("heap: %d objects frozen out of the garbage collector's walks for the rest of training",
                     gc.get_freeze_count())
        return True

    def release(self) -> None:
        """Hand the frozen objects back to the collector (what :meth:`freeze` did, undone; also what others froze
        before, see the module's docstring)."""
        if self.frozen:
            self.frozen = False
            gc.unfreeze()
            if self.theirs:
                logger.info("heap: %d objects that were frozen before training are back in the garbage collector's "
                            "care with the model's (gc.unfreeze cannot tell them apart)", self.theirs)


__all__ = ["FREEZE_STEPS", "FrozenHeap"]
