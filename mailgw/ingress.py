"""SMTP ingress: the aiosmtpd protocol on one side, the gateway's acceptance policy on the other.

Like aiosmtpd's handler hooks, protocol and policy are kept apart: ``IngressHandler`` decides per
command (RCPT: is the recipient ours? DATA: is the request understandable and allowed?) and only
answers ``250`` after the raw message and its rows are committed (one transaction, fsynced). Every
refusal is an SMTP reply with an RFC 3463 enhanced status code whose text names the problem.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax

from .config import Config
from .directory import Directory, normalise_address
from .auth import DirectoryAuthenticator, Sender, Trust, dkim_signer, session_sender
from .destinations import Destinations, localise
from .policy import Verdict, authorise, check_number_rate, check_rate, sender_limit
from .dispatch import check_supported
from .media import MediaError, MediaLimits, check_message
from .request import ExchangeRequest, PartKind, ReceivedMail, describe, parse_request
from .inquiry import answer_token, parse_answer
from .mdn import token_of
from .relay import Relay, RelayBatch, RelayCopy
from .routing import route_recipient
from .scenario_library import ScenarioLibrary, scenario_for
from .spool import Spool, new_id
from .status import Refused, Reply
from .store import MessageRow, NewMessage, Store, utcnow
from .tls import server_context

log = logging.getLogger("mailgw.ingress")
audit_log = logging.getLogger("mailgw.audit")

# Clients that may have mail relayed to other offices; a peer gateway delivers to us only.
RELAY_TRUST = (Trust.AUTHENTICATED, Trust.TRUSTED_NETWORK)

TEMPORARY_FAILURE = Reply(451, "4.3.0", "temporary failure storing the message; please try again later")


def ascii_reply(reply: Reply | str) -> str:
    """aiosmtpd writes replies as ASCII; keep a sender's non-ASCII text readable instead of crashing."""
    return str(reply).encode("ascii", "backslashreplace").decode("ascii")


LINE_TOO_LONG = ascii_reply(Reply(500, "5.6.0", "line too long: mail lines may have at most 998 characters"
                                                 " (RFC 5321 4.5.3.1.6)"))


class IngressHandler:
    """aiosmtpd handler hooks: the acceptance policy of the gateway."""

    campons: Any = None  # camp-on hook (mailgw.campon.Campons), set by the gateway
    scenarios: ScenarioLibrary | None = None  # stored scenarios, set by the gateway
    absence: Any = None  # "absent" / "back" mail commands (mailgw.absence_mailcmd.AbsenceByMail)
    relay: Relay | None = None  # relaying to other offices (mailgw.relay), set by the gateway

    def __init__(self, config: Config, directory: Directory, store: Store, spool: Spool,
                 on_accepted: Callable[[list[MessageRow]], None]) -> None:
        self.config = config
        self.directory = directory
        self.store = store
        self.spool = spool
        self.on_accepted = on_accepted

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        try:
            relay = self.relay
            may_relay = session_sender(session, self.config.security.trusted_networks).trust in RELAY_TRUST
            route = route_recipient(address, self.config, self.directory,
                                    relay.destinations if relay else Destinations(), may_relay=may_relay)
        except Refused as refusal:
            log.info("refused RCPT %s from %s: %s", address, session.peer[0] if session.peer else "?", refusal)
            return ascii_reply(refusal.reply)
        envelope.rcpt_tos.append(route.address)
        return "250 2.1.5 recipient ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw: bytes = envelope.original_content or b""
        mail_from = envelope.mail_from or ""
        sender = session_sender(session, self.config.security.trusted_networks)
        relayed: list[RelayCopy] = []
        absence_commands = []
        mail = ReceivedMail(raw)
        try:
            if self.relay is not None:
                self.relay.check_hops(raw)
            requests = []
            for rcpt in envelope.rcpt_tos:
                if self.absence is not None and (command := await self.absence.parse(mail, rcpt, sender, mail_from)) is not None:
                    absence_commands.append(command)  # done (durably) below, before 250
                    continue
                if self.relay is not None and self.relay.is_relayed(rcpt):
                    relayed.append(self.relay.for_recipient(raw, mail_from=mail_from, rcpt=rcpt, sender=sender,
                                                            now=utcnow()))
                    continue
                request = self._parse(mail, mail_from, rcpt, sender)
                copy = self._by_number(raw, request, rcpt, sender)
                if copy is not None:
                    await self._authorise(request, sender, rcpt, raw)  # may this sender ask at all?
                    relayed.append(copy)
                    continue
                if request is None and self.directory.by_address(rcpt) is None and not self._one_off(rcpt):
                    # A service mailbox has no reader: mail that is not a request cannot go there.
                    raise Refused(550, "5.6.0", f"{rcpt} takes requests only, and this mail is none "
                                                "(automatic replies and result mails are not read)")
                if request is not None:
                    request = await self._authorise(request, sender, rcpt, raw)
                if request is not None:
                    await self._check_media(raw, request)
                requests.append((rcpt, request))
            await self._check_rate(requests)
        except Refused as refusal:
            log.info("refused DATA from %s (%d bytes): %s", mail_from or "<>", len(raw), refusal)
            if refusal.reply.status.startswith("5.7."):
                await self._audit(sender, mail_from, f"mail to {', '.join(envelope.rcpt_tos)}", refusal.reply)
            return ascii_reply(refusal.reply)

        queue_id = new_id()
        count = len(requests) + len(relayed)
        entries = [self._entry(queue_id, index, count, mail_from, rcpt, request, raw)
                   for index, (rcpt, request) in enumerate(requests, start=1)]
        try:
            for command in absence_commands:
                await self.absence.apply(command)
            batch = await self.relay.write(raw, relayed, queue_id=queue_id, first=len(requests) + 1,
                                           count=count, mail_from=mail_from, session=session) \
                if relayed and self.relay is not None else RelayBatch()
            # The raw mail (and each relayed copy) is committed with the rows that name it, in the
            # store's group commit; 250 after that.
            spooled = [(self.spool.path_for(queue_id), raw)] if entries else []
            stored = await self.store.add_messages(entries, relayed=batch.rows, contents=spooled)
        except Exception:  # disk full, database locked, ...: the sender's MTA will try again
            log.exception("could not store message %s", queue_id)
            return ascii_reply(TEMPORARY_FAILURE)

        for entry, (_, request) in zip(entries, requests):
            log_received(entry, request)
        if batch.rows and self.relay is not None:
            self.relay.queued(batch)
        for row, domain, _ in batch.rows:
            log.info("mail %s from %s for %s (%d bytes): relayed to %s", row.id, mail_from or "<>", row.rcpt_to,
                     len(raw), domain)
        self.on_accepted(stored)
        return f"250 2.0.0 queued as {queue_id}"

    async def handle_exception(self, error: Exception) -> str:
        # Never show a traceback to a client; the log has it.
        log.error("unexpected error in SMTP session", exc_info=error)
        return ascii_reply(TEMPORARY_FAILURE)

    def _one_off(self, rcpt: str) -> bool:
        """A one-off address of the gateway: a read receipt's or an inquiry answer's."""
        gateway = self.config.sender_address
        return token_of(rcpt, gateway) is not None or answer_token(rcpt, gateway) is not None

    def _by_number(self, raw: bytes, request: ExchangeRequest | None, rcpt: str, sender: Sender) -> RelayCopy | None:
        """A request for a number another office serves (CTIDB): the copy to relay there."""
        if request is None or self.relay is None:
            return None
        return self.relay.for_number(raw, request, rcpt=rcpt, sender=sender, now=utcnow())

    def _parse(self, mail: ReceivedMail, mail_from: str, rcpt: str, sender: Sender) -> ExchangeRequest | None:
        raw = mail.raw
        if token_of(rcpt, self.config.sender_address) is not None:
            return None  # a read receipt: stored as it is, the dispatcher reads it (mailgw/mdn.py)
        if answer_token(rcpt, self.config.sender_address) is not None:
            parse_answer(raw, mail_from)  # OK / NG, else refused saying what to write (mailgw/inquiry.py)
            return None  # stored as it is; the dispatcher records the answer
        if self.absence is not None and (call_back := self.absence.parse_reply(raw, mail_from, rcpt)) is not None:
            return call_back  # "call" in reply to a missed-call mail: a connect request (absence_reply.py)
        if self.campons is not None and rcpt == self.campons.reply_address:  # camp-on: a reply may cancel
            return self.campons.parse_reply(raw, mail_from, rcpt)
        relay = self.relay
        request = parse_request(raw, mail_from=mail_from, rcpt_to=rcpt, directory=self.directory, config=self.config,
                                caller_number=relay.vouched_caller(raw, sender) if relay is not None else None,
                                message=mail.message)
        if request is not None and relay is not None:
            request = localise(request, relay.destinations.own_numbers, self.config.policy)
            if relay.for_number(raw, request, rcpt=rcpt, sender=sender, now=utcnow()) is not None:
                return request  # another office's number: that office checks and runs it
        if request is not None:
            if self.scenarios is not None:  # an unknown, invalid or hostile scenario is refused here
                scenario_for(request, self.scenarios, self.config)
                request = self.scenarios.frozen(request)  # the version in force now is the one that runs
            check_supported(request, to_person=self.directory.by_address(rcpt) is not None)
            if self.campons is not None:  # camp-on: duplicates, limits, who may cancel
                self.campons.admit(request)
        return request

    async def _authorise(self, request: ExchangeRequest, sender: Sender, rcpt: str,
                         raw: bytes) -> ExchangeRequest | None:
        """The request if it may make the PBX act; None when it is only to be delivered as mail."""
        person = self.directory.by_address(request.sender)
        if self.relay is not None:  # from a peer office's domain: proven as destinations.yaml `accept` says
            sender = self.relay.peer_sender(request, sender, raw)
        keys = self.config.security.dkim
        dkim_domains = frozenset(k.domain for k in keys)
        # Only mail claiming a listed domain pays for the RSA check.
        signed_by = dkim_signer(raw, keys) if request.sender.rpartition("@")[2].lower() in dkim_domains else None
        verdict = authorise(request, sender, to_person=self.directory.by_address(rcpt) is not None,
                            groups=person.groups if person else (), policy=self.config.policy,
                            dkim_domains=dkim_domains, signed_by=signed_by)
        if verdict == Verdict.DELIVER_ONLY:
            await self._audit(sender, request.sender, describe(request),
                              Reply(250, "2.0.0", "delivered to the mailbox only: the sender is not authenticated"))
            return None
        return request

    async def _check_media(self, raw: bytes, request: ExchangeRequest) -> None:
        """A voice or FAX part the PBX could not play or send is refused now, not after 250."""
        if not any(p.kind in (PartKind.VOICE, PartKind.FAX) for p in request.parts):
            return  # most requests: no thread hop
        try:
            await asyncio.to_thread(check_message, raw, request.parts, MediaLimits.of(self.config.media))
        except MediaError as exc:
            if exc.over_limit:
                raise Refused(552, "5.3.4", str(exc)) from None
            raise Refused(550, "5.6.1", str(exc)) from None

    async def _check_rate(self, requests: list[tuple[str, ExchangeRequest | None]]) -> None:
        policy = self.config.policy
        asked = [r for _, r in requests if r is not None]
        if not asked:
            return
        senders = sorted({r.sender for r in asked})
        numbers = sorted({n for r in asked for n in numbers_rung(r)})
        by_sender, by_number = await self.store.recent_counts(senders, numbers, utcnow())
        for sender in senders:
            person = self.directory.by_address(sender)
            limit = sender_limit(policy, person.groups if person else ())
            check_rate(by_sender[sender] + sum(1 for r in asked if r.sender == sender) - 1,
                       replace(policy, per_sender_per_hour=limit), sender=sender)
        rung: list[str] = []
        for request in asked:
            for number in numbers_rung(request):
                last_minute, last_hour = by_number[number]
                earlier = rung.count(number)  # the same number twice in this one mail
                check_number_rate(number, last_minute + earlier, last_hour + earlier, policy)
                rung.append(number)

    async def _audit(self, sender: Sender, address: str | None, what: str, reply: Reply) -> None:
        """Who asked for what, and which rule decided: a log line and a row in the store."""
        audit_log.warning("peer=%s login=%s sender=%s what=%r decision=%r", sender.peer, sender.login or "-",
                          address or "<>", what, str(reply))
        try:
            await self.store.add_audit(peer=sender.peer, login=sender.login, sender=address, what=what,
                                       rule=reply.text, reply=str(reply))
        except Exception:  # the refusal itself must still be given
            log.exception("could not record an audit entry")

    def _entry(self, queue_id: str, index: int, count: int, mail_from: str, rcpt: str,
               request: ExchangeRequest | None, raw: bytes) -> NewMessage:
        message_id = queue_id if count == 1 else f"{queue_id}.{index}"
        return NewMessage(
            id=message_id, mail_from=mail_from, rcpt_to=rcpt, spool_path=self.spool.path_for(queue_id),
            size=len(raw), kind="request" if request is not None else "mail",
            sender=request.sender if request is not None else normalise_address(mail_from),
            request=request.to_json() if request is not None else None,
            rings=tuple(numbers_rung(request)) if request is not None else (),
        )


def log_received(entry: NewMessage, request: ExchangeRequest | None) -> None:
    if request is None:
        log.info("mail %s received from %s for %s (%d bytes): no request, deliver to mailbox",
                 entry.id, entry.mail_from or "<>", entry.rcpt_to, entry.size)
        return
    log.info("request %s received from %s for %s (%d bytes)", entry.id, request.sender, entry.rcpt_to, entry.size)
    log.info("request %s parsed: %s", entry.id, describe(request))


def numbers_rung(request: ExchangeRequest) -> list[str]:
    """The numbers a request would make ring, for per-number rate limits. A sender's own phone
    (filled in from the directory) is theirs to ring; dry runs ring nobody."""
    if request.dry_run:
        return []
    numbers = [request.to_number] if request.to_number else []
    if request.from_number and request.sources.get("from") != "directory" and request.from_number not in numbers:
        numbers.append(request.from_number)
    return numbers


# ``<local@domain>`` (then parameters) in MAIL FROM / RCPT TO with a plain dot-atom on both sides,
# which is nearly every address: read without the RFC 5322 header parser aiosmtpd uses (which
# also defines a class on every call), the same result. Anything else goes to that parser.
_PLAIN_PATH = re.compile(r"\s*<([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                         r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?:[ \t]+([^()\s][^()]*)?)?", re.ASCII)


def plain_path(arg: str) -> tuple[str, str] | None:
    """(address, parameters) of a plain ``<local@domain> PARAMS`` path, None for anything else."""
    match = _PLAIN_PATH.fullmatch(arg)
    if match is None:
        return None
    return match[1], match[2] or ""


DATA_END = b"\r\n.\r\n"


@dataclass
class DataBody:
    """What DATA has received so far: the body until the lone dot, or the fact that it is
    refused (too long a line, too much data), in which case only its tail is kept, to see the end."""

    size_limit: int | None
    line_limit: int  # longest line, CRLF included (aiosmtpd's ``line_length_limit``)
    data: bytearray = field(default_factory=bytearray)
    refusal: str | None = None  # "line" or "size": answered after the end, as RFC 5321 4.2.5 implies
    end: int = -1  # where the body ends (before the ".\r\n"), once the lone dot arrived
    rest: bytes = b""  # what the client sent after the lone dot (pipelined commands)
    _line_start: int = 0  # where the line the checks have not seen the end of begins
    _discarded: int = 0  # bytes of a refused body no longer kept

    def feed(self, chunk: bytes) -> bool:
        """Take the next bytes from the wire; True once the lone dot has arrived."""
        searched = max(len(self.data) - 4, 0)  # the end marker may have begun in the last chunk
        self.data += chunk
        if self._discarded == 0 and self.data[:3] == b".\r\n":
            at = 0  # an empty body
        else:
            found = self.data.find(DATA_END, searched)
            at = found + 2 if found >= 0 else -1  # the body keeps its last CRLF
        if self.refusal is None:
            self._check_lines(at if at >= 0 else len(self.data), finished=at >= 0)
        received = self._discarded + (at if at >= 0 else max(len(self.data) - 4, 0))
        if self.refusal is None and self.size_limit and received > self.size_limit:
            self.refusal = "size"
        if at >= 0:
            self.end = at
            self.rest = bytes(self.data[at + 3:])
            return True
        if self.refusal is not None:  # refused: keep only what the end marker may begin with
            self._discarded += max(len(self.data) - 4, 0)
            del self.data[:-4]
        return False

    def _check_lines(self, upto: int, *, finished: bool) -> None:
        lines = self.data[self._line_start:upto].split(b"\r\n")
        unfinished = b"" if finished else lines.pop()
        longest = max(map(len, lines), default=0) + 2
        if longest > self.line_limit or len(unfinished) + 1 > self.line_limit:
            self.refusal = "line"
        self._line_start = upto - len(unfinished)

    def content(self) -> bytes:
        """The message: the body with each line's leading dot of transparency removed (RFC 5321 4.5.2)."""
        body = bytes(self.data[:self.end])
        body = body.replace(b"\r\n.", b"\r\n")
        return body[1:] if body.startswith(b".") else body


class GatewaySMTP(SMTP):
    """aiosmtpd's protocol, with its two size refusals given RFC 3463 codes and a DATA phase that
    takes the body as it arrives rather than line by line (a 200 KB mail: 2,700 loop turns)."""

    def __init__(self, handler: Any, *, max_message_size: int, **kwargs: Any) -> None:
        super().__init__(handler, data_size_limit=max_message_size, **kwargs)
        self._too_big = ascii_reply(Reply(552, "5.3.4", f"message too big: the limit is {max_message_size} bytes"))

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        plain = plain_path(arg)
        if plain is None or (self.local_part_limit and len(plain[0].rpartition("@")[0]) > self.local_part_limit):
            # The stdlib parser trips on some paths (<0@[> raises AttributeError): answer them
            # "553 malformed address" like any other bad path, not with a traceback.
            try:
                return super()._getaddr(arg)
            except Exception:
                return None, None
        return plain

    async def push(self, status: Any) -> None:
        text = status.decode("ascii", "replace") if isinstance(status, bytes) else status
        if text.startswith("552 Error:"):
            status = self._too_big
        elif text.startswith("500 Line too long"):
            status = LINE_TOO_LONG
        await super().push(status)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's ``smtp_DATA`` with the same replies and checks, reading what the client
        sent in one piece per arrival. What follows the lone dot goes back to the reader, for
        the command loop (PIPELINING)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        body = DataBody(self.data_size_limit, self.line_length_limit)
        reader = self._reader
        while True:
            try:
                chunk = await reader.read(1 << 30)  # all that has arrived, so the reader is empty after
            except asyncio.CancelledError:  # the client went away (eof_received cancels the session)
                log.info("connection lost during DATA")
                self._writer.close()
                raise
            if not chunk:
                self._writer.close()
                raise asyncio.CancelledError
            if body.feed(chunk):
                break
        if body.rest and not reader.at_eof():
            reader.feed_data(body.rest)
        if body.refusal is not None:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)" if body.refusal == "line"
                            else "552 Error: Too much mail data")
            self._set_post_data_state()
            return
        self.envelope.content = self.envelope.original_content = body.content()
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)


async def start_smtp(handler: IngressHandler, config: Config) -> asyncio.base_events.Server:
    """Listen on ``smtp.listen`` in the running loop (no second loop or thread, unlike Controller)."""
    loop = asyncio.get_running_loop()

    tls_context = server_context(config)
    authenticator = DirectoryAuthenticator(handler.directory, handler.relay.destinations if handler.relay else None)

    def factory() -> SMTP:
        # AUTH is offered only after STARTTLS (aiosmtpd's auth_require_tls): no password in clear.
        return GatewaySMTP(handler, max_message_size=config.smtp.max_message_size, hostname=config.domains[0],
                           ident="mailgw", tls_context=tls_context, require_starttls=False,
                           authenticator=authenticator, auth_require_tls=True, loop=loop)

    return await loop.create_server(factory, host=config.smtp.listen.host, port=config.smtp.listen.port)
