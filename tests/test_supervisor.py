"""`amiworker --workers N` as an operator drives it: start, stop, stop now, the demo."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from amiworker.devstack.embedded_mongo import EmbeddedMongo
from amiworker.devstack.processes import FleetProcess, SimulatorProcess
from tests.fleet_plugin import REPO, pace_calls, wait_connected
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

# A handler that takes its time on every Hangup: a stop must wait for it (up to
# shutdown_timeout), or give up at once on a second signal.
SLOW_HANDLERS = textwrap.dedent(
    """
    import asyncio, os

    async def HangupHandler(ctx, event):
        open(os.path.join(os.environ["RECORD_DIR"], "started"), "a").write("x\\n")
        await asyncio.sleep(float(os.environ["HANDLER_SECONDS"]))
        open(os.path.join(os.environ["RECORD_DIR"], "finished"), "a").write("x\\n")
    """
)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def start_slow_fleet(
    tmp_path: Path, mongo: EmbeddedMongo, database: str, handler_seconds: float, started: int
) -> tuple[FleetProcess, SimulatorProcess, Any]:
    app = tmp_path / "app"
    app.mkdir()
    (app / "slow.py").write_text(SLOW_HANDLERS)
    simulator = SimulatorProcess("pbx1", tmp_path, duration=0.2).start()
    fleet = FleetProcess(
        tmp_path / "fleet",
        servers=[simulator.server_setting()],
        mongo_uri=mongo.uri,
        database=database,
        workers=2,
        handlers=["slow"],
        app_dir=app,
        extra_env={
            "RECORD_DIR": str(tmp_path),
            "HANDLER_SECONDS": str(handler_seconds),
            "AMIWORKER_SHUTDOWN_TIMEOUT": "20",
        },
    ).start()
    db: Any = MongoClient(mongo.uri)[database]
    await asyncio.to_thread(wait_connected, db, 2, ["pbx1"])
    await asyncio.to_thread(pace_calls, [simulator], 3, 10)
    await wait_for(lambda: lines(tmp_path / "started") >= started, 30, "the slow handlers to start")
    return fleet, simulator, db


async def test_sigterm_lets_running_handlers_finish_then_exits_0(
    tmp_path: Path, mongo_server: EmbeddedMongo
) -> None:
    fleet, simulator, db = await start_slow_fleet(tmp_path, mongo_server, "stop_graceful", 2.0, 6)
    try:
        assert fleet.process is not None
        fleet.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(fleet.process.wait, 40)
    finally:
        simulator.stop()
    assert code == 0
    assert lines(tmp_path / "finished") == lines(tmp_path / "started") == 6
    assert db.events.count_documents({"event": "Hangup", "state": "done"}) == 6
    log = fleet.log_text()
    assert "stopping the workers gracefully" in log and "all workers stopped" in log
    assert db.workers.count_documents({"state": "stopped"}) == 2


async def test_a_second_signal_stops_at_once(tmp_path: Path, mongo_server: EmbeddedMongo) -> None:
    fleet, simulator, _ = await start_slow_fleet(tmp_path, mongo_server, "stop_now", 600.0, 3)
    try:
        assert fleet.process is not None
        fleet.process.send_signal(signal.SIGTERM)
        await wait_for(
            lambda: "stopping: no new claims" in fleet.log_text(), 10, "the graceful stop to begin"
        )
        workers = fleet.worker_pids()
        assert len(workers) == 2
        started = time.monotonic()
        fleet.process.send_signal(signal.SIGINT)
        await asyncio.to_thread(fleet.process.wait, 20)
        assert time.monotonic() - started < 10
    finally:
        simulator.stop()
    assert lines(tmp_path / "finished") == 0
    assert "second signal" in fleet.log_text()
    # Nothing is left behind: the workers were killed with the supervisor.
    await wait_for(lambda: not any(alive(pid) for pid in workers), 10, "no worker left")


async def test_workers_stop_when_their_supervisor_is_killed_outright(
    tmp_path: Path, mongo_server: EmbeddedMongo
) -> None:
    """SIGKILL (or the OOM killer) gives the supervisor no chance to stop its workers:
    they stop themselves, gracefully, rather than run on unsupervised."""
    fleet, simulator, db = await start_slow_fleet(tmp_path, mongo_server, "orphans", 1.0, 2)
    try:
        workers = fleet.worker_pids()
        assert len(workers) == 2 and fleet.process is not None
        fleet.process.kill()
        await asyncio.to_thread(fleet.process.wait, 10)
        await wait_for(lambda: not any(alive(pid) for pid in workers), 40, "the workers to stop")
    finally:
        simulator.stop()
    log = fleet.log_text()
    assert log.count("amiworker.worker: stopped:") == 2
    assert db.workers.count_documents({"state": "stopped"}) == 2


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_readme_demo_command_shows_exactly_once(tmp_path: Path) -> None:
    """What the README promises a new user (with fewer calls, to keep the suite fast)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "amiworker.cli",
            "demo",
            "--calls",
            "15",
            "--calls-per-second",
            "15",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "each exactly once" in result.stdout
    assert "each handled exactly once" in result.stdout
    assert "30/30 calls complete" in result.stdout
    assert "PASS: exactly-once holds" in result.stdout
    assert "call board: http://127.0.0.1:" in result.stdout
    assert list(tmp_path.iterdir()) == [], "the demo leaves no files behind"
