"""The training node's ``diffusers`` engine: the DiT ComfyUI loaded, trained through diffusers' transformer class and
the core's speed path.

ComfyUI's Qwen-Image forward is written for sampling: 60 blocks called from Python, each weight cast per use, no CUDA
graphs. The core's step (``training/diffusers_backend.py``) is 2x faster on the same GPU: regional compile with CUDA
graphs (``reduce-overhead``), cuDNN attention, optionally fp8 matmuls. This engine builds diffusers'
``QwenImageTransformer2DModel`` over the very tensors ComfyUI loaded (``training/shared_dit.py``: no copy; fp8
storage stays fp8, cast per use as ComfyUI casts it) and trains it with ``accelerate_transformer``, the function the
CLI and Cog use. The conditioning still comes from ComfyUI's text encoder (``comfy_text.py``), the latents from its
VAE, and the LoRA is exported in the same keys; preview samples go through ComfyUI's sampler with the LoRA hooked on.

It is used (``dit_engine: auto``) where it computes what ComfyUI's forward computes: the MODEL carries no patches of
other nodes that diffusers' forward would skip (``transformer_options``, per-use weight functions), plain or fp8 weights
(not ComfyUI's scaled or quantized formats), the text-to-image variant. Where the DiT fits on the GPU beside the text
encoder it trains over ComfyUI's resident weights; where it does not (24 GB cards; ``dit_engine: diffusers_offload``)
it takes the core's ``model.offload`` path over copies of them (:class:`OffloadPlan`): the blocks in fp8 on the GPU as
far as they fit, the rest in pinned CPU memory copied ahead of use, every block recomputed (on an H200 emulating a 23.5
GiB card: 1.51-2.52 s/step in four runs of session 13, against 2.73 through ComfyUI's forward in session 12;
docs/benchmarks.md). Otherwise the node trains through ComfyUI's own forward (``comfy_backend.py``), and the log says
why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
from typing import NamedTuple

import torch
from torch import nn

from ..training.diffusers_backend import accelerate_transformer, compute_autocast
from ..training.fp8 import Fp8Linear
from ..training.lora import ADAPTER_NAME, add_lora, export_lora, lora_delta
from ..training.memory import GRAPH_MODES, cuda_graphs_blocked

logger = logging.getLogger(__name__)

ENGINES = ("auto", "diffusers", "diffusers_offload", "comfyui")
# how many input shapes (caption lengths, image sizes) the engine captures as CUDA graphs under cudaMallocAsync; later
# shapes run without graphs (recapturing in turn would cost more than it saves)
DIT_GRAPH_SHAPES = 4  # each pair keeps its own static buffers (~0.4 GB of LoRA gradients at rank 32); 4 measured
# how many of the DiT's blocks the offloaded engine keeps on the device, instead of as many as fit (tests, tuning)
RESIDENT_BLOCKS_ENV = "QWEN_ZERO_PRIOR_RESIDENT_BLOCKS"


def resident_blocks(raw: str) -> int | None:
    """``QWEN_ZERO_PRIOR_RESIDENT_BLOCKS``'s value: a whole number of blocks >= 0, or None where unset (as many as
    fit). Raises ValueError naming the value otherwise."""
    raw = raw.strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"{RESIDENT_BLOCKS_ENV}={raw!r}: expected a whole number of blocks >= 0 (the DiT's blocks the "
                         "offloaded engine keeps on the GPU), or unset to keep as many as fit")
    return n


class OffloadPlan(NamedTuple):
    """The offloaded engine's memory (``dit_engine: diffusers_offload``, or ``auto`` where the DiT does not fit):
    ``available_bytes`` for the blocks' fp8 weights and the ``prefetch_gib`` ring buffer, or ``resident`` blocks
    where set (:func:`training.offload.offload_transformer`)."""

    available_bytes: float
    prefetch_gib: float
    resident: int | None = None


class EngineUnavailable(RuntimeError):
    """``dit_engine: diffusers`` was asked for where it cannot compute what ComfyUI's forward computes."""


def resolved_device(device: torch.device) -> torch.device:
    """``device`` with its index (``cuda`` -> ``cuda:<current>``), as weights report theirs."""
    if device.index is not None or device.type != "cuda":
        return device
    return torch.device("cuda", torch.cuda.current_device())


def blockers(mp, dm: nn.Module, device: torch.device, offload: bool = False, scan_weights: bool = True) -> list[str]:
    """Why the diffusers engine cannot train this MODEL (empty: it can). ``offload``: the engine copies the weights
    where it keeps them (``offload_transformer``), so where ComfyUI has them does not matter. Without
    ``scan_weights`` only the MODEL's patches and variant are looked at, not its modules' weights (the graph's MODEL
    before a non-dynamic copy is made: how ComfyUI's dynamic VRAM holds weights is its own business)."""
    out = []
    try:
        import diffusers  # noqa: F401  (a requirement of the pack; missing in a broken install)
    except ImportError as e:
        return [f"diffusers is not importable ({e})"]
    options = mp.model_options.get("transformer_options", {}) or {}
    extra = sorted(k for k, v in options.items() if v)
    if extra:
        out.append(f"the MODEL carries patches of other nodes ({', '.join(extra)}) that diffusers' forward would skip")
    for key in ("model_function_wrapper",):
        if mp.model_options.get(key) is not None:
            out.append(f"the MODEL has a {key}")
    objects = sorted(k for k in (getattr(mp, "object_patches", None) or {}) if k.startswith("diffusion_model"))
    if objects:
        out.append(f"the MODEL has object patches on its DiT ({', '.join(objects[:3])})")
    if getattr(dm, "__index_timestep_zero__", None) is not None or getattr(
            getattr(dm, "time_text_embed", None), "use_additional_t_cond", False):
        out.append("this Qwen-Image variant (edit / additional timestep conditioning) is not text-to-image")
    if not scan_weights:
        return out
    dev = resolved_device(device)
    for name, m in dm.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if getattr(m, "weight_function", None) or getattr(m, "bias_function", None):
            out.append(f"{name} applies weight patches per use (ComfyUI's low-VRAM patching)")
        elif type(w.detach()) is not torch.Tensor:  # a tensor subclass (0.33's QuantizedTensor layouts)
            out.append(f"{name} stores a {type(w).__name__} (a quantized format)")
        elif any(hasattr(m, a) for a in ("scale_weight", "weight_scale", "scale_input", "input_scale")):
            out.append(f"{name} is in a scaled fp8 format")
        elif w.device != dev and not offload:
            out.append(f"{name} is on {w.device}, not {dev} (weights streamed from CPU memory)")
        else:
            continue
        break  # one module named is enough
    return out


def transformer_config(dm: nn.Module) -> dict:
    """diffusers ``QwenImageTransformer2DModel`` arguments for ComfyUI's DiT, read from its modules and weights."""
    attn = dm.transformer_blocks[0].attn
    return {
        "patch_size": int(dm.patch_size),
        "in_channels": int(dm.img_in.weight.shape[1]),
        "out_channels": int(dm.out_channels),
        "num_layers": len(dm.transformer_blocks),
        "attention_head_dim": int(attn.dim_head),
        "num_attention_heads": int(attn.heads),
        "joint_attention_dim": int(dm.txt_in.weight.shape[1]),
        "axes_dims_rope": tuple(int(a) for a in dm.pe_embedder.axes_dim),
    }


def _lora_layers(transformer: nn.Module):
    for name, mod in transformer.named_modules():
        la = getattr(mod, "lora_A", None)
        if isinstance(la, nn.ModuleDict) and ADAPTER_NAME in la:
            yield name, mod


class DiffusersEngine:
    """diffusers' transformer over ComfyUI's DiT ``dm`` with a peft LoRA whose ``A`` are ``init_A`` (the node's draws,
    so both engines start from the same LoRA) and the ``model:`` speed options ``m`` (see the module docstring).

    With ``offload`` (an :class:`OffloadPlan`: the DiT does not fit the GPU beside the text encoder, a 24 GB card)
    the blocks are the core's ``model.offload`` ones (``training/offload.py``): fp8 copies of the weights, on the GPU
    for the blocks that fit and in pinned CPU memory for the rest, copied ahead of use by the prefetcher; every block
    recomputed, the resident ones compiled with ``m.compile``. ComfyUI's own tensors are never moved."""

    def __init__(self, dm: nn.Module, m, targets: list[str], rank: int, alpha: float,
                 init_A: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype, recompute: bool,
                 offload: OffloadPlan | None = None):
        from ..training import reductions, rope

        self.dm, self.rank, self.alpha, self.device, self.dtype = dm, rank, alpha, device, dtype
        self.offload_summary: dict | None = None
        self.prefetcher = None
        self.graphs = None  # the whole step's CUDA graphs under cudaMallocAsync (_whole_graphs)
        self._rope_was_installed = rope.installed()
        self._reductions_were_installed = reductions.installed()
        try:
            self._build(dm, m, targets, rank, alpha, init_A, device, dtype, recompute or offload is not None,
                        offload)
        except BaseException:
            self._restore_process_patches()  # accelerate_transformer may have installed them before failing
            raise

    def _restore_process_patches(self) -> None:
        """diffusers' module-level RoPE and inductor's persistent-reduction choice as this process had them before
        this engine (``rope.py``, ``reductions.py``)."""
        from ..training import reductions, rope

        if not self._rope_was_installed:
            rope.uninstall()
        if not self._reductions_were_installed:
            reductions.uninstall()

    def _build(self, dm, m, targets, rank, alpha, init_A, device, dtype, recompute, offload) -> None:
        from diffusers.training_utils import cast_training_params

        from ..training.families import QWEN_IMAGE_FP8
        from ..training.shared_dit import build_over

        self.transformer = build_over(dm, transformer_config(dm), dtype)
        if recompute:
            self.transformer.enable_gradient_checkpointing()
        add_lora(self.transformer, rank, alpha, targets)
        layers = dict(_lora_layers(self.transformer))
        if set(layers) != set(init_A):
            raise EngineUnavailable(f"the LoRA targets matched other modules in diffusers' transformer "
                                    f"({sorted(set(layers) ^ set(init_A))[:3]})")
        with torch.no_grad():  # peft may have rounded its draws to the base weight's dtype (fp8): set them here
            for name, mod in layers.items():
                mod.lora_A[ADAPTER_NAME].weight.data = init_A[name].to(device, torch.float32)
                mod.lora_B[ADAPTER_NAME].weight.data = torch.zeros_like(mod.lora_B[ADAPTER_NAME].weight,
                                                                        dtype=torch.float32, device=device)
        cast_training_params(self.transformer, dtype=torch.float32)
        self.transformer.train()
        if offload is not None:  # after the LoRA, as the core: its base layers become the offloaded ones
            from ..training.offload import offload_transformer, prefetcher_of

            self.offload_summary = offload_transformer(self.transformer, resolved_device(device),
                                                       offload.available_bytes, prefetch_gib=offload.prefetch_gib,
                                                       resident=offload.resident)
            self.prefetcher = prefetcher_of(self.transformer)
        self.compiled = bool(m.compile)
        self.recompute = bool(recompute)
        self.reduce_overhead = m.compile_graphs  # reduce-overhead or max-autotune
        from ..training import attention_qwen

        # with model.compile, each stream's q/k/v LoRA A products as one matmul (attention_qwen.py), as the core
        accelerate_transformer(self.transformer, m, QWEN_IMAGE_FP8, compute_dtype=dtype,
                               rewrites=lambda: attention_qwen.install(self.transformer))
        self.fp8_layers = sum(isinstance(mod, Fp8Linear) for mod in self.transformer.modules())
        # (not around max-autotune, whose own CUDA graphs would be captured inside)
        self.graphs = self._whole_graphs(device) if self.compiled and not self.reduce_overhead and not recompute \
            and offload is None and m.compile_mode != "max-autotune" else None

    def _whole_graphs(self, device: torch.device):
        """The DiT's whole forward and backward as CUDA graphs (:meth:`make_graphs`) where ComfyUI's default
        cudaMallocAsync allocator keeps torch.compile's reduce-overhead graphs out (:func:`graphs_blocked`) and
        ``QWEN_ZERO_PRIOR_ASYNC_GRAPHS`` asks for them (``1``, the default, with the text encoder's; or ``dit``): the
        compiled blocks' ~17,000 launches and ~28,000 allocator calls a step (session 10's profile) become two graph
        launches. None elsewhere."""
        from ..training.graphs import ASYNC_GRAPHS_ENV, async_graphs_from_env

        device = resolved_device(device)
        if device.type != "cuda" or graphs_blocked(device) is None or not async_graphs_from_env("dit"):
            return None
        logger.info("DiT engine: its forward and backward are captured whole as CUDA graphs instead of torch.compile's "
                    "reduce-overhead ones, which the cudaMallocAsync allocator cannot run (%s)", ASYNC_GRAPHS_ENV)
        return self.make_graphs()

    def make_graphs(self, capture=None):
        """A :class:`~qwen_zero_prior.training.graphs.GraphCache` of :meth:`predict`'s work, a pair of graphs per
        input shape (caption length, image size; at most :data:`DIT_GRAPH_SHAPES`). ``capture``: the capture
        function (default ``graphs.capture_cuda``; tests emulate it on the CPU). A new shape is captured at the next
        step's start (``defer``): the DiT runs while the text encoder's replayed forward awaits its backward."""
        from ..training.graphs import GraphCache

        params = [p for _, p in self.named_lora_parameters()]

        def frozen():  # what the graphs read besides the LoRA: ComfyUI's weights (moved if ComfyUI reloads them)
            return [t for t in (*self.transformer.parameters(), *self.transformer.buffers()) if not t.requires_grad]

        return GraphCache(functools.partial(self._predict, cache=False), params, watch=frozen,
                          max_graphs=DIT_GRAPH_SHAPES, name="DiT engine", guard=comfy_offload_streams_off,
                          capture=capture, defer=True)

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        o = self.offload_summary
        where = "" if o is None else (
            f"offload: {o['resident_blocks']} of {o['blocks']} blocks on the device in fp8, {o['streamed_blocks']} "
            "streamed from CPU memory" + (f" ({o['pinned_gib']:.1f} GiB pinned)" if o.get("pinned_gib") else "")
            + (f" through a {o['prefetch_gib']:.2f} GiB prefetch ring" if o["prefetch_gib"] else "") + ", ")
        return where + (f"fp8 matmuls on {self.fp8_layers} layers, " if self.fp8_layers else f"{dtype} matmuls, ") + (
            "compiled with CUDA graphs" if self.reduce_overhead else
            "compiled, forward and backward captured as CUDA graphs" if self.graphs is not None else
            "compiled" if self.compiled else "eager")

    # ---- the step -----------------------------------------------------------------------------------
    def predict(self, noisy, sigmas, embeds, mask):
        if self.graphs is not None and torch.is_grad_enabled():
            out = self.graphs(noisy, sigmas, embeds, mask)
            if out is not None:
                return out
        return self._predict(noisy, sigmas, embeds, mask)

    def _predict(self, noisy, sigmas, embeds, mask, cache: bool = True):
        bsz, c, _, h, w = noisy.shape
        # diffusers' QwenImagePipeline._pack_latents: 2x2 patches, channels first within a patch (as ComfyUI's)
        packed = (noisy[:, :, 0].reshape(bsz, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
                  .reshape(bsz, (h // 2) * (w // 2), c * 4).to(self.dtype))
        with compute_autocast(self.dtype, self.device, cache):
            pred = self.transformer(hidden_states=packed, timestep=sigmas.to(self.dtype),
                                    encoder_hidden_states=embeds.to(self.dtype), encoder_hidden_states_mask=mask,
                                    img_shapes=[[(1, h // 2, w // 2)]] * bsz, return_dict=False)[0]
        return pred.reshape(bsz, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(bsz, c, 1, h, w)

    def step_begin(self) -> None:
        if self.prefetcher is not None:  # this step streams its weights in the order the last one used them
            self.prefetcher.begin_step()
        if self.reduce_overhead:  # last step's graph outputs may be overwritten now
            torch.compiler.cudagraph_mark_step_begin()
        if self.graphs is not None:
            self.graphs.new_step()

    # ---- LoRA state -----------------------------------------------------------------------------------
    def named_lora_parameters(self) -> list[tuple[str, nn.Parameter]]:
        marker = f".{ADAPTER_NAME}."  # the ComfyUI engine's names: <module>.lora_A.weight (checkpoints interchange)
        return [(n.replace(marker, "."), p) for n, p in self.transformer.named_parameters()
                if "lora_" in n and p.requires_grad]

    def export_lora(self) -> dict[str, torch.Tensor]:
        return export_lora(self.transformer, self.rank, self.alpha)

    @contextlib.contextmanager
    def on_comfy_modules(self):
        """The current LoRA added to ComfyUI's own modules (forward hooks), for sampling through ComfyUI."""
        handles = []
        try:
            for name, mod in _lora_layers(self.transformer):
                a, b = mod.lora_A[ADAPTER_NAME].weight, mod.lora_B[ADAPTER_NAME].weight
                hook = functools.partial(_lora_hook, a, b, float(mod.scaling[ADAPTER_NAME]))
                handles.append(self.dm.get_submodule(name).register_forward_hook(hook))
            yield
        finally:
            for h in handles:
                h.remove()

    def rebind(self) -> int:
        """Point the shared tensors at ComfyUI's current ones again (after ComfyUI reloaded the DiT for a preview, its
        parameters may be other objects; ``shared_dit.rebind``). Returns how many modules changed: none when
        offloaded (the engine holds copies of its own)."""
        from ..training.shared_dit import rebind

        if self.offload_summary is not None:
            return 0
        return rebind(self.transformer, self.dm)

    def close(self) -> None:
        if self.compiled:
            self._restore_process_patches()
        if self.graphs is not None:
            self.graphs.release()  # the captured graphs' memory, freed without a warning per tensor (graphs.py)
            self.graphs = None
        self.transformer = None
        self.dm = None
        self.prefetcher = None  # its ring buffer and copy stream
        gc.collect()  # compiled blocks hold bound methods of themselves: a cycle that keeps the model until collected
        if self.reduce_overhead:
            # the CUDA graphs' memory pools outlive the model until their trees are reset: without this, ~19 GB stayed
            # reserved while the graph went on to sample (an H200, 1024²). Only torch.compile's reduce-overhead
            # graphs are affected (ComfyUI's own compile node uses the default mode)
            from torch._inductor import cudagraph_trees

            cudagraph_trees.reset_cudagraph_trees()


def oom_hint(engine) -> str | None:
    """What to change where the offloaded engine's step ran out of GPU memory (None for any other engine)."""
    o = getattr(engine, "offload_summary", None)
    if not o:
        return None
    fewer = max(0, o["resident_blocks"] - 4)
    head = (f"The offloaded DiT engine kept {o['resident_blocks']} of {o['blocks']} blocks on the GPU and ran out of "
            "memory beside them: ")
    if o["resident_blocks"] == 0:
        return head + "lower resolution or batch_size, or close other programs using the GPU."
    return head + (f"start ComfyUI with {RESIDENT_BLOCKS_ENV}={fewer} in its environment (fewer blocks on the GPU, "
                   "more streamed), or lower resolution or batch_size, or close other programs using the GPU.")


def previews_blocked(offload: bool, device_type: str) -> str | None:
    """Why the training node skips its sample previews, or None. With the offloaded engine on a GPU (a card where the
    DiT does not fit beside the text encoder) ComfyUI's sampler loads its own copy of the DiT beside the engine's
    resident blocks: on an H200 with 23.5 GiB free (ComfyUI 0.33) it loaded 8.5 of 19.5 GB and the preview ran out of
    memory, which ended the training run. The graph's sampling after training is unaffected (the engine is gone)."""
    if offload and device_type == "cuda":
        return ("sample previews are skipped with the offloaded DiT engine: ComfyUI's sampler would load a second "
                "copy of the DiT beside the engine's blocks and run out of memory. The graph's sampling after training "
                "runs as usual; set preview_every to 0 to silence this")
    return None


def _lora_hook(a, b, scale, module, args, output):
    return output + lora_delta(args[0], a, b, scale).to(output.dtype)


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # a torch without the helper: let torch.compile report what it lacks
        return True
    return has_triton()


NATIVE_ALLOCATOR_HOW = ("start ComfyUI with --disable-cuda-malloc, or turn on Settings > Qwen Zero-Prior > Training > "
                        "Native CUDA allocator and restart ComfyUI")


def graphs_blocked(device) -> str | None:
    """Why torch.compile's CUDA graphs cannot run on ``device`` in this ComfyUI, or None
    (``memory.cuda_graphs_blocked``: ComfyUI's default cudaMallocAsync allocator; the pack then captures its own,
    ``training/graphs.py``). The allocator is every workflow's, so switching it is the user's choice: the launch flag,
    or the pack's opt-in setting (``prestartup_script.py``)."""
    return cuda_graphs_blocked(device, f"{NATIVE_ALLOCATOR_HOW} for the CUDA-graph path")


@contextlib.contextmanager
def comfy_offload_streams_off():
    """ComfyUI's asynchronous weight offload (``comfy.model_management.NUM_STREAMS``: 2 by default on Nvidia in 0.33;
    in 0.3.64 off unless ``--async-offload``) off while CUDA graphs are warmed up and captured: a ComfyUI op that
    casts a weight forks an offload stream from the current one, and a stream forked from a capture and not joined
    fails it ("capturing stream has unjoined work"). Nothing of ComfyUI's should run in the captured code; this makes
    sure. Read on every call by ComfyUI, so setting it back afterwards restores its behaviour."""
    try:
        import comfy.model_management as mm
    except ImportError:  # outside ComfyUI (tests of the engine alone)
        yield
        return
    old = getattr(mm, "NUM_STREAMS", None)
    if old is None:
        yield
        return
    mm.NUM_STREAMS = 0
    try:
        yield
    finally:
        mm.NUM_STREAMS = old


def speed_tip(engine, device) -> str | None:
    """The line the training node adds to its result where the allocator kept CUDA graphs out of a run that would have
    used them (the diffusers ``engine`` compiled, no block recomputed); None otherwise, e.g. with ComfyUI's forward at
    24 GiB, where the allocator changes nothing."""
    if engine is None or not engine.compiled or engine.recompute or engine.reduce_overhead or engine.graphs is not None:
        return None
    if graphs_blocked(device) is None:
        return None
    from ..training.graphs import ASYNC_GRAPHS_ENV

    return (f"the DiT ran without CUDA graphs under ComfyUI's default allocator: leave {ASYNC_GRAPHS_ENV} unset (or 1) "
            f"for the pack's own, or {NATIVE_ALLOCATOR_HOW}, for faster steps (on an H200 at 1024²: 0.35 s/step either "
            "way, 0.89 without any graphs, 0.51 with the text encoder's only)")


def engine_model_config(m, device: torch.device, recompute: bool):
    """``model:`` as the engine runs it: cuDNN attention on a GPU unless set, and with ``compile`` the core's
    CUDA-graph mode where no block is recomputed (graphs and recomputation do not mix: config.py) and the allocator
    allows graphs (:func:`graphs_blocked`)."""
    changes = {}
    blocked = None
    if m.compile and device.type == "cuda" and not _has_triton():
        logger.warning("model.compile: triton is not installed, which torch.compile needs on a GPU (pip install "
                       "triton; on Windows triton-windows): training eagerly")
        m = dataclasses.replace(m, compile=False, compile_mode=None)
        changes.update(compile=False, compile_mode=None)
    if device.type == "cuda" and not m.attention_backend:
        changes["attention_backend"] = "_native_cudnn"
    if m.compile and device.type == "cuda" and not recompute and (m.compile_mode is None or m.compile_graphs):
        blocked = graphs_blocked(device)  # asked only where graphs would be used
        if blocked:
            from ..training.graphs import async_graphs_from_env

            if not async_graphs_from_env("dit"):  # (with dit the engine says whether it captures its own)
                logger.warning("model.compile: no CUDA graphs for the DiT (%s)", blocked)
            if m.compile_graphs:  # reduce-overhead -> default, max-autotune -> max-autotune-no-cudagraphs
                changes["compile_mode"] = GRAPH_MODES[m.compile_mode]
    if m.compile and m.compile_mode is None and device.type == "cuda" and not recompute and not blocked:
        changes["compile_mode"] = "reduce-overhead"
    if recompute and m.compile_graphs:
        changes["compile_mode"] = GRAPH_MODES[m.compile_mode]
    return dataclasses.replace(m, **changes) if changes else m


__all__ = ["DIT_GRAPH_SHAPES", "DiffusersEngine", "ENGINES", "EngineUnavailable", "NATIVE_ALLOCATOR_HOW", "OffloadPlan",
           "RESIDENT_BLOCKS_ENV", "blockers", "comfy_offload_streams_off", "engine_model_config", "graphs_blocked",
           "oom_hint", "previews_blocked", "resident_blocks", "resolved_device", "speed_tip", "transformer_config"]
