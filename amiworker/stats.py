"""A worker's counters: reported in its heartbeat, by `amiworker status`, and as metrics."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class WorkerStats:
    """Monotonic counts since the worker started."""

    events_seen: int = 0  # events read from every PBX, own-action replies excluded
    races_won: int = 0  # claims this worker inserted first
    races_lost: int = 0  # claims another worker had inserted (duplicate key)
    owned: int = 0  # hedged mode: events this worker owned (claimed at once)
    hedged: int = 0  # hedged mode: events claimed as a standby (owner silent, or window full)
    hedges_won: int = 0  # hedged mode: of those, the ones this claim stored (no one had)
    covered: int = 0  # hedged mode: events forgotten as a standby, a claim of them seen
    local: int = 0  # events that do not race, handled here as in every worker
    handled: int = 0  # handler runs that finished
    failed: int = 0  # handler runs that raised or timed out
    reclaimed: int = 0  # events taken over from a dead worker, or retried
    queued: int = 0  # events won with no room to run them: stored queued, for any worker
    dequeued: int = 0  # queued events this worker took to run
    released: int = 0  # events given back (queued) unstarted, on a stop
    rejected: int = 0  # events MongoDB refused (a validator, a unique index): not stored
    spilled: int = 0  # events written to the spill (memory full: a burst, or MongoDB away)
    dropped: int = 0  # events lost: the spill (or, without one, the buffer) was full
    claim_batches: int = 0
    store_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
