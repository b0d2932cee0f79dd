"""The AMI wire format, with no I/O: bytes in, messages out; actions in, bytes out.

An AMI stream is a banner line (``Asterisk Call Manager/11.0.0``) followed by
messages, each a block of ``Name: value`` lines ended by an empty line. Two
things make it less regular than it looks:

* Asterisk <= 13 answers ``Command`` with ``Response: Follows``, then the raw CLI
  output (which may contain empty lines and ``: ``), then ``--END COMMAND--``.
  Such a message cannot be framed by the empty line alone.
* Line ends are CRLF, but bare LF and the ``\\r\\n\\n`` terminator occur in the
  wild, so framing accepts ``\\n`` with an optional ``\\r`` before it.

Framing is done on bytes; a message is decoded as UTF-8 only once it is
complete, so a multi-byte character split across TCP reads is never mangled.
Headers are parsed lazily on first access: a worker that only needs the raw
bytes (to hash them) or the event name pays for nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from operator import itemgetter
from typing import NoReturn

from amiworker.ami.message import Message, decode

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "MAX_ACTION_LINE",
    "Parser",
    "ProtocolError",
    "encode_action",
    "encode_message",
]

#: Default bound on one message; a peer that sends more without an end is broken or hostile.
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024

#: Asterisk reads a manager line into a 1025-byte buffer and discards longer lines,
#: so a longer action line would be silently mangled by the server.
MAX_ACTION_LINE = 1024

#: The longest banner we wait for before deciding the peer is not an AMI server.
_MAX_BANNER = 1024

#: An unfinished message shorter than this is joined with the next read and searched
#: again from its start (cheapest for ordinary events). A longer one is grown in place
#: and only the new bytes are searched for its end: re-copying and rescanning a large
#: message on every small read would cost quadratic time, and one PBX trickling a
#: huge message could then starve every other session of the event loop.
_REJOIN_BELOW = 8 * 1024

# A message ends at an empty line: "\n" then an optional "\r" then "\n".
# The pattern starts with a literal so the regex engine can skip ahead quickly.
_END_OF_MESSAGE = re.compile(rb"\n\r?\n")
# The same, captured: splitting a whole read with it gives [message, end, message,
# end, ..., rest] in one C call (see Parser._split_plain).
_SPLIT_MESSAGES = re.compile(rb"(\n\r?\n)")
_FOLLOWS = b"Response: Follows"
_END_COMMAND_BYTES = b"--END COMMAND--"
_BANNER = re.compile(rb"^(?P<product>[^/\r\n]*Call Manager[^/\r\n]*)/(?P<version>[^\s]+)\s*$")


_FIRST_BYTE = itemgetter(0)


class ProtocolError(Exception):
    """The peer sent something that is not AMI, or a message over the size limit.

    ``messages`` holds the complete messages parsed from the same input before
    the fault, so a caller can still deliver them before closing the session.
    """

    def __init__(self, reason: str, messages: list[Message] | None = None) -> None:
        super().__init__(reason)
        self.messages: list[Message] = messages or []


class Parser:
    """Incremental AMI framing: feed bytes as they arrive, get complete messages.

    Any split of the stream gives the same messages. The buffer never holds more
    than ``max_message_size`` bytes of one unfinished message: past that,
    ``feed`` raises :class:`ProtocolError` and the session should be closed.
    """

    def __init__(
        self, *, banner: bool = True, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    ) -> None:
        self.version: str | None = None
        self.banner: str | None = None
        self.max_message_size = max_message_size
        self._expect_banner = banner
        # The unfinished message (or banner); a bytearray once it is large.
        self._buffer: bytes | bytearray = b""
        # For a large held message: where the search for its end resumes (nothing
        # ends before it), and where its --END COMMAND-- marker is, once seen.
        self._scan = 0
        self._marker = -1
        self._broken: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a message not yet complete."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Message]:
        if self._broken is not None:
            raise ProtocolError(self._broken)
        messages: list[Message] = []
        pos = 0
        buf = bytes(data)  # no copy when it is bytes already
        held = self._buffer
        if held:
            if len(held) < _REJOIN_BELOW or self._expect_banner:
                buf = bytes(held) + buf
            else:
                pos = self._complete_held(buf, messages)
                if pos < 0:
                    return messages
            self._buffer = b""
        if self._expect_banner:
            pos = self._read_banner(buf)
            if pos < 0:
                self._buffer = buf
                return messages
        if pos == 0:
            plain = self._split_plain(buf)
            if plain is not None:
                return plain
        limit = self.max_message_size
        size = len(buf)
        follows_prefix = _FOLLOWS
        while pos < size:
            first = buf[pos]
            if first == 10 or first == 13:  # stray empty line between messages
                pos += 1
                continue
            if buf.startswith(follows_prefix, pos):
                end = self._end_of_follows(buf, pos)
                if end < 0:
                    break
                message = Message(buf[pos:end], follows=True)
            else:
                match = _END_OF_MESSAGE.search(buf, pos)
                if match is None:
                    break
                end = match.end()
                message = Message(buf[pos:end])
            if end - pos > limit:
                self._fail(f"message of {end - pos} bytes exceeds the limit of {limit}", messages)
            messages.append(message)
            pos = end
        if size - pos > limit:
            self._fail(
                f"unfinished message of over {limit} bytes (no empty line ends it)", messages
            )
        if pos < size:
            self._buffer = buf[pos:]
            self._scan, self._marker = 0, -1
        return messages

    def _split_plain(self, buf: bytes) -> list[Message] | None:
        """Frame a read in one C-level split, if the loop in :meth:`feed` would frame
        it the same way; else None.

        The split cuts at each ``\\n\\r?\\n``, exactly where the loop's search ends a
        message, as long as every message starts right after the previous one ends.
        So it gives way to the loop when a piece starts with a stray line end, or is
        empty (stray empty lines between messages), when a ``Response: Follows``
        reply may start here (its body holds empty lines), and near the size limit.
        """
        parts = _SPLIT_MESSAGES.split(buf)
        rest = parts.pop()
        bodies = parts[0::2]
        if bodies:
            try:
                firsts = bytes(map(_FIRST_BYTE, bodies))
            except IndexError:  # an empty piece: "\n\n\n"
                return None
            if b"\n" in firsts or b"\r" in firsts:
                return None
            if b"R" in firsts and _FOLLOWS in buf:
                return None
            # A terminator is at most 3 bytes; a message near the limit gets the
            # loop's exact check (and its error).
            if max(map(len, bodies)) + 3 > self.max_message_size:
                return None
        if len(rest) > self.max_message_size or rest[:1] in (b"\r", b"\n"):
            return None
        if rest:
            self._buffer = rest
            self._scan, self._marker = 0, -1
        return list(map(Message, map(bytes.__add__, bodies, parts[1::2])))

    def _complete_held(self, data: bytes, messages: list[Message]) -> int:
        """Add ``data`` to the large held message; if that completes it, append it
        to ``messages`` and return where the rest of ``data`` starts, else -1."""
        held = self._buffer
        if not isinstance(held, bytearray):
            held = self._buffer = bytearray(held)
        before = len(held)
        held += data
        follows = held.startswith(_FOLLOWS)  # held is long enough to tell
        end = self._end_of_held(held, follows)
        limit = self.max_message_size
        if end < 0:
            if len(held) > limit:
                self._fail(f"unfinished message of over {limit} bytes (no empty line ends it)")
            return -1
        if end > limit:
            self._fail(f"message of {end} bytes exceeds the limit of {limit}")
        messages.append(Message(bytes(held[:end]), follows=follows))
        self._scan, self._marker = 0, -1
        return end - before

    def _end_of_held(self, held: bytearray, follows: bool) -> int:
        """Like the framing in :meth:`feed`, but resuming where the last search stopped."""
        if follows and self._marker < 0:
            marker = held.find(_END_COMMAND_BYTES, self._scan)
            if marker < 0:
                self._scan = max(0, len(held) - len(_END_COMMAND_BYTES) + 1)
                return -1
            self._marker = self._scan = marker
        match = _END_OF_MESSAGE.search(held, self._scan)
        if match is None:
            # A terminator is at most 3 bytes: one may start in the last 2.
            self._scan = max(self._marker, len(held) - 2, 0)
            return -1
        return match.end()

    def _read_banner(self, buf: bytes) -> int:
        """Consume the banner line; return where messages start, or -1 to wait."""
        newline = buf.find(b"\n")
        if newline < 0 or newline > _MAX_BANNER:
            # Judged on the length alone, so that how the line was split into
            # reads never decides whether a long banner is accepted.
            if len(buf) > _MAX_BANNER:
                self._fail("no AMI banner: the first line is too long")
            return -1
        line = buf[:newline]
        match = _BANNER.match(line)
        if match is None:
            shown = decode(line[:80]).strip()
            self._fail(
                f"not an AMI server: expected 'Asterisk Call Manager/<version>', got {shown!r}"
            )
        self.banner = decode(line).strip()
        self.version = decode(match["version"])
        self._expect_banner = False
        return newline + 1

    @staticmethod
    def _end_of_follows(buf: bytes, pos: int) -> int:
        marker = buf.find(_END_COMMAND_BYTES, pos)
        if marker < 0:
            return -1
        match = _END_OF_MESSAGE.search(buf, marker)
        return match.end() if match is not None else -1

    def _fail(self, reason: str, messages: list[Message] | None = None) -> NoReturn:
        self._broken = reason
        self._buffer = b""
        raise ProtocolError(reason, messages)


HeaderValue = str | int | float
HeaderValues = Mapping[str, HeaderValue | Iterable[HeaderValue] | None]


def _check(text: str, what: str) -> str:
    if "\r" in text or "\n" in text:
        # Header injection: a CR or LF would let a value start a new header or
        # end the action early.
        raise ValueError(f"{what} {text!r} contains CR or LF, refused (AMI header injection)")
    return text


def _encode(headers: Iterable[tuple[str, HeaderValue]], max_line: int | None) -> bytes:
    parts: list[str] = []
    for name, value in headers:
        _check(name, "header name")
        if ":" in name or not name:
            raise ValueError(f"header name {name!r} is empty or contains ':'")
        text = _check(value if isinstance(value, str) else str(value), f"value of {name}")
        line = f"{name}: {text}\r\n"
        if max_line is not None and len(line.encode()) > max_line:
            raise ValueError(
                f"header {name} is {len(line.encode())} bytes; Asterisk reads at most "
                f"{max_line} bytes per line"
            )
        parts.append(line)
    parts.append("\r\n")
    return "".join(parts).encode()


def encode_message(headers: Iterable[tuple[str, HeaderValue]]) -> bytes:
    """Encode ``(name, value)`` pairs as one AMI message, CRLF line ends.

    Used for actions (client side) and for responses and events (the simulator).
    Refuses CR or LF anywhere and lines longer than Asterisk reads.
    """
    return _encode(headers, MAX_ACTION_LINE)


def encode_action(name: str, headers: HeaderValues | None = None, action_id: str = "") -> bytes:
    """Encode an action; a list value becomes a repeated header, ``None`` is left out."""
    pairs: list[tuple[str, HeaderValue]] = [("Action", name)]
    if action_id:
        pairs.append(("ActionID", action_id))
    for key, value in (headers or {}).items():
        if value is None:
            continue
        if isinstance(value, str | int | float):
            pairs.append((key, value))
        else:
            pairs.extend((key, item) for item in value)
    return encode_message(pairs)
