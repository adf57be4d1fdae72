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
        w.grad = None
        y = compiled(x, w)
        y.backward(dy)
    exact = dy.float().t() @ x.detach().float()
    scale = exact.abs().max()
    assert w.grad.dtype == torch.float32 and (w.grad - exact).abs().max() <= 1e-5 * scale
    rounded = (dy.t() @ x.detach()).float()
    assert (rounded - exact).abs().max() > 1e-4 * scale
