"""Training on 24 GB cards (``model.offload``): fp8 weight storage, streamed from CPU memory what does not fit.

The 20.4B transformer is 40.8 GB in bf16 and 20.4 GB in fp8; the 7B text encoder 15 GB in bf16. Token training
needs both every step, so on a 24 GB card:

- every ``Linear`` of the transformer's blocks keeps its weight in float8_e4m3fn (row-scaled), cast to the
  compute dtype for each use; the blocks that do not fit the budget keep that fp8 weight in pinned CPU memory
  and copy it over for each use (ahead of use, on a side stream, where ``prefetch_gib`` gives a ring buffer:
  ``prefetch.py``); with ``model.compile`` every block is compiled, a streamed weight's fetch an opaque custom op;
- the text encoder's decoder ``Linear`` weights stay as loaded (bf16): on the GPU where they fit beside the reserve
  and the ring (a 24 GB card: then 56 of the 60 blocks stream, the faster layout since blocks are fetched as one),
  else in pinned CPU memory, copied per use (``memory.text_encoder_storage``; ``model.offload_text_encoder`` may
  also put them in fp8, which changes the conditioning the token learns against a little); the embedding table,
  norms and the placeholder row stay on the GPU;
- gradient checkpointing on the transformer bounds activations.

Qwen-Image 2.1 (7.1B DiT, Qwen3-VL-8B) needs none of the streaming on a 24 GB card: with ``text_encoder="auto"``
(its backend's choice) every block stays resident in fp8 and the text decoder's layers stay on the GPU, as loaded
where they fit beside the blocks, else in fp8 (which changes the conditioning the token learns against a little:
docs/qwen-image-2.1.md), and only where even that does not fit are they streamed (``memory.text_encoder_storage``).

Why not diffusers' layerwise casting / group offloading: both swap a module's parameter storage in hooks around
its forward. Backward then finds the weights it saved already cast back to fp8 or moved to the CPU (seen here:
"Expected all tensors to be on the same device ... cpu" in backward). :class:`OffloadedLinear` fetches its
weight inside an autograd function, for the forward and again for the backward, so it never saves one.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import weakref
import zlib
from collections.abc import Callable

import torch
from torch import nn

from . import text_parts
from .cast_linear import StoredLinear, cast_linear, cast_linear_op
from .fp8 import FP8, _parent, quantize_rows
from .pinned import PinnedPack
from .prefetch import WeightPrefetcher, no_release

logger = logging.getLogger(__name__)

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")


def _fetched_linear(owner, x: torch.Tensor) -> torch.Tensor:
    """``x @ Wᵀ`` with ``owner``'s weight materialized for the call and released once the product is queued."""
    w, done = owner.materialize(x.dtype)
    try:
        return torch.nn.functional.linear(x, w)
    finally:  # also after an error: a range never released would keep the prefetcher from reusing it
        done()


def _fetched_input_grad(owner, dy: torch.Tensor) -> torch.Tensor:
    """``dy @ W``: :func:`_fetched_linear`'s input gradient, the weight materialized again."""
    w, done = owner.materialize(dy.dtype)
    try:
        return dy @ w
    finally:
        done()


class _FetchMatmul(torch.autograd.Function):
    """``x @ Wᵀ`` with ``W`` materialized for the forward and again for the backward, never saved. An fp8 weight
    arrives as its e4m3 values cast to the compute dtype; its row scale ``s`` is applied to the output, as the
    resident path does (``x (diag(s) Wq)ᵀ = (x Wqᵀ) diag(s)``, and ``dx = (dy diag(s)) Wq``)."""

    @staticmethod
    def forward(ctx, x, owner):
        ctx.owner = owner
        y = _fetched_linear(owner, x)
        return y if owner.out_scale is None else y * owner.out_scale.to(y.dtype)

    @staticmethod
    def backward(ctx, dy):
        owner = ctx.owner
        if owner.out_scale is not None:
            dy = dy * owner.out_scale.to(dy.dtype)
        return _fetched_input_grad(owner, dy), None


# The streamed layers' matmul as torch.library custom ops, for compiled blocks: dynamo cannot trace the prefetcher's
# Python (its ring and events), but an opaque op it keeps in the graph, so a streamed block compiles whole like a
# resident one instead of running eagerly (an H200 trace of the training node at 24 GB: ~35,000 kernel launches and
# as many allocator calls a step, about half of the launches from the eager streamed blocks by an estimate, with the
# GPU idle half the step). The ops are tagged cudagraph_unsafe where torch has the tag, so inductor never puts them
# inside a CUDA graph, whatever mode or options compile with (compile_blocks also drops graphs for these blocks).
# The op takes the layer's stored CPU weight, a graph input like any module tensor (so one graph serves every
# streamed block), and finds its layer from it. The name carries this module's name: a second copy of the package
# (another ComfyUI folder name) registers its own ops over its own layers.
_FETCH_NS = "qwen_zero_prior"
_FETCH_OP = f"fetch_linear_{zlib.crc32(__name__.encode()):08x}"


@functools.cache
def _owners() -> weakref.WeakValueDictionary:
    """stored weight's data_ptr -> its streamed :class:`OffloadedLinear` (made on first use, not at import)."""
    return weakref.WeakValueDictionary()


def _owner_of(stored: torch.Tensor) -> OffloadedLinear:
    owner = _owners().get(stored.data_ptr())
    if owner is None or owner.stored.data_ptr() != stored.data_ptr():
        raise RuntimeError(
            f"offload: a streamed weight (shape {tuple(stored.shape)}, {stored.dtype}, at {stored.data_ptr():#x}) "
            "reached the fetch op without its layer: the OffloadedLinear holding it was freed or its .stored was "
            "replaced. Keep the layer alive while its block runs and do not assign .stored; copies made with "
            "copy.deepcopy or pickle register themselves")
    return owner


def _unsafe_tags() -> tuple:
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)  # (torch >= 2.8)
    return (tag,) if tag is not None else ()


@functools.cache
def fetch_linear_ops():
    """``(fetch_linear, fetch_linear_grad)`` registered (first call; outside any compiled region): ``fetch_linear(x,
    stored)`` is ``x @ Wᵀ`` and ``fetch_linear_grad(dy, stored)`` is ``dy @ W``, each with the streamed layer's weight
    materialized for the call and never kept (as :class:`_FetchMatmul`); the first's backward is the second."""
    name = f"{_FETCH_NS}::{_FETCH_OP}"

    @torch.library.custom_op(name, mutates_args=(), tags=_unsafe_tags())
    def fetch_linear(x: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        return _fetched_linear(_owner_of(stored), x)

    @fetch_linear.register_fake
    def _(x, stored):
        return x.new_empty(*x.shape[:-1], stored.shape[0])

    @torch.library.custom_op(f"{name}_grad", mutates_args=(), tags=_unsafe_tags())
    def fetch_linear_grad(dy: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        return _fetched_input_grad(_owner_of(stored), dy)

    @fetch_linear_grad.register_fake
    def _(dy, stored):
        return dy.new_empty(*dy.shape[:-1], stored.shape[1])

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])  # the stored CPU weight: a reference, nothing new kept

    def backward(ctx, dy):
        (stored,) = ctx.saved_tensors
        return getattr(getattr(torch.ops, _FETCH_NS), f"{_FETCH_OP}_grad")(dy, stored), None

    fetch_linear.register_autograd(backward, setup_context=setup_context)
    return fetch_linear, fetch_linear_grad


BLOCK_FETCH_ENV = "QWEN_ZERO_PRIOR_BLOCK_FETCH"


def block_fetch_from_env() -> bool:
    """``QWEN_ZERO_PRIOR_BLOCK_FETCH``: 1 (the default, also unset) fetches a recomputed streamed block's weights as
    one before each of its runs (:class:`StreamedBlock`), 0 one fetch per layer and use (as before session 22). On an
    H200 under a 24 GiB cap it took the offloaded step from 1366 to 1142 ms (text decoder on the GPU) and from 1703 to
    1336 ms (streamed), peak 21.2 / 21.0 GiB against 20.8 / 20.7 (docs/benchmarks.md, "Session 22")."""
    import os

    raw = os.environ.get(BLOCK_FETCH_ENV, "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{BLOCK_FETCH_ENV}={raw!r}: expected 1 (fetch a streamed block's weights as one, the "
                         "default) or 0 (one fetch per layer)")
    return raw != "0"


class StreamedBlock:
    """The streamed layers of one recomputed transformer block, fetched together before each run of the block.

    Per layer, a streamed block fetches its weight once in the forward, once in its recomputation and once more in
    the backward, each fetch Python (a custom op in a compiled block, the prefetcher's bookkeeping, a copy, events)
    of ~0.3-0.4 ms of host time on an H200 (a profiled step): with 56 of Qwen-Image's 60 blocks streamed, about
    2,200 fetches a step while the GPU waited for the host. Here the transformer's checkpoint function
    (:func:`_checkpoint_fetching`) runs such a block through :func:`_run_fetched`, which, in eager code before each
    run (the forward and the recomputation), fetches every layer's weight through one range of the prefetcher's ring
    (``parts``: copied as one, one event), casts each to the compute dtype and hands it to its layer (the
    ``fetched`` buffer, a graph input of a compiled block), and takes it back when the block returns or stops
    (checkpointing's early stop raises inside it). The backward uses the weights autograd saved from the
    recomputation (one block's, ~0.6 GiB for Qwen-Image, while that block's backward runs) instead of fetching
    them again. Outside a checkpointed run (sampling) the layers fetch one by one, as before.

    A first version handed the weights over in a forward pre-hook inside the compiled region; dynamo replays such
    attribute writes as it pleases, and checkpointing's early stop skipped the forward hook that took them back:
    every block kept its weights (out of memory on an H200 at 24 GiB)."""

    def __init__(self, layers: list, device: torch.device):
        from .prefetch import _layout

        self.layers = list(layers)
        self.parts = tuple(layer.stored for layer in self.layers)
        self.device = torch.device(device)
        self.span = _layout(self.parts)[1]  # bytes of the one range it takes in the prefetcher's ring

    def usable(self) -> bool:
        """Whether its weights fit the prefetcher's ring as one range (or there is no ring: copied at use). A block
        larger than the ring would be copied at use on the compute stream each run, and the copies after it would
        wait for it: then the layers fetch one by one, as without block fetching (warned once per model)."""
        pf = self.prefetcher
        if pf is None or self.span <= pf.arena_bytes:
            return True
        if not pf.block_fetch_warned:  # once per model (its blocks share one prefetcher)
            pf.block_fetch_warned = True
            logger.warning("offload: a streamed block's weights (%.2f GiB) do not fit the %.2f GiB ring buffer as one "
                           "range: their layers are fetched one by one (fetching a block as one needs "
                           "model.offload_prefetch_gib >= %.2f; QWEN_ZERO_PRIOR_BLOCK_FETCH=0 silences this)",
                           self.span / 2**30, pf.arena_bytes / 2**30, self.span / 2**30)
        return False

    @property
    def prefetcher(self):
        return self.layers[0].prefetcher

    def materialize(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """Every layer's weight on the device in ``dtype`` (unscaled, as :meth:`OffloadedLinear.materialize`), each
        a new tensor: the ring's range is released once the casts are queued."""
        pf = self.prefetcher
        if pf is None:
            raws, done = [t.to(self.device, non_blocking=True) for t in self.parts], no_release
        else:
            raws, done = pf.fetch(self)
        try:
            return [r.to(dtype, copy=True) for r in raws]
        finally:
            done()


def _run_fetched(block: nn.Module, *args, **kwargs):
    """``block(*args, **kwargs)`` with its streamed layers' weights fetched as one for this run
    (:class:`StreamedBlock`), taken back however the run ends."""
    sb = block._zp_streamed_block
    if not sb.usable():
        return block(*args, **kwargs)
    # the dtype the layers compute in (their forward casts the input to autocast's; a layer whose input has another
    # dtype still casts the weight to it)
    dtype = (torch.get_autocast_dtype(sb.device.type) if torch.is_autocast_enabled(sb.device.type)
             else sb.layers[0].compute_dtype)
    for layer, w in zip(sb.layers, sb.materialize(dtype)):
        layer.fetched = w
    try:
        return block(*args, **kwargs)
    finally:
        for layer in sb.layers:
            layer.fetched = None


def _checkpoint_fetching(tr: nn.Module) -> None:
    """``tr``'s checkpoint function runs a block with a :class:`StreamedBlock` through :func:`_run_fetched` (its
    forward, and its recomputation, which checkpointing runs through the same function)."""
    func = getattr(tr, "_gradient_checkpointing_func", None)
    if func is None or getattr(func, "_zp_fetching", False):
        return

    def checkpoint_fetching(fn, *args, **kwargs):
        if getattr(fn, "_zp_streamed_block", None) is not None:
            return func(functools.partial(_run_fetched, fn), *args, **kwargs)
        return func(fn, *args, **kwargs)

    checkpoint_fetching._zp_fetching = True
    tr._gradient_checkpointing_func = checkpoint_fetching


def install_block_fetch(tr: nn.Module, blocks, device: torch.device) -> int:
    """Fetch each of ``blocks``' streamed layers as one where ``tr`` recomputes its blocks (gradient checkpointing
    on) and ``QWEN_ZERO_PRIOR_BLOCK_FETCH`` is not 0; returns how many blocks were set up."""
    if not getattr(tr, "is_gradient_checkpointing", False) or not block_fetch_from_env():
        return 0
    n = 0
    for block in blocks:
        layers = [m for m in block.modules() if isinstance(m, OffloadedLinear) and m.streamed]
        if layers:
            block._zp_streamed_block = StreamedBlock(layers, device)  # (a plain attribute; module copies carry it)
            n += 1
    if n:
        _checkpoint_fetching(tr)
    return n


def _fetch_linear(x: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """The op's call through ``torch.ops`` (what dynamo traces as an op): :func:`fetch_linear_ops` registers it."""
    return getattr(getattr(torch.ops, _FETCH_NS), _FETCH_OP)(x, stored)


class OffloadedLinear(nn.Module):
    """A frozen ``Linear`` whose weight is stored as fp8 (+ per-row scale) or as is, on the GPU or in pinned CPU
    memory (``streamed``), and cast to the compute dtype on the GPU for each forward and backward use.

    On the GPU it computes through ``cast_linear.cast_linear`` (the cast inside one custom op, never kept for the
    backward) and applies the row scale to the output (``x @ (diag(s) Wq)ᵀ = (x @ Wqᵀ) diag(s)``), so a compiled block
    fuses the scale into what follows and the per-use cast is one kernel. Streamed, it fetches the weight in an
    autograd function (:class:`_FetchMatmul`), through the prefetcher where there is one; in a compiled block through
    the equivalent custom op (:func:`fetch_linear_ops`), which dynamo keeps opaque; where its block's weights were
    fetched as one for this run (:class:`StreamedBlock`), with the weight in its ``fetched`` buffer."""

    parts = None  # to the prefetcher, one weight (``stored``); a StreamedBlock has several

    def __init__(self, linear: nn.Linear, device: torch.device, *, fp8: bool, on_gpu: bool,
                 pinned: PinnedPack | None = None):
        super().__init__()
        cast_linear_op()  # registered now, outside any compiled region (dynamo cannot trace the registration)
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.device = torch.device(device)
        # a StoredLinear (another program's weight, e.g. ComfyUI's fp8 file) names its compute dtype; a plain Linear
        # computes in its weight's
        self.compute_dtype = getattr(linear, "compute_dtype", None) or w.dtype
        store = torch.device(device) if on_gpu else torch.device("cpu")
        if fp8 and w.dtype == FP8:
            # stored in e4m3 already (ComfyUI's qwen_image_fp8_e4m3fn file): kept as it is, unscaled, so the layer
            # computes what the program that loaded it computes (a cast per use)
            self.scale = self.out_scale = None
        elif fp8:
            q, scale = quantize_rows(w.to(self.device, self.compute_dtype))  # quantize where it is fast
            self.scale = scale.view(-1, 1).to(self.device)
            # the scale applied to outputs, in the compute dtype: one multiply on the output (eagerly, a float32
            # product would be two kernels and a float32 copy of every output); its rounding (<= 0.4 % per output
            # channel) is far inside e4m3's own (~3 % per weight)
            self.out_scale = scale.view(-1).to(self.device, self.compute_dtype)
            w = q
        else:
            self.scale = self.out_scale = None
        self.streamed = not on_gpu
        if store.type == "cpu" and self.device.type == "cuda":  # pinned: the copies run asynchronously
            # in a shared pack where given (pinned.py: pin_memory() rounds each weight up to a power of two)
            w = pinned.copy(w) if pinned is not None else w.to(store).pin_memory()
        else:
            w = w.to(store)
            if self.streamed and w.data_ptr() == linear.weight.data_ptr():
                # its own storage (a CPU device): the fetch op finds the layer by its weight's address, which a
                # second layer over the same source (another engine over ComfyUI's weights) would share
                w = w.clone()
        self.stored = w
        self._register()
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach().to(self.device, self.compute_dtype if linear.bias.dtype.itemsize < 2 else None),
            requires_grad=False)
        self.prefetcher = None  # set by apply_offload for the layers it streams (prefetch.WeightPrefetcher)
        # the weight its block fetched for the block's current run (StreamedBlock), in the compute dtype and unscaled;
        # a buffer, so a compiled block takes it as an input (not saved with the model)
        self.register_buffer("fetched", None, persistent=False)
        # set by apply_offload for the transformer's blocks, which offload always recomputes (gradient
        # checkpointing): inside a compiled graph the per-use cast is then traced (see forward)
        self.cast_in_graph = False

    def _register(self) -> None:
        """A streamed layer's weight, known to the fetch op (:func:`fetch_linear_ops`, registered now, outside any
        compiled region)."""
        if self.streamed:
            fetch_linear_ops()
            _owners()[self.stored.data_ptr()] = self

    def __setstate__(self, state) -> None:  # copy.deepcopy and pickle: the copy's own weight is registered too
        super().__setstate__(state)
        self._register()

    @property
    def weight(self) -> torch.Tensor:  # for code that probes .weight (dtype/device); never through the prefetcher
        return self._dequantize(self.stored.to(self.device, non_blocking=True), self.compute_dtype)

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, Callable[[], None]]:
        """The stored weight on the GPU in ``dtype`` *without* its row scale (the caller scales the output:
        :class:`_FetchMatmul`), and the callable to call once the kernels that read it are queued (a prefetched
        weight lives in the prefetcher's ring buffer until then; the caller must not keep it). One cast kernel per
        use: dequantizing through float32 here took three passes over each weight (seen on an H200: ~0.4 s a step
        of elementwise kernels with 34 blocks streamed)."""
        if self.prefetcher is None:
            return self.stored.to(self.device, non_blocking=True).to(dtype), no_release
        raw, done = self.prefetcher.fetch(self)
        if raw.dtype == dtype:
            return raw, done
        try:
            return raw.to(dtype), no_release  # the cast copy is the compute stream's own tensor
        finally:  # the cast is queued (or failed): the ring's range may be reused
            done()

    def _dequantize(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.scale is not None:
            raw = raw.to(torch.float32).mul_(self.scale)
        return raw.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # what autocast does for a Linear, done here: the custom op is opaque to autocast, and in a compiled graph
        # a float32 input (a norm's output under autocast) made every product a float32 GEMM (seen on an H200: 1.2 s
        # of sm80 f32 GEMMs per step, compile slower than eager); a streamed weight is then fetched in that dtype
        # directly rather than in float32 and cast again by autocast
        if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if self.fetched is not None:  # fetched with the rest of its block for this run (StreamedBlock)
            w = self.fetched  # in the input's dtype, as the per-layer fetch materializes it (rarely another: cast)
            y = torch.nn.functional.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))
            if self.out_scale is not None:
                y = y * self.out_scale.to(y.dtype)
        elif self.streamed and torch.compiler.is_compiling():  # the block compiles whole: the fetch is an opaque op
            y = _fetch_linear(x, self.stored)
            if self.out_scale is not None:  # autograd scales dy by it before the op's backward, as _FetchMatmul does
                y = y * self.out_scale.to(y.dtype)
        elif self.streamed:  # (the row scale is applied inside, forward and backward)
            y = _FetchMatmul.apply(x, self)
        elif self.stored.dtype == x.dtype:  # stored as computed: nothing to cast, no scale
            y = torch.nn.functional.linear(x, self.stored)
        else:
            if self.cast_in_graph and torch.compiler.is_compiling():
                # A traced cast: inductor fuses it into one kernel and the graph calls no Python op. The custom op
                # cost ~145 us of host time per call (an H200 trace: 1,260 calls a step, the compiled blocks
                # host-bound). The graph may keep the cast weight for the backward, which the custom op exists to
                # avoid; in a recomputed block that is one block's weights at a time (~0.6 GiB for Qwen-Image).
                y = torch.nn.functional.linear(x, self.stored.to(x.dtype))
            else:
                y = cast_linear(x, self.stored, None)
            if self.out_scale is not None:
                y = y * self.out_scale
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        where = self.stored.device.type
        kind = "fp8" if self.stored.dtype == FP8 else str(self.stored.dtype).replace("torch.", "")
        ahead = ", prefetched" if self.prefetcher is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind} on {where}{ahead}"


def _replace(root: nn.Module, pick) -> list[tuple[str, nn.Linear]]:
    """Frozen ``nn.Linear`` layers (plain, or :class:`~.cast_linear.StoredLinear` over another program's weights)
    under ``root`` whose name passes ``pick`` (never the LoRA's own A/B layers)."""
    return [(n, m) for n, m in root.named_modules()
            if type(m) in (nn.Linear, StoredLinear) and pick(n) and ".lora_" not in n and not m.weight.requires_grad]


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, attr = _parent(root, name)
    setattr(parent, attr, module)


def block_bytes_fp8(transformer: nn.Module) -> int:
    blk = transformer.transformer_blocks[0]
    return sum(m.weight.numel() for m in blk.modules() if type(m) in (nn.Linear, StoredLinear))


def streamed_block_ids(n_blocks: int, n_streamed: int, layout: str = "spread") -> list[int]:
    """Which of ``n_blocks`` blocks stream from CPU memory when ``n_streamed`` do not fit.

    ``"spread"`` (the default): evenly among the resident ones (the k-th in the middle of the k-th of ``n_streamed``
    equal stretches; the first or last block may be one of them), so that each streamed block's copy can run beside
    the resident blocks' compute before it, forward and backward.
    ``"tail"``: the last ones (the layout before session 12). On an H200 under a 24 GiB cap (15 of 60 blocks
    streamed) the two measured the same within the runs' spread (1614 vs 1692 ms/step in one call); the step's
    later changes were measured with ``spread`` (docs/benchmarks.md, "24 GiB: session 12")."""
    if layout not in ("spread", "tail"):
        raise ValueError(f"streamed_block_ids: layout must be spread or tail, got {layout!r}")
    n_streamed = max(0, min(n_blocks, n_streamed))
    if layout == "tail":
        return list(range(n_blocks - n_streamed, n_blocks))
    # the k-th streamed block sits in the middle of the k-th of n_streamed equal stretches: distinct indices, since
    # the stretches are at least one block long
    return [int((k + 0.5) * n_blocks / n_streamed) for k in range(n_streamed)]


def apply_offload(pipe, device: torch.device, budget_gib: float, reserve_gib: float = 6.0,
                  text_encoder: str = "stream", prefetch_gib: float = 0.0, layout: str = "spread") -> dict:
    """Convert ``pipe``'s transformer and text encoder as the module docstring says and put them on ``device``.

    ``budget_gib``: GPU memory to plan for; ``reserve_gib`` of it is kept for activations, the LoRA and its
    optimizer state; the transformer blocks that fit in the rest stay resident (in fp8). ``text_encoder``: where
    the text decoder's layers go: ``"stream"`` (as loaded, pinned CPU memory, copied per use), ``"stream_fp8"``
    (the same in fp8: half the bytes per copy, the conditioning with fp8 rounding), ``"bf16"`` (as
    loaded, on the GPU), ``"fp8"`` (fp8 on the GPU) or ``"auto"``: :func:`memory.text_encoder_storage` for this
    budget, the reserve and the ring (the backends' choice). ``prefetch_gib``: where anything is streamed, a ring buffer
    of that size on the GPU into which a side stream copies the streamed weights ahead of use (:mod:`.prefetch`;
    taken from the blocks' share of the budget); 0 copies each at use on the compute stream. ``layout``: which
    blocks stream (:func:`streamed_block_ids`). Call after the LoRA
    is added. Returns a summary (resident/streamed block counts, the text decoder's storage, bytes);
    :func:`prefetcher_of` finds the prefetcher.
    """
    from . import memory

    if text_encoder not in ("stream", "stream_fp8", "bf16", "fp8", "auto"):
        raise ValueError(f"apply_offload: text_encoder must be stream, stream_fp8, bf16, fp8 or auto, got "
                         f"{text_encoder!r}")
    device = torch.device(device)
    tr, te = pipe.transformer, pipe.text_encoder
    n_blocks = len(tr.transformer_blocks)
    per_block = block_bytes_fp8(tr)
    if prefetch_gib < 0:
        raise ValueError(f"apply_offload: prefetch_gib must be >= 0, got {prefetch_gib!r}")
    parts = memory.weight_parts(pipe)
    if text_encoder == "auto":
        # a block is fetched as one where the ring holds it (its fp8 bytes with their row scales, as
        # StreamedBlock.usable counts them) and block fetching is on
        block = parts.dit_blocks_fp8 / n_blocks if block_fetch_from_env() else math.inf
        text_encoder = memory.text_encoder_storage(parts, budget_gib * 2**30, reserve_gib * 2**30,
                                                   ring_bytes=prefetch_gib * 2**30, block_bytes=block)
    emb = te.get_input_embeddings()
    fixed = emb.weight.numel() * emb.weight.element_size()
    free = budget_gib * 2**30 - reserve_gib * 2**30 - fixed
    streams_te = text_encoder in ("stream", "stream_fp8")
    if not streams_te:  # the text decoder's layers stay on the GPU: the blocks get what is left
        free -= parts.te_layers if text_encoder == "bf16" else parts.te_layers_fp8
    # (2.1's "auto" picks a storage that fits beside every block, memory.text_encoder_storage: then all are resident)
    resident, arena = _fitting_blocks(n_blocks, per_block, free, int(prefetch_gib * 2**30), streams_te)
    if arena:
        if arena > free:
            logger.warning("offload: the %.2f GiB ring buffer for prefetching (model.offload_prefetch_gib) is more "
                           "than the %.2f GiB the budget leaves for weights (offload_budget_gib %.2f GiB minus the "
                           "%.1f GiB reserve and the embeddings): it goes beyond the budget; lower "
                           "offload_prefetch_gib or raise the budget", arena / 2**30, max(free, 0) / 2**30,
                           budget_gib, reserve_gib)
    streamed_ids = set(streamed_block_ids(n_blocks, n_blocks - resident, layout))

    pinned = PinnedPack() if device.type == "cuda" else None
    converted = {"text_encoder": 0, **_convert_blocks(tr, device, streamed_ids, pinned)}
    lm = te.model.language_model
    if text_encoder != "bf16":  # bf16 on the GPU: the layers stay plain Linears
        for name, lin in _replace(lm, lambda n: n.startswith("layers.")):
            _set(lm, name, OffloadedLinear(lin, device, fp8=text_encoder in ("fp8", "stream_fp8"),
                                           on_gpu=text_encoder == "fp8", pinned=pinned))
            converted["text_encoder"] += 1
    if text_encoder in ("fp8", "stream_fp8"):
        logger.warning("offload: the text decoder's layers are stored in fp8 (row-scaled e4m3, cast per use)%s: the "
                       "conditioning the token learns against carries that rounding (docs/qwen-image-2.1.md); "
                       "model.offload_text_encoder: stream keeps them as loaded",
                       " to keep every weight on the GPU" if text_encoder == "fp8" else
                       " in CPU memory, half the bytes to copy for each use")
    # what is left (norms, embeddings, the transformer's input/output layers, LoRA) goes to the GPU; the vision
    # tower and LM head are not used for text conditioning and stay in CPU memory (a pipeline call, the trainer's
    # samples, then gets no logits instead of a device mismatch in the LM head)
    text_parts.park(te)
    for mod in (tr, lm):
        mod.to(device)
    _attach_prefetcher((tr, lm), device, arena)
    summary = {"blocks": n_blocks, "resident_blocks": resident, "streamed_blocks": n_blocks - resident,
               "block_fp8_gib": round(per_block / 2**30, 3), "text_encoder_storage": text_encoder,
               "streamed_block_ids": sorted(streamed_ids), "prefetch_gib": round(arena / 2**30, 3),
               "pinned_gib": round(pinned.held_bytes / 2**30, 3) if pinned is not None else 0.0, **converted}
    logger.info("offload: %d of %d transformer blocks resident in fp8, %d streamed from CPU; text decoder's layers: "
                "%s; %s", resident, n_blocks, n_blocks - resident,
                {"stream": f"{converted['text_encoder']} linear layers streamed from CPU",
                 "stream_fp8": f"{converted['text_encoder']} linear layers streamed from CPU in fp8",
                 "bf16": "on the GPU as loaded", "fp8": "on the GPU in fp8"}[text_encoder],
                f"streamed weights copied ahead of use into a {arena / 2**30:.2f} GiB ring buffer" if arena else
                "nothing copied ahead (model.offload_prefetch_gib: 0 or nothing streamed)")
    return summary


def _fitting_blocks(n_blocks: int, per_block: int, free: float, arena: int, also_streams: bool) -> tuple[int, int]:
    """How many of ``n_blocks`` blocks of ``per_block`` fp8 bytes stay on the GPU with ``free`` bytes for them, and
    the ring buffer's bytes: ``arena`` where anything streams (a block that does not fit, or ``also_streams``: the
    text decoder), taken from ``free`` first; 0 where nothing does. An infinite ``free`` (no device memory to plan
    for: a CPU) keeps every block."""
    if math.isinf(free):
        return n_blocks, (arena if also_streams else 0)
    resident = max(0, min(n_blocks, int(free // per_block)))
    if not arena or (resident == n_blocks and not also_streams):
        return resident, 0
    return max(0, min(n_blocks, int((free - arena) // per_block))), arena


def _attach_prefetcher(roots, device: torch.device, arena: int) -> None:
    """One :class:`~.prefetch.WeightPrefetcher` with an ``arena``-byte ring for every streamed
    :class:`OffloadedLinear` under ``roots`` (none where ``arena`` is 0)."""
    if not arena:
        return
    prefetcher = WeightPrefetcher(device, arena)
    for root in roots:
        for m in root.modules():
            if isinstance(m, OffloadedLinear) and m.streamed:
                m.prefetcher = prefetcher


def _convert_blocks(tr: nn.Module, device: torch.device, streamed_ids: set[int],
                    pinned: PinnedPack | None = None) -> dict:
    """Every frozen Linear of ``tr``'s blocks as an fp8 :class:`OffloadedLinear`: on ``device``, or streamed from
    pinned CPU memory (``pinned``, where given) for the blocks in ``streamed_ids``. Returns the layer counts."""
    converted = {"resident": 0, "streamed": 0}
    # training with offload recomputes the blocks (the backend turns gradient checkpointing on first): a compiled
    # block may then trace its layers' casts (OffloadedLinear.forward)
    recomputed = bool(getattr(tr, "is_gradient_checkpointing", False))
    for name, lin in _replace(tr, lambda n: n.startswith("transformer_blocks.")):
        idx = int(_BLOCK.match(name).group(1))
        on_gpu = idx not in streamed_ids
        layer = OffloadedLinear(lin, device, fp8=True, on_gpu=on_gpu, pinned=pinned)
        layer.cast_in_graph = recomputed
        _set(tr, name, layer)
        converted["resident" if on_gpu else "streamed"] += 1
    install_block_fetch(tr, [tr.transformer_blocks[i] for i in sorted(streamed_ids)], device)
    return converted


def _copy_rest_to(root: nn.Module, device: torch.device) -> int:
    """Every parameter and buffer of ``root`` not on ``device`` (the layers :func:`_convert_blocks` left: embeddings,
    norms, input and output layers, the LoRA) replaced by a copy there. Unlike ``module.to``, which rewrites each
    ``Parameter``'s data in place, the source's tensors are left where they are: they may be another program's
    (ComfyUI's DiT, shared by ``shared_dit.build_over``), which it moves as it pleases. Returns the bytes copied."""
    copied = 0
    for mod in root.modules():
        if isinstance(mod, OffloadedLinear):  # its stored weight stays where it was put; its bias is on the device
            continue
        for name, p in list(mod._parameters.items()):
            if p is not None and p.device != device:
                mod._parameters[name] = nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
                copied += p.numel() * p.element_size()
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device != device:
                mod._buffers[name] = b.to(device)
                copied += b.numel() * b.element_size()
    return copied


def offload_transformer(tr: nn.Module, device: torch.device, available_bytes: float, *, prefetch_gib: float = 0.0,
                        layout: str = "spread", resident: int | None = None) -> dict:
    """:func:`apply_offload` for a transformer alone, whose text encoder is another program's (the training node's
    diffusers engine over ComfyUI's DiT, where it does not fit the GPU; ComfyUI runs the text encoder).

    ``available_bytes``: GPU memory for the blocks' weights and, where anything streams, the ``prefetch_gib`` ring
    buffer (the caller has kept back what the step needs beside them). ``resident``: how many blocks stay on the
    GPU, instead of as many as fit. The source's weights (fp8 as they are, other dtypes quantized to row-scaled
    e4m3) are copied: to the GPU for the resident blocks, to pinned CPU memory for the streamed ones; the other
    parameters to the GPU (:func:`_copy_rest_to`), never by moving the source's own ``Parameter``.
    Call after the LoRA is added and gradient checkpointing is on. Returns a summary as :func:`apply_offload`'s.
    (Tensors already on ``device`` stay as they are: on a CPU, the tests' device, the source's are shared, except
    a streamed layer's weight, which is its own copy: the fetch op finds the layer by that weight's address.)"""
    if prefetch_gib < 0:
        raise ValueError(f"offload_transformer: prefetch_gib must be >= 0, got {prefetch_gib!r}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # as tensors report it (_copy_rest_to compares devices)
        device = torch.device("cuda", torch.cuda.current_device())
    n_blocks = len(tr.transformer_blocks)
    per_block = block_bytes_fp8(tr)
    arena = int(prefetch_gib * 2**30)
    if resident is None:
        resident, arena = _fitting_blocks(n_blocks, per_block, available_bytes, arena, also_streams=False)
    elif not 0 <= resident <= n_blocks:
        raise ValueError(f"offload_transformer: resident must be between 0 and {n_blocks} (the blocks), got "
                         f"{resident!r}")
    elif resident == n_blocks:
        arena = 0
    streamed_ids = set(streamed_block_ids(n_blocks, n_blocks - resident, layout))
    pinned = PinnedPack() if device.type == "cuda" else None
    converted = _convert_blocks(tr, device, streamed_ids, pinned)
    _copy_rest_to(tr, device)
    _attach_prefetcher((tr,), device, arena)
    summary = {"blocks": n_blocks, "resident_blocks": resident, "streamed_blocks": n_blocks - resident,
               "block_fp8_gib": round(per_block / 2**30, 3), "streamed_block_ids": sorted(streamed_ids),
               "prefetch_gib": round(arena / 2**30, 3),
               "pinned_gib": round(pinned.held_bytes / 2**30, 3) if pinned is not None else 0.0, **converted}
    logger.info("offload: %d of %d transformer blocks resident in fp8, %d streamed from CPU (%.2f GiB available "
                "for them); %s", resident, n_blocks, n_blocks - resident, available_bytes / 2**30,
                f"streamed weights copied ahead of use into a {arena / 2**30:.2f} GiB ring buffer" if arena else
                "nothing copied ahead")
    return summary


def streams(module: nn.Module) -> bool:
    """Whether ``module`` holds a layer :func:`apply_offload` streams from CPU memory (such blocks never get CUDA
    graphs: ``diffusers_backend.compile_blocks``)."""
    return any(isinstance(m, OffloadedLinear) and m.streamed for m in module.modules())


def prefetcher_of(root: nn.Module):
    """The :class:`~.prefetch.WeightPrefetcher` :func:`apply_offload` gave ``root``'s streamed layers, or None."""
    return next((m.prefetcher for m in root.modules()
                 if isinstance(m, OffloadedLinear) and m.prefetcher is not None), None)
