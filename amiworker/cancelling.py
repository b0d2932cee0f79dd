"""Cancelling tasks so that they really end.

On Python 3.11 ``asyncio.wait_for`` drops a cancellation that arrives as the
awaited call finishes (fixed in 3.12). The MongoDB driver waits with it, and so
may a handler: a loop that lost its cancellation runs on, and whoever awaits it
waits for ever. So the cancellation is repeated until the tasks have ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

__all__ = ["cancel_until_done"]

_REPEAT_EVERY = 0.5  # seconds


async def cancel_until_done(
    tasks: Iterable[asyncio.Task[Any]], give_up_after: float | None = None
) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks``, again every half second, until they have ended.

    Returns the tasks still running after ``give_up_after`` seconds (None: wait
    for as long as it takes): code that catches every cancellation cannot be
    stopped, only abandoned.
    """
    loop = asyncio.get_running_loop()
    deadline = None if give_up_after is None else loop.time() + give_up_after
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        wait = _REPEAT_EVERY
        if deadline is not None:
            wait = min(wait, deadline - loop.time())
            if wait <= 0:
                break
        _, pending = await asyncio.wait(pending, timeout=wait)
    return pending
