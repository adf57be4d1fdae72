"""What the ComfyUI and Cog test harnesses share: a free loopback port and a logged server subprocess."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoggedProcess:
    """A server subprocess whose output goes to ``log_path``; ``stop()`` terminates, then kills."""

    log_path: Path
    proc: subprocess.Popen | None = None

    def spawn(self, cmd: list[str], cwd, env: dict) -> subprocess.Popen:
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        return self.proc

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "log", None):
            self.log.close()
