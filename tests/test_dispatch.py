"""Handler discovery (case-insensitive, in module order), import failures as
one line, and invocation: async on the loop, sync in a thread, timeouts."""

from __future__ import annotations

import asyncio
import logging
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from amiworker.ami.message import Message
from amiworker.ami.protocol import Parser
from amiworker.fleet.dispatch import (
    HandlerContext,
    HandlerImportError,
    HandlerRegistry,
    HandlerTimeout,
    describe_exception,
    handler_name,
    invoke,
    load_handlers,
)
from amiworker.fleet.handler_threads import abandoned_runs

EVENT = Parser(banner=False).feed(b"Event: Hangup\r\nUniqueid: 1.2\r\nCause: 16\r\n\r\n")[0]

WriteModule = Callable[[str], str]


@pytest.fixture
def app_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory of handler modules; sys.path and sys.modules restored afterwards."""
    path_before = list(sys.path)
    modules_before = set(sys.modules)
    yield tmp_path
    sys.path[:] = path_before
    for name in set(sys.modules) - modules_before:
        del sys.modules[name]


@pytest.fixture
def write_module(app_dir: Path) -> WriteModule:
    """Write a module with a unique name into app_dir; return its name."""

    def write(source: str) -> str:
        name = f"handlers_{uuid.uuid4().hex[:10]}"
        (app_dir / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        return name

    return write


def call(handler: Any) -> Any:
    """Call a test module's handler directly (they ignore their arguments)."""
    return handler(None, None)


def context() -> HandlerContext:
    return HandlerContext.create(server="pbx1", ami=None, db=None, worker_id="worker-a")


# -- discovery ----------------------------------------------------------------------------


def test_event_names_match_without_regard_to_case(app_dir: Path, write_module: WriteModule) -> None:
    name = write_module(
        """
        def NewconnectedlineHandler(ctx, event): ...
        def NewConnectedLineHandler(ctx, event): ...
        async def hangupHandler(ctx, event): ...
        """
    )
    registry = load_handlers([name], app_dir)
    found = registry.handlers_for("NewConnectedLine")
    assert [h.__name__ for h in found] == ["NewconnectedlineHandler", "NewConnectedLineHandler"]
    assert registry.handlers_for("NEWCONNECTEDLINE") == found
    assert [h.__name__ for h in registry.handlers_for("Hangup")] == ["hangupHandler"]
    assert registry.handlers_for("Newchannel") == ()
    assert registry.event_names() == ["Newconnectedline", "hangup"]
    assert len(registry) == 3


def test_only_functions_named_event_handler_count(app_dir: Path, write_module: WriteModule) -> None:
    name = write_module(
        """
        import functools
        from logging import StreamHandler, NullHandler

        HangupHandler_count = 0
        VarSetHandler = 42
        def Handler(ctx, event): ...
        def hangup_handler(ctx, event): ...
        def helper(ctx, event): ...
        def _base(ctx, event, extra): ...
        NewstateHandler = functools.partial(_base, extra=1)
        """
    )
    registry = load_handlers([name], app_dir)
    assert registry.event_names() == ["Newstate"]  # the partial; no class, no constant
    assert registry.handlers_for("Stream") == ()
    assert handler_name(registry.handlers_for("newstate")[0]) == f"{name}._base"


def test_several_modules_handle_one_event_in_module_order(
    app_dir: Path, write_module: WriteModule
) -> None:
    first = write_module("def HangupHandler(ctx, event): return 'first'\n")
    second = write_module("def HANGUPHandler(ctx, event): return 'second'\n")
    registry = load_handlers([second, first], app_dir)
    assert [call(h) for h in registry.handlers_for("Hangup")] == ["second", "first"]


def test_module_without_handlers_is_a_warning(
    app_dir: Path, write_module: WriteModule, caplog: pytest.LogCaptureFixture
) -> None:
    name = write_module("def helper(): ...\n")
    with caplog.at_level(logging.WARNING, logger="amiworker.fleet.dispatch"):
        registry = load_handlers([name], app_dir)
    assert len(registry) == 0
    assert f"handler module {name!r} defines no <Event>Handler function" in caplog.text


def test_modules_and_packages_load_from_app_dir(app_dir: Path) -> None:
    package = f"pkg_{uuid.uuid4().hex[:10]}"
    (app_dir / package).mkdir()
    (app_dir / package / "__init__.py").write_text("")
    (app_dir / package / "billing.py").write_text(
        "from . import rates\ndef HangupHandler(ctx, event): return rates.RATE\n"
    )
    (app_dir / package / "rates.py").write_text("RATE = 7\n")
    registry = load_handlers([f"{package}.billing"], app_dir)
    assert call(registry.handlers_for("hangup")[0]) == 7
    assert sys.path[0] == str(app_dir.resolve())


# -- import failures -----------------------------------------------------------------------


def import_error(app_dir: Path, name: str) -> str:
    with pytest.raises(HandlerImportError) as info:
        load_handlers([name], app_dir)
    assert info.value.module == name
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_module(app_dir: Path) -> None:
    assert import_error(app_dir, "billing_does_not_exist") == (
        "handler module 'billing_does_not_exist' failed to import: ModuleNotFoundError: "
        f"No module named 'billing_does_not_exist' (looked in {app_dir.resolve()}; fix it or "
        "remove it from the handlers setting: --handlers, AMIWORKER_HANDLERS or handlers in "
        "the config file)"
    )


def test_syntax_error(app_dir: Path, write_module: WriteModule) -> None:
    name = write_module("def HangupHandler(ctx, event):\n    return (\n")
    message = import_error(app_dir, name)
    assert message.startswith(f"handler module {name!r} failed to import: SyntaxError: ")
    assert f"({name}.py, line 2)" in message
    assert message.endswith(
        "fix it or remove it from the handlers setting: --handlers, "
        "AMIWORKER_HANDLERS or handlers in the config file)"
    )


def test_exception_at_import_names_the_line(app_dir: Path, write_module: WriteModule) -> None:
    name = write_module("import os\n\nRATE = 1 / 0\n")
    message = import_error(app_dir, name)
    assert message.startswith(
        f"handler module {name!r} failed to import: ZeroDivisionError: division by zero ("
    )
    assert f"{name}.py:3)" in message


def test_missing_dependency_names_the_importing_line(
    app_dir: Path, write_module: WriteModule
) -> None:
    name = write_module("\nimport requests_that_are_not_installed\n")
    message = import_error(app_dir, name)
    assert "ModuleNotFoundError: No module named 'requests_that_are_not_installed' (" in message
    assert f"{name}.py:2)" in message


def test_sys_exit_at_import(app_dir: Path, write_module: WriteModule) -> None:
    name = write_module("import sys\nsys.exit(3)\n")
    assert "failed to import: SystemExit: 3 (" in import_error(app_dir, name)


def test_first_broken_module_stops_loading(app_dir: Path, write_module: WriteModule) -> None:
    good = write_module("def HangupHandler(ctx, event): ...\n")
    with pytest.raises(HandlerImportError, match="'nope_missing_module'"):
        load_handlers([good, "nope_missing_module"], app_dir)


# -- invocation -----------------------------------------------------------------------------


async def test_sync_handler_runs_in_a_thread() -> None:
    seen: list[tuple[int, str, str]] = []

    def HangupHandler(ctx: HandlerContext, event: Message) -> None:
        seen.append((threading.get_ident(), ctx.server, event["cause"]))

    await invoke(HangupHandler, context(), EVENT, timeout=5)
    assert len(seen) == 1
    thread, server, cause = seen[0]
    assert thread != threading.get_ident()
    assert (server, cause) == ("pbx1", "16")


async def test_async_handler_runs_on_the_loop() -> None:
    seen: list[int] = []

    async def HangupHandler(ctx: HandlerContext, event: Message) -> None:
        await asyncio.sleep(0)
        seen.append(threading.get_ident())

    await invoke(HangupHandler, context(), EVENT, timeout=5)
    assert seen == [threading.get_ident()]


async def test_callable_object_with_async_call() -> None:
    class Counter:
        calls = 0

        async def __call__(self, ctx: HandlerContext, event: Message) -> None:
            self.calls += 1

    counter = Counter()
    await invoke(counter, context(), EVENT, timeout=5)
    assert counter.calls == 1


async def test_sync_function_returning_a_coroutine_is_awaited() -> None:
    done: list[bool] = []

    async def work() -> None:
        done.append(True)

    def HangupHandler(ctx: HandlerContext, event: Message) -> Any:
        return work()

    await invoke(HangupHandler, context(), EVENT, timeout=5)
    assert done == [True]


async def test_async_timeout_cancels() -> None:
    cancelled = asyncio.Event()

    async def HangupHandler(ctx: HandlerContext, event: Message) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(HandlerTimeout, match=r"HangupHandler did not finish within 0.05 s"):
        await invoke(HangupHandler, context(), EVENT, timeout=0.05)
    assert cancelled.is_set()


async def test_sync_timeout_abandons_the_thread() -> None:
    release = threading.Event()
    finished = threading.Event()

    def HangupHandler(ctx: HandlerContext, event: Message) -> None:
        release.wait(10)
        finished.set()

    try:
        with pytest.raises(HandlerTimeout, match="its thread is abandoned"):
            await invoke(HangupHandler, context(), EVENT, timeout=0.05)
        assert not finished.is_set()  # still running when invoke gave up
    finally:
        release.set()
    await asyncio.to_thread(finished.wait, 5)
    assert finished.is_set()


async def test_runs_that_wait_for_a_thread_held_by_abandoned_runs_blame_those_and_never_run() -> (
    None
):
    """A plain handler that never returns, abandoned once per thread of the pool, holds
    them all: a quick handler then times out waiting for a thread. Its error names the
    handler holding them, not itself, and it does not run late once a thread frees
    (its event is retried instead); the abandoned runs are counted until they return."""
    release = threading.Event()
    quick_runs: list[int] = []

    # Named for this test alone: abandoned runs are counted process-wide, by name.
    def NeverReturnsHandler(ctx: HandlerContext, event: Message) -> None:
        release.wait(10)

    def NewchannelHandler(ctx: HandlerContext, event: Message) -> None:
        quick_runs.append(1)

    hung, quick = handler_name(NeverReturnsHandler), handler_name(NewchannelHandler)
    pool = ThreadPoolExecutor(2, "test-handler")
    try:
        for _ in range(2):
            with pytest.raises(HandlerTimeout, match="its thread is abandoned"):
                await invoke(NeverReturnsHandler, context(), EVENT, timeout=0.05, executor=pool)
        assert abandoned_runs()[hung] == 2
        with pytest.raises(HandlerTimeout) as info:
            await invoke(NewchannelHandler, context(), EVENT, timeout=0.05, executor=pool)
        message = str(info.value)
        assert message.startswith(
            f"{quick} did not start within 0.05 s: every handler thread is busy, "
        )
        assert f"held by runs abandoned after handler_timeout (2 run(s) of {hung}" in message
        assert message.endswith("; make those return (or async def), then restart the worker")
    finally:
        release.set()
        await asyncio.to_thread(pool.shutdown, wait=True)
    assert quick_runs == [], "given up before it started: never run late"
    assert hung not in abandoned_runs()
    await invoke(NewchannelHandler, context(), EVENT, timeout=5)
    assert quick_runs == [1]


async def test_a_run_that_waits_for_a_thread_busy_with_slow_runs_says_so() -> None:
    release, started = threading.Event(), threading.Event()

    def HangupHandler(ctx: HandlerContext, event: Message) -> None:
        started.set()
        release.wait(10)  # slow, within its timeout

    def NewchannelHandler(ctx: HandlerContext, event: Message) -> None:
        pass

    pool = ThreadPoolExecutor(1, "test-handler")
    slow = asyncio.create_task(invoke(HangupHandler, context(), EVENT, 30, executor=pool))
    try:
        await asyncio.to_thread(started.wait, 5)
        with pytest.raises(HandlerTimeout) as info:
            await invoke(NewchannelHandler, context(), EVENT, timeout=0.05, executor=pool)
        assert str(info.value).endswith(
            "did not start within 0.05 s: every handler thread was busy; raise "
            "handler_concurrency or make the plain handlers faster"
        )
    finally:
        release.set()
        await slow
        await asyncio.to_thread(pool.shutdown, wait=True)


async def test_handler_exceptions_propagate_unchanged() -> None:
    def sync_handler(ctx: HandlerContext, event: Message) -> None:
        raise ValueError("bad thing")

    async def async_handler(ctx: HandlerContext, event: Message) -> None:
        raise TimeoutError("the handler's own timeout")

    with pytest.raises(ValueError, match="bad thing"):
        await invoke(sync_handler, context(), EVENT, timeout=5)
    with pytest.raises(TimeoutError, match="the handler's own timeout") as info:
        await invoke(async_handler, context(), EVENT, timeout=5)
    assert not isinstance(info.value, HandlerTimeout)


async def test_describe_exception_of_a_handler(app_dir: Path, write_module: WriteModule) -> None:
    name = write_module(
        """
        import json

        def HangupHandler(ctx, event):
            raise ValueError("bad\\n thing")

        def NewstateHandler(ctx, event):
            json.loads("{")
        """
    )
    registry = load_handlers([name], app_dir)
    for event, expected in (
        ("Hangup", f"ValueError: bad thing ({app_dir / name}.py:5)"),
        ("Newstate", f"({app_dir / name}.py:8)"),  # the user's line, not json's
    ):
        with pytest.raises(Exception) as info:
            await invoke(registry.handlers_for(event)[0], context(), EVENT, timeout=5)
        description = describe_exception(info.value)
        assert description.endswith(expected), description
        assert "\n" not in description


def test_describe_exception_without_message_or_traceback() -> None:
    assert describe_exception(KeyError()) == "KeyError"
    assert describe_exception(RuntimeError("x")) == "RuntimeError: x"


def test_describe_exception_path_relative_to_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).parent.parent)
    try:
        raise ValueError("here")
    except ValueError as exc:
        description = describe_exception(exc)
    assert description.startswith("ValueError: here (tests/test_dispatch.py:")


def test_context_log_carries_worker_and_server(caplog: pytest.LogCaptureFixture) -> None:
    ctx = context()
    with caplog.at_level(logging.INFO, logger="amiworker.handlers"):
        ctx.log.info("hello")
    record = caplog.records[-1]
    assert (record.worker_id, record.server) == ("worker-a", "pbx1")  # type: ignore[attr-defined]
    assert "log" not in repr(ctx)


def test_empty_registry() -> None:
    registry = HandlerRegistry()
    assert registry.handlers_for("Hangup") == () and len(registry) == 0
