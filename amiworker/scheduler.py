"""Running handlers: in order within a call, concurrently across calls.

A call's events (same Linkedid) are queued together and run one after another
in the order received, so a handler never sees a Hangup before the Newchannel
it follows. Different calls run concurrently, at most ``concurrency`` at once.
There is one task per call with work queued, not one per event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from amiworker.dispatch import HandlerRegistry, describe_exception, invoke
from amiworker.protocol import Message

__all__ = ["HandlerScheduler", "Job", "order_key"]

log = logging.getLogger("amiworker.scheduler")


@dataclass(slots=True)
class Job:
    """One event to run through its handlers."""

    server: str
    message: Message
    key: str | None  # the stored document's _id; None for an event handled locally
    received_mono: float
    attempts: int = 0


def order_key(server: str, message: Message) -> str:
    """Events with the same key run in order: the call (Linkedid), else the channel."""
    linkedid = message.get("Linkedid")
    if linkedid:
        return f"{server}\0{linkedid}"
    for name, value in message.headers:
        if name.lower().endswith("uniqueid") and value:
            return f"{server}\0{value}"
    return server


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
    ) -> None:
        self._registry = registry
        self._executor = executor
        self._context_for = context_for
        self._timeout = timeout
        self._on_finished = on_finished
        self._slots = asyncio.Semaphore(concurrency)
        self._queues: dict[str, deque[Job]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._queued = 0
        #: Called with the seconds from receipt to handler start (latency metrics).
        self.on_started: Callable[[float], None] | None = None

    def wants(self, event_name: str) -> bool:
        return bool(self._registry.handlers_for(event_name))

    @property
    def depth(self) -> int:
        """Events queued or running."""
        return self._queued

    def submit(self, job: Job) -> None:
        key = order_key(job.server, job.message)
        queue = self._queues.get(key)
        self._queued += 1
        self._idle.clear()
        if queue is not None:
            queue.append(job)
            return
        queue = self._queues[key] = deque((job,))
        task = asyncio.create_task(self._run_call(key, queue), name=f"handlers:{key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_call(self, key: str, queue: deque[Job]) -> None:
        async with self._slots:
            while queue:
                job = queue[0]
                try:
                    await self._run(job)
                finally:
                    queue.popleft()
                    self._queued -= 1
        # No await between the empty check and this: nothing can slip in between.
        del self._queues[key]
        if not self._queues:
            self._idle.set()

    async def _run(self, job: Job) -> None:
        if self.on_started is not None:
            self.on_started(time.monotonic() - job.received_mono)
        context = self._context_for(job)
        error: BaseException | None = None
        for handler in self._registry.handlers_for(job.message.name):
            try:
                await invoke(handler, context, job.message, self._timeout, executor=self._executor)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if error is None:
                    error = exc
                log.error(
                    "handler %s failed on %s event %s: %s",
                    getattr(handler, "__qualname__", handler),
                    job.message.name,
                    job.key or "(local)",
                    describe_exception(exc),
                    extra={"server": job.server},
                )
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
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
