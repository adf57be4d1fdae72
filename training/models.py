"""Loading Qwen-Image or Qwen-Image 2.1 (diffusers layout) from a local folder or a hub id, with optional fp8
weight storage. The family is ``model.family`` or, with ``auto``, what the folder's model_index.json names."""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import torch

from .config import ModelConfig
from .text_parts import left_behind

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


def warn_if_slow_on_cpu(dtype_name: str, device: torch.device) -> None:
    """bf16/fp16 matmuls on a CPU run far slower than float32: say so (once per process and dtype)."""
    if device.type == "cpu" and dtype_name in ("bfloat16", "float16"):
        _warn_slow_on_cpu(dtype_name)


@functools.cache
def _warn_slow_on_cpu(dtype_name: str) -> None:
    logger.warning("running in %s on the CPU, where it is much slower than float32: set model.dtype: float32 "
                   "(predict: --dtype float32)", dtype_name)


def _strip_stacktrace_hint(msg: str) -> str:
    # huggingface_hub/diffusers point at "the stacktrace above", which the CLI does not print
    return re.sub(r"\s*Please check out the root cause in the stacktrace above\.?", "", msg).strip()


def _hub_network_errors() -> tuple[type[BaseException], ...]:
    """What ``model_info`` raises when the Hub cannot be reached (diffusers catches the same set)."""
    import huggingface_hub.utils as hub_utils
    from huggingface_hub.utils import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, OSError]
    httpx = getattr(hub_utils, "httpx", None)  # huggingface_hub >= 1.0 talks httpx, older ones requests
    if httpx is not None:
        errors.append(httpx.TransportError)
    try:
        import requests

        errors.append(requests.ConnectionError)
    except ImportError:
        pass
    return tuple(errors)


def check_hub_model(repo: str) -> None:
    """Fail with one clear message when a hub id is neither cached nor reachable (before diffusers tries).

    diffusers would log "Couldn't connect to the Hub", retry from the cache and then raise an error that
    points at a stack trace; this says what happened and what to do instead.
    """
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo, "model_index.json"), str):
        return  # in the local cache: diffusers loads it from there when offline
    fix = (f"download it once on a machine with internet access (`hf download {repo}`, cache in "
           f"{constants.HF_HUB_CACHE}), or set model.base_model to a local diffusers-layout Qwen-Image folder")

    def unreachable(why: str) -> ModelLoadError:
        return ModelLoadError(f"model.base_model {repo!r} could not be reached on the Hugging Face Hub ({why}); it is "
                              f"not in the local cache, and {Path.cwd()} has no folder of that name. To fix: {fix}")

    if constants.HF_HUB_OFFLINE:
        raise unreachable("HF_HUB_OFFLINE is set")
    try:
        model_info(repo)
    except GatedRepoError as e:
        raise ModelLoadError(f"model.base_model {repo!r} is gated on the Hugging Face Hub: accept its terms on "
                             f"huggingface.co and log in (`hf auth login`), or {fix}") from e
    except RepositoryNotFoundError as e:
        raise ModelLoadError(f"model.base_model {repo!r} was not found on the Hugging Face Hub (check the id; "
                             f"private models need `hf auth login`), and it is not in the local cache") from e
    except HfHubHTTPError as e:
        raise ModelLoadError(f"model.base_model {repo!r}: the Hugging Face Hub answered "
                             f"{_strip_stacktrace_hint(str(e)).splitlines()[0]}; {fix}") from e
    except _hub_network_errors() as e:
        raise unreachable(f"{type(e).__name__}: {str(e).splitlines()[0]}") from e


def load_pipeline(cfg: ModelConfig, device: torch.device | None = None, progress: bool = False,
                  place: bool = True):
    """The family's pipeline (``QwenImagePipeline`` / ``QwenImage21Pipeline``) for ``cfg.base_model`` on
    ``device`` in ``cfg.dtype`` (+ fp8 storage if asked).

    ``progress`` keeps the pipeline's denoising progress bar on (the CLI's predict); the trainer's samples and the
    Cog predictor run without one. ``place=False`` leaves it on the CPU (the trainer first chooses a memory plan,
    then :func:`place_pipeline`).
    """
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
    else:
        check_hub_model(base)
    try:
        family = resolve_family(cfg.family, base, is_local=looks_local)
    except FamilyError as e:
        raise ModelLoadError(str(e)) from e
    dtype = torch_dtype(cfg.dtype)
    device = device or resolve_device(cfg.device)
    warn_if_slow_on_cpu(cfg.dtype, device)
    try:
        pipe = family.pipeline_cls().from_pretrained(base, **_dtype_kwarg(dtype))
    except OSError as e:
        raise ModelLoadError(
            f"model.base_model {base!r} could not be loaded ({_strip_stacktrace_hint(str(e))}). Use a local "
            "diffusers-layout folder, or a hub id on a machine with internet access."
        ) from e
    pipe.set_progress_bar_config(disable=not progress, desc="denoising")
    if place:
        place_pipeline(pipe, cfg, device)
    return pipe


def place_pipeline(pipe, cfg: ModelConfig, device: torch.device, for_training: bool = False) -> None:
    """Move a loaded pipeline to ``device`` as ``cfg`` says: fp8 storage where asked; with offload only the VAE
    (the trainer converts and places the transformer and text encoder: training/offload.py). ``for_training``: the
    text encoder's vision tower and LM head stay in CPU memory (``text_parts.left_behind``: text conditioning never
    runs them, and training parks them anyway); inference keeps them, an image-conditioned pipeline needs the
    tower."""
    if cfg.offload:
        pipe.vae.to(device)
        return
    dtype = torch_dtype(cfg.dtype)
    if cfg.quantize:
        apply_fp8_storage(pipe.transformer, dtype)
    if cfg.quantize_te:
        apply_fp8_storage(pipe.text_encoder, dtype)
    if not for_training:
        pipe.to(device)
        return
    with left_behind(pipe.text_encoder):
        pipe.to(device)
