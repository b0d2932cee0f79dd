"""Settings a user got wrong, as one line per problem naming the setting and what is
wrong, never the value of a secret; and the TOML file checked before it is read."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError as PydanticSettingsError

from amiworker.settings.redact import redact_uri

__all__ = [
    "ENV_PREFIX",
    "SettingsError",
    "check_config_file",
    "format_source_error",
    "format_validation_error",
]

ENV_PREFIX = "AMIWORKER_"
_MAX_ECHO = 80  # longest offending value quoted back in an error message


class SettingsError(Exception):
    """Invalid settings; ``str(error)`` is one line per problem, ready to print."""


def check_config_file(path: Path, known: set[str]) -> Path:
    """Refuse a missing or unparsable TOML file with a one-line message."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SettingsError(f"config file {path} cannot be read: {reason}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(
            "\n".join(f"unknown setting {name!r} in config file {path}" for name in unknown)
        )
    return path


def _is_sensitive(loc: tuple[int | str, ...]) -> bool:
    return any(isinstance(part, str) and "secret" in part.lower() for part in loc)


def _echo(loc: tuple[int | str, ...], value: Any) -> str:
    """The offending value as it may be shown, or '' when it must not be."""
    if _is_sensitive(loc) or not isinstance(value, str | int | float | bool):
        return ""  # secrets, and whole objects that may contain them
    if loc and loc[0] == "mongo_uri" and isinstance(value, str):
        value = redact_uri(value)
    text = repr(value)
    if len(text) > _MAX_ECHO:
        text = text[: _MAX_ECHO - 3] + "..."
    return f" (got {text})"


def format_validation_error(exc: ValidationError) -> str:
    """One line per error: ``invalid setting servers.0.port: <problem> (got 'abc')``."""
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        name = ".".join(str(part) for part in loc) or "settings"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            message = "is required but not set"
            got = ""
        elif error["type"] == "extra_forbidden":
            message = "is not a known setting"
            got = ""
        else:
            got = _echo(loc, error.get("input"))
        lines.append(f"invalid setting {name}: {message}{got}")
    return "\n".join(lines)


def format_source_error(exc: PydanticSettingsError) -> str:
    # pydantic-settings says 'error parsing value for field "servers" from source
    # "EnvSettingsSource"' and chains the JSON error; neither holds the value.
    match = re.search(r'field "([^"]+)" from source "([^"]+)"', str(exc))
    cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
    if match is None:
        return f"invalid settings: {exc}{cause}"
    field, source = match.groups()
    where = {
        "EnvSettingsSource": f"environment variable {ENV_PREFIX}{field.upper()}",
        "DotEnvSettingsSource": f".env entry {ENV_PREFIX}{field.upper()}",
    }.get(source, source)
    return f"invalid setting {field}: {where} is not valid JSON{cause}"
