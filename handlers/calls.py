"""Example handler module: a ``calls`` collection with one document per call.

Copy it, change it. It shows the two rules every amiworker handler must keep:

1. **Any order, any worker, at the same time.** Each event of a call may be
   won by a different worker, and they run concurrently, so the Hangup of a
   channel can be handled before its Newchannel. Never read-modify-write a
   document: record what an event says with operators whose result does not
   depend on order (``$setOnInsert``, ``$addToSet``, ``$min``, ``$max``).
2. **Twice is the same as once.** A worker killed mid-handler gets its events
   re-run by another worker. The same operators are idempotent: adding the
   same element to a set or taking the min of the same value changes nothing.

The summary fields (``end``, ``duration``, the hangup cause...) depend on
several events at once, so each handler then recomputes them from the
recorded facts and writes them only if no other fact was recorded meanwhile
(compare-and-set on the facts themselves: they only grow, so the sizes of the
sets and the minimums tell). Whichever handler records the last fact of a
call also writes its final summary, and a re-run, which records nothing new,
writes nothing: no counter of runs or writes, whose value would depend on
how often and in which order the handlers ran.

A ``calls`` document (``_id`` is the call's Linkedid)::

    {_id, server, start, answer, end, duration, channels, hangup_cause,
     hangup_cause_txt, active_channels,                       # the summary
     channel_ids, channel_names, newchannel_us, up_us, hangups}  # the facts

``start`` is the first Newchannel, ``answer`` the first channel going Up
(Newstate, ChannelState 6), ``end`` the last Hangup once every channel seen
has hung up, ``duration`` = end - start in seconds, and the cause is that of
the last channel to hang up. Times come from the events' ``Timestamp``
header: enable ``timestampevents=yes`` in manager.conf. An event without one
records its facts but no time (never the time of handling: a re-run, or
another order, would record another), so such calls have no start, answer,
end or duration.

``amiworker test-handlers handlers.calls`` checks both rules on real calls;
tests/test_calls_handler.py does the same with ``amiworker.testing``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from amiworker import HandlerContext, Message
from amiworker.timeparse import timestamp_micros

COLLECTION = "calls"
SETS = ("channel_ids", "channel_names", "hangups")  # facts that only gain elements
MINIMUMS = ("newchannel_us", "up_us")  # facts that only decrease
CHANNEL_UP = "6"  # ChannelState of Newstate; the number, unlike "Up", is not localised


async def NewchannelHandler(ctx: HandlerContext, event: Message) -> None:
    await _record(ctx, event, _earliest("newchannel_us", event))


async def NewstateHandler(ctx: HandlerContext, event: Message) -> None:
    if event.get("ChannelState") != CHANNEL_UP:
        await _record(ctx, event, {})
        return
    await _record(ctx, event, _earliest("up_us", event))


async def HangupHandler(ctx: HandlerContext, event: Message) -> None:
    cause = event.get("Cause") or ""
    hangup = {
        "uniqueid": event.get("Uniqueid"),
        "ts_us": _micros(event),
        "cause": int(cause) if cause.isdigit() else cause,
        "cause_txt": event.get("Cause-txt"),
    }
    await _record(ctx, event, {"$addToSet": {"hangups": hangup}})


# -- recording facts ----------------------------------------------------------------------


async def _record(ctx: HandlerContext, event: Message, update: dict[str, Any]) -> None:
    """Record the facts of one event of a call, then refresh the call's summary."""
    linkedid = event.get("Linkedid")
    uniqueid = event.get("Uniqueid")
    if not linkedid or not uniqueid:
        return  # Asterisk < 12 has no Linkedid: nothing to group a call by
    channel = {"channel_ids": uniqueid}
    if event.get("Channel"):
        channel["channel_names"] = event["Channel"]
    calls = ctx.db[COLLECTION]
    # The call document with its full shape: a no-op when it exists already.
    # Its arrays exist before anyone adds to them, so every later update is a
    # plain update of an existing document.
    await calls.update_one(
        {"_id": linkedid},
        {
            "$setOnInsert": {
                "server": ctx.server,
                "channel_ids": [],
                "channel_names": [],
                "hangups": [],
            }
        },
        upsert=True,
    )
    update = {**update, "$addToSet": {**update.get("$addToSet", {}), **channel}}
    await calls.update_one({"_id": linkedid}, update)
    await _summarise(calls, linkedid)


async def _summarise(calls: Any, linkedid: str) -> None:
    """Recompute the summary from the facts; write it unless newer facts came in.

    The replace matches only while the facts are as read: every set of the
    same size, every minimum the same (an absent one matches None); as facts
    only grow, the document is then the one read, and replacing it loses
    nothing. If it matches nothing, another event of this call was recorded
    after our read; its handler writes the summary from the newer facts.
    """
    doc = await calls.find_one({"_id": linkedid})
    if doc is None:
        return
    summary = summarise(doc)
    if all(doc.get(field) == value for field, value in summary.items()):
        return
    unchanged = {
        "_id": linkedid,
        **{name: {"$size": len(doc.get(name, []))} for name in SETS},
        **{name: doc.get(name) for name in MINIMUMS},
    }
    await calls.replace_one(unchanged, {**doc, **summary})


def summarise(doc: dict[str, Any]) -> dict[str, Any]:
    """The summary fields of a call, from its facts alone (a pure function)."""
    hangups = doc.get("hangups", [])
    hung_up = {hangup["uniqueid"] for hangup in hangups}
    active = set(doc.get("channel_ids", [])) - hung_up
    ended = bool(hangups) and not active
    start = doc.get("newchannel_us")
    last = max(hangups, key=_hangup_order) if ended else None
    end = last["ts_us"] if last else None
    return {
        "start": _datetime(start),
        "answer": _datetime(doc.get("up_us")),
        "end": _datetime(end),
        "duration": None if end is None or start is None else round((end - start) / 1e6, 6),
        "channels": sorted(doc.get("channel_names", [])),
        "active_channels": len(active),
        "hangup_cause": last["cause"] if last else None,
        "hangup_cause_txt": last["cause_txt"] if last else None,
    }


def _micros(event: Message) -> int | None:
    """The event's Timestamp (``1795675581.052545``) in whole microseconds; None without one.

    An integer, parsed without a float: exact, so that a re-run adds the very
    same value, and finer than BSON dates, which hold milliseconds (the two
    channels of a call often hang up within the same millisecond).
    """
    return timestamp_micros(event.get("Timestamp"))


def _earliest(field: str, event: Message) -> dict[str, Any]:
    """``$min`` of the event's time into ``field``; nothing for an event without a time."""
    micros = _micros(event)
    return {} if micros is None else {"$min": {field: micros}}


def _hangup_order(hangup: dict[str, Any]) -> tuple[bool, int, str]:
    """The last hangup is the latest; hangups without a time come before any with one."""
    ts_us = hangup.get("ts_us")
    return (ts_us is not None, ts_us or 0, str(hangup.get("uniqueid")))


def _datetime(micros: int | None) -> datetime | None:
    """To the millisecond, as BSON stores it, so a summary read back compares equal."""
    if micros is None:
        return None
    seconds, rest = divmod(micros, 1_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=rest // 1000 * 1000)
