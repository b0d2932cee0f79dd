"""A PBX without ``timestampevents = yes`` cannot go unnoticed.

Without a Timestamp, an event byte-identical to one stored more than
``dedup_window`` ago gets the stored ``_id``: every worker loses the race and
it is never stored nor handled. So a worker warns once per session, naming the
fix, and its heartbeat flags the PBX (``amiworker status`` shows it); ``amiworker
check`` fails for it (tests/test_cli.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import pytest

from amiworker.devstack.embedded_mongo import EmbeddedMongo
from amiworker.fleet.dispatch import HandlerRegistry
from amiworker.fleet.worker import Worker
from amiworker.settings import Settings
from amiworker.sim.pbx import FakePBX
from tests.waiting import wait_for


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "without a Timestamp" in r.getMessage()
    ]


@pytest.mark.parametrize("stamped", [False, True])
async def test_a_worker_warns_once_per_session_for_a_pbx_without_timestamps(
    stamped: bool, mongo_server: EmbeddedMongo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="amiworker")
    async with FakePBX(name="pbx1", port=0, timestamp_events=stamped, call_duration=0.05) as pbx:
        settings = Settings.load(
            None,
            env_file=None,
            servers=[{"name": "pbx1", "host": "127.0.0.1", "port": pbx.port,
                      "username": "admin", "secret": "secret"}],
            mongo_uri=mongo_server.uri,
            database=f"nots_{uuid.uuid4().hex[:8]}",
            reconnect_min=0.05,
            reconnect_max=0.2,
            heartbeat_interval=0.2,
            lease=1.0,
        )  # fmt: skip
        worker = Worker(settings, HandlerRegistry(), worker_id="nots-w0")
        task = asyncio.create_task(worker.run())
        try:
            await worker.pool.wait_connected(10)
            for _ in range(3):
                await pbx.start_call()
            await wait_for(lambda: "pbx1" in worker.timestamps, 10, "the first event seen")
            assert worker.timestamps["pbx1"] is stamped
            assert len(warnings_of(caplog)) == (0 if stamped else 1)
            assert worker.heartbeat_info()["servers"]["pbx1"]["timestamps"] is stamped

            # A new session (a PBX restart): checked, and warned about, once more.
            await pbx.drop_sessions()
            await wait_for(
                lambda: (
                    worker.stats.events_seen > 0 and worker.pool.status()["pbx1"]["reconnects"] == 1
                ),
                10,
                "a new session",
            )
            await worker.pool.wait_connected(10)
            for _ in range(3):
                await pbx.start_call()
            await wait_for(lambda: "pbx1" not in worker._unchecked, 10, "the session checked")
            assert len(warnings_of(caplog)) == (0 if stamped else 2)
            if not stamped:
                assert "timestampevents = yes" in warnings_of(caplog)[0]
        finally:
            worker.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
