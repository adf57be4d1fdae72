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
