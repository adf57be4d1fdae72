"""diffusers' Qwen-Image transformer built over weights another program already loaded (ComfyUI's DiT), sharing
them instead of copying.

ComfyUI's Qwen-Image DiT is a port of diffusers' ``QwenImageTransformer2DModel`` with the same module names, so a
diffusers transformer can be assembled around its tensors: every ``Linear`` becomes a
:class:`~qwen_zero_prior.training.cast_linear.StoredLinear` over the source's weight and bias (fp8 storage kept and
cast per use, as ComfyUI casts it), every other parameter (the RMSNorms' weights) is the source's, cast to the
compute dtype where it is stored in fp8. The training node then trains it with the core's speed path (peft LoRA,
fp8 matmuls, regional compile with CUDA graphs, cuDNN attention; ``diffusers_backend.accelerate_transformer``).

One difference of conventions is bridged: the image tokens' RoPE positions along an odd side. ComfyUI centres them
as ``-(n // 2) .. n - 1 - n // 2``; diffusers' ``QwenEmbedRope`` as ``-(n - n // 2) .. n // 2 - 1`` (one lower).
Even sides (1024² and every multiple of 32) agree. :class:`CenteredRope` gives ComfyUI's positions, so the
transformer computes what ComfyUI's forward computes on every bucket.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from .cast_linear import StoredLinear

logger = logging.getLogger(__name__)


class SharedDiTError(ValueError):
    """The source's modules do not match diffusers' Qwen-Image transformer (names, shapes, extra parameters)."""


def _rope_class():
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    class CenteredRope(QwenEmbedRope):
        """``QwenEmbedRope`` with ComfyUI's positions along odd sides (see the module docstring)."""

        @functools.lru_cache(maxsize=128)  # noqa: B019 (as the parent's: one instance per transformer)
        def _compute_video_freqs(self, frame: int, height: int, width: int, idx: int = 0,
                                 device: torch.device = None) -> torch.Tensor:
            pos_freqs, neg_freqs = (self._get_device_freqs(device) if device is not None
                                    else (self.pos_freqs, self.neg_freqs))
            freqs_pos = pos_freqs.split([x // 2 for x in self.axes_dim], dim=1)
            freqs_neg = neg_freqs.split([x // 2 for x in self.axes_dim], dim=1)

            def axis(i: int, n: int) -> torch.Tensor:
                neg = freqs_neg[i][freqs_neg[i].shape[0] - n // 2:]  # positions -(n // 2) .. -1 (none for n = 1)
                return torch.cat([neg, freqs_pos[i][: n - n // 2]], dim=0)

            freqs_frame = freqs_pos[0][idx: idx + frame].view(frame, 1, 1, -1).expand(frame, height, width, -1)
            freqs_height = axis(1, height).view(1, height, 1, -1).expand(frame, height, width, -1)
            freqs_width = axis(2, width).view(1, 1, width, -1).expand(frame, height, width, -1)
            freqs = torch.cat([freqs_frame, freqs_height, freqs_width], dim=-1).reshape(frame * height * width, -1)
            return freqs.clone().contiguous()

    return CenteredRope


def centered_rope(theta: int, axes_dim: list[int]) -> nn.Module:
    return _rope_class()(theta=theta, axes_dim=list(axes_dim), scale_rope=True)


def _module(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def build_over(source: nn.Module, config: dict, compute_dtype: torch.dtype) -> nn.Module:
    """A diffusers ``QwenImageTransformer2DModel(**config)`` whose tensors are ``source``'s (same module names):
    ``Linear`` layers as :class:`StoredLinear` sharing the stored weight and bias, the other parameters shared or,
    when not in a float dtype the model can compute with (fp8), cast to ``compute_dtype``. Raises
    :class:`SharedDiTError` naming the first module that does not match, or a source parameter left unused."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    with init_empty_weights():  # parameters on the meta device; the RoPE tables (plain tensors) stay real
        model = QwenImageTransformer2DModel(**config)
    model.pos_embed = centered_rope(10000, list(config.get("axes_dims_rope", (16, 56, 56))))
    used: set[int] = set()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear):
            src = _module(source, name)
            w = getattr(src, "weight", None)
            if not isinstance(w, torch.Tensor) or tuple(w.shape) != (mod.out_features, mod.in_features):
                raise SharedDiTError(f"{name}: diffusers expects a Linear {mod.out_features}x{mod.in_features}, "
                                     f"the source has {type(src).__name__ if src is not None else 'nothing'}"
                                     + (f" with weight {tuple(w.shape)}" if isinstance(w, torch.Tensor) else ""))
            bias = getattr(src, "bias", None)
            if (bias is None) != (mod.bias is None):
                raise SharedDiTError(f"{name}: bias {'missing' if bias is None else 'unexpected'} in the source")
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, StoredLinear(w, bias, compute_dtype))
            used.update(id(t) for t in (w, bias) if t is not None)
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            full = f"{name}.{pname}" if name else pname
            src_mod = _module(source, name) if name else source
            sp = getattr(src_mod, pname, None) if src_mod is not None else None
            if not isinstance(sp, torch.Tensor) or sp.shape != p.shape:
                raise SharedDiTError(f"{full}: diffusers expects {tuple(p.shape)}, the source has "
                                     f"{tuple(sp.shape) if isinstance(sp, torch.Tensor) else 'nothing'}")
            used.add(id(sp))
            if sp.dtype.itemsize < 2:  # fp8-stored norms (UNETLoader's fp8 weight_dtype): computed in compute_dtype
                sp = sp.detach().to(compute_dtype)
            mod._parameters[pname] = sp if isinstance(sp, nn.Parameter) else nn.Parameter(sp, requires_grad=False)
    left = [n for n, p in source.named_parameters() if id(p) not in used]
    if left:
        raise SharedDiTError(f"{len(left)} parameters of the source have no place in diffusers' Qwen-Image "
                             f"transformer, e.g. {left[0]} (another variant of the model?)")
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise SharedDiTError(f"{len(meta)} parameters were not found in the source, e.g. {meta[0]}")
    model.requires_grad_(False)
    return model


def rebind(model: nn.Module, source: nn.Module) -> int:
    """Point ``model``'s shared tensors (from :func:`build_over`, and ``fp8.Fp8Linear`` layers over e4m3-stored
    weights) at ``source``'s current ones again: after the program that owns ``source`` replaced parameter objects
    (e.g. ComfyUI reloading a model in inference mode, and the training node swapping those for ordinary tensors).
    Returns how many modules changed. Tensors the model holds copies of (fp8-stored norms cast to the compute dtype,
    fp8 matmul copies of non-fp8 weights) are left as they are: their values do not change."""
    from .fp8 import Fp8Linear

    changed = 0
    for name, mod in model.named_modules():
        if "lora_" in name:  # peft's trainable adapters: not the source's
            continue
        src = _module(source, name.removesuffix(".base_layer")) if name else source
        if isinstance(mod, Fp8Linear):
            w = getattr(src, "weight", None)
            if isinstance(w, torch.Tensor) and w.dtype == mod.w_q.dtype and w.data_ptr() != mod.w_q.data_ptr():
                mod.w_q = w.detach()
                changed += 1
            continue
        if isinstance(mod, StoredLinear):
            if src is not None and (mod.weight is not src.weight or mod.bias is not src.bias):
                mod.weight, mod.bias = src.weight, src.bias
                changed += 1
            continue
        if isinstance(mod, nn.Linear) or src is None:
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            sp = getattr(src, pname, None)
            if isinstance(sp, nn.Parameter) and sp is not p and sp.dtype.itemsize >= 2:
                mod._parameters[pname] = sp
                changed += 1
    return changed


__all__ = ["SharedDiTError", "build_over", "centered_rope", "rebind"]
