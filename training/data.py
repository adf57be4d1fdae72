"""Datasets: a folder or zip of images with same-name ``.txt`` captions, aspect-ratio buckets, batch order."""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .archive import safe_extract

logger = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
BUCKET_STEP = 16  # VAE factor 8 x patch 2 for the real model
MAX_DATASET_BYTES = 8 << 30


class DatasetError(ValueError):
    """The dataset is missing, empty, or has unreadable images."""


@dataclass
class Example:
    image: Path
    caption: str
    size: tuple[int, int]  # original (w, h)
    bucket: tuple[int, int] = (0, 0)


def token_in_caption(caption: str, token: str) -> bool:
    return token in caption


def prepare_caption(raw: str | None, token: str, default_caption: str, prepend: bool) -> str:
    caption = (raw or "").strip() or default_caption.replace("{token}", token)
    if prepend and not token_in_caption(caption, token):
        caption = f"{token} {caption}"
    return caption


def resolve_dataset(path: str | os.PathLike, workdir: str | os.PathLike) -> Path:
    """A folder as is; a zip/tar extracted safely under ``workdir``."""
    path = Path(path)
    if path.is_dir():
        return path
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    dest = Path(workdir) / "dataset"
    safe_extract(path, dest, max_total_bytes=MAX_DATASET_BYTES)
    return dest


def scan_dataset(root: Path, token: str, default_caption: str, prepend: bool,
                 require_captions: bool = False) -> list[Example]:
    """Collect images (recursively, hidden files and __MACOSX skipped).

    Raises one :class:`DatasetError` naming every unreadable image (and, with ``require_captions``, every
    image without a caption) before any training starts.
    """
    from PIL import Image, UnidentifiedImageError

    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS
        and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(root).parts)
    )
    examples, bad, no_caption = [], [], 0
    for f in files:
        try:
            with Image.open(f) as im:
                im.verify()
            with Image.open(f) as im:
                size = im.size
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            bad.append(f"{f.relative_to(root)} ({e.__class__.__name__})")
            continue
        txt = f.with_suffix(".txt")
        raw = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else None
        no_caption += raw is None
        examples.append(Example(f, prepare_caption(raw, token, default_caption, prepend), size))
    if bad:
        raise DatasetError(f"dataset {root}: {len(bad)} unreadable image(s): {', '.join(bad[:10])}")
    if require_captions and no_caption:
        missing = [str(e.image.relative_to(root)) for e in examples if not e.image.with_suffix(".txt").is_file()]
        raise DatasetError(
            f"dataset {root}: {len(missing)} image(s) without a same-name .txt caption: {', '.join(missing[:10])} "
            "(add captions or set a default caption)"
        )
    if not examples:
        raise DatasetError(
            f"dataset {root}: no usable images (looked for {', '.join(sorted(IMAGE_EXTS))} with same-name .txt captions)"
        )
    if no_caption:
        logger.info("%d of %d images have no .txt caption; using %r", no_caption, len(examples), default_caption)
    return examples


def make_buckets(resolution: int, step: int = BUCKET_STEP, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(w, h) pairs with area close to resolution**2, sides multiples of ``step``, aspect within max_ratio."""
    area = resolution * resolution
    out = set()
    w = max(step, int(resolution / math.sqrt(max_ratio)) // step * step)
    while w <= resolution * math.sqrt(max_ratio) + 1e-6:
        h = max(step, round(area / w / step) * step)
        if 1 / max_ratio <= w / h <= max_ratio:
            out.add((w, h))
        w += step
    out.add((resolution, resolution))
    return sorted(out)


def assign_buckets(examples: list[Example], resolution: int, step: int = BUCKET_STEP) -> list[Example]:
    """Give each example the bucket nearest its aspect ratio (sides multiples of ``step``: the model family's
    ``bucket_step``, 32 for Qwen-Image 2.1)."""
    buckets = make_buckets(resolution, step)
    for ex in examples:
        w, h = ex.size
        ar = math.log(w / h)
        ex.bucket = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), abs(b[0] * b[1] - resolution**2)))
    return examples


def load_pixels(path: Path, bucket: tuple[int, int]) -> torch.Tensor:
    """Resize to cover the bucket, centre-crop, -> float tensor (3, H, W) in [-1, 1]."""
    import numpy as np
    from PIL import Image

    bw, bh = bucket
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = max(bw / im.width, bh / im.height)
        nw, nh = max(bw, round(im.width * scale)), max(bh, round(im.height * scale))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - bw) // 2, (nh - bh) // 2
        im = im.crop((left, top, left + bw, top + bh))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class BatchPlan:
    """Deterministic batches: step ``s`` always gets the same examples for a given seed (exact resume).

    Each epoch shuffles every bucket's examples with ``seed + epoch`` and interleaves the buckets' batches;
    a batch never mixes buckets. ``shard(rank, world)`` gives each data-parallel rank its own slice.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world = rank, world
        self._epochs: dict[int, list[list[int]]] = {}

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            by_bucket: dict[tuple[int, int], list[int]] = {}
            for i, ex in enumerate(self.examples):
                by_bucket.setdefault(ex.bucket, []).append(i)
            batches = []
            global_bs = self.batch_size * self.world
            for key in sorted(by_bucket):
                idx = by_bucket[key][:]
                rng.shuffle(idx)
                while len(idx) < global_bs:  # tiny buckets: repeat rather than drop
                    idx += idx[: global_bs - len(idx)]
                for j in range(0, len(idx) - global_bs + 1, global_bs):
                    batches.append(idx[j : j + global_bs])
            rng.shuffle(batches)
            self._epochs = {epoch: batches}
        return self._epochs[epoch]

    def batches_per_epoch(self) -> int:
        return len(self._epoch(0))

    def batch(self, step: int) -> list[int]:
        per = self.batches_per_epoch()
        full = self._epoch(step // per)[step % per]
        return full[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
