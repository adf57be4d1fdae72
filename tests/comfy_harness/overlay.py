"""Run several ComfyUI versions from one test venv: each tree's requirements that the venv does not satisfy
(e.g. 0.3.64 pins comfyui-frontend-package 1.27.10 and comfyui-workflow-templates 0.1.95, whose layout differs
from 0.33's) are installed into ``<tree>/.zp-overlay``, which the harness puts first on that server's
``PYTHONPATH``. A real install has one ComfyUI per environment; this keeps the tests' single venv honest to that.

    python tests/comfy_harness/overlay.py TREE [TREE ...]     # builds each overlay, prints what it holds
    python tests/comfy_harness/overlay.py --newest TREE ...   # prints the tree with the newest ComfyUI
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

OVERLAY = ".zp-overlay"


def comfyui_version(tree: Path) -> str:
    """The ``__version__`` in ``comfyui_version.py`` (``"unknown"`` if absent)."""
    f = Path(tree) / "comfyui_version.py"
    if f.is_file():
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def version_key(v: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in v.split("."))


def unsatisfied(tree: Path) -> list[str]:
    """Requirement lines of ``tree``'s requirements.txt that the running environment does not satisfy."""
    from packaging.requirements import InvalidRequirement, Requirement

    out = []
    for line in (Path(tree) / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        if req.name.lower() in ("torch", "torchvision", "torchaudio"):  # the venv's torch is the one to test
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            out.append(line)
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            out.append(line)
    return out


def build(tree: Path) -> list[str]:
    """Install what ``tree`` needs beyond the venv into its overlay (no dependencies: the venv has them)."""
    tree = Path(tree)
    need = unsatisfied(tree)
    target = tree / OVERLAY
    stamp = target / ".requirements"
    if need and not (stamp.is_file() and stamp.read_text() == "\n".join(need)):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--upgrade", "--target", str(target), *need], check=True)
        stamp.write_text("\n".join(need))
    return need


if __name__ == "__main__":
    if sys.argv[1:2] == ["--newest"]:
        print(max(sys.argv[2:], key=lambda t: version_key(comfyui_version(Path(t)))))
        sys.exit(0)
    for arg in sys.argv[1:]:
        held = build(Path(arg))
        print(f"{arg} (ComfyUI {comfyui_version(Path(arg))}): overlay {', '.join(held) if held else 'empty'}")
