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


def _rms(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    w = norm.weight
    if getattr(norm, "add", False):  # Gemma-style (1 + w); not used by Qwen, kept to read ComfyUI's RMSNorm right
        w = w + 1.0
    return F.rms_norm(x, (x.shape[-1],), weight=w.to(device=x.device, dtype=x.dtype), eps=norm.eps)


class ComfyLayerOps(LayerOps):
    """One layer of ComfyUI's ``comfy.text_encoders.llama`` decoder: projections called as ComfyUI modules,
    norms and the SwiGLU written here (ComfyUI's own MLP may fuse them into inference-only kernels)."""

    def __init__(self, layer):
        self.layer = layer
        self.attn = layer.self_attn
        self.has_head_norm = getattr(self.attn, "q_norm", None) is not None

    def ln1(self, h):
        return _rms(h, self.layer.input_layernorm)

    def qkv(self, x):
        a = self.attn
        if getattr(a, "qkv_proj", None) is not None:  # merged projection (quantized checkpoints, newer ComfyUI)
            return a.qkv_proj(x).split((a.inner_size, a.kv_size, a.kv_size), dim=-1)
        return a.q_proj(x), a.k_proj(x), a.v_proj(x)

    def head_norm(self, q, k):
        if not self.has_head_norm:
            return q, k
        return _rms(q, self.attn.q_norm), _rms(k, self.attn.k_norm)

    def o(self, x):
        return self.attn.o_proj(x)

    def ln2(self, h):
        return _rms(h, self.layer.post_attention_layernorm)

    def mlp(self, x):
        m = self.layer.mlp
        if getattr(m, "gate_up_proj", None) is not None:
            gate, up = m.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = m.gate_proj(x), m.up_proj(x)
        return m.down_proj(F.silu(gate) * up)


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


def comfy_parts(model) -> DecoderParts:
    """:class:`DecoderParts` over ComfyUI's ``Llama2_`` (Qwen2.5-VL's language model as ComfyUI builds it)."""
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
    return DecoderParts([ComfyLayerOps(layer) for layer in model.layers], lambda h: _rms(h, model.norm),
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
    before the first placeholder is encoded once per caption (causal prefix cache). ``cuda_graphs`` is off by
    default here: ComfyUI's layers may stream and cast weights with host-side logic that graph capture cannot
    replay (dynamic VRAM).
    """

    def __init__(self, clip, tokenizer, device: torch.device, token_id: int | None = None,
                 vector: torch.nn.Parameter | None = None, *, vectors: dict[int, torch.nn.Parameter] | None = None,
                 prefix_cache: bool = True, cuda_graphs: bool = False, compile: bool = False):
        self.tokenizer = tokenizer
        self.model = qwen_decoder(clip)
        self.embed_tokens = self.model.embed_tokens
        self.device = torch.device(device)
        self.vectors: dict[int, torch.nn.Parameter] = dict(vectors or {})
        if vector is not None:
            self.vectors[int(token_id)] = vector
        self.prefix_cache = prefix_cache
        # recompute: ComfyUI's layers cast their weights to float32 for each use, and autograd would keep every
        # cast until the backward (28 GB for the 7B encoder); per-layer recompute keeps one layer's at a time
        self.suffix = SuffixDecoder(comfy_parts(self.model), cuda_graphs=cuda_graphs, compile=compile,
                                    recompute=True)
        self._prefix: dict[str, tuple] = {}
        self._fixed: dict[str, torch.Tensor] = {}

    def ids(self, caption: str) -> list[int]:
        tokens = self.tokenizer.tokenize_with_weights(caption)
        pairs = next(iter(tokens.values()))
        return [int(entry[0]) for batch in pairs for entry in batch]

    def _embed(self, ids: list[int]) -> torch.Tensor:
        """(1, n, dim) float32 input embeddings, each placeholder's rows replaced by its vector."""
        t = torch.tensor([ids]).to(self.device, non_blocking=True)
        out = self.embed_tokens(t).to(COMPUTE_DTYPE)
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
                return self.suffix.full(self._embed(ids))[0, drop:]
            with torch.no_grad():
                keys, values, hidden = self.suffix.prefix(self._embed(ids[:first]))
            entry = (keys, values, hidden[0, drop:], ids[first:])
            self._prefix[caption] = entry
        keys, values, prefix_hidden, suffix_ids = entry
        out = self.suffix.suffix(self._embed(suffix_ids), keys, values)
        return torch.cat([prefix_hidden, out[0]], dim=0)

    def encode(self, captions: list[str], dtype: torch.dtype, device: torch.device):
        """(batch, seq, dim) on ``device`` in ``dtype`` and the host (batch, seq) long mask, zero-padded."""
        self.suffix.new_batch()
        hs = [self.encode_one(c) for c in captions]
        embeds, mask = pad_batch(hs)
        return embeds.to(device=device, dtype=dtype), mask


__all__ = ["ComfyLayerOps", "ComfyPromptEncoder", "UnsupportedTextEncoder", "comfy_parts", "qwen_decoder",
           "template_end"]
