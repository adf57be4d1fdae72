"""Qwen-Image conditioning for training: the numbers ``QwenImagePipeline._get_qwen_prompt_embeds`` produces,
computed with less work.

- The decoder (``text_encoder.model.language_model``) is called directly: no LM head (152064 logits per token)
  and no stack of every layer's hidden states; its last hidden state is the pipeline's ``hidden_states[-1]``.
- Causal prefix cache: text before the first placeholder token (of any of the trained tokens) does not depend on
  their vectors, so its keys/values and hidden states are computed once per caption (no grad) and each step runs
  only the suffix, from the first placeholder on, with gradients to the tokens' vectors (``suffix.SuffixDecoder``;
  on CUDA its forward and backward replay as CUDA graphs).

Same chat template, same dropped prefix (``prompt_template_encode_start_idx``) as the pipeline; the tests check
the result against ``_get_qwen_prompt_embeds``.
"""

from __future__ import annotations

import torch

from . import suffix as suffix_mod


def pad_batch(hs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-caption ``(seq_i, dim)`` conditionings -> ``(batch, seq, dim)`` right-padded with zeros, and the host
    ``(batch, seq)`` long mask of the real positions (the pipelines pad and mask the same way; on the host, testing
    whether it is all ones does not wait for the GPU)."""
    length = max(h.shape[0] for h in hs)
    embeds = torch.stack([torch.cat([h, h.new_zeros(length - h.shape[0], h.shape[1])]) for h in hs])
    mask = torch.zeros(len(hs), length, dtype=torch.long)
    for row, h in zip(mask, hs):
        row[: h.shape[0]] = 1
    return embeds, mask


class PromptEncoder:
    def __init__(self, pipe, token_ids: int | list[int] | None = None, prefix_cache: bool = True,
                 cuda_graphs: bool = True, compile: bool = False):
        self.pipe = pipe
        # the placeholder ids (one or several): the prefix cache ends at the first occurrence of any of them
        self.token_ids = frozenset([token_ids] if isinstance(token_ids, int) else (token_ids or ()))
        self.prefix_cache = prefix_cache
        self.template = pipe.prompt_template_encode
        self.drop = pipe.prompt_template_encode_start_idx
        self.max_length = pipe.tokenizer_max_length + self.drop
        self.lm = pipe.text_encoder.model.language_model
        self.suffix = (suffix_mod.SuffixDecoder(self.lm, cuda_graphs=cuda_graphs, compile=compile)
                       if suffix_mod.supported(self.lm) else None)
        self._prefix: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = {}

    def ids(self, caption: str) -> list[int]:
        enc = self.pipe.tokenizer(self.template.format(caption), max_length=self.max_length, truncation=True)
        return list(enc["input_ids"])

    def _embed(self, ids: list[int]) -> torch.Tensor:
        # non_blocking: a blocking host-to-device copy would wait for all queued GPU work first
        return self.lm.embed_tokens(torch.tensor([ids]).to(self.lm.embed_tokens.weight.device, non_blocking=True))

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
                return self.lm(inputs_embeds=self._embed(ids), use_cache=False).last_hidden_state[0, self.drop:]
            with torch.no_grad():
                keys, values, hidden = self.suffix.prefix(self._embed(ids[:first]))
            suffix_ids = torch.tensor([ids[first:]]).to(self.lm.embed_tokens.weight.device, non_blocking=True)
            entry = (keys, values, hidden[0, self.drop:], suffix_ids)  # per caption: no tokenizing each step
            self._prefix[caption] = entry
        keys, values, prefix_hidden, suffix_ids = entry
        out = self.suffix.suffix(self.lm.embed_tokens(suffix_ids), keys, values)
        return torch.cat([prefix_hidden, out[0]], dim=0)

    def encode(self, captions: list[str], dtype: torch.dtype, device: torch.device):
        """(batch, seq, dim) embeddings on ``device`` and the (batch, seq) mask, zero-padded like the pipeline.

        The mask stays on the host: it depends only on token counts, and whether it is all ones (then the
        transformer takes no mask) is then known without waiting for the GPU."""
        if self.suffix is not None:
            self.suffix.new_batch()
        hs = [self.encode_one(c) for c in captions]
        embeds, mask = pad_batch(hs)
        return embeds.to(device=device, dtype=dtype), mask
