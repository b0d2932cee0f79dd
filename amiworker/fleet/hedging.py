"""Hedged claims: one insert per event, with every worker still a standby for every event.

``claim_mode = "hedged"``. Every worker still holds a session to every PBX and
sees every event; for each raced event:

* its **owner** (fleet.ownership: rendezvous hashing of the event's call over
  the workers that are live and connected to that PBX) claims it at once,
  exactly as in race mode;
* every other worker keeps it as a **standby** (fleet.standby), and forgets it
  once the owner's **coverage** (fleet.coverage: a watermark per PBX session)
  has passed it; what is still uncovered after ``hedge_delay`` (times the
  standby's rank) is claimed by the standby: a missing owner costs one extra
  insert, not N-1.

The unique ``_id`` still decides every race, so a wrong guess anywhere costs an
extra insert, never a second run: what can be lost is only what no worker
received, as in race mode.

This module ties them to the worker: the reader's per-event decision (never
waits), and the exchange loop. Every ``hedge_delay / 4`` each worker writes
one small document in the ``coverage`` collection (a beat counter, running or
leaving, its sessions per PBX and their coverage) and reads everyone's: the
views come from those documents (a worker whose beat has not moved for a few
exchanges is gone; one leaving or whose session is down owns nothing; a worker
that has just started judges the others it has never heard by the age of their
document on the store's clock), so a change
reaches every worker within an exchange or two, and the ``transition`` during
which a worker owns under both views stays short.

The same document lists the events this worker hedged and has claimed (in the
store, won or lost) within the last few exchanges: the other standbys forget them
instead of each hedging them in turn (an owner's death would otherwise cost an
insert per standby). Only claimed ones: a standby that forgot an event this
worker had merely decided to hedge would lose it if this worker died before the
insert.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from amiworker.fleet.coverage import Coverage
from amiworker.fleet.ownership import Ownership, owner_hash
from amiworker.fleet.pending import Pending
from amiworker.fleet.standby import Standby
from amiworker.mongo import StoreUnavailable
from amiworker.stats import WorkerStats

if TYPE_CHECKING:
    from amiworker.fleet.health import StoreHealth
    from amiworker.fleet.locktable import LockTable

__all__ = ["Hedging"]

log = logging.getLogger("amiworker.fleet.hedging")

# Coverage is exchanged this many times per hedge_delay: often enough that a
# standby rarely waits, and a handful of small writes a second per worker.
_EXCHANGES_PER_DELAY: Final = 4
_MIN_INTERVAL: Final = 0.05
# A worker is in the views while its beat has moved within this many of our own
# exchanges (2 s at their pace; counted in exchanges, so a slow store slows both
# sides alike). Far shorter than the lease, on purpose: the lease decides that a
# worker's claimed events may run again elsewhere, and must not be wrong; a view
# only says who claims first, and a wrong one costs an extra insert. A killed
# worker's calls get live owners within that, instead of being hedged until
# its lease runs out.
_VIEW_EXCHANGES: Final = 2 * _EXCHANGES_PER_DELAY
# Hedges are published for this many exchanges (a reader that misses them hedges
# the same events again: an extra insert each), and at most this many at a time
# (a small document in the common case; a flood of hedges, e.g. a full window,
# is cut short rather than making every exchange heavy).
_HEDGES_PUBLISHED_FOR: Final = 2 * _EXCHANGES_PER_DELAY
_HEDGES_PUBLISHED_MAX: Final = 2_000


class Hedging:
    def __init__(
        self,
        store: LockTable,
        *,
        worker_id: str,
        servers: list[str],
        hedge_delay: float,
        window: int,
        transition: float,
        stats: WorkerStats,
        health: StoreHealth,
        claim: Callable[[list[Pending]], None],
        connected: Callable[[], dict[str, bool]],
    ) -> None:
        self._store = store
        self._me = worker_id
        self._connected = connected
        self._servers = servers
        self._stats = stats
        self._health = health
        self._claim = claim
        self._interval = max(_MIN_INTERVAL, hedge_delay / _EXCHANGES_PER_DELAY)
        self.ownership = Ownership(worker_id, transition)
        self.coverage = Coverage(self.ownership)
        self.standby = Standby(
            me=worker_id,
            hedge_delay=hedge_delay,
            window=window,
            hedge=self._hedge,
            on_covered=self._covered,
        )
        self._beat = 0
        self._live: set[str] = set()  # the workers in the views
        # Hedged, not claimed yet (keys); claimed, as (beat, key), for the others.
        self._hedging: set[str] = set()
        self._hedged: deque[tuple[int, str]] = deque()
        # Seconds from receipt to a hedge that stored its event, of the latest ones.
        self._lateness: deque[float] = deque(maxlen=1000)
        #: Called with the seconds from receipt of each event a hedge stored (fleet.metrics).
        self.on_hedged: Callable[[float], None] | None = None

    # -- the reader's side: never waits ----------------------------------------------------

    def route(self, item: Pending) -> bool:
        """Decide for one keyed, raced event: True to claim it now (this worker owns
        it), False when it is kept as a standby."""
        pbx, key = item.server, item.key
        item.owner = owner_hash(item.message.raw, key)
        owned, assignments, rank, ahead = self.ownership.decide(pbx, item.owner)
        self.standby.seen(pbx, key)
        self.coverage.note(pbx, key, owned)
        if owned:
            self._stats.owned += 1
            return True
        self.standby.keep(pbx, item, assignments, rank, ahead)
        return False

    def session(self, pbx: str) -> None:
        """This worker's session with ``pbx`` is opening."""
        self.coverage.begin(pbx)
        self.standby.session(pbx)

    def settled(self, items: list[Pending]) -> None:
        """Claimed (won, lost or refused), in arrival order."""
        settled = self.coverage.settled
        hedging = self._hedging
        for item in items:
            settled(item.server, item.key)
            if hedging and item.key in hedging:
                hedging.discard(item.key)
                self._hedged.append((self._beat, item.key))

    def lost(self, server: str, key: str) -> None:
        """The event will never be claimed here (dropped)."""
        self.coverage.lost(server, key)
        self._hedging.discard(key)

    def won(self, items: list[Pending]) -> None:
        """Claims this worker inserted first: for those that were hedges, how late the
        event got stored (a hedge that loses was not needed: the event was in already,
        and measuring it would only say how long this standby waited)."""
        if not self._hedging:
            return
        now = time.monotonic()
        for item in items:
            if item.key in self._hedging:
                self._stats.hedges_won += 1
                seconds = now - item.received_mono
                self._lateness.append(seconds)
                if self.on_hedged is not None:
                    self.on_hedged(seconds)

    def _hedge(self, items: list[Pending]) -> None:
        self._stats.hedged += len(items)
        # Bounded like what is published: past it (a full window hedging while the
        # store is away), hedges go untracked, and the others may repeat them.
        if len(self._hedging) < 10 * _HEDGES_PUBLISHED_MAX:
            self._hedging.update(item.key for item in items)
        self._claim(items)

    def info(self) -> dict[str, Any]:
        """For the heartbeat: the standby window, and how late recent hedges stored
        their events."""
        late = sorted(self._lateness)
        return {
            "window": self.standby.depth,
            "hedge_late_p50": late[len(late) // 2] if late else None,
            "hedge_late_max": late[-1] if late else None,
        }

    def _covered(self, count: int) -> None:
        self._stats.covered += count

    # -- the exchange loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Publish coverage, read the others', hedge what is due; until cancelled."""
        while True:
            started = time.monotonic()
            try:
                await self.exchange()
                self._health.answered()
            except StoreUnavailable as exc:
                self._health.failed(exc)
            self.hedge_due(time.monotonic(), store_up=not self._health.down)
            await asyncio.sleep(max(0.0, self._interval - (time.monotonic() - started)))

    def hedge_due(self, now: float, *, store_up: bool) -> None:
        """Claim the standby events whose deadline has come (fleet.standby.due)."""
        hedges = self.standby.due(now, store_up=store_up)
        if hedges:
            self._hedge(hedges)

    async def exchange(self) -> None:
        """Publish this worker's document, read everyone's: coverage, then views."""
        self._beat += 1
        connected = self._connected()
        records = self.coverage.records()
        hedged = self._hedged
        while hedged and (
            hedged[0][0] < self._beat - _HEDGES_PUBLISHED_FOR or len(hedged) > _HEDGES_PUBLISHED_MAX
        ):
            hedged.popleft()
        await self._store.publish_coverage(
            {
                "beat": self._beat,
                "hedged": [key for _, key in hedged],
                "state": "leaving" if self.coverage.leaving else "running",
                "pbxs": {
                    pbx: {**records.get(pbx, {}), "connected": connected.get(pbx, False)}
                    for pbx in self._servers
                },
            }
        )
        docs = await self._store.coverage()
        now = time.monotonic()
        self.standby.exchanges += 1
        self.standby.heard({str(doc["_id"]): doc.get("beat") for doc in docs}, self._idle(docs))
        for doc in docs:
            if doc["_id"] != self._me:
                self.standby.apply(str(doc["_id"]), doc.get("pbxs") or {}, now)
                if doc.get("hedged"):
                    self.standby.claimed_elsewhere(doc["hedged"])
        self._update_views(docs, now)

    def _idle(self, docs: list[dict[str, Any]]) -> dict[str, int]:
        """Exchanges since each worker last published, by the store's clock (``at``,
        set by the store on each publish): the age of its document beside ours,
        which we have just published."""
        stamps = {str(doc["_id"]): doc.get("at") for doc in docs}
        mine = stamps.get(self._me)
        if not isinstance(mine, datetime):
            return {}
        return {
            worker: int((mine - at).total_seconds() / self._interval)
            for worker, at in stamps.items()
            if isinstance(at, datetime) and at < mine
        }

    def _update_views(self, docs: list[dict[str, Any]], now: float) -> None:
        live = set()
        for doc in docs:
            worker = str(doc["_id"])
            if doc.get("state") == "running" and self.standby.silent_for(worker) <= _VIEW_EXCHANGES:
                live.add(worker)
        for pbx in self._servers:
            eligible = [
                str(doc["_id"])
                for doc in docs
                if str(doc["_id"]) in live
                and ((doc.get("pbxs") or {}).get(pbx) or {}).get("connected")
            ]
            if self.ownership.update(pbx, eligible, now):
                log.info("%s: owned by %d worker(s) now", pbx, len(eligible), extra={"server": pbx})
        gone, self._live = self._live - live, live
        if gone:
            self.standby.gone(
                gone, {pbx: self.ownership.views(pbx, now)[0].workers for pbx in self._servers}
            )
