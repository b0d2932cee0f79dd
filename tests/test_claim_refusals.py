"""The claim loop with documents the store refuses, on a real store.

A :class:`Claimer` with a real :class:`LockTable`, its client going through
tests/mongo_proxy.py in front of nx-27017 (a collection validator that refuses
Hangup events): the refused event is logged at ERROR with its key and reason
and counted, the rest of its batch is claimed, and the one-by-one fallback (a
batch the driver cannot even send) comes to the same, and reports a store that
stops answering meanwhile as an outage, like every other store call.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from pymongo import MongoClient

from amiworker.devstack.embedded_mongo import EmbeddedMongo
from amiworker.fleet.claimqueue import ClaimQueue
from amiworker.fleet.claims import Claimer, Pending
from amiworker.fleet.dedup import DedupKeys
from amiworker.fleet.documents import event_document
from amiworker.fleet.health import StoreHealth
from amiworker.fleet.locktable import LockTable, StoreUnavailable
from amiworker.mongo import close_client, open_client
from amiworker.stats import WorkerStats
from amiworker.testing.events import make_event
from tests.mongo_proxy import MongoProxy, running_in_thread
from tests.waiting import wait_for

WORKER = "worker-a"
REASON = "write error 121: Document failed validation"
EVENTS = ("Newchannel", "Newstate", "Hangup", "VarSet", "DialBegin", "DialEnd")


def refuse_hangups(doc: Any) -> bool:
    return bool(doc.get("event") == "Hangup")


@pytest.fixture
def database_name() -> str:
    return f"r_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def proxy(mongo_server: EmbeddedMongo, database_name: str) -> Iterator[MongoProxy]:
    assert mongo_server.port is not None
    proxied = MongoProxy(mongo_server.port, database=database_name, refuse=refuse_hangups)
    with running_in_thread(proxied) as running:
        yield running


@pytest.fixture
def direct(mongo_server: EmbeddedMongo, database_name: str) -> Iterator[Any]:
    """The events collection on nx-27017 itself, not through the proxy."""
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_server.uri)
    try:
        yield client[database_name]["events"]
    finally:
        client.drop_database(database_name)
        client.close()


@pytest.fixture
async def store(proxy: MongoProxy, mongo_driver: str, database_name: str) -> AsyncIterator[Any]:
    # timeoutMS as a worker's (store_timeout), short: a frozen proxy times claims out.
    client = open_client(proxy.uri, mongo_driver, serverSelectionTimeoutMS=5000, timeoutMS=1000)  # type: ignore[arg-type]
    try:
        await client.admin.command("ping")  # a pooled connection, before any freeze
        yield LockTable(client[database_name], "events", WORKER, uri=proxy.uri)
    finally:
        await close_client(client)


def pendings() -> list[Pending]:
    now = datetime.now(UTC)
    return [
        Pending(
            "pbx1",
            make_event(name, Uniqueid=f"1700000000.{i}", Linkedid="1700000000.0"),
            now,
            time.monotonic(),
        )
        for i, name in enumerate(EVENTS)
    ]


def keys_of(items: list[Pending]) -> list[str]:
    dedup = DedupKeys("pbx1", 60.0)
    return [dedup.key(item.message.raw, item.received_mono) for item in items]


async def claim_all(
    store: LockTable,
    items: list[Pending],
    build: Callable[[Pending], dict[str, Any]] | None = None,
    health: StoreHealth | None = None,
) -> tuple[list[str], WorkerStats]:
    """Run a claim loop over ``items``; the keys it won, in order, and its counters."""
    stats, won = WorkerStats(), list[str]()

    def document(item: Pending) -> dict[str, Any]:
        return event_document(item.key, item.server, item.message, WORKER, item.received_at)

    claimer = Claimer(
        store,
        build_document=build or document,
        on_won=lambda winners: won.extend(item.key for item in winners),
        unavailable=StoreUnavailable,
        stats=stats,
        health=health or StoreHealth(),
        dedup_window=60.0,
        batch_size=100,
        batch_delay=0.0,
        queue=ClaimQueue(high_water=100, stats=stats),
    )
    for item in items:
        claimer.submit(item)
    claimer.stop()
    await asyncio.wait_for(claimer.run(), 30)
    return won, stats


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "amiworker.fleet.claims" and record.levelno == logging.ERROR
    ]


async def test_a_refused_event_is_logged_and_counted_and_the_rest_claimed(
    store: LockTable, proxy: MongoProxy, direct: Any, caplog: pytest.LogCaptureFixture
) -> None:
    items = pendings()
    keys = keys_of(items)
    direct.insert_one({"_id": keys[4], "claimed_by": "worker-b"})  # worker-b won DialBegin
    won, stats = await claim_all(store, items)
    assert won == [keys[0], keys[1], keys[3], keys[5]]
    assert (stats.races_won, stats.races_lost, stats.rejected) == (4, 1, 1)
    assert refusal_lines(caplog) == [
        f"MongoDB refused Hangup event {keys[2]}, which is not stored: {REASON}; the other "
        "events go on (check the collection's validators and unique indexes)"
    ]
    assert sorted(d["_id"] for d in direct.find()) == sorted(keys[:2] + keys[3:])
    assert [r.document["_id"] for r in proxy.refusals] == [keys[2]]


def with_unencodable_varset(item: Pending) -> dict[str, Any]:
    """A document the driver cannot encode (BSON has no such type), for the VarSet."""
    doc = event_document(item.key, item.server, item.message, WORKER, item.received_at)
    if doc["event"] == "VarSet":
        doc["headers"]["value"] = object()
    return doc


async def test_a_batch_the_driver_cannot_send_is_claimed_one_by_one(
    store: LockTable, proxy: MongoProxy, direct: Any, caplog: pytest.LogCaptureFixture
) -> None:
    items = pendings()
    keys = keys_of(items)
    direct.insert_one({"_id": keys[4], "claimed_by": "worker-b"})
    won, stats = await claim_all(store, items, with_unencodable_varset)
    assert won == [keys[0], keys[1], keys[5]]
    assert (stats.races_won, stats.races_lost, stats.rejected) == (3, 1, 2)
    lines = refusal_lines(caplog)
    assert lines[0].startswith(f"MongoDB refused Hangup event {keys[2]}, which is not stored: ")
    assert REASON in lines[0]
    assert lines[1].startswith(f"MongoDB refused VarSet event {keys[3]}, which is not stored: ")
    assert "InvalidDocument" in lines[1]
    assert "claiming its events one by one" in caplog.text
    assert sorted(d["_id"] for d in direct.find()) == sorted([*keys[:2], *keys[4:]])


async def test_a_store_that_stops_answering_during_the_one_by_one_claims_is_an_outage(
    store: LockTable, proxy: MongoProxy, direct: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """One line when it stops answering, one when it is back: not a silent stall.
    (The fallback used to retry without telling the store's health: no line at all.)"""
    items = pendings()
    keys = keys_of(items)
    health = StoreHealth()
    proxy.freeze()  # the batch fails before any I/O; the first single claim times out
    try:
        build = with_unencodable_varset
        task = asyncio.create_task(claim_all(store, items, build, health))

        def timed_out() -> bool:
            return health.down or task.done()

        await wait_for(timed_out, 20, "a single claim timed out")
        assert not task.done() and health.down
    finally:
        proxy.thaw()
    won, stats = await asyncio.wait_for(task, 30)
    assert won == [keys[0], keys[1], keys[4], keys[5]]
    assert stats.store_errors >= 1 and stats.rejected == 2
    store_lines = [r for r in caplog.records if r.name == "amiworker.store"]
    assert [r.levelno for r in store_lines if r.levelno >= logging.WARNING] == [
        logging.ERROR,
        logging.WARNING,
    ], caplog.text
    assert "holding events meanwhile" in store_lines[0].getMessage()
    assert "MongoDB is back after" in store_lines[-1].getMessage()
    assert sorted(d["_id"] for d in direct.find()) == sorted([*keys[:2], *keys[4:]])
