"""Qwen-Image's (and Qwen-Image 2.1's) rotary embedding in real arithmetic, for the compiled transformer blocks.

diffusers applies Qwen-Image's RoPE (``apply_rotary_emb_qwen(..., use_real=False)``) by viewing q/k as complex
numbers and multiplying by complex frequencies. TorchInductor has no code generation for complex tensors, so
inside ``compile_repeated_blocks`` those become separate eager kernels on float32 copies of q and k (~8 ms of
an H200 training step at 1024², plus the copies), instead of being fused with the q/k RMSNorm before them.

:func:`apply_rotary_emb_qwen_real` computes the same products, ``(a + ib)(c + is) = (ac - bs) + i(as + bc)``
on the interleaved pairs, in float32 like the original, with real tensors only. :func:`install` points
diffusers' module-level function at it (the attention processor looks it up at call time); every other call
form is passed through to the original unchanged. Qwen-Image 2.1's transformer module carries a copy of the same
function (its RoPE tables are complex too) and can be routed the same way (``install(QWEN_IMAGE_21_MODULE)``); the
tests check it against the original, values and gradients, for both families. Training routes both under
``model.compile``: torch 2.11's inductor failed compiling this form's backward over 2.1's joint text+image sequence
(``InductorError: CantSplit``, an H200 in session 5) through a bug of its own that ``compile_fixes.py`` works around
(with it, the same step compiled and trained on the H200 in session 6).
"""

from __future__ import annotations

import torch

# diffusers modules whose module-level ``apply_rotary_emb_qwen`` the attention processors call: Qwen-Image's and
# Qwen-Image 2.1's (a "Copied from" of the same function, same call forms)
QWEN_IMAGE_MODULE = "diffusers.models.transformers.transformer_qwenimage"
QWEN_IMAGE_21_MODULE = "diffusers.models.transformers.transformer_qwenimage21"
_MODULES = (QWEN_IMAGE_MODULE, QWEN_IMAGE_21_MODULE)
_originals: dict[str, object] = {}


def _loaded_modules(names=_MODULES):
    import importlib

    for name in names:
        try:
            yield name, importlib.import_module(name)
        except ImportError:  # a diffusers without Qwen-Image 2.1 (< 0.41): only Qwen-Image's is there
            continue


def _original(x, freqs_cis, use_real, use_real_unbind_dim):
    # every module's original is the same function (2.1's is a copy of Qwen-Image's): any one of them serves
    return next(iter(_originals.values()))(x, freqs_cis, use_real, use_real_unbind_dim)


def apply_rotary_emb_qwen_real(x, freqs_cis, use_real: bool = True, use_real_unbind_dim: int = -1):
    if use_real or not torch.is_complex(freqs_cis):
        return _original(x, freqs_cis, use_real, use_real_unbind_dim)
    f = torch.view_as_real(freqs_cis).unsqueeze(1)  # [S, 1, D/2, 2], as freqs_cis.unsqueeze(1) in the original
    cos, sin = f[..., 0], f[..., 1]
    a, b = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(3)
    return out.type_as(x)


def install(*modules: str) -> bool:
    """Route the RoPE of diffusers' ``modules`` (default: Qwen-Image's) through :func:`apply_rotary_emb_qwen_real`
    (idempotent). Returns whether any module was changed."""
    changed = False
    for name, mod in _loaded_modules(modules or (QWEN_IMAGE_MODULE,)):
        if mod.apply_rotary_emb_qwen is apply_rotary_emb_qwen_real:
            continue
        _originals[name] = mod.apply_rotary_emb_qwen
        mod.apply_rotary_emb_qwen = apply_rotary_emb_qwen_real
        changed = True
    return changed


def installed() -> bool:
    """Whether any loaded diffusers module's RoPE is routed through :func:`apply_rotary_emb_qwen_real`."""
    return any(mod.apply_rotary_emb_qwen is apply_rotary_emb_qwen_real for _, mod in _loaded_modules())


def uninstall() -> None:
    for name, mod in _loaded_modules():
        original = _originals.get(name)
        if original is not None and mod.apply_rotary_emb_qwen is apply_rotary_emb_qwen_real:
            mod.apply_rotary_emb_qwen = original
