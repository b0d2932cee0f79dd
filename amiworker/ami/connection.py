"""One AMI session over asyncio: login, actions correlated by ActionID, events.

The task that reads the socket awaits nothing but the socket: it feeds the
sans-IO parser and routes each message synchronously. A reply completes its
action's future; an event goes to the registered callbacks and into a bounded
queue without waiting. Asterisk drops a manager session whose reader falls
behind (``writetimeout``, 100 ms by default) and never replays what it missed,
so nothing slow may ever run on that path; a full queue drops and counts.

Which action each message answers, and which events are delivered, is decided
by :class:`~amiworker.ami.routing.ActionRouter` (its docstring has the contract).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import secrets
import socket
import ssl as _ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from types import TracebackType
from typing import Any, Literal, NamedTuple

from amiworker.ami.actions import ActionHelpers
from amiworker.ami.errors import (
    ActionTimeout,
    AMIError,
    AuthenticationFailed,
    ConnectError,
    ConnectionFinished,
)
from amiworker.ami.message import Message
from amiworker.ami.protocol import DEFAULT_MAX_MESSAGE_SIZE, HeaderValues, Parser, ProtocolError
from amiworker.ami.protocol import encode_action as _encode_action
from amiworker.ami.response import Response
from amiworker.ami.routing import ActionRouter

__all__ = ["Connection", "EventCallback", "ReceivedEvent"]

log = logging.getLogger(__name__)

#: ``callback(message, own_action)``, called on the reader task: it must not block.
EventCallback = Callable[[Message, bool], None]

_READ_SIZE = 256 * 1024
# A repeated warning (queue overflow, failing callback) is logged at most this often.
_WARN_INTERVAL = 10.0


class ReceivedEvent(NamedTuple):
    """An event as ``Connection.events()`` yields it: ``async for message, own in ...``."""

    message: Message
    #: True when the event answers a pending action of this session (see module doc).
    own_action: bool


class _Throttle:
    """Lets a repeated warning through at most once per interval; counts the rest."""

    def __init__(self, interval: float = _WARN_INTERVAL) -> None:
        self._interval = interval
        self._next = 0.0
        self._suppressed = 0

    def allow(self) -> int | None:
        """None to stay quiet, else how many were suppressed since the last one."""
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return None
        self._next = now + self._interval
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed


class _EventQueue:
    """A bounded FIFO the reader fills without ever waiting; overflow is dropped and counted."""

    def __init__(self, size: int) -> None:
        self._items: deque[ReceivedEvent] = deque()
        self._size = size
        self._waiters: list[asyncio.Future[None]] = []
        self._closed = False
        self.dropped = 0

    def put(self, item: ReceivedEvent) -> bool:
        if len(self._items) >= self._size:
            self.dropped += 1
            return False
        self._items.append(item)
        self._wake()
        return True

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def get(self) -> ReceivedEvent | None:
        """The next event; None once the session has ended and the queue is drained."""
        while not self._items:
            if self._closed:
                return None
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        return self._items.popleft()


class Connection(ActionHelpers):
    """One logged-in AMI session. Create it with :meth:`open`.

    Actions: :meth:`action` and the typed helpers (:class:`ActionHelpers`),
    any number concurrently. Events: :meth:`on_event` callbacks and/or the
    :meth:`events` iterator. The session ends when the PBX closes it, on a
    protocol error, when a keepalive Ping goes unanswered, or on :meth:`close`
    / :meth:`logoff`; ``close_reason`` then says which, and every pending
    action raises :class:`ConnectionFinished`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        name: str = "",
        action_timeout: float = 10.0,
        ping_interval: float | None = 10.0,
        ping_timeout: float = 5.0,
        event_queue_size: int = 10_000,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        log_protocol_errors: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.name = name
        self.action_timeout = action_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        #: The AMI version from the banner ("11.0.0"), None before it arrived.
        self.ami_version: str | None = None
        #: Why the session ended; None while it is open.
        self.close_reason: str | None = None
        self._where = f"{name} ({host}:{port})" if name else f"{host}:{port}"
        self._parser = Parser(max_message_size=max_message_size)
        self._log_protocol_errors = log_protocol_errors
        self._writer: asyncio.StreamWriter | None = None
        self._router = ActionRouter(self._where, self._dispatch)
        self._callbacks: list[EventCallback] = []
        self._queue = _EventQueue(event_queue_size) if event_queue_size > 0 else None
        # Random per session: OriginateResponse and UserEvent are broadcast to every
        # session with the sender's ActionID, so ids must not collide across workers
        # on other hosts (where pids repeat).
        self._id_prefix = f"amiworker-{os.getpid()}-{secrets.token_hex(4)}-"
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._banner: asyncio.Future[None] | None = None
        self._stage = "connect"
        self._logging_off = False
        self._closed = asyncio.Event()
        self._drop_warning = _Throttle()
        self._callback_warning = _Throttle()

    # -- opening -------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        username: str,
        secret: str,
        *,
        auth: Literal["md5", "plain"] = "md5",
        events: str = "on",
        timeout: float = 5.0,
        action_timeout: float = 10.0,
        ping_interval: float | None = 10.0,
        ping_timeout: float = 5.0,
        event_queue_size: int = 10_000,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        ssl: _ssl.SSLContext | None = None,
        name: str = "",
        on_event: EventCallback | None = None,
        log_protocol_errors: bool = True,
    ) -> Connection:
        """Connect, read the banner and log in, all within ``timeout`` seconds.

        ``events`` is the Login ``Events`` header (``on``, ``off``, or classes
        like ``call,system``). ``ping_interval=None`` disables the keepalive.
        ``event_queue_size=0`` disables the :meth:`events` queue (callbacks
        only). ``on_event`` is registered before login, so it sees every event
        (FullyBooted included). An open session ended by a protocol error (a
        message over ``max_message_size``, bytes that are not AMI) is logged as
        an error, unless ``log_protocol_errors=False``: for a caller that logs
        every end of a session itself, with ``close_reason``, as the pool does.
        Raises :class:`ConnectError` or :class:`AuthenticationFailed`.
        """
        if auth not in ("md5", "plain"):
            raise ValueError(f"auth must be 'md5' or 'plain', not {auth!r}")
        if "\r" in secret or "\n" in secret:
            raise ValueError("the AMI secret contains CR or LF; refused (AMI header injection)")
        conn = cls(
            host,
            port,
            name=name,
            action_timeout=action_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            event_queue_size=event_queue_size,
            max_message_size=max_message_size,
            log_protocol_errors=log_protocol_errors,
        )
        if on_event is not None:
            conn.on_event(on_event)
        try:
            async with asyncio.timeout(timeout):
                await conn._connect(ssl)
                await conn._login(username, secret, auth, events)
        except AuthenticationFailed:
            await conn._abort("login refused")
            raise
        except TimeoutError:
            await conn._abort("timed out while opening")
            raise ConnectError(conn._timeout_text(timeout, tls=ssl is not None)) from None
        except ConnectionFinished as exc:
            await conn.wait_closed()
            raise ConnectError(
                f"cannot open an AMI session with {conn._where}: {exc.reason}"
            ) from None
        except OSError as exc:
            await conn._abort("could not connect")
            raise ConnectError(conn._os_error_text(exc)) from None
        except BaseException:  # cancelled, or a ValueError from the headers
            conn._finish("failed while opening")
            raise
        conn._stage = "open"
        if ping_interval:
            conn._start(conn._keepalive(ping_interval, ping_timeout), "keepalive")
        log.debug("%s: AMI session open (AMI %s)", conn._where, conn.ami_version)
        return conn

    async def _connect(self, ssl: _ssl.SSLContext | None) -> None:
        self._stage = "connect"
        reader, self._writer = await asyncio.open_connection(self.host, self.port, ssl=ssl)
        self._stage = "banner"
        self._banner = asyncio.get_running_loop().create_future()
        self._start(self._read_loop(reader), "reader")
        await self._banner
        self.ami_version = self._parser.version

    async def _login(self, username: str, secret: str, auth: str, events: str) -> None:
        credentials: dict[str, str]
        if auth == "md5":
            self._stage = "Challenge"
            challenge = await self._request("Challenge", {"AuthType": "MD5"}, timeout=None)
            if not challenge.ok or not challenge.get("Challenge"):
                raise AuthenticationFailed(
                    f"AMI at {self._where} refused the MD5 challenge: "
                    f"{challenge.message or challenge.name}; check the user, or use auth=plain"
                )
            key = hashlib.md5((challenge["Challenge"] + secret).encode()).hexdigest()
            credentials = {"AuthType": "MD5", "Key": key}
        else:
            credentials = {"Secret": secret}
        self._stage = "Login"
        reply = await self._request(
            "Login", {"Username": username, **credentials, "Events": events}, timeout=None
        )
        if not reply.ok:
            raise AuthenticationFailed(
                f"AMI at {self._where} refused the login of user {username!r}: "
                f"{reply.message or reply.name}; check username and secret (manager.conf)"
            )

    def _timeout_text(self, timeout: float, *, tls: bool) -> str:
        where, limit = self._where, f"{timeout:g} s"
        if self._stage == "connect":
            what = "TCP/TLS" if tls else "TCP"
            return (
                f"cannot connect to AMI at {where}: no {what} connection within {limit}; "
                "check host, port and that no firewall drops the packets"
            )
        if self._stage == "banner":
            return (
                f"AMI at {where} accepted the connection but sent no AMI banner within "
                f"{limit}; check that this is the AMI port (manager.conf, usually 5038)"
            )
        return f"AMI at {where} did not answer {self._stage} within {limit}; is the PBX overloaded?"

    def _os_error_text(self, exc: OSError) -> str:
        where = self._where
        if isinstance(exc, ConnectionRefusedError):
            return (
                f"cannot connect to AMI at {where}: connection refused; check that Asterisk "
                "runs and manager.conf has enabled=yes and this port"
            )
        if isinstance(exc, socket.gaierror):
            return f"cannot connect to AMI at {where}: cannot resolve host {self.host!r}"
        if isinstance(exc, _ssl.SSLCertVerificationError):
            # Name the certificate problem ("self-signed certificate", "certificate
            # has expired", "IP address mismatch..."), not just CERTIFICATE_VERIFY_FAILED.
            return (
                f"cannot connect to AMI at {where}: TLS handshake failed: the PBX certificate "
                f"is not trusted ({exc.verify_message or exc.reason}); check tls_ca_file and "
                "the PBX certificate"
            )
        if isinstance(exc, _ssl.SSLError):
            return (
                f"cannot connect to AMI at {where}: TLS handshake failed ({exc.reason or exc}); "
                "check tls_ca_file and the PBX certificate, and that this port is the PBX's "
                "TLS port (manager.conf tlsbindport)"
            )
        return f"cannot connect to AMI at {where}: {exc.strerror or exc}"

    # -- public state --------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.close_reason is None and self._stage == "open"

    @property
    def dropped_events(self) -> int:
        """Events dropped because the :meth:`events` consumer fell behind."""
        return self._queue.dropped if self._queue is not None else 0

    def on_event(self, callback: EventCallback) -> EventCallback:
        """Call ``callback(message, own_action)`` for every event, in order.

        It runs on the reader task: it must return quickly and never block
        (hand work to a queue). Exceptions it raises are logged and swallowed.
        Returns ``callback``, so it can be used as a decorator.
        """
        self._callbacks.append(callback)
        return callback

    def events(self) -> AsyncIterator[ReceivedEvent]:
        """Iterate over events as :class:`ReceivedEvent` until the session ends.

        Events are queued from login on (up to ``event_queue_size``); if the
        consumer falls behind, new events are dropped and counted in
        ``dropped_events``: reading never waits.
        """
        queue = self._queue
        if queue is None:
            raise RuntimeError("this connection has no event queue (event_queue_size=0)")
        return self._iterate(queue)

    @staticmethod
    async def _iterate(queue: _EventQueue) -> AsyncIterator[ReceivedEvent]:
        while (item := await queue.get()) is not None:
            yield item

    # -- actions -------------------------------------------------------------------------

    async def _request(
        self,
        name: str,
        headers: HeaderValues | None,
        *,
        timeout: float | None,
        answer_event: str | None = None,
    ) -> Response:
        """Send one action and wait until it is completely answered.

        Complete means: the reply, plus (if it says ``EventList: start``) the
        event with ``EventList: Complete``, plus (if ``answer_event`` is given
        and the reply is a success) the event of that name with our ActionID.
        """
        writer = self._writer
        if self.close_reason is not None or writer is None:
            raise self._finished(name)
        action_id = f"{self._id_prefix}{next(self._ids)}"
        data = _encode_action(name, headers, action_id=action_id)  # ValueError before sending
        pending = self._router.expect(action_id, name, answer_event)
        limit = self.action_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                writer.write(data)
                await writer.drain()
                return await pending.future
        except TimeoutError:
            partial = "complete " if pending.reply is not None else ""
            raise ActionTimeout(
                f"AMI action {name} got no {partial}answer from {self._where} within {limit:g} s"
            ) from None
        except OSError as exc:  # the write failed: the socket is gone
            self._finish(f"connection lost: {exc.strerror or exc}")
            raise self._finished(name) from None
        finally:
            if pending.future.done() and not pending.future.cancelled():
                pending.future.exception()  # seen, even if we leave by another error
            self._router.abandon(action_id)

    def _finished(self, action: str) -> ConnectionFinished:
        reason = self.close_reason or "not connected"
        return ConnectionFinished(
            f"AMI session with {self._where} ended before {action} was answered: {reason}", reason
        )

    async def logoff(self) -> None:
        """Politely end the session: Logoff, then close. Never raises for a dead session."""
        if self.close_reason is None and self._writer is not None:
            self._logging_off = True
            with contextlib.suppress(AMIError):
                await self._request("Logoff", None, timeout=min(self.action_timeout, 5.0))
        self._finish("logged off")
        await self.wait_closed()

    # -- the reader: never awaits anything but the socket --------------------------------

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        reason = "closed by the PBX"
        try:
            while data := await reader.read(_READ_SIZE):
                try:
                    messages = self._parser.feed(data)
                except ProtocolError as exc:
                    for message in exc.messages:
                        self._router.route(message)
                    reason = f"protocol error: {exc}"
                    if self._stage == "open" and self._log_protocol_errors:
                        log.error("%s: closing the AMI session: %s", self._where, reason)
                    return
                banner = self._banner
                if banner is not None and not banner.done() and self._parser.version:
                    banner.set_result(None)
                for message in messages:
                    self._router.route(message)
        except OSError as exc:
            reason = f"connection lost: {exc.strerror or exc}"
        except asyncio.CancelledError:
            reason = "reader cancelled"
            raise
        except Exception as exc:  # a bug here must end the session, never stall it
            log.exception("%s: internal error in the AMI reader", self._where)
            reason = f"internal error: {exc!r}"
        finally:
            self._finish(reason)

    def _dispatch(self, message: Message, own_action: bool) -> None:
        for callback in self._callbacks:
            try:
                callback(message, own_action)
            except Exception:
                suppressed = self._callback_warning.allow()
                if suppressed is not None:
                    log.exception(
                        "%s: event callback %r failed on %s (%d similar failures not shown)",
                        self._where,
                        callback,
                        message.name,
                        suppressed,
                    )
        queue = self._queue
        if queue is not None and not queue.put(ReceivedEvent(message, own_action)):
            suppressed = self._drop_warning.allow()
            if suppressed is not None:
                log.warning(
                    "%s: event queue full, dropping events (%d dropped so far); "
                    "the consumer of events() is too slow",
                    self._where,
                    queue.dropped,
                )

    # -- keepalive and closing -------------------------------------------------------------

    async def _keepalive(self, interval: float, limit: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self._request("Ping", None, timeout=limit)
            except ActionTimeout:
                self._finish(f"no Ping reply within {limit:g} s")
                return
            except ConnectionFinished:
                return

    def _start(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=f"ami {what} {self._where}"))

    def close(self) -> None:
        """End the session now, without Logoff. Pending actions raise ConnectionFinished."""
        self._finish("closed by the client")

    async def wait_closed(self) -> None:
        """Wait until the session has ended and its tasks and socket are finished."""
        await self._closed.wait()
        current = asyncio.current_task()
        await asyncio.gather(*(t for t in self._tasks if t is not current), return_exceptions=True)
        if self._writer is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):  # TLS close_notify may never be answered
                    await self._writer.wait_closed()

    async def _abort(self, reason: str) -> None:
        self._finish(reason)
        await self.wait_closed()

    def _finish(self, reason: str) -> None:
        if self.close_reason is not None:
            return
        if self._logging_off and reason == "closed by the PBX":
            reason = "logged off"  # Asterisk closes right after its Goodbye
        self.close_reason = reason
        self._router.fail_all(self._finished)
        if self._banner is not None and not self._banner.done():
            self._banner.set_exception(self._finished("the banner"))
        if self._queue is not None:
            self._queue.close()
        if self._writer is not None:
            self._writer.close()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self._closed.set()
        log.debug("%s: AMI session ended: %s", self._where, reason)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    def __repr__(self) -> str:
        state = "open" if self.is_open else f"closed ({self.close_reason})"
        return f"<Connection {self._where} {state} AMI {self.ami_version}>"
