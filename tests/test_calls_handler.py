"""The shipped example handlers/calls.py, fed the 20 real calls of the Asterisk 22 capture.

Through the kit (amiworker.testing): both properties hold, the projection says
what the capture says, and the harness's in-memory database builds the same
projection as two real workers racing over nx-27017. Against the real server
too: run in order, then every event twice, shuffled, all at once by two
"workers" with their own clients, the summaries are the same.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from amiworker.ami.message import Message
from amiworker.devstack.embedded_mongo import EmbeddedMongo
from amiworker.fleet.dispatch import HandlerContext, HandlerRegistry, invoke, load_handlers
from amiworker.fleet.worker import Worker
from amiworker.mongo import close_client, open_client
from amiworker.settings import Settings
from amiworker.sim.pbx import FakePBX
from amiworker.testing import (
    Harness,
    check_idempotent,
    check_order_independent,
    make_event,
    sample_calls,
)
from amiworker.testing.snapshots import first_difference
from handlers.calls import summarise
from tests.waiting import wait_for

ROOT = Path(__file__).parent.parent
HANDLED = {"Newchannel", "Newstate", "Hangup"}
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
def calls() -> list[Message]:
    """The 20 real calls, every event (35 each), fresh ids."""
    return sample_calls(20)


def handled(events: list[Message]) -> list[Message]:
    return [m for m in events if m.name in HANDLED]


@pytest.fixture(scope="module")
def call_events(calls: list[Message]) -> list[Message]:
    return handled(calls)


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


def near(stored: datetime, seconds: float) -> bool:
    """BSON dates hold milliseconds."""
    return abs(stored - datetime.fromtimestamp(seconds, UTC)) < timedelta(milliseconds=1)


def assert_as_captured(got: dict[str, dict[str, Any]], expected: dict[str, Any]) -> None:
    assert set(got) == set(expected)
    for linkedid, want in expected.items():
        call = got[linkedid]
        assert near(call["start"], want["start"]), linkedid
        assert near(call["answer"], want["answer"]), linkedid
        assert near(call["end"], want["end"]), linkedid
        assert call["duration"] == want["duration"]
        assert 1.0 <= call["duration"] < 1.1  # Wait(1) in the dialplan
        assert call["channels"] == want["channels"] and len(call["channels"]) == 2
        assert (call["hangup_cause"], call["hangup_cause_txt"]) == (16, "Normal Clearing")
        assert call["active_channels"] == 0 and call["server"] == "pbx1"


# -- through the kit: no server ------------------------------------------------------------


async def test_both_properties_hold_on_the_real_calls(calls: list[Message]) -> None:
    harness = Harness("handlers.calls", app_dir=ROOT)
    idempotent = await check_idempotent(harness, calls)
    assert idempotent, idempotent
    ordered = await check_order_independent(harness, calls, workers=3, interleavings=6, seed=7)
    assert ordered, ordered
    assert ordered.scenarios == 6 and ordered.runs == 120
    await harness.run(calls)
    assert_as_captured(await calls_of(harness.db), expected_calls(handled(calls)))


async def test_without_timestamps_no_time_is_made_up() -> None:
    """timestampevents=no: the facts, but no time (the clock would differ on a re-run)."""
    untimed = [
        make_event(name, Timestamp=None, Channel="SIP/a-1", Uniqueid="9.1", Linkedid="9.1", **more)
        for name, more in (
            ("Newchannel", {}),
            ("Newstate", {"ChannelState": "6"}),
            ("Hangup", {"Cause": "16", "Cause_txt": "Normal Clearing"}),
        )
    ]
    harness = Harness("handlers.calls", app_dir=ROOT)
    assert await check_idempotent(harness, untimed)
    assert await check_order_independent(harness, untimed)
    await harness.run(untimed)
    (call,) = await harness.documents("calls")
    assert call["start"] is None and call["end"] is None and call["duration"] is None
    assert call["active_channels"] == 0 and call["hangup_cause"] == 16


async def test_answer_only_when_up_and_end_only_when_all_hung_up() -> None:
    def event(name: str, uniqueid: str, ts: str, **headers: str) -> Message:
        return make_event(
            name, Timestamp=ts, Channel=f"SIP/{uniqueid}", Uniqueid=uniqueid, Linkedid="call-1",
            **headers,
        )  # fmt: skip

    harness = Harness("handlers.calls", app_dir=ROOT)
    steps = [
        event("Newchannel", "a", "100.0", ChannelState="4"),
        event("Newstate", "a", "100.5", ChannelState="5"),  # Ringing: no answer
        event("Newchannel", "b", "101.0", ChannelState="0"),
        event("Newstate", "b", "102.0", ChannelState="6"),
        event("Hangup", "b", "110.0", Cause="17", Cause_txt="User busy"),
    ]
    await harness.run(steps)
    (call,) = await harness.documents("calls")
    assert near(call["start"], 100.0) and near(call["answer"], 102.0)
    assert call["end"] is None and call["duration"] is None and call["active_channels"] == 1

    await harness.run([event("Hangup", "a", "111.5", Cause="16", Cause_txt="Normal")])
    (call,) = await harness.documents("calls")
    assert near(call["end"], 111.5) and call["duration"] == 11.5
    assert (call["hangup_cause"], call["hangup_cause_txt"]) == (16, "Normal")
    assert call["channels"] == ["SIP/a", "SIP/b"]
    assert await check_idempotent(harness, steps) and await check_order_independent(harness, steps)


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


# -- against a real server ----------------------------------------------------------------


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

    assert_as_captured(ordered, expected)
    assert set(shuffled) == set(ordered)
    for linkedid, call in ordered.items():
        assert {field: shuffled[linkedid][field] for field in SUMMARY} == {
            field: call[field] for field in SUMMARY
        }, linkedid


async def test_the_harness_builds_what_two_real_workers_build(
    calls: list[Message], mongo_server: EmbeddedMongo, database_name: str, tmp_path: Path
) -> None:
    """The same events through the kit's in-memory database, and through two real
    workers racing for them over nx-27017 (a simulated PBX sends the events' bytes):
    the same ``calls`` projection."""
    harness = Harness("handlers.calls", app_dir=ROOT)
    await harness.run(calls)
    in_memory = (await harness.snapshot())["calls"]

    async with FakePBX(name="pbx1", port=0) as pbx:
        settings = Settings.load(
            None,
            env_file=None,
            servers=[
                {"name": "pbx1", "host": "127.0.0.1", "port": pbx.port,
                 "username": pbx.username, "secret": pbx.secret},
            ],
            mongo_uri=mongo_server.uri,
            database=database_name,
            handlers=["handlers.calls"],
            app_dir=ROOT,
            heartbeat_interval=0.2,
            lease=2.0,
            shutdown_timeout=5.0,
        )  # fmt: skip
        workers = [Worker(settings, harness.registry, worker_id=f"kit-w{n}") for n in (0, 1)]
        tasks = [asyncio.create_task(worker.run()) for worker in workers]
        client = open_client(mongo_server.uri, serverSelectionTimeoutMS=5000)
        db = client[database_name]
        try:
            for worker in workers:
                await worker.pool.wait_connected(10)
            await pbx.send_raw(b"".join(event.raw for event in calls))

            async def all_done() -> bool:
                done = await db["events"].count_documents({"state": "done"})
                return bool(done == len(calls))

            await wait_for(all_done, timeout=30, what="every event stored and handled")
        finally:
            for worker in workers:
                worker.stop()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        try:
            won = Counter([doc["claimed_by"] async for doc in db["events"].find({})])
            real = [doc async for doc in db["calls"].find({})]
        finally:
            await client.drop_database(database_name)
            await close_client(client)

    # Every event stored once, by whichever worker won it (often one wins a whole batch).
    assert sum(won.values()) == len(calls) and set(won) <= {"kit-w0", "kit-w1"}, won
    assert len(real) == len(in_memory) == 20
    difference = first_difference({"calls": in_memory}, {"calls": real})
    assert difference is None, difference.describe("in the harness", "in the real workers")
    assert_as_captured({doc["_id"]: doc for doc in real}, expected_calls(handled(calls)))
