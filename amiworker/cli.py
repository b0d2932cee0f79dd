"""The ``amiworker`` command.

    amiworker [run] [--workers N] [--config amiworker.toml] ...   run the fleet
    amiworker check                                              verify settings, MongoDB, PBXs
    amiworker simulate --port 5038 --calls-per-second 5          a fake PBX
    amiworker demo                                               everything, locally

Every failure a user can cause ends with one line naming the cause and what to
do; invalid settings exit with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from amiworker import __version__, logs
from amiworker.settings import Settings, SettingsError, secrets_of

__all__ = ["main"]

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


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file")
    for flag, field, options in _SETTING_FLAGS:
        parser.add_argument(flag, dest=field, default=None, **options)


def load_settings(args: argparse.Namespace) -> Settings:
    overrides = {field: getattr(args, field, None) for _, field, _ in _SETTING_FLAGS}
    return Settings.load(getattr(args, "config", None), **overrides)


def _fail_settings(error: SettingsError) -> int:
    for line in str(error).splitlines():
        print(f"amiworker: {line}", file=sys.stderr)
    return EXIT_BAD_SETTINGS


# -- subcommands ---------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from amiworker.dispatch import HandlerImportError, load_handlers
    from amiworker.supervisor import Supervisor

    try:
        settings = load_settings(args)
        settings.require_servers()
    except SettingsError as exc:
        return _fail_settings(exc)
    logs.configure(settings.log_level, settings.log_format, "supervisor")
    register_secrets(settings)
    try:
        # Imported here too, so a broken module stops start-up once, clearly,
        # before any worker connects anywhere.
        load_handlers(settings.handlers, settings.app_dir)
    except HandlerImportError as exc:
        print(f"amiworker: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    return Supervisor(settings).run()


def cmd_check(args: argparse.Namespace) -> int:
    from amiworker.check import run_check

    try:
        settings = load_settings(args)
    except SettingsError as exc:
        return _fail_settings(exc)
    logs.configure("WARNING", "text", "check")
    register_secrets(settings)
    return asyncio.run(run_check(settings))


def cmd_demo(args: argparse.Namespace) -> int:
    from amiworker.demo import run_demo

    return run_demo(args)


def register_secrets(settings: Settings) -> None:
    """Mask every configured secret in every log line, whatever prints it."""
    for secret in secrets_of(settings):
        logs.register_secret(secret)


# -- the parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amiworker",
        description="Asterisk Manager Interface events into a durable MongoDB log, handled "
        "exactly once across a fleet of workers.",
    )
    parser.add_argument("--version", action="version", version=f"amiworker {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the workers (the default command)")
    _add_setting_flags(run)
    run.set_defaults(func=cmd_run)

    check = commands.add_parser("check", help="check settings, MongoDB and every PBX")
    _add_setting_flags(check)
    check.set_defaults(func=cmd_check)

    # Listed for --help; main() hands its arguments to the simulator's own parser.
    commands.add_parser("simulate", help="run a simulated PBX (see amiworker simulate --help)")

    demo = commands.add_parser(
        "demo", help="run the demo: an embedded store, two simulated PBXs, four workers"
    )
    demo.add_argument("--workers", type=int, default=4)
    demo.add_argument("--pbxs", type=int, default=2)
    demo.add_argument("--calls", type=int, default=100, help="calls per PBX")
    demo.add_argument("--calls-per-second", type=float, default=20.0, help="per PBX")
    demo.add_argument("--data-dir", type=Path, default=None, help="keep the store here")
    demo.set_defaults(func=cmd_demo)

    from amiworker import ops_cli

    ops_cli.add_commands(commands, _add_setting_flags)
    return parser


_COMMANDS = {"run", "check", "simulate", "demo", "events", "call", "replay", "status", "retry"}


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or (
        arguments[0] not in _COMMANDS and arguments[0] not in ("-h", "--help", "--version")
    ):
        arguments.insert(0, "run")
    if arguments[0] == "simulate":
        # The simulator has its own parser (python -m amiworker.simulator); pass it all.
        from amiworker import simulator

        return simulator.main(arguments[1:])
    parser = build_parser()
    args = parser.parse_args(arguments)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the last line of defence: one line, not a traceback
        logging.getLogger("amiworker").debug("unexpected error", exc_info=True)
        print(f"amiworker: unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
