"""The two properties a fleet needs of its handlers, checked in memory.

**Idempotent**: a worker killed mid-handler has its events re-run by another
worker. :func:`check_idempotent` runs every event twice in a row and compares
the database with the one left by running each event once.

**Order-independent**: the events of one call may be won by different
workers and run at the same time, in different processes; only the events one
worker won keep their order. :func:`check_order_independent` splits each
call's events between simulated workers, runs the workers' parts interleaved
(each part in order; events that do not race run in every worker), and
compares the database with the one left by running the events in order. The
interleavings are chosen from ``seed``: the first runs each call's later part
first, the others put each event on a random worker and interleave the workers
at random.

Both start every run from a copy of the harness's database (what a test put
there first: reference data, unique indexes), with a fresh recording AMI
answering from the harness's table. A check fails on the first document that
differs (see :mod:`amiworker.testing.snapshots` for what "differs" means), or
on a handler that raises where it did not in the reference run; the result
names the handler and the event, found by running the scenario again while
watching that document.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

from amiworker.ami.message import Message
from amiworker.fleet.dispatch import Handler, HandlerRegistry, describe_exception
from amiworker.testing.harness import (
    Delivery,
    HandlerRun,
    Harness,
    Observer,
    describe_event,
)
from amiworker.testing.memory import memory_database
from amiworker.testing.snapshots import (
    Difference,
    Snapshot,
    canonical,
    copy_database,
    field_value,
    first_difference,
    snapshot,
)

__all__ = [
    "CheckResult",
    "Checker",
    "Pass",
    "Scenario",
    "Step",
    "Target",
    "check_idempotent",
    "check_order_independent",
    "plan_interleavings",
    "restricted",
    "run_scenario",
]

#: What a check runs: a harness, handler module names, or a registry.
Target: TypeAlias = Harness | str | Sequence[str] | HandlerRegistry
CheckName = Literal["idempotent", "order-independent"]

_QUIET: Final = logging.Logger("amiworker.handlers.check")
_QUIET.disabled = True  # ctx.log of the checks' runs goes nowhere
_REFERENCE: Final = "with each event run once, in order"
_SHOWN_ORDER: Final = 12


@dataclass(frozen=True, slots=True)
class Step:
    """One event run by one (simulated) worker."""

    delivery: Delivery
    worker_id: str
    #: The second run of the event (a re-run).
    repeat: bool = False


@dataclass(frozen=True, slots=True)
class Scenario:
    description: str
    steps: tuple[Step, ...]


@dataclass(slots=True)
class Pass:
    """What one run of a scenario left: every handler run, and the database."""

    runs: list[HandlerRun]
    snapshot: Snapshot


async def run_scenario(
    harness: Harness, steps: Iterable[Step], *, observe: Observer | None = None
) -> Pass:
    """Run ``steps`` against a copy of the harness's database; return what they left."""
    db = memory_database(harness.database_name)
    await copy_database(harness.db, db)
    ami = harness.ami.fork() if harness.ami is not None else None
    runs: list[HandlerRun] = []
    for step in steps:
        runs += await harness.run_delivery(
            step.delivery,
            db=db,
            ami=ami,
            worker_id=step.worker_id,
            log=_QUIET,
            repeat=step.repeat,
            observe=observe,
        )
    return Pass(runs, await snapshot(db))


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one check; true when the property held in every scenario run."""

    check: CheckName
    ok: bool
    #: Scenarios run (interleavings, or the one of run-twice).
    scenarios: int
    #: The scenario that failed.
    scenario: str | None = None
    #: The handler run that made the difference: the first re-run that changed the
    #: document, the last run that changed it, or the first that raised.
    culprit: HandlerRun | None = None
    difference: Difference | None = None
    #: Runs that raised in the scenario but not in the reference run (or, when runs
    #: raised in the reference run itself, those: the property was not judged).
    raised: tuple[HandlerRun, ...] = ()
    #: The same events in the same order also differ: something depends on when it runs.
    nondeterministic: bool = False
    #: How the culprit's call ran in the failing scenario.
    call_order: str | None = None
    #: The runs that were compared, per scenario.
    runs: int = 0

    def __bool__(self) -> bool:
        return self.ok

    @property
    def handler(self) -> Handler | None:
        return self.culprit.handler if self.culprit is not None else None

    @property
    def handler_name(self) -> str | None:
        return self.culprit.name if self.culprit is not None else None

    @property
    def event(self) -> Message | None:
        return self.culprit.event if self.culprit is not None else None

    def describe(self) -> str:
        if self.ok:
            return (
                f"{self.check}: yes ({self.scenarios} scenario(s), {self.runs} handler run(s) "
                "each, compared)"
            )
        lines = [f"{self.check}: NO, when {self.scenario}"]
        culprit = self.culprit
        if culprit is not None:
            if culprit.error is not None:
                how = "raised on its re-run" if culprit.repeat else "raised"
                how += f" {describe_exception(culprit.error)}"
            elif self.check == "idempotent" and culprit.repeat:
                how = "its re-run changed the document"
            else:
                how = "last changed the document"
            event = describe_event(culprit.event, culprit.delivery.index)
            lines.append(f"  handler {culprit.name} on {event} in {culprit.worker_id}: {how}")
        if self.difference is not None:
            text = self.difference.describe(_REFERENCE, "in this scenario")
            lines += ["  " + line for line in text.splitlines()]
        if self.nondeterministic:
            lines.append(
                "  the same events in the same order give another document too: a handler "
                "writes what depends on when or where it runs (the clock, random numbers, "
                "ctx.worker_id); write values that come from the event"
            )
        if self.call_order:
            lines.append(f"  that call ran: {self.call_order}")
        for more in self.raised[1:4]:
            lines.append(f"  also raised: {more.describe()}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()

    def __repr__(self) -> str:
        # What pytest shows of a failed `assert result` (cut to 240 characters unless
        # -vv): the verdict and the handler first, not the fields' reprs.
        return f"<CheckResult {self.describe()}>"


# -- scenarios -------------------------------------------------------------------------------


def _by_call(deliveries: Iterable[Delivery]) -> dict[str, list[Delivery]]:
    calls: dict[str, list[Delivery]] = {}
    for delivery in deliveries:
        calls.setdefault(delivery.call, []).append(delivery)
    return calls


def worker_ids(harness: Harness, workers: int) -> list[str]:
    return [f"{harness.worker_id}-w{n}" for n in range(workers)]


def plan_interleavings(
    harness: Harness,
    deliveries: Sequence[Delivery],
    *,
    workers: int = 2,
    count: int = 4,
    seed: int = 0,
) -> list[Scenario]:
    """``count`` orders in which ``workers`` workers may run these events (see module doc).

    Events that race go to one worker each; the others run in every worker.
    Each worker keeps the order of the events of one call it runs.
    """
    if workers < 1 or count < 1:
        raise ValueError("an interleaving needs at least one worker, and one interleaving")
    ids = worker_ids(harness, workers)
    racing = _by_call(d for d in deliveries if d.event_id is not None)
    local = _by_call(d for d in deliveries if d.event_id is None)
    scenarios: list[Scenario] = []
    for number in range(count):
        chains: list[list[Step]] = []
        if number == 0:
            # Each call cut into `workers` parts in order; the later parts run first.
            for worker in reversed(range(workers)):
                for events in racing.values():
                    size = -(-len(events) // workers)
                    part = events[worker * size : (worker + 1) * size]
                    if part:
                        chains.append([Step(d, ids[worker]) for d in part])
                chains += [[Step(d, ids[worker]) for d in events] for events in local.values()]
            steps = [step for chain in chains for step in chain]
            description = (
                f"interleaving 1 of {count}: each call's events split in order between "
                f"{workers} workers, the later part run first"
            )
        else:
            rng = random.Random(seed * 1_000_003 + number)
            parts: dict[tuple[int, str], list[Step]] = {}
            for call, events in racing.items():
                for delivery in events:
                    worker = rng.randrange(workers)
                    parts.setdefault((worker, call), []).append(Step(delivery, ids[worker]))
            for worker in range(workers):
                for call, events in local.items():
                    parts[(worker, "local " + call)] = [Step(d, ids[worker]) for d in events]
            steps = _shuffle_merge(list(parts.values()), rng)
            description = (
                f"interleaving {number + 1} of {count}: each event on a random one of "
                f"{workers} workers, the workers interleaved at random (seed {seed})"
            )
        scenarios.append(Scenario(description, tuple(steps)))
    return scenarios


def _shuffle_merge(chains: list[list[Step]], rng: random.Random) -> list[Step]:
    """A random merge of the chains, each kept in order."""
    active = [chain[::-1] for chain in chains if chain]  # popped from the end
    merged: list[Step] = []
    while active:
        at = rng.randrange(len(active))
        chain = active[at]
        merged.append(chain.pop())
        if not chain:
            active[at] = active[-1]
            active.pop()
    return merged


def _call_order(steps: Sequence[Step], call: str) -> str:
    shown = [
        f"{step.delivery.event.name}#{step.delivery.index}@{step.worker_id.rpartition('-')[2]}"
        for step in steps
        if step.delivery.call == call
    ]
    more = f" ... ({len(shown) - _SHOWN_ORDER} more)" if len(shown) > _SHOWN_ORDER else ""
    return ", ".join(shown[:_SHOWN_ORDER]) + more


# -- checking --------------------------------------------------------------------------------


def _harness(target: Target) -> Harness:
    return target if isinstance(target, Harness) else Harness(target)


def restricted(harness: Harness, without: Iterable[Handler]) -> Harness:
    """The same harness (database, AMI, settings) with some handlers left out."""
    left_out = {id(handler) for handler in without}
    registry = harness.registry
    pairs = [
        (f"{name}Handler", handler)
        for name in registry.event_names()
        for handler in registry.handlers_for(name)
        if id(handler) not in left_out
    ]
    other = Harness(
        HandlerRegistry(registry.modules, pairs),
        server=harness.server,
        worker_id=harness.worker_id,
        race=harness.race,
        dedup_window=harness.dedup_window,
        timeout=harness.timeout,
        ami_connected=harness.ami is not None,
        database=harness.database_name,
    )
    other.db, other.ami = harness.db, harness.ami
    return other


class Checker:
    """Both checks over the same events, sharing the reference run."""

    def __init__(
        self,
        harness: Harness,
        events: Iterable[Message],
        *,
        ordered_arrays: bool = False,
        ignore: Iterable[str] = (),
    ) -> None:
        self.harness = harness
        self.deliveries = harness.plan(events)
        self.ordered_arrays = ordered_arrays
        self.ignore = tuple(ignore)
        self._reference: Pass | None = None

    def once(self) -> list[Step]:
        return [Step(d, self.harness.worker_id) for d in self.deliveries]

    async def reference(self) -> Pass:
        """Each event run once, in order, by one worker."""
        if self._reference is None:
            self._reference = await run_scenario(self.harness, self.once())
        return self._reference

    async def idempotent(self) -> CheckResult:
        worker = self.harness.worker_id
        twice = tuple(
            step
            for d in self.deliveries
            for step in (Step(d, worker), Step(d, worker, repeat=True))
        )
        scenario = Scenario("every event is run twice in a row (a re-run after a crash)", twice)
        reference = await self.reference()
        failed = self._unjudged("idempotent", reference)
        if failed is None:
            failed = await self._compare("idempotent", scenario, reference)
        if failed is not None:
            return failed
        return CheckResult("idempotent", True, 1, runs=len(reference.runs))

    async def order_independent(
        self, *, workers: int = 2, interleavings: int = 4, seed: int = 0
    ) -> CheckResult:
        reference = await self.reference()
        unjudged = self._unjudged("order-independent", reference)
        if unjudged is not None:
            return unjudged
        scenarios = plan_interleavings(
            self.harness, self.deliveries, workers=workers, count=interleavings, seed=seed
        )
        for scenario in scenarios:
            failed = await self._compare("order-independent", scenario, reference)
            if failed is not None:
                return failed
        return CheckResult("order-independent", True, len(scenarios), runs=len(reference.runs))

    def _unjudged(self, check: CheckName, reference: Pass) -> CheckResult | None:
        """A handler that raises with each event run once, in order, leaves nothing to
        compare on that event: the property is not shown (a test asserting it must not
        pass for a handler that fails), and the result names the first such run."""
        failed = tuple(run for run in reference.runs if run.error is not None)
        if not failed:
            return None
        return CheckResult(
            check,
            False,
            0,
            scenario=f"the events run once, in order, a handler raised (fix it: {check} "
            "is judged on runs that succeed)",
            culprit=failed[0],
            raised=failed,
            runs=len(reference.runs),
        )

    async def _compare(
        self, check: CheckName, scenario: Scenario, reference: Pass
    ) -> CheckResult | None:
        checked = await run_scenario(self.harness, scenario.steps)
        failed_before = {
            (run.delivery.index, id(run.handler)) for run in reference.runs if run.error
        }
        raised = tuple(
            run
            for run in checked.runs
            if run.error is not None and (run.delivery.index, id(run.handler)) not in failed_before
        )
        difference = first_difference(
            reference.snapshot,
            checked.snapshot,
            ordered_arrays=self.ordered_arrays,
            ignore=self.ignore,
        )
        if not raised and difference is None:
            return None
        culprit = raised[0] if raised else None
        nondeterministic = False
        if difference is not None:
            if culprit is None:
                culprit = await self._blame(scenario, difference, check == "idempotent")
            again = await run_scenario(self.harness, self.once())
            nondeterministic = (
                first_difference(
                    reference.snapshot,
                    again.snapshot,
                    ordered_arrays=self.ordered_arrays,
                    ignore=self.ignore,
                )
                is not None
            )
        call_order = None
        if culprit is not None and check == "order-independent":
            call_order = _call_order(scenario.steps, culprit.delivery.call)
        return CheckResult(
            check,
            False,
            1,
            scenario=scenario.description,
            culprit=culprit,
            difference=difference,
            raised=raised,
            nondeterministic=nondeterministic,
            call_order=call_order,
            runs=len(reference.runs),
        )

    async def _blame(
        self, scenario: Scenario, difference: Difference, prefer_repeat: bool
    ) -> HandlerRun | None:
        """Run the scenario again watching the differing field: who changed it?"""
        collection, doc_id, path = difference.collection, difference.document_id, difference.field

        def value(doc: dict[str, Any] | None) -> Any:
            if doc is None:
                return ("absent",)
            return canonical(
                field_value(doc, path) if path else doc, ordered_arrays=self.ordered_arrays
            )

        last = value(await self.harness.db[collection].find_one({"_id": doc_id}))
        changes: list[HandlerRun] = []

        async def observe(run: HandlerRun, db: Any) -> None:
            nonlocal last
            now = value(await db[collection].find_one({"_id": doc_id}))
            if now != last:
                changes.append(run)
                last = now

        await run_scenario(self.harness, scenario.steps, observe=observe)
        if prefer_repeat:
            for run in changes:
                if run.repeat:
                    return run
        return changes[-1] if changes else None


async def check_idempotent(
    target: Target,
    events: Iterable[Message],
    *,
    ordered_arrays: bool = False,
    ignore: Iterable[str] = (),
) -> CheckResult:
    """Run every event twice in a row; the database must be the same as with one run.

    ``target``: a :class:`Harness` (its database is the starting point of every
    run), handler module names, or a registry. ``ignore``: fields not compared,
    as ``collection.field`` (``*.field`` for every collection).
    """
    checker = Checker(_harness(target), events, ordered_arrays=ordered_arrays, ignore=ignore)
    return await checker.idempotent()


async def check_order_independent(
    target: Target,
    events: Iterable[Message],
    *,
    workers: int = 2,
    interleavings: int = 4,
    seed: int = 0,
    ordered_arrays: bool = False,
    ignore: Iterable[str] = (),
) -> CheckResult:
    """Run each call's events split between ``workers`` workers, in ``interleavings``
    orders a fleet allows; the database must be the same as with the events in order.

    The same ``seed`` gives the same interleavings. Other arguments as
    :func:`check_idempotent`.
    """
    checker = Checker(_harness(target), events, ordered_arrays=ordered_arrays, ignore=ignore)
    return await checker.order_independent(workers=workers, interleavings=interleavings, seed=seed)
