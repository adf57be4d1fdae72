"""Cog trainer: a zip of image-caption pairs -> weights.zip, through the project's core.

With several GPUs (or QZP_TRAIN_PROCESSES=N) it trains data-parallel under torchrun, one process per GPU.
Defaults and bounds are literals (Cog's static schema generator needs them) and are checked against
``training.config`` by the tests.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path as _Path

from cog import BaseModel, Input, Path

from cog_support import config_for_training, run_training


class TrainingOutput(BaseModel):
    weights: Path


def train(
    dataset: Path = Input(description="Zip of images with same-name .txt captions."),
    rank: int = Input(default=16, ge=1, le=1024, description="LoRA rank."),
    steps: int = Input(default=1000, ge=1, le=1000000, description="Optimizer steps."),
    learning_rate: float = Input(default=1e-4, ge=0.0, le=1.0, description="LoRA learning rate (AdamW)."),
    token_learning_rate: float = Input(
        default=5e-3, ge=0.0, le=1.0,
        description="Learning rate of the placeholder token's embedding row (weight decay 0).",
    ),
    train_placeholder_token: bool = Input(
        default=False,
        description="Train a fresh zero-prior token (placeholder_token) together with the LoRA. Off: plain LoRA.",
    ),
    placeholder_token: str = Input(
        default="<zwx>",
        description="The new special token written in prompts, e.g. <zwx>; several tokens trained together: a "
        "comma-separated list, e.g. <alice>,<bob> (each its own vector, one LoRA).",
    ),
    placeholder_init_std: float = Input(
        default=1e-5, ge=0.0, le=1.0, description="Std of the token row's N(0, std) init; 0 gives exact zeros."
    ),
    resolution: int = Input(
        default=1024, ge=16, le=4096,
        description="Training resolution (area of the aspect-ratio buckets), multiple of 16.",
    ),
    batch_size: int = Input(default=1, ge=1, le=256, description="Images per step."),
    seed: int = Input(default=42, ge=0, le=4294967295, description="Random seed (data order, noise, init)."),
) -> TrainingOutput:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = config_for_training(
        rank=rank, steps=steps, learning_rate=learning_rate, token_learning_rate=token_learning_rate,
        train_placeholder_token=train_placeholder_token, placeholder_token=placeholder_token,
        placeholder_init_std=placeholder_init_std, resolution=resolution, batch_size=batch_size, seed=seed,
    )
    out_dir = _Path(tempfile.mkdtemp(prefix="qzp-train-"))
    archive = out_dir / "weights.zip"
    print(run_training(cfg, _Path(dataset), archive))  # one process per GPU under torchrun when there are several
    return TrainingOutput(weights=Path(archive))
