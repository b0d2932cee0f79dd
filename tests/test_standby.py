"""Hedged mode in one process: owners publish their coverage, standbys forget what it
covers and hedge what it does not, through the worker's own routing and exchange
code (fleet.hedging, fleet.coverage, fleet.standby) over an in-memory coverage
collection.

What a user relies on: an event its owner claimed is forgotten by every standby
(one insert per event); an event no owner claimed is hedged (claimed by a
standby, first-ranked first), never dropped, whether the owner died, stalled or
the window filled; a live owner that is merely slow is not second-guessed.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from amiworker.ami.message import Message
from amiworker.fleet.health import StoreHealth
from amiworker.fleet.hedging import Hedging
from amiworker.fleet.ownership import owner_hash, owner_under
from amiworker.fleet.pending import Pending
from amiworker.stats import WorkerStats

PBX = "pbx1"
DELAY = 1.0  # hedge_delay


class CoverageCollection:
    """The ``coverage`` collection, in memory: what ``LockTable`` gives hedging."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self.clock: datetime | None = None  # the store's clock; None: the real one

    def client(self, worker_id: str) -> _CoverageClient:
        return _CoverageClient(self, worker_id)


class _CoverageClient:
    def __init__(self, collection: CoverageCollection, worker_id: str) -> None:
        self._collection = collection
        self._docs = collection.docs
        self._me = worker_id

    async def publish_coverage(self, fields: Mapping[str, Any]) -> None:
        doc = self._docs.setdefault(self._me, {"_id": self._me})
        doc.update(copy.deepcopy(dict(fields)))
        doc["at"] = self._collection.clock or datetime.now(UTC)  # $currentDate

    async def coverage(self) -> list[dict[str, Any]]:
        return copy.deepcopy(list(self._docs.values()))


class Node:
    """One worker's hedging, fed events as its reader would, its claims recorded."""

    def __init__(
        self,
        me: str,
        collection: CoverageCollection,
        window: int = 10_000,
        transition: float = DELAY,  # seconds a worker still owns under its previous view
    ) -> None:
        self.me = me
        self.stats = WorkerStats()
        self.hedged: list[Pending] = []  # hedges not claimed yet
        self.claimed_hedges: list[str] = []
        self.owned: list[Pending] = []
        self.kept: list[str] = []
        self.connected = True  # its AMI session to the PBX
        self.hedging = Hedging(
            collection.client(me),  # type: ignore[arg-type]  # the two calls hedging makes
            worker_id=me,
            servers=[PBX],
            hedge_delay=DELAY,
            window=window,
            transition=transition,
            stats=self.stats,
            health=StoreHealth(),
            claim=lambda items: self.hedged.extend(items),
            connected=lambda: {PBX: self.connected},
        )
        # Present from the start, as a running fleet's workers are to each other.
        collection.docs[me] = {"_id": me, "beat": 0, "state": "running",
                               "pbxs": {PBX: {"connected": True}}}  # fmt: skip

    def receive(self, key: str, call: str, at: float) -> None:
        raw = f"Event: Newstate\r\nUniqueid: {key}\r\nLinkedid: {call}\r\n\r\n".encode()
        item = Pending(PBX, Message(raw), datetime.now(UTC), at, key)
        if self.hedging.route(item):
            self.owned.append(item)
        else:
            self.kept.append(key)

    def settle(self, count: int | None = None) -> list[str]:
        """The claim loop claimed this worker's oldest ``count`` owned events (all)."""
        done, self.owned = self.owned[:count], self.owned[len(self.owned[:count]) :]
        self.hedging.settled(done)
        return [item.key for item in done]

    def due(self, now: float, store_up: bool = True) -> list[str]:
        """What this worker hedges at ``now`` (its keys)."""
        before = len(self.hedged)
        self.hedging.hedge_due(now, store_up=store_up)
        return [item.key for item in self.hedged[before:]]

    @property
    def hedges(self) -> list[str]:
        """Every event this worker hedged, claimed or not."""
        return self.claimed_hedges + [item.key for item in self.hedged]

    def settle_hedges(self) -> None:
        """The claim loop claimed this worker's hedges."""
        self.hedging.settled(self.hedged)
        self.claimed_hedges += [item.key for item in self.hedged]
        self.hedged = []


async def exchange(nodes: list[Node], rounds: int = 1) -> None:
    for _ in range(rounds):
        for node in nodes:
            await node.hedging.exchange()


async def fleet(names: str = "abc", window: int = 10_000) -> list[Node]:
    collection = CoverageCollection()
    nodes = [Node(f"w-{name}", collection, window) for name in names]
    await exchange(nodes)
    assert all(node.hedging.ownership.ready(PBX) for node in nodes)
    return nodes


def send(nodes: list[Node], calls: int, events_per_call: int = 4, prefix: str = "") -> float:
    """The same events, in the same order, to every worker; returns when they came."""
    at = time.monotonic()
    for index in range(calls * events_per_call):
        call = f"{prefix}call-{index % calls}"
        for node in nodes:
            node.receive(f"{prefix}event-{index}", call, at)
    return at


async def first_one_lags(calls: int) -> tuple[list[Node], float, set[str]]:
    """A fleet of three sent ``calls`` calls, where every worker but the first claimed
    what it owns: the fleet, when the events came, and the first worker's events."""
    nodes = await fleet()
    at = send(nodes, calls)
    for node in nodes[1:]:
        node.settle()
    return nodes, at, {item.key for item in nodes[0].owned}


async def test_what_its_owner_claimed_every_standby_forgets() -> None:
    nodes = await fleet()
    at = send(nodes, calls=60)
    events = 240
    assert sum(len(node.owned) for node in nodes) == events  # one owner each
    assert all(len(node.kept) == events - len(node.owned) for node in nodes)
    for node in nodes:
        node.settle()
    await exchange(nodes, rounds=2)

    for node in nodes:
        assert node.hedging.standby.depth == 0
        assert node.due(at + 100 * DELAY) == []
    assert sum(node.stats.covered for node in nodes) == 2 * events  # by both standbys


async def test_a_dead_owners_events_are_hedged_at_the_deadline_first_ranked_first() -> None:
    nodes = await fleet()
    dead, alive = nodes[0], nodes[1:]
    send(nodes, calls=20, prefix="before-")
    for node in nodes:
        node.settle()
    await exchange(nodes)
    at = send(nodes, calls=30)  # the first worker is killed as these arrive
    orphans = {item.key for item in dead.owned}
    assert orphans
    for node in alive:
        node.settle()
    # More exchanges than it takes a dead worker's beat to go stale, fewer than the
    # grace an idle live owner gets for its first claim.
    await exchange(alive, rounds=5)

    first = {node.me: node.due(at + DELAY + 0.01) for node in alive}
    second = {node.me: node.due(at + 2 * DELAY + 0.01) for node in alive}
    assert set().union(*first.values()) == orphans, "every orphan hedged at the deadline"
    assert all(set(keys) <= orphans for keys in first.values())  # nothing else
    # Each orphan hedged once by its first-ranked standby; the second one follows
    # only a delay later, for what it had not seen covered (here: all of it).
    assert sum(len(keys) for keys in first.values()) == len(orphans)
    assert set().union(*second.values()) == orphans


async def test_a_standby_ranked_behind_silent_workers_does_not_wait_on_their_behalf() -> None:
    """Two of four killed; before the views drop them, the events they own arrive:
    the first live standby of each hedges at once (each once), not one hedge_delay
    per dead worker ranked before it."""
    nodes = await fleet("abcd")
    dead, alive = nodes[:2], nodes[2:]
    await exchange(alive, rounds=5)  # their beats are stale; the views still hold them
    for node in alive:
        assert node.hedging.ownership.views(PBX)[0].workers == tuple(n.me for n in nodes)
    at = send(nodes, calls=40)
    orphans = {item.key for node in dead for item in node.owned}
    assert orphans
    for node in alive:
        node.settle()
    await exchange(alive)

    at_once = [node.due(at + 0.01) for node in alive]
    assert set().union(*at_once) == orphans
    assert sum(len(keys) for keys in at_once) == len(orphans), "each by one standby"
    # The other live standby comes a hedge_delay later, for what it saw no one cover.
    later = [set(node.due(at + DELAY + 0.01)) for node in alive]
    assert set().union(*later) == orphans


async def test_a_hedge_one_standby_claimed_is_not_repeated_by_the_others() -> None:
    """An owner dies: its first-ranked standby hedges each of its events, and the
    others forget them once that claim is in the store: one extra insert per
    orphan, not one per standby."""
    nodes = await fleet("abcd")
    dead, alive = nodes[0], nodes[1:]
    at = send(nodes, calls=40)
    orphans = {item.key for item in dead.owned}
    assert orphans
    for node in alive:
        node.settle()
    await exchange(alive, rounds=5)

    first = [node.due(at + DELAY + 0.01) for node in alive]
    assert sorted(key for keys in first for key in keys) == sorted(orphans)
    # Not forgotten before the hedges are claimed: a hedger may die first.
    await exchange(alive)
    assert sum(node.hedging.standby.depth for node in alive) == 2 * len(orphans)
    for node in alive:
        node.settle_hedges()
    await exchange(alive, rounds=2)  # each publishes its hedges, and reads the others'
    assert [node.due(at + 10 * DELAY) for node in alive] == [[], [], []]
    assert all(node.hedging.standby.depth == 0 for node in alive)


async def test_a_worker_that_joined_as_another_died_hedges_only_what_no_one_claimed() -> None:
    """The newcomer still counts the dead worker in its view when events arrive, and
    expects it to claim its share; the others' views have given that share to live
    owners, which claim it. Once the dead worker leaves the newcomer's view, their
    coverage decides those events too: the newcomer hedges only what nobody claimed."""
    collection = CoverageCollection()
    # The view changes here are long past (no event arrives during one).
    dead, *others = [Node(f"w-{name}", collection, transition=0.0) for name in "abc"]
    await exchange([dead, *others])
    await exchange(others, rounds=10)  # the others drop the dead worker
    newcomer = Node("w-d", collection, transition=0.0)
    alive = [*others, newcomer]
    await exchange(alive)
    assert newcomer.hedging.ownership.views(PBX)[0].workers == ("w-a", "w-b", "w-c", "w-d")
    assert others[0].hedging.ownership.views(PBX)[0].workers == ("w-b", "w-c", "w-d")
    at = send(alive, calls=40)
    claimed = {key for node in alive for key in node.settle()}
    assert len(claimed) < 160  # the dead worker's share under the newcomer's view
    await exchange(alive, rounds=9)  # long enough for the newcomer to drop the dead one

    assert newcomer.hedging.ownership.views(PBX)[0].workers == ("w-b", "w-c", "w-d")
    hedged = set(newcomer.due(at + 10 * DELAY))
    unclaimed = {f"event-{index}" for index in range(160)} - claimed
    assert hedged == unclaimed & set(newcomer.kept), "only what no one claimed"


async def test_a_worker_that_starts_after_another_died_leaves_it_out_at_once() -> None:
    """A newcomer has never seen the dead worker's beat move, and could not tell it
    from a live one until it had watched it stay still (8 exchanges, 2 s), ranking
    behind it meanwhile. The age of its document on the store's clock tells at once."""
    collection = CoverageCollection()
    collection.clock = datetime(2026, 12, 1, tzinfo=UTC)
    dead, *others = [Node(f"w-{name}", collection, transition=0.0) for name in "abc"]
    await exchange([dead, *others])
    for _ in range(12):  # 3 s of exchanges, every hedge_delay / 4, without the dead one
        collection.clock += timedelta(seconds=DELAY / 4)
        await exchange(others)
    newcomer = Node("w-d", collection, transition=0.0)
    await exchange([newcomer])
    assert newcomer.hedging.ownership.views(PBX)[0].workers == ("w-b", "w-c", "w-d")
    # A document that is old only because the newcomer reads it late (here: no one
    # published for 3 s) leaves its worker out until its next beat, no longer.
    collection.clock += timedelta(seconds=3 * DELAY)
    late = Node("w-e", collection, transition=0.0)
    await exchange([late])
    assert late.hedging.ownership.views(PBX)[0].workers == ("w-e",)
    await exchange([*others, newcomer, late])
    assert late.hedging.ownership.views(PBX)[0].workers == ("w-b", "w-c", "w-d", "w-e")


async def test_a_stopping_workers_final_record_read_ahead_of_its_events_still_counts() -> None:
    """A stopping worker leaves the views as soon as its final record is read; a
    standby that has not received the last events that record covers must still
    forget them when they come, not hedge them."""
    nodes = await fleet()
    leaving, standby, other = nodes
    send(nodes, calls=20, prefix="early-")
    at = time.monotonic()
    for index in range(80):  # the standby lags: these reach it later
        for node in (leaving, other):
            node.receive(f"late-{index}", f"late-call-{index % 20}", at)
    claimed = set(leaving.settle())
    leaving.hedging.coverage.leaving = True
    await exchange([leaving, other])
    await exchange([standby])
    assert leaving.me not in standby.hedging.ownership.views(PBX)[0].workers
    for index in range(80):
        standby.receive(f"late-{index}", f"late-call-{index % 20}", at)
    for node in (standby, other):
        node.settle()
    await exchange([other, standby], rounds=2)

    assert not set(standby.due(at + 10 * DELAY)) & claimed, "hedged though covered"


async def test_what_an_owner_claimed_after_its_pbx_session_ended_still_counts() -> None:
    """The PBX drops every session (a restart): each worker opens a new one. The owner
    claims the last events of its old session after that; its record of the old
    session rides along, and no standby hedges them."""
    nodes = await fleet()
    owner = nodes[0]
    at = send(nodes, calls=30, prefix="before-")
    for node in nodes:
        node.hedging.session(PBX)  # every session dropped and reopened
    for node in nodes[1:]:
        node.settle()
    claimed = set(owner.settle())  # the old session's claims return after the drop
    assert claimed
    send(nodes, calls=30, prefix="after-")
    for node in nodes:
        node.settle()
    await exchange(nodes, rounds=2)

    hedged = set().union(*(node.due(at + 10 * DELAY) for node in nodes[1:]))
    assert not hedged & claimed, "hedged, though claimed in the ended session"
    assert all(node.hedging.standby.depth == 0 for node in nodes)


async def test_a_silent_worker_leaves_the_views_and_its_calls_get_live_owners() -> None:
    """Within a few exchanges, long before its lease: new events are claimed at once by
    a live worker, none waits for a hedge."""
    nodes = await fleet()
    alive = nodes[1:]  # the first one stops beating
    await exchange(alive, rounds=10)
    for node in alive:
        assert node.hedging.ownership.views(PBX)[0].workers == tuple(n.me for n in alive)
    send(alive, calls=30)
    assert sum(len(node.owned) for node in alive) == 120, "each new event owned by a live worker"


async def test_an_owner_that_passed_an_event_is_not_waited_for_on_it() -> None:
    """Views disagree after a death: the standby already owns the dead worker's calls
    to a live worker that still sees the dead one as their owner. That worker
    passes them unclaimed while busy with its own; the standby must hedge them at
    their deadline rather than wait on a worker at work on other events."""
    nodes = await fleet()
    dead, live, standby = nodes
    # The first worker dies; a few exchanges on, no one has dropped it from its view.
    await exchange([live, standby], rounds=5)
    everyone = tuple(n.me for n in nodes)
    assert standby.hedging.ownership.views(PBX)[0].workers == everyone
    # The standby is first to see it gone.
    standby.hedging.ownership.update(PBX, [live.me, standby.me])
    at = time.monotonic()
    expected = set()
    for index in range(120):
        key, call = f"event-{index}", f"call-{index % 30}"
        for node in (live, standby):
            node.receive(key, call, at)
        raw = f"Event: Newstate\r\nUniqueid: {key}\r\nLinkedid: {call}\r\n\r\n".encode()
        event = owner_hash(raw, key)
        if (
            owner_under(event, everyone) == dead.me
            and owner_under(event, (live.me, standby.me)) == live.me
        ):
            expected.add(key)  # the live worker's under the new view, the dead one's under the old
    assert expected
    live.settle()
    standby.settle()
    await exchange([live, standby], rounds=2)
    assert set(standby.due(at + DELAY + 0.01)) == expected


async def test_an_owner_whose_session_dropped_is_not_waited_for() -> None:
    """It beats, but says its session to the PBX is down: what it had not covered it
    may never have received (the events lost in the cut)."""
    nodes, at, orphans = await first_one_lags(calls=30)
    nodes[0].connected = False
    await exchange(nodes, rounds=2)  # well within the grace of an owner at work
    hedged = set().union(*(node.due(at + DELAY + 0.01) for node in nodes[1:]))
    assert hedged == orphans


async def test_a_live_owner_still_claiming_is_not_second_guessed() -> None:
    nodes = await fleet()
    owner = nodes[0]
    at = send(nodes, calls=40)
    mine = [item.key for item in owner.owned]
    for node in nodes[1:]:
        node.settle()
    # The owner claims slowly: a few events per exchange, its watermark moving.
    hedged: list[str] = []
    now = at + DELAY
    while owner.owned:
        owner.settle(3)
        await exchange(nodes)
        now += DELAY  # far slower than its deadlines, on the clock
        for node in nodes[1:]:
            hedged += node.due(now)
    assert hedged == [], "an owner at work is waited for"
    for node in nodes[1:]:
        assert node.hedging.standby.depth == 0
        assert node.stats.covered >= len(mine)


async def test_a_live_owner_that_stopped_claiming_is_hedged_after_its_grace() -> None:
    """Its AMI session stalled, or its claims hang: it beats, its watermark does not move."""
    nodes, at, orphans = await first_one_lags(calls=30)
    await exchange(nodes, rounds=4)
    assert [node.due(at + DELAY + 0.01) for node in nodes[1:]] == [[], []]
    await exchange(nodes, rounds=6)
    hedged = set().union(*(node.due(at + 3 * DELAY) for node in nodes[1:]))
    assert hedged == orphans


async def test_nothing_is_hedged_while_the_store_is_away() -> None:
    nodes, at, orphans = await first_one_lags(calls=10)
    await exchange(nodes[1:], rounds=12)
    assert nodes[1].due(at + 10 * DELAY, store_up=False) == []
    assert set(nodes[1].due(at + 10 * DELAY)) == orphans


async def test_a_full_window_claims_its_oldest_events_and_drops_none() -> None:
    nodes = await fleet(window=50)
    send(nodes, calls=100)
    standby = nodes[1]
    assert standby.hedging.standby.depth <= 50
    assert standby.hedges, "the overflow is claimed at once"
    assert standby.hedges == standby.kept[: len(standby.hedges)], "oldest first"
    assert len(standby.hedges) + standby.hedging.standby.depth == len(standby.kept)


@settings(max_examples=60, deadline=None)
@given(
    names=st.sampled_from(["ab", "abc", "abcd"]),
    calls=st.integers(1, 25),
    settled=st.lists(st.floats(0, 1), min_size=4, max_size=4),
    dead=st.sets(st.integers(0, 3), max_size=2),
    reconnected=st.sets(st.integers(0, 3), max_size=4),
)
async def test_no_event_is_forgotten_unless_its_owner_claimed_it(
    names: str, calls: int, settled: list[float], dead: set[int], reconnected: set[int]
) -> None:
    """Whatever each owner claimed of its share (a prefix, as claims go in arrival
    order), whoever died, and whoever's PBX session reopened before its claims
    returned: every event is claimed by its owner or hedged, and a standby
    forgets only what the owner claimed."""
    nodes = await fleet(names)
    at = send(nodes, calls)
    everything = {f"event-{index}" for index in range(calls * 4)}
    for index, node in enumerate(nodes):
        if index in reconnected:
            node.hedging.session(PBX)
    claimed: set[str] = set()
    for index, node in enumerate(nodes):
        claimed |= set(node.settle(int(len(node.owned) * settled[index])))
    live = [node for index, node in enumerate(nodes) if index not in dead] or nodes[:1]
    await exchange(live, rounds=12)
    hedged: set[str] = set()
    for node in live:
        hedged |= set(node.due(at + 10 * DELAY))
        assert node.hedging.standby.depth == 0
        forgotten = set(node.kept) - set(node.hedges)
        assert forgotten <= claimed, "forgotten, though its owner never claimed it"
    unclaimed = everything - claimed
    owned_by_live = {key for node in live for key in (item.key for item in node.owned)}
    assert unclaimed - owned_by_live <= hedged, "an event nobody claimed was dropped"
