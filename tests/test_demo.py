import subprocess
import sys
import time

from PIL import Image


def test_demo_offline_under_60s(tmp_path):
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "qwen_zero_prior.cli", "demo", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "archive:" in proc.stdout and (tmp_path / "weights.zip").is_file()
    assert Image.open(tmp_path / "demo.png").size == (64, 64)
    assert (tmp_path / "weights_loss.png").is_file()
    assert elapsed < 60, f"demo took {elapsed:.1f} s"


def test_demo_family_qwen_image_21(tmp_path):
    """``demo --family qwen-image-2.1``: the tiny Qwen-Image 2.1 (real classes) trained and sampled offline."""
    import json
    import os
    import zipfile

    proc = subprocess.run(
        [sys.executable, "-m", "qwen_zero_prior.cli", "demo", "--family", "qwen-image-2.1", "--steps", "20",
         "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained token id 151669;" in proc.stdout  # Qwen3-VL's tokenizer: four more tokens than Qwen-Image's
    meta = json.loads(zipfile.ZipFile(tmp_path / "weights.zip").read("meta.json"))
    assert meta["model_family"] == "qwen-image-2.1" and meta["steps"] == 20
    assert meta["base_model"] == str(tmp_path / "tiny-qwen-image-2.1")
    assert json.loads((tmp_path / "tiny-qwen-image-2.1" / "model_index.json").read_text())["_class_name"] == \
        "QwenImage21Pipeline"
    img = Image.open(tmp_path / "demo.png")
    assert img.size == (64, 64) and img.mode == "RGBA"  # 2.1's VAE decodes RGBA
    bad = subprocess.run([sys.executable, "-m", "qwen_zero_prior.cli", "demo", "--family", "flux"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'flux'" in bad.stderr
