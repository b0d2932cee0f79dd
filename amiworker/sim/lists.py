"""Simulated PBX actions answered with an EventList, as Asterisk sends them.

The reply carries ``EventList: start``; each item event carries the ActionID
and no Privilege or Timestamp (except ``Status``, whose items manager.c writes
with ``Privilege: Call`` and the ActionID last); the closing ``<X>Complete``
event carries ``EventList: Complete`` and ``ListItems: N``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from amiworker.sim.data import IAX_PEERS, SIP_PEERS
from amiworker.sim.wire import Action, Handler, error, item, list_ack, list_complete, registrar

if TYPE_CHECKING:
    from amiworker.sim.pbx import FakePBX
    from amiworker.sim.session import AMISession

LIST_HANDLERS: dict[str, Handler] = {}
_action = registrar(LIST_HANDLERS)


def _duration(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@_action("CoreShowChannels")
async def _core_show_channels(pbx: FakePBX, s: AMISession, a: Action) -> None:
    s.reply(list_ack(a, "Channels will follow"))
    channels = list(pbx.engine.channels.values())
    for chan in channels:
        s.reply(
            item(
                a,
                "CoreShowChannel",
                chan.snapshot()
                + f"Application: {chan.application}\r\nApplicationData: {chan.app_data}\r\n"
                + f"Duration: {_duration(chan.age())}\r\nBridgeId: \r\n",
            )
        )
    s.reply(list_complete(a, "CoreShowChannelsComplete", len(channels)))


@_action("Status")
async def _status(pbx: FakePBX, s: AMISession, a: Action) -> None:
    wanted = a.get("Channel")
    channels = list(pbx.engine.channels.values())
    if wanted:
        channels = [chan for chan in channels if chan.name == wanted]
        if not channels:
            s.reply(error(a, "No such channel"))
            return
    variables = [name.strip() for name in a.get("Variables").split(",") if name.strip()]
    s.reply(list_ack(a, "Channel status will follow"))
    action_id = f"ActionID: {a.action_id}\r\n" if a.action_id else ""
    for chan in channels:
        # manager.c action_status: "Privilege: Call" and the ActionID last, unlike other lists.
        values = "".join(
            f"Variable: {name}={chan.variables.get(name, '')}\r\n" for name in variables
        )
        s.reply(
            (
                "Event: Status\r\nPrivilege: Call\r\n"
                + chan.snapshot()
                + "Type: Local\r\nDNID: \r\n"
                + f"EffectiveConnectedLineNum: {chan.conn_num}\r\n"
                + f"EffectiveConnectedLineName: {chan.conn_name}\r\n"
                + "TimeToHangup: 0\r\nBridgeID: \r\n"
                + f"Application: {chan.application}\r\nData: {chan.app_data}\r\n"
                + "Nativeformats: (slin)\r\nReadformat: slin\r\nReadtrans: \r\n"
                + "Writeformat: slin\r\nWritetrans: \r\nCallgroup: 0\r\nPickupgroup: 0\r\n"
                + f"Seconds: {chan.age()}\r\n{values}{action_id}\r\n"
            ).encode()
        )
    s.reply(list_complete(a, "StatusComplete", len(channels), f"Items: {len(channels)}\r\n"))


@_action("QueueStatus")
async def _queue_status(pbx: FakePBX, s: AMISession, a: Action) -> None:
    wanted = a.get("Queue")
    s.reply(list_ack(a, "Queue status will follow"))
    count = 0
    if not wanted or wanted == "testq":
        count = 1
        params = (
            "Queue: testq\r\nMax: 0\r\nStrategy: ringall\r\nCalls: 0\r\nHoldtime: 0\r\n"
            "TalkTime: 0\r\nCompleted: 0\r\nAbandoned: 0\r\nServiceLevel: 0\r\n"
            "ServicelevelPerf: 0.0\r\nServicelevelPerf2: 0.0\r\nWeight: 0\r\n"
        )
        action_id = f"ActionID: {a.action_id}\r\n" if a.action_id else ""
        s.reply(f"Event: QueueParams\r\n{params}{action_id}\r\n".encode())
    s.reply(list_complete(a, "QueueStatusComplete", count))


@_action("DBGet")
async def _db_get(pbx: FakePBX, s: AMISession, a: Action) -> None:
    family, key = a.get("Family"), a.get("Key")
    if not family:
        s.reply(error(a, "No family specified."))
        return
    if not key:
        s.reply(error(a, "No key specified."))
        return
    value = pbx.astdb.get((family, key))
    if value is None:
        s.reply(error(a, "Database entry not found"))
        return
    s.reply(list_ack(a, "Result will follow"))
    action_id = f"ActionID: {a.action_id}\r\n" if a.action_id else ""
    body = f"Family: {family}\r\nKey: {key}\r\nVal: {value}\r\n{action_id}"
    s.reply(f"Event: DBGetResponse\r\n{body}\r\n".encode())
    s.reply(list_complete(a, "DBGetComplete", 1))


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


@_action("SIPpeers")
async def _sip_peers(pbx: FakePBX, s: AMISession, a: Action) -> None:
    # chan_sip is gone from Asterisk 21+; the shapes are those of Asterisk 13's chan_sip.c.
    s.reply(list_ack(a, "Peer status list will follow"))
    for peer in SIP_PEERS:
        s.reply(
            item(
                a,
                "PeerEntry",
                f"Channeltype: SIP\r\nObjectName: {peer.name}\r\nChanObjectType: peer\r\n"
                f"IPaddress: {peer.address}\r\nIPport: {peer.port}\r\n"
                f"Dynamic: {_yes_no(peer.dynamic)}\r\nAutoForcerport: no\r\nForcerport: yes\r\n"
                "AutoComedia: no\r\nComedia: yes\r\nVideoSupport: no\r\nTextSupport: no\r\n"
                f"ACL: no\r\nStatus: {peer.status}\r\nRealtimeDevice: no\r\nDescription: \r\n",
            )
        )
    s.reply(list_complete(a, "PeerlistComplete", len(SIP_PEERS)))


@_action("IAXpeerlist")
async def _iax_peer_list(pbx: FakePBX, s: AMISession, a: Action) -> None:
    s.reply(list_ack(a, "IAX Peer status list will follow"))
    for peer in IAX_PEERS:
        username = f"ObjectUsername: {peer.username}\r\n" if peer.username else ""
        s.reply(
            item(
                a,
                "PeerEntry",
                f"Channeltype: IAX\r\nObjectName: {peer.name}\r\n{username}"
                f"ChanObjectType: peer\r\nIPaddress: {peer.address}\r\nMask: {peer.mask}\r\n"
                f"Port: {peer.port}\r\nDynamic: {_yes_no(peer.dynamic)}\r\n"
                f"Trunk: {_yes_no(peer.trunk)}\r\nEncryption: no\r\nStatus: {peer.status}\r\n"
                "Description: \r\n",
            )
        )
    s.reply(list_complete(a, "PeerlistComplete", len(IAX_PEERS)))
