"""Which events, and in which order: the filter and the sort key of every query.

**Order.** Events are ordered by their Asterisk ``Timestamp`` (``ts``), then
by the time a worker received them, then by ``_id``. BSON dates hold
milliseconds, and a call's events often share one, so within a millisecond
the exact ``Timestamp`` header (microseconds) decides. The server sorts on
``ts`` alone, which the ``(server, ts)`` and ``(event, ts)`` indexes serve;
:func:`in_order` applies the finer order a millisecond at a time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from amiworker.fleet.documents import DEAD, FAILED, STATES
from amiworker.timeparse import parse_time, timestamp_micros

__all__ = ["EventFilter", "TimeArg", "event_order", "first_value", "in_order"]

TimeArg = datetime | str | None
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


def first_value(value: Any) -> Any:
    """A header value as stored: a repeated header is a list; its first value."""
    return value[0] if isinstance(value, list) and value else value


def as_time(value: TimeArg) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return parse_time(value)


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events: every field given must match (``events`` and ``states``: any of)."""

    server: str | None = None
    events: tuple[str, ...] = ()
    uniqueid: str | None = None
    linkedid: str | None = None
    since: datetime | None = None  # ts >= since
    until: datetime | None = None  # ts < until
    states: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # To the millisecond, as BSON stores ts: the server and admits() must agree.
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _millisecond(value))

    @classmethod
    def of(
        cls,
        *,
        server: str | None = None,
        event: str | Sequence[str] | None = None,
        uniqueid: str | None = None,
        linkedid: str | None = None,
        since: TimeArg = None,
        until: TimeArg = None,
        state: str | Sequence[str] | None = None,
    ) -> EventFilter:
        """Build a filter from loose arguments.

        ``event`` and ``state`` take one value, a comma-separated list or a
        sequence. ``state="failed"`` also selects ``dead`` events: both are
        events whose handler failed. Times are datetimes or what
        :func:`~amiworker.timeparse.parse_time` accepts (``"2h"``, ISO 8601).
        Raises ValueError for an unknown state or an unreadable time.
        """
        states = _split(state)
        for name in states:
            if name not in STATES:
                raise ValueError(f"unknown state {name!r}: use one of {', '.join(STATES)}")
        if FAILED in states and DEAD not in states:
            states = (*states, DEAD)
        return cls(
            server=server or None,
            events=_split(event),
            uniqueid=uniqueid or None,
            linkedid=linkedid or None,
            since=as_time(since),
            until=as_time(until),
            states=states,
        )

    def mongo(self, prefix: str = "", *, covering: bool = False) -> dict[str, Any]:
        """The MongoDB filter; ``prefix`` (``"fullDocument."``) for a change stream.

        ``covering``: a superset for reads whose results go through
        :meth:`admits` (the end of the time span included). MongoDB answers the
        exact filter exactly; a stand-in server that compares dates to the
        second (nx-27017) answers the covering one with extras but no misses.
        """
        query: dict[str, Any] = {}
        for name in ("server", "uniqueid", "linkedid"):
            value = getattr(self, name)
            if value is not None:
                query[prefix + name] = value
        if self.events:
            query[prefix + "event"] = _one_or_in(self.events)
        if self.states:
            query[prefix + "state"] = _one_or_in(self.states)
        span: dict[str, datetime] = {}
        if self.since is not None:
            span["$gte"] = self.since
        if self.until is not None:
            span["$lte" if covering else "$lt"] = self.until
        if span:
            query[prefix + "ts"] = span
        return query

    def admits(self, doc: Mapping[str, Any]) -> bool:
        """Whether a document from a covering read is within the time span."""
        ts = doc.get("ts")
        if not isinstance(ts, datetime):
            return self.since is None and self.until is None
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=UTC)
        if self.since is not None and ts < self.since:
            return False
        return self.until is None or ts < self.until


def _millisecond(value: datetime) -> datetime:
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return aware.replace(microsecond=aware.microsecond // 1000 * 1000)


def _split(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if not value:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    return tuple(item.strip() for item in items if item.strip())


def _one_or_in(values: tuple[str, ...]) -> Any:
    return values[0] if len(values) == 1 else {"$in": list(values)}


def event_order(doc: Mapping[str, Any]) -> tuple[int, datetime, str]:
    """Sort key of stored events: exact Timestamp (microseconds), received_at, _id."""
    received = doc.get("received_at") or _EPOCH
    return (_micros(doc), received, str(doc.get("_id")))


def _micros(doc: Mapping[str, Any]) -> int:
    stamp = first_value((doc.get("headers") or {}).get("timestamp"))
    micros = timestamp_micros(stamp) if isinstance(stamp, str) else None
    if micros is not None:
        return micros
    ts = doc.get("ts")
    if isinstance(ts, datetime):
        aware = ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
        return (aware - _EPOCH) // _MICROSECOND
    return 0


async def in_order(cursor: Any) -> AsyncIterator[dict[str, Any]]:
    """Documents of a cursor sorted on ``ts``, re-sorted by :func:`event_order`
    within each run of equal ``ts`` (one millisecond)."""
    group: list[dict[str, Any]] = []
    async for doc in cursor:
        if group and doc.get("ts") != group[0].get("ts"):
            for ready in sorted(group, key=event_order):
                yield ready
            group = []
        group.append(doc)
    for ready in sorted(group, key=event_order):
        yield ready
