"""ComfyUI nodes: thin adapters over ``qwen_zero_prior.training`` (imported only inside ComfyUI)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .archive_node import LoadPlaceholderArchive
from .lora_node import ApplyQwenLoRA, ApplyQwenLoRAFile
from .paths import register_folder
from .token_node import RegisterZeroPriorToken
from .train_node import TrainZeroPriorToken

NODES: list[type[io.ComfyNode]] = [
    LoadPlaceholderArchive, RegisterZeroPriorToken, ApplyQwenLoRA, ApplyQwenLoRAFile, TrainZeroPriorToken,
]


class ZeroPriorExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> ZeroPriorExtension:
    register_folder()
    return ZeroPriorExtension()
