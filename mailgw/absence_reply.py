"""Close the loop: reply ``call`` to a missed-call mail and the gateway calls the caller back.

A missed-call mail's Message-ID names the call and the caller's number
(``<missed-81312345678-1796290192.0-1a2b3c4d@a.example>``), so a reply to it (to the gateway's
address, like every reply) is recognised from its ``In-Reply-To`` / ``References`` alone. When the
first word of the reply (above the quoted part) is ``call`` (or 電話, 折り返し, callback), it becomes
an ordinary ``connect`` request from the replying person: their phone rings first, then the
caller's number, through the core pipeline with every rule of a request mail (who may cause calls,
the dialling policy, rate limits) and the usual result mail. Anything else in such a reply is
refused at DATA saying what to write. A caller who withheld their number cannot be called back.

The Message-ID holds nothing a sender could not write in a request mail of their own (``to:`` the
number), so a forged one gains nothing.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
import secrets

from .config import Config
from .directory import Directory, normalise_address
from .numbering import classify, normalise_number
from .policy import check_number
from .replies import body_text, first_word, is_automatic, referenced_ids
from .request import Action, CamponMode, ExchangeRequest, Priority, Trigger
from .status import Refused

CALL_WORDS = frozenset({"call", "callback", "電話", "折り返し", "折返し", "架電"})
_MISSED_ID = re.compile(r"<missed-([0-9]{1,20}|withheld)-([0-9A-Za-z.]{1,64})-[0-9a-f]{8}@[^<>\s]+>")


def missed_call_message_id(call_id: str, caller_key: str | None, domain: str) -> str:
    number = caller_key.lstrip("+") if caller_key else "withheld"
    safe_id = re.sub(r"[^0-9A-Za-z.]", "", call_id)[:64] or "0"
    return f"<missed-{number}-{safe_id}-{secrets.token_hex(4)}@{domain}>"


def missed_call_of(message_ids: list[str]) -> tuple[str, str | None] | None:
    """(call id, caller in E.164 or None when withheld) of the missed-call mail referred to."""
    for message_id in message_ids:
        match = _MISSED_ID.fullmatch(message_id)
        if match:
            number, call_id = match.groups()
            return call_id, None if number == "withheld" else f"+{number}"
    return None


def parse_call_reply(raw: bytes, *, mail_from: str, rcpt_to: str, config: Config,
                     directory: Directory) -> ExchangeRequest | None:
    """The connect request a ``call`` reply to a missed-call mail makes; None when the mail is no
    reply to one (or automatic); Refused when it is one that cannot be done."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    if is_automatic(message, mail_from):
        return None
    found = missed_call_of(referenced_ids(message))
    if found is None:
        return None
    call_id, caller = found
    word = first_word(body_text(message))
    if word not in CALL_WORDS:
        raise Refused(550, "5.6.0", "reply not understood: to call the caller back, write only the word 'call' "
                                    "(or 電話) at the top of your reply; to send a memo, 'memo' and the phrase "
                                    "numbers or text")
    if caller is None:
        raise Refused(550, "5.6.0", f"the caller of call {call_id} withheld their number: it cannot be called back")
    _, address = email.utils.parseaddr(str(message.get("From") or ""))
    sender = normalise_address(address) if "@" in address else normalise_address(mail_from)
    person = directory.by_address(sender) if sender else None
    if person is None:
        raise Refused(550, "5.7.1", "only people in the directory can call back (their phone is rung first)")
    try:
        number = normalise_number(caller, region=config.numbering.region)
    except ValueError as exc:
        raise Refused(550, "5.1.3", f"the caller's number {caller} cannot be dialled: {exc}") from None
    check_number(number, config.policy, field="to")  # the dialling policy, as for a request mail
    return ExchangeRequest(
        action=Action.CONNECT, to_number=number, from_number=person.extension,
        network=classify(number, config.numbering),
        trigger=Trigger.ON_RECEIPT, notify=True, monitor=config.requests.monitor_default, monitor_capped=False,
        retry=False, mode=CamponMode.RETRY, at=None, priority=Priority.NORMAL, confidential=False,
        scenario_name=None, scenario_inline=None, request_ref=None, dry_run=False, sender=person.address,
        language=person.language, recipient=rcpt_to.lower(),
        subject=" ".join(str(message.get("Subject") or "").split())[:1000],
        message_id=str(message.get("Message-ID") or "").strip()[:1000],
    )
