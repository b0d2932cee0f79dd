"""The call board's JSON API, its live stream, the token rule and the masking of secrets.

A real ``amiworker board`` process reads a real nx-27017 holding the 20 real
calls of the capture (with their dead and failed Hangups and the ``workers``
rows of tests/log_plugin.py), plus calls stored now: two in progress, one
just ended.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from amiworker.cli import main
from amiworker.devstack.board_process import BoardProcess
from amiworker.devstack.embedded_mongo import EmbeddedMongo
from amiworker.mongo import close_client, open_client
from amiworker.ops.board.command import is_loopback
from tests.board_helpers import call_docs, get_json, post, raw_get
from tests.log_plugin import LIVE_WORKER, STALE_WORKER, STOPPED_WORKER, fill

AMI_SECRET = "ami-s3cret-Value"
TOKEN = "board-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET_WORKER = "host-d-w0-404-bbb222"


@dataclass
class Board:
    process: BoardProcess
    url: str
    db: Any  # a synchronous pymongo database
    mongo_uri: str
    dead: list[str]
    failed: list[str]
    secret_dead: str


def _now() -> float:
    return time.time()


@pytest.fixture(scope="module")
def board(mongo_server: EmbeddedMongo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    name = f"t_board_{uuid.uuid4().hex[:12]}"

    async def setup() -> Any:
        client = open_client(mongo_server.uri, serverSelectionTimeoutMS=5000)
        try:
            return await fill(client[name])
        finally:
            await close_client(client)

    log = asyncio.run(setup())
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_server.uri, tz_aware=True)
    db = client[name]
    now = _now()
    db.events.insert_many(
        call_docs("pbx1", 900, now - 120, up=True, caller=("Alice", "2001"))
        + call_docs("pbx2", 901, now - 60, up=True, caller=("Bob", "2002"))
        + call_docs("pbx1", 902, now - 30, caller=("Carol", "2003"))
    )
    # A handler error that quotes the AMI secret and the MongoDB URI, as a careless one can.
    secret_doc = call_docs("pbx1", 903, now - 3600)[-1]
    secret_doc.update(
        state="dead",
        attempts=5,
        error=f"RuntimeError: login {AMI_SECRET} failed at {mongo_server.uri}",
    )
    db.events.insert_one(secret_doc)
    db.workers.insert_one(
        {
            "_id": SECRET_WORKER,
            "state": "running",
            "host": "host-d",
            "pid": 404,
            "mode": "hedged",
            "backlog": 12,
            "spill": {"events": 3, "bytes": 4096, "oldest_age": 1.5},
            "handlers": ["Hangup", "Newchannel"],
            "servers": {
                "pbx1": {"connected": True, "since": datetime.now(UTC), "ami_version": "11.0.0"},
                "pbx2": {"connected": False, "last_error": f"login refused for {AMI_SECRET}"},
            },
            "counters": {"events_seen": 10, "rejected": 2, "owned": 5, "failed": 1},
            "last_seen": datetime.now(UTC),
        }
    )
    servers = [{"name": "pbx1", "host": "127.0.0.1", "username": "amiworker", "secret": AMI_SECRET}]
    process = BoardProcess(
        tmp_path_factory.mktemp("board-api"),
        mongo_uri=mongo_server.uri,
        database=name,
        extra_env={
            "AMIWORKER_BOARD_TOKEN": TOKEN,
            "AMIWORKER_SERVERS": json.dumps(servers),
            "AMIWORKER_LEASE": "600",
        },
    )
    process.start()
    try:
        yield Board(
            process, process.url, db, mongo_server.uri, log.dead, log.failed, secret_doc["_id"]
        )
    finally:
        code = process.stop()
        client.drop_database(name)
        client.close()
        assert code == 0, process.log_text()[-3000:]


# -- the command: no server needed ----------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.1.2.3", False),
     ("board.example.com", False)],
)  # fmt: skip
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_public_address_without_a_token_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.delenv("AMIWORKER_BOARD_TOKEN", raising=False)
    assert main(["board", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "board_token" in err[0] and "0.0.0.0" in err[0]


def test_a_short_token_is_refused_and_not_echoed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AMIWORKER_BOARD_TOKEN", "abc1")
    assert main(["board", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "too short" in err and "abc1" not in err


# -- the API ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_calls_in_progress_and_just_ended(board: Board) -> None:
    data = get_json(board.url + "/api/calls")
    calls = {(c["server"], c["linkedid"]): c for c in data["calls"]}
    assert set(calls) == {("pbx1", "b900-1"), ("pbx2", "b901-1")}
    alice = calls[("pbx1", "b900-1")]
    assert [c["uniqueid"] for c in alice["channels"]] == ["b900-1", "b900-2"]
    for channel in alice["channels"]:
        assert channel["state"] == "Up"
        assert (channel["caller_id_name"], channel["caller_id_num"]) == ("Alice", "2001")
        assert channel["channel"].startswith("Local/100@test-00000384;")
    started = datetime.fromisoformat(alice["started"])
    assert abs((datetime.now(UTC) - started).total_seconds() - 120) < 30
    ended = {e["linkedid"]: e for e in data["ended"]}
    carol = ended["b902-1"]
    assert (carol["server"], carol["cause"], carol["cause_txt"]) == (
        "pbx1",
        "16",
        "Normal Clearing",
    )
    assert carol["caller_id_name"] == "Carol" and 0.9 < carol["duration"] < 1.2
    # The capture's calls are days old: older than board_call_max_age, not shown.
    assert not any(e["linkedid"].startswith("c20") for e in data["ended"])


@pytest.mark.slow
def test_fleet(board: Board) -> None:
    data = get_json(board.url + "/api/fleet")
    assert data["lease"] == 600
    workers = {w["id"]: w for w in data["workers"]}
    assert set(workers) == {LIVE_WORKER, STALE_WORKER, STOPPED_WORKER, SECRET_WORKER}
    assert not workers[LIVE_WORKER]["stale"] and workers[STALE_WORKER]["stale"]
    assert workers[STOPPED_WORKER]["state"] == "stopped" and not workers[STOPPED_WORKER]["stale"]
    live = workers[LIVE_WORKER]
    assert live["queue_depth"] == 7 and live["mode"] is None and live["spill"] is None
    assert [(s["pbx"], s["connected"]) for s in live["sessions"]] == [
        ("pbx1", True),
        ("pbx2", False),
    ]
    new = workers[SECRET_WORKER]
    assert (new["mode"], new["backlog"], new["handlers"]) == (
        "hedged",
        12,
        ["Hangup", "Newchannel"],
    )
    assert new["spill"] == {"events": 3, "bytes": 4096, "oldest_age": 1.5}
    assert new["counters"]["rejected"] == 2 and new["counters"]["owned"] == 5
    assert new["sessions"][1]["last_error"] == "login refused for ***"


@pytest.mark.slow
def test_rates(board: Board) -> None:
    deadline = time.monotonic() + 30
    while not (data := get_json(board.url + "/api/rates"))["complete"]:
        assert time.monotonic() < deadline, "the past 15 minutes were never counted"
        time.sleep(0.1)
    assert (data["bucket"], data["window"]) == (10, 900)
    series = data["servers"]
    assert {"pbx1", "pbx2"} <= set(series)
    # pbx1: a call in progress (29 events: 34 less its 5 of hanging up) and one ended
    # (34) in the last minutes; pbx2: one in progress.
    assert sum(series["pbx1"]) == 29 + 34 and sum(series["pbx2"]) == 29
    assert all(len(points) == 90 for points in series.values())


@pytest.mark.slow
def test_failures_with_their_error_masked(board: Board) -> None:
    data = get_json(board.url + "/api/failures")
    failures = {f["id"]: f for f in data["failures"]}
    assert {*board.dead, *board.failed, board.secret_dead} <= set(failures)
    dead = failures[board.dead[0]]
    assert (dead["state"], dead["event"], dead["server"]) == ("dead", "Hangup", "pbx1")
    assert dead["error"] == "ValueError: no such extension (handlers/billing.py:42)"
    assert failures[board.failed[0]]["retry_at"] is not None
    assert failures[board.secret_dead]["error"] == "RuntimeError: login *** failed at ***"


@pytest.mark.slow
def test_retry_needs_the_token_and_revives_one_dead_event(board: Board) -> None:
    target = board.dead[1]
    url = f"{board.url}/api/failures/{target}/retry"
    assert post(url)[0] == 401
    assert post(url, {"Authorization": "Bearer wrong-token-123"})[0] == 401
    status, body = post(url, {**AUTH, "Origin": "http://evil.example"})
    assert status == 403, body
    assert board.db.events.find_one({"_id": target})["state"] == "dead"

    status, body = post(url, {**AUTH, "Origin": board.url})
    assert (status, body) == (200, {"id": target, "state": "failed"})
    doc = board.db.events.find_one({"_id": target})
    server_now = board.db.command("hello")["localTime"].replace(tzinfo=UTC)
    assert (doc["state"], doc["attempts"]) == ("failed", 0)
    assert isinstance(doc["retry_at"], datetime) and doc["retry_at"] <= server_now
    # Only that one: the other dead event is untouched.
    assert board.db.events.find_one({"_id": board.dead[0]})["state"] == "dead"
    assert post(url, AUTH)[0] == 409  # not dead any more
    assert post(f"{board.url}/api/failures/no-such-event/retry", AUTH)[0] == 404
    # The failures list shows it failed within a few seconds, without a reload.
    deadline = time.monotonic() + 10
    while True:
        states = {f["id"]: f["state"] for f in get_json(board.url + "/api/failures")["failures"]}
        if states.get(target) == "failed":
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.slow
def test_no_secret_and_no_uri_in_anything_served(board: Board) -> None:
    paths = ["/", "/static/board.js", "/static/board.css", "/api/calls", "/api/fleet",
             "/api/rates", "/api/failures", "/api/status"]  # fmt: skip
    bodies = [raw_get(board.url + path) for path in paths]
    bodies.append((200, _stream_start(board.url)))
    for status, body in bodies:
        assert status == 200
        text = body.decode()
        assert AMI_SECRET not in text and TOKEN not in text
        assert "mongodb://" not in text and board.mongo_uri not in text
    log = board.process.log_text()
    assert AMI_SECRET not in log and TOKEN not in log


@pytest.mark.slow
def test_the_page_is_guarded(board: Board) -> None:
    status, _ = raw_get(board.url + "/")
    assert status == 200
    request = http.client.HTTPConnection(board.url.removeprefix("http://"), timeout=10)
    request.request("GET", "/")
    reply = request.getresponse()
    reply.read()
    csp = reply.getheader("Content-Security-Policy") or ""
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert reply.getheader("X-Content-Type-Options") == "nosniff"
    # Bound to loopback: a request naming another host (DNS rebinding) is refused.
    assert raw_get(board.url + "/api/calls", {"Host": "evil.example:8080"})[0] == 400


def _stream_start(url: str, seconds: float = 2.0) -> bytes:
    """What /api/stream sends in its first ``seconds``."""
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=seconds)
    connection.request("GET", "/api/stream")
    reply = connection.getresponse()
    assert reply.getheader("Content-Type", "").startswith("text/event-stream")
    data = b""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and data.count(b"event: ") < 5:
            chunk = reply.fp.read1(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        pass
    finally:
        connection.close()
    return data


def _seen_within(board_url: str, db: Any, n: int, timeout: float = 15.0) -> float:
    """Store call ``n`` (in progress) now; seconds until ``GET /api/calls`` shows it."""
    docs = call_docs("pbx2", n, _now(), up=True)
    started = time.monotonic()
    db.events.insert_many(docs)
    while True:
        calls = get_json(board_url + "/api/calls")["calls"]
        if any(c["linkedid"] == f"b{n}-1" and len(c["channels"]) == 2 for c in calls):
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"call b{n}-1 never showed"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_stored_call_shows_within_a_second_by_change_stream(board: Board) -> None:
    assert get_json(board.url + "/api/status")["live"] == "changes"
    took = _seen_within(board.url, board.db, 910)
    print(f"\nchange stream: a stored call on /api/calls after {took * 1000:.0f} ms")
    assert took < 1.0


@pytest.mark.slow
def test_a_stored_call_shows_within_the_poll_interval_when_polling(
    board: Board, tmp_path: Path
) -> None:
    process = BoardProcess(
        tmp_path,
        mongo_uri=board.mongo_uri,
        database=board.db.name,
        extra_args=["--poll", "--poll-interval", "0.5"],
    ).start()
    try:
        status = get_json(process.url + "/api/status")
        assert (status["live"], status["poll_interval"]) == ("poll", 0.5)
        took = _seen_within(process.url, board.db, 911)
        print(f"\npolling every 0.5 s: a stored call on /api/calls after {took * 1000:.0f} ms")
        assert took < 0.5 + 0.5
        # Hung up: gone within the same bound.
        started = time.monotonic()
        board.db.events.insert_many(
            [d for d in call_docs("pbx2", 911, _now()) if d["event"] == "Hangup"]
        )
        while any(c["linkedid"] == "b911-1" for c in get_json(process.url + "/api/calls")["calls"]):
            assert time.monotonic() - started < 5
            time.sleep(0.02)
        assert time.monotonic() - started < 0.5 + 0.5
    finally:
        assert process.stop() == 0


@pytest.mark.slow
def test_stream_sends_every_section_then_changes(board: Board) -> None:
    data = _stream_start(board.url)
    names = [line.split(b": ", 1)[1] for line in data.splitlines() if line.startswith(b"event: ")]
    assert set(names) >= {b"status", b"calls", b"rates", b"fleet", b"failures"}
    calls = data.split(b"event: calls\ndata: ", 1)[1].split(b"\n", 1)[0]
    assert {c["linkedid"] for c in json.loads(calls)["calls"]} >= {"b900-1", "b901-1"}


def test_the_api_answers_503_at_once_while_mongodb_is_known_unreachable(tmp_path: Path) -> None:
    """Not after holding each request READY_TIMEOUT (15 s) for a first read that cannot
    come: the page and its scripts learn at once, and say so."""
    from amiworker.devstack.embedded_mongo import free_port

    process = BoardProcess(
        tmp_path,
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}/",
        database="unreachable",
        extra_env={"AMIWORKER_STORE_TIMEOUT": "0.5"},
    ).start(wait_ready=False)
    try:
        deadline = time.monotonic() + 30
        while not process.status().get("problem"):
            assert time.monotonic() < deadline, process.log_text()[-2000:]
            time.sleep(0.1)
        for section in ("calls", "rates", "fleet", "failures"):
            connection = http.client.HTTPConnection(process.url.removeprefix("http://"), timeout=5)
            try:
                connection.request("GET", f"/api/{section}")
                reply = connection.getresponse()
                assert reply.status == 503
                assert json.loads(reply.read()) == {
                    "error": "MongoDB is unreachable or failing; the board retries"
                }
            finally:
                connection.close()
    finally:
        assert process.stop() == 0


def test_a_page_streaming_does_not_hold_the_stop(
    mongo_server: EmbeddedMongo, tmp_path: Path
) -> None:
    """An open page's stream ends when the board stops (the page reconnects by itself),
    rather than being cancelled with a traceback once the graceful shutdown times out."""
    process = BoardProcess(
        tmp_path, mongo_uri=mongo_server.uri, database=f"t_board_{uuid.uuid4().hex[:12]}"
    ).start()
    connection = http.client.HTTPConnection(process.url.removeprefix("http://"), timeout=15)
    try:
        connection.request("GET", "/api/stream")
        reply = connection.getresponse()
        assert b"retry: 1000" in reply.fp.read1(65536)
        assert process.stop() == 0
        while reply.fp.read1(65536):  # what was sent before the stop, then the end
            pass
    finally:
        connection.close()
        process.stop()  # a no-op once stopped; a failed check must not leave it running
    log = process.log_text()
    assert "timeout graceful shutdown exceeded" not in log, log[-3000:]
    assert "Exception in ASGI application" not in log and "Traceback" not in log, log[-3000:]
