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
