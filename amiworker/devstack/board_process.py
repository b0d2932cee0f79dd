"""``amiworker board`` as a child process, for the demo and the tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from amiworker.devstack.processes import stop_process

__all__ = ["BoardProcess"]

_URL = re.compile(rb"amiworker board: (http://\S+)")


class BoardProcess:
    """``amiworker board --port 0`` (a free port) reading ``database`` at ``mongo_uri``."""

    def __init__(
        self,
        workdir: Path,
        *,
        mongo_uri: str,
        database: str,
        host: str = "127.0.0.1",
        port: int = 0,
        extra_env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.log_path = workdir / "board.log"
        self.env = {
            **os.environ,
            "AMIWORKER_MONGO_URI": mongo_uri,
            "AMIWORKER_DATABASE": database,
            **(extra_env or {}),
        }
        self.args = ["board", "--host", host, "--port", str(port), *extra_args]
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 30.0, *, wait_ready: bool = True) -> BoardProcess:
        """Start it; return once it serves and (``wait_ready``) has read the log
        (``/api/status`` ready)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "amiworker.cli", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=self.env,
            )
        deadline = time.monotonic() + timeout
        while not self.url:
            match = _URL.search(self.log_path.read_bytes())
            if match:
                self.url = match[1].decode().rstrip("/")
            elif self.process.poll() is not None:
                raise RuntimeError(f"amiworker board exited: {self.log_text()[-2000:]}")
            elif time.monotonic() > deadline:
                raise TimeoutError(f"amiworker board did not start within {timeout:g} s")
            else:
                time.sleep(0.05)
        while wait_ready and not self.status().get("ready"):
            if self.process.poll() is not None:
                raise RuntimeError(f"amiworker board exited: {self.log_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"amiworker board did not read the log within {timeout:g} s")
            time.sleep(0.05)
        return self

    def status(self) -> dict[str, Any]:
        """``GET /api/status``, or {} while it does not answer."""
        try:
            with urllib.request.urlopen(self.url + "/api/status", timeout=5) as reply:
                data: dict[str, Any] = json.load(reply)
                return data
        except (OSError, urllib.error.URLError, ValueError):
            return {}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait; returns the exit status."""
        return stop_process(self.process, timeout, "amiworker board")
