"""The call board's fold of channel events into calls, and its rate counter (no server).

What is expected comes from the real Asterisk 22 capture (20 calls of two
Local channels each, Normal Clearing after about a second), not from the code.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from amiworker.ops.board.calls import CallTable, iso
from amiworker.ops.board.rates import BUCKET, WINDOW, RateCounter
from amiworker.ops.filters import event_order
from tests.board_helpers import call_docs
from tests.log_plugin import documents, read_capture

START = datetime(2026, 12, 1, 12, 0, tzinfo=UTC).timestamp()
NOW = datetime.fromtimestamp(START + 60, UTC)


def fold(
    docs: list[dict[str, Any]], max_age: float = 3600, now: datetime = NOW, ended_limit: int = 15
) -> CallTable:
    table = CallTable(max_age, ended_limit)
    table.expire(now)
    for doc in docs:
        table.apply(doc)
    return table


def test_the_captured_calls_all_end_with_their_cause_and_duration() -> None:
    docs = sorted(documents(read_capture(), "pbx1"), key=event_order)
    capture_now = max(doc["ts"] for doc in docs) + timedelta(seconds=1)
    table = fold(docs, now=capture_now, ended_limit=25)
    snapshot = table.snapshot(capture_now)
    assert snapshot["calls"] == []
    ended = snapshot["ended"]
    assert len(ended) == 20
    assert {(e["cause"], e["cause_txt"], e["channels"]) for e in ended} == {
        ("16", "Normal Clearing", 2)
    }
    assert all(0.9 < e["duration"] < 1.2 for e in ended)
    # Newest first; each carries its caller ("Test N" <100N>).
    assert [e["ended"] for e in ended] == sorted((e["ended"] for e in ended), reverse=True)
    assert all(e["caller_id_name"] == f"Test {int(e['caller_id_num']) - 1000}" for e in ended)


def test_a_call_without_its_hangups_is_in_progress_with_both_channels() -> None:
    table = fold(call_docs("pbx1", 7, START, up=True, caller=("Alice", "2001")))
    (call,) = table.snapshot(NOW)["calls"]
    assert call["server"] == "pbx1" and call["linkedid"] == "b7-1"
    assert call["started"] == iso(datetime.fromtimestamp(START, UTC))
    channels = {c["uniqueid"]: c for c in call["channels"]}
    assert set(channels) == {"b7-1", "b7-2"}
    assert channels["b7-1"]["channel"] == "Local/100@test-00000007;1"
    assert {c["state"] for c in channels.values()} == {"Up"}
    assert {c["caller_id_name"] for c in channels.values()} == {"Alice"}
    assert {c["caller_id_num"] for c in channels.values()} == {"2001"}
    assert {c["connected_line_name"] for c in channels.values()} == {"Alice"}


def test_any_arrival_order_gives_the_same_board_and_nothing_comes_back() -> None:
    up = call_docs("pbx1", 1, START, up=True)
    ended = call_docs("pbx2", 2, START)
    expected = fold(sorted(up + ended, key=event_order)).snapshot(NOW)["calls"]
    for seed in range(20):
        docs = up + ended
        random.Random(seed).shuffle(docs)
        table = fold(docs)
        # Values of the newest event win whatever came last; the ended call never shows.
        assert table.snapshot(NOW)["calls"] == expected
        # Folding it all again (the log read, then the stream) changes nothing.
        before = table.snapshot(NOW)
        for doc in docs:
            assert not table.apply(doc) or doc["event"] != "Hangup"
        assert table.snapshot(NOW) == before


def test_calls_on_two_pbxs_with_the_same_ids_stay_apart() -> None:
    table = fold(call_docs("pbx1", 3, START, up=True) + call_docs("pbx2", 3, START + 1))
    calls = table.snapshot(NOW)["calls"]
    assert [(c["server"], c["linkedid"]) for c in calls] == [("pbx1", "b3-1")]
    assert [(e["server"], e["linkedid"]) for e in table.snapshot(NOW)["ended"]] == [
        ("pbx2", "b3-1")
    ]


def test_a_call_whose_hangup_was_missed_leaves_after_max_age() -> None:
    table = fold(call_docs("pbx1", 4, START, up=True), max_age=600)
    assert len(table.calls) == 1
    assert not table.expire(NOW + timedelta(seconds=500))
    assert table.expire(NOW + timedelta(seconds=600))
    assert table.snapshot(NOW)["calls"] == []
    # Its events, folded again (a read of the log), cannot bring it back.
    for doc in call_docs("pbx1", 4, START, up=True):
        table.apply(doc)
    assert table.calls == {}


def test_a_table_read_afresh_remembers_the_channels_that_hung_up() -> None:
    old = fold(call_docs("pbx1", 5, START))  # up, then hung up
    late = [d for d in call_docs("pbx1", 5, START) if d["event"] == "Newstate"]
    fresh = CallTable(3600)  # a new read of the log that did not include call 5
    fresh.inherit(old)
    for doc in late:  # stored late by a slow worker
        assert not fresh.apply(doc)
    assert fresh.calls == {}


def test_ended_calls_keep_the_newest() -> None:
    table = CallTable(3600, ended_limit=5)
    docs = [doc for n in range(12) for doc in call_docs("pbx1", n, START + n)]
    for doc in sorted(docs, key=event_order):
        table.apply(doc)
    ended = table.snapshot(NOW)["ended"]
    assert [e["linkedid"] for e in ended] == [f"b{n}-1" for n in (11, 10, 9, 8, 7)]


def test_rates_count_per_bucket_and_forget_the_old() -> None:
    rates = RateCounter()
    now = datetime.fromtimestamp(1_800_000_000, UTC)
    for seconds_ago, server in [(1, "pbx1"), (2, "pbx1"), (15, "pbx2"), (WINDOW + 30, "pbx1")]:
        rates.add(server, now - timedelta(seconds=seconds_ago))
    rates.know(["pbx3"])
    snapshot = rates.snapshot(now)
    assert snapshot["bucket"] == BUCKET and snapshot["window"] == WINDOW
    series = snapshot["servers"]
    assert set(series) == {"pbx1", "pbx2", "pbx3"}
    assert all(len(points) == WINDOW // BUCKET for points in series.values())
    assert sum(series["pbx1"]) == 2 and sum(series["pbx2"]) == 1 and sum(series["pbx3"]) == 0
    # 10 s buckets on the clock: the last one is now's (just begun), the one before
    # holds 1 and 2 s ago, the one before that 15 s ago.
    assert series["pbx1"][-3:] == [0, 2, 0]
    assert series["pbx2"][-3:] == [1, 0, 0]
    later = rates.snapshot(now + timedelta(seconds=WINDOW))
    assert sum(later["servers"]["pbx1"]) == 0
