"""Recording what became of each handler run: done (acks) or failed.

Acks are the most frequent write after claims, so they go as one
``update_many`` per batch. An event whose handlers finished but whose ack is
not written yet re-runs if the worker is killed, so the window is bounded: an
ack is sent within ``ack_delay`` of its handler finishing. The first ack goes
at once; those that finish while it is in flight join the next batch, which
leaves when the flight lands or when its oldest ack has waited ``ack_delay``,
whichever is first (a few batches may be in flight together behind a slow
store: an ack is idempotent, so order does not matter).

Failures are rare and each needs its own attempt count: written one by one.
While MongoDB is away, outcomes wait here and are retried: an event left
``claimed`` is not lost either way (a live worker takes it over if this one
dies), but a needless re-run is avoided.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Final

from amiworker.backoff import full_jitter
from amiworker.fleet.dispatch import describe_exception
from amiworker.fleet.scheduler import Job
from amiworker.mongo import StoreUnavailable
from amiworker.settings import Settings
from amiworker.stats import WorkerStats

if TYPE_CHECKING:
    from amiworker.fleet.health import StoreHealth
    from amiworker.fleet.locktable import LockTable

__all__ = ["Outcomes"]

log = logging.getLogger("amiworker.outcomes")

# Ack batches in flight at once behind a slow store; more wait (bounded memory
# and load, while a steady trickle is still written within ack_delay).
_MAX_IN_FLIGHT: Final = 4
_RETRY_MIN: Final = 0.1
_RETRY_MAX: Final = 5.0


class Outcomes:
    def __init__(
        self,
        store: LockTable,
        settings: Settings,
        stats: WorkerStats,
        health: StoreHealth,
    ) -> None:
        self._store = store
        self._settings = settings
        self._stats = stats
        self._health = health
        self._acks: list[str] = []
        self._oldest_ack = 0.0  # monotonic time the oldest waiting ack was recorded
        self._in_flight: set[asyncio.Task[None]] = set()
        self._acks_in_flight = 0
        self._failures: deque[tuple[str, str]] = deque()
        # Monotonic times at which failures recorded here come due for a retry,
        # earliest first: the take-over loop looks for due retries then.
        self._retries_due: list[float] = []
        self._acks_waiting = asyncio.Event()
        self._failures_waiting = asyncio.Event()
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
            if not self._acks:
                self._oldest_ack = time.monotonic()
            self._acks.append(job.key)
            self._acks_waiting.set()
        else:
            self._failures.append((job.key, describe_exception(error)))
            self._failures_waiting.set()

    @property
    def pending(self) -> int:
        """Outcomes not yet written (waiting or in flight)."""
        return len(self._acks) + self._acks_in_flight + len(self._failures)

    def retry_due(self, now: float) -> bool:
        """Whether a failure recorded here is due for a retry at monotonic ``now``."""
        return bool(self._retries_due) and self._retries_due[0] <= now

    def forget_due_retries(self, now: float) -> None:
        """Called once a search for due retries ran: those due by ``now`` were seen."""
        due = self._retries_due
        while due and due[0] <= now:
            heapq.heappop(due)

    def stop(self) -> None:
        """Write what is pending, then return from :meth:`run`."""
        self._stopping = True
        self._acks_waiting.set()
        self._failures_waiting.set()

    async def run(self) -> None:
        """Write outcomes until :meth:`stop` and nothing is pending."""
        failures = asyncio.create_task(self._record_failures(), name="failures")
        try:
            await self._send_acks()
            await failures
        finally:
            failures.cancel()
            for task in self._in_flight:
                task.cancel()

    # -- acks ---------------------------------------------------------------------------

    async def _send_acks(self) -> None:
        in_flight = self._in_flight
        while True:
            for task in [t for t in in_flight if t.done()]:
                in_flight.discard(task)
                task.result()  # an unexpected error ends the loop loudly, never silently
            if not self._acks:
                if self._stopping and not in_flight:
                    return
                await self._wait(in_flight, None)
                continue
            now = time.monotonic()
            due = self._oldest_ack + self._settings.ack_delay
            room = len(in_flight) < _MAX_IN_FLIGHT
            if room and (not in_flight or now >= due):
                acks, self._acks = self._acks, []
                self._acks_in_flight += len(acks)
                in_flight.add(asyncio.create_task(self._flush(acks), name="acks"))
                continue
            await self._wait(in_flight, max(0.0, due - now) if room else None)

    async def _wait(self, in_flight: set[asyncio.Task[None]], timeout: float | None) -> None:
        """Until something is recorded, a flight lands, or ``timeout`` passes."""
        self._acks_waiting.clear()
        woken = asyncio.ensure_future(self._acks_waiting.wait())
        try:
            await asyncio.wait({woken, *in_flight}, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            woken.cancel()

    async def _flush(self, acks: list[str]) -> None:
        attempt = 0
        try:
            while True:
                try:
                    acked = await self._store.ack_many(acks)
                    self._health.answered()
                    break
                except StoreUnavailable as exc:
                    self._health.failed(exc)
                    await asyncio.sleep(full_jitter(attempt, _RETRY_MIN, _RETRY_MAX))
                    attempt += 1
        finally:
            self._acks_in_flight -= len(acks)
        if acked < len(acks):
            # Another worker took them over: our heartbeat looked expired to it
            # (lease too short for this store's latency?). They may run twice.
            log.warning(
                "%d event(s) were taken over by another worker while their handlers "
                "ran here; raise lease if this worker was not really stalled",
                len(acks) - acked,
            )

    # -- failures -----------------------------------------------------------------------

    async def _record_failures(self) -> None:
        settings = self._settings
        attempt = 0
        while True:
            if not self._failures:
                if self._stopping:
                    return
                self._failures_waiting.clear()
                await self._failures_waiting.wait()
                continue
            key, error = self._failures[0]
            try:
                failure = await self._store.fail(
                    key,
                    error,
                    settings.max_attempts,
                    settings.retry_backoff,
                    settings.retry_backoff_max,
                )
            except StoreUnavailable as exc:
                self._health.failed(exc)
                await asyncio.sleep(full_jitter(attempt, _RETRY_MIN, _RETRY_MAX))
                attempt += 1
                continue
            self._health.answered()
            attempt = 0
            self._failures.popleft()
            if failure is not None and failure.retry_in is not None:
                heapq.heappush(self._retries_due, time.monotonic() + failure.retry_in)
