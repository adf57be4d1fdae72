"""A frozen ``Linear`` over weights stored in another dtype (e.g. ComfyUI's fp8 files), cast for each use.

:func:`cast_linear_op` is ``F.linear(x, weight.to(x.dtype), bias.to(x.dtype))`` as a ``torch.library`` custom op
whose backward casts the stored weight again instead of keeping the cast: autograd (and, inside a compiled graph,
AOTAutograd) would otherwise keep every per-use cast until the backward (40 GB in bf16 for Qwen-Image's 20B
transformer stored in fp8). Frozen weights: only the input's gradient is computed. The op is opaque to inductor
(what surrounds it fuses) and is captured by CUDA graphs like any kernel.

:class:`StoredLinear` is an ``nn.Linear`` (so peft wraps it like any other) that shares a stored weight and bias
(no copy) and computes in ``compute_dtype`` through that op; with a weight already in ``compute_dtype`` it is
``F.linear``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

NAMESPACE = "qwen_zero_prior"  # the package's custom operators (cast_linear, gelu_fp8, norm_rope)
_NAMESPACE, _NAME = NAMESPACE, "cast_linear"


def registered_ops(*names: str) -> tuple | None:
    """The package's operators ``names`` where all are registered already (by a second copy of this package, e.g.
    under another ComfyUI folder name, whose semantics are the same: torch refuses a second registration), else
    None: register them."""
    ns = getattr(torch.ops, NAMESPACE) if hasattr(torch.ops, NAMESPACE) else None
    ops = tuple(getattr(ns, name, None) if ns is not None else None for name in names)
    return ops if all(op is not None for op in ops) else None


@functools.cache
def cast_linear_op():
    """The op (registered on first use; a second copy of this package reuses the registered one:
    :func:`registered_ops`)."""
    existing = registered_ops(_NAME)
    if existing is not None:
        return existing[0]

    @torch.library.custom_op(f"{_NAMESPACE}::{_NAME}", mutates_args=())
    def cast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @cast_linear.register_fake
    def _(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])  # the stored (e.g. fp8) weight: a parameter, nothing new kept

    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        return dy.matmul(weight.to(dy.dtype)), None, None

    cast_linear.register_autograd(backward, setup_context=setup_context)
    return cast_linear


def cast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The op's call, through ``torch.ops`` (what dynamo traces as an op; the Python function that registers it cannot
    be traced): register it first with :func:`cast_linear_op`, outside any compiled region."""
    return getattr(torch.ops, _NAMESPACE).cast_linear(x, weight, bias)


class StoredLinear(nn.Linear):
    """A frozen ``nn.Linear`` sharing ``weight`` (any float dtype, fp8 included) and ``bias``, computed in
    ``compute_dtype``: the input is cast to it (under autocast a preceding norm may hand over float32), the weight
    per use through :func:`cast_linear_op`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a weight of its own
        self.out_features, self.in_features = weight.shape
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = (bias if bias is None or isinstance(bias, nn.Parameter)
                     else nn.Parameter(bias, requires_grad=False))
        self.compute_dtype = compute_dtype
        cast_linear_op()  # registered now, outside any compiled region (dynamo cannot trace the registration)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        if self.weight.dtype == x.dtype and (self.bias is None or self.bias.dtype == x.dtype):
            return F.linear(x, self.weight, self.bias)
        return cast_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"stored={str(self.weight.dtype).removeprefix('torch.')}, "
                f"compute={str(self.compute_dtype).removeprefix('torch.')}")


__all__ = ["StoredLinear", "cast_linear", "cast_linear_op"]
