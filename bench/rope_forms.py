"""Micro-benchmark: forms of Qwen-Image's q/k RMSNorm + RoPE, compiled, at the 1024² step's shapes.

In the H200 step (docs/benchmarks.md, "Session 27") the compiled block's q/k RMSNorm + RoPE kernels take 87 µs
forward and 128 µs backward per block, ~13 ms a step, where their bytes would take ~20-30 µs. This compares, on
the same inputs (image q/k ``[1, 4096, 24, 128]`` and text q/k ``[1, 128, 24, 128]`` in bf16, each with its
RMSNorm weight), what inductor makes of:

- ``real``: training/rope.py's real-arithmetic RoPE (what training compiles today);
- ``flip``: the same interleaved rotation as ``x·cos + swap_pairs(x)·sin`` with the tables built in the graph;
- ``tab``: the same with the fp32 tables built once outside (training/rope.py's ``install_tables``);
- ``halves``: the rotation over each head's halves (GPT-NeoX's layout; bench_step's ``rope_halves=1``): exact only
  with the q/k projections' rows permuted, so speed only here.

``flip`` and ``tab`` equal ``real`` (checked on every run, and by the tests); ``halves`` equals ``real`` on permuted
head dimensions. On CUDA it reports each form's summed kernel time per call (profiler, CUDA only: host overhead
excluded, which a non-graphed micro-benchmark of ~10 small kernels would otherwise measure) for the forward alone
and forward + backward; elsewhere it checks the forms and times them on the CPU (not meaningful for the GPU).

    python -m bench.rope_forms --out rope.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
from diffusers.models.normalization import RMSNorm
from qwen_zero_prior.training import rope

from bench.bench_step import device_busy_ms, rope_halves_speed_only

HEADS, HEAD_DIM = 24, 128


def rope_real(x, freqs):
    """What training compiles (rope.install routes diffusers' RoPE here)."""
    return rope.apply_rotary_emb_qwen_real(x, freqs, use_real=False)


def rope_flip(x, freqs):
    """rope.py's table form with the tables built in the graph."""
    return rope.apply_rotary_emb_qwen_real(x, rope.tables(freqs), use_real=False)


def rope_tab(x, tabs):
    """rope.py's table form (``install_tables``: the tables built once, outside the blocks)."""
    return rope.apply_rotary_emb_qwen_real(x, tabs, use_real=False)


def rope_halves(x, freqs):
    """bench_step's ``rope_halves=1`` form."""
    return rope_halves_speed_only(x, freqs, use_real=False)


FORMS = {"real": rope_real, "flip": rope_flip, "tab": rope_tab, "halves": rope_halves}


def block(form: str, q_img, k_img, q_txt, k_txt, norms, f_img, f_txt):
    """One attention block's four q/k RMSNorm (diffusers') + RoPE applications (image and text stream)."""
    rotate = FORMS[form]
    return (rotate(norms[0](q_img), f_img), rotate(norms[1](k_img), f_img),
            rotate(norms[2](q_txt), f_txt), rotate(norms[3](k_txt), f_txt))


def _norms(weights) -> list:
    """diffusers' RMSNorm over each head's dimensions (as Qwen-Image's norm_q/norm_k/...), frozen, with these
    weights."""
    norms = []
    for w in weights:
        norm = RMSNorm(w.shape[-1], eps=1e-6).to(w.device, w.dtype).requires_grad_(False)
        norm.weight.copy_(w)
        norms.append(norm)
    return norms


def inputs(image_tokens: int, text_tokens: int, heads: int, head_dim: int, device, dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    xs = [randn(1, n, heads, head_dim).requires_grad_() for n in (image_tokens, image_tokens, text_tokens,
                                                                  text_tokens)]
    weights = [1 + 0.1 * randn(head_dim) for _ in range(4)]  # RMSNorm weights: see _norms
    freqs = []
    for n in (image_tokens, text_tokens):
        angles = torch.rand(n, head_dim // 2, generator=g) * 6.3
        freqs.append(torch.polar(torch.ones_like(angles), angles).to(device))
    return xs, weights, freqs


def check(xs, weights, freqs) -> dict:
    """Each form's largest difference from ``real`` (``halves`` on permuted head dimensions), eagerly."""
    head_dim = xs[0].shape[-1]
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)]).to(xs[0].device)
    ref = block("real", *xs, _norms(weights), *freqs)
    out = {}
    for form in ("flip", "tab", "halves"):
        if form == "halves":
            got = block(form, *(x[..., perm] for x in xs), _norms([w[perm] for w in weights]), *freqs)
            want = [r[..., perm] for r in ref]
        else:
            got = block(form, *xs, _norms(weights), *(rope.tables(f) if form == "tab" else f for f in freqs))
            want = ref
        out[form] = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want))
    return out


def measure(form: str, xs, weights, freqs, iters: int, compile: bool = True) -> dict:
    device = xs[0].device
    norms = _norms(weights)
    fr = [rope.tables(f) for f in freqs] if form == "tab" else freqs
    fn = functools.partial(block, form)
    if compile:
        torch._dynamo.reset()  # one form's graphs at a time (each form recompiles the same code object otherwise)
        fn = torch.compile(fn)
    grads = [torch.randn_like(x) for x in xs]

    def forward():
        with torch.no_grad():
            fn(*xs, norms, *fr)

    def forward_backward():
        torch.autograd.backward(fn(*xs, norms, *fr), grads)

    row = {"form": form}
    for name, call in (("forward", forward), ("forward_backward", forward_backward)):
        for _ in range(3):  # compile, autotune, warm caches
            call()
        if device.type == "cuda":
            row[f"{name}_kernel_us"] = round(device_busy_ms(lambda c=call: [c() for _ in range(iters)], device, 1)
                                             * 1000 / iters, 1)
        else:
            import time

            t0 = time.perf_counter()
            for _ in range(iters):
                call()
            row[f"{name}_cpu_us"] = round((time.perf_counter() - t0) / iters * 1e6, 1)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cuda where there is one (default), else cpu: checks only")
    p.add_argument("--image-tokens", type=int, default=4096, help="image tokens (1024²: 4096)")
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--heads", type=int, default=HEADS)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, of {', '.join(FORMS)} (all by default)")
    p.add_argument("--no-compile", action="store_true", help="eager (for a quick check of the forms)")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    forms = [f for f in args.forms.split(",") if f]
    unknown = sorted(set(forms) - set(FORMS))
    if unknown or not forms:
        p.error(f"--forms {args.forms!r}: unknown {unknown}; choose from {', '.join(FORMS)}")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16
    xs, weights, freqs = inputs(args.image_tokens, args.text_tokens, args.heads, HEAD_DIM, device, dtype)
    diffs = check(xs, weights, freqs)
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "shapes": {"image": [1, args.image_tokens, args.heads, HEAD_DIM],
                      "text": [1, args.text_tokens, args.heads, HEAD_DIM]},
           "max_diff_vs_real": diffs, "rows": []}
    io_bytes = 2 * 2 * (2 * args.image_tokens + 2 * args.text_tokens) * args.heads * HEAD_DIM  # bf16 in + out
    res["forward_bytes_floor_us_at_4_8_tb_s"] = round(io_bytes / 4.8e12 * 1e6, 1)
    # normed bf16 outputs below 8: another rounding order moves one by a bf16 step, 2^-5 at 4-8, at most (the GPU's
    # halves form differed by 0.023 in session 30, where the CPU's is exact); a wrong rotation moves them by O(1)
    bad = {k: v for k, v in diffs.items() if v > 2 ** -5}
    if bad:
        print(f"forms differ from the real RoPE: {bad}", file=sys.stderr)
        return 1
    for form in forms:
        row = measure(form, xs, weights, freqs, args.iters, compile=not args.no_compile)
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
