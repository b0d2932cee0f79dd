"""Replies of the simulated PBX to AMI actions, shaped as Asterisk sends them.

Header names, their order and the ``Message:`` texts are copied from
``tests/fixtures/asterisk22-actions.txt`` (Asterisk 22.10.1) where the capture
has them, and from Asterisk's manager.c, chan_sip.c and chan_iax2.c where it
does not. The EventList actions are in :mod:`amiworker.sim.lists`; Login,
Logoff, Challenge and the ``Sim*`` control actions live in
:mod:`amiworker.sim.session`, with the rest of the session's life.

Every handler writes its reply first and raises the events that follow from
it (VarSet, UserEvent, a call's events) afterwards, the order Asterisk shows.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from amiworker.sim.calls import OriginateRequest
from amiworker.sim.channel import NORMAL_CLEARING, timestamp
from amiworker.sim.console import run_cli
from amiworker.sim.data import LIST_COMMANDS, ConfigFile
from amiworker.sim.lists import LIST_HANDLERS
from amiworker.sim.wire import Action, Handler, ack, error, registrar, response

if TYPE_CHECKING:
    from amiworker.sim.pbx import FakePBX
    from amiworker.sim.session import AMISession

HANDLERS: dict[str, Handler] = {}
_action = registrar(HANDLERS)


@_action("Ping")
async def _ping(pbx: FakePBX, s: AMISession, a: Action) -> None:
    s.reply(response(a, "Success", ("Ping", "Pong"), ("Timestamp", timestamp())))


@_action("Events")
async def _events(pbx: FakePBX, s: AMISession, a: Action) -> None:
    s.set_event_mask(a.get("EventMask"))
    s.reply(response(a, "Success", ("Events", "Off" if s.event_mask == frozenset() else "On")))


@_action("Command")
async def _command(pbx: FakePBX, s: AMISession, a: Action) -> None:
    command = a.get("Command")
    if not command:
        s.reply(error(a, "No command provided"))
        return
    if command.split()[:2] in (["module", "load"], ["module", "unload"]):
        s.reply(error(a, "Command blacklisted"))
        return
    ok, lines = run_cli(pbx, command)
    if pbx.legacy:
        # Asterisk <= 13 (manager.c action_command): the raw CLI text, then a marker.
        head = "Response: Follows\r\nPrivilege: Command\r\n"
        if a.action_id:
            head += f"ActionID: {a.action_id}\r\n"
        body = "".join(f"{line}\n" for line in lines)
        s.reply(f"{head}{body}--END COMMAND--\r\n\r\n".encode())
        return
    s.reply(
        response(
            a,
            "Success" if ok else "Error",
            ("Message", "Command output follows"),
            *(("Output", line) for line in lines),
        )
    )


@_action("CoreStatus")
async def _core_status(pbx: FakePBX, s: AMISession, a: Action) -> None:
    started = time.gmtime(pbx.started_at)
    date, clock = time.strftime("%Y-%m-%d", started), time.strftime("%H:%M:%S", started)
    s.reply(
        response(
            a,
            "Success",
            ("CoreStartupDate", date),
            ("CoreStartupTime", clock),
            ("CoreReloadDate", date),
            ("CoreReloadTime", clock),
            ("CoreCurrentCalls", str(len(pbx.engine.channels))),
            ("CoreProcessedCalls", str(2 * pbx.engine.calls_started)),
        )
    )


@_action("CoreSettings")
async def _core_settings(pbx: FakePBX, s: AMISession, a: Action) -> None:
    s.reply(
        response(
            a,
            "Success",
            ("AMIversion", pbx.ami_version),
            ("AsteriskVersion", pbx.asterisk_version),
            ("SystemName", ""),
            ("CoreMaxCalls", "0"),
            ("CoreMaxLoadAvg", "0.000000"),
            ("CoreRunUser", ""),
            ("CoreRunGroup", ""),
            ("CoreMaxFilehandles", "8192"),
            ("CoreRealTimeEnabled", "No"),
            ("CoreCDRenabled", "Yes"),
            ("CoreHTTPenabled", "No"),
            ("SoundsSearchCustomDir", "No"),
        )
    )


def _config(pbx: FakePBX, s: AMISession, a: Action) -> ConfigFile | None:
    filename = a.get("Filename")
    if not filename:
        s.reply(error(a, "Filename not specified"))
        return None
    config = pbx.config_file(filename)
    if config is None:
        s.reply(error(a, "Config file not found"))
        return None
    category = a.get("Category")
    return [(name, lines) for name, lines in config if not category or name == category]


@_action("GetConfig")
async def _get_config(pbx: FakePBX, s: AMISession, a: Action) -> None:
    config = _config(pbx, s, a)
    if config is None:
        return
    lines: list[tuple[str, str]] = []
    for n, (category, variables) in enumerate(config):
        lines.append((f"Category-{n:06d}", category))
        lines.extend(
            (f"Line-{n:06d}-{i:06d}", f"{name}={value}")
            for i, (name, value) in enumerate(variables)
        )
    body = response(a, "Success", *lines)
    if a.get("Category") and not config:
        body = body[:-2] + b"No categories found\r\n\r\n"
    s.reply(body)


def _json(text: str) -> str:
    # astman_append_json escapes only backslash and double quote.
    return text.replace("\\", "\\\\").replace('"', '\\"')


@_action("GetConfigJSON")
async def _get_config_json(pbx: FakePBX, s: AMISession, a: Action) -> None:
    config = _config(pbx, s, a)
    if config is None:
        return
    # Not json.dumps: Asterisk keeps repeated names ("exten", "same") as repeated keys.
    text = ",".join(
        f'"{_json(category)}":{{'
        + ",".join(f'"{_json(name)}":"{_json(value)}"' for name, value in variables)
        + "}"
        for category, variables in config
    )
    s.reply(response(a, "Success", ("JSON", "{" + text + "}")))


@_action("ListCommands")
async def _list_commands(pbx: FakePBX, s: AMISession, a: Action) -> None:
    s.reply(response(a, "Success", *LIST_COMMANDS))


@_action("DBPut")
async def _db_put(pbx: FakePBX, s: AMISession, a: Action) -> None:
    family, key = a.get("Family"), a.get("Key")
    if not family:
        s.reply(error(a, "No family specified"))
    elif not key:
        s.reply(error(a, "No key specified"))
    else:
        pbx.astdb[(family, key)] = a.get("Val")
        s.reply(ack(a, "Updated database successfully"))


@_action("UserEvent")
async def _user_event(pbx: FakePBX, s: AMISession, a: Action) -> None:
    name = a.get("UserEvent")
    if not name:
        s.reply(error(a, "UserEvent needs a name"))
        return
    s.reply(ack(a, "Event Sent"))
    # Every header but Action and UserEvent is passed on, ActionID included, in order.
    body = "".join(
        f"{header}: {value}\r\n"
        for header, value in a.headers
        if header.lower() not in ("action", "userevent")
    )
    pbx.engine.emit("UserEvent", "user,all", f"UserEvent: {name}\r\n{body}")


@_action("Setvar")
async def _setvar(pbx: FakePBX, s: AMISession, a: Action) -> None:
    channel, name = a.get("Channel") or None, a.get("Variable")
    if not name:
        s.reply(error(a, "No variable specified"))
    elif channel is not None and channel not in pbx.engine.channels:
        s.reply(error(a, "No such channel"))
    else:
        s.reply(ack(a, "Variable Set"))
        pbx.engine.set_variable(channel, name, a.get("Value"))


@_action("Getvar")
async def _getvar(pbx: FakePBX, s: AMISession, a: Action) -> None:
    channel, name = a.get("Channel") or None, a.get("Variable")
    if not name:
        s.reply(error(a, "No variable specified"))
    elif channel is not None and channel not in pbx.engine.channels:
        s.reply(error(a, "No such channel"))
    else:
        value = pbx.engine.get_variable(channel, name) or ""
        s.reply(response(a, "Success", ("Variable", name), ("Value", value)))


@_action("Hangup")
async def _hangup(pbx: FakePBX, s: AMISession, a: Action) -> None:
    channel = a.get("Channel")
    cause = a.get("Cause")
    if not channel:
        s.reply(error(a, "No channel specified"))
    elif channel not in pbx.engine.channels:
        s.reply(error(a, "No such channel"))
    else:
        s.reply(ack(a, "Channel Hungup"))
        pbx.engine.hangup(channel, int(cause) if cause.isdigit() else NORMAL_CLEARING)


@_action("Redirect")
async def _redirect(pbx: FakePBX, s: AMISession, a: Action) -> None:
    channel, context = a.get("Channel"), a.get("Context")
    exten, priority = a.get("Exten"), a.get("Priority")
    for value, what in ((channel, "Channel"), (context, "Context"), (exten, "Exten")):
        if not value:
            s.reply(error(a, f"{what} not specified"))
            return
    if not priority:
        s.reply(error(a, "Priority not specified"))
    elif not priority.isdigit() or int(priority) < 1:
        s.reply(error(a, "Priority is invalid"))
    elif channel not in pbx.engine.channels:
        s.reply(error(a, f"Channel does not exist: {channel}"))
    else:
        s.reply(ack(a, "Redirect successful"))
        pbx.engine.redirect(channel, context, exten, int(priority))


@_action("ExtensionState")
async def _extension_state(pbx: FakePBX, s: AMISession, a: Action) -> None:
    exten, context = a.get("Exten"), a.get("Context") or "default"
    hint = pbx.engine.dialplan.hints.get((context, exten), "")
    status = -1
    if hint:
        busy = any(chan.device == hint for chan in pbx.engine.channels.values())
        status = 1 if busy else 0
    text = {-1: "Unknown", 0: "Idle", 1: "InUse"}[status]
    s.reply(
        response(
            a,
            "Success",
            ("Message", "Extension Status"),
            ("Exten", exten),
            ("Context", context),
            ("Hint", hint),
            ("Status", str(status)),
            ("StatusText", text),
        )
    )


@_action("Originate")
async def _originate(pbx: FakePBX, s: AMISession, a: Action) -> None:
    channel = a.get("Channel")
    if not channel:
        s.reply(error(a, "Channel not specified"))
        return
    if "/" not in channel:
        s.reply(error(a, "Invalid channel"))
        return
    priority = a.get("Priority") or "1"
    if not priority.isdigit():
        s.reply(error(a, "Invalid priority"))
        return
    variables: list[tuple[str, str]] = []
    for header in a.getall("Variable"):
        for assignment in header.split(","):
            name, _, value = assignment.partition("=")
            if name.strip():
                variables.append((name.strip(), value))
    request = OriginateRequest(
        channel=channel,
        # An Application originate is not simulated: no such extension, so it fails.
        context=a.get("Context") or "default",
        exten=a.get("Exten") if not a.get("Application") else "",
        priority=int(priority),
        variables=variables,
        caller_id=a.get("CallerID") or None,
        action_id=a.action_id or None,
        channel_id=a.get("ChannelId") or None,
        other_channel_id=a.get("OtherChannelId") or None,
        async_=a.get("Async").lower() in ("yes", "true", "y", "t", "1", "on"),
    )
    if request.async_:
        s.reply(ack(a, "Originate successfully queued"))
        pbx.engine.originate(request)
        return
    # A synchronous Originate answers once the channel is up, or fails.
    answered = pbx.engine.originate(
        request, on_answer=lambda: s.reply(ack(a, "Originate successfully queued"))
    )
    if answered is None:
        s.reply(error(a, "Originate failed"))


HANDLERS.update(LIST_HANDLERS)
