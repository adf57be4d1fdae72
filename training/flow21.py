"""Qwen-Image 2.1's flow-matching objective on the diffusers transformer, as diffusers'
``examples/dreambooth/train_dreambooth_lora_qwenimage21.py`` computes it, as plain functions a training loop
calls (no state besides the models it is handed).

- Latents: the VAE takes RGBA images in [-1, 1] (four channels; an opaque image's alpha is 1) with a frame
  axis, compresses 16x, and is normalised ``(z - latents_mean) / latents_std`` (the script multiplies by
  ``1 / std``; the pipeline's ``_encode_vae_image`` divides: the same). Latent sides must be even: the text
  encoder's image slots each stand for a 2x2 group of latents (image sides multiples of 32).
- Noise: ``x_t = (1 - sigma) x0 + sigma noise``, target ``noise - x0``; ``sigma`` and ``t`` drawn as the
  script draws them (``compute_density_for_timestep_sampling`` on the scheduler's unshifted training grid),
  the transformer reads ``t / 1000``; loss weighting ``compute_loss_weighting_for_sd3``.
- Layout: latents unpatched, flattened to ``(B, h*w, C)``; one sequence of [text tokens (right-padded, the pad
  keys masked out), target-image slots], ``img_mask`` True on the ``h*w/4`` slots, ``img_shapes [(1, h, w)]``.
  The transformer itself makes attention block-causal (text causal, the image block bidirectional and seeing
  all text) and modulates text tokens at t = 0 (``causal_condition``); its output's last ``h*w`` tokens are
  the prediction.

Deliberate difference: :func:`encode_latents` takes the posterior mode by default (the script samples it), so
cached latents are deterministic, as this project does for Qwen-Image; ``sample=True`` draws like the script.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .families import get_family, QWEN_IMAGE_21


class LatentShapeError(ValueError):
    """Latents or images whose size the 2.1 transformer cannot take."""


def _stats(vae, device, dtype):
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, cfg.z_dim, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, cfg.z_dim, 1, 1, 1)
    return mean.to(device, dtype), std.to(device, dtype)


def to_rgba(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3|4, H, W) in [-1, 1] -> RGBA: an opaque alpha channel (1.0) added to RGB."""
    if pixels.ndim != 4 or pixels.shape[1] not in (3, 4):
        raise LatentShapeError(f"expected images (batch, 3 or 4 channels, height, width), got {tuple(pixels.shape)}")
    if pixels.shape[1] == 3:
        pixels = torch.cat([pixels, pixels.new_ones(pixels.shape[0], 1, *pixels.shape[2:])], dim=1)
    return pixels


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, *, sample: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Normalised latents (B, z_dim, 1, H/16, W/16), float32, of images (B, 3|4, H, W) in [-1, 1]."""
    step = get_family(QWEN_IMAGE_21).bucket_step
    h, w = pixels.shape[-2:]
    if h % step or w % step:
        raise LatentShapeError(f"Qwen-Image 2.1 needs image sides that are multiples of {step}, got {w}x{h}")
    px = to_rgba(pixels).to(device=vae.device, dtype=vae.dtype)[:, :, None]
    dist = vae.encode(px).latent_dist
    z = dist.sample(generator) if sample else dist.mode()
    mean, std = _stats(vae, z.device, torch.float32)
    return (z.float() - mean) / std


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 4, H, W) in [-1, 1] from normalised latents (the pipeline's decode)."""
    mean, std = _stats(vae, latents.device, torch.float32)
    z = (latents.float() * std + mean).to(vae.dtype)
    return vae.decode(z, return_dict=False)[0][:, :, 0]


def sample_timesteps(scheduler, batch: int, weighting_scheme: str = "none",
                     generators: list[torch.Generator] | torch.Generator | None = None, *,
                     logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29):
    """(timesteps (B,), sigmas (B, 1, 1, 1, 1)) on the CPU, drawn as diffusers' 2.1 script draws them.

    ``scheduler`` is a ``FlowMatchEulerDiscreteScheduler`` fresh from the pipeline's config (its training grid
    of ``num_train_timesteps`` steps, unshifted with dynamic shifting). One generator per sample makes a
    sample's draw independent of its batch slot."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    gens = generators if isinstance(generators, (list, tuple)) else [generators] * batch
    if len(gens) != batch:
        raise ValueError(f"{len(gens)} generators for a batch of {batch}")
    u = torch.cat([compute_density_for_timestep_sampling(weighting_scheme, 1, logit_mean=logit_mean,
                                                         logit_std=logit_std, mode_scale=mode_scale, generator=g)
                   for g in gens])
    idx = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1)
    return scheduler.timesteps[idx], scheduler.sigmas[idx].to(torch.float32).view(-1, 1, 1, 1, 1)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, h, w) -> (B, h*w, C): 2.1 consumes latents unpatched (``QwenImage21Pipeline._pack_latents``)."""
    b, c, f, h, w = latents.shape
    if f != 1:
        raise LatentShapeError(f"expected one latent frame, got {f}")
    if h % 2 or w % 2:
        raise LatentShapeError(
            f"latent grid {h}x{w} has an odd side; Qwen-Image 2.1 groups latents 2x2 (image sides multiples of 32)"
        )
    return latents.reshape(b, c, h * w).transpose(1, 2)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, 1, h, w)."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, 1, h, w)


def image_slot_mask(text_len: int, h: int, w: int, batch: int, device=None) -> torch.Tensor:
    """``img_mask`` for text-to-image: False over the (padded) text, True on the h*w/4 target-image slots."""
    return torch.cat([torch.zeros(batch, text_len, dtype=torch.bool, device=device),
                      torch.ones(batch, (h * w) // 4, dtype=torch.bool, device=device)], dim=1)


def predict(transformer, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
            mask: torch.Tensor | None, attention_kwargs: dict | None = None) -> torch.Tensor:
    """The transformer's velocity for noisy latents (B, C, 1, h, w) at ``timesteps`` (0..1000), same shape."""
    if mask is not None:
        # as encode_prompt: no mask when nothing is padded (tested where the mask is: on the host, no device sync)
        mask = None if bool(mask.all()) else mask.to(embeds.device, non_blocking=True)
    timestep = (timesteps.to(embeds.device) / 1000).to(embeds.dtype)
    return forward(transformer, noisy, timestep, embeds, mask, attention_kwargs)


def forward(transformer, noisy: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
            mask: torch.Tensor | None, attention_kwargs: dict | None = None) -> torch.Tensor:
    """The transformer call of :func:`predict` with the timestep already as the transformer reads it (``t / 1000``
    = sigma, in ``embeds``' dtype) and ``mask`` already None (nothing padded) or on ``embeds``' device: what a
    training loop that has resolved both on the host calls (``diffusers21_backend``)."""
    b, _, _, h, w = noisy.shape
    tokens = pack(noisy)
    out = transformer(
        hidden_states=tokens.to(embeds.dtype),
        encoder_hidden_states=embeds,
        encoder_hidden_states_mask=mask,
        timestep=timestep,
        img_shapes=[[(1, h, w)]] * b,
        img_mask=image_slot_mask(embeds.shape[1], h, w, b, embeds.device),
        attention_kwargs=attention_kwargs,
        return_dict=False,
    )[0]
    return unpack(out[:, -h * w:], h, w)


class LayoutCache:
    """What the 2.1 transformer derives from the sequence layout alone, kept per (text length, h, w, device) for
    :func:`forward_t2i`: the RoPE table, the target-token mask and the attention's prefix segments.

    diffusers' ``QwenImage21Transformer2DModel.forward`` rebuilds them on every call, from host lists of every
    position and with device round-trips (``tolist()``, a tensor-valued ``repeat_interleave``, ``nonzero``,
    ``int(sum)``), each of which drains the GPU's queue while Python catches up: in a training step that is GPU
    time lost. Computed here once by the model's own functions, they are the same tensors. Least recently used
    entries go first beyond ``size`` (a caption length and bucket per entry; the RoPE table is ~2 MB at 1024²: 64
    entries, as many layouts as a dataset of varied captions and a few buckets has, hold ~130 MB at most)."""

    def __init__(self, size: int = 64):
        self.size = size
        self._entries: OrderedDict = OrderedDict()
        self.misses = 0

    def get(self, transformer, text_len: int, h: int, w: int, device: torch.device) -> tuple:
        from diffusers.models.transformers.transformer_qwenimage21 import _qwenimage21_prefix_segments

        key = (text_len, h, w, str(device))
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        self.misses += 1
        image_pad_mask = torch.cat([torch.zeros(text_len, dtype=torch.bool, device=device),
                                    torch.ones(h * w, dtype=torch.bool, device=device)])
        rotary_emb = transformer.pos_embed([(1, h, w)], image_pad_mask, device=device)
        image_ids, target_token_mask = transformer.build_token_metadata(image_pad_mask, [(1, h, w)])
        entry = (rotary_emb, target_token_mask, _qwenimage21_prefix_segments(image_ids, text_len))
        self._entries[key] = entry
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return entry


def _plain_segments_path(transformer) -> bool:
    """Whether :func:`forward_t2i` reproduces ``transformer``'s forward: the diffusers functions it builds on exist
    (0.42's), every block on a segment-prefill processor (not diffusers' flex one, whose block mask depends on the
    padding), and nothing around the model's own forward (accelerate or diffusers hooks, torch hooks, a whole-model
    compile)."""
    from diffusers.models.transformers import transformer_qwenimage21 as q21

    if not (hasattr(q21, "_qwenimage21_prefix_segments") and hasattr(transformer, "build_token_metadata")):
        return False
    if getattr(transformer, "_hf_hook", None) is not None or getattr(transformer, "_diffusers_hook", None) is not None:
        return False
    if transformer._forward_hooks or transformer._forward_pre_hooks or transformer._compiled_call_impl is not None:
        return False
    flex = q21.QwenImage21FlexAttnProcessor
    return not any(isinstance(b.attn.processor, flex) for b in transformer.transformer_blocks)


def forward_t2i(transformer, noisy: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                mask: torch.Tensor | None, cache: LayoutCache) -> torch.Tensor:
    """:func:`forward` for the text-to-image layout training uses ([text, target image], no KV cache), with the
    layout's tensors from ``cache``: no host round-trip in the step. It is diffusers' forward written out for that
    layout (``QwenImage21Transformer2DModel.forward``, diffusers 0.42): the joint sequence is ``[txt_in(text),
    img_in(image)]`` (what the forward's slot expansion and masked assignment build for it), and the modules are
    the transformer's own, called in the same order with the same arguments, so the numbers are the same (the tests
    compare outputs and gradients exactly). Anything else (flex attention, hooks) goes through :func:`forward`."""
    if not _plain_segments_path(transformer):
        return forward(transformer, noisy, timestep, embeds, mask)
    b, _, _, h, w = noisy.shape
    text_len = embeds.shape[1]
    rotary_emb, target_token_mask, segments = cache.get(transformer, text_len, h, w, embeds.device)
    hidden = transformer.img_in(pack(noisy).to(embeds.dtype))
    text = transformer.txt_in(embeds)
    joint = torch.cat([text, hidden.to(text.dtype)], dim=1)
    timestep = timestep.to(hidden.dtype)
    modulation_mask = None
    if transformer.config.causal_condition:
        timestep = torch.cat([timestep, timestep.new_zeros(1)], dim=0)
        modulation_mask = target_token_mask
    temb = transformer.time_text_embed(timestep, hidden)
    modulation = transformer.modulation(temb)
    key_valid = None
    if mask is not None:
        key_valid = torch.ones(b, joint.shape[1], dtype=torch.bool, device=joint.device)
        key_valid[:, :text_len] = mask.bool()
    for block in transformer.transformer_blocks:
        if torch.is_grad_enabled() and transformer.gradient_checkpointing:
            joint = transformer._gradient_checkpointing_func(block, joint, modulation, rotary_emb, None,
                                                             modulation_mask, None, None, None, segments, key_valid)
        else:
            joint = block(hidden_states=joint, modulation=modulation, rotary_emb=rotary_emb, attention_mask=None,
                          target_token_mask=modulation_mask, segments=segments, key_valid=key_valid)
    joint = transformer.norm_out(joint, temb, modulation_mask)
    out = transformer.proj_out(joint)
    return unpack(out[:, -h * w:], h, w)


def flow_matching_loss(transformer, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                       sigmas: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor | None,
                       weighting_scheme: str = "none", attention_kwargs: dict | None = None) -> torch.Tensor:
    """Mean weighted flow-matching loss of one batch (a scalar, float32).

    ``x0``/``noise``: (B, C, 1, h, w) normalised latents and Gaussian noise; ``timesteps`` (B,) and ``sigmas``
    (B, 1, 1, 1, 1) from :func:`sample_timesteps`; ``embeds``/``mask`` from ``PromptEncoder21.encode``
    (right-padded; the mask may be None when nothing is padded)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    if x0.shape != noise.shape:
        raise LatentShapeError(f"latents {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    sigmas = sigmas.to(device=x0.device, dtype=torch.float32).view(-1, 1, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0.float() + sigmas * noise.float()
    pred = predict(transformer, noisy, timesteps, embeds, mask, attention_kwargs)
    target = noise.float() - x0.float()
    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas)
    per_sample = (weighting.float() * (pred.float() - target) ** 2).reshape(x0.shape[0], -1).mean(dim=1)
    return per_sample.mean()
