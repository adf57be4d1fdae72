"""The training loop's backend for a diffusers ``QwenImage21Pipeline`` (Qwen-Image 2.1: CLI, Cog, demo).

Everything but the model's own numbers is :class:`~qwen_zero_prior.training.diffusers_backend.DiffusersBackend`'s
(LoRA through peft, the tokens' one-vector-per-token embedding, fp8 matmuls, offload, regional compile, samples), read
through the family (``families.py``: 2.1's LoRA targets, tokenizer, fp8 layers, bucket step 32). What differs:

- latents: ``flow21.encode_latents`` (RGBA, 16x, 64 channels, unpatched), ``(64, 1, h, w)`` as the loop expects;
- conditioning: :class:`~qwen_zero_prior.training.prompt21.PromptEncoder21` (``QwenImage21Pipeline.encode_prompt``'s
  numbers: system turn cached once, the per-step suffix with the token's gradient, CUDA graphs on a GPU);
- prediction: ``flow21.forward_t2i``, the transformer call of the pipeline (one block-causal sequence of text and
  image slots, ``timestep = sigma``) with the layout's RoPE table and masks cached (no host round-trip a step).

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

    def __init__(self, cfg, pipe):
        super().__init__(cfg, pipe)
        self.layouts = flow21.LayoutCache()

    @torch.no_grad()
    def latent(self, example: Example) -> torch.Tensor:
        px = load_pixels(example.image, example.bucket)[None]
        return flow21.encode_latents(self.pipe.vae, px)[0].cpu()

    def _set_attention_backend(self, backend: str) -> None:
        # diffusers' 2.1 processor sends no prefill call to the backend; ours sends it the image's (attention21.py)
        from . import attention21

        attention21.install(self.pipe.transformer, backend)

    def _compile_rewrites(self) -> None:
        # q/k/v and gate/proj: their LoRA A products as one matmul each (lora_shared.py; peft's numbers)
        from . import attention21, lora_shared

        if not self.cfg.model.attention_backend:  # else _set_attention_backend installed it, with the backend
            attention21.install(self.pipe.transformer, None)
        lora_shared.install_swiglu(self.pipe.transformer)

    def _make_prompts(self) -> None:
        m = self.cfg.model
        self.prompts = PromptEncoder21(self.pipe, [tok.token_id for tok in self.tokens] or None,
                                       prefix_cache=m.text_prefix_cache,
                                       cuda_graphs=m.text_cuda_graphs and not m.offload,
                                       compile=self._compile_text_suffix())

    def predict(self, noisy, sigmas, embeds, mask):
        # the loop hands the mask over as None (nothing padded) or already on the device, as flow21.forward wants
        with self._autocast():
            return flow21.forward_t2i(self.pipe.transformer, noisy, sigmas.to(embeds.dtype), embeds, mask,
                                      self.layouts)


__all__ = ["Diffusers21Backend"]
