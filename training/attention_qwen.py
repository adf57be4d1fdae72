"""Qwen-Image's joint attention with each stream's q/k/v LoRA ``A`` products as one matmul (``lora_shared.py``).

diffusers' ``QwenDoubleStreamAttnProcessor2_0`` calls ``to_q``, ``to_k`` and ``to_v`` on the image stream's hidden
states and ``add_q_proj``, ``add_k_proj`` and ``add_v_proj`` on the text stream's; with a LoRA on them (the default
targets) peft runs six rank-r ``A`` products, each reading its input again, and in the backward six ``dA`` products
and six rank-r input-gradient terms. :class:`SharedQkvAttnProcessor` computes each triple through
``lora_shared.project``: one ``A`` product per stream each way, then each layer's own base layer, ``B`` and scaling
(peft's numbers: the same products and casts, other kernels; the adapter, its export and checkpoints unchanged).
Qwen-Image 2.1's processor (``attention21.py``) does the same for its one stream; there it took 4.4 ms off an H200
step (docs/benchmarks.md, "Session 7").

The code follows diffusers 0.42's ``QwenDoubleStreamAttnProcessor2_0.__call__``; it diverges only in the
projections (each stream's q/k/v, ``to_out`` and ``to_add_out`` through ``lora_shared.project``) and, where
``norm_rope.install`` turned it on (``fused_norm_rope``), in computing the q/k norms, RoPE and concatenation through
one operator (``norm_rope.py``; the same numbers within bf16 rounding), and, with :data:`BSHD_CUDNN` and diffusers'
``_native_cudnn`` backend, in calling cuDNN's attention on views of the [B, S, H, D] tensors instead of contiguous
[B, H, S, D] copies (:func:`sdpa_bshd`). Older diffusers (0.36-0.41) differ in how
the joint mask is built, so there :func:`install` leaves diffusers' processor in place (the same step, the A
products one by one). The trainer installs it with ``model.compile`` (as the RoPE and GELU rewrites), where the
saved kernels matter.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch

from . import lora_shared, norm_rope

logger = logging.getLogger(__name__)

_FOLLOWS = (0, 42)  # the diffusers release whose processor this one follows (newer ones: see supported())
# cuDNN attention (diffusers' "_native_cudnn" backend, no parallel config) on [B, H, S, D] views of the [B, S, H, D]
# q/k/v, without the backend's .contiguous() copies (sdpa_bshd); the bench's attn_bshd=0 turns it off
BSHD_CUDNN = True


def _cudnn_backend(backend, parallel_config) -> bool:
    return parallel_config is None and str(getattr(backend, "value", backend)) == "_native_cudnn"


def sdpa_bshd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
              backend=None) -> torch.Tensor:
    """diffusers' ``_native_cudnn`` attention for [B, S, H, D] inputs, returning [B, S, H, D], without its copies.

    diffusers makes each of q, k and v a contiguous [B, H, S, D] copy before SDPA (``permute(...).contiguous()``),
    and returns the output as a [B, S, H, D] view of cuDNN's [B, H, S, D] result, which the processor then copies
    once more to flatten the heads for ``to_out``. cuDNN reads any strides, and PyTorch allocates its output (and
    its input gradients) in the query's memory order (``alloc_with_matching_layout``), so here SDPA gets
    ``transpose(1, 2)`` views and everything stays [B, S, H, D] in memory: no copy of q, k or the output forward
    (3 × 24 MiB a block at 1024²), the same kernels and the same numbers otherwise. ``backend``: the SDPA backend
    (cuDNN's by default; tests pass the math one off CUDA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    with sdpa_kernel(backend if backend is not None else SDPBackend.CUDNN_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0,
                                                               is_causal=False)
    return out.transpose(1, 2)


@functools.cache  # one class: dynamo and isinstance checks see the same type on every block
def _processor_class():
    from diffusers.models.transformers import transformer_qwenimage as qi

    class SharedQkvAttnProcessor(qi.QwenDoubleStreamAttnProcessor2_0):
        fused_norm_rope = False  # norm_rope.install: q/k norms, RoPE and concatenation as one operator

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                     attention_mask=None, image_rotary_emb=None) -> tuple[torch.Tensor, torch.Tensor]:
            if encoder_hidden_states is None or attention_mask is not None:  # diffusers' own errors
                return super().__call__(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                        attention_mask, image_rotary_emb)
            if encoder_hidden_states_mask is not None:
                image_mask = torch.ones((hidden_states.shape[0], hidden_states.shape[1]), dtype=torch.bool,
                                        device=hidden_states.device)
                attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
            seq_txt = encoder_hidden_states.shape[1]
            # the one change: each stream's three projections with their LoRA A products as one matmul
            img_query, img_key, img_value = lora_shared.project(hidden_states, (attn.to_q, attn.to_k, attn.to_v))
            txt_query, txt_key, txt_value = lora_shared.project(
                encoder_hidden_states, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            head_dim = attn.inner_dim // attn.heads
            img_query = img_query.unflatten(-1, (-1, head_dim))
            img_key = img_key.unflatten(-1, (-1, head_dim))
            img_value = img_value.unflatten(-1, (-1, head_dim))
            txt_query = txt_query.unflatten(-1, (-1, head_dim))
            txt_key = txt_key.unflatten(-1, (-1, head_dim))
            txt_value = txt_value.unflatten(-1, (-1, head_dim))
            if (self.fused_norm_rope and image_rotary_emb is not None and img_query.dtype == torch.bfloat16
                    and txt_query.dtype == torch.bfloat16):
                img_freqs, txt_freqs = image_rotary_emb  # the same numbers in one kernel each way (norm_rope.py)
                joint_query = norm_rope.joint(img_query, txt_query, attn.norm_q, attn.norm_added_q, img_freqs,
                                              txt_freqs)
                joint_key = norm_rope.joint(img_key, txt_key, attn.norm_k, attn.norm_added_k, img_freqs, txt_freqs)
            else:
                if attn.norm_q is not None:
                    img_query = attn.norm_q(img_query)
                if attn.norm_k is not None:
                    img_key = attn.norm_k(img_key)
                if attn.norm_added_q is not None:
                    txt_query = attn.norm_added_q(txt_query)
                if attn.norm_added_k is not None:
                    txt_key = attn.norm_added_k(txt_key)
                if image_rotary_emb is not None:  # looked up at call time: rope.install may have routed it
                    img_freqs, txt_freqs = image_rotary_emb
                    img_query = qi.apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
                    img_key = qi.apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
                    txt_query = qi.apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
                    txt_key = qi.apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)
                joint_query = torch.cat([txt_query, img_query], dim=1)  # diffusers' order: [text, image]
                joint_key = torch.cat([txt_key, img_key], dim=1)
            joint_value = torch.cat([txt_value, img_value], dim=1)
            if BSHD_CUDNN and _cudnn_backend(self._attention_backend, self._parallel_config):
                joint = sdpa_bshd(joint_query, joint_key, joint_value, attention_mask)
            else:
                joint = qi.dispatch_attention_fn(joint_query, joint_key, joint_value, attn_mask=attention_mask,
                                                 dropout_p=0.0, is_causal=False, backend=self._attention_backend,
                                                 parallel_config=self._parallel_config)
            joint = joint.flatten(2, 3).to(joint_query.dtype)
            (img_out,) = lora_shared.project(joint[:, seq_txt:, :].contiguous(), (attn.to_out[0],))
            if len(attn.to_out) > 1:
                img_out = attn.to_out[1](img_out)  # dropout
            (txt_out,) = lora_shared.project(joint[:, :seq_txt, :].contiguous(), (attn.to_add_out,))
            return img_out, txt_out

    return SharedQkvAttnProcessor


_MASK_MARKER = "build the joint mask"  # in 0.42's error for an external attention_mask: it builds the mask itself


def supported() -> bool:
    """Whether the installed diffusers' processor is the one this module follows: diffusers >= 0.42, the same call
    signature, and 0.42's joint-mask handling (its error message for an external ``attention_mask``, a constant of
    the compiled function: no source needed). Earlier releases have the same signature but another mask handling."""
    import diffusers
    from diffusers.models.transformers import transformer_qwenimage as qi
    from packaging.version import Version

    if Version(diffusers.__version__).release[:2] < _FOLLOWS:
        return False
    call = qi.QwenDoubleStreamAttnProcessor2_0.__call__
    params = list(inspect.signature(call).parameters)
    if params != ["self", "attn", "hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask",
                  "attention_mask", "image_rotary_emb"]:
        return False
    consts = getattr(getattr(call, "__code__", None), "co_consts", ())
    return any(isinstance(c, str) and _MASK_MARKER in c for c in consts)


def install(transformer) -> int:
    """Give each attention module of a ``QwenImageTransformer2DModel`` a :class:`SharedQkvAttnProcessor`, keeping
    the attention backend and parallel config its processor had. Returns how many were set (0 on a diffusers whose
    processor this module does not follow: diffusers' stays, logged)."""
    blocks = [b for b in getattr(transformer, "transformer_blocks", ())
              if type(getattr(getattr(b, "attn", None), "processor", None)).__name__
              == "QwenDoubleStreamAttnProcessor2_0"]
    if not blocks:
        return 0
    if not supported():
        import diffusers

        logger.info("shared-input LoRA: diffusers %s's Qwen-Image attention processor is not the one followed here "
                    "(0.42's); its q/k/v LoRA products stay one by one", diffusers.__version__)
        return 0
    cls = _processor_class()
    lora_shared.register_ops()  # before dynamo traces the processors (lora_shared.FUSED_DELTA's operator)
    for block in blocks:
        old = block.attn.processor
        new = cls()
        new._attention_backend = old._attention_backend  # set_attention_backend's choice, if any
        new._parallel_config = old._parallel_config
        block.attn.set_processor(new)
    logger.info("shared-input LoRA: each stream's q/k/v LoRA A products as one matmul in %d attention blocks",
                len(blocks))
    return len(blocks)


def uninstall(transformer) -> int:
    """diffusers' own processor again where :func:`install` put this module's (keeping the backend). Returns how
    many were restored."""
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    n = 0
    for block in getattr(transformer, "transformer_blocks", ()):
        old = getattr(getattr(block, "attn", None), "processor", None)
        if type(old).__name__ == "SharedQkvAttnProcessor":
            new = QwenDoubleStreamAttnProcessor2_0()
            new._attention_backend, new._parallel_config = old._attention_backend, old._parallel_config
            block.attn.set_processor(new)
            n += 1
    return n


__all__ = ["install", "sdpa_bshd", "supported", "uninstall"]
