"""The sans-IO codec against real Asterisk 22 traffic and the awkward corners of AMI."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amiworker.ami.message import Message
from amiworker.ami.protocol import (
    MAX_ACTION_LINE,
    Parser,
    ProtocolError,
    encode_action,
    encode_message,
)

FIXTURES = Path(__file__).parent / "fixtures"
SMALL_CAPTURES = [
    "asterisk22-actions.txt",
    "asterisk22-md5-login.txt",
    "asterisk22-bad-login.txt",
    "asterisk22-20-calls.txt",
    "asterisk22-session-a.txt",
    "asterisk22-session-b.txt",
]


def capture(name: str) -> bytes:
    path = FIXTURES / name
    if name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    return path.read_bytes()


def feed_in_pieces(data: bytes, cuts: list[int]) -> tuple[Parser, list[Message]]:
    parser = Parser()
    messages: list[Message] = []
    start = 0
    for cut in sorted(set(cuts)):
        messages += parser.feed(data[start:cut])
        start = cut
    messages += parser.feed(data[start:])
    return parser, messages


def parse_one(data: bytes) -> Message:
    (message,) = Parser(banner=False).feed(data)
    return message


@pytest.mark.parametrize("name", SMALL_CAPTURES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**32))
def test_captures_parse_the_same_at_random_split_points(name: str, seed: int) -> None:
    data = capture(name)
    whole = Parser().feed(data)
    rng = random.Random(seed)
    cuts = [rng.randrange(len(data) + 1) for _ in range(rng.randrange(1, 200))]
    parser, pieces = feed_in_pieces(data, cuts)
    assert [m.raw for m in pieces] == [m.raw for m in whole]
    assert [m.headers for m in pieces] == [m.headers for m in whole]
    assert parser.buffered == 0
    assert parser.version == "11.0.0"


def test_one_byte_at_a_time_equals_one_chunk() -> None:
    data = capture("asterisk22-actions.txt")
    parser, pieces = feed_in_pieces(data, list(range(len(data))))
    assert parser.buffered == 0
    assert [m.raw for m in pieces] == [m.raw for m in Parser().feed(data)]
    assert len(pieces) == 28


def test_raw_bytes_are_exactly_what_was_received() -> None:
    data = capture("asterisk22-20-calls.txt")
    parser = Parser()
    messages = parser.feed(data)
    banner = b"Asterisk Call Manager/11.0.0\r\n"
    assert banner + b"".join(m.raw for m in messages) == data
    assert parser.banner == "Asterisk Call Manager/11.0.0"


def test_the_3000_call_capture_yields_every_event() -> None:
    data = capture("asterisk22-3000-calls.txt.gz")
    rng = random.Random(3000)
    parser = Parser()
    events = 0
    position = 0
    while position < len(data):
        step = rng.randrange(1, 256 * 1024)
        events += sum(m.kind == "event" for m in parser.feed(data[position : position + step]))
        position += step
    assert events == 117_006
    assert parser.buffered == 0


def test_sessions_a_and_b_carry_byte_identical_events() -> None:
    """What the dedup key relies on: every session gets the same bytes for an event."""
    a = [m.raw for m in Parser().feed(capture("asterisk22-session-a.txt")) if m.kind == "event"]
    b = [m.raw for m in Parser().feed(capture("asterisk22-session-b.txt")) if m.kind == "event"]
    shared = set(a) & set(b)
    assert len(shared) > 700
    assert [raw for raw in a if raw in shared] == [raw for raw in b if raw in shared]


def test_header_access_is_case_insensitive_and_values_are_exact() -> None:
    messages = Parser().feed(capture("asterisk22-20-calls.txt"))
    newchannel = next(m for m in messages if m.name == "Newchannel")
    assert newchannel.kind == "event"
    assert newchannel["uniqueid"] == newchannel["Uniqueid"] == newchannel["UNIQUEID"]
    assert newchannel["CallerIDNum"] == "<unknown>"
    assert newchannel["AccountCode"] == ""  # "AccountCode: " with nothing after it
    assert newchannel["Channel"].startswith("Local/100@test-")
    assert "linkedid" in newchannel
    assert newchannel.get("NoSuchHeader") is None
    with pytest.raises(KeyError):
        newchannel["NoSuchHeader"]
    assert list(newchannel)[:3] == ["Event", "Privilege", "Timestamp"]
    assert len(newchannel) == len(newchannel.headers)


def test_values_are_never_lower_cased_or_stripped() -> None:
    m = parse_one(b"Event: UserEvent\r\nUserEvent: MiXeD\r\nBody:  two  spaces \r\n\r\n")
    assert m["userevent"] == "MiXeD"
    assert m["body"] == " two  spaces "
    assert m.name == "UserEvent"


def test_repeated_headers_are_all_kept_in_order() -> None:
    m = parse_one(
        b"Event: Status\r\nVariable: A=1\r\nChanVariable: B=2\r\nVariable: C=3\r\n"
        b"variable: D=4\r\n\r\n"
    )
    assert m.getall("Variable") == ["A=1", "C=3", "D=4"]
    assert m.getall("chanvariable") == ["B=2"]
    assert m["Variable"] == "A=1"


def test_lines_without_a_colon_are_kept() -> None:
    m = parse_one(b"Response: Success\r\nSome free text\r\nEmpty:\r\nKey: v\r\n\r\n")
    assert m.extra_lines == ("Some free text",)
    assert m["Empty"] == ""
    assert m["Key"] == "v"


def test_command_output_in_the_ami_3_format() -> None:
    messages = Parser().feed(capture("asterisk22-actions.txt"))
    uptime = next(m for m in messages if m.action_id == "command-5")
    assert uptime.output == ["System uptime: 23 seconds", "Last reload: 23 seconds"]
    unknown = next(m for m in messages if m.action_id == "command-6")
    assert unknown.name == "Error"
    assert unknown.output[0].startswith("No such command 'no such cli command'")


FOLLOWS = (
    b"Response: Follows\r\nPrivilege: Command\r\nActionID: cmd-1\r\n"
    b"Channel              Location             State   Application(Data)\n"
    b"\n"
    b"Key: not a header\n"
    b"0 active channels\n"
    b"--END COMMAND--\r\n\r\n"
)


def test_command_output_in_the_asterisk_13_follows_format() -> None:
    parser = Parser(banner=False)
    follows = parser.feed(FOLLOWS + b"Event: Next\r\n\r\n")
    assert [m.name for m in follows] == ["Follows", "Next"]
    reply = follows[0]
    assert reply.action_id == "cmd-1"
    assert reply["Privilege"] == "Command"
    assert "Key" not in reply
    assert reply.output == [
        "Channel              Location             State   Application(Data)",
        "",
        "Key: not a header",
        "0 active channels",
    ]


def test_follows_body_split_anywhere() -> None:
    data = b"Asterisk Call Manager/2.10.6\r\n" + FOLLOWS
    for cut in range(len(data)):
        _, messages = feed_in_pieces(data, [cut])
        assert len(messages) == 1
        assert messages[0].output[-1] == "0 active channels"


@pytest.mark.parametrize(
    "stream",
    [
        b"Event: A\nKey: 1\n\nEvent: B\nKey: 2\n\n",  # bare LF
        b"Event: A\r\nKey: 1\r\n\nEvent: B\r\nKey: 2\r\n\n",  # the \r\n\n terminator
        b"Event: A\r\nKey: 1\r\n\r\n\r\nEvent: B\r\nKey: 2\r\n\r\n",  # a stray empty line
    ],
)
def test_line_end_variants(stream: bytes) -> None:
    messages = Parser(banner=False).feed(stream)
    assert [(m.name, m["key"]) for m in messages] == [("A", "1"), ("B", "2")]


def test_utf8_split_across_reads_is_decoded_per_message() -> None:
    data = "Event: UserEvent\r\nCallerIDName: Jürgen Ñúñez 電話\r\n\r\n".encode()
    split = data.index("電".encode()) + 1  # in the middle of a 3-byte character
    parser = Parser(banner=False)
    assert parser.feed(data[:split]) == []
    (message,) = parser.feed(data[split:])
    assert message["CallerIDName"] == "Jürgen Ñúñez 電話"


def test_invalid_utf8_neither_raises_nor_vanishes() -> None:
    m = parse_one(b"Event: X\r\nName: caf\xe9\xff\r\n\r\n")
    assert m["Name"] == "caf\\xe9\\xff"
    assert b"caf\xe9\xff" in m.raw


def test_message_over_the_size_limit_is_a_protocol_error() -> None:
    parser = Parser(banner=False, max_message_size=1000)
    ok = b"Event: Small\r\n\r\n"
    with pytest.raises(ProtocolError, match="exceeds the limit of 1000") as caught:
        parser.feed(ok + b"Event: Big\r\nData: " + b"x" * 2000 + b"\r\n\r\n")
    assert [m.name for m in caught.value.messages] == ["Small"]
    with pytest.raises(ProtocolError):
        parser.feed(ok)  # a broken session stays broken


def test_unfinished_message_never_buffers_past_the_limit() -> None:
    parser = Parser(banner=False, max_message_size=4096)
    with pytest.raises(ProtocolError, match="unfinished message"):
        for _ in range(100):
            parser.feed(b"Data: " + b"y" * 100 + b"\r\n")
            assert parser.buffered <= 4096


def test_a_peer_that_is_not_ami_is_refused() -> None:
    with pytest.raises(ProtocolError, match="not an AMI server"):
        Parser().feed(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(ProtocolError, match="banner"):
        Parser().feed(b"x" * 5000)


def test_legacy_banner_version() -> None:
    parser = Parser()
    assert parser.feed(b"Asterisk Call Manager/2.10.6\r\n") == []
    assert parser.version == "2.10.6"


def test_encode_action_with_repeated_headers() -> None:
    data = encode_action(
        "Originate",
        {"Channel": "Local/100@test", "Variable": ["A=1", "B=2"], "Timeout": 30000, "X": None},
        action_id="orig-1",
    )
    assert data == (
        b"Action: Originate\r\nActionID: orig-1\r\nChannel: Local/100@test\r\n"
        b"Variable: A=1\r\nVariable: B=2\r\nTimeout: 30000\r\n\r\n"
    )
    (parsed,) = Parser(banner=False).feed(data)
    assert parsed.getall("Variable") == ["A=1", "B=2"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Channel": "SIP/1\r\nAction: Logoff"},
        {"Channel": "SIP/1\nAction: Logoff"},
        {"Variable": ["ok=1", "bad=\r"]},
        {"Bad\nName": "x"},
    ],
)
def test_header_injection_is_refused(headers: dict[str, str | list[str]]) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        encode_action("Setvar", headers, action_id="1")


def test_a_line_longer_than_asterisk_reads_is_refused() -> None:
    with pytest.raises(ValueError, match="at most 1024 bytes"):
        encode_action("UserEvent", {"Body": "x" * MAX_ACTION_LINE})
    assert encode_message([("Body", "x" * (MAX_ACTION_LINE - 8))])
