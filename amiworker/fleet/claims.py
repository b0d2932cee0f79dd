"""The claim loop: events to race go from the AMI readers to MongoDB in batches.

The reader of an AMI session must never wait (Asterisk drops a manager session
whose reader falls behind, and never replays what it missed), so it only keys
the event (the key depends on the arrival order) and appends it to the claim
queue (fleet.claimqueue: memory up to ``buffer_size``, then the spill on local
disk). One task per worker drains the queue in unordered ``insert_many``
batches; while MongoDB is unreachable the queue holds events and the claim is
retried with backoff.

Each document goes in with the state its winner can honour: ``done`` when no
handler runs for it, ``claimed`` while the worker's handler backlog has room,
``queued`` beyond that (and once the worker is stopping), for any worker with
room to take. A document the store refuses (a validator, a unique index an
operator added) is logged and counted; the rest of its batch is stored.

One batch is in flight at a time: the winners of a batch are handed on before
the next batch is claimed, so events of one call keep their order. (Two in
flight, handed on in order, was measured: the wait for the previous claim
went, but on a single-threaded store each claim's round trip grew by as much.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from amiworker.backoff import full_jitter
from amiworker.fleet.claimqueue import ClaimQueue
from amiworker.fleet.dedup import DedupKeys
from amiworker.fleet.documents import CLAIMED, DONE, QUEUED
from amiworker.fleet.health import StoreHealth
from amiworker.fleet.locktable import Claimed
from amiworker.fleet.pending import Pending
from amiworker.stats import WorkerStats

__all__ = ["ClaimStore", "Claimer", "Pending"]

log = logging.getLogger("amiworker.fleet.claims")

# Longest a batch waits for backlog room before what does not fit is stored queued,
# and how long it watches handlers free room before judging whether they are fast.
_ROOM_WAIT = 1.0
_ROOM_PROBE = 0.05
# Backoff between claim attempts while MongoDB is unreachable.
_RETRY_MIN = 0.1
_RETRY_MAX = 5.0


class ClaimStore(Protocol):
    """What the claim loop needs of the store."""

    async def claim(self, docs: list[dict[str, Any]]) -> Claimed: ...


class Claimer:
    """Buffers raced events, claims them in batches, hands the winners on."""

    def __init__(
        self,
        store: ClaimStore,
        *,
        build_document: Callable[[Pending], dict[str, Any]],
        on_won: Callable[[list[Pending]], None],
        unavailable: type[BaseException],
        stats: WorkerStats,
        health: StoreHealth,
        needs_run: Callable[[str], bool] = lambda event_name: True,
        reserve: Callable[[int], int] = lambda wanted: wanted,
        release: Callable[[int], None] = lambda count: None,
        room_freed: Callable[[float], Awaitable[None]] | None = None,
        on_settled: Callable[[list[Pending]], None] | None = None,
        dedup_window: float,
        batch_size: int,
        batch_delay: float,
        queue: ClaimQueue,
    ) -> None:
        self._store = store
        self._build_document = build_document
        self._on_won = on_won
        self._unavailable = unavailable
        self._stats = stats
        self._health = health
        self._needs_run = needs_run
        self._reserve = reserve
        self._release = release
        self._room_freed = room_freed
        self._on_settled = on_settled
        self._dedup_window = dedup_window
        self._batch_size = batch_size
        self._batch_delay = batch_delay
        self.queue = queue
        self._keys: dict[str, DedupKeys] = {}
        self._stopping = False
        self._in_flight = 0
        self._claiming: list[Pending] = []
        # Claim latency (seconds) of recent batches, for metrics and benchmarks.
        self.on_batch: Callable[[int, float], None] | None = None

    # -- the reader's side: never waits ----------------------------------------------

    def key(self, item: Pending) -> None:
        """Key the event: in arrival order, as the key depends on it."""
        keys = self._keys.get(item.server)
        if keys is None:
            keys = self._keys[item.server] = DedupKeys(item.server, self._dedup_window)
        item.key = keys.key(item.message.raw, item.received_mono)

    def submit(self, item: Pending) -> None:
        """Queue the event for its claim (keyed here unless it was already)."""
        if not item.key:
            self.key(item)
        self.queue.put(item)

    @property
    def depth(self) -> int:
        """Events waiting (in memory or spilled) or being claimed."""
        return self.queue.depth + self._in_flight

    def describe(self) -> str:
        """What waits, for the store's outage log lines."""
        return self.queue.describe()

    # -- the claim loop ----------------------------------------------------------------

    async def run(self) -> None:
        """Claim until :meth:`stop` is called and memory is empty (the spill stays
        on disk for the next worker of this slot)."""
        queue = self.queue
        while True:
            if queue.in_memory and queue.in_memory < self._batch_size and self._batch_delay:
                # Let a batch fill: one insert_many of many events costs MongoDB far
                # less than many small ones. But no event waits for that longer than
                # batch_delay: what arrived during the last claim has waited enough.
                oldest = queue.oldest_waiting()
                wait = (oldest or 0.0) + self._batch_delay - time.monotonic()
                if wait > 0 and not self._stopping:
                    await asyncio.sleep(wait)
            batch = await queue.take(self._batch_size, stopping=lambda: self._stopping)
            if not batch.items:
                return
            self._in_flight = len(batch.items)
            self._claiming = batch.items
            try:
                await self._claim(batch.items)
                self._claiming = []
                if self._on_settled is not None:
                    self._on_settled(batch.items)
                await queue.settle(batch)
            finally:
                self._in_flight = 0

    def unclaimed(self) -> list[Pending]:
        """After the loop was cancelled: the batch it was claiming, and memory."""
        leftovers, self._claiming = self._claiming, []
        return leftovers + self.queue.drain_memory()

    def stop(self) -> None:
        """Claim what is in memory, then return from :meth:`run`."""
        self._stopping = True
        self.queue.wake()

    async def _claim_one_by_one(self, docs: list[dict[str, Any]], error: Exception) -> Claimed:
        log.warning("a claim batch was refused (%s); claiming its events one by one", error)
        won: list[dict[str, Any]] = []
        rejected: list[tuple[dict[str, Any], str]] = []
        for doc in docs:
            attempt = 0
            while True:
                try:
                    claimed = await self._store.claim([doc])
                    self._health.answered()
                    won += claimed.won
                    rejected += claimed.rejected
                    break
                except self._unavailable as exc:
                    # Retried here, one event at a time, rather than the batch again:
                    # what this loop won already must not be claimed twice. An
                    # outage all the same: logged once each way, never a silent stall.
                    self._stats.store_errors += 1
                    self._health.failed(exc)
                    attempt += 1
                    await asyncio.sleep(full_jitter(attempt, _RETRY_MIN, _RETRY_MAX))
                except Exception as exc:
                    rejected.append((doc, f"{type(exc).__name__}: {exc}"))
                    break
        return Claimed(won, rejected)

    async def _claim(self, batch: list[Pending]) -> None:
        docs = []
        build_document = self._build_document
        needs_run = self._needs_run
        runnable = sum(1 for item in batch if needs_run(item.message.name))
        # Room in the handler backlog, promised to this batch: what is won beyond it
        # is stored for others to run.
        room = granted = await self._room_for(runnable)
        for item in batch:
            doc = build_document(item)
            if not needs_run(item.message.name):
                # Nothing to run: stored as done at once, which saves an ack per event.
                doc["state"] = DONE
                doc["done_at"] = item.received_at
            elif room > 0:
                room -= 1
            else:
                doc["state"] = QUEUED
                doc["claimed_by"] = None
                doc["retry_at"] = item.received_at
            docs.append(doc)
        used = 0
        try:
            used = await self._insert(batch, docs)
        finally:
            self._release(granted - used)

    async def _room_for(self, runnable: int) -> int:
        """Reserve backlog room for ``runnable`` events, waiting a moment for a full
        backlog while handlers free room fast enough to fit the batch: an event
        stored ``queued`` costs a take-over later, and a draining spill would
        otherwise store most of its events so. Slow handlers are not waited for:
        the store must not lag behind them, and what they cannot take is stored
        ``queued`` for any worker with room to run."""
        granted = self._reserve(runnable)
        if granted >= runnable or self._room_freed is None or self._stopping:
            return granted
        started = time.monotonic()
        deadline = started + _ROOM_WAIT
        first = granted
        while granted < runnable and not self._stopping:
            now = time.monotonic()
            if now >= deadline:
                break
            elapsed = now - started
            if elapsed >= _ROOM_PROBE:
                # Room freed so far, at the same pace, until the deadline.
                expected = (granted - first) / elapsed * (deadline - now)
                if granted + expected < runnable:
                    break
            await self._room_freed(min(deadline - now, _ROOM_PROBE))
            granted += self._reserve(runnable - granted)
        return granted

    async def _insert(self, batch: list[Pending], docs: list[dict[str, Any]]) -> int:
        """Claim ``docs``; hand the winners to run on; return how many they were."""
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                claimed = await self._store.claim(docs)
                break
            except self._unavailable as exc:
                self._stats.store_errors += 1
                self._health.failed(exc)
                # Full jitter: workers that lost MongoDB together do not return together.
                await asyncio.sleep(full_jitter(attempt, _RETRY_MIN, _RETRY_MAX))
                attempt += 1
            except Exception as exc:
                # Not the store being away: a document it cannot take (a driver's
                # encoding error, say). One bad event must not stop the claims.
                claimed = await self._claim_one_by_one(docs, exc)
                break
        self._health.answered()
        self._stats.claim_batches += 1
        if self.on_batch is not None:
            self.on_batch(len(batch), time.monotonic() - started)
        for doc, reason in claimed.rejected:
            self._stats.rejected += 1
            log.error(
                "MongoDB refused %s event %s, which is not stored: %s; the other events "
                "go on (check the collection's validators and unique indexes)",
                doc.get("event"),
                doc["_id"],
                reason,
                extra={"server": doc.get("server")},
            )
        won_ids = {doc["_id"] for doc in claimed.won if doc["state"] == CLAIMED}
        queued = sum(1 for doc in claimed.won if doc["state"] == QUEUED)
        self._stats.queued += queued
        winners = [item for item in batch if item.key in won_ids]
        self._stats.races_won += len(claimed.won)
        self._stats.races_lost += len(batch) - len(claimed.won) - len(claimed.rejected)
        if winners:
            self._on_won(winners)
        return len(winners)
