"""The harness: handler modules run on events as a worker runs them, with no server.

Each event gets a real :class:`~amiworker.fleet.dispatch.HandlerContext`:

- ``ctx.db``: an in-memory MongoDB database (mongomock-motor), the same for
  every run of this harness (:attr:`Harness.db`); asynchronous, as a worker's:
  a plain function handler that touches it (or ``ctx.ami``) gets a
  RuntimeError saying so, where a worker would silently do nothing;
- ``ctx.ami``: a :class:`~amiworker.testing.fakeami.RecordingAMI` that records
  every action and answers ``Success`` unless told otherwise (:attr:`Harness.ami`);
  None with ``ami_connected=False``, as while a worker reconnects, or in a replay;
- ``ctx.log``: a logger whose records are kept in :attr:`Harness.records`;
- ``ctx.event_id``: the key a worker would store the event under (a digest of
  the PBX name and the event's bytes, :class:`~amiworker.fleet.dedup.DedupKeys`),
  None for an event that does not race (handled by every worker);
- ``ctx.server`` and ``ctx.worker_id`` as given.

Handlers run as the worker runs them, through the same
:func:`~amiworker.fleet.dispatch.invoke`: ``async def`` ones on the event loop,
plain functions in a thread, within ``timeout``. The events run one at a time
in the order given, which keeps the order of each call (``order_key`` of
:mod:`amiworker.fleet.scheduler`) as a worker does; one at a time, so that a
run can be reproduced. :mod:`amiworker.testing.checks` runs them in the other
orders a fleet allows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from amiworker.ami.message import Message
from amiworker.fleet.dedup import DedupKeys, RaceMode, races
from amiworker.fleet.dispatch import (
    Handler,
    HandlerContext,
    HandlerRegistry,
    describe_exception,
    handler_name,
    invoke,
    load_handlers,
)
from amiworker.fleet.scheduler import order_key
from amiworker.testing.fakeami import RUNNING, RecordingAMI
from amiworker.testing.memory import memory_database
from amiworker.testing.snapshots import Snapshot, snapshot
from amiworker.timeparse import timestamp_micros

__all__ = [
    "DEFAULT_HANDLERS",
    "Delivery",
    "HandlerRun",
    "Harness",
    "Observer",
    "describe_event",
]

DEFAULT_HANDLERS: Final = "handlers"


def describe_event(event: Message, index: int | None = None) -> str:
    """``Hangup #12 (Uniqueid 1795675581.1, Linkedid 1795675581.0, Timestamp 1795675582.0561)``."""
    shown = [
        f"{name} {value}"
        for name, value in event.headers
        if name.lower().endswith(("uniqueid", "linkedid")) or name.lower() == "timestamp"
    ][:3]
    where = f" #{index}" if index is not None else ""
    return f"{event.name}{where}" + (f" ({', '.join(shown)})" if shown else "")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event as the fleet receives it."""

    #: The event's place in the list given (0 is the first).
    index: int
    event: Message
    #: The key a worker stores it under (``ctx.event_id``); None when it does not
    #: race, so that every worker handles it.
    event_id: str | None
    #: Events with the same key run in order (``order_key``: the call, else the channel).
    call: str


@dataclass(slots=True)
class HandlerRun:
    """One handler run on one event."""

    handler: Handler
    delivery: Delivery
    worker_id: str
    #: What the handler raised (or HandlerTimeout); None when it returned.
    error: Exception | None = None
    #: True for the second run of an event (a re-run, as after a crash).
    repeat: bool = False

    @property
    def name(self) -> str:
        """The handler, ``module.<Event>Handler``."""
        return handler_name(self.handler)

    @property
    def event(self) -> Message:
        return self.delivery.event

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        """``calls.HangupHandler on Hangup #12 (...)``, then the error with its own file:line."""
        where = f"{self.name} on {describe_event(self.event, self.delivery.index)}"
        return where if self.error is None else f"{where}: {describe_exception(self.error)}"


#: Called after each handler run with the run and the database it ran against.
Observer = Callable[[HandlerRun, Any], Awaitable[None]]


class _LoopOnly:
    """``ctx.db`` and ``ctx.ami`` as handlers get them: the same object, except that a
    plain function handler (run in a thread, with no event loop) may not use it.

    In a worker such a handler's ``ctx.db["x"].update_one(...)`` makes a coroutine
    nobody awaits, and silently writes nothing; here it raises, naming the cure.
    """

    __slots__ = ("_target", "_what")

    def __init__(self, target: Any, what: str) -> None:
        self._target = target
        self._what = what

    def _check(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                f"{self._what} is asynchronous, and this handler is a plain function, run in "
                "a thread with no event loop: it cannot await it (nothing would happen). Make "
                "the handler async def, or give it a synchronous client of its own"
            ) from None

    def __getattr__(self, name: str) -> Any:
        self._check()
        return getattr(self._target, name)

    def __getitem__(self, name: str) -> Any:
        self._check()
        return self._target[name]

    def __repr__(self) -> str:
        return repr(self._target)


class _Records(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self._records = records

    def emit(self, record: logging.LogRecord) -> None:
        self._records.append(record)


class Harness:
    """Runs events through handler modules, as a worker would, on an in-memory database.

    ``handlers``: module names (a list, or one string, comma-separated) imported
    from ``app_dir`` when first needed, or a loaded registry. ``race`` and
    ``dedup_window`` are the settings of the same names: which events race, and
    how ``ctx.event_id`` tells byte-identical events apart. ``timeout`` is the
    ``handler_timeout`` each run gets.
    """

    def __init__(
        self,
        handlers: str | Sequence[str] | HandlerRegistry = DEFAULT_HANDLERS,
        *,
        app_dir: str | Path = ".",
        server: str = "pbx1",
        worker_id: str = "harness",
        race: RaceMode = "channel",
        dedup_window: float = 10.0,
        timeout: float = 30.0,
        ami_connected: bool = True,
        database: str = "amiworker",
    ) -> None:
        self.server = server
        self.worker_id = worker_id
        self.race: RaceMode = race
        self.dedup_window = dedup_window
        self.timeout = timeout
        self.database_name = database
        self._registry: HandlerRegistry | None = None
        self._modules: list[str] = []
        self._app_dir = Path(app_dir)
        self.load(handlers)
        #: ``ctx.db``: kept across runs until :meth:`reset`.
        self.db: Any = memory_database(database)
        #: ``ctx.ami``: records actions, answers from its table (None when not connected).
        self.ami: RecordingAMI | None = RecordingAMI(server) if ami_connected else None
        #: What handlers logged through ``ctx.log``, every level.
        self.records: list[logging.LogRecord] = []
        #: Every handler run of :meth:`run`, in order.
        self.runs: list[HandlerRun] = []
        self.logger = logging.Logger("amiworker.handlers", logging.DEBUG)
        # Also passed on to "amiworker.handlers" (and pytest's caplog); set
        # ``harness.logger.propagate = False`` for silence.
        self.logger.parent = logging.getLogger("amiworker.handlers")
        self.logger.addHandler(_Records(self.records))

    # -- what runs ---------------------------------------------------------------------------

    def load(
        self, handlers: str | Sequence[str] | HandlerRegistry, *, app_dir: str | Path | None = None
    ) -> Harness:
        """Use these handler modules (imported when first needed) or this registry."""
        if app_dir is not None:
            self._app_dir = Path(app_dir)
        if isinstance(handlers, HandlerRegistry):
            self._registry = handlers
            self._modules = list(handlers.modules)
            return self
        names = [handlers] if isinstance(handlers, str) else list(handlers)
        self._modules = [part.strip() for name in names for part in name.split(",") if part.strip()]
        self._registry = None
        return self

    @property
    def registry(self) -> HandlerRegistry:
        """The handlers, imported on first use (raises HandlerImportError, one line)."""
        if self._registry is None:
            self._registry = load_handlers(self._modules, self._app_dir)
        return self._registry

    @property
    def modules(self) -> list[str]:
        return list(self._modules)

    def plan(self, events: Iterable[Message]) -> list[Delivery]:
        """The events that have a handler, each with the key a worker would store it under.

        The keys are those of a worker receiving these events in this order: the
        same events planned again get the same keys, as a re-run does.
        """
        registry = self.registry
        keys = DedupKeys(self.server, self.dedup_window)
        clock = 0.0  # the dedup window ages on the events' own time
        planned: list[Delivery] = []
        for index, event in enumerate(events):
            micros = timestamp_micros(event.get("Timestamp"))
            if micros is not None:
                clock = micros / 1e6
            event_id = keys.key(event.raw, clock) if races(event, self.race) else None
            if registry.handlers_for(event.name):
                planned.append(Delivery(index, event, event_id, order_key(self.server, event)))
        return planned

    # -- running ------------------------------------------------------------------------------

    async def run(
        self, events: Iterable[Message], *, raise_failures: bool = True
    ) -> list[HandlerRun]:
        """Run every handler of every event, in order, against :attr:`db`; return the runs.

        A failing handler does not stop the others (as in a worker). With
        ``raise_failures`` (the default), the first failure is raised once all
        have run, with a note naming the handler and the event.
        """
        runs: list[HandlerRun] = []
        for delivery in self.plan(events):
            runs += await self.run_delivery(delivery, db=self.db, ami=self.ami)
        self.runs += runs
        failed = [run for run in runs if run.error is not None]
        if raise_failures and failed:
            error = failed[0].error
            assert error is not None
            more = f" ({len(failed) - 1} more failed run(s))" if len(failed) > 1 else ""
            error.add_note(f"amiworker.testing: in {failed[0].describe()}{more}")
            raise error
        return runs

    async def run_delivery(
        self,
        delivery: Delivery,
        *,
        db: Any,
        ami: RecordingAMI | None,
        worker_id: str | None = None,
        log: logging.Logger | None = None,
        repeat: bool = False,
        observe: Observer | None = None,
    ) -> list[HandlerRun]:
        """Run every handler of one event, with a context as a worker builds it."""
        worker = worker_id or self.worker_id
        ctx = HandlerContext(
            server=self.server,
            ami=None if ami is None else _LoopOnly(ami, "ctx.ami"),
            db=_LoopOnly(db, "ctx.db"),
            worker_id=worker,
            log=logging.LoggerAdapter(
                log or self.logger, {"worker_id": worker, "server": self.server}
            ),
            event_id=delivery.event_id,
        )
        runs: list[HandlerRun] = []
        token = RUNNING.set((delivery.event_id, delivery.event.name))
        try:
            for handler in self.registry.handlers_for(delivery.event.name):
                run = HandlerRun(handler, delivery, worker, repeat=repeat)
                try:
                    await invoke(handler, ctx, delivery.event, self.timeout)
                except Exception as exc:
                    run.error = exc
                runs.append(run)
                if observe is not None:
                    await observe(run, db)
        finally:
            RUNNING.reset(token)
        return runs

    # -- what it left ---------------------------------------------------------------------------

    @property
    def failures(self) -> list[HandlerRun]:
        """The runs of :meth:`run` that raised."""
        return [run for run in self.runs if run.error is not None]

    @property
    def log_messages(self) -> list[str]:
        """What handlers logged, as ``LEVEL message`` lines."""
        return [f"{record.levelname} {record.getMessage()}" for record in self.records]

    async def documents(
        self, collection: str, filter: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """The documents of ``collection`` in :attr:`db` (matching ``filter``), as stored."""
        return [doc async for doc in self.db[collection].find(filter or {})]

    async def snapshot(self) -> Snapshot:
        """Every document of every collection of :attr:`db`."""
        return await snapshot(self.db)

    def reset(self) -> None:
        """An empty database, no actions, records or runs (answers set on the AMI stay)."""
        self.db = memory_database(self.database_name)
        if self.ami is not None:
            self.ami.clear()
        self.records.clear()
        self.runs.clear()

    def handlers(self) -> list[Handler]:
        """Every handler, once each, in registry order."""
        seen: list[Handler] = []
        for name in self.registry.event_names():
            for handler in self.registry.handlers_for(name):
                if not any(handler is known for known in seen):
                    seen.append(handler)
        return seen

    def __repr__(self) -> str:
        return f"<Harness {', '.join(self._modules) or 'registry'} on {self.server}>"
