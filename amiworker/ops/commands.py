"""The operator commands: ``events``, ``call``, ``replay``, ``status``, ``retry``.

    amiworker events [--server S] [--event E[,E]] [--uniqueid U] [--linkedid L]
                     [--since T] [--until T] [--state S] [--limit N] [--json] [--follow]
    amiworker call LINKEDID [--json]
    amiworker replay [--since T] [--until T] [--handlers M[,M]] [--server S] [--event E]
                     [--into DATABASE]
    amiworker status [--json]
    amiworker retry [--state dead] [--event E] [--server S] [--since T] [--until T]

Each takes the usual setting flags (``--config``, ``--mongo-uri``, ``--database``...)
and reads the settings as ``amiworker run`` does. They all go through
:class:`amiworker.ops.query.EventQuery`. Exit status: 0, 1 when MongoDB cannot be
used (one line saying why) or a replay had failures, 2 for bad settings or flags.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

from amiworker import logs
from amiworker.flags import add_setting_flags, load_settings, register_secrets
from amiworker.fleet.documents import DEAD, STATES
from amiworker.mongo import StoreUnavailable
from amiworker.ops.filters import EventFilter
from amiworker.ops.query import EventQuery
from amiworker.ops.render import (
    EventTable,
    call_json,
    dumps,
    print_call,
    print_workers,
    worker_json,
)
from amiworker.settings import Settings, SettingsError, database_name_problem
from amiworker.timeparse import HELP as TIME_HELP

__all__ = ["add_commands"]

EXIT_UNAVAILABLE: Final = 1
EXIT_USAGE: Final = 2
_PROGRESS_INTERVAL: Final = 0.1


class _UsageError(Exception):
    """A flag a user got wrong: one line, exit status 2."""


Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


def _command(func: Command, *, quiet: bool = True) -> Callable[[argparse.Namespace], int]:
    """Load the settings, run ``func`` on an event loop, turn user errors into one line.

    ``quiet``: log warnings only (queries); else at the configured log level.
    """

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            settings = load_settings(args)
        except SettingsError as exc:
            for line in str(exc).splitlines():
                print(f"amiworker: {line}", file=sys.stderr)
            return EXIT_USAGE
        level = "WARNING" if quiet else settings.log_level
        logs.configure(level, settings.log_format, args.command)
        register_secrets(settings)
        try:
            return asyncio.run(func(args, settings))
        except _UsageError as exc:
            print(f"amiworker: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except StoreUnavailable as exc:
            print(f"amiworker: {exc}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        except BrokenPipeError:
            # The reader went away (| head): not an error. Keep Python from
            # complaining again when it flushes stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0

    return run


def _filter(args: argparse.Namespace, **fixed: Any) -> EventFilter:
    criteria = {
        name: getattr(args, name, None)
        for name in ("server", "event", "uniqueid", "linkedid", "since", "until", "state")
    }
    try:
        return EventFilter.of(**{**criteria, **fixed})
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


async def _opened(settings: Settings) -> EventQuery:
    query = EventQuery.from_settings(settings)
    try:
        await query.ping()
    except StoreUnavailable:
        await query.close()
        raise
    return query


# -- events ----------------------------------------------------------------------------------


async def _events(args: argparse.Namespace, settings: Settings) -> int:
    flt = _filter(args)
    if args.limit < 0:
        raise _UsageError("--limit must be 0 or more")
    if args.follow and (flt.states or flt.until is not None):
        raise _UsageError(
            "--follow shows events as they are stored; it cannot be combined with "
            "--state or --until"
        )
    table = None if args.json else EventTable(sys.stdout, follow=args.follow)

    def show(docs: list[dict[str, Any]]) -> None:
        if table is not None:
            table.print(docs)
            return
        for doc in docs:
            print(dumps(doc), flush=True)

    query = await _opened(settings)
    try:
        if not args.follow:
            docs = await query.find(flt, limit=args.limit)
            if table is not None and not docs:
                print("no events match", file=sys.stderr)
                return 0
            show(docs)
            return 0
        from amiworker.ops.follow import follow

        def on_mode(mode: str, reason: str | None) -> None:
            if reason:
                print(
                    f"amiworker: {reason}; polling every {args.poll_interval:g} s",
                    file=sys.stderr,
                    flush=True,
                )

        stream = follow(
            query,
            flt,
            backlog=args.limit,
            mode="poll" if args.poll else "auto",
            poll_interval=args.poll_interval,
            on_mode=on_mode,
        )
        if table is not None:
            table.print([])  # the header, even before the first event
        async for doc in stream:
            show([doc])
        return 0
    finally:
        await query.close()


# -- call ------------------------------------------------------------------------------------


async def _call(args: argparse.Namespace, settings: Settings) -> int:
    query = await _opened(settings)
    query.calls_collection = args.calls_collection
    try:
        story = await query.call(args.linkedid, server=args.server)
    finally:
        await query.close()
    if story is None:
        where = f" on {args.server}" if args.server else ""
        print(f"amiworker: no event with Linkedid {args.linkedid!r}{where}", file=sys.stderr)
        return 1
    if args.json:
        print(call_json(story))
    else:
        print_call(story, sys.stdout, args.calls_collection)
    return 0


# -- replay ----------------------------------------------------------------------------------


class _ProgressLine:
    """``\\r``-rewritten progress on stderr, when stderr is a terminal (else silent)."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._last = 0.0
        self._started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < _PROGRESS_INTERVAL and done < total):
            return
        self._last = now
        share = f" ({100 * done // total}%)" if total else ""
        rate = done / max(now - self._started, 1e-9)
        sys.stderr.write(f"\rreplay: {done}/{total} events{share}, {rate:,.0f}/s ")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


async def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from amiworker.fleet.dispatch import HandlerImportError, load_handlers
    from amiworker.ops.replay import replay

    flt = _filter(args)
    if args.into:
        problem = database_name_problem(args.into)
        if problem is not None:
            raise _UsageError(f"--into {args.into!r}: {problem}")
    try:
        registry = load_handlers(settings.handlers, settings.app_dir)
    except HandlerImportError as exc:
        raise _UsageError(str(exc)) from None
    query = await _opened(settings)
    progress = _ProgressLine()
    try:
        into = query.database.client[args.into] if args.into else None
        summary = await replay(
            query, registry, flt, into=into, timeout=settings.handler_timeout, progress=progress
        )
    finally:
        progress.finish()
        await query.close()
    target = args.into or settings.database
    print(
        f"replay: {summary.describe()} (handlers {', '.join(settings.handlers)}, "
        f"into database {target})"
    )
    for error in summary.errors:
        print(f"  failed: {error}", file=sys.stderr)
    if summary.failures > len(summary.errors):
        print(f"  ... and {summary.failures - len(summary.errors)} more", file=sys.stderr)
    return 1 if summary.failures else 0


# -- status and retry ------------------------------------------------------------------------


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    query = await _opened(settings)
    try:
        workers = await query.workers(settings.lease)
    finally:
        await query.close()
    if args.json:
        for worker in workers:
            print(worker_json(worker))
    else:
        print_workers(workers, settings.lease, sys.stdout)
    return 0


async def _retry(args: argparse.Namespace, settings: Settings) -> int:
    flt = _filter(args, state=None)
    query = await _opened(settings)
    try:
        count = await query.retry_dead(flt)
        workers = await query.workers(settings.lease) if count else []
    finally:
        await query.close()
    if not count:
        print("re-queued 0 dead event(s): none matches")
    elif not any(w.state == "running" and not w.stale for w in workers):
        print(f"re-queued {count} dead event(s); no worker runs now: the first to start runs them")
    else:
        print(
            # Workers search for retries they did not record themselves once per lease.
            f"re-queued {count} dead event(s); running workers retry them within "
            f"{settings.lease + settings.heartbeat_interval:g} s"
        )
    return 0


# -- the parsers -----------------------------------------------------------------------------


def _add_filters(parser: argparse.ArgumentParser, *, ids: bool = True) -> None:
    parser.add_argument("--server", help="only events of this PBX (its name in the settings)")
    parser.add_argument("--event", help="only these events (exact name, comma-separated)")
    if ids:
        parser.add_argument("--uniqueid", help="only events of this channel")
        parser.add_argument("--linkedid", help="only events of this call")
    parser.add_argument("--since", help=f"events from this time on: {TIME_HELP}")
    parser.add_argument("--until", help="events before this time (same forms)")


def add_commands(commands: Any) -> None:
    """Add the operator subcommands to ``amiworker``'s subparsers."""
    events = commands.add_parser("events", help="list stored events, or follow new ones")
    _add_filters(events)
    events.add_argument(
        "--state", choices=STATES, help="only events in this state (failed includes dead)"
    )
    events.add_argument("--limit", type=int, default=50, help="newest N events (default 50)")
    events.add_argument("--json", action="store_true", help="one JSON document per line")
    events.add_argument("--follow", "-f", action="store_true", help="then print new events")
    events.add_argument(
        "--poll",
        action="store_true",
        help="with --follow: poll instead of a change stream (used anyway where the "
        "server has none)",
    )
    events.add_argument("--poll-interval", type=float, default=0.5, help=argparse.SUPPRESS)
    add_setting_flags(events)
    events.set_defaults(func=_command(_events))

    call = commands.add_parser("call", help="one call: its channels, events and projection")
    call.add_argument("linkedid", metavar="LINKEDID")
    call.add_argument("--server", help="the PBX, if Linkedids repeat across PBXs")
    call.add_argument("--json", action="store_true", help="one JSON object")
    call.add_argument(
        "--calls-collection", default="calls", help="projection collection (default calls)"
    )
    add_setting_flags(call)
    call.set_defaults(func=_command(_call))

    replay = commands.add_parser(
        "replay", help="run stored events through handlers again (rebuild a projection)"
    )
    _add_filters(replay, ids=False)
    replay.add_argument(
        "--into",
        metavar="DATABASE",
        help="handlers write to this database instead of the event log's",
    )
    add_setting_flags(replay)
    replay.set_defaults(func=_command(_replay, quiet=False))

    status = commands.add_parser("status", help="the workers, their PBXs and counters")
    status.add_argument("--json", action="store_true", help="one JSON object per worker")
    add_setting_flags(status)
    status.set_defaults(func=_command(_status))

    retry = commands.add_parser("retry", help="re-queue dead events")
    retry.add_argument("--state", choices=[DEAD], default=DEAD, help="dead (the default)")
    _add_filters(retry, ids=False)
    add_setting_flags(retry)
    retry.set_defaults(func=_command(_retry))
