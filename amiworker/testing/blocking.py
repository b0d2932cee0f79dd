"""The harness for plain ``def`` tests: the same harness, every method blocking.

:class:`SyncHarness` runs an :class:`~amiworker.testing.harness.Harness` on an
event loop of its own, in a thread of its own, so a test needs no asyncio
plugin (and an ``async def`` test may use it too: its loop waits meanwhile)::

    def test_billing(amiworker_harness):
        amiworker_harness.load("handlers.billing")
        amiworker_harness.run(sample_calls(3))
        assert len(amiworker_harness.documents("cdr")) == 6
        assert amiworker_harness.check_idempotent(sample_calls(3))
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from amiworker.ami.message import Message
from amiworker.fleet.dispatch import HandlerRegistry
from amiworker.testing.checks import CheckResult, check_idempotent, check_order_independent
from amiworker.testing.fakeami import RecordingAMI
from amiworker.testing.harness import DEFAULT_HANDLERS, HandlerRun, Harness
from amiworker.testing.snapshots import Snapshot

__all__ = ["SyncHarness"]

T = TypeVar("T")


class SyncHarness:
    """A :class:`Harness` whose methods block; same arguments (see there)."""

    def __init__(
        self, handlers: str | Sequence[str] | HandlerRegistry = DEFAULT_HANDLERS, **options: Any
    ) -> None:
        #: The asynchronous harness underneath (its coroutines run on any loop).
        self.harness = Harness(handlers, **options)
        self._thread: ThreadPoolExecutor | None = None
        self._runner: asyncio.Runner | None = None

    def call(self, function: Callable[[], Awaitable[T]]) -> T:
        """Run ``function()``'s coroutine on the harness's loop; return its result.

        For what the methods do not cover:
        ``h.call(lambda: h.db["rates"].insert_one({"_id": "100", "cents": 3}))``.
        """
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="amiworker-harness")

        async def main() -> T:
            return await function()

        def in_thread() -> T:
            if self._runner is None:
                self._runner = asyncio.Runner()
            return self._runner.run(main())

        return self._thread.submit(in_thread).result()

    # -- the harness's own ---------------------------------------------------------------------

    def load(
        self, handlers: str | Sequence[str] | HandlerRegistry, *, app_dir: str | Path | None = None
    ) -> SyncHarness:
        """Use these handler modules (imported when first needed) or this registry."""
        self.harness.load(handlers, app_dir=app_dir)
        return self

    @property
    def registry(self) -> HandlerRegistry:
        return self.harness.registry

    @property
    def db(self) -> Any:
        """``ctx.db`` (asynchronous: use :meth:`documents`, :meth:`find_one` or :meth:`call`)."""
        return self.harness.db

    @property
    def ami(self) -> RecordingAMI | None:
        return self.harness.ami

    @property
    def runs(self) -> list[HandlerRun]:
        return self.harness.runs

    @property
    def failures(self) -> list[HandlerRun]:
        return self.harness.failures

    @property
    def records(self) -> list[Any]:
        return self.harness.records

    @property
    def log_messages(self) -> list[str]:
        return self.harness.log_messages

    def run(self, events: Iterable[Message], *, raise_failures: bool = True) -> list[HandlerRun]:
        """:meth:`Harness.run <amiworker.testing.harness.Harness.run>`, blocking."""
        events = list(events)
        return self.call(lambda: self.harness.run(events, raise_failures=raise_failures))

    def documents(
        self, collection: str, filter: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        return self.call(lambda: self.harness.documents(collection, filter))

    def find_one(self, collection: str, filter: dict[str, Any]) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.call(
            lambda: self.harness.db[collection].find_one(filter)
        )
        return found

    def snapshot(self) -> Snapshot:
        return self.call(self.harness.snapshot)

    def reset(self) -> None:
        self.harness.reset()

    # -- the checks ------------------------------------------------------------------------------

    def check_idempotent(self, events: Iterable[Message], **options: Any) -> CheckResult:
        """:func:`~amiworker.testing.checks.check_idempotent` on this harness, blocking."""
        events = list(events)
        return self.call(lambda: check_idempotent(self.harness, events, **options))

    def check_order_independent(self, events: Iterable[Message], **options: Any) -> CheckResult:
        """:func:`~amiworker.testing.checks.check_order_independent` on this harness, blocking."""
        events = list(events)
        return self.call(lambda: check_order_independent(self.harness, events, **options))

    # -- life ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the loop and its thread (the harness stays usable: they start again)."""
        thread, runner = self._thread, self._runner
        self._thread = self._runner = None
        if thread is not None:
            if runner is not None:
                thread.submit(runner.close).result()
            thread.shutdown()

    def __enter__(self) -> SyncHarness:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SyncHarness {self.harness!r}>"
