"""The operator commands, end to end through ``amiworker.cli.main`` against nx-27017.

Most run in-process (``cli.main([...])`` with capsys) on a log filled once per
module from the real 20-call capture (see tests/log_plugin.py); the real
``amiworker`` entry point runs as a subprocess for ``events --json`` and for
``--follow``, which must pick up events stored after it started.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from amiworker import cli
from amiworker.ami.message import Message
from amiworker.devstack.embedded_mongo import EmbeddedMongo, free_port
from amiworker.fleet.locktable import LockTable
from amiworker.fleet.worker import Worker
from amiworker.mongo import close_client, open_client
from amiworker.ops.filters import event_order
from amiworker.ops.query import WorkerStatus
from amiworker.ops.render import fleet_warnings, print_workers
from amiworker.sim.pbx import FakePBX
from tests.fleet_plugin import CHANNEL_EVENTS_PER_CALL, FleetRun
from tests.log_plugin import (
    ERROR,
    FIRST_CALL,
    LIVE_WORKER,
    STALE_WORKER,
    STOPPED_WORKER,
    FilledLog,
    documents,
    fill,
)

ROOT = Path(__file__).parent.parent
CALL = "c20p5038-3-1"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No .env file or AMIWORKER_* variable of the machine running the tests; the
    logging set up by a command (a handler on this test's stderr) undone after it."""
    for name in list(os.environ):
        if name.startswith("AMIWORKER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in ("amiworker", "handlers")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, saved in levels.items():
        logging.getLogger(name).setLevel(saved)


@pytest.fixture
def log(filled_log_module: FilledLog, mongo_server: EmbeddedMongo) -> Iterator[list[str]]:
    """The setting flags that point a command at the module's filled log."""
    yield ["--mongo-uri", mongo_server.uri, "--database", filled_log_module.name]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def table(out: str) -> list[str]:
    lines = out.splitlines()
    assert lines and lines[0].startswith("TIME (UTC)")
    return lines


def column_starts(header: str) -> list[int]:
    starts, previous = [], " "
    for index, char in enumerate(header):
        if char != " " and previous == " " and (index == 0 or header[index - 2 : index] == "  "):
            starts.append(index)
        previous = char
    return starts


# -- events --------------------------------------------------------------------------------


def test_events_table_is_aligned_newest_last(
    capsys: pytest.CaptureFixture[str], log: list[str], filled_log_module: FilledLog
) -> None:
    code, out, err = run(capsys, "events", "--server", "pbx1", "--limit", "12", *log)
    assert (code, err) == (0, "")
    header, *rows = table(out)
    assert len(rows) == 12
    starts = column_starts(header)
    assert header.split()[:3] == ["TIME", "(UTC)", "SERVER"]
    for row in rows:
        for start in starts[1:6]:
            assert row[start - 2 : start] == "  " and row[start] != " ", (row, start)
    # The newest 12 of pbx1, in the order Asterisk sent them.
    newest = filled_log_module.pbx1[-12:]
    assert [row.split()[3] for row in rows] == [doc["event"] for doc in newest]
    assert [row.split()[4] for row in rows] == [doc["uniqueid"] for doc in newest]
    hangup = next(row for row in rows if row.split()[3] == "Hangup")
    assert "cause=16 cause-txt=Normal Clearing" in hangup


def test_events_json_lines_hold_whole_documents(
    capsys: pytest.CaptureFixture[str], log: list[str], filled_log_module: FilledLog
) -> None:
    code, out, _ = run(capsys, "events", "--json", "--event", "Newchannel", "--limit", "4", *log)
    assert code == 0
    docs = [json.loads(line) for line in out.splitlines()]
    assert len(docs) == 4 and {doc["event"] for doc in docs} == {"Newchannel"}
    stored = {doc["_id"]: doc for doc in filled_log_module.docs}
    for doc in docs:
        original = stored[doc["_id"]]
        assert doc["headers"] == original["headers"]  # every header, as sent
        ts = datetime.fromisoformat(doc["ts"])
        assert ts.utcoffset() == timedelta(0)
        assert abs(ts - original["ts"]) < timedelta(milliseconds=1)
        assert doc["state"] == "done"


def test_events_state_failed_lists_failed_and_dead_with_their_error(
    capsys: pytest.CaptureFixture[str], log: list[str], filled_log_module: FilledLog
) -> None:
    code, out, _ = run(capsys, "events", "--state", "failed", *log)
    assert code == 0
    rows = table(out)[1:]
    assert sorted(row.split()[6] for row in rows) == ["dead", "dead", "failed"]
    assert all(row.endswith(f"error: {ERROR}") for row in rows)
    code, out, _ = run(capsys, "events", "--state", "dead", "--json", *log)
    assert {json.loads(line)["_id"] for line in out.splitlines()} == set(filled_log_module.dead)


def test_events_time_span(
    capsys: pytest.CaptureFixture[str], log: list[str], filled_log_module: FilledLog
) -> None:
    stamps = sorted(doc["ts"] for doc in filled_log_module.pbx1)
    since = stamps[100].replace(microsecond=stamps[100].microsecond // 1000 * 1000)
    until = since + timedelta(milliseconds=5)
    expected = [d["_id"] for d in filled_log_module.pbx1 if since <= d["ts"] < until]
    assert expected
    code, out, _ = run(
        capsys,
        "events",
        "--json",
        "--server",
        "pbx1",
        "--since",
        since.isoformat(),
        "--until",
        until.strftime("%Y-%m-%d %H:%M:%S.%f"),  # no zone: UTC
        "--limit",
        "1000",
        *log,
    )
    assert code == 0
    assert sorted(json.loads(line)["_id"] for line in out.splitlines()) == sorted(expected)


def test_events_with_nothing_to_show(capsys: pytest.CaptureFixture[str], log: list[str]) -> None:
    code, out, err = run(capsys, "events", "--server", "nowhere", *log)
    assert (code, out, err) == (0, "", "no events match\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "amiworker: 'yesterday' is not a time: use an ISO 8601 time"),
        (["--follow", "--state", "dead"], "amiworker: --follow shows events as they are stored"),
        (["--limit", "-1"], "amiworker: --limit must be 0 or more"),
        (["--mongo-uri", "http://db"], "amiworker: invalid setting mongo_uri: must start with"),
        (
            ["--database", "bad.db"],
            "amiworker: invalid setting database: a MongoDB database name cannot contain '.'",
        ),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], log: list[str], args: list[str], message: str
) -> None:
    code, out, err = run(capsys, "events", *log, *args)
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1, err


@pytest.mark.parametrize("command", [["events"], ["call", CALL], ["status"], ["retry"]])
def test_unreachable_mongodb_is_one_line_naming_the_uri(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.setenv("AMIWORKER_CONNECT_TIMEOUT", "0.3")
    uri = f"mongodb://ops:hunter2@127.0.0.1:{free_port()}/"
    code, out, err = run(capsys, *command, "--mongo-uri", uri)
    assert code == 1 and out == ""
    assert err.startswith("amiworker: MongoDB at mongodb://ops:***@127.0.0.1:")
    assert "unreachable" in err and "check that it is running" in err
    assert "hunter2" not in err and err.count("\n") == 1


# -- call ------------------------------------------------------------------------------------


def test_call_tells_the_story(
    capsys: pytest.CaptureFixture[str], log: list[str], filled_log_module: FilledLog
) -> None:
    code, out, _ = run(capsys, "call", CALL, "--server", "pbx1", *log)
    assert code == 0
    assert out.startswith(f"Call {CALL} on pbx1: 34 event(s), 2026-11-26 06:46:21.054 .. ")
    channels = out[out.index("Channels:") : out.index("Events:")].splitlines()[2:]
    names = {
        m["Uniqueid"]: m["Channel"]
        for m in filled_log_module.messages
        if m.name == "Newchannel" and m["Linkedid"] == CALL
    }
    assert [line.split()[:2] for line in channels if line.strip()] == [
        [uniqueid, name] for uniqueid, name in names.items()
    ]
    assert all("16 Normal Clearing at 06:46:22.05" in line for line in channels if line.strip())
    events = out[out.index("Events:") : out.index("Projection")].splitlines()[2:]
    assert len([line for line in events if line.strip()]) == 34
    assert "LINKEDID" not in out  # one call: the column would say the same on every row
    assert f"none (no document with _id '{CALL}')" in out


def test_call_json_and_unknown_call(capsys: pytest.CaptureFixture[str], log: list[str]) -> None:
    code, out, _ = run(capsys, "call", FIRST_CALL, "--json", *log)
    assert code == 0
    story = json.loads(out)
    assert story["linkedid"] == FIRST_CALL and story["servers"] == ["pbx1", "pbx2"]
    assert story["projection"] is None
    assert {c["uniqueid"] for c in story["channels"]} == {"c20p5038-2-1", "c20p5038-2-2"}
    assert all(c["hangup_cause"] == "16" for c in story["channels"])
    assert [s["state"] for s in story["channels"][0]["states"]] == ["Down", "Up"]
    assert all(doc["linkedid"] in (FIRST_CALL, None) for doc in story["events"])

    code, out, err = run(capsys, "call", "nope", *log)
    assert (code, out) == (1, "") and err == "amiworker: no event with Linkedid 'nope'\n"


# -- status ----------------------------------------------------------------------------------


def test_status_marks_stale_workers(capsys: pytest.CaptureFixture[str], log: list[str]) -> None:
    code, out, _ = run(capsys, "status", *log)
    assert code == 0
    header, live, stale, stopped, summary = out.splitlines()
    assert header.split() == [
        "WORKER", "HOST", "PID", "PBXS", "SEEN", "WON", "LOST", "HANDLED", "FAILED", "DROPPED",
        "REJECTED", "QUEUE", "BACKLOG", "HEARTBEAT",
    ]  # fmt: skip
    assert live.startswith(LIVE_WORKER) and "pbx1 up, pbx2 DOWN" in live
    # SEEN WON LOST HANDLED FAILED DROPPED REJECTED QUEUE BACKLOG, then "0.2 s ago"
    assert live.split()[-12:-3] == ["1234", "600", "610", "590", "3", "0", "2", "7", "5"]
    assert live.endswith("s ago") and "STALE" not in live
    assert stale.startswith(STALE_WORKER) and stale.endswith("days ago  STALE")
    assert stopped.startswith(STOPPED_WORKER) and stopped.endswith("days ago  (stopped)")
    assert stopped.split()[3:5] == ["pbx1", "77"], "a stopped worker's PBXs: no session shown"
    assert summary == "3 worker(s), 1 stopped, 1 STALE (no heartbeat within the 10 s lease)"

    code, out, _ = run(capsys, "status", "--json", *log)
    rows = {row["worker_id"]: row for row in map(json.loads, out.splitlines())}
    assert rows[LIVE_WORKER]["stale"] is False and rows[STALE_WORKER]["stale"] is True
    assert rows[STOPPED_WORKER]["state"] == "stopped" and rows[STOPPED_WORKER]["stale"] is False
    assert rows[LIVE_WORKER]["counters"]["races_lost"] == 610
    assert rows[LIVE_WORKER]["servers"]["pbx2"]["connected"] is False
    assert 0 <= rows[LIVE_WORKER]["heartbeat_age"] < 10
    assert rows[LIVE_WORKER]["backlog"] == 5


def test_status_shows_hedged_and_spill_columns_when_they_apply() -> None:
    def worker(wid: str, mode: str, spilled: int = 0) -> WorkerStatus:
        return WorkerStatus(
            wid, "running", "h", 1, {"pbx1": {"connected": True}},
            {"owned": 10, "hedged": 2, "covered": 30}, 0, None, None, 0.1, False, 0, None,
            mode, {"window": 7}, {"events": spilled, "oldest_age": 3.0} if spilled else None,
        )  # fmt: skip

    out = io.StringIO()
    print_workers([worker("w1", "hedged", spilled=1500), worker("w2", "hedged")], 10, out)
    header, first, second, summary = out.getvalue().splitlines()
    assert header.split()[-6:] == ["OWNED", "HEDGED", "COVERED", "WINDOW", "SPILLED", "HEARTBEAT"]
    # OWNED HEDGED COVERED WINDOW SPILLED (oldest), then the heartbeat's "0.1 s ago"
    assert first.split()[-11:-3] == ["10", "2", "30", "7", "1500", "(3.0", "s", "ago)"]
    assert second.split()[-8:-3] == ["10", "2", "30", "7", "0"]
    assert summary == "2 worker(s), claim mode hedged (2)"
    out = io.StringIO()
    print_workers([worker("w1", "hedged"), worker("w2", "race")], 10, out)
    assert "different claim modes" in out.getvalue()

    def login(wid: str, events: str) -> WorkerStatus:
        servers = {"pbx1": {"connected": True, "login": f"amiworker:{events}"}}
        return WorkerStatus(wid, "running", "h", 1, servers, {}, 0, None, None, 0.1, False)

    assert fleet_warnings([login("w1", "on"), login("w2", "on")]) == []
    (warning,) = fleet_warnings([login("w1", "on"), login("w2", "call,system")])
    assert "different event filters" in warning and "amiworker:call,system" in warning
    race_only = io.StringIO()
    print_workers([worker("w3", "race")], 10, race_only)
    assert "OWNED" not in race_only.getvalue() and "SPILLED" not in race_only.getvalue()


def test_status_warns_of_mixed_handler_sets_and_missing_timestamps() -> None:
    def worker(wid: str, handlers: tuple[str, ...], stamped: bool = True) -> WorkerStatus:
        servers = {"pbx1": {"connected": True, "timestamps": stamped}}
        return WorkerStatus(
            wid, "running", "h", 1, servers, {}, 0, None, None, 0.1, False, 0, handlers
        )

    same = [worker("w1", ("Hangup", "Newchannel")), worker("w2", ("Newchannel", "Hangup"))]
    assert fleet_warnings(same) == []
    mixed = [*same, worker("w3", ("Hangup",), stamped=False)]
    handlers, stamps = fleet_warnings(mixed)
    assert "different handler sets" in handlers and "amiworker replay" in handlers
    assert "w3 handle Hangup" in handlers and "w1, w2 handle Hangup, Newchannel" in handlers
    assert stamps.startswith("pbx1 send(s) events without a Timestamp")
    # A stopped or stale worker's set does not count: it is not deciding anything.
    gone = WorkerStatus("w4", "stopped", "h", 1, {}, {}, 0, None, None, 99, False, 0, ("X",))
    assert fleet_warnings([*same, gone]) == []


# -- retry and replay: on a log of their own --------------------------------------------------


@pytest.fixture
def own_log(mongo_server: EmbeddedMongo) -> Iterator[tuple[list[str], FilledLog]]:
    name = f"t_{uuid.uuid4().hex[:16]}"

    async def setup() -> FilledLog:
        client = open_client(mongo_server.uri)
        try:
            return await fill(client[name])
        finally:
            await close_client(client)

    filled = asyncio.run(setup())
    yield ["--mongo-uri", mongo_server.uri, "--database", name], filled
    client: MongoClient[dict[str, Any]]
    with MongoClient(mongo_server.uri) as client:
        client.drop_database(name)


def test_retry_requeues_dead_events(
    capsys: pytest.CaptureFixture[str], own_log: tuple[list[str], FilledLog]
) -> None:
    flags, _ = own_log
    code, out, _ = run(capsys, "retry", "--server", "pbx2", *flags)
    assert (code, out) == (0, "re-queued 0 dead event(s): none matches\n")
    code, out, _ = run(capsys, "retry", "--event", "Hangup", *flags)
    assert out.startswith("re-queued 2 dead event(s); ")  # then who runs them, and when
    code, out, _ = run(capsys, "events", "--state", "dead", *flags)
    assert out == ""
    code, out, _ = run(capsys, "events", "--state", "failed", *flags)
    assert [row.split()[6] for row in table(out)[1:]] == ["failed"] * 3


def test_retry_with_no_worker_running_says_who_will_run_them(
    capsys: pytest.CaptureFixture[str],
    own_log: tuple[list[str], FilledLog],
    mongo_server: EmbeddedMongo,
) -> None:
    flags, _ = own_log
    client: MongoClient[dict[str, Any]]
    with MongoClient(mongo_server.uri) as client:
        client[flags[-1]].workers.delete_many({})  # the whole fleet stopped and forgotten
    code, out, _ = run(capsys, "retry", *flags)
    assert (code, out) == (
        0,
        "re-queued 2 dead event(s); no worker runs now: the first to start runs them\n",
    )


def test_replay_into_another_database(
    capsys: pytest.CaptureFixture[str], own_log: tuple[list[str], FilledLog]
) -> None:
    flags, filled = own_log
    target = f"{filled.name}_rebuilt"
    code, out, err = run(
        capsys, "replay", "--handlers", "handlers.calls", "--app-dir", str(ROOT),
        "--into", target, *flags,
    )  # fmt: skip
    assert code == 0, err
    # Newchannel, Newstate, Hangup: 6 per call, 20 calls on pbx1 and one on pbx2.
    assert out.startswith("replay: 126 event(s) read, 126 handler run(s), 0 failure(s) in ")
    assert out.endswith(f"(handlers handlers.calls, into database {target})\n")

    async def rebuilt() -> list[dict[str, Any]]:
        client = open_client(flags[1])
        try:
            return [doc async for doc in client[target]["calls"].find({})]
        finally:
            await client.drop_database(target)
            await close_client(client)

    calls = asyncio.run(rebuilt())
    assert len(calls) == 20 and all(call["active_channels"] == 0 for call in calls)
    # The log itself is untouched: still two dead events, one failed, one claimed.
    code, out, _ = run(capsys, "events", "--state", "failed", *flags)
    assert len(table(out)) == 4


def test_replay_refuses_a_broken_handler_module(
    capsys: pytest.CaptureFixture[str], log: list[str], tmp_path: Path
) -> None:
    (tmp_path / "broken.py").write_text("import no_such_module\n")
    code, out, err = run(capsys, "replay", "--handlers", "broken", "--app-dir", str(tmp_path), *log)
    assert code == 2 and out == ""
    assert err.startswith("amiworker: handler module 'broken' failed to import: ")


def test_replay_refuses_a_database_name_mongodb_would_refuse(
    capsys: pytest.CaptureFixture[str], log: list[str]
) -> None:
    code, out, err = run(
        capsys, "replay", "--handlers", "handlers.calls", "--app-dir", str(ROOT),
        "--into", "calls rebuilt", *log,
    )  # fmt: skip
    assert (code, out) == (2, "")
    assert err == "amiworker: --into 'calls rebuilt': a MongoDB database name cannot contain ' '\n"


# -- the real entry point, in processes ------------------------------------------------------


def entry_point() -> list[str]:
    script = Path(sys.executable).parent / "amiworker"
    return [str(script)] if script.exists() else [sys.executable, "-m", "amiworker.cli"]


async def test_events_json_from_the_real_command(
    log: list[str], filled_log_module: FilledLog
) -> None:
    process = await asyncio.create_subprocess_exec(
        *entry_point(), "events", "--json", "--limit", "3", *log,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    newest = sorted(filled_log_module.docs, key=event_order)[-3:]
    assert [json.loads(line)["_id"] for line in lines] == [doc["_id"] for doc in newest]


class Follower:
    """``amiworker events --follow --json`` as a child process, its lines as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    async def read(self, count: int, timeout: float = 15.0) -> list[str]:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            while len(self.lines) < count:
                line = await self.process.stdout.readline()
                assert line, f"the follower exited: {await self.stderr()}"
                self.lines.append(line.decode())
        return self.lines

    async def stderr(self) -> str:
        assert self.process.stderr is not None
        return (await self.process.stderr.read()).decode()

    async def interrupt(self) -> tuple[int, str]:
        """Ctrl-C; every line printed until then is in ``lines``."""
        assert self.process.stdout is not None
        self.process.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            rest = await self.process.stdout.read()
            code = await self.process.wait()
        self.lines += rest.decode().splitlines(keepends=True)
        return code, await self.stderr()


@pytest.mark.parametrize("how", [[], ["--poll", "--poll-interval", "0.05"]], ids=["auto", "poll"])
async def test_follow_prints_events_stored_after_it_started(
    mongo_server: EmbeddedMongo, database_name: str, capture_events: list[Message], how: list[str]
) -> None:
    client = open_client(mongo_server.uri)
    store = LockTable(client[database_name], "events", "live-worker")
    old, new = capture_events[:10], capture_events[10:40]
    try:
        await store.claim(documents(old, "pbx1"))
        process = await asyncio.create_subprocess_exec(
            *entry_point(), "events", "--follow", "--json", "--limit", "4", *how,
            "--mongo-uri", mongo_server.uri, "--database", database_name,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        follower = Follower(process)
        try:
            backlog = list(await follower.read(4))
            # Stored now, as a worker stores them: received now, in three batches.
            docs = documents(new, "pbx2")
            now = datetime.now(UTC)
            for doc in docs:
                doc["received_at"] = now
            for start in range(0, len(docs), 10):
                await store.claim(docs[start : start + 10])
            lines = await follower.read(4 + len(docs))
            await asyncio.sleep(0.3)  # a few more polls: nothing may come twice
        finally:
            if process.returncode is None:
                code, err = await follower.interrupt()
                assert code == 130 and "Traceback" not in err, err
    finally:
        await client.drop_database(database_name)
        await close_client(client)
    assert [json.loads(line)["_id"] for line in backlog] == [
        doc["_id"] for doc in documents(old, "pbx1")[-4:]
    ]
    shown = [json.loads(line)["_id"] for line in lines[4:]]
    assert sorted(shown) == sorted(doc["_id"] for doc in docs)


# -- against a real fleet run: simulated PBXs, `amiworker --workers 2`, calls projection ------


@pytest.fixture
def fleet(fleet_run: FleetRun) -> Iterator[tuple[list[str], Any]]:
    """The setting flags for the fleet run's database, and that database (PyMongo)."""
    client: MongoClient[dict[str, Any]]
    with MongoClient(fleet_run.mongo_uri, tz_aware=True) as client:
        yield (
            ["--mongo-uri", fleet_run.mongo_uri, "--database", fleet_run.database],
            client[fleet_run.database],
        )


def test_fleet_run_events_table_and_json(
    capsys: pytest.CaptureFixture[str], fleet: tuple[list[str], Any]
) -> None:
    flags, db = fleet
    # Asterisk's Timestamp (fixed width, microseconds) orders one PBX's events.
    newest = list(
        db.events.find({"server": "pbx2", "event": "Hangup"}).sort("headers.timestamp", -1).limit(6)
    )[::-1]
    code, out, _ = run(capsys, "events", "--server", "pbx2", "--event", "Hangup", "--limit", "6",
                       "--json", *flags)  # fmt: skip
    assert code == 0
    docs = [json.loads(line) for line in out.splitlines()]
    assert [doc["_id"] for doc in docs] == [doc["_id"] for doc in newest]
    assert all(doc["state"] == "done" and doc["headers"]["cause"] for doc in docs)

    code, out, _ = run(capsys, "events", "--server", "pbx2", "--event", "Hangup", "--limit", "6",
                       *flags)  # fmt: skip
    rows = table(out)[1:]
    assert [row.split()[4] for row in rows] == [doc["uniqueid"] for doc in newest]
    assert all(" cause=" in row and row.split()[6] == "done" for row in rows)

    code, out, err = run(capsys, "events", "--state", "failed", *flags)
    assert (code, out, err) == (0, "", "no events match\n")


def test_fleet_run_call(capsys: pytest.CaptureFixture[str], fleet: tuple[list[str], Any]) -> None:
    flags, db = fleet
    projection = db.calls.find_one({"server": "pbx1"}, sort=[("_id", 1)])
    linkedid = projection["_id"]
    found = list(db.events.find({"server": "pbx1", "linkedid": linkedid}))
    channels = {doc["uniqueid"] for doc in found}
    found += db.events.find({"server": "pbx1", "uniqueid": {"$in": sorted(channels)}})
    count = len({doc["_id"] for doc in found})
    assert count == CHANNEL_EVENTS_PER_CALL
    code, out, _ = run(capsys, "call", linkedid, "--server", "pbx1", *flags)
    assert code == 0
    assert out.startswith(f"Call {linkedid} on pbx1: {count} event(s), ")
    for name in projection["channels"]:
        assert f"  {name}  " in out
    assert '"hangup_cause_txt": "Normal Clearing"' in out.split("Projection (calls):")[1]

    code, out, _ = run(capsys, "call", linkedid, "--server", "pbx1", "--json", *flags)
    story = json.loads(out)
    assert len(story["events"]) == count
    assert sorted(c["name"] for c in story["channels"]) == projection["channels"]
    assert story["projection"]["_id"] == linkedid
    assert story["projection"]["duration"] == projection["duration"]
    assert {c["hangup_cause"] for c in story["channels"]} == {str(projection["hangup_cause"])}


def test_fleet_run_status_and_retry(
    capsys: pytest.CaptureFixture[str], fleet: tuple[list[str], Any], fleet_run: FleetRun
) -> None:
    flags, db = fleet
    code, out, _ = run(capsys, "status", "--json", *flags)
    assert code == 0
    workers = [json.loads(line) for line in out.splitlines()]
    assert len(workers) == 2 and {w["state"] for w in workers} == {"stopped"}
    assert not any(w["stale"] for w in workers)
    # Every channel event was won by exactly one of them.
    assert sum(w["counters"]["races_won"] for w in workers) == db.events.count_documents({})
    for worker in workers:
        row = db.workers.find_one({"_id": worker["worker_id"]})
        assert worker["counters"] == row["counters"] and worker["pid"] == row["pid"]

    code, out, _ = run(capsys, "status", *flags)
    lines = out.splitlines()
    assert len(lines) == 4 and lines[-1] == "2 worker(s), 2 stopped"
    assert all(line.split()[3:5] == ["pbx1,", "pbx2"] for line in lines[1:3]), lines

    code, out, _ = run(capsys, "retry", *flags)
    assert out.startswith("re-queued 0 dead event(s)")


def test_fleet_run_replay_rebuilds_the_live_projection(
    capsys: pytest.CaptureFixture[str], fleet: tuple[list[str], Any], fleet_run: FleetRun
) -> None:
    flags, db = fleet
    target = f"{fleet_run.database}_{uuid.uuid4().hex[:8]}"
    live = {doc["_id"]: doc for doc in db.calls.find({})}
    assert len(live) == fleet_run.calls_per_server * len(fleet_run.servers)
    try:
        code, out, err = run(
            capsys, "replay", "--handlers", "handlers.calls", "--app-dir", str(ROOT),
            "--into", target, *flags,
        )  # fmt: skip
        rebuilt = {doc["_id"]: doc for doc in db.client[target]["calls"].find({})}
    finally:
        db.client.drop_database(target)
    assert code == 0, err
    handled = db.events.count_documents({"event": {"$in": ["Newchannel", "Newstate", "Hangup"]}})
    assert out.startswith(f"replay: {handled} event(s) read, {handled} handler run(s), 0 failure")
    # Built by two workers racing, in whatever order they won the events; rebuilt
    # by one replay in stored order: the same documents.
    assert rebuilt == live


@pytest.mark.parametrize("how", [[], ["--poll", "--poll-interval", "0.05"]], ids=["auto", "poll"])
async def test_follow_prints_what_a_live_worker_stores(
    live_worker: tuple[Worker, list[FakePBX]],
    mongo_uri: str,
    capture_events: list[Message],
    how: list[str],
) -> None:
    worker, pbxs = live_worker
    events = worker.store.events
    # One older event: once the follower has printed it, it is following.
    (marker,) = documents(capture_events[:1], "pbx-old")
    await events.insert_one(marker)
    process = await asyncio.create_subprocess_exec(
        *entry_point(), "events", "--follow", "--json", "--limit", "1", *how,
        "--mongo-uri", mongo_uri, "--database", worker.store.database.name,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    follower = Follower(process)
    try:
        (first,) = await follower.read(1)
        assert json.loads(first)["_id"] == marker["_id"]
        for pbx in pbxs:
            await pbx.start_call()
        await follower.read(1 + 2 * CHANNEL_EVENTS_PER_CALL, timeout=20)
        await asyncio.sleep(0.3)  # a few more polls: nothing may come twice
    finally:
        code, err = await follower.interrupt()
    assert code == 130 and "Traceback" not in err, err
    shown = [json.loads(line)["_id"] for line in follower.lines[1:]]
    assert len(shown) == len(set(shown)) == 2 * CHANNEL_EVENTS_PER_CALL
    stored = [doc["_id"] async for doc in events.find({"server": {"$ne": "pbx-old"}}, {"_id": 1})]
    assert sorted(shown) == sorted(stored)
