"""Loading Qwen-Image or Qwen-Image 2.1 (diffusers layout) from a local folder or a hub id, with optional fp8
weight storage. The family is ``model.family`` or, with ``auto``, what the folder's model_index.json names."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import ModelConfig

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The base model could not be found or loaded."""


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def apply_fp8_storage(module: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Keep Linear/Conv weights in float8_e4m3fn and upcast per layer in forward (diffusers' layerwise casting).

    Norms, embeddings and LoRA layers are left in ``compute_dtype`` (diffusers' default skip patterns plus
    ``lora_``), so training the LoRA (and the placeholder row, which lives outside the table) still works.
    """
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    apply_layerwise_casting(
        module,
        storage_dtype=torch.float8_e4m3fn,
        compute_dtype=compute_dtype,
        skip_modules_pattern=tuple(DEFAULT_SKIP_MODULES_PATTERN) + ("lora_", "embed_tokens", "lm_head"),
    )


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    # diffusers 0.42 renamed from_pretrained's torch_dtype to dtype (the old name warns); older ones need it.
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__) >= Version("0.42.0") else "torch_dtype": dtype}


def load_pipeline(cfg: ModelConfig, device: torch.device | None = None):
    """The family's pipeline (``QwenImagePipeline`` / ``QwenImage21Pipeline``) for ``cfg.base_model`` on
    ``device`` in ``cfg.dtype`` (+ fp8 storage if asked)."""
    from .families import FamilyError, resolve_family

    base = cfg.base_model
    path = Path(base).expanduser()
    looks_local = path.exists() or base.startswith((".", "/", "~")) or base.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise ModelLoadError(f"model.base_model {base!r}: no such folder")
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"model.base_model {base!r} is not a diffusers Qwen-Image folder (no model_index.json); "
                "point it at a folder saved by QwenImagePipeline or QwenImage21Pipeline.save_pretrained, or a hub "
                "id such as Qwen/Qwen-Image"
            )
        base = str(path)
    try:
        family = resolve_family(cfg.family, base, is_local=looks_local)
    except FamilyError as e:
        raise ModelLoadError(str(e)) from e
    dtype = torch_dtype(cfg.dtype)
    try:
        pipe = family.pipeline_cls().from_pretrained(base, **_dtype_kwarg(dtype))
    except OSError as e:
        raise ModelLoadError(
            f"model.base_model {base!r} could not be loaded ({e}). Use a local diffusers-layout folder, or a hub id "
            "on a machine with internet access."
        ) from e
    device = device or resolve_device(cfg.device)
    if cfg.offload:  # the trainer converts and places the transformer and text encoder (training/offload.py)
        pipe.vae.to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    if cfg.quantize:
        apply_fp8_storage(pipe.transformer, dtype)
    if cfg.quantize_te:
        apply_fp8_storage(pipe.text_encoder, dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
