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

from amiworker import __version__, logs
from amiworker.flags import (
    EXIT_BAD_SETTINGS,
    add_setting_flags,
    fail_settings,
    load_settings,
    register_secrets,
)
from amiworker.ops.board.command import add_board_command
from amiworker.ops.commands import add_commands as add_operator_commands
from amiworker.settings import SettingsError
from amiworker.testing.command import add_command as add_test_handlers_command

__all__ = ["main"]

# -- subcommands ---------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from amiworker.fleet.dispatch import HandlerImportError, load_handlers
    from amiworker.fleet.spill import SpillDirError, check_spill_dir
    from amiworker.fleet.supervisor import Supervisor

    try:
        settings = load_settings(args)
        settings.require_servers()
    except SettingsError as exc:
        return fail_settings(exc)
    logs.configure(settings.log_level, settings.log_format, "supervisor")
    register_secrets(settings)
    try:
        # Imported here too, so a broken module stops start-up once, clearly,
        # before any worker connects anywhere.
        load_handlers(settings.handlers, settings.app_dir)
    except HandlerImportError as exc:
        print(f"amiworker: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    if settings.spill_max_bytes:
        try:
            check_spill_dir(settings.spill_dir)
        except SpillDirError as exc:
            print(f"amiworker: {exc}; set spill_dir to a writable directory", file=sys.stderr)
            return EXIT_BAD_SETTINGS
    return Supervisor(settings).run()


def cmd_check(args: argparse.Namespace) -> int:
    from amiworker.ops.check import run_check

    try:
        settings = load_settings(args)
    except SettingsError as exc:
        return fail_settings(exc)
    logs.configure("WARNING", "text", "check")
    register_secrets(settings)
    return asyncio.run(run_check(settings))


def cmd_demo(args: argparse.Namespace) -> int:
    from amiworker.devstack.demo import run_demo

    return run_demo(args)


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
    add_setting_flags(run)
    run.set_defaults(func=cmd_run)

    check = commands.add_parser("check", help="check settings, MongoDB and every PBX")
    add_setting_flags(check)
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
    demo.add_argument("--board-port", type=int, default=8080, help="the call board's port")
    demo.add_argument("--no-board", dest="board_port", action="store_const", const=None)
    demo.add_argument("--linger", action="store_true", help="keep the board up until Ctrl-C")
    demo.set_defaults(func=cmd_demo)

    add_operator_commands(commands)
    add_test_handlers_command(commands)
    add_board_command(commands)
    return parser


_COMMANDS = {
    "run",
    "check",
    "simulate",
    "demo",
    "events",
    "call",
    "replay",
    "status",
    "retry",
    "board",
    "test-handlers",
}


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or (
        arguments[0] not in _COMMANDS and arguments[0] not in ("-h", "--help", "--version")
    ):
        arguments.insert(0, "run")
    if arguments[0] == "simulate":
        # The simulator has its own parser (python -m amiworker.sim); pass it all.
        from amiworker.sim.command import main as simulate

        return simulate(arguments[1:])
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
