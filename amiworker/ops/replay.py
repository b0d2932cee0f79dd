"""Replay: run stored events through handlers again, to rebuild a projection from the log.

The events are read in stored order (see :mod:`amiworker.ops.filters`) and
each runs through every handler of its event, one at a time: a projection
rebuilt this way sees the events in the order they happened, which is stricter
than what the workers guarantee (order within a call only), so handlers
written for the workers work here unchanged.

A replay only reads the log: it never changes an event's state, and it runs
beside a live fleet without either noticing the other. The handler context is
the one the workers give, except for two fields:

- ``ami`` is None: there is no live PBX session during a replay. A handler
  that sends actions must skip them when ``ctx.ami is None``.
- ``worker_id`` is ``"replay"``.

``ctx.event_id`` is the stored event's ``_id``, as in the workers, so a
handler that keys its writes on it stays idempotent across live runs and
replays.

``ctx.db`` is the event log's database, or ``into`` (another database) to
build a projection beside the live one and compare before switching over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final

from amiworker.fleet.dispatch import (
    HandlerContext,
    HandlerRegistry,
    describe_exception,
    handler_name,
    run_handlers,
)
from amiworker.fleet.documents import message_from_document
from amiworker.ops.filters import EventFilter
from amiworker.ops.query import EventQuery

__all__ = ["REPLAY_WORKER_ID", "ReplaySummary", "replay"]

REPLAY_WORKER_ID: Final = "replay"
MAX_ERRORS_KEPT: Final = 20

#: ``progress(events_done, events_total)``
Progress = Callable[[int, int], None]


@dataclass(slots=True)
class ReplaySummary:
    events_read: int = 0
    handler_runs: int = 0
    failures: int = 0  # handler runs that raised or timed out
    elapsed: float = 0.0
    total: int = 0  # events matching, counted before the replay started
    errors: list[str] = field(default_factory=list)  # the first MAX_ERRORS_KEPT failures

    def describe(self) -> str:
        return (
            f"{self.events_read} event(s) read, {self.handler_runs} handler run(s), "
            f"{self.failures} failure(s) in {self.elapsed:.1f} s"
        )


async def replay(
    query: EventQuery,
    registry: HandlerRegistry,
    flt: EventFilter | None = None,
    *,
    into: Any = None,
    timeout: float = 30.0,
    progress: Progress | None = None,
) -> ReplaySummary:
    """Run every stored event matching ``flt`` that has a handler in ``registry``.

    ``into``: the database handlers get as ``ctx.db`` (default: the log's).
    ``timeout``: seconds each handler run may take. A failing handler is
    counted and the replay goes on. Raises StoreUnavailable if the log
    cannot be read.
    """
    started = time.monotonic()
    summary = ReplaySummary()
    flt = flt or EventFilter()
    names = [name for name in await query.event_names(flt) if registry.handlers_for(name)]
    if flt.events:
        names = [name for name in names if name in flt.events]
    if not names:
        summary.elapsed = time.monotonic() - started
        return summary
    flt = replace(flt, events=tuple(names))
    summary.total = await query.count(flt)
    database = into if into is not None else query.database
    if progress is not None:
        progress(0, summary.total)
    async for doc in query.scan(flt):
        summary.events_read += 1
        ctx = HandlerContext.create(
            server=str(doc.get("server")),
            ami=None,
            db=database,
            worker_id=REPLAY_WORKER_ID,
            event_id=str(doc["_id"]),
        )
        event = message_from_document(doc)
        summary.handler_runs += len(registry.handlers_for(event.name))
        for handler, exc in await run_handlers(registry, ctx, event, timeout):
            summary.failures += 1
            if len(summary.errors) < MAX_ERRORS_KEPT:
                summary.errors.append(
                    f"{handler_name(handler)} on {event.name} {doc['_id']}: "
                    f"{describe_exception(exc)}"
                )
        if progress is not None:
            progress(summary.events_read, summary.total)
    summary.elapsed = time.monotonic() - started
    return summary
