"""Hedged mode: which worker owns an event, by rendezvous hashing over a view of the fleet.

A *view* of one PBX is the sorted tuple of the workers eligible to own its
events: in hedged mode, running, coverage record fresh, session to that PBX up,
as the ``coverage`` documents say (fleet.hedging reads them every exchange).
Every worker derives it from the same documents, so views agree except while
a change propagates (an exchange interval or so).

For an event, every worker of the view gets a score from the event's *call*
and its own id; the highest score owns the event, the next is rank 1 of its
standbys, and so on. Adding or removing a worker moves only the calls it wins
or held (rendezvous hashing), and ownership spreads evenly over calls.

The call, not the event: every channel event of a call carries the call's
``Linkedid`` (prefixed in some events: ``DestLinkedid``, ``LocalOneLinkedid``),
so one worker owns all of it. A burst of a call's events is then one claim
from one worker instead of one from each (fewer, larger inserts, and fewer
of them at the same moment), its handlers run in one worker in order, and the
decision is made once per call and looked up for the rest of its events.
Events without a Linkedid are owned by their ``Uniqueid``, else by their key.
Any rule that every worker computes alike from the same bytes is correct: the
unique ``_id`` decides every race whoever claims.

Views may disagree; that must never leave an event with no owner. So for
``transition`` seconds after its view changes a worker owns what it owns in
the old view *or* the new one, and it declares, with its coverage, which views
it owned under (fleet.coverage): a standby forgets an event only if the owner
it expected declared owning under the view the standby used. A disagreement
costs a double insert, never a lost event.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

__all__ = ["Assignment", "Decision", "Ownership", "View", "owner_hash", "owner_under", "owns_under"]

_MASK64: Final = (1 << 64) - 1


def _worker_hash(worker_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(worker_id.encode(), digest_size=8).digest(), "big")


def _event_hash(key: str) -> int:
    # The key is a hex digest already: its first 64 bits are as good as any hash of it.
    return int(key[:16], 16)


# Raw-bytes searches, as the reader makes them (no header parse): the first header
# whose name ends in Linkedid, else in Uniqueid.
_CALL_HEADERS: Final = (b"Linkedid: ", b"Uniqueid: ")
_call_hashes: dict[bytes, int] = {}


def owner_hash(raw: bytes, key: str) -> int:
    """What ownership scores an event on: a hash of its call's id, from the raw bytes,
    or of its key when it names no call. Looked up once per call in a bounded table:
    this runs in every worker for every event."""
    for name in _CALL_HEADERS:
        at = raw.find(name)
        if at < 0:
            continue
        start = at + len(name)
        end = raw.find(b"\n", start)
        if end < 0:
            end = len(raw)
        if raw[end - 1 : end] == b"\r":
            end -= 1
        if end == start:
            continue
        call = raw[start:end]
        hashed = _call_hashes.get(call)
        if hashed is None:
            if len(_call_hashes) >= 65536:  # calls end: stay bounded
                _call_hashes.clear()
            hashed = _call_hashes[call] = int.from_bytes(
                hashlib.blake2b(call, digest_size=8).digest(), "big"
            )
        return hashed
    return _event_hash(key)


# Fibonacci hashing: the xor of the event's and the worker's hashes times 2**64/phi.
# The product's high bits mix every bit of both; scores are compared whole, high
# bits first. Every worker must score alike: changing this is a fleet-wide change.
_GOLDEN: Final = 0x9E3779B97F4A7C15


@dataclass(frozen=True, slots=True)
class View:
    """The workers eligible to own one PBX's events, and a short name for the set."""

    workers: tuple[str, ...]
    name: str
    hashes: tuple[int, ...]  # of the workers, in the same order
    #: Who claims an event under this view, for each owner (made once: one is
    #: handed out for every event a standby keeps).
    assignments: tuple[Assignment, ...]

    @classmethod
    def of(cls, workers: Iterable[str]) -> View:
        members = tuple(sorted(set(workers)))
        name = hashlib.blake2b("\n".join(members).encode(), digest_size=6).hexdigest()
        hashes = tuple(_worker_hash(w) for w in members)
        return cls(members, name, hashes, tuple(Assignment(w, members) for w in members))

    def position_of(self, worker: str) -> int | None:
        try:
            return self.workers.index(worker)
        except ValueError:
            return None

    def scores(self, event: int) -> list[int]:
        """Each worker's score for an event of :func:`owner_hash` ``event`` (the
        highest owns it)."""
        return [((event ^ h) * _GOLDEN) & _MASK64 for h in self.hashes]

    def ranking(self, event: int) -> list[str]:
        """The view's workers for the event, owner first."""
        scores = self.scores(event)
        order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)
        return [self.workers[i] for i in order]

    def owner(self, event: int) -> str | None:
        if not self.workers:
            return None
        scores = self.scores(event)
        return self.workers[scores.index(max(scores))]


_known_views: dict[tuple[str, ...], View] = {}


def _view(workers: Sequence[str]) -> View:
    members = tuple(workers)
    view = _known_views.get(members)
    if view is None:
        if len(_known_views) > 256:  # views come and go: stay bounded
            _known_views.clear()
        view = _known_views[members] = View.of(members)
    return view


def owns_under(event: int, worker: str, views: Iterable[Sequence[str]]) -> bool:
    """Whether ``worker`` owns the event (its :func:`owner_hash`) under any of
    ``views`` (lists of the eligible workers, as a coverage record declares them)."""
    return any(_view(view).owner(event) == worker for view in views if worker in view)


def owner_under(event: int, view: Sequence[str]) -> str | None:
    return _view(view).owner(event)


class Assignment(NamedTuple):
    """Who a standby expects to claim an event: ``owner``, under ``workers`` (a view).
    A tuple: one is made for every event a worker stands by for."""

    owner: str
    workers: tuple[str, ...]


class Decision(NamedTuple):
    """One worker's part in one event: owner, or standby for ``assignments`` (who
    should claim it, under each view in force) at ``rank``, behind the workers
    ``ahead`` (the owner and the standbys ranked before it, in the current view:
    fleet.standby moves up past those that have gone silent). Shared by every
    event of a call: never changed in place."""

    owned: bool
    assignments: list[Assignment]
    rank: int
    ahead: tuple[str, ...] = ()


_OWNED: Final = Decision(True, [], 0)


class Ownership:
    """This worker's views, one per PBX, with the ones it held within ``transition`` s."""

    def __init__(self, me: str, transition: float) -> None:
        self.me = me
        self.transition = transition
        self._views: dict[str, View] = {}
        # PBX -> [(view, monotonic time it stopped being current)], newest last.
        self._recent: dict[str, list[tuple[View, float]]] = {}
        #: View name -> this worker's place in it (None: not in it), for the hot path.
        self._mine: dict[str, int | None] = {}
        #: Bumped at every view change (the coverage splits its segments there).
        self.changes = 0
        # PBX -> {owner hash: decision} under its one current view: made once per
        # call, looked up for its other events. Emptied when the view changes.
        self._decided: dict[str, dict[int, Decision]] = {}

    def ready(self, pbx: str) -> bool:
        """Whether a view of ``pbx`` is known (before that, claim everything: race)."""
        return pbx in self._views

    def update(self, pbx: str, workers: Iterable[str], now: float | None = None) -> bool:
        """Install the current view of ``pbx``; True if it changed."""
        now = time.monotonic() if now is None else now
        view = View.of(workers)
        current = self._views.get(pbx)
        if current is not None and current.workers == view.workers:
            return False
        if current is not None:
            self._recent.setdefault(pbx, []).append((current, now))
        self._views[pbx] = view
        if len(self._mine) > 256:  # views come and go: keep those that may be in force
            held = [*self._views.values(), *(v for r in self._recent.values() for v, _ in r)]
            self._mine = {v.name: v.position_of(self.me) for v in held}
        self._mine[view.name] = view.position_of(self.me)
        self._decided.pop(pbx, None)
        self.changes += 1
        return True

    def views(self, pbx: str, now: float | None = None) -> list[View]:
        """The current view and those it replaced within ``transition`` s, current first."""
        current = self._views.get(pbx)
        if current is None:
            return []
        now = time.monotonic() if now is None else now
        recent = self._recent.get(pbx)
        if recent:
            kept = [(v, ended) for v, ended in recent if now - ended < self.transition]
            if len(kept) != len(recent):
                recent[:] = kept
                self.changes += 1  # the set of views owned under has shrunk
            return [current, *(v for v, _ in reversed(kept) if v.name != current.name)]
        return [current]

    def view_lists(self, pbx: str) -> list[list[str]]:
        """The views in force, as lists of workers (what a coverage segment declares)."""
        return [list(v) for v in sorted({view.workers for view in self.views(pbx)})]

    def decide(self, pbx: str, event: int) -> Decision:
        """For one event (its :func:`owner_hash`): whether this worker owns it (in any
        view it holds now), and if not, who should claim it under each view and this
        worker's standby rank in the current view (1 = first to hedge). The reader's
        hot path: between view changes, a call's decision is made once."""
        current = self._views.get(pbx)
        if current is None:
            return _OWNED  # no view yet: claim, as in race mode
        if self._recent.get(pbx):
            return self._decide(self.views(pbx), current, event)
        decided = self._decided.get(pbx)
        if decided is None:
            decided = self._decided[pbx] = {}
        decision = decided.get(event)
        if decision is None:
            if len(decided) >= 65536:  # calls end: stay bounded
                decided.clear()
            decision = decided[event] = self._decide((current,), current, event)
        return decision

    def _decide(self, views: Sequence[View], current: View, event: int) -> Decision:
        assignments: list[Assignment] = []
        rank = 0
        ahead: tuple[str, ...] = ()
        for view in views:
            if not view.workers:
                continue
            scores = view.scores(event)
            best = max(scores)
            position = scores.index(best)
            mine = self._mine[view.name]
            if position == mine:
                return _OWNED
            assignments.append(view.assignments[position])
            if view is current:
                if mine is None:
                    rank = len(scores) + 1
                    ahead = view.workers
                else:
                    score = scores[mine]
                    ahead = tuple(w for w, s in zip(view.workers, scores, strict=True) if s > score)
                    rank = len(ahead)
        return Decision(False, assignments, max(rank, 1), ahead)
