"""The shipped example handlers/calls.py, fed the 20 real calls of the Asterisk 22 capture.

Handled in order, then shuffled, run twice each (a re-run after a crash) and
concurrently by two "workers" with their own clients: both must give the same
20 call documents, and those must match the capture.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from amiworker.ami.message import Message
from amiworker.ami.protocol import Parser
from amiworker.fleet.dispatch import HandlerContext, HandlerRegistry, invoke, load_handlers
from amiworker.mongo import close_client, open_client
from handlers.calls import summarise

ROOT = Path(__file__).parent.parent
SUMMARY = (
    "server",
    "start",
    "answer",
    "end",
    "duration",
    "channels",
    "active_channels",
    "hangup_cause",
    "hangup_cause_txt",
)


@pytest.fixture(scope="module")
def registry() -> Iterator[HandlerRegistry]:
    path_before = list(sys.path)
    yield load_handlers(["handlers.calls"], ROOT)
    sys.path[:] = path_before


@pytest.fixture(scope="module")
def call_events(fixtures_dir_module: Path) -> list[Message]:
    data = (fixtures_dir_module / "asterisk22-20-calls.txt").read_bytes()
    wanted = {"Newchannel", "Newstate", "Hangup"}
    return [m for m in Parser().feed(data) if m.kind == "event" and m.name in wanted]


@pytest.fixture(scope="module")
def fixtures_dir_module() -> Path:
    return ROOT / "tests" / "fixtures"


def context(db: Any, worker_id: str) -> HandlerContext:
    return HandlerContext.create(server="pbx1", ami=None, db=db, worker_id=worker_id)


async def handle(registry: HandlerRegistry, ctx: HandlerContext, event: Message) -> None:
    for handler in registry.handlers_for(event.name):
        await invoke(handler, ctx, event, timeout=10)


def expected_calls(events: list[Message]) -> dict[str, dict[str, Any]]:
    """What the capture says, worked out in stream order, independently of the handler."""
    calls: dict[str, dict[str, Any]] = {}
    for event in events:
        call = calls.setdefault(
            event["Linkedid"],
            {"start": None, "answer": None, "channels": set(), "open": set(), "hangups": []},
        )
        ts = float(event["Timestamp"])
        call["channels"].add(event["Channel"])
        if event.name == "Newchannel":
            call["start"] = call["start"] or ts
            call["open"].add(event["Uniqueid"])
        elif event.name == "Newstate" and event["ChannelState"] == "6":
            call["answer"] = call["answer"] or ts
        elif event.name == "Hangup":
            call["open"].discard(event["Uniqueid"])
            call["hangups"].append((ts, int(event["Cause"]), event["Cause-txt"]))
    result = {}
    for linkedid, call in calls.items():
        assert not call["open"], "every call of the capture ends"
        end, cause, cause_txt = call["hangups"][-1]
        result[linkedid] = {
            "start": call["start"],
            "answer": call["answer"],
            "end": end,
            "duration": round(end - call["start"], 6),  # both to the microsecond
            "channels": sorted(call["channels"]),
            "hangup_cause": cause,
            "hangup_cause_txt": cause_txt,
        }
    return result


async def calls_of(db: Any) -> dict[str, dict[str, Any]]:
    return {doc["_id"]: doc async for doc in db["calls"].find({})}


@pytest.fixture
async def second_database(
    mongo_uri: str, mongo_driver: str, database_name: str
) -> AsyncIterator[Any]:
    """Another database, reached through two clients as two workers would."""
    clients = [open_client(mongo_uri, mongo_driver) for _ in range(2)]  # type: ignore[arg-type]
    name = f"{database_name}_shuffled"
    try:
        yield [client[name] for client in clients]
    finally:
        await clients[0].drop_database(name)
        for client in clients:
            await close_client(client)


def near(stored: datetime, seconds: float) -> bool:
    """BSON dates hold milliseconds."""
    return abs(stored - datetime.fromtimestamp(seconds, UTC)) < timedelta(milliseconds=1)


async def test_twenty_real_calls_in_order_and_shuffled(
    registry: HandlerRegistry,
    call_events: list[Message],
    database: Any,
    second_database: list[Any],
) -> None:
    assert len(call_events) == 20 * 6
    expected = expected_calls(call_events)
    assert len(expected) == 20

    in_order = context(database, "worker-a")
    for event in call_events:
        await handle(registry, in_order, event)
    ordered = await calls_of(database)

    # Every event twice (a crash re-run), shuffled, all at once, split over two workers.
    runs = [event for event in call_events for _ in range(2)]
    random.Random(20).shuffle(runs)
    workers = [context(db, f"worker-{i}") for i, db in enumerate(second_database)]
    await asyncio.gather(*(handle(registry, workers[i % 2], event) for i, event in enumerate(runs)))
    shuffled = await calls_of(second_database[0])

    assert set(ordered) == set(shuffled) == set(expected)
    for linkedid, want in expected.items():
        got = ordered[linkedid]
        assert near(got["start"], want["start"]), linkedid
        assert near(got["answer"], want["answer"]), linkedid
        assert near(got["end"], want["end"]), linkedid
        assert got["duration"] == want["duration"]
        assert 1.0 <= got["duration"] < 1.1  # Wait(1) in the dialplan
        assert got["channels"] == want["channels"] and len(got["channels"]) == 2
        assert (got["hangup_cause"], got["hangup_cause_txt"]) == (16, "Normal Clearing")
        assert got["active_channels"] == 0 and got["server"] == "pbx1"
        assert {field: shuffled[linkedid][field] for field in SUMMARY} == {
            field: got[field] for field in SUMMARY
        }, linkedid


async def test_answer_only_when_up_and_end_only_when_all_hung_up(
    registry: HandlerRegistry, database: Any
) -> None:
    def event(name: str, uniqueid: str, ts: str, **headers: str) -> Message:
        lines = [f"Event: {name}", f"Timestamp: {ts}", f"Channel: SIP/{uniqueid}"]
        lines += [f"Uniqueid: {uniqueid}", "Linkedid: call-1"]
        lines += [f"{key.replace('_', '-')}: {value}" for key, value in headers.items()]
        return Parser(banner=False).feed(("\r\n".join(lines) + "\r\n\r\n").encode())[0]

    ctx = context(database, "worker-a")
    steps = [
        event("Newchannel", "a", "100.0", ChannelState="4"),
        event("Newstate", "a", "100.5", ChannelState="5"),  # Ringing: no answer
        event("Newchannel", "b", "101.0", ChannelState="0"),
        event("Newstate", "b", "102.0", ChannelState="6"),
        event("Hangup", "b", "110.0", Cause="17", Cause_txt="User busy"),
    ]
    for step in steps:
        await handle(registry, ctx, step)
    call = await database["calls"].find_one({"_id": "call-1"})
    assert near(call["start"], 100.0) and near(call["answer"], 102.0)
    assert call["end"] is None and call["duration"] is None and call["active_channels"] == 1

    await handle(registry, ctx, event("Hangup", "a", "111.5", Cause="16", Cause_txt="Normal"))
    call = await database["calls"].find_one({"_id": "call-1"})
    assert near(call["end"], 111.5) and call["duration"] == 11.5
    assert (call["hangup_cause"], call["hangup_cause_txt"]) == (16, "Normal")
    assert call["channels"] == ["SIP/a", "SIP/b"]


def test_summary_of_partial_facts() -> None:
    hangup = {"uniqueid": "a", "ts_us": 5_000_000, "cause": 16, "cause_txt": "Normal Clearing"}
    # A Hangup handled before its Newchannel: the end is known, the start not yet.
    early = summarise({"channel_ids": ["a"], "hangups": [hangup], "channel_names": ["SIP/a"]})
    assert early["start"] is None and early["duration"] is None
    assert early["end"] == datetime.fromtimestamp(5.0, UTC) and early["hangup_cause"] == 16
    # No facts at all: an empty summary, not an error.
    assert summarise({}) == {
        "start": None,
        "answer": None,
        "end": None,
        "duration": None,
        "channels": [],
        "active_channels": 0,
        "hangup_cause": None,
        "hangup_cause_txt": None,
    }


def test_shipped_package_runs_the_example_once(registry: HandlerRegistry) -> None:
    both = load_handlers(["handlers", "handlers.calls"], ROOT)
    assert both.event_names() == ["Hangup", "Newchannel", "Newstate"]
    assert len(both.handlers_for("hangup")) == 1
    assert registry.handlers_for("HANGUP") == both.handlers_for("Hangup")
