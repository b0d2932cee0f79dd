"""Hostile and broken PBXs, one pool: each costs its own session, nothing else.

A :class:`ServerPool` holds sessions with a misbehaving "pbx1" and a healthy
"pbx2" making calls. Whatever pbx1 does (a message over the size limit, bytes
that are not AMI, a banner that never comes, one byte per second), its session
ends or is refused with ONE log line naming pbx1 and the cause, the pool keeps
retrying it, and pbx2's events keep arriving, every one, in order, without a
pause. Header values with CR or LF never reach a PBX at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from amiworker.ami.connection import Connection
from amiworker.ami.message import Message
from amiworker.ami.pool import ServerPool
from amiworker.ami.protocol import Parser
from amiworker.devstack.embedded_mongo import EmbeddedMongo
from amiworker.fleet.dedup import races
from amiworker.fleet.dispatch import load_handlers
from amiworker.fleet.worker import Worker
from amiworker.mongo import close_client, open_client
from amiworker.settings import ServerSettings, Settings
from amiworker.sim.pbx import FakePBX
from tests.waiting import wait_for

StartPBX = Callable[..., Awaitable[FakePBX]]
Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

#: Fast enough to keep the tests short, slow enough for a loaded 2-core machine.
POOL_OPTIONS: dict[str, Any] = {
    "reconnect_min": 0.05,
    "reconnect_max": 0.2,
    "connect_timeout": 1.0,
    "ping_interval": 0.3,
    "ping_timeout": 1.0,
    "max_message_size": 64 * 1024,
}
#: The longest pbx2 may go without delivering an event while it makes 20 calls/s.
MAX_GAP = 1.0


def server(name: str, port: int) -> ServerSettings:
    return ServerSettings(
        name=name, host="127.0.0.1", port=port, username="admin", secret=SecretStr("secret")
    )


class Arrivals:
    """The pool's ``on_event``: every event of every PBX, with when it arrived."""

    def __init__(self) -> None:
        self.by_server: dict[str, list[tuple[float, Message]]] = defaultdict(list)

    def __call__(self, name: str, message: Message, own_action: bool) -> None:
        self.by_server[name].append((time.monotonic(), message))

    def raws(self, name: str) -> list[bytes]:
        return [m.raw for _, m in self.by_server[name] if m.name != "FullyBooted"]

    def times(self, name: str, start: float, end: float) -> list[float]:
        return [t for t, _ in self.by_server[name] if start <= t <= end]


class RawServer:
    """A TCP server that runs ``behaviour`` on each connection; counts what happens."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.accepted = 0
        self.closed_by_client = 0  # connections the client gave up on (EOF seen)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        with contextlib.suppress(ConnectionError):
            await self.behaviour(reader, writer)
            if not await reader.read():  # the client hung up
                self.closed_by_client += 1
        writer.close()


async def http_400(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Something else on the port: a web server, or a proxy answering for one."""
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    await writer.drain()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accepts, then says nothing: a firewall's tarpit, or a service waiting to be spoken to."""


def our_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every warning or error amiworker logged (the simulator's own lines left out)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and not r.name.startswith("amiworker.sim")
    ]


@contextlib.asynccontextmanager
async def beside_a_healthy_pbx(
    victim_port: int, healthy: FakePBX, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[tuple[ServerPool, Arrivals]]:
    """A pool with pbx1 (the victim) and pbx2 (healthy, 20 calls/s once connected).

    On the way out, checks that pbx2 never noticed: the same session all along,
    every event it sent received in order, no pause longer than MAX_GAP, and
    no warning naming it.
    """
    caplog.set_level(logging.DEBUG, logger="amiworker")
    arrivals = Arrivals()
    pool = ServerPool(
        [server("pbx1", victim_port), server("pbx2", healthy.port)],
        on_event=arrivals,
        **POOL_OPTIONS,
    )
    async with pool, asyncio.timeout(30):
        await wait_for(lambda: pool.connection("pbx2") is not None, what="pbx2 connected")
        session = pool.connection("pbx2")
        healthy.engine.set_rate(20.0)
        await healthy.start_call()
        started = time.monotonic()
        yield pool, arrivals
        ended = time.monotonic()
        healthy.engine.set_rate(0.0)
        await wait_for(
            lambda: arrivals.raws("pbx2") == healthy.sent_events,
            timeout=10,
            what="every event pbx2 sent, in order",
        )
        assert pool.connection("pbx2") is session
        assert pool.status()["pbx2"]["reconnects"] == 0
    times = arrivals.times("pbx2", started, ended)
    assert len(times) > 10, "pbx2 made calls while pbx1 misbehaved"
    gaps = [b - a for a, b in zip([started, *times], [*times, ended], strict=True)]
    assert max(gaps) < MAX_GAP, f"pbx2 delivered nothing for {max(gaps):.2f} s"
    assert not [line for line in our_warnings(caplog) if "pbx2" in line]


def assert_one_line(caplog: pytest.LogCaptureFixture, port: int, *causes: str) -> str:
    lines = our_warnings(caplog)
    assert len(lines) == 1, lines
    (line,) = lines
    assert f"pbx1 (127.0.0.1:{port})" in line
    for cause in causes:
        assert cause in line, line
    return line


# -- the hostile PBXs ---------------------------------------------------------------------------


async def test_a_message_over_the_size_limit_ends_that_session_only(
    fake_pbx_factory: StartPBX, caplog: pytest.LogCaptureFixture
) -> None:
    victim = await fake_pbx_factory(name="pbx1")
    healthy = await fake_pbx_factory(name="pbx2")
    async with beside_a_healthy_pbx(victim.port, healthy, caplog) as (pool, arrivals):
        await pool.wait_connected(5)
        await victim.start_call()  # events before the huge one are still delivered
        before = len(victim.sent_events)
        await victim.send_raw(b"Event: Huge\r\nData: " + b"x" * 200_000 + b"\r\n\r\n")
        await wait_for(
            lambda: pool.status()["pbx1"]["reconnects"] == 1 and pool.status()["pbx1"]["connected"],
            what="pbx1 reconnected",
        )
        assert set(victim.sent_events[:before]) <= set(arrivals.raws("pbx1"))
        linkedid = await victim.start_call()  # and the new session works
        await wait_for(
            lambda: any(m.get("Linkedid") == linkedid for _, m in arrivals.by_server["pbx1"]),
            what="an event of a call on pbx1's new session",
        )
    assert_one_line(caplog, victim.port, "AMI session lost: protocol error", "65536")


async def test_a_peer_that_answers_http_is_refused_in_one_line_and_retried(
    fake_pbx_factory: StartPBX, caplog: pytest.LogCaptureFixture
) -> None:
    healthy = await fake_pbx_factory(name="pbx2")
    async with (
        RawServer(http_400) as web,
        beside_a_healthy_pbx(web.port, healthy, caplog) as (pool, _),
    ):
        await wait_for(lambda: web.accepted >= 5, what="four more attempts at the web server")
        assert not pool.status()["pbx1"]["connected"]
        assert "not an AMI server" in (pool.status()["pbx1"]["last_error"] or "")
    assert_one_line(caplog, web.port, "not an AMI server", "'HTTP/1.1 400 Bad Request'")


async def test_a_banner_that_never_comes_is_given_up_on_in_one_line_and_retried(
    fake_pbx_factory: StartPBX, caplog: pytest.LogCaptureFixture
) -> None:
    healthy = await fake_pbx_factory(name="pbx2")
    async with RawServer(silent) as tarpit, beside_a_healthy_pbx(tarpit.port, healthy, caplog):
        await wait_for(
            lambda: tarpit.closed_by_client >= 2 and tarpit.accepted >= 3,
            timeout=10,
            what="two attempts given up on, and a third",
        )
    assert_one_line(caplog, tarpit.port, "sent no AMI banner within 1 s", "AMI port")


async def test_a_pbx_writing_one_byte_per_second_is_dropped_in_one_line_and_retried(
    fake_pbx_factory: StartPBX, caplog: pytest.LogCaptureFixture
) -> None:
    victim = await fake_pbx_factory(name="pbx1")
    healthy = await fake_pbx_factory(name="pbx2")
    async with beside_a_healthy_pbx(victim.port, healthy, caplog) as (pool, _):
        await pool.wait_connected(5)
        victim.slow_write(1)
        await wait_for(lambda: bool(our_warnings(caplog)), timeout=5, what="pbx1 dropped")
        # New sessions get their banner at one byte per second too: given up on.
        await wait_for(
            lambda: sum("AMI attempt failed" in r.getMessage() for r in caplog.records) >= 2,
            timeout=10,
            what="two attempts given up on",
        )
        victim.slow_write(None)
        await wait_for(
            lambda: pool.status()["pbx1"]["reconnects"] == 1 and pool.status()["pbx1"]["connected"],
            timeout=10,
            what="pbx1 back at full speed",
        )
    assert_one_line(caplog, victim.port, "AMI session lost: no Ping reply within 1 s")


# -- header injection -----------------------------------------------------------------------------


class Wiretap:
    """A loopback relay to a PBX that keeps every byte the client sent."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sent = bytearray()
        self.client_closed = 0  # connections whose client hung up: all it sent is in sent
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Wiretap:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, keep: bool
        ) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    if keep:
                        self.sent += data
                    sink.write(data)
                    await sink.drain()
            self.client_closed += keep
            sink.close()

        self._tasks += [
            asyncio.create_task(pipe(reader, up_writer, True)),
            asyncio.create_task(pipe(up_reader, writer, False)),
        ]

    def actions(self, start: int = 0) -> list[Message]:
        return Parser(banner=False).feed(bytes(self.sent[start:]))


INJECTED = "x\r\nAction: Originate\r\nChannel: Local/666@test"
CALL = ("Local/100@test", "test", "200", 1)


def injections(conn: Connection) -> list[tuple[str, Awaitable[object]]]:
    return [
        ("action value", conn.action("UserEvent", UserEvent=INJECTED)),
        ("repeated value", conn.action("UserEvent", UserEvent="ok", Variable=["a=1", INJECTED])),
        ("header name", conn.action("UserEvent", {"X\r\nAction": "Originate"})),
        ("action name", conn.action("Ping\r\nAction: Originate")),
        ("bare LF", conn.action("UserEvent", UserEvent="x\nAction: Originate")),
        ("bare CR", conn.action("UserEvent", UserEvent="x\rAction: Originate")),
        ("command", conn.command("core show version\r\n\r\nAction: Originate")),
        ("set_var", conn.set_var(None, "A", INJECTED)),
        ("redirect", conn.redirect(INJECTED, "test", "200", 1)),
        ("get_config", conn.get_config("extensions.conf\r\n")),
        ("extension_state", conn.extension_state("100", INJECTED)),
        ("status", conn.status(variables=[INJECTED])),
        ("originate caller id", conn.originate(*CALL, caller_id=INJECTED)),
        ("originate variable", conn.originate(*CALL, variables={"A": INJECTED})),
    ]


async def test_header_values_with_cr_or_lf_are_refused_before_anything_is_sent(
    fake_pbx: FakePBX,
) -> None:
    async with Wiretap(fake_pbx.port) as tap, asyncio.timeout(10):
        conn = await Connection.open("127.0.0.1", tap.port, "admin", "secret", name="pbx1")
        await conn.ping()
        before = len(tap.sent)
        for what, attempt in injections(conn):
            with pytest.raises(ValueError, match="CR or LF") as caught:
                await attempt
            assert "AMI header injection" in str(caught.value), what
        assert await conn.ping() >= 0  # the session is fine, and nothing else was sent
        assert [a["Action"] for a in tap.actions(before)] == ["Ping"]
        await conn.logoff()
    assert fake_pbx.engine.calls_started == 0  # no injected Originate ran


@pytest.mark.parametrize(
    ("field", "value"),
    [("username", "admin\r\nAction: Originate"), ("events", "on\nAction: Originate")],
)
async def test_login_headers_with_cr_or_lf_are_refused_before_the_login_is_sent(
    fake_pbx: FakePBX, field: str, value: str
) -> None:
    credentials = {"username": "admin", "events": "on", field: value}
    async with Wiretap(fake_pbx.port) as tap, asyncio.timeout(10):
        with pytest.raises(ValueError, match="CR or LF"):
            await Connection.open(
                "127.0.0.1",
                tap.port,
                credentials["username"],
                "secret",
                events=credentials["events"],
                auth="plain",
            )
        await wait_for(lambda: tap.client_closed == 1, what="the client to hang up")
        assert tap.actions() == []  # not even the Login


# -- hostile bytes that reach the store ---------------------------------------------------------


async def test_a_header_name_with_a_nul_byte_does_not_stop_the_worker(
    fake_pbx_factory: StartPBX, mongo_server: EmbeddedMongo, database_name: str, tmp_path: Path
) -> None:
    pbx = await fake_pbx_factory(name="pbx1")
    (tmp_path / "nul_handlers.py").write_text("async def HangupHandler(ctx, event):\n    pass\n")
    settings = Settings.load(
        None,
        env_file=None,
        servers=[server("pbx1", pbx.port).model_dump() | {"secret": "secret"}],
        mongo_uri=mongo_server.uri,
        database=database_name,
        handlers=["nul_handlers"],
        app_dir=tmp_path,
        heartbeat_interval=0.2,
        lease=1.0,
    )
    path_before = list(sys.path)
    worker = Worker(settings, load_handlers(settings.handlers, settings.app_dir))
    task = asyncio.create_task(worker.run())
    client = open_client(mongo_server.uri, serverSelectionTimeoutMS=5000)
    events = client[database_name]["events"]
    try:
        await worker.pool.wait_connected(10)
        await pbx.send_raw(b"Event: Newchannel\r\nUniqueid: 1.1\r\nLinked\x00id: 1.1\r\n\r\n")
        linkedid = await pbx.start_call()
        await wait_for(lambda: pbx.engine.calls_completed == 1, what="the call to end")
        sent = Parser(banner=False).feed(b"".join(pbx.sent_events))
        expected = sum(races(m, "channel") and m.get("Linkedid") == linkedid for m in sent)

        async def call_stored() -> bool:
            return bool(await events.count_documents({"linkedid": linkedid}) == expected)

        await wait_for(call_stored, timeout=5, what="the next call stored")
        assert await events.count_documents({"uniqueid": "1.1"}) == 1  # kept, storable
    finally:
        worker.stop()
        try:
            await asyncio.wait_for(task, 30)
        finally:
            await client.drop_database(database_name)
            await close_client(client)
            sys.path[:] = path_before
            sys.modules.pop("nul_handlers", None)
