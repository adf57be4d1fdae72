"""A differentiable function's forward and backward replayed as two CUDA graphs, one pair per input signature.

This is ``torch.cuda.make_graphed_callables``' recipe (warm up, capture the forward, capture ``autograd.grad`` of its
output as the backward, replay both through one ``autograd.Function``) with these changes, so that it also works
inside ComfyUI, whose default allocator is ``cudaMallocAsync``:

- each pair warms up and captures on a side stream of its own (cuBLAS's per-stream workspace then stays outside
  graph memory and is that pair's alone), with the garbage collector off during capture;
- capture in ``thread_local`` mode (``make_graphed_callables`` captures in ``global`` mode, where a CUDA call that is
  unsafe during capture on *any* thread, e.g. ComfyUI's server thread asking for free memory, invalidates the
  capture; torch.compile's own graphs capture ``thread_local`` too);
- a ``guard`` context around warm-up and capture (the ComfyUI node turns ComfyUI's offload streams off there: a
  stream forked from the capture and not joined fails it with "capturing stream has unjoined work");
- inductor's triton kernels get their tensor arguments as addresses during a capture under cudaMallocAsync
  (:func:`_kernel_pointers_as_ints`: the launcher's pointer check fails on graph-allocated memory);
- a failed capture ends the allocator's capture state (``torch._C._cuda_endAllocateToPool``) before the caller falls
  back to eager code. This is best effort: on an H200 a failed capture still left the process unable to go on (the
  allocator aborted in a free under cudaMallocAsync; the RNG's graph state broke the next ``randn`` under the native
  allocator), so captures must not fail: nothing that syncs, no autograd graph over the trainable tensors kept alive
  from before the capture (its gradient accumulators would sit on another stream).

torch.compile's ``reduce-overhead`` graphs (graph trees) cannot run under cudaMallocAsync at all (they checkpoint the
allocator's pool state, which it does not support), but this plain capture can: PyTorch's CUDA tests run
``make_graphed_callables`` under it. Graph allocations there become CUDA graph memory nodes.

:class:`GraphCache` keeps the captured pairs per signature (shapes, dtypes, which arguments are tensors) and recaptures
where a tensor the graphs read but do not take as an argument (``watch``: frozen weights) has moved, e.g. after ComfyUI
reloaded a model.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

CAPTURE_ERROR_MODE = "thread_local"
ASYNC_GRAPHS_ENV = "QWEN_ZERO_PRIOR_ASYNC_GRAPHS"
ASYNC_GRAPH_PARTS = ("text", "dit")


def async_graphs_from_env(part: str) -> bool:
    """Whether ``part`` (``"text"``: the text encoder's per-step suffix; ``"dit"``: the training node's whole DiT
    step) is captured as CUDA graphs where PyTorch runs the cudaMallocAsync allocator (ComfyUI's default), from
    ``QWEN_ZERO_PRIOR_ASYNC_GRAPHS``: ``1`` (both, the default, also unset; ``both`` too), ``text``, ``dit`` or ``0``
    (neither; ``off``/``false``/``no``/``none`` too), case-insensitive. On an H200 at 78 GiB (ComfyUI 0.33,
    docs/benchmarks.md sessions 16-17) both trained at 0.35 s/step in four calls, the text encoder's alone at 0.42-0.51,
    the DiT's alone at 0.68, none at 0.89. Raises ValueError naming any other value."""
    if part not in ASYNC_GRAPH_PARTS:
        raise ValueError(f"part={part!r}: expected one of {ASYNC_GRAPH_PARTS}")
    raw = os.environ.get(ASYNC_GRAPHS_ENV, "").strip().lower() or "1"
    if raw in ("off", "false", "no", "none"):
        raw = "0"
    if raw == "both":
        raw = "1"
    if raw not in ("0", "1", *ASYNC_GRAPH_PARTS):
        raise ValueError(f"{ASYNC_GRAPHS_ENV}={raw!r}: expected 1 (the text encoder's and the DiT's CUDA graphs under "
                         "the cudaMallocAsync allocator, the default), text (the text encoder's only), dit (the DiT's "
                         "only) or 0 (none)")
    return raw in ("1", part)


def async_text_graphs(dit_captured: bool) -> bool:
    """Whether the text encoder's per-step part is captured under cudaMallocAsync: asked for (``1``, the default, or
    ``text``), or ``dit`` asked for and the DiT got no graphs of its own (``dit_captured`` False: its engine is off or
    recomputes blocks), so that one part is captured wherever one can be."""
    return async_graphs_from_env("text") or (not dit_captured and async_graphs_from_env("dit"))


class GraphCaptureError(RuntimeError):
    """Capturing a function's CUDA graphs failed; the caller runs it eagerly."""


class Captured(NamedTuple):
    """What one capture leaves: static buffers, and the two replays that recompute them in place.

    ``static_args``: the inputs' buffers (copied into before each forward replay); ``static_out``: the forward's
    output; ``static_grad_out``: the backward's incoming gradient (copied into before each backward replay);
    ``static_grads``: the gradients of the arguments and ``params`` that require grad, in that order (None where
    unused)."""

    static_args: tuple
    static_out: torch.Tensor
    static_grad_out: torch.Tensor
    static_grads: tuple
    replay_forward: Callable[[], None]
    replay_backward: Callable[[], None]


def _end_capture(device: torch.device, pool) -> None:
    """The allocator's capture state ended after a failed capture (``CUDAGraph.capture_end`` raises before it ends it
    when ``cudaStreamEndCapture`` fails). Harmless where it had ended."""
    end = getattr(torch._C, "_cuda_endAllocateToPool", None)
    if end is None:
        return
    try:
        end(device.index if device.index is not None else torch.cuda.current_device(), pool)
    except RuntimeError as e:  # already ended, or a torch whose allocator refuses: nothing more to undo
        logger.debug("ending the failed capture's allocation routing: %s", e)


@contextlib.contextmanager
def _kernel_pointers_as_ints(device: torch.device):
    """Inductor's triton kernels launched with their tensor arguments as plain addresses, for the duration of a capture
    under cudaMallocAsync (elsewhere: nothing changes).

    Why: under that allocator a tensor allocated during capture lives in a CUDA graph memory node, whose address is
    not mapped until the graph is launched. Inductor's static launcher (and triton's own) validates every tensor
    argument with ``cuPointerGetAttribute``, which fails for such an address ("CUDA driver error: invalid argument",
    measured on an H200), but passes an integer argument through unchecked. So ``CachingAutotuner.run``, which
    inductor's generated code calls per kernel and which looks its method up per call, is wrapped to hand over
    ``data_ptr()`` instead of each CUDA tensor, on the capturing stream only. Only steady-state launches happen during
    capture (autotuning ran in the warm-up), and those use the arguments only as addresses. The patch is the class's,
    so for the capture's duration it is every thread's; launches elsewhere are not capturing and pass through as
    they are. Restored on the way out, also after an error."""
    from .memory import allocator_backend

    try:
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    except ImportError:  # no inductor runtime (no triton): nothing compiled to launch
        CachingAutotuner = None
    if allocator_backend() != "cudaMallocAsync" or CachingAutotuner is None:
        yield
        return
    original = CachingAutotuner.run

    def run(self, *args, **kwargs):
        # only a steady-state launch on the capturing stream: a kernel still to be autotuned (several launchers)
        # benchmarks and clones its tensor arguments, which it cannot do with addresses (it would fail the capture
        # either way, by synchronizing)
        if torch.cuda.is_current_stream_capturing() and len(getattr(self, "launchers", ())) == 1:
            args = tuple(a.data_ptr() if isinstance(a, torch.Tensor) and a.is_cuda else a for a in args)
        return original(self, *args, **kwargs)

    CachingAutotuner.run = run
    try:
        yield
    finally:
        CachingAutotuner.run = original


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """A side stream of its own for one pair's warm-up and capture. cuBLAS's workspace is kept per (handle, stream)
    and a captured matmul keeps its address: warmed up on the stream that then captures, the pair's workspace is made
    outside any graph (not one graph's allocation that later graphs on the stream read), and a stream of its own keeps
    it the pair's alone, so that whatever frees one stream's workspace (a newer torch does when a graph is destroyed,
    pytorch#175276: the suffix dropping its least recently used shape, the DiT's pairs recaptured after a reload)
    frees no other pair's. The stream comes from PyTorch's pool (32 per priority, handed out in turn); nothing
    captured here runs on it again. torch.compile's graph trees clear every workspace around their warm-ups and
    recordings, which is why beside them PyTorch's ``make_graphed_callables`` captures instead (:func:`make_graphed`):
    there the workspace is made inside the capture, in the pair's own pool."""
    return torch.cuda.Stream(device.index if device.index is not None else torch.cuda.current_device())


@contextlib.contextmanager
def _no_gc():
    """The garbage collector off during a capture: a cycle collected then could free a tensor captured by another
    pair, which the allocator does not defer during capture; it would become a free node of this graph."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def capture_cuda(fn: Callable[..., torch.Tensor], args: tuple, params: tuple, *, warmup: int = 3,
                 guard: Callable[[], contextlib.AbstractContextManager] | None = None) -> Captured:
    """Capture ``fn(*args)`` (one tensor out) and its backward to the arguments and ``params`` that require grad.
    ``args`` become the static input buffers. Raises :class:`GraphCaptureError` where capture fails."""
    guard = guard or contextlib.nullcontext
    device = args[0].device
    diff = tuple(t for t in (*args, *params) if t is not None and t.requires_grad)
    if not diff:
        raise GraphCaptureError("nothing requires grad: there is no backward to capture")
    torch.cuda.synchronize(device)
    side = _capture_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    try:
        # lazy set-up (cuDNN plans, compilation) first
        with guard(), torch.cuda.stream(side), torch.inference_mode(False), torch.enable_grad():
            for _ in range(warmup):
                out = fn(*args)
                torch.autograd.grad(out, diff, torch.ones_like(out), allow_unused=True)
                del out
        torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - any failure of the warm-up: that shape runs eagerly (the caller's)
        raise GraphCaptureError(f"warm-up: {type(e).__name__}: {e}") from e
    fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle()
    kw = dict(pool=pool, stream=side, capture_error_mode=CAPTURE_ERROR_MODE)
    try:
        with guard(), _kernel_pointers_as_ints(device), _no_gc(), torch.inference_mode(False), torch.enable_grad():
            with torch.cuda.graph(fwd, **kw):
                out = fn(*args)
            grad_out = torch.empty_like(out)
            with torch.cuda.graph(bwd, **kw):
                grads = torch.autograd.grad(out, diff, grad_out, allow_unused=True)
    except Exception as e:  # noqa: BLE001 - whatever stopped the capture, its allocator state is ended first
        _end_capture(device, pool)
        raise GraphCaptureError(f"{type(e).__name__}: {e}") from e
    return Captured(args, out.detach(), grad_out, tuple(grads), fwd.replay, bwd.replay)


class _Graphed:
    """One captured pair as an autograd node: the forward copies new inputs into the static buffers and replays; the
    backward copies the incoming gradient and replays, returning the static gradients, which autograd accumulates
    into the parameters' ``.grad``. Where a ``.grad`` was None autograd may keep the static buffer itself as it (as
    with ``torch.cuda.make_graphed_callables``), which the next backward replay overwrites: the caller sets gradients
    to None before each backward and steps the optimizer in between (the trainer does: ``zero_grad(set_to_none=True)``
    every step; no gradient accumulation over replays)."""

    def __init__(self, cap: Captured, n_args: int, params: tuple):
        self.cap, self.n_args, self.params = cap, n_args, params
        # where each argument's and parameter's gradient sits in cap.static_grads
        slots, k = [], 0
        for t in (*cap.static_args, *params):
            if t is not None and t.requires_grad:
                slots.append(k)
                k += 1
            else:
                slots.append(None)
        self.slots = slots
        graphed = self

        class Replay(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                for static, x in zip(cap.static_args, inputs[:graphed.n_args]):
                    if static is not None and static.data_ptr() != x.data_ptr():
                        static.copy_(x)
                cap.replay_forward()
                return cap.static_out.detach()

            @staticmethod
            @torch.autograd.function.once_differentiable
            def backward(ctx, grad):
                if cap.static_grad_out.data_ptr() != grad.data_ptr():
                    cap.static_grad_out.copy_(grad)
                cap.replay_backward()
                return tuple(None if s is None or cap.static_grads[s] is None else cap.static_grads[s].detach()
                             for s in graphed.slots)

        self.replay = Replay

    def __call__(self, args: tuple) -> torch.Tensor:
        return self.replay.apply(*args, *self.params)

    def release(self) -> None:
        """Free what the capture allocated (the static output and gradients) now, for good: the pair cannot replay
        after this. A parameter's ``.grad`` that is one of those buffers (autograd may keep it as it) is set to None.

        Why: under cudaMallocAsync (ComfyUI's default allocator) every free of a captured allocation outside a capture
        makes PyTorch's allocator warn, once per tensor ("Attempting uncaptured free of a captured allocation ...
        This is technically allowed"). Freed by the garbage collector, as the pairs' tensors otherwise are, the
        warnings bypass Python's warning filters (they are printed by C++ to stderr): at the end of each training run
        the node's DiT pair (rank 32: 960 LoRA gradients) wrote ~1,900 such lines into ComfyUI's console (H200,
        session 19). Here the memory is freed inside a PyTorch call (``UntypedStorage.resize_(0)``, how FSDP frees
        parameters' memory), where PyTorch turns the warning into a Python one, and this expected message is filtered
        out."""
        cap = self.cap
        # only what the capture made: an output that is an input or a parameter itself (a function returning one) is
        # not the pair's to free
        theirs = {t.untyped_storage().data_ptr() for t in (*cap.static_args, *self.params) if t is not None}
        buffers = [t for t in (cap.static_out, *cap.static_grads)
                   if t is not None and t.untyped_storage().data_ptr() not in theirs]
        storages = {t.untyped_storage().data_ptr() for t in buffers}
        for p in self.params:
            if p.grad is not None and p.grad.untyped_storage().data_ptr() in storages:
                p.grad = None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Attempting uncaptured free of a captured allocation")
            for t in buffers:
                t.untyped_storage().resize_(0)


def make_graphed(fn: Callable[..., torch.Tensor], sample_args: tuple, params: Sequence[torch.Tensor] = (), *,
                 warmup: int = 3, guard: Callable[[], contextlib.AbstractContextManager] | None = None,
                 capture: Callable[..., Captured] | None = None) -> Callable[..., torch.Tensor]:
    """``torch.cuda.make_graphed_callables(fn, sample_args)`` for a function of tensors (``sample_args`` become the
    static inputs) whose trainable tensors are ``params``. Under PyTorch's native allocator with no ``params`` that is
    what runs (inside ``guard``): beside torch.compile's reduce-overhead graph trees (the core; the node under
    ``--disable-cuda-malloc``) the text encoder's suffix was captured with it before session 16 (H200: the core at
    0.30 s/step, the node at 0.351), while captured by :func:`capture_cuda` (session 17) the core's process ended
    with a segmentation fault in the DiT's graph-tree replay, twice. The likely reason: the trees free every cuBLAS
    workspace around their warm-ups and recordings, and :func:`capture_cuda` warms up on its capture stream, so its
    graphs keep the address of a workspace made outside them, which the trees freed; ``make_graphed_callables``
    warms up on another stream, so the workspace is made inside the capture, in the pair's own pool. Its ``global``
    capture mode is what those runs had. Elsewhere (cudaMallocAsync, ComfyUI's default, or trainable ``params``) :func:`capture_cuda` captures
    (``capture``: tests pass an emulation). Raises :class:`GraphCaptureError` where capture fails."""
    from .memory import allocator_backend

    params = tuple(params)
    if capture is None and not params and allocator_backend() != "cudaMallocAsync":
        try:
            with (guard or contextlib.nullcontext)():
                return torch.cuda.make_graphed_callables(fn, tuple(sample_args), num_warmup_iters=warmup)
        except RuntimeError as e:  # CUDA errors included (torch.AcceleratorError is one)
            raise GraphCaptureError(f"{type(e).__name__}: {e}") from e
    cap = (capture or capture_cuda)(fn, tuple(sample_args), params, warmup=warmup, guard=guard)
    graphed = _Graphed(cap, len(sample_args), params)

    def call(*args):
        return graphed(args)

    call.graphed = graphed
    call.release = graphed.release  # when training is over (:meth:`_Graphed.release`)
    return call


class EmulatedCapture:
    """A stand-in for :func:`capture_cuda` where there is no GPU (tests). A CUDA graph replays the captured kernels on
    the same buffers: the forward reads the static inputs and overwrites the static output, the backward reads the
    static incoming gradient and overwrites the static gradients. This recomputes exactly that, in place, with the
    captured function, so what surrounds the graphs (copies into the static inputs, gradients routed back through
    autograd, a pair per shape, recapture where weights moved, no second forward replay before the backward) runs for
    real on a CPU. It counts captures and replays, so a test can tell replayed calls from eager ones."""

    def __init__(self):
        self.forward_replays = 0
        self.backward_replays = 0
        self.captures = 0
        self.guarded = 0  # captures whose guard was entered

    def __call__(self, fn, args, params, *, warmup=3, guard=None):
        guard = guard or contextlib.nullcontext
        diff = tuple(t for t in (*args, *params) if t is not None and t.requires_grad)
        if not diff:  # as capture_cuda
            raise GraphCaptureError("nothing requires grad: there is no backward to capture")
        with guard():
            self.guarded += guard is not contextlib.nullcontext
            out = fn(*args)
            grads = torch.autograd.grad(out, diff, torch.ones_like(out), allow_unused=True)
        self.captures += 1
        static_out = out.detach().clone()
        grad_out = torch.empty_like(static_out)
        static_grads = tuple(None if g is None else torch.zeros_like(g) for g in grads)

        def forward():
            self.forward_replays += 1
            with torch.no_grad():
                static_out.copy_(fn(*args))

        def backward():
            self.backward_replays += 1
            with torch.enable_grad():
                again = torch.autograd.grad(fn(*args), diff, grad_out, allow_unused=True)
            for static, g in zip(static_grads, again):
                if static is not None:
                    static.copy_(g)

        return Captured(tuple(args), static_out, grad_out, static_grads, forward, backward)


def _signature(args: Sequence) -> tuple:
    return tuple(None if a is None else (tuple(a.shape), a.dtype, a.requires_grad, a.device) for a in args)


class GraphCache:
    """``fn`` (tensors or None in, one tensor out) replayed as CUDA graphs, a pair per input signature; at most
    ``max_graphs`` pairs, after which new signatures run eagerly (recapturing in turn would cost more than eager).

    ``params``: the trainable tensors ``fn`` reads (their gradients come back through autograd). ``watch``: a
    function giving the other tensors ``fn`` reads (frozen weights): their addresses, and the parameters', are part of
    what was captured, so where any moved (a reloaded model, parameters replaced) every pair is dropped and
    recaptured. A pair whose forward replayed and whose backward has not run yet is not replayed again (its
    activations would be overwritten); that call runs eagerly until :meth:`new_step`. Without grad (sampling) nothing
    is captured or replayed. ``capture``: the capture function (:func:`capture_cuda` by default; tests pass one that
    emulates replay on the CPU). Returns None from :meth:`__call__` where the caller should run ``fn`` eagerly.

    ``defer``: a new signature runs eagerly where it is first seen and is captured at the next :meth:`new_step`, from
    a copy of its inputs, before anything else of that step runs. For a function called while another pair of graphs
    awaits its backward (the DiT after the text encoder's replayed forward): captured there, its graphs would be
    built while the other pair's activations are live, out of the order they then replay in; on an H200 under
    cudaMallocAsync the first backward replay of such a pair ended the process with a segmentation fault
    (docs/benchmarks.md, session 16). Captured at the step's start, every allocation of the other pairs is freed
    before this one is captured, only their static buffers live; four runs of the training node with both pairs
    trained that way (session 17)."""

    def __init__(self, fn: Callable[..., torch.Tensor], params: Sequence[torch.Tensor] = (), *,
                 watch: Callable[[], Sequence[torch.Tensor]] | None = None, max_graphs: int = 4, name: str = "graphs",
                 guard: Callable[[], contextlib.AbstractContextManager] | None = None, warmup: int = 3,
                 capture: Callable[..., Captured] | None = None, defer: bool = False):
        if max_graphs < 1:
            raise ValueError(f"max_graphs={max_graphs!r}: expected at least 1")
        self.fn, self.params, self.watch, self.max_graphs, self.name = fn, tuple(params), watch, max_graphs, name
        self.guard, self.warmup, self._capture = guard, warmup, capture  # None: capture_cuda, looked up per capture
        self.defer = defer
        self._graphs: dict[tuple, _Graphed] = {}
        self._failed: set[tuple] = set()
        self._pending: set[tuple] = set()
        self._deferred: dict[tuple, tuple] = {}  # signature -> a copy of its arguments, captured at new_step
        self._addresses: tuple | None = None
        self._said_full = False
        self.captures = 0  # how many pairs were captured (tests, logs)

    @property
    def failed(self) -> int:
        """How many input signatures' captures failed (they run eagerly)."""
        return len(self._failed)

    def _watched(self) -> tuple:
        return tuple(t.data_ptr() for t in (*self.params, *(self.watch() if self.watch else ())))

    def _check_addresses(self) -> None:
        addresses = self._watched()
        if self._addresses is not None and addresses != self._addresses and self._graphs:
            logger.info("%s: the weights they read moved (a reloaded model): recapturing", self.name)
            deferred = dict(self._deferred)  # (clear() empties the dict itself)
            self.clear()
            self._deferred = deferred
        self._addresses = addresses

    def new_step(self) -> None:
        """A new step: no pair's activations await a backward any more; signatures deferred in the last step are
        captured now."""
        self._pending.clear()
        if not self._deferred:
            return
        deferred, self._deferred = self._deferred, {}
        self._check_addresses()
        with torch.inference_mode(False), torch.enable_grad():
            for key, args in deferred.items():
                if key not in self._graphs and key not in self._failed and self._room():
                    self._new(key, args)

    def release(self) -> None:
        """Drop every captured pair and free its memory now (:meth:`_Graphed.release`): when the training is over.
        No output of a pair may be used after this (its memory is gone); parameters' gradients that were a pair's
        buffers are set to None."""
        for graphed in self._graphs.values():
            graphed.release()
        self.clear()

    def clear(self) -> None:
        """Drop every captured pair (their memory goes with them once no output refers to it)."""
        self._graphs.clear()
        self._pending.clear()
        self._failed.clear()
        self._deferred.clear()
        self._addresses = None
        self._said_full = False

    def _room(self) -> bool:
        if len(self._graphs) < self.max_graphs:
            return True
        if not self._said_full:
            logger.info("%s: %d input shapes captured, the most kept; others run without CUDA graphs", self.name,
                        self.max_graphs)
            self._said_full = True
        return False

    def __call__(self, *args) -> torch.Tensor | None:
        if not torch.is_grad_enabled():  # a forward without a backward (sampling, evaluation): no graphs
            return None
        key = _signature(args)
        self._check_addresses()
        if key in self._pending or key in self._failed:
            return None
        graphed = self._graphs.get(key)
        if graphed is None:
            if not self._room():
                return None
            if self.defer:
                if key not in self._deferred and len(self._graphs) + len(self._deferred) < self.max_graphs:
                    self._deferred[key] = tuple(None if a is None else a.detach().clone().requires_grad_(a.requires_grad)
                                                for a in args)
                return None
            graphed = self._new(key, args)
            if graphed is None:
                return None
        out = graphed(tuple(a for a in args if a is not None))
        if out.requires_grad:
            self._pending.add(key)
            out.register_hook(lambda grad: self._pending.discard(key))
        return out

    def _new(self, key: tuple, args: tuple) -> _Graphed | None:
        present = [i for i, a in enumerate(args) if a is not None]
        fn, n = self.fn, len(args)

        def dense(*tensors):  # fn over the tensors only (None arguments are part of the signature)
            full = [None] * n
            for i, t in zip(present, tensors):
                full[i] = t
            return fn(*full)

        static = tuple(args[i].detach().clone().requires_grad_(args[i].requires_grad) for i in present)
        try:
            cap = (self._capture or capture_cuda)(dense, static, self.params, warmup=self.warmup, guard=self.guard)
        except GraphCaptureError as e:
            logger.warning("%s: CUDA graph capture failed for shapes %s (%s); running them without graphs", self.name,
                           [tuple(a.shape) for a in static], e)
            self._failed.add(key)
            return None
        self.captures += 1
        logger.info("%s: captured forward+backward CUDA graphs for input shapes %s", self.name,
                    [tuple(a.shape) for a in static])
        graphed = self._graphs[key] = _Graphed(cap, len(static), self.params)
        return graphed


__all__ = ["ASYNC_GRAPHS_ENV", "ASYNC_GRAPH_PARTS", "CAPTURE_ERROR_MODE", "Captured", "EmulatedCapture", "GraphCache",
           "GraphCaptureError", "async_graphs_from_env", "async_text_graphs", "capture_cuda", "make_graphed"]
