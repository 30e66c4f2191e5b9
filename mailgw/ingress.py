"""SMTP ingress: the aiosmtpd protocol on one side, the gateway's acceptance policy on the other.

Like aiosmtpd's handler hooks, protocol and policy are kept apart: ``IngressHandler`` decides per
command (RCPT: is the recipient ours? DATA: is the request understandable and allowed?) and only
answers ``250`` after the raw message is fsynced in the spool and its rows are committed. Every
refusal is an SMTP reply with an RFC 3463 enhanced status code whose text names the problem.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from aiosmtpd.smtp import SMTP, Envelope, Session

from .config import Config
from .directory import Directory, normalise_address
from .policy import check_rate
from .dispatch import check_supported
from .request import ExchangeRequest, describe, parse_request
from .routing import route_recipient
from .spool import Spool, new_id
from .status import Refused, Reply
from .store import NewMessage, Store, hour_ago

log = logging.getLogger("mailgw.ingress")

TEMPORARY_FAILURE = Reply(451, "4.3.0", "temporary failure storing the message; please try again later")


def ascii_reply(reply: Reply | str) -> str:
    """aiosmtpd writes replies as ASCII; keep a sender's non-ASCII text readable instead of crashing."""
    return str(reply).encode("ascii", "backslashreplace").decode("ascii")


LINE_TOO_LONG = ascii_reply(Reply(500, "5.6.0", "line too long: mail lines may have at most 998 characters"
                                                 " (RFC 5321 4.5.3.1.6)"))


class IngressHandler:
    """aiosmtpd handler hooks: the acceptance policy of the gateway."""

    def __init__(self, config: Config, directory: Directory, store: Store, spool: Spool,
                 on_accepted: Callable[[list[str]], None]) -> None:
        self.config = config
        self.directory = directory
        self.store = store
        self.spool = spool
        self.on_accepted = on_accepted

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        try:
            route = route_recipient(address, self.config, self.directory)
        except Refused as refusal:
            log.info("refused RCPT %s from %s: %s", address, session.peer[0] if session.peer else "?", refusal)
            return ascii_reply(refusal.reply)
        envelope.rcpt_tos.append(route.address)
        return "250 2.1.5 recipient ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw: bytes = envelope.original_content or b""
        mail_from = envelope.mail_from or ""
        try:
            requests = [(rcpt, self._parse(raw, mail_from, rcpt)) for rcpt in envelope.rcpt_tos]
            await self._check_rate(requests)
        except Refused as refusal:
            log.info("refused DATA from %s (%d bytes): %s", mail_from or "<>", len(raw), refusal)
            return ascii_reply(refusal.reply)

        queue_id = new_id()
        entries = [self._entry(queue_id, index, len(requests), mail_from, rcpt, request, raw)
                   for index, (rcpt, request) in enumerate(requests, start=1)]
        try:
            path = await asyncio.to_thread(self.spool.store, queue_id, raw)
            entries = [NewMessage(**{**e.__dict__, "spool_path": path}) for e in entries]
            await self.store.add_messages(entries)
        except Exception:  # disk full, database locked, ...: the sender's MTA will try again
            log.exception("could not store message %s", queue_id)
            return ascii_reply(TEMPORARY_FAILURE)

        for entry, (_, request) in zip(entries, requests):
            log_received(entry, request)
        self.on_accepted([e.id for e in entries])
        return f"250 2.0.0 queued as {queue_id}"

    async def handle_exception(self, error: Exception) -> str:
        # Never show a traceback to a client; the log has it.
        log.error("unexpected error in SMTP session", exc_info=error)
        return ascii_reply(TEMPORARY_FAILURE)

    def _parse(self, raw: bytes, mail_from: str, rcpt: str) -> ExchangeRequest | None:
        request = parse_request(raw, mail_from=mail_from, rcpt_to=rcpt, directory=self.directory, config=self.config)
        if request is not None:
            check_supported(request)
        return request

    async def _check_rate(self, requests: list[tuple[str, ExchangeRequest | None]]) -> None:
        senders = {r.sender for _, r in requests if r is not None}
        for sender in senders:
            recent = await self.store.count_requests_since(sender, hour_ago())
            check_rate(recent + sum(1 for _, r in requests if r is not None and r.sender == sender) - 1,
                       self.config.policy, sender=sender)

    def _entry(self, queue_id: str, index: int, count: int, mail_from: str, rcpt: str,
               request: ExchangeRequest | None, raw: bytes) -> NewMessage:
        message_id = queue_id if count == 1 else f"{queue_id}.{index}"
        return NewMessage(
            id=message_id, mail_from=mail_from, rcpt_to=rcpt, spool_path=self.spool.path_for(queue_id),
            size=len(raw), kind="request" if request is not None else "mail",
            sender=request.sender if request is not None else normalise_address(mail_from),
            request=request.to_json() if request is not None else None,
        )


def log_received(entry: NewMessage, request: ExchangeRequest | None) -> None:
    if request is None:
        log.info("mail %s received from %s for %s (%d bytes): no request, deliver to mailbox",
                 entry.id, entry.mail_from or "<>", entry.rcpt_to, entry.size)
        return
    log.info("request %s received from %s for %s (%d bytes)", entry.id, request.sender, entry.rcpt_to, entry.size)
    log.info("request %s parsed: %s", entry.id, describe(request))


class GatewaySMTP(SMTP):
    """aiosmtpd's protocol, with its two size refusals given RFC 3463 codes."""

    def __init__(self, handler: Any, *, max_message_size: int, **kwargs: Any) -> None:
        super().__init__(handler, data_size_limit=max_message_size, **kwargs)
        self._too_big = ascii_reply(Reply(552, "5.3.4", f"message too big: the limit is {max_message_size} bytes"))

    async def push(self, status: Any) -> None:
        text = status.decode("ascii", "replace") if isinstance(status, bytes) else status
        if text.startswith("552 Error:"):
            status = self._too_big
        elif text.startswith("500 Line too long"):
            status = LINE_TOO_LONG
        await super().push(status)


async def start_smtp(handler: IngressHandler, config: Config) -> asyncio.base_events.Server:
    """Listen on ``smtp.listen`` in the running loop (no second loop or thread, unlike Controller)."""
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return GatewaySMTP(handler, max_message_size=config.smtp.max_message_size,
                           hostname=config.domains[0], ident="mailgw", loop=loop)

    return await loop.create_server(factory, host=config.smtp.listen.host, port=config.smtp.listen.port)
