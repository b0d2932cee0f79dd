"""``amiworker test-handlers``: handler modules checked on real sample calls, no server.

    amiworker test-handlers [MODULE ...] [--calls N] [--split N] [--interleavings N]
                            [--seed N] [--app-dir DIR] [--config FILE]

Runs the events of ``--calls`` sample calls (real Asterisk 22 traffic, see
:mod:`amiworker.testing.samples`) through the handler modules (default: the
``handlers`` setting, imported from ``--app-dir``) and prints, per handler,
its runs and failures (each with the handler's own file and line), whether it
is idempotent and whether it is order-independent across workers (see
:mod:`amiworker.testing.checks`). Exit status: 0 when every handler ran
without failing and both properties hold; 1 otherwise; 2 when a module fails
to import (one line), for bad flags or settings, or without mongomock-motor.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from amiworker import logs
from amiworker.flags import EXIT_BAD_SETTINGS, add_setting_flags, fail_settings, load_settings
from amiworker.fleet.dispatch import HandlerImportError
from amiworker.fleet.handler_threads import exit_past_abandoned_runs
from amiworker.settings import SettingsError
from amiworker.testing.harness import Harness
from amiworker.testing.memory import memory_database
from amiworker.testing.report import check_handlers, format_report
from amiworker.testing.samples import CAPTURE_CALLS, sample_calls

__all__ = ["add_command"]

EXIT_FAILED: Final = 1


def add_command(commands: Any) -> None:
    """Add ``test-handlers`` to ``amiworker``'s subparsers."""
    parser = commands.add_parser(
        "test-handlers",
        help="check handler modules on real sample calls, with no server: runs, failures, "
        "idempotent, order-independent",
        description="Run real sample calls through handler modules (an in-memory MongoDB, a "
        "recording AMI) and check that each handler is idempotent and order-independent.",
    )
    parser.add_argument(
        "modules",
        nargs="*",
        metavar="MODULE",
        help="handler modules (default: the handlers setting)",
    )
    parser.add_argument(
        "--calls",
        type=int,
        default=CAPTURE_CALLS,
        metavar="N",
        help=f"sample calls to run (default {CAPTURE_CALLS}, those of the bundled capture; "
        "more repeat them with new ids)",
    )
    parser.add_argument(
        "--split",
        type=int,
        default=2,
        metavar="N",
        help="workers each call's events are split between (default 2)",
    )
    parser.add_argument(
        "--interleavings",
        type=int,
        default=4,
        metavar="N",
        help="orders of the split events to check (default 4)",
    )
    parser.add_argument("--seed", type=int, default=0, help="chooses the interleavings (default 0)")
    parser.add_argument(
        "--handler-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="a handler run taking longer fails (default: the handler_timeout setting, 30 s); "
        "every event runs a dozen times or more, so keep it short for slow handlers",
    )
    add_setting_flags(parser)
    parser.set_defaults(func=run_test_handlers)


def _fail(message: str) -> int:
    print(f"amiworker: {message}", file=sys.stderr)
    return EXIT_BAD_SETTINGS


def run_test_handlers(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        settings = load_settings(args)
    except SettingsError as exc:
        return fail_settings(exc)
    logs.configure("WARNING", settings.log_format, "test-handlers")
    for flag, value, least in (
        ("--calls", args.calls, 1),
        ("--split", args.split, 1),
        ("--interleavings", args.interleavings, 1),
    ):
        if value < least:
            return _fail(f"{flag} must be {least} or more, not {value}")
    timeout = settings.handler_timeout if args.handler_timeout is None else args.handler_timeout
    if timeout <= 0:
        return _fail(f"--handler-timeout must be more than 0, not {timeout:g}")
    try:
        memory_database()
    except ImportError as exc:
        return _fail(str(exc))
    modules = [part for name in args.modules for part in name.split(",") if part] or list(
        settings.handlers
    )
    harness = Harness(
        modules,
        app_dir=settings.app_dir,
        race=settings.race,
        dedup_window=settings.dedup_window,
        timeout=timeout,
    )
    harness.logger.propagate = False  # what handlers log is theirs, not this report's
    try:
        registry = harness.registry
    except HandlerImportError as exc:
        return _fail(str(exc))
    if not len(registry):
        return _fail(f"no <Event>Handler function in {', '.join(modules)}: nothing to test")
    events = sample_calls(args.calls)
    check = check_handlers(
        harness, events, workers=args.split, interleavings=args.interleavings, seed=args.seed
    )
    # Plain handlers run in the loop's default executor; asyncio.run would wait for
    # its threads at the end, abandoned runs included, before the report is printed.
    loop = asyncio.new_event_loop()
    threads = ThreadPoolExecutor(thread_name_prefix="handler")
    loop.set_default_executor(threads)
    try:
        report = loop.run_until_complete(check)
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        threads.shutdown(wait=False, cancel_futures=True)
        loop.close()
    print(
        f"test-handlers: {', '.join(modules)} on {args.calls} sample call(s): "
        f"{len(events)} events, {report.deliveries} with a handler"
    )
    for line in format_report(report):
        print(line)
    verdict = "PASS" if report.ok else "FAIL"
    print(
        f"{verdict} in {time.perf_counter() - started:.2f} s (each event run twice; "
        f"{args.interleavings} interleaving(s) over {args.split} workers, seed {args.seed})"
    )
    status = 0 if report.ok else EXIT_FAILED
    # Plain handler runs abandoned after the timeout may never return; Python's exit
    # would wait for them (the report is out: there is nothing left to wait for).
    exit_past_abandoned_runs(status)
    return status
