"""Latency: an event received by a worker to its handler started, p50 and p99, on nx-27017.

    python bench/latency.py [--rate 1000] [--modes race,hedged] [--workers 4]
                            [--race-workers 2] [--seconds 30] [--warmup 5]

Two simulated PBXs make calls at ``--rate`` events/s in all (39 events per
call, spread over the call's second, as Asterisk spreads them). Worker
processes, each a ``Worker`` exactly as ``amiworker`` runs it, hold a session
to both; the benchmark starts them itself so that it can hang its probes on
the hooks the worker offers: ``HandlerScheduler.on_started`` gives, for every
handler run, the seconds since the worker read the event off the socket (the
claim through MongoDB included: batch delay, insert_many, handler queue), and
``Claimer.on_batch`` the size and duration of every claim. Every channel event
has a no-op handler; what the winner runs is measured, over ``--seconds``
after ``--warmup``.

Each claim mode (``--modes``) runs on a fresh installation, one after the other:

* ``race``: ``--race-workers`` workers (2 by default: at 1,000 events/s, 4 racing
  workers need more than nx-27017 can absorb on this machine, see
  bench/pipeline.py, and a backlog makes latency grow without bound);
* ``hedged`` (``AMIWORKER_CLAIM_MODE=hedged``): ``--workers`` workers (4), each
  event claimed by its owner only; the calls start once every worker's view
  holds the whole fleet. A hedge (a standby claiming what its owner has not
  covered) comes ``hedge_delay`` (1 s) late by design: how many there were is
  printed, since more than 1% of them would be the p99.

Baseline, in the same run: the store's own claim round trip, unloaded. Once
the last mode's workers have stopped (nothing else writes to nx-27017), one
client replays that mode's claims (the same batch sizes, in order, up to
``--replay`` batches) with ``LockTable.claim``, the very call a worker makes
(unordered ``insert_many``, write concern majority), on documents built from
what the PBXs sent, with fresh ids (new claims, as an owner's are). No design
that stores an event before running its handler can be faster than that round
trip; target: hedged p99 <= 2x its p99. Then the same claims of the first
``--replay-seconds`` concurrently, one client per worker, each claim started
when its worker started it: what nx-27017's handling of concurrent writes
costs alone (no AMI, handler, ack nor coverage). The claims' round trips under
load (``on_batch``) are printed beside them for each mode, and each claimed
event's time split in two: waiting for its claim (the previous batch in
flight), and its claim (documents, ``insert_many``, winners handed on); with
the workers' event loop lag (a 10 ms sleep's overshoot: CPU contention).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import build_documents
from stack import NOOP_HANDLERS, CpuMeter, Stack, machine_note

from amiworker.fleet.dispatch import load_handlers
from amiworker.fleet.locktable import LockTable
from amiworker.fleet.worker import Worker, new_worker_id
from amiworker.settings import Settings


def worker_process(env: dict[str, str], out: str, index: int) -> None:
    """One worker, as ``amiworker`` runs it, with the latency probes attached."""
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = Settings.load(None, env_file=None)
    registry = load_handlers(settings.handlers, settings.app_dir)
    asyncio.run(_serve(settings, registry, out, index))


async def _serve(settings: Settings, registry: Any, out: str, index: int) -> None:
    worker = Worker(settings, registry, worker_id=new_worker_id(index))
    started: list[tuple[float, float]] = []
    batches: list[tuple[float, int, float]] = []
    # Per claimed event: (time, seconds from receipt to its batch's claim starting,
    # seconds that claim took: documents, insert_many, winners handed on).
    phases: list[tuple[float, float, float]] = []
    lags: list[tuple[float, float]] = []
    clock = time.monotonic
    worker.scheduler.on_started = lambda seconds: started.append((clock(), seconds))
    worker.claimer.on_batch = lambda size, seconds: batches.append((clock(), size, seconds))
    claim = worker.claimer._claim

    async def timed_claim(batch: list[Any]) -> None:
        begun = clock()
        await claim(batch)
        took = clock() - begun
        phases.extend((begun, begun - item.received_mono, took) for item in batch)

    worker.claimer._claim = timed_claim  # type: ignore[method-assign]

    async def loop_lag() -> None:
        """How late a 10 ms sleep wakes up: the event loop's own delay (CPU)."""
        while True:
            due = clock() + 0.01
            await asyncio.sleep(0.01)
            lags.append((due, clock() - due))

    lag_task = asyncio.create_task(loop_lag())
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, worker.stop)
    await worker.run()
    lag_task.cancel()
    with open(out, "w") as file:  # noqa: ASYNC230 - once, after the worker stopped
        json.dump({"started": started, "batches": batches, "phases": phases, "lags": lags}, file)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run_mode(
    mode: str, workers: int, args: argparse.Namespace, replay_baseline: bool
) -> dict[str, Any]:
    """One claim mode on a fresh installation: the handler starts and claims measured
    over the window; then, if asked, the claims replayed on the idle store."""
    with Stack(workers=workers, start_fleet=False) as stack:
        app = stack.workdir / "app"
        app.mkdir()
        (app / "bench_handlers.py").write_text(NOOP_HANDLERS)
        env = {
            **stack.env,
            "AMIWORKER_SERVERS": json.dumps([s.server_setting() for s in stack.simulators]),
            "AMIWORKER_MONGO_URI": stack.mongo.uri,
            "AMIWORKER_DATABASE": stack.database,
            "AMIWORKER_HANDLERS": "bench_handlers",
            "AMIWORKER_APP_DIR": str(app),
            "AMIWORKER_CLAIM_MODE": mode,
        }
        if args.batch_delay is not None:
            env["AMIWORKER_BATCH_DELAY"] = str(args.batch_delay)
        if args.batch_size is not None:
            env["AMIWORKER_BATCH_SIZE"] = str(args.batch_size)
        settings = Settings.load(None, env_file=None, **_settings_of(env))
        print(
            f"{mode}: {workers} workers x 2 PBXs at {args.rate:,.0f} events/s in all; "
            f"batch_size {settings.batch_size}, batch_delay {settings.batch_delay}"
            + (f", hedge_delay {settings.hedge_delay}" if mode == "hedged" else "")
            + f"; measured over {args.seconds:g} s after {args.warmup:g} s"
        )
        context = multiprocessing.get_context("spawn")
        outs = [stack.workdir / f"latency-{i}.json" for i in range(workers)]
        processes = [
            context.Process(target=worker_process, args=(env, str(out), i))
            for i, out in enumerate(outs)
        ]
        for process in processes:
            process.start()
        try:
            stack.wait_connected()
            if mode == "hedged":
                stack.wait_views()
            calls_per_pbx = args.rate / 39 / len(stack.simulators)
            stack.start_calls(0, rate=calls_per_pbx)
            time.sleep(args.warmup)
            meter = CpuMeter(
                {"nx-27017": [stack.mongo.pid or 0], "workers": [p.pid or 0 for p in processes]}
            ).start()
            window = (time.monotonic(), time.monotonic() + args.seconds)
            time.sleep(args.seconds)
            meter.stop()
            stack.start_calls(0, rate=0)
            time.sleep(2)  # the last calls end
        finally:
            for process in processes:
                if process.pid is not None:
                    os.kill(process.pid, signal.SIGTERM)
            for process in processes:
                process.join(60)
        started, batches, waits, claims, lags = [], [], [], [], []
        # Each worker's claims: (start, relative to the window's, events), for the replay.
        paced: list[list[tuple[float, int]]] = []
        for out in outs:
            data = json.loads(out.read_text())
            inside = window[0], window[1]
            started += [s for t, s in data["started"] if inside[0] <= t <= inside[1]]
            batches += [(n, s) for t, n, s in data["batches"] if inside[0] <= t <= inside[1]]
            paced.append(
                [(t - s - inside[0], n) for t, n, s in data["batches"] if inside[0] <= t - s]
            )
            phases = [(w, c) for t, w, c in data["phases"] if inside[0] <= t <= inside[1]]
            waits += [w for w, _ in phases]
            claims += [c for _, c in phases]
            lags += [lag for t, lag in data["lags"] if inside[0] <= t <= inside[1]]
        counters: dict[str, int] = {}
        for row in stack.db.workers.find({}, {"counters": 1}):
            for name, value in (row.get("counters") or {}).items():
                counters[name] = counters.get(name, 0) + int(value)
        result: dict[str, Any] = {
            "mode": mode,
            "workers": workers,
            "started": started,
            "batches": batches,
            "waits": waits,
            "claims": claims,
            "lags": lags,
            "meter": meter,
            "counters": counters,
        }
        report_mode(result)
        if replay_baseline:
            settings = settings.model_copy(update={"mongo_uri": stack.mongo.uri})
            replay = Replay(stack, settings)
            result["unloaded"] = asyncio.run(replay.one_at_a_time(batches, args.replay))
            result["concurrent"] = asyncio.run(replay.concurrent(paced, args.replay_seconds))
    return result


def report_mode(result: dict[str, Any]) -> None:
    started, batches, counters = result["started"], result["batches"], result["counters"]
    p50, p99 = percentile(started, 0.50), percentile(started, 0.99)
    result["p50"], result["p99"] = p50, p99
    print(
        f"  received -> handler started: p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
        f"max {max(started) * 1e3:.1f} ms ({len(started):,} handler runs)"
    )

    def ms(values: list[float]) -> str:
        return f"p50 {percentile(values, 0.5) * 1e3:.1f}, p99 {percentile(values, 0.99) * 1e3:.1f}"

    print(
        f"  per claimed event (ms): waiting for its claim {ms(result['waits'])}; its claim "
        f"(documents, insert_many, hand-off) {ms(result['claims'])}; "
        f"event loop lag of the workers {ms(result['lags'])}"
    )
    claims = [seconds for _, seconds in batches]
    print(
        f"  claim round trip under load: p50 {percentile(claims, 0.5) * 1e3:.1f} ms, "
        f"p99 {percentile(claims, 0.99) * 1e3:.1f} ms, {len(claims):,} insert_many of "
        f"{statistics.mean(n for n, _ in batches):.1f} events on average"
    )
    won = counters.get("races_won", 0)
    inserts = (won + counters.get("races_lost", 0)) / max(1, won)
    line = f"  whole run: {inserts:.3f} inserts per stored event"
    if result["mode"] == "hedged":
        hedged = counters.get("hedged", 0)
        line += (
            f"; owned {counters.get('owned', 0):,}, hedged {hedged:,} "
            f"({hedged / max(1, won):.2%} of stored), covered {counters.get('covered', 0):,}"
        )
    print(line)
    print("  " + result["meter"].report())


class Replay:
    """The claims of a run, replayed on the idle store with ``LockTable.claim`` (the
    very call a worker makes), on documents built from what the PBXs sent with fresh
    ids (new claims, as an owner's are)."""

    def __init__(self, stack: Stack, settings: Settings) -> None:
        self.stack = stack
        self.settings = settings.model_copy(update={"database": "replay"})
        records = [(s.name, s.record_path) for s in stack.simulators]
        self.docs = build_documents(records, "bench-replay")
        self.used = 0

    def batch(self, size: int) -> list[dict[str, Any]]:
        batch = []
        for _ in range(size):
            doc = dict(self.docs[self.used % len(self.docs)])
            doc["_id"] = f"{doc['_id'][:24]}{self.used:08x}"
            batch.append(doc)
            self.used += 1
        return batch

    async def _claim(self, store: LockTable, size: int, times: list[float]) -> None:
        batch = self.batch(size)
        started = time.monotonic()
        claimed = await store.claim(batch)
        times.append(time.monotonic() - started)
        assert len(claimed.won) == size, "a replayed claim lost a race: ids reused"

    async def one_at_a_time(self, batches: list[tuple[int, float]], limit: int) -> list[float]:
        """The baseline: the run's claims (their sizes, in order), one after the other
        by one client, nothing else writing."""
        sizes = [n for n, _ in batches][:limit]
        store = LockTable.from_settings(self.settings, "bench-replay")
        await store.ensure_indexes()
        meter = CpuMeter({"nx-27017": [self.stack.mongo.pid or 0]}).start()
        times: list[float] = []
        for size in sizes:
            await self._claim(store, size, times)
        meter.stop()
        await store.close()
        print(
            f"unloaded claim round trip (baseline): p50 {percentile(times, 0.5) * 1e3:.1f} ms, "
            f"p99 {percentile(times, 0.99) * 1e3:.1f} ms: {len(times):,} claims of the "
            f"last mode's run replayed, {statistics.mean(sizes):.1f} events on "
            "average, one at a time, nothing else writing"
        )
        print("  " + meter.report())
        return times

    async def concurrent(self, paced: list[list[tuple[float, int]]], seconds: float) -> list[float]:
        """The same claims as the workers made them: one client per worker, each
        claim started when the worker started it (or once the previous one returned),
        over the first ``seconds`` of the window; nothing else (no AMI, handler, ack,
        coverage): what the store's handling of concurrent claims costs alone."""
        stores = [
            LockTable.from_settings(self.settings, f"bench-replay-{i}") for i in range(len(paced))
        ]
        times: list[float] = []
        begun = time.monotonic()

        async def replay(store: LockTable, claims: list[tuple[float, int]]) -> None:
            for at, size in claims:
                if at > seconds:
                    return
                await asyncio.sleep(max(0.0, begun + at - time.monotonic()))
                await self._claim(store, size, times)

        meter = CpuMeter({"nx-27017": [self.stack.mongo.pid or 0]}).start()
        await asyncio.gather(
            *(replay(st, claims) for st, claims in zip(stores, paced, strict=True))
        )
        meter.stop()
        for store in stores:
            await store.close()
        print(
            f"concurrent claim round trip: p50 {percentile(times, 0.5) * 1e3:.1f} ms, "
            f"p99 {percentile(times, 0.99) * 1e3:.1f} ms: {len(times):,} claims of the last "
            f"mode's first {seconds:g} s replayed by {len(paced)} clients as its workers "
            "made them, nothing else writing"
        )
        print("  " + meter.report())
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000, help="events/s from both PBXs")
    parser.add_argument("--modes", default="race,hedged", help="claim modes, in order")
    parser.add_argument("--workers", type=int, default=4, help="workers, hedged mode")
    parser.add_argument("--race-workers", type=int, default=2, help="workers, race mode")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--replay", type=int, default=1000, help="claims replayed unloaded")
    parser.add_argument(
        "--replay-seconds", type=float, default=10, help="seconds of claims replayed concurrently"
    )
    parser.add_argument("--batch-delay", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()

    print(f"machine: {machine_note()}")
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    results = {}
    for number, mode in enumerate(modes):
        workers = args.workers if mode == "hedged" else args.race_workers
        results[mode] = run_mode(mode, workers, args, replay_baseline=number == len(modes) - 1)
    unloaded, concurrent = results[modes[-1]]["unloaded"], results[modes[-1]]["concurrent"]
    base50, base99 = percentile(unloaded, 0.5), percentile(unloaded, 0.99)
    conc99 = percentile(concurrent, 0.99)
    print(
        f"summary (ratios within this run; baseline: the unloaded claim round trip, "
        f"p50 {base50 * 1e3:.1f} ms, p99 {base99 * 1e3:.1f} ms; the same claims made "
        f"concurrently: p99 {conc99 * 1e3:.1f} ms, {conc99 / base99:.1f}x):"
    )
    for mode, result in results.items():
        p50, p99 = result["p50"], result["p99"]
        line = (
            f"  {mode:6} ({result['workers']} workers): p50 {p50 * 1e3:.1f} ms "
            f"({p50 / base50:.1f}x), p99 {p99 * 1e3:.1f} ms ({p99 / base99:.1f}x)"
        )
        if mode == "hedged":
            ok = p99 <= 2 * base99
            line += (
                f"; target p99 <= 2x: {'met' if ok else 'NOT met'}; "
                f"p99 / concurrent claims' p99 = {p99 / conc99:.1f}x"
            )
        print(line)
    if "race" in results and "hedged" in results:
        race, hedged = results["race"], results["hedged"]
        print(
            f"  race / hedged: p50 {race['p50'] / hedged['p50']:.1f}x, "
            f"p99 {race['p99'] / hedged['p99']:.1f}x"
        )


def _settings_of(env: dict[str, str]) -> dict[str, Any]:
    """The AMIWORKER_* variables as Settings fields (for printing what the workers use)."""
    fields = {"batch_size": "AMIWORKER_BATCH_SIZE", "batch_delay": "AMIWORKER_BATCH_DELAY"}
    return {name: env[key] for name, key in fields.items() if key in env}


if __name__ == "__main__":
    main()
