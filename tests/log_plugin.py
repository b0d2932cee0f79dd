"""pytest plugin: an event log filled from the real Asterisk 22 capture of 20 calls.

The events go in the way a worker stores them: each channel event through
``documents.event_document`` with its dedup key, claimed with
``LockTable.claim``, then acknowledged. A few Hangups fail (two dead, one
failed), one event stays claimed, the first call is also stored as a second
PBX's, and the ``workers`` collection holds a live worker and a stale one.

Fixtures:

- ``capture_events``: the capture's events a worker would race, in stream order.
- ``filled_log``: a :class:`FilledLog` in a fresh database (both drivers,
  through the ``database`` fixture of tests/mongo_plugin.py).
- ``filled_log_module``: the same, filled once per test module (``database``
  is None: its client is closed), for tests that only read: do not change it.
- ``shared_log``: ``filled_log_module`` opened with the test's driver.
- ``live_worker``: ``(worker, [pbx1, pbx2])``, a real :class:`Worker` running
  in-process against two :class:`FakePBX` and nx-27017; start calls with
  ``await pbx.start_call()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from amiworker.ami.message import Message
from amiworker.ami.protocol import Parser
from amiworker.devstack.embedded_mongo import EmbeddedMongo
from amiworker.fleet.dedup import DedupKeys, races
from amiworker.fleet.dispatch import load_handlers
from amiworker.fleet.documents import event_document
from amiworker.fleet.locktable import LockTable
from amiworker.fleet.worker import Worker
from amiworker.mongo import close_client, open_client
from amiworker.settings import Settings
from amiworker.sim.pbx import FakePBX

ROOT = Path(__file__).parent.parent
CAPTURE = ROOT / "tests" / "fixtures" / "asterisk22-20-calls.txt"
FILL_WORKER = "fill-worker"
LIVE_WORKER = "host-a-w0-101-abc123"
STALE_WORKER = "host-b-w1-202-def456"
STOPPED_WORKER = "host-c-w0-303-aaa111"
ERROR = "ValueError: no such extension (handlers/billing.py:42)"
# The first call of the capture, stored as pbx1's and pbx2's.
FIRST_CALL = "c20p5038-2-1"


def read_capture() -> list[Message]:
    """The events of the capture a worker would race (channel events, no replies to
    its own actions), in the order Asterisk sent them."""
    return [
        message
        for message in Parser().feed(CAPTURE.read_bytes())
        if message.kind == "event" and message.action_id is None and races(message, "channel")
    ]


def received_at(message: Message, delay_ms: int = 1) -> datetime:
    seconds, _, fraction = message["Timestamp"].partition(".")
    stamp = datetime.fromtimestamp(int(seconds), UTC) + timedelta(microseconds=int(fraction))
    return stamp + timedelta(milliseconds=delay_ms)


def documents(
    messages: list[Message], server: str, worker: str = FILL_WORKER
) -> list[dict[str, Any]]:
    keys = DedupKeys(server, window=60.0)
    docs = []
    for index, message in enumerate(messages):
        key = keys.key(message.raw, float(index))
        docs.append(event_document(key, server, message, worker, received_at(message)))
    return docs


@dataclass
class FilledLog:
    database: Any  # the database object the log was filled through
    name: str
    messages: list[Message]  # pbx1's events, in stream order
    docs: list[dict[str, Any]]  # every stored document, as inserted
    dead: list[str] = field(default_factory=list)  # _ids
    failed: list[str] = field(default_factory=list)
    claimed: list[str] = field(default_factory=list)

    @property
    def pbx1(self) -> list[dict[str, Any]]:
        return [doc for doc in self.docs if doc["server"] == "pbx1"]


async def fill(database: Any) -> FilledLog:
    messages = read_capture()
    pbx1 = documents(messages, "pbx1")
    pbx2 = documents([m for m in messages if m.get("Linkedid") == FIRST_CALL], "pbx2")
    store = LockTable(database, "events", FILL_WORKER)
    await store.ensure_indexes()
    for start in range(0, len(pbx1), 200):
        assert len((await store.claim(pbx1[start : start + 200])).won) == len(
            pbx1[start : start + 200]
        )
    assert len((await store.claim(pbx2)).won) == len(pbx2)
    log = FilledLog(database, database.name, messages, pbx1 + pbx2)
    hangups = [doc["_id"] for doc in pbx1 if doc["event"] == "Hangup"]
    log.dead, log.failed = hangups[:2], hangups[2:3]
    log.claimed = [pbx1[-1]["_id"]]
    for key in log.dead:
        assert await store.fail(key, ERROR, max_attempts=1, retry_backoff=60) == ("dead", None)
    for key in log.failed:
        failure = await store.fail(key, ERROR, max_attempts=5, retry_backoff=3600)
        assert failure is not None and failure.state == "failed"
    settled = {*log.dead, *log.failed, *log.claimed}
    await store.ack_many([doc["_id"] for doc in log.docs if doc["_id"] not in settled])
    await add_workers(database)
    return log


async def add_workers(database: Any) -> None:
    live = LockTable(database, "events", LIVE_WORKER)
    await live.heartbeat(
        {
            "state": "running",
            "started_at": datetime(2026, 11, 26, 6, 0, tzinfo=UTC),
            "servers": {
                "pbx1": {"connected": True, "reconnects": 0},
                "pbx2": {"connected": False, "reconnects": 3},
            },
            "counters": {
                "events_seen": 1234,
                "races_won": 600,
                "races_lost": 610,
                "handled": 590,
                "failed": 3,
                "dropped": 0,
                "rejected": 2,
            },
            "queue_depth": 7,
            "backlog": 5,
        }
    )
    # Inserted rather than upserted: the stale heartbeat must keep its old date.
    await database["workers"].insert_one(
        {
            "_id": STALE_WORKER,
            "host": "host-b",
            "pid": 202,
            "servers": {"pbx1": {"connected": True}},
            "counters": {"events_seen": 5},
            "queue_depth": 0,
            "last_seen": datetime(2026, 1, 1, tzinfo=UTC),
        }
    )
    await database["workers"].insert_one(
        {
            "_id": STOPPED_WORKER,
            "state": "stopped",
            "host": "host-c",
            "pid": 303,
            # Its last row is written just before it logs off: still "connected".
            "servers": {"pbx1": {"connected": True}},
            "counters": {"events_seen": 77},
            "queue_depth": 0,
            "last_seen": datetime(2026, 1, 2, tzinfo=UTC),
        }
    )


@pytest.fixture(scope="session")
def capture_events() -> list[Message]:
    return read_capture()


@pytest.fixture
async def filled_log(database: Any) -> FilledLog:
    return await fill(database)


@pytest.fixture(scope="module")
def filled_log_module(mongo_server: EmbeddedMongo) -> Iterator[FilledLog]:
    name = f"t_{uuid.uuid4().hex[:16]}"

    async def setup() -> FilledLog:
        client = open_client(mongo_server.uri, serverSelectionTimeoutMS=5000)
        try:
            return await fill(client[name])
        finally:
            await close_client(client)

    async def teardown() -> None:
        client = open_client(mongo_server.uri, serverSelectionTimeoutMS=5000)
        try:
            await client.drop_database(name)
        finally:
            await close_client(client)

    log = asyncio.run(setup())
    log.database = None  # its client is closed: reopen by name
    yield log
    asyncio.run(teardown())


@pytest.fixture
def shared_log(filled_log_module: FilledLog, mongo_client: Any) -> FilledLog:
    return replace(filled_log_module, database=mongo_client[filled_log_module.name])


@pytest.fixture
async def live_worker(
    fake_pbx_factory: Callable[..., Awaitable[FakePBX]],
    mongo_uri: str,
    database_name: str,
) -> AsyncIterator[tuple[Worker, list[FakePBX]]]:
    pbxs = [await fake_pbx_factory(name=f"pbx{i}") for i in (1, 2)]
    settings = Settings.load(
        None,
        env_file=None,
        servers=[
            {
                "name": pbx.name,
                "host": pbx.host,
                "port": pbx.port,
                "username": pbx.username,
                "secret": pbx.secret,
            }
            for pbx in pbxs
        ],
        mongo_uri=mongo_uri,
        database=database_name,
        heartbeat_interval=0.1,
        lease=1.0,
        handlers=["handlers.calls"],
        app_dir=ROOT,
    )
    """A real Worker (in-process) holding sessions with two simulated PBXs, handlers
    handlers.calls, on a fresh database; stopped and dropped afterwards."""
    path_before = list(sys.path)
    worker = Worker(settings, load_handlers(settings.handlers, settings.app_dir))
    task = asyncio.create_task(worker.run())
    try:
        await worker.pool.wait_connected(10)
        yield worker, pbxs
    finally:
        worker.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        sys.path[:] = path_before
        client: MongoClient[dict[str, Any]]
        with MongoClient(mongo_uri) as client:
            client.drop_database(database_name)
