"""tests/mongo_proxy.py: nx-27017 answering as a MongoDB with a collection validator.

PyMongo clients go through the proxy; what was stored is read from nx-27017
directly. The errors are checked against what a real MongoDB (5.0+) gives for
a ``$jsonSchema`` validator and for a duplicate ``_id``: the index in the batch
the client sent, code 121 or 11000, and ``keyPattern`` on a duplicate.
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import bson
import pytest
from pymongo import CursorType, MongoClient
from pymongo.errors import BulkWriteError, WriteError

from amiworker.devstack.embedded_mongo import EmbeddedMongo
from amiworker.fleet.locktable import LockTable
from amiworker.mongo import close_client, open_client
from tests.mongo_proxy import (
    DOCUMENT_FAILED_VALIDATION,
    MORE_TO_COME,
    MongoProxy,
    ProxyError,
    RefuseFirst,
    _Connection,
    _encode_msg,
    _parse_msg,
    _Section,
    running_in_thread,
)
from tests.waiting import wait_for


def refuse_bad(doc: Any) -> bool:
    return str(doc.get("_id")).startswith("bad")


@pytest.fixture
def names() -> tuple[str, str]:
    return f"p_{uuid.uuid4().hex[:12]}", "things"


@pytest.fixture
def proxy(mongo_server: EmbeddedMongo, names: tuple[str, str]) -> Iterator[MongoProxy]:
    database, collection = names
    assert mongo_server.port is not None
    proxied = MongoProxy(
        mongo_server.port, database=database, collection=collection, refuse=refuse_bad
    )
    with running_in_thread(proxied) as running:
        yield running


@pytest.fixture
def direct(mongo_server: EmbeddedMongo, names: tuple[str, str]) -> Iterator[Any]:
    """The collection on nx-27017 itself, not through the proxy."""
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_server.uri)
    database, collection = names
    try:
        yield client[database][collection]
    finally:
        client.drop_database(database)
        client.close()


@pytest.fixture
def through(proxy: MongoProxy, names: tuple[str, str]) -> Iterator[Any]:
    """The collection through the proxy (sync PyMongo)."""
    client: MongoClient[dict[str, Any]] = MongoClient(proxy.uri, timeoutMS=10_000)
    database, collection = names
    try:
        yield client[database][collection]
    finally:
        client.close()


def stored(collection: Any) -> list[Any]:
    return sorted(doc["_id"] for doc in collection.find({}, {"_id": 1}))


def test_unordered_insert_many_fails_as_mongodb_with_a_validator(
    proxy: MongoProxy, through: Any, direct: Any
) -> None:
    direct.insert_one({"_id": "a0", "by": "someone else"})
    batch = [
        {"_id": "a0"},  # 0: already stored
        {"_id": "a1"},
        {"_id": "bad2"},  # 2: refused
        {"_id": "a3"},
        {"_id": "a3", "again": True},  # 4: a duplicate in the same batch
        {"_id": "bad5"},  # 5: refused
        {"_id": "a6"},
    ]
    with pytest.raises(BulkWriteError) as info:
        through.insert_many(batch, ordered=False)
    details = info.value.details
    errors = details["writeErrors"]
    assert [(e["index"], e["code"]) for e in errors] == [
        (0, 11000),
        (2, DOCUMENT_FAILED_VALIDATION),
        (4, 11000),
        (5, DOCUMENT_FAILED_VALIDATION),
    ]
    # PyMongo puts the document of each index of its own batch in "op": the
    # index is the one in the batch the client sent.
    assert [e["op"] for e in errors] == [batch[0], batch[2], batch[4], batch[5]]
    refused = errors[1]
    assert refused["errmsg"] == "Document failed validation"
    assert refused["errInfo"]["failingDocumentId"] == "bad2"
    assert refused["errInfo"]["details"]["operatorName"] == "$jsonSchema"
    duplicate = errors[2]
    assert duplicate["keyPattern"] == {"_id": 1} and duplicate["keyValue"] == {"_id": "a3"}
    assert duplicate["errmsg"].startswith("E11000 duplicate key error collection: ")
    assert details["nInserted"] == 3 and details["writeConcernErrors"] == []
    assert stored(direct) == ["a0", "a1", "a3", "a6"]
    assert direct.find_one({"_id": "a3"}) == {"_id": "a3"}  # the first of the two
    assert [(r.index, r.document["_id"]) for r in proxy.refusals] == [(2, "bad2"), (5, "bad5")]


def test_an_ordered_insert_stops_at_the_refused_document(
    proxy: MongoProxy, through: Any, direct: Any
) -> None:
    with pytest.raises(BulkWriteError) as info:
        through.insert_many([{"_id": "a0"}, {"_id": "a1"}, {"_id": "bad2"}, {"_id": "a3"}])
    errors = info.value.details["writeErrors"]
    assert [(e["index"], e["code"]) for e in errors] == [(2, DOCUMENT_FAILED_VALIDATION)]
    assert info.value.details["nInserted"] == 2
    assert stored(direct) == ["a0", "a1"]
    # A duplicate before it stops the insert there: the refused one is never reached.
    with pytest.raises(BulkWriteError) as info:
        through.insert_many([{"_id": "a4"}, {"_id": "a0"}, {"_id": "bad6"}])
    errors = info.value.details["writeErrors"]
    assert [(e["index"], e["code"], e["keyPattern"]) for e in errors] == [(1, 11000, {"_id": 1})]
    assert stored(direct) == ["a0", "a1", "a4"]
    assert [r.document["_id"] for r in proxy.refusals] == ["bad2"]


def test_documents_in_the_command_body_and_batches_wholly_refused(
    proxy: MongoProxy, through: Any, direct: Any, names: tuple[str, str]
) -> None:
    # db.command sends the documents inside the body, not as a document sequence.
    documents = [{"_id": "a0"}, {"_id": "bad1"}, {"_id": "a2"}]
    reply = through.database.command({"insert": names[1], "documents": documents, "ordered": False})
    assert reply["n"] == 2
    assert [(e["index"], e["code"]) for e in reply["writeErrors"]] == [(1, 121)]
    # Every document refused: the proxy answers (MongoDB refuses an empty insert).
    with pytest.raises(WriteError) as one:
        through.insert_one({"_id": "bad3"})
    assert one.value.code == DOCUMENT_FAILED_VALIDATION
    with pytest.raises(BulkWriteError) as many:
        through.insert_many([{"_id": "bad4"}, {"_id": "bad5"}], ordered=False)
    assert [e["index"] for e in many.value.details["writeErrors"]] == [0, 1]
    assert many.value.details["nInserted"] == 0
    # bypassDocumentValidation is honoured, as by MongoDB.
    through.insert_one({"_id": "bad6"}, bypass_document_validation=True)
    assert stored(direct) == ["a0", "a2", "bad6"]
    assert len(proxy.refusals) == 4


def test_an_unacknowledged_insert_loses_the_refused_document_silently() -> None:
    """moreToCome (w=0): nothing to answer, the refused document just goes missing.
    (nx-27017 ignores unacknowledged inserts, so this is checked on the wire.)"""
    proxy = MongoProxy(1, database="db", collection="things", refuse=refuse_bad)
    docs = [bson.encode({"_id": name}) for name in ("a0", "bad1", "a2")]
    body = bson.encode({"insert": "things", "ordered": False, "$db": "db"})
    sections = [_Section(0, payload=body), _Section(1, identifier="documents", documents=docs)]
    request = _encode_msg(7, 0, MORE_TO_COME, sections)
    connection = _Connection(client=None, upstream=None)  # type: ignore[arg-type]
    forward, reply = proxy._request(connection, request)
    assert reply is None and connection.pending == {}
    assert forward is not None
    flags, sent = _parse_msg(forward)
    assert flags == MORE_TO_COME and sent[0].payload == body
    assert sent[1].documents == [docs[0], docs[2]]
    assert [r.document["_id"] for r in proxy.refusals] == ["bad1"]
    # All refused: nothing forwarded, nothing answered.
    sections[1].documents = [docs[1]]
    assert proxy._request(connection, _encode_msg(8, 0, MORE_TO_COME, sections)) == (None, None)


async def test_other_traffic_goes_through_untouched(
    proxy: MongoProxy, through: Any, direct: Any, names: tuple[str, str]
) -> None:
    direct.insert_many([{"_id": f"x{i}", "n": i} for i in range(300)])
    # Another collection of the same database is no business of the proxy.
    other = through.database["other"]
    await asyncio.to_thread(other.insert_many, [{"_id": "bad0"}, {"_id": "a1"}])
    assert sorted(d["_id"] for d in direct.database["other"].find()) == ["a1", "bad0"]
    # An exhaust cursor: forwarded as it comes.
    cursor = through.find({}, cursor_type=CursorType.EXHAUST, batch_size=50)
    found = await asyncio.to_thread(lambda: [doc["n"] for doc in cursor])
    assert sorted(found) == list(range(300))
    assert proxy.refusals == [] and proxy.rewritten == 0


async def test_freeze_holds_both_ways_without_closing_and_thaw_delivers(
    proxy: MongoProxy, through: Any, direct: Any
) -> None:
    await asyncio.to_thread(through.insert_one, {"_id": "a0"})
    accepted = proxy.accepted
    proxy.freeze()
    write = asyncio.create_task(asyncio.to_thread(through.insert_one, {"_id": "a1"}))
    try:
        await wait_for(lambda: proxy.held >= 1, 10, "the insert held by the frozen proxy")
        assert not write.done()
        assert stored(direct) == ["a0"]
    finally:
        proxy.thaw()
    await asyncio.wait_for(write, 10)
    assert stored(direct) == ["a0", "a1"]
    assert proxy.accepted == accepted, "the held connection was kept, not replaced"


@pytest.mark.parametrize("driver", ["pymongo", "motor"])
async def test_lock_table_claims_the_rest_of_a_batch_with_a_refused_document(
    mongo_server: EmbeddedMongo, names: tuple[str, str], direct: Any, driver: str
) -> None:
    """The product's claim, through the proxy: a refused document, a lost race."""
    database, collection = names
    assert mongo_server.port is not None
    refuse = RefuseFirst(lambda doc: doc.get("event") == "Hangup")
    proxied = MongoProxy(mongo_server.port, database=database, collection=collection, refuse=refuse)
    with running_in_thread(proxied) as proxy:
        client = open_client(proxy.uri, driver, serverSelectionTimeoutMS=5000)  # type: ignore[arg-type]
        try:
            store = LockTable(client[database], collection, "worker-a", uri=proxy.uri)
            docs = [
                {"_id": f"k{i}", "event": event, "state": "claimed", "claimed_by": "worker-a"}
                for i, event in enumerate(["Newchannel", "Hangup", "Newstate", "VarSet"])
            ]
            direct.insert_one({**docs[2], "claimed_by": "worker-b"})  # worker-b won k2
            claimed = await store.claim(docs)
            assert claimed.won == [docs[0], docs[3]]
            assert claimed.rejected == [(docs[1], "write error 121: Document failed validation")]
            # Every later insert of the same event is refused too: worker-b's copy.
            other = LockTable(client[database], collection, "worker-b", uri=proxy.uri)
            again = await other.claim([{**docs[1], "claimed_by": "worker-b"}])
            assert again.won == [] and len(again.rejected) == 1
        finally:
            await close_client(client)
    assert stored(direct) == ["k0", "k2", "k3"]
    assert refuse.key == "k1"
    assert [r.document["claimed_by"] for r in proxy.refusals] == ["worker-a", "worker-b"]


def with_checksum(message: bytes) -> bytes:
    """``message`` with checksumPresent set and a (zero) CRC-32C after it."""
    flags = int.from_bytes(message[16:20], "little") | 1
    body = message[8:16] + flags.to_bytes(4, "little") + message[20:] + bytes(4)
    return (4 + len(body)).to_bytes(4, "little") + message[4:8] + body


def test_a_checksum_or_compression_on_an_insert_to_rewrite_is_a_clear_error() -> None:
    proxy = MongoProxy(1, database="db", collection="things", refuse=refuse_bad)
    connection = _Connection(client=None, upstream=None)  # type: ignore[arg-type]
    insert = bson.encode({"insert": "things", "documents": [{"_id": "a0"}], "$db": "db"})
    message = with_checksum(_encode_msg(1, 0, 0, [_Section(0, payload=insert)]))
    assert _parse_msg(message)[1][0].payload == insert
    with pytest.raises(ProxyError, match="checksum"):
        proxy._request(connection, message)
    # Another command with a checksum is no business of the proxy: forwarded untouched.
    ping = bson.encode({"ping": 1, "$db": "db"})
    other = with_checksum(_encode_msg(2, 0, 0, [_Section(0, payload=ping)]))
    assert proxy._request(connection, other) == (other, None)
    # A compressed OP_MSG (zlib): its command cannot be seen, let alone rewritten.
    compressed = struct.pack("<iiiiiiB", 29, 3, 0, 2012, 2013, 100, 2) + bytes(4)
    with pytest.raises(ProxyError, match="compressors"):
        proxy._request(connection, compressed)
