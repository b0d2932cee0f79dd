"""Worker CPU time per event, the store replaced by an in-memory stand-in.

    python bench/cpu.py [--rate 24000] [--fleet 4] [--rounds 3] [--quick]
                        [--profile [--mode hedged]]

The 3,000-call capture (117,006 events of a real Asterisk 22) goes through the
path a worker runs: ``Parser.feed`` on 64 KiB reads -> ``Worker._on_event`` ->
the claim loop (dedup key, ``event_document``, ``insert_many`` batches) ->
the handler scheduler (a no-op ``async def`` handler for each of the 14 event
names of a call) -> batched acks. Reads arrive paced at ``--rate`` events/s
(24,000: the peak of one Asterisk on a 2-core machine), so batches are the
size they are live; ``--rate 0`` feeds flat out.

The stand-in store lets this worker win one event in ``--fleet`` (by its key),
as in a fleet of that many workers, and does no I/O. What is measured is the
CPU time of this process (user + system, ``time.process_time``) divided by the
events fed: every event costs its framing, race decision, key, parse and
document; one in ``--fleet`` also a handler run and an ack. The figures:

* ``worker path``: as above, the stand-in doing nothing with what it gets;
* ``+ BSON``: the stand-in also BSON-encodes every claim and ack with PyMongo's
  C encoder, which is what the driver spends on them before sending;
* ``+ BSON, GC tuned``: the same with the cyclic garbage collector tuned as a
  worker process could be (``gc.freeze()`` once started, ``gc.set_threshold(
  10_000, 20, 20)``): the worker allocates few cycles, and with the default
  thresholds full collections, each walking every live object, cost a third of
  the time;
* ``+ BSON, on uvloop``: the same on uvloop's event loop (if installed);
* ``parse only``: ``Parser.feed`` alone, to show what share the framing is;
* ``hedged``, ``hedged + BSON``: the same capture through a worker in
  ``claim_mode = "hedged"``, one of a fleet of ``--fleet``: it owns one event in
  ``--fleet`` (rendezvous hashing over the fleet, ``fleet.ownership``) and claims
  those as today's path does (all of them won: nobody else inserts them), and is
  a standby for the others: their key, the ownership decision, the window
  (``fleet.standby``). Its real exchange loop (``Hedging.run``, every
  ``hedge_delay / 4``) runs against the stand-in, which keeps this worker's
  coverage document and serves, beside it, one document for each other worker
  of the fleet whose watermark is the newest event this worker has received (as
  owners keeping up would publish): the standby events are forgotten as
  covered through ``Standby.apply``, and that cost is in the figure. At the end
  every standby event must have been covered (none hedged, the window empty).
  ``hedged + BSON, GC tuned``: the same, with the collector tuned as above (a
  standby keeps thousands of events alive for a while: full collections walk
  them).

Baseline, ``naive``: what a straightforward port of the PHP client does, in
Python: panoramisk parses, and per event a digest, a document built from the
message, one awaited ``insert_one``-shaped call to the same stand-in (BSON
encoded), and for a won event the handler awaited inline and an
``update_one``-shaped ack (BSON encoded). ``ratio`` = naive CPU / the
worker's CPU with BSON (how many times less CPU the worker's path needs);
``race / hedged``: the race path's CPU over the hedged path's, both with BSON.
Target: hedged + BSON <= 15 us/event.

Only this process runs the path (no store, no simulator); the machine's other
load only adds noise, so each figure is the best of ``--rounds``, the variants
taking turns within each round.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import gzip
import hashlib
import importlib.util
import pstats
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from amiworker.ami.message import Message  # noqa: E402
from amiworker.ami.protocol import Parser  # noqa: E402
from amiworker.fleet.dispatch import HandlerContext, HandlerRegistry  # noqa: E402
from amiworker.fleet.locktable import Claimed  # noqa: E402
from amiworker.fleet.worker import Worker  # noqa: E402
from amiworker.settings import Settings  # noqa: E402

CAPTURE = ROOT / "tests/fixtures/asterisk22-3000-calls.txt.gz"
CHUNK = 65536
DEFAULT_GC = gc.get_threshold()
CALL_EVENTS = (
    "Newchannel", "Newexten", "VarSet", "NewCallerid", "NewConnectedLine", "Newstate",
    "SoftHangupRequest", "HangupRequest", "Hangup", "LocalBridge", "DialBegin", "DialEnd",
    "OriginateResponse", "DeviceStateChange",
)  # fmt: skip


async def noop_handler(ctx: HandlerContext, event: Message) -> None:
    return None


def registry() -> HandlerRegistry:
    return HandlerRegistry(["bench"], [(f"{name}Handler", noop_handler) for name in CALL_EVENTS])


class MemoryStore:
    """The part of LockTable a worker's data path uses, with no I/O.

    Encodes what a driver would encode, and lets this worker win one event in
    ``fleet`` (the other workers of an imagined fleet win the rest).
    """

    def __init__(self, fleet: int, encode: bool = True) -> None:
        self.fleet = fleet
        self.encode = encode
        self.database = None
        self.inserted = 0
        self.acked = 0

    def _won(self, key: str) -> bool:
        return int(key[:8], 16) % self.fleet == 0

    async def claim(self, docs: list[dict[str, Any]]) -> Claimed:
        if self.encode:
            for doc in docs:
                bson.encode(doc)
        self.inserted += len(docs)
        return Claimed([doc for doc in docs if self._won(doc["_id"])], [])

    async def ack_many(self, keys: list[Any]) -> int:
        if self.encode:
            bson.encode({"q": {"_id": {"$in": keys}}, "u": {"$set": {"state": "done"}}})
        self.acked += len(keys)
        return len(keys)

    async def fail(self, *args: Any) -> str | None:
        return None

    # hedged mode's coverage exchange (fleet.hedging): this worker's document, and one
    # per other worker of the imagined fleet, their watermark at ``peer_mark()``

    def peers(
        self, me: str, pbx: str, fleet: int, mark: Callable[[], tuple[str, str] | None]
    ) -> None:
        self._me, self._pbx, self._peer_mark = me, pbx, mark
        self._peer_names = [f"bench-peer-{n}" for n in range(1, fleet)]
        self._mine: dict[str, Any] = {"_id": me}
        self._beat = 0

    async def publish_coverage(self, fields: dict[str, Any]) -> None:
        update = {"q": {"_id": self._me}, "u": {"$set": dict(fields)}, "upsert": True}
        if self.encode:
            bson.encode(update)
        self._mine.update(fields)

    async def coverage(self) -> list[dict[str, Any]]:
        self._beat += 1
        view = sorted([self._me, *self._peer_names])
        marks = self._peer_mark()
        docs = [dict(self._mine)]
        for name in self._peer_names:
            record: dict[str, Any] = {"connected": True}
            if marks is not None:
                first, mark = marks
                record.update(
                    {"sid": name, "first": first, "mark": mark, "cut": False,
                     "segs": [[None, [view]]]}
                )  # fmt: skip
            docs.append(
                {"_id": name, "beat": self._beat, "state": "running",
                 "pbxs": {self._pbx: record}}
            )  # fmt: skip
        if self.encode:  # what the driver decodes off the wire
            docs = [bson.decode(bson.encode(doc)) for doc in docs]
        return docs

    # insert_one / update_one shaped calls, for the naive baseline
    async def insert_one(self, doc: dict[str, Any]) -> bool:
        bson.encode(doc)
        self.inserted += 1
        return self._won(doc["_id"])

    async def update_one(self, key: str) -> None:
        bson.encode({"q": {"_id": key}, "u": {"$set": {"state": "done"}}})
        self.acked += 1


def load_capture() -> tuple[list[bytes], int]:
    data = gzip.decompress(CAPTURE.read_bytes())
    events = sum(m.kind == "event" for m in Parser().feed(data))
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)], events


async def paced(pieces: list[bytes], events_per_chunk: float, rate: float) -> Any:
    """Yield the chunks at ``rate`` events/s (flat out if 0), letting the loop run between."""
    start = time.monotonic()
    for n, piece in enumerate(pieces):
        if rate:
            due = start + n * events_per_chunk / rate
            delay = due - time.monotonic()
            await asyncio.sleep(max(0.0, delay))
        else:
            await asyncio.sleep(0)
        yield piece


async def run_worker(
    pieces: list[bytes],
    events: int,
    rate: float,
    fleet: int,
    encode: bool = True,
    tuned_gc: bool = False,
) -> float:
    pbx = {"name": "pbx1", "host": "127.0.0.1", "username": "bench", "secret": "unused"}
    settings = Settings.load(None, env_file=None, servers=[pbx], handlers=[])
    store = MemoryStore(fleet, encode)
    worker = Worker(settings, registry(), worker_id="bench-worker", store=store)  # type: ignore[arg-type]
    claims = asyncio.create_task(worker.claimer.run())
    outcomes = asyncio.create_task(worker.outcomes.run())
    on_event = worker._on_event
    parser = Parser()
    per_chunk = events / len(pieces)
    gc.collect()
    if tuned_gc:
        gc.freeze()
        gc.set_threshold(10_000, 20, 20)
    started = time.process_time()
    async for piece in paced(pieces, per_chunk, rate):
        for message in parser.feed(piece):
            if message.kind == "event":
                on_event("pbx1", message, False)
    worker.claimer.stop()
    await claims
    await worker.scheduler.join()
    worker.outcomes.stop()
    await outcomes
    used = time.process_time() - started
    if tuned_gc:
        gc.set_threshold(*DEFAULT_GC)
        gc.unfreeze()
    assert store.inserted == worker.stats.races_won + worker.stats.races_lost
    assert worker.stats.dropped == 0, "the claim buffer overflowed"
    return used


async def run_hedged(
    pieces: list[bytes],
    events: int,
    rate: float,
    fleet: int,
    encode: bool = True,
    tuned_gc: bool = False,
) -> float:
    """The worker in hedged mode, one of ``fleet``: owner of 1 in ``fleet`` events,
    standby for the rest, its exchange loop running against the stand-in."""
    pbx = {"name": "pbx1", "host": "127.0.0.1", "username": "bench", "secret": "unused"}
    settings = Settings.load(None, env_file=None, servers=[pbx], handlers=[], claim_mode="hedged")
    store = MemoryStore(1, encode)  # an owner's claims: all won
    worker = Worker(settings, registry(), worker_id="bench-worker", store=store)  # type: ignore[arg-type]
    hedging = worker.hedging
    assert hedging is not None
    coverage = hedging.coverage

    def peer_mark() -> tuple[str, str] | None:
        """Peers keeping up: their watermark is the newest event received here."""
        session = coverage._sessions.get("pbx1")
        if session is None or session.first is None or session.latest is None:
            return None
        return session.first, session.latest

    store.peers(worker.worker_id, "pbx1", fleet, peer_mark)
    hedging._connected = lambda: {"pbx1": True}  # no AMI session here: connected
    await hedging.exchange()  # the views: this worker and its peers
    assert hedging.ownership.ready("pbx1")
    claims = asyncio.create_task(worker.claimer.run())
    outcomes = asyncio.create_task(worker.outcomes.run())
    exchanges = asyncio.create_task(hedging.run())
    on_event = worker._on_event
    parser = Parser()
    per_chunk = events / len(pieces)
    gc.collect()
    if tuned_gc:
        gc.freeze()
        gc.set_threshold(10_000, 20, 20)
    started = time.process_time()
    async for piece in paced(pieces, per_chunk, rate):
        for message in parser.feed(piece):
            if message.kind == "event":
                on_event("pbx1", message, False)
    worker.claimer.stop()
    await claims
    await hedging.exchange()  # the peers' last watermarks cover the tail
    exchanges.cancel()
    await asyncio.gather(exchanges, return_exceptions=True)
    await worker.scheduler.join()
    worker.outcomes.stop()
    await outcomes
    used = time.process_time() - started
    if tuned_gc:
        gc.set_threshold(*DEFAULT_GC)
        gc.unfreeze()
    stats = worker.stats
    assert store.inserted == stats.races_won == stats.owned, "an owner's claims are all won"
    assert stats.hedged == 0, f"{stats.hedged} standby events hedged: not covered in time"
    assert hedging.standby.depth == 0, f"{hedging.standby.depth} left in the window"
    raced = hedging.standby._streams["pbx1"].next_position  # every raced event, in order
    assert stats.owned + stats.covered == raced, (stats.owned, stats.covered, raced)
    assert stats.dropped == 0, "the claim buffer overflowed"
    share = stats.owned / max(1, stats.owned + stats.covered)
    assert abs(share - 1 / fleet) < 0.02, f"owned {share:.3f} of the raced events"
    return used


async def run_naive(pieces: list[bytes], events: int, rate: float, fleet: int) -> float:
    """panoramisk parsing, then one awaited insert per event, handler inline, ack per event."""
    from panoramisk.ami_protocol import AMIProtocol

    store = MemoryStore(fleet)
    seed = hashlib.blake2b(b"pbx1\0", digest_size=16)
    pending: list[Any] = []

    class Collect:
        def dispatch(self, message: Any) -> None:
            pending.append(message)

    class NullTransport:
        def write(self, data: bytes) -> None:
            pass

    protocol = AMIProtocol()
    protocol.connection_made(NullTransport())
    protocol.factory = Collect()
    handlers = {name.lower() for name in CALL_EVENTS}
    per_chunk = events / len(pieces)
    gc.collect()
    started = time.process_time()
    async for piece in paced(pieces, per_chunk, rate):
        protocol.data_received(piece)
        batch, pending[:] = list(pending), []
        for message in batch:
            digest = seed.copy()
            digest.update(str(message).encode())
            key = digest.hexdigest()
            headers = {k.lower(): v for k, v in message.items()}
            doc = {
                "_id": key,
                "server": "pbx1",
                "event": message.get("Event"),
                "uniqueid": headers.get("uniqueid"),
                "linkedid": headers.get("linkedid"),
                "received_at": datetime.now(UTC),
                "headers": headers,
                "state": "claimed",
            }
            if await store.insert_one(doc) and message.get("Event", "").lower() in handlers:
                await noop_handler(None, message)  # type: ignore[arg-type]
                await store.update_one(key)
    return time.process_time() - started


def run_parse(pieces: list[bytes]) -> float:
    parser = Parser()
    gc.collect()
    started = time.process_time()
    for piece in pieces:
        for message in parser.feed(piece):
            message.kind  # noqa: B018
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=24000, help="events/s fed (0: flat out)")
    parser.add_argument("--fleet", type=int, default=4, help="workers in the imagined fleet")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round, no GC/uvloop variants")
    parser.add_argument("--profile", action="store_true", help="cProfile one worker round")
    parser.add_argument("--mode", default="race", choices=["race", "hedged"], help="--profile's")
    parser.add_argument("--sort", default="tottime", help="profile order (tottime, cumtime)")
    args = parser.parse_args()

    pieces, events = load_capture()
    print(
        f"capture: {CAPTURE.name}, {events:,} events in {len(pieces)} reads of {CHUNK} bytes; "
        f"fed at {args.rate:,.0f} events/s; this worker wins 1 in {args.fleet}"
    )
    if args.quick:
        args.rounds = 1
    print("cores: this process only (no store, no simulator); best of", args.rounds, "rounds")
    if args.profile:
        profile = cProfile.Profile()
        profiled = run_hedged if args.mode == "hedged" else run_worker
        profile.enable()
        asyncio.run(profiled(pieces, events, args.rate, args.fleet))
        profile.disable()
        pstats.Stats(profile).sort_stats(args.sort).print_stats(40)
        return

    # The variants take turns within each round, so that a change in this VM's
    # speed during the run weighs on all of them alike; each keeps its best round.
    variants: dict[str, Callable[[], float]] = {
        "parse": lambda: run_parse(pieces),
        "bare": lambda: asyncio.run(
            run_worker(pieces, events, args.rate, args.fleet, encode=False)
        ),
        "encoded": lambda: asyncio.run(run_worker(pieces, events, args.rate, args.fleet)),
        "tuned": lambda: asyncio.run(
            run_worker(pieces, events, args.rate, args.fleet, tuned_gc=True)
        ),
        "naive": lambda: asyncio.run(run_naive(pieces, events, args.rate, args.fleet)),
        "hedged bare": lambda: asyncio.run(
            run_hedged(pieces, events, args.rate, args.fleet, encode=False)
        ),
        "hedged": lambda: asyncio.run(run_hedged(pieces, events, args.rate, args.fleet)),
        "hedged tuned": lambda: asyncio.run(
            run_hedged(pieces, events, args.rate, args.fleet, tuned_gc=True)
        ),
    }
    if args.quick:
        del variants["tuned"], variants["hedged tuned"]
    if importlib.util.find_spec("uvloop") is not None and not args.quick:
        import uvloop

        def on_uvloop() -> float:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(run_worker(pieces, events, args.rate, args.fleet))

        variants["uvloop"] = on_uvloop
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, run in variants.items():
            best[name] = min(best.get(name, float("inf")), run())
    parse, bare, encoded, naive = (best[name] for name in ("parse", "bare", "encoded", "naive"))
    tuned = best.get("tuned")
    hedged_bare, hedged = best["hedged bare"], best["hedged"]
    with_uvloop = best.get("uvloop")

    def line(label: str, seconds: float, extra: str = "") -> None:
        print(f"{label:42} {seconds / events * 1e6:6.2f} us/event  {extra}")

    line("parse only (Parser.feed, kind)", parse, f"{parse / bare:4.2f} of the worker path")
    line("race: worker path (stand-in store)", bare)
    line("  + BSON (the driver's encoding)", encoded)
    if tuned is not None:
        line("  + BSON, GC tuned", tuned)
    if with_uvloop is not None:
        line("  + BSON, on uvloop", with_uvloop)
    elif not args.quick:
        print("  (uvloop not installed: pip install uvloop to compare)")
    line(f"hedged: owns 1 in {args.fleet}, standby for the rest", hedged_bare)
    line("  + BSON (the driver's encoding)", hedged)
    if "hedged tuned" in best:
        # What a worker process runs: amiworker.fleet.worker tunes the collector so.
        ok = best["hedged tuned"] / events * 1e6 <= 15
        line(
            "  + BSON, GC tuned (as a worker runs)",
            best["hedged tuned"],
            f"target <= 15 us/event: {'met' if ok else 'NOT met'}",
        )
    line("naive (panoramisk + insert_one, BSON)", naive, f"ratio {naive / encoded:4.1f}x race")
    print(
        f"ratios (same run): race / hedged = {encoded / hedged:.2f}x (with BSON), "
        f"{bare / hedged_bare:.2f}x (without); naive / hedged = {naive / hedged:.1f}x"
    )


if __name__ == "__main__":
    main()
