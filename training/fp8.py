"""fp8 matmuls for the frozen base weights of the image transformer (opt-in: ``model.fp8_matmul``).

Training a LoRA leaves the transformer's base weights frozen, so each base ``Linear`` does two matmuls per
step: ``y = x Wᵀ`` forward and ``dx = dy W`` backward (no weight gradient). On Hopper/Ada GPUs fp8 tensor cores
run these at up to twice the bf16 rate. :class:`Fp8Linear` stores ``W`` as float8_e4m3fn twice, once scaled
per output row (forward operand) and once transposed and scaled per input column (backward operand; ``_scaled_mm``
needs its second operand column-major), together the bytes of the one bf16 copy they replace. Activations and
incoming gradients are quantized per row on the fly (``torch._scaled_mm`` with row-wise scales, the "rowwise"
recipe of torchao's float8 training). The LoRA branch, biases, norms and attention stay in bf16/fp32.

Only the image stream's large layers are converted (attention projections and MLP of ``transformer_blocks``;
4096 rows at 1024²): the text stream has ~100 rows, where fp8 gains nothing, and the modulation layers see one.
Qwen-Image 2.1 is single-stream: text and image tokens go through the same seven projections of each block,
all of them converted (``families.ModelFamily.fp8_modules`` names each family's).
Numerics: e4m3 keeps ~3 significant bits; the per-row scaling bounds the error of each product to a few 1e-2
relative, which LoRA training on a frozen base tolerates (the bench and tests report the difference).
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from .families import QWEN_IMAGE_FP8

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)

IMAGE_STREAM = QWEN_IMAGE_FP8  # Qwen-Image's image-stream projections (families.py names each family's)
_BLOCK = re.compile(r"^transformer_blocks\.\d+\.(.+?)(\.base_layer)?$")


class Fp8Error(RuntimeError):
    """fp8 matmuls were asked for where they cannot run."""


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> float8 (M, K) and float32 scales (M, 1) with ``x ≈ q * scale``."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    # a multiply by the row's reciprocal, not a division per element: the fused quantizing kernels are
    # arithmetic-bound (an fp32 division is ~10 instructions); equal up to one fp32 rounding before e4m3's 3 bits
    q = (x.float() * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


class _Fp8Matmul(torch.autograd.Function):
    """``x @ Wᵀ`` with both operands in fp8; backward ``dy @ W`` likewise. No gradient for the weights."""

    @staticmethod
    def forward(ctx, x, w_q, w_scale, wt_q, wt_scale):
        lead, k = x.shape[:-1], x.shape[-1]
        y = _scaled_rows(x.reshape(-1, k), w_q, w_scale)
        ctx.save_for_backward(wt_q, wt_scale)
        return y.view(*lead, w_q.shape[0])

    @staticmethod
    def backward(ctx, dy):
        wt_q, wt_scale = ctx.saved_tensors
        lead, n = dy.shape[:-1], dy.shape[-1]
        dx = _scaled_rows(dy.reshape(-1, n), wt_q, wt_scale)
        return dx.view(*lead, wt_q.shape[0]), None, None, None, None


def _scaled_rows(a: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """``a @ dequant(b_q)ᵀ`` with ``a`` quantized per row; rows padded to a multiple of 16 (``_scaled_mm`` asks)."""
    m = a.shape[0]
    pad = (-m) % 16
    if pad:
        a = torch.nn.functional.pad(a, (0, 0, 0, pad))
    aq, a_scale = quantize_rows(a.contiguous())
    if a.is_cuda:  # CUDA's row-scaled kernels write bf16 only
        out = torch._scaled_mm(aq, b_q.t(), scale_a=a_scale, scale_b=b_scale.view(1, -1), out_dtype=torch.bfloat16)
    else:  # not every CPU build has row-scaled _scaled_mm: the same quantized operands, multiplied in float32
        out = (aq.float() * a_scale) @ (b_q.float() * b_scale.view(-1, 1)).t()
    out = out.to(a.dtype)
    return out[:m] if pad else out


class Fp8Linear(nn.Module):
    """A frozen ``nn.Linear`` computed with fp8 matmuls (see the module docstring). ``original`` keeps the source
    layer (for :func:`restore`) only when asked; training drops it to free its memory."""

    def __init__(self, linear: nn.Linear, keep_original: bool = False):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w_q, w_s = quantize_rows(w)
        wt_q, wt_s = quantize_rows(w.t().contiguous())
        self.register_buffer("w_q", w_q, persistent=False)
        self.register_buffer("w_scale", w_s.view(-1), persistent=False)
        self.register_buffer("wt_q", wt_q, persistent=False)
        self.register_buffer("wt_scale", wt_s.view(-1), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.compute_dtype = w.dtype
        self.original = [linear] if keep_original else None  # a list: not registered as a submodule

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (for code that inspects ``.weight``; not used by forward)."""
        return (self.w_q.float() * self.w_scale[:, None]).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        y = _Fp8Matmul.apply(x, self.w_q, self.w_scale, self.wt_q, self.wt_scale)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 rowwise"


def check_supported(device: torch.device) -> None:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise Fp8Error(
                f"model.fp8_matmul needs a GPU with fp8 tensor cores (compute capability 8.9+: Ada, Hopper, "
                f"Blackwell); {torch.cuda.get_device_name(device)} is {major}.{minor}. Set model.fp8_matmul: false."
            )


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attr


def apply_fp8_matmul(transformer: nn.Module, keep_original: bool = False,
                     modules: tuple[str, ...] = IMAGE_STREAM) -> int:
    """Replace the base ``Linear`` layers named ``modules`` (relative to ``transformer_blocks.<i>.``; default:
    Qwen-Image's image stream) of ``transformer_blocks`` (inside peft LoRA wrappers too) with :class:`Fp8Linear`.
    Call after the LoRA is added. Returns the number of layers converted."""
    check_supported(next(transformer.parameters()).device)
    targets = []
    for name, mod in transformer.named_modules():
        m = _BLOCK.match(name)
        if m and m.group(1) in modules and type(mod) is nn.Linear:
            targets.append((name, mod))
    for name, mod in targets:
        parent, attr = _parent(transformer, name)
        setattr(parent, attr, Fp8Linear(mod, keep_original=keep_original))
    logger.info("fp8 matmuls on %d block layers of the transformer", len(targets))
    return len(targets)


def restore(transformer: nn.Module) -> int:
    """Undo :func:`apply_fp8_matmul` where the original layers were kept."""
    count = 0
    for name, mod in list(transformer.named_modules()):
        if isinstance(mod, Fp8Linear) and mod.original:
            parent, attr = _parent(transformer, name)
            setattr(parent, attr, mod.original[0])
            count += 1
    return count
