"""The MongoDB event log and lock table.

Every worker inserts every channel event it sees; the document ``_id`` is the
dedup key, so MongoDB's mandatory unique ``_id`` index decides which worker
won each event (see ARCHITECTURE.md and fleet.dedup). A won
document is ``claimed`` by its worker until the handler finishes (``done``) or
fails (``failed``, retried later, ``dead`` after ``max_attempts``). Workers
heartbeat into a ``workers`` collection; documents claimed by a worker whose
heartbeat is older than the lease are taken over, one atomic
``find_one_and_update`` at a time, so no two live workers take the same one.

The code uses only the API that ``pymongo.AsyncMongoClient`` and Motor share,
so either client's database object works. Timestamps that the server writes
(``done_at``, ``last_seen``) use ``$currentDate``: one clock for the fleet.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from pymongo import ReturnDocument, WriteConcern
from pymongo.errors import BulkWriteError, PyMongoError
from pymongo.read_concern import ReadConcern

from amiworker.backoff import exponential
from amiworker.fleet.documents import CLAIMED, DEAD, DONE, FAILED, ensure_indexes
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

__all__ = ["MAX_ERROR_LENGTH", "Failure", "LockTable", "StoreUnavailable"]

MAX_ERROR_LENGTH: Final = 2000


class Failure(NamedTuple):
    """A failed run as recorded: the event's new state, and in how many seconds it
    is due again (None once DEAD)."""

    state: str  # FAILED or DEAD
    retry_in: float | None


WORKERS_COLLECTION: Final = "workers"
_MAX_UNSETTLED: Final = 1_000_000


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
    ) -> None:
        if not worker_id:
            raise ValueError("LockTable needs a worker_id")
        self.database = database
        self.worker_id = worker_id
        self.events = database[collection]
        self.workers = database[WORKERS_COLLECTION]
        # A claim must survive a failover, or two workers could both win an event.
        self._claims = self.events.with_options(write_concern=WriteConcern("majority"))
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
        )
        return cls(
            client[settings.database],
            settings.collection,
            worker_id,
            uri=settings.mongo_uri,
            client=client,
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

    async def claim(self, docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Insert ``docs``; return those this worker won, in the order given.

        One unordered ``insert_many`` with write concern majority. A
        duplicate-key error (code 11000, never judged by its message) means
        another worker inserted that event first. Any other write error, a
        write concern error or a connection error raises
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
            return []
        mine: set[Any] = set()
        try:
            try:
                await self._claims.insert_many(docs, ordered=False)
                lost: set[int] = set()
            except BulkWriteError as exc:
                lost = self._duplicates(exc)
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
        return [doc for i, doc in enumerate(docs) if i not in lost or doc["_id"] in mine]

    def _duplicates(self, exc: BulkWriteError) -> set[int]:
        """Indexes of the documents another worker holds; raise for any other error."""
        details = exc.details
        lost: set[int] = set()
        for error in details.get("writeErrors", ()):
            if error.get("code") != DUPLICATE_KEY:
                raise self._unavailable("claim events", exc) from None
            lost.add(error["index"])
        if details.get("writeConcernErrors"):
            # Inserted but not confirmed by a majority: a failover could roll
            # them back and hand the events to another worker. Retry instead.
            raise self._unavailable("claim events", exc) from None
        return lost

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

    # -- taking over ------------------------------------------------------------------

    async def reclaim(
        self,
        lease: float,
        *,
        max_attempts: int | None = None,
        limit: int = 1000,
        retries: bool = True,
    ) -> list[dict[str, Any]]:
        """Take over events that need a run; return the taken documents, oldest first.

        1. Events ``claimed`` by a worker whose ``last_seen`` is older than
           ``lease`` seconds: each is taken with one ``find_one_and_update``
           matching its old owner, so of two live workers racing for it exactly
           one gets it. The lost run counts as an attempt; at ``max_attempts``
           the event is ``dead`` instead (a handler that kills its worker must
           not kill the whole fleet in turn).
        2. Events ``failed`` whose ``retry_at`` has passed, taken the same way
           (unless ``retries`` is False: finding them is a query of the events
           collection, where step 1 only reads ``workers`` while no worker is dead).

        The row of a dead worker is deleted once it holds nothing.
        """
        try:
            now = await self.server_time()
            cutoff = now - timedelta(seconds=lease)
            dead = [
                doc["_id"]
                async for doc in self.workers.find(
                    {"last_seen": {"$lt": cutoff}, "_id": {"$ne": self.worker_id}}, {"_id": 1}
                )
            ]
            taken: list[dict[str, Any]] = []
            if dead:
                taken += await self._take_from_dead(dead, max_attempts, limit)
            if retries and len(taken) < limit:
                taken += await self._take_due_retries(now, limit - len(taken))
            for worker in dead:
                await self._forget_if_empty(worker, cutoff)
        except PyMongoError as exc:
            raise self._unavailable("reclaim events", exc) from None
        return taken

    async def _take_from_dead(
        self, dead: list[Any], max_attempts: int | None, limit: int
    ) -> list[dict[str, Any]]:
        candidates = self.events.find(
            {"state": CLAIMED, "claimed_by": {"$in": dead}}, {"_id": 1, "claimed_by": 1}
        )
        taken = []
        async for candidate in candidates.sort("ts", 1).limit(limit):
            doc = await self.events.find_one_and_update(
                {"_id": candidate["_id"], "state": CLAIMED, "claimed_by": candidate["claimed_by"]},
                {"$set": {"claimed_by": self.worker_id}, "$inc": {"attempts": 1}},
                return_document=ReturnDocument.AFTER,
            )
            if doc is None:
                continue  # another live worker took it first
            if max_attempts is not None and doc["attempts"] >= max_attempts:
                await self._bury(doc, f"worker {candidate['claimed_by']} died while running it")
                continue
            taken.append(doc)
        return taken

    async def _take_due_retries(self, now: datetime, limit: int) -> list[dict[str, Any]]:
        candidates = self.events.find({"state": FAILED, "retry_at": {"$lte": now}}, {"_id": 1})
        taken = []
        async for candidate in candidates.sort("retry_at", 1).limit(limit):
            doc = await self.events.find_one_and_update(
                {"_id": candidate["_id"], "state": FAILED},
                {
                    "$set": {"state": CLAIMED, "claimed_by": self.worker_id},
                    "$unset": {"retry_at": ""},
                },
                return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                taken.append(doc)
        return taken

    async def _bury(self, doc: dict[str, Any], error: str) -> None:
        await self.events.update_one(
            {"_id": doc["_id"], "state": CLAIMED, "claimed_by": self.worker_id},
            {"$set": {"state": DEAD, "error": _truncate(error)}},
        )

    async def _forget_if_empty(self, worker: Any, cutoff: datetime) -> None:
        if await self.events.count_documents({"state": CLAIMED, "claimed_by": worker}, limit=1):
            return
        # Only while still expired: a worker that was merely slow may be back.
        await self.workers.delete_one({"_id": worker, "last_seen": {"$lt": cutoff}})

    def _unavailable(self, what: str, exc: PyMongoError) -> StoreUnavailable:
        return unavailable(self._where, what, exc)


def _truncate(text: str) -> str:
    if len(text) <= MAX_ERROR_LENGTH:
        return text
    return text[: MAX_ERROR_LENGTH - 15] + "... (truncated)"
