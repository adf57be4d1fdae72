"""Wall time of the offline demo, ``qwen-zero-prior demo``, as a user runs it (fresh process, imports included).

The tests check what the demo produces and never how long it took (a busy CI machine is not a slow demo);
this script measures the time instead, and the README quotes its figure::

    python -m bench.bench_demo                      # one run with the demo's defaults
    python -m bench.bench_demo --repeats 3 --out demo-time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_demo(steps: int) -> float:
    """Seconds for one ``python -m qwen_zero_prior.cli demo`` in a fresh folder, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="qzp-bench-demo-") as out:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "qwen_zero_prior.cli", "demo", "--output", out,
                               "--steps", str(steps)], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0 or not (Path(out) / "weights.zip").is_file():
            raise RuntimeError(f"the demo failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="demo training steps (the demo's default)")
    p.add_argument("--repeats", type=int, default=1, help="runs to time")
    p.add_argument("--out", help="also write the result as JSON here")
    args = p.parse_args(argv)

    import torch

    runs = [run_demo(args.steps) for _ in range(args.repeats)]
    result = {
        "what": "qwen-zero-prior demo, fresh process, offline",
        "steps": args.steps,
        "seconds": [round(s, 2) for s in runs],
        "median_s": round(statistics.median(runs), 2),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "machine": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
