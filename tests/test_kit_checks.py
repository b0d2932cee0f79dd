"""The two checks catch what the fleet cannot live with, and name the handler, the event and
the first differing document; the example handlers pass them."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from amiworker.fleet.dispatch import HandlerRegistry
from amiworker.testing import (
    Harness,
    check_idempotent,
    check_order_independent,
    make_event,
    sample_calls,
)
from amiworker.testing.checks import plan_interleavings
from amiworker.testing.report import check_handlers, format_report

ROOT = Path(__file__).resolve().parent.parent

BAD = '''
import time
from pymongo.errors import DuplicateKeyError

async def HangupHandler(ctx, event):
    """Not idempotent: counts runs, not hangups."""
    await ctx.db["counts"].update_one(
        {"_id": event["Linkedid"]}, {"$inc": {"hangups": 1}}, upsert=True)

async def NewstateHandler(ctx, event):
    """Order-dependent: the last state *handled*, not the last state."""
    await ctx.db["channels"].update_one(
        {"_id": event["Uniqueid"]}, {"$set": {"state": event["ChannelStateDesc"]}}, upsert=True)

async def SoftHangupRequestHandler(ctx, event):
    """Order-dependent too, and the same document: $set of the last state."""
    await ctx.db["channels"].update_one(
        {"_id": event["Uniqueid"]}, {"$set": {"state": "Hanging up"}}, upsert=True)
'''

GOOD = '''
async def HangupHandler(ctx, event):
    """Idempotent and order-independent: a set of facts, keyed by the event."""
    await ctx.db["hangups"].update_one(
        {"_id": event["Linkedid"]},
        {"$addToSet": {"channels": event["Uniqueid"]}, "$max": {"last": event["Timestamp"]}},
        upsert=True)

async def DialBeginHandler(ctx, event):
    """An insert that is a no-op the second time: the unique _id is the idempotency key."""
    from pymongo.errors import DuplicateKeyError
    try:
        await ctx.db["dials"].insert_one({"_id": ctx.event_id, "to": event["DestChannel"]})
    except DuplicateKeyError:
        pass
'''

INSERT_ONCE = """
async def DialBeginHandler(ctx, event):
    await ctx.db["dials"].insert_one({"_id": ctx.event_id, "to": event["DestChannel"]})
"""

CLOCK = '''
import time

async def HangupHandler(ctx, event):
    """What handlers/calls.py did for an event without Timestamp: the clock."""
    when = event.get("Timestamp") or repr(time.time_ns())
    await ctx.db["ends"].update_one(
        {"_id": event["Uniqueid"]}, {"$min": {"at": when}}, upsert=True)
'''

ALWAYS_RAISES = """
async def HangupHandler(ctx, event):
    raise ValueError("no such extension")
"""

PUSH = '''
async def NewextenHandler(ctx, event):
    """Order-independent as a set of steps; their order in the array is not."""
    await ctx.db["steps"].update_one(
        {"_id": event["Uniqueid"]}, {"$addToSet": {"apps": event["Application"]}}, upsert=True)
'''


@pytest.fixture
def modules(tmp_path: Path) -> Iterator[Path]:
    for name, text in {
        "bad": BAD,
        "good": GOOD,
        "insert_once": INSERT_ONCE,
        "clock": CLOCK,
        "push": PUSH,
        "always_raises": ALWAYS_RAISES,
    }.items():
        (tmp_path / f"kit_{name}.py").write_text(text)
    path_before = list(sys.path)
    yield tmp_path
    sys.path[:] = path_before
    for name in list(sys.modules):
        if name.startswith("kit_"):
            del sys.modules[name]


def harness(directory: Path, *names: str) -> Harness:
    return Harness([f"kit_{name}" for name in names], app_dir=directory)


async def test_a_handler_that_counts_runs_is_not_idempotent(modules: Path) -> None:
    events = sample_calls(5)
    result = await check_idempotent(harness(modules, "bad"), events)
    assert not result and result.check == "idempotent"
    assert result.handler_name == "kit_bad.HangupHandler"
    assert result.event is not None and result.event.name == "Hangup"
    assert result.culprit is not None and result.culprit.repeat  # its re-run did it
    difference = result.difference
    assert difference is not None
    assert (difference.collection, difference.field) == ("counts", "hangups")
    assert difference.document_id == result.event["Linkedid"]
    assert (difference.expected, difference.actual) == (
        {"_id": result.event["Linkedid"], "hangups": 2},
        {"_id": result.event["Linkedid"], "hangups": 4},
    )
    text = str(result)
    assert "idempotent: NO" in text and "kit_bad.HangupHandler on Hangup #" in text
    assert "first differing document: counts {_id: " in text
    assert "field 'hangups': 2 with each event run once, in order; 4 in this scenario" in text


async def test_a_handler_that_keeps_the_last_state_handled_is_order_dependent(
    modules: Path,
) -> None:
    events = sample_calls(5)
    result = await check_order_independent(harness(modules, "bad"), events)
    assert not result and result.check == "order-independent"
    assert result.handler_name in ("kit_bad.NewstateHandler", "kit_bad.SoftHangupRequestHandler")
    assert result.event is not None and result.event.name in ("Newstate", "SoftHangupRequest")
    difference = result.difference
    assert difference is not None and (difference.collection, difference.field) == (
        "channels",
        "state",
    )
    assert difference.expected == {"_id": difference.document_id, "state": "Hanging up"}
    assert result.call_order and "@w1" in result.call_order and "@w0" in result.call_order
    assert "interleaving 1 of 4" in str(result) and "that call ran: " in str(result)


async def test_every_handler_gets_its_own_verdict(modules: Path) -> None:
    report = await check_handlers(harness(modules, "bad", "good"), sample_calls(5))
    verdicts = {
        entry.name.removeprefix("kit_"): (entry.idempotent is None, entry.order_independent is None)
        for entry in report.handlers
    }
    state_writers = [
        verdicts.pop("bad.NewstateHandler"),
        verdicts.pop("bad.SoftHangupRequestHandler"),
    ]
    assert verdicts == {
        "bad.HangupHandler": (False, True),
        "good.HangupHandler": (True, True),
        "good.DialBeginHandler": (True, True),
    }
    # Two handlers setting the same field: the one the difference is pinned on is "no";
    # without it, the other sets the field alone, once per channel, and passes.
    assert sorted(state_writers) == [(True, False), (True, True)]
    assert not report.ok
    table = format_report(report)
    assert table[0].split() == ["HANDLER", "RUNS", "FAILURES", "IDEMPOTENT", "ORDER-INDEPENDENT"]
    assert any(line.split()[:2] == ["kit_bad.HangupHandler", "10"] for line in table)


async def test_a_handler_whose_rerun_raises_is_not_idempotent(modules: Path) -> None:
    result = await check_idempotent(harness(modules, "insert_once"), sample_calls(2))
    assert not result
    assert result.culprit is not None and result.culprit.repeat
    assert type(result.culprit.error).__name__ == "DuplicateKeyError"
    assert result.difference is None  # the database is the same: the re-run failed
    assert "raised on its re-run DuplicateKeyError" in str(result)
    assert "kit_insert_once.py:3" in str(result)  # the handler's own line


async def test_a_handler_that_always_raises_passes_neither_check(modules: Path) -> None:
    """It writes nothing, so every scenario leaves the same (empty) database: a check
    that compared only that would pass a handler that never works."""
    kit = harness(modules, "always_raises")
    for check in (check_idempotent, check_order_independent):
        result = await check(kit, sample_calls(2))
        assert not result
        assert result.culprit is not None and not result.culprit.repeat
        assert len(result.raised) == 4  # every Hangup of the two calls
        text = str(result)
        assert "NO, when the events run once, in order, a handler raised" in text
        assert "raised ValueError: no such extension (" in text
        assert "kit_always_raises.py:3)" in text  # the handler's own line
        # What pytest shows of `assert result` (it cuts a repr to 240 characters).
        assert repr(result).startswith(f"<CheckResult {result.check}: NO, when the events")


async def test_what_a_handler_reads_of_the_clock_is_found_out(modules: Path) -> None:
    untimed = [
        make_event("Hangup", Timestamp=None, Uniqueid=f"1.{n}", Linkedid="1.0", Cause="16")
        for n in range(3)
    ]
    result = await check_idempotent(harness(modules, "clock"), untimed)
    assert not result and result.nondeterministic
    assert "the clock" in str(result)
    # Accepted explicitly, it is not compared.
    assert await check_idempotent(harness(modules, "clock"), untimed, ignore=["ends.at"])
    # With the events' own Timestamp, the same handler passes both checks.
    assert await check_idempotent(harness(modules, "clock"), sample_calls(2))
    assert await check_order_independent(harness(modules, "clock"), sample_calls(2))


async def test_arrays_are_sets_unless_their_order_is_asked_for(modules: Path) -> None:
    events = sample_calls(2)
    assert await check_order_independent(harness(modules, "push"), events)
    strict = await check_order_independent(harness(modules, "push"), events, ordered_arrays=True)
    assert not strict and strict.difference is not None and strict.difference.field == "apps"


async def test_checks_start_from_what_the_test_put_in_the_database(modules: Path) -> None:
    kit = harness(modules, "good")
    await kit.db["dials"].create_index("to", unique=True, name="to_unique")
    await kit.db["reference"].insert_one({"_id": "rates", "cents": 3})
    events = sample_calls(3)
    assert await check_idempotent(kit, events)
    assert await check_order_independent(kit, events)
    assert await kit.documents("dials") == []  # the checks ran on copies
    assert await kit.db["reference"].count_documents({}) == 1


async def noop(ctx: object, event: object) -> None:
    return None


def test_interleavings_are_allowed_orders_and_the_same_for_a_seed() -> None:
    names = ("NewchannelHandler", "NewstateHandler", "HangupHandler", "DeviceStateChangeHandler")
    kit = Harness(HandlerRegistry(["test"], [(name, noop) for name in names]))
    device = make_event("DeviceStateChange", Device="Local/100@test", State="INUSE")
    deliveries = kit.plan([*sample_calls(4), device])
    (local,) = [d for d in deliveries if d.event_id is None]
    scenarios = plan_interleavings(kit, deliveries, workers=3, count=5, seed=11)
    again = plan_interleavings(kit, deliveries, workers=3, count=5, seed=11)
    assert [s.steps for s in scenarios] == [s.steps for s in again]
    other = plan_interleavings(kit, deliveries, workers=3, count=5, seed=12)
    assert [s.steps for s in scenarios[1:]] != [s.steps for s in other[1:]]
    for scenario in scenarios:
        runs = Counter(step.delivery.index for step in scenario.steps)
        # A racing event runs once, in one worker; the others in every worker.
        assert all(runs[d.index] == 1 for d in deliveries if d.event_id is not None)
        assert runs[local.index] == 3
        assert len({s.worker_id for s in scenario.steps if s.delivery is local}) == 3
        # Each worker keeps the order of the events of a call it runs.
        position: dict[tuple[str, str], int] = {}
        for step in scenario.steps:
            key = (step.worker_id, step.delivery.call)
            assert position.get(key, -1) < step.delivery.index
            position[key] = step.delivery.index
    # The first: each call cut in order, its later part first.
    first_call = deliveries[0].call
    order = [s.delivery.index for s in scenarios[0].steps if s.delivery.call == first_call]
    assert order != sorted(order) and order[-1] != max(order)
