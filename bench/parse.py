"""Parser throughput on real Asterisk 22 traffic, beside panoramisk on the same bytes.

    python bench/parse.py [--rounds 3] [--chunk 65536]

Both parsers are fed the 3,000-call capture (117,006 events, 46 MB) in the
same TCP-sized chunks, and every message is handed to a consumer, as a live
session would. panoramisk's own ``AMIProtocol.data_received`` is the baseline,
so its framing, decoding and dispatch are measured as shipped.

Five amiworker figures are printed, each with its ratio to panoramisk:

* ``frame``: messages framed, ``name`` and ``kind`` read (headers parsed lazily,
  which is what a worker that loses a race pays before the claim is built);
* ``read Uniqueid``: messages framed, ``kind`` read (to keep the events), and
  ``message.get("Uniqueid")`` of every event: one header, found by a search of
  the raw bytes, no other header parsed. Its ratio is to panoramisk doing the
  same, reading ``Uniqueid`` of every event it dispatches (it has parsed every
  header into a dict on its own); both read the same 117,006 values, checked
  before timing;
* ``read name, Uniqueid``: the same plus ``name`` (the Event header, which a
  worker reads of every event), against the same panoramisk figure;
* ``frame+doc``: ``frame`` plus every header parsed into the dict a claimed
  event's document stores (``header_dict``), and its ``uniqueid``/``linkedid`` read;
* ``full``: ``frame`` plus every header of every message materialised, in order, with the
  case-insensitive index, repeated headers and exact raw bytes: strictly more
  than panoramisk keeps (it decodes as ASCII dropping other bytes, strips, and
  loses lines without ``: ``).

Times are CPU time of this process (``time.process_time``), best of
``--rounds``, the variants taking turns within each round: the machine's other
load, and a change in its speed during the run, then weigh on all of them alike.
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


def run_amiworker(pieces: list[bytes], mode: str, seen: list[Any] | None = None) -> int:
    parser = Parser()
    events = 0
    for piece in pieces:
        for message in parser.feed(piece):
            if message.kind != "event":
                continue
            if mode == "one":  # one header, and nothing else
                value = message.get("Uniqueid")
                if seen is not None:
                    seen.append(value)
                events += 1
                continue
            message.name  # noqa: B018 - what every consumer reads
            if mode == "name+one":
                message.get("Uniqueid")
            elif mode == "doc":
                headers = message.header_dict()
                headers.get("uniqueid")
                headers.get("linkedid")
            elif mode == "full":
                message.headers  # noqa: B018
            events += 1
    return events


def run_panoramisk(pieces: list[bytes], read: bool = False, seen: list[Any] | None = None) -> int:
    from panoramisk.ami_protocol import AMIProtocol

    class Counter:
        events = 0

        def dispatch(self, message: Any) -> None:
            self.events += 1

    class Reader:
        events = 0

        def dispatch(self, message: Any) -> None:
            self.events += 1
            value = message.get("Uniqueid")
            if seen is not None:
                seen.append(value)

    class NullTransport:
        def write(self, data: bytes) -> None:
            pass

    protocol = AMIProtocol()
    protocol.connection_made(NullTransport())
    factory = Reader() if read else Counter()
    protocol.factory = factory
    for piece in pieces:
        protocol.data_received(piece)
    return factory.events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=65536, help="bytes per feed (a TCP read)")
    args = parser.parse_args()

    data = gzip.decompress(CAPTURE.read_bytes())
    pieces = chunks(data, args.chunk)
    print(f"capture: {CAPTURE.name}, {len(data) / 1e6:.1f} MB, fed in {args.chunk}-byte chunks")

    # Both read the same Uniqueid of every event (None where an event has none).
    ours: list[Any] = []
    theirs: list[Any] = []
    run_amiworker(pieces, "one", ours)
    run_panoramisk(pieces, read=True, seen=theirs)
    assert ours == theirs, "amiworker and panoramisk read different Uniqueid values"
    assert len(ours) == EXPECTED_EVENTS, len(ours)
    lacking = ours.count(None)
    print(f"Uniqueid: the same {len(ours):,} values read by both ({lacking:,} events have none)")

    variants: dict[str, Callable[[], int]] = {
        "panoramisk": lambda: run_panoramisk(pieces),
        "panoramisk one": lambda: run_panoramisk(pieces, read=True),
        "frame": lambda: run_amiworker(pieces, "frame"),
        "one": lambda: run_amiworker(pieces, "one"),
        "name+one": lambda: run_amiworker(pieces, "name+one"),
        "doc": lambda: run_amiworker(pieces, "doc"),
        "full": lambda: run_amiworker(pieces, "full"),
    }
    best: dict[str, float] = {}
    counts: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, run in variants.items():
            gc.collect()
            start = time.process_time()
            counts[name] = run()
            best[name] = min(best.get(name, float("inf")), time.process_time() - start)
    for name in variants:
        if not name.startswith("panoramisk"):
            assert counts[name] == EXPECTED_EVENTS, (name, counts[name])

    def rate(name: str) -> float:
        return counts[name] / best[name]

    def line(label: str, name: str, baseline: str | None) -> None:
        us = best[name] / counts[name] * 1e6
        shown = {"panoramisk": "panoramisk", "panoramisk one": "panoramisk reading Uniqueid"}
        ratio = f"{rate(name) / rate(baseline):5.1f}x {shown[baseline]}" if baseline else ""
        print(f"{label:34} {rate(name):>10,.0f} events/s  {us:5.2f} us/event  {ratio}")

    line("panoramisk 1.4 (baseline)", "panoramisk", None)
    line("panoramisk 1.4, read Uniqueid", "panoramisk one", None)
    line("amiworker frame", "frame", "panoramisk")
    line("amiworker read Uniqueid", "one", "panoramisk one")
    line("amiworker read name, Uniqueid", "name+one", "panoramisk one")
    line("amiworker frame+doc", "doc", "panoramisk")
    line("amiworker full", "full", "panoramisk")


if __name__ == "__main__":
    main()
