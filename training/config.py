"""One typed configuration for every front end.

YAML files, CLI ``--set section.key=value`` overrides, Cog inputs and ComfyUI node widgets all map onto
:class:`Config`. Each field carries its help text and bounds in ``dataclasses.field(metadata=...)`` so the
adapters read defaults and limits from here instead of repeating them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ATTENTION_TARGETS = (
    # image stream
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    # text stream: without these the placeholder token cannot steer the image through the LoRA
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)
MLP_TARGETS = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
TEXT_STREAM_TARGETS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
TARGET_PRESETS = {"attention": ATTENTION_TARGETS, "attention+mlp": ATTENTION_TARGETS + MLP_TARGETS}
DTYPES = ("float32", "bfloat16", "float16")
FAMILY_CHOICES = ("auto", "qwen-image", "qwen-image-2.1")  # training.families (kept literal: no torch import here)
_DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
DEFAULT_TOKEN = "<zwx>"
DP_ALLREDUCE = ("flat", "overlap")  # training.distributed: average / OverlappedAverage


# the torch.compile modes that capture CUDA graphs (torch._inductor's list_mode_options: triton.cudagraphs)
GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


class ConfigError(ValueError):
    """A configuration value or key is not acceptable. The message names the key and quotes the value."""


def _f(default: Any, help: str, **bounds: Any) -> Any:
    meta = {"help": help, **bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _check_range(section: str, obj: Any) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{section}.{f.name} must be one of {list(choices)}, got {value!r}")
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if value is None or isinstance(value, (bool, str, list)):
            continue
        if lo is not None and value < lo:
            raise ConfigError(f"{section}.{f.name} must be >= {lo}, got {value!r}")
        if hi is not None and value > hi:
            raise ConfigError(f"{section}.{f.name} must be <= {hi}, got {value!r}")


@dataclass
class ModelConfig:
    base_model: str = _f(
        "Qwen/Qwen-Image", "Local Qwen-Image or Qwen-Image 2.1 folder (diffusers layout) or a Hugging Face hub id."
    )
    family: str = _f(
        "auto", "Model family: auto (from the model folder's model_index.json), qwen-image or qwen-image-2.1.",
        choices=FAMILY_CHOICES,
    )
    dtype: str = _f("bfloat16", "Compute dtype of the models.", choices=DTYPES)
    quantize: bool = _f(False, "Store the image transformer's weights in fp8 (computed in `dtype`).")
    quantize_te: bool = _f(
        False, "Store the text encoder's weights in fp8. Not allowed together with train_placeholder_token."
    )
    gradient_checkpointing: bool = _f(False, "Recompute transformer activations in backward to save memory.")
    device: str = _f("auto", "Torch device: auto (cuda if available), cpu, cuda, cuda:1, ...")
    compile: bool = _f(
        False, "torch.compile the transformer's repeated blocks (diffusers' regional compilation) and, with "
        "text_cuda_graphs, the text encoder's per-step part before its graphs are captured."
    )
    compile_mode: str | None = _f(
        None, "torch.compile mode for the transformer blocks: empty (default), reduce-overhead (CUDA graphs), "
        "max-autotune, max-autotune-no-cudagraphs.",
        choices=(None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )
    attention_backend: str | None = _f(
        None, "diffusers attention backend for the transformer, e.g. _native_cudnn, flash, _native_flash; empty: default."
    )
    fp8_matmul: bool = _f(
        False, "Compute the frozen image-stream base weights of the transformer with fp8 (e4m3, row-scaled) matmuls: "
        "faster on Ada/Hopper GPUs, ~3% relative error per product. The LoRA and token train in bf16/fp32."
    )
    fp8_fast_accum: bool = _f(
        True, "With fp8_matmul: the forward's fp8 products accumulate with the GPU's fast (reduced-precision) "
        "accumulation, as torchao's float8 training does (6-12% faster products, ~5 ms a step on an H200); false: "
        "float32 accumulation."
    )
    fp8_fast_accum_backward: bool = _f(
        True, "With fp8_matmul: the backward's fp8 input-gradient products with fast accumulation too (another "
        "~4 ms a step on an H200). The trained gradients stay as close to bf16's as with float32 accumulation "
        "(bench/fp8_grad_quality.py); false: float32 accumulation, as torchao's and Transformer Engine's recipes "
        "keep it."
    )
    offload: bool = _f(
        False, "For 24 GB cards: transformer weights in fp8, blocks beyond offload_budget_gib and the text encoder's "
        "layers streamed from CPU memory each use (Qwen-Image 2.1: nothing streamed where fp8 storage fits); turns "
        "gradient checkpointing on. Slower; CUDA only. With compile, the blocks that stream nothing are compiled."
    )
    offload_budget_gib: float = _f(
        0.0, "GPU memory to plan for with offload (GiB); 0: the card's total memory (memory: auto sets the capacity "
        "it planned for).", min=0.0, max=1024.0
    )
    offload_text_encoder: str = _f(
        "auto", "With offload: where the text decoder's layers go. auto: by the memory (Qwen-Image: on the GPU as "
        "loaded where they fit beside the prefetch ring, as on a 24 GB card, else streamed; Qwen-Image 2.1: on the GPU "
        "where it fits, else fp8, else streamed); stream: as loaded, in CPU memory, copied "
        "for each use (the exact conditioning); stream_fp8: fp8 in CPU memory (half the bytes to copy); fp8: fp8 on "
        "the GPU (nothing copied, more transformer blocks streamed instead); bf16: as loaded, on the GPU. The fp8 "
        "choices change the conditioning the token learns against a little (as ComfyUI's fp8-scaled text encoder "
        "file does).", choices=("auto", "stream", "stream_fp8", "fp8", "bf16"),
    )
    offload_prefetch_gib: float = _f(
        2.0, "With offload: GPU memory (GiB) for a ring buffer into which the streamed weights are copied ahead of "
        "use on a side stream, so the copies overlap compute (taken from the transformer blocks' share: fewer stay "
        "resident); 0 copies each weight when it is used.",
        min=0.0, max=64.0
    )
    memory: str = _f(
        "auto", "Memory plan: auto picks the fastest that fits this GPU (resident, checkpoint = gradient "
        "checkpointing, offload = 24 GB cards) and logs why; manual keeps gradient_checkpointing/offload as set.",
        choices=("auto", "manual", "resident", "checkpoint", "offload"),
    )
    text_prefix_cache: bool = _f(
        True, "Encode the caption text before the first placeholder once and run only the rest each step (exact)."
    )
    text_cuda_graphs: bool = _f(
        True, "On CUDA, replay the text encoder's per-step forward+backward as CUDA graphs (with text_prefix_cache; "
        "about 1 GiB of GPU memory per caption-length bucket, at most 4 kept)."
    )

    @property
    def compile_graphs(self) -> bool:
        """Whether ``torch.compile`` captures the blocks as CUDA graphs: ``reduce-overhead`` and ``max-autotune``
        both turn on inductor's ``triton.cudagraphs`` (graph trees), which need a step marker, keep memory pools
        and cannot recompute blocks."""
        return bool(self.compile) and self.compile_mode in GRAPH_COMPILE_MODES

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        offload = self.offload or self.memory == "offload"
        if offload and self.fp8_matmul:
            raise ConfigError("model.offload (or memory: offload) and model.fp8_matmul both replace the "
                              "transformer's linear layers; set one of them to false")
        if self.compile_mode is not None and not self.compile:
            raise ConfigError(f"model.compile_mode is set but model.compile is false (compile_mode "
                              f"{self.compile_mode!r} would be ignored); set model.compile: true or drop compile_mode")
        recomputes = self.gradient_checkpointing or offload or self.memory == "checkpoint"
        if self.compile_mode == "reduce-overhead" and recomputes:
            # seen on an H100: "graph recording observed an input tensor deallocate" in the first step
            raise ConfigError("model.compile_mode reduce-overhead (CUDA graphs) crashes with gradient checkpointing "
                              "(gradient_checkpointing, memory: checkpoint or offload); use the default compile "
                              "mode, or memory: auto (it switches the mode when it must checkpoint)")
        if self.compile_mode == "max-autotune" and recomputes:
            # max-autotune captures the same CUDA-graph trees as reduce-overhead (inductor's triton.cudagraphs)
            raise ConfigError("model.compile_mode max-autotune captures CUDA graphs, which crash with gradient "
                              "checkpointing (gradient_checkpointing, memory: checkpoint or offload); use "
                              "max-autotune-no-cudagraphs")
        if self.quantize and (offload or self.fp8_matmul):
            raise ConfigError("model.quantize (fp8 storage through diffusers' layerwise casting) cannot be combined "
                              "with offload or fp8_matmul, which convert the same layers their own way; keep one")
        if not isinstance(self.base_model, str) or not self.base_model.strip():
            raise ConfigError(f"model.base_model must be a folder or hub id, got {self.base_model!r}")
        if not _DEVICE.match(self.device):
            raise ConfigError(f"model.device must be auto, cpu, cuda, cuda:N (or mps, xpu, xpu:N), got {self.device!r}")


@dataclass
class TrainConfig:
    train_placeholder_token: bool = _f(
        False, "Train a fresh zero-prior token (placeholder_token) together with the LoRA. Off: plain LoRA."
    )
    placeholder_token: str = _f(DEFAULT_TOKEN, "The new special token written in prompts, e.g. <zwx>.")
    placeholder_tokens: list = _f(
        [], "Several tokens trained in one run, e.g. ['<alice>', '<bob>'] (each its own vector, one LoRA); empty: "
        "[placeholder_token]. placeholder_token is then the first."
    )
    placeholder_init_std: float = _f(
        1e-5, "Std of the token row's N(0, std) init; 0 gives exact zeros.", min=0.0, max=1.0, step=1e-6
    )
    prepend_token: bool = _f(
        True, "With token training on, prepend the token to captions that do not contain it (several tokens: an "
        "image's folder token, for images in a folder named after a token)."
    )
    default_caption: str = _f(
        "a photo of {token}", "Caption for images without a .txt file; {token} becomes placeholder_token (several "
        "tokens: the token of the folder the image is in)."
    )
    rank: int = _f(16, "LoRA rank.", min=1, max=1024)
    alpha: float | None = _f(None, "LoRA alpha (scale = alpha / rank); empty means alpha = rank.", min=0.0)
    lora_targets: list = _f(
        list(ATTENTION_TARGETS),
        "Transformer module names for LoRA, or a preset: 'attention' or 'attention+mlp'.",
    )
    steps: int = _f(1000, "Optimizer steps.", min=1, max=1_000_000)
    learning_rate: float = _f(1e-4, "LoRA learning rate (AdamW).", min=0.0, max=1.0, step=1e-5)
    token_learning_rate: float = _f(
        5e-3, "Learning rate of the placeholder token's embedding row (weight decay 0).", min=0.0, max=1.0
    )
    weight_decay: float = _f(1e-2, "AdamW weight decay for the LoRA parameters (never the token).", min=0.0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables.", min=0.0)
    batch_size: int = _f(1, "Images per step.", min=1, max=256)
    resolution: int = _f(1024, "Training resolution (area of the aspect-ratio buckets), multiple of 16.", min=16, max=4096)
    seed: int = _f(42, "Random seed (data order, noise, init).", min=0, max=2**32 - 1)
    checkpoint_every: int = _f(250, "Save a resumable checkpoint every N steps; 0 disables.", min=0)
    keep_checkpoints: int = _f(
        2, "Keep the newest N checkpoints under checkpoints/ (older ones are deleted when one is written); 0 keeps all.",
        min=0,
    )
    weighting_scheme: str = _f(
        "none", "Timestep sampling, as diffusers' training scripts.", choices=WEIGHTING_SCHEMES
    )
    cache_latents: bool = _f(True, "Encode every image with the VAE once before training.")
    dp_allreduce: str = _f(
        "overlap", "Data parallel (torchrun, several processes) only: how the LoRA + token gradients are averaged. "
        "overlap: ~25 MB buckets all-reduced from gradient hooks while the backward runs (as DDP); flat: one "
        "all-reduce after the backward. Same result; the run's summary logs how long each step waited for it.",
        choices=DP_ALLREDUCE,
    )

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, str):
            preset = TARGET_PRESETS.get(self.lora_targets)
            if preset is None:
                self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
            else:
                self.lora_targets = list(preset)
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ConfigError(f"train.lora_targets must be a non-empty list of module names, got {self.lora_targets!r}")
        if self.placeholder_init_std < 0:
            raise ConfigError(
                f"train.placeholder_init_std must be >= 0 (0 gives an all-zero row), got {self.placeholder_init_std!r}"
            )
        if self.resolution % 16:
            raise ConfigError(f"train.resolution must be a multiple of 16, got {self.resolution!r}")
        from .token import TokenError, split_token_list, validate_token, validate_tokens  # the checks training,
        # inference and ComfyUI share

        try:
            validate_token(self.placeholder_token)
        except TokenError as e:
            raise ConfigError(f"train.placeholder_token: {e}") from None
        if isinstance(self.placeholder_tokens, str):  # --set train.placeholder_tokens=<a>,<b>
            self.placeholder_tokens = split_token_list(self.placeholder_tokens)
        if self.placeholder_tokens:
            try:
                validate_tokens(self.placeholder_tokens)
            except TokenError as e:
                raise ConfigError(f"train.placeholder_tokens: {e}") from None
            first = self.placeholder_tokens[0]
            if self.placeholder_token not in (first, DEFAULT_TOKEN):
                raise ConfigError(
                    f"train.placeholder_token {self.placeholder_token!r} is not the first of train.placeholder_tokens "
                    f"{self.placeholder_tokens}; set only placeholder_tokens (placeholder_token is its first entry)")
            self.placeholder_token = first
        else:
            self.placeholder_tokens = [self.placeholder_token]
        if self.alpha is None:
            self.alpha = float(self.rank)
        if self.train_placeholder_token and not set(self.lora_targets) & set(TEXT_STREAM_TARGETS):
            logger.warning(
                "train.lora_targets %s has no text-stream module (%s): on Qwen-Image the LoRA cannot adapt how "
                "the image attends to the placeholder token (Qwen-Image 2.1 is single-stream: not an issue there).",
                self.lora_targets,
                ", ".join(TEXT_STREAM_TARGETS[:4]),
            )


@dataclass
class SampleConfig:
    prompts: list = _f([], "Prompts rendered every `every` steps during training (a `sample:` section).")
    every: int = _f(0, "Render samples every N steps; 0 disables.", min=0)
    steps: int = _f(20, "Denoising steps per sample.", min=1, max=500)
    guidance: float = _f(4.0, "True-CFG scale for samples (1 disables CFG).", min=1.0, max=30.0)
    negative_prompt: str = _f(" ", "Negative prompt for samples.")
    width: int | None = _f(None, "Sample width (default: train.resolution).", min=16, max=4096)
    height: int | None = _f(None, "Sample height (default: train.resolution).", min=16, max=4096)
    seed: int = _f(0, "Sampling seed.", min=0)

    def __post_init__(self) -> None:
        if not isinstance(self.prompts, list):  # a plain string would be rendered once per character
            raise ConfigError(
                f"sample.prompts must be a list of prompts, e.g. ['a photo of <zwx>'], got {self.prompts!r}"
            )
        for i, p in enumerate(self.prompts):
            if not isinstance(p, str) or not p.strip():
                raise ConfigError(f"sample.prompts[{i}] must be a non-empty string, got {p!r}")


@dataclass
class DebugConfig:
    log_prompt_ids: bool = _f(
        False, "Log the placeholder token's id, each prompt's token ids, and that the gradient mask is active."
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        for name, sub in (("model", self.model), ("train", self.train), ("sample", self.sample), ("debug", self.debug)):
            _check_range(name, sub)
        if self.train.train_placeholder_token and self.model.quantize_te:
            raise ConfigError(
                "train.train_placeholder_token is true but model.quantize_te is true: the placeholder token's "
                "embedding cannot be trained through a quantized text encoder. Set `quantize_te: false` "
                "(model section) or turn token training off."
            )

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict | None, source: str = "config") -> Config:
        data = dict(data or {})
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ConfigError(f"{source}: unknown section {unknown[0]!r} (known: {', '.join(sections)})")
        kwargs = {}
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            sub_cls = hints[name]
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section {name!r} must be a mapping, got {value!r}")
            kwargs[name] = _build_section(sub_cls, name, value, source)
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> Config:
        import yaml

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as e:
            raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                              "save the config file as UTF-8") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
        return cls.from_dict(apply_overrides(data, overrides or []), source=str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **sections: dict) -> Config:
        """A new Config with some fields changed, e.g. ``cfg.replace(train={"steps": 10})`` (validated)."""
        data = self.to_dict()
        for name, values in sections.items():
            section = data.setdefault(name, {})
            if name == "train":  # one of the two token keys given: the other follows it instead of contradicting it
                for key, other in (("placeholder_token", "placeholder_tokens"), ("placeholder_tokens", "placeholder_token")):
                    if key in values and other not in values:
                        section.pop(other, None)
            section.update(values)
        return Config.from_dict(data)


def _coerce(section: str, name: str, tp: Any, value: Any) -> Any:
    """YAML and CLI strings -> the field's type; refuses what does not fit, quoting the value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{section}.{name} must not be empty")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{section}.{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{section}.{name} must be an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{section}.{name} must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{section}.{name} must be a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{section}.{name} must be a number, got {value!r}") from None
        if out != out or out in (float("inf"), float("-inf")):
            raise ConfigError(f"{section}.{name} must be a finite number, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{section}.{name} must be a string, got {value!r}")
        return value
    if tp is list or origin is list:
        if isinstance(value, str):
            return value  # presets / comma lists are resolved by the section's __post_init__
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{section}.{name} must be a list, got {value!r}")
        return list(value)
    return value


def _build_section(sub_cls: type, section: str, values: dict, source: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(sub_cls)}
    hints = typing.get_type_hints(sub_cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {section}.{unknown[0]} (known keys in {section}: {', '.join(known)})"
        )
    kwargs = {k: _coerce(section, k, hints[k], v) for k, v in values.items()}
    obj = sub_cls(**kwargs)
    given = kwargs.get("placeholder_token")
    if sub_cls is TrainConfig and given is not None and given != obj.placeholder_token:
        # both keys given (the default <zwx> included): placeholder_token must be the list's first
        raise ConfigError(
            f"train.placeholder_token {given!r} is not the first of train.placeholder_tokens "
            f"{obj.placeholder_tokens}; set only placeholder_tokens (placeholder_token is its first entry)")
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars/lists) onto a config mapping."""
    import yaml

    data = {k: dict(v or {}) if isinstance(v, dict) or v is None else v for k, v in data.items()}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r} must look like section.key=value, e.g. --set train.steps=500")
        key, raw = item.split("=", 1)
        section, name = key.strip().split(".", 1)
        _check_override_key(item, section, name)  # named as --set: the YAML file is not what is wrong
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name in ("placeholder_token",):
            value = raw
        sect = data.setdefault(section, {})
        if not isinstance(sect, dict):
            raise ConfigError(f"override {item!r}: section {section!r} is not a mapping")
        sect[name] = value
    return data


def _check_override_key(item: str, section: str, name: str) -> None:
    sections = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(f"--set {item}: unknown section {section!r} (known: {', '.join(sections)})")
    known = [f.name for f in dataclasses.fields(sections[section])]
    if name not in known:
        raise ConfigError(f"--set {item}: unknown key {section}.{name} (known keys in {section}: {', '.join(known)})")


def field_spec(section: str, name: str) -> dict:
    """Default, help and bounds of one field, for Cog inputs and node widgets (single source of truth)."""
    cls = {"model": ModelConfig, "train": TrainConfig, "sample": SampleConfig, "debug": DebugConfig}[section]
    for f in dataclasses.fields(cls):
        if f.name == name:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            return {"default": default, **f.metadata}
    raise KeyError(f"{section}.{name}")
