"""The simulated phones behind the built-in AMI simulator, and their phone book (YAML).

A *phone book* says how each number behaves when it is called. Internal extensions are listed
one by one; every other number (external numbers such as ``0312345678``) behaves like the
``default`` entry, or is an *unallocated number* when there is no default.

Phone book file (``pbx/phones.yaml``)::

    talk_time: 20          # seconds a connected call lasts before the parties hang up (default 20)
    phones:                # internal extensions; each gets a hint PJSIP/<ext> in the dial context
      "2000": {behaviour: answer, answer_after: 1}
      "2003": {behaviour: busy}
      "2004": no-answer    # shorthand: just the behaviour
    default: {behaviour: answer, answer_after: 3}   # any other number; leave out = unallocated

Per entry: ``behaviour`` (below), ``answer_after`` (seconds of ringing before answering, for
``answer``; default 0), ``talk_time`` (overrides the top-level one), ``fax`` (true: a fax
machine that receives ``SendFAX``; default false), ``digit`` (the DTMF key the person presses
when a call asks them something with ``Read()``, e.g. ``"1"`` for yes, ``"2"`` for no; default
none: they press nothing and the question times out) and ``digit_after`` (seconds after the
prompt before they press it; default 1). Durations may be numbers of seconds or strings such as
``"1.5s"`` / ``"2m"``.

Behaviours (what a caller of the number experiences):

============== ===================================================== ================
behaviour      what happens                                          idle device state
============== ===================================================== ================
answer         rings ``answer_after`` s, then answers                NOT_INUSE
busy           busy at once (the phone is on another call)           INUSE
dnd            do-not-disturb: acts busy                             BUSY
no-answer      rings until the caller gives up                       NOT_INUSE
unreachable    switched off / not registered                         UNAVAILABLE
congestion     the network cannot complete the call                  NOT_INUSE
============== ===================================================== ================

A phone is a single line: while it rings or talks, another call to it finds it busy, as with
a real desk phone without call waiting. Its device state follows: RINGING while it rings,
INUSE while it talks, then back to the idle state of its behaviour.

Everything here is plain data and pure functions; timing and AMI events live in ``simulator``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from pytimeparse2 import parse as parse_seconds

from ..yamlfile import read_yaml

DEFAULT_TALK_TIME = 20.0


class PhoneBookError(ValueError):
    """A phone book that cannot be used; the message names the entry and the problem."""


class Behaviour(StrEnum):
    ANSWER = "answer"
    BUSY = "busy"
    DND = "dnd"
    NO_ANSWER = "no-answer"
    UNREACHABLE = "unreachable"
    CONGESTION = "congestion"


class DeviceState(StrEnum):
    """Asterisk device states as DeviceStateChange spells them."""

    NOT_INUSE = "NOT_INUSE"
    INUSE = "INUSE"
    BUSY = "BUSY"
    UNAVAILABLE = "UNAVAILABLE"
    RINGING = "RINGING"
    RINGINUSE = "RINGINUSE"
    ONHOLD = "ONHOLD"
    INVALID = "INVALID"
    UNKNOWN = "UNKNOWN"


# ExtensionStatus / ExtensionState Status and StatusText for each device state (capture 05).
EXTENSION_STATUS: dict[DeviceState, tuple[int, str]] = {
    DeviceState.NOT_INUSE: (0, "Idle"),
    DeviceState.INUSE: (1, "InUse"),
    DeviceState.BUSY: (2, "Busy"),
    DeviceState.UNAVAILABLE: (4, "Unavailable"),
    DeviceState.RINGING: (8, "Ringing"),
    DeviceState.RINGINUSE: (9, "InUse&Ringing"),
    DeviceState.ONHOLD: (16, "Hold"),
    DeviceState.INVALID: (4, "Unavailable"),
    DeviceState.UNKNOWN: (-1, "Unknown"),
}

_IDLE_STATE = {
    Behaviour.ANSWER: DeviceState.NOT_INUSE,
    Behaviour.NO_ANSWER: DeviceState.NOT_INUSE,
    Behaviour.CONGESTION: DeviceState.NOT_INUSE,
    Behaviour.BUSY: DeviceState.INUSE,
    Behaviour.DND: DeviceState.BUSY,
    Behaviour.UNREACHABLE: DeviceState.UNAVAILABLE,
}


@dataclass(frozen=True)
class PhoneSpec:
    """How one number behaves when called."""

    behaviour: Behaviour = Behaviour.ANSWER
    answer_after: float = 0.0
    talk_time: float = DEFAULT_TALK_TIME
    fax: bool = False  # a fax machine: SendFAX to it succeeds
    digit: str | None = None  # the DTMF key pressed when asked (Read()); None: presses nothing
    digit_after: float = 1.0  # seconds after the prompt before the key is pressed


@dataclass(frozen=True)
class PhoneBook:
    phones: dict[str, PhoneSpec] = field(default_factory=dict)  # internal extensions (hinted)
    default: PhoneSpec | None = None  # any other number; None = unallocated

    def lookup(self, number: str) -> PhoneSpec | None:
        spec = self.phones.get(number)
        return spec if spec is not None else self.default


class CallAttempt(StrEnum):
    """What a phone does with a new incoming call, given its behaviour and whether it is free."""

    RING_THEN_ANSWER = "ring-then-answer"
    RING_FOREVER = "ring-forever"
    BUSY = "busy"
    CONGESTION = "congestion"
    UNREACHABLE = "unreachable"
    UNALLOCATED = "unallocated"


def attempt_for(spec: PhoneSpec | None, *, line_free: bool) -> CallAttempt:
    """Decide how a call to a number goes. A phone already ringing or talking is busy."""
    if spec is None:
        return CallAttempt.UNALLOCATED
    if spec.behaviour is Behaviour.UNREACHABLE:
        return CallAttempt.UNREACHABLE
    if spec.behaviour is Behaviour.CONGESTION:
        return CallAttempt.CONGESTION
    if spec.behaviour in (Behaviour.BUSY, Behaviour.DND) or not line_free:
        return CallAttempt.BUSY
    if spec.behaviour is Behaviour.NO_ANSWER:
        return CallAttempt.RING_FOREVER
    return CallAttempt.RING_THEN_ANSWER


def idle_state(spec: PhoneSpec) -> DeviceState:
    return _IDLE_STATE[spec.behaviour]


@dataclass
class Phone:
    """A phone's live state: its spec (changeable with SimPhone) and its current activity."""

    number: str
    spec: PhoneSpec
    hinted: bool  # listed in the phone book: has hint PJSIP/<number>
    ringing: int = 0
    talking: int = 0

    @property
    def line_free(self) -> bool:
        return self.ringing == 0 and self.talking == 0

    @property
    def device_state(self) -> DeviceState:
        if self.talking:
            return DeviceState.RINGINUSE if self.ringing else DeviceState.INUSE
        if self.ringing:
            return DeviceState.RINGING
        return idle_state(self.spec)

    @property
    def device(self) -> str:
        return f"PJSIP/{self.number}"


def with_behaviour(spec: PhoneSpec, behaviour: Behaviour, answer_after: float | None,
                   talk_time: float | None, digit: str | None = None) -> PhoneSpec:
    """``spec`` with what SimPhone changes; ``digit`` "" means "presses nothing", None keeps it."""
    return replace(
        spec,
        behaviour=behaviour,
        answer_after=spec.answer_after if answer_after is None else answer_after,
        talk_time=spec.talk_time if talk_time is None else talk_time,
        digit=spec.digit if digit is None else (digit or None),
    )


DTMF_KEYS = frozenset("0123456789*#ABCD")


def parse_digit(value: Any, where: str = "digit") -> str | None:
    """A single DTMF key (0-9, *, #, A-D), or None for "presses nothing" (null / empty)."""
    if value is None or value == "":
        return None
    text = str(value).strip().upper()
    if text not in DTMF_KEYS:
        raise PhoneBookError(f"{where}: {value!r} is not one DTMF key (0-9, *, #, A-D)")
    return text


# --- loading ------------------------------------------------------------------------------------


def load_phone_book(path: str | Path) -> PhoneBook:
    raw = read_yaml(path, PhoneBookError) or {}
    try:
        return parse_phone_book(raw)
    except PhoneBookError as exc:
        raise PhoneBookError(f"{path}: {exc}") from None


def parse_phone_book(raw: Any) -> PhoneBook:
    """A PhoneBook from the YAML structure described in the module docstring."""
    if not isinstance(raw, dict):
        raise PhoneBookError("the top level must be a mapping")
    unknown = set(raw) - {"talk_time", "phones", "default"}
    if unknown:
        raise PhoneBookError(f"{sorted(unknown)[0]}: unknown key (known: default, phones, talk_time)")
    talk_time = _duration(raw.get("talk_time", DEFAULT_TALK_TIME), "talk_time")
    phones_raw = raw.get("phones") or {}
    if not isinstance(phones_raw, dict):
        raise PhoneBookError("phones: must be a mapping of number to entry")
    phones: dict[str, PhoneSpec] = {}
    for number, entry in phones_raw.items():
        number = str(number)
        if not number or not all(c.isdigit() or c in "+*#" for c in number):
            raise PhoneBookError(f"phones.{number}: a number may hold only digits, +, * and #")
        phones[number] = _entry(entry, talk_time, f"phones.{number}")
    default = raw.get("default")
    return PhoneBook(phones=phones,
                     default=None if default is None else _entry(default, talk_time, "default"))


def _entry(entry: Any, talk_time: float, where: str) -> PhoneSpec:
    if isinstance(entry, str):
        entry = {"behaviour": entry}
    if not isinstance(entry, dict):
        raise PhoneBookError(f"{where}: must be a behaviour or a mapping")
    unknown = set(entry) - {"behaviour", "answer_after", "talk_time", "fax", "digit", "digit_after"}
    if unknown:
        raise PhoneBookError(f"{where}.{sorted(unknown)[0]}: unknown key "
                             "(known: answer_after, behaviour, digit, digit_after, fax, talk_time)")
    if not isinstance(entry.get("fax", False), bool):
        raise PhoneBookError(f"{where}.fax: must be true or false")
    behaviour = parse_behaviour(entry.get("behaviour", "answer"), where)
    return PhoneSpec(
        behaviour=behaviour,
        answer_after=_duration(entry.get("answer_after", 0), f"{where}.answer_after"),
        talk_time=_duration(entry.get("talk_time", talk_time), f"{where}.talk_time"),
        fax=entry.get("fax", False),
        digit=parse_digit(entry.get("digit"), f"{where}.digit"),
        digit_after=_duration(entry.get("digit_after", 1.0), f"{where}.digit_after"),
    )


def parse_behaviour(value: Any, where: str = "behaviour") -> Behaviour:
    try:
        return Behaviour(str(value).strip().lower())
    except ValueError:
        known = ", ".join(b.value for b in Behaviour)
        raise PhoneBookError(f"{where}: {value!r} is not a behaviour (known: {known})") from None


def _duration(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise PhoneBookError(f"{where}: must be a duration")
    if isinstance(value, (int, float)):
        seconds: float | None = float(value)
    else:
        seconds = parse_seconds(str(value)) if isinstance(value, str) else None
    if seconds is None or seconds < 0:
        raise PhoneBookError(f"{where}: {value!r} is not a duration (e.g. 3, 1.5s, 2m)")
    return float(seconds)
