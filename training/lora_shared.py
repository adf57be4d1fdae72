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

Only plain LoRA fuses: every layer a peft ``LoraLayer`` with one active adapter, not merged or disabled, no
dropout, no variant (DoRA, ...), ``A`` without bias. Anything else calls the layers one by one, as peft would.
:func:`install_swiglu` routes 2.1's ``QwenImage21SwiGLUFeedForward`` through it (instance attributes; undone by
:func:`uninstall_swiglu`); the 2.1 attention processor (``attention21.py``) uses it for q/k/v. Used with
``model.compile`` (as the GELU and RoPE rewrites are), where the saved kernels matter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _adapter(layers) -> str | None:
    """The one active plain-LoRA adapter name all ``layers`` share, or None when they cannot be fused."""
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
                or lora_a[name].bias is not None):
            return None
    return name


def project(x: torch.Tensor, layers) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]``, with the LoRA ``A`` products as one matmul where they fuse."""
    name = _adapter(layers) if len(layers) > 1 else None
    if name is None:
        return [layer(x) for layer in layers]
    a_weights = [layer.lora_A[name].weight for layer in layers]
    cast = getattr(layers[0], "_cast_input_dtype", None)  # peft's cast to the adapter's dtype (older peft: .to)
    xa = cast(x, a_weights[0].dtype) if cast is not None else x.to(a_weights[0].dtype)
    h = F.linear(xa, torch.cat(a_weights))
    outs = []
    for layer, hi in zip(layers, h.split([w.shape[0] for w in a_weights], dim=-1)):
        result = layer.base_layer(x)
        outs.append((result + layer.lora_B[name](hi) * layer.scaling[name]).to(result.dtype))
    return outs


def _swiglu_forward(mlp, hidden_states: torch.Tensor) -> torch.Tensor:
    # diffusers 0.42's QwenImage21SwiGLUFeedForward.forward: out(act(gate_layer(x)) * proj(x))
    gate, up = project(hidden_states, (mlp.gate_layer, mlp.proj))
    return mlp.out(mlp.activation_fn(gate) * up)


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


__all__ = ["install_swiglu", "project", "uninstall_swiglu"]
