"""pytest plugin: whole fleets as real processes, and what the end-to-end tests check with.

- ``RECORDING_HANDLERS``: a handler module that appends one line per invocation
  (server, event id or raw digest, event name, worker) to a file per process.
- ``recording_app``: a tmp app dir with that module, and the record dir.
- ``fleet_run`` (session): simulated PBXs + ``amiworker --workers 2`` with the
  example ``calls`` handlers + the session's nx-27017, after 20 calls per PBX;
  every process stopped, the database left for queries.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import textwrap
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pymongo import MongoClient

from amiworker.devstack.embedded_mongo import EmbeddedMongo
from amiworker.devstack.processes import FleetProcess, SimulatorProcess, wait_until
from amiworker.fleet.dedup import DedupKeys, races
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
CHANNEL_EVENTS_PER_CALL = 35  # of 39: DeviceStateChange (4) carries no Uniqueid

RECORDING_HANDLERS = textwrap.dedent(
    '''
    """Records every invocation: server, event id (or raw digest), event name, worker."""
    import hashlib
    import os

    OUT = os.environ["RECORD_DIR"]

    def _record(ctx, event):
        key = ctx.event_id or "local:" + hashlib.blake2b(event.raw, digest_size=16).hexdigest()
        line = f"{ctx.server} {key} {event.name} {ctx.worker_id}\\n"
        # One write of one short line to an O_APPEND file: whole, even if killed.
        path = os.path.join(OUT, f"{os.getpid()}.log")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    for _name in ("Newchannel", "Newexten", "VarSet", "NewCallerid", "NewConnectedLine",
                  "Newstate", "SoftHangupRequest", "HangupRequest", "Hangup", "LocalBridge",
                  "DialBegin", "DialEnd", "OriginateResponse", "DeviceStateChange"):
        globals()[_name + "Handler"] = _record
    '''
)


@dataclass(frozen=True)
class Invocation:
    server: str
    key: str
    event: str
    worker: str


def read_invocations(record_dir: Path) -> list[Invocation]:
    rows = []
    for path in record_dir.glob("*.log"):
        for line in path.read_text().splitlines():
            parts = line.split(" ")
            if len(parts) == 4:
                rows.append(Invocation(*parts))
    return rows


def channel_keys(simulator: SimulatorProcess) -> list[str]:
    """The dedup keys of every channel event the simulator sent, computed as workers do."""
    keys = DedupKeys(simulator.name, window=float("inf"))
    return [keys.key(m.raw, 0.0) for m in simulator.recorded_events() if races(m, "channel")]


@pytest.fixture
def recording_app(tmp_path: Path) -> tuple[Path, Path]:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "recording.py").write_text(RECORDING_HANDLERS)
    record_dir = tmp_path / "record"
    record_dir.mkdir()
    return app_dir, record_dir


def wait_connected(db: Any, workers: int, servers: list[str], timeout: float = 60.0) -> None:
    """Until ``workers`` heartbeats say they hold a session to every PBX."""
    everywhere: dict[str, bool | str] = {f"servers.{name}.connected": True for name in servers}
    everywhere["state"] = "running"
    wait_until(
        lambda: db.workers.count_documents(everywhere) >= workers,
        timeout,
        f"{workers} workers connected to {', '.join(servers)}",
        0.1,
    )


def pace_calls(simulators: list[SimulatorProcess], count: int, rate: float) -> None:
    """Start ``count`` calls on each simulator at ``rate`` calls/s (blocking)."""
    import time

    controls = [s.control() for s in simulators]
    try:
        started, since = 0, time.monotonic()
        while started < count:
            due = min(count, int((time.monotonic() - since) * rate) + 1)
            if due > started:
                for control in controls:
                    control.action("SimCalls", {"Count": due - started})
                started = due
            time.sleep(0.05)  # pacing the load, not waiting for a result
    finally:
        for control in controls:
            control.close()


@dataclass(frozen=True)
class FleetRun:
    mongo_uri: str
    database: str
    servers: list[str]
    calls_per_server: int
    workdir: Path


@pytest.fixture(scope="session")
def fleet_run(
    mongo_server: EmbeddedMongo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FleetRun]:
    workdir = tmp_path_factory.mktemp("fleet-run")
    calls, database = 20, "fleet_run"
    simulators = [SimulatorProcess(f"pbx{i}", workdir, duration=0.3) for i in (1, 2)]
    fleet: FleetProcess | None = None
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_server.uri)
    db = client[database]
    try:
        for simulator in simulators:
            simulator.start()
        fleet = FleetProcess(
            workdir / "fleet",
            servers=[s.server_setting() for s in simulators],
            mongo_uri=mongo_server.uri,
            database=database,
            workers=2,
            app_dir=REPO,
            extra_env={"AMIWORKER_HEARTBEAT_INTERVAL": "0.5", "AMIWORKER_LEASE": "5"},
        ).start()
        wait_connected(db, 2, [s.name for s in simulators])
        pace_calls(simulators, calls, rate=20)
        expected = calls * len(simulators)
        wait_until(
            lambda: (
                db.calls.count_documents({"end": {"$ne": None}}) >= expected
                and db.events.count_documents({"state": "done"})
                >= expected * CHANNEL_EVENTS_PER_CALL
            ),
            120,
            "every call of the fleet run stored, handled and projected",
            0.2,
        )
        assert fleet.stop() == 0, fleet.log_text()[-3000:]
        yield FleetRun(mongo_server.uri, database, [s.name for s in simulators], calls, workdir)
    finally:
        if fleet is not None:
            fleet.kill()
        for simulator in simulators:
            simulator.stop()
        client.close()


# -- fleets of the end-to-end tests ------------------------------------------------------


def recording_app_dirs(tmp_path: Path, extra: str = "") -> tuple[Path, Path]:
    """An app dir holding ``recording`` (RECORDING_HANDLERS, plus ``extra``: handlers
    that override, or a fault to inject) and the dir its runs are recorded in."""
    app_dir, record_dir = tmp_path / "app", tmp_path / "record"
    app_dir.mkdir(exist_ok=True)
    record_dir.mkdir(exist_ok=True)
    (app_dir / "recording.py").write_text(RECORDING_HANDLERS + textwrap.dedent(extra))
    return app_dir, record_dir


def recording_fleet(
    workdir: Path,
    servers: list[dict[str, object]],
    uri: str,
    database: str,
    workers: int,
    app_dirs: tuple[Path, Path],
    env: dict[str, str],
) -> FleetProcess:
    """``amiworker --workers N`` running the recording handlers, started."""
    app_dir, record_dir = app_dirs
    return FleetProcess(
        workdir,
        servers=servers,
        mongo_uri=uri,
        database=database,
        workers=workers,
        handlers=["recording"],
        app_dir=app_dir,
        extra_env={"RECORD_DIR": str(record_dir), **env},
    ).start()


def stored_ids(mongo: EmbeddedMongo, database: str) -> list[str]:
    """The ids of ``database``'s events, from a store a test's teardown stopped (its
    data stays on disk): started again, read, stopped."""
    mongo.start()
    try:
        client: MongoClient[dict[str, Any]] = MongoClient(mongo.uri)
        try:
            return [d["_id"] for d in client[database].events.find({}, {"_id": 1})]
        finally:
            client.close()
    finally:
        mongo.stop()


def runs_per_key(record_dir: Path) -> Counter[str]:
    """How many times each stored (raced) event was handled."""
    return Counter(r.key for r in read_invocations(record_dir) if not r.key.startswith("local:"))


# What a crash may cost: a re-run of what the killed worker had started, or had
# finished but not acked (within ack_delay). Bounded by its backlog, which a
# burst fills: the target, checked by the chaos tests of both claim modes.
RERUN_BOUND = 0.03
_PID_IN_WORKER_ID = re.compile(r"-w\d+-(\d+)-")


def reruns_held_by_killed(record_dir: Path, sent: list[str], killed: list[int]) -> int:
    """Check the re-runs a chaos run may cost: every stored event handled at least
    once, each one handled more than once held by a worker that was killed, and
    at most ``RERUN_BOUND`` of them. Returns how many ran more than once."""
    runs: dict[str, list[str]] = defaultdict(list)
    for run in read_invocations(record_dir):
        if not run.key.startswith("local:"):
            runs[run.key].append(run.worker)
    assert set(runs) == set(sent), "every channel event handled at least once"
    twice = {key: workers for key, workers in runs.items() if len(workers) > 1}
    for key, workers in twice.items():
        holders = {int(m.group(1)) for w in workers if (m := _PID_IN_WORKER_ID.search(w))}
        assert holders & set(killed), f"{key} ran {len(workers)} times, no killed worker held it"
    assert len(twice) <= RERUN_BOUND * len(sent), (
        f"{len(twice)} of {len(sent)} events ran more than once (bound {RERUN_BOUND:.0%})"
    )
    return len(twice)


def all_done(db: Any, expected: int) -> bool:
    """Every one of ``expected`` events stored and handled. Polled every second while
    a fleet drains: counting the whole collection each time would be most of the
    store's work (nx-27017 counts by reading every matching document), so the cheap
    questions go first and the full count runs once, at the end."""
    if db.events.estimated_document_count() < expected:
        return False
    if db.events.find_one({"state": {"$in": ["claimed", "queued", "failed"]}}, {"_id": 1}):
        return False
    return bool(db.events.count_documents({"state": "done"}) >= expected)


def rss_mib(pid: int) -> float:
    """A process's resident memory; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# -- driving a running fleet ---------------------------------------------------------


def set_rate(simulators: list[SimulatorProcess], rate: float) -> None:
    """New calls per second on each simulator (0: no new calls)."""
    for simulator in simulators:
        control = simulator.control()
        try:
            control.action("SimCalls", {"Rate": rate})
        finally:
            control.close()


def calls_finished(simulator: SimulatorProcess) -> bool:
    control = simulator.control()
    try:
        stats = control.action("SimStats")
    finally:
        control.close()
    return bool(stats["CallsStarted"] == stats["CallsCompleted"])


async def end_calls(simulators: list[SimulatorProcess], timeout: float = 30.0) -> list[str]:
    """Stop new calls and wait for those under way to end; returns the keys of every
    channel event the simulators sent (final from then on)."""
    set_rate(simulators, 0)
    await wait_for(lambda: all(calls_finished(s) for s in simulators), timeout, "the last calls")
    return [key for s in simulators for key in channel_keys(s)]


async def wait_all_done(
    db: Any, expected: int, timeout: float, what: str = "", interval: float = 0.5
) -> None:
    """Until ``expected`` events are stored and handled (:func:`all_done`)."""
    what = what or f"all {expected} channel events stored and handled"
    try:
        await wait_for(lambda: all_done(db, expected), timeout, what, interval=interval)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {where_events_are(db, expected)}") from None


def where_events_are(db: Any, expected: int) -> str:
    """What a timed-out wait found: how many were stored, in which state, held by whom."""
    states = {row["_id"]: row["n"] for row in db.events.aggregate(
        [{"$group": {"_id": "$state", "n": {"$sum": 1}}}]
    )}  # fmt: skip
    held = [
        (doc["_id"], doc.get("state"), doc.get("claimed_by"), doc.get("event"))
        for doc in db.events.find(
            {"state": {"$ne": "done"}}, {"state": 1, "claimed_by": 1, "event": 1}
        ).limit(5)
    ]
    workers = [
        (row["_id"], row.get("state"), row.get("last_seen"))
        for row in db.workers.find({}, {"state": 1, "last_seen": 1})
    ]
    return (
        f"{sum(states.values())} of {expected} stored, by state {states}; "
        f"not done (first 5): {held}; workers: {workers}"
    )


async def kill_every(fleet: FleetProcess, seconds: float, interval: float, seed: int) -> list[int]:
    """The chaos schedule: for ``seconds``, SIGKILL a random worker every ``interval``
    seconds; returns the pids killed."""
    rng = random.Random(seed)
    killed: list[int] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(interval)  # the schedule itself: one kill per interval
        pids = fleet.worker_pids()
        if pids:
            victim = rng.choice(pids)
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
    return killed


def missing_only_in_gap(simulator: SimulatorProcess, db: Any) -> int | None:
    """How many channel events are missing, if they are exactly those sent while no
    worker was connected: from the first missing one to the first login after it.
    None if some other event is missing (not stored yet, or lost)."""
    keys = DedupKeys(simulator.name, window=float("inf"))
    stored = {d["_id"] for d in db.events.find({}, {"_id": 1})}
    stream = simulator.recorded_events()
    channel = [(i, keys.key(m.raw, 0.0)) for i, m in enumerate(stream) if races(m, "channel")]
    missing = [i for i, key in channel if key not in stored]
    if not missing:
        return 0
    logins = [i for i, m in enumerate(stream) if i > missing[0] and m.name == "SuccessfulAuth"]
    if not logins:
        return None
    in_gap = [i for i, _ in channel if missing[0] <= i < logins[0]]
    return len(missing) if missing == in_gap else None


def metrics_base(workers: int) -> int:
    """A port p with p .. p+workers-1 free right now (worker N serves on base + N)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base: int = probe.getsockname()[1]
        try:
            for port in range(base, base + workers):
                with socket.socket() as sock:
                    sock.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {workers} consecutive free ports")


def worker_counter(port: int, name: str) -> tuple[str, float]:
    """(worker label, value of the counter ``name``) from a worker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.labels["worker"], sample.value
    raise AssertionError(f"no {name} on port {port}")
