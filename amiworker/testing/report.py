"""Every handler of a harness checked on the same events, one verdict per handler.

What ``amiworker test-handlers`` prints. Both checks run with every handler
at once, as the fleet runs them (handlers of one module often share
documents). When a check fails, the handler it names is marked "no" and the
check runs again without it, until the rest pass (or a failure names no
handler: then every handler left is marked "no").
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from amiworker.ami.message import Message
from amiworker.fleet.dispatch import Handler, handler_name
from amiworker.testing.checks import Checker, CheckResult, restricted
from amiworker.testing.harness import HandlerRun, Harness

__all__ = ["HandlerReport", "Report", "check_handlers", "format_report"]

_FAILURES_SHOWN = 3


@dataclass(slots=True)
class HandlerReport:
    handler: Handler
    #: Runs and failures with each event run once, in order.
    runs: int = 0
    failures: list[HandlerRun] = field(default_factory=list)
    #: The failed check pinned on this handler; None when it passed (or never ran).
    idempotent: CheckResult | None = None
    order_independent: CheckResult | None = None

    @property
    def name(self) -> str:
        return handler_name(self.handler)

    @property
    def ok(self) -> bool:
        return not self.failures and self.idempotent is None and self.order_independent is None


@dataclass(slots=True)
class Report:
    handlers: list[HandlerReport]
    events: int
    deliveries: int
    workers: int
    interleavings: int
    seed: int
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return all(report.ok for report in self.handlers)

    @property
    def failed_checks(self) -> list[CheckResult]:
        """Each failed check once, in the order found."""
        found: list[CheckResult] = []
        for report in self.handlers:
            for result in (report.idempotent, report.order_independent):
                if result is not None and not any(result is known for known in found):
                    found.append(result)
        return found


async def check_handlers(
    harness: Harness,
    events: Sequence[Message],
    *,
    workers: int = 2,
    interleavings: int = 4,
    seed: int = 0,
    ordered_arrays: bool = False,
    ignore: Iterable[str] = (),
) -> Report:
    """Runs, failures and both properties of every handler of ``harness`` on ``events``."""
    started = time.perf_counter()
    ignored = tuple(ignore)
    checker = Checker(harness, events, ordered_arrays=ordered_arrays, ignore=ignored)
    reports = {id(handler): HandlerReport(handler) for handler in harness.handlers()}
    reference = await checker.reference()
    for run in reference.runs:
        report = reports[id(run.handler)]
        report.runs += 1
        if run.error is not None:
            report.failures.append(run)

    async def idempotent(current: Checker) -> CheckResult:
        return await current.idempotent()

    async def order_independent(current: Checker) -> CheckResult:
        return await current.order_independent(
            workers=workers, interleavings=interleavings, seed=seed
        )

    def checker_without(removed: list[Handler]) -> Checker:
        return Checker(
            restricted(harness, removed), events, ordered_arrays=ordered_arrays, ignore=ignored
        )

    for check, attribute in ((idempotent, "idempotent"), (order_independent, "order_independent")):
        for handler, result in await _pin(check, checker, checker_without):
            setattr(reports[id(handler)], attribute, result)
    return Report(
        list(reports.values()),
        events=len(events),
        deliveries=len(checker.deliveries),
        workers=workers,
        interleavings=interleavings,
        seed=seed,
        elapsed=time.perf_counter() - started,
    )


async def _pin(
    check: Callable[[Checker], Awaitable[CheckResult]],
    first: Checker,
    without: Callable[[list[Handler]], Checker],
) -> list[tuple[Handler, CheckResult]]:
    """The handlers a check fails on, each with the failure that names it."""
    everyone = first.harness.handlers()
    pinned: list[tuple[Handler, CheckResult]] = []
    removed: list[Handler] = []
    result = await check(first)
    while not result.ok:
        culprit = result.handler
        if culprit is None or any(culprit is known for known in removed):
            # Not pinned on one handler: every handler left shares the blame.
            pinned += [(h, result) for h in everyone if not any(h is r for r in removed)]
            break
        pinned.append((culprit, result))
        removed.append(culprit)
        if len(removed) == len(everyone):
            break
        result = await check(without(removed))
    return pinned


def format_report(report: Report) -> list[str]:
    """The table, then what failed and why."""
    rows = [("HANDLER", "RUNS", "FAILURES", "IDEMPOTENT", "ORDER-INDEPENDENT")]
    for entry in report.handlers:
        if entry.runs == 0:
            verdicts = ("-", "-")
        else:
            verdicts = (
                "yes" if entry.idempotent is None else "NO",
                "yes" if entry.order_independent is None else "NO",
            )
        rows.append((entry.name, str(entry.runs), str(len(entry.failures)), *verdicts))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.rjust(width) if 0 < i < 3 else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    for entry in report.handlers:
        for failure in entry.failures[:_FAILURES_SHOWN]:
            lines.append(f"failed: {failure.describe()}")
        if len(entry.failures) > _FAILURES_SHOWN:
            lines.append(f"failed: ... and {len(entry.failures) - _FAILURES_SHOWN} more")
    for result in report.failed_checks:
        lines += ["", *result.describe().splitlines()]
    unexercised = [entry.name for entry in report.handlers if entry.runs == 0]
    if unexercised:
        lines.append(
            f"not run by these events: {', '.join(unexercised)} "
            "(test them with amiworker.testing.make_event)"
        )
    return lines
