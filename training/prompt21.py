"""Qwen-Image 2.1 conditioning for training: the numbers ``QwenImage21Pipeline.encode_prompt`` produces for a
text-to-image prompt, differentiable w.r.t. the placeholder token's vector, computed with less work.

What the pipeline computes (diffusers 0.42, ``_get_qwen_prompt_embeds``): the raw template string
``pipe.prompt_template_t2i`` (system turn "Comprehend and analyze the provided prompt.", then the user turn and
an open assistant turn; an empty prompt becomes " ") through ``pipe.processor``, left-padded for a batch; the
Qwen3-VL text encoder's last decoder layer *before* its final RMSNorm (the pipeline hooks the norm away, since
transformers 5 ties ``hidden_states[-1]`` to the normed state); the system turn's ``pipe._drop_idx`` tokens
dropped; the prompts right-padded with zeros and a mask. Here:

- each caption is encoded on its own (no left padding: the decoder's rotary is relative, so a padded row of the
  pipeline's batch equals its unpadded encoding up to rounding) and the batch is right-padded like the pipeline;
- the system turn is the same tokens for every caption, so its keys/values are computed once and cached; the
  caption text before the first placeholder extends them once per caption (no grad), and each step runs only
  the rest, from the first placeholder on, with gradients to the vector (``suffix.SuffixDecoder`` with
  ``final_norm=False``; on CUDA its forward and backward replay as CUDA graphs);
- without a placeholder (or with the prefix cache off) the decoder runs over the whole prompt with its final
  norm bypassed the way the pipeline bypasses it.

The tests check the result against ``QwenImage21Pipeline.encode_prompt`` (values and gradients).
"""

from __future__ import annotations

import contextlib

import torch

from . import suffix as suffix_mod
from .families import QWEN_IMAGE_21, get_family
from .prompt import pad_batch


def drop_count(pipe) -> int:
    """How many leading system-turn tokens the pipeline drops for text-to-image prompts."""
    for name in ("_drop_idx_t2i", "_drop_idx"):  # diffusers main splits t2i / ti2i; 0.42 has one
        value = getattr(pipe, name, None)
        if isinstance(value, int):
            return value
    raise AttributeError(f"{type(pipe).__name__} has no _drop_idx: not a QwenImage21Pipeline this code knows")


@contextlib.contextmanager
def without_final_norm(lm):
    """Run ``lm`` with its final RMSNorm returning its input (what the pipeline does, for the same reason)."""
    handle = lm.norm.register_forward_hook(lambda module, args, output: args[0])
    try:
        yield
    finally:
        handle.remove()


class PromptEncoder21:
    """Text-to-image conditioning of a ``QwenImage21Pipeline`` (see the module docstring).

    Same interface as ``prompt.PromptEncoder``: :meth:`encode` gives right-padded (batch, seq, 4096)
    embeddings and a host (batch, seq) mask; :meth:`encode_one` one caption's (seq, 4096)."""

    def __init__(self, pipe, token_ids: int | list[int] | None = None, prefix_cache: bool = True,
                 cuda_graphs: bool = True, compile: bool = False):
        self.pipe = pipe
        self.family = get_family(QWEN_IMAGE_21)
        # the placeholder ids (one or several): the prefix cache ends at the first occurrence of any of them
        self.token_ids = frozenset([token_ids] if isinstance(token_ids, int) else (token_ids or ()))
        self.prefix_cache = prefix_cache
        self.template = pipe.prompt_template_t2i
        self.drop = drop_count(pipe)
        self.lm = self.family.decoder(pipe.text_encoder)
        self.suffix = (suffix_mod.SuffixDecoder(self.lm, cuda_graphs=cuda_graphs, compile=compile, final_norm=False)
                       if suffix_mod.supported(self.lm) else None)
        self._ids: dict[str, list[int]] = {}
        self._system: tuple[list[int], torch.Tensor, torch.Tensor] | None = None
        self._prefix: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._fixed: dict[str, torch.Tensor] = {}  # captions without the token: their conditioning is constant

    @property
    def _device(self) -> torch.device:
        return self.lm.embed_tokens.weight.device

    def ids(self, caption: str) -> list[int]:
        """The prompt's token ids as the pipeline's processor gives them (system turn included)."""
        ids = self._ids.get(caption)
        if ids is None:
            text = self.template.format(caption or " ")  # the pipeline's stand-in for an empty prompt
            ids = self._ids[caption] = self.pipe.processor(text=[text], return_tensors="pt")["input_ids"][0].tolist()
        return ids

    def _embed(self, ids: list[int]) -> torch.Tensor:
        # non_blocking: a blocking host-to-device copy would wait for all queued GPU work first
        return self.lm.embed_tokens(torch.tensor([ids]).to(self._device, non_blocking=True))

    def _system_kv(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the system turn, computed on first use and then shared by every caption."""
        head = ids[: self.drop]
        if self._system is None or self._system[0] != head:
            keys, values, _ = self.suffix.prefix(self._embed(head))
            self._system = (head, keys, values)
        return self._system[1], self._system[2]

    def full(self, ids: list[int]) -> torch.Tensor:
        """(seq - drop, dim): the decoder over all of ``ids``, final norm bypassed, system turn dropped."""
        with without_final_norm(self.lm):
            out = self.lm(inputs_embeds=self._embed(ids), use_cache=False).last_hidden_state
        return out[0, self.drop:]

    def encode_one(self, caption: str) -> torch.Tensor:
        """(seq, dim) conditioning for one caption; differentiable w.r.t. the placeholder vector."""
        caching = bool(self.token_ids) and self.prefix_cache and self.suffix is not None
        entry = self._prefix.get(caption) if caching else None
        if entry is None:
            ids = self.ids(caption)
            first = None
            if caching:
                first = next((i for i, t in enumerate(ids) if t in self.token_ids and i >= self.drop), None)
            if first is None:
                if not caching:
                    return self.full(ids)
                fixed = self._fixed.get(caption)
                if fixed is None:  # does not depend on the vector: computed once, without a graph
                    with torch.no_grad():
                        fixed = self._fixed[caption] = self.full(ids)
                return fixed
            with torch.no_grad():
                keys, values = self._system_kv(ids)
                hidden = self.lm.embed_tokens.weight.new_zeros(0, self.lm.config.hidden_size)
                if first > self.drop:  # caption text before the first placeholder, once per caption
                    keys, values, h = self.suffix.prefix(self._embed(ids[self.drop:first]), keys, values)
                    hidden = h[0]
            suffix_ids = torch.tensor([ids[first:]]).to(self._device, non_blocking=True)
            entry = self._prefix[caption] = (keys, values, hidden, suffix_ids)
        keys, values, prefix_hidden, suffix_ids = entry
        out = self.suffix.suffix(self.lm.embed_tokens(suffix_ids), keys, values)
        return torch.cat([prefix_hidden.to(out.dtype), out[0]], dim=0)

    def encode(self, captions: list[str], dtype: torch.dtype, device: torch.device):
        """(batch, seq, dim) embeddings on ``device`` and the (batch, seq) long mask on the host, right-padded
        with zeros like ``encode_prompt`` (which returns no mask when nothing is padded; test ``mask.all()``)."""
        if self.suffix is not None:
            self.suffix.new_batch()
        hs = [self.encode_one(c) for c in captions]
        embeds, mask = pad_batch(hs)
        return embeds.to(device=device, dtype=dtype), mask
