"""How many "Attempting uncaptured free of a captured allocation" warnings PyTorch's cudaMallocAsync allocator (ComfyUI's
default) prints when a training run's CUDA graphs are dropped: with ``GraphCache.clear()`` (the tensors freed by the
garbage collector: one C++ warning per captured tensor, straight to stderr) and with ``GraphCache.release()`` (freed
inside a PyTorch call, where the warning is a Python one, filtered). The training node's DiT pair holds ~960 such
tensors at rank 32, so ``clear()`` printed ~1,900 lines into ComfyUI's console after each training run (session 19).
Each way runs in its own process (the allocator is chosen when CUDA starts)::

    python -m bench.graph_teardown_check              # both ways; exit 1 unless release() printed none
    python -m bench.graph_teardown_check --params 200

Prints one JSON line: the warnings counted on stderr for each way (H200, torch 2.11: 101 with ``clear()``, 0 with
``release()``, 100 parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WARNING = "Attempting uncaptured free of a captured allocation"


def _child(way: str, n_params: int, width: int) -> dict:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "backend:cudaMallocAsync"  # before CUDA starts
    import gc

    import torch

    from qwen_zero_prior.training.graphs import GraphCache

    dev = torch.device("cuda")
    torch.manual_seed(0)
    frozen = torch.randn(width, width, device=dev) / width ** 0.5
    # many small trainable tensors, as a LoRA's A and B over many layers: each gets a captured gradient buffer
    params = [torch.nn.Parameter(torch.randn(width, device=dev) * 0.01) for _ in range(n_params)]

    def fn(x):
        h = x @ frozen
        for p in params:
            h = h + p
        return torch.tanh(h)

    cache = GraphCache(fn, params, watch=lambda: [frozen], name="teardown")
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):
        cache.new_step()
        x = torch.randn(8, width, device=dev)
        out = cache(x)
        out = fn(x) if out is None else out
        out.square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    captures = cache.captures
    (cache.release if way == "release" else cache.clear)()
    del out, cache
    gc.collect()  # whatever still holds a captured tensor lets go of it here
    torch.cuda.synchronize()
    return {"way": way, "captures": captures}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=100)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--child", choices=("clear", "release"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.params, args.width)), flush=True)
        return 0
    res: dict = {"params": args.params, "backend": "cudaMallocAsync"}
    for way in ("clear", "release"):
        r = subprocess.run([sys.executable, "-m", "bench.graph_teardown_check", "--child", way,
                            "--params", str(args.params), "--width", str(args.width)],
                           capture_output=True, text=True, timeout=600)
        row = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else {
            "error": f"exit {r.returncode}", "stderr_tail": r.stderr[-1500:]}
        row["warnings"] = r.stderr.count(WARNING)
        res[way] = row
    res["ok"] = ("error" not in res["release"] and "error" not in res["clear"]
                 and res["release"]["warnings"] == 0 and res["clear"]["warnings"] > 0)
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
