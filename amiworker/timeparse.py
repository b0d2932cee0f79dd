"""Times given on the command line: ISO 8601, or a duration ago (``10m``, ``2h``, ``3d``).

A time without a zone is taken as UTC: the event log stores UTC, and the
commands print UTC, so what a user copies from the output means the same
thing when pasted back.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Final

__all__ = ["parse_time"]

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGO: Final = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])(?:\s+ago)?$", re.IGNORECASE)
HELP: Final = (
    "an ISO 8601 time (2026-11-26T06:46:00Z; UTC without a zone) "
    "or a duration ago (30s, 10m, 2h, 3d, 1w)"
)


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """The timezone-aware UTC datetime ``text`` names.

    ``now`` anchors relative durations (default: this host's clock). Raises
    ValueError with a one-line message saying what is accepted.
    """
    value = text.strip()
    match = _AGO.match(value)
    if match:
        amount, unit = match.groups()
        anchor = now if now is not None else datetime.now(UTC)
        return anchor - timedelta(seconds=float(amount) * _UNITS[unit.lower()])
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a time: use {HELP}") from None
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    return when.astimezone(UTC)
