"""What the benchmarks share: a whole installation on this machine, and ways to watch it.

Not a benchmark itself. ``Stack`` starts nx-27017, simulated PBXs and
``amiworker --workers N`` as real processes (``amiworker.devstack.processes``), with a
handler module of no-op ``async def`` handlers for the channel events of a
call, so that every stored event is also handled and acknowledged. The CPU
and memory of each process are read from ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from pymongo import MongoClient

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from amiworker.ami.message import Message  # noqa: E402
from amiworker.devstack.embedded_mongo import EmbeddedMongo  # noqa: E402
from amiworker.devstack.processes import (  # noqa: E402
    FleetProcess,
    SimulatorControl,
    SimulatorProcess,
    wait_until,
)
from amiworker.fleet.dedup import DedupKeys, races  # noqa: E402

#: The events of a simulated call that carry a channel id (35 of its 39): they race.
CHANNEL_EVENTS = (
    "Newchannel", "Newexten", "VarSet", "NewCallerid", "NewConnectedLine", "Newstate",
    "SoftHangupRequest", "HangupRequest", "Hangup", "LocalBridge", "DialBegin", "DialEnd",
    "OriginateResponse",
)  # fmt: skip
CHANNEL_EVENTS_PER_CALL = 35
EVENTS_PER_CALL = 39

#: The events the shipped example handlers (handlers/calls.py) handle.
EXAMPLE_EVENTS = ("Newchannel", "Newstate", "Hangup")

NOOP_HANDLERS_TEMPLATE = '''"""Benchmark handlers: return at once, for channel events of a call.

Each worker process reports how many it ran, and when it ran the last one, in
$BENCH_PROGRESS_DIR/<pid>.progress every 0.1 s: how the benchmarks tell that
everything was handled without querying the store they measure.
"""

import asyncio
import os
import time

OUT = os.environ.get("BENCH_PROGRESS_DIR")
handled = 0
last_at = 0.0
_reporter = None


async def _report():
    path = os.path.join(OUT, f"{os.getpid()}.progress")
    while True:
        await asyncio.sleep(0.1)
        with open(path + ".tmp", "w") as out:
            out.write(f"{handled} {last_at}\\n")
        os.replace(path + ".tmp", path)


async def _noop(ctx, event):
    global handled, last_at, _reporter
    handled += 1
    last_at = time.time()
    if _reporter is None and OUT:
        _reporter = asyncio.get_running_loop().create_task(_report())


for _name in EVENTS:
    globals()[_name + "Handler"] = _noop
'''


def noop_handlers(events: tuple[str, ...] = CHANNEL_EVENTS) -> str:
    """A handler module of no-op handlers for ``events`` that reports its progress."""
    return NOOP_HANDLERS_TEMPLATE.replace("for _name in EVENTS:", f"for _name in {events!r}:")


NOOP_HANDLERS = noop_handlers()

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_note() -> str:
    cores = os.cpu_count() or 0
    return (
        f"{cores} cores, shared by everything in this run (nx-27017, the simulators, "
        "the workers, this script); other load on the machine adds noise"
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS), in KiB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def channel_events(messages: Iterable[Message]) -> list[Message]:
    return [m for m in messages if m.kind == "event" and races(m, "channel")]


def channel_keys(simulator: SimulatorProcess) -> list[str]:
    keys = DedupKeys(simulator.name, window=float("inf"))
    return [keys.key(m.raw, 0.0) for m in channel_events(simulator.recorded_events())]


class Stack:
    """nx-27017 + ``pbxs`` simulated PBXs + ``amiworker --workers N``; stopped on exit."""

    def __init__(
        self,
        *,
        workers: int,
        pbxs: int = 2,
        database: str = "bench",
        call_duration: float = 1.0,
        env: dict[str, str] | None = None,
        start_fleet: bool = True,
        handled: tuple[str, ...] = CHANNEL_EVENTS,
    ) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="amiworker-bench-"))
        self.database = database
        self.workers = workers
        self.mongo = EmbeddedMongo(self.workdir / "mongo")
        self.simulators = [
            SimulatorProcess(f"pbx{i}", self.workdir, duration=call_duration)
            for i in range(1, pbxs + 1)
        ]
        self.progress_dir = self.workdir / "progress"
        self.progress_dir.mkdir()
        self.env = {
            "AMIWORKER_LOG_LEVEL": "WARNING",
            # Generous: under full load a heartbeat can wait behind claims at nx-27017,
            # and a live worker taken for dead would have its events run twice.
            "AMIWORKER_LEASE": "60",
            "BENCH_PROGRESS_DIR": str(self.progress_dir),
            **(env or {}),
        }
        self.fleet: FleetProcess | None = None
        self.handled_events = handled
        self._start_fleet = start_fleet
        self._controls: list[SimulatorControl] = []
        self.client: MongoClient[dict[str, Any]] | None = None

    def __enter__(self) -> Stack:
        try:
            self.mongo.start()
            for simulator in self.simulators:
                simulator.start()
            self.client = MongoClient(self.mongo.uri, serverSelectionTimeoutMS=10_000)
            if self._start_fleet:
                self.fleet = self.start_fleet()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def db(self) -> Any:
        assert self.client is not None
        return self.client[self.database]

    def start_fleet(self) -> FleetProcess:
        app = self.workdir / "app"
        app.mkdir(exist_ok=True)
        (app / "bench_handlers.py").write_text(noop_handlers(self.handled_events))
        fleet = FleetProcess(
            self.workdir / "fleet",
            servers=[s.server_setting() for s in self.simulators],
            mongo_uri=self.mongo.uri,
            database=self.database,
            workers=self.workers,
            handlers=["bench_handlers"],
            app_dir=app,
            extra_env=self.env,
        ).start()
        self.fleet = fleet
        return fleet

    def wait_connected(self, timeout: float = 60.0) -> None:
        """Until every worker holds a session to every PBX (from their heartbeats)."""
        names = [s.name for s in self.simulators]

        def connected() -> bool:
            query = {f"servers.{name}.connected": True for name in names}
            return bool(self.db.workers.count_documents(query) >= self.workers)

        wait_until(connected, timeout, f"{self.workers} workers connected to {names}", 0.2)

    def wait_views(self, settle: float = 2.5, timeout: float = 60.0) -> None:
        """Hedged mode: until every worker's coverage document says it runs with a
        session to every PBX, then ``settle`` s more, so that every worker's view holds
        the whole fleet and the transition after its last view change is over (before
        that, a worker owns under its old views too: double inserts). Race mode: no
        ``coverage`` document, nothing to wait for."""
        names = [s.name for s in self.simulators]

        def ready() -> bool:
            query: dict[str, Any] = {"state": "running"}
            query.update({f"pbxs.{name}.connected": True for name in names})
            return bool(self.db.coverage.count_documents(query) >= self.workers)

        wait_until(ready, timeout, f"{self.workers} coverage documents connected to {names}", 0.2)
        time.sleep(settle)

    def handled(self) -> tuple[int, float]:
        """Handler runs so far in all workers, and the wall-clock time of the last one."""
        count, last = 0, 0.0
        for path in self.progress_dir.glob("*.progress"):
            try:
                done, at = path.read_text().split()
            except (OSError, ValueError):
                continue
            count += int(done)
            last = max(last, float(at))
        return count, last

    def counters(self) -> dict[str, int]:
        """The workers' counters summed (from their latest heartbeats, or the rows they
        left on stopping)."""
        total: dict[str, int] = {}
        for row in self.db.workers.find({}, {"counters": 1}):
            for name, value in (row.get("counters") or {}).items():
                total[name] = total.get(name, 0) + int(value)
        return total

    def controls(self) -> list[SimulatorControl]:
        """One control session per PBX, opened once (each login is an event for all)."""
        if not self._controls:
            self._controls = [s.control() for s in self.simulators]
        return self._controls

    def start_calls(self, calls: int = 0, rate: float | None = None) -> float:
        """Start ``calls`` calls on every PBX now, and/or set a rate of calls per second
        on each; returns the monotonic time it did."""
        headers: dict[str, str | int | float] = {"Count": calls}
        if rate is not None:
            headers["Rate"] = rate
        started = time.monotonic()
        for control in self.controls():
            reply = control.action("SimCalls", headers)
            assert reply.name == "Success", reply.text
        return started

    def events_sent(self) -> int:
        """Events the PBXs have written so far (each once, whatever the sessions)."""
        return sum(int(c.action("SimStats").get("EventsSent") or 0) for c in self.controls())

    def pids(self) -> dict[str, list[int]]:
        """Process ids by role, for CPU and memory accounting."""
        return {
            "nx-27017": [self.mongo.pid] if self.mongo.pid else [],
            "simulators": [s.process.pid for s in self.simulators if s.process],
            "workers": self.fleet.worker_pids() if self.fleet else [],
            "supervisor": [self.fleet.process.pid] if self.fleet and self.fleet.process else [],
        }

    def stop_fleet(self) -> None:
        if self.fleet is not None:
            with contextlib.suppress(TimeoutError):
                self.fleet.stop(timeout=60)

    def close(self) -> None:
        for control in self._controls:
            control.close()
        self._controls = []
        if self.fleet is not None:
            with contextlib.suppress(TimeoutError):
                self.fleet.stop(timeout=60)
        for simulator in self.simulators:
            simulator.stop()
        if self.client is not None:
            self.client.close()
        self.mongo.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


class CpuMeter:
    """CPU seconds used by groups of processes between :meth:`start` and :meth:`stop`,
    and by everything else on the machine ("other load": it shares the cores)."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self.groups["this script"] = [os.getpid()]
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}
        self.wall = 0.0
        self._t0 = 0.0

    def _sample(self) -> dict[str, float]:
        sample = {name: sum(map(cpu_seconds, pids)) for name, pids in self.groups.items()}
        sample["machine"] = machine_busy_seconds()
        return sample

    def start(self) -> CpuMeter:
        self._start = self._sample()
        self._t0 = time.monotonic()
        return self

    def stop(self) -> CpuMeter:
        end = self._sample()
        self.wall = time.monotonic() - self._t0
        used = {name: end[name] - self._start[name] for name in end}
        machine = used.pop("machine")
        used["other load"] = max(0.0, machine - sum(used.values()))
        self.used = used
        return self

    def report(self, cores: int | None = None) -> str:
        cores = cores or os.cpu_count() or 1
        parts = [
            f"{name} {seconds / self.wall:4.2f}" for name, seconds in self.used.items() if seconds
        ]
        busy = sum(self.used.values()) / self.wall
        return f"CPU (cores busy, of {cores}): " + ", ".join(parts) + f"; all {busy:4.2f}"
