"""``model.memory``: how the models are placed for training, chosen from the GPU's memory when ``auto``.

Plans, fastest first:

- ``resident``: every weight on the GPU, no recomputation;
- ``checkpoint``: every weight on the GPU, the transformer's activations recomputed per block in the backward
  (``gradient_checkpointing``): ~20 GiB less at 1024² for ~30% more compute;
- ``offload``: fp8 transformer weights, what does not fit streamed from CPU memory, the text encoder's layers on
  the GPU as loaded where they fit (a 24 GB card), else streamed (:func:`text_encoder_storage`), checkpointing
  (``training/offload.py``): trains on 24 GB cards. Qwen-Image 2.1 (:func:`choose_21`, given the weights by part):
  every weight stays on the GPU where fp8 storage makes it fit (its text decoder in bf16 where that fits, else
  fp8); nothing is streamed on a 24 GB card.

``auto`` (the default) picks the first that fits the memory this process may use: the device's total, or less
under a per-process cap (``torch.cuda.set_per_process_memory_fraction``, how an 80 GB card is emulated on a bigger
one), minus what other processes hold. It logs the plan and why. ``manual`` keeps ``gradient_checkpointing`` and
``offload`` exactly as set (the settings before this option existed). On a CPU every plan is ``resident``.
``resident`` and ``checkpoint`` also need the weights' placement to fit (``load_bytes``): ``fp8_matmul``'s layers
reach the GPU in bf16 and are converted there after the LoRA is added, so that moment holds more than the step's
weights (Qwen-Image: 51.5 against 45.1 GiB).

The activation figures are per-sample at 1024² (4096 image tokens), from full-scale H200 runs
(``docs/benchmarks.md``), and scale with the number of image tokens. The frozen weights of Qwen-Image in bf16 are
53.7 GiB (DiT 38.1, Qwen2.5-VL-7B text encoder with its vision tower 15.4, VAE 0.24); ``model.fp8_matmul`` keeps the
DiT's image-stream projections (6.8B values, 12.7 GiB in bf16) as one fp8 copy with float32 row scales (6.3 GiB),
47.4 GiB in all. Training leaves the text encoder's vision tower and LM head (2.3 GiB, never run for text
conditioning) in CPU memory (``text_parts.park``): 45.1 GiB placed (:func:`weights_bytes` counts them from the
loaded models). Measured: the compiled reduce-overhead
step peaked at 75.8 GiB with bf16-sized weights (so did the fp8_matmul step while it kept two fp8 copies, the
bytes of bf16: issue #15), and that fp8 step ran out of memory under a 78 GiB cap; the eager resident step did not
fit 78 GiB either (75.7 GiB allocated at its OOM); with checkpointing the step peaked at 57.3-57.4 GiB. A safety
margin covers the allocator's fragmentation, the LoRA with its optimizer state and the text encoder's CUDA-graph
pools.

:func:`resolve` applies the plan to a :class:`~qwen_zero_prior.training.config.Config` and adjusts what the plan
makes impossible (reduce-overhead CUDA graphs crash with checkpointing: "graph recording observed an input tensor
deallocate"; offload streams weights from Python code compile cannot trace), logging each change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .families import QWEN_IMAGE_21

logger = logging.getLogger(__name__)

PLANS = ("auto", "manual", "resident", "checkpoint", "offload")
GIB = 2**30
# per sample at 1024², activations kept for the backward, in GiB:
# - compiled with reduce-overhead (measured): the step peaked at 75.8 GiB over 53.7 GiB of weights, 22.1 GiB of
#   which ~1.4 are the LoRA with its gradients and AdamW moments (~94M float32 values x 4) and ~1.1 the text
#   encoder's graphs (its own step peaked at 54.8 GiB): ~19.5 GiB of activations. With MARGIN_GIB and the pools
#   the plan asks w + 27 GiB: 80.7 GiB for bf16 weights, more than the 78 GiB under which the 75.8 GiB step ran out
#   of memory (the private graph pools fragment: ~2 GiB of slack was not enough), 74.4 GiB for fp8_matmul's.
ACT_RESIDENT_COMPILED_GIB = 19.5
# - eager, or compiled without CUDA graphs (not measured alone): a lower bound from the eager step that did not fit
#   78 GiB (75.7 GiB allocated at its OOM), i.e. it needs more than ~22 GiB over its weights
ACT_RESIDENT_GIB = 24.0
ACT_CHECKPOINT_GIB = 1.5  # per sample at 1024² with per-block recomputation (57.4 GiB peak over 53.7 GiB)
# - eager and without recomputation: the diffusers + peft step peaked at 91.7 GiB over ~54 GiB of weights; the
#   ComfyUI training node plans its per-block recomputation from it
ACT_EAGER_GIB = 38.0
MARGIN_GIB = 4.0  # allocator fragmentation, CUDA-graph pools, the optimizer's state and the LoRA
REDUCE_OVERHEAD_POOL_GIB = 3.5  # torch.compile's reduce-overhead graphs keep their own memory pools
# placing the weights (training/models.place_pipeline) holds fp8_matmul's layers in bf16 until the trainer converts
# them on the GPU, one layer at a time, after adding the LoRA: the load needs those bytes plus one layer's
# conversion (the largest of Qwen-Image's, 3072 x 12288: 72 MiB in bf16, ~0.3 GiB with its float32 temporaries)
# and the allocator's rounding
LOAD_MARGIN_GIB = 1.0


@dataclass
class MemoryPlan:
    mode: str  # resident | checkpoint | offload
    reason: str
    capacity_gib: float | None = None
    weights_gib: float | None = None
    need_gib: dict | None = None
    layout: dict | None = None  # where the offload plan keeps each part (Qwen-Image 2.1: see choose_21)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.mode in ("checkpoint", "offload")

    @property
    def offload(self) -> bool:
        return self.mode == "offload"


CAPACITY_ENV = "QZP_GPU_MEMORY_GIB"  # an external per-process limit torch cannot see (a cluster's), in GiB


def per_process_capacity(device: torch.device) -> tuple[float, float]:
    """(bytes this process may allocate on ``device``, bytes free on the device now): the device's memory, less
    under ``torch.cuda.set_per_process_memory_fraction`` or ``QZP_GPU_MEMORY_GIB``, at most what is free plus what
    this process already holds."""
    import os

    # an index always: the fraction getter does not resolve a bare "cuda" (it answered 1.0 under a 78 GiB cap)
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    env = os.environ.get(CAPACITY_ENV)
    if env:
        total = min(total, float(env) * GIB)
    fraction = 1.0
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if getter is not None:
        try:
            fraction = float(getter(device.index))
        except (RuntimeError, TypeError, ValueError):  # older builds, or no allocator yet
            fraction = 1.0
    return min(total * fraction, free + torch.cuda.memory_allocated(device)), float(free)


def activation_gib(per_sample_1024: float, resolution: int, batch_size: int) -> float:
    return per_sample_1024 * batch_size * (resolution / 1024) ** 2


def choose(mode: str, *, weights_bytes: int, resolution: int, batch_size: int, device: torch.device,
           reduce_overhead: bool = False, capacity_bytes: float | None = None,
           parts: WeightBytes | None = None, load_bytes: int | None = None) -> MemoryPlan:
    """The plan for ``mode`` (see the module docstring). ``weights_bytes``: the frozen models' bytes once placed
    (transformer + text encoder + VAE, :func:`weights_bytes`). ``reduce_overhead``: ``model.compile`` with
    ``compile_mode: reduce-overhead`` or ``max-autotune`` (CUDA graphs: ``ModelConfig.compile_graphs``; the
    measured activation figure and graph pools). ``capacity_bytes``
    overrides what the device reports (tests). ``parts``: the weights by part (:func:`weight_parts`), given for
    Qwen-Image 2.1, whose plans :func:`choose_21` makes. ``load_bytes``: what the GPU holds while the weights are
    placed (``weights_bytes(..., placing=True)``; more than ``weights_bytes`` with ``fp8_matmul``): resident and
    checkpoint fit only where that fits too (:data:`LOAD_MARGIN_GIB`), else the step would crash before it runs."""
    if parts is not None and parts.family == QWEN_IMAGE_21:
        return choose_21(mode, parts=parts, weights_bytes=weights_bytes, resolution=resolution,
                         batch_size=batch_size, device=device, reduce_overhead=reduce_overhead,
                         capacity_bytes=capacity_bytes, load_bytes=load_bytes)
    preset, capacity_bytes = _preset(mode, device, capacity_bytes)
    if preset is not None:
        return preset
    cap, w = capacity_bytes / GIB, weights_bytes / GIB
    act = ACT_RESIDENT_COMPILED_GIB if reduce_overhead else ACT_RESIDENT_GIB  # the measured figure where measured
    need, plan = _resident_or_checkpoint(cap, w, resolution, batch_size, act, ACT_CHECKPOINT_GIB, reduce_overhead,
                                         load=_gib(load_bytes))
    if plan is not None:
        return plan
    return MemoryPlan("offload", f"offload: {_too_much(need, cap)}", round(cap, 1), round(w, 1), need)


def _gib(b: int | None) -> float | None:
    return None if b is None else b / GIB


def _too_much(need: dict, cap: float) -> str:
    """Why neither resident nor checkpoint fits ``cap`` GiB (``need``: :func:`_resident_or_checkpoint`'s)."""
    if need.get("load", 0) > cap and need["checkpoint"] <= cap:
        return (f"checkpointing would need ~{need['checkpoint']} GiB once model.fp8_matmul has stored its layers in "
                f"fp8, but placing the weights before that needs ~{need['load']} GiB, more than the {cap:.1f} GiB "
                "available")
    return (f"resident needs ~{need['resident']} GiB and checkpointing ~{need['checkpoint']} GiB, more than the "
            f"{cap:.1f} GiB available")


def _preset(mode: str, device: torch.device, capacity_bytes: float | None) -> tuple[MemoryPlan | None, float]:
    """(the plan when there is nothing to choose — one named in the config, or no GPU memory to plan for — else
    None; the capacity to plan for: ``capacity_bytes``, else what this process may use on ``device``)."""
    if mode in ("resident", "checkpoint", "offload"):
        return MemoryPlan(mode, f"model.memory: {mode}"), 0.0
    if device.type != "cuda" and capacity_bytes is None:
        return MemoryPlan("resident", f"{device.type}: no GPU memory to plan for"), 0.0
    return None, capacity_bytes if capacity_bytes is not None else per_process_capacity(device)[0]


def _resident_or_checkpoint(cap: float, w: float, resolution: int, batch_size: int, act_resident: float,
                            act_checkpoint: float, reduce_overhead: bool, who: str = "",
                            note: str = "", load: float | None = None) -> tuple[dict, MemoryPlan | None]:
    """(what each needs in GiB, the first of ``resident`` / ``checkpoint`` that fits ``cap`` GiB or None) for
    ``w`` GiB of weights and the per-sample activation figures at 1024². ``load``: GiB the GPU holds while the
    weights are placed (``need["load"]`` with the margin); neither fits where that does not."""
    pools = REDUCE_OVERHEAD_POOL_GIB if reduce_overhead else 0.0
    need = {
        "resident": round(w + activation_gib(act_resident, resolution, batch_size) + MARGIN_GIB + pools, 1),
        "checkpoint": round(w + activation_gib(act_checkpoint, resolution, batch_size) + MARGIN_GIB, 1),
    }
    if load is not None:
        need["load"] = round(load + LOAD_MARGIN_GIB, 1)
        if need["load"] > cap:
            return need, None
    for plan in ("resident", "checkpoint"):
        if need[plan] <= cap:
            why = (f"{plan}: {who}needs ~{need[plan]} GiB ({w:.1f} GiB weights + activations at {resolution}² x "
                   f"{batch_size}{note}) of {cap:.1f} GiB available")
            if plan == "checkpoint":
                why += f"; resident would need ~{need['resident']} GiB"
            return need, MemoryPlan(plan, why, round(cap, 1), round(w, 1), need)
    return need, None


def blocks_to_checkpoint(n_blocks: int, available_bytes: float, resolution: int, batch_size: int) -> int:
    """How many of a transformer's ``n_blocks`` must recompute their activations in the backward for the rest to fit
    ``available_bytes``: each block keeps 1/n of :data:`ACT_EAGER_GIB` (scaled by image tokens) without recomputation
    and 1/n of :data:`ACT_CHECKPOINT_GIB` with it. (The ComfyUI training node's plan; ComfyUI's blocks run eager.)"""
    import math

    per_block = activation_gib(ACT_EAGER_GIB, resolution, batch_size) * GIB / n_blocks
    saved = per_block - activation_gib(ACT_CHECKPOINT_GIB, resolution, batch_size) * GIB / n_blocks
    over = per_block * n_blocks - available_bytes
    return 0 if over <= 0 else min(n_blocks, math.ceil(over / saved))


def resolve(cfg, weights_bytes: int, device: torch.device, capacity_bytes: float | None = None,
            parts: WeightBytes | None = None, load_bytes: int | None = None):
    """(cfg with ``model.memory`` resolved to a plan and its settings applied, the plan) — or ``(cfg, None)`` for
    ``manual``. Explicit ``offload: true`` / ``gradient_checkpointing: true`` are floors for ``auto``. ``parts``,
    ``load_bytes``: as for :func:`choose`."""
    m, t = cfg.model, cfg.train
    if m.memory == "manual":
        return cfg, None
    if m.memory in ("checkpoint", "offload") and device.type != "cuda":
        from .config import ConfigError

        raise ConfigError(f"model.memory: {m.memory} plans GPU memory, but this run is on {device}; use "
                          "model.memory: auto (or resident)")
    mode = m.memory
    if mode == "auto" and m.offload:
        mode = "offload"
    plan = choose(mode, weights_bytes=weights_bytes, resolution=t.resolution, batch_size=t.batch_size,
                  device=device, reduce_overhead=m.compile_graphs,
                  capacity_bytes=capacity_bytes, parts=parts, load_bytes=load_bytes)
    if plan.mode == "resident" and m.gradient_checkpointing:
        plan = MemoryPlan("checkpoint", plan.reason + "; model.gradient_checkpointing: true keeps checkpointing",
                          plan.capacity_gib, plan.weights_gib, plan.need_gib)
    model = {"memory": plan.mode, "gradient_checkpointing": plan.gradient_checkpointing, "offload": plan.offload}
    if plan.offload and not m.offload_budget_gib and plan.capacity_gib:
        # offload places weights by its budget, by default the card's total: under a per-process cap (or
        # QZP_GPU_MEMORY_GIB) that is more than this process may use, so the budget is the capacity planned for
        model["offload_budget_gib"] = plan.capacity_gib
    if plan.gradient_checkpointing and m.compile and m.compile_mode in GRAPH_MODES:
        logger.warning("memory plan %s: compile_mode %s (CUDA graphs) crashes with gradient checkpointing; using %s",
                       plan.mode, m.compile_mode, GRAPH_MODES[m.compile_mode] or "the default compile mode")
        model["compile_mode"] = GRAPH_MODES[m.compile_mode]
    if plan.offload and m.compile and parts is not None and parts.family != "qwen-image":
        # Qwen-Image 2.1 (the family that passes parts): its offloaded step has not been measured compiled
        logger.warning("memory plan offload: Qwen-Image 2.1's offloaded blocks are not compiled (measured eager "
                       "only); model.compile turned off")
        model.update(compile=False, compile_mode=None)
    if plan.offload and (m.fp8_matmul or m.quantize):
        logger.warning("memory plan offload: it stores the transformer in fp8 itself; model.fp8_matmul and "
                       "model.quantize do not apply to offloaded weights: turned off")
        model.update(fp8_matmul=False, quantize=False)
    logger.info("memory plan: %s", plan.reason)
    return cfg.replace(model=model), plan


def allocator_backend() -> str:
    """PyTorch's CUDA allocator in this process: ``native`` or ``cudaMallocAsync`` (``native`` on a torch without
    the query or without CUDA)."""
    try:
        return torch.cuda.get_allocator_backend()
    except (AttributeError, RuntimeError):  # an old torch, or no CUDA: only the native allocator
        return "native"


def cuda_graphs_blocked(device, hint: str = "drop backend:cudaMallocAsync from PYTORCH_CUDA_ALLOC_CONF for them"
                        ) -> str | None:
    """Why torch.compile's CUDA graphs (``reduce-overhead``) and the CLI's text-encoder graphs are not used on
    ``device`` in this process, or None. Under PyTorch's ``cudaMallocAsync`` allocator
    (``PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync``; ComfyUI sets it by default) reduce-overhead's graph trees
    need allocator features it lacks ("cudaMallocAsync does not yet support checkPoolLiveAllocations", as others have
    met it), and session 9's text-encoder capture failed there and aborted the process. The ComfyUI node captures its
    own graphs there since session 16 (``graphs.py``, ``QWEN_ZERO_PRIOR_ASYNC_GRAPHS``); the CLI and Cog do not.
    ``hint``: how to get them, for the message."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if allocator_backend() == "cudaMallocAsync":
        return f"PyTorch runs the cudaMallocAsync allocator, under which torch.compile's CUDA graphs cannot run; {hint}"
    return None


# the compile modes that capture CUDA graphs -> the same without them
GRAPH_MODES = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}


def without_blocked_graphs(cfg, device):
    """``cfg`` without the CUDA graphs it asks for (``compile_mode: reduce-overhead`` or ``max-autotune``,
    ``text_cuda_graphs``) where
    :func:`cuda_graphs_blocked` says they cannot be captured, with a warning saying so; else ``cfg``. Called before the
    memory plan, which counts reduce-overhead's activations and pools."""
    m = cfg.model
    changes = {}
    if m.compile and m.compile_mode in GRAPH_MODES:
        changes["compile_mode"] = GRAPH_MODES[m.compile_mode]
    if m.text_cuda_graphs and not m.offload:
        changes["text_cuda_graphs"] = False
    why = cuda_graphs_blocked(device) if changes else None
    if not why:
        return cfg
    logger.warning("no CUDA graphs (%s): %s", why, ", ".join(
        {"compile_mode": f"model.compile_mode {m.compile_mode} -> {changes.get('compile_mode') or 'default'}",
         "text_cuda_graphs": "model.text_cuda_graphs -> false"}[k] for k in changes))
    return cfg.replace(model=changes)


def module_bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())


def weights_bytes(pipe, m, placing: bool = False) -> int:
    """The frozen models' bytes once placed for training as the model settings ``m`` say, counted on the loaded
    (not yet placed) pipeline: ``quantize`` / ``quantize_te`` store those weights in fp8 (one byte a value);
    ``fp8_matmul`` stores the family's fp8 layers as one fp8 copy with float32 row scales (``fp8.bytes_saved``).
    The text encoder's vision tower and LM head stay in CPU memory (``text_parts.park``): not counted.
    ``placing``: the bytes while they are placed instead, before ``fp8_matmul`` converts its layers on the GPU (so
    they count as loaded); ``quantize`` / ``quantize_te`` convert before the move."""
    from .text_parts import placed_bytes

    te = pipe.text_encoder
    te_placed = placed_bytes(te)
    total = sum(b // (module.dtype.itemsize if quantized else 1)
                for module, b, quantized in ((pipe.transformer, module_bytes(pipe.transformer), m.quantize),
                                             (te, te_placed, m.quantize_te),
                                             (pipe.vae, module_bytes(pipe.vae), False)))
    if m.fp8_matmul and not placing:
        from .families import detect_pipeline
        from .fp8 import bytes_saved

        total -= bytes_saved(pipe.transformer, detect_pipeline(pipe).fp8_modules)
    return total


# ---- Qwen-Image 2.1 (family-aware; kept apart from Qwen-Image's measured figures above) --------------------
#
# Full-size bytes (diffusers 0.42 QwenImage21Transformer2DModel defaults, Qwen3-VL-8B; bench/bench_step.py builds
# both): the DiT is 7.12B parameters, 6.98B of them the Linears of its 32 blocks (13.0 GiB bf16, 6.5 GiB fp8);
# the text encoder 8.77B: the decoder layers' Linears 6.95B (12.9 GiB bf16, 6.5 GiB fp8), the embedding table
# 0.62B (1.2 GiB), the vision tower 0.58B and the LM head 0.62B, neither run for text conditioning; the VAE
# (diffusers defaults) 0.34B. 30.2 GiB in bf16 altogether: no 24 GiB card holds it, but with the blocks' and the
# decoder layers' Linears stored in fp8 (cast per use, training/offload.py) and the unused parts left in CPU
# memory the weights are ~14.6 GiB, and every weight stays on the GPU: nothing is streamed from CPU memory.
#
# Activations are estimates, not measurements (no 2.1 GPU run yet): Qwen-Image's measured 24 GiB / 1.5 GiB at
# 1024² scaled to 2.1's 32 blocks of width 4096 (SwiGLU 12288) over the same 4096 image tokens.
ACT_RESIDENT_GIB_21 = 20.0
ACT_CHECKPOINT_GIB_21 = 2.0
OFFLOAD_RESERVE_GIB = 6.0  # offload.apply_offload's reserve: activations, the LoRA and its AdamW state
# more with model.compile: the compiled blocks' backward holds more at once (an H200 under a 24 GiB cap, session 11:
# OOM at the full budget; 21.4 GiB peak with 1.5 GiB kept back)
OFFLOAD_COMPILE_RESERVE_GIB = 1.5


@dataclass(frozen=True)
class WeightBytes:
    """A pipeline's frozen weights by where ``model.offload`` can keep them (bytes; ``*_fp8``: the same Linears
    stored as float8 with a float32 scale per row)."""

    family: str
    dit_blocks: int  # the Linears of the transformer's blocks
    dit_blocks_fp8: int
    dit_rest: int  # the rest of the transformer (embedders, modulation, output layers)
    te_layers: int  # the Linears of the text decoder's layers
    te_layers_fp8: int
    te_rest: int  # the decoder's embedding table and norms: on the GPU in every plan
    te_unused: int  # vision tower and LM head: text conditioning never runs them (offload leaves them on the CPU)
    vae: int

    @property
    def total(self) -> int:
        return self.dit_blocks + self.dit_rest + self.te_layers + self.te_rest + self.te_unused + self.vae


def _linear_bytes(root) -> tuple[int, int]:
    """(bytes as stored, bytes in fp8 + a float32 scale per row) of the frozen ``nn.Linear`` weights under
    ``root`` (LoRA layers excluded). Works on the meta device."""
    from torch import nn

    as_is = fp8 = 0
    for name, mod in root.named_modules():
        if type(mod) is nn.Linear and ".lora_" not in name:
            w = mod.weight
            as_is += w.numel() * w.element_size()
            fp8 += w.numel() + w.shape[0] * 4
    return as_is, fp8


def weight_parts(pipe) -> WeightBytes:
    """:class:`WeightBytes` of a diffusers pipeline (either family; models on any device, meta included)."""
    from .families import detect_pipeline

    family = detect_pipeline(pipe)
    tr, te = pipe.transformer, pipe.text_encoder
    lm = family.decoder(te)
    blocks, blocks_fp8 = _linear_bytes(tr.transformer_blocks)
    layers, layers_fp8 = _linear_bytes(lm.layers)
    from .text_parts import unused_bytes

    return WeightBytes(family.name, blocks, blocks_fp8, module_bytes(tr) - blocks, layers, layers_fp8,
                       module_bytes(lm) - layers, unused_bytes(te, parameters_only=True), module_bytes(pipe.vae))


def text_encoder_storage(parts: WeightBytes, budget_bytes: float, reserve_bytes: float, ring_bytes: float = 0.0,
                         block_bytes: float = 0.0) -> str:
    """How ``model.offload`` keeps the text decoder's layers within ``budget_bytes`` (``model.offload_text_encoder:
    auto``).

    Qwen-Image 2.1: ``"bf16"`` (as loaded, on the GPU) where every transformer block fits in fp8 beside them, else
    ``"fp8"`` on the GPU where that fits (the conditioning then carries e4m3 rounding: docs/qwen-image-2.1.md), else
    ``"stream"`` (as loaded, in pinned CPU memory, copied per use).

    Qwen-Image: its transformer's blocks do not fit a 24 GB card even in fp8 (19 GiB). ``"bf16"`` where the
    decoder's layers fit on the GPU beside the reserve, the embeddings and the transformer's other weights, and
    either every block fits beside them too or the blocks that stream are fetched as one through the
    ``ring_bytes`` prefetch ring (it fits beside as well and holds a block: ``block_bytes``, infinite where blocks
    are fetched layer by layer); else ``"stream"``. Measured under a 24 GiB cap on an H200 with compile, the 2 GiB
    ring and blocks fetched as one: 913 against 1058 ms/step with the old defaults (decoder streamed, 1 GiB ring) in
    one call, 765 against 1150 in another (docs/benchmarks.md, "Session 23"); with one fetch per layer (session 21)
    it was not faster. Never fp8 for Qwen-Image: that would change the conditioning the token learns against."""
    if parts.family != QWEN_IMAGE_21:
        room = budget_bytes - reserve_bytes - (parts.dit_rest + parts.te_rest) - parts.te_layers
        if room >= parts.dit_blocks_fp8:  # every block resident beside the decoder: nothing streams
            return "bf16"
        fetched_as_one = 0 < ring_bytes and block_bytes <= ring_bytes <= room
        return "bf16" if fetched_as_one else "stream"
    room = budget_bytes - reserve_bytes - (parts.dit_blocks_fp8 + parts.dit_rest + parts.te_rest + parts.vae)
    if room >= parts.te_layers:
        return "bf16"
    if room >= parts.te_layers_fp8:
        return "fp8"
    return "stream"


def offload_gpu_bytes(parts: WeightBytes, storage: str) -> int:
    """The weights ``model.offload`` keeps on the GPU with every transformer block resident in fp8."""
    te = {"bf16": parts.te_layers, "fp8": parts.te_layers_fp8, "stream": 0}[storage]
    return parts.dit_blocks_fp8 + parts.dit_rest + parts.te_rest + parts.vae + te


def choose_21(mode: str, *, parts: WeightBytes, weights_bytes: int, resolution: int, batch_size: int,
              device: torch.device, reduce_overhead: bool = False, capacity_bytes: float | None = None,
              reserve_gib: float = OFFLOAD_RESERVE_GIB, load_bytes: int | None = None) -> MemoryPlan:
    """:func:`choose` for Qwen-Image 2.1: resident and checkpoint as for Qwen-Image (2.1's activation estimates);
    below those, ``offload`` with every weight on the GPU where fp8 storage makes it fit (the plan's ``layout``
    and reason say which parts are fp8 and whether anything is streamed)."""
    preset, capacity_bytes = _preset(mode, device, capacity_bytes)
    if preset is not None:
        return preset
    cap, w = capacity_bytes / GIB, weights_bytes / GIB
    need, plan = _resident_or_checkpoint(cap, w, resolution, batch_size, ACT_RESIDENT_GIB_21, ACT_CHECKPOINT_GIB_21,
                                         reduce_overhead, who="Qwen-Image 2.1 ", note=", estimated",
                                         load=_gib(load_bytes))
    if plan is not None:
        return plan
    act_ckpt = activation_gib(ACT_CHECKPOINT_GIB_21, resolution, batch_size)
    storage = text_encoder_storage(parts, capacity_bytes, reserve_gib * GIB)
    gpu = offload_gpu_bytes(parts, storage) / GIB
    need["offload"] = round(gpu + max(reserve_gib, act_ckpt + MARGIN_GIB), 1)
    te_gib = {"bf16": parts.te_layers, "fp8": parts.te_layers_fp8}.get(storage, parts.te_layers) / GIB
    layout = {"transformer_blocks": "fp8", "text_encoder_layers": storage, "gpu_weights_gib": round(gpu, 1),
              "streamed": storage == "stream"}
    why = (f"offload: {_too_much(need, cap)}; Qwen-Image 2.1: the transformer blocks' Linears in fp8 "
           f"({parts.dit_blocks_fp8 / GIB:.1f} GiB), ")
    if storage == "stream":
        why += (f"the text decoder's layers ({te_gib:.1f} GiB) streamed from CPU memory: even in fp8 "
                f"({parts.te_layers_fp8 / GIB:.1f} GiB) they do not fit beside the rest")
    else:
        why += f"the text decoder's layers in {storage} ({te_gib:.1f} GiB), "
        if storage == "fp8":
            why += f"because bf16 ({parts.te_layers / GIB:.1f} GiB) does not fit, "
        why += f"~{gpu:.1f} GiB of weights, all on the GPU: nothing streamed from CPU memory"
    if need["offload"] > cap:
        why += f"; even this needs ~{need['offload']} GiB, more than the {cap:.1f} GiB available: expect out-of-memory"
        logger.warning("memory plan for Qwen-Image 2.1: offload needs ~%s GiB of %.1f GiB available; lower "
                       "train.resolution or train.batch_size", need["offload"], cap)
    return MemoryPlan("offload", why, round(cap, 1), round(w, 1), need, layout)


__all__ = ["MemoryPlan", "PLANS", "WeightBytes", "blocks_to_checkpoint", "choose", "choose_21", "module_bytes",
           "offload_gpu_bytes", "per_process_capacity", "resolve", "text_encoder_storage", "weight_parts",
           "weights_bytes"]
