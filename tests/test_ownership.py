"""Hedged mode's ownership rule, decided by every worker on its own: each event has
exactly one owner per view, the standbys agree on who it is and on their order,
a view change never leaves an event with no owner, and rendezvous hashing moves
only the events of the worker that came or went."""

from __future__ import annotations

import hashlib
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from amiworker.fleet.ownership import Ownership, View, owner_under, owns_under

worker_ids = st.lists(
    st.text(alphabet="abcdefghij0123456789-:", min_size=1, max_size=12),
    min_size=1,
    max_size=8,
    unique=True,
)
event_keys = st.lists(st.binary(min_size=1, max_size=16), min_size=1, max_size=30).map(
    lambda raw: [hashlib.blake2b(r, digest_size=16).hexdigest() for r in raw]
)


def fleet(workers: list[str], transition: float = 5.0) -> dict[str, Ownership]:
    ownerships = {w: Ownership(w, transition) for w in workers}
    for ownership in ownerships.values():
        ownership.update("pbx1", workers, now=0.0)
    return ownerships


@settings(max_examples=200, deadline=None)
@given(worker_ids, event_keys)
def test_each_event_has_one_owner_and_the_standbys_agree_on_it_and_their_order(
    workers: list[str], keys: list[str]
) -> None:
    ownerships = fleet(workers)
    view = View.of(workers)
    for key in keys:
        decisions = {w: o.decide("pbx1", key) for w, o in ownerships.items()}
        owners = [w for w, (owned, _, _) in decisions.items() if owned]
        assert owners == [view.owner(key)] == [owner_under(key, workers)], key
        ranking = view.ranking(key)
        assert ranking[0] == owners[0]
        for worker, (owned, assignments, rank) in decisions.items():
            assert owns_under(key, worker, [workers]) is owned
            if not owned:
                assert [a.owner for a in assignments] == owners
                assert assignments[0].workers == view.workers
                assert rank == ranking.index(worker), "rank 1 hedges first"


@settings(max_examples=200, deadline=None)
@given(worker_ids, st.text(alphabet="xyz", min_size=1, max_size=4), event_keys)
def test_a_worker_joining_takes_only_events_it_now_wins(
    workers: list[str], newcomer: str, keys: list[str]
) -> None:
    if newcomer in workers:
        return
    before, after = View.of(workers), View.of([*workers, newcomer])
    for key in keys:
        assert after.owner(key) in (before.owner(key), newcomer), "nothing else moves"


@settings(max_examples=100, deadline=None)
@given(worker_ids, event_keys)
def test_during_a_view_change_a_worker_owns_under_the_old_view_and_the_new(
    workers: list[str], keys: list[str]
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
            owned, assignments, _ = o.decide("pbx1", key)
            assert owned is (worker in (old.owner(key), new.owner(key)))
            if not owned:
                assert {a.owner for a in assignments} == {old.owner(key), new.owner(key)}
        for worker, o in past.items():
            owned, assignments, _ = o.decide("pbx1", key)
            assert owned is (worker == new.owner(key))
            if not owned:
                assert [a.owner for a in assignments] == [new.owner(key)]


def test_events_spread_evenly_over_the_fleet() -> None:
    workers = [f"host:{pid}" for pid in range(4101, 4105)]
    view = View.of(workers)
    keys = [hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest() for i in range(20_000)]
    counts = {w: 0 for w in workers}
    for key in keys:
        counts[view.owner(key) or ""] += 1
    assert all(4_500 < n < 5_500 for n in counts.values()), counts


def test_before_any_view_a_worker_claims_everything() -> None:
    assert Ownership("w1", 5.0).decide("pbx1", "ab" * 16) == (True, [], 0)
