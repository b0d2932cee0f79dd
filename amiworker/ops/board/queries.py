"""What the board reads from MongoDB: the log (calls, rates, failures) and ``workers``.

**Calls in progress from the log.** A channel is up when the log holds its
``Newchannel`` and no ``Hangup``, within ``board_call_max_age``. One
aggregation over the ``Newchannel`` and ``Hangup`` events of that span
(index ``event_1_ts_1``) groups them by Uniqueid: a group whose earliest
event name is ``Newchannel`` has no ``Hangup`` (``"Hangup" < "Newchannel"``).
Then the state events of those channels, and of the channels that hung up
last (for the calls just ended), are read by Uniqueid (index ``uniqueid_1``)
and folded by :class:`~amiworker.ops.board.calls.CallTable`. The work is the
span's channels, never the whole log; the board does it when it starts and
every ``RESYNC`` seconds, and folds the change stream in between.

Only ``$sum``, ``$min`` and ``$max`` are used in the group, which nx-27017
(the test and demo store) runs in SQL: the others make it fall back to
Python, ten times slower.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from amiworker.ops.board.calls import ENDED_LIMIT, STATE_EVENTS, CallTable, iso
from amiworker.ops.board.rates import WINDOW, RateCounter
from amiworker.ops.filters import EventFilter, event_order
from amiworker.ops.query import WORKERS_COLLECTION, EventQuery

__all__ = [
    "FAILURES_LIMIT",
    "failures_json",
    "fleet_json",
    "load_calls",
    "load_rates",
    "plain_dates",
    "server_names",
]

FAILURES_LIMIT: Final = 100
_CHUNK: Final = 2000  # Uniqueids per $in


def _as_datetime(value: Any) -> datetime | None:
    """A date as the server returned it: nx-27017 gives a ``$max`` of dates as
    extended JSON text."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        text = value
        if text.startswith("{"):
            try:
                text = str(json.loads(text).get("$date", ""))
            except (ValueError, AttributeError):
                return None
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    return None


def plain_dates(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with its top-level dates as datetimes: nx-27017's change streams give
    them as ``{"$date": "..."}``."""
    for name, value in doc.items():
        if isinstance(value, Mapping) and set(value) == {"$date"}:
            doc[name] = _as_datetime(value["$date"])
    return doc


async def _aggregate(query: EventQuery, pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cursor = query.events_collection.aggregate(pipeline)
    if not hasattr(cursor, "__aiter__"):
        cursor = await cursor  # PyMongo's asyncio aggregate is a coroutine
    return [row async for row in cursor]


async def load_calls(
    query: EventQuery, now: datetime, max_age: float, ended_limit: int = ENDED_LIMIT
) -> CallTable:
    """Calls in progress and the last calls ended, from the log (see the module docstring)."""
    table = CallTable(max_age, ended_limit)
    table.expire(now)
    horizon = now - timedelta(seconds=max_age)
    pipeline: list[dict[str, Any]] = [
        {"$match": {"event": {"$in": ["Newchannel", "Hangup"]}, "ts": {"$gte": horizon}}},
        {
            "$group": {
                "_id": "$uniqueid",
                "n": {"$sum": 1},
                "first": {"$min": "$event"},
                "low": {"$min": "$server"},
                "high": {"$max": "$server"},
                "last": {"$max": "$ts"},
            }
        },
    ]
    with query.errors("find the calls in progress"):
        groups = await _aggregate(query, pipeline)
        wanted: set[str] = set()
        hung_up: list[tuple[datetime, str]] = []
        for group in groups:
            uniqueid = group.get("_id")
            if not isinstance(uniqueid, str):
                continue
            if group.get("first") == "Newchannel" or group.get("low") != group.get("high"):
                wanted.add(uniqueid)  # up (or a Uniqueid that two PBXs used: the fold decides)
            elif int(group.get("n") or 0) >= 3:
                wanted.add(uniqueid)  # used twice on one PBX within the span
            else:
                last = _as_datetime(group.get("last"))
                if last is not None:
                    hung_up.append((last, uniqueid))
        # The channels that hung up last: two per call (Local pairs), and some more.
        hung_up.sort(reverse=True)
        wanted.update(uniqueid for _, uniqueid in hung_up[: ended_limit * 4])
        docs: dict[Any, dict[str, Any]] = {}
        ids = sorted(wanted)
        for start in range(0, len(ids), _CHUNK):
            criteria = {"uniqueid": {"$in": ids[start : start + _CHUNK]}}
            criteria["event"] = {"$in": list(STATE_EVENTS)}
            async for doc in query.events_collection.find(criteria):
                docs[doc["_id"]] = doc
    for doc in sorted(docs.values(), key=event_order):
        table.apply(doc)
    table.expire(now)
    return table


async def server_names(query: EventQuery) -> list[str]:
    """The PBXs of the log (index ``server_1_ts_1``) and of the workers' sessions."""
    with query.errors("list the PBXs"):
        names = {str(name) for name in await query.events_collection.distinct("server") if name}
        async for row in query.database[WORKERS_COLLECTION].find({}, {"servers": 1}):
            servers = row.get("servers")
            if isinstance(servers, Mapping):
                names.update(str(name) for name in servers)
    return sorted(names)


async def load_rates(
    query: EventQuery, rates: RateCounter, servers: Iterable[str], until: datetime
) -> None:
    """Count into ``rates`` the events of the window before ``until`` (the board counts
    those from ``until`` on as they come). One read per PBX on ``server_1_ts_1``, once."""
    since = until - timedelta(seconds=WINDOW)
    for server in servers:
        rates.know([server])
        flt = EventFilter(server=server, since=since, until=until)
        with query.errors("count events per second"):
            cursor = query.events_collection.find(flt.mongo(covering=True), {"ts": 1, "_id": 0})
            async for doc in cursor:
                ts = _as_datetime(doc.get("ts"))
                if ts is not None and since <= ts < until:
                    rates.add(server, ts)


def _number(value: Any) -> int | float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _sessions(servers: Any) -> list[dict[str, Any]]:
    if not isinstance(servers, Mapping):
        return []
    sessions = []
    for name in sorted(servers):
        info = servers[name] if isinstance(servers[name], Mapping) else {}
        since = _as_datetime(info.get("since"))
        if since is None and isinstance(info.get("since"), int | float):
            since = datetime.fromtimestamp(float(info["since"]), UTC)
        sessions.append(
            {
                "pbx": str(name),
                "connected": bool(info.get("connected")),
                "since": iso(since),
                "last_error": None if info.get("last_error") is None else str(info["last_error"]),
                "ami_version": None
                if info.get("ami_version") is None
                else str(info["ami_version"]),
                "reconnects": _number(info.get("reconnects")),
            }
        )
    return sessions


async def fleet_json(query: EventQuery, lease: float) -> dict[str, Any]:
    """What ``GET /api/fleet`` answers: every row of ``workers``, judged against the
    lease by MongoDB's clock. Fields a worker does not report are null."""
    now = await query.server_time()
    with query.errors("list workers"):
        rows = [doc async for doc in query.database[WORKERS_COLLECTION].find({}).sort("_id", 1)]
    workers = []
    for row in rows:
        last_seen = _as_datetime(row.get("last_seen"))
        age = None if last_seen is None else max(0.0, (now - last_seen).total_seconds())
        state = str(row.get("state") or "running")
        counters = row.get("counters") if isinstance(row.get("counters"), Mapping) else {}
        spill = row.get("spill") if isinstance(row.get("spill"), Mapping) else None
        handlers = row.get("handlers")
        workers.append(
            {
                "id": str(row["_id"]),
                "host": None if row.get("host") is None else str(row["host"]),
                "pid": _number(row.get("pid")),
                "state": state,
                "stale": state != "stopped" and (age is None or age > lease),
                "age": None if age is None else round(age, 1),
                "started_at": iso(_as_datetime(row.get("started_at"))),
                "mode": None if row.get("mode") is None else str(row["mode"]),
                "sessions": _sessions(row.get("servers")),
                "counters": {str(k): v for k, v in counters.items() if _number(v) is not None},
                "backlog": _number(row.get("backlog")),
                "queue_depth": _number(row.get("queue_depth")),
                "spill": None
                if spill is None
                else {str(k): v for k, v in spill.items() if _number(v) is not None},
                "handlers": [str(h) for h in handlers] if isinstance(handlers, list) else None,
            }
        )
    return {"now": iso(now), "lease": lease, "workers": workers}


async def failures_json(query: EventQuery, limit: int = FAILURES_LIMIT) -> dict[str, Any]:
    """What ``GET /api/failures`` answers: the newest ``limit`` failed and dead events."""
    docs = await query.find(EventFilter.of(state="failed"), limit=limit)
    failures = []
    for doc in reversed(docs):  # newest first
        headers = doc.get("headers") or {}
        channel = headers.get("channel")
        failures.append(
            {
                "id": str(doc["_id"]),
                "server": doc.get("server"),
                "event": doc.get("event"),
                "ts": iso(_as_datetime(doc.get("ts"))),
                "state": doc.get("state"),
                "attempts": _number(doc.get("attempts")),
                "error": None if doc.get("error") is None else str(doc["error"]),
                "uniqueid": doc.get("uniqueid"),
                "linkedid": doc.get("linkedid"),
                "channel": channel[0] if isinstance(channel, list) else channel,
                "retry_at": iso(_as_datetime(doc.get("retry_at"))),
            }
        )
    return {"limit": limit, "failures": failures}
