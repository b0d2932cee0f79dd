"""Events waiting for their claim, in arrival order: in memory, then on local disk.

The AMI reader puts (never waits); the claim loop takes batches. Up to
``high_water`` (``buffer_size``) events wait in memory. Past it, and for as
long as anything is spilled, what arrives goes to the spill (fleet.spill)
behind what is there already, so a burst or a long MongoDB outage delays
events instead of losing them: every worker sees the same stream and would
otherwise fill up, and drop the same events, at the same moment. The claim
loop takes memory first, then the spill, so the arrival order (and with it the
order of each call's events) is kept. Only a full spill (``spill_max_bytes``)
drops, counted and logged.

Every spill call runs on one thread of its own, never on the event loop; the
reader only appends to a list that a writer task hands to that thread in
batches. The spill outlives the worker: the next worker of its slot drains
what a killed one left, first, before anything it receives itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from amiworker.ami.message import Message
from amiworker.fleet.pending import Pending
from amiworker.fleet.spill import Spill, SpilledEvent
from amiworker.logs import Throttle
from amiworker.stats import WorkerStats

__all__ = ["Batch", "ClaimQueue"]

log = logging.getLogger("amiworker.fleet.claims")

_MIB: Final = 1024 * 1024

T = TypeVar("T")


@dataclass(slots=True)
class Batch:
    """Events to claim together; ``spilled`` of them came from the spill (then all)."""

    items: list[Pending]
    spilled: int = 0


class ClaimQueue:
    def __init__(
        self,
        *,
        high_water: int,
        stats: WorkerStats,
        open_spill: Callable[[], Spill] | None = None,
        on_lost: Callable[[str, str], None] | None = None,
    ) -> None:
        self._high_water = high_water
        self._stats = stats
        self._open_spill = open_spill
        # (server, key) of each event dropped: hedged mode must not cover it.
        self._on_lost = on_lost
        self._memory: deque[Pending] = deque()
        self._spill: Spill | None = None
        self._thread: ThreadPoolExecutor | None = None
        # Events for the spill, waiting for the writer to hand them to the thread.
        self._to_spill: list[SpilledEvent] = []
        self._writing = 0
        # From the first event spilled until the spill is empty again: new events
        # go behind the spilled ones, never ahead of them.
        self._spilling = False
        self._spilling_since = 0.0
        self._ready = asyncio.Event()
        self._spill_waiting = asyncio.Event()
        self._drops = Throttle()
        #: The spill as last seen by its thread: events, bytes, oldest received_at.
        self.spill_events = 0
        self.spill_bytes = 0
        self.spill_oldest: float | None = None
        self.spill_path: str | None = None

    # -- opening and closing -----------------------------------------------------------

    async def open(self) -> None:
        """Open the spill (if any), with what a dead predecessor of this slot left."""
        if self._open_spill is None:
            return
        self._thread = ThreadPoolExecutor(1, "spill")
        open_spill = self._open_spill
        try:
            self._spill = await self._in_thread(open_spill)
        except Exception as exc:  # SpillDirError, or the disk: run on, in memory only
            log.error("%s; running without a spill: past buffer_size events are dropped", exc)
            return
        spill = self._spill
        self.spill_path = str(spill.path)
        await self._in_thread(self._snapshot)
        if self.spill_events:
            self._spilling = True
            self._spilling_since = time.monotonic()
            log.warning(
                "%d event(s) left in the spill %s by this slot's previous worker%s; "
                "claiming them first",
                self.spill_events,
                spill.path,
                f" ({spill.torn} torn record(s) dropped)" if spill.torn else "",
            )
            self._ready.set()

    async def close(self, leftovers: Sequence[Pending] = ()) -> None:
        """Write what waits for the spill (and ``leftovers``, events a stop could not
        claim) to it, and close it: the next worker of this slot claims them."""
        spill = self._spill
        if spill is None:
            if leftovers:
                self._drop_many(len(leftovers))
            return
        pending = self._to_spill + [self._spilled(item) for item in leftovers]
        self._to_spill = []
        if pending:
            accepted = await self._in_thread(spill.append, pending)
            if accepted < len(pending):
                self._drop_many(len(pending) - accepted)
        await self._in_thread(self._snapshot)
        if self.spill_events:
            log.warning(
                "%d event(s) left in the spill %s: the next worker of this slot claims them",
                self.spill_events,
                spill.path,
            )
        await self._in_thread(spill.close)
        self._spill = None
        if self._thread is not None:
            self._thread.shutdown(wait=False)

    # -- the reader's side: never waits ----------------------------------------------

    def put(self, item: Pending) -> None:
        if not self._spilling and len(self._memory) < self._high_water:
            self._memory.append(item)
            if not self._ready.is_set():
                self._ready.set()
            return
        if self._spill is None or len(self._to_spill) >= self._high_water:
            # No spill, or the disk does not keep up with the reader.
            self._drop_many(1, slow_disk=self._spill is not None)
            if self._on_lost is not None:
                self._on_lost(item.server, item.key)
            return
        if not self._spilling:
            self._spilling = True
            self._spilling_since = time.monotonic()
            log.warning(
                "%d event(s) wait for MongoDB (buffer_size): spilling what arrives to %s "
                "until it catches up",
                len(self._memory),
                self.spill_path,
            )
        self._to_spill.append(self._spilled(item))
        if not self._spill_waiting.is_set():
            self._spill_waiting.set()

    @staticmethod
    def _spilled(item: Pending) -> SpilledEvent:
        return SpilledEvent(item.key, item.server, item.received_at.timestamp(), item.message.raw)

    def _drop_many(self, count: int, *, slow_disk: bool = False) -> None:
        self._stats.dropped += count
        dropped = self._drops.count(count)
        if dropped:
            log.error(
                "MongoDB unreachable or too slow and %s: dropped %d event(s), %d in all; %s",
                self._why_dropped(slow_disk),
                dropped,
                self._stats.dropped,
                "put spill_dir on a faster disk or raise buffer_size, or fix MongoDB"
                if slow_disk
                else "raise spill_max_bytes or buffer_size, or fix MongoDB",
            )

    def _why_dropped(self, slow_disk: bool) -> str:
        if self._spill is None:
            return f"the buffer is full ({self._high_water} events) and there is no spill"
        if slow_disk:
            # The spill has room: its disk took longer to write than buffer_size
            # events took to arrive (they wait in memory meanwhile, up to that many).
            return (
                f"the spill's disk does not keep up ({len(self._to_spill)} events wait "
                f"to be written to {self.spill_path})"
            )
        return f"the spill is full (spill_max_bytes, {self.spill_bytes / _MIB:.0f} MiB)"

    def _drops_unreported(self) -> None:
        """Drops counted since the last line (one line per 10 s): said when spilling ends."""
        unreported = self._drops.flush()
        if unreported:
            log.error(
                "%d more event(s) dropped while spilling, %d in all (see above)",
                unreported,
                self._stats.dropped,
            )

    # -- the spill writer ---------------------------------------------------------------

    async def write_spill(self) -> None:
        """Hand what the reader spilled to the spill thread, in batches, until cancelled."""
        while True:
            if not self._to_spill:
                self._spill_waiting.clear()
                await self._spill_waiting.wait()
                continue
            spill = self._spill
            assert spill is not None
            batch, self._to_spill = self._to_spill, []
            self._writing += 1
            try:
                accepted = await self._in_thread(spill.append, batch)
                await self._in_thread(self._snapshot)
            finally:
                self._writing -= 1
            self._stats.spilled += accepted
            if accepted < len(batch):
                self._drop_many(len(batch) - accepted)
                if self._on_lost is not None:
                    for event in batch[accepted:]:
                        self._on_lost(event.server, event.key)
            self._ready.set()

    # -- the claim loop's side ---------------------------------------------------------

    @property
    def depth(self) -> int:
        """Events waiting: in memory, spilled, or about to be."""
        return len(self._memory) + len(self._to_spill) + self.spill_events

    @property
    def in_memory(self) -> int:
        return len(self._memory)

    def oldest_waiting(self) -> float | None:
        """Monotonic receive time of the oldest event in memory (batch_delay)."""
        return self._memory[0].received_mono if self._memory else None

    async def take(self, limit: int, *, stopping: Callable[[], bool]) -> Batch:
        """The oldest waiting events, at most ``limit``: memory first, then the spill.

        Waits while there are none; returns an empty batch once ``stopping()``
        and memory is empty (a stop leaves the spill to the slot's next worker).
        """
        while True:
            memory = self._memory
            if memory:
                if len(memory) <= limit:
                    items = list(memory)  # the usual case: all of it, in one C call
                    memory.clear()
                else:
                    items = [memory.popleft() for _ in range(limit)]
                return Batch(items)
            if stopping():
                return Batch([])
            spill = self._spill
            if spill is not None and self.spill_events:
                events = await self._in_thread(spill.read, limit)
                if events:
                    return Batch([_pending(event) for event in events], len(events))
            if self._spilling and not self._to_spill and not self._writing:
                self._spilling = False
                log.warning(
                    "spill drained after %.1f s: events wait in memory again",
                    time.monotonic() - self._spilling_since,
                )
                self._drops_unreported()
            self._ready.clear()
            await self._ready.wait()

    async def settle(self, batch: Batch) -> None:
        """The batch is claimed: forget its spilled events."""
        if batch.spilled and self._spill is not None:
            spill = self._spill
            await self._in_thread(spill.commit, batch.spilled)
            await self._in_thread(self._snapshot)

    def drain_memory(self) -> list[Pending]:
        """Remove and return what waits in memory (a stop that could not claim it)."""
        items = list(self._memory)
        self._memory.clear()
        return items

    def wake(self) -> None:
        """Let a waiting :meth:`take` look again (a stop)."""
        self._ready.set()

    def describe(self) -> str:
        """What waits, for the store's outage log lines."""
        text = f"{len(self._memory)} event(s) buffered in memory, up to {self._high_water}"
        if self._spill is not None:
            text += f"; past that they spill to {self.spill_path}"
            if self.spill_events:
                text += f" ({self.spill_events} there now, {self.spill_bytes / _MIB:.1f} MiB)"
        return text

    def spill_info(self) -> dict[str, Any] | None:
        """For the heartbeat: events, bytes and the age of the oldest spilled event."""
        if self._spill is None:
            return None
        oldest = self.spill_oldest
        return {
            "events": self.spill_events + len(self._to_spill),
            "bytes": self.spill_bytes,
            "oldest_age": None if oldest is None else max(0.0, time.time() - oldest),
            "path": self.spill_path,
        }

    # -- the thread ------------------------------------------------------------------------

    def _snapshot(self) -> None:
        """On the spill thread: what the loop shows of the spill."""
        spill = self._spill
        if spill is None:
            return
        self.spill_events = spill.events
        self.spill_bytes = spill.bytes
        self.spill_oldest = spill.oldest_received_at

    async def _in_thread(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, func, *args)


def _pending(event: SpilledEvent) -> Pending:
    # The latency clock counts the time spent spilled, as in memory.
    now = time.monotonic()
    received_mono = now - max(0.0, time.time() - event.received_at)
    return Pending(
        event.server,
        Message(event.raw),
        datetime.fromtimestamp(event.received_at, UTC),
        received_mono,
        event.key,
    )
