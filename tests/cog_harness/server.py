"""Cog's own HTTP server (coglet) running predict.py / train.py from the checkout, plus a loopback file server
for the URLs Replicate would pass (dataset, replicate_weights)."""

from __future__ import annotations

import functools
import http.server
import os
import sys
import threading
import time
from pathlib import Path

import requests

from server_process import LoggedProcess, free_port

REPO = Path(__file__).resolve().parents[2]


class FileServer:
    """Serves one folder over http://127.0.0.1:PORT/ (quietly) in a background thread."""

    def __init__(self, root: Path):
        self.root = Path(root)
        handler = functools.partial(_QuietHandler, directory=str(self.root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class CogServer(LoggedProcess):
    def __init__(self, mode: str, env: dict[str, str], log: Path):
        self.mode = mode
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        stub = {"predict": ("COG_PREDICT_TYPE_STUB", "predict.py:Predictor"), "train": ("COG_TRAIN_TYPE_STUB", "train.py:train")}[mode]
        self.env = {**os.environ, **env, "PORT": str(self.port), stub[0]: stub[1], "PYTHONUNBUFFERED": "1",
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.log_path = log

    def start(self, timeout: float = 120) -> CogServer:
        cmd = [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"]
        if self.mode == "train":
            cmd += ["--x-mode", "train"]
        self.spawn(cmd, REPO, self.env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cog server exited {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                r = requests.get(self.url + "/health-check", timeout=2)
                status = r.json().get("status")
                if status == "READY":
                    return self
                if status in ("SETUP_FAILED", "DEFUNCT"):
                    raise RuntimeError(f"cog setup failed: {r.text[-3000:]}")
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"cog server not ready in {timeout} s:\n{self.log_text()[-3000:]}")

    def wait_ready(self, timeout: float = 60) -> None:
        """Until /health-check says READY: a slot frees a moment after the previous response (esp. a failure)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/health-check", timeout=5).json().get("status") == "READY":
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"cog server not READY within {timeout} s:\n{self.log_text()[-3000:]}")

    def post(self, path: str, inputs: dict, timeout: float = 600) -> requests.Response:
        self.wait_ready()
        return requests.post(self.url + path, json={"input": inputs}, timeout=timeout)

