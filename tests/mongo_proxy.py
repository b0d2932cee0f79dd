"""A MongoDB wire-protocol proxy for tests: nx-27017 playing a collection validator.

nx-27017 accepts ``create_collection(validator=...)`` and enforces nothing, and
its duplicate-key errors carry no ``keyPattern``. :class:`MongoProxy` sits on a
free loopback port in front of it and forwards every message byte for byte,
except the ``insert`` commands (OP_MSG) on one configured collection:

- documents the ``refuse`` predicate picks are taken out of the request, and
  the server's reply is rewritten as a MongoDB with a ``$jsonSchema`` validator
  answers: a ``writeErrors`` entry ``{index, code: 121, errmsg: "Document failed
  validation", errInfo}`` per refused document, its index in the *original*
  batch; ``n`` counts what the server stored (the refused documents were never
  sent), and the indexes of the server's own write errors are mapped from the
  batch it saw back to the original one. An ordered insert stops at the first
  refused document, as MongoDB's does; ``bypassDocumentValidation`` is honoured.
  When every document is refused the proxy answers itself (MongoDB refuses an
  empty insert), and an unacknowledged insert (``moreToCome``) just loses them.
- with ``real_duplicates`` (the default), the stand-in's duplicate-key errors
  on ``_id`` get what MongoDB 4.2+ puts in them: ``keyPattern``, ``keyValue``
  and an ``E11000 ...`` message. The stand-in's wording is read here, in a test
  helper, so that the product never has to.

Documents may come in the body (``documents`` array) or in a kind-1 document
sequence named ``documents`` (PyMongo sends the latter). A request with a
checksum is forwarded untouched unless it is an insert the proxy would have to
rewrite; a compressed OP_MSG (OP_COMPRESSED), whose command cannot be seen, is
never forwarded while the proxy rewrites inserts. Either drops the connection and
keeps the error in :attr:`MongoProxy.errors` (raised again by
:meth:`MongoProxy.close`): PyMongo sends neither unless configured to. Replies are matched to
requests by ``responseTo`` per connection; everything else, the exhaust
streams (``moreToCome`` replies) included, is forwarded as it comes.

:meth:`MongoProxy.freeze` stops forwarding in both directions without closing
anything (a store that accepts connections and answers nothing); :meth:`thaw`
delivers what was held. :func:`running_in_thread` runs a proxy on an event
loop of its own, so that a test's blocking calls never stall the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

__all__ = [
    "DOCUMENT_FAILED_VALIDATION",
    "MongoProxy",
    "ProxyError",
    "Refusal",
    "RefuseFirst",
    "running_in_thread",
]

OP_COMPRESSED = 2012
OP_MSG = 2013
CHECKSUM_PRESENT = 1 << 0
MORE_TO_COME = 1 << 1
DOCUMENT_FAILED_VALIDATION = 121
DUPLICATE_KEY = 11000
_HEADER = struct.Struct("<iiii")  # messageLength, requestID, responseTo, opCode
_INT32 = struct.Struct("<i")
_UINT32 = struct.Struct("<I")
_MAX_MESSAGE = 48_000_000 + 16 * 1024 * 1024  # maxMessageSizeBytes, with room to spare
_RAW = CodecOptions(document_class=RawBSONDocument)
_STAND_IN_ID_DUPLICATE = "._id"  # nx-27017: "UNIQUE constraint failed: <collection>._id"

Document = Mapping[str, Any]


class ProxyError(AssertionError):
    """The proxy met a message it cannot rewrite faithfully."""


@dataclass(frozen=True)
class Refusal:
    """One document the proxy refused, as reported to the client."""

    database: str
    collection: str
    index: int  # in the batch the client sent
    document: dict[str, Any]
    batch: int  # documents in that batch


class RefuseFirst:
    """Refuses the first document ``match`` accepts, and every later insert of the
    same ``_id``: a validator refuses content, and every worker inserts the same
    event. :attr:`key` is that ``_id`` once chosen."""

    def __init__(self, match: Callable[[Document], bool]) -> None:
        self.match = match
        self.key: Any = None
        self.chosen = threading.Event()

    def __call__(self, doc: Document) -> bool:
        if not self.chosen.is_set() and self.match(doc):
            self.key = doc.get("_id")
            self.chosen.set()
        return self.chosen.is_set() and doc.get("_id") == self.key


# -- the wire format ------------------------------------------------------------------------


@dataclass
class _Section:
    kind: int  # 0: one document (the body); 1: a document sequence
    payload: bytes = b""  # kind 0: the BSON document
    identifier: str = ""  # kind 1
    documents: list[bytes] = field(default_factory=list)  # kind 1: each BSON document


def _split_documents(data: bytes) -> list[bytes]:
    docs, offset = [], 0
    while offset < len(data):
        (size,) = _INT32.unpack_from(data, offset)
        if size < 5 or offset + size > len(data):
            raise ProxyError(f"malformed document sequence (document of {size} bytes)")
        docs.append(data[offset : offset + size])
        offset += size
    return docs


def _parse_msg(message: bytes) -> tuple[int, list[_Section]]:
    """(flagBits, sections) of an OP_MSG; a checksum, if any, is left out."""
    (flags,) = _UINT32.unpack_from(message, 16)
    end = len(message) - (4 if flags & CHECKSUM_PRESENT else 0)
    sections, offset = [], 20
    while offset < end:
        kind = message[offset]
        offset += 1
        (size,) = _INT32.unpack_from(message, offset)
        if kind == 0:
            sections.append(_Section(0, payload=message[offset : offset + size]))
        elif kind == 1:
            name_end = message.index(b"\x00", offset + 4)
            identifier = message[offset + 4 : name_end].decode()
            docs = _split_documents(message[name_end + 1 : offset + size])
            sections.append(_Section(1, identifier=identifier, documents=docs))
        else:
            raise ProxyError(f"OP_MSG section of kind {kind}")
        offset += size
    if offset != end:
        raise ProxyError("OP_MSG sections overrun the message")
    return flags, sections


def _encode_msg(request_id: int, response_to: int, flags: int, sections: list[_Section]) -> bytes:
    parts = [_UINT32.pack(flags & ~CHECKSUM_PRESENT)]
    for section in sections:
        if section.kind == 0:
            parts += [b"\x00", section.payload]
        else:
            name = section.identifier.encode() + b"\x00"
            docs = b"".join(section.documents)
            parts += [b"\x01", _INT32.pack(4 + len(name) + len(docs)), name, docs]
    body = b"".join(parts)
    return _HEADER.pack(16 + len(body), request_id, response_to, OP_MSG) + body


def _reply_message(request_id: int, response_to: int, doc: Mapping[str, Any]) -> bytes:
    """An OP_MSG whose only section is ``doc`` (a command reply)."""
    return _encode_msg(request_id, response_to, 0, [_Section(0, payload=bson.encode(doc))])


async def _read_message(reader: asyncio.StreamReader) -> bytes | None:
    try:
        header = await reader.readexactly(16)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None  # closed between two messages
    (length,) = _INT32.unpack_from(header)
    if not 16 <= length <= _MAX_MESSAGE:
        raise ProxyError(f"message of {length} bytes")
    return header + await reader.readexactly(length - 16)


# -- what an insert came to ----------------------------------------------------------------


@dataclass
class _Insert:
    """An insert on the configured collection, waiting for its reply."""

    database: str
    collection: str
    docs: list[dict[str, Any]]  # the original batch, decoded
    sent: list[int]  # original index of each document forwarded, in order
    refused: list[int]  # original indexes to report as refused
    ordered: bool


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    pending: dict[int, _Insert] = field(default_factory=dict)  # by requestID


class MongoProxy:
    """Forwards 127.0.0.1:<port> to a MongoDB server (nx-27017), refusing the
    documents of ``collection`` (in ``database``, or any) that ``refuse`` picks.

    ``refuse`` is called on the proxy's event loop with each document decoded,
    in batch order. Without it, inserts are still rewritten when
    ``real_duplicates`` has a duplicate-key error to complete.
    """

    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        *,
        collection: str = "events",
        database: str | None = None,
        refuse: Callable[[Document], bool] | None = None,
        real_duplicates: bool = True,
    ) -> None:
        self.target = (target_host, target_port)
        self.collection = collection
        self.database = database
        self.refuse = refuse
        self.real_duplicates = real_duplicates
        self.port = 0
        self.refusals: list[Refusal] = []
        self.errors: list[BaseException] = []
        self.accepted = 0
        self.rewritten = 0  # requests and replies changed (all else went byte for byte)
        self.held = 0  # messages waiting for thaw()
        self.duplicates = 0  # duplicate-key errors on _id given their keyPattern
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flowing: asyncio.Event | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1 << 30)  # requestIDs of the replies the proxy makes

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    async def start(self) -> MongoProxy:
        self._loop = asyncio.get_running_loop()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Close every connection; raise the first :class:`ProxyError` met, if any."""
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            self._drop(connection)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self.errors:
            raise self.errors[0]

    # -- freeze ------------------------------------------------------------------------

    def freeze(self) -> None:
        """Stop forwarding, both ways, without closing anything; connections are
        still accepted. Safe to call from any thread."""
        self._on_loop(lambda flowing: flowing.clear())

    def thaw(self) -> None:
        """Forward again, starting with what was held. Safe to call from any thread."""
        self._on_loop(lambda flowing: flowing.set())

    def _on_loop(self, change: Callable[[asyncio.Event], None]) -> None:
        loop, flowing = self._loop, self._flowing
        if loop is None or flowing is None:
            raise RuntimeError("the proxy is not started")
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            change(flowing)
            return
        done = threading.Event()

        def apply() -> None:
            change(flowing)
            done.set()

        loop.call_soon_threadsafe(apply)
        if not done.wait(10):
            raise TimeoutError("the proxy's event loop did not answer within 10 s")

    async def _send(self, writer: asyncio.StreamWriter, message: bytes) -> None:
        flowing = self._flowing
        assert flowing is not None
        if not flowing.is_set():
            self.held += 1
            try:
                await flowing.wait()
            finally:
                self.held -= 1
        writer.write(message)  # one write per message: never interleaved with another
        await writer.drain()

    # -- connections ---------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.accepted += 1
        connection = _Connection(writer, up_writer)
        self._connections.add(connection)
        for pipe in (self._requests(connection, reader), self._replies(connection, up_reader)):
            task = asyncio.create_task(self._guard(connection, pipe))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _guard(self, connection: _Connection, pipe: Any) -> None:
        try:
            await pipe
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # a message the proxy cannot handle: the test must fail
            self.errors.append(exc)
        finally:
            self._drop(connection)

    def _drop(self, connection: _Connection) -> None:
        if connection in self._connections:
            self._connections.discard(connection)
            connection.client.transport.abort()
            connection.upstream.transport.abort()

    async def _requests(self, connection: _Connection, reader: asyncio.StreamReader) -> None:
        while (message := await _read_message(reader)) is not None:
            forward, reply = self._request(connection, message)
            if forward is not None:
                await self._send(connection.upstream, forward)
            if reply is not None:
                await self._send(connection.client, reply)

    async def _replies(self, connection: _Connection, reader: asyncio.StreamReader) -> None:
        while (message := await _read_message(reader)) is not None:
            _, _, response_to, _ = _HEADER.unpack_from(message)
            insert = connection.pending.pop(response_to, None)
            if insert is not None:
                message = self._reply(insert, message)
            await self._send(connection.client, message)

    # -- requests --------------------------------------------------------------------------

    def _request(
        self, connection: _Connection, message: bytes
    ) -> tuple[bytes | None, bytes | None]:
        """(what to forward, what to answer the client with), either may be None."""
        _, request_id, _, opcode = _HEADER.unpack_from(message)
        if self.refuse is None and not self.real_duplicates:
            return message, None
        if opcode == OP_COMPRESSED:
            (original,) = _INT32.unpack_from(message, 16)
            if original == OP_MSG:
                raise ProxyError(
                    "a compressed OP_MSG: its inserts cannot be rewritten; open the client "
                    "without compressors"
                )
            return message, None
        if opcode != OP_MSG:
            return message, None
        flags, sections = _parse_msg(message)
        bodies = [s for s in sections if s.kind == 0]
        if len(bodies) != 1:
            raise ProxyError(f"an OP_MSG with {len(bodies)} body sections")
        body = bson.decode(bodies[0].payload, _RAW)
        command = next(iter(body), None)
        database = body.get("$db")
        if command != "insert" or body["insert"] != self.collection:
            return message, None
        if self.database is not None and database != self.database:
            return message, None
        if flags & CHECKSUM_PRESENT:
            raise ProxyError(
                "an insert with a checksum (OP_MSG checksumPresent): PyMongo sends none unless "
                "configured to; the proxy does not rewrite such messages"
            )
        sequences = [s for s in sections if s.kind == 1 and s.identifier == "documents"]
        in_body = "documents" in body
        if len(sequences) + in_body != 1:
            raise ProxyError("an insert whose documents are not in exactly one place")
        raw_docs = sequences[0].documents if sequences else [doc.raw for doc in body["documents"]]
        docs = [bson.decode(raw) for raw in raw_docs]
        ordered = bool(body.get("ordered", True))
        refused: list[int] = []
        if self.refuse is not None and not body.get("bypassDocumentValidation", False):
            for index, doc in enumerate(docs):
                if self.refuse(doc):
                    refused.append(index)
                    if ordered:
                        break  # MongoDB stops there: the rest is never validated
        insert = _Insert(str(database), self.collection, docs, [], refused, ordered)
        skipped = set(refused)
        end = refused[0] if ordered and refused else len(docs)
        insert.sent = [i for i in range(end) if i not in skipped]
        if not refused:
            if not flags & MORE_TO_COME:
                connection.pending[request_id] = insert
            return message, None
        more_to_come = bool(flags & MORE_TO_COME)
        if not insert.sent:
            # MongoDB refuses an empty insert: answer as a validator would have.
            self._record(insert, insert.refused)
            if more_to_come:
                return None, None
            errors = [self._validation_error(insert, i) for i in insert.refused]
            reply = {"n": 0, "writeErrors": errors, "ok": 1.0}
            self.rewritten += 1
            return None, _reply_message(next(self._ids), request_id, reply)
        kept = [raw_docs[i] for i in insert.sent]
        if sequences:
            sequences[0].documents = kept
        else:
            new_body = dict(body.items())
            new_body["documents"] = [RawBSONDocument(raw) for raw in kept]
            bodies[0].payload = bson.encode(new_body)
        self.rewritten += 1
        if more_to_come:
            self._record(insert, insert.refused)  # unacknowledged: lost without a word
        else:
            connection.pending[request_id] = insert
        return _encode_msg(request_id, 0, flags, sections), None

    # -- replies ---------------------------------------------------------------------------

    def _reply(self, insert: _Insert, message: bytes) -> bytes:
        _, request_id, response_to, opcode = _HEADER.unpack_from(message)
        if opcode != OP_MSG:
            raise ProxyError(f"the reply to an insert came as opcode {opcode}")
        flags, sections = _parse_msg(message)
        if flags & CHECKSUM_PRESENT:
            raise ProxyError("the reply to an insert carries a checksum; it is not rewritten")
        if len(sections) != 1 or sections[0].kind != 0:
            raise ProxyError("the reply to an insert is not one body section")
        body = dict(bson.decode(sections[0].payload, _RAW).items())
        if body.get("ok") != 1:
            return message  # the command failed as a whole (not primary...): nothing validated
        changed = False
        errors: list[dict[str, Any]] = []
        for raw_error in body.get("writeErrors", ()):
            error = {name: raw_error[name] for name in raw_error}
            error["index"] = insert.sent[int(error["index"])]
            changed |= error["index"] != raw_error["index"]
            if self.real_duplicates:
                changed |= self._complete_duplicate(insert, error)
            errors.append(error)
        if insert.refused and not (insert.ordered and errors):
            # (An ordered insert that failed before the refused document never reached it.)
            errors += [self._validation_error(insert, i) for i in insert.refused]
            self._record(insert, insert.refused)
            changed = True
        if not changed:
            return message
        body["writeErrors"] = sorted(errors, key=lambda error: int(error["index"]))
        self.rewritten += 1
        return _encode_msg(request_id, response_to, flags, [_Section(0, bson.encode(body))])

    def _validation_error(self, insert: _Insert, index: int) -> dict[str, Any]:
        """The write error of a document a ``$jsonSchema`` validator refused (MongoDB 5+)."""
        return {
            "index": index,
            "code": DOCUMENT_FAILED_VALIDATION,
            "errmsg": "Document failed validation",
            "errInfo": {
                "failingDocumentId": insert.docs[index].get("_id"),
                "details": {
                    "operatorName": "$jsonSchema",
                    "title": "tests.mongo_proxy",
                    "schemaRulesNotSatisfied": [
                        {
                            "operatorName": "not",
                            "specifiedAs": {"not": {"description": "refused by the test"}},
                            "reason": "child expression matched",
                        }
                    ],
                },
            },
        }

    def _complete_duplicate(self, insert: _Insert, error: dict[str, Any]) -> bool:
        """Give the stand-in's duplicate on ``_id`` what MongoDB 4.2+ puts in it."""
        message = str(error.get("errmsg", ""))
        if error.get("code") != DUPLICATE_KEY or "keyPattern" in error:
            return False
        if not message.endswith(f"{insert.collection}{_STAND_IN_ID_DUPLICATE}"):
            return False  # another unique index: its key pattern is unknown here
        key = insert.docs[int(error["index"])].get("_id")
        self.duplicates += 1
        error["keyPattern"] = {"_id": 1}
        error["keyValue"] = {"_id": key}
        shown = f'"{key}"' if isinstance(key, str) else repr(key)
        error["errmsg"] = (
            f"E11000 duplicate key error collection: {insert.database}.{insert.collection} "
            f"index: _id_ dup key: {{ _id: {shown} }}"
        )
        return True

    def _record(self, insert: _Insert, indexes: list[int]) -> None:
        for index in indexes:
            self.refusals.append(
                Refusal(
                    insert.database, insert.collection, index, insert.docs[index], len(insert.docs)
                )
            )


@contextlib.contextmanager
def running_in_thread(proxy: MongoProxy, timeout: float = 10.0) -> Iterator[MongoProxy]:
    """Run ``proxy`` on an event loop in a thread of its own, until the block ends.

    Raises the first :class:`ProxyError` the proxy met, on the way out.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="mongo-proxy", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(proxy.start(), loop).result(timeout)
        try:
            yield proxy
        finally:
            asyncio.run_coroutine_threadsafe(proxy.close(), loop).result(timeout)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()
