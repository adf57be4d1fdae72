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
import unicodedata
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


MAX_TOKEN_CHARS = 64
# whitespace, control, format (zero-width, bidi), surrogate, private-use and unassigned code points: a token
# holding one cannot be typed reliably and may be invisible in a prompt
_BAD_CATEGORIES = {"Cc": "a control character", "Cf": "an invisible format character", "Cs": "a surrogate",
                   "Co": "a private-use character", "Cn": "an unassigned code point", "Zs": "a space",
                   "Zl": "a line separator", "Zp": "a paragraph separator"}


def _known_tokens(tokenizer) -> set[str]:
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    added = {t.content if hasattr(t, "content") else str(t) for t in tokenizer.get_added_vocab()}
    return specials | added


def validate_token(token, tokenizer=None, *, allow=(), where: str = "") -> str:
    """The one check of a placeholder token string, shared by training (config + registration), inference
    (CLI, Cog) and ComfyUI's Register node, so all of them accept and refuse the same strings.

    Refuses a token that is not a non-empty string of at most ``MAX_TOKEN_CHARS`` characters, that holds
    whitespace or control / invisible characters, and (with ``tokenizer``) one that is already a special or
    added token, a regular vocabulary entry, or overlaps a special token (so it could swallow the chat
    template's own tokens). ``allow``: tokens this project registered earlier in the same tokenizer.
    Raises :class:`TokenError` naming the token (and ``where`` it came from); returns the token.
    """
    src = f"{where}: " if where else ""
    fix = "pick a fresh string such as <zwx>"
    if not isinstance(token, str) or not token:
        raise TokenError(f"{src}placeholder token must be a non-empty string, got {token!r}; {fix}")
    if len(token) > MAX_TOKEN_CHARS:
        raise TokenError(f"{src}placeholder token {token!r} is {len(token)} characters long (at most "
                         f"{MAX_TOKEN_CHARS}); {fix}")
    for i, c in enumerate(token):
        what = "whitespace" if c.isspace() else _BAD_CATEGORIES.get(unicodedata.category(c))
        if what:
            raise TokenError(f"{src}placeholder token {token!r} contains {what} (U+{ord(c):04X} at position {i}); "
                             f"it must be one word of visible characters: {fix}")
    if tokenizer is None or token in allow:
        return token
    known = _known_tokens(tokenizer) - set(allow)
    if token in known:
        raise TokenError(f"{src}placeholder token {token!r} is already a special token of this tokenizer; {fix}.")
    vocab = tokenizer.get_vocab()
    if token in vocab:
        raise TokenError(f"{src}placeholder token {token!r} is already a regular vocabulary entry (id {vocab[token]}) "
                         f"and carries a prior; {fix}.")
    overlap = sorted(k for k in known if token in k or k in token)
    if overlap:
        raise TokenError(f"{src}placeholder token {token!r} overlaps the special token {overlap[0]!r}: registering it "
                         f"would change how prompts and the chat template tokenize; {fix}.")
    return token


def add_placeholder_token(tokenizer, token: str, *, where: str = "") -> int:
    """Add ``token`` as an additional special token and return its id.

    Refuses what :func:`validate_token` refuses: a token already known to the tokenizer would not be fresh.
    """
    from transformers import AddedToken

    validate_token(token, tokenizer, where=where)
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if check_single_id(tokenizer, token, context="after registration") is None:
        raise TokenError(f"placeholder token {token!r} still splits after registration; cannot train it")
    return int(token_id)


def ensure_token(tokenizer, token: str) -> int:
    """Id of ``token`` in ``tokenizer``, registering it if absent (checked by :func:`validate_token`).

    An id already there is returned as is: callers re-registering their own tokens (ComfyUI's Register node
    chaining archives) check the string with :func:`validate_token` and its ``allow`` first.
    """
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
    where: str = "",
) -> RegisteredToken:
    """Register ``token`` and route its id to a single vector inside ``text_encoder``.

    The token must pass :func:`validate_token` against ``tokenizer`` in training and at inference alike
    (``fresh`` is kept for callers of the old signature). The vector's width is checked before the tokenizer
    or the text encoder is touched, so a refused archive leaves both as they were. Every base weight is frozen.
    """
    base = base_embedding(text_encoder)
    if vector is not None:
        check_vector_width(vector, base.weight.shape[1], token, where)
    token_id = add_placeholder_token(tokenizer, token, where=where)
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


def check_vector_width(vector: torch.Tensor, width: int, token: str, where: str = "") -> None:
    """Refuse a vector that is not 1-D, finite and ``width`` wide, naming the token and both widths."""
    src = f"{where}: " if where else ""
    if vector.ndim != 1 or vector.shape[0] != width:
        raise TokenError(
            f"{src}placeholder vector for {token!r} has shape {tuple(vector.shape)} but the text encoder's embedding "
            f"width is {width}: the archive was trained for a different text encoder"
        )
    if not torch.isfinite(vector).all():
        raise TokenError(f"{src}placeholder vector for {token!r} holds NaN or Inf values")


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
