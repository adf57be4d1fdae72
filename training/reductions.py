"""Inductor's persistent reductions widened to 4096-wide rows for the compiled training step (CUDA, Triton).

A *persistent* reduction holds a whole row in registers and reads it once; inductor's other form loops over the row
in chunks and, for a layer norm followed by a quantization, reads it again. Inductor makes a row-wise ("inner")
reduction persistent up to 1024 wide (``InductorChoices.should_use_persistent_reduction``). Qwen-Image's
norm-and-quantize kernels reduce 3072-wide rows (its hidden size), so they all take the looped form. Made persistent
up to 4096, on an H200 at 1024² under the 78 GiB cap (session 30, ``docs/benchmarks.md``), those kernels went from
~55 to 32-39 µs and the layer norm's backward from 73 to 46 µs: the step took 273.3 ms against 277.9 in the same
call, 6.3 ms less GPU time. As the default (session 31): 267.7 against 271.6 ms, and Qwen-Image 2.1 uncapped 263.6
against 266.6. Narrower reductions (the 128-wide q/k norms) keep inductor's own choice, and so do the
MLP's 12288-wide rows (``gelu_fp8.py`` has its own kernel for them).

How: inductor has no setting for that width, so :func:`install` wraps the method on inductor's choices *class*. A
choices handler (``V.set_choices_handler``) would be thread-local, and autograd compiles the backward graphs on its
own device thread: session 30 measured the handler moving the forward's kernels only. The changed choice is keyed
into inductor's and AOTAutograd's on-disk caches through a post-grad custom pass that changes nothing
(:class:`_CacheKey`): inductor puts a custom pass's ``uuid()`` into both caches' keys, so kernels compiled with and
without the wider choice are never mixed up. Where another post-grad pass is already set (the user's own), nothing
is installed, rather than replacing it.

Process-wide while installed (inductor's choices are): ``accelerate_transformer`` installs it for a compiled
training step and the trainers' ``close`` remove it where they installed it. The choice changes which kernel
inductor writes, not what it computes: the same sums, added in another order.
``QWEN_ZERO_PRIOR_PERSISTENT_MAX``: the width (default 4096), 0 keeps inductor's own choice.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

PERSISTENT_MAX = 4096  # Qwen-Image's 3072-wide rows, Qwen-Image 2.1's 4096; the 12288-wide MLP rows stay looped
ENV = "QWEN_ZERO_PRIOR_PERSISTENT_MAX"
_INDUCTOR_LIMIT = 1024  # inductor's own width for row reductions: a limit up to it changes nothing
_METHOD = "should_use_persistent_reduction"

_state: dict = {}  # while installed: "limit", "original" (the class's attribute as it was), "key" (the cache pass)


def limit_from_env() -> int:
    """``QWEN_ZERO_PRIOR_PERSISTENT_MAX``: unset or empty gives :data:`PERSISTENT_MAX`; 0 turns the change off."""
    raw = os.environ.get(ENV, "").strip()
    if raw == "":
        return PERSISTENT_MAX
    if not raw.isdigit():
        raise ValueError(f"{ENV}={raw!r}: expected a whole number of elements (0 keeps inductor's own choice, the "
                         f"default is {PERSISTENT_MAX})")
    return int(raw)


def wider_persistent(features, cooperative_reduction: bool, limit: int) -> bool:
    """Whether a kernel with these ``features`` reduces rows (inductor's INNER hint) of a fixed width up to
    ``limit``: what :func:`install` makes persistent besides inductor's own choice. Nothing where inductor's
    persistent reductions are off, for a cooperative reduction (split over blocks), along columns, or of a symbolic
    width (dynamic shapes)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.hints import ReductionHint

    if not inductor_config.triton.persistent_reductions or cooperative_reduction:
        return False
    if features.get_reduction_hint() != ReductionHint.INNER:
        return False
    try:
        width = int(features.reduction_numel)
    except TypeError:  # a symbolic width: inductor's own choice
        return False
    return width <= limit


def _cache_key_class():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class _CacheKey(CustomGraphPass):
        """A post-grad pass that changes nothing: its ``uuid`` carries the width into inductor's and AOTAutograd's
        cache keys (``FxGraphHashDetails``), the way inductor keys any custom pass."""

        def __init__(self, limit: int):
            self.limit = limit

        def __call__(self, graph) -> None:
            return None

        def uuid(self) -> str:
            return f"qwen_zero_prior.persistent_reductions<={self.limit}"

    return _CacheKey


def install(limit: int | None = None) -> int:
    """Make inductor compile row reductions up to ``limit`` wide (default: :func:`limit_from_env`) as persistent
    kernels, process-wide, until :func:`uninstall`. Returns the width in effect; 0 where nothing was installed: a
    limit up to inductor's own 1024, a torch without these hooks, or another post-grad custom pass already set.
    Installing again with another limit replaces the first."""
    limit = limit_from_env() if limit is None else int(limit)
    if _state.get("limit") == limit:
        return limit
    uninstall()
    if limit <= _INDUCTOR_LIMIT:
        return 0
    try:
        import torch._inductor.config as inductor_config
        from torch._inductor.choices import InductorChoices

        key_class = _cache_key_class()
    except ImportError:  # a torch without inductor's choices class or custom passes: its own choice
        return 0
    original = InductorChoices.__dict__.get(_METHOD)
    if original is None:
        return 0
    if inductor_config.post_grad_custom_post_pass is not None:
        logger.info("inductor: a post-grad custom pass is already set (%r); row reductions keep inductor's own "
                    "persistent width, %d (reductions.py)", inductor_config.post_grad_custom_post_pass,
                    _INDUCTOR_LIMIT)
        return 0
    own = original.__func__ if isinstance(original, staticmethod) else original

    def should_use_persistent_reduction(features, cooperative_reduction, *args, **kwargs) -> bool:
        return (wider_persistent(features, cooperative_reduction, limit)
                or own(features, cooperative_reduction, *args, **kwargs))

    key = key_class(limit)
    setattr(InductorChoices, _METHOD, staticmethod(should_use_persistent_reduction))
    inductor_config.post_grad_custom_post_pass = key
    _state.update(limit=limit, original=original, key=key)
    logger.debug("inductor: row reductions up to %d wide compile as persistent kernels (reductions.py)", limit)
    return limit


def installed() -> int:
    """The width :func:`install` put in effect; 0 when not installed."""
    return _state.get("limit", 0)


def uninstall() -> bool:
    """Give inductor back its own choice and its custom-pass setting as :func:`install` found them. Returns whether
    anything was installed."""
    if not _state:
        return False
    import torch._inductor.config as inductor_config
    from torch._inductor.choices import InductorChoices

    setattr(InductorChoices, _METHOD, _state["original"])
    if inductor_config.post_grad_custom_post_pass is _state["key"]:
        inductor_config.post_grad_custom_post_pass = None
    _state.clear()
    return True


__all__ = ["ENV", "PERSISTENT_MAX", "install", "installed", "limit_from_env", "uninstall", "wider_persistent"]
