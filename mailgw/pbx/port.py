"""The PBX port: what the gateway asks of a PBX, in plain typed data.

The rest of mailgw depends only on this module; ``driver.AmiPbx`` implements it over AMI, against
a real Asterisk or the built-in simulator alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Callable, Protocol


class CallOutcome(StrEnum):
    ANSWERED = "answered"        # both parties answered and are bridged
    BUSY = "busy"
    NO_ANSWER = "no-answer"
    UNREACHABLE = "unreachable"  # phone not registered / switched off / out of order
    CONGESTION = "congestion"
    INVALID = "invalid-number"   # unallocated number / no such extension (permanent)
    REJECTED = "rejected"        # call rejected (permanent)
    FAILED = "failed"            # anything else


class Party(StrEnum):
    FROM = "from"  # the party called first (the requester's phone)
    TO = "to"      # the destination, dialled once the first party answered


@dataclass(frozen=True)
class ConnectResult:
    """How a two-point connection ended.

    ``outcome`` is ANSWERED when both parties answered; otherwise it is the outcome of
    ``failed_party`` (the first leg that did not answer). ``cause`` is the Q.850 hang-up cause
    of that leg when the PBX gave one.
    """

    call_id: str
    outcome: CallOutcome
    failed_party: Party | None
    cause: int | None
    started_at: datetime
    from_answered_at: datetime | None
    to_answered_at: datetime | None
    ended_at: datetime  # when the result was known (bridge or failure), not the hang-up


@dataclass(frozen=True)
class AskResult:
    """How a question by phone ended (``PbxPort.ask``: a prompt, then one DTMF key).

    ``outcome`` is the call's: ANSWERED when the phone answered (then ``digit`` is the key pressed,
    or None when nothing was pressed before the timeout), else why it was not answered.
    """

    call_id: str
    outcome: CallOutcome
    digit: str | None
    cause: int | None
    started_at: datetime
    answered_at: datetime | None
    ended_at: datetime


@dataclass(frozen=True)
class DeliveryResult:
    """How a voice message (``play``) or a FAX (``send_fax``) to one phone ended.

    ``outcome`` is ANSWERED when the phone answered and the message was played / the FAX went
    through (``pages`` sent); a FAX whose receiver answered but took no page is FAILED. ``cause``
    is the Q.850 hang-up cause when the PBX gave one.
    """

    call_id: str
    outcome: CallOutcome
    cause: int | None
    started_at: datetime
    answered_at: datetime | None
    ended_at: datetime  # when the phone hung up (after the message), or the failure was known
    pages: int | None = None  # FAX only: pages the receiver took


class LineState(StrEnum):
    """What a phone is doing, as the PBX reports it (Asterisk extension/device state, capture 05)."""

    IDLE = "idle"                # Status 0 / NOT_INUSE
    IN_USE = "in-use"            # 1 / INUSE (talking), 9 InUse&Ringing, 16 Hold
    BUSY = "busy"                # 2 / BUSY (e.g. do-not-disturb)
    UNAVAILABLE = "unavailable"  # 4 / UNAVAILABLE, INVALID (not registered, switched off)
    RINGING = "ringing"          # 8 / RINGING
    UNKNOWN = "unknown"          # -1: no hint, so the PBX cannot tell (external numbers)


EXTENSION_STATUS_LINE = {0: LineState.IDLE, 1: LineState.IN_USE, 2: LineState.BUSY, 4: LineState.UNAVAILABLE,
                         8: LineState.RINGING, 9: LineState.IN_USE, 16: LineState.IN_USE}
DEVICE_STATE_LINE = {"NOT_INUSE": LineState.IDLE, "INUSE": LineState.IN_USE, "BUSY": LineState.BUSY,
                     "UNAVAILABLE": LineState.UNAVAILABLE, "INVALID": LineState.UNAVAILABLE,
                     "RINGING": LineState.RINGING, "RINGINUSE": LineState.IN_USE, "ONHOLD": LineState.IN_USE}


def line_state_of_status(status: int) -> LineState:
    """ExtensionState / ExtensionStatus ``Status:`` → LineState (unknown codes are UNKNOWN)."""
    return EXTENSION_STATUS_LINE.get(status, LineState.UNKNOWN)


def line_state_of_device(state: str) -> LineState:
    """DeviceStateChange ``State:`` → LineState."""
    return DEVICE_STATE_LINE.get(state.upper(), LineState.UNKNOWN)


LineCallback = Callable[[str, LineState], None]


class PbxError(Exception):
    """The PBX could not be asked (down, login refused, timed out). Temporary by nature."""


class PbxPort(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def connect(self, call_id: str, from_number: str, to_number: str, *,
                      ring_timeout: float, caller_id: str) -> ConnectResult:
        """Ring ``from_number``; when it answers, ring ``to_number`` and bridge them.

        ``call_id`` is unique per attempt and becomes the Uniqueid (ChannelId) of the first leg,
        so a restarted gateway can find a call it had placed. Returns when both answered or one
        failed; raises PbxError when the PBX could not be asked at all.
        """
        ...

    async def ask(self, call_id: str, number: str, prompt: str, *, timeout: float, ring_timeout: float,
                  caller_id: str) -> AskResult:
        """Ring ``number``; when it answers, play ``prompt`` (a sound name or a path the PBX can
        read, without extension) and read one DTMF key within ``timeout`` seconds (Asterisk
        ``Read()``). ``call_id`` as for ``connect``. Raises PbxError when the PBX could not be asked."""
        ...

    async def play(self, call_id: str, number: str, media: Path, *, ring_timeout: float,
                   caller_id: str) -> DeliveryResult:
        """Ring ``number``; on answer play ``media`` (an 8 kHz WAV the PBX can read), then hang up.
        Returns when the phone hung up or the call failed; raises PbxError as ``connect`` does."""
        ...

    async def send_fax(self, call_id: str, number: str, tiff: Path, *, ring_timeout: float,
                       caller_id: str) -> DeliveryResult:
        """Ring the fax machine ``number`` and send ``tiff`` (TIFF Class F) with SendFAX."""
        ...

    async def find_call(self, call_id: str) -> bool:
        """Whether a call placed with ``call_id`` is still up on the PBX (restart recovery)."""
        ...

    async def line_state(self, number: str) -> LineState:
        """The phone's state now (AMI ExtensionState); UNKNOWN when the PBX has no hint for it."""
        ...

    def watch_line(self, number: str, callback: LineCallback) -> Callable[[], None]:
        """Call ``callback(number, state)`` on every change of the phone's state, until the
        returned function is called. Cheap: one PBX event listener serves every watched number."""
        ...

    def on_resync(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` after every (re)login: events may have been missed, ask again."""
        ...


class PbxUnavailable(PbxError):
    """Nothing reached the PBX (not connected, not logged in): safe to try the same call again."""


@dataclass(frozen=True)
class IncomingCall:
    """An incoming call from outside as the PBX shows it so far (``AmiPbx.watch_incoming``).

    ``call_id`` is the trunk channel's Uniqueid (the call's Linkedid). ``caller`` is the number the
    network gave, None when it was withheld. ``rung`` lists the extensions it rang, in order;
    ``answered_by`` the one that answered, None while nobody has. ``ended_at`` is set when the
    caller's channel hung up; ``ended_unseen`` when the call was found gone after the gateway had
    lost sight of it (restart, AMI reconnect), so how it went on is unknown. ``recording`` is
    where the PBX put a recording of the call (``incoming.RECORDING_VARIABLES``), if it made one.
    """

    call_id: str
    started_at: datetime
    caller: str | None
    caller_name: str | None
    exten: str                      # the number it came in on (DID), as the trunk context saw it
    rung: tuple[str, ...] = ()
    answered_by: str | None = None
    answered_at: datetime | None = None
    ended_at: datetime | None = None
    cause: int | None = None
    ended_unseen: bool = False
    recording: str | None = None    # a path or URL the PBX set in a channel variable (a voice message)


IncomingCallback = Callable[[IncomingCall], None]
