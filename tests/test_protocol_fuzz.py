"""The parser against hostile bytes: real Asterisk 22 captures, mutated.

Whatever a broken or hostile peer sends, ``Parser.feed`` may only return
messages or raise :class:`ProtocolError`; it never holds more than
``max_message_size`` bytes; and how the stream was cut into reads never
changes what comes out (the same messages, and an error or not). The inputs
are windows of the real captures in tests/fixtures (plus an Asterisk 13 style
``Response: Follows`` exchange, which the captures lack), truncated, bit
flipped, sprinkled with CR/LF/NUL, given huge lines, spliced together, or left
inside a ``Follows`` body that never ends.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from amiworker.ami.message import Message
from amiworker.ami.protocol import DEFAULT_MAX_MESSAGE_SIZE, Parser, ProtocolError
from tests.test_fast_paths import OTHER_NAMES, WORKER_NAMES, check_lookups

FIXTURES = Path(__file__).parent / "fixtures"
BANNER = b"Asterisk Call Manager/11.0.0\r\n"
LEGACY_BANNER = b"Asterisk Call Manager/2.10.6\r\n"
# Asterisk 13's Command reply: a raw body (empty lines and ": " included) up to the marker.
LEGACY = (
    LEGACY_BANNER
    + b"Response: Success\r\nActionID: login-1\r\nMessage: Authentication accepted\r\n\r\n"
    + b"Response: Follows\r\nPrivilege: Command\r\nActionID: cmd-2\r\n"
    + b"Channel              Location             State   Application(Data)\n\n"
    + b"Key: not a header\n0 active channels\n--END COMMAND--\r\n\r\n"
    + b"Event: FullyBooted\r\nPrivilege: system,all\r\nStatus: Fully Booted\r\n\r\n"
)
SMALL = ("asterisk22-actions.txt", "asterisk22-md5-login.txt", "asterisk22-bad-login.txt")
LARGE = ("asterisk22-20-calls.txt", "asterisk22-session-a.txt", "asterisk22-session-b.txt")
CAPTURES = {name: (FIXTURES / name).read_bytes() for name in SMALL + LARGE}
WINDOW = 16 * 1024  # bytes of a large capture per example: keeps each example fast
LIMITS = (1024, 4096, 64 * 1024, DEFAULT_MAX_MESSAGE_SIZE)
EXAMPLES = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def boundaries(data: bytes) -> list[int]:
    """Where each message after the banner starts."""
    return [m.end() for m in re.finditer(rb"\r\n\r\n", data)]


BOUNDARIES = {name: boundaries(data) for name, data in CAPTURES.items()}


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """A whole, unmutated AMI stream: banner, then complete messages."""
    name = draw(st.sampled_from((*SMALL, *LARGE, "legacy")))
    if name == "legacy":
        return LEGACY
    data = CAPTURES[name]
    if name in SMALL:
        return data
    starts = BOUNDARIES[name]
    first = draw(st.integers(0, len(starts) - 2))
    start = starts[first]
    ends = [end for end in starts[first + 1 :] if end - start <= WINDOW] or [starts[first + 1]]
    end = draw(st.sampled_from(ends))
    return BANNER + data[start:end]


# -- mutations: each takes the draw function and a stream, returns the mutated stream ---------

Mutation = Callable[[st.DrawFn, bytes], bytes]


def _position(draw: st.DrawFn, data: bytes) -> int:
    """Anywhere, or (half of the time) where a message starts."""
    starts = [0, *boundaries(data)]
    if draw(st.booleans()):
        return draw(st.sampled_from(starts))
    return draw(st.integers(0, len(data)))


def truncate(draw: st.DrawFn, data: bytes) -> bytes:
    return data[: draw(st.integers(0, len(data)))]


def flip_bits(draw: st.DrawFn, data: bytes) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 16))):
        out[draw(st.integers(0, len(out) - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(out)


def insert_line_ends(draw: st.DrawFn, data: bytes) -> bytes:
    pieces = st.sampled_from([b"\r", b"\n", b"\x00", b"\r\n", b"\n\n", b"\r\n\r\n", b"\r\r\n"])
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(pieces) * draw(st.integers(1, 3)) + data[at:]
    return data


def insert_huge_line(draw: st.DrawFn, data: bytes) -> bytes:
    at = _position(draw, data)
    length = draw(st.sampled_from([1_000, 5_000, 70_000, DEFAULT_MAX_MESSAGE_SIZE + 10]))
    end = draw(st.sampled_from([b"\r\n", b"", b"\r\n\r\n"]))
    return data[:at] + b"X-Huge: " + b"h" * length + end + data[at:]


def splice(draw: st.DrawFn, data: bytes) -> bytes:
    """The first part of this stream, then the rest of another, cut anywhere."""
    other = draw(streams())
    return data[: draw(st.integers(0, len(data)))] + other[draw(st.integers(0, len(other))) :]


def endless_follows(draw: st.DrawFn, data: bytes) -> bytes:
    """A ``Response: Follows`` reply whose body never reaches --END COMMAND--."""
    at = _position(draw, data)
    line = draw(st.sampled_from([b"0 active channels\n", b"Key: value\r\n", b"\n", b"--END\n"]))
    body = line * draw(st.integers(1, 5_000))
    return data[:at] + b"Response: Follows\r\nPrivilege: Command\r\n" + body


MUTATIONS: tuple[Mutation, ...] = (
    truncate,
    flip_bits,
    insert_line_ends,
    insert_huge_line,
    splice,
    endless_follows,
)


def recase(draw: st.DrawFn, data: bytes) -> bytes:
    """Some letters in the other case: header names as another Asterisk spells them."""
    if not data:
        return data
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 40))):
        at = draw(st.integers(0, len(out) - 1))
        out[at : at + 1] = out[at : at + 1].swapcase()
    return bytes(out)


def insert_header_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """Bytes that change what a line's name is: colons, spaces, a KELVIN SIGN, not UTF-8."""
    pieces = st.sampled_from(
        [b":", b": ", b" ", b"\r\nUniqueid: ", b"\nlinkedid:", b"\xe2\x84\xaa", b"\xff", b"\xc3"]
    )
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(pieces) + data[at:]
    return data


@st.composite
def mutated_streams(draw: st.DrawFn, mutations: tuple[Mutation, ...] = MUTATIONS) -> bytes:
    data = draw(streams())
    for _ in range(draw(st.integers(1, 3))):
        mutation = draw(st.sampled_from(mutations))
        event(mutation.__name__)
        data = mutation(draw, data)
    return data


@st.composite
def cuts(draw: st.DrawFn, size: int) -> list[int]:
    """Read boundaries: random ones, and sometimes a run of one-byte reads."""
    points = draw(st.lists(st.integers(0, size), max_size=200))
    if size and draw(st.booleans()):
        start = draw(st.integers(0, size))
        points += range(start, min(size, start + 2_000))
    return sorted(set(points))


# -- feeding ------------------------------------------------------------------------------------


class Outcome:
    """What a parser made of a stream: the messages it delivered, and its error if any."""

    def __init__(self, messages: list[Message], error: ProtocolError | None) -> None:
        self.messages = messages
        self.error = error

    @property
    def raws(self) -> list[bytes]:
        return [m.raw for m in self.messages]


def feed(data: bytes, points: list[int], limit: int) -> Outcome:
    """Feed ``data`` cut at ``points``; check the buffer bound after every read."""
    parser = Parser(max_message_size=limit)
    messages: list[Message] = []
    start = 0
    try:
        for point in [*points, len(data)]:
            messages += parser.feed(data[start:point])
            start = point
            assert parser.buffered <= limit
    except ProtocolError as exc:
        messages += exc.messages  # complete messages before the fault are still delivered
        with pytest.raises(ProtocolError):
            parser.feed(b"Event: After\r\n\r\n")  # a broken session stays broken
        return Outcome(messages, exc)
    return Outcome(messages, None)


def touch(message: Message) -> None:
    """Every accessor works on whatever came in: nothing may raise later, in a handler."""
    assert message.kind in ("event", "response", "unknown")
    assert isinstance(message.name, str) and isinstance(message.text, str)
    assert dict(message) is not None and len(message) >= 0
    assert message.headers is not None and message.extra_lines is not None
    assert isinstance(message.output, list) and message.getall("Variable") is not None
    assert message.action_id is None or isinstance(message.action_id, str)
    assert repr(message).startswith("<Message")


def in_order_within(raws: list[bytes], data: bytes) -> bool:
    """Each message is bytes of the input, in order, none overlapping."""
    pos = 0
    for raw in raws:
        found = data.find(raw, pos)
        if found < 0:
            return False
        pos = found + len(raw)
    return True


# -- properties ---------------------------------------------------------------------------------


@EXAMPLES
@given(data=st.data(), stream=mutated_streams(), limit=st.sampled_from(LIMITS))
def test_mutated_captures_give_messages_or_a_protocol_error_never_anything_else(
    data: st.DataObject, stream: bytes, limit: int
) -> None:
    split = feed(stream, data.draw(cuts(len(stream))), limit)
    for message in split.messages:
        touch(message)
    assert in_order_within(split.raws, stream)
    whole = feed(stream, [], limit)
    assert split.raws == whole.raws
    assert (split.error is None) == (whole.error is None), (split.error, whole.error)
    event("refused" if split.error else "accepted")


@EXAMPLES
@given(data=st.data(), stream=streams(), limit=st.sampled_from(LIMITS[2:]))
def test_unmutated_captures_give_the_same_messages_however_they_are_split(
    data: st.DataObject, stream: bytes, limit: int
) -> None:
    split = feed(stream, data.draw(cuts(len(stream))), limit)
    whole = feed(stream, [], limit)
    assert split.error is None and whole.error is None
    assert split.raws == whole.raws
    assert [m.headers for m in split.messages] == [m.headers for m in whole.messages]
    banner = stream.index(b"\n") + 1
    assert b"".join(split.raws) == stream[banner:]  # every byte after the banner, once


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(stream=mutated_streams((*MUTATIONS, recase, insert_header_bytes)))
def test_one_header_of_mutated_captures_from_the_raw_bytes_is_what_the_index_gives(
    stream: bytes,
) -> None:
    # Whatever the bytes, reading one header without the index (a search of the raw
    # bytes) gives what the index of every header gives: the names the worker reads,
    # and every name each message has, in its own spelling and lower-cased.
    for message in feed(stream, [], DEFAULT_MAX_MESSAGE_SIZE).messages:
        names = {name for name, _ in Message(message.raw, follows=message._follows).headers}
        names.update(name.lower() for name in list(names))
        check_lookups(message.raw, [*WORKER_NAMES, *OTHER_NAMES, *names], message._follows)


# -- the cases the properties are about, spelled out ------------------------------------------


def test_a_follows_body_that_never_ends_is_refused_at_the_limit() -> None:
    parser = Parser(banner=False, max_message_size=64 * 1024)
    parser.feed(b"Response: Follows\r\nPrivilege: Command\r\n")
    with pytest.raises(ProtocolError, match="unfinished message of over 65536 bytes"):
        for _ in range(10_000):
            parser.feed(b"0 active channels\n\n")  # empty lines do not end a Follows body
            assert parser.buffered <= 64 * 1024


@pytest.mark.parametrize("cut", [None, 100, 1024, 1025, 1500])
def test_a_banner_over_1024_bytes_is_refused_however_it_is_split(cut: int | None) -> None:
    stream = b"Asterisk Call Manager/11.0" + b"9" * 2000 + b"\r\nEvent: A\r\n\r\n"
    parser = Parser()
    with pytest.raises(ProtocolError, match="first line is too long"):
        if cut is None:
            parser.feed(stream)
        else:
            parser.feed(stream[:cut])
            parser.feed(stream[cut:])


@pytest.mark.parametrize("follows", [False, True])
def test_a_large_message_in_small_reads_costs_linear_time(follows: bool) -> None:
    """A PBX trickling a 2 MiB message in 100-byte reads must not hog the event loop.

    Rescanning and re-copying everything held on every read took about 15 s here
    (quadratic); searching only the new bytes takes milliseconds.
    """
    head = b"Response: Follows\r\nPrivilege: Command\r\n" if follows else b"Event: Big\r\n"
    line = b"x" * 98 + (b"\n" if follows else b"\r\n")
    tail = b"--END COMMAND--\r\n\r\n" if follows else b"\r\n"
    stream = head + line * (2 * 1024 * 1024 // len(line)) + tail
    parser = Parser(banner=False, max_message_size=4 * 1024 * 1024)
    started = time.process_time()
    messages: list[Message] = []
    for start in range(0, len(stream), 100):
        messages += parser.feed(stream[start : start + 100])
    elapsed = time.process_time() - started
    assert [m.raw for m in messages] == [stream]
    assert elapsed < 2.0, f"{elapsed:.2f} s of CPU for one 2 MiB message"
