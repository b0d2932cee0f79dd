"""Hedged mode, the owner's side: how far this worker has claimed what it owns.

Per PBX and per AMI session, an owner publishes a watermark: the key of the
newest event of that session up to which every event it owned has been
claimed (won, lost or refused: settled either way). Every session receives the
same events in the same order, so a standby places that key in its own stream
and forgets what it covers (fleet.standby).

The watermark is the event received just before the oldest owned event still
waiting for its claim (or the newest event, when none waits): claims are made
in arrival order, so everything before it is settled.

Ownership depends on the view, which can change: the record splits the session
into segments, each naming the views this worker owned under while its events
arrived. A standby forgets an event only if the segment it falls in names the
view under which the standby expected this worker to own it.

A record, per PBX::

    {"sid": "<session>", "first": "<key>", "mark": "<key>", "cut": false,
     "segs": [["<last key of the segment>" | None (open), [[<worker>, ...], ...]], ...]}

Views are declared as their lists of workers, so a standby can tell who owned an
event under them whatever its own view was.

Only the last ``_SEGMENTS_KEPT`` segments are kept; ``first`` then becomes the
end of the last one dropped, and ``cut`` says so: a standby cannot tell where
events before it belong, and hedges them.

When a session ends (the PBX dropped it, or an event of it was lost), the
record of the one before rides along as ``prev`` until the next change: its
claims still settle after the new session opens, and without it a standby
could not tell that the last events of the old session were claimed (it would
hedge them all, each insert lost; a PBX restart is the common case).
"""

from __future__ import annotations

import uuid
from collections import deque
from typing import Any, Final

from amiworker.fleet.ownership import Ownership

__all__ = ["Coverage", "CoverageSession"]

_SEGMENTS_KEPT: Final = 16


class CoverageSession:
    """One AMI session of one PBX, as this worker's coverage of it."""

    __slots__ = ("broken", "cut", "epoch", "first", "latest", "pending", "segments", "sid")

    def __init__(self, epoch: int, views: list[list[str]]) -> None:
        self.sid = uuid.uuid4().hex[:12]
        self.first: str | None = None
        self.latest: str | None = None
        # For each owned event not settled yet, oldest first: (the key received before
        # it, its own key).
        self.pending: deque[tuple[str | None, str]] = deque()
        self.segments: list[list[Any]] = [[None, views]]
        self.epoch = epoch
        self.cut = False

    @property
    def mark(self) -> str | None:
        """Every owned event up to this key is settled (None: nothing yet)."""
        return self.pending[0][0] if self.pending else self.latest

    def record(self) -> dict[str, Any] | None:
        if self.first is None:
            return None
        return {
            "sid": self.sid,
            "first": self.first,
            "cut": self.cut,
            "mark": self.mark,
            "segs": [list(segment) for segment in self.segments],
        }


class Coverage:
    """The owner's side: one open session per PBX, fed in arrival order."""

    def __init__(self, ownership: Ownership) -> None:
        self._ownership = ownership
        self._sessions: dict[str, CoverageSession] = {}
        # The session each PBX had before its open one: its last events may still be
        # settling when the new one opens.
        self._previous: dict[str, CoverageSession] = {}
        #: This worker is stopping: it claims nothing new.
        self.leaving = False

    def begin(self, pbx: str) -> CoverageSession:
        """A new AMI session with ``pbx`` (or a broken one): start covering afresh."""
        ended = self._sessions.get(pbx)
        if ended is not None and ended.first is not None:
            self._previous[pbx] = ended
        session = CoverageSession(self._ownership.changes, self._ownership.view_lists(pbx))
        self._sessions[pbx] = session
        return session

    def note(self, pbx: str, key: str, owned: bool) -> None:
        """Every raced event of ``pbx``, in arrival order, right after the ownership
        decision."""
        session = self._sessions.get(pbx)
        if session is None:
            session = self.begin(pbx)
        ownership = self._ownership
        if session.epoch != ownership.changes:
            session.epoch = ownership.changes
            views = ownership.view_lists(pbx)
            open_segment = session.segments[-1]
            if views != open_segment[1]:
                if session.latest is None:
                    open_segment[1] = views  # nothing of the session under the old views
                else:
                    open_segment[0] = session.latest
                    session.segments.append([None, views])
                    if len(session.segments) > _SEGMENTS_KEPT:
                        dropped = session.segments.pop(0)
                        session.first = dropped[0]
                        session.cut = True
        if session.first is None:
            session.first = key
        if owned:
            session.pending.append((session.latest, key))
        session.latest = key

    def settled(self, pbx: str, key: str) -> None:
        """The event ``key`` of ``pbx`` was claimed (won, lost or refused).

        Claims are made in arrival order, memory then spill, so an owned event of
        the open session is always the oldest one waiting; anything else (a hedge,
        an event a predecessor spilled) is not in it and changes nothing.
        """
        previous = self._previous.get(pbx)
        if previous is not None and previous.pending and previous.pending[0][1] == key:
            previous.pending.popleft()  # claims go in arrival order: the older session first
            return
        session = self._sessions.get(pbx)
        if session is not None and session.pending and session.pending[0][1] == key:
            session.pending.popleft()

    def lost(self, pbx: str, key: str) -> None:
        """The event ``key`` of ``pbx`` will never be claimed here (dropped). If it
        was owned in the open session, its watermark must never pass it: the session
        ends frozen before it and new events start a new one (standbys hedge the gap).
        One of the previous session stays at its head for good, freezing that too."""
        session = self._sessions.get(pbx)
        if session is not None and any(owned == key for _, owned in session.pending):
            self.begin(pbx)

    def records(self) -> dict[str, dict[str, Any]]:
        """What to publish: the open session of each PBX (``final`` once leaving: what
        it does not cover yet, it never will)."""
        records = {}
        for pbx, session in self._sessions.items():
            record = session.record()
            previous = self._previous.get(pbx)
            if record is None:
                if previous is None:
                    continue
                record = {}  # nothing received since the session reopened: the old one only
            if self.leaving:
                record["final"] = True
            if previous is not None:
                record["prev"] = previous.record()
            records[pbx] = record
        return records
