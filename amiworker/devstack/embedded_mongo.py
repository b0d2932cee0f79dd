"""nx-27017, a MongoDB wire-protocol server backed by SQLite, as a child process.

No MongoDB server can be installed on the machines that run the tests and the
demo, so they start ``nx-27017`` (PyPI) on a free loopback port instead: a real
process speaking the real protocol. Every blocking method has an ``a``-prefixed
twin that waits with ``asyncio.sleep``, so an async test can stop or restart
the server while its event loop keeps running.

The server keeps one SQLite file per logical database under ``<data_dir>/db``
(``--data-dir``). Its single-file mode (``--db FILE``) shares collections
between database names, which would make per-test databases see each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import pymongo
from pymongo.errors import PyMongoError

__all__ = ["EmbeddedMongo", "EmbeddedMongoError", "find_executable", "free_port"]

EXECUTABLE = "nx-27017"
_POLL = 0.02  # seconds between readiness probes
_PORT_ATTEMPTS = 5  # a free port can be taken by someone else before the server binds it
_LOG_TAIL_LINES = 15


_PROBE_OPTIONS: dict[str, Any] = {
    "serverSelectionTimeoutMS": 500,
    "connectTimeoutMS": 500,
    "socketTimeoutMS": 2000,
}


def _pid_of(server_status: dict[str, Any]) -> int:
    pid = server_status.get("pid")
    return int(pid) if pid is not None else -1  # a server without pid: trust the port


class EmbeddedMongoError(RuntimeError):
    """The embedded server could not be found, started or stopped."""


class _PortTaken(EmbeddedMongoError):
    """Our server could not bind its port (someone else holds it)."""


def find_executable() -> Path:
    """``nx-27017`` next to the running interpreter (its venv), else on PATH."""
    beside = Path(sys.executable).parent / EXECUTABLE
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(EXECUTABLE)
    if found is None:
        raise EmbeddedMongoError(
            f"{EXECUTABLE} not found next to {sys.executable} or on PATH; "
            f"install it with: pip install {EXECUTABLE}"
        )
    return Path(found)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedMongo:
    """One nx-27017 server process with its data, log and pid file in ``data_dir``.

    >>> with EmbeddedMongo(tmp_path) as mongo:
    ...     client = pymongo.MongoClient(mongo.uri)
    """

    host = "127.0.0.1"

    def __init__(
        self, data_dir: Path, port: int | None = None, *, start_timeout: float = 30.0
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.start_timeout = start_timeout
        self._fixed_port = port is not None
        self._process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    # -- paths -----------------------------------------------------------------

    @property
    def uri(self) -> str:
        if self.port is None:
            raise EmbeddedMongoError("the embedded MongoDB has no port before start()")
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "nx-27017.log"

    @property
    def output_file(self) -> Path:
        """stdout and stderr of the process (tracebacks land here, not in the log)."""
        return self.data_dir / "nx-27017.out"

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- start -----------------------------------------------------------------

    def start(self) -> EmbeddedMongo:
        """Start the server and return once it answers ``ping``."""
        attempts = self._prepare()
        for attempt in range(attempts):
            self._spawn()
            try:
                deadline = time.monotonic() + self.start_timeout
                while not self._ready(self._probe(), deadline):
                    time.sleep(_POLL)
                self._fixed_port = True  # a later start() or restart() keeps this port
                return self
            except _PortTaken:
                self._reap()
                if attempt + 1 == attempts:
                    raise
            except BaseException:
                self._reap()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def astart(self) -> EmbeddedMongo:
        """:meth:`start` without blocking the event loop while waiting."""
        attempts = self._prepare()
        for attempt in range(attempts):
            self._spawn()
            try:
                deadline = time.monotonic() + self.start_timeout
                # Polling: the process is a Popen child, not an asyncio one.
                while not self._ready(await self._aprobe(), deadline):  # noqa: ASYNC110
                    await asyncio.sleep(_POLL)
                self._fixed_port = True  # a later start() or restart() keeps this port
                return self
            except _PortTaken:
                self._reap()
                if attempt + 1 == attempts:
                    raise
            except BaseException:
                self._reap()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _prepare(self) -> int:
        """How many ports to try: one when the port was given, a few when we pick it."""
        if self.running:
            raise EmbeddedMongoError(f"the embedded MongoDB is already running on {self.uri}")
        return 1 if self._fixed_port else _PORT_ATTEMPTS

    def _spawn(self) -> None:
        if not self._fixed_port:
            self.port = free_port(self.host)
        (self.data_dir / "db").mkdir(parents=True, exist_ok=True)
        command = [
            str(find_executable()),
            "--data-dir",
            str(self.data_dir / "db"),
            "--host",
            self.host,
            "-p",
            str(self.port),
            "--pid-file",
            str(self.data_dir / "nx-27017.pid"),
            "--log-file",
            str(self.log_file),
        ]
        self._output = self.output_file.open("ab")
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, not it
        )

    def _ready(self, answering_pid: int | None, deadline: float) -> bool:
        """True once *our* process answers; raises when it never will."""
        assert self._process is not None
        if self._process.poll() is not None:
            if "address already in use" in self._tail(self.output_file).lower():
                raise _PortTaken(self._failure(f"port {self.port} is already in use"))
            raise EmbeddedMongoError(
                self._failure(f"exited with status {self._process.returncode} while starting")
            )
        if answering_pid is not None and answering_pid != self._process.pid:
            # Someone else's server answers on this port; ours will fail to bind.
            raise _PortTaken(
                self._failure(f"port {self.port} is already in use (pid {answering_pid})")
            )
        if answering_pid is not None:
            return True
        if time.monotonic() > deadline:
            raise EmbeddedMongoError(
                self._failure(f"did not answer ping within {self.start_timeout:g}s")
            )
        return False

    def _probe(self) -> int | None:
        """The pid of the server answering on our port, None while none answers."""
        if not self._port_open():
            return None
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            self.uri, **_PROBE_OPTIONS
        )
        try:
            client.admin.command("ping")
            return _pid_of(client.admin.command("serverStatus"))
        except PyMongoError:
            return None
        finally:
            client.close()

    async def _aprobe(self) -> int | None:
        if not await self._aport_open():
            return None
        client: pymongo.AsyncMongoClient[dict[str, Any]] = pymongo.AsyncMongoClient(
            self.uri, **_PROBE_OPTIONS
        )
        try:
            await client.admin.command("ping")
            return _pid_of(await client.admin.command("serverStatus"))
        except PyMongoError:
            return None
        finally:
            await client.close()

    def _port_open(self) -> bool:
        # A refused loopback connect fails at once, where a MongoClient would
        # keep retrying until its server selection timeout.
        assert self.port is not None
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0):
                return True
        except OSError:
            return False

    async def _aport_open(self) -> bool:
        assert self.port is not None
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), timeout=1.0
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    def _failure(self, what: str) -> str:
        tail = self._tail(self.output_file) or self._tail(self.log_file) or "(no output)"
        return f"{EXECUTABLE} on {self.host}:{self.port} {what}; last output:\n{tail}"

    @staticmethod
    def _tail(path: Path) -> str:
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    # -- stop ------------------------------------------------------------------

    def stop(self, grace: float = 10.0) -> None:
        """Terminate (SIGTERM) and wait; SIGKILL if it does not exit within ``grace``."""
        self._signal(signal.SIGTERM)
        if not self._wait(grace):
            self.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL and wait: the crash of a MongoDB server, for outage tests."""
        self._signal(signal.SIGKILL)
        if not self._wait(10.0):
            raise EmbeddedMongoError(f"{EXECUTABLE} pid {self.pid} survived SIGKILL")
        self._reap()

    async def astop(self, grace: float = 10.0) -> None:
        """:meth:`stop` without blocking the event loop."""
        self._signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await self._exited()
        except TimeoutError:
            await self.akill()
        self._reap()

    async def akill(self) -> None:
        """:meth:`kill` without blocking the event loop."""
        self._signal(signal.SIGKILL)
        try:
            async with asyncio.timeout(10.0):
                await self._exited()
        except TimeoutError:
            raise EmbeddedMongoError(f"{EXECUTABLE} pid {self.pid} survived SIGKILL") from None
        self._reap()

    def _signal(self, signum: signal.Signals) -> None:
        if self.running:
            assert self._process is not None
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signum)

    def _wait(self, timeout: float) -> bool:
        if self._process is None:
            return True
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    async def _exited(self) -> None:
        # Polling: the process is a Popen child, not an asyncio one.
        while self.running:  # noqa: ASYNC110
            await asyncio.sleep(_POLL)

    def _reap(self) -> None:
        """Forget an exited (or to be abandoned) process and close its output file."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None
        if self._output is not None:
            self._output.close()
            self._output = None

    # -- context managers ----------------------------------------------------------

    def __enter__(self) -> EmbeddedMongo:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedMongo:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<EmbeddedMongo {self.host}:{self.port} {state} data_dir={self.data_dir}>"
