"""One worker process: AMI sessions -> claims -> handlers -> outcomes.

The data path runs one way::

    ServerPool (a reader task per PBX, never waits)
        -> on_event: race or handle here
        -> Claimer (bounded buffer, insert_many batches)     -> winners
        -> HandlerScheduler (ordered per call, bounded)       -> outcome
        -> Outcomes (acks batched, failures recorded)

Beside it run the heartbeat (so others can tell this worker is alive) and the
reclaim loop (taking over the events of workers whose heartbeat expired, and
retrying failed events when their backoff has passed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from amiworker import logs
from amiworker.ami.message import Message
from amiworker.ami.pool import ServerPool
from amiworker.cancelling import cancel_until_done
from amiworker.fleet.claims import Claimer, Pending
from amiworker.fleet.dedup import races
from amiworker.fleet.dispatch import (
    HandlerContext,
    HandlerImportError,
    HandlerRegistry,
    load_handlers,
)
from amiworker.fleet.documents import DONE, event_document, message_from_document
from amiworker.fleet.locktable import LockTable, StoreUnavailable
from amiworker.fleet.metrics import start_worker_metrics
from amiworker.fleet.outcomes import Outcomes
from amiworker.fleet.scheduler import HandlerScheduler, Job
from amiworker.settings import Settings, secrets_of
from amiworker.stats import WorkerStats

__all__ = ["Worker", "new_worker_id", "run_worker_process"]

log = logging.getLogger("amiworker.fleet.worker")
# Most events one reclaim takes over.
_RECLAIM_LIMIT = 1000


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
        self.pool = ServerPool(
            settings.servers,
            on_event=self._on_event,
            reconnect_min=settings.reconnect_min,
            reconnect_max=settings.reconnect_max,
            connect_timeout=settings.connect_timeout,
            action_timeout=settings.action_timeout,
            ping_interval=settings.ping_interval,
            ping_timeout=settings.ping_timeout,
            max_message_size=settings.max_message_size,
        )
        self.claimer = Claimer(
            self.store,
            build_document=self._document,
            on_won=self._on_won,
            unavailable=StoreUnavailable,
            stats=self.stats,
            dedup_window=settings.dedup_window,
            batch_size=settings.batch_size,
            batch_delay=settings.batch_delay,
            buffer_size=settings.buffer_size,
        )
        self.outcomes = Outcomes(self.store, settings, self.stats)
        self.scheduler = HandlerScheduler(
            registry,
            self._context,
            concurrency=settings.handler_concurrency,
            timeout=settings.handler_timeout,
            on_finished=self.outcomes.record,
            # Plain handlers run in threads; time queueing for one counts against
            # handler_timeout, so there is a thread for every concurrent call.
            executor=ThreadPoolExecutor(settings.handler_concurrency, "handler"),
        )
        self.started_at = datetime.now(UTC)
        self._stop = asyncio.Event()

    # -- the hot path: called by the AMI reader, must never wait -------------------------

    def _on_event(self, server: str, message: Message, own_action: bool) -> None:
        if own_action:
            return  # answers this session's own action: never raced (see ami.routing)
        self.stats.events_seen += 1
        now = time.monotonic()
        if races(message, self.settings.race):
            self.claimer.submit(Pending(server, message, datetime.now(UTC), now))
        elif self.scheduler.wants(message.name):
            self.stats.local += 1
            self.scheduler.submit(Job(server, message, None, now))

    def _document(self, item: Pending) -> dict[str, Any]:
        doc = event_document(item.key, item.server, item.message, self.worker_id, item.received_at)
        if not self.scheduler.wants(item.message.name):
            # Nothing to run: stored as done at once, which saves an ack per event.
            doc["state"] = DONE
            doc["done_at"] = item.received_at
        return doc

    def _on_won(self, winners: list[Pending]) -> None:
        for item in winners:
            if self.scheduler.wants(item.message.name):
                self.scheduler.submit(Job(item.server, item.message, item.key, item.received_mono))

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
        events wait in the claim buffer until it is.
        """
        tasks = [
            asyncio.create_task(self.claimer.run(), name="claims"),
            asyncio.create_task(self.outcomes.run(), name="outcomes"),
            asyncio.create_task(self._heartbeats(), name="heartbeat"),
            asyncio.create_task(self._reclaims(), name="reclaim"),
            asyncio.create_task(self._prepare_store(), name="indexes"),
        ]
        stop_metrics = await start_worker_metrics(self, self.settings.metrics_port, self.index)
        await self.pool.start()
        log.info(
            "worker %s running: %d PBX(s), handlers for %s",
            self.worker_id,
            len(self.settings.servers),
            ", ".join(self.registry.event_names()) or "no event",
        )
        try:
            await self._stop.wait()
        finally:
            await self._shutdown(tasks)
            await stop_metrics()

    def stop(self) -> None:
        self._stop.set()

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        log.info("stopping: logging off, flushing claims, finishing handlers")
        await self.pool.stop(logoff=True)
        claims, outcomes, *others = tasks
        stopping_others = asyncio.create_task(cancel_until_done(others))
        self.claimer.stop()
        flushed, _ = await asyncio.wait({claims}, timeout=self.settings.shutdown_timeout)
        if not flushed:
            lost = self.claimer.depth
            self.stats.dropped += lost
            log.error(
                "stopping with %d event(s) not stored: MongoDB did not take them within "
                "shutdown_timeout (%.0f s)",
                lost,
                self.settings.shutdown_timeout,
            )
            # Not asyncio.wait_for: the claim loop may be inside the driver, where a
            # single cancellation can be lost (see amiworker.cancelling).
            await cancel_until_done([claims])
        if not await self.scheduler.join(self.settings.shutdown_timeout):
            log.error(
                "%d handler run(s) still going after %.0f s; abandoning them (a live worker "
                "will reclaim their events)",
                self.scheduler.depth,
                self.settings.shutdown_timeout,
            )
            await self.scheduler.cancel()
        self.outcomes.stop()
        await asyncio.gather(outcomes, stopping_others, return_exceptions=True)
        try:
            # The row stays (state "stopped") so `amiworker status` and the demo can
            # show the final counts; live workers delete it once its lease expired.
            await self.store.heartbeat(self.heartbeat_info(state="stopped"))
        except StoreUnavailable as exc:
            log.warning("could not record the stop: %s", exc)
        await self.store.close()
        log.info("stopped: %s", self.stats.as_dict())

    # -- background loops ---------------------------------------------------------------------

    def heartbeat_info(self, state: str = "running") -> dict[str, Any]:
        return {
            "state": state,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "servers": self.pool.status(),
            "counters": self.stats.as_dict(),
            "queue_depth": self.claimer.depth + self.scheduler.depth,
        }

    async def _prepare_store(self) -> None:
        delay = 0.5
        while True:
            try:
                await self.store.ensure_indexes(self.settings.ttl_days)
                return
            except Exception as exc:  # StoreUnavailable, or a driver's own surprise
                if delay == 0.5:
                    log.error(
                        "%s. Reading AMI on, holding up to %d events meanwhile",
                        exc,
                        self.settings.buffer_size,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _heartbeats(self) -> None:
        while True:
            try:
                await self.store.heartbeat(self.heartbeat_info())
            except StoreUnavailable as exc:
                log.debug("heartbeat failed: %s", exc)
            await asyncio.sleep(self.settings.heartbeat_interval)

    async def _reclaims(self) -> None:
        # Every heartbeat: events of dead workers, found from the small workers
        # collection. Due retries need a query of the events collection, so that
        # runs when a failure recorded here comes due, and otherwise every lease
        # (for failures recorded by a worker that died since, and `amiworker
        # retry`): n workers searching every heartbeat cost the store a query
        # each, which on a store without a usable index is a full scan.
        settings = self.settings
        # Spread over the second half of the first lease: workers started together
        # do not search together.
        next_retry_search = time.monotonic() + random.uniform(0.5, 1.0) * settings.lease
        while True:
            await asyncio.sleep(settings.heartbeat_interval)
            now = time.monotonic()
            retries = now >= next_retry_search or self.outcomes.retry_due(now)
            try:
                docs = await self.store.reclaim(
                    settings.lease,
                    max_attempts=settings.max_attempts,
                    limit=_RECLAIM_LIMIT,
                    retries=retries,
                )
            except StoreUnavailable as exc:
                log.debug("reclaim failed: %s", exc)
                continue
            if retries:
                self.outcomes.forget_due_retries(now)
                # A full batch: more may be due, look again next time.
                full = len(docs) >= _RECLAIM_LIMIT
                next_retry_search = now if full else now + settings.lease
            if docs:
                log.info("took over %d event(s) to run (dead worker or retry due)", len(docs))
            now = time.monotonic()
            for doc in docs:
                self.stats.reclaimed += 1
                message = message_from_document(doc)
                self.scheduler.submit(Job(doc["server"], message, doc["_id"], now))


def run_worker_process(settings: Settings, index: int | None = None) -> None:
    """Entry point of a worker process (spawned by the supervisor)."""
    worker_id = new_worker_id(index)
    logs.configure(settings.log_level, settings.log_format, worker_id)
    for secret in secrets_of(settings):
        logs.register_secret(secret)
    # Ctrl-C reaches the whole process group; the supervisor decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        registry = load_handlers(settings.handlers, settings.app_dir)
    except HandlerImportError as exc:
        log.error("%s", exc)
        sys.exit(2)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(settings, registry, worker_id, index))


async def _serve(
    settings: Settings, registry: HandlerRegistry, worker_id: str, index: int | None
) -> None:
    worker = Worker(settings, registry, worker_id=worker_id, index=index)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, worker.stop)
    await worker.run()
