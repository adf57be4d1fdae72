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
step so the suffix keys do not leak into the cached prefix), which graph capture cannot reuse. The layer's
own modules (norms, projections, MLP) are called as they are; only attention-with-prefix and the rotary
tables are written here. Text-only Qwen2.5-VL positions are equal in its three m-RoPE sections, so its
rotary reduces to plain 1-D RoPE over ``rotary_emb.inv_freq``. The tests compare against the pipeline's
``_get_qwen_prompt_embeds``.

Qwen3-VL (Qwen-Image 2.1's text encoder) is the same decoder plus an RMSNorm over each head's queries and keys
before the rotary (``self_attn.q_norm``/``k_norm``, applied when the layer has them) and interleaved m-RoPE,
which for text-only positions (equal in all three sections) is the same 1-D RoPE. 2.1 conditions on the last
layer's output *before* the final norm: ``final_norm=False``. ``prefix(..., past_k, past_v)`` extends a cached
prefix (2.1's constant system turn) by more positions.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def _ceil_to(n: int, k: int) -> int:
    return max(k, int(math.ceil(n / k)) * k)


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


class SuffixDecoder:
    """Decoder forward over a caption's suffix given its prefix's keys/values (see the module docstring).

    ``cuda_graphs``: capture forward+backward per shape bucket on CUDA (at most ``max_graphs`` kept; others run
    eagerly). ``bucket``: padding granularity in tokens for both the prefix and the suffix.
    """

    def __init__(self, lm, *, cuda_graphs: bool = True, bucket: int = 32, max_graphs: int = 4,
                 compile: bool = False, final_norm: bool = True):
        self.lm = lm
        # hidden states after the decoder's final RMSNorm (Qwen-Image) or before it (Qwen-Image 2.1)
        self.final_norm = final_norm
        attn0 = getattr(lm.layers[0], "self_attn", None) if len(lm.layers) else None
        self.qk_norm = hasattr(attn0, "q_norm") and hasattr(attn0, "k_norm")  # Qwen3
        # compile: the captured function is the inductor-compiled one (norms, rotary, SiLU fused: ~3,400 small
        # kernels per step become a few hundred), one compilation per bucket, only where graphs are captured
        self.compile = compile
        self._compiled = None
        cfg = lm.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
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

    def new_batch(self) -> None:
        """Start of a step's conditioning: no graph's activations are awaiting a backward any more."""
        self._pending.clear()

    # ---- pieces ---------------------------------------------------------------------------------------
    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, S, head_dim) cos/sin, as ``Qwen2_5_VLRotaryEmbedding`` gives for text-only positions."""
        rot = self.lm.rotary_emb
        inv = rot.inv_freq.to(device=positions.device, dtype=torch.float32)
        freqs = positions.float()[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        scale = float(getattr(rot, "attention_scaling", 1.0))
        return (emb.cos() * scale).to(dtype)[None], (emb.sin() * scale).to(dtype)[None]

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos[:, None] + rotated * sin[:, None]

    def _layer(self, layer, h, cos, sin, past_k, past_v, mask):
        attn = layer.self_attn
        b, s, _ = h.shape
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(b, s, -1, self.head_dim)
        k = attn.k_proj(x).view(b, s, -1, self.head_dim)
        if self.qk_norm:  # per-head RMSNorm before the rotary, as Qwen3's attention
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = attn.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
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
        h = h + attn.o_proj(o.transpose(1, 2).reshape(b, s, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, k, v

    # ---- prefix (once per caption, no grad) -----------------------------------------------------------
    def _out(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm.norm(h) if self.final_norm else h

    @torch.no_grad()
    def prefix(self, embeds: torch.Tensor, past_k: torch.Tensor | None = None,
               past_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values (layers, 1, kv_heads, P, head_dim) and hidden states (1, S, dim) of ``embeds``.

        With ``past_k/v`` (an earlier ``prefix`` result), ``embeds`` continue that prefix: the returned keys and
        values cover both (P = past + S), the hidden states only the new positions."""
        if past_k is None:
            positions = torch.arange(embeds.shape[1], device=embeds.device)
            cos, sin = self.rotary(positions, embeds.dtype)
            h, ks, vs = embeds, [], []
            for layer in self.lm.layers:
                h, k, v = self._layer(layer, h, cos, sin, None, None, None)
                ks.append(k)
                vs.append(v)
            return torch.stack(ks), torch.stack(vs), self._out(h)
        p, s = past_k.shape[3], embeds.shape[1]
        q_idx = torch.arange(s, device=embeds.device)[:, None]
        k_idx = torch.arange(p + s, device=embeds.device)[None, :]
        mask = ((k_idx < p) | (k_idx - p <= q_idx))[None, None]  # all of the past, causal among the new
        cos, sin = self.rotary(torch.arange(p, p + s, device=embeds.device), embeds.dtype)
        h, ks, vs = embeds, [], []
        for i, layer in enumerate(self.lm.layers):
            h, k, v = self._layer(layer, h, cos, sin, past_k[i], past_v[i], mask)
            ks.append(k)
            vs.append(v)
        return torch.cat([past_k, torch.stack(ks)], dim=3), torch.cat([past_v, torch.stack(vs)], dim=3), self._out(h)

    # ---- suffix (every step, differentiable w.r.t. its embeddings) --------------------------------------
    def _suffix_fn(self, embeds, past_k, past_v, mask, cos, sin):
        h = embeds
        for i, layer in enumerate(self.lm.layers):
            h, _, _ = self._layer(layer, h, cos, sin, past_k[i], past_v[i], mask)
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
            # warm-up inside make_graphed_callables runs the compiled forward and backward (compiling them)
            fn = torch.cuda.make_graphed_callables(target, sample)
        except RuntimeError as e:  # capture can fail on exotic setups; the eager path computes the same
            logger.warning("text encoder: CUDA graph capture failed for shape %s (%s); running it eagerly", key, e)
            self._no_graph.add(key)
            return None
        logger.info("text encoder: captured forward+backward CUDA graphs for prefix/suffix bucket %s", key)
        self._graphs[key] = fn
        return fn
