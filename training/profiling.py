"""Kernel profile of a few training steps, asked for through the environment (a benchmark's knob, as ``TORCH_LOGS``
is torch's): ``QWEN_ZERO_PRIOR_PROFILE_STEPS=N`` runs N steps after the third under ``torch.profiler`` and gives
two tables: the top kernels by GPU time, and the top host-side operators by their own CPU time (where a step whose
GPU waits on the host spends it; the profiled steps run slower for being recorded). The ComfyUI training node
logs it with its phase times (``bench/comfyui/run_node.py --profile-steps``); ``bench/bench_step.py --kernels`` is
the core's own. ``QWEN_ZERO_PRIOR_PROFILE_TRACE=PATH`` also writes those steps' Chrome trace there (``.json.gz``:
compressed), which ``python -m bench.trace_gaps PATH`` reads: where the GPU waited, and how far copies ran beside
kernels."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

ENV = "QWEN_ZERO_PRIOR_PROFILE_STEPS"
TRACE_ENV = "QWEN_ZERO_PRIOR_PROFILE_TRACE"
FIRST_STEP = 3  # the first steps compile and fill caches


def steps_from_env() -> int:
    """N from ``QWEN_ZERO_PRIOR_PROFILE_STEPS`` (unset or empty: 0)."""
    raw = os.environ.get(ENV, "").strip()
    if raw and not raw.isdigit():
        raise ValueError(f"{ENV}={raw!r}: expected a number of steps to profile (e.g. 2), or leave it unset")
    return int(raw or 0)


class StepProfiler:
    """Call :meth:`step` with each step's number (1, 2, ...) as it begins and :meth:`finish` when training ends;
    ``table`` is then the kernel table ("" when nothing was profiled). Only on a CUDA device."""

    def __init__(self, device: torch.device):
        self.steps = steps_from_env() if device.type == "cuda" else 0
        self._prof = None
        self.table = ""
        self.trace_path = os.environ.get(TRACE_ENV, "").strip() or None

    def step(self, n: int) -> None:
        if not self.steps:
            return
        if n == FIRST_STEP:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self._prof.start()
        elif n == FIRST_STEP + self.steps:
            self.finish()

    def finish(self) -> str:
        prof, self._prof = self._prof, None
        if prof is not None:
            prof.stop()
            if self.trace_path:  # torch writes gzip when the name ends in .gz
                try:
                    os.makedirs(os.path.dirname(os.path.abspath(self.trace_path)), exist_ok=True)
                    prof.export_chrome_trace(self.trace_path)
                except OSError as e:  # a benchmark's extra: never the end of a training run
                    logger.warning("%s=%s: the trace could not be written (%s); training goes on",
                                   TRACE_ENV, self.trace_path, e)
            averages = prof.key_averages()
            self.table = (averages.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90)
                          + "\nhost side, by own CPU time:\n"
                          + averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90))
        return self.table


__all__ = ["ENV", "TRACE_ENV", "StepProfiler", "steps_from_env"]
