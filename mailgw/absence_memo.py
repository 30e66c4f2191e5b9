"""Memos about a call: a colleague who took it writes one, the person in charge gets it by mail.

``prepare_memo`` is the one way a memo is made, for ``mailgw memo`` and for memos by mail; the mail
form (``parse_memo_mail``) is, in the spirit of the ``absent`` command and the ``call`` reply:

* to a service mailbox (``cti@a.example``), a first line ``memo`` (メモ, 伝言) with the numbers
  of fixed phrases and/or free text, more free text on the lines below::

      memo 1 3 About the invoice.
      They will send it again on Monday.

  The memo is about the latest incoming call the sender's extension answered (within
  ``MEMO_WINDOW``): the colleague who took it writes it, as in seed 002, FIG. 10;
* or the same as a reply to a mail the gateway sent about a call (the missed-call mail, a memo),
  to the gateway's address: that call, whoever answered it.

The sender must be in the directory and known to be them (SMTP AUTH as that address, or a client in
``security.trusted_networks``), as for ``absent``. A phrase number that is not in the list, an empty
memo, no such call, or a call that already has a memo is refused at DATA (``550 5.6.0``) saying so.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import timedelta
from email.message import Message
from email.utils import parseaddr
from typing import Any

from .absence import memo_notice, memo_text
from .absence_reply import missed_call_of
from .auth import Sender, Trust
from .config import Config
from .directory import Directory, Person, normalise_address
from .replies import is_automatic, referenced_ids
from .request import text_body
from .status import Refused
from .store import IncomingRow, NoticeRow, Store, utcnow

MEMO_WORDS = frozenset({"memo", "メモ", "伝言", "伝言メモ"})
MEMO_WINDOW = timedelta(hours=24)  # "memo" to the service mailbox: a call answered this recently
MAX_LINES = 50
_NUMBER = re.compile(r"#?([0-9]{1,3})")
_ATTRIBUTION = re.compile(r".*(wrote|書きました|のメッセージ|より)\s*[:：]\s*$")


@dataclass(frozen=True)
class MemoText:
    """What a memo mail says: the phrase numbers picked and the free text."""

    phrases: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class MemoCommand:
    """A memo by mail, checked and ready to store (``row``)."""

    person: Person
    row: NoticeRow


async def prepare_memo(store: Store, config: Config, directory: Directory, call: IncomingRow,
                       phrases: list[int] | tuple[int, ...], text: str, by: str) -> NoticeRow:
    """The memo notice for ``call``; ValueError saying why there cannot be one."""
    customer = await store.customer(id=call.customer_id) if call.customer_id else None
    from .callhistory import recipients

    notice = memo_notice(call.id, recipients(config, directory, customer), "")
    if notice is None:
        raise ValueError("nobody to send it to (no person in charge, no representative address)")
    memo = memo_text(config.absence.phrases(notice.language), list(phrases), text)
    return NoticeRow(call.id, notice.recipient, notice.language, notice.reason.value, kind="memo",
                     memo=memo + (f"\n-- {by}" if by else ""))


def read_memo(text: str) -> MemoText | None:
    """The memo in a mail's text, None when its first line is not ``memo ...``."""
    lines = text.replace("\r\n", "\n").split("\n")[:MAX_LINES]
    for index, line in enumerate(lines):
        folded = unicodedata.normalize("NFKC", line).strip()
        if not folded:
            continue
        if folded.startswith(">"):
            return None
        word, rest = re.match(r"([^\s:]*)[\s:]*(.*)", folded).groups()  # type: ignore[union-attr]
        if word.casefold() not in MEMO_WORDS:
            return None
        tokens = [t for t in re.split(r"[\s,、]+", rest) if t]
        numbers = []
        while tokens and (match := _NUMBER.fullmatch(tokens[0])):
            numbers.append(int(match.group(1)))
            tokens.pop(0)
        body = [" ".join(tokens)] if tokens else []
        for following in lines[index + 1:]:
            stripped = following.strip()
            if stripped.startswith(">") or stripped in ("--", "-- "):
                break
            body.append(stripped)
        while body and (not body[-1] or _ATTRIBUTION.fullmatch(body[-1])):
            body.pop()
        return MemoText(tuple(numbers), "\n".join(body).strip())
    return None


def check_memo_sender(person: Person, sender: Sender) -> None:
    """Only the person themself, known to be them, writes a memo in their name."""
    if sender.trust is Trust.TRUSTED_NETWORK or (sender.trust is Trust.AUTHENTICATED and sender.login == person.address):
        return
    raise Refused(550, "5.7.1", f"a memo from {person.address} must come after SMTP AUTH as them "
                                "(or from a trusted network)")


async def parse_memo_mail(message: Message, *, mail_from: str, to_gateway: bool, config: Config,
                          directory: Directory, store: Store, sender: Sender) -> MemoCommand | None:
    """The memo a mail to a service mailbox (``to_gateway`` False) or a reply to the gateway's
    mail about a call (``to_gateway`` True) writes; None when it is no memo; Refused when it is
    one that cannot be made."""
    if is_automatic(message, mail_from):
        return None
    referred = missed_call_of(referenced_ids(message)) if to_gateway else None
    if to_gateway and referred is None:
        return None
    memo = read_memo(text_body(message) or "")
    if memo is None:
        return None
    address = normalise_address(parseaddr(str(message.get("From") or ""))[1] or "")
    person = directory.by_address(address) if address else None
    if person is None:
        raise Refused(550, "5.7.1", "memo: only people in the directory can write memos")
    check_memo_sender(person, sender)
    if referred is not None:
        call = await store.incoming_call(referred[0])
        if call is None:
            raise Refused(550, "5.6.0", f"memo: call {referred[0]} is not in the call history")
    else:
        call = await store.last_answered_by(person.extension, utcnow() - MEMO_WINDOW) if person.extension else None
        if call is None:
            raise Refused(550, "5.6.0", f"memo: {person.address} answered no incoming call in the last "
                                        f"{MEMO_WINDOW.total_seconds() / 3600:g} hours; reply 'memo ...' to the "
                                        "gateway's mail about the call instead")
    try:
        row = await prepare_memo(store, config, directory, call, memo.phrases, memo.text, person.name)
    except ValueError as exc:
        raise Refused(550, "5.6.0", f"memo: {exc} (write e.g. 'memo 1 3 About the invoice.')") from None
    existing = await store.memo_of(call.id)
    if existing == row.memo:  # the same memo again: the sender's MTA retrying after a 451 (sent once)
        return MemoCommand(person, row)
    if existing is not None:
        raise Refused(550, "5.6.0", f"memo: call {call.id} already has a memo")
    return MemoCommand(person, row)


async def store_memo(store: Any, command: MemoCommand) -> bool:
    """Record the memo (the mailer sends it); False if the call got one meanwhile."""
    return bool(await store.add_memo(command.row))
