"""ComfyUI-free core: config, zero-prior token, LoRA, training loop, archive, inference.

Nothing in this package imports ComfyUI or Cog; the node pack, the Cog files and the CLI are thin adapters.
"""

from .config import Config, ConfigError, DebugConfig, ModelConfig, SampleConfig, TrainConfig

__all__ = ["Config", "ConfigError", "DebugConfig", "ModelConfig", "SampleConfig", "TrainConfig"]
