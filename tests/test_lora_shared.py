"""lora_shared.lora_product: peft's LoRA product (autocast's dtype), whose backward writes a float32 weight's
gradient straight from the half-precision product on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from qwen_zero_prior.training import lora_shared


def _run(fn, x, w, dy, autocast: bool):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = fn(x, w)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast-bf16"])
def test_lora_product_is_peft_linear_forward_and_backward(autocast):
    """Off CUDA the product, the input gradient and the weight gradient are F.linear's under autograd, bit for bit,
    in float32 and under bf16 autocast (float32 weights cast per use, as peft's layers run in training)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 7, 24, generator=g), torch.randn(6, 24, generator=g)
    dy = torch.randn(2, 7, 6, generator=g)
    want = _run(F.linear, x, w, dy, autocast)
    got = _run(lora_shared.lora_product, x, w, dy, autocast)
    assert [t.dtype for t in got] == [t.dtype for t in want]
    assert got[0].dtype == (torch.bfloat16 if autocast else torch.float32) and got[2].dtype == torch.float32
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_weight_gradient_is_the_float32_product_where_cuda_can(monkeypatch):
    """Where the float32 product runs (CUDA's ``mm`` with ``out_dtype``; a stand-in here), a float32 weight's
    gradient is the float32 product of the bf16 operands, not its bf16 rounding cast back; the input gradient and
    the output are unchanged."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(64, 48, generator=g), torch.randn(8, 48, generator=g)
    dy = torch.randn(64, 8, generator=g)
    asked = []
    real_mm = torch.mm

    def fake_mm(a, b, *, out_dtype=None):
        asked.append((a.dtype, b.dtype, out_dtype))
        return real_mm(a.float(), b.float()) if out_dtype is not None else real_mm(a, b)

    rounded = _run(lora_shared.lora_product, x, w, dy, autocast=True)
    monkeypatch.setattr(lora_shared, "_float32_product", lambda d, o: o == torch.float32 and d.dtype == torch.bfloat16)
    monkeypatch.setattr(torch, "mm", fake_mm)
    y, dx, dw = _run(lora_shared.lora_product, x, w, dy, autocast=True)
    assert asked == [(torch.bfloat16, torch.bfloat16, torch.float32)]
    exact = dy.to(torch.bfloat16).float().t() @ x.to(torch.bfloat16).float()
    assert torch.equal(dw, exact) and not torch.equal(rounded[2], exact)
    assert (rounded[2] - exact).abs().max() > 10 * (dw - exact).abs().max()
    assert torch.equal(y, rounded[0]) and torch.equal(dx, rounded[1])


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast-bf16"])
def test_lora_product_compiles_in_one_graph(autocast):
    """dynamo and inductor take the autograd function (dtypes kept on its context, autocast's dtype read while
    tracing) without a graph break, with F.linear's numbers."""
    import torch._dynamo

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 16, generator=g)
    w = torch.randn(8, 16, generator=g)
    dy = torch.randn(4, 8, generator=g)

    def compiled(a, b):
        return torch.compile(lora_shared.lora_product, fullgraph=True)(a, b)

    got = _run(compiled, x, w, dy, autocast)
    want = _run(F.linear, x, w, dy, autocast)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), rtol=1e-2 if autocast else 1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: aten::mm.dtype is CUDA's")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_weight_gradient_in_float32_on_the_gpu_compiled(mode):
    """On CUDA, compiled by inductor under bf16 autocast (also as CUDA graphs, replayed), a float32 LoRA weight's
    gradient is the float32 product of the bf16 operands (float32 rounding only), where the bf16 product cast back
    is ~1e-3 off."""
    if not lora_shared._MM_OUT_DTYPE:
        pytest.skip(f"torch {torch.__version__} has no aten::mm.dtype")
    torch.manual_seed(0)
    x = torch.randn(4096, 3072, device="cuda").to(torch.bfloat16).requires_grad_(True)
    w = torch.randn(32, 3072, device="cuda", requires_grad=True)
    dy = torch.randn(4096, 32, device="cuda").to(torch.bfloat16)

    def step(a, b):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return lora_shared.lora_product(a, b)

    compiled = torch.compile(step, fullgraph=True, mode=mode)
    for _ in range(3 if mode else 1):  # CUDA graphs: recorded, then replayed
        torch.compiler.cudagraph_mark_step_begin()  # each iteration a new step (its outputs may be overwritten)
        w.grad = x.grad = None
        y = compiled(x, w)
        y.backward(dy)
    exact = dy.float().t() @ x.detach().float()
    scale = exact.abs().max()
    assert w.grad.dtype == torch.float32 and (w.grad - exact).abs().max() <= 1e-5 * scale
    rounded = (dy.t() @ x.detach()).float()
    assert (rounded - exact).abs().max() > 1e-4 * scale


def _peft_delta(result, h, w, scaling):
    """peft's add of a LoRA B product to the base output, as LoraLayer.forward computes it."""
    return (result + F.linear(h, w) * scaling).to(result.dtype)


def _run_delta(fn, result, h, w, dy, scaling, autocast: bool):
    result, h, w = (t.detach().clone().requires_grad_(True) for t in (result, h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        # a base layer's fresh output (lora_delta writes into it), from the leaf whose gradient is compared
        base = result.to(torch.bfloat16) if autocast else result * 1
        y = fn(base, h, w, scaling)
    y.backward(dy.to(y.dtype))
    return y.detach(), result.grad, h.grad, w.grad


@pytest.mark.parametrize("scaling", [1.0, 0.5])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast-bf16"])
def test_lora_delta_is_peft_add_of_the_b_product(autocast, scaling):
    """``lora_delta`` (one addmm) gives peft's output and the same gradients for the base output, the rank-r input
    and the float32 weight: float32 rounding apart in float32; under bf16 autocast within bf16 rounding of the
    output (one rounding instead of three) and of each gradient."""
    g = torch.Generator().manual_seed(3)
    result, h = torch.randn(2, 9, 40, generator=g), torch.randn(2, 9, 4, generator=g)
    w, dy = torch.randn(40, 4, generator=g), torch.randn(2, 9, 40, generator=g)
    want = _run_delta(_peft_delta, result, h, w, dy, scaling, autocast)
    got = _run_delta(lora_shared.lora_delta, result, h, w, dy, scaling, autocast)
    assert [t.dtype for t in got] == [t.dtype for t in want]
    assert got[0].dtype == (torch.bfloat16 if autocast else torch.float32) and got[3].dtype == torch.float32
    for a, b in zip(got, want):
        scale = b.float().abs().max()
        assert (a.float() - b.float()).abs().max() <= (2 ** -7 if autocast else 1e-6) * scale
    if not autocast:  # a plain pass-through for the base output's gradient
        assert torch.equal(got[1], dy)


def test_lora_delta_writes_into_the_base_output_and_leaves_a_leaf_alone():
    """The sum is written into the base output (the same storage, returned); a leaf that requires grad, which
    autograd cannot have written in place, gets peft's out-of-place form instead."""
    g = torch.Generator().manual_seed(6)
    leaf = torch.randn(4, 8, generator=g, requires_grad=True)
    h, w = torch.randn(4, 2, generator=g), torch.randn(8, 2, generator=g)
    base = leaf * 1
    out = lora_shared.lora_delta(base, h, w, 0.5)
    assert out.data_ptr() == base.data_ptr()
    assert torch.allclose(out, _peft_delta(leaf, h, w, 0.5), rtol=1e-6, atol=1e-6)
    kept = lora_shared.lora_delta(leaf, h, w, 0.5)
    assert kept.data_ptr() != leaf.data_ptr() and torch.equal(kept, _peft_delta(leaf, h, w, 0.5))


def test_lora_delta_falls_back_where_the_dtypes_differ():
    """A float32 base output under bf16 autocast (peft computes the B product in bf16 and adds it to the float32
    output): peft's form, exactly."""
    g = torch.Generator().manual_seed(4)
    result, h, w = torch.randn(5, 16, generator=g), torch.randn(5, 4, generator=g), torch.randn(16, 4, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lora_shared.lora_delta(result, h, w, 0.5)
        want = _peft_delta(result, h, w, 0.5)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_lora_delta_compiles_in_one_graph():
    """dynamo and inductor take ``lora_delta`` without a graph break, with peft's numbers (float32 rounding)."""
    import torch._dynamo

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    result, h = torch.randn(3, 7, 24, generator=g), torch.randn(3, 7, 4, generator=g)
    w, dy = torch.randn(24, 4, generator=g), torch.randn(3, 7, 24, generator=g)
    compiled = torch.compile(lora_shared.lora_delta, fullgraph=True)
    got = _run_delta(compiled, result, h, w, dy, 0.25, autocast=False)
    want = _run_delta(_peft_delta, result, h, w, dy, 0.25, autocast=False)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_inductor_keeps_lora_delta_in_place():
    """Compiled, the base product's buffer is the one the operator writes into: no copy of it into another buffer
    (what ``torch.addmm`` out of place costs, a 25 MB copy per layer at 1024² on the GPU, session 33)."""
    import torch._dynamo
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    lora_shared.register_ops()
    g = torch.Generator().manual_seed(7)
    x, wb = torch.randn(8, 16, generator=g), torch.randn(24, 16, generator=g)
    h, w = torch.randn(8, 4, generator=g, requires_grad=True), torch.randn(24, 4, generator=g, requires_grad=True)

    def f(x, wb, h, w):
        return lora_shared.lora_delta(F.linear(x, wb), h, w, 0.5)

    out, codes = run_and_get_code(torch.compile(f), x, wb, h, w)
    assert torch.allclose(out, _peft_delta(F.linear(x, wb), h, w, 0.5), rtol=1e-5, atol=1e-5)
    lines = [ln.strip() for ln in codes[0].splitlines()]
    mm = next(ln for ln in lines if ln.startswith("extern_kernels.mm("))
    buf = mm.rsplit("out=", 1)[1].rstrip(")")
    assert any(ln.startswith(f"torch.ops.qwen_zero_prior.lora_add_product_.default({buf},") for ln in lines), lines
    assert not any(ln.startswith("extern_kernels.addmm(") or ".copy_(" in ln for ln in lines)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: cuBLAS's addmm under inductor and CUDA graphs")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_lora_delta_on_the_gpu_compiled(mode):
    """On CUDA, compiled by inductor under bf16 autocast (also as CUDA graphs, replayed): peft's output within
    bf16 rounding and the weight's gradient the float32 product (where CUDA has ``mm`` with ``out_dtype``)."""
    torch.manual_seed(0)
    result = torch.randn(4096, 3072, device="cuda").to(torch.bfloat16).requires_grad_(True)
    h = torch.randn(4096, 32, device="cuda").to(torch.bfloat16).requires_grad_(True)
    w = torch.randn(3072, 32, device="cuda", requires_grad=True)
    dy = torch.randn(4096, 3072, device="cuda").to(torch.bfloat16)

    def step(r, a, b):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return lora_shared.lora_delta(r * 2, a, b, 0.5)  # a fresh base output, as a layer's

    compiled = torch.compile(step, fullgraph=True, mode=mode)
    for _ in range(3 if mode else 1):  # CUDA graphs: recorded, then replayed
        torch.compiler.cudagraph_mark_step_begin()
        w.grad = h.grad = result.grad = None
        y = compiled(result, h, w)
        y.backward(dy)
    exact = 2 * result.detach().float() + 0.5 * h.detach().float() @ w.detach().to(torch.bfloat16).float().t()
    assert y.dtype == torch.bfloat16 and (y.float() - exact).abs().max() <= 2 ** -7 * exact.abs().max()
    assert torch.equal(result.grad, 2 * dy)
    want_dw = 0.5 * dy.float().t() @ h.detach().float()
    tol = 1e-5 if lora_shared._MM_OUT_DTYPE else 2 ** -7
    assert w.grad.dtype == torch.float32 and (w.grad - want_dw).abs().max() <= tol * want_dw.abs().max()
