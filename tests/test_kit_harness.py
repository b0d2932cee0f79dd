"""The harness runs handlers as a worker does: a real HandlerContext, in order per call,
async handlers on the loop and plain ones in a thread, the worker's event ids, an
in-memory database, a recording AMI and a captured log."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mongomock import filtering

from amiworker.ami.actions import ActionHelpers
from amiworker.ami.connection import Connection
from amiworker.ami.errors import ActionFailed, ActionTimeout
from amiworker.fleet.dedup import DedupKeys
from amiworker.fleet.dispatch import HandlerTimeout
from amiworker.fleet.scheduler import order_key
from amiworker.testing import Harness, RecordingAMI, SyncHarness, make_event, sample_calls
from amiworker.testing.memory import memory_database

MODULE = """
import asyncio, threading
from amiworker import HandlerContext, Message

SEEN = []

async def NewchannelHandler(ctx: HandlerContext, event: Message) -> None:
    SEEN.append(("async", event.name, event["Uniqueid"], ctx.event_id, ctx.worker_id,
                 ctx.server, threading.current_thread().name))
    await ctx.db["channels"].update_one(
        {"_id": event["Uniqueid"]}, {"$set": {"channel": event["Channel"]}}, upsert=True)
    ctx.log.info("new channel %s", event["Channel"])

def HangupHandler(ctx, event):
    SEEN.append(("plain", event.name, event["Uniqueid"], ctx.event_id, ctx.worker_id,
                 ctx.server, threading.current_thread().name))
    ctx.log.warning("hangup %s", event["Cause"])

def DeviceStateChangeHandler(ctx, event):
    SEEN.append(("plain", event.name, None, ctx.event_id, ctx.worker_id, ctx.server,
                 threading.current_thread().name))

async def DialBeginHandler(ctx, event):
    if ctx.ami is None:
        return
    await ctx.ami.redirect(event["DestChannel"], "default", "200", 1)
    await ctx.ami.originate("PJSIP/100", context="default", exten="300", priority=1)

async def DialEndHandler(ctx, event):
    raise ValueError("no such extension")

async def NewextenHandler(ctx, event):
    await asyncio.sleep(5)

def VarSetHandler(ctx, event):
    ctx.db["variables"].insert_one({"name": event["Variable"]})  # no loop here: nothing happens
"""


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    name = f"kit_harness_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(MODULE)
    path_before = list(sys.path)
    yield tmp_path, name
    sys.path[:] = path_before
    sys.modules.pop(name, None)


def seen(name: str) -> list[tuple[Any, ...]]:
    found: list[tuple[Any, ...]] = sys.modules[name].SEEN
    return found


async def test_a_real_context_with_the_workers_event_ids(app: tuple[Path, str]) -> None:
    directory, name = app
    harness = Harness(name, app_dir=directory, server="pbx9", worker_id="w-test")
    harness.load([name]).registry  # noqa: B018 - imports it now
    events = [e for e in sample_calls(2) if e.name in ("Newchannel", "Hangup")]
    device = make_event("DeviceStateChange", Device="Local/100@test", State="INUSE")
    runs = await harness.run([*events, device])
    assert [r.name.rpartition(".")[2] for r in runs] == [
        f"{e.name}Handler" for e in [*events, device]
    ]
    keys = DedupKeys("pbx9", 10.0)
    expected_ids = [keys.key(e.raw, 0.0) for e in events]
    got = seen(name)
    assert [row[3] for row in got] == [*expected_ids, None]  # None: handled by every worker
    assert {row[4] for row in got} == {"w-test"} and {row[5] for row in got} == {"pbx9"}
    # async on the loop's thread, plain functions in a thread of the executor
    loop_thread = threading.current_thread().name
    assert all(row[6] == loop_thread for row in got if row[0] == "async")
    assert all(row[6] != loop_thread for row in got if row[0] == "plain")
    channels = await harness.documents("channels")
    assert sorted(doc["_id"] for doc in channels) == sorted(
        e["Uniqueid"] for e in events if e.name == "Newchannel"
    )
    assert harness.log_messages[:2] == [
        f"INFO new channel {events[0]['Channel']}",
        f"INFO new channel {events[1]['Channel']}",
    ]
    assert harness.records[0].worker_id == "w-test"  # type: ignore[attr-defined]
    assert "WARNING hangup 16" in harness.log_messages


async def test_events_run_in_the_order_given_which_keeps_each_calls_order(
    app: tuple[Path, str],
) -> None:
    directory, name = app
    harness = Harness(name, app_dir=directory)
    events = [e for e in sample_calls(5) if e.name in ("Newchannel", "Hangup")]
    await harness.run(events)
    ran = [(row[1], row[2]) for row in seen(name)]
    assert ran == [(e.name, e["Uniqueid"]) for e in events]
    by_call: dict[str, list[str]] = {}
    for run in harness.runs:
        by_call.setdefault(order_key("pbx1", run.event), []).append(run.event["Timestamp"])
    assert len(by_call) == 5 and all(times == sorted(times) for times in by_call.values())


async def test_the_ami_records_actions_and_answers_from_its_table(app: tuple[Path, str]) -> None:
    directory, name = app
    harness = Harness(name, app_dir=directory)
    dial = next(e for e in sample_calls(1) if e.name == "DialBegin")
    await harness.run([dial])
    ami = harness.ami
    assert ami is not None
    redirect, originate = ami.actions()
    assert redirect.name == "Redirect" and redirect["Channel"] == dial["DestChannel"]
    assert (redirect["Context"], redirect["Exten"], redirect["Priority"]) == ("default", "200", "1")
    assert originate["Async"] == "true" and originate.event_name == "DialBegin"
    assert redirect.event_id is not None and ami.actions("redirect") == [redirect]

    ami.answer("Redirect", response="Error", Message="Channel not found")
    ami.clear()
    with pytest.raises(ActionFailed, match="Channel not found"):
        await harness.run([dial])
    ami.answer("Redirect")  # Success again
    ami.answer("Originate", raises=ActionTimeout("no answer"))
    with pytest.raises(ActionTimeout) as timed_out:
        await harness.run([dial])
    # The handler's own line, not the stand-in's (nor any of amiworker's).
    assert f"{name}.py:27)" in timed_out.value.__notes__[0]
    ami.answer("Originate")
    # The helpers of the real connection, and their encoding (no header injection).
    ami.answer("Command", Output=["Asterisk 22.10.1", "built by root"])
    assert await ami.command("core show version") == ["Asterisk 22.10.1", "built by root"]
    response = await ami.originate("PJSIP/1", application="Wait", data="1")
    assert response.name == "OriginateResponse" and response["Response"] == "Success"
    with pytest.raises(ValueError, match="CR or LF"):
        await ami.set_var("SIP/1", "X", "a\r\nAction: Hangup")
    assert all(a.name != "Setvar" for a in ami.actions())


def test_the_recording_ami_offers_what_the_connection_offers() -> None:
    assert issubclass(RecordingAMI, ActionHelpers) and issubclass(Connection, ActionHelpers)
    helpers = {n for n in dir(ActionHelpers) if not n.startswith("_")}
    assert helpers <= set(dir(RecordingAMI))
    assert {"ping", "command", "originate", "redirect", "set_var", "status"} <= helpers
    ami = RecordingAMI("pbx1")
    assert ami.is_open and ami.name == "pbx1" and ami.action_timeout == 10.0


async def test_failures_are_raised_with_the_handler_and_event_or_recorded(
    app: tuple[Path, str],
) -> None:
    directory, name = app
    harness = Harness(name, app_dir=directory, timeout=0.2)
    call = sample_calls(1)
    dial_end = next(e for e in call if e.name == "DialEnd")
    with pytest.raises(ValueError, match="no such extension") as raised:
        await harness.run([dial_end])
    assert any(f"{name}.DialEndHandler on DialEnd" in note for note in raised.value.__notes__)
    newexten = next(e for e in call if e.name == "Newexten")
    runs = await harness.run([dial_end, newexten], raise_failures=False)
    failed = [run for run in runs if not run.ok]
    assert {type(run.error) for run in failed} == {ValueError, HandlerTimeout}
    line = failed[0].describe()
    assert f"{name}.DialEndHandler on DialEnd" in line and f"{name}.py:" in line
    assert len(harness.failures) == 3  # kept across runs


async def test_a_plain_handler_that_uses_ctx_db_is_told_to_be_async(
    app: tuple[Path, str],
) -> None:
    directory, name = app
    harness = Harness(name, app_dir=directory)
    varset = next(e for e in sample_calls(1) if e.name == "VarSet")
    (run,) = await harness.run([varset], raise_failures=False)
    assert isinstance(run.error, RuntimeError)
    assert "ctx.db is asynchronous" in str(run.error) and "async def" in str(run.error)
    assert f"{name}.py:" in run.describe()  # the handler's line
    assert await harness.documents("variables") == []


async def test_without_a_connection_ctx_ami_is_none(app: tuple[Path, str]) -> None:
    directory, name = app
    harness = Harness(name, app_dir=directory, ami_connected=False)
    await harness.run([e for e in sample_calls(1) if e.name == "DialBegin"])
    assert harness.ami is None and harness.failures == []


def test_the_blocking_harness_in_a_plain_test(app: tuple[Path, str]) -> None:
    directory, name = app
    with SyncHarness(name, app_dir=directory) as harness:
        harness.call(lambda: harness.db["seed"].insert_one({"_id": 1}))
        harness.run([e for e in sample_calls(2) if e.name == "Newchannel"])
        assert len(harness.documents("channels")) == 4
        assert harness.find_one("seed", {"_id": 1}) == {"_id": 1}
        assert set(harness.snapshot()) == {"channels", "seed"}
        harness.reset()
        assert harness.documents("channels") == []


async def test_the_blocking_harness_in_an_async_test(app: tuple[Path, str]) -> None:
    directory, name = app
    with SyncHarness(name, app_dir=directory) as harness:
        harness.run([e for e in sample_calls(1) if e.name == "Newchannel"])
        assert len(harness.documents("channels")) == 2
        await asyncio.sleep(0)  # this test's own loop is untouched


# -- the in-memory database finds by _id without a scan, and finds the same ------------------


def scanned(docs: list[dict[str, Any]], flt: dict[str, Any]) -> list[Any]:
    applies: Callable[[Any, Any], bool] = filtering.filter_applies
    return [doc["_id"] for doc in docs if applies(flt, doc)]


@pytest.mark.parametrize(
    "flt",
    [
        {"_id": "a"},
        {"_id": "zz"},
        {"_id": 7},
        {"_id": 8},  # stored as 8.0
        {"_id": "a", "v": 1},
        {"_id": "a", "v": 2},
        {"_id": "a", "$or": [{"v": 2}, {"w": None}]},
        {"_id": {"$in": ["a", "b"]}},
        {"v": 1},
        {"_id": 7, "tags": {"$size": 2}},
    ],
)
async def test_lookups_by_id_find_what_a_scan_finds(flt: dict[str, Any]) -> None:
    docs: list[dict[str, Any]] = [
        {"_id": "a", "v": 1},
        {"_id": "b", "v": 1},
        {"_id": 7, "tags": ["x", "y"]},
        {"_id": 8.0},
    ]
    db = memory_database()
    await db["c"].insert_many([dict(d) for d in docs])
    found = [doc["_id"] async for doc in db["c"].find(flt)]
    assert found == scanned(docs, flt)
    assert (await db["c"].count_documents(flt)) == len(found)
