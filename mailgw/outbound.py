"""Outbound mail: a durable outbox and the one worker that empties it.

Every mail mailgw sends (result and failure notices, later relayed requests) is first written to
``<data>/outbox`` and recorded, then delivered: into the local Maildir when the recipient is a
person of a local domain, otherwise through ``outbound.smarthost`` (aiosmtplib). Temporary failures
are retried with doubling back-off up to ``outbound.max_retry_interval``; after
``outbound.give_up_after`` (or at once for a permanent 5xx refusal) the entry fails and is logged.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from email.message import Message
from pathlib import Path

import aiosmtplib

from . import mailbox
from .config import Config
from .directory import Directory, normalise_address
from .spool import new_id, write_durably
from .store import OutboxEntry, OutboxRow, Store, utcnow

log = logging.getLogger("mailgw.outbound")


class PermanentFailure(Exception):
    """The mail can never be delivered as it is (unknown local person, 5xx from the next hop)."""


class Outbox:
    def __init__(self, config: Config, directory: Directory, store: Store, root: Path) -> None:
        self.config = config
        self.directory = directory
        self.store = store
        self.root = Path(root)
        self._wake = asyncio.Event()
        self._stopping = False

    async def prepare(self, message: Message, *, rcpt_to: str, request_id: str | None) -> OutboxEntry:
        """Write ``message`` durably and describe it; the caller records it (maybe with other rows)."""
        outbox_id = new_id()
        raw = message.as_bytes()
        path = await asyncio.to_thread(write_durably, self.root / f"{outbox_id}.eml", raw)
        return OutboxEntry(outbox_id, request_id, self.config.sender_address, rcpt_to, path)

    async def send(self, message: Message, *, rcpt_to: str, request_id: str | None) -> None:
        entry = await self.prepare(message, rcpt_to=rcpt_to, request_id=request_id)
        await self.store.add_outbox(entry)
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Ask ``run`` to return after the delivery in hand (a cancelled SMTP dialogue is not
        reliably a cancellation: client libraries may turn it into an error that looks retryable)."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Deliver due mail until ``stop()``; sleeps until the next retry is due or ``wake()``."""
        while not self._stopping:
            self._wake.clear()
            due, next_try = await self.store.due_outbox(utcnow())
            for row in due:
                if self._stopping:
                    return
                await self._attempt(row)
            if due:
                continue  # attempts may have rescheduled rows; look again before sleeping
            timeout = None if next_try is None else max(0.0, (next_try - utcnow()).total_seconds())
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _attempt(self, row: OutboxRow) -> None:
        try:
            await self._deliver(row)
        except PermanentFailure as exc:
            log.error("mail %s to %s failed for good: %s", row.id, row.rcpt_to, exc)
            await self.store.outbox_retry(row, str(exc), None)
        except Exception as exc:  # connection refused, 4xx, timeouts: try again later
            next_try = self._next_try(row, utcnow())
            log.warning("mail %s to %s not delivered (%s); %s", row.id, row.rcpt_to, exc,
                        f"next try at {next_try:%H:%M:%S}" if next_try else "giving up")
            await self.store.outbox_retry(row, str(exc), next_try)
        else:
            log.info("mail %s delivered to %s%s", row.id, row.rcpt_to,
                     f" (request {row.request_id})" if row.request_id else "")
            await self.store.outbox_sent(row)

    def _next_try(self, row: OutboxRow, now: datetime) -> datetime | None:
        if (now - row.created_at).total_seconds() >= self.config.outbound.give_up_after:
            return None
        delay = min(self.config.outbound.retry_interval * 2 ** row.attempts, self.config.outbound.max_retry_interval)
        return now + timedelta(seconds=delay)

    async def _deliver(self, row: OutboxRow) -> None:
        raw = await asyncio.to_thread(row.path.read_bytes)
        address = normalise_address(row.rcpt_to)
        if address is None:
            raise PermanentFailure(f"not a mail address: {row.rcpt_to!r}")
        domain = address.rpartition("@")[2]
        if self.config.is_local_domain(domain):
            if self.directory.by_address(address) is None:
                raise PermanentFailure(f"no mailbox here for {address}")
            await asyncio.to_thread(mailbox.deliver, self.config.mailbox_root, address, raw,
                                    group=self.config.mailbox_group)
            return
        smarthost = self.config.outbound.smarthost
        if smarthost is None:
            raise PermanentFailure(f"no route to {domain}: set outbound.smarthost")
        try:
            await aiosmtplib.send(raw, sender=row.mail_from, recipients=[address], hostname=smarthost.host,
                                  port=smarthost.port, timeout=30, start_tls=False, use_tls=False)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            if codes and min(codes) >= 500:
                raise PermanentFailure(f"{smarthost} refused {address}: {exc.recipients[0].message}") from exc
            raise
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code >= 500:
                raise PermanentFailure(f"{smarthost} refused it: {exc.code} {exc.message}") from exc
            raise
