"""The text encoder's per-step work as one static-shape function, so CUDA graphs can replay it.

With token training, every step runs the frozen Qwen2.5-VL decoder over the caption from its first placeholder
on (the prefix before it is cached, see ``prompt.py``) and back-propagates to the token's vector. That is ~100
tokens through 28 layers: a few milliseconds of GPU work issued as ~2,700 small kernel launches, so on a fast
GPU the host, not the GPU, sets its time (measured 74-113 ms wall vs 16 ms of device time on an H200).

:class:`SuffixDecoder` computes exactly what the decoder computes for those positions, from plain tensors:
the prefix's keys/values (post-rotary) per layer, the suffix's input embeddings, an explicit attention mask
and rotary tables. Shapes are padded to buckets (causal attention makes end padding exact; padded prefix keys
are masked out), so one CUDA graph per (prefix, suffix) bucket is captured with
``torch.cuda.make_graphed_callables`` and replayed each step: forward and backward become two graph launches.

Why not transformers' own forward: it threads a Python ``DynamicCache`` object through the layers (copied each
step so the suffix keys do not leak into the cached prefix), which graph capture cannot reuse. Only
attention-with-prefix and the rotary tables are written here; the rest is called through :class:`LayerOps`, a
small view of one decoder layer (norms, projections, MLP). :func:`hf_parts` gives that view over transformers'
modules (called as they are); the ComfyUI backend gives one over ComfyUI's loaded text encoder, so the token's
gradient path through a ComfyUI model runs this code rather than ComfyUI's forward, which is not written for
autograd. Text-only Qwen2.5-VL positions are equal in its three m-RoPE sections, so its rotary reduces to plain
1-D RoPE over the decoder's ``inv_freq``. The tests compare against the pipeline's ``_get_qwen_prompt_embeds``
and against ComfyUI's ``CLIPTextEncode``.

Qwen3-VL (Qwen-Image 2.1's text encoder) is the same decoder plus an RMSNorm over each head's queries and keys
before the rotary (:meth:`LayerOps.head_norm`) and interleaved m-RoPE, which for text-only positions (equal in all
three sections) is the same 1-D RoPE. 2.1 conditions on the last layer's output *before* the final norm:
``final_norm=False``. ``prefix(..., past_k, past_v)`` extends a cached prefix (2.1's constant system turn).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F

from . import graphs

logger = logging.getLogger(__name__)


def _ceil_to(n: int, k: int) -> int:
    return max(k, int(math.ceil(n / k)) * k)


class LayerOps:
    """One decoder layer as the calls :class:`SuffixDecoder` makes: pre-attention norm, q/k/v projections,
    optional per-head q/k norms (Qwen3), output projection, pre-MLP norm, MLP. This base class calls
    transformers' modules as they are."""

    def __init__(self, layer):
        self.layer = layer
        self.attn = layer.self_attn
        q_norm, k_norm = getattr(self.attn, "q_norm", None), getattr(self.attn, "k_norm", None)
        self.has_head_norm = q_norm is not None and k_norm is not None

    def ln1(self, h: torch.Tensor) -> torch.Tensor:
        return self.layer.input_layernorm(h)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.attn.q_proj(x), self.attn.k_proj(x), self.attn.v_proj(x)

    def head_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k as (batch, heads, seq, head_dim); normed over head_dim where the model has q/k norms."""
        if not self.has_head_norm:
            return q, k
        return self.attn.q_norm(q), self.attn.k_norm(k)

    def o(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.o_proj(x)

    def ln2(self, h: torch.Tensor) -> torch.Tensor:
        return self.layer.post_attention_layernorm(h)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.mlp(x)


class DecoderParts:
    """What :class:`SuffixDecoder` needs of a causal decoder: its layers (as :class:`LayerOps`), the final norm,
    attention geometry and the 1-D rotary frequencies."""

    def __init__(self, layers: list, norm, *, n_heads: int, n_kv: int, head_dim: int, inv_freq: torch.Tensor,
                 attention_scaling: float = 1.0):
        self.layers = layers
        self.norm = norm
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.inv_freq = inv_freq
        self.attention_scaling = float(attention_scaling)


def supported(lm) -> bool:
    """Whether ``lm`` (``text_encoder.model.language_model``) is a plain causal decoder this module reproduces."""
    cfg = lm.config
    if getattr(cfg, "use_sliding_window", False):
        return False
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    layer = lm.layers[0] if len(lm.layers) else None
    attn = getattr(layer, "self_attn", None)
    return (
        kind in ("default", "mrope")
        and hasattr(getattr(lm, "rotary_emb", None), "inv_freq")
        and attn is not None
        and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        and all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp"))
    )


def hf_parts(lm) -> DecoderParts:
    """The view of a transformers decoder (``text_encoder.model.language_model``)."""
    cfg = lm.config
    n_heads = cfg.num_attention_heads
    rot = lm.rotary_emb
    return DecoderParts(
        [LayerOps(layer) for layer in lm.layers], lm.norm, n_heads=n_heads, n_kv=cfg.num_key_value_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads, inv_freq=rot.inv_freq,
        attention_scaling=float(getattr(rot, "attention_scaling", 1.0)),
    )


class SuffixDecoder:
    """Decoder forward over a caption's suffix given its prefix's keys/values (see the module docstring).

    ``lm``: a transformers decoder, or the :class:`DecoderParts` of another implementation's modules.
    ``cuda_graphs``: capture forward+backward per shape bucket on CUDA (at most ``max_graphs`` kept; others run
    eagerly; :mod:`graphs`, which also captures under the cudaMallocAsync allocator). ``capture_guard``: a context
    around warm-up and capture (the ComfyUI node's: ComfyUI's offload streams off). ``bucket``: padding granularity
    in tokens for both the prefix and the suffix.
    """

    def __init__(self, lm, *, cuda_graphs: bool = True, bucket: int = 32, max_graphs: int = 4,
                 compile: bool = False, final_norm: bool = True, recompute: bool = False, capture_guard=None):
        self.capture_guard = capture_guard
        self.parts = lm if isinstance(lm, DecoderParts) else hf_parts(lm)
        # recompute: activation checkpointing per layer in the differentiable paths. For decoders whose frozen
        # weights are cast for each use (ComfyUI's manual-cast layers: bf16/fp8 files computed in float32),
        # autograd would otherwise keep every layer's cast weight until the backward (28 GB for a 7B encoder)
        self.recompute = recompute
        # hidden states after the decoder's final RMSNorm (Qwen-Image) or before it (Qwen-Image 2.1)
        self.final_norm = final_norm
        # compile: the captured function is the inductor-compiled one (norms, rotary, SiLU fused: ~3,400 small
        # kernels per step become a few hundred), one compilation per bucket, only where graphs are captured
        self.compile = compile
        self._compiled = None
        self.n_heads, self.n_kv, self.head_dim = self.parts.n_heads, self.parts.n_kv, self.parts.head_dim
        self.scaling = self.head_dim ** -0.5
        self.cuda_graphs = cuda_graphs
        self.bucket = bucket
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple[int, int], object] = OrderedDict()
        self._no_graph: set[tuple[int, int]] = set()
        self._table_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # a captured graph keeps one set of activations: a bucket whose forward replayed and whose backward has
        # not run yet (two captions of one batch in the same bucket) must not replay again; the later ones
        # run eagerly. Cleared by the output's gradient hook and by new_batch().
        self._pending: set[tuple[int, int]] = set()

    @property
    def qk_norm(self) -> bool:
        """Whether the layers norm each head's queries and keys (Qwen3)."""
        return any(ops.has_head_norm for ops in self.parts.layers)

    def release_graphs(self) -> None:
        """Drop every captured bucket and free what its capture allocated now (training is over; the pairs that
        :mod:`graphs` captured under cudaMallocAsync: ``_Graphed.release``, which keeps PyTorch's allocator from
        printing a warning per freed tensor). Buckets captured by PyTorch's ``make_graphed_callables`` are dropped."""
        for fn in self._graphs.values():
            release = getattr(fn, "release", None)
            if release is not None:
                release()
        self._graphs.clear()
        self._pending.clear()

    def new_batch(self) -> None:
        """Start of a step's conditioning: no graph's activations are awaiting a backward any more."""
        self._pending.clear()

    # ---- pieces ---------------------------------------------------------------------------------------
    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, S, head_dim) cos/sin, as ``Qwen2_5_VLRotaryEmbedding`` gives for text-only positions."""
        inv = self.parts.inv_freq.to(device=positions.device, dtype=torch.float32)
        freqs = positions.float()[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        scale = self.parts.attention_scaling
        return (emb.cos() * scale).to(dtype)[None], (emb.sin() * scale).to(dtype)[None]

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos[:, None] + rotated * sin[:, None]

    def _layer(self, ops: LayerOps, h, cos, sin, past_k, past_v, mask):
        b, s, _ = h.shape
        x = ops.ln1(h)
        q, k, v = ops.qkv(x)
        q = q.view(b, s, -1, self.head_dim).transpose(1, 2)
        k = k.view(b, s, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)
        q, k = ops.head_norm(q, k)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        keys = k if past_k is None else torch.cat([past_k, k], dim=2)
        values = v if past_v is None else torch.cat([past_v, v], dim=2)
        rep = self.n_heads // self.n_kv
        if rep > 1:  # grouped-query attention, as transformers' repeat_kv
            keys = keys.repeat_interleave(rep, dim=1)
            values = values.repeat_interleave(rep, dim=1)
        if mask is None:
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=s > 1, scale=self.scaling)
        else:
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
        h = h + ops.o(o.transpose(1, 2).reshape(b, s, -1))
        h = h + ops.mlp(ops.ln2(h))
        return h, k, v

    def _out(self, h: torch.Tensor) -> torch.Tensor:
        return self.parts.norm(h) if self.final_norm else h

    # ---- prefix (once per caption, no grad) -----------------------------------------------------------
    @torch.no_grad()
    def prefix(self, embeds: torch.Tensor, past_k: torch.Tensor | None = None,
               past_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values (layers, 1, kv_heads, P, head_dim) and hidden states (1, S, dim) of ``embeds``.

        With ``past_k/v`` (an earlier ``prefix`` result), ``embeds`` continue that prefix (e.g. a constant system
        turn cached once): the returned keys and values cover both (P = past + S), the hidden states only the new
        positions."""
        p, s = (0 if past_k is None else past_k.shape[3]), embeds.shape[1]
        mask = None
        if past_k is not None:
            q_idx = torch.arange(s, device=embeds.device)[:, None]
            k_idx = torch.arange(p + s, device=embeds.device)[None, :]
            mask = ((k_idx < p) | (k_idx - p <= q_idx))[None, None]  # all of the past, causal among the new
        cos, sin = self.rotary(torch.arange(p, p + s, device=embeds.device), embeds.dtype)
        h, ks, vs = embeds, [], []
        for i, ops in enumerate(self.parts.layers):
            h, k, v = self._layer(ops, h, cos, sin, None if past_k is None else past_k[i],
                                  None if past_v is None else past_v[i], mask)
            ks.append(k)
            vs.append(v)
        keys, values = torch.stack(ks), torch.stack(vs)
        if past_k is not None:
            keys, values = torch.cat([past_k, keys], dim=3), torch.cat([past_v, values], dim=3)
        return keys, values, self._out(h)

    def _hidden(self, ops: LayerOps, h, cos, sin, past_k, past_v, mask):
        """One layer's output hidden states (recomputed in the backward with ``recompute``)."""
        if self.recompute and torch.is_grad_enabled() and h.requires_grad:
            return torch.utils.checkpoint.checkpoint(
                lambda *a: self._layer(ops, *a)[0], h, cos, sin, past_k, past_v, mask, use_reentrant=False)
        return self._layer(ops, h, cos, sin, past_k, past_v, mask)[0]

    def full(self, embeds: torch.Tensor) -> torch.Tensor:
        """Hidden states (1, S, dim; final-normed unless ``final_norm=False``) of ``embeds`` from position 0: the
        whole decoder, differentiable, no cache and no graphs (``text_prefix_cache: false``)."""
        cos, sin = self.rotary(torch.arange(embeds.shape[1], device=embeds.device), embeds.dtype)
        h = embeds
        for ops in self.parts.layers:
            h = self._hidden(ops, h, cos, sin, None, None, None)
        return self._out(h)

    # ---- suffix (every step, differentiable w.r.t. its embeddings) --------------------------------------
    def _suffix_fn(self, embeds, past_k, past_v, mask, cos, sin):
        h = embeds
        for i, ops in enumerate(self.parts.layers):
            h = self._hidden(ops, h, cos, sin, past_k[i], past_v[i], mask)
        return self._out(h)

    def suffix(self, embeds: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor) -> torch.Tensor:
        """Hidden states (1, S, dim; final-normed unless ``final_norm=False``) of ``embeds`` placed after the
        cached prefix ``past_k/v``."""
        s, p = embeds.shape[1], past_k.shape[3]
        sp, pp = _ceil_to(s, self.bucket), _ceil_to(p, self.bucket)
        dev, dt = embeds.device, embeds.dtype
        if sp > s:  # end padding: causal attention keeps the real positions exact
            embeds = torch.cat([embeds, embeds.new_zeros(1, sp - s, embeds.shape[2])], dim=1)
        if pp > p:  # padded prefix keys are masked out below
            pad = (0, 0, 0, pp - p)
            past_k, past_v = F.pad(past_k, pad), F.pad(past_v, pad)
        mask, cos, sin = self._tables(p, sp, pp, dev, dt)
        args = (embeds, past_k, past_v, mask, cos, sin)
        key = (pp, sp)
        fn = self._graphed(key, args) if self._graphs_on(embeds) and key not in self._pending else None
        if fn is None:
            return self._suffix_fn(*args)[:, :s]
        out = fn(*args)
        self._pending.add(key)
        out.register_hook(lambda grad: self._pending.discard(key))
        return out[:, :s]

    def _tables(self, p: int, sp: int, pp: int, dev: torch.device, dt: torch.dtype):
        """Attention mask and rotary tables of one shape: they depend on lengths only, so they are built once
        (about 25 small kernels and as many launches fewer per step)."""
        key = (p, sp, pp, dev, dt)
        tables = self._table_cache.get(key)
        if tables is None:
            q_idx = torch.arange(sp, device=dev)[:, None]
            k_idx = torch.arange(pp + sp, device=dev)[None, :]
            mask = ((k_idx < p) | ((k_idx >= pp) & (k_idx - pp <= q_idx)))[None, None]
            cos, sin = self.rotary(torch.arange(p, p + sp, device=dev), dt)
            if len(self._table_cache) >= 16:
                self._table_cache.pop(next(iter(self._table_cache)))
            tables = self._table_cache[key] = (mask, cos, sin)
        return tables

    def _graphs_on(self, embeds: torch.Tensor) -> bool:
        return (self.cuda_graphs and embeds.is_cuda and embeds.requires_grad and torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cuda"))

    def _graphed(self, key: tuple[int, int], args):
        fn = self._graphs.get(key)
        if fn is not None:
            self._graphs.move_to_end(key)
            return fn
        if key in self._no_graph:
            return None
        if len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)  # drop the least recently used graph (its memory pool goes with it)
        sample = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        target = self._suffix_fn
        if self.compile:
            if self._compiled is None:
                self._compiled = torch.compile(self._suffix_fn, fullgraph=True, dynamic=False)
            target = self._compiled
        try:
            # the warm-up before capture runs the compiled forward and backward (compiling them)
            fn = graphs.make_graphed(target, sample, guard=self.capture_guard)
        except RuntimeError as e:  # GraphCaptureError included: the eager path computes the same
            logger.warning("text encoder: CUDA graph capture failed for shape %s (%s); running it eagerly", key, e)
            self._no_graph.add(key)
            return None
        logger.info("text encoder: captured forward+backward CUDA graphs for prefix/suffix bucket %s", key)
        self._graphs[key] = fn
        return fn
