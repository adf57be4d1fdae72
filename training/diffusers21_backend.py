"""The training loop's backend for a diffusers ``QwenImage21Pipeline`` (Qwen-Image 2.1: CLI, Cog, demo).

Everything but the model's own numbers is :class:`~qwen_zero_prior.training.diffusers_backend.DiffusersBackend`'s
(LoRA through peft, the tokens' one-vector-per-token embedding, fp8 matmuls, offload, regional compile, samples), read
through the family (``families.py``: 2.1's LoRA targets, tokenizer, fp8 layers, bucket step 32). What differs:

- latents: ``flow21.encode_latents`` (RGBA, 16x, 64 channels, unpatched), ``(64, 1, h, w)`` as the loop expects;
- conditioning: :class:`~qwen_zero_prior.training.prompt21.PromptEncoder21` (``QwenImage21Pipeline.encode_prompt``'s
  numbers: system turn cached once, the per-step suffix with the token's gradient, CUDA graphs on a GPU);
- prediction: ``flow21.forward``, the transformer call of the pipeline (one block-causal sequence of text and
  image slots, ``timestep = sigma``).

The noise levels are the scheduler's unshifted training grid, as diffusers' 2.1 script samples them: the
loop's ``sigmas[(u * 1000).long()]`` equals the script's ``timesteps[(u * 1000).long()] / 1000``.
"""

from __future__ import annotations

import torch

from . import flow21
from .data import Example, load_pixels
from .diffusers_backend import DiffusersBackend
from .prompt21 import PromptEncoder21


class Diffusers21Backend(DiffusersBackend):
    name = "diffusers-qwen-image-2.1"
    # the 7B transformer and the 8B text encoder both fit a 24 GB card with their Linears in fp8: nothing
    # streamed (memory.text_encoder_storage decides bf16 / fp8 / streamed by the budget)
    offload_text_encoder = "auto"

    @torch.no_grad()
    def latent(self, example: Example) -> torch.Tensor:
        px = load_pixels(example.image, example.bucket)[None]
        return flow21.encode_latents(self.pipe.vae, px)[0].cpu()

    def _make_prompts(self) -> None:
        m = self.cfg.model
        self.prompts = PromptEncoder21(self.pipe, [tok.token_id for tok in self.tokens] or None,
                                       prefix_cache=m.text_prefix_cache,
                                       cuda_graphs=m.text_cuda_graphs and not m.offload, compile=m.compile)

    def predict(self, noisy, sigmas, embeds, mask):
        # the loop hands the mask over as None (nothing padded) or already on the device, as flow21.forward wants
        with self._autocast():
            return flow21.forward(self.pipe.transformer, noisy, sigmas.to(embeds.dtype), embeds, mask)


__all__ = ["Diffusers21Backend"]
