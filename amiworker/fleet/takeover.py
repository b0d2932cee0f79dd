"""Taking over work that no live worker is doing, into this worker's free backlog room.

After each heartbeat (the fleet's view is fresh) a worker with room takes, in bulk:

1. the ``claimed`` events of dead workers (heartbeat older than ``lease``): a
   crash costs a lease, then a re-run of what the dead worker held, which its
   bounded backlog keeps small;
2. ``queued`` events (won by a worker with no room, or released by one that
   stopped: no lease to wait for) and ``failed`` ones whose retry is due.

Looking for (2) is a query of the events collection, so a worker looks only
when there is reason to: a row of the fleet counts more events queued than
when this worker last looked, a failure recorded here has come due, the last
look filled its batch, or once per lease (for what the counts cannot see: a worker that queued
events and whose row is gone, ``amiworker retry``).

After a store outage every heartbeat in view is old; a worker judges others
dead only once the store has answered it for a whole lease again, by which
time the live ones have beaten.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from amiworker.fleet.documents import message_from_document
from amiworker.fleet.scheduler import HandlerScheduler, Job
from amiworker.mongo import StoreUnavailable
from amiworker.settings import Settings
from amiworker.stats import WorkerStats

if TYPE_CHECKING:
    from amiworker.fleet.health import StoreHealth
    from amiworker.fleet.heartbeat import FleetView, Heartbeat
    from amiworker.fleet.locktable import LockTable
    from amiworker.fleet.outcomes import Outcomes

__all__ = ["Takeover"]

log = logging.getLogger("amiworker.takeover")

# Reserve all the room there is.
_ALL = 1 << 30


class Takeover:
    def __init__(
        self,
        store: LockTable,
        settings: Settings,
        *,
        health: StoreHealth,
        heartbeat: Heartbeat,
        scheduler: HandlerScheduler,
        outcomes: Outcomes,
        stats: WorkerStats,
        reserve: Callable[[int], int],
    ) -> None:
        self._store = store
        self._settings = settings
        self._health = health
        self._heartbeat = heartbeat
        self._scheduler = scheduler
        self._outcomes = outcomes
        self._stats = stats
        self._reserve = reserve
        self._look_again = False
        # Each worker's count of events it stored queued, as of this worker's last look.
        self._queued_seen: dict[str, int] = {}
        self._stopping = False
        # Spread over the second half of the first lease: workers started together
        # do not search together.
        self._next_search = time.monotonic() + random.uniform(0.5, 1.0) * settings.lease

    def stop(self) -> None:
        """Take nothing more: :meth:`run` returns after the round under way, whose
        events reach the scheduler (a round cancelled midway would leave events
        taken in MongoDB and held by no one until the lease)."""
        self._stopping = True
        self._heartbeat.beat.set()

    async def run(self) -> None:
        beat = self._heartbeat.beat
        while not self._stopping:
            await beat.wait()
            beat.clear()
            if self._stopping:
                return
            view = self._heartbeat.view
            if view is None or self._scheduler.room <= 0:
                continue
            try:
                await self.take(view)
            except StoreUnavailable as exc:
                self._health.failed(exc)

    async def take(self, view: FleetView) -> int:
        """One round: take what this worker has room for. Returns how many."""
        settings = self._settings
        taken = 0
        if self._may_judge_others():
            taken += await self._from_dead(view)
        now = time.monotonic()
        retries = now >= self._next_search or self._outcomes.retry_due(now)
        stored_queued = view.queued_counts()
        seen = self._queued_seen
        wanted = (
            retries
            or self._look_again
            or any(count > seen.get(worker, 0) for worker, count in stored_queued.items())
        )
        # No room (claims in flight took it since the round began, or the dead
        # workers' events filled it): no look, so nothing counts as looked for.
        room = self._reserve(_ALL) if wanted else 0
        if room > 0:
            try:
                docs, queued = await self._store.take_runnable(room, retries=retries)
            finally:
                self._scheduler.release(room)  # _submit uses what it takes
            # Seen only once looked: a look the store failed (a timeout under load) must
            # be made again next round, not wait for the once-per-lease search.
            self._queued_seen = stored_queued
            self._look_again = len(docs) >= room  # full: more may wait
            if retries:
                self._outcomes.forget_due_retries(now)
                self._next_search = now + settings.lease
            self._stats.dequeued += queued
            self._stats.reclaimed += len(docs) - queued
            self._submit(docs, "queued or due for a retry")
            taken += len(docs)
        self._health.answered()
        return taken

    def _may_judge_others(self) -> bool:
        return self._health.outages == 0 or self._health.up_for() >= self._settings.lease

    async def _from_dead(self, view: FleetView) -> int:
        lease = self._settings.lease
        me = self._store.worker_id
        expired = [row["_id"] for row in view.expired(lease) if row["_id"] != me]
        if not expired:
            return 0
        room = self._reserve(_ALL)
        try:
            docs = await self._store.take_from_dead(expired, room, self._settings.max_attempts)
        finally:
            self._scheduler.release(room)  # _submit uses what it takes
        self._stats.reclaimed += len(docs)
        self._submit(docs, "from a dead worker")
        if len(docs) < room:
            # They hold nothing more (the bound was not reached): forget their rows.
            cutoff = view.cutoff(lease)
            for worker in expired:
                await self._store.forget_worker(worker, cutoff)
        return len(docs)

    def _submit(self, docs: list[dict[str, Any]], why: str) -> None:
        if not docs:
            return
        log.info("took over %d event(s) to run (%s)", len(docs), why)
        now = time.monotonic()
        for doc in docs:
            job = Job(
                doc["server"], message_from_document(doc), doc["_id"], now, doc.get("attempts", 0)
            )
            self._scheduler.submit(job)
