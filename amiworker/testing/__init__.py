"""The handler kit: test handler modules in a second, with no server.

The fleet needs two properties of every handler: it must be **idempotent** (a
crash re-runs it) and **order-independent** across workers (the events of one
call may run in different processes, in any order between them). This kit
checks both on real traffic, in memory:

* :func:`sample_calls` gives the events of ``n`` real calls (a bundled capture
  of Asterisk 22.10.1, fresh ids per call); :func:`make_event` builds one event
  exactly as the parser gives it;
* :class:`Harness` runs events through handler modules with a real
  ``HandlerContext``: ``ctx.db`` an in-memory MongoDB (mongomock-motor),
  ``ctx.ami`` a :class:`RecordingAMI`, ``ctx.log`` captured;
  :class:`SyncHarness` is the same with blocking methods;
* :func:`check_idempotent` and :func:`check_order_independent` return a
  :class:`CheckResult` naming the handler, the event and the first differing
  document when the property does not hold;
* the pytest fixtures ``amiworker_harness`` and ``amiworker_async_harness``
  (a plugin, registered by installing amiworker), and the command
  ``amiworker test-handlers``.

Everything but :func:`sample_calls` and :func:`make_event` needs
mongomock-motor: ``pip install 'amiworker[testing]'``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Imported on first use: the pytest plugin imports this package in every test
# session of a project that installs amiworker, and must stay light.
_EXPORTS = {
    "sample_calls": "amiworker.testing.samples",
    "CAPTURE_CALLS": "amiworker.testing.samples",
    "make_event": "amiworker.testing.events",
    "Harness": "amiworker.testing.harness",
    "HandlerRun": "amiworker.testing.harness",
    "SyncHarness": "amiworker.testing.blocking",
    "RecordingAMI": "amiworker.testing.fakeami",
    "SentAction": "amiworker.testing.fakeami",
    "CheckResult": "amiworker.testing.checks",
    "check_idempotent": "amiworker.testing.checks",
    "check_order_independent": "amiworker.testing.checks",
    "Difference": "amiworker.testing.snapshots",
    "memory_database": "amiworker.testing.memory",
}

__all__ = [
    "CAPTURE_CALLS",
    "CheckResult",
    "Difference",
    "HandlerRun",
    "Harness",
    "RecordingAMI",
    "SentAction",
    "SyncHarness",
    "check_idempotent",
    "check_order_independent",
    "make_event",
    "memory_database",
    "sample_calls",
]

if TYPE_CHECKING:
    from amiworker.testing.blocking import SyncHarness
    from amiworker.testing.checks import CheckResult, check_idempotent, check_order_independent
    from amiworker.testing.events import make_event
    from amiworker.testing.fakeami import RecordingAMI, SentAction
    from amiworker.testing.harness import HandlerRun, Harness
    from amiworker.testing.memory import memory_database
    from amiworker.testing.samples import CAPTURE_CALLS, sample_calls
    from amiworker.testing.snapshots import Difference


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'amiworker.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
