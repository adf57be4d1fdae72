"""A real headless ComfyUI for integration tests: sandboxed base directory, this pack installed the way
ComfyUI Manager installs it, tiny Qwen-Image weights in its model folders, API-format graphs via /prompt."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

from server_process import LoggedProcess, free_port

from .overlay import OVERLAY

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PACK_DIR_NAME = "comfyui-qwen-zero-prior"  # any folder name must work; Manager uses the repo's name


def comfyui_path() -> Path:
    return Path(os.environ.get("COMFYUI_PATH", "~/ComfyUI")).expanduser()


def comfyui_paths() -> list[Path]:
    """The ComfyUI work trees to test against: ``COMFYUI_PATHS`` (separated by ``os.pathsep``), else
    ``COMFYUI_PATH`` (default ``~/ComfyUI``)."""
    raw = os.environ.get("COMFYUI_PATHS")
    paths = [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()] if raw else [comfyui_path()]
    return list(dict.fromkeys(paths))


def comfyui_trees() -> tuple[list[Path], list[str]]:
    """(trees that exist, one loud line for each one that does not)."""
    found, missing = [], []
    for p in comfyui_paths():
        if (p / "main.py").is_file():
            found.append(p)
        else:
            missing.append(f"ComfyUI NOT FOUND at {p}: its real-ComfyUI integration tests are SKIPPED. Set "
                           "COMFYUI_PATH (or COMFYUI_PATHS for several versions) to a ComfyUI work tree prepared "
                           "with ../shared/tools/comfyui-setup")
    return found, missing


def comfyui_available() -> tuple[bool, str]:
    found, missing = comfyui_trees()
    return bool(found), "; ".join(missing) or ", ".join(map(str, found))


def install_pack(custom_nodes: Path, name: str = PACK_DIR_NAME) -> Path:
    """Copy the checkout's tracked (and not-ignored) files, as a git clone would, then pip install -r."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    dest = custom_nodes / name
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                    str(dest / "requirements.txt")], check=True, capture_output=True)
    return dest


class ComfyServer(LoggedProcess):
    def __init__(self, base: Path, port: int | None = None, root: Path | None = None):
        self.root = Path(root) if root is not None else comfyui_path()
        self.base = Path(base)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "comfyui.log"
        self.client_id = uuid.uuid4().hex

    # -- lifecycle --
    def start(self, timeout: float = 180, extra_args: tuple[str, ...] = (), env: dict | None = None) -> ComfyServer:
        """Start ComfyUI (``--cpu``, sandboxed base directory) with ``extra_args`` on its command line and ``env``
        over this process's environment."""
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch", "--preview-method", "none", *extra_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
        overlay = self.root / OVERLAY  # this version's own pins where the shared test venv differs (overlay.py)
        if overlay.is_dir():
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(overlay), env.get("PYTHONPATH", "")]))
        self.spawn(cmd, self.root, env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log_text()[-4000:]}")


    # -- API --
    def get(self, path: str, **kw):
        return requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def object_info(self) -> dict:
        return self.get("/object_info").json()

    def queue(self, graph: dict) -> requests.Response:
        return requests.post(self.url + "/prompt", json={"prompt": graph, "client_id": self.client_id}, timeout=30)

    def run(self, graph: dict, timeout: float = 300) -> dict:
        """Queue and wait; returns the /history entry (raises with ComfyUI's error on failure)."""
        r = self.queue(graph)
        if r.status_code != 200:
            raise PromptRejected(r.status_code, r.json())
        return self.wait(r.json()["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout: float = 300, allow_error: bool = False) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.get(f"/history/{prompt_id}").json()
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                entry = h[prompt_id]
                status = entry["status"]
                if status.get("status_str") == "error" and not allow_error:
                    raise PromptFailed(entry, self.log_text()[-3000:])
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} not finished in {timeout} s:\n{self.log_text()[-3000:]}")

    def free_memory(self) -> None:
        """ComfyUI's /free: unload models and drop cached node outputs before the next prompt runs."""
        r = requests.post(self.url + "/free", json={"unload_models": True, "free_memory": True}, timeout=10)
        r.raise_for_status()

    def interrupt(self) -> None:
        requests.post(self.url + "/interrupt", timeout=10)


class PromptRejected(RuntimeError):
    def __init__(self, status: int, body: dict):
        super().__init__(f"/prompt answered {status}: {json.dumps(body)[:2000]}")
        self.status, self.body = status, body


class PromptFailed(RuntimeError):
    def __init__(self, entry: dict, log: str):
        msgs = [m for m in entry.get("status", {}).get("messages", []) if m[0] == "execution_error"]
        self.error = msgs[0][1] if msgs else {}
        super().__init__(f"prompt failed: {self.error.get('exception_type')}: {self.error.get('exception_message')}\n{log}")


def execution_error(entry: dict) -> dict:
    msgs = [m for m in entry.get("status", {}).get("messages", []) if m[0] == "execution_error"]
    return msgs[0][1] if msgs else {}
