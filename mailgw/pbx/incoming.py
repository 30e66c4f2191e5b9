"""Incoming calls from outside, read from AMI events (the driver's side of call history).

A trunk call in Asterisk (and in the built-in simulator, ``sim_incoming``) shows as: Newchannel of
the trunk channel in the incoming context (its Uniqueid is the call's Linkedid), NewCallerid with
``CID-CallingPres`` (32 and up: presentation prohibited, i.e. withheld), per rung phone DialBegin
(``Uniqueid`` the trunk, ``DestChannel`` the phone's channel), DialEnd with ``DialStatus: ANSWER``
for the phone that answered, and finally Hangup of the trunk channel. ``track`` folds one event
into the calls seen so far, a plain function over ``IncomingCall`` snapshots.

A recording of the call (the caller's voice message) shows as a ``VarSet`` on any of the call's
channels (``Linkedid`` the trunk's) of one of ``RECORDING_VARIABLES``: what Asterisk's ``Record()``
(``RECORDED_FILE``, without extension), ``VoiceMail()`` (``VM_MESSAGEFILE``) and ``MixMonitor()``
(``MIXMONITOR_FILENAME``) set, or ``MAILGW_RECORDING`` set by the dial plan (a path or a URL).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from .ami import Message
from .port import IncomingCall

INCOMING_EVENTS = ("Newchannel", "NewCallerid", "DialBegin", "DialEnd", "Hangup", "VarSet")
RECORDING_VARIABLES = frozenset({"MAILGW_RECORDING", "RECORDED_FILE", "VM_MESSAGEFILE", "MIXMONITOR_FILENAME"})
UNKNOWN = ("", "<unknown>", "anonymous", "unknown", "private", "withheld")
PROHIBITED_FROM = 32  # Q.931 presentation indicator: 0x20 and above is "presentation prohibited"


def endpoint(channel: str) -> str:
    """``PJSIP/2000-0000000a`` → ``2000``; ``Local/2000@ctx-0000001f;1`` → ``2000``; SIP/IAX2 alike."""
    resource = channel.partition("/")[2] or channel
    resource = resource.rsplit("-", 1)[0] if "-" in resource else resource
    return resource.partition("@")[0]


def _number(value: str | None) -> str | None:
    value = (value or "").strip()
    return None if value.lower() in UNKNOWN else value


def _withheld(msg: Message) -> bool:
    pres = (msg.get("CID-CallingPres") or "").strip()
    digits = pres.split(" ", 1)[0]
    return digits.isdigit() and int(digits) >= PROHIBITED_FROM


def track(calls: dict[str, IncomingCall], msg: Message, context: str, now: datetime) -> IncomingCall | None:
    """Apply ``msg`` to ``calls`` (trunk Uniqueid → snapshot); the new snapshot when it changed.

    Only calls whose trunk channel appeared in ``context`` are followed; every other channel
    (the gateway's own Originates, internal calls) is ignored. An ended call leaves ``calls``.
    """
    event = msg.event
    uid = msg.get("Uniqueid") or ""
    if event == "VarSet":  # on the trunk or a rung phone's channel: the call is their Linkedid
        current = calls.get(msg.get("Linkedid") or uid)
        value = (msg.get("Value") or "").strip()
        if current is None or (msg.get("Variable") or "").upper() not in RECORDING_VARIABLES or not value:
            return None
        if value == current.recording:
            return None
        call = replace(current, recording=value)
        calls[call.call_id] = call
        return call
    if event == "Newchannel":
        if msg.get("Context") != context or uid != (msg.get("Linkedid") or uid) or uid in calls:
            return None
        call = IncomingCall(call_id=uid, started_at=now, caller=_number(msg.get("CallerIDNum")),
                            caller_name=_number(msg.get("CallerIDName")), exten=msg.get("Exten") or "")
    else:
        current = calls.get(uid)
        if current is None:
            return None
        if event == "NewCallerid":
            if _withheld(msg):
                call = replace(current, caller=None, caller_name=None)
            else:
                call = replace(current, caller=_number(msg.get("CallerIDNum")),
                               caller_name=_number(msg.get("CallerIDName")))
        elif event == "DialBegin":
            extension = endpoint(msg.get("DestChannel") or "") or msg.get("DialString") or ""
            if not extension or extension in current.rung:
                return None
            call = replace(current, rung=(*current.rung, extension))
        elif event == "DialEnd":
            if (msg.get("DialStatus") or "").upper() != "ANSWER" or current.answered_by is not None:
                return None
            call = replace(current, answered_by=endpoint(msg.get("DestChannel") or ""), answered_at=now)
        elif event == "Hangup":
            try:
                cause = int(msg.get("Cause") or "")
            except ValueError:
                cause = None
            call = replace(current, ended_at=now, cause=cause)
        else:
            return None
        if call == current:
            return None
    if call.ended_at is None:
        calls[uid] = call
    else:
        calls.pop(uid, None)
    return call


def ended_unseen(call: IncomingCall, now: datetime) -> IncomingCall:
    """The call was found gone on the PBX after the gateway lost sight of it: it ended, somewhen."""
    return replace(call, ended_at=now, ended_unseen=True)
