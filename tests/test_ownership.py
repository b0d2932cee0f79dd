"""Hedged mode's ownership rule, decided by every worker on its own: each event has
exactly one owner per view, the standbys agree on who it is and on their order,
a view change never leaves an event with no owner, rendezvous hashing moves
only the events of the worker that came or went, and a call's events share
one owner."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from amiworker.ami.protocol import Parser
from amiworker.fleet.dedup import DedupKeys, belongs_to_channel
from amiworker.fleet.ownership import Ownership, View, owner_hash, owner_under, owns_under

worker_ids = st.lists(
    st.text(alphabet="abcdefghij0123456789-:", min_size=1, max_size=12),
    min_size=1,
    max_size=8,
    unique=True,
)
# Events as ownership sees them: their owner_hash (of their call, or of their key).
event_keys = st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=30)


def fleet(workers: list[str], transition: float = 5.0) -> dict[str, Ownership]:
    ownerships = {w: Ownership(w, transition) for w in workers}
    for ownership in ownerships.values():
        ownership.update("pbx1", workers, now=0.0)
    return ownerships


@settings(max_examples=200, deadline=None)
@given(worker_ids, event_keys)
def test_each_event_has_one_owner_and_the_standbys_agree_on_it_and_their_order(
    workers: list[str], keys: list[int]
) -> None:
    ownerships = fleet(workers)
    view = View.of(workers)
    for key in keys:
        decisions = {w: o.decide("pbx1", key) for w, o in ownerships.items()}
        owners = [w for w, (owned, *_) in decisions.items() if owned]
        assert owners == [view.owner(key)] == [owner_under(key, workers)], key
        ranking = view.ranking(key)
        assert ranking[0] == owners[0]
        for worker, (owned, assignments, rank, ahead) in decisions.items():
            assert owns_under(key, worker, [workers]) is owned
            if not owned:
                assert [a.owner for a in assignments] == owners
                assert assignments[0].workers == view.workers
                assert rank == ranking.index(worker), "rank 1 hedges first"
                assert set(ahead) == set(ranking[:rank]), "behind the owner and those before"


@settings(max_examples=200, deadline=None)
@given(worker_ids, st.text(alphabet="xyz", min_size=1, max_size=4), event_keys)
def test_a_worker_joining_takes_only_events_it_now_wins(
    workers: list[str], newcomer: str, keys: list[int]
) -> None:
    if newcomer in workers:
        return
    before, after = View.of(workers), View.of([*workers, newcomer])
    for key in keys:
        assert after.owner(key) in (before.owner(key), newcomer), "nothing else moves"


@settings(max_examples=100, deadline=None)
@given(worker_ids, event_keys)
def test_during_a_view_change_a_worker_owns_under_the_old_view_and_the_new(
    workers: list[str], keys: list[int]
) -> None:
    newcomer = "zz-newcomer"
    old, new = View.of(workers), View.of([*workers, newcomer])
    changed = time.monotonic()
    within = {w: Ownership(w, transition=60.0) for w in workers}  # the change is recent
    past = {w: Ownership(w, transition=0.0) for w in workers}  # the change is over
    for o in (*within.values(), *past.values()):
        o.update("pbx1", workers, now=changed - 1)
        o.update("pbx1", [*workers, newcomer], now=changed)
    for key in keys:
        for worker, o in within.items():
            # A peer that has not seen the newcomer yet still claims by the old view:
            # the old owner keeps claiming, so the event is owned whichever view rules.
            owned, assignments, *_ = o.decide("pbx1", key)
            assert owned is (worker in (old.owner(key), new.owner(key)))
            if not owned:
                assert {a.owner for a in assignments} == {old.owner(key), new.owner(key)}
        for worker, o in past.items():
            owned, assignments, *_ = o.decide("pbx1", key)
            assert owned is (worker == new.owner(key))
            if not owned:
                assert [a.owner for a in assignments] == [new.owner(key)]


def test_calls_spread_evenly_over_the_fleet() -> None:
    workers = [f"host:{pid}" for pid in range(4101, 4105)]
    view = View.of(workers)
    counts = {w: 0 for w in workers}
    for call in range(20_000):
        raw = f"Event: Newstate\r\nUniqueid: 17.{call}\r\nLinkedid: 17.{call}\r\n\r\n"
        counts[view.owner(owner_hash(raw.encode(), "")) or ""] += 1
    assert all(4_500 < n < 5_500 for n in counts.values()), counts


def test_every_channel_event_of_a_real_call_has_its_calls_owner() -> None:
    """Asterisk 22, 20 calls: Linkedid, DestLinkedid, LocalOneLinkedid, or (for an
    OriginateResponse) the originated channel's Uniqueid: one owner per call."""
    raw = (Path(__file__).parent / "fixtures" / "asterisk22-20-calls.txt").read_bytes()
    keys = DedupKeys("pbx1", window=float("inf"))
    by_call: dict[int, set[str]] = {}
    for message in Parser(banner=False).feed(raw):
        if message.kind == "event" and belongs_to_channel(message):
            call = owner_hash(message.raw, keys.key(message.raw, 0.0))
            by_call.setdefault(call, set()).add(message.name)
    assert len(by_call) == 20
    assert all({"Newchannel", "DialBegin", "Hangup"} <= names for names in by_call.values())


def test_an_event_that_names_no_call_or_bridge_is_owned_by_its_key() -> None:
    key = hashlib.blake2b(b"x", digest_size=16).hexdigest()
    # Raced with race = "all": no header names a call.
    raw = b"Event: PeerStatus\r\nPeer: PJSIP/100\r\nPeerStatus: Reachable\r\n\r\n"
    assert owner_hash(raw, key) == int(key[:16], 16)
    # A bridge's events share the owner of its BridgeUniqueid.
    assert owner_hash(b"Event: BridgeCreate\r\nBridgeUniqueid: b-1\r\n\r\n", key) == (
        owner_hash(b"Event: BridgeDestroy\r\nBridgeUniqueid: b-1\r\n\r\n", "")
    )
    # A bare \n line end names the same call as \r\n.
    assert owner_hash(b"Event: X\nLinkedid: 1.2\n\n", key) == owner_hash(
        b"Event: Y\r\nLinkedid: 1.2\r\n\r\n", key
    )


def test_a_view_change_replaces_the_decisions_made_under_the_old_view() -> None:
    workers = ["a", "b", "c"]
    events = list(range(0, 2**64, 2**58))
    ownership = Ownership("a", transition=0.0)
    ownership.update("pbx1", workers, now=0.0)
    before = [ownership.decide("pbx1", event).owned for event in events]
    assert before == [View.of(workers).owner(e) == "a" for e in events]
    ownership.update("pbx1", ["a"], now=1.0)  # the others left
    assert all(ownership.decide("pbx1", event).owned for event in events)


def test_before_any_view_a_worker_claims_everything() -> None:
    assert Ownership("w1", 5.0).decide("pbx1", 12345) == (True, [], 0, ())
