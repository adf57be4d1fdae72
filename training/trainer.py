"""The masked-embedding + LoRA training loop on Qwen-Image's flow-matching objective.

Conditioning is what ``QwenImagePipeline._get_qwen_prompt_embeds`` computes (same chat template, same dropped
34-token prefix as inference; ``prompt.PromptEncoder`` gets the same numbers with less work), so what the token
learns at train time is what the pipeline feeds the transformer at inference. Timesteps, loss weighting and latent normalisation follow diffusers'
``train_dreambooth_lora_qwen_image.py``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from . import checkpoint as ckpt
from .archive import ArchiveMeta, atomic_write_bytes, write_archive
from .config import Config
from .data import BatchPlan, Example, assign_buckets, load_pixels
from .distributed import DistContext, average, barrier
from .lora import ADAPTER_NAME, add_lora, export_lora, lora_parameters
from .prompt import PromptEncoder
from .token import RegisteredToken, check_single_id, encode_ids, install_placeholder

logger = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    """Raised (after a checkpoint was written) when ``should_stop`` asked the loop to stop."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"training interrupted at step {step}; checkpoint: {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class Callbacks:
    on_step: Callable[[int, int, float], None] | None = None  # (step, total, loss)
    should_stop: Callable[[], bool] | None = None
    on_sample: Callable[[int, list], None] | None = None  # (step, PIL images)


@dataclass
class TrainResult:
    archive: Path
    steps: int
    losses: list[float]
    token_id: int | None
    loss_plot: Path | None
    samples: list[Path] = field(default_factory=list)
    seconds: float = 0.0


class Trainer:
    def __init__(self, cfg: Config, pipe, examples: list[Example], output_dir: Path, *,
                 dist: DistContext | None = None):
        self.cfg = cfg
        self.pipe = pipe
        self.t = cfg.train
        self.output_dir = Path(output_dir)
        self.dist = dist or DistContext()
        self.rank, self.world = self.dist.rank, self.dist.world
        self.device = pipe.transformer.device
        self.dtype = pipe.transformer.dtype
        self.examples = assign_buckets(examples, self.t.resolution)
        self.plan = BatchPlan(self.examples, self.t.batch_size, self.t.seed, self.rank, self.world)
        self.token: RegisteredToken | None = None
        self.step = 0
        self.losses: list[float] = []
        self._latents: dict[int, torch.Tensor] = {}
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._logged_prompts: set[str] = set()
        self.offload_summary: dict | None = None
        self._next_inputs: tuple[int, StepInputs] | None = None
        self.prefetch = self.device.type == "cuda"  # prepare step n+1's inputs at the end of step n
        self._setup()

    # ---- setup ----------------------------------------------------------------------------------------
    def _setup(self) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.training_utils import cast_training_params

        pipe, t = self.pipe, self.t
        for m in (pipe.vae, pipe.text_encoder, pipe.transformer):
            m.requires_grad_(False)
        pipe.vae.eval()
        pipe.text_encoder.eval()
        if self.cfg.model.gradient_checkpointing or self.cfg.model.offload:
            pipe.transformer.enable_gradient_checkpointing()
        adapted = add_lora(pipe.transformer, t.rank, t.alpha, t.lora_targets, seed=t.seed)
        logger.info("LoRA rank %d on %d transformer modules (%s)", t.rank, len(adapted), ", ".join(t.lora_targets))
        cast_training_params(pipe.transformer, dtype=torch.float32)
        pipe.transformer.train()
        if self.cfg.model.fp8_matmul:  # after add_lora: the LoRA wraps nn.Linear, then its base layer turns fp8
            from .fp8 import apply_fp8_matmul

            apply_fp8_matmul(pipe.transformer)
        if self.cfg.model.offload:  # after add_lora, like fp8: the LoRA's base layers become offloaded ones
            from .models import resolve_device
            from .offload import apply_offload

            device = resolve_device(self.cfg.model.device)
            if device.type != "cuda":
                raise RuntimeError(f"model.offload needs a CUDA device, got {device}; set model.offload: false")
            budget = self.cfg.model.offload_budget_gib or torch.cuda.get_device_properties(device).total_memory / 2**30
            self.offload_summary = apply_offload(pipe, device, budget)
            self.device = pipe.transformer.device
        if self.cfg.model.attention_backend:
            pipe.transformer.set_attention_backend(self.cfg.model.attention_backend)
        if self.cfg.model.compile:
            from . import gelu, rope

            rope.install()  # same numbers in real arithmetic, which inductor can fuse (see rope.py)
            gelu.install(pipe.transformer)  # the same activation with cheaper arithmetic (see gelu.py)
            mode = self.cfg.model.compile_mode
            pipe.transformer.compile_repeated_blocks(fullgraph=True, **({"mode": mode} if mode else {}))

        gen = torch.Generator().manual_seed(t.seed)
        if t.train_placeholder_token:
            self.token = install_placeholder(
                pipe.tokenizer, pipe.text_encoder, t.placeholder_token, init_std=t.placeholder_init_std, generator=gen
            )
            if self.cfg.debug.log_prompt_ids:
                rows = self.token.module.base.weight.shape[0]
                frozen = sum(1 for p in pipe.text_encoder.parameters() if not p.requires_grad)
                logger.info("placeholder token %r registered as id %d", self.token.token, self.token.token_id)
                logger.info(
                    "gradient mask active: only embedding row %d of %d trains (one %d-wide parameter, weight "
                    "decay 0); %d text-encoder tensors frozen", self.token.token_id, rows,
                    self.token.vector.shape[0], frozen,
                )
        elif any(t.placeholder_token in ex.caption for ex in self.examples):
            check_single_id(pipe.tokenizer, t.placeholder_token, context="train_placeholder_token is off")

        self.lora_params = lora_parameters(pipe.transformer)
        self.param_names = [n for n, p in pipe.transformer.named_parameters() if p.requires_grad]
        groups = [{"params": self.lora_params, "lr": t.learning_rate, "weight_decay": t.weight_decay}]
        if self.token is not None:
            groups.append({"params": [self.token.vector], "lr": t.token_learning_rate, "weight_decay": 0.0})
            self.param_names.append("placeholder_vector")
        # fused AdamW: one kernel for all LoRA tensors instead of several per tensor (CUDA only)
        self.optimizer = torch.optim.AdamW(groups, fused=self.device.type == "cuda")
        self.prompts = PromptEncoder(pipe, self.token.token_id if self.token else None,
                                     prefix_cache=self.cfg.model.text_prefix_cache,
                                     cuda_graphs=self.cfg.model.text_cuda_graphs and not self.cfg.model.offload,
                                     compile=self.cfg.model.compile)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        vae_cfg = pipe.vae.config
        self.latents_mean = torch.tensor(vae_cfg.latents_mean).view(1, vae_cfg.z_dim, 1, 1, 1)
        self.latents_std = torch.tensor(vae_cfg.latents_std).view(1, vae_cfg.z_dim, 1, 1, 1)

    # ---- conditioning ---------------------------------------------------------------------------------
    def _log_prompt(self, caption: str) -> None:
        if self.cfg.debug.log_prompt_ids and caption not in self._logged_prompts:
            self._logged_prompts.add(caption)
            ids = encode_ids(self.pipe.tokenizer, caption)
            logger.info("prompt %r -> ids %s", caption, ids)

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        for c in captions:
            self._log_prompt(c)
        if self.token is not None:  # gradient reaches the token row through the frozen text encoder
            embeds, mask = self.prompts.encode(captions, self.dtype, self.device)
        else:
            missing = [c for c in dict.fromkeys(captions) if c not in self._prompt_cache]
            if missing:
                with torch.no_grad():
                    for c in missing:
                        e, m = self.prompts.encode([c], self.dtype, self.device)
                        self._prompt_cache[c] = (e[0].cpu(), m[0].cpu())
            parts = [self._prompt_cache[c] for c in captions]
            length = max(e.shape[0] for e, _ in parts)
            embeds = torch.stack([torch.cat([e, e.new_zeros(length - e.shape[0], e.shape[1])]) for e, _ in parts])
            mask = torch.stack([torch.cat([m, m.new_zeros(length - m.shape[0])]) for _, m in parts])
            embeds = embeds.to(self.device, non_blocking=True)
        # the mask is a host tensor: testing it does not wait for the GPU (a sync here idles it mid-step)
        return embeds, (None if bool(mask.all()) else mask.to(self.device, non_blocking=True))

    # ---- latents --------------------------------------------------------------------------------------
    @torch.no_grad()
    def latents_for(self, indices: list[int]) -> torch.Tensor:
        out = []
        for i in indices:
            lat = self._latents.get(i)
            if lat is None:
                ex = self.examples[i]
                px = load_pixels(ex.image, ex.bucket)[None, :, None].to(self.device, self.pipe.vae.dtype)
                dist = self.pipe.vae.encode(px).latent_dist
                lat = dist.mode()  # the posterior mean; the Qwen VAE's variance is negligible
                lat = ((lat.float().cpu() - self.latents_mean) / self.latents_std)[0]
                if self.t.cache_latents:
                    self._latents[i] = lat
            out.append(lat)
        return torch.stack(out).to(self.device, non_blocking=True)

    def cache_all_latents(self) -> None:
        if self.t.cache_latents:
            from tqdm.auto import tqdm

            # a bar: on CPU (or a slow VAE) encoding every image takes long enough to look like a hang
            for i in tqdm(range(len(self.examples)), desc="caching latents", unit="image", disable=self.rank != 0):
                self.latents_for([i])

    # ---- one step ------------------------------------------------------------------------------------
    def step_inputs(self, indices: list[int], generator: torch.Generator | None = None,
                    sample_seeds: list[int] | None = None) -> StepInputs:
        """Latents, noise and timesteps of one step, on the device. Noise and timestep come from ``generator``,
        or, per sample, from ``sample_seeds`` (so a sample draws the same noise whichever rank or batch slot it
        lands in). Nothing here depends on the trained weights: ``train_step`` prepares the next step's while
        the GPU still runs this one's backward."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        x0 = self.latents_for(indices)  # (B, C, 1, h, w)
        bsz = x0.shape[0]
        gens = [generator] * bsz if generator is not None else [torch.Generator().manual_seed(s) for s in sample_seeds]
        # host-to-device copies are non_blocking throughout the step: a blocking one waits for the GPU to finish
        # everything queued (the last step's backward), so the host could not prepare this step meanwhile
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(self.device, non_blocking=True)
        u = torch.cat([compute_density_for_timestep_sampling(
            self.t.weighting_scheme, 1, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, generator=g) for g in gens])
        idx = (u * self.scheduler.config.num_train_timesteps).long().clamp(max=len(self.scheduler.timesteps) - 1)
        timesteps = self.scheduler.timesteps[idx].to(self.device, non_blocking=True)
        sigmas = self.scheduler.sigmas[idx].to(self.device, torch.float32, non_blocking=True).view(-1, 1, 1, 1, 1)
        return StepInputs(list(indices), x0, noise, timesteps, sigmas)

    def loss_for(self, indices: list[int], generator: torch.Generator | None = None,
                 sample_seeds: list[int] | None = None, inputs: StepInputs | None = None) -> torch.Tensor:
        """Flow-matching loss on ``indices`` (or on prepared ``inputs``); see :meth:`step_inputs`."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        pipe = self.pipe
        if inputs is None:
            inputs = self.step_inputs(indices, generator, sample_seeds)
        indices, x0, noise, timesteps, sigmas = inputs
        bsz, c, _, h, w = x0.shape
        noisy = (1.0 - sigmas) * x0 + sigmas * noise
        packed = pipe._pack_latents(noisy.permute(0, 2, 1, 3, 4), bsz, c, h, w).to(self.dtype)
        # the frozen text encoder runs in its own dtype, outside autocast (which CUDA-graph replay cannot take)
        embeds, mask = self.encode([self.examples[i].caption for i in indices])
        with self._autocast():
            pred = pipe.transformer(
                hidden_states=packed,
                timestep=(timesteps / 1000).to(self.dtype),
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=mask,
                img_shapes=[[(1, h // 2, w // 2)]] * bsz,
                return_dict=False,
            )[0]
        vsf = pipe.vae_scale_factor
        pred = pipe._unpack_latents(pred, h * vsf, w * vsf, vsf)
        target = noise - x0
        weighting = compute_loss_weighting_for_sd3(self.t.weighting_scheme, sigmas)
        return (weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1).mean()

    def _autocast(self):
        """bf16/fp16 autocast around the forward, as diffusers' scripts get from accelerate's mixed precision:
        the float32 LoRA (master) weights then multiply in the model's dtype instead of in float32."""
        if self.dtype in (torch.bfloat16, torch.float16) and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    def sample_seeds(self) -> list[int]:
        first = self.rank * self.t.batch_size  # position of this rank's slice in the global batch
        return [self.t.seed * 1_000_003 + self.step * 10_007 + first + j for j in range(self.t.batch_size)]

    def train_step(self) -> float:
        if self.cfg.model.compile and self.cfg.model.compile_mode == "reduce-overhead":
            # a new step for torch.compile's CUDA-graph trees: last step's graph outputs may be overwritten now
            torch.compiler.cudagraph_mark_step_begin()
        ready, self._next_inputs = self._next_inputs, None
        if ready is None or ready[0] != self.step:  # nothing prefetched (first step, CPU) or the step moved (resume)
            ready = (self.step, self.step_inputs(self.plan.batch(self.step), sample_seeds=self.sample_seeds()))
        loss = self.loss_for(None, inputs=ready[1])
        self.optimizer.zero_grad(set_to_none=True)
        if not self.dist.enabled:
            reading = _LossReadback(loss)  # copied as soon as the forward is done, read at the end
        loss.backward()
        params = self.trainable()
        if self.dist.enabled:  # mean of the ranks' gradients (and losses), one flat all-reduce
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            loss = loss.detach().reshape(1).clone()
            average(self.dist, [p.grad for p in params] + [loss], self.step)
            reading = _LossReadback(loss)
        if self.t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.t.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        if self.prefetch:
            # the host is ahead of the GPU here (backward and optimizer are queued, not done): prepare the next
            # step's inputs now, so that step starts with the text encoder instead of host work on an idle GPU
            self._next_inputs = (self.step, self.step_inputs(self.plan.batch(self.step), sample_seeds=self.sample_seeds()))
        value = reading.value()
        self.losses.append(value)
        return value

    def trainable(self) -> list[torch.nn.Parameter]:
        return self.lora_params + ([self.token.vector] if self.token is not None else [])

    # ---- checkpoints ----------------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    def raw_lora(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.pipe.transformer, adapter_name=ADAPTER_NAME)

    def save_checkpoint(self) -> Path | None:
        if self.rank != 0:
            return None
        path = ckpt.save_checkpoint(
            self.checkpoint_root, self.step, lora=self.raw_lora(),
            token=self.token.token if self.token else None,
            vector=self.token.vector if self.token else None,
            optimizer=self.optimizer, param_names=self.param_names,
            state={"losses": self.losses, "config": self.cfg.to_dict(),
                   "token_id": self.token.token_id if self.token else None},
            keep=self.t.keep_checkpoints,
        )
        logger.info("checkpoint saved: %s", path)
        return path

    def resume(self, path: str | Path) -> Path:
        from peft.utils import set_peft_model_state_dict

        where = ckpt.find_checkpoint(path)
        state = ckpt.load_checkpoint(where)
        ckpt.check_compatible(state, where, self.t)
        if int(state["step"]) > self.t.steps:  # fit would train nothing and write an archive of the longer run
            raise ckpt.CheckpointError(
                f"checkpoint {where} is at step {state['step']}, past train.steps={self.t.steps}; to train further "
                f"set train.steps above {state['step']} (e.g. --set train.steps={2 * int(state['step'])})")
        result = set_peft_model_state_dict(self.pipe.transformer, state["lora"], adapter_name=ADAPTER_NAME)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ckpt.CheckpointError(f"checkpoint {where}: LoRA keys do not fit the model: {unexpected[:5]}")
        if self.token is not None:
            vec = state["token_tensors"].get(self.token.token)
            if vec is None:
                raise ckpt.CheckpointError(f"checkpoint {where} has no vector for {self.token.token!r}")
            with torch.no_grad():
                self.token.vector.copy_(vec)
        ckpt.restore_optimizer(self.optimizer, self.param_names, state)
        self.step = int(state["step"])
        self.losses = list(state.get("losses", []))[: self.step]
        logger.info("resumed from %s at step %d", where, self.step)
        return where

    # ---- samples & export -----------------------------------------------------------------------------
    def render_samples(self) -> tuple[list[Path], list]:
        """Render ``sample.prompts`` with the current LoRA and token; returns (saved paths, PIL images)."""
        s = self.cfg.sample
        if not s.prompts or not self.dist.is_main:
            return [], []
        was_training = self.pipe.transformer.training
        self.pipe.transformer.eval()
        out = []
        images = []
        try:
            for i, prompt in enumerate(s.prompts):
                gen = torch.Generator(device="cpu").manual_seed(s.seed + i)
                img = self.pipe(
                    prompt=prompt, negative_prompt=s.negative_prompt if s.guidance > 1 else None,
                    true_cfg_scale=s.guidance, num_inference_steps=s.steps,
                    width=s.width or self.t.resolution, height=s.height or self.t.resolution, generator=gen,
                ).images[0]
                images.append(img)
                if self.rank == 0:
                    path = self.output_dir / "samples" / f"step-{self.step:06d}-{i}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    img.save(path)
                    out.append(path)
        finally:
            self.pipe.transformer.train(was_training)
        if out:
            logger.info("step %d: %d sample image(s) written to %s", self.step, len(out), out[0].parent)
        return out, images

    def export(self, archive_path: Path) -> Path:
        t = self.t
        lora = export_lora(self.pipe.transformer, t.rank, t.alpha)
        meta = ArchiveMeta(
            base_model=self.cfg.model.base_model,
            placeholder_token=t.placeholder_token if self.token else None,
            placeholder_token_id=self.token.token_id if self.token else None,
            rank=t.rank,
            created=ArchiveMeta.now(),
            alpha=float(t.alpha),
            lora_targets=list(t.lora_targets),
            placeholder_init_std=t.placeholder_init_std if self.token else None,
            steps=self.step,
            train_placeholder_token=bool(self.token),
            extra={"resolution": t.resolution, "learning_rate": t.learning_rate,
                   "token_learning_rate": t.token_learning_rate, "final_loss": self.losses[-1] if self.losses else None},
        )
        return write_archive(archive_path, meta, lora, self.token.vector if self.token else None)

    # ---- the loop -------------------------------------------------------------------------------------
    def fit(self, archive_path: Path, callbacks: Callbacks | None = None) -> TrainResult:
        from tqdm.auto import tqdm

        cb = callbacks or Callbacks()
        t0 = time.time()
        self.cache_all_latents()
        total = self.t.steps
        samples: list[Path] = []
        bar = tqdm(total=total, initial=self.step, desc="training", unit="step", disable=self.rank != 0)
        try:
            while self.step < total:
                if cb.should_stop is not None and cb.should_stop():
                    where = self.save_checkpoint() if self.step > 0 else None
                    raise TrainingInterrupted(self.step, where)
                loss = self.train_step()
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss} at step {self.step}; lower train.learning_rate / token_learning_rate"
                    )
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if cb.on_step is not None:
                    cb.on_step(self.step, total, loss)
                every = self.t.checkpoint_every
                if every and self.step % every == 0 and self.step < total:
                    self.save_checkpoint()
                if self.cfg.sample.every and self.step % self.cfg.sample.every == 0:
                    paths, images = self.render_samples()
                    samples += paths
                    if cb.on_sample is not None:
                        cb.on_sample(self.step, images)
        finally:
            bar.close()
        if self.t.checkpoint_every:
            self.save_checkpoint()
        archive = self.export(archive_path) if self.dist.is_main else archive_path
        plot = save_loss_plot(self.losses, archive_path.with_name(archive_path.stem + "_loss.png")) if self.dist.is_main else None
        barrier(self.dist)  # the other ranks return once the archive is complete
        return TrainResult(archive, self.step, list(self.losses), self.token.token_id if self.token else None,
                           plot, samples, time.time() - t0)


class StepInputs(NamedTuple):
    indices: list[int]
    x0: torch.Tensor  # (B, C, 1, h, w) normalized latents
    noise: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor  # (B, 1, 1, 1, 1)


class _LossReadback:
    """The loss as a Python float without waiting for the whole step.

    ``float(loss)`` at the end of a step waits for the backward and the optimizer too, so the next step's host
    work (data, tokenizing, kernel launches) would start on an idle GPU. The value is copied to pinned host
    memory as soon as it exists; reading it waits only for that copy, and the step's remaining GPU work
    overlaps the next step's host work."""

    def __init__(self, loss: torch.Tensor):
        loss = loss.detach().reshape(())
        if loss.is_cuda:
            self.host = torch.empty((), dtype=loss.dtype, pin_memory=True)
            self.host.copy_(loss, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = loss, None

    def value(self) -> float:
        if self.event is not None:
            self.event.synchronize()
        return float(self.host)


def save_loss_plot(losses: list[float], path: Path) -> Path | None:
    if not losses:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    k = max(1, len(losses) // 20)
    if k > 1:
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.6, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())
