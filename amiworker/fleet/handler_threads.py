"""Plain (non-async) handlers in threads, and the runs abandoned in them.

A thread cannot be stopped: a plain handler still running after
``handler_timeout`` is abandoned and keeps its thread until it returns. Enough
of them (a handler that never returns, retried event after event) hold every
thread of the pool, and from then on every plain handler, however quick, times
out waiting for one. So that the log blames the handler that holds the threads
and not those waiting for them, each run knows whether it started, and the
runs abandoned while running are counted by handler until they return; a run
given up before it started never starts later (its event is retried).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

__all__ = ["ThreadRun", "abandoned_runs", "describe_abandoned", "exit_past_abandoned_runs"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
# Handler name -> runs abandoned after handler_timeout that have not returned yet.
_abandoned: Counter[str] = Counter()


class ThreadRun:
    """One call of a plain handler, submitted to a thread pool: callable in the thread."""

    __slots__ = ("finished", "given_up", "name", "started")

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = self.finished = self.given_up = False

    def __call__(self, function: Callable[..., Any], *args: Any) -> Any:
        with _lock:
            if self.given_up:
                return None  # timed out waiting for a thread: not run late
            self.started = True
        try:
            return function(*args)
        finally:
            with _lock:
                self.finished = True
                if self.given_up:
                    _abandoned[self.name] -= 1
                    if not _abandoned[self.name]:
                        del _abandoned[self.name]

    def give_up(self) -> bool:
        """Past its deadline: abandon the run; whether it had started (and holds a
        thread until it returns) rather than waited for a thread."""
        with _lock:
            self.given_up = True
            if self.started and not self.finished:
                _abandoned[self.name] += 1
            return self.started


def abandoned_runs() -> dict[str, int]:
    """Handler name -> its runs abandoned after ``handler_timeout`` still running."""
    with _lock:
        return dict(_abandoned)


def describe_abandoned(runs: dict[str, int]) -> str:
    """``3 run(s) of billing.HangupHandler, 1 of calls.NewchannelHandler``."""
    ordered = sorted(runs.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(
        f"{count} run(s) of {name}" if n == 0 else f"{count} of {name}"
        for n, (name, count) in enumerate(ordered)
    )


def exit_past_abandoned_runs(status: int) -> None:
    """End the process now with ``status`` if abandoned runs are still going: Python's
    exit would wait for every thread of the handler pool, and these may never return
    (the supervisor would kill the worker after shutdown_timeout)."""
    abandoned = abandoned_runs()
    if not abandoned:
        return
    log.error(
        "exiting without waiting for %d plain handler run(s) abandoned after "
        "handler_timeout and still running (%s)",
        sum(abandoned.values()),
        describe_abandoned(abandoned),
    )
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # os._exit writes out no buffer
    os._exit(status)
