"""Quality check: what fp8 products with fast accumulation in the backward do to the trained gradients.

``model.fp8_fast_accum_backward`` runs the fp8 layers' input-gradient products with Hopper's fast accumulation
(``_scaled_mm``'s ``use_fast_accum``): ~5 ms a step faster at full size (docs/benchmarks.md, sessions 32-33), two
to three times the error of one product against a float32 product of the same fp8 operands (bench/fp8_gemm.py).
That error reaches every LoRA layer's gradient upstream, and the token's through the text stream and the text
encoder. What a product's error does to the gradients training actually uses is measured here, on the real
training path (the project's Trainer, the real tokenizer, one training example), eager:

1. ``bf16``: the reference, the transformer's base weights in bf16 (``fp8_matmul: false``);
2. ``fp8``: ``fp8_matmul: true`` as it trained before session 35 (forward fast, backward float32-accumulated:
   ``fp8_fast_accum_backward: false``);
3. ``fp8_fast_backward``: the same layers with ``fast_accum_backward`` on as well.

Each gets the same LoRA weights (``A`` and ``B`` drawn from one seed, ``B`` non-zero so that ``A`` has a
gradient), the same token vector and, per sample seed, the same latents, noise and noise level. For every seed it
reports the loss and, for the token's vector, the LoRA's ``A`` and ``B`` gradients and all of them together, the
relative L2 difference from the reference's gradient (``rel_err``) and the cosine between them. ``fast_vs_fp8`` is
variant 3 against variant 2 directly. The question it answers: is the error that fast accumulation adds small
beside the error fp8 itself brings (``rel_err`` of 3 against that of 2)?

    python -m bench.fp8_grad_quality --size full --out fp8_grad_quality.json     # a GPU with fp8 (Hopper)
    python -m bench.fp8_grad_quality --size tiny --device cpu                      # the plumbing (CI)

Without CUDA the fp8 products are float32 products of the quantized operands (``fp8.scaled_product``), so variant
3 equals variant 2 exactly: a check of the script, not of fast accumulation.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.bench_step import build_pipeline, project_trainer, reset_pipeline

VARIANTS = ("bf16", "fp8", "fp8_fast_backward")
GROUPS = ("token", "lora_A", "lora_B", "all")


def _group(name: str) -> str:
    return "token" if name.startswith("placeholder_vector") else "lora_A" if ".lora_A." in name else "lora_B"


def set_lora(trainer, seed: int, b_std: float) -> None:
    """Every LoRA weight drawn from ``seed`` and its name (the same values whichever trainer holds them): ``A`` at
    peft's scale (std ``1/sqrt(fan_in)``), ``B`` at ``b_std`` instead of peft's zeros, as after some training."""
    for name, p in zip(trainer.param_names, trainer.lora_params):
        g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name))
        std = p.shape[1] ** -0.5 if ".lora_A." in name else b_std
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)


def gradients(trainer, seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and every trained tensor's float32 gradient for one training sample drawn from ``seed``."""
    params = trainer.trainable()
    for p in params:
        p.grad = None
    loss = trainer.loss_for([0], sample_seeds=[seed])
    loss.backward()
    names = trainer.param_names
    grads = {n: (p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32))
             for n, p in zip(names, params)}
    for p in params:
        p.grad = None
    return float(loss.detach()), grads


def compare(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per group: ``rel_err`` = |got - ref| / |ref| (L2 over every element of the group) and ``cosine``."""
    acc = {g: torch.zeros(4, dtype=torch.float64) for g in GROUPS}  # Σ(g-r)², Σr², Σg², Σg·r
    for name, r in ref.items():
        g = got[name]
        s = torch.stack([(g - r).square().sum(), r.square().sum(), g.square().sum(), (g * r).sum()]).double().cpu()
        acc[_group(name)] += s
        acc["all"] += s
    out = {}
    for group, (d, rr, gg, gr) in acc.items():
        if rr == 0 and gg == 0:
            continue
        out[group] = {"rel_err": float((d / rr).sqrt()) if rr > 0 else float("inf"),
                      "cosine": float(gr / (rr.sqrt() * gg.sqrt())) if rr > 0 and gg > 0 else 0.0}
    return out


def _fast_backward(transformer, on: bool) -> int:
    from qwen_zero_prior.training.fp8 import Fp8Linear

    layers = [m for m in transformer.modules() if isinstance(m, Fp8Linear)]
    for m in layers:
        m.fast_accum_backward = on
    return len(layers)


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16
    pipe, real_tokenizer = build_pipeline(args.size, device, dtype)
    bench_args = SimpleNamespace(dtype="bfloat16", device_obj=device, compile=False,
                                 attention_backend=args.attention_backend, compile_mode=None, rank=args.rank,
                                 res=args.res, family="qwen-image")
    work = Path(tempfile.mkdtemp(prefix="qzp-fp8q-"))
    seeds = list(range(args.seeds))
    res = {"size": args.size, "device": str(device), "res": args.res, "rank": args.rank, "seeds": seeds,
           "b_std": args.b_std, "real_tokenizer": real_tokenizer,
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "torch": torch.__version__, "rows": []}
    grads: dict[str, list[dict[str, torch.Tensor]]] = {}
    losses: dict[str, list[float]] = {}
    t0 = time.time()
    trainer = None
    for variant in VARIANTS:
        if variant != "fp8_fast_backward":  # the fp8 trainer's layers switch their backward in place (below)
            if trainer is not None:
                trainer = None
                reset_pipeline(pipe)
            trainer = project_trainer(pipe, bench_args, work / variant, fp8_matmul=variant == "fp8",
                                      fp8_fast_accum=True, fp8_fast_accum_backward=False)
            set_lora(trainer, args.lora_seed, args.b_std)
        layers = _fast_backward(pipe.transformer, variant == "fp8_fast_backward")
        if variant != "bf16" and not layers:
            raise SystemExit(f"{variant}: no fp8 layer in the transformer")
        out = [gradients(trainer, s) for s in seeds]
        losses[variant] = [loss for loss, _ in out]
        grads[variant] = [g for _, g in out]  # every variant's, on the device (~0.85 GB a sample at full size)
        print(f"{variant}: losses {losses[variant]} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    for i, seed in enumerate(seeds):
        res["rows"].append({
            "seed": seed, "loss": {v: losses[v][i] for v in VARIANTS},
            "fp8_vs_bf16": compare(grads["bf16"][i], grads["fp8"][i]),
            "fp8_fast_backward_vs_bf16": compare(grads["bf16"][i], grads["fp8_fast_backward"][i]),
            "fast_vs_fp8": compare(grads["fp8"][i], grads["fp8_fast_backward"][i])})
    summary = {}
    for group in GROUPS:
        pairs = [(r["fp8_vs_bf16"].get(group), r["fp8_fast_backward_vs_bf16"].get(group)) for r in res["rows"]]
        pairs = [(a["rel_err"], b["rel_err"]) for a, b in pairs if a and b]
        if pairs:
            summary[group] = {"fp8_rel_err_mean": sum(a for a, _ in pairs) / len(pairs),
                              "fast_backward_rel_err_mean": sum(b for _, b in pairs) / len(pairs),
                              "ratio_max": max(b / a for a, b in pairs) if all(a > 0 for a, _ in pairs) else None}
    res["summary"] = summary
    res["seconds"] = round(time.time() - t0, 1)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--seeds", type=int, default=4, help="training samples (latents, noise and noise level) compared")
    p.add_argument("--lora-seed", type=int, default=0)
    p.add_argument("--b-std", type=float, default=0.01, help="std of the LoRA's B (peft starts it at zero)")
    p.add_argument("--attention-backend", default="", help="e.g. _native_cudnn (the default: the model's own)")
    p.add_argument("--out", help="JSON file for the rows")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    res = run(args)
    text = json.dumps(res, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps(res["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
