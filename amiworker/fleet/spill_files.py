"""The spill's files: slot directories and their lock, segments of checked records, the cursor.

::

    <spill_dir>/<namespace>/slot-<slot>/      one per worker slot, flock'ed by its owner
        lock                                  the lock file (it holds the owner's pid, a hint)
        cursor                                where the committed events end
        00000000000000000007.seg ...          segments, numbered in the order written

A segment file is ``MAGIC`` followed by records, each::

    u32 body length | u32 CRC-32 of the body | body
    body = f64 received_at | u16 key length | u16 server length | key | server | raw

little-endian, the key and server name in UTF-8, ``raw`` the exact AMI bytes.
Records are only ever appended, a batch per ``write``, so a process killed
mid-write leaves at most one incomplete record, at the end of the last segment;
a power loss can also leave zeros or stale blocks where the writes since the
last sync went. Either way the first record whose length runs past the end of
the file, or whose body fails its CRC, ends the readable part of that file:
what follows is dropped, never guessed at.

The cursor file holds two 32-byte slots written alternately, each with a
sequence number and a CRC: a slot torn by a power loss leaves the other one,
one commit older (its events are claimed again, which a claim tolerates).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "CURSOR_FILE",
    "CURSOR_SIZE",
    "HEAD_SIZE",
    "MAGIC",
    "CorruptRecord",
    "SegmentCheck",
    "SpillDirError",
    "SpilledEvent",
    "check_segment",
    "check_spill_dir",
    "count_records",
    "decode_cursor",
    "decode_records",
    "encode_cursor",
    "encode_records",
    "lock_slot",
    "namespace_dir",
    "peek_received_at",
    "record_size",
    "segment_name",
    "segment_number",
]

LOCK_FILE = "lock"
CURSOR_FILE = "cursor"
# Slot directories tried before giving up: slot-0, slot-0.1 ... slot-0.99.
MAX_ALTERNATES = 100
# The first bytes of every segment file: the format and its version. A file that
# starts otherwise is neither read nor deleted: a later version's data stays intact.
MAGIC = b"AMISPL1\n"
_HEADER = struct.Struct("<II")  # body length, CRC-32 of the body
_BODY = struct.Struct("<dHH")  # received_at, key length, server length
_HEAD = struct.Struct("<IIdHH")  # the two together
# The bytes at a record's start that say how to read it (and when it arrived).
HEAD_SIZE = _HEAD.size
# A longer body is a torn or foreign length, not an event (an AMI event is
# kilobytes; the u32 field would allow 4 GiB).
MAX_BODY = 64 << 20
_CURSOR_SLOT = struct.Struct("<QQQI4x")  # sequence, segment number, offset, CRC of the three
CURSOR_SIZE = 2 * _CURSOR_SLOT.size
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class SpillDirError(Exception):
    """The spill directory cannot be used. The message is one line that names it."""


@dataclass(frozen=True, slots=True)
class SpilledEvent:
    """What the claim needs of an event, as it goes into the spill and comes out."""

    key: str  # the dedup key, computed on arrival (it depends on the arrival order)
    server: str  # the PBX's name
    received_at: float  # wall clock (time.time()) when the worker received it
    raw: bytes  # the exact AMI message bytes


class CorruptRecord(Exception):
    """The record at ``offset`` fails its length or CRC check."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"corrupt spill record at offset {offset}")
        self.offset = offset


# -- directories ---------------------------------------------------------------------


def check_spill_dir(path: Path) -> None:
    """Create ``path`` (and its parents) if missing, and check that files can be written in it.

    Raises :class:`SpillDirError` otherwise. The check writes and removes a
    file rather than asking ``os.access``: root passes every permission check,
    but not a read-only file system, a full disk or a path through a file.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SpillDirError(f"spill_dir {path} exists and is not a directory") from None
    except OSError as exc:
        raise SpillDirError(f"spill_dir {path} cannot be created: {exc.strerror}") from None
    probe = path / f".probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"spill")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise SpillDirError(f"spill_dir {path} is not writable: {exc.strerror}") from None


def namespace_dir(namespace: str) -> str:
    """A file name for ``namespace``: itself if it is safe, else a cleaned name and a hash.

    The hash keeps apart two namespaces that clean to the same name.
    """
    safe = _UNSAFE.sub("_", namespace).lstrip(".")
    if safe == namespace and 0 < len(safe) <= 100:
        return safe
    digest = hashlib.blake2b(namespace.encode(), digest_size=4).hexdigest()
    return f"{safe[:100]}-{digest}"


def lock_slot(base: Path, slot: int) -> tuple[Path, int]:
    """The first free directory of ``slot`` under ``base``, and its lock file, locked.

    ``slot-<slot>`` if no live process holds it, else ``slot-<slot>.1``,
    ``slot-<slot>.2``... The lock is an exclusive ``flock``: the kernel drops it
    when its holder dies, however it dies. A child forked without exec shares
    it (the descriptor is close-on-exec).
    """
    for alternate in range(MAX_ALTERNATES):
        path = base / (f"slot-{slot}" if alternate == 0 else f"slot-{slot}.{alternate}")
        fd = -1
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # For an operator wondering who has the slot: only a hint, the lock decides.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return path, fd
        except BlockingIOError:
            os.close(fd)  # a live process holds it
        except OSError as exc:  # not writable, or no flock here (some network file systems)
            if fd >= 0:
                os.close(fd)
            raise SpillDirError(f"spill directory {path} cannot be used: {exc.strerror}") from None
    raise SpillDirError(
        f"spill_dir {base}: slot-{slot} and its {MAX_ALTERNATES - 1} alternates are all held "
        "by live processes"
    )


def segment_name(number: int) -> str:
    # Zero-padded: the names sort in the order the segments were written.
    return f"{number:020d}.seg"


def segment_number(name: str) -> int | None:
    match = _SEGMENT_NAME.match(name)
    return int(match.group(1)) if match else None


# -- records -------------------------------------------------------------------------


def encode_records(
    events: Sequence[SpilledEvent], room: int, servers: dict[str, bytes]
) -> tuple[list[bytes], int, int]:
    """The records of the longest prefix of ``events`` that fits in ``room`` bytes.

    Returns the pieces to write (headers and bodies), how many events they
    hold, and their size. ``servers`` caches encoded server names.
    """
    pack_body = _BODY.pack
    pack_header = _HEADER.pack
    crc32 = zlib.crc32
    pieces: list[bytes] = []
    size = 0
    for event in events:
        key = event.key.encode()
        server = servers.get(event.server)
        if server is None:
            server = servers[event.server] = event.server.encode()
        body = pack_body(event.received_at, len(key), len(server)) + key + server + event.raw
        if len(body) > MAX_BODY:
            raise ValueError(f"event {event.key} is too large to spill ({len(body)} bytes)")
        if size + _HEADER.size + len(body) > room:
            break
        size += _HEADER.size + len(body)
        pieces.append(pack_header(len(body), crc32(body)))
        pieces.append(body)
    return pieces, len(pieces) // 2, size


def decode_records(
    buf: bytes, pos: int, limit: int, servers: dict[bytes, str]
) -> tuple[list[SpilledEvent], list[int]]:
    """Up to ``limit`` whole records of ``buf`` from ``pos``: the events, and where each ends.

    Stops before a record that does not end within ``buf``; raises
    :class:`CorruptRecord` at one that fails its checks. ``servers`` caches
    decoded server names.
    """
    # The hot loop of a drain: one unpack for the header and the body's fixed part.
    unpack = _HEAD.unpack_from
    crc32 = zlib.crc32
    view = memoryview(buf)
    end = len(buf)
    events: list[SpilledEvent] = []
    ends: list[int] = []
    count = 0
    while count < limit and pos + HEAD_SIZE <= end:
        length, crc, received_at, key_length, server_length = unpack(buf, pos)
        start = pos + _HEADER.size
        stop = start + length
        if length < _BODY.size or length > MAX_BODY:
            raise CorruptRecord(pos)
        if stop > end:
            break
        if crc32(view[start:stop]) != crc:
            raise CorruptRecord(pos)
        server_at = start + _BODY.size + key_length
        raw_at = server_at + server_length
        if raw_at > stop:
            raise CorruptRecord(pos)
        server_bytes = buf[server_at:raw_at]
        server = servers.get(server_bytes)
        if server is None:
            server = servers[server_bytes] = server_bytes.decode()
        key = buf[start + _BODY.size : server_at].decode()
        events.append(SpilledEvent(key, server, received_at, buf[raw_at:stop]))
        ends.append(stop)
        pos = stop
        count += 1
    return events, ends


def record_size(buf: bytes, pos: int) -> int | None:
    """The size, header included, of the record at ``buf[pos]``, if its header is there."""
    if pos + _HEADER.size > len(buf):
        return None
    (length,) = struct.unpack_from("<I", buf, pos)
    return _HEADER.size + int(length)


def peek_received_at(head: bytes) -> float | None:
    """``received_at`` of the record whose first bytes are ``head``, if they hold it."""
    if len(head) < HEAD_SIZE:
        return None
    (received_at,) = struct.unpack_from("<d", head, _HEADER.size)
    return float(received_at)


def scan(data: bytes | mmap.mmap, pos: int, stop: int | None = None) -> tuple[int, int]:
    """Check the records of ``data`` from ``pos``: how many are whole, and where they end.

    Stops at the first record that is incomplete, fails its CRC, or would end
    past ``stop``; what follows is not counted.
    """
    unpack_header = _HEADER.unpack_from
    unpack_body = _BODY.unpack_from
    crc32 = zlib.crc32
    view = memoryview(data)
    end = len(data) if stop is None else min(stop, len(data))
    records = 0
    try:
        while pos + HEAD_SIZE <= end:
            length, crc = unpack_header(data, pos)
            start = pos + _HEADER.size
            if length < _BODY.size or length > MAX_BODY or start + length > end:
                break
            if crc32(view[start : start + length]) != crc:
                break
            _, key_length, server_length = unpack_body(data, start)
            if _BODY.size + key_length + server_length > length:
                break
            records += 1
            pos = start + length
    finally:
        view.release()  # an mmap cannot close while a view of it is alive
    return records, pos


# -- segment files -------------------------------------------------------------------


class SegmentCheck(NamedTuple):
    committed_records: int  # whole records before the cursor's offset
    committed_end: int  # where they end: where reading resumes
    pending: int  # whole records after them
    end: int  # where those end: the file's size once a torn tail is cut
    torn: bool  # a torn tail was cut off (or the file held nothing readable)


def check_segment(path: Path, committed_to: int | None) -> SegmentCheck | None:
    """Check a segment a previous owner left; cut off a torn tail. None if it has no records.

    ``committed_to``: the cursor's offset, when the cursor is in this segment.
    Raises :class:`SpillDirError` for a file that is not a segment of this version.
    """
    size = path.stat().st_size
    if size == 0:
        return None
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        head = data[: len(MAGIC)]
        if head != MAGIC:
            if MAGIC.startswith(head) or not any(head):
                # Killed, or powered off, while creating it.
                return SegmentCheck(0, len(MAGIC), 0, 0, torn=True)
            raise SpillDirError(f"spill file {path} is not a segment of this version; move it away")
        committed_records, committed_end = 0, len(MAGIC)
        if committed_to is not None:
            committed_records, committed_end = scan(data, len(MAGIC), stop=committed_to)
        pending, end = scan(data, committed_end)
    if end < size:
        os.truncate(path, end)
    return SegmentCheck(committed_records, committed_end, pending, end, torn=end < size)


def count_records(path: Path, stop: int) -> int:
    """Whole records of a segment before ``stop``."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return scan(data, len(MAGIC), stop=stop)[0]


# -- the cursor ----------------------------------------------------------------------


def encode_cursor(sequence: int, segment: int, offset: int) -> tuple[int, bytes]:
    """The cursor slot to write for a commit: (its offset in the file, its bytes)."""
    fields = _CURSOR_SLOT.pack(sequence, segment, offset, 0)[:24]
    return (sequence % 2) * _CURSOR_SLOT.size, fields + struct.pack("<I4x", zlib.crc32(fields))


def decode_cursor(data: bytes) -> tuple[int, int, int] | None:
    """(sequence, segment number, offset) of the newest intact slot, if one is."""
    best: tuple[int, int, int] | None = None
    for at in (0, _CURSOR_SLOT.size):
        if len(data) < at + _CURSOR_SLOT.size:
            break
        sequence, segment, offset, crc = _CURSOR_SLOT.unpack_from(data, at)
        if zlib.crc32(data[at : at + 24]) != crc or (sequence % 2) * _CURSOR_SLOT.size != at:
            continue
        if best is None or sequence > best[0]:
            best = (sequence, segment, offset)
    return best
