"""The built-in AMI simulator: a TCP server that speaks AMI the way Asterisk 22 (AMI 11.0.0) does.

It is a product component, not a test mock: ``mailgw serve`` runs it (in a child process,
``sim_process``, or with ``pbx.simulator.process: false`` in its own event loop) so the gateway
works on a laptop with no PBX, and any AMI client (ours, panoramisk, a telnet session) can log
in, originate calls and watch the events. Its ground truth is the set of transcripts captured
from a real Asterisk in ``reference/asterisk-ami``: same banner, responses, event names, field
order, Reason codes and hang-up causes, ActionID echo, list-action framing.

Usage::

    sim = AmiSimulator(phones="pbx/phones.yaml", username="mailgw", secret="...", time_scale=1.0)
    port = await sim.start("127.0.0.1", 0)      # 0 = any free port; also in sim.port
    ...
    await sim.stop()

or ``AmiSimulator.from_config(config.pbx)`` with the gateway's ``PbxConfig``.

Sessions
--------
Banner; ``Login`` (plain ``Secret`` or ``AuthType: MD5`` after ``Challenge``). Success answers
``Authentication accepted`` followed by ``FullyBooted`` and ``SuccessfulAuth``; a wrong secret
answers ``Authentication failed`` after 1 s (× time_scale), tells the other sessions
(``InvalidPassword``) and closes the socket. Before login every action but Login, Challenge and
Logoff gets ``Permission denied``. ``Events: off`` at login, or the ``Events`` action, silences a
session; the ``Filter`` action narrows what it is sent (``eventfilter``: advanced ``MatchCriteria``
and legacy regular expressions, as Asterisk 22; it needs the ``system`` write class, see
``write=``). An event no session is sent is not even encoded. Header names are matched in any case; ``ActionID`` is echoed as the second line of the
response and left out when the request had none. Several sessions may be logged in at once;
events go to every logged-in session that has events on.

Actions: Login, Challenge, Logoff, Ping, Events, Filter, Originate (Async or sync: a sync Originate
holds back the session's events until its Response, as Asterisk does), Hangup, CoreShowChannels,
ExtensionState, ExtensionStateList, CoreSettings, CoreStatus, and (``sim_manager``) Redirect,
Status, BridgeList, DBPut/DBGet/DBGetTree/DBDel/DBDelTree, Setvar/Getvar (``DEVICE_STATE(...)``,
globals), Command (devstate change, core show version/hints), ListCommands, ConfbridgeList,
ConfbridgeListRooms, ConfbridgeKick; and the simulator-only actions below (``SimIncoming`` in
``sim_incoming``). What channels do is read from dial plans as data (``dialplan``): the product
plan (``mailgw-dial``/``mailgw-connect``) plus any YAML given as ``dialplans=`` (e.g.
``pbx/dialplans/ami-test.yaml``, the context of the reference captures; see
tests/pbx/test_pbx_replay.py). Playback, SendFAX, ChanSpy and ConfBridge run as applications;
``media_log`` shows what each phone heard and each fax received. Anything else: ``Invalid/unknown command: X. Use Action: ListCommands ...``.

The dial plan it emulates
-------------------------
This is the dial plan a real Asterisk needs to pair with mailgw (``pbx/asterisk/extensions.conf`` should
implement the same), with ``<dial>`` = ``dial_context`` and ``<connect>`` = ``connect_context``:

* ``Local/<n>@<dial>`` rings the phone ``<n>`` (hint ``PJSIP/<n>`` on exten ``<n>`` in
  ``<dial>``). What the phone does comes from the phone book (``phones.py``): ring then answer,
  busy (``;2`` hangs up with cause 17; Originate Reason 5), no answer until the Originate
  ``Timeout`` (Reason 3, cause 19), congestion (Reason 8, cause 34), unreachable (cause 20
  "Subscriber absent", Reason 1), or, for a number that is neither a phone nor covered by the
  book's ``default``, an unallocated number (cause 1, Reason 1).
* Exten ``<m>`` in ``<connect>``: ``Dial(Local/<m>@<dial>,${MAILGW_RING_TIMEOUT})``. So an
  Originate of ``Channel: Local/<a>@<dial>``, ``Context: <connect>``, ``Exten: <b>`` first rings
  ``<a>``; when ``<a>`` answers, its ``;1`` channel dials ``<b>`` (DialBegin, DialState RINGING,
  DialEnd with DialStatus ANSWER / BUSY / NOANSWER / CONGESTION / CHANUNAVAIL). On answer the two
  are bridged (BridgeCreate, BridgeEnter ×2, as capture 02c); when ``<b>`` fails, ``<a>`` is hung
  up (as 02d/02e). ``MAILGW_RING_TIMEOUT`` (seconds) comes from the Originate's ``Variable:``
  headers; 30 s when absent. The bridged call ends after the shorter talk time of the two phones:
  BridgeLeave ×2, BridgeDestroy, Hangup cause 16.
* An Originate with ``Application:``/``Data:`` runs the application once the phone answered:
  ``Playback`` sets ``PLAYBACKSTATUS=SUCCESS`` after 2 s and hangs up (capture 04), ``Wait(n)``
  waits n seconds, ``Read(var,prompt,1,,1,timeout)`` plays the prompt and collects the key the
  phone presses (phone book ``digit``; see ``_read``), any other application runs for 2 s.
* An Originate into any other context just keeps the answered phone up for its talk time.
* A channel technology other than ``Local`` is unknown (capture 03d: Reason 0, no events); a
  Local channel into a context other than ``<dial>`` is a missing extension (capture 03e).

Simulator-only actions (not in Asterisk; the ``Sim`` prefix cannot collide with Asterisk's)
------------------------------------------------------------------------------------------
* ``SimPhone`` — ``Phone: <n>``, ``Behaviour: answer|busy|dnd|no-answer|unreachable|congestion``,
  optional ``AnswerAfter: <s>``, ``TalkTime: <s>``, ``Digit: <key>`` (what it presses when a
  ``Read()`` asks it; ``Digit: none`` presses nothing): change how a phone behaves from now on (its
  device state follows at once, with ExtensionStatus/DeviceStateChange). Also
  ``AmiSimulator.set_phone`` in-process.
* ``SimCalls`` — a list action (optional ``CallId:`` filter): one ``Event: SimCall`` per call the
  simulator handled (CallId, OriginateActionID, From, To, Context, Exten, Application, Data,
  Outcome (the call as a whole), FromOutcome, FromCause, ToOutcome, ToCause, StartedAt,
  FromAnsweredAt, ToAnsweredAt, EndedAt; times are epoch seconds, empty when not reached), then
  ``SimCallsComplete``. The same log is
  ``AmiSimulator.calls`` (a list of ``CallRecord``) in-process.
* ``SimIncoming`` — a call from outside (``sim_incoming``); ``SimOutgoing`` — a phone dials outside
  by itself (``sim_outgoing``).

Events emitted: Newchannel, Newstate, LocalBridge, DialBegin, DialState, DialEnd,
OriginateResponse, HangupRequest, SoftHangupRequest, Hangup (Cause + Cause-txt), BridgeCreate,
BridgeEnter, BridgeLeave, BridgeDestroy, VarSet (PLAYBACKSTATUS; Read()'s variable and READSTATUS; Record()'s RECORDED_FILE and RECORD_STATUS),
DTMFBegin/DTMFEnd (a key pressed during Read()), DeviceStateChange (Local
devices and phones), ExtensionStatus (phones), FullyBooted, SuccessfulAuth, InvalidPassword.
Deliberately not emitted (dial-plan noise no client should depend on): Newexten, most VarSet,
NewCallerid, NewConnectedLine, RequestBadFormat, and duplicate DeviceStateChange events.
Event order follows the captures for the same situation: busy 03a, no answer 03b, congestion
03c, missing extension 03e, hang-up while ringing 06c, answered two-point call and its tear-down
02c (OriginateResponse after the second party's DialBegin), second party busy / no answer
02d / 02e, Playback 04. Situations the captures lack (unreachable, unallocated) follow the
same pattern as a dial plan ``Hangup(<cause>)`` would: HangupRequest, DialEnd CHANUNAVAIL,
OriginateResponse Failure Reason 1, Hangup of ``;2`` with the cause, Hangup of ``;1``.

``time_scale`` multiplies every simulated delay (answer-after, talk time, Originate Timeout,
Dial timeout, application run time, the login-failure delay) so tests can run at 0.01–0.05
without changing behaviour or ordering.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import secrets
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .ami import Field, Message, Parser
from .dialplan import Extension, Step, load_dialplans, product_dialplan
from .sim_incoming import IncomingCalls
from .sim_outgoing import OutgoingCalls
from .eventfilter import EventFilters, FilterError, parse_filter
from .sim_manager import MANAGER_ACTIONS, ManagerActions
from .media import DEFAULT_PLAY_SECONDS, MediaRecord, describe_media, play_seconds
from .phones import (
    EXTENSION_STATUS,
    Behaviour,
    CallAttempt,
    DeviceState,
    Phone,
    PhoneBook,
    PhoneBookError,
    PhoneSpec,
    attempt_for,
    load_phone_book,
    parse_behaviour,
    parse_digit,
    with_behaviour,
)
from .port import CallOutcome

if TYPE_CHECKING:
    from mailgw.config import PbxConfig

log = logging.getLogger(__name__)

AMI_VERSION = "11.0.0"
ASTERISK_VERSION = "22.10.1"
BANNER = f"Asterisk Call Manager/{AMI_VERSION}\r\n".encode()
CALL = "call,all"
DEFAULT_ORIGINATE_TIMEOUT = 30.0  # seconds, when Timeout is absent or not positive
DEFAULT_DIAL_TIMEOUT = 30.0
APPLICATION_RUN_TIME = 2.0
READ_TIMEOUT = 10.0  # Read() without a timeout: Asterisk waits the channel's response timeout
LOGIN_FAILURE_DELAY = 1.0
MAX_WRITE_BUFFER = 8 * 1024 * 1024  # a client this far behind is dropped, like Asterisk's writetimeout
MAX_PENDING_INPUT = 1024 * 1024  # unterminated input a client may leave in our buffer
RING_TIMEOUT_VARIABLE = "MAILGW_RING_TIMEOUT"
SAME_TIME = 0.25  # simulated seconds: steps ending this close end in the caller's order (05b)
CALLER_APPLICATIONS = frozenset({"playback", "sendfax", "receivefax", "chanspy", "confbridge"})
_DIALABLE = re.compile(r"\+?[0-9*#]{1,40}")

STATE_DESC = {0: "Down", 4: "Ring", 5: "Ringing", 6: "Up", 7: "Busy"}
CAUSE_TEXT = {
    0: "Unknown",
    1: "Unallocated (unassigned) number",
    3: "No route to destination",
    16: "Normal Clearing",
    17: "User busy",
    18: "No user responding",
    19: "User alerting, no answer",
    20: "Subscriber absent",
    26: "Answered elsewhere",
    21: "Call Rejected",
    27: "Destination out of order",
    28: "Invalid number format (addressing incomplete)",
    34: "Circuit/channel congestion",
    38: "Network out of order",
    42: "Switching equipment congestion",
}


# --- channels and the fields events carry ----------------------------------------------------------


@dataclass(eq=False)
class Channel:
    name: str
    uniqueid: str
    linkedid: str
    context: str
    exten: str
    state: int
    call: _Call = field(repr=False)
    priority: int = 1
    caller_num: str = "<unknown>"
    caller_name: str = "<unknown>"
    connected_num: str = "<unknown>"
    connected_name: str = "<unknown>"
    application: str = ""
    app_data: str = ""
    bridge_id: str = ""
    created: float = field(default_factory=time.monotonic)
    variables: dict[str, str] = field(default_factory=dict)
    gone: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # set when it hangs up


def channel_fields(ch: Channel, prefix: str = "") -> list[Field]:
    """The channel-snapshot block, in the order every channel event carries it."""
    return [
        (prefix + "Channel", ch.name),
        (prefix + "ChannelState", str(ch.state)),
        (prefix + "ChannelStateDesc", STATE_DESC.get(ch.state, "Unknown")),
        (prefix + "CallerIDNum", ch.caller_num),
        (prefix + "CallerIDName", ch.caller_name),
        (prefix + "ConnectedLineNum", ch.connected_num),
        (prefix + "ConnectedLineName", ch.connected_name),
        (prefix + "Language", "en"),
        (prefix + "AccountCode", ""),
        (prefix + "Context", ch.context),
        (prefix + "Exten", ch.exten),
        (prefix + "Priority", str(ch.priority)),
        (prefix + "Uniqueid", ch.uniqueid),
        (prefix + "Linkedid", ch.linkedid),
    ]


def channel_event(name: str, ch: Channel, *extra: Field) -> list[Field]:
    return [("Event", name), ("Privilege", CALL), *channel_fields(ch), *extra]


def dial_event(name: str, caller: Channel | None, dest: Channel, *extra: Field) -> list[Field]:
    """DialBegin/DialState/DialEnd: the dialling channel's block (if any), then Dest*."""
    fields: list[Field] = [("Event", name), ("Privilege", CALL)]
    if caller is not None:
        fields += channel_fields(caller)
    return fields + channel_fields(dest, "Dest") + list(extra)


def hangup_event(ch: Channel, cause: int) -> list[Field]:
    return channel_event("Hangup", ch, ("Cause", str(cause)), ("Cause-txt", CAUSE_TEXT.get(cause, "Unknown")))


def bridge_fields(bridge_id: str, members: int) -> list[Field]:
    return [
        ("BridgeUniqueid", bridge_id),
        ("BridgeType", "basic"),
        ("BridgeTechnology", "simple_bridge"),
        ("BridgeCreator", "<unknown>"),
        ("BridgeName", "<unknown>"),
        ("BridgeNumChannels", str(members)),
        ("BridgeVideoSourceMode", "none"),
    ]


def device_state_event(device: str, state: str) -> list[Field]:
    return [("Event", "DeviceStateChange"), ("Privilege", CALL), ("Device", device), ("State", state)]


def parse_caller_id(text: str | None) -> tuple[str, str]:
    """``"Mail GW" <100>`` -> (name, number); missing parts are ``<unknown>`` as Asterisk shows."""
    if not text:
        return "<unknown>", "<unknown>"
    text = text.strip()
    match = re.fullmatch(r'\s*"?([^"<]*?)"?\s*<([^>]*)>\s*', text)
    if match:
        name, number = match.group(1).strip(), match.group(2).strip()
    elif re.fullmatch(r"[0-9*#+]+", text):
        name, number = "", text
    else:
        name, number = text, ""
    return name or "<unknown>", number or "<unknown>"


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# --- the call log -----------------------------------------------------------------------------------


@dataclass
class CallRecord:
    """One Originate the simulator handled. Times are epoch seconds (``time.time()``)."""

    call_id: str  # Uniqueid of the originated ;1 channel (the Originate's ChannelId if given)
    action_id: str | None
    from_number: str  # what the Originate's Channel dialled (Local/<from>@...), or the dial string
    context: str | None
    exten: str | None
    application: str | None
    data: str | None
    started_at: float
    to_number: str | None = None  # the second party, when the Originate went to the connect context
    from_outcome: CallOutcome | None = None
    from_cause: int | None = None
    to_outcome: CallOutcome | None = None
    to_cause: int | None = None
    from_answered_at: float | None = None
    to_answered_at: float | None = None
    ended_at: float | None = None
    direction: str = "outbound"  # "incoming" for SimIncoming calls from outside
    answered_by: str | None = None  # incoming calls: the extension that answered
    digits: str | None = None  # Read(): the DTMF keys the phone pressed ("" when none)

    @property
    def outcome(self) -> CallOutcome | None:
        """The call as a whole, like ``ConnectResult.outcome``: ANSWERED when every party that
        was rung answered, else the outcome of the first one that did not (None while ringing)."""
        if self.from_outcome is not CallOutcome.ANSWERED:
            return self.from_outcome
        if self.to_number is None:
            return self.from_outcome
        return self.to_outcome


def call_record_fields(rec: CallRecord) -> list[Field]:
    def opt(value: object) -> str:
        if value is None:
            return ""
        return f"{value:.6f}" if isinstance(value, float) else str(value)

    return [
        ("CallId", rec.call_id),
        ("OriginateActionID", opt(rec.action_id)),
        ("From", rec.from_number),
        ("To", opt(rec.to_number)),
        ("Context", opt(rec.context)),
        ("Exten", opt(rec.exten)),
        ("Application", opt(rec.application)),
        ("Data", opt(rec.data)),
        ("Outcome", opt(rec.outcome and rec.outcome.value)),
        ("FromOutcome", opt(rec.from_outcome and rec.from_outcome.value)),
        ("FromCause", opt(rec.from_cause)),
        ("ToOutcome", opt(rec.to_outcome and rec.to_outcome.value)),
        ("ToCause", opt(rec.to_cause)),
        ("StartedAt", opt(rec.started_at)),
        ("FromAnsweredAt", opt(rec.from_answered_at)),
        ("ToAnsweredAt", opt(rec.to_answered_at)),
        ("EndedAt", opt(rec.ended_at)),
        ("Direction", rec.direction),
        ("AnsweredBy", opt(rec.answered_by)),
        ("Digits", opt(rec.digits)),
    ]


# --- one originated call -------------------------------------------------------------------------


class Ring(Enum):
    """How ringing a phone through a Local channel pair ended."""

    ANSWERED = "answered"
    BUSY = "busy"
    NO_ANSWER = "no-answer"
    CONGESTION = "congestion"
    UNREACHABLE = "unreachable"
    UNALLOCATED = "unallocated"
    CANCELLED = "cancelled"  # a Hangup action ended it


_RING_OUTCOME = {
    Ring.ANSWERED: CallOutcome.ANSWERED,
    Ring.BUSY: CallOutcome.BUSY,
    Ring.NO_ANSWER: CallOutcome.NO_ANSWER,
    Ring.CONGESTION: CallOutcome.CONGESTION,
    Ring.UNREACHABLE: CallOutcome.UNREACHABLE,
    Ring.UNALLOCATED: CallOutcome.INVALID,
    Ring.CANCELLED: CallOutcome.FAILED,
}
_ATTEMPT_RING = {
    CallAttempt.BUSY: Ring.BUSY,
    CallAttempt.CONGESTION: Ring.CONGESTION,
    CallAttempt.UNREACHABLE: Ring.UNREACHABLE,
    CallAttempt.UNALLOCATED: Ring.UNALLOCATED,
}


@dataclass
class OriginateRequest:
    channel: str
    context: str | None
    exten: str | None
    priority: int
    application: str | None
    data: str | None
    timeout: float  # seconds, unscaled
    caller_id: tuple[str, str]  # (name, number)
    channel_id: str | None
    other_channel_id: str | None
    variables: dict[str, str]
    action_id: str | None
    is_async: bool


@dataclass
class _Callee:
    """What the ``;2`` side of a Local pair does, read from its dial-plan steps: how it answers
    (or not), how long it then stays up, what it plays, and the device states it sets."""

    attempt: CallAttempt | None  # None: decided when it rings, from the phone (Dial(PJSIP/n))
    answer_after: float = 0.0
    talk_time: float = 0.0
    phone: Phone | None = None
    app: tuple[str, str] = ("", "")  # application/data shown while it rings (CoreShowChannels)
    on_ring: list[tuple[str, str]] = field(default_factory=list)  # Set(DEVICE_STATE(dev)=state)
    on_end: list[tuple[str, str]] = field(default_factory=list)
    plays: list[str] = field(default_factory=list)  # Playback files after answering


@dataclass(eq=False)
class _Leg:
    """A Local channel pair ringing one number: ``one`` is the caller's side, ``two`` the phone's."""

    number: str
    context: str
    one: Channel
    two: Channel
    callee: _Callee | None  # None: no such extension
    local_inuse_sent: bool = False
    answered: bool = False

    @property
    def phone(self) -> Phone | None:
        return self.callee.phone if self.callee is not None else None

    @property
    def device(self) -> str:
        return f"Local/{self.number}@{self.context}"


@dataclass(eq=False)
class _Call:
    request: OriginateRequest
    record: CallRecord
    hangup: asyncio.Future[int]  # resolved with the cause when a Hangup action hits this call
    sync_result: asyncio.Future[bool] | None = None
    a: _Leg | None = None
    b: _Leg | None = None
    reported: bool = False
    task: asyncio.Task[None] | None = None
    redirect: asyncio.Future[tuple[str, str, int]] | None = None  # a Redirect action's target
    callee_end: float = math.inf  # loop time when the answered first party's own steps end


class _Redirected(Exception):
    """A Redirect action moved the first party's ``;1`` to (context, exten, priority)."""


@dataclass(eq=False)
class _Member:
    channel: Channel
    kicked: asyncio.Future[None]
    joined: float


@dataclass(eq=False)
class _Conference:
    room: str
    bridge_id: str
    members: list[_Member] = field(default_factory=list)

    def bridge_fields(self) -> list[Field]:
        return [("BridgeUniqueid", self.bridge_id), ("BridgeType", "base"), ("BridgeTechnology", "softmix"),
                ("BridgeCreator", "ConfBridge"), ("BridgeName", self.room),
                ("BridgeNumChannels", str(len(self.members))), ("BridgeVideoSourceMode", "none")]


# --- sessions ------------------------------------------------------------------------------------


class _Session:
    """One client connection: reads actions in order, writes responses and events."""

    def __init__(self, sim: AmiSimulator, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.sim = sim
        self.reader = reader
        self.writer = writer
        self.parser = Parser()
        self.authenticated = False
        self.username = ""
        self.events_on = True
        self.filters = EventFilters()  # added by the Filter action; none: every event
        self.challenge: str | None = None
        self.held: list[bytes] | None = None  # events held back during a sync Originate
        self.closing = False
        self._out: list[bytes] = []  # written at the end of this loop iteration, in one send()

        self.session_id = f"0x{secrets.randbits(48):x}"
        self.started = datetime.now(timezone.utc)
        peer = writer.get_extra_info("peername") or ("?", 0)
        sock = writer.get_extra_info("sockname") or ("?", 0)
        self.remote = f"IPV4/TCP/{peer[0]}/{peer[1]}"
        self.local = f"IPV4/TCP/{sock[0]}/{sock[1]}"

    async def run(self) -> None:
        self.write(BANNER)
        try:
            while not self.closing:
                data = await self.reader.read(65536)
                if not data:
                    break
                for msg in self.parser.feed(data):
                    await self.sim._handle_action(self, msg)
                    if self.closing:
                        break
                if self.parser.pending > MAX_PENDING_INPUT:
                    log.warning("AMI simulator: dropping %s, %d bytes without a message end",
                                self.remote, self.parser.pending)
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            self.close()

    def write(self, data: bytes) -> None:
        # A call produces dozens of events in one burst; coalescing them into one send() per loop
        # iteration keeps the order and saves a system call per event (the biggest cost here).
        if self.closing:
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        if self.closing or not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        try:
            self.writer.write(data)
        except (ConnectionError, RuntimeError):
            self.close()
            return
        if self.writer.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            log.warning("AMI simulator: client %s does not read; closing it", self.remote)
            self.close()

    def respond(self, request: Message, status: str, *fields: Field) -> None:
        self.write(response(request, status, *fields).encode())

    def wants(self, name: str, text: Callable[[], str]) -> bool:
        """Whether this session is sent the event ``name`` (logged in, events on, its filters)."""
        return (self.authenticated and self.events_on and not self.closing
                and self.filters.passes(name, text))

    def deliver_event(self, data: bytes) -> None:
        """An event this session ``wants``."""
        if self.held is not None:
            self.held.append(data)
        else:
            self.write(data)

    def release_held(self) -> None:
        held, self.held = self.held, None
        if held:
            self.write(b"".join(held))

    def close(self) -> None:
        if self.closing:
            return
        self._flush()  # what was said before closing (Goodbye, Authentication failed) still goes out
        if self.closing:
            return
        self.closing = True
        self.sim._sessions.discard(self)
        try:
            self.writer.close()
        except RuntimeError:  # loop already closed
            pass


def extension_fields(exten: str, context: str, hint: str, state: DeviceState | None) -> list[Field]:
    """The extension-state block of ExtensionState replies and ExtensionStatus events (capture 05);
    no hint is Status -1 "Unknown" with an empty Hint, as Asterisk answers."""
    status, text = EXTENSION_STATUS[state] if state is not None else (-1, "Unknown")
    return [("Exten", exten), ("Context", context), ("Hint", hint), ("Status", str(status)), ("StatusText", text)]


def response(request: Message, status: str, *fields: Field) -> Message:
    """``Response:`` first, the request's ActionID second (only if it had one), then ``fields``."""
    pairs: list[Field] = [("Response", status)]
    action_id = request.get("ActionID")
    if action_id is not None:
        pairs.append(("ActionID", action_id))
    pairs.extend(fields)
    return Message._trusted(pairs)


# --- the simulator ---------------------------------------------------------------------------------

ActionHandler = Callable[["_Session", Message], Any]


class AmiSimulator(ManagerActions, IncomingCalls, OutgoingCalls):
    """An Asterisk-like AMI server with simulated phones. See the module docstring."""

    def __init__(
        self,
        phones: PhoneBook | str | Path | None = None,
        *,
        username: str = "mailgw",
        secret: str = "mailgw-secret",
        time_scale: float = 1.0,
        dial_context: str = "mailgw-dial",
        connect_context: str = "mailgw-connect",
        dialplans: Iterable[str | Path] = (),
        media_dirs: Iterable[str | Path] = (),
        recording_dir: str | Path | None = None,
        write: str = "all",
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        if phones is None:
            from mailgw.resources import shipped

            phones = shipped("pbx", "phones.yaml")
        self.book = phones if isinstance(phones, PhoneBook) else load_phone_book(phones)
        self.username = username
        self._secret = secret
        # The user's manager.conf ``write`` classes; only Filter's 'system' is checked.
        self.write_classes = frozenset(c.strip().lower() for c in write.split(","))
        self.time_scale = time_scale
        self.dial_context = dial_context
        self.connect_context = connect_context
        self.dialplan = load_dialplans(
            dialplans, product_dialplan(dial_context, connect_context, RING_TIMEOUT_VARIABLE))
        self.media_dirs = [Path(d) for d in media_dirs]
        # Where Record() writes voice messages callers leave (SimIncoming Message:), like
        # /var/spool/asterisk; the gateway gives its data directory's sim-recordings.
        self.recording_dir = Path(recording_dir) if recording_dir else Path(tempfile.gettempdir()) / "mailgw-sim-recordings"
        self.device_states: dict[str, DeviceState] = {
            device: DeviceState.NOT_INUSE for _, _, device in self.dialplan.hints()
            if not device.startswith("PJSIP/")}
        self.global_vars: dict[str, str] = {}
        self.astdb: dict[str, str] = {}  # "/Family/Key" -> value, as Asterisk's AstDB
        self.media_log: list[MediaRecord] = []
        self.conferences: dict[str, _Conference] = {}
        self._local_use: Counter[str] = Counter()
        self._trunk_seq = 0
        self.calls: list[CallRecord] = []
        self.phones: dict[str, Phone] = {
            number: Phone(number, spec, hinted=True) for number, spec in self.book.phones.items()
        }
        self._pinned: set[str] = set(self.phones)  # phones kept even when idle
        self._sessions: set[_Session] = set()
        self._session_tasks: set[asyncio.Task[None]] = set()
        self._calls: set[_Call] = set()
        self._channels: dict[str, Channel] = {}
        self._server: asyncio.AbstractServer | None = None
        self._uid_seq = 0
        self._local_seq = 0
        self._booted = time.monotonic()
        self._processed_calls = 0
        self.host: str | None = None
        self.port: int | None = None
        self._actions: dict[str, ActionHandler] = {
            "login": self._action_login,
            "challenge": self._action_challenge,
            "logoff": self._action_logoff,
            "ping": self._action_ping,
            "events": self._action_events,
            "filter": self._action_filter,
            "originate": self._action_originate,
            "hangup": self._action_hangup,
            "coreshowchannels": self._action_core_show_channels,
            "extensionstate": self._action_extension_state,
            "extensionstatelist": self._action_extension_state_list,
            "coresettings": self._action_core_settings,
            "corestatus": self._action_core_status,
            "simphone": self._action_sim_phone,
            "simcalls": self._action_sim_calls,
            "simincoming": self._action_sim_incoming,
            "simoutgoing": self._action_sim_outgoing,
            **{name: getattr(self, method) for name, method in MANAGER_ACTIONS.items()},
        }

    @classmethod
    def from_config(cls, pbx: PbxConfig) -> AmiSimulator:
        return cls(
            phones=pbx.simulator.phones,
            username=pbx.ami.username,
            secret=pbx.ami.secret,
            time_scale=pbx.simulator.time_scale,
            dial_context=pbx.dial_context,
            connect_context=pbx.connect_context,
            dialplans=getattr(pbx.simulator, "dialplans", ()),
        )

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on host:port (0 = a free port). Returns the bound port (also ``self.port``)."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True)
        sock = self._server.sockets[0].getsockname()
        self.host, self.port = host, sock[1]
        self._booted = time.monotonic()
        log.info("AMI simulator listening on %s:%d", host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop listening, drop every session, end every call. The call log is kept."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for session in list(self._sessions):
            session.close()
        calls = [c.task for c in self._calls if c.task is not None]
        for task in calls:
            task.cancel()
        if calls:
            await asyncio.gather(*calls, return_exceptions=True)
        # Closed sessions see EOF and end by themselves; their tasks belong to asyncio's stream
        # server (cancelling them makes it log errors), so only wait, bounded, for them.
        if self._session_tasks:
            await asyncio.wait(list(self._session_tasks), timeout=2.0)
        if server is not None:
            await server.wait_closed()
        self._channels.clear()
        for phone in self.phones.values():
            phone.ringing = phone.talking = 0
        log.info("AMI simulator stopped")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = _Session(self, reader, writer)
        self._sessions.add(session)
        task = asyncio.current_task()
        if task is not None:
            self._session_tasks.add(task)
        try:
            await session.run()
        finally:
            if task is not None:
                self._session_tasks.discard(task)

    # --- public in-process API -----------------------------------------------------------------

    def set_phone(self, number: str, behaviour: Behaviour | str, *, answer_after: float | None = None,
                  talk_time: float | None = None, digit: str | None = None) -> Phone:
        """Change how a phone behaves (what the SimPhone action does); ``digit`` is the key it
        presses when a Read() asks it something ("" = none; None keeps the current one)."""
        behaviour = parse_behaviour(behaviour)
        phone = self._phone(number)
        if phone is None:  # not in the book and no default: create it
            phone = Phone(number, PhoneSpec(), hinted=False)
            self.phones[number] = phone
        before = phone.device_state
        phone.spec = with_behaviour(phone.spec, behaviour, answer_after, talk_time,
                                    None if digit is None else (parse_digit(digit, "digit") or ""))
        self._pinned.add(number)
        # Do-not-disturb is also kept where FreePBX keeps it, AstDB DND/<ext> = YES, so a client
        # (the gateway's absence mode) can read it with DBGet as on a real PBX.
        if behaviour is Behaviour.DND:
            self.astdb[f"/DND/{number}"] = "YES"
        else:
            self.astdb.pop(f"/DND/{number}", None)
        self._device_changed(phone, before)
        return phone

    def call(self, call_id: str) -> CallRecord | None:
        """The log entry of a call by its id (latest first)."""
        for record in reversed(self.calls):
            if record.call_id == call_id:
                return record
        return None

    # --- dispatch --------------------------------------------------------------------------------

    async def _handle_action(self, session: _Session, msg: Message) -> None:
        name = msg.get("Action")
        if not name:
            session.respond(msg, "Error", ("Message", "Missing action in request"))
            self._request_bad_format(session, "Action: NONE")
            return
        key = name.lower()
        if not session.authenticated and key not in ("login", "challenge", "logoff"):
            session.respond(msg, "Error", ("Message", "Permission denied"))
            return
        handler = self._actions.get(key)
        if handler is None:
            session.respond(msg, "Error", ("Message", f"Invalid/unknown command: {name}. "
                                                      "Use Action: ListCommands to show available commands."))
            self._request_bad_format(session, f"Action: {name}")
            return
        try:
            result = handler(session, msg)
            if asyncio.iscoroutine(result):
                await result
        except Exception:  # one bad request must not take the session (or the PBX) down
            log.exception("AMI simulator: action %s failed", name)
            session.respond(msg, "Error", ("Message", f"Internal error handling {name}"))

    def _request_bad_format(self, session: _Session, request_type: str) -> None:
        """07c: a security event for a request Asterisk could not run (sent only to logged-in
        sessions, like every event)."""
        fields = self._security_event("RequestBadFormat", session, "Error", "1",
                                      ("RequestType", request_type), ("SessionTV", _event_tv(session.started)))
        account = fields.pop(6)  # Asterisk puts AccountID last in this event
        fields.append(account)
        self._broadcast(fields)

    def _broadcast(self, fields: list[Field]) -> None:
        name = fields[0][1]
        message = Message._trusted(fields)
        text = lambda: message.encode().decode()[:-4]  # noqa: E731  # what a legacy regex filter reads
        data = None
        for session in list(self._sessions):
            if session.wants(name, text):
                if data is None:  # an event no session is sent is never encoded
                    data = message.encode()
                session.deliver_event(data)

    def _security_event(self, name: str, session: _Session, severity: str, version: str,
                        *extra: Field) -> list[Field]:
        now = _event_tv(datetime.now(timezone.utc))
        return [
            ("Event", name), ("Privilege", "security,all"), ("EventTV", now), ("Severity", severity),
            ("Service", "AMI"), ("EventVersion", version), ("AccountID", session.username),
            ("SessionID", session.session_id), ("LocalAddress", session.local),
            ("RemoteAddress", session.remote), *extra,
        ]

    # --- session actions ----------------------------------------------------------------------------

    async def _action_login(self, session: _Session, msg: Message) -> None:
        if session.authenticated:
            session.respond(msg, "Success", ("Message", "Already authenticated"))
            return
        username = msg.get("Username", "")
        session.username = username
        if username == self.username and self._credentials_ok(session, msg):
            session.authenticated = True
            session.events_on = (msg.get("Events") or "on").strip().lower() not in ("off", "no", "false", "0")
            session.respond(msg, "Success", ("Message", "Authentication accepted"))
            uptime = str(int(time.monotonic() - self._booted))
            booted = Message._trusted([
                ("Event", "FullyBooted"), ("Privilege", "system,all"), ("Uptime", uptime),
                ("LastReload", uptime), ("Status", "Fully Booted"),
            ]).encode()
            if session.wants("FullyBooted", lambda: booted.decode()[:-4]):
                session.deliver_event(booted)
            self._broadcast(self._security_event(
                "SuccessfulAuth", session, "Informational", "1", ("UsingPassword", "0"),
                ("SessionTV", _event_tv(session.started))))
            log.info("AMI simulator: %s logged in from %s", username, session.remote)
            return
        # Asterisk delays the refusal by a second to slow down guessing, then hangs up.
        log.warning("AMI simulator: failed login for %r from %s", username, session.remote)
        self._broadcast(self._security_event(
            "InvalidPassword", session, "Error", "2", ("SessionTV", "1970-01-01T00:00:00.000+0000")))
        await asyncio.sleep(LOGIN_FAILURE_DELAY * self.time_scale)
        session.respond(msg, "Error", ("Message", "Authentication failed"))
        session.close()

    def _credentials_ok(self, session: _Session, msg: Message) -> bool:
        if (msg.get("AuthType") or "").lower() == "md5":
            if session.challenge is None:
                return False
            expected = hashlib.md5((session.challenge + self._secret).encode()).hexdigest()
            return secrets.compare_digest(expected, (msg.get("Key") or "").lower())
        return secrets.compare_digest(msg.get("Secret", "").encode(), self._secret.encode())

    def _action_challenge(self, session: _Session, msg: Message) -> None:
        if (msg.get("AuthType") or "").lower() != "md5":
            session.respond(msg, "Error", ("Message", "Must specify AuthType"))
            return
        session.challenge = str(secrets.randbelow(900_000_000) + 100_000_000)
        session.respond(msg, "Success", ("Challenge", session.challenge))

    def _action_logoff(self, session: _Session, msg: Message) -> None:
        session.respond(msg, "Goodbye", ("Message", "Thanks for all the fish."))
        session.close()

    def _action_ping(self, session: _Session, msg: Message) -> None:
        session.respond(msg, "Success", ("Ping", "Pong"), ("Timestamp", f"{time.time():.6f}"))

    def _action_events(self, session: _Session, msg: Message) -> None:
        mask = (msg.get("EventMask") or "").strip().lower()
        session.events_on = mask not in ("off", "no", "false", "0", "")
        session.respond(msg, "Success", ("Events", "On" if session.events_on else "Off"))

    def _action_filter(self, session: _Session, msg: Message) -> None:
        if not self.write_classes & {"system", "all"}:
            session.respond(msg, "Error", ("Message", "Permission denied"))
            return
        operation = msg.get("Operation", "")
        if operation.lower() != "add":
            session.respond(msg, "Error", ("Message", "Unknown operation"))
            return
        try:
            session.filters.add(parse_filter(msg.get("Filter", ""), msg.get("MatchCriteria")))
        except FilterError as exc:
            session.respond(msg, "Error", ("Message", str(exc)))
            return
        session.respond(msg, "Success", ("Message", "Success"))

    def _action_core_settings(self, session: _Session, msg: Message) -> None:
        session.respond(
            msg, "Success", ("AMIversion", AMI_VERSION), ("AsteriskVersion", ASTERISK_VERSION),
            ("SystemName", ""), ("CoreMaxCalls", "0"), ("CoreMaxLoadAvg", "0.000000"),
            ("CoreRunUser", ""), ("CoreRunGroup", ""), ("CoreMaxFilehandles", "0"),
            ("CoreRealTimeEnabled", "No"), ("CoreCDRenabled", "No"), ("CoreHTTPenabled", "No"),
            ("SoundsSearchCustomDir", "No"))

    def _action_core_status(self, session: _Session, msg: Message) -> None:
        booted = datetime.now() - timedelta(seconds=time.monotonic() - self._booted)
        session.respond(
            msg, "Success", ("CoreStartupDate", booted.strftime("%Y-%m-%d")),
            ("CoreStartupTime", booted.strftime("%H:%M:%S")), ("CoreReloadDate", booted.strftime("%Y-%m-%d")),
            ("CoreReloadTime", booted.strftime("%H:%M:%S")), ("CoreCurrentCalls", str(len(self._calls))),
            ("CoreProcessedCalls", str(self._processed_calls)))

    # --- list actions ------------------------------------------------------------------------------

    def _send_list(self, session: _Session, msg: Message, message: str, item_event: str,
                   items: Iterable[list[Field]], complete_event: str) -> None:
        """List-action framing: response with EventList start, items (ActionID right after Event,
        no Privilege), then ``<Name>Complete`` with ListItems. Written as one block."""
        action_id = msg.get("ActionID")
        id_field: list[Field] = [] if action_id is None else [("ActionID", action_id)]
        out = [response(msg, "Success", ("EventList", "start"), ("Message", message)).encode()]
        count = 0
        for item in items:
            out.append(Message._trusted([("Event", item_event), *id_field, *item]).encode())
            count += 1
        out.append(Message._trusted([("Event", complete_event), *id_field, ("EventList", "Complete"),
                                     ("ListItems", str(count))]).encode())
        session.write(b"".join(out))

    def _action_core_show_channels(self, session: _Session, msg: Message) -> None:
        now = time.monotonic()
        items = [
            channel_fields(ch) + [("Application", ch.application), ("ApplicationData", ch.app_data),
                                  ("Duration", format_duration(now - ch.created)), ("BridgeId", ch.bridge_id)]
            for ch in self._channels.values()
        ]
        self._send_list(session, msg, "Channels will follow", "CoreShowChannel", items,
                        "CoreShowChannelsComplete")

    def _action_extension_state(self, session: _Session, msg: Message) -> None:
        exten = msg.get("Exten")
        if not exten:
            session.respond(msg, "Error", ("Message", "Extension not specified"))
            return
        context = msg.get("Context") or "default"
        phone = self.phones.get(exten) if context == self.dial_context else None
        hint = phone.device if phone is not None and phone.hinted else self.dialplan.hint(context, exten)
        fields = extension_fields(exten, context, hint or "", self.device_state(hint) if hint else None)
        session.respond(msg, "Success", ("Message", "Extension Status"), *fields)

    def _action_extension_state_list(self, session: _Session, msg: Message) -> None:
        items = []
        for context, exten, hint in self.dialplan.hints():
            items.append(extension_fields(exten, context, hint, self.device_state(hint)))
        for number in sorted(self.phones):
            phone = self.phones[number]
            if phone.hinted:
                items.append(extension_fields(number, self.dial_context, phone.device, phone.device_state))
        self._send_list(session, msg, "Extension Statuses will follow", "ExtensionStatus", items,
                        "ExtensionStateListComplete")

    # --- simulator-only actions ------------------------------------------------------------------------

    def _action_sim_phone(self, session: _Session, msg: Message) -> None:
        number = msg.get("Phone")
        if not number:
            session.respond(msg, "Error", ("Message", "Phone not specified"))
            return
        try:
            behaviour = parse_behaviour(msg.get("Behaviour") or "")
            answer_after = _optional_seconds(msg.get("AnswerAfter"), "AnswerAfter")
            talk_time = _optional_seconds(msg.get("TalkTime"), "TalkTime")
            digit = msg.get("Digit")
            if digit is not None and digit.strip().lower() not in ("", "none"):
                parse_digit(digit, "Digit")
            elif digit is not None:
                digit = ""
        except PhoneBookError as exc:
            session.respond(msg, "Error", ("Message", str(exc)))
            return
        # Reply first, then the state-change events, in the order Asterisk's Setvar of a device
        # state gives them (capture 05).
        phone = self._phone(number) or Phone(number, PhoneSpec(), hinted=False)
        spec = with_behaviour(phone.spec, behaviour, answer_after, talk_time, digit)
        state = Phone(number, spec, phone.hinted, phone.ringing, phone.talking).device_state
        status, text = EXTENSION_STATUS[state]
        session.respond(msg, "Success", ("Message", "Phone updated"), ("Phone", number),
                        ("Behaviour", behaviour.value), ("State", state.value), ("Status", str(status)),
                        ("StatusText", text))
        self.set_phone(number, behaviour, answer_after=answer_after, talk_time=talk_time, digit=digit)

    def _action_sim_calls(self, session: _Session, msg: Message) -> None:
        wanted = msg.get("CallId")
        records = [r for r in self.calls if wanted is None or r.call_id == wanted]
        self._send_list(session, msg, "Calls will follow", "SimCall",
                        [call_record_fields(r) for r in records], "SimCallsComplete")

    # --- Hangup -----------------------------------------------------------------------------------------

    def _action_hangup(self, session: _Session, msg: Message) -> None:
        name = msg.get("Channel")
        if not name:
            session.respond(msg, "Error", ("Message", "No channel specified"))
            return
        channel = self._channels.get(name) or next(
            (c for c in self._channels.values() if c.uniqueid == name), None)
        if channel is None:
            session.respond(msg, "Error", ("Message", "No such channel"))
            return
        cause_text = msg.get("Cause") or ""
        cause = int(cause_text) if cause_text.isdigit() else 0
        session.respond(msg, "Success", ("Message", "Channel Hungup"))
        if not channel.call.hangup.done():
            channel.call.hangup.set_result(cause)

    # --- Originate ----------------------------------------------------------------------------------------

    async def _action_originate(self, session: _Session, msg: Message) -> None:
        request = self._parse_originate(session, msg)
        if request is None:
            return
        call = self._new_call(request)
        if request.is_async:
            session.respond(msg, "Success", ("Message", "Originate successfully queued"))
            call.task = asyncio.create_task(self._run_call(call))
            return
        # Sync: Asterisk's session thread blocks, so the Response comes when the call is answered
        # or failed, and the events produced meanwhile follow it.
        call.sync_result = asyncio.get_running_loop().create_future()
        session.held = []
        try:
            call.task = asyncio.create_task(self._run_call(call))
            ok = await asyncio.shield(call.sync_result)
            if ok:
                session.respond(msg, "Success", ("Message", "Originate successfully queued"))
            else:
                session.respond(msg, "Error", ("Message", "Originate failed"))
        finally:
            session.release_held()

    def _parse_originate(self, session: _Session, msg: Message) -> OriginateRequest | None:
        channel = msg.get("Channel") or ""
        if not channel:
            session.respond(msg, "Error", ("Message", "Channel not specified"))
            return None
        if "/" not in channel:
            session.respond(msg, "Error", ("Message", "Invalid channel"))
            return None
        application = msg.get("Application") or None
        priority_text = (msg.get("Priority") or "").strip()
        priority = 1
        if priority_text and not application:
            if not priority_text.lstrip("-").isdigit():
                session.respond(msg, "Error", ("Message", "Invalid priority"))
                return None
            priority = int(priority_text)
        timeout_text = (msg.get("Timeout") or "").strip()
        try:
            timeout_ms = int(timeout_text) if timeout_text else 0
        except ValueError:
            session.respond(msg, "Error", ("Message", "Invalid timeout"))
            return None
        variables: dict[str, str] = {}
        for header in msg.getall("Variable"):
            for assignment in header.split(","):
                key, sep, value = assignment.partition("=")
                if sep and key.strip():
                    variables[key.strip()] = value
        return OriginateRequest(
            channel=channel,
            context=None if application else (msg.get("Context") or "default"),
            exten=None if application else (msg.get("Exten") or "s"),
            priority=priority,
            application=application,
            data=(msg.get("Data") or "") if application else None,
            timeout=timeout_ms / 1000 if timeout_ms > 0 else DEFAULT_ORIGINATE_TIMEOUT,
            caller_id=parse_caller_id(msg.get("CallerID")),
            channel_id=msg.get("ChannelId") or None,
            other_channel_id=msg.get("OtherChannelId") or None,
            variables=variables,
            action_id=msg.get("ActionID"),
            is_async=(msg.get("Async") or "").strip().lower() in ("true", "yes", "1", "on"),
        )

    def _new_call(self, request: OriginateRequest) -> _Call:
        _, _, resource = request.channel.partition("/")
        record = CallRecord(
            call_id=request.channel_id or "",
            action_id=request.action_id,
            from_number=resource.partition("@")[0] or request.channel,
            context=request.context,
            exten=request.exten,
            application=request.application,
            data=request.data,
            started_at=time.time(),
        )
        self.calls.append(record)
        call = _Call(request, record, asyncio.get_running_loop().create_future())
        self._calls.add(call)
        return call

    async def _run_call(self, call: _Call) -> None:
        try:
            await self._place_call(call)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("AMI simulator: call %s failed", call.record.call_id)
        finally:
            if call.sync_result is not None and not call.sync_result.done():
                call.sync_result.set_result(False)
            for leg in (call.a, call.b):
                if leg is not None and leg.answered and leg.callee is not None:
                    for device, state in leg.callee.on_end:
                        self.set_device_state(device, state)
            for leg in (call.a, call.b):
                if leg is not None:
                    self._release_leg(leg)
            if call.record.ended_at is None:
                call.record.ended_at = time.time()
            self._calls.discard(call)
            self._processed_calls += 1

    async def _place_call(self, call: _Call) -> None:
        req, rec = call.request, call.record
        tech, _, resource = req.channel.partition("/")
        if tech.lower() != "local":
            # Capture 03d: no channel can be created, so no channel events at all.
            rec.from_outcome = CallOutcome.FAILED
            self._report(call, success=False, reason=0)
            return
        number, _, context = resource.partition("@")
        context = context.split("/")[0] or "default"
        a = call.a = self._new_leg(call, number, context, req.channel_id, req.other_channel_id, linkedid=None)
        rec.call_id = a.one.uniqueid
        self._broadcast(channel_event("Newchannel", a.one))
        self._broadcast(channel_event("Newchannel", a.two))
        name, num = req.caller_id
        for ch in (a.one, a.two):
            ch.caller_name, ch.caller_num, ch.connected_name, ch.connected_num = name, num, name, num
        if a.callee is None:
            self._missing_extension(call, a)
            return
        self._broadcast(local_bridge_event(a.one, a.two))
        self._broadcast(dial_event("DialBegin", None, a.one, ("DialString", f"{number}@{context}")))
        ring, cause = await self._ring(call, a, caller=None, timeout=req.timeout)
        if ring is not Ring.ANSWERED:
            rec.from_outcome = _RING_OUTCOME[ring]
            rec.from_cause = self._fail_first_leg(call, a, ring, cause)
            return
        rec.from_outcome = CallOutcome.ANSWERED
        rec.from_answered_at = time.time()
        await self._run_caller_side(call, a)

    async def _run_caller_side(self, call: _Call, a: _Leg) -> None:
        """The answered ``;1`` runs the Originate's application, or its Context/Exten steps; a
        Redirect action moves it to other steps, as many times as it comes."""
        req = call.request
        talk = a.callee.talk_time if a.callee else 0.0
        loop = asyncio.get_running_loop()
        call.callee_end = loop.time() + (talk * self.time_scale if not math.isinf(talk) else math.inf)
        call.redirect = loop.create_future()
        target = (req.context or "", req.exten or "", req.priority)
        first = True
        while True:
            try:
                if first and req.application:
                    await self._run_application(call, a, Step(req.application, req.data or ""))
                else:
                    await self._run_extension(call, a, *target)
                return
            except _Redirected as moved:
                target, first = moved.args[0], False
                call.redirect = loop.create_future()
                a.one.context, a.one.exten, a.one.priority = target

    async def _run_extension(self, call: _Call, a: _Leg, context: str, exten: str, priority: int) -> None:
        """``;1`` runs ``exten@context`` step by step; it ends when the steps end (or Hangup), when
        the answered party's own steps end, or when a Hangup action comes."""
        extension = self.dialplan.lookup(context, exten)
        if extension is None:
            self._report(call, success=True, reason=4)
            if context in self.dialplan.contexts:  # a known context without that extension
                if context == self.connect_context:
                    call.record.to_number, call.record.to_outcome = exten, CallOutcome.INVALID
                self._end_first_leg(a, 16)
            else:  # a context the simulator does not know: stay up while the phone talks
                await self._stay_up(call, a, math.inf)
            call.record.ended_at = time.time()
            return
        variables = {**call.request.variables, "EXTEN": exten}
        for index, step in enumerate(extension.steps[max(0, priority - 1):], start=max(1, priority)):
            name, args = step.name, step.args(variables)
            a.one.priority = index
            if name == "set":
                assignment = _device_state_assignment(args)
                if assignment is not None:
                    self.set_device_state(*assignment)
            elif name == "dial" and args:
                await self._connect_second_party(call, a, args)
                return
            elif name in ("chanspy", "confbridge", "sendfax", "receivefax", "read"):
                await self._run_application(call, a, Step(step.app, ",".join(args)))
                return
            elif name in ("wait", "playback"):
                self._report(call, success=True, reason=4)
                a.one.application, a.one.app_data = step.app, ",".join(args)
                seconds = _float_arg(args, 0.0) if name == "wait" else sum(
                    play_seconds(self._record_media("heard", f, a.number, a.two, call))
                    for f in ",".join(args).split("&") if f)
                if not await self._step_time(call, a, seconds):
                    return
                if name == "playback":
                    self._broadcast([("Event", "VarSet"), ("Privilege", "dialplan,all"),
                                     *channel_fields(a.one), ("Variable", "PLAYBACKSTATUS"), ("Value", "SUCCESS")])
            elif name == "hangup":
                break
        self._report(call, success=True, reason=4)
        self._end_first_leg(a, 16)
        call.record.ended_at = time.time()

    async def _step_time(self, call: _Call, a: _Leg, seconds: float) -> bool:
        """Let a step's time pass. False (and the call is ended) when the answered party's steps
        ended first or a Hangup action came."""
        loop = asyncio.get_running_loop()
        left = (call.callee_end - loop.time()) / self.time_scale
        if await self._pause(call, min(seconds, max(0.0, left))) and seconds <= left + SAME_TIME:
            return True
        if call.hangup.done():
            self._end_first_leg(a, call.hangup.result())
        else:
            self._end_by_callee(a)
        call.record.ended_at = time.time()
        return False

    # --- legs -----------------------------------------------------------------------------------------

    def _new_leg(self, call: _Call, number: str, context: str, uid1: str | None, uid2: str | None,
                 linkedid: str | None) -> _Leg:
        self._local_seq += 1
        base = f"Local/{number}@{context}-{self._local_seq:08x}"
        uid1 = uid1 or self._next_uniqueid()
        uid2 = uid2 or self._next_uniqueid()
        linked = linkedid or uid1
        one = Channel(f"{base};1", uid1, linked, context, number, state=0, call=call)
        two = Channel(f"{base};2", uid2, linked, context, number, state=4, call=call)
        self._channels[one.name] = one
        self._channels[two.name] = two
        extension = self.dialplan.lookup(context, number)
        callee = None
        if extension is not None:
            callee = self._callee_of(extension, {**call.request.variables, "EXTEN": number})
            two.application, two.app_data = callee.app
        return _Leg(number, context, one, two, callee)

    def _callee_of(self, extension: Extension, variables: dict[str, str]) -> _Callee:
        """Read a ``;2`` side's dial-plan steps into how it answers and how long it stays up."""
        callee = _Callee(attempt=None)
        answered = ringing = False
        for step in extension.steps:
            name, args = step.name, step.args(variables)
            if name == "dial" and not answered:
                tech, _, resource = (args[0] if args else "").partition("/")
                # Like the pairing dial plan: AstDB CF/<ext> sends the call elsewhere.
                phone = self._phone(self.forwarded(resource.partition("@")[0])) if tech.upper() == "PJSIP" else None
                callee.phone, callee.app = phone, ("Dial", args[0] if args else "")
                if phone is None:
                    callee.attempt = CallAttempt.UNALLOCATED
                else:
                    callee.answer_after, callee.talk_time = phone.spec.answer_after, phone.spec.talk_time
                return callee
            if name == "set":
                device_state = _device_state_assignment(args)
                if device_state is not None:
                    (callee.on_end if answered else callee.on_ring).append(device_state)
            elif name == "ringing":
                ringing = True
            elif name == "wait":
                seconds = _float_arg(args, 0.0)
                if answered:
                    callee.talk_time += seconds
                elif ringing:
                    callee.answer_after += seconds
            elif name in ("answer", "playback", "confbridge", "sendfax", "receivefax", "chanspy") and not answered:
                answered = True
                callee.attempt = CallAttempt.RING_THEN_ANSWER
            if name == "playback":
                callee.plays.append(args[0] if args else "")
                callee.talk_time += DEFAULT_PLAY_SECONDS
            elif name in ("confbridge", "chanspy"):
                callee.talk_time = math.inf
            elif name in ("busy", "congestion") and not answered:
                callee.attempt = CallAttempt.BUSY if name == "busy" else CallAttempt.CONGESTION
                callee.app = (step.app, step.data)
                return callee
            elif name == "hangup":
                if not answered:
                    cause = int(_float_arg(args, 16))
                    callee.attempt = {20: CallAttempt.UNREACHABLE, 1: CallAttempt.UNALLOCATED}.get(
                        cause, CallAttempt.CONGESTION if cause == 34 else CallAttempt.BUSY)
                    if ringing:
                        callee.attempt = CallAttempt.RING_FOREVER
                return callee
            if not answered and callee.app == ("", "") and name not in ("noop", "set"):
                callee.app = (step.app, step.data)
        if callee.attempt is None:
            callee.attempt = CallAttempt.RING_FOREVER if ringing else CallAttempt.RING_THEN_ANSWER
        return callee

    def _next_uniqueid(self) -> str:
        uid = f"{int(time.time())}.{self._uid_seq}"
        self._uid_seq += 1
        return uid

    def _release_leg(self, leg: _Leg) -> None:
        for ch in (leg.one, leg.two):
            self._channels.pop(ch.name, None)
        phone = leg.phone
        if phone is not None and phone.line_free and phone.number not in self._pinned:
            self.phones.pop(phone.number, None)  # external numbers are made on demand; keep memory flat

    def _phone(self, number: str) -> Phone | None:
        phone = self.phones.get(number)
        if phone is None:
            spec = self.book.lookup(number)
            if spec is None:
                return None
            phone = self.phones[number] = Phone(number, spec, hinted=False)
        return phone

    def _phone_activity(self, phone: Phone | None, ringing: int = 0, talking: int = 0) -> None:
        if phone is None:
            return
        before = phone.device_state
        phone.ringing = max(0, phone.ringing + ringing)
        phone.talking = max(0, phone.talking + talking)
        self._device_changed(phone, before)

    def _device_changed(self, phone: Phone, before: DeviceState) -> None:
        after = phone.device_state
        if after is before or not phone.hinted:
            return
        self._broadcast([("Event", "ExtensionStatus"), ("Privilege", CALL),
                         *extension_fields(phone.number, self.dial_context, phone.device, after)])
        self._broadcast(device_state_event(phone.device, after.value))

    def _local_idle(self, leg: _Leg) -> None:
        """A Local device is INUSE while any of its channel pairs is; one NOT_INUSE at the end."""
        if leg.local_inuse_sent:
            leg.local_inuse_sent = False
            self._local_use[leg.device] -= 1
        if self._local_use[leg.device] <= 0:
            self._local_use.pop(leg.device, None)
            self._broadcast(device_state_event(leg.device, "NOT_INUSE"))

    def _local_in_use(self, leg: _Leg) -> None:
        if not leg.local_inuse_sent:
            leg.local_inuse_sent = True
            self._local_use[leg.device] += 1
            if self._local_use[leg.device] == 1:
                self._broadcast(device_state_event(leg.device, "INUSE"))

    def _set_state(self, ch: Channel, state: int) -> None:
        ch.state = state
        self._broadcast(channel_event("Newstate", ch))

    def _hangup(self, ch: Channel, cause: int) -> None:
        self._broadcast(hangup_event(ch, cause))
        self._channels.pop(ch.name, None)
        ch.gone.set()

    def _hangup_request(self, ch: Channel, cause: int) -> None:
        self._broadcast(channel_event("HangupRequest", ch, ("Cause", str(cause))))

    def _soft_hangup_request(self, ch: Channel, cause: int = 16) -> None:
        self._broadcast(channel_event("SoftHangupRequest", ch, ("Cause", str(cause))))

    # --- device states of hints that are not phones (Custom:<name>) ---------------------------------

    def set_device_state(self, device: str, state: str) -> None:
        """``DEVICE_STATE(<device>)=<state>`` (Setvar, dial plan Set, CLI devstate change): the new
        state, then ExtensionStatus for every hint on it and DeviceStateChange (capture 05)."""
        try:
            new = DeviceState(state.upper())
        except ValueError:
            new = DeviceState.UNKNOWN
        if device.startswith("PJSIP/") and device[6:] in self.phones:
            return  # phones' states follow their calls and SimPhone
        before = self.device_states.get(device)
        self.device_states[device] = new
        if before is new:
            return
        for context, exten, hinted in self.dialplan.hints():
            if hinted == device:
                self._broadcast([("Event", "ExtensionStatus"), ("Privilege", CALL),
                                 *extension_fields(exten, context, device, new)])
        self._broadcast(device_state_event(device, new.value))

    def device_state(self, device: str) -> DeviceState:
        if device.startswith("PJSIP/"):
            phone = self.phones.get(device[6:])
            return phone.device_state if phone is not None else DeviceState.UNAVAILABLE
        return self.device_states.get(device, DeviceState.UNKNOWN)

    # --- media: what phones heard, what faxes received -------------------------------------------

    def _record_media(self, kind: str, name: str, number: str, channel: Channel, call: _Call) -> MediaRecord:
        record = describe_media(kind, name, self.media_dirs, number=number, channel=channel.name,
                                call_id=call.record.call_id)
        self.media_log.append(record)
        return record

    def _send_fax(self, call: _Call, a: _Leg, tiff: str) -> MediaRecord:
        phone = a.phone
        capable = phone is not None and phone.spec.fax
        record = self._record_media("fax-received" if capable else "fax-refused", tiff, a.number, a.one, call)
        a.one.variables["FAXSTATUS"] = "SUCCESS" if capable else "FAILED"
        return record

    def _fax_done(self, a: _Leg, record: MediaRecord) -> None:
        """res_fax's ``SendFAX`` event as the application returns (0 pages when the far end is no fax)."""
        pages = (record.pages or 0) if record.kind == "fax-received" else 0
        self._broadcast([("Event", "SendFAX"), ("Privilege", CALL), *channel_fields(a.one),
                         ("LocalStationID", ""), ("RemoteStationID", a.number if pages else ""),
                         ("PagesTransferred", str(pages)), ("Resolution", "8031x7700" if pages else ""),
                         ("TransferRate", "14400" if pages else ""), ("FileName", record.name)])

    # --- ChanSpy (barge) and ConfBridge ----------------------------------------------------------------

    async def _chan_spy(self, call: _Call, a: _Leg, args: list[str]) -> None:
        """``ChanSpy(<channel>,qB)``: the answered phone barges into a live channel (capture 08b)."""
        spyee = self._find_channel(args[0]) if args else None
        if spyee is not None:
            self._broadcast([("Event", "ChanSpyStart"), ("Privilege", CALL),
                             *channel_fields(a.one, "Spyer"), *channel_fields(spyee, "Spyee")])
            self.media_log.append(MediaRecord(kind="barged", number=a.number, channel=a.one.name,
                                              name=spyee.name, call_id=call.record.call_id))
            gone = asyncio.ensure_future(spyee.gone.wait())
            try:
                await asyncio.wait((call.hangup, gone), return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            self._broadcast([("Event", "ChanSpyStop"), ("Privilege", CALL),
                             *channel_fields(a.one, "Spyer"), *channel_fields(spyee, "Spyee")])
        if await self._pause(call, a.callee.talk_time if a.callee else 0.0):
            self._end_first_leg(a, 16)
        else:  # 08b: a Hangup action on the spying ;1
            self._application_ended(a, call.hangup.result())
        call.record.ended_at = time.time()

    async def _conference(self, call: _Call, a: _Leg, room: str) -> None:
        """``ConfBridge(<room>)`` (capture 08c): join, stay until hung up or kicked, leave."""
        conf = self.conferences.get(room)
        if conf is None:
            conf = self.conferences[room] = _Conference(room, str(uuid.uuid4()))
            self._broadcast([("Event", "BridgeCreate"), ("Privilege", CALL), *conf.bridge_fields()])
            self._broadcast(device_state_event(f"confbridge:{room}", "INUSE"))
        member = _Member(a.one, asyncio.get_running_loop().create_future(), time.monotonic())
        conf.members.append(member)
        a.one.bridge_id = conf.bridge_id
        self._broadcast([("Event", "BridgeEnter"), ("Privilege", CALL), *conf.bridge_fields(),
                         *channel_fields(a.one)])
        if len(conf.members) == 1:
            self._broadcast([("Event", "ConfbridgeStart"), ("Privilege", CALL), ("Conference", room),
                             *conf.bridge_fields()])
        self._broadcast([("Event", "ConfbridgeJoin"), ("Privilege", CALL), ("Conference", room),
                         *conf.bridge_fields(), *channel_fields(a.one), ("Admin", "No"), ("Muted", "No")])
        talk = a.callee.talk_time if a.callee else 0.0
        delay = None if math.isinf(talk) else talk * self.time_scale
        await asyncio.wait((call.hangup, member.kicked), timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        conf.members.remove(member)
        self._broadcast([("Event", "ConfbridgeLeave"), ("Privilege", CALL), ("Conference", room),
                         *conf.bridge_fields(), *channel_fields(a.one), ("Admin", "No")])
        self._broadcast([("Event", "BridgeLeave"), ("Privilege", CALL), *conf.bridge_fields(),
                         *channel_fields(a.one)])
        a.one.bridge_id = ""
        if not conf.members:
            self._broadcast([("Event", "ConfbridgeEnd"), ("Privilege", CALL), ("Conference", room),
                             *conf.bridge_fields()])
            self._broadcast(device_state_event(f"confbridge:{room}", "NOT_INUSE"))
            self._broadcast([("Event", "BridgeDestroy"), ("Privilege", CALL), *conf.bridge_fields()])
            del self.conferences[room]
        if call.hangup.done() and not member.kicked.done():
            # 08c: a Hangup action only takes the member out of the conference; its channel
            # goes at the next Hangup action (or when the phone's own steps end).
            call.hangup = asyncio.get_running_loop().create_future()
            left = (call.callee_end - asyncio.get_running_loop().time()) / self.time_scale
            await self._pause(call, left)
        self._end_first_leg(a, 16)
        call.record.ended_at = time.time()

    def _find_channel(self, name: str) -> Channel | None:
        return self._channels.get(name) or next(
            (c for c in self._channels.values() if c.uniqueid == name), None)

    async def _pause(self, call: _Call, seconds: float) -> bool:
        """Let simulated time pass. False when a Hangup action ended the call meanwhile."""
        if call.hangup.done():
            return False
        if seconds <= 0:
            return True
        delay = None if math.isinf(seconds) else seconds * self.time_scale
        waits: tuple[asyncio.Future[Any], ...] = (call.hangup,)
        if call.redirect is not None:
            waits += (call.redirect,)
        done, _ = await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        if call.redirect is not None and call.redirect in done and not call.hangup.done():
            raise _Redirected(call.redirect.result())
        return not done

    async def _ring(self, call: _Call, leg: _Leg, caller: Channel | None, timeout: float) -> tuple[Ring, int]:
        """Ring the phone behind ``leg`` until it answers, gives up, or is hung up.

        Emits the ringing and answer events; failure events are up to the caller because their
        order differs between the first leg (Originate) and the second (Dial), as captured.
        """
        callee = leg.callee
        assert callee is not None
        phone = callee.phone
        attempt = callee.attempt
        if phone is not None:
            attempt = attempt_for(phone.spec, line_free=phone.line_free)
            callee.answer_after, callee.talk_time = phone.spec.answer_after, phone.spec.talk_time
        assert attempt is not None
        for device, state in callee.on_ring:
            self.set_device_state(device, state)
        if attempt in _ATTEMPT_RING:
            return _ATTEMPT_RING[attempt], 0
        answer_after = callee.answer_after if attempt is CallAttempt.RING_THEN_ANSWER else math.inf
        self._phone_activity(phone, ringing=+1)
        leg.two.priority = 2
        if answer_after > 0:
            self._set_state(leg.one, 5)
            self._local_in_use(leg)
            self._broadcast(dial_event("DialState", caller, leg.one, ("DialStatus", "RINGING")))
        if not await self._pause(call, min(answer_after, timeout)):
            self._phone_activity(phone, ringing=-1)
            return Ring.CANCELLED, call.hangup.result()
        if answer_after > timeout:
            self._phone_activity(phone, ringing=-1)
            return Ring.NO_ANSWER, 19
        self._phone_activity(phone, ringing=-1, talking=+1)  # one change: RINGING -> INUSE
        self._set_state(leg.two, 6)
        self._set_state(leg.one, 6)
        self._local_in_use(leg)
        self._broadcast(dial_event("DialEnd", caller, leg.one, ("DialStatus", "ANSWER")))
        leg.answered = True
        for name in callee.plays:
            self._record_media("heard", name, leg.number, leg.two, call)
        return Ring.ANSWERED, 0

    # --- the first leg (the Originate's own channel) ------------------------------------------------------

    def _report(self, call: _Call, *, success: bool, reason: int) -> None:
        """The Originate's outcome: the Response of a sync Originate, else OriginateResponse."""
        if call.reported:
            return
        call.reported = True
        if call.sync_result is not None:
            call.sync_result.set_result(success)
            return
        req, a = call.request, call.a
        fields: list[Field] = [("Event", "OriginateResponse"), ("Privilege", CALL)]
        if req.action_id is not None:
            fields.append(("ActionID", req.action_id))
        fields += [("Response", "Success" if success else "Failure"),
                   ("Channel", a.one.name if success and a else req.channel)]
        if req.application:
            fields += [("Application", req.application), ("Data", req.data or "")]
        else:
            fields += [("Context", req.context or ""), ("Exten", req.exten or "")]
        name, num = req.caller_id
        fields += [("Reason", str(reason)), ("Uniqueid", a.one.uniqueid if success and a else "<unknown>"),
                   ("CallerIDNum", num), ("CallerIDName", name)]
        self._broadcast(fields)

    def _missing_extension(self, call: _Call, a: _Leg) -> None:
        """Capture 03e: a Local channel into an extension that does not exist."""
        call.record.from_outcome = CallOutcome.FAILED
        self._hangup(a.two, 0)
        self._report(call, success=False, reason=0)
        self._hangup(a.one, 0)
        self._broadcast(device_state_event(a.device, "INVALID"))

    def _fail_first_leg(self, call: _Call, a: _Leg, ring: Ring, cause: int) -> int:
        """The first party did not answer. Event order per capture; returns the ;2 cause."""
        one, two = a.one, a.two
        if ring is Ring.BUSY:  # 03a
            cause = 17
            self._report(call, success=False, reason=5)
            self._broadcast(dial_event("DialEnd", None, one, ("DialStatus", "BUSY")))
            self._hangup_request(two, 0)
            self._hangup(one, 0)
            two.priority = 2
            self._set_state(two, 7)
            self._soft_hangup_request(two)
            self._hangup(two, cause)
        elif ring is Ring.NO_ANSWER:  # 03b
            cause = 19
            self._hangup_request(two, cause)
            self._report(call, success=False, reason=3)
            self._soft_hangup_request(two)
            self._hangup(two, cause)
            self._hangup(one, cause)
        elif ring is Ring.CONGESTION:  # 03c
            cause = 34
            two.priority = 2
            self._set_state(two, 7)
            self._broadcast(dial_event("DialEnd", None, one, ("DialStatus", "CONGESTION")))
            self._hangup_request(two, 0)
            self._report(call, success=False, reason=8)
            self._hangup(one, 0)
            self._soft_hangup_request(two)
            self._hangup(two, cause)
        elif ring in (Ring.UNREACHABLE, Ring.UNALLOCATED):  # the dial plan's Hangup(20) / Hangup(1)
            cause = 20 if ring is Ring.UNREACHABLE else 1
            two.application, two.app_data = "Hangup", str(cause)
            self._hangup_request(two, cause)
            self._broadcast(dial_event("DialEnd", None, one, ("DialStatus", "CHANUNAVAIL")))
            self._report(call, success=False, reason=1)
            self._hangup(two, cause)
            self._hangup(one, 0)
        else:  # a Hangup action while it rang (06c)
            status = "BUSY" if cause == 17 else "CANCEL"
            self._broadcast(dial_event("DialEnd", None, one, ("DialStatus", status)))
            self._hangup_request(two, cause)
            self._report(call, success=False, reason=0)
            self._soft_hangup_request(two)
            self._hangup(two, cause)
            self._hangup(one, cause)
        self._local_idle(a)
        return cause

    def _end_first_leg(self, a: _Leg, cause: int) -> None:
        """Hang up an answered first leg that is not bridged (02a/02d/06b order)."""
        self._soft_hangup_request(a.one)
        self._hangup_request(a.two, cause)
        self._hangup(a.one, cause)
        self._soft_hangup_request(a.two)
        self._hangup(a.two, cause)
        self._phone_activity(a.phone, talking=-1)
        self._local_idle(a)

    async def _stay_up(self, call: _Call, a: _Leg, caller_time: float) -> None:
        talk_time = a.callee.talk_time if a.callee else 0.0
        completed = await self._pause(call, min(talk_time, caller_time))
        if completed and talk_time < caller_time:
            self._end_by_callee(a)
        else:
            self._end_first_leg(a, 16 if completed else call.hangup.result())
        call.record.ended_at = time.time()

    def _end_by_callee(self, a: _Leg) -> None:
        """The answered party's own steps ended first (05b order): ``;2`` goes, then ``;1``."""
        self._soft_hangup_request(a.two)
        self._hangup_request(a.one, 16)
        self._hangup(a.two, 16)
        self._hangup(a.one, 16)
        self._phone_activity(a.phone, talking=-1)
        self._local_idle(a)

    async def _run_application(self, call: _Call, a: _Leg, step: Step) -> None:
        app, data = step.app, step.data
        a.one.application, a.one.app_data = app, data
        self._report(call, success=True, reason=4)
        name = step.name
        if name == "chanspy":
            await self._chan_spy(call, a, step.args())
            return
        if name == "confbridge":
            await self._conference(call, a, (step.args() or [""])[0])
            return
        run_time = APPLICATION_RUN_TIME
        if name == "wait":
            run_time = _float_arg(step.args(), 0.0)
        elif name == "playback":
            run_time = sum(play_seconds(self._record_media("heard", f, a.number, a.two, call))
                           for f in data.split("&") if f)
        elif name == "sendfax":
            record = self._send_fax(call, a, (step.args() or [""])[0])
            run_time = play_seconds(record)
        elif name == "read":
            if not await self._read(call, a, step.args()):
                return
            run_time = 0.0
        if not await self._step_time(call, a, run_time):
            return
        if name == "sendfax":
            self._fax_done(a, record)
        if name == "playback":
            self._broadcast([("Event", "VarSet"), ("Privilege", "dialplan,all"), *channel_fields(a.one),
                             ("Variable", "PLAYBACKSTATUS"), ("Value", "SUCCESS")])
        # Capture 04: the application returns, ;1 hangs up first, both with cause 0.
        self._application_ended(a, 0)
        call.record.ended_at = time.time()

    async def _read(self, call: _Call, a: _Leg, args: list[str]) -> bool:
        """``Read(variable,prompt[&prompt2],maxdigits,options,attempts,timeout)``: play the prompt,
        then collect the key the phone presses (its ``digit``, after ``digit_after`` s) or time
        out. As Asterisk's app_read, it sets the variable (empty when nothing was pressed), then
        ``READSTATUS`` (OK / TIMEOUT); each set is a VarSet event on ``;1``, and a key pressed is
        DTMFBegin + DTMFEnd (Direction Received) on ``;1`` first. False when the call ended."""
        variable = args[0] if args and args[0] else "READ"
        prompts = [f for f in (args[1] if len(args) > 1 else "").split("&") if f]
        timeout = _float_arg(args[5:6], 0.0) or READ_TIMEOUT
        prompt_time = sum(play_seconds(self._record_media("heard", f, a.number, a.two, call)) for f in prompts)
        if not await self._step_time(call, a, prompt_time):
            return False
        spec = a.phone.spec if a.phone is not None else None
        digit = spec.digit if spec is not None and spec.digit_after <= timeout else None
        if not await self._step_time(call, a, spec.digit_after if digit and spec else timeout):
            return False
        if digit:
            for event, extra in (("DTMFBegin", []), ("DTMFEnd", [("DurationMs", "120")])):
                self._broadcast([("Event", event), ("Privilege", "dtmf,all"), *channel_fields(a.one),
                                 ("Digit", digit), ("Direction", "Received"), *extra])
        call.record.digits = digit or ""
        a.one.variables[variable] = digit or ""
        a.one.variables["READSTATUS"] = "OK" if digit else "TIMEOUT"
        for name in (variable, "READSTATUS"):
            self._broadcast([("Event", "VarSet"), ("Privilege", "dialplan,all"), *channel_fields(a.one),
                             ("Variable", name), ("Value", a.one.variables[name])])
        return True

    def _application_ended(self, a: _Leg, cause: int) -> None:
        """An originated application's ``;1`` hangs up, then its ``;2`` (captures 04 and 08b)."""
        self._hangup_request(a.two, cause)
        self._hangup(a.one, cause)
        self._soft_hangup_request(a.two)
        self._hangup(a.two, cause)
        self._phone_activity(a.phone, talking=-1)
        self._local_idle(a)

    # --- the second leg: Dial(Local/<b>@<dial>) from the connect context ---------------------------------

    async def _connect_second_party(self, call: _Call, a: _Leg, dial_args: list[str]) -> None:
        """``Dial(Local/<n>@<context>,<timeout>)`` run by the answered first party."""
        req, rec = call.request, call.record
        target = dial_args[0]
        timeout = _seconds_variable(dial_args[1] if len(dial_args) > 1 else None, DEFAULT_DIAL_TIMEOUT)
        number, _, context = target.partition("/")[2].partition("@")
        context = context or "default"
        rec.to_number = number
        a.one.context, a.one.exten, a.one.priority = req.context or "", req.exten or "", 1
        a.one.application = "Dial"
        a.one.app_data = f"{target},{timeout:g}"
        if self.dialplan.lookup(context, number) is None:
            # Dial of a Local channel with no such extension: the answered first party is hung up.
            self._report(call, success=True, reason=4)
            rec.to_outcome = CallOutcome.INVALID
            self._end_first_leg(a, 16)
            rec.ended_at = time.time()
            return
        b = call.b = self._new_leg(call, number, context, None, None, linkedid=a.one.linkedid)
        self._broadcast(channel_event("Newchannel", b.one))
        self._broadcast(channel_event("Newchannel", b.two))
        name, num = req.caller_id
        b.one.caller_name, b.one.caller_num = name, number
        b.one.connected_name, b.one.connected_num = name, num
        b.two.caller_name, b.two.caller_num = name, num
        b.two.connected_name, b.two.connected_num = name, number
        self._broadcast(local_bridge_event(b.one, b.two))
        self._broadcast(dial_event("DialBegin", a.one, b.one, ("DialString", f"{number}@{context}")))
        self._report(call, success=True, reason=4)  # 02c: OriginateResponse after the second DialBegin
        ring, cause = await self._ring(call, b, caller=a.one, timeout=timeout)
        if ring is not Ring.ANSWERED:
            rec.to_outcome = _RING_OUTCOME[ring]
            rec.to_cause = self._fail_second_leg(call, a, b, ring, cause)
            rec.ended_at = time.time()
            return
        rec.to_outcome = CallOutcome.ANSWERED
        rec.to_answered_at = time.time()
        await self._bridge(call, a, b)

    def _fail_second_leg(self, call: _Call, a: _Leg, b: _Leg, ring: Ring, cause: int) -> int:
        """The second party did not answer: its legs go, then the first party is hung up (02d/02e)."""
        one, two = b.one, b.two
        two.priority = 2
        if ring is Ring.CANCELLED:
            hangup_cause = cause
            self._broadcast(dial_event("DialEnd", a.one, one, ("DialStatus", "CANCEL")))
            self._hangup_request(two, 16)
            self._hangup(one, 16)
            self._soft_hangup_request(two)
            self._hangup(two, 16)
            cause = 16
        else:
            hangup_cause = 16
            status, cause = {
                Ring.BUSY: ("BUSY", 17),
                Ring.NO_ANSWER: ("NOANSWER", 0),  # 02e: Dial gave up; the ;2 cause stays 0
                Ring.CONGESTION: ("CONGESTION", 34),
                Ring.UNREACHABLE: ("CHANUNAVAIL", 20),
                Ring.UNALLOCATED: ("CHANUNAVAIL", 1),
            }[ring]
            if ring in (Ring.BUSY, Ring.CONGESTION):
                self._set_state(two, 7)
            if ring in (Ring.UNREACHABLE, Ring.UNALLOCATED):
                self._hangup_request(two, cause)
            self._broadcast(dial_event("DialEnd", a.one, one, ("DialStatus", status)))
            if ring is Ring.NO_ANSWER:  # 02e order
                self._hangup_request(two, 0)
                self._hangup(one, 0)
                self._soft_hangup_request(two)
                self._hangup(two, 0)
            elif ring in (Ring.UNREACHABLE, Ring.UNALLOCATED):
                self._hangup(two, cause)
                self._hangup(one, 0)
            else:  # 02d order
                self._hangup_request(two, 0)
                self._soft_hangup_request(two)
                self._hangup(two, cause)
                self._hangup(one, 0)
        a.one.priority = 2
        self._end_first_leg(a, hangup_cause)
        self._local_idle(b)
        return cause

    async def _bridge(self, call: _Call, a: _Leg, b: _Leg) -> None:
        bridge_id = str(uuid.uuid4())
        self._broadcast([("Event", "BridgeCreate"), ("Privilege", CALL), *bridge_fields(bridge_id, 0)])
        b.one.bridge_id = a.one.bridge_id = bridge_id
        self._broadcast([("Event", "BridgeEnter"), ("Privilege", CALL), *bridge_fields(bridge_id, 1),
                         *channel_fields(b.one)])
        self._broadcast([("Event", "BridgeEnter"), ("Privilege", CALL), *bridge_fields(bridge_id, 2),
                         *channel_fields(a.one)])
        talk_times = [leg.callee.talk_time for leg in (a, b) if leg.callee is not None]
        await self._pause(call, min(talk_times, default=0.0))
        # 02c order, whoever hung up.
        self._broadcast([("Event", "BridgeLeave"), ("Privilege", CALL), *bridge_fields(bridge_id, 1),
                         *channel_fields(a.one)])
        self._soft_hangup_request(a.one)
        self._hangup_request(a.two, 16)
        self._broadcast([("Event", "BridgeLeave"), ("Privilege", CALL), *bridge_fields(bridge_id, 0),
                         *channel_fields(b.one)])
        self._broadcast([("Event", "BridgeDestroy"), ("Privilege", CALL), *bridge_fields(bridge_id, 0)])
        b.one.bridge_id = a.one.bridge_id = ""
        self._hangup_request(b.two, 16)
        self._hangup(b.one, 16)
        self._soft_hangup_request(b.two)
        self._hangup(b.two, 16)
        self._phone_activity(b.phone, talking=-1)
        self._local_idle(b)
        self._soft_hangup_request(a.two)
        self._hangup(a.two, 16)
        self._hangup(a.one, 16)
        self._phone_activity(a.phone, talking=-1)
        self._local_idle(a)
        call.record.ended_at = time.time()


def local_bridge_event(one: Channel, two: Channel) -> list[Field]:
    return [
        ("Event", "LocalBridge"), ("Privilege", CALL),
        *channel_fields(one, "LocalOne"), *channel_fields(two, "LocalTwo"),
        ("Context", two.context), ("Exten", two.exten), ("LocalOptimization", "Yes"),
    ]


def _event_tv(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+0000"


def _seconds_variable(value: str | None, default: float) -> float:
    try:
        seconds = float(value) if value is not None else default
    except ValueError:
        return default
    return seconds if seconds > 0 else default


def _optional_seconds(value: str | None, name: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise PhoneBookError(f"Invalid {name}: {value}") from None
    if seconds < 0:
        raise PhoneBookError(f"Invalid {name}: {value}")
    return seconds


def _float_arg(args: list[str], default: float) -> float:
    try:
        return float(args[0]) if args and args[0] != "" else default
    except ValueError:
        return default


def _device_state_assignment(args: list[str]) -> tuple[str, str] | None:
    """``Set(DEVICE_STATE(Custom:3000)=INUSE)`` -> ("Custom:3000", "INUSE")."""
    match = re.fullmatch(r"DEVICE_STATE\((.+)\)=(\w+)", ",".join(args).strip(), re.IGNORECASE)
    return (match.group(1), match.group(2).upper()) if match else None
