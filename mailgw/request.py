"""Request mail, version 1: MIME bytes in, one ``ExchangeRequest`` (or a refusal) out.

A *request* is a mail that asks the PBX to do something — connect two phones, camp on a busy
line, cancel or watch an earlier request. ``parse_request`` reads one mail for one local
recipient and returns

* ``None`` — ordinary mail for a person: no command block, no ``X-CTI-*`` header, no
  ``application/x-cti+yaml`` part. It is simply delivered. Automatic mail (our own result mails,
  which carry ``X-CTI-Outcome``/``X-CTI-Status``; ``Auto-Submitted: auto-replied``; delivery and
  read reports, ``multipart/report``) is never a request either, so mail loops cannot dial;
* an ``ExchangeRequest`` — plain typed data, stored as JSON (``to_json``/``from_json``);
* or it raises ``Refused`` — and nothing else, whatever the bytes — with the SMTP reply to give at
  DATA: ``550 5.6.0`` for a field or MIME problem (the text names it), ``550 5.7.1`` for a number
  the policy forbids, ``552 5.3.4`` for input over the limits below.

Where fields come from (four sources, merged in this order)
-----------------------------------------------------------
1. The directory. A mail to a person (``bob@a.example``) means "call Bob": his extension is the
   ``to``. A mail to a service mailbox (``requests.service_mailboxes``, e.g. ``cti@a.example``)
   implies no ``to``. The sender's directory entry gives the default ``from``.
2. A command block: the leading ``key: value`` lines of the first text/plain part (not an
   attachment). Blank lines before it are skipped; it ends at the first blank line or line that is
   not ``key: value``. The colon may be full-width (``宛先：２００１``). The lines are a command block
   only if at least one key is a known field or alias — then every key must be known, so a typo
   (``form: 2000``) is refused instead of ignored. Decoded strictly with the part's charset.
3. ``X-CTI-<Field>`` headers (``X-CTI-To: 2001``), names case-insensitive, RFC 2047 decoded.
4. One ``application/x-cti+yaml`` part: a YAML mapping of fields (at most 64 KiB, no anchors or
   aliases). Its ``scenario`` may be a stored scenario's name or an inline scenario (a mapping).

The merge rule. A field given by two explicit sources (block, header, YAML) must have the same
value after normalisation (``03-1234-5678`` equals ``0312345678``); otherwise the mail is refused,
naming both — a silent override would dial a number the sender did not mean. The directory is a
source like the others for ``to``: a mail to Bob that says ``to: 2002`` is refused. ``from`` is the
exception: the sender's own number is implicit, not something they wrote, and people often want to
be called on another phone, so any explicit ``from`` replaces the directory default.

Fields (keys and values are read case-insensitively, full-width forms folded, ``_`` = ``-``)
------------------------------------------------------------------------------------------
============  ========================  ===================================================
field         aliases                   values
============  ========================  ===================================================
action        act, 動作                 connect (default) | camp-on | cancel | monitor;
                                        also campon, camp_on, 接続, 取消, 監視
to            call, dest, 宛先, 相手    extension, external number or directory address
from          caller, src, 発信元, 自分 same; default: the sender's extension
network       net                       extension | toll | public; default: numbering.classify
trigger       trig                      on-receipt (default) | on-read
notify        notice, 通知              yes (default) | no
monitor       mon, 監視時間             a duration (5m, 1h30m, 90s); default and cap in config
retry         再試行                    yes | no (default)
mode          campon-mode               retry (default) | watch
at            日時                      ISO 8601 date-time; without offset it is local time
priority      prio, 優先度              normal (default) | express
confidential  private, 機密             yes | no (default)
scenario      シナリオ                  a stored scenario's name ([a-z0-9][a-z0-9-]{0,63});
                                        in the YAML part also an inline mapping
request       req, request-id           id of an earlier request ([A-Za-z0-9._-]{1,64})
dry-run       dry, dryrun               yes | no (default): parse and check, never dial
============  ========================  ===================================================

yes/no values: yes no true false on off 1 0 はい いいえ.

``connect``/``camp-on`` need ``to`` and ``from`` (and they must differ); ``cancel`` needs
``request``; ``monitor`` needs ``to``. ``at`` may not be more than a minute in the past. Every
number goes through ``numbering.normalise_number`` and then ``policy.check_number`` — ``to`` and
``from`` alike, since both are dialled.

Limits against hostile input: MIME nesting ≤ 10, ≤ 100 parts, a field value ≤ 1000 characters,
a command block ≤ 50 lines, ≤ 50 ``X-CTI-*`` headers, the YAML part ≤ 64 KiB. They apply to mail
that is a request; ordinary mail is delivered whatever its shape.
"""

from __future__ import annotations

import codecs
import email
import email.errors
import email.policy
import email.utils
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.message import Message
from enum import StrEnum
from typing import Any, Callable, Iterator, Mapping

import yaml
from pytimeparse2 import parse as parse_duration

from .config import Config
from .directory import Directory, Person, normalise_address
from .numbering import DIAL_STRING, Network, classify, normalise_number, printable, show
from .policy import check_number
from .status import Refused, field_error

log = logging.getLogger("mailgw.request")

MAX_DEPTH = 10
MAX_PARTS = 100
MAX_VALUE = 1000
MAX_BLOCK_LINES = 50
MAX_CTI_HEADERS = 50
MAX_YAML_BYTES = 64 * 1024
CTI_CONTENT_TYPE = "application/x-cti+yaml"
PAST_GRACE = timedelta(minutes=1)  # clocks differ and mail takes time; "now" is not in the past


# --- the request ---------------------------------------------------------------------------------

class Action(StrEnum):
    CONNECT = "connect"
    CAMP_ON = "camp-on"
    CANCEL = "cancel"
    MONITOR = "monitor"


class Trigger(StrEnum):
    ON_RECEIPT = "on-receipt"  # when the gateway receives the mail
    ON_READ = "on-read"        # when the recipient reads it


class CamponMode(StrEnum):
    RETRY = "retry"  # redial every interval
    WATCH = "watch"  # wait until the busy phone is free, then call


class Priority(StrEnum):
    NORMAL = "normal"
    EXPRESS = "express"


class Source(StrEnum):
    DIRECTORY = "directory"
    BLOCK = "block"
    HEADER = "header"
    YAML = "yaml"


class PartKind(StrEnum):
    VOICE = "voice"
    FAX = "fax"
    TEXT = "text"
    OTHER = "other"


@dataclass(frozen=True)
class Part:
    """One leaf MIME part, as scenarios refer to it ("message 3", ``play: voice``, a Content-ID)."""

    index: int  # 1-based, in the order the mail shows its parts; a single-part mail is part 1
    content_type: str
    filename: str | None
    content_id: str | None  # without the angle brackets
    size: int  # bytes after transfer decoding
    kind: PartKind


@dataclass(frozen=True)
class ExchangeRequest:
    action: Action
    to_number: str | None
    from_number: str | None
    network: Network | None  # None only when there is no ``to``
    trigger: Trigger
    notify: bool
    monitor: float  # seconds
    monitor_capped: bool  # the sender asked for more than requests.monitor_max
    retry: bool
    mode: CamponMode
    at: datetime | None  # aware
    priority: Priority
    confidential: bool
    scenario_name: str | None
    scenario_inline: str | None  # YAML text, validated by the scenario module
    request_ref: str | None
    dry_run: bool
    sender: str  # normalised From address (else MAIL FROM); "" when there is none
    language: str
    recipient: str
    subject: str
    message_id: str
    parts: tuple[Part, ...] = ()
    sources: dict[str, Source] = field(default_factory=dict, hash=False)  # field -> where it came from

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the store keeps it, and the request is resumed from it)."""
        return {
            "version": 1,
            "action": str(self.action),
            "to_number": self.to_number,
            "from_number": self.from_number,
            "network": str(self.network) if self.network is not None else None,
            "trigger": str(self.trigger),
            "notify": self.notify,
            "monitor": self.monitor,
            "monitor_capped": self.monitor_capped,
            "retry": self.retry,
            "mode": str(self.mode),
            "at": self.at.isoformat() if self.at is not None else None,
            "priority": str(self.priority),
            "confidential": self.confidential,
            "scenario_name": self.scenario_name,
            "scenario_inline": self.scenario_inline,
            "request_ref": self.request_ref,
            "dry_run": self.dry_run,
            "sender": self.sender,
            "language": self.language,
            "recipient": self.recipient,
            "subject": self.subject,
            "message_id": self.message_id,
            "parts": [{"index": p.index, "content_type": p.content_type, "filename": p.filename,
                       "content_id": p.content_id, "size": p.size, "kind": str(p.kind)} for p in self.parts],
            "sources": {name: str(source) for name, source in self.sources.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExchangeRequest:
        if data.get("version") != 1:
            raise ValueError(f"unknown request format version {data.get('version')!r}")
        return cls(
            action=Action(data["action"]),
            to_number=data["to_number"],
            from_number=data["from_number"],
            network=Network(data["network"]) if data["network"] is not None else None,
            trigger=Trigger(data["trigger"]),
            notify=bool(data["notify"]),
            monitor=float(data["monitor"]),
            monitor_capped=bool(data["monitor_capped"]),
            retry=bool(data["retry"]),
            mode=CamponMode(data["mode"]),
            at=datetime.fromisoformat(data["at"]) if data["at"] is not None else None,
            priority=Priority(data["priority"]),
            confidential=bool(data["confidential"]),
            scenario_name=data["scenario_name"],
            scenario_inline=data["scenario_inline"],
            request_ref=data["request_ref"],
            dry_run=bool(data["dry_run"]),
            sender=data["sender"],
            language=data["language"],
            recipient=data["recipient"],
            subject=data["subject"],
            message_id=data["message_id"],
            parts=tuple(Part(index=p["index"], content_type=p["content_type"], filename=p["filename"],
                             content_id=p["content_id"], size=p["size"], kind=PartKind(p["kind"]))
                        for p in data["parts"]),
            sources={name: Source(source) for name, source in data["sources"].items()},
        )


# --- the field table -----------------------------------------------------------------------------

@dataclass(frozen=True)
class FieldSpec:
    name: str
    aliases: tuple[str, ...]
    values: str  # for people: what may be written


FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("action", ("act", "動作"), "connect | camp-on | cancel | monitor"),
    FieldSpec("to", ("call", "dest", "宛先", "相手"), "extension, external number or directory address"),
    FieldSpec("from", ("caller", "src", "発信元", "自分"), "extension, external number or directory address"),
    FieldSpec("network", ("net",), "extension | toll | public"),
    FieldSpec("trigger", ("trig",), "on-receipt | on-read"),
    FieldSpec("notify", ("notice", "通知"), "yes | no"),
    FieldSpec("monitor", ("mon", "監視時間"), "duration (5m, 1h30m, 90s)"),
    FieldSpec("retry", ("再試行",), "yes | no"),
    FieldSpec("mode", ("campon-mode",), "retry | watch"),
    FieldSpec("at", ("日時",), "ISO 8601 date-time"),
    FieldSpec("priority", ("prio", "優先度"), "normal | express"),
    FieldSpec("confidential", ("private", "機密"), "yes | no"),
    FieldSpec("scenario", ("シナリオ",), "scenario name, or an inline scenario in the YAML part"),
    FieldSpec("request", ("req", "request-id"), "id of an earlier request"),
    FieldSpec("dry-run", ("dry", "dryrun"), "yes | no"),
)


def normalise_key(key: str) -> str:
    """The comparable form of a field name or alias: NFKC, case-folded, ``_`` read as ``-``."""
    return unicodedata.normalize("NFKC", key).strip().casefold().replace("_", "-")


_FIELD_BY_KEY: dict[str, str] = {
    normalise_key(key): spec.name for spec in FIELDS for key in (spec.name, *spec.aliases)
}


def field_for(key: str) -> str | None:
    """The field a key (name or alias, as written) stands for, or None when it is unknown."""
    return _FIELD_BY_KEY.get(normalise_key(key))


# --- values --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Context:
    config: Config
    directory: Directory
    now: datetime
    caller_number: str | None = None  # from an authenticated peer gateway: the sender's number


def _word(value: str) -> str:
    return unicodedata.normalize("NFKC", value).strip().casefold().replace("_", "-")


def _choice(words: Mapping[str, Any], listed: str) -> Callable[[str, str, _Context], Any]:
    def parse(name: str, value: str, ctx: _Context) -> Any:
        chosen = words.get(_word(value))
        if chosen is None:
            raise field_error(name, f"{show(value)} is not one of {listed}")
        return chosen
    return parse


_ACTION_WORDS = {
    "connect": Action.CONNECT, "接続": Action.CONNECT,
    "camp-on": Action.CAMP_ON, "campon": Action.CAMP_ON,
    "cancel": Action.CANCEL, "取消": Action.CANCEL, "取り消し": Action.CANCEL,
    "monitor": Action.MONITOR, "監視": Action.MONITOR,
}
_YES = {"yes", "true", "on", "1", "はい"}
_NO = {"no", "false", "off", "0", "いいえ"}
_SCENARIO_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _yes_no(name: str, value: str, ctx: _Context) -> bool:
    word = _word(value)
    if word in _YES:
        return True
    if word in _NO:
        return False
    raise field_error(name, f"{show(value)} is not yes or no")


def _number(name: str, value: str, ctx: _Context) -> str:
    """A dial string: a directory address stands for that person's extension."""
    if "@" in value:
        return _extension_of_address(name, value, ctx.directory)
    try:
        return normalise_number(value, region=ctx.config.numbering.region)
    except ValueError as exc:
        raise field_error(name, str(exc)) from None


def _extension_of_address(name: str, value: str, directory: Directory) -> str:
    _, address = email.utils.parseaddr(value)  # also takes "Bob <bob@a.example>"
    person = directory.by_address(address) if address else None
    if person is None:
        shown = normalise_address(address) if address else None
        raise field_error(name, f"{shown or show(value)} is not in the directory")
    return _directory_number(person.extension, f"the directory entry of {person.address}")


def _directory_number(number: str, where: str) -> str:
    # The directory is the admin's file, but its numbers still end up in a dial string.
    if not DIAL_STRING.fullmatch(number):
        raise Refused(451, "4.3.5", f"{where} has an extension that is not a dial string")
    return number


def _duration(name: str, value: str, ctx: _Context) -> float:
    seconds = parse_duration(unicodedata.normalize("NFKC", value).strip())
    try:
        seconds = float(seconds) if seconds is not None else None
    except OverflowError:  # hundreds of digits: not something a person means
        seconds = None
    if seconds is None or seconds != seconds or seconds == float("inf"):
        raise field_error(name, f"{show(value)} is not a duration")
    if seconds <= 0:
        raise field_error(name, f"{show(value)} is not a duration longer than zero")
    return seconds


def _date_time(name: str, value: str, ctx: _Context) -> datetime:
    try:
        moment = datetime.fromisoformat(unicodedata.normalize("NFKC", value).strip())
    except ValueError:
        raise field_error(name, f"{show(value)} is not an ISO 8601 date-time (e.g. 2025-04-01T09:30+09:00)") from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # a time without offset is the gateway's local time
    if moment < ctx.now - PAST_GRACE:
        raise field_error(name, f"{moment.isoformat()} is in the past")
    return moment


def _scenario_name(name: str, value: str, ctx: _Context) -> tuple[str, str]:
    if not _SCENARIO_NAME.fullmatch(value):
        raise field_error(name, f"{show(value)} is not a scenario name (a-z, 0-9 and '-', at most 64)")
    return ("name", value)


def _request_id(name: str, value: str, ctx: _Context) -> str:
    if not _REQUEST_ID.fullmatch(value):
        raise field_error(name, f"{show(value)} is not a request id (letters, digits, '.', '_', '-', at most 64)")
    return value


_PARSERS: dict[str, Callable[[str, str, _Context], Any]] = {
    "action": _choice(_ACTION_WORDS, "connect, camp-on, cancel, monitor"),
    "to": _number,
    "from": _number,
    "network": _choice({n.value: n for n in Network}, "extension, toll, public"),
    "trigger": _choice({t.value: t for t in Trigger}, "on-receipt, on-read"),
    "notify": _yes_no,
    "monitor": _duration,
    "retry": _yes_no,
    "mode": _choice({m.value: m for m in CamponMode}, "retry, watch"),
    "at": _date_time,
    "priority": _choice({p.value: p for p in Priority}, "normal, express"),
    "confidential": _yes_no,
    "scenario": _scenario_name,
    "request": _request_id,
    "dry-run": _yes_no,
}
assert set(_PARSERS) == {spec.name for spec in FIELDS}


@dataclass(frozen=True)
class _Given:
    """One field as one source gave it."""

    name: str
    value: Any  # typed and normalised: what conflicts are judged on
    written: str  # as the sender wrote it, for replies
    where: str  # "the command block", "X-CTI-To", ...
    source: Source


def _given(name: str, written: str, where: str, source: Source, ctx: _Context) -> _Given:
    if len(written) > MAX_VALUE:
        raise Refused(552, "5.3.4", f"field '{name}': value longer than {MAX_VALUE} characters")
    if _has_control(written):
        # Values travel on into headers, logs and AMI actions: no line breaks, no NUL, ever.
        raise field_error(name, "contains a line break or control character")
    if not written:
        raise field_error(name, "no value given")
    return _Given(name, _PARSERS[name](name, written, ctx), written, where, source)


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") and ch != "\t" for ch in text)


# --- reading the mail ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Envelope:
    recipient: str
    service: bool
    recipient_person: Person | None
    sender: str
    sender_person: Person | None


@dataclass
class _Structure:
    leaves: list[tuple[int, Message]] = field(default_factory=list)  # (1-based index, part)
    body: tuple[int, Message] | None = None  # the first text/plain leaf that is not an attachment
    cti_parts: list[tuple[int, Message]] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    too_deep: bool = False
    too_many: bool = False


# Defects after which the email package's view of the structure cannot be trusted: a part could
# hide in what it took for text, or the command block could have been read as headers.
_STRUCTURAL_DEFECTS: dict[type, str] = {
    email.errors.NoBoundaryInMultipartDefect: "multipart without a boundary",
    email.errors.StartBoundaryNotFoundDefect: "multipart whose boundary never occurs",
    email.errors.CloseBoundaryNotFoundDefect: "multipart without its closing boundary (truncated?)",
    email.errors.MultipartInvariantViolationDefect: "multipart content type on a part that is not multipart",
    email.errors.InvalidMultipartContentTransferEncodingDefect: "multipart with a transfer encoding",
    email.errors.MissingHeaderBodySeparatorDefect: "no blank line between the header and the body",
    email.errors.FirstHeaderLineIsContinuationDefect: "the header starts with a continuation line",
    email.errors.MisplacedEnvelopeHeaderDefect: "an envelope 'From ' line inside the header",
}
_BASE64_DEFECTS = (email.errors.InvalidBase64PaddingDefect, email.errors.InvalidBase64CharactersDefect,
                   email.errors.InvalidBase64LengthDefect)


def read_mime(raw: bytes) -> Message:
    """The mail's MIME structure (compat32), or Refused naming why it cannot be read."""
    try:
        # compat32 structure: get_content_type()/get_param() are string operations there, while
        # the modern policy re-parses Content-Type on every call (~10 a mail). Headers shown to
        # people are still decoded with the modern policy in _decoded_header.
        return email.message_from_bytes(raw, policy=email.policy.compat32)
    except RecursionError:
        raise Refused(552, "5.3.4", f"MIME nesting deeper than {MAX_DEPTH} levels") from None
    except Exception as exc:  # the parser is lenient; this is for what it still cannot take
        raise Refused(550, "5.6.0", f"malformed MIME: the message cannot be parsed ({type(exc).__name__})") from None


def _raw_header(entity: Message, name: str) -> str | None:
    wanted = name.lower()
    for key, value in entity.raw_items():
        if key.lower() == wanted:
            return value
    return None


def _decoded_header(entity: Message, name: str) -> str:
    """A header's decoded text for display ("" when absent); never raises."""
    raw = _raw_header(entity, name)
    if raw is None:
        return ""
    if raw.isascii() and "=?" not in raw:
        text = raw  # nothing encoded (most mail): the parser would only unfold it, as done below
    else:
        try:
            text = str(email.policy.default.header_fetch_parse(name, raw[: 4 * MAX_VALUE]))
        except Exception:  # email's structured header parsers trip over garbage
            text = raw
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs") else ch for ch in text)
    return " ".join(text.split())[:MAX_VALUE]


def _is_automatic_response(message: Message) -> bool:
    """Result mails, auto-replies and delivery/read reports: never requests, so loops cannot dial."""
    if _raw_header(message, "X-CTI-Outcome") is not None or _raw_header(message, "X-CTI-Status") is not None:
        return True
    auto = (_raw_header(message, "Auto-Submitted") or "").strip().lower()
    if auto.startswith("auto-replied"):
        return True
    return message.get_content_type() == "multipart/report"


def _envelope(message: Message, mail_from: str, rcpt_to: str, directory: Directory, config: Config) -> _Envelope:
    recipient = normalise_address(rcpt_to) or rcpt_to.strip().lower()
    local, _, domain = recipient.rpartition("@")
    services = {s.lower() for s in config.requests.service_mailboxes}
    service = recipient in services or (local in services and config.is_local_domain(domain))
    sender = _sender(message, mail_from)
    return _Envelope(
        recipient=recipient,
        service=service,
        recipient_person=None if service else directory.by_address(recipient),
        sender=sender,
        sender_person=directory.by_address(sender) if sender else None,
    )


def _sender(message: Message, mail_from: str) -> str:
    """The From address, else the envelope's MAIL FROM, normalised; "" when neither is usable."""
    raw = _raw_header(message, "From")
    if raw is not None and len(raw) <= MAX_VALUE:
        try:
            _, address = email.utils.parseaddr(raw)
        except Exception:
            address = ""
        normalised = normalise_address(address) if "@" in address else None
        if normalised:
            return normalised
    if mail_from and len(mail_from) <= MAX_VALUE:
        return normalise_address(mail_from) or ""
    return ""


def _walk(message: Message) -> _Structure:
    """The leaf parts in document order, without descending into attached mails (message/rfc822)."""
    found = _Structure()
    stack: list[tuple[Message, int]] = [(message, 0)]  # (entity, depth); iterative: depth is hostile input
    entities = 0
    while stack:
        entity, depth = stack.pop()
        if depth > MAX_DEPTH:
            found.too_deep = True
            continue
        if depth > 0:
            entities += 1
            if entities > MAX_PARTS:
                found.too_many = True
                break
        found.defects.extend(_STRUCTURAL_DEFECTS[type(d)] for d in entity.defects if type(d) in _STRUCTURAL_DEFECTS)
        if entity.get_content_maintype() == "multipart" and entity.is_multipart():
            children = entity.get_payload()
            stack.extend((child, depth + 1) for child in reversed(children))
            continue
        index = len(found.leaves) + 1
        found.leaves.append((index, entity))
        content_type = entity.get_content_type()
        if content_type == CTI_CONTENT_TYPE:
            found.cti_parts.append((index, entity))
        elif content_type == "text/plain" and found.body is None and not _is_attachment(entity):
            found.body = (index, entity)
    return found


def walk_leaves(message: Message) -> list[tuple[int, Message]]:
    """The leaf parts with the 1-based index ``Part.index`` gives them (for ``media.part_bytes``)."""
    return _walk(message).leaves


def text_body(message: Message) -> str | None:
    """The mail's text (its first text/plain part that is no attachment), decoded leniently:
    for mail commands (``absent``, ``call``) that only look at its first words."""
    body = _walk(message).body
    if body is None:
        return None
    data = body[1].get_payload(decode=True)
    if not isinstance(data, bytes):
        return None
    try:
        return data.decode(_CODECS.get(charset := _charset_param(body[1]) or "utf-8", charset), errors="replace")
    except (LookupError, ValueError):  # unknown, or a codec such as idna that takes no "replace"
        return data.decode("utf-8", errors="replace")


class ReceivedMail:
    """One mail as DATA received it. Its MIME structure is read once, when first needed: the
    mail-command hooks and the request parser look at it for every recipient."""

    __slots__ = ("raw", "_message", "_text")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._message: Message | None = None
        self._text: tuple[str | None] | None = None

    @property
    def message(self) -> Message:
        """``read_mime(raw)``: Refused when the structure cannot be read."""
        if self._message is None:
            self._message = read_mime(self.raw)
        return self._message

    @property
    def text(self) -> str | None:
        """``text_body(message)``, decoded once."""
        if self._text is None:
            self._text = (text_body(self.message),)
        return self._text[0]


def _is_attachment(entity: Message) -> bool:
    try:
        return entity.get_content_disposition() == "attachment"
    except Exception:
        return False


def _check_structure(structure: _Structure) -> None:
    if structure.too_deep:
        raise Refused(552, "5.3.4", f"MIME nesting deeper than {MAX_DEPTH} levels")
    if structure.too_many:
        raise Refused(552, "5.3.4", f"more than {MAX_PARTS} MIME parts")
    if structure.defects:
        raise Refused(550, "5.6.0", f"malformed MIME: {structure.defects[0]}")


def _part_label(index: int, entity: Message) -> str:
    charset = _charset_param(entity)
    suffix = f"; charset={printable(charset)}" if charset else ""  # a folded parameter may hold CR LF
    return f"part {index} ({printable(entity.get_content_type())}{suffix})"


def _charset_param(entity: Message) -> str | None:
    try:
        charset = entity.get_param("charset")
    except Exception:
        return None
    if isinstance(charset, tuple):  # RFC 2231 form
        charset = charset[2]
    return str(charset).strip().lower()[:40] if charset else None


def _payload(index: int, entity: Message) -> bytes:
    """The part's bytes after quoted-printable/base64 decoding; broken base64 is refused."""
    data = entity.get_payload(decode=True)
    if not isinstance(data, bytes):
        raise Refused(550, "5.6.0", f"malformed MIME: {_part_label(index, entity)} has no body")
    if any(isinstance(d, _BASE64_DEFECTS) for d in entity.defects):
        raise Refused(550, "5.6.0", f"malformed MIME: {_part_label(index, entity)} has broken base64")
    return data


# Charsets as mail labels them -> the Python codec that reads them. Japanese phones label CP932
# (NEC/IBM extensions such as ① and ㈱) as Shift_JIS, and use half-width kana in ISO-2022-JP.
_CODECS = {
    "shift_jis": "cp932", "shift-jis": "cp932", "sjis": "cp932", "x-sjis": "cp932", "windows-31j": "cp932",
    "iso-2022-jp": "iso2022_jp_ext",
}


def _decode_text(data: bytes, index: int, entity: Message, default: str = "utf-8") -> str:
    """Strict decoding with the part's charset; an unknown charset or a bad byte is refused."""
    charset = _charset_param(entity) or default
    try:
        if not re.fullmatch(r"[a-z0-9._:+-]{1,40}", charset):  # a charset is a token (RFC 2978)
            raise LookupError(charset)
        info = codecs.lookup(_CODECS.get(charset, charset))
        if not getattr(info, "_is_text_encoding", True):  # base64_codec, zlib_codec, ...
            raise LookupError(charset)
    except LookupError:
        raise Refused(550, "5.6.0", f"{_part_label(index, entity)}: unknown charset {show(charset)}") from None
    try:
        return data.decode(info.name, errors="strict")
    except UnicodeDecodeError:
        raise Refused(550, "5.6.0", f"{_part_label(index, entity)}: the text is not valid {charset}") from None


# --- source 2: the command block -----------------------------------------------------------------

# One "key: value" line. A key is one word starting with a letter (so "10:30" or "Dear Bob:" end
# the block instead of becoming unknown fields); the colon may be full-width.
_BLOCK_LINE = re.compile(r"[ \t\u3000]*(?P<key>[^\W\d_][\w\-\uff0d]{0,31})[ \t\u3000]*[:\uff1a](?P<value>.*)")


def _lines(text: str) -> Iterator[str]:
    start = 0
    while True:
        end = text.find("\n", start)
        if end < 0:
            yield text[start:]
            return
        yield text[start:end]
        start = end + 1


def command_block(text: str) -> list[tuple[str, str]]:
    """The command block at the top of a text as (key as written, trimmed value) pairs; [] if none.

    Collects at most ``MAX_BLOCK_LINES + 1`` lines, so the caller can tell that a block is too long.
    """
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    lines: list[tuple[str, str]] = []
    started = False
    for line in _lines(text):
        if not line.strip():
            if started:
                break
            continue
        started = True
        match = _BLOCK_LINE.fullmatch(line)
        if match is None:
            break
        lines.append((match["key"], match["value"].strip()))
        if len(lines) > MAX_BLOCK_LINES:
            break
    if not any(field_for(key) for key, _ in lines):
        return []
    return lines


@dataclass(frozen=True)
class _Body:
    block: list[tuple[str, str]]
    problem: Refused | None  # why the text could not be decoded strictly


def _read_body(structure: _Structure) -> _Body:
    if structure.body is None:
        return _Body([], None)
    index, entity = structure.body
    try:
        data = _payload(index, entity)
        return _Body(command_block(_decode_text(data, index, entity)), None)
    except Refused as problem:
        # Undecodable text is only a problem for a request: look (leniently) for a block, so that
        # ordinary mail in a broken charset is still delivered while a broken request is refused.
        raw = entity.get_payload(decode=True)
        lenient = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else ""
        return _Body(command_block(lenient), problem)


def _block_givens(block: list[tuple[str, str]], ctx: _Context) -> list[_Given]:
    if len(block) > MAX_BLOCK_LINES:
        raise Refused(552, "5.3.4", f"command block longer than {MAX_BLOCK_LINES} lines")
    givens = []
    for key, value in block:
        name = field_for(key)
        if name is None:
            raise Refused(550, "5.6.0", f"unknown field {show(key)}")
        givens.append(_given(name, value, "the command block", Source.BLOCK, ctx))
    return givens


# --- source 3: X-CTI-* headers -------------------------------------------------------------------

def _cti_headers(message: Message) -> list[tuple[str, str]]:
    return [(name, value) for name, value in message.raw_items() if name.lower().startswith("x-cti-")]


def _header_givens(headers: list[tuple[str, str]], message: Message, ctx: _Context) -> list[_Given]:
    if len(headers) > MAX_CTI_HEADERS:
        raise Refused(552, "5.3.4", f"more than {MAX_CTI_HEADERS} X-CTI-* headers")
    givens = []
    for name, raw in headers:
        shown_name = name[:60]
        key = normalise_key(name[len("x-cti-"):])
        field_name = field_for(key)
        if field_name is None:
            raise Refused(550, "5.6.0", f"unknown field {show(key)} (header {shown_name})")
        if len(raw) > 4 * MAX_VALUE:  # encoded words make the raw form longer than the value
            raise Refused(552, "5.3.4", f"field '{field_name}': value longer than {MAX_VALUE} characters")
        try:
            value = str(email.policy.default.header_fetch_parse(name, raw)).strip()
        except Exception:
            value = "\ufffd"
        if "\ufffd" in value or any(unicodedata.category(ch) == "Cs" for ch in value):
            raise Refused(550, "5.6.0",
                          f"header {shown_name}: cannot be decoded (write UTF-8 or RFC 2047 encoded words)")
        givens.append(_given(field_name, value, shown_name, Source.HEADER, ctx))
    return givens


# --- source 4: the application/x-cti+yaml part ---------------------------------------------------

_YAML_WHERE = f"the {CTI_CONTENT_TYPE} part"


def _yaml_givens(parts: list[tuple[int, Message]], ctx: _Context) -> list[_Given]:
    if not parts:
        return []
    if len(parts) > 1:
        raise Refused(550, "5.6.0", f"more than one {CTI_CONTENT_TYPE} part (parts {parts[0][0]} and {parts[1][0]})")
    index, entity = parts[0]
    data = _payload(index, entity)
    if len(data) > MAX_YAML_BYTES:
        raise Refused(552, "5.3.4", f"{_YAML_WHERE} is larger than {MAX_YAML_BYTES // 1024} KiB")
    text = _decode_text(data, index, entity)
    document = _compose_yaml(text)
    givens = []
    for key_node, value_node in document.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else ""
        name = field_for(key) if key else None
        if name is None:
            hint = " (an inline scenario goes under 'scenario:')" if normalise_key(key) == "steps" else ""
            raise Refused(550, "5.6.0", f"unknown field {show(key or '?')} in {_YAML_WHERE}{hint}")
        if name == "scenario" and isinstance(value_node, yaml.MappingNode):
            givens.append(_inline_scenario(value_node, text))
        elif isinstance(value_node, yaml.ScalarNode):
            # The text as written (tags and all are ignored, nothing is constructed): YAML's own
            # typing would read 0312345670 as an octal number and +81312345678 without its '+'.
            givens.append(_given(name, value_node.value.strip(), _YAML_WHERE, Source.YAML, ctx))
        elif name == "scenario":
            raise field_error(name, f"must be a scenario name or an inline scenario (a mapping) in {_YAML_WHERE}")
        else:
            raise field_error(name, f"must be a single value in {_YAML_WHERE}")
    return givens


def _compose_yaml(text: str) -> yaml.MappingNode:
    problem = f"{_YAML_WHERE} is not valid YAML"
    try:
        # Anchors and aliases have no use in a request and are how "billion laughs" bombs work.
        if any(isinstance(t, (yaml.AnchorToken, yaml.AliasToken)) for t in yaml.scan(text)):
            raise Refused(550, "5.6.0", f"{_YAML_WHERE}: anchors and aliases are not allowed")
        document = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise Refused(550, "5.6.0", f"{problem} ({getattr(exc, 'problem', None) or 'syntax error'}{where})") from None
    except RecursionError:
        raise Refused(552, "5.3.4", f"{_YAML_WHERE} is nested too deeply") from None
    if not isinstance(document, yaml.MappingNode):
        raise Refused(550, "5.6.0", f"{_YAML_WHERE} must hold a mapping of fields (field: value)")
    return document


def _inline_scenario(node: yaml.MappingNode, text: str) -> _Given:
    loader = yaml.SafeLoader("")
    try:
        loader.construct_document(node)  # only to refuse what YAML itself cannot read
    except yaml.YAMLError as exc:
        raise field_error("scenario", f"not a valid inline scenario ({getattr(exc, 'problem', None) or exc})") from None
    except RecursionError:
        raise Refused(552, "5.3.4", f"{_YAML_WHERE} is nested too deeply") from None
    finally:
        loader.dispose()
    # The scenario's own text, padded so that its lines and columns are those of the YAML part:
    # the scenario module's problems then point at what the sender wrote.
    start, end = node.start_mark, node.end_mark
    own = "\n" * start.line + " " * start.column + text[start.index:end.index]
    return _Given("scenario", ("inline", own), "(an inline scenario)", _YAML_WHERE, Source.YAML)


# --- merging -------------------------------------------------------------------------------------

def _merge(givens: list[_Given]) -> dict[str, _Given]:
    merged: dict[str, _Given] = {}
    for given in givens:
        earlier = merged.setdefault(given.name, given)
        if earlier.value != given.value:
            raise field_error(given.name, f"given twice with different values ({_shown(earlier)} in {earlier.where}, "
                                          f"{_shown(given)} in {given.where})")
    return merged


def _shown(given: _Given) -> str:
    return given.written if given.written.startswith("(") else show(given.written)


def _with_directory(merged: dict[str, _Given], envelope: _Envelope) -> dict[str, _Given]:
    """Add what the directory says: the person mailed is ``to``; the sender is the default ``from``."""
    fields = dict(merged)
    person = envelope.recipient_person
    if person is not None:
        implied = _directory_number(person.extension, f"the directory entry of {person.address}")
        explicit = fields.get("to")
        if explicit is not None and explicit.value != implied:
            raise field_error("to", f"the mail is addressed to {person.address} (extension {implied}) "
                                    f"but {explicit.where} says {show(explicit.written)}")
        if explicit is None:
            fields["to"] = _Given("to", implied, implied, "the directory", Source.DIRECTORY)
    sender = envelope.sender_person
    if sender is not None and "from" not in fields:
        number = _directory_number(sender.extension, f"the directory entry of {sender.address}")
        fields["from"] = _Given("from", number, number, "the directory", Source.DIRECTORY)
    return fields


# --- the whole request ---------------------------------------------------------------------------

def parse_request(raw: bytes, *, mail_from: str, rcpt_to: str, directory: Directory, config: Config,
                  now: datetime | None = None, caller_number: str | None = None,
                  message: Message | None = None) -> ExchangeRequest | None:
    """The exchange request a mail makes of the gateway for one local recipient.

    ``rcpt_to`` is the one local recipient this request is for (the gateway calls this once per
    recipient); ``now`` is for tests (default: the current time); ``caller_number`` is the sender's
    number as a peer gateway vouches for it (the default ``from`` of a relayed request, like the
    directory's extension for a local sender); ``message`` is ``raw`` already read by
    ``read_mime`` (``ReceivedMail``: one parse per DATA, however many recipients). Returns None for ordinary mail;
    raises ``Refused`` — and only ``Refused`` — for anything that cannot be understood or allowed.
    """
    ctx = _Context(config, directory, now or datetime.now(timezone.utc), caller_number)
    try:
        return _parse(bytes(raw), mail_from or "", rcpt_to or "", ctx, message)
    except Refused:
        raise
    except RecursionError:
        raise Refused(552, "5.3.4", f"MIME nesting deeper than {MAX_DEPTH} levels") from None
    except Exception as exc:
        # The email package raises a zoo of exceptions on hostile input; whatever slipped through
        # is still a mail we cannot read, never a crash of the SMTP session.
        log.warning("unreadable message for %s: %s: %s", rcpt_to, type(exc).__name__, exc, exc_info=True)
        raise Refused(550, "5.6.0", "malformed MIME: the message structure cannot be read") from None


def _parse(raw: bytes, mail_from: str, rcpt_to: str, ctx: _Context, message: Message | None) -> ExchangeRequest | None:
    limit = ctx.config.smtp.max_message_size
    if len(raw) > limit:
        raise Refused(552, "5.3.4", f"message too big: the limit is {limit} bytes")
    message = read_mime(raw) if message is None else message
    if _is_automatic_response(message):
        return None
    envelope = _envelope(message, mail_from, rcpt_to, ctx.directory, ctx.config)
    structure = _walk(message)
    headers = _cti_headers(message)
    body = _read_body(structure)
    if not (envelope.service or headers or structure.cti_parts or body.block):
        return None  # ordinary mail for a person

    # From here on the mail asks for a call: anything we cannot read with certainty is refused.
    _check_structure(structure)
    if body.problem is not None:
        raise body.problem
    givens = (_block_givens(body.block, ctx) + _header_givens(headers, message, ctx)
              + _yaml_givens(structure.cti_parts, ctx))
    if not givens:
        raise Refused(550, "5.6.0", "no request fields found: start the mail with lines such as 'to: 2001', "
                                    "or use X-CTI-* headers (see the request format guide)")
    fields = _with_directory(_merge(givens), envelope)
    if ctx.caller_number is not None and "from" not in fields:
        fields["from"] = _Given("from", ctx.caller_number, ctx.caller_number, "the peer gateway", Source.DIRECTORY)
    return _build(fields, envelope, message, structure, ctx)


def _build(fields: dict[str, _Given], envelope: _Envelope, message: Message, structure: _Structure,
           ctx: _Context) -> ExchangeRequest:
    def value(name: str, default: Any = None) -> Any:
        given = fields.get(name)
        return given.value if given is not None else default

    action: Action = value("action", Action.CONNECT)
    to_number: str | None = value("to")
    from_number: str | None = value("from")
    _check_required(action, to_number, from_number, value("request"), envelope)
    for name, number in (("to", to_number), ("from", from_number)):
        if number is not None:
            check_number(number, ctx.config.policy, field=name)

    requests = ctx.config.requests
    monitor = value("monitor", requests.monitor_default)
    scenario_kind, scenario = value("scenario", (None, None))
    network = value("network") or (classify(to_number, ctx.config.numbering) if to_number else None)
    return ExchangeRequest(
        action=action,
        to_number=to_number,
        from_number=from_number,
        network=network,
        trigger=value("trigger", Trigger.ON_RECEIPT),
        notify=value("notify", True),
        monitor=min(monitor, requests.monitor_max),
        monitor_capped=monitor > requests.monitor_max,
        retry=value("retry", False),
        mode=value("mode", CamponMode.RETRY),
        at=value("at"),
        priority=value("priority", Priority.NORMAL),
        confidential=value("confidential", False),
        scenario_name=scenario if scenario_kind == "name" else None,
        scenario_inline=scenario if scenario_kind == "inline" else None,
        request_ref=value("request"),
        dry_run=value("dry-run", False),
        sender=envelope.sender,
        language=envelope.sender_person.language if envelope.sender_person else ctx.config.language,
        recipient=envelope.recipient,
        subject=_decoded_header(message, "Subject"),
        message_id=_decoded_header(message, "Message-ID"),
        parts=tuple(_part(index, entity) for index, entity in structure.leaves),
        sources={name: given.source for name, given in fields.items()},
    )


def _check_required(action: Action, to_number: str | None, from_number: str | None, request: str | None,
                    envelope: _Envelope) -> None:
    if action in (Action.CONNECT, Action.CAMP_ON):
        if to_number is None:
            raise field_error("to", f"not given: '{action}' needs the number to call (e.g. 'to: 2001')")
        if from_number is None:
            raise field_error("from", f"not given and sender {envelope.sender or '<>'} is not in the directory")
        if to_number == from_number:
            raise field_error("to", f"{to_number} is also the 'from' number: a call needs two different phones")
    elif action is Action.CANCEL and request is None:
        raise field_error("request", "not given: 'cancel' needs the id of the request to cancel")
    elif action is Action.MONITOR and to_number is None:
        raise field_error("to", "not given: 'monitor' needs the number to watch")


# --- parts ---------------------------------------------------------------------------------------

# Documents the media module can send as a FAX.
_FAX_TYPES = {"image/tiff", "image/tif", "image/x-tiff", "image/g3fax", "application/pdf", "image/png",
              "image/jpeg", "image/jpg", "image/pjpeg", "image/gif", "image/bmp"}


def part_kind(content_type: str) -> PartKind:
    if content_type.startswith("audio/"):
        return PartKind.VOICE
    if content_type in _FAX_TYPES:
        return PartKind.FAX
    if content_type.startswith("text/"):
        return PartKind.TEXT
    return PartKind.OTHER


def _part(index: int, entity: Message) -> Part:
    content_type = entity.get_content_type()
    return Part(index=index, content_type=content_type, filename=_filename(entity),
                content_id=_content_id(entity), size=_size(entity), kind=part_kind(content_type))


def _clean(text: str, limit: int = 255) -> str:
    return "".join(ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cs", "Zl", "Zp"))[:limit]


def _filename(entity: Message) -> str | None:
    try:
        name = entity.get_filename()
    except Exception:
        return None
    if not name:
        return None
    # A name only, never a path: scenarios must not be able to point outside the message.
    return _clean(re.split(r"[/\\]", str(name))[-1]) or None


def _content_id(entity: Message) -> str | None:
    raw = _raw_header(entity, "Content-ID")
    if raw is None:
        return None
    return _clean(" ".join(raw.split()).strip().strip("<>").strip(), MAX_VALUE) or None


def _size(entity: Message) -> int:
    try:
        data = entity.get_payload(decode=True)
        if isinstance(data, bytes):
            return len(data)
        return len(entity.as_bytes())  # an attached mail: its size as it was sent
    except Exception:
        return 0


def describe(request: ExchangeRequest) -> str:
    """One line a person reads in the log; confidential requests keep their numbers out of it."""
    def number(value: str | None) -> str:
        if value is None:
            return "-"
        return "***" if request.confidential else value
    words = [str(request.action), f"from {number(request.from_number)}", f"to {number(request.to_number)}",
             f"trigger {request.trigger}"]
    if request.dry_run:
        words.append("dry-run")
    if request.request_ref:
        words.append(f"request {request.request_ref}")
    return " ".join(words)
