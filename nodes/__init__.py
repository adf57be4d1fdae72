"""ComfyUI nodes (thin adapters over qwen_zero_prior.training)."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
