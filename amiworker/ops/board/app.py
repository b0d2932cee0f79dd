"""The board's ASGI application (Starlette): the page, its JSON API and its live stream.

    GET  /                              the page (static/index.html, board.js, board.css)
    GET  /api/calls                     calls in progress and calls just ended
    GET  /api/rates                     events per 10 s per PBX, the last 15 minutes
    GET  /api/fleet                     the workers, their sessions, counters, heartbeat age
    GET  /api/failures                  the newest failed and dead events, with their error
    POST /api/failures/{id}/retry       a dead event becomes failed and due (amiworker retry)
    GET  /api/status                    how the board follows the log, and whether it can
    GET  /api/stream                    Server-Sent Events: each section above as it changes

Safety: the Retry action needs ``Authorization: Bearer <board_token>`` whenever
a token is set (the command refuses to bind a non-loopback address without
one); a POST from a page of another origin is refused; bound to loopback, the
board answers only requests addressed to a loopback name (no DNS rebinding).
Every response carries a Content-Security-Policy that allows no inline script,
and the page renders every value with ``textContent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from amiworker.mongo import StoreUnavailable
from amiworker.ops.board.live import Tracker

__all__ = ["LOOPBACK_NAMES", "create_app"]

log = logging.getLogger("amiworker.board")

STATIC: Final = Path(__file__).parent / "static"
LOOPBACK_NAMES: Final = ("127.0.0.1", "localhost", "::1", "[::1]")
READY_TIMEOUT: Final = 15.0
# How often a request waiting for the first read looks whether MongoDB is failing.
_READY_CHECK: Final = 0.2
KEEPALIVE: Final = 15.0
_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class _SecurityHeaders:
    """Adds the headers above to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in _HEADERS.items():
                    if name.lower().encode() not in present:
                        headers.append((name.lower().encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(
    tracker: Tracker,
    *,
    token: str | None,
    loopback: bool,
    on_startup: Callable[[], Awaitable[None]] | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
) -> Starlette:
    """The application serving ``tracker``; the caller runs ``tracker.run()`` (the
    lifespan does when ``on_startup`` is None)."""

    def json_response(data: Any, status: int = 200, **headers: str) -> Response:
        return Response(
            tracker.dumps(data),
            status_code=status,
            media_type="application/json",
            headers=headers or None,
        )

    async def section(name: str) -> Response:
        if name != "status":
            await ready_or_failing()
            if not tracker.ready.is_set():
                problem = tracker.problem or "the board is still reading the log"
                return json_response({"error": problem}, 503, **{"Retry-After": "2"})
        return json_response(tracker.section(name))

    async def ready_or_failing() -> None:
        """Until the first read of the log is done, MongoDB is known to fail (no use
        holding the request then), or READY_TIMEOUT has passed."""
        deadline = time.monotonic() + READY_TIMEOUT
        while not tracker.ready.is_set() and tracker.problem is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, _READY_CHECK)):
                    await tracker.ready.wait()

    async def calls(request: Request) -> Response:
        return await section("calls")

    async def rates(request: Request) -> Response:
        return await section("rates")

    async def fleet(request: Request) -> Response:
        return await section("fleet")

    async def failures(request: Request) -> Response:
        return await section("failures")

    async def status(request: Request) -> Response:
        return await section("status")

    async def retry(request: Request) -> Response:
        refused = _refuse(request, token)
        if refused is not None:
            return refused
        event_id = request.path_params["event_id"]
        try:
            if await tracker.retry(event_id):
                log.info("event %s retried from the board", event_id)
                return json_response({"id": event_id, "state": "failed"})
            doc = await tracker.query.event(event_id)
        except StoreUnavailable as exc:
            log.warning("%s", exc)
            return json_response({"error": "MongoDB is unreachable; try again"}, 503)
        if doc is None:
            return json_response({"error": "no such event"}, 404)
        return json_response(
            {"error": f"the event is {doc.get('state')}, not dead: only dead events are retried"},
            409,
        )

    async def stream(request: Request) -> Response:
        subscriber = tracker.subscribe()

        async def events() -> AsyncIterator[str]:
            try:
                yield f"retry: 1000\n: amiworker board, updates by {tracker.describe()}\n\n"
                while True:
                    items = await subscriber.next(KEEPALIVE)
                    if subscriber.ended:
                        return
                    if not items:
                        yield ": keep-alive\n\n"
                    for name, payload in items:
                        yield f"event: {name}\ndata: {payload}\n\n"
            finally:
                tracker.unsubscribe(subscriber)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"X-Accel-Buffering": "no"},
        )

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "not found"}, status_code=404)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if on_startup is not None:
            await on_startup()
        try:
            yield
        finally:
            if on_shutdown is not None:
                await on_shutdown()

    middleware = [Middleware(_SecurityHeaders)]
    if loopback:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_NAMES)))
    routes = [
        Route("/", index),
        Route("/api/calls", calls),
        Route("/api/rates", rates),
        Route("/api/fleet", fleet),
        Route("/api/failures", failures),
        Route("/api/failures/{event_id}/retry", retry, methods=["POST"]),
        Route("/api/status", status),
        Route("/api/stream", stream),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={404: not_found},
    )


def _refuse(request: Request, token: str | None) -> Response | None:
    """Why a state-changing request may not run, or None if it may."""
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        return JSONResponse({"error": "a request from another site's page"}, status_code=403)
    if token is None:
        return None
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        value.strip().encode(), token.encode()
    ):
        return JSONResponse(
            {"error": "this board needs its token (board_token) for Retry"},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="amiworker board"'},
        )
    return None
