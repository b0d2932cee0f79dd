"""A fake PBX that speaks real AMI: the Asterisk of the tests and the demo.

It listens like Asterisk's manager (``Asterisk Call Manager/11.0.0`` banner,
CRLF, plain and MD5 login), answers the common actions with the replies
Asterisk 22.10.1 gives (see :mod:`amiworker.sim.actions`) and generates calls
whose events match the real ones byte for byte in shape (see
:mod:`amiworker.sim.calls`)::

    async with FakePBX(name="pbx1", port=0, calls_per_second=50) as pbx:
        ...  # connect to pbx.port
        linkedid = await pbx.start_call()
        pbx.stall(2.0)             # answer nothing for 2 s
        await pbx.drop_sessions()  # every session cut, as by a PBX restart

``ami_version="2.10.6"`` makes it an Asterisk 13 (legacy ``Command`` replies).

Each broadcast event is formatted once and the same bytes are written to every
logged-in session whose event mask accepts it; ``sent_events`` keeps them in
order (``keep_events=False`` for long runs), ``record_path`` appends them to a
file as they are sent.

As a process::

    python -m amiworker.sim --port 5038 --calls-per-second 5 \\
        [--name pbx1 --username admin --secret secret --ami-version 11.0.0 \\
         --duration 1.0 --calls N --record PATH --ready-file PATH \\
         --tls-cert cert.pem --tls-key key.pem]

``ssl=`` (``--tls-cert``/``--tls-key``) makes it speak AMI over TLS, as
Asterisk's ``tlsenable``/``tlsbindport`` does.

Simulator-only control actions, accepted from a logged-in session (also while
stalled, so a test can resume), each answered ``Response: Success``:

``Action: SimStats``
    Reply headers ``EventsSent``, ``CallsStarted``, ``CallsCompleted``, ``Sessions``.
``Action: SimDropSessions``
    Close every session abruptly (the asker's too), as a PBX restart does.
``Action: SimStall`` (``Seconds: 2.5``, optional)
    Answer nothing and send no event until ``SimResume`` or the seconds pass.
``Action: SimResume``
    End a stall; what was held back is sent.
``Action: SimSendRaw`` (``Data: <base64>``)
    Write those bytes to every logged-in session (a malformed or huge message).
``Action: SimSlowWrite`` (``BytesPerSecond: 100``; 0 or absent = full speed)
    Write to every session at that rate (a hostile PBX).
``Action: SimCalls`` (``Count: N`` starts N calls now, ``Rate: R`` sets calls/s)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl as _ssl
import time
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from amiworker.sim.calls import CallEngine
from amiworker.sim.channel import Dialplan
from amiworker.sim.data import (
    ASTERISK_VERSIONS,
    ConfigFile,
    extensions_conf,
    manager_conf,
)
from amiworker.sim.session import AMISession

__all__ = ["FakePBX"]

log = logging.getLogger("amiworker.sim")


class FakePBX:
    """An AMI server on ``host:port`` with simulated calls and injectable faults."""

    def __init__(
        self,
        name: str = "pbx1",
        host: str = "127.0.0.1",
        port: int = 0,
        username: str = "admin",
        secret: str = "secret",
        ami_version: str = "11.0.0",
        calls_per_second: float = 0.0,
        call_duration: float = 1.0,
        timestamp_events: bool = True,
        login_failure_delay: float = 1.0,
        *,
        max_calls: int | None = None,
        write_timeout: float = 5.0,
        max_unsent_bytes: int = 64 * 1024 * 1024,
        keep_events: bool = True,
        record_path: str | os.PathLike[str] | None = None,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        major = ami_version.partition(".")[0]
        if not major.isdigit():
            raise ValueError(f"ami_version must look like 11.0.0 or 2.10.6, not {ami_version!r}")
        if call_duration <= 0:
            raise ValueError(f"call_duration must be positive, not {call_duration}")
        self.name = name
        self.host = host
        self.port = port
        self.username = username
        self.secret = secret
        self.ami_version = ami_version
        self.asterisk_version = ASTERISK_VERSIONS.get(ami_version, "22.10.1")
        #: AMI < 3 is Asterisk <= 13: ``Command`` answers ``Response: Follows``.
        self.legacy = int(major) < 3
        self.login_failure_delay = login_failure_delay
        #: Seconds a session's socket may stay full before it is dropped (writetimeout).
        self.write_timeout = write_timeout
        self.max_unsent_bytes = max_unsent_bytes
        self.keep_events = keep_events
        self.record_path = Path(record_path) if record_path is not None else None
        self.ssl = ssl
        self.started_at = time.time()
        self.sent_events: list[bytes] = []
        self.events_sent = 0
        self.slow_readers_dropped = 0
        self.stalled = False
        self.bytes_per_second: int | None = None
        self.astdb: dict[tuple[str, str], str] = {}
        self.engine = CallEngine(
            name=name,
            sink=self._queue_event,
            clock=time.monotonic,
            wakeup=self._wakeup,
            dialplan=Dialplan(extensions_conf(name)),
            call_duration=call_duration,
            timestamp_events=timestamp_events,
        )
        self._initial_rate = (calls_per_second, max_calls)
        self._connections: set[AMISession] = set()
        self._pending: list[tuple[bytes, str]] = []
        self._running = asyncio.Event()
        self._running.set()
        self._server: asyncio.Server | None = None
        self._clock_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._record: BinaryIO | None = None

    def __repr__(self) -> str:
        return f"<FakePBX {self.name} {self.host}:{self.port} sessions={self.sessions}>"

    # -- life ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen; raises OSError with a one-line reason if it cannot."""
        loop = asyncio.get_running_loop()
        if self.record_path is not None:
            try:
                self._record = self.record_path.open("ab")
            except OSError as exc:
                raise OSError(f"cannot append to {self.record_path}: {exc.strerror}") from exc
        try:
            self._server = await loop.create_server(
                lambda: AMISession(self), self.host, self.port, reuse_address=True, ssl=self.ssl
            )
        except OSError as exc:
            if self._record is not None:
                self._record.close()
                self._record = None
            reason = exc.strerror or str(exc)
            raise OSError(
                f"cannot listen on {self.host}:{self.port}: {reason} (port in use? try --port 0)"
            ) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        self.engine.set_rate(*self._initial_rate)
        self._clock_task = loop.create_task(self._run_clock(), name=f"{self.name}-clock")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for session in list(self._connections):
            session.abort()
        if self._clock_task is not None:
            self._clock_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._clock_task
            self._clock_task = None
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._record is not None:
            self._record.close()
            self._record = None

    async def __aenter__(self) -> FakePBX:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def sessions(self) -> int:
        """Sessions logged in now."""
        return sum(1 for s in self._connections if s.authenticated and not s.closed)

    async def running(self) -> None:
        """Return once the PBX is not stalled."""
        await self._running.wait()

    def config_file(self, filename: str) -> ConfigFile | None:
        if filename == "extensions.conf":
            return extensions_conf(self.name)
        if filename == "manager.conf":
            return manager_conf(self.host, self.port, self.username)
        return None

    # -- calls and events ---------------------------------------------------------------

    async def start_call(self) -> str:
        """Start one call now (39 events over call_duration); return its Linkedid."""
        linkedid = self.engine.start_call()
        self.flush()
        return linkedid

    def _queue_event(self, data: bytes, event_class: str) -> None:
        self._pending.append((data, event_class))

    def flush(self) -> None:
        """Write the events raised so far to every session that wants them."""
        if not self._pending or self.stalled:
            return
        pending, self._pending = self._pending, []
        everything = b"".join(data for data, _ in pending)
        for session in tuple(self._connections):
            if not session.authenticated or session.closed:
                continue
            mask = session.event_mask
            if mask is None:
                session.write(everything)
            elif mask:
                wanted = b"".join(data for data, event_class in pending if event_class in mask)
                if wanted:
                    session.write(wanted)
        if self.keep_events:
            self.sent_events.extend(data for data, _ in pending)
        if self._record is not None:
            # Flushed to the OS at once: the file survives this process being killed.
            self._record.write(everything)
            self._record.flush()
        self.events_sent += len(pending)

    async def _run_clock(self) -> None:
        """Run what is due (calls' next steps, new background calls) in batches."""
        loop = asyncio.get_running_loop()
        while True:
            await self.running()
            self.engine.run_due()
            self.flush()
            due = self.engine.next_due()
            delay = 0.5 if due is None else min(0.5, max(0.001, due - time.monotonic()))
            wake = self._wake = loop.create_future()
            timer = loop.call_later(delay, _settle, wake)
            try:
                await wake
            finally:
                timer.cancel()

    def _wakeup(self) -> None:
        if self._wake is not None:
            _settle(self._wake)

    # -- faults -------------------------------------------------------------------------

    async def drop_sessions(self) -> None:
        """Close every session abruptly, as a PBX restart does."""
        self.drop_sessions_now()
        for _ in range(100):  # connection_lost runs on the next loop iterations
            if not self._connections:
                return
            await asyncio.sleep(0)

    def drop_sessions_now(self) -> None:
        for session in list(self._connections):
            session.abort()

    def stall(self, seconds: float | None = None) -> None:
        """Answer nothing and send nothing for ``seconds`` (None: until :meth:`resume`)."""
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self.stalled = True
        self._running.clear()
        if seconds is not None:
            self._stall_timer = asyncio.get_running_loop().call_later(seconds, self.resume)

    def resume(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self.stalled = False
        self._running.set()
        self.flush()
        self._wakeup()

    async def send_raw(self, data: bytes) -> None:
        """Write ``data`` as is to every logged-in session."""
        self.flush()
        for session in tuple(self._connections):
            if session.authenticated:
                session.write(data)

    def slow_write(self, bytes_per_second: int | None) -> None:
        """Write to every session at most this fast (None: full speed again)."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError(f"bytes_per_second must be positive or None, not {bytes_per_second}")
        self.bytes_per_second = bytes_per_second


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
