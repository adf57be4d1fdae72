"""Apply Qwen LoRA: MODEL + archive (or a LoRA file, kohya or diffusers keys) -> a patched clone.

Goes through ComfyUI's own key map (``comfy.lora.model_lora_keys_unet``), loader (``comfy.lora.load_lora``)
and ``ModelPatcher.add_patches``: weights are patched when ComfyUI loads the model and restored after, never
rewritten in place. Every LoRA key must map; any that do not are named in a warning and in the node's text. A LoRA
whose tensors do not fit the model's weights, or that holds NaN / Inf, is refused before anything is patched.
"""

from __future__ import annotations

import logging
import math

import comfy.lora
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..training.lora import LoraError, check_lora_finite, header_alpha_tensors
from .paths import resolve_input_path
from .sockets import CATEGORY, ZeroPriorArchive

logger = logging.getLogger(__name__)
_NOT_LOADED = "lora key not loaded: "


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.keys: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith(_NOT_LOADED):
            self.keys.append(msg[len(_NOT_LOADED):])


def apply_lora(model, lora_sd: dict, strength: float, source: str):
    """(patched clone, number of patched weights, unloaded keys).

    Refuses, before anything is patched, a LoRA with NaN / Inf values and one whose tensors do not fit the
    model's weights (naming the LoRA key and both shapes): ComfyUI would only log an error per weight at
    sampling time and run with the rest.
    """
    from comfy.model_base import QwenImage

    if not isinstance(model.model, QwenImage):
        raise TypeError(f"Apply Qwen LoRA needs a Qwen-Image MODEL; this one is {type(model.model).__name__}")
    check_lora_finite(lora_sd, source)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    collect = _Collect()
    root = logging.getLogger()
    root.addHandler(collect)  # comfy.lora reports unmapped keys through logging.warning
    try:
        patches = comfy.lora.load_lora(lora_sd, key_map, log_missing=True)
    finally:
        root.removeHandler(collect)
    if not patches:
        raise ValueError(f"{source}: no LoRA key matches this Qwen-Image model (e.g. {next(iter(lora_sd), None)!r})")
    check_patch_shapes(model, patches, lora_sd, source)
    out = model.clone()
    patched = out.add_patches(patches, strength)
    if collect.keys:
        logger.warning("%s: %d LoRA keys did not map and were not loaded: %s", source, len(collect.keys), collect.keys)
    return out, len(patched), collect.keys


def check_patch_shapes(model, patches: dict, lora_sd: dict, source: str) -> None:
    """Every LoRA patch must produce exactly its weight's shape; raise LoraError naming the LoRA key."""
    from comfy.weight_adapter.lora import LoRAAdapter

    names = {id(v): k for k, v in lora_sd.items()}
    model_sd = model.model.state_dict()
    for key, patch in patches.items():
        name, offset = (key, None) if isinstance(key, str) else (key[0], key[1])
        weight = model_sd.get(name)
        if weight is None:
            continue  # add_patches skips it too
        shape = list(weight.shape)
        if offset is not None:  # a slice of a fused weight: (dim, start, length)
            shape[offset[0]] = offset[2]
        if isinstance(patch, LoRAAdapter):
            up, down, _alpha, mid, _dora, reshape = patch.weights
            target = list(reshape) if reshape is not None else shape
            out_f, in_f = target[0], math.prod(target[1:])
            checks = [(up, [out_f, down.shape[0]] + list(up.shape[2:]))]
            if mid is None:
                checks.append((down, [up.shape[1] if up.ndim > 1 else -1, in_f]))
            for t, want in checks:
                got = list(t.shape) if t is up or t.ndim <= 2 else [t.shape[0], math.prod(t.shape[1:])]
                if got != want:
                    raise LoraError(
                        f"{source}: LoRA tensor {names.get(id(t), '?')!r} has shape {list(t.shape)} but the model "
                        f"weight {name!r} has shape {shape} (this tensor would need {want}); the LoRA was made for "
                        "another model"
                    )
        elif isinstance(patch, tuple) and patch and patch[0] == "diff":
            diff = patch[1][0]
            if list(diff.shape) != shape:
                raise LoraError(f"{source}: LoRA tensor {names.get(id(diff), '?')!r} has shape {list(diff.shape)} but "
                                f"the model weight {name!r} has shape {shape}")


def _report(patched: int, unloaded: list[str]) -> str:
    msg = f"{patched} weights patched"
    return msg + (f"; NOT loaded ({len(unloaded)}): {', '.join(unloaded[:8])}" if unloaded else "; all keys loaded")


_STRENGTH = dict(default=1.0, min=-10.0, max=10.0, step=0.01)


class ApplyQwenLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZeroPriorApplyQwenLoRA",
            display_name="Apply Qwen LoRA",
            category=CATEGORY,
            description="Applies the archive's LoRA to a clone of the Qwen-Image MODEL through ComfyUI's model "
            "patcher. An archive without a LoRA passes the model through.",
            inputs=[
                io.Model.Input("model", tooltip="The Qwen-Image diffusion model (UNETLoader / checkpoint)."),
                ZeroPriorArchive.Input("archive", tooltip="From Load Placeholder Archive."),
                io.Float.Input("strength", tooltip="LoRA strength (lora_scale); 0 leaves the model as is.", **_STRENGTH),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="A patched clone; the input is unchanged.")],
        )

    @classmethod
    def execute(cls, model, archive, strength) -> io.NodeOutput:
        if not archive.has_lora:
            return io.NodeOutput(model, ui={"text": ["archive has no LoRA: model passed through"]})
        out, patched, unloaded = apply_lora(model, archive.lora_state_dict, strength, archive.source)
        return io.NodeOutput(out, ui={"text": [_report(patched, unloaded)]})


class ApplyQwenLoRAFile(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZeroPriorApplyQwenLoRAFile",
            display_name="Apply Qwen LoRA (file)",
            category=CATEGORY,
            description="The same for a LoRA .safetensors in models/loras (kohya lora_unet_/lora_down/lora_up/alpha "
            "or diffusers transformer.*.lora_A/lora_B keys), with the same zero-unloaded-keys check.",
            inputs=[
                io.Model.Input("model", tooltip="The Qwen-Image diffusion model."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA file in ComfyUI/models/loras/."),
                io.Float.Input("strength", tooltip="LoRA strength.", **_STRENGTH),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="A patched clone; the input is unchanged.")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        full = folder_paths.get_full_path_or_raise("loras", lora_name)
        path = resolve_input_path(full, "LoRA")
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"{path.name}: only .safetensors LoRAs are loaded (no pickle)")
        sd, header = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
        sd.update(header_alpha_tensors(sd, header, path.name))  # diffusers' dreambooth alpha is only in the header
        out, patched, unloaded = apply_lora(model, sd, strength, path.name)
        return io.NodeOutput(out, ui={"text": [_report(patched, unloaded)]})
