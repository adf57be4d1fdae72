"""LoRA on the Qwen-Image transformer (through peft / diffusers) and kohya <-> diffusers key conversion.

Exported LoRAs use diffusers keys (``transformer.<module>.lora_A.weight`` / ``lora_B.weight``) with the
``alpha / rank`` scale folded into ``lora_B``. That is the convention every loader shares when a file carries
no alpha (diffusers, ComfyUI, kohya tools all then use scale 1.0), so the file means the same everywhere.
"""

from __future__ import annotations

import logging
import re

import torch

logger = logging.getLogger(__name__)

ADAPTER_NAME = "zero_prior"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


class LoraError(ValueError):
    """A LoRA file or state dict does not fit the model or the expected format."""


def add_lora(transformer, rank: int, alpha: float, targets: list[str], seed: int | None = None) -> list[str]:
    """Attach a trainable LoRA adapter to ``transformer``; return the names of the adapted modules."""
    from peft import LoraConfig

    names = [n for n, _ in transformer.named_modules()]
    matched = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        block = "transformer_blocks.0."  # the names one block offers (both families' transformers have these)
        examples = [n.removeprefix(block) for n, m in transformer.named_modules()
                    if n.startswith(block) and isinstance(m, torch.nn.Linear)] or ["to_q", "to_out.0"]
        raise LoraError(
            f"train.lora_targets {unmatched} match no module of {type(transformer).__name__}; "
            f"use names such as {', '.join(examples[:8])}"
        )
    for p in transformer.parameters():
        p.requires_grad_(False)
    if seed is not None:
        torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
    transformer.set_adapter(ADAPTER_NAME)
    return matched


def lora_parameters(transformer) -> list[torch.nn.Parameter]:
    return [p for n, p in transformer.named_parameters() if "lora_" in n and p.requires_grad]


def export_lora(transformer, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers format, ``alpha / rank`` folded into lora_B, float32 on CPU."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    scale = float(alpha) / float(rank)
    out = {}
    for k, v in sd.items():
        v = v.detach().to("cpu", torch.float32).clone()
        if k.endswith("lora_B.weight") and scale != 1.0:
            v = v * scale
        out[f"transformer.{k}"] = v
    return out


def load_lora_into_pipeline(pipe, state_dict: dict[str, torch.Tensor], scale: float = 1.0,
                            adapter_name: str = ADAPTER_NAME, source: str = "") -> dict[str, list[str]]:
    """Load a diffusers- or kohya-format LoRA into ``pipe.transformer`` and verify every key landed.

    Every key, shape and value is checked against the transformer first (:func:`check_lora_fits`), so a LoRA
    that does not fit raises :class:`LoraError` naming ``source`` and the key, and the model is left as it
    was (no peft layers added). Returns ``{"missing": [...], "unexpected": [...]}`` (both empty on success).
    """
    from peft.utils import get_peft_model_state_dict

    sd = check_lora_fits(pipe.transformer, state_dict, source=source, pipeline_cls=type(pipe))
    expected = {k.removeprefix("transformer."): v for k, v in sd.items() if "lora_" in k}
    try:
        pipe.load_lora_weights(sd, adapter_name=adapter_name)
        pipe.set_adapters([adapter_name], adapter_weights=[float(scale)])
    except (RuntimeError, ValueError, KeyError) as e:  # diffusers' size mismatch, peft's NoMatchingPeftModuleError
        if has_lora_layers(pipe.transformer):
            pipe.unload_lora_weights()
        raise LoraError(f"{_src(source)}the LoRA could not be loaded into the transformer: {e}") from e
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=adapter_name)
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing:
        logger.warning("LoRA keys that matched no transformer module (not loaded): %s", missing[:20])
    if unexpected:
        logger.warning("transformer LoRA modules with no weights in the file: %s", unexpected[:20])
    return {"missing": missing, "unexpected": unexpected}


def _src(source: str) -> str:
    return f"{source}: " if source else ""


def has_lora_layers(model) -> bool:
    """Whether any peft LoRA layer wraps a module of ``model`` (also after a load that failed half-way)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def check_lora_finite(state_dict: dict[str, torch.Tensor], source: str = "") -> None:
    """Refuse a LoRA with a non-float tensor or a NaN / Inf value, naming the first such key."""
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or key.endswith(".alpha")):
            raise LoraError(f"{_src(source)}LoRA tensor {key!r} is not a float tensor "
                            f"({getattr(value, 'dtype', type(value).__name__)})")
        if not torch.isfinite(value).all():
            raise LoraError(f"{_src(source)}LoRA tensor {key!r} holds NaN or Inf values; the LoRA is unusable "
                            "(training diverged or the file is damaged)")


def check_lora_fits(transformer, state_dict: dict[str, torch.Tensor], source: str = "",
                    pipeline_cls=None) -> dict[str, torch.Tensor]:
    """Check a LoRA against ``transformer`` before anything is loaded; return it in diffusers keys.

    Refuses, naming ``source`` and the key: non-finite values; keys that are not LoRA weights; keys whose
    module does not exist in the transformer; a ``lora_A`` / ``lora_B`` whose shape does not fit the module's
    weight (both shapes named); a module with only one of the pair, or with different ranks in A and B.
    """
    if pipeline_cls is None:
        from diffusers import QwenImagePipeline as pipeline_cls
    check_lora_finite(state_dict, source)
    try:
        sd = pipeline_cls.lora_state_dict(dict(state_dict))  # diffusers converts kohya / ComfyUI layouts itself
    except (KeyError, ValueError, RuntimeError, IndexError) as e:
        raise LoraError(f"{_src(source)}the LoRA's keys are in no layout diffusers can read ({e})") from e
    if not any("lora_" in k for k in sd):
        raise LoraError(f"{_src(source)}the LoRA holds no lora_A/lora_B (or lora_down/lora_up) tensors")
    modules = dict(transformer.named_modules())
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unmatched = []
    for key, value in sd.items():
        m = _LORA_KEY.match(key.removeprefix("transformer."))
        if not m:
            raise LoraError(f"{_src(source)}{key!r} is not a LoRA weight key (expected <module>.lora_A.weight / "
                            "lora_B.weight)")
        if m["module"] not in modules:
            unmatched.append(key)
            continue
        pairs.setdefault(m["module"], {})[m["ab"]] = (key, value)
    if unmatched:
        raise LoraError(
            f"{_src(source)}{len(unmatched)} of {len(sd)} LoRA key(s) match no module of "
            f"{type(transformer).__name__} (e.g. {unmatched[0]!r}); the LoRA was made for another model"
        )
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            have = next(iter(ab.values()))[0]
            raise LoraError(f"{_src(source)}LoRA key {have!r} has no lora_{'B' if 'A' in ab else 'A'} partner")
        module = modules[name]
        weight = getattr(getattr(module, "base_layer", module), "weight", None)
        if weight is None or weight.ndim < 2:
            raise LoraError(f"{_src(source)}LoRA key {ab['A'][0]!r} targets {name!r}, which has no 2-D weight")
        out_f, in_f = weight.shape[0], weight[0].numel()
        (a_key, a), (b_key, b) = ab["A"], ab["B"]
        rank = a.shape[0] if a.ndim >= 1 else 0
        for key, t, want in ((a_key, a, (rank, in_f)), (b_key, b, (out_f, rank))):
            if t.ndim != 2 or tuple(t.shape) != want or rank < 1:
                raise LoraError(
                    f"{_src(source)}LoRA tensor {key!r} has shape {list(t.shape)} but module {name!r} has a weight of "
                    f"shape {list(weight.shape)} (this tensor would need {list(want)}); the LoRA was made for "
                    "another model"
                )
    return sd


# ---- kohya <-> diffusers ------------------------------------------------------------------------------


def diffusers_to_kohya(state_dict: dict[str, torch.Tensor], alpha: float | None = None) -> dict[str, torch.Tensor]:
    """``transformer.a.b.lora_A.weight`` -> ``lora_unet_a_b.lora_down.weight`` (+ ``.alpha``).

    Diffusers-format files carry the scale in the weights (alpha == rank); the kohya file gets
    ``alpha = rank`` unless ``alpha`` is given, in which case lora_up is divided by ``alpha / rank``
    so the effective update is unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _LORA_KEY.match(key.removeprefix("transformer.").removeprefix("diffusion_model."))
        if not m:
            raise LoraError(f"not a diffusers LoRA key: {key!r} (expected <module>.lora_A.weight / lora_B.weight)")
        module = "lora_unet_" + m["module"].replace(".", "_")
        rank = value.shape[0] if m["ab"] == "A" else value.shape[1]
        a = float(alpha) if alpha is not None else float(rank)
        if m["ab"] == "A":
            out[f"{module}.lora_down.weight"] = value.clone()
            out[f"{module}.alpha"] = torch.tensor(a)
        else:
            out[f"{module}.lora_up.weight"] = value.clone() / (a / rank)
    return out


def kohya_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya (``lora_unet_…``/``lora_down``/``lora_up``/``alpha``) -> diffusers keys, scale folded in.

    Uses diffusers' own Qwen-Image converter (``QwenImagePipeline.lora_state_dict``) rather than a copy.
    """
    from diffusers import QwenImagePipeline

    if not any(k.startswith(("lora_unet_", "diffusion_model.")) for k in state_dict):
        raise LoraError("not a kohya Qwen-Image LoRA: no key starts with 'lora_unet_' or 'diffusion_model.'")
    sd = QwenImagePipeline.lora_state_dict({k: v.clone() for k, v in state_dict.items()})
    return {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in sd.items()}


def effective_deltas(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> B @ A * (alpha / rank), for comparing LoRAs across formats."""
    if any(k.endswith("lora_down.weight") for k in state_dict):
        out = {}
        for k, down in state_dict.items():
            if not k.endswith(".lora_down.weight"):
                continue
            base = k.removesuffix(".lora_down.weight")
            up = state_dict[f"{base}.lora_up.weight"]
            alpha = state_dict.get(f"{base}.alpha")
            scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
            out[base] = (up.float() @ down.float()) * scale
        return out
    out = {}
    for k, a in state_dict.items():
        m = _LORA_KEY.match(k)
        if m and m["ab"] == "A":
            b = state_dict[f"{m['module']}.lora_B.weight"]
            out["lora_unet_" + m["module"].removeprefix("transformer.").replace(".", "_")] = b.float() @ a.float()
    return out
