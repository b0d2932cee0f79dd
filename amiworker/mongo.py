"""Talking to MongoDB with either driver: open and close a client, and turn
driver errors into one line a user can act on.

PyMongo's asyncio client (``pymongo.AsyncMongoClient``) is the default; Motor
is there for code bases that already share a Motor client with their handlers.
Both raise ``pymongo.errors`` exceptions.
"""

from __future__ import annotations

import inspect
from datetime import UTC, datetime
from typing import Any, Final, Literal

from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)

__all__ = [
    "DUPLICATE_KEY",
    "Driver",
    "StoreUnavailable",
    "close_client",
    "open_client",
    "server_time",
    "unavailable",
]

Driver = Literal["pymongo", "motor"]

DUPLICATE_KEY: Final = 11000
_AUTH_FAILED_CODES: Final = frozenset({13, 18})  # Unauthorized, AuthenticationFailed


async def server_time(database: Any) -> datetime:
    """The MongoDB server's clock (``hello.localTime``), UTC; this host's if it has none.

    Heartbeats are stamped with it (``$currentDate``), so whatever compares with
    them (leases, heartbeat ages) reads the same clock. Raises driver errors.
    """
    reply = await database.command("hello")
    local = reply.get("localTime")
    if not isinstance(local, datetime):
        return datetime.now(UTC)
    return local if local.tzinfo is not None else local.replace(tzinfo=UTC)


class StoreUnavailable(Exception):
    """MongoDB cannot be reached or refused a write; one line, no password.

    The caller keeps its events and retries later (a retried claim is safe:
    see ``LockTable.claim``).
    """


def open_client(uri: str, driver: Driver = "pymongo", **options: Any) -> Any:
    """A client of the chosen driver; no I/O happens until the first operation.

    Datetimes come back timezone-aware (UTC), as amiworker writes them.
    """
    options = {"tz_aware": True, "appname": "amiworker", **options}
    if driver == "pymongo":
        from pymongo import AsyncMongoClient

        return AsyncMongoClient(uri, **options)
    if driver == "motor":
        from motor.motor_asyncio import AsyncIOMotorClient

        return AsyncIOMotorClient(uri, **options)
    raise ValueError(f"unknown MongoDB driver {driver!r}; use 'pymongo' or 'motor'")


async def close_client(client: Any) -> None:
    """Close a client of either driver (PyMongo's close is a coroutine, Motor's is not)."""
    result = client.close()
    if inspect.isawaitable(result):
        await result


def unavailable(where: str, what: str, exc: PyMongoError) -> StoreUnavailable:
    """One line naming the server (``where``, password already masked), what
    failed and what to do about it."""
    if isinstance(exc, ConnectionFailure):
        return StoreUnavailable(
            f"MongoDB at {where} is unreachable ({_first_line(exc)}) while trying to "
            f"{what}; check that it is running and that mongo_uri is right"
        )
    if isinstance(exc, OperationFailure) and exc.code in _AUTH_FAILED_CODES:
        return StoreUnavailable(
            f"MongoDB at {where} refused to {what}: {_first_line(exc)}; check the "
            "user, password and authSource in mongo_uri"
        )
    if isinstance(exc, BulkWriteError | WriteConcernError):
        return StoreUnavailable(
            f"MongoDB at {where} did not confirm the write to {what} "
            f"({_write_problem(exc)}); will retry"
        )
    return StoreUnavailable(
        f"MongoDB at {where} failed to {what}: {type(exc).__name__}: {_first_line(exc)}"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # PyMongo appends the whole topology description after the reason.
    text = text.split(", Timeout: ")[0]
    return text[:300]


def _write_problem(exc: BulkWriteError | WriteConcernError) -> str:
    if isinstance(exc, WriteConcernError):
        return _first_line(exc)
    details = exc.details
    for error in details.get("writeErrors", ()):
        if error.get("code") != DUPLICATE_KEY:
            return f"write error {error.get('code')}: {str(error.get('errmsg', ''))[:200]}"
    for error in details.get("writeConcernErrors", ()):
        return f"write concern error {error.get('code')}: {str(error.get('errmsg', ''))[:200]}"
    return _first_line(exc)
