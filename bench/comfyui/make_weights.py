"""Full-size Qwen-Image files in ComfyUI's own single-file layouts, random weights (shapes are what matter for
speed and memory). Nothing is downloaded: the shapes come from diffusers' and transformers' model classes.

    python bench/comfyui/make_weights.py dit --dtype fp8_e4m3fn OUT.safetensors     # or --dtype bf16
    python bench/comfyui/make_weights.py te --dtype fp8_scaled OUT.safetensors      # or --dtype bf16
    cd COMFYUI && python /path/to/bench/comfyui/make_weights.py vae OUT.safetensors  # ComfyUI's Wan 2.1 VAE class

DiT keys are diffusers' (ComfyUI loads them as they are); the text encoder is Qwen2.5-VL-7B's language model in
ComfyUI's ``qwen25_7b`` layout (``model.layers.N…``), fp8-scaled like ``qwen_2.5_vl_7b_fp8_scaled.safetensors``
(float8_e4m3fn Linear weights with per-tensor ``scale_weight``, the rest bf16, the ``scaled_fp8`` marker).
Weights follow ``nn.Linear``'s default init scale (uniform ±1/sqrt(fan_in)); norms are ones, biases zeros.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

FP8 = torch.float8_e4m3fn


def _fill(shape: torch.Size, key: str, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    if len(shape) <= 1 or key.endswith(".gamma"):  # norms' scales ones; biases zeros
        ones = ("norm" in key and key.endswith("weight")) or key.endswith("gamma")
        return (torch.ones if ones else torch.zeros)(shape, device=device)
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))  # nn.Linear / nn.ConvNd default scale: fan_in
    return torch.empty(shape, device=device).uniform_(-bound, bound, generator=gen)


def _meta_state(module_factory) -> dict[str, torch.Size]:
    with torch.device("meta"):
        m = module_factory()
    return {k: v.shape for k, v in m.state_dict().items()}


def dit_shapes() -> dict[str, torch.Size]:
    from diffusers import QwenImageTransformer2DModel

    return _meta_state(QwenImageTransformer2DModel)  # the 20.4B defaults


def te_shapes() -> dict[str, torch.Size]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config={"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                     "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
                     "rope_theta": 1000000.0, "vocab_size": 152064, "max_position_embeddings": 128000,
                     "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 3584},
        vocab_size=152064, hidden_size=3584)
    shapes = _meta_state(lambda: Qwen2_5_VLForConditionalGeneration(cfg))
    prefix = "model.language_model."
    return {"model." + k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def write(shapes: dict[str, torch.Size], out: Path, dtype: str, *, seed: int = 0) -> int:
    from safetensors.torch import save_file

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=dev).manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        w = _fill(shape, key, dev, gen)
        linear = len(shape) == 2 and key.endswith(".weight") and ("transformer_blocks." in key or ".layers." in key)
        if dtype == "bf16" or not linear:
            tensors[key] = w.to(torch.bfloat16).cpu()
        elif dtype == "fp8_e4m3fn":  # ComfyUI's qwen_image_fp8_e4m3fn: a plain cast of the blocks' weights
            tensors[key] = w.to(FP8).cpu()
        elif dtype == "fp8_scaled":
            scale = w.abs().max().float() / 448.0
            tensors[key] = (w / scale).to(FP8).cpu()
            tensors[key[: -len("weight")] + "scale_weight"] = scale.reshape(()).cpu()
        else:
            raise SystemExit(f"unknown --dtype {dtype!r}")
    if dtype == "fp8_scaled":
        tensors["scaled_fp8"] = torch.empty(0, dtype=FP8)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    save_file(tensors, str(tmp))
    tmp.replace(out)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_vae(out: Path) -> int:
    """ComfyUI's Wan 2.1 VAE (Qwen-Image's) at full size; run from the ComfyUI folder."""
    import os

    sys.path.insert(0, os.getcwd())
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    from safetensors.torch import save_file

    import comfy.ldm.wan.vae as wan

    vae = wan.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                     temperal_downsample=[False, True, True], dropout=0.0)
    # ComfyUI's layers skip weight init (they expect a checkpoint): fill every tensor, as for the DiT
    gen = torch.Generator().manual_seed(0)
    sd = {k: _fill(v.shape, k, torch.device("cpu"), gen).to(torch.bfloat16).contiguous()
          for k, v in vae.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out))
    return sum(t.numel() * t.element_size() for t in sd.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["dit", "te", "vae"])
    p.add_argument("out", type=Path)
    p.add_argument("--dtype", default="bf16", help="dit: bf16 | fp8_e4m3fn; te: bf16 | fp8_scaled")
    a = p.parse_args(argv)
    if a.out.is_file():
        print(f"{a.out} exists")
        return 0
    t0 = time.time()
    if a.what == "vae":
        n = write_vae(a.out)
    else:
        n = write(dit_shapes() if a.what == "dit" else te_shapes(), a.out, a.dtype)
    print(f"wrote {a.out} ({n / 2**30:.1f} GiB) in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
