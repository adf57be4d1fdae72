"""The training node at full Qwen-Image scale in a real ComfyUI on a GPU, driven through ``/prompt``.

Starts ``main.py`` of the given ComfyUI on the GPU with its defaults (dynamic VRAM where the version has it),
optionally under a hard per-process memory cap set before anything touches CUDA (``sitecustomize``) plus
``--reserve-vram`` so ComfyUI's own planner sees the capped size, installs this pack into ``custom_nodes/`` as
ComfyUI Manager does, writes a dataset of random 1024² images, queues
``example_workflows/qwen_zero_prior_train_api.json`` (train, then sample with the result in the same graph) and
reports s/step (median after the first), time to the first step, peak VRAM, the loss curve and that the sampler
ran, as JSON.

    python bench/comfyui/run_node.py --comfyui /tmp/comfyui-0.33 --models /tmp/zp-models \\
        --dit qwen_image_fp8_e4m3fn.safetensors --te qwen_2.5_vl_7b_fp8_scaled.safetensors \\
        --vae qwen_image_vae.safetensors --cap-gib 78 --steps 12 --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_FILES = ("__init__.py", "pyproject.toml", "requirements.txt", "README.md", "nodes", "training", "web",
              "example_workflows")

SITECUSTOMIZE = '''# written by bench/comfyui/run_node.py: a hard memory cap before anything else touches CUDA
import os
_cap = float(os.environ.get("ZP_CAP_GIB") or 0)
if _cap:
    import torch
    _total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, _cap * 2**30 / _total), 0)
'''


# a smaller card, emulated physically: a second process takes all but ``card`` GiB of the GPU's free memory and holds
# it, so every allocator in ComfyUI's process (PyTorch's, comfy-aimdo's dynamic VRAM, cuBLAS/cuDNN workspaces) meets
# the same wall a real card has; the per-process cap (--cap-gib) bounds PyTorch's allocator only
BLOCKER = '''import sys, torch
free, _ = torch.cuda.mem_get_info(0)
keep = int(float(sys.argv[1]) * 2**30)
if free < keep:
    print(f"blocker: FAILED: {free / 2**30:.2f} GiB free, less than the {keep / 2**30:.2f} GiB card asked for", flush=True)
    sys.exit(1)
held = torch.empty(free - keep, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print(f"blocker: holds {held.numel() / 2**30:.2f} GiB, {torch.cuda.mem_get_info(0)[0] / 2**30:.2f} GiB left free",
      flush=True)
sys.stdin.read()  # until the parent closes the pipe: killed, or its process gone, the memory is given back
'''


def start_blocker(card_gib: float):
    """The BLOCKER process for a ``card_gib`` card, once it holds its memory; returns (process, its report line).
    It exits when this process closes its stdin (or dies); a failure raises with what it printed."""
    proc = subprocess.Popen([sys.executable, "-c", BLOCKER, str(card_gib)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # (warnings from imports may come first)
        seen.append(line.rstrip())
        if line.startswith("blocker: holds"):
            return proc, line.strip()
        if line.startswith("blocker: FAILED"):
            break
    proc.kill()
    rest, _ = proc.communicate(timeout=30)
    tail = "\n".join(seen + (rest or "").splitlines())[-2000:]
    raise RuntimeError(f"the memory blocker for --card-gib {card_gib} failed (exit {proc.returncode}): {tail}")


def stop_blocker(proc) -> None:
    proc.stdin.close()  # its read returns: it exits and its memory is freed
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


class Stopped(BaseException):
    """SIGTERM (``timeout``'s) while ComfyUI runs: reported as the row's error, then ComfyUI is stopped."""


def _stop(signum, frame):
    raise Stopped(f"stopped by signal {signum} (the run's timeout)")


def install_pack(custom_nodes: Path) -> Path:
    dest = custom_nodes / "comfyui-qwen-zero-prior"
    dest.mkdir(parents=True, exist_ok=True)
    for name in PACK_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.is_file():
            shutil.copy2(src, dest / name)
    return dest


def make_dataset(folder: Path, n: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        base = np.stack([xx, yy, (xx + yy) / 2], -1) * rng.uniform(0.3, 1.0, 3)
        img = (np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:02d}.png")
        (folder / f"img_{i:02d}.txt").write_text(f"a photo of <zwx> number {i} on a table", encoding="utf-8")


class GpuMemoryPoller:
    """Peak device memory in use (``nvidia-smi``): what the whole process holds, whichever allocator (ComfyUI >= 0.33's
    dynamic VRAM allocates outside PyTorch's caching allocator, so ``torch.cuda.max_memory_*`` miss most of it)."""

    def __init__(self, interval: float = 0.5):
        import threading

        self.interval, self.peak_mib, self.samples = interval, 0, 0
        self.baseline_mib = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _read() -> int:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=10).stdout
            return int(out.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return -1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            used = self._read()
            if used >= 0:
                self.peak_mib, self.samples = max(self.peak_mib, used), self.samples + 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def report(self) -> dict:
        if self.samples == 0:
            return {}
        # above the baseline: what ComfyUI's process added (with --card-gib, what it took of the emulated card)
        return {"device_peak_used_gib": round(self.peak_mib / 1024, 1),
                "device_baseline_used_gib": round(self.baseline_mib / 1024, 1),
                "device_peak_above_baseline_gib": round((self.peak_mib - self.baseline_mib) / 1024, 1)}


def node_inputs(spec: str, defaults: dict | None = None) -> dict:
    """``compile=1,rank=16`` -> {"compile": True, "rank": 16}: each value typed as the input's value in
    ``defaults`` (the example workflow's Train node: 1/0 and true/false for a boolean, int, float, string); an input
    not there is a boolean for true/false, else a number where it parses, else a string."""
    out = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise SystemExit(f"--node-inputs: {item!r} is not name=value")
        low, like = value.lower(), (defaults or {}).get(name)
        if isinstance(like, bool) or (like is None and low in ("true", "false")):
            if low not in ("1", "true", "0", "false"):
                raise SystemExit(f"--node-inputs: {name} is a boolean (1/0, true/false), got {value!r}")
            out[name] = low in ("1", "true")
        elif isinstance(like, str):
            out[name] = value
        else:
            try:
                out[name] = int(value)
            except ValueError:
                try:
                    out[name] = float(value)
                except ValueError:
                    out[name] = value
    return out


def graph_counts(log: str) -> dict[str, int]:
    """How many CUDA-graph pairs the node captured (text encoder and DiT engine, ``training/graphs.py`` and
    ``suffix.py``) and how many captures failed, from its log."""
    lines = log.splitlines()
    return {
        "text_graph_captures": sum("text encoder: captured forward+backward CUDA graphs" in ln for ln in lines),
        "dit_graph_captures": sum("DiT engine: captured forward+backward CUDA graphs" in ln for ln in lines),
        "graph_capture_failures": sum("CUDA graph capture failed" in ln for ln in lines),
    }


def kernel_table(log: str) -> list[str]:
    """The node's logged kernel table (``kernels of N profiled steps ...`` and the table's lines under it)."""
    lines = log.splitlines()
    start = next((i for i, line in enumerate(lines) if "kernels of " in line and "profiled steps" in line), None)
    if start is None:
        return []
    ends = [j for j in range(start + 1, len(lines)) if lines[j].startswith("Self CUDA time total")]
    if not ends:
        return lines[start:start + 40]
    end = ends[0]
    # the host-side table follows the kernel table (training/profiling.py) and ends at the next totals
    if len(ends) > 1 and any("host side, by own CPU time" in line for line in lines[ends[0]:ends[1]]):
        end = ends[1]
    return lines[start:end + 1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", type=Path, required=True, help="ComfyUI work tree")
    p.add_argument("--models", type=Path, required=True, help="folder holding the DiT, text encoder and VAE files")
    p.add_argument("--dit", required=True)
    p.add_argument("--te", required=True)
    p.add_argument("--vae", required=True)
    p.add_argument("--weight-dtype", default="default", help="UNETLoader weight_dtype")
    p.add_argument("--work", type=Path, default=Path("/tmp/zp-comfy-run"))
    p.add_argument("--cap-gib", type=float, default=0.0, help="hard per-process GPU memory cap; 0: none")
    p.add_argument("--card-gib", type=float, default=0.0,
                   help="emulate a card with this much free memory: another process holds the rest (BLOCKER); "
                   "no --reserve-vram, no per-process cap; 0: off")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--sample-steps", type=int, default=4)
    p.add_argument("--port", type=int, default=8199)
    p.add_argument("--timeout", type=float, default=1500)
    p.add_argument("--extra-args", default="", help="more ComfyUI arguments, space separated (e.g. --cpu)")
    p.add_argument("--extra-node", type=Path, action="append", default=[],
                   help="a .py file copied into custom_nodes/ too (the CPU smoke test's tiny-model patch)")
    p.add_argument("--node-inputs", default="",
                   help="more inputs of the Train node, e.g. compile=1,rank=16 (comma separated name=value, typed "
                   "as the example workflow's values; 1/0 for booleans)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="profile N steps after the third (torch.profiler, CUDA kernels) and keep the node's kernel "
                   "table in the JSON (the node's QWEN_ZERO_PRIOR_PROFILE_STEPS)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for ComfyUI (e.g. QWEN_ZERO_PRIOR_EXACT_TEXT=1); repeatable")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.card_gib and a.cap_gib:
        raise SystemExit("--card-gib and --cap-gib are two ways to emulate a smaller card: give one")
    if a.card_gib < 0 or a.cap_gib < 0:
        raise SystemExit(f"--card-gib and --cap-gib are GiB of GPU memory (0: off), got {a.card_gib:g} and {a.cap_gib:g}")
    run_env = {}
    for item in a.env:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise SystemExit(f"--env: {item!r} is not NAME=VALUE")
        run_env[name] = value

    import requests

    base = a.work / f"base-{a.cap_gib:g}-{a.card_gib:g}"
    shutil.rmtree(base, ignore_errors=True)
    for d in ("custom_nodes", "input", "output", "user", "models/diffusion_models", "models/text_encoders",
              "models/vae", "stub-frontend", "site"):
        (base / d).mkdir(parents=True, exist_ok=True)
    for sub, name in (("diffusion_models", a.dit), ("text_encoders", a.te), ("vae", a.vae)):
        os.symlink(a.models / name, base / "models" / sub / name)
    (base / "stub-frontend" / "index.html").write_text("<html>headless</html>")
    (base / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    install_pack(base / "custom_nodes")
    for extra in a.extra_node:
        shutil.copy(extra, base / "custom_nodes" / extra.name)
    make_dataset(base / "input" / "zp_gpu_ds", a.images, a.res)

    import torch

    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0.0
    cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(a.port), "--base-directory", str(base),
           "--front-end-root", str(base / "stub-frontend"), "--disable-auto-launch", "--preview-method", "none"]
    if a.cap_gib:
        cmd += ["--reserve-vram", f"{max(0.0, total_gib - a.cap_gib):.1f}"]
    cmd += a.extra_args.split()
    if a.cap_gib and not {"--disable-cuda-malloc", "--fast"} & set(cmd) and "PYTORCH_CUDA_ALLOC_CONF" not in run_env:
        # the cap's sitecustomize touches CUDA before ComfyUI's cuda_malloc.py picks PyTorch's allocator, which would
        # leave the native one: pick what ComfyUI picks by default (cudaMallocAsync on the device's CUDA 13 torch;
        # not with --fast autotune), as users get it
        run_env["PYTORCH_CUDA_ALLOC_CONF"] = "backend:cudaMallocAsync"
    overlay = a.comfyui / ".zp-overlay"  # a version's own pins where the environment differs (tests' overlay.py)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ZP_CAP_GIB": str(a.cap_gib or ""),
           "QWEN_ZERO_PRIOR_PROFILE_STEPS": str(a.profile_steps or ""),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(base / "site"), str(overlay) if overlay.is_dir() else "",
                                                       os.environ.get("PYTHONPATH", "")])), **run_env}
    log_path = base / "comfyui.log"
    url = f"http://127.0.0.1:{a.port}"
    workflow = json.loads((REPO / "example_workflows" / "qwen_zero_prior_train_api.json").read_text())
    extra_inputs = node_inputs(a.node_inputs, workflow["4"]["inputs"])  # typed as the Train node's own inputs
    result: dict = {"node_inputs": extra_inputs, "env": run_env, "cap_gib": a.cap_gib or None,
                    "card_gib": a.card_gib or None, "gpu_total_gib": round(total_gib, 1), "dit": a.dit, "te": a.te,
                    "weight_dtype": a.weight_dtype, "steps": a.steps, "res": a.res, "rank": a.rank,
                    "images": a.images, "command": " ".join(cmd)}
    t_start = time.time()
    # `timeout` stops this script with SIGTERM: end it through the finally below, which stops ComfyUI too (an
    # orphaned server kept the port and the GPU for the next run)
    signal.signal(signal.SIGTERM, _stop)
    blocker = proc = poller = None
    try:
        if a.card_gib:
            blocker, result["blocker"] = start_blocker(a.card_gib)
            print(result["blocker"], flush=True)
        if total_gib:
            poller = GpuMemoryPoller().__enter__()  # its baseline includes the blocker's memory, if any
        proc = subprocess.Popen(cmd, cwd=a.comfyui, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {proc.returncode}")
            try:
                if requests.get(url + "/system_stats", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.time() - t_start > 180:
                raise TimeoutError("ComfyUI did not start in 180 s")
            time.sleep(0.5)
        result["server_start_s"] = round(time.time() - t_start, 1)
        info = requests.get(url + "/object_info/ZeroPriorTrain", timeout=30).json()
        if "ZeroPriorTrain" not in info:
            raise RuntimeError("the pack's nodes are not registered")
        graph = workflow
        graph["1"]["inputs"].update(unet_name=a.dit, weight_dtype=a.weight_dtype)
        graph["2"]["inputs"]["clip_name"] = a.te
        graph["3"]["inputs"]["vae_name"] = a.vae
        graph["4"]["inputs"].update(dataset="zp_gpu_ds", steps=a.steps, resolution=a.res, rank=a.rank,
                                    checkpoint_every=0, output_name="zero_prior/gpu.zip")
        graph["4"]["inputs"].update(extra_inputs)
        for node in graph.values():
            if node["class_type"] == "KSampler":
                node["inputs"]["steps"] = a.sample_steps
            if node["class_type"] in ("EmptySD3LatentImage", "EmptyLatentImage", "EmptyQwenImageLayeredLatentImage"):
                node["inputs"].update(width=a.res, height=a.res)
        t_q = time.time()
        r = requests.post(url + "/prompt", json={"prompt": graph, "client_id": "zp-bench"}, timeout=30)
        if r.status_code != 200:
            raise RuntimeError(f"/prompt answered {r.status_code}: {r.text[:2000]}")
        pid = r.json()["prompt_id"]
        while True:
            h = requests.get(f"{url}/history/{pid}", timeout=30).json()
            if pid in h and h[pid].get("status", {}).get("completed") is not None:
                entry = h[pid]
                break
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {proc.returncode} during the prompt")
            if time.time() - t_q > a.timeout:
                raise TimeoutError(f"prompt not finished in {a.timeout} s")
            time.sleep(1.0)
        result["prompt_s"] = round(time.time() - t_q, 1)
        status = entry["status"]
        result["status"] = status.get("status_str")
        errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
        if errors:
            result["error"] = {k: errors[0].get(k) for k in ("node_type", "exception_type", "exception_message")}
        out = entry.get("outputs", {})
        train = out.get("4", {})
        secs = train.get("step_seconds", [])
        if secs:
            steady = secs[1:] or secs
            result["s_per_step_median"] = round(statistics.median(steady), 3)
            result["first_step_s"] = round(secs[0], 2)
            result["step_seconds"] = [round(x, 3) for x in secs]
        result["time_to_first_step_s"] = (train.get("first_step_seconds") or [None])[0]
        result["peak_vram_gib"] = train.get("peak_vram_gib")
        result["loss"] = train.get("loss")
        result["sampled_images"] = sum(len(v.get("images", [])) for v in out.values())
    except (Exception, Stopped) as e:  # the run is reported as a row, whatever broke
        result["error"] = result.get("error") or {"exception_type": type(e).__name__, "exception_message": str(e)}
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        if poller:
            poller.__exit__(None, None, None)
            result.update(poller.report())
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if blocker is not None:
            stop_blocker(blocker)
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        result["log_tail"] = log[-6000:]
        result.update(graph_counts(log))
        # what the node decided and measured (its per-block recomputation, the median GPU time of its phases)
        result["node_log"] = [line.strip() for line in log.splitlines()
                              if any(k in line for k in ("gradient checkpointing on", "phase times",
                                                         "loading partially", "memory plan", "Traceback", "Error",
                                                         "model.compile", "nference tensors", "DiT engine", "text encoder:",
                                                         "fp8_matmul"))][-12:]
        if a.profile_steps:
            result["kernels"] = kernel_table(log)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))
        # the whole ComfyUI log beside the row (its last 2 M characters)
        a.out.with_name(a.out.name.removesuffix(".json") + ".log").write_text(log[-2_000_000:])
        print(json.dumps({k: v for k, v in result.items() if k not in ("log_tail", "loss")}, indent=1))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
