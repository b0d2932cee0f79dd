"""The worker fleet: one worker process, the supervisor of N, and the lock table they race on.

The data path of a worker, in order: :mod:`~amiworker.fleet.dedup` (which events
race, and their key), :mod:`~amiworker.fleet.claims` (the claim buffer and its
batches), :mod:`~amiworker.fleet.locktable` (MongoDB: claim, ack, fail,
reclaim, heartbeat), :mod:`~amiworker.fleet.scheduler` (handlers in order per
call), :mod:`~amiworker.fleet.outcomes` (acks and failures recorded).
:mod:`~amiworker.fleet.worker` wires them; :mod:`~amiworker.fleet.supervisor`
runs N workers; :mod:`~amiworker.fleet.dispatch` finds and calls handlers.
"""
