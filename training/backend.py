"""What the one training loop (``trainer.Trainer``) needs of a model implementation.

The loop owns everything that is the same whatever runs the models: batches and buckets, noise and timestep
sampling, the flow-matching loss, the optimizer and its groups (the token's row at weight decay 0), gradient
clipping, data-parallel averaging, checkpoints and resume, interruption, samples and the archive. A backend owns
the models:

- :class:`~qwen_zero_prior.training.diffusers_backend.DiffusersBackend`: a diffusers ``QwenImagePipeline`` (the CLI,
  Cog, the demo), with the core's speed work (text-encoder prefix cache and CUDA-graph suffix, fp8 matmuls,
  offload, regional compile);
- :class:`~qwen_zero_prior.training.diffusers21_backend.Diffusers21Backend`: the same for a
  ``QwenImage21Pipeline`` (Qwen-Image 2.1);
- ``nodes.comfy_backend.ComfyBackend``: the MODEL, CLIP and VAE a ComfyUI graph loaded (the training node); on a
  GPU its DiT trains through diffusers' transformer over ComfyUI's tensors (``shared_dit.py``) and the diffusers
  backends' ``accelerate_transformer``.

Shapes and conventions every backend follows:

- latents are ``(C, 1, h, w)`` float32, normalised as the model consumes them (Qwen-Image: ``(z - mean) / std``,
  16 channels, patchified 2x2 by the backend; Qwen-Image 2.1: 64 channels, unpatched);
- ``sigmas`` are flow-matching noise levels in (0, 1]: ``x_t = (1 - sigma) x_0 + sigma * noise`` and the model
  predicts ``noise - x_0``;
- conditioning is ``(batch, seq, dim)`` on the backend's device with a host ``(batch, seq)`` long mask (the loop
  tests the mask on the host: a device read would stall the GPU mid-step).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import Config, TrainConfig
    from .data import Example
    from .token import RegisteredToken


class TrainBackend(ABC):
    """A model implementation the training loop drives. See the module docstring for the conventions."""

    #: recorded in checkpoints; a checkpoint resumes only on the backend that wrote it
    name: str = ""
    device: torch.device
    #: the transformer's compute dtype (noisy latents are handed to :meth:`predict` in it)
    dtype: torch.dtype
    #: ``families`` name of the model trained (recorded in the archive's meta.json)
    model_family: str = "qwen-image"
    #: image sides must be multiples of this (the family's ``bucket_step``)
    bucket_step: int = 16

    def __init__(self, cfg: Config):
        self.cfg = cfg

    # ---- setup ----------------------------------------------------------------------------------------
    @abstractmethod
    def latent(self, example: Example) -> torch.Tensor:
        """The normalised ``(C, 1, h, w)`` float32 latent of ``example`` (at its bucket size), on the CPU."""

    def before_training(self) -> None:
        """Called once after the latents are cached and before :meth:`prepare` (e.g. to free the VAE)."""

    @abstractmethod
    def prepare(self, t: TrainConfig) -> None:
        """Freeze the models, attach a trainable LoRA (seeded with ``t.seed``) and place them for training."""

    @abstractmethod
    def named_lora_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The LoRA's trainable tensors with stable names (``<module>.lora_A.weight`` / ``lora_B.weight``)."""

    @abstractmethod
    def export_lora(self) -> dict[str, torch.Tensor]:
        """The LoRA in diffusers keys (``transformer.<module>.lora_A/B.weight``), alpha/rank folded into B,
        float32 on the CPU."""

    @abstractmethod
    def add_tokens(self, tokens: list[str], init_std: float, generator: torch.Generator) -> list[RegisteredToken]:
        """Register ``tokens`` (in order) as fresh tokens, each embedded as its own trainable float32 vector drawn
        from N(0, init_std) in list order from ``generator`` (the first gets what a one-token run gets); the
        conditioning of :meth:`encode` then carries every vector's gradient."""

    def add_token(self, token: str, init_std: float, generator: torch.Generator) -> RegisteredToken:
        """:meth:`add_tokens` of one token."""
        return self.add_tokens([token], init_std, generator)[0]

    @abstractmethod
    def check_trigger(self, token: str) -> None:
        """Plain LoRA training: warn if ``token`` (written in captions) splits into several ids."""

    def training_sigmas(self) -> torch.Tensor:
        """The discrete flow-matching noise levels training samples from (diffusers' unshifted training table,
        as ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1)`` holds it), highest first."""
        n = 1000
        return torch.arange(n, 0, -1, dtype=torch.float32) / n

    # ---- every step -----------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditioning ``(batch, seq, dim)`` on the device in the compute dtype, differentiable w.r.t. the token
        vectors, and the host ``(batch, seq)`` long mask (zero-padded to the longest caption)."""

    @abstractmethod
    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, embeds: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """The model's flow prediction for ``noisy`` ``(B, C, 1, h, w)`` at noise levels ``sigmas`` ``(B,)``."""

    def step_begin(self) -> None:
        """Called at the start of each optimizer step."""

    def prompt_ids(self, caption: str) -> list[int]:
        """Token ids of ``caption`` (for ``debug.log_prompt_ids``)."""
        return []

    # ---- the rest -------------------------------------------------------------------------------------
    def sample(self, prompts: list[str], step: int) -> list:
        """PIL images of ``prompts`` with the current LoRA and token (``sample:`` settings); [] if unsupported."""
        return []

    def base_model(self) -> str:
        return self.cfg.model.base_model

    def lora_targets(self) -> list[str]:
        """The LoRA's target module names as trained (recorded in meta.json)."""
        return list(self.cfg.train.lora_targets)

    def archive_extra(self) -> dict:
        """Extra ``meta.json`` fields this backend records."""
        return {}

    def close(self) -> None:
        """Undo what :meth:`prepare` patched on shared objects (called in ``finally``)."""


__all__ = ["TrainBackend"]
