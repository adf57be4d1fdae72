"""Whether ``training/graphs.py`` captures and replays CUDA graphs on this GPU under a given PyTorch allocator, and what
it saves on a launch-bound step. ComfyUI runs PyTorch's ``cudaMallocAsync`` allocator by default, under which
torch.compile's reduce-overhead graphs cannot run; the training node captures the text encoder's per-step part with
this module instead, and the DiT's whole step too (``QWEN_ZERO_PRIOR_ASYNC_GRAPHS``). Runs in its own process
(the allocator is chosen when CUDA starts)::

    python -m bench.graph_capture_check --backend cudaMallocAsync
    python -m bench.graph_capture_check --backend cudaMallocAsync --op compiled   # inductor's kernels too
    python -m bench.graph_capture_check --op compiled --pairs 2   # a text stage's pair feeding the step's pair

A stand-in step (a stack of frozen Linear + GELU layers with a trainable low-rank pair, the conditioning's gradient
too) is trained with and without graphs while another thread makes CUDA calls (as ComfyUI's server thread may);
outputs and gradients must agree. ``--op`` adds one kind of work to the step (or, ``dit``, replaces it with a few
blocks of Qwen-Image's transformer prepared as the node's engine prepares them), to tell which part a capture fails
on. ``--fail-first``: the first capture meets a host sync and fails, and that shape should run eagerly; on an H200 the
process could not go on after that under either allocator (the allocator aborted in a free under cudaMallocAsync; the
next ``randn`` failed with "Offset increment outside graph capture" under the native one), which is why the project's
captures must not fail. Prints one JSON line; exit 1 where anything disagreed or failed.
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
    ap.add_argument("--pairs", type=int, choices=(1, 2), default=1,
                    help="2: a graphed text stage (its own pair, as the node's text encoder) makes the conditioning "
                    "the step reads, so the step's pair is captured and replayed while the text stage's forward "
                    "awaits its backward, as in the training node with QWEN_ZERO_PRIOR_ASYNC_GRAPHS=1")
    ap.add_argument("--no-defer", action="store_true",
                    help="with --pairs 2: capture the step's pair where its shape is first seen (inside the text "
                    "stage's forward-to-backward window; this segfaulted the node on an H200) instead of at the next "
                    "step's start")
    ap.add_argument("--dit-layers", type=int, default=4, help="--op dit: blocks of Qwen-Image's transformer")
    ap.add_argument("--op", choices=("linear", "sdpa_cudnn", "sdpa_flash", "scaled_mm", "compiled", "big", "dit"),
                    default="linear", help="what the step runs besides the Linear stack: cuDNN or flash attention, "
                    "fp8 _scaled_mm, a torch.compile'd (inductor) layer, ~8 GiB of activations kept for the "
                    "backward (to tell which part a capture fails on); dit: instead of the stack, diffusers' "
                    "Qwen-Image transformer at full width (--dit-layers blocks) with the LoRA, fp8 matmuls, regional "
                    "compile and cuDNN attention as the training node's engine runs it, at 1024²")
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

    extra = _extra_op(args.op, args.width, dev, torch)

    def step_fn(x, ctx, mask):
        if fail["armed"] and torch.cuda.is_current_stream_capturing():
            fail["armed"] = False
            float(x.sum())  # a host sync: not allowed while capturing
        h = x + ((x.float() @ lora_a.T) @ lora_b.T).to(x.dtype) + ctx.mean(dim=1, keepdim=True)
        return extra(layers(h))

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
    params, watched, make_inputs = [lora_a, lora_b], lambda: list(layers.parameters()), None
    if args.op == "dit":
        step_fn, params, watched, make_inputs = _dit(args.dit_layers, dev, torch)
    cache = GraphCache(step_fn, params, watch=watched, name="check", defer=args.pairs == 2 and not args.no_defer)
    text = {}  # --pairs 2: the text stage, built at the conditioning's width

    def text_stage(ctx):
        if "fn" not in text:
            w = ctx.shape[-1]
            stack = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(w, w), torch.nn.GELU())
                                          for _ in range(8)]).to(dev, torch.bfloat16).requires_grad_(False)
            vec = torch.nn.Parameter(torch.zeros(w, device=dev))  # the token's vector: trained, read by the stage
            text["fn"] = lambda c: stack(c + vec.to(c.dtype))
            text["cache"] = GraphCache(text["fn"], [vec], watch=lambda: list(stack.parameters()), name="text")
            params.append(vec)
            text["vec"] = vec
        return text["fn"], text["cache"]
    worst = 0.0
    times = {"eager": [], "graphs": []}
    shapes = [args.tokens, args.tokens // 2] if args.fail_first else [args.tokens]
    ok = True
    try:
        for step in range(args.steps):
            n = shapes[step % len(shapes)]
            x = torch.randn(8, n, args.width, device=dev, dtype=torch.bfloat16)
            ctx = torch.randn(8, 5, args.width, device=dev, dtype=torch.bfloat16)
            if make_inputs is not None:
                x, ctx = make_inputs(n // 8)  # caption lengths 32 and 16 with --fail-first
            cache.new_step()
            if args.pairs == 2:
                text_stage(ctx)[1].new_step()
            results = []
            for name, run in (("graphs", cache), ("eager", step_fn)):  # graphs first: no older autograd graph alive
                for p in params:
                    p.grad = None
                c = ctx.clone().requires_grad_(True)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                cond = c
                if args.pairs == 2:  # the conditioning from the text stage, replayed in the graphs' run
                    fn, tcache = text_stage(c)
                    cond = (tcache(c) if name == "graphs" else None)
                    cond = fn(c) if cond is None else cond
                out = run(x, cond, None)
                if out is None:  # this shape runs eagerly (its capture failed)
                    out = step_fn(x, cond, None)
                out.float().square().mean().backward()
                end.record()
                torch.cuda.synchronize()
                if step >= 2:
                    times[name].append(start.elapsed_time(end))
                results.append([out.detach().float(), c.grad.float()] + [p.grad.float() for p in params[:8]]
                               + [p.grad.float() for p in params[8:] if p is text.get("vec")])
                del out  # its autograd graph (and the LoRA's gradient accumulators) with it
            for g, e in zip(*results):
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
    text_captures = text["cache"].captures if "cache" in text else None
    result = {"backend": backend, "captures": cache.captures, "failed_shapes": cache.failed,
              "pairs": args.pairs, "deferred": cache.defer, "text_captures": text_captures,
              "worst_rel_diff": worst, "eager_ms": med["eager"], "graphs_ms": med["graphs"],
              "other_thread_calls": calls[0], "fail_first": args.fail_first, "op": args.op}
    # the same kernels either way, but cuDNN attention's backward is not deterministic (the DiT's LoRA gradients
    # moved by up to ~1% between two eager runs' worth of replays on an H200)
    tolerance = 3e-2 if args.op == "dit" else 1e-3
    ok = (backend == args.backend and cache.captures == 1 and worst < tolerance
          and cache.failed == int(args.fail_first) and text_captures in (None, 1))
    result["ok"] = ok
    print(json.dumps(result))
    return 0 if ok else 1


def _dit(layers, dev, torch):
    """(step function, LoRA parameters, frozen tensors, inputs of a caption length) for diffusers' Qwen-Image
    transformer at full width with ``layers`` blocks, random weights, prepared as the node's engine prepares it."""
    from diffusers import QwenImageTransformer2DModel

    from qwen_zero_prior.training.config import ModelConfig
    from qwen_zero_prior.training.diffusers_backend import accelerate_transformer, compute_autocast
    from qwen_zero_prior.training.families import QWEN_IMAGE_FP8, get_family
    from qwen_zero_prior.training.lora import add_lora

    tr = QwenImageTransformer2DModel(num_layers=layers).to(dev, torch.bfloat16)
    tr.requires_grad_(False)
    add_lora(tr, 32, 32.0, get_family("qwen-image").default_lora_targets)
    for n, p in tr.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    tr.train()
    m = ModelConfig(compile=True, fp8_matmul=True, attention_backend="_native_cudnn")
    accelerate_transformer(tr, m, QWEN_IMAGE_FP8, compute_dtype=torch.bfloat16)
    params = [p for n, p in tr.named_parameters() if "lora_" in n]

    def fn(x, ctx, mask):
        with compute_autocast(torch.bfloat16, dev, cache=False):
            return tr(hidden_states=x, timestep=torch.full((1,), 0.5, device=dev, dtype=torch.bfloat16),
                      encoder_hidden_states=ctx, encoder_hidden_states_mask=mask, img_shapes=[[(1, 64, 64)]],
                      return_dict=False)[0]

    def inputs(text):
        return (torch.randn(1, 4096, 64, device=dev, dtype=torch.bfloat16),
                torch.randn(1, text, 3584, device=dev, dtype=torch.bfloat16))

    return fn, params, lambda: [t for t in (*tr.parameters(), *tr.buffers()) if not t.requires_grad], inputs


def _extra_op(op, width, dev, torch):
    """The part of the step ``--op`` adds after the Linear stack (identity for ``linear``)."""
    import torch.nn.functional as F

    if op in ("sdpa_cudnn", "sdpa_flash"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        which = SDPBackend.CUDNN_ATTENTION if op == "sdpa_cudnn" else SDPBackend.FLASH_ATTENTION

        def attend(h):
            b, n, d = h.shape
            q = h.view(b, n, d // 128, 128).transpose(1, 2)
            with sdpa_kernel([which]):
                o = F.scaled_dot_product_attention(q, q * 0.5, q, scale=128 ** -0.5)
            return h + o.transpose(1, 2).reshape(b, n, d)
        return attend
    if op == "scaled_mm":
        w = (torch.randn(width, width, device=dev) * 0.02).to(torch.float8_e4m3fn)
        scale = torch.ones(width, 1, device=dev)

        def fp8(h):
            flat = h.reshape(-1, width)
            amax = flat.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-6)
            xs = (flat.float() * (448.0 / amax)).to(torch.float8_e4m3fn)
            y = torch._scaled_mm(xs, w.T, scale_a=amax / 448.0, scale_b=scale.T, out_dtype=torch.bfloat16)
            return h + y.view_as(h)
        return fp8
    if op == "compiled":
        block = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, width), torch.nn.GELU()).to(
            dev, torch.bfloat16).requires_grad_(False)
        return torch.compile(lambda h: h + block(h), fullgraph=True)
    if op == "big":  # ~8 GiB kept for the backward: graph memory nodes at the scale of a DiT's activations
        def big(h):
            b, n, d = h.shape
            wide = torch.tanh(h.repeat(1, 16, 64) * 1.01)  # (b, 16 n, 64 d), kept for the backward
            return h + wide.view(b, 16, n, 64, d).mean(dim=(1, 3))
        return big
    return lambda h: h


if __name__ == "__main__":
    sys.exit(main())
