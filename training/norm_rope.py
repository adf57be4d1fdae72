"""Qwen-Image's q/k RMSNorm, RoPE and joint concatenation in one hand-written kernel each way.

Each attention block normalizes its image and text queries and keys per head (diffusers' ``RMSNorm`` over the
head's 128 dimensions, bf16 weight), rotates them (Qwen-Image's interleaved-pair RoPE, :mod:`.rope`'s real form)
and concatenates the text and image streams for the joint attention. In the compiled block inductor makes of this
a looped reduction forward and one backward that took 87 and 128 µs a block on an H200 at 1024² (session 27's
kernel table, ~13 ms a step), where their bytes take ~20-40 µs, plus the concatenation's copies.

:func:`joint` computes the same as one custom operator a direction (:func:`norm_rope_joint` and its backward): on
CUDA one Triton program per token row, stream and group of :data:`HEADS_PER_PROGRAM` heads (each head's norm is
its own; all of a row's heads, padded to a power of two, until session 36), writing straight into the joint
``[B, S_txt + S_img, H, D]`` tensor; elsewhere the reference PyTorch code, the same operations in the same
order as diffusers' ``RMSNorm`` and :func:`.rope.apply_rotary_emb_qwen_real` (equal on the CPU, tested), and a
written-out backward with autograd's roundings (within bf16 rounding of autograd's, tested). The norms' weights
are frozen (LoRA never targets them): no weight gradient.

:func:`install` turns it on for the Qwen-Image attention processors of :mod:`.attention_qwen` whose four norms
qualify (diffusers' ``RMSNorm``, frozen bf16 weight, no bias); training installs it with ``model.compile``
(``diffusers_backend.accelerate_transformer``), as the other rewrites. :func:`uninstall` turns it off. On an H200 at
1024² under the 78 GiB cap it took 8.9 ms off a step (277.4 against 286.3 ms, session 30).
"""

from __future__ import annotations

import functools

import torch

from .cast_linear import NAMESPACE, registered_ops

_kernels = None
NUM_WARPS: int | None = None  # warps a program gets; None: see _launch_shape (the bench tries others)
# heads one program normalizes and rotates (a power of two; a head's norm is its own, so programs split a token's
# heads freely); None: all of a token's, padded to a power of two (24 -> 32: a quarter of the lanes masked). 8 heads
# with 2 warps: forward 18.6 -> 16.0 us, backward 27.6 -> 24.7 us at 1024^2 on an H200 (session 36)
HEADS_PER_PROGRAM: int | None = 8


def freq_pairs(freqs: torch.Tensor) -> torch.Tensor:
    """Each token's rotation as float32 ``[S, D/2, 2]`` (cosine, sine) pairs, from diffusers' complex frequencies
    ``[S, D/2]`` or :func:`.rope.tables`' real tables ``[S, 1, D, 2]``."""
    if torch.is_complex(freqs):
        return torch.view_as_real(freqs).float()
    # rope.tables: the cosine repeated over each pair, the sine signed (-s, s): a pair's second element holds (c, s)
    return freqs[:, 0, 1::2, :].float()


def norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, pairs: torch.Tensor) -> torch.Tensor:
    """diffusers' ``RMSNorm`` (a bf16 weight) then :func:`.rope.apply_rotary_emb_qwen_real`, the same operations:
    ``x`` ``[B, S, H, D]``, ``pairs`` from :func:`freq_pairs`."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    y = (x * torch.rsqrt(variance + eps)).to(weight.dtype) * weight
    cos, sin = pairs.unsqueeze(1).unbind(-1)  # [S, 1, D/2]
    a, b = y.float().reshape(*y.shape[:-1], -1, 2).unbind(-1)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(3).type_as(y)


def norm_rope_backward_reference(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                                 pairs: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`norm_rope_reference` for ``x``, written out with the roundings autograd makes (a
    custom operator runs below autograd): float32 inside, bf16 where autograd casts a gradient to an input's dtype,
    and the two contributions to ``x``'s gradient added in its dtype."""
    cos, sin = pairs.unsqueeze(1).unbind(-1)
    ge, go = dout.float().reshape(*dout.shape[:-1], -1, 2).unbind(-1)
    dy = torch.stack([ge * cos + go * sin, go * cos - ge * sin], dim=-1).flatten(3).to(weight.dtype)
    dn = (dy * weight).float()
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    through_scale = (dn * r).to(x.dtype)
    dv = -0.5 * (dn * xf).sum(-1, keepdim=True) * r.pow(3)
    through_variance = (dv / x.shape[-1] * (2 * xf)).to(x.dtype)
    return through_scale + through_variance


def _triton_kernels():
    """The two Triton kernels, compiled on first use (Triton is imported only where CUDA runs them)."""
    global _kernels
    if _kernels is not None:
        return _kernels
    import triton
    import triton.language as tl

    @triton.jit
    def norm_rope_fwd(x_ptr, w_ptr, f_ptr, out_ptr, S, out_S, out_offset, H, x_sb, x_ss, x_sh, o_sb, o_ss, o_sh, eps,
            D: tl.constexpr, BLOCK_H: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        b, t = pid // S, pid % S
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        dims = tl.arange(0, D)[None, :]
        mask = heads < H
        x = tl.load(x_ptr + b * x_sb + t * x_ss + heads * x_sh + dims, mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
        n = (x * r).to(tl.bfloat16).to(tl.float32)
        w = tl.load(w_ptr + dims).to(tl.float32)
        y = (n * w).to(tl.bfloat16).to(tl.float32)
        a, bb = tl.split(tl.reshape(y, (BLOCK_H, D // 2, 2)))
        c, s = tl.split(tl.load(f_ptr + t * D + tl.arange(0, D // 2)[:, None] * 2 + tl.arange(0, 2)[None, :]))
        out = tl.reshape(tl.join(a * c[None, :] - bb * s[None, :], a * s[None, :] + bb * c[None, :]), (BLOCK_H, D))
        tl.store(out_ptr + b * o_sb + (out_offset + t) * o_ss + heads * o_sh + dims, out.to(tl.bfloat16), mask=mask)

    @triton.jit
    def norm_rope_bwd(g_ptr, x_ptr, w_ptr, f_ptr, dx_ptr, S, g_offset, H, g_sb, g_ss, g_sh, x_sb, x_ss, x_sh, eps,
            D: tl.constexpr, BLOCK_H: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        b, t = pid // S, pid % S
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        dims = tl.arange(0, D)[None, :]
        mask = heads < H
        g = tl.load(g_ptr + b * g_sb + (g_offset + t) * g_ss + heads * g_sh + dims, mask=mask, other=0.0)
        ge, go = tl.split(tl.reshape(g.to(tl.float32), (BLOCK_H, D // 2, 2)))
        c, s = tl.split(tl.load(f_ptr + t * D + tl.arange(0, D // 2)[:, None] * 2 + tl.arange(0, 2)[None, :]))
        dy = tl.reshape(tl.join(ge * c[None, :] + go * s[None, :], go * c[None, :] - ge * s[None, :]), (BLOCK_H, D))
        dy = dy.to(tl.bfloat16).to(tl.float32)  # the gradient of y.float(): bf16
        w = tl.load(w_ptr + dims).to(tl.float32)
        dn = (dy * w).to(tl.bfloat16).to(tl.float32)  # y = n * w in bf16
        x = tl.load(x_ptr + b * x_sb + t * x_ss + heads * x_sh + dims, mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
        through_scale = (dn * r).to(tl.bfloat16).to(tl.float32)
        dv = -0.5 * tl.sum(dn * x, axis=1)[:, None] * (r * r * r)
        through_variance = (dv / D * (2.0 * x)).to(tl.bfloat16).to(tl.float32)
        dx = (through_scale + through_variance).to(tl.bfloat16)
        tl.store(dx_ptr + b * x_sb + t * x_ss + heads * x_sh + dims, dx, mask=mask)

    # named apart: profiler tables list Triton kernels by function name
    _kernels = (triton.next_power_of_2, norm_rope_fwd, norm_rope_bwd)
    return _kernels


def _rows_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _launch_shape(heads: int, next_pow2) -> tuple[int, int]:
    """Heads a program takes (:data:`HEADS_PER_PROGRAM`, else all of a token's padded to a power of two) and its
    warps (:data:`NUM_WARPS`, else 2 with 8 heads: of the settings whose results equalled session 35's launch bit
    for bit, the fastest forward + backward on an H200, session 36; 4 with all heads, session 30's)."""
    per = HEADS_PER_PROGRAM
    if per:
        if not isinstance(per, int) or per < 1 or per & (per - 1):
            raise ValueError(f"norm_rope.HEADS_PER_PROGRAM={per!r}: expected a power of two (1, 2, 4, 8, ...) or None")
        return per, NUM_WARPS or 2
    return next_pow2(heads), NUM_WARPS or 4


def _forward_cuda(img, txt, w_img, w_txt, f_img, f_txt, eps_img, eps_txt):
    next_pow2, fwd, _ = _triton_kernels()
    batch, s_img, heads, dim = img.shape
    s_txt = txt.shape[1]
    out = img.new_empty(batch, s_txt + s_img, heads, dim)
    block_h, warps = _launch_shape(heads, next_pow2)
    for x, w, f, eps, offset in ((txt, w_txt, f_txt, eps_txt, 0), (img, w_img, f_img, eps_img, s_txt)):
        if x.shape[1] == 0:
            continue
        fwd[(batch * x.shape[1], -(-heads // block_h))](x, w, f, out, x.shape[1], s_txt + s_img, offset, heads,
                                                         *_rows_strides(x), *_rows_strides(out), eps, D=dim,
                                                         BLOCK_H=block_h, num_warps=warps)
    return out


def _backward_cuda(grad, img, txt, w_img, w_txt, f_img, f_txt, eps_img, eps_txt):
    next_pow2, _, bwd = _triton_kernels()
    heads, dim = img.shape[2:]
    s_txt = txt.shape[1]
    grads = []
    block_h, warps = _launch_shape(heads, next_pow2)
    for x, w, f, eps, offset in ((img, w_img, f_img, eps_img, s_txt), (txt, w_txt, f_txt, eps_txt, 0)):
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        if x.shape[1]:
            bwd[(x.shape[0] * x.shape[1], -(-heads // block_h))](grad, x, w, f, dx, x.shape[1], offset, heads,
                                                                 *_rows_strides(grad), *_rows_strides(x), eps, D=dim,
                                                                 BLOCK_H=block_h, num_warps=warps)
        grads.append(dx)
    return tuple(grads)


@functools.cache
def _ops():
    """The two operators, registered on first use (a second copy of this package, e.g. under another ComfyUI folder
    name, reuses the registered ones: ``cast_linear.registered_ops``)."""
    existing = registered_ops("norm_rope_joint", "norm_rope_joint_backward")
    if existing is not None:
        return existing

    @torch.library.custom_op(f"{NAMESPACE}::norm_rope_joint", mutates_args=())
    def fwd(img: torch.Tensor, txt: torch.Tensor, w_img: torch.Tensor, w_txt: torch.Tensor, f_img: torch.Tensor,
            f_txt: torch.Tensor, eps_img: float, eps_txt: float) -> torch.Tensor:
        if img.is_cuda:
            return _forward_cuda(img.contiguous(), txt.contiguous(), w_img, w_txt, f_img.contiguous(),
                                 f_txt.contiguous(), eps_img, eps_txt)
        return torch.cat([norm_rope_reference(txt, w_txt, eps_txt, f_txt),
                          norm_rope_reference(img, w_img, eps_img, f_img)], dim=1)

    @fwd.register_fake
    def _(img, txt, w_img, w_txt, f_img, f_txt, eps_img, eps_txt):
        batch, s_img, heads, dim = img.shape
        return img.new_empty(batch, txt.shape[1] + s_img, heads, dim)

    @torch.library.custom_op(f"{NAMESPACE}::norm_rope_joint_backward", mutates_args=())
    def bwd(grad: torch.Tensor, img: torch.Tensor, txt: torch.Tensor, w_img: torch.Tensor, w_txt: torch.Tensor,
            f_img: torch.Tensor, f_txt: torch.Tensor, eps_img: float, eps_txt: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
        if grad.is_cuda:  # the kernels take any row strides, the head dimension contiguous
            grad = grad if grad.stride(-1) == 1 else grad.contiguous()
            return _backward_cuda(grad, img.contiguous(), txt.contiguous(), w_img, w_txt, f_img.contiguous(),
                                  f_txt.contiguous(), eps_img, eps_txt)
        s_txt = txt.shape[1]
        return (norm_rope_backward_reference(grad[:, s_txt:], img, w_img, eps_img, f_img),
                norm_rope_backward_reference(grad[:, :s_txt], txt, w_txt, eps_txt, f_txt))

    @bwd.register_fake
    def _(grad, img, txt, w_img, w_txt, f_img, f_txt, eps_img, eps_txt):
        return (torch.empty_like(img, memory_format=torch.contiguous_format),
                torch.empty_like(txt, memory_format=torch.contiguous_format))

    def setup_context(ctx, inputs, output):
        img, txt, w_img, w_txt, f_img, f_txt, eps_img, eps_txt = inputs
        ctx.save_for_backward(img, txt, w_img, w_txt, f_img, f_txt)
        ctx.eps = (eps_img, eps_txt)

    def backward(ctx, grad):
        img, txt, w_img, w_txt, f_img, f_txt = ctx.saved_tensors
        d_img, d_txt = bwd(grad, img, txt, w_img, w_txt, f_img, f_txt, *ctx.eps)
        return d_img, d_txt, None, None, None, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd, bwd


def norm_rope_joint(img: torch.Tensor, txt: torch.Tensor, w_img: torch.Tensor, w_txt: torch.Tensor,
                    f_img: torch.Tensor, f_txt: torch.Tensor, eps_img: float, eps_txt: float) -> torch.Tensor:
    """``cat([rope(rms_norm(txt)), rope(rms_norm(img))], dim=1)`` for ``img`` ``[B, S_img, H, D]`` and ``txt``
    ``[B, S_txt, H, D]`` (bf16), each stream with its norm's weight and eps and its :func:`freq_pairs`; one custom
    operator each way (Triton kernels on CUDA), differentiable for ``img`` and ``txt``."""
    return _ops()[0](img, txt, w_img, w_txt, f_img, f_txt, eps_img, eps_txt)


def _norm_fusable(norm) -> bool:
    weight = getattr(norm, "weight", None)
    return (type(norm).__name__ == "RMSNorm" and getattr(norm, "bias", None) is None and weight is not None
            and weight.dtype == torch.bfloat16 and not weight.requires_grad and weight.dim() == 1)


def fusable(attn) -> bool:
    """Whether an attention module's four q/k norms are what the operator computes: diffusers' ``RMSNorm`` with a
    frozen bf16 weight and no bias, over head dimensions the kernels take (even, a power of two)."""
    norms = [getattr(attn, name, None) for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")]
    if not all(_norm_fusable(n) for n in norms):
        return False
    dim = norms[0].weight.shape[0]
    return dim >= 2 and dim & (dim - 1) == 0 and all(n.weight.shape[0] == dim for n in norms)


def joint(x_img: torch.Tensor, x_txt: torch.Tensor, norm_img, norm_txt, img_freqs: torch.Tensor,
          txt_freqs: torch.Tensor) -> torch.Tensor:
    """The joint ``[B, S_txt + S_img, H, D]`` queries (or keys) of a Qwen-Image block: each stream through its norm
    module and RoPE, text first, as diffusers' processor computes them, through :func:`norm_rope_joint`."""
    return norm_rope_joint(x_img, x_txt, norm_img.weight, norm_txt.weight, freq_pairs(img_freqs),
                           freq_pairs(txt_freqs), float(norm_img.eps), float(norm_txt.eps))


def install(transformer) -> int:
    """Have each :mod:`.attention_qwen` processor of ``transformer`` whose attention qualifies (:func:`fusable`)
    compute its q/k norms, RoPE and concatenation through :func:`joint`; returns how many."""
    _ops()  # registered here, outside any compiled region (the first forward may be dynamo's trace)
    n = 0
    for block in getattr(transformer, "transformer_blocks", ()):
        attn = getattr(block, "attn", None)
        processor = getattr(attn, "processor", None)
        if type(processor).__name__ == "SharedQkvAttnProcessor" and fusable(attn):
            processor.fused_norm_rope = True
            n += 1
    return n


def installed(transformer) -> int:
    """How many of ``transformer``'s attention processors :func:`install` turned on."""
    return sum(bool(getattr(getattr(getattr(b, "attn", None), "processor", None), "fused_norm_rope", False))
               for b in getattr(transformer, "transformer_blocks", ()))


def uninstall(transformer) -> int:
    """Turn :func:`install`'s routing off again; returns how many processors it was on for."""
    n = 0
    for block in getattr(transformer, "transformer_blocks", ()):
        processor = getattr(getattr(block, "attn", None), "processor", None)
        if getattr(processor, "fused_norm_rope", False):
            processor.fused_norm_rope = False
            n += 1
    return n


__all__ = ["freq_pairs", "fusable", "install", "installed", "joint", "norm_rope_backward_reference",
           "norm_rope_joint", "norm_rope_reference", "uninstall"]
