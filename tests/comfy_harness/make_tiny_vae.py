"""TEST-ONLY: writes a tiny random Wan-2.1-layout VAE (ComfyUI's own class) for the Qwen-Image test graphs.

Run with ComfyUI's Python from the ComfyUI folder: python make_tiny_vae.py OUT.safetensors
"""

import os
import sys

out = sys.argv[1]
sys.path.insert(0, os.getcwd())  # run from the ComfyUI folder
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import comfy.ldm.wan.vae as wan  # noqa: E402

torch.manual_seed(0)
vae = wan.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0)
with torch.no_grad():
    for name, p in vae.named_parameters():
        if name.endswith("gamma"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.05)
save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, out)
