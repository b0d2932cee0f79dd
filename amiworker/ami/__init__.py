"""The AMI client, usable on its own.

* :mod:`~amiworker.ami.protocol`: the sans-IO codec (framing, action encoding);
  :mod:`~amiworker.ami.message`: one message, headers read lazily;
* :mod:`~amiworker.ami.connection`: one session (open, login, keepalive, close),
  with :mod:`~amiworker.ami.routing` correlating replies by ActionID;
* :mod:`~amiworker.ami.actions`: the typed helpers; :mod:`~amiworker.ami.response`
  and :mod:`~amiworker.ami.errors`: what an action returns and how it fails;
* :mod:`~amiworker.ami.pool`: a session to every PBX, each kept alive.
"""

from amiworker.ami.actions import ConfigCategory, ExtensionState
from amiworker.ami.connection import Connection, EventCallback, ReceivedEvent
from amiworker.ami.errors import (
    ActionFailed,
    ActionTimeout,
    AMIError,
    AuthenticationFailed,
    ConnectError,
    ConnectionFinished,
)
from amiworker.ami.message import Message
from amiworker.ami.protocol import Parser, ProtocolError
from amiworker.ami.response import Response

__all__ = [
    "AMIError",
    "ActionFailed",
    "ActionTimeout",
    "AuthenticationFailed",
    "ConfigCategory",
    "ConnectError",
    "Connection",
    "ConnectionFinished",
    "EventCallback",
    "ExtensionState",
    "Message",
    "Parser",
    "ProtocolError",
    "ReceivedEvent",
    "Response",
]
