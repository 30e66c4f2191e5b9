"""Replies to the gateway's own mail: "cancel" in reply to a camp-on's mail cancels it.

Result and camp-on mails come from ``config.sender_address`` (``mailgw@a.example``), so a reply goes
there. Routing takes that address (``RouteKind.GATEWAY``) and ingress reads what arrives for it with
``parse_reply`` instead of ``request.parse_request``:

* automatic mail (bounces with an empty MAIL FROM, ``Auto-Submitted`` other than ``no``, delivery and
  read reports) is not a reply a person wrote: ``None`` — it is kept in the gateway's own mailbox;
* the request it answers is found through ``In-Reply-To`` / ``References`` (the Message-IDs of the
  mails sent for a pending camp-on), else the ``[<request id>]`` every subject carries;
* the first word of the reply text (quoted lines, starting with ``>``, skipped) must be ``cancel``
  (or ``取消``, ``取り消し``, ``キャンセル``, ``stop``); anything else is refused at DATA with a
  ``550 5.6.0`` that says what to write.

The result is an ordinary ``action: cancel`` request from the reply's sender, so the same rule holds
as for a cancel mail: only the original sender (or an admin) may cancel (``550 5.7.1`` otherwise).
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
import unicodedata
from collections.abc import Callable, Iterable
from email.message import Message

from .config import Config
from .directory import Directory, normalise_address
from .request import Action, CamponMode, ExchangeRequest, Priority, Trigger
from .status import Refused

CANCEL_WORDS = frozenset({"cancel", "取消", "取り消し", "取消し", "キャンセル", "stop"})
# A scenario's "confirm via mail" inquiry is answered OK / NG (first word of the reply, NFKC-folded,
# so full-width ＯＫ counts too).
YES_WORDS = frozenset({"ok", "okay", "yes", "y", "はい", "了解", "承認", "お願いします"})
NO_WORDS = frozenset({"ng", "no", "n", "いいえ", "不可", "拒否", "だめ", "ダメ"})
_SUBJECT_ID = re.compile(r"\[([A-Za-z0-9._-]{1,64})\]")
_MESSAGE_ID = re.compile(r"<[^<>\s]{1,250}>")
MAX_REPLY_LINES = 200


def referenced_ids(message: Message) -> list[str]:
    """Message-IDs the reply refers to, nearest first (In-Reply-To, then References newest first)."""
    found: list[str] = []
    for name in ("In-Reply-To", "References"):
        value = message.get(name)
        if value:
            ids = _MESSAGE_ID.findall(str(value))
            found.extend(ids if name == "In-Reply-To" else reversed(ids))
    return found


def first_word(text: str) -> str:
    """The first word of a reply, above the quoted part; NFKC and case folded."""
    for count, line in enumerate(text.replace("\r\n", "\n").split("\n")):
        if count > MAX_REPLY_LINES:
            break
        line = unicodedata.normalize("NFKC", line).strip()
        if not line or line.startswith(">"):
            continue
        word = re.split(r"[\s.,!。、！]+", line, maxsplit=1)[0]
        return word.casefold()
    return ""


def confirm_answer(text: str) -> str | None:
    """The answer a reply to an inquiry gives: "yes" (OK, はい, ...), "no" (NG, いいえ, ...), or None
    when its first word (above the quoted part) is neither."""
    word = first_word(text)
    if word in YES_WORDS:
        return "yes"
    if word in NO_WORDS:
        return "no"
    return None


def body_text(message: Message) -> str:
    part = message.get_body(preferencelist=("plain",)) if hasattr(message, "get_body") else None
    if part is None:
        return ""
    try:
        return str(part.get_content())
    except (LookupError, UnicodeError, AttributeError):
        payload = part.get_payload(decode=True)
        return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""


def is_automatic(message: Message, mail_from: str) -> bool:
    if not mail_from:
        return True  # bounces and other notifications come from the null sender
    auto = str(message.get("Auto-Submitted") or "no").strip().lower()  # compat32: a Header for 8-bit bytes
    return auto != "no" or message.get_content_type() == "multipart/report" or message.get("X-CTI-Outcome") is not None


def parse_reply(raw: bytes, *, mail_from: str, rcpt_to: str, config: Config, directory: Directory,
                lookup: Callable[[Iterable[str]], str | None]) -> ExchangeRequest | None:
    """The cancel request a reply to one of our mails makes, None for automatic mail, or Refused.

    ``lookup`` maps the Message-IDs the reply refers to onto a pending request id.
    """
    message = email.message_from_bytes(raw, policy=email.policy.default)
    if is_automatic(message, mail_from):
        return None
    _, address = email.utils.parseaddr(str(message.get("From") or ""))
    sender = normalise_address(address) if "@" in address else normalise_address(mail_from)
    if not sender:
        raise Refused(550, "5.6.0", "a reply needs a From address")
    request_id = lookup(referenced_ids(message))
    if request_id is None:
        match = _SUBJECT_ID.search(str(message.get("Subject") or ""))
        request_id = match.group(1) if match else None
    if request_id is None:
        raise Refused(550, "5.6.0", f"{rcpt_to} only reads replies to the gateway's mails (to cancel a camp-on, "
                                    "reply to its mail with the word 'cancel'); send requests to a person or to "
                                    f"cti@{config.domains[0]}")
    word = first_word(body_text(message))
    if word not in CANCEL_WORDS:
        raise Refused(550, "5.6.0", f"reply not understood: to cancel request {request_id}, write only the word "
                                    "'cancel' (or 取消) at the top of your reply")
    person = directory.by_address(sender)
    return ExchangeRequest(
        action=Action.CANCEL, to_number=None, from_number=None, network=None, trigger=Trigger.ON_RECEIPT,
        notify=True, monitor=config.requests.monitor_default, monitor_capped=False, retry=False,
        mode=CamponMode.RETRY, at=None, priority=Priority.NORMAL, confidential=False, scenario_name=None,
        scenario_inline=None, request_ref=request_id, dry_run=False, sender=sender,
        language=person.language if person else config.language, recipient=rcpt_to.lower(),
        subject=" ".join(str(message.get("Subject") or "").split())[:1000],
        message_id=str(message.get("Message-ID") or "").strip()[:1000],
    )
