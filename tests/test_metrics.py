"""Prometheus metrics: scraped over real HTTP (urllib) from a worker started in-process.

The end-to-end test runs a real Worker against two simulated PBXs and
nx-27017, makes calls, and checks that the scraped counters are the counts
the worker's heartbeat wrote to the ``workers`` collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from amiworker.devstack.embedded_mongo import EmbeddedMongo, free_port
from amiworker.devstack.processes import FleetProcess, SimulatorProcess
from amiworker.fleet.metrics import (
    COUNTERS,
    WorkerMetrics,
    metrics_port,
    start_metrics,
    start_worker_metrics,
)
from amiworker.fleet.worker import Worker
from amiworker.mongo import close_client, open_client
from amiworker.sim.pbx import FakePBX
from amiworker.stats import WorkerStats
from tests.waiting import wait_for

ROOT = Path(__file__).parent.parent


async def scrape(
    port: int, path: str = "/metrics"
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` from a real HTTP GET."""

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain; version=")
            return str(reply.read().decode())

    text = await asyncio.to_thread(get)
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def fake_worker() -> Any:
    """Just what the metrics read of a worker."""
    previous: list[tuple[int, float]] = []
    return SimpleNamespace(
        worker_id="host-w0-1-abc",
        stats=WorkerStats(events_seen=10, races_won=4, races_lost=5, handled=3, failed=1),
        pool=SimpleNamespace(
            status=lambda: {
                "pbx1": {"connected": True, "reconnects": 0},
                "pbx2": {"connected": False, "reconnects": 2},
            }
        ),
        claimer=SimpleNamespace(
            depth=7,
            on_batch=lambda n, s: previous.append((n, s)),
            queue=SimpleNamespace(
                spill_info=lambda: {"events": 30, "bytes": 4096, "oldest_age": 1.5, "path": "/x"}
            ),
        ),
        scheduler=SimpleNamespace(depth=2, on_started=None),
        hedging=SimpleNamespace(standby=SimpleNamespace(depth=3), on_hedged=None),
        previous=previous,
    )


async def test_counters_are_read_at_scrape_time() -> None:
    worker = fake_worker()
    server = await start_metrics(worker, 0, host="127.0.0.1")
    try:
        w = (("worker", "host-w0-1-abc"),)
        first = await scrape(server.port)
        assert first[("amiworker_events_seen_total", w)] == 10
        assert first[("amiworker_races_lost_total", w)] == 5
        assert first[("amiworker_events_failed_total", w)] == 1
        assert first[("amiworker_queue_depth", (("stage", "claim"), *w))] == 7
        assert first[("amiworker_queue_depth", (("stage", "handlers"), *w))] == 2
        assert first[("amiworker_standby_window", w)] == 3
        assert first[("amiworker_spill_events", w)] == 30
        assert first[("amiworker_spill_bytes", w)] == 4096
        assert first[("amiworker_spill_oldest_age_seconds", w)] == 1.5
        assert first[("amiworker_pbx_connected", (("pbx", "pbx1"), *w))] == 1
        assert first[("amiworker_pbx_connected", (("pbx", "pbx2"), *w))] == 0
        assert first[("amiworker_pbx_reconnects_total", (("pbx", "pbx2"), *w))] == 2
        for name, field, _ in COUNTERS:  # every counter of WorkerStats is exported
            assert first[(f"{name}_total", w)] == getattr(worker.stats, field)
        assert {field for _, field, _ in COUNTERS} == set(worker.stats.as_dict())
        # No double bookkeeping: what the worker counts next is what the next scrape says.
        worker.stats.events_seen += 5
        worker.stats.dropped = 3
        second = await scrape(server.port, "/")
        assert second[("amiworker_events_seen_total", w)] == 15
        assert second[("amiworker_events_dropped_total", w)] == 3
    finally:
        await server.stop()


async def test_latency_histograms_keep_existing_callbacks() -> None:
    worker = fake_worker()
    metrics = WorkerMetrics(worker)
    worker.claimer.on_batch(50, 0.004)
    worker.claimer.on_batch(10, 0.2)
    worker.scheduler.on_started(0.03)
    worker.hedging.on_hedged(1.2)
    worker.hedging.on_hedged(3.4)
    assert worker.previous == [(50, 0.004), (10, 0.2)]  # the callback already there still runs
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
    }
    w = ("worker", "host-w0-1-abc")
    assert samples[("amiworker_claim_latency_seconds_count", (w,))] == 2
    assert samples[("amiworker_claim_latency_seconds_bucket", (("le", "0.005"), w))] == 1
    assert samples[("amiworker_claim_batch_size_sum", (w,))] == 60
    assert samples[("amiworker_handler_latency_seconds_count", (w,))] == 1
    assert samples[("amiworker_handler_latency_seconds_bucket", (("le", "0.05"), w))] == 1
    assert samples[("amiworker_hedge_lateness_seconds_count", (w,))] == 2
    assert samples[("amiworker_hedge_lateness_seconds_bucket", (("le", "1.5"), w))] == 1


async def test_http_edges() -> None:
    server = await start_metrics(fake_worker(), 0, host="127.0.0.1")
    try:
        with pytest.raises(urllib.error.HTTPError) as caught:
            await scrape(server.port, "/nothing")
        assert caught.value.code == 404
        # A client that connects and says nothing, or nonsense, costs nothing lasting.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"garbage\r\n\r\n")
        await writer.drain()
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 405")
        writer.close()
        assert await scrape(server.port)
    finally:
        await server.stop()


async def test_worker_n_serves_on_metrics_port_plus_n(caplog: pytest.LogCaptureFixture) -> None:
    assert metrics_port(None, 3) is None
    assert metrics_port(9300, None) == 9300
    assert metrics_port(9300, 3) == 9303
    port = free_port()
    stop = await start_worker_metrics(fake_worker(), port - 2, 2)
    try:
        assert await scrape(port)
        # The port is taken now: a second worker on it logs one error and runs on.
        with caplog.at_level(logging.ERROR, "amiworker.fleet.metrics"):
            stop_again = await start_worker_metrics(fake_worker(), port, 0)
        await stop_again()
        (record,) = [r for r in caplog.records if r.name == "amiworker.fleet.metrics"]
        assert f"cannot listen on port {port}" in record.getMessage()
        assert "metrics_port + N" in record.getMessage()
    finally:
        await stop()
    off = await start_worker_metrics(fake_worker(), None, 0)
    await off()


# -- a real worker -------------------------------------------------------------------------


async def test_scraped_counters_match_the_heartbeat(
    live_worker: tuple[Worker, list[FakePBX]],
) -> None:
    worker, pbxs = live_worker
    server = await start_metrics(worker, 0, host="127.0.0.1")
    workers = worker.store.workers
    try:
        for pbx in pbxs:
            for _ in range(5):
                await pbx.start_call()
        calls = worker.store.database["calls"]
        await wait_for(
            _count_is(calls, {"active_channels": 0}, 10), timeout=20, what="10 calls ended"
        )
        await wait_for(
            lambda: worker.claimer.depth == 0 and worker.scheduler.depth == 0,
            timeout=10,
            what="the worker idle",
        )

        async def heartbeat_current() -> bool:
            row = await workers.find_one({"_id": worker.worker_id})
            return row is not None and row["counters"] == worker.stats.as_dict()

        await wait_for(heartbeat_current, timeout=10, what="a heartbeat with the final counts")
        row = await workers.find_one({"_id": worker.worker_id})
        assert row is not None
        samples = await scrape(server.port)
    finally:
        await server.stop()
    w = ("worker", worker.worker_id)
    counters = row["counters"]
    assert counters["events_seen"] >= 10 * 39  # events of 10 calls, plus logins
    assert counters["races_won"] == 10 * 35  # one worker: it wins every channel event
    assert counters["handled"] == 10 * 6 + counters["local"]  # Newchannel, Newstate, Hangup x2
    for name, field, _ in COUNTERS:
        assert samples[(f"{name}_total", (w,))] == counters[field], name
    for pbx_name in ("pbx1", "pbx2"):
        assert samples[("amiworker_pbx_connected", (("pbx", pbx_name), w))] == 1
        assert row["servers"][pbx_name]["connected"] is True
    assert samples[("amiworker_queue_depth", (("stage", "claim"), w))] == row["queue_depth"] == 0
    assert samples[("amiworker_claim_latency_seconds_count", (w,))] == counters["claim_batches"]
    handler_starts = samples[("amiworker_handler_latency_seconds_count", (w,))]
    assert handler_starts == counters["handled"] + counters["failed"]


def _count_is(collection: Any, query: dict[str, Any], count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool(await collection.count_documents(query) == count)

    return check


# -- a real fleet: `amiworker --workers 2` with metrics_port ---------------------------------


def two_free_ports() -> int:
    """A port ``p`` with ``p + 1`` free too (worker 0 and worker 1)."""
    for _ in range(20):
        base = free_port()
        with contextlib.suppress(OSError), socket.socket() as probe:
            probe.bind(("127.0.0.1", base + 1))
            return base
    raise AssertionError("no two consecutive free ports")


async def test_each_worker_of_a_fleet_serves_its_heartbeat_counts(
    tmp_path: Path, mongo_server: EmbeddedMongo, database_name: str
) -> None:
    base = two_free_ports()
    simulator = SimulatorProcess("pbx1", tmp_path, duration=0.2).start()
    fleet = FleetProcess(
        tmp_path / "fleet",
        servers=[simulator.server_setting()],
        mongo_uri=mongo_server.uri,
        database=database_name,
        workers=2,
        app_dir=ROOT,
        extra_env={"AMIWORKER_METRICS_PORT": str(base), "AMIWORKER_HEARTBEAT_INTERVAL": "0.2"},
    ).start()
    client = open_client(mongo_server.uri)
    workers = client[database_name]["workers"]
    try:

        async def connected() -> bool:
            query = {"state": "running", "servers.pbx1.connected": True}
            return bool(await workers.count_documents(query) == 2)

        await wait_for(connected, timeout=30, what="2 workers connected", interval=0.1)
        control = simulator.control()
        try:
            assert control.action("SimCalls", {"Count": 5}).name == "Success"
        finally:
            control.close()
        calls = client[database_name]["calls"]

        async def calls_ended() -> bool:
            return bool(await calls.count_documents({"active_channels": 0}) == 5)

        await wait_for(calls_ended, timeout=30, what="5 calls handled", interval=0.1)
        scraped: dict[str, dict[str, float]] = {}  # worker id -> {sample name: value}

        async def metrics_match_heartbeats() -> bool:
            for port in (base, base + 1):  # worker N serves on metrics_port + N
                samples = await scrape(port)
                (worker_id,) = {dict(labels)["worker"] for _, labels in samples}
                scraped[worker_id] = {name: value for (name, _), value in samples.items()}
            rows = {row["_id"]: row async for row in workers.find({"state": "running"})}
            return set(rows) == set(scraped) and all(
                scraped[worker][f"{name}_total"] == rows[worker]["counters"][field]
                for worker in rows
                for name, field, _ in COUNTERS
            )

        await wait_for(metrics_match_heartbeats, timeout=20, what="scraped counts = heartbeats")
        won = sum(samples["amiworker_races_won_total"] for samples in scraped.values())
        assert won == 5 * 35  # every channel event won by exactly one of them
        assert all(s["amiworker_events_seen_total"] >= 5 * 39 for s in scraped.values())
        assert fleet.stop() == 0
    finally:
        fleet.kill()
        simulator.stop()
        await client.drop_database(database_name)
        await close_client(client)
