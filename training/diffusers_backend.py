"""The training loop's backend for a diffusers ``QwenImagePipeline`` (CLI, Cog, demo, benchmarks);
:func:`make_backend` picks it or Qwen-Image 2.1's (``diffusers21_backend``) by the pipeline's family.

- LoRA through peft (diffusers' ``add_adapter``) on the configured targets, text stream included.
- The tokens: :class:`~qwen_zero_prior.training.token.PlaceholderEmbedding` routes each token's id to its own
  float32 vector.
- Conditioning: :class:`~qwen_zero_prior.training.prompt.PromptEncoder` (the pipeline's numbers; prefix cache and
  a CUDA-graph suffix for the token's gradient path).
- Speed and memory options of ``model:``: fp8 matmuls for the frozen image-stream weights, offload for 24 GB
  cards, an attention backend, regional ``torch.compile``, gradient checkpointing, bf16/fp16 autocast.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from . import reductions, text_parts
from .backend import TrainBackend
from .config import Config, TrainConfig
from .data import Example, load_pixels
from .families import QWEN_IMAGE_21, detect_pipeline
from .lora import ADAPTER_NAME, add_lora, export_lora
from .prompt import PromptEncoder, pad_batch
from .token import RegisteredToken, check_single_id, encode_ids, install_placeholders

logger = logging.getLogger(__name__)


def make_backend(cfg: Config, pipe) -> TrainBackend:
    """The diffusers backend for ``pipe``'s model family (a ``QwenImagePipeline`` or ``QwenImage21Pipeline``)."""
    if detect_pipeline(pipe).name == QWEN_IMAGE_21:
        from .diffusers21_backend import Diffusers21Backend

        return Diffusers21Backend(cfg, pipe)
    return DiffusersBackend(cfg, pipe)


def compute_autocast(dtype: torch.dtype, device: torch.device, cache: bool = True):
    """bf16/fp16 autocast around a transformer's forward on a GPU, as diffusers' scripts get from accelerate's mixed
    precision: the float32 LoRA (master) weights then multiply in the model's dtype instead of in float32. ``cache``
    off inside a captured CUDA graph (autocast's cache of cast weights must not outlive the capture)."""
    if dtype in (torch.bfloat16, torch.float16) and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=dtype, cache_enabled=cache)
    return contextlib.nullcontext()


def accelerate_transformer(transformer, m, fp8_modules: tuple, *, fp8_backward_copy: bool | int = False,
                           compute_dtype: torch.dtype | None = None, set_attention_backend=None, rewrites=None) -> None:
    """The core's speed options of ``model:`` (``m``) on a transformer that already carries its LoRA: fp8 matmuls for
    ``fp8_modules`` (``fp8.apply_fp8_matmul``), the attention backend, regional ``torch.compile`` with the rewrites
    that make it fuse (real-arithmetic RoPE, the cheaper GELU, with fp8 the MLP's GELU kernels, a family's own
    ``rewrites()``, then Qwen-Image's q/k norms and RoPE as one operator, and inductor's wider persistent
    reductions, ``reductions.py``, which the caller's ``close`` removes). Shared by the diffusers backends and the
    ComfyUI training node's diffusers engine (``nodes/comfy_engine.py``), so a speed feature lands once for both."""
    if m.fp8_matmul:  # after add_lora: the LoRA wraps nn.Linear, then its base layer turns fp8
        from .fp8 import apply_fp8_matmul

        apply_fp8_matmul(transformer, modules=fp8_modules, backward_copy=fp8_backward_copy,
                         compute_dtype=compute_dtype, fast_accum=m.fp8_fast_accum,
                         fast_accum_backward=m.fp8_fast_accum_backward)
    if m.attention_backend:
        (set_attention_backend or transformer.set_attention_backend)(m.attention_backend)
    if m.compile:
        from . import compile_fixes, gelu, rope

        compile_fixes.install()  # torch 2.11's inductor bug that 2.1's real RoPE met (see compile_fixes.py)
        # same numbers in real arithmetic, which inductor can fuse (see rope.py)
        rope.install(rope.QWEN_IMAGE_MODULE, rope.QWEN_IMAGE_21_MODULE)
        gelu.install(transformer)  # the same activation with cheaper arithmetic (see gelu.py)
        if m.fp8_matmul:  # the fp8 MLPs' GELU and quantizations in one hand-written kernel each way (gelu_fp8.py)
            from . import gelu_fp8

            gelu_fp8.install(transformer)
        if rewrites is not None:
            rewrites()
        from . import norm_rope

        # after the rewrites, whose attention processors it routes: q/k norms + RoPE in one kernel each way
        norm_rope.install(transformer)
        # the 3072-wide norm-and-quantize rows as persistent kernels (process-wide until the backend's close)
        reductions.install()
        compile_blocks(transformer, fullgraph=True, **({"mode": m.compile_mode} if m.compile_mode else {}))


def compile_blocks(transformer, **kwargs) -> list:
    """diffusers' ``compile_repeated_blocks(**kwargs)`` (regional compile). The blocks whose weights ``model.offload``
    streams from CPU memory compile too, their fetches an opaque custom op (``offload.fetch_linear_ops``), but never
    with CUDA graphs (``mode="reduce-overhead"`` dropped, ``"max-autotune"`` without graphs): a graph would replay one
    step's copies into the prefetcher's ring and skip its bookkeeping. ``QWEN_ZERO_PRIOR_COMPILE_STREAMED=0`` keeps
    them eager (as before session 15; a benchmark's knob). Returns the blocks compiled."""
    from . import gelu
    from .memory import GRAPH_MODES
    from .offload import streams

    names = getattr(transformer, "_repeated_blocks", None) or ()
    blocks = [mod for mod in transformer.modules() if mod.__class__.__name__ in names]
    if not blocks:  # as diffusers' compile_repeated_blocks
        raise ValueError(f"regional compile: no repeated blocks ({list(names)}) in {type(transformer).__name__}")
    streamed = [b for b in blocks if streams(b)]
    eager_streamed = streamed and compile_streamed_from_env() is False
    streamed_kwargs = dict(kwargs)
    if kwargs.get("mode") in GRAPH_MODES:  # the same mode without CUDA graphs (none for reduce-overhead)
        streamed_kwargs.pop("mode")
        if GRAPH_MODES[kwargs["mode"]]:
            streamed_kwargs["mode"] = GRAPH_MODES[kwargs["mode"]]
    compiled = []
    for block in blocks:
        if block not in streamed:
            block.compile(**kwargs)
            compiled.append(block)
        elif not eager_streamed:
            block.compile(**streamed_kwargs)
            compiled.append(block)
        else:  # eagerly the sigmoid GELU is several kernels and float32 temporaries, not one fused kernel
            gelu.uninstall(block)
    if streamed:
        logger.info("compile: %d of %d transformer blocks stream their weights from CPU memory; %s", len(streamed),
                    len(blocks), "they stay eager (QWEN_ZERO_PRIOR_COMPILE_STREAMED=0)" if eager_streamed else
                    "they compile too, their fetches an opaque op" + (
                        ", without CUDA graphs" if streamed_kwargs != kwargs else ""))
    return compiled


COMPILE_STREAMED_ENV = "QWEN_ZERO_PRIOR_COMPILE_STREAMED"


def compile_streamed_from_env() -> bool | None:
    """``QWEN_ZERO_PRIOR_COMPILE_STREAMED``: 1 (the default, also unset) compiles the streamed blocks with the rest, 0
    keeps them eager (a benchmark's knob, to measure one against the other in one call)."""
    raw = os.environ.get(COMPILE_STREAMED_ENV, "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{COMPILE_STREAMED_ENV}={raw!r}: expected 1 (compile the streamed blocks, the default) or 0 "
                         "(keep them eager)")
    return None if raw == "" else raw == "1"


class DiffusersBackend(TrainBackend):
    name = "diffusers"
    # model.offload: where the text decoder's layers go (offload.apply_offload): decided by the budget
    # (memory.text_encoder_storage: Qwen-Image's on the GPU as loaded where they fit beside the ring, else streamed)
    offload_text_encoder = "auto"
    offload_layout = "spread"  # which blocks stream where not all fit (offload.streamed_block_ids); the bench sets it

    def offload_text_encoder_storage(self) -> str:
        """model.offload_text_encoder, where set; with ``auto``, this model's own choice (``offload_text_encoder``)."""
        chosen = self.cfg.model.offload_text_encoder
        return self.offload_text_encoder if chosen == "auto" else chosen

    def __init__(self, cfg: Config, pipe):
        super().__init__(cfg)
        self.pipe = pipe
        self.family = detect_pipeline(pipe)
        self.model_family = self.family.name
        self.bucket_step = self.family.bucket_step
        self._targets = self.family.lora_targets(cfg.train.lora_targets)
        self.device = pipe.transformer.device
        self.dtype = pipe.transformer.dtype
        self.tokens: list[RegisteredToken] = []
        self.prompts: PromptEncoder | None = None
        self.offload_summary: dict | None = None
        self._prefetcher = None  # model.offload's WeightPrefetcher, where it streams anything
        self._prompt_cache: dict[str, torch.Tensor] = {}  # caption -> conditioning (token training off)
        self._reductions_were_installed = True  # until prepare: close leaves inductor's choices alone
        vae_cfg = pipe.vae.config
        self.latents_mean = torch.tensor(vae_cfg.latents_mean).view(1, vae_cfg.z_dim, 1, 1, 1)
        self.latents_std = torch.tensor(vae_cfg.latents_std).view(1, vae_cfg.z_dim, 1, 1, 1)
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    # ---- setup ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def latent(self, example: Example) -> torch.Tensor:
        px = load_pixels(example.image, example.bucket)[None, :, None].to(self.device, self.pipe.vae.dtype)
        lat = self.pipe.vae.encode(px).latent_dist.mode()  # the posterior mean; the Qwen VAE's variance is negligible
        return ((lat.float().cpu() - self.latents_mean) / self.latents_std)[0]

    def prepare(self, t: TrainConfig) -> None:
        from diffusers.training_utils import cast_training_params

        pipe, m = self.pipe, self.cfg.model
        for mod in (pipe.vae, pipe.text_encoder, pipe.transformer):
            mod.requires_grad_(False)
        pipe.vae.eval()
        pipe.text_encoder.eval()
        # the vision tower and LM head never run for text conditioning: 2.3 GiB of Qwen2.5-VL-7B off the GPU
        text_parts.park(pipe.text_encoder)
        if m.gradient_checkpointing or m.offload:
            pipe.transformer.enable_gradient_checkpointing()
        adapted = add_lora(pipe.transformer, t.rank, t.alpha, self._targets, seed=t.seed)
        logger.info("LoRA rank %d on %d transformer modules (%s)", t.rank, len(adapted), ", ".join(self._targets))
        cast_training_params(pipe.transformer, dtype=torch.float32)
        pipe.transformer.train()
        if m.offload:  # after add_lora: the LoRA's base layers become offloaded ones (offload excludes fp8_matmul)
            from .models import resolve_device
            from .offload import apply_offload, prefetcher_of

            device = resolve_device(m.device)
            if device.type != "cuda":
                raise RuntimeError(f"model.offload needs a CUDA device, got {device}; set model.offload: false")
            budget = m.offload_budget_gib or torch.cuda.get_device_properties(device).total_memory / 2**30
            from .memory import OFFLOAD_COMPILE_RESERVE_GIB, OFFLOAD_RESERVE_GIB

            reserve = OFFLOAD_RESERVE_GIB + (OFFLOAD_COMPILE_RESERVE_GIB if m.compile else 0.0)
            self.offload_summary = apply_offload(pipe, device, budget, reserve_gib=reserve,
                                                 text_encoder=self.offload_text_encoder_storage(),
                                                 prefetch_gib=m.offload_prefetch_gib,
                                                 layout=self.offload_layout)
            self._prefetcher = prefetcher_of(pipe.transformer) or prefetcher_of(pipe.text_encoder)
            self.device = pipe.transformer.device
        self._reductions_were_installed = reductions.installed()
        accelerate_transformer(pipe.transformer, m, self.family.fp8_modules,
                               fp8_backward_copy=self._fp8_backward_copy_blocks(t) if m.fp8_matmul else 0,
                               set_attention_backend=self._set_attention_backend, rewrites=self._compile_rewrites)
        self._make_prompts()

    def _fp8_backward_copy_blocks(self, t: TrainConfig) -> int:
        """How many transformer blocks (the first ones) give their fp8 layers backward copies (``fp8.Fp8Linear``: a
        faster backward, one more fp8 byte a weight): as many as the memory plan has room for beside a resident step
        without them (asked with the weights as they will be: fp8 storage, the unused text parts in CPU memory).
        Each block kept saves its share of the copies' time (session 6: 9.3 ms/step for all 60 of Qwen-Image's,
        6.3 GiB). None on the CPU (no memory to plan, nothing to gain), with offload or with checkpointing."""
        from . import memory
        from .fp8 import backward_copy_bytes_by_block, check_supported

        pipe, m = self.pipe, self.cfg.model
        if self.device.type != "cuda" or m.offload:
            return 0
        check_supported(self.device)  # an fp8-less GPU is refused before anything is planned or logged
        per_block = backward_copy_bytes_by_block(pipe.transformer, self.family.fp8_modules)
        parts = memory.weight_parts(pipe) if self.family.name == QWEN_IMAGE_21 else None
        capacity = memory.per_process_capacity(self.device)[0]
        plan = memory.choose("auto", weights_bytes=memory.weights_bytes(pipe, m), resolution=t.resolution,
                             batch_size=t.batch_size, device=self.device, capacity_bytes=capacity,
                             reduce_overhead=m.compile_graphs, parts=parts)
        if plan.mode != "resident" or m.gradient_checkpointing:
            logger.info("fp8 backward copies (%.1f GiB): not kept (%s)", sum(per_block) / 2**30, plan.reason)
            return 0
        room = capacity - plan.need_gib["resident"] * 2**30
        n, used = 0, 0
        while n < len(per_block) and used + per_block[n] <= room:
            used += per_block[n]
            n += 1
        logger.info("fp8 backward copies: %d of %d blocks (%.1f of %.1f GiB; %.1f GiB of room beside the resident "
                    "step's ~%.1f GiB)", n, len(per_block), used / 2**30, sum(per_block) / 2**30,
                    max(room, 0) / 2**30, plan.need_gib["resident"])
        return n

    def _set_attention_backend(self, backend: str) -> None:
        self.pipe.transformer.set_attention_backend(backend)

    def _compile_rewrites(self) -> None:
        """The family's own forms of its modules for ``model.compile``: for Qwen-Image, each stream's q/k/v LoRA ``A``
        products as one matmul (``attention_qwen.py``; peft's numbers)."""
        from . import attention_qwen

        attention_qwen.install(self.pipe.transformer)

    def _make_prompts(self) -> None:
        m = self.cfg.model
        self.prompts = PromptEncoder(self.pipe, [tok.token_id for tok in self.tokens] or None,
                                     prefix_cache=m.text_prefix_cache,
                                     cuda_graphs=m.text_cuda_graphs and not m.offload,
                                     compile=self._compile_text_suffix())

    def _compile_text_suffix(self) -> bool:
        """model.compile for the text decoder's per-step suffix, unless offload streams its layers: the suffix is
        compiled whole for CUDA-graph capture (``fullgraph``, unrolled layers), which the prefetcher's fetches cannot
        be part of (the transformer's streamed blocks compile without graphs: :func:`compile_blocks`)."""
        from .offload import streams

        m = self.cfg.model
        return m.compile and not (m.offload and streams(self.pipe.text_encoder))

    def lora_targets(self) -> list[str]:
        return list(self._targets)

    def named_lora_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        # peft's parameter names carry the adapter name; the checkpoint keys are peft's state-dict keys
        marker = f".{ADAPTER_NAME}."
        return [(n.replace(marker, "."), p) for n, p in self.pipe.transformer.named_parameters()
                if "lora_" in n and p.requires_grad]

    def export_lora(self) -> dict[str, torch.Tensor]:
        t = self.cfg.train
        return export_lora(self.pipe.transformer, t.rank, t.alpha)

    def add_tokens(self, tokens: list[str], init_std: float, generator: torch.Generator) -> list[RegisteredToken]:
        pipe = self.pipe
        self.tokens = install_placeholders(self.family.tokenizer(pipe), pipe.text_encoder, tokens, init_std=init_std,
                                           generator=generator)
        if self.cfg.debug.log_prompt_ids:
            rows = self.tokens[0].module.base.weight.shape[0]
            frozen = sum(1 for p in pipe.text_encoder.parameters() if not p.requires_grad)
            for tok in self.tokens:
                logger.info("placeholder token %r registered as id %d", tok.token, tok.token_id)
            ids, width = [tok.token_id for tok in self.tokens], self.tokens[0].vector.shape[0]
            which = (f"row {ids[0]} of {rows} trains (one {width}-wide parameter" if len(ids) == 1 else
                     f"rows {', '.join(map(str, ids))} of {rows} train (one {width}-wide parameter each")
            logger.info("gradient mask active: only embedding %s, weight decay 0); %d text-encoder tensors frozen",
                        which, frozen)
        if self.prompts is not None:
            self._make_prompts()
        return self.tokens

    def check_trigger(self, token: str) -> None:
        check_single_id(self.family.tokenizer(self.pipe), token, context="train_placeholder_token is off")

    def training_sigmas(self) -> torch.Tensor:
        return self.scheduler.sigmas[: len(self.scheduler.timesteps)].float()

    # ---- every step -----------------------------------------------------------------------------------
    def prompt_ids(self, caption: str) -> list[int]:
        return encode_ids(self.family.tokenizer(self.pipe), caption)

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokens:  # the gradient reaches the token rows through the frozen text encoder
            return self.prompts.encode(captions, self.dtype, self.device)
        missing = [c for c in dict.fromkeys(captions) if c not in self._prompt_cache]
        if missing:
            with torch.no_grad():
                for c in missing:  # one caption alone: no padding
                    self._prompt_cache[c] = self.prompts.encode([c], self.dtype, self.device)[0][0].cpu()
        embeds, mask = pad_batch([self._prompt_cache[c] for c in captions])
        return embeds.to(self.device, non_blocking=True), mask

    def predict(self, noisy, sigmas, embeds, mask):
        pipe = self.pipe
        bsz, c, _, h, w = noisy.shape
        packed = pipe._pack_latents(noisy.permute(0, 2, 1, 3, 4), bsz, c, h, w).to(self.dtype)
        with self._autocast():
            pred = pipe.transformer(
                hidden_states=packed,
                timestep=sigmas.to(self.dtype),  # the transformer takes timestep / 1000 = sigma
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=mask,
                img_shapes=[[(1, h // 2, w // 2)]] * bsz,
                return_dict=False,
            )[0]
        vsf = pipe.vae_scale_factor
        return pipe._unpack_latents(pred, h * vsf, w * vsf, vsf)

    def _autocast(self):
        return compute_autocast(self.dtype, self.device)

    def step_begin(self) -> None:
        if self._prefetcher is not None:  # this step streams its weights in the order the last one used them
            self._prefetcher.begin_step()
        if self.cfg.model.compile_graphs:
            # a new step for torch.compile's CUDA-graph trees: last step's graph outputs may be overwritten now
            torch.compiler.cudagraph_mark_step_begin()

    # ---- the rest -------------------------------------------------------------------------------------
    def sample(self, prompts: list[str], step: int) -> list:
        s, t = self.cfg.sample, self.cfg.train
        was_training = self.pipe.transformer.training
        self.pipe.transformer.eval()
        images = []
        try:
            for i, prompt in enumerate(prompts):
                gen = torch.Generator(device="cpu").manual_seed(s.seed + i)
                images.append(self.pipe(
                    prompt=prompt, negative_prompt=s.negative_prompt if s.guidance > 1 else None,
                    true_cfg_scale=s.guidance, num_inference_steps=s.steps,
                    width=s.width or t.resolution, height=s.height or t.resolution, generator=gen,
                ).images[0])
        finally:
            self.pipe.transformer.train(was_training)
        return images

    def close(self) -> None:
        if not self._reductions_were_installed:  # inductor's choices as this process had them (reductions.py)
            reductions.uninstall()


__all__ = ["DiffusersBackend", "accelerate_transformer", "compile_blocks", "compute_autocast", "make_backend"]
