"""When a worker searches the events collection for due retries.

Taking over a dead worker's events only reads the small ``workers``
collection, so it runs every heartbeat. Searching for due retries is a query
of the (large) events collection, which a fleet of n workers would otherwise
send n times per heartbeat: a worker searches when a failure it recorded comes
due, and otherwise once per lease (for failures recorded by a worker that has
died since, and events re-queued with ``amiworker retry``).

The store here is a stand-in that records each take-over round (``take_runnable``
with or without retries): what is under test is the worker's schedule, not MongoDB.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from amiworker.ami.message import Message
from amiworker.fleet.dispatch import HandlerRegistry
from amiworker.fleet.documents import FAILED
from amiworker.fleet.locktable import Failure, Runnable
from amiworker.fleet.scheduler import Job
from amiworker.fleet.worker import Worker
from amiworker.mongo import StoreUnavailable
from amiworker.settings import Settings
from tests.waiting import wait_for

HEARTBEAT = 0.05
LEASE = 60.0  # never reached during a test: every search seen is a due one
DUE_IN = 0.3


class RecordingStore:
    database = None
    worker_id = "w"

    def __init__(self) -> None:
        self.rounds = 0  # heartbeats, each followed by a take-over round
        self.reclaims: list[tuple[float, bool]] = []  # (monotonic time, retries searched)
        self.counters: dict[str, dict[str, int]] = {}  # the other rows of workers: counters
        self.failures = 0  # looks the store fails, from now on

    async def heartbeat(self, info: Any = None) -> None:
        return None

    async def fleet(self) -> tuple[datetime, list[Any]]:
        self.rounds += 1
        now = datetime.now(UTC)
        rows = [
            {"_id": worker, "last_seen": now, "state": "stopped", "counters": dict(counters)}
            for worker, counters in self.counters.items()
        ]
        return now, rows

    async def take_runnable(self, limit: int, *, retries: bool = True) -> Runnable:
        if limit <= 0:  # as LockTable's: no query
            return Runnable([], 0)
        self.reclaims.append((time.monotonic(), retries))
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("take queued or due events: timed out (stand-in)")
        return Runnable([], 0)

    async def fail(self, key: str, error: str, *limits: float) -> Failure:
        return Failure(FAILED, DUE_IN)

    def searches(self) -> list[float]:
        return [at for at, retries in self.reclaims if retries]

    def looks(self) -> list[float]:
        """Looks for queued events only (no due retry)."""
        return [at for at, retries in self.reclaims if not retries]


def worker_on(store: RecordingStore) -> Worker:
    pbx = {"name": "pbx1", "host": "127.0.0.1", "username": "u", "secret": "s"}
    settings = Settings.load(
        None, env_file=None, servers=[pbx], heartbeat_interval=HEARTBEAT, lease=LEASE
    )
    return Worker(settings, HandlerRegistry(), worker_id="w", store=store)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def rounds_of(worker: Worker) -> AsyncIterator[None]:
    """The worker's heartbeat and take-over loops, running."""
    tasks = [
        asyncio.create_task(worker.heartbeat.run()),
        asyncio.create_task(worker.takeover.run()),
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_worker_searches_for_retries_when_its_failure_comes_due() -> None:
    store = RecordingStore()
    worker = worker_on(store)
    tasks = [
        asyncio.create_task(worker.heartbeat.run()),
        asyncio.create_task(worker.takeover.run()),
        asyncio.create_task(worker.outcomes.run()),
    ]
    try:
        # Heartbeats go by: the dead-worker check runs each time, no search of the
        # events (the first periodic one comes in the second half of the first lease).
        await wait_for(lambda: store.rounds >= 5, timeout=5, what="5 take-over rounds")
        assert store.searches() == [] and store.reclaims == []

        event = Message(b"Event: Hangup\r\nUniqueid: 1\r\n\r\n")
        failed_at = time.monotonic()
        worker.outcomes.record(Job("pbx1", event, "k1", failed_at), ValueError("boom"))
        await wait_for(
            lambda: bool(store.searches()),
            timeout=5,
            what="a search for the due retry",
        )
        found_at = store.searches()[-1]
        assert failed_at + DUE_IN <= found_at <= failed_at + DUE_IN + 1.0

        # Once searched, it is forgotten: the next rounds search no more.
        rounds = store.rounds
        await wait_for(lambda: store.rounds >= rounds + 5, timeout=5, what="5 more")
        assert len(store.searches()) == 1
    finally:
        worker.outcomes.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_worker_looks_for_queued_events_when_a_rows_count_grows() -> None:
    """A rolling deploy: the second host's stopped workers released 38 unstarted
    events, but had taken 40 that the first host released, whose rows are gone. A
    sum of queued less taken says nothing waits (-2); the released events must not
    wait a lease for a look."""
    store = RecordingStore()
    async with rounds_of(worker_on(store)):
        await wait_for(lambda: store.rounds >= 3, timeout=5, what="3 take-over rounds")
        assert store.looks() == []
        store.counters["host2-w0"] = {"queued": 0, "released": 38, "dequeued": 40}
        await wait_for(lambda: bool(store.looks()), timeout=5, what="a look for them")

        # Looked once: the next rounds do not look again until a count grows.
        rounds = store.rounds
        await wait_for(lambda: store.rounds >= rounds + 5, timeout=5, what="5 more rounds")
        assert len(store.looks()) == 1
        store.counters["host2-w1"] = {"queued": 3}
        await wait_for(lambda: len(store.looks()) == 2, timeout=5, what="a second look")


async def test_a_look_the_store_failed_is_made_again_at_the_next_round() -> None:
    """The look for released events timed out (the store under load): the growth it
    was looking for must not count as seen, or the events wait for a lease."""
    store = RecordingStore()
    async with rounds_of(worker_on(store)):
        await wait_for(lambda: store.rounds >= 3, timeout=5, what="3 take-over rounds")
        store.failures = 1
        store.counters["host2-w0"] = {"released": 32}
        await wait_for(lambda: len(store.looks()) == 2, timeout=5, what="a second look")
        rounds = store.rounds
        await wait_for(lambda: store.rounds >= rounds + 5, timeout=5, what="5 more rounds")
        assert len(store.looks()) == 2  # the one that answered counts as seen


async def test_a_look_left_no_room_is_made_at_the_next_round_with_room() -> None:
    """Claims in flight took the backlog's room between the round's start and its
    look (or the dead workers' events filled it): nothing was looked for, so the
    growth must not count as seen, or the released events wait for a lease."""
    store = RecordingStore()
    worker = worker_on(store)
    reserve = worker.reserve
    rooms: list[int] = []

    def claims_took_the_first(wanted: int) -> int:
        rooms.append(0 if not rooms else reserve(wanted))
        return rooms[-1]

    worker.takeover._reserve = claims_took_the_first  # what the claim loop did meanwhile
    async with rounds_of(worker):
        await wait_for(lambda: store.rounds >= 3, timeout=5, what="3 take-over rounds")
        store.counters["host2-w0"] = {"released": 32}
        await wait_for(lambda: bool(store.looks()), timeout=5, what="a look once room is back")
        assert rooms[0] == 0 and rooms[1] > 0
