"""What the simulated PBX is configured with: versions, dialplan, peers, manager actions.

Static data only, shipped with the package (the simulator never reads test
fixtures at run time). Values are those of the Asterisk 22.10.1 server the
captures in ``tests/fixtures`` come from, so that replies match byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

#: AMI protocol version -> the Asterisk release that speaks it. "2.10.6" is the
#: AMI of Asterisk 13, whose ``Command`` replies use the legacy
#: ``Response: Follows`` ... ``--END COMMAND--`` body.
ASTERISK_VERSIONS = {"11.0.0": "22.10.1", "2.10.6": "13.38.3"}
LEGACY_AMI_VERSIONS = frozenset({"2.10.6"})

BUILD_INFO = "built by root @ vm on a x86_64 running Linux on 2026-11-26 06:40:32 UTC"

#: ``ListCommands`` as Asterisk 22.10.1 answered it (tests/fixtures/asterisk22-actions.txt),
#: plus the chan_sip/chan_iax2 listings the simulator also answers. Sorted
#: case-insensitively, as Asterisk keeps its action list.
LIST_COMMANDS: tuple[tuple[str, str], ...] = (
    ("AbsoluteTimeout", "Set absolute timeout.  (Priv: system,call,all)"),
    ("AGI", "Add an AGI command to execute by Async AGI.  (Priv: agi,all)"),
    ("AOCMessage", "Generate an Advice of Charge message on a channel.  (Priv: aoc,all)"),
    ("Atxfer", "Attended transfer.  (Priv: call,all)"),
    ("BlindTransfer", "Blind transfer channel(s) to the given destination  (Priv: call,all)"),
    ("Bridge", "Bridge two channels already in the PBX.  (Priv: call,all)"),
    ("BridgeDestroy", "Destroy a bridge.  (Priv: <none>)"),
    ("BridgeInfo", "Get information about a bridge.  (Priv: <none>)"),
    ("BridgeKick", "Kick a channel from a bridge.  (Priv: <none>)"),
    ("BridgeList", "Get a list of bridges in the system.  (Priv: <none>)"),
    (
        "BridgeTechnologyList",
        "List available bridging technologies and their statuses.  (Priv: <none>)",
    ),
    ("BridgeTechnologySuspend", "Suspend a bridging technology.  (Priv: <none>)"),
    ("BridgeTechnologyUnsuspend", "Unsuspend a bridging technology.  (Priv: <none>)"),
    ("CancelAtxfer", "Cancel an attended transfer.  (Priv: call,all)"),
    ("Challenge", "Generate Challenge for MD5 Auth.  (Priv: <none>)"),
    ("Command", "Execute Asterisk CLI Command.  (Priv: command,all)"),
    (
        "ControlPlayback",
        "Control the playback of a file being played to a channel.  (Priv: call,all)",
    ),
    ("CoreSettings", "Show PBX core settings (version etc).  (Priv: system,reporting,all)"),
    (
        "CoreShowChannelMap",
        "List all channels connected to the specified channel.  (Priv: system,reporting,all)",
    ),
    ("CoreShowChannels", "List currently active channels.  (Priv: system,reporting,all)"),
    ("CoreStatus", "Show PBX core status variables.  (Priv: system,reporting,all)"),
    ("CreateConfig", "Creates an empty file in the configuration directory.  (Priv: config,all)"),
    ("DBDel", "Delete DB entry.  (Priv: system,all)"),
    ("DBDelTree", "Delete DB Tree.  (Priv: system,all)"),
    ("DBGet", "Get DB Entry.  (Priv: system,reporting,all)"),
    (
        "DBGetTree",
        "Get DB entries, optionally at a particular family/key  (Priv: system,reporting,all)",
    ),
    ("DBPut", "Put DB entry.  (Priv: system,all)"),
    ("DeviceStateList", "List the current known device states.  (Priv: call,reporting,all)"),
    ("DialplanExtensionAdd", "Add an extension to the dialplan  (Priv: system,all)"),
    ("DialplanExtensionRemove", "Remove an extension from the dialplan  (Priv: system,all)"),
    ("Events", "Control Event Flow.  (Priv: <none>)"),
    ("ExtensionState", "Check Extension Status.  (Priv: call,reporting,all)"),
    ("ExtensionStateList", "List the current known extension states.  (Priv: call,reporting,all)"),
    (
        "FAXSession",
        "Responds with a detailed description of a single FAX session  (Priv: call,all)",
    ),
    ("FAXSessions", "Lists active FAX sessions  (Priv: call,all)"),
    ("FAXStats", "Responds with fax statistics  (Priv: reporting,all)"),
    ("Filter", "Dynamically add filters for the current manager session.  (Priv: system,all)"),
    ("GetConfig", "Retrieve configuration.  (Priv: system,config,all)"),
    ("GetConfigJSON", "Retrieve configuration (JSON format).  (Priv: system,config,all)"),
    ("Getvar", "Gets a channel variable or function value.  (Priv: call,reporting,all)"),
    ("Hangup", "Hangup channel.  (Priv: system,call,all)"),
    ("IAXpeerlist", "List IAX peers.  (Priv: system,reporting,all)"),
    ("ListCategories", "List categories in configuration file.  (Priv: config,all)"),
    ("ListCommands", "List available manager commands.  (Priv: <none>)"),
    ("LocalOptimizeAway", "Optimize away a local channel when possible.  (Priv: system,call,all)"),
    ("LoggerRotate", "Reload and rotate the Asterisk logger.  (Priv: system,reporting,all)"),
    ("Login", "Login Manager.  (Priv: <none>)"),
    ("Logoff", "Logoff Manager.  (Priv: <none>)"),
    ("MailboxCount", "Check Mailbox Message Count.  (Priv: call,reporting,all)"),
    ("MailboxStatus", "Check mailbox.  (Priv: call,reporting,all)"),
    ("MessageSend", "Send an out of call message to an endpoint.  (Priv: message,all)"),
    (
        "MixMonitor",
        "Record a call and mix the audio during the recording.  Use of StopMixMonitor is required to guarantee the audio file is available for processing during dialplan execution.  (Priv: system,all)",  # noqa: E501 - verbatim from Asterisk
    ),
    ("MixMonitorMute", "Mute / unMute a Mixmonitor recording.  (Priv: system,call,all)"),
    ("ModuleCheck", "Check if module is loaded.  (Priv: system,all)"),
    ("ModuleLoad", "Module management.  (Priv: system,all)"),
    ("MuteAudio", "Mute an audio stream.  (Priv: system,all)"),
    ("Originate", "Originate a call.  (Priv: originate,all)"),
    ("Ping", "Keepalive command.  (Priv: <none>)"),
    ("PlayDTMF", "Play DTMF signal on a specific channel.  (Priv: call,all)"),
    ("PlayMF", "Play MF digit on a specific channel.  (Priv: call,all)"),
    ("PresenceState", "Check Presence State  (Priv: call,reporting,all)"),
    ("PresenceStateList", "List the current known presence states.  (Priv: call,reporting,all)"),
    ("QueueAdd", "Add interface to queue.  (Priv: agent,all)"),
    ("QueueChangePriorityCaller", "Change priority of a caller on queue.  (Priv: <none>)"),
    ("QueueLog", "Adds custom entry in queue_log.  (Priv: agent,all)"),
    ("QueueMemberRingInUse", "Set the ringinuse value for a queue member.  (Priv: agent,all)"),
    ("QueuePause", "Makes a queue member temporarily unavailable.  (Priv: agent,all)"),
    ("QueuePenalty", "Set the penalty for a queue member.  (Priv: agent,all)"),
    (
        "QueueReload",
        "Reload a queue, queues, or any sub-section of a queue or queues.  (Priv: <none>)",
    ),
    ("QueueRemove", "Remove interface from queue.  (Priv: agent,all)"),
    ("QueueReset", "Reset queue statistics.  (Priv: <none>)"),
    ("QueueRule", "Queue Rules.  (Priv: <none>)"),
    ("QueueStatus", "Show queue status.  (Priv: <none>)"),
    ("QueueSummary", "Show queue summary.  (Priv: <none>)"),
    (
        "QueueWithdrawCaller",
        "Request to withdraw a caller from the queue back to the dialplan.  (Priv: <none>)",
    ),
    ("Redirect", "Redirect (transfer) a call.  (Priv: call,all)"),
    ("Reload", "Send a reload event.  (Priv: system,config,all)"),
    ("SendFlash", "Send a hook flash on a specific channel.  (Priv: call,all)"),
    (
        "SendText",
        "Sends a text message to channel. A content type\tcan be optionally specified. If not set it is set to an empty string allowing a custom handler to default it as it sees fit.  (Priv: call,all)",  # noqa: E501 - verbatim from Asterisk
    ),
    ("Setvar", "Sets a channel variable or function value.  (Priv: call,all)"),
    ("ShowDialPlan", "Show dialplan contexts and extensions  (Priv: config,reporting,all)"),
    ("SIPpeers", "List SIP peers (text format).  (Priv: system,reporting,all)"),
    (
        "SorceryMemoryCacheExpire",
        "Expire (remove) ALL objects from a sorcery memory cache.  (Priv: system,all)",
    ),
    (
        "SorceryMemoryCacheExpireObject",
        "Expire (remove) an object from a sorcery memory cache.  (Priv: system,all)",
    ),
    (
        "SorceryMemoryCachePopulate",
        "Expire all objects from a memory cache and populate it with all objects from the backend.  (Priv: system,all)",  # noqa: E501 - verbatim from Asterisk
    ),
    (
        "SorceryMemoryCacheStale",
        "Marks ALL objects in a sorcery memory cache as stale.  (Priv: system,all)",
    ),
    (
        "SorceryMemoryCacheStaleObject",
        "Mark an object in a sorcery memory cache as stale.  (Priv: system,all)",
    ),
    ("Status", "List channel status.  (Priv: system,call,reporting,all)"),
    (
        "StopMixMonitor",
        "Stop recording a call through MixMonitor, and free the recording's file handle.  (Priv: system,call,all)",  # noqa: E501 - verbatim from Asterisk
    ),
    ("UpdateConfig", "Update basic configuration.  (Priv: config,all)"),
    ("UserEvent", "Send an arbitrary event.  (Priv: user,all)"),
    ("WaitEvent", "Wait for an event to occur.  (Priv: <none>)"),
)

#: A config file as Asterisk holds it: categories in order, each a list of
#: (name, value) in order. "exten=100,1,Answer()" is ("exten", "100,1,Answer()").
ConfigFile = list[tuple[str, list[tuple[str, str]]]]


def extensions_conf(pbx_name: str) -> ConfigFile:
    """The dialplan of the capture server: ``test,100`` calls ``test,200``."""
    return [
        ("general", [("static", "yes"), ("writeprotect", "yes"), ("clearglobalvars", "no")]),
        ("globals", [("PBXNAME", pbx_name)]),
        (
            "test",
            [
                ("exten", "100,1,Answer()"),
                ("same", "n,Set(TESTVAR1=foo)"),
                ("same", "n,Set(TESTVAR2=bar)"),
                ("same", "n,Set(CALLED_EXTEN=${EXTEN})"),
                ("same", "n,Wait(1)"),
                ("same", "n,Hangup()"),
                ("exten", "200,1,Answer()"),
                ("same", "n,Set(LEG=B)"),
                ("same", "n,Wait(1)"),
                ("same", "n,Hangup()"),
                ("exten", "300,1,Answer()"),
                ("same", "n,Set(TESTVAR1=foo)"),
                ("same", "n,Hangup()"),
                ("exten", "400,1,Answer()"),
                ("same", "n,Hangup()"),
            ],
        ),
    ]


def manager_conf(host: str, port: int, username: str) -> ConfigFile:
    """manager.conf as the simulator runs it.

    The user's secret is masked: unlike Asterisk, the simulator never hands a
    secret back over the wire (it ends up in test logs otherwise).
    """
    return [
        (
            "general",
            [
                ("enabled", "yes"),
                ("port", str(port)),
                ("bindaddr", host),
                ("timestampevents", "yes"),
                ("webenabled", "no"),
                ("displayconnects", "no"),
                ("authtimeout", "30"),
                ("authlimit", "50"),
            ],
        ),
        (
            username,
            [
                ("secret", "********"),
                ("deny", "0.0.0.0/0.0.0.0"),
                ("permit", "127.0.0.1/255.255.255.255"),
                ("read", "all"),
                ("write", "all"),
                ("writetimeout", "5000"),
            ],
        ),
    ]


@dataclass(frozen=True, slots=True)
class SipPeer:
    name: str
    address: str  # "-none-" for a dynamic peer that has not registered
    port: int
    dynamic: bool
    status: str


@dataclass(frozen=True, slots=True)
class IaxPeer:
    name: str
    username: str
    address: str  # "(null)" for a dynamic peer that has not registered
    mask: str
    port: int
    dynamic: bool
    trunk: bool
    status: str


SIP_PEERS = (
    SipPeer("100", "127.0.0.1", 5062, True, "OK (1 ms)"),
    SipPeer("101", "-none-", 0, True, "UNKNOWN"),
    SipPeer("provider", "203.0.113.10", 5060, False, "OK (12 ms)"),
)

IAX_PEERS = (
    IaxPeer("200", "", "(null)", "255.255.255.255", 0, True, False, "UNKNOWN"),
    IaxPeer("iax-trunk", "pbx", "203.0.113.20", "255.255.255.255", 4569, False, True, "OK (9 ms)"),
)
