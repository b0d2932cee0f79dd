"""Spill throughput on real Asterisk 22 events: segment files vs SQLite WAL vs memory.

    python bench/spill.py [--rounds 3] [--dir DIR]

The 117,006 events of the 3,000-call capture (parsed by ``Parser``, keyed by
``DedupKeys`` as the claim loop keys them) go through three FIFOs with the
interface of ``amiworker.fleet.spill.Spill``:

* ``memory``: a deque, as the claim buffer holds events today (the baseline);
* ``sqlite``: one table in SQLite's WAL mode, ``synchronous=NORMAL`` (the WAL
  is synced at checkpoints), an ``executemany`` transaction per append, a
  ``SELECT ... LIMIT`` per read, a ``DELETE`` per commit (the prototype below);
* ``segments``: ``Spill`` itself (append-only segment files, CRC per record,
  ``fdatasync`` at most every second).

Each is timed in three phases: **write** (``append`` in batches of
``--append-batch``, 500, then one sync: what was appended is on the disk),
**reopen** (close, and open what was left, as the next worker of the slot
does), **drain** (``read`` + ``commit`` in batches of ``--drain-batch``,
2,000, until empty; the order is checked afterwards). Figures are events/s on
the wall clock (I/O waits included) and CPU µs per event (this process's user
+ system time: what the spill thread takes from a core), best of
``--rounds``, the variants taking turns within each round. The share of one
core is what writing and draining 24,000 events/s (the peak of one real
Asterisk) would take.

The files go to ``--dir`` (default: a temporary directory under /var/tmp, a
real disk where /tmp may be tmpfs): run it on the disk a spill_dir would use.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from amiworker.ami.protocol import Parser  # noqa: E402
from amiworker.fleet.dedup import DedupKeys  # noqa: E402
from amiworker.fleet.spill import Spill, SpilledEvent  # noqa: E402

CAPTURE = ROOT / "tests/fixtures/asterisk22-3000-calls.txt.gz"
EXPECTED_EVENTS = 117_006
PEAK_RATE = 24_000
MAX_BYTES = 1 << 30


class Fifo(Protocol):
    def append(self, events: Sequence[SpilledEvent]) -> int: ...
    def read(self, limit: int) -> list[SpilledEvent]: ...
    def commit(self, count: int) -> None: ...
    def sync(self) -> None: ...
    def close(self) -> None: ...
    def disk_bytes(self) -> int: ...


class MemoryFifo:
    """The baseline: the claim buffer's deque."""

    def __init__(self) -> None:
        self.buffer: deque[SpilledEvent] = deque()

    def append(self, events: Sequence[SpilledEvent]) -> int:
        self.buffer.extend(events)
        return len(events)

    def read(self, limit: int) -> list[SpilledEvent]:
        buffer = self.buffer
        if len(buffer) <= limit:
            batch = list(buffer)
            buffer.clear()
            return batch
        popleft = buffer.popleft
        return [popleft() for _ in range(limit)]

    def commit(self, count: int) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass

    def disk_bytes(self) -> int:
        return 0


class SqliteFifo:
    """The prototype on SQLite: a table in WAL mode, rows deleted as they are committed."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: commits are not synced, checkpoints are. A power loss
        # costs the last transactions, as the segments' sync interval does.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, key TEXT NOT NULL, "
            "server TEXT NOT NULL, received_at REAL NOT NULL, raw BLOB NOT NULL)"
        )
        # The bytes it holds, as max_bytes would need: page_count after every
        # append would be a query more; the sum of the rows is cheaper.
        row = self.db.execute(
            "SELECT coalesce(min(seq) - 1, 0), coalesce(sum(length(raw) + length(key) + 16), 0) "
            "FROM events"
        ).fetchone()
        self.cursor = self.committed = int(row[0])
        self.bytes = int(row[1])
        self.unacked: deque[tuple[int, int]] = deque()

    def append(self, events: Sequence[SpilledEvent]) -> int:
        accepted = 0
        size = self.bytes
        for event in events:
            size += len(event.raw) + len(event.key) + 16
            if size > self.max_bytes:
                break
            accepted += 1
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT INTO events (key, server, received_at, raw) VALUES (?, ?, ?, ?)",
            [(e.key, e.server, e.received_at, e.raw) for e in events[:accepted]],
        )
        self.db.execute("COMMIT")
        self.bytes = size
        return accepted

    def read(self, limit: int) -> list[SpilledEvent]:
        rows = self.db.execute(
            "SELECT seq, key, server, received_at, raw FROM events WHERE seq > ? "
            "ORDER BY seq LIMIT ?",
            (self.cursor, limit),
        ).fetchall()
        if not rows:
            return []
        self.cursor = rows[-1][0]
        self.unacked.extend((row[0], len(row[4]) + len(row[1]) + 16) for row in rows)
        return [SpilledEvent(key, server, at, raw) for _, key, server, at, raw in rows]

    def commit(self, count: int) -> None:
        size = 0
        for _ in range(count):
            seq, length = self.unacked.popleft()
            size += length
        self.db.execute("DELETE FROM events WHERE seq <= ?", (seq,))
        self.bytes -= size

    def sync(self) -> None:
        self.db.execute("PRAGMA wal_checkpoint(FULL)")

    def close(self) -> None:
        self.db.close()

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*"))


class SegmentFifo:
    """``Spill`` itself, with the bench's extra ``disk_bytes``."""

    def __init__(self, directory: Path) -> None:
        self.spill = Spill.open(directory, "bench.events", 0, max_bytes=MAX_BYTES)
        self.append = self.spill.append
        self.read = self.spill.read
        self.commit = self.spill.commit
        self.sync = self.spill.sync
        self.close = self.spill.close

    def disk_bytes(self) -> int:
        return self.spill.bytes


@dataclass
class Figures:
    write_wall: float = float("inf")
    write_cpu: float = float("inf")
    reopen_wall: float = float("inf")
    drain_wall: float = float("inf")
    drain_cpu: float = float("inf")
    disk: int = 0
    extra: list[str] = field(default_factory=list)


def load_events() -> list[SpilledEvent]:
    parser = Parser()
    keys = DedupKeys("pbx-1", 10.0)
    now = time.time()
    events: list[SpilledEvent] = []
    for message in parser.feed(gzip.decompress(CAPTURE.read_bytes())):
        if message.kind != "event":
            continue
        key = keys.key(message.raw, time.monotonic())
        events.append(SpilledEvent(key, "pbx-1", now + len(events) / PEAK_RATE, message.raw))
    assert len(events) == EXPECTED_EVENTS, len(events)
    return events


def run_once(
    open_fifo: Callable[[], Fifo], events: list[SpilledEvent], append_batch: int, drain_batch: int
) -> tuple[float, float, float, float, float, int]:
    gc.collect()
    fifo = open_fifo()
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(events), append_batch):
        accepted = fifo.append(events[i : i + append_batch])
        assert accepted == len(events[i : i + append_batch])
    fifo.sync()
    write_wall, write_cpu = time.perf_counter() - wall, time.process_time() - cpu
    disk = fifo.disk_bytes()

    wall = time.perf_counter()
    if not isinstance(fifo, MemoryFifo):  # memory does not outlive the process
        fifo.close()
        fifo = open_fifo()
    reopen_wall = time.perf_counter() - wall

    drained: list[SpilledEvent] = []
    wall, cpu = time.perf_counter(), time.process_time()
    while batch := fifo.read(drain_batch):
        fifo.commit(len(batch))
        drained += batch
    fifo.sync()
    drain_wall, drain_cpu = time.perf_counter() - wall, time.process_time() - cpu
    fifo.close()
    assert drained == events, "the drain lost, repeated or reordered events"
    return write_wall, write_cpu, reopen_wall, drain_wall, drain_cpu, disk


def machine_busy() -> float:
    """CPU seconds every process on the machine has used since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:8]
    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields)
    return (user + nice + system + irq + softirq) / 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--append-batch", type=int, default=500)
    parser.add_argument("--drain-batch", type=int, default=2000)
    parser.add_argument("--dir", type=Path, help="where the files go (a real disk)")
    args = parser.parse_args()

    events = load_events()
    raw_bytes = sum(len(e.raw) for e in events)
    print(
        f"capture: {CAPTURE.name}, {len(events):,} events, {raw_bytes / 1e6:.1f} MB of AMI; "
        f"append batches of {args.append_batch}, drain batches of {args.drain_batch}"
    )
    work = Path(tempfile.mkdtemp(prefix="bench-spill-", dir=args.dir or "/var/tmp"))
    variants: dict[str, Callable[[Path], Fifo]] = {
        "memory": lambda d: MemoryFifo(),
        "sqlite": lambda d: SqliteFifo(d / "spill.db", MAX_BYTES),
        "segments": lambda d: SegmentFifo(d),
    }
    figures = {name: Figures() for name in variants}
    busy, cpu, wall = machine_busy(), time.process_time(), time.perf_counter()
    try:
        for _ in range(args.rounds):
            for name, make in variants.items():
                directory = work / name
                directory.mkdir()
                results = run_once(
                    lambda m=make, d=directory: m(d),  # type: ignore[misc]
                    events,
                    args.append_batch,
                    args.drain_batch,
                )
                shutil.rmtree(directory)
                f = figures[name]
                f.write_wall = min(f.write_wall, results[0])
                f.write_cpu = min(f.write_cpu, results[1])
                f.reopen_wall = min(f.reopen_wall, results[2])
                f.drain_wall = min(f.drain_wall, results[3])
                f.drain_cpu = min(f.drain_cpu, results[4])
                f.disk = max(f.disk, results[5])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - wall
    other = max(0.0, machine_busy() - busy - (time.process_time() - cpu))

    n = len(events)
    base = figures["memory"]
    print(
        f"\n{'':9} {'written':>12} {'drained':>12} {'CPU µs/event':>17} {'reopen':>8} "
        f"{'disk':>8}  {'x slower than memory':>20}  {'core at 24k/s':>13}"
    )
    print(
        f"{'':9} {'events/s':>12} {'events/s':>12} {'write':>8} {'drain':>8} {'':>8} {'':>8}  "
        f"{'write':>9} {'drain':>10}"
    )
    for name, f in figures.items():
        write_us, drain_us = f.write_cpu / n * 1e6, f.drain_cpu / n * 1e6
        share = (write_us + drain_us) * PEAK_RATE / 1e6
        ratios = (
            f"{f.write_wall / base.write_wall:9.1f} {f.drain_wall / base.drain_wall:10.1f}"
            if name != "memory"
            else f"{'1.0':>9} {'1.0':>10}"
        )
        print(
            f"{name:9} {n / f.write_wall:12,.0f} {n / f.drain_wall:12,.0f} {write_us:8.2f} "
            f"{drain_us:8.2f} {f.reopen_wall * 1e3:6.0f}ms {f.disk / 1e6:6.1f}MB  {ratios}  "
            f"{share:12.1%}"
        )
    sqlite, segments = figures["sqlite"], figures["segments"]
    print(
        f"\nsegments vs sqlite: written {sqlite.write_wall / segments.write_wall:.1f}x, "
        f"drained {sqlite.drain_wall / segments.drain_wall:.1f}x faster; CPU per event "
        f"{(sqlite.write_cpu + sqlite.drain_cpu) / (segments.write_cpu + segments.drain_cpu):.1f}x "
        "less"
    )
    print(
        f"best of {args.rounds} rounds in {wall:.0f} s; the rest of the machine used "
        f"{other / wall:.2f} cores meanwhile (noise)"
    )


if __name__ == "__main__":
    main()
