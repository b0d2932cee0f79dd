"""One AMI event, built as the parser would have built it from Asterisk's bytes.

:func:`make_event` gives a :class:`~amiworker.ami.message.Message` whose ``raw``
is what Asterisk 22 writes to a manager session: ``Event:`` first, then
``Privilege`` and ``Timestamp`` (``timestampevents = yes``), then the headers
given, ``Name: value`` lines ended by CRLF and an empty line. The dedup key a
worker computes, the document it stores and what a handler reads are therefore
the same as for the real event::

    make_event("Hangup", Uniqueid="1795675581.12", Linkedid="1795675581.11",
               Cause="16", Cause_txt="Normal Clearing")

A keyword's underscores become hyphens (``Cause_txt`` is ``Cause-txt``); give
exact names, or repeats, as ``(name, value)`` pairs in ``headers``. A list
value is a repeated header (``ChanVariable=["A=1", "B=2"]``); None leaves a
header out (``Timestamp=None`` for an event sent without one).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, TypeAlias

from amiworker.ami.message import Message

__all__ = ["HeaderInput", "encode_event", "format_timestamp", "make_event", "privilege_of"]

Value: TypeAlias = str | int | float
HeaderInput: TypeAlias = Value | Sequence[Value] | None

# The Privilege Asterisk 22 gives each event class (manager.c's EVENT_FLAG_*
# names, as sent with ``read = all``): the events of the bundled capture, and
# the common events of other modules. Anything else is a channel event.
_PRIVILEGES: Final = {
    **dict.fromkeys(("newexten", "varset"), "dialplan,all"),
    **dict.fromkeys(("dtmfbegin", "dtmfend"), "dtmf,all"),
    **dict.fromkeys(
        (
            "fullybooted",
            "peerstatus",
            "contactstatus",
            "registry",
            "reload",
            "shutdown",
            "channelreload",
            "loadaverage_limit",
            "modulelasterror",
        ),
        "system,all",
    ),
    **dict.fromkeys(
        (
            "successfulauth",
            "failedacl",
            "invalidaccountid",
            "invalidpassword",
            "challengesent",
            "challengeresponsefailed",
            "requestbadformat",
            "requestnotallowed",
            "unexpectedaddress",
        ),
        "security,all",
    ),
    **dict.fromkeys(
        (
            "agentcalled",
            "agentcomplete",
            "agentconnect",
            "agentdump",
            "agentlogin",
            "agentlogoff",
            "agentringnoanswer",
            "queuecallerabandon",
            "queuecallerjoin",
            "queuecallerleave",
            "queuememberadded",
            "queuememberpause",
            "queuememberremoved",
            "queuememberstatus",
        ),
        "agent,all",
    ),
    "cdr": "cdr,all",
    "cel": "cel,all",
    "userevent": "user,all",
    **dict.fromkeys(("rtcpsent", "rtcpreceived"), "reporting,all"),
}
_CHANNEL_PRIVILEGE: Final = "call,all"
# Sent to one session about itself, without a Timestamp even with timestampevents.
_NO_TIMESTAMP: Final = frozenset({"fullybooted"})

_clock_lock = threading.Lock()
_last_micros = 0


def privilege_of(event_name: str) -> str:
    """The ``Privilege`` header Asterisk 22 sends with ``event_name`` (any case)."""
    return _PRIVILEGES.get(event_name.lower(), _CHANNEL_PRIVILEGE)


def format_timestamp(micros: int) -> str:
    """Microseconds since the epoch as Asterisk writes a ``Timestamp``: ``1795675581.052545``."""
    seconds, fraction = divmod(micros, 1_000_000)
    return f"{seconds}.{fraction:06d}"


def _now_micros() -> int:
    """This host's clock, strictly increasing across calls: events made one after the
    other carry Timestamps in that order, as a PBX's do."""
    global _last_micros
    with _clock_lock:
        _last_micros = max(time.time_ns() // 1000, _last_micros + 1)
        return _last_micros


def encode_event(headers: Iterable[tuple[str, str]]) -> bytes:
    """``(name, value)`` pairs as one AMI message: ``Name: value`` CRLF lines and an
    empty line, exactly the bytes the parser frames (its ``Message.raw``).

    Refuses CR or LF in a name or value (they would end the message early) and a
    name that is empty or holds a colon.
    """
    lines: list[str] = []
    for name, value in headers:
        if not name or ":" in name or "\r" in name or "\n" in name:
            raise ValueError(f"header name {name!r} is empty or holds ':', CR or LF")
        if "\r" in value or "\n" in value:
            raise ValueError(f"value of {name} {value!r} holds CR or LF")
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode()


def _pairs(name: str, value: HeaderInput) -> list[tuple[str, str]]:
    if value is None:
        return []
    if isinstance(value, str | int | float):
        return [(name, str(value))]
    return [(name, str(item)) for item in value]


def make_event(
    name: str,
    headers: Mapping[str, HeaderInput] | Iterable[tuple[str, HeaderInput]] = (),
    /,
    **keywords: HeaderInput,
) -> Message:
    """One event ``name`` with these headers, as the parser gives it (``raw`` included).

    ``Privilege`` and ``Timestamp`` come second and third as Asterisk 22 sends
    them, unless given (None leaves them out). The default Timestamp is this
    host's clock, increasing from one call to the next.
    """
    if not name:
        raise ValueError("an event needs a name")
    given: list[tuple[str, HeaderInput]] = list(
        headers.items() if isinstance(headers, Mapping) else headers
    )
    given += [(key.replace("_", "-"), value) for key, value in keywords.items()]
    privilege: HeaderInput = privilege_of(name)
    timestamp: HeaderInput = None
    clock = name.lower() not in _NO_TIMESTAMP  # unless a Timestamp is given
    rest: list[tuple[str, HeaderInput]] = []
    for key, value in given:
        lowered = key.lower()
        if lowered == "privilege":
            privilege = value
        elif lowered == "timestamp":
            timestamp, clock = value, False
        elif lowered == "event":
            raise ValueError("give the event's name as the first argument, not as a header")
        else:
            rest.append((key, value))
    if clock:
        timestamp = format_timestamp(_now_micros())
    pairs = [("Event", name), *_pairs("Privilege", privilege), *_pairs("Timestamp", timestamp)]
    for key, value in rest:
        pairs += _pairs(key, value)
    return Message(encode_event(pairs))
