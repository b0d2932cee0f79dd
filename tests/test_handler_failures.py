"""Handlers that raise, hang or crawl, in a real Worker against nx-27017 and a FakePBX.

One handler module (written to tmp_path, imported as the user's would be) has
a handler that raises (Newchannel), an ``async def`` that hangs (Hangup), a
plain function that blocks its thread in ``time.sleep`` (SoftHangupRequest), a
slow one (Newstate, 0.3 s) and ordinary ones. What must hold:

* the others are not disturbed: every event of an ordinary or slow handler
  ends ``done``, its handler run exactly once;
* a raising or hanging handler's events go ``failed`` (error recorded, attempt
  counted), are retried after the backoff by the reclaim loop, and end
  ``dead`` after ``max_attempts``, the reason in ``error``;
* ``amiworker retry`` re-queues the dead ones and, the handlers fixed (a flag
  file), they end ``done``;
* ``Worker.stop()`` leaves a ``stopped`` row in ``workers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from amiworker.ami.protocol import Parser
from amiworker.devstack.embedded_mongo import EmbeddedMongo
from amiworker.fleet.dedup import races
from amiworker.fleet.dispatch import load_handlers
from amiworker.fleet.worker import Worker
from amiworker.mongo import close_client, open_client
from amiworker.settings import Settings
from amiworker.sim.pbx import FakePBX
from tests.waiting import wait_for

StartPBX = Callable[..., Awaitable[FakePBX]]

HANDLER_TIMEOUT = 0.5
RETRY_BACKOFF = 0.1
CALLS = 2

HANDLERS = '''
"""Handlers that misbehave until the file "fixed" appears beside this module."""

import asyncio
import time
from pathlib import Path

FIXED = Path(__file__).with_name("fixed")
#: (event name, ctx.event_id, time.monotonic() at start, the stored document then)
runs = []


async def _run(ctx, event):
    started = time.monotonic()
    doc = await ctx.db["events"].find_one({"_id": ctx.event_id})
    runs.append((event.name, ctx.event_id, started, doc))


async def NewchannelHandler(ctx, event):
    await _run(ctx, event)
    if not FIXED.exists():
        raise ValueError(f"no route for {event['Channel']}")


async def HangupHandler(ctx, event):
    await _run(ctx, event)
    if not FIXED.exists():
        await asyncio.sleep(3600)  # hangs: cancelled at handler_timeout


def SoftHangupRequestHandler(ctx, event):
    # A plain function: it runs in a thread, which a timeout cannot stop; it
    # blocks for longer than handler_timeout (bounded, so the thread ends).
    runs.append((event.name, ctx.event_id, time.monotonic(), None))
    if not FIXED.exists():
        time.sleep(1.0)


async def NewstateHandler(ctx, event):
    await _run(ctx, event)
    await asyncio.sleep(0.3)  # slow, but within handler_timeout


async def NewextenHandler(ctx, event):
    await _run(ctx, event)


async def VarSetHandler(ctx, event):
    await _run(ctx, event)


def DialBeginHandler(ctx, event):
    runs.append((event.name, ctx.event_id, time.monotonic(), None))
'''
FAILING = {"Newchannel", "Hangup", "SoftHangupRequest"}
SUCCEEDING = {"Newstate", "Newexten", "VarSet", "DialBegin"}


@dataclass
class Setup:
    worker: Worker
    task: asyncio.Task[None]
    pbx: FakePBX
    handlers: ModuleType
    events: Any  # the events collection, through the test's own client
    workers: Any
    settings: Settings
    flag: Path

    def runs_of(self, event_id: str) -> list[tuple[str, str, float, dict[str, Any] | None]]:
        return [run for run in self.handlers.runs if run[1] == event_id]


@pytest.fixture
async def setup(
    fake_pbx_factory: StartPBX, mongo_server: EmbeddedMongo, tmp_path: Path
) -> AsyncIterator[Setup]:
    module = f"flaky_handlers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(HANDLERS)
    pbx = await fake_pbx_factory(name="pbx1")
    database = f"t_{uuid.uuid4().hex[:16]}"
    settings = Settings.load(
        None,
        env_file=None,
        servers=[
            {"name": "pbx1", "host": "127.0.0.1", "port": pbx.port,
             "username": pbx.username, "secret": pbx.secret},
        ],
        mongo_uri=mongo_server.uri,
        database=database,
        handlers=[module],
        app_dir=tmp_path,
        handler_timeout=HANDLER_TIMEOUT,
        max_attempts=2,
        retry_backoff=RETRY_BACKOFF,
        heartbeat_interval=0.2,
        lease=1.0,
        batch_delay=0.001,
        shutdown_timeout=5.0,
    )  # fmt: skip
    path_before = list(sys.path)
    registry = load_handlers(settings.handlers, settings.app_dir)
    worker = Worker(settings, registry, worker_id="handler-failures-w0")
    task = asyncio.create_task(worker.run())
    client = open_client(mongo_server.uri, serverSelectionTimeoutMS=5000)
    try:
        await worker.pool.wait_connected(10)
        yield Setup(
            worker,
            task,
            pbx,
            sys.modules[module],
            client[database]["events"],
            client[database]["workers"],
            settings,
            tmp_path / "fixed",
        )
    finally:
        worker.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        await client.drop_database(database)
        await close_client(client)
        sys.path[:] = path_before
        sys.modules.pop(module, None)


async def retry_with_the_cli(settings: Settings) -> str:
    """``amiworker retry`` as an operator runs it: a separate process."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "amiworker.cli", "retry",
        "--mongo-uri", settings.mongo_uri, "--database", settings.database,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


async def test_failing_handlers_are_retried_then_dead_and_never_disturb_the_others(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="amiworker")
    pbx, events = setup.pbx, setup.events
    async with asyncio.timeout(90):
        for _ in range(CALLS):
            await pbx.start_call()
        await wait_for(lambda: pbx.engine.calls_completed == CALLS, what="the calls to end")
        sent = Parser(banner=False).feed(b"".join(pbx.sent_events))
        stored = [m for m in sent if races(m, "channel")]
        assert {m.name for m in stored} >= FAILING | SUCCEEDING

        async def settled() -> bool:
            unsettled = await events.count_documents({"state": {"$in": ["claimed", "failed"]}})
            return bool(unsettled == 0 and await events.count_documents({}) == len(stored))

        await wait_for(settled, timeout=45, what="every event done or dead")

        docs = [doc async for doc in events.find({})]
        by_event: dict[str, list[dict[str, Any]]] = {}
        for doc in docs:
            by_event.setdefault(doc["event"], []).append(doc)

        # Undisturbed: every event of an ordinary or slow handler is done, run once.
        for name in SUCCEEDING:
            assert by_event[name], name
            for doc in by_event[name]:
                assert doc["state"] == "done" and not doc.get("error"), doc
                assert len(setup.runs_of(doc["_id"])) == 1, doc
        # Events without a handler are stored done at once.
        assert {doc["state"] for name, found in by_event.items() if name not in FAILING
                for doc in found} == {"done"}  # fmt: skip

        # Failing: run twice (the retry after the backoff, through reclaim), then dead.
        for doc in by_event["Newchannel"]:
            assert doc["state"] == "dead" and doc["attempts"] == 2, doc
            assert doc["error"].startswith("ValueError: no route for ")
            assert f"{setup.handlers.__name__}.py:" in doc["error"]  # where it was raised
        for name, how in (("Hangup", "cancelled"), ("SoftHangupRequest", "thread is abandoned")):
            for doc in by_event[name]:
                assert doc["state"] == "dead" and doc["attempts"] == 2, doc
                assert f"{name}Handler did not finish within 0.5 s" in doc["error"], doc
                assert how in doc["error"], doc
        failing = [doc for name in FAILING for doc in by_event[name]]
        assert len(failing) == 6 * CALLS
        for doc in failing:
            (first, second) = setup.runs_of(doc["_id"])
            ran_for = HANDLER_TIMEOUT if doc["event"] != "Newchannel" else 0.0
            assert second[2] - first[2] >= ran_for + RETRY_BACKOFF, doc["event"]
            if second[3] is not None:  # what the retry found stored: the first failure
                assert second[3]["attempts"] == 1 and second[3]["error"], second[3]
        assert setup.worker.stats.reclaimed >= len(failing)
        assert any("took over" in r.getMessage() for r in caplog.records)
        # One line per failed run, saying which attempt it was and what comes of it.
        for doc in by_event["Newchannel"]:
            said = [r.getMessage() for r in caplog.records if doc["_id"] in r.getMessage()]
            assert [line.split(": ValueError")[0] for line in said] == [
                f"handler {setup.handlers.__name__}.NewchannelHandler failed on Newchannel "
                f"event {doc['_id']} (attempt 1 of 2; retried after a backoff)",
                f"handler {setup.handlers.__name__}.NewchannelHandler failed on Newchannel "
                f"event {doc['_id']} (attempt 2 of 2: now dead; `amiworker retry` re-queues it)",
            ]

        # The operator fixes the handlers and re-queues the dead events.
        setup.flag.touch()
        output = await retry_with_the_cli(setup.settings)
        assert f"re-queued {len(failing)} dead event(s)" in output
        ids = [doc["_id"] for doc in failing]

        async def all_done() -> bool:
            done = await events.count_documents({"_id": {"$in": ids}, "state": "done"})
            return bool(done == len(ids))

        await wait_for(all_done, timeout=30, what="the re-queued events done")
        for doc in failing:
            assert len(setup.runs_of(doc["_id"])) == 3, doc["event"]
        for doc in docs:  # and nothing else ran again
            if doc["event"] in SUCCEEDING:
                assert len(setup.runs_of(doc["_id"])) == 1

    # A graceful stop leaves the row, marked stopped, with the final counts.
    setup.worker.stop()
    await asyncio.wait_for(setup.task, 30)
    row = await setup.workers.find_one({"_id": "handler-failures-w0"})
    assert row is not None and row["state"] == "stopped"
    assert row["counters"]["failed"] == 2 * len(failing)
    assert row["counters"]["handled"] == len(setup.handlers.runs) - 2 * len(failing)
    assert row["queue_depth"] == 0
