"""LoRA projections that share one input, with their ``A`` products as one matmul.

A transformer block feeds the same tensor to several adapted Linears: ``to_q``, ``to_k`` and ``to_v`` take the
normed hidden states, and Qwen-Image 2.1's SwiGLU feeds ``gate_layer`` and ``proj`` the same input. peft computes
each adapter on its own: ``lora_B(lora_A(x)) * scaling`` per layer, so at rank r three ``[M, K] x [K, r]``
products read ``x`` three times in the forward, and the backward runs three ``dA`` products over ``x`` and adds
three rank-r ``dx`` contributions. :func:`project` concatenates the layers' ``A`` matrices (``[3r, K]``) and runs
one product each way, then each layer's own ``B`` and scaling; the base layers (bf16 or
:class:`~qwen_zero_prior.training.fp8.Fp8Linear`) run as they are. The numbers are peft's: the same products and
casts (peft's ``_cast_input_dtype`` included), other kernels (float rounding apart: ~5e-7 of a gradient's scale in
float32, tested); the gradients reach each layer's own ``lora_A`` (a slice of the concatenation's), so the adapter,
its export and checkpoints are unchanged.

With :data:`FLOAT32_WEIGHT_GRADS` (off: in the compiled step on an H200 it measured no faster, session 33; the
bench's ``lora_fp32_grad=1`` turns it on) every ``A`` and ``B`` product runs through :func:`lora_product` instead:
the same forward as peft's under autocast, whose backward on CUDA writes each float32 weight's gradient straight from
the bf16 product (``torch.mm(..., out_dtype=torch.float32)``) instead of rounding it to bf16 and casting it back.
That is one kernel fewer a gradient and float32's precision (bench/lora_grad.py on an H200: 8.3-10.6 µs instead of
10.9-13.4 µs at the step's shapes, relative error ~3e-6 instead of ~3e-3), and one layer alone (``to_out``) takes the
same path.

With :data:`FUSED_DELTA` (on; the bench's ``lora_addmm=0`` turns it off) each layer's ``B`` product is
added to its base output by the product itself (:func:`lora_delta`: an in-place ``addmm`` into the base output,
cuBLAS's C), which saves writing and reading back a delta tensor and an add kernel where the output's consumer
cannot fuse the add (norm_rope's operator reads q and k); the fp8 layers then add their bias in their product's
epilogue (``fp8.BIAS_IN_PRODUCT``), so the base output is one kernel's.

Only plain LoRA takes it: every layer a peft ``LoraLayer`` with one active adapter, not merged or disabled, no
dropout, no variant (DoRA, ...), ``A`` and ``B`` without bias. Anything else calls the layers one by one, as peft
would.
:func:`install_swiglu` routes 2.1's ``QwenImage21SwiGLUFeedForward`` through it (instance attributes; undone by
:func:`uninstall_swiglu`); the 2.1 attention processor (``attention21.py``) uses it for q/k/v. Used with
``model.compile`` (as the GELU and RoPE rewrites are), where the saved kernels matter.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .cast_linear import NAMESPACE, registered_ops

# aten::mm.dtype (bf16/fp16 inputs, a float32 result): CUDA only, torch >= 2.9; looked up once, not while tracing
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")
# project() through lora_product (see the module docstring); off: no faster in the compiled step (session 33)
FLOAT32_WEIGHT_GRADS = False
# project(): each layer's B product added into its base output by the product itself (lora_delta); with
# fp8.BIAS_IN_PRODUCT and attention_qwen.BSHD_CUDNN 12.4 ms off an H200 step at 1024² (session 33; the bench's
# lora_addmm=0 turns both of the first two off)
FUSED_DELTA = True
_HALF = (torch.bfloat16, torch.float16)


def weight_grad(dy: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``dyᵀ x`` for 2-D ``dy`` [M, N] and ``x`` [M, K] in ``out_dtype``: on CUDA from half-precision operands into
    a float32 result directly (no bf16 rounding, no cast kernel); elsewhere as autograd computes it (the product in
    the operands' dtype, then cast)."""
    if _float32_product(dy, out_dtype):
        return torch.mm(dy.t(), x, out_dtype=torch.float32)
    return (dy.t() @ x).to(out_dtype)


def _float32_product(dy: torch.Tensor, out_dtype: torch.dtype) -> bool:
    return _MM_OUT_DTYPE and dy.is_cuda and out_dtype == torch.float32 and dy.dtype in _HALF


class _LoraProduct(torch.autograd.Function):
    """``F.linear(x, w)`` computed in ``dtype``; the backward gives ``x`` its gradient in ``x``'s dtype and ``w`` its
    own through :func:`weight_grad`."""

    @staticmethod
    def forward(ctx, x, w, dtype):
        xc, wc = x.to(dtype), w.to(dtype)
        ctx.save_for_backward(xc, wc)  # what autograd keeps for F.linear under autocast
        ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype
        return F.linear(xc, wc)

    @staticmethod
    def backward(ctx, dy):
        xc, wc = ctx.saved_tensors
        dy = dy.to(wc.dtype)
        dx = (dy @ wc).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dw = weight_grad(dy.reshape(-1, dy.shape[-1]), xc.reshape(-1, xc.shape[-1]), ctx.w_dtype)
        return dx, dw, None


def lora_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A LoRA ``A`` or ``B`` product, ``x @ wᵀ``, in the dtype peft's ``nn.Linear`` would compute it: autocast's
    where it is on, else the operands' promoted dtype."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(x.dtype, w.dtype)
    return _LoraProduct.apply(x, w, dtype)


@functools.cache
def _add_product_op():
    """``out += alpha * h @ wᵀ`` in place, as one mutating custom operator (registered on first use; a second copy
    of this package reuses it: ``cast_linear.registered_ops``). A mutating operator because inductor keeps it in
    place where the mutated tensor dies with it (its re-inplacing of functionalized operators); ``torch.addmm``
    out of place is a copy of ``out`` into a new buffer (cuBLAS's C) and then the product."""
    existing = registered_ops("lora_add_product_")
    if existing is not None:
        return existing[0]

    @torch.library.custom_op(f"{NAMESPACE}::lora_add_product_", mutates_args=("out",))
    def add_product_(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, alpha: float) -> None:
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), w.t(), alpha=alpha)

    @add_product_.register_fake
    def _(out, h, w, alpha):
        return None

    return add_product_


def register_ops() -> None:
    """Register this module's operator now: dynamo cannot trace its registration, so the processors that may call
    it register it when they are installed."""
    _add_product_op()


class _LoraDelta(torch.autograd.Function):
    """``result += scaling * F.linear(h, w)`` in place, one GEMM (cuBLAS's C is ``result`` itself), in
    ``result``'s dtype; the backward passes the incoming gradient to ``result`` as it is and gives ``h`` and ``w``
    theirs (``w``'s through :func:`weight_grad`)."""

    @staticmethod
    def forward(ctx, result, h, w, scaling):
        dtype = result.dtype
        hc, wc = h.to(dtype), w.to(dtype)
        ctx.save_for_backward(hc, wc)  # what autograd keeps for lora_B under autocast
        ctx.h_dtype, ctx.w_dtype, ctx.scaling = h.dtype, w.dtype, scaling
        getattr(torch.ops, NAMESPACE).lora_add_product_(result, hc, wc, float(scaling))
        ctx.mark_dirty(result)
        return result

    @staticmethod
    def backward(ctx, dy):
        hc, wc = ctx.saved_tensors
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1]).to(wc.dtype)
        dh = dw = None
        if ctx.needs_input_grad[1]:
            dh = dy2 @ wc
            dh = (dh if s == 1 else dh * s).view(*dy.shape[:-1], wc.shape[1]).to(ctx.h_dtype)
        if ctx.needs_input_grad[2]:
            dw = weight_grad(dy2, hc.reshape(-1, hc.shape[-1]), ctx.w_dtype)
            dw = dw if s == 1 else dw * s
        return (dy if ctx.needs_input_grad[0] else None), dh, dw, None


def lora_delta(result: torch.Tensor, h: torch.Tensor, w: torch.Tensor, scaling: float) -> torch.Tensor:
    """``result + lora_B(h) * scaling`` (peft's add of a LoRA ``B`` product to the base layer's output, bias-free
    ``B`` of weight ``w``) as one GEMM into ``result`` (which it overwrites and returns: the base layer's fresh
    output, which nothing else reads): no delta tensor written and read back, no add kernel (where ``result``'s
    consumer cannot take the add: norm_rope's operator reads q and k). The sum is computed in float32 and rounded
    once, where peft rounds the product, its scaling and the sum each to the compute dtype. Where ``result``'s dtype
    is not the one peft would compute the product in (autocast's, else the operands'), or it is not contiguous, a
    view (autograd refuses an in-place write into a view made inside a custom function, such as fp8's padded
    product) or a leaf that requires grad, peft's form (:func:`project` hands it 2-D outputs, which are no views)."""
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(h.dtype, w.dtype)
    if (result.dtype != dtype or result.shape[-1] != w.shape[0] or not result.is_contiguous()
            or result._base is not None  # a view (e.g. of a custom function's padded product): not in place
            or (result.is_leaf and result.requires_grad)):  # autograd cannot have a leaf written in place
        return (result + F.linear(h.to(dtype), w.to(dtype)) * scaling).to(result.dtype)
    if not torch.compiler.is_compiling():  # eager: registered on first use (compiled: by the processors' install)
        register_ops()
    return _LoraDelta.apply(result, h, w, scaling)


def _adapter(layers, products: bool = False) -> str | None:
    """The one active plain-LoRA adapter name all ``layers`` share, or None when they cannot be fused
    (``products``: for :func:`lora_product`, which also needs ``B`` without bias)."""
    name = None
    for layer in layers:
        lora_a = getattr(layer, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or layer.disable_adapters or layer.merged:
            return None
        active = [a for a in layer.active_adapters if a in lora_a]
        if len(active) != 1 or (name is not None and active[0] != name):
            return None
        name = active[0]
        if (name in getattr(layer, "lora_variant", {}) or not isinstance(layer.lora_dropout[name], nn.Identity)
                or lora_a[name].bias is not None or (products and layer.lora_B[name].bias is not None)):
            return None
    return name


def project(x: torch.Tensor, layers) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]``, with the LoRA ``A`` products as one matmul where the layers qualify (and,
    with :data:`FLOAT32_WEIGHT_GRADS`, every ``A`` / ``B`` product through :func:`lora_product`, one layer too)."""
    products, fused = FLOAT32_WEIGHT_GRADS, FUSED_DELTA
    name = _adapter(layers, products or fused) if products or fused or len(layers) > 1 else None
    if name is None:
        return [layer(x) for layer in layers]
    a_weights = [layer.lora_A[name].weight for layer in layers]
    cast = getattr(layers[0], "_cast_input_dtype", None)  # peft's cast to the adapter's dtype (older peft: .to)
    xa = cast(x, a_weights[0].dtype) if cast is not None else x.to(a_weights[0].dtype)
    a = torch.cat(a_weights) if len(a_weights) > 1 else a_weights[0]
    h = lora_product(xa, a) if products else F.linear(xa, a)
    outs = []
    x2 = x.reshape(-1, x.shape[-1])  # fused: in 2-D, the base output is its product's own tensor (no view)
    for layer, hi in zip(layers, h.split([w.shape[0] for w in a_weights], dim=-1)):
        if fused:
            result = layer.base_layer(x2)
            out = lora_delta(result, hi.reshape(-1, hi.shape[-1]), layer.lora_B[name].weight, layer.scaling[name])
            outs.append(out.view(*x.shape[:-1], out.shape[-1]))
            continue
        result = layer.base_layer(x)
        delta = lora_product(hi, layer.lora_B[name].weight) if products else layer.lora_B[name](hi)
        outs.append((result + delta * layer.scaling[name]).to(result.dtype))
    return outs


def _swiglu_forward(mlp, hidden_states: torch.Tensor) -> torch.Tensor:
    # diffusers 0.42's QwenImage21SwiGLUFeedForward.forward: out(act(gate_layer(x)) * proj(x))
    gate, up = project(hidden_states, (mlp.gate_layer, mlp.proj))
    return project(mlp.activation_fn(gate) * up, (mlp.out,))[0]


def install_swiglu(transformer) -> int:
    """Route each 2.1 SwiGLU feed-forward of ``transformer`` through :func:`project`; returns how many."""
    n = 0
    register_ops()
    for block in getattr(transformer, "transformer_blocks", ()):
        mlp = getattr(block, "img_mlp", None)
        if type(mlp).__name__ == "QwenImage21SwiGLUFeedForward":
            mlp.forward = _swiglu_forward.__get__(mlp)
            n += 1
    return n


def uninstall_swiglu(transformer) -> int:
    n = 0
    for block in getattr(transformer, "transformer_blocks", ()):
        mlp = getattr(block, "img_mlp", None)
        if mlp is not None and getattr(mlp.__dict__.get("forward"), "__func__", None) is _swiglu_forward:
            del mlp.forward
            n += 1
    return n


__all__ = ["install_swiglu", "lora_delta", "lora_product", "project", "register_ops", "uninstall_swiglu",
           "weight_grad"]
