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
from collections.abc import Iterable, Iterator, Mapping
from operator import itemgetter
from typing import Literal, NoReturn

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "MAX_ACTION_LINE",
    "Message",
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
_END_COMMAND = "--END COMMAND--"
_END_COMMAND_BYTES = _END_COMMAND.encode()
_BANNER = re.compile(rb"^(?P<product>[^/\r\n]*Call Manager[^/\r\n]*)/(?P<version>[^\s]+)\s*$")
# Headers that may precede the raw body of a "Response: Follows" reply.
_FOLLOWS_HEADERS = frozenset({"response", "privilege", "actionid"})


class _LowerCased(dict[str, str]):
    """Header names, lower-cased once: a few dozen names make up all of AMI, and a
    dict lookup costs less than lowering the same name in every message. The
    lower-cased strings are shared, so they also hash once and take no memory
    per message."""

    __slots__ = ()
    _LIMIT = 4096  # a peer inventing names only ever costs this much

    def __missing__(self, name: str) -> str:
        if len(self) >= self._LIMIT:
            self.clear()
        lowered = self[name] = name.lower()
        return lowered


_lower = _LowerCased().__getitem__
_FIRST_BYTE = itemgetter(0)


_Part = tuple[str, str, str]  # a line's str.partition(": "): name, separator, value
_SEPARATOR = itemgetter(1)
_COLON_SPACE = frozenset({": "})


def _index_of(parts: list[_Part]) -> dict[str, str]:
    """Lower-cased name -> value (the last of a repeat wins)."""
    return {_lower(name): value for name, _, value in parts}


MessageKind = Literal["event", "response", "unknown"]


class ProtocolError(Exception):
    """The peer sent something that is not AMI, or a message over the size limit.

    ``messages`` holds the complete messages parsed from the same input before
    the fault, so a caller can still deliver them before closing the session.
    """

    def __init__(self, reason: str, messages: list[Message] | None = None) -> None:
        super().__init__(reason)
        self.messages: list[Message] = messages or []


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # Keep every byte visible (as \\xNN) rather than dropping or raising:
        # the exact bytes stay available in Message.raw.
        return raw.decode("utf-8", "backslashreplace")


class Message(Mapping[str, str]):
    """One AMI message: a read-only, case-insensitive mapping of its headers.

    ``m["uniqueid"]`` gives the first value of that header; ``m.getall(name)``
    gives every value of a repeated header (``Variable``, ``Output``...) in
    order. Values are exactly as sent. ``raw`` is the exact bytes received.
    """

    __slots__ = (
        "_extra",
        "_follows",
        "_headers",
        "_index",
        "_name",
        "_output",
        "_parts",
        "_repeated",
        "raw",
    )

    # Set by _parse, and only read after it.
    _parts: list[_Part]
    _extra: tuple[str, ...]
    _output: tuple[str, ...]
    _repeated: bool

    def __init__(self, raw: bytes, *, follows: bool = False) -> None:
        self.raw = raw
        self._follows = follows
        # The index is built on first access (most events only ever need their name,
        # and a worker that loses a race only needs the document); the (name, value)
        # tuple on first access to ``headers``.
        self._index: dict[str, str] | None = None
        self._headers: tuple[tuple[str, str], ...] | None = None
        self._name: str | None = None

    # -- parsing, on first access -------------------------------------------------

    def _parse(self) -> dict[str, str]:
        text = _decode(self.raw)
        lines = text.split("\r\n")
        if text.count("\n") != len(lines) - 1:
            # Some line ends are a bare LF: normalise, then split again.
            lines = text.replace("\r\n", "\n").split("\n")
        while lines and not lines[-1]:
            lines.pop()
        self._output = ()
        if self._follows:
            lines = self._split_follows(lines)
        parts = [line.partition(": ") for line in lines]
        self._extra = ()
        if not _COLON_SPACE.issuperset(map(_SEPARATOR, parts)):
            parts = self._odd_lines(parts)
        index = _index_of(parts)
        self._repeated = len(index) != len(parts)
        if self._repeated:
            index = _index_of(parts[::-1])  # so that the first value of a repeat wins
        self._parts = parts
        self._index = index
        return index

    def _odd_lines(self, parts: list[_Part]) -> list[_Part]:
        """The headers among lines that are not all ``Name: value``; keep the rest."""
        headers: list[_Part] = []
        extra: list[str] = []
        for part in parts:
            name, sep, _ = part
            if sep:
                headers.append(part)
            elif name.endswith(":"):  # "Name:" with an empty value and no space
                headers.append((name[:-1], ": ", ""))
            elif name:
                extra.append(name)
        self._extra = tuple(extra)
        return headers

    def _split_follows(self, lines: list[str]) -> list[str]:
        """Split a ``Response: Follows`` reply; return its header lines.

        The body is raw CLI text: it may hold empty lines and ``: ``, so it
        becomes ``output`` and is never read as headers.
        """
        count = 0
        for line in lines:
            name, sep, _ = line.partition(": ")
            if not sep or name.lower() not in _FOLLOWS_HEADERS:
                break
            count += 1
        output: list[str] = []
        for line in lines[count:]:
            if line.endswith(_END_COMMAND):
                rest = line[: -len(_END_COMMAND)]
                if rest:
                    output.append(rest)
                break
            output.append(line)
        self._output = tuple(output)
        return lines[:count]

    # -- the Mapping protocol ---------------------------------------------------------

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """Every header as ``(name, value)`` in the order sent, repeated ones included."""
        headers = self._headers
        if headers is None:
            if self._index is None:
                self._parse()
            headers = self._headers = tuple([(name, value) for name, _, value in self._parts])
        return headers

    def header_dict(self) -> dict[str, str | list[str]]:
        """Every header in a new dict: names lower-cased, values as sent, in the order
        first sent; a repeated header maps to the list of its values, in order.

        The shape of a stored event's ``headers`` (see DESIGN.md), made from the
        index that parsing built anyway.
        """
        index = self._index
        if index is None:
            index = self._parse()
        if not self._repeated:
            return dict(index)  # no repeats: the index is in the order sent
        result: dict[str, str | list[str]] = {}
        for name, _, value in self._parts:
            key = _lower(name)
            previous = result.get(key)
            if previous is None:
                result[key] = value
            elif isinstance(previous, list):
                previous.append(value)
            else:
                result[key] = [previous, value]
        return result

    def __getitem__(self, name: str) -> str:
        index = self._index
        if index is None:
            index = self._parse()
        return index[_lower(name)]

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        index = self._index
        if index is None:
            index = self._parse()
        return index.get(_lower(name), default)

    def __contains__(self, name: object) -> bool:
        index = self._index
        if index is None:
            index = self._parse()
        return isinstance(name, str) and _lower(name) in index

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for name, _ in self.headers:
            key = name.lower()
            if key not in seen:
                seen.add(key)
                yield name

    def __len__(self) -> int:
        index = self._index
        if index is None:
            index = self._parse()
        return len(index)

    def getall(self, name: str) -> list[str]:
        """Every value of header ``name`` (any case), in the order sent."""
        key = name.lower()
        return [value for header, value in self.headers if header.lower() == key]

    # -- what a message is ------------------------------------------------------------

    @property
    def kind(self) -> MessageKind:
        raw = self.raw
        if raw.startswith(b"Event: "):
            return "event"
        if raw.startswith(b"Response: "):
            return "response"
        # Unusual first header: fall back to a full parse.
        if "event" in self:
            return "event"
        if "response" in self:
            return "response"
        return "unknown"

    @property
    def name(self) -> str:
        """The Event name of an event, the Response value of a response, else ``""``."""
        name = self._name
        if name is None:
            # Read on every hop of an event (race, document, handlers): worth keeping.
            name = self._name = self._read_name()
        return name

    def _read_name(self) -> str:
        raw = self.raw
        if raw.startswith(b"Event: ") or raw.startswith(b"Response: "):
            # Fast path: the first line, without parsing the rest.
            start = raw.index(b": ") + 2
            end = raw.find(b"\n", start)
            line = raw[start:end] if end >= 0 else raw[start:]
            return _decode(line.rstrip(b"\r"))
        return self.get("Event") or self.get("Response") or ""

    @property
    def action_id(self) -> str | None:
        return self.get("ActionID")

    @property
    def output(self) -> list[str]:
        """Command output lines, from ``Output:`` headers or a ``Follows`` body."""
        if self._index is None:
            self._parse()
        if self._follows:
            return list(self._output)
        return self.getall("Output")

    @property
    def extra_lines(self) -> tuple[str, ...]:
        """Lines that had no ``Name: value`` shape; kept, never dropped."""
        if self._index is None:
            self._parse()
        return self._extra

    @property
    def text(self) -> str:
        return _decode(self.raw)

    @classmethod
    def from_headers(cls, headers: Iterable[tuple[str, HeaderValue]]) -> Message:
        """Build a message from ``(name, value)`` pairs (e.g. rebuilt from a stored event)."""
        return cls(_encode(headers, max_line=None))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Message):
            return self.raw == other.raw
        return super().__eq__(other)

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"<Message {self.kind} {self.name!r} {len(self.raw)} bytes>"


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
            shown = _decode(line[:80]).strip()
            self._fail(
                f"not an AMI server: expected 'Asterisk Call Manager/<version>', got {shown!r}"
            )
        self.banner = _decode(line).strip()
        self.version = _decode(match["version"])
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
