"""The masked-embedding + LoRA training loop on Qwen-Image's flow-matching objective: one loop for every front end.

The loop is the same whatever runs the models; a :class:`~qwen_zero_prior.training.backend.TrainBackend` runs them
(diffusers for the CLI, Cog and the demo; ComfyUI's loaded MODEL/CLIP/VAE for the training node). Conditioning is
what the inference pipeline feeds the transformer (same chat template, same dropped prefix), so what the token
learns at train time is what it gets at inference. Timesteps, loss weighting and latent normalisation follow
diffusers' ``train_dreambooth_lora_qwen_image.py``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from . import checkpoint as ckpt
from .archive import ArchiveMeta, atomic_write_bytes, write_archive
from .config import Config, ConfigError
from .data import BatchPlan, Example, assign_buckets, dataset_fingerprint
from .backend import TrainBackend
from .distributed import DistContext, OverlappedAverage, WaitTimer, average, barrier
from .heap import FREEZE_STEPS, FrozenHeap
from .token import RegisteredToken

logger = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    """Raised (after a checkpoint was written) when ``should_stop`` asked the loop to stop."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"training interrupted at step {step}; checkpoint: {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class Callbacks:
    on_step: Callable[[int, int, float], None] | None = None  # (step, total, loss)
    should_stop: Callable[[], bool] | None = None  # checked before each step: True stops with a checkpoint
    on_sample: Callable[[int, list], None] | None = None  # (step, PIL images)
    # exceptions that mean "the user stopped the run" when raised inside a step (ComfyUI >= 0.33 raises its
    # InterruptProcessingException from inside model forwards): the completed steps are checkpointed first
    interrupt_exceptions: tuple[type[BaseException], ...] = ()


@dataclass
class TrainResult:
    archive: Path
    steps: int
    losses: list[float]
    token_id: int | None  # the first token's
    loss_plot: Path | None
    samples: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step this run (loss read back)
    token_ids: dict[str, int] = field(default_factory=dict)  # every token's id, in training order
    # data parallel: how long each step waited for its gradient all-reduce (train.dp_allreduce), else empty
    allreduce_wait_seconds: list[float] = field(default_factory=list)


class Trainer:
    """The training loop, over a :class:`~qwen_zero_prior.training.backend.TrainBackend`.

    ``model`` is a backend, or a diffusers ``QwenImagePipeline`` / ``QwenImage21Pipeline`` (wrapped in the
    family's diffusers backend, :func:`~qwen_zero_prior.training.diffusers_backend.make_backend`).
    """

    def __init__(self, cfg: Config, model, examples: list[Example], output_dir: Path, *,
                 dist: DistContext | None = None):
        if not isinstance(model, TrainBackend):
            from .diffusers_backend import make_backend

            model = make_backend(cfg, model)
        self.backend = model
        self.cfg = cfg
        self.t = cfg.train
        self.output_dir = Path(output_dir)
        self.dist = dist or DistContext()
        self.rank, self.world = self.dist.rank, self.dist.world
        step = model.bucket_step
        if self.t.resolution % step:
            from .families import get_family

            raise ConfigError(f"train.resolution must be a multiple of {step} for "
                              f"{get_family(model.model_family).title}, got {self.t.resolution}")
        self.examples = assign_buckets(examples, self.t.resolution, step)
        self.plan = BatchPlan(self.examples, self.t.batch_size, self.t.seed, self.rank, self.world)
        self.tokens: list[RegisteredToken] = []
        self.step = 0
        self.losses: list[float] = []
        self._latents: dict[int, torch.Tensor] = {}
        self._logged_prompts: set[str] = set()
        self._next_inputs: tuple[int, StepInputs] | None = None
        self._prepared = False
        self._overlap: OverlappedAverage | None = None
        self.allreduce_timer: WaitTimer | None = None
        self.sigmas = model.training_sigmas()
        self.setup()
        # prepare step n+1's inputs at the end of step n (on a GPU the host is then ahead of the device)
        self.prefetch = self.device.type == "cuda"

    # ---- setup ----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backend.dtype

    @property
    def token(self) -> RegisteredToken | None:
        """The first trained token (None without token training); every one: :attr:`tokens`."""
        return self.tokens[0] if self.tokens else None

    def setup(self) -> None:
        """Latents first (a backend may then free the VAE: ``before_training``), then LoRA, token and optimizer.
        Idempotent."""
        if self._prepared:
            return
        t, backend = self.t, self.backend
        self.cache_all_latents()
        backend.before_training()
        backend.prepare(t)
        if t.train_placeholder_token:
            self.tokens = list(backend.add_tokens(list(t.placeholder_tokens), t.placeholder_init_std,
                                                  torch.Generator().manual_seed(t.seed)))
            unused = [tok for tok in t.placeholder_tokens if not any(tok in ex.caption for ex in self.examples)]
            if unused:
                logger.warning("placeholder token(s) %s appear in no caption of the dataset: their vectors get no "
                               "gradient and stay at their init (name them in captions, or use folders named after "
                               "them)", ", ".join(map(repr, unused)))
        else:
            for trigger in t.placeholder_tokens:
                if any(trigger in ex.caption for ex in self.examples):
                    backend.check_trigger(trigger)
        named = backend.named_lora_parameters()
        self.lora_params = [p for _, p in named]
        self.param_names = [n for n, _ in named]
        groups = [{"params": self.lora_params, "lr": t.learning_rate, "weight_decay": t.weight_decay}]
        if self.tokens:  # every token's vector in one group: the token learning rate, never weight decay
            groups.append({"params": [tok.vector for tok in self.tokens], "lr": t.token_learning_rate,
                           "weight_decay": 0.0})
            # the first keeps the one-token name: a one-token checkpoint's optimizer state stays readable
            self.param_names += ["placeholder_vector" if i == 0 else f"placeholder_vector.{i}"
                                 for i in range(len(self.tokens))]
        # fused AdamW: one kernel for all LoRA tensors instead of several per tensor (CUDA only)
        self.optimizer = torch.optim.AdamW(groups, fused=self.device.type == "cuda")
        if self.dist.enabled:
            self.allreduce_timer = WaitTimer(self.device)
            if t.dp_allreduce == "overlap":  # forward order: the token rows feed the text encoder, first
                self._overlap = OverlappedAverage(self.dist, [tok.vector for tok in self.tokens] + self.lora_params)
        self._prepared = True

    # ---- conditioning ---------------------------------------------------------------------------------
    def _log_prompt(self, caption: str) -> None:
        if self.cfg.debug.log_prompt_ids and caption not in self._logged_prompts:
            self._logged_prompts.add(caption)
            logger.info("prompt %r -> ids %s", caption, self.backend.prompt_ids(caption))

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        for c in captions:
            self._log_prompt(c)
        embeds, mask = self.backend.encode(captions)
        # the mask is a host tensor: testing it does not wait for the GPU (a sync here idles it mid-step)
        return embeds, (None if bool(mask.all()) else mask.to(self.device, non_blocking=True))

    # ---- latents --------------------------------------------------------------------------------------
    @torch.no_grad()
    def latents_for(self, indices: list[int]) -> torch.Tensor:
        out = []
        for i in indices:
            lat = self._latents.get(i)
            if lat is None:
                lat = self.backend.latent(self.examples[i])
                if self.t.cache_latents:
                    self._latents[i] = lat
            out.append(lat)
        return torch.stack(out).to(self.device, non_blocking=True)

    def cache_all_latents(self) -> None:
        if self.t.cache_latents:
            from tqdm.auto import tqdm

            # a bar: on CPU (or a slow VAE) encoding every image takes long enough to look like a hang
            for i in tqdm(range(len(self.examples)), desc="caching latents", unit="image", disable=self.rank != 0):
                if i not in self._latents:
                    self._latents[i] = self.backend.latent(self.examples[i])

    # ---- one step ------------------------------------------------------------------------------------
    def step_inputs(self, indices: list[int], generator: torch.Generator | None = None,
                    sample_seeds: list[int] | None = None) -> StepInputs:
        """Latents, noise and noise levels of one step, on the device. Noise and timestep come from
        ``generator``, or, per sample, from ``sample_seeds`` (so a sample draws the same noise whichever rank or
        batch slot it lands in). Nothing here depends on the trained weights: ``train_step`` prepares the next
        step's while the GPU still runs this one's backward."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        x0 = self.latents_for(indices)  # (B, C, 1, h, w)
        bsz = x0.shape[0]
        gens = [generator] * bsz if generator is not None else [torch.Generator().manual_seed(s) for s in sample_seeds]
        # host-to-device copies are non_blocking throughout the step: a blocking one waits for the GPU to finish
        # everything queued (the last step's backward), so the host could not prepare this step meanwhile
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(self.device, non_blocking=True)
        u = torch.cat([compute_density_for_timestep_sampling(
            self.t.weighting_scheme, 1, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, generator=g) for g in gens])
        idx = (u * len(self.sigmas)).long().clamp(0, len(self.sigmas) - 1)
        sigmas = self.sigmas[idx].to(self.device, torch.float32, non_blocking=True)
        return StepInputs(list(indices), x0, noise, sigmas)

    def loss_for(self, indices: list[int], generator: torch.Generator | None = None,
                 sample_seeds: list[int] | None = None, inputs: StepInputs | None = None) -> torch.Tensor:
        """Flow-matching loss on ``indices`` (or on prepared ``inputs``); see :meth:`step_inputs`."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        self.setup()
        if inputs is None:
            inputs = self.step_inputs(indices, generator, sample_seeds)
        indices, x0, noise, sigmas = inputs
        s = sigmas.view(-1, 1, 1, 1, 1)
        noisy = (1.0 - s) * x0 + s * noise
        # the frozen text encoder runs in its own dtype, outside autocast (which CUDA-graph replay cannot take)
        embeds, mask = self.encode([self.examples[i].caption for i in indices])
        pred = self.backend.predict(noisy.to(self.dtype), sigmas, embeds, mask)
        target = noise - x0
        weighting = compute_loss_weighting_for_sd3(self.t.weighting_scheme, s)
        return (weighting.float() * (pred.float() - target.float()) ** 2).reshape(x0.shape[0], -1).mean()

    def sample_seeds(self) -> list[int]:
        first = self.rank * self.t.batch_size  # position of this rank's slice in the global batch
        return [self.t.seed * 1_000_003 + self.step * 10_007 + first + j for j in range(self.t.batch_size)]

    def train_step(self) -> float:
        self.setup()
        self.backend.step_begin()
        ready, self._next_inputs = self._next_inputs, None
        if ready is None or ready[0] != self.step:  # nothing prefetched (first step, CPU) or the step moved (resume)
            ready = (self.step, self.step_inputs(self.plan.batch(self.step), sample_seeds=self.sample_seeds()))
        loss = self.loss_for(None, inputs=ready[1])
        self.optimizer.zero_grad(set_to_none=True)
        if not self.dist.enabled:
            reading = _LossReadback(loss)  # copied as soon as the forward is done, read at the end
        elif self._overlap is not None:  # the loss's all-reduce starts now, the gradients' from backward hooks
            self._overlap.begin(loss, self.step)
        try:
            loss.backward()
        except BaseException:  # an interrupt or error mid-backward: no later backward may fire this step's hooks
            if self._overlap is not None:
                self._overlap.close()
                self._overlap = None
            raise
        params = self.trainable()
        if self.dist.enabled:  # mean of the ranks' gradients (and losses)
            self.allreduce_timer.start()
            if self._overlap is not None:
                loss = self._overlap.finish()
            else:  # one flat all-reduce
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                loss = loss.detach().reshape(1).clone()
                average(self.dist, [p.grad for p in params] + [loss], self.step)
            self.allreduce_timer.stop()
            reading = _LossReadback(loss)
        if self.t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.t.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        if self.prefetch and self.step < self.t.steps:
            # the host is ahead of the GPU here (backward and optimizer are queued, not done): prepare the next
            # step's inputs now, so that step starts with the text encoder instead of host work on an idle GPU
            self._next_inputs = (self.step, self.step_inputs(self.plan.batch(self.step), sample_seeds=self.sample_seeds()))
        value = reading.value()
        self.losses.append(value)
        return value

    def close(self) -> None:
        """Remove the overlapped all-reduce's gradient hooks, then release the backend (what run.train's finally
        calls)."""
        if self._overlap is not None:
            self._overlap.close()
            self._overlap = None
        self.backend.close()

    def trainable(self) -> list[torch.nn.Parameter]:
        return self.lora_params + [tok.vector for tok in self.tokens]

    # ---- checkpoints ----------------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    def lora_state(self) -> dict[str, torch.Tensor]:
        self.setup()
        return dict(self.backend.named_lora_parameters())

    def save_checkpoint(self) -> Path | None:
        if self.rank != 0:
            return None
        path = ckpt.save_checkpoint(
            self.checkpoint_root, self.step, lora=self.lora_state(),
            vectors={tok.token: tok.vector for tok in self.tokens},
            optimizer=self.optimizer, param_names=self.param_names,
            state={"losses": self.losses, "config": self.cfg.to_dict(), "trainer": self.backend.name,
                   "token_id": self.token.token_id if self.token else None,
                   "token_ids": {tok.token: tok.token_id for tok in self.tokens},
                   "dataset": dataset_fingerprint(self.examples)},
            keep=self.t.keep_checkpoints,
        )
        logger.info("checkpoint saved: %s", path)
        return path

    def resume(self, path: str | Path, force: bool = False, state: dict | None = None) -> Path:
        """Continue from a checkpoint. A different seed or dataset is refused unless ``force``; a different LoRA
        layout or token, or another backend's checkpoint, always (its tensors cannot fit). ``state``: the
        checkpoint at ``path`` already loaded (``checkpoint.load_checkpoint``), not read again."""
        self.setup()
        where = ckpt.find_checkpoint(path)
        state = ckpt.load_checkpoint(where) if state is None else state
        written_by = state.get("trainer", "diffusers")
        if written_by != self.backend.name:
            raise ckpt.CheckpointError(
                f"checkpoint {where} was written by the {written_by} trainer; it resumes only there, not in the "
                f"{self.backend.name} one"
            )
        ckpt.check_compatible(state, where, self.t, dataset=dataset_fingerprint(self.examples), force=force)
        if int(state["step"]) > self.t.steps:  # fit would train nothing and write an archive of the longer run
            raise ckpt.CheckpointError(
                f"checkpoint {where} is at step {state['step']}, past train.steps={self.t.steps}; to train further "
                f"set train.steps above {state['step']} (e.g. --set train.steps={2 * int(state['step'])})")
        own = self.lora_state()
        ckpt.check_lora_shapes(state["lora"], own, where)
        unexpected = sorted(set(state["lora"]) - set(own))
        if unexpected:
            raise ckpt.CheckpointError(f"checkpoint {where}: LoRA tensors this model does not have: {unexpected[:3]}")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state["lora"][k])
            for tok in self.tokens:
                vec = state["token_tensors"].get(tok.token)
                if vec is None:
                    raise ckpt.CheckpointError(f"checkpoint {where} has no vector for {tok.token!r}")
                if tuple(vec.shape) != tuple(tok.vector.shape):
                    raise ckpt.CheckpointError(f"checkpoint {where}: the vector for {tok.token!r} has shape "
                                               f"{list(vec.shape)}, this model's {list(tok.vector.shape)}")
                tok.vector.copy_(vec)
        ckpt.restore_optimizer(self.optimizer, self.param_names, state)
        self.step = int(state["step"])
        self.losses = list(state.get("losses", []))[: self.step]
        logger.info("resumed from %s at step %d", where, self.step)
        return where

    # ---- samples & export -----------------------------------------------------------------------------
    def render_samples(self) -> tuple[list[Path], list]:
        """Render ``sample.prompts`` with the current LoRA and token on the main process; (saved paths, images)."""
        prompts = list(self.cfg.sample.prompts)
        if not prompts or not self.dist.is_main:
            return [], []
        with torch.no_grad():
            images = self.backend.sample(prompts, self.step)
        out = []
        for i, img in enumerate(images):
            path = self.output_dir / "samples" / f"step-{self.step:06d}-{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)
            out.append(path)
        if out:
            logger.info("step %d: %d sample image(s) written to %s", self.step, len(out), out[0].parent)
        return out, images

    def export(self, archive_path: Path) -> Path:
        t = self.t
        meta = ArchiveMeta(
            base_model=self.backend.base_model(),
            placeholder_token=self.token.token if self.token else None,
            placeholder_token_id=self.token.token_id if self.token else None,
            placeholder_token_ids=[tok.token_id for tok in self.tokens] or None,
            rank=t.rank,
            created=ArchiveMeta.now(),
            alpha=float(t.alpha),
            lora_targets=self.backend.lora_targets(),
            placeholder_init_std=t.placeholder_init_std if self.token else None,
            steps=self.step,
            train_placeholder_token=bool(self.token),
            model_family=self.backend.model_family,
            extra={"resolution": t.resolution, "learning_rate": t.learning_rate,
                   "token_learning_rate": t.token_learning_rate,
                   "final_loss": self.losses[-1] if self.losses else None, **self.backend.archive_extra()},
        )
        return write_archive(archive_path, meta, self.backend.export_lora(),
                             vectors={tok.token: tok.vector for tok in self.tokens} or None)

    # ---- the loop -------------------------------------------------------------------------------------
    def _log_summary(self, step_seconds: list[float], waits: list[float]) -> None:
        """One line per process: median s/step after the first, samples/s of the whole job, peak GPU memory; data
        parallel: the median time a step waited for its gradient all-reduce (after the first)."""
        if not step_seconds:
            return
        per_step = _median(step_seconds[1:] or step_seconds)
        global_batch = self.t.batch_size * self.world
        peak = ""
        if self.device.type == "cuda":
            peak = (f"; peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB allocated, "
                    f"{torch.cuda.max_memory_reserved(self.device) / 2**30:.1f} GiB reserved")
        comm = ""
        if waits:  # on CUDA: the compute stream's wait (events around it); the overlapped part is not in it
            # flat: the timed span also packs and unpacks the gradients into one buffer; overlap: only the wait
            what = "wait incl. packing" if self.t.dp_allreduce == "flat" else "wait"
            comm = (f"; gradient all-reduce ({self.t.dp_allreduce}) {what}: median "
                    f"{_median(waits[1:] or waits) * 1000:.2f} ms/step")
        logger.info("%d steps: median %.3f s/step after the first (first %.1f s), %.2f samples/s with %d "
                    "process(es) x batch %d%s%s", len(step_seconds), per_step, step_seconds[0],
                    global_batch / per_step if per_step == per_step and per_step > 0 else float("nan"),
                    self.world, self.t.batch_size, comm, peak)

    def fit(self, archive_path: Path, callbacks: Callbacks | None = None) -> TrainResult:
        from tqdm.auto import tqdm

        cb = callbacks or Callbacks()
        t0 = time.time()
        self.setup()
        total = self.t.steps
        samples: list[Path] = []
        step_seconds: list[float] = []
        bar = tqdm(total=total, initial=self.step, desc="training", unit="step", disable=self.rank != 0)
        heap = FrozenHeap()  # frozen after the first steps: the collector's full walks then skip the model (heap.py)
        try:
            while self.step < total:
                if cb.should_stop is not None and cb.should_stop():
                    where = self.save_checkpoint() if self.step > 0 else None
                    raise TrainingInterrupted(self.step, where)
                t_step = time.perf_counter()
                try:  # an interrupt raised anywhere in the iteration (a step, a sample) keeps the finished steps
                    loss = self.train_step()
                    step_seconds.append(time.perf_counter() - t_step)
                    if len(step_seconds) <= FREEZE_STEPS:
                        heap.freeze()
                    if not math.isfinite(loss):
                        raise FloatingPointError(
                            f"loss became {loss} at step {self.step}; lower train.learning_rate / token_learning_rate"
                        )
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    if cb.on_step is not None:
                        cb.on_step(self.step, total, loss)
                    every = self.t.checkpoint_every
                    if every and self.step % every == 0 and self.step < total:
                        self.save_checkpoint()
                    if self.cfg.sample.every and self.step % self.cfg.sample.every == 0:
                        paths, images = self.render_samples()
                        samples += paths
                        if cb.on_sample is not None:
                            cb.on_sample(self.step, images)
                except cb.interrupt_exceptions:
                    where = self.save_checkpoint() if self.step > 0 else None
                    raise TrainingInterrupted(self.step, where) from None
        finally:
            heap.release()
            bar.close()
        if self.t.checkpoint_every:
            self.save_checkpoint()
        waits = self.allreduce_timer.results() if self.allreduce_timer is not None else []
        self._log_summary(step_seconds, waits)
        archive = self.export(archive_path) if self.dist.is_main else archive_path
        plot = save_loss_plot(self.losses, archive_path.with_name(archive_path.stem + "_loss.png")) if self.dist.is_main else None
        barrier(self.dist)  # the other ranks return once the archive is complete
        return TrainResult(archive, self.step, list(self.losses), self.token.token_id if self.token else None,
                           plot, samples, time.time() - t0, step_seconds,
                           {tok.token: tok.token_id for tok in self.tokens}, waits)


def _median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if v else float("nan")


class StepInputs(NamedTuple):
    indices: list[int]
    x0: torch.Tensor  # (B, C, 1, h, w) normalized latents
    noise: torch.Tensor
    sigmas: torch.Tensor  # (B,) float32 noise levels


class _LossReadback:
    """The loss as a Python float without waiting for the whole step.

    ``float(loss)`` at the end of a step waits for the backward and the optimizer too, so the next step's host
    work (data, tokenizing, kernel launches) would start on an idle GPU. The value is copied to pinned host
    memory as soon as it exists; reading it waits only for that copy, and the step's remaining GPU work
    overlaps the next step's host work."""

    def __init__(self, loss: torch.Tensor):
        loss = loss.detach().reshape(())
        if loss.is_cuda:
            self.host = torch.empty((), dtype=loss.dtype, pin_memory=True)
            self.host.copy_(loss, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = loss, None

    def value(self) -> float:
        if self.event is not None:
            self.event.synchronize()
        return float(self.host)


def save_loss_plot(losses: list[float], path: Path) -> Path | None:
    """The loss curve as a PNG beside the archive; None if there is nothing to plot or it cannot be written.

    It is drawn after the archive is complete, so a failure here (a full disk, an unwritable name, a broken
    matplotlib) is logged as a warning and never turns a finished run into a failed one.
    """
    if not losses:
        return None
    try:
        return _draw_loss_plot(losses, path)
    except Exception as e:  # noqa: BLE001 - whatever went wrong, the trained archive is already safe on disk
        logger.warning("could not write the loss plot %s (%s: %s); the archive is complete", path,
                       e.__class__.__name__, e)
        return None


def _draw_loss_plot(losses: list[float], path: Path) -> Path:
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    k = max(1, len(losses) // 20)
    if k > 1:
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.6, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())
