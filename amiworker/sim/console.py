"""The few Asterisk CLI commands the simulated PBX answers through ``Action: Command``.

Output lines are formatted as Asterisk 22's CLI prints them (main/cli.c,
main/asterisk.c); the AMI framing of those lines (``Output:`` headers, or the
legacy ``Response: Follows`` body) is done by the Command action.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from amiworker.sim.channel import STATE_DESC
from amiworker.sim.data import BUILD_INFO

if TYPE_CHECKING:
    from amiworker.sim.pbx import FakePBX

_KNOWN = (
    ("core", "show", "version"),
    ("core", "show", "uptime"),
    ("core", "show", "channels"),
)
_CHANNELS_FORMAT = "{:<64.64} {:<32.32} {:<7.7} {:<30.30}"


def _plural(n: int) -> str:
    return "" if n == 1 else "s"


def uptime_text(seconds: int) -> str:
    """``1 hour, 2 minutes, 3 seconds``, as print_uptimestr prints it."""
    parts: list[str] = []
    for size, unit in ((86400 * 365, "year"), (86400 * 7, "week"), (86400, "day"), (3600, "hour")):
        if seconds > size:
            count, seconds = divmod(seconds, size)
            parts.append(f"{count} {unit}{_plural(count)}")
    if seconds > 60:
        count, seconds = divmod(seconds, 60)
        parts.append(f"{count} minute{_plural(count)}")
    if seconds > 0 or not parts:
        parts.append(f"{seconds} second{_plural(seconds)}")
    return ", ".join(parts)


def _find_best(words: list[str]) -> str:
    """The words CLI's find_best echoes in its "No such command" hint."""
    taken: list[str] = []
    for word in words:
        taken.append(word)
        depth = len(taken)
        if depth > 1 and not any(tuple(taken) == known[:depth] for known in _KNOWN):
            break
    return " ".join(taken)


def run_cli(pbx: FakePBX, command: str) -> tuple[bool, list[str]]:
    """Run one CLI command; return (succeeded, output lines)."""
    words = command.split()
    uptime = int(time.time() - pbx.started_at)
    if words == ["core", "show", "version"]:
        return True, [f"Asterisk {pbx.asterisk_version} {BUILD_INFO}"]
    if words[:3] == ["core", "show", "uptime"] and len(words) <= 4:
        if words[3:] == ["seconds"]:
            return True, [f"System uptime: {uptime}", f"Last reload: {uptime}"]
        return True, [
            f"System uptime: {uptime_text(uptime)}",
            f"Last reload: {uptime_text(uptime)}",
        ]
    if words[:3] == ["core", "show", "channels"] and len(words) <= 4:
        return True, _channels(pbx, words[3] if len(words) == 4 else "")
    return False, [
        f"No such command '{command}' "
        f"(type 'core show help {_find_best(words)}' for other possible commands)"
    ]


def _channels(pbx: FakePBX, mode: str) -> list[str]:
    channels = list(pbx.engine.channels.values())
    count = len(channels)
    lines: list[str] = []
    if mode != "count":
        lines.append(_CHANNELS_FORMAT.format("Channel", "Location", "State", "Application(Data)"))
        for chan in channels:
            location = f"{chan.exten}@{chan.context}:{chan.priority}"
            state = STATE_DESC.get(chan.state, "Unknown")
            data = f"{chan.application}({chan.app_data})" if chan.application else ""
            lines.append(_CHANNELS_FORMAT.format(chan.name, location, state, data))
    processed = 2 * pbx.engine.calls_started
    lines += [
        f"{count} active channel{_plural(count)}",
        f"{count} active call{_plural(count)}",
        f"{processed} call{_plural(processed)} processed",
    ]
    return lines
