"""LoRA on the Qwen-Image transformer (through peft / diffusers) and conversion between LoRA key styles.

Exported LoRAs use diffusers keys (``transformer.<module>.lora_A.weight`` / ``lora_B.weight``) with the
``alpha / rank`` scale folded into ``lora_B``. That is the convention every loader shares when a file carries
no alpha (diffusers, ComfyUI, kohya tools all then use scale 1.0), so the file means the same everywhere.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ADAPTER_NAME = "zero_prior"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")  # a diffusers key, after "transformer."


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


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """A LoRA branch's output ``scale * B(A(x))``, computed in ``x``'s dtype (float32 ``A``/``B`` cast per use)."""
    return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * scale


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
                            adapter_name: str = ADAPTER_NAME, source: str = "",
                            metadata: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Load a LoRA of any supported key style (:data:`KEY_STYLES`) into ``pipe.transformer`` and verify every key
    landed.

    ``metadata`` is the file's safetensors header: a diffusers ``lora_adapter_metadata`` alpha is applied. Every
    key, shape and value is checked against the transformer first (:func:`check_lora_fits`), so a LoRA that does
    not fit raises :class:`LoraError` naming ``source`` and the key, and the model is left as it was (no peft
    layers added). Returns ``{"missing": [...], "unexpected": [...]}`` (both empty on success).
    """
    from peft.utils import get_peft_model_state_dict

    state_dict = to_diffusers(state_dict, metadata, where=source or "LoRA")  # any key style; header alpha folded
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


# ---- LoRA key families <-> diffusers --------------------------------------------------------------------
#
# What other Qwen-Image trainers write, parsed into one form (dotted module -> lora_A/down, lora_B/up, alpha) and
# written back in any of those key styles. Flat kohya/LyCORIS names are mapped to modules by diffusers' own Qwen
# converter (QwenImagePipeline.lora_state_dict), so this accepts the names diffusers accepts.

HEADER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY: peft's LoraConfig as JSON
SOURCE_METADATA_KEY = "qwen_zero_prior.source"  # written by `convert`: the source's key style and alphas

_PAIRS = {
    "A/B": ("lora_A.weight", "lora_B.weight"),
    "A/B.default": ("lora_A.default.weight", "lora_B.default.weight"),
    "down/up": ("lora_down.weight", "lora_up.weight"),
}
_FLAT_PREFIXES = ("lora_unet_", "lycoris_")
_KEY = re.compile(
    r"^(?P<prefix>transformer\.|diffusion_model\.|lora_unet_|lycoris_)?(?P<module>.+?)\."
    r"(?P<what>lora_[AB]\.weight|lora_[AB]\.default\.weight|lora_down\.weight|lora_up\.weight|alpha)$"
)
_UNSUPPORTED = (  # weights that are not a low-rank pair: no LoRA file can hold them
    (re.compile(r"\.lokr_"), "LoKr (lokr_w1/lokr_w2)"),
    (re.compile(r"\.hada_"), "LoHa (hada_w1/hada_w2)"),
    (re.compile(r"\.diff(_b)?$"), "full-weight diff/diff_b (ComfyUI's trainer)"),
    (re.compile(r"dora_scale|lora_magnitude_vector"), "DoRA (dora_scale)"),
    (re.compile(r"\.lora_mid\."), "LoCon Tucker (lora_mid)"),
    (re.compile(r"\.(b?oft_|w_norm$|b_norm$)"), "OFT / norm"),
)


@dataclass(frozen=True)
class KeyStyle:
    """How a file names one module's tensors: ``<prefix><module>.<down>`` / ``.<up>`` (+ ``<prefix><module>.alpha``).

    Flat prefixes (``lora_unet_``, ``lycoris_``) write the module with ``_`` for ``.``.
    """

    prefix: str
    pair: str  # a key of _PAIRS

    @property
    def flat(self) -> bool:
        return self.prefix in _FLAT_PREFIXES

    def base(self, module: str) -> str:
        return self.prefix + (module.replace(".", "_") if self.flat else module)

    def describe(self) -> str:
        return f"{self.prefix}<module>.{_PAIRS[self.pair][0]}"

    def to_json(self) -> list[str]:
        return [self.prefix, self.pair]


KEY_STYLES = {
    "diffusers": KeyStyle("transformer.", "A/B"),  # diffusers / peft pipelines; this project's archives
    "kohya": KeyStyle("lora_unet_", "down/up"),  # kohya sd-scripts, musubi-tuner
    "lycoris": KeyStyle("lycoris_", "down/up"),  # LyCORIS LoCon, SimpleTuner
    "comfyui": KeyStyle("diffusion_model.", "down/up"),  # ComfyUI's trainer
    "comfyui-ab": KeyStyle("diffusion_model.", "A/B"),  # diffusion_model.… with lora_A/lora_B
    "lightning": KeyStyle("", "down/up"),  # bare transformer_blocks.… + alpha (Qwen-Image-Lightning)
    "peft-default": KeyStyle("", "A/B.default"),  # bare ….lora_A.default.weight (DiffSynth-Studio, raw peft)
    "peft": KeyStyle("", "A/B"),  # bare ….lora_A.weight (peft / diffusers save_lora_adapter)
}
DIFFUSERS = KEY_STYLES["diffusers"]


@dataclass
class ParsedLora:
    """A LoRA in one form: dotted transformer module -> (lora_A / down, lora_B / up, alpha or None)."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]
    style: KeyStyle
    alpha_from_header: bool = False  # alphas came from diffusers' lora_adapter_metadata header
    recorded_style: KeyStyle | None = None  # what `convert` recorded: the style this file was converted from
    recorded_alphas: dict[str, float | None] | None = None

    @property
    def style_name(self) -> str:
        return next((n for n, st in KEY_STYLES.items() if st == self.style), self.style.describe())


def _unsupported(state_dict: dict, where: str) -> None:
    found: dict[str, list[str]] = {}
    for key in state_dict:
        for pattern, kind in _UNSUPPORTED:
            if pattern.search(key):
                found.setdefault(kind, []).append(key)
                break
    if found:
        kinds = ", ".join(found)
        example = next(iter(found.values()))[0]
        raise LoraError(
            f"{where}: {kinds} weights ({sum(map(len, found.values()))} keys, e.g. {example!r}) are not a LoRA "
            "(lora_A/lora_B or lora_down/lora_up pairs) and cannot be converted; ComfyUI's LoRA loader applies the "
            "file as it is (Apply Qwen LoRA (file))"
        )


@functools.lru_cache(maxsize=4096)
def _flat_to_module(flat: str) -> str | None:
    """kohya/LyCORIS flat module name -> dotted module, as diffusers' Qwen-Image converter maps it."""
    from diffusers import QwenImagePipeline

    z = torch.zeros(1, 1)
    try:
        out = QwenImagePipeline.lora_state_dict({f"lora_unet_{flat}.lora_down.weight": z,
                                                 f"lora_unet_{flat}.lora_up.weight": z})
    except ValueError:  # the converter leaves names it cannot map behind and says so
        return None
    module = next(k for k in out if k.endswith(".lora_A.weight")).removeprefix("transformer.").removesuffix(".lora_A.weight")
    return module if module.replace(".", "_") == flat else None


def parse_lora(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
               where: str = "LoRA") -> ParsedLora:
    """Any supported key style (see :data:`KEY_STYLES`) -> :class:`ParsedLora`; one :class:`LoraError` otherwise.

    Per-module ``alpha`` keys give the alpha; diffusers' ``lora_adapter_metadata`` header (how its dreambooth
    script stores ``--lora_alpha``) gives it for modules without one.
    """
    _unsupported(state_dict, where)
    styles: set[tuple[str, str]] = set()
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = _KEY.match(key)
        if m is None or (m["prefix"] in _FLAT_PREFIXES and "." in m["module"]):
            raise LoraError(
                f"{where}: {key!r} is not a Qwen-Image LoRA key (expected e.g. transformer.<module>.lora_A.weight, "
                "lora_unet_<module>.lora_down.weight, lycoris_<module>.lora_down.weight, "
                "<module>.lora_A.default.weight or <module>.lora_down.weight, with <module>.alpha)"
            )
        prefix, what = m["prefix"] or "", m["what"]
        if what != "alpha":
            styles.add((prefix, "down/up" if "down" in what or "up" in what else
                        "A/B.default" if ".default." in what else "A/B"))
        side = "alpha" if what == "alpha" else "down" if what.startswith(("lora_A", "lora_down")) else "up"
        parts.setdefault(f"{prefix}\0{m['module']}", {})[side] = value
    if not styles:
        raise LoraError(f"{where}: holds no lora_A/lora_B (or lora_down/lora_up) tensors")
    if len(styles) > 1:
        shown = sorted(KeyStyle(*st).describe() for st in styles)
        raise LoraError(f"{where}: mixes LoRA key styles ({', '.join(shown)}); convert files of one style")
    style = KeyStyle(*styles.pop())
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]] = {}
    for tag, p in parts.items():
        prefix, raw = tag.split("\0")
        if "down" not in p or "up" not in p:
            missing = "lora_A/lora_down" if "down" not in p else "lora_B/lora_up"
            raise LoraError(f"{where}: module {prefix + raw!r} has no {missing} weight")
        module = _flat_to_module(raw) if style.flat else raw
        if module is None:
            raise LoraError(f"{where}: {prefix + raw!r} does not name a Qwen-Image transformer module "
                            "(diffusers' Qwen-Image converter cannot map it)")
        down, up = p["down"], p["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraError(f"{where}: module {prefix + raw!r}: lora down {tuple(down.shape)} and up "
                            f"{tuple(up.shape)} are not a low-rank pair")
        alpha = float(p["alpha"]) if "alpha" in p else None
        modules[module] = (down, up, alpha)
    parsed = ParsedLora(modules, style)
    header = header_alphas(metadata, [(m, d.shape[0]) for m, (d, _, a) in modules.items() if a is None], where)
    if header:
        parsed.alpha_from_header = True
        for m, a in header.items():
            down, up, _ = modules[m]
            modules[m] = (down, up, a)
    raw_record = (metadata or {}).get(SOURCE_METADATA_KEY)
    if raw_record:
        try:
            record = json.loads(raw_record)
            parsed.recorded_style = KeyStyle(*record["style"])
            if parsed.recorded_style.pair not in _PAIRS:
                raise KeyError(parsed.recorded_style.pair)
            alphas = record.get("alpha")
            parsed.recorded_alphas = alphas if isinstance(alphas, dict) else {m: alphas for m in modules}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LoraError(f"{where}: header {SOURCE_METADATA_KEY} is not what `convert` writes ({e})") from e
    return parsed


def header_alphas(metadata: dict[str, str] | None, modules: list[tuple[str, int]],
                  where: str = "LoRA") -> dict[str, float]:
    """Per-module alpha from diffusers' ``lora_adapter_metadata`` safetensors header, for ``(module, rank)`` pairs.

    diffusers' ``save_lora_weights`` stores the adapter's ``LoraConfig`` there (prefixed ``transformer.`` by the
    pipelines); peft then scales by ``lora_alpha / r`` (``alpha_pattern`` per module, ``lora_alpha / sqrt(r)``
    with ``use_rslora``). Returned as the alpha that gives that scale with ``alpha / rank``. Empty without one.
    """
    raw = (metadata or {}).get(HEADER_METADATA_KEY)
    if not raw or not modules:
        return {}
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraError(f"{where}: header {HEADER_METADATA_KEY} is not JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise LoraError(f"{where}: header {HEADER_METADATA_KEY} is not a JSON object")
    if any(k.startswith("transformer.") for k in cfg):  # a pipeline's file: the transformer's entries
        cfg = {k.removeprefix("transformer."): v for k, v in cfg.items() if k.startswith("transformer.")}
    if cfg.get("lora_alpha") is None:
        return {}
    from peft.utils.other import get_pattern_key

    pattern = cfg.get("alpha_pattern") or {}
    out = {}
    for module, rank in modules:
        alpha = float(pattern.get(get_pattern_key(pattern.keys(), module), cfg["lora_alpha"]))
        out[module] = alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha
    return out


def header_alpha_tensors(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None,
                         where: str = "LoRA") -> dict[str, torch.Tensor]:
    """``<module>.alpha`` tensors, in the file's own key style, for the alpha in a diffusers header.

    For loaders that read per-module alpha keys but not the header (ComfyUI): adding these makes them apply
    ``alpha / rank`` as peft would. Modules that already have an alpha key are left alone.
    """
    if not (metadata or {}).get(HEADER_METADATA_KEY):
        return {}
    try:
        parsed = parse_lora(state_dict, metadata, where)
    except LoraError as e:  # not LoRA pairs (LoKr, ...): the loader handles those files and their alphas itself
        logger.debug("%s: header alpha not applied: %s", where, e)
        return {}
    if not parsed.alpha_from_header:
        return {}
    return {f"{parsed.style.base(m)}.alpha": torch.tensor(a) for m, (_, _, a) in parsed.modules.items()
            if f"{parsed.style.base(m)}.alpha" not in state_dict}


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    return t if scale == 1.0 else (t.float() * scale).to(t.dtype)


def write_lora(parsed: ParsedLora, style: KeyStyle, alpha: float | dict[str, float | None] | None = None,
               ) -> dict[str, torch.Tensor]:
    """``parsed`` in ``style`` with the same effective update ``up @ down * alpha / rank`` for every module.

    Styles with lora_A/lora_B keys carry no alpha: it is folded into lora_B (what diffusers, ComfyUI and kohya
    tools all assume without one). lora_down/lora_up styles get an ``alpha`` key: ``alpha`` if given (one value, or
    per module, None meaning no alpha key), else the module's own alpha, else its rank.
    """
    down_name, up_name = _PAIRS[style.pair]
    out: dict[str, torch.Tensor] = {}
    for module, (down, up, own) in parsed.modules.items():
        rank = down.shape[0]
        scale = (own if own is not None else rank) / rank
        base = style.base(module)
        if style.pair != "down/up":
            out[f"{base}.{down_name}"], out[f"{base}.{up_name}"] = down, _scaled(up, scale)
            continue
        target = alpha.get(module, own) if isinstance(alpha, dict) else alpha if alpha is not None else own
        keep_key = target is not None or not isinstance(alpha, dict)
        target = float(target if target is not None else rank)
        out[f"{base}.{down_name}"], out[f"{base}.{up_name}"] = down, _scaled(up, scale * rank / target)
        if keep_key:
            out[f"{base}.alpha"] = torch.tensor(target)
    return out


def source_record(parsed: ParsedLora) -> str:
    """What `convert` writes into a diffusers file's header so converting it back restores the source's keys."""
    alphas = {m: a for m, (_, _, a) in parsed.modules.items()}
    uniform = len(set(alphas.values())) == 1
    return json.dumps({"style": parsed.style.to_json(), "alpha": next(iter(alphas.values())) if uniform else alphas})


def to_diffusers(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 where: str = "LoRA") -> dict[str, torch.Tensor]:
    """Any supported LoRA -> diffusers keys (``transformer.<module>.lora_A/B.weight``), alpha folded into lora_B."""
    return write_lora(parse_lora(state_dict, metadata, where), DIFFUSERS)


def diffusers_to_kohya(state_dict: dict[str, torch.Tensor], alpha: float | None = None) -> dict[str, torch.Tensor]:
    """``transformer.a.b.lora_A.weight`` -> ``lora_unet_a_b.lora_down.weight`` (+ ``.alpha``).

    The kohya file gets ``alpha = rank`` (or the source's alpha) unless ``alpha`` is given, in which case lora_up
    is divided by ``alpha / rank`` so the effective update is unchanged.
    """
    return write_lora(parse_lora(state_dict), KEY_STYLES["kohya"], alpha=alpha)


def kohya_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya (``lora_unet_…``/``lora_down``/``lora_up``/``alpha``) or any other supported style -> diffusers keys."""
    return to_diffusers(state_dict)


def effective_deltas(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                     ) -> dict[str, torch.Tensor]:
    """module -> up @ down * (alpha / rank), for comparing LoRAs across formats."""
    parsed = parse_lora(state_dict, metadata)
    return {m: (up.float() @ down.float()) * ((a if a is not None else down.shape[0]) / down.shape[0])
            for m, (down, up, a) in parsed.modules.items()}
