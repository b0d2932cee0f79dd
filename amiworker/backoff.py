"""Retry delays: exponential backoff with full jitter.

Every worker of a fleet loses a PBX or MongoDB at the same moment; drawing each
delay uniformly below the exponential ceiling spreads their retries out, so
they do not come back in lockstep.
"""

from __future__ import annotations

import random

__all__ = ["full_jitter"]


def full_jitter(
    attempt: int, minimum: float, maximum: float, rng: random.Random | None = None
) -> float:
    """The delay before retry ``attempt`` (0-based): uniform(0, min(max, min * 2**attempt))."""
    ceiling = min(maximum, minimum * 2 ** min(attempt, 60))  # capped: no overflow, ever
    return (rng or random).uniform(0.0, ceiling)
