"""Whether MongoDB answers, as all the loops of one worker see it.

Claims, acks, heartbeats and take-overs all talk to the same store. When it
stops answering (unreachable, no majority, frozen: every call has a deadline),
each of them notices; the operator wants one line when the outage starts and
one when it ends, not one per loop and retry. Every loop reports here.

The take-over loop also asks how long the store has answered: after an outage
every worker's heartbeat is old, so a worker judges others dead only once the
store has answered it for a whole lease (the others have had time to beat again).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["StoreHealth"]

log = logging.getLogger("amiworker.store")


class StoreHealth:
    def __init__(self, describe_backlog: Callable[[], str] = lambda: "") -> None:
        #: What the worker holds meanwhile, for the log lines ("1,234 event(s) buffered").
        self._describe_backlog = describe_backlog
        self._down_since: float | None = None
        self._up_since = time.monotonic()
        self.outages = 0

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def up_for(self) -> float:
        """Seconds since the store last came back (or since start); 0 while it is down."""
        if self._down_since is not None:
            return 0.0
        return time.monotonic() - self._up_since

    def failed(self, error: BaseException) -> None:
        """A call failed as an outage (StoreUnavailable). Logs once per outage."""
        if self._down_since is not None:
            log.debug("still no MongoDB: %s", error)
            return
        self._down_since = time.monotonic()
        self.outages += 1
        backlog = self._describe_backlog()
        log.error(
            "%s; reading AMI on and holding events meanwhile%s",
            error,
            f" ({backlog})" if backlog else "",
        )

    def answered(self) -> None:
        """A call succeeded. Logs once when an outage ends."""
        down_since = self._down_since
        if down_since is None:
            return
        self._down_since = None
        self._up_since = time.monotonic()
        backlog = self._describe_backlog()
        log.warning(
            "MongoDB is back after %.1f s%s",
            self._up_since - down_since,
            f"; {backlog}" if backlog else "",
        )
