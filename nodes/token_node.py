"""Register Zero-Prior Token: CLIP + archive -> a clone whose tokenizer knows the archive's token(s) and whose
text encoder sees each trained vector at every occurrence of its token.

ComfyUI's Qwen tokenizer ignores ``embedding:`` syntax, so the token is registered in (a copy of) the HF
tokenizer inside ComfyUI's tokenizer, which then gives it one id (151669 with ComfyUI's bundled vocabulary,
not Qwen-Image's 151665 — the mapping is by string). Each occurrence of that id in the token list is then
replaced by the vector itself, the mechanism ``comfy/sd1_clip.py: process_tokens`` already has for embeddings.
One list entry stays one vector, so Qwen-Image's template drop (which counts positions) is unchanged, and the
text encoder's weights are never touched: bf16/fp16 and fp8-stored encoders behave the same. An archive of
several tokens registers all of them (ids 151669, 151670, ... in its training order); the node's ``token_id``
output is the first token's id and its ``token_ids`` output every token's id as a JSON object.

Qwen-Image 2.1's text encoder is Qwen3-VL-8B: ComfyUI has it since 0.33 (``comfy/text_encoders/qwen3vl.py``,
``Qwen3VLTEModel``; ComfyUI >= 0.37 adds 2.1's own ``qwen_image21.QwenImage21TEModel`` on it). Its tokenizer is
the same bundled ``qwen25_tokenizer`` and ``process_tokens`` the same, so the token registers the same way (id
151669 there too); an archive's ``model_family`` must match the CLIP's (one error naming both).
"""

from __future__ import annotations

import copy
import importlib
import json
import logging

import torch
from comfy_api.latest import io

from ..training.families import QWEN_IMAGE, QWEN_IMAGE_21, check_archive_family, get_family
from ..training.token import check_single_id, ensure_token, validate_tokens
from .sockets import CATEGORY, ZeroPriorArchive

logger = logging.getLogger(__name__)


class ZeroPriorTokenizer:
    """Wraps a ComfyUI tokenizer; replaces registered token ids by their vectors in every token list."""

    def __init__(self, inner, vectors: dict[int, torch.Tensor], names: dict[int, str]):
        self._inner = inner
        self._vectors = vectors
        self._names = names

    def __getattr__(self, name):  # delegate everything else (clip_name, state_dict, untokenize, ...)
        if name.startswith("__") or name in ("_inner", "_vectors", "_names"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs):
        out = self._inner.tokenize_with_weights(text, return_word_ids=return_word_ids, **kwargs)
        for batches in out.values():
            if not isinstance(batches, list):  # e.g. ComfyUI >= 0.37's 2.1 tokenizer adds a "keep_vision" flag
                continue
            for batch in batches:
                for i, entry in enumerate(batch):
                    tok = entry[0]
                    if isinstance(tok, int) and tok in self._vectors:
                        batch[i] = (self._vectors[tok],) + tuple(entry[1:])
        return out

    def state_dict(self):
        return self._inner.state_dict()


# ComfyUI's Qwen3-VL text-encoder classes (module, class): absent from versions before 0.33 / 0.37
_QWEN3VL_TE = (("comfy.text_encoders.qwen3vl", "Qwen3VLTEModel"),
               ("comfy.text_encoders.qwen_image21", "QwenImage21TEModel"))


def _qwen3vl_classes() -> tuple[type, ...]:
    found = []
    for module, name in _QWEN3VL_TE:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # this ComfyUI predates it
            continue
    return tuple(found)


def text_encoder_parts(clip, node: str = "Register Zero-Prior Token"):
    """(ComfyUI tokenizer, its SD tokenizer, embedding width, model family) of a Qwen-Image (Qwen2.5-VL) or
    Qwen-Image 2.1 (Qwen3-VL) CLIP, or a clear error naming ``node`` for other CLIPs."""
    from comfy.text_encoders.qwen_image import QwenImageTEModel

    model = clip.cond_stage_model
    qwen3vl = _qwen3vl_classes()
    if isinstance(model, QwenImageTEModel):
        family = QWEN_IMAGE
    elif qwen3vl and isinstance(model, qwen3vl):
        family = QWEN_IMAGE_21
    else:
        raise TypeError(
            f"{node} needs Qwen-Image's text encoder (load it with CLIPLoader, type "
            f"'qwen_image') or Qwen-Image 2.1's Qwen3-VL text encoder (ComfyUI 0.33 or newer); this CLIP is "
            f"{type(model).__name__}"
        )
    tok = clip.tokenizer._inner if isinstance(clip.tokenizer, ZeroPriorTokenizer) else clip.tokenizer
    sd_tok = getattr(tok, tok.clip)
    width = getattr(model, model.clip).transformer.get_input_embeddings().weight.shape[1]
    return tok, sd_tok, width, family


def register_token(clip, archive):
    """A clone of ``clip`` with every token of ``archive`` registered, and ``{token: id}`` in ComfyUI's tokenizer
    (training order; ``{}`` for an archive without tokens, which passes ``clip`` through). The input CLIP is
    untouched."""
    if not archive.has_token:
        logger.info("archive %s has no placeholder token; CLIP passed through", archive.source)
        return clip, {}
    base_tok, _, width, family = text_encoder_parts(clip)
    check_archive_family(archive.meta, get_family(family), archive.source or "archive")
    tokens = archive.tokens
    for token in tokens:
        vector = archive.vectors[token]
        if vector.shape[0] != width:
            raise ValueError(
                f"archive {archive.source}: token {token!r} has a {vector.shape[0]}-wide vector but this text "
                f"encoder's embeddings are {width}-wide; the archive was trained for another model"
            )
    # the same checks training and the core's inference apply: no special / vocabulary / invisible tokens, a list
    # of distinct tokens none of which contains another
    ours = set(clip.tokenizer._names.values()) if isinstance(clip.tokenizer, ZeroPriorTokenizer) else set()
    validate_tokens(tokens, getattr(base_tok, base_tok.clip).tokenizer, allow=ours, where=f"archive {archive.source}")
    tok = copy.deepcopy(base_tok)  # CLIP.clone() shares the tokenizer: never mutate the input's
    sd_tok = getattr(tok, tok.clip)
    vectors, names = {}, {}
    if isinstance(clip.tokenizer, ZeroPriorTokenizer):  # chain: keep tokens registered earlier
        vectors.update(clip.tokenizer._vectors)
        names.update(clip.tokenizer._names)
        for earlier in names.values():
            ensure_token(sd_tok.tokenizer, earlier)
    ids = {}
    for token in tokens:
        token_id = ensure_token(sd_tok.tokenizer, token)
        sd_tok.inv_vocab[token_id] = token
        ids[token] = token_id
    for token, token_id in ids.items():
        if check_single_id(sd_tok.tokenizer, token, context="ComfyUI tokenizer") is None:
            raise ValueError(f"token {token!r} does not tokenize to one id in ComfyUI's tokenizer")
        vectors[token_id] = archive.vectors[token].detach().to(torch.float32).clone()
        names[token_id] = token
    out = clip.clone()
    out.tokenizer = ZeroPriorTokenizer(tok, vectors, names)
    for (token, token_id), trained in zip(ids.items(), archive.meta.token_ids):
        logger.info("registered %r as id %d in ComfyUI's tokenizer (id %s at training time)", token, token_id, trained)
    return out, ids


class RegisterZeroPriorToken(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZeroPriorRegisterToken",
            display_name="Register Zero-Prior Token",
            category=CATEGORY,
            description="Patches a clone of Qwen-Image's CLIP (or Qwen-Image 2.1's Qwen3-VL) so that the archive's "
            "placeholder token (e.g. <zwx>; every one of them for an archive of several) is one token whose embedding "
            "is the trained vector. Write the token(s) in CLIPTextEncode prompts.",
            inputs=[
                io.Clip.Input("clip", tooltip="Qwen-Image's text encoder (CLIPLoader, type qwen_image), or Qwen-Image "
                              "2.1's Qwen3-VL-8B (ComfyUI 0.33+) for a 2.1 archive."),
                ZeroPriorArchive.Input("archive", tooltip="From Load Placeholder Archive."),
            ],
            outputs=[
                io.Clip.Output(display_name="CLIP", tooltip="A clone that understands the token; the input is unchanged."),
                io.Int.Output(display_name="token_id", tooltip="The (first) token's id in ComfyUI's tokenizer; -1 "
                              "for an archive without a token."),
                io.String.Output(display_name="token_ids", tooltip="Every token's id in ComfyUI's tokenizer, as JSON "
                                 "in training order, e.g. {\"<alice>\": 151669, \"<bob>\": 151670}; {} without a token."),
            ],
        )

    @classmethod
    def execute(cls, clip, archive) -> io.NodeOutput:
        out, ids = register_token(clip, archive)
        if not ids:
            return io.NodeOutput(clip, -1, "{}", ui={"text": ["archive has no token: CLIP passed through"]})
        info = [f"{token} -> id {token_id} ({trained} at training time)"
                for (token, token_id), trained in zip(ids.items(), archive.meta.token_ids)]
        return io.NodeOutput(out, next(iter(ids.values())), json.dumps(ids), ui={"text": info})
