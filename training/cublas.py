"""Training processes run cuBLAS without a workspace (issue #15, session 34).

With a workspace, cuBLAS and cuBLASLt on Hopper choose GEMM kernels with a dynamic tile scheduler, each launched
after a memset of its counters, and split-K kernels followed by a reduce kernel for the thin products (the LoRA
weight gradients, the text encoder's). In Qwen-Image's compiled step at 1024² that is ~1,240 memsets and ~1,220
reduce kernels a step, and on an H200 each memset costs ~4 µs of idle GPU besides its own time. Without a
workspace cuBLAS takes its static-scheduler kernels and no split-K: 2,300 fewer kernels a step and the same
products. Measured on an H200 (``docs/benchmarks.md``, session 34), each comparison in one call: 253.0 and 252.7
against 256.8 ms a step uncapped (A/B/A), 253.8 against 258.7 under the 78 GiB cap, and Qwen-Image 2.1 255.3 against
255.6 (neutral).

PyTorch reads ``CUBLAS_WORKSPACE_CONFIG`` (and, capped by it, ``CUBLASLT_WORKSPACE_SIZE``) once, at the process's
first cuBLAS call, so this can only be chosen before CUDA is initialized: the CLI's and Cog's ``train`` call
:func:`no_workspace_for_training` first thing (their torchrun workers inherit the environment). A ComfyUI process has
run matmuls long before a training node, so there it changes nothing; ComfyUI started with
``CUBLAS_WORKSPACE_CONFIG=:0:0 CUBLASLT_WORKSPACE_SIZE=0`` gets the same. A value the user set is kept, and so is the
workspace when ``torch.use_deterministic_algorithms`` is on (it asks for ``:4096:8`` or ``:16:8``).
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


def no_workspace_for_training(environ: MutableMapping[str, str] | None = None) -> str:
    """Set :data:`NO_WORKSPACE` in ``environ`` (default: this process's) where that still takes effect and nobody
    chose otherwise. Returns what happened, for the caller's log: ``"none"`` when set, else why not."""
    env = os.environ if environ is None else environ
    chosen = {k: env[k] for k in NO_WORKSPACE if k in env}
    if chosen:
        return "kept as set in the environment (" + ", ".join(f"{k}={v}" for k, v in chosen.items()) + ")"
    if not torch.cuda.is_available():
        return "unchanged: no CUDA"
    if torch.cuda.is_initialized():  # cuBLAS may have read its size already: a later change would be half-applied
        return "unchanged: CUDA was initialized before training started (a workspace size is read once)"
    if torch.are_deterministic_algorithms_enabled():
        return "unchanged: torch.use_deterministic_algorithms is on (it needs CUBLAS_WORKSPACE_CONFIG=:4096:8)"
    env.update(NO_WORKSPACE)
    return "none"


def log_choice(environ: MutableMapping[str, str] | None = None) -> str:
    """:func:`no_workspace_for_training`, logged (info when set, debug otherwise). Returns its answer."""
    answer = no_workspace_for_training(environ)
    if answer == "none":
        logger.info("cuBLAS without a workspace for training (%s): static-scheduler GEMMs, no split-K, ~2,300 "
                    "fewer kernels a step on Hopper; set %s yourself to keep one", workspace_setting(environ),
                    CONFIG_ENV)
    else:
        logger.debug("cuBLAS workspace %s", answer)
    return answer


def workspace_setting(environ: MutableMapping[str, str] | None = None) -> str:
    """The cuBLAS workspace this process's environment asks for, for a benchmark's rows."""
    env = os.environ if environ is None else environ
    got = [f"{k}={env[k]}" for k in NO_WORKSPACE if k in env]
    return " ".join(got) if got else "PyTorch's default"


__all__ = ["CONFIG_ENV", "LT_ENV", "NO_WORKSPACE", "log_choice", "no_workspace_for_training", "workspace_setting"]
