"""Read receipts (MDN, RFC 8098) as the user-reception trigger, for mailboxes we cannot watch.

For a person whose directory entry says ``mailbox: {backend: mdn, address: ...}`` the gateway sends
the request mail on to that address with ``Disposition-Notification-To`` naming a one-off address
of its own, ``mailgw+mdn.<token>@<domain>``. The token is random and unguessable, so a receipt that
arrives there speaks for that one delivered mail. When the reader's mail program sends the receipt
(``Disposition: ...; displayed``) the request runs; ``deleted`` ends it unread. The receipt must
come from the address the mail was sent to: a receipt from anyone else is kept, not obeyed.

Parsing is plain functions over ``email`` messages; the dispatcher does the rest.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from email.message import Message
from typing import Awaitable, Callable

from .directory import normalise_address

log = logging.getLogger("mailgw.mdn")

LINK_PREFIX = "mdn:"
_TOKEN = re.compile(r"^[0-9a-f]{32}$")
_DISPOSITION = re.compile(r";\s*([a-z-]+)\s*(?:/|$)", re.IGNORECASE)


def new_token() -> str:
    # Hex: addresses are compared case-insensitively on the way in (directory.normalise_address).
    return secrets.token_hex(16)


def receipt_address(gateway_address: str, token: str, tag: str = "mdn") -> str:
    """``mailgw@a.example`` + token → ``mailgw+mdn.<token>@a.example``. Other one-off addresses of
    the gateway use another ``tag`` (``confirm``: replies to a scenario's inquiry mail)."""
    local, _, domain = gateway_address.rpartition("@")
    return f"{local}+{tag}.{token}@{domain}"


def token_of(address: str, gateway_address: str, tag: str = "mdn") -> str | None:
    """The token of one of our one-off addresses with ``tag``, or None for any other address."""
    local, _, domain = address.rpartition("@")
    gw_local, _, gw_domain = gateway_address.rpartition("@")
    prefix = f"{gw_local}+{tag}.".lower()
    if domain.lower() != gw_domain.lower() or not local.lower().startswith(prefix):
        return None
    token = local[len(prefix):].lower()
    return token if _TOKEN.match(token) else None


@dataclass(frozen=True)
class Receipt:
    disposition: str  # displayed, deleted, dispatched, processed, ... (RFC 8098 section 3.2.6.2)
    final_recipient: str | None
    original_message_id: str | None


def parse_receipt(message: Message) -> Receipt | None:
    """The disposition notification in ``message``, or None when it is not an MDN."""
    if message.get_content_type() != "multipart/report" or \
            message.get_param("report-type", "").lower() != "disposition-notification":
        return None
    for part in message.walk():
        if part.get_content_type() != "message/disposition-notification":
            continue
        fields = _fields(part)
        disposition = fields.get("disposition", "")
        match = _DISPOSITION.search(disposition)
        if match is None:
            return None
        final = fields.get("final-recipient", "")
        return Receipt(disposition=match.group(1).lower(),
                       final_recipient=final.split(";", 1)[-1].strip() or None,
                       original_message_id=fields.get("original-message-id"))
    return None


def _fields(part: Message) -> dict[str, str]:
    """The report's fields, whether the parser made them sub-messages or left them as text."""
    payload = part.get_payload()
    blocks = payload if isinstance(payload, list) else []
    if blocks:
        return {k.lower(): str(v).strip() for block in blocks for k, v in block.items()}
    text = part.get_payload(decode=True) or b""
    found = {}
    for line in text.decode("utf-8", "replace").splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip():
            found[name.strip().lower()] = value.strip()
    return found


def from_reader(message: Message, mail_from: str, reader: str) -> bool:
    """Whether the receipt comes from the address the request mail was sent to."""
    wanted = normalise_address(reader)
    senders = [mail_from, *(str(message.get(name, "")) for name in ("From", "Sender"))]
    return wanted is not None and any(normalise_address(_bare(s)) == wanted for s in senders if s)


def judge(message: Message, mail_from: str, mailbox_address: str | None) -> tuple[Receipt | None, str]:
    """The receipt to obey (None: keep it, do nothing) and a sentence for the log and the store.
    ``mailbox_address`` is where the waiting request was sent; None when no request waits for it."""
    receipt = parse_receipt(message)
    if receipt is None:
        return None, "not a disposition notification"
    if mailbox_address is None:
        return None, "no request is waiting for this receipt (already read, ended, or unknown)"
    if not from_reader(message, mail_from, mailbox_address):
        return None, f"not from {mailbox_address}, the address the request was sent to: ignored"
    return receipt, f"{receipt.disposition} by {mailbox_address}"


def _bare(value: str) -> str:
    match = re.search(r"<([^<>]+)>", value)
    return match.group(1) if match else value


class ReceiptDeadlines:
    """The unread expiry of mail watched only by its read receipt: nothing to poll, so a timer."""

    def __init__(self, *, on_expired: Callable[[str], Awaitable[None]], interval: float = 1.0) -> None:
        self.on_expired = on_expired
        self.interval = interval
        self._deadlines: dict[str, datetime] = {}

    def watch(self, message_id: str, deadline: datetime) -> None:
        self._deadlines[message_id] = deadline

    def forget(self, message_id: str) -> None:
        self._deadlines.pop(message_id, None)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)  # the timer's tick, not a synchronisation
            now = datetime.now(timezone.utc)
            for message_id, deadline in list(self._deadlines.items()):
                if now >= deadline:
                    self._deadlines.pop(message_id, None)
                    try:
                        await self.on_expired(message_id)
                    except Exception:
                        log.exception("expiry of %s failed", message_id)
