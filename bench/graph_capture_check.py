"""Whether ``training/graphs.py`` captures and replays CUDA graphs on this GPU under a given PyTorch allocator, and what
it saves on a launch-bound step. ComfyUI runs PyTorch's ``cudaMallocAsync`` allocator by default, under which
torch.compile's reduce-overhead graphs cannot run; the training node's engine captures its whole step with this module
instead. Runs in its own process (the allocator is chosen when CUDA starts)::

    python -m bench.graph_capture_check --backend cudaMallocAsync
    python -m bench.graph_capture_check --backend native --fail-first   # a failed capture, then training goes on

A stand-in step (a stack of frozen Linear + GELU layers with a trainable low-rank pair, the conditioning's gradient
too) is trained with and without graphs while another thread makes CUDA calls (as ComfyUI's server thread may);
outputs and gradients must agree. ``--fail-first``: the first capture meets a host sync, fails, and that shape runs
eagerly; a second shape must still capture and the process must exit cleanly. Prints one JSON line; exit 1 where
anything disagreed or failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("native", "cudaMallocAsync"), default="cudaMallocAsync")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--fail-first", action="store_true")
    args = ap.parse_args(argv)
    # before torch starts CUDA: the allocator is fixed then
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "backend:cudaMallocAsync" if args.backend == "cudaMallocAsync" else ""
    import torch

    from qwen_zero_prior.training.graphs import GraphCache

    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    dev = torch.device("cuda")
    torch.manual_seed(0)
    backend = torch.cuda.get_allocator_backend()
    layers = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(args.width, args.width), torch.nn.GELU())
                                   for _ in range(args.layers)]).to(dev, torch.bfloat16).requires_grad_(False)
    lora_a = torch.nn.Parameter(torch.randn(16, args.width, device=dev) * 0.02)
    lora_b = torch.nn.Parameter(torch.randn(args.width, 16, device=dev) * 0.02)
    fail = {"armed": args.fail_first}

    def step_fn(x, ctx, mask):
        if fail["armed"] and torch.cuda.is_current_stream_capturing():
            fail["armed"] = False
            float(x.sum())  # a host sync: not allowed while capturing
        h = x + ((x.float() @ lora_a.T) @ lora_b.T).to(x.dtype) + ctx.mean(dim=1, keepdim=True)
        return layers(h)

    stop = threading.Event()
    calls = [0]

    def other_thread():  # what ComfyUI's server thread may do meanwhile: unsafe during a global-mode capture
        while not stop.is_set():
            torch.cuda.mem_get_info()
            torch.empty(1 << 12).pin_memory()
            calls[0] += 1
            time.sleep(0.0005)

    worker = threading.Thread(target=other_thread, daemon=True)
    worker.start()
    cache = GraphCache(step_fn, [lora_a, lora_b], watch=lambda: list(layers.parameters()), name="check")
    worst = 0.0
    times = {"eager": [], "graphs": []}
    shapes = [args.tokens, args.tokens // 2] if args.fail_first else [args.tokens]
    ok = True
    try:
        for step in range(args.steps):
            n = shapes[step % len(shapes)]
            x = torch.randn(8, n, args.width, device=dev, dtype=torch.bfloat16)
            ctx = torch.randn(8, 5, args.width, device=dev, dtype=torch.bfloat16)
            cache.new_step()
            results = []
            for name, run in (("eager", step_fn), ("graphs", cache)):
                lora_a.grad = lora_b.grad = None
                c = ctx.clone().requires_grad_(True)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = run(x, c, None)
                if out is None:  # this shape runs eagerly (its capture failed)
                    out = step_fn(x, c, None)
                out.float().square().mean().backward()
                end.record()
                torch.cuda.synchronize()
                if step >= 2:
                    times[name].append(start.elapsed_time(end))
                results.append([out.detach().float(), lora_a.grad.float(), lora_b.grad.float(), c.grad.float()])
            for e, g in zip(*results):
                worst = max(worst, float((e - g).abs().max() / e.abs().max().clamp_min(1e-12)))
    except Exception as e:  # noqa: BLE001 - reported as the check's result, then exit 1
        print(json.dumps({"backend": backend, "error": f"{type(e).__name__}: {e}"}))
        ok = False
    finally:
        stop.set()
        worker.join()
    if not ok:
        return 1
    torch.cuda.synchronize()
    med = {k: sorted(v)[len(v) // 2] if v else None for k, v in times.items()}
    result = {"backend": backend, "captures": cache.captures, "failed_shapes": cache.failed,
              "worst_rel_diff": worst, "eager_ms": med["eager"], "graphs_ms": med["graphs"],
              "other_thread_calls": calls[0], "fail_first": args.fail_first}
    ok = cache.captures == 1 and worst < 1e-3 and cache.failed == int(args.fail_first)
    result["ok"] = ok
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
