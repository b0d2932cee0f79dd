"""Latency: an event received by a worker to its handler started, p50 and p99, on nx-27017.

    python bench/latency.py [--rate 1000] [--workers 2] [--seconds 30] [--warmup 5]

Two simulated PBXs make calls at ``--rate`` events/s in all (39 events per
call, spread over the call's second, as Asterisk spreads them). Worker
processes, each a ``Worker`` exactly as ``amiworker`` runs it, hold a session
to both; the benchmark starts them itself so that it can hang its probes on
the hooks the worker offers: ``HandlerScheduler.on_started`` gives, for every
handler run, the seconds since the worker read the event off the socket (the
race through MongoDB included: batch delay, insert_many, handler queue), and
``Claimer.on_batch`` the size and duration of every claim. Every channel event
has a no-op handler; what the winner runs is measured, over ``--seconds``
after ``--warmup``.

Baseline, in the same run: the claim alone (``on_batch``: one insert_many
round trip), which no design that stores the event before running its handler
can avoid. The ratio says how much the rest of the path adds.

At 1,000 events/s, 4 workers would need more than nx-27017 can absorb on this
machine (see bench/pipeline.py), and a backlog makes latency grow without
bound; so the default is 2 workers (``--workers 4`` shows it).
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

from stack import NOOP_HANDLERS, CpuMeter, Stack, machine_note

from amiworker.fleet.dispatch import load_handlers
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
    clock = time.monotonic
    worker.scheduler.on_started = lambda seconds: started.append((clock(), seconds))
    worker.claimer.on_batch = lambda size, seconds: batches.append((clock(), size, seconds))
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, worker.stop)
    await worker.run()
    with open(out, "w") as file:  # noqa: ASYNC230 - once, after the worker stopped
        json.dump({"started": started, "batches": batches}, file)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000, help="events/s from both PBXs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--batch-delay", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()

    print(f"machine: {machine_note()}")
    with Stack(workers=args.workers, start_fleet=False) as stack:
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
        }
        if args.batch_delay is not None:
            env["AMIWORKER_BATCH_DELAY"] = str(args.batch_delay)
        if args.batch_size is not None:
            env["AMIWORKER_BATCH_SIZE"] = str(args.batch_size)
        settings = Settings.load(None, env_file=None, **_settings_of(env))
        print(
            f"{args.workers} workers x 2 PBXs at {args.rate:,.0f} events/s in all; "
            f"batch_size {settings.batch_size}, batch_delay {settings.batch_delay}; "
            f"measured over {args.seconds:g} s after {args.warmup:g} s"
        )
        context = multiprocessing.get_context("spawn")
        outs = [stack.workdir / f"latency-{i}.json" for i in range(args.workers)]
        processes = [
            context.Process(target=worker_process, args=(env, str(out), i))
            for i, out in enumerate(outs)
        ]
        for process in processes:
            process.start()
        try:
            stack.wait_connected()
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
        started, batches = [], []
        for out in outs:
            data = json.loads(out.read_text())
            started += [s for t, s in data["started"] if window[0] <= t <= window[1]]
            batches += [(n, s) for t, n, s in data["batches"] if window[0] <= t <= window[1]]

    claims = [seconds for _, seconds in batches]
    p50, p99 = percentile(started, 0.50), percentile(started, 0.99)
    print(
        f"received -> handler started: p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
        f"max {max(started) * 1e3:.1f} ms ({len(started):,} handler runs; target p99 < 20 ms)"
    )
    print(
        f"claim round trip (baseline): p50 {percentile(claims, 0.5) * 1e3:.1f} ms, "
        f"p99 {percentile(claims, 0.99) * 1e3:.1f} ms, {len(claims):,} insert_many of "
        f"{statistics.mean(n for n, _ in batches):.1f} events on average"
    )
    claim50, claim99 = percentile(claims, 0.5), percentile(claims, 0.99)
    print(f"ratio: p50 {p50 / claim50:.1f}x, p99 {p99 / claim99:.1f}x the claim round trip")
    print("  " + meter.report())


def _settings_of(env: dict[str, str]) -> dict[str, Any]:
    """The AMIWORKER_* variables as Settings fields (for printing what the workers use)."""
    fields = {"batch_size": "AMIWORKER_BATCH_SIZE", "batch_delay": "AMIWORKER_BATCH_DELAY"}
    return {name: env[key] for name, key in fields.items() if key in env}


if __name__ == "__main__":
    main()
