"""amiworker: Asterisk Manager Interface events into a durable MongoDB log.

Every worker process holds an AMI session to every PBX; for each channel event
the workers race to insert it into a uniquely keyed MongoDB collection and only
the winner runs the user's ``<Event>Handler``. ARCHITECTURE.md maps the parts:

* :mod:`amiworker.ami`: the AMI client, usable on its own;
* :mod:`amiworker.fleet`: the worker processes and the lock table they race on;
* :mod:`amiworker.ops`: what operators run against the log;
* :mod:`amiworker.sim`: the simulated PBX; :mod:`amiworker.devstack`: a local installation.

The names a handler module or a script needs are importable from here::

    from amiworker import HandlerContext, Message
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Imported on first use, not here: ``import amiworker.ami`` (the AMI client alone,
# or the simulator) must not pay for pydantic and the MongoDB driver.
_EXPORTS = {
    "Message": "amiworker.ami.message",
    "Connection": "amiworker.ami.connection",
    "Response": "amiworker.ami.response",
    "AMIError": "amiworker.ami.errors",
    "ActionFailed": "amiworker.ami.errors",
    "ActionTimeout": "amiworker.ami.errors",
    "AuthenticationFailed": "amiworker.ami.errors",
    "ConnectError": "amiworker.ami.errors",
    "ConnectionFinished": "amiworker.ami.errors",
    "HandlerContext": "amiworker.fleet.dispatch",
    "EventQuery": "amiworker.ops.query",
    "EventFilter": "amiworker.ops.filters",
    "Settings": "amiworker.settings",
    "SettingsError": "amiworker.settings",
    "StoreUnavailable": "amiworker.mongo",
}

__all__ = [
    "AMIError",
    "ActionFailed",
    "ActionTimeout",
    "AuthenticationFailed",
    "ConnectError",
    "Connection",
    "ConnectionFinished",
    "EventFilter",
    "EventQuery",
    "HandlerContext",
    "Message",
    "Response",
    "Settings",
    "SettingsError",
    "StoreUnavailable",
    "__version__",
]

if TYPE_CHECKING:
    from amiworker.ami.connection import Connection
    from amiworker.ami.errors import (
        ActionFailed,
        ActionTimeout,
        AMIError,
        AuthenticationFailed,
        ConnectError,
        ConnectionFinished,
    )
    from amiworker.ami.message import Message
    from amiworker.ami.response import Response
    from amiworker.fleet.dispatch import HandlerContext
    from amiworker.mongo import StoreUnavailable
    from amiworker.ops.filters import EventFilter
    from amiworker.ops.query import EventQuery
    from amiworker.settings import Settings, SettingsError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'amiworker' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
