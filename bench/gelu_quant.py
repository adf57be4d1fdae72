"""Micro-benchmark: the MLP's GELU + per-row fp8 quantization, inductor's kernel against a hand-written one.

With ``model.fp8_matmul`` each Qwen-Image block's MLP runs ``fc2(gelu(fc1(x)))`` with both products in fp8: the
GELU's output is quantized per row for ``fc2`` forward, and in the backward the GELU's input gradient is quantized
per row for ``fc1``'s input-gradient product. Inductor fuses each into one kernel (bias add, GELU or its derivative,
row maximum, scale, cast). In the H200 step (docs/benchmarks.md, "Session 27") they take ~125 µs each at
``[4096, 12288]``, 60 blocks a step each way (~15 ms a step), where their bytes (150-250 MB) would take 40-60 µs:
the kernels are arithmetic-bound (the GELU computed twice in a looped reduction, IEEE divisions).

This times, on the same inputs (``h`` the fc1 product and ``b`` its bias, bf16):

- ``inductor``: what training compiles: ``quantize_rows(gelu_tanh_sigmoid(h + b))`` forward, and the GELU's
  derivative times the incoming gradient, quantized, backward (``torch.compile``, default settings);
- ``triton``: training/gelu_fp8.py's custom operators: one Triton program a row, the row held in registers, the
  GELU computed once, fast divisions (CUDA only); as one power-of-two block a row (padded: 12288 -> 16384 lanes)
  and, the default since session 36, as three power-of-two pieces (``gelu_fp8.PIECES``), whose codes must equal
  the former's exactly.

It checks that both give the same fp8 values (up to the odd last-bit difference of a division: reported) and
scales, and reports each kernel's time per call (profiler, CUDA only). On a machine without CUDA it checks the
reference against eager PyTorch only.

    python -m bench.gelu_quant --out gelu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from qwen_zero_prior.training import gelu_fp8
from qwen_zero_prior.training.fp8 import quantize_rows
from qwen_zero_prior.training.gelu import gelu_tanh_sigmoid

from bench.bench_step import device_busy_ms


def reference_forward(h: torch.Tensor, b: torch.Tensor):
    """What the compiled block computes between fc1's product and fc2's: bias (Fp8Linear, bf16), GELU (gelu.py,
    float32 inside, bf16 out), per-row quantization (fp8.quantize_rows)."""
    return quantize_rows(gelu_tanh_sigmoid(h + b))


def reference_backward(dg: torch.Tensor, h: torch.Tensor, b: torch.Tensor):
    """The GELU's input gradient (autograd's, bf16 out) for an incoming ``dg``, quantized per row for fc1's
    input-gradient product."""
    x = (h + b).detach().requires_grad_(True)
    with torch.enable_grad():
        (dx,) = torch.autograd.grad(gelu_tanh_sigmoid(x), x, dg)
    return quantize_rows(dx)


def gelu_derivative_formula(dg: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The same derivative written out (gelu_fp8's, which inductor can compile: it does not trace
    ``autograd.grad``)."""
    return gelu_fp8.gelu_tanh_sigmoid_backward(dg, h + b)


def reference_backward_formula(dg, h, b):
    return quantize_rows(gelu_derivative_formula(dg, h, b))


def compare(name: str, got, want) -> dict:
    """How far ``got`` (fp8, scales) is from ``want``: the share of fp8 values that differ, the largest difference
    in e4m3 steps (codes are ordered by magnitude: a sign bit, then 7 bits), and the largest relative difference
    of the scales."""
    (qg, sg), (qw, sw) = got, want
    cg, cw = qg.view(torch.uint8).int(), qw.view(torch.uint8).int()
    differ = (cg != cw).float().mean().item()
    mg, mw = cg & 0x7F, cw & 0x7F
    steps = torch.where((cg >> 7) == (cw >> 7), (mg - mw).abs(), mg + mw)
    scale_rel = ((sg - sw).abs() / sw).max().item()
    return {"form": name, "fp8_values_differing": differ, "max_diff_in_steps": int(steps.max().item()),
            "scale_max_rel_diff": scale_rel}


def run(rows: int, width: int, device: torch.device, out: Path | None) -> int:
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(rows, width, generator=gen) * 2).to(device, torch.bfloat16)
    b = (torch.randn(width, generator=gen) * 0.1).to(device, torch.bfloat16)
    dg = (torch.randn(rows, width, generator=gen) * 1e-3).to(device, torch.bfloat16)
    res: dict = {"shape": [rows, width], "device": str(device), "rows": []}
    want_f = reference_forward(h, b)
    want_b = reference_backward(dg, h, b)
    # the written-out derivative is what inductor compiles; it must be autograd's
    checks = [compare("formula backward vs autograd", reference_backward_formula(dg, h, b), want_b)]
    if device.type == "cuda":
        comp_f = torch.compile(reference_forward, fullgraph=True)
        comp_b = torch.compile(reference_backward_formula, fullgraph=True)
        checks.append(compare("inductor forward", comp_f(h, b), want_f))
        checks.append(compare("inductor backward", comp_b(dg, h, b), want_b))
        default = gelu_fp8.PIECES
        pieces_apply = gelu_fp8.three_pieces(width)  # else the three-piece setting launches the padded row too
        try:
            for pieces in (False, True):  # one row a program, and the three-piece kernels (gelu_fp8.PIECES)
                gelu_fp8.PIECES = pieces
                label = "triton forward" + (" (3 pieces)" if pieces and pieces_apply else "")
                checks.append(compare(label, gelu_fp8.gelu_quant_rows(h, b), want_f))
                checks.append(compare(label.replace("forward", "backward"),
                                      gelu_fp8.gelu_backward_quant_rows(dg, h, b), want_b))
            gelu_fp8.PIECES = False
            row_f, row_b = gelu_fp8.gelu_quant_rows(h, b), gelu_fp8.gelu_backward_quant_rows(dg, h, b)
            forms = [(lambda: comp_f(h, b), "inductor forward", None, False),
                     (lambda: comp_b(dg, h, b), "inductor backward", None, False)]
            for pieces in (False, True) if pieces_apply else (False,):
                for warps in (4, 8, 16, 32):
                    forms += [(lambda: gelu_fp8.gelu_quant_rows(h, b), "triton forward", warps, pieces),
                              (lambda: gelu_fp8.gelu_backward_quant_rows(dg, h, b), "triton backward", warps, pieces)]
            for fn, name, warps, pieces in forms:
                gelu_fp8.NUM_WARPS, gelu_fp8.PIECES = warps, pieces
                if pieces:  # the same per-element arithmetic and maximum as one row a program: the same codes
                    got = fn()
                    want = row_f if "forward" in name else row_b
                    checks.append({**compare(f"{name} (3 pieces, {warps} warps) vs one row a program", got, want),
                                   "exact": bool(torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
                                                 and torch.equal(got[1], want[1]))})
                for _ in range(3):
                    fn()
                us = device_busy_ms(fn, device, steps=10) * 1000
                res["rows"].append({"form": name, **({"num_warps": warps} if warps else {}),
                                    **({"pieces": 3} if pieces else {}), "kernel_us": round(us, 1)})
        finally:
            gelu_fp8.NUM_WARPS, gelu_fp8.PIECES = None, default
    res["checks"] = checks
    # one e4m3 step where a division's last bit differs; scales within bf16's rounding of the row maximum
    ok = all(c["max_diff_in_steps"] <= 1 and c["scale_max_rel_diff"] <= 1e-2 and c.get("exact", True) for c in checks)
    for row in res["rows"] + checks:
        print(json.dumps(row), flush=True)
    if out:
        out.write_text(json.dumps(res, indent=1))
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096, help="rows (image tokens at 1024²: 4096)")
    ap.add_argument("--width", type=int, default=12288, help="the MLP's inner width (Qwen-Image: 12288)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="write the rows and checks here (JSON)")
    args = ap.parse_args(argv)
    return run(args.rows, args.width, torch.device(args.device), args.out)


if __name__ == "__main__":
    sys.exit(main())
