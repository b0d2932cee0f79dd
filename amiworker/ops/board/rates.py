"""Events per second per PBX over the last 15 minutes, counted as they arrive (no I/O).

The board counts each new event once, into a bucket of ``BUCKET`` seconds by
its own time (``ts``), and forgets buckets older than the window: a push
costs nothing however busy the PBXs are. What happened before the board
started is counted once, from the log (:func:`amiworker.ops.board.queries.load_rates`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from amiworker.ops.board.calls import iso

__all__ = ["BUCKET", "WINDOW", "RateCounter"]

BUCKET: Final = 10  # seconds per point of the chart
WINDOW: Final = 15 * 60  # seconds the chart shows
_POINTS: Final = WINDOW // BUCKET


def _index(ts: datetime) -> int:
    aware = ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
    return int(aware.timestamp()) // BUCKET


class RateCounter:
    """Events per bucket per PBX, for the last ``WINDOW`` seconds."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[int, int]] = defaultdict(dict)
        self._servers: set[str] = set()
        self._newest = 0

    def add(self, server: str, ts: datetime, count: int = 1) -> bool:
        """Count ``count`` events of ``server`` at ``ts``; False if older than the window."""
        self._servers.add(server)
        index = _index(ts)
        self._newest = max(self._newest, index)
        if index <= self._newest - _POINTS:
            return False
        buckets = self._counts[server]
        buckets[index] = buckets.get(index, 0) + count
        return True

    def add_doc(self, doc: Mapping[str, Any]) -> bool:
        server, ts = doc.get("server"), doc.get("ts")
        if not isinstance(server, str) or not isinstance(ts, datetime):
            return False
        return self.add(server, ts)

    def know(self, servers: Iterable[str]) -> None:
        """PBXs to show even while they send nothing."""
        self._servers.update(servers)

    def snapshot(self, now: datetime) -> dict[str, Any]:
        """What ``GET /api/rates`` answers: per PBX, events per bucket, oldest first; the
        last bucket is the one in progress."""
        last = _index(now)
        first = last - _POINTS + 1
        self._newest = max(self._newest, last)
        series = {}
        for server in sorted(self._servers):
            buckets = self._counts.get(server, {})
            for stale in [i for i in buckets if i < first]:
                del buckets[stale]
            series[server] = [buckets.get(i, 0) for i in range(first, last + 1)]
        return {
            "now": iso(now),
            "bucket": BUCKET,
            "window": WINDOW,
            "start": iso(datetime.fromtimestamp(first * BUCKET, UTC)),
            "servers": series,
        }
