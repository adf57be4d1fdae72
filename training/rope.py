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

:func:`install_tables` (opt-in; the bench's ``rope_tables=1``) goes one step further for Qwen-Image: its
``pos_embed`` output becomes real cos/sin tables once a forward, so the compiled blocks read no complex tensor at
all (inductor warns that it generates no code for complex operators where a block views them as real). The same
numbers, tested; whether it is faster is for a GPU to say (docs/benchmarks.md, "Session 28").
"""

from __future__ import annotations

import weakref

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


def tables(freqs_cis: torch.Tensor) -> torch.Tensor:
    """Real tables ``[S, 1, D, 2]`` (float32) of complex frequencies ``[S, D/2]``, per head dimension: the cosine
    (repeated over each interleaved pair) and the signed sine (``-s`` on a pair's first element, ``s`` on its
    second), so the rotation is ``x·cos + swap_pairs(x)·sin`` (see :func:`install_tables`)."""
    f = torch.view_as_real(freqs_cis).unsqueeze(1)  # [S, 1, D/2, 2]
    cos = f[..., 0:1].expand(*f.shape[:-1], 2).flatten(-2)
    sin = torch.stack([-f[..., 1], f[..., 1]], -1).flatten(-2)
    return torch.stack([cos, sin], -1)


def _is_tables(freqs) -> bool:
    # diffusers' RoPE takes complex frequencies with use_real=False and a (cos, sin) tuple with use_real=True, never
    # one real tensor: that is always :func:`tables`' output
    return isinstance(freqs, torch.Tensor) and not torch.is_complex(freqs) and freqs.dim() == 4 and freqs.shape[-1] == 2


def apply_rotary_emb_qwen_real(x, freqs_cis, use_real: bool = True, use_real_unbind_dim: int = -1):
    if not use_real and _is_tables(freqs_cis):
        cos, sin = freqs_cis.unbind(-1)  # [S, 1, D] each
        xf = x.float()
        swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (a, b) -> (b, a) in each interleaved pair
        return (xf * cos + swapped * sin).type_as(x)
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


# each Qwen-Image pos_embed given tables -> its hook's handle (weak: a transformer dropped takes its entry along)
_table_hooks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def install_tables(transformer) -> bool:
    """Have a Qwen-Image transformer's ``pos_embed`` hand its blocks :func:`tables` instead of complex frequencies,
    built once a forward (eagerly, before the compiled blocks): the blocks then rotate with real tables (the same
    numbers; tested) and read no complex tensor, for which inductor generates no code. Routes diffusers' RoPE through
    :func:`apply_rotary_emb_qwen_real` (only it reads tables); :func:`uninstall` removes both. Returns whether the
    hook was added (False for another model than Qwen-Image's transformer, or where it is already there)."""
    pos_embed = getattr(transformer, "pos_embed", None)
    # Qwen-Image's only: Qwen-Image 2.1's blocks call their own module's RoPE, which install() here does not route
    if type(transformer).__module__ != QWEN_IMAGE_MODULE or pos_embed is None or pos_embed in _table_hooks:
        return False
    install(QWEN_IMAGE_MODULE)

    def to_tables(module, args, kwargs, out):
        if not isinstance(out, tuple):  # not the (image, text) frequencies this follows: left as it is
            return out
        return tuple(tables(f) if isinstance(f, torch.Tensor) and torch.is_complex(f) else f for f in out)

    _table_hooks[pos_embed] = pos_embed.register_forward_hook(to_tables, with_kwargs=True)
    return True


def tables_installed(transformer) -> bool:
    """Whether :func:`install_tables` hooked this transformer's ``pos_embed``."""
    pos_embed = getattr(transformer, "pos_embed", None)
    return pos_embed is not None and pos_embed in _table_hooks


def uninstall_tables(transformer) -> bool:
    """Remove :func:`install_tables`' hook from this transformer (the RoPE routing stays). Returns whether it was
    there."""
    pos_embed = getattr(transformer, "pos_embed", None)
    handle = _table_hooks.pop(pos_embed, None) if pos_embed is not None else None
    if handle is not None:
        handle.remove()
    return handle is not None


def uninstall() -> None:
    for handle in list(_table_hooks.values()):  # tables reach only the real form: they go first
        handle.remove()
    _table_hooks.clear()
    for name, mod in _loaded_modules():
        original = _originals.get(name)
        if original is not None and mod.apply_rotary_emb_qwen is apply_rotary_emb_qwen_real:
            mod.apply_rotary_emb_qwen = original
