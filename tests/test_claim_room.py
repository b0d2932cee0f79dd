"""How a claim batch meets a full handler backlog.

Handlers that free room quickly are waited for, so the batch is claimed to run
here rather than stored ``queued`` (which costs a take-over later); handlers that
free room slowly, or not at all, are not: the store must not lag behind them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from amiworker.fleet.claimqueue import ClaimQueue
from amiworker.fleet.claims import Claimer
from amiworker.fleet.health import StoreHealth
from amiworker.fleet.locktable import StoreUnavailable
from amiworker.stats import WorkerStats


class Backlog:
    """Room as a scheduler hands it out; ``per_run`` slots free at each wake."""

    def __init__(self, free: int, per_run: int) -> None:
        self.free = free
        self.per_run = per_run
        self.waits = 0

    def reserve(self, wanted: int) -> int:
        granted = min(wanted, self.free)
        self.free -= granted
        return granted

    async def room_freed(self, timeout: float) -> None:
        self.waits += 1
        if self.per_run:
            await asyncio.sleep(0.001)
            self.free += self.per_run
        else:
            await asyncio.sleep(timeout)


def claimer(backlog: Backlog) -> Claimer:
    stats = WorkerStats()
    store: Any = None  # room is settled before the store is asked anything
    return Claimer(
        store,
        build_document=lambda item: {},
        on_won=lambda winners: None,
        unavailable=StoreUnavailable,
        stats=stats,
        health=StoreHealth(),
        reserve=backlog.reserve,
        room_freed=backlog.room_freed,
        dedup_window=60.0,
        batch_size=500,
        batch_delay=0.0,
        queue=ClaimQueue(high_water=500, stats=stats),
    )


async def test_a_batch_waits_for_handlers_that_free_room_quickly() -> None:
    backlog = Backlog(free=20, per_run=40)
    granted = await claimer(backlog)._room_for(500)
    assert granted == 500
    assert backlog.waits >= 12  # (500 - 20) / 40: it did wait, run by run


async def test_stalled_handlers_are_not_waited_for() -> None:
    backlog = Backlog(free=20, per_run=0)
    granted = await claimer(backlog)._room_for(500)
    assert granted == 20  # the rest is stored queued, for any worker with room
    assert backlog.waits <= 2  # one probe, not the whole second


async def test_room_enough_needs_no_wait() -> None:
    backlog = Backlog(free=600, per_run=0)
    assert await claimer(backlog)._room_for(500) == 500
    assert backlog.waits == 0
