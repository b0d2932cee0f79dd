"""Channels of the simulated PBX and the dialplan they run.

A :class:`SimChannel` holds what Asterisk's channel snapshot holds, and formats
the block of headers every channel event carries (``Channel`` ... ``Linkedid``,
optionally prefixed: ``DestChannel``, ``LocalOneUniqueid``...). A
:class:`Dialplan` reads an extensions.conf-like config into ordered
``(application, data)`` steps per extension.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from amiworker.sim.data import ConfigFile

DOWN, RING, UP = 0, 4, 6
STATE_DESC = {
    0: "Down",
    1: "Rsrvd",
    2: "OffHook",
    3: "Dialing",
    4: "Ring",
    5: "Ringing",
    6: "Up",
    7: "Busy",
    8: "Dialing Offhook",
    9: "Pre-ring",
}
NORMAL_CLEARING = 16
CAUSE_TEXT = {
    1: "Unallocated (unassigned) number",
    16: "Normal Clearing",
    17: "User busy",
    18: "No user responding",
    19: "User alerting, no answer",
    21: "Call Rejected",
    34: "Circuit/channel congestion",
}

#: One dialplan priority: (application, data).
Step = tuple[str, str]


def timestamp() -> str:
    """``<sec>.<usec>``, as manager.conf ``timestampevents`` prints it."""
    ns = time.time_ns()
    return f"{ns // 1_000_000_000}.{ns // 1_000 % 1_000_000:06d}"


def parse_caller_id(text: str) -> tuple[str, str]:
    """``"Test 2" <1002>`` -> ("Test 2", "1002"); a missing part is ``<unknown>``."""
    match = re.fullmatch(r'\s*"?(?P<name>[^"<]*?)"?\s*<(?P<num>[^>]*)>\s*', text)
    if match:
        name, num = match["name"].strip(), match["num"].strip()
    elif re.fullmatch(r"\s*[0-9+*#]+\s*", text):
        name, num = "", text.strip()
    else:
        name, num = text.strip(), ""
    return name or "<unknown>", num or "<unknown>"


@dataclass(eq=False, slots=True)
class SimChannel:
    """What Asterisk's channel snapshot holds, for the events and the listings."""

    name: str
    uniqueid: str
    linkedid: str
    context: str
    exten: str
    priority: int = 1
    state: int = DOWN
    cid_num: str = "<unknown>"
    cid_name: str = "<unknown>"
    conn_num: str = "<unknown>"
    conn_name: str = "<unknown>"
    language: str = "en"
    accountcode: str = ""
    application: str = ""
    app_data: str = ""
    created: float = field(default_factory=time.monotonic)
    variables: dict[str, str] = field(default_factory=dict)

    @property
    def device(self) -> str:
        """``Local/100@test-0000000a;1`` -> ``Local/100@test`` (the DeviceStateChange name)."""
        return self.name.rpartition("-")[0] or self.name

    def snapshot(self, prefix: str = "") -> str:
        """The channel block every channel event carries, each name prefixed (``Dest``...)."""
        p = prefix
        return (
            f"{p}Channel: {self.name}\r\n"
            f"{p}ChannelState: {self.state}\r\n"
            f"{p}ChannelStateDesc: {STATE_DESC.get(self.state, 'Unknown')}\r\n"
            f"{p}CallerIDNum: {self.cid_num}\r\n"
            f"{p}CallerIDName: {self.cid_name}\r\n"
            f"{p}ConnectedLineNum: {self.conn_num}\r\n"
            f"{p}ConnectedLineName: {self.conn_name}\r\n"
            f"{p}Language: {self.language}\r\n"
            f"{p}AccountCode: {self.accountcode}\r\n"
            f"{p}Context: {self.context}\r\n"
            f"{p}Exten: {self.exten}\r\n"
            f"{p}Priority: {self.priority}\r\n"
            f"{p}Uniqueid: {self.uniqueid}\r\n"
            f"{p}Linkedid: {self.linkedid}\r\n"
        )

    def age(self) -> int:
        return int(time.monotonic() - self.created)


def _parse_application(text: str) -> Step:
    match = re.fullmatch(r"\s*([^(]*?)\s*(?:\((.*)\))?\s*", text)
    if match is None:  # pragma: no cover - the pattern matches any string
        return text, ""
    return match[1], match[2] or ""


class Dialplan:
    """The extensions of an extensions.conf-like config, as ordered application lists."""

    def __init__(self, config: ConfigFile) -> None:
        self.globals: dict[str, str] = {}
        self.hints: dict[tuple[str, str], str] = {}
        self._contexts: dict[str, dict[str, list[Step]]] = {}
        for category, lines in config:
            if category == "general":
                continue
            if category == "globals":
                self.globals.update(lines)
                continue
            extens = self._contexts.setdefault(category, {})
            current: str | None = None
            for name, value in lines:
                if name == "exten":
                    current, _, rest = value.partition(",")
                    priority, _, application = rest.partition(",")
                elif name == "same" and current is not None:
                    priority, _, application = value.partition(",")
                else:
                    continue
                if priority == "hint":
                    self.hints[(category, current)] = application
                else:
                    extens.setdefault(current, []).append(_parse_application(application))

    def steps(self, context: str, exten: str) -> list[Step] | None:
        return self._contexts.get(context, {}).get(exten)
