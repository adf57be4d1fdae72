"""Micro-benchmark: the compiled step's fp8 matmuls at their real shapes, by scaling recipe and accumulation.

With ``model.fp8_matmul`` every Qwen-Image block runs twelve fp8 products a step (``training/fp8.py``): q, k, v,
out, fc1 and fc2 forward, and their input gradients backward, 4096 rows at 1024². In the H200 step they take ~84 ms
(~1.33 PFLOP/s, docs/benchmarks.md). This times ``torch._scaled_mm`` alone at each of those shapes, and at the
shapes that q/k/v as one product would have, in four forms:

- ``rowwise``: what training runs (per-row scales for both operands, fp32 accumulation kept exact);
- ``rowwise_fast``: the same with ``use_fast_accum=True`` (Hopper's faster accumulation; torchao's float8
  training uses it for the forward product);
- ``tensorwise`` / ``tensorwise_fast``: the same fp8 operands with one scale each: the kernels' speed with
  per-tensor scales (for comparison only; not per-tensor quantization's error).

Each row reports the kernel time per product (profiler, CUDA only), its TFLOP/s and the largest difference from
a float32 product of the same quantized operands, relative to that product's largest magnitude. On a machine
without CUDA only the reference path is checked.

    python -m bench.fp8_gemm --out fp8_gemm.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from qwen_zero_prior.training.fp8 import FP8, quantize_rows

from bench.bench_step import device_busy_ms

# (name, K, N) at M rows: Qwen-Image's image stream, dim 3072, MLP 12288
SHAPES = (
    ("q|k|v|out fwd, q|k|v|out bwd", 3072, 3072),
    ("fc1 fwd, fc2 bwd", 3072, 12288),
    ("fc2 fwd, fc1 bwd", 12288, 3072),
    ("q/k/v as one product, fwd", 3072, 9216),
    ("q/k/v as one product, bwd", 9216, 3072),
)
FORMS = ("rowwise", "rowwise_fast", "tensorwise", "tensorwise_fast")


def operands(m: int, k: int, n: int, device, seed: int = 0):
    """``a`` [M, K] quantized per row and ``b`` [K, N] column-major quantized per column (as fp8.py lays them)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, torch.bfloat16)
    aq, sa = quantize_rows(a)
    wq, sw = quantize_rows(w)  # [N, K] row-major: .t() is [K, N] column-major
    return aq, sa, wq.t(), sw.view(1, -1)


def product(form: str, aq, sa, bq, sb):
    fast = form.endswith("_fast")
    if form.startswith("tensorwise"):
        sa, sb = sa.amax().reshape(()), sb.amax().reshape(())
    return torch._scaled_mm(aq, bq, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=fast)


def reference(aq, sa, bq, sb) -> torch.Tensor:
    return (aq.float() * sa) @ (bq.float() * sb)


def run(m: int, device: torch.device, reps: int) -> list[dict]:
    rows = []
    for name, k, n in SHAPES:
        ops = operands(m, k, n, device)
        ref = reference(*ops)
        scale = ref.abs().max().item()
        for form in FORMS if device.type == "cuda" else ():
            out = product(form, *ops)
            tensorwise = form.startswith("tensorwise")
            # tensorwise scales differ from the reference's per-row ones: compare against its own reference
            r = reference(ops[0], ops[1].amax(), ops[2], ops[3].amax()) if tensorwise else ref
            err = (out.float() - r).abs().max().item() / (r.abs().max().item() or 1.0)
            us = device_busy_ms(lambda f=form, o=ops: [product(f, *o) for _ in range(reps)], device) * 1000 / reps
            rows.append({"shape": name, "m": m, "k": k, "n": n, "form": form, "us": round(us, 1),
                         "tflops": round(2 * m * k * n / us / 1e6, 1), "max_rel_err": float(f"{err:.3g}")})
        if device.type != "cuda":  # the reference against fp8.py's own product (what runs on CPU)
            from qwen_zero_prior.training.fp8 import scaled_product
            err = (scaled_product(*ops).float() - ref).abs().max().item() / (scale or 1.0)
            rows.append({"shape": name, "m": m, "k": k, "n": n, "form": "reference", "max_rel_err": err})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4096, help="M: tokens a product (4096 at 1024²)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="JSON file for the rows")
    args = p.parse_args(argv)
    if args.rows % 16:
        raise SystemExit(f"--rows {args.rows}: _scaled_mm needs a multiple of 16")
    device = torch.device(args.device)
    if device.type == "cuda" and FP8 is None:  # pragma: no cover (every supported torch has e4m3)
        raise SystemExit("this torch has no float8_e4m3fn")
    rows = run(args.rows, device, args.reps)
    for r in rows:
        print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                                              else "cpu", "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
