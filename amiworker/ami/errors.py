"""How the AMI client fails: one hierarchy under :class:`AMIError`, messages without secrets."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from amiworker.ami.response import Response

__all__ = [
    "AMIError",
    "ActionFailed",
    "ActionTimeout",
    "AuthenticationFailed",
    "ConnectError",
    "ConnectionFinished",
]


class AMIError(Exception):
    """Base of every error this client raises. Messages never contain the secret."""


class ConnectError(AMIError):
    """No AMI session could be set up: refused, unreachable, silent, or not AMI."""


class AuthenticationFailed(AMIError):
    """The PBX refused the login; the message carries the PBX's own words."""


class ActionTimeout(AMIError, TimeoutError):
    """An action got no (complete) answer within its timeout; the session lives on."""


class ConnectionFinished(AMIError):
    """The session ended while an action was pending, or before it was sent."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        #: Why the session ended, as in ``Connection.close_reason``.
        self.reason = reason


class ActionFailed(AMIError):
    """A helper's action was answered with an error (``Response: Error``).

    Raised by the typed helpers only: ``Connection.action()`` returns the
    :class:`Response` whatever it says, so callers can inspect it.
    """

    def __init__(self, message: str, response: Response) -> None:
        super().__init__(message)
        self.response = response
