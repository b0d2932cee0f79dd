"""How the operator commands print: aligned tables for people, JSON lines for tools.

Times print in UTC with milliseconds (what BSON dates hold), as
``2026-11-26 06:46:21.052``; that text is accepted back by ``--since``.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, Final, TextIO

from amiworker.fleet.documents import DEAD, FAILED
from amiworker.ops.filters import first_value
from amiworker.ops.query import CallStory, Channel, WorkerStatus

__all__ = [
    "EventTable",
    "call_json",
    "dumps",
    "format_time",
    "print_call",
    "print_workers",
    "summary",
    "worker_json",
]

# Headers that say most about each event, after the channel name (lower-cased).
_DETAILS: Final[dict[str, tuple[str, ...]]] = {
    "hangup": ("channel", "cause", "cause-txt"),
    "hanguprequest": ("channel", "cause"),
    "softhanguprequest": ("channel", "cause"),
    "newchannel": ("channel", "channelstatedesc", "exten", "calleridnum"),
    "newstate": ("channel", "channelstatedesc"),
    "newexten": ("channel", "application", "appdata"),
    "varset": ("channel", "variable", "value"),
    "newcallerid": ("channel", "calleridnum", "calleridname"),
    "newconnectedline": ("channel", "connectedlinenum", "connectedlinename"),
    "dialbegin": ("channel", "destchannel", "dialstring"),
    "dialend": ("channel", "destchannel", "dialstatus"),
    "devicestatechange": ("device", "state"),
    "localbridge": ("localonechannel", "localtwochannel"),
    "originateresponse": ("channel", "response", "reason"),
    "bridgeenter": ("channel", "bridgeuniqueid"),
    "bridgeleave": ("channel", "bridgeuniqueid"),
}
_DEFAULT_DETAILS: Final = ("channel",)


def format_time(value: Any, *, date: bool = True) -> str:
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        text = aware.astimezone(UTC).isoformat(sep=" ", timespec="milliseconds")[:23]
        return text if date else text[11:]
    return "-" if value is None else str(value)


def summary(doc: Mapping[str, Any]) -> str:
    """A few key headers of an event (``Local/100@test-0;1 cause=16 cause-txt=...``),
    and the error of a failed or dead one."""
    headers = doc.get("headers") or {}
    names = _DETAILS.get(str(doc.get("event", "")).lower(), _DEFAULT_DETAILS)
    parts = []
    for index, name in enumerate(names):
        value = first_value(headers.get(name))
        if value in (None, ""):
            continue
        parts.append(str(value) if index == 0 else f"{name}={value}")
    if doc.get("state") in (FAILED, DEAD) and doc.get("error"):
        parts.append(f"error: {' '.join(str(doc['error']).split())}")
    return " ".join(parts)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return aware.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)  # ObjectId, Decimal128...


def dumps(value: Any, *, indent: int | None = None) -> str:
    """JSON with datetimes as ISO 8601 (UTC offset included)."""
    return json.dumps(value, default=_json_default, ensure_ascii=False, indent=indent)


# -- events ----------------------------------------------------------------------------------

_COLUMNS: Final = ("TIME (UTC)", "SERVER", "EVENT", "UNIQUEID", "LINKEDID", "STATE", "DETAILS")
# Widths a followed table starts with, so that rows printed later mostly line up.
_FOLLOW_WIDTHS: Final = (23, 6, 17, 14, 14, 7)


class EventTable:
    """Prints events as an aligned table; the last column is cut to a terminal's width."""

    def __init__(
        self,
        out: TextIO,
        *,
        linkedid: bool = True,
        follow: bool = False,
        width: int | None = None,
    ) -> None:
        self.out = out
        self._linkedid = linkedid
        self._widths = list(_FOLLOW_WIDTHS if follow else (0,) * 6)
        if width is None and out.isatty():
            width = shutil.get_terminal_size().columns
        self._width = width
        self._header_done = False

    def _cells(self, doc: Mapping[str, Any]) -> list[str]:
        return [
            format_time(doc.get("ts")),
            str(doc.get("server") or "-"),
            str(doc.get("event") or "-"),
            str(doc.get("uniqueid") or "-"),
            str(doc.get("linkedid") or "-"),
            str(doc.get("state") or "-"),
            summary(doc),
        ]

    def _line(self, cells: Sequence[str]) -> str:
        fixed = [cell.ljust(width) for cell, width in zip(cells, self._widths, strict=False)]
        if not self._linkedid:
            del fixed[4]
        line = "  ".join([*fixed, cells[6]]).rstrip()
        if self._width and len(line) > self._width:
            line = line[: self._width - 1] + "…"
        return line

    def print(self, docs: Iterable[Mapping[str, Any]]) -> None:
        """Print rows; the first call sizes the columns to its rows and prints the header."""
        rows = [self._cells(doc) for doc in docs]
        if not self._header_done:
            for cells in [list(_COLUMNS), *rows]:
                for index in range(6):
                    self._widths[index] = max(self._widths[index], len(cells[index]))
            print(self._line(_COLUMNS), file=self.out)
            self._header_done = True
        for cells in rows:
            print(self._line(cells), file=self.out, flush=True)


# -- one call --------------------------------------------------------------------------------


def _channel_json(channel: Channel) -> dict[str, Any]:
    data = asdict(channel)
    data["states"] = [{"ts": ts, "state": state} for ts, state in channel.states]
    return data


def call_json(story: CallStory) -> str:
    return dumps(
        {
            "linkedid": story.linkedid,
            "servers": story.servers,
            "channels": [_channel_json(channel) for channel in story.channels],
            "events": story.events,
            "projection": story.projection,
        }
    )


def print_call(story: CallStory, out: TextIO, projection_name: str) -> None:
    events = story.events
    first, last = events[0].get("ts"), events[-1].get("ts")
    span = ""
    if isinstance(first, datetime) and isinstance(last, datetime):
        span = f", {format_time(first)} .. {format_time(last, date=False)}"
        span += f" ({(last - first).total_seconds():.3f} s)"
    where = ", ".join(story.servers)
    print(f"Call {story.linkedid} on {where}: {len(events)} event(s){span}", file=out)
    print("\nChannels:", file=out)
    rows = [("UNIQUEID", "CHANNEL", "STATES", "HANGUP")]
    for channel in story.channels:
        states = ", ".join(f"{state} {format_time(ts, date=False)}" for ts, state in channel.states)
        hangup = "-"
        if channel.hangup_at is not None:
            cause = " ".join(filter(None, (channel.hangup_cause, channel.hangup_cause_txt)))
            hangup = f"{cause or '?'} at {format_time(channel.hangup_at, date=False)}"
        rows.append((channel.uniqueid, channel.name or "-", states or "-", hangup))
    _print_rows(rows, out, indent="  ")
    print("\nEvents:", file=out)
    EventTable(out, linkedid=False).print(events)
    print(f"\nProjection ({projection_name}):", file=out)
    if story.projection is None:
        print(f"  none (no document with _id {story.linkedid!r})", file=out)
    else:
        for line in dumps(story.projection, indent=2).splitlines():
            print(f"  {line}", file=out)


def _print_rows(rows: Sequence[Sequence[str]], out: TextIO, indent: str = "") -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print(indent + "  ".join(cells).rstrip(), file=out)


# -- the fleet -------------------------------------------------------------------------------

_COUNTER_COLUMNS: Final = (
    ("SEEN", "events_seen"),
    ("WON", "races_won"),
    ("LOST", "races_lost"),
    ("HANDLED", "handled"),
    ("FAILED", "failed"),
    ("DROPPED", "dropped"),
    ("REJECTED", "rejected"),
)
# Shown when a worker runs claim_mode = "hedged".
_HEDGED_COLUMNS: Final = (("OWNED", "owned"), ("HEDGED", "hedged"), ("COVERED", "covered"))


def _pbxs(servers: Any, *, live: bool = True) -> str:
    """Each PBX and its session; ``live`` False (a stopped worker): what its last row
    said no longer holds (it logged off after writing it), so only the names."""
    if isinstance(servers, Mapping):
        if not live:
            return ", ".join(sorted(servers)) or "-"
        parts = []
        for name, status in sorted(servers.items()):
            up = status.get("connected") if isinstance(status, Mapping) else bool(status)
            unstamped = isinstance(status, Mapping) and status.get("timestamps") is False
            parts.append(
                f"{name} {'up' if up else 'DOWN'}" + (" NO-TIMESTAMP" if unstamped else "")
            )
        return ", ".join(parts) or "-"
    if isinstance(servers, list | tuple):
        return ", ".join(str(server) for server in servers) or "-"
    return "-"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.1f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def print_workers(workers: Sequence[WorkerStatus], lease: float, out: TextIO) -> None:
    if not workers:
        print("no worker has reported (the workers collection is empty)", file=out)
        return
    header = (
        "WORKER",
        "HOST",
        "PID",
        "PBXS",
        *(c for c, _ in _COUNTER_COLUMNS),
        "QUEUE",
        "BACKLOG",
    )
    hedged = any(worker.mode == "hedged" for worker in workers)
    spilling = any((worker.spill or {}).get("events") for worker in workers)
    extra = (*(c for c, _ in _HEDGED_COLUMNS), "WINDOW") if hedged else ()
    extra += ("SPILLED",) if spilling else ()
    rows: list[tuple[str, ...]] = [(*header, *extra, "HEARTBEAT")]
    for worker in workers:
        counters = tuple(str(worker.counters.get(field, 0)) for _, field in _COUNTER_COLUMNS)
        more: tuple[str, ...] = ()
        if hedged:
            more += tuple(str(worker.counters.get(field, 0)) for _, field in _HEDGED_COLUMNS)
            more += (str((worker.hedging or {}).get("window", "-")),)
        if spilling:
            spill = worker.spill or {}
            age = spill.get("oldest_age")
            more += (f"{spill.get('events', 0)} ({_age(age)})" if spill.get("events") else "0",)
        heartbeat = _age(worker.age) + ("  STALE" if worker.stale else "")
        if worker.state != "running":
            heartbeat += f"  ({worker.state})"
        rows.append(
            (
                worker.worker_id,
                worker.host or "-",
                str(worker.pid or "-"),
                _pbxs(worker.servers, live=worker.state != "stopped"),
                *counters,
                "-" if worker.queue_depth is None else str(worker.queue_depth),
                "-" if worker.backlog is None else str(worker.backlog),
                *more,
                heartbeat,
            )
        )
    _print_rows(rows, out)
    stale = sum(worker.stale for worker in workers)
    stopped = sum(worker.state == "stopped" for worker in workers)
    notes = [f"{stopped} stopped"] if stopped else []
    if stale:
        notes.append(f"{stale} STALE (no heartbeat within the {lease:g} s lease)")
    modes = Counter(
        worker.mode
        for worker in workers
        if worker.mode and worker.state == "running" and not worker.stale
    )
    if modes:
        notes.append(
            "claim mode " + ", ".join(f"{mode} ({n})" for mode, n in sorted(modes.items()))
        )
    print(f"{len(workers)} worker(s)" + "".join(f", {note}" for note in notes), file=out)
    for warning in fleet_warnings(workers):
        print(f"WARNING: {warning}", file=out)


def fleet_warnings(workers: Sequence[WorkerStatus]) -> list[str]:
    """What an operator must act on, from the live workers' rows."""
    live = [w for w in workers if w.state != "stopped" and not w.stale]
    warnings = []
    sets: dict[tuple[str, ...], list[str]] = {}
    for worker in live:
        if worker.handlers is not None:
            sets.setdefault(tuple(sorted(worker.handlers)), []).append(worker.worker_id)
    if len(sets) > 1:
        described = "; ".join(
            f"{', '.join(ids)} handle {', '.join(handlers) or 'no event'}"
            for handlers, ids in sorted(sets.items(), key=lambda item: item[1])
        )
        warnings.append(
            "the live workers have different handler sets (a deploy in progress?): "
            f"{described}. Events won by a worker without a handler are stored done and "
            "skip it: finish the deploy, then `amiworker replay` the gap"
        )
    logins: dict[str, set[str]] = {}
    for worker in live:
        for name, status in (
            (worker.servers or {}).items() if isinstance(worker.servers, Mapping) else ()
        ):
            if isinstance(status, Mapping) and status.get("login"):
                logins.setdefault(name, set()).add(str(status["login"]))
    for name, seen in sorted(logins.items()):
        if len(seen) > 1:
            warnings.append(
                f"the live workers log in to {name} as different users or with different "
                f"event filters ({', '.join(sorted(seen))}): each must receive the same "
                "stream (the dedup key, and hedged mode's coverage, rely on it)"
            )
    if len({worker.mode for worker in live if worker.mode}) > 1:
        warnings.append(
            "the live workers run different claim modes (race and hedged): every race worker "
            "inserts every event; set the same claim_mode everywhere"
        )
    unstamped = sorted(
        {
            name
            for worker in live
            if isinstance(worker.servers, Mapping)
            for name, status in worker.servers.items()
            if isinstance(status, Mapping) and status.get("timestamps") is False
        }
    )
    if unstamped:
        warnings.append(
            f"{', '.join(unstamped)} send(s) events without a Timestamp: a repeated identical "
            "event can be missed; set timestampevents = yes in manager.conf [general]"
        )
    return warnings


def worker_json(worker: WorkerStatus) -> str:
    data = asdict(worker)
    data["heartbeat_age"] = data.pop("age")
    return dumps(data)
