"""Qwen-Image zero-prior placeholder token: ComfyUI node pack (and, pip-installed, the CLI and Cog core).

ComfyUI imports this folder from custom_nodes/<any name>. The nodes are imported only when ComfyUI is
importable, so ``import qwen_zero_prior.training`` works without it (CLI, Cog, tests).
"""

import importlib.util

WEB_DIRECTORY = "./web"
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

if importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("folder_paths") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
