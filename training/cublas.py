"""A training process whose step is compiled with CUDA graphs and fp8 runs cuBLAS without a workspace (issue #15).

With a workspace, cuBLAS and cuBLASLt on Hopper choose GEMM kernels with a dynamic tile scheduler, each launched
after a memset of its counters, and split-K kernels followed by a reduce kernel for the thin products (the LoRA
weight gradients, the text encoder's). In Qwen-Image's compiled step at 1024² that is ~1,240 memsets and ~1,220
reduce kernels a step, and on an H200 each memset costs ~4 µs of idle GPU besides its own time. Without a
workspace cuBLAS takes its static-scheduler kernels and no split-K: 2,300 fewer kernels a step and the same
products. Measured on an H200 (``docs/benchmarks.md``, session 34), each comparison in one call: 253.0 and 252.7
against 256.8 ms a step uncapped (A/B/A), 253.8 against 258.7 under the 78 GiB cap, and Qwen-Image 2.1 255.3 against
255.6 (neutral).

Only there: eager steps run ~1.8-1.9x slower without a workspace. Session 35 measured, each pair in one call on an
H200, the eager diffusers + peft step at 1239 against 643 ms with PyTorch's (its kernels took 648 against 523 ms)
and the project's eager step at 1149 against 633 ms (the same kernel time: the GPU idled between kernels). So a
training process goes without one only when its final settings (after the memory plan) compile the step with CUDA
graphs and run the image stream's products in fp8 (:func:`faster_without_workspace`); an eager, offloaded or bf16
step keeps PyTorch's workspace.

PyTorch reads ``CUBLAS_WORKSPACE_CONFIG`` (and, capped by it, ``CUBLASLT_WORKSPACE_SIZE``) when a cuBLAS handle
first gets its workspace, at the first product on a stream, not when CUDA starts. So the choice is made where the
final settings are known and before the first product: ``run.train`` chooses after the memory plan and before the
model is placed, when its caller owns the process (``tune_process=True``: the CLI's ``train`` and Cog's, in each
data-parallel worker too). Had a product run before, the change would apply in part or not at all (workspaces
already made stay), never unsafely: a size of zero asks cuBLAS to use less of a buffer, never more. A ComfyUI
process has run products long before a training node, and its inference is eager, so nothing there changes. A value
the user set is kept, and so is the workspace when ``torch.use_deterministic_algorithms`` is on (it asks for
``:4096:8`` or ``:16:8``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

import torch

logger = logging.getLogger(__name__)

CONFIG_ENV = "CUBLAS_WORKSPACE_CONFIG"  # ":SIZE_KiB:COUNT" pairs: cuBLAS's workspace (PyTorch's parser)
LT_ENV = "CUBLASLT_WORKSPACE_SIZE"  # KiB: cuBLASLt's, at most cuBLAS's (else PyTorch warns and caps it)
NO_WORKSPACE = {CONFIG_ENV: ":0:0", LT_ENV: "0"}


def faster_without_workspace(model) -> bool:
    """Whether the step ``model`` (a ``ModelConfig``, its final settings) was measured faster without a workspace:
    compiled with CUDA graphs (``compile_mode`` reduce-overhead or max-autotune) and with ``fp8_matmul``."""
    return bool(model.compile_graphs and model.fp8_matmul)


def no_workspace_for_training(model, device: torch.device,
                              environ: MutableMapping[str, str] | None = None) -> str:
    """Set :data:`NO_WORKSPACE` in ``environ`` (default: this process's) for a training process about to run its
    first product on ``device`` with the final settings ``model``, where that is faster and nobody chose otherwise.
    Returns what happened, for the caller's log: ``"none"`` when set, else why not."""
    env = os.environ if environ is None else environ
    chosen = {k: env[k] for k in NO_WORKSPACE if k in env}
    if chosen == NO_WORKSPACE:  # this choice, made earlier (an earlier training in this process) or by the user
        return "none"
    if chosen:
        return "kept as set in the environment (" + ", ".join(f"{k}={v}" for k, v in chosen.items()) + ")"
    if torch.device(device).type != "cuda":
        return f"unchanged: training on {torch.device(device).type}, not CUDA"
    if torch.are_deterministic_algorithms_enabled():
        return "unchanged: torch.use_deterministic_algorithms is on (it needs CUBLAS_WORKSPACE_CONFIG=:4096:8)"
    if not faster_without_workspace(model):
        return ("PyTorch's default: no workspace is faster only for a step compiled with CUDA graphs and fp8_matmul "
                "(eager steps ran ~1.8x slower without one)")
    set_no_workspace(env)
    return "none"


def set_no_workspace(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set :data:`NO_WORKSPACE` in ``environ`` (default: this process's) unless either variable is set there already
    (a user's value is kept). For :func:`no_workspace_for_training` and for benchmarks that choose themselves. Returns
    whether it set them."""
    env = os.environ if environ is None else environ
    if any(k in env for k in NO_WORKSPACE):
        return False
    env.update(NO_WORKSPACE)
    return True


def log_choice(model, device: torch.device, environ: MutableMapping[str, str] | None = None) -> str:
    """:func:`no_workspace_for_training`, logged (info when set, debug otherwise). Returns its answer."""
    answer = no_workspace_for_training(model, device, environ)
    if answer == "none":
        logger.info("cuBLAS without a workspace for this compiled fp8 step (%s): static-scheduler GEMMs, no split-K, "
                    "~2,300 fewer kernels a step on Hopper; set %s yourself to keep one", workspace_setting(environ),
                    CONFIG_ENV)
    else:
        logger.debug("cuBLAS workspace: %s", answer)
    return answer


def workspace_setting(environ: MutableMapping[str, str] | None = None) -> str:
    """The cuBLAS workspace this process's environment asks for, for a benchmark's rows."""
    env = os.environ if environ is None else environ
    got = [f"{k}={env[k]}" for k in NO_WORKSPACE if k in env]
    return " ".join(got) if got else "PyTorch's default"


__all__ = ["CONFIG_ENV", "LT_ENV", "NO_WORKSPACE", "faster_without_workspace", "log_choice",
           "no_workspace_for_training", "set_no_workspace", "workspace_setting"]
