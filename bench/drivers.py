"""The claim workload on PyMongo's asyncio client and on Motor, against nx-27017.

    python bench/drivers.py [--events 20000] [--batch-size 500] [--rounds 2]

``LockTable.claim`` (what every worker does with every event) is run with each
driver on the same documents: the claim documents of the first ``--events``
channel events of the 3,000-call capture, built as a worker builds them, in
``insert_many`` batches of ``--batch-size``. Each round claims them twice, on a
fresh database: first as worker A (all new, A wins every one), then as worker B
(every one a duplicate: the path of the workers that lose). The drivers take
turns (pymongo, motor, pymongo, motor...) so that drift on this shared machine
falls on both alike; the best round of each is shown.

Two figures per driver: wall-clock events/s, which on this machine mostly
measures nx-27017 (the same for both), and the client's CPU time per event
(``time.process_time`` of this process, Motor's threads included), which is
what the driver costs a worker, on the same 2 cores as everything else. The
ratio is Motor / PyMongo: above 1, PyMongo is faster.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stack import ROOT, channel_events, machine_note

from amiworker.ami.protocol import Parser
from amiworker.devstack.embedded_mongo import EmbeddedMongo
from amiworker.fleet.dedup import DedupKeys
from amiworker.fleet.documents import event_document
from amiworker.fleet.locktable import LockTable
from amiworker.mongo import close_client, open_client

CAPTURE = ROOT / "tests/fixtures/asterisk22-3000-calls.txt.gz"
DRIVERS = ("pymongo", "motor")


def documents(count: int, worker_id: str) -> list[dict[str, Any]]:
    messages = channel_events(Parser().feed(gzip.decompress(CAPTURE.read_bytes())))[:count]
    keys = DedupKeys("pbx1", window=float("inf"))
    now = datetime.now(UTC)
    return [event_document(keys.key(m.raw, 0.0), "pbx1", m, worker_id, now) for m in messages]


async def claim_all(
    uri: str, driver: str, database: str, worker_id: str, docs: list[dict[str, Any]], size: int
) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, events won) to claim ``docs`` in batches."""
    client = open_client(uri, driver)  # type: ignore[arg-type]
    store = LockTable(client[database], "events", worker_id)
    await store.ensure_indexes()
    await store.database.command("ping")
    wall, cpu = time.perf_counter(), time.process_time()
    won = 0
    for start in range(0, len(docs), size):
        won += len((await store.claim(docs[start : start + size])).won)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await close_client(client)
    return wall, cpu, won


async def one_round(uri: str, driver: str, count: int, size: int, n: int) -> dict[str, float]:
    database = f"drivers_{driver}_{n}"
    first = await claim_all(uri, driver, database, "worker-a", documents(count, "worker-a"), size)
    second = await claim_all(uri, driver, database, "worker-b", documents(count, "worker-b"), size)
    assert first[2] == count and second[2] == 0, (first[2], second[2])
    client = open_client(uri, "pymongo")
    await client.drop_database(database)
    await close_client(client)
    return {
        "new_rate": count / first[0],
        "new_cpu": first[1] / count,
        "dup_rate": count / second[0],
        "dup_cpu": second[1] / count,
    }


async def run(uri: str, count: int, size: int, rounds: int) -> dict[str, dict[str, float]]:
    best: dict[str, dict[str, float]] = {}
    for n in range(rounds):
        for driver in DRIVERS:
            result = await one_round(uri, driver, count, size, n)
            if driver not in best:
                best[driver] = result
            else:
                for key, value in result.items():
                    pick = max if key.endswith("rate") else min
                    best[driver][key] = pick(best[driver][key], value)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import importlib.metadata

    import pymongo

    motor_version = importlib.metadata.version("motor")
    print(f"machine: {machine_note()}")
    print(
        f"pymongo {pymongo.version} (AsyncMongoClient), motor {motor_version}; "
        f"{args.events:,} claims in insert_many of {args.batch_size}, best of {args.rounds}"
    )
    data = Path(__import__("tempfile").mkdtemp(prefix="amiworker-drivers-"))
    with EmbeddedMongo(data) as mongo:
        best = asyncio.run(run(mongo.uri, args.events, args.batch_size, args.rounds))
    for driver in DRIVERS:
        b = best[driver]
        print(
            f"{driver:8} new claims {b['new_rate']:7,.0f}/s, {b['new_cpu'] * 1e6:5.1f} us CPU "
            f"each; lost claims {b['dup_rate']:7,.0f}/s, {b['dup_cpu'] * 1e6:5.1f} us CPU each"
        )
    py, mo = best["pymongo"], best["motor"]
    print(
        f"motor / pymongo: CPU per claim {mo['new_cpu'] / py['new_cpu']:.2f}x (new), "
        f"{mo['dup_cpu'] / py['dup_cpu']:.2f}x (lost); wall-clock "
        f"{py['new_rate'] / mo['new_rate']:.2f}x (new), {py['dup_rate'] / mo['dup_rate']:.2f}x "
        "(lost) in favour of pymongo"
    )


if __name__ == "__main__":
    main()
