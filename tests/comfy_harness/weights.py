"""Tiny Qwen-Image weights in ComfyUI's file layouts, and archives made with the core."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen_zero_prior.training.archive import ArchiveMeta, write_archive
from qwen_zero_prior.training.lora import add_lora, export_lora

from .server import HERE, comfyui_path

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def comfy_text_encoder_sd(text_encoder, mode: str = "fp32") -> dict[str, torch.Tensor]:
    """transformers Qwen2_5_VLForConditionalGeneration -> ComfyUI's qwen25_7b layout (language model only).

    mode: "fp32", "bf16", "fp16", or "fp8_scaled" (Linear weights float8_e4m3fn with per-layer scale_weight and the
    ``scaled_fp8`` marker, the rest bf16 — the layout of ComfyUI's qwen_2.5_vl_7b_fp8_scaled.safetensors).
    """
    out = {}
    for k, v in text_encoder.state_dict().items():
        if not k.startswith("model.language_model."):
            continue
        key = "model." + k[len("model.language_model."):]
        v = v.detach().clone().float()
        if mode == "fp32":
            out[key] = v
        elif mode in ("bf16", "fp16"):
            out[key] = v.to(torch.bfloat16 if mode == "bf16" else torch.float16)
        elif mode == "fp8_scaled":
            is_linear = key.endswith(".weight") and v.ndim == 2 and ".layers." in key
            if is_linear:
                scale = v.abs().max() / 448.0
                out[key] = (v / scale).to(torch.float8_e4m3fn)
                out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
            else:
                out[key] = v.to(torch.bfloat16)
        else:
            raise ValueError(mode)
    if mode == "fp8_scaled":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return {k: v.contiguous() for k, v in out.items()}


def write_qwen3vl_text_encoder(path: Path, text_encoder) -> Path:
    """A transformers ``Qwen3VLForConditionalGeneration`` as one safetensors file in the layout it saves (and
    ComfyUI's Qwen3-VL files use): ``model.language_model.*``, ``model.visual.*``, ``lm_head.weight``, float32."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().float().contiguous() for k, v in text_encoder.state_dict().items()}, path)
    return path


def write_models(models: Path, pipe, root: Path | None = None) -> dict[str, str]:
    for d in ("diffusion_models", "text_encoders", "vae", "zero_prior", "loras"):
        (models / d).mkdir(parents=True, exist_ok=True)
    names = {"unet": "tiny_qwen_image.safetensors", "unet_fp8": "tiny_qwen_image_fp8_e4m3fn.safetensors",
             "clip": "tiny_qwen25vl.safetensors",
             "clip_bf16": "tiny_qwen25vl_bf16.safetensors", "clip_fp16": "tiny_qwen25vl_fp16.safetensors", "clip_fp8": "tiny_qwen25vl_fp8.safetensors",
             "vae": "tiny_qwen_vae.safetensors"}
    dit = {k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}
    save_file(dit, models / "diffusion_models" / names["unet"])
    # as ComfyUI's qwen_image_fp8_e4m3fn file: the blocks' Linear weights stored in float8_e4m3fn
    save_file({k: (v.to(torch.float8_e4m3fn) if k.startswith("transformer_blocks.") and k.endswith(".weight")
                   and v.ndim == 2 else v) for k, v in dit.items()},
              models / "diffusion_models" / names["unet_fp8"])
    for key, mode in (("clip", "fp32"), ("clip_bf16", "bf16"), ("clip_fp16", "fp16"), ("clip_fp8", "fp8_scaled")):
        save_file(comfy_text_encoder_sd(pipe.text_encoder, mode), models / "text_encoders" / names[key])
    subprocess.run([sys.executable, str(HERE / "make_tiny_vae.py"), str(models / "vae" / names["vae"])],
                   cwd=root or comfyui_path(), check=True, capture_output=True)
    return names


def random_lora(pipe, seed: int = 0, rank: int = 4, alpha: float = 8.0) -> dict[str, torch.Tensor]:
    tr = copy.deepcopy(pipe.transformer)
    add_lora(tr, rank, alpha, TARGETS, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return export_lora(tr, rank, alpha)


def make_archive(path: Path, pipe=None, *, vector: torch.Tensor | None = None, lora: dict | None = None,
                 token: str = "<zwx>", family: str = "qwen-image", vectors: dict | None = None) -> Path:
    """An archive written by the core: one token (``token``, ``vector``) or several (``vectors``: token -> vector,
    ids at training time 151665, 151666, ... or from 151669 for Qwen-Image 2.1)."""
    first_id = 151669 if family == "qwen-image-2.1" else 151665
    if vector is not None:
        vectors = {token: vector}
    meta = ArchiveMeta(base_model="tiny", placeholder_token=next(iter(vectors)) if vectors else None,
                       placeholder_token_id=first_id if vectors else None,
                       placeholder_token_ids=list(range(first_id, first_id + len(vectors))) if vectors else None,
                       rank=4 if lora else None, created=ArchiveMeta.now(), alpha=8.0, lora_targets=TARGETS, steps=1,
                       model_family=family)
    return write_archive(path, meta, lora, vectors=vectors)
