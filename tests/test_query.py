"""The query API against a real nx-27017 holding the 20 real calls (both drivers).

What is expected is worked out from the capture itself (stream order, the
channels and causes Asterisk sent), never from the code under test.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo.errors import OperationFailure

from amiworker.ami.message import Message
from amiworker.devstack.embedded_mongo import free_port
from amiworker.fleet.documents import DEAD, FAILED
from amiworker.fleet.locktable import LockTable
from amiworker.mongo import StoreUnavailable, close_client, open_client
from amiworker.ops.filters import EventFilter, event_order
from amiworker.ops.follow import follow
from amiworker.ops.query import EventQuery
from amiworker.timeparse import parse_time
from tests.log_plugin import (
    ERROR,
    FIRST_CALL,
    LIVE_WORKER,
    STALE_WORKER,
    STOPPED_WORKER,
    FilledLog,
    documents,
)
from tests.waiting import wait_for

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


# -- times and filters (no server) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-26T06:46:21Z", datetime(2026, 11, 26, 6, 46, 21, tzinfo=UTC)),
        ("2026-11-26 06:46:21.052", datetime(2026, 11, 26, 6, 46, 21, 52000, tzinfo=UTC)),
        ("2026-11-26T08:46:21+02:00", datetime(2026, 11, 26, 6, 46, 21, tzinfo=UTC)),
        ("2026-11-26", datetime(2026, 11, 26, tzinfo=UTC)),
        ("10m", NOW - timedelta(minutes=10)),
        ("2h", NOW - timedelta(hours=2)),
        ("3d", NOW - timedelta(days=3)),
        ("90s ago", NOW - timedelta(seconds=90)),
        ("1.5h", NOW - timedelta(minutes=90)),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    assert parse_time(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "10x", "", "2026-13-01"])
def test_parse_time_refuses_with_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match=r"ISO 8601 .* duration ago \(30s, 10m"):
        parse_time(text)


def test_filter_of() -> None:
    flt = EventFilter.of(event="Hangup, Newstate", state="failed", since="2026-11-26")
    assert flt.events == ("Hangup", "Newstate")
    assert flt.states == (FAILED, DEAD)  # a failed handler, retried or not
    assert flt.mongo() == {
        "event": {"$in": ["Hangup", "Newstate"]},
        "state": {"$in": [FAILED, DEAD]},
        "ts": {"$gte": datetime(2026, 11, 26, tzinfo=UTC)},
    }
    assert EventFilter.of(server="pbx1").mongo("fullDocument.") == {"fullDocument.server": "pbx1"}
    with pytest.raises(ValueError, match="unknown state 'gone'"):
        EventFilter.of(state="gone")


# -- events --------------------------------------------------------------------------------


def raw_order(log: FilledLog) -> dict[str, int]:
    """Position of each pbx1 document in the stream Asterisk sent."""
    return {doc["_id"]: index for index, doc in enumerate(log.pbx1)}


async def test_events_are_the_newest_oldest_first_in_stream_order(shared_log: FilledLog) -> None:
    query = EventQuery(shared_log.database)
    docs = await query.events(server="pbx1", limit=100)
    assert len(docs) == 100
    position = raw_order(shared_log)
    # The newest 100 of pbx1, in the order Asterisk sent them, although many
    # share a millisecond (which is all a BSON date holds).
    assert [position[doc["_id"]] for doc in docs] == list(
        range(len(shared_log.pbx1) - 100, len(shared_log.pbx1))
    )
    same_ms = Counter(doc["ts"] for doc in docs)
    assert max(same_ms.values()) > 1, "the fixture should have events sharing a millisecond"
    everything = await query.events(limit=10_000)
    assert len(everything) == len(shared_log.docs)
    assert everything == sorted(everything, key=event_order)


async def test_events_filters(shared_log: FilledLog) -> None:
    query = EventQuery(shared_log.database)
    hangups = await query.events(event="Hangup", server="pbx1", limit=1000)
    assert len(hangups) == 40 and {doc["event"] for doc in hangups} == {"Hangup"}

    call = await query.events(linkedid=FIRST_CALL, limit=1000)
    assert {doc["server"] for doc in call} == {"pbx1", "pbx2"}
    assert all(doc["linkedid"] == FIRST_CALL for doc in call)

    uniqueid = hangups[0]["uniqueid"]
    channel = await query.events(uniqueid=uniqueid, server="pbx1", limit=1000)
    assert channel and all(doc["uniqueid"] == uniqueid for doc in channel)

    middle = shared_log.pbx1[len(shared_log.pbx1) // 2]["ts"]
    middle = middle.replace(microsecond=middle.microsecond // 1000 * 1000)  # as BSON holds it
    later = await query.events(server="pbx1", since=middle, limit=10_000)
    earlier = await query.events(server="pbx1", until=middle, limit=10_000)
    assert len(later) + len(earlier) == len(shared_log.pbx1)
    assert all(doc["ts"] >= middle for doc in later)
    assert all(doc["ts"] < middle for doc in earlier)

    failed = await query.events(state="failed")
    assert {doc["_id"] for doc in failed} == {*shared_log.dead, *shared_log.failed}
    assert {doc["error"] for doc in failed} == {ERROR}
    dead = await query.events(state="dead")
    assert {doc["_id"] for doc in dead} == set(shared_log.dead)
    assert await query.events(limit=0) == []


# -- one call ------------------------------------------------------------------------------


async def test_call_story_matches_the_capture(shared_log: FilledLog) -> None:
    linkedid = "c20p5038-3-1"
    messages = shared_log.messages
    channels = {m["Uniqueid"] for m in messages if m.get("Linkedid") == linkedid}
    # Every channel event of the call: by Linkedid, or by any *uniqueid of its channels
    # (DialBegin and LocalBridge carry only Dest*/LocalOne* ids).
    expected = [
        m
        for m in messages
        if m.get("Linkedid") == linkedid
        or any(n.lower().endswith("uniqueid") and v in channels for n, v in m.headers)
    ]
    # 39 events per call: DeviceStateChange (4) does not race, and OriginateResponse
    # answered the capturing client's own action.
    assert len(expected) == 34

    story = await EventQuery(shared_log.database).call(linkedid, server="pbx1")
    assert story is not None
    assert [doc["event"] for doc in story.events] == [m.name for m in expected]
    assert [doc["headers"]["timestamp"] for doc in story.events] == [
        m["Timestamp"] for m in expected
    ]
    assert story.projection is None
    newchannels = [m for m in expected if m.name == "Newchannel"]
    assert [c.uniqueid for c in story.channels] == [m["Uniqueid"] for m in newchannels]
    for channel, created in zip(story.channels, newchannels, strict=True):
        assert channel.name == created["Channel"]
        states = [
            m["ChannelStateDesc"]
            for m in expected
            if m.name in ("Newchannel", "Newstate") and m["Uniqueid"] == channel.uniqueid
        ]
        assert [state for _, state in channel.states] == states
    hangups = {m["Uniqueid"]: m for m in expected if m.name == "Hangup"}
    for channel in story.channels:
        assert channel.hangup_cause == hangups[channel.uniqueid]["Cause"]
        assert channel.hangup_cause_txt == hangups[channel.uniqueid]["Cause-txt"]
        assert channel.hangup_at is not None


async def test_call_across_servers_and_unknown(shared_log: FilledLog) -> None:
    query = EventQuery(shared_log.database)
    both = await query.call(FIRST_CALL)
    one = await query.call(FIRST_CALL, server="pbx2")
    other = await query.call(FIRST_CALL, server="pbx1")
    assert both is not None and one is not None and other is not None
    assert both.servers == ["pbx1", "pbx2"] and one.servers == ["pbx2"]
    assert len(both.events) == len(one.events) + len(other.events)
    assert await query.call("no-such-call") is None


async def test_call_includes_its_projection(shared_log: FilledLog, database_name: str) -> None:
    projections = shared_log.database[database_name]  # a collection of this test's own
    await projections.insert_one({"_id": FIRST_CALL, "duration": 1.0})
    query = EventQuery(shared_log.database, calls_collection=database_name)
    try:
        story = await query.call(FIRST_CALL)
    finally:
        await projections.drop()
    assert story is not None and story.projection == {"_id": FIRST_CALL, "duration": 1.0}


# -- reports -------------------------------------------------------------------------------


async def test_hangup_causes_and_busiest_extensions(shared_log: FilledLog) -> None:
    query = EventQuery(shared_log.database)
    causes = Counter(
        (m["Cause"], m["Cause-txt"]) for m in shared_log.messages if m.name == "Hangup"
    )
    pbx1 = await query.hangup_causes(server="pbx1")
    assert [(c.cause, c.text, c.count) for c in pbx1] == [
        (cause, text, count) for (cause, text), count in causes.most_common()
    ]
    # Calls placed to each extension: the Exten of the Newchannel that started the call.
    dialled = Counter(
        m["Exten"]
        for m in shared_log.messages
        if m.name == "Newchannel" and m["Uniqueid"] == m["Linkedid"]
    )
    busiest = await query.busiest_extensions(server="pbx1")
    assert [(e.exten, e.calls) for e in busiest] == dialled.most_common()
    assert sum(e.calls for e in await query.busiest_extensions()) == 21  # pbx2 has one call


class Pipelines:
    """Records the pipelines given to ``aggregate`` and answers nothing."""

    def __init__(self) -> None:
        self.seen: list[list[dict[str, Any]]] = []

    def aggregate(self, pipeline: list[dict[str, Any]]) -> Any:
        self.seen.append(pipeline)

        async def rows() -> AsyncIterator[dict[str, Any]]:
            nothing: list[dict[str, Any]] = []
            for row in nothing:
                yield row

        return rows()


async def test_reports_match_the_time_span_on_the_server(shared_log: FilledLog) -> None:
    # nx-27017 ignores date ranges inside $match, so the span is checked where it
    # goes: the first stage, with the indexed fields, as MongoDB needs it.
    query = EventQuery(shared_log.database)
    query.events_collection = recorder = Pipelines()
    since, until = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC)
    assert await query.hangup_causes(since, until, server="pbx1") == []
    assert await query.busiest_extensions(since, until, limit=3) == []
    causes, busiest = recorder.seen
    span = {"$gte": since, "$lt": until}
    assert causes[0] == {"$match": {"server": "pbx1", "event": "Hangup", "ts": span}}
    assert busiest[0]["$match"]["event"] == "Newchannel" and busiest[0]["$match"]["ts"] == span
    assert busiest[-1] == {"$limit": 3}


# -- the fleet and dead events ---------------------------------------------------------------


async def test_workers_judged_by_the_lease(shared_log: FilledLog) -> None:
    workers = {w.worker_id: w for w in await EventQuery(shared_log.database).workers(lease=10)}
    live, stale = workers[LIVE_WORKER], workers[STALE_WORKER]
    assert not live.stale and live.age is not None and live.age < 10
    assert live.counters["races_won"] == 600 and live.queue_depth == 7
    assert live.servers["pbx2"] == {"connected": False, "reconnects": 3}
    assert stale.stale and stale.age is not None and stale.age > 10
    assert stale.pid == 202 and stale.host == "host-b" and stale.state == "running"
    stopped = workers[STOPPED_WORKER]  # stopped cleanly: old, but not stale
    assert (
        stopped.state == "stopped" and not stopped.stale and stopped.counters["events_seen"] == 77
    )


async def test_retry_dead(filled_log: FilledLog) -> None:
    query = EventQuery(filled_log.database)
    assert await query.retry_dead(server="pbx2") == 0
    assert await query.retry_dead(event="Hangup") == 2
    assert await query.events(state="dead") == []
    revived = await query.events(state="failed")
    assert {doc["_id"] for doc in revived} == {*filled_log.dead, *filled_log.failed}
    assert all(doc["attempts"] == 0 for doc in revived if doc["_id"] in filled_log.dead)


async def test_unreachable_server_is_one_line_without_the_password() -> None:
    uri = f"mongodb://app:hunter2@127.0.0.1:{free_port()}/"
    client = open_client(uri, serverSelectionTimeoutMS=300)
    query = EventQuery(client["x"], uri=uri, client=client)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await query.events()
    finally:
        await query.close()
    message = str(caught.value)
    assert "hunter2" not in message and "app:***@127.0.0.1" in message
    assert "unreachable" in message and "\n" not in message


# -- follow --------------------------------------------------------------------------------


class Tail:
    """Runs ``follow`` in a task and keeps what it yields."""

    def __init__(self, stream: AsyncIterator[dict[str, Any]]) -> None:
        self.seen: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._run(stream))

    async def _run(self, stream: AsyncIterator[dict[str, Any]]) -> None:
        async for doc in stream:
            self.seen.append(doc)

    @property
    def ids(self) -> list[str]:
        return [doc["_id"] for doc in self.seen]

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def new_docs(
    messages: list[Message], server: str, count: int, received: datetime
) -> list[dict[str, Any]]:
    """Events of ``server``, all received at the same millisecond."""
    docs = documents(messages[:count], server, worker="other-worker")
    for doc in docs:
        doc["received_at"] = received
    return docs


async def backlog_of(database: Any, messages: list[Message], count: int) -> LockTable:
    """A log of ``count`` events, received a minute ago; the store of another worker."""
    store = LockTable(database, "events", "other-worker")
    await store.ensure_indexes()
    received = datetime.now(UTC) - timedelta(minutes=1)
    assert len((await store.claim(new_docs(messages, "pbx-old", count, received))).won) == count
    return store


@pytest.mark.parametrize("mode", ["changes", "poll"])
async def test_follow_shows_the_backlog_then_each_new_event_once(
    database: Any, capture_events: list[Message], mode: Any
) -> None:
    query = EventQuery(database)
    store = await backlog_of(database, capture_events, 20)
    modes: list[tuple[str, str | None]] = []
    tail = Tail(
        follow(
            query,
            EventFilter(),
            backlog=5,
            mode=mode,
            poll_interval=0.02,
            on_mode=lambda m, r: modes.append((m, r)),
        )
    )
    try:
        await wait_for(lambda: len(tail.seen) >= 5, timeout=10, what="the backlog")
        backlog = await query.events(limit=5)
        assert tail.ids == [doc["_id"] for doc in backlog]
        now = await query.server_time()
        # Three batches received within one millisecond, stored one after another
        # (ties on received_at, digests in no order), then one straggler received
        # earlier than those but stored last.
        batches = [new_docs(capture_events, f"pbx-new{i}", 10, now) for i in range(3)]
        straggler = new_docs(capture_events, "pbx-late", 3, now - timedelta(seconds=2))
        for batch in [*batches, straggler]:
            assert len((await store.claim(batch)).won) == len(batch)
            await asyncio.sleep(0.05)  # let some polls pass between the writes
        expected = {doc["_id"] for batch in [*batches, straggler] for doc in batch}
        await wait_for(
            lambda: len(tail.seen) >= 5 + len(expected), timeout=10, what="the new events"
        )
        await asyncio.sleep(0.2)  # a few more polls: nothing may come twice
        assert len(tail.ids) == len(set(tail.ids)) == 5 + len(expected)
        assert set(tail.ids[5:]) == expected
    finally:
        await tail.stop()
    assert modes == [(mode, None)]


async def test_follow_filters_new_events(database: Any, capture_events: list[Message]) -> None:
    query = EventQuery(database)
    store = await backlog_of(database, capture_events, 10)
    tail = Tail(follow(query, EventFilter.of(server="pbx-b", event="Hangup"), backlog=0))
    try:
        await asyncio.sleep(0.1)
        received = await query.server_time()
        ending = capture_events[-120:]  # the end of the last calls: hangups among the rest
        hangups = sum(m.name == "Hangup" for m in ending)
        assert 5 < hangups < len(ending)
        await store.claim(new_docs(ending, "pbx-a", len(ending), received))
        await store.claim(new_docs(ending, "pbx-b", len(ending), received))
        await wait_for(lambda: len(tail.seen) >= hangups, timeout=10, what="pbx-b's hangups")
        await asyncio.sleep(0.2)
        assert len(tail.seen) == hangups
        assert {(d["server"], d["event"]) for d in tail.seen} == {("pbx-b", "Hangup")}
    finally:
        await tail.stop()


class NoChangeStreams:
    """A collection that refuses change streams as a standalone MongoDB does."""

    def __init__(self, collection: Any) -> None:
        self._collection = collection

    def watch(self, *args: Any, **kwargs: Any) -> Any:
        raise OperationFailure(
            "The $changeStream stage is only supported on replica sets",
            code=40573,
            details={"errmsg": "The $changeStream stage is only supported on replica sets"},
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._collection, name)


async def test_follow_falls_back_to_polling_where_change_streams_are_refused(
    database: Any, capture_events: list[Message]
) -> None:
    query = EventQuery(database)
    store = await backlog_of(database, capture_events, 5)
    query.events_collection = NoChangeStreams(query.events_collection)
    modes: list[tuple[str, str | None]] = []
    tail = Tail(
        follow(
            query,
            EventFilter(),
            backlog=2,
            poll_interval=0.02,
            on_mode=lambda m, r: modes.append((m, r)),
        )
    )
    try:
        await wait_for(lambda: len(tail.seen) >= 2, timeout=10, what="the backlog")
        batch = new_docs(capture_events, "pbx-new", 4, await query.server_time())
        await store.claim(batch)
        await wait_for(lambda: len(tail.seen) >= 6, timeout=10, what="the new events")
        await asyncio.sleep(0.1)
    finally:
        await tail.stop()
    assert len(tail.ids) == 6 and set(tail.ids[2:]) == {d["_id"] for d in batch}
    assert modes[0][0] == "poll"
    assert modes[0][1] is not None and "only supported on replica sets (code 40573)" in modes[0][1]

    with pytest.raises(StoreUnavailable, match="change stream"):
        async for _ in follow(query, EventFilter(), mode="changes"):
            pass


async def test_follow_refuses_states_and_an_end(database: Any) -> None:
    query = EventQuery(database)
    for flt in (EventFilter.of(state="dead"), EventFilter.of(until="1h")):
        with pytest.raises(ValueError, match="cannot select states or an end time"):
            async for _ in follow(query, flt):
                pass


async def test_from_settings_opens_and_closes(mongo_uri: str, database_name: str) -> None:
    from amiworker.settings import Settings

    settings = Settings.load(None, env_file=None, mongo_uri=mongo_uri, database=database_name)
    async with EventQuery.from_settings(settings) as query:
        await query.ping()
        assert await query.events() == []
    client = open_client(mongo_uri)
    await client.drop_database(database_name)
    await close_client(client)
