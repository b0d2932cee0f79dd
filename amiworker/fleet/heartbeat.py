"""The heartbeat: this worker's row in ``workers``, and what the rows tell of the fleet.

Every ``heartbeat_interval`` a worker writes its row (``last_seen`` on
MongoDB's clock, its sessions, counters, backlog, handler set) and reads every
row back: a handful per host, so one small query gives it the fleet's view,
which the take-over loop acts on (dead workers, queued events to take) and
``amiworker status`` shows. A worker whose ``last_seen`` is older than
``lease`` by MongoDB's clock is dead, or stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from amiworker.mongo import StoreUnavailable

if TYPE_CHECKING:
    from amiworker.fleet.health import StoreHealth
    from amiworker.fleet.locktable import LockTable

__all__ = ["FleetView", "Heartbeat"]

RUNNING = "running"
STOPPING = "stopping"
STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class FleetView:
    """The ``workers`` rows as read at ``now`` (MongoDB's clock)."""

    now: datetime
    rows: Sequence[Mapping[str, Any]] = field(default_factory=list)

    def cutoff(self, lease: float) -> datetime:
        return self.now - timedelta(seconds=lease)

    def expired(self, lease: float) -> list[Mapping[str, Any]]:
        """Rows whose heartbeat is older than ``lease``: dead workers, or stopped ones."""
        cutoff = self.cutoff(lease)
        return [row for row in self.rows if _last_seen(row) < cutoff]

    def live(self, lease: float) -> list[Mapping[str, Any]]:
        cutoff = self.cutoff(lease)
        return [
            row
            for row in self.rows
            if _last_seen(row) >= cutoff and row.get("state", RUNNING) != STOPPED
        ]

    def queued_counts(self) -> dict[str, int]:
        """Per worker in view: the events it has stored ``queued`` so far (won with no
        room, or released on a stop). A count that grew since a worker last looked
        means events may wait for it. Not a sum less what was taken: the rows of
        workers that stopped are removed in time, and the events others took from
        them would then cancel out events queued since (a rolling deploy hid its
        second host's released events that way, for a lease)."""
        counts = {}
        for row in self.rows:
            counters = row.get("counters") or {}
            counts[str(row.get("_id"))] = int(counters.get("queued", 0)) + int(
                counters.get("released", 0)
            )
        return counts


_NEVER = datetime.min.replace(tzinfo=UTC)


def _last_seen(row: Mapping[str, Any]) -> datetime:
    seen = row.get("last_seen")
    if not isinstance(seen, datetime):
        return _NEVER
    return seen if seen.tzinfo is not None else seen.replace(tzinfo=UTC)


class Heartbeat:
    """Writes this worker's row and reads the fleet's, every ``interval`` seconds."""

    def __init__(
        self,
        store: LockTable,
        health: StoreHealth,
        interval: float,
        info: Callable[[], dict[str, Any]],
    ) -> None:
        self._store = store
        self._health = health
        self._interval = interval
        self._info = info
        #: The latest view of the fleet; None until the first heartbeat got through.
        self.view: FleetView | None = None
        #: Set after each heartbeat that got through (the take-over loop waits on it).
        self.beat = asyncio.Event()

    async def beat_once(self) -> bool:
        """Write the row and read the fleet; False if MongoDB did not answer."""
        try:
            await self._store.heartbeat(self._info())
            now, rows = await self._store.fleet()
        except StoreUnavailable as exc:
            self._health.failed(exc)
            return False
        self._health.answered()
        self.view = FleetView(now, rows)
        self.beat.set()
        return True

    async def run(self) -> None:
        while True:
            await self.beat_once()
            await asyncio.sleep(self._interval)
