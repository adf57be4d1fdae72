"""Custom ComfyUI socket types of this pack."""

from comfy_api.latest import io

# Carries a qwen_zero_prior.training.archive.PlaceholderArchive (token string, vector, LoRA state dict, meta).
ZeroPriorArchive = io.Custom("ZERO_PRIOR_ARCHIVE")

CATEGORY = "Qwen-Image/zero-prior"
