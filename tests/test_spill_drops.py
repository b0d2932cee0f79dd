"""What a worker says when it drops events with a spill: the cause, and what to do.

Two causes, two remedies: a spill at ``spill_max_bytes`` (raise it), and a disk
that writes slower than events arrive, while up to ``buffer_size`` of them wait
in memory for it (a faster disk, or a larger buffer: raising ``spill_max_bytes``
would change nothing). A real spill in a temporary directory, its writes held
back as a stalled disk would hold them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from amiworker.ami.message import Message
from amiworker.fleet.claimqueue import ClaimQueue
from amiworker.fleet.pending import Pending
from amiworker.fleet.spill import Spill, SpilledEvent
from amiworker.stats import WorkerStats
from tests.waiting import wait_for

BUFFER = 3


class StalledDisk(Spill):
    """A spill whose appends wait until ``disk`` is set; ``writing``: one began."""

    disk = threading.Event()
    writing = threading.Event()

    def append(self, events: Sequence[SpilledEvent]) -> int:
        StalledDisk.writing.set()
        StalledDisk.disk.wait(10)
        return super().append(events)


def pending(n: int) -> Pending:
    raw = f"Event: Newchannel\r\nUniqueid: 1.{n}\r\nLinkedid: 1.0\r\n\r\n".encode()
    return Pending("pbx1", Message(raw), datetime.now(UTC), time.monotonic(), f"pbx1:1.{n}")


async def test_a_disk_slower_than_the_events_is_named_as_the_cause_of_drops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stats = WorkerStats()
    StalledDisk.disk.clear()
    StalledDisk.writing.clear()
    queue = ClaimQueue(
        high_water=BUFFER,
        stats=stats,
        open_spill=lambda: StalledDisk.open(tmp_path, "amiworker.events", 0, max_bytes=1 << 20),
    )
    await queue.open()
    writer = asyncio.create_task(queue.write_spill())
    try:
        with caplog.at_level(logging.WARNING, logger="amiworker"):
            for n in range(BUFFER + 1):  # memory full, then the first one for the spill
                queue.put(pending(n))
            await wait_for(StalledDisk.writing.is_set, 5, "a write to the stalled disk")
            for n in range(BUFFER + 1, BUFFER + 1 + BUFFER + 10):
                queue.put(pending(n))  # BUFFER wait for the disk, 10 dropped
            assert stats.dropped == 10
            drops = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
            assert len(drops) == 1, drops  # one line per 10 s
            assert "the spill's disk does not keep up" in drops[0], drops
            assert "faster disk" in drops[0] and "spill_max_bytes" not in drops[0], drops

            StalledDisk.disk.set()
            taken = 0
            while taken < 2 * BUFFER + 1:  # memory, then the spill, in arrival order
                batch = await asyncio.wait_for(queue.take(100, stopping=lambda: False), 5)
                taken += len(batch.items)
                await queue.settle(batch)
            waiting = asyncio.create_task(queue.take(100, stopping=lambda: False))
            await wait_for(lambda: "spill drained" in caplog.text, 5, "the spill to drain")
            waiting.cancel()
        # The drops counted after the one line, said when spilling ends: none unsaid.
        assert "9 more event(s) dropped while spilling, 10 in all" in caplog.text
    finally:
        StalledDisk.disk.set()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await queue.close()
