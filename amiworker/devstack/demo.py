"""`amiworker demo`: the whole point, on one machine, in a minute.

Starts an embedded MongoDB (nx-27017), two simulated PBXs making calls,
``amiworker --workers 4`` with the example handlers and the call board
(``amiworker board``, its URL printed), shows a live progress line, then stops
everything and prints a summary that checks the promise:
every channel event the PBXs sent is stored exactly once and handled exactly
once, and the example ``calls`` projection has every call. ``--linger``
keeps the call board (and the store it reads) up after the summary, until
Ctrl-C.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pymongo import MongoClient

from amiworker.devstack.board_process import BoardProcess
from amiworker.devstack.embedded_mongo import EmbeddedMongo, free_port
from amiworker.devstack.processes import FleetProcess, SimulatorProcess, wait_until
from amiworker.fleet.dedup import DedupKeys, races

__all__ = ["run_demo"]

DATABASE = "amiworker_demo"
# Seconds the demo waits, after the last call, for the fleet to catch up.
_SETTLE_TIMEOUT = 60.0


def _handlers_dir() -> Path:
    """Where the example handlers are: the working directory, else beside the package."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (candidate / "handlers" / "calls.py").exists():
            return candidate
    raise SystemExit(
        "amiworker demo: the example handlers (handlers/calls.py) were not found; "
        "run the demo from the amiworker repository"
    )


def run_demo(args: argparse.Namespace) -> int:
    app_dir = _handlers_dir()
    keep = args.data_dir is not None
    workdir = Path(args.data_dir or tempfile.mkdtemp(prefix="amiworker-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"amiworker demo: {args.pbxs} simulated PBXs x {args.calls} calls, {args.workers} workers"
    )
    print(f"  working files in {workdir}")
    mongo = EmbeddedMongo(workdir / "mongo")
    simulators = [
        SimulatorProcess(
            f"pbx{i + 1}",
            workdir,
            duration=1.0,
        )
        for i in range(args.pbxs)
    ]
    fleet: FleetProcess | None = None
    board: BoardProcess | None = None
    try:
        mongo.start()
        print(f"  embedded MongoDB (nx-27017) at {mongo.uri}, database {DATABASE}")
        client: MongoClient[dict[str, Any]] = MongoClient(mongo.uri)
        client.drop_database(DATABASE)
        for simulator in simulators:
            simulator.start()
            print(f"  simulated PBX {simulator.name} on 127.0.0.1:{simulator.port}")
        fleet = FleetProcess(
            workdir,
            servers=[s.server_setting() for s in simulators],
            mongo_uri=mongo.uri,
            database=DATABASE,
            workers=args.workers,
            app_dir=app_dir,
        ).start()
        print(f"  amiworker --workers {args.workers} (log: {fleet.log_path})")
        print(f"  the fleet: amiworker status --mongo-uri {mongo.uri} --database {DATABASE}")
        db = client[DATABASE]
        _wait_connected(db, fleet, args.workers, [s.name for s in simulators])
        if args.board_port is not None:
            board = _start_board(workdir, mongo.uri, args.board_port)
        print("  every worker holds a session to every PBX: calls start now\n")
        expected_calls = args.calls * args.pbxs
        driver = _CallDriver(simulators, args.calls, args.calls_per_second)
        # Calls take (calls / rate) seconds to start, then a few seconds to settle.
        budget = args.calls / max(args.calls_per_second, 0.1) + _SETTLE_TIMEOUT
        try:
            _watch(db, fleet, driver, expected_calls, budget)
        finally:
            driver.close()
        code = fleet.stop()
        print(f"\n  amiworker stopped gracefully (exit status {code})")
        result = _summary(client[DATABASE], simulators, expected_calls, code)
        if board is not None and args.linger:
            _linger(board)
        return result
    except (TimeoutError, RuntimeError) as exc:
        print(f"\namiworker demo: {exc}", file=sys.stderr)
        if fleet is not None:
            print(fleet.log_text()[-3000:], file=sys.stderr)
        return 1
    finally:
        if board is not None:
            board.stop()
        if fleet is not None:
            fleet.stop()  # nothing to do if it has exited
        for simulator in simulators:
            simulator.stop()
        mongo.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _start_board(workdir: Path, mongo_uri: str, port: int) -> BoardProcess | None:
    """``amiworker board`` on ``port`` (or any free one if it is taken); None if it
    cannot start (the demo goes on without it)."""
    if port:
        try:
            with socket.create_server(("127.0.0.1", port)):
                pass
        except OSError:
            port = free_port()
    board = BoardProcess(workdir / "board", mongo_uri=mongo_uri, database=DATABASE, port=port)
    try:
        board.start()
    except (RuntimeError, TimeoutError) as exc:
        print(f"  the call board did not start: {str(exc).splitlines()[0]}")
        board.stop()
        return None
    print(f"  call board: {board.url}/  (open it: the calls go by live)")
    return board


def _linger(board: BoardProcess) -> None:
    print(f"\nthe call board stays up at {board.url}/ until Ctrl-C")
    try:
        while board.process is not None and board.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print()


def _progress(db: Any) -> dict[str, int]:
    workers = list(db.workers.find({}, {"counters": 1}))
    seen = sum(w.get("counters", {}).get("events_seen", 0) for w in workers)
    return {
        "workers": len(workers),
        "seen": seen,
        "stored": db.events.estimated_document_count(),
        "done": db.events.count_documents({"state": "done"}),
        "calls": db.calls.count_documents({"end": {"$ne": None}}),
    }


def _wait_connected(db: Any, fleet: FleetProcess, workers: int, servers: list[str]) -> None:
    def connected() -> bool:
        _check_alive(fleet)
        everywhere = {f"servers.{name}.connected": True for name in servers}
        return bool(db.workers.count_documents(everywhere) >= workers)

    wait_until(connected, 60.0, "every worker to connect to every PBX", 0.2)


def _check_alive(fleet: FleetProcess) -> None:
    assert fleet.process is not None
    if fleet.process.poll() is not None:
        raise RuntimeError(f"amiworker exited with status {fleet.process.returncode}")


class _CallDriver:
    """Starts calls on every simulator at the demo's rate, a few at each tick."""

    def __init__(self, simulators: list[SimulatorProcess], calls: int, rate: float) -> None:
        self._controls = [s.control() for s in simulators]
        self._calls = calls
        self._rate = rate
        self._started = 0
        self._since = time.monotonic()

    def tick(self) -> None:
        due = min(self._calls, int((time.monotonic() - self._since) * self._rate) + 1)
        if due > self._started:
            for control in self._controls:
                control.action("SimCalls", {"Count": due - self._started})
            self._started = due

    def close(self) -> None:
        for control in self._controls:
            control.close()


def _watch(
    db: Any, fleet: FleetProcess, driver: _CallDriver, expected_calls: int, budget: float
) -> None:
    tty = sys.stdout.isatty()
    last_line = 0.0

    def finished() -> bool:
        nonlocal last_line
        _check_alive(fleet)
        driver.tick()
        p = _progress(db)
        line = (
            f"  events seen {p['seen']:>7}  stored {p['stored']:>6}  "
            f"handled {p['done']:>6}  calls complete {p['calls']:>4}/{expected_calls}"
        )
        if tty:
            print("\r" + line, end="", flush=True)
        elif time.monotonic() - last_line >= 5.0:
            print(line, flush=True)
            last_line = time.monotonic()
        return p["calls"] >= expected_calls and p["stored"] == p["done"]

    wait_until(finished, budget, "every call to be stored, handled and projected", 0.25)
    if tty:
        print()


def _summary(
    db: Any, simulators: list[SimulatorProcess], expected_calls: int, exit_code: int
) -> int:
    print("\nsummary")
    ok = exit_code == 0
    total_sent = 0
    for simulator in simulators:
        keys = DedupKeys(simulator.name, window=float("inf"))
        sent = [keys.key(m.raw, 0.0) for m in simulator.recorded_events() if races(m, "channel")]
        stored = {d["_id"] for d in db.events.find({"server": simulator.name}, {"_id": 1})}
        missing = [k for k in sent if k not in stored]
        extra = stored - set(sent)
        total_sent += len(sent)
        good = not missing and not extra and len(set(sent)) == len(sent)
        ok &= good
        print(
            f"  {simulator.name}: {len(sent)} channel events sent, {len(stored)} stored "
            f"({len(missing)} missing, {len(extra)} unexpected) -> "
            f"{'each exactly once' if good else 'MISMATCH'}"
        )
    states = Counter(d["state"] for d in db.events.find({}, {"state": 1}))
    rerun = db.events.count_documents({"attempts": {"$gt": 0}})
    handled_ok = states.get("done", 0) == total_sent and rerun == 0
    ok &= handled_ok
    print(
        f"  handlers: {states.get('done', 0)} events done, {rerun} run more than once, "
        f"{states.get('failed', 0) + states.get('dead', 0)} failed -> "
        f"{'each handled exactly once' if handled_ok else 'MISMATCH'}"
    )
    won = {w["_id"]: w.get("counters", {}).get("races_won", 0) for w in db.workers.find()}
    if won:
        shares = ", ".join(str(n) for n in sorted(won.values(), reverse=True))
        print(f"  races won per worker: {shares} (sum {sum(won.values())})")
    calls = list(db.calls.find({}, {"duration": 1, "hangup_cause_txt": 1, "end": 1}))
    complete = [c for c in calls if c.get("end") is not None]
    causes = Counter(c.get("hangup_cause_txt") for c in complete)
    calls_ok = len(complete) == expected_calls
    ok &= calls_ok
    durations = [c["duration"] for c in complete if c.get("duration") is not None]
    mean = sum(durations) / len(durations) if durations else 0.0
    print(
        f"  calls projection: {len(complete)}/{expected_calls} calls complete, mean duration "
        f"{mean:.2f} s, hangup causes {dict(causes)}"
    )
    print(f"\n{'PASS' if ok else 'FAIL'}: exactly-once {'holds' if ok else 'does NOT hold'}")
    return 0 if ok else 1
