"""The zero-prior placeholder tokens: tokenizer registration and one trainable embedding row per token.

A token is carried by its *string* and its *vector*; its id is whatever the tokenizer at hand assigns
(151665 with Qwen-Image's tokenizer, 151669 with ComfyUI's bundled one). A run may train several tokens
(``train.placeholder_tokens``); they are registered in list order (151665, 151666, ...), each with its own vector.

Qwen2.5-VL's embedding table has 152064 rows while the tokenizer has 151665 entries, so the new id
already has a row: the table is never shrunk with ``resize_token_embeddings(len(tokenizer))``. It is grown
only when the id falls past its end.

Training does not hand the 545M-entry table to the optimizer. :class:`PlaceholderEmbedding` wraps the frozen
table and substitutes one ``nn.Parameter`` vector at every occurrence of each token's id, so gradients exist
for those rows only (the "gradient mask" is structural) and every other weight stays bit-identical.
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
MAX_TOKENS = 256  # tokens trained together; also bounds the pairwise checks of a list read from an archive
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


def split_token_list(text: str) -> list[str]:
    """``"<alice>, <bob>"`` -> ``["<alice>", "<bob>"]``: the comma-separated form of a token list that text inputs
    take (Cog's ``placeholder_token``, the ComfyUI training node's widget). Empty entries are dropped."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


def validate_tokens(tokens, tokenizer=None, *, allow=(), where: str = "") -> list[str]:
    """:func:`validate_token` for each of several placeholder tokens trained (or registered) together, plus what a
    list adds: the tokens are distinct, and none is part of another (``<a>`` inside ``<a>2``: a prompt writing one
    could tokenize as the other plus pieces, depending on which is registered). Everything is checked before
    anything is registered. Raises :class:`TokenError` naming the token(s); returns the list."""
    src = f"{where}: " if where else ""
    if isinstance(tokens, str) or not isinstance(tokens, (list, tuple)) or not tokens:
        raise TokenError(f"{src}placeholder tokens must be a non-empty list of strings such as ['<alice>', '<bob>'], "
                         f"got {tokens!r}")
    tokens = list(tokens)
    if len(tokens) > MAX_TOKENS:
        raise TokenError(f"{src}{len(tokens)} placeholder tokens listed; at most {MAX_TOKENS} train together")
    for t in tokens:
        validate_token(t, where=where)
    seen = set()
    for t in tokens:
        if t in seen:
            raise TokenError(f"{src}placeholder token {t!r} is listed twice in {tokens}; each token must be distinct")
        seen.add(t)
    for a in tokens:
        for b in tokens:
            if a != b and a in b:
                raise TokenError(
                    f"{src}placeholder token {a!r} is part of {b!r} (tokens {tokens}): a prompt writing one could "
                    f"tokenize as the other plus pieces; pick tokens where none contains another, e.g. <alice> and <bob>")
    if tokenizer is not None:
        for t in tokens:
            validate_token(t, tokenizer, allow=allow, where=where)
    return tokens


def add_placeholder_tokens(tokenizer, tokens: list[str], *, where: str = "") -> list[int]:
    """Add ``tokens`` (in order) as additional special tokens and return their ids.

    Refuses what :func:`validate_tokens` refuses, before the tokenizer changes: a token already known to the
    tokenizer would not be fresh. Afterwards each token must encode to exactly its own id."""
    from transformers import AddedToken

    validate_tokens(tokens, tokenizer, where=where)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in tokens],
                         special_tokens=True)
    ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]
    for token, token_id in zip(tokens, ids):
        if check_single_id(tokenizer, token, context="after registration") is None:
            raise TokenError(f"placeholder token {token!r} still splits after registration; cannot train it")
        got = encode_ids(tokenizer, token)
        if got != [token_id]:
            raise TokenError(f"placeholder token {token!r} encodes to {got} after registration, not its own id "
                             f"{token_id}; pick tokens where none contains another")
    return ids


def add_placeholder_token(tokenizer, token: str, *, where: str = "") -> int:
    """Add ``token`` as an additional special token and return its id (:func:`add_placeholder_tokens` of one)."""
    return add_placeholder_tokens(tokenizer, [token], where=where)[0]


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
    """A frozen embedding table plus one trainable (or fixed) vector per placeholder token id.

    ``forward(ids)`` equals the base lookup except at each ``token_ids[i]``, where ``vectors[i]`` is used. The
    vectors stay float32 whatever the table's dtype (including fp8 storage), so a bf16/fp8 model still trains
    float rows. The first vector is the parameter ``vector`` (a one-token model is what it always was), further
    ones ``vector_1``, ``vector_2``, ...
    """

    def __init__(self, base: nn.Embedding, token_ids, vectors, trainable: bool = True):
        super().__init__()
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        vecs = [vectors] if isinstance(vectors, torch.Tensor) else list(vectors)
        if not ids or len(ids) != len(vecs):
            raise TokenError(f"{len(ids)} placeholder id(s) {ids} but {len(vecs)} vector(s): one vector per id")
        if len(set(ids)) != len(ids):
            raise TokenError(f"placeholder ids {ids} repeat an id: each token needs its own id")
        width = base.weight.shape[1]
        for vector in vecs:
            if vector.ndim != 1 or vector.shape[0] != width:
                raise TokenError(
                    f"placeholder vector has shape {tuple(vector.shape)} but the text encoder's embedding width is "
                    f"{width}: the archive was trained for a different text encoder"
                )
        self.base = base
        self.token_ids = ids
        self._names = ["vector" if i == 0 else f"vector_{i}" for i in range(len(ids))]
        for name, vector in zip(self._names, vecs):
            self.register_parameter(name, nn.Parameter(
                vector.detach().to(device=base.weight.device, dtype=torch.float32).clone(), requires_grad=trainable))

    @property
    def token_id(self) -> int:
        """The first token's id."""
        return self.token_ids[0]

    @property
    def vectors(self) -> list[nn.Parameter]:
        return [getattr(self, name) for name in self._names]

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
        for token_id, name in zip(self.token_ids, self._names):  # distinct ids: each where touches its own rows
            mask = (input_ids == token_id).unsqueeze(-1)
            out = torch.where(mask, getattr(self, name).to(out.dtype), out)
        return out


@dataclass
class RegisteredToken:
    """A registered placeholder: its string, its id in the tokenizer at hand, and its float32 vector (held by the
    :class:`PlaceholderEmbedding` for transformers models, at ``index``, or directly where another runtime
    embeds)."""

    token: str
    token_id: int
    module: PlaceholderEmbedding | None = None
    own_vector: nn.Parameter | None = None
    index: int = 0

    @property
    def vector(self) -> torch.Tensor:
        return self.module.vectors[self.index] if self.module is not None else self.own_vector


def install_placeholders(
    tokenizer,
    text_encoder,
    tokens: list[str],
    vectors: list[torch.Tensor] | None = None,
    *,
    init_std: float = 1e-5,
    trainable: bool = True,
    generator: torch.Generator | None = None,
    where: str = "",
) -> list[RegisteredToken]:
    """Register ``tokens`` and route each one's id to its own vector inside ``text_encoder``.

    The tokens must pass :func:`validate_tokens` against ``tokenizer`` in training and at inference alike. The
    vectors' widths are checked before the tokenizer or the text encoder is touched, so a refused archive leaves
    both as they were. Without ``vectors`` each token starts from N(0, ``init_std``), drawn in list order from
    ``generator`` (the first token gets what a one-token run gets). Every base weight is frozen.
    """
    base = base_embedding(text_encoder)
    if vectors is not None:
        if len(vectors) != len(tokens):
            raise TokenError(f"{len(tokens)} placeholder token(s) {list(tokens)} but {len(vectors)} vector(s)")
        for token, vector in zip(tokens, vectors):
            check_vector_width(vector, base.weight.shape[1], token, where)
    ids = add_placeholder_tokens(tokenizer, list(tokens), where=where)
    remove_placeholder(text_encoder)
    ensure_row(text_encoder, max(ids))
    base = base_embedding(text_encoder)
    if vectors is None:
        vectors = [init_vector(base.weight.shape[1], init_std, generator) for _ in tokens]
    for p in text_encoder.parameters():
        p.requires_grad_(False)
    module = PlaceholderEmbedding(base, ids, vectors, trainable=trainable)
    text_encoder.set_input_embeddings(module)
    return [RegisteredToken(token, token_id, module, index=i) for i, (token, token_id) in enumerate(zip(tokens, ids))]


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
    """:func:`install_placeholders` of one token (``fresh`` is kept for callers of the old signature)."""
    return install_placeholders(tokenizer, text_encoder, [token], None if vector is None else [vector],
                                init_std=init_std, trainable=trainable, generator=generator, where=where)[0]


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


def materialize(text_encoder) -> dict[int, torch.Tensor] | None:
    """Write each vector into its table row and unwrap (for exporting a plain text encoder); {id: vector}."""
    emb = text_encoder.get_input_embeddings()
    if not isinstance(emb, PlaceholderEmbedding):
        return None
    with torch.no_grad():
        for token_id, vector in zip(emb.token_ids, emb.vectors):
            emb.base.weight[token_id] = vector.to(emb.base.weight.dtype)
    text_encoder.set_input_embeddings(emb.base)
    return {token_id: vector.detach().clone() for token_id, vector in zip(emb.token_ids, emb.vectors)}
