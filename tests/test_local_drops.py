"""Events every worker handles (no ``Uniqueid``, never stored) that find the handler
backlog full are dropped: counted, and said in the log, one line per 10 s so that a
flood cannot drown it. None goes unsaid: those dropped after the last line are said
once the backlog has room again (no more often than the other lines).
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from amiworker.ami.message import Message
from amiworker.devstack.embedded_mongo import free_port
from amiworker.fleet.dispatch import HandlerContext, HandlerRegistry
from amiworker.fleet.worker import Worker
from amiworker.logs import Throttle
from amiworker.settings import Settings
from tests.waiting import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class NoStore:
    """Events every worker handles never reach the store; the handlers' context names
    its database (handlers here do not use it)."""

    database = None


def device_state(n: int) -> Message:
    raw = f"Event: DeviceStateChange\r\nDevice: PJSIP/{n}\r\nState: INUSE\r\n\r\n"
    return Message(raw.encode())


def drop_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "handler backlog" in r.getMessage()]


async def test_drops_after_the_last_line_are_said_once_the_backlog_has_room(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handled: list[str] = []
    go_on = asyncio.Event()

    async def on_device_state(ctx: HandlerContext, event: Message) -> None:
        await go_on.wait()  # a handler too slow for its events
        handled.append(event["Device"])

    pbx = {"name": "p", "host": "127.0.0.1", "port": free_port(), "username": "u", "secret": "s"}
    settings = Settings.load(
        None, env_file=None, servers=[pbx], handler_backlog=10, handler_concurrency=1
    )
    registry = HandlerRegistry(["t"], [("DeviceStateChangeHandler", on_device_state)])
    worker = Worker(settings, registry, worker_id="w", store=NoStore())  # type: ignore[arg-type]
    clock = Clock()
    worker._local_drops = Throttle(clock=clock.monotonic)
    caplog.set_level(logging.ERROR)

    for n in range(15):  # 10 fit the backlog, 5 are dropped
        worker._on_event("p", device_state(n), False)
    assert worker.stats.dropped == 5
    [first] = drop_lines(caplog)  # the first drop is said at once, the next four wait
    assert "1 event(s) not handled by this worker, the last a DeviceStateChange" in first

    go_on.set()
    await wait_for(lambda: len(handled) == 10, timeout=5, what="the backlog run")
    worker._on_event("p", device_state(15), False)
    assert len(drop_lines(caplog)) == 1, "a line within 10 s of the last: not yet"

    clock.now += 10.0
    worker._on_event("p", device_state(16), False)
    said = drop_lines(caplog)[1:]
    assert said == [
        "handler backlog has room again: 4 event(s) with no Uniqueid were dropped since "
        "the last line, 5 in all (see above)"
    ]
    clock.now += 60.0
    worker._on_event("p", device_state(17), False)
    assert len(drop_lines(caplog)) == 2, "nothing more to say"
    await wait_for(lambda: len(handled) == 13, timeout=5, what="the events after the drops")
    assert worker.stats.dropped == 5
