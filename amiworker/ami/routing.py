"""Which pending action each incoming message answers: ActionID correlation, no I/O.

A :class:`~amiworker.ami.connection.Connection` registers each action it sends
(:meth:`ActionRouter.expect`) and hands every message its reader parses to
:meth:`ActionRouter.route`, synchronously. The router completes the action's
future once its answer is whole and passes every event that is an event to
the caller's ``deliver(message, own_action)``.

Routing of events that carry an ActionID (documented contract):

* items of a pending EventList, and its ``<X>Complete`` event, belong to the
  reply (``Response.events`` / ``complete_event``) and are NOT delivered as
  events: they are unicast to this session, other sessions never see them;
* any other event whose ActionID is a pending action of this session (e.g. the
  ``OriginateResponse`` of our own Originate) completes that action if it is
  its answer, and IS delivered, with ``own_action=True``;
* every other event, including broadcasts that carry another session's
  ActionID (``UserEvent``), or ours after the action completed, is ordinary:
  ``own_action=False``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable

from amiworker.ami.message import Message
from amiworker.ami.response import Response

__all__ = ["ActionRouter", "PendingAction"]

log = logging.getLogger("amiworker.ami.connection")

# Timed-out or cancelled actions remembered, so their late replies are dropped quietly.
_ABANDONED_KEPT = 1024


class PendingAction:
    """An action sent and not yet completely answered."""

    __slots__ = (
        "action",
        "answer_event",
        "answered",
        "complete_event",
        "events",
        "future",
        "listing",
        "reply",
    )

    def __init__(self, action: str, answer_event: str | None, future: asyncio.Future[Response]):
        self.action = action
        self.answer_event = answer_event.lower() if answer_event else None
        self.future = future
        self.reply: Message | None = None
        self.listing = False  # the reply said "EventList: start"
        self.answered = False  # the answer_event has come
        self.events: list[Message] = []
        self.complete_event: Message | None = None


def _eventlist(message: Message) -> str:
    return (message.get("EventList") or "").lower()


def _is_ok(message: Message) -> bool:
    return message.name.lower() in ("success", "goodbye", "follows")


class ActionRouter:
    """The actions of one session awaiting their answers, and the routing of what comes in."""

    def __init__(self, where: str, deliver: Callable[[Message, bool], None]) -> None:
        self._where = where
        self._deliver = deliver
        self._pending: dict[str, PendingAction] = {}
        self._abandoned: OrderedDict[str, PendingAction] = OrderedDict()

    def expect(self, action_id: str, action: str, answer_event: str | None) -> PendingAction:
        """Register an action about to be sent; its ``future`` gets the :class:`Response`.

        Complete means: the reply, plus (if it says ``EventList: start``) the
        event with ``EventList: Complete``, plus (if ``answer_event`` is given
        and the reply is a success) the event of that name with this ActionID.
        """
        pending = PendingAction(action, answer_event, asyncio.get_running_loop().create_future())
        self._pending[action_id] = pending
        return pending

    def abandon(self, action_id: str) -> None:
        """The caller gave up on an action (timeout, cancellation, error): its late
        answers are recognised and dropped, not taken for events."""
        pending = self._pending.pop(action_id, None)
        if pending is not None:
            self._abandoned[action_id] = pending
            while len(self._abandoned) > _ABANDONED_KEPT:
                self._abandoned.popitem(last=False)

    def fail_all(self, error: Callable[[str], BaseException]) -> None:
        """Fail every pending action with ``error(action_name)`` (the session ended)."""
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if not entry.future.done():
                entry.future.set_exception(error(entry.action))

    def route(self, message: Message) -> None:
        kind = message.kind
        if kind == "event":
            if self._pending or self._abandoned:
                action_id = message.action_id
                if action_id is not None:
                    self._route_event_with_id(message, action_id)
                    return
            self._deliver(message, False)
        elif kind == "response":
            self._route_reply(message)
        else:
            log.debug("%s: ignored a message that is neither event nor response", self._where)

    def _route_reply(self, message: Message) -> None:
        action_id = message.action_id or ""
        pending = self._pending.get(action_id)
        if pending is None:
            late = self._abandoned.get(action_id)
            if late is not None:
                late.listing = _eventlist(message) == "start"
            log.debug("%s: dropped a reply to no pending action (%s)", self._where, action_id)
            return
        pending.reply = message
        if not _is_ok(message):
            self._complete(action_id, pending)  # an error reply is complete at once
        elif _eventlist(message) == "start":
            pending.listing = True
        elif pending.answer_event is None or pending.answered:
            self._complete(action_id, pending)

    def _route_event_with_id(self, message: Message, action_id: str) -> None:
        pending = self._pending.get(action_id)
        if pending is not None:
            if pending.listing:
                if _eventlist(message) == "complete":
                    pending.complete_event = message
                    self._complete(action_id, pending)
                else:
                    pending.events.append(message)
                return  # list items are part of the reply, not events
            if pending.answer_event == message.name.lower() and not pending.answered:
                pending.answered = True
                pending.events.append(message)
                if pending.reply is not None:
                    self._complete(action_id, pending)
            self._deliver(message, True)
            return
        late = self._abandoned.get(action_id)
        if late is not None and late.listing:
            log.debug("%s: dropped a late list item of %s", self._where, late.action)
            return
        self._deliver(message, late is not None)

    def _complete(self, action_id: str, pending: PendingAction) -> None:
        # Removed now, not when the caller resumes: an event right behind the reply
        # with the same ActionID (UserEvent) is then an ordinary event.
        del self._pending[action_id]
        if not pending.future.done() and pending.reply is not None:
            pending.future.set_result(
                Response(
                    pending.reply,
                    action=pending.action,
                    events=pending.events,
                    complete_event=pending.complete_event,
                )
            )
