"""Qwen-Image zero-prior placeholder token: ComfyUI node pack (and, pip-installed, the CLI and Cog core).

ComfyUI imports this folder from custom_nodes/<any name> and calls ``comfy_entrypoint``. The nodes are
imported only when ComfyUI is importable, so ``import qwen_zero_prior.training`` works without it.
"""

import importlib.util

WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy_api") is not None and importlib.util.find_spec("folder_paths") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
else:
    __all__ = ["WEB_DIRECTORY"]
