"""Workarounds for ``torch.compile`` bugs that the training step met, each harmless where the bug is absent.

**inductor's** ``CantSplit`` **(torch 2.11).** ``SIMDKernel._split_iteration_ranges`` rejects a candidate tiling of
a fused kernel by raising ``CantSplit``, which ``SIMDKernel.is_compatible`` catches to try the next tiling. In torch
2.11 one of those raises is bare (``raise CantSplit``) while the class's ``__init__`` requires ``(expr,
remaining)``: the raise itself fails with a ``TypeError`` that nothing catches, and the whole compile dies with
``InductorError: TypeError: CantSplit.__init__() missing 2 required positional arguments: 'expr' and 'remaining'``.
Qwen-Image 2.1's real-arithmetic RoPE (``rope.py``) met it on an H200 when inductor tiled its backward over the joint
4227-token text+image sequence (4227 = 3 x 1409 splits badly). Later torch passes the arguments at every raise (2.13
does). Giving the two arguments defaults turns the bare raise back into what it meant: that tiling is rejected, and
inductor picks another.
"""

from __future__ import annotations

import inspect
import logging

logger = logging.getLogger(__name__)


def _defaults_for_cantsplit(cls) -> bool:
    """Give ``cls.__init__(self, expr, remaining)`` defaults (None); False where it already takes no arguments or
    has another signature (a torch that changed the class: leave it alone)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if [p.name for p in params] != ["expr", "remaining"] or all(p.default is not p.empty for p in params):
        return False
    original = cls.__init__

    def __init__(self, expr=None, remaining=None):
        original(self, expr, remaining)

    cls.__init__ = __init__
    return True


def install() -> bool:
    """Apply the workarounds for the installed torch (idempotent). Returns whether anything was changed."""
    try:
        from torch._inductor.codegen.simd import CantSplit
    except ImportError:  # a torch without inductor's SIMD code generation: nothing to fix
        return False
    changed = _defaults_for_cantsplit(CantSplit)
    if changed:
        logger.debug("torch inductor: CantSplit() may be raised without arguments (torch 2.11 bug, compile_fixes.py)")
    return changed


__all__ = ["install"]
