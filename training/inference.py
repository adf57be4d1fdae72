"""Archive -> registered tokens (by string; every token of the archive) -> LoRA at ``lora_scale`` -> image, with a
``QwenImagePipeline`` or a ``QwenImage21Pipeline`` (the archive's ``model_family`` must be the pipeline's)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .archive import ArchiveError, PlaceholderArchive
from .families import check_archive_family, detect_pipeline
from .lora import ADAPTER_NAME, check_lora_fits, has_lora_layers, load_lora_into_pipeline
from .token import (
    base_embedding,
    check_single_id,
    check_vector_width,
    install_placeholders,
    remove_placeholder,
    validate_tokens,
)

logger = logging.getLogger(__name__)


@dataclass
class GenerateOptions:
    prompt: str
    negative_prompt: str = " "
    steps: int = 30
    guidance: float = 4.0  # Qwen-Image's true-CFG scale; 1 disables CFG
    width: int = 1024
    height: int = 1024
    seed: int = 0


class InferenceSession:
    """A loaded base pipeline that archives are applied to and removed from (Cog keeps one of these).

    ``apply`` either applies the whole archive or leaves the base model: every check (token string against
    the tokenizer, vector width, LoRA keys and shapes) runs before the pipeline is touched, and any failure
    while applying clears the token and LoRA again, so nothing half-loaded (or left over) is ever served.
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self.family = detect_pipeline(pipe)
        self._pristine_tokenizer = copy.deepcopy(self.family.tokenizer(pipe))
        self.archive: PlaceholderArchive | None = None
        self.token_id: int | None = None  # the first token's id here
        self.token_ids: dict[str, int] = {}  # every token's id here, in training order
        self.lora_report: dict | None = None

    def clear(self) -> None:
        """Remove any applied token and LoRA: the pipeline is the base model again."""
        if self.pipe.transformer is not None and has_lora_layers(self.pipe.transformer):
            # unload, not delete_adapters: a load that failed half-way leaves peft layers with no adapter
            # listed in peft_config; unloading restores the plain modules whatever state they are in
            self.pipe.unload_lora_weights()
        remove_placeholder(self.pipe.text_encoder)
        self.family.set_tokenizer(self.pipe, copy.deepcopy(self._pristine_tokenizer))
        self.archive = None
        self.token_id = None
        self.token_ids = {}
        self.lora_report = None

    def apply(self, archive: PlaceholderArchive, lora_scale: float = 1.0) -> None:
        check_archive_family(archive.meta, self.family, archive.source or "archive")
        self.clear()
        pipe, where = self.pipe, archive.source or "archive"
        try:
            tokens = archive.tokens if archive.has_token else []
            if tokens:  # refuse before anything changes
                validate_tokens(tokens, self.family.tokenizer(pipe), where=where)
                width = base_embedding(pipe.text_encoder).weight.shape[1]
                for token in tokens:
                    check_vector_width(archive.vectors[token], width, token, where)
            if archive.has_lora:
                check_lora_fits(pipe.transformer, archive.lora_state_dict, source=where)
            if tokens:
                regs = install_placeholders(self.family.tokenizer(pipe), pipe.text_encoder, tokens,
                                            [archive.vectors[t] for t in tokens], trainable=False, where=where)
                self.token_ids = {reg.token: reg.token_id for reg in regs}
                self.token_id = regs[0].token_id
                for reg, trained_id in zip(regs, archive.meta.token_ids):
                    if reg.token_id != trained_id:
                        logger.info("token %r has id %d here (it was %s at training time); mapped by string",
                                    reg.token, reg.token_id, trained_id)
            if archive.has_lora:
                self.lora_report = load_lora_into_pipeline(pipe, archive.lora_state_dict, scale=lora_scale,
                                                           source=where, metadata=archive.lora_metadata)
        except BaseException:
            self.clear()
            raise
        self.archive = archive

    def set_lora_scale(self, scale: float) -> None:
        if self.archive is not None and self.archive.has_lora:
            self.pipe.set_adapters([ADAPTER_NAME], adapter_weights=[float(scale)])

    def generate(self, opts: GenerateOptions):
        tokens = list(self.token_ids)
        used = [t for t in tokens if t in opts.prompt]
        for token in used:
            check_single_id(self.family.tokenizer(self.pipe), token, context="at inference")
        if tokens and not used:
            logger.warning("prompt %r does not contain the placeholder token%s %s", opts.prompt,
                           "s" if len(tokens) > 1 else "", ", ".join(map(repr, tokens)))
        return generate(self.pipe, opts)


def generate(pipe, opts: GenerateOptions):
    device = pipe._execution_device
    gen = torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(int(opts.seed))
    use_cfg = opts.guidance > 1.0
    return pipe(
        prompt=opts.prompt,
        negative_prompt=(opts.negative_prompt or " ") if use_cfg else None,
        true_cfg_scale=float(opts.guidance),
        num_inference_steps=int(opts.steps),
        width=int(opts.width),
        height=int(opts.height),
        generator=gen,
    ).images[0]


def base_model_for(archive: PlaceholderArchive | None, requested: str | None) -> str:
    """The base model to load for a prediction: the one the user asked for, else the archive's if it is a
    local folder. An archive's hub id is never downloaded unless the user names that model: a file someone
    hands over must not make this machine fetch tens of gigabytes (or anything at all)."""
    if requested:
        return requested
    if archive is None:
        raise ArchiveError("no base model: give one (--base-model), or an archive whose meta.json names a local folder")
    base = archive.meta.base_model
    if base and Path(base).expanduser().is_dir():
        return base
    raise ArchiveError(
        f"{archive.source}: meta.json names base model {base!r}, which is not a folder on this machine; models are "
        f"not downloaded on an archive's say-so. Pass --base-model {base} to use (and if needed download) it, or "
        "--base-model /path/to/a/local/Qwen-Image folder"
    )
