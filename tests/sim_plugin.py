"""Fixtures that start the simulated PBX, in-process or as a real process.

``fake_pbx``            a started :class:`FakePBX` on a free loopback port.
``fake_pbx_factory``    ``await fake_pbx_factory(**options)`` for more, or other options.
``pbx_process_factory`` ``await pbx_process_factory(*cli_args)``: ``python -m
                        amiworker.sim`` as a child process, ready to connect.
``raw_ami``             ``await raw_ami(port)``: a logged-out :class:`RawAMI` client.

:class:`RawAMI` is a deliberately tiny client (a socket and the sans-IO
Parser) so that tests of the simulator, and tests that need to poke a
simulator process (``await client.action("SimDropSessions")``), do not depend
on ``amiworker.ami.connection``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from amiworker.ami.message import Message
from amiworker.ami.protocol import Parser, ProtocolError, encode_action
from amiworker.sim.pbx import FakePBX

#: Options that keep tests fast: a bad login answers in 0.2 s, calls last 0.2 s.
FAST = {"login_failure_delay": 0.2, "call_duration": 0.2}
USERNAME, SECRET = "admin", "secret"


class RawAMI:
    """A minimal AMI client: every message received is kept, in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.parser = Parser()
        self.messages: list[Message] = []
        self.data = bytearray()  # every byte received, banner included
        self.eof = False
        self.error: ProtocolError | None = None
        self._writer = writer
        self._ids = itertools.count(1)
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read(reader))

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> RawAMI:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while chunk := await reader.read(65536):
                self.data += chunk
                try:
                    self.messages += self.parser.feed(chunk)
                except ProtocolError as exc:
                    self.messages += exc.messages
                    self.error = exc
                self._arrived.set()
        except ConnectionError:
            pass
        finally:
            self.eof = True
            self._arrived.set()

    @property
    def events(self) -> list[Message]:
        return [m for m in self.messages if m.kind == "event"]

    def send(self, name: str, headers: dict[str, Any] | None = None, action_id: str = "") -> str:
        action_id = action_id or f"{name.lower()}-{next(self._ids)}"
        self._writer.write(encode_action(name, headers, action_id=action_id))
        return action_id

    def send_raw(self, data: bytes) -> None:
        self._writer.write(data)

    async def wait_for(
        self, predicate: Callable[[Message], bool], timeout: float = 5.0, what: str = "a message"
    ) -> Message:
        """The first message received (now or later) that matches ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages:
                if predicate(message):
                    return message
            remaining = deadline - time.monotonic()
            if self.eof or remaining <= 0:
                state = "the connection closed" if self.eof else f"{timeout:g} s passed"
                raise AssertionError(f"{state} before {what} arrived")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def wait_count(
        self,
        predicate: Callable[[Message], bool],
        count: int,
        timeout: float = 5.0,
        start: int = 0,
    ) -> list[Message]:
        """Wait until ``count`` messages (from index ``start`` on) match; return them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.messages[start:] if predicate(m)]
            if len(found) >= count:
                return found
            remaining = deadline - time.monotonic()
            if self.eof or remaining <= 0:
                raise AssertionError(f"got {len(found)} of {count} messages before giving up")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def reply(self, action_id: str, timeout: float = 5.0) -> Message:
        return await self.wait_for(
            lambda m: m.kind == "response" and m.action_id == action_id,
            timeout,
            f"the reply to {action_id}",
        )

    async def action(
        self, name: str, headers: dict[str, Any] | None = None, timeout: float = 5.0
    ) -> Message:
        return await self.reply(self.send(name, headers), timeout)

    async def event_list(
        self, name: str, headers: dict[str, Any] | None = None, timeout: float = 5.0
    ) -> tuple[Message, list[Message], Message]:
        """(reply, items, the closing ``...Complete`` event) of an EventList action."""
        action_id = self.send(name, headers)
        reply = await self.reply(action_id, timeout)
        complete = await self.wait_for(
            lambda m: m.action_id == action_id and m.get("EventList") == "Complete",
            timeout,
            f"the end of the {name} list",
        )
        items = [
            m
            for m in self.messages
            if m.kind == "event" and m.action_id == action_id and m is not complete
        ]
        return reply, items, complete

    async def login(
        self, username: str = USERNAME, secret: str = SECRET, **headers: str
    ) -> Message:
        return await self.action("Login", {"Username": username, "Secret": secret, **headers})

    async def login_md5(self, username: str = USERNAME, secret: str = SECRET) -> Message:
        challenge = (await self.action("Challenge", {"AuthType": "MD5"}))["Challenge"]
        key = hashlib.md5((challenge + secret).encode()).hexdigest()
        return await self.action("Login", {"Username": username, "AuthType": "MD5", "Key": key})

    async def closed(self, timeout: float = 5.0) -> None:
        """Wait until the server closes the connection."""
        await asyncio.wait({self._task}, timeout=timeout)  # unlike wait_for, never cancels
        if not self.eof:
            raise AssertionError(f"the server did not close the connection within {timeout:g} s")

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


@pytest.fixture
async def fake_pbx_factory() -> AsyncIterator[Callable[..., Awaitable[FakePBX]]]:
    started: list[FakePBX] = []

    async def start(**options: Any) -> FakePBX:
        pbx = FakePBX(**{"port": 0, **FAST, **options})
        await pbx.start()
        started.append(pbx)
        return pbx

    yield start
    for pbx in started:
        await pbx.stop()


@pytest.fixture
async def fake_pbx(fake_pbx_factory: Callable[..., Awaitable[FakePBX]]) -> FakePBX:
    return await fake_pbx_factory()


@pytest.fixture
async def raw_ami() -> AsyncIterator[Callable[[int], Awaitable[RawAMI]]]:
    clients: list[RawAMI] = []

    async def connect(port: int) -> RawAMI:
        client = await RawAMI.connect(port)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        await client.close()


@dataclass
class SimProcess:
    """A simulator running as a child process."""

    process: asyncio.subprocess.Process
    port: int
    record: Path
    log: Path
    args: list[str] = field(default_factory=list)

    def events_recorded(self) -> list[Message]:
        """Every event the process has sent so far (from its --record file)."""
        return Parser(banner=False).feed(self.record.read_bytes())

    async def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; return the exit status."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                await self.kill()
        return await self.process.wait()

    async def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await self.process.wait()


@pytest.fixture
async def pbx_process_factory(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[SimProcess]]]:
    """Start ``python -m amiworker.sim --port 0 ...``; waits until it listens."""
    processes: list[SimProcess] = []

    async def start(*args: str, timeout: float = 15.0) -> SimProcess:
        n = len(processes)
        ready, record, log = (tmp_path / f"sim{n}.{ext}" for ext in ("port", "events", "log"))
        with log.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "amiworker.sim",
                "--port",
                "0",
                "--ready-file",
                str(ready),
                "--record",
                str(record),
                *args,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        sim = SimProcess(process, 0, record, log, list(args))
        processes.append(sim)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if process.returncode is not None:
                raise AssertionError(
                    f"the simulator exited with {process.returncode}: {log.read_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"the simulator did not listen within {timeout:g} s")
            await asyncio.sleep(0.01)
        sim.port = int(ready.read_text())
        return sim

    yield start
    for sim in processes:
        await sim.stop()
