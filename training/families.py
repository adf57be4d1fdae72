"""Model families: Qwen-Image and Qwen-Image 2.1, and how to tell which one a model folder, pipeline,
config value or archive is.

A :class:`ModelFamily` holds the facts the core needs to treat a family's diffusers pipeline (class names, where
its tokenizer and text decoder live, the embedding table, default LoRA targets, size granularity); everything
family-specific elsewhere reads them from here instead of testing class names. Detection:

- a diffusers folder: ``model_index.json`` ``_class_name`` (:func:`detect_folder`);
- a pipeline object: its class, subclasses included (:func:`detect_pipeline`);
- ``model.family`` in the config: ``auto`` | ``qwen-image`` | ``qwen-image-2.1`` (:func:`resolve_family`);
- an archive: ``meta.json`` ``model_family``, absent in archives written before 2.1 support, which are all
  Qwen-Image (:func:`archive_family`, :func:`check_archive_family`).

The facts about 2.1 and where they come from are in docs/qwen-image-2.1.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .archive import ArchiveError
from .config import ATTENTION_TARGETS, FAMILY_CHOICES, MLP_TARGETS

AUTO = "auto"
QWEN_IMAGE = "qwen-image"
QWEN_IMAGE_21 = "qwen-image-2.1"


class FamilyError(ValueError):
    """The model family cannot be determined, or two sources disagree about it."""


class FamilyMismatchError(ArchiveError):
    """An archive trained on one model family is being applied to a base model of the other."""


@dataclass(frozen=True)
class ModelFamily:
    name: str  # as written in configs and meta.json
    title: str  # for messages
    pipeline_class: str  # diffusers class names
    transformer_class: str
    vae_class: str
    text_encoder_class: str
    embedding_dim: int  # the text encoder's hidden width = the placeholder vector's length
    embedding_rows: int  # rows of the real text encoder's input embedding table (never shrunk)
    lora_presets: dict = field(default_factory=dict)  # preset name -> module names (matched as name suffixes)
    default_lora_preset: str = "attention"
    bucket_step: int = 16  # image sides must be multiples of this (VAE factor x patch / latent grouping)
    default_steps: int = 30
    default_guidance: float = 4.0  # true-CFG scale; 1 disables CFG
    # block projections (relative to transformer_blocks.<i>.) whose frozen weights model.fp8_matmul computes in fp8
    fp8_modules: tuple = ()

    def __str__(self) -> str:
        return self.name

    # ---- diffusers classes -----------------------------------------------------------------------------
    def pipeline_cls(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    # ---- where things live in a pipeline ---------------------------------------------------------------
    def tokenizer(self, pipe):
        """The pipeline's text tokenizer (Qwen-Image: ``pipe.tokenizer``; 2.1: its processor's)."""
        return pipe.processor.tokenizer if self.name == QWEN_IMAGE_21 else pipe.tokenizer

    def set_tokenizer(self, pipe, tokenizer) -> None:
        if self.name == QWEN_IMAGE_21:
            pipe.processor.tokenizer = tokenizer
        else:
            pipe.tokenizer = tokenizer

    @staticmethod
    def decoder(text_encoder):
        """The text decoder without its LM head (``model.language_model`` for both Qwen2.5-VL and Qwen3-VL)."""
        model = text_encoder.model
        return getattr(model, "language_model", model)

    # ---- LoRA targets -----------------------------------------------------------------------------------
    @property
    def default_lora_targets(self) -> list[str]:
        return list(self.lora_presets[self.default_lora_preset])

    def lora_targets(self, targets: list[str] | str | None) -> list[str]:
        """``train.lora_targets`` for this family: a preset name, or a list of module names.

        ``TrainConfig`` resolves presets to Qwen-Image's module names before the family is known; those lists
        (its default included) are mapped back to this family's preset of the same name (the default to the
        default), so a config written for Qwen-Image means the same on 2.1. Other lists pass through; the LoRA
        code refuses names that match no module of the transformer."""
        if targets is None:
            return self.default_lora_targets
        if isinstance(targets, str):
            if targets in self.lora_presets:
                return list(self.lora_presets[targets])
            return [t.strip() for t in targets.split(",") if t.strip()]
        targets = list(targets)
        if len(targets) == 1 and targets[0] in self.lora_presets:  # a preset name the config did not know
            return list(self.lora_presets[targets[0]])
        qi = FAMILIES[QWEN_IMAGE]
        if targets == qi.default_lora_targets:
            return self.default_lora_targets
        for name, preset in qi.lora_presets.items():
            if targets == list(preset):
                return list(self.lora_presets.get(name, self.default_lora_targets))
        return targets


_QI_ATTENTION, _QI_MLP = ATTENTION_TARGETS, MLP_TARGETS  # Qwen-Image's module names (training/config.py)
# the image-stream projections of a QwenImageTransformerBlock (names relative to transformer_blocks.<i>.)
QWEN_IMAGE_FP8 = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.net.0.proj", "img_mlp.net.2")
# 2.1 is single-stream: one attention and one SwiGLU MLP per block see text and image tokens alike
# (module names as diffusers' QwenImage21Transformer2DModel has them; its _tp_plan lists the same seven).
_Q21_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
_Q21_MLP = ("img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out")

FAMILIES: dict[str, ModelFamily] = {
    QWEN_IMAGE: ModelFamily(
        name=QWEN_IMAGE,
        title="Qwen-Image",
        pipeline_class="QwenImagePipeline",
        transformer_class="QwenImageTransformer2DModel",
        vae_class="AutoencoderKLQwenImage",
        text_encoder_class="Qwen2_5_VLForConditionalGeneration",
        embedding_dim=3584,
        embedding_rows=152064,
        lora_presets={"attention": _QI_ATTENTION, "attention+mlp": _QI_ATTENTION + _QI_MLP},
        default_lora_preset="attention",
        bucket_step=16,
        default_steps=30,
        default_guidance=4.0,
        # the image stream only: the text stream sees ~100 tokens, too few rows for fp8 to gain (fp8.py)
        fp8_modules=QWEN_IMAGE_FP8,  # the image stream's projections; the text stream has ~100 rows
    ),
    QWEN_IMAGE_21: ModelFamily(
        name=QWEN_IMAGE_21,
        title="Qwen-Image 2.1",
        pipeline_class="QwenImage21Pipeline",
        transformer_class="QwenImage21Transformer2DModel",
        vae_class="AutoencoderKLQwenImage21",
        text_encoder_class="Qwen3VLForConditionalGeneration",
        embedding_dim=4096,
        embedding_rows=151936,
        lora_presets={"attention": _Q21_ATTENTION, "attention+mlp": _Q21_ATTENTION + _Q21_MLP,
                      "attention+mlp+txt_in": _Q21_ATTENTION + _Q21_MLP + ("txt_in.in_layer", "txt_in.out_layer")},
        default_lora_preset="attention+mlp",
        bucket_step=32,  # VAE factor 16, and latents are grouped 2x2 into the text encoder's image slots
        default_steps=40,
        default_guidance=1.0,  # 2.1 is sampled without CFG (diffusers' default true_cfg_scale)
        fp8_modules=_Q21_ATTENTION + _Q21_MLP,  # single-stream: every token goes through all seven
    ),
}
# FAMILY_CHOICES (auto + the families' names) is defined in training/config.py, which the model.family field reads
_BY_PIPELINE = {f.pipeline_class: f for f in FAMILIES.values()}


def get_family(name: str) -> ModelFamily:
    """The family called ``name`` (``qwen-image`` or ``qwen-image-2.1``)."""
    family = FAMILIES.get(name)
    if family is None:
        raise FamilyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return family


def detect_pipeline(pipe) -> ModelFamily:
    """The family of a diffusers pipeline object (its class or a base class)."""
    for cls in type(pipe).__mro__:
        family = _BY_PIPELINE.get(cls.__name__)
        if family is not None:
            return family
    raise FamilyError(
        f"{type(pipe).__name__} is not a pipeline of a supported model family "
        f"({', '.join(f.pipeline_class for f in FAMILIES.values())})"
    )


def detect_folder(folder: str | os.PathLike) -> ModelFamily:
    """The family of a diffusers-layout folder, from ``model_index.json`` ``_class_name``."""
    index = Path(folder).expanduser() / "model_index.json"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FamilyError(f"{folder}: no model_index.json; not a diffusers pipeline folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FamilyError(f"{index}: cannot read it as JSON ({e})") from e
    name = data.get("_class_name") if isinstance(data, dict) else None
    family = _BY_PIPELINE.get(name) if isinstance(name, str) else None
    if family is None:
        raise FamilyError(
            f"{index}: _class_name {name!r} is not a supported pipeline; expected one of "
            f"{', '.join(f.pipeline_class for f in FAMILIES.values())}"
        )
    return family


def detect_hub(repo_id: str) -> ModelFamily:
    """The family of a hub model id, from its ``model_index.json`` (fetched or taken from the local cache)."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(repo_id)
    except OSError as e:
        raise FamilyError(
            f"model.base_model {repo_id!r}: cannot read its model_index.json to tell the model family ({e}); "
            f"set model.family to one of {', '.join(FAMILIES)}"
        ) from e
    name = config.get("_class_name")
    family = _BY_PIPELINE.get(name)
    if family is None:
        raise FamilyError(
            f"model.base_model {repo_id!r} is a {name!r}, not a supported pipeline "
            f"({', '.join(f.pipeline_class for f in FAMILIES.values())})"
        )
    return family


def resolve_family(configured: str, base_model: str | os.PathLike | None = None, *,
                   is_local: bool | None = None) -> ModelFamily:
    """The family to use: ``model.family`` if named, else detected from ``base_model`` (a folder or hub id).

    A named family is checked against a local folder's ``model_index.json``: disagreeing is one error naming
    both (a hub id is not fetched just to check)."""
    if configured not in FAMILY_CHOICES:
        raise FamilyError(f"model.family must be one of {list(FAMILY_CHOICES)}, got {configured!r}")
    local = None
    if base_model is not None:
        path = Path(base_model).expanduser()
        local = path if (is_local if is_local is not None else path.is_dir()) else None
    if configured != AUTO:
        family = get_family(configured)
        if local is not None and (local / "model_index.json").is_file():
            found = detect_folder(local)
            if found is not family:
                raise FamilyError(
                    f"model.family is {family.name!r} ({family.title}) but {local} holds a {found.title} "
                    f"pipeline ({found.pipeline_class}); set model.family to {found.name!r} or auto"
                )
        return family
    if base_model is None:
        raise FamilyError("model.family is auto but there is no base model to detect it from")
    if local is not None:
        return detect_folder(local)
    return detect_hub(str(base_model))


# ---- archives -----------------------------------------------------------------------------------------


def archive_family(meta) -> ModelFamily:
    """The family an archive was trained on (``meta.model_family``; Qwen-Image when absent)."""
    return get_family(getattr(meta, "model_family", None) or QWEN_IMAGE)


def check_archive_family(meta, family: ModelFamily, where: str = "archive") -> None:
    """Refuse applying an archive of one family to a base model of the other (one error naming both)."""
    trained = archive_family(meta)
    if trained is not family:
        raise FamilyMismatchError(
            f"{where}: this archive was trained on {trained.title} (meta.json model_family {trained.name!r}) "
            f"but the base model is {family.title} ({family.name!r}); its token vector and LoRA only fit "
            f"{trained.title}. Load it with a {trained.title} base model, or train one for {family.title}."
        )
