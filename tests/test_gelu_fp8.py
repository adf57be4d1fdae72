"""training/gelu_fp8.py: the image-stream MLP with its GELU and fp8 quantizations as custom operators."""

import copy

import pytest
import torch
from qwen_zero_prior.training import fp8, gelu, gelu_fp8
from qwen_zero_prior.training.config import ATTENTION_TARGETS, MLP_TARGETS
from qwen_zero_prior.training.fp8 import FP8, apply_fp8_matmul, quantize_rows
from qwen_zero_prior.training.lora import add_lora
from transformer_step import tiny_transformer_step


def _fp8_transformer(pipe, targets=ATTENTION_TARGETS, backward_copy=True):
    tr = pipe.transformer.to(torch.bfloat16)
    add_lora(tr, rank=4, alpha=4, targets=list(targets), seed=0)
    for p in tr.parameters():
        if p.requires_grad:  # LoRA B starts at zero: random, so every LoRA weight gets a gradient
            torch.nn.init.normal_(p, std=0.05)
    apply_fp8_matmul(tr, backward_copy=backward_copy, compute_dtype=torch.bfloat16)
    gelu.install(tr)  # what model.compile runs, and what the fused forward computes
    return tr


def test_fused_mlp_gives_the_fp8_blocks_numbers(tiny_pipe, monkeypatch):
    """Routed through the fused MLP, the transformer's output, the text input's gradient and every LoRA weight's
    gradient are the unfused fp8 path's, exactly (on the CPU the operators run the same PyTorch code), where that
    path adds the layers' bias after their product, as the fused MLP does (``fp8.BIAS_IN_PRODUCT`` off: on, the
    bias is added before the product's bf16 rounding, one rounding apart); uninstall gives the blocks back their
    own forward."""
    monkeypatch.setattr(fp8, "BIAS_IN_PRODUCT", False)
    tr = _fp8_transformer(tiny_pipe)
    want = tiny_transformer_step(tr)
    n = gelu_fp8.install(tr)
    assert n == len(tr.transformer_blocks) > 0
    calls = []
    real = gelu_fp8.gelu_quant_rows

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    try:
        gelu_fp8.gelu_quant_rows = spy  # module global the forward looks up: proves the fused path ran
        got = tiny_transformer_step(tr)
    finally:
        gelu_fp8.gelu_quant_rows = real
    assert len(calls) == n
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[2].keys() == want[2].keys() and got[2]
    for name in want[2]:
        assert torch.equal(got[2][name], want[2][name]), name
    assert gelu_fp8.uninstall(tr) == n and gelu_fp8.uninstall(tr) == 0
    assert all("forward" not in b.img_mlp.__dict__ for b in tr.transformer_blocks)


def test_fused_mlp_pads_rows_to_sixteen_and_crops_them(tiny_pipe, monkeypatch):
    """An MLP input whose row count is not a multiple of 16 (``_scaled_mm``'s rule) gives the unfused numbers for
    its own rows (the bias added after the product there too), and its gradient has its shape."""
    monkeypatch.setattr(fp8, "BIAS_IN_PRODUCT", False)
    tr = _fp8_transformer(tiny_pipe)
    mlp = tr.transformer_blocks[0].img_mlp
    x = torch.randn(1, 13, mlp.net[0].proj.in_features).to(torch.bfloat16).requires_grad_(True)
    want = mlp(x)
    want.float().sum().backward()
    want_grad, x.grad = x.grad.clone(), None
    gelu_fp8.install(tr)
    got = mlp(x)
    got.float().sum().backward()
    assert got.shape == want.shape and torch.equal(got, want) and torch.equal(x.grad, want_grad)


@pytest.mark.parametrize("case", ["lora on the mlp", "no backward copies", "float32"])
def test_fused_mlp_only_where_it_computes_the_same(tiny_pipe, case):
    """An MLP with a LoRA on its layers, without fp8 backward copies, or computing in float32 keeps its own forward."""
    if case == "float32":
        tr = tiny_pipe.transformer
        add_lora(tr, rank=4, alpha=4, targets=list(ATTENTION_TARGETS), seed=0)
        apply_fp8_matmul(tr, backward_copy=True)
    else:
        tr = _fp8_transformer(tiny_pipe, targets=ATTENTION_TARGETS + MLP_TARGETS if case == "lora on the mlp"
                              else ATTENTION_TARGETS, backward_copy=case != "no backward copies")
    assert gelu_fp8.install(tr) == 0


def test_gelu_operators_quantize_what_the_reference_does():
    """The operators (reference PyTorch code off CUDA) against their definitions: the forward is the GELU of
    ``h + b`` quantized per row; the backward is autograd's gradient of it, quantized; shapes and dtypes of the fake
    (meta) forms are the real ones'."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(32, 96, generator=g) * 2).to(torch.bfloat16)
    b = (torch.randn(96, generator=g) * 0.1).to(torch.bfloat16)
    dg = (torch.randn(32, 96, generator=g) * 1e-3).to(torch.bfloat16)
    q, s = gelu_fp8.gelu_quant_rows(h, b)
    x = (h + b).float()
    want = (0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))).to(torch.bfloat16)
    assert q.dtype == FP8 and s.shape == (32, 1)
    torch.testing.assert_close(q.float() * s, want.float(), rtol=2 ** -3, atol=s.max().item() * 2 ** -9)
    dq, ds = gelu_fp8.gelu_backward_quant_rows(dg, h, b)
    xr = (h + b).float().requires_grad_(True)
    (dx,) = torch.autograd.grad(torch.nn.functional.gelu(xr, approximate="tanh"), xr, dg.float())
    torch.testing.assert_close(dq.float() * ds, dx, rtol=2 ** -3, atol=ds.max().item() * 2 ** -9)
    with torch.device("meta"):
        fq, fs = gelu_fp8.gelu_quant_rows(h.to("meta"), b.to("meta"))
    assert fq.shape == q.shape and fq.dtype == FP8 and fs.shape == s.shape and fs.dtype == torch.float32
    assert quantize_rows(h)[0].shape == q.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: the Triton kernels against the reference")
@pytest.mark.parametrize("width", [12288, 768, 1000])  # three power-of-two pieces, and widths that are not
def test_triton_kernels_match_the_reference_on_the_gpu(width, monkeypatch):
    """Both kernel forms (three pieces where the width allows it, the default; one padded row) give the reference's
    fp8 codes within one e4m3 step and its scales; where the pieces run, their codes and scales are the padded
    row's exactly (the same arithmetic per element, an order-free maximum)."""
    pytest.importorskip("triton")
    from bench.gelu_quant import compare
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(256, width, generator=g) * 2).to("cuda", torch.bfloat16)
    b = (torch.randn(width, generator=g) * 0.1).to("cuda", torch.bfloat16)
    dg = (torch.randn(256, width, generator=g) * 1e-3).to("cuda", torch.bfloat16)
    forms = {}
    for pieces in (True, False):
        monkeypatch.setattr(gelu_fp8, "PIECES", pieces)
        forms[pieces] = (gelu_fp8.gelu_quant_rows(h, b), gelu_fp8.gelu_backward_quant_rows(dg, h, b))
        for got, want in zip(forms[pieces], (gelu_fp8.gelu_quant_rows(h.cpu(), b.cpu()),
                                             gelu_fp8.gelu_backward_quant_rows(dg.cpu(), h.cpu(), b.cpu()))):
            check = compare("triton", (got[0].cpu(), got[1].cpu()), want)
            assert check["max_diff_in_steps"] <= 1 and check["fp8_values_differing"] < 0.01
            assert check["scale_max_rel_diff"] <= 1e-2
    for (q3, s3), (q1, s1) in zip(forms[True], forms[False]):
        assert torch.equal(q3.view(torch.uint8), q1.view(torch.uint8)) and torch.equal(s3, s1)


def test_fused_mlp_compiles_as_one_graph(tiny_pipe):
    """The fused MLP traces whole (``fullgraph=True``: the autograd Function and both custom operators, no graph
    break) and the compiled forward and backward give the eager fused numbers (inductor may round the
    quantizations' products in another order, which moves the odd value by one e4m3 step: a few outputs by up to
    a sixteenth of the largest, the whole by a few percent at most)."""
    pytest.importorskip("torch._inductor", reason="torch without inductor: compile SKIPPED")
    import torch._dynamo

    tr = _fp8_transformer(tiny_pipe)
    gelu_fp8.install(tr)
    mlp = tr.transformer_blocks[0].img_mlp
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, mlp.net[0].proj.in_features, generator=g).to(torch.bfloat16).requires_grad_(True)
    want = mlp(x)
    want.float().square().sum().backward()
    want_grad, x.grad = x.grad.clone(), None
    torch._dynamo.reset()
    compiled = torch.compile(mlp, fullgraph=True)
    got = compiled(x)
    got.float().square().sum().backward()
    for a, b in ((got, want), (x.grad, want_grad)):
        a, b = a.float(), b.float()
        assert (a - b).norm() <= 2 ** -5 * b.norm()  # e4m3 keeps 3 bits: one step is 2^-4..2^-3 of a value
        assert (a - b).abs().max() <= 2 ** -4 * b.abs().max()


def test_compiled_fp8_training_routes_the_mlps(tiny_pipe):
    """``accelerate_transformer`` (both backends and the ComfyUI node's engine) routes the fp8 MLPs through the
    fused kernels under ``model.compile`` with ``model.fp8_matmul``, and not without compile."""
    from qwen_zero_prior.training import rope
    from qwen_zero_prior.training.config import ModelConfig
    from qwen_zero_prior.training.diffusers_backend import accelerate_transformer
    from qwen_zero_prior.training.fp8 import IMAGE_STREAM

    for compile_ in (False, True):
        tr = copy.deepcopy(tiny_pipe.transformer).to(torch.bfloat16)
        add_lora(tr, rank=4, alpha=4, targets=list(ATTENTION_TARGETS), seed=0)
        try:
            accelerate_transformer(tr, ModelConfig(compile=compile_, fp8_matmul=True), IMAGE_STREAM,
                                   fp8_backward_copy=True, compute_dtype=torch.bfloat16)
        finally:
            rope.uninstall()
        routed = [gelu_fp8.installed(b.img_mlp) for b in tr.transformer_blocks]
        assert routed == [compile_] * len(tr.transformer_blocks)


@pytest.mark.parametrize("fast_accum,backward", [(True, True), (True, False), (False, False), (False, True)])
def test_fp8_fast_accum_settings_reach_each_product(tiny_pipe, monkeypatch, fast_accum, backward):
    """``model.fp8_fast_accum`` and ``fp8_fast_accum_backward`` (both on by default since session 35) set every fp8
    layer's accumulation through ``accelerate_transformer``; in the fused MLP, as in ``Fp8Linear``, both forward
    products get the first and the two backward products the second (a stand-in ``torch._scaled_mm`` records what
    each product was asked)."""
    from qwen_zero_prior.training import fp8, rope
    from qwen_zero_prior.training.config import ModelConfig
    from qwen_zero_prior.training.diffusers_backend import accelerate_transformer
    from qwen_zero_prior.training.fp8 import IMAGE_STREAM

    assert ModelConfig().fp8_fast_accum is True and ModelConfig().fp8_fast_accum_backward is True
    tr = copy.deepcopy(tiny_pipe.transformer).to(torch.bfloat16)
    add_lora(tr, rank=4, alpha=4, targets=list(ATTENTION_TARGETS), seed=0)
    try:
        accelerate_transformer(tr, ModelConfig(compile=True, fp8_matmul=True, fp8_fast_accum=fast_accum,
                                               fp8_fast_accum_backward=backward),
                               IMAGE_STREAM, fp8_backward_copy=True, compute_dtype=torch.bfloat16)
    finally:
        rope.uninstall()
    layers = [m for m in tr.modules() if isinstance(m, fp8.Fp8Linear)]
    assert layers and {(m.fast_accum, m.fast_accum_backward) for m in layers} == {(fast_accum, backward)}
    asked = []

    def fake_scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum=False):
        asked.append(use_fast_accum)
        return ((a.float() * scale_a) @ (b.float() * scale_b)).to(out_dtype)

    monkeypatch.setattr(fp8, "_use_scaled_mm", lambda t: True)
    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    mlp = tr.transformer_blocks[0].img_mlp
    assert gelu_fp8.installed(mlp)
    x = torch.randn(2, 8, mlp.net[0].proj.in_features, dtype=torch.bfloat16, requires_grad=True)
    mlp(x).float().square().sum().backward()
    assert asked == [fast_accum, fast_accum, backward, backward]
    # each product its own layer's flag: fc1 then fc2 forward, fc2's then fc1's input gradient backward
    fc1, fc2 = mlp.net[0].proj, mlp.net[2]
    fc1.fast_accum, fc2.fast_accum, fc1.fast_accum_backward, fc2.fast_accum_backward = True, False, False, True
    asked.clear()
    mlp(x).float().square().sum().backward()
    assert asked == [True, False, True, False]


def test_operators_registered_once_and_reused_by_a_second_copy():
    """A second copy of the package (another ComfyUI folder name) finds the operators registered and reuses them
    instead of failing to register them twice."""
    first = gelu_fp8._ops()
    gelu_fp8._ops.cache_clear()  # as a fresh copy of the module would start
    again = gelu_fp8._ops()
    assert again[0] is torch.ops.qwen_zero_prior.gelu_quant_rows and again[1] is torch.ops.qwen_zero_prior.gelu_backward_quant_rows
    h, b = torch.randn(16, 32).to(torch.bfloat16), torch.zeros(32).to(torch.bfloat16)
    assert torch.equal(again[0](h, b)[0].view(torch.uint8), first[0](h, b)[0].view(torch.uint8))


def test_a_first_forward_under_compile_finds_the_operators_registered(tiny_pipe):
    """Training's first forward is dynamo's trace: install registers the operators before it, so a fresh process
    whose first fused forward is compiled traces in one graph."""
    import torch._dynamo

    gelu_fp8._ops.cache_clear()
    tr = _fp8_transformer(tiny_pipe)
    gelu_fp8.install(tr)
    assert gelu_fp8._ops.cache_info().currsize == 1
    mlp = tr.transformer_blocks[0].img_mlp
    torch._dynamo.reset()
    x = torch.randn(1, 16, mlp.net[0].proj.in_features).to(torch.bfloat16)
    assert torch.compile(mlp, fullgraph=True)(x).shape == x.shape[:-1] + (mlp.net[2].out_features,)


class _FakeKernel:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **meta)`` records what a launch would get."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((self.name, grid, meta))


@pytest.mark.parametrize("width, pieces, want", [
    (12288, True, ("fwd3", {"P": 4096, "num_warps": 8})),  # Qwen-Image's MLP: three pieces of 4096
    (768, True, ("fwd3", {"P": 256, "num_warps": 8})),
    (1000, True, ("fwd", {"BLOCK": 1024, "num_warps": 8})),  # not 3 x a power of two: one padded row
    (24, True, ("fwd", {"BLOCK": 32, "num_warps": 8})),  # pieces of 8: below Triton's smallest block
    (12288, False, ("fwd", {"BLOCK": 16384, "num_warps": 8})),  # PIECES off: session 35's launch
])
def test_launch_takes_the_three_piece_kernels_where_the_width_allows(width, pieces, want, monkeypatch):
    """Which kernel a row of each width gets, with what block, on the CPU (fake kernels record the launches): the
    three-piece kernels for 3 × a power of two ≥ 16 with ``PIECES`` on, else the padded row; backward likewise."""
    calls = []
    fakes = [_FakeKernel(n, calls) for n in ("fwd", "bwd", "fwd3", "bwd3")]
    monkeypatch.setattr(gelu_fp8, "_triton_kernels", lambda: (lambda n: 1 << (n - 1).bit_length(), *fakes))
    monkeypatch.setattr(gelu_fp8, "PIECES", pieces)
    h = torch.zeros(32, width, dtype=torch.bfloat16)
    b = torch.zeros(width, dtype=torch.bfloat16)
    q, s = gelu_fp8._launch(0, h, b, like=h)
    gelu_fp8._launch(1, h, h, b, like=h)
    assert q.shape == (32, width) and q.dtype == FP8 and s.shape == (32, 1)
    (fname, fgrid, fmeta), (bname, bgrid, bmeta) = calls
    assert fname == want[0] and bname == want[0].replace("fwd", "bwd") and fgrid == bgrid == (32,)
    assert {k: fmeta[k] for k in want[1]} == want[1]
    assert bmeta.get("P") == fmeta.get("P") and bmeta.get("BLOCK") == fmeta.get("BLOCK")
    assert gelu_fp8.three_pieces(width) == (want[0] == "fwd3" or not pieces)  # the width's own rule
