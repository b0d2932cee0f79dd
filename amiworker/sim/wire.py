"""How the simulated PBX reads an action and shapes a reply, as manager.c does.

Asterisk reads an action's headers leniently (``Name:value`` and
``Name: value`` alike, names in any case, the first of a repeated header wins)
and writes replies as ``Response: <status>``, then ``ActionID`` only if the
action carried one, then the rest, then an empty line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from amiworker.ami.message import Message

if TYPE_CHECKING:
    from amiworker.sim.pbx import FakePBX
    from amiworker.sim.session import AMISession


class Action:
    """One action from a client: its headers in order, read as Asterisk reads them."""

    __slots__ = ("action_id", "headers", "name")

    def __init__(self, message: Message) -> None:
        headers: list[tuple[str, str]] = []
        for line in message.text.replace("\r\n", "\n").split("\n"):
            name, sep, value = line.partition(":")
            if sep and name.strip():
                # astman_get_header skips the blanks after the colon.
                headers.append((name.strip(), value.lstrip(" \t")))
        self.headers = headers
        self.name = self.get("Action")
        self.action_id = self.get("ActionID")

    def get(self, name: str) -> str:
        """The first value of header ``name`` (any case), or ``""`` as Asterisk gives."""
        key = name.lower()
        for header, value in self.headers:
            if header.lower() == key:
                return value
        return ""

    def getall(self, name: str) -> list[str]:
        key = name.lower()
        return [value for header, value in self.headers if header.lower() == key]

    def __repr__(self) -> str:
        # Never the headers: a Login carries the secret.
        return f"<Action {self.name!r} ActionID={self.action_id!r}>"


def _id_line(action: Action) -> str:
    return f"ActionID: {action.action_id}\r\n" if action.action_id else ""


def response(action: Action, status: str, *headers: tuple[str, str]) -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return f"Response: {status}\r\n{_id_line(action)}{lines}\r\n".encode()


def ack(action: Action, message: str) -> bytes:
    return response(action, "Success", ("Message", message))


def error(action: Action, message: str) -> bytes:
    return response(action, "Error", ("Message", message))


def list_ack(action: Action, message: str) -> bytes:
    """The reply that opens an EventList (astman_send_listack)."""
    return response(action, "Success", ("EventList", "start"), ("Message", message))


def item(action: Action, event: str, body: str) -> bytes:
    """One EventList item: the ActionID right after the event name, no Privilege."""
    return f"Event: {event}\r\n{_id_line(action)}{body}\r\n".encode()


def list_complete(action: Action, event: str, count: int, extra: str = "") -> bytes:
    """The event that closes an EventList (astman_send_list_complete_start/end)."""
    return (
        f"Event: {event}\r\n{_id_line(action)}EventList: Complete\r\n"
        f"ListItems: {count}\r\n{extra}\r\n"
    ).encode()


#: An action's handler: it writes the reply (and raises any events) itself.
Handler = Callable[["FakePBX", "AMISession", Action], Awaitable[None]]


def registrar(table: dict[str, Handler]) -> Callable[[str], Callable[[Handler], Handler]]:
    """A decorator that files handlers in ``table`` under their action name, any case."""

    def action(name: str) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            table[name.lower()] = handler
            return handler

        return register

    return action
