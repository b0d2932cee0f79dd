"""Settings: one pydantic-settings model, read from flags, ``AMIWORKER_*``, ``.env``
and a TOML file (:mod:`~amiworker.settings.model`); one line per mistake
(:mod:`~amiworker.settings.errors`); secrets never shown (:mod:`~amiworker.settings.redact`).
"""

from amiworker.settings.errors import ENV_PREFIX, SettingsError, format_validation_error
from amiworker.settings.model import (
    ServerSettings,
    Settings,
    database_name_problem,
    default_spill_dir,
)
from amiworker.settings.redact import MASK, redact_uri, secrets_of

__all__ = [
    "ENV_PREFIX",
    "MASK",
    "ServerSettings",
    "Settings",
    "SettingsError",
    "database_name_problem",
    "default_spill_dir",
    "format_validation_error",
    "redact_uri",
    "secrets_of",
]
