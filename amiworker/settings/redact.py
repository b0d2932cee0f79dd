"""Secrets never shown: the MongoDB URI with its password masked, and every secret
of the settings listed, for the log formatter to mask wherever it appears."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import unquote

if TYPE_CHECKING:
    from amiworker.settings.model import Settings

__all__ = ["MASK", "redact_uri", "secrets_of", "uri_secrets"]

MASK = "***"
# URI options whose values are credentials, e.g. tlsCertificateKeyFilePassword,
# authMechanismProperties=AWS_SESSION_TOKEN:...
_SECRET_OPTION = re.compile(
    r"(?i)([?&][^=&]*(?:password|token|secret|authmechanismproperties)=)[^&]*"
)


def redact_uri(uri: str) -> str:
    """Return ``uri`` with its password (and credential options) masked.

    ``mongodb://app:hunter2@db1,db2/?replicaSet=rs`` becomes
    ``mongodb://app:***@db1,db2/?replicaSet=rs``. The user info is everything
    before the *last* ``@``, so an unescaped ``@`` in a password is masked too.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        scheme, rest = "", uri
    at = rest.rfind("@")
    if at != -1:
        user, colon, _password = rest[:at].partition(":")
        userinfo = f"{user}:{MASK}" if colon else user
        rest = f"{userinfo}@{rest[at + 1 :]}"
    rest = _SECRET_OPTION.sub(lambda m: m.group(1) + MASK, rest)
    return f"{scheme}{sep}{rest}"


def uri_secrets(uri: str) -> list[str]:
    """What :func:`redact_uri` masks in ``uri``: its password (as written, and
    percent-decoded) and the values of its credential options."""
    userinfo, at, _ = uri.partition("://")[2].rpartition("@")
    _, colon, password = userinfo.partition(":")
    found = [password, unquote(password)] if at and colon and password else []
    found += [m.group(0).partition("=")[2] for m in _SECRET_OPTION.finditer(uri)]
    return [secret for secret in found if secret]


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value in ``settings``: AMI secrets, and the MongoDB URI's."""
    found = [server.secret.get_secret_value() for server in settings.servers]
    return found + uri_secrets(settings.mongo_uri)
