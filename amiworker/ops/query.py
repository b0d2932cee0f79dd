"""The Python query API of the event log; every ``amiworker`` query command uses it.

::

    from amiworker.ops.query import EventQuery

    async with EventQuery.from_settings(settings) as log:     # or EventQuery(database)
        for doc in await log.events(server="pbx1", event="Hangup", since="1h", limit=20):
            print(doc["ts"], doc["headers"].get("cause"))
        story = await log.call("1795675581.2")                 # CallStory, or None
        causes = await log.hangup_causes(since="1d")           # [HangupCause(cause, text, count)]
        busiest = await log.busiest_extensions(since="7d")     # [ExtensionCount(exten, calls)]
        fleet = await log.workers(lease=settings.lease)        # [WorkerStatus]
        revived = await log.retry_dead(event="Hangup")         # dead -> failed, due now
        await log.retry_event(event_id)                        # the same for one event

Every method turns driver errors into :class:`~amiworker.mongo.StoreUnavailable`,
one line that names the server (password masked) and what to do.

Events come oldest first, in the order :mod:`amiworker.ops.filters` defines.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from pymongo.errors import PyMongoError

from amiworker.fleet.documents import DEAD, FAILED
from amiworker.mongo import (
    StoreUnavailable,
    close_client,
    open_client,
    server_time,
    unavailable,
)
from amiworker.ops.filters import EventFilter, TimeArg, event_order, first_value, in_order
from amiworker.settings import redact_uri

if TYPE_CHECKING:
    from amiworker.settings import Settings

__all__ = [
    "CallStory",
    "Channel",
    "EventQuery",
    "ExtensionCount",
    "HangupCause",
    "WorkerStatus",
    "channels_of",
]

WORKERS_COLLECTION: Final = "workers"
CALLS_COLLECTION: Final = "calls"


# -- results ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Channel:
    """One channel of a call, as its events tell it."""

    uniqueid: str
    name: str | None = None
    first_seen: datetime | None = None
    states: list[tuple[datetime, str]] = field(default_factory=list)  # (ts, ChannelStateDesc)
    hangup_at: datetime | None = None
    hangup_cause: str | None = None
    hangup_cause_txt: str | None = None


@dataclass(slots=True)
class CallStory:
    """Everything the log holds about one call (one Linkedid)."""

    linkedid: str
    events: list[dict[str, Any]]  # in order
    channels: list[Channel]  # in order of first appearance
    projection: dict[str, Any] | None  # the call's document in the calls collection

    @property
    def servers(self) -> list[str]:
        return sorted({str(doc.get("server")) for doc in self.events})


@dataclass(frozen=True, slots=True)
class HangupCause:
    cause: str | None  # the Q.850 cause code, as sent ("16")
    text: str | None  # Cause-txt ("Normal Clearing")
    count: int  # channels hung up with it


@dataclass(frozen=True, slots=True)
class ExtensionCount:
    exten: str | None
    calls: int


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """A row of the ``workers`` collection, judged against the lease."""

    worker_id: str
    state: str  # "running", or "stopped" (its final counts, kept until its lease expires)
    host: str | None
    pid: int | None
    servers: Any  # as reported by the worker's PBX pool
    counters: dict[str, int]
    queue_depth: int | None
    started_at: datetime | str | None
    last_seen: datetime | None
    age: float | None  # seconds since the last heartbeat, by the MongoDB server's clock
    stale: bool  # running, but no heartbeat within the lease: its events get taken over
    backlog: int | None = None  # events held for its handlers (queued or running)
    handlers: tuple[str, ...] | None = None  # the events it has handlers for
    mode: str | None = None  # claim_mode: "race" or "hedged"
    hedging: dict[str, Any] | None = None  # hedged: window depth, hedge lateness
    spill: dict[str, Any] | None = None  # events, bytes and oldest age of its spill


# -- the API ---------------------------------------------------------------------------------


class EventQuery:
    """Read-mostly access to the event log for people and tools (not for workers).

    ``database`` is a database object of either driver. Use
    :meth:`from_settings` to open a client as configured (closed by
    :meth:`close`, or by ``async with``).
    """

    def __init__(
        self,
        database: Any,
        collection: str = "events",
        *,
        calls_collection: str = CALLS_COLLECTION,
        uri: str | None = None,
        client: Any = None,
    ) -> None:
        self.database = database
        self.collection = collection
        self.events_collection = database[collection]
        self.calls_collection = calls_collection
        self._client = client
        self._where = redact_uri(uri) if uri else f"database {database.name!r}"

    @classmethod
    def from_settings(cls, settings: Settings) -> EventQuery:
        client = open_client(
            settings.mongo_uri,
            settings.driver,
            serverSelectionTimeoutMS=int(settings.connect_timeout * 1000),
        )
        return cls(
            client[settings.database], settings.collection, uri=settings.mongo_uri, client=client
        )

    async def close(self) -> None:
        if self._client is not None:
            await close_client(self._client)
            self._client = None

    async def __aenter__(self) -> EventQuery:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Driver errors inside become :class:`StoreUnavailable` (one line)."""
        try:
            yield
        except PyMongoError as exc:
            raise self.error(what, exc) from None

    def error(self, what: str, exc: PyMongoError) -> StoreUnavailable:
        """The one-line :class:`StoreUnavailable` for a driver error while doing ``what``."""
        return unavailable(self._where, what, exc)

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the server answers."""
        with self.errors("reach the server"):
            await self.database.command("ping")

    async def server_time(self) -> datetime:
        """The MongoDB server's clock, which stamps heartbeats."""
        with self.errors("read the server time"):
            return await server_time(self.database)

    # -- events ----------------------------------------------------------------------------

    async def events(
        self,
        *,
        server: str | None = None,
        event: str | Sequence[str] | None = None,
        uniqueid: str | None = None,
        linkedid: str | None = None,
        since: TimeArg = None,
        until: TimeArg = None,
        state: str | Sequence[str] | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` events matching, oldest first (see :meth:`EventFilter.of`)."""
        flt = EventFilter.of(
            server=server,
            event=event,
            uniqueid=uniqueid,
            linkedid=linkedid,
            since=since,
            until=until,
            state=state,
        )
        return await self.find(flt, limit=limit)

    async def find(self, flt: EventFilter, *, limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` events matching ``flt``, oldest first.

        Two steps so that an index serves the sort: the newest ``limit`` by
        ``ts`` alone give the oldest ``ts`` shown; then every event from that
        ``ts`` on is read, so events sharing it are ordered exactly.
        """
        if limit <= 0:
            return []
        query = flt.mongo(covering=True)
        with self.errors("query events"):
            newest = self.events_collection.find(query, {"ts": 1}).sort("ts", -1).limit(limit)
            stamps = [doc["ts"] async for doc in newest if flt.admits(doc)]
            if not stamps:
                return []
            bounded = {**query, "ts": {**query.get("ts", {}), "$gte": min(stamps)}}
            docs = [doc async for doc in self.events_collection.find(bounded) if flt.admits(doc)]
        docs.sort(key=event_order)
        return docs[-limit:]

    async def count(self, flt: EventFilter) -> int:
        with self.errors("count events"):
            return int(await self.events_collection.count_documents(flt.mongo()))

    async def event_names(self, flt: EventFilter) -> list[str]:
        """The distinct event names among the events matching ``flt``."""
        with self.errors("list event names"):
            names = await self.events_collection.distinct("event", flt.mongo(covering=True))
        return sorted(str(name) for name in names if name)

    async def scan(self, flt: EventFilter, batch_size: int = 1000) -> AsyncIterator[dict[str, Any]]:
        """Every event matching ``flt`` in order (see the module docstring), streamed."""
        with self.errors("read events"):
            cursor = self.events_collection.find(flt.mongo(covering=True)).sort("ts", 1)
            async for doc in in_order(cursor.batch_size(batch_size)):
                if flt.admits(doc):
                    yield doc

    # -- one call ------------------------------------------------------------------------

    async def call(self, linkedid: str, *, server: str | None = None) -> CallStory | None:
        """The events of one call in order, its channels, and its projection document.

        A call's events are those carrying its Linkedid, plus those of its
        channels that carry none (``LocalBridge`` names its channels by
        ``LocalOneUniqueid``...). None when the log holds no event of it.
        """
        base = {"server": server} if server else {}
        with self.errors("read a call"):
            docs = {
                doc["_id"]: doc
                async for doc in self.events_collection.find({**base, "linkedid": linkedid})
            }
            if not docs:
                return None
            ids = sorted({str(doc["uniqueid"]) for doc in docs.values() if doc.get("uniqueid")})
            async for doc in self.events_collection.find({**base, "uniqueid": {"$in": ids}}):
                docs.setdefault(doc["_id"], doc)
            projection = await self.database[self.calls_collection].find_one({"_id": linkedid})
        events = sorted(docs.values(), key=event_order)
        return CallStory(linkedid, events, channels_of(events), projection)

    # -- reports ---------------------------------------------------------------------------

    async def hangup_causes(
        self, since: TimeArg = None, until: TimeArg = None, *, server: str | None = None
    ) -> list[HangupCause]:
        """How many channels hung up with each cause, most frequent first."""
        flt = EventFilter.of(server=server, event="Hangup", since=since, until=until)
        pipeline = [
            {"$match": flt.mongo()},
            {
                "$group": {
                    "_id": "$headers.cause",
                    "text": {"$first": "$headers.cause-txt"},
                    "count": {"$sum": 1},
                }
            },
            {"$sort": {"count": -1, "_id": 1}},
        ]
        rows = await self._aggregate(pipeline, "count hangup causes")
        return [
            HangupCause(_text(row["_id"]), _text(row.get("text")), row["count"]) for row in rows
        ]

    async def busiest_extensions(
        self,
        since: TimeArg = None,
        until: TimeArg = None,
        *,
        server: str | None = None,
        limit: int = 10,
    ) -> list[ExtensionCount]:
        """Extensions by number of calls placed to them, busiest first.

        A call counts for the ``Exten`` of the channel that started it: the
        Newchannel whose Uniqueid is the Linkedid.
        """
        flt = EventFilter.of(server=server, event="Newchannel", since=since, until=until)
        pipeline: list[dict[str, Any]] = [
            {"$match": {**flt.mongo(), "$expr": {"$eq": ["$uniqueid", "$linkedid"]}}},
            {"$group": {"_id": "$headers.exten", "calls": {"$sum": 1}}},
            {"$sort": {"calls": -1, "_id": 1}},
            {"$limit": limit},
        ]
        rows = await self._aggregate(pipeline, "count calls per extension")
        return [ExtensionCount(_text(row["_id"]), row["calls"]) for row in rows]

    async def _aggregate(self, pipeline: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
        with self.errors(what):
            cursor = self.events_collection.aggregate(pipeline)
            if not hasattr(cursor, "__aiter__"):
                cursor = await cursor  # PyMongo's asyncio aggregate is a coroutine
            return [row async for row in cursor]

    # -- the fleet and dead events -------------------------------------------------------

    async def workers(self, lease: float) -> list[WorkerStatus]:
        """Every worker row; ``stale`` when it runs but its last heartbeat is older than
        ``lease`` s. A worker that stopped cleanly keeps its row (``state="stopped"``,
        final counts) until a live worker removes it."""
        now = await self.server_time()
        with self.errors("list workers"):
            rows = [doc async for doc in self.database[WORKERS_COLLECTION].find({}).sort("_id", 1)]
        return [_worker_status(row, now, lease) for row in rows]

    async def retry_dead(
        self,
        flt: EventFilter | None = None,
        *,
        server: str | None = None,
        event: str | Sequence[str] | None = None,
        since: TimeArg = None,
        until: TimeArg = None,
    ) -> int:
        """Make dead events due for a retry now (``failed``, attempts back to 0).

        Matching ``flt`` (its states ignored), or else the keyword criteria.
        Returns how many. A running worker picks them up within a heartbeat.
        """
        if flt is None:
            flt = EventFilter.of(server=server, event=event, since=since, until=until)
        query = {**replace(flt, states=()).mongo(), "state": DEAD}
        with self.errors("retry dead events"):
            result = await self.events_collection.update_many(
                query,
                {"$set": {"state": FAILED, "attempts": 0}, "$currentDate": {"retry_at": True}},
            )
        return int(result.modified_count)

    async def event(self, event_id: Any) -> dict[str, Any] | None:
        """One stored event by its ``_id`` (the dedup key), or None."""
        with self.errors("read an event"):
            doc: dict[str, Any] | None = await self.events_collection.find_one({"_id": event_id})
        return doc

    async def retry_event(self, event_id: Any) -> bool:
        """:meth:`retry_dead` for one event, by its ``_id``: True if it was dead and is
        now ``failed`` and due (attempts back to 0); False if it is not dead, or unknown."""
        with self.errors("retry an event"):
            result = await self.events_collection.update_one(
                {"_id": event_id, "state": DEAD},
                {"$set": {"state": FAILED, "attempts": 0}, "$currentDate": {"retry_at": True}},
            )
        return bool(result.modified_count == 1)


def _text(value: Any) -> str | None:
    value = first_value(value)
    return None if value is None else str(value)


def channels_of(events: Iterable[Mapping[str, Any]]) -> list[Channel]:
    """The channels of a call, from its events in order."""
    channels: dict[str, Channel] = {}
    for doc in events:
        headers = doc.get("headers") or {}
        uniqueid = first_value(headers.get("uniqueid"))
        if not uniqueid:
            continue  # LocalBridge, DeviceStateChange...: no channel of its own
        channel = channels.get(uniqueid)
        ts = doc.get("ts")
        if channel is None:
            channel = channels[uniqueid] = Channel(uniqueid, first_seen=ts)
        name = first_value(headers.get("channel"))
        if name:
            channel.name = name
        event = str(doc.get("event", "")).lower()
        state = first_value(headers.get("channelstatedesc"))
        if event in ("newchannel", "newstate") and state and isinstance(ts, datetime):
            if not channel.states or channel.states[-1][1] != state:
                channel.states.append((ts, state))
        elif event == "hangup":
            channel.hangup_at = ts
            channel.hangup_cause = first_value(headers.get("cause"))
            channel.hangup_cause_txt = first_value(headers.get("cause-txt"))
    return list(channels.values())


def _worker_status(row: Mapping[str, Any], now: datetime, lease: float) -> WorkerStatus:
    last_seen = row.get("last_seen")
    age: float | None = None
    if isinstance(last_seen, datetime):
        if last_seen.tzinfo is None:
            last_seen = last_seen.replace(tzinfo=UTC)
        age = max(0.0, (now - last_seen).total_seconds())
    else:
        last_seen = None
    counters = row.get("counters") or {}
    pid = row.get("pid")
    depth = row.get("queue_depth")
    backlog = row.get("backlog")
    handlers = row.get("handlers")
    state = str(row.get("state") or "running")
    return WorkerStatus(
        worker_id=str(row["_id"]),
        state=state,
        host=row.get("host"),
        pid=int(pid) if isinstance(pid, int | float) else None,
        servers=row.get("servers"),
        counters={str(k): int(v) for k, v in counters.items() if isinstance(v, int | float)},
        queue_depth=int(depth) if isinstance(depth, int | float) else None,
        started_at=row.get("started_at"),
        last_seen=last_seen,
        age=age,
        stale=state != "stopped" and (age is None or age > lease),
        backlog=int(backlog) if isinstance(backlog, int | float) else None,
        handlers=tuple(str(h) for h in handlers) if isinstance(handlers, list) else None,
        mode=str(row["mode"]) if row.get("mode") else None,
        hedging=dict(row["hedging"]) if isinstance(row.get("hedging"), Mapping) else None,
        spill=dict(row["spill"]) if isinstance(row.get("spill"), Mapping) else None,
    )
