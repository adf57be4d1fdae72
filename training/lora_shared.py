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

With :data:`FLOAT32_WEIGHT_GRADS` (off: not yet measured in the training step on a GPU; the bench's
``lora_fp32_grad=1`` turns it on) every ``A`` and ``B`` product runs through :func:`lora_product` instead: the same
forward as peft's under autocast, whose backward on CUDA writes each float32 weight's gradient straight from the bf16
product (``torch.mm(..., out_dtype=torch.float32)``) instead of rounding it to bf16 and casting it back. That is one
kernel fewer a gradient and float32's precision (bench/lora_grad.py on an H200: 8.3-10.6 µs instead of 10.9-13.4 µs
at the step's shapes, relative error ~3e-6 instead of ~3e-3), and one layer alone (``to_out``) takes the same path.

Only plain LoRA takes it: every layer a peft ``LoraLayer`` with one active adapter, not merged or disabled, no
dropout, no variant (DoRA, ...), ``A`` and ``B`` without bias. Anything else calls the layers one by one, as peft
would.
:func:`install_swiglu` routes 2.1's ``QwenImage21SwiGLUFeedForward`` through it (instance attributes; undone by
:func:`uninstall_swiglu`); the 2.1 attention processor (``attention21.py``) uses it for q/k/v. Used with
``model.compile`` (as the GELU and RoPE rewrites are), where the saved kernels matter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# aten::mm.dtype (bf16/fp16 inputs, a float32 result): CUDA only, torch >= 2.9; looked up once, not while tracing
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")
# project() through lora_product (see the module docstring); off until the compiled step has been measured with it
FLOAT32_WEIGHT_GRADS = False
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
    products = FLOAT32_WEIGHT_GRADS
    name = _adapter(layers, products) if products or len(layers) > 1 else None
    if name is None:
        return [layer(x) for layer in layers]
    a_weights = [layer.lora_A[name].weight for layer in layers]
    cast = getattr(layers[0], "_cast_input_dtype", None)  # peft's cast to the adapter's dtype (older peft: .to)
    xa = cast(x, a_weights[0].dtype) if cast is not None else x.to(a_weights[0].dtype)
    a = torch.cat(a_weights) if len(a_weights) > 1 else a_weights[0]
    h = lora_product(xa, a) if products else F.linear(xa, a)
    outs = []
    for layer, hi in zip(layers, h.split([w.shape[0] for w in a_weights], dim=-1)):
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


__all__ = ["install_swiglu", "lora_product", "project", "uninstall_swiglu", "weight_grad"]
