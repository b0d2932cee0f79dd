"""What an AMI action returns, how it fails, and typed helpers for common actions.

:class:`~amiworker.ami.connection.Connection` does the wire work (ActionIDs,
timeouts, routing); this module holds everything a caller touches: the
:class:`Response` type, the error hierarchy, and :class:`ActionHelpers`, the
Python names for the actions of the PHPDaemon Asterisk client, each returning
something typed instead of a raw packet.
"""

from __future__ import annotations

import abc
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from amiworker.ami.errors import ActionFailed
from amiworker.ami.message import Message
from amiworker.ami.protocol import HeaderValue, HeaderValues
from amiworker.ami.response import Response

__all__ = ["ActionHelpers", "ConfigCategory", "ExtensionState", "parse_config"]

# -- typed results -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigCategory:
    """One ``[category]`` of a configuration file, as GetConfig returns it.

    A list rather than a dict of categories: Asterisk allows the same name
    twice (pjsip.conf routinely has ``[6001]`` as endpoint, auth and aor).
    ``lines`` keeps every ``key=value`` line in order, repeated keys included.
    """

    name: str
    lines: tuple[tuple[str, str], ...]
    is_template: bool = False
    templates: tuple[str, ...] = ()

    def get(self, key: str, default: str | None = None) -> str | None:
        """The first value of ``key`` (exact case, as Asterisk's config does)."""
        return next((value for k, value in self.lines if k == key), default)

    def getall(self, key: str) -> list[str]:
        return [value for k, value in self.lines if k == key]


@dataclass(frozen=True, slots=True)
class ExtensionState:
    """The answer to ExtensionState: the hint and its numeric state.

    ``status`` is Asterisk's ``AST_EXTENSION_*`` bit set (-1 no hint, 0 idle,
    1 in use, 2 busy, 4 unavailable, 8 ringing, 16 on hold); ``status_text`` is
    the server's own wording (Asterisk >= 13), ``""`` when it sends none.
    """

    exten: str
    context: str
    hint: str
    status: int
    status_text: str


def parse_config(response: Response) -> list[ConfigCategory]:
    """Turn a GetConfig reply (``Category-000000``, ``Line-000000-000000``...) into categories."""
    names: dict[str, str] = {}
    lines: dict[str, list[tuple[str, str]]] = {}
    templates: dict[str, tuple[str, ...]] = {}
    is_template: set[str] = set()
    for header, value in response.message_obj.headers:
        kind, _, number = header.partition("-")
        kind = kind.lower()
        if kind == "category":
            names[number] = value
            lines.setdefault(number, [])
        elif kind == "line":
            category, _, _ = number.partition("-")
            key, _, val = value.partition("=")
            lines.setdefault(category, []).append((key, val))
        elif kind == "istemplate":
            is_template.add(number)
        elif kind == "templates":
            templates[number] = tuple(t for t in value.split(",") if t)
    return [
        ConfigCategory(
            name=names.get(number, ""),
            lines=tuple(lines.get(number, ())),
            is_template=number in is_template,
            templates=templates.get(number, ()),
        )
        for number in sorted(names.keys() | lines.keys())
    ]


# -- helpers -----------------------------------------------------------------------------

# Asterisk waits this long for an Originate to be answered when no Timeout is given.
_DEFAULT_DIAL_TIMEOUT = 30.0


def _check(response: Response) -> Response:
    if not response.ok:
        raise ActionFailed(
            f"AMI action {response.action} failed: {response.message or response.name}",
            response,
        )
    return response


class ActionHelpers(abc.ABC):
    """Typed helpers over :meth:`action`; the subclass supplies the transport.

    Helpers raise :class:`ActionFailed` when the PBX answers with an error;
    :meth:`action` itself never does.
    """

    action_timeout: float

    @abc.abstractmethod
    async def _request(
        self,
        name: str,
        headers: HeaderValues | None,
        *,
        timeout: float | None,
        answer_event: str | None = None,
    ) -> Response:
        """Send one action and wait for its complete answer (see Connection)."""

    async def action(
        self,
        name: str,
        headers: HeaderValues | None = None,
        /,
        *,
        timeout: float | None = None,
        **headers_kw: HeaderValue | Sequence[HeaderValue] | None,
    ) -> Response:
        """Send action ``name`` and return its complete :class:`Response`.

        Headers come from ``headers`` and keyword arguments (keywords win); a
        list value becomes a repeated header, ``None`` is left out. ``timeout``
        (seconds, default ``action_timeout``) is ours; a header named Timeout is
        ``Timeout=...`` (capital T). An error reply is returned with
        ``ok == False``, not raised. Raises :class:`ActionTimeout`,
        :class:`ConnectionFinished`, or ValueError (CR/LF in a header) before
        anything is sent.
        """
        merged: dict[str, Any] = dict(headers or {})
        merged.update(headers_kw)
        return await self._request(name, merged, timeout=timeout)

    async def ping(self) -> float:
        """Round-trip time of a Ping, in seconds."""
        started = time.perf_counter()
        _check(await self.action("Ping"))
        return time.perf_counter() - started

    async def command(self, cli: str) -> list[str]:
        """Run a CLI command; its output lines (either Asterisk format).

        Raises :class:`ActionFailed` carrying the output when Asterisk answers
        ``Response: Error`` (Asterisk >= 14: unknown command, no permission).
        Asterisk <= 13 answers ``Follows`` whatever happened, so there an
        unknown command returns its "No such command" text as output.
        """
        response = await self.action("Command", Command=cli)
        if not response.ok:
            said = "; ".join(response.output) or response.message or response.name
            raise ActionFailed(f"CLI command {cli!r} failed: {said}", response)
        return response.output

    async def sip_peers(self) -> list[Message]:
        """``SIPpeers``: one ``PeerEntry`` event per chan_sip peer."""
        return _check(await self.action("SIPpeers")).events

    async def iax_peers(self) -> list[Message]:
        """``IAXpeerlist``: one ``PeerEntry`` event per IAX2 peer."""
        return _check(await self.action("IAXpeerlist")).events

    async def core_show_channels(self) -> list[Message]:
        """``CoreShowChannels``: one ``CoreShowChannel`` event per live channel."""
        return _check(await self.action("CoreShowChannels")).events

    async def status(
        self, channel: str | None = None, variables: Sequence[str] | None = None
    ) -> list[Message]:
        """``Status``: one ``Status`` event per channel (or for ``channel``).

        ``variables`` names channel variables to include in each event.
        """
        response = await self.action(
            "Status",
            Channel=channel,
            Variables=",".join(variables) if variables else None,
        )
        return _check(response).events

    async def get_config(self, filename: str, category: str | None = None) -> list[ConfigCategory]:
        """``GetConfig``: the categories of ``filename``, in file order."""
        response = await self.action("GetConfig", Filename=filename, Category=category)
        return parse_config(_check(response))

    async def get_config_json(self, filename: str) -> dict[str, Any]:
        """``GetConfigJSON``: ``{category: {key: value}}`` as Asterisk renders it."""
        response = _check(await self.action("GetConfigJSON", Filename=filename))
        text = response.get("JSON")
        if text is None:
            raise ActionFailed("GetConfigJSON reply has no JSON header", response)
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise ActionFailed(f"GetConfigJSON reply is not valid JSON: {exc}", response) from None
        if not isinstance(parsed, dict):
            raise ActionFailed("GetConfigJSON reply is not a JSON object", response)
        return parsed

    async def set_var(self, channel: str | None, variable: str, value: str) -> None:
        """``Setvar``: set a channel variable, or a global one when ``channel`` is None."""
        _check(await self.action("Setvar", Channel=channel, Variable=variable, Value=value))

    async def redirect(
        self,
        channel: str,
        context: str,
        exten: str,
        priority: int | str,
        extra_channel: str | None = None,
    ) -> None:
        """``Redirect``: send ``channel`` (and ``extra_channel``, e.g. the other leg of
        a bridge, to the same place) to ``context``/``exten``/``priority``."""
        headers: dict[str, str | int | None] = {
            "Channel": channel,
            "Context": context,
            "Exten": exten,
            "Priority": priority,
        }
        if extra_channel:
            headers.update(
                ExtraChannel=extra_channel,
                ExtraContext=context,
                ExtraExten=exten,
                ExtraPriority=priority,
            )
        _check(await self.action("Redirect", headers))

    async def originate(
        self,
        channel: str,
        context: str | None = None,
        exten: str | None = None,
        priority: int | str | None = None,
        application: str | None = None,
        data: str | None = None,
        caller_id: str | None = None,
        variables: Mapping[str, str] | None = None,
        timeout: float | None = None,
        account: str | None = None,
    ) -> Message:
        """``Originate`` with ``Async: true``; returns the ``OriginateResponse`` event.

        Give either ``context``/``exten``/``priority`` or ``application``
        (+ ``data``). ``timeout`` is the dial timeout in seconds (Asterisk's
        default is 30 s). The returned event says how it went: ``Response:
        Success`` or ``Failure`` and a numeric ``Reason``; a call that was not
        answered is an outcome, not an exception. Raises :class:`ActionFailed`
        when Asterisk refuses the Originate itself, :class:`ActionTimeout` when
        no OriginateResponse came within the dial timeout plus ``action_timeout``.
        """
        if application is None and exten is None:
            raise ValueError("originate needs either exten (with context, priority) or application")
        headers: dict[str, Any] = {
            "Channel": channel,
            "Context": context,
            "Exten": exten,
            "Priority": priority,
            "Application": application,
            "Data": data,
            "CallerID": caller_id,
            "Timeout": None if timeout is None else round(timeout * 1000),
            "Account": account,
            "Variable": [f"{k}={v}" for k, v in variables.items()] if variables else None,
            "Async": "true",
        }
        dial = _DEFAULT_DIAL_TIMEOUT if timeout is None else timeout
        response = await self._request(
            "Originate",
            headers,
            timeout=dial + self.action_timeout,
            answer_event="OriginateResponse",
        )
        _check(response)
        return response.events[0]

    async def extension_state(self, exten: str, context: str) -> ExtensionState:
        """``ExtensionState``: the hint of ``exten@context`` and its state."""
        response = _check(await self.action("ExtensionState", Exten=exten, Context=context))
        try:
            status = int(response.get("Status") or "-1")
        except ValueError:
            status = -1
        return ExtensionState(
            exten=response.get("Exten") or exten,
            context=response.get("Context") or context,
            hint=response.get("Hint") or "",
            status=status,
            status_text=response.get("StatusText") or "",
        )
