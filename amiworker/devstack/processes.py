"""A whole amiworker installation on one machine, as real processes.

The demo, the end-to-end tests and the benchmarks all need the same thing:
an embedded MongoDB (nx-27017), some simulated PBXs and ``amiworker --workers
N``, each a separate process talking over loopback sockets, started and
stopped with deadlines. This module is that, once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from amiworker.ami.message import Message
from amiworker.ami.protocol import Parser, encode_action

__all__ = ["FleetProcess", "SimulatorControl", "SimulatorProcess", "wait_until"]

USERNAME = "amiworker"
SECRET = "demo-secret"  # a simulator's secret, for local use only


def wait_until(predicate: object, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate()`` until true; raise TimeoutError naming ``what`` after ``timeout``."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class SimulatorProcess:
    """``python -m amiworker.sim`` as a child process on a free port."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        calls: int | None = None,
        calls_per_second: float = 0.0,
        duration: float = 1.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.workdir = workdir
        self.record_path = workdir / f"{name}.events"
        self.log_path = workdir / f"{name}.log"
        self._ready = workdir / f"{name}.port"
        self._args = [
            "--name", name,
            "--port", "0",
            "--username", USERNAME,
            "--secret", SECRET,
            "--duration", str(duration),
            "--calls-per-second", str(calls_per_second),
            "--record", str(self.record_path),
            "--ready-file", str(self._ready),
            *(["--calls", str(calls)] if calls is not None else []),
            *extra_args,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 15.0) -> SimulatorProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for stale in (self._ready, self.record_path):
            stale.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "amiworker.sim", *self._args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        process = self.process
        wait_until(
            lambda: self._ready.exists() or process.poll() is not None,
            timeout,
            f"simulator {self.name} to listen",
        )
        if process.poll() is not None:
            raise RuntimeError(f"simulator {self.name} exited: {self.log_path.read_text()[-2000:]}")
        self.port = int(self._ready.read_text())
        return self

    def server_setting(self) -> dict[str, object]:
        """This PBX as an entry of the ``servers`` setting."""
        return {
            "name": self.name,
            "host": "127.0.0.1",
            "port": self.port,
            "username": USERNAME,
            "secret": SECRET,
        }

    def control(self) -> SimulatorControl:
        """A session for the simulator's control actions (SimCalls, SimDropSessions...)."""
        return SimulatorControl(self.port)

    def recorded_events(self) -> list[Message]:
        """Every event the simulator broadcast, in order (read from its record file)."""
        if not self.record_path.exists():
            return []
        return Parser(banner=False).feed(self.record_path.read_bytes())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class SimulatorControl:
    """A blocking AMI session, logged in with events off, for simulator control actions."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._parser = Parser()
        self._messages: list[Message] = []
        self._ids = 0
        reply = self.action("Login", {"Username": USERNAME, "Secret": SECRET, "Events": "off"})
        if reply.name != "Success":
            raise RuntimeError(f"simulator login failed: {reply.get('Message')}")

    def action(self, name: str, headers: dict[str, str | int | float] | None = None) -> Message:
        self._ids += 1
        action_id = f"control-{self._ids}"
        self._sock.sendall(encode_action(name, headers, action_id))
        while True:
            for message in self._messages:
                if message.kind == "response" and message.action_id == action_id:
                    self._messages.remove(message)
                    return message
            data = self._sock.recv(65536)
            if not data:
                raise RuntimeError("the simulator closed the control session")
            self._messages += self._parser.feed(data)

    def close(self) -> None:
        self._sock.close()


class FleetProcess:
    """``amiworker --workers N`` as a child process, configured through the environment."""

    def __init__(
        self,
        workdir: Path,
        *,
        servers: list[dict[str, object]],
        mongo_uri: str,
        database: str,
        workers: int,
        handlers: Sequence[str] = ("handlers",),
        app_dir: Path | None = None,
        extra_env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.log_path = workdir / "amiworker.log"
        self.env = {
            **os.environ,
            "AMIWORKER_SERVERS": json.dumps(servers),
            "AMIWORKER_MONGO_URI": mongo_uri,
            "AMIWORKER_DATABASE": database,
            "AMIWORKER_HANDLERS": ",".join(handlers),
            "AMIWORKER_APP_DIR": str(app_dir or Path.cwd()),
            # Its own spills: a fleet of a test or the demo never drains another's.
            "AMIWORKER_SPILL_DIR": str(workdir / "spill"),
            **(extra_env or {}),
        }
        self.args = ["--workers", str(workers), *extra_args]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> FleetProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "amiworker.cli", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=self.env,
            )
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def worker_pids(self) -> list[int]:
        """The pids of the worker processes (children of the supervisor)."""
        if self.process is None:
            return []
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            pids = [int(pid) for pid in children.read_text().split()]
        except OSError:
            return []
        # The spawn start method adds a resource tracker child; it is no worker.
        return [pid for pid in pids if b"resource_tracker" not in _cmdline(pid)]

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful), then wait; returns the exit status."""
        return stop_process(self.process, timeout, "amiworker")

    def kill(self) -> None:
        """SIGKILL the supervisor if it still runs: a teardown after a failure. Its
        workers get SIGTERM from the kernel (PR_SET_PDEATHSIG) and stop on their own."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float, what: str) -> int:
    """SIGTERM (a graceful stop), then wait; kill it past ``timeout`` and say so."""
    if process is None:
        return 0
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise TimeoutError(f"{what} did not stop within {timeout:g} s") from None


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
