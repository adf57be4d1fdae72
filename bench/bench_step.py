"""Training-step and inference benchmark at full Qwen-Image scale (random weights, no downloads).

Times, in one process and on the same inputs (1024x1024 -> 4096 image tokens, ~128 text tokens, LoRA rank 32):

  (a) the plain diffusers + peft LoRA step, eager, without and with gradient checkpointing;
  (b) this project's training step (``training.trainer.Trainer.train_step``) with the zero-prior token on:
      text-encoder forward + backward to the token row, DiT forward + backward, AdamW;
  (c) one inference forward of the DiT with the token + LoRA applied vs without.

Reports ms/step (median of N after warm-up, CUDA events), TFLOP per step (torch.utils.flop_counter), MFU
against a bf16 matmul peak measured in the same run, and peak memory.

  python -m bench.bench_step --size full --out bench/results-h200.json           # on a GPU
  python -m bench.bench_step --size full --mode capped --capped-gib 24           # 24 GiB memory-capped mode
  python -m bench.bench_step --size tiny --device cpu                            # smoke test (CI)
  python -m bench.bench_step --size full --mode variants --isolate --variant "baseline=1" \
      --variant "compile=1 compile_mode=reduce-overhead fp8_matmul=1 memory_cap_gib=78"  # one process each

Rows of the fp8 step and of ``--mode variants`` carry ``weights_gib`` (the frozen weights as stored: fp8 where
converted) and what ``model.memory: auto`` would plan at the run's capacity (``plan_auto``,
``plan_resident_need_gib``), to set beside the measured ``peak_mem_gib``.

Qwen-Image 2.1 (``--family qwen-image-2.1``: the 7.1B single-stream DiT, the Qwen3-VL-8B text encoder, LoRA on
its default attention + MLP targets) runs in ``--mode variants`` (each ``--variant`` one row: the project's step
with those model settings, or ``baseline=1`` for the diffusers + peft step) and ``--mode capped`` (the memory plan
for ``--capped-gib``: every weight on the GPU, fp8 storage where needed, nothing streamed)::

  python -m bench.bench_step --family qwen-image-2.1 --mode variants --isolate \
      --variant "baseline=1 gradient_checkpointing=0" --variant "" --variant "compile=1"
  python -m bench.bench_step --family qwen-image-2.1 --mode capped --capped-gib 24
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from qwen_zero_prior.training.config import ATTENTION_TARGETS, GRAPH_COMPILE_MODES, Config
from qwen_zero_prior.training.data import Example
from qwen_zero_prior.training.heap import FREEZE_STEPS, FrozenHeap

TEMPLATE_PROMPT = ("a photo of <zwx> standing on a wooden table next to a ceramic cup of coffee, soft morning light "
                   "from a window on the left, shallow depth of field, film grain, warm colors, detailed texture, "
                   "high resolution, a small plant in the background, reflections on the polished wood surface, "
                   "cozy kitchen interior, <zwx> in sharp focus, The scene is framed as a still life with a gentle "
                   "vignette, muted green tones in the background, crisp edges on the foreground objects, and a faint "
                   "morning haze drifting through the room while dust motes float in the light beam, captured with a "
                   "vintage medium format camera")  # 128 tokens after the template's dropped prefix
TEXT_TOKENS = 128


# ---- models -------------------------------------------------------------------------------------------
def _te_config(size: str, vocab: int):
    from transformers import Qwen2_5_VLConfig

    from qwen_zero_prior.training.tiny import tiny_text_encoder

    if size == "tiny":
        return tiny_text_encoder(vocab).config
    # Qwen2.5-VL-7B-Instruct's text model (the shapes matter here, not the values)
    return Qwen2_5_VLConfig(
        text_config={"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                     "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
                     "rope_theta": 1000000.0, "vocab_size": 152064, "max_position_embeddings": 128000,
                     "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                       "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31]},
        vocab_size=152064, hidden_size=3584,
    )


def _te_config_21(size: str, vocab: int):
    """Qwen3-VL-8B-Instruct's configuration (text decoder + vision tower; the vision tower is never run here).

    Sources (no download): Qwen/Qwen3-VL-8B-Instruct's config.json as public copies quote it (text_config:
    hidden_size 4096, intermediate_size 12288, 36 layers, 32 heads, 8 kv heads, head_dim 128, rms_norm_eps 1e-6,
    rope_theta 5e6, interleaved m-RoPE [24, 20, 20], vocab 151936, untied LM head; vision_config: depth 27,
    hidden 1152, intermediate 4304, 16 heads, patch 16, merge 2, out_hidden_size 4096, deepstack [8, 16, 24]) —
    e.g. mlx-vlm's Qwen3-VL text-config test and a Qwen3-VL architecture write-up in the search tool's stores,
    with Qwen3-8B's config.json for the decoder. Check: these build 8,767,123,696 parameters, the model card's
    "8.77B". transformers' Qwen3VLConfig() defaults are not the 8B model (intermediate_size 22016, 32 layers)."""
    from transformers import Qwen3VLConfig

    from qwen_zero_prior.training.tiny import tiny_text_encoder_21

    if size == "tiny":
        return tiny_text_encoder_21(vocab).config
    return Qwen3VLConfig(
        text_config={"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
                     "vocab_size": vocab, "max_position_embeddings": 262144,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                         "mrope_section": [24, 20, 20], "mrope_interleaved": True}},
        vision_config={"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                       "out_hidden_size": 4096, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]},
        tie_word_embeddings=False,
    )


def build_pipeline_21(size: str, device: torch.device, dtype: torch.dtype):
    """A QwenImage21Pipeline of random weights, created directly on ``device`` in ``dtype``.

    Full size: ``QwenImage21Transformer2DModel()`` is diffusers 0.42's defaults (src/diffusers/models/transformers/
    transformer_qwenimage21.py: 32 blocks, 32 heads x 128, mlp_ratio 3, context_in_dim 4096, in/out 64 channels,
    patch 1: 7.12B parameters); the text encoder :func:`_te_config_21`; ``AutoencoderKLQwenImage21()`` defaults
    (only encodes the two benchmark images). The processor is the test one around the real tokenizer (text only)."""
    from diffusers import (AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline,
                           QwenImage21Transformer2DModel)
    from transformers import Qwen3VLForConditionalGeneration

    from qwen_zero_prior.training import tiny

    tokenizer, real = tiny.load_tokenizer_21()
    vocab = tiny.REAL_VOCAB_ROWS_21 if real else len(tokenizer) + 64
    torch.manual_seed(0)
    with _default(dtype, device):
        if size == "full":
            transformer, vae = QwenImage21Transformer2DModel(), AutoencoderKLQwenImage21()
        else:
            transformer, vae = tiny.tiny_transformer_21(), tiny.tiny_vae_21()
        text_encoder = Qwen3VLForConditionalGeneration(_te_config_21(size, vocab)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                                max_shift=1.15, shift=1.0, use_dynamic_shifting=True)
    pipe = QwenImage21Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                               processor=tiny.tiny_processor_21(tokenizer), transformer=transformer)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, real


def _fresh_tokenizer(pipe) -> None:
    """A tokenizer without an earlier trainer's ``<zwx>``."""
    from qwen_zero_prior.training import tiny
    from qwen_zero_prior.training.families import QWEN_IMAGE_21, detect_pipeline

    family = detect_pipeline(pipe)
    load = tiny.load_tokenizer_21 if family.name == QWEN_IMAGE_21 else tiny.load_tokenizer
    family.set_tokenizer(pipe, load()[0])


@contextlib.contextmanager
def _default(dtype: torch.dtype, device: torch.device):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(old)


def build_pipeline(size: str, device: torch.device, dtype: torch.dtype, family: str = "qwen-image"):
    """A QwenImagePipeline (or ``family``'s pipeline) of random weights, created directly on ``device`` in
    ``dtype``."""
    if family == "qwen-image-2.1":
        return build_pipeline_21(size, device, dtype)
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qwen_zero_prior.training import tiny

    tokenizer, real = tiny.load_tokenizer()
    vocab = tiny.REAL_VOCAB_ROWS if real else len(tokenizer) + 64
    torch.manual_seed(0)
    with _default(dtype, device):
        if size == "full":
            transformer = QwenImageTransformer2DModel()  # the 20.4B defaults
            vae = AutoencoderKLQwenImage()
        else:
            transformer, vae = tiny.tiny_transformer(), tiny.tiny_vae()
        text_encoder = Qwen2_5_VLForConditionalGeneration(_te_config(size, vocab)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                                max_shift=0.9, shift=1.0, shift_terminal=0.02,
                                                use_dynamic_shifting=True, time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, real


# ---- timing -------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, warmup: int, iters: int) -> list[float]:
    """Per-call milliseconds (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000)
    return out


class GcTimer:
    """Python's garbage collections while active (``gc.callbacks``): count and milliseconds per generation. A full
    collection walks every tracked object of the process (a compiled 20B model's holds millions), so one can stall
    a step's host work for long. Per full collection also the objects it walked (counted before its clock starts;
    that count's time, with the watcher's wake-up and the GPU query, in ``count_ms``: part of the step's time, not
    of the collection's), and what it freed. On Python 3.14's incremental collector automatic collections may not
    report generation 2.

    Why a full collection is slow, where it is: ``gpu_idle`` says whether the default CUDA stream had finished its
    work when the collection started and when it ended (busy, then idle, and as long as a step: it may have waited
    for the GPU), and ``stack`` is the stack of the thread running the collection (``thread``: an automatic one
    runs on whichever thread allocated, autograd's included) as a watcher thread saw it ``sample_s`` into the
    collection. The watcher gets the interpreter only if the collection lets go of it (a finalizer running Python
    code, sleeping or waiting on a lock or the GPU); a collection that walks objects the whole time leaves ``stack``
    empty. The watcher is one thread for the timer's life, woken per full collection (a thread started inside a
    collection could deadlock on ``threading``'s own lock); collections on the watcher's own thread are timed, not
    watched."""

    sample_s = 0.05

    def __init__(self):
        self.ms = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self.full: list[dict] = []  # each full collection: ms, objects it walked, what it freed
        self._t0 = 0.0
        self._walked = 0
        self._count_ms = 0.0
        self._idle_at_start = None
        self._watcher = None  # the watcher thread, while active
        self._go = self._done = self._sampled = self._quit = None  # its events
        self._target = None  # (thread id, name) of the collecting thread
        self._seen: list[str] = []  # the stack the watcher saw
        self._watching = False

    @staticmethod
    def _gpu_idle():
        """Whether the default CUDA stream has finished what was queued on it; None without CUDA in use (or while
        the current stream captures a CUDA graph, where a query is not allowed)."""
        if not torch.cuda.is_available() or not torch.cuda.is_initialized() or \
                torch.cuda.is_current_stream_capturing():
            return None
        return torch.cuda.default_stream().query()

    @staticmethod
    def _inside_callback(frame) -> bool:
        """Whether ``frame`` or one of its callers is this timer's callback (the collection already ended)."""
        while frame is not None:
            if frame.f_code is GcTimer._cb.__code__:
                return True
            frame = frame.f_back
        return False

    def _watch(self):
        import traceback

        while True:
            self._go.wait()
            self._go.clear()
            if self._quit.is_set():
                return
            ident = self._target[0]
            if not self._done.wait(self.sample_s):
                frame = sys._current_frames().get(ident)  # runs only once the collection lets go of the interpreter
                if frame is not None and not self._done.is_set() and not self._inside_callback(frame):
                    self._seen = [line.rstrip() for line in traceback.format_stack(frame)[-8:]]
                del frame  # (not kept beyond the sample)
            self._sampled.set()

    def _cb(self, phase, info):
        import gc
        import threading

        gen = info["generation"]
        if phase == "start":
            self._t0 = time.perf_counter()
            if gen == 2:  # what a full collection walks (every generation, the frozen objects excluded), counted
                t = self._t0  # before its clock starts; the count's own time is reported beside
                self._walked = len(gc.get_objects())
                self._idle_at_start = self._gpu_idle()
                me = threading.current_thread()
                self._seen, self._target = [], (me.ident, me.name)
                self._watching = self._watcher is not None and me is not self._watcher
                if self._watching:
                    self._done.clear()
                    self._sampled.clear()
                    self._go.set()
                self._t0 = time.perf_counter()
                self._count_ms = (self._t0 - t) * 1000
        else:
            ms = (time.perf_counter() - self._t0) * 1000
            self.ms[gen] += ms
            self.count[gen] += 1
            if gen == 2:
                if self._watching:
                    self._done.set()
                    self._sampled.wait()
                    self._watching = False
                self.full.append({"ms": round(ms, 1), "walked": self._walked, "collected": info.get("collected"),
                                  "uncollectable": info.get("uncollectable"), "frozen": gc.get_freeze_count(),
                                  "count_ms": round(self._count_ms, 1),  # (in the step's time, not in "ms")
                                  "gpu_idle": [self._idle_at_start, self._gpu_idle()],
                                  "thread": self._target[1], "stack": list(self._seen)})

    def __enter__(self):
        import gc
        import threading

        self._go, self._done, self._sampled, self._quit = (threading.Event() for _ in range(4))
        self._watcher = threading.Thread(target=self._watch, name="gc-watch", daemon=True)
        self._watcher.start()
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc):
        import gc

        gc.callbacks.remove(self._cb)
        self._quit.set()
        self._go.set()
        self._watcher.join()
        self._watcher = None

    def report(self) -> dict:
        return {"collections": list(self.count), "ms": [round(m, 1) for m in self.ms], "full": self.full}


def collect_timed() -> dict:
    """One full collection by hand: its milliseconds, the objects it walked (the frozen ones excluded) and freed."""
    import gc

    walked = len(gc.get_objects())
    t0 = time.perf_counter()
    collected = gc.collect()
    return {"ms": round((time.perf_counter() - t0) * 1000, 1), "walked": walked, "collected": collected,
            "frozen": gc.get_freeze_count()}


def time_fn_host(fn, device, warmup: int, iters: int) -> tuple[list[float], list[float]]:
    """:func:`time_fn` plus, per call, the host's own milliseconds: until ``fn`` returned, before the sync. Where
    the two are close, the step waits for the host (Python, launches), not for the GPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    wall, host = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            host.append((time.perf_counter() - t0) * 1000)
            b.record()
            torch.cuda.synchronize()
            wall.append(a.elapsed_time(b))
        else:
            fn()
            host.append((time.perf_counter() - t0) * 1000)
            wall.append(host[-1])
    return wall, host


def time_steady(fn, device, windows: int, per_window: int = 3) -> list[float]:
    """ms per call with calls back to back, as ``Trainer.fit`` runs steps (the host may prepare the next step
    while the GPU finishes the last): CUDA events around ``per_window`` calls, one number per window."""
    if device.type != "cuda":
        return time_fn(fn, device, 0, windows)
    out = []
    for _ in range(windows):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(per_window):
            fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / per_window)
    return out


def label_phases(trainer):
    """``record_function`` ranges around the step's parts, for ``bench.trace_gaps`` (instance attributes; the
    classes stay as they are)."""
    from torch.profiler import record_function

    def wrap(obj, attr, name):
        inner = getattr(obj, attr)

        def labelled(*a, **kw):
            with record_function(name):
                return inner(*a, **kw)
        setattr(obj, attr, labelled)

    wrap(trainer, "train_step", "train_step")
    wrap(trainer, "latents_for", "latents")
    wrap(trainer, "encode", "text encoder")
    wrap(trainer.backend.pipe.transformer, "forward", "transformer forward")
    wrap(trainer.optimizer, "step", "adamw")


def trace_steps(trainer, device, path: Path, steps: int = 2) -> dict:
    """Chrome trace (gzip) of ``steps`` back-to-back training steps and its GPU-idle report."""
    from torch.profiler import ProfilerActivity, profile

    from . import trace_gaps

    label_phases(trainer)
    for _ in range(2):
        trainer.train_step()
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainer.train_step()
        _sync(device)
    raw = path.with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)  # the profiler does not make the folder (it only logs)
    prof.export_chrome_trace(str(raw))
    import gzip
    import shutil

    with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    rep = trace_gaps.gap_report(trace_gaps.load(path))
    print(trace_gaps.format_report(rep), flush=True)
    return rep


def count_tflop(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / 1e12


def count_tflop_eager_attention(fn, text_encoder) -> float:
    """FlopCounterMode cannot size SDPA with grouped KV heads; count with transformers' eager attention."""
    configs = [m.config for m in text_encoder.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    old = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = "eager"
        return count_tflop(fn)
    finally:
        for c, o in zip(configs, old):
            c._attn_implementation = o


def matmul_peak(device, dtype) -> float:
    if device.type != "cuda":
        return float("nan")
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = statistics.median(time_fn(lambda: a @ b, device, 3, 20))
    return 2 * n**3 / (ms / 1000) / 1e12


def fp8_matmul_peak(device) -> float:
    """The same product through ``torch._scaled_mm`` with row-wise scales (what ``model.fp8_matmul`` runs)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return float("nan")
    n = 8192
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    sa, sb = torch.ones(n, 1, device=device), torch.ones(1, n, device=device)
    ms = statistics.median(time_fn(lambda: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
                                   device, 3, 20))
    return 2 * n**3 / (ms / 1000) / 1e12


def _mem_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _mem_peak(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def frozen_bytes(pipe) -> int:
    """The frozen models' bytes as they are stored now (bf16, or fp8 where converted: ``Fp8Linear`` keeps its fp8
    weight and row scales as buffers): parameters that train (LoRA, token) not counted, buffers counted; the text
    encoder's vision tower and LM head not counted where training left them in CPU memory (``text_parts.park``)
    while the transformer is elsewhere."""
    from qwen_zero_prior.training.text_parts import unused_tensors

    where = next(pipe.transformer.parameters()).device
    unused = {id(t) for t in unused_tensors(pipe.text_encoder) if t.device != where}
    return sum(t.numel() * t.element_size() for m in (pipe.transformer, pipe.text_encoder, pipe.vae)
               for t in [*(p for p in m.parameters() if not p.requires_grad), *m.buffers()] if id(t) not in unused)


def memory_fields(pipe, cfg_model, args, device) -> dict:
    """``weights_gib`` (frozen weights as stored, :func:`frozen_bytes`) and what ``model.memory: auto`` would plan for
    this variant's settings at the capacity the run has (``--memory-cap-gib``, else the device's): the plan and
    its resident estimate, to set beside the measured peak."""
    from qwen_zero_prior.training import memory

    w = frozen_bytes(pipe)
    out = {"weights_bytes": w, "weights_gib": round(w / 2**30, 2)}
    capacity = args.memory_cap_gib * 2**30 if args.memory_cap_gib else None
    if capacity is None and device.type == "cuda":
        capacity = memory.per_process_capacity(device)[0]
    if capacity is not None:
        from qwen_zero_prior.training.families import QWEN_IMAGE_21, detect_pipeline

        # 2.1's plans take the weights by part (memory.choose_21), counted as this variant stores them
        parts = memory.weight_parts(pipe) if detect_pipeline(pipe).name == QWEN_IMAGE_21 else None
        plan = memory.choose("auto", weights_bytes=w, resolution=args.res, batch_size=1, device=device,
                             reduce_overhead=bool(cfg_model and cfg_model.compile_graphs),
                             capacity_bytes=capacity, parts=parts)
        out.update(plan_auto=plan.mode, plan_resident_need_gib=plan.need_gib["resident"],
                   plan_capacity_gib=plan.capacity_gib)
    return out


# ---- the variants ---------------------------------------------------------------------------------------
def dit_inputs(pipe, res: int, text_len: int, device, dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = w = res // pipe.vae_scale_factor
    x = torch.randn(1, (h // 2) * (w // 2), pipe.transformer.config.in_channels, generator=g).to(device, dtype)
    ctx = torch.randn(1, text_len, pipe.transformer.config.joint_attention_dim, generator=g).to(device, dtype)
    target = torch.randn(x.shape, generator=g).to(device, dtype)
    t = torch.full((1,), 0.5, device=device, dtype=dtype)
    return dict(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_shapes=[[(1, h // 2, w // 2)]]), target


def dit_inputs_21(pipe, res: int, text_len: int, device, dtype, seed: int = 0):
    """The 2.1 transformer's call as the pipeline (and ``flow21.forward``) makes it: latents unpatched, one
    block-causal sequence of ``text_len`` text tokens and the image's 2x2 slots."""
    from qwen_zero_prior.training import flow21

    g = torch.Generator(device="cpu").manual_seed(seed)
    h = w = res // pipe.vae_scale_factor
    c = pipe.transformer.config.in_channels
    x = torch.randn(1, h * w, c, generator=g).to(device, dtype)
    ctx = torch.randn(1, text_len, pipe.transformer.config.context_in_dim, generator=g).to(device, dtype)
    target = torch.randn(x.shape, generator=g).to(device, dtype)
    t = torch.full((1,), 0.5, device=device, dtype=dtype)
    return dict(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_shapes=[[(1, h, w)]],
                img_mask=flow21.image_slot_mask(text_len, h, w, 1, device)), target


def baseline_step_fn(pipe, rank: int, inputs, target, checkpointing: bool, targets=ATTENTION_TARGETS):
    """diffusers + peft as its training scripts do it: LoRA (fp32 params) on ``targets`` (the family's default,
    as this project's step), AdamW, eager. The loss is over the image tokens (2.1 returns the text's too)."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    tr = pipe.transformer
    tr.requires_grad_(False)
    if "bench" not in (getattr(tr, "peft_config", None) or {}):
        tr.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                  target_modules=list(targets)), adapter_name="bench")
        cast_training_params(tr, dtype=torch.float32)
    tr.set_adapter("bench")
    if checkpointing:
        tr.enable_gradient_checkpointing()
    else:
        tr.disable_gradient_checkpointing()
    tr.train()
    params = [p for p in tr.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        out = tr(**inputs, return_dict=False)[0][:, -target.shape[1]:]
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def make_dataset(folder: Path, res: int, n: int = 2) -> list[Example]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"img_{i}.png"
        Image.new("RGB", (res, res), (40 * i + 60, 120, 200)).save(p)
        out.append(Example(p, TEMPLATE_PROMPT, (res, res)))
    return out


# Qwen-Image's text-stream projections (relative to transformer_blocks.<i>.), for the bench's fp8_text=1
QWEN_IMAGE_TEXT_STREAM = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                          "txt_mlp.net.0.proj", "txt_mlp.net.2")


@contextlib.contextmanager
def _text_stream_fp8(family: str):
    """While open, Qwen-Image's family names its text-stream projections among its fp8 layers too (what the
    trainer converts and what the memory plan counts)."""
    import dataclasses
    from unittest import mock

    from qwen_zero_prior.training import diffusers_backend, families

    if family != "qwen-image":
        raise SystemExit(f"fp8_text=1 is Qwen-Image's (two streams); --family {family} converts every token's "
                         "projections already")
    fam = families.FAMILIES[families.QWEN_IMAGE]
    wider = dataclasses.replace(fam, fp8_modules=tuple(fam.fp8_modules) + QWEN_IMAGE_TEXT_STREAM)
    detect = families.detect_pipeline

    def detect_wider(pipe, *a, **kw):
        found = detect(pipe, *a, **kw)
        return wider if found.name == fam.name else found

    with mock.patch.object(families, "detect_pipeline", detect_wider), \
            mock.patch.object(diffusers_backend, "detect_pipeline", detect_wider):
        yield


def project_trainer(pipe, args, workdir: Path, text_encoder_storage: str | None = None, layout: str | None = None,
                    **model_overrides):
    """The project's Trainer on ``pipe`` with the bench's settings; ``text_encoder_storage``: where offload keeps
    the text decoder's layers (``model.offload_text_encoder``; None: the model's own choice)."""
    from qwen_zero_prior.training.diffusers_backend import make_backend
    from qwen_zero_prior.training.families import get_family
    from qwen_zero_prior.training.trainer import Trainer

    model = {"base_model": "random-weights", "dtype": args.dtype, "device": str(args.device_obj),
             "compile": args.compile, "attention_backend": args.attention_backend or None,
             "compile_mode": args.compile_mode or None}
    model.update(model_overrides)
    if text_encoder_storage:
        model["offload_text_encoder"] = text_encoder_storage
    cfg = Config.from_dict({
        "model": model,
        "train": {"train_placeholder_token": True, "placeholder_token": "<zwx>", "rank": args.rank,
                  "alpha": args.rank, "steps": 10**6, "resolution": args.res, "checkpoint_every": 0,
                  "lora_targets": get_family(args.family).default_lora_preset, "batch_size": 1, "seed": 0},
    })
    backend = make_backend(cfg, pipe)
    if layout:
        backend.offload_layout = layout
    return Trainer(cfg, backend, make_dataset(workdir / "data", args.res), workdir)


def count_tflop_text_encoder(te_fn, trainer) -> float:
    """FLOPs of the text-encoder part, counted on its eager path (graph replays are invisible to the counter)."""
    suffix = trainer.backend.prompts.suffix
    graphs = suffix.cuda_graphs if suffix is not None else False
    if suffix is not None:
        suffix.cuda_graphs = False
    try:
        return count_tflop_eager_attention(te_fn, trainer.backend.pipe.text_encoder)
    finally:
        if suffix is not None:
            suffix.cuda_graphs = graphs


def text_encoder_fn(trainer):
    """Text-encoder forward + backward to the token row (the part (b) adds over a plain LoRA step)."""
    caption = trainer.examples[0].caption

    def run():
        emb, _ = trainer.encode([caption])
        emb.float().square().mean().backward()
        trainer.token.vector.grad = None

    return run


def text_len_of(trainer) -> int:
    return len(trainer.backend.prompts.ids(trainer.examples[0].caption)) - trainer.backend.prompts.drop


# ---- main -------------------------------------------------------------------------------------------------
def apply_memory_cap(cap_gib: float, device: torch.device) -> float | None:
    """A hard per-process cap (how an 80 GB or 24 GB card is emulated on a bigger one); call before anything else
    allocates on the GPU. Returns the fraction set."""
    if not cap_gib or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()  # a bare "cuda" is refused
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, cap_gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def _main_thread() -> bool:
    """Whether this is the main thread (the only one Python lets set signal handlers)."""
    import threading

    return threading.current_thread() is threading.main_thread()


def _run_child(cmd: list[str], stream):
    """Run one variant's process to its end. Stopped by SIGTERM (``timeout``, a job's limit) or Ctrl-C, this process
    stops the child first: by default a SIGTERM would end this one alone and leave the child holding the GPU."""
    import signal
    import subprocess

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop) if _main_thread() else None
    proc = subprocess.Popen(cmd, stdout=stream, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        proc.wait()
        return proc
    finally:
        if proc.poll() is None:  # stopped while the child runs: take it down too
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_isolated(args, argv: list[str]) -> dict:
    """Each ``--variant`` in its own process (a CUDA OOM or a crash of one cannot take the others down, and each
    starts with clean memory); a variant that fails is a row saying how, not a dead benchmark."""
    res: dict = {"family": args.family, "size": args.size, "mode": "variants (isolated)",
                 "memory_cap_gib": args.memory_cap_gib or None, "resolution": args.res, "rank": args.rank, "rows": []}
    base = [a for a in argv if a != "--isolate"]
    base = [a for i, a in enumerate(base) if a != "--variant" and (i == 0 or base[i - 1] != "--variant")]
    base = [a for i, a in enumerate(base) if a != "--out" and (i == 0 or base[i - 1] != "--out")]
    for index, spec in enumerate(args.variant):
        if args.out:  # the rows so far: a run stopped by a time limit keeps what it measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=1))
        out = Path(tempfile.mkdtemp(prefix="qzp-variant-")) / "row.json"
        argv_i = list(base)
        if args.trace:  # each variant's traces in their own folder (a child numbers its only variant 0)
            argv_i[argv_i.index("--trace") + 1] = str(Path(args.trace) / f"variant-{index}")
        cmd = [sys.executable, "-m", "bench.bench_step", *argv_i, "--variant", spec, "--out", str(out)]
        # each variant's whole output beside the JSON (kernel tables, gap reports, a failure's cause), written as it
        # comes, so a run stopped by a time limit leaves what its variant had printed; a crash prints the Python stack
        # of every thread (faulthandler), so the row says where it died
        log = (Path(args.out).with_name(f"{Path(args.out).stem}-variant-{index}.log") if args.out
               else out.with_name("output.log"))
        with open(log, "w") as stream:
            proc = _run_child(cmd, stream)
        tail = log.read_text(errors="replace")[-3000:]
        try:  # measured (the child writes its rows at the end), even where it then crashed on exit
            child = json.loads(out.read_text()) if out.is_file() else None
        except ValueError:  # cut short while writing: as if not written
            child = None
        if child is not None:
            for key in ("device", "torch", "diffusers", "peft", "transformers"):
                res.setdefault(key, child.get(key))
            if proc.returncode != 0:
                for r in child["rows"]:
                    r["exit_after_rows"] = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
                                            else f"exit {proc.returncode}")
                    r["exit_log_tail"] = tail[-1200:]
            res["rows"] += child["rows"]
            for r in child["rows"]:
                print(json.dumps({k: v for k, v in r.items() if k != "exit_log_tail"}), flush=True)
            continue
        kind = ("CUDA out of memory" if "OutOfMemoryError" in tail or "CUDA out of memory" in tail else
                f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}")
        overrides = _parse_variant(spec)
        cap = overrides.get("memory_cap_gib")
        which = "a-variant" if overrides.get("baseline") else "b-variant"
        row = {"name": f"{which} {spec or 'defaults'}", "error": kind, "ms_median": float("nan"),
               "memory_cap_gib": float(cap) if cap else args.memory_cap_gib or None, "log_tail": tail[-1200:]}
        res["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
    return res


def _cublas_workspace(args, device: torch.device) -> str:
    """As training chooses (``training/cublas.py``), before anything runs a product: cuBLAS without a workspace for
    a step compiled with CUDA graphs and fp8 (``--cublas-workspace auto``: in ``--mode variants`` when every variant
    of this process is one; other modes keep PyTorch's), ``none`` or ``default`` for every row, or a variant's own
    ``cublas_ws=0/1`` (with ``--isolate`` when there are several). Returns the setting, for the rows."""
    from qwen_zero_prior.training import cublas
    from qwen_zero_prior.training.config import ModelConfig

    variants = [_parse_variant(v) for v in args.variant] if args.mode == "variants" else []
    if any("cublas_ws" in v for v in variants):
        if len(variants) > 1:
            raise SystemExit("a --variant with cublas_ws needs --isolate (cuBLAS reads its workspace size once a "
                             "process)")
        choice = "default" if _pop_flag(dict(variants[0]), "cublas_ws", False, args.variant[0]) else "none"
    else:
        choice = args.cublas_workspace
    if choice == "auto":  # the variant's final model settings, as run.train gives cublas.log_choice
        fast = bool(variants) and all(
            not v.get("baseline") and cublas.faster_without_workspace(ModelConfig(
                compile=bool(v.get("compile", args.compile)),
                compile_mode=v.get("compile_mode", args.compile_mode or None),
                fp8_matmul=bool(v.get("fp8_matmul", False)))) for v in variants)
        choice = "none" if fast else "default"
    if choice == "none" and device.type == "cuda":
        cublas.set_no_workspace()
    return cublas.workspace_setting()


def run(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    workspace = _cublas_workspace(args, device)  # before any product: cuBLAS reads the size at its first one
    args.device_obj = device
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    if args.family == "qwen-image-2.1" and args.mode in ("main", "profile"):
        raise SystemExit(f"--family qwen-image-2.1 runs in --mode variants (its (a) and (b) rows) and --mode capped; "
                         f"--mode {args.mode} is Qwen-Image's only")
    res: dict = {"family": args.family, "size": args.size,
                 "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "resolution": args.res, "rank": args.rank, "rows": [],
                 "memory_cap_gib": args.memory_cap_gib or None, "cublas_workspace": workspace}
    if args.mode == "variants":  # a variant's own cap ("memory_cap_gib=78"): one variant a process (--isolate)
        caps = [_parse_variant(v).get("memory_cap_gib") for v in args.variant]
        if any(caps):
            if len(caps) > 1:
                raise SystemExit("a --variant with memory_cap_gib needs --isolate (a cap applies to a whole process)")
            args.memory_cap_gib = float(caps[0])
            res["memory_cap_gib"] = args.memory_cap_gib
    if args.mode == "capped" and args.memory_cap_gib:
        raise SystemExit(f"--mode capped builds the full-size model on the GPU first and then applies its own cap "
                         f"(--capped-gib {args.capped_gib:g}); --memory-cap-gib {args.memory_cap_gib:g} would cap the "
                         "build itself (out of memory): drop --memory-cap-gib")
    fraction = apply_memory_cap(args.memory_cap_gib, device)
    if fraction is not None:
        res["memory_fraction"] = round(fraction, 4)
    import diffusers
    import peft
    import transformers

    res.update(diffusers=diffusers.__version__, peft=peft.__version__, transformers=transformers.__version__)
    if args.mode == "capped":
        return run_capped(args, device, dtype, res)
    if args.mode == "profile":
        return run_profile(args, device, dtype, res)
    if args.mode == "variants":
        res = run_variants(args, device, dtype, res)
        for r in res["rows"]:  # each row says it: an isolated run's rows come from processes of their own
            r.setdefault("cublas_workspace", workspace)
        return res
    res["matmul_peak_tflops"] = peak = matmul_peak(device, dtype)
    res["fp8_matmul_peak_tflops"] = fp8_matmul_peak(device) if args.fp8 else None
    t0 = time.time()
    pipe, real_tok = build_pipeline(args.size, device, dtype)
    res["build_s"] = round(time.time() - t0, 1)
    res["real_tokenizer"] = real_tok
    work = Path(tempfile.mkdtemp(prefix="qzp-bench-"))

    def row(name, ms, tflop=None, mem=None, note="", steady=None):
        med = statistics.median(ms)
        r = {"name": name, "ms_median": round(med, 2), "ms_min": round(min(ms), 2), "ms_max": round(max(ms), 2),
             "n": len(ms), "tflop": None if tflop is None else round(tflop, 2),
             "mfu": None if (tflop is None or peak != peak) else round(tflop / (med / 1000) / peak, 3),
             "peak_mem_gib": None if mem is None or mem != mem else round(mem, 1), "note": note}
        if steady:
            r["ms_steady_median"] = round(statistics.median(steady), 2)
            r["mfu_steady"] = r["mfu"] and round(tflop / (r["ms_steady_median"] / 1000) / peak, 3)
        res["rows"].append(r)
        print(json.dumps(r), flush=True)
        return r

    # (b) first: the project's step (its text length sets the baseline's). FLOPs are counted on eager code
    # further down (FlopCounterMode and compiled regions do not mix) and filled in at the end.
    trainer = project_trainer(pipe, args, work)
    text_len = text_len_of(trainer)
    res["text_tokens"] = text_len
    trainer.cache_all_latents()
    te_fn = text_encoder_fn(trainer)
    te_tflop = count_tflop_text_encoder(te_fn, trainer)
    _mem_reset(device)
    suffix = trainer.backend.prompts.suffix
    row("b-text-encoder fwd+bwd to token row (prefix cache, CUDA graphs)",
        time_fn(te_fn, device, args.warmup, args.iters), te_tflop, _mem_peak(device))
    suffix.cuda_graphs = False
    row("b-text-encoder fwd+bwd to token row (prefix cache, eager)", time_fn(te_fn, device, args.warmup, args.iters),
        te_tflop)
    suffix.cuda_graphs = True
    trainer.backend.prompts.prefix_cache = False
    row("b-text-encoder fwd+bwd to token row (no prefix cache, eager)", time_fn(te_fn, device, args.warmup, args.iters),
        count_tflop_text_encoder(te_fn, trainer))
    trainer.backend.prompts.prefix_cache = True
    _mem_reset(device)
    warm = args.warmup + (3 if args.compile else 0)
    ms = time_fn(trainer.train_step, device, warm, args.iters)
    steady = time_steady(trainer.train_step, device, args.iters)
    row(f"b-project step: token+LoRA (compile={args.compile} {args.compile_mode}, attn={args.attention_backend or 'default'})",
        ms, None, _mem_peak(device), steady=steady)
    b_row = res["rows"][-1]
    if args.only_b:
        del trainer
        if args.fp8:
            project_step_fp8(pipe, args, work, row, None)
        return res

    # (c) inference forward with the trained token + LoRA applied (fused) vs without
    inputs, target = dit_inputs(pipe, args.res, text_len, device, dtype)
    tr = pipe.transformer
    tr.eval()

    graphs = args.compile and args.compile_mode in GRAPH_COMPILE_MODES

    def fwd():
        if graphs:  # each call is a new "step" for the CUDA-graph trees (else they re-record)
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            tr(**inputs, return_dict=False)

    tr.fuse_lora(adapter_names=["zero_prior"])
    with_lora = time_fn(fwd, device, args.warmup, args.iters)
    tr.unfuse_lora()
    tr.disable_adapters()
    without = time_fn(fwd, device, args.warmup, args.iters)
    row("c-inference forward, token+LoRA fused", with_lora)
    c_rows = res["rows"][-1:]
    row("c-inference forward, base model", without)
    c_rows.append(res["rows"][-1])
    tr.enable_adapters()
    tr.delete_adapters("zero_prior")
    del trainer
    for blk in tr.transformer_blocks:  # back to eager for the baseline (undo nn.Module.compile)
        blk._compiled_call_impl = None
    _undo_compile_rewrites(tr)
    _mem_reset(device)
    fwd_tflop = count_tflop(fwd)
    for r in c_rows:
        r["tflop"] = round(fwd_tflop, 2)
        r["mfu"] = None if peak != peak else round(fwd_tflop / (r["ms_median"] / 1000) / peak, 3)

    # (a) diffusers + peft baseline, eager
    inputs, target = dit_inputs(pipe, args.res, text_len, device, dtype)
    dit_tflop = None
    for ckpt in (False, True):
        step = baseline_step_fn(pipe, args.rank, inputs, target, ckpt)
        _mem_reset(device)
        ms = time_fn(step, device, args.warmup, args.iters)
        flops = count_tflop(step)
        dit_tflop = dit_tflop or flops
        row(f"a-diffusers+peft step, eager, checkpointing={ckpt}", ms, flops, _mem_peak(device))
    b_row["tflop"] = round(dit_tflop + te_tflop, 2)
    b_row["mfu"] = None if peak != peak else round(b_row["tflop"] / (b_row["ms_median"] / 1000) / peak, 3)
    if "ms_steady_median" in b_row and peak == peak:
        b_row["mfu_steady"] = round(b_row["tflop"] / (b_row["ms_steady_median"] / 1000) / peak, 3)
    if args.fp8:
        project_step_fp8(pipe, args, work, row, b_row["tflop"])
    return res


def rope_halves_speed_only(x, freqs_cis, use_real: bool = True, use_real_unbind_dim: int = -1):
    """``rope_halves=1``: training/rope.py's real RoPE with each head's first half rotated against its second
    (``x·cos + rotate_half(x)·sin``) instead of interleaved pairs: the cost of that layout, not Qwen-Image's numbers
    (those would need the q/k projections' rows and norms permuted to match)."""
    from qwen_zero_prior.training import rope

    if use_real or not torch.is_complex(freqs_cis):
        return rope.apply_rotary_emb_qwen_real(x, freqs_cis, use_real, use_real_unbind_dim)
    f = torch.view_as_real(freqs_cis).unsqueeze(1)  # [S, 1, D/2, 2]
    cos, sin = torch.cat([f[..., 0], f[..., 0]], -1), torch.cat([f[..., 1], f[..., 1]], -1)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


def _rope_form(transformer) -> str:
    """"real" where the compiled blocks will trace training/rope.py's real-arithmetic RoPE ("tables" where they get
    its real tables, ``rope_tables=1``), "halves" where ``rope_halves=1`` put :func:`rope_halves_speed_only` there,
    else "complex" (diffusers' own), as the transformer's module looks it up now."""
    import sys

    from qwen_zero_prior.training import rope

    fn = getattr(sys.modules.get(type(transformer).__module__), "apply_rotary_emb_qwen", None)
    if fn is rope.apply_rotary_emb_qwen_real and rope.tables_installed(transformer):
        return "tables"
    return {rope.apply_rotary_emb_qwen_real: "real", rope_halves_speed_only: "halves"}.get(fn, "complex")


def _has_fp8_backward_copies(transformer) -> bool:
    return any(getattr(m, "wt_q", None) is not None for m in transformer.modules())


def _fp8_backward_copy_blocks(transformer) -> int:
    """How many of the transformer's blocks hold fp8 backward copies."""
    return sum(any(getattr(m, "wt_q", None) is not None for m in blk.modules()) for blk in transformer.transformer_blocks)


def _undo_compile_rewrites(transformer) -> None:
    """Plain diffusers RoPE and GELU again (the trainer installs their fusable forms with ``model.compile``), and
    diffusers' own attention processors (the trainer's send 2.1's image queries to ``model.attention_backend`` and
    run q/k/v's LoRA A products as one matmul): the baseline runs diffusers' own code, and eagerly the rewrites would
    only cost memory."""
    from qwen_zero_prior.training import attention21, attention_qwen, gelu, lora_shared, rope

    rope.uninstall()
    gelu.uninstall(transformer)
    attention21.uninstall(transformer)
    attention_qwen.uninstall(transformer)
    lora_shared.uninstall_swiglu(transformer)


def project_step_fp8(pipe, args, work: Path, row, tflop):
    """(b) again with ``model.fp8_matmul`` (converts the image-stream base weights in place: run it last).

    Its TFLOP are the bf16 step's and its MFU is against the bf16 peak ("bf16-equivalent"), so the two rows
    compare as speed; the fp8 tensor-core peak is reported beside."""
    from qwen_zero_prior.training import tiny

    device = args.device_obj
    tr = pipe.transformer
    for name in list(getattr(tr, "peft_config", None) or {}):
        tr.delete_adapters(name)
    tr.disable_gradient_checkpointing()
    for blk in tr.transformer_blocks:
        blk._compiled_call_impl = None
    torch._dynamo.reset()
    pipe.tokenizer = tiny.load_tokenizer()[0]  # a tokenizer without the first trainer's <zwx>
    trainer = project_trainer(pipe, args, work / "fp8", fp8_matmul=True)
    trainer.cache_all_latents()
    _mem_reset(device)
    ms = time_fn(trainer.train_step, device, args.warmup + (3 if args.compile else 0), args.iters)
    steady = time_steady(trainer.train_step, device, args.iters)
    r = row(f"b-project step: token+LoRA, fp8 matmuls (compile={args.compile} {args.compile_mode}, "
        f"attn={args.attention_backend or 'default'})", ms, tflop, _mem_peak(device),
        note="TFLOP/MFU: bf16-equivalent (the bf16 step's FLOPs against the bf16 peak)", steady=steady)
    r.update(memory_fields(pipe, trainer.cfg.model, args, device))
    if args.trace:
        r["idle"] = trace_steps(trainer, device, Path(args.trace) / "b-fp8.json.gz")


_MISSING = object()


def _lora_fp32_grad() -> bool:
    """Whether lora_shared's products ran through ``lora_product`` (float32 weight gradients straight from the
    product where CUDA has ``mm`` with ``out_dtype``)."""
    from qwen_zero_prior.training import lora_shared

    return bool(lora_shared.FLOAT32_WEIGHT_GRADS)


def _lora_addmm() -> bool:
    """Whether lora_shared's B products were added to their base outputs by addmm (``FUSED_DELTA``, the fp8 layers'
    bias in their product: ``fp8.BIAS_IN_PRODUCT``)."""
    from qwen_zero_prior.training import fp8, lora_shared

    return bool(lora_shared.FUSED_DELTA and fp8.BIAS_IN_PRODUCT)


def _attn_bshd(transformer) -> bool:
    """Whether the step's attention ran through ``attention_qwen.sdpa_bshd`` (the switch on and the compiled
    processors' backend cuDNN's)."""
    from qwen_zero_prior.training import attention_qwen

    blocks = getattr(transformer, "transformer_blocks", ())
    procs = [getattr(getattr(b, "attn", None), "processor", None) for b in blocks]
    return bool(attention_qwen.BSHD_CUDNN) and any(
        type(p).__name__ == "SharedQkvAttnProcessor"
        and attention_qwen._cudnn_backend(p._attention_backend, p._parallel_config) for p in procs)


def _fast_accum_fields(transformer) -> dict:
    """What the fp8 layers' products accumulate with, as the step ran them (``Fp8Linear.fast_accum`` forward,
    ``fast_accum_backward``): true, false, or "mixed"."""
    from qwen_zero_prior.training.fp8 import Fp8Linear

    layers = [m for m in transformer.modules() if isinstance(m, Fp8Linear)]

    def one(values: set):
        return values.pop() if len(values) == 1 else "mixed" if values else None

    return {"fp8_fast_accum": one({m.fast_accum for m in layers}),
            "fp8_fast_accum_backward": one({m.fast_accum_backward for m in layers})}


def _kernel_pieces() -> dict:
    """How the GELU and norm/RoPE kernels split their rows (``kernel_pieces=0``: as session 35)."""
    from qwen_zero_prior.training import gelu_fp8, norm_rope

    return {"gelu_3_pieces": gelu_fp8.PIECES, "norm_rope_heads_per_program": norm_rope.HEADS_PER_PROGRAM}


def _mlps_fused(transformer) -> int:
    """How many of the transformer's MLPs run through gelu_fp8's kernels."""
    from qwen_zero_prior.training import gelu_fp8

    return sum(gelu_fp8.installed(b.img_mlp) for b in getattr(transformer, "transformer_blocks", ())
               if hasattr(b, "img_mlp"))


def _inductor_switch(stack: contextlib.ExitStack, overrides: dict, spec: str, key: str, setting: str,
                     value) -> bool:
    """A bench-only on/off ``key`` that sets inductor's ``setting`` to ``value`` for one variant (restored when
    ``stack`` closes); refused on a torch whose inductor lacks the setting."""
    if not _pop_flag(overrides, key, False, spec):
        return False
    import torch._inductor.config as inductor_config

    obj = inductor_config
    for part in setting.split("."):
        obj = getattr(obj, part, _MISSING)
    if obj is _MISSING:
        raise SystemExit(f"--variant {spec!r}: {key}=1 needs torch._inductor.config.{setting}, which torch "
                         f"{torch.__version__} does not have")
    stack.enter_context(inductor_config.patch({setting: value}))
    return True


def _positive_int(value, key: str, spec: str) -> int:
    if not (isinstance(value, str) and value.isdigit() and int(value) > 0):
        raise SystemExit(f"--variant {spec!r}: {key}={value!r}; expected a positive whole number")
    return int(value)


def _pop_flag(overrides: dict, key: str, default: bool, spec: str) -> bool:
    """A bench-only on/off key of a ``--variant`` (popped): 1/0 (true/false, yes/no) only; anything else is
    refused rather than read as on."""
    value = overrides.pop(key, default)
    if not isinstance(value, bool):
        raise SystemExit(f"--variant {spec!r}: {key}={value!r}; expected 1 or 0")
    return value


def _compiled_switch(stack: contextlib.ExitStack, overrides: dict, args, spec: str, key: str, what: str,
                     targets: list) -> None:
    """A bench-only 0/1 key of a ``--variant`` (popped) that sets module switches of the compiled step
    (``targets``: (module, attribute) pairs) for the variant; refused without compile, which they need."""
    from unittest import mock

    if key not in overrides:
        return
    value = _pop_flag(overrides, key, False, spec)
    if not overrides.get("compile", args.compile):
        raise SystemExit(f"--variant {spec!r}: {key}={int(value)} changes the compiled step's {what}; add compile=1")
    for module, attr in targets:
        stack.enter_context(mock.patch.object(module, attr, value))


def _parse_variant(spec: str) -> dict:
    out = {}
    for item in spec.split():
        key, _, value = item.partition("=")
        low = value.lower()
        out[key] = True if low in ("1", "true", "yes") else False if low in ("0", "false", "no") else (value or None)
    return out


# kernel kinds for kernel_summary, first match wins (cuBLAS' nvjet names: "qq" = both operands fp8)
KERNEL_KINDS = (
    ("attention", re.compile(r"sdpa|flash|fmha|cudnn")),
    ("fp8 matmul", re.compile(r"nvjet\w*_qq|f8f8|e4m3")),
    ("split-K reduce", re.compile(r"splitKreduce")),
    ("matmul", re.compile(r"nvjet|gemm|cutlass|xmma|sm90_")),
    ("norm_rope / gelu_quant", re.compile(r"^(norm_rope_|gelu_quant_)?(fwd|bwd)$")),
    ("inductor persistent reduction", re.compile(r"^triton_per_")),
    ("inductor looped reduction", re.compile(r"^triton_red_")),
    ("inductor pointwise", re.compile(r"^triton_poi_")),
    ("optimizer", re.compile(r"multi_tensor_apply|fused_adam|FusedOptimizer")),
    ("copy / memset", re.compile(r"[Mm]emcpy|[Mm]emset|copy_kernel|CatArray")),
    ("other aten", re.compile(r"at::|void ")),
)


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)), "other")


def kernel_summary(events, steps: int) -> dict:
    """Per step: how many kernels ran and their time, by kind (:data:`KERNEL_KINDS`), and the kernels launched
    most often. ``events``: the profiler's averages (``key``, ``self_device_time_total`` in µs, ``count``)."""
    kinds: dict[str, dict] = {}
    named = []
    for e in events:
        us, calls = e.self_device_time_total, e.count
        if us <= 0:  # host-side ops (their device time is their kernels', listed under the kernels' own names)
            continue
        k = kinds.setdefault(kernel_kind(e.key), {"ms": 0.0, "calls": 0.0})
        k["ms"] += us / 1000 / steps
        k["calls"] += calls / steps
        named.append((calls / steps, us / 1000 / steps, e.key))
    by_kind = {k: {"ms": round(v["ms"], 2), "calls": round(v["calls"], 1)}
               for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]["ms"])}
    return {"kernels_per_step": round(sum(v["calls"] for v in kinds.values()), 1),
            "busy_ms": round(sum(v["ms"] for v in kinds.values()), 2), "by_kind": by_kind,
            "most_launched": [{"name": n[:120], "calls": round(c, 1), "ms": round(ms, 3), "kind": kernel_kind(n)}
                              for c, ms, n in sorted(named, reverse=True)[:40]]}


def device_busy_ms(fn, device, steps: int = 2, table: bool = False, summary: dict | None = None) -> float:
    """Summed kernel time per call (CUDA-only profiler: little host overhead); wall minus this is idle GPU time.
    ``summary``: a dict that receives :func:`kernel_summary` of the profiled calls."""
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return float("nan")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    avgs = prof.key_averages()
    if table:
        print(avgs.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=90), flush=True)
    if summary is not None:
        summary.update(kernel_summary(avgs, steps))
    total_us = sum(e.self_device_time_total for e in avgs)
    return total_us / 1000 / steps


def phase_times(trainer, device, n: int = 3) -> dict:
    """Trainer.train_step's phases (forward incl. text encoder, backward, clip+AdamW) timed twice: CUDA events
    (when the GPU finished each) and host clocks (when Python got past each). Host ~= GPU means host-bound."""
    if device.type != "cuda":
        return {}
    rows = []
    for _ in range(n):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        idx, seeds = trainer.plan.batch(trainer.step), trainer.sample_seeds()
        trainer.backend.step_begin()  # as train_step: CUDA-graph trees' step mark, offload's prefetch order
        torch.cuda.synchronize()
        h = [time.perf_counter()]
        ev[0].record()
        loss = trainer.loss_for(idx, sample_seeds=seeds)
        ev[1].record()
        h.append(time.perf_counter())
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ev[2].record()
        h.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(trainer.trainable(), trainer.t.max_grad_norm)
        trainer.optimizer.step()
        ev[3].record()
        h.append(time.perf_counter())
        torch.cuda.synchronize()
        gpu = [ev[i].elapsed_time(ev[i + 1]) for i in range(3)]
        host = [(h[i + 1] - h[i]) * 1000 for i in range(3)]
        rows.append(gpu + host)
    med = [statistics.median(r[i] for r in rows) for i in range(6)]
    names = ("forward", "backward", "optimizer")
    return {f"{k}_{n}": round(v, 1) for k, vals in (("gpu", med[:3]), ("host", med[3:])) for n, v in zip(names, vals)}


def reset_pipeline(pipe) -> None:
    """Undo what an earlier trainer did to ``pipe`` before the next one is built on it: its LoRA adapters, compiled
    blocks, gradient checkpointing, attention processors and token (a fresh tokenizer). fp8 layers stay fp8 (the
    conversion is in place)."""
    from qwen_zero_prior.training import attention21, attention_qwen, lora_shared

    tr = pipe.transformer
    for name in list(getattr(tr, "peft_config", None) or {}):
        tr.delete_adapters(name)
    for blk in tr.transformer_blocks:
        blk._compiled_call_impl = None
    tr.disable_gradient_checkpointing()  # an earlier variant's; the trainer turns it on where configured
    attention21.uninstall(tr)  # an earlier variant's 2.1 processor (compile or its attention_backend)
    attention_qwen.uninstall(tr)  # an earlier compiled variant's Qwen-Image processor
    lora_shared.uninstall_swiglu(tr)
    torch._dynamo.reset()
    _fresh_tokenizer(pipe)


def run_variants(args, device, dtype, res) -> dict:
    """(b) under several model settings (``--variant "fp8_matmul=1 compile_mode=reduce-overhead"``), in the order
    given (fp8 converts weights in place: list those last). Reports wall ms and the GPU's busy ms per step.

    ``--variant "baseline=1 gradient_checkpointing=0"``: (a), the diffusers + peft step on the family's default
    LoRA targets, eager, with or without checkpointing, on (b)'s text length (a project trainer is built first
    only to measure it)."""
    pipe, _ = build_pipeline(args.size, device, dtype, args.family)
    for i, spec in enumerate(args.variant):
        overrides = _parse_variant(spec)
        overrides.pop("memory_cap_gib", None)  # applied by run() before anything was built
        overrides.pop("cublas_ws", None)  # likewise (_cublas_workspace)
        reset_pipeline(pipe)
        tr = pipe.transformer
        from qwen_zero_prior.training import lora_shared, reductions
        if overrides.pop("baseline", False):
            res["rows"].append({**baseline_variant(pipe, args, spec, overrides),
                                "memory_cap_gib": args.memory_cap_gib or None})
            print(json.dumps(res["rows"][-1]), flush=True)
            continue
        # bench-only: real_rope=0 keeps diffusers' complex RoPE under compile (the trainer routes it through
        # training/rope.py's real-arithmetic form), to compare the two or to isolate a compiler failure
        real_rope = _pop_flag(overrides, "real_rope", True, spec)
        # bench-only: layout_cache=0 calls diffusers' 2.1 forward each step (the trainer calls flow21.forward_t2i)
        layout_cache = _pop_flag(overrides, "layout_cache", True, spec)
        if not layout_cache and args.family != "qwen-image-2.1":
            raise SystemExit(f"--variant {spec!r}: layout_cache is Qwen-Image 2.1's (flow21.forward_t2i)")
        from unittest import mock

        from qwen_zero_prior.training.diffusers_backend import DiffusersBackend

        # bench-only: fused_lora=0 runs each LoRA on its own, as peft does (lora_shared.py fuses the A products of
        # layers sharing an input), for this variant's steps
        stack = contextlib.ExitStack()
        fused_lora = _pop_flag(overrides, "fused_lora", True, spec)
        if not fused_lora:
            stack.enter_context(mock.patch.object(lora_shared, "_adapter", lambda layers, products=False: None))
        # bench-only: fp8_backward_copy=0 never keeps fp8 backward copies, =force keeps them for every block, =N for
        # the first N blocks, whatever the memory plan says (=1, the default: as it says), for this variant's
        # trainer only: whether they fit under a cap the plan's estimate rules out
        copies = overrides.pop("fp8_backward_copy", True)
        if copies is True:
            blocks = None
        elif copies is False or copies == "force":
            blocks = {False: 0, "force": len(tr.transformer_blocks)}[copies]
        elif isinstance(copies, str) and copies.isdigit():
            blocks = int(copies)
        else:
            raise SystemExit(f"--variant {spec!r}: fp8_backward_copy={copies!r}; expected 0, 1, force or a number "
                             "of blocks")
        if blocks is not None:
            stack.enter_context(mock.patch.object(DiffusersBackend, "_fp8_backward_copy_blocks",
                                                  lambda self, t, n=blocks: n))
        # bench-only: park_text=0 keeps the text encoder's vision tower and LM head on the GPU, as the trainer did
        # before text_parts.park (the same call's baseline for the memory it frees)
        from qwen_zero_prior.training import text_parts

        if not _pop_flag(overrides, "park_text", True, spec):
            text_parts.unpark(pipe.text_encoder)
            pipe.text_encoder.to(device)
            stack.enter_context(mock.patch.object(text_parts, "park", lambda te: 0))
        # bench-only: combo_kernels=1 turns on inductor's horizontal fusion of independent kernels (the step runs
        # ~15,000 small kernels; session 1 counted ~15 ms of sub-2 µs gaps between them) for this variant's compiles
        if _pop_flag(overrides, "combo_kernels", False, spec):
            import torch._inductor.config as inductor_config

            stack.enter_context(inductor_config.patch(combo_kernels=True))
        # bench-only: pdl=1 has inductor emit Programmatic Dependent Launch in its Triton kernels (Hopper and newer:
        # a kernel's prologue starts while the one before it finishes), against the ~1 µs gaps between the graphs'
        # kernels: ~12 ms of a 285 ms step at 78 GiB was the GPU idle between kernels (docs/benchmarks.md)
        pdl = _inductor_switch(stack, overrides, spec, "pdl", "triton.enable_pdl", True)
        # bench-only: multi_kernel=1 has inductor compile each reduction also as a persistent kernel (a row in
        # registers) and pick the faster at run time. Session 26 measured it alone: the norm-and-quantize kernels
        # ~55 -> 32-41 µs, but the q/k RMSNorm + RoPE kernel ~94 -> 156 µs, which rope_tables=1 changes
        multi_kernel = _inductor_switch(stack, overrides, spec, "multi_kernel", "triton.multi_kernel", 1)
        # persistent_max=N: the width up to which a compiled step's row reductions are persistent kernels
        # (training/reductions.py; default 4096, 0 leaves inductor's own 1024) for this variant's trainer, through
        # QWEN_ZERO_PRIOR_PERSISTENT_MAX; its choice is given back when the variant ends
        persistent_max = overrides.pop("persistent_max", None)
        if persistent_max is not None:
            limit = 0 if persistent_max is False else _positive_int(persistent_max, "persistent_max", spec)
            stack.enter_context(mock.patch.dict(os.environ, {reductions.ENV: str(limit)}))
        if not reductions.installed():
            stack.callback(reductions.uninstall)
        # bench-only: lora_bf16=1 stores the LoRA weights (and so their AdamW state) in bf16 instead of float32
        # master weights: what the ~950 casts a step to the compute dtype cost at most (not a training setting:
        # bf16 weights lose small updates)
        lora_bf16 = _pop_flag(overrides, "lora_bf16", False, spec)
        from qwen_zero_prior.training import attention_qwen, lora_shared
        from qwen_zero_prior.training import fp8 as fp8_module

        # bench-only, each for this variant and with compile (the processors that call lora_shared.project come
        # with it): lora_fp32_grad=1 runs the compiled LoRA products through lora_shared.lora_product, whose float32
        # weight gradients come straight from the product on CUDA (session 32; no faster in session 33);
        # lora_addmm=0/1 turns off/on adding each LoRA B product into its base output inside the product
        # (lora_shared.FUSED_DELTA, an in-place addmm, with the fp8 layers' bias in their product's epilogue,
        # fp8.BIAS_IN_PRODUCT); attn_bshd=0/1 turns off/on cuDNN attention on [B, H, S, D] views of the [B, S, H, D]
        # q/k/v (attention_qwen.BSHD_CUDNN: no copies of q, k and the output; _native_cudnn only). The last two are
        # on by default since session 33
        _compiled_switch(stack, overrides, args, spec, "lora_fp32_grad", "LoRA products",
                         [(lora_shared, "FLOAT32_WEIGHT_GRADS")])
        _compiled_switch(stack, overrides, args, spec, "lora_addmm", "LoRA products",
                         [(lora_shared, "FUSED_DELTA"), (fp8_module, "BIAS_IN_PRODUCT")])
        _compiled_switch(stack, overrides, args, spec, "attn_bshd", "attention call",
                         [(attention_qwen, "BSHD_CUDNN")])
        # bench-only: fp8_text=1 also converts Qwen-Image's text-stream projections to fp8 (the family's fp8 layers
        # are the image stream's: the text stream has ~128 rows, so fp8 can only save weight reads, ~13.6 GB a
        # step in bf16, and memory), for this variant's trainer and memory plan. Session 28: no faster, and 0.2 GiB
        # freed only (these layers get fp8 backward copies too)
        fp8_text = _pop_flag(overrides, "fp8_text", False, spec)
        rope_halves = _pop_flag(overrides, "rope_halves", False, spec)  # applied once the trainer exists (below)
        rope_tables = _pop_flag(overrides, "rope_tables", False, spec)  # likewise
        want_gelu_fused = _pop_flag(overrides, "gelu_fused", True, spec)  # likewise
        want_norm_rope = _pop_flag(overrides, "norm_rope", True, spec)  # likewise
        # bench-only: kernel_pieces=0 launches the GELU and norm/RoPE kernels as session 35 did (a padded row of
        # 12288 -> 16384 lanes, a token's 24 heads padded to 32); set before the first step captures them
        kernel_pieces = _pop_flag(overrides, "kernel_pieces", True, spec)
        if not kernel_pieces:
            from qwen_zero_prior.training import gelu_fp8, norm_rope

            pieces, heads = gelu_fp8.PIECES, norm_rope.HEADS_PER_PROGRAM
            gelu_fp8.PIECES, norm_rope.HEADS_PER_PROGRAM = False, None
            stack.callback(setattr, gelu_fp8, "PIECES", pieces)
            stack.callback(setattr, norm_rope, "HEADS_PER_PROGRAM", heads)
        if fp8_text:
            if not overrides.get("fp8_matmul"):
                raise SystemExit(f"--variant {spec!r}: fp8_text=1 widens fp8_matmul's layers; add fp8_matmul=1")
            stack.enter_context(_text_stream_fp8(args.family))
        trainer = project_trainer(pipe, args, Path(tempfile.mkdtemp(prefix="qzp-bench-")), **overrides)
        if lora_bf16:
            for p in trainer.lora_params:
                p.data = p.data.to(torch.bfloat16)
        if not layout_cache:
            from qwen_zero_prior.training import flow21

            flow21_forward = flow21.forward

            def predict(noisy, sigmas, embeds, mask, backend=trainer.backend):
                with backend._autocast():
                    return flow21_forward(backend.pipe.transformer, noisy, sigmas.to(embeds.dtype), embeds, mask)

            trainer.backend.predict = predict
        if not real_rope:
            from qwen_zero_prior.training import rope

            rope.uninstall()  # before the first step: dynamo looks the function up when it traces
        # bench-only, speed only: rope_halves=1 rotates each head's two halves instead of its interleaved pairs
        # (GPT-NeoX's layout instead of Qwen-Image's): what the q/k RMSNorm + RoPE kernels would cost were the q/k
        # weights' rows permuted to that layout. The step's numbers are not the model's.
        if rope_halves:
            if args.family != "qwen-image" or not trainer.cfg.model.compile or not real_rope:
                raise SystemExit(f"--variant {spec!r}: rope_halves=1 is for Qwen-Image's compiled real RoPE "
                                 "(compile=1, without real_rope=0)")
            import diffusers.models.transformers.transformer_qwenimage as qi

            stack.enter_context(mock.patch.object(qi, "apply_rotary_emb_qwen", rope_halves_speed_only))
        # bench-only: rope_tables=1 has Qwen-Image's pos_embed hand the compiled blocks real cos/sin tables, built
        # once a forward, instead of complex frequencies (rope.install_tables: the model's numbers, tested)
        if rope_tables:
            if args.family != "qwen-image" or not trainer.cfg.model.compile or not real_rope or rope_halves:
                raise SystemExit(f"--variant {spec!r}: rope_tables=1 is for Qwen-Image's compiled real RoPE "
                                 "(compile=1, without real_rope=0 or rope_halves=1)")
            from qwen_zero_prior.training import rope

            rope.install_tables(pipe.transformer)
            stack.callback(rope.uninstall_tables, pipe.transformer)
        # bench-only: gelu_fused=0 takes the compiled fp8 MLPs off gelu_fp8's kernels (on by default since session
        # 29), for this variant's steps: inductor compiles the GELU and quantizations as it did before
        from qwen_zero_prior.training import gelu_fp8

        gelu_fused = _mlps_fused(pipe.transformer)
        if not want_gelu_fused and gelu_fused:
            gelu_fp8.uninstall(pipe.transformer)
            stack.callback(gelu_fp8.install, pipe.transformer)
            gelu_fused = 0
        # bench-only: norm_rope=0 takes the compiled attention off norm_rope's operator (on by default with compile
        # since session 30), for this variant's steps: inductor compiles the q/k norms and RoPE as it did before
        from qwen_zero_prior.training import norm_rope

        norm_rope_blocks = norm_rope.installed(pipe.transformer)
        if not want_norm_rope and norm_rope_blocks:
            norm_rope.uninstall(pipe.transformer)
            stack.callback(norm_rope.install, pipe.transformer)
            norm_rope_blocks = 0
        rope_form = _rope_form(pipe.transformer) if trainer.cfg.model.compile else None
        trainer.cache_all_latents()
        _mem_reset(device)
        t0 = time.time()
        for _ in range(args.warmup + (3 if trainer.cfg.model.compile else 0)):
            trainer.train_step()
        warm_s = time.time() - t0
        ms = time_fn(trainer.train_step, device, 0, args.iters)
        steady = time_steady(trainer.train_step, device, args.iters)
        kernels = {}
        busy = device_busy_ms(trainer.train_step, device, table=args.kernels, summary=kernels if args.kernels else None)
        phases = phase_times(trainer, device)
        med = statistics.median(ms)
        r = {"name": f"b-variant {spec or 'defaults'}", "ms_median": round(med, 2), "ms_min": round(min(ms), 2),
             "ms_max": round(max(ms), 2), "n": len(ms), "ms_steady_median": round(statistics.median(steady), 2),
             "gpu_busy_ms": round(busy, 1),
             "peak_mem_gib": round(_mem_peak(device), 1) if device.type == "cuda" else None,
             "warmup_s": round(warm_s, 1), "text_tokens": text_len_of(trainer), **phases,
             **memory_fields(pipe, trainer.cfg.model, args, device), "memory_cap_gib": args.memory_cap_gib or None,
             **({"rope": rope_form} if rope_form else {}),
             **({"fused_lora": bool(fused_lora)} if rope_form else {}),
             **({"fp8_backward_copy": _has_fp8_backward_copies(pipe.transformer),
                 "fp8_backward_copy_blocks": _fp8_backward_copy_blocks(pipe.transformer)}
                if trainer.cfg.model.fp8_matmul else {}),
             **({"lora_bf16": True} if lora_bf16 else {}),
             "lora_fp32_grad": _lora_fp32_grad(),
             "lora_addmm": _lora_addmm(),
             "attn_bshd": _attn_bshd(pipe.transformer),
             **(_fast_accum_fields(pipe.transformer) if trainer.cfg.model.fp8_matmul else {}),
             **({"fp8_text": True} if fp8_text else {}),
             **({"pdl": True} if pdl else {}),
             **({"multi_kernel": True} if multi_kernel else {}),
             **({"gelu_fused_blocks": gelu_fused} if trainer.cfg.model.fp8_matmul else {}),
             **({"norm_rope_blocks": norm_rope_blocks} if trainer.cfg.model.compile else {}),
             "kernel_pieces": _kernel_pieces(),
             **({"persistent_max": reductions.installed()} if trainer.cfg.model.compile else {}),
             **({"rope_halves": "speed only: not the model's numbers"} if rope_halves else {}),
             "text_parts_on_gpu": any(t.device.type == "cuda" for t in text_parts.unused_tensors(pipe.text_encoder)),
             **({"kernels": kernels} if kernels else {})}
        if args.trace and device.type == "cuda":
            r["idle"] = trace_steps(trainer, device, Path(args.trace) / f"variant-{i}.json.gz")
        res["rows"].append(r)
        print(json.dumps(r), flush=True)
        stack.close()
        del trainer
    return res


def baseline_variant(pipe, args, spec: str, overrides: dict) -> dict:
    """``--variant "baseline=1"`` (optionally ``gradient_checkpointing=1``): one (a) row, the plain diffusers + peft
    LoRA step (eager) on the same pipeline, timed like the other variants, on inputs of (b)'s shapes (the text
    encoder is not run: the DiT sees random text states of (b)'s caption length) and the family's LoRA targets."""
    from qwen_zero_prior.training.families import detect_pipeline

    checkpointing = bool(overrides.pop("gradient_checkpointing", False))
    if overrides:
        raise SystemExit(f"--variant {spec!r}: a baseline takes only gradient_checkpointing, not {sorted(overrides)}")
    device, dtype = args.device_obj, pipe.transformer.dtype
    family = detect_pipeline(pipe)
    trainer = project_trainer(pipe, args, Path(tempfile.mkdtemp(prefix="qzp-bench-")), compile=False)
    text_len = text_len_of(trainer)
    del trainer
    tr = pipe.transformer
    for name in list(getattr(tr, "peft_config", None) or {}):
        tr.delete_adapters(name)
    _undo_compile_rewrites(tr)  # what building that trainer installed (e.g. 2.1's processor with --attention-backend)
    _fresh_tokenizer(pipe)
    if args.attention_backend:  # as in --mode main, where (b) set it on the transformer (a) then runs
        tr.set_attention_backend(args.attention_backend)
    make_inputs = dit_inputs_21 if family.name == "qwen-image-2.1" else dit_inputs
    inputs, target = make_inputs(pipe, args.res, text_len, device, dtype)
    step = baseline_step_fn(pipe, args.rank, inputs, target, checkpointing, targets=family.default_lora_targets)
    _mem_reset(device)
    ms = time_fn(step, device, args.warmup, args.iters)
    steady = time_steady(step, device, args.iters)
    peak = _mem_peak(device)
    try:  # the counter's pass holds more than a step (under a 78 GiB cap the checkpointed baseline ran out there,
        # session 31): the row keeps its times and says why it has no count
        tflop = count_tflop(step)
    except torch.OutOfMemoryError:
        tflop = None
        torch.cuda.empty_cache()
    med = statistics.median(ms)
    return {"name": f"a-variant diffusers+peft step, eager, checkpointing={checkpointing}, "
                    f"attn={args.attention_backend or 'default'} ({spec})",
            "ms_median": round(med, 2), "ms_min": round(min(ms), 2), "ms_max": round(max(ms), 2), "n": len(ms),
            "ms_steady_median": round(statistics.median(steady), 2),
            **({"tflop": round(tflop, 2)} if tflop is not None else {"tflop": None,
                                                                      "tflop_note": "the FLOP counter ran out of memory"}),
            "gpu_busy_ms": round(device_busy_ms(step, device), 1),
            "peak_mem_gib": round(peak, 1) if device.type == "cuda" else None, "text_tokens": text_len,
            "lora_targets": list(family.default_lora_targets), **memory_fields(pipe, None, args, device)}


def run_profile(args, device, dtype, res) -> dict:
    """torch.profiler tables (top kernels by device time, top ops by host time) for (b)'s two parts."""
    from torch.profiler import ProfilerActivity, profile

    pipe, _ = build_pipeline(args.size, device, dtype)
    trainer = project_trainer(pipe, args, Path(tempfile.mkdtemp(prefix="qzp-bench-")))
    trainer.cache_all_latents()
    te_fn = text_encoder_fn(trainer)
    for name, fn in (("text-encoder fwd+bwd", te_fn), ("project step", trainer.train_step)):
        for _ in range(args.warmup + 2):
            fn()
        _sync(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(2):
                fn()
            _sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n==== {name}: by device time ====")
        print(prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=70))
        print(f"\n==== {name}: by host time ====")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=70))
    return res


def run_capped(args, device, dtype, res) -> dict:
    """24 GiB-card mode (``model.offload``), under ``torch.cuda.set_per_process_memory_fraction`` =
    ``--capped-gib``. Qwen-Image: fp8 transformer weights, the blocks beyond the budget streamed from pinned CPU
    memory, the text encoder's layers where ``--offload-te`` says (default: ``auto``, on the GPU as loaded where they
    fit beside the ring, else streamed), gradient checkpointing. Qwen-Image 2.1: the plan ``model.memory: auto``
    makes for that capacity (``memory.choose_21``, in the JSON): every weight on the GPU, the transformer blocks'
    Linears in fp8 and the text decoder's in bf16 or fp8 (whichever fits), gradient checkpointing.

    The random models are built on the GPU first (initializing them on the CPU is slow); the trainer's offload
    setup then converts them (and moves what it streams, and the unused vision tower and LM head, to CPU memory),
    and the cap applies from then on: ``resident_gib_at_cap`` is what stays allocated.
    """
    t0 = time.time()
    pipe, _ = build_pipeline(args.size, device, dtype, args.family)
    res["build_s"] = round(time.time() - t0, 1)
    work = Path(tempfile.mkdtemp(prefix="qzp-bench-"))
    on_cuda = device.type == "cuda"
    settings = {"compile": bool(args.compile) and on_cuda, "offload": on_cuda,
                "offload_budget_gib": args.offload_budget_gib or args.capped_gib, "gradient_checkpointing": True}
    if args.prefetch_gib is not None:
        settings["offload_prefetch_gib"] = args.prefetch_gib
    if args.family == "qwen-image-2.1":
        from qwen_zero_prior.training import memory

        parts = memory.weight_parts(pipe)
        plan = memory.choose("auto", weights_bytes=parts.total, resolution=args.res, batch_size=1, device=device,
                             capacity_bytes=args.capped_gib * 2**30, parts=parts)
        res["plan"] = {"mode": plan.mode, "reason": plan.reason, "layout": plan.layout, "need_gib": plan.need_gib}
        print(f"memory plan: {plan.reason}", flush=True)
        settings.update(offload=on_cuda and plan.offload, gradient_checkpointing=plan.gradient_checkpointing)
    from qwen_zero_prior.training.offload import BLOCK_FETCH_ENV

    was = os.environ.get(BLOCK_FETCH_ENV)
    try:
        if args.block_fetch is not None:  # bench knob: a recomputed streamed block's weights fetched as one, or not
            os.environ[BLOCK_FETCH_ENV] = str(args.block_fetch)
        trainer = project_trainer(pipe, args, work, text_encoder_storage=args.offload_te, layout=args.offload_layout,
                                  **settings)  # (offload reads the variable while it converts the blocks)
    finally:
        if was is None:
            os.environ.pop(BLOCK_FETCH_ENV, None)
        else:
            os.environ[BLOCK_FETCH_ENV] = was
    block_fetch = any(getattr(b, "_zp_streamed_block", None) is not None
                      for b in getattr(trainer.backend.pipe.transformer, "transformer_blocks", ()))
    res["offload"] = trainer.backend.offload_summary
    if args.prefetch_share is not None and trainer.backend._prefetcher is not None:
        # bench-only: a weight's second close use served from its first's ring range (the default) or copied again
        trainer.backend._prefetcher.share = bool(args.prefetch_share)
    trainer.cache_all_latents()
    pipe.vae.to("cpu")
    if on_cuda:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        cap = args.capped_gib * 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), torch.cuda.current_device())
        res["memory_fraction"] = cap / total
        res["resident_gib_at_cap"] = round(torch.cuda.memory_allocated() / 2**30, 1)
    _mem_reset(device)
    # bench knob: what Python's collector costs the offloaded step; Trainer.fit freezes the heap after its first steps
    # (training/heap.py), these timed steps run outside fit: 1 does the same, 0 leaves the collector as it is
    heap = FrozenHeap()
    try:
        if args.gc_freeze:  # as fit: a freeze after each of the first steps
            for _ in range(FREEZE_STEPS):
                trainer.train_step()
                heap.freeze()
        with GcTimer() as gct:
            ms, host_ms = time_fn_host(trainer.train_step, device, args.warmup, args.iters)
        gc_after = collect_timed()  # one full collection by hand, the heap as the timed steps left it
    finally:
        heap.release()
    med = statistics.median(ms)
    # the timed steps' memory figures, before --kernels / --trace run profiled steps of their own
    stats = torch.cuda.memory_stats(device) if on_cuda else {}
    peak_mem = round(_mem_peak(device), 1) if on_cuda else None
    extra = {}
    if args.kernels and on_cuda:  # where the step goes: GPU vs host time per phase, then the top kernels
        extra["phases"] = phase_times(trainer, device, n=2)
        extra["gpu_busy_ms"] = round(device_busy_ms(trainer.train_step, device, steps=1, table=True), 1)
    if args.trace and on_cuda:  # one step's trace: idle gaps by label, and how much the copies overlapped kernels
        extra["idle"] = trace_steps(trainer, device, Path(args.trace) / "capped.json.gz", steps=1)
    if args.family == "qwen-image-2.1":
        summary = trainer.backend.offload_summary
        name = (f"capped {args.capped_gib:g} GiB: plan {res['plan']['mode']}, " + (
            f"fp8 DiT blocks ({summary['streamed_blocks']} streamed), text decoder {summary['text_encoder_storage']}"
            if summary else "offload not applied (no GPU)") + ", checkpointing")
    else:
        from qwen_zero_prior.training.diffusers_backend import compile_streamed_from_env

        summary = trainer.backend.offload_summary or {}
        te = {"stream": "streamed text decoder", "stream_fp8": "text decoder streamed in fp8",
              "bf16": "text decoder on the GPU (bf16)",
              "fp8": "text decoder on the GPU (fp8)"}.get(summary.get("text_encoder_storage"), "text decoder as planned")
        name = (f"capped {args.capped_gib:g} GiB: fp8 DiT ({summary.get('streamed_blocks', '?')} blocks streamed), "
                f"{te}, prefetch {summary.get('prefetch_gib', 0):g} GiB, checkpointing"
                + ((", blocks compiled (streamed ones eager)" if compile_streamed_from_env() is False
                    else ", blocks compiled, streamed ones too") if settings["compile"] else "")
                + (f", attention {args.attention_backend}" if args.attention_backend else ""))
    pf = trainer.backend._prefetcher
    r = {"name": name, "prefetch": pf.stats() if pf is not None else None,
         # allocations that failed at the cap and were retried after freeing the allocator's cache (each a sync)
         "alloc_retries": stats.get("num_alloc_retries"),
         "peak_reserved_gib": round(stats.get("reserved_bytes.all.peak", 0) / 2**30, 1) if on_cuda else None,
         "ms_median": round(med, 2), "ms_min": round(min(ms), 2), "ms_max": round(max(ms), 2),
         "ms": [round(m, 1) for m in ms], "host_ms": [round(m, 1) for m in host_ms],
         "gc": {**gct.report(), "by_hand": gc_after},
         "gc_freeze": bool(args.gc_freeze), "block_fetch": block_fetch,
         "n": len(ms), "peak_mem_gib": peak_mem,
         "offload": trainer.backend.offload_summary, "last_loss": trainer.losses[-1] if trainer.losses else None,
         **extra}
    res["rows"].append(r)
    print(json.dumps(r), flush=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--family", choices=["qwen-image", "qwen-image-2.1"], default="qwen-image",
                   help="model family: Qwen-Image (20B) or Qwen-Image 2.1 (7B DiT + Qwen3-VL-8B; variants/capped modes)")
    p.add_argument("--mode", choices=["main", "capped", "profile", "variants"], default="main")
    p.add_argument("--variant", action="append", default=[],
                   help='--mode variants: model settings of one (b) run, e.g. '
                   '"fp8_matmul=1 compile_mode=reduce-overhead"; "baseline=1" (+ "gradient_checkpointing=1"): '
                   'the diffusers + peft step (a) instead; "memory_cap_gib=78" (with --isolate): that variant\'s '
                   'process capped; "real_rope=0": diffusers\' complex RoPE under compile (rewritten in real '
                   'arithmetic by default); "layout_cache=0": Qwen-Image 2.1 through diffusers\' forward each step '
                   '(flow21.forward_t2i by default); "fp8_backward_copy=0": no fp8 backward copies (by default the '
                   'first blocks keep them as far as the memory plan has room; "force": every block, "N": the first '
                   'N blocks, whatever the plan says); "fused_lora=0": each '
                   'LoRA\'s A product on its own, as peft (under compile the layers sharing an input fuse theirs: '
                   'q/k/v of each stream, and 2.1\'s gate/proj); "park_text=0": the text encoder\'s vision tower '
                   'and LM head kept on the GPU (left in CPU memory by default); "combo_kernels=1": inductor\'s '
                   'horizontal fusion of independent kernels; "fp8_text=1" (with fp8_matmul=1): Qwen-Image\'s '
                   'text-stream projections in fp8 too; "rope_tables=1": the compiled blocks get real RoPE tables '
                   'built once a forward instead of complex frequencies (the same numbers); "pdl=1": Programmatic '
                   'Dependent Launch in inductor\'s Triton kernels (Hopper+); "rope_halves=1": RoPE over each '
                   'head\'s halves instead of '
                   'its interleaved pairs (speed only: not the model\'s numbers); "lora_fp32_grad=1": the LoRA '
                   'products through lora_shared.lora_product (float32 weight gradients from the product); '
                   '"lora_addmm=0": each LoRA B product added to its base output after the product, the fp8 '
                   'bias after its product (session 32\'s step; on by default); "attn_bshd=0": cuDNN attention on '
                   'contiguous [B, H, S, D] copies, as diffusers (on by default); '
                   '"cublas_ws=1" / "cublas_ws=0" (with --isolate): PyTorch\'s default cuBLAS workspace / none in that '
                   'variant\'s process (by default as training chooses: none for compile with CUDA graphs and fp8); '
                   '"kernel_pieces=0": the GELU and norm/RoPE kernels launched as in session 35 (padded rows); '
                   '"lora_bf16=1": LoRA weights '
                   'stored in bf16 (an upper '
                   'bound of the casts\' cost, not a training setting)')
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--attention-backend", default="")
    p.add_argument("--compile-mode", default="")
    p.add_argument("--only-b", action="store_true", help="time only the project's step (tuning runs)")
    p.add_argument("--kernels", action="store_true", help="--mode variants: print each variant's top kernels; "
                   "--mode capped: also its phase times and GPU-busy time per step")
    p.add_argument("--fp8", action="store_true", help="also time (b) with model.fp8_matmul (run last, in place)")
    p.add_argument("--capped-gib", type=float, default=24.0)
    p.add_argument("--offload-te", choices=["stream", "stream_fp8", "bf16", "fp8", "auto"], default=None,
                   help="--mode capped: where offload keeps the text decoder's layers (default: the backend's choice)")
    p.add_argument("--offload-layout", choices=["spread", "tail"], default=None,
                   help="--mode capped: which blocks stream (offload.streamed_block_ids; default: the backend's, spread)")
    p.add_argument("--offload-budget-gib", type=float, default=0.0,
                   help="--mode capped: model.offload_budget_gib (default: --capped-gib); less leaves more headroom")
    p.add_argument("--prefetch-share", type=int, choices=[0, 1], default=None,
                   help="--mode capped: 0 copies every use of a streamed weight again, 1 (the default) serves a use "
                        "from the previous one's range while it is still in the ring (a recomputed block's backward)")
    p.add_argument("--block-fetch", type=int, choices=[0, 1], default=None,
                   help="--mode capped: 1 fetches a recomputed streamed block's weights as one before each run, 0 one "
                        "layer at a time (sets QWEN_ZERO_PRIOR_BLOCK_FETCH; default: as set, else 1)")
    p.add_argument("--gc-freeze", type=int, choices=[0, 1], default=0,
                   help="--mode capped: 1 freezes Python's heap after each of the first steps, as training does "
                        "(training/heap.py), before the warm-up and timed steps; 0 leaves the collector as it is")
    p.add_argument("--prefetch-gib", type=float, default=None,
                   help="--mode capped: model.offload_prefetch_gib (default: the config's; 0: copy at use)")
    p.add_argument("--memory-cap-gib", type=float, default=0.0,
                   help="hard per-process GPU memory cap set before anything is built (80 GB card: 78); 0: none")
    p.add_argument("--cublas-workspace", choices=["auto", "none", "default"], default="auto",
                   help="auto (as training, training/cublas.py): cuBLAS without a workspace where the variants of the "
                        "process compile with CUDA graphs and fp8, else PyTorch's; none / default: for every row "
                        "(a variant's cublas_ws=0/1 with --isolate wins); a setting in the environment is kept")
    p.add_argument("--isolate", action="store_true",
                   help="--mode variants: each variant in its own process; an OOM or crash becomes a row")
    p.add_argument("--trace", help="folder: Chrome traces of two (b) steps (fp8 row, variants) and a GPU-idle report")
    p.add_argument("--out")
    args = p.parse_args(argv)
    res = run_isolated(args, list(sys.argv[1:] if argv is None else argv)) if args.isolate else run(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"\n{'variant':78s} {'ms':>9s} {'steady':>7s} {'TFLOP':>7s} {'MFU':>6s} {'GiB':>6s} {'busy':>6s} "
          f"{'W GiB':>6s} {'plan':>10s}")
    for r in res["rows"]:
        if r.get("error"):
            print(f"{r['name'][:78]:78s} {r['error']}")
            continue
        plan = f"{r['plan_auto']} {r['plan_resident_need_gib']}" if r.get("plan_auto") else ""
        print(f"{r['name'][:78]:78s} {r['ms_median']:9.1f} {str(r.get('ms_steady_median', '')):>7s} "
              f"{str(r.get('tflop')):>7s} {str(r.get('mfu')):>6s} "
              f"{str(r.get('peak_mem_gib')):>6s} {str(r.get('gpu_busy_ms', '')):>6s} "
              f"{str(r.get('weights_gib', '')):>6s} {plan:>10s}")
    print(f"matmul peak {res.get('matmul_peak_tflops')} TFLOP/s (bf16), {res.get('fp8_matmul_peak_tflops')} (fp8 "
          f"row-scaled) on {res.get('device')}; memory cap {res.get('memory_cap_gib')} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
