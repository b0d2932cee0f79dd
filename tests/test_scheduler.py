"""The handler scheduler: the events of one call run in order, calls run side by side."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from amiworker.ami.message import Message
from amiworker.fleet.dispatch import HandlerContext, HandlerRegistry
from amiworker.fleet.scheduler import HandlerScheduler, Job, order_key
from tests.waiting import wait_for

Handler = Callable[[HandlerContext, Message], Awaitable[None]]
SLOW = 1.0  # long beside what running the other call takes, even on a loaded machine


def event(name: str, **headers: str) -> Message:
    lines = "".join(f"{key}: {value}\r\n" for key, value in headers.items())
    return Message(f"Event: {name}\r\n{lines}\r\n".encode())


def submit_call(scheduler: HandlerScheduler, events: int) -> None:
    """``events`` Newchannels of one call (Linkedid 1.0), Uniqueids 1.0, 1.1..."""
    for n in range(events):
        call = event("Newchannel", Uniqueid=f"1.{n}", Linkedid="1.0")
        scheduler.submit(Job("pbx1", call, f"pbx1:1.{n}", 0.0))


def submit_local(scheduler: HandlerScheduler) -> None:
    """An event every worker handles (no Uniqueid: not stored)."""
    scheduler.submit(Job("pbx1", event("DeviceStateChange", Device="PJSIP/100"), None, 0.0))


def test_events_without_linkedid_join_their_call() -> None:
    call = order_key("pbx1", event("Newchannel", Uniqueid="1.1", Linkedid="1.1"))
    # A DialBegin with no caller, a LocalBridge: the call's Linkedid under another name.
    assert order_key("pbx1", event("DialBegin", DestUniqueid="1.2", DestLinkedid="1.1")) == call
    assert order_key("pbx1", event("LocalBridge", LocalOneLinkedid="1.1")) == call
    # No Linkedid of any kind: the channel; nothing at all: the PBX.
    assert order_key("pbx1", event("Hangup", Uniqueid="7.1")) == "pbx1\x007.1"
    assert order_key("pbx1", event("DeviceStateChange", Device="PJSIP/100")) == "pbx1"
    assert order_key("pbx2", event("Hangup", Uniqueid="7.1")) != order_key(
        "pbx1", event("Hangup", Uniqueid="7.1")
    )


async def test_one_call_in_order_other_calls_alongside() -> None:
    runs: list[tuple[str, str, float, float]] = []  # (event, linkedid, started, ended)

    async def record(ctx: HandlerContext, message: Message) -> None:
        started = time.monotonic()
        if message.name == "Newchannel" and message.get("Linkedid") == "A":
            await asyncio.sleep(SLOW)  # the call's first event is slow
        call = message.get("Linkedid") or message.get("DestLinkedid") or ""
        runs.append((message.name, call, started, time.monotonic()))

    registry = HandlerRegistry(
        ["test"], [("NewchannelHandler", record), ("DialBeginHandler", record)]
    )
    finished: list[Job] = []
    scheduler = HandlerScheduler(
        registry,
        lambda job: None,
        concurrency=8,
        timeout=5,
        on_finished=lambda job, error: finished.append(job),
    )
    now = time.monotonic()
    try:
        for message in (
            event("Newchannel", Uniqueid="A", Linkedid="A"),
            event("DialBegin", DestUniqueid="A2", DestLinkedid="A"),
            event("Newchannel", Uniqueid="B", Linkedid="B"),
        ):
            scheduler.submit(Job("pbx1", message, None, now))
        await wait_for(lambda: len(finished) == 3, timeout=5, what="3 events handled")
    finally:
        await scheduler.cancel()

    by_call = {(name, call): (started, ended) for name, call, started, ended in runs}
    _, slow_ended = by_call["Newchannel", "A"]
    # The DialBegin waited for the slow event of its call...
    assert by_call["DialBegin", "A"][0] >= slow_ended
    # ...while the other call did not.
    assert by_call["Newchannel", "B"][1] < slow_ended


async def test_cancel_ends_a_handler_that_lost_its_first_cancellation() -> None:
    # As a handler waiting in asyncio.wait_for can on Python 3.11.
    started = asyncio.Event()
    cancellations = 0

    async def stubborn(ctx: HandlerContext, message: Message) -> None:
        nonlocal cancellations
        started.set()
        while True:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancellations += 1
                if cancellations > 1:
                    raise

    scheduler = HandlerScheduler(
        HandlerRegistry(["test"], [("HangupHandler", stubborn)]),
        lambda job: None,
        concurrency=1,
        timeout=60,
        on_finished=lambda job, error: None,
    )
    scheduler.submit(Job("pbx1", event("Hangup", Uniqueid="1"), None, time.monotonic()))
    await asyncio.wait_for(started.wait(), 5)
    async with asyncio.timeout(5):
        await scheduler.cancel()
    assert cancellations == 2


def held_until(release: asyncio.Event, backlog: int, *names: str) -> HandlerScheduler:
    """A scheduler whose handlers for ``names`` run until ``release`` is set."""

    async def held(ctx: HandlerContext, message: Message) -> None:
        await release.wait()

    registry = HandlerRegistry(["test"], [(f"{name}Handler", held) for name in names])
    return HandlerScheduler(
        registry,
        lambda job: None,
        concurrency=backlog,
        timeout=30,
        on_finished=lambda job, error: None,
        backlog=backlog,
    )


async def test_room_freed_wakes_when_a_handler_run_finishes() -> None:
    release = asyncio.Event()
    scheduler = held_until(release, 1, "Newchannel")
    try:
        assert scheduler.reserve(1) == 1
        scheduler.submit(Job("pbx1", event("Newchannel", Uniqueid="A", Linkedid="A"), None, 0.0))
        scheduler.release(1)
        assert scheduler.reserve(1) == 0  # the backlog is full
        waiting = asyncio.create_task(scheduler.room_freed(30))
        await asyncio.sleep(0)
        assert not waiting.done()
        release.set()
        await asyncio.wait_for(waiting, 5)  # woken by the run, not by its 30 s timeout
        assert scheduler.reserve(1) == 1
    finally:
        await scheduler.cancel()


async def test_stored_events_leave_a_tenth_of_the_backlog_to_events_every_worker_handles() -> None:
    # Events with no Uniqueid are not stored: with no room they are dropped, where a
    # stored event's claim waits or stores it queued. So claims never fill the last tenth.
    release = asyncio.Event()
    scheduler = held_until(release, 20, "Newchannel", "DeviceStateChange")
    try:
        granted = scheduler.reserve(20)
        assert granted == 18  # a claim or a take-over gets nine tenths
        for n in range(granted):
            call = event("Newchannel", Uniqueid=f"{n}.1", Linkedid=f"{n}.1")
            scheduler.submit(Job("pbx1", call, f"pbx1:{n}", 0.0), reserved=True)
        assert scheduler.room == 0 and scheduler.reserve(1) == 0
        assert scheduler.local_room == 2
        for _ in range(2):
            submit_local(scheduler)
        assert scheduler.local_room == 0 and scheduler.depth == 20  # the bound still holds
    finally:
        release.set()
        await scheduler.cancel()


def one_runner(handler: Handler) -> HandlerScheduler:
    """One handler runner; ``handler`` runs for Newchannel and DeviceStateChange."""
    registry = HandlerRegistry(
        ["test"], [("NewchannelHandler", handler), ("DeviceStateChangeHandler", handler)]
    )
    return HandlerScheduler(
        registry, lambda job: None, concurrency=1, timeout=30,
        on_finished=lambda job, error: None, backlog=100,
    )  # fmt: skip


async def test_events_every_worker_handles_run_before_calls_queued_earlier() -> None:
    # They cannot wait in MongoDB as stored events can: behind a backlog of slow
    # calls they would fill their share of the backlog and be dropped.
    release = asyncio.Event()
    ran: list[str] = []

    async def held(ctx: HandlerContext, message: Message) -> None:
        ran.append(message.name)
        if message.name == "Newchannel":
            await release.wait()

    scheduler = one_runner(held)
    try:
        for n in range(5):  # the first runs (and holds the one runner), four wait
            call = event("Newchannel", Uniqueid=f"{n}.1", Linkedid=f"{n}.1")
            scheduler.submit(Job("pbx1", call, f"pbx1:{n}", 0.0))
        await wait_for(lambda: ran == ["Newchannel"], 5, "the first call to start")
        submit_local(scheduler)
        release.set()
        await wait_for(lambda: len(ran) == 6, 5, "every event to run")
        assert ran[:2] == ["Newchannel", "DeviceStateChange"]
    finally:
        release.set()
        await scheduler.cancel()


def one_runner_logging(ran: list[str], holds: dict[str, asyncio.Event]) -> HandlerScheduler:
    """One handler runner; each event logs ``Name:Uniqueid`` (or ``Name``) as it starts,
    then waits for ``holds[name]`` if there is one."""

    async def logged(ctx: HandlerContext, message: Message) -> None:
        uniqueid = message.get("Uniqueid")
        ran.append(f"{message.name}:{uniqueid}" if uniqueid else message.name)
        hold = holds.get(message.name)
        if hold is not None:
            await hold.wait()

    return one_runner(logged)


async def test_events_every_worker_handles_run_between_the_events_of_a_call_under_way() -> None:
    # A runner keeps a call until its queue is empty: behind one whose slow events
    # keep coming, they would wait (and fill their tenth) as long as the call lasts.
    release = asyncio.Event()
    ran: list[str] = []
    scheduler = one_runner_logging(ran, {"Newchannel": release})
    try:
        submit_call(scheduler, 3)  # the first event runs and holds the runner
        await wait_for(lambda: ran == ["Newchannel:1.0"], 5, "the call to start")
        submit_local(scheduler)
        release.set()
        await wait_for(lambda: len(ran) == 4, 5, "every event to run")
        # After the event under way, not after the whole call; the call still in order.
        assert ran == ["Newchannel:1.0", "DeviceStateChange", "Newchannel:1.1", "Newchannel:1.2"]
        assert await scheduler.join(5)
    finally:
        release.set()
        await scheduler.cancel()


async def test_a_stop_releases_the_rest_of_a_call_paused_for_events_every_worker_handles() -> None:
    # While they run between a call's events, nothing of the rest of the call has
    # started: a stopping worker releases all of it to the others, none runs here.
    release_call, release_local = asyncio.Event(), asyncio.Event()
    ran: list[str] = []
    scheduler = one_runner_logging(
        ran, {"Newchannel": release_call, "DeviceStateChange": release_local}
    )
    try:
        submit_call(scheduler, 3)
        await wait_for(lambda: ran == ["Newchannel:1.0"], 5, "the call to start")
        submit_local(scheduler)
        release_call.set()
        await wait_for(lambda: ran[-1:] == ["DeviceStateChange"], 5, "the pause")
        assert [job.message.name for job in scheduler.running()] == ["DeviceStateChange"]
        released = scheduler.drain_unstarted()
        assert [job.key for job in released] == ["pbx1:1.1", "pbx1:1.2"]
        release_local.set()
        assert await scheduler.join(5)
        assert ran == ["Newchannel:1.0", "DeviceStateChange"]  # the released ones did not run
        assert scheduler.depth == 0
    finally:
        release_call.set()
        release_local.set()
        await scheduler.cancel()


async def test_a_call_paused_for_events_every_worker_handles_goes_on_while_they_keep_coming() -> (
    None
):
    # Between two of a call's events a runner runs those waiting then, not those
    # that come meanwhile: they may come as fast as they run.
    release = asyncio.Event()
    ran: list[str] = []
    scheduler: HandlerScheduler

    async def logged(ctx: HandlerContext, message: Message) -> None:
        ran.append(message.name)
        if message.name == "Newchannel" and len(ran) == 1:
            await release.wait()
        if message.name == "DeviceStateChange" and ran.count("Newchannel") < 2:
            await asyncio.sleep(0)  # as a handler doing I/O lets the loop go on
            # the next one comes while this one runs, until the call's second event ran
            more = event("DeviceStateChange", Device="PJSIP/100")
            scheduler.submit(Job("pbx1", more, None, 0.0))

    scheduler = one_runner(logged)
    try:
        submit_call(scheduler, 2)
        await wait_for(lambda: ran == ["Newchannel"], 5, "the call to start")
        submit_local(scheduler)
        release.set()
        assert await scheduler.join(5), f"the call waits behind them: {ran[:8]}..."
        assert ran[:3] == ["Newchannel", "DeviceStateChange", "Newchannel"]
        assert ran[3:] == ["DeviceStateChange"]  # the one that came meanwhile, after
    finally:
        release.set()
        await scheduler.cancel()
