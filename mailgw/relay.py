"""Relaying to peer gateways: what is relayed, the hop header, loops, and the bounce.

A mail for another office (a domain in the destination DB, or any domain by MX when
``relay.mx`` is on) is queued in the outbox with only headers prepended (``Received:``, and the
caller's converted number), so its parts and any DKIM signature stay intact byte for byte: the
copy itself, its destination and its deadline (the request's monitor time) are stored in the
same transaction as the rest of the mail, before ingress answers 250. The outbox worker
(``outbound.py``) delivers it to the peer with STARTTLS/TLS and SMTP AUTH, retrying with doubling
back-off from ``relay.retry_interval`` up to ``relay.max_retry_interval``; past the deadline, or
on a permanent refusal, the sender gets an RFC 3464 delivery status notification with the RFC
3463 code.

A request to the service mailbox naming only a number (``to: 044-890-1234``) is relayed to the
service mailbox of the office whose gateway serves that number (``numbers`` in the destination
DB, the CTIDB of seed 004).

When the caller's extension has an external number (``own_numbers``), the relayed mail gets an
``X-Mailgw-Caller-Number:`` header so the other office can call back the caller; the receiving
gateway believes it only from an authenticated peer, and this gateway refuses to relay mail from
a client that set it itself.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage, Message
from email.utils import format_datetime, getaddresses, make_msgid
from pathlib import Path
from typing import Any, Callable

import dkim

from .auth import Sender, Trust, dkim_signer, same_person
from .config import Config
from .destinations import Destination, Destinations, Proof, Require, domain_for_number, to_external, unmet_proofs
from .directory import Directory, normalise_address
from .request import ExchangeRequest, parse_request
from .status import Refused
from .store import OutboxEntry, OutboxRow, utcnow

CALLER_HEADER = "X-Mailgw-Caller-Number"
_RECEIVED = re.compile(rb"^received:", re.IGNORECASE | re.MULTILINE)
_CALLER = re.compile(rb"^x-mailgw-caller-number:[ \t]*([+0-9]{1,21})[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
# The monitor field's names (request.py: monitor, mon, 監視時間 in UTF-8), anywhere in the raw mail.
_NAMES_MONITOR = re.compile(rb"(?i)monitor|\bmon\s*(?::|\xef\xbc\x9a)|\xe7\x9b\xa3\xe8\xa6\x96")
_MONITOR_JA = "監視".encode()  # with b"mon": what the pattern needs, found much faster than the pattern
# What our DKIM signature covers; the caller header twice, so one added later breaks it (RFC 6376 5.4.2).
SIGNED_HEADERS = [b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"mime-version", b"content-type",
                  CALLER_HEADER.lower().encode(), CALLER_HEADER.lower().encode()]
_SIGNS_CALLER = re.compile(rb"^dkim-signature:(?:.|\r?\n[ \t])*?\bh=[^;]*x-mailgw-caller-number",
                           re.IGNORECASE | re.MULTILINE)
_FROM = re.compile(rb"^from:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


def header_section(raw: bytes) -> bytes:
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    return raw if end < 0 else raw[:end]


def hop_count(raw: bytes) -> int:
    """How many ``Received:`` headers the mail carries (RFC 5321 6.3 loop detection)."""
    return len(_RECEIVED.findall(header_section(raw)))


def check_hops(raw: bytes, max_hops: int) -> None:
    hops = hop_count(raw)
    if hops > max_hops:
        raise Refused(554, "5.4.6", f"routing loop detected: the mail has passed {hops} mail servers "
                                    f"(at most {max_hops}, relay.max_hops)")


def caller_number(raw: bytes) -> str | None:
    """The caller's number a peer gateway put on top of a relayed mail; None unless there is
    exactly one such header (a second one would be someone's addition)."""
    found = _CALLER.findall(header_section(raw))
    return found[0].decode("ascii") if len(found) == 1 else None


def received_header(*, helo: str, peer: str, by: str, queue_id: str, rcpt: str, now: datetime) -> bytes:
    """The trace line this gateway adds to a mail it relays (RFC 5321 4.4)."""
    helo = re.sub(r"[^A-Za-z0-9.\-\[\]:]", "", helo or "")[:255] or "unknown"
    return (f"Received: from {helo} ([{peer}])\r\n\tby {by} (mailgw) with ESMTP id {queue_id}\r\n"
            f"\tfor <{rcpt}>; {format_datetime(now)}\r\n").encode("ascii", "replace")


def tls_context(destination: Destination) -> ssl.SSLContext:
    """Certificates are always verified: the system CAs, or the peer's own certificate (``ca``)."""
    if destination.ca_file is not None and not destination.ca_file.exists():
        raise FileNotFoundError(f"the certificate to trust for {destination.domain} is missing: {destination.ca_file}")
    context = ssl.create_default_context(cafile=str(destination.ca_file) if destination.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def unverified_context() -> ssl.SSLContext:
    """Opportunistic TLS to an MX (RFC 7435): encrypted when offered, like Postfix's level "may";
    the certificate is not checked because MX hosts rarely carry one for the domain's name."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


_PROOF_WORDS = {Proof.LOGIN: "from its gateway, logged in (SMTP AUTH after STARTTLS)",
                Proof.DKIM: "with a valid DKIM signature by {domain}"}


def peer_refusal(domain: str, missing: tuple[Proof, ...], require: Require) -> Refused:
    """The refusal of a request from peer ``domain`` that lacks ``missing``: RFC 7372's 5.7.20 when
    only the DKIM signature is missing, else 5.7.1 (not authorised)."""
    words = [_PROOF_WORDS[p].format(domain=domain) for p in missing]
    joined = " or ".join(words) if require is Require.ANY else " and ".join(words)
    status = "5.7.20" if missing == (Proof.DKIM,) else "5.7.1"
    return Refused(550, status, f"requests from {domain} are accepted only {joined} "
                                f"(destinations.yaml accept, require: {require})")


@dataclass(frozen=True)
class RelayCopy:
    """One recipient's copy of a mail that goes to another office."""

    rcpt: str          # the address it is relayed to (for a number: the peer's service mailbox)
    domain: str        # the peer domain
    deadline: datetime
    extra: bytes = b""  # headers to prepend besides Received (the caller's converted number)


@dataclass
class RelayBatch:
    """The relayed copies of one mail: their queue rows, each with the copy as it is sent
    (``OutboxEntry.content``), stored in one transaction with the rest of the mail."""

    rows: list[tuple[OutboxEntry, str, datetime]] = field(default_factory=list)  # entry, peer domain, deadline


class Relay:
    """The relay decisions ingress asks for; the copies are stored with the mail (store.add_messages)."""

    def __init__(self, config: Config, directory: Directory, destinations: Destinations, outbox_root: Path,
                 queued: Callable[[RelayBatch], None] = lambda batch: None) -> None:
        self.config = config
        self.directory = directory
        self.destinations = destinations
        self.outbox_root = Path(outbox_root)
        # Called once copies are stored: the outbox worker sends them at once, from memory.
        self.queued = queued

    async def write(self, raw: bytes, copies: list[RelayCopy], *, queue_id: str, first: int, count: int,
                    mail_from: str, session: Any) -> RelayBatch:
        """Each copy (trace headers on top, the mail as received below) with its queue rows. The
        caller stores them in the store's group commit, the copy in the same SQLite transaction as
        its rows: one WAL fsync for the batch, no file, no thread hop of its own."""
        now = utcnow()
        batch = RelayBatch()
        for index, copy in enumerate(copies, start=first):
            copy_id = queue_id if count == 1 else f"{queue_id}.{index}"
            trace = received_header(helo=session.host_name or "", peer=str(session.peer[0]) if session.peer else "",
                                    by=self.config.domains[0], queue_id=copy_id, rcpt=copy.rcpt, now=now)
            content = copy.extra + raw
            # DKIM (``sign:``) on a worker thread: RSA is slow.
            signature = await asyncio.to_thread(self._signature, content) if self.destinations.sign else b""
            entry = OutboxEntry(copy_id, copy_id, mail_from, copy.rcpt, self.outbox_root / f"{copy_id}.eml",
                                content=trace + signature + content)
            batch.rows.append((entry, copy.domain, copy.deadline))
        return batch

    def _signature(self, content: bytes) -> bytes:
        sign = self.destinations.sign
        assert sign is not None
        return dkim.sign(content, sign.selector.encode(), sign.domain.encode(), sign.private_key,
                         include_headers=SIGNED_HEADERS)

    def vouched_caller(self, raw: bytes, sender: Sender) -> str | None:
        """The caller number a peer gateway put on a relayed mail, when that peer is proven: logged
        in as the peer, or the header is under a valid DKIM signature of a peer with ``accept.dkim``."""
        number = caller_number(raw)
        if number is None or sender.trust is Trust.PEER:
            return number
        author = self._author(raw, "") or ""
        peer = self.destinations.peer(author.rpartition("@")[2])
        if peer is None or peer.accept.dkim is None or not _SIGNS_CALLER.search(header_section(raw)):
            return None
        return number if dkim_signer(raw, (peer.accept.dkim,)) == peer.domain else None

    def is_relayed(self, rcpt: str) -> bool:
        return not self.config.is_local_domain(rcpt.rpartition("@")[2])

    def check_hops(self, raw: bytes) -> None:
        check_hops(raw, self.config.relay.max_hops)

    def for_recipient(self, raw: bytes, *, mail_from: str, rcpt: str, sender: Sender, now: datetime) -> RelayCopy:
        """The copy of a mail addressed to someone at another office, or Refused."""
        author = self._check_sender(raw, mail_from, sender)
        person = self.directory.by_address(author) if author else None
        return RelayCopy(rcpt, rcpt.rpartition("@")[2], self._deadline(raw, mail_from, rcpt, now),
                         self._caller(person.extension if person else None))

    def for_number(self, raw: bytes, request: ExchangeRequest, *, rcpt: str, sender: Sender,
                   now: datetime) -> RelayCopy | None:
        """A request to our service mailbox for a number another office serves (CTIDB): its copy
        for that office's service mailbox; None when the number is ours to call."""
        if request.to_number is None or rcpt.partition("@")[0] not in self.config.requests.service_mailboxes:
            return None
        domain = domain_for_number(request.to_number, self.destinations)
        peer = self.destinations.peer(domain) if domain else None
        if peer is None or self.config.is_local_domain(peer.domain):
            return None
        self._check_sender(raw, "", sender)
        from_number = request.from_number if request.sources.get("from") == "directory" else None
        return RelayCopy(f"{peer.service_mailbox}@{peer.domain}", peer.domain,
                         now + timedelta(seconds=request.monitor), self._caller(from_number))

    def peer_sender(self, request: ExchangeRequest, sender: Sender, raw: bytes) -> Sender:
        """Who a request from a peer office's domain is trusted as: its gateway (``Trust.PEER``,
        so the request runs as from its sender) when proven as ``accept`` in the destination DB
        requires: logged in as the peer, and/or signed with the peer's DKIM key. Refused otherwise;
        any other request keeps ``sender``."""
        peer = self.destinations.peer(request.sender.rpartition("@")[2])
        if peer is None or not peer.accept.proofs:
            return sender
        accept = peer.accept
        proven = {Proof.LOGIN} if sender.trust is Trust.PEER and sender.login == peer.domain else set()
        # RSA only when the signature can still decide: under `any`, a login is enough.
        if accept.dkim is not None and (accept.require is Require.ALL or not proven) \
                and dkim_signer(raw, (accept.dkim,)) == peer.domain:
            proven.add(Proof.DKIM)
        missing = unmet_proofs(accept, frozenset(proven))
        if not missing:
            return sender if sender.trust is Trust.PEER else Sender(Trust.PEER, sender.peer, peer.domain)
        raise peer_refusal(peer.domain, missing, accept.require)

    def _check_sender(self, raw: bytes, mail_from: str, sender: Sender) -> str | None:
        """Who the mail is from; Refused when this client may not have it relayed."""
        if sender.trust is Trust.NONE:  # RCPT refused it already; never relay for strangers
            raise Refused(550, "5.7.1", "relaying denied: authenticate (SMTP AUTH after STARTTLS) first")
        if sender.trust is Trust.PEER:  # a peer delivers to this office only: no chains, no loops
            raise Refused(550, "5.7.1", f"relaying denied: mail from the gateway of {sender.login} is not relayed on")
        if caller_number(raw) is not None:
            raise Refused(550, "5.7.1", f"{CALLER_HEADER} is set by gateways, not by senders")
        author = self._author(raw, mail_from)
        if sender.trust is Trust.AUTHENTICATED and not same_person(sender.login or "", author or ""):
            raise Refused(550, "5.7.1", f"authenticated as {sender.login} but the mail is from {author or '<>'}: "
                                        "relaying only your own mail")
        return author

    @staticmethod
    def _author(raw: bytes, mail_from: str) -> str | None:
        """The From address (else MAIL FROM), normalised."""
        lines = [m.group(1).decode("utf-8", "replace") for m in _FROM.finditer(header_section(raw))]
        addresses = [a for _, a in getaddresses(lines) if a]
        return normalise_address(addresses[0]) if addresses else normalise_address(mail_from) if mail_from else None

    def _caller(self, extension: str | None) -> bytes:
        external = to_external(extension, self.destinations.own_numbers) if extension else None
        return f"{CALLER_HEADER}: {external}\r\n".encode("ascii") if external else b""

    def _deadline(self, raw: bytes, mail_from: str, rcpt: str, now: datetime) -> datetime:
        """The monitor time a request names bounds its relaying; other mail gets
        ``relay.give_up_after``. Mail that never spells the field is not parsed (most relayed mail)."""
        if not (b"mon" in raw.lower() or _MONITOR_JA in raw) or not _NAMES_MONITOR.search(raw):
            return now + timedelta(seconds=self.config.relay.give_up_after)
        try:
            request = parse_request(raw, mail_from=mail_from, rcpt_to=rcpt, directory=self.directory,
                                    config=self.config, now=now)
        except Refused:  # the executing office judges the request; it may need its own directory
            request = None
        seconds = request.monitor if request is not None else self.config.relay.give_up_after
        return now + timedelta(seconds=seconds)


# --- the bounce (RFC 3464) -------------------------------------------------------------------------

def enhanced_status(error: str, default: str) -> str:
    """The RFC 3463 code inside a peer's reply text, or ``default``."""
    found = re.search(r"\b([245]\.\d{1,3}\.\d{1,3})\b", error)
    return found.group(1) if found else default


def delivery_status_notification(config: Config, row: OutboxRow, original: bytes, *, status: str,
                                 reason: str, now: datetime) -> EmailMessage:
    """A multipart/report DSN telling ``row.mail_from`` that relaying to ``row.rcpt_to`` failed."""
    reporter = config.domains[0]
    human = (f"Your mail to {row.rcpt_to} could not be delivered to the gateway of its office.\n\n"
             f"Reason: {reason}\n"
             f"Status: {status} ({'permanent' if status.startswith('5') else 'gave up retrying'})\n"
             f"Attempts: {row.attempts + 1}, from {row.created_at:%Y-%m-%d %H:%M:%S} UTC "
             f"to {now:%Y-%m-%d %H:%M:%S} UTC\n\n"
             "Nothing was done at the other office. Send the request again when it is still wanted, "
             "or ask your administrator (mailgw queue).\n")
    report = EmailMessage()
    report["From"] = f"Mail Delivery System <{config.sender_address}>"
    report["To"] = row.mail_from
    report["Subject"] = f"Undelivered Mail Returned to Sender: {row.rcpt_to}"
    report["Date"] = format_datetime(now)
    report["Message-ID"] = make_msgid(domain=reporter)
    report["Auto-Submitted"] = "auto-replied"  # never answered, never executed as a request
    report.set_content(human)
    report.make_mixed()
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporter}"
    per_message["Arrival-Date"] = format_datetime(row.created_at)
    per_recipient = Message()
    per_recipient["Final-Recipient"] = f"rfc822; {row.rcpt_to}"
    per_recipient["Action"] = "failed"
    per_recipient["Status"] = status
    per_recipient["Diagnostic-Code"] = f"smtp; {' '.join(reason.split())[:900]}"
    per_recipient["Last-Attempt-Date"] = format_datetime(now)
    delivery_status = Message()
    delivery_status.set_type("message/delivery-status")
    delivery_status.set_payload([per_message, per_recipient])
    del delivery_status["MIME-Version"]
    headers = EmailMessage()
    headers.set_type("text/rfc822-headers")
    headers.set_payload(header_section(original).decode("ascii", "replace") + "\r\n")
    del headers["MIME-Version"]
    report.attach(delivery_status)
    report.attach(headers)
    report.set_type("multipart/report")
    report.set_param("report-type", "delivery-status")
    return report

