"""The kit's events, sample_calls() and make_event(): as the parser gives them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from amiworker.ami.message import Message
from amiworker.ami.protocol import Parser
from amiworker.fleet.dedup import DedupKeys, races
from amiworker.fleet.scheduler import order_key
from amiworker.testing import CAPTURE_CALLS, make_event, sample_calls
from amiworker.testing.samples import capture_bytes
from amiworker.timeparse import timestamp_micros

FIXTURE = Path(__file__).parent / "fixtures" / "asterisk22-20-calls.txt"
PER_CALL = {
    "Newexten": 10,
    "VarSet": 8,
    "Newchannel": 2,
    "NewCallerid": 2,
    "NewConnectedLine": 2,
    "Newstate": 2,
    "SoftHangupRequest": 2,
    "Hangup": 2,
    "LocalBridge": 1,
    "DialBegin": 1,
    "DialEnd": 1,
    "OriginateResponse": 1,
    "HangupRequest": 1,
}


def framed(events: list[Message]) -> list[Message]:
    """What the parser makes of the events' bytes sent one after the other."""
    return Parser(banner=False).feed(b"".join(event.raw for event in events))


def ids_of(event: Message) -> dict[str, str]:
    return {
        name: value
        for name, value in event.headers
        if name.lower().endswith(("uniqueid", "linkedid"))
    }


def calls_of(events: list[Message]) -> dict[str, list[Message]]:
    calls: dict[str, list[Message]] = {}
    for event in events:
        calls.setdefault(order_key("pbx1", event), []).append(event)
    return calls


def test_the_bundled_capture_is_the_fixture_byte_for_byte() -> None:
    assert capture_bytes() == FIXTURE.read_bytes()


def test_twenty_calls_are_the_capture_with_fresh_ids_and_nothing_else_changed() -> None:
    events = sample_calls(CAPTURE_CALLS)
    captured = [
        m
        for m in Parser().feed(FIXTURE.read_bytes())
        if m.kind == "event" and "Privilege" in m and ids_of(m)
    ]
    assert len(events) == len(captured) == 20 * sum(PER_CALL.values())
    mapping: dict[str, str] = {}
    for event, original in zip(events, captured, strict=True):
        assert [name for name, _ in event.headers] == [name for name, _ in original.headers]
        for (name, value), (_, before) in zip(event.headers, original.headers, strict=True):
            if name.lower().endswith(("uniqueid", "linkedid")):
                assert mapping.setdefault(before, value) == value, "one old id, one new id"
                assert "c20p5038" not in value
            else:
                assert value == before, name  # times and channel names as captured
    assert len(set(mapping.values())) == len(mapping) == 40  # two channels per call
    # Asterisk's own format: <creation second>.<counter>
    assert all(value.split(".")[0].isdigit() for value in mapping.values())


def test_each_event_is_exactly_what_the_parser_frames() -> None:
    events = sample_calls(45)
    again = framed(events)
    assert [m.raw for m in again] == [m.raw for m in events]
    assert all(m.raw.endswith(b"\r\n\r\n") and m.raw.startswith(b"Event: ") for m in events)
    assert all(b"\n" not in m.raw.replace(b"\r\n", b"") for m in events)  # CRLF only


def test_every_call_has_its_own_ids_channels_and_times() -> None:
    events = sample_calls(45)
    calls = calls_of(events)
    assert len(calls) == 45
    channels: Counter[str] = Counter()
    for linkedid_key, call in calls.items():
        assert Counter(e.name for e in call) == PER_CALL
        uniqueids = {e["Uniqueid"] for e in call if "Uniqueid" in e}
        assert len(uniqueids) == 2
        linkedid = linkedid_key.partition("\0")[2]
        assert linkedid in uniqueids
        for event in call:
            for name, value in ids_of(event).items():
                assert value in uniqueids, (event.name, name)  # Dest*, LocalOne/Two* too
        channels.update({e["Channel"] for e in call if "Channel" in e})
    assert all(count == 1 for count in channels.values())  # no channel name in two calls
    keys = DedupKeys("pbx1", 10)
    assert len({keys.key(e.raw, 0) for e in events}) == len(events)  # no two alike
    assert all(races(e, "channel") for e in events)
    # The repeats start after the capture ends: in time, they follow one another.
    times = [timestamp_micros(e["Timestamp"]) or 0 for e in events]
    first_repeat = 20 * sum(PER_CALL.values())
    assert min(times[first_repeat:]) > max(times[:first_repeat])


def test_the_same_arguments_give_the_same_events_and_start_moves_them() -> None:
    three = sample_calls(3)
    assert three == sample_calls(3)
    first = {order_key("pbx1", e) for e in three}
    assert [e for e in sample_calls(25) if order_key("pbx1", e) in first] == three
    moved = sample_calls(2, start=2_000_000_000.5)
    assert moved[0]["Timestamp"] == "2000000000.500000"
    assert moved[0]["Uniqueid"].startswith("2000000000.")
    assert not set(ids_of(moved[0]).values()) & set(ids_of(sample_calls(2)[0]).values())
    assert sample_calls(0) == []
    with pytest.raises(ValueError, match="0 or more"):
        sample_calls(-1)


def test_make_event_is_what_asterisk_22_sends() -> None:
    hangup = make_event(
        "Hangup",
        Timestamp="1795675582.056164",
        Channel="Local/100@test-00000000;1",
        Uniqueid="1795675581.0",
        Linkedid="1795675581.0",
        Cause="16",
        Cause_txt="Normal Clearing",
    )
    assert hangup.raw == (
        b"Event: Hangup\r\nPrivilege: call,all\r\nTimestamp: 1795675582.056164\r\n"
        b"Channel: Local/100@test-00000000;1\r\nUniqueid: 1795675581.0\r\n"
        b"Linkedid: 1795675581.0\r\nCause: 16\r\nCause-txt: Normal Clearing\r\n\r\n"
    )
    assert framed([hangup])[0].raw == hangup.raw
    assert hangup["cause-txt"] == "Normal Clearing" and hangup.name == "Hangup"


def test_make_event_rebuilds_a_captured_event_byte_for_byte() -> None:
    for original in sample_calls(1)[:40]:
        _, privilege, timestamp, *rest = original.headers
        assert privilege[0] == "Privilege" and timestamp[0] == "Timestamp"
        rebuilt = make_event(original.name, rest, Timestamp=timestamp[1])
        assert rebuilt.raw == original.raw, original.name


def test_make_event_defaults_privileges_timestamps_and_repeats() -> None:
    assert make_event("VarSet").get("Privilege") == "dialplan,all"
    assert make_event("PeerStatus").get("Privilege") == "system,all"
    assert make_event("SomethingNew").get("Privilege") == "call,all"
    booted = make_event("FullyBooted", Status="Fully Booted")
    assert "Timestamp" not in booted  # sent to one session, without a Timestamp
    bare = make_event("Hangup", Privilege=None, Timestamp=None, Uniqueid="1.1")
    assert bare.raw == b"Event: Hangup\r\nUniqueid: 1.1\r\n\r\n"
    stamps = [timestamp_micros(make_event("Newexten")["Timestamp"]) or 0 for _ in range(50)]
    assert stamps == sorted(set(stamps))  # strictly increasing, as a PBX's are
    repeated = make_event("Newchannel", [("ChanVariable", "A=1")], ChanVariable=["B=2", "C=3"])
    assert repeated.getall("ChanVariable") == ["A=1", "B=2", "C=3"]
    assert make_event("Cdr", {"Duration": 7, "Skipped": None})["Duration"] == "7"
    assert "Skipped" not in make_event("Cdr", {"Skipped": None})


@pytest.mark.parametrize(
    "headers",
    [{"Channel": "SIP/a\r\nEvent: Forged"}, {"Chan:nel": "x"}, {"Channel": "a\nb"}],
)
def test_make_event_refuses_what_would_break_the_framing(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        make_event("Hangup", headers)
    with pytest.raises(ValueError):
        make_event("")
    with pytest.raises(ValueError, match="first argument"):
        make_event("Hangup", Event="Newchannel")
