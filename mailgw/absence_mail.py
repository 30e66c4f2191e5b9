"""The missed-call mail: a pending notice becomes one short, readable mail in the outbox.

``AbsenceMailer.run`` is a pipeline stage like the outbox worker: it takes every ``pending`` row of
``absence_notices`` (decided by ``callhistory`` when the call ended), renders
``templates/absence.<language>.txt`` in jinja2's sandbox, writes the mail durably and marks the
notice ``queued`` in the same transaction as its outbox row. A restart picks up whatever is still
pending, so a notice is neither lost nor sent twice.

The mail fits a phone: the subject says who and when (``Missed call: Yamada Taro (XX Corp) 15:04``,
the time the call came in, not when it was hung up), the body is plain UTF-8 text with the caller's
number as a ``tel:`` link, the customer's details and this caller's recent calls.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from email import encoders
from email.header import Header
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, formataddr, make_msgid
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from .absence_reply import missed_call_message_id
from .absence import DigestPreference, Pending, plan_sending, subject_name
from .absence_recording import Recording, read_recording
from .config import Config
from .customers import display_number
from .directory import Directory
from .notify import LANGUAGES, Notifier, TemplateFolder
from .outbound import Outbox
from .store import IncomingRow, NoticeRow, Store, utcnow

log = logging.getLogger("mailgw.absence")


class AbsenceMailer:
    def __init__(self, config: Config, directory: Directory, store: Store, outbox: Outbox,
                 notifier: Notifier) -> None:
        self.config = config
        self.directory = directory
        self.store = store
        self.outbox = outbox
        self.notifier = notifier
        self._wake = asyncio.Event()
        # The HTML alternative: the same sandbox, with every variable HTML-escaped.
        self.html_env = SandboxedEnvironment(loader=TemplateFolder(str(config.templates)), undefined=StrictUndefined,
                                             autoescape=True, auto_reload=True)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Send pending notices until cancelled; sleeps until ``wake()`` or the next poll for
        memos written by ``mailgw memo`` (another process), every ``absence.poll_interval``."""
        digests = {address: DigestPreference(calls, every) for address, calls, every in self.config.absence.digests}
        while True:
            self._wake.clear()
            pending = {(n.call_id, n.kind): n for n in await self.store.pending_notices()}
            batches, next_due = plan_sending(
                [Pending(key, n.recipient, n.kind, n.created_at or utcnow()) for key, n in pending.items()],
                digests, utcnow())
            for batch in batches:
                notices = [pending[key] for key in batch.keys]
                if batch.digest:
                    await self._send_digest(notices)
                else:
                    await self._send(notices[0])
            if batches:
                continue
            timeout = self.config.absence.poll_interval
            if next_due is not None:
                timeout = min(timeout, max(0.0, (next_due - utcnow()).total_seconds()))
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _send(self, notice: NoticeRow) -> None:
        call = await self.store.incoming_call(notice.call_id)
        if call is None:  # cannot happen (foreign key); recorded rather than retried forever
            await self.store.notice_queued([notice], None, state="failed", detail="call not recorded")
            return
        customer = await self.store.customer(id=call.customer_id) if call.customer_id else None
        history = await self.store.list_incoming(caller_key=call.caller_key, before=call.started_at,
                                                 limit=self.config.absence.history) if call.caller_key else []
        location = await self.store.recording_of(call.id)
        recording = await read_recording(location, self.config) if location else None
        callbacks = await self.store.callbacks_of([h.id for h in history])
        if recording is not None and recording.attached:  # base64 of up to 5 MB: off the loop
            message = await asyncio.to_thread(self.compose, notice, call, customer, history, recording, callbacks)
        else:
            message = self.compose(notice, call, customer, history, recording, callbacks)
        entry = await self.outbox.prepare(message, rcpt_to=notice.recipient, request_id=None)
        await self.store.notice_queued([notice], entry)
        self.outbox.wake()
        log.info("%s %s: mail to %s queued (%s)", "memo on call" if notice.kind == "memo" else "missed call",
                 call.id, notice.recipient, notice.reason)

    async def _send_digest(self, notices: list[NoticeRow]) -> None:
        """One mail for several missed calls of one person (``absence.digests``)."""
        entries = []
        attachments: list[Attachment] = []
        room = self.config.absence.recording_max_bytes  # for all the digest's recordings together
        callbacks = await self.store.callbacks_of([n.call_id for n in notices])  # followed up meanwhile
        for notice in notices:
            call = await self.store.incoming_call(notice.call_id)
            if call is None:
                continue
            customer = await self.store.customer(id=call.customer_id) if call.customer_id else None
            location = await self.store.recording_of(call.id)
            recording = await read_recording(location, self.config, room) if location else None
            entry = self.context(notice, call, customer, [], notice.language, recording, callbacks)
            if recording is not None and recording.attached:
                room -= len(recording.data)
                attachments.append(Attachment(recording.data, recording.content_type, entry["recording"]["filename"]))
            entries.append(entry)
        first = notices[0]
        language = first.language if first.language in LANGUAGES else "en"
        context = {"calls": entries, "count": len(entries), "recipient": first.recipient,
                   "domain": self.config.domains[0],
                   "first_time": entries[0]["time"] if entries else "", "last_time": entries[-1]["time"] if entries else ""}
        try:
            subject, body = self.notifier.render(f"absence_digest.{language}.txt", context)
        except (TemplateError, OSError, ValueError) as exc:
            log.error("template absence_digest.%s.txt failed (%s); using the built-in wording", language, exc)
            subject = f"Missed calls: {len(entries)}"
            body = "".join(f"{e['started_at']}  {e['who']}  {e['tel']}\n" for e in entries)
        message = await asyncio.to_thread(notice_mail, self.config, first.recipient, subject, body,
                                          attachments=attachments) if attachments else \
            notice_mail(self.config, first.recipient, subject, body)
        message["X-CTI-Calls"] = ", ".join(e["call_id"] for e in entries)
        entry = await self.outbox.prepare(message, rcpt_to=first.recipient, request_id=None)
        await self.store.notice_queued(notices, entry)
        self.outbox.wake()
        log.info("digest of %d missed call(s): mail to %s queued", len(entries), first.recipient)

    def compose(self, notice: NoticeRow, call: IncomingRow, customer: dict[str, Any] | None,
                history: list[IncomingRow], recording: Recording | None = None,
                callbacks: dict[str, tuple[datetime, str]] | None = None) -> Message:
        language = notice.language if notice.language in LANGUAGES else "en"
        context = self.context(notice, call, customer, history, language, recording, callbacks)
        try:
            subject, body = self.notifier.render(f"absence.{language}.txt", context)
        except (TemplateError, OSError, ValueError) as exc:
            log.error("template absence.%s.txt failed (%s); using the built-in wording", language, exc)
            subject, body = _fallback(context)
        attachments = [Attachment(recording.data, recording.content_type, context["recording"]["filename"])] \
            if recording is not None and recording.attached else []
        html = self._html(language, context) if self.config.absence.wants_html(notice.recipient) else None
        message = notice_mail(self.config, notice.recipient, subject, body, html=html, attachments=attachments)
        # Names the call and the caller, so that a reply "call" calls back (absence_reply.py).
        message.replace_header("Message-ID", missed_call_message_id(call.id, call.caller_key, self.config.domains[0]))
        message["X-CTI-Call"] = call.id
        message["X-CTI-Caller"] = call.caller_key or call.caller or "withheld"
        return message

    def context(self, notice: NoticeRow, call: IncomingRow, customer: dict[str, Any] | None,
                history: list[IncomingRow], language: str, recording: Recording | None = None,
                callbacks: dict[str, tuple[datetime, str]] | None = None) -> dict[str, Any]:
        region = self.config.numbering.region
        callbacks = callbacks or {}
        customer = customer or {}
        withheld = call.caller is None
        number = display_number(call.caller_key, region) or (call.caller or "")
        return {
            "call_id": call.id,
            "reason": notice.reason,
            "memo": notice.memo,
            "answered_by": self._person(call.answered_by) if call.answered_by else "",
            "who": subject_name(contact=customer.get("contact") or "", customer=customer.get("name") or "",
                                number=number, withheld=withheld, language=language),
            "time": _local(call.started_at, "%H:%M"),
            "started_at": _local(call.started_at),
            "ended_at": _local(call.ended_at) if call.ended_at else "",
            "ended_unseen": call.ended_unseen,
            "rang_seconds": round((call.ended_at - call.started_at).total_seconds()) if call.ended_at else None,
            "withheld": withheld,
            "number": number,
            "tel": f"tel:{call.caller_key}" if call.caller_key else "",
            "caller_name": call.caller_name or "",
            "customer": {k: (v or "") for k, v in customer.items()},
            "known": bool(customer),
            "rung": [self._person(ext) for ext in call.rung],
            "history": [{"at": _local(h.started_at, "%Y-%m-%d %H:%M"),
                         "answered_by": self._person(h.answered_by) if h.answered_by else "",
                         "called_back": self._called_back(callbacks.get(h.id))} for h in history],
            "called_back": self._called_back(callbacks.get(call.id)),
            "recipient": notice.recipient,
            "domain": self.config.domains[0],
            "recording": recording.context(self.config.absence.recording_max_bytes,
                                           f"voice-message-{_local(call.started_at, '%Y%m%d-%H%M%S')}{recording.suffix}")
            if recording is not None else None,
        }

    def _html(self, language: str, context: dict[str, Any]) -> str | None:
        """``templates/absence.<language>.html`` rendered, or None (plain text only) when it fails."""
        try:
            return self.html_env.get_template(f"absence.{language}.html").render(context)
        except (TemplateError, OSError, ValueError) as exc:
            log.error("template absence.%s.html failed (%s); sending the plain text only", language, exc)
            return None

    def _called_back(self, callback: tuple[datetime, str] | None) -> dict[str, str] | None:
        """When and by whom a missed call was followed up (the caller called back), or None."""
        if callback is None:
            return None
        at, extension = callback
        return {"at": _local(at, "%Y-%m-%d %H:%M"), "time": _local(at, "%H:%M"), "by": self._person(extension)}

    def _person(self, extension: str) -> str:
        person = self.directory.by_extension(extension)
        return f"{person.name} ({extension})" if person else extension


@dataclass(frozen=True)
class Attachment:
    data: bytes
    content_type: str
    filename: str

    def part(self) -> Message:
        maintype, _, subtype = self.content_type.partition("/")
        part = MIMEBase(maintype, subtype or "octet-stream")
        part.set_payload(self.data)
        encoders.encode_base64(part)
        part.add_header("Content-Disposition", "attachment", filename=self.filename)
        return part


def notice_mail(config: Config, recipient: str, subject: str, body: str, *,
                auto_submitted: str = "auto-generated", html: str | None = None,
                attachments: list[Attachment] | tuple[()] = ()) -> Message:
    """A plain-text notice from the gateway (UTF-8 unless it is all ASCII), with an ``html``
    alternative after it (multipart/alternative, plain text first) and ``attachments`` after the
    text (multipart/mixed); RFC 3834 marks it automatic so that no auto-reply answers it."""
    message: Message = MIMEText(body, "plain", "us-ascii" if body.isascii() else "utf-8")
    if html is not None:
        alternative = MIMEMultipart("alternative")
        alternative.attach(message)
        alternative.attach(MIMEText(html, "html", "utf-8"))
        message = alternative
    if attachments:
        mixed = MIMEMultipart("mixed")
        mixed.attach(message)
        for attachment in attachments:
            mixed.attach(attachment.part())
        message = mixed
    message["From"] = formataddr(("mailgw", config.sender_address))
    message["To"] = recipient
    message["Subject"] = subject if subject.isascii() else Header(subject, "utf-8")
    message["Date"] = format_datetime(datetime.now().astimezone())
    message["Message-ID"] = make_msgid(domain=config.domains[0])
    message["Auto-Submitted"] = auto_submitted
    return message


def _local(moment: datetime, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return moment.astimezone().strftime(fmt)


def _fallback(context: dict[str, Any]) -> tuple[str, str]:
    return (f"{'Call memo' if context['reason'] == 'memo' else 'Missed call'}: {context['who']} {context['time']}",
            f"Missed call at {context['started_at']} from {context['number'] or 'a withheld number'} "
            f"{context['tel']}\n")
