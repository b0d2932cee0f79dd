"""Soak: minutes of calls through a real fleet; is the workers' resident memory flat?

    python bench/soak.py [--minutes 3] [--rate 150] [--workers 4] [--every 5]
    python bench/soak.py --minutes 10          # the real soak

nx-27017, two simulated PBXs making calls at ``--rate`` events/s in all, and
``amiworker --workers N`` with a no-op handler for every channel event. Every
``--every`` seconds the resident memory (VmRSS in /proc/PID/status) of each
worker process (``FleetProcess.worker_pids()``) is sampled. The first third of
the run (at least a minute) is warm-up: buffers, dedup windows and the
allocator's arenas reach their working size. The verdict compares the mean of
the samples in the minute after warm-up with the mean of the last minute: flat
means less than 5% growth, for every worker.

Baseline, in the same run: the memory of each worker once connected and idle,
before the first call, so the growth figure reads against what the workload
itself adds. At the end every channel event sent is checked: stored once, none
dropped.

The rate stays well below what nx-27017 absorbs on this machine (see
bench/pipeline.py): a soak watches memory under a sustained load, not a
backlog (a growing backlog is memory that grows by design, up to buffer_size).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stack import CpuMeter, Stack, channel_keys, machine_note, rss_kib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=150, help="events/s from both PBXs")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    args = parser.parse_args()

    duration = args.minutes * 60
    warmup = max(60.0, duration / 3)
    window = 60.0
    if duration < warmup + 2 * window:
        parser.error("--minutes must leave a minute after warm-up and a last minute: >= 3")
    print(f"machine: {machine_note()}")
    print(
        f"{args.workers} workers x 2 PBXs at {args.rate:g} events/s for {args.minutes:g} min; "
        f"RSS sampled every {args.every:g} s; warm-up {warmup:.0f} s"
    )
    with Stack(workers=args.workers) as stack:
        stack.wait_connected()
        assert stack.fleet is not None
        pids = stack.fleet.worker_pids()
        time.sleep(2)
        idle = {pid: rss_kib(pid) for pid in pids}
        meter = CpuMeter(stack.pids()).start()
        started = stack.start_calls(0, rate=args.rate / 39 / len(stack.simulators))
        samples: list[tuple[float, dict[int, int]]] = []
        print("    t  " + "  ".join(f"pid {pid:>7}" for pid in pids) + "   (RSS, MiB)")
        while (elapsed := time.monotonic() - started) < duration:
            sample = {pid: rss_kib(pid) for pid in pids}
            samples.append((elapsed, sample))
            print(f"{elapsed:5.0f}  " + "  ".join(f"{sample[p] / 1024:11.1f}" for p in pids))
            time.sleep(args.every)
        stack.start_calls(0, rate=0)
        meter.stop()
        restarted = set(stack.fleet.worker_pids()) != set(pids)
        time.sleep(5)  # the last calls end and are claimed
        deadline = time.monotonic() + 120
        expected = sum(len(channel_keys(s)) for s in stack.simulators)
        while stack.db.events.estimated_document_count() < expected:
            if time.monotonic() > deadline:
                raise AssertionError("events still missing 120 s after the calls stopped")
            time.sleep(1)
        stored = stack.db.events.estimated_document_count()
        stack.stop_fleet()
        dropped = stack.counters().get("dropped", 0)

    after = [s for t, s in samples if warmup <= t < warmup + window]
    last = [s for t, s in samples if t >= duration - window]
    print("idle, before the calls (baseline): " + ", ".join(f"{idle[p] / 1024:.1f}" for p in pids))
    print(f"events: {expected:,} channel events sent, {stored:,} stored, {dropped} dropped")
    print("  " + meter.report())
    flat = True
    for pid in pids:
        start = statistics.mean(s[pid] for s in after)
        end = statistics.mean(s[pid] for s in last)
        growth = (end - start) / start
        flat = flat and growth < 0.05
        print(
            f"worker {pid}: {start / 1024:.1f} MiB after warm-up -> {end / 1024:.1f} MiB at the "
            f"end ({growth:+.1%}); the workload adds {(end - idle[pid]) / 1024:.1f} MiB to idle"
        )
    assert not restarted, "a worker was restarted during the soak"
    assert stored == expected and dropped == 0
    print(f"verdict: {'FLAT' if flat else 'GROWING'} (< 5% growth after warm-up for every worker)")


if __name__ == "__main__":
    main()
