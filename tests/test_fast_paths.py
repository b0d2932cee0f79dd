"""The hot path's shortcuts give exactly what the plain code gives.

Framing a whole read with one split, deciding which events race from the raw
bytes, and expiring dedup keys from a queue of sightings are each checked
against a straightforward reference, on generated streams full of the
awkward cases (stray line ends, bare LFs, Follows replies, repeated bytes).
"""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amiworker.ami.message import Message
from amiworker.ami.protocol import Parser, ProtocolError
from amiworker.fleet.dedup import DedupKeys, belongs_to_channel

PIECES = [
    b"Event: Newexten\r\nUniqueid: 1.1\r\nLinkedid: 1.1\r\n\r\n",
    b"Event: DialBegin\r\nDestUniqueid: 2.2\r\n\r\n",
    b"Event: DeviceStateChange\r\nDevice: Local/100\r\nState: INUSE\r\n\r\n",
    b"Event: X\nUniqueid: 3\n\n",  # bare LF
    b"Event: Y\r\nKey: 1\r\n\n",  # the \r\n\n terminator
    b"\r\n",  # a stray empty line
    b"\n",
    b"\r",
    b"Response: Follows\r\nPrivilege: Command\r\nline one\r\n\r\nline: three\r\n"
    b"--END COMMAND--\r\n\r\n",
    b"Response: Success\r\nActionID: 7\r\n\r\n",
    b"Event: Z\r\nDestuniqueid:\r\nLine without colon\r\n\r\n",
    b"Event: V\r\nVariable: a=1\r\nVariable: b=2\r\nUNIQUEID: 9\r\n\r\n",
    b"Event: W\r\nData: Uniqueid: 4\r\n\r\n",  # "uniqueid" only in a value
    "Event: U\r\nCallerIDName: J\u00fcrgen\r\n\r\n".encode(),
]


def loop_only(parser: Parser) -> Parser:
    parser._split_plain = lambda buf: None  # type: ignore[method-assign]
    return parser


def parse_all(stream: bytes, cuts: list[int], parser: Parser) -> tuple[list[bytes], str, int]:
    raws: list[bytes] = []
    start = 0
    try:
        for cut in [*sorted(set(cuts)), len(stream)]:
            raws += [m.raw for m in parser.feed(stream[start:cut])]
            start = cut
    except ProtocolError as exc:
        return raws + [m.raw for m in exc.messages], str(exc), parser.buffered
    return raws, "", parser.buffered


@settings(max_examples=300, deadline=None)
@given(
    picks=st.lists(st.integers(0, len(PIECES) - 1), max_size=40),
    cuts=st.lists(st.integers(0, 4000), max_size=8),
    limit=st.sampled_from([1024, 60, 45]),
)
def test_split_framing_equals_the_loop(picks: list[int], cuts: list[int], limit: int) -> None:
    stream = b"".join(PIECES[i] for i in picks)
    fast = parse_all(stream, cuts, Parser(banner=False, max_message_size=limit))
    slow = parse_all(stream, cuts, loop_only(Parser(banner=False, max_message_size=limit)))
    assert fast == slow


def test_the_capture_frames_the_same_either_way() -> None:
    from tests.test_protocol import capture

    data = capture("asterisk22-20-calls.txt")
    rng = random.Random(20)
    cuts = sorted(rng.randrange(len(data)) for _ in range(300))
    assert parse_all(data, cuts, Parser()) == parse_all(data, cuts, loop_only(Parser()))


def reference_belongs_to_channel(message: Message) -> bool:
    return any(name.lower().endswith("uniqueid") for name, _ in message.headers)


@pytest.mark.parametrize("raw", [p for p in PIECES if p.startswith(b"Event")])
def test_race_decision_from_raw_bytes(raw: bytes) -> None:
    message = Parser(banner=False).feed(raw)[0]
    assert belongs_to_channel(message) == reference_belongs_to_channel(message)


@given(
    lines=st.lists(
        st.text(alphabet="UuNnIiQqEeDdXx: \u0130\u212a", min_size=0, max_size=24), max_size=5
    ),
    ending=st.sampled_from(["\r\n", "\n"]),
)
def test_race_decision_for_any_header_lines(lines: list[str], ending: str) -> None:
    # Names, values, "Name:" lines and lines with no colon at all, made of the
    # letters of "uniqueid", colons and spaces: the raw-byte decision must agree
    # with reading the parsed header names.
    body = "".join(f"{line}{ending}" for line in lines if line.strip())
    message = Message(f"Event: T{ending}{body}{ending}".encode())
    assert belongs_to_channel(message) == reference_belongs_to_channel(message)


def test_header_dict_is_the_stored_shape() -> None:
    raw = b"Event: V\r\nVariable: a=1\r\nUniqueid: 9\r\nvariable: b=2\r\nEmpty:\r\n\r\n"
    message = Message(raw)
    assert message.header_dict() == {
        "event": "V",
        "variable": ["a=1", "b=2"],
        "uniqueid": "9",
        "empty": "",
    }
    assert message["VARIABLE"] == "a=1"  # the first of a repeat
    copy = message.header_dict()
    copy["event"] = "changed"
    assert message.header_dict()["event"] == "V"


class ReferenceKeys:
    """DedupKeys as first written: an OrderedDict moved to the end on each sighting."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.inner = DedupKeys("pbx", window)  # only for the digest
        self.recent: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def key(self, raw: bytes, now: float) -> str:
        digest = DedupKeys("pbx", 0).key(raw, 0.0)
        while self.recent and next(iter(self.recent.values()))[1] < now - self.window:
            self.recent.popitem(last=False)
        count = self.recent.get(digest, (0, 0.0))[0]
        self.recent[digest] = (count + 1, now)
        self.recent.move_to_end(digest)
        return digest if count == 0 else f"{digest}.{count}"


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from([0.0, 0.0, 0.1, 0.4, 1.0, 2.5])),
        max_size=120,
    ),
    window=st.sampled_from([0.0, 0.5, 1.0, 3.0, float("inf")]),
)
def test_dedup_keys_match_the_reference(steps: list[tuple[int, float]], window: float) -> None:
    keys, reference = DedupKeys("pbx", window), ReferenceKeys(window)
    now = 0.0
    for event, step in steps:
        now += step
        raw = bytes([event])
        assert keys.key(raw, now) == reference.key(raw, now)
        assert len(keys) == len(reference.recent)
