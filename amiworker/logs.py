"""Logging: text or JSON lines, every line with the worker id and, where it applies, the PBX.

The PBX comes from ``extra={"server": name}`` or, in code that serves one PBX,
from the :data:`current_server` context variable. As a last line of defence,
every secret registered with :func:`register_secret` is masked in every line,
whatever code formatted it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime

__all__ = ["configure", "current_server", "register_secret", "set_worker_id"]

current_server: ContextVar[str] = ContextVar("amiworker_server", default="-")

_worker_id = "-"
_secrets: set[str] = set()
_masked_in_order: tuple[str, ...] = ()
_MASK = "***"


class Throttle:
    """At most one log line per ``interval`` seconds for a recurring failure, each
    with the count of what happened since the previous line: every occurrence is
    counted, and a flood cannot drown the log."""

    __slots__ = ("_clock", "_interval", "_last", "_pending")

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._last = float("-inf")
        self._pending = 0

    def count(self, occurrences: int = 1) -> int:
        """Count ``occurrences``; return how many the line due now reports (0: no
        line is due yet)."""
        self._pending += occurrences
        now = self._clock()
        if now - self._last < self._interval:
            return 0
        self._last = now
        reported, self._pending = self._pending, 0
        return reported

    def overdue(self) -> int:
        """How many were counted since the last line, if one is due now (else 0): for
        the line that says the failure stopped, when it stopped between two lines;
        such lines come no more often than the others."""
        if not self._pending or self._clock() - self._last < self._interval:
            return 0
        return self.count(0)

    def flush(self) -> int:
        """How many were counted since the last line (0 if none), now reported: for
        the line that says the failure ended."""
        reported, self._pending = self._pending, 0
        return reported


def set_worker_id(worker_id: str) -> None:
    global _worker_id
    _worker_id = worker_id


def register_secret(secret: str | None) -> None:
    """Mask ``secret`` wherever it would appear in a log line."""
    # Very short values would mask ordinary words; settings require real secrets.
    if secret and len(secret) >= 4:
        # Also as a repr (%r of a string or an exception) or JSON would write it,
        # where a quote or backslash in it comes out escaped.
        _secrets.update({secret, repr(secret)[1:-1], json.dumps(secret)[1:-1]})
        global _masked_in_order
        # Longest first: a secret's escaped form contains the plain one's pieces.
        _masked_in_order = tuple(sorted(_secrets, key=len, reverse=True))


def _scrub(text: str) -> str:
    for secret in _masked_in_order:
        if secret in text:
            text = text.replace(secret, _MASK)
    return text


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = _worker_id
        if not hasattr(record, "server"):
            record.server = current_server.get()
        return True


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)-7s [%(worker)s] [%(server)s] %(name)s: %(message)s"
        )

    def format(self, record: logging.LogRecord) -> str:
        return _scrub(super().format(record))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # Masked before encoding: json.dumps escapes a secret's '"' or '\\', after
        # which the secret as configured no longer appears in the line to be masked.
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "worker": _scrub(str(getattr(record, "worker", _worker_id))),
            "server": _scrub(str(getattr(record, "server", "-"))),
            "msg": _scrub(record.getMessage()),
        }
        if record.exc_info:
            entry["exc"] = _scrub(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str = "INFO", fmt: str = "text", worker_id: str | None = None) -> None:
    """Send amiworker's logs (and warnings from libraries) to stderr."""
    if worker_id is not None:
        set_worker_id(worker_id)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context())
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("amiworker").setLevel(level)
    logging.getLogger("handlers").setLevel(level)
