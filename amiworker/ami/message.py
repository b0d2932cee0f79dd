"""One AMI message: its exact bytes, and its headers read lazily from them.

A worker that only needs the raw bytes (to hash them) or the event name pays
for nothing else. Reading one header (``Uniqueid``, ``ActionID``...) searches
the raw bytes for its line; the header index of all of them is built only when
that search cannot be sure of the answer, or when something needs every header.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from enum import Enum
from operator import itemgetter
from typing import Literal

__all__ = ["Message", "MessageKind", "decode"]

_END_COMMAND = "--END COMMAND--"
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


_Part = tuple[str, str, str]  # a line's str.partition(": "): name, separator, value
_SEPARATOR = itemgetter(1)
_COLON_SPACE = frozenset({": "})


def _index_of(parts: list[_Part]) -> dict[str, str]:
    """Lower-cased name -> value (the last of a repeat wins)."""
    return {_lower(name): value for name, _, value in parts}


MessageKind = Literal["event", "response", "unknown"]


# -- one header from the raw bytes ------------------------------------------------------
#
# The full parse decodes the message, splits it into lines at "\n" (one "\r" before it
# dropped), takes each line's name up to its first ": " (or a whole line "Name:" as an
# empty value), and keeps the first value of each lower-cased name. One regular
# expression on the raw bytes finds that same first line, without parsing the others:
#
# * a name made of ASCII letters, digits, "-" and "_" (every AMI header name) cannot
#   hold ": ", so a line that starts with it, in any case, then ": " has exactly that
#   name, and so has a whole line of it and ":" ("\r\n", "\n" or the end after it);
# * a bytes pattern ignores ASCII case only, and no other line can have that name:
#   among all of Unicode only A-Z and the KELVIN SIGN (U+212A, to "k") lower to an
#   ASCII letter (U+0130 lowers to two characters, one not ASCII), and an undecodable
#   byte becomes "\\xNN", which holds a backslash. A message with a KELVIN SIGN is
#   left to the full parse when the name has a "k";
# * the value runs to the next "\n" (without the "\r" before it), and only those bytes
#   are decoded: a UTF-8 error never spans an ASCII byte, so they decode as they would
#   within the whole message.
#
# A "Response: Follows" reply (its body is not headers) and a name these rules do not
# cover are left to the full parse.


class _Search(Enum):
    PARSE = 0  # only the full parse can tell: build the index


_PARSE = _Search.PARSE
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_KELVIN = "\u212a".encode()
_Find = Callable[[bytes], "re.Match[bytes] | None"]
# What follows "Name:" on a header line: " " and the value (captured), or the line's end
# (an empty value). The value runs to the line's end, less a "\r" right before the "\n".
_VALUE = rb"(?: |(?=\r?\n|\Z))([^\r\n]*(?:\r+(?!\n)[^\r\n]*)*)"


class _Spec:
    """The search for one header name, made once per name."""

    __slots__ = ("first", "firsts", "kelvin", "later")

    def __init__(self, name: str) -> None:
        lowered = name.lower().encode("ascii")
        line = b"(?i:" + re.escape(lowered) + b"):" + _VALUE
        #: On the first line, and on the lines after it ("\n" makes the search fast).
        self.first: _Find = re.compile(line).match
        self.later: _Find = re.compile(b"\n" + line).search
        #: What the message must start with for its first line to be one.
        self.firsts = frozenset((lowered[:1], lowered[:1].upper()))
        self.kelvin = b"k" in lowered


class _Specs(dict[str, "_Spec | None"]):
    """Header name -> its search, or None when only the full parse can answer."""

    __slots__ = ()
    # A caller inventing names only ever costs this much (about 2 kB a name); AMI
    # has a few hundred header names, and a program reads a few dozen of them.
    _LIMIT = 1024

    def __missing__(self, name: str) -> _Spec | None:
        if len(self) >= self._LIMIT:
            self.clear()
        ok = isinstance(name, str) and name.isascii() and _TOKEN.fullmatch(name) is not None
        spec = self[name] = _Spec(name) if ok else None
        return spec


_spec_of = _Specs().__getitem__

# The usual first line, whose value is the message's name.
_FIRST_NAME = re.compile(rb"(?:Event|Response): ([^\n]*)").match


def decode(raw: bytes) -> str:
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
        text = decode(self.raw)
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

        The shape of a stored event's ``headers`` (see the README, "The document"), made from the
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

    def _search(self, name: str) -> str | _Search | None:
        """The first value of header ``name`` from the raw bytes (see "one header from
        the raw bytes" above); None if it is absent; ``_PARSE`` if only the full parse
        can tell."""
        spec = _spec_of(name)
        if spec is None or self._follows:
            return _PARSE
        raw = self.raw
        if spec.kelvin and not raw.isascii() and _KELVIN in raw:
            return _PARSE
        found = None
        if raw[:1] in spec.firsts:
            found = spec.first(raw)
        if found is None:
            found = spec.later(raw)
            if found is None:
                return None
        value = found[1]
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("utf-8", "backslashreplace")

    def __getitem__(self, name: str) -> str:
        index = self._index
        if index is None:
            found = self._search(name)
            if found is None:
                raise KeyError(name)
            if found is not _PARSE:
                return found
            index = self._parse()
        return index[_lower(name)]

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        index = self._index
        if index is None:
            # _search, inlined: the worker reads a header or two of every message this way.
            spec = _spec_of(name)
            raw = self.raw
            if (
                spec is not None
                and not self._follows
                and (not spec.kelvin or raw.isascii() or _KELVIN not in raw)
            ):
                found = None
                if raw[:1] in spec.firsts:
                    found = spec.first(raw)
                if found is None:
                    found = spec.later(raw)
                    if found is None:
                        return default
                value = found[1]
                try:
                    return value.decode("utf-8")
                except UnicodeDecodeError:
                    return value.decode("utf-8", "backslashreplace")
            index = self._parse()
        return index.get(_lower(name), default)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        index = self._index
        if index is None:
            found = self._search(name)
            if found is not _PARSE:
                return found is not None
            index = self._parse()
        return _lower(name) in index

    def __len__(self) -> int:
        index = self._index
        if index is None:
            index = self._parse()
        return len(index)

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for name, _ in self.headers:
            key = name.lower()
            if key not in seen:
                seen.add(key)
                yield name

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
        # Unusual first header: search the other lines.
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
            found = _FIRST_NAME(self.raw)
            if found is not None:
                # The first line, without parsing the rest.
                line = found[1].rstrip(b"\r")
                try:
                    name = line.decode("utf-8")
                except UnicodeDecodeError:
                    name = line.decode("utf-8", "backslashreplace")
            else:
                name = self.get("Event") or self.get("Response") or ""
            self._name = name
        return name

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
        return decode(self.raw)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Message):
            return self.raw == other.raw
        return super().__eq__(other)

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"<Message {self.kind} {self.name!r} {len(self.raw)} bytes>"
