"""Hedged mode under faults: a cut or silently stalled AMI connection, workers killed
every 2 s, a PBX dropping every session. Nothing lost beyond what was sent while
no worker was connected, nothing stored twice; how many events were hedged, and
how late, printed.

Real processes: simulated PBXs, ``amiworker --workers N`` with
``AMIWORKER_CLAIM_MODE=hedged``, nx-27017.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from amiworker.devstack.embedded_mongo import EmbeddedMongo
from amiworker.devstack.processes import FleetProcess, SimulatorProcess
from tests.fleet_plugin import (
    RERUN_BOUND,
    end_calls,
    kill_every,
    missing_only_in_gap,
    recording_app_dirs,
    recording_fleet,
    reruns_held_by_killed,
    runs_per_key,
    set_rate,
    wait_all_done,
    wait_connected,
)
from tests.tcp_proxy import TcpProxy
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

HEDGED = {
    "AMIWORKER_CLAIM_MODE": "hedged",
    "AMIWORKER_HEARTBEAT_INTERVAL": "0.5",
    "AMIWORKER_LEASE": "6",
    "AMIWORKER_RECONNECT_MIN": "0.1",
    "AMIWORKER_RECONNECT_MAX": "1",
    "AMIWORKER_CONNECT_TIMEOUT": "2",
    "AMIWORKER_PING_INTERVAL": "1",
    "AMIWORKER_PING_TIMEOUT": "2",
}


def fleet(
    workdir: Path,
    servers: list[dict[str, object]],
    uri: str,
    database: str,
    workers: int,
    app_dirs: tuple[Path, Path],
) -> FleetProcess:
    return recording_fleet(workdir, servers, uri, database, workers, app_dirs, HEDGED)


def hedging_figures(db: Any) -> str:
    counters: Counter[str] = Counter()
    late: list[float] = []
    typical: list[float] = []
    for row in db.workers.find({}, {"counters": 1, "hedging": 1}):
        counters.update(row.get("counters") or {})
        info = row.get("hedging") or {}
        if info.get("hedge_late_max") is not None:
            late.append(float(info["hedge_late_max"]))
            typical.append(float(info["hedge_late_p50"]))
    won, lost = counters["races_won"], counters["races_lost"]
    return (
        f"owned {counters['owned']}, hedged {counters['hedged']}, of which "
        f"{counters['hedges_won']} stored their event (median "
        f"{min(typical, default=0.0):.1f}-{max(typical, default=0.0):.1f} s after receipt "
        f"per worker, latest {max(late, default=0.0):.1f} s), covered "
        f"{counters['covered']}; {(won + lost) / max(won, 1):.2f} inserts per stored event"
    )


def check_exactly_once(db: Any, sent: list[str], record_dir: Path) -> Counter[str]:
    stored = [d["_id"] for d in db.events.find({}, {"_id": 1})]
    assert sorted(stored) == sorted(sent), "each stored once, none missing"
    runs = runs_per_key(record_dir)
    assert set(runs) == set(sent), "each handled"
    return runs


@pytest.mark.parametrize("fault", ["cut", "stall"])
async def test_a_worker_cut_off_or_stalled_for_5s_loses_nothing(
    fault: str, tmp_path: Path, mongo_server: EmbeddedMongo
) -> None:
    """One worker reaches the PBX through a proxy that is cut (closed) or stalled
    (stops forwarding without closing) for 5 s mid-run; two reach it directly."""
    app_dirs = recording_app_dirs(tmp_path)
    simulator = SimulatorProcess("pbx1", tmp_path, duration=0.5).start()
    proxy = await TcpProxy(simulator.port).start()
    direct = simulator.server_setting()
    database = f"hedged_{fault}"
    hosts = [
        fleet(tmp_path / "proxied", [{**direct, "port": proxy.port}], mongo_server.uri,
              database, 1, app_dirs),
        fleet(tmp_path / "direct", [direct], mongo_server.uri, database, 2, app_dirs),
    ]  # fmt: skip
    db: Any = MongoClient(mongo_server.uri)[database]
    try:
        await asyncio.to_thread(wait_connected, db, 3, ["pbx1"])
        set_rate([simulator], 10)
        await wait_for(lambda: db.events.estimated_document_count() > 500, 60, "calls flowing")
        proxy.cut() if fault == "cut" else proxy.stall()
        await asyncio.sleep(5)  # the fault itself: its length is the point
        proxy.restore() if fault == "cut" else proxy.resume()
        await asyncio.sleep(2)  # calls after it
        sent = await end_calls([simulator])
        await wait_all_done(db, len(sent), 60, interval=0.25)
        figures = hedging_figures(db)
        for host in hosts:
            assert host.stop() == 0
    finally:
        for host in hosts:
            host.kill()
        await proxy.close()
        simulator.stop()

    runs = check_exactly_once(db, sent, app_dirs[1])
    assert set(runs.values()) == {1}, "nothing handled twice"
    print(f"\nhedged, {fault} 5 s: {len(sent)} channel events, 0 lost; {figures}")


async def test_a_worker_killed_every_2s_loses_nothing(
    tmp_path: Path, mongo_server: EmbeddedMongo
) -> None:
    app_dirs = recording_app_dirs(tmp_path)
    simulators = [SimulatorProcess(f"pbx{i}", tmp_path, duration=0.5).start() for i in (1, 2)]
    servers = [s.server_setting() for s in simulators]
    host = fleet(tmp_path / "fleet", servers, mongo_server.uri, "hedged_kill", 4, app_dirs)
    db: Any = MongoClient(mongo_server.uri)["hedged_kill"]
    try:
        await asyncio.to_thread(wait_connected, db, 4, ["pbx1", "pbx2"])
        set_rate(simulators, 5)
        killed = await kill_every(host, seconds=20, interval=2, seed=12)
        sent = await end_calls(simulators)
        await wait_all_done(db, len(sent), 60, interval=0.25)
        figures = hedging_figures(db)
        assert host.stop() == 0
    finally:
        host.kill()
        for simulator in simulators:
            simulator.stop()

    assert len(killed) >= 9
    check_exactly_once(db, sent, app_dirs[1])
    twice = reruns_held_by_killed(app_dirs[1], sent, killed)
    print(
        f"\nhedged, a worker killed every 2 s: {len(sent)} channel events, 0 lost, "
        f"{twice} run twice = {twice / len(sent):.2%} (bound {RERUN_BOUND:.0%}), each held "
        f"by a killed worker; {figures}"
    )


async def test_a_pbx_dropping_every_session_loses_only_the_gap(
    tmp_path: Path, mongo_server: EmbeddedMongo
) -> None:
    app_dirs = recording_app_dirs(tmp_path)
    simulator = SimulatorProcess("pbx1", tmp_path, duration=0.5).start()
    host = fleet(
        tmp_path / "fleet", [simulator.server_setting()], mongo_server.uri, "hedged_drop", 3,
        app_dirs,
    )  # fmt: skip
    db: Any = MongoClient(mongo_server.uri)["hedged_drop"]
    try:
        await asyncio.to_thread(wait_connected, db, 3, ["pbx1"])
        set_rate([simulator], 10)
        await wait_for(lambda: db.events.estimated_document_count() > 500, 60, "calls flowing")
        control = simulator.control()
        assert control.action("SimDropSessions").name == "Success"
        control.close()
        await wait_for(lambda: host.log_text().count("AMI session back after") >= 3, 15, "all back")
        await asyncio.sleep(2)  # calls after the restart
        await end_calls([simulator])
        await wait_for(
            lambda: (
                missing_only_in_gap(simulator, db) is not None
                and db.events.count_documents({"state": {"$ne": "done"}}) == 0
            ),
            60,
            "every event sent while a worker was connected, stored and done",
            interval=0.5,
        )
        figures = hedging_figures(db)
        assert host.stop() == 0
    finally:
        host.kill()
        simulator.stop()

    missing = missing_only_in_gap(simulator, db)
    assert missing is not None
    stored = [d["_id"] for d in db.events.find({}, {"_id": 1})]
    assert len(stored) == len(set(stored))
    runs = runs_per_key(app_dirs[1])
    assert set(runs) == set(stored) and set(runs.values()) == {1}
    assert re.search(r"AMI session back after", host.log_text())
    print(
        f"\nhedged, PBX dropping every session: {len(stored)} stored, {missing} sent while no "
        f"worker was connected; {figures}"
    )
