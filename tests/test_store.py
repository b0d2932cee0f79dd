"""The event log and lock table, against a real nx-27017 with both drivers.

Tests taking ``store`` or ``database`` run once with PyMongo's asyncio client
and once with Motor (see tests/mongo_plugin.py). A few unit tests use a fake
collection to reach error paths no server produces on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pymongo.errors import AutoReconnect, BulkWriteError

from amiworker.ami.message import Message
from amiworker.ami.protocol import Parser
from amiworker.devstack.embedded_mongo import EmbeddedMongo, EmbeddedMongoError, free_port
from amiworker.fleet.documents import (
    CLAIMED,
    DEAD,
    DONE,
    FAILED,
    INDEXES,
    QUEUED,
    RETIRED_INDEXES,
    STATES,
    TTL_KEY,
    ensure_indexes,
    event_document,
    message_from_document,
)
from amiworker.fleet.heartbeat import FleetView
from amiworker.fleet.locktable import MAX_ERROR_LENGTH, LockTable, StoreUnavailable
from amiworker.mongo import close_client, open_client
from amiworker.ops.filters import EventFilter
from amiworker.ops.query import EventQuery
from amiworker.timeparse import timestamp_datetime, timestamp_micros

RECEIVED = datetime(2026, 11, 26, 7, 0, 0, tzinfo=UTC)


# What an operator reads, straight from the collections (the lock table has no query API).
async def get_event(table: LockTable, key: str) -> dict[str, Any] | None:
    doc: dict[str, Any] | None = await table.events.find_one({"_id": key})
    return doc


async def find_events(table: LockTable, query: dict[str, Any]) -> list[dict[str, Any]]:
    return [doc async for doc in table.events.find(query).sort([("ts", 1), ("_id", 1)])]


async def count_by_state(table: LockTable) -> dict[str, int]:
    return {state: await table.events.count_documents({"state": state}) for state in STATES}


async def list_workers(table: LockTable) -> list[dict[str, Any]]:
    return [doc async for doc in table.workers.find({}).sort("_id", 1)]


async def reclaim(
    table: LockTable,
    lease: float = 10.0,
    *,
    max_attempts: int = 5,
    limit: int = 1000,
    retries: bool = True,
) -> list[dict[str, Any]]:
    """One take-over round, as fleet.takeover makes it: a dead worker's events, then
    queued events and (with ``retries``) due retries."""
    now, rows = await table.fleet()
    view = FleetView(now, rows)
    dead = [row["_id"] for row in view.expired(lease) if row["_id"] != table.worker_id]
    taken = await table.take_from_dead(dead, limit, max_attempts)
    if dead and len(taken) < limit:
        for worker in dead:
            await table.forget_worker(worker, view.cutoff(lease))
    taken += (await table.take_runnable(limit - len(taken), retries=retries)).docs
    return taken


def message(*headers: tuple[str, str]) -> Message:
    raw = "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    return Parser(banner=False).feed(raw.encode())[0]


def hangup(uniqueid: str, linkedid: str, ts: str = "1795675582.056164") -> Message:
    return message(
        ("Event", "Hangup"),
        ("Privilege", "call,all"),
        ("Timestamp", ts),
        ("Channel", "Local/100@test-00000000;1"),
        ("AccountCode", ""),
        ("Uniqueid", uniqueid),
        ("Linkedid", linkedid),
        ("Cause", "16"),
        ("Cause-txt", "Normal Clearing"),
    )


def docs_for(count: int, worker: str, prefix: str = "k") -> list[dict[str, Any]]:
    return [
        event_document(f"{prefix}{i:04d}", "pbx1", hangup(f"u{i}", "l1"), worker, RECEIVED)
        for i in range(count)
    ]


# -- the document (no server) -----------------------------------------------------------


def test_document_fields() -> None:
    doc = event_document("key-1", "pbx1", hangup("c-2-1", "c-2-0"), "worker-a", RECEIVED)
    assert doc == {
        "_id": "key-1",
        "server": "pbx1",
        "event": "Hangup",
        "uniqueid": "c-2-1",
        "linkedid": "c-2-0",
        "ts": datetime(2026, 11, 26, 6, 46, 22, 56164, tzinfo=UTC),
        "received_at": RECEIVED,
        "headers": {
            "event": "Hangup",
            "privilege": "call,all",
            "timestamp": "1795675582.056164",
            "channel": "Local/100@test-00000000;1",
            "accountcode": "",
            "uniqueid": "c-2-1",
            "linkedid": "c-2-0",
            "cause": "16",
            "cause-txt": "Normal Clearing",
        },
        "state": "claimed",
        "claimed_by": "worker-a",
        "attempts": 0,
        "error": None,
        "done_at": None,
    }


def test_document_repeated_headers_become_lists_in_order() -> None:
    msg = message(
        ("Event", "UserEvent"),
        ("ChanVariable", "A=1"),
        ("Variable", "x=1"),
        ("CHANVARIABLE", "B= 2 "),
        ("chanvariable", "C=3"),
    )
    headers = event_document("k", "pbx1", msg, "w", RECEIVED)["headers"]
    assert headers["chanvariable"] == ["A=1", "B= 2 ", "C=3"]
    assert headers["variable"] == "x=1"


@pytest.mark.parametrize(
    ("headers", "uniqueid"),
    [
        ((("Event", "Newstate"), ("Uniqueid", "u1")), "u1"),
        # the plain Uniqueid wins over an earlier prefixed one
        ((("Event", "DialBegin"), ("DestUniqueid", "d1"), ("Uniqueid", "u1")), "u1"),
        (
            (("Event", "LocalBridge"), ("LocalOneUniqueid", "one"), ("LocalTwoUniqueid", "two")),
            "one",
        ),
        ((("Event", "DialEnd"), ("DestUniqueID", "d2")), "d2"),
        ((("Event", "DeviceStateChange"), ("Device", "Local/100@test")), None),
    ],
)
def test_document_uniqueid(headers: tuple[tuple[str, str], ...], uniqueid: str | None) -> None:
    assert event_document("k", "pbx1", message(*headers), "w", RECEIVED)["uniqueid"] == uniqueid


def test_document_linkedid_absent() -> None:
    msg = message(("Event", "FullyBooted"), ("Status", "Fully Booted"))
    doc = event_document("k", "pbx1", msg, "w", RECEIVED)
    assert doc["linkedid"] is None and doc["uniqueid"] is None


@pytest.mark.parametrize("value", ["", "soon", "nan", "inf", "1e400", "-1e20"])
def test_document_bad_timestamp_falls_back_to_received_at(value: str) -> None:
    msg = message(("Event", "Hangup"), ("Timestamp", value))
    assert event_document("k", "pbx1", msg, "w", RECEIVED)["ts"] == RECEIVED


def test_parse_timestamp() -> None:
    assert timestamp_datetime("1795675581.052545") == datetime(
        2026, 11, 26, 6, 46, 21, 52545, tzinfo=UTC
    )
    assert timestamp_datetime(None) is None
    # Exact, not through a float: the microseconds survive any magnitude.
    assert timestamp_micros("1795675581.052545") == 1795675581_052545
    assert timestamp_micros("1795675581") == 1795675581_000000
    for garbage in ("nan", "inf", "-5.1", "1e9", "1795675581.5x", "9" * 30):
        assert timestamp_micros(garbage) is None and timestamp_datetime(garbage) is None


def test_documents_of_the_real_capture(fixtures_dir: Any) -> None:
    data = (fixtures_dir / "asterisk22-20-calls.txt").read_bytes()
    events = [m for m in Parser().feed(data) if m.kind == "event"]
    docs = [event_document(str(i), "pbx1", m, "w", RECEIVED) for i, m in enumerate(events)]
    by_event: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_event.setdefault(doc["event"], []).append(doc)
    assert len(by_event["Hangup"]) == 40
    assert all(d["headers"]["cause-txt"] == "Normal Clearing" for d in by_event["Hangup"])
    assert all(d["uniqueid"] is None for d in by_event["DeviceStateChange"])
    local = by_event["LocalBridge"][0]
    assert local["uniqueid"] == local["headers"]["localoneuniqueid"]
    assert all(d["ts"] != RECEIVED for d in by_event["Newchannel"])


def test_message_from_document_round_trip() -> None:
    msg = message(
        ("Event", "VarSet"),
        ("Uniqueid", "u1"),
        ("Variable", "a"),
        ("Value", ""),
        ("Variable", "b"),
    )
    rebuilt = message_from_document(event_document("k", "pbx1", msg, "w", RECEIVED))
    assert rebuilt.kind == "event" and rebuilt.name == "VarSet"
    assert rebuilt["UNIQUEID"] == "u1"
    assert rebuilt.getall("Variable") == ["a", "b"]
    assert rebuilt["Value"] == ""


# -- indexes --------------------------------------------------------------------------


async def index_keys(store: LockTable) -> dict[tuple[tuple[str, int], ...], dict[str, Any]]:
    """Indexes by their keys (nx-27017 renames indexes; MongoDB keeps our names)."""
    info = await store.events.index_information()
    return {tuple((k, int(d)) for k, d in spec["key"]): spec for spec in info.values()}


async def test_indexes_exist_and_ensure_is_idempotent(store: LockTable) -> None:
    await store.ensure_indexes()
    first = await index_keys(store)
    await store.ensure_indexes()
    assert await index_keys(store) == first
    expected = {tuple(keys) for _, keys in INDEXES} | {(("_id", 1),)}
    assert set(first) == expected
    assert all("expireAfterSeconds" not in spec for spec in first.values())


async def test_an_index_earlier_versions_made_and_no_query_needs_is_dropped(
    store: LockTable,
) -> None:
    # Every index is written on every claim and every ack: one left from an upgrade
    # would cost each event for nothing.
    await store.ensure_indexes()
    for name, keys in RETIRED_INDEXES:
        await store.events.create_index(keys, name=name)
    before = await store.events.index_information()
    await store.ensure_indexes()
    after = await store.events.index_information()
    retired = [keys for _, keys in RETIRED_INDEXES]
    dropped = {name for name, spec in before.items() if list(spec["key"]) in retired}
    assert len(dropped) == len(RETIRED_INDEXES)
    assert set(after) == set(before) - dropped


async def test_a_users_own_text_or_hashed_index_is_left_alone() -> None:
    """MongoDB describes such an index by kind, not by direction ("text", "hashed"):
    looking for retired indexes must neither drop it nor fail on it."""

    class Events:  # what ensure_indexes asks of a collection, as MongoDB answers
        def __init__(self) -> None:
            self.indexes: dict[str, dict[str, Any]] = {
                "headers.exten_text": {"key": [("_fts", "text"), ("_ftsx", 1)]},
                "linkedid_hashed": {"key": [("linkedid", "hashed")]},
                "state_1_claimed_by_1": {"key": [("state", 1.0), ("claimed_by", 1.0)]},
            }

        async def create_index(self, keys: list[tuple[str, int]], name: str, **_: Any) -> str:
            self.indexes[name] = {"key": keys}
            return name

        async def index_information(self) -> dict[str, dict[str, Any]]:
            return dict(self.indexes)

        async def drop_index(self, name: str) -> None:
            del self.indexes[name]

    events = Events()
    await ensure_indexes(events)
    assert set(events.indexes) == {name for name, _ in INDEXES} | {
        "headers.exten_text",
        "linkedid_hashed",
    }


async def test_ttl_index_created_changed_and_dropped(store: LockTable) -> None:
    ttl = tuple(TTL_KEY)
    await store.ensure_indexes(ttl_days=1)
    assert (await index_keys(store))[ttl]["expireAfterSeconds"] == 86400
    await store.ensure_indexes(ttl_days=1)
    assert (await index_keys(store))[ttl]["expireAfterSeconds"] == 86400
    await store.ensure_indexes(ttl_days=2.5)
    assert (await index_keys(store))[ttl]["expireAfterSeconds"] == 216000
    await store.ensure_indexes(ttl_days=None)
    assert ttl not in await index_keys(store)


# -- claiming -------------------------------------------------------------------------


@pytest.fixture
async def open_store(
    mongo_uri: str, mongo_driver: str, database_name: str
) -> AsyncIterator[Callable[[str], LockTable]]:
    """Stores of other workers on the same database, each with its own client."""
    clients: list[Any] = []

    def opener(worker_id: str) -> LockTable:
        client = open_client(mongo_uri, mongo_driver)  # type: ignore[arg-type]
        clients.append(client)
        return LockTable(client[database_name], "events", worker_id, uri=mongo_uri)

    yield opener
    for client in clients:
        await close_client(client)


async def test_claim_stores_the_document_as_built(store: LockTable) -> None:
    msg = message(
        ("Event", "VarSet"),
        ("Timestamp", "1795675581.052680"),
        ("Uniqueid", "u1"),
        ("Variable", "a"),
        ("Variable", "b"),
        ("AccountCode", ""),
    )
    doc = event_document("k1", "pbx1", msg, "worker-a", RECEIVED)
    assert (await store.claim([doc])).won == [doc]
    stored = await get_event(store, "k1")
    assert stored is not None
    # BSON dates hold milliseconds; the exact Timestamp stays in the headers.
    assert stored["ts"] == datetime(2026, 11, 26, 6, 46, 21, 52000, tzinfo=UTC)
    assert stored["headers"]["timestamp"] == "1795675581.052680"
    assert stored == {**doc, "ts": stored["ts"]}


async def test_second_claim_of_same_events_wins_nothing(
    store: LockTable, open_store: Callable[[str], LockTable]
) -> None:
    other = open_store("worker-b")
    assert len((await store.claim(docs_for(10, "worker-a"))).won) == 10
    assert (await other.claim(docs_for(10, "worker-b"))).won == []
    # and a batch mixing new and taken events wins exactly the new ones, in order
    mixed = docs_for(15, "worker-b")
    random.Random(1).shuffle(mixed)
    won = (await other.claim(mixed)).won
    assert [d["_id"] for d in won] == [d["_id"] for d in mixed if d["_id"] >= "k0010"]


async def test_concurrent_claims_each_event_won_exactly_once(
    store: LockTable, open_store: Callable[[str], LockTable]
) -> None:
    stores = [store, open_store("worker-b"), open_store("worker-c")]
    count = 300

    async def race(s: LockTable, seed: int) -> list[str]:
        docs = docs_for(count, s.worker_id)
        random.Random(seed).shuffle(docs)
        won: list[str] = []
        for start in range(0, count, 50):
            won += [d["_id"] for d in (await s.claim(docs[start : start + 50])).won]
        return won

    results = await asyncio.gather(*(race(s, seed) for seed, s in enumerate(stores)))
    all_won = [key for won in results for key in won]
    assert sorted(all_won) == sorted(d["_id"] for d in docs_for(count, "x"))  # once each
    for s, won in zip(stores, results, strict=True):
        holders = {d["_id"]: d["claimed_by"] for d in await find_events(s, {})}
        assert all(holders[key] == s.worker_id for key in won)
    assert sum(1 for won in results if won) >= 1


class FlakyInsert:
    """A collection whose insert_many reaches the server, then loses the reply."""

    def __init__(self, real: Any, fail_times: int = 1) -> None:
        self.real = real
        self.fail_times = fail_times

    async def insert_many(self, docs: list[dict[str, Any]], ordered: bool) -> Any:
        if not self.fail_times:
            return await self.real.insert_many(docs, ordered=ordered)
        self.fail_times -= 1
        with contextlib.suppress(BulkWriteError):  # the reply is lost anyway
            await self.real.insert_many(docs, ordered=ordered)
        raise AutoReconnect("connection closed")


async def test_retried_claim_keeps_what_the_lost_attempt_won(
    store: LockTable, open_store: Callable[[str], LockTable]
) -> None:
    other = open_store("worker-b")
    assert len((await other.claim(docs_for(5, "worker-b"))).won) == 5  # k0000..k0004 are b's
    docs = docs_for(10, "worker-a")
    real = store._claims
    store._claims = FlakyInsert(real)
    with pytest.raises(StoreUnavailable, match="unreachable"):
        await store.claim(docs)
    # The first attempt did store k0005..k0009 as ours; the retry must say so.
    won = (await store.claim(docs)).won
    assert [d["_id"] for d in won] == [f"k{i:04d}" for i in range(5, 10)]
    # Settled now: a claim of the same events again is an ordinary loss.
    assert (await store.claim(docs)).won == []


class FakeCollection:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def insert_many(self, docs: list[dict[str, Any]], ordered: bool) -> Any:
        raise self.error

    def with_options(self, **options: Any) -> FakeCollection:
        return self


class FakeDatabase:
    name = "fake"

    def __init__(self, error: Exception) -> None:
        self.collection = FakeCollection(error)

    def __getitem__(self, name: str) -> FakeCollection:
        return self.collection


@pytest.mark.parametrize(
    ("details", "expected"),
    [
        (
            {
                "writeErrors": [{"index": 0, "code": 11000, "errmsg": "E11000 duplicate"}],
                "writeConcernErrors": [{"code": 64, "errmsg": "waiting for replication timed out"}],
            },
            "write concern error 64: waiting for replication timed out",
        ),
        (  # the store's state, not the document's: retried like an outage
            {"writeErrors": [{"index": 1, "code": 10107, "errmsg": "not primary"}]},
            "write error 10107: not primary",
        ),
    ],
)
async def test_claim_store_write_errors_are_unavailable(
    details: dict[str, Any], expected: str
) -> None:
    uri = "mongodb://app:hunter2@db1,db2/?replicaSet=rs"
    store = LockTable(FakeDatabase(BulkWriteError(details)), "events", "w", uri=uri)
    with pytest.raises(StoreUnavailable) as info:
        await store.claim(docs_for(2, "w"))
    text = str(info.value)
    assert expected in text
    assert "mongodb://app:***@db1,db2/?replicaSet=rs" in text
    assert "hunter2" not in text and "\n" not in text


async def test_a_refused_document_is_rejected_and_the_others_claimed() -> None:
    # Judged by code and keyPattern, never by message: a validator's 121, and a
    # duplicate on an operator's unique index, refuse that document only.
    details = {
        "writeErrors": [
            {"index": 1, "code": 121, "errmsg": "Document failed validation"},
            {"index": 2, "code": 11000, "errmsg": "E11000", "keyPattern": {"headers.x": 1}},
            {"index": 3, "code": 11000, "errmsg": "E11000", "keyPattern": {"_id": 1}},
        ]
    }
    store = LockTable(FakeDatabase(BulkWriteError(details)), "events", "w")
    docs = docs_for(5, "w")
    claimed = await store.claim(docs)
    assert claimed.won == [docs[0], docs[4]]  # docs[3] lost its race
    assert [doc for doc, _ in claimed.rejected] == [docs[1], docs[2]]
    reasons = [reason for _, reason in claimed.rejected]
    assert reasons[0] == "write error 121: Document failed validation"
    assert "unique index {'headers.x': 1}" in reasons[1]


async def test_claim_duplicates_only_is_not_an_error() -> None:
    details = {"writeErrors": [{"index": 1, "code": 11000, "errmsg": "UNIQUE constraint"}]}
    store = LockTable(FakeDatabase(BulkWriteError(details)), "events", "w")
    docs = docs_for(3, "w")
    assert (await store.claim(docs)).won == [docs[0], docs[2]]


async def test_unreachable_server_gives_one_line_without_password(mongo_driver: str) -> None:
    uri = f"mongodb://app:hunter2@127.0.0.1:{free_port()}/"
    client = open_client(uri, mongo_driver, serverSelectionTimeoutMS=200)  # type: ignore[arg-type]
    try:
        store = LockTable(client["amiworker"], "events", "w", uri=uri)
        attempts = (store.claim(docs_for(1, "w")), store.ack("k0000"), store.heartbeat())
        errors = await asyncio.gather(*attempts, return_exceptions=True)
        for error in errors:
            assert isinstance(error, StoreUnavailable), error
            text = str(error)
            assert text.startswith("MongoDB at mongodb://app:***@127.0.0.1:")
            assert "is unreachable" in text and "check that it is running" in text
            assert "hunter2" not in text and "\n" not in text
    finally:
        await close_client(client)


async def test_store_recovers_when_the_server_comes_back(tmp_path: Path, mongo_driver: str) -> None:
    async with EmbeddedMongo(tmp_path / "nx") as server:
        client = open_client(server.uri, mongo_driver, serverSelectionTimeoutMS=300)  # type: ignore[arg-type]
        try:
            store = LockTable(client["outage"], "events", "w", uri=server.uri)
            assert len((await store.claim(docs_for(3, "w", prefix="before-"))).won) == 3
            port = server.port
            await server.akill()
            with pytest.raises(StoreUnavailable, match="is unreachable"):
                await store.claim(docs_for(5, "w", prefix="during-"))
            await server.astart()
            assert server.port == port
            # Nothing of the failed claim was stored: the retry wins it all.
            assert len((await store.claim(docs_for(5, "w", prefix="during-"))).won) == 5
            # What was stored before the crash is still there.
            assert await count_by_state(store) == {
                QUEUED: 0,
                CLAIMED: 8,
                DONE: 0,
                FAILED: 0,
                DEAD: 0,
            }
        finally:
            await close_client(client)


def test_a_port_held_by_another_server_is_a_clear_error(
    tmp_path: Path, mongo_server: EmbeddedMongo
) -> None:
    clash = EmbeddedMongo(tmp_path / "nx", port=mongo_server.port, start_timeout=10)
    with pytest.raises(EmbeddedMongoError, match=f"port {mongo_server.port} is already in use"):
        clash.start()
    assert not clash.running
    assert mongo_server.running


# -- handler outcomes ----------------------------------------------------------------------


async def test_ack(store: LockTable, open_store: Callable[[str], LockTable]) -> None:
    await store.claim(docs_for(3, "worker-a"))
    assert await open_store("worker-b").ack("k0000") is False  # not b's event
    assert await store.ack("k0000") is True
    assert await store.ack("k0000") is False  # already done
    doc = await get_event(store, "k0000")
    assert doc is not None and doc["state"] == DONE
    assert isinstance(doc["done_at"], datetime)
    assert await store.ack_many(["k0001", "k0002", "missing"]) == 2
    assert await count_by_state(store) == {QUEUED: 0, CLAIMED: 0, DONE: 3, FAILED: 0, DEAD: 0}


async def test_fail_retry_then_dead(store: LockTable) -> None:
    await store.claim(docs_for(1, "worker-a"))
    before = datetime.now(UTC)
    failure = await store.fail("k0000", "ValueError: boom", max_attempts=3, retry_backoff=10)
    assert failure is not None and failure.state == FAILED
    doc = await get_event(store, "k0000")
    assert doc is not None
    assert (doc["state"], doc["attempts"], doc["error"]) == (FAILED, 1, "ValueError: boom")
    delay = (doc["retry_at"] - before).total_seconds()
    assert 9.9 <= delay <= 11.1  # backoff * 2**0 plus at most 10% jitter
    # The worker knows when to look again.
    assert failure.retry_in is not None and 10 <= failure.retry_in <= 11
    assert await reclaim(store, lease=10) == []  # not due yet
    assert await store.fail("k0000", "again", 3, 10) is None  # not claimed any more

    # Due at once from now on: each reclaim hands it back, each failure counts.
    for attempts, state in ((2, FAILED), (3, DEAD)):
        await store.events.update_one({"_id": "k0000"}, {"$currentDate": {"retry_at": True}})
        taken = await reclaim(store, lease=10)
        assert [d["_id"] for d in taken] == ["k0000"]
        assert taken[0]["state"] == CLAIMED and taken[0]["claimed_by"] == "worker-a"
        failure = await store.fail("k0000", f"failure {attempts}", 3, 0.0)
        assert failure is not None and failure.state == state
    doc = await get_event(store, "k0000")
    assert doc is not None
    assert (doc["state"], doc["attempts"], doc["error"]) == (DEAD, 3, "failure 3")
    assert "retry_at" not in doc and failure.retry_in is None
    assert await reclaim(store, lease=10) == []


async def test_reclaim_leaves_due_retries_when_told_to(store: LockTable) -> None:
    await store.claim(docs_for(1, "worker-a"))
    await store.fail("k0000", "boom", max_attempts=3, retry_backoff=0.0)
    # Without retries the reclaim reads only the workers: nothing is taken.
    assert await reclaim(store, lease=10, retries=False) == []
    assert [d["_id"] for d in await reclaim(store, lease=10)] == ["k0000"]


async def test_queued_events_are_runnable_at_once_whatever_clock_stamped_them(
    store: LockTable,
) -> None:
    # A worker won them with no backlog room and stored them queued, retry_at by its
    # own clock: an hour ahead of MongoDB's here. Any worker with room runs them now.
    ahead = datetime.now(UTC) + timedelta(hours=1)
    docs = docs_for(2, "worker-a")
    for doc in docs:
        doc.update(state=QUEUED, claimed_by=None, retry_at=ahead)
    await store.claim(docs)
    taken = await store.take_runnable(10, retries=False)
    assert sorted(d["_id"] for d in taken.docs) == ["k0000", "k0001"] and taken.queued == 2
    assert all(d["state"] == CLAIMED and d["claimed_by"] == store.worker_id for d in taken.docs)


async def test_fail_truncates_long_errors(store: LockTable) -> None:
    await store.claim(docs_for(1, "worker-a"))
    await store.fail("k0000", "x" * 100_000, max_attempts=1, retry_backoff=1)
    doc = await get_event(store, "k0000")
    assert doc is not None and doc["state"] == DEAD
    assert len(doc["error"]) == MAX_ERROR_LENGTH and doc["error"].endswith("(truncated)")


async def test_retry_dead(store: LockTable) -> None:
    await store.claim(docs_for(3, "worker-a"))
    for key in ("k0000", "k0001"):
        await store.fail(key, "boom", max_attempts=1, retry_backoff=1)
    operator = EventQuery(store.database)
    assert await operator.retry_dead(EventFilter.of(uniqueid="u1")) == 1
    assert await operator.retry_dead() == 1
    assert await operator.retry_dead() == 0
    taken = await reclaim(store, lease=10)
    assert sorted(d["_id"] for d in taken) == ["k0000", "k0001"]
    assert all(d["attempts"] == 0 for d in taken)


# -- workers and reclaiming ------------------------------------------------------------------


async def test_heartbeat(store: LockTable) -> None:
    await store.heartbeat({"servers": {"pbx1": "up"}, "queue_depth": 3})
    first = (await list_workers(store))[0]
    assert first["_id"] == "worker-a" and first["queue_depth"] == 3
    assert isinstance(first["pid"], int) and first["host"]
    assert isinstance(first["last_seen"], datetime)
    await store.heartbeat({"queue_depth": 4})
    second = (await list_workers(store))[0]
    assert second["queue_depth"] == 4
    assert isinstance(second["last_seen"], datetime)  # still a date after an update
    assert second["last_seen"] >= first["last_seen"]
    assert abs(second["last_seen"] - await store.server_time()) < timedelta(seconds=5)


async def add_dead_worker(store: LockTable, worker_id: str, docs: int) -> None:
    seen = await store.server_time() - timedelta(seconds=60)
    await store.workers.insert_one({"_id": worker_id, "last_seen": seen})
    await store.claim(docs_for(docs, worker_id, prefix=f"{worker_id}-"))


async def test_reclaim_from_dead_worker_by_two_live_workers(
    store: LockTable, open_store: Callable[[str], LockTable]
) -> None:
    await add_dead_worker(store, "dead-1", 60)
    live = [open_store("worker-b"), open_store("worker-c")]
    for s in (store, *live):
        await s.heartbeat()
    await store.claim(docs_for(5, "worker-a", prefix="alive-"))  # a live worker's: left alone

    results = await asyncio.gather(*(reclaim(s) for s in live))

    taken = [d["_id"] for docs in results for d in docs]
    assert sorted(taken) == sorted(f"dead-1-{i:04d}" for i in range(60))  # each exactly once
    for s, docs in zip(live, results, strict=True):
        for doc in docs:
            assert (doc["claimed_by"], doc["state"], doc["attempts"]) == (s.worker_id, CLAIMED, 1)
    holders = {d["_id"]: d["claimed_by"] for d in await find_events(store, {})}
    assert all(holders[key] == "worker-a" for key in holders if key.startswith("alive-"))
    assert "dead-1" not in {w["_id"] for w in await list_workers(store)}
    assert await reclaim(live[0], lease=10) == []


async def test_reclaim_buries_an_event_that_keeps_killing_workers(store: LockTable) -> None:
    await add_dead_worker(store, "dead-1", 2)
    await store.events.update_one({"_id": "dead-1-0000"}, {"$set": {"attempts": 4}})
    taken = await reclaim(store, max_attempts=5)
    assert [d["_id"] for d in taken] == ["dead-1-0001"]
    doc = await get_event(store, "dead-1-0000")
    assert doc is not None and doc["state"] == DEAD
    assert doc["error"] == "worker dead-1 died while running it"


async def test_a_live_worker_is_not_reclaimed(
    store: LockTable, open_store: Callable[[str], LockTable]
) -> None:
    await store.heartbeat()
    await store.claim(docs_for(3, "worker-a"))
    assert await reclaim(open_store("worker-b")) == []


# -- queries -------------------------------------------------------------------------------


async def test_find_events_and_counts(store: LockTable) -> None:
    docs = [
        event_document(
            f"k{i}", "pbx1", hangup(f"u{i}", f"l{i % 2}", f"17956755{i}0.5"), "worker-a", RECEIVED
        )
        for i in range(6)
    ]
    await store.claim(docs)
    await store.ack("k0")
    operator = EventQuery(store.database)
    newest = await operator.find(EventFilter.of(linkedid="l0"), limit=2)
    assert [d["_id"] for d in newest] == ["k2", "k4"]  # the newest two, oldest first
    assert [d["_id"] for d in await find_events(store, {"linkedid": "l1"})] == ["k1", "k3", "k5"]
    assert await count_by_state(store) == {QUEUED: 0, CLAIMED: 5, DONE: 1, FAILED: 0, DEAD: 0}


def test_store_needs_a_worker_id() -> None:
    with pytest.raises(ValueError, match="worker_id"):
        LockTable(FakeDatabase(RuntimeError()), "events", "")


async def test_from_settings_opens_and_closes_its_client(mongo_uri: str, mongo_driver: str) -> None:
    from amiworker.settings import Settings

    settings = Settings.load(env_file=None, mongo_uri=mongo_uri, driver=mongo_driver, database="fs")
    store = LockTable.from_settings(settings, "worker-z")
    try:
        assert store.events.name == "events" and store.database.name == "fs"
        await store.heartbeat()
        assert [w["_id"] for w in await list_workers(store)] == ["worker-z"]
    finally:
        await store.database.client.drop_database("fs")
        await store.close()
