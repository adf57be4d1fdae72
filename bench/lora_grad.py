"""Micro-benchmark: the LoRA's weight-gradient products, as the step runs them and in forms with fewer kernels.

Each Qwen-Image block's LoRA (rank r, float32 weights computed in bf16) has small weight-gradient products with a
long reduction: ``dA = dhᵀ x`` ([r, 3072] over 4096 image rows; 3r rows where q/k/v share one ``A`` product) and
``dB = dyᵀ h`` ([3072, r]). cuBLAS runs them as split-K kernels (the product and a reduction kernel; in the
step's CUDA graphs a memset too), then the step casts the bf16 result to the float32 gradient: three to four
kernels each, ~2,400 memsets and reductions a step at 1024² (docs/benchmarks.md, session 32). This times, per
product (profiler kernel time and kernel count, CUDA only):

- ``bf16+cast``: ``(aᵀ b).float()``, what autograd computes today;
- ``mm_fp32_out``: ``torch.mm(aᵀ, b, out_dtype=torch.float32)`` (CUDA's ``aten::mm.dtype``): bf16 inputs, the
  float32 result written directly, no cast;
- ``split_bmm``: the reduction split by hand into S chunks (one ``bmm``) and summed in float32 (one kernel that is
  also the cast).

Errors are the largest difference from a float32 product of the same bf16 inputs, relative to its largest value.

    python -m bench.lora_grad --out lora_grad.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# (name, K rows reduced over, M, N): the gradient is [M, N] = aᵀ b for a [K, M], b [K, N]
SHAPES = (
    ("dA q/k/v (3 x rank 32)", 4096, 96, 3072),
    ("dA out (rank 32)", 4096, 32, 3072),
    ("dB q|k|v|out", 4096, 3072, 32),
)
FORMS = ("bf16+cast", "mm_fp32_out", "split_bmm")


def grad(form: str, a: torch.Tensor, b: torch.Tensor, splits: int = 4) -> torch.Tensor:
    if form == "bf16+cast":
        return (a.t() @ b).float()
    if form == "mm_fp32_out":
        return torch.mm(a.t(), b, out_dtype=torch.float32)
    if form == "split_bmm":
        k, m = a.shape
        n = b.shape[1]
        parts = torch.bmm(a.view(splits, k // splits, m).transpose(1, 2), b.view(splits, k // splits, n))
        return parts.sum(0, dtype=torch.float32)
    raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")


def profile_form(fn, reps: int) -> tuple[float, float]:
    """Kernel µs and kernels per call of ``fn`` (CUDA profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    return (sum(e.self_device_time_total for e in events) / reps, sum(e.count for e in events) / reps)


def run(device: torch.device, reps: int, forms=FORMS) -> list[dict]:
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, k, m, n in SHAPES:
        a = torch.randn(k, m, generator=g).to(device, torch.bfloat16)
        b = torch.randn(k, n, generator=g).to(device, torch.bfloat16)
        ref = a.float().t() @ b.float()
        for form in forms:
            try:
                out = grad(form, a, b)
            except (NotImplementedError, RuntimeError, TypeError) as e:  # mm.dtype: CUDA only, newer torch only
                rows.append({"shape": name, "form": form, "error": f"{type(e).__name__}: {str(e)[:160]}"})
                continue
            err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
            row = {"shape": name, "k": k, "m": m, "n": n, "form": form, "dtype": str(out.dtype).removeprefix("torch."),
                   "max_rel_err": float(f"{err:.3g}")}
            if device.type == "cuda":
                us, kernels = profile_form(lambda f=form, x=a, y=b: grad(f, x, y), reps)
                row.update(us=round(us, 2), kernels=kernels)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="JSON file for the rows")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = run(device, args.reps)
    for r in rows:
        print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                                              else "cpu", "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
