"""The AMI client session against a scripted server that replays real Asterisk 22 replies.

``ScriptedPBX`` answers each action with the bytes Asterisk 22.10.1 sent in
tests/fixtures (ActionID swapped for the client's), so these tests check the
client against real traffic; per-action overrides script the failures.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import ssl as ssl_module
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from amiworker.ami.connection import Connection
from amiworker.ami.errors import (
    ActionFailed,
    ActionTimeout,
    AuthenticationFailed,
    ConnectError,
    ConnectionFinished,
)
from amiworker.ami.message import Message
from amiworker.ami.protocol import Parser
from amiworker.sim.pbx import FakePBX
from tests.waiting import wait_for

FIXTURES = Path(__file__).parent / "fixtures"
SECRET = "amisecret"
CHALLENGE = "213956528"


def _messages(name: str) -> list[Message]:
    return Parser().feed((FIXTURES / name).read_bytes())


def _by_action_id(messages: list[Message]) -> dict[str, list[Message]]:
    """Recorded ActionID ("ping-2") -> every message that carries it, in order."""
    groups: dict[str, list[Message]] = {}
    for message in messages:
        if message.action_id:
            groups.setdefault(message.action_id, []).append(message)
    return groups


ACTIONS = _messages("asterisk22-actions.txt")
RECORDED = _by_action_id(ACTIONS) | {
    "md5-" + k: v for k, v in _by_action_id(_messages("asterisk22-md5-login.txt")).items()
}
BAD_LOGIN = _messages("asterisk22-bad-login.txt")[0]
CALLS = _messages("asterisk22-20-calls.txt")
# The call events of that capture: broadcast, no ActionID (login and its events left out).
CALL_EVENTS = [m for m in CALLS[3:] if m.kind == "event" and not m.action_id]
# The first action of each name in the actions capture: "coreshowchannels" -> "coreshowchannels-3".
FIRST_REPLY = {k.rsplit("-", 1)[0]: k for k in reversed(list(RECORDED)) if not k.startswith("md5")}
COMMANDS = {"core show version": "command-4", "core show uptime": "command-5"}


def replay(messages: list[Message], action_id: str) -> bytes:
    """The recorded bytes, with the recorded ActionID replaced by the client's."""
    out = []
    for message in messages:
        recorded = message.action_id
        raw = message.raw
        if recorded:
            raw = raw.replace(
                f"ActionID: {recorded}\r\n".encode(), f"ActionID: {action_id}\r\n".encode()
            )
        out.append(raw)
    return b"".join(out)


Handler = Callable[["Session", Message], Awaitable[None]]


class Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


class ScriptedPBX:
    """A tiny AMI server; ``handlers[action_name_lowercase]`` overrides the recorded answer."""

    def __init__(
        self,
        *,
        banner: bytes = b"Asterisk Call Manager/11.0.0\r\n",
        port: int = 0,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.banner = banner
        self.secret = SECRET
        self._ssl = ssl
        self.handlers: dict[str, Handler] = {}
        self.received: list[Message] = []
        self.sessions: list[Session] = []
        self.login_failure_delay = 0.05
        self.port = port
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedPBX:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, ssl=self._ssl
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.drop()
        await self._server.wait_closed()

    def drop(self) -> None:
        for session in self.sessions:
            session.close()

    async def broadcast(self, data: bytes) -> None:
        for session in self.sessions:
            await session.send(data)

    def actions(self, name: str) -> list[Message]:
        return [m for m in self.received if (m.get("Action") or "").lower() == name.lower()]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(reader, writer)
        self.sessions.append(session)
        parser = Parser(banner=False)
        try:
            writer.write(self.banner)
            while data := await reader.read(65536):
                for action in parser.feed(data):
                    self.received.append(action)
                    await self._answer(session, action)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _answer(self, session: Session, action: Message) -> None:
        name = (action.get("Action") or "").lower()
        action_id = action.action_id or ""
        handler = self.handlers.get(name)
        if handler is not None:
            await handler(session, action)
        elif name == "challenge":
            await session.send(replay(RECORDED["md5-challenge-1"], action_id))
        elif name == "login":
            expected = hashlib.md5((CHALLENGE + self.secret).encode()).hexdigest()
            if action.get("Secret") == self.secret or action.get("Key") == expected:
                login = replay(ACTIONS[:3], action_id)  # reply, FullyBooted, SuccessfulAuth
                await session.send(login)
            else:
                await asyncio.sleep(self.login_failure_delay)  # as Asterisk does
                await session.send(replay([BAD_LOGIN], action_id))
                session.close()
        elif name == "logoff":
            await session.send(replay(RECORDED["logoff-18"], action_id))
            session.close()
        elif name == "command":
            recorded = COMMANDS.get(action.get("Command") or "", "command-6")
            await session.send(replay(RECORDED[recorded], action_id))
        else:
            recorded = FIRST_REPLY.get(name, "nosuchaction-16")
            await session.send(replay(RECORDED[recorded], action_id))


async def ignore(session: Session, action: Message) -> None:
    """A handler for an action the PBX never answers."""


@pytest.fixture
async def pbx() -> AsyncIterator[ScriptedPBX]:
    async with ScriptedPBX() as server:
        yield server


async def open_conn(pbx: ScriptedPBX, **options: object) -> Connection:
    options.setdefault("auth", "plain")
    return await Connection.open(
        "127.0.0.1",
        pbx.port,
        "amiuser",
        SECRET,
        name="pbx1",
        **options,  # type: ignore[arg-type]
    )


# -- login ------------------------------------------------------------------------------


async def test_plain_login_reads_banner_and_pings(pbx: ScriptedPBX) -> None:
    async with asyncio.timeout(5):
        conn = await open_conn(pbx)
        assert conn.is_open and conn.ami_version == "11.0.0" and conn.name == "pbx1"
        response = await conn.action("Ping")
        assert response.ok and response["ping"] == "Pong" and response.get("Timestamp")
        assert 0 <= await conn.ping() < 5
        login = pbx.actions("Login")[0]
        assert login["Username"] == "amiuser" and login["Secret"] == SECRET
        assert login["Events"] == "on"
        conn.close()
        await conn.wait_closed()
        assert conn.close_reason == "closed by the client" and not conn.is_open


async def test_md5_login_sends_the_key_never_the_secret(pbx: ScriptedPBX) -> None:
    async with asyncio.timeout(5):
        conn = await open_conn(pbx, auth="md5", events="call,system")
        challenge, login = pbx.actions("Challenge")[0], pbx.actions("Login")[0]
        assert challenge["AuthType"] == "MD5"
        assert login["AuthType"] == "MD5" and "Secret" not in login
        assert login["Key"] == hashlib.md5((CHALLENGE + SECRET).encode()).hexdigest()
        assert login["Events"] == "call,system"
        assert SECRET.encode() not in b"".join(m.raw for m in pbx.received)
        await conn.logoff()
        assert conn.close_reason == "logged off"


@pytest.mark.parametrize("auth", ["md5", "plain"])
async def test_wrong_secret_raises_authentication_failed(pbx: ScriptedPBX, auth: str) -> None:
    async with asyncio.timeout(5):
        with pytest.raises(AuthenticationFailed) as caught:
            await Connection.open("127.0.0.1", pbx.port, "amiuser", "WRONG-s3cret", auth=auth)  # type: ignore[arg-type]
        text = str(caught.value) + repr(caught.value)
        assert "Authentication failed" in text and "amiuser" in text
        assert "WRONG-s3cret" not in text


async def test_a_secret_with_a_line_break_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValueError, match="CR or LF") as caught:
        await Connection.open("127.0.0.1", 1, "u", "Qz7\r\nVx9")
    assert "Qz7" not in str(caught.value) and "Vx9" not in str(caught.value)


# -- connect errors ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_refused_port_raises_connect_error_at_once() -> None:
    port = _free_port()
    started = time.monotonic()
    async with asyncio.timeout(5):
        with pytest.raises(ConnectError, match=rf"127\.0\.0\.1:{port}.*connection refused"):
            await Connection.open("127.0.0.1", port, "u", "s", timeout=2.0, name="pbx9")
    assert time.monotonic() - started < 2.0


async def test_silent_host_raises_connect_error_within_the_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept, say nothing
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        async with asyncio.timeout(5):
            with pytest.raises(ConnectError, match=r"no AMI banner within 0\.3 s"):
                await Connection.open("127.0.0.1", port, "u", "s", timeout=0.3)
        assert time.monotonic() - started < 1.0
    finally:
        server.close()
        await server.wait_closed()


async def test_a_server_that_is_not_ami_raises_connect_error() -> None:
    async with ScriptedPBX(banner=b"HTTP/1.1 400 Bad Request\r\n\r\n") as http, asyncio.timeout(5):
        with pytest.raises(ConnectError, match=r"not an AMI server.*HTTP/1\.1 400"):
            await Connection.open("127.0.0.1", http.port, "u", "s")


async def test_a_pbx_that_never_answers_login_raises_connect_error(pbx: ScriptedPBX) -> None:
    pbx.handlers["login"] = ignore
    async with asyncio.timeout(5):
        with pytest.raises(ConnectError, match=r"did not answer Login within 0\.3 s"):
            await open_conn(pbx, timeout=0.3)


# -- actions -------------------------------------------------------------------------------


async def test_event_lists_complete_on_the_protocol_markers(pbx: ScriptedPBX) -> None:
    async with asyncio.timeout(5):
        conn = await open_conn(pbx)
        assert await conn.core_show_channels() == []
        assert await conn.status() == []
        queue = await conn.action("QueueStatus")
        assert queue.ok and [e.name for e in queue.events] == ["QueueParams"]
        assert queue.events[0]["Queue"] == "testq"
        assert queue.complete_event is not None
        assert queue.complete_event.name == "QueueStatusComplete"
        db = await conn.action("DBGet", Family="rp", Key="k1")
        assert [e["Val"] for e in db.events] == ["v1"]
        conn.close()


async def test_command_output_and_errors(pbx: ScriptedPBX) -> None:
    async with asyncio.timeout(5):
        conn = await open_conn(pbx)
        version = await conn.command("core show version")
        assert version == [
            "Asterisk 22.10.1 built by root @ vm on a x86_64 running Linux"
            " on 2026-11-26 06:40:32 UTC"
        ]
        assert await conn.command("core show uptime") == [
            "System uptime: 23 seconds",
            "Last reload: 23 seconds",
        ]
        with pytest.raises(ActionFailed, match="No such command 'no such cli command'") as caught:
            await conn.command("no such cli command")
        assert not caught.value.response.ok
        conn.close()


async def test_legacy_command_format(pbx: ScriptedPBX) -> None:
    async def follows(session: Session, action: Message) -> None:
        await session.send(
            b"Response: Follows\r\nPrivilege: Command\r\nActionID: "
            + (action.action_id or "").encode()
            + b"\r\nAsterisk 13.38.3 built by x\n\nline: with colon\n--END COMMAND--\r\n\r\n"
        )

    pbx.handlers["command"] = follows
    async with asyncio.timeout(5):
        conn = await open_conn(pbx)
        assert await conn.command("core show version") == [
            "Asterisk 13.38.3 built by x",
            "",
            "line: with colon",
        ]
        conn.close()


async def test_get_config_and_json(pbx: ScriptedPBX) -> None:
    async with asyncio.timeout(5):
        conn = await open_conn(pbx)
        config = await conn.get_config("extensions.conf")
        assert [c.name for c in config] == ["general", "globals", "test"]
        assert config[0].get("static") == "yes" and config[1].lines == (("PBXNAME", "pbx1"),)
        assert config[2].lines[0] == ("exten", "100,1,Answer()")
        assert config[2].getall("exten") == [
            "100,1,Answer()",
            "200,1,Answer()",
            "300,1,Answer()",
            "400,1,Answer()",
        ]
        assert pbx.actions("GetConfig")[0]["Filename"] == "extensions.conf"
        parsed = await conn.get_config_json("manager.conf")
        assert parsed["general"]["port"] == "5038"
        conn.close()


async def test_error_reply_completes_at_once_with_ok_false(pbx: ScriptedPBX) -> None:
    async with asyncio.timeout(5):
        conn = await open_conn(pbx)
        response = await conn.action("NoSuchAction")
        assert not response.ok and response.name == "Error"
        assert response.message.startswith("Invalid/unknown command: NoSuchAction")
        assert (
            response.raw.startswith(b"Response: Error\r\n")
            and response.message_obj["response"] == "Error"
        )
        conn.close()


async def test_action_ids_are_unique_and_concurrent_actions_correlate(pbx: ScriptedPBX) -> None:
    async with asyncio.timeout(5):
        conn = await open_conn(pbx)
        replies = await asyncio.gather(*(conn.action("Ping") for _ in range(50)))
        sent = [m.action_id for m in pbx.actions("Ping")]
        assert len(set(sent)) == 50 and all(i and i.startswith("amiworker-") for i in sent)
        assert sorted(r.action_id or "" for r in replies) == sorted(i or "" for i in sent)
        conn.close()


async def test_header_injection_is_refused_before_sending(pbx: ScriptedPBX) -> None:
    async with asyncio.timeout(5):
        conn = await open_conn(pbx)
        with pytest.raises(ValueError, match="CR or LF"):
            await conn.action("UserEvent", UserEvent="x\r\nAction: Logoff")
        await conn.ping()
        assert pbx.actions("UserEvent") == [] and pbx.actions("Logoff") == []
        conn.close()


async def test_action_timeout_then_late_reply_is_dropped(pbx: ScriptedPBX) -> None:
    late: list[tuple[Session, Message]] = []

    async def hold(session: Session, action: Message) -> None:
        late.append((session, action))

    pbx.handlers["coreshowchannels"] = hold
    seen: list[Message] = []
    async with asyncio.timeout(5):
        conn = await open_conn(pbx, on_event=lambda m, own: seen.append(m))
        with pytest.raises(ActionTimeout, match=r"CoreShowChannels got no answer .* within 0\.2 s"):
            await conn.action("CoreShowChannels", timeout=0.2)
        before = len(seen)
        session, action = late[0]
        item = CALL_EVENTS[0].raw  # any event, sent as a late list item with that ActionID
        item = item.replace(
            b"\r\n\r\n", b"\r\nActionID: " + (action.action_id or "").encode() + b"\r\n\r\n"
        )
        await session.send(
            replay(RECORDED["coreshowchannels-3"][:1], action.action_id or "") + item
        )
        assert (await conn.action("Ping")).ok  # the session lives on
        assert len(seen) == before  # the late reply and its list item went nowhere
        conn.close()


# -- events ---------------------------------------------------------------------------------


async def test_events_reach_callbacks_and_the_iterator_in_order(pbx: ScriptedPBX) -> None:
    calls = CALL_EVENTS
    seen: list[tuple[str, bool]] = []
    async with asyncio.timeout(5):
        conn = await open_conn(pbx, on_event=lambda m, own: seen.append((m.name, own)))
        await pbx.broadcast(b"".join(m.raw for m in calls[:100]))
        await wait_for(lambda: len(seen) >= 102, what="100 events after the 2 login events")
        assert [name for name, _ in seen[:2]] == ["FullyBooted", "SuccessfulAuth"]
        assert [name for name, _ in seen[2:]] == [m.name for m in calls[:100]]
        assert not any(own for _, own in seen)
        received = []
        async for message, _own in conn.events():
            received.append(message)
            if len(received) == 102:
                break
        assert received[2:] == calls[:100]  # same bytes
        conn.close()
        assert [m async for m, _ in conn.events()] == []  # ends with the session


async def test_user_event_carrying_our_action_id_after_the_reply_is_ordinary(
    pbx: ScriptedPBX,
) -> None:
    seen: list[tuple[Message, bool]] = []
    async with asyncio.timeout(5):
        conn = await open_conn(pbx, on_event=lambda m, own: seen.append((m, own)))
        response = await conn.action("UserEvent", UserEvent="Probe", Foo="bar")
        assert response.ok and response.message == "Event Sent"
        await wait_for(lambda: any(m.name == "UserEvent" for m, _ in seen), what="the UserEvent")
        event, own = next((m, own) for m, own in seen if m.name == "UserEvent")
        assert event.action_id == response.action_id and own is False
        conn.close()


async def test_originate_returns_its_originate_response(pbx: ScriptedPBX) -> None:
    queued, answer = _by_action_id(CALLS)["c20p5038-orig-2"]  # reply, OriginateResponse
    reorder = False

    async def originate(session: Session, action: Message) -> None:
        reply = replay([queued], action.action_id or "")
        event = replay([answer], action.action_id or "")
        await session.send(event + reply if reorder else reply + CALL_EVENTS[5].raw + event)

    pbx.handlers["originate"] = originate
    seen: list[tuple[Message, bool]] = []
    async with asyncio.timeout(5):
        conn = await open_conn(pbx, on_event=lambda m, own: seen.append((m, own)))
        result = await conn.originate(
            "Local/100@test",
            context="test",
            exten="200",
            priority=1,
            caller_id="Test <1002>",
            variables={"A": "1", "B": "2"},
            timeout=20,
        )
        assert result.name == "OriginateResponse" and result["Response"] == "Success"
        assert result["Uniqueid"] == "c20p5038-2-1"
        sent = pbx.actions("Originate")[0]
        assert sent["Async"] == "true" and sent["Timeout"] == "20000"
        assert sent.getall("Variable") == ["A=1", "B=2"] and sent["CallerID"] == "Test <1002>"
        # The answer is also an event (others sessions see it), flagged as our own.
        assert (result, True) in seen and (CALL_EVENTS[5], False) in seen
        reorder = True  # the event before the reply must work too
        second = await conn.originate("Local/100@test", application="Wait", data="1")
        assert second.action_id == pbx.actions("Originate")[1].action_id != result.action_id
        assert pbx.actions("Originate")[1]["Application"] == "Wait"
        conn.close()


async def test_event_overflow_is_counted_and_never_stalls_the_reader(
    pbx: ScriptedPBX, caplog: pytest.LogCaptureFixture
) -> None:
    event = b"Event: VarSet\r\nPrivilege: dialplan,all\r\nVariable: x\r\nValue: 1\r\n\r\n"
    counted = 0

    def count(message: Message, own: bool) -> None:
        nonlocal counted
        counted += 1

    async with asyncio.timeout(10):
        conn = await open_conn(pbx, event_queue_size=10, on_event=count)
        await pbx.broadcast(event * 5000)
        await wait_for(lambda: counted == 5002, what="every event through the callback")
        assert (await conn.action("Ping")).ok
        assert conn.dropped_events == 5002 - 10
        warnings = [r for r in caplog.records if "event queue full" in r.getMessage()]
        assert len(warnings) == 1  # rate-limited
        queued = [m async for m, _ in _take(conn, 10)]
        assert [m.name for m in queued[:2]] == ["FullyBooted", "SuccessfulAuth"]
        conn.close()


async def _take(conn: Connection, n: int):  # type: ignore[no-untyped-def]
    iterator = conn.events()
    for _ in range(n):
        yield await anext(iterator)


async def test_a_failing_callback_is_logged_and_swallowed(
    pbx: ScriptedPBX, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(message: Message, own: bool) -> None:
        raise RuntimeError("handler bug")

    good: list[Message] = []
    async with asyncio.timeout(5):
        conn = await open_conn(pbx, on_event=broken)
        conn.on_event(lambda m, own: good.append(m))
        await pbx.broadcast(CALL_EVENTS[3].raw * 3)
        await wait_for(lambda: len(good) == 3, what="events after the broken callback")
        assert conn.is_open and "handler bug" in caplog.text
        conn.close()


# -- the end of a session ------------------------------------------------------------------


async def test_pbx_closing_mid_action_fails_pending_actions(pbx: ScriptedPBX) -> None:
    async def close(session: Session, action: Message) -> None:
        session.close()

    pbx.handlers["status"] = close
    pbx.handlers["coreshowchannels"] = ignore
    async with asyncio.timeout(5):
        conn = await open_conn(pbx)
        waiting = asyncio.create_task(conn.core_show_channels())
        await wait_for(lambda: bool(pbx.actions("CoreShowChannels")), what="the first action")
        with pytest.raises(ConnectionFinished, match="closed by the PBX"):
            await conn.status()
        with pytest.raises(ConnectionFinished) as caught:
            await waiting
        assert caught.value.reason == "closed by the PBX" == conn.close_reason
        with pytest.raises(ConnectionFinished):
            await conn.ping()  # after the end: at once, nothing hangs
        await conn.wait_closed()


async def test_close_fails_pending_actions(pbx: ScriptedPBX) -> None:
    pbx.handlers["ping"] = ignore
    async with asyncio.timeout(5):
        conn = await open_conn(pbx)
        waiting = asyncio.create_task(conn.ping())
        await wait_for(lambda: bool(pbx.actions("Ping")), what="the Ping")
        conn.close()
        with pytest.raises(ConnectionFinished, match="closed by the client"):
            await waiting


async def test_unanswered_keepalive_closes_a_dead_session_in_time(pbx: ScriptedPBX) -> None:
    pbx.handlers["ping"] = ignore
    async with asyncio.timeout(5):
        conn = await open_conn(pbx, ping_interval=0.2, ping_timeout=0.3)
        started = time.monotonic()
        await conn.wait_closed()
        assert time.monotonic() - started < 0.2 + 0.3 + 0.2
        assert conn.close_reason == "no Ping reply within 0.3 s"


async def test_keepalive_keeps_a_live_session_open(pbx: ScriptedPBX) -> None:
    async with asyncio.timeout(5):
        conn = await open_conn(pbx, ping_interval=0.05, ping_timeout=0.5)
        await wait_for(lambda: len(pbx.actions("Ping")) >= 4, what="4 keepalive Pings")
        assert conn.is_open
        conn.close()


async def test_protocol_error_delivers_what_came_before_and_ends_the_session(
    pbx: ScriptedPBX, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Message] = []
    async with asyncio.timeout(5):
        conn = await open_conn(pbx, max_message_size=4096, on_event=lambda m, own: seen.append(m))
        await pbx.broadcast(
            CALL_EVENTS[3].raw + b"Event: Huge\r\nData: " + b"x" * 10_000 + b"\r\n\r\n"
        )
        await conn.wait_closed()
        assert conn.close_reason is not None and conn.close_reason.startswith("protocol error: ")
        assert "exceeds the limit of 4096" in conn.close_reason
        assert seen[-1] == CALL_EVENTS[3]
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "pbx1" in errors[0].getMessage()


async def test_repr_never_shows_the_secret(pbx: ScriptedPBX) -> None:
    async with asyncio.timeout(5):
        conn = await open_conn(pbx)
        assert SECRET not in repr(conn) and SECRET not in str(vars(conn))
        assert "pbx1" in repr(conn) and "open" in repr(conn)
        conn.close()


# -- against the simulated PBX (amiworker.sim.pbx.FakePBX) --------------------------------

StartPBX = Callable[..., Awaitable[FakePBX]]


async def sim_conn(pbx: FakePBX, **options: Any) -> Connection:
    return await Connection.open("127.0.0.1", pbx.port, "admin", "secret", name=pbx.name, **options)


async def test_sim_every_helper_returns_a_typed_result(fake_pbx: FakePBX) -> None:
    async with asyncio.timeout(10):
        conn = await sim_conn(fake_pbx)
        assert conn.ami_version == "11.0.0" and 0 <= await conn.ping() < 5
        assert [p["ObjectName"] for p in await conn.sip_peers()] == ["100", "101", "provider"]
        assert [p["ObjectName"] for p in await conn.iax_peers()] == ["200", "iax-trunk"]
        config = await conn.get_config("extensions.conf")
        assert [c.name for c in config] == ["general", "globals", "test"]
        assert config[1].get("PBXNAME") == "pbx1"
        only_test = await conn.get_config("extensions.conf", category="test")
        assert [c.name for c in only_test] == ["test"]
        assert (await conn.get_config_json("manager.conf"))["general"]["enabled"] == "yes"
        with pytest.raises(ActionFailed, match="Config file not found"):
            await conn.get_config("nosuch.conf")
        version = await conn.command("core show version")
        assert len(version) == 1 and version[0].startswith("Asterisk 22.10.1 built by")
        state = await conn.extension_state("100", "test")
        assert (state.exten, state.context, state.status) == ("100", "test", -1)
        await conn.set_var(None, "AMIWORKER_GLOBAL", "42")
        assert (await conn.action("Getvar", Variable="AMIWORKER_GLOBAL"))["Value"] == "42"
        assert await conn.core_show_channels() == [] and await conn.status() == []

        originated = await conn.originate(
            "Local/100@test", context="test", exten="200", priority=1, timeout=5,
            caller_id="Probe <1001>", variables={"A": "1"},
        )  # fmt: skip
        assert originated.name == "OriginateResponse" and originated["Response"] == "Success"
        channels = await conn.core_show_channels()
        assert {c["Channel"] for c in channels} >= {originated["Channel"]}
        assert {s["Channel"] for s in await conn.status()} == {c["Channel"] for c in channels}
        await conn.redirect(originated["Channel"], "test", "300", 1)
        with pytest.raises(ActionFailed, match="Channel does not exist"):
            await conn.redirect("SIP/nobody-0000", "test", "300", 1)
        with pytest.raises(ActionFailed, match="No such channel"):
            await conn.set_var("SIP/nobody-0000", "X", "1")
        await conn.logoff()
        assert conn.close_reason == "logged off" and fake_pbx.sessions == 0


async def test_sim_legacy_command_format(fake_pbx_factory: StartPBX) -> None:
    pbx = await fake_pbx_factory(ami_version="2.10.6")
    async with asyncio.timeout(10):
        conn = await sim_conn(pbx, auth="plain")
        assert conn.ami_version == "2.10.6"
        output = await conn.command("core show uptime")
        assert output and output[0].startswith("System uptime:")
        # Asterisk <= 13 answers Follows even for an unknown command: nothing to raise on.
        unknown = await conn.command("no such cli command")
        assert unknown[0].startswith("No such command 'no such cli command'")
        conn.close()


async def test_sim_wrong_secret(fake_pbx: FakePBX) -> None:
    async with asyncio.timeout(10):
        with pytest.raises(AuthenticationFailed, match="Authentication failed") as caught:
            await Connection.open("127.0.0.1", fake_pbx.port, "admin", "not-the-secret")
        assert "not-the-secret" not in str(caught.value)


async def test_sim_events_reach_the_callback_and_the_iterator_byte_for_byte(
    fake_pbx: FakePBX,
) -> None:
    seen: list[Message] = []
    async with asyncio.timeout(10):
        conn = await sim_conn(fake_pbx, on_event=lambda m, own: seen.append(m))
        before = len(fake_pbx.sent_events)
        await fake_pbx.start_call()
        await fake_pbx.start_call()
        await wait_for(lambda: len(fake_pbx.sent_events) - before >= 78, what="two whole calls")
        sent = fake_pbx.sent_events[before:]
        await wait_for(lambda: [m.raw for m in seen[-len(sent) :]] == sent, what="every event")
        from_iterator: list[bytes] = []
        async for message, own in conn.events():
            assert not own
            from_iterator.append(message.raw)
            if from_iterator[-len(sent) :] == sent:
                break
        conn.close()


async def test_sim_overflow_is_counted_and_the_reader_keeps_up(fake_pbx: FakePBX) -> None:
    counted = 0

    def count(message: Message, own: bool) -> None:
        nonlocal counted
        counted += 1

    async with asyncio.timeout(10):
        conn = await sim_conn(fake_pbx, event_queue_size=20, on_event=count)
        await wait_for(lambda: counted >= 1, what="FullyBooted")
        base = counted
        first = len(fake_pbx.sent_events)
        for _ in range(10):
            await fake_pbx.start_call()
        await wait_for(lambda: len(fake_pbx.sent_events) - first >= 390, what="10 whole calls")
        await wait_for(lambda: counted - base == len(fake_pbx.sent_events) - first, what="all")
        assert conn.dropped_events == counted - 20 and conn.is_open
        assert (await conn.action("Ping")).ok
        conn.close()


async def test_sim_a_stalled_pbx_is_declared_dead_by_the_keepalive(fake_pbx: FakePBX) -> None:
    async with asyncio.timeout(10):
        conn = await sim_conn(fake_pbx, ping_interval=0.2, ping_timeout=0.3)
        fake_pbx.stall()
        started = time.monotonic()
        await conn.wait_closed()
        assert time.monotonic() - started < 0.2 + 0.3 + 0.25
        assert conn.close_reason == "no Ping reply within 0.3 s"
        fake_pbx.resume()


async def test_sim_a_pbx_dropping_the_session_fails_pending_actions(fake_pbx: FakePBX) -> None:
    async with asyncio.timeout(10):
        conn = await sim_conn(fake_pbx)
        fake_pbx.stall()
        pending = [asyncio.create_task(conn.ping()), asyncio.create_task(conn.sip_peers())]
        await asyncio.sleep(0)  # both sent
        await fake_pbx.drop_sessions()
        for task in pending:
            with pytest.raises(ConnectionFinished, match=r"closed by the PBX|connection lost"):
                await task
        fake_pbx.resume()


async def test_sim_a_huge_message_ends_the_session_with_a_clear_reason(fake_pbx: FakePBX) -> None:
    async with asyncio.timeout(10):
        conn = await sim_conn(fake_pbx, max_message_size=64 * 1024)
        await fake_pbx.send_raw(b"Event: Huge\r\nData: " + b"x" * 100_000)
        await conn.wait_closed()
        assert (conn.close_reason or "").startswith("protocol error: unfinished message of over")
