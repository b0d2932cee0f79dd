"""Recording what became of each handler run: done (acks, batched) or failed.

Acks are the most frequent write after claims, so they are sent as one
``update_many`` per batch instead of one update per event. Failures are rare
and each needs its own attempt count, so they are written one by one.
While MongoDB is unreachable, outcomes wait here and are retried: an event
left ``claimed`` is not lost either way (a live worker reclaims it if this one
dies), but a needless re-run is avoided.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from typing import TYPE_CHECKING

from amiworker.fleet.dispatch import describe_exception
from amiworker.fleet.scheduler import Job
from amiworker.settings import Settings
from amiworker.stats import WorkerStats

if TYPE_CHECKING:
    from amiworker.fleet.locktable import LockTable

__all__ = ["Outcomes"]

log = logging.getLogger("amiworker.fleet.outcomes")

_FLUSH_DELAY = 0.01
_RETRY_DELAY = 0.5


class Outcomes:
    def __init__(self, store: LockTable, settings: Settings, stats: WorkerStats) -> None:
        self._store = store
        self._settings = settings
        self._stats = stats
        self._acks: list[str] = []
        self._failures: list[tuple[str, str]] = []
        # Monotonic times at which failures recorded here come due for a retry,
        # earliest first: the reclaim loop looks for due retries then.
        self._retries_due: list[float] = []
        self._wake = asyncio.Event()
        self._stopping = False

    def record(self, job: Job, error: BaseException | None) -> None:
        """Called by the scheduler when every handler of ``job`` has run."""
        if error is None:
            self._stats.handled += 1
        else:
            self._stats.failed += 1
        if job.key is None:
            return  # a local event: nothing stored to update
        if error is None:
            self._acks.append(job.key)
        else:
            self._failures.append((job.key, describe_exception(error)))
        self._wake.set()

    def retry_due(self, now: float) -> bool:
        """Whether a failure recorded here is due for a retry at monotonic ``now``."""
        return bool(self._retries_due) and self._retries_due[0] <= now

    def forget_due_retries(self, now: float) -> None:
        """Called once a search for due retries ran: those due by ``now`` were seen."""
        due = self._retries_due
        while due and due[0] <= now:
            heapq.heappop(due)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        from amiworker.fleet.locktable import StoreUnavailable

        while True:
            if not self._acks and not self._failures:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await asyncio.sleep(_FLUSH_DELAY)
            try:
                await self._flush()
            except StoreUnavailable as exc:
                if self._stopping:
                    log.error("could not record %d outcome(s): %s", len(self._acks), exc)
                    return
                log.debug("outcomes not recorded yet: %s", exc)
                await asyncio.sleep(_RETRY_DELAY)

    async def _flush(self) -> None:
        acks, self._acks = self._acks, []
        try:
            if acks:
                acked = await self._store.ack_many(acks)
                if acked < len(acks):
                    # Another worker reclaimed them: our heartbeat looked expired to it
                    # (lease too short for this store's latency?). They may run twice.
                    log.warning(
                        "%d event(s) were taken over by another worker while their handlers "
                        "ran here; raise lease if this worker was not really stalled",
                        len(acks) - acked,
                    )
        except BaseException:
            self._acks[:0] = acks
            raise
        while self._failures:
            key, error = self._failures[0]
            settings = self._settings
            failure = await self._store.fail(
                key,
                error,
                settings.max_attempts,
                settings.retry_backoff,
                settings.retry_backoff_max,
            )
            self._failures.pop(0)
            if failure is not None and failure.retry_in is not None:
                heapq.heappush(self._retries_due, time.monotonic() + failure.retry_in)
