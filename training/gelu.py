"""Qwen-Image's tanh-approximated GELU as ``x · sigmoid(2z)``, for the compiled transformer blocks.

``0.5 · x · (1 + tanh(z))`` with ``z = √(2/π) · (x + 0.044715 x³)`` equals ``x · sigmoid(2z)``, since
``(1 + tanh z) / 2 = sigmoid(2z)``. TorchInductor emits ``tanh`` as a libdevice call of ~25 instructions with
two branches, and with ``model.fp8_matmul`` the MLP activation is computed inside the arithmetic-bound kernel
that also quantizes its output per row (twice: once for the row maximum, once to store), forward and backward.
``sigmoid`` is one fast exponential and a division.

:func:`install` sets the ``gelu`` method of each diffusers ``GELU(approximate="tanh")`` module of one model
(instance attributes: the class and other models are untouched); computed in float32 like ATen's kernel.
Only used with ``model.compile`` (eagerly it would be several kernels instead of one). The tests compare it
with ``F.gelu(approximate="tanh")``, values and gradients.
"""

from __future__ import annotations

import math

import torch

_C = 2.0 * math.sqrt(2.0 / math.pi)


def gelu_tanh_sigmoid(gate: torch.Tensor) -> torch.Tensor:
    x = gate.float()
    return (x * torch.sigmoid(_C * (x + 0.044715 * x * x * x))).to(gate.dtype)


def install(model: torch.nn.Module) -> int:
    """Route ``model``'s tanh-GELU activations through :func:`gelu_tanh_sigmoid`; returns how many."""
    from diffusers.models.activations import GELU

    n = 0
    for m in model.modules():
        if isinstance(m, GELU) and m.approximate == "tanh":
            m.gelu = gelu_tanh_sigmoid
            n += 1
    return n


def uninstall(model: torch.nn.Module) -> None:
    from diffusers.models.activations import GELU

    for m in model.modules():
        if isinstance(m, GELU) and m.__dict__.get("gelu") is gelu_tanh_sigmoid:
            del m.gelu
