"""The event document: what one AMI event looks like in the MongoDB event log,
and the indexes that serve the queries made of it.

``event_document`` runs for every event every worker sees (tens of thousands
per second on a busy PBX), before the claim, so it reuses what parsing the
message built (``Message.header_dict``) and parses nothing but the Timestamp.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from pymongo.errors import OperationFailure

from amiworker.ami.message import Message
from amiworker.timeparse import timestamp_datetime

__all__ = [
    "CLAIMED",
    "DEAD",
    "DONE",
    "FAILED",
    "INDEXES",
    "QUEUED",
    "RETIRED_INDEXES",
    "STATES",
    "TTL_KEY",
    "ensure_indexes",
    "event_document",
    "message_from_document",
]

# The life of an event document. claimed -> done; claimed -> failed -> claimed
# (retry) ...; after max_attempts unsuccessful runs -> dead. queued: stored with
# no owner (its winner had no room, or stopped before running it): any worker
# with room takes it -> claimed.
CLAIMED: Final = "claimed"
QUEUED: Final = "queued"
DONE: Final = "done"
FAILED: Final = "failed"
DEAD: Final = "dead"
STATES: Final = (QUEUED, CLAIMED, DONE, FAILED, DEAD)

# (name, keys). Names are given so that a real MongoDB finds them again by name.
INDEXES: Final[tuple[tuple[str, list[tuple[str, int]]], ...]] = (
    ("uniqueid_1", [("uniqueid", 1)]),
    ("linkedid_1", [("linkedid", 1)]),
    ("server_1_ts_1", [("server", 1), ("ts", 1)]),
    ("event_1_ts_1", [("event", 1), ("ts", 1)]),
    # Runnable by any worker, oldest first (queued events and due retries); its
    # prefix serves every other query on state: failed and dead events, and the
    # take-over of a dead worker's claimed ones (a scan of what is in flight).
    ("state_1_retry_at_1", [("state", 1), ("retry_at", 1)]),
)
# Indexes of earlier versions that no query needs any more, dropped on start: every
# index is written on every claim and every ack. (state, claimed_by) served the
# take-over scan, which (state, retry_at) serves as well.
RETIRED_INDEXES: Final = (("state_1_claimed_by_1", [("state", 1), ("claimed_by", 1)]),)
TTL_INDEX: Final = "received_at_ttl"
TTL_KEY: Final = [("received_at", 1)]
# An index with the same keys exists under another name (made by hand): it serves.
_SAME_KEYS_OTHER_NAME: Final = frozenset({85, 86})  # IndexOptionsConflict, IndexKeySpecsConflict


def event_document(
    key: str, server: str, message: Message, worker_id: str, received_at: datetime
) -> dict[str, Any]:
    """The document a worker inserts to claim ``message``.

    ``headers`` keeps every header: names lower-cased (Asterisk's spelling
    varies between versions), values exactly as sent, a repeated header as the
    list of its values in order. ``uniqueid`` is the ``Uniqueid`` header, else
    the first header whose name ends in ``uniqueid`` (``DestUniqueid``,
    ``LocalOneUniqueid``...); ``ts`` is the event's own ``Timestamp`` when it has
    a valid one, else ``received_at`` (which must be timezone-aware UTC).
    """
    headers = message.header_dict() if b"\x00" not in message.raw else _escaped_headers(message)
    uniqueid = _first(headers.get("uniqueid"))
    if uniqueid is None:
        uniqueid = next(
            (_first(value) for name, value in headers.items() if name.endswith("uniqueid")), None
        )
    return {
        "_id": key,
        "server": server,
        "event": message.name,
        "uniqueid": uniqueid,
        "linkedid": _first(headers.get("linkedid")),
        "ts": timestamp_datetime(_first(headers.get("timestamp"))) or received_at,
        "received_at": received_at,
        "headers": headers,
        "state": CLAIMED,
        "claimed_by": worker_id,
        "attempts": 0,
        "error": None,
        "done_at": None,
    }


def message_from_document(doc: Mapping[str, Any]) -> Message:
    """Rebuild the event of a stored document, for a handler run after a reclaim.

    Header names come back lower-cased (``Event`` excepted), which a Message
    does not mind: its lookups ignore case. Repeated headers keep their order;
    the relative order of different names is the order of first appearance.
    """
    lines = [f"Event: {doc['event']}"]
    for name, value in doc["headers"].items():
        if name == "event":
            continue
        for item in value if isinstance(value, list) else (value,):
            lines.append(f"{name}: {item}")
    return Message(("\r\n".join(lines) + "\r\n\r\n").encode())


def _escaped_headers(message: Message) -> dict[str, Any]:
    """``headers`` of a message with a NUL byte: BSON cannot hold a NUL in a field
    name, so the header is kept with the NUL visibly escaped."""
    return {name.replace("\x00", "\\x00"): value for name, value in message.header_dict().items()}


def _first(value: str | list[str] | None) -> str | None:
    return value[0] if isinstance(value, list) else value


async def ensure_indexes(events: Any, ttl_days: float | None = None) -> None:
    """Create the query indexes on the ``events`` collection (either driver) and
    keep, change or drop the TTL index on ``received_at`` to match ``ttl_days``.

    Idempotent. ``_id`` is the only unique index: it is the dedup key.
    """
    for name, keys in INDEXES:
        try:
            await events.create_index(keys, name=name)
        except OperationFailure as exc:
            if exc.code not in _SAME_KEYS_OTHER_NAME:
                raise
    retired = [keys for _, keys in RETIRED_INDEXES]
    for name, spec in (await events.index_information()).items():
        if _plain_keys(spec.get("key", [])) in retired:
            with contextlib.suppress(OperationFailure):  # another worker dropped it first
                await events.drop_index(name)  # found by keys: a server may rename indexes
    wanted = None if ttl_days is None else max(1, int(ttl_days * 86400))
    existing = await _ttl_index(events)
    if existing is None:
        if wanted is not None:
            await events.create_index(TTL_KEY, name=TTL_INDEX, expireAfterSeconds=wanted)
        return
    name, current = existing
    if current == wanted:
        return
    if wanted is None:
        await events.drop_index(name)
        return
    await events.database.command(
        {"collMod": events.name, "index": {"name": name, "expireAfterSeconds": wanted}}
    )
    changed = await _ttl_index(events)
    if changed is None or changed[1] != wanted:
        # collMod is how MongoDB changes a TTL in place; a server that accepts
        # it without applying it (nx-27017) gets the index rebuilt instead.
        await events.drop_index(name)
        await events.create_index(TTL_KEY, name=TTL_INDEX, expireAfterSeconds=wanted)


def _plain_keys(keys: Any) -> list[tuple[str, Any]]:
    """An index's keys with numeric directions as ints (a server may send 1.0); a
    user's own text, hashed or geo index keeps its kind ("text", "2dsphere"...)."""
    return [(key, int(kind) if isinstance(kind, int | float) else kind) for key, kind in keys]


async def _ttl_index(events: Any) -> tuple[str, int | None] | None:
    """(name, expireAfterSeconds) of the index on ``received_at``, found by its keys."""
    info = await events.index_information()
    for name, spec in info.items():
        if _plain_keys(spec.get("key", [])) == TTL_KEY:
            expire = spec.get("expireAfterSeconds")
            return name, None if expire is None else int(expire)
    return None
