"""Run by ComfyUI at start-up, before it imports torch (ComfyUI runs every custom node's ``prestartup_script.py``).

One opt-in, off by default: the setting *Qwen Zero-Prior › Training › Native CUDA allocator* (id
``QwenZeroPrior.NativeAllocator``, in the default user's ``comfy.settings.json``: with ``--multi-user`` only that
user's choice counts, as the allocator is the one process's) starts this ComfyUI with PyTorch's
native CUDA allocator, as ``--disable-cuda-malloc`` does. Under ComfyUI's default, ``cudaMallocAsync``, torch.compile's
CUDA graphs cannot run; the training node captures its own there (0.35 s/step on an H200 at 1024², rank 32, against
0.351 with the native allocator and torch's graphs: ``docs/benchmarks.md``, sessions 9 and 17), so this is a way back
to torch's graphs, e.g. where the pack's capture fails. The allocator is the whole process's, every workflow's, which
is why this is a setting the user turns on and never a default. It takes effect at the next start.

ComfyUI versions differ in when they choose: up to 0.3.x after the prestartup scripts (from ``args``), from 0.33 before
them (into ``PYTORCH_CUDA_ALLOC_CONF``). torch reads that variable when it is imported, which is later in both, so
both are set here. The script imports nothing of the pack (whose modules import torch) and never stops ComfyUI from
starting: a settings file it cannot read is logged and left alone.
"""

import json
import logging
import os
import sys

SETTING = "QwenZeroPrior.NativeAllocator"
ASYNC_BACKEND = "backend:cudaMallocAsync"

logger = logging.getLogger("qwen_zero_prior.prestartup")


def settings_path() -> str:
    import folder_paths  # ComfyUI's; its user directory honours --user-directory and --base-directory

    return os.path.join(folder_paths.get_user_directory(), "default", "comfy.settings.json")


def wanted(path: str) -> bool:
    """Whether the setting is on in the settings file at ``path`` (a missing file: off)."""
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as e:
        logger.warning("Qwen Zero-Prior: could not read %s (%s); ComfyUI's CUDA allocator is left as it is (fix or "
                       "delete the file: ComfyUI writes it again when a setting changes)", path, e)
        return False
    return isinstance(settings, dict) and settings.get(SETTING) is True


def without_async_backend(conf: str) -> str:
    """``PYTORCH_CUDA_ALLOC_CONF`` without its cudaMallocAsync backend entry, the other options kept."""
    return ",".join(p for p in conf.split(",") if p.strip() and p.replace(" ", "") != ASYNC_BACKEND)


def use_native_allocator() -> bool:
    """Switch this ComfyUI to PyTorch's native allocator; False (logged) where torch is already imported."""
    if "torch" in sys.modules:
        logger.warning("Qwen Zero-Prior: %s is on, but torch was imported before the prestartup scripts ran; start "
                       "ComfyUI with --disable-cuda-malloc instead", SETTING)
        return False
    from comfy.cli_args import args

    args.cuda_malloc = False  # ComfyUI versions that choose the allocator after the prestartup scripts
    args.disable_cuda_malloc = True
    conf = without_async_backend(os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))  # those that chose before them
    if conf:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = conf
    else:
        os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    logger.info("Qwen Zero-Prior: PyTorch's native CUDA allocator for this ComfyUI (setting %s), as with "
                "--disable-cuda-malloc: the training node can replay CUDA graphs", SETTING)
    return True


# ComfyUI loads this file under its path as the module name; imported as part of the package it does nothing
if os.sep in __name__ or (os.altsep or os.sep) in __name__:
    if wanted(settings_path()):
        use_native_allocator()
