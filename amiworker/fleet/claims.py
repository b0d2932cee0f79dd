"""The claim loop: events to race go from the AMI readers to MongoDB in batches.

The reader of an AMI session must never wait (Asterisk drops a manager session
whose reader falls behind, and never replays what it missed), so it only
appends to a bounded buffer here. One task per worker drains the buffer in
unordered ``insert_many`` batches; while MongoDB is unreachable the buffer
holds events, the claim is retried with backoff, and what does not fit is
dropped, counted and logged loudly.

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

    async def claim(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]: ...


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
        self._dedup_window = dedup_window
        self._batch_size = batch_size
        self._batch_delay = batch_delay
        self._buffer_size = buffer_size
        self._buffer: deque[Pending] = deque()
        self._keys: dict[str, DedupKeys] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._in_flight = 0
        self._store_down_since: float | None = None
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

    async def _claim_one_by_one(
        self, batch: list[Pending], docs: list[dict[str, Any]], error: Exception
    ) -> list[dict[str, Any]]:
        log.warning("a claim batch was refused (%s); claiming its events one by one", error)
        won: list[dict[str, Any]] = []
        for item, doc in zip(batch, docs, strict=True):
            attempt = 0
            while True:
                try:
                    won += await self._store.claim([doc])
                    break
                except self._unavailable:
                    # Retried here, one event at a time, rather than the batch again:
                    # what this loop won already must not be claimed twice.
                    self._stats.store_errors += 1
                    attempt += 1
                    await asyncio.sleep(full_jitter(attempt, _RETRY_MIN, _RETRY_MAX))
                except Exception as exc:
                    self._stats.dropped += 1
                    log.error(
                        "%s event %s could not be stored and is dropped: %s: %s",
                        item.message.name,
                        item.key,
                        type(exc).__name__,
                        exc,
                        extra={"server": item.server},
                    )
                    break
        return won

    async def _claim(self, batch: list[Pending]) -> None:
        docs = []
        all_keys = self._keys
        build_document = self._build_document
        for item in batch:
            keys = all_keys.get(item.server)
            if keys is None:
                keys = all_keys[item.server] = DedupKeys(item.server, self._dedup_window)
            item.key = keys.key(item.message.raw, item.received_mono)
            docs.append(build_document(item))
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                won = await self._store.claim(docs)
                break
            except self._unavailable as exc:
                self._stats.store_errors += 1
                attempt += 1
                if self._store_down_since is None:
                    self._store_down_since = started
                    log.error(
                        "%s; holding events in memory (up to %d) and retrying",
                        exc,
                        self._buffer_size,
                    )
                # Full jitter: workers that lost MongoDB together do not return together.
                await asyncio.sleep(full_jitter(attempt, _RETRY_MIN, _RETRY_MAX))
            except Exception as exc:
                # Not the store being away: a document it cannot take (a driver's
                # encoding error, say). One bad event must not stop the claims.
                won = await self._claim_one_by_one(batch, docs, exc)
                break
        if self._store_down_since is not None:
            log.warning(
                "MongoDB is back after %.1f s; %d event(s) buffered",
                time.monotonic() - self._store_down_since,
                len(self._buffer),
            )
            self._store_down_since = None
        self._stats.claim_batches += 1
        if self.on_batch is not None:
            self.on_batch(len(batch), time.monotonic() - started)
        won_ids = {doc["_id"] for doc in won}
        winners = [item for item in batch if item.key in won_ids]
        self._stats.races_won += len(winners)
        self._stats.races_lost += len(batch) - len(winners)
        if winners:
            self._on_won(winners)
