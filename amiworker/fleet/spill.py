"""The spill: events the claim buffer cannot hold, on local disk, first in first out.

A worker whose in-memory claim buffer is past its high-water mark appends what
arrives here, and its claim loop drains it (read, claim, commit) once memory is
empty, so events keep their arrival order. The spill outlives the process: the
next worker of the same slot on this host drains what a killed one left.

Where: ``<spill_dir>/<namespace>/slot-<slot>``, owned through an exclusive
``flock`` for as long as the spill is open. The kernel drops the lock when the
process dies, however it dies, so a restarted slot finds its directory free.
Two live processes never share a directory: when ``slot-<slot>`` is held (two
supervisors on one host both run a slot 0), :meth:`Spill.open` takes the first
free of ``slot-<slot>.1``, ``slot-<slot>.2``... and :attr:`Spill.path` says
which. ``spill_files`` has the layout and the format.

How: append-only segment files of CRC-checked records (chosen over SQLite by
``bench/spill.py``). A segment is deleted once every event in it is
committed; a ``cursor`` file keeps where the committed events end.

What a failure costs:

* A process kill (SIGKILL, the OOM killer) costs nothing that was appended: an
  ``append`` is one ``write`` to the file, which the OS keeps if the process
  dies the next instant. A kill during that ``write`` leaves a torn last record,
  which the next :meth:`Spill.open` drops and counts in :attr:`Spill.torn`
  (from the batch being appended, not yet accepted). Commits are kept the same
  way: after a kill, nothing committed is read again.
* A power loss or kernel crash can cost what was appended since the last
  ``fdatasync``: the spill syncs on the first ``append`` or ``commit`` at
  least ``sync_interval`` seconds (default 1) after the previous sync, and on
  ``close`` (Linux writes dirty pages back within about 30 s on its own; an
  owner may also call :meth:`Spill.sync` on a timer). Commits since the last
  sync may be read again: claimed twice, which a claim tolerates. A record
  left half-written fails its CRC and is dropped, never misread.

:meth:`Spill.open` checks the CRC of every record left in the slot: about
1.3 ms per MB on the development VM (bench/spill.py), some 1.4 s for a full 1 GiB.

Threading: every method may block on the disk and none is thread-safe. The
owner calls them all from one thread of its own (a single-thread executor),
never on the event loop; the spill therefore has no lock of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from types import TracebackType

from amiworker.fleet.spill_files import (
    CURSOR_FILE,
    CURSOR_SIZE,
    HEAD_SIZE,
    MAGIC,
    CorruptRecord,
    SpillDirError,
    SpilledEvent,
    check_segment,
    check_spill_dir,
    count_records,
    decode_cursor,
    decode_records,
    encode_cursor,
    encode_records,
    lock_slot,
    namespace_dir,
    peek_received_at,
    record_size,
    segment_name,
    segment_number,
)
from amiworker.logs import Throttle

__all__ = ["Spill", "SpillDirError", "SpilledEvent", "check_spill_dir"]

log = logging.getLogger("amiworker.fleet.spill")

# Read ahead this many bytes of a segment: some 2,000 events of a real Asterisk.
_READ_CHUNK = 1 << 20
# Segments are a sixteenth of max_bytes within these bounds: the disk gets
# committed events back a segment at a time.
_SEGMENT_MIN = 4096
_SEGMENT_MAX = 64 << 20
_START = len(MAGIC)  # where a segment's first record starts


@dataclass(slots=True)
class _Segment:
    number: int
    path: Path
    size: int  # MAGIC and whole records: what is read, and counted in Spill.bytes
    records: int  # whole records in the file, committed or not


class Spill:
    """An append-only FIFO of events on local disk, owned by one worker slot.

    The owner appends what memory cannot hold and drains in a loop: ``read(n)``
    the oldest events not committed, claim them, ``commit(k)`` the ``k`` oldest
    read once they are stored, or ``rewind()`` to read them again after a
    failed claim. The module's docstring says what a crash costs, and that one
    thread calls every method.
    """

    @classmethod
    def open(
        cls,
        spill_dir: Path,
        namespace: str,
        slot: int,
        *,
        max_bytes: int,
        sync_interval: float = 1.0,
        segment_bytes: int | None = None,
    ) -> Spill:
        """Open the spill of ``slot``, with what a dead predecessor left in it.

        ``namespace`` (``"<database>.<collection>"``) keeps apart fleets that
        share a host and a spill_dir. ``segment_bytes`` (tests) overrides the
        segment size. Raises :class:`SpillDirError` if the directory cannot be
        used.
        """
        if slot < 0 or max_bytes <= 0 or sync_interval < 0:
            raise ValueError("slot and sync_interval must be >= 0, max_bytes > 0")
        check_spill_dir(spill_dir)
        path, lock_fd = lock_slot(spill_dir / namespace_dir(namespace), slot)
        segment = segment_bytes or max(_SEGMENT_MIN, min(_SEGMENT_MAX, max_bytes // 16))
        spill = cls(path, lock_fd, max_bytes, sync_interval, segment)
        try:
            spill._recover()
        except OSError as exc:
            spill._close_fds()
            raise SpillDirError(f"spill directory {path} cannot be used: {exc}") from None
        except BaseException:
            spill._close_fds()
            raise
        return spill

    def __init__(
        self, path: Path, lock_fd: int, max_bytes: int, sync_interval: float, segment_bytes: int
    ) -> None:
        # Use Spill.open: it finds the directory, takes its lock and recovers.
        self.path = path
        self.max_bytes = max_bytes
        self.torn = 0  # torn or corrupt records found and dropped since opened
        self._lock_fd: int | None = lock_fd
        self._cursor_fd: int | None = None
        self._sync_interval = sync_interval
        self._segment_bytes = segment_bytes
        self._segments: list[_Segment] = []  # oldest first; the last may be the writer's
        self._writer_fd: int | None = None  # the last segment's, open for appending
        self._sealed_fds: list[int] = []  # of finished segments, not synced yet
        self._reader = _Reader()
        self._next_number = 0  # of the next segment file
        self._sequence = 0  # of the next cursor slot written
        self._commit_offset = _START  # in _segments[0]
        self._read_index = 0  # in _segments
        self._read_offset = _START
        # (segment number, where it ends, received_at) of each event read, not committed.
        self._unacked: deque[tuple[int, int, float]] = deque()
        self._events = 0
        self._bytes = 0
        self._oldest: float | None = None
        self._oldest_known = True
        self._server_bytes: dict[str, bytes] = {}
        self._server_names: dict[bytes, str] = {}
        self._data_dirty = self._cursor_dirty = self._dir_dirty = False
        self._last_sync = time.monotonic()
        self._errors = Throttle()

    @property
    def events(self) -> int:
        """Events appended and not committed (read or not)."""
        return self._events

    @property
    def bytes(self) -> int:
        """Bytes of the segment files: what ``max_bytes`` bounds.

        Besides the events not committed, it counts the committed ones of the
        oldest segment until all of it is committed and it is deleted: up to a
        sixteenth of ``max_bytes``. An empty spill has no file: 0.
        """
        return self._bytes

    @property
    def oldest_received_at(self) -> float | None:
        """``received_at`` of the oldest event not committed; None if there is none."""
        if not self._oldest_known:
            self._oldest = self._peek_oldest()
            self._oldest_known = True
        return self._oldest

    # -- appending ------------------------------------------------------------------

    def append(self, events: Sequence[SpilledEvent]) -> int:
        """Append ``events`` in order, in one write; return how many were accepted.

        They are accepted in order until the spill would hold more than
        ``max_bytes``; the rest are refused (the caller drops and counts them).
        A write the disk refuses (full, I/O error) refuses the whole batch and
        leaves no trace of it; the error is logged (at most one line per 10 s).
        """
        self._check_open()
        if not events:
            return 0
        roll = self._writer_fd is None or self._segments[-1].size >= self._segment_bytes
        room = self.max_bytes - self._bytes - (_START if roll else 0)
        pieces, accepted, size = encode_records(events, room, self._server_bytes)
        if not accepted:
            return 0
        if roll:
            pieces.insert(0, MAGIC)
            size += _START
        try:
            if roll:
                self._roll()
            assert self._writer_fd is not None
            _write_all(self._writer_fd, b"".join(pieces))
        except OSError as exc:
            self._write_failed(exc, roll)
            return 0
        writer = self._segments[-1]
        writer.size += size
        writer.records += accepted
        self._bytes += size
        if self._events == 0:
            self._oldest, self._oldest_known = events[0].received_at, True
        self._events += accepted
        self._data_dirty = True
        self._maybe_sync()
        return accepted

    def _roll(self) -> None:
        """Finish the writer's segment (synced at the next sync), start the next one."""
        if self._writer_fd is not None:
            self._sealed_fds.append(self._writer_fd)
            self._writer_fd = None
        number = self._next_number
        path = self.path / segment_name(number)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        self._writer_fd = os.open(path, flags, 0o644)
        self._next_number += 1
        self._segments.append(_Segment(number, path, 0, 0))
        self._dir_dirty = True

    def _write_failed(self, exc: OSError, rolled: bool) -> None:
        # Nothing of the batch may stay: a partial record would end the readable
        # part of the file, and every append after it with it. A segment created
        # for the batch goes; an older one is cut back to its last whole record
        # and finished (a tail the cut missed is dropped by the next open).
        fd, self._writer_fd = self._writer_fd, None
        if fd is not None:
            writer = self._segments[-1]
            if rolled:
                os.close(fd)
                self._segments.pop()
                _unlink(writer.path)
            else:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, writer.size)
                self._sealed_fds.append(fd)
        self._log_error(f"appending to the spill in {self.path} failed ({exc.strerror})")

    # -- draining -------------------------------------------------------------------

    def read(self, limit: int) -> list[SpilledEvent]:
        """The next ``limit`` events (or fewer) after those already read, oldest first.

        Nothing is removed: events read and not committed are read again after
        :meth:`rewind`, and by the next owner of the slot after a restart.
        """
        self._check_open()
        events: list[SpilledEvent] = []
        segments = self._segments
        while len(events) < limit and self._read_index < len(segments):
            segment = segments[self._read_index]
            offset = self._read_offset
            if offset >= segment.size:
                if self._read_index + 1 == len(segments):
                    break
                self._read_index += 1
                self._read_offset = _START
                continue
            buf, base = self._reader.load(segment, offset)
            try:
                got, ends = decode_records(
                    buf, offset - base, limit - len(events), self._server_names
                )
                if not got:  # load() has the whole record if it lies within the segment
                    raise CorruptRecord(offset - base)
            except CorruptRecord as exc:
                self._corrupt(segment, base + exc.offset)
                continue
            events += got
            ends = [base + end for end in ends]
            self._unacked.extend(zip(repeat(segment.number), ends, [e.received_at for e in got]))
            self._read_offset = ends[-1]
        return events

    def commit(self, count: int) -> None:
        """The ``count`` oldest events read are stored: forget them, for good.

        A restart does not read them again (after a power loss, those of the
        last ``sync_interval`` may be). Segments wholly committed are deleted.
        """
        self._check_open()
        unacked = self._unacked
        if not 0 <= count <= len(unacked):
            raise ValueError(f"commit({count}): {len(unacked)} event(s) read and not committed")
        if count == 0:
            return
        for _ in range(count - 1):
            unacked.popleft()
        number, offset, _ = unacked.popleft()
        self._events -= count
        # The cursor before the deletions: if the process dies in between, the
        # next open deletes what the cursor has passed.
        at, slot = encode_cursor(self._sequence, number, offset)
        self._sequence += 1
        try:
            assert self._cursor_fd is not None
            os.pwrite(self._cursor_fd, slot, at)
            self._cursor_dirty = True
        except OSError as exc:
            self._log_error(f"recording a commit in {self.path} failed ({exc.strerror})")
        segments = self._segments
        while segments[0].number < number:
            self._delete_head()
        if offset >= segments[0].size:
            self._delete_head()
            offset = _START
        self._commit_offset = offset
        if unacked:
            self._oldest, self._oldest_known = unacked[0][2], True
        else:
            self._oldest, self._oldest_known = None, self._events == 0
        self._maybe_sync()

    def rewind(self) -> None:
        """Forget what was read and not committed: the next :meth:`read` returns it again."""
        self._check_open()
        self._unacked.clear()
        self._read_index = 0
        self._read_offset = self._commit_offset

    # -- syncing and closing --------------------------------------------------------

    def sync(self) -> None:
        """Flush what was appended and committed to the disk (``fdatasync``)."""
        if self._lock_fd is None:
            return
        try:
            if self._writer_fd is not None and self._data_dirty:
                os.fdatasync(self._writer_fd)
            while self._sealed_fds:
                fd = self._sealed_fds.pop()
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            if self._cursor_dirty and self._cursor_fd is not None:
                os.fdatasync(self._cursor_fd)
            if self._dir_dirty:
                # New and deleted segments are entries of the directory, not of the files.
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            self._log_error(f"syncing the spill in {self.path} failed ({exc.strerror})")
        self._data_dirty = self._cursor_dirty = self._dir_dirty = False
        self._last_sync = time.monotonic()

    def _maybe_sync(self) -> None:
        if time.monotonic() - self._last_sync >= self._sync_interval:
            self.sync()

    def close(self) -> None:
        """Sync, and release the slot. The events stay for the slot's next owner."""
        if self._lock_fd is None:
            return
        self.sync()
        self._close_fds()

    def __enter__(self) -> Spill:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _close_fds(self) -> None:
        # The lock file last: the slot is free once everything else is closed.
        for fd in [self._writer_fd, *self._sealed_fds, self._cursor_fd, self._lock_fd]:
            if fd is not None:
                os.close(fd)
        self._reader.close()
        self._writer_fd = self._cursor_fd = self._lock_fd = None
        self._sealed_fds = []

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise ValueError(f"the spill in {self.path} is closed")

    # -- segments -------------------------------------------------------------------

    def _corrupt(self, segment: _Segment, offset: int) -> None:
        """A record that was whole when written fails its check: the disk changed it.

        The segment ends there: the rest of it is dropped, counted and logged,
        never misread.
        """
        lost = max(0, segment.records - count_records(segment.path, offset))
        log.error(
            "spill %s: a record of %s fails its check at offset %d; the %d event(s) from "
            "there to the end of that file are dropped",
            self.path,
            segment.path.name,
            offset,
            lost,
        )
        self.torn += 1
        self._events -= lost
        self._bytes -= segment.size - offset
        segment.size = offset
        segment.records -= lost
        self._reader.forget(segment.number)
        self._oldest_known = False
        with contextlib.suppress(OSError):
            os.truncate(segment.path, offset)  # else the next open drops the same tail

    def _peek_oldest(self) -> float | None:
        offset = self._commit_offset
        for segment in self._segments:
            if offset < segment.size:
                fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    return peek_received_at(os.pread(fd, HEAD_SIZE, offset))
                finally:
                    os.close(fd)
            offset = _START
        return None

    def _delete_head(self) -> None:
        segment = self._segments.pop(0)
        if not self._segments and self._writer_fd is not None:
            os.close(self._writer_fd)  # no sync: it is being deleted
            self._writer_fd = None
            self._data_dirty = False
        self._reader.forget(segment.number)
        self._bytes -= segment.size
        _unlink(segment.path)
        self._dir_dirty = True
        if self._read_index > 0:
            self._read_index -= 1
        else:
            self._read_offset = _START  # it was in the deleted segment, at its end

    # -- recovery -------------------------------------------------------------------

    def _recover(self) -> None:
        """Take over what the slot's previous owner left: cursor, segments, torn tails."""
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        self._cursor_fd = os.open(self.path / CURSOR_FILE, flags, 0o644)
        cursor = decode_cursor(os.pread(self._cursor_fd, CURSOR_SIZE, 0))
        sequence, committed_segment, committed_offset = cursor or (-1, 0, _START)
        self._sequence = sequence + 1
        numbers = sorted(
            number for name in os.listdir(self.path) if (number := segment_number(name)) is not None
        )
        # Never reuse a number the cursor may name, even if its file is gone.
        self._next_number = max([*numbers, committed_segment]) + 1
        for number in numbers:
            path = self.path / segment_name(number)
            if number < committed_segment:
                _unlink(path)  # committed: its owner died before deleting it
                self._dir_dirty = True
                continue
            stop = committed_offset if number == committed_segment else None
            check = check_segment(path, stop)
            if check is not None and check.torn:
                self.torn += 1
                self._dir_dirty = True
            if check is None or not check.pending:
                _unlink(path)
                self._dir_dirty = True
                continue
            if not self._segments:
                self._commit_offset = check.committed_end
            records = check.committed_records + check.pending
            self._segments.append(_Segment(number, path, check.end, records))
            self._events += check.pending
            self._bytes += check.end
        self._read_offset = self._commit_offset
        self._oldest_known = self._events == 0
        if self.torn:
            log.warning(
                "spill %s: %d torn record(s) dropped (a process killed while appending, or "
                "a power loss); %d event(s) recovered",
                self.path,
                self.torn,
                self._events,
            )

    def _log_error(self, message: str) -> None:
        errors = self._errors.count()
        if errors:
            log.error("%s; %d such error(s) since the last line", message, errors)


class _Reader:
    """Reads a segment ahead, a chunk at a time, through one descriptor."""

    __slots__ = ("_at", "_buf", "_fd", "_number")

    def __init__(self) -> None:
        self._number = -1  # the segment of _fd and _buf
        self._fd: int | None = None
        self._buf = b""
        self._at = 0  # the offset of _buf in the segment

    def load(self, segment: _Segment, offset: int) -> tuple[bytes, int]:
        """Bytes of ``segment`` from ``offset`` or before, holding the whole record there.

        Returns them and their offset in the segment: the last chunk read if it
        has the record, else a new chunk.
        """
        if self._number == segment.number and self._at <= offset:
            size = record_size(self._buf, offset - self._at)
            if size is not None and offset - self._at + size <= len(self._buf):
                return self._buf, self._at
        if self._number != segment.number or self._fd is None:
            self.close()
            self._fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
            self._number = segment.number
        buf = os.pread(self._fd, min(segment.size - offset, _READ_CHUNK), offset)
        size = record_size(buf, 0)
        if size is not None and len(buf) < size <= segment.size - offset:
            buf = os.pread(self._fd, size, offset)  # an event larger than a chunk
        self._buf, self._at = buf, offset
        return buf, offset

    def forget(self, number: int) -> None:
        """Segment ``number`` is deleted or cut: drop what was read of it."""
        if self._number == number:
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._number, self._fd, self._buf, self._at = -1, None, b"", 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
