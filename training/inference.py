"""Archive -> registered token (by string) -> LoRA at ``lora_scale`` -> ``QwenImagePipeline`` image."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from .archive import PlaceholderArchive
from .lora import ADAPTER_NAME, load_lora_into_pipeline
from .token import check_single_id, install_placeholder, remove_placeholder

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
    """A loaded base pipeline that archives are applied to and removed from (Cog keeps one of these)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self._pristine_tokenizer = copy.deepcopy(pipe.tokenizer)
        self.archive: PlaceholderArchive | None = None
        self.token_id: int | None = None
        self.lora_report: dict | None = None

    def clear(self) -> None:
        """Remove any applied token and LoRA: the pipeline is the base model again."""
        if self.pipe.transformer is not None and getattr(self.pipe.transformer, "peft_config", None):
            if ADAPTER_NAME in self.pipe.transformer.peft_config:
                self.pipe.delete_adapters([ADAPTER_NAME])
        remove_placeholder(self.pipe.text_encoder)
        self.pipe.tokenizer = copy.deepcopy(self._pristine_tokenizer)
        self.archive = None
        self.token_id = None
        self.lora_report = None

    def apply(self, archive: PlaceholderArchive, lora_scale: float = 1.0) -> None:
        self.clear()
        pipe = self.pipe
        if archive.has_token:
            reg = install_placeholder(pipe.tokenizer, pipe.text_encoder, archive.token, archive.vector,
                                      trainable=False, fresh=False)
            self.token_id = reg.token_id
            if reg.token_id != archive.meta.placeholder_token_id:
                logger.info("token %r has id %d here (it was %s at training time); mapped by string",
                            archive.token, reg.token_id, archive.meta.placeholder_token_id)
        if archive.has_lora:
            self.lora_report = load_lora_into_pipeline(pipe, archive.lora_state_dict, scale=lora_scale,
                                                       metadata=archive.lora_metadata)
        self.archive = archive

    def set_lora_scale(self, scale: float) -> None:
        if self.archive is not None and self.archive.has_lora:
            self.pipe.set_adapters([ADAPTER_NAME], adapter_weights=[float(scale)])

    def generate(self, opts: GenerateOptions):
        if self.archive is not None and self.archive.has_token and self.archive.token in opts.prompt:
            check_single_id(self.pipe.tokenizer, self.archive.token, context="at inference")
        elif self.archive is not None and self.archive.has_token:
            logger.warning("prompt %r does not contain the placeholder token %r", opts.prompt, self.archive.token)
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
