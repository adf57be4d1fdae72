"""model.offload's prefetcher: streamed weights copied ahead of use into a ring buffer, in the last step's order.

On a CPU the copies are immediate (no streams), so these tests check what the GPU path relies on and a CPU can
show: which fetches are served ahead, that a weight handed out is never overwritten before its readers are done
with it, that an order change falls back to copying at use, and that training is bit-for-bit the same with and
without the prefetcher. The overlap itself is a GPU measurement (docs/benchmarks.md, bench_step --mode capped)."""

import copy
import gc

import pytest
import torch

from qwen_zero_prior.training.data import scan_dataset
from qwen_zero_prior.training.offload import OffloadedLinear, apply_offload, prefetcher_of
from qwen_zero_prior.training.prefetch import WeightPrefetcher
from qwen_zero_prior.training.trainer import Trainer


def _rel(a, b):
    return float((a - b).norm() / b.norm())


class _Layer:
    def __init__(self, n: int, seed: int):
        self.stored = torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _run(pf, layers, order, hold=()):
    """Fetch ``order`` (indices into layers), checking each tensor; the ones in ``hold`` stay unreleased until
    the end (a reader not yet queued), and must still be intact then."""
    held = []
    for i in order:
        t, done = pf.fetch(layers[i])
        assert torch.equal(t, layers[i].stored), f"layer {i} arrived wrong"
        if i in hold:
            held.append((i, t.clone(), t, done))
        else:
            done()
    for i, snapshot, t, done in held:
        assert torch.equal(t, snapshot), f"layer {i}'s range was overwritten while in use"
        done()


def _recorded(layers, arena_bytes, order):
    """A prefetcher that has seen one step fetch ``order`` (what the next step follows)."""
    pf = WeightPrefetcher(torch.device("cpu"), arena_bytes=arena_bytes)
    pf.begin_step()
    _run(pf, layers, order)
    return pf


def test_second_step_is_served_ahead_and_wraps_the_ring():
    layers = [_Layer(100 + 37 * i, i) for i in range(8)]  # 400..1036 floats: 1.6..4.1 KB each
    pf = WeightPrefetcher(torch.device("cpu"), arena_bytes=9 * 1024)  # ~3 layers at a time: the ring wraps
    order = list(range(8)) + list(reversed(range(8)))  # a forward, then a backward
    pf.begin_step()
    _run(pf, layers, order)
    assert (pf.hits, pf.misses) == (0, 16)  # the first step has no order to follow
    for step in range(3):
        pf.begin_step()
        _run(pf, layers, order)
        assert (pf.hits, pf.misses) == (16 * (step + 1), 16), pf.stats()
    assert pf.stats()["layers_per_step"] == 16


class _Block:
    """A prefetcher owner of several weights fetched as one range (offload.StreamedBlock's protocol: ``parts``)."""

    def __init__(self, sizes, seed: int):
        self.parts = tuple(torch.randn(n, generator=torch.Generator().manual_seed(seed * 10 + j)).to(dtype)
                           for j, (n, dtype) in enumerate(sizes))


def test_an_owner_of_several_weights_is_copied_as_one_aligned_range():
    """Each part lands at a 512-byte aligned offset of one range; the fetch hands back every part, intact, from the
    ring in the next step (one hit for the whole block), mixed with single-weight owners; bytes counted exactly."""
    from qwen_zero_prior.training.prefetch import _layout

    blocks = [_Block([(37, torch.float32), (300, torch.bfloat16), (5, torch.float32)], i) for i in range(4)]
    layers = [_Layer(90, 50 + i) for i in range(2)]
    owners = blocks[:2] + layers + blocks[2:]
    offsets, span = _layout(blocks[0].parts)
    assert offsets == (0, 512, 1536) and span == 1536 + 20  # 148 bytes, then 600, then 20, each aligned
    pf = WeightPrefetcher(torch.device("cpu"), arena_bytes=3 * 2048)  # ~3 blocks: the ring wraps
    for step in range(3):
        copied = pf.bytes_copied
        pf.begin_step()
        for o in owners:
            got, done = pf.fetch(o)
            if isinstance(o, _Block):
                assert isinstance(got, list) and len(got) == 3
                assert all(torch.equal(g, t) and g.dtype == t.dtype for g, t in zip(got, o.parts))
                if pf.cuda is False and step:  # from the ring: views of the arena, at the aligned offsets
                    starts = [g.data_ptr() - pf.arena.data_ptr() for g in got]
                    assert [a - starts[0] for a in starts] == list(offsets)
            else:
                assert torch.equal(got, o.stored)
            done()
        assert pf.bytes_copied - copied == 4 * (148 + 600 + 20) + 2 * 360
    assert (pf.hits, pf.misses) == (12, 6) and pf.stats()["layers_per_step"] == 6


def test_a_weight_in_use_is_never_overwritten():
    layers = [_Layer(256, i) for i in range(6)]  # 1 KB each
    order = [0, 1, 2, 3, 4, 5]
    pf = _recorded(layers, 3 * 1024, order)
    pf.begin_step()
    # layer 1 stays in use to the end: the ring cannot reuse its range, so later copies wait (copied at use instead)
    _run(pf, layers, order, hold={1})
    assert pf.hits >= 3 and pf.hits + pf.misses == 12


def test_order_change_falls_back_and_is_followed_next_step():
    layers = [_Layer(128, i) for i in range(5)]
    pf = _recorded(layers, 1 << 20, [0, 1, 2, 3, 4])
    pf.begin_step()
    # 3 is found further on (2 is skipped), 2 is not in the rest of the order (copied at use), 4 follows 3
    _run(pf, layers, [0, 1, 3, 2, 4])
    assert (pf.hits, pf.misses) == (4, 5 + 1)
    pf.begin_step()
    _run(pf, layers, [0, 1, 3, 2, 4])  # the new order is the one followed now
    assert (pf.hits, pf.misses) == (4 + 5, 6)


def test_order_change_with_a_small_ring():
    """The same order change with a ring of ~2 weights: copies made ahead for the skipped layer are dropped (their
    range reused), never handed out for another layer."""
    layers = [_Layer(128, i) for i in range(6)]  # 512 B each
    pf = _recorded(layers, 2 * 512, [0, 1, 2, 3, 4, 5])
    for _ in range(2):
        pf.begin_step()
        _run(pf, layers, [0, 1, 3, 2, 4, 5])  # 2 is skipped at 3, then copied at use; 4 and 5 resume
    assert pf.hits >= 5 + 5 and pf.hits + pf.misses == 18, pf.stats()


def test_a_weight_never_released_does_not_block_later_steps():
    """A step that failed between fetch and done (an error in the reading kernel) leaves its range handed out;
    the next step releases it, and the steps after are served ahead again."""
    layers = [_Layer(256, i) for i in range(3)]  # 1 KB each
    order = [0, 1, 2, 0, 1, 2]
    pf = _recorded(layers, 3 * 1024, order)
    pf.begin_step()
    pf.fetch(layers[0])  # handed out, its done() never called
    pf.begin_step()
    _run(pf, layers, order)  # follows the failed step's one-fetch order: mostly copied at use
    for _ in range(2):
        hits = pf.hits
        pf.begin_step()
        _run(pf, layers, order)
        assert pf.hits - hits == len(order), pf.stats()  # every fetch ahead: the stuck range was released


def test_weight_larger_than_the_ring_is_copied_at_use():
    layers = [_Layer(64, 0), _Layer(4096, 1), _Layer(64, 2)]  # the middle one (16 KB) never fits 4 KB
    pf = WeightPrefetcher(torch.device("cpu"), arena_bytes=4096)
    for _ in range(3):
        pf.begin_step()
        _run(pf, layers, [0, 1, 2])
    assert (pf.hits, pf.misses) == (4, 5)  # steps 2 and 3: the small ones ahead, the big one at use


def _copied_per_step(layers, arena_bytes, order, share, hold=()):
    pf = WeightPrefetcher(torch.device("cpu"), arena_bytes=arena_bytes, share=share)
    pf.begin_step()
    _run(pf, layers, order)
    before, hits = pf.bytes_copied, pf.hits
    pf.begin_step()
    _run(pf, layers, order, hold=hold)
    return pf.bytes_copied - before, pf.hits - hits, pf


# a checkpointed block of 4 layers (1 KB each): its forward, 6 other layers (the rest of the model), then in the
# backward its recomputation and its own products, which read the same weights in reverse order
_BLOCK = [0, 1, 2, 3]
_RECOMPUTED = _BLOCK + list(range(4, 10)) + _BLOCK + _BLOCK[::-1]


def test_a_weight_used_again_while_still_in_the_ring_is_copied_once():
    layers = [_Layer(256, i) for i in range(10)]
    without, hits_without, _ = _copied_per_step(layers, 5 * 1024, _RECOMPUTED, share=False)
    with_, hits_with, pf = _copied_per_step(layers, 5 * 1024, _RECOMPUTED, share=True)
    assert without == len(_RECOMPUTED) * 1024  # every fetch its own copy
    # the backward's four fetches are served from the recomputation's ranges; the forward's were overwritten by
    # the layers in between, so the recomputation copies again
    assert with_ == without - 4 * 1024, pf.stats()
    assert pf.shared == 4 and hits_with == hits_without == len(_RECOMPUTED), pf.stats()


@pytest.mark.parametrize("hold", [(), (2,)])
def test_a_shared_range_is_not_overwritten_before_its_last_use(hold):
    """The ring goes on copying past the block (the next layers) while the backward's fetches, served from the
    recomputation's ranges, are still to come: later copies must wait for those ranges, never go over them. With
    ``hold``, both uses of layer 2 (one range) also stay handed out to the end. ``_run`` checks every tensor's
    bytes at its fetch and the held ones again at the end."""
    layers = [_Layer(256, i) for i in range(10)]
    order = _RECOMPUTED + [4, 5, 6, 7, 8, 9]  # copies after the block, enough to wrap the ring twice
    copied, hits, pf = _copied_per_step(layers, 5 * 1024, order, share=True, hold=set(hold))
    assert pf.shared >= 1 and hits + (pf.misses - len(order)) == len(order), pf.stats()


def test_sharing_off_copies_every_use():
    layers = [_Layer(256, i) for i in range(10)]
    copied, hits, pf = _copied_per_step(layers, 64 * 1024, _RECOMPUTED, share=False)  # the whole order fits
    assert pf.shared == 0 and copied == len(_RECOMPUTED) * 1024


def test_refuses_an_empty_ring():
    with pytest.raises(ValueError, match="arena_bytes must be positive, got 0"):
        WeightPrefetcher(torch.device("cpu"), 0)


def test_offloaded_training_is_the_same_with_and_without_prefetch(tiny_pipe, dataset_dir, tmp_path, make_config):
    """Three offloaded steps (every block and text-decoder layer streamed, the ring smaller than one step's
    weights) give bit-identical LoRA and token rows with the prefetcher (sharing a weight's range between close
    uses, or not) and without it; from the second step on, the prefetcher serves every fetch ahead."""
    examples = scan_dataset(dataset_dir, "<zwx>", "a photo of {token}", True)
    cfg = make_config(steps=3, learning_rate=2e-3, token_learning_rate=2e-2)
    runs, stats = {}, {}
    for prefetch_gib, share in ((0.0, None), (64 * 1024 / 2**30, True), (64 * 1024 / 2**30, False)):
        trainer = Trainer(cfg, copy.deepcopy(tiny_pipe), examples, tmp_path / f"{prefetch_gib}-{share}")
        pipe = trainer.backend.pipe
        summary = apply_offload(pipe, torch.device("cpu"), budget_gib=1e-3, reserve_gib=0, prefetch_gib=prefetch_gib)
        pf = prefetcher_of(pipe.transformer)
        if prefetch_gib:
            assert pf.share  # the default
            pf.share = share
            assert pf is not None and prefetcher_of(pipe.text_encoder) is pf and pf.arena_bytes == 64 * 1024
            streamed = [m for m in pipe.transformer.modules() if isinstance(m, OffloadedLinear)]
            assert streamed and all(m.prefetcher is pf for m in streamed)
            assert sum(m.stored.numel() * m.stored.element_size() for m in streamed) > pf.arena_bytes  # it wraps
        else:
            assert pf is None and summary["prefetch_gib"] == 0
        trainer.backend._prefetcher = pf  # what prepare() sets when model.offload applies it (CUDA only)
        hits = []
        for _ in range(cfg.train.steps):
            trainer.train_step()
            hits.append(pf.stats()["hits"] if pf else 0)
        runs[share] = [p.detach().clone() for p in trainer.trainable()]
        stats[share] = (hits, pf.stats() if pf else None, pf.bytes_copied if pf else None)
    for share in (True, False):
        assert all(torch.equal(a, b) for a, b in zip(runs[None], runs[share])), share
        hits, s, _ = stats[share]
        per_step = s["layers_per_step"]
        assert per_step > 0 and hits == [0, per_step, 2 * per_step], stats
    # the checkpointed blocks' backward reads the weights its recomputation just fetched: served from the same
    # ranges, fewer bytes cross
    assert stats[True][1]["shared"] > 0 and stats[False][1]["shared"] == 0, stats
    assert stats[True][2] < stats[False][2], stats


@pytest.mark.parametrize("recomputed,prefetch", [(False, False), (True, False), (True, True)])
def test_offload_compiles_every_block_with_the_fetch_as_an_op(tiny_pipe, dataset_dir, tmp_path, make_config,
                                                               recomputed, prefetch, monkeypatch):
    """model.offload with model.compile: every block compiles whole (fullgraph), the streamed ones too, their
    weight fetches an opaque custom op in the graph (through the prefetcher's ring where there is one, served ahead
    from the second step). Loss and gradients are those of the eager offloaded model. The fp8 weights' per-use cast
    of the resident layers is traced into the graph where the blocks are recomputed (gradient checkpointing, as
    offload trains), else it is the cast_linear custom op (which keeps no cast weight for the backward).
    QWEN_ZERO_PRIOR_COMPILE_STREAMED=0 keeps the streamed blocks eager (the layout before). With
    QWEN_ZERO_PRIOR_BLOCK_FETCH=1 a recomputed streamed block's weights are fetched as one before each run
    (StreamedBlock): one fetch a block run instead of one per layer and use, none in its graphs, the same loss and
    gradients as the per-layer fetch (the "eager" reference)."""
    from diffusers.models.activations import GELU

    from qwen_zero_prior.training import gelu
    from qwen_zero_prior.training.diffusers_backend import COMPILE_STREAMED_ENV, compile_blocks
    from qwen_zero_prior.training.offload import _FETCH_OP, BLOCK_FETCH_ENV, block_bytes_fp8

    graph_ops = []

    def recording(gm, example_inputs, **options):  # (options: the mode, which torch.compile passes on)
        graph_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    examples = scan_dataset(dataset_dir, "<zwx>", "a photo of {token}", True)
    runs = {}
    for mode in ("eager", "compiled", "compiled per layer", "streamed eager"):
        torch._dynamo.reset()
        monkeypatch.setenv(BLOCK_FETCH_ENV, "1" if mode in ("compiled", "streamed eager") else "0")
        graph_ops.clear()
        trainer = Trainer(make_config(), copy.deepcopy(tiny_pipe), examples, tmp_path / mode.replace(" ", "_"))
        pipe = trainer.backend.pipe
        tr = pipe.transformer
        emb = pipe.text_encoder.get_input_embeddings().weight
        budget = (emb.numel() * emb.element_size() + 1.5 * block_bytes_fp8(tr)) / 2**30  # one block resident
        if recomputed:
            tr.enable_gradient_checkpointing()
        ring = 2 * block_bytes_fp8(tr) / 2**30 if prefetch else 0.0
        apply_offload(pipe, torch.device("cpu"), budget + ring, reserve_gib=0, prefetch_gib=ring)
        pf = prefetcher_of(tr)
        assert (pf is not None) == prefetch
        if mode != "eager":
            monkeypatch.setenv(COMPILE_STREAMED_ENV, "0" if mode == "streamed eager" else "1")
            assert gelu.install(tr) == len(tr.transformer_blocks) * 2  # as accelerate_transformer does first
            kwargs_of = {}
            module_compile = torch.nn.Module.compile

            def spy(self, *args, **kwargs):
                kwargs_of[id(self)] = kwargs
                return module_compile(self, *args, **kwargs)

            with monkeypatch.context() as m:
                m.setattr(torch.nn.Module, "compile", spy)
                done = compile_blocks(tr, fullgraph=True, backend=recording, mode="reduce-overhead")
            blocks = list(tr.transformer_blocks)
            if mode.startswith("compiled"):
                assert done == blocks
                assert all(b._compiled_call_impl is not None for b in blocks)
                # streamed blocks never get CUDA graphs (they would replay one step's copies into the ring)
                assert kwargs_of[id(blocks[0])].get("mode") == "reduce-overhead"
                assert all("mode" not in kwargs_of[id(b)] for b in blocks[1:])
            else:
                assert done == blocks[:1] and all(b._compiled_call_impl is None for b in blocks[1:])
                has = [any("gelu" in m.__dict__ for m in b.modules() if isinstance(m, GELU)) for b in blocks]
                assert has == [True] + [False] * (len(blocks) - 1)  # the eager blocks keep ATen's GELU
        losses, grads = [], []
        for step in range(2):
            if pf is not None:
                pf.begin_step()
            for p in trainer.trainable():
                p.grad = None
            loss = trainer.loss_for([step % len(examples)], torch.Generator().manual_seed(step))
            loss.backward()
            losses.append(float(loss.detach()))
            # (a compiled block's backward gives zeros where eager autograd gives None: a LoRA whose output the last
            # block does not use)
            grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in trainer.trainable()])
        fetch_ops = [op for op in graph_ops if _FETCH_OP in op]
        casts = [op for op in graph_ops if "cast_linear" in op]
        runs[mode] = (losses, grads, fetch_ops, casts, pf.stats() if pf is not None else None)
    eager = runs["eager"]
    layer_op = f"qwen_zero_prior.{_FETCH_OP}"
    assert set(runs["compiled per layer"][2]) == {layer_op}, sorted(set(runs["compiled per layer"][2]))
    # a recomputed block's weights arrive as graph inputs, fetched before the run; without recomputation (nothing to
    # hand them over around) the layers fetch one by one
    assert set(runs["compiled"][2]) == (set() if recomputed else {layer_op}), sorted(set(runs["compiled"][2]))
    if prefetch:  # one fetch a streamed block run, not one per layer and use: far fewer a step
        assert runs["compiled"][4]["layers_per_step"] + 30 < runs["compiled per layer"][4]["layers_per_step"], (
            runs["compiled"][4], runs["compiled per layer"][4])
    for mode in ("compiled", "compiled per layer", "streamed eager"):
        losses, grads, fetch_ops, casts, stats = runs[mode]
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, eager[0])), (mode, losses, eager[0])
        for g, g0 in zip(grads, eager[1]):
            assert len(g) == len(g0) > 0
            assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g, g0)), mode
        assert bool(fetch_ops) == (mode == "compiled per layer" or (mode == "compiled" and not recomputed)), (
            mode, sorted(set(runs[mode][2])))
        assert (not casts) if recomputed else casts
        if prefetch:  # every fetch of the second step was served ahead (the first step's were copied at use)
            assert stats["misses"] == stats["layers_per_step"] and stats["hits"] > 0, (mode, stats)
            assert eager[4]["misses"] == eager[4]["layers_per_step"] and eager[4]["hits"] > 0, eager[4]


def test_fetch_op_refuses_a_weight_without_its_layer():
    """The streamed layers' fetch op finds its layer from the stored weight; a tensor no live streamed layer stores
    (a freed layer's, any other) is refused with a clear error instead of computing with the wrong weight."""
    from qwen_zero_prior.training.offload import _fetch_linear, fetch_linear_ops

    fetch_linear_ops()
    lin = torch.nn.Linear(8, 4, bias=False)
    off = OffloadedLinear(lin, torch.device("cpu"), fp8=False, on_gpu=False)
    x = torch.randn(2, 8)
    assert torch.allclose(_fetch_linear(x, off.stored), lin(x))
    with pytest.raises(RuntimeError, match=r"a streamed weight \(shape \(4, 8\), torch.float32, at 0x[0-9a-f]+\) "
                                            "reached the fetch op without its layer"):
        _fetch_linear(x, torch.randn(4, 8))
    twin = copy.deepcopy(off)  # a copy registers its own weight
    assert twin.stored.data_ptr() != off.stored.data_ptr()
    assert torch.allclose(_fetch_linear(x, twin.stored), lin(x))
    stored = off.stored
    del off
    gc.collect()
    with pytest.raises(RuntimeError, match="without its layer: the OffloadedLinear holding it was freed"):
        _fetch_linear(x, stored)  # its layer is gone


@pytest.mark.parametrize("mode, streamed_mode", [("reduce-overhead", None),
                                                 ("max-autotune", "max-autotune-no-cudagraphs"),
                                                 ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")])
def test_streamed_blocks_compile_without_cuda_graphs(tiny_pipe, mode, streamed_mode, monkeypatch):
    """Both modes that capture CUDA graphs (reduce-overhead, max-autotune) reach the resident blocks as asked and the
    streamed ones without graphs: a replay would copy one step's weights into the ring and skip its bookkeeping."""
    from qwen_zero_prior.training.diffusers_backend import compile_blocks
    from qwen_zero_prior.training.offload import block_bytes_fp8

    tr = tiny_pipe.transformer
    for model in (tr, tiny_pipe.text_encoder):  # frozen, as training leaves them (only frozen Linears are converted)
        model.requires_grad_(False)
    emb = tiny_pipe.text_encoder.get_input_embeddings().weight
    budget = (emb.numel() * emb.element_size() + 1.5 * block_bytes_fp8(tr)) / 2**30  # one block resident
    apply_offload(tiny_pipe, torch.device("cpu"), budget, reserve_gib=0)
    kwargs_of = {}
    module_compile = torch.nn.Module.compile

    def spy(self, *args, **kwargs):
        kwargs_of[id(self)] = kwargs
        return module_compile(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", spy)
    monkeypatch.delenv("QWEN_ZERO_PRIOR_COMPILE_STREAMED", raising=False)
    blocks = list(tr.transformer_blocks)
    assert compile_blocks(tr, fullgraph=True, mode=mode) == blocks  # (torch.compile is lazy: nothing compiles here)
    assert kwargs_of[id(blocks[0])] == {"fullgraph": True, "mode": mode}
    want = {"fullgraph": True, **({"mode": streamed_mode} if streamed_mode else {})}
    assert [kwargs_of[id(b)] for b in blocks[1:]] == [want] * (len(blocks) - 1)


def test_fetch_op_under_inductor_matches_eager_and_is_cuda_graph_unsafe():
    """What the GPU runs: the streamed layers compiled by inductor itself (not aot_eager), through the prefetcher's
    ring. Outputs and input gradients equal eager ones, every fetch goes through the ring (served ahead from the
    second step), and the ops carry torch's cudagraph_unsafe tag, which keeps inductor from putting them in a CUDA
    graph whatever the mode (where torch has the tag)."""
    from qwen_zero_prior.training.offload import _FETCH_NS, _FETCH_OP, fetch_linear_ops

    torch.manual_seed(0)
    dev = torch.device("cpu")

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = OffloadedLinear(torch.nn.Linear(16, 32).requires_grad_(False), dev, fp8=True, on_gpu=False)
            self.b = OffloadedLinear(torch.nn.Linear(32, 8, bias=False).requires_grad_(False), dev, fp8=True,
                                     on_gpu=False)

        def forward(self, x):
            return self.b(torch.nn.functional.gelu(self.a(x))) * 2

    model = Two()
    pf = WeightPrefetcher(dev, arena_bytes=4096)
    model.a.prefetcher = model.b.prefetcher = pf
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    for step in range(3):
        pf.begin_step()
        x = torch.randn(4, 16, requires_grad=True)
        want = model(x)
        (dx_want,) = torch.autograd.grad(want.square().sum(), x)
        got = compiled(x)
        (dx_got,) = torch.autograd.grad(got.square().sum(), x)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6) and torch.allclose(dx_got, dx_want, rtol=1e-5, atol=1e-6)
    # eager and compiled each fetch a and b forward and backward: 8 a step, the last two steps from the ring
    assert pf.stats()["layers_per_step"] == 8 and pf.hits == 16 and pf.misses == 8, pf.stats()
    fetch_linear_ops()
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    for name in (_FETCH_OP, f"{_FETCH_OP}_grad"):
        op = getattr(getattr(torch.ops, _FETCH_NS), name).default
        assert tag is None or tag in op.tags, (name, op.tags)


def test_compile_streamed_knob_refuses_garbage(monkeypatch):
    from qwen_zero_prior.training.diffusers_backend import COMPILE_STREAMED_ENV, compile_streamed_from_env

    monkeypatch.delenv(COMPILE_STREAMED_ENV, raising=False)
    assert compile_streamed_from_env() is None
    for raw, want in (("1", True), ("0", False), (" 0 ", False)):
        monkeypatch.setenv(COMPILE_STREAMED_ENV, raw)
        assert compile_streamed_from_env() is want
    monkeypatch.setenv(COMPILE_STREAMED_ENV, "yes")
    with pytest.raises(ValueError, match=r"QWEN_ZERO_PRIOR_COMPILE_STREAMED='yes': expected 1"):
        compile_streamed_from_env()


@pytest.mark.parametrize("compiled", [False, True])
def test_resident_offloaded_linear_follows_autocast(compiled):
    """Under autocast a resident offloaded layer computes in the autocast dtype, eager and compiled: the cast_linear
    custom op is opaque to autocast, and a compiled block once ran all of its products in float32 (a norm's output)."""
    lin = torch.nn.Linear(64, 48).to(torch.bfloat16)
    off = OffloadedLinear(lin, torch.device("cpu"), fp8=True, on_gpu=True)
    fn = torch.compile(off, fullgraph=True, backend="aot_eager") if compiled else off
    x = torch.randn(5, 64, requires_grad=True)  # float32, as a norm hands it over under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    ref = lin(x.detach().to(torch.bfloat16)).float()
    assert ((y.float() - ref).norm() / ref.norm()).item() < 0.06  # e4m3's row-scaled error


def test_streamed_layer_under_autocast_fetches_in_the_autocast_dtype():
    """A streamed layer under autocast computes in the autocast dtype and fetches its weight in it (not float32 first),
    with the input's gradient back in the input's dtype."""
    lin = torch.nn.Linear(64, 48).to(torch.bfloat16)
    off = OffloadedLinear(lin, torch.device("cpu"), fp8=True, on_gpu=False)
    asked = []
    original = off.materialize
    off.materialize = lambda dtype: (asked.append(dtype), original(dtype))[1]
    x = torch.randn(5, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = off(x)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    assert asked == [torch.bfloat16, torch.bfloat16]  # forward and backward


@pytest.mark.parametrize("value, message", [
    (-1, "model.offload_prefetch_gib must be >= 0.0, got -1.0"),
    ("lots", "model.offload_prefetch_gib must be a number, got 'lots'"),
    (100, "model.offload_prefetch_gib must be <= 64.0, got 100.0"),
])
def test_prefetch_setting_refuses_bad_values(value, message):
    from qwen_zero_prior.training.config import Config, ConfigError

    assert Config.from_dict({}).model.offload_prefetch_gib == 2.0
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Config.from_dict({"model": {"offload_prefetch_gib": value}})


def test_apply_offload_refuses_a_negative_ring(tiny_pipe):
    with pytest.raises(ValueError, match=r"prefetch_gib must be >= 0, got -0.5"):
        apply_offload(tiny_pipe, torch.device("cpu"), 1.0, reserve_gib=0, prefetch_gib=-0.5)


@pytest.mark.parametrize("n, s, expected", [
    (60, 15, list(range(2, 60, 4))),  # the 24 GiB shape: every fourth block, neither the first nor the last
    (60, 0, []), (60, 60, list(range(60))), (6, 3, [1, 3, 5]), (5, 2, [1, 3]), (2, 1, [1]),
])
def test_streamed_blocks_are_spread_among_resident_ones(n, s, expected):
    from qwen_zero_prior.training.offload import streamed_block_ids

    ids = streamed_block_ids(n, s)
    assert ids == streamed_block_ids(n, s, "spread") == expected and len(set(ids)) == s
    assert streamed_block_ids(n, s, "tail") == list(range(n - s, n))
    with pytest.raises(ValueError, match=r"layout must be spread or tail, got 'middle'"):
        streamed_block_ids(n, s, "middle")


@pytest.mark.parametrize("layout, expected", [("spread", [1, 3, 5]), ("tail", [3, 4, 5])])
def test_apply_offload_streams_the_blocks_of_its_layout(tiny_pipe, layout, expected):
    """On a six-block transformer with room for three, the layout's three blocks stream and the rest stay resident;
    the summary names them."""
    from qwen_zero_prior.training import tiny
    from qwen_zero_prior.training.offload import block_bytes_fp8

    pipe = tiny_pipe
    pipe.transformer = tiny.tiny_transformer(layers=6).requires_grad_(False)  # frozen, as training has it
    tr = pipe.transformer
    emb = pipe.text_encoder.get_input_embeddings().weight
    budget = (emb.numel() * emb.element_size() + 3.5 * block_bytes_fp8(tr)) / 2**30
    summary = apply_offload(pipe, torch.device("cpu"), budget, reserve_gib=0, layout=layout)
    assert summary["streamed_block_ids"] == expected and summary["resident_blocks"] == 3
    streamed = [i for i, b in enumerate(tr.transformer_blocks)
                if any(isinstance(m, OffloadedLinear) and m.streamed for m in b.modules())]
    assert streamed == expected


def test_streamed_fp8_weight_is_cast_once_and_scaled_on_the_output():
    """A streamed fp8 layer casts its e4m3 weight to the compute dtype in one step and applies the row scale to the
    output (and to dy in the backward), as the resident path does: no float32 copy of the weight is ever made (an
    H200 spent ~0.4 s a step dequantizing streamed weights through float32), and the result is the same product."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    off = OffloadedLinear(lin, torch.device("cpu"), fp8=True, on_gpu=False)
    assert off.streamed and off.stored.dtype == torch.float8_e4m3fn

    class WeightShaped(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and tuple(t.shape) == (48, 64):
                    self.made.append(t.dtype)
            return out

    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    with WeightShaped() as mode:
        y = off(x)
        y.float().square().sum().backward()
    assert mode.made and torch.float32 not in mode.made, mode.made
    w = off.stored.to(torch.float32) * off.scale  # the dequantized weight, for the reference only
    ref = (x.detach().float() @ w.t())
    assert _rel(y.float(), ref) < 0.01
    x2 = x.detach().float().requires_grad_(True)
    (x2 @ w.t()).square().sum().backward()
    assert _rel(x.grad.float(), x2.grad) < 0.02


@pytest.mark.parametrize("room", ["fits", "short", "layer_by_layer"])
def test_text_decoder_auto_placement_by_the_budget(tiny_pipe, room, monkeypatch):
    """apply_offload's text_encoder="auto" for Qwen-Image: the decoder's layers stay plain Linears on the device
    where the budget holds them beside the reserve and a ring that fetches a streamed block as one, else they are
    streamed as loaded (not fp8); also streamed where blocks are fetched layer by layer (QWEN_ZERO_PRIOR_BLOCK_FETCH=0).
    """
    from torch import nn

    from qwen_zero_prior.training import memory
    from qwen_zero_prior.training.offload import BLOCK_FETCH_ENV, block_bytes_fp8

    monkeypatch.setenv(BLOCK_FETCH_ENV, "0" if room == "layer_by_layer" else "1")
    for mod in (tiny_pipe.text_encoder, tiny_pipe.transformer):
        mod.requires_grad_(False)  # frozen, as training's prepare leaves them (offload converts frozen layers only)
    parts, block = memory.weight_parts(tiny_pipe), block_bytes_fp8(tiny_pipe.transformer)
    ring = 1.5 * block  # holds a block
    need = parts.te_layers + parts.te_rest + parts.dit_rest + ring
    budget = need + (-0.25 if room == "short" else 0.25) * block
    assert budget - need + ring < parts.dit_blocks_fp8  # not every block fits beside the decoder: some stream
    summary = apply_offload(tiny_pipe, torch.device("cpu"), budget / 2**30, reserve_gib=0, text_encoder="auto",
                            prefetch_gib=ring / 2**30)
    layers = [m for n, m in tiny_pipe.text_encoder.model.language_model.named_modules() if n.startswith("layers.")
              and isinstance(m, (nn.Linear, OffloadedLinear))]
    if room == "fits":
        assert summary["text_encoder_storage"] == "bf16" and summary["text_encoder"] == 0
        assert layers and all(type(m) is nn.Linear for m in layers)
    else:
        assert summary["text_encoder_storage"] == "stream" and summary["text_encoder"] == len(layers) > 0
        assert all(isinstance(m, OffloadedLinear) and m.streamed and m.stored.dtype != torch.float8_e4m3fn
                   for m in layers)


def test_text_decoder_streamed_in_fp8_trains_and_halves_the_bytes(tiny_pipe, dataset_dir, tmp_path, make_config):
    """model.offload_text_encoder: stream_fp8 keeps the text decoder's layers in fp8 in CPU memory (streamed, half the
    bytes of bf16 per copy), and the token row still gets a gradient through them; the config's choice reaches
    apply_offload through the backend (auto: decided by the budget, test_text_decoder_auto_placement_by_the_budget)."""
    from qwen_zero_prior.training.config import Config, ConfigError

    examples = scan_dataset(dataset_dir, "<zwx>", "a photo of {token}", True)
    trainer = Trainer(make_config(), tiny_pipe, examples, tmp_path)
    backend = trainer.backend
    assert backend.offload_text_encoder_storage() == "auto"  # decided by the budget in apply_offload (below)
    backend.cfg = backend.cfg.replace(model={"offload_text_encoder": "stream_fp8"})
    assert backend.offload_text_encoder_storage() == "stream_fp8"
    with pytest.raises(ConfigError, match=r"model.offload_text_encoder must be one of .*got 'fp4'"):
        Config.from_dict({"model": {"offload_text_encoder": "fp4"}})
    summary = apply_offload(tiny_pipe, torch.device("cpu"), 1.0, reserve_gib=0, text_encoder="stream_fp8")
    assert summary["text_encoder_storage"] == "stream_fp8" and summary["text_encoder"] > 0
    layers = [m for m in tiny_pipe.text_encoder.model.language_model.modules() if isinstance(m, OffloadedLinear)]
    assert layers and all(m.streamed and m.stored.dtype == torch.float8_e4m3fn for m in layers)
    loss = trainer.loss_for([0], torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and float(trainer.token.vector.grad.abs().sum()) > 0


def test_pinned_pack_packs_weights_without_power_of_two_rounding():
    """training/pinned.py: copies land back to back in shared chunks (512-byte aligned, values and dtypes kept, any
    source dtype), so a model's streamed weights take their own bytes plus at most a chunk's tail, where
    pin_memory() would round each one up to a power of two; a weight larger than a chunk gets its own allocation;
    a chunk size that is not a power of two is refused. (pin=False: the same packing in ordinary memory, no CUDA.)"""
    from qwen_zero_prior.training.pinned import PinnedPack

    g = torch.Generator().manual_seed(0)
    # Qwen-Image's block weights scaled down 64x in bytes: 3072x3072 and 3072x12288 e4m3, a bf16 row scale, a bias
    shapes = [((48, 48), torch.float8_e4m3fn), ((192, 48), torch.float8_e4m3fn), ((48, 192), torch.float8_e4m3fn),
              ((48,), torch.bfloat16), ((7,), torch.float32)] * 30
    pack = PinnedPack(chunk_bytes=64 * 1024, pin=False)
    sources, copies = [], []
    for shape, dtype in shapes:
        src = torch.randn(shape, generator=g).to(dtype)
        sources.append(src)
        copies.append(pack.copy(src))
    for src, got in zip(sources, copies):
        assert got.dtype == src.dtype and got.shape == src.shape and got.is_contiguous()
        assert torch.equal(got.view(torch.uint8), src.contiguous().view(torch.uint8))
        assert (got.data_ptr() - got.untyped_storage().data_ptr()) % 512 == 0  # in its chunk
    starts = sorted(c.data_ptr() for c in copies)
    assert len(set(starts)) == len(copies)  # no two share bytes
    used = sum(s.numel() * s.element_size() for s in sources)
    rounded = sum(1 << max(0, (s.numel() * s.element_size() - 1).bit_length()) for s in sources)
    assert pack.used_bytes == used and pack.held_bytes % pack.chunk_bytes == 0
    print(f"PinnedPack: {used} bytes of weights held in {pack.held_bytes} (pin_memory() would take {rounded})")
    assert pack.held_bytes < 0.7 * rounded and pack.held_bytes <= 1.05 * used + pack.chunk_bytes
    sources[0].zero_()  # copies, not views of the sources
    assert copies[0].float().abs().sum() > 0
    big = torch.randn(200, 100, generator=g)  # 80 KB > the 64 KB chunk: its own allocation
    held = pack.held_bytes
    assert torch.equal(pack.copy(big), big) and pack.held_bytes == held + big.numel() * 4
    with pytest.raises(ValueError, match="power of two, got 1000"):
        PinnedPack(chunk_bytes=1000, pin=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA: GPU-only test SKIPPED")
def test_pinned_pack_copies_are_page_locked_on_cuda():
    from qwen_zero_prior.training.pinned import PinnedPack

    pack = PinnedPack(chunk_bytes=1 << 20)
    w = torch.randn(300, 200, device="cuda").to(torch.float8_e4m3fn)
    got = pack.copy(w)
    assert got.is_pinned() and got.device.type == "cpu" and torch.equal(got.float(), w.cpu().float())


@pytest.mark.parametrize("compiled,early_stop", [(True, True), (False, True), (True, False)])
def test_block_fetch_keeps_no_weight_after_the_backward(tiny_pipe, monkeypatch, compiled, early_stop):
    """QWEN_ZERO_PRIOR_BLOCK_FETCH=1: a recomputed streamed block's weights, fetched as one before each run
    (StreamedBlock), live while that run and the backward that needs them do, then are freed: none is alive when the
    next block's are fetched in the backward, none after it, no layer keeps one. Checkpointing's early stop (on, the
    default) ends a recomputation inside the block; the weights are taken back then too. Anything but 0/1 is
    refused, and it is off by default."""
    import weakref

    from qwen_zero_prior.training import offload
    from qwen_zero_prior.training.lora import add_lora
    from qwen_zero_prior.training.offload import BLOCK_FETCH_ENV, StreamedBlock, block_fetch_from_env

    monkeypatch.setenv(BLOCK_FETCH_ENV, "1")
    torch._dynamo.reset()
    pipe = tiny_pipe
    tr = pipe.transformer
    add_lora(tr, 4, 4, ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"],
             seed=0)
    tr.enable_gradient_checkpointing()
    emb = pipe.text_encoder.get_input_embeddings().weight
    apply_offload(pipe, torch.device("cpu"), emb.numel() * emb.element_size() / 2**30 + 1e-6, reserve_gib=0,
                  text_encoder="bf16")  # every block streamed
    blocks = list(tr.transformer_blocks)
    assert all(isinstance(getattr(b, "_zp_streamed_block", None), StreamedBlock) for b in blocks)
    refs, alive_at_fetch = [], []
    plain = StreamedBlock.materialize

    def materialize(self, dtype):
        alive_at_fetch.append(sum(r() is not None for r in refs))
        out = plain(self, dtype)
        refs.extend(weakref.ref(t) for t in out)
        return out

    monkeypatch.setattr(StreamedBlock, "materialize", materialize)
    if compiled:
        for b in blocks:
            b.compile(fullgraph=True, backend="aot_eager")
    layers = [m for m in tr.modules() if isinstance(m, offload.OffloadedLinear) and m.streamed]
    for step in range(2):
        refs.clear()
        alive_at_fetch.clear()
        x = torch.randn(1, 16, tr.config.in_channels)
        ehs = torch.randn(1, 8, tr.config.joint_attention_dim)
        out = tr(hidden_states=x, encoder_hidden_states=ehs,
                 encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.bool), timestep=torch.tensor([0.5]),
                 img_shapes=[(1, 4, 4)], return_dict=False)[0]
        assert all(m.fetched is None for m in layers)
        with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
            out.float().pow(2).mean().backward()
        # two fetches a block (forward, recomputation); no earlier block's weights alive at a fetch
        assert len(alive_at_fetch) == 2 * len(blocks) and alive_at_fetch == [0] * len(alive_at_fetch), alive_at_fetch
        assert len(refs) == len(alive_at_fetch) * len(layers) // len(blocks)
        assert sum(r() is not None for r in refs) == 0 and all(m.fetched is None for m in layers)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in tr.named_parameters() if "lora_B" in n)
    assert not any("fetched" in k for k in tr.state_dict())  # a transient buffer, never saved
    for raw in ("2", "yes"):
        monkeypatch.setenv(BLOCK_FETCH_ENV, raw)
        with pytest.raises(ValueError, match=f"QWEN_ZERO_PRIOR_BLOCK_FETCH='{raw}': expected 1"):
            block_fetch_from_env()
    monkeypatch.setenv(BLOCK_FETCH_ENV, "0")
    assert block_fetch_from_env() is False
    monkeypatch.delenv(BLOCK_FETCH_ENV)
    assert block_fetch_from_env() is True  # on by default since an H200 at 24 GiB measured it (session 22)


def test_a_fetched_weight_follows_the_input_dtype_as_the_per_layer_fetch_does():
    """A layer whose block fetched its weight in one dtype but whose input has another (a float32 layer fed bf16)
    computes in the input's dtype, with the same result as its per-layer fetch (which materializes the weight in the
    input's dtype); the row scale applies as there."""
    lin = torch.nn.Linear(16, 8, bias=True)
    off = OffloadedLinear(lin, torch.device("cpu"), fp8=True, on_gpu=False)
    x = torch.randn(3, 16).to(torch.bfloat16)
    per_layer = off(x)
    assert off.compute_dtype == torch.float32 and per_layer.dtype == torch.bfloat16
    off.fetched = off.stored.to(torch.float32)  # as StreamedBlock.materialize(float32) gives it: unscaled
    try:
        fetched = off(x)
    finally:
        off.fetched = None
    assert fetched.dtype == torch.bfloat16 and torch.equal(fetched, per_layer)


def test_block_fetch_falls_back_to_layers_where_a_block_does_not_fit_the_ring(tiny_pipe, monkeypatch, caplog):
    """A streamed block larger than the prefetcher's ring cannot be copied ahead as one range: its layers are then
    fetched one by one (as with QWEN_ZERO_PRIOR_BLOCK_FETCH=0), with one warning per model naming the sizes, the
    setting and the way back."""
    import logging

    from qwen_zero_prior.training.lora import add_lora
    from qwen_zero_prior.training.offload import BLOCK_FETCH_ENV, StreamedBlock, block_bytes_fp8

    monkeypatch.setenv(BLOCK_FETCH_ENV, "1")
    pipe = tiny_pipe
    tr = pipe.transformer
    add_lora(tr, 4, 4, ["to_q", "to_k", "to_v"], seed=0)
    tr.enable_gradient_checkpointing()
    emb = pipe.text_encoder.get_input_embeddings().weight
    ring = 0.5 * block_bytes_fp8(tr) / 2**30  # half a block
    apply_offload(pipe, torch.device("cpu"), emb.numel() * emb.element_size() / 2**30 + ring, reserve_gib=0,
                  text_encoder="bf16", prefetch_gib=ring)
    assert all(isinstance(b._zp_streamed_block, StreamedBlock) for b in tr.transformer_blocks)
    calls = []
    monkeypatch.setattr(StreamedBlock, "materialize", lambda self, dtype: calls.append(1))
    x = torch.randn(1, 16, tr.config.in_channels)
    ehs = torch.randn(1, 8, tr.config.joint_attention_dim)
    with caplog.at_level(logging.WARNING, logger="qwen_zero_prior.training.offload"):
        for _ in range(2):
            prefetcher_of(tr).begin_step()
            out = tr(hidden_states=x, encoder_hidden_states=ehs,
                     encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.bool), timestep=torch.tensor([0.5]),
                     img_shapes=[(1, 4, 4)], return_dict=False)[0]
            out.float().pow(2).mean().backward()
    assert not calls and prefetcher_of(tr).stats()["hits"] > 0  # the layers' own fetches, from the ring
    warned = [r.getMessage() for r in caplog.records if "do not fit" in r.getMessage()]
    assert len(tr.transformer_blocks) > 1 and len(warned) == 1, warned  # once per model, not per block
    assert "model.offload_prefetch_gib >=" in warned[0] and "QWEN_ZERO_PRIOR_BLOCK_FETCH=0" in warned[0]
