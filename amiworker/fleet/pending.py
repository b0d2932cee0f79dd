"""An event on its way to its claim: what the claim loop needs of it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from amiworker.ami.message import Message

__all__ = ["Pending"]


@dataclass(slots=True)
class Pending:
    """An event waiting for its claim."""

    server: str
    message: Message
    received_at: datetime  # wall clock, stored in the document
    received_mono: float  # monotonic, for the dedup window and latency
    key: str = ""  # the dedup key, computed on arrival (it depends on the arrival order)
    owner: int = 0  # hedged mode: what ownership is scored on (fleet.ownership.owner_hash)
