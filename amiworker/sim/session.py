"""One manager session of the simulated PBX: banner, login, actions in order, output.

As in Asterisk, a session handles its actions one at a time, in the order
received (a failed login's delay or a synchronous Originate holds the actions
behind it), and its output goes out in the order written. Broadcast events are
written by :class:`~amiworker.sim.pbx.FakePBX`; a reply first flushes the
events raised before it, so the session sees them in that order.

Asterisk drops a session whose reader falls behind (manager.conf
``writetimeout``): here, a session whose socket stays full for longer than
``write_timeout`` seconds, or whose unsent output passes ``max_unsent_bytes``,
is disconnected.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import random
import time
from collections import deque
from typing import TYPE_CHECKING

from amiworker.ami.protocol import Parser, ProtocolError
from amiworker.sim.actions import HANDLERS
from amiworker.sim.data import LIST_COMMANDS
from amiworker.sim.wire import Action, ack, error, response

if TYPE_CHECKING:
    from amiworker.sim.pbx import FakePBX

log = logging.getLogger("amiworker.sim")

#: Simulator-only actions a test uses to trigger faults in a simulator process.
CONTROL_ACTIONS = frozenset(
    {
        "simdropsessions",
        "simstall",
        "simresume",
        "simsendraw",
        "simslowwrite",
        "simcalls",
        "simstats",
    }
)
_KNOWN_ACTIONS = frozenset(name.lower() for name, _ in LIST_COMMANDS)
_TRUE = frozenset({"yes", "true", "y", "t", "1", "on"})
_FALSE = frozenset({"no", "false", "n", "f", "0", "off"})
#: Past this many bytes queued in the transport, the kernel's socket buffer is full.
#: Kept small: asyncio (3.11) shifts its whole write buffer after each send.
_SOCKET_FULL = 256 * 1024


def event_tv(epoch: float) -> str:
    """``2026-11-26T06:46:05.516+0000``: the EventTV/SessionTV of security events."""
    millis = int(epoch * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{millis:03d}+0000"


def _address(sockname: object) -> str:
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        family = "IPV6" if ":" in str(sockname[0]) else "IPV4"
        return f"{family}/TCP/{sockname[0]}/{sockname[1]}"
    return "IPV4/TCP/0.0.0.0/0"


class AMISession(asyncio.Protocol):
    def __init__(self, pbx: FakePBX) -> None:
        self.pbx = pbx
        self.transport: asyncio.Transport | None = None
        self.authenticated = False
        self.username = ""
        self.challenge = ""
        self.event_mask: frozenset[str] | None = None  # event classes sent; None = all
        self.session_id = f"0x7f{random.getrandbits(40):010x}"
        self.local_address = self.remote_address = ""
        self.session_tv = event_tv(time.time())
        self.closed = False
        self._parser = Parser(banner=False, max_message_size=64 * 1024)
        self._queue: asyncio.Queue[Action] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._full_timer: asyncio.TimerHandle | None = None
        # Output held while the socket is full, as Asterisk queues events for a
        # session that is not reading: a deque of chunks, never one big buffer.
        self._backlog: deque[bytes] = deque()
        self._backlog_size = 0
        self._socket_full = False
        self._slow = bytearray()
        self._slow_task: asyncio.Task[None] | None = None

    # -- the connection -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=_SOCKET_FULL)
        self.local_address = _address(transport.get_extra_info("sockname"))
        self.remote_address = _address(transport.get_extra_info("peername"))
        self.pbx._connections.add(self)
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.authenticated = False
        self.pbx._connections.discard(self)
        for task in (self._task, self._slow_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        if self._full_timer is not None:
            self._full_timer.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._parser.feed(data)
        except ProtocolError as exc:
            log.info("%s: closing a session that sent no AMI: %s", self.pbx.name, exc)
            self.abort()
            return
        for message in messages:
            action = Action(message)
            if self.pbx.stalled and self.authenticated and action.name.lower() in CONTROL_ACTIONS:
                # A stalled PBX answers nothing, but a test must still be able to resume it.
                asyncio.get_running_loop().create_task(self._control(action))
            else:
                self._queue.put_nowait(action)

    def pause_writing(self) -> None:
        # The socket is full: the client is not reading. Asterisk gives up after writetimeout.
        self._socket_full = True
        loop = asyncio.get_running_loop()
        self._full_timer = loop.call_later(self.pbx.write_timeout, self._reader_too_slow)

    def resume_writing(self) -> None:
        self._socket_full = False
        if self._full_timer is not None:
            self._full_timer.cancel()
            self._full_timer = None
        transport = self.transport
        while self._backlog and not self._socket_full and transport is not None:
            data = self._backlog.popleft()
            self._backlog_size -= len(data)
            transport.write(data)  # may pause us again

    def _reader_too_slow(self) -> None:
        log.warning(
            "%s: disconnecting %s: it read nothing for %.1f s (writetimeout)",
            self.pbx.name,
            self.remote_address,
            self.pbx.write_timeout,
        )
        self.pbx.slow_readers_dropped += 1
        self.abort()

    def close(self) -> None:
        """Close after what was written is sent (Logoff, failed login)."""
        if self.transport is not None and not self.closed:
            self.closed = True
            if self._backlog:
                self.transport.write(b"".join(self._backlog))
                self._backlog.clear()
            if self._slow:
                self.transport.write(bytes(self._slow))
                self._slow.clear()
            self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping unsent output (a PBX restart, a slow reader)."""
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    # -- output -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        if self.pbx.bytes_per_second is not None or self._slow:
            self._slow += data
            if self._slow_task is None or self._slow_task.done():
                self._slow_task = asyncio.get_running_loop().create_task(self._drain_slowly())
            return
        if self._socket_full or self._backlog:
            self._backlog.append(data)
            self._backlog_size += len(data)
        else:
            transport.write(data)
        if self._backlog_size + transport.get_write_buffer_size() > self.pbx.max_unsent_bytes:
            log.warning(
                "%s: disconnecting %s: over %d bytes unsent",
                self.pbx.name,
                self.remote_address,
                self.pbx.max_unsent_bytes,
            )
            self.pbx.slow_readers_dropped += 1
            self.abort()

    def reply(self, data: bytes) -> None:
        """Write a reply to this session, after the events raised before it."""
        self.pbx.flush()
        self.write(data)

    async def _drain_slowly(self) -> None:
        while self._slow and not self.closed and self.transport is not None:
            rate = self.pbx.bytes_per_second
            if rate is None:
                self.transport.write(bytes(self._slow))
                self._slow.clear()
                return
            interval = max(0.01, 1.0 / rate)
            chunk = max(1, round(rate * interval))
            self.transport.write(bytes(self._slow[:chunk]))
            del self._slow[:chunk]
            await asyncio.sleep(interval)

    def set_event_mask(self, value: str) -> None:
        """``on``, ``off`` or a list of classes (``call,system``), as set_eventmask reads it."""
        text = value.strip().lower()
        if text in _TRUE:
            self.event_mask = None
        elif text in _FALSE:
            self.event_mask = frozenset()
        else:
            classes = frozenset(c.strip() for c in text.split(",") if c.strip())
            self.event_mask = None if "all" in classes else classes

    # -- actions ------------------------------------------------------------------------

    async def _serve(self) -> None:
        await self.pbx.running()
        self.write(f"Asterisk Call Manager/{self.pbx.ami_version}\r\n".encode())
        while not self.closed:
            action = await self._queue.get()
            await self.pbx.running()
            if self.closed:
                return
            try:
                await self._handle(action)
            except Exception:  # a bug here must not kill the simulated PBX
                log.exception("%s: %r failed", self.pbx.name, action)
                self.reply(error(action, "Internal error in the simulator"))
            self.pbx.flush()

    async def _handle(self, a: Action) -> None:
        name = a.name.lower()
        if not name:
            self.reply(error(a, "Missing action in request"))
        elif name == "login":
            await self._login(a)
        elif name == "challenge":
            self._challenge(a)
        elif name == "logoff":
            self.reply(response(a, "Goodbye", ("Message", "Thanks for all the fish.")))
            self.close()
        elif not self.authenticated:
            self.reply(error(a, "Permission denied"))
        elif name in CONTROL_ACTIONS:
            await self._control(a)
        elif name in HANDLERS:
            await HANDLERS[name](self.pbx, self, a)
        elif name in _KNOWN_ACTIONS:
            self.reply(error(a, f"{a.name} is not implemented by the amiworker simulator"))
        else:
            self.reply(
                error(
                    a,
                    f"Invalid/unknown command: {a.name}. "
                    "Use Action: ListCommands to show available commands.",
                )
            )
            self._security_event(
                "RequestBadFormat",
                "Error",
                f"SessionID: {self.session_id}\r\nLocalAddress: {self.local_address}\r\n"
                f"RemoteAddress: {self.remote_address}\r\nRequestType: Action: {a.name}\r\n"
                f"SessionTV: {self.session_tv}\r\nAccountID: {self.username}\r\n",
            )

    def _security_event(self, event: str, severity: str, body: str) -> None:
        self.pbx.engine.emit(
            event,
            "security,all",
            f"EventTV: {event_tv(time.time())}\r\nSeverity: {severity}\r\nService: AMI\r\n"
            f"EventVersion: 1\r\n{body}",
        )

    def _challenge(self, a: Action) -> None:
        if a.get("AuthType").lower() != "md5":
            self.reply(error(a, "Must specify AuthType"))
            return
        if not self.challenge:
            self.challenge = str(random.randrange(2**31))
        self.reply(response(a, "Success", ("Challenge", self.challenge)))

    def _credentials_match(self, a: Action) -> bool:
        pbx = self.pbx
        if a.get("Username").lower() != pbx.username.lower():  # users are looked up caselessly
            return False
        if a.get("AuthType").lower() == "md5":
            if not self.challenge:
                return False
            expected = hashlib.md5((self.challenge + pbx.secret).encode()).hexdigest()
            return a.get("Key") == expected  # manager.c compares the lower-case hex exactly
        return a.get("Secret") == pbx.secret

    async def _login(self, a: Action) -> None:
        if a.get("Events"):
            self.set_event_mask(a.get("Events"))
        if not self._credentials_match(a):
            # Asterisk sleeps before answering a failed login, then hangs up.
            await asyncio.sleep(self.pbx.login_failure_delay)
            self.reply(error(a, "Authentication failed"))
            self.close()
            return
        # Events raised before this login go to the sessions that were there, not to this one.
        self.pbx.flush()
        self.authenticated = True
        self.username = a.get("Username")
        self.write(ack(a, "Authentication accepted"))
        if self.event_mask is None or "system" in self.event_mask:
            uptime = int(time.time() - self.pbx.started_at)
            self.write(
                "Event: FullyBooted\r\nPrivilege: system,all\r\n"
                f"Uptime: {uptime}\r\nLastReload: {uptime}\r\nStatus: Fully Booted\r\n\r\n".encode()
            )
        self._security_event(
            "SuccessfulAuth",
            "Informational",
            f"AccountID: {self.username}\r\nSessionID: {self.session_id}\r\n"
            f"LocalAddress: {self.local_address}\r\nRemoteAddress: {self.remote_address}\r\n"
            f"UsingPassword: 0\r\nSessionTV: {self.session_tv}\r\n",
        )

    async def _control(self, a: Action) -> None:
        """The simulator-only ``Sim*`` actions (see the simulator module docstring)."""
        pbx = self.pbx
        name = a.name.lower()
        if name == "simstats":
            self.reply(
                response(
                    a,
                    "Success",
                    ("EventsSent", str(pbx.events_sent)),
                    ("CallsStarted", str(pbx.engine.calls_started)),
                    ("CallsCompleted", str(pbx.engine.calls_completed)),
                    ("Sessions", str(pbx.sessions)),
                )
            )
        elif name == "simdropsessions":
            self.reply(ack(a, "Dropping every session"))
            asyncio.get_running_loop().call_soon(pbx.drop_sessions_now)
        elif name == "simstall":
            seconds = a.get("Seconds")
            try:
                duration = float(seconds) if seconds else None
            except ValueError:
                self.reply(error(a, f"Seconds must be a number, not {seconds!r}"))
                return
            self.reply(ack(a, "Stalled"))
            pbx.stall(duration)
        elif name == "simresume":
            self.write(ack(a, "Resumed"))  # not reply(): held events follow the resume
            pbx.resume()
        elif name == "simsendraw":
            try:
                data = base64.b64decode(a.get("Data"), validate=True)
            except (binascii.Error, ValueError):
                self.reply(error(a, "Data must be base64"))
                return
            self.reply(ack(a, f"Sent {len(data)} bytes"))
            await pbx.send_raw(data)
        elif name == "simslowwrite":
            text = a.get("BytesPerSecond").strip()
            limit = int(text) if text.isdigit() and int(text) > 0 else None
            self.reply(ack(a, f"Writing at {limit} bytes/s" if limit else "Writing at full speed"))
            pbx.slow_write(limit)
        elif name == "simcalls":
            count, rate = a.get("Count").strip(), a.get("Rate").strip()
            try:
                new_rate = float(rate) if rate else None
                new_calls = int(count) if count else 0
            except ValueError:
                self.reply(error(a, "Count must be an integer and Rate a number"))
                return
            self.reply(ack(a, "Calls updated"))
            if new_rate is not None:
                pbx.engine.set_rate(new_rate)
            for _ in range(new_calls):
                pbx.engine.start_call()
        pbx.flush()
