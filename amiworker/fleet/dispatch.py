"""Handler discovery and invocation.

A handler module is a plain Python module (``handlers/calls.py``); every
module-level function named ``<Event>Handler`` handles that AMI event, the
event name matched without regard to case (``NewconnectedlineHandler`` and
``NewConnectedLineHandler`` both handle ``NewConnectedLine``). Handlers take
``(ctx: HandlerContext, event: Message)``; ``async def`` handlers run on the
event loop, plain functions in a thread so they cannot stall the AMI readers.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import importlib
import inspect
import logging
import os
import sys
import sysconfig
import traceback
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Final, TypeAlias

from amiworker.ami.message import Message
from amiworker.fleet.handler_threads import ThreadRun, abandoned_runs, describe_abandoned

__all__ = [
    "Handler",
    "HandlerContext",
    "HandlerImportError",
    "HandlerRegistry",
    "HandlerTimeout",
    "describe_exception",
    "handler_name",
    "invoke",
    "load_handlers",
    "run_handlers",
]

log = logging.getLogger(__name__)

SUFFIX: Final = "Handler"
HANDLERS_SETTING: Final = "AMIWORKER_HANDLERS"

Handler: TypeAlias = Callable[["HandlerContext", Message], Awaitable[None] | None]


@dataclass(slots=True)
class HandlerContext:
    """What a handler gets besides the event.

    ``ami`` is the live connection to the PBX the event came from (send
    actions with it); ``db`` the MongoDB database of the event log, opened
    with the configured driver, for the handler's own collections.
    """

    server: str
    ami: Any
    db: Any
    worker_id: str
    log: logging.LoggerAdapter[logging.Logger] = field(repr=False)
    #: The stored event's ``_id`` (its dedup key), the same in every worker: a
    #: natural idempotency key. None for an event handled by every worker.
    event_id: str | None = None

    @classmethod
    def create(
        cls, *, server: str, ami: Any, db: Any, worker_id: str, event_id: str | None = None
    ) -> HandlerContext:
        """A context whose ``log`` carries ``worker_id`` and ``server`` in every record."""
        adapter = logging.LoggerAdapter(
            logging.getLogger("amiworker.handlers"), {"worker_id": worker_id, "server": server}
        )
        return cls(
            server=server, ami=ami, db=db, worker_id=worker_id, log=adapter, event_id=event_id
        )


class HandlerImportError(Exception):
    """A handler module failed to import; ``str()`` is one line saying what to do."""

    def __init__(self, module: str, message: str) -> None:
        super().__init__(message)
        self.module = module


class HandlerTimeout(Exception):
    """A handler ran longer than ``handler_timeout``."""


class HandlerRegistry:
    """The handlers of each event, looked up by lower-cased event name."""

    def __init__(
        self, modules: Sequence[str] = (), handlers: Iterable[tuple[str, Handler]] = ()
    ) -> None:
        """``handlers``: ``(attribute name, handler)`` pairs in run order, the
        attribute name being ``<Event>Handler`` (the handler itself may be a
        partial or an alias with another ``__name__``)."""
        self.modules = tuple(modules)
        by_event: dict[str, list[Handler]] = {}
        spelling: dict[str, str] = {}
        for attribute, handler in handlers:
            event = attribute[: -len(SUFFIX)]
            found = by_event.setdefault(event.lower(), [])
            # One function reached twice (a package re-exporting a module that
            # is also listed) still runs once per event.
            if not any(handler is known for known in found):
                found.append(handler)
            spelling.setdefault(event.lower(), event)
        self._by_event = {event: tuple(found) for event, found in by_event.items()}
        self._spelling = spelling

    def handlers_for(self, event_name: str) -> tuple[Handler, ...]:
        """Every handler of ``event_name`` (any case), in module order; () if none."""
        return self._by_event.get(event_name.lower(), ())

    def event_names(self) -> list[str]:
        """The handled event names, spelled as by their first handler."""
        return sorted(self._spelling.values())

    def __len__(self) -> int:
        return sum(len(found) for found in self._by_event.values())

    def __repr__(self) -> str:
        return f"<HandlerRegistry {len(self)} handler(s) for {', '.join(self.event_names())}>"


def load_handlers(module_names: Sequence[str], app_dir: Path | str = ".") -> HandlerRegistry:
    """Import the handler modules from ``app_dir`` (put first on ``sys.path``).

    Raises :class:`HandlerImportError` for the first module that fails to
    import. A module without any handler is logged as a warning.
    """
    directory = Path(app_dir).resolve()
    if not sys.path or sys.path[0] != str(directory):
        sys.path.insert(0, str(directory))
    importlib.invalidate_caches()  # modules written since the last import are found
    handlers: list[tuple[str, Handler]] = []
    for name in module_names:
        module = _import(name, directory)
        found = list(_handlers_in(module))
        if not found:
            log.warning(
                "handler module %r defines no <Event>Handler function: nothing in it will run",
                name,
            )
        handlers += found
    return HandlerRegistry(module_names, handlers)


def _import(name: str, directory: Path) -> ModuleType:
    try:
        return importlib.import_module(name)
    except (Exception, SystemExit) as exc:
        raise HandlerImportError(
            name,
            f"handler module {name!r} failed to import: {describe_exception(exc)} "
            f"(looked in {directory}; fix it or remove it from the handlers setting: "
            f"--handlers, {HANDLERS_SETTING} or handlers in the config file)",
        ) from exc


def _handlers_in(module: ModuleType) -> Iterable[tuple[str, Handler]]:
    for attribute, value in vars(module).items():
        if (
            attribute.endswith(SUFFIX)
            and len(attribute) > len(SUFFIX)
            and callable(value)
            # A class is no handler: logging.StreamHandler imported into a
            # handler module must not handle a "Stream" event.
            and not isinstance(value, type)
        ):
            yield attribute, value


def handler_name(handler: Callable[..., Any], *, qualified: bool = True) -> str:
    """``calls.HangupHandler`` (or just ``HangupHandler``) for logs and errors."""
    target = handler.func if isinstance(handler, functools.partial) else handler
    name = getattr(target, "__name__", None) or type(target).__name__
    if not qualified:
        return name
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module else name


def _is_async(handler: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(handler, "__call__", None)  # noqa: B004 - an object with async __call__
    return call is not None and inspect.iscoroutinefunction(call)


async def invoke(
    handler: Handler,
    ctx: HandlerContext,
    event: Message,
    timeout: float,
    *,
    executor: Executor | None = None,
) -> None:
    """Run one handler on one event within ``timeout`` seconds.

    ``async def`` handlers are awaited. Plain functions run in a thread of
    ``executor`` (the loop's default one if None), never on the event loop;
    size it to the handler concurrency, as time spent queueing for a thread
    counts against ``timeout``. A handler still running after ``timeout``
    raises :class:`HandlerTimeout`; a coroutine is cancelled, but a thread
    cannot be stopped: it is abandoned and runs on in the background.
    The handler's own exceptions propagate unchanged.
    """
    deadline = asyncio.timeout(timeout)
    thread_run: ThreadRun | None = None
    try:
        async with deadline:
            if _is_async(handler):
                result = handler(ctx, event)
            else:
                loop = asyncio.get_running_loop()
                thread_run = ThreadRun(handler_name(handler))
                call = functools.partial(
                    thread_run, contextvars.copy_context().run, handler, ctx, event
                )
                result = await loop.run_in_executor(executor, call)
            if inspect.isawaitable(result):
                # async def, or a plain function that returned a coroutine
                # (a decorator hiding the async def): awaited on the loop.
                await result
    except TimeoutError:
        if not deadline.expired():
            raise  # the handler's own TimeoutError
        raise HandlerTimeout(_timed_out(handler, timeout, thread_run)) from None


def _timed_out(handler: Handler, timeout: float, thread_run: ThreadRun | None) -> str:
    name = handler_name(handler)
    if thread_run is None or thread_run.finished:  # a coroutine (maybe a plain function's)
        return f"{name} did not finish within {timeout:g} s (cancelled)"
    if thread_run.give_up():
        return (
            f"{name} did not finish within {timeout:g} s (its thread is abandoned and runs "
            "on until it returns: a thread cannot be stopped)"
        )
    # It waited for a thread all along: say who holds them, not blame this handler.
    abandoned = abandoned_runs()
    if abandoned:
        return (
            f"{name} did not start within {timeout:g} s: every handler thread is busy, "
            f"{sum(abandoned.values())} held by runs abandoned after handler_timeout "
            f"({describe_abandoned(abandoned)}); make those return (or async def), "
            "then restart the worker"
        )
    return (
        f"{name} did not start within {timeout:g} s: every handler thread was busy; raise "
        "handler_concurrency or make the plain handlers faster"
    )


async def run_handlers(
    registry: HandlerRegistry,
    ctx: HandlerContext,
    event: Message,
    timeout: float,
    *,
    executor: Executor | None = None,
) -> list[tuple[Handler, Exception]]:
    """Run every handler of ``event``, in registry order; return those that failed.

    One failing handler does not keep the others from running: the event is
    failed (and retried) as a whole, so all of them must be idempotent anyway.
    Cancellation propagates. Used by the worker, replay and the test kit alike.
    """
    failures: list[tuple[Handler, Exception]] = []
    for handler in registry.handlers_for(event.name):
        try:
            await invoke(handler, ctx, event, timeout, executor=executor)
        except Exception as exc:
            failures.append((handler, exc))
    return failures


# -- one-line descriptions of exceptions ---------------------------------------------------

_LIBRARY_DIRS: Final = tuple(
    {
        os.path.realpath(path)
        for key in ("stdlib", "platstdlib", "purelib", "platlib")
        if (path := sysconfig.get_paths().get(key))
    }
)


def describe_exception(exc: BaseException) -> str:
    """One line: ``ValueError: bad thing (handlers/calls.py:42)``.

    The location is the deepest frame in the user's code (not in the standard
    library, installed packages or this module); none if there is no such frame.
    """
    text = " ".join(str(exc).split())
    description = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if isinstance(exc, SyntaxError):
        return description  # its message already says "(file.py, line 3)"
    location = _location(exc)
    return f"{description} ({location})" if location else description


def _location(exc: BaseException) -> str | None:
    frames = traceback.extract_tb(exc.__traceback__)
    own = [frame for frame in frames if _is_user_code(frame.filename)]
    if not own:
        return None  # e.g. a module that is not there: only importlib's frames
    frame = own[-1]
    return f"{_display_path(frame.filename)}:{frame.lineno}"


# amiworker's own frames are never the place to look, even in an editable install:
# the package's, not only this part's (an AMI helper raising is not the culprit).
_PACKAGE_DIR: Final = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def _is_user_code(filename: str) -> bool:
    if filename.startswith("<"):  # <frozen importlib._bootstrap>, <string>
        return False
    path = os.path.realpath(filename)
    if path.startswith(_PACKAGE_DIR + os.sep):
        return False
    return not any(path.startswith(library + os.sep) for library in _LIBRARY_DIRS)


def _display_path(filename: str) -> str:
    """Relative to the current directory when below it, else as is."""
    try:
        relative = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if relative.startswith("..") else relative
