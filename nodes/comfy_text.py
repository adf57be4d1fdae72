"""Qwen-Image conditioning from ComfyUI's loaded text encoder, computed by this project's decoder code.

ComfyUI's text-encoder forward is written for inference: since 0.33 a layer ends with
``torch.add(residual, x, out=output)`` (autograd refuses ``out=``), its RoPE may be a comfy_kitchen kernel without
a backward, and either can change in any release. The token's gradient path therefore runs
:class:`~qwen_zero_prior.training.suffix.SuffixDecoder` over a :class:`ComfyLayerOps` view of ComfyUI's modules:
only the projections (``q/k/v/o``, ``gate/up/down``; ComfyUI's ``Linear`` layers, which cast bf16, fp16 and
fp8-scaled weights for each use) and the norms' weights are taken from ComfyUI; the arithmetic between them is
this project's. What it computes is what ``CLIPTextEncode`` computes for the same prompt (the tests compare them
on every file dtype): ComfyUI's chat template, float32 activations, the final norm, and the template prefix
dropped by ComfyUI's rule (up to the second ``<|im_start|>``, then ``user\\n``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..training.prompt import pad_batch
from ..training.suffix import DecoderParts, LayerOps, SuffixDecoder

logger = logging.getLogger(__name__)

IM_START, USER, NEWLINE = 151644, 872, 198  # ids of "<|im_start|>", "user", "\n" in Qwen's vocabulary
COMPUTE_DTYPE = torch.float32  # what ComfyUI's SDClipModel runs Qwen-Image's text encoder in


class UnsupportedTextEncoder(TypeError):
    """The CLIP's text encoder is not a decoder this module reproduces."""


def _rms(x: torch.Tensor, norm: torch.nn.Module, norms: dict | None = None) -> torch.Tensor:
    """``norm`` (ComfyUI's RMSNorm) of ``x``; its weight from ``norms`` (id(norm) -> a copy on ``x``'s device) where
    given there."""
    w = norms.get(id(norm)) if norms else None
    if w is None:
        w = norm.weight
    if getattr(norm, "add", False):  # Gemma-style (1 + w); not used by Qwen, kept to read ComfyUI's RMSNorm right
        w = w + 1.0
    return F.rms_norm(x, (x.shape[-1],), weight=w.to(device=x.device, dtype=x.dtype), eps=norm.eps)


class ComfyLayerOps(LayerOps):
    """One layer of ComfyUI's ``comfy.text_encoders.llama`` decoder: projections called as ComfyUI modules (or, where
    given, as their :class:`~qwen_zero_prior.training.exact_linear.ExactLinear` stand-ins in ``exact``), norms and the
    SwiGLU written here (ComfyUI's own MLP may fuse them into inference-only kernels)."""

    def __init__(self, layer, exact: dict | None = None, norms: dict | None = None):
        self.layer = layer
        self.attn = layer.self_attn
        self.has_head_norm = getattr(self.attn, "q_norm", None) is not None
        self.exact = exact or {}
        self.norms = norms

    def _proj(self, module, x):
        fast = self.exact.get(id(module))
        return fast(x) if fast is not None else module(x)

    def ln1(self, h):
        return _rms(h, self.layer.input_layernorm, self.norms)

    def qkv(self, x):
        a = self.attn
        if getattr(a, "qkv_proj", None) is not None:  # merged projection (quantized checkpoints, newer ComfyUI)
            return self._proj(a.qkv_proj, x).split((a.inner_size, a.kv_size, a.kv_size), dim=-1)
        return self._proj(a.q_proj, x), self._proj(a.k_proj, x), self._proj(a.v_proj, x)

    def head_norm(self, q, k):
        if not self.has_head_norm:
            return q, k
        return _rms(q, self.attn.q_norm, self.norms), _rms(k, self.attn.k_norm, self.norms)

    def o(self, x):
        return self._proj(self.attn.o_proj, x)

    def ln2(self, h):
        return _rms(h, self.layer.post_attention_layernorm, self.norms)

    def mlp(self, x):
        m = self.layer.mlp
        if getattr(m, "gate_up_proj", None) is not None:
            gate, up = self._proj(m.gate_up_proj, x).chunk(2, dim=-1)
        else:
            gate, up = self._proj(m.gate_proj, x), self._proj(m.up_proj, x)
        return self._proj(m.down_proj, F.silu(gate) * up)


PROJECTIONS = ("self_attn.qkv_proj", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_up_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _e4m3_data(module):
    """The e4m3 values ``module`` (a ComfyUI ``Linear``) multiplies with before its per-tensor scale, or None: the
    stored weight of 0.3.64's scaled-fp8 layers (``scale_weight``), the data of 0.33's ``QuantizedTensor``."""
    plain = _per_tensor_fp8(module.weight)
    if plain is not None:
        return plain[0]
    w = module.weight
    if w.dtype == torch.float8_e4m3fn and getattr(module, "scale_weight", None) is not None:
        return w
    return None


def exact_bytes(module, bf16: bool = False) -> int:
    """Bytes of the weight copy :func:`_exact_projection` keeps for ``module``."""
    return module.weight.numel() * (1 if not bf16 and _e4m3_data(module) is not None else 2)


def _exact_projection(module, device: torch.device, bf16: bool = False):
    """An :class:`ExactLinear` computing what ``module`` (a ComfyUI ``Linear`` of the text encoder, any storage)
    computes in float32, or the reason there is none. The weight ComfyUI multiplies with is taken from its own cast
    (``comfy.ops.cast_bias_weight``; 0.3.64's scaled-fp8 layers scale the input by ``scale_weight`` instead), kept
    in bf16 when that is exact, or as its e4m3 data (a copy: ComfyUI may move or free its own) unless ``bf16``, and
    the result is checked against ``module`` on a probe input."""
    import comfy.ops

    from ..training.exact_linear import ExactLinear

    if getattr(module, "weight_function", None) or getattr(module, "bias_function", None):
        return None, "weight patches applied per use"
    k = module.weight.shape[1]
    probe = torch.randn(4, k, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.no_grad():
            out = comfy.ops.cast_bias_weight(module, probe)
            weight, bias = out[0], out[1]
            scale = getattr(module, "scale_weight", None)
            plain = _per_tensor_fp8(module.weight)
            if plain is not None:  # ComfyUI >= 0.33's QuantizedTensor (e4m3 data x one float32 scale): the scale
                weight, scale = plain  # moves onto the input, the e4m3 data is exact in bf16
            w16 = weight.to(torch.bfloat16)
            if not torch.equal(w16.float(), weight.float()):
                return None, f"its {weight.dtype} weight is not exactly bf16"
            data = None if bf16 else _e4m3_data(module)
            if data is not None and torch.equal(data.to(device=w16.device, dtype=torch.bfloat16), w16):
                w16 = data.detach().to(w16.device).clone()  # kept in e4m3 (half the memory), cast for each use
            fast = ExactLinear(w16, None if bias is None else bias.detach().float(),
                               None if scale is None else scale.detach().float())
            ref, got = module(probe).float(), fast(probe)
    except (RuntimeError, TypeError, AttributeError, NotImplementedError) as e:
        return None, f"{type(e).__name__}: {e}"
    err, size = float((got - ref).abs().max()), float(ref.abs().max())
    if not err <= 1e-5 * max(size, 1e-12):
        return None, f"its output differs from ComfyUI's by {err:.2e} (of {size:.2e})"
    return fast, None


def _per_tensor_fp8(weight):
    """``(e4m3 data, float32 scalar scale)`` of a comfy_kitchen ``QuantizedTensor`` in a per-tensor fp8 layout (what
    ComfyUI >= 0.33 loads ``*_fp8_scaled`` files as), else None."""
    data, params = getattr(weight, "_qdata", None), getattr(weight, "_params", None)
    scale = getattr(params, "scale", None)
    if (isinstance(data, torch.Tensor) and data.dtype == torch.float8_e4m3fn and tuple(data.shape) == tuple(weight.shape)
            and isinstance(scale, torch.Tensor) and scale.numel() == 1):
        return data, scale.float()
    return None


EXACT_TEXT_ENV = "QWEN_ZERO_PRIOR_EXACT_TEXT"
_OFF, _ON = ("0", "false", "no"), ("", "auto", "1", "true", "yes", "bf16", "e4m3")


def exact_text_choice(value: str, *, device_type: str, engine_reserve: int | None, available: float | None,
                      needs: dict[str, int], offloaded: bool = False) -> tuple[str | None, str | None]:
    """``("bf16" | "e4m3", None)``: the weight copies the text encoder's exact projections keep, or ``(None, why)``
    for ComfyUI's projections, for ``QWEN_ZERO_PRIOR_EXACT_TEXT=value``. ``engine_reserve``: what the diffusers
    engine's step needs beside the weights (None: no engine, or blocks recomputed, whose plan fills the card: no
    copies on a GPU then); ``available``: bytes free beside the weights on a GPU (None on a CPU); ``needs``: the
    copies' bytes per storage. Unset/``auto``: on a GPU only (a CPU computes float32 faster than three bf16 parts),
    bf16 where it fits, else e4m3; ``1``: also on a CPU; ``bf16``/``e4m3``: that storage; ``0``: never. Raises
    ValueError for any other value.

    ``offloaded`` (the engine streams the DiT's blocks: a 24 GB card): the copies stay in CPU memory and are streamed
    for each use (:class:`~qwen_zero_prior.training.exact_linear.StreamedExactLinear`), so the projections then hold
    no GPU memory: ``"e4m3"`` (the fewest bytes to copy; bf16 where the file's weights are not e4m3) unless
    ``bf16`` is asked for; auto on a GPU only, as above; ``available`` and ``engine_reserve`` play no part."""
    v = value.strip().lower()
    if v in _OFF:
        return None, f"{EXACT_TEXT_ENV}={value}"
    if v not in _ON:
        raise ValueError(f"{EXACT_TEXT_ENV}={value!r} is not auto, 1/true/yes, bf16, e4m3 or 0/false/no")
    if offloaded:
        if v in ("", "auto") and device_type != "cuda":
            return None, f"auto uses them on a GPU only (this is {device_type})"
        return ("bf16" if v == "bf16" else "e4m3"), None
    if device_type == "cuda":
        if engine_reserve is None:
            return None, ("the copies are used with the diffusers DiT engine only, where it trains resident (else "
                          "the step's memory plan fills the card: ComfyUI's forward, or the engine offloaded)")
    elif v in ("", "auto"):
        return None, f"auto uses them on a GPU only (this is {device_type})"
    choices = [v] if v in ("bf16", "e4m3") else ["bf16", "e4m3"]
    if available is not None:
        fitting = [c for c in choices if needs[c] <= available]
        if not fitting:
            return None, (f"the copies need {min(needs[c] for c in choices) / 2**30:.1f} GiB, "
                          f"{max(available, 0) / 2**30:.1f} GiB available beside the step")
        choices = fitting
    return choices[0], None


def projection_modules(model):
    """``(layer index, name, module)`` of every projection ``Linear`` of ``model``'s decoder layers."""
    for i, layer in enumerate(model.layers):
        for name in PROJECTIONS:
            try:
                yield i, name, layer.get_submodule(name)
            except AttributeError:  # the merged or the separate form: one of them is there
                continue


def exact_projections(model, device: torch.device, bf16: bool = False, stream: bool = False) -> tuple[dict, str | None]:
    """``{id(ComfyUI module): ExactLinear}`` for every projection of ``model``'s decoder layers, or ``({}, why)``
    where any one has none (all or nothing: one projection left to ComfyUI's per-use cast would keep its casts for
    the backward, and the layers would need recomputing again). ``bf16``: bf16 copies even of e4m3 data.
    ``stream``: :class:`StreamedExactLinear` instead, their copies in CPU memory (made one at a time, so the GPU holds
    at most one projection's copy beside ComfyUI's weights)."""
    from ..training.exact_linear import StreamedExactLinear
    from ..training.pinned import PinnedPack

    pinned = PinnedPack() if stream and torch.device(device).type == "cuda" else None
    out = {}
    for i, name, module in projection_modules(model):
        fast, why = _exact_projection(module, device, bf16)
        if fast is None:
            return {}, f"layer {i} {name}: {why}"
        out[id(module)] = StreamedExactLinear.from_exact(fast, device, pinned) if stream else fast
    if pinned is not None:
        logger.info("text encoder: %.2f GiB of pinned CPU memory hold the streamed projections",
                    pinned.held_bytes / 2**30)
    return out, None


def qwen_decoder(clip):
    """ComfyUI's ``Llama2_`` decoder inside a Qwen-Image CLIP."""
    te = clip.cond_stage_model
    inner = getattr(te, "qwen25_7b", None)
    model = getattr(getattr(inner, "transformer", None), "model", None)
    if model is None or not hasattr(model, "layers"):
        raise UnsupportedTextEncoder(
            f"this CLIP's text encoder ({type(te).__name__}) is not Qwen-Image's Qwen2.5-VL; load it with CLIPLoader, "
            "type 'qwen_image'"
        )
    return model


def norm_copies(model, device: torch.device) -> dict:
    """``{id(norm): float32 copy of its weight on device}`` for every RMSNorm of ``model`` (ComfyUI's ``Llama2_``) the
    decoder uses: taken before ComfyUI unloads the encoder (the projections streamed), so a step reads them on the
    device, as ComfyUI had them loaded (with any weight patches applied)."""
    found = [model.norm] + [n for layer in model.layers for n in (
        layer.input_layernorm, layer.post_attention_layernorm, getattr(layer.self_attn, "q_norm", None),
        getattr(layer.self_attn, "k_norm", None)) if n is not None]
    return {id(n): n.weight.detach().to(device, torch.float32, copy=True) for n in found}


def comfy_parts(model, exact: dict | None = None, norms: dict | None = None) -> DecoderParts:
    """:class:`DecoderParts` over ComfyUI's ``Llama2_`` (Qwen2.5-VL's language model as ComfyUI builds it).
    ``norms``: :func:`norm_copies` to use instead of the norms' own weights."""
    cfg = model.config
    problems = []
    if getattr(cfg, "transformer_type", "llama") != "llama":
        problems.append(f"transformer_type {cfg.transformer_type!r}")
    if getattr(cfg, "mlp_activation", "silu") != "silu":
        problems.append(f"mlp_activation {cfg.mlp_activation!r}")
    if getattr(model, "norm", None) is None:
        problems.append("no final norm")
    if getattr(cfg, "sliding_attention", None):
        problems.append("sliding-window attention")
    if problems:
        raise UnsupportedTextEncoder(f"ComfyUI text encoder {type(model).__name__} differs from Qwen2.5-VL: "
                                     + ", ".join(problems))
    head_dim = cfg.head_dim
    theta = cfg.rope_theta[0] if isinstance(cfg.rope_theta, (list, tuple)) else cfg.rope_theta
    inv_freq = 1.0 / (float(theta) ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    scale = getattr(cfg, "rope_scale", None)
    if scale is not None:
        inv_freq = inv_freq / float(scale[0] if isinstance(scale, (list, tuple)) else scale)
    return DecoderParts([ComfyLayerOps(layer, exact, norms) for layer in model.layers],
                        lambda h: _rms(h, model.norm, norms),
                        n_heads=cfg.num_attention_heads, n_kv=cfg.num_key_value_heads, head_dim=head_dim,
                        inv_freq=inv_freq)


def template_end(ids: list[int]) -> int:
    """Where Qwen-Image's conditioning starts in ComfyUI's token list: at the second ``<|im_start|>``, moved past
    ``user\\n`` when it follows (``QwenImageTEModel.encode_token_weights``' rule)."""
    end, seen = -1, 0
    for i, t in enumerate(ids):
        if t == IM_START and seen < 2:
            end, seen = i, seen + 1
    if len(ids) > end + 3 and ids[end + 1] == USER and ids[end + 2] == NEWLINE:
        end += 3
    return max(end, 0)


class ComfyPromptEncoder:
    """Qwen-Image conditioning for training from a ComfyUI CLIP, differentiable w.r.t. the placeholder vectors.

    ``tokenizer``: ComfyUI's Qwen-Image tokenizer with the placeholders registered; ``vectors``: each
    placeholder's id in it -> its trainable float32 vector (or, for one token, ``token_id`` and ``vector``). Text
    before the first placeholder is encoded once per caption (causal prefix cache). ``exact`` (True, or a map from
    :func:`exact_projections` made once and reused) computes the projections as ``ExactLinear`` (no per-layer
    recompute); ``cuda_graphs`` then replays the per-step suffix as CUDA graphs. Without ``exact`` there are no
    graphs: ComfyUI's layers may stream and cast weights with host-side logic that graph capture cannot replay
    (dynamic VRAM). ``capture_guard``: a context around the graphs' capture (``SuffixDecoder``).
    """

    def __init__(self, clip, tokenizer, device: torch.device, token_id: int | None = None,
                 vector: torch.nn.Parameter | None = None, *, vectors: dict[int, torch.nn.Parameter] | None = None,
                 prefix_cache: bool = True, cuda_graphs: bool = False, compile: bool = False,
                 exact: bool | dict = False, norms: dict | None = None, capture_guard=None):
        self.tokenizer = tokenizer
        self.model = qwen_decoder(clip)
        self.embed_tokens = self.model.embed_tokens
        self.device = torch.device(device)
        self.vectors: dict[int, torch.nn.Parameter] = dict(vectors or {})
        if vector is not None:
            self.vectors[int(token_id)] = vector
        self.prefix_cache = prefix_cache
        # exact: the projections as ExactLinear (training/exact_linear.py): ComfyUI's float32 numbers from bf16 or
        # e4m3 copies of its weights, nothing kept for the backward, graph-capturable
        if isinstance(exact, dict):
            self.exact, why = exact, "none given"
        else:
            self.exact, why = exact_projections(self.model, self.device) if exact else ({}, None)
        if exact is True:
            logger.info("text encoder: %s", f"exact bf16-split projections on {len(self.exact)} layers' Linears"
                        if self.exact else f"ComfyUI's projections (no exact form: {why})")
        from ..training.exact_linear import StreamedExactLinear

        # streamed projections (the DiT offloaded): ComfyUI has unloaded the decoder, whose norms and embedding table
        # are then in CPU memory: the norms are read from copies on the device (``norms``, taken before the unload;
        # else made here), the embedding's rows looked up where the table is and kept on the device (_embed)
        streamed = any(isinstance(e, StreamedExactLinear) for e in self.exact.values())
        self._table_away = streamed or self.model.norm.weight.device != self.device
        if norms is None and self._table_away:
            norms = norm_copies(self.model, self.device)
        # recompute: ComfyUI's layers cast their weights to float32 for each use, and autograd would keep every
        # cast until the backward (28 GB for the 7B encoder); per-layer recompute keeps one layer's at a time.
        # No CUDA graphs around streamed weights: their fetches are host-side logic (the prefetcher's ring)
        self.suffix = SuffixDecoder(comfy_parts(self.model, self.exact, norms),
                                    compile=compile, cuda_graphs=cuda_graphs and bool(self.exact) and not streamed,
                                    recompute=not self.exact, capture_guard=capture_guard)
        self._prefix: dict[str, tuple] = {}
        self._fixed: dict[str, torch.Tensor] = {}
        self._rows: dict[tuple, torch.Tensor] = {}  # per-step ids -> their embedding rows on the device (_embed)

    def ids(self, caption: str) -> list[int]:
        tokens = self.tokenizer.tokenize_with_weights(caption)
        pairs = next(iter(tokens.values()))
        return [int(entry[0]) for batch in pairs for entry in batch]

    def _embed(self, ids: list[int], per_step: bool = False) -> torch.Tensor:
        """(1, n, dim) float32 input embeddings, each placeholder's rows replaced by its vector. ``per_step``: ids
        embedded at every step (a suffix), whose rows are kept on the device where the table is elsewhere."""
        t = torch.tensor([ids]).to(self.device, non_blocking=True)
        table = self.embed_tokens.weight.device
        if not self._table_away:
            out = self.embed_tokens(t).to(COMPUTE_DTYPE)
        else:  # ComfyUI unloaded the text encoder (its projections streamed): rows looked up where the table is
            out = self._rows.get(tuple(ids)) if per_step else None
            if out is None:
                with torch.no_grad():
                    out = self.embed_tokens(torch.tensor([ids], device=table)).to(COMPUTE_DTYPE)
                if self.device.type == "cuda" and out.device.type == "cpu":
                    out = out.pin_memory()  # an asynchronous copy: no wait for the GPU in the step
                out = out.to(self.device, non_blocking=True)
                if per_step:  # (a prefix or a vector-free caption is embedded once: not kept)
                    self._rows[tuple(ids)] = out
        for token_id, vector in self.vectors.items():
            if token_id in ids:
                mask = (t == token_id).unsqueeze(-1)
                out = torch.where(mask, vector.to(out.dtype), out)
        return out

    def encode_one(self, caption: str) -> torch.Tensor:
        """(seq, dim) float32 conditioning of one caption; carries the vectors' gradients where they appear."""
        entry = self._prefix.get(caption)
        if entry is None:
            fixed = self._fixed.get(caption)
            if fixed is not None:
                return fixed.to(self.device, non_blocking=True)
            ids = self.ids(caption)
            drop = template_end(ids)
            first = None
            if self.vectors:
                first = next((i for i, t in enumerate(ids) if t in self.vectors and i >= drop), None)
            if first is None or not self.prefix_cache:
                if first is None:  # the conditioning does not depend on any vector: compute it once
                    with torch.no_grad():
                        _, _, hidden = self.suffix.prefix(self._embed(ids))
                    self._fixed[caption] = hidden[0, drop:].cpu()
                    return hidden[0, drop:]
                return self.suffix.full(self._embed(ids, per_step=True))[0, drop:]
            with torch.no_grad():
                keys, values, hidden = self.suffix.prefix(self._embed(ids[:first]))
            entry = (keys, values, hidden[0, drop:], ids[first:])
            self._prefix[caption] = entry
        keys, values, prefix_hidden, suffix_ids = entry
        out = self.suffix.suffix(self._embed(suffix_ids, per_step=True), keys, values)
        return torch.cat([prefix_hidden, out[0]], dim=0)

    def encode(self, captions: list[str], dtype: torch.dtype, device: torch.device):
        """(batch, seq, dim) on ``device`` in ``dtype`` and the host (batch, seq) long mask, zero-padded."""
        self.suffix.new_batch()
        hs = [self.encode_one(c) for c in captions]
        embeds, mask = pad_batch(hs)
        return embeds.to(device=device, dtype=dtype), mask


__all__ = ["EXACT_TEXT_ENV", "ComfyLayerOps", "ComfyPromptEncoder", "UnsupportedTextEncoder", "comfy_parts",
           "exact_bytes", "exact_projections", "exact_text_choice", "norm_copies", "projection_modules", "qwen_decoder",
           "template_end"]
