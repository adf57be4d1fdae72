"""Train Zero-Prior Token + LoRA: the core's training loop inside a graph, on the graph's MODEL, CLIP and VAE.

A thin adapter: the loop is ``training/trainer.py`` (the same as the CLI's and Cog's), the models run through
``comfy_backend.ComfyBackend``. Progress goes to ComfyUI's progress bar (whose hook is also what makes Cancel
work), each step's loss is sent to the browser as a ``zero_prior.loss`` event (drawn live on the node by
``web/zero_prior.js``), checkpoints go next to the archive, and a ``resume`` input continues a checkpoint to
the same step count. The MODEL and CLIP outputs are the inputs with the trained archive applied exactly as
*Apply Qwen LoRA* and *Register Zero-Prior Token* apply it.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io

from ..training import outputs
from ..training.config import Config, field_spec
from ..training.data import DatasetError, resolve_dataset, scan_dataset
from ..training.token import split_token_list
from .comfy_engine import ENGINES, NATIVE_ALLOCATOR_HOW, oom_hint, speed_tip
from .paths import resolve_dataset_path, resolve_output_path
from .sockets import CATEGORY, ZeroPriorArchive
from .token_node import register_token

logger = logging.getLogger(__name__)
LOSS_EVENT = "zero_prior.loss"


def _spec_input(kind, section: str, name: str, **extra):
    """A widget whose default, bounds and tooltip come from training.config (the one source of truth)."""
    spec = field_spec(section, name)
    kw = {"default": spec["default"], "tooltip": spec["help"], **extra}
    if kind in (io.Int, io.Float):
        if "min" in spec:
            kw["min"] = spec["min"]
        if "max" in spec:
            kw["max"] = spec["max"]
        if kind is io.Float:
            kw.setdefault("step", spec.get("step", 1e-5))
            kw.setdefault("round", False)
    return kind.Input(name, **kw)


def _send_loss(node_id: str | None, step: int, total: int, loss: float) -> None:
    try:
        from server import PromptServer
    except ImportError:  # not inside a ComfyUI server process
        return
    if PromptServer.instance is not None:
        PromptServer.instance.send_sync(LOSS_EVENT, {"node": node_id, "step": step, "total": total,
                                                     "loss": None if math.isnan(loss) else loss})


def _graph_dataset(images: torch.Tensor, captions: str, workdir: Path) -> Path:
    """IMAGE batch + captions (one per line, or one for all) -> a folder the core's scanner reads."""
    from PIL import Image

    lines = [c.strip() for c in (captions or "").splitlines() if c.strip()]
    n = images.shape[0]
    if lines and len(lines) not in (1, n):
        raise DatasetError(f"captions: got {len(lines)} lines for {n} images; give one per image or one for all")
    for i in range(n):
        arr = (images[i].detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr[..., :3]).save(workdir / f"graph_{i:04d}.png")
        if lines:
            (workdir / f"graph_{i:04d}.txt").write_text(lines[i if len(lines) == n else 0], encoding="utf-8")
    return workdir


class TrainZeroPriorToken(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZeroPriorTrain",
            display_name="Train Zero-Prior Token + LoRA",
            category=CATEGORY,
            description="Trains the zero-prior placeholder token (one embedding row; several tokens: one row each) "
            "together with a LoRA on the graph's Qwen-Image MODEL/CLIP/VAE. Writes weights.zip (same format as the CLI and Cog) into the output "
            "folder and returns the MODEL and CLIP patched with the result.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="Qwen-Image diffusion model (UNETLoader)."),
                io.Clip.Input("clip", tooltip="Qwen-Image's text encoder (CLIPLoader, type qwen_image)."),
                io.Vae.Input("vae", tooltip="Qwen-Image's VAE."),
                io.String.Input("dataset", default="", tooltip="Folder or zip of images with same-name .txt captions, "
                                "relative to input/ (or output/, models/). Leave empty to train on 'images'."),
                io.String.Input("output_name", default="zero_prior/weights.zip",
                                tooltip="Archive to write, relative to ComfyUI's output folder."),
                _spec_input(io.Boolean, "train", "train_placeholder_token"),
                _spec_input(io.String, "train", "placeholder_token",
                            tooltip="The new special token written in prompts, e.g. <zwx>. Several tokens trained "
                            "together (each its own vector, one LoRA): a comma-separated list, e.g. <alice>, <bob>; "
                            "images in dataset folders named after a token get it prepended to their captions."),
                _spec_input(io.Float, "train", "placeholder_init_std", step=1e-6),
                _spec_input(io.Int, "train", "rank"),
                _spec_input(io.Int, "train", "steps"),
                _spec_input(io.Float, "train", "learning_rate"),
                _spec_input(io.Float, "train", "token_learning_rate"),
                _spec_input(io.Int, "train", "batch_size"),
                _spec_input(io.Int, "train", "resolution", step=16),
                _spec_input(io.Int, "train", "seed", control_after_generate=False),
                _spec_input(io.Int, "train", "checkpoint_every"),
                io.String.Input("default_caption", default="", optional=True,
                                tooltip="Caption for images without one ({token} becomes the token). Empty: a missing "
                                "caption is an error."),
                io.String.Input("resume", default="", optional=True,
                                tooltip="A checkpoint folder (or the run folder) under output/ to continue to 'steps'."),
                io.Int.Input("preview_every", default=0, min=0, max=100000, optional=True,
                             tooltip="Render a sample preview (first caption) every N steps; 0 disables."),
                io.Image.Input("images", optional=True, tooltip="Training images from the graph (instead of 'dataset')."),
                io.String.Input("captions", default="", multiline=True, optional=True,
                                tooltip="Captions for 'images': one line per image, or one line for all."),
                # last: UI workflows list widget values by position, so a new widget goes after the existing ones
                _spec_input(io.Boolean, "model", "compile", optional=True,
                            tooltip="torch.compile each transformer block of the DiT (needs triton on a GPU; the "
                            "first steps compile, ~30 s each at 1024² on an H200). With the diffusers engine the "
                            "blocks are then replayed as CUDA graphs (the CLI's fastest mode), which needs PyTorch's "
                            f"native allocator: {NATIVE_ALLOCATOR_HOW}; under ComfyUI's default allocator the pack "
                            "captures the DiT's and the text encoder's graphs itself, about as fast (README, ComfyUI; "
                            "QWEN_ZERO_PRIOR_ASYNC_GRAPHS chooses which). Used only where the DiT "
                            "trains resident without recomputation (else the log says why not)."),
                io.Combo.Input("dit_engine", options=list(ENGINES), default="auto", optional=True,
                               tooltip="How the DiT trains. auto: on a GPU, diffusers' transformer over the weights "
                               "ComfyUI loaded (no copy) with the CLI's speed path (with compile: CUDA graphs, cuDNN "
                               "attention), where it computes what ComfyUI computes (no other patches on the MODEL, "
                               "plain or fp8 weights); where the DiT does not fit beside the text encoder (24 GB "
                               "cards) the same engine offloaded (diffusers_offload: the CLI's model.offload, the "
                               "blocks in fp8 on the GPU as far as they fit, the rest streamed from CPU memory ahead "
                               "of use); else ComfyUI's own forward. The log says which and why."),
                _spec_input(io.Boolean, "model", "fp8_matmul", optional=True,
                            tooltip="fp8 matmuls for the DiT's frozen image-stream weights (diffusers engine only; "
                            "fp8 GPUs: Ada, Hopper, Blackwell): faster, ~3% relative error per product, as the "
                            "CLI's model.fp8_matmul. With an fp8 DiT file its stored weights are used as they are."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The MODEL with the trained LoRA."),
                io.Clip.Output(display_name="CLIP", tooltip="The CLIP with the trained token registered."),
                io.String.Output(display_name="archive_path", tooltip="The weights.zip written (absolute path)."),
                ZeroPriorArchive.Output(display_name="archive", tooltip="The trained archive, for the inference nodes."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, output_name, train_placeholder_token, placeholder_token,
                placeholder_init_std, rank, steps, learning_rate, token_learning_rate, batch_size, resolution, seed,
                checkpoint_every, default_caption="", resume="", preview_every=0, images=None,
                captions="", compile=False, dit_engine="auto", fp8_matmul=False) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        from ..training.archive import load_archive
        from ..training.trainer import Callbacks, Trainer, TrainingInterrupted
        from .comfy_backend import ComfyBackend
        from .lora_node import apply_lora

        tokens = split_token_list(placeholder_token)  # "<alice>, <bob>": several tokens in one run
        token_keys = ({"placeholder_tokens": tokens} if len(tokens) > 1 else
                      {"placeholder_token": tokens[0] if tokens else placeholder_token})
        # the offloaded engine's DiT ring stays at the 1 GiB it was measured with on GPUs (sessions 13-20); the core's
        # default became 2 GiB in session 23, measured on the core's layout only
        model_settings = {"compile": bool(compile), "fp8_matmul": bool(fp8_matmul), "offload_prefetch_gib": 1.0}
        cfg = Config.from_dict({"model": model_settings, "train": {
            "train_placeholder_token": train_placeholder_token, **token_keys,
            "placeholder_init_std": placeholder_init_std, "rank": rank, "steps": steps,
            "learning_rate": learning_rate, "token_learning_rate": token_learning_rate, "batch_size": batch_size,
            "resolution": resolution, "seed": seed, "checkpoint_every": checkpoint_every,
            "default_caption": default_caption or "a photo of {token}",
        }}, source="Train Zero-Prior Token node")
        archive_path = resolve_output_path(output_name, "zero_prior/weights.zip")
        if archive_path.suffix.lower() != ".zip":
            raise ValueError(f"output_name {output_name!r} must end in .zip")
        run_dir = archive_path.with_name(archive_path.stem + "_run")
        resume_dir = None
        if resume and resume.strip():
            resume_dir = resolve_output_path(resume, "")
            if not resume_dir.exists():
                raise FileNotFoundError(f"resume {resume!r}: no such checkpoint folder under output/")
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        started = time.perf_counter()
        first_step_at: list[float] = []

        # as the core's run: the output is probed before anything else; the dataset is extracted beside the archive
        # (in a folder the next run cleans up if this process is killed); the run folder is locked against a second
        # training of the same archive, and a killed run's leftovers are removed, once the dataset is known good
        outputs.probe_writable(archive_path.parent, "output folder")
        work = outputs.make_data_dir(archive_path.parent)
        lock = None
        try:
            if dataset and dataset.strip():
                root = resolve_dataset(resolve_dataset_path(dataset), work)
            elif images is not None:
                (work / "graph").mkdir()
                root = _graph_dataset(images, captions, work / "graph")
            else:
                raise DatasetError("Train Zero-Prior Token: give a dataset folder/zip or connect images")
            t = cfg.train
            examples = scan_dataset(root, t.placeholder_tokens, t.default_caption,
                                    t.prepend_token and t.train_placeholder_token,
                                    require_captions=not default_caption)
            logger.info("training on %d images from %s", len(examples), dataset or "the graph")
            if preview_every:  # previews: the first caption, a few steps, through ComfyUI's sampler
                from ..training.data import assign_buckets

                w, h = assign_buckets(examples[:1], t.resolution)[0].bucket
                cfg = cfg.replace(sample={"prompts": [examples[0].caption], "every": preview_every, "steps": 8,
                                          "guidance": 1.0, "width": w, "height": h, "seed": t.seed})

            pbar = comfy.utils.ProgressBar(steps, node_id=node_id)
            cancel = []

            def on_step(step: int, total: int, loss: float) -> None:
                if not first_step_at:
                    first_step_at.append(time.perf_counter() - started)
                _send_loss(node_id, step, total, loss)
                try:
                    pbar.update_absolute(step, total)  # ComfyUI's progress hook raises on Cancel
                except mm.InterruptProcessingException:
                    cancel.append(step)

            def on_sample(step: int, images_: list) -> None:
                if images_:
                    logger.info("sample preview at step %d (%dx%d)", step, *images_[0].size)
                    try:
                        pbar.update_absolute(step, steps, ("PNG", images_[0], 512))
                    except mm.InterruptProcessingException:
                        cancel.append(step)

            callbacks = Callbacks(on_step=on_step, on_sample=on_sample,
                                  should_stop=lambda: bool(cancel) or mm.processing_interrupted(),
                                  interrupt_exceptions=(mm.InterruptProcessingException,))
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = outputs.RunLock([run_dir], archive_path).acquire()
            outputs.clean_leftovers(run_dir, archive_path)
            # ComfyUI runs prompts under inference_mode; training needs autograd
            with torch.inference_mode(False), torch.enable_grad():
                backend = ComfyBackend(cfg, model, clip, vae, dit_engine=dit_engine)
                try:
                    trainer = Trainer(cfg, backend, examples, run_dir)
                    if resume_dir is not None:
                        trainer.resume(resume_dir)
                    _send_loss(node_id, trainer.step, steps, float("nan"))
                    result = trainer.fit(archive_path, callbacks)
                    tip = speed_tip(backend.engine, backend.device)
                except TrainingInterrupted as e:
                    logger.info("training interrupted at step %d; checkpoint %s", e.step, e.checkpoint)
                    raise mm.InterruptProcessingException() from e
                except torch.OutOfMemoryError as e:
                    hint = oom_hint(backend.engine)
                    if hint is None:
                        raise
                    raise torch.OutOfMemoryError(f"{e}\n{hint}") from e
                finally:
                    backend.close()
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if lock is not None:
                lock.release()

        # the graph continues with the archive applied the way the inference nodes apply it
        archive = load_archive(result.archive)
        new_model, _, _ = apply_lora(model, archive.lora_state_dict, 1.0, str(result.archive))
        new_clip, _ = register_token(clip, archive)
        k = max(1, len(result.losses) // 10)
        first, last = sum(result.losses[:k]) / k, sum(result.losses[-k:]) / k
        secs = sorted(result.step_seconds[1:] or result.step_seconds)
        per_step = secs[len(secs) // 2] if secs else float("nan")
        ids = (f"token id {result.token_id}" if len(result.token_ids) <= 1 else
               "token ids " + ", ".join(f"{t} {i}" for t, i in result.token_ids.items()))
        info = f"{result.steps} steps; loss {first:.4f} -> {last:.4f}; {ids}; {per_step:.2f} s/step; {result.archive.name}"
        ui = {"text": [info] + ([tip] if tip else []), "loss": [float(x) for x in result.losses],
              "archive": [str(result.archive)],
              "step_seconds": [float(x) for x in result.step_seconds],
              "first_step_seconds": first_step_at[:1]}
        if torch.cuda.is_available():  # the server process's peaks so far (loading included)
            ui["peak_vram_gib"] = [torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30]
        return io.NodeOutput(new_model, new_clip, str(result.archive), archive, ui=ui)
