"""MongoDB as a lock table: the ``events`` collection and the ``workers`` collection.

Every worker inserts every channel event it sees; the document ``_id`` is the
dedup key, so MongoDB's mandatory unique ``_id`` index decides which worker
won each event (ARCHITECTURE.md, "The data path"). The states of a document::

    claimed (by its worker) -> done
                            -> failed (retry_at) -> claimed ... -> dead (max_attempts)
    queued (no owner, since retry_at) -> claimed (by any worker with room)

A winner with no room in its handler backlog stores the event ``queued``, and a
worker that stops releases what it has not started the same way: any worker
with room takes it at once, with no lease to wait for. Workers heartbeat into
``workers``; the events ``claimed`` by a worker whose heartbeat is older than
the lease are taken over in bulk (one ``update_many`` fenced by the dead
owners' ids and a fresh token, then one ``find`` by id and token), so two live
workers never take the same event.

Every call has a deadline: the client's ``timeoutMS`` (``store_timeout``), and
``wtimeout`` on the majority write concern of claims. The code uses only the
API that ``pymongo.AsyncMongoClient`` and Motor share, so either client's
database object works. Timestamps that the server writes (``done_at``,
``last_seen``, ``retry_at`` of a release) use ``$currentDate``: one clock.
"""

from __future__ import annotations

import os
import random
import socket
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from pymongo import WriteConcern
from pymongo.errors import BulkWriteError, PyMongoError
from pymongo.read_concern import ReadConcern

from amiworker.backoff import exponential
from amiworker.fleet.documents import CLAIMED, DEAD, DONE, FAILED, QUEUED, ensure_indexes
from amiworker.mongo import (
    DUPLICATE_KEY,
    StoreUnavailable,
    close_client,
    open_client,
    server_time,
    unavailable,
)
from amiworker.settings import redact_uri

if TYPE_CHECKING:
    from amiworker.settings import Settings

__all__ = [
    "MAX_ERROR_LENGTH",
    "Claimed",
    "Failure",
    "LockTable",
    "Runnable",
    "StoreUnavailable",
]

MAX_ERROR_LENGTH: Final = 2000


class Failure(NamedTuple):
    """A failed run as recorded: the event's new state, and in how many seconds it
    is due again (None once DEAD)."""

    state: str  # FAILED or DEAD
    retry_in: float | None


class Claimed(NamedTuple):
    """What a claim came to: the documents this worker won, in the order given, and
    those the store refused (with its reason), which no retry would change."""

    won: list[dict[str, Any]]
    rejected: list[tuple[dict[str, Any], str]]


class Runnable(NamedTuple):
    """Events taken to run: ``queued`` ones (``queued`` of them) and due retries."""

    docs: list[dict[str, Any]]
    queued: int


WORKERS_COLLECTION: Final = "workers"
COVERAGE_COLLECTION: Final = "coverage"
_MAX_UNSETTLED: Final = 1_000_000
# Write errors of one document that are the store's state, not the document's:
# retried like an unreachable store (not primary, shutting down, interrupted,
# timed out). Codes, never messages.
_TRANSIENT_WRITE_ERRORS: Final = frozenset(
    {6, 7, 50, 64, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436}
)
_ID_INDEX: Final = {"_id": 1}


class LockTable:
    """The lock table as one worker uses it: claim, ack, fail, heartbeat, reclaim.

    ``database`` is a database object of either driver. ``uri`` only serves
    error messages (it is shown with its password masked).
    """

    def __init__(
        self,
        database: Any,
        collection: str = "events",
        worker_id: str = "",
        *,
        uri: str | None = None,
        client: Any = None,
        write_timeout: float | None = None,
    ) -> None:
        if not worker_id:
            raise ValueError("LockTable needs a worker_id")
        self.database = database
        self.worker_id = worker_id
        self.events = database[collection]
        self.workers = database[WORKERS_COLLECTION]
        self.coverage_docs = database[COVERAGE_COLLECTION]
        # A claim must survive a failover, or two workers could both win an event.
        # wtimeout: a replica set that cannot reach a majority must not hold a claim
        # for ever (the client's timeoutMS bounds the rest of the call).
        wtimeout = None if write_timeout is None else max(1, int(write_timeout * 1000))
        self._claims = self.events.with_options(
            write_concern=WriteConcern("majority", wtimeout=wtimeout)
        )
        # Reading back who won after an unclear claim must not see a write that
        # a failover may still roll back.
        self._committed = self.events.with_options(read_concern=ReadConcern("majority"))
        self._client = client  # closed by close() when the store opened it
        # Ids of claims that raised: they may be stored, as this worker's.
        self._unsettled: set[Any] = set()
        self._where = redact_uri(uri) if uri else f"database {database.name!r}"

    @classmethod
    def from_settings(cls, settings: Settings, worker_id: str) -> LockTable:
        """Open a client as configured; :meth:`close` closes it again."""
        client = open_client(
            settings.mongo_uri,
            settings.driver,
            serverSelectionTimeoutMS=int(settings.connect_timeout * 1000),
            timeoutMS=int(settings.store_timeout * 1000),
        )
        return cls(
            client[settings.database],
            settings.collection,
            worker_id,
            uri=settings.mongo_uri,
            client=client,
            write_timeout=settings.store_timeout,
        )

    async def close(self) -> None:
        if self._client is not None:
            await close_client(self._client)
            self._client = None

    # -- indexes ---------------------------------------------------------------

    async def ensure_indexes(self, ttl_days: float | None = None) -> None:
        """Create the query indexes; keep, change or drop the TTL index to match.

        Idempotent. ``_id`` is the only unique index: it is the dedup key.
        """
        try:
            await ensure_indexes(self.events, ttl_days)
        except PyMongoError as exc:
            raise self._unavailable("create indexes", exc) from None

    # -- claiming ----------------------------------------------------------------

    async def claim(self, docs: Sequence[dict[str, Any]]) -> Claimed:
        """Insert ``docs``; return those this worker won and those the store refused.

        One unordered ``insert_many`` with write concern majority. A
        duplicate-key error (code 11000) on ``_id`` means another worker
        inserted that event first. Errors are judged by their code and the
        index they name (``keyPattern``), never by their message. A duplicate
        on another unique index (one an operator added), or any other error of
        one document (a validator's 121, say), is that document refused: the
        others are stored, the refused ones returned with the reason, and a
        retry would change nothing. A write concern error, an error of the
        store's state (not primary, shutting down) or a connection error raises
        :class:`StoreUnavailable`, and some of the documents may be stored.

        Retrying such a claim is safe and needs nothing of the caller: the ids
        of a claim that raised are remembered as unsettled. When a later claim
        gets a duplicate for an unsettled id, the store reads (majority read
        concern) whether the stored document carries this worker's id; if so,
        the earlier attempt won it. Other duplicates need no read: on a first
        attempt a duplicate is always another worker's, and with several
        workers most batches have some, so reading them all would double the
        round trips.
        """
        if not docs:
            return Claimed([], [])
        mine: set[Any] = set()
        refused: dict[int, str] = {}
        try:
            try:
                await self._claims.insert_many(docs, ordered=False)
                lost: set[int] = set()
            except BulkWriteError as exc:
                lost, refused = self._sort_write_errors(exc)
            unsettled = self._unsettled
            doubtful = [docs[i]["_id"] for i in lost if docs[i]["_id"] in unsettled]
            if doubtful:
                mine = await self._claimed_by_me(doubtful)
        except (StoreUnavailable, PyMongoError) as exc:
            if len(self._unsettled) > _MAX_UNSETTLED:
                self._unsettled.clear()  # events given up on by the caller, long ago
            self._unsettled.update(doc["_id"] for doc in docs)
            if isinstance(exc, StoreUnavailable):
                raise
            raise self._unavailable("claim events", exc) from None
        if self._unsettled:
            self._unsettled.difference_update(doc["_id"] for doc in docs)
        won = [
            doc
            for i, doc in enumerate(docs)
            if i not in refused and (i not in lost or doc["_id"] in mine)
        ]
        return Claimed(won, [(docs[i], reason) for i, reason in sorted(refused.items())])

    def _sort_write_errors(self, exc: BulkWriteError) -> tuple[set[int], dict[int, str]]:
        """(indexes of lost races, {index: reason} of refused documents); raise
        :class:`StoreUnavailable` when the store, not a document, is the problem."""
        details = exc.details
        if details.get("writeConcernErrors"):
            # Inserted but not confirmed by a majority: a failover could roll
            # them back and hand the events to another worker. Retry instead.
            raise self._unavailable("claim events", exc) from None
        lost: set[int] = set()
        refused: dict[int, str] = {}
        for error in details.get("writeErrors", ()):
            code = error.get("code")
            index = error["index"]
            key_pattern = error.get("keyPattern")
            if code == DUPLICATE_KEY and (key_pattern is None or key_pattern == _ID_INDEX):
                # No keyPattern (servers before MongoDB 4.2): _id is the only unique
                # index amiworker creates, so a duplicate is a lost race.
                lost.add(index)
            elif code in _TRANSIENT_WRITE_ERRORS:
                raise self._unavailable("claim events", exc) from None
            elif code == DUPLICATE_KEY:
                refused[index] = f"duplicate key on unique index {key_pattern} (not _id)"
            else:
                refused[index] = f"write error {code}: {str(error.get('errmsg', ''))[:300]}"
        return lost, refused

    async def _claimed_by_me(self, keys: list[Any]) -> set[Any]:
        try:
            cursor = self._committed.find(
                {"_id": {"$in": keys}, "claimed_by": self.worker_id}, {"_id": 1}
            )
            return {doc["_id"] async for doc in cursor}
        except PyMongoError as exc:
            raise self._unavailable("check claimed events", exc) from None

    # -- outcome of a handler run ---------------------------------------------------------

    async def ack(self, key: Any) -> bool:
        """Mark an event this worker holds as done. False if it is no longer ours
        (another worker took it over after our heartbeat expired)."""
        try:
            result = await self.events.update_one(
                {"_id": key, "state": CLAIMED, "claimed_by": self.worker_id},
                {"$set": {"state": DONE}, "$currentDate": {"done_at": True}},
            )
        except PyMongoError as exc:
            raise self._unavailable("acknowledge an event", exc) from None
        return bool(result.modified_count == 1)

    async def ack_many(self, keys: Sequence[Any]) -> int:
        """:meth:`ack` for many events in one write; returns how many were still ours."""
        if not keys:
            return 0
        try:
            result = await self.events.update_many(
                {"_id": {"$in": list(keys)}, "state": CLAIMED, "claimed_by": self.worker_id},
                {"$set": {"state": DONE}, "$currentDate": {"done_at": True}},
            )
        except PyMongoError as exc:
            raise self._unavailable("acknowledge events", exc) from None
        return int(result.modified_count)

    async def release(self, keys: Sequence[Any]) -> int:
        """Give up events this worker holds and has not finished: they become
        ``queued``, due now, and any worker with room takes them at once (a
        stopping worker, or one abandoning runs). Returns how many were ours."""
        if not keys:
            return 0
        try:
            result = await self.events.update_many(
                {"_id": {"$in": list(keys)}, "state": CLAIMED, "claimed_by": self.worker_id},
                {
                    "$set": {"state": QUEUED, "claimed_by": None},
                    "$currentDate": {"retry_at": True},
                },
            )
        except PyMongoError as exc:
            raise self._unavailable("release events", exc) from None
        return int(result.modified_count)

    async def fail(
        self,
        key: Any,
        error: str,
        max_attempts: int,
        retry_backoff: float,
        retry_backoff_max: float = 3600.0,
    ) -> Failure | None:
        """Record a failed run of an event this worker holds.

        ``attempts`` goes up by one; below ``max_attempts`` the event becomes
        ``failed`` with ``retry_at`` = now (MongoDB's clock, which the reclaim
        compares it with) + ``retry_backoff`` * 2**(attempts-1), at most
        ``retry_backoff_max`` (plus up to 10% jitter, so a burst of failures does not retry in
        lockstep), at the limit ``dead``. Returns the new state and the delay,
        or None if the event is no longer ours.
        """
        owned = {"_id": key, "state": CLAIMED, "claimed_by": self.worker_id}
        try:
            doc = await self.events.find_one(owned)
            if doc is None:
                return None
            attempts = int(doc.get("attempts", 0)) + 1
            delay: float | None = None
            doc["attempts"] = attempts
            doc["error"] = _truncate(error)
            if attempts >= max_attempts:
                doc["state"] = DEAD
                doc.pop("retry_at", None)
            else:
                delay = exponential(attempts - 1, retry_backoff, retry_backoff_max)
                delay += random.uniform(0, delay / 10)
                doc["state"] = FAILED
                doc["retry_at"] = await self.server_time() + timedelta(seconds=delay)
            # Compare-and-swap on attempts: a replace rather than a $set, which
            # also keeps retry_at a date on nx-27017 (its $set stores datetimes
            # as strings; MongoDB itself is fine either way).
            result = await self.events.replace_one({**owned, "attempts": attempts - 1}, doc)
        except PyMongoError as exc:
            raise self._unavailable("record a failed event", exc) from None
        if result.modified_count != 1:
            return None
        return Failure(str(doc["state"]), delay)

    # -- workers -----------------------------------------------------------------------

    async def heartbeat(self, info: Mapping[str, Any] | None = None) -> None:
        """Upsert this worker's row in ``workers``; ``last_seen`` is the server's clock.

        ``info`` holds what an operator wants to see (servers, counters,
        queue_depth...); host and pid are filled in.
        """
        fields = {"host": socket.gethostname(), "pid": os.getpid(), **(info or {})}
        try:
            await self.workers.update_one(
                {"_id": self.worker_id},
                {"$set": fields, "$currentDate": {"last_seen": True}},
                upsert=True,
            )
        except PyMongoError as exc:
            raise self._unavailable("send a heartbeat", exc) from None

    async def server_time(self) -> datetime:
        """MongoDB's clock, which stamps ``last_seen``: leases are judged by it, so a
        host whose clock is off does not take live workers for dead."""
        try:
            return await server_time(self.database)
        except PyMongoError as exc:
            raise self._unavailable("read the server time", exc) from None

    # -- the fleet ---------------------------------------------------------------------

    async def fleet(self) -> tuple[datetime, list[dict[str, Any]]]:
        """MongoDB's clock and every row of ``workers`` (a few per host: cheap)."""
        try:
            now = await server_time(self.database)
            rows = [doc async for doc in self.workers.find({})]
        except PyMongoError as exc:
            raise self._unavailable("read the workers", exc) from None
        return now, rows

    async def forget_worker(self, worker: Any, cutoff: datetime) -> None:
        """Delete the row of a worker whose heartbeat is older than ``cutoff`` (dead,
        or stopped) once it holds nothing, and its coverage (hedged mode). Only while
        still expired: a worker that was merely slow may be back."""
        try:
            deleted = await self.workers.delete_one({"_id": worker, "last_seen": {"$lt": cutoff}})
            if deleted.deleted_count:
                await self.coverage_docs.delete_one({"_id": worker})
        except PyMongoError as exc:
            raise self._unavailable("forget a dead worker", exc) from None

    # -- hedged mode's coverage ---------------------------------------------------------

    async def publish_coverage(self, fields: Mapping[str, Any]) -> None:
        """This worker's coverage document (fleet.hedging, fleet.coverage), stamped
        ``at`` with the store's clock: one clock for every worker's age."""
        try:
            await self.coverage_docs.update_one(
                {"_id": self.worker_id},
                {"$set": dict(fields), "$currentDate": {"at": True}},
                upsert=True,
            )
        except PyMongoError as exc:
            raise self._unavailable("publish coverage", exc) from None

    async def coverage(self) -> list[dict[str, Any]]:
        """Every worker's coverage document."""
        try:
            return [doc async for doc in self.coverage_docs.find({})]
        except PyMongoError as exc:
            raise self._unavailable("read coverage", exc) from None

    # -- taking over -------------------------------------------------------------------

    async def take_from_dead(
        self, dead: Sequence[Any], limit: int, max_attempts: int
    ) -> list[dict[str, Any]]:
        """Take over up to ``limit`` events ``claimed`` by the ``dead`` workers,
        oldest first; return them as now held by this worker.

        Three round trips whatever the count: the candidates' ids, one
        ``update_many`` fenced by the dead owners' ids (an event another live
        worker took in between no longer matches) that stamps a fresh token,
        and one ``find`` by id and token. The lost run counts as an attempt; at
        ``max_attempts`` the event is ``dead`` instead (a handler that kills its
        worker must not kill the whole fleet in turn).
        """
        if not dead or limit <= 0:
            return []
        owners = {"$in": list(dead)}
        try:
            candidates = {
                doc["_id"]: doc.get("claimed_by")
                async for doc in self.events.find(
                    {"state": CLAIMED, "claimed_by": owners}, {"_id": 1, "claimed_by": 1}
                )
                .sort("ts", 1)
                .limit(limit)
            }
            if not candidates:
                return []
            ids = list(candidates)
            token = uuid.uuid4().hex
            await self.events.update_many(
                {"_id": {"$in": ids}, "state": CLAIMED, "claimed_by": owners},
                {"$set": {"claimed_by": self.worker_id, "token": token}, "$inc": {"attempts": 1}},
            )
            taken = await self._taken(ids, token)
            buried: dict[Any, list[Any]] = {}
            for doc in taken:
                if doc.get("attempts", 0) >= max_attempts:
                    buried.setdefault(candidates[doc["_id"]], []).append(doc["_id"])
            for owner, keys in buried.items():
                await self.events.update_many(
                    {"_id": {"$in": keys}, "token": token},
                    {"$set": {"state": DEAD, "error": f"worker {owner} died while running it"}},
                )
        except PyMongoError as exc:
            raise self._unavailable("take over a dead worker's events", exc) from None
        return [doc for doc in taken if doc.get("attempts", 0) < max_attempts]

    async def take_runnable(self, limit: int, *, retries: bool = True) -> Runnable:
        """Take up to ``limit`` events any worker may run, those runnable longest
        first: ``queued`` ones and (with ``retries``) ``failed`` ones whose
        ``retry_at`` has passed. Same three round trips as :meth:`take_from_dead`
        (and the server's clock, with ``retries``)."""
        if limit <= 0:
            return Runnable([], 0)
        try:
            # One $or branch per state, each served whole by the (state, retry_at)
            # index; and $in beside a date range is one of nx-27017's blind spots.
            # A queued event is runnable at once, whatever its retry_at: that is
            # the clock of the worker that stored it (an insert cannot stamp the
            # server's), and a host whose clock runs ahead must not hold it back.
            branches: list[dict[str, Any]] = [{"state": QUEUED}]
            if retries:
                now = await server_time(self.database)
                branches.append({"state": FAILED, "retry_at": {"$lte": now}})
            runnable: dict[str, Any] = {"$or": branches}
            candidates = {
                doc["_id"]: doc.get("state")
                async for doc in self.events.find(runnable, {"_id": 1, "state": 1})
                .sort("retry_at", 1)
                .limit(limit)
            }
            if not candidates:
                return Runnable([], 0)
            ids = list(candidates)
            token = uuid.uuid4().hex
            await self.events.update_many(
                {"_id": {"$in": ids}, **runnable},
                {
                    "$set": {"state": CLAIMED, "claimed_by": self.worker_id, "token": token},
                    "$unset": {"retry_at": ""},
                },
            )
            taken = await self._taken(ids, token)
        except PyMongoError as exc:
            raise self._unavailable("take queued or due events", exc) from None
        queued = sum(1 for doc in taken if candidates.get(doc["_id"]) == QUEUED)
        return Runnable(taken, queued)

    async def _taken(self, ids: list[Any], token: str) -> list[dict[str, Any]]:
        cursor = self.events.find({"_id": {"$in": ids}, "token": token})
        taken = [doc async for doc in cursor]
        order = {key: i for i, key in enumerate(ids)}
        taken.sort(key=lambda doc: order[doc["_id"]])
        return taken

    def _unavailable(self, what: str, exc: PyMongoError) -> StoreUnavailable:
        return unavailable(self._where, what, exc)


def _truncate(text: str) -> str:
    if len(text) <= MAX_ERROR_LENGTH:
        return text
    return text[: MAX_ERROR_LENGTH - 15] + "... (truncated)"
