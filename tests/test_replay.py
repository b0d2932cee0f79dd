"""Replay: stored events through handlers again, from the log alone.

The acceptance test runs a real worker against simulated PBXs (the live
``calls`` projection), then rebuilds the projection by replaying the log into
an empty database: both must be the same. The others use the log filled from
the real 20-call capture (tests/log_plugin.py).
"""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from amiworker.fleet.dispatch import HandlerRegistry, load_handlers
from amiworker.fleet.worker import Worker
from amiworker.ops.filters import EventFilter
from amiworker.ops.query import EventQuery
from amiworker.ops.replay import replay
from amiworker.sim.pbx import FakePBX
from tests.log_plugin import FIRST_CALL, FilledLog
from tests.waiting import wait_for

ROOT = Path(__file__).parent.parent

RECORDING = textwrap.dedent(
    '''
    """Keeps what each handler run saw, in run order."""
    import logging

    SEEN = []

    def _keep(ctx, event):
        SEEN.append({
            "server": ctx.server, "ami": ctx.ami, "db": ctx.db.name, "worker_id": ctx.worker_id,
            "event_id": ctx.event_id, "log": isinstance(ctx.log, logging.LoggerAdapter),
            "name": event.name, "headers": list(event.headers),
        })

    async def NewchannelHandler(ctx, event):
        _keep(ctx, event)

    def HangupHandler(ctx, event):          # a plain function: runs in a thread
        _keep(ctx, event)
        if event["Uniqueid"].endswith("-2"):
            raise ValueError("second channel")

    async def NewconnectedlineHandler(ctx, event):   # "NewConnectedLine", other case
        _keep(ctx, event)
    '''
)


@pytest.fixture
def recording(tmp_path: Path) -> Iterator[tuple[HandlerRegistry, list[dict[str, Any]]]]:
    name = f"recording_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(RECORDING)
    path_before = list(sys.path)
    registry = load_handlers([name], tmp_path)
    yield registry, sys.modules[name].SEEN
    sys.path[:] = path_before
    del sys.modules[name]


def calls_registry() -> HandlerRegistry:
    path_before = list(sys.path)
    try:
        return load_handlers(["handlers.calls"], ROOT)
    finally:
        sys.path[:] = path_before


# -- the acceptance test: live projection == replayed projection ------------------------------


async def test_replay_rebuilds_the_live_projection_from_the_log(
    live_worker: tuple[Worker, list[FakePBX]], database_name: str
) -> None:
    worker, pbxs = live_worker
    live = worker.store.database["calls"]
    for pbx in pbxs:
        for _ in range(6):
            await pbx.start_call()

    async def calls_ended() -> bool:
        return bool(await live.count_documents({"active_channels": 0}) == 12)

    await wait_for(calls_ended, timeout=20, what="12 live calls ended")
    await wait_for(
        lambda: worker.claimer.depth == 0 and worker.scheduler.depth == 0,
        timeout=10,
        what="the worker idle",
    )
    events = worker.store.events

    async def all_done() -> bool:
        return bool(await events.count_documents({"state": {"$ne": "done"}}) == 0)

    await wait_for(all_done, timeout=10, what="every handler run acknowledged")
    states = [doc async for doc in events.find({}, {"state": 1, "claimed_by": 1, "attempts": 1})]

    client = worker.store.database.client
    target = client[f"{database_name}_replay"]
    try:
        summary = await replay(EventQuery(worker.store.database), calls_registry(), into=target)
        rebuilt = {doc["_id"]: doc async for doc in target["calls"].find({})}
    finally:
        await client.drop_database(target.name)
    expected = {doc["_id"]: doc async for doc in live.find({})}
    assert len(expected) == 12
    assert rebuilt == expected
    # 6 handled events per call (Newchannel, Newstate, Hangup, for 2 channels)
    assert (summary.events_read, summary.handler_runs, summary.failures) == (72, 72, 0)
    assert summary.total == 72
    # Only read: the log's claim state is as it was.
    assert [doc async for doc in events.find({}, {"state": 1, "claimed_by": 1, "attempts": 1})] == (
        states
    )


# -- on the 20-call capture ------------------------------------------------------------------


async def test_replay_runs_in_stored_order_with_the_workers_context(
    filled_log: FilledLog, recording: tuple[HandlerRegistry, list[dict[str, Any]]]
) -> None:
    registry, seen = recording
    before = [doc async for doc in filled_log.database["events"].find({})]
    progress: list[tuple[int, int]] = []
    summary = await replay(
        EventQuery(filled_log.database),
        registry,
        EventFilter.of(server="pbx1"),
        progress=lambda done, total: progress.append((done, total)),
    )
    handled = ("newchannel", "hangup", "newconnectedline")
    expected = [doc for doc in filled_log.pbx1 if doc["event"].lower() in handled]
    assert [run["event_id"] for run in seen] == [doc["_id"] for doc in expected]
    assert {run["name"] for run in seen} == {"Newchannel", "Hangup", "NewConnectedLine"}
    for run, doc, message in zip(seen, expected, _messages(filled_log, expected), strict=True):
        assert run["server"] == "pbx1" and run["ami"] is None and run["worker_id"] == "replay"
        assert run["db"] == filled_log.name and run["log"]
        # The event comes back whole: every header, values as sent, Event first.
        assert run["headers"][0] == ("Event", doc["event"])
        assert [(n.lower(), v) for n, v in run["headers"]] == [
            (n.lower(), v) for n, v in _grouped(message.headers)
        ]
    assert summary.events_read == summary.total == summary.handler_runs == len(expected)
    assert summary.failures == 20  # the Hangup of each call's second channel
    assert summary.errors[0].startswith("recording_")
    assert "HangupHandler on Hangup " in summary.errors[0]
    # Where the handler raised, as the workers record it.
    assert re.search(
        r": ValueError: second channel \(\S*recording_\w+\.py:\d+\)$", summary.errors[0]
    )
    assert progress[0] == (0, len(expected)) and progress[-1] == (len(expected), len(expected))
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)
    after = [doc async for doc in filled_log.database["events"].find({})]
    assert after == before  # nothing about the log changed


async def test_replay_filters(
    filled_log: FilledLog, recording: tuple[HandlerRegistry, list[dict[str, Any]]]
) -> None:
    registry, seen = recording
    query = EventQuery(filled_log.database)
    await replay(query, registry, EventFilter.of(server="pbx2", event="Hangup"))
    assert [(run["server"], run["name"]) for run in seen] == [("pbx2", "Hangup")] * 2
    seen.clear()

    stamps = sorted(doc["ts"] for doc in filled_log.pbx1 if doc["event"] == "Newchannel")
    since = stamps[10].replace(microsecond=stamps[10].microsecond // 1000 * 1000)
    until = stamps[20].replace(microsecond=stamps[20].microsecond // 1000 * 1000)
    flt = EventFilter.of(server="pbx1", event="Newchannel", since=since, until=until)
    summary = await replay(query, registry, flt)
    expected = [
        doc["_id"]
        for doc in filled_log.pbx1
        if doc["event"] == "Newchannel" and flt.admits({"ts": _millisecond(doc["ts"])})
    ]
    assert len(expected) >= 5 and summary.events_read == len(expected)
    assert [run["event_id"] for run in seen] == expected

    seen.clear()
    summary = await replay(query, registry, EventFilter.of(event="VarSet"))  # no handler
    assert seen == [] and summary.events_read == summary.total == 0


async def test_replay_of_the_calls_example_matches_the_capture(filled_log: FilledLog) -> None:
    target = filled_log.database.client[f"{filled_log.name}_calls"]
    try:
        summary = await replay(EventQuery(filled_log.database), calls_registry(), into=target)
        calls = {doc["_id"]: doc async for doc in target["calls"].find({})}
    finally:
        await filled_log.database.client.drop_database(target.name)
    assert summary.failures == 0
    assert len(calls) == 20 and all(call["active_channels"] == 0 for call in calls.values())
    first = calls[FIRST_CALL]  # stored as pbx1's and as pbx2's: the same call twice
    assert first["channels"] == ["Local/100@test-00000000;1", "Local/100@test-00000000;2"]
    assert first["hangup_cause"] == 16 and first["hangup_cause_txt"] == "Normal Clearing"
    assert first["duration"] is not None and 0.9 < first["duration"] < 1.1


def _messages(log: FilledLog, docs: list[dict[str, Any]]) -> list[Any]:
    by_key = {doc["_id"]: message for doc, message in zip(log.pbx1, log.messages, strict=True)}
    return [by_key[doc["_id"]] for doc in docs]


def _grouped(headers: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """Headers as stored and rebuilt: a repeated name's values follow its first place."""
    order: dict[str, list[tuple[str, str]]] = {}
    for name, value in headers:
        order.setdefault(name.lower(), []).append((name, value))
    return [pair for pairs in order.values() for pair in pairs]


def _millisecond(value: Any) -> Any:
    return value.replace(microsecond=value.microsecond // 1000 * 1000)
