"""AMI sessions with every configured PBX, each kept alive by its own supervising task.

A lost session is reopened after a delay drawn with full jitter,
``uniform(0, min(reconnect_max, reconnect_min * 2**attempt))``, so a fleet of
workers that lost a PBX at the same moment does not reconnect in lockstep. The
attempt count resets after a session that lasted ``stable_after`` seconds, so
one drop after hours of service is retried at once, while a PBX that accepts
the login and drops the session right away is backed off like a refused one.

Logging is by outage, not by attempt: one warning when a PBX is lost (with the
reason), one info line when it is back (with how long it was down); each
attempt in between is logged at debug. The exception is a refused login: it
needs a human, so it is logged at error once per outage, and retried every
``reconnect_max/2 .. reconnect_max`` seconds (an admin may fix the secret
without restarting us; retrying faster would only fill the PBX's security log
and may get this host banned by fail2ban).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable, Sequence
from os import PathLike
from typing import Protocol, TypedDict

from amiworker.ami.connection import Connection, EventCallback
from amiworker.ami.errors import AMIError, AuthenticationFailed, ConnectError
from amiworker.ami.message import Message
from amiworker.ami.protocol import DEFAULT_MAX_MESSAGE_SIZE
from amiworker.backoff import full_jitter
from amiworker.logs import current_server

__all__ = [
    "PoolEventCallback",
    "ServerConfig",
    "ServerPool",
    "ServerStatus",
    "tls_context",
]

log = logging.getLogger(__name__)

#: ``on_event(server_name, message, own_action)``, called on a reader task: never block.
PoolEventCallback = Callable[[str, Message, bool], None]


class _Secret(Protocol):
    def get_secret_value(self) -> str: ...


class ServerConfig(Protocol):
    """What the pool needs to know about one PBX (settings.ServerSettings fits)."""

    @property
    def name(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def username(self) -> str: ...
    @property
    def secret(self) -> _Secret | str: ...
    @property
    def auth(self) -> str: ...
    @property
    def events(self) -> str: ...
    @property
    def tls(self) -> bool: ...
    @property
    def tls_ca_file(self) -> str | PathLike[str] | None: ...


class ServerStatus(TypedDict):
    connected: bool
    #: Wall-clock time (time.time()) of the last change: connected, or lost/failing since.
    since: float | None
    last_error: str | None
    ami_version: str | None
    #: Sessions opened after the first one.
    reconnects: int


def tls_context(server: ServerConfig) -> ssl.SSLContext | None:
    if not server.tls:
        return None
    cafile = server.tls_ca_file
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"PBX {server.name}: cannot load tls_ca_file {cafile}: {exc.strerror or exc}"
        ) from None


class _Supervised:
    """One PBX: its settings, its current session and what status() reports."""

    def __init__(self, server: ServerConfig) -> None:
        self.server = server
        self.where = f"{server.name} ({server.host}:{server.port})"
        self.tls = tls_context(server)
        self.conn: Connection | None = None
        self.task: asyncio.Task[None] | None = None
        self.since: float | None = None
        self.last_error: str | None = None
        self.ami_version: str | None = None
        self.sessions = 0

    def secret(self) -> str:
        secret = self.server.secret
        return secret if isinstance(secret, str) else secret.get_secret_value()

    def status(self) -> ServerStatus:
        return ServerStatus(
            connected=self.conn is not None and self.conn.is_open,
            since=self.since,
            last_error=self.last_error,
            ami_version=self.ami_version,
            reconnects=max(0, self.sessions - 1),
        )


class ServerPool:
    """Keeps one AMI session open with every PBX in ``servers``.

    ``on_event(server_name, message, own_action)`` receives every event of
    every session, on the reader task (it must not block; see
    :meth:`Connection.on_event`). ``on_session(server_name)`` is called as a
    session is being opened: the events delivered after it are that session's.
    Sessions have no event queue unless ``event_queue_size`` is given.
    """

    def __init__(
        self,
        servers: Sequence[ServerConfig],
        *,
        on_event: PoolEventCallback | None = None,
        on_session: Callable[[str], None] | None = None,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        stable_after: float = 10.0,
        connect_timeout: float = 5.0,
        action_timeout: float = 10.0,
        ping_interval: float | None = 10.0,
        ping_timeout: float = 5.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        event_queue_size: int = 0,
    ) -> None:
        names = [s.name for s in servers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"PBX names must be unique; repeated: {', '.join(duplicates)}")
        if not 0 < reconnect_min <= reconnect_max:
            raise ValueError("need 0 < reconnect_min <= reconnect_max")
        self._servers = {s.name: _Supervised(s) for s in servers}
        self._on_event = on_event
        self._on_session = on_session
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.stable_after = stable_after
        self.connect_timeout = connect_timeout
        self.action_timeout = action_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.max_message_size = max_message_size
        self.event_queue_size = event_queue_size
        self._stopping = False
        self._changed = asyncio.Condition()

    # -- public API --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start one supervising task per PBX; returns at once (see :meth:`wait_connected`)."""
        for supervised in self._servers.values():
            if supervised.task is None:
                name = f"ami pool {supervised.server.name}"
                supervised.task = asyncio.create_task(self._supervise(supervised), name=name)

    async def stop(self, logoff: bool = True, timeout: float = 5.0) -> None:
        """End every session (politely with Logoff unless ``logoff=False``) and every task."""
        self._stopping = True
        conns = [s.conn for s in self._servers.values() if s.conn is not None]
        if logoff:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(c.logoff() for c in conns), return_exceptions=True)
            except TimeoutError:
                log.warning("AMI Logoff did not finish within %g s; closing", timeout)
        tasks = [s.task for s in self._servers.values() if s.task is not None]
        for conn in conns:
            conn.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Again: a session may have opened while the Logoffs ran.
        conns = [s.conn for s in self._servers.values() if s.conn is not None]
        for conn in conns:
            conn.close()
        await asyncio.gather(*(c.wait_closed() for c in conns), return_exceptions=True)

    def status(self) -> dict[str, ServerStatus]:
        return {name: s.status() for name, s in self._servers.items()}

    def connection(self, name: str) -> Connection | None:
        """The open session with PBX ``name``, or None while it is down."""
        try:
            conn = self._servers[name].conn
        except KeyError:
            known = ", ".join(self._servers) or "none"
            raise KeyError(f"no PBX named {name!r} (configured: {known})") from None
        return conn if conn is not None and conn.is_open else None

    async def wait_connected(self, timeout: float) -> None:
        """Wait until every PBX has an open session; TimeoutError names those that do not."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(
                    lambda: all(s.status()["connected"] for s in self._servers.values())
                )
        except TimeoutError:
            down = [
                f"{s.where}: {s.last_error or 'not connected yet'}"
                for s in self._servers.values()
                if not s.status()["connected"]
            ]
            raise TimeoutError(
                f"AMI not connected within {timeout:g} s: {'; '.join(down)}"
            ) from None

    async def __aenter__(self) -> ServerPool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- one PBX -----------------------------------------------------------------------------

    async def _supervise(self, supervised: _Supervised) -> None:
        # Every log line of this task, and of the session tasks it starts, names the PBX.
        current_server.set(supervised.server.name)
        attempt = 0
        down_since = time.monotonic()
        # Causes already logged in this outage; a loss is itself the log line for "cannot reach".
        logged: set[type[BaseException]] = set()
        while not self._stopping:
            try:
                conn = await self._open(supervised)
            except Exception as exc:
                delay, attempt = self._after_failure(supervised, exc, logged, attempt)
                await asyncio.sleep(delay)
                continue

            opened = time.monotonic()
            try:
                await self._set_connected(supervised, conn, down=opened - down_since)
                await conn.wait_closed()
            finally:
                if self._stopping:
                    conn.close()  # stop() may have run before this session was recorded
            if self._stopping:
                return
            down_since = time.monotonic()
            supervised.last_error = conn.close_reason
            supervised.since = time.time()
            await self._notify()
            log.warning(
                "%s: AMI session lost: %s; reconnecting", supervised.where, conn.close_reason
            )
            logged = {ConnectError}
            if down_since - opened >= self.stable_after:
                attempt = 0
            await asyncio.sleep(full_jitter(attempt, self.reconnect_min, self.reconnect_max))
            attempt += 1

    async def _open(self, supervised: _Supervised) -> Connection:
        server = supervised.server
        callback: EventCallback | None = None
        if self._on_event is not None:
            on_event, name = self._on_event, server.name

            def callback(message: Message, own_action: bool) -> None:
                on_event(name, message, own_action)

        if self._on_session is not None:
            # Before the login: every event delivered from here on is this session's.
            self._on_session(server.name)

        return await Connection.open(
            server.host,
            server.port,
            server.username,
            supervised.secret(),
            auth="plain" if server.auth == "plain" else "md5",
            events=server.events,
            ssl=supervised.tls,
            name=server.name,
            on_event=callback,
            timeout=self.connect_timeout,
            action_timeout=self.action_timeout,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            max_message_size=self.max_message_size,
            event_queue_size=self.event_queue_size,
            # _supervise logs every lost session with its reason: one line, not two.
            log_protocol_errors=False,
        )

    async def _set_connected(self, supervised: _Supervised, conn: Connection, down: float) -> None:
        first = supervised.sessions == 0
        failed = supervised.last_error is not None
        supervised.conn = conn
        supervised.sessions += 1
        supervised.since = time.time()
        supervised.ami_version = conn.ami_version
        supervised.last_error = None
        await self._notify()
        if first and not failed:
            log.info("%s: AMI session open (AMI %s)", supervised.where, conn.ami_version)
        elif first:
            log.info(
                "%s: AMI session open after %.1f s of failed attempts (AMI %s)",
                supervised.where,
                down,
                conn.ami_version,
            )
        else:
            log.info(
                "%s: AMI session back after %.1f s down (AMI %s)",
                supervised.where,
                down,
                conn.ami_version,
            )

    def _after_failure(
        self,
        supervised: _Supervised,
        exc: Exception,
        logged: set[type[BaseException]],
        attempt: int,
    ) -> tuple[float, int]:
        """Record a failed attempt, log it once per cause per outage; the next delay and attempt."""
        # AMI errors name the PBX already; a bad setting or a bug does not.
        text = str(exc) if isinstance(exc, AMIError) else f"{supervised.where}: {exc}"
        supervised.last_error = text
        if supervised.since is None:
            supervised.since = time.time()
        first = type(exc) not in logged
        logged.add(type(exc))
        if isinstance(exc, AuthenticationFailed | ValueError):  # needs a human
            if first:
                log.error(
                    "%s; retrying every %g-%g s", text, self.reconnect_max / 2, self.reconnect_max
                )
            return random.uniform(self.reconnect_max / 2, self.reconnect_max), attempt
        if not first:
            log.debug("AMI attempt failed: %s", text)
        elif isinstance(exc, ConnectError):
            log.warning("%s; retrying with backoff", text)
        else:
            log.error(
                "%s: unexpected error opening the AMI session", supervised.where, exc_info=exc
            )
        return full_jitter(attempt, self.reconnect_min, self.reconnect_max), attempt + 1

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
