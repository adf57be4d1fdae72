"""fp8 matmuls for the frozen base weights of the image transformer (opt-in: ``model.fp8_matmul``).

Training a LoRA leaves the transformer's base weights frozen, so each base ``Linear`` does two matmuls per
step: ``y = x Wᵀ`` forward and ``dx = dy W`` backward (no weight gradient). On Hopper/Ada GPUs fp8 tensor cores
run these at up to twice the bf16 rate. :class:`Fp8Linear` stores ``W`` [out, in] once, as float8_e4m3fn scaled
per output row (``W ≈ diag(s) Wq``, float32 scales ``s``): half the bytes of the bf16 copy it replaces (+ 4 bytes
a row), ~6.3 GiB less than bf16 for Qwen-Image's 6.8B image-stream weights. Activations and incoming gradients
are quantized per row on the fly (``torch._scaled_mm`` with row-wise scales, the "rowwise" recipe of torchao's
float8 training):

- forward ``y = x Wᵀ = (sx ⊙ xq) Wqᵀ diag(s)``: ``x`` quantized per row, ``Wqᵀ`` (a column-major view of
  the row-major ``Wq``, as ``_scaled_mm`` wants its second operand) with ``s`` as the column scales;
- backward ``dx = dy W = (dy diag(s)) Wq``: ``dy``'s columns scaled by ``s``, then quantized per row; ``Wq``
  is the second operand as it is, [out, in], which ``_scaled_mm`` (Hopper's fp8 kernels take K-major operands
  only) needs column-major: a transposed copy made in the backward and freed after the product (out*in bytes,
  one layer at a time: 36 MiB at most for Qwen-Image), with ones as its column scales. Where memory allows (the
  backend asks the memory plan), a layer keeps a second fp8 copy for the backward instead, ``Wᵀ`` quantized per
  row: ``dx = Q(dy) Wtq diag(st)`` then takes ``dy`` as it is (no float32 rescaling, no transposed copy a step).
  (An earlier version always kept it; Qwen-Image's step then peaked as high as with bf16 weights, 75.8 GiB.)

The LoRA branch, biases, norms and attention stay in bf16/fp32.

Only the image stream's large layers are converted (attention projections and MLP of ``transformer_blocks``;
4096 rows at 1024²): the text stream has ~100 rows, where fp8 gains nothing, and the modulation layers see one.
Qwen-Image 2.1 is single-stream: text and image tokens go through the same seven projections of each block,
all of them converted (``families.ModelFamily.fp8_modules`` names each family's).
Numerics: e4m3 keeps 3 mantissa bits, so each quantized value is within 2⁻⁴ of itself relative (plus 2⁻¹⁰ of
its row's scale near zero, e4m3's subnormals); a product of two such values is within ~2⁻³ relative, and each
output element within ~2⁻³ of ``Σ|x||w|`` (tests/test_fp8_and_suffix.py checks that bound element by element).
LoRA training on a frozen base tolerates it (the bench and tests report the difference).
"""

from __future__ import annotations

import logging
import re
import sys

import torch
from torch import nn

from .families import QWEN_IMAGE_FP8

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
# Fp8Linear adds a bf16 bias in the product's epilogue (_scaled_mm's bias) instead of after it: goes with
# lora_shared.FUSED_DELTA, whose in-place addmm wants the layer's output as one kernel's (the bench's lora_addmm=0
# turns both off)
BIAS_IN_PRODUCT = True

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
    """``x @ Wᵀ`` with both operands in fp8; backward ``dy @ W`` likewise, from the same fp8 copy of ``W`` or, where
    the layer keeps one, from its backward copy. No gradient for the weights."""

    @staticmethod
    def forward(ctx, x, w_q, w_scale, wt_q=None, wt_scale=None, fast_accum=False, fast_accum_backward=False,
                bias=None):
        lead, k = x.shape[:-1], x.shape[-1]
        y = _scaled_rows(x.reshape(-1, k), w_q.t(), w_scale.view(1, -1), fast_accum=fast_accum, bias=bias)
        ctx.save_for_backward(w_q, w_scale, wt_q, wt_scale)  # the module's buffers: nothing new kept
        ctx.fast_accum_backward = fast_accum_backward
        # a 2-D input gets the product's own tensor, not a view of it (lora_shared.lora_delta writes into it)
        return y if x.dim() == 2 else y.view(*lead, w_q.shape[0])

    @staticmethod
    def backward(ctx, dy):
        w_q, w_scale, wt_q, wt_scale = ctx.saved_tensors
        lead, n = dy.shape[:-1], dy.shape[-1]
        fast = ctx.fast_accum_backward
        if wt_q is not None:  # Wᵀ quantized per row (W's columns): dx = Q(dy) (Wtq diag(st)), nothing to rescale
            dx = _scaled_rows(dy.reshape(-1, n), wt_q.t(), wt_scale.view(1, -1), fast_accum=fast)
            return dx.view(*lead, w_q.shape[1]), None, None, None, None, None, None, None
        # dy @ (diag(s) Wq) = (dy diag(s)) @ Wq: the weight's row scales move onto dy's columns (in float32, before
        # dy is quantized per row); Wq column-major for _scaled_mm: a transient transposed copy of this layer only
        a = dy.reshape(-1, n).float() * w_scale.view(1, -1)
        w_cm = w_q.t().contiguous().t()
        ones = torch.ones(1, w_q.shape[1], device=w_q.device, dtype=torch.float32)
        dx = _scaled_rows(a, w_cm, ones, out_dtype=dy.dtype, fast_accum=fast)
        del w_cm
        return dx.view(*lead, w_q.shape[1]), None, None, None, None, None, None, None


def _use_scaled_mm(t: torch.Tensor) -> bool:
    return t.is_cuda


def _scaled_rows(a: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                 out_dtype: torch.dtype | None = None, fast_accum: bool = False,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ (b_q * b_scale) (+ bias)`` for ``b_q`` [K, N] fp8 column-major and ``b_scale`` [1, N] float32, with
    ``a`` [M, K] quantized per row; rows padded to a multiple of 16 (``_scaled_mm`` asks). Returns ``out_dtype``
    (default ``a``'s dtype). ``fast_accum``, ``bias``: see :func:`scaled_product`."""
    out_dtype = out_dtype or a.dtype
    m = a.shape[0]
    pad = (-m) % 16
    if pad:
        a = torch.nn.functional.pad(a, (0, 0, 0, pad))
    out = scaled_product(*quantize_rows(a.contiguous()), b_q, b_scale, fast_accum=fast_accum, bias=bias).to(out_dtype)
    return out[:m] if pad else out


def scaled_product(aq: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                   fast_accum: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(aq * a_scale) @ (b_q * b_scale)`` for ``aq`` [M, K] fp8 (M a multiple of 16) with row scales [M, 1] and
    ``b_q`` [K, N] fp8 column-major with column scales [1, N]: bf16 on CUDA (its row-scaled kernels write bf16
    only), float32 elsewhere. ``fast_accum``: ``_scaled_mm``'s ``use_fast_accum`` (Hopper accumulates in the
    tensor cores' reduced precision instead of promoting the partial sums to float32 along K: 6-12 % faster at
    Qwen-Image's shapes, two to three times the error against a float32 product, bench/fp8_gemm.py); ignored
    without an fp8 kernel. ``bias`` [N] (bf16: what cuBLAS's fp8 kernels take with a bf16 result) is added in the
    kernel's epilogue, in float32 before the result's rounding."""
    if _use_scaled_mm(aq):
        extra = {} if bias is None else {"bias": bias}
        return torch._scaled_mm(aq, b_q, scale_a=a_scale, scale_b=b_scale, out_dtype=torch.bfloat16,
                                use_fast_accum=fast_accum, **extra)
    # not every CPU build has row-scaled _scaled_mm: the same quantized operands, multiplied in float32
    out = (aq.float() * a_scale) @ (b_q.float() * b_scale)
    return out if bias is None else out + bias.float()


class Fp8Linear(nn.Module):
    """A frozen ``nn.Linear`` computed with fp8 matmuls (see the module docstring). ``original`` keeps the source
    layer (for :func:`restore`) only when asked; training drops it to free its memory. ``backward_copy``: also keep
    ``Wᵀ`` quantized per row (``wt_q`` [in, out], scales ``wt_scale`` per input feature), which the backward's
    ``_scaled_mm`` takes as it is: no transposed copy and no rescaling of ``dy`` in each step, for one more fp8 copy
    of the weight (the memory plan decides: :func:`backward_copy_bytes`). ``fast_accum``: the forward product
    with fast accumulation (:func:`scaled_product`; ``model.fp8_fast_accum``); ``fast_accum_backward`` likewise for
    the input gradient's product (``model.fp8_fast_accum_backward``)."""

    def __init__(self, linear: nn.Linear, keep_original: bool = False, backward_copy: bool = False,
                 compute_dtype: torch.dtype | None = None, fast_accum: bool = False,
                 fast_accum_backward: bool = False):
        super().__init__()
        self.fast_accum = bool(fast_accum)
        self.fast_accum_backward = bool(fast_accum_backward)
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if w.dtype == FP8:  # already e4m3 (ComfyUI's fp8 files, computed as weight.to(bf16)): taken as it is, scale
            # 1 a row, sharing its storage; quantizing it again per row would round a second time
            w_q, w_s = w, torch.ones(w.shape[0], 1, device=w.device, dtype=torch.float32)
        else:  # (an e5m2 weight, which has no abs/amax kernels, through float32)
            w_q, w_s = quantize_rows(w.float() if w.dtype.itemsize == 1 else w)
        # not persistent: never in a state_dict or checkpoint (the LoRA and token are what training saves)
        self.register_buffer("w_q", w_q, persistent=False)
        self.register_buffer("w_scale", w_s.view(-1), persistent=False)
        wt_q = wt_s = None
        if backward_copy:
            # row-major [in, out]: its .t() is column-major
            wt_q, wt_s = quantize_rows((w.float() if w.dtype.itemsize == 1 else w).t().contiguous())
            wt_s = wt_s.view(-1)
        self.register_buffer("wt_q", wt_q, persistent=False)  # None (no buffer) without the backward copy
        self.register_buffer("wt_scale", wt_s, persistent=False)
        self.compute_dtype = compute_dtype or getattr(linear, "compute_dtype", None) or w.dtype
        if self.compute_dtype == FP8:
            raise Fp8Error("Fp8Linear: an fp8-stored weight needs a compute_dtype (bf16, fp16 or float32)")
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach().to(self.compute_dtype, copy=True), requires_grad=False)
        self.original = [linear] if keep_original else None  # a list: not registered as a submodule

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (for code that inspects ``.weight``; not used by forward)."""
        return (self.w_q.float() * self.w_scale[:, None]).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        # with BIAS_IN_PRODUCT the bias is added in the product's epilogue where the kernel takes it (a bf16 result
        # and bias): the layer's output is then one kernel's, which lora_shared's addmm reads as it is
        fused = BIAS_IN_PRODUCT and self.bias is not None and self.bias.dtype == torch.bfloat16
        y = _Fp8Matmul.apply(x, self.w_q, self.w_scale, self.wt_q, self.wt_scale, self.fast_accum,
                             self.fast_accum_backward, self.bias if fused else None)
        return y if self.bias is None or fused else y + self.bias

    def extra_repr(self) -> str:
        copy = ", backward copy" if self.wt_q is not None else ""
        fast = {(False, False): "", (True, False): ", fast accumulation", (False, True): ", fast accumulation backward"
                }.get((self.fast_accum, self.fast_accum_backward), ", fast accumulation forward and backward")
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 rowwise{copy}{fast}"


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


def _targets(transformer: nn.Module, modules: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    out = []
    for name, mod in transformer.named_modules():
        m = _BLOCK.match(name)
        # nn.Linear itself or a subclass that is a plain frozen Linear (cast_linear.StoredLinear); peft's wrappers
        # are not nn.Linear, their base_layer is
        if m and m.group(1) in modules and isinstance(mod, nn.Linear):
            out.append((name, mod))
    return out


def stored_bytes(out_features: int, in_features: int) -> int:
    """Bytes :class:`Fp8Linear` keeps for an [out, in] weight: one e4m3 byte a value + a float32 scale a row."""
    return out_features * in_features + 4 * out_features


def bytes_saved(transformer: nn.Module, modules: tuple[str, ...] = IMAGE_STREAM) -> int:
    """How many bytes :func:`apply_fp8_matmul` will free on ``transformer`` (its weights as they are now, e.g. bf16,
    less what the fp8 copies keep; biases stay): for the memory plan, before anything is converted."""
    return sum(mod.weight.numel() * mod.weight.element_size() - stored_bytes(*mod.weight.shape)
               for _, mod in _targets(transformer, modules))


def backward_copy_bytes(transformer: nn.Module, modules: tuple[str, ...] = IMAGE_STREAM) -> int:
    """Bytes the backward copies (``Fp8Linear(backward_copy=True)``) add on top of :func:`stored_bytes`: one e4m3
    byte a weight + a float32 scale an input feature."""
    return sum(backward_copy_bytes_by_block(transformer, modules))


def backward_copy_bytes_by_block(transformer: nn.Module, modules: tuple[str, ...] = IMAGE_STREAM) -> list[int]:
    """:func:`backward_copy_bytes` of each of ``transformer_blocks``, in order."""
    out = [0] * len(transformer.transformer_blocks)
    for name, mod in _targets(transformer, modules):
        out[block_index(name)] += stored_bytes(*reversed(mod.weight.shape))
    return out


def added_bytes(transformer: nn.Module, modules: tuple[str, ...] = IMAGE_STREAM) -> int:
    """Bytes :func:`apply_fp8_matmul` allocates where the source layers keep their own weights (the ComfyUI node's
    engine shares ComfyUI's modules): the e4m3 copies (:func:`stored_bytes`) of the weights not already stored in
    e4m3 (those are used as they are)."""
    return sum(stored_bytes(*mod.weight.shape) for _, mod in _targets(transformer, modules) if mod.weight.dtype != FP8)


def apply_fp8_matmul(transformer: nn.Module, keep_original: bool = False,
                     modules: tuple[str, ...] = IMAGE_STREAM, backward_copy: bool | int = False,
                     compute_dtype: torch.dtype | None = None, fast_accum: bool = False,
                     fast_accum_backward: bool = False) -> int:
    """Replace the base ``Linear`` layers named ``modules`` (relative to ``transformer_blocks.<i>.``; default:
    Qwen-Image's image stream) of ``transformer_blocks`` (inside peft LoRA wrappers too) with :class:`Fp8Linear`
    (``compute_dtype``: see there). ``backward_copy``: ``True`` gives every converted layer its backward copy
    (:class:`Fp8Linear`), an int ``n`` only the layers of blocks ``0 .. n-1`` (the share the memory plan has room
    for; whole blocks, so a compiled block takes one of two forms), ``fast_accum`` / ``fast_accum_backward``
    their products' accumulation (:class:`Fp8Linear`). Call after the LoRA is added. Returns the number of layers
    converted."""
    check_supported(next(transformer.parameters()).device)
    if isinstance(backward_copy, bool):
        copies = sys.maxsize if backward_copy else 0
    elif isinstance(backward_copy, int) and backward_copy >= 0:
        copies = backward_copy
    else:
        raise ValueError(f"apply_fp8_matmul: backward_copy must be a bool or a number of blocks >= 0, got "
                         f"{backward_copy!r}")
    targets = _targets(transformer, modules)
    count, with_copy = len(targets), 0
    while targets:  # each bf16 layer released as soon as it is replaced: the peak is one layer over the weights
        name, mod = targets.pop(0)
        parent, attr = _parent(transformer, name)
        copy = block_index(name) < copies
        with_copy += copy
        setattr(parent, attr, Fp8Linear(mod, keep_original=keep_original, backward_copy=copy,
                                        compute_dtype=compute_dtype, fast_accum=fast_accum,
                                        fast_accum_backward=fast_accum_backward))
        del mod
    fast = {(False, False): "", (True, False): ", forward with fast accumulation",
            (False, True): ", backward with fast accumulation"}.get((fast_accum, fast_accum_backward),
                                                                    ", forward and backward with fast accumulation")
    logger.info("fp8 matmuls on %d block layers of the transformer%s%s", count, fast,
                "" if not with_copy else " (with backward copies)" if with_copy == count else
                f" ({with_copy} with backward copies: blocks 0-{copies - 1})")
    return count


def block_index(name: str) -> int:
    """The block number in a module name under ``transformer_blocks`` (``transformer_blocks.7.attn.to_q`` -> 7)."""
    return int(name.split(".", 2)[1])


def restore(transformer: nn.Module) -> int:
    """Undo :func:`apply_fp8_matmul` where the original layers were kept."""
    count = 0
    for name, mod in list(transformer.named_modules()):
        if isinstance(mod, Fp8Linear) and mod.original:
            parent, attr = _parent(transformer, name)
            setattr(parent, attr, mod.original[0])
            count += 1
    return count
