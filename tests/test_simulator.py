"""The simulated PBX against the real Asterisk 22.10.1 captures, over real sockets."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from amiworker.ami.message import Message
from amiworker.ami.protocol import Parser
from amiworker.sim.command import build_arg_parser
from amiworker.sim.pbx import FakePBX
from tests.sim_plugin import RawAMI, SimProcess
from tests.waiting import wait_for

FIXTURES = Path(__file__).parent / "fixtures"
PBXFactory = Callable[..., Awaitable[FakePBX]]
Connect = Callable[[int], Awaitable[RawAMI]]

# The capture's Originate, reconstructed from the events it caused.
CAPTURE_LINKEDID = "c20p5038-2-1"
CAPTURE_ORIGINATE = {
    "Channel": "Local/100@test",
    "Context": "test",
    "Exten": "200",
    "Priority": "1",
    "Async": "true",
    "CallerID": "Test 2 <1002>",
    "Variable": ["TAG=c20p5038", "CALLIDX=2"],
}
TIMESTAMP = re.compile(r"^\d{10}\.\d{6}$")


def capture(name: str) -> list[Message]:
    return Parser().feed((FIXTURES / name).read_bytes())


def names(message: Message) -> list[str]:
    return [name for name, _ in message.headers]


def belongs_to(message: Message, linkedid: str) -> bool:
    if "Privilege" not in message:  # an item of a listing, not a call event
        return False
    if message.name == "OriginateResponse":
        return message.get("Uniqueid") == linkedid
    ids = (message.get("Linkedid"), message.get("LocalOneLinkedid"), message.get("DestLinkedid"))
    return linkedid in ids


def without(message: Message, *dropped: str) -> list[tuple[str, str]]:
    return [(k, v) for k, v in message.headers if k not in dropped]


async def logged_in(connect: Connect, pbx: FakePBX, **headers: str) -> RawAMI:
    client = await connect(pbx.port)
    reply = await client.login(**headers)
    assert reply.name == "Success", reply.text
    return client


# -- calls ---------------------------------------------------------------------------------


async def test_an_originated_call_is_the_captured_call(fake_pbx: FakePBX, raw_ami: Connect) -> None:
    """Same events, same order, same headers and values as the real call (Timestamp aside)."""
    real = [m for m in capture("asterisk22-20-calls.txt") if belongs_to(m, CAPTURE_LINKEDID)]
    client = await logged_in(raw_ami, fake_pbx)
    client.send(
        "Originate",
        {**CAPTURE_ORIGINATE, "ChannelId": "c20p5038-2-1", "OtherChannelId": "c20p5038-2-2"},
        action_id="c20p5038-orig-2",
    )
    await client.wait_count(lambda m: m.name == "Hangup", 2)
    simulated = [m for m in client.events if belongs_to(m, CAPTURE_LINKEDID)]

    assert len(real) == 35  # the 39 of the README less the 4 DeviceStateChange (no ids)
    assert [m.name for m in simulated] == [m.name for m in real]
    for sim, cap in zip(simulated, real, strict=True):
        assert names(sim) == names(cap), sim.name
        assert TIMESTAMP.match(sim["Timestamp"]), sim["Timestamp"]
        assert without(sim, "Timestamp") == without(cap, "Timestamp"), sim.name
    device_changes = [m for m in client.events if m.name == "DeviceStateChange"]
    real_change = next(
        m for m in capture("asterisk22-20-calls.txt") if m.name == "DeviceStateChange"
    )
    assert len(device_changes) == 4
    assert all(names(m) == names(real_change) for m in device_changes)
    assert [m["State"] for m in device_changes] == ["INUSE", "INUSE", "INUSE", "NOT_INUSE"]
    assert all("Uniqueid" not in m for m in device_changes)


async def test_a_generated_call_has_the_capture_event_mix_and_id_relations(
    fake_pbx: FakePBX, raw_ami: Connect
) -> None:
    client = await logged_in(raw_ami, fake_pbx)
    linkedid = await fake_pbx.start_call()
    await client.wait_count(lambda m: m.name == "Hangup", 2)
    await client.wait_count(lambda m: m.name == "DeviceStateChange", 4)
    call = [m for m in client.events if m.name not in ("SuccessfulAuth", "FullyBooted")]
    assert len(call) == 39
    real_mix = Counter(
        m.name for m in capture("asterisk22-20-calls.txt") if m.kind == "event"
    ).most_common()
    per_call = Counter(m.name for m in call)
    assert {name: count * 20 for name, count in per_call.items()} == {
        name: count for name, count in real_mix if name in per_call
    }

    one, two = (m for m in call if m.name == "Newchannel")
    assert re.fullmatch(r"\d{10}\.\d+", one["Uniqueid"])
    assert one["Uniqueid"] == one["Linkedid"] == linkedid
    assert two["Linkedid"] == linkedid and two["Uniqueid"] != linkedid
    assert one["Channel"].endswith(";1") and two["Channel"] == one["Channel"][:-1] + "2"
    assert re.fullmatch(r"Local/100@test-[0-9a-f]{8};1", one["Channel"])
    bridge = next(m for m in call if m.name == "LocalBridge")
    assert (bridge["LocalOneUniqueid"], bridge["LocalTwoUniqueid"]) == (
        one["Uniqueid"],
        two["Uniqueid"],
    )
    assert all(m["DestUniqueid"] == linkedid for m in call if m.name.startswith("Dial"))
    response = next(m for m in call if m.name == "OriginateResponse")
    assert response["Uniqueid"] == linkedid and response["Response"] == "Success"
    # Events spread over the call: the hangup comes one call_duration after the answer.
    first, last = float(call[0]["Timestamp"]), float(call[-1]["Timestamp"])
    assert last - first >= 0.9 * 0.2


async def test_uniqueids_never_repeat_across_restarts(fake_pbx_factory: PBXFactory) -> None:
    seen: set[bytes] = set()
    for _ in range(3):  # restarted within the same second
        pbx = await fake_pbx_factory()
        await pbx.start_call()
        ids = {
            line.split(b": ")[1]
            for event in pbx.sent_events
            for line in event.split(b"\r\n")
            if line.startswith(b"Uniqueid: ")
        }
        assert ids and not ids & seen
        seen |= ids
        await pbx.stop()


async def test_background_calls_and_their_limit(fake_pbx_factory: PBXFactory) -> None:
    pbx = await fake_pbx_factory(calls_per_second=200.0, max_calls=5)
    await wait_for(lambda: pbx.engine.calls_completed == 5, timeout=5, what="5 calls to finish")
    assert pbx.engine.calls_started == 5
    assert len(pbx.sent_events) == 5 * 39


async def test_every_session_gets_the_same_bytes(fake_pbx: FakePBX, raw_ami: Connect) -> None:
    first = await logged_in(raw_ami, fake_pbx)
    second = await logged_in(raw_ami, fake_pbx)
    await first.wait_count(lambda m: m.name == "SuccessfulAuth", 2)
    for _ in range(3):
        await fake_pbx.start_call()
    for client in (first, second):
        await client.wait_count(lambda m: m.name == "Hangup", 6)

    def stream(client: RawAMI) -> list[bytes]:
        logins = [i for i, m in enumerate(client.messages) if m.name == "SuccessfulAuth"]
        return [m.raw for m in client.messages[logins[-1] :] if m.kind == "event"]

    assert stream(first) == stream(second)
    assert stream(first) == fake_pbx.sent_events[-len(stream(first)) :]
    assert len(stream(first)) == 1 + 3 * 39


async def test_events_off_and_event_classes(fake_pbx: FakePBX, raw_ami: Connect) -> None:
    quiet = await logged_in(raw_ami, fake_pbx, Events="off")
    dialplan = await logged_in(raw_ami, fake_pbx, Events="dialplan")
    everything = await logged_in(raw_ami, fake_pbx)
    await fake_pbx.start_call()
    await everything.wait_count(lambda m: m.name == "Hangup", 2)
    await dialplan.wait_count(lambda m: m.name == "Newexten", 10)
    assert {m.name for m in dialplan.events} == {"Newexten", "VarSet"}
    assert quiet.events == []  # not even FullyBooted
    reply = await quiet.action("Events", {"EventMask": "on"})
    assert reply["Events"] == "On"
    await fake_pbx.start_call()
    await quiet.wait_count(lambda m: m.name == "Hangup", 2)


async def test_timestampevents_off(fake_pbx_factory: PBXFactory, raw_ami: Connect) -> None:
    pbx = await fake_pbx_factory(timestamp_events=False)
    client = await logged_in(raw_ami, pbx)
    await pbx.start_call()
    await client.wait_count(lambda m: m.name == "Hangup", 2)
    assert not any("Timestamp" in m for m in client.events)


# -- login ---------------------------------------------------------------------------------


async def test_plain_login_as_captured(fake_pbx: FakePBX, raw_ami: Connect) -> None:
    real = capture("asterisk22-actions.txt")
    client = await raw_ami(fake_pbx.port)
    reply = await client.action("Login", {"Username": "admin", "Secret": "secret"})
    booted = await client.wait_for(lambda m: m.name == "FullyBooted")
    auth = await client.wait_for(lambda m: m.name == "SuccessfulAuth")
    assert client.parser.banner == "Asterisk Call Manager/11.0.0"
    assert client.data.startswith(b"Asterisk Call Manager/11.0.0\r\n")
    assert [m.name for m in client.messages] == ["Success", "FullyBooted", "SuccessfulAuth"]
    for sim, cap in zip((reply, booted, auth), real[:3], strict=True):
        assert names(sim) == names(cap)
    assert reply["Message"] == "Authentication accepted"
    assert auth["AccountID"] == "admin"
    port = client._writer.get_extra_info("sockname")[1]
    assert auth["RemoteAddress"] == f"IPV4/TCP/127.0.0.1/{port}"
    assert auth["LocalAddress"] == f"IPV4/TCP/127.0.0.1/{fake_pbx.port}"
    assert fake_pbx.sessions == 1
    assert fake_pbx.sent_events == [auth.raw]  # FullyBooted goes to that session only


async def test_a_login_under_load_sees_its_reply_before_any_event(
    fake_pbx_factory: PBXFactory, raw_ami: Connect
) -> None:
    pbx = await fake_pbx_factory(calls_per_second=500.0)
    await wait_for(lambda: pbx.events_sent > 0, what="background events")
    for _ in range(5):
        client = await logged_in(raw_ami, pbx)
        await client.wait_count(lambda m: m.kind == "event", 50)
        assert client.messages[0].name == "Success"
        assert client.messages[1].name == "FullyBooted"


async def test_md5_login_as_captured(fake_pbx: FakePBX, raw_ami: Connect) -> None:
    real = capture("asterisk22-md5-login.txt")
    client = await raw_ami(fake_pbx.port)
    reply = await client.login_md5()
    assert reply["Message"] == "Authentication accepted"
    await client.wait_for(lambda m: m.name == "SuccessfulAuth")
    ping = await client.action("Ping")
    bye = await client.action("Logoff")
    await client.closed()
    sim = [m for m in client.messages]
    assert [m.name for m in sim] == [m.name for m in real]
    assert [names(m) for m in sim] == [names(m) for m in real]
    assert (ping["Ping"], bye["Message"]) == ("Pong", "Thanks for all the fish.")


@pytest.mark.parametrize("md5", [False, True])
async def test_a_bad_secret_is_refused_late_then_closed(
    fake_pbx: FakePBX, raw_ami: Connect, md5: bool
) -> None:
    real = capture("asterisk22-bad-login.txt")
    client = await raw_ami(fake_pbx.port)
    started = time.monotonic()
    reply = await (client.login_md5(secret="wrong") if md5 else client.login(secret="wrong"))
    elapsed = time.monotonic() - started
    assert elapsed >= 0.2 * 0.9  # login_failure_delay of the fixture
    assert names(reply) == names(real[0])
    assert (reply.name, reply["Message"]) == ("Error", "Authentication failed")
    await client.closed()
    assert fake_pbx.sessions == 0


async def test_actions_before_login_are_denied(fake_pbx: FakePBX, raw_ami: Connect) -> None:
    client = await raw_ami(fake_pbx.port)
    for action in ("Ping", "Originate", "SimStats", "NoSuchAction"):
        reply = await client.action(action)
        assert (reply.name, reply["Message"]) == ("Error", "Permission denied")
    assert (await client.login()).name == "Success"


# -- action replies ------------------------------------------------------------------------

CAPTURED_ACTIONS = {
    "ping-2": ("Ping", {}),
    "coreshowchannels-3": ("CoreShowChannels", {}),
    "command-4": ("Command", {"Command": "core show version"}),
    "command-5": ("Command", {"Command": "core show uptime"}),
    "command-6": ("Command", {"Command": "no such cli command"}),
    "corestatus-7": ("CoreStatus", {}),
    "coresettings-8": ("CoreSettings", {}),
    "status-9": ("Status", {}),
    "getconfig-10": ("GetConfig", {"Filename": "extensions.conf"}),
    "getconfigjson-11": ("GetConfigJSON", {"Filename": "manager.conf"}),
    "listcommands-12": ("ListCommands", {}),
    "queuestatus-13": ("QueueStatus", {}),
    "dbput-14": ("DBPut", {"Family": "rp", "Key": "k1", "Val": "v1"}),
    "dbget-15": ("DBGet", {"Family": "rp", "Key": "k1"}),
    "nosuchaction-16": ("NoSuchAction", {}),
    "userevent-17": ("UserEvent", {"UserEvent": "Probe", "Foo": "bar"}),
    "logoff-18": ("Logoff", {}),
}
# Values the simulator must reproduce exactly (the rest depends on time and addresses).
SAME_VALUES = {
    "ping-2",
    "coreshowchannels-3",
    "command-4",
    "command-6",
    "coresettings-8",
    "status-9",
    "getconfig-10",
    "queuestatus-13",
    "dbput-14",
    "dbget-15",
    "nosuchaction-16",
    "logoff-18",
}


async def test_every_captured_reply_has_the_captured_shape(
    fake_pbx: FakePBX, raw_ami: Connect
) -> None:
    real = capture("asterisk22-actions.txt")
    client = await logged_in(raw_ami, fake_pbx)
    for action_id, (action, headers) in CAPTURED_ACTIONS.items():
        before = len(client.messages)
        client.send(action, headers, action_id=action_id)
        expected = [
            m
            for i, m in enumerate(real)
            if m.action_id == action_id
            or (m.name == "RequestBadFormat" and real[i - 1].action_id == action_id)
        ]

        def answers(m: Message, a: str = action_id) -> bool:
            return m.action_id == a or m.name == "RequestBadFormat"

        got = await client.wait_count(
            answers,
            len(expected),
            start=before,
        )
        assert [m.name for m in got] == [m.name for m in expected], action_id
        for sim, cap in zip(got, expected, strict=True):
            if action_id == "listcommands-12":  # plus SIPpeers and IAXpeerlist
                assert set(names(cap)) <= set(names(sim))
                continue
            assert names(sim) == names(cap), action_id
            if action_id in SAME_VALUES:
                dropped: tuple[str, ...] = (
                    "Timestamp",
                    "EventTV",
                    "SessionTV",
                    "SessionID",
                    "LocalAddress",
                )
                dropped += ("RemoteAddress", "AccountID")
                assert without(sim, *dropped) == without(cap, *dropped), action_id
    await client.closed()


async def test_legacy_command_is_a_follows_body(
    fake_pbx_factory: PBXFactory, raw_ami: Connect
) -> None:
    pbx = await fake_pbx_factory(ami_version="2.10.6")
    client = await logged_in(raw_ami, pbx)
    assert client.parser.version == "2.10.6"
    reply = await client.action("Command", {"Command": "core show version"})
    assert reply.raw.startswith(
        b"Response: Follows\r\nPrivilege: Command\r\nActionID: command-2\r\nAsterisk 13.38.3 "
    )
    assert reply.raw.endswith(b" UTC\n--END COMMAND--\r\n\r\n")
    assert reply.output == [reply.output[0]] and reply.output[0].startswith("Asterisk 13.38.3")
    channels = await client.action("Command", {"Command": "core show channels"})
    assert channels.output[-3:] == ["0 active channels", "0 active calls", "0 calls processed"]
    unknown = await client.action("Command", {"Command": "no such cli command"})
    assert unknown.name == "Follows" and unknown.output[0].startswith("No such command")


async def test_core_show_channels_lists_live_channels(fake_pbx: FakePBX, raw_ami: Connect) -> None:
    real = capture("asterisk22-20-calls.txt")
    real_item = next(m for m in real if m.name == "CoreShowChannel")
    client = await logged_in(raw_ami, fake_pbx)
    linkedid = await fake_pbx.start_call()
    reply, items, complete = await client.event_list("CoreShowChannels")
    assert reply["Message"] == "Channels will follow"
    assert len(items) == 2 and complete["ListItems"] == "2"
    assert all(names(item) == names(real_item) for item in items)
    assert {item["Linkedid"] for item in items} == {linkedid}
    reply, items, complete = await client.event_list("Status")
    assert len(items) == 2 and (complete["ListItems"], complete["Items"]) == ("2", "2")
    assert all(item["Privilege"] == "Call" and names(item)[-1] == "ActionID" for item in items)
    command = await client.action("Command", {"Command": "core show channels"})
    assert command.output[0].startswith("Channel ") and "2 active channels" in command.output


async def test_peer_listings_follow_asterisk_13(fake_pbx: FakePBX, raw_ami: Connect) -> None:
    client = await logged_in(raw_ami, fake_pbx)
    reply, items, complete = await client.event_list("SIPpeers")
    assert reply["Message"] == "Peer status list will follow"
    assert names(items[0]) == [
        "Event", "ActionID", "Channeltype", "ObjectName", "ChanObjectType", "IPaddress",
        "IPport", "Dynamic", "AutoForcerport", "Forcerport", "AutoComedia", "Comedia",
        "VideoSupport", "TextSupport", "ACL", "Status", "RealtimeDevice", "Description",
    ]  # fmt: skip
    assert complete.name == "PeerlistComplete" and complete["ListItems"] == str(len(items))
    reply, items, complete = await client.event_list("IAXpeerlist")
    assert reply["Message"] == "IAX Peer status list will follow"
    assert {item["Channeltype"] for item in items} == {"IAX"}
    assert complete["ListItems"] == str(len(items))


async def test_originate_setvar_getvar_hangup_redirect(fake_pbx: FakePBX, raw_ami: Connect) -> None:
    client = await logged_in(raw_ami, fake_pbx)
    failed = await client.action("Originate", {"Channel": "SIP/nobody", "Exten": "200"})
    assert (failed.name, failed["Message"]) == ("Error", "Originate failed")
    queued = await client.action(
        "Originate", {"Channel": "Local/999@test", "Context": "test", "Exten": "200", "Async": "1"}
    )
    assert queued["Message"] == "Originate successfully queued"
    failure = await client.wait_for(lambda m: m.name == "OriginateResponse")
    assert (failure["Response"], failure["Uniqueid"]) == ("Failure", "<null>")

    synchronous = await client.action(
        "Originate", {"Channel": "Local/100@test", "Context": "test", "Exten": "200"}
    )
    assert synchronous["Message"] == "Originate successfully queued"
    channel = next(m["Channel"] for m in client.events if m.name == "Newchannel")
    assert (await client.action("Setvar", {"Channel": channel, "Variable": "X", "Value": "1"}))[
        "Message"
    ] == "Variable Set"
    await client.wait_for(lambda m: m.name == "VarSet" and m["Variable"] == "X")
    got = await client.action("Getvar", {"Channel": channel, "Variable": "X"})
    assert (got["Variable"], got["Value"]) == ("X", "1")
    assert (await client.action("Getvar", {"Variable": "PBXNAME"}))["Value"] == "pbx1"
    moved = await client.action(
        "Redirect", {"Channel": channel, "Context": "test", "Exten": "400", "Priority": "1"}
    )
    assert moved["Message"] == "Redirect successful"
    await client.wait_for(lambda m: m.name == "Newexten" and m["Extension"] == "400")
    await client.wait_count(lambda m: m.name == "Hangup", 2)
    gone = await client.action("Hangup", {"Channel": channel})
    assert (gone.name, gone["Message"]) == ("Error", "No such channel")
    state = await client.action("ExtensionState", {"Exten": "100", "Context": "test"})
    assert (state["Status"], state["StatusText"]) == ("-1", "Unknown")


async def test_userevent_reaches_every_session_with_the_senders_actionid(
    fake_pbx: FakePBX, raw_ami: Connect
) -> None:
    sender = await logged_in(raw_ami, fake_pbx)
    other = await logged_in(raw_ami, fake_pbx)
    action_id = sender.send("UserEvent", {"UserEvent": "Probe", "Foo": "bar"})
    event = await other.wait_for(lambda m: m.name == "UserEvent")
    assert names(event) == ["Event", "Privilege", "Timestamp", "UserEvent", "ActionID", "Foo"]
    assert (event["ActionID"], event["Foo"]) == (action_id, "bar")


# -- faults --------------------------------------------------------------------------------


async def test_drop_sessions_closes_every_session(fake_pbx: FakePBX, raw_ami: Connect) -> None:
    clients = [await logged_in(raw_ami, fake_pbx) for _ in range(3)]
    await fake_pbx.drop_sessions()
    for client in clients:
        await client.closed()
    assert fake_pbx.sessions == 0
    await logged_in(raw_ami, fake_pbx)  # the PBX came back
    assert fake_pbx.sessions == 1


async def test_stall_holds_replies_and_events_until_resume(
    fake_pbx: FakePBX, raw_ami: Connect
) -> None:
    client = await logged_in(raw_ami, fake_pbx)
    fake_pbx.stall()
    action_id = client.send("Ping")
    await fake_pbx.start_call()
    with pytest.raises(AssertionError, match="passed before"):
        await client.reply(action_id, timeout=0.3)
    assert not any(m.name == "Newchannel" for m in client.messages)
    fake_pbx.resume()
    assert (await client.reply(action_id))["Ping"] == "Pong"
    await client.wait_count(lambda m: m.name == "Hangup", 2)


async def test_a_timed_stall_ends_by_itself(fake_pbx: FakePBX, raw_ami: Connect) -> None:
    client = await logged_in(raw_ami, fake_pbx)
    fake_pbx.stall(0.3)
    started = time.monotonic()
    await client.action("Ping")
    assert time.monotonic() - started >= 0.25


async def test_send_raw_delivers_the_bytes(fake_pbx: FakePBX, raw_ami: Connect) -> None:
    client = await logged_in(raw_ami, fake_pbx)
    garbage = b"Event: Broken\r\nno colon here\r\n\r\n"
    await fake_pbx.send_raw(garbage)
    await wait_for(lambda: client.data.endswith(garbage), what="the raw bytes")
    assert client.messages[-1].extra_lines == ("no colon here",)


async def test_slow_write_limits_the_rate(fake_pbx: FakePBX, raw_ami: Connect) -> None:
    client = await logged_in(raw_ami, fake_pbx)
    fake_pbx.slow_write(400)
    started = time.monotonic()
    slow = b"Event: Slow\r\nX: " + b"x" * 200 + b"\r\n\r\n"
    await fake_pbx.send_raw(slow)
    await wait_for(lambda: client.data.endswith(slow), what="221 slow bytes")
    assert time.monotonic() - started >= 0.5
    fake_pbx.slow_write(None)
    assert (await client.action("Ping", timeout=2))["Ping"] == "Pong"


async def test_output_held_for_a_full_socket_arrives_whole_and_in_order(
    fake_pbx: FakePBX, raw_ami: Connect
) -> None:
    client = await logged_in(raw_ami, fake_pbx)
    chunks = [bytes([65 + n]) * (512 * 1024) for n in range(16)]  # 8 MiB, far over the socket
    for chunk in chunks:
        await fake_pbx.send_raw(chunk)
    expected = b"".join(chunks)
    await wait_for(lambda: len(client.data) >= len(expected), timeout=10, what="8 MiB")
    assert client.data.endswith(expected)
    assert fake_pbx.slow_readers_dropped == 0 and fake_pbx.sessions == 1


async def test_a_reader_that_falls_behind_is_disconnected(
    fake_pbx_factory: PBXFactory, raw_ami: Connect
) -> None:
    pbx = await fake_pbx_factory(write_timeout=0.2)
    reader = await raw_ami(pbx.port)
    await reader.login()
    sleeper = socket.create_connection(("127.0.0.1", pbx.port))
    sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sleeper.sendall(b"Action: Login\r\nUsername: admin\r\nSecret: secret\r\n\r\n")
    try:
        await wait_for(lambda: pbx.sessions == 2, what="the second login")
        for _ in range(16):  # the sleeper never reads: its socket fills up
            await pbx.send_raw(b"y" * 1024 * 1024)
        await wait_for(lambda: pbx.slow_readers_dropped == 1, timeout=5, what="the drop")
        assert pbx.sessions == 1  # the reader that keeps up stays
    finally:
        sleeper.close()


# -- as a process --------------------------------------------------------------------------


async def test_process_mode_with_control_actions(
    pbx_process_factory: Callable[..., Awaitable[SimProcess]], raw_ami: Connect
) -> None:
    sim = await pbx_process_factory("--name", "pbxp", "--duration", "0.2", "--calls", "3")
    client = await raw_ami(sim.port)
    assert (await client.login()).name == "Success"
    started = await client.action("SimCalls", {"Count": "2"})
    assert started["Message"] == "Calls updated"
    await client.wait_count(lambda m: m.name == "Hangup", 4)
    stats = await client.action("SimStats")
    assert names(stats) == [
        "Response", "ActionID", "EventsSent", "CallsStarted", "CallsCompleted", "Sessions",
    ]  # fmt: skip
    assert (stats["CallsStarted"], stats["CallsCompleted"], stats["Sessions"]) == ("2", "2", "1")
    recorded = sim.events_recorded()
    assert [m.raw for m in recorded] == [m.raw for m in client.events if m.name != "FullyBooted"]
    assert int(stats["EventsSent"]) == len(recorded) == 1 + 2 * 39

    stall = await client.action("SimStall")
    assert stall.name == "Success"
    ping = client.send("Ping")
    with pytest.raises(AssertionError):
        await client.reply(ping, timeout=0.3)
    await client.action("SimResume")
    await client.reply(ping)

    raw = base64.b64encode(b"Event: Raw\r\nX: 1\r\n\r\n").decode()
    await client.action("SimSendRaw", {"Data": raw})
    await client.wait_for(lambda m: m.name == "Raw")

    client.send("SimDropSessions")
    await client.closed()
    again = await raw_ami(sim.port)
    assert (await again.login()).name == "Success"
    assert await sim.stop() == 0


async def test_process_generates_background_calls(
    pbx_process_factory: Callable[..., Awaitable[SimProcess]], raw_ami: Connect
) -> None:
    sim = await pbx_process_factory("--calls-per-second", "50", "--duration", "0.1", "--calls", "4")
    client = await raw_ami(sim.port)
    await client.login()
    await wait_for(lambda: len(sim.events_recorded()) == 4 * 39 + 1, what="4 calls recorded")
    recorded = Counter(m.name for m in sim.events_recorded())
    assert (recorded["OriginateResponse"], recorded["SuccessfulAuth"]) == (4, 1)


async def test_a_busy_port_is_one_clear_line_and_status_2(fake_pbx: FakePBX) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "amiworker.sim",
        "--port",
        str(fake_pbx.port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(15):
        _, err = await process.communicate()
    assert process.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{fake_pbx.port}" in lines[0]


def test_the_command_line_parser() -> None:
    args = build_arg_parser().parse_args(["--port", "0", "--calls-per-second", "5", "--calls", "9"])
    assert (args.port, args.calls_per_second, args.calls, args.ami_version) == (0, 5.0, 9, "11.0.0")


def test_a_bad_ami_version_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="ami_version must look like"):
        FakePBX(ami_version="eleven")


def test_the_secret_is_not_in_the_repr() -> None:
    assert "hunter2" not in repr(FakePBX(secret="hunter2"))
