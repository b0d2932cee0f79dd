"""A document MongoDB refuses costs that event, and nothing else.

Real processes: a simulated PBX, ``amiworker --workers 2`` and nx-27017, with
the workers' store behind tests/mongo_proxy.py, which plays a collection
validator that refuses the first Hangup event it sees (every worker's copy of
it: a validator judges content). The test checks the log against what the
simulator recorded sending, the handler runs against what was stored, and the
refusal against the workers' log lines, heartbeat counters and metrics.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from amiworker.devstack.embedded_mongo import EmbeddedMongo
from amiworker.devstack.processes import FleetProcess, SimulatorProcess
from tests.fleet_plugin import (
    end_calls,
    metrics_base,
    read_invocations,
    set_rate,
    wait_connected,
    worker_counter,
)
from tests.mongo_proxy import MongoProxy, RefuseFirst, running_in_thread
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

QUICK = {
    "AMIWORKER_HEARTBEAT_INTERVAL": "0.5",
    "AMIWORKER_LEASE": "6",
    "AMIWORKER_RECONNECT_MIN": "0.1",
    "AMIWORKER_RECONNECT_MAX": "1",
    "AMIWORKER_CONNECT_TIMEOUT": "2",
    # A Hangup comes in a burst (SoftHangupRequest, HangupRequest, the other leg's...):
    # 50 ms puts it in a batch with others, the case to prove.
    "AMIWORKER_BATCH_DELAY": "0.05",
}
REJECTED_METRIC = "amiworker_events_rejected_total"
STORED_AFTER = 300  # channel events stored after the refusal before the calls stop
REASON = "write error 121: Document failed validation"


def rejected_per_worker(db: Any) -> dict[str, int]:
    return {row["_id"]: row["counters"]["rejected"] for row in db.workers.find({})}


async def test_a_refused_event_is_logged_counted_and_the_claims_go_on(
    tmp_path: Path, mongo_server: EmbeddedMongo, recording_app: tuple[Path, Path]
) -> None:
    assert mongo_server.port is not None
    database = f"refused_{uuid.uuid4().hex[:8]}"
    refuse = RefuseFirst(lambda doc: doc.get("event") == "Hangup")
    proxy = MongoProxy(mongo_server.port, database=database, collection="events", refuse=refuse)
    app_dir, record_dir = recording_app
    base = metrics_base(2)
    simulator = SimulatorProcess("pbx1", tmp_path, duration=0.5).start()
    # The test reads nx-27017 directly: only the workers go through the proxy.
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_server.uri)
    db: Any = client[database]
    began = time.monotonic()
    try:
        with running_in_thread(proxy):
            fleet = FleetProcess(
                tmp_path / "fleet",
                servers=[simulator.server_setting()],
                mongo_uri=proxy.uri,
                database=database,
                workers=2,
                handlers=["recording"],
                app_dir=app_dir,
                extra_env={
                    "RECORD_DIR": str(record_dir),
                    "AMIWORKER_METRICS_PORT": str(base),
                    **QUICK,
                },
            ).start()
            try:
                await asyncio.to_thread(wait_connected, db, 2, ["pbx1"])
                pids = sorted(fleet.worker_pids())
                workers = {row["_id"] for row in db.workers.find({})}
                set_rate([simulator], 5)
                # Every worker races every channel event: both copies are refused.
                await wait_for(lambda: len(proxy.refusals) >= 2, 30, "the first Hangup refused")
                at_refusal = db.events.estimated_document_count()
                await wait_for(
                    lambda: db.events.estimated_document_count() >= at_refusal + STORED_AFTER,
                    30,
                    f"{STORED_AFTER} more channel events stored after the refusal",
                    interval=0.1,
                )
                sent = await end_calls([simulator])
                await wait_for(
                    lambda: db.events.count_documents({"state": "done"}) >= len(sent) - 1,
                    60,
                    "every other channel event done",
                    interval=0.25,
                )
                # Counters reach the workers rows with the next heartbeat.
                await wait_for(
                    lambda: sum(rejected_per_worker(db).values()) >= len(proxy.refusals),
                    10,
                    "the refusals in the heartbeats",
                    interval=0.1,
                )
                rows = rejected_per_worker(db)
                scraped = dict(
                    await asyncio.gather(
                        *(
                            asyncio.to_thread(worker_counter, base + n, REJECTED_METRIC)
                            for n in range(2)
                        )
                    )
                )
                assert sorted(fleet.worker_pids()) == pids, "no worker died or was restarted"
                assert await asyncio.to_thread(fleet.stop) == 0
            finally:
                fleet.kill()
    finally:
        simulator.stop()
    took = time.monotonic() - began

    key = refuse.key
    refusals = list(proxy.refusals)
    assert key in sent, "the refused event is one the simulator sent"
    # The rest stored, each once; the refused one not at all.
    stored = [doc["_id"] for doc in db.events.find({}, {"_id": 1})]
    others = [k for k in sent if k != key]
    assert sorted(stored) == sorted(others)
    assert db.events.count_documents({"state": {"$ne": "done"}}) == 0
    # Claims went on: what was sent after it is stored (and checked just above).
    after = sent[sent.index(key) + 1 :]
    assert len(after) >= STORED_AFTER
    # Handled: every other one, exactly once; the refused one never.
    runs = Counter(r.key for r in read_invocations(record_dir) if not r.key.startswith("local:"))
    assert set(runs) == set(others) and max(runs.values()) == 1
    # Each worker that raced it got it refused, logged it at ERROR and counted it.
    assert all(r.document["_id"] == key and r.database == database for r in refusals)
    assert all(r.batch > 1 for r in refusals), "refused as one event of a batch"
    by_worker = Counter(str(r.document["claimed_by"]) for r in refusals)
    assert set(by_worker) == workers, by_worker
    log = fleet.log_text()
    line = f"MongoDB refused Hangup event {key}, which is not stored: {REASON}; the other events"
    logged = [row for row in log.splitlines() if line in row]
    assert all(" ERROR " in row for row in logged), logged
    assert Counter(w for row in logged for w in workers if f"[{w}]" in row) == by_worker, logged
    assert rows == dict(by_worker), rows
    assert sum(rows.values()) == len(refusals) >= 1
    assert scraped == {w: float(n) for w, n in by_worker.items()}, scraped
    assert "ended unexpectedly" not in log and "claiming its events one by one" not in log
    # Every other event was raced by both workers: the lost races came as MongoDB 4.2+
    # gives them (keyPattern {_id: 1}), and were judged lost races, not refusals.
    assert proxy.duplicates >= len(others), proxy.duplicates
    print(
        f"\nrefused document: {len(sent)} channel events sent, {len(stored)} stored and handled "
        f"once, {len(after)} of them after the refused Hangup {key}; refused {len(refusals)} "
        f"time(s) ({', '.join(f'{w}: {n}' for w, n in sorted(by_worker.items()))}), "
        f"rejected counters {sum(rows.values())}; batches of {[r.batch for r in refusals]}; "
        f"{proxy.duplicates} lost races reported with keyPattern; "
        f"{took:.1f} s"
    )
