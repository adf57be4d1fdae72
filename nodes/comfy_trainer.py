"""The masked-embedding + LoRA loop run on the graph's own MODEL, CLIP and VAE (ComfyUI's model code and memory
management, not a second copy of the model in diffusers).

- LoRA: ComfyUI's trainable ``LoraDiff`` adapters, attached with ``ModelPatcher.add_weight_wrapper`` to a clone
  of the MODEL (the way ``comfy_extras/nodes_train.py`` trains), on the configured targets (text stream too).
- Token: a float32 ``nn.Parameter`` spliced into the token list at every occurrence of the new id (see
  ``token_node.ZeroPriorTokenizer``); ``comfy/sd1_clip.py: process_tokens`` concatenates it into the embeddings,
  so its gradient flows through ComfyUI's frozen text encoder (fp8-stored ones included).
- Objective, timestep sampling, buckets, checkpoints and the archive are the core's (``training/``), so the
  archive is the same format diffusers and Cog load.

ComfyUI runs prompts under ``torch.inference_mode()``. Models loaded during a prompt hold inference tensors,
which backward cannot save; the loop runs under ``inference_mode(False)`` and swaps such parameters/buffers
for ordinary clones. The values are bit-identical, so other nodes sharing the module see no difference, and the
originals are not kept (keeping them would double the memory of a 20B model). Forward patches for gradient
checkpointing *are* restored in ``finally``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import comfy.model_management as mm
from comfy.weight_adapter.lora import LoRAAdapter

from ..training import checkpoint as ckpt
from ..training.archive import ArchiveMeta, write_archive
from ..training.config import Config
from ..training.data import BatchPlan, Example, assign_buckets, load_pixels
from ..training.token import add_placeholder_token, check_single_id, encode_ids, init_vector
from ..training.trainer import save_loss_plot
from .token_node import ZeroPriorTokenizer, qwen_te_parts

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    on_step: Callable[[int, int, float], None] | None = None  # raises to cancel (ComfyUI's progress hook does)
    on_preview: Callable[[int, object], None] | None = None


@dataclass
class ComfyTrainResult:
    archive: Path
    model: object
    steps: int
    losses: list[float]
    token_id: int | None
    loss_plot: Path | None
    checkpoints: list[Path] = field(default_factory=list)


def _ordinary_tensors(module: torch.nn.Module) -> int:
    """Replace inference tensors held by ``module`` with ordinary clones (call under inference_mode(False))."""
    swapped = 0
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_inference():
                m._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                swapped += 1
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_inference():
                m._buffers[name] = b.clone()
                swapped += 1
    return swapped


class ComfyTrainer:
    def __init__(self, cfg: Config, model, clip, vae, examples: list[Example], run_dir: Path,
                 progress: Progress | None = None):
        self.cfg, self.t = cfg, cfg.train
        self.model, self.clip, self.vae = model, clip, vae
        self.examples = assign_buckets(examples, self.t.resolution)
        self.plan = BatchPlan(self.examples, self.t.batch_size, self.t.seed)
        self.run_dir = Path(run_dir)
        self.progress = progress or Progress()
        self.step = 0
        self.losses: list[float] = []
        self.vector: torch.nn.Parameter | None = None
        self.token_id: int | None = None
        self._checkpointed: list[tuple[torch.nn.Module, object]] = []
        self._cond_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    # ---- setup ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.latents = self._encode_latents()  # VAE first, so it does not evict the DiT/TE afterwards
        self.mp = self.model.clone()
        dm = self.mp.model.diffusion_model
        targets = self.t.lora_targets
        self.adapters: dict[str, torch.nn.Module] = {}
        torch.manual_seed(self.t.seed)
        for name, m in dm.named_modules():
            if any(name == t or name.endswith("." + t) for t in targets) and getattr(m, "weight", None) is not None:
                adapter = LoRAAdapter.create_train(m.weight, rank=self.t.rank, alpha=float(self.t.alpha))
                adapter.to(torch.float32)
                self.mp.add_weight_wrapper(f"diffusion_model.{name}.weight", adapter)
                self.adapters[name] = adapter
        if not self.adapters:
            raise ValueError(f"train.lora_targets {targets} match no module of this MODEL")
        self.lora_params = [p for a in self.adapters.values() for n, p in a.named_parameters() if n != "alpha"]
        self.param_names = [f"{name}.{n}" for name, a in self.adapters.items() for n, _ in a.named_parameters()
                            if n != "alpha"]

        _, _, width = qwen_te_parts(self.clip)
        if self.t.train_placeholder_token:
            base = self.clip.tokenizer._inner if isinstance(self.clip.tokenizer, ZeroPriorTokenizer) else self.clip.tokenizer
            tok = copy.deepcopy(base)
            sd_tok = getattr(tok, tok.clip)
            self.token_id = add_placeholder_token(sd_tok.tokenizer, self.t.placeholder_token)
            sd_tok.inv_vocab[self.token_id] = self.t.placeholder_token
            gen = torch.Generator().manual_seed(self.t.seed)
            self.vector = torch.nn.Parameter(init_vector(width, self.t.placeholder_init_std, gen))
            self.tokenizer = ZeroPriorTokenizer(tok, {self.token_id: self.vector}, {self.token_id: self.t.placeholder_token})
            if self.cfg.debug.log_prompt_ids:
                logger.info("placeholder token %r registered as id %d in ComfyUI's tokenizer", self.t.placeholder_token, self.token_id)
                logger.info("gradient mask active: only the %d-wide vector for id %d trains (weight decay 0)", width, self.token_id)
        else:
            self.tokenizer = self.clip.tokenizer
            if any(self.t.placeholder_token in ex.caption for ex in self.examples):
                check_single_id(getattr(self.tokenizer, self.tokenizer.clip).tokenizer, self.t.placeholder_token,
                                context="train_placeholder_token is off")

        groups = [{"params": self.lora_params, "lr": self.t.learning_rate, "weight_decay": self.t.weight_decay}]
        if self.vector is not None:
            groups.append({"params": [self.vector], "lr": self.t.token_learning_rate, "weight_decay": 0.0})
            self.param_names.append("placeholder_vector")
        self.optimizer = torch.optim.AdamW(groups)

        # Load DiT and text encoder once, fully, with room for backward activations; then call the modules
        # directly (CLIP.encode_from_tokens would reload the text encoder on every call).
        size = self.mp.model_size() + self.clip.patcher.model_size()
        mm.load_models_gpu([self.mp, self.clip.patcher], memory_required=int(size * 0.5), force_full_load=True)
        swapped = _ordinary_tensors(dm) + _ordinary_tensors(self.clip.cond_stage_model)
        logger.debug("swapped %d inference tensors for ordinary ones", swapped)
        self.device = mm.get_torch_device()
        self.dtype = self.mp.model.get_dtype()
        for a in self.adapters.values():
            a.to(self.device)
        if self.vector is not None:
            self.vector.data = self.vector.data.to(self.device)
        if self.cfg.model.gradient_checkpointing:
            self._enable_checkpointing(dm)

    def _enable_checkpointing(self, dm) -> None:
        for block in dm.transformer_blocks:
            original = block.forward

            def checkpointed(*args, _f=original, **kwargs):
                return torch.utils.checkpoint.checkpoint(_f, *args, use_reentrant=False, **kwargs)

            self._checkpointed.append((block, original))
            block.forward = checkpointed

    def restore(self) -> None:
        for block, original in self._checkpointed:
            block.forward = original
        self._checkpointed.clear()
        for a in self.adapters.values():
            a.requires_grad_(False)

    @torch.no_grad()
    def _encode_latents(self) -> dict[int, torch.Tensor]:
        out = {}
        for i, ex in enumerate(self.examples):
            px = load_pixels(ex.image, ex.bucket)  # (3, H, W) in [-1, 1]
            img = ((px + 1.0) / 2.0).clamp(0, 1).permute(1, 2, 0)[None]  # ComfyUI IMAGE: (1, H, W, 3) in [0, 1]
            lat = self.vae.encode(img)
            if lat.ndim == 4:
                lat = lat[:, :, None]
            out[i] = self.model.model.process_latent_in(lat.float()).cpu()
        return out

    # ---- one step ------------------------------------------------------------------------------------
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        conds, masks = [], []
        te = self.clip.cond_stage_model
        for caption in captions:
            if self.cfg.debug.log_prompt_ids and caption not in self._cond_cache:
                sd_tok = getattr(self.tokenizer, self.tokenizer.clip)
                logger.info("prompt %r -> ids %s", caption, encode_ids(sd_tok.tokenizer, caption))
            if self.vector is None and caption in self._cond_cache:
                cond, mask = self._cond_cache[caption]
            else:
                tokens = self.tokenizer.tokenize_with_weights(caption)
                cond, _, extra = te.encode_token_weights(tokens)
                mask = extra.get("attention_mask")
                if self.vector is None:
                    cond = cond.detach()
                    self._cond_cache[caption] = (cond, mask)
            conds.append(cond[0])
            masks.append(mask[0] if mask is not None else torch.ones(cond.shape[1], dtype=torch.long, device=cond.device))
        length = max(c.shape[0] for c in conds)
        cond = torch.stack([torch.cat([c, c.new_zeros(length - c.shape[0], c.shape[1])]) for c in conds])
        mask = torch.stack([torch.cat([m, m.new_zeros(length - m.shape[0])]) for m in masks])
        return cond.to(self.device, self.dtype), (None if bool(mask.all()) else mask.to(self.device))

    def loss_for(self, indices: list[int], gen: torch.Generator) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        x0 = torch.stack([self.latents[i][0] for i in indices]).to(self.device, torch.float32)
        bsz = x0.shape[0]
        noise = torch.randn(x0.shape, generator=gen).to(self.device)
        u = compute_density_for_timestep_sampling(self.t.weighting_scheme, bsz, logit_mean=0.0, logit_std=1.0,
                                                  mode_scale=1.29, generator=gen)
        sigma = ((u * 1000).long().clamp(0, 999) + 1).float() / 1000  # diffusers' unshifted training sigmas
        s = sigma.view(-1, 1, 1, 1, 1).to(self.device)
        xt = (1.0 - s) * x0 + s * noise
        cond, mask = self.encode([self.examples[i].caption for i in indices])
        dm = self.mp.model.diffusion_model
        pred = dm(xt.to(self.dtype), sigma.to(self.device, self.dtype), cond, attention_mask=mask)
        weighting = compute_loss_weighting_for_sd3(self.t.weighting_scheme, s)
        return (weighting.float() * (pred.float() - (noise - x0)) ** 2).reshape(bsz, -1).mean()

    def trainable(self) -> list[torch.nn.Parameter]:
        return self.lora_params + ([self.vector] if self.vector is not None else [])

    def train_step(self) -> float:
        gen = torch.Generator().manual_seed(self.t.seed * 7919 + self.step)
        loss = self.loss_for(self.plan.batch(self.step), gen)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable(), self.t.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        return value

    # ---- checkpoints, resume, export ------------------------------------------------------------------
    def _lora_state(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{n}": p for name, a in self.adapters.items() for n, p in a.named_parameters() if n != "alpha"}

    def save_checkpoint(self) -> Path:
        path = ckpt.save_checkpoint(
            self.run_dir / "checkpoints", self.step, lora=self._lora_state(),
            token=self.t.placeholder_token if self.vector is not None else None, vector=self.vector,
            optimizer=self.optimizer, param_names=self.param_names,
            state={"losses": self.losses, "config": self.cfg.to_dict(), "token_id": self.token_id,
                   "trainer": "comfyui"},
        )
        logger.info("checkpoint saved: %s", path)
        return path

    def resume(self, path: Path) -> Path:
        where = ckpt.find_checkpoint(path)
        state = ckpt.load_checkpoint(where)
        if state.get("trainer") != "comfyui":
            raise ckpt.CheckpointError(f"checkpoint {where} was not written by the ComfyUI training node")
        ckpt.check_compatible(state, where, self.t)
        own = self._lora_state()
        missing = sorted(set(own) - set(state["lora"]))
        if missing:
            raise ckpt.CheckpointError(f"checkpoint {where} lacks LoRA tensors {missing[:3]}")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state["lora"][k])
            if self.vector is not None:
                self.vector.copy_(state["token_tensors"][self.t.placeholder_token])
        ckpt.restore_optimizer(self.optimizer, self.param_names, state)
        self.step = int(state["step"])
        self.losses = list(state.get("losses", []))[: self.step]
        logger.info("resumed from %s at step %d", where, self.step)
        return where

    def export_lora(self) -> dict[str, torch.Tensor]:
        """Diffusers keys (the DiT's module names are the same in ComfyUI), alpha/rank folded into lora_B."""
        out = {}
        for name, a in self.adapters.items():
            scale = float(a.alpha) / a.rank
            out[f"transformer.{name}.lora_A.weight"] = a.lora_down.weight.detach().float().cpu().clone()
            out[f"transformer.{name}.lora_B.weight"] = a.lora_up.weight.detach().float().cpu().clone() * scale
        return out

    def export(self, archive_path: Path) -> Path:
        t = self.t
        meta = ArchiveMeta(
            base_model="Qwen/Qwen-Image",
            placeholder_token=t.placeholder_token if self.vector is not None else None,
            placeholder_token_id=self.token_id,
            rank=t.rank, created=ArchiveMeta.now(), alpha=float(t.alpha), lora_targets=list(t.lora_targets),
            placeholder_init_std=t.placeholder_init_std if self.vector is not None else None,
            steps=self.step, train_placeholder_token=self.vector is not None,
            extra={"trained_with": "ComfyUI", "resolution": t.resolution,
                   "final_loss": self.losses[-1] if self.losses else None},
        )
        return write_archive(archive_path, meta, self.export_lora(),
                             self.vector.detach().float().cpu() if self.vector is not None else None)

    # ---- the loop -------------------------------------------------------------------------------------
    def fit(self, archive_path: Path, resume: Path | None = None, preview_every: int = 0,
            render_preview: Callable[[], object] | None = None) -> ComfyTrainResult:
        t0 = time.time()
        saved: list[Path] = []
        with torch.inference_mode(False), torch.enable_grad():
            try:
                self.setup()
                if resume is not None:
                    self.resume(resume)
                total = self.t.steps
                if self.progress.on_step is not None:
                    self.progress.on_step(self.step, total, float("nan"))
                while self.step < total:
                    try:
                        mm.throw_exception_if_processing_interrupted()
                        loss = self.train_step()
                        if not math.isfinite(loss):
                            raise FloatingPointError(f"loss became {loss} at step {self.step}; lower the learning rates")
                        if self.progress.on_step is not None:
                            self.progress.on_step(self.step, total, loss)
                    except mm.InterruptProcessingException:
                        where = self.save_checkpoint() if self.step > 0 else None
                        logger.info("training interrupted at step %d; checkpoint %s", self.step, where)
                        raise
                    every = self.t.checkpoint_every
                    if every and self.step % every == 0 and self.step < total:
                        saved.append(self.save_checkpoint())
                    if preview_every and render_preview is not None and self.step % preview_every == 0:
                        with torch.no_grad():
                            img = render_preview()
                        if self.progress.on_preview is not None:
                            self.progress.on_preview(self.step, img)
                if self.t.checkpoint_every:
                    saved.append(self.save_checkpoint())
                archive = self.export(archive_path)
            finally:
                self.restore()
        plot = save_loss_plot(self.losses, archive_path.with_name(archive_path.stem + "_loss.png"))
        logger.info("trained %d steps in %.1f s -> %s", self.step, time.time() - t0, archive)
        return ComfyTrainResult(archive, self.mp, self.step, list(self.losses), self.token_id, plot, saved)


__all__ = ["ComfyTrainer", "ComfyTrainResult", "Progress"]
