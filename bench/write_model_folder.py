"""A full-size Qwen-Image folder in diffusers layout with random weights (for the real CLI on a GPU machine without
a model hub: speed and memory depend on the shapes, not the values).

    python bench/write_model_folder.py /tmp/qwen-image-random          # bf16, built on the GPU, ~57 GB on disk
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if (a.out / "model_index.json").is_file():
        print(f"{a.out} exists")
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.bench_step import build_pipeline

    t0 = time.time()
    pipe, real = build_pipeline(a.size, torch.device(a.device), torch.bfloat16)
    tmp = a.out.with_name(a.out.name + ".part")
    pipe.save_pretrained(tmp, max_shard_size="10GB")
    tmp.rename(a.out)
    print(f"wrote {a.out} ({'real' if real else 'byte-level'} tokenizer) in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
