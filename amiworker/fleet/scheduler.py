"""Running handlers: in order within a call, concurrently across calls.

A call's events (same Linkedid) are queued together and run one after another
in the order received, so a handler never sees a Hangup before the Newchannel
it follows. Different calls run concurrently, at most ``concurrency`` at once.

A pool of runner tasks (up to ``concurrency``, started as work needs them and
then kept) takes calls with work queued, one call at a time each: no task is
created per event or per call, which at tens of thousands of events per second
would cost more than running a quick handler.

Events every worker handles (not stored: ``Job.key`` is None) go to the front
of the line, and a runner holding a call runs those waiting between two of the
call's events (not those that come meanwhile, lest a stream of them stall the
call). Unlike a stored event, which can wait ``queued`` in MongoDB for a worker
with room, they have nowhere else to wait, and behind a backlog of slow calls
(a runner keeps a call until its queue is empty) they would fill their share
of the backlog and be dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from amiworker.ami.message import Message
from amiworker.cancelling import cancel_until_done
from amiworker.fleet.dispatch import (
    HandlerRegistry,
    describe_exception,
    handler_name,
    run_handlers,
)

__all__ = ["HandlerScheduler", "Job", "order_key"]

log = logging.getLogger("amiworker.fleet.scheduler")
# The share of the backlog that claims and take-overs leave to events every
# worker handles (no Uniqueid, never stored): those cannot wait in MongoDB for
# a worker with room, so a backlog that stored events filled would drop them.
_LOCAL_SHARE = 10  # one tenth
# Seconds a stop keeps cancelling handler runs that catch their cancellation.
_GIVE_UP_AFTER = 5.0


@dataclass(slots=True)
class Job:
    """One event to run through its handlers."""

    server: str
    message: Message
    key: str | None  # the stored document's _id; None for an event handled locally
    received_mono: float
    attempts: int = 0  # runs of it that failed before this one (the stored count)


def order_key(server: str, message: Message) -> str:
    """Events with the same key run in order: the call, else the channel.

    The call is the ``Linkedid``, or for an event without one the first header
    ending in ``linkedid`` (``DestLinkedid`` of a DialBegin with no caller,
    ``LocalOneLinkedid``...), so that such events run in order with the rest of
    their call; then the channel, likewise by ``Uniqueid``.
    """
    value = message.get("Linkedid") or _first_ending(message, "linkedid")
    if not value:
        value = message.get("Uniqueid") or _first_ending(message, "uniqueid")
    return f"{server}\0{value}" if value else server


def _first_ending(message: Message, suffix: str) -> str | None:
    for name, value in message.headers:
        if value and name.lower().endswith(suffix):
            return value
    return None


class HandlerScheduler:
    def __init__(
        self,
        registry: HandlerRegistry,
        context_for: Callable[[Job], Any],
        *,
        concurrency: int,
        timeout: float,
        on_finished: Callable[[Job, BaseException | None], None],
        executor: Executor | None = None,
        backlog: int = 1_000_000,
        max_attempts: int | None = None,
    ) -> None:
        self._registry = registry
        self._max_attempts = max_attempts
        self._executor = executor
        self._context_for = context_for
        self._timeout = timeout
        self._on_finished = on_finished
        self._concurrency = concurrency
        self._backlog = backlog
        self._local_headroom = backlog // _LOCAL_SHARE
        # Room promised to claims and take-overs under way (reserve/release).
        self._reserved = 0
        self._room_freed = asyncio.Event()
        # Calls with work queued or running -> their events, oldest first.
        self._queues: dict[str, deque[Job]] = {}
        # Calls with work queued that no runner has taken yet, in arrival order
        # but for calls of events every worker handles, which go first.
        self._ready: deque[str] = deque()
        # Calls a runner holds without running them: a call paused between two of
        # its events while such events run, and those it took to run. Nothing of
        # their queues has started.
        self._held_unstarted: set[str] = set()
        self._runners: set[asyncio.Task[None]] = set()
        # Runners with nothing to do wait on these; _wake() wakes one.
        self._parked: deque[asyncio.Future[None]] = deque()
        self._wanted: dict[str, bool] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._queued = 0
        #: Called with the seconds from receipt to handler start (latency metrics).
        self.on_started: Callable[[float], None] | None = None

    def wants(self, event_name: str) -> bool:
        """Whether any handler runs for ``event_name`` (asked of every event: memoised)."""
        wanted = self._wanted.get(event_name)
        if wanted is None:
            if len(self._wanted) > 10_000:  # names a PBX made up: forget, stay bounded
                self._wanted.clear()
            wanted = self._wanted[event_name] = bool(self._registry.handlers_for(event_name))
        return wanted

    @property
    def depth(self) -> int:
        """Events queued or running."""
        return self._queued

    @property
    def room(self) -> int:
        """How many more events the backlog bound (``handler_backlog``) lets in.

        The bound is the caller's to respect: what it wins beyond it, it stores
        as queued for any worker with room (see fleet.locktable), rather than
        holding events here that a crash would strand for a lease. The last
        tenth of the backlog is not counted: it is :attr:`local_room`'s.
        """
        return max(0, self._backlog - self._local_headroom - self._queued - self._reserved)

    @property
    def local_room(self) -> int:
        """How many more events handled by this worker alone (not stored) fit: the
        whole backlog, including the tenth that :attr:`room` leaves them."""
        return max(0, self._backlog - self._queued - self._reserved)

    def reserve(self, wanted: int) -> int:
        """Promise room for up to ``wanted`` events about to be submitted (a claim or a
        take-over in flight): two of them at once never both fill the same room.
        Returns how many were granted; each is used by ``submit(..., reserved=True)``
        or given back with :meth:`release`."""
        granted = max(0, min(wanted, self.room))
        self._reserved += granted
        return granted

    async def room_freed(self, timeout: float) -> None:
        """Until a handler run finishes (room may have freed), or ``timeout`` passes."""
        self._room_freed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._room_freed.wait()

    def release(self, count: int) -> None:
        """Give back room reserved and not used."""
        self._reserved = max(0, self._reserved - count)

    def drain_unstarted(self) -> list[Job]:
        """Remove and return every queued event whose handlers have not started,
        oldest first per call (a stopping worker releases them to the others)."""
        waiting = set(self._ready) | self._held_unstarted
        drained: list[Job] = []
        for key, queue in list(self._queues.items()):
            if key in waiting:  # no runner has this call: none of it started
                drained.extend(queue)
                del self._queues[key]
            else:  # queue[0] is running: the rest has not started
                running = queue.popleft()
                drained.extend(queue)
                queue.clear()
                queue.append(running)
        self._ready.clear()
        self._queued -= len(drained)
        if not self._queues:
            self._idle.set()
        return drained

    def running(self) -> list[Job]:
        """The events whose handlers are running now."""
        waiting = set(self._ready) | self._held_unstarted
        return [queue[0] for key, queue in self._queues.items() if key not in waiting and queue]

    def submit(self, job: Job, *, reserved: bool = False) -> None:
        """Queue ``job``; ``reserved``: it uses room granted by :meth:`reserve`."""
        if reserved:
            self._reserved = max(0, self._reserved - 1)
        key = order_key(job.server, job.message)
        self._queued += 1
        self._idle.clear()
        queue = self._queues.get(key)
        if queue is not None:
            queue.append(job)  # its runner (or the next one free) gets to it in order
            return
        self._queues[key] = deque((job,))
        if job.key is None:
            self._ready.appendleft(key)  # the next runner free takes it (see above)
        else:
            self._ready.append(key)
        self._wake()

    def _wake(self) -> None:
        """A call is ready: a parked runner, else a new one if under ``concurrency``,
        takes it; else every runner is busy and the first one free takes it."""
        while self._parked:
            parked = self._parked.popleft()
            if not parked.done():
                parked.set_result(None)
                return
        if len(self._runners) < self._concurrency:
            task = asyncio.create_task(self._runner(), name="handlers")
            self._runners.add(task)
            task.add_done_callback(self._runners.discard)

    def _local_first(self) -> bool:
        """Whether the call at the front of the line is of events every worker handles
        (its first event is not stored)."""
        ready = self._ready
        return bool(ready) and self._queues[ready[0]][0].key is None

    async def _runner(self) -> None:
        loop = asyncio.get_running_loop()
        ready, queues = self._ready, self._queues
        while True:
            if not ready:
                parked = loop.create_future()
                self._parked.append(parked)
                await parked
                continue
            key = ready.popleft()
            await self._run_call(key, between=queues[key][0].key is not None)

    async def _run_call(self, key: str, *, between: bool, limit: int | None = None) -> None:
        """Run the call ``key``'s queue to its end, or only its first ``limit`` events
        (the rest back at the front of the line). ``between``: between two of its
        events, run the calls of events every worker handles that are waiting."""
        queues, ready = self._queues, self._ready
        queue = queues[key]
        while queue:
            if limit is not None:
                if limit == 0:
                    ready.appendleft(key)
                    self._wake()
                    return
                limit -= 1
            job = queue[0]
            try:
                await self._run(job)
            except Exception:  # a bug here must not leave a call's events stranded
                log.exception("internal error running the handlers of %s", job.key)
            finally:
                queue.popleft()
                self._queued -= 1
                if not self._room_freed.is_set():
                    self._room_freed.set()
            if between and queue and self._local_first():
                await self._run_waiting_local(key)
                if queues.get(key) is not queue:  # released meanwhile by a stop
                    return
        # No await between the empty check and this: nothing can slip in between.
        del queues[key]
        if not queues:
            self._idle.set()

    async def _run_waiting_local(self, paused: str) -> None:
        """Between two events of the call ``paused``, run the events every worker
        handles that wait now; not those that come meanwhile: they may come as fast
        as they run, and the call must go on."""
        ready, queues, held = self._ready, self._queues, self._held_unstarted
        taken: list[tuple[str, deque[Job]]] = []
        while self._local_first():
            local = ready.popleft()
            taken.append((local, queues[local]))
        held.add(paused)
        held.update(local for local, _ in taken)
        try:
            for local, queue in taken:
                held.discard(local)
                if queues.get(local) is queue:  # else released meanwhile by a stop
                    await self._run_call(local, between=False, limit=len(queue))
        finally:
            held.discard(paused)
            held.difference_update(local for local, _ in taken)

    def _what_follows(self, job: Job) -> str:
        """Which attempt failed, and what comes of it (as the store records it)."""
        limit = self._max_attempts
        if job.key is None or limit is None:
            return ""  # not stored: not retried
        attempt = job.attempts + 1
        if attempt >= limit:
            return f" (attempt {attempt} of {limit}: now dead; `amiworker retry` re-queues it)"
        return f" (attempt {attempt} of {limit}; retried after a backoff)"

    async def _run(self, job: Job) -> None:
        if self.on_started is not None:
            self.on_started(time.monotonic() - job.received_mono)
        try:
            context = self._context_for(job)
        except Exception as exc:  # no context, no run: a failed run, retried later
            log.error(
                "no handler context for %s event %s: %s",
                job.message.name,
                job.key or "(local)",
                describe_exception(exc),
                extra={"server": job.server},
            )
            self._on_finished(job, exc)
            return
        failures = await run_handlers(
            self._registry, context, job.message, self._timeout, executor=self._executor
        )
        for handler, failure in failures:
            log.error(
                "handler %s failed on %s event %s%s: %s",
                handler_name(handler),
                job.message.name,
                job.key or "(local)",
                self._what_follows(job),
                describe_exception(failure),
                extra={"server": job.server},
            )
        error = failures[0][1] if failures else None
        self._on_finished(job, error)

    async def join(self, timeout: float | None = None) -> bool:
        """Wait until every queued event has run; False if ``timeout`` passed first."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def cancel(self) -> None:
        """Stop every runner (abandoning what is running and queued)."""
        stuck = await cancel_until_done(list(self._runners), give_up_after=_GIVE_UP_AFTER)
        if stuck:
            log.error(
                "%d handler run(s) ignore cancellation; abandoning them as they are",
                len(stuck),
            )
