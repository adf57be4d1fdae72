"""Qwen-Image 2.1's training attention with the target image's queries on ``model.attention_backend``.

diffusers' ``QwenImage21AttnProcessor`` runs the block-causal prefill as one attention call per prefix segment (the
caption, with its causal triangle) plus one for the target image, and passes ``backend=None`` to every prefill
call: ``set_attention_backend`` reaches only the cached decode steps of inference. In training the image call is
nearly all of the attention (4096 queries over 4227 keys at 1024², against 131 x 131 for the caption), so
:class:`Segments21AttnProcessor` sends that call, when it has no mask, to the processor's configured backend (e.g.
``_native_cudnn``: cuDNN's fused attention kernels on Hopper) and keeps diffusers' choices for the masked caption
segments, whose boolean masks not every backend takes. It computes what diffusers' processor computes (the same
calls in the same order; only the image call's kernel differs, so the results agree to that kernel's rounding);
:func:`install` puts it on every block of a ``QwenImage21Transformer2DModel``, or, on a diffusers without 0.42's
processor internals, only sets the backend (where diffusers' processor then uses it).
The code follows diffusers 0.42's ``QwenImage21AttnProcessor.__call__``; it diverges in the image call's
``backend`` and in the q/k/v projections, whose LoRA ``A`` products run as one matmul (``lora_shared.py``; peft's
numbers). With a KV cache (inference) diffusers' own code runs. The trainer installs it with ``model.compile`` or
``model.attention_backend``.
"""

from __future__ import annotations

import functools

import torch

from . import lora_shared
from .lora_shared import project


def _prepare_qkv(attn, hidden_states, rotary_emb):
    """diffusers 0.42's ``_qwenimage21_prepare_qkv`` without a KV cache (training's prefill), with the q/k/v
    projections through ``lora_shared.project`` (their LoRA ``A`` products as one matmul; peft's numbers)."""
    from diffusers.models.transformers import transformer_qwenimage21 as q21

    query, key, value = project(hidden_states, (attn.to_q, attn.to_k, attn.to_v))
    head_dim = attn.inner_dim // attn.heads
    query = query.unflatten(-1, (-1, head_dim))
    key = key.unflatten(-1, (-1, head_dim))
    value = value.unflatten(-1, (-1, head_dim))
    query = attn.norm_q(query).to(value.dtype)
    key = attn.norm_k(key).to(value.dtype)
    if rotary_emb is not None:  # looked up at call time: rope.install may have routed it
        query = q21.apply_rotary_emb_qwen(query, rotary_emb, use_real=False)
        key = q21.apply_rotary_emb_qwen(key, rotary_emb, use_real=False)
    return query, key, value, query.shape[1]


@functools.cache  # one class: dynamo and isinstance checks see the same type on every block
def _processor_class():
    from diffusers.models.transformers import transformer_qwenimage21 as q21

    def dispatch_attention_fn(*args, **kwargs):  # looked up at call time, as diffusers' processor does
        return q21.dispatch_attention_fn(*args, **kwargs)

    class Segments21AttnProcessor(q21.QwenImage21AttnProcessor):
        def __call__(self, attn, hidden_states, attention_mask=None, rotary_emb=None, layer_cache=None,
                     kv_cache_mode=None, cache_write_slice=None, segments=None, key_valid=None) -> torch.Tensor:
            if segments is None or layer_cache is not None:  # inference with a KV cache: diffusers' own path
                return super().__call__(attn, hidden_states, attention_mask=attention_mask, rotary_emb=rotary_emb,
                                        layer_cache=layer_cache, kv_cache_mode=kv_cache_mode,
                                        cache_write_slice=cache_write_slice, segments=segments, key_valid=key_valid)
            query, key, value, seq_len_q = _prepare_qkv(attn, hidden_states, rotary_emb)
            prefix_len = segments[-1][1] if segments else 0
            outputs = []
            for start, end, is_text in segments:
                seg_mask = None
                if is_text:
                    seg_len = end - start
                    seg_mask = torch.cat([torch.ones(seg_len, start, dtype=torch.bool, device=query.device),
                                          torch.tril(torch.ones(seg_len, seg_len, dtype=torch.bool,
                                                                device=query.device))], dim=1)[None, None]
                if key_valid is not None:
                    seg_key_valid = key_valid[:, None, None, :end]
                    seg_mask = seg_key_valid if seg_mask is None else (seg_mask & seg_key_valid)
                outputs.append(dispatch_attention_fn(query[:, start:end], key[:, :end], value[:, :end],
                                                     attn_mask=seg_mask, dropout_p=0.0, backend=None,
                                                     parallel_config=self._parallel_config))
            image_mask = None if key_valid is None else key_valid[:, None, None, :]
            # the one change: the image's queries (unmasked) on the configured backend
            backend = self._attention_backend if image_mask is None else None
            outputs.append(dispatch_attention_fn(query[:, prefix_len:], key, value, attn_mask=image_mask,
                                                 dropout_p=0.0, backend=backend,
                                                 parallel_config=self._parallel_config))
            hidden_states = torch.cat(outputs, dim=1)
            hidden_states = hidden_states[:, :seq_len_q]
            hidden_states = hidden_states.flatten(2, 3).type_as(query)
            (hidden_states,) = project(hidden_states, (attn.to_out[0],))
            return attn.to_out[1](hidden_states)

    return Segments21AttnProcessor


def install(transformer, backend: str | None) -> int:
    """Give each attention module of a ``QwenImage21Transformer2DModel`` a ``Segments21AttnProcessor`` on
    ``backend`` (a diffusers attention backend name, e.g. ``_native_cudnn``; None: torch's default choice, as
    diffusers' processor). Returns how many were set."""
    from diffusers.models.transformers import transformer_qwenimage21 as q21

    n = 0
    if hasattr(q21, "_qwenimage21_prepare_qkv"):  # the diffusers this module follows (0.42)
        cls = _processor_class()
        lora_shared.register_ops()  # before dynamo traces the processors (lora_shared.FUSED_DELTA's operator)
        for block in transformer.transformer_blocks:
            block.attn.set_processor(cls())
            n += 1
    if backend:
        transformer.set_attention_backend(backend)  # diffusers validates the name and sets it on every processor
    return n


def uninstall(transformer) -> int:
    """diffusers' own ``QwenImage21AttnProcessor`` again where :func:`install` put this module's (the benchmark's
    diffusers + peft baseline runs diffusers' code). Returns how many were restored."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21AttnProcessor

    n = 0
    for block in getattr(transformer, "transformer_blocks", ()):
        if type(block.attn.processor).__name__ == "Segments21AttnProcessor":
            block.attn.set_processor(QwenImage21AttnProcessor())
            n += 1
    return n


__all__ = ["install", "uninstall"]
