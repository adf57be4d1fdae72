"""float32 products with a frozen weight whose values are bf16 values, on bf16 tensor cores.

ComfyUI computes Qwen-Image's text encoder in float32 over weights it stores in fp8 (``fp8_scaled`` files) or bf16,
casting each weight to float32 for every use: on an H200 the training node's step spent ~180 ms of ~600 in those
casts, the float32 GEMMs and a per-layer recompute (autograd would otherwise keep every cast). Those weights are
exact in bf16 (e4m3's 4 significant bits, and a bf16 file, fit bf16's 8), and a float32 activation is exactly the
sum of three bf16 tensors (24 significant bits = 3 x 8; :func:`split_bf16`). So ``x @ Wᵀ`` is the sum of three
bf16 x bf16 products, each exact in float32, accumulated in float32: one bf16 GEMM over the three parts stacked as
rows (``torch.mm(..., out_dtype=torch.float32)`` on CUDA), reading the bf16 weight once. The result equals the
float32 GEMM up to the order of the float32 additions. On a CPU (and where ``mm`` has no ``out_dtype``) the same
products are formed in float32.

:class:`ExactLinear` keeps that weight (and an optional float32 scale applied to the input, as ComfyUI 0.3.64's
scaled-fp8 layers do) and computes the input's gradient the same way. The weight may be kept in e4m3 (the data of an
fp8-scaled file, 1 byte a value: half a bf16 copy's memory) and is then cast to bf16 for each use, which is exact.
It saves nothing but the weight for the backward, so the decoder needs no recomputation, and it is a plain tensor
program that CUDA graphs can capture.
On an H200 (ComfyUI 0.33, fp8-scaled 7B encoder, 1024² training step) it took the node's text-encoder forward
from 102 to 12 ms (bf16 copies; 31 with e4m3 ones) and the step from 0.54 to 0.35 s. ``nodes/comfy_backend.py``
uses it on a GPU where the copies fit (``QWEN_ZERO_PRIOR_EXACT_TEXT``).

:class:`StreamedExactLinear` keeps the same weight in pinned CPU memory instead and copies it to the GPU for each use,
forward and backward (through a :class:`~.prefetch.WeightPrefetcher` ring, ahead of use, where it is given one): the
training node's text encoder on a card where the DiT is offloaded (24 GB), which then holds none of the encoder's
projections on the GPU (~7 GiB for an fp8-scaled file, ~14 GiB bf16) and gives that memory to resident DiT blocks.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def split_bf16(a: torch.Tensor) -> torch.Tensor:
    """float32 ``a`` [M, K] as three bf16 parts stacked as rows [3M, K] whose sum is ``a`` (exactly, for normal
    numbers)."""
    a1 = a.to(torch.bfloat16)
    r = a - a1.float()
    a2 = r.to(torch.bfloat16)
    a3 = (r - a2.float()).to(torch.bfloat16)
    return torch.cat([a1, a2, a3], dim=0)


@functools.cache
def _mm_out_dtype(device: torch.device) -> bool:
    """Whether ``torch.mm(bf16, bf16, out_dtype=torch.float32)`` runs on ``device``."""
    try:
        a = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
        torch.mm(a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError) as e:
        logger.info("torch.mm has no float32 out_dtype for bf16 on %s (%s): the exact text products cast the bf16 "
                    "weights to float32 instead", device, str(e).splitlines()[0][:120])
        return False
    return True


EXACT_DTYPES = (torch.bfloat16, torch.float8_e4m3fn)  # the weight dtypes whose every value is a bf16 value


def exact_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ wᵀ`` in float32 for float32 ``a`` [M, K] and a bf16 or e4m3 ``w`` [N, K] (any strides)."""
    m = a.shape[0]
    if w.dtype != torch.bfloat16:
        w = w.to(torch.bfloat16)  # e4m3 -> bf16 is exact
    parts = split_bf16(a.float())
    if parts.is_cuda and _mm_out_dtype(parts.device):
        out = torch.mm(parts, w.t(), out_dtype=torch.float32)
    else:  # the same bf16 x bf16 products, exact in float32
        out = torch.mm(parts.float(), w.t().float())
    out = out.view(3, m, -1)
    return out[0] + out[1] + out[2]


def _exact_out(x: torch.Tensor, weight: torch.Tensor, scale, bias) -> torch.Tensor:
    """``(x * scale) @ weightᵀ + bias`` in float32 for ``x`` [..., K]."""
    a = x.reshape(-1, x.shape[-1]).float()
    if scale is not None:
        a = a * scale
    y = exact_mm(a, weight)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


def _exact_in_grad(dy: torch.Tensor, weight: torch.Tensor, scale) -> torch.Tensor:
    """``(dy @ weight) * scale``: the input's gradient of :func:`_exact_out`, for ``dy`` [..., N]."""
    dx = exact_mm(dy.reshape(-1, dy.shape[-1]).float(), weight.t())
    if scale is not None:
        dx = dx * scale
    return dx.view(*dy.shape[:-1], weight.shape[1])


class _ExactLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        ctx.save_for_backward(weight, scale)
        return _exact_out(x, weight, scale, bias)

    @staticmethod
    def backward(ctx, dy):
        weight, scale = ctx.saved_tensors
        return _exact_in_grad(dy, weight, scale), None, None, None


class ExactLinear(nn.Module):
    """A frozen ``Linear`` computing ``(x * scale) @ weightᵀ + bias`` in float32 from a bf16 or e4m3 ``weight`` (see
    the module docstring); ``scale`` a float32 scalar or None."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None):
        super().__init__()
        if weight.dtype not in EXACT_DTYPES:
            raise TypeError(f"ExactLinear takes a bf16 or float8_e4m3fn weight, got {weight.dtype}")
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)
        self.register_buffer("scale", None if scale is None else scale.float().reshape(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ExactLinearFn.apply(x, self.weight, self.scale, self.bias)


class _StreamedExactFn(torch.autograd.Function):
    """:class:`_ExactLinearFn` with the weight fetched for the forward and again for the backward, never saved (as
    ``offload._FetchMatmul``)."""

    @staticmethod
    def forward(ctx, x, owner):
        ctx.owner = owner
        w, done = owner.fetch()
        try:
            return _exact_out(x, w, owner.scale, owner.bias)
        finally:  # (also after an error: a ring range never released would never be reused)
            done()

    @staticmethod
    def backward(ctx, dy):
        owner = ctx.owner
        w, done = owner.fetch()
        try:
            return _exact_in_grad(dy, w, owner.scale), None
        finally:
            done()


class StreamedExactLinear(nn.Module):
    """:class:`ExactLinear` whose weight stays in (pinned, on a CUDA ``device``) CPU memory and is copied to ``device``
    for each use: at use, or ahead of it through ``prefetcher`` (a :class:`~.prefetch.WeightPrefetcher`, set by the
    caller; it reads ``stored``). Its bias and scale live on ``device``. Same numbers as :class:`ExactLinear`.
    ``pinned``: a :class:`~.pinned.PinnedPack` to copy the weight into (shared by a model's layers)."""

    def __init__(self, weight: torch.Tensor, device: torch.device, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, pinned=None):
        super().__init__()
        if weight.dtype not in EXACT_DTYPES:
            raise TypeError(f"StreamedExactLinear takes a bf16 or float8_e4m3fn weight, got {weight.dtype}")
        self.device = torch.device(device)
        self.out_features, self.in_features = weight.shape
        if pinned is not None:  # a pinned.PinnedPack shared by many layers (no power-of-two rounding per weight)
            self.stored = pinned.copy(weight.detach())
        else:
            stored = weight.detach().to("cpu")
            if stored.data_ptr() == weight.data_ptr():  # its own copy: the caller may free or change the source
                stored = stored.clone()
            self.stored = stored.pin_memory() if self.device.type == "cuda" else stored
        self.bias = None if bias is None else bias.detach().float().to(self.device)
        self.scale = None if scale is None else scale.detach().float().reshape(()).to(self.device)
        self.prefetcher = None

    @classmethod
    def from_exact(cls, exact: ExactLinear, device: torch.device, pinned=None) -> StreamedExactLinear:
        return cls(exact.weight, device, exact.bias, exact.scale, pinned)

    @property
    def weight(self) -> torch.Tensor:  # what code probing ``.weight`` (dtype, shape) sees; never used to compute
        return self.stored

    def fetch(self):
        """The weight on ``device`` and the callable to call once the kernels reading it are queued."""
        if self.prefetcher is not None:
            return self.prefetcher.fetch(self)
        from .prefetch import no_release

        return self.stored.to(self.device, non_blocking=True), no_release

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StreamedExactFn.apply(x, self)

    def extra_repr(self) -> str:
        kind = str(self.stored.dtype).removeprefix("torch.")
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind} in CPU memory"
                + (", prefetched" if self.prefetcher is not None else ""))


__all__ = ["EXACT_DTYPES", "ExactLinear", "StreamedExactLinear", "exact_mm", "split_bf16"]
