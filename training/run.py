"""High-level entry points shared by the CLI, Cog and the demo."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import distributed
from .archive import load_archive
from .config import Config
from .data import resolve_dataset, scan_dataset
from .inference import GenerateOptions, InferenceSession
from .models import load_pipeline
from .trainer import Callbacks, Trainer, TrainResult

logger = logging.getLogger(__name__)


def train(cfg: Config, dataset: str | Path, archive_path: str | Path, *, output_dir: str | Path | None = None,
          resume: str | Path | None = None, pipe=None, callbacks: Callbacks | None = None) -> TrainResult:
    """Train LoRA (+ the zero-prior token if enabled) on ``dataset`` and write ``archive_path``.

    ``output_dir`` (default: the archive's folder) receives checkpoints/, samples/ and the loss plot. Under
    ``torchrun`` / ``accelerate launch`` every process runs this; they train data-parallel and rank 0 writes.
    """
    ctx = distributed.from_env()
    try:
        return _train(cfg, dataset, archive_path, output_dir, resume, pipe, callbacks, ctx)
    finally:
        distributed.shutdown(ctx)


def _train(cfg, dataset, archive_path, output_dir, resume, pipe, callbacks, ctx) -> TrainResult:
    archive_path = Path(archive_path)
    output_dir = Path(output_dir) if output_dir is not None else archive_path.parent
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qzp-data-") as work:
        root = resolve_dataset(dataset, work)
        t = cfg.train
        examples = scan_dataset(root, t.placeholder_token, t.default_caption,
                                t.prepend_token and t.train_placeholder_token)
        logger.info("dataset: %d images from %s", len(examples), dataset)
        if pipe is None:
            pipe = load_pipeline(cfg.model, device=ctx.device() if ctx.enabled and cfg.model.device == "auto" else None)
        trainer = Trainer(cfg, pipe, examples, output_dir, dist=ctx)
        if resume:
            trainer.resume(resume)
        return trainer.fit(archive_path, callbacks)


@dataclass
class DemoResult:
    archive: Path
    image: Path
    loss_plot: Path | None
    first_loss: float
    last_loss: float
    token_id: int | None
    seconds: float


def demo(output_dir: str | Path, steps: int = 150, resolution: int = 64, family: str = "qwen-image") -> DemoResult:
    """Offline: a tiny random model of ``family`` (real classes: Qwen-Image or Qwen-Image 2.1) + a synthetic
    dataset -> token + LoRA -> weights.zip -> PNG."""
    from .families import QWEN_IMAGE_21, get_family
    from .tiny import make_synthetic_dataset, save_tiny_pipeline, save_tiny_pipeline_21

    fam = get_family(family)
    t0 = time.time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save = save_tiny_pipeline_21 if fam.name == QWEN_IMAGE_21 else save_tiny_pipeline
    model_dir = save(out / f"tiny-{fam.name}")
    data_dir = make_synthetic_dataset(out / "dataset", n=4, size=resolution)
    cfg = Config.from_dict({
        "model": {"base_model": str(model_dir), "family": fam.name, "dtype": "float32", "device": "cpu"},
        "train": {"train_placeholder_token": True, "placeholder_token": "<zwx>", "rank": 4, "steps": steps,
                  "learning_rate": 2e-3, "token_learning_rate": 2e-2, "resolution": resolution,
                  "checkpoint_every": 0, "seed": 0},
        "debug": {"log_prompt_ids": True},
    })
    result = train(cfg, data_dir, out / "weights.zip")
    session = InferenceSession(load_pipeline(cfg.model))
    session.apply(load_archive(result.archive), lora_scale=1.0)
    img = session.generate(GenerateOptions("a photo of <zwx>", steps=4, guidance=1.0, width=resolution,
                                           height=resolution, seed=0))
    image_path = out / "demo.png"
    img.save(image_path)
    k = max(1, len(result.losses) // 10)  # per-step losses are noisy (random timesteps): compare tenths
    first, last = sum(result.losses[:k]) / k, sum(result.losses[-k:]) / k
    return DemoResult(result.archive, image_path, result.loss_plot, first, last, result.token_id, time.time() - t0)
