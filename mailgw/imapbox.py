"""Remote IMAP mailboxes: deliver a request mail with IMAP APPEND and watch its \\Seen flag.

For people whose mail lives on an IMAP server the gateway does not share a disk with (the
directory's ``mailbox: {backend: imap, ...}``). The "mail link" of seed 004 is the message's
``UIDVALIDITY:UID`` from the server's APPENDUID answer (RFC 4315), so a restarted gateway watches
the same message again.

One connection per account watches every request mail waiting in it: when the server offers IDLE
(RFC 2177) the watcher idles and looks again at every push (a flag change by the reader's own
session arrives as an untagged FETCH), and in any case every ``interval`` seconds; without IDLE it
polls. A dropped connection is reconnected with back-off; nothing is lost meanwhile, since the
flags live on the server.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Awaitable, Callable

import aioimaplib

from .mailbox import report_reading

log = logging.getLogger("mailgw.imapbox")

LINK_PREFIX = "imap:"
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]")
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_FETCH = re.compile(rb"FETCH \((.*)\)")
_UID = re.compile(rb"UID (\d+)")
_FLAGS = re.compile(rb"FLAGS \(([^)]*)\)")


class ImapError(Exception):
    """The IMAP server refused or could not be reached; the text says which and why."""


@dataclass(frozen=True)
class ImapAccount:
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    tls: bool = False  # IMAPS (implicit TLS, port 993); aioimaplib has no STARTTLS
    folder: str = "INBOX"

    @property
    def key(self) -> tuple[str, int, str, str]:
        return (self.host, self.port, self.username, self.folder)

    def __str__(self) -> str:
        return f"{self.username}@{self.host}:{self.port}/{self.folder}"


def make_link(uidvalidity: int, uid: int) -> str:
    return f"{LINK_PREFIX}{uidvalidity}:{uid}"


def parse_link(link: str) -> tuple[int, int] | None:
    """``imap:<uidvalidity>:<uid>`` → (uidvalidity, uid); None for a Maildir link."""
    if not link.startswith(LINK_PREFIX):
        return None
    validity, _, uid = link[len(LINK_PREFIX):].partition(":")
    return int(validity), int(uid)


def seen_uids(lines: list[bytes]) -> dict[int, bool]:
    """UID FETCH (FLAGS) answer lines → {uid: has \\Seen}; a UID missing was expunged."""
    found = {}
    for line in lines:
        fetch = _FETCH.search(line)
        uid = _UID.search(line)
        flags = _FLAGS.search(line)
        if fetch and uid and flags:
            found[int(uid.group(1))] = b"\\Seen" in flags.group(1).split()
    return found


async def _login(account: ImapAccount, timeout: float) -> aioimaplib.IMAP4:
    lost = asyncio.Event()  # set when the server closes the connection: stop waiting on it at once

    def connection_lost(exc: Exception | None) -> None:
        lost.set()

    if account.tls:
        client: aioimaplib.IMAP4 = aioimaplib.IMAP4_SSL(account.host, account.port, timeout=timeout,
                                                        ssl_context=ssl.create_default_context(),
                                                        conn_lost_cb=connection_lost)
    else:
        client = aioimaplib.IMAP4(account.host, account.port, timeout=timeout, conn_lost_cb=connection_lost)
    client.mailgw_lost = lost  # type: ignore[attr-defined]
    try:
        await client.wait_hello_from_server()
        reply = await client.login(account.username, account.password)
    except (OSError, asyncio.TimeoutError, aioimaplib.AioImapException) as exc:
        raise ImapError(f"{account.host}:{account.port}: {str(exc) or type(exc).__name__}") from None
    if reply.result != "OK":
        raise ImapError(f"{account}: login refused ({_text(reply.lines)})")
    return client


async def _select(client: aioimaplib.IMAP4, account: ImapAccount) -> int:
    reply = await client.select(account.folder)
    if reply.result != "OK":
        raise ImapError(f"{account}: cannot select the folder ({_text(reply.lines)})")
    validity = next((m for m in map(_UIDVALIDITY.search, reply.lines) if m), None)
    if validity is None:
        raise ImapError(f"{account}: the server gave no UIDVALIDITY")
    return int(validity.group(1))


def _text(lines: list[bytes]) -> str:
    return " ".join(line.decode("utf-8", "replace") for line in lines if isinstance(line, bytes))[:200]


async def append(account: ImapAccount, raw: bytes, *, timeout: float = 10.0) -> str:
    """Deliver ``raw`` into the account's folder; returns its mail link. Raises ImapError."""
    client = await _login(account, timeout)
    try:
        reply = await client.append(raw, mailbox=account.folder)
        if reply.result != "OK":
            raise ImapError(f"{account}: APPEND refused ({_text(reply.lines)})")
        found = next((m for m in map(_APPENDUID.search, reply.lines) if m), None)
        if found is None:  # RFC 4315 is optional; without it we could not find the message again
            raise ImapError(f"{account}: the server does not answer APPEND with APPENDUID (UIDPLUS)")
        return make_link(int(found.group(1)), int(found.group(2)))
    except (OSError, asyncio.TimeoutError, aioimaplib.AioImapException) as exc:
        raise ImapError(f"{account}: {str(exc) or type(exc).__name__}") from None
    finally:
        await _logout(client)


async def _logout(client: aioimaplib.IMAP4) -> None:
    try:
        await client.logout()
    except Exception:  # the connection may already be gone; nothing to keep
        pass


@dataclass
class _Watched:
    account: ImapAccount
    uidvalidity: int
    uid: int
    deadline: datetime


def _raise_if_lost(client: aioimaplib.IMAP4, account: ImapAccount) -> None:
    if client.mailgw_lost.is_set():  # type: ignore[attr-defined]
        raise ImapError(f"{account}: the server closed the connection")


class ImapReadWatcher:
    """Watches request mails in remote IMAP folders; each fires one callback: read, gone, expired."""

    def __init__(self, *, on_read: Callable[[str], Awaitable[None]], on_gone: Callable[[str], Awaitable[None]],
                 on_expired: Callable[[str], Awaitable[None]], interval: float = 2.0,
                 max_backoff: float = 60.0, timeout: float = 10.0) -> None:
        self.on_read, self.on_gone, self.on_expired = on_read, on_gone, on_expired
        self.interval, self.max_backoff, self.timeout = interval, max_backoff, timeout
        self._watched: dict[str, _Watched] = {}
        self._accounts: dict[tuple[str, int, str, str], asyncio.Task[None]] = {}
        self._wake: dict[tuple[str, int, str, str], asyncio.Event] = {}
        self._running = False

    def watch(self, message_id: str, account: ImapAccount, link: str, deadline: datetime) -> None:
        parsed = parse_link(link)
        assert parsed is not None, link
        self._watched[message_id] = _Watched(account, parsed[0], parsed[1], deadline)
        self._wake.setdefault(account.key, asyncio.Event()).set()
        if self._running:
            self._ensure_task(account)

    async def run(self) -> None:
        """Runs until cancelled (the gateway's stop); one task per account with mail to watch."""
        self._running = True
        for watched in list(self._watched.values()):
            self._ensure_task(watched.account)
        try:
            await asyncio.Future()  # the account tasks do the work
        finally:
            self._running = False
            tasks = list(self._accounts.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _ensure_task(self, account: ImapAccount) -> None:
        task = self._accounts.get(account.key)
        if task is None or task.done():
            self._accounts[account.key] = asyncio.create_task(self._watch_account(account), name=f"imap {account}")

    def _of(self, account: ImapAccount) -> dict[str, _Watched]:
        return {mid: w for mid, w in self._watched.items() if w.account.key == account.key}

    async def _watch_account(self, account: ImapAccount) -> None:
        failures = 0
        while self._of(account):
            try:
                client = await _login(account, self.timeout)
                try:
                    uidvalidity = await _select(client, account)
                    failures = 0
                    await self._session(client, account, uidvalidity)
                finally:
                    await _logout(client)
            except asyncio.CancelledError:
                raise
            except (ImapError, OSError, asyncio.TimeoutError, aioimaplib.AioImapException) as exc:
                failures += 1
                delay = min(self.interval * 2 ** (failures - 1), self.max_backoff)
                log.warning("IMAP %s: %s; reconnecting in %.1fs", account, str(exc) or type(exc).__name__, delay)
                await self._idle_for(account, delay)

    async def _session(self, client: aioimaplib.IMAP4, account: ImapAccount, uidvalidity: int) -> None:
        idle = client.has_capability("IDLE")
        while self._of(account):
            await self._check(client, account, uidvalidity)
            if not self._of(account):
                return
            if idle:
                await self._idle_on_server(client, account)
            else:
                await self._idle_for(account, self.interval)

    async def _check(self, client: aioimaplib.IMAP4, account: ImapAccount, uidvalidity: int) -> None:
        _raise_if_lost(client, account)
        watched = self._of(account)
        current = {mid: w for mid, w in watched.items() if w.uidvalidity == uidvalidity}
        states: dict[int, bool] = {}
        if current:
            uids = ",".join(str(w.uid) for w in current.values())
            reply = await client.uid("fetch", uids, "(FLAGS)")
            if reply.result != "OK":
                raise ImapError(f"{account}: UID FETCH refused ({_text(reply.lines)})")
            states = seen_uids(reply.lines)
        now = datetime.now(timezone.utc)
        for message_id, w in watched.items():
            # A different UIDVALIDITY means the folder was recreated: the message we linked is gone.
            state = states.get(w.uid) if w.uidvalidity == uidvalidity else None
            if state is False and now < w.deadline:
                continue
            self._watched.pop(message_id, None)  # fire once, whatever happens next
            await report_reading(message_id, state, self.on_read, self.on_gone, self.on_expired)

    async def _idle_on_server(self, client: aioimaplib.IMAP4, account: ImapAccount) -> None:
        """IDLE until the server pushes something, a new mail is watched, or ``interval`` passes."""
        wake = self._wake.setdefault(account.key, asyncio.Event())
        wake.clear()
        idle = await client.idle_start(timeout=self.interval + self.timeout)
        push = asyncio.ensure_future(client.wait_server_push(timeout=self.interval))
        woken = asyncio.ensure_future(wake.wait())
        lost = asyncio.ensure_future(client.mailgw_lost.wait())  # type: ignore[attr-defined]
        try:
            await asyncio.wait({push, woken, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (push, woken, lost):
                task.cancel()
            await asyncio.gather(push, woken, lost, return_exceptions=True)
        _raise_if_lost(client, account)
        client.idle_done()
        await asyncio.wait_for(idle, self.timeout)

    async def _idle_for(self, account: ImapAccount, seconds: float) -> None:
        """Wait ``seconds`` (the poll period or a back-off), or less if a new mail is watched."""
        wake = self._wake.setdefault(account.key, asyncio.Event())
        wake.clear()
        try:
            await asyncio.wait_for(wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass
