"""Prometheus metrics of one worker, served over HTTP on the worker's event loop.

Several workers run on one host, each its own process, so worker ``N``
(0-based, as numbered by the supervisor) serves on ``metrics_port + N``:
with ``metrics_port = 9300`` and four workers, scrape ports 9300-9303. A
restarted worker comes back on its port. Every series carries a ``worker``
label (the worker id), and the PBX ones a ``pbx`` label.

Counters are not kept twice: a collector reads the worker's
:class:`~amiworker.stats.WorkerStats` (the numbers its heartbeat reports) at
scrape time. Only the two latency histograms are fed as things happen, by the
claim loop and the handler scheduler. Each worker has its own
``CollectorRegistry``, so several workers in one process (tests) do not mix.

The server is a few lines of asyncio, not prometheus-client's threaded one:
the stats are read on the loop that writes them, and no thread is needed.
It listens on every interface (Prometheus usually scrapes from another host);
firewall the ports if that is not wanted.

Metric names (all with the ``worker`` label)::

    amiworker_events_seen_total          events read from every PBX
    amiworker_races_won_total            channel events this worker claimed first
    amiworker_races_lost_total           channel events another worker claimed first
    amiworker_events_local_total         events that do not race, handled here too
    amiworker_events_handled_total       handler runs that finished
    amiworker_events_failed_total        handler runs that raised or timed out
    amiworker_events_dropped_total       events lost: buffer and spill full (or slow), or no
                                         handler backlog room for an event not stored
    amiworker_events_reclaimed_total     events taken over from dead workers, or retried
    amiworker_events_queued_total        events won with no backlog room: stored queued
    amiworker_events_dequeued_total      queued events this worker took to run
    amiworker_events_released_total      unstarted events given back on a stop
    amiworker_events_rejected_total      events MongoDB refused: not stored
    amiworker_events_spilled_total       events written to the spill on local disk
    amiworker_events_owned_total         hedged mode: events this worker owned
    amiworker_events_hedged_total        hedged mode: events claimed as a standby
    amiworker_hedges_won_total           hedged mode: of those, the ones that stored the event
    amiworker_events_covered_total       hedged mode: standby events claimed elsewhere
    amiworker_standby_window             hedged mode: events in the standby window (gauge)
    amiworker_spill_events               events in the spill now (gauge)
    amiworker_spill_bytes                bytes of the spill's files (gauge)
    amiworker_spill_oldest_age_seconds   age of the oldest spilled event (gauge)
    amiworker_claim_batches_total        insert_many claims
    amiworker_store_errors_total         failed MongoDB claim attempts (retried)
    amiworker_queue_depth{stage}         events waiting: stage="claim" or "handlers"
                                         (the handler backlog, bounded by handler_backlog)
    amiworker_pbx_connected{pbx}         1 while the AMI session with that PBX is open
    amiworker_pbx_reconnects_total{pbx}  sessions reopened since start
    amiworker_claim_latency_seconds      histogram: one insert_many claim, per batch
    amiworker_claim_batch_size           histogram: events per claim batch
    amiworker_handler_latency_seconds    histogram: event received -> its handlers start
    amiworker_hedge_lateness_seconds     histogram, hedged mode: received -> stored by a
                                         standby's hedge (hedge_delay x rank, or more)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from amiworker.stats import WorkerStats

__all__ = [
    "MetricsServer",
    "WorkerCollector",
    "WorkerMetrics",
    "metrics_port",
    "start_metrics",
    "start_worker_metrics",
]

log = logging.getLogger("amiworker.fleet.metrics")

# (metric name without _total, WorkerStats field, help)
COUNTERS: Final = (
    ("amiworker_events_seen", "events_seen", "Events read from every PBX."),
    ("amiworker_races_won", "races_won", "Channel events this worker claimed first."),
    ("amiworker_races_lost", "races_lost", "Channel events another worker claimed first."),
    ("amiworker_events_local", "local", "Events that do not race, handled by every worker."),
    ("amiworker_events_handled", "handled", "Handler runs that finished."),
    ("amiworker_events_failed", "failed", "Handler runs that raised or timed out."),
    (
        "amiworker_events_dropped",
        "dropped",
        "Events lost: no room in memory or the spill (full, or its disk slow), or in the "
        "handler backlog for events every worker handles (not stored).",
    ),
    ("amiworker_events_reclaimed", "reclaimed", "Events taken over from dead workers or retried."),
    ("amiworker_events_queued", "queued", "Events won with no backlog room: stored queued."),
    ("amiworker_events_dequeued", "dequeued", "Queued events this worker took to run."),
    ("amiworker_events_released", "released", "Unstarted events given back on a stop."),
    ("amiworker_events_rejected", "rejected", "Events MongoDB refused (validator, unique index)."),
    ("amiworker_events_spilled", "spilled", "Events written to the spill on local disk."),
    ("amiworker_events_owned", "owned", "Hedged mode: events this worker owned."),
    ("amiworker_events_hedged", "hedged", "Hedged mode: events claimed as a standby."),
    ("amiworker_hedges_won", "hedges_won", "Hedged mode: standby claims that stored the event."),
    ("amiworker_events_covered", "covered", "Hedged mode: standby events claimed elsewhere."),
    ("amiworker_claim_batches", "claim_batches", "insert_many claims made."),
    ("amiworker_store_errors", "store_errors", "Claim attempts MongoDB failed (retried)."),
)
_LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_BATCH_BUCKETS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
# A hedge comes hedge_delay (1 s by default) times the standby's rank after receipt.
_HEDGE_BUCKETS: Final = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
_REQUEST_TIMEOUT: Final = 5.0
_MAX_REQUEST: Final = 16384


class _Pool(Protocol):
    def status(self) -> Mapping[str, Mapping[str, Any]]: ...


class ObservedWorker(Protocol):
    """What the metrics read of a worker (amiworker.fleet.worker.Worker fits)."""

    worker_id: str
    stats: WorkerStats

    @property
    def pool(self) -> _Pool: ...
    @property
    def claimer(self) -> Any: ...  # .depth, .queue.spill_info(), .on_batch(size, seconds)
    @property
    def scheduler(self) -> Any: ...  # .depth, .on_started(latency_seconds)


class WorkerCollector(Collector):
    """Reads a worker's counters, queues and PBX sessions at scrape time."""

    def __init__(self, worker: ObservedWorker) -> None:
        self._worker = worker

    def collect(self) -> Iterable[Metric]:
        worker = self._worker
        wid = worker.worker_id
        stats = worker.stats
        for name, attribute, help_text in COUNTERS:
            counter = CounterMetricFamily(name, help_text, labels=["worker"])
            counter.add_metric([wid], getattr(stats, attribute))
            yield counter
        depth = GaugeMetricFamily(
            "amiworker_queue_depth",
            "Events waiting to be claimed or handled.",
            labels=["worker", "stage"],
        )
        depth.add_metric([wid, "claim"], worker.claimer.depth)
        depth.add_metric([wid, "handlers"], worker.scheduler.depth)
        yield depth
        window = GaugeMetricFamily(
            "amiworker_standby_window",
            "Hedged mode: events waiting in the standby window.",
            labels=["worker"],
        )
        hedging = getattr(worker, "hedging", None)
        window.add_metric([wid], float(hedging.standby.depth) if hedging is not None else 0.0)
        yield window
        spill = worker.claimer.queue.spill_info() or {}
        for name, field, help_text in (
            ("amiworker_spill_events", "events", "Events in the spill on local disk."),
            ("amiworker_spill_bytes", "bytes", "Bytes of the spill's files."),
            (
                "amiworker_spill_oldest_age_seconds",
                "oldest_age",
                "Age of the oldest spilled event.",
            ),
        ):
            gauge = GaugeMetricFamily(name, help_text, labels=["worker"])
            gauge.add_metric([wid], float(spill.get(field) or 0))
            yield gauge
        connected = GaugeMetricFamily(
            "amiworker_pbx_connected",
            "1 while the AMI session with the PBX is open.",
            labels=["worker", "pbx"],
        )
        reconnects = CounterMetricFamily(
            "amiworker_pbx_reconnects",
            "AMI sessions reopened since start.",
            labels=["worker", "pbx"],
        )
        for pbx, status in sorted(worker.pool.status().items()):
            connected.add_metric([wid, pbx], 1.0 if status.get("connected") else 0.0)
            reconnects.add_metric([wid, pbx], float(status.get("reconnects") or 0))
        yield connected
        yield reconnects


class WorkerMetrics:
    """A worker's registry: the collector, plus the latency histograms fed by its callbacks.

    Installs ``claimer.on_batch``, ``scheduler.on_started`` and, in hedged mode,
    ``hedging.on_hedged``, keeping any callback already there (it is still called).
    """

    def __init__(self, worker: ObservedWorker) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(WorkerCollector(worker))
        self._worker_id = worker.worker_id
        self.claim_latency = self._histogram(
            "amiworker_claim_latency_seconds",
            "Seconds one claim (insert_many of a batch) took.",
            _LATENCY_BUCKETS,
        )
        self.batch_size = self._histogram(
            "amiworker_claim_batch_size", "Events per claim batch.", _BATCH_BUCKETS
        )
        self.handler_latency = self._histogram(
            "amiworker_handler_latency_seconds",
            "Seconds from receiving an event to starting its handlers.",
            _LATENCY_BUCKETS,
        )
        self._chain(worker.claimer, "on_batch", self._on_batch)
        self._chain(worker.scheduler, "on_started", self._on_started)
        hedging = getattr(worker, "hedging", None)
        if hedging is not None:
            hedge_lateness = self._histogram(
                "amiworker_hedge_lateness_seconds",
                "Hedged mode: seconds from receiving an event to a standby's claim storing it.",
                _HEDGE_BUCKETS,
            )
            self._chain(hedging, "on_hedged", hedge_lateness.observe)

    def _histogram(self, name: str, help_text: str, buckets: Sequence[float]) -> Histogram:
        """One of this worker's histograms (the registry's series for its label)."""
        family = Histogram(name, help_text, ["worker"], registry=self.registry, buckets=buckets)
        return family.labels(self._worker_id)

    @staticmethod
    def _chain(target: Any, attribute: str, callback: Callable[..., None]) -> None:
        previous = getattr(target, attribute, None)
        if previous is None:
            setattr(target, attribute, callback)
            return

        def both(*args: Any) -> None:
            previous(*args)
            callback(*args)

        setattr(target, attribute, both)

    def _on_batch(self, size: int, seconds: float) -> None:
        self.claim_latency.observe(seconds)
        self.batch_size.observe(size)

    def _on_started(self, seconds: float) -> None:
        self.handler_latency.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """The HTTP endpoint: ``GET /metrics`` (or ``/``) answers the exposition text."""

    def __init__(self, metrics: WorkerMetrics, server: asyncio.Server) -> None:
        self.metrics = metrics
        self._server = server

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self._server.close()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()


async def start_metrics(
    worker: ObservedWorker, port: int, host: str | None = None
) -> MetricsServer:
    """Serve ``worker``'s metrics on ``port`` (0: any free port, see ``.port``).

    ``host`` None listens on every interface. Raises OSError if the port is taken.
    """
    metrics = WorkerMetrics(worker)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            method, _, rest = head.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
            if method not in (b"GET", b"HEAD"):
                status, body, kind = b"405 Method Not Allowed", b"GET only\n", b"text/plain"
            elif path in (b"/metrics", b"/"):
                status, body, kind = b"200 OK", metrics.exposition(), CONTENT_TYPE_LATEST.encode()
            else:
                status, body, kind = b"404 Not Found", b"try /metrics\n", b"text/plain"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind
                + b"\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + (body if method != b"HEAD" else b"")
            )  # fmt: skip
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a client that went away or sent nonsense: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(answer, host, port, limit=_MAX_REQUEST)
    return MetricsServer(metrics, server)


def metrics_port(base: int | None, index: int | None) -> int | None:
    """The port worker ``index`` serves on: ``base + index`` (None: metrics off)."""
    if base is None:
        return None
    return base + (index or 0)


async def _nothing() -> None:
    return None


async def start_worker_metrics(
    worker: ObservedWorker, base_port: int | None, index: int | None
) -> Callable[[], Awaitable[None]]:
    """Serve the worker's metrics if a port is configured; returns the stop coroutine.

    A port that cannot be had is logged as an error and the worker runs on
    without metrics: losing the metrics must never stop the event log.
    """
    port = metrics_port(base_port, index)
    if port is None:
        return _nothing
    try:
        server = await start_metrics(worker, port)
    except OSError as exc:
        log.error(
            "metrics: cannot listen on port %d (%s); running without metrics. Worker N of a "
            "host serves on metrics_port + N: keep that range free",
            port,
            exc.strerror or exc,
        )
        return _nothing
    log.info("metrics on port %d (GET /metrics)", server.port)
    return server.stop
