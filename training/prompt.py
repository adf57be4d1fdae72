"""Qwen-Image conditioning for training: the numbers ``QwenImagePipeline._get_qwen_prompt_embeds`` produces,
computed with less work.

- The decoder (``text_encoder.model.language_model``) is called directly: no LM head (152064 logits per token)
  and no stack of every layer's hidden states; its last hidden state is the pipeline's ``hidden_states[-1]``.
- Causal prefix cache: text before the first placeholder token does not depend on it, so its keys/values and
  hidden states are computed once per caption (no grad) and each step runs only the suffix, from the first
  placeholder on, with gradients to the token's vector.

Same chat template, same dropped prefix (``prompt_template_encode_start_idx``) as the pipeline; the tests check
the result against ``_get_qwen_prompt_embeds``.
"""

from __future__ import annotations

import copy
import inspect

import torch


class PromptEncoder:
    def __init__(self, pipe, token_id: int | None = None, prefix_cache: bool = True):
        self.pipe = pipe
        self.token_id = token_id
        self.prefix_cache = prefix_cache
        self.template = pipe.prompt_template_encode
        self.drop = pipe.prompt_template_encode_start_idx
        self.max_length = pipe.tokenizer_max_length + self.drop
        self.lm = pipe.text_encoder.model.language_model
        params = inspect.signature(self.lm.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._prefix: dict[str, tuple[object, torch.Tensor, int]] = {}

    def ids(self, caption: str) -> list[int]:
        enc = self.pipe.tokenizer(self.template.format(caption), max_length=self.max_length, truncation=True)
        return list(enc["input_ids"])

    def _run(self, ids: list[int], cache=None, start: int = 0, use_cache: bool = False):
        device = self.lm.embed_tokens.weight.device
        t = torch.tensor([ids], device=device)
        embeds = self.lm.embed_tokens(t)
        kwargs = {"inputs_embeds": embeds, "use_cache": use_cache, self._cache_kw: cache}
        if start:
            kwargs["position_ids"] = torch.arange(start, start + len(ids), device=device)[None]
        return self.lm(**kwargs)

    def _cache_of(self, out):
        return getattr(out, "cache", None) or getattr(out, "past_key_values", None)

    def encode_one(self, caption: str) -> torch.Tensor:
        """(seq, dim) conditioning for one caption; differentiable w.r.t. the placeholder vector."""
        ids = self.ids(caption)
        first = None
        if self.token_id is not None and self.prefix_cache:
            first = next((i for i, t in enumerate(ids) if t == self.token_id and i >= self.drop), None)
        if first is None or first <= self.drop:
            return self._run(ids).last_hidden_state[0, self.drop:]
        entry = self._prefix.get(caption)
        if entry is None:
            with torch.no_grad():
                out = self._run(ids[:first], use_cache=True)
            entry = (self._cache_of(out), out.last_hidden_state[0, self.drop:].detach(), first)
            self._prefix[caption] = entry
        cache, prefix_hidden, first = entry
        # a copy per step: the suffix's keys/values (with grad) must not end up in the cached prefix
        out = self._run(ids[first:], cache=copy.deepcopy(cache), start=first, use_cache=True)
        return torch.cat([prefix_hidden, out.last_hidden_state[0]], dim=0)

    def encode(self, captions: list[str], dtype: torch.dtype, device: torch.device):
        """(batch, seq, dim) embeddings and (batch, seq) mask, zero-padded like the pipeline."""
        hs = [self.encode_one(c) for c in captions]
        length = max(h.shape[0] for h in hs)
        embeds = torch.stack([torch.cat([h, h.new_zeros(length - h.shape[0], h.shape[1])]) for h in hs])
        mask = torch.stack([torch.cat([torch.ones(h.shape[0], dtype=torch.long, device=h.device),
                                       torch.zeros(length - h.shape[0], dtype=torch.long, device=h.device)]) for h in hs])
        return embeds.to(device=device, dtype=dtype), mask.to(device)
