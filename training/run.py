"""High-level entry points shared by the CLI, Cog and the demo."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint as ckpt
from . import distributed, outputs
from .archive import load_archive
from .config import Config
from .data import dataset_fingerprint, resolve_dataset, scan_dataset
from .inference import GenerateOptions, InferenceSession
from .models import load_pipeline, place_pipeline, resolve_device
from .trainer import Callbacks, Trainer, TrainResult

logger = logging.getLogger(__name__)


def train(cfg: Config, dataset: str | Path, archive_path: str | Path, *, output_dir: str | Path | None = None,
          resume: str | Path | None = None, pipe=None, callbacks: Callbacks | None = None,
          force_resume: bool = False, tune_process: bool = False) -> TrainResult:
    """Train LoRA (+ the zero-prior token if enabled) on ``dataset`` and write ``archive_path``.

    ``output_dir`` (default: the archive's folder) receives checkpoints/, samples/ and the loss plot. Under
    ``torchrun`` / ``accelerate launch`` every process runs this; they train data-parallel and rank 0 writes.

    Before any model loads: the output folders are probed (read-only, full disk), locked against a second
    training on the same output, and cleaned of a killed run's leftovers; the dataset is scanned in full.
    ``force_resume`` resumes a checkpoint of another seed or dataset (``--force-resume``). ``tune_process``: the
    caller owns this process (the CLI's and Cog's ``train``), so settings of the whole process may be chosen for the
    step: cuBLAS's workspace (``cublas.py``), once the memory plan has fixed the settings and before any product runs.
    """
    ctx = distributed.from_env()
    try:
        return _train(cfg, dataset, archive_path, output_dir, resume, pipe, callbacks, ctx, force_resume,
                      tune_process)
    finally:
        distributed.shutdown(ctx)


def _train(cfg, dataset, archive_path, output_dir, resume, pipe, callbacks, ctx, force_resume=False,
           tune_process=False) -> TrainResult:
    archive_path = Path(archive_path)
    output_dir = Path(output_dir) if output_dir is not None else archive_path.parent
    lock, failure = None, None
    if ctx.is_main:  # only rank 0 writes; the other ranks of this job share its lock
        try:
            outputs.probe_writable(output_dir, "output folder")
            if archive_path.parent.resolve() != output_dir.resolve():
                outputs.probe_writable(archive_path.parent, "archive folder")
            lock = outputs.RunLock([output_dir, archive_path.parent], archive_path).acquire()
            outputs.clean_leftovers(output_dir, archive_path)
        except Exception as e:  # noqa: BLE001 - raised again below, after the other ranks were told
            failure = e
    try:
        # the other ranks learn rank 0's outcome now and stop with its message, instead of meeting a rank 0
        # that is gone at their first collective (after the model load, or the process group's timeout)
        distributed.share_setup_result(ctx, failure)
        output_dir.mkdir(parents=True, exist_ok=True)
        work = outputs.make_data_dir(output_dir)
        try:
            root = resolve_dataset(dataset, work)
            t = cfg.train
            examples = scan_dataset(root, t.placeholder_tokens, t.default_caption,
                                    t.prepend_token and t.train_placeholder_token)
            logger.info("dataset: %d images from %s", len(examples), dataset)
            state = None
            if resume:  # a corrupt or mismatched checkpoint is refused now, not after the model has loaded
                where = ckpt.find_checkpoint(resume)
                state = ckpt.load_checkpoint(where)
                ckpt.check_compatible(state, where, t, dataset=dataset_fingerprint(examples), force=force_resume)
            if pipe is None:
                pipe, cfg = _load_for_training(cfg, ctx, tune_process)
            trainer = Trainer(cfg, pipe, examples, output_dir, dist=ctx)
            try:
                if resume:
                    trainer.resume(where, force=force_resume, state=state)
                return trainer.fit(archive_path, callbacks)
            finally:
                trainer.close()
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if lock is not None:
            lock.release()


def _load_for_training(cfg: Config, ctx, tune_process: bool = False):
    """The pipeline, loaded on the CPU, placed by the memory plan (``model.memory``, see training/memory.py); the
    config with that plan applied. ``tune_process``: see :func:`train`."""
    from . import memory
    from .families import QWEN_IMAGE_21, detect_pipeline

    device = ctx.device() if ctx.enabled and cfg.model.device == "auto" else resolve_device(cfg.model.device)
    pipe = load_pipeline(cfg.model, device=device, place=False)
    # as they will be placed (fp8 storage of model.quantize / quantize_te / fp8_matmul counted)
    weights = memory.weights_bytes(pipe, cfg.model)
    # and while they are placed: fp8_matmul's layers still in bf16 (the trainer converts them on the GPU)
    load = memory.weights_bytes(pipe, cfg.model, placing=True)
    # Qwen-Image 2.1's plans need the weights by part (memory.choose_21: what fp8 storage keeps on the GPU)
    parts = memory.weight_parts(pipe) if detect_pipeline(pipe).name == QWEN_IMAGE_21 else None
    cfg = memory.without_blocked_graphs(cfg, device)
    cfg, _ = memory.resolve(cfg, weights, device, parts=parts, load_bytes=load)
    if tune_process:  # the settings are final and no product has run yet: cuBLAS has not read its workspace size
        from . import cublas

        cublas.log_choice(cfg.model, device)
    place_pipeline(pipe, cfg.model, device, for_training=True)
    return pipe, cfg


@dataclass
class DemoResult:
    archive: Path
    image: Path
    loss_plot: Path | None
    first_loss: float
    last_loss: float
    token_id: int | None
    seconds: float
    model_dir: Path | None = None  # the tiny model: a base_model to train on offline


def demo(output_dir: str | Path, steps: int = 150, resolution: int = 64, family: str = "qwen-image") -> DemoResult:
    """Offline: a tiny random model of ``family`` (real classes: Qwen-Image or Qwen-Image 2.1) + a synthetic
    dataset -> token + LoRA -> weights.zip -> PNG."""
    from .families import QWEN_IMAGE_21, get_family
    from .tiny import make_synthetic_dataset, save_tiny_pipeline, save_tiny_pipeline_21

    fam = get_family(family)
    t0 = time.time()
    out = Path(output_dir).resolve()  # meta.json's base_model is then this absolute folder: usable from anywhere
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
    return DemoResult(result.archive, image_path, result.loss_plot, first, last, result.token_id, time.time() - t0,
                      model_dir)
