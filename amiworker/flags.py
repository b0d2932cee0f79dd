"""The setting flags every subcommand takes, and reading the settings from them.

Shared by the entry point (``amiworker run``, ``check``) and the operator
commands (``amiworker.ops.commands``), which register themselves with the
entry point's parser: neither imports the other for these.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from amiworker import logs
from amiworker.settings import Settings, SettingsError, secrets_of

__all__ = [
    "EXIT_BAD_SETTINGS",
    "add_setting_flags",
    "fail_settings",
    "load_settings",
    "register_secrets",
]

EXIT_BAD_SETTINGS = 2

# Flags that map one-to-one onto settings (flag -> field); None means "not given".
_SETTING_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--workers", "workers", {"help": "worker processes (default 1)"}),
    ("--handlers", "handlers", {"help": "handler modules, comma-separated (default: handlers)"}),
    ("--app-dir", "app_dir", {"help": "directory handler modules are imported from (default .)"}),
    ("--mongo-uri", "mongo_uri", {"help": "MongoDB connection string"}),
    ("--database", "database", {"help": "MongoDB database (default amiworker)"}),
    ("--driver", "driver", {"help": "MongoDB driver: pymongo or motor"}),
    ("--race", "race", {"help": "which events race: channel, all or none"}),
    ("--log-level", "log_level", {"help": "DEBUG, INFO, WARNING, ERROR"}),
    ("--log-format", "log_format", {"help": "text or json"}),
    ("--metrics-port", "metrics_port", {"help": "serve Prometheus metrics here"}),
]


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file")
    for flag, field, options in _SETTING_FLAGS:
        parser.add_argument(flag, dest=field, default=None, **options)


def load_settings(args: argparse.Namespace) -> Settings:
    overrides = {field: getattr(args, field, None) for _, field, _ in _SETTING_FLAGS}
    return Settings.load(getattr(args, "config", None), **overrides)


def fail_settings(error: SettingsError) -> int:
    for line in str(error).splitlines():
        print(f"amiworker: {line}", file=sys.stderr)
    return EXIT_BAD_SETTINGS


def register_secrets(settings: Settings) -> None:
    """Mask every configured secret in every log line, whatever prints it."""
    for secret in secrets_of(settings):
        logs.register_secret(secret)
