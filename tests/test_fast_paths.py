"""The hot path's shortcuts give exactly what the plain code gives.

Framing a whole read with one split, deciding which events race from the raw
bytes, and expiring dedup keys from a queue of sightings are each checked
against a straightforward reference, on generated streams full of the
awkward cases (stray line ends, bare LFs, Follows replies, repeated bytes).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amiworker.ami.message import Message, decode
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


# -- one header from the raw bytes --------------------------------------------------------
#
# Message.get / [] / in search the raw bytes for one header until the index of all of
# them is built. The reference is the same message with its index built first.

# What the worker reads of every message: the scheduler's order key, the router's
# ActionID and EventList, the event name; and names no message has.
WORKER_NAMES = ("Uniqueid", "Linkedid", "ActionID", "EventList", "Event", "Response")
OTHER_NAMES = ("DestUniqueid", "Timestamp", "Variable", "Output", "Nope", "K")
# Names the search leaves to the full parse: not ASCII letters, digits, "-" and "_".
ODD_NAMES = ("Caller ID", "", "Uniqueid:", "Uniqueid: ", "\u00dcniqueid", "Lin\u212aedid", "a.b")


def parsed(raw: bytes, follows: bool = False) -> Message:
    message = Message(raw, follows=follows)
    message._parse()
    return message


def spellings(name: str) -> list[str]:
    return [name, name.lower(), name.upper(), name.swapcase()]


def check_lookups(raw: bytes, names: Iterable[str], follows: bool = False) -> None:
    """get, [] and ``in`` of each name on a fresh message give what the index gives."""
    reference = parsed(raw, follows)
    for name in names:
        expected = reference.get(name)
        message = Message(raw, follows=follows)
        assert message.get(name, "absent") == (expected if expected is not None else "absent"), (
            raw,
            name,
        )
        message = Message(raw, follows=follows)
        assert (name in message) == (expected is not None), (raw, name)
        message = Message(raw, follows=follows)
        if expected is None:
            with pytest.raises(KeyError):
                message[name]
        else:
            assert message[name] == expected, (raw, name)


CASES = [
    b"Event: A\r\nUniqueid: 1.1\r\nLinkedid: 1.0\r\n\r\n",
    b"Event: A\r\nUNIQUEID: upper\r\nUniqueid: exact\r\n\r\n",  # another case first: it wins
    b"Event: A\r\nUniqueid: first\r\nuniqueid: second\r\nUniqueid: third\r\n\r\n",
    b"Event: A\r\nUniqueid:\r\nUniqueid: later\r\n\r\n",  # "Name:" alone: an empty value
    b"Event: A\r\nUniqueid:\nUniqueid: later\n\n",
    b"Event: A\r\nUniqueid:",  # "Name:" at the very end
    b"Event: A\r\nUniqueid:\r",  # ... with a lone CR after it: not a header
    b"Event: A\r\nUniqueid:x\r\nUniqueid::y\r\nUniqueid: z\r\n\r\n",  # other names first
    b"Event: A\r\nUniqueid: \r\n\r\n",  # an empty value
    b"Event: A\r\nUniqueid:  two spaces \r\n\r\n",
    b"Event: A\nUniqueid: bare LF\n\n",
    b"Event: A\r\nUniqueid: mixed\nLinkedid: ends\r\n\n",
    b"Event: A\r\nUniqueid: cr\r\r\n\r\n",  # one CR kept
    b"Event: A\r\nUniqueid: a\rb\r\n\r\n",  # a CR inside a value
    b"Event: A\r\nUniqueid: no end",
    b"Event: A\r\nUniqueid: no end\r",
    b"Uniqueid: first line\r\nUniqueid: second\r\n\r\n",
    b"uniqueid:\r\nUniqueid: second\r\n\r\n",
    b"Event: A\r\nUniqueid: J\xc3\xbcrgen\r\n\r\n",
    b"Event: A\r\nUniqueid: \xff\xfe bad\r\nLinkedid: \xe2\x84\r\n\r\n",  # not UTF-8
    b"Event: \xff\r\nUniqueid: ok \xe2\r\n\r\n",
    "Event: A\r\nLin\u212aedid: kelvin\r\nLinkedid: plain\r\n\r\n".encode(),  # lowers to "k"
    "Event: A\r\n\u212a: kelvin\r\nK: plain\r\n\r\n".encode(),
    "Event: A\r\nUn\u0130queid: dotted\r\nUniqueid: plain\r\n\r\n".encode(),
    b"Event: A\r\nData: Uniqueid: 4\r\nX-Uniqueid: 5\r\n Uniqueid: 6\r\n\r\n",  # not headers
    b"Event: A\r\nDestUniqueid: 7\r\n\r\n",
    b"Event: A\r\n\r\nUniqueid: after an empty line\r\n\r\n",
    b"Event: A\r\nLine without colon\r\nUniqueid: 8\r\n\r\n",
    b"Response: Follows\r\nPrivilege: Command\r\nUniqueid: in the body\r\n--END COMMAND--\r\n\r\n",
    b"Response: Success\r\nActionID: 7\r\nActionId: 8\r\nEventList: start\r\n\r\n",
    b"",
    b"\r\n",
    b":",
    b": x\r\n",
]


@pytest.mark.parametrize("raw", CASES)
@pytest.mark.parametrize("follows", [False, True])
def test_one_header_from_the_raw_bytes_is_what_the_index_gives(raw: bytes, follows: bool) -> None:
    names = [n for name in (*WORKER_NAMES, *OTHER_NAMES) for n in spellings(name)]
    check_lookups(raw, [*names, *ODD_NAMES], follows)


def test_a_header_read_from_the_raw_bytes_builds_no_index() -> None:
    message = Message(b"Event: A\r\nUniqueid: 1\r\nlinkedid: 2\r\nActionID:\r\n\r\n")
    assert message.get("Uniqueid") == "1"
    assert message["Linkedid"] == "2"
    assert message.get("ActionID") == ""
    assert "EventList" not in message and message.get("EventList") is None
    assert message._index is None
    # Once the index is built, every lookup reads it.
    assert len(message) == 4 and message._index is not None
    message.raw = b"Event: Changed\r\n\r\n"  # (never done: shows which one answers)
    assert message["uniqueid"] == "1"


def test_only_a_follows_reply_an_odd_name_or_a_kelvin_sign_builds_the_index() -> None:
    follows = Message(
        b"Response: Follows\r\nActionID: 1\r\nx\r\n--END COMMAND--\r\n\r\n", follows=True
    )
    assert follows.get("ActionID") == "1" and follows._index is not None
    odd = Message(b"Event: A\r\nCaller ID: 1\r\n\r\n")
    assert odd["Caller ID"] == "1" and odd._index is not None
    kelvin = Message("Event: A\r\nLin\u212aedid: 1\r\n\r\n".encode())
    assert kelvin.get("Uniqueid") is None and kelvin._index is None  # no "k" in the name
    assert kelvin.get("Linkedid") == "1" and kelvin._index is not None


def capture_messages(name: str) -> list[Message]:
    from tests.test_protocol import capture

    return Parser().feed(capture(name))


@pytest.mark.parametrize(
    "name",
    [
        "asterisk22-20-calls.txt",
        "asterisk22-actions.txt",
        "asterisk22-session-a.txt",
        "asterisk22-md5-login.txt",
        "asterisk22-bad-login.txt",
    ],
)
def test_every_header_of_the_captures_from_the_raw_bytes(name: str) -> None:
    # Every name of every message, in four spellings, and names it lacks.
    for message in capture_messages(name):
        own = {header for header, _ in parsed(message.raw).headers}
        names = [n for header in (*own, *WORKER_NAMES, *OTHER_NAMES) for n in spellings(header)]
        check_lookups(message.raw, names)


def test_the_3000_call_capture_is_read_without_building_an_index() -> None:
    # 117,006 events: what the worker reads, and each name an event has, as spelled.
    messages = capture_messages("asterisk22-3000-calls.txt.gz")
    assert len(messages) > 117_006
    for message in messages:
        reference = parsed(message.raw)
        for name in (*WORKER_NAMES, *(header for header, _ in reference.headers)):
            assert message.get(name) == reference.get(name), (message.raw, name)
        assert message._index is None


# Lines made of the awkward pieces: names in every case, repeated, with and without the
# space, other names ending in the one looked up, values with CR, LF and bytes that are
# not UTF-8, every line end.
LINE_NAMES = [
    b"Uniqueid", b"uniqueid", b"UNIQUEID", b"UniqueID", b"DestUniqueid", b"Uniqueid1",
    b"Linkedid", b"LinkedID", "Lin\u212aedid".encode(), b"K", "\u212a".encode(),
    b"ActionID", b"Actionid", b"Event", b"Response", b" Uniqueid", b"Uniqueid ", b"",
    "Un\u0130queid".encode(), b"\xffUniqueid",
]  # fmt: skip
LINE_SEPARATORS = [b": ", b": ", b":", b"", b"::", b": : ", b" : ", b":  "]
LINE_VALUES = st.one_of(
    st.sampled_from([b"", b"1.1", b" lead", b"trail ", b"a\rb", b"\r", b"J\xc3\xbcrgen", b"x: y"]),
    st.binary(max_size=6),
)
LINE_ENDS = [b"\r\n", b"\r\n", b"\n", b"\r\r\n", b"\r", b""]


@st.composite
def header_lines(draw: st.DrawFn) -> bytes:
    lines = draw(
        st.lists(
            st.tuples(
                st.sampled_from(LINE_NAMES),
                st.sampled_from(LINE_SEPARATORS),
                LINE_VALUES,
                st.sampled_from(LINE_ENDS),
            ),
            max_size=8,
        )
    )
    head = draw(st.sampled_from([b"Event: T\r\n", b"Response: Success\r\n", b""]))
    tail = draw(st.sampled_from([b"\r\n", b"\n", b""]))
    return head + b"".join(name + sep + value + end for name, sep, value, end in lines) + tail


# First lines that give a message its name, or almost do.
FIRST_LINES = [
    b"", b"Event: ", b"Response: ", b"Event: A\r\r\n", b"Event: \xff\r\n", b"Event:A\r\n",
    b"event: a\r\r\n", b"RESPONSE: b\r\r\n", b"Event: \r\n", b"Response: Follows\r\n",
    b"Event: A\rB\n", b"X: y\r\n",
]  # fmt: skip
QUERIED = [
    n for name in ("Uniqueid", "Linkedid", "ActionID", "K", "Event") for n in spellings(name)
]


@settings(max_examples=1500, deadline=None)
@given(raw=header_lines(), follows=st.booleans())
def test_one_header_of_any_lines_from_the_raw_bytes(raw: bytes, follows: bool) -> None:
    check_lookups(raw, [*QUERIED, "Response", "DestUniqueid", "Nope", *ODD_NAMES], follows)


def reference_name(raw: bytes) -> str:
    """Message.name as first written: the first line's value, else the Event or Response header."""
    if raw.startswith(b"Event: ") or raw.startswith(b"Response: "):
        start = raw.index(b": ") + 2
        end = raw.find(b"\n", start)
        line = raw[start:end] if end >= 0 else raw[start:]
        return decode(line.rstrip(b"\r"))
    reference = parsed(raw)
    return reference.get("Event") or reference.get("Response") or ""


@settings(max_examples=500, deadline=None)
@given(raw=header_lines(), first=st.sampled_from(FIRST_LINES))
def test_the_name_is_what_it_was(raw: bytes, first: bytes) -> None:
    assert Message(first + raw).name == reference_name(first + raw)


def test_the_name_of_every_message_of_the_captures_is_what_it_was() -> None:
    for name in ("asterisk22-20-calls.txt", "asterisk22-actions.txt"):
        for message in capture_messages(name):
            assert message.name == reference_name(message.raw)


def test_the_searches_made_for_names_are_bounded() -> None:
    from amiworker.ami import message as module

    raw = b"Event: A\r\nName7: seven\r\n\r\n"
    for n in range(module._Specs._LIMIT + 100):
        assert Message(raw).get(f"Name{n}") == ("seven" if n == 7 else None)
    cache = module._spec_of.__self__  # type: ignore[attr-defined]
    assert len(cache) <= module._Specs._LIMIT
    assert Message(raw)["name7"] == "seven"
