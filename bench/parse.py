"""Parser throughput on real Asterisk 22 traffic, beside panoramisk on the same bytes.

    python bench/parse.py [--rounds 3] [--chunk 65536]

Both parsers are fed the 3,000-call capture (117,006 events, 46 MB) in the
same TCP-sized chunks, and every message is handed to a consumer, as a live
session would. panoramisk's own ``AMIProtocol.data_received`` is the baseline,
so its framing, decoding and dispatch are measured as shipped.

Three amiworker figures are printed:

* ``frame``: messages framed, ``name`` and ``kind`` read (headers parsed lazily,
  which is what a worker that loses a race pays before the claim is built);
* ``frame+doc``: plus the ``Uniqueid``/``Linkedid`` lookups (parses every header);
* ``full``: every header of every message materialised, in order, with the
  case-insensitive index, repeated headers and exact raw bytes: strictly more
  than panoramisk keeps (it decodes as ASCII dropping other bytes, strips, and
  loses lines without ``: ``).

Times are CPU time of this process (``time.process_time``), best of
``--rounds``: the machine's other load then costs less accuracy than it would
on the wall clock.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from amiworker.ami.protocol import Parser

CAPTURE = Path(__file__).resolve().parent.parent / "tests/fixtures/asterisk22-3000-calls.txt.gz"
EXPECTED_EVENTS = 117_006


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def run_amiworker(pieces: list[bytes], mode: str) -> int:
    parser = Parser()
    events = 0
    for piece in pieces:
        for message in parser.feed(piece):
            if message.kind != "event":
                continue
            message.name  # noqa: B018 - what every consumer reads
            if mode == "doc":
                message.get("Uniqueid")
                message.get("Linkedid")
            elif mode == "full":
                message.headers  # noqa: B018
            events += 1
    return events


def run_panoramisk(pieces: list[bytes]) -> int:
    from panoramisk.ami_protocol import AMIProtocol

    class Counter:
        events = 0

        def dispatch(self, message: Any) -> None:
            self.events += 1

    class NullTransport:
        def write(self, data: bytes) -> None:
            pass

    protocol = AMIProtocol()
    protocol.connection_made(NullTransport())  # type: ignore[arg-type]
    factory = Counter()
    protocol.factory = factory
    for piece in pieces:
        protocol.data_received(piece)
    return factory.events


def best_of(rounds: int, run: Callable[[], int]) -> tuple[float, int]:
    best = float("inf")
    events = 0
    for _ in range(rounds):
        gc.collect()
        start = time.process_time()
        events = run()
        best = min(best, time.process_time() - start)
    return best, events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=65536, help="bytes per feed (a TCP read)")
    args = parser.parse_args()

    data = gzip.decompress(CAPTURE.read_bytes())
    pieces = chunks(data, args.chunk)
    print(f"capture: {CAPTURE.name}, {len(data) / 1e6:.1f} MB, fed in {args.chunk}-byte chunks")

    base_time, base_events = best_of(args.rounds, lambda: run_panoramisk(pieces))
    base_rate = base_events / base_time
    print(f"{'panoramisk 1.4 (baseline)':28} {base_rate:>10,.0f} events/s  ({base_events} events)")
    for mode, label in [("frame", "frame"), ("doc", "frame+doc"), ("full", "full")]:
        elapsed, events = best_of(args.rounds, lambda m=mode: run_amiworker(pieces, m))  # type: ignore[misc]
        assert events == EXPECTED_EVENTS, events
        rate = events / elapsed
        print(
            f"{'amiworker ' + label:28} {rate:>10,.0f} events/s  "
            f"{elapsed / events * 1e6:5.2f} us/event  {rate / base_rate:5.1f}x panoramisk"
        )


if __name__ == "__main__":
    main()
