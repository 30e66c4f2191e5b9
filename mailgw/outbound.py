"""Outbound mail: a durable outbox and the one worker that empties it.

Every mail mailgw sends (result and failure notices, relayed requests) is first written to
``<data>/outbox`` and recorded, then delivered: into the local Maildir when the recipient is a
person of a local domain; to the peer gateway when the destination DB names the domain (STARTTLS
or TLS, SMTP AUTH); otherwise through ``outbound.smarthost``, or the domain's MX when
``relay.mx`` is on (aiosmtplib). Temporary failures are retried with doubling back-off up to
``outbound.max_retry_interval``; after ``outbound.give_up_after`` (or at once for a permanent 5xx
refusal) the entry fails and is logged. Relayed mail (``relay.py``) has its own deadline and
back-off (``relay.*``), and its sender gets a delivery status notification when it fails.

The worker delivers in the background, up to PARALLEL mails at once, one recipient's mail in
order, over SMTP sessions it keeps open while mail keeps coming. Relayed copies ingress has just
stored are handed over in memory (``take``); the table is read for everything else, for retries
and after a restart, and stays the truth: a row is sent only while it is ``queued`` there, and a
row read before its attempt was recorded is recognised by its attempt count and skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from datetime import datetime, timedelta
from email.message import Message
from email.policy import compat32
from pathlib import Path

import aiosmtplib

from . import mailbox
from .config import Config
from .destinations import Destination, Destinations, TlsMode
from .directory import Directory, normalise_address
from .relay import RelayBatch, delivery_status_notification, enhanced_status, tls_context, unverified_context
from .routing import NoSuchDomain, mx_destination, resolve_mx
from .spool import new_id, write_durably
from .store import OutboxEntry, OutboxRow, Store, utcnow

log = logging.getLogger("mailgw.outbound")

POLL_INTERVAL = 2.0  # seconds between looks at the table when nothing is due sooner
PARALLEL = 32        # deliveries under way at once (Postfix: 20 per destination, 100 in all)
SESSION_IDLE = 2.0   # seconds an unused SMTP session stays open for the next mail (Postfix: 2 s)
REMEMBER = 30.0      # seconds an attempt's outcome is remembered, to tell stale rows from due ones
HELD_BYTES = 32 << 20  # relayed copies kept in memory for their first attempt, at most (else read back)


class PermanentFailure(Exception):
    """The mail can never be delivered as it is (unknown local person, 5xx from the next hop)."""


def as_bytes(message: Message) -> bytes:
    """``message.as_bytes()`` for a compat32 mail, quicker for the simple single-part text mail
    the gateway writes itself (a result mail: 18 instead of 490 µs). Short ASCII headers are
    written as they are, others folded by compat32 itself; a body the generator would change
    (non-ASCII, CR) and a multipart mail take the generator."""
    payload = message.get_payload()
    if (message.is_multipart() or message.get_unixfrom() is not None or not isinstance(payload, str)
            or not payload.isascii() or "\r" in payload):
        return message.as_bytes()
    lines = []
    for name, value in message.items():
        if isinstance(value, str) and value.isascii() and len(name) + len(value) <= 76 and "\n" not in value \
                and "\r" not in value:
            lines.append(f"{name}: {value}\n")
        else:
            lines.append(compat32.fold_binary(name, value).decode("ascii", "surrogateescape"))
    return ("".join(lines) + "\n" + payload).encode("ascii", "surrogateescape")


class Outbox:
    def __init__(self, config: Config, directory: Directory, store: Store, root: Path,
                 destinations: Destinations = Destinations()) -> None:
        self.config = config
        self.directory = directory
        self.destinations = destinations
        self.store = store
        self.root = Path(root)
        self._wake = asyncio.Event()
        self._stopping = False
        self._sessions = Sessions()
        self._slots = asyncio.Semaphore(PARALLEL)
        self._chains: dict[str, list[OutboxRow]] = {}  # recipient -> its mail waiting to be tried, in order
        self._in_flight: set[str] = set()              # in a chain, not finished
        self._attempted: dict[str, tuple[int, float]] = {}  # id -> (attempts recorded, when): stale rows
        self._content = _Held(HELD_BYTES)              # mail just stored (relayed, results): sent without a read
        self._tasks: set[asyncio.Task[None]] = set()
        self._look_again = False  # the last look at the table left due mail for later
        self.mailboxes: mailbox.Deliveries = mailbox.InThread()  # the gateway's MailboxAgent by default

    async def prepare(self, message: Message, *, rcpt_to: str, request_id: str | None,
                      mail_from: str | None = None) -> OutboxEntry:
        """Write ``message`` durably and describe it; the caller records it (maybe with other rows).
        ``mail_from`` is the envelope sender (default: the gateway's address; "" for a bounce)."""
        def write() -> OutboxEntry:  # off the loop: a mail with a 5 MB voice message takes ~150 ms to flatten
            entry, raw = self.compose(message, rcpt_to=rcpt_to, request_id=request_id, mail_from=mail_from)
            write_durably(entry.path, raw)
            return replace(entry, content=None)  # the file is the mail: not a second copy in the store

        return await asyncio.to_thread(write)

    def compose(self, message: Message, *, rcpt_to: str, request_id: str | None,
                mail_from: str | None = None) -> tuple[OutboxEntry, bytes]:
        """``prepare`` without the write: the entry, its bytes in ``content``, and the bytes. The
        caller stores the entry (and so its content) with its own rows, then hands both to
        ``take_stored``. The entry's path stays unwritten."""
        outbox_id = new_id()
        raw = as_bytes(message)
        return (OutboxEntry(outbox_id, request_id, self.config.sender_address if mail_from is None else mail_from,
                            rcpt_to, self.root / f"{outbox_id}.eml", raw), raw)

    async def send(self, message: Message, *, rcpt_to: str, request_id: str | None,
                   mail_from: str | None = None) -> None:
        entry = await self.prepare(message, rcpt_to=rcpt_to, request_id=request_id, mail_from=mail_from)
        await self.store.add_outbox(entry)
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Ask ``run`` to return after the delivery in hand (a cancelled SMTP dialogue is not
        reliably a cancellation: client libraries may turn it into an error that looks retryable)."""
        self._stopping = True
        self._wake.set()

    def take(self, batch: RelayBatch) -> None:
        """Relayed copies ingress has just stored: delivered at once, from memory."""
        self.take_stored([(entry, entry.content, deadline) for entry, _, deadline in batch.rows
                          if entry.content is not None])

    def take_stored(self, mails: list[tuple[OutboxEntry, bytes, datetime | None]]) -> None:
        """Mail just stored (its rows and content committed): delivered at once, from memory (no
        look at the table, no read of the files). The table stays the truth for retries and
        restarts."""
        now = utcnow()
        rows = []
        for entry, content, deadline in mails:
            rows.append(OutboxRow(entry.id, now, entry.request_id, entry.mail_from, entry.rcpt_to, entry.path,
                                  "queued", 0, now, None, deadline))
            if entry.id not in self._in_flight:  # else a look at the table was quicker: it reads the file
                self._content.put(entry.id, content)
        if self._stopping:  # the next start finds them in the table
            self._content.clear()
            return
        self._dispatch(rows)

    async def run(self) -> None:
        """Deliver due mail until ``stop()``; looks at the table when woken, when the next retry is
        due, and every POLL_INTERVAL (``mailgw queue retry`` changes it from outside). Deliveries run
        in the background, up to PARALLEL at once, over SMTP sessions kept open while
        mail keeps coming (SESSION_IDLE)."""
        try:
            while not self._stopping:
                self._wake.clear()
                due, next_try = await self.store.due_outbox(utcnow(), skip=self._in_flight)
                self._dispatch(due)
                self._sessions.close_idle(SESSION_IDLE)
                now = utcnow()
                # More mail due than one look takes (a backlog, all of it under way): look again
                # when a recipient's deliveries end, not at once (that would spin on the table).
                self._look_again = next_try is not None and next_try <= now
                timeout = POLL_INTERVAL if next_try is None or self._look_again else \
                    min(POLL_INTERVAL, (next_try - now).total_seconds())
                if self._sessions.open and not self._in_flight:
                    timeout = min(timeout, SESSION_IDLE)  # come back to close them
                try:
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._sessions.close()

    def _dispatch(self, rows: list[OutboxRow]) -> None:
        """Start delivering ``rows`` that are not under way already, nor stale copies of a row whose
        attempt was recorded after the table was read. One recipient's mail goes in queue order, so
        their mails arrive in the order they were made; a slow peer does not hold up the rest."""
        horizon = time.monotonic() - REMEMBER
        while self._attempted and next(iter(self._attempted.values()))[1] < horizon:  # oldest first
            del self._attempted[next(iter(self._attempted))]
        for row in rows:
            if row.id in self._in_flight:
                continue
            if row.attempts < self._attempted.get(row.id, (0, 0.0))[0]:
                self._content.pop(row.id)
                continue
            self._in_flight.add(row.id)
            chain = self._chains.get(row.rcpt_to)
            if chain is not None:
                chain.append(row)
                continue
            self._chains[row.rcpt_to] = [row]
            task = asyncio.create_task(self._run_chain(row.rcpt_to), name=f"outbox {row.rcpt_to}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_chain(self, rcpt: str) -> None:
        chain = self._chains[rcpt]
        try:
            while chain and not self._stopping:
                row = chain.pop(0)
                sent = False
                try:
                    sent = await self._attempt(row, self._sessions)
                except Exception:  # the store could not record it: the row is tried again later
                    log.exception("could not record the attempt of mail %s to %s", row.id, row.rcpt_to)
                finally:
                    self._in_flight.discard(row.id)
                    self._attempted.pop(row.id, None)  # re-inserted: the dict stays in time order
                    self._attempted[row.id] = (row.attempts + 1, time.monotonic())
                if not sent:
                    self._wake.set()  # its retry may be due sooner than the loop thinks
        finally:
            del self._chains[rcpt]
            if self._look_again:
                self._look_again = False
                self._wake.set()
            for row in chain:  # stopping: left in the table for the next start
                self._in_flight.discard(row.id)
                self._content.pop(row.id)

    async def _attempt(self, row: OutboxRow, sessions: Sessions) -> bool:
        """One delivery attempt, recorded; True when the mail went. Up to PARALLEL deliveries at
        once; recording the outcome (a group commit) does not hold a slot."""
        try:
            async with self._slots:
                await self._deliver(row, sessions)
        except PermanentFailure as exc:
            log.error("mail %s to %s failed for good: %s", row.id, row.rcpt_to, exc)
            await self.store.outbox_retry(row, str(exc), None)
            await self._bounce(row, str(exc), enhanced_status(str(exc), "5.0.0"))
            return False
        except Exception as exc:  # connection refused, 4xx, timeouts: try again later
            next_try = self._next_try(row, utcnow())
            log.warning("mail %s to %s not delivered (%s); %s", row.id, row.rcpt_to, exc,
                        f"next try at {next_try:%H:%M:%S}" if next_try else "giving up")
            await self.store.outbox_retry(row, str(exc), next_try)
            if next_try is None:
                await self._bounce(row, f"{exc} (gave up: the request's time ran out)", "4.4.7")
            return False
        log.info("mail %s delivered to %s%s", row.id, row.rcpt_to,
                 f" (request {row.request_id})" if row.request_id else "")
        await self.store.outbox_sent(row)
        return True

    def _next_try(self, row: OutboxRow, now: datetime) -> datetime | None:
        if row.deadline is not None:  # relayed mail: the request's own monitor time bounds it
            relay = self.config.relay
            return next_retry(now, row.attempts, relay.retry_interval, relay.max_retry_interval, row.deadline)
        outbound = self.config.outbound
        return next_retry(now, row.attempts, outbound.retry_interval, outbound.max_retry_interval,
                          row.created_at + timedelta(seconds=outbound.give_up_after))

    async def _bounce(self, row: OutboxRow, reason: str, status: str) -> None:
        """Relayed mail that failed: tell its sender with an RFC 3464 DSN, sent from the null
        sender <> (RFC 5321 4.5.5) so a bounce is never bounced."""
        if row.deadline is None or not row.mail_from:
            return
        try:
            original = await self._read(row)
            dsn = delivery_status_notification(self.config, row, original, status=status, reason=reason,
                                               now=utcnow())
            await self.send(dsn, rcpt_to=row.mail_from, request_id=row.request_id, mail_from="")
        except Exception:  # the worker must go on with the other mail; the row says what failed
            log.exception("could not queue the bounce of mail %s to %s", row.id, row.mail_from)
            return
        log.info("mail %s to %s bounced to %s (%s)", row.id, row.rcpt_to, row.mail_from, status)

    async def _read(self, row: OutboxRow) -> bytes:
        """The mail of an outbox row: kept in the store (a relayed copy, a result mail), else its file."""
        if row.deadline is not None:
            content = await self.store.relay_content(row.id)
        else:
            content = await self.store.outbox_content(row.id)
        return content if content is not None else await asyncio.to_thread(row.path.read_bytes)

    async def _deliver(self, row: OutboxRow, sessions: Sessions) -> None:
        raw = self._content.pop(row.id)  # just stored (a relayed copy, a result mail): no read
        address = normalise_address(row.rcpt_to)
        if address is None:
            raise PermanentFailure(f"not a mail address: {row.rcpt_to!r}")
        domain = address.rpartition("@")[2]
        local = self.config.is_local_domain(domain)
        if local and self.directory.by_address(address) is None:
            raise PermanentFailure(f"no mailbox here for {address}")
        if raw is None:
            raw = await self._read(row)
        if local:
            await self.mailboxes.deliver(self.config.mailbox_root, address, raw, group=self.config.mailbox_group)
            return
        destination = await self._destination(domain)
        try:
            await sessions.send(raw, mail_from=row.mail_from, rcpt=address, destination=destination)
        except aiosmtplib.SMTPAuthenticationError:
            raise  # our credentials at the peer: retried, so fixing destinations.yaml is enough
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            if codes and min(codes) >= 500:
                raise PermanentFailure(f"{destination.host} refused {address}: {exc.recipients[0].code} "
                                       f"{exc.recipients[0].message}") from exc
            raise
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code >= 500:
                raise PermanentFailure(f"{destination.host} refused it: {exc.code} {exc.message}") from exc
            raise

    async def _destination(self, domain: str) -> Destination:
        """Where mail for a foreign domain goes: its peer gateway, the smarthost, or its MX."""
        peer = self.destinations.peer(domain)
        if peer is not None:
            return peer
        smarthost = self.config.outbound.smarthost
        if smarthost is not None:
            return Destination(domain, smarthost, TlsMode.NONE)
        if not self.config.relay.mx:
            raise PermanentFailure(f"no route to {domain}: not in the destination DB, no outbound.smarthost, "
                                   "relay.mx off (5.4.4)")
        try:
            answer = await resolve_mx(domain, self.config.relay.dns)  # timeouts and SERVFAIL raise: retried
        except NoSuchDomain:
            raise PermanentFailure(f"{domain} does not exist in DNS (5.1.2)") from None
        mx = mx_destination(domain, answer, self.config.relay.mx_port)
        if mx is None:
            raise PermanentFailure(f"{domain} accepts no mail (null MX, 5.1.10)")
        return mx


def next_retry(now: datetime, attempts: int, first: float, longest: float, deadline: datetime) -> datetime | None:
    """Doubling back-off from ``first`` up to ``longest``; None once ``deadline`` has passed. The last
    try is moved up to the deadline rather than skipped past it."""
    if now >= deadline:
        return None
    delay = min(first * 2 ** attempts, longest)
    return min(now + timedelta(seconds=delay), deadline)


class _Held:
    """Mail contents by outbox id, up to ``limit`` bytes in all: past it, a delivery reads its file
    (a slow peer must not make a backlog of big mails live in memory)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._by_id: dict[str, bytes] = {}

    def put(self, outbox_id: str, content: bytes) -> None:
        if self.size + len(content) <= self.limit and outbox_id not in self._by_id:
            self._by_id[outbox_id] = content
            self.size += len(content)

    def pop(self, outbox_id: str) -> bytes | None:
        content = self._by_id.pop(outbox_id, None)
        if content is not None:
            self.size -= len(content)
        return content

    def clear(self) -> None:
        self._by_id.clear()
        self.size = 0


class Sessions:
    """SMTP sessions kept open between deliveries, so mail after mail to one destination reuses its
    connection (and its STARTTLS and AUTH); one unused for ``close_idle``'s time is closed."""

    def __init__(self) -> None:
        self._idle: dict[Destination, list[tuple[aiosmtplib.SMTP, float]]] = {}

    @property
    def open(self) -> bool:
        return any(self._idle.values())

    async def send(self, raw: bytes, *, mail_from: str, rcpt: str, destination: Destination) -> None:
        idle = self._idle.setdefault(destination, [])
        if idle:
            client = idle.pop()[0]
            try:
                await client.sendmail(mail_from, [rcpt], raw)
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
                # The peer closed the idle session (its timeout, a restart): once more on a new one.
                client.close()
            except BaseException:
                client.close()
                raise
            else:
                idle.append((client, time.monotonic()))
                return
        client = await open_session(destination)
        try:
            await client.sendmail(mail_from, [rcpt], raw)
        except BaseException:  # a refused mail may leave the session in any state: start afresh
            client.close()
            raise
        idle.append((client, time.monotonic()))

    def close_idle(self, seconds: float) -> None:
        """Say QUIT (in the background) on sessions unused for ``seconds``."""
        horizon = time.monotonic() - seconds
        for destination, idle in self._idle.items():
            stale = [c for c, at in idle if at < horizon]
            if stale:
                idle[:] = [(c, at) for c, at in idle if at >= horizon]
                for client in stale:
                    task = asyncio.create_task(_quit(client), name="smtp quit")
                    _QUITTING.add(task)
                    task.add_done_callback(_QUITTING.discard)

    async def close(self) -> None:
        clients = [c for idle in self._idle.values() for c, _ in idle]
        self._idle.clear()
        await asyncio.gather(*(_quit(c) for c in clients), *list(_QUITTING))


_QUITTING: set[asyncio.Task[None]] = set()  # QUITs under way (tasks are kept so they are not collected)


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await asyncio.wait_for(client.quit(), 5)
    except Exception:  # the mail went through; a peer that hangs up first is fine
        pass
    finally:
        client.close()


async def open_session(destination: Destination) -> aiosmtplib.SMTP:
    """A connected SMTP session to ``destination`` with its TLS mode and AUTH credentials."""
    host = destination.host
    context = tls_context(destination) if destination.tls in (TlsMode.STARTTLS, TlsMode.TLS) else None
    client = aiosmtplib.SMTP(hostname=host.host, port=host.port, timeout=30, start_tls=False,
                             use_tls=destination.tls is TlsMode.TLS, tls_context=context)
    await client.connect()
    try:
        if destination.tls is TlsMode.STARTTLS:
            await client.starttls(server_hostname=destination.server_name or destination.domain, tls_context=context)
        elif destination.tls is TlsMode.MAY:
            await client.ehlo()
            if client.supports_extension("starttls"):
                await client.starttls(tls_context=unverified_context())
        if destination.login:
            await client.login(destination.login, destination.password or "")
    except BaseException:
        client.close()
        raise
    return client
