"""nodes/comfy_attention.py without a ComfyUI (the module imports torch only): the training forward's attention
equals plain softmax attention in both of ComfyUI's q/k/v layouts, and every call it does not cover goes to
ComfyUI's own function unchanged. The real-ComfyUI test (test_comfyui.py) runs it inside Qwen-Image's blocks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "zp_comfy_attention", Path(__file__).resolve().parents[1] / "nodes" / "comfy_attention.py")
attention = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(attention)


def _reference(q, k, v):  # [b, h, n, d] -> [b, n, h*d]
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    b, h, n, d = q.shape
    return (w @ v).transpose(1, 2).reshape(b, n, h * d)


def _never(*args, **kwargs):
    raise AssertionError("ComfyUI's attention was called for a call the override covers")


@pytest.mark.parametrize("skip_reshape", [True, False])
def test_training_attention_equals_softmax_attention(skip_reshape):
    g = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 3, 5, 8
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    args = (q, k, v) if skip_reshape else tuple(t.transpose(1, 2).reshape(b, n, h * d) for t in (q, k, v))
    out = attention.training_attention(_never, *args, h, skip_reshape=skip_reshape, transformer_options={})
    assert out.shape == (b, n, h * d)
    assert torch.allclose(out, _reference(q, k, v), atol=1e-5)


@pytest.mark.parametrize("extra", [{"mask": torch.zeros(5, 5)}, {"attn_precision": torch.float32},
                                   {"skip_output_reshape": True}, {"enable_gqa": True}])
def test_training_attention_leaves_other_calls_to_comfyui(extra):
    q = torch.randn(1, 2, 5, 4)
    seen = {}

    def comfy_attention(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        return "comfy"

    assert attention.training_attention(comfy_attention, q, q, q, 2, skip_reshape=True, **extra) == "comfy"
    assert seen["args"][3] == 2 and seen["kwargs"]["skip_reshape"] is True
    for key, value in extra.items():
        assert seen["kwargs"][key] is value
