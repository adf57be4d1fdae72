"""Qwen-Image conditioning for training: the numbers ``QwenImagePipeline._get_qwen_prompt_embeds`` produces,
computed with less work.

- The decoder (``text_encoder.model.language_model``) is called directly: no LM head (152064 logits per token)
  and no stack of every layer's hidden states; its last hidden state is the pipeline's ``hidden_states[-1]``.
- Causal prefix cache: text before the first placeholder token does not depend on it, so its keys/values and
  hidden states are computed once per caption (no grad) and each step runs only the suffix, from the first
  placeholder on, with gradients to the token's vector (``suffix.SuffixDecoder``; on CUDA its forward and
  backward replay as CUDA graphs).

Same chat template, same dropped prefix (``prompt_template_encode_start_idx``) as the pipeline; the tests check
the result against ``_get_qwen_prompt_embeds``.
"""

from __future__ import annotations

import torch

from . import suffix as suffix_mod


class PromptEncoder:
    def __init__(self, pipe, token_id: int | None = None, prefix_cache: bool = True, cuda_graphs: bool = True):
        self.pipe = pipe
        self.token_id = token_id
        self.prefix_cache = prefix_cache
        self.template = pipe.prompt_template_encode
        self.drop = pipe.prompt_template_encode_start_idx
        self.max_length = pipe.tokenizer_max_length + self.drop
        self.lm = pipe.text_encoder.model.language_model
        self.suffix = suffix_mod.SuffixDecoder(self.lm, cuda_graphs=cuda_graphs) if suffix_mod.supported(self.lm) else None
        self._prefix: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = {}

    def ids(self, caption: str) -> list[int]:
        enc = self.pipe.tokenizer(self.template.format(caption), max_length=self.max_length, truncation=True)
        return list(enc["input_ids"])

    def _embed(self, ids: list[int]) -> torch.Tensor:
        return self.lm.embed_tokens(torch.tensor([ids], device=self.lm.embed_tokens.weight.device))

    def encode_one(self, caption: str) -> torch.Tensor:
        """(seq, dim) conditioning for one caption; differentiable w.r.t. the placeholder vector."""
        ids = self.ids(caption)
        first = None
        if self.token_id is not None and self.prefix_cache and self.suffix is not None:
            first = next((i for i, t in enumerate(ids) if t == self.token_id and i >= self.drop), None)
        if first is None:
            return self.lm(inputs_embeds=self._embed(ids), use_cache=False).last_hidden_state[0, self.drop:]
        entry = self._prefix.get(caption)
        if entry is None:
            with torch.no_grad():
                keys, values, hidden = self.suffix.prefix(self._embed(ids[:first]))
            entry = (keys, values, hidden[0, self.drop:], first)
            self._prefix[caption] = entry
        keys, values, prefix_hidden, first = entry
        out = self.suffix.suffix(self._embed(ids[first:]), keys, values)
        return torch.cat([prefix_hidden, out[0]], dim=0)

    def encode(self, captions: list[str], dtype: torch.dtype, device: torch.device):
        """(batch, seq, dim) embeddings and (batch, seq) mask, zero-padded like the pipeline."""
        if self.suffix is not None:
            self.suffix.new_batch()
        hs = [self.encode_one(c) for c in captions]
        length = max(h.shape[0] for h in hs)
        embeds = torch.stack([torch.cat([h, h.new_zeros(length - h.shape[0], h.shape[1])]) for h in hs])
        mask = torch.stack([torch.cat([torch.ones(h.shape[0], dtype=torch.long, device=h.device),
                                       torch.zeros(length - h.shape[0], dtype=torch.long, device=h.device)]) for h in hs])
        return embeds.to(device=device, dtype=dtype), mask.to(device)
