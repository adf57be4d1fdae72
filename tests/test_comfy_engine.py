"""The training node's diffusers engine parts that need no ComfyUI: diffusers' transformer built over another module
tree's tensors (training/shared_dit.py), the per-use cast Linear (training/cast_linear.py), fp8 matmuls straight on
fp8-stored weights, and the engine's eligibility checks (nodes/comfy_engine.py). Inside real ComfyUI (both versions):
tests/test_comfyui.py's *diffusers_engine* tests."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from qwen_zero_prior.training.cast_linear import StoredLinear
from qwen_zero_prior.training.config import ModelConfig
from qwen_zero_prior.training.fp8 import Fp8Linear
from qwen_zero_prior.training.fp8 import added_bytes as fp8_copy_bytes
from qwen_zero_prior.training.shared_dit import SharedDiTError, build_over, centered_rope
from qwen_zero_prior.training.tiny import tiny_transformer

# the module imports no ComfyUI, but its package's __init__ does: load it under its package name without running that
_spec = importlib.util.spec_from_file_location("qwen_zero_prior.nodes.comfy_engine",
                                               Path(__file__).parents[1] / "nodes" / "comfy_engine.py")
_engine = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_engine)
blockers, engine_model_config = _engine.blockers, _engine.engine_model_config
_spec = importlib.util.spec_from_file_location("qwen_zero_prior.nodes.comfy_text",
                                               Path(__file__).parents[1] / "nodes" / "comfy_text.py")
_text = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_text)

CONFIG_KEYS = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim", "num_attention_heads",
               "joint_attention_dim", "axes_dims_rope")


def _source():
    src = tiny_transformer()
    with torch.no_grad():  # norms and biases away from their init, so a mix-up shows
        for p in src.parameters():
            p.add_(torch.randn_like(p, generator=None) * 0.1)
    return src, {k: src.config[k] for k in CONFIG_KEYS}


def _call(model, x, ctx, h, w):
    return model(hidden_states=x, encoder_hidden_states=ctx, timestep=torch.tensor([0.3]),
                 img_shapes=[[(1, h, w)]], return_dict=False)[0]


def test_built_over_shares_every_tensor_and_computes_the_same():
    torch.manual_seed(0)
    src, cfg = _source()
    model = build_over(src, cfg, torch.float32)
    ptrs = {p.data_ptr() for p in src.parameters()}
    assert all(p.data_ptr() in ptrs for p in model.parameters())
    assert sum(isinstance(m, StoredLinear) for m in model.modules()) == sum(
        isinstance(m, nn.Linear) for m in src.modules())
    x, ctx = torch.randn(1, 4 * 6, 64), torch.randn(1, 7, cfg["joint_attention_dim"])
    assert torch.equal(_call(src, x, ctx, 4, 6), _call(model, x, ctx, 4, 6))  # even grid: the same RoPE


def test_centered_rope_takes_comfyuis_positions_on_odd_sides():
    """ComfyUI centres n positions as -(n // 2) .. n - 1 - n // 2; diffusers' QwenEmbedRope as -(n - n // 2) ..
    n // 2 - 1. The engine's RoPE must give ComfyUI's (even sides: both the same)."""
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    axes = [8, 4, 4]
    ours, theirs = centered_rope(10000, axes), QwenEmbedRope(10000, axes, scale_rope=True)

    def table(pos: int, axis: int):  # freqs of one position along one axis, from the module's own tables
        split = [a // 2 for a in axes]
        src = ours.pos_freqs if pos >= 0 else ours.neg_freqs
        row = pos if pos >= 0 else src.shape[0] + pos
        return src[row].split(split)[axis]

    for h, w in ((3, 5), (4, 6), (1, 2)):
        got = ours._compute_video_freqs(1, h, w).view(h, w, -1)
        hs = [p - h // 2 for p in range(h)]
        ws = [p - w // 2 for p in range(w)]
        want = torch.stack([torch.stack([torch.cat([table(0, 0), table(a, 1), table(b, 2)]) for b in ws])
                            for a in hs])
        assert torch.equal(got, want), (h, w)
        if h % 2 == 0 and w % 2 == 0:
            assert torch.equal(got.view(h * w, -1), theirs._compute_video_freqs(1, h, w))


def test_built_over_refuses_what_does_not_fit():
    src, cfg = _source()
    src.transformer_blocks[0].extra = nn.Linear(2, 2)  # a parameter diffusers has no place for
    with pytest.raises(SharedDiTError, match=r"transformer_blocks\.0\.extra\.weight"):
        build_over(src, cfg, torch.float32)
    src, cfg = _source()
    with pytest.raises(SharedDiTError, match=r"linear_1: diffusers expects a Linear 16x256, the source has Linear with "
                                             r"weight \(32, 256\)"):
        build_over(src, {**cfg, "in_channels": 64, "num_attention_heads": 1}, torch.float32)


def test_fp8_stored_source_computes_in_the_compute_dtype_without_keeping_casts():
    src, cfg = _source()
    for m in src.modules():
        if isinstance(m, nn.Linear):
            m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
    model = build_over(src, cfg, torch.float32)
    lin = model.transformer_blocks[0].attn.to_q
    assert lin.weight.dtype == torch.float8_e4m3fn and lin.weight is src.transformer_blocks[0].attn.to_q.weight
    x = torch.randn(5, lin.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lin(x)
    ref_w = lin.weight.float()
    assert torch.allclose(y, x @ ref_w.t() + lin.bias.float(), atol=1e-5)
    assert all(t.dtype != torch.float32 or t.shape != ref_w.shape for t in saved)  # no float32 copy of the weight
    y.square().sum().backward()
    assert torch.allclose(x.grad, (2 * y.detach()) @ ref_w, atol=1e-4)


def test_stored_linear_first_used_inside_torch_compile():
    """Its op registers outside the compiled region: a fresh process whose first use is compiled (the engine's
    blocks under compile) traced the registration and failed on the GPU ('infer_schema ... marked as skipped')."""
    pytest.importorskip("torch._inductor", reason="torch without inductor: compiled StoredLinear test SKIPPED")
    code = textwrap.dedent("""
        import torch
        from qwen_zero_prior.training.cast_linear import StoredLinear
        lin = StoredLinear(torch.randn(8, 4).to(torch.float8_e4m3fn), torch.zeros(8), torch.float32)
        x = torch.randn(3, 4, requires_grad=True)
        torch.compile(lin, fullgraph=True, backend="aot_eager")(x).sum().backward()
        print("grad", float(x.grad.abs().sum()) > 0)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "grad True" in out.stdout, out.stderr[-3000:]


def test_fp8_matmul_on_fp8_stored_weight_shares_it():
    w = (torch.randn(32, 16) * 0.1).to(torch.float8_e4m3fn)
    base = StoredLinear(w, torch.randn(32), torch.float32)
    fp8 = Fp8Linear(base)
    assert fp8.w_q is w or fp8.w_q.data_ptr() == w.data_ptr()  # no second rounding, no copy
    assert torch.equal(fp8.w_scale, torch.ones(32)) and fp8.compute_dtype == torch.float32
    assert fp8.bias.dtype == torch.float32
    x = torch.randn(4, 16)
    ref = base(x)
    assert float((fp8(x) - ref).abs().max()) <= 0.07 * float(ref.abs().max())  # x is quantized to e4m3 per row
    with pytest.raises(RuntimeError, match="compute_dtype"):
        Fp8Linear(nn.Linear(16, 32).to(torch.float8_e4m3fn))


def _fake_model(options=None, **module_attrs):
    dm = nn.Module()
    dm.lin = nn.Linear(4, 4)
    for k, v in module_attrs.items():
        setattr(dm.lin, k, v)
    mp = types.SimpleNamespace(model_options={"transformer_options": options or {}})
    return mp, dm


def test_engine_blockers_name_what_diffusers_would_not_compute():
    cpu = torch.device("cpu")
    assert blockers(*_fake_model(), cpu) == []
    assert blockers(*_fake_model({"wrappers": {}, "patches": {}}), cpu) == []  # empty containers are nothing
    (why,) = blockers(*_fake_model({"patches_replace": {"dit": {("double_block", 0): print}}}), cpu)
    assert "patches_replace" in why and "would skip" in why
    (why,) = blockers(*_fake_model(weight_function=[print]), cpu)
    assert "lin applies weight patches per use" in why
    (why,) = blockers(*_fake_model(scale_weight=nn.Parameter(torch.ones(()))), cpu)
    assert "lin is in a scaled fp8 format" in why
    mp, dm = _fake_model()
    mp.model_options["model_function_wrapper"] = print
    (why,) = blockers(mp, dm, cpu)
    assert "model_function_wrapper" in why
    mp, dm = _fake_model()
    mp.object_patches = {"diffusion_model.transformer_blocks.0": nn.Identity(), "other": 1}
    (why,) = blockers(mp, dm, cpu)
    assert "object patches on its DiT (diffusion_model.transformer_blocks.0)" in why
    mp, dm = _fake_model()
    dm.register_buffer("__index_timestep_zero__", torch.tensor([]))
    (why,) = blockers(mp, dm, cpu)
    assert "not text-to-image" in why
    mp, dm = _fake_model()
    dm.lin.weight = nn.Parameter(torch.empty(4, 4, device="meta"))
    (why,) = blockers(mp, dm, cpu)
    assert "lin is on meta" in why
    assert blockers(mp, dm, cpu, offload=True) == []  # the offloaded engine copies weights from wherever they are
    # the graph's MODEL before a copy is made: its patches count, its weights are not looked at
    assert blockers(*_fake_model(scale_weight=nn.Parameter(torch.ones(()))), cpu, scan_weights=False) == []
    (why,) = blockers(*_fake_model({"patches_replace": {"dit": {("double_block", 0): print}}}), cpu,
                      scan_weights=False)
    assert "patches_replace" in why


def test_rebind_points_at_the_sources_new_tensors():
    """After the source's parameter objects were replaced (ComfyUI reloading its DiT), every shared Linear and norm
    uses the new ones."""
    from qwen_zero_prior.training.shared_dit import rebind

    src, cfg = _source()
    model = build_over(src, cfg, torch.float32)
    assert rebind(model, src) == 0
    for mod in src.modules():
        for pname, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[pname] = nn.Parameter(p.detach().clone() * 2, requires_grad=False)
    assert rebind(model, src) == sum(1 for m in src.modules() if m._parameters and any(
        p is not None for p in m._parameters.values()))
    ptrs = {p.data_ptr() for p in src.parameters()}
    assert all(p.data_ptr() in ptrs for p in model.parameters())
    x, ctx = torch.randn(1, 16, 64), torch.randn(1, 5, cfg["joint_attention_dim"])
    assert torch.equal(_call(src, x, ctx, 4, 4), _call(model, x, ctx, 4, 4))


def test_fp8_matmul_from_e5m2_weights():
    """UNETLoader's fp8_e5m2 storage: quantized to e4m3 per row through float32 (e5m2 has no abs/amax kernels)."""
    w = (torch.randn(8, 16) * 0.1).to(torch.float8_e5m2)
    fp8 = Fp8Linear(StoredLinear(w, None, torch.float32))
    assert fp8.w_q.dtype == torch.float8_e4m3fn
    assert float((fp8.weight - w.float()).abs().max()) <= 0.07 * float(w.float().abs().max())


def test_engine_model_config_without_triton(monkeypatch):
    monkeypatch.setattr(_engine, "_has_triton", lambda: False)
    m = engine_model_config(ModelConfig(compile=True), torch.device("cuda"), recompute=False)
    assert (m.compile, m.compile_mode, m.attention_backend) == (False, None, "_native_cudnn")


def test_engine_model_config(monkeypatch):
    monkeypatch.setattr(_engine, "_has_triton", lambda: True)  # as on a GPU machine
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    m = engine_model_config(ModelConfig(compile=True), cuda, recompute=False)
    assert (m.attention_backend, m.compile_mode) == ("_native_cudnn", "reduce-overhead")
    m = engine_model_config(ModelConfig(compile=True), cuda, recompute=True)  # graphs and recomputation do not mix
    assert (m.attention_backend, m.compile_mode) == ("_native_cudnn", None)
    m = engine_model_config(ModelConfig(compile=True, attention_backend="flash"), cpu, recompute=False)
    assert (m.attention_backend, m.compile_mode) == ("flash", None)
    # max-autotune captures CUDA graphs too: kept where blocks run once, without graphs where they are recomputed
    tuned = ModelConfig(compile=True, compile_mode="max-autotune")
    assert engine_model_config(tuned, cuda, recompute=False).compile_mode == "max-autotune"
    assert engine_model_config(tuned, cuda, recompute=True).compile_mode == "max-autotune-no-cudagraphs"


def test_engine_model_config_under_comfyui_default_allocator(monkeypatch, caplog):
    """ComfyUI's default cudaMallocAsync allocator: no torch.compile reduce-overhead graphs (their trees need allocator
    features it lacks); by default and with QWEN_ZERO_PRIOR_ASYNC_GRAPHS=1 or dit the engine captures its own
    whole-step graphs instead; with text (the text encoder's graphs only) it says once that the DiT has none and the
    way out; the native allocator keeps reduce-overhead."""
    monkeypatch.setattr(_engine, "_has_triton", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    assert _engine.graphs_blocked(cuda) is None
    assert engine_model_config(ModelConfig(compile=True), cuda, recompute=False).compile_mode == "reduce-overhead"
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "cudaMallocAsync")
    assert "--disable-cuda-malloc" in _engine.graphs_blocked(cuda)
    assert _engine.graphs_blocked(torch.device("cpu")) is None
    # with QWEN_ZERO_PRIOR_ASYNC_GRAPHS=dit the engine captures the DiT's whole forward and backward itself
    # (training/graphs.py) and says so when it does; torch.compile's reduce-overhead mode is dropped either way (its
    # graph trees cannot run under this allocator); by default (text) and with 0 the engine makes none
    monkeypatch.setenv("QWEN_ZERO_PRIOR_ASYNC_GRAPHS", "dit")
    with caplog.at_level(logging.INFO):
        m = engine_model_config(ModelConfig(compile=True), cuda, recompute=False)
        m2 = engine_model_config(ModelConfig(compile=True, compile_mode="reduce-overhead"), cuda, recompute=False)
    m3 = engine_model_config(ModelConfig(compile=True, compile_mode="max-autotune"), cuda, recompute=False)
    assert (m.compile, m.compile_mode, m2.compile_mode) == (True, None, None)
    assert m3.compile_mode == "max-autotune-no-cudagraphs"  # its graph trees cannot run here either
    assert "no CUDA graphs for the DiT" not in caplog.text
    made = types.SimpleNamespace(make_graphs=lambda: "graphs")
    cuda0 = torch.device("cuda", 0)
    with caplog.at_level(logging.INFO):
        assert _engine.DiffusersEngine._whole_graphs(made, cuda0) == "graphs"
    assert "captured whole as CUDA graphs" in caplog.text
    monkeypatch.setenv("QWEN_ZERO_PRIOR_ASYNC_GRAPHS", "1")  # both parts: the DiT's too
    assert _engine.DiffusersEngine._whole_graphs(made, cuda0) == "graphs"
    for raw in ("text", "0"):
        monkeypatch.setenv("QWEN_ZERO_PRIOR_ASYNC_GRAPHS", raw)
        assert _engine.DiffusersEngine._whole_graphs(made, cuda0) is None, raw
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")  # trees instead
    monkeypatch.setenv("QWEN_ZERO_PRIOR_ASYNC_GRAPHS", "dit")
    assert _engine.DiffusersEngine._whole_graphs(made, cuda0) is None
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "cudaMallocAsync")
    caplog.clear()
    monkeypatch.delenv("QWEN_ZERO_PRIOR_ASYNC_GRAPHS")  # the default: both parts, the DiT's too
    assert _engine.DiffusersEngine._whole_graphs(made, cuda0) == "graphs"
    monkeypatch.setenv("QWEN_ZERO_PRIOR_ASYNC_GRAPHS", "text")  # the text encoder's only: none for the DiT
    with caplog.at_level(logging.WARNING):
        m = engine_model_config(ModelConfig(compile=True), cuda, recompute=False)
    assert (m.compile, m.compile_mode) == (True, None)
    assert "no CUDA graphs for the DiT" in caplog.text and "--disable-cuda-malloc" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # recomputed blocks never take graphs: nothing to say about the allocator
        assert engine_model_config(ModelConfig(compile=True), cuda, recompute=True).compile_mode is None
    assert "no CUDA graphs" not in caplog.text
    # the training node's result names the way out only where the allocator kept graphs out of the engine's run:
    # not without compile, not where blocks are recomputed (24 GiB: ComfyUI's forward, no engine), not on a CPU
    built = types.SimpleNamespace(compiled=True, recompute=False, reduce_overhead=False, graphs=None)
    tip = _engine.speed_tip(built, cuda)
    assert "--disable-cuda-malloc" in tip and "Native CUDA allocator" in tip and "QWEN_ZERO_PRIOR_ASYNC_GRAPHS" in tip
    assert _engine.speed_tip(None, cuda) is None and _engine.speed_tip(built, torch.device("cpu")) is None
    # nothing to say where the engine captured its own graphs
    for other in ({"compiled": False}, {"recompute": True}, {"reduce_overhead": True}, {"graphs": object()}):
        assert _engine.speed_tip(types.SimpleNamespace(**{**vars(built), **other}), cuda) is None, other
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    assert _engine.speed_tip(built, cuda) is None


def test_exact_text_choice():
    """QWEN_ZERO_PRIOR_EXACT_TEXT: auto takes bf16 copies where they fit beside the engine's need, else e4m3, else
    none; only with the engine on a GPU; on a CPU only when asked; a bad value is an error naming the values."""
    gib = 2**30
    needs = {"bf16": 12 * gib, "e4m3": 6 * gib}

    def choose(value, device="cuda", reserve=42 * gib, available=20 * gib):
        return _text.exact_text_choice(value, device_type=device, engine_reserve=reserve,
                                       available=available if device == "cuda" else None, needs=needs)

    assert choose("") == ("bf16", None) and choose("auto") == ("bf16", None) and choose("1") == ("bf16", None)
    assert choose("", available=8 * gib) == ("e4m3", None)  # bf16 does not fit, e4m3 does
    choice, why = choose("", available=5 * gib)
    assert choice is None and "need 6.0 GiB, 5.0 GiB available" in why
    assert choose("bf16", available=8 * gib)[0] is None  # a named storage is not swapped for another
    assert choose("e4m3") == ("e4m3", None)
    choice, why = choose("", reserve=None)  # ComfyUI's forward (streamed, recomputed): its plan fills the card
    assert choice is None and "diffusers DiT engine only" in why
    assert choose("1", reserve=None)[0] is None
    choice, why = choose("", device="cpu")
    assert choice is None and "GPU only" in why
    assert choose("1", device="cpu") == ("bf16", None) and choose("e4m3", device="cpu") == ("e4m3", None)
    assert choose("0")[0] is None and choose(" No ")[0] is None
    with pytest.raises(ValueError, match=r"QWEN_ZERO_PRIOR_EXACT_TEXT='maybe' is not auto, 1/true/yes, bf16, e4m3"):
        choose("maybe")


def test_exact_text_choice_offloaded():
    """With the offloaded engine (a 24 GB card) the copies are streamed from CPU memory, so memory plays no part:
    e4m3 (the fewest bytes to copy) unless bf16 is named; auto on a GPU only; 0 keeps ComfyUI's projections."""
    def choose(value, device="cuda"):
        return _text.exact_text_choice(value, device_type=device, engine_reserve=None, available=None, needs={},
                                       offloaded=True)

    assert choose("") == ("e4m3", None) and choose("auto") == ("e4m3", None) and choose("yes") == ("e4m3", None)
    assert choose("bf16") == ("bf16", None) and choose("e4m3") == ("e4m3", None)
    choice, why = choose("", device="cpu")
    assert choice is None and "GPU only" in why
    assert choose("1", device="cpu") == ("e4m3", None)
    assert choose("0")[0] is None and choose("false", device="cpu")[0] is None
    with pytest.raises(ValueError, match=r"QWEN_ZERO_PRIOR_EXACT_TEXT='stream' is not auto"):
        choose("stream")


def test_streamed_exact_linear_matches_exact_linear_through_a_prefetcher():
    """training/exact_linear.py StreamedExactLinear: its own copy of the weight in CPU memory, fetched for the forward
    and again for the backward (never saved), through a WeightPrefetcher ring or at use: bit for bit what ExactLinear
    computes with the same weight, over several steps, and the second step's fetches come from copies made ahead."""
    from qwen_zero_prior.training.exact_linear import ExactLinear, StreamedExactLinear
    from qwen_zero_prior.training.prefetch import WeightPrefetcher

    g = torch.Generator().manual_seed(0)
    layers = []
    for out_f in (32, 48, 32):
        w = (torch.randn(out_f, 64 if not layers else layers[-1][0].weight.shape[0], generator=g) * 0.05)
        layers.append((ExactLinear(w.to(torch.float8_e4m3fn), torch.randn(out_f, generator=g), torch.tensor(0.37)),))
    streamed = [StreamedExactLinear.from_exact(e, "cpu") for (e,) in layers]
    for (e,), s in zip(layers, streamed):
        assert s.stored.dtype == torch.float8_e4m3fn and torch.equal(s.stored.float(), e.weight.float())
        assert s.stored.data_ptr() != e.weight.data_ptr()  # a copy: the source may be freed or changed
    ring = WeightPrefetcher(torch.device("cpu"), 64 * 1024)
    for s in streamed[:2]:  # the last one is copied at use, without a ring
        s.prefetcher = ring

    def run(mods, x):
        x = x.clone().requires_grad_(True)
        h = x
        for m in mods:
            h = torch.tanh(m(h))
        h.square().sum().backward()
        return h.detach(), x.grad

    for step in range(3):
        ring.begin_step()
        x = torch.randn(2, 5, 64, generator=g)
        ref, ref_grad = run([e for (e,) in layers], x)
        got, got_grad = run(streamed, x)
        assert torch.equal(got, ref) and torch.equal(got_grad, ref_grad), step
    assert ring.hits > 0 and ring.stats()["layers_per_step"] == 4  # two layers, forward and backward
    with pytest.raises(TypeError, match="bf16 or float8_e4m3fn weight, got torch.float32"):
        StreamedExactLinear(torch.zeros(2, 2), "cpu")


def test_fp8_copy_bytes_counts_only_weights_not_already_in_e4m3():
    """What the engine's memory check adds for fp8_matmul: a bf16/fp32-stored DiT gets e4m3 copies of its image-stream
    block weights (1 byte a weight + 4 a row); an fp8-stored one's are used as they are (0)."""
    dm = tiny_transformer()
    per_block = [dm.transformer_blocks[0].get_submodule(n).weight for n in
                 ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.net.0.proj", "img_mlp.net.2")]
    want = len(dm.transformer_blocks) * sum(w.numel() + 4 * w.shape[0] for w in per_block)
    assert fp8_copy_bytes(dm) == want > 0
    for m in dm.modules():
        if isinstance(m, nn.Linear):
            m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
    assert fp8_copy_bytes(dm) == 0


def test_exact_linear_is_float32_arithmetic_from_bf16_parts():
    """training/exact_linear.py: a float32 activation is exactly the sum of its three bf16 parts, and the products
    with an exactly-bf16 weight (and an input scale, as ComfyUI's scaled fp8) equal float32 arithmetic to rounding,
    forward and input gradient; a weight not in bf16 is refused."""
    from qwen_zero_prior.training.exact_linear import ExactLinear, split_bf16

    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 64, generator=g) * torch.logspace(-3, 3, 64)
    parts = split_bf16(a)
    assert parts.dtype == torch.bfloat16 and parts.shape == (15, 64)
    assert torch.equal(parts.float().view(3, 5, 64).sum(0), a)  # exact
    w = (torch.randn(32, 64, generator=g) * 0.05).to(torch.float8_e4m3fn).to(torch.bfloat16)
    bias, scale = torch.randn(32, generator=g), torch.tensor(0.37)
    lin = ExactLinear(w, bias, scale)
    x = torch.randn(2, 3, 64, generator=g, dtype=torch.float64).float().requires_grad_(True)
    y = lin(x)
    x64 = x.detach().double().requires_grad_(True)
    ref = (x64 * scale.double()) @ w.double().t() + bias.double()
    assert y.dtype == torch.float32 and y.shape == (2, 3, 32)
    assert float((y.detach().double() - ref.detach()).abs().max()) <= 1e-6 * float(ref.detach().abs().max())
    y.square().sum().backward()
    ref.square().sum().backward()
    assert float((x.grad.double() - x64.grad).abs().max()) <= 1e-5 * float(x64.grad.abs().max())
    # kept as its e4m3 data (half the memory) and cast for each use: the same numbers, forward and backward
    lin8 = ExactLinear(w.to(torch.float8_e4m3fn), bias, scale)
    assert lin8.weight.dtype == torch.float8_e4m3fn
    x8 = x.detach().clone().requires_grad_(True)
    y8 = lin8(x8)
    assert torch.equal(y8.detach(), y.detach())
    y8.square().sum().backward()
    assert torch.equal(x8.grad, x.grad)
    with pytest.raises(TypeError, match="bf16 or float8_e4m3fn weight, got torch.float32"):
        ExactLinear(w.float())


def _lora_over(src, cfg, b_seed: int = 3):
    """diffusers' transformer over ``src`` with a LoRA on the attention and its B drawn (not zero: the branch counts)."""
    from qwen_zero_prior.training.lora import add_lora

    model = build_over(src, cfg, torch.float32)
    model.enable_gradient_checkpointing()
    add_lora(model, 4, 4.0, ["to_q", "add_k_proj", "img_mlp.net.2"], seed=0)
    g = torch.Generator().manual_seed(b_seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()
    return model


def _loss_and_grads(model, x, ctx):
    out = _call(model, x, ctx, 4, 6)
    loss = out.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("stored", ["fp8_e4m3fn", "float32"])
def test_offloaded_engine_transformer_computes_what_the_shared_one_does(stored):
    """The training node's offloaded engine (a 24 GB card: ``offload_transformer`` over the transformer built on
    ComfyUI's tensors): one block resident, one streamed through the prefetcher's ring. Over an fp8 file's weights
    it keeps them as they are and computes what the shared transformer computes (loss and LoRA gradients); over
    float32 weights it stores row-scaled e4m3 (within e4m3's rounding). Its other parameters are its own."""
    from qwen_zero_prior.training.offload import OffloadedLinear, offload_transformer, prefetcher_of

    torch.manual_seed(0)
    src, cfg = _source()
    if stored == "fp8_e4m3fn":
        for m in src.modules():
            if isinstance(m, nn.Linear):
                m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
    shared, offloaded = _lora_over(src, cfg), _lora_over(src, cfg)
    summary = offload_transformer(offloaded, torch.device("cpu"), float("inf"), prefetch_gib=0.01, resident=1)
    assert (summary["resident_blocks"], summary["streamed_blocks"]) == (1, 1), summary
    layers = [m for m in offloaded.modules() if isinstance(m, OffloadedLinear)]
    per_block = sum(isinstance(m, nn.Linear) for m in src.transformer_blocks[0].modules())
    assert len(layers) == 2 * per_block and sum(m.streamed for m in layers) == per_block
    assert all(m.stored.dtype == torch.float8_e4m3fn for m in layers)
    assert all((m.scale is None) == (stored == "fp8_e4m3fn") for m in layers)  # an fp8 file's weights as they are
    assert prefetcher_of(offloaded) is not None
    # embeddings, norms, the input and output layers: copies, not the source's tensors (on a CPU nothing moves, so
    # they stay shared, as module.to would leave them; on a GPU _copy_rest_to replaces them, checked below)
    x, ctx = torch.randn(1, 4 * 6, 64), torch.randn(1, 7, cfg["joint_attention_dim"])
    for step in range(2):  # the prefetcher's second step copies ahead in the first one's order
        prefetcher_of(offloaded).begin_step()
        ref_loss, ref_grads = _loss_and_grads(shared, x, ctx)
        loss, grads = _loss_and_grads(offloaded, x, ctx)
        assert sorted(grads) == sorted(ref_grads) and len(grads) == 12
        tol = 1e-5 if stored == "fp8_e4m3fn" else 0.1
        assert abs(float(loss - ref_loss)) <= tol * float(ref_loss), (step, float(loss), float(ref_loss))
        for n, g in grads.items():
            err = float((g - ref_grads[n]).norm() / ref_grads[n].norm().clamp(min=1e-12))
            assert err <= (1e-4 if stored == "fp8_e4m3fn" else 0.2), (step, n, err)
        for m in (shared, offloaded):
            m.zero_grad()
    assert prefetcher_of(offloaded).stats()["hits"] > 0


def test_offloaded_engine_copies_the_rest_instead_of_moving_the_sources_tensors():
    """``_copy_rest_to`` puts copies where ``module.to`` would rewrite the shared ``Parameter`` in place (ComfyUI's
    module would then find its weight moved). A meta device stands in for the GPU."""
    from qwen_zero_prior.training.offload import _copy_rest_to

    src, cfg = _source()
    model = build_over(src, cfg, torch.float32)
    before = {n: p for n, p in src.named_parameters()}
    copied = _copy_rest_to(model, torch.device("meta"))
    assert copied == sum(p.numel() * p.element_size() for p in src.parameters())
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(p is before[n] and p.device.type == "cpu" for n, p in src.named_parameters())


def test_offload_transformer_refuses_bad_counts():
    from qwen_zero_prior.training.offload import offload_transformer

    src, cfg = _source()
    with pytest.raises(ValueError, match=r"resident must be between 0 and 2 .* got 3"):
        offload_transformer(build_over(src, cfg, torch.float32), torch.device("cpu"), 0, resident=3)
    with pytest.raises(ValueError, match=r"prefetch_gib must be >= 0, got -1"):
        offload_transformer(build_over(src, cfg, torch.float32), torch.device("cpu"), 0, prefetch_gib=-1)


def test_previews_are_skipped_only_with_the_offloaded_engine_on_a_gpu():
    """The offloaded engine's previews would load ComfyUI's own DiT copy beside the engine's blocks (out of memory on
    a 24 GB card, seen on an H200 at 23.5 GiB): skipped there with a reason naming the way to silence it; kept for
    every other engine and on a CPU (where the tests render them)."""
    why = _engine.previews_blocked(True, "cuda")
    assert why and "offloaded DiT engine" in why and "preview_every to 0" in why
    assert _engine.previews_blocked(False, "cuda") is None and _engine.previews_blocked(True, "cpu") is None


def test_oom_hint_names_the_resident_blocks_and_the_way_out():
    """An out-of-memory error of the offloaded engine's step gets a line saying how to keep fewer blocks on the GPU;
    the other engines' errors are left as they are."""
    hint = _engine.oom_hint(types.SimpleNamespace(offload_summary={"resident_blocks": 22, "blocks": 60}))
    assert "kept 22 of 60 blocks" in hint and "QWEN_ZERO_PRIOR_RESIDENT_BLOCKS=18" in hint, hint
    assert _engine.oom_hint(types.SimpleNamespace(offload_summary={"resident_blocks": 2, "blocks": 60})).count("=0 ")
    none_left = _engine.oom_hint(types.SimpleNamespace(offload_summary={"resident_blocks": 0, "blocks": 60}))
    assert "QWEN_ZERO_PRIOR_RESIDENT_BLOCKS" not in none_left and "lower resolution" in none_left
    assert _engine.oom_hint(types.SimpleNamespace(offload_summary=None)) is None
    assert _engine.oom_hint(None) is None


@pytest.mark.parametrize("raw", ["-1", "two", "1.5"])
def test_resident_blocks_setting_refuses_garbage(raw):
    with pytest.raises(ValueError, match=rf"QWEN_ZERO_PRIOR_RESIDENT_BLOCKS='{raw}': expected a whole number"):
        _engine.resident_blocks(raw)
    assert _engine.resident_blocks("") is None and _engine.resident_blocks(" 12 ") == 12


def test_offload_transformer_without_device_memory_to_plan_keeps_every_block():
    """No budget to plan for (a CPU: an infinite one) and no count given: every block resident, none streamed."""
    from qwen_zero_prior.training.offload import offload_transformer

    src, cfg = _source()
    summary = offload_transformer(build_over(src, cfg, torch.float32), torch.device("cpu"), float("inf"),
                                  prefetch_gib=1.0)
    assert (summary["resident_blocks"], summary["streamed_blocks"], summary["prefetch_gib"]) == (2, 0, 0.0), summary


def test_engine_gives_back_the_process_wide_patches_it_installed():
    """The engine's ``close`` (and a failed build) gives back what ``accelerate_transformer`` installed process-wide,
    diffusers' RoPE routing and inductor's wider persistent reductions, and leaves what was there before it."""
    pytest.importorskip("torch._inductor", reason="torch without inductor: SKIPPED")
    from qwen_zero_prior.training import reductions, rope

    engine = object.__new__(_engine.DiffusersEngine)
    try:
        for was in (False, True):
            engine._rope_was_installed = engine._reductions_were_installed = was
            rope.install()
            reductions.install()
            engine._restore_process_patches()
            assert (rope.installed(), reductions.installed()) == ((True, 4096) if was else (False, 0))
    finally:
        rope.uninstall()
        reductions.uninstall()
