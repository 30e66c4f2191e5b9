"""Outgoing calls to outside that were answered, read from AMI events (a missed call followed up).

A phone (or the gateway's own two-point connection) dialling out shows in Asterisk as a
``DialBegin`` whose calling channel (``Channel``) is the phone's — ``PJSIP/2000-0000000a``, or
``Local/2000@mailgw-dial-...;1`` for the gateway's connect — and whose ``DialString`` names the
number (``0312345678@trunk``, ``trunk/sip:0312345678@host``), then a ``DialEnd`` of the same
``DestUniqueid`` with ``DialStatus: ANSWER`` once the far end answered. Dials from the incoming
context (a call from outside ringing phones) are not outgoing calls. ``track`` folds one event into
the dials seen so far, a plain function.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .ami import Message
from .incoming import endpoint

OUTGOING_EVENTS = ("DialBegin", "DialEnd")
MAX_OPEN_DIALS = 2000  # dials whose DialEnd never came (AMI lost) are forgotten beyond this


@dataclass(frozen=True)
class AnsweredOutgoing:
    """``extension`` called ``numbers`` (the most likely first) and the far end answered."""

    extension: str
    numbers: tuple[str, ...]
    answered_at: datetime


def dialled(dial_string: str) -> str:
    """The number in a dial string: ``0312345678@trunk`` / ``trunk/sip:0312345678@host`` → the digits."""
    target = dial_string.split(",", 1)[0].split("@", 1)[0].rsplit("/", 1)[-1]
    for scheme in ("sip:", "sips:", "tel:"):
        target = target.removeprefix(scheme)
    return target.strip()


def track(dials: dict[str, tuple[str, tuple[str, ...]]], msg: Message, incoming_context: str,
          now: datetime) -> AnsweredOutgoing | None:
    """Apply ``msg`` to ``dials`` (DestUniqueid → calling extension, numbers); the answered call."""
    dest = msg.get("DestUniqueid") or ""
    if not dest:
        return None
    if msg.event == "DialBegin":
        extension = endpoint(msg.get("Channel") or "")
        if not extension or msg.get("Context") == incoming_context:
            return None
        numbers = tuple(n for n in (dialled(msg.get("DialString") or ""), (msg.get("Exten") or "").strip()) if n)
        if numbers:
            if len(dials) >= MAX_OPEN_DIALS:
                dials.pop(next(iter(dials)))
            dials[dest] = (extension, numbers)
        return None
    if msg.event != "DialEnd" or (msg.get("DialStatus") or "").upper() in ("RINGING", "PROCEEDING", "PROGRESS"):
        return None
    known = dials.pop(dest, None)
    if known is None or (msg.get("DialStatus") or "").upper() != "ANSWER":
        return None
    return AnsweredOutgoing(known[0], known[1], now)
