"""`amiworker check`: is everything in place before the fleet starts?

Checks, in order, and prints one line each: the settings (shown with secrets
masked), the handler modules, MongoDB, and every PBX (AMI and Asterisk
versions, and whether its events carry a Timestamp: without
``timestampevents=yes`` two different events can be byte-identical, which the
dedup key can only tell apart within a time window). Exits non-zero if
anything is wrong.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Callable
from typing import Any

from pymongo.errors import PyMongoError

from amiworker.ami.connection import Connection
from amiworker.ami.errors import AMIError
from amiworker.ami.message import Message
from amiworker.ami.pool import tls_context
from amiworker.fleet.dispatch import HandlerImportError, load_handlers
from amiworker.mongo import close_client, open_client, unavailable
from amiworker.settings import ServerSettings, Settings, redact_uri

__all__ = ["run_check"]

_VERSION = re.compile(r"Asterisk (\S+)")
# How long to wait for a first event (the SuccessfulAuth of our own login) to
# see whether events carry a Timestamp.
_EVENT_WAIT = 3.0


_MODE_NOTE = {
    "race": " (every worker inserts every raced event; the first insert wins)",
    "hedged": " (each event's owner inserts it; standbys insert what it has not covered "
    "after hedge_delay)",
}
# How long two sessions are compared (hedged mode): events of both, in order.
_STREAM_WAIT = 3.0


def _say(ok: bool | None, text: str) -> None:
    mark = {True: "ok  ", False: "FAIL", None: "warn"}[ok]
    print(f"{mark}  {text}")


async def run_check(settings: Settings) -> int:
    problems = 0
    print("settings (secrets masked):")
    print(json.dumps(settings.redacted(), indent=2, default=str))
    if not settings.servers:
        _say(False, "no PBX configured: set AMIWORKER_SERVERS or [[servers]] in the config file")
        problems += 1

    try:
        registry = load_handlers(settings.handlers, settings.app_dir)
        names = ", ".join(registry.event_names()) or "none"
        _say(True, f"handlers {', '.join(settings.handlers)}: events handled: {names}")
    except HandlerImportError as exc:
        _say(False, str(exc))
        problems += 1

    _say(True, f"claim mode: {settings.claim_mode}" + _MODE_NOTE[settings.claim_mode])
    problems += await _check_mongo(settings)
    results = await asyncio.gather(*(_check_pbx(settings, s) for s in settings.servers))
    problems += sum(results)
    if settings.claim_mode == "hedged":
        streams = await asyncio.gather(*(_check_same_stream(settings, s) for s in settings.servers))
        problems += sum(streams)
    if problems:
        print(f"{problems} problem(s) found", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


async def _check_mongo(settings: Settings) -> int:
    where = redact_uri(settings.mongo_uri)
    client = open_client(
        settings.mongo_uri,
        settings.driver,
        serverSelectionTimeoutMS=int(settings.connect_timeout * 1000),
    )
    try:
        info: dict[str, Any] = await client.admin.command("buildInfo")
        hello: dict[str, Any] = await client.admin.command("hello")
    except PyMongoError as exc:
        _say(False, str(unavailable(where, "answer buildInfo", exc)))
        return 1
    except Exception as exc:  # a driver bug or a stand-in's quirk: still one line
        _say(False, f"MongoDB at {where} failed: {type(exc).__name__}: {exc}")
        return 1
    finally:
        await close_client(client)
    topology = "replica set " + hello["setName"] if "setName" in hello else "standalone"
    _say(True, f"MongoDB {info.get('version', '?')} at {where} ({topology})")
    if "setName" not in hello and "msg" not in hello:
        _say(
            None,
            "MongoDB is not a replica set: claims use write concern majority, which "
            "only protects exactly-once across a failover on a replica set",
        )
    return 0


async def _open(
    settings: Settings, server: ServerSettings, on_event: Callable[[Message, bool], None]
) -> Connection:
    """An AMI session as a worker opens it (no keepalive: a check is short)."""
    return await Connection.open(
        server.host,
        server.port,
        server.username,
        server.secret.get_secret_value(),
        auth=server.auth,
        events=server.events,
        timeout=settings.connect_timeout,
        action_timeout=settings.action_timeout,
        ping_interval=None,
        ssl=tls_context(server),
        name=server.name,
        on_event=on_event,
    )


async def _check_pbx(settings: Settings, server: ServerSettings) -> int:
    first_event: asyncio.Future[Message] = asyncio.get_running_loop().create_future()

    def on_event(message: Message, own_action: bool) -> None:
        if not first_event.done() and message.name != "FullyBooted":
            first_event.set_result(message)

    try:
        conn = await _open(settings, server, on_event)
    except ValueError as exc:  # an unreadable tls_ca_file: one line, as for the rest
        _say(False, str(exc))
        return 1
    except AMIError as exc:
        _say(False, f"PBX {server.name}: {exc}")
        return 1
    try:
        try:
            lines = await conn.command("core show version")
            match = _VERSION.search(" ".join(lines))
            asterisk = match.group(1) if match else "unknown"
        except AMIError as exc:
            asterisk = f"unknown ({exc}; the AMI user needs the 'command' write permission)"
        _say(True, f"PBX {server.name}: AMI {conn.ami_version}, Asterisk {asterisk}")
        if server.events == "off":
            _say(None, f"PBX {server.name}: events are off for this user: nothing to store")
            return 0
        try:
            event = await asyncio.wait_for(first_event, _EVENT_WAIT)
        except TimeoutError:
            _say(
                None,
                f"PBX {server.name}: no event within {_EVENT_WAIT:g} s; cannot tell "
                "whether events carry a Timestamp",
            )
            return 0
        if "Timestamp" in event:
            _say(True, f"PBX {server.name}: events carry a Timestamp")
            return 0
        # Without it, an event byte-identical to one stored more than dedup_window
        # ago (a repeated VarSet) gets the stored _id: every worker loses the race
        # and it is never stored nor handled.
        allowed = settings.allow_no_timestamps
        _say(
            None if allowed else False,
            f"PBX {server.name}: events carry no Timestamp, so a repeated identical event "
            "can be missed: set timestampevents=yes in manager.conf [general] (see "
            "deploy/manager.conf)"
            + ("; allowed by allow_no_timestamps" if allowed else ", or allow_no_timestamps"),
        )
        return 0 if allowed else 1
    finally:
        try:
            await conn.logoff()
        except AMIError:
            conn.close()


async def _check_same_stream(settings: Settings, server: ServerSettings) -> int:
    """Hedged mode: do two sessions to this PBX receive the same events in the same order?

    A standby places an owner's watermark in its own stream by key; that needs every
    worker to log in with the same AMI user and event filter (the README says so).
    Two sessions are opened and what both receive is compared byte for byte.
    """
    received: list[list[bytes]] = [[], []]
    sessions: list[Connection] = []
    try:
        for seen in received:

            def on_event(message: Message, own_action: bool, seen: list[bytes] = seen) -> None:
                if not own_action and message.name != "FullyBooted":
                    seen.append(message.raw)

            sessions.append(await _open(settings, server, on_event))
        await asyncio.sleep(_STREAM_WAIT)  # both sessions listen for a while: what they get
    except (AMIError, ValueError) as exc:
        _say(False, f"PBX {server.name}: cannot compare two sessions: {exc}")
        return 1
    finally:
        for session in sessions:
            session.close()
    first, second = received
    # The second session starts later: compare from its first event on.
    start = first.index(second[0]) if second and second[0] in first else None
    if start is None:
        _say(
            None,
            f"PBX {server.name}: no event reached both sessions within {_STREAM_WAIT:g} s; "
            "cannot tell whether they see the same stream (hedged mode needs it)",
        )
        return 0
    common = min(len(first) - start, len(second))
    if first[start : start + common] != second[:common]:
        _say(
            False,
            f"PBX {server.name}: two sessions received different events; hedged mode needs "
            "every worker to log in with the same AMI user and event filter (manager.conf)",
        )
        return 1
    _say(True, f"PBX {server.name}: two sessions see the same stream ({common} event(s) compared)")
    return 0
