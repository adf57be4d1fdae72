"""Cog predictor: prompt (+ optional trained weights.zip) -> PNG, through the project's core.

The base model comes from QWEN_IMAGE_MODEL (a local diffusers folder or a hub id; default Qwen/Qwen-Image).
The last applied archive is kept: the same weights are neither re-extracted nor re-loaded; different weights
replace the previous token and LoRA completely. A prediction whose weights fail to load leaves the base model
(nothing loaded), so the next prediction loads its weights afresh. An archive's ``base_model`` is ignored here:
the base model is the one QWEN_IMAGE_MODEL names, so an archive never makes the predictor download anything.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path as _Path

from cog import BasePredictor, Input, Path

from cog_support import ENV_MODEL, model_config

try:
    from qwen_zero_prior.training.archive import load_archive
    from qwen_zero_prior.training.families import FamilyMismatchError, archive_family
    from qwen_zero_prior.training.inference import GenerateOptions, InferenceSession
    from qwen_zero_prior.training.models import load_pipeline
except ImportError:  # source folder on sys.path inside a Cog image
    from training.archive import load_archive  # type: ignore[no-redef]
    from training.families import FamilyMismatchError, archive_family  # type: ignore[no-redef]
    from training.inference import GenerateOptions, InferenceSession  # type: ignore[no-redef]
    from training.models import load_pipeline  # type: ignore[no-redef]

logger = logging.getLogger("qwen_zero_prior.cog")


def _sha256(path: _Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Predictor(BasePredictor):
    def setup(self) -> None:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        cfg = model_config()
        self.session = InferenceSession(load_pipeline(cfg))
        self.base_model = cfg.base_model
        self.weights_digest: str | None = None
        print(f"loaded base model {cfg.base_model} ({self.session.family.title}, {cfg.dtype})")

    def _use_weights(self, weights: _Path | None, lora_scale: float) -> None:
        if weights is None:
            if self.weights_digest is not None or self.session.archive is not None:
                self.session.clear()
                self.weights_digest = None
                print("weights removed: base model")
            return
        digest = _sha256(weights)
        if digest == self.weights_digest and self.session.archive is not None:
            self.session.set_lora_scale(lora_scale)
            print(f"weights unchanged (sha256 {digest[:12]}): reusing the loaded token and LoRA")
            return
        # forget the previous weights before anything can fail: after a failed load the state is "nothing
        # loaded" (the base model), never the previous archive's digest over half-applied weights
        self.weights_digest = None
        try:
            archive = load_archive(weights)  # ArchiveError with a clear message -> failed prediction
            try:
                self.session.apply(archive, lora_scale=lora_scale)  # clears itself on failure
            except FamilyMismatchError as e:
                trained = archive_family(archive.meta)
                raise FamilyMismatchError(f"{e} This predictor serves {self.base_model} ({ENV_MODEL}); deploy one "
                                          f"with {ENV_MODEL} set to a {trained.title} model for these weights.") from None
        except BaseException:
            self.session.clear()
            raise
        self.weights_digest = digest
        ids = self.session.token_ids
        tokens = (("token " if len(ids) == 1 else "tokens ") + ", ".join(f"{t!r} id {i}" for t, i in ids.items())
                  if ids else "no token")
        print(f"weights loaded (sha256 {digest[:12]}, {archive_family(archive.meta).title}): {tokens}, "
              f"LoRA {'yes' if archive.has_lora else 'no'}")

    def predict(
        self,
        prompt: str = Input(description="Prompt; write the placeholder token (e.g. <zwx>) where the concept goes."),
        negative_prompt: str = Input(default=" ", description="Negative prompt (used when guidance > 1)."),
        steps: int = Input(default=30, ge=1, le=100, description="Denoising steps."),
        guidance: float = Input(default=4.0, ge=1.0, le=20.0, description="True-CFG scale (1 disables CFG)."),
        width: int = Input(default=1024, ge=64, le=2048, description="Image width."),
        height: int = Input(default=1024, ge=64, le=2048, description="Image height."),
        lora_scale: float = Input(default=1.0, ge=-2.0, le=3.0, description="Strength of the archive's LoRA."),
        seed: int = Input(default=0, ge=0, le=2147483647, description="Random seed."),
        replicate_weights: Path = Input(
            default=None, description="weights.zip (or .tar / .tar.gz) from training; empty: the base model."
        ),
    ) -> Path:
        self._use_weights(_Path(replicate_weights) if replicate_weights else None, lora_scale)
        image = self.session.generate(GenerateOptions(prompt, negative_prompt, steps, guidance, width, height, seed))
        out = _Path(tempfile.mkdtemp(prefix="qzp-out-")) / "output.png"
        image.save(out)
        return Path(out)
