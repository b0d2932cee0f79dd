"""The claim loop: events to race go from the AMI readers to MongoDB in batches.

The reader of an AMI session must never wait (Asterisk drops a manager session
whose reader falls behind, and never replays what it missed), so it only
appends to a bounded buffer here. One task per worker drains the buffer in
unordered ``insert_many`` batches; while MongoDB is unreachable the buffer
holds events, the claim is retried with backoff, and what does not fit is
dropped, counted and logged loudly.

Each document goes in with the state its winner can honour: ``done`` when no
handler runs for it, ``claimed`` while the worker's handler backlog has room,
``queued`` beyond that (and once the worker is stopping), for any worker with
room to take. A document the store refuses (a validator, a unique index an
operator added) is logged and counted; the rest of its batch is stored.

One batch is in flight at a time: the winners of a batch are handed on before
the next batch is claimed, so events of one call keep their order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from amiworker.ami.message import Message
from amiworker.backoff import full_jitter
from amiworker.fleet.dedup import DedupKeys
from amiworker.fleet.documents import CLAIMED, DONE, QUEUED
from amiworker.fleet.health import StoreHealth
from amiworker.fleet.locktable import Claimed
from amiworker.stats import WorkerStats

__all__ = ["ClaimStore", "Claimer", "Pending"]

log = logging.getLogger("amiworker.fleet.claims")

# Backoff between claim attempts while MongoDB is unreachable.
_RETRY_MIN = 0.1
_RETRY_MAX = 5.0
# At most one "dropping events" line per this many seconds (plus a count).
_DROP_LOG_INTERVAL = 10.0


@dataclass(slots=True)
class Pending:
    """An event waiting for its claim."""

    server: str
    message: Message
    received_at: datetime  # wall clock, stored in the document
    received_mono: float  # monotonic, for the dedup window and latency
    key: str = ""


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
        room: Callable[[], int] = lambda: 1 << 30,
        dedup_window: float,
        batch_size: int,
        batch_delay: float,
        buffer_size: int,
    ) -> None:
        self._store = store
        self._build_document = build_document
        self._on_won = on_won
        self._unavailable = unavailable
        self._stats = stats
        self._health = health
        self._needs_run = needs_run
        self._room = room
        self._dedup_window = dedup_window
        self._batch_size = batch_size
        self._batch_delay = batch_delay
        self._buffer_size = buffer_size
        self._buffer: deque[Pending] = deque()
        self._keys: dict[str, DedupKeys] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._in_flight = 0
        self._last_drop_log = 0.0
        self._drops_since_log = 0
        # Claim latency (seconds) of recent batches, for metrics and benchmarks.
        self.on_batch: Callable[[int, float], None] | None = None

    # -- the reader's side: never waits ----------------------------------------------

    def submit(self, item: Pending) -> None:
        if len(self._buffer) >= self._buffer_size:
            self._drop(item)
            return
        self._buffer.append(item)
        if not self._wake.is_set():
            self._wake.set()

    def _drop(self, item: Pending) -> None:
        self._stats.dropped += 1
        self._drops_since_log += 1
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_INTERVAL:
            log.error(
                "event buffer full (%d events, MongoDB unreachable or too slow): dropped %d "
                "event(s), %d in all; raise buffer_size or fix MongoDB",
                self._buffer_size,
                self._drops_since_log,
                self._stats.dropped,
            )
            self._last_drop_log = now
            self._drops_since_log = 0

    @property
    def depth(self) -> int:
        """Events buffered or being claimed."""
        return len(self._buffer) + self._in_flight

    def describe(self) -> str:
        """What the buffer holds, for the store's outage log lines."""
        return f"{self.depth} event(s) buffered, up to {self._buffer_size}"

    # -- the claim loop ----------------------------------------------------------------

    async def run(self) -> None:
        """Claim until :meth:`stop` is called and the buffer is empty."""
        while True:
            if not self._buffer:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._buffer) < self._batch_size and self._batch_delay and not self._stopping:
                # Let a batch fill: one insert_many of many events costs MongoDB far
                # less than many small ones. But no event waits for that longer than
                # batch_delay: what arrived during the last claim has waited enough.
                wait = self._buffer[0].received_mono + self._batch_delay - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            batch = self._take_batch()
            self._in_flight = len(batch)
            try:
                await self._claim(batch)
            finally:
                self._in_flight = 0

    def _take_batch(self) -> list[Pending]:
        buffer = self._buffer
        if len(buffer) <= self._batch_size:
            batch = list(buffer)  # the usual case: all of it, in one C call
            buffer.clear()
            return batch
        popleft = buffer.popleft
        return [popleft() for _ in range(self._batch_size)]

    def stop(self) -> None:
        """Finish what is buffered, then return from :meth:`run`."""
        self._stopping = True
        self._wake.set()

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
        all_keys = self._keys
        build_document = self._build_document
        needs_run = self._needs_run
        # Room in the handler backlog: what is won beyond it is stored for others.
        room = self._room()
        for item in batch:
            keys = all_keys.get(item.server)
            if keys is None:
                keys = all_keys[item.server] = DedupKeys(item.server, self._dedup_window)
            item.key = keys.key(item.message.raw, item.received_mono)
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
