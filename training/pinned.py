"""Pinned (page-locked) CPU memory for many streamed weights, without PyTorch's power-of-two rounding.

Streamed weights (``offload.OffloadedLinear``, ``exact_linear.StreamedExactLinear``) live in pinned CPU memory so that
their copies to the GPU run asynchronously. ``tensor.pin_memory()`` takes that memory from PyTorch's caching host
allocator, which rounds every allocation up to the next power of two (``CachingHostAllocator``: "to improve reuse",
unless ``pinned_max_round_threshold`` is set). Weights are rarely powers of two: Qwen-Image's 3072x12288 MLP weights
in e4m3 (37.7 MB) take 64 MB, Qwen2.5-VL's 18944x3584 ones (67.9 MB) 128 MB, so a model's streamed weights held
1.6-1.9x their bytes in memory the OS cannot page out. :class:`PinnedPack` copies them into chunks of ``chunk_bytes``
(a power of two: nothing rounded), each at a 512-byte aligned offset in the first chunk with room (first fit: the
smaller weights fill the room the larger ones leave at a chunk's end); a weight larger than a chunk gets its own
allocation (rounded as before).
"""

from __future__ import annotations

import torch

# a power of two (PyTorch's host allocator rounds nothing), several of the largest weights long: packed first fit, in
# the order they come, Qwen-Image's 28 streamed fp8 blocks (8.86 GiB of weights) take 9.0 GiB here against 14.0 with
# pin_memory() per weight, Qwen2.5-VL's e4m3 projections (6.08 GiB) 6.5 against 11.5, its bf16 ones (12.15 GiB) 14.0
# against 23.0 (computed from the shapes; 256 MiB chunks left more room unused at their ends: 7.0 and 21.0)
CHUNK_BYTES = 512 * 2**20
_ALIGN = 512  # bytes: every weight starts aligned for any dtype and for DMA


class PinnedPack:
    """CPU copies of tensors packed into shared chunks of page-locked memory (ordinary memory with ``pin=False``:
    the same packing where there is no CUDA). The copies are views that keep their chunk alive; nothing else frees
    it. ``held_bytes``: the memory the chunks and the large weights' own allocations take; ``used_bytes``: the
    tensors' own bytes."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, pin: bool = True):
        if chunk_bytes <= 0 or chunk_bytes & (chunk_bytes - 1):
            raise ValueError(f"PinnedPack: chunk_bytes must be a positive power of two, got {chunk_bytes!r}")
        self.chunk_bytes, self.pin = int(chunk_bytes), pin
        self._chunks: list[list] = []  # [chunk tensor, bytes taken], oldest first
        self.held_bytes = 0
        self.used_bytes = 0

    def _empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` (any device, any dtype) in the pack's CPU memory, same shape and dtype, contiguous."""
        nbytes = t.numel() * t.element_size()
        self.used_bytes += nbytes
        if nbytes > self.chunk_bytes:  # its own allocation (the host allocator rounds it; rare: none in Qwen-Image)
            own = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)
            self.held_bytes += 1 << (nbytes - 1).bit_length() if self.pin else nbytes
            return own.copy_(t)
        for entry in self._chunks:
            start = -(-entry[1] // _ALIGN) * _ALIGN
            if start + nbytes <= self.chunk_bytes:
                break
        else:
            entry, start = [self._empty(self.chunk_bytes), 0], 0
            self._chunks.append(entry)
            self.held_bytes += self.chunk_bytes
        entry[1] = start + nbytes
        view = entry[0][start:start + nbytes].view(t.dtype).view(t.shape)
        return view.copy_(t)


__all__ = ["CHUNK_BYTES", "PinnedPack"]
