"""``amiworker board``: serve the call board.

    amiworker board [--host 127.0.0.1] [--port 8080] [--poll] [setting flags]

Reads only MongoDB (the event log and ``workers``): it needs no PBX settings
and no AMI credentials. Binds 127.0.0.1 by default; bound to any other
address it refuses to start unless ``board_token`` is set, which the Retry
action then requires. ``--port 0`` takes a free port; the first line printed
is the page's address. Exit status: 0 after Ctrl-C or SIGTERM, 1 when the
address cannot be had, 2 for bad settings or flags, or the extra missing.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any, Final

from amiworker import logs
from amiworker.flags import (
    EXIT_BAD_SETTINGS,
    add_setting_flags,
    fail_settings,
    load_settings,
    register_secrets,
)
from amiworker.settings import Settings, SettingsError, redact_uri, secrets_of

if TYPE_CHECKING:
    from amiworker.ops.board.live import Tracker

__all__ = ["add_board_command", "is_loopback", "run_board"]

MIN_TOKEN: Final = 8
EXIT_UNAVAILABLE: Final = 1


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only accepts connections from this
    machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, treat it as reachable


def binding_problem(host: str, token: str | None) -> str | None:
    """Why the board may not serve on ``host`` with ``token``, or None."""
    if token is not None and len(token) < MIN_TOKEN:
        return f"board_token is too short: use at least {MIN_TOKEN} characters"
    if token is None and not is_loopback(host):
        return (
            f"--host {host} is not a loopback address: set board_token (AMIWORKER_BOARD_TOKEN) "
            "so that the Retry action needs it, or bind 127.0.0.1"
        )
    return None


def add_board_command(commands: Any) -> None:
    """Add ``board`` to ``amiworker``'s subparsers."""
    board = commands.add_parser(
        "board", help="serve the call board: live calls, rates, the fleet and failures"
    )
    board.add_argument("--host", default="127.0.0.1", help="address to serve on (127.0.0.1)")
    board.add_argument("--port", type=int, default=8080, help="port (8080; 0: any free port)")
    board.add_argument(
        "--poll",
        action="store_true",
        help="poll the log instead of a change stream (used anyway where the server has none)",
    )
    board.add_argument(
        "--poll-interval", type=float, default=1.0, help="seconds between polls (1.0)"
    )
    add_setting_flags(board)
    board.set_defaults(func=run_board)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run_board(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args)
    except SettingsError as exc:
        return fail_settings(exc)
    token = settings.board_token.get_secret_value() if settings.board_token else None
    problem = binding_problem(args.host, token)
    if problem is None and not 0 <= args.port <= 65535:
        problem = f"--port {args.port} is not a port number"
    if problem is None and args.poll_interval <= 0:
        problem = "--poll-interval must be more than 0"
    if problem is not None:
        print(f"amiworker: board: {problem}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    logs.configure(settings.log_level, settings.log_format, "board")
    register_secrets(settings)
    logs.register_secret(token)
    try:
        import uvicorn

        from amiworker.ops.board.app import create_app
    except ImportError as exc:
        print(
            f"amiworker: board: {exc.name or 'a dependency'} is missing: "
            "pip install 'amiworker[board]'",
            file=sys.stderr,
        )
        return EXIT_BAD_SETTINGS
    try:
        sock = _listen(args.host, args.port)
    except OSError as exc:
        print(
            f"amiworker: board: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE
    app, tracker = _build(settings, args, token, create_app)
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=2,
        ws="none",
    )

    class BoardServer(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # Open pages' streams first: uvicorn waits for every response to end
            # (timeout_graceful_shutdown), then cancels it with a traceback.
            tracker.end_streams()
            await super().shutdown(sockets)

    server = BoardServer(config)
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"amiworker board: http://{shown}:{port}/", flush=True)
    # uvicorn stops on SIGINT/SIGTERM, then raises the signal again for the handler
    # found when it started: this one, so that a requested stop exits with status 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
    return 0


def _build(
    settings: Settings, args: argparse.Namespace, token: str | None, create: Any
) -> tuple[Any, Tracker]:
    from amiworker.cancelling import cancel_until_done
    from amiworker.ops.board.live import Tracker
    from amiworker.ops.query import EventQuery

    query = EventQuery.from_settings(settings)
    secrets = [*secrets_of(settings), settings.mongo_uri, redact_uri(settings.mongo_uri)]
    if token:
        secrets.append(token)
    tracker = Tracker(
        query,
        lease=settings.lease,
        max_age=settings.board_call_max_age,
        secrets=secrets,
        mode="poll" if args.poll else "auto",
        poll_interval=args.poll_interval,
    )
    running: list[asyncio.Task[None]] = []

    async def start() -> None:
        running.append(asyncio.get_running_loop().create_task(tracker.run()))

    async def stop() -> None:
        await cancel_until_done(running, give_up_after=5.0)
        await query.close()

    app = create(
        tracker, token=token, loopback=is_loopback(args.host), on_startup=start, on_shutdown=stop
    )
    return app, tracker
