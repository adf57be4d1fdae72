"""Full-scale check: what the training node trains against equals what ComfyUI conditions on.

For a prompt with the token, ComfyUI's own conditioning (Load Placeholder Archive -> Register Zero-Prior Token ->
CLIPTextEncode) must equal the conditioning the training node computes and differentiates (the pack's decoder
over the same loaded modules, ``nodes/comfy_text.py``); the CPU tests check it on a tiny text encoder, this
script on a full-size one (ComfyUI's file layouts: ``qwen_2.5_vl_7b_fp8_scaled`` or bf16, as
``make_weights.py te`` writes them with random weights). It runs a real ComfyUI with the pack installed and the
test harness's output nodes (``tests/comfy_harness/tiny_qwen_patch.py``; at full size its patches pass
through), on the CPU (the harness starts ComfyUI with ``--cpu``; 16 GB of memory for the 7B fp8-scaled encoder), and
writes JSON: the maximum relative difference, the shapes, and that the vector's gradient is finite and non-zero.

    python bench/comfyui/make_weights.py te --dtype fp8_scaled /tmp/zp-full/qwen_2.5_vl_7b_fp8_scaled.safetensors
    python -m bench.comfyui.cond_equality --comfyui ~/ComfyUI --te /tmp/zp-full/qwen_2.5_vl_7b_fp8_scaled.safetensors \\
        --out cond.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TEXT = "a photo of <zwx> on a wooden table, studio light"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", type=Path, required=True, help="ComfyUI work tree")
    p.add_argument("--te", type=Path, required=True, help="a full-size Qwen-Image text encoder file (ComfyUI layout)")
    p.add_argument("--text", default=TEXT, help="the prompt (with <zwx>)")
    p.add_argument("--vector-std", type=float, default=0.02,
                   help="the token's vector: random normal with this std (a trained vector's scale)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max relative difference that passes")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if not a.te.is_file():
        raise SystemExit(f"--te {a.te}: no such file (write one with bench/comfyui/make_weights.py te)")
    harness = str(REPO / "tests")  # the integration tests' ComfyUI harness
    if harness not in sys.path:
        sys.path.insert(0, harness)
    from comfy_harness.server import ComfyServer, install_pack
    from comfy_harness.weights import make_archive
    from safetensors.torch import load_file

    from qwen_zero_prior.training.archive import load_archive

    width = _embed_width(a.te)
    vector = torch.randn(width, generator=torch.Generator().manual_seed(0)) * a.vector_std
    result: dict = {"te": a.te.name, "text": a.text, "width": width, "vector_std": a.vector_std}
    base = Path(tempfile.mkdtemp(prefix="zp-cond-"))
    server = None
    try:
        for d in ("custom_nodes", "input", "output", "user", "models/text_encoders", "models/zero_prior"):
            (base / d).mkdir(parents=True)
        install_pack(base / "custom_nodes")
        shutil.copy(REPO / "tests" / "comfy_harness" / "tiny_qwen_patch.py",
                    base / "custom_nodes" / "zz_zp_harness.py")
        (base / "models" / "text_encoders" / a.te.name).symlink_to(a.te.resolve())
        make_archive(base / "models" / "zero_prior" / "full.zip", vector=vector)
        server = ComfyServer(base, root=a.comfyui)
        server.start(timeout=600)
        clip = {"class_type": "CLIPLoader",
                "inputs": {"clip_name": a.te.name, "type": "qwen_image", "device": "default"}}
        arc = {"class_type": "ZeroPriorLoadArchive", "inputs": {"archive": "full.zip", "path": ""}}
        t0 = time.time()
        server.run({"2": clip, "4": arc,
                    "5": {"class_type": "ZeroPriorRegisterToken", "inputs": {"clip": ["2", 0], "archive": ["4", 0]}},
                    "8": {"class_type": "CLIPTextEncode", "inputs": {"text": a.text, "clip": ["5", 0]}},
                    "20": {"class_type": "ZPTestSaveConditioning",
                           "inputs": {"conditioning": ["8", 0], "filename": "comfy.safetensors"}}}, timeout=3600)
        result["comfy_s"] = round(time.time() - t0, 1)
        t0 = time.time()
        server.run({"2": clip, "4": arc,
                    "9": {"class_type": "ZPTestTrainingConditioning",
                          "inputs": {"clip": ["2", 0], "archive": ["4", 0], "text": a.text,
                                     "filename": "train.safetensors"}}}, timeout=3600)
        result["train_path_s"] = round(time.time() - t0, 1)
        ref = load_file(str(base / "output" / "comfy.safetensors"))["cond"][0]
        got = load_file(str(base / "output" / "train.safetensors"))
        cond, grad = got["cond"][0], got["grad"]
        result.update(
            comfy_shape=list(ref.shape), train_shape=list(cond.shape),
            max_rel_diff=float((cond - ref).abs().max() / ref.abs().max()) if cond.shape == ref.shape else None,
            grad_finite=bool(torch.isfinite(grad).all()), grad_norm=float(grad.norm()),
            vector_in_archive=bool(torch.equal(load_archive(base / "models" / "zero_prior" / "full.zip").vector,
                                               vector)))
        result["pass"] = bool(result["max_rel_diff"] is not None and result["max_rel_diff"] < a.tolerance
                              and result["grad_finite"] and result["grad_norm"] > 0)
    except (RuntimeError, TimeoutError, KeyError, OSError) as e:  # a failed prompt or file: the report says which
        result.update({"pass": False, "error": f"{type(e).__name__}: {e}"[-3000:]})
    finally:
        if server is not None:
            server.stop()  # also after a start that timed out (the process may still run)
            result["log_tail"] = server.log_text()[-4000:]
        shutil.rmtree(base, ignore_errors=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}, indent=1))
    return 0 if result["pass"] else 1


def _embed_width(path: Path) -> int:
    """The hidden size from the file's header (no tensor read)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return int(f.get_slice("model.embed_tokens.weight").get_shape()[1])


if __name__ == "__main__":
    sys.exit(main())
