"""The zero-prior placeholder token: tokenizer registration and a single trainable embedding row.

The token is carried by its *string* and its *vector*; its id is whatever the tokenizer at hand assigns
(151665 with Qwen-Image's tokenizer, 151669 with ComfyUI's bundled one).

Qwen2.5-VL's embedding table has 152064 rows while the tokenizer has 151665 entries, so the new id
already has a row: the table is never shrunk with ``resize_token_embeddings(len(tokenizer))``. It is grown
only when the id falls past its end.

Training does not hand the 545M-entry table to the optimizer. :class:`PlaceholderEmbedding` wraps the frozen
table and substitutes one ``nn.Parameter`` vector at every occurrence of the token id, so gradients exist
for that row only (the "gradient mask" is structural) and every other weight stays bit-identical.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)


class TokenError(ValueError):
    """The placeholder token cannot be registered as asked."""


def encode_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_single_id(tokenizer, token: str, *, context: str = "") -> int | None:
    """Return the token's single id, or warn naming the ids it splits into and return None."""
    ids = encode_ids(tokenizer, token)
    if len(ids) == 1:
        return ids[0]
    logger.warning(
        "placeholder token %r encodes to %d ids %s%s; it is not one token, so it carries the prior of its "
        "pieces. Use a bracketed token such as <zwx> with train_placeholder_token on.",
        token,
        len(ids),
        ids,
        f" ({context})" if context else "",
    )
    return None


def add_placeholder_token(tokenizer, token: str) -> int:
    """Add ``token`` as an additional special token and return its id.

    Refuses a token that is already a special token or a regular vocabulary entry: it would not be fresh.
    """
    from transformers import AddedToken

    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    added = {t.content if hasattr(t, "content") else str(t) for t in tokenizer.get_added_vocab()}
    if token in specials or token in added:
        raise TokenError(
            f"placeholder token {token!r} is already a special token of this tokenizer; pick a fresh string "
            "such as <zwx>."
        )
    if token in tokenizer.get_vocab():
        raise TokenError(
            f"placeholder token {token!r} is already a regular vocabulary entry (id "
            f"{tokenizer.convert_tokens_to_ids(token)}) and carries a prior; pick a fresh string such as <zwx>."
        )
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if check_single_id(tokenizer, token, context="after registration") is None:
        raise TokenError(f"placeholder token {token!r} still splits after registration; cannot train it")
    return int(token_id)


def ensure_token(tokenizer, token: str) -> int:
    """Id of ``token`` in ``tokenizer``, registering it if absent (inference: any id the tokenizer gives)."""
    added = tokenizer.get_added_vocab()
    if token in added:
        return int(added[token])
    return add_placeholder_token(tokenizer, token)


def init_vector(dim: int, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, std) in float32; std 0 gives exact zeros."""
    if std == 0:
        return torch.zeros(dim, dtype=torch.float32)
    return torch.randn(dim, generator=generator, dtype=torch.float32) * std


def ensure_row(text_encoder, token_id: int) -> None:
    """Grow the input embedding table only if ``token_id`` is past its end; never shrink it."""
    emb = base_embedding(text_encoder)
    rows = emb.weight.shape[0]
    if token_id < rows:
        return
    logger.info("embedding table has %d rows; growing it to %d for token id %d", rows, token_id + 1, token_id)
    text_encoder.resize_token_embeddings(token_id + 1, mean_resizing=False)


def base_embedding(text_encoder) -> nn.Embedding:
    emb = text_encoder.get_input_embeddings()
    return emb.base if isinstance(emb, PlaceholderEmbedding) else emb


class PlaceholderEmbedding(nn.Module):
    """A frozen embedding table plus one trainable (or fixed) vector for one token id.

    ``forward(ids)`` equals the base lookup except at ``ids == token_id``, where the vector is used. The
    vector stays float32 whatever the table's dtype (including fp8 storage), so a bf16/fp8 model still trains
    a float row.
    """

    def __init__(self, base: nn.Embedding, token_id: int, vector: torch.Tensor, trainable: bool = True):
        super().__init__()
        if vector.ndim != 1 or vector.shape[0] != base.weight.shape[1]:
            raise TokenError(
                f"placeholder vector has shape {tuple(vector.shape)} but the text encoder's embedding width is "
                f"{base.weight.shape[1]}: the archive was trained for a different text encoder"
            )
        self.base = base
        self.token_id = int(token_id)
        self.vector = nn.Parameter(vector.detach().to(device=base.weight.device, dtype=torch.float32).clone(), requires_grad=trainable)

    @property
    def weight(self) -> torch.Tensor:  # code that reads embed_tokens.weight (dtype/device probes) keeps working
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        mask = (input_ids == self.token_id).unsqueeze(-1)
        return torch.where(mask, self.vector.to(out.dtype), out)


@dataclass
class RegisteredToken:
    """A registered placeholder: its string, its id in the tokenizer at hand, and its float32 vector (held by the
    :class:`PlaceholderEmbedding` for transformers models, or directly where another runtime embeds)."""

    token: str
    token_id: int
    module: PlaceholderEmbedding | None = None
    own_vector: nn.Parameter | None = None

    @property
    def vector(self) -> torch.Tensor:
        return self.module.vector if self.module is not None else self.own_vector


def install_placeholder(
    tokenizer,
    text_encoder,
    token: str,
    vector: torch.Tensor | None = None,
    *,
    init_std: float = 1e-5,
    trainable: bool = True,
    generator: torch.Generator | None = None,
    fresh: bool = True,
) -> RegisteredToken:
    """Register ``token`` and route its id to a single vector inside ``text_encoder``.

    ``fresh=True`` (training) refuses tokens already known to the tokenizer; ``fresh=False`` (inference)
    reuses whatever id the tokenizer already gives the string. Every base weight is frozen.
    """
    token_id = add_placeholder_token(tokenizer, token) if fresh else ensure_token(tokenizer, token)
    remove_placeholder(text_encoder)
    ensure_row(text_encoder, token_id)
    base = base_embedding(text_encoder)
    if vector is None:
        vector = init_vector(base.weight.shape[1], init_std, generator)
    for p in text_encoder.parameters():
        p.requires_grad_(False)
    module = PlaceholderEmbedding(base, token_id, vector, trainable=trainable)
    text_encoder.set_input_embeddings(module)
    return RegisteredToken(token, token_id, module)


def remove_placeholder(text_encoder) -> None:
    emb = text_encoder.get_input_embeddings()
    if isinstance(emb, PlaceholderEmbedding):
        text_encoder.set_input_embeddings(emb.base)


def materialize(text_encoder) -> torch.Tensor | None:
    """Write the vector into the table's row and unwrap (for exporting a plain text encoder)."""
    emb = text_encoder.get_input_embeddings()
    if not isinstance(emb, PlaceholderEmbedding):
        return None
    with torch.no_grad():
        emb.base.weight[emb.token_id] = emb.vector.to(emb.base.weight.dtype)
    text_encoder.set_input_embeddings(emb.base)
    return emb.vector.detach().clone()
