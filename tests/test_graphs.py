"""training/graphs.py: a function's forward and backward replayed as CUDA graphs, a pair per input shape.

On a CPU the capture is emulated (``graphs.EmulatedCapture``: the replays recompute the static buffers in place), so
everything around the graphs is tested for real: inputs copied into the static buffers, gradients back through
autograd to the arguments and the trainable parameters, one capture per shape, at most ``max_graphs``, recapture where
a weight the graphs read moved, no second forward replay before its backward, a failed capture run eagerly. The GPU
test captures for real, in a fresh process under PyTorch's cudaMallocAsync allocator (ComfyUI's default) while another
thread makes CUDA calls, and compares with eager code."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen_zero_prior.training import graphs
from qwen_zero_prior.training.graphs import EmulatedCapture, GraphCache, GraphCaptureError


class _Lora(torch.nn.Module):
    """A frozen weight (read by the graphs, not an argument) plus a trainable low-rank pair."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(6, 6, generator=g), requires_grad=False)
        self.a = torch.nn.Parameter(torch.randn(2, 6, generator=g) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(6, 2, generator=g) * 0.3)

    def forward(self, x, ctx, mask=None):
        h = x @ self.w.T + (x @ self.a.T) @ self.b.T
        c = ctx.mean(dim=1, keepdim=True) if mask is None else (ctx * mask[..., None]).sum(1, keepdim=True)
        return torch.tanh(h + c)


def _step(model, fn, x, ctx, mask=None):
    """One step's output, and the gradients of the LoRA and of ``ctx`` (the token's path)."""
    model.zero_grad(set_to_none=True)
    ctx = ctx.clone().requires_grad_(True)
    out = fn(x, ctx, mask)
    (out.square().sum() + out.sum()).backward()
    return out.detach().clone(), model.a.grad.clone(), model.b.grad.clone(), ctx.grad.clone()


def _cache(model, emu, **kw):
    return GraphCache(model, [model.a, model.b], watch=lambda: [model.w], capture=emu, name="test", **kw)


def _inputs(seed, n=4, t=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(1, t, 6, generator=g)


def test_replays_compute_what_eager_computes_with_gradients_to_lora_and_inputs():
    model, emu = _Lora(), EmulatedCapture()
    cache = _cache(model, emu)
    for step in range(3):  # new input values each step, one shape: one capture, then replays
        x, ctx = _inputs(step)
        cache.new_step()
        want = _step(model, model, x, ctx)
        got = _step(model, cache, x, ctx)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
        with torch.no_grad():  # the optimizer moves the LoRA in place: the graphs read it where it is
            model.b.add_(0.05)
    assert (emu.captures, cache.captures, emu.forward_replays, emu.backward_replays) == (1, 1, 3, 3)
    # another shape (a caption of another length) gets its own pair; the first pair is still served
    x, ctx = _inputs(9, t=5)
    cache.new_step()
    torch.testing.assert_close(_step(model, cache, x, ctx)[3], _step(model, model, x, ctx)[3], rtol=0, atol=1e-6)
    assert emu.captures == 2
    x, ctx = _inputs(10)
    cache.new_step()
    _step(model, cache, x, ctx)
    assert emu.captures == 2 and emu.forward_replays == 5


def test_a_missing_argument_is_part_of_the_signature():
    """``mask=None`` (no padding) and a mask tensor are different graphs, each equal to eager."""
    model, emu = _Lora(), EmulatedCapture()
    cache = _cache(model, emu)
    x, ctx = _inputs(1)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    for m in (None, mask, None):
        cache.new_step()
        for w, g in zip(_step(model, model, x, ctx, m), _step(model, cache, x, ctx, m)):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    assert emu.captures == 2 and emu.forward_replays == 3


def test_no_second_forward_replay_before_the_backward():
    """A second call of one shape before the first's backward would overwrite the activations that backward needs:
    it runs eagerly (None), until the backward ran or a new step began."""
    model, emu = _Lora(), EmulatedCapture()
    cache = _cache(model, emu)
    x, ctx = _inputs(2)
    ctx = ctx.requires_grad_(True)
    first = cache(x, ctx, None)
    assert first is not None and cache(x, ctx, None) is None
    first.sum().backward()
    assert cache(x, ctx, None) is not None  # the backward ran: free again
    assert cache(x, ctx, None) is None
    cache.new_step()  # a step abandoned before its backward (an error, an interrupt) does not block the next
    assert cache(x, ctx, None) is not None


def test_nothing_is_captured_or_replayed_without_grad():
    """Sampling runs without grad: no capture (a real one would fail capturing a backward that does not exist) and
    no replay; the shape is captured later, with grad, as usual."""
    model, emu = _Lora(), EmulatedCapture()
    cache = _cache(model, emu)
    x, ctx = _inputs(7)
    with torch.no_grad():
        assert cache(x, ctx, None) is None
    assert emu.captures == 0 and cache.failed == 0
    cache.new_step()
    assert cache(x, ctx.requires_grad_(True), None) is not None and emu.captures == 1


def test_moved_weights_or_replaced_parameters_are_recaptured(caplog):
    """The graphs read the frozen weights and the LoRA at their captured addresses: where ComfyUI reloads a model (new
    tensors) or a parameter's data is replaced, the pairs are dropped and captured again, and compute with the new
    values."""
    model, emu = _Lora(), EmulatedCapture()
    cache = _cache(model, emu)
    x, ctx = _inputs(3)
    cache.new_step()
    _step(model, cache, x, ctx)
    model.w.data = model.w.data * 2  # a reload: new storage
    cache.new_step()
    with caplog.at_level(logging.INFO, logger=graphs.__name__):
        got = _step(model, cache, x, ctx)
    assert "moved" in caplog.text and emu.captures == 2
    torch.testing.assert_close(got[0], _step(model, model, x, ctx)[0], rtol=0, atol=1e-6)
    model.a.data = model.a.data.clone()  # e.g. a checkpoint loaded by replacing .data
    cache.new_step()
    _step(model, cache, x, ctx)
    assert emu.captures == 3


def test_at_most_max_graphs_shapes_then_eager(caplog):
    model, emu = _Lora(), EmulatedCapture()
    cache = _cache(model, emu, max_graphs=2)
    outs = []
    with caplog.at_level(logging.INFO, logger=graphs.__name__):
        for t in (2, 3, 4, 5):
            x, ctx = _inputs(t, t=t)
            cache.new_step()
            outs.append(cache(x, ctx.requires_grad_(True), None))
    assert [o is None for o in outs] == [False, False, True, True] and emu.captures == 2
    assert caplog.text.count("the most kept") == 1
    with pytest.raises(ValueError, match="max_graphs=0"):
        GraphCache(model, max_graphs=0)


def test_a_failed_capture_runs_that_shape_eagerly_and_is_not_retried(caplog):
    calls = []

    def failing(fn, args, params, **kw):
        calls.append(1)
        raise GraphCaptureError("operation not permitted when stream is capturing")

    model = _Lora()
    cache = GraphCache(model, [model.a, model.b], capture=failing, name="DiT engine")
    x, ctx = _inputs(4)
    with caplog.at_level(logging.WARNING, logger=graphs.__name__):
        assert cache(x, ctx.requires_grad_(True), None) is None
        cache.new_step()
        assert cache(x, ctx, None) is None
    assert len(calls) == 1 and "DiT engine: CUDA graph capture failed" in caplog.text
    assert "operation not permitted" in caplog.text


def test_kernel_pointer_patch_is_scoped_and_restored_after_an_error(monkeypatch):
    """Under cudaMallocAsync a capture hands inductor's kernels addresses (graphs._kernel_pointers_as_ints): the
    patch of ``CachingAutotuner.run`` lives only inside the capture, is undone when the capture raises, passes
    arguments through unchanged where nothing is capturing, and is not made at all under the native allocator."""
    heuristics = pytest.importorskip("torch._inductor.runtime.triton_heuristics")
    from qwen_zero_prior.training import memory

    seen = []

    def recorder(self, *args, **kwargs):
        seen.append(args)

    monkeypatch.setattr(heuristics.CachingAutotuner, "run", recorder)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(memory, "allocator_backend", lambda: "native")
    with graphs._kernel_pointers_as_ints(torch.device("cuda")):
        assert heuristics.CachingAutotuner.run is recorder
    monkeypatch.setattr(memory, "allocator_backend", lambda: "cudaMallocAsync")
    t = torch.ones(2)
    with pytest.raises(RuntimeError, match="capture broke"):
        with graphs._kernel_pointers_as_ints(torch.device("cuda")):
            assert heuristics.CachingAutotuner.run is not recorder
            fake = type("K", (), {"launchers": [object()]})()
            heuristics.CachingAutotuner.run(fake, t, 3, stream=0)  # not capturing: unchanged
            raise RuntimeError("capture broke")
    assert heuristics.CachingAutotuner.run is recorder
    assert seen[0][0] is t and seen[0][1] == 3


def test_make_graphed_enters_the_guard_and_matches_eager():
    """``make_graphed`` (what the text encoder's suffix captures with) over a plain function; the guard (the node's:
    ComfyUI's offload streams off) is entered around the capture."""
    model, emu = _Lora(), EmulatedCapture()
    entered = []

    class Guard:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *a):
            return False

    x, ctx = _inputs(5)
    sample = (x, ctx.clone().requires_grad_(True))
    fn = graphs.make_graphed(lambda a, c: model(a, c), sample, capture=emu, guard=Guard)
    grads = []
    for run in (fn, model):  # no params given: only the input's gradient comes back
        x, ctx = _inputs(6)
        ctx.requires_grad_(True)
        run(x, ctx).square().sum().backward()
        grads.append(ctx.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)
    assert entered and emu.guarded == 1 and emu.forward_replays == 1


@pytest.mark.parametrize("backend", ["native", "cudaMallocAsync"])
def test_make_graphed_uses_pytorchs_own_recipe_under_the_native_allocator(monkeypatch, backend):
    """Under the native allocator (the core, ComfyUI with --disable-cuda-malloc) a function without trainable
    ``params`` is captured by ``torch.cuda.make_graphed_callables``, inside the guard (the core's text encoder trained
    with it beside torch.compile's graph trees; capture_cuda there ended the process in the DiT's replay, session 17);
    under cudaMallocAsync, and wherever ``params`` are given, by ``capture_cuda``. Its failures become
    GraphCaptureError."""
    calls, inside = [], []

    class Guard:
        def __enter__(self):
            inside.append(True)

        def __exit__(self, *exc):
            inside.append(False)

    def pytorchs(fn, sample, num_warmup_iters):
        calls.append(("pytorch", inside[-1] if inside else None, num_warmup_iters))
        return fn

    def ours(fn, args, params, *, warmup, guard):
        calls.append(("capture_cuda", len(params)))
        raise GraphCaptureError("stop here")

    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: backend)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", pytorchs)
    monkeypatch.setattr(graphs, "capture_cuda", ours)
    sample = (torch.zeros(2, requires_grad=True),)
    if backend == "native":
        assert graphs.make_graphed(torch.tanh, sample, guard=Guard, warmup=2) is torch.tanh
        assert calls == [("pytorch", True, 2)] and inside[-1] is False
    else:
        with pytest.raises(GraphCaptureError, match="stop here"):
            graphs.make_graphed(torch.tanh, sample, guard=Guard)
        assert calls == [("capture_cuda", 0)]
    calls.clear()
    with pytest.raises(GraphCaptureError, match="stop here"):  # trainable params: always capture_cuda
        graphs.make_graphed(torch.tanh, sample, [torch.zeros(1, requires_grad=True)])
    assert calls == [("capture_cuda", 1)]

    def broken(fn, sample, num_warmup_iters):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", broken)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    with pytest.raises(GraphCaptureError, match="operation not permitted"):
        graphs.make_graphed(torch.tanh, sample)


@pytest.mark.parametrize("raw,text,dit", [("", True, True), ("text", True, False), ("dit", False, True),
                                          ("0", False, False), ("off", False, False), (" DiT ", False, True),
                                          ("1", True, True), ("Both", True, True)])
def test_async_graphs_knob(monkeypatch, raw, text, dit):
    monkeypatch.setenv(graphs.ASYNC_GRAPHS_ENV, raw)
    assert (graphs.async_graphs_from_env("text"), graphs.async_graphs_from_env("dit")) == (text, dit)
    # the text encoder's graphs: where asked for, or where dit was asked for and the DiT got none of its own
    assert graphs.async_text_graphs(dit_captured=True) == text
    assert graphs.async_text_graphs(dit_captured=False) == (text or dit)


@pytest.mark.parametrize("raw", ["yes", "2", "all", "te"])
def test_async_graphs_knob_refuses_garbage(monkeypatch, raw):
    monkeypatch.setenv(graphs.ASYNC_GRAPHS_ENV, raw)
    with pytest.raises(ValueError, match=f"QWEN_ZERO_PRIOR_ASYNC_GRAPHS={raw!r}: expected 1 .* or 0"):
        graphs.async_graphs_from_env("dit")
    with pytest.raises(ValueError, match="part='vae'"):
        graphs.async_graphs_from_env("vae")


def test_deferred_capture_runs_a_new_shape_eagerly_and_captures_it_at_the_next_step():
    """``defer``: the DiT runs while the text encoder's replayed forward awaits its backward, and a pair captured then
    crashed on a GPU; a new shape runs eagerly where it is first seen and is captured at the next step's start, from a
    copy of its inputs (``requires_grad`` kept, so the signature matches), before anything else of that step."""
    model, emu = _Lora(), EmulatedCapture()
    cache = _cache(model, emu, defer=True, max_graphs=2)
    shapes = (3, 3, 5, 3, 5, 7, 7)  # caption lengths, one per step
    replayed = []

    def run(*args):  # as the engine's predict: eager where the cache declines
        out = cache(*args)
        return model(*args) if out is None else out

    for step, t in enumerate(shapes):
        x, ctx = _inputs(step, t=t)
        before = emu.forward_replays
        cache.new_step()
        want = _step(model, model, x, ctx)
        got = _step(model, run, x, ctx)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
        replayed.append(emu.forward_replays > before)
        if step == 0:  # nothing captured during the step that first saw the shape
            assert emu.captures == 0
    # 3: eager, then replayed; 5: eager, then replayed; 7: a third shape over max_graphs=2, always eager
    assert replayed == [False, True, False, True, True, False, False]
    assert (emu.captures, cache.captures) == (2, 2)
    # a shape deferred while the weights then move is captured over the moved weights
    model2, emu2 = _Lora(), EmulatedCapture()
    cache2 = _cache(model2, emu2, defer=True)
    x, ctx = _inputs(1)
    cache2.new_step()
    assert cache2(x, ctx.clone().requires_grad_(True), None) is None  # deferred
    model2.w.data = model2.w.data * 2
    cache2.new_step()
    torch.testing.assert_close(_step(model2, cache2, x, ctx)[0], _step(model2, model2, x, ctx)[0], rtol=0, atol=1e-6)
    assert emu2.captures == 1 and emu2.forward_replays == 1


def test_weights_moving_while_a_shape_waits_keeps_it_deferred():
    """A captured shape, then a new one deferred, then the weights move within the same step (ComfyUI reloaded the
    model): the captured pair is dropped, the deferred shape is kept and captured at the next step over the moved
    weights, and the first shape is captured again where it next runs."""
    model, emu = _Lora(), EmulatedCapture()
    cache = _cache(model, emu, defer=True)
    a, b = _inputs(1, t=3), _inputs(2, t=5)

    def run(x, ctx, mask=None):
        out = cache(x, ctx, mask)
        return model(x, ctx, mask) if out is None else out

    for _ in range(2):  # shape a: deferred, then captured and replayed
        cache.new_step()
        _step(model, run, *a)
    assert (emu.captures, emu.forward_replays) == (1, 1)
    cache.new_step()
    _step(model, run, *b)  # shape b deferred
    model.w.data = model.w.data * 2  # moved before the step ends
    assert cache(a[0], a[1].clone().requires_grad_(True), None) is None  # a's pair dropped; a is deferred again
    cache.new_step()  # both captured now, over the moved weights
    assert emu.captures == 3
    for x, ctx in (a, b):
        torch.testing.assert_close(_step(model, run, x, ctx)[0], _step(model, model, x, ctx)[0], rtol=0, atol=1e-6)
        cache.new_step()
    assert emu.captures == 3 and emu.forward_replays == 3


def test_no_gc_during_capture_and_restored():
    import gc

    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="boom"), graphs._no_gc():
        assert not gc.isenabled()
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with graphs._no_gc():
            pass
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()


def test_release_frees_the_captured_buffers_and_drops_gradients_that_are_them():
    """The end of training: every pair's captured output and gradients freed now (their storages emptied), a
    parameter whose ``.grad`` is one of them set to None, other gradients kept; the cache starts over afterwards."""
    model, emu = _Lora(), EmulatedCapture()
    cache = _cache(model, emu)
    for step in range(2):
        x, ctx = _inputs(step)
        cache.new_step()
        model.zero_grad(set_to_none=True)
        cache(x, ctx.clone().requires_grad_(True)).sum().backward()
    (pair,) = cache._graphs.values()
    buffers = [pair.cap.static_out, *(g for g in pair.cap.static_grads if g is not None)]
    assert all(t.untyped_storage().nbytes() > 0 for t in buffers)
    model.a.grad = pair.cap.static_grads[-2].detach()  # as autograd may keep a static gradient as the .grad itself
    b_grad = model.b.grad.clone()
    model.b.grad = b_grad  # an ordinary gradient: not the pair's
    cache.release()
    assert all(t.untyped_storage().nbytes() == 0 for t in buffers)
    assert model.a.grad is None and model.b.grad is b_grad and model.b.grad.untyped_storage().nbytes() > 0
    assert not cache._graphs and cache.captures == 1
    x, ctx = _inputs(7)  # a new run captures again and computes what eager code computes
    cache.new_step()
    torch.testing.assert_close(_step(model, cache, x, ctx)[1], _step(model, model, x, ctx)[1], rtol=0, atol=1e-6)
    assert emu.captures == 2


def test_release_leaves_an_output_that_is_an_input_or_a_parameter_alone():
    """A captured function that returns its input (or a parameter) as it is: what ``capture_cuda`` leaves then has
    that tensor itself as the static output (``out.detach()``), and releasing the pair frees neither."""
    from qwen_zero_prior.training.graphs import Captured

    def capture(fn, args, params, *, warmup, guard):  # capture_cuda's result without a GPU: the output as fn gave it
        out = fn(*args)
        grads = tuple(torch.zeros_like(t) for t in (*args, *params) if t.requires_grad)
        return Captured(args, out.detach(), torch.empty_like(out), grads, lambda: None, lambda: None)

    w = torch.nn.Parameter(torch.randn(3))
    kept = []
    for fn in (lambda x: x, lambda x: w):
        cache = GraphCache(fn, [w], capture=capture, name="test")
        cache.new_step()
        cache(torch.randn(3, requires_grad=True))
        (pair,) = cache._graphs.values()
        kept.append(pair.cap.static_args[0])
        grads = [g for g in pair.cap.static_grads if g is not None]
        cache.release()
        assert all(g.untyped_storage().nbytes() == 0 for g in grads)  # the pair's own buffers are freed
    assert all(t.untyped_storage().nbytes() > 0 for t in (*kept, w))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU: GPU-only test SKIPPED")
def test_release_under_cuda_malloc_async_prints_no_warning_per_tensor():
    """bench/graph_teardown_check.py: dropped with ``clear()`` the pair's captured tensors each print PyTorch's
    "uncaptured free" warning (the check's control: 101 on an H200); freed by ``release()``, none."""
    r = subprocess.run([sys.executable, "-m", "bench.graph_teardown_check"], capture_output=True, text=True,
                       timeout=600, cwd=Path(__file__).parents[1])
    assert r.returncode == 0 and '"ok": true' in r.stdout, r.stdout + r.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU: GPU-only test SKIPPED")
@pytest.mark.parametrize("backend", ["native", "cudaMallocAsync"])
@pytest.mark.parametrize("op", ["linear", "compiled", "sdpa_cudnn"])
def test_capture_on_a_gpu_under_each_allocator_beside_a_busy_thread(backend, op):
    """bench/graph_capture_check.py in its own process (the allocator is chosen when CUDA starts): graphs equal to
    eager while another thread makes CUDA calls, inductor's triton kernels included (under cudaMallocAsync their
    launcher's pointer check failed on graph memory until ``_kernel_pointers_as_ints``)."""
    cmd = [sys.executable, "-m", "bench.graph_capture_check", "--backend", backend, "--op", op, "--steps", "6"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert r.returncode == 0 and '"ok": true' in r.stdout, r.stdout + r.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU: GPU-only test SKIPPED")
@pytest.mark.parametrize("op", ["linear", "compiled"])
def test_two_pairs_on_a_gpu_under_cuda_malloc_async(op):
    """Two pairs in one step, as the training node with QWEN_ZERO_PRIOR_ASYNC_GRAPHS=1: a text stage's replayed forward
    awaits its backward while the step's pair runs; the step's new shapes are captured at the next step's start
    (``defer``). Equal to eager, one capture each."""
    cmd = [sys.executable, "-m", "bench.graph_capture_check", "--backend", "cudaMallocAsync", "--op", op,
           "--steps", "6", "--pairs", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert r.returncode == 0 and '"ok": true' in r.stdout and '"text_captures": 1' in r.stdout, \
        r.stdout + r.stderr[-3000:]
