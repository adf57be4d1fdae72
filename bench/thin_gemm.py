"""Micro-benchmark: the step's products of few rows against large frozen weights, with and without a split over K.

The text stream of Qwen-Image's blocks (~128 text rows) and the text encoder (Qwen2.5-VL-7B, the prompt's ~128 rows)
multiply few rows by large frozen weights, forward (``x Wᵀ``) and for the input gradient (``dy W``): each product is
bound by reading its weight, ~53 GB a step at 1024² for both together. Without cuBLAS's workspace (what the compiled
fp8 step runs, ``training/cublas.py``) cuBLAS cannot split K, so a product with a long K and a narrow output (the
MLPs' down products, the gradients through their up products) runs on few thread blocks. This times each such
shape (profiler kernel time, kernels a call, weight bytes a second) in two forms:

- ``mm``: the product as the step runs it (forward ``x @ W.t()``, backward ``dy @ W``);
- ``splitS``: K split by hand into S chunks, one batched product and a float32 sum (what split-K does, without a
  workspace).

Run it once per workspace setting (cuBLAS reads the size once a process)::

    python -m bench.thin_gemm --workspace none --out thin-none.json
    python -m bench.thin_gemm --workspace default --out thin-default.json

Off CUDA only the forms' numbers are checked against a float32 product.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# (name, rows, K, N, layout): the product [rows, K] @ [K, N]; "fwd": the weight [N, K] read transposed (x Wᵀ),
# "bwd": the weight [K, N] as it lies (dy W, the input gradient of a [K-out, N-in] layer)
SHAPES = (
    ("text stream q|k|v|out fwd", 128, 3072, 3072, "fwd"),
    ("text stream q|k|v|out bwd", 128, 3072, 3072, "bwd"),
    ("text stream fc1 fwd", 128, 3072, 12288, "fwd"),
    ("text stream fc2 fwd", 128, 12288, 3072, "fwd"),
    ("text stream fc1 bwd", 128, 12288, 3072, "bwd"),
    ("text stream fc2 bwd", 128, 3072, 12288, "bwd"),
    ("text encoder q|o fwd", 128, 3584, 3584, "fwd"),
    ("text encoder k|v fwd", 128, 3584, 512, "fwd"),
    ("text encoder gate|up fwd", 128, 3584, 18944, "fwd"),
    ("text encoder down fwd", 128, 18944, 3584, "fwd"),
    ("text encoder gate|up bwd", 128, 18944, 3584, "bwd"),
    ("text encoder down bwd", 128, 3584, 18944, "bwd"),
    ("text encoder k|v bwd", 128, 512, 3584, "bwd"),
)
SPLITS = (2, 4, 8)


def operands(rows: int, k: int, n: int, layout: str, device, generator=None):
    """The activation [rows, K] and the weight as the layer stores it: [N, K] forward, [K, N] backward."""
    x = torch.randn(rows, k, generator=generator).to(device, torch.bfloat16)
    w = (torch.randn(n, k, generator=generator) if layout == "fwd" else
         torch.randn(k, n, generator=generator)).to(device, torch.bfloat16) * k ** -0.5
    return x, w


def product(form: str, x: torch.Tensor, w: torch.Tensor, layout: str) -> torch.Tensor:
    if form == "mm":
        return x @ (w.t() if layout == "fwd" else w)
    if form.startswith("split"):
        s = int(form.removeprefix("split"))
        rows, k = x.shape
        if k % s:
            raise ValueError(f"split{s}: K={k} is not a multiple of {s}")
        xs = x.view(rows, s, k // s).transpose(0, 1)  # [S, rows, K/S], views (leading dimension K)
        # [S, K/S, N] views of the weight as it lies: column-major chunks of Wᵀ forward, row-major ones of W backward
        bs = (w.view(w.shape[0], s, k // s).permute(1, 2, 0) if layout == "fwd" else
              w.view(s, k // s, w.shape[1]))
        return torch.bmm(xs, bs).sum(0, dtype=torch.float32).to(x.dtype)
    raise ValueError(f"unknown form {form!r}; expected mm or split<S>")


def run(device: torch.device, reps: int, splits=SPLITS) -> list[dict]:
    from bench.lora_grad import profile_form

    rows = []
    g = torch.Generator().manual_seed(0)
    for name, m, k, n, layout in SHAPES:
        x, w = operands(m, k, n, layout, device, g)
        ref = x.float() @ (w.t() if layout == "fwd" else w).float()
        for form in ("mm", *(f"split{s}" for s in splits if k % s == 0 and k // s >= 256)):
            out = product(form, x, w, layout)
            err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
            row = {"shape": name, "rows": m, "k": k, "n": n, "layout": layout, "form": form,
                   "max_rel_err": float(f"{err:.3g}")}
            if device.type == "cuda":
                us, kernels = profile_form(lambda f=form: product(f, x, w, layout), reps)
                row.update(us=round(us, 2), kernels=kernels, weight_tb_s=round(k * n * 2 / us / 1e6, 2))
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workspace", choices=("none", "default"), default="none",
                   help="none: cuBLAS without a workspace (the compiled fp8 step's, training/cublas.py); default: "
                        "PyTorch's. Set before CUDA runs a product; a value in the environment is kept")
    p.add_argument("--out", help="JSON file for the rows")
    args = p.parse_args(argv)
    from qwen_zero_prior.training import cublas

    if args.workspace == "none":
        cublas.set_no_workspace()
    device = torch.device(args.device)
    rows = run(device, args.reps)
    for r in rows:
        print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "workspace": cublas.workspace_setting(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
