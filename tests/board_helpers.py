"""What the call board's tests share: calls made of the capture's events, and HTTP.

``call_docs`` turns the first call of the real Asterisk 22 capture (34 channel
events) into the documents a worker would store for another call: its ids,
channel names and caller ID replaced, its Timestamps moved to ``start``.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from amiworker.ami.message import Message
from amiworker.fleet.dedup import DedupKeys
from amiworker.fleet.documents import DONE, event_document
from tests.log_plugin import read_capture

_TEMPLATE_CALL = "c20p5038-2-"
_STAMP = re.compile(r"Timestamp: (\d+)\.(\d+)")
_HANGUP = ("Event: SoftHangupRequest", "Event: HangupRequest", "Event: Hangup")
_templates: list[str] = []


def _template() -> list[str]:
    if not _templates:
        _templates.extend(
            m.raw.decode() for m in read_capture() if _TEMPLATE_CALL in m.raw.decode()
        )
    return _templates


def call_docs(
    server: str,
    n: int,
    start: float,
    *,
    up: bool = False,
    caller: tuple[str, str] | None = None,
    state: str = DONE,
) -> list[dict[str, Any]]:
    """The documents of call ``n`` on ``server``, starting at ``start`` (epoch seconds).

    Its Linkedid is ``b{n}-1``, its channels ``b{n}-1`` and ``b{n}-2``. ``up``: without
    its hangup events (a call in progress). ``caller``: (name, number) instead of the
    capture's ``Test 2 <1002>``.
    """
    template = _template()
    first = float(_STAMP.search(template[0])[0].partition(" ")[2])  # type: ignore[index]
    keys = DedupKeys(server, window=60.0)
    docs = []
    for index, raw in enumerate(template):
        if up and raw.startswith(_HANGUP):
            continue
        text = raw.replace(_TEMPLATE_CALL, f"b{n}-").replace("test-00000000", f"test-{n:08x}")
        if caller is not None:
            text = text.replace("Name: Test 2\r\n", f"Name: {caller[0]}\r\n")
            text = text.replace("Num: 1002\r\n", f"Num: {caller[1]}\r\n")

        def moved(match: re.Match[str]) -> str:
            return f"Timestamp: {start + float(match[0].partition(' ')[2]) - first:.6f}"

        message = Message(_STAMP.sub(moved, text).encode())
        received = datetime.fromtimestamp(start + 0.01 + index * 1e-5, UTC)
        doc = event_document(keys.key(message.raw, 0.0), server, message, "worker-x", received)
        doc["state"] = state
        docs.append(doc)
    return docs


def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.load(reply)


def post(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST with an empty JSON body: (status, decoded JSON body)."""
    request = urllib.request.Request(
        url,
        data=b"{}",
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if body else None


def raw_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
