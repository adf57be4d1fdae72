"""The text encoder's parts that text conditioning never runs: the vision tower and the LM head.

Qwen-Image conditions on the text decoder's hidden states (``QwenImagePipeline.encode_prompt`` reads
``hidden_states[-1]``; training calls the decoder directly, ``training/prompt.py``). The vision tower runs only for
image inputs, and the LM head only turns hidden states into next-token logits. Together they are 2.3 GiB of
Qwen2.5-VL-7B in bf16 (0.68B + 0.54B values) and about as much of Qwen3-VL-8B: on an 80 GB card that is a third of
what the fp8 backward copies need (issue #15).

:func:`park` leaves them in CPU memory while training, and :func:`left_behind` keeps a move of the whole pipeline
(``pipe.to(device)``) from taking them to the GPU and back. The LM head is replaced by :class:`NoLogits`, so a pipeline
call (the trainer's sample images) still runs: transformers' ``*ForConditionalGeneration.forward`` always applies
its ``lm_head``, and the logits it returned (152064 per token) were never read.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


class NoLogits(nn.Module):
    """Stands in for a text encoder's LM head: no logits (a zero-width tensor). The head it replaced is kept, not
    registered (``.to()`` and ``state_dict`` leave it alone), for :func:`unpark`."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.replaced = [head]  # a list: not a submodule

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.new_empty(*hidden_states.shape[:-1], 0)


def _vision(text_encoder) -> nn.Module | None:
    return getattr(getattr(text_encoder, "model", None), "visual", None)


def unused_tensors(text_encoder, parameters_only: bool = False) -> list[torch.Tensor]:
    """The vision tower's and the LM head's tensors (the head :class:`NoLogits` replaced, if it did), once each,
    without a tied head's weight (the embedding table's: it stays with the table)."""
    embed = text_encoder.get_input_embeddings().weight
    head = getattr(text_encoder, "lm_head", None)
    if isinstance(head, NoLogits):
        head = head.replaced[0]
    seen, out = {id(embed)}, []
    for mod in (_vision(text_encoder), head):
        if mod is None:
            continue
        for t in (*mod.parameters(), *(() if parameters_only else mod.buffers())):
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


def unused_bytes(text_encoder, parameters_only: bool = False) -> int:
    """Bytes :func:`park` keeps off the GPU: the vision tower's and the LM head's (a tied head's weight excepted:
    the embedding table needs it). ``parameters_only``: without buffers (as ``memory.module_bytes`` counts)."""
    return sum(t.numel() * t.element_size() for t in unused_tensors(text_encoder, parameters_only))


def placed_bytes(text_encoder) -> int:
    """The text encoder's parameter bytes that training keeps on its device: all but :func:`unused_bytes`'s, parked
    or not yet."""
    unused = {id(t) for t in unused_tensors(text_encoder, parameters_only=True)}
    return sum(p.numel() * p.element_size() for p in text_encoder.parameters() if id(p) not in unused)


def park(text_encoder) -> int:
    """Leave ``text_encoder``'s vision tower and LM head in CPU memory and replace the head with :class:`NoLogits`
    (a tied head's weight, the embedding table's, stays where it is). Returns the bytes it took off another device.
    Idempotent."""
    moved = sum(t.numel() * t.element_size() for t in unused_tensors(text_encoder) if t.device.type != "cpu")
    embed = text_encoder.get_input_embeddings().weight
    head = getattr(text_encoder, "lm_head", None)
    for mod in (_vision(text_encoder), None if isinstance(head, NoLogits) else head):
        if mod is not None and not any(p is embed for p in mod.parameters()):  # a tied head stays with the table
            mod.to("cpu")
    if head is not None and not isinstance(head, NoLogits):
        text_encoder.lm_head = NoLogits(head)
    if moved:
        logger.info("text encoder: vision tower and LM head (%.2f GiB) left in CPU memory; text conditioning does "
                    "not run them", moved / 2**30)
    return moved


def unpark(text_encoder) -> None:
    """Undo :func:`park`'s head replacement (the parts stay where they are: ``.to(device)`` moves them back)."""
    head = getattr(text_encoder, "lm_head", None)
    if isinstance(head, NoLogits):
        text_encoder.lm_head = head.replaced[0]


@contextlib.contextmanager
def left_behind(text_encoder):
    """Within the block, moving ``text_encoder`` (its ``.to(device)``, or its pipeline's) leaves the vision tower and
    the LM head in CPU memory: :func:`park` first, then the vision tower is unregistered from its owner until the
    block ends (``nn.Module.to`` has no exclusion; the traversal skips a child that is None). Training places the
    pipeline this way: 2.3 GiB of Qwen2.5-VL-7B that would cross to the GPU and straight back, and that the GPU would
    hold while the weights are placed."""
    park(text_encoder)
    vision = _vision(text_encoder)
    owner = getattr(text_encoder, "model", None)
    name = next((k for k, v in owner._modules.items() if v is vision), None) if vision is not None else None
    if name is None:
        yield
        return
    owner._modules[name] = None
    try:
        yield
    finally:
        owner._modules[name] = vision
