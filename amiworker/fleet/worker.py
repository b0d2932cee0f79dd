"""One worker process: AMI sessions -> claims -> handlers -> outcomes.

The data path runs one way::

    ServerPool (a reader task per PBX, never waits)
        -> on_event: race or handle here
        -> Claimer (bounded buffer, insert_many batches)     -> winners
        -> HandlerScheduler (ordered per call, bounded)       -> outcome
        -> Outcomes (acks within ack_delay, failures recorded)

Beside it run the heartbeat (this worker's row, and the fleet's view) and the
take-over loop (events of dead workers, queued events, due retries, into the
backlog's free room). Every loop is watched: one that ends unexpectedly is
logged with its traceback and ends the process with a non-zero status, for the
supervisor to restart it; a worker never lingers half alive.

A stop (SIGTERM) keeps the lease until the worker holds nothing: it claims
nothing new (what it had buffered is stored, ``queued`` for others), releases
the events it has not started (any live worker takes them at once), lets its
running handlers finish within ``shutdown_timeout`` with the AMI sessions
still open (``ctx.ami`` works), writes their outcomes, and only then records
its stop and logs off.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Final

from amiworker import logs
from amiworker.ami.message import Message
from amiworker.ami.pool import ServerPool
from amiworker.backoff import full_jitter
from amiworker.cancelling import cancel_until_done
from amiworker.fleet.claimqueue import ClaimQueue
from amiworker.fleet.claims import Claimer, Pending
from amiworker.fleet.dedup import races
from amiworker.fleet.dispatch import (
    HandlerContext,
    HandlerImportError,
    HandlerRegistry,
    load_handlers,
)
from amiworker.fleet.documents import event_document
from amiworker.fleet.handler_threads import exit_past_abandoned_runs
from amiworker.fleet.health import StoreHealth
from amiworker.fleet.heartbeat import RUNNING, STOPPED, STOPPING, Heartbeat
from amiworker.fleet.hedging import Hedging
from amiworker.fleet.locktable import LockTable, StoreUnavailable
from amiworker.fleet.metrics import start_worker_metrics
from amiworker.fleet.outcomes import Outcomes
from amiworker.fleet.scheduler import HandlerScheduler, Job
from amiworker.fleet.spill import Spill
from amiworker.fleet.takeover import Takeover
from amiworker.logs import Throttle
from amiworker.settings import Settings, secrets_of
from amiworker.stats import WorkerStats

__all__ = ["EXIT_LOOP_DIED", "Worker", "WorkerLoopDied", "new_worker_id", "run_worker_process"]

log = logging.getLogger("amiworker.worker")

#: Exit status of a worker whose loop died (the supervisor restarts it).
EXIT_LOOP_DIED: Final = 3
# prctl(2): send this signal when the parent process dies.
_PR_SET_PDEATHSIG: Final = 1
# Seconds the outcomes of the last handler runs get to be written on a stop.
_OUTCOMES_GRACE: Final = 5.0


class WorkerLoopDied(Exception):
    """A loop of the worker ended unexpectedly; the process must end and be restarted."""


def new_worker_id(index: int | None = None) -> str:
    """Unique across hosts and restarts: host, pid, and a random suffix (pids get reused)."""
    suffix = uuid.uuid4().hex[:6]
    slot = f"w{index}-" if index is not None else ""
    return f"{socket.gethostname()}-{slot}{os.getpid()}-{suffix}"


class Worker:
    def __init__(
        self,
        settings: Settings,
        registry: HandlerRegistry,
        *,
        worker_id: str | None = None,
        store: LockTable | None = None,
        index: int | None = None,
    ) -> None:
        self.settings = settings
        #: The supervisor's slot number: worker N serves metrics on metrics_port + N.
        self.index = index
        self.worker_id = worker_id or new_worker_id()
        self.stats = WorkerStats()
        self.registry = registry
        self.store = store or LockTable.from_settings(settings, self.worker_id)
        self.state = RUNNING
        self.health = StoreHealth(lambda: self.claimer.describe())
        self.pool = ServerPool(
            settings.servers,
            on_event=self._on_event,
            on_session=self._on_session,
            reconnect_min=settings.reconnect_min,
            reconnect_max=settings.reconnect_max,
            connect_timeout=settings.connect_timeout,
            action_timeout=settings.action_timeout,
            ping_interval=settings.ping_interval,
            ping_timeout=settings.ping_timeout,
            max_message_size=settings.max_message_size,
        )
        self.outcomes = Outcomes(self.store, settings, self.stats, self.health)
        self.scheduler = HandlerScheduler(
            registry,
            self._context,
            concurrency=settings.handler_concurrency,
            timeout=settings.handler_timeout,
            on_finished=self.outcomes.record,
            # Plain handlers run in threads; time queueing for one counts against
            # handler_timeout, so there is a thread for every concurrent call.
            executor=ThreadPoolExecutor(settings.handler_concurrency, "handler"),
            backlog=settings.handler_backlog,
            max_attempts=settings.max_attempts,
        )
        self.claimer = Claimer(
            self.store,
            build_document=self._document,
            on_won=self._on_won,
            unavailable=StoreUnavailable,
            stats=self.stats,
            health=self.health,
            needs_run=self.scheduler.wants,
            reserve=self.reserve,
            release=self.scheduler.release,
            room_freed=self.scheduler.room_freed,
            dedup_window=settings.dedup_window,
            batch_size=settings.batch_size,
            batch_delay=settings.batch_delay,
            queue=ClaimQueue(
                high_water=settings.buffer_size,
                stats=self.stats,
                open_spill=self._open_spill if settings.spill_max_bytes else None,
                on_lost=self._on_lost,
            ),
            on_settled=self._on_settled,
        )
        #: Hedged mode's owner/standby decisions and coverage; None in race mode.
        self.hedging: Hedging | None = None
        if settings.claim_mode == "hedged":
            self.hedging = Hedging(
                self.store,
                worker_id=self.worker_id,
                servers=[server.name for server in settings.servers],
                hedge_delay=settings.hedge_delay,
                window=settings.hedge_window,
                # Owning under the old view and the new one for this long after a
                # change covers the workers that see it an exchange or two later.
                transition=settings.hedge_delay,
                stats=self.stats,
                health=self.health,
                claim=self._claim_hedges,
                connected=self._connected,
            )
        self.heartbeat = Heartbeat(
            self.store,
            self.health,
            settings.heartbeat_interval,
            self.heartbeat_info,
        )
        self.takeover = Takeover(
            self.store,
            settings,
            health=self.health,
            heartbeat=self.heartbeat,
            scheduler=self.scheduler,
            outcomes=self.outcomes,
            stats=self.stats,
            reserve=self.reserve,
        )
        self.started_at = datetime.now(UTC)
        # PBXs whose current session has not shown an event yet: is it timestamped?
        self._unchecked: set[str] = set()
        #: PBX -> whether its events carry a Timestamp (None: not seen yet).
        self.timestamps: dict[str, bool] = {}
        self._stop = asyncio.Event()
        self._local_drops = Throttle()
        self._local_dropped = 0

    # -- the hot path: called by the AMI reader, must never wait -------------------------

    def _on_event(self, server: str, message: Message, own_action: bool) -> None:
        if own_action or self.state != RUNNING:
            # An answer to this session's own action is never raced (see ami.routing);
            # a stopping worker claims nothing new (the others have these events).
            return
        self.stats.events_seen += 1
        if self._unchecked and server in self._unchecked:
            self._check_timestamps(server, message)
        now = time.monotonic()
        if races(message, self.settings.race):
            item = Pending(server, message, datetime.now(UTC), now)
            hedging = self.hedging
            if hedging is None:
                self.claimer.submit(item)
                return
            self.claimer.key(item)
            if hedging.route(item):
                self.claimer.submit(item)
        elif self.scheduler.wants(message.name):
            self.stats.local += 1
            if self.scheduler.local_room > 0:
                self.scheduler.submit(Job(server, message, None, now))
                unsaid = self._local_drops.overdue()
                if unsaid:
                    self._local_drops_said(unsaid)
            else:
                self._drop_local(message)

    def _drop_local(self, message: Message) -> None:
        """An event every worker handles (it is not stored), with the backlog full even
        of the tenth that stored events leave to these: it cannot wait in MongoDB for
        another worker, and memory must stay bounded."""
        self.stats.dropped += 1
        self._local_dropped += 1
        dropped = self._local_drops.count()
        if dropped:
            log.error(
                "handler backlog full (handler_backlog %d): %d event(s) not handled by this "
                "worker, the last a %s (events with no Uniqueid, handled by every worker, are "
                "not stored); the handlers are too slow: raise handler_concurrency or make "
                "them faster",
                self.settings.handler_backlog,
                dropped,
                message.name,
            )

    def _local_drops_said(self, unsaid: int) -> None:
        """The drops counted after the last line (one per 10 s), said once the backlog
        has room again, so that none goes unsaid in the log."""
        log.error(
            "handler backlog has room again: %d event(s) with no Uniqueid were dropped "
            "since the last line, %d in all (see above)",
            unsaid,
            self._local_dropped,
        )

    def _on_session(self, server: str) -> None:
        self._unchecked.add(server)
        if self.hedging is not None:
            self.hedging.session(server)

    def _connected(self) -> dict[str, bool]:
        return {name: bool(status["connected"]) for name, status in self.pool.status().items()}

    def _claim_hedges(self, items: list[Pending]) -> None:
        """Standby events to claim now: their owner did not, or the window is full."""
        for item in items:
            self.claimer.submit(item)

    def _on_settled(self, items: list[Pending]) -> None:
        if self.hedging is not None:
            self.hedging.settled(items)

    def _on_lost(self, server: str, key: str) -> None:
        if self.hedging is not None:
            self.hedging.lost(server, key)

    def _check_timestamps(self, server: str, message: Message) -> None:
        if message.name == "FullyBooted":
            return  # sent to the session that logged in, never with a Timestamp
        self._unchecked.discard(server)
        stamped = b"\nTimestamp: " in message.raw
        self.timestamps[server] = stamped
        if not stamped:
            log.warning(
                "%s sends events without a Timestamp: an event byte-identical to one stored "
                "in the last dedup_window (a repeated VarSet) can be missed. Set "
                "timestampevents = yes in manager.conf [general] and reload the manager",
                server,
                extra={"server": server},
            )

    def _open_spill(self) -> Spill:
        """This slot's spill (called on the spill thread): worker N drains what the
        worker N before it left, on this host."""
        settings = self.settings
        return Spill.open(
            settings.spill_dir,
            f"{settings.database}.{settings.collection}",
            self.index or 0,
            max_bytes=settings.spill_max_bytes,
        )

    def reserve(self, wanted: int) -> int:
        """Room in the handler backlog for up to ``wanted`` events about to be won or
        taken over; none once stopping (it claims nothing new)."""
        return self.scheduler.reserve(wanted) if self.state == RUNNING else 0

    def _document(self, item: Pending) -> dict[str, Any]:
        return event_document(item.key, item.server, item.message, self.worker_id, item.received_at)

    def _on_won(self, winners: list[Pending]) -> None:
        if self.hedging is not None:
            self.hedging.won(winners)
        for item in winners:
            job = Job(item.server, item.message, item.key, item.received_mono)
            self.scheduler.submit(job, reserved=True)

    def _context(self, job: Job) -> HandlerContext:
        return HandlerContext.create(
            server=job.server,
            ami=self.pool.connection(job.server),
            db=self.store.database,
            worker_id=self.worker_id,
            event_id=job.key,
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until :meth:`stop`; then stop gracefully.

        MongoDB need not be reachable at start: the AMI sessions open anyway and
        events wait in the claim buffer until it is. Raises :class:`WorkerLoopDied`
        if a loop ends unexpectedly.
        """
        await self.claimer.queue.open()
        loops = {
            asyncio.create_task(self.claimer.run(), name="claims"),
            asyncio.create_task(self.claimer.queue.write_spill(), name="spill"),
            asyncio.create_task(self.outcomes.run(), name="outcomes"),
            asyncio.create_task(self.heartbeat.run(), name="heartbeat"),
            asyncio.create_task(self.takeover.run(), name="takeover"),
        }
        indexes = asyncio.create_task(self._prepare_store(), name="indexes")
        if self.hedging is not None:
            loops.add(asyncio.create_task(self.hedging.run(), name="hedging"))
        stop_metrics = await start_worker_metrics(self, self.settings.metrics_port, self.index)
        await self.pool.start()
        log.info(
            "worker %s running: %d PBX(s), handlers for %s",
            self.worker_id,
            len(self.settings.servers),
            ", ".join(self.registry.event_names()) or "no event",
        )
        stopped = asyncio.create_task(self._stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait({stopped, *loops}, return_when=asyncio.FIRST_COMPLETED)
            died = [task for task in done if task is not stopped]
            if died:
                await self._die(died[0], [*loops, indexes, stopped])
            await self._shutdown(loops, indexes)
        finally:
            await stop_metrics()

    def stop(self) -> None:
        self._stop.set()

    async def _die(self, task: asyncio.Task[Any], tasks: list[asyncio.Task[Any]]) -> None:
        error = None if task.cancelled() else task.exception()
        log.error(
            "the %s loop of this worker ended unexpectedly (%s); exiting for the supervisor to "
            "restart it (its claimed events are taken over by a live worker after the lease)",
            task.get_name(),
            "cancelled" if error is None else f"{type(error).__name__}: {error}",
            exc_info=error,
        )
        await cancel_until_done(tasks)
        await self.pool.stop(logoff=False)
        with contextlib.suppress(Exception):
            await self.store.close()
        raise WorkerLoopDied(task.get_name()) from error

    async def _shutdown(self, loops: set[asyncio.Task[None]], indexes: asyncio.Task[None]) -> None:
        settings = self.settings
        deadline = time.monotonic() + settings.shutdown_timeout
        self.state = STOPPING
        log.info("stopping: no new claims; releasing unstarted events, finishing handlers")
        by_name = {task.get_name(): task for task in loops}
        # MongoDB away: each call below would wait store_timeout for nothing, and the
        # supervisor kills a worker not gone within shutdown_timeout + 10 s.
        store_down = self.health.down
        if self.hedging is not None:
            # Own nothing from now on: the others see it at once (the row, and a final
            # coverage record), and hedge what this worker will not claim.
            self.hedging.coverage.leaving = True
            if not store_down:
                with contextlib.suppress(StoreUnavailable):
                    await self.hedging.exchange()
        claims, takeover = by_name["claims"], by_name["takeover"]
        self.takeover.stop()
        await asyncio.wait({takeover}, timeout=0 if store_down else settings.store_timeout * 3)
        await cancel_until_done([takeover, indexes])
        # What was buffered in memory before the stop is stored (queued: room is now
        # 0); what is spilled stays on disk for the next worker of this slot.
        self.claimer.stop()
        flushed, _ = await asyncio.wait({claims}, timeout=settings.shutdown_timeout)
        leftovers = []
        if not flushed:
            # Not asyncio.wait_for: the claim loop may be inside the driver, where a
            # single cancellation can be lost (see amiworker.cancelling).
            await cancel_until_done([claims])
            leftovers = self.claimer.unclaimed()
            log.error(
                "stopping with %d event(s) not stored: MongoDB did not take them within "
                "shutdown_timeout (%.0f s); %s",
                len(leftovers),
                settings.shutdown_timeout,
                "they go to the spill" if self.claimer.queue.spill_path else "they are lost",
            )
        await cancel_until_done([by_name["spill"]])
        await self.claimer.queue.close(leftovers)
        unstarted = self.scheduler.drain_unstarted()
        await self._release([job.key for job in unstarted if job.key], deadline, "unstarted")
        if not await self.scheduler.join(max(0.0, deadline - time.monotonic())):
            running = self.scheduler.running()
            log.error(
                "%d handler run(s) still going after shutdown_timeout (%.0f s); abandoning "
                "them, their events released to run again elsewhere",
                len(running),
                settings.shutdown_timeout,
            )
            await self.scheduler.cancel()
            await self._release([job.key for job in running if job.key], None, "abandoned")
        self.outcomes.stop()
        outcomes = by_name["outcomes"]
        written, _ = await asyncio.wait({outcomes}, timeout=_OUTCOMES_GRACE)
        if not written:
            log.error(
                "%d outcome(s) not written (MongoDB away); those events run again elsewhere",
                self.outcomes.pending,
            )
        # Holding nothing now: the lease may go.
        await cancel_until_done([outcomes, by_name["heartbeat"], *_named(by_name, "hedging")])
        self.state = STOPPED
        if self.health.down:
            log.warning(
                "MongoDB unreachable: the stop is not recorded there (this worker's row "
                "shows it gone once its lease passes)"
            )
        elif not await self.heartbeat.beat_once():
            log.warning("could not record the stop in MongoDB")
        await self.pool.stop(logoff=True)
        await self.store.close()
        log.info("stopped: %s", self.stats.as_dict())

    async def _release(self, keys: list[str], deadline: float | None, what: str) -> None:
        """Give ``keys`` back (queued, due now), retrying until ``deadline``."""
        if not keys:
            return
        attempt = 0
        while True:
            past_deadline = deadline is None or time.monotonic() >= deadline
            try:
                if self.health.down and past_deadline:  # a try would wait store_timeout
                    raise StoreUnavailable("MongoDB is unreachable")
                released = await self.store.release(keys)
                self.stats.released += released
                log.info("released %d %s event(s) for other workers to run", released, what)
                return
            except StoreUnavailable as exc:
                self.health.failed(exc)
                if deadline is None or time.monotonic() >= deadline:
                    log.error(
                        "could not release %d %s event(s): %s; they run again elsewhere "
                        "after the lease",
                        len(keys),
                        what,
                        exc,
                    )
                    return
                await asyncio.sleep(full_jitter(attempt, 0.1, 1.0))
                attempt += 1

    # -- what the fleet sees of this worker ----------------------------------------------------

    def heartbeat_info(self) -> dict[str, Any]:
        logins = {
            server.name: f"{server.username}:{server.events}" for server in self.settings.servers
        }
        servers: dict[str, Any] = {}
        for name, status in self.pool.status().items():
            # The login (user and event filter, never the secret): every worker must
            # receive the same stream; `amiworker status` flags a fleet that does not.
            servers[name] = {
                **status,
                "timestamps": self.timestamps.get(name),
                "login": logins[name],
            }
        return {
            "state": self.state,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "servers": servers,
            "counters": self.stats.as_dict(),
            "queue_depth": self.claimer.depth + self.scheduler.depth,
            "backlog": self.scheduler.depth,
            "mode": self.settings.claim_mode,
            "hedging": self.hedging.info() if self.hedging is not None else None,
            "spill": self.claimer.queue.spill_info(),
            "handlers": self.registry.event_names(),
        }

    async def _prepare_store(self) -> None:
        attempt = 0
        while True:
            try:
                await self.store.ensure_indexes(self.settings.ttl_days)
                return
            except StoreUnavailable as exc:
                self.health.failed(exc)
            await asyncio.sleep(full_jitter(attempt, 0.5, 10.0))
            attempt += 1


def _named(tasks: dict[str, asyncio.Task[None]], *names: str) -> list[asyncio.Task[None]]:
    return [tasks[name] for name in names if name in tasks]


def run_worker_process(settings: Settings, index: int | None = None) -> None:
    """Entry point of a worker process (spawned by the supervisor)."""
    worker_id = new_worker_id(index)
    logs.configure(settings.log_level, settings.log_format, worker_id)
    for secret in secrets_of(settings):
        logs.register_secret(secret)
    # Ctrl-C reaches the whole process group; the supervisor decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _stop_with_the_supervisor()
    try:
        registry = load_handlers(settings.handlers, settings.app_dir)
    except HandlerImportError as exc:
        log.error("%s", exc)
        sys.exit(2)
    _tune_the_collector()
    status = 0
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(settings, registry, worker_id, index))
    except WorkerLoopDied:
        status = EXIT_LOOP_DIED
    exit_past_abandoned_runs(status)
    if status:
        sys.exit(status)


async def _serve(
    settings: Settings, registry: HandlerRegistry, worker_id: str, index: int | None
) -> None:
    worker = Worker(settings, registry, worker_id=worker_id, index=index)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, worker.stop)
    await worker.run()


def _tune_the_collector() -> None:
    """What is loaded by now (modules, handlers, settings) lives as long as the process:
    frozen, the collector never walks it again. Young collections every 10,000
    allocations rather than 700: a busy worker allocates that many in a few
    milliseconds, and a hedged standby keeps a window of live objects that each
    full collection would walk (bench/cpu.py measures both)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def _stop_with_the_supervisor() -> None:
    """A supervisor killed outright (SIGKILL, the OOM killer) cannot stop its workers,
    and they must not run on unsupervised: ask Linux to send this worker SIGTERM (a
    graceful stop) when its parent dies. Elsewhere, a service manager's process group
    kill does it."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
