"""Micro-benchmark: the q/k RMSNorm + RoPE kernels (training/norm_rope.py) by heads a program and warps.

Each Qwen-Image block normalizes and rotates its joint queries and keys with one custom operator each way
(``norm_rope.norm_rope_joint`` and its backward): on CUDA one Triton program per token and group of
``norm_rope.HEADS_PER_PROGRAM`` heads (8 by default since session 36; ``None``: all of a token's heads, padded to a
power of two, 24 -> 32, as before). This times both directions at the step's shapes (1024²: 4096 image and 128 text
tokens, 24 heads of 128) for each setting, and compares each setting's outputs and gradients with the default
launch's: ``exact`` (bit for bit) is reported, not required (a head's sum of squares may be taken in another order),
and a setting beyond one bf16 rounding of it fails the run.

    python -m bench.norm_rope_kernels --out norm_rope.json

Without CUDA the operators run their reference PyTorch code: the checks run, nothing is timed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from qwen_zero_prior.training import norm_rope

from bench.bench_step import device_busy_ms


def _inputs(s_img: int, s_txt: int, heads: int, dim: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, s_img, heads, dim, generator=g).to(device, torch.bfloat16)
    txt = torch.randn(1, s_txt, heads, dim, generator=g).to(device, torch.bfloat16)
    w_img = (1 + 0.1 * torch.randn(dim, generator=g)).to(device, torch.bfloat16)
    w_txt = (1 + 0.1 * torch.randn(dim, generator=g)).to(device, torch.bfloat16)
    angles = torch.rand(s_img + s_txt, dim // 2, generator=g) * 6
    freqs = torch.polar(torch.ones_like(angles), angles)
    f_img, f_txt = norm_rope.freq_pairs(freqs[:s_img]).to(device), norm_rope.freq_pairs(freqs[s_img:]).to(device)
    grad = torch.randn(1, s_img + s_txt, heads, dim, generator=g).to(device, torch.bfloat16)
    return img, txt, w_img, w_txt, f_img, f_txt, grad


def _within_one_rounding(got: torch.Tensor, want: torch.Tensor) -> bool:
    diff = (got.float() - want.float()).abs()
    return bool(diff.max() <= 2 ** -7 * want.float().abs().max())


def run(s_img: int, s_txt: int, heads: int, dim: int, device: torch.device, out: Path | None,
        settings=((None, 4), (8, 1), (8, 2), (8, 4), (8, 8), (16, 2), (16, 4))) -> int:
    img, txt, w_img, w_txt, f_img, f_txt, grad = _inputs(s_img, s_txt, heads, dim, device)
    fwd_op, bwd_op = norm_rope._ops()

    def forward():
        return fwd_op(img, txt, w_img, w_txt, f_img, f_txt, 1e-6, 1e-6)

    def backward():
        return bwd_op(grad, img, txt, w_img, w_txt, f_img, f_txt, 1e-6, 1e-6)

    saved = norm_rope.HEADS_PER_PROGRAM, norm_rope.NUM_WARPS
    res: dict = {"shape": {"image_tokens": s_img, "text_tokens": s_txt, "heads": heads, "head_dim": dim},
                 "device": str(device), "default": {"heads_per_program": saved[0]}, "rows": []}
    ok = True
    try:
        norm_rope.NUM_WARPS = None
        want = (forward(), *backward())
        for per, warps in settings:
            norm_rope.HEADS_PER_PROGRAM, norm_rope.NUM_WARPS = per, warps
            got = (forward(), *backward())
            exact = all(torch.equal(a, b) for a, b in zip(got, want))
            close = all(_within_one_rounding(a, b) for a, b in zip(got, want))
            ok = ok and close
            row = {"heads_per_program": per, "num_warps": warps, "exact": exact, "within_one_bf16_rounding": close}
            if device.type == "cuda":
                for name, fn in (("forward_us", forward), ("backward_us", backward)):
                    for _ in range(3):
                        fn()
                    row[name] = round(device_busy_ms(fn, device, steps=20) * 1000, 2)
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        norm_rope.HEADS_PER_PROGRAM, norm_rope.NUM_WARPS = saved
    if out:
        out.write_text(json.dumps(res, indent=1))
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-tokens", type=int, default=4096, help="image tokens (1024²: 4096)")
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--heads", type=int, default=24, help="attention heads (Qwen-Image: 24)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="write the rows here (JSON)")
    args = ap.parse_args(argv)
    return run(args.image_tokens, args.text_tokens, args.heads, args.head_dim, torch.device(args.device), args.out)


if __name__ == "__main__":
    sys.exit(main())
