"""Simulated calls: channels, a small dialplan interpreter, and the events they raise.

A call is what the capture server did for ``Originate Channel=Local/100@test
Context=test Exten=200 Async=true``: a Local channel pair where ``;2`` runs
``test,100`` and ``;1``, once answered, runs ``test,200``. The events, their
order, their header names and the id relations (``Uniqueid``, ``Linkedid``,
``LocalOneUniqueid``, ``DestUniqueid``...) are those of
``tests/fixtures/asterisk22-20-calls.txt``: 39 events per call when the
Originate carries two variables and a caller id, as the capture's did.

Timing is scaled: one dialplan second (``Wait(1)``) lasts ``call_duration``
seconds, and ``Answer()`` on the ringing ``;2`` leg waits half of that for
media, as it did in the capture.

Every event is formatted here exactly once into bytes; the server writes those
same bytes to every session (the dedup key of the workers relies on it).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from amiworker.sim.channel import (
    CAUSE_TEXT,
    NORMAL_CLEARING,
    RING,
    UP,
    Dialplan,
    SimChannel,
    Step,
    parse_caller_id,
    timestamp,
)

#: Dialplan seconds ``Answer()`` spends waiting for media on a ringing Local channel.
ANSWER_MEDIA_WAIT = 0.5
#: Reason code of a successful OriginateResponse (AST_CONTROL_ANSWER).
REASON_ANSWERED = 4
CALLING_PRES = "0 (Presentation Allowed, Not Screened)"

#: Receives each formatted event and its class ("call", "dialplan", ...).
EventSink = Callable[[bytes, str], None]


@dataclass(slots=True)
class OriginateRequest:
    """The parts of an Originate action the simulator acts on."""

    channel: str
    context: str
    exten: str
    priority: int = 1
    variables: list[tuple[str, str]] = field(default_factory=list)
    caller_id: str | None = None
    action_id: str | None = None
    channel_id: str | None = None
    other_channel_id: str | None = None
    async_: bool = True


@dataclass(eq=False, slots=True)
class _Leg:
    chan: SimChannel
    steps: list[Step]
    pc: int = 0  # index of the next step; its priority is pc + 1
    wake: int = 0  # bumped to cancel a pending resume (hangup, redirect)
    paused: bool = False


@dataclass(eq=False, slots=True)
class SimCall:
    one: _Leg  # ";1": the originated channel, runs the Originate destination
    two: _Leg  # ";2": runs Local/<exten>@<context>
    request: OriginateRequest
    dial_string: str
    ended: bool = False

    @property
    def linkedid(self) -> str:
        return self.one.chan.linkedid

    def leg_of(self, chan: SimChannel) -> _Leg:
        return self.one if self.one.chan is chan else self.two

    def other(self, leg: _Leg) -> _Leg:
        return self.two if leg is self.one else self.one


class CallEngine:
    """Channels and calls of one simulated PBX, and the events they raise.

    Single-threaded and clock-driven: the server calls :meth:`run_due` whenever
    :meth:`next_due` has passed, and everything due runs then, in one batch.
    """

    def __init__(
        self,
        *,
        name: str,
        sink: EventSink,
        clock: Callable[[], float],
        wakeup: Callable[[], None],
        dialplan: Dialplan,
        call_duration: float = 1.0,
        timestamp_events: bool = True,
    ) -> None:
        self.name = name
        self.dialplan = dialplan
        self.call_duration = call_duration
        self.timestamp_events = timestamp_events
        self.channels: dict[str, SimChannel] = {}  # live channels, oldest first
        self.calls_started = 0
        self.calls_completed = 0
        self.rate = 0.0  # background calls per second
        self.remaining: int | None = None  # background calls still to start; None = no limit
        self._sink = sink
        self._clock = clock
        self._wakeup = wakeup
        self._calls: dict[str, SimCall] = {}  # channel name -> call
        self._device_use: Counter[str] = Counter()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._local_seq = itertools.count()
        self._background_seq = itertools.count(1)
        self._next_call_at: float | None = None
        # Uniqueids are "<creation epoch>.<counter>" as in Asterisk. The counter
        # starts at the microsecond clock, so a restarted simulator never reuses
        # an id of an earlier run, even within the same second.
        self._unique_seq = itertools.count(time.time_ns() // 1_000 % 1_000_000_000)

    # -- scheduling ---------------------------------------------------------------------

    def set_rate(self, calls_per_second: float, limit: int | None = None) -> None:
        self.rate = max(0.0, calls_per_second)
        self.remaining = limit
        self._next_call_at = None
        self._wakeup()

    def next_due(self) -> float | None:
        """Clock time of the next thing to do, or None when idle."""
        due = self._heap[0][0] if self._heap else None
        if self.rate > 0 and self.remaining != 0:
            start = self._next_call_at if self._next_call_at is not None else self._clock()
            due = start if due is None else min(due, start)
        return due

    def run_due(self) -> None:
        now = self._clock()
        if self.rate > 0 and self.remaining != 0:
            if self._next_call_at is None or self._next_call_at < now - 1.0:
                # First call now; after a stall or a lag, do not burst to catch up.
                self._next_call_at = now
            interval = 1.0 / self.rate
            while self._next_call_at <= now and self.remaining != 0:
                if self.remaining is not None:
                    self.remaining -= 1
                self.start_call()
                self._next_call_at += interval
        heap = self._heap
        while heap and heap[0][0] <= now:
            heapq.heappop(heap)[2]()

    def _later(self, dialplan_seconds: float, action: Callable[[], None]) -> None:
        due = self._clock() + dialplan_seconds * self.call_duration
        heapq.heappush(self._heap, (due, next(self._order), action))
        if self._heap[0][0] == due:
            self._wakeup()

    # -- events -------------------------------------------------------------------------

    def emit(self, event: str, privilege: str, body: str) -> None:
        """Format one broadcast event (once) and hand it to the server."""
        stamp = f"Timestamp: {timestamp()}\r\n" if self.timestamp_events else ""
        data = f"Event: {event}\r\nPrivilege: {privilege}\r\n{stamp}{body}\r\n"
        self._sink(data.encode(), privilege.partition(",")[0])

    def _channel_event(self, event: str, privilege: str, chan: SimChannel, extra: str = "") -> None:
        self.emit(event, privilege, chan.snapshot() + extra)

    def _varset(self, chan: SimChannel, name: str, value: str) -> None:
        chan.variables[name] = value
        self._channel_event(
            "VarSet", "dialplan,all", chan, f"Variable: {name}\r\nValue: {value}\r\n"
        )

    def _newstate(self, chan: SimChannel, state: int) -> None:
        chan.state = state
        self._channel_event("Newstate", "call,all", chan)

    def _device_state(self, device: str) -> None:
        state = "INUSE" if self._device_use[device] > 0 else "NOT_INUSE"
        self.emit("DeviceStateChange", "call,all", f"Device: {device}\r\nState: {state}\r\n")

    # -- calls --------------------------------------------------------------------------

    def start_call(self) -> str:
        """One call exactly like each of the capture's: 39 events over call_duration.

        It is placed as the capture's dialer placed its calls (an async Originate
        from another AMI client, ActionID ``<name>-orig-<n>``), so its events
        include the ``OriginateResponse`` every session sees.
        """
        n = next(self._background_seq)
        request = OriginateRequest(
            channel="Local/100@test",
            context="test",
            exten="200",
            variables=[("TAG", self.name), ("CALLIDX", str(n))],
            caller_id=f"Test {n} <{1000 + n}>",
            action_id=f"{self.name}-orig-{n}",
        )
        linkedid = self.originate(request)
        assert linkedid is not None, "the built-in dialplan has test,100 and test,200"
        return linkedid

    def originate(
        self, request: OriginateRequest, on_answer: Callable[[], None] | None = None
    ) -> str | None:
        """Place a call now; return its Linkedid, or None if it cannot be placed.

        Only ``Local/<exten>@<context>`` channels into the dialplan can be
        placed; anything else fails as an unreachable channel does (an async
        Originate then gets ``OriginateResponse`` with ``Response: Failure``).
        ``on_answer`` runs when ``;1`` is answered (a synchronous Originate's reply).
        """
        tech, _, data = request.channel.partition("/")
        local_exten, _, local_context = data.partition("@")
        local_context = local_context.partition("/")[0] or "default"
        local_steps = self.dialplan.steps(local_context, local_exten)
        dest_steps = self.dialplan.steps(request.context, request.exten)
        if tech.lower() != "local" or local_steps is None or dest_steps is None:
            if request.async_:
                self._originate_response(request, None)
            return None

        base = f"Local/{local_exten}@{local_context}-{next(self._local_seq):08x}"
        uid_one = request.channel_id or self._new_uniqueid()
        if request.other_channel_id:
            uid_two = request.other_channel_id
        elif request.channel_id:
            uid_two = f"{request.channel_id};2"  # what core_local does with one assigned id
        else:
            uid_two = self._new_uniqueid()
        one = SimChannel(base + ";1", uid_one, uid_one, local_context, local_exten)
        two = SimChannel(base + ";2", uid_two, uid_one, local_context, local_exten, state=RING)
        call = SimCall(
            one=_Leg(one, dest_steps, pc=max(0, request.priority - 1)),
            two=_Leg(two, local_steps),
            request=request,
            dial_string=f"{local_exten}@{local_context}",
        )
        for chan in (one, two):
            self.channels[chan.name] = chan
            self._calls[chan.name] = call
            self._device_use[chan.device] += 1
        self.calls_started += 1
        self._setup(call, on_answer)
        return call.linkedid

    def _new_uniqueid(self) -> str:
        return f"{int(time.time())}.{next(self._unique_seq)}"

    def _setup(self, call: SimCall, on_answer: Callable[[], None] | None) -> None:
        """From Originate to answered: the order Asterisk 22 produced in the capture."""
        one, two = call.one.chan, call.two.chan
        request = call.request
        self._channel_event("Newchannel", "call,all", one)
        self._channel_event("Newchannel", "call,all", two)
        one.application, one.app_data = "AppDial2", "(Outgoing Line)"
        self._channel_event(
            "Newexten",
            "dialplan,all",
            one,
            f"Extension: {one.exten}\r\nApplication: AppDial2\r\nAppData: (Outgoing Line)\r\n",
        )
        for name, value in request.variables:
            self._varset(one, name, value)
        caller = parse_caller_id(request.caller_id) if request.caller_id else None
        if caller:
            one.cid_name, one.cid_num = caller
            self._channel_event(
                "NewCallerid", "call,all", one, f"CID-CallingPres: {CALLING_PRES}\r\n"
            )
            one.conn_name, one.conn_num = caller
            self._channel_event("NewConnectedLine", "call,all", one)
        # The Local channel copies the variables to ;2 in reverse order.
        for name, value in reversed(request.variables):
            self._varset(two, name, value)
        if caller:
            two.cid_name, two.cid_num = caller
            two.conn_name, two.conn_num = caller
            self._channel_event(
                "NewCallerid", "call,all", two, f"CID-CallingPres: {CALLING_PRES}\r\n"
            )
            self._channel_event("NewConnectedLine", "call,all", two)
        self.emit(
            "LocalBridge",
            "call,all",
            one.snapshot("LocalOne")
            + two.snapshot("LocalTwo")
            + f"Context: {two.context}\r\nExten: {two.exten}\r\nLocalOptimization: Yes\r\n",
        )
        self._run(call, call.two)  # ;2 answers, then waits for media
        self.emit(
            "DialBegin", "call,all", one.snapshot("Dest") + f"DialString: {call.dial_string}\r\n"
        )
        self._newstate(one, UP)
        self.emit("DialEnd", "call,all", one.snapshot("Dest") + "DialStatus: ANSWER\r\n")
        one.context, one.exten = request.context, request.exten
        runnable = self._run(call, call.one, max_steps=1)
        if request.async_:
            self._originate_response(request, one)
        if on_answer is not None:
            on_answer()
        if not call.ended:
            self._device_state(one.device)
            self._device_state(two.device)
        if runnable:
            self._run(call, call.one)

    def _originate_response(self, request: OriginateRequest, chan: SimChannel | None) -> None:
        action_id = f"ActionID: {request.action_id}\r\n" if request.action_id else ""
        if chan is not None:
            outcome, channel, reason, uniqueid = (
                "Success",
                chan.name,
                REASON_ANSWERED,
                chan.uniqueid,
            )
        else:
            outcome, channel, reason = "Failure", request.channel, 0
            uniqueid = request.channel_id or "<null>"
        name, num = parse_caller_id(request.caller_id) if request.caller_id else ("", "")
        self.emit(
            "OriginateResponse",
            "call,all",
            f"{action_id}Response: {outcome}\r\nChannel: {channel}\r\n"
            f"Context: {request.context}\r\nExten: {request.exten}\r\nReason: {reason}\r\n"
            f"Uniqueid: {uniqueid}\r\n"
            f"CallerIDNum: {num or '<unknown>'}\r\nCallerIDName: {name or '<unknown>'}\r\n",
        )

    # -- the dialplan interpreter -------------------------------------------------------

    def _run(self, call: SimCall, leg: _Leg, max_steps: int | None = None) -> bool:
        """Run ``leg`` until it waits or hangs up; True if stopped by ``max_steps``."""
        chan = leg.chan
        leg.paused = False
        done = 0
        while not call.ended:
            if max_steps is not None and done >= max_steps:
                return True
            if leg.pc >= len(leg.steps):  # ran off the end: Asterisk hangs up
                self._hangup(call, leg, NORMAL_CLEARING)
                return False
            application, data = leg.steps[leg.pc]
            chan.priority = leg.pc + 1
            leg.pc += 1
            done += 1
            data = data.replace("${EXTEN}", chan.exten)
            chan.application, chan.app_data = application, data
            self._channel_event(
                "Newexten",
                "dialplan,all",
                chan,
                f"Extension: {chan.exten}\r\nApplication: {application}\r\nAppData: {data}\r\n",
            )
            kind = application.lower()
            if kind == "answer":
                if chan.state != UP:
                    self._newstate(chan, UP)
                    self._pause(call, leg, ANSWER_MEDIA_WAIT)
                    return False
            elif kind == "set":
                name, _, value = data.partition("=")
                self._varset(chan, name.strip(), value)
            elif kind == "wait":
                self._pause(call, leg, _seconds(data))
                return False
            elif kind == "hangup":
                cause = int(data) if data.strip().isdigit() else NORMAL_CLEARING
                self._hangup(call, leg, cause)
                return False
            # NoOp, Verbose and any other application take no time.
        return False

    def _pause(self, call: SimCall, leg: _Leg, dialplan_seconds: float) -> None:
        leg.paused = True
        leg.wake += 1
        token = leg.wake

        def resume() -> None:
            if not call.ended and leg.wake == token:
                self._run(call, leg)

        self._later(dialplan_seconds, resume)

    def _hangup(self, call: SimCall, leg: _Leg, cause: int) -> None:
        """``leg`` hangs up; the Local pair takes the other leg down with it."""
        if call.ended:
            return
        call.ended = True
        other = call.other(leg)
        self._channel_event("SoftHangupRequest", "call,all", leg.chan, f"Cause: {cause}\r\n")
        self._channel_event("HangupRequest", "call,all", other.chan, f"Cause: {cause}\r\n")
        self._destroy(leg.chan, cause)
        self._channel_event("SoftHangupRequest", "call,all", other.chan, f"Cause: {cause}\r\n")
        self._destroy(other.chan, cause)
        self.calls_completed += 1

    def _destroy(self, chan: SimChannel, cause: int) -> None:
        text = CAUSE_TEXT.get(cause, "Unknown")
        self._channel_event("Hangup", "call,all", chan, f"Cause: {cause}\r\nCause-txt: {text}\r\n")
        self.channels.pop(chan.name, None)
        self._calls.pop(chan.name, None)
        self._device_use[chan.device] -= 1
        if self._device_use[chan.device] <= 0:
            del self._device_use[chan.device]
        self._device_state(chan.device)

    # -- what actions do to channels ----------------------------------------------------

    def hangup(self, channel: str, cause: int = NORMAL_CLEARING) -> bool:
        call = self._calls.get(channel)
        if call is None:
            return False
        self._hangup(call, call.leg_of(self.channels[channel]), cause)
        return True

    def redirect(self, channel: str, context: str, exten: str, priority: int) -> bool:
        """Send a live channel to another place in the dialplan (runs right after the reply)."""
        call = self._calls.get(channel)
        if call is None:
            return False
        leg = call.leg_of(self.channels[channel])
        leg.steps = self.dialplan.steps(context, exten) or []
        leg.pc = max(0, priority - 1)
        leg.chan.context, leg.chan.exten = context, exten
        self._pause(call, leg, 0.0)
        return True

    def set_variable(self, channel: str | None, name: str, value: str) -> bool:
        if channel is None:
            self.dialplan.globals[name] = value
            self.emit(
                "VarSet",
                "dialplan,all",
                f"Channel: none\r\nUniqueid: none\r\nVariable: {name}\r\nValue: {value}\r\n",
            )
            return True
        chan = self.channels.get(channel)
        if chan is None:
            return False
        self._varset(chan, name, value)
        return True

    def get_variable(self, channel: str | None, name: str) -> str | None:
        if channel is None:
            return self.dialplan.globals.get(name)
        chan = self.channels.get(channel)
        if chan is None:
            return None
        return chan.variables.get(name, "")


def _seconds(text: str) -> float:
    try:
        return max(0.0, float(text.split(",")[0] or 0))
    except ValueError:
        return 0.0
