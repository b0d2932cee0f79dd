"""Reading times: AMI ``Timestamp`` headers, and times given on the command line.

An AMI ``Timestamp`` (``1795675581.052545``) is read without a float, so it is
exact to the microsecond: the events of one call often share a millisecond,
and a re-run of a handler must compute the very same value.

On the command line a time is ISO 8601 or a duration ago (``10m``, ``2h``,
``3d``). A time without a zone is taken as UTC: the event log stores UTC, and
the commands print UTC, so what a user copies from the output means the same
thing when pasted back.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Final

__all__ = ["HELP", "parse_time", "timestamp_datetime", "timestamp_micros"]

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGO: Final = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])(?:\s+ago)?$", re.IGNORECASE)
HELP: Final = (
    "an ISO 8601 time (2026-11-26T06:46:00Z; UTC without a zone) "
    "or a duration ago (30s, 10m, 2h, 3d, 1w)"
)


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# Beyond this an AMI Timestamp is garbage, not a time (datetime ends in year 9999).
_MAX_SECONDS: Final = 253_402_300_799


def timestamp_micros(value: str | None) -> int | None:
    """An AMI ``Timestamp`` header (``1795675581.052545``) in whole microseconds since
    the epoch, or None when it is absent or not of that shape."""
    if not value:
        return None
    seconds, _, fraction = value.partition(".")
    if not (seconds.isdigit() and (fraction.isdigit() or not fraction)):
        return None
    if int(seconds) > _MAX_SECONDS:
        return None
    return int(seconds) * 1_000_000 + int(fraction[:6].ljust(6, "0"))


def timestamp_datetime(value: str | None) -> datetime | None:
    """The UTC datetime of an AMI ``Timestamp`` header, exact to the microsecond, or None."""
    micros = timestamp_micros(value)
    return None if micros is None else _EPOCH + timedelta(microseconds=micros)


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
