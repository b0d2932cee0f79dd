"""The mission, end to end: real worker processes, real simulated PBXs, a real MongoDB server.

4 workers each hold a session to 2 PBXs; every channel event must be stored
exactly once and handled exactly once, every other event handled by every
worker.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from amiworker.dedup import DedupKeys, races
from amiworker.devstack import FleetProcess, SimulatorProcess
from amiworker.embedded_mongo import EmbeddedMongo
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

# Handler module used by the fleet tests: records every invocation to a file per
# worker process (one line each), so the test can count runs per event.
RECORDING_HANDLERS = textwrap.dedent(
    '''
    """Records every invocation: server, event id (or raw digest), event name, worker."""
    import hashlib
    import os

    OUT = os.environ["RECORD_DIR"]

    async def _record(ctx, event):
        key = ctx.event_id or "local:" + hashlib.blake2b(event.raw, digest_size=16).hexdigest()
        with open(os.path.join(OUT, f"{os.getpid()}.log"), "a") as out:
            out.write(f"{ctx.server} {key} {event.name} {ctx.worker_id}\\n")

    for _name in ("Newchannel", "Newexten", "VarSet", "NewCallerid", "NewConnectedLine",
                  "Newstate", "SoftHangupRequest", "HangupRequest", "Hangup", "LocalBridge",
                  "DialBegin", "DialEnd", "OriginateResponse", "DeviceStateChange"):
        globals()[_name + "Handler"] = _record
    '''
)


def read_invocations(record_dir: Path) -> list[tuple[str, str, str, str]]:
    rows = []
    for path in record_dir.glob("*.log"):
        for line in path.read_text().splitlines():
            server, key, name, worker = line.split(" ")
            rows.append((server, key, name, worker))
    return rows


def channel_keys(simulator: SimulatorProcess) -> list[str]:
    keys = DedupKeys(simulator.name, window=float("inf"))
    return [keys.key(m.raw, 0.0) for m in simulator.recorded_events() if races(m, "channel")]


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "app"
    directory.mkdir()
    (directory / "recording.py").write_text(RECORDING_HANDLERS)
    (tmp_path / "record").mkdir()
    return directory


async def test_four_workers_two_pbxs_store_and_handle_each_channel_event_once(
    tmp_path: Path, app_dir: Path, mongo_server: EmbeddedMongo
) -> None:
    calls = 500
    simulators = [SimulatorProcess(f"pbx{i}", tmp_path, duration=0.5).start() for i in (1, 2)]
    fleet = FleetProcess(
        tmp_path / "fleet",
        servers=[s.server_setting() for s in simulators],
        mongo_uri=mongo_server.uri,
        database="fleet_once",
        workers=4,
        handlers=["recording"],
        app_dir=app_dir,
        extra_env={"RECORD_DIR": str(tmp_path / "record"), "AMIWORKER_LOG_LEVEL": "INFO"},
    ).start()
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_server.uri)
    db = client["fleet_once"]
    try:
        await wait_for(
            lambda: (
                db.workers.count_documents({"servers.pbx2.connected": True}) == 4
                and db.workers.count_documents({"servers.pbx1.connected": True}) == 4
            ),
            timeout=30,
            what="4 workers connected to both PBXs",
        )
        # Start the calls only now, so every worker sees every event.
        await asyncio.gather(*(start_calls(s, calls, rate=100) for s in simulators))
        # 35 of the 39 events of a call carry a Uniqueid (DeviceStateChange does not).
        await wait_for(
            lambda: db.events.count_documents({"state": "done"}) >= calls * 2 * 35,
            timeout=240,
            what="every channel event stored and handled",
            interval=0.5,
        )
        assert fleet.stop() == 0
    finally:
        if fleet.process and fleet.process.poll() is None:
            fleet.process.kill()
        for simulator in simulators:
            simulator.stop()

    for simulator in simulators:
        # Recompute from what the PBX really sent: stored exactly once, none missing.
        sent = channel_keys(simulator)
        stored = [d["_id"] for d in db.events.find({"server": simulator.name}, {"_id": 1})]
        assert len(sent) == len(set(sent)) == calls * 35
        assert sorted(stored) == sorted(sent)

    expected = {s.name: channel_keys(s) for s in simulators}
    runs = read_invocations(tmp_path / "record")
    channel_runs = Counter(key for _, key, _, _ in runs if not key.startswith("local:"))
    all_keys = {k for keys in expected.values() for k in keys}
    assert set(channel_runs) == all_keys
    assert set(channel_runs.values()) == {1}, "a channel event was handled more than once"
    local_runs = Counter((server, key) for server, key, _, _ in runs if key.startswith("local:"))
    # DeviceStateChange (no Uniqueid) is handled by every worker: 4 runs each.
    assert len(local_runs) >= calls * 2 * 4 * 0.99
    assert set(local_runs.values()) == {4}
    workers = {worker for _, _, _, worker in runs}
    assert len(workers) == 4
    assert db.events.count_documents({"attempts": {"$gt": 0}}) == 0


async def start_calls(simulator: SimulatorProcess, count: int, rate: float) -> None:
    """Start ``count`` calls at about ``rate`` calls/s (paced here, in steps of 0.1 s)."""
    from tests.sim_plugin import RawAMI

    client = await RawAMI.connect(simulator.port)
    try:
        await client.login("amiworker", "demo-secret")
        step = max(1, round(rate / 10))
        for started in range(0, count, step):
            reply = await client.action("SimCalls", {"Count": min(step, count - started)})
            assert reply.name == "Success", reply.text
            await asyncio.sleep(0.1)  # pacing the load, not waiting for a result
    finally:
        await client.close()
