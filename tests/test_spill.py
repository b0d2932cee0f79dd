"""The spill on real files: order, cursor, recovery after close and after SIGKILL, limits, locks.

Processes that must die mid-flight are real children (``python -c``) that say
how far they got; they are killed when a condition is seen (SIGKILL as a write
begins), or by the kernel inside a write (SIGXFSZ). Nothing sleeps and hopes.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from itertools import accumulate
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amiworker.fleet.spill import Spill, SpillDirError, SpilledEvent, check_spill_dir
from amiworker.fleet.spill_files import MAGIC, encode_records, namespace_dir

NAMESPACE = "amiworker.events"
BIG = 1024  # events of 16 KiB in the write the SIGKILL interrupts
ROOT = Path(__file__).resolve().parent.parent


def event(i: int, size: int = 200) -> SpilledEvent:
    raw = f"Event: Newexten\r\nChannel: PJSIP/{i}\r\nUniqueid: {i}\r\n".encode()
    raw += b"X" * max(0, size - len(raw)) + b"\r\n"
    return SpilledEvent(f"key-{i}", "pbx-1" if i % 3 else "pbx-2", 1000.0 + i, raw)


def events(start: int, stop: int, size: int = 200) -> list[SpilledEvent]:
    return [event(i, size) for i in range(start, stop)]


def open_spill(spill_dir: Path, **options: int) -> Spill:
    options.setdefault("max_bytes", 1 << 24)
    return Spill.open(spill_dir, NAMESPACE, 0, **options)


def drain(spill: Spill, batch: int = 1000) -> list[SpilledEvent]:
    drained = []
    while got := spill.read(batch):
        spill.commit(len(got))
        drained += got
    return drained


def segment_files(spill: Spill) -> list[str]:
    return sorted(p.name for p in spill.path.iterdir() if p.suffix == ".seg")


@pytest.fixture
def spill_dir(tmp_path: Path) -> Path:
    return tmp_path / "spill"


# -- order, cursor, commit -----------------------------------------------------------


def test_order_is_kept_across_segments_reads_and_commits(spill_dir: Path) -> None:
    with open_spill(spill_dir, segment_bytes=4096) as spill:
        assert spill.path == spill_dir / NAMESPACE / "slot-0"
        assert spill.events == spill.bytes == 0 and spill.oldest_received_at is None
        for start in range(0, 300, 60):
            assert spill.append(events(start, start + 60)) == 60
        assert spill.events == 300
        assert len(segment_files(spill)) == 5  # a batch per segment: each is bigger than one
        drained = []
        for limit in [1, 7, 50, 2, 500]:
            got = spill.read(limit)
            spill.commit(len(got))
            drained += got
        assert drained == events(0, 300)
        assert spill.read(10) == []
        # Empty: every segment is gone, nothing counts.
        assert spill.events == spill.bytes == 0 and spill.oldest_received_at is None
        assert segment_files(spill) == []
        assert spill.append(events(300, 310)) == 10
        assert drain(spill) == events(300, 310)


def test_read_cursor_and_rewind(spill_dir: Path) -> None:
    with open_spill(spill_dir, segment_bytes=2048) as spill:
        spill.append(events(0, 40))
        assert spill.read(5) == events(0, 5)
        assert spill.read(5) == events(5, 10)  # the read cursor moved on
        spill.commit(3)
        assert spill.events == 37 and spill.oldest_received_at == event(3).received_at
        spill.rewind()  # a failed claim: read the uncommitted again
        assert spill.read(4) == events(3, 7)
        with pytest.raises(ValueError, match="commit"):
            spill.commit(5)
        spill.commit(4)
        assert spill.oldest_received_at == event(7).received_at
        spill.rewind()
        spill.rewind()
        assert drain(spill, 6) == events(7, 40)


def test_committed_segments_are_deleted(spill_dir: Path) -> None:
    with open_spill(spill_dir, segment_bytes=2048) as spill:
        for start in range(0, 100, 10):
            spill.append(events(start, start + 10))
        files, size = segment_files(spill), spill.bytes
        assert size == sum((spill.path / name).stat().st_size for name in files)
        spill.commit(len(spill.read(35)))
        assert segment_files(spill) == files[3:]  # 10 events a segment
        assert spill.bytes == sum((spill.path / name).stat().st_size for name in files[3:])
        assert spill.bytes < size


# -- limits, slots, directories ------------------------------------------------------


def test_max_bytes_refuses_what_does_not_fit(spill_dir: Path) -> None:
    with open_spill(spill_dir, max_bytes=10_000, segment_bytes=2048) as spill:
        accepted = spill.append(events(0, 100))
        assert 0 < accepted < 100 and spill.bytes <= 10_000  # a prefix, in order
        assert spill.append(events(accepted, accepted + 5)) == 0
        assert spill.events == accepted
        # Committing gives the room back (a segment at a time; all of it when empty).
        assert spill.read(accepted) == events(0, accepted)
        spill.commit(accepted)
        assert spill.bytes == 0
        assert spill.append(events(100, 110)) == 10
        assert drain(spill) == events(100, 110)
        assert spill.append([event(200, size=20_000)]) == 0  # never fits


def test_max_bytes_counts_the_segment_headers(spill_dir: Path) -> None:
    _, _, record = encode_records([event(0)], 1 << 20, {})
    limit = 2 * len(MAGIC) + 10 * record - 1  # a byte short of 10 events in two segments
    with open_spill(spill_dir, max_bytes=limit, segment_bytes=5 * record) as spill:
        assert spill.append(events(0, 5)) == 5
        assert spill.append(events(5, 10)) == 4  # in a second segment, with its header
        assert spill.bytes == limit + 1 - record


def test_a_held_slot_is_never_shared_and_is_free_once_its_holder_dies(spill_dir: Path) -> None:
    child = _child(
        spill_dir, 'spill.append([event(i) for i in range(5)])\nsay("holding")\nsys.stdin.read()\n'
    )
    try:
        assert next(_lines(child, timeout=30)) == "holding"
        slot = spill_dir / NAMESPACE / "slot-0"
        assert (slot / "lock").read_text() == f"{child.pid}\n"
        with open_spill(spill_dir) as second, open_spill(spill_dir) as third:
            assert (second.path.name, third.path.name) == ("slot-0.1", "slot-0.2")
            assert second.events == third.events == 0
        with open_spill(spill_dir) as again:
            assert again.path.name == "slot-0.1"  # closing released it
        other = Spill.open(spill_dir, NAMESPACE, 1, max_bytes=1 << 20)
        assert other.path.name == "slot-1"
        other.close()
    finally:
        child.kill()
        child.wait(timeout=10)
    with open_spill(spill_dir) as spill:
        assert spill.path == slot
        assert drain(spill) == events(0, 5)  # what the dead holder left


def test_an_unusable_spill_dir_is_refused_in_one_line(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    # A path through a file cannot be created, even by root.
    for bad, reason in [(a_file / "spill", "cannot be created"), (a_file, "not a directory")]:
        with pytest.raises(SpillDirError) as caught:
            check_spill_dir(bad)
        message = str(caught.value)
        assert str(bad) in message and reason in message and "\n" not in message
        with pytest.raises(SpillDirError, match="spill_dir"):
            Spill.open(bad, NAMESPACE, 0, max_bytes=1 << 20)
    check_spill_dir(tmp_path / "new" / "spill")  # created, parents and all
    assert (tmp_path / "new" / "spill").is_dir()
    assert list((tmp_path / "new" / "spill").iterdir()) == []  # the probe is gone


def test_a_spill_dir_without_write_permission_is_refused(tmp_path: Path) -> None:
    """chmod 0o500, checked by an unprivileged user: root passes every permission check."""
    base = Path(tempfile.mkdtemp())  # tmp_path's parents are closed to other users
    try:
        base.chmod(0o711)
        spill_dir = base / "spill"
        spill_dir.mkdir(mode=0o500)
        if os.geteuid() != 0:
            with pytest.raises(SpillDirError) as caught:
                check_spill_dir(spill_dir)
            message = str(caught.value)
        else:
            os.chown(spill_dir, 65534, 65534)  # nobody's directory, not writable by nobody
            message = _as_nobody(lambda: check_spill_dir(spill_dir))
        assert message == f"spill_dir {spill_dir} is not writable: Permission denied"
    finally:
        shutil.rmtree(base)


def _as_nobody(check: Callable[[], None]) -> str:
    """Run ``check`` in a forked child as user nobody: the SpillDirError it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgid(65534)
            os.setuid(65534)
            check()
            os.write(write_end, b"no error")
        except SpillDirError as exc:
            os.write(write_end, str(exc).encode())
        except BaseException as exc:
            os.write(write_end, f"unexpected {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        return pipe.read().decode()


def test_namespaces_become_distinct_safe_directory_names() -> None:
    assert namespace_dir("amiworker.events") == "amiworker.events"
    names = ["db/events", "db_events", "..", "", ".hidden", "a" * 300, "événements", "a b"]
    dirs = [namespace_dir(name) for name in names]
    assert len(set(dirs)) == len(names)
    for name in dirs:
        assert "/" not in name and not name.startswith(".") and 0 < len(name) <= 120


# -- recovery ------------------------------------------------------------------------


def test_recovery_after_close_and_reopen(spill_dir: Path) -> None:
    with open_spill(spill_dir, segment_bytes=4096) as spill:
        spill.append(events(0, 100))
        spill.commit(len(spill.read(30)))
        assert spill.read(20) == events(30, 50)  # read, never committed
    with open_spill(spill_dir, segment_bytes=4096) as spill:
        assert spill.path.name == "slot-0" and spill.torn == 0
        assert spill.events == 70
        assert spill.oldest_received_at == event(30).received_at
        spill.append(events(100, 120))  # behind what was there
        assert drain(spill, 33) == events(30, 120)
    spill.close()  # again: nothing to do
    with pytest.raises(ValueError, match="closed"):
        spill.read(1)
    with open_spill(spill_dir) as spill:
        assert spill.events == 0 and spill.read(10) == []


def test_a_torn_last_record_is_dropped_not_misread(spill_dir: Path) -> None:
    with open_spill(spill_dir) as spill:
        spill.append(events(0, 10))
        segment = spill.path / segment_files(spill)[-1]
    whole = segment.read_bytes()
    # What a kill in the middle of the next write leaves: part of a record.
    pieces, _, _ = encode_records([event(10)], 1 << 20, {})
    record = b"".join(pieces)
    segment.write_bytes(whole + record[: len(record) // 2])
    with open_spill(spill_dir) as spill:
        assert spill.torn == 1 and spill.events == 10
        assert segment.stat().st_size == len(whole)  # the torn tail is cut off
        spill.append(events(10, 15))
        assert drain(spill) == events(0, 15)
    with open_spill(spill_dir) as spill:
        assert spill.torn == 0  # dropped once, counted once


def test_a_segment_torn_at_its_creation_is_dropped(spill_dir: Path) -> None:
    with open_spill(spill_dir) as spill:
        spill.append(events(0, 3))
        path = spill.path
    (path / "00000000000000000007.seg").write_bytes(MAGIC[:5])
    with open_spill(spill_dir) as spill:
        assert spill.torn == 1
        spill.append(events(3, 6))
        assert drain(spill) == events(0, 6)
        assert segment_files(spill) == []


def test_a_file_of_another_format_is_refused_and_kept(spill_dir: Path) -> None:
    with open_spill(spill_dir) as spill:
        path = spill.path
    foreign = path / "00000000000000000003.seg"
    foreign.write_bytes(b"AMISPL9\n" + b"?" * 100)
    with pytest.raises(SpillDirError, match="not a segment of this version"):
        open_spill(spill_dir)
    assert foreign.exists()
    foreign.unlink()
    open_spill(spill_dir).close()  # and the failed open released the slot


def test_a_corrupt_record_ends_its_segment(spill_dir: Path) -> None:
    with open_spill(spill_dir, segment_bytes=2048) as spill:
        for start in range(0, 30, 10):
            spill.append(events(start, start + 10))
        _, second, _ = (spill.path / name for name in segment_files(spill))
    data = bytearray(second.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the disk changed a byte in the middle of the segment
    second.write_bytes(bytes(data))
    with open_spill(spill_dir, segment_bytes=2048) as spill:
        assert spill.torn == 1
        got = drain(spill)
    kept = len(got) - 20  # of the second segment: those before the bad record
    assert 0 <= kept < 10
    assert got == events(0, 10 + kept) + events(20, 30)


def test_corruption_found_while_reading_drops_the_rest_of_that_segment(spill_dir: Path) -> None:
    with open_spill(spill_dir, segment_bytes=2048) as spill:
        for start in range(0, 30, 10):
            spill.append(events(start, start + 10))
        second = spill.path / segment_files(spill)[1]
        assert spill.read(5) == events(0, 5)
        with open(second, "r+b") as file:  # under the open spill, as a failing disk would
            file.seek(second.stat().st_size - 100)  # in the last record: event 19
            file.write(b"\0")
        got = spill.read(100)
        assert got == events(5, 19) + events(20, 30)  # event 19 dropped, not misread
        assert spill.torn == 1 and spill.events == 29
        spill.commit(29)
        assert spill.events == spill.bytes == 0


# -- against a model -----------------------------------------------------------------

_OPERATIONS = st.one_of(
    st.tuples(st.just("append"), st.integers(0, 12), st.integers(0, 600)),  # events, raw size
    st.tuples(st.just("read"), st.integers(0, 15)),
    st.tuples(st.just("read a batch")),  # up to where an append began: a segment's end
    st.tuples(st.just("commit"), st.integers(0, 15)),
    st.tuples(st.just("rewind")),
    st.tuples(st.just("reopen")),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    operations=st.lists(_OPERATIONS, max_size=40),
    segment_bytes=st.sampled_from([600, 3000, 1 << 20]),
    max_bytes=st.sampled_from([4000, 30_000, 1 << 20]),
)
def test_the_spill_behaves_as_its_model(
    operations: list[tuple[object, ...]], segment_bytes: int, max_bytes: int
) -> None:
    """Random interleavings of append/read/commit/rewind/reopen against a list and an index."""
    with tempfile.TemporaryDirectory() as tmp:
        spill_dir = Path(tmp)
        options = {"max_bytes": max_bytes, "segment_bytes": segment_bytes}
        spill = open_spill(spill_dir, **options)
        pending: list[SpilledEvent] = []  # appended, not committed, oldest first
        firsts: set[str] = set()  # the keys of the first event of each append
        read = 0  # how many of them were read since the last commit, rewind or reopen
        next_id = 0
        try:
            for operation in operations:
                match operation:
                    case ("append", int(count), int(size)):
                        batch = events(next_id, next_id + count, size)
                        next_id += count
                        accepted = spill.append(batch)
                        assert 0 <= accepted <= count
                        pending += batch[:accepted]
                        if batch:
                            firsts.add(batch[0].key)
                        if accepted < count:  # refused: the next one would not fit
                            _, _, record = encode_records(
                                batch[accepted : accepted + 1], 1 << 40, {}
                            )
                            assert spill.bytes + record + len(MAGIC) > max_bytes
                    case ("read a batch",):
                        limit = next(
                            (n for n, e in enumerate(pending[read + 1 :], 1) if e.key in firsts),
                            len(pending) - read,
                        )
                        assert spill.read(limit) == pending[read : read + limit]
                        read += limit
                    case ("read", int(limit)):
                        assert spill.read(limit) == pending[read : read + limit]
                        read = min(len(pending), read + limit)
                    case ("commit", int(count)):
                        count = min(count, read)
                        spill.commit(count)
                        del pending[:count]
                        read -= count
                    case ("rewind",):
                        spill.rewind()
                        read = 0
                    case ("reopen",):
                        spill.close()
                        spill = open_spill(spill_dir, **options)
                        assert spill.torn == 0
                        read = 0
                assert spill.events == len(pending)
                assert spill.bytes <= max_bytes
                oldest = pending[0].received_at if pending else None
                assert spill.oldest_received_at == oldest
            spill.rewind()
            assert drain(spill, 7) == pending
            assert spill.bytes == 0 and segment_files(spill) == []
        finally:
            spill.close()


def _child(spill_dir: Path, body: str) -> subprocess.Popen[bytes]:
    """A python child running ``body`` with ``spill`` open on slot 0 of ``spill_dir``."""
    prelude = f"""
import os, resource, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from tests.test_spill import BIG, event, NAMESPACE
from amiworker.fleet.spill import Spill
spill = Spill.open(Path({str(spill_dir)!r}), NAMESPACE, 0, max_bytes=1 << 30,
                   segment_bytes=1 << 30, sync_interval=3600)
def say(*words):
    os.write(1, " ".join(map(str, words)).encode() + b"\\n")
"""
    return subprocess.Popen(
        [sys.executable, "-c", prelude + body], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )


def _lines(child: subprocess.Popen[bytes], timeout: float) -> Iterator[str]:
    """The child's output lines as they come, until it ends; fails after ``timeout`` s."""
    assert child.stdout is not None
    fd = child.stdout.fileno()
    deadline = time.monotonic() + timeout
    pending = b""
    while True:
        while b"\n" in pending:
            line, _, pending = pending.partition(b"\n")
            yield line.decode()
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            pytest.fail(f"no output from the child within {timeout:g} s")
        data = os.read(fd, 65536)  # unbuffered: a line is seen the moment it is written
        if not data:
            return
        pending += data


def _record_ends(start: int, first: int, count: int, size: int) -> list[int]:
    """Where the records of events ``first``... of ``size`` bytes end, appended at ``start``."""
    pieces, _, _ = encode_records(
        [event(i, size) for i in range(first, first + count)], 1 << 40, {}
    )
    sizes = (len(pieces[i]) + len(pieces[i + 1]) for i in range(0, len(pieces), 2))
    return list(accumulate(sizes, initial=start))


_APPEND_AND_DRAIN = """
appended = committed = 0
for _ in range(30):
    appended += spill.append([event(i, 4096) for i in range(appended, appended + 64)])
    got = spill.read(32)
    spill.commit(len(got))
    committed += len(got)
    say(appended, committed)
"""


def _check_recovered(spill_dir: Path, committed: int, appended: int, whole: int) -> None:
    """Nothing committed comes back; all appended does, in order, once; then ``whole`` big ones."""
    with open_spill(spill_dir, max_bytes=1 << 30) as spill:
        got = drain(spill, 5000)
    assert [e.key for e in got] == [f"key-{i}" for i in range(committed, appended + whole)]
    assert got == [event(i, 4096) for i in range(committed, appended)] + [
        event(i, 16384) for i in range(appended, appended + whole)
    ]


def test_recovery_after_sigkill_mid_write(spill_dir: Path) -> None:
    """A child appending and draining is SIGKILLed as a big write begins; the slot is reopened.

    Whether the kill lands inside the write (nearly always, here) or after it is
    a race; what is recovered is exact either way.
    """
    body = (
        _APPEND_AND_DRAIN
        + """
say("big", spill.bytes)
spill.append([event(i, 16384) for i in range(appended, appended + BIG)])
say("done")
sys.stdin.read()
"""
    )
    child = _child(spill_dir, body)
    segment = spill_dir / NAMESPACE / "slot-0" / "00000000000000000001.seg"
    appended = committed = before = 0
    try:
        for line in _lines(child, timeout=30):
            if line.startswith("big"):
                before = int(line.split()[1])
                break
            appended, committed = map(int, line.split())
        else:
            pytest.fail(f"the child ended (status {child.wait()}) before its big write")
        deadline = time.monotonic() + 30
        while os.stat(segment).st_size == before:  # kill it as soon as the file grows
            assert time.monotonic() < deadline, "the big write never began"
    finally:
        child.kill()
        child.wait(timeout=10)
    ends = _record_ends(before, appended, BIG, 16384)
    size = segment.stat().st_size
    with open_spill(spill_dir, max_bytes=1 << 30) as spill:
        assert spill.torn == (size not in ends)  # a cut between two records tears none
    _check_recovered(spill_dir, committed, appended, sum(end <= size for end in ends[1:]))


def test_a_process_killed_inside_a_write_leaves_a_torn_record(spill_dir: Path) -> None:
    """The same, without the race: the kernel cuts the write mid-record and kills the child.

    A file size limit (RLIMIT_FSIZE) makes the write stop at the limit, and the
    next write kill the process with SIGXFSZ.
    """
    body = (
        _APPEND_AND_DRAIN
        + """
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; the kernel's default kills
limit = spill.bytes + 10 * 16384 + 5000
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
say("big", spill.bytes, limit)
spill.append([event(i, 16384) for i in range(appended, appended + BIG)])
say("survived")
"""
    )
    child = _child(spill_dir, body)
    appended = committed = before = limit = 0
    lines = list(_lines(child, timeout=30))
    assert child.wait(timeout=10) == -signal.SIGXFSZ
    for line in lines:
        if line.startswith("big"):
            before, limit = map(int, line.split()[1:])
        else:
            appended, committed = map(int, line.split())
    segment = spill_dir / NAMESPACE / "slot-0" / "00000000000000000001.seg"
    ends = _record_ends(before, appended, BIG, 16384)
    assert segment.stat().st_size == limit and limit not in ends
    with open_spill(spill_dir, max_bytes=1 << 30) as spill:
        assert spill.torn == 1
    _check_recovered(spill_dir, committed, appended, sum(end <= limit for end in ends[1:]))


def test_a_write_the_disk_refuses_leaves_no_trace(spill_dir: Path) -> None:
    """A full disk (here a file size limit) refuses the batch; the spill carries on."""
    body = (
        _APPEND_AND_DRAIN
        + """
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as Python has it: the write fails, EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (spill.bytes + 100_000, resource.RLIM_INFINITY))
say("refused", spill.append([event(i, 16384) for i in range(appended, appended + 64)]))
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
say("accepted", spill.append([event(i, 4096) for i in range(appended, appended + 10)]))
spill.close()
"""
    )
    child = _child(spill_dir, body)
    lines = list(_lines(child, timeout=30))
    assert child.wait(timeout=10) == 0, lines
    assert lines[-2:] == ["refused 0", "accepted 10"]
    appended, committed = map(int, lines[-3].split())
    with open_spill(spill_dir, max_bytes=1 << 30) as spill:
        assert spill.torn == 0
    # The 10 accepted after the refusal went to a new segment, behind the others.
    with open_spill(spill_dir, max_bytes=1 << 30) as spill:
        got = drain(spill)
    assert got == [event(i, 4096) for i in range(committed, appended + 10)]
