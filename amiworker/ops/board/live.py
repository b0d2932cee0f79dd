"""Following the log for the board, and pushing what changed to every open page.

One :class:`Tracker` per board process:

- **new events** come from :func:`amiworker.ops.follow.follow`: a change stream
  where the server offers one, else polling (``--poll`` forces it). Each is
  folded into the calls (:class:`~amiworker.ops.board.calls.CallTable`) and
  counted into the rates (:class:`~amiworker.ops.board.rates.RateCounter`):
  a push costs nothing however long the log is;
- **the calls are read from the log** (:func:`~amiworker.ops.board.queries.load_calls`)
  once the stream is open, and again every ``RESYNC`` seconds and after the
  stream was lost: what polling can miss (an event stored more than 10 s after
  it was received), or what was stored while MongoDB was away, is put right
  then. Events that arrive while it reads are folded into the new table too;
- **the fleet** (``workers``) is read every ``FLEET_EVERY`` seconds, **the
  failures** every ``FAILURES_EVERY`` seconds and right after a Retry: their
  documents change in place, which a stream of inserts does not show;
- **pushes**: at most every ``PUSH_EVERY`` seconds, the sections that changed,
  each as the JSON its API endpoint answers, to every subscriber (an SSE
  connection). A slow page only ever gets the newest version of a section.

Every payload goes through :meth:`Tracker.dumps`, which masks the configured
secrets and the MongoDB URI in whatever text it carries (a worker's error, a
handler's exception).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Final

from amiworker.mongo import StoreUnavailable
from amiworker.ops.board.calls import CallTable, iso
from amiworker.ops.board.queries import (
    failures_json,
    fleet_json,
    load_calls,
    load_rates,
    plain_dates,
    server_names,
)
from amiworker.ops.board.rates import RateCounter
from amiworker.ops.filters import EventFilter
from amiworker.ops.follow import FollowMode, follow
from amiworker.ops.query import EventQuery

__all__ = ["SECTIONS", "Subscriber", "Tracker"]

log = logging.getLogger("amiworker.board")

SECTIONS: Final = ("status", "calls", "rates", "fleet", "failures")
RESYNC: Final = 60.0
FLEET_EVERY: Final = 1.0
FAILURES_EVERY: Final = 2.0
PUSH_EVERY: Final = 0.2
_MASK: Final = "***"
_BACKOFF_MAX: Final = 10.0


class Subscriber:
    """One open page: the newest payload of each section not sent yet."""

    def __init__(self) -> None:
        self._pending: dict[str, str] = {}
        self._ready = asyncio.Event()
        self.ended = False

    def put(self, name: str, payload: str) -> None:
        self._pending[name] = payload
        self._ready.set()

    def end(self) -> None:
        """The board is stopping: the stream ends (the page reconnects by itself)."""
        self.ended = True
        self._ready.set()

    async def next(self, timeout: float) -> list[tuple[str, str]]:
        """What changed since the last call, waiting up to ``timeout`` s (then [])."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        self._ready.clear()
        items, self._pending = list(self._pending.items()), {}
        return items


class Tracker:
    """The board's view of the log and the fleet, kept current (see the module docstring)."""

    def __init__(
        self,
        query: EventQuery,
        *,
        lease: float,
        max_age: float,
        secrets: Iterable[str] = (),
        mode: FollowMode = "auto",
        poll_interval: float = 1.0,
    ) -> None:
        self.query = query
        self.lease = lease
        self.max_age = max_age
        self.follow_mode: FollowMode = mode
        self.poll_interval = poll_interval
        self.calls = CallTable(max_age)
        self.rates = RateCounter()
        self.rates_complete = False
        self.fleet: dict[str, Any] = {"now": None, "lease": lease, "workers": []}
        self.failures: dict[str, Any] = {"limit": 0, "failures": []}
        self.mode = "starting"  # then "changes" or "poll"
        self.problem: str | None = None
        self._ending = False
        self.sync_seconds: float | None = None
        self.ready = asyncio.Event()  # the first read of the log is done
        # Longest first, so that a URI is masked whole before its password is.
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)
        self._subscribers: set[Subscriber] = set()
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._resync = asyncio.Event()
        self._refresh_failures = asyncio.Event()
        self._during_sync: list[dict[str, Any]] | None = None
        self._counting_from: datetime | None = None  # rates: the stream counts from here

    # -- what the API and the pushes send -----------------------------------------------------

    def section(self, name: str, now: datetime | None = None) -> dict[str, Any]:
        now = now or datetime.now(UTC)
        if name == "calls":
            return self.calls.snapshot(now)
        if name == "rates":
            return {**self.rates.snapshot(now), "complete": self.rates_complete}
        if name == "fleet":
            return self.fleet
        if name == "failures":
            return self.failures
        if name == "status":
            return {
                "now": iso(now),
                "live": self.mode,
                "poll_interval": self.poll_interval if self.mode == "poll" else None,
                "ready": self.ready.is_set(),
                "problem": self.problem,
                "sync_ms": None if self.sync_seconds is None else round(self.sync_seconds * 1e3),
            }
        raise KeyError(name)

    def dumps(self, data: Any) -> str:
        """``data`` as JSON, every configured secret masked."""
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
        for secret in self._secrets:
            encoded = json.dumps(secret, ensure_ascii=False)[1:-1]
            if encoded in text:
                text = text.replace(encoded, _MASK)
        return text

    def subscribe(self) -> Subscriber:
        """A new page: it gets every section now, then each change."""
        subscriber = Subscriber()
        if self._ending:
            subscriber.end()
        now = datetime.now(UTC)
        for name in SECTIONS:
            subscriber.put(name, self.dumps(self.section(name, now)))
        self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)

    def end_streams(self) -> None:
        """End every open page's stream, and those opened from now on: a server
        stopping gracefully waits for its responses to end, and these never would."""
        self._ending = True
        for subscriber in self._subscribers:
            subscriber.end()

    def changed(self, *names: str) -> None:
        self._dirty.update(names)
        self._wake.set()

    async def retry(self, event_id: str) -> bool:
        """Retry one dead event (``amiworker retry`` for it); the failures are read again."""
        done = await self.query.retry_event(event_id)
        self._refresh_failures.set()
        return done

    # -- the loops ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow, read and push until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._guarded(self._follow, "follow the log"))
            tasks.create_task(self._guarded(self._syncs, "read the calls"))
            tasks.create_task(self._guarded(self._fleet_loop, "read the fleet"))
            tasks.create_task(self._guarded(self._failures_loop, "read the failures"))
            tasks.create_task(self._guarded(self._publish, "push"))

    async def _guarded(self, loop: Any, what: str) -> None:
        """Run ``loop`` for ever: MongoDB away is shown on the page and retried; anything
        else is logged and retried too, so that one bad document cannot freeze the board."""
        delay = 0.5
        while True:
            started = time.monotonic()
            try:
                await loop()
            except StoreUnavailable as exc:
                self._trouble(str(exc))
            except Exception:
                log.exception("the board failed to %s; trying again", what)
                self._trouble(f"the board failed to {what}; see its log")
            if time.monotonic() - started > 30:
                delay = 0.5
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)

    def _trouble(self, message: str) -> None:
        if self.problem is None:
            log.warning("%s", message)
        # The page says what, never where: the message names the server.
        self.problem = "MongoDB is unreachable or failing; the board retries"
        self.changed("status")

    def _fine(self) -> None:
        if self.problem is not None:
            log.info("MongoDB is back")
            self.problem = None
            self.changed("status")

    async def _follow(self) -> None:
        def on_mode(mode: str, reason: str | None) -> None:
            if mode != self.mode or reason:
                log.info("live updates by %s%s", mode, f" ({reason})" if reason else "")
            self.mode = mode
            if self._counting_from is None:
                self._counting_from = datetime.now(UTC)
            self._resync.set()  # read the log again: the stream starts from now
            self.changed("status")

        stream = follow(
            self.query,
            EventFilter(),
            backlog=0,
            mode=self.follow_mode,
            poll_interval=self.poll_interval,
            on_mode=on_mode,
        )
        async for doc in stream:
            self._on_doc(doc)

    def _on_doc(self, doc: dict[str, Any]) -> None:
        ts = plain_dates(doc).get("ts")
        if self._counting_from is not None and isinstance(ts, datetime):
            aware = ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
            if aware >= self._counting_from:
                self.rates.add_doc(doc)
        if self.calls.apply(doc):
            self.changed("calls")
        if self._during_sync is not None:
            self._during_sync.append(doc)

    async def _syncs(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RESYNC):
                    await self._resync.wait()
            self._resync.clear()
            if self.mode == "starting":
                continue  # no stream yet: what it would show is not being followed
            await self._sync_calls()
            if not self.ready.is_set():
                self.fleet = await fleet_json(self.query, self.lease)
                self.failures = await failures_json(self.query)
                self.ready.set()
                self.changed(*SECTIONS)
                log.info(
                    "the log is read (%.0f ms); the board is live", (self.sync_seconds or 0) * 1e3
                )
            if not self.rates_complete and self._counting_from is not None:
                servers = await server_names(self.query)
                await load_rates(self.query, self.rates, servers, self._counting_from)
                self.rates_complete = True
                self.changed("rates")

    async def _sync_calls(self) -> None:
        started = time.monotonic()
        self._during_sync = []
        try:
            table = await load_calls(self.query, datetime.now(UTC), self.max_age)
            table.inherit(self.calls)
            for doc in self._during_sync:
                table.apply(doc)
        finally:
            self._during_sync = None
        self.calls = table
        self.sync_seconds = time.monotonic() - started
        self._fine()
        self.changed("calls", "status")

    async def _fleet_loop(self) -> None:
        while True:
            self.fleet = await fleet_json(self.query, self.lease)
            self._fine()
            for worker in self.fleet["workers"]:
                self.rates.know(session["pbx"] for session in worker["sessions"])
            if self.calls.expire(datetime.now(UTC)):
                self.changed("calls")
            self.changed("fleet", "rates", "status")
            await asyncio.sleep(FLEET_EVERY)

    async def _failures_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FAILURES_EVERY):
                    await self._refresh_failures.wait()
            self._refresh_failures.clear()
            if not self.ready.is_set():
                continue
            failures = await failures_json(self.query)
            if failures != self.failures:
                self.failures = failures
                self.changed("failures")

    async def _publish(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            names, self._dirty = self._dirty, set()
            now = datetime.now(UTC)
            for name in SECTIONS:
                if name in names and self._subscribers:
                    payload = self.dumps(self.section(name, now))
                    for subscriber in list(self._subscribers):
                        subscriber.put(name, payload)
            await asyncio.sleep(PUSH_EVERY)

    def describe(self) -> str:
        """How updates arrive, for the start-up line."""
        if self.mode == "poll":
            return f"polling every {self.poll_interval:g} s"
        return "change stream" if self.mode == "changes" else self.mode
