"""The training loop's backend for the MODEL, CLIP and VAE a ComfyUI graph loaded (the training node).

The loop itself is the core's (``training/trainer.py``): batches, noise and timesteps, loss, optimizer groups,
checkpoints, resume, interruption and the archive are the same as for the CLI and Cog. This backend runs the models
the way ComfyUI's own trainer (``comfy_extras/nodes_train.py``) sets them up, feature-detected per version:

- under ``torch.inference_mode(False)`` (ComfyUI runs prompts in inference mode), on a clone of the MODEL made with
  ``clone(force_deepcopy=True)`` where ComfyUI has it (>= 0.25: a trainable, non-dynamic copy); on older versions
  a plain clone whose inference tensors are swapped for ordinary ones after loading (same values);
- ``comfy.model_management.in_training`` set while training where ComfyUI has the flag (its RoPE then uses
  differentiable torch code instead of comfy_kitchen kernels);
- the LoRA is a trainable low-rank branch added to each target ``Linear``'s output by a forward hook
  (:class:`LoRABranch`), removed when training ends: the frozen weight keeps its storage (bf16, fp8) and is never
  materialised with the delta (cheaper than ``add_weight_wrapper``, whose weight function also costs a full
  weight gradient per layer). Hooks rather than ``add_object_patch``: on versions without ``force_deepcopy`` the
  clone shares ComfyUI's module tree with the graph's MODEL, and object patches stay applied to it until ComfyUI
  next unpatches that model, while hooks are removed deterministically in ``finally``;
- the token's gradient path through the frozen text encoder runs this project's decoder code over ComfyUI's
  loaded modules (``nodes/comfy_text.py``), not ComfyUI's inference forward.
- on a GPU, by default (``dit_engine: auto``), the DiT trains through diffusers' transformer built over the weights
  ComfyUI loaded and the core's speed path (``comfy_engine.py``), where that computes what ComfyUI's forward computes;
  where the DiT does not fit beside the text encoder, ComfyUI loads the text encoder only and the engine offloads the
  DiT's blocks as the core's ``model.offload`` does (``dit_engine: diffusers_offload``);
  the rest of this list is ComfyUI's-forward training (``dit_engine: comfyui``, and every fallback);
- the DiT's attention in the training forward through ComfyUI's ``optimized_attention_override`` hook with cuDNN
  first in SDPA's priority (``nodes/comfy_attention.py``; ComfyUI 0.33 prefers flash attention, whose backward is
  the slower one); sampling keeps ComfyUI's choice.

The compute dtype is the model's manual-cast dtype (bf16 for an fp8-stored DiT on a GPU), never the storage dtype.
ComfyUI's ``Linear`` casts its stored weight for each use (fp8 files, weights left in CPU memory); autograd would keep
every cast until the backward (40 GB in bf16 for the 20B DiT). :class:`CastLinear` casts again in the backward
instead, so the DiT's blocks need recomputation only where their activations do not fit
(``training/memory.py`` ``blocks_to_checkpoint``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import inspect
import logging
import os
import statistics

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import comfy.model_management as mm

from ..training import memory as mem
from ..training.backend import TrainBackend
from ..training.cast_linear import cast_linear, cast_linear_op
from ..training.config import Config, TrainConfig
from ..training.data import Example, load_pixels
from ..training.fp8 import added_bytes
from ..training.graphs import ASYNC_GRAPHS_ENV, async_graphs_from_env, async_text_graphs
from ..training.profiling import ENV as PROFILE_ENV
from ..training.profiling import StepProfiler
from ..training.token import RegisteredToken, add_placeholder_tokens, check_single_id, init_vector
from .comfy_attention import training_attention
from .comfy_engine import (ENGINES, RESIDENT_BLOCKS_ENV, DiffusersEngine, EngineUnavailable, OffloadPlan, _has_triton,
                           blockers, comfy_offload_streams_off, engine_model_config, graphs_blocked, previews_blocked,
                           resident_blocks, resolved_device)
from .comfy_text import (EXACT_TEXT_ENV, ComfyPromptEncoder, exact_bytes, exact_projections, exact_text_choice,
                         norm_copies, projection_modules, qwen_decoder)
from ..training.families import QWEN_IMAGE, get_family
from ..training.lora import lora_delta
from .token_node import ZeroPriorTokenizer, text_encoder_parts

logger = logging.getLogger(__name__)


# what the node's offloaded step holds beside the weights beyond the core's offload reserve: ComfyUI's text encoder
# computes in float32, and ComfyUI's default allocator (cudaMallocAsync) caches otherwise. On an H200 with 23.5 GiB
# free (session 13), eager steps with the core's 6 GiB (26 of 60 blocks resident) ran out of memory at step 4; with
# 7.5 GiB (22 resident) compiled steps trained in three runs, 23.1 GiB at peak
NODE_OFFLOAD_EXTRA_GIB = 1.5
# the prefetch ring of the text encoder's streamed projections (the offloaded engine), at least (else two of the largest
# weights): ~3.9 of Qwen2.5-VL-7B's largest e4m3 weights (gate/up/down, 68 MB)
TEXT_RING_BYTES = 256 * 2**20


class LoRABranch(nn.Module):
    """The trainable low-rank branch ``scale * B(A(x))`` added to a frozen ``Linear``'s output; float32 ``A``/``B``
    computed in ``x``'s dtype. ``A`` starts N(0, 1/rank) and ``B`` at zero (peft's ``init_lora_weights="gaussian"``,
    as the core's LoRA), so the model starts unchanged."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.rank, self.scale = rank, float(alpha) / rank
        self.lora_A = nn.Parameter(torch.randn(rank, in_features, generator=generator) / rank)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_delta(x, self.lora_A, self.lora_B, self.scale)

    def hook(self, module, args, output):
        """``register_forward_hook`` callback: the Linear's output plus the branch of its input."""
        return output + self(args[0]).to(output.dtype)


class CastLinear(torch.autograd.Function):
    """``F.linear`` with the weight and bias ComfyUI's ``cast_bias_weight`` gives for ``module`` (its storage dtype
    and device cast to the input's, its weight patches applied), without keeping the cast weight for the backward:
    the backward casts it again. The module's weights are frozen, so only the input's gradient is computed, and a
    cast (memory-bound, ~1 ms for a 3072x12288 fp8 weight) costs far less than recomputing a block's forward."""

    @staticmethod
    def forward(ctx, x, module):
        weight, bias = _cast(module, x)
        ctx.module = module
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        weight, _ = _cast(ctx.module, dy)
        return dy.matmul(weight), None


def _cast(module, like: torch.Tensor):
    import comfy.ops

    # the legacy (non-offloadable) call: (weight, bias) in every version from 0.3.64 on
    out = comfy.ops.cast_bias_weight(module, like)
    return out[0], out[1]


def _plain_cast_linear(module) -> bool:
    """A ComfyUI ``Linear`` whose per-use cast is ComfyUI's plain one (``manual_cast`` and friends; not the scaled or
    quantized formats, whose forwards differ per version and are left as they are)."""
    import comfy.ops

    base = getattr(getattr(comfy.ops, "disable_weight_init", None), "Linear", None)
    return (base is not None and isinstance(module, base)
            and type(module).forward_comfy_cast_weights is base.forward_comfy_cast_weights)


def _recast_forward(module, input, *args, **kwargs):
    if args or kwargs or module.weight.device != input.device:
        # a call this replacement does not know, or a weight ComfyUI streams from CPU memory (its own forward
        # overlaps the copy on a side stream; the blocks are then recomputed, which bounds what autograd keeps)
        return type(module).forward_comfy_cast_weights(module, input, *args, **kwargs)
    return CastLinear.apply(input, module)


def _compiled_forward(module, input, *args, **kwargs):
    """The per-use cast Linear of a compiled block: ``training/cast_linear.py``'s custom op where the weight is on the
    input's device and carries no patches (the cast is then ComfyUI's plain ``.to``), else the eager
    :class:`CastLinear` path. (autograd.Functions that take a module do not trace, and inside a compiled graph
    AOTAutograd would keep every per-use weight cast for the backward; the op saves only the stored weight.)"""
    if (args or kwargs or module.weight.device != input.device or getattr(module, "weight_function", None)
            or getattr(module, "bias_function", None)):
        return _recast_forward(module, input, *args, **kwargs)
    return cast_linear(input, module.weight, module.bias)


def _untracked(t: torch.Tensor) -> bool:
    """An inference tensor, or a tensor autograd cannot save for the same reason: one whose ``TensorImpl`` was made
    in inference mode and later given ordinary data (``param.data = ...``, which ``module.to(device)`` does outside
    inference mode, as when ComfyUI moves weights it loaded to the GPU for training). That tensor reports
    ``is_inference() == False`` but has no version counter: saving it for the backward raises "Inference tensors do
    not track version counter"."""
    if t.is_inference():
        return True
    try:
        t._version
    except RuntimeError:
        return True
    return False


def _ordinary_tensors(module: nn.Module) -> int:
    """Replace inference tensors held by ``module`` (see :func:`_untracked`) with ordinary clones (call under
    inference_mode(False)).

    Autograd cannot save an inference tensor for backward, and ComfyUI loads weights under inference mode. The
    values are bit-identical, so other nodes sharing the module see no difference, and the originals are not
    kept (keeping them would double the memory of a 20B model)."""
    swapped = 0
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and _untracked(p):
                m._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
                swapped += 1
        for name, b in list(m._buffers.items()):
            if b is not None and _untracked(b):
                m._buffers[name] = b.clone()
                swapped += 1
    return swapped


def _trainable_clone(model, fits: bool):
    """A clone of the MODEL to train, following ComfyUI's own trainer: ``force_deepcopy`` where it exists (an
    independent copy of the weights, reloaded from its file). Where the DiT fits the GPU (``fits``), also
    ``disable_dynamic``: ComfyUI's dynamic VRAM (>= 0.33) would otherwise keep the weights in CPU memory and stream
    each one to the GPU per use, three times a step when training (forward, recomputation, backward)."""
    params = inspect.signature(model.clone).parameters
    if "force_deepcopy" in params:
        kwargs = {"force_deepcopy": True}
        if fits and "disable_dynamic" in params and getattr(model, "is_dynamic", lambda: False)():
            kwargs["disable_dynamic"] = True
        try:
            return model.clone(**kwargs), True
        except RuntimeError as e:  # a custom loader without cached_patcher_init: fall back to swapping tensors
            logger.info("MODEL cannot be deep-copied (%s); training on a clone with ordinary tensors", e)
    return model.clone(), False


def _trainable_clip(clip, fits: bool):
    """The CLIP whose text encoder the token's gradient runs through: on ComfyUI's dynamic VRAM (>= 0.33), where it
    fits, a non-dynamic copy reloaded from its file (resident on the GPU, as the DiT's copy), instead of the graph's
    dynamic one, which streams every weight from CPU memory at each use; else the graph's CLIP itself."""
    patcher = clip.patcher
    if not (fits and getattr(patcher, "is_dynamic", lambda: False)()
            and "disable_dynamic" in inspect.signature(clip.clone).parameters):
        return clip
    try:
        copy_ = clip.clone(disable_dynamic=True)
    except RuntimeError as e:  # a loader without cached_patcher_init
        logger.info("text encoder cannot be reloaded as a non-dynamic copy (%s); training through the graph's", e)
        return clip
    copy_.cond_stage_model = copy_.patcher.model  # CLIP.clone keeps the graph's module otherwise
    return copy_


def _available_bytes(device: torch.device) -> float:
    """What this process may still allocate on ``device``: ComfyUI's free memory (the device's free memory plus what
    PyTorch's allocator holds cached), less under a per-process cap (``memory.per_process_capacity``), where only
    the memory PyTorch has handed out counts as used."""
    free = mm.get_free_memory(device)
    if device.type != "cuda":
        return free
    capacity, _ = mem.per_process_capacity(device)
    return min(free, capacity - torch.cuda.memory_allocated(device))


class ComfyBackend(TrainBackend):
    name = "comfyui"

    def __init__(self, cfg: Config, model, clip, vae, dit_engine: str = "auto"):
        super().__init__(cfg)
        from comfy.model_base import QwenImage

        if dit_engine not in ENGINES:
            raise ValueError(f"dit_engine must be one of {list(ENGINES)}, got {dit_engine!r}")
        self.dit_engine = dit_engine
        self.engine: DiffusersEngine | None = None

        kind = type(model.model).__name__
        if not isinstance(model.model, QwenImage):
            raise TypeError(f"Train Zero-Prior Token needs a Qwen-Image MODEL; this one is {kind}")
        if kind.startswith("QwenImage21"):  # ComfyUI >= 0.37: a subclass of QwenImage, but another model
            raise TypeError(f"Train Zero-Prior Token trains Qwen-Image (20B) in ComfyUI; this MODEL is {kind}. "
                            "Qwen-Image 2.1 trains with the CLI or Cog (qwen-zero-prior train on a 2.1 folder); "
                            "its archives load in ComfyUI's Register Zero-Prior Token")
        _, _, self.width, family = text_encoder_parts(clip, node="Train Zero-Prior Token")
        if family != QWEN_IMAGE:
            raise TypeError(f"Train Zero-Prior Token trains Qwen-Image (Qwen2.5-VL text encoder) in ComfyUI; this "
                            f"CLIP is {get_family(family).title}'s text encoder. Load Qwen-Image's with CLIPLoader, "
                            "type 'qwen_image'")
        self.model, self.clip, self.vae = model, clip, vae
        self._graph_clip = clip
        self.device = mm.get_torch_device()
        base = model.model
        self.dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
        self.mp = None
        self.adapters: dict[str, LoRABranch] = {}
        self.tokens: list[RegisteredToken] = []
        self.tokenizer = self._base_tokenizer()
        self.prompts: ComfyPromptEncoder | None = None
        self._in_training_flag = hasattr(mm, "in_training")
        self._was_in_training = False
        self._handles: list = []  # forward hooks of the LoRA branches (removed in close())
        self._checkpointed: list = []
        self._recast: list = []  # Linears whose per-use cast CastLinear repeats in the backward
        self._compiled: list = []  # transformer blocks compiled (model.compile), restored in close()
        self._phases = _PhaseTimer(self.device)
        self._exact: dict | None = None  # the text encoder's ExactLinear stand-ins (QWEN_ZERO_PRIOR_EXACT_TEXT)
        self._said_no_graphs = False
        self._said_no_previews = False
        self._offload = False  # the diffusers engine with the DiT's blocks offloaded (prepare)
        self._te_full = None  # with it: whether the text encoder was loaded fully (kept for reloads after previews)
        self._text_streamed = False  # with it: the text encoder's projections streamed, ComfyUI's copy unloaded
        self._text_prefetcher = None  # their WeightPrefetcher (a GPU)
        self._text_norms: dict | None = None  # its norms' weights on the device, taken before the unload
        self._text_unloaded = False  # whether ComfyUI's copy of it left the GPU

    def _base_tokenizer(self):
        tok = self.clip.tokenizer
        return tok._inner if isinstance(tok, ZeroPriorTokenizer) else tok

    # ---- setup ----------------------------------------------------------------------------------------
    def latent(self, example: Example) -> torch.Tensor:
        px = load_pixels(example.image, example.bucket)  # (3, H, W) in [-1, 1]
        img = ((px + 1.0) / 2.0).clamp(0, 1).permute(1, 2, 0)[None]  # ComfyUI IMAGE: (1, H, W, 3) in [0, 1]
        # ComfyUI's own mode for its VAE (loading it outside inference mode left its weights in a state ComfyUI's
        # next VAEDecode in the graph refused on 0.3.64); the result is copied out as an ordinary tensor
        with torch.inference_mode():
            lat = self.vae.encode(img)
            if lat.ndim == 4:
                lat = lat[:, :, None]
            lat = self.model.model.process_latent_in(lat.float()).float().cpu()[0]
        return lat.clone()

    def prepare(self, t: TrainConfig) -> None:
        async_graphs_from_env("text")  # a bad QWEN_ZERO_PRIOR_ASYNC_GRAPHS is refused now, before any model loads
        fits = self.device.type != "cuda" or _available_bytes(self.device) >= (
            self.model.model_size() + self.clip.patcher.model_size() + self._reserve())
        # the offloaded diffusers engine (a 24 GB card): ComfyUI loads the text encoder only, the engine copies the
        # DiT's blocks where they go (fp8 on the GPU as far as they fit, the rest streamed from pinned CPU memory)
        self._offload = self.dit_engine == "diffusers_offload" or (
            self.dit_engine == "auto" and self.device.type == "cuda" and not fits
            and not blockers(self.model, self.model.model.diffusion_model, self.device, offload=True,
                             scan_weights=False))
        te_fits = self.device.type != "cuda" or _available_bytes(self.device) >= (
            self.clip.patcher.model_size() + self._offload_reserve(t))
        # non-dynamic copies (resident where ComfyUI loads them, plain CPU tensors where the engine copies from)
        self.mp, deep = _trainable_clone(self.model, fits or self._offload)
        self.clip = _trainable_clip(self.clip, fits or (self._offload and te_fits))
        dm = self.mp.model.diffusion_model
        gen = torch.Generator().manual_seed(t.seed)  # the LoRA's init, without touching the global RNGs
        matched: set[str] = set()
        for name, m in dm.named_modules():
            target = next((tgt for tgt in t.lora_targets if name == tgt or name.endswith("." + tgt)), None)
            w = getattr(m, "weight", None)
            if target is None or w is None or w.ndim != 2:
                continue
            matched.add(target)
            self.adapters[name] = LoRABranch(w.shape[1], w.shape[0], t.rank, t.alpha, gen)
        unmatched = [tgt for tgt in t.lora_targets if tgt not in matched]
        if unmatched and self.adapters:  # as the core refuses them (training/lora.py add_lora)
            raise ValueError(f"train.lora_targets {unmatched} match no Linear of this MODEL; use names such as "
                             "to_q, add_q_proj, to_add_out, img_mlp.net.2")
        if not self.adapters:
            raise ValueError(f"train.lora_targets {list(t.lora_targets)} match no Linear of this MODEL")
        logger.info("LoRA rank %d on %d modules of ComfyUI's Qwen-Image (%s, %s; text encoder %s)", t.rank,
                    len(self.adapters), "deep copy" if deep else "shared weights", type(self.mp).__name__,
                    type(self.clip.patcher).__name__)
        if self._in_training_flag:
            self._was_in_training = mm.in_training
            mm.in_training = True
        self._load(dit=not self._offload)
        if self._offload and not blockers(self.mp, dm, self.device, offload=True):
            # before the engine's plan: streamed projections leave the encoder's memory to the blocks (not where the
            # engine will not start: ComfyUI's forward then keeps the encoder on the GPU)
            self._exact_text(self.clip.patcher.load_device)
        if not self._start_engine(dm, t):
            if self._offload:  # the offloaded engine could not start: ComfyUI's forward trains, ComfyUI streams
                self._offload = False
                self._exact, self._text_streamed, self._text_prefetcher, self._text_norms = None, False, None, None
                self._load()
            for name, a in self.adapters.items():
                self._handles.append(dm.get_submodule(name).register_forward_hook(a.hook))
            for m in dm.modules():
                if _plain_cast_linear(m):
                    m.forward_comfy_cast_weights = functools.partial(_recast_forward, m)
                    self._recast.append(m)
            self._checkpoint_blocks(dm)
            if self.cfg.model.compile:
                self._compile_blocks(dm)
            for a in self.adapters.values():
                a.to(self.device)
        self._make_prompts()

    def _start_engine(self, dm, t: TrainConfig) -> bool:
        """``dit_engine``: train through diffusers' transformer over ComfyUI's weights (``comfy_engine.py``) where it
        can (``auto``: on a GPU, without recomputing blocks) or where asked; else ComfyUI's forward. Logs which and
        why."""
        started = self._engine_or_why(dm, t)
        if not started and self.cfg.model.fp8_matmul:
            logger.warning("fp8_matmul is used by the diffusers DiT engine only; ComfyUI's forward computes in %s",
                           str(self.dtype).removeprefix("torch."))
        return started

    def _engine_or_why(self, dm, t: TrainConfig) -> bool:
        if self.dit_engine == "comfyui":
            logger.info("DiT engine: ComfyUI's forward (dit_engine: comfyui)")
            return False
        if self.dit_engine == "auto" and self.device.type != "cuda":
            logger.info("DiT engine: ComfyUI's forward (dit_engine: auto uses diffusers' on a GPU; this is %s)",
                        self.device.type)
            return False
        reasons = blockers(self.mp, dm, self.device, offload=self._offload)
        recompute = self.cfg.model.gradient_checkpointing or self._offload
        if not reasons and not recompute and self.device.type == "cuda":
            # fp8 matmuls on weights not stored in fp8 (a bf16 file) quantize copies of them, while ComfyUI's
            # module keeps its own: ~1 byte a weight more
            extra = added_bytes(dm) if self.cfg.model.fp8_matmul else 0
            available = _available_bytes(self.device) - mem.MARGIN_GIB * mem.GIB - extra
            k = mem.blocks_to_checkpoint(len(dm.transformer_blocks), available, t.resolution, t.batch_size)
            if k and self.dit_engine == "auto":
                reasons.append(f"memory: {k} of {len(dm.transformer_blocks)} blocks would be recomputed "
                               f"({max(available, 0) / mem.GIB:.1f} GiB available)")
            recompute = bool(k)
        if reasons:
            if self.dit_engine in ("diffusers", "diffusers_offload"):
                raise EngineUnavailable(f"dit_engine {self.dit_engine} cannot train this MODEL: " + "; ".join(reasons)
                                        + ". Use dit_engine auto or comfyui")
            logger.info("DiT engine: ComfyUI's forward (diffusers' cannot: %s)", "; ".join(reasons))
            return False
        from ..training.fp8 import Fp8Error
        from ..training.shared_dit import SharedDiTError

        m = engine_model_config(self.cfg.model, self.device, recompute)
        plan = None
        if self._offload:
            _ordinary_tensors(dm)  # the engine copies from them (on a CPU, shares them): no inference tensors
            plan, m = self._offload_plan(t, m, dm)
        init = {name: a.lora_A.detach() for name, a in self.adapters.items()}
        try:
            self.engine = DiffusersEngine(dm, m, list(t.lora_targets), t.rank, t.alpha, init, self.device,
                                          self.dtype, recompute, offload=plan)
        except Fp8Error as e:
            raise Fp8Error(f"{e} (in the node: turn its fp8_matmul input off)") from e
        except (SharedDiTError, EngineUnavailable, AttributeError, TypeError) as e:
            # a ComfyUI whose DiT no longer matches diffusers' layout: ComfyUI's forward still trains it
            if self.dit_engine in ("diffusers", "diffusers_offload"):
                raise EngineUnavailable(f"dit_engine {self.dit_engine} could not be built over this MODEL: {e}. Use "
                                        "dit_engine auto or comfyui") from e
            logger.warning("DiT engine: ComfyUI's forward (diffusers' could not be built: %s: %s)",
                           type(e).__name__, e)
            return False
        self.adapters.clear()
        logger.info("DiT engine: diffusers' transformer over ComfyUI's weights (%s%s%s)", self.engine.describe(),
                    f", attention {m.attention_backend}" if m.attention_backend else "",
                    ", gradient checkpointing" if recompute else "")
        return True

    def _offload_reserve(self, t: TrainConfig) -> int:
        """What the offloaded engine's step needs beside the blocks' weights: the core's offload reserve
        (activations with every block recomputed, the LoRA and its AdamW state; more at larger images or batches)
        plus :data:`NODE_OFFLOAD_EXTRA_GIB`, which also covers what ``model.compile`` adds in the core."""
        act = mem.activation_gib(mem.ACT_CHECKPOINT_GIB, t.resolution, t.batch_size) + mem.MARGIN_GIB
        extra = max(NODE_OFFLOAD_EXTRA_GIB, mem.OFFLOAD_COMPILE_RESERVE_GIB if self.cfg.model.compile else 0.0)
        return int((max(mem.OFFLOAD_RESERVE_GIB, act) + extra) * mem.GIB)

    def _offload_plan(self, t: TrainConfig, m, dm):
        """The offloaded engine's :class:`OffloadPlan` (what is left on the device after the text encoder, less
        :meth:`_offload_reserve`; ``QWEN_ZERO_PRIOR_RESIDENT_BLOCKS`` fixes the resident blocks instead) and the
        ``model:`` options it runs with (offload stores the blocks in fp8 itself: no ``fp8_matmul``)."""
        resident = resident_blocks(os.environ.get(RESIDENT_BLOCKS_ENV, ""))
        if resident is not None:
            resident = min(resident, len(dm.transformer_blocks))  # more than there are: all of them
        if self.device.type == "cuda":
            available = _available_bytes(self.device) - self._offload_reserve(t)
        else:  # no device memory to plan for: every block resident unless told otherwise
            available = float("inf")
        if m.fp8_matmul:
            logger.warning("fp8_matmul: not with the offloaded engine, which stores the DiT's blocks in fp8 itself "
                           "and casts them per use")
            m = dataclasses.replace(m, fp8_matmul=False)
        wide = sorted({str(lin.weight.dtype).removeprefix("torch.") for lin in dm.transformer_blocks.modules()
                       if isinstance(lin, nn.Linear) and lin.weight.dtype.itemsize > 1})
        if wide:
            logger.warning("offloaded DiT engine: the blocks' weights are stored as %s; it keeps them in fp8 (row-scaled "
                           "e4m3, as the CLI's model.offload), so the LoRA trains against fp8-rounded weights. An fp8 "
                           "DiT file is used as it is; dit_engine comfyui keeps these weights as loaded (slower)",
                           "/".join(wide))
        prefetch = self.cfg.model.offload_prefetch_gib if self.device.type == "cuda" else 0.0
        return OffloadPlan(max(available, 0.0), prefetch, resident), m

    def _checkpoint_blocks(self, dm) -> None:
        """Recompute the activations of as many transformer blocks as memory needs (all of them with
        ``model.gradient_checkpointing``, or where some Linear's per-use cast is not one :class:`CastLinear`
        repeats: autograd would keep those casts), the first blocks first."""
        blocks = dm.transformer_blocks
        t = self.cfg.train
        recast = {id(m) for m in self._recast}
        device = resolved_device(self.device)
        uncovered = [n for n, m in blocks.named_modules()
                     if isinstance(m, nn.Linear) and getattr(m, "comfy_cast_weights", False)
                     and (id(m) not in recast or m.weight.device != device)]
        if self.cfg.model.gradient_checkpointing:
            k, why = len(blocks), "model.gradient_checkpointing"
        elif uncovered:
            k, why = len(blocks), (f"{len(uncovered)} Linears cast their weights per use in a way this node does not "
                                   "repeat in the backward (weights streamed from CPU memory, or a scaled format), e.g. "
                                   f"{uncovered[0]} ({type(blocks.get_submodule(uncovered[0])).__qualname__})")
        elif self.device.type != "cuda":
            k, why = 0, f"{self.device.type}: no GPU memory to plan for"
        else:
            available = _available_bytes(self.device) - mem.MARGIN_GIB * mem.GIB
            k = mem.blocks_to_checkpoint(len(blocks), available, t.resolution, t.batch_size)
            why = (f"~{mem.activation_gib(mem.ACT_EAGER_GIB, t.resolution, t.batch_size):.0f} GiB of activations "
                   f"without recomputation, {max(available, 0) / mem.GIB:.1f} GiB available")
        logger.info("gradient checkpointing on %d of %d transformer blocks (%s)", k, len(blocks), why)
        # as ComfyUI's trainer does (its patch()/unpatch()): each block's forward wrapped, restored in close()
        for block in list(blocks)[:k]:
            self._checkpointed.append((block, block.__dict__.get("forward")))
            block.forward = _checkpointed(block.forward)

    def _compile_blocks(self, dm) -> None:
        """``model.compile``: each transformer block ``torch.compile``d (regional compilation, as diffusers'
        ``compile_repeated_blocks``: the 60 blocks share one compiled graph), its Linears' casts through
        ``training/cast_linear.py``'s op. Only where no block is recomputed (checkpointing around compiled blocks, and weights
        ComfyUI streams per use, are left eager); undone in ``close()``."""
        blocks = list(dm.transformer_blocks)
        if self.device.type == "cuda" and not _has_triton():
            logger.warning("model.compile: triton is not installed, which torch.compile needs on a GPU (pip install "
                           "triton; on Windows triton-windows): training eagerly")
            return
        if self._checkpointed:
            logger.info("model.compile: not compiling (%d of %d transformer blocks are recomputed: memory is short "
                        "or weights are streamed); training eagerly", len(self._checkpointed), len(blocks))
            return
        from ..training import compile_fixes

        cast_linear_op()  # registered before any compiled call (dynamo cannot trace the registration)
        compile_fixes.install()  # a torch 2.11 inductor bug (see compile_fixes.py)
        for m in self._recast:
            m.forward_comfy_cast_weights = functools.partial(_compiled_forward, m)
        for block in blocks:
            block.compile()
            self._compiled.append(block)
        logger.info("model.compile: compiled %d transformer blocks (the first steps compile)", len(blocks))

    def _reserve(self) -> int:
        """What the backward needs at least (every block recomputed), as the core's memory plan counts it."""
        t = self.cfg.train
        return int((mem.activation_gib(mem.ACT_CHECKPOINT_GIB, t.resolution, t.batch_size) + mem.MARGIN_GIB) * mem.GIB)

    def _load(self, dit: bool = True) -> None:
        """Load DiT and text encoder for training, leaving room for backward activations: fully where they fit,
        else partially (ComfyUI then streams the rest per use; the per-block checkpointing bounds what backward
        keeps). Without ``dit`` (the offloaded engine, which places the DiT's weights itself) the text encoder only,
        leaving what the engine needs besides free. Then make every weight an ordinary tensor (a no-op for a deep
        copy made outside inference mode)."""
        t = self.cfg.train
        if not dit and self._text_streamed:  # the text encoder's projections are streamed: nothing for ComfyUI to load
            return
        reserve = self._reserve() if dit else self._offload_reserve(t)
        models = [self.mp, self.clip.patcher] if dit else [self.clip.patcher]
        size = sum(p.model_size() for p in models)
        if not dit and self._te_full is not None:
            # again after a sample preview: the engine's blocks now hold what the text encoder was loaded beside
            full = self._te_full
        else:
            full = self.device.type != "cuda" or _available_bytes(self.device) >= size + reserve
            if not dit:
                self._te_full = full
        if not full:
            logger.info("%s (%.1f GiB) do not fit with %.1f GiB for activations in %.1f GiB free: loading partially, "
                        "ComfyUI streams the rest", "DiT + text encoder" if dit else "the text encoder",
                        size / 2**30, reserve / 2**30, mm.get_free_memory(self.device) / 2**30)
        mm.load_models_gpu(models, memory_required=reserve, force_full_load=full)
        dm, te = self.mp.model.diffusion_model, qwen_decoder(self.clip)
        swapped = (_ordinary_tensors(dm) if dit else 0) + _ordinary_tensors(te)
        logger.debug("swapped %d inference tensors for ordinary ones", swapped)
        # frozen, as ComfyUI's trainer makes them: a base weight left trainable would get a full gradient (and an
        # fp8 one cannot even be accumulated: "add not implemented for Float8" at the second step)
        dm.requires_grad_(False)
        te.requires_grad_(False)

    def _make_prompts(self) -> None:
        m = self.cfg.model
        device = self.clip.patcher.load_device
        exact = self._exact_text(device)
        # (streamed projections never replay as graphs: their fetches are the prefetcher's host-side logic)
        graphs = bool(exact) and m.text_cuda_graphs and torch.device(device).type == "cuda" and not self._text_streamed
        blocked = graphs_blocked(device) if graphs else None
        norms = self._text_norms if self._text_streamed else None
        dit_graphs = self.engine is not None and self.engine.graphs is not None
        if blocked and async_text_graphs(dit_graphs):
            # captured as training/graphs.py captures (thread_local, ComfyUI's offload streams off), which works under
            # cudaMallocAsync; the norms' weights from copies on the device, so nothing captured is ComfyUI's to move
            if not self._said_no_graphs:
                logger.info("text encoder: CUDA graphs captured under the cudaMallocAsync allocator (%s=0 turns "
                            "them off)", ASYNC_GRAPHS_ENV)
                self._said_no_graphs = True
            blocked = None
            norms = norms or norm_copies(qwen_decoder(self.clip), device)
        elif blocked and dit_graphs:
            blocked = f"the DiT's graphs are captured instead ({ASYNC_GRAPHS_ENV}=dit; unset or 1 captures both)"
        if blocked and not self._said_no_graphs:
            logger.info("text encoder: no CUDA graphs (%s)", blocked)
            self._said_no_graphs = True
        self.prompts = ComfyPromptEncoder(
            self.clip, self.tokenizer, device,
            vectors={tok.token_id: tok.vector for tok in self.tokens},
            prefix_cache=m.text_prefix_cache, cuda_graphs=graphs and not blocked, compile=False, exact=exact,
            norms=norms, capture_guard=comfy_offload_streams_off,
        )

    def _engine_reserve(self) -> int | None:
        """What the diffusers engine's step needs beside the weights: activations without recomputation (the core's
        measured figure with CUDA graphs; compiled without graphs, the core's figure for that, which the node's step
        kept to on an H200: 65.4 GiB device peak with 12.2 GiB of text-encoder copies under a 78 GiB cap; eager, the
        figure the engine is admitted with), the graphs' pools, the margin; or None where the DiT does not train
        through the engine or recomputes blocks (its plan then fills the card)."""
        e, t = self.engine, self.cfg.train
        if e is None or e.recompute:
            return None
        act = (mem.ACT_RESIDENT_COMPILED_GIB if e.reduce_overhead else mem.ACT_RESIDENT_GIB if e.compiled
               else mem.ACT_EAGER_GIB)
        pools = mem.REDUCE_OVERHEAD_POOL_GIB if e.reduce_overhead else 0.0
        return int((mem.activation_gib(act, t.resolution, t.batch_size) + pools + mem.MARGIN_GIB) * mem.GIB)

    def _exact_text(self, device) -> dict:
        """The text encoder's projections as ``ExactLinear`` (``comfy_text.exact_projections``): ComfyUI's float32
        numbers from copies of its weights, bf16 (~12 GiB for the 7B encoder) or, for an fp8-scaled file, its e4m3
        data (~6 GiB, cast for each use: 38 ms a step slower at 1024² on an H200), no per-layer recompute; where
        ``comfy_text.exact_text_choice`` picks them (``QWEN_ZERO_PRIOR_EXACT_TEXT``, default auto: with the
        diffusers engine on a GPU, where they fit). With the offloaded engine (called before it is built) the copies
        stay in CPU memory and are streamed for each use, and ComfyUI's copy of the encoder is unloaded, which
        leaves its GPU memory to the DiT's blocks (:meth:`_stream_text`). Made once; {} otherwise (the log says
        why)."""
        if self._exact is not None:
            return self._exact
        self._exact = {}
        device = torch.device(device)
        model = qwen_decoder(self.clip)
        modules = [m for _, _, m in projection_modules(model)]
        needs = {"bf16": sum(exact_bytes(m, True) for m in modules), "e4m3": sum(exact_bytes(m) for m in modules)}
        reserve = None if self._offload else self._engine_reserve()
        available = _available_bytes(device) - reserve if device.type == "cuda" and reserve is not None else None
        try:
            choice, why = exact_text_choice(os.environ.get(EXACT_TEXT_ENV, ""), device_type=device.type,
                                            engine_reserve=reserve, available=available, needs=needs,
                                            offloaded=self._offload)
        except ValueError as e:
            logger.warning("%s: the text encoder keeps ComfyUI's projections", e)
            return self._exact
        if choice is None:
            logger.info("text encoder: ComfyUI's projections (%s)", why)
            return self._exact
        try:
            self._exact, why = exact_projections(model, device, choice == "bf16", stream=self._offload)
        except RuntimeError as e:  # page-locked CPU memory ran out (torch.OutOfMemoryError is a RuntimeError)
            if not self._offload:
                raise
            logger.warning("text encoder: its projections could not be copied to pinned CPU memory for streaming "
                           "(%s: %s); ComfyUI's projections stay on the GPU (as QWEN_ZERO_PRIOR_EXACT_TEXT=0 does)",
                           type(e).__name__, str(e).splitlines()[0][:200])
            self._exact = {}
            return self._exact
        if self._exact and self._offload:
            self._stream_text(device)
        kinds = sorted({str(e.weight.dtype).removeprefix("torch.") for e in self._exact.values()})
        copies = sum(e.weight.numel() * e.weight.element_size() for e in self._exact.values())
        where = "streamed from CPU memory" + (
            f" through a {self._text_prefetcher.arena_bytes / mem.GIB:.2f} GiB prefetch ring"
            if self._text_prefetcher is not None else "") + (
            ", ComfyUI's copy unloaded" if self._text_unloaded else
            ", ComfyUI's copy left where it is (not unloaded)") if self._text_streamed else ""
        logger.info("text encoder: %s", f"exact bf16-split projections ({len(self._exact)} Linears, "
                    f"{copies / mem.GIB:.1f} GiB of {'/'.join(kinds)} copies{', ' + where if where else ''}), "
                    "no per-layer recompute" if self._exact else f"ComfyUI's projections (no exact form: {why})")
        return self._exact

    def _stream_text(self, device: torch.device) -> None:
        """The offloaded engine's text encoder: its projections are :class:`StreamedExactLinear` (copies in CPU
        memory, made by :meth:`_exact_text`). ComfyUI's copy is unloaded from the GPU (``free_memory`` keeping every
        other model loaded: the same call ComfyUI makes to make room), so the engine's plan, made next, gives that
        memory (~7 GiB for an fp8-scaled file) to resident DiT blocks. The norms are copied to the device first (as
        loaded, patches applied); the prompt encoder looks the embedding's rows up in CPU memory. On a GPU the
        projections get their own prefetch ring (``model.offload_prefetch_gib`` > 0): copies run ahead of use on a
        side stream, in the order the last step used them."""
        from ..training.exact_linear import StreamedExactLinear
        from ..training.prefetch import WeightPrefetcher

        patcher = self.clip.patcher
        # the norms as ComfyUI loaded them (weight patches applied), before the unload restores the unpatched ones
        self._text_norms = norm_copies(qwen_decoder(self.clip), device)
        keep = [lm for lm in mm.current_loaded_models if lm.model is not patcher]
        unloaded = mm.free_memory(1e30, device, keep_loaded=keep)
        # (nothing is freed where the encoder's offload device is the GPU itself: ComfyUI's --gpu-only)
        self._text_unloaded = any(getattr(lm, "model", None) is patcher for lm in unloaded)
        self._text_streamed = True
        layers = [e for e in self._exact.values() if isinstance(e, StreamedExactLinear)]
        if device.type == "cuda" and self.cfg.model.offload_prefetch_gib > 0 and layers:
            largest = max(e.stored.numel() * e.stored.element_size() for e in layers)
            # a few of the largest weights ahead: the copies are what a step waits for (a suffix of a few tokens is
            # little compute), and the GPU memory is taken from the blocks
            self._text_prefetcher = WeightPrefetcher(device, max(TEXT_RING_BYTES, 2 * largest + 2**20))
            for e in layers:
                e.prefetcher = self._text_prefetcher

    def named_lora_parameters(self) -> list[tuple[str, nn.Parameter]]:
        if self.engine is not None:
            return self.engine.named_lora_parameters()
        return [p for name, a in self.adapters.items()
                for p in ((f"{name}.lora_A.weight", a.lora_A), (f"{name}.lora_B.weight", a.lora_B))]

    def export_lora(self) -> dict[str, torch.Tensor]:
        """Diffusers keys (ComfyUI's Qwen-Image DiT has diffusers' module names), alpha/rank folded into B."""
        if self.engine is not None:
            return self.engine.export_lora()
        out = {}
        for name, a in self.adapters.items():
            out[f"transformer.{name}.lora_A.weight"] = a.lora_A.detach().float().cpu().clone()
            out[f"transformer.{name}.lora_B.weight"] = a.lora_B.detach().float().cpu().clone() * a.scale
        return out

    def add_tokens(self, tokens: list[str], init_std: float, generator: torch.Generator) -> list[RegisteredToken]:
        tok = copy.deepcopy(self._base_tokenizer())  # CLIP.clone() shares the tokenizer: never mutate the graph's
        sd_tok = getattr(tok, tok.clip)
        ids = add_placeholder_tokens(sd_tok.tokenizer, tokens)
        for token, token_id in zip(tokens, ids):
            sd_tok.inv_vocab[token_id] = token
        self.tokenizer = tok
        width = self.width
        device = self.clip.patcher.load_device
        # drawn in list order from the one generator: the first token gets what a one-token run gets
        self.tokens = [RegisteredToken(token, token_id, own_vector=nn.Parameter(
                           init_vector(width, init_std, generator).to(device)))
                       for token, token_id in zip(tokens, ids)]
        if self.cfg.debug.log_prompt_ids:
            for t in self.tokens:
                logger.info("placeholder token %r registered as id %d in ComfyUI's tokenizer", t.token, t.token_id)
            logger.info("gradient mask active: only the %d-wide vector%s for id%s %s train%s (weight decay 0)", width,
                        "s" if len(ids) > 1 else "", "s" if len(ids) > 1 else "", ", ".join(map(str, ids)),
                        "" if len(ids) > 1 else "s")
        if self.prompts is not None:
            self._make_prompts()
        return self.tokens

    def check_trigger(self, token: str) -> None:
        check_single_id(getattr(self.tokenizer, self.tokenizer.clip).tokenizer, token,
                        context="train_placeholder_token is off")

    # ---- every step -----------------------------------------------------------------------------------
    def prompt_ids(self, caption: str) -> list[int]:
        return self.prompts.ids(caption) if self.prompts is not None else []

    def encode(self, captions: list[str]):
        with self._phases("text encoder forward"):
            return self.prompts.encode(captions, self.dtype, self.device)

    def predict(self, noisy, sigmas, embeds, mask):
        if self.engine is not None:
            with self._phases("DiT forward"):
                return self.engine.predict(noisy, sigmas, embeds, mask)
        dm = self.mp.model.diffusion_model
        # the MODEL's own transformer options (patches other nodes added apply as when sampling), in a fresh dict:
        # the forward writes into it, and its default argument is shared
        options = dict(self.mp.model_options.get("transformer_options", {}))
        # cuDNN first for the training forward's attention, unless the graph set its own override (comfy_attention)
        options.setdefault("optimized_attention_override", training_attention)
        with self._phases("DiT forward"):
            return dm(noisy.to(self.dtype), sigmas.to(self.dtype), embeds.to(self.dtype), attention_mask=mask,
                      transformer_options=options)

    def step_begin(self) -> None:
        super().step_begin()
        if self.engine is not None:
            self.engine.step_begin()
        if self._text_prefetcher is not None:  # the text encoder's streamed projections, in the last step's order
            self._text_prefetcher.begin_step()
        self._phases.step()

    # ---- the rest -------------------------------------------------------------------------------------
    def sample(self, prompts: list[str], step: int) -> list:
        """Few-step samples through ComfyUI's sampler and VAE with the current LoRA and token (none with the
        offloaded engine on a GPU: ``comfy_engine.previews_blocked``)."""
        blocked = previews_blocked(self._offload, self.device.type)
        if blocked:
            if not self._said_no_previews:
                logger.warning(blocked)
                self._said_no_previews = True
            return []
        images = []
        for i, prompt in enumerate(prompts):
            cond, mask = self.prompts.encode([prompt], torch.float32, torch.device("cpu"))
            extra = {} if bool(mask.all()) else {"attention_mask": mask}
            with self.engine.on_comfy_modules() if self.engine is not None else contextlib.nullcontext():
                images.append(self._render(cond.detach(), extra, self.cfg.sample.seed + i))
        # sampling and decoding may have reloaded models under ComfyUI's management: make them trainable again
        # (the offloaded engine's weights are its own copies: only the text encoder, and room beside it)
        self._load(dit=not self._offload)
        if self.engine is not None and not self._offload:
            dm = self.mp.model.diffusion_model
            moved = blockers(self.mp, dm, self.device)
            if moved:  # ComfyUI reloaded the DiT partially for the preview (memory ran short)
                raise EngineUnavailable("after the sample preview the DiT is no longer where the diffusers engine "
                                        f"trains it ({moved[0]}); set preview_every to 0, or dit_engine to comfyui")
            self.engine.rebind()
        return images

    @torch.inference_mode()
    def _render(self, cond: torch.Tensor, extra: dict, seed: int):
        """One sample through ComfyUI's sampler and VAE, in ComfyUI's own (inference) mode."""
        import comfy.sample
        from PIL import Image

        s = self.cfg.sample
        positive = [[cond.clone(), extra]]
        w, h = (s.width or self.cfg.train.resolution), (s.height or self.cfg.train.resolution)
        latent = comfy.sample.fix_empty_latent_channels(self.mp, torch.zeros(1, 16, h // 8, w // 8))
        noise = comfy.sample.prepare_noise(latent, seed)
        samples = comfy.sample.sample(self.mp, noise, s.steps, s.guidance, "euler", "simple", positive, positive,
                                      latent, disable_pbar=True, seed=seed)
        img = self.vae.decode(samples)
        while img.ndim > 4:
            img = img[:, 0] if img.shape[1] == 1 else img.reshape(-1, *img.shape[-3:])
        arr = (img[0].float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(arr)

    def base_model(self) -> str:
        return "Qwen/Qwen-Image"

    def archive_extra(self) -> dict:
        try:
            from comfyui_version import __version__ as version
        except ImportError:
            version = None
        return {"trained_with": "ComfyUI", "comfyui_version": version,
                "dit_engine": "comfyui" if self.engine is None else "diffusers_offload" if self._offload
                else "diffusers",
                "dit_storage_dtype": str(self.model.model.get_dtype()).removeprefix("torch."),
                "compute_dtype": str(self.dtype).removeprefix("torch.")}

    def close(self) -> None:
        """Leave ComfyUI's modules as they were: hooks removed, block forwards restored, training flag reset (the
        graph continues with the archive applied through ComfyUI's own LoRA patching). The phase times are logged
        last: reading them synchronizes the GPU, which re-raises an earlier CUDA error."""
        if self._in_training_flag:
            mm.in_training = self._was_in_training
        for what, ring in (("DiT blocks", getattr(self.engine, "prefetcher", None)),
                           ("text encoder", self._text_prefetcher)):
            if ring is not None:  # copies made ahead (hits) against copies at use (misses): the streaming's health
                logger.info("prefetch (%s): %s", what, ring.stats())
        if self.engine is not None:
            engine, self.engine = self.engine, None
            try:
                engine.close()
            except RuntimeError as e:  # a failed run's CUDA error: the run's own exception is the one to see
                logger.warning("releasing the diffusers engine's memory failed: %s", e)
        for m in self._recast:
            m.__dict__.pop("forward_comfy_cast_weights", None)
        self._recast.clear()
        for block in self._compiled:  # nn.Module.compile() set it; None is eager again
            block._compiled_call_impl = None
        self._compiled.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for block, own in self._checkpointed:
            if own is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = own
        self._checkpointed.clear()
        suffix = getattr(self.prompts, "suffix", None)
        if suffix is not None:  # the text encoder's graphs: their memory freed without a warning per tensor (graphs.py)
            try:
                suffix.release_graphs()
            except RuntimeError as e:  # a failed run's CUDA error: the run's own exception is the one to see
                logger.warning("releasing the text encoder's CUDA graphs failed: %s", e)
        # the trainable clone (a deep copy of the DiT on ComfyUI >= 0.25) and the branches are not needed any more:
        # the graph goes on with the archive applied through ComfyUI's own LoRA patching
        self.mp, self.prompts, self.clip = None, None, self._graph_clip
        self._exact = None  # the text encoder's weight copies (6-12 GiB on a GPU, or pinned in CPU memory)
        self._text_prefetcher, self._text_norms = None, None  # its ring buffer and copy stream, its norms' copies
        self.adapters.clear()
        if self.device.type == "cuda":
            try:  # the copies, the text encoder's and the engine's CUDA-graph pools back to the device for sampling
                gc.collect()
                mm.soft_empty_cache()
                # the streamed weights' page-locked CPU memory back to the OS (PyTorch's host allocator keeps what is
                # freed cached: ~15 GiB for the offloaded engine on a 24 GB card)
                host_empty = getattr(torch._C, "_host_emptyCache", None)
                if host_empty is not None:
                    host_empty()
            except RuntimeError as e:  # a failed run's CUDA error: the run's own exception is the one to see
                logger.warning("releasing the training memory failed: %s", e)
        try:
            self._phases.report()
        except RuntimeError as e:  # a failed run's CUDA error: the run's own exception is the one to see
            logger.warning("phase times not available: %s", e)


class _PhaseTimer:
    """Median GPU time of the forward phases and of whole steps (the rest is backward + optimizer), from CUDA events
    read once when training ends (no sync inside a step); logged by ``close()``. Nothing on a CPU. With
    ``QWEN_ZERO_PRIOR_PROFILE_STEPS=N`` also the kernel table of N steps (``training/profiling.py``)."""

    def __init__(self, device: torch.device):
        self.events: dict[str, list] = {}
        self.steps: list = []
        self.enabled = device.type == "cuda"
        self.profiler = StepProfiler(device)

    def step(self) -> None:
        if self.enabled:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.steps.append(e)
            self.profiler.step(len(self.steps))

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self.events.setdefault(name, []).append((start, end))

    def report(self) -> None:
        if self.profiler.finish():  # also where training ended inside the profiled steps
            logger.info("kernels of %d profiled steps (%s):\n%s", self.profiler.steps, PROFILE_ENV,
                        self.profiler.table)
        if not self.enabled or len(self.steps) < 3:
            return
        torch.cuda.synchronize()
        # step i spans steps[i]..steps[i+1]; the first (warm-up, caches) and the last (no end mark) are left out
        whole = statistics.median(a.elapsed_time(b) for a, b in zip(self.steps[1:-1], self.steps[2:]))
        parts = {name: statistics.median(a.elapsed_time(b) for a, b in pairs[1:] or pairs)
                 for name, pairs in self.events.items()}
        logger.info("phase times (median GPU ms): step %.1f, %s, backward + optimizer + rest %.1f", whole,
                    ", ".join(f"{k} {v:.1f}" for k, v in parts.items()), whole - sum(parts.values()))


def _checkpointed(forward):
    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


__all__ = ["ComfyBackend", "LoRABranch"]
