"""`amiworker --workers N`: start, watch, restart and stop N worker processes.

Each worker is a separate process (spawned, not forked, so no event loop or
MongoDB client state is shared) holding its own AMI session to every PBX.
A worker that dies is restarted with backoff; one that exits with status 2
(bad settings, a handler module that fails to import) is not, since a restart
would fail the same way. SIGTERM or SIGINT stops every worker gracefully; a
second signal kills them at once.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType

from amiworker.backoff import exponential
from amiworker.settings import Settings

__all__ = ["EXIT_BAD_SETTINGS", "Supervisor"]

log = logging.getLogger("amiworker.fleet.supervisor")

EXIT_BAD_SETTINGS = 2
_RESTART_MIN = 0.5
_RESTART_MAX = 30.0
# A worker that ran this long before dying is restarted without delay.
_HEALTHY_RUN = 30.0
# Extra seconds, beyond the handlers' shutdown_timeout, a worker gets to exit.
_STOP_GRACE = 10.0


@dataclass
class _Slot:
    index: int
    process: BaseProcess | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i) for i in range(settings.workers)]
        self._signals = 0
        self.exit_code = 0

    def run(self) -> int:
        """Run until signalled; return the process exit status."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            log.info(
                "starting %d worker(s) for %d PBX(s)",
                len(self._slots),
                len(self.settings.servers),
            )
            for slot in self._slots:
                self._start(slot)
            while not self._signals:
                self._watch()
            self._stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.exit_code

    # -- signals -----------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info(
                "%s: stopping the workers gracefully (within shutdown_timeout + %g s; "
                "a second signal kills them at once)",
                signal.Signals(signum).name,
                _STOP_GRACE,
            )
        else:
            log.warning("second signal: killing the workers now")
            for slot in self._slots:
                if slot.process is not None and slot.process.is_alive():
                    slot.process.kill()

    # -- the watch loop ------------------------------------------------------------------

    def _start(self, slot: _Slot) -> None:
        from amiworker.fleet.worker import run_worker_process

        process = self._context.Process(
            target=run_worker_process,
            args=(self.settings, slot.index),
            name=f"amiworker-{slot.index}",
        )
        process.start()
        slot.process = process
        slot.started = time.monotonic()
        log.info("worker %d started (pid %s)", slot.index, process.pid)

    def _watch(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if slot.process is None and now >= slot.restart_at:
                self._start(slot)
        running = [s.process.sentinel for s in self._slots if s.process is not None]
        multiprocessing.connection.wait(running, timeout=0.5)
        for slot in self._slots:
            process = slot.process
            if process is None or process.is_alive() or self._signals:
                continue
            process.join()
            code = process.exitcode if process.exitcode is not None else -1
            slot.process = None
            if code == EXIT_BAD_SETTINGS:
                log.error(
                    "worker %d could not start (exit status 2, see the message above); stopping",
                    slot.index,
                )
                self.exit_code = EXIT_BAD_SETTINGS
                self._signals += 1
                return
            ran = time.monotonic() - slot.started
            slot.failures = 0 if ran >= _HEALTHY_RUN else slot.failures + 1
            delay = exponential(slot.failures - 1, _RESTART_MIN, _RESTART_MAX)
            delay = 0.0 if slot.failures == 0 else delay
            slot.restart_at = time.monotonic() + delay
            how = f"signal {-code}" if code < 0 else f"status {code}"
            log.warning(
                "worker %d (pid %s) died with %s after %.1f s; restarting in %.1f s",
                slot.index,
                process.pid,
                how,
                ran,
                delay,
            )

    def _stop_all(self) -> None:
        for slot in self._slots:
            if slot.process is not None and slot.process.is_alive() and slot.process.pid:
                os.kill(slot.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_timeout + _STOP_GRACE
        for slot in self._slots:
            process = slot.process
            if process is None:
                continue
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("worker %d did not stop in time; killing it", slot.index)
                process.kill()
                process.join()
        log.info("all workers stopped")
