"""Datasets: a folder or zip of images with same-name ``.txt`` captions, aspect-ratio buckets, batch order.

With several placeholder tokens, images may sit in folders named after them (``dataset/<alice>/…``,
``dataset/<bob>/…``): that folder's token is the image's token (prepended to a caption that lacks it, and what
``{token}`` in ``default_caption`` becomes). Images outside such folders keep their captions as they are.
"""

from __future__ import annotations

import json
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
MAX_DATASET_MEMBER_BYTES = 1 << 30  # one image or caption
TRANSPARENT_BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white (documented in README)


class DatasetError(ValueError):
    """The dataset is missing, empty, or has unreadable images or captions."""


@dataclass
class Example:
    image: Path
    caption: str
    size: tuple[int, int]  # original (w, h)
    bucket: tuple[int, int] = (0, 0)


def token_in_caption(caption: str, token: str) -> bool:
    return token in caption


def prepare_caption(raw: str | None, token: str | None, default_caption: str, prepend: bool) -> str:
    """The caption an image trains with: its text (else ``default_caption`` with ``{token}`` filled in), the token
    prepended where ``prepend`` and it is missing. ``token`` None: an image of no particular token (several
    tokens, not in a token folder): the text as it is."""
    caption = (raw or "").strip()
    if not caption:
        if token is None and "{token}" in default_caption:
            raise ValueError("has no caption and is in no token folder, so {token} in the default caption names no "
                             "token")
        caption = default_caption.replace("{token}", token or "")
    if prepend and token is not None and not token_in_caption(caption, token):
        caption = f"{token} {caption}"
    return caption


def folder_token(rel: Path, tokens: list[str]) -> str | None:
    """The token whose folder holds ``rel`` (a path relative to the dataset root): the deepest parent folder named
    exactly like one of ``tokens``, e.g. ``<alice>/beach/01.png`` -> ``<alice>``; None if there is none."""
    for part in reversed(rel.parts[:-1]):
        if part in tokens:
            return part
    return None


def resolve_dataset(path: str | os.PathLike, workdir: str | os.PathLike) -> Path:
    """A folder as is; a zip/tar extracted safely under ``workdir``."""
    path = Path(path)
    if path.is_dir():
        return path
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    dest = Path(workdir) / "dataset"
    safe_extract(path, dest, max_member_bytes=MAX_DATASET_MEMBER_BYTES, max_total_bytes=MAX_DATASET_BYTES)
    return dest


def read_caption(path: Path) -> str:
    """A caption file's text: UTF-8 (BOM or not), or UTF-16 / UTF-32 with a byte-order mark.

    Raises ``ValueError`` saying why for anything else (other encodings would be garbled silently, and a
    UTF-16 file without a BOM decodes as UTF-8 full of NUL characters).
    """
    raw = path.read_bytes()
    for bom, codec in ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xef\xbb\xbf", "utf-8-sig"),
                       (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if raw.startswith(bom):
            break
    else:
        codec = "utf-8"
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as e:
        raise ValueError(f"not {codec.upper().replace('-SIG', '')} text: byte 0x{raw[e.start]:02x} at offset {e.start}; "
                         "save it as UTF-8") from None
    if "\x00" in text:
        raise ValueError("holds NUL characters (UTF-16 without a byte-order mark?); save it as UTF-8")
    return text


def _dataset_files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS
        and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(root).parts)
    )


def scan_dataset(root: Path, token: str | list[str], default_caption: str, prepend: bool,
                 require_captions: bool = False) -> list[Example]:
    """Collect images (recursively, hidden files and __MACOSX skipped).

    ``token``: the placeholder token, or the list of them. With one token every image is its image (prepended
    where missing, with ``prepend``); with several, an image's token is the folder it sits in
    (:func:`folder_token`), and images outside token folders keep their captions as they are.

    Every image is decoded in full (a truncated JPEG passes a header check) with its EXIF orientation, and
    every caption is decoded. One :class:`DatasetError` lists every unreadable image, every caption that is
    not text and (with ``require_captions``) every image without a caption, before any model is loaded.
    """
    tokens = [token] if isinstance(token, str) else list(token)
    examples, bad, bad_captions, missing, unnamed = [], [], [], [], []
    for f in _dataset_files(root):
        rel = f.relative_to(root)
        try:
            size = open_image(f).size
        except DatasetError as e:
            bad.append(f"{rel} ({e})")
            continue
        txt = f.with_suffix(".txt")
        raw = None
        if txt.is_file():
            try:
                raw = read_caption(txt)
            except (ValueError, OSError) as e:
                bad_captions.append(f"{txt.relative_to(root)} ({e})")
                continue
        else:
            missing.append(str(rel))
        own = folder_token(rel, tokens) or (tokens[0] if len(tokens) == 1 else None)
        try:
            caption = prepare_caption(raw, own, default_caption, prepend)
        except ValueError:
            unnamed.append(str(rel))
            continue
        examples.append(Example(f, caption, size))
    problems = []
    if bad:
        problems.append(f"{len(bad)} unreadable image(s): {', '.join(bad)}")
    if bad_captions:
        problems.append(f"{len(bad_captions)} caption file(s) that are not text: {', '.join(bad_captions)}")
    if require_captions and missing:
        problems.append(f"{len(missing)} image(s) without a same-name .txt caption: {', '.join(missing)} "
                        "(add captions or set a default caption)")
    if unnamed and not (require_captions and missing):
        problems.append(f"{len(unnamed)} image(s) without a caption outside the token folders: {', '.join(unnamed)} "
                        f"(with several tokens {{token}} in the default caption {default_caption!r} names none of "
                        f"{tokens}: caption them, or move them into a folder named after their token, e.g. "
                        f"{tokens[0]}/)")
    if problems:
        raise DatasetError(f"dataset {root}: " + "; ".join(problems))
    if not examples:
        raise DatasetError(
            f"dataset {root}: no usable images (looked for {', '.join(sorted(IMAGE_EXTS))} with same-name .txt captions)"
        )
    if missing:
        logger.info("%d of %d images have no .txt caption; using %r", len(missing), len(examples), default_caption)
    return examples


def open_image(path: Path):
    """The image fully decoded, EXIF orientation applied, as 8-bit RGB (see :func:`to_rgb`).

    Raises :class:`DatasetError` saying why an image is unusable: not an image, truncated or corrupt, or
    too large (PIL's decompression-bomb limit).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # decodes every pixel: truncated files fail here, not after the model loaded
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except Image.DecompressionBombError as e:
        raise DatasetError(f"too large: {e}") from None
    except UnidentifiedImageError:
        raise DatasetError("UnidentifiedImageError: not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DatasetError(f"{e.__class__.__name__}: {e}") from None


def to_rgb(im):
    """8-bit RGB from any mode PIL gives for our formats.

    16-bit grayscale (``I;16``/``I``) is scaled from 0..65535 (PIL's ``convert('RGB')`` clips it: white);
    images with transparency are composited on ``TRANSPARENT_BACKGROUND`` rather than keeping whatever colour
    the transparent pixels happen to hold.
    """
    import numpy as np
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        arr = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, TRANSPARENT_BACKGROUND + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def dataset_fingerprint(examples: list[Example]) -> dict:
    """What a checkpoint remembers of its dataset, for ``--resume`` to compare: the image count and a SHA-256
    over every image's path (relative to the dataset folder), file size, pixel size and caption. Cheap (no
    image is read again), and any added, removed, renamed, re-encoded or re-captioned image changes it."""
    import hashlib

    h = hashlib.sha256()
    if examples:
        root = Path(os.path.commonpath([str(e.image.parent) for e in examples]))
        for ex in sorted(examples, key=lambda e: e.image.relative_to(root).as_posix()):
            rec = [ex.image.relative_to(root).as_posix(), ex.image.stat().st_size, list(ex.size), ex.caption]
            h.update(json.dumps(rec).encode() + b"\n")
    return {"images": len(examples), "sha256": h.hexdigest()}


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
    """Resize to cover the bucket, centre-crop, -> float tensor (3, H, W) in [-1, 1] (decoded as the scan did)."""
    import numpy as np
    from PIL import Image

    bw, bh = bucket
    im = open_image(path)
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
