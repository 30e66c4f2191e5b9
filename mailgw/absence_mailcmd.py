"""Absence mode by mail: ``absent`` / ``back`` sent to a service mailbox (``cti@a.example``).

The first line of the mail's text is the command (a phone can write it):

    absent                      absence mode on, until cleared
    absent until 18:00          ... until then (today, or tomorrow when that time has passed)
    absent until 2026-12-24T18:00 / absent 2h
    back                        absence mode off

Japanese works too: 不在 (absent), 在席 / 戻り (back); full-width letters and digits are folded.
Only a person in the directory may do it, for themselves, and only when the gateway knows the mail
is theirs: SMTP AUTH as that address, or a client in ``security.trusted_networks``; anyone else is
refused at DATA with ``550 5.7.1``. The change is committed before ``250`` together with a short
confirmation mail to the person (``templates/absence_mode.<language>.txt``).
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import Message
from email.utils import parseaddr
from typing import Any, Callable

from jinja2 import TemplateError
from pytimeparse2 import parse as parse_seconds

from .absence_mail import notice_mail
from .absence_memo import MEMO_WORDS, MemoCommand, parse_memo_mail, store_memo
from .absence_reply import parse_call_reply
from .auth import Sender, Trust
from .directory import Directory, Person, normalise_address
from .request import ReceivedMail, text_body
from .status import Refused

ABSENT_WORDS = frozenset({"absent", "away", "不在"})
BACK_WORDS = frozenset({"back", "present", "在席", "戻り", "帰社"})
COMMAND_WORDS = ABSENT_WORDS | BACK_WORDS | MEMO_WORDS
MAX_LINES = 20
log = logging.getLogger("mailgw.absence")


@dataclass(frozen=True)
class AbsenceCommand:
    person: Person
    absent: bool
    until: datetime | None = None


def command_words(message: Message) -> list[str] | None:
    """The words of the first non-empty text line, NFKC- and case-folded; None when the mail is
    automatic or has no text."""
    if str(message.get("Auto-Submitted") or "no").strip().lower() != "no":  # compat32: maybe a Header
        return None
    text = text_body(message)
    if text is None:
        return None
    for line in text.splitlines()[:MAX_LINES]:
        words = unicodedata.normalize("NFKC", line).strip().lower().split()
        if words:
            return words
    return None


def first_word(text: str | None) -> str | None:
    """The first word of the text's first non-empty line, NFKC- and case-folded, ended by a space
    or a colon: a mail command is that word, so a mail whose first word is none is no command."""
    for line in (text or "").split("\n", MAX_LINES)[:MAX_LINES]:
        folded = unicodedata.normalize("NFKC", line).strip()
        if folded:
            return folded.split(None, 1)[0].split(":", 1)[0].casefold()
    return None


def parse_until(words: list[str], now: datetime) -> datetime | None:
    """``until 18:00``, ``until 2026-12-24T18:00``, ``2h``, ``until 2h``; ValueError if unreadable."""
    if not words:
        return None
    if words[0] == "until":
        words = words[1:]
    text = " ".join(words).replace("まで", "").strip()
    if not text:
        raise ValueError("until what? e.g. 'absent until 18:00' or 'absent 2h'")
    local = now.astimezone()
    try:  # a time of day first: "18:00" would also read as a duration of 18 minutes
        clock = datetime.strptime(text, "%H:%M").time()
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            seconds = parse_seconds(text)
            if seconds is None:
                raise ValueError(f"{text!r} is no time (18:00, 2026-12-24T18:00) or duration (2h)") from None
            return now + timedelta(seconds=float(seconds))
        return moment if moment.tzinfo else moment.astimezone()
    moment = local.replace(hour=clock.hour, minute=clock.minute, second=0, microsecond=0)
    return moment if moment > local else moment + timedelta(days=1)


def parse_absence_command(message: Message, directory: Directory, now: datetime) -> AbsenceCommand | None:
    """The command in the mail (``request.read_mime``), None when it is no absence command;
    Refused when it is one that cannot be used (sender not in the directory, unreadable time)."""
    words = command_words(message)
    if not words or (words[0] not in ABSENT_WORDS and words[0] not in BACK_WORDS):
        return None
    address = normalise_address(parseaddr(str(message.get("From") or ""))[1] or "")
    person = directory.by_address(address) if address else None
    if person is None:
        raise Refused(550, "5.7.1", f"{words[0]}: only people in the directory have an absence mode")
    if words[0] in BACK_WORDS:
        return AbsenceCommand(person, absent=False)
    try:
        until = parse_until(words[1:], now)
    except ValueError as exc:
        raise Refused(550, "5.6.0", f"absent: {exc} (write e.g. 'absent until 18:00' or 'absent 2h')") from None
    if until is not None and until <= now:
        raise Refused(550, "5.6.0", "absent: that time has passed")
    return AbsenceCommand(person, absent=True, until=until)


def check_sender(command: AbsenceCommand, sender: Sender) -> None:
    """Only the person themself, known to be them, may change their absence mode."""
    if sender.trust is Trust.AUTHENTICATED and sender.login == command.person.address:
        return
    if sender.trust is Trust.TRUSTED_NETWORK:
        return
    raise Refused(550, "5.7.1", f"absence mode of {command.person.address} can only be changed by them, "
                                "after SMTP AUTH (or from a trusted network)")


class AbsenceByMail:
    """The ingress hook: recognises the commands and applies them durably (before ``250``)."""

    def __init__(self, config: Any, directory: Directory, store: Any, outbox: Any, notifier: Any) -> None:
        self.config = config
        self.directory = directory
        self.store = store
        self.outbox = outbox
        self.notifier = notifier
        self.on_memo: Callable[[], None] = lambda: None  # the mailer's wake-up (set by the gateway)

    def parse_reply(self, raw: bytes, mail_from: str, rcpt: str) -> Any:
        """A reply ``call`` to a missed-call mail: the connect request (absence_reply.py), else None."""
        if rcpt.lower() != (normalise_address(self.config.sender_address) or self.config.sender_address.lower()):
            return None
        return parse_call_reply(raw, mail_from=mail_from, rcpt_to=rcpt, config=self.config, directory=self.directory)

    async def parse(self, mail: ReceivedMail, rcpt: str, sender: Sender, mail_from: str = ""
                    ) -> AbsenceCommand | MemoCommand | None:
        """An ``absent``/``back`` or ``memo`` command to a service mailbox, or a ``memo`` reply to
        the gateway's mail about a call (absence_memo.py); None for any other mail."""
        local, _, domain = rcpt.lower().rpartition("@")
        to_gateway = rcpt.lower() == (normalise_address(self.config.sender_address) or self.config.sender_address.lower())
        service = local in self.config.requests.service_mailboxes and self.config.is_local_domain(domain)
        if not service and not to_gateway:
            return None
        if first_word(mail.text) not in COMMAND_WORDS:
            return None  # nearly every mail: a request begins "to: ..."
        memo = await parse_memo_mail(mail.message, mail_from=mail_from or "-", to_gateway=to_gateway,
                                     config=self.config, directory=self.directory, store=self.store, sender=sender)
        if memo is not None or not service:
            return memo
        command = parse_absence_command(mail.message, self.directory, datetime.now(UTC))
        if command is not None:
            check_sender(command, sender)
        return command

    async def apply(self, command: AbsenceCommand | MemoCommand) -> None:
        if isinstance(command, MemoCommand):
            if await store_memo(self.store, command):
                self.on_memo()
                log.info("memo on call %s by %s for %s, by mail", command.row.call_id, command.person.address,
                         command.row.recipient)
            return
        person = command.person
        language = person.language if person.language in ("en", "ja") else "en"
        until = command.until.astimezone().strftime("%Y-%m-%d %H:%M") if command.until else ""
        context = {"absent": command.absent, "until": until, "name": person.name, "address": person.address,
                   "domain": self.config.domains[0], "gateway_address": self.config.sender_address}
        try:
            subject, body = self.notifier.render(f"absence_mode.{language}.txt", context)
        except (TemplateError, OSError, ValueError) as exc:
            log.error("template absence_mode.%s.txt failed (%s); using the built-in wording", language, exc)
            subject = "Absence mode on" if command.absent else "Absence mode off"
            body = subject + (f" until {until}" if until else "") + "\n"
        message = notice_mail(self.config, person.address, subject, body, auto_submitted="auto-replied")
        mail = await self.outbox.prepare(message, rcpt_to=person.address, request_id=None)
        if command.absent:
            await self.store.set_absence(person.address, until=command.until, note="", source="mail", mail=mail)
        else:
            await self.store.clear_absence(person.address, mail=mail)
        self.outbox.wake()
        log.info("absence mode of %s %s by mail%s", person.address, "on" if command.absent else "off",
                 f" until {until}" if until else "")
