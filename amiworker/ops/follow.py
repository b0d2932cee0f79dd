"""Tailing the event log: the newest events, then every new one as it is stored.

Two ways to see new events, picked by trying:

**A change stream** (MongoDB replica sets and sharded clusters). It is opened
*before* the newest events are read, so an event stored in between is both
read and streamed: the stream skips the ids already shown. Nothing is missed,
nothing repeated.

**Polling** (a standalone MongoDB refuses change streams; so does a user
without the ``changeStream`` privilege). Each poll reads the events whose
``received_at`` lies within ``settle`` seconds before the newest one seen, and
shows those not shown yet. A plain cursor on ``(received_at, _id)`` would
miss events: ``received_at`` is the receiving worker's clock in milliseconds,
so many events share one, ``_id`` is a digest with no order, and a worker
stores a batch some milliseconds after it received it, while another worker's
later events are already visible. The window re-reads those stragglers; the
ids seen within it keep them from being shown twice. An event stored more
than ``settle`` seconds after it was received (a worker that held it while
MongoDB was unreachable, or clocks further apart than that) can still be
missed by polling, never by a change stream.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pymongo.errors import OperationFailure, PyMongoError

from amiworker.ops.filters import EventFilter, event_order
from amiworker.ops.query import EventQuery

__all__ = ["FollowMode", "follow"]

FollowMode = Literal["auto", "changes", "poll"]

# A change stream's server-side wait per getMore: short, so that stopping is prompt.
_STREAM_WAIT_MS = 500
_IDLE_PAUSE = 0.1


async def follow(
    query: EventQuery,
    flt: EventFilter,
    *,
    backlog: int = 50,
    mode: FollowMode = "auto",
    poll_interval: float = 0.5,
    settle: float = 10.0,
    on_mode: Callable[[str, str | None], None] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """The newest ``backlog`` events matching ``flt`` (oldest first), then each new one.

    Runs until the caller stops iterating. ``mode``: ``"changes"`` (change
    stream or fail), ``"poll"``, or ``"auto"`` (a change stream when the server
    allows one). ``on_mode(mode, reason)`` is told which one runs, and why it
    is not a change stream. ``flt`` may not select states or an end time: a
    new event is stored as ``claimed`` and its state changes later.
    """
    if flt.states or flt.until is not None:
        raise ValueError("following new events cannot select states or an end time")
    stream = None
    if mode != "poll":
        try:
            stream = await _open_stream(query, flt)
        except OperationFailure as exc:
            if mode == "changes":
                raise query.error("open a change stream", exc) from None
            if on_mode is not None:
                on_mode("poll", f"no change streams here: {_reason(exc)}")
        except PyMongoError as exc:
            raise query.error("open a change stream", exc) from None
    if stream is not None:
        if on_mode is not None:
            on_mode("changes", None)
        try:
            async for doc in _from_stream(query, flt, stream, backlog):
                yield doc
        finally:
            await _close(stream)
        return
    if mode == "poll" and on_mode is not None:
        on_mode("poll", None)
    async for doc in _from_polls(query, flt, backlog, poll_interval, settle):
        yield doc


def _reason(exc: OperationFailure) -> str:
    message = (exc.details or {}).get("errmsg") or str(exc) or type(exc).__name__
    return f"{str(message).splitlines()[0][:200]} (code {exc.code})"


# -- change streams ------------------------------------------------------------------


class _Stream:
    def __init__(self, cursor: Any, first: dict[str, Any] | None) -> None:
        self.cursor = cursor
        self.first = first


async def _open_stream(query: EventQuery, flt: EventFilter) -> _Stream:
    """A started change stream of inserts matching ``flt``; raises OperationFailure
    where change streams are not supported or not allowed.

    PyMongo's asyncio ``watch`` starts the stream when awaited; Motor's starts
    on the first read, so it is read once here (and what that returns kept).
    """
    pipeline = [{"$match": {"operationType": "insert", **flt.mongo("fullDocument.")}}]
    cursor = query.events_collection.watch(pipeline, max_await_time_ms=_STREAM_WAIT_MS)
    if inspect.isawaitable(cursor):
        return _Stream(await cursor, None)
    return _Stream(cursor, await cursor.try_next())


async def _from_stream(
    query: EventQuery, flt: EventFilter, stream: _Stream, backlog: int
) -> AsyncIterator[dict[str, Any]]:
    shown: set[Any] = set()
    for doc in await query.find(flt, limit=backlog):
        shown.add(doc["_id"])
        yield doc
    pending = [stream.first] if stream.first is not None else []
    with query.errors("follow the change stream"):
        while True:
            if pending:
                change = pending.pop()
            else:
                started = time.monotonic()
                change = await stream.cursor.try_next()
                if change is None:
                    # MongoDB waits up to _STREAM_WAIT_MS before answering "nothing
                    # yet"; a server that answers at once must not be asked in a loop.
                    if time.monotonic() - started < _IDLE_PAUSE / 2:
                        await asyncio.sleep(_IDLE_PAUSE)
                    continue
            inserted = change.get("fullDocument")
            if inserted is None or inserted.get("_id") in shown or not flt.admits(inserted):
                continue  # stored between opening the stream and reading the backlog
            yield inserted


async def _close(stream: _Stream) -> None:
    result = stream.cursor.close()
    if inspect.isawaitable(result):
        await result


# -- polling ------------------------------------------------------------------------


async def _from_polls(
    query: EventQuery, flt: EventFilter, backlog: int, interval: float, settle: float
) -> AsyncIterator[dict[str, Any]]:
    window = timedelta(seconds=settle)
    # Every event already in the window counts as seen: it is either in the
    # backlog shown below or older than it.
    newest = await query.server_time()
    seen = {
        doc["_id"]: _utc(doc["received_at"]) for doc in await _window(query, flt, newest - window)
    }
    for doc in await query.find(flt, limit=backlog):
        seen[doc["_id"]] = _utc(doc["received_at"])
        yield doc
    newest = max([newest, *seen.values()])
    while True:
        await asyncio.sleep(interval)
        floor = newest - window
        fresh = [doc for doc in await _window(query, flt, floor) if doc["_id"] not in seen]
        if fresh:
            with query.errors("poll for new events"):
                ids = [doc["_id"] for doc in fresh]
                docs = [doc async for doc in query.events_collection.find({"_id": {"$in": ids}})]
            docs.sort(key=lambda doc: (_utc(doc["received_at"]), event_order(doc)))
            for doc in docs:
                seen[doc["_id"]] = _utc(doc["received_at"])
                newest = max(newest, seen[doc["_id"]])
                yield doc
        floor = newest - window
        for key in [key for key, received in seen.items() if received < floor]:
            del seen[key]


async def _window(query: EventQuery, flt: EventFilter, floor: datetime) -> list[dict[str, Any]]:
    """Ids and receipt times of the events matching ``flt`` received since ``floor``."""
    criteria = {**flt.mongo(covering=True), "received_at": {"$gte": floor}}
    with query.errors("poll for new events"):
        cursor = query.events_collection.find(criteria, {"_id": 1, "received_at": 1, "ts": 1})
        # Re-checked: an event older than the window must not come back as new.
        return [
            doc async for doc in cursor if _utc(doc["received_at"]) >= floor and flt.admits(doc)
        ]


def _utc(value: datetime) -> datetime:
    """Aware UTC (a client opened without ``tz_aware`` gives naive datetimes)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
