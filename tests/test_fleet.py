"""The mission, end to end: real worker processes, real simulated PBXs, a real MongoDB server.

Workers each hold a session to every PBX; every channel event must be stored
exactly once and handled exactly once, every other event handled by every
worker, and a worker that loses its AMI connection for a while loses nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from amiworker.devstack.embedded_mongo import EmbeddedMongo
from amiworker.devstack.processes import FleetProcess, SimulatorProcess
from tests.fleet_plugin import (
    CHANNEL_EVENTS_PER_CALL,
    channel_keys,
    pace_calls,
    read_invocations,
    wait_connected,
)
from tests.tcp_proxy import TcpProxy
from tests.waiting import wait_for

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["race", "hedged"])
async def test_four_workers_two_pbxs_store_and_handle_each_channel_event_once(
    mode: str, tmp_path: Path, recording_app: tuple[Path, Path], mongo_server: EmbeddedMongo
) -> None:
    app_dir, record_dir = recording_app
    calls = 300
    simulators = [SimulatorProcess(f"pbx{i}", tmp_path, duration=0.5).start() for i in (1, 2)]
    fleet = FleetProcess(
        tmp_path / "fleet",
        servers=[s.server_setting() for s in simulators],
        mongo_uri=mongo_server.uri,
        database=f"fleet_once_{mode}",
        workers=4,
        handlers=["recording"],
        app_dir=app_dir,
        extra_env={"RECORD_DIR": str(record_dir), "AMIWORKER_CLAIM_MODE": mode},
    ).start()
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_server.uri)
    db = client[f"fleet_once_{mode}"]
    try:
        # Calls start once every worker sees every PBX, so every worker sees every event.
        await asyncio.to_thread(wait_connected, db, 4, ["pbx1", "pbx2"])
        await asyncio.to_thread(pace_calls, simulators, calls, 100)
        await wait_for(
            lambda: (
                db.events.count_documents({"state": "done"}) >= calls * 2 * CHANNEL_EVENTS_PER_CALL
            ),
            timeout=300,
            what="every channel event stored and handled",
            interval=0.5,
        )
        # Events of no channel go straight to every worker's handlers, which may still
        # be running them: a stop drops what has not started (nothing to release).
        await wait_for(
            lambda: local_runs_or_dropped(record_dir, db) >= calls * 2 * 4 * 4,
            timeout=60,
            what="every DeviceStateChange run by every worker (or counted dropped)",
            interval=0.5,
        )
        assert fleet.stop() == 0
    finally:
        fleet.kill()
        for simulator in simulators:
            simulator.stop()

    expected: set[str] = set()
    for simulator in simulators:
        # Recomputed from what the PBX really sent: stored exactly once, none missing.
        sent = channel_keys(simulator)
        stored = [d["_id"] for d in db.events.find({"server": simulator.name}, {"_id": 1})]
        assert len(sent) == len(set(sent)) == calls * CHANNEL_EVENTS_PER_CALL
        assert sorted(stored) == sorted(sent)
        expected |= set(sent)

    runs = read_invocations(record_dir)
    channel_runs = Counter(r.key for r in runs if not r.key.startswith("local:"))
    assert set(channel_runs) == expected
    assert set(channel_runs.values()) == {1}, "a channel event was handled more than once"
    # DeviceStateChange (no Uniqueid) is handled by every worker: 4 runs each. The
    # runs are keyed by the event's bytes, and two events can be byte-identical (the
    # same state twice in one microsecond): counted as the PBX sent them.
    local_runs = Counter((r.server, r.key) for r in runs if r.key.startswith("local:"))
    local_sent = Counter(
        (simulator.name, "local:" + hashlib.blake2b(m.raw, digest_size=16).hexdigest())
        for simulator in simulators
        for m in simulator.recorded_events()
        if m.name == "DeviceStateChange"
    )
    assert sum(local_sent.values()) == calls * 2 * 4
    assert set(local_runs) == set(local_sent)
    assert all(local_runs[key] <= 4 * n for key, n in local_sent.items()), "run twice"
    # Every worker runs each one, except what a worker had no backlog room for: those
    # are dropped, counted and logged (they cannot wait in MongoDB). Nothing else.
    missing = sum(4 * n - local_runs[key] for key, n in local_sent.items())
    assert missing == fleet_dropped(db), "local events missing that no worker counted dropped"
    assert len({r.worker for r in runs}) == 4
    assert db.events.count_documents({"attempts": {"$gt": 0}}) == 0
    totals = Counter[str]()
    for row in db.workers.find({}, {"counters": 1, "mode": 1}):
        assert row["mode"] == mode
        totals.update(row["counters"])
    inserts = (totals["races_won"] + totals["races_lost"]) / totals["races_won"]
    print(
        f"\n{mode}: {len(expected)} channel events, {inserts:.2f} inserts per stored event; "
        f"owned {totals['owned']}, hedged {totals['hedged']}, covered {totals['covered']}; "
        f"{missing} local runs dropped (handler backlog full)"
    )
    if mode == "hedged":
        assert inserts <= 1.1
        assert totals["owned"] + totals["hedged"] >= len(expected)


def fleet_dropped(db: Any) -> int:
    return sum(int((row.get("counters") or {}).get("dropped", 0)) for row in db.workers.find())


def local_runs_or_dropped(record_dir: Path, db: Any) -> int:
    runs = sum(1 for r in read_invocations(record_dir) if r.key.startswith("local:"))
    return runs + fleet_dropped(db)


async def test_a_worker_whose_ami_connection_is_cut_loses_nothing(
    tmp_path: Path, recording_app: tuple[Path, Path], mongo_server: EmbeddedMongo
) -> None:
    """One worker reaches the PBX through a proxy that the test cuts for 3 s mid-run;
    the other workers' claims cover what it missed."""
    app_dir, record_dir = recording_app
    calls = 150
    simulator = SimulatorProcess("pbx1", tmp_path, duration=0.5).start()
    proxy = await TcpProxy(simulator.port).start()
    direct = simulator.server_setting()
    proxied = {**direct, "port": proxy.port}
    database = "fleet_cut"
    env = {
        "RECORD_DIR": str(record_dir),
        "AMIWORKER_RECONNECT_MIN": "0.1",
        "AMIWORKER_RECONNECT_MAX": "0.5",
    }
    fleets = [
        FleetProcess(
            tmp_path / name,
            servers=[servers],
            mongo_uri=mongo_server.uri,
            database=database,
            workers=workers,
            handlers=["recording"],
            app_dir=app_dir,
            extra_env=env,
        ).start()
        for name, servers, workers in (("cut", proxied, 1), ("direct", direct, 2))
    ]
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_server.uri)
    db = client[database]
    try:
        await asyncio.to_thread(wait_connected, db, 3, ["pbx1"])
        calls_done = asyncio.create_task(asyncio.to_thread(pace_calls, [simulator], calls, 50))
        await wait_for(lambda: db.events.estimated_document_count() > 1000, 60, "calls flowing")
        proxy.cut()
        await wait_for(
            lambda: "pbx1" in fleets[0].log_text() and "lost" in fleets[0].log_text(),
            10,
            "the cut worker to notice",
        )
        await asyncio.sleep(3)  # the outage itself: the point of the test is its length
        proxy.restore()
        await calls_done
        await wait_for(
            lambda: db.events.count_documents({"state": "done"}) >= calls * CHANNEL_EVENTS_PER_CALL,
            timeout=180,
            what="every channel event stored and handled",
            interval=0.5,
        )
        await wait_for(lambda: proxy.accepted >= 2, 30, "the cut worker to reconnect")
        # Logged in again (accepted is only the TCP connection): its session is back.
        await wait_for(
            lambda: "back after" in fleets[0].log_text(), 30, "the cut worker's session back"
        )
        for fleet in fleets:
            assert fleet.stop() == 0
    finally:
        for fleet in fleets:
            fleet.kill()
        await proxy.close()
        simulator.stop()

    sent = channel_keys(simulator)
    stored = [d["_id"] for d in db.events.find({}, {"_id": 1})]
    assert sorted(stored) == sorted(sent)
    runs = Counter(r.key for r in read_invocations(record_dir) if not r.key.startswith("local:"))
    assert set(runs) == set(sent)
    assert set(runs.values()) == {1}
    cut_log = fleets[0].log_text()
    assert sum("lost" in line and "pbx1" in line for line in cut_log.splitlines()) == 1
    assert sum("is back" in line or "back after" in line for line in cut_log.splitlines()) >= 1
