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
from collections import OrderedDict
from typing import Literal

from amiworker.protocol import Message

__all__ = ["DedupKeys", "RaceMode", "belongs_to_channel", "races"]

RaceMode = Literal["channel", "all", "none"]

# Events that describe one manager session rather than the PBX: each session gets
# its own copy (FullyBooted carries no Timestamp), so they are never raced.
SESSION_EVENTS = frozenset({"fullybooted"})


def belongs_to_channel(message: Message) -> bool:
    """True when a header's lower-cased name ends in ``uniqueid``.

    ``Uniqueid``, ``Uniqueid1``, ``DestUniqueid``, ``LocalOneUniqueid``,
    ``BridgeUniqueid``...: Asterisk's spelling varies between versions, the suffix
    does not.
    """
    return any(name.lower().endswith("uniqueid") for name, _ in message.headers)


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

    __slots__ = ("_recent", "_seed", "window")

    def __init__(self, server: str, window: float) -> None:
        self.window = window
        # The server name is hashed first so equal bytes from two PBXs never collide;
        # copying a seeded hash is cheaper than hashing the name each time.
        self._seed = hashlib.blake2b(server.encode() + b"\0", digest_size=16)
        # digest -> (times seen, monotonic time last seen), oldest first.
        self._recent: OrderedDict[bytes, tuple[int, float]] = OrderedDict()

    def key(self, raw: bytes, now: float) -> str:
        """The ``_id`` of the event whose exact bytes are ``raw``, received at ``now``.

        ``now`` is a monotonic clock reading; it only ages the window.
        """
        digest = self._seed.copy()
        digest.update(raw)
        value = digest.digest()
        recent = self._recent
        self._expire(now)
        seen = recent.get(value)
        occurrence = 0 if seen is None else seen[0]
        recent[value] = (occurrence + 1, now)
        recent.move_to_end(value)
        hexdigest = value.hex()
        return hexdigest if occurrence == 0 else f"{hexdigest}.{occurrence}"

    def _expire(self, now: float) -> None:
        recent = self._recent
        horizon = now - self.window
        while recent:
            oldest = next(iter(recent.values()))
            if oldest[1] >= horizon:
                return
            recent.popitem(last=False)

    def __len__(self) -> int:
        return len(self._recent)
