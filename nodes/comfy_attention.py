"""The training forward's attention: ComfyUI's, with torch's SDPA preferring cuDNN's fused kernels.

ComfyUI chooses SDPA's kernel through a priority list that it set for inference and that changed between versions:
0.3.64 puts cuDNN first, 0.33 flash attention. In training the backward dominates, and on an H200 at 1024² the
node's step spent 102 ms in flash attention's backward (60 calls, 1.7 ms each; a kernel profile of the step on
ComfyUI 0.33, ``docs/benchmarks.md``); the core trains with cuDNN's (``attention_backend: _native_cudnn``).
The node hands :func:`training_attention` to ComfyUI as ``transformer_options["optimized_attention_override"]``
(ComfyUI's hook for replacing attention, ``comfy.ldm.modules.attention.wrap_attn``; nothing patched) for its
training forward only; sampling keeps ComfyUI's choice.

It computes what ComfyUI's ``attention_pytorch`` computes for the calls Qwen-Image's blocks make (no mask, no GQA,
no precision override; q/k/v as ``[b, seq, heads*dim]`` or, with ``skip_reshape``, ``[b, heads, seq, dim]``): one
``F.scaled_dot_product_attention`` call, on a GPU with cuDNN first in SDPA's priority (on a CPU torch's own choice,
as ComfyUI's there). Any other call goes to ComfyUI's own function.
"""

from __future__ import annotations

import torch.nn.functional as F


def _priority():
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def training_attention(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                       skip_output_reshape=False, **kwargs):
    """``optimized_attention_override(func, *args, **kwargs)``: ``func`` is the attention ComfyUI chose."""
    plain = (mask is None and attn_precision is None and not skip_output_reshape and not kwargs.get("enable_gqa")
             and q.shape == k.shape == v.shape)
    if not plain:
        return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                    skip_output_reshape=skip_output_reshape, **kwargs)
    from torch.nn.attention import sdpa_kernel

    if skip_reshape:
        b, _, _, dim_head = q.shape
    else:
        b, _, inner = q.shape
        dim_head = inner // heads
        q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    extra = {"scale": kwargs["scale"]} if kwargs.get("scale") is not None else {}
    if q.is_cuda:
        with sdpa_kernel(_priority(), set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False, **extra)
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False, **extra)
    return out.transpose(1, 2).reshape(b, -1, heads * dim_head)


__all__ = ["training_attention"]
