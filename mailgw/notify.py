"""Notifications: what the sender is told, rendered from admin-editable jinja2 templates.

A result mail is readable on a phone (short subject with the outcome and the request id, plain
UTF-8 text) and machine-readable through three headers:

* ``X-CTI-Request``: the request id (the one given in ``250 2.0.0 queued as <id>``),
* ``X-CTI-Outcome``: answered, busy, no-answer, unreachable, congestion, invalid-number, rejected,
  failed, expired or dry-run,
* ``X-CTI-Status``: an RFC 3463 status code (2.0.0 on success, 4.x.x temporary, 5.x.x permanent).

Templates live in ``templates/<kind>.<language>.txt``: the first line is ``Subject: ...``, then a
blank line, then the body. They are rendered in jinja2's sandbox because they show text that came
from a sender. A template an admin broke must not lose the notification: the built-in wording is
used instead and the error is logged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from email.header import Header
from email.message import Message
from email.mime.text import MIMEText
from email.utils import format_datetime, formataddr, make_msgid
from typing import Any, Callable

from jinja2 import FileSystemLoader, StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from .config import Config
from .directory import Directory
from .request import ExchangeRequest

log = logging.getLogger("mailgw.notify")

# Outcome -> RFC 3463 code. Telephone outcomes have no mail equivalent, so the closest class is
# used: 4.x.x where trying again later may work, 5.x.x where it will not.
OUTCOME_STATUS = {
    "answered": "2.0.0",
    "dry-run": "2.0.0",
    "busy": "4.2.0",            # destination (mailbox) status: temporarily unavailable
    "no-answer": "4.4.1",       # no answer from host
    "unreachable": "4.4.4",     # unable to route
    "congestion": "4.4.5",      # system congestion
    "expired": "4.4.7",         # delivery time expired
    "failed": "4.0.0",
    "invalid-number": "5.1.1",  # bad destination address
    "rejected": "5.7.1",        # delivery not authorised, refused
    # camp-on and status monitor (mailgw/campon.py)
    "camping": "4.2.0",         # not yet: the gateway keeps trying (the real code is the last attempt's)
    "delivered": "2.0.0",       # on-read: in the recipient's mailbox, waiting to be read (not final)
    "deleted": "5.0.0",         # on-read: deleted unread
    "cancelled": "5.0.0",       # ended by the sender (or an admin) before it could connect
    "refused": "5.7.1",         # refused by policy (limits, duplicate) after acceptance
    "already-ended": "5.0.0",   # a cancel that came after the camp-on had ended
    "unwatchable": "5.3.3",     # the PBX cannot report this phone's state
    "line-state": "2.0.0",      # status monitor: the watched phone rang, answered or hung up
    "monitored": "2.0.0",       # status monitor: the monitor time is over
    # scenarios (mailgw/scenario_run.py)
    "completed": "2.0.0",       # every step was carried out
    "declined": "5.0.0",        # a confirm step was answered NG (no)
    "unconfirmed": "4.4.7",     # a confirm step had no answer in time
}

OUTCOME_JA = {
    "answered": "接続", "dry-run": "確認のみ", "busy": "話し中", "no-answer": "応答なし",
    "unreachable": "圏外・電源オフ", "congestion": "回線混雑", "expired": "期限切れ", "failed": "失敗",
    "invalid-number": "番号が存在しません", "rejected": "着信拒否",
    "delivered": "配信済み", "deleted": "未読削除", "camping": "待機中", "cancelled": "取消", "refused": "ポリシーにより拒否", "already-ended": "終了済み",
    "unwatchable": "監視できません", "line-state": "状態通知", "monitored": "監視終了",
    "completed": "完了", "declined": "辞退", "unconfirmed": "回答なし",
}

LANGUAGES = ("en", "ja")

# Failures of the gateway itself (Result.reason); templates word them in their own language.
REASONS = ("pbx-timeout", "interrupted", "expired")

LINE_STATE_EN = {"idle": "free (hung up)", "in-use": "in use (answered)", "ringing": "ringing", "busy": "busy",
                 "unavailable": "unavailable", "unknown": "unknown"}
LINE_STATE_JA = {"idle": "空き（終話）", "in-use": "通話中（応答）", "ringing": "呼出中", "busy": "話し中",
                 "unavailable": "圏外・電源オフ", "unknown": "不明"}


@dataclass(frozen=True)
class Result:
    """What happened to one request, in the words the notification needs."""

    request_id: str
    outcome: str
    detail: str
    received_at: datetime
    answered_at: datetime | None = None
    dry_run_plan: str = ""
    failed_party: str | None = None   # 'from' (the caller's phone) or 'to' (the destination)
    failed_number: str | None = None  # already masked when the request is confidential
    cause: int | None = None          # Q.850 cause of the failed leg, when the PBX gave one
    reason: str | None = None         # for failures of the gateway itself: see REASONS
    # camp-on (mailgw/campon.py)
    attempts: int | None = None       # calls placed; None when the request was no camp-on
    deadline: datetime | None = None  # end of the monitor window
    status_code: str | None = None    # overrides OUTCOME_STATUS (a "camping" notice: the last attempt's)
    last_outcome: str | None = None   # outcome of the last attempt of a camp-on
    events: tuple[tuple[datetime, str], ...] = ()  # status monitor: (when, line state) since the last mail
    # scenarios (mailgw/scenario_run.py)
    scenario: str | None = None       # the scenario's name ("inline" for one sent in the mail)
    steps: tuple[str, ...] = ()       # one line per step: "1. play: answered - ..."

    @property
    def status(self) -> str:
        return self.status_code or OUTCOME_STATUS.get(self.outcome, "4.0.0")


class TemplateFolder(FileSystemLoader):
    """The templates folder, each template looked at for an admin's edit at most once a second:
    an edit still takes effect without a restart, and a busy gateway does not ``stat`` the file
    for every mail it writes (each system call is a hand-over of the GIL)."""

    check_every = 1.0  # seconds

    def get_source(self, environment: Any, template: str) -> tuple[str, str, Callable[[], bool]]:
        source, filename, uptodate = super().get_source(environment, template)
        checked = time.monotonic()

        def still_current() -> bool:
            nonlocal checked
            now = time.monotonic()
            if now - checked < self.check_every:
                return True
            checked = now
            return bool(uptodate())
        return source, filename, still_current


class Notifier:
    def __init__(self, config: Config, directory: Directory) -> None:
        self.config = config
        self.directory = directory
        self.env = SandboxedEnvironment(
            loader=TemplateFolder(str(config.templates)), undefined=StrictUndefined,
            autoescape=False, keep_trailing_newline=False, auto_reload=True,
        )

    def result_mail(self, request: ExchangeRequest, result: Result, kind: str = "result") -> Message:
        """The result (or failure) mail for the sender of ``request``.

        ``kind`` names the template: ``result`` (how a request ended), ``campon`` (a camp-on has
        started: the gateway keeps trying; reply "cancel" to stop), ``monitor`` (status monitor).
        """
        language = request.language if request.language in LANGUAGES else "en"
        context = self._context(request, result)
        try:
            subject, body = self._render(f"{kind}.{language}.txt", context)
        except (TemplateError, OSError, ValueError) as exc:
            log.error("template %s.%s.txt failed (%s); using the built-in wording", kind, language, exc)
            subject, body = _fallback(context)
        return self._compose(request, result, subject, body)

    def inquiry_mail(self, request: ExchangeRequest, request_id: str, *, to: str, language: str, ask: str,
                     deadline: datetime, reply_to: str) -> Message:
        """A scenario's question for the recipient (``confirm: {via: mail}``), answered OK / NG by reply."""
        language = language if language in LANGUAGES else "en"
        context = {"request_id": request_id, "ask": ask, "deadline": _local(deadline),
                   "sender": request.sender, "subject": request.subject, "domain": self.config.domains[0],
                   "from_label": self.label(request.from_number, request.confidential)}
        try:
            subject, body = self._render(f"inquiry.{language}.txt", context)
        except (TemplateError, OSError, ValueError) as exc:
            log.error("template inquiry.%s.txt failed (%s); using the built-in wording", language, exc)
            subject = f"Question [{request_id}]"
            body = f"{ask}\n\nReply OK to go ahead or NG to decline, before {context['deadline']}.\n"
        message = self._plain(to, subject, body, request_id, auto="auto-generated")
        message["Reply-To"] = reply_to
        return message

    def note_mail(self, request: ExchangeRequest, request_id: str, *, to: str, language: str, text: str) -> Message:
        """A scenario's ``notify`` step: its text, to the sender, the recipient or a local address."""
        language = language if language in LANGUAGES else "en"
        context = {"request_id": request_id, "text": text, "subject": request.subject,
                   "domain": self.config.domains[0]}
        try:
            subject, body = self._render(f"note.{language}.txt", context)
        except (TemplateError, OSError, ValueError) as exc:
            log.error("template note.%s.txt failed (%s); using the built-in wording", language, exc)
            subject, body = f"Note [{request_id}]", text + "\n"
        return self._plain(to, subject, body, request_id, in_reply_to=request.message_id if to == request.sender
                           else "", auto="auto-generated")

    def _compose(self, request: ExchangeRequest, result: Result, subject: str, body: str) -> Message:
        message = self._plain(request.sender, subject, body, result.request_id, in_reply_to=request.message_id)
        message["X-CTI-Outcome"] = result.outcome
        message["X-CTI-Status"] = result.status
        return message

    def _plain(self, to: str, subject: str, body: str, request_id: str, *, in_reply_to: str = "",
               auto: str = "auto-replied") -> Message:
        # compat32 MIME classes, not EmailMessage: composing is on the hot path and the header
        # registry of the modern policy costs about 1 ms a mail; the output is the same MIME.
        message = ascii_text(body) if body.isascii() else MIMEText(body, "plain", "utf-8")
        message["From"] = formataddr(("mailgw", self.config.sender_address))
        message["To"] = to
        message["Subject"] = subject if subject.isascii() else Header(subject, "utf-8")
        message["Date"] = format_datetime(datetime.now().astimezone())
        message["Message-ID"] = make_msgid(domain=self.config.domains[0])
        if in_reply_to:
            message["In-Reply-To"] = in_reply_to
            message["References"] = in_reply_to
        message["Auto-Submitted"] = auto  # RFC 3834: no auto-reply loops
        message["X-CTI-Request"] = request_id
        return message

    def render(self, name: str, context: dict[str, Any]) -> tuple[str, str]:
        """(subject, body) of template ``name`` (e.g. ``absence.ja.txt``) rendered in the sandbox."""
        return self._render(name, context)

    def _render(self, name: str, context: dict[str, Any]) -> tuple[str, str]:
        text = self.env.get_template(name).render(context)
        head, _, body = text.lstrip("\n").partition("\n\n")
        if not head.startswith("Subject:") or "\n" in head.strip():
            raise ValueError(f"{name}: the first line must be 'Subject: ...' followed by a blank line")
        return head[len("Subject:"):].strip(), body.strip("\n") + "\n"

    def _context(self, request: ExchangeRequest, result: Result) -> dict[str, Any]:
        return {
            "request_id": result.request_id,
            "outcome": result.outcome,
            "outcome_ja": OUTCOME_JA.get(result.outcome, result.outcome),
            "status": result.status,
            "detail": result.detail,
            "request": request,
            "confidential": request.confidential,
            "from_label": self.label(request.from_number, request.confidential),
            "to_label": self.label(request.to_number, request.confidential),
            "destination_name": self._name(request.to_number, request.confidential),
            "received_at": _local(result.received_at),
            "answered_at": _local(result.answered_at) if result.answered_at else "",
            "dry_run_plan": result.dry_run_plan,
            "failed_party": result.failed_party,
            "failed_number": result.failed_number,
            "cause": result.cause,
            "reason": result.reason,
            "domain": self.config.domains[0],
            "attempts": result.attempts,
            "deadline": _local(result.deadline) if result.deadline else "",
            "last_outcome": result.last_outcome,
            "last_outcome_ja": OUTCOME_JA.get(result.last_outcome or "", result.last_outcome),
            "events": [(_local(at), state, LINE_STATE_EN.get(state, state), LINE_STATE_JA.get(state, state))
                       for at, state in result.events],
            "gateway_address": self.config.sender_address,
            "scenario": result.scenario,
            "steps": result.steps,
        }

    def label(self, number: str | None, confidential: bool) -> str:
        if number is None:
            return "-"
        if confidential:
            return "(confidential)"
        person = self.directory.by_extension(number)
        return f"{person.name} ({number})" if person else number

    def _name(self, number: str | None, confidential: bool) -> str:
        if number is None or confidential:
            return "(confidential)" if confidential else "-"
        person = self.directory.by_extension(number)
        return person.name if person else number


def ascii_text(body: str) -> Message:
    """``MIMEText(body, "plain", "us-ascii")``, the same headers in the same order, put together
    directly: 1 instead of 17 µs (the email package reads its own Content-Type back to set it)."""
    message = Message()
    message["Content-Type"] = 'text/plain; charset="us-ascii"'
    message["MIME-Version"] = "1.0"
    message["Content-Transfer-Encoding"] = "7bit"
    message.set_payload(body)
    return message


def _local(moment: datetime) -> str:
    # time.localtime gives the local zone's fields without building a timezone object as
    # astimezone() does: a third of the time, and a result mail shows two or three times.
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment.timestamp()))


def _fallback(context: dict[str, Any]) -> tuple[str, str]:
    subject = f"Request {context['request_id']}: {context['outcome']}"
    body = (f"Request {context['request_id']} ended: {context['outcome']} (status {context['status']}).\n"
            f"{context['detail']}\n")
    return subject, body

