"""A worker's stop always ends.

On Python 3.11 ``asyncio.wait_for``, which the MongoDB driver waits with,
drops a cancellation that arrives as the awaited call finishes; a loop
(then the reclaim loop, here the heartbeat's read of the fleet) that had lost
it ran on and the stop never returned. The stores here
are stand-ins that drop the first cancellation they receive, as the driver
can; the PBX is a port nobody listens on. And with MongoDB away for good, the
stop gives up on the buffered events after ``shutdown_timeout``, counted and
logged.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from amiworker.ami.message import Message
from amiworker.devstack.embedded_mongo import free_port
from amiworker.fleet.dispatch import HandlerRegistry
from amiworker.fleet.locktable import Claimed, StoreUnavailable
from amiworker.fleet.worker import Worker
from amiworker.settings import Settings
from tests.waiting import wait_for


def worker_settings(**overrides: Any) -> Settings:
    """One PBX, on a port nobody listens on: these workers never get an event from it."""
    pbx = {"name": "p", "host": "127.0.0.1", "port": free_port(), "username": "u", "secret": "s"}
    return Settings.load(None, env_file=None, servers=[pbx], **overrides)


class CancelDroppingStore:
    database = None
    worker_id = "w"

    def __init__(self) -> None:
        self.reclaims = 0
        self.dropped_a_cancel = False
        self.stop_recorded = False
        self.stopping = False

    async def ensure_indexes(self, ttl_days: float | None = None) -> None:
        return None

    async def heartbeat(self, info: dict[str, Any] | None = None) -> None:
        if info and info.get("state") == "stopped":
            self.stop_recorded = True
            self.stopping = True

    async def fleet(self) -> tuple[datetime, list[Any]]:
        if self.stopping:
            return datetime.now(UTC), []
        self.reclaims += 1
        try:
            await asyncio.sleep(30)  # a query in flight, as long as it takes
        except asyncio.CancelledError:
            if self.dropped_a_cancel:
                raise
            self.dropped_a_cancel = True  # lost, as in asyncio.wait_for on 3.11
        return datetime.now(UTC), []

    async def close(self) -> None:
        return None


async def test_stop_ends_though_a_loop_lost_its_cancellation() -> None:
    settings = worker_settings(
        heartbeat_interval=0.01,
        lease=1.0,
        shutdown_timeout=1.0,
    )
    store = CancelDroppingStore()
    worker = Worker(settings, HandlerRegistry(), worker_id="w", store=store)  # type: ignore[arg-type]
    task = asyncio.create_task(worker.run())
    await wait_for(lambda: store.reclaims >= 1, timeout=5, what="a reclaim query in flight")
    worker.stop()
    async with asyncio.timeout(10):
        await task
    assert store.dropped_a_cancel
    assert store.stop_recorded


class UnreachableStore(CancelDroppingStore):
    """MongoDB away for good: every claim fails after a while, as server selection does."""

    async def claim(self, docs: list[dict[str, Any]]) -> Claimed:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            if self.dropped_a_cancel:
                raise
            self.dropped_a_cancel = True
        raise StoreUnavailable("MongoDB at test is unreachable")


@pytest.mark.parametrize("spill", [False, True])
async def test_stop_gives_up_on_unstorable_events_after_shutdown_timeout(
    spill: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a spill they are lost, counted and logged; with one they go to the spill,
    and the next worker of the slot finds them there."""
    settings = worker_settings(
        heartbeat_interval=0.5,
        shutdown_timeout=0.5,
        spill_dir=tmp_path / "spill",
        spill_max_bytes=(1 << 20) if spill else 0,
    )
    store = UnreachableStore()
    worker = Worker(settings, HandlerRegistry(), worker_id="w", store=store)  # type: ignore[arg-type]
    task = asyncio.create_task(worker.run())
    for n in range(3):
        worker._on_event("p", Message(f"Event: Hangup\r\nUniqueid: {n}\r\n\r\n".encode()), False)
    await wait_for(lambda: worker.stats.store_errors >= 2, timeout=5, what="claims failing")
    worker.stop()
    async with asyncio.timeout(10):
        await task
    assert any("3 event(s) not stored" in r.getMessage() for r in caplog.records)
    if not spill:
        assert worker.stats.dropped == 3
        return
    assert worker.stats.dropped == 0
    successor = Worker(settings, HandlerRegistry(), worker_id="w2", store=UnreachableStore())  # type: ignore[arg-type]
    await successor.claimer.queue.open()
    try:
        assert successor.claimer.queue.spill_events == 3
        batch = await successor.claimer.queue.take(10, stopping=lambda: False)
        assert [item.message["Uniqueid"] for item in batch.items] == ["0", "1", "2"]
    finally:
        await successor.claimer.queue.close()


class UnreachableToTheEnd(UnreachableStore):
    """As unreachable for the stop's record as for the claims: that call would wait
    the whole store_timeout (the driver's timeoutMS) before failing."""

    async def heartbeat(self, info: dict[str, Any] | None = None) -> None:
        if info and info.get("state") == "stopped":
            self.stop_recorded = True  # asked: with MongoDB down, it should not be
            await asyncio.sleep(30)
        await asyncio.sleep(0.05)
        raise StoreUnavailable("MongoDB at test is unreachable")

    async def fleet(self) -> tuple[datetime, list[Any]]:
        raise StoreUnavailable("MongoDB at test is unreachable")


async def test_a_stop_with_mongodb_away_does_not_wait_on_it_for_what_cannot_be_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The supervisor kills a worker not gone within shutdown_timeout + 10 s; with the
    store down, the final record (each call waiting store_timeout) would outlast that."""
    settings = worker_settings(
        heartbeat_interval=0.5,
        shutdown_timeout=0.5,
        store_timeout=30,
        spill_dir=tmp_path / "spill",
    )
    store = UnreachableToTheEnd()
    worker = Worker(settings, HandlerRegistry(), worker_id="w", store=store)  # type: ignore[arg-type]
    task = asyncio.create_task(worker.run())
    worker._on_event("p", Message(b"Event: Hangup\r\nUniqueid: 1\r\n\r\n"), False)
    await wait_for(lambda: worker.health.down, timeout=5, what="MongoDB seen down")
    worker.stop()
    async with asyncio.timeout(10):
        await task
    assert not store.stop_recorded
    assert any("the stop is not recorded there" in r.getMessage() for r in caplog.records)


class AwayAfterTheFirstClaim(UnreachableToTheEnd):
    """Takes one claim, then goes away for good (a release too would wait the whole
    store_timeout before failing)."""

    def __init__(self) -> None:
        super().__init__()
        self.claims = 0
        self.releases = 0

    async def claim(self, docs: list[dict[str, Any]]) -> Claimed:
        self.claims += 1
        if self.claims == 1:
            return Claimed(docs, [])
        return await super().claim(docs)

    async def release(self, keys: list[Any]) -> int:
        self.releases += 1
        await asyncio.sleep(30)
        raise StoreUnavailable("MongoDB at test is unreachable")


async def test_a_stop_with_mongodb_away_leaves_held_events_to_the_lease_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Events claimed before MongoDB went away, running or not started: giving them
    back cannot work, and each try would wait store_timeout; they are said, and left
    for a live worker to take over after the lease."""
    settings = worker_settings(
        heartbeat_interval=0.5,
        shutdown_timeout=0.5,
        store_timeout=30,
        handler_concurrency=1,
        spill_dir=tmp_path / "spill",
    )
    started = asyncio.Event()

    async def HangupHandler(ctx: Any, event: Message) -> None:
        started.set()
        await asyncio.sleep(60)  # still running at the stop

    store = AwayAfterTheFirstClaim()
    registry = HandlerRegistry(["t"], [("HangupHandler", HangupHandler)])
    worker = Worker(settings, registry, worker_id="w", store=store)  # type: ignore[arg-type]
    task = asyncio.create_task(worker.run())
    for n in range(2):  # one batch: the first runs, the second waits for the runner
        worker._on_event("p", Message(f"Event: Hangup\r\nUniqueid: {n}\r\n\r\n".encode()), False)
    await wait_for(started.is_set, timeout=5, what="the first event's handler running")
    worker._on_event("p", Message(b"Event: Hangup\r\nUniqueid: 2\r\n\r\n"), False)
    await wait_for(lambda: worker.health.down, timeout=5, what="MongoDB seen down")
    worker.stop()
    async with asyncio.timeout(10):
        await task
    assert store.releases == 0
    said = [r.getMessage() for r in caplog.records if "could not release" in r.getMessage()]
    assert said == [
        "could not release 1 unstarted event(s): MongoDB is unreachable; they run again "
        "elsewhere after the lease",
        "could not release 1 abandoned event(s): MongoDB is unreachable; they run again "
        "elsewhere after the lease",
    ]
