"""Hedged mode, the standby's side: events another worker owns, until its claim covers them.

For each raced event it does not own, a worker keeps the event (the message it
already has: nothing is parsed or built) in a window, with who should claim it
(fleet.ownership) and a deadline: ``hedge_delay`` times its standby rank, not
counting the workers ranked before it whose beat has gone silent (a dead owner's
first live standby hedges at once, without waiting for the views to drop it). Each
owner's coverage record (fleet.coverage) is placed in this worker's own stream
by key: every session receives the same events in the same order, so the
owner's watermark sits at one position here too. An event the watermark
passes is forgotten if the owner declared owning under the view this worker
used for it; otherwise no one claimed it, and it is hedged at its deadline.

At the deadline an event still uncovered is hedged (claimed here, through the
same unique ``_id``) unless its owner is visibly at work on it: it still beats,
its session to the PBX is up, and its watermark is moving (a busy store delays
an owner; hedging then would only add the inserts that make it slower).
MongoDB itself away: nobody can claim; the deadline waits.

Positions: a counter per PBX over every raced event received, and an index from
key to position for the recent ones, contiguous within this worker's current
session. A key not in the index that precedes one that is must precede the
index itself; that is how a watermark whose session began long ago is placed.

A full window hedges its oldest events at once (race mode), never drops them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from amiworker.fleet.ownership import Assignment, owner_under, owns_under
from amiworker.fleet.pending import Pending

__all__ = ["Standby"]

# An owner at work may delay a hedge at most this many hedge_delays.
_MAX_EXTENSIONS: Final = 30
# An owner is at work while its watermark has moved within this many exchanges
# (counted in exchanges, not seconds: a saturated store slows every exchange,
# and must not make the owners it slows look dead).
_AT_WORK_EXCHANGES: Final = 8
# ... and while its beat (one per exchange of its own) has moved within this many
# of ours: a killed worker stops beating at once, and the grace above would add
# its length to every hedge of what the worker owned when it died. Room for an
# owner whose exchanges run at half our pace (a busier CPU); one slower than that
# costs an extra insert, never a lost event.
_BEATING_EXCHANGES: Final = 4
_NEVER: Final = float("inf")


@dataclass(slots=True, eq=False)
class _Entry:
    key: str
    owner: int  # what ownership is scored on (fleet.ownership.owner_hash)
    pbx: str
    position: int
    item: Pending | None  # None once forgotten
    assignments: list[Assignment]
    deadline: float
    undecided: int  # expected owners that have not passed it uncovered yet
    since: int  # the exchange it arrived in (an owner's progress is judged from then)
    tried: tuple[str, ...] = ()  # owners it was queued for
    passed: tuple[str, ...] = ()  # owners whose watermark passed it, not claimed by them
    extensions: int = 0
    live: bool = True


@dataclass(slots=True)
class _Owner:
    """What this worker knows of one owner's coverage of one PBX."""

    sid: str | None = None
    record: Mapping[str, Any] | None = None
    mark: str | None = None
    mark_moved: int = -(1 << 30)  # the exchange in which its watermark last moved
    waiting_on: str | None = None  # a key not received here yet that the record needs
    queue: deque[_Entry] = field(default_factory=deque)  # its entries, by position
    late: list[_Entry] = field(default_factory=list)  # queued for it after newer ones


@dataclass(slots=True)
class _Stream:
    """One PBX as this worker receives it."""

    index: dict[str, int] = field(default_factory=dict)
    order: deque[str] = field(default_factory=deque)
    next_position: int = 0
    index_start: int = 0
    session_start: int = 0
    owners: dict[str, _Owner] = field(default_factory=dict)
    waiting: dict[str, set[str]] = field(default_factory=dict)  # key -> owners waiting on it


class Standby:
    def __init__(
        self,
        *,
        me: str,
        hedge_delay: float,
        window: int,
        hedge: Callable[[list[Pending]], None],
        on_covered: Callable[[int], None] = lambda count: None,
    ) -> None:
        self._me = me
        self._delay = hedge_delay
        self._window = window
        self._index_max = max(4 * window, 10_000)
        self._hedge = hedge
        self._on_covered = on_covered
        self._streams: dict[str, _Stream] = {}
        self._entries: dict[str, _Entry] = {}
        self._arrivals: deque[_Entry] = deque()
        self._by_rank: dict[int, deque[_Entry]] = {}
        # Owner -> (its last beat, the exchange of ours in which it last moved).
        self._beats: dict[str, tuple[Any, int]] = {}
        # Those whose beat has not moved for _BEATING_EXCHANGES (as of the last
        # exchange): not waited for, and not ranked before this worker.
        self._silent: frozenset[str] = frozenset()
        #: Exchanges of coverage so far (fleet.hedging counts them).
        self.exchanges = 0

    @property
    def depth(self) -> int:
        """Events waiting in the window."""
        return len(self._entries)

    def _stream(self, pbx: str) -> _Stream:
        stream = self._streams.get(pbx)
        if stream is None:
            stream = self._streams[pbx] = _Stream()
        return stream

    # -- the reader's side: never waits ----------------------------------------------------

    def session(self, pbx: str) -> None:
        """This worker's own session with ``pbx`` starts: positions before it are not
        contiguous with what follows (its gap), and only a record whose first key is
        found can judge them."""
        stream = self._stream(pbx)
        stream.session_start = stream.next_position

    def seen(self, pbx: str, key: str) -> None:
        """Every raced event, owned or not, in arrival order: its position."""
        stream = self._stream(pbx)
        position = stream.next_position
        stream.next_position = position + 1
        stream.index[key] = position
        stream.order.append(key)  # at index_start + its place: positions are contiguous
        if len(stream.order) > self._index_max:
            self._trim_index(stream)
        waiting = stream.waiting.pop(key, None)
        if waiting:
            # An owner's record named this key before it reached us: apply it now.
            for owner in waiting:
                state = stream.owners.get(owner)
                if state is not None and state.waiting_on == key:
                    state.waiting_on = None
                    self._apply(pbx, stream, owner, state, time.monotonic())

    def _trim_index(self, stream: _Stream) -> None:
        while len(stream.order) > self._index_max:
            key = stream.order.popleft()
            if stream.index.get(key) == stream.index_start:
                del stream.index[key]
            stream.index_start += 1

    def keep(
        self,
        pbx: str,
        item: Pending,
        assignments: list[Assignment],
        rank: int,
        ahead: tuple[str, ...] = (),
    ) -> None:
        """An event another worker should claim; ``rank``: this worker's standby rank,
        behind the workers ``ahead`` (the owner first to claim, then the standbys)."""
        if self._silent:
            # A killed worker stays in the views for a few exchanges: the standbys
            # after it must not each wait a hedge_delay on its behalf.
            rank -= sum([worker in self._silent for worker in ahead])
        stream = self._stream(pbx)
        entry = _Entry(
            item.key,
            item.owner,
            pbx,
            stream.next_position - 1,  # seen() ran just before
            item,
            assignments,
            item.received_mono + self._delay * rank,
            0,
            self.exchanges,
        )
        self._entries[item.key] = entry
        self._arrivals.append(entry)
        queue = self._by_rank.get(rank)
        if queue is None:
            queue = self._by_rank[rank] = deque()
        queue.append(entry)
        if len(assignments) == 1:
            self._expect(stream, entry, assignments[0].owner)
        else:
            for name in {a.owner for a in assignments}:
                self._expect(stream, entry, name)
        if len(self._entries) > self._window:
            self._overflow()

    def _expect(self, stream: _Stream, entry: _Entry, name: str) -> None:
        """Wait for ``name``'s coverage to decide ``entry``."""
        if name == self._me or name in entry.tried:
            return
        entry.tried += (name,)
        entry.undecided += 1
        owner = stream.owners.get(name)
        if owner is None:
            owner = stream.owners[name] = _Owner()
        if owner.queue and owner.queue[-1].position > entry.position:
            owner.late.append(entry)
        else:
            owner.queue.append(entry)

    def _overflow(self) -> None:
        """The window is full: claim its oldest events now (race mode), never drop them."""
        spilled: list[Pending] = []
        while len(self._entries) > self._window * 0.9 and self._arrivals:
            entry = self._arrivals.popleft()
            if entry.live:
                spilled.append(self._forget(entry))
        if spilled:
            self._hedge(spilled)

    def _forget(self, entry: _Entry) -> Pending:
        """Take ``entry`` out of the window; returns its event. It may linger in a
        queue until its deadline comes up: it lets go of the event now."""
        item = entry.item
        assert item is not None
        entry.live = False
        del self._entries[entry.key]
        entry.item = None
        entry.assignments = []
        entry.tried = entry.passed = ()
        return item

    # -- coverage ----------------------------------------------------------------------------

    def heard(self, beats: Mapping[str, Any], idle: Mapping[str, int] | None = None) -> None:
        """Every worker's beat, as read in this exchange (those not listed are gone).

        ``idle``: for each worker, about how many exchanges ago it last published,
        by the store's clock. It counts only for a worker heard for the first time:
        a worker that has just started cannot otherwise tell a dead one from a live
        one until it has watched its beat stay still, and would wait on the dead
        one's behalf. After that, a beat that moves is the only proof of life (an
        estimate too high is mended by the next beat).
        """
        heard: dict[str, tuple[Any, int]] = {}
        for owner, beat in beats.items():
            previous = self._beats.get(owner)
            if previous is None:
                previous = (beat, self.exchanges - (idle or {}).get(owner, 0))
            elif previous[0] != beat:
                previous = (beat, self.exchanges)  # it moved in this exchange
            heard[owner] = previous
        self._beats = heard
        self._silent = frozenset(
            owner
            for owner, (_, moved) in heard.items()
            if self.exchanges - moved > _BEATING_EXCHANGES
        )

    def silent_for(self, worker: str) -> float:
        """Exchanges of ours since ``worker``'s beat last moved (infinite: not heard)."""
        beat = self._beats.get(worker)
        return _NEVER if beat is None else self.exchanges - beat[1]

    def apply(self, owner: str, records: Mapping[str, Any], now: float) -> None:
        """An owner's coverage records (one per PBX), as read from MongoDB."""
        for pbx, record in records.items():
            stream = self._streams.get(pbx)
            if stream is None or not isinstance(record, Mapping):
                continue
            state = stream.owners.get(owner)
            if state is None:
                state = stream.owners[owner] = _Owner()
            if record == state.record:
                continue
            state.record = record
            if record.get("sid") != state.sid:
                state.sid = record.get("sid")
                state.mark_moved = self.exchanges  # a new session: its clock starts now
            if record.get("mark") != state.mark:
                state.mark = record.get("mark")
                state.mark_moved = self.exchanges
            self._apply(pbx, stream, owner, state, now)

    def gone(self, workers: set[str], views: Mapping[str, tuple[str, ...]]) -> None:
        """``workers`` left the views (dead, or leaving); ``views``: each PBX's current
        one. What this worker still expects them to cover, they never will: wait for
        the owners under the current view instead (a worker that joined late, or saw
        the death late, would otherwise hedge events that the others' views had
        already given live owners; at its deadline, an insert each, all lost)."""
        now = time.monotonic()
        for pbx, stream in self._streams.items():
            view = views.get(pbx)
            heirs: set[str] = set()
            for worker in workers & stream.owners.keys():
                if stream.owners[worker].waiting_on is not None:
                    # Its last record names an event not received here yet: it may
                    # cover what this worker holds (a stopping worker's final
                    # record, read ahead of its events). Judged when that comes.
                    continue
                state = stream.owners.pop(worker)
                for entry in [*state.queue, *state.late]:
                    if not entry.live or worker in entry.passed:
                        continue
                    entry.undecided -= 1
                    entry.passed += (worker,)
                    owner = owner_under(entry.owner, view) if view else None
                    if owner is not None and owner != self._me:
                        self._expect(stream, entry, owner)
                        heirs.add(owner)
            for owner in heirs:
                # Its record may not change again for a while: judge by it now.
                heir = stream.owners.get(owner)
                if heir is not None:
                    self._apply(pbx, stream, owner, heir, now)

    def claimed_elsewhere(self, keys: Iterable[Any]) -> None:
        """Events another standby hedged, and claimed: in the store, whoever won."""
        covered = 0
        entries = self._entries
        for key in keys:
            entry = entries.get(key) if isinstance(key, str) else None
            if entry is not None:
                self._forget(entry)
                covered += 1
        if covered:
            self._on_covered(covered)

    def _apply(self, pbx: str, stream: _Stream, owner: str, state: _Owner, now: float) -> None:
        record = state.record
        if record is None or not state.queue:
            return
        previous = record.get("prev")
        if isinstance(previous, Mapping):
            # The owner's session before this one: its last events were claimed
            # after it ended. Judged first: it covers only what precedes this one.
            self._cover(stream, owner, state, previous, ended=True)
            if not state.queue and not state.late:
                return
        self._cover(stream, owner, state, record, ended=False)

    def _cover(
        self, stream: _Stream, owner: str, state: _Owner, record: Mapping[str, Any], *, ended: bool
    ) -> None:
        """Decide the entries up to the mark of one of the owner's session records."""
        index = stream.index
        mark = record.get("mark")
        mark_position = index.get(mark) if isinstance(mark, str) else None
        if mark_position is None:
            if isinstance(mark, str) and not ended:
                # Not received here yet (this worker lags), or older than the index
                # (the owner lags: it covers nothing here). Look again when it comes
                # (an ended session's mark is older than the open one's).
                self._wait_on(stream, owner, state, mark)
            return
        first = record.get("first")
        first_position = index.get(first) if isinstance(first, str) else None
        if first_position is None:
            if ended:
                return  # where it began is unknown here: what it covers cannot be told
            # The session began before what the index holds (contiguous from
            # max(index_start, session_start) up to the mark): everything from
            # there to the mark is inside it.
            start = max(stream.index_start, stream.session_start)
        else:
            start = first_position + 1 if record.get("cut") else first_position
        segments = self._segments(record, index, start)
        queue = state.queue
        ready: list[_Entry] = []
        while queue and queue[0].position <= mark_position:
            ready.append(queue.popleft())
        if state.late:
            ready += [entry for entry in state.late if entry.position <= mark_position]
            state.late = [entry for entry in state.late if entry.position > mark_position]
        covered = 0
        for entry in ready:
            if not entry.live:
                continue
            views = _views_at(segments, entry.position) if entry.position >= start else None
            if views is not None and (
                # The usual case: the owner expected here declares the very view used.
                any(a.owner == owner and a.workers in views for a in entry.assignments)
                or owns_under(entry.owner, owner, views)
            ):
                self._forget(entry)
                covered += 1
                continue
            # Passed, not claimed by this owner. Under its views another worker may
            # have owned it: wait for that one's coverage too.
            entry.undecided -= 1
            entry.passed += (owner,)
            for view in views or ():
                other = owner_under(entry.owner, view)
                if other is not None:
                    self._expect(stream, entry, other)
        if covered:
            self._on_covered(covered)

    @staticmethod
    def _wait_on(stream: _Stream, owner: str, state: _Owner, key: str) -> None:
        previous = state.waiting_on
        if previous is not None and previous != key:
            waiting = stream.waiting.get(previous)
            if waiting is not None:
                waiting.discard(owner)
                if not waiting:
                    del stream.waiting[previous]
        state.waiting_on = key
        stream.waiting.setdefault(key, set()).add(owner)

    @staticmethod
    def _segments(
        record: Mapping[str, Any], index: Mapping[str, int], start: int
    ) -> list[tuple[float, set[tuple[str, ...]]]]:
        """(last position, views) of each segment of the record, in order."""
        segments = []
        for segment in record.get("segs") or ():
            end, views = segment[0], segment[1]
            if end is None:
                last: float = _NEVER
            else:
                position = index.get(end)
                # An end before the index (the mark, after it, is in the index).
                last = float(position) if position is not None else start - 1.0
            segments.append((last, {tuple(view) for view in views or ()}))
        return segments

    # -- deadlines ---------------------------------------------------------------------------

    def due(self, now: float, *, store_up: bool) -> list[Pending]:
        """The events to hedge now (their deadline passed, no owner at work on them)."""
        if not store_up:
            return []  # nobody can claim while MongoDB is away; deadlines wait
        hedges: list[Pending] = []
        for queue in self._by_rank.values():
            while queue and (queue[0].deadline <= now or not queue[0].live):
                entry = queue.popleft()
                if not entry.live:
                    continue
                if self._owner_at_work(entry, now) and entry.extensions < _MAX_EXTENSIONS:
                    entry.extensions += 1
                    entry.deadline = now + self._delay
                    queue.append(entry)
                    continue
                hedges.append(self._forget(entry))
        while self._arrivals and not self._arrivals[0].live:
            self._arrivals.popleft()
        return hedges

    def _owner_at_work(self, entry: _Entry, now: float) -> bool:
        if entry.undecided <= 0:
            return False  # every expected owner passed it without claiming it
        stream = self._streams[entry.pbx]
        for assignment in entry.assignments:
            if assignment.owner in entry.passed:
                continue  # at work, maybe, but not on this one
            state = stream.owners.get(assignment.owner)
            if (
                state is not None
                and state.record is not None
                and not state.record.get("final")  # leaving: will never cover it
                # Its session to this PBX is down: what it had not covered, it may
                # never have received.
                and state.record.get("connected", True)
                and assignment.owner not in self._silent
                and assignment.owner in self._beats
                # Its watermark moved since this event arrived, or lately: an owner
                # idle until this burst gets as long as any to claim its first batch.
                and self.exchanges - max(state.mark_moved, entry.since) <= _AT_WORK_EXCHANGES
            ):
                return True
        return False


def _views_at(
    segments: list[tuple[float, set[tuple[str, ...]]]], position: int
) -> set[tuple[str, ...]] | None:
    for last, views in segments:
        if position <= last:
            return views
    return None
