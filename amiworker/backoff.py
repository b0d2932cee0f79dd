"""Retry delays: exponential, capped, with or without jitter. Every backoff in
amiworker (AMI reconnects, claims, handler retries, worker restarts) is one of these.

Every worker of a fleet loses a PBX or MongoDB at the same moment; drawing each
delay uniformly below the exponential ceiling (full jitter) spreads their
retries out, so they do not come back in lockstep.
"""

from __future__ import annotations

import random

__all__ = ["exponential", "full_jitter"]

# 2**60 times any sane minimum is beyond every cap: the exponent stops here, so
# no attempt count (a month-long outage retried every 100 ms) can overflow a float.
_MAX_EXPONENT = 60


def exponential(attempt: int, minimum: float, maximum: float) -> float:
    """``min(maximum, minimum * 2**attempt)`` for ``attempt`` >= 0, never overflowing."""
    exponent: int = min(max(attempt, 0), _MAX_EXPONENT)
    return min(maximum, minimum * float(2**exponent))


def full_jitter(
    attempt: int, minimum: float, maximum: float, rng: random.Random | None = None
) -> float:
    """The delay before retry ``attempt`` (0-based): ``uniform(0, exponential(...))``."""
    return (rng or random).uniform(0.0, exponential(attempt, minimum, maximum))
