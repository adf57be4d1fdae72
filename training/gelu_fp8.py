"""Qwen-Image's image-stream MLP with its GELU and fp8 quantizations in one hand-written kernel each way.

With ``model.fp8_matmul`` each block's ``img_mlp`` is ``fc2(gelu(fc1(x)))``, both products in fp8
(:mod:`.fp8`). Between them the compiled block runs one fused kernel forward (fc1's bias, the GELU, the GELU's
row maximum, the per-row fp8 cast for fc2) and one backward (the GELU's derivative times fc2's input gradient, its
row maximum and cast for fc1's input-gradient product). Inductor compiles each as a looped reduction that computes
the GELU twice with IEEE divisions: ~125 µs each at 1024² on an H200, arithmetic-bound, where their bytes take
~40-60 µs (docs/benchmarks.md, "Session 29"). :func:`gelu_quant_rows` and :func:`gelu_backward_quant_rows` are
the same computations as custom operators: on CUDA one Triton program a row, the row held in registers, the GELU
computed once, fast divisions (the values within one e4m3 step of the fused kernel's; the bench reports how many
differ); elsewhere the reference PyTorch code, which is what :class:`~.fp8.Fp8Linear` and :mod:`.gelu` compute.
A row whose width is three times a power of two (Qwen-Image's 12288 = 3 x 4096) is held as three pieces
(:data:`PIECES`) rather than one block padded to the next power of two, whose padding lanes computed the GELU too:
55.3 and 74.3 µs instead of 68.7 and 93.1 at [4096, 12288] on an H200, the same fp8 codes and scales (session 36).

:func:`install` routes an image-stream MLP through :class:`_Fp8GeluMlp` (instance attribute; :func:`uninstall`
removes it) where both its layers are plain :class:`~.fp8.Fp8Linear` with backward copies computing in bf16, its
activation the tanh GELU and its dropout a no-op; any other MLP (a LoRA on it, no backward copy, another activation)
keeps its own forward. Training installs it with ``model.compile`` and ``model.fp8_matmul``
(``diffusers_backend.accelerate_transformer``), where :mod:`.gelu`'s sigmoid form, which the kernels compute, is
installed too. On an H200 at 1024² under the 78 GiB cap it took 5.2 ms off a step (session 29).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .cast_linear import NAMESPACE, registered_ops
from .fp8 import FP8, FP8_MAX, Fp8Linear, quantize_rows, scaled_product
from .gelu import gelu_tanh_sigmoid

_C = 2.0 * math.sqrt(2.0 / math.pi)
_kernels = None
NUM_WARPS: int | None = None  # warps a row's program gets; None: see _launch (the bench tries others)
# rows of three power-of-two pieces (Qwen-Image's 12288 = 3 x 4096) through kernels without padding lanes: at
# [4096, 12288] on an H200, forward 68.7 -> 55.3 us, backward 93.1 -> 74.3 us, the same fp8 codes (session 36)
PIECES = True


def gelu_tanh_sigmoid_backward(dg: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`.gelu.gelu_tanh_sigmoid` at ``x`` for an incoming ``dg``, written out (a custom
    operator runs below autograd): ``d/dx x·σ(u) = σ(u) + x·σ(u)(1-σ(u))·u'``, ``u = C(x + 0.044715x³)``; float32
    inside, ``dg``'s dtype out, as autograd's (the tests compare the two)."""
    x = x.float()
    s = torch.sigmoid(_C * (x + 0.044715 * x * x * x))
    d = s + x * s * (1 - s) * (_C * (1 + 3 * 0.044715 * x * x))
    return (d * dg.float()).to(dg.dtype)


def _triton_kernels():
    """The Triton kernels (each way: one padded row a program, and three pieces), compiled on first use (Triton is
    imported only where CUDA runs them)."""
    global _kernels
    if _kernels is not None:
        return _kernels
    import triton
    import triton.language as tl

    @triton.jit
    def gelu_quant_fwd(h_ptr, b_ptr, q_ptr, s_ptr, n, stride, C: tl.constexpr, FMAX: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        h = tl.load(h_ptr + row * stride + cols, mask=mask, other=0.0)
        b = tl.load(b_ptr + cols, mask=mask, other=0.0)
        x = (h.to(tl.float32) + b.to(tl.float32)).to(tl.bfloat16).to(tl.float32)  # Fp8Linear's bias add, bf16
        g = tl.fdiv(x, 1.0 + tl.exp(-(C * (x + 0.044715 * x * x * x))))
        g = g.to(tl.bfloat16).to(tl.float32)  # gelu.py returns the input's dtype
        amax = tl.maximum(tl.max(tl.abs(g), axis=0), 1e-12)
        q = tl.clamp(g * (FMAX / amax), -FMAX, FMAX)
        tl.store(q_ptr + row * stride + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + row, amax / FMAX)

    @triton.jit
    def gelu_quant_bwd(dg_ptr, h_ptr, b_ptr, q_ptr, s_ptr, n, stride, C: tl.constexpr, FMAX: tl.constexpr,
            BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        dg = tl.load(dg_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + row * stride + cols, mask=mask, other=0.0)
        b = tl.load(b_ptr + cols, mask=mask, other=0.0)
        x = (h.to(tl.float32) + b.to(tl.float32)).to(tl.bfloat16).to(tl.float32)
        s = tl.fdiv(1.0, 1.0 + tl.exp(-(C * (x + 0.044715 * x * x * x))))
        d = s + x * s * (1.0 - s) * (C * (1.0 + 3 * 0.044715 * x * x))  # d/dx x·σ(u)
        dx = (d * dg).to(tl.bfloat16).to(tl.float32)  # autograd's gradient is bf16
        amax = tl.maximum(tl.max(tl.abs(dx), axis=0), 1e-12)
        q = tl.clamp(dx * (FMAX / amax), -FMAX, FMAX)
        tl.store(q_ptr + row * stride + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + row, amax / FMAX)

    # The same computations for rows of three power-of-two pieces (Qwen-Image's 12288 = 3 x 4096), each piece its
    # own register tensor: no masked lanes (one row as one power-of-two block pads 12288 to 16384, and the padding
    # lanes compute the GELU too). The same per-element arithmetic and the same (order-free) maximum: the same fp8
    # codes and scales.
    @triton.jit
    def _gelu_piece(h_ptr, b_ptr, base, start, C: tl.constexpr, P: tl.constexpr):
        cols = start + tl.arange(0, P)
        h = tl.load(h_ptr + base + cols)
        b = tl.load(b_ptr + cols)
        x = (h.to(tl.float32) + b.to(tl.float32)).to(tl.bfloat16).to(tl.float32)
        g = tl.fdiv(x, 1.0 + tl.exp(-(C * (x + 0.044715 * x * x * x))))
        return g.to(tl.bfloat16).to(tl.float32)

    @triton.jit
    def _gelu_grad_piece(dg_ptr, h_ptr, b_ptr, base, start, C: tl.constexpr, P: tl.constexpr):
        cols = start + tl.arange(0, P)
        dg = tl.load(dg_ptr + base + cols).to(tl.float32)
        h = tl.load(h_ptr + base + cols)
        b = tl.load(b_ptr + cols)
        x = (h.to(tl.float32) + b.to(tl.float32)).to(tl.bfloat16).to(tl.float32)
        s = tl.fdiv(1.0, 1.0 + tl.exp(-(C * (x + 0.044715 * x * x * x))))
        d = s + x * s * (1.0 - s) * (C * (1.0 + 3 * 0.044715 * x * x))
        return (d * dg).to(tl.bfloat16).to(tl.float32)

    @triton.jit
    def _store_pieces(q_ptr, s_ptr, row, base, g0, g1, g2, FMAX: tl.constexpr, P: tl.constexpr):
        amax = tl.maximum(tl.maximum(tl.max(tl.abs(g0), axis=0), tl.max(tl.abs(g1), axis=0)),
                          tl.max(tl.abs(g2), axis=0))
        amax = tl.maximum(amax, 1e-12)
        cols = tl.arange(0, P)
        tl.store(q_ptr + base + cols, tl.clamp(g0 * (FMAX / amax), -FMAX, FMAX).to(tl.float8e4nv))
        tl.store(q_ptr + base + P + cols, tl.clamp(g1 * (FMAX / amax), -FMAX, FMAX).to(tl.float8e4nv))
        tl.store(q_ptr + base + 2 * P + cols, tl.clamp(g2 * (FMAX / amax), -FMAX, FMAX).to(tl.float8e4nv))
        tl.store(s_ptr + row, amax / FMAX)

    @triton.jit
    def gelu_quant_fwd3(h_ptr, b_ptr, q_ptr, s_ptr, n, stride, C: tl.constexpr, FMAX: tl.constexpr,
            P: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = row * stride
        g0 = _gelu_piece(h_ptr, b_ptr, base, 0, C, P)
        g1 = _gelu_piece(h_ptr, b_ptr, base, P, C, P)
        g2 = _gelu_piece(h_ptr, b_ptr, base, 2 * P, C, P)
        _store_pieces(q_ptr, s_ptr, row, base, g0, g1, g2, FMAX, P)

    @triton.jit
    def gelu_quant_bwd3(dg_ptr, h_ptr, b_ptr, q_ptr, s_ptr, n, stride, C: tl.constexpr, FMAX: tl.constexpr,
            P: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = row * stride
        g0 = _gelu_grad_piece(dg_ptr, h_ptr, b_ptr, base, 0, C, P)
        g1 = _gelu_grad_piece(dg_ptr, h_ptr, b_ptr, base, P, C, P)
        g2 = _gelu_grad_piece(dg_ptr, h_ptr, b_ptr, base, 2 * P, C, P)
        _store_pieces(q_ptr, s_ptr, row, base, g0, g1, g2, FMAX, P)

    # named apart: profiler tables list Triton kernels by function name
    _kernels = (triton.next_power_of_2, gelu_quant_fwd, gelu_quant_bwd, gelu_quant_fwd3, gelu_quant_bwd3)
    return _kernels


def three_pieces(n: int) -> bool:
    """Whether a row of width ``n`` runs through the three-piece kernels (:data:`PIECES`): ``n`` = 3 × a power of
    two of at least 16 (Triton's smallest block); the loads and stores then need no mask."""
    piece = n // 3
    return n % 3 == 0 and piece >= 16 and piece & (piece - 1) == 0


def _launch(kernel_index: int, *tensors: torch.Tensor, like: torch.Tensor):
    next_pow2, *kernels = _triton_kernels()
    m, n = like.shape
    q = torch.empty(m, n, device=like.device, dtype=FP8)
    s = torch.empty(m, 1, device=like.device, dtype=torch.float32)
    if PIECES and three_pieces(n):
        warps = NUM_WARPS or 8  # session 36: 8 the fastest of 4-32 both ways
        kernels[kernel_index + 2][(m,)](*tensors, q, s, n, n, C=_C, FMAX=FP8_MAX, P=n // 3, num_warps=warps)
        return q, s
    block = next_pow2(n)
    # session 29, H200, [4096, 12288]: forward 8 warps 68.9 µs (16: 72.8, 32: 73.1), backward 32 warps 93.5 µs
    # (16: 101.2, 8: 117.8); inductor's kernels 116.3 and 154.6 (docs/benchmarks.md)
    warps = NUM_WARPS or ((8, 32)[kernel_index] if block >= 8192 else 8)
    kernels[kernel_index][(m,)](*tensors, q, s, n, n, C=_C, FMAX=FP8_MAX, BLOCK=block, num_warps=warps)
    return q, s




@functools.cache
def _ops():
    """The two operators, registered on first use (a second copy of this package, e.g. under another ComfyUI folder
    name, reuses the registered ones: ``cast_linear.registered_ops``)."""
    existing = registered_ops("gelu_quant_rows", "gelu_backward_quant_rows")
    if existing is not None:
        return existing

    @torch.library.custom_op(f"{NAMESPACE}::gelu_quant_rows", mutates_args=())
    def fwd(h: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if h.is_cuda:
            return _launch(0, h.contiguous(), b.contiguous(), like=h)
        return quantize_rows(gelu_tanh_sigmoid(h + b))

    @fwd.register_fake
    def _(h, b):
        return h.new_empty(h.shape, dtype=FP8), h.new_empty((h.shape[0], 1), dtype=torch.float32)

    @torch.library.custom_op(f"{NAMESPACE}::gelu_backward_quant_rows", mutates_args=())
    def bwd(dg: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if dg.is_cuda:
            return _launch(1, dg.contiguous(), h.contiguous(), b.contiguous(), like=dg)
        return quantize_rows(gelu_tanh_sigmoid_backward(dg, h + b))

    @bwd.register_fake
    def _(dg, h, b):
        return dg.new_empty(dg.shape, dtype=FP8), dg.new_empty((dg.shape[0], 1), dtype=torch.float32)

    return fwd, bwd


def gelu_quant_rows(h: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows(gelu_tanh_sigmoid(h + b))`` for ``h`` [M, N] and ``b`` [N] (bf16): fp8 [M, N] and float32
    scales [M, 1]; one custom operator (a Triton kernel on CUDA)."""
    return _ops()[0](h, b)


def gelu_backward_quant_rows(dg: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of ``gelu_tanh_sigmoid(h + b)`` for an incoming ``dg`` (bf16, as autograd gives it), quantized
    per row: fp8 [M, N] and float32 scales [M, 1]; one custom operator (a Triton kernel on CUDA)."""
    return _ops()[1](dg, h, b)


def _product(aq: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
             fast_accum: bool = False) -> torch.Tensor:
    """:func:`.fp8.scaled_product` in bf16, as :func:`.fp8._scaled_rows` returns it for bf16 inputs."""
    return scaled_product(aq, a_scale, b_q, b_scale, fast_accum=fast_accum).to(torch.bfloat16)


class _Fp8GeluMlp(torch.autograd.Function):
    """``fc2(gelu(fc1(x)))`` for two :class:`~.fp8.Fp8Linear` with backward copies: the products as
    :func:`.fp8._scaled_rows` does them, the GELU and the quantizations between them in :func:`gelu_quant_rows`
    and :func:`gelu_backward_quant_rows`. ``x`` is [M, K] with M a multiple of 16 (``_scaled_mm``); no gradient for
    the frozen weights and biases. ``fast``: each layer's ``fast_accum`` (forward) and ``fast_accum_backward``, as
    ``(fc1, fc2, fc1 backward, fc2 backward)``."""

    @staticmethod
    def forward(ctx, x, w1_q, w1_s, b1, w1t_q, w1t_s, w2_q, w2_s, b2, w2t_q, w2t_s, fast=(False,) * 4):
        xq, xs = quantize_rows(x)
        h = _product(xq, xs, w1_q.t(), w1_s.view(1, -1), fast[0])
        gq, gs = gelu_quant_rows(h, b1)
        y = _product(gq, gs, w2_q.t(), w2_s.view(1, -1), fast[1]) + b2
        ctx.save_for_backward(h, b1, w1t_q, w1t_s, w2t_q, w2t_s)
        ctx.fast = fast
        return y

    @staticmethod
    def backward(ctx, dy):
        h, b1, w1t_q, w1t_s, w2t_q, w2t_s = ctx.saved_tensors
        dyq, dys = quantize_rows(dy)
        dg = _product(dyq, dys, w2t_q.t(), w2t_s.view(1, -1), ctx.fast[3])
        dhq, dhs = gelu_backward_quant_rows(dg, h, b1)
        dx = _product(dhq, dhs, w1t_q.t(), w1t_s.view(1, -1), ctx.fast[2])
        return (dx,) + (None,) * 11


def _fusable(mlp) -> tuple[Fp8Linear, Fp8Linear] | None:
    net = getattr(mlp, "net", None)
    if net is None or len(net) != 3:
        return None
    act, drop, fc2 = net
    fc1 = getattr(act, "proj", None)
    if (type(act).__name__ != "GELU" or getattr(act, "approximate", None) != "tanh"
            or not isinstance(drop, torch.nn.Dropout) or drop.p != 0.0):
        return None
    layers = (fc1, fc2)
    if not all(type(layer) is Fp8Linear and layer.wt_q is not None and layer.bias is not None for layer in layers):
        return None
    if fc1.compute_dtype != torch.bfloat16 or fc2.compute_dtype != torch.bfloat16:
        return None
    return fc1, fc2


def _forward(mlp, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    fc1, fc2 = mlp.net[0].proj, mlp.net[2]
    lead, k = hidden_states.shape[:-1], hidden_states.shape[-1]
    x = hidden_states.to(torch.bfloat16).reshape(-1, k)
    m = x.shape[0]
    pad = (-m) % 16
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    y = _Fp8GeluMlp.apply(x, fc1.w_q, fc1.w_scale, fc1.bias, fc1.wt_q, fc1.wt_scale,
                          fc2.w_q, fc2.w_scale, fc2.bias, fc2.wt_q, fc2.wt_scale,
                          (fc1.fast_accum, fc2.fast_accum, fc1.fast_accum_backward, fc2.fast_accum_backward))
    return (y[:m] if pad else y).view(*lead, fc2.out_features)


def install(transformer) -> int:
    """Route each image-stream MLP of ``transformer``'s blocks that qualifies (see the module docstring) through
    :class:`_Fp8GeluMlp`; returns how many."""
    _ops()  # registered here, outside any compiled region (the first forward may be dynamo's trace)
    n = 0
    for block in getattr(transformer, "transformer_blocks", ()):
        mlp = getattr(block, "img_mlp", None)
        if mlp is not None and _fusable(mlp) is not None:
            mlp.forward = _forward.__get__(mlp)
            n += 1
    return n


def installed(mlp) -> bool:
    """Whether :func:`install` routed this MLP."""
    return getattr(mlp.__dict__.get("forward"), "__func__", None) is _forward


def uninstall(transformer) -> int:
    """Give each routed MLP of ``transformer`` its own forward back; returns how many."""
    n = 0
    for block in getattr(transformer, "transformer_blocks", ()):
        mlp = getattr(block, "img_mlp", None)
        if mlp is not None and installed(mlp):
            del mlp.forward
            n += 1
    return n
