"""Which events race, and the key every worker computes for the same event.

Asterisk formats an event once and writes the same bytes to every manager
session, so a digest of (server name, raw bytes) names one event identically in
every worker, with no coordination. It is the document ``_id``: the mandatory
``_id`` index is the unique index the workers race on.

Without ``timestampevents=yes`` two different events can be byte-identical (a
VarSet repeated by the dialplan). The key then also carries the occurrence
number of those bytes within a recent window; every worker sees the same stream
in the same order, so every worker numbers them the same way.
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Literal

from amiworker.ami.message import Message

__all__ = ["DedupKeys", "RaceMode", "belongs_to_channel", "races"]

RaceMode = Literal["channel", "all", "none"]

# Events that describe one manager session rather than the PBX: each session gets
# its own copy (FullyBooted carries no Timestamp), so they are never raced.
SESSION_EVENTS = frozenset({"fullybooted"})
# What may follow the colon that ends a header name: a space, or the line's end.
_AFTER_NAME = frozenset({b" ", b"\r", b"\n", b""})


def belongs_to_channel(message: Message) -> bool:
    """True when a header's lower-cased name ends in ``uniqueid``.

    ``Uniqueid``, ``Uniqueid1``, ``DestUniqueid``, ``LocalOneUniqueid``,
    ``BridgeUniqueid``...: Asterisk's spelling varies between versions, the suffix
    does not.
    """
    # Decided on the raw bytes, so that the AMI reader, which asks this of every
    # event, never parses one (the claim loop does, later, if it must).
    raw = message.raw
    if b"\nUniqueid: " in raw:  # a line that starts "Uniqueid: " is that header
        return True
    lowered = raw.lower()
    at = lowered.find(b"uniqueid:")
    while at >= 0:
        # A header name ends here if its line has no ": " before this point and
        # the colon ends the name ("Name: value", or "Name:" at the end of a line).
        end = at + len(b"uniqueid:")
        line_start = lowered.rfind(b"\n", 0, at) + 1
        if lowered[end : end + 1] in _AFTER_NAME and b": " not in lowered[line_start:at]:
            return True
        at = lowered.find(b"uniqueid:", at + 1)
    return False


def races(message: Message, mode: RaceMode) -> bool:
    """Whether this event goes through the lock table (one worker handles it).

    Events that do not race are handled by every worker, as in the PHPDaemon
    pattern. The caller has already set aside responses and events answering
    this session's own actions: those never race.
    """
    if mode == "none" or message.name.lower() in SESSION_EVENTS:
        return False
    return mode == "all" or belongs_to_channel(message)


class DedupKeys:
    """Dedup keys for the events of one PBX, as one worker receives them."""

    __slots__ = ("_again", "_order", "_seed", "_seen", "window")

    def __init__(self, server: str, window: float) -> None:
        self.window = window
        # The server name is hashed first so equal bytes from two PBXs never collide;
        # copying a seeded hash is cheaper than hashing the name each time.
        self._seed = hashlib.blake2b(server.encode() + b"\0", digest_size=16)
        # Every digest seen within the window -> how many times. Kept lean: at peak
        # rates it holds hundreds of thousands of digests, nearly all seen once.
        self._seen: dict[str, int] = {}
        # (monotonic time, digest) of each sighting, oldest first: what the window expires.
        self._order: deque[tuple[float, str]] = deque()
        # Digest -> time of its latest sighting, for the rare digests seen twice or
        # more: their older sightings must not expire them.
        self._again: dict[str, float] = {}

    def key(self, raw: bytes, now: float) -> str:
        """The ``_id`` of the event whose exact bytes are ``raw``, received at ``now``.

        ``now`` is a monotonic clock reading; it only ages the window.
        """
        digest = self._seed.copy()
        digest.update(raw)
        hexdigest = digest.hexdigest()
        order = self._order
        if order and order[0][0] < now - self.window:
            self._expire(now - self.window)
        order.append((now, hexdigest))
        seen = self._seen
        occurrence = seen.get(hexdigest, 0)
        seen[hexdigest] = occurrence + 1
        if occurrence == 0:
            return hexdigest
        self._again[hexdigest] = now
        return f"{hexdigest}.{occurrence}"

    def _expire(self, horizon: float) -> None:
        """Forget the digests last seen before ``horizon``."""
        order, seen, again = self._order, self._seen, self._again
        while order and order[0][0] < horizon:
            seen_at, hexdigest = order.popleft()
            latest = again.get(hexdigest)
            if latest is None:
                seen.pop(hexdigest, None)
            elif latest <= seen_at:  # this was its latest sighting
                del again[hexdigest]
                seen.pop(hexdigest, None)

    def __len__(self) -> int:
        return len(self._seen)
