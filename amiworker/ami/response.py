"""The complete answer to one AMI action: its reply, plus the events that belong to it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from amiworker.ami.message import Message

__all__ = ["Response"]

_OK = frozenset({"success", "goodbye", "follows"})


class Response(Mapping[str, str]):
    """The complete answer to one action. Read-only.

    Header access is case-insensitive, as on :class:`~amiworker.ami.protocol.Message`:
    ``resp["Ping"]``, ``resp.get("Timestamp")``, ``resp.getall("Output")``.
    ``events`` are the events that answered this action: the items of an
    EventList (without its ``<X>Complete`` event, which is ``complete_event``),
    or the ``OriginateResponse`` of an asynchronous Originate.
    """

    __slots__ = ("_action", "_complete_event", "_events", "_message")

    def __init__(
        self,
        message: Message,
        *,
        action: str = "",
        events: Sequence[Message] = (),
        complete_event: Message | None = None,
    ) -> None:
        self._message = message
        self._action = action
        self._events = tuple(events)
        self._complete_event = complete_event

    @property
    def ok(self) -> bool:
        """True for ``Response: Success``, ``Goodbye`` (Logoff) and ``Follows`` (old Command)."""
        return self._message.name.lower() in _OK

    @property
    def name(self) -> str:
        """The ``Response`` value as sent: ``Success``, ``Error``, ``Goodbye``, ``Follows``."""
        return self._message.name

    @property
    def message(self) -> str:
        """The ``Message`` header, ``""`` when absent."""
        return self._message.get("Message") or ""

    @property
    def action(self) -> str:
        """The name of the action this answers."""
        return self._action

    @property
    def action_id(self) -> str | None:
        return self._message.action_id

    @property
    def message_obj(self) -> Message:
        """The reply as parsed by the protocol layer."""
        return self._message

    @property
    def raw(self) -> bytes:
        """The exact bytes of the reply (not of its events)."""
        return self._message.raw

    @property
    def events(self) -> list[Message]:
        return list(self._events)

    @property
    def complete_event(self) -> Message | None:
        return self._complete_event

    @property
    def output(self) -> list[str]:
        """Command output lines: ``Output:`` headers (AMI >= 3) or a ``Follows`` body."""
        return self._message.output

    def getall(self, name: str) -> list[str]:
        return self._message.getall(name)

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return self._message.get(name, default)

    def __getitem__(self, name: str) -> str:
        return self._message[name]

    def __contains__(self, name: object) -> bool:
        return name in self._message

    def __iter__(self) -> Iterator[str]:
        return iter(self._message)

    def __len__(self) -> int:
        return len(self._message)

    def __repr__(self) -> str:
        shown = f" {self.message!r}" if self.message else ""
        items = f" +{len(self._events)} events" if self._events else ""
        return f"<Response {self.name} to {self._action or '?'}{shown}{items}>"
