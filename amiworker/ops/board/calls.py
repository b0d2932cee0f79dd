"""Calls in progress and calls just ended, folded from stored channel events (no I/O).

Every channel event carries its channel's whole snapshot (``Channel``,
``ChannelStateDesc``, ``CallerIDNum``..., ``Uniqueid``, ``Linkedid``), so a
:class:`CallTable` keeps, per channel, the values of the newest event seen,
and per call (``Linkedid`` on one PBX) its channels still up. A ``Hangup``
ends a channel; the call ends with its last channel and moves to the calls
just ended.

Events reach the table in the order workers store them, which is not the
order Asterisk sent them (different workers win different events of a call).
So a channel that hung up is remembered (a tombstone) and a late event of it
cannot bring it back, and newer values win over older ones by the event's
own time, whatever the order of arrival. Folding an event twice changes
nothing: the board folds the log at start and the change stream after it,
and the two overlap.

A ``Hangup`` missed while no worker held a session with the PBX would leave
its channel up for ever: :meth:`CallTable.expire` drops calls that started
more than ``max_age`` seconds ago (the ``board_call_max_age`` setting).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from amiworker.ops.filters import event_order, first_value

__all__ = ["STATE_EVENTS", "CallTable", "CallView", "ChannelView", "EndedCall", "iso"]

#: The events that change what the board shows of a channel; the log is read for these.
STATE_EVENTS: Final = (
    "Newchannel",
    "Newstate",
    "NewCallerid",
    "NewConnectedLine",
    "Rename",
    "Hangup",
)
ENDED_LIMIT: Final = 15

_FIELDS: Final = (
    ("channel", "channel"),
    ("state", "channelstatedesc"),
    ("caller_id_num", "calleridnum"),
    ("caller_id_name", "calleridname"),
    ("connected_line_num", "connectedlinenum"),
    ("connected_line_name", "connectedlinename"),
)


def iso(value: datetime | None) -> str | None:
    """A UTC time as ISO 8601 to the millisecond (what a BSON date holds), ``Z`` suffixed."""
    if value is None:
        return None
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _utc(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _text(value: Any) -> str | None:
    value = first_value(value)
    return None if value is None else str(value)


@dataclass(slots=True)
class ChannelView:
    """One channel still up, as its newest event tells it."""

    uniqueid: str
    started: datetime  # its first event's time (the Newchannel's)
    updated: tuple[int, datetime, str]  # event_order key of the newest event applied
    channel: str | None = None
    state: str | None = None
    caller_id_num: str | None = None
    caller_id_name: str | None = None
    connected_line_num: str | None = None
    connected_line_name: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "uniqueid": self.uniqueid,
            "channel": self.channel,
            "state": self.state,
            "caller_id_num": self.caller_id_num,
            "caller_id_name": self.caller_id_name,
            "connected_line_num": self.connected_line_num,
            "connected_line_name": self.connected_line_name,
            "started": iso(self.started),
        }


@dataclass(slots=True)
class CallView:
    """One call in progress: a Linkedid on one PBX, with its channels still up."""

    server: str
    linkedid: str
    started: datetime
    channels: dict[str, ChannelView] = field(default_factory=dict)
    hung_up: int = 0  # channels of it that hung up already
    cause: tuple[str | None, str | None] | None = None  # (cause, text) of the first hangup
    caller: tuple[str | None, str | None] = (None, None)  # (num, name): see _remember_caller

    def as_json(self) -> dict[str, Any]:
        channels = sorted(self.channels.values(), key=lambda c: (c.started, c.uniqueid))
        return {
            "server": self.server,
            "linkedid": self.linkedid,
            "started": iso(self.started),
            "channels": [channel.as_json() for channel in channels],
        }


@dataclass(frozen=True, slots=True)
class EndedCall:
    server: str
    linkedid: str
    started: datetime
    ended: datetime
    cause: str | None
    cause_txt: str | None
    channels: int
    caller_id_num: str | None
    caller_id_name: str | None

    @property
    def duration(self) -> float:
        return max(0.0, (self.ended - self.started).total_seconds())

    def as_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "linkedid": self.linkedid,
            "started": iso(self.started),
            "ended": iso(self.ended),
            "duration": round(self.duration, 3),
            "cause": self.cause,
            "cause_txt": self.cause_txt,
            "channels": self.channels,
            "caller_id_num": self.caller_id_num,
            "caller_id_name": self.caller_id_name,
        }


class CallTable:
    """Calls in progress and the last ``ended_limit`` calls ended, folded from events."""

    def __init__(self, max_age: float, ended_limit: int = ENDED_LIMIT) -> None:
        self.max_age = timedelta(seconds=max_age)
        self.ended_limit = ended_limit
        self.calls: dict[tuple[str, str], CallView] = {}
        self.ended: list[EndedCall] = []  # oldest first
        self._call_of: dict[tuple[str, str], tuple[str, str]] = {}  # channel -> call
        self._gone: dict[tuple[str, str], datetime] = {}  # hung-up channels -> hangup time
        self._floor: datetime | None = None  # events before it start nothing

    def apply(self, doc: Mapping[str, Any]) -> bool:
        """Fold one stored event in; True if what the board shows changed."""
        headers = doc.get("headers") or {}
        uniqueid = _text(headers.get("uniqueid"))
        ts = _utc(doc.get("ts"))
        server = doc.get("server")
        if not uniqueid or ts is None or not isinstance(server, str):
            return False  # LocalBridge, DialBegin...: prefixed snapshots, no channel of their own
        key = (server, uniqueid)
        if key in self._gone:
            return False  # a late event of a channel that hung up
        if str(doc.get("event", "")).lower() == "hangup":
            return self._hangup(key, ts, headers)
        order = event_order(doc)
        call_key = self._call_of.get(key)
        if call_key is None:
            if self._floor is not None and ts < self._floor:
                return False  # older than the board looks back
            linkedid = _text(headers.get("linkedid")) or uniqueid
            call_key = (server, linkedid)
            call = self.calls.get(call_key)
            if call is None:
                call = self.calls[call_key] = CallView(server, linkedid, ts)
            view = ChannelView(uniqueid, ts, order)
            call.channels[uniqueid] = view
            call.started = min(call.started, ts)
            self._call_of[key] = call_key
            _update(view, headers)
            _remember_caller(call, view)
            return True
        call = self.calls[call_key]
        view = call.channels[uniqueid]
        view.started = min(view.started, ts)
        call.started = min(call.started, ts)
        if order <= view.updated:
            return False  # older than what the channel shows already
        view.updated = order
        changed = _update(view, headers)
        _remember_caller(call, view)
        return changed

    def _hangup(self, key: tuple[str, str], ts: datetime, headers: Mapping[str, Any]) -> bool:
        self._gone[key] = ts
        call_key = self._call_of.pop(key, None)
        if call_key is None:
            return False
        call = self.calls[call_key]
        call.channels.pop(key[1], None)
        call.hung_up += 1
        if call.cause is None or call.linkedid == key[1]:
            # The call's cause: its first channel's (the Linkedid), else the first to hang up.
            call.cause = (_text(headers.get("cause")), _text(headers.get("cause-txt")))
        if call.channels:
            return True
        del self.calls[call_key]
        cause, text = call.cause or (None, None)
        self._add_ended(
            EndedCall(
                call.server,
                call.linkedid,
                call.started,
                ts,
                cause,
                text,
                call.hung_up,
                call.caller[0],
                call.caller[1],
            )
        )
        return True

    def _add_ended(self, ended: EndedCall) -> None:
        self.ended.append(ended)
        if len(self.ended) > 1 and self.ended[-2].ended > ended.ended:
            self.ended.sort(key=lambda e: (e.ended, e.server, e.linkedid))
        del self.ended[: max(0, len(self.ended) - self.ended_limit)]

    def inherit(self, older: CallTable) -> None:
        """Remember the channels ``older`` saw hang up: a table read afresh from the log
        knows only those of the channels it read, and a late event of another one must
        not bring it back."""
        for key, when in older._gone.items():
            if key not in self._call_of:
                self._gone.setdefault(key, when)

    def expire(self, now: datetime) -> bool:
        """Drop calls that started more than ``max_age`` before ``now``; True if any."""
        floor = now - self.max_age
        self._floor = floor
        old = [key for key, call in self.calls.items() if call.started < floor]
        for key in old:
            call = self.calls.pop(key)
            for uniqueid in call.channels:
                self._call_of.pop((call.server, uniqueid), None)
                self._gone[(call.server, uniqueid)] = floor
        for channel in [k for k, when in self._gone.items() if when < floor]:
            del self._gone[channel]
        return bool(old)

    def snapshot(self, now: datetime) -> dict[str, Any]:
        """What ``GET /api/calls`` answers: calls in progress (oldest first), calls ended
        (newest first)."""
        calls = sorted(self.calls.values(), key=lambda c: (c.server, c.started, c.linkedid))
        return {
            "now": iso(now),
            "max_age": self.max_age.total_seconds(),
            "calls": [call.as_json() for call in calls],
            "ended": [ended.as_json() for ended in reversed(self.ended)],
        }


def _remember_caller(call: CallView, view: ChannelView) -> None:
    """The caller of a call: its first channel's caller ID (the one whose Uniqueid is the
    Linkedid), else the first channel seen."""
    if view.uniqueid == call.linkedid or call.caller == (None, None):
        call.caller = (view.caller_id_num, view.caller_id_name)


def _update(view: ChannelView, headers: Mapping[str, Any]) -> bool:
    changed = False
    for attribute, header in _FIELDS:
        value = _text(headers.get(header))
        if value is not None and getattr(view, attribute) != value:
            setattr(view, attribute, value)
            changed = True
    return changed
