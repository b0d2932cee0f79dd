"""Events of real calls, from a capture of Asterisk 22.10.1 bundled with the package.

``data/asterisk22-20-calls.txt`` holds the bytes a real Asterisk 22.10.1 sent
to a manager session (``timestampevents = yes``) while 20 calls ran, each an
``Originate`` of ``Local/100@test`` into a dialplan that answers, waits 1 s
and hangs up (see tests/fixtures/README.md in the source tree). Each call has
35 channel events: Newchannel, Newstate, NewCallerid, NewConnectedLine,
SoftHangupRequest and Hangup twice (one per channel), HangupRequest, Newexten
10 times, VarSet 8, LocalBridge, DialBegin, DialEnd, OriginateResponse.

:func:`sample_calls` gives the events of ``n`` of those calls, in the order
Asterisk sent them, with fresh ids: every header that carries a channel's id
(``Uniqueid``, ``Linkedid``, ``DestUniqueid``, ``LocalTwoLinkedid``...) is
rewritten consistently, in Asterisk's own format (``<epoch>.<counter>``), and
each event is re-encoded into the exact bytes the parser would have framed.
Beyond 20 calls the capture repeats, later in time, with new ids and channel
names, so no two calls share an id, a channel name or a Timestamp.
DeviceStateChange events are left out: they carry no channel id, so they
belong to no call (build one with :func:`~amiworker.testing.events.make_event`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from typing import Final

from amiworker.ami.message import Message
from amiworker.ami.protocol import Parser
from amiworker.testing.events import encode_event, format_timestamp
from amiworker.timeparse import timestamp_micros

__all__ = ["CAPTURE_CALLS", "capture_bytes", "sample_calls"]

CAPTURE: Final = "asterisk22-20-calls.txt"
#: Calls in the bundled capture; ``sample_calls(n)`` repeats them beyond this.
CAPTURE_CALLS: Final = 20
_ID_SUFFIXES: Final = ("uniqueid", "linkedid")
# "Local/100@test-0000000a;1": Asterisk numbers channels of a technology in hex.
_CHANNEL_NUMBER: Final = re.compile(r"^(?P<prefix>.*-)(?P<number>[0-9a-f]{8})(?P<leg>;\d+)?$")
_SECOND: Final = 1_000_000


def capture_bytes() -> bytes:
    """The bundled capture, as Asterisk sent it (banner, login reply, events, replies)."""
    return resources.files("amiworker.testing").joinpath("data", CAPTURE).read_bytes()


@dataclass(frozen=True, slots=True)
class _Capture:
    """The capture's call events, grouped and indexed once."""

    events: tuple[tuple[int, Message], ...]  # (call number, event), in stream order
    calls: int
    id_numbers: dict[str, int]  # an id of the capture -> its place, in order first seen
    id_first_micros: dict[str, int]  # an id -> Timestamp of the first event carrying it
    channel_numbers: int  # how many channel names the capture numbers
    first_micros: int
    period_micros: int  # how much later each repeat of the capture starts


def _is_id_header(name: str) -> bool:
    return name.lower().endswith(_ID_SUFFIXES)


@functools.cache
def _capture() -> _Capture:
    messages = Parser().feed(capture_bytes())
    # Broadcast events of a channel: EventList items (replies to this session's
    # own actions) carry no Privilege; DeviceStateChange and session events no id.
    candidates = [
        m
        for m in messages
        if m.kind == "event" and "Privilege" in m and any(_is_id_header(n) for n, _ in m.headers)
    ]
    # A channel's call: its Linkedid, from any event naming both (OriginateResponse
    # carries only the Uniqueid of the channel it created).
    call_of_channel: dict[str, str] = {}
    for message in candidates:
        ids = dict((name.lower(), value) for name, value in message.headers if _is_id_header(name))
        for name, value in ids.items():
            if name.endswith("uniqueid"):
                linked = ids.get(name[: -len("uniqueid")] + "linkedid")
                if linked:
                    call_of_channel.setdefault(value, linked)
    call_numbers: dict[str, int] = {}
    events: list[tuple[int, Message]] = []
    id_numbers: dict[str, int] = {}
    id_first: dict[str, int] = {}
    channel_numbers = 0
    for message in candidates:
        micros = timestamp_micros(message.get("Timestamp"))
        assert micros is not None, "every event of the capture has a Timestamp"
        linkedid = message.get("Linkedid")
        for name, value in message.headers:
            if _is_id_header(name):
                id_numbers.setdefault(value, len(id_numbers))
                id_first.setdefault(value, micros)
                if linkedid is None and name.lower().endswith("linkedid"):
                    linkedid = value
            elif name.lower().endswith("channel"):
                match = _CHANNEL_NUMBER.match(value)
                if match:
                    channel_numbers = max(channel_numbers, int(match["number"], 16) + 1)
        if linkedid is None:
            uniqueid = next(v for n, v in message.headers if n.lower().endswith("uniqueid"))
            linkedid = call_of_channel[uniqueid]
        number = call_numbers.setdefault(linkedid, len(call_numbers))
        events.append((number, message))
    first = min(id_first.values())
    last = max(timestamp_micros(m.get("Timestamp")) or first for _, m in events)
    # Repeats start on a whole second after the capture ends, a second apart from it.
    period = (last - first) // _SECOND * _SECOND + 2 * _SECOND
    assert len(call_numbers) == CAPTURE_CALLS
    return _Capture(
        events=tuple(events),
        calls=len(call_numbers),
        id_numbers=id_numbers,
        id_first_micros=id_first,
        channel_numbers=channel_numbers,
        first_micros=first,
        period_micros=period,
    )


def sample_calls(n: int, *, start: float | None = None) -> list[Message]:
    """The events of ``n`` real calls, in the order sent, each call with fresh ids.

    The same arguments give the same events. ``start`` (seconds since the epoch)
    moves the first event to that time, and the ids with it (an Asterisk
    Uniqueid is the channel's creation time and a counter): two samples with
    starts far enough apart share no id. By default the calls keep the
    capture's own times (2026-11-26 06:46:21 UTC on).
    """
    if n < 0:
        raise ValueError(f"a number of calls is 0 or more, not {n}")
    capture = _capture()
    shift = 0 if start is None else round(start * _SECOND) - capture.first_micros
    result: list[Message] = []
    for repeat in range((n + capture.calls - 1) // capture.calls):
        wanted = min(capture.calls, n - repeat * capture.calls)
        offset = shift + repeat * capture.period_micros
        ids = _fresh_ids(capture, repeat, offset)
        channels = repeat * capture.channel_numbers
        for number, message in capture.events:
            if number < wanted:
                result.append(_rewrite(message, ids, offset, channels))
    return result


def _fresh_ids(capture: _Capture, repeat: int, offset: int) -> dict[str, str]:
    """Each id of the capture -> ``<creation second>.<counter>``, as Asterisk makes them."""
    base = repeat * len(capture.id_numbers)
    return {
        old: f"{(capture.id_first_micros[old] + offset) // _SECOND}.{base + number}"
        for old, number in capture.id_numbers.items()
    }


def _rewrite(message: Message, ids: dict[str, str], offset: int, channels: int) -> Message:
    pairs: list[tuple[str, str]] = []
    for name, value in message.headers:
        lowered = name.lower()
        if lowered.endswith(_ID_SUFFIXES):
            value = ids.get(value, value)
        elif lowered == "timestamp":
            micros = timestamp_micros(value)
            if micros is not None:
                value = format_timestamp(micros + offset)
        elif channels and lowered.endswith("channel"):
            match = _CHANNEL_NUMBER.match(value)
            if match:
                number = int(match["number"], 16) + channels
                value = f"{match['prefix']}{number:08x}{match['leg'] or ''}"
        pairs.append((name, value))
    return Message(encode_event(pairs))
