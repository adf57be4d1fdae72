"""The README's offline block, run as it is: the demo, training on the demo's tiny model, predict.

What the demo produces is asserted here; how long it takes is not (bench/bench_demo.py reports that).
"""

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from PIL import Image

from conftest import REPO

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(heading, 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S)[1]


def _meta(archive: Path) -> dict:
    return json.loads(zipfile.ZipFile(archive).read("meta.json"))


def test_readme_offline_block_demo_train_predict(tmp_path):
    block = _readme_block("### Training offline on the demo's model")
    assert block.startswith("qwen-zero-prior demo\n") and "qwen-zero-prior train" in block
    proc = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, env=OFFLINE, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr

    demo = tmp_path / "demo-output"
    assert "archive:" in proc.stdout and (demo / "weights.zip").is_file()
    assert Image.open(demo / "demo.png").size == (64, 64)
    assert (demo / "weights_loss.png").is_file()
    base = Path(_meta(demo / "weights.zip")["base_model"])
    assert base.is_absolute() and base == demo / "tiny-qwen-image" and (base / "model_index.json").is_file()

    run = tmp_path / "my-run"
    meta = _meta(run / "weights.zip")
    assert meta["steps"] == 50 and meta["placeholder_token"] == "<zwx>" and meta["base_model"] == str(base)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000025", "step-000050"]
    assert Image.open(run / "zwx.png").size == (64, 64)

    # the demo's archive names its model absolutely: predict works from any folder, offline
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run(["qwen-zero-prior", "predict", "--archive", "../demo-output/weights.zip", "--prompt",
                          "a photo of <zwx>", "--dtype", "float32", "--device", "cpu", "--width", "64", "--height",
                          "64", "--steps", "2", "--guidance", "1", "--output", "img.png"],
                         cwd=elsewhere, env=OFFLINE, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert Image.open(elsewhere / "img.png").size == (64, 64)


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
