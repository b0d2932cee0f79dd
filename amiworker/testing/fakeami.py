"""A recording stand-in for the AMI connection a handler gets as ``ctx.ami``.

:class:`RecordingAMI` offers what :class:`~amiworker.ami.connection.Connection`
offers a handler (``action()`` and every typed helper: ``originate``,
``redirect``, ``command``, ``set_var``, ``status``...), because it is the same
:class:`~amiworker.ami.actions.ActionHelpers` over another transport: nothing
goes anywhere, every action is recorded, and each is answered from a table the
test fills, ``Response: Success`` by default::

    ami = harness.ami
    ami.answer("Redirect", response="Error", Message="Channel not found")
    ami.answer("Command", Output=["Asterisk 22.10.1 built by root"])
    ...
    assert [a["Channel"] for a in ami.actions("Redirect")] == ["PJSIP/100-00000001"]

Actions are encoded as the real client encodes them (a CR or LF in a header is
refused with ValueError before anything is "sent"). An ``originate`` with no
answer set gets an ``OriginateResponse`` event saying Success, as Asterisk sends.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

from amiworker.ami.actions import ActionHelpers
from amiworker.ami.message import Message
from amiworker.ami.protocol import HeaderValues, encode_action
from amiworker.ami.response import Response
from amiworker.testing.events import HeaderInput, encode_event, make_event

__all__ = ["RUNNING", "RecordingAMI", "SentAction"]


@dataclass(frozen=True, slots=True)
class SentAction(Mapping[str, str]):
    """One action a handler sent: its headers as they would go on the wire.

    A read-only, case-insensitive mapping (``action["channel"]``), like a Message.
    """

    name: str
    #: The action's bytes, parsed: ``Action``, ``ActionID``, then the headers given.
    message: Message
    #: ``ctx.event_id`` of the handler run that sent it (None outside a run or for a
    #: local event), and the event's name.
    event_id: str | None = None
    event_name: str | None = None

    def __getitem__(self, name: str) -> str:
        return self.message[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.message)

    def __len__(self) -> int:
        return len(self.message)

    def getall(self, name: str) -> list[str]:
        return self.message.getall(name)

    def __repr__(self) -> str:
        headers = ", ".join(
            f"{name}={value!r}"
            for name, value in self.message.headers
            if name.lower() not in ("action", "actionid")
        )
        return f"<SentAction {self.name} {headers}>"


@dataclass(slots=True)
class _Answer:
    response: str
    headers: list[tuple[str, str]]
    events: tuple[Message, ...]
    raises: BaseException | None


#: ``(ctx.event_id, event name)`` of the handler run in progress, set by the harness;
#: a context variable, so a plain handler's thread sees it too (invoke copies the context).
RUNNING: ContextVar[tuple[str | None, str | None]] = ContextVar(
    "amiworker_testing_running", default=(None, None)
)


class RecordingAMI(ActionHelpers):
    """Records every action; answers from :meth:`answer`'s table, else ``Success``."""

    def __init__(
        self, name: str = "pbx1", *, action_timeout: float = 10.0, ami_version: str = "11.0.0"
    ) -> None:
        self.name = name
        self.host = "127.0.0.1"
        self.port = 5038
        self.action_timeout = action_timeout
        self.ami_version = ami_version
        self._sent: list[SentAction] = []
        self._answers: dict[str, _Answer] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # plain handlers run in threads

    @property
    def is_open(self) -> bool:
        return True

    # -- the table of answers --------------------------------------------------------------

    def answer(
        self,
        action: str,
        *,
        response: str = "Success",
        events: Sequence[Message] = (),
        raises: BaseException | None = None,
        **headers: HeaderInput,
    ) -> None:
        """Answer every later ``action`` (any case) with this reply.

        ``response``: the ``Response`` header (``Success``, ``Error``...);
        ``headers``: more reply headers (underscores become hyphens, a list is a
        repeated header: ``Output=["line 1", "line 2"]``); ``events``: the events
        that answer it (an EventList's items, Originate's ``OriginateResponse``);
        ``raises``: an exception to raise instead (``ActionTimeout``,
        ``ConnectionFinished``...), as the real connection would.
        """
        pairs: list[tuple[str, str]] = []
        for key, value in headers.items():
            name = key.replace("_", "-")
            if value is None:
                continue
            if isinstance(value, str | int | float):
                pairs.append((name, str(value)))
            else:
                pairs += [(name, str(item)) for item in value]
        with self._lock:
            self._answers[action.lower()] = _Answer(response, pairs, tuple(events), raises)

    def fork(self) -> RecordingAMI:
        """A new stand-in with the same answers and nothing sent yet."""
        other = RecordingAMI(
            self.name, action_timeout=self.action_timeout, ami_version=self.ami_version
        )
        with self._lock:
            other._answers = dict(self._answers)
        return other

    # -- what was sent ---------------------------------------------------------------------------

    def actions(self, name: str | None = None) -> list[SentAction]:
        """Every action sent so far, in order; only those named ``name`` (any case) if given."""
        with self._lock:
            sent = list(self._sent)
        if name is None:
            return sent
        return [action for action in sent if action.name.lower() == name.lower()]

    def clear(self) -> None:
        """Forget the actions sent (the table of answers stays)."""
        with self._lock:
            self._sent.clear()

    # -- the transport ------------------------------------------------------------------------

    async def _request(
        self,
        name: str,
        headers: HeaderValues | None,
        *,
        timeout: float | None,
        answer_event: str | None = None,
    ) -> Response:
        with self._lock:
            action_id = f"harness-{next(self._ids)}"
            # Encoded as the real client encodes it: refuses CR/LF before "sending".
            raw = encode_action(name, headers, action_id)
            event_id, event_name = RUNNING.get()
            self._sent.append(SentAction(name, Message(raw), event_id, event_name))
            answer = self._answers.get(name.lower())
        if answer is None:
            answer = _Answer("Success", [], (), None)
        if answer.raises is not None:
            raise answer.raises
        reply = Message(
            encode_event([("Response", answer.response), ("ActionID", action_id), *answer.headers])
        )
        events = answer.events
        if not events and answer_event and reply.name.lower() == "success":
            events = (self._answer_event(answer_event, action_id, Message(raw)),)
        return Response(reply, action=name, events=events)

    def _answer_event(self, event: str, action_id: str, action: Message) -> Message:
        """The event Asterisk sends when an asynchronous action (Originate) succeeds."""
        return make_event(
            event,
            ActionID=action_id,
            Response="Success",
            Channel=action.get("Channel"),
            Context=action.get("Context"),
            Exten=action.get("Exten"),
            Reason="4",  # AST_CONTROL_ANSWER: answered
            Uniqueid="<unknown>",
            CallerIDNum=action.get("CallerID") or "<unknown>",
            CallerIDName="<unknown>",
        )

    def __repr__(self) -> str:
        return f"<RecordingAMI {self.name}: {len(self._sent)} action(s) sent>"
