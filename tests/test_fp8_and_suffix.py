"""fp8 base-weight matmuls (model.fp8_matmul) and the static-shape text-encoder suffix (CUDA-graph path)."""

import pytest
import torch

from qwen_zero_prior.training.config import Config
from qwen_zero_prior.training.data import scan_dataset
from qwen_zero_prior.training.fp8 import IMAGE_STREAM, Fp8Error, Fp8Linear, apply_fp8_matmul, check_supported, restore
from qwen_zero_prior.training.lora import add_lora
from qwen_zero_prior.training.token import install_placeholder
from qwen_zero_prior.training.trainer import Trainer


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear_close_to_linear_forward_and_backward(dtype, device):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48).to(device, dtype)
    f = Fp8Linear(lin)
    assert f.w_q.dtype == torch.float8_e4m3fn and f.w_q.shape == (48, 64)
    assert {n for n, _ in f.named_buffers()} == {"w_q", "w_scale"}  # one fp8 copy, no transposed second one
    x = torch.randn(2, 37, 64, dtype=dtype, device=device, requires_grad=True)  # 74 rows: padded to 80 inside
    y = f(x)
    y.square().sum().backward()
    g = x.grad.clone()
    x.grad = None
    ref = lin(x)
    ref.square().sum().backward()
    assert y.dtype == dtype and y.shape == ref.shape
    # really quantized (not a bf16 fallback), and within e4m3's row-scaled error
    assert 5e-3 < _rel(y, ref) < 0.06
    assert 5e-3 < _rel(g, x.grad) < 0.08
    assert all(not p.requires_grad for p in f.parameters())


U_E4M3 = 2.0**-4  # e4m3 rounds to 3 mantissa bits: within 2^-4 of the value, relative (normal range)
D_E4M3 = 2.0**-10  # near zero (subnormals, spacing 2^-9): within 2^-10 in units of the row's scale


def _e4m3_product_bound(a, a_err_abs, b, b_err_abs):
    """Elementwise bound on ``|â @ b̂ - a @ b|`` from per-element bounds on the operands' errors
    (``|â - a| <= a_err_abs``, ``|b̂ - b| <= b_err_abs``): ``|a| B + A |b| + A B`` summed over k."""
    a, b = a.abs(), b.abs()
    return a @ b_err_abs + a_err_abs @ b + a_err_abs @ b_err_abs


@pytest.mark.parametrize("backward_copy", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear_within_the_e4m3_bound_forward_and_input_gradient(dtype, backward_copy):
    """The error bound, derived: row quantization with scale σ = amax/448 gives ``|q σ - v| <= u |v| + δ σ``
    (u = 2^-4, δ = 2^-10). Forward ``y = x Wᵀ`` with both operands so quantized is within
    ``Σ_k |x| F + E |W| + E F`` (E, F: the operands' error bounds). Backward ``dx = dy W`` is computed as
    ``Q(dy diag(s)) Wq`` with W's row scales s moved onto dy's columns: ``Q(dy_j s_j) / s_j`` is within
    ``u |dy_j| + δ σ_a / s_j`` of ``dy_j`` and ``s_j Wq_j`` within F of ``W_j``, the same form. Plus the float32
    arithmetic of the CPU emulation and the rounding of the output to ``dtype``. With the backward copy (``Wᵀ``
    quantized per row, scales ``t`` per input feature) it is ``Q(dy) (Wtq diag(t))``: dy within ``u |dy| + δ σ_dy``,
    W within ``u |W| + δ t`` column-wise: the same form again. Checked element by element against a float64
    reference of the unquantized layer."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 80, bias=False).to(dtype)
    lin.weight.data *= torch.logspace(-2, 1, 80)[:, None].to(dtype)  # rows of very different magnitude
    f = Fp8Linear(lin, backward_copy=backward_copy)
    x = (torch.randn(3, 21, 96) * torch.logspace(-3, 2, 21)[:, None]).to(dtype).requires_grad_()  # 63 rows: padded
    dy = (torch.randn(3, 21, 80) * torch.logspace(1, -2, 80)).to(dtype)  # columns of very different magnitude
    y = f(x)
    y.backward(dy)
    assert y.dtype == dtype and x.grad.dtype == dtype
    w = lin.weight.detach().double()
    xd, dyd = x.detach().double().reshape(-1, 96), dy.double().reshape(-1, 80)
    s = f.w_scale.double()  # W's row scales (amax / 448)
    assert torch.equal(f.w_scale.float(), (lin.weight.detach().float().abs().amax(1) / 448))
    w_err = U_E4M3 * w.abs() + D_E4M3 * s[:, None]
    out_eps = torch.finfo(dtype).eps  # rounding of the result to dtype (half an ulp is eps/2; eps for margin)
    arith = 1e-6  # float32 products and sums of the emulation, relative to Σ|a||b| (K·2^-24 ≈ 6e-6 worst, 1e-6 ok)

    sx = xd.abs().amax(1, keepdim=True) / 448
    bound_y = _e4m3_product_bound(xd, U_E4M3 * xd.abs() + D_E4M3 * sx, w.t(), w_err.t())
    ref_y = xd @ w.t()
    err_y = (y.detach().double().reshape(-1, 80) - ref_y).abs()
    assert (err_y <= bound_y + arith * (xd.abs() @ w.abs().t()) + out_eps * ref_y.abs()).all()

    if backward_copy:
        t = f.wt_scale.double()  # Wᵀ's row scales: W's column amax / 448
        assert torch.equal(f.wt_scale.float(), lin.weight.detach().float().abs().amax(0) / 448)
        sdy = dyd.abs().amax(1, keepdim=True) / 448
        bound_dx = _e4m3_product_bound(dyd, U_E4M3 * dyd.abs() + D_E4M3 * sdy, w,
                                       U_E4M3 * w.abs() + D_E4M3 * t[None, :])
    else:
        a = dyd * s  # dy's columns scaled by W's row scales, then quantized per row
        sa = a.abs().amax(1, keepdim=True) / 448
        bound_dx = _e4m3_product_bound(dyd, U_E4M3 * dyd.abs() + D_E4M3 * sa / s, w, w_err)
    ref_dx = dyd @ w
    err_dx = (x.grad.double().reshape(-1, 96) - ref_dx).abs()
    assert (err_dx <= bound_dx + arith * (dyd.abs() @ w.abs()) + out_eps * ref_dx.abs()).all()
    # really quantized both ways (a bf16/fp32 pass-through would be ~100x closer)
    assert _rel(y.detach().reshape(-1, 80), ref_y) > 5e-3 and _rel(x.grad.reshape(-1, 96), ref_dx) > 5e-3
    # the bound is not vacuous: it stays a few e4m3 steps wide
    assert (bound_dx / (dyd.abs() @ w.abs())).max() < 0.2 and (bound_y / (xd.abs() @ w.abs().t())).max() < 0.2


def test_fp8_linear_keeps_one_fp8_copy_half_the_bf16_bytes():
    """One e4m3 byte a weight (exactly half the bf16 weight's bytes) + a float32 scale a row; no gradient for
    the weights; nothing of it in a state_dict (so no checkpoint ever held the earlier two-copy layout)."""
    from qwen_zero_prior.training.fp8 import stored_bytes

    lin = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    f = Fp8Linear(lin)
    held = sum(t.numel() * t.element_size() for t in [*f.parameters(), *f.buffers()])
    bf16 = lin.weight.numel() * lin.weight.element_size()
    assert f.w_q.numel() * f.w_q.element_size() == bf16 // 2
    assert held == bf16 // 2 + 48 * 4 == stored_bytes(48, 64)
    x = torch.randn(20, 64, dtype=torch.bfloat16, requires_grad=True)
    f(x).sum().backward()
    assert x.grad is not None and all(t.grad is None and not t.requires_grad for t in f.buffers())
    assert f.state_dict() == {}
    f.load_state_dict({})  # what any saved state of a converted layer holds: loads, the fp8 copy unchanged
    with_bias = Fp8Linear(torch.nn.Linear(64, 48).to(torch.bfloat16))
    assert list(with_bias.state_dict()) == ["bias"] and not with_bias.bias.requires_grad


@pytest.mark.parametrize("backward_copy", [False, True])
@pytest.mark.parametrize("fast_accum", [False, True])
def test_fp8_backward_hands_scaled_mm_what_cuda_accepts(monkeypatch, backward_copy, fast_accum):
    """No GPU here: a stand-in for ``torch._scaled_mm`` checks the operands against CUDA's row-wise recipe (fp8
    e4m3 both, the first row-major and the second column-major, float32 scales [M, 1] and [1, N], M/K/N multiples
    of 16, bf16 out) and computes the product; forward and backward then match the CPU emulation. ``fast_accum``
    reaches the forward's product only (``model.fp8_fast_accum``); the backward's accumulates exactly."""
    from qwen_zero_prior.training import fp8

    calls = []

    def fake_scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum=False):
        (m, k), (k2, n) = a.shape, b.shape
        assert a.dtype == b.dtype == torch.float8_e4m3fn and k == k2
        assert a.stride() == (k, 1) and b.stride() == (1, k), (a.stride(), b.stride())  # row- / column-major
        assert scale_a.dtype == scale_b.dtype == torch.float32
        assert scale_a.shape == (m, 1) and scale_b.shape == (1, n) and scale_b.is_contiguous()
        assert m % 16 == 0 and k % 16 == 0 and n % 16 == 0 and out_dtype == torch.bfloat16
        calls.append((m, k, n, use_fast_accum))
        return ((a.float() * scale_a) @ (b.float() * scale_b)).to(out_dtype)

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    f = Fp8Linear(lin, backward_copy=backward_copy, fast_accum=fast_accum)
    assert ("fast accumulation" in repr(f)) == fast_accum
    x = torch.randn(2, 19, 64, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(2, 19, 48, dtype=torch.bfloat16)
    f(x).backward(dy)
    emulated_y, emulated_dx = f(x).detach(), x.grad.clone()
    x.grad = None
    monkeypatch.setattr(fp8, "_use_scaled_mm", lambda t: True)
    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    y = f(x)
    y.backward(dy)
    # 38 rows padded to 48; forward K=in, backward K=out
    assert calls == [(48, 64, 48, fast_accum), (48, 48, 64, False)]
    assert torch.equal(y.detach(), emulated_y) and torch.allclose(x.grad, emulated_dx, rtol=1e-2, atol=1e-3)
    f.fast_accum_backward = True  # the bench's switch for the backward's product
    f(x).backward(dy)
    assert calls[2:] == [(48, 64, 48, fast_accum), (48, 48, 64, True)]


@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float16])
def test_fp8_bias_in_the_products_epilogue(monkeypatch, bias_dtype):
    """With ``fp8.BIAS_IN_PRODUCT`` a bf16 bias goes to ``_scaled_mm`` (a stand-in here, which adds it in float32
    before the bf16 rounding, as cuBLAS's epilogue does) and the layer adds nothing after the product: the output is
    the unfused one within bf16 rounding and the input gradient the same. Another bias dtype (fp16: cuBLAS's bf16
    results take a bf16 bias only) is added after the product, as without the switch."""
    from qwen_zero_prior.training import fp8

    asked = []

    def fake_scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum=False, bias=None):
        asked.append(None if bias is None else bias.dtype)
        out = (a.float() * scale_a) @ (b.float() * scale_b)
        return (out if bias is None else out + bias.float()).to(out_dtype)

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48).to(bias_dtype)
    f = Fp8Linear(lin, backward_copy=True)
    assert f.bias.dtype == bias_dtype
    x = torch.randn(3, 16, 64, dtype=bias_dtype)
    dy = torch.randn(3, 16, 48, dtype=bias_dtype)
    monkeypatch.setattr(fp8, "_use_scaled_mm", lambda t: True)
    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    runs = []
    for fused in (False, True):
        monkeypatch.setattr(fp8, "BIAS_IN_PRODUCT", fused)
        xi = x.clone().requires_grad_(True)
        y = f(xi)
        y.backward(dy)
        runs.append((y.detach().float(), xi.grad))
    (y0, g0), (y1, g1) = runs
    fused_bias = bias_dtype == torch.bfloat16
    assert asked == [None, None, bias_dtype if fused_bias else None, None]  # forward, backward; off, then on
    assert torch.equal(g0, g1)
    assert (y1 - y0).abs().max() <= 2 ** -7 * y0.abs().max()
    assert torch.equal(y0, y1) != fused_bias  # one rounding instead of two where the kernel adds it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: fp8 kernels")
def test_fp8_bias_in_the_product_on_the_gpu():
    """On an fp8 GPU cuBLAS's row-scaled kernel takes the bf16 bias (``fp8.BIAS_IN_PRODUCT``): the output within
    bf16 rounding of the product plus the bias added after it, the input gradient unchanged."""
    from qwen_zero_prior.training import fp8

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs fp8 tensor cores (compute capability 8.9+)")
    torch.manual_seed(0)
    lin = torch.nn.Linear(3072, 3072).to("cuda", torch.bfloat16)
    with torch.no_grad():
        lin.bias.normal_()
    x = torch.randn(4096, 3072, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(4096, 3072, device="cuda", dtype=torch.bfloat16)
    f = fp8.Fp8Linear(lin, backward_copy=True)
    out = []
    for fused in (False, True):
        fp8.BIAS_IN_PRODUCT = fused
        try:
            xi = x.clone().requires_grad_(True)
            y = f(xi)
            y.backward(dy)
        finally:
            fp8.BIAS_IN_PRODUCT = False
        out.append((y.detach().float(), xi.grad))
    (y0, g0), (y1, g1) = out
    assert (y1 - y0).abs().max() <= 2 ** -6 * y0.abs().max() and torch.equal(g0, g1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: fp8 kernels")
def test_fp8_fast_accumulation_reaches_the_gpu_kernel_within_its_error():
    """On an fp8 GPU the forward with fast accumulation differs from float32 accumulation (the flag reached the
    kernel) by less than the accumulation error bench/fp8_gemm.py measured at K=3072 (~0.6 % of the largest
    output), far inside e4m3's own bound; the input gradient is the same either way."""
    fp8_module = pytest.importorskip("qwen_zero_prior.training.fp8")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs fp8 tensor cores (compute capability 8.9+)")
    torch.manual_seed(0)
    lin = torch.nn.Linear(3072, 3072, bias=False).to("cuda", torch.bfloat16)
    x = torch.randn(4096, 3072, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(4096, 3072, device="cuda", dtype=torch.bfloat16)
    out = {}
    for fast in (False, True):
        f = fp8_module.Fp8Linear(lin, backward_copy=True, fast_accum=fast)
        xi = x.clone().requires_grad_(True)
        y = f(xi)
        y.backward(dy)
        out[fast] = (y.detach().float(), xi.grad.float())
    (y0, g0), (y1, g1) = out[False], out[True]
    if torch.cuda.get_device_capability()[0] == 9:  # Hopper's fp8 kernels accumulate differently with the flag
        assert not torch.equal(y0, y1)
    assert (y1 - y0).abs().max() <= 2e-2 * y0.abs().max()
    assert torch.equal(g0, g1)


def test_fp8_backward_copy_bytes_and_the_plan_deciding_them(tiny_pipe, make_config, monkeypatch):
    """``backward_copy_bytes`` is what the copies add (by block: ``backward_copy_bytes_by_block``); the backend
    gives them to as many of the first blocks as the memory plan has room for beside the resident step without
    them (asked with the capacity a card reports): all, some, none; never on the CPU, with offload or checkpointing."""
    from qwen_zero_prior.training import memory
    from qwen_zero_prior.training.diffusers_backend import DiffusersBackend
    from qwen_zero_prior.training.fp8 import backward_copy_bytes, backward_copy_bytes_by_block

    lin = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    one, two = Fp8Linear(lin), Fp8Linear(lin, backward_copy=True)

    def held(f):
        return sum(t.numel() * t.element_size() for t in f.buffers())

    assert held(two) - held(one) == 64 * 48 + 64 * 4
    assert "backward copy" in repr(two) and "backward copy" not in repr(one)
    tr = tiny_pipe.transformer
    layers = [mod for name, mod in tr.named_modules() if type(mod) is torch.nn.Linear
              and name.split(".")[0] == "transformer_blocks" and name.split(".", 2)[-1] in IMAGE_STREAM]
    assert layers and backward_copy_bytes(tr) == sum(m.weight.numel() + 4 * m.in_features for m in layers)
    by_block = backward_copy_bytes_by_block(tr)
    assert len(by_block) == len(tr.transformer_blocks) >= 2 and sum(by_block) == backward_copy_bytes(tr)
    assert len(set(by_block)) == 1 and by_block[0] > 0
    cfg = make_config(steps=1)
    cfg.model.fp8_matmul = True
    backend = DiffusersBackend(cfg, tiny_pipe)
    assert backend._fp8_backward_copy_blocks(cfg.train) == 0  # CPU
    backend.device = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))  # an fp8 GPU, as far as it asks
    # copies of a full-size model's order, 1 GiB a block (the tiny model's few KB would vanish in the plan's 0.1 GiB
    # rounding), four blocks
    from qwen_zero_prior.training import fp8

    gib = 2**30
    monkeypatch.setattr(fp8, "backward_copy_bytes_by_block", lambda transformer, modules: [gib] * 4)
    act = memory.activation_gib(memory.ACT_RESIDENT_GIB, cfg.train.resolution, cfg.train.batch_size)
    need = round(memory.weights_bytes(tiny_pipe, cfg.model) / gib + act + memory.MARGIN_GIB, 1)  # without copies
    for cap_gib, blocks in ((100.0, 4), (need + 4.05, 4), (need + 3.95, 3), (need + 1.5, 1), (need + 0.5, 0),
                            (need - 1.0, 0)):  # the last: not even resident without them (checkpoint)
        monkeypatch.setattr(memory, "per_process_capacity", lambda device, c=cap_gib: (c * gib, c * gib))
        assert backend._fp8_backward_copy_blocks(cfg.train) == blocks, cap_gib
    monkeypatch.setattr(memory, "per_process_capacity", lambda device: (100 * gib, 100 * gib))
    cfg.model.gradient_checkpointing = True
    assert backend._fp8_backward_copy_blocks(cfg.train) == 0
    cfg.model.gradient_checkpointing, cfg.model.offload = False, True
    assert backend._fp8_backward_copy_blocks(cfg.train) == 0


def test_fp8_backward_copies_for_the_first_blocks_only(tiny_pipe):
    """``apply_fp8_matmul(backward_copy=n)``: the converted layers of blocks 0..n-1 hold backward copies, the others
    none; the outputs and input gradients match those of every layer with a copy and of none; bad values refused."""
    import copy

    torch.manual_seed(0)
    tr = tiny_pipe.transformer.float()
    n_blocks = len(tr.transformer_blocks)
    x = torch.randn(5, tr.transformer_blocks[0].attn.to_q.in_features)
    got = {}
    for copies in (False, 1, True):
        t = copy.deepcopy(tr)
        apply_fp8_matmul(t, backward_copy=copies)
        with_copy = [any(getattr(m, "wt_q", None) is not None for m in blk.modules()) for blk in t.transformer_blocks]
        expect = n_blocks if copies is True else 0 if copies is False else copies
        assert with_copy == [i < expect for i in range(n_blocks)]
        out, grads = [], []
        for blk in t.transformer_blocks:
            xi = x.clone().requires_grad_(True)
            y = blk.attn.to_q(xi)
            y.square().sum().backward()
            out.append(y.detach())
            grads.append(xi.grad)
        got[copies] = out, grads
    for copies in (1, True):
        for a, b in zip(got[copies][0], got[False][0]):
            assert torch.equal(a, b)  # the forward never uses the copy
        for a, b in zip(got[copies][1], got[False][1]):
            torch.testing.assert_close(a, b, rtol=0.1, atol=0.1 * b.abs().max().item())  # both fp8, other rounding
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
            apply_fp8_matmul(copy.deepcopy(tr), backward_copy=bad)


def test_fp8_bytes_saved_is_what_the_conversion_frees(tiny_pipe):
    """The memory plan counts fp8_matmul's storage before converting: exactly the bytes the conversion frees."""
    from qwen_zero_prior.training.fp8 import bytes_saved

    tr = tiny_pipe.transformer

    def held():
        return sum(t.numel() * t.element_size() for t in [*tr.parameters(), *tr.buffers()])

    before, saved = held(), bytes_saved(tr)
    assert saved > 0
    apply_fp8_matmul(tr)
    assert held() == before - saved
    assert bytes_saved(tr) == 0  # nothing left to convert


def test_apply_fp8_converts_image_stream_bases_inside_lora(tiny_pipe):
    tr = tiny_pipe.transformer
    add_lora(tr, 4, 4, ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"])
    n = apply_fp8_matmul(tr, keep_original=True)
    blocks = len(tr.transformer_blocks)
    assert n == blocks * len(IMAGE_STREAM)
    blk = tr.transformer_blocks[0]
    assert isinstance(blk.attn.to_q.base_layer, Fp8Linear)  # peft wrapper kept, its base layer converted
    assert isinstance(blk.img_mlp.net[2], Fp8Linear)
    assert type(blk.attn.add_q_proj.base_layer) is torch.nn.Linear  # text stream stays
    assert type(blk.txt_mlp.net[2]) is torch.nn.Linear
    assert restore(tr) == n
    assert type(blk.attn.to_q.base_layer) is torch.nn.Linear


def test_fp8_refused_on_gpus_without_fp8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    with pytest.raises(Fp8Error, match=r"A100 is 8\.0.*fp8_matmul: false"):
        check_supported(torch.device("cuda"))


def test_trainer_step_with_fp8_matmul_tracks_the_bf16_loss(tiny_pipe, dataset_dir, tmp_path):
    import copy

    examples = scan_dataset(dataset_dir, "<zwx>", "a photo of {token}", True)
    losses = {}
    for fp8 in (False, True):
        cfg = Config.from_dict({"model": {"base_model": "x", "dtype": "bfloat16", "device": "cpu", "fp8_matmul": fp8},
                                "train": {"train_placeholder_token": True, "rank": 4, "resolution": 32,
                                          "checkpoint_every": 0, "seed": 0}})
        pipe = copy.deepcopy(tiny_pipe).to(dtype=torch.bfloat16)
        trainer = Trainer(cfg, pipe, examples, tmp_path / str(fp8))
        loss = trainer.loss_for([0], torch.Generator().manual_seed(0))
        loss.backward()
        # every LoRA tensor gets a gradient except the last block's text output (diffusers discards it)
        missing = [n for n, p in zip(trainer.param_names, trainer.lora_params) if p.grad is None]
        assert all(".to_add_out." in n for n in missing) and len(missing) == 2, missing
        assert sum(float(p.grad.abs().sum()) for p in trainer.lora_params if p.grad is not None) > 0
        assert trainer.token.vector.grad is not None and float(trainer.token.vector.grad.abs().sum()) > 0
        losses[fp8] = float(loss)
        fp8_layers = sum(isinstance(m, Fp8Linear) for m in pipe.transformer.modules())
        assert fp8_layers == (len(pipe.transformer.transformer_blocks) * len(IMAGE_STREAM) if fp8 else 0)
    assert abs(losses[True] - losses[False]) < 0.05 * losses[False], losses


def test_suffix_decoder_exact_for_any_bucket_and_split(tiny_pipe):
    """Prefix keys/values + padded suffix reproduce the decoder's full forward (and its gradient)."""
    from qwen_zero_prior.training.suffix import SuffixDecoder, supported

    reg = install_placeholder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, "<zwx>", torch.randn(32))
    lm = tiny_pipe.text_encoder.model.language_model
    assert supported(lm)
    ids = tiny_pipe.tokenizer("a quiet photo of <zwx> on the grass, <zwx> smiling")["input_ids"]
    embeds = lm.embed_tokens(torch.tensor([ids]))
    full = lm(inputs_embeds=embeds, use_cache=False).last_hidden_state
    full.square().sum().backward()
    ref_grad = reg.vector.grad.clone()
    first = ids.index(reg.token_id)
    for bucket, recompute in ((1, False), (7, False), (32, False), (7, True)):
        dec = SuffixDecoder(lm, bucket=bucket, recompute=recompute)
        k, v, hid = dec.prefix(lm.embed_tokens(torch.tensor([ids[:first]])))
        assert k.shape[:2] == (len(lm.layers), 1) and k.shape[3] == first
        reg.vector.grad = None
        out = dec.suffix(lm.embed_tokens(torch.tensor([ids[first:]])), k, v)
        got = torch.cat([hid, out], dim=1)
        assert torch.allclose(got, full, atol=1e-5), (bucket, (got - full).abs().max())
        got.square().sum().backward()
        assert torch.allclose(reg.vector.grad, ref_grad, rtol=1e-4, atol=1e-6), (bucket, recompute)
        assert not dec._graphs  # CPU: eager, no graphs
        reg.vector.grad = None  # the whole decoder from position 0 (no prefix cache) gives the same
        whole = dec.full(lm.embed_tokens(torch.tensor([ids])))
        assert torch.allclose(whole, full, atol=1e-5)
        whole.square().sum().backward()
        assert torch.allclose(reg.vector.grad, ref_grad, rtol=1e-4, atol=1e-6), (bucket, recompute)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device machine)")
@pytest.mark.parametrize("compile", [False, True])
def test_suffix_cuda_graph_replay_matches_eager(tiny_pipe, compile):
    from qwen_zero_prior.training.suffix import SuffixDecoder

    pipe = tiny_pipe.to("cuda")
    reg = install_placeholder(pipe.tokenizer, pipe.text_encoder, "<zwx>", torch.randn(32))
    lm = pipe.text_encoder.model.language_model
    ids = pipe.tokenizer("a quiet photo of <zwx> on the grass")["input_ids"]
    first = ids.index(reg.token_id)
    eager, graphed = SuffixDecoder(lm, cuda_graphs=False), SuffixDecoder(lm, cuda_graphs=True, compile=compile)
    k, v, _ = eager.prefix(lm.embed_tokens(torch.tensor([ids[:first]], device="cuda")))
    results = []
    for dec in (eager, graphed, graphed):  # the second graphed call replays
        reg.vector.grad = None
        out = dec.suffix(lm.embed_tokens(torch.tensor([ids[first:]], device="cuda")), k, v)
        out.square().sum().backward()
        assert not dec._pending  # the backward released the bucket: the next call replays again
        results.append((out.detach(), reg.vector.grad.clone()))
    assert len(graphed._graphs) == 1 and (graphed._compiled is not None) == compile
    tol = 1e-4 if compile else 1e-5  # inductor's fused kernels round differently
    for out, grad in results[1:]:
        assert torch.allclose(out, results[0][0], atol=tol), (out - results[0][0]).abs().max()
        assert torch.allclose(grad, results[0][1], rtol=10 * tol, atol=tol / 10), (grad - results[0][1]).abs().max()


# ---- offload (model.offload: 24 GB cards) --------------------------------------------------------------------
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("on_gpu", [False, True])
def test_offloaded_linear_forward_backward(fp8, on_gpu):
    from qwen_zero_prior.training.offload import OffloadedLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    off = OffloadedLinear(lin, torch.device("cpu"), fp8=fp8, on_gpu=on_gpu)
    assert (off.stored.dtype == torch.float8_e4m3fn) == fp8
    x = torch.randn(5, 64, requires_grad=True)
    y = off(x)
    y.square().sum().backward()
    g = x.grad.clone()
    x.grad = None
    ref = lin(x)
    ref.square().sum().backward()
    if fp8:
        assert 1e-3 < _rel(y, ref) < 0.06 and _rel(g, x.grad) < 0.06
    else:
        assert torch.allclose(y, ref, atol=1e-6) and torch.allclose(g, x.grad, atol=1e-6)
    assert not any(p.requires_grad for p in off.parameters())


def test_apply_offload_keeps_training_working(tiny_pipe, dataset_dir, tmp_path, make_config):
    from qwen_zero_prior.training.offload import OffloadedLinear, apply_offload, block_bytes_fp8

    trainer = Trainer(make_config(), tiny_pipe, scan_dataset(dataset_dir, "<zwx>", "a photo of {token}", True), tmp_path)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        before = float(trainer.loss_for([0], gen()))
    tr = tiny_pipe.transformer
    per_block = block_bytes_fp8(tr)
    emb = tiny_pipe.text_encoder.get_input_embeddings().weight
    # a budget that holds exactly one block: the other one is "streamed"
    budget = (emb.numel() * emb.element_size() + 1.5 * per_block) / 2**30
    summary = apply_offload(tiny_pipe, torch.device("cpu"), budget, reserve_gib=0)
    assert summary["resident_blocks"] == 1 and summary["streamed_blocks"] == len(tr.transformer_blocks) - 1
    assert isinstance(tr.transformer_blocks[0].attn.to_q.base_layer, OffloadedLinear)
    assert isinstance(tr.transformer_blocks[0].img_mod[1], OffloadedLinear)  # every block linear, LoRA'd or not
    layer = tiny_pipe.text_encoder.model.language_model.layers[0]
    assert isinstance(layer.mlp.down_proj, OffloadedLinear) and layer.mlp.down_proj.stored.dtype == torch.float32
    loss = trainer.loss_for([0], gen())
    loss.backward()
    assert abs(float(loss) - before) < 0.05 * before
    assert trainer.token.vector.grad is not None and float(trainer.token.vector.grad.abs().sum()) > 0
    assert sum(float(p.grad.abs().sum()) for p in trainer.lora_params if p.grad is not None) > 0


@pytest.mark.parametrize("text_encoder", ["stream", "bf16"])
def test_offload_and_resident_train_the_same_lora_and_vector(tiny_pipe, dataset_dir, tmp_path, make_config,
                                                             text_encoder):
    """N steps with the transformer and text encoder offloaded (fp8 transformer weights, streamed layers) move the
    LoRA and the token row the way resident training does: the same direction, within fp8's error. ``bf16``: the
    layout a 24 GB card gets by default (the decoder as loaded on the device, every block streamed, recomputed and
    fetched as one)."""
    import copy

    from qwen_zero_prior.training.offload import apply_offload

    examples = scan_dataset(dataset_dir, "<zwx>", "a photo of {token}", True)
    cfg = make_config(steps=6, learning_rate=2e-3, token_learning_rate=2e-2)
    runs = {}
    for offload in (False, True):
        trainer = Trainer(cfg, copy.deepcopy(tiny_pipe), examples, tmp_path / str(offload))
        start = [p.detach().clone() for p in trainer.trainable()]
        if offload:  # the blocks streamed in fp8, the text decoder's layers streamed or kept as loaded
            tr = trainer.backend.pipe.transformer
            if text_encoder == "bf16":
                tr.enable_gradient_checkpointing()  # as model.offload turns on: blocks recomputed, fetched as one
            apply_offload(trainer.backend.pipe, torch.device("cpu"), budget_gib=1e-3, reserve_gib=0,
                          text_encoder=text_encoder, prefetch_gib=0.01)
            fetched_as_one = [getattr(b, "_zp_streamed_block", None) is not None for b in tr.transformer_blocks]
            assert all(fetched_as_one) == (text_encoder == "bf16")
        for _ in range(cfg.train.steps):
            trainer.train_step()
        runs[offload] = [p.detach() - s for p, s in zip(trainer.trainable(), start)]
    lora = [torch.cat([d.flatten() for d in runs[o][:-1]]) for o in (False, True)]
    vec = [runs[o][-1] for o in (False, True)]
    for resident, offloaded in (lora, vec):
        assert resident.norm() > 0 and offloaded.norm() > 0
        cos = float(torch.nn.functional.cosine_similarity(resident, offloaded, dim=0))
        print(f"offload vs resident after {cfg.train.steps} steps: cosine {cos:.4f}, rel diff {_rel(offloaded, resident):.3f}")
        assert cos > 0.95, cos  # same updates up to fp8 rounding of the frozen weights
        assert _rel(offloaded, resident) < 0.3


def test_offload_config_refusals():
    from qwen_zero_prior.training.config import ConfigError

    with pytest.raises(ConfigError, match="fp8_matmul"):
        Config.from_dict({"model": {"offload": True, "fp8_matmul": True}})
    with pytest.raises(ConfigError, match="reduce-overhead"):  # offload recomputes blocks: no CUDA graphs
        Config.from_dict({"model": {"offload": True, "compile": True, "compile_mode": "reduce-overhead"}})
    assert Config.from_dict({"model": {"offload": True, "compile": True}}).model.compile  # resident blocks compile


# ---- GELU through sigmoid (compiled blocks) ----------------------------------------------------------------------
def test_sigmoid_gelu_equals_tanh_gelu_and_installs_per_model(tiny_pipe):
    import copy

    import torch.nn.functional as F

    from qwen_zero_prior.training import gelu

    x = torch.linspace(-12, 12, 20001, dtype=torch.float64).float().requires_grad_()
    ref = F.gelu(x, approximate="tanh")
    got = gelu.gelu_tanh_sigmoid(x)
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6), (got - ref).abs().max()
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    (g_got,) = torch.autograd.grad(got.sum(), x)
    assert torch.allclose(g_got, g_ref, rtol=1e-5, atol=1e-5), (g_got - g_ref).abs().max()
    xb = torch.randn(4096, generator=torch.Generator().manual_seed(0)).bfloat16()
    same = (gelu.gelu_tanh_sigmoid(xb) == F.gelu(xb, approximate="tanh")).float().mean()
    assert gelu.gelu_tanh_sigmoid(xb).dtype == torch.bfloat16 and same > 0.99, same

    tr = tiny_pipe.transformer
    other = copy.deepcopy(tr)
    kw = dict(hidden_states=torch.randn(1, 16, 64), encoder_hidden_states=torch.randn(1, 7, 32),
              timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]], return_dict=False)
    with torch.no_grad():
        before = tr(**kw)[0]
        assert gelu.install(tr) == 2 * len(tr.transformer_blocks)  # image and text MLP of each block
        after = tr(**kw)[0]
    assert torch.allclose(after, before, atol=1e-5)
    assert not any("gelu" in vars(m) for m in other.modules())  # only the model it was installed on
    gelu.uninstall(tr)
    assert not any("gelu" in vars(m) for m in tr.modules())


def test_quantize_rows_saturates_each_row_exactly():
    from qwen_zero_prior.training.fp8 import FP8_MAX, quantize_rows

    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(1)) * torch.logspace(-4, 4, 64)[:, None]
    q, scale = quantize_rows(x)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((64,), FP8_MAX))
    err = (q.float() * scale - x).abs()
    assert (err <= 0.07 * x.abs() + scale * 2**-9).all()  # e4m3: 3 mantissa bits, subnormals near 0


# ---- RoPE in real arithmetic (compiled blocks) ------------------------------------------------------------------
def _tiny_transformer_inputs(g):
    """A text input that takes gradients and the tiny Qwen-Image transformer's call around it (4x4 latent patches)."""
    x = torch.randn(1, 16, 64, generator=g)
    ctx = torch.randn(1, 7, 32, generator=g, requires_grad=True)
    return ctx, dict(hidden_states=x, encoder_hidden_states=ctx, timestep=torch.tensor([0.5]),
                     img_shapes=[[(1, 4, 4)]], return_dict=False)


def test_real_rope_matches_diffusers_bitwise_in_the_transformer(tiny_pipe):
    from diffusers.models.transformers import transformer_qwenimage as mod

    from qwen_zero_prior.training import rope

    original = mod.apply_rotary_emb_qwen
    tr = tiny_pipe.transformer
    g = torch.Generator().manual_seed(0)
    ctx, kw = _tiny_transformer_inputs(g)
    outs = []
    try:
        for patched in (False, True):
            if patched:
                assert rope.install() and not rope.install()  # idempotent
                assert mod.apply_rotary_emb_qwen is rope.apply_rotary_emb_qwen_real
            ctx.grad = None
            out = tr(**kw)[0]
            out.square().sum().backward()
            outs.append((out.detach(), ctx.grad.clone()))
    finally:
        rope.uninstall()
    assert mod.apply_rotary_emb_qwen is original
    assert torch.equal(outs[0][0], outs[1][0]) and torch.allclose(outs[0][1], outs[1][1], atol=1e-6)


def test_rope_tables_give_diffusers_numbers_in_the_transformer(tiny_pipe, tiny_pipe_21):
    """install_tables: Qwen-Image's pos_embed hands the blocks real tables (built once a forward) and the blocks
    rotate with them: the transformer's output and the text input's gradient are diffusers' (float rounding apart);
    no complex tensor reaches a block. Not for 2.1 (its blocks call their own RoPE); uninstall removes the hook."""
    from diffusers.models.transformers import transformer_qwenimage as mod

    from qwen_zero_prior.training import rope

    original = mod.apply_rotary_emb_qwen
    tr = tiny_pipe.transformer
    g = torch.Generator().manual_seed(0)
    ctx, kw = _tiny_transformer_inputs(g)
    seen = []
    probe = tr.transformer_blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["image_rotary_emb"]), with_kwargs=True)
    outs = []
    try:
        for tabled in (False, True):
            if tabled:
                assert not rope.install_tables(tiny_pipe_21.transformer)  # 2.1: refused
                assert rope.install_tables(tr) and not rope.install_tables(tr)  # idempotent
                assert mod.apply_rotary_emb_qwen is rope.apply_rotary_emb_qwen_real
            ctx.grad = None
            out = tr(**kw)[0]
            out.square().sum().backward()
            outs.append((out.detach(), ctx.grad.clone()))
    finally:
        probe.remove()
        rope.uninstall()
    assert mod.apply_rotary_emb_qwen is original and not tr.pos_embed._forward_hooks
    (img0, txt0), (img1, txt1) = seen
    assert torch.is_complex(img0) and not torch.is_complex(img1) and img1.shape == (16, 1, 16, 2)
    assert torch.equal(img1, rope.tables(img0)) and torch.equal(txt1, rope.tables(txt0))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5) and outs[0][1].abs().max() > 0
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-4)
    # the rotation itself, on its own: equal to the complex product, pair by pair
    q = torch.randn(2, 16, 3, 16, generator=g)
    assert torch.allclose(rope.apply_rotary_emb_qwen_real(q, rope.tables(img0), use_real=False),
                          original(q, img0, use_real=False), atol=1e-6)


def test_real_rope_matches_diffusers_in_the_2_1_transformer(tiny_pipe_21):
    """Qwen-Image 2.1's module has its own copy of the complex RoPE: install() routes it when named, same numbers
    (training names both modules under compile)."""
    from diffusers.models.transformers import transformer_qwenimage21 as mod

    from qwen_zero_prior.training import flow21, rope

    original = mod.apply_rotary_emb_qwen
    tr = tiny_pipe_21.transformer
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, tiny_pipe_21.vae.config.z_dim, 1, 4, 4, generator=g)
    embeds = torch.randn(1, 5, tr.config.context_in_dim, generator=g, requires_grad=True)
    outs = []
    try:
        for patched in (False, True):
            if patched:
                rope.install()  # Qwen-Image's only, by default
                assert mod.apply_rotary_emb_qwen is original
                assert rope.install(rope.QWEN_IMAGE_21_MODULE) and not rope.install(rope.QWEN_IMAGE_21_MODULE)
                assert mod.apply_rotary_emb_qwen is rope.apply_rotary_emb_qwen_real
            embeds.grad = None
            out = flow21.forward(tr, noisy, torch.tensor([0.5]), embeds, None)
            out.square().sum().backward()
            outs.append((out.detach(), embeds.grad.clone()))
    finally:
        rope.uninstall()
    assert mod.apply_rotary_emb_qwen is original
    assert not torch.equal(outs[0][1], torch.zeros_like(outs[0][1]))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.allclose(outs[0][1], outs[1][1], atol=1e-6)


def test_cantsplit_fix_makes_the_bare_raise_a_rejected_tiling():
    """torch 2.11's inductor raised ``CantSplit`` bare while its __init__ required two arguments (a TypeError that
    killed the compile); after compile_fixes.install() the bare form constructs, is caught as CantSplit, and the
    argument form keeps its message."""
    from torch._inductor.codegen.simd import CantSplit

    from qwen_zero_prior.training import compile_fixes

    compile_fixes.install()
    assert not compile_fixes.install()  # idempotent
    with pytest.raises(CantSplit):
        raise CantSplit
    assert str(CantSplit(6, 4)) == "6 not divisible by 4"

    class Other(Exception):  # a signature the fix does not know is left alone
        def __init__(self, a, b):
            super().__init__()

    assert not compile_fixes._defaults_for_cantsplit(Other)
    with pytest.raises(TypeError):
        Other()


def test_suffix_graph_not_replayed_twice_before_backward(tiny_pipe, monkeypatch):
    """Two captions of one batch in the same bucket: the second must not overwrite the first's graph
    activations (it runs eagerly); after the backward the graph is free again. CUDA graphs are emulated on the CPU
    (``graphs.EmulatedCapture``: replays recompute the static buffers in place), counting replays."""
    from qwen_zero_prior.training import graphs
    from qwen_zero_prior.training.prompt import PromptEncoder

    emu = graphs.EmulatedCapture()
    monkeypatch.setattr(graphs, "capture_cuda", emu)
    # the capture path of ComfyUI's default allocator (under the native one PyTorch's make_graphed_callables captures)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "cudaMallocAsync")
    reg = install_placeholder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, "<zwx>", torch.randn(32))
    enc = PromptEncoder(tiny_pipe, reg.token_id)
    monkeypatch.setattr(enc.suffix, "_graphs_on", lambda embeds: True)
    caps = ["a photo of <zwx> on grass", "a photo of <zwx> on sand"]  # same prefix, same bucket
    ref, _ = tiny_pipe._get_qwen_prompt_embeds(caps, device=torch.device("cpu"), dtype=torch.float32)
    got, _ = enc.encode(caps, torch.float32, torch.device("cpu"))
    assert emu.forward_replays == 1  # the second caption ran eagerly
    assert torch.allclose(got, ref, atol=1e-5)
    got.sum().backward()
    assert emu.backward_replays == 1
    assert not enc.suffix._pending  # the gradient hook released the bucket
    enc.encode(caps[:1], torch.float32, torch.device("cpu"))
    assert emu.forward_replays == 2 and emu.captures == 1
    # training over: the bucket's captured output and gradients freed now (no C++ warning a tensor under
    # cudaMallocAsync, graphs._Graphed.release), the buckets dropped; a later step captures again
    (fn,) = enc.suffix._graphs.values()
    cap = fn.graphed.cap
    enc.suffix.release_graphs()
    assert not enc.suffix._graphs
    assert all(t.untyped_storage().nbytes() == 0 for t in (cap.static_out, *cap.static_grads) if t is not None)
    again, _ = enc.encode(caps[:1], torch.float32, torch.device("cpu"))
    assert emu.captures == 2 and torch.allclose(again, ref[:1, :again.shape[1]], atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device syncs exist only on a GPU (run on the device machine)")
def test_train_step_never_waits_for_the_gpu(tiny_pipe, dataset_dir, tmp_path):
    """After warm-up (latents cached, text-encoder graphs captured), a step makes no device sync: blocking
    host-to-device copies, ``.item()``/``bool()`` on GPU tensors or ``float(loss)`` would each idle the GPU
    while the host catches up. The loss still comes back, from pinned memory."""
    examples = scan_dataset(dataset_dir, "<zwx>", "a photo of {token}", True)
    cfg = Config.from_dict({"model": {"base_model": "x", "dtype": "bfloat16", "device": "cuda"},
                            "train": {"train_placeholder_token": True, "rank": 4, "resolution": 32,
                                      "checkpoint_every": 0, "seed": 0}})
    trainer = Trainer(cfg, tiny_pipe.to("cuda", torch.bfloat16), examples, tmp_path)
    trainer.cache_all_latents()
    for _ in range(3):
        trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [trainer.train_step() for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(isinstance(v, float) and v == v and v > 0 for v in losses), losses
    assert trainer.losses[-2:] == losses


def test_suffix_function_traces_as_one_graph(tiny_pipe):
    """``model.compile`` compiles the text encoder's suffix with ``fullgraph=True`` before capture: dynamo must
    trace it whole (a graph break would raise here, not deep inside a GPU run). Same numbers and gradient."""
    from qwen_zero_prior.training.suffix import SuffixDecoder

    torch._dynamo.reset()
    reg = install_placeholder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, "<zwx>", torch.randn(32))
    lm = tiny_pipe.text_encoder.model.language_model
    ids = tiny_pipe.tokenizer("a photo of <zwx> by the sea")["input_ids"]
    first = ids.index(reg.token_id)
    dec = SuffixDecoder(lm, cuda_graphs=False)
    k, v, _ = dec.prefix(lm.embed_tokens(torch.tensor([ids[:first]])))
    ref = dec.suffix(lm.embed_tokens(torch.tensor([ids[first:]])), k, v)
    captured = {}
    plain = dec._suffix_fn

    def spy(*a):  # the padded static-shape arguments suffix() builds
        captured["args"] = a
        return plain(*a)

    dec._suffix_fn = spy
    dec.suffix(lm.embed_tokens(torch.tensor([ids[first:]])), k, v)
    args = captured["args"]
    compiled = torch.compile(plain, fullgraph=True, dynamic=False, backend="aot_eager")
    reg.vector.grad = None
    out = compiled(*args)[:, : ref.shape[1]]
    assert torch.allclose(out, ref, atol=1e-5)
    out.sum().backward()
    assert reg.vector.grad is not None and float(reg.vector.grad.abs().sum()) > 0

