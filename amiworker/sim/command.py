"""``amiworker simulate`` (or ``python -m amiworker.sim``): a simulated PBX as a process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl as _ssl
import sys
from pathlib import Path

from amiworker.sim.pbx import FakePBX

__all__ = ["build_arg_parser", "main"]

log = logging.getLogger("amiworker.sim")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amiworker simulate",
        description="Run a fake Asterisk PBX that speaks AMI and generates calls.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=5038, help="port (0: any free port)")
    parser.add_argument("--name", default="pbx1", help="PBX name (TAG variable, ids)")
    parser.add_argument("--username", default="admin", help="AMI user")
    parser.add_argument("--secret", default="secret", help="AMI secret")
    parser.add_argument(
        "--ami-version",
        default="11.0.0",
        help="11.0.0 = Asterisk 22; 2.10.6 = Asterisk 13 (legacy Command replies)",
    )
    parser.add_argument("--calls-per-second", type=float, default=0.0, help="background calls")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds each call lasts")
    parser.add_argument("--calls", type=int, default=None, help="stop after N background calls")
    parser.add_argument("--record", default=None, help="append every event sent to this file")
    parser.add_argument("--ready-file", default=None, help="write the port here once listening")
    parser.add_argument("--no-timestamps", action="store_true", help="timestampevents=no")
    parser.add_argument(
        "--write-timeout", type=float, default=5.0, help="seconds a full socket is tolerated"
    )
    parser.add_argument("--tls-cert", default=None, help="serve AMI over TLS: certificate (PEM)")
    parser.add_argument("--tls-key", default=None, help="its private key (PEM; else in the cert)")
    return parser


def _server_tls(cert: str | None, key: str | None) -> _ssl.SSLContext | None:
    if cert is None:
        if key is not None:
            raise ValueError("--tls-key needs --tls-cert")
        return None
    context = _ssl.create_default_context(_ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, _ssl.SSLError) as exc:
        raise OSError(f"cannot load --tls-cert {cert} / --tls-key {key}: {exc}") from None
    return context


async def _serve(args: argparse.Namespace) -> None:
    pbx = FakePBX(
        name=args.name,
        host=args.host,
        port=args.port,
        username=args.username,
        secret=args.secret,
        ami_version=args.ami_version,
        calls_per_second=args.calls_per_second,
        call_duration=args.duration,
        timestamp_events=not args.no_timestamps,
        max_calls=args.calls,
        write_timeout=args.write_timeout,
        keep_events=False,
        record_path=args.record,
        ssl=_server_tls(args.tls_cert, args.tls_key),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await pbx.start()
    try:
        if args.ready_file:
            ready = Path(args.ready_file)
            partial = ready.with_name(ready.name + ".partial")
            partial.write_text(f"{pbx.port}\n")
            partial.replace(ready)  # atomic: a reader never sees half a port number
        log.info("%s listening on %s:%d (AMI %s)", pbx.name, pbx.host, pbx.port, pbx.ami_version)
        await stop.wait()
    finally:
        await pbx.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve(args))
    except (OSError, ValueError) as exc:
        print(f"amiworker simulate: {exc}", file=sys.stderr)
        return 2
    return 0
