"""The embedded mailbox store: one Maildir per person under ``mailbox.root``.

Delivery follows the Maildir convention (write in ``tmp/``, fsync, rename into ``new/``), so any
Maildir reader (Dovecot, mutt, ``mailgw inbox``) sees whole messages only. Reading through
``mailgw inbox`` moves a message to ``cur/`` with the ``S`` (Seen) flag, like any IMAP server would.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import grp
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email.message import EmailMessage
from pathlib import Path
from typing import Awaitable, Callable, Protocol

import watchfiles

from .spool import random_hex, write_durably

log = logging.getLogger("mailgw.mailbox")


def maildir_for(root: Path, address: str) -> Path:
    """The Maildir of one person; the folder is named by their (validated, normalised) address."""
    if "/" in address or address.startswith(".") or "\0" in address:
        raise ValueError(f"not a mailbox name: {address!r}")
    return Path(root) / address


def deliver(root: Path, address: str, raw: bytes, *, group: str | None = None, sync_folder: bool = True) -> Path:
    """Deliver one message durably into ``address``'s Maildir; returns its path in ``new/``.

    With ``group`` (``mailbox.group``) the Maildir is shared with that group: an IMAP server
    running as a member (Dovecot's ``mail_uid``/``mail_gid``) can read the message, set its flags
    (rename it into ``cur/``) and keep its index files beside it. Not ``sync_folder``: the caller
    fsyncs ``new/`` (``spool.fsync_folder``) before it counts the message as delivered."""
    folder = maildir_for(root, address)
    gid = grp.getgrnam(group).gr_gid if group else None
    name = f"{time.time_ns() // 1000}.M{random_hex(6)}{_process_part()}"
    if folder not in _made:  # each Maildir is checked once; every check is a few system calls
        _make_maildir(folder, gid)
    try:
        return write_durably(folder / "new" / name, raw, tmp_dir=folder / "tmp", gid=gid, make_dirs=False,
                             sync_folder=sync_folder)
    except FileNotFoundError:  # the Maildir was removed since (an admin tidying up): make it again
        _made.discard(folder)
        _make_maildir(folder, gid)
        return write_durably(folder / "new" / name, raw, tmp_dir=folder / "tmp", gid=gid, make_dirs=False,
                             sync_folder=sync_folder)


class MailboxError(Exception):
    """A delivery the mailbox agent could not make (the message names the cause), or the agent is gone."""


class Deliveries(Protocol):
    """Who makes the gateway's Maildir deliveries: ``InThread`` or ``mailbox_agent.MailboxAgent``."""

    async def deliver(self, root: Path, address: str, raw: bytes, *, group: str | None = None) -> Path: ...


class InThread:
    """Deliveries on a worker thread of the gateway's own process: with ``mailbox.agent: false``
    (``mailbox_agent.MailboxAgent`` is the default), and for what a gateway did not set up."""

    async def deliver(self, root: Path, address: str, raw: bytes, *, group: str | None = None) -> Path:
        return await asyncio.to_thread(deliver, root, address, raw, group=group)


_made: set[Path] = set()  # Maildirs this process made or found whole
_process: list[str] = []  # "P<pid>.<host>" of a Maildir file name, worked out once per process
os.register_at_fork(after_in_child=_process.clear)


def _process_part() -> str:
    if not _process:
        _process.append(f"P{os.getpid()}.{socket.gethostname().replace('/', '-')}")
    return _process[0]


def _make_maildir(folder: Path, gid: int | None) -> None:
    for directory in (folder, *(folder / sub for sub in ("tmp", "new", "cur"))):
        _make_folder(directory, gid)
    _made.add(folder)


def _make_folder(directory: Path, gid: int | None) -> None:
    if directory.is_dir():
        return
    directory.mkdir(parents=True, exist_ok=True)
    if gid is not None:
        os.chown(directory, -1, gid)
        os.chmod(directory, 0o2770)  # setgid: what the IMAP server creates here keeps the group


@dataclass(frozen=True)
class StoredMail:
    path: Path
    seen: bool

    def message(self) -> EmailMessage:
        with self.path.open("rb") as f:
            return email.message_from_binary_file(f, policy=email.policy.default)  # type: ignore[return-value]


def list_mail(root: Path, address: str) -> list[StoredMail]:
    """Every message in the Maildir, oldest first (Maildir names start with the delivery time)."""
    folder = maildir_for(root, address)
    found = []
    for sub in ("new", "cur"):
        directory = folder / sub
        if directory.is_dir():
            for path in directory.iterdir():
                if not path.name.startswith("."):
                    found.append(StoredMail(path, seen=sub == "cur" and "S" in _flags(path.name)))
    return sorted(found, key=lambda m: m.path.name)


def mark_seen(mail: StoredMail) -> StoredMail:
    """Move to ``cur/`` with the S flag, as an IMAP server does when a message is read."""
    if mail.seen:
        return mail
    base = mail.path.name.split(":2,")[0]
    flags = "".join(sorted(set(_flags(mail.path.name)) | {"S"}))
    target = mail.path.parent.parent / "cur" / f"{base}:2,{flags}"
    os.rename(mail.path, target)
    return StoredMail(target, seen=True)


def _flags(name: str) -> str:
    return name.split(":2,", 1)[1] if ":2," in name else ""


def read_state(root: Path, address: str, name: str) -> bool | None:
    """Whether the message delivered as ``name`` was read (Seen), not yet (False), or is gone
    (None: deleted, or moved out of the Maildir by its reader)."""
    folder = maildir_for(root, address)
    base = name.split(":2,")[0]
    for sub in ("cur", "new"):
        directory = folder / sub
        if not directory.is_dir():
            continue
        for entry in os.listdir(directory):
            if entry.split(":2,")[0] == base:
                return sub == "cur" and "S" in _flags(entry)
    return None


class ReadWatcher:
    """Watches delivered request mails for the moment their reader opens them.

    The signal is the Maildir ``S`` (Seen) flag, which every reader of the Maildir sets: Dovecot
    serving it over IMAP, mutt, ``mailgw inbox --read``. File-system notifications (watchfiles:
    inotify on Linux) on the ``new/`` and ``cur/`` folders, on while any mail is watched, wake
    the watcher as soon as a reader renames a mail; it also polls every ``interval`` seconds (one
    directory listing per watched mail), which covers network file systems where notifications do
    not arrive and a root that cannot be watched. Each watched mail fires exactly one callback:
    read, gone (deleted unread), or expired (still unread at its deadline).
    """

    def __init__(self, root: Path, *, on_read: Callable[[str], Awaitable[None]],
                 on_gone: Callable[[str], Awaitable[None]], on_expired: Callable[[str], Awaitable[None]],
                 interval: float = 0.5) -> None:
        self.root = Path(root)
        self.on_read, self.on_gone, self.on_expired = on_read, on_gone, on_expired
        self.interval = interval
        self._watched: dict[str, tuple[str, str, datetime]] = {}  # message id -> (address, name, deadline)
        self._changed = asyncio.Event()  # set by a file-system notification

    def watch(self, message_id: str, address: str, name: str, deadline: datetime) -> None:
        self._watched[message_id] = (address, name, deadline)
        self._changed.set()  # ``run`` turns the notifications on

    async def run(self) -> None:
        # Notifications only while a mail is watched: otherwise every result mail delivered under
        # the root woke the watch thread, whose filter needs the GIL, for nothing (bench/request_path.py).
        notifying: tuple[threading.Event, asyncio.Task[None]] | None = None
        try:
            while True:
                if self._watched and notifying is None:
                    stop = threading.Event()
                    notifying = stop, asyncio.create_task(self._notify(stop))
                elif not self._watched and notifying is not None:
                    await _end_notifications(*notifying)
                    notifying = None
                try:  # a notification, or the poll period (not a synchronisation)
                    await asyncio.wait_for(self._changed.wait(), self.interval)
                except TimeoutError:
                    pass
                self._changed.clear()
                await self._check()
        finally:
            if notifying is not None:
                await _end_notifications(*notifying)

    async def _notify(self, stop: threading.Event) -> None:
        """Wake the watcher whenever a mail appears in, leaves or is renamed in a ``new/`` or
        ``cur/`` folder under the root; without notifications the poll alone keeps working."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)  # as the first delivery would
            async for _ in watchfiles.awatch(self.root, watch_filter=_is_mail_change, stop_event=stop,
                                             debounce=200, step=20):
                self._changed.set()
        except (OSError, RuntimeError) as e:  # e.g. the inotify watch limit reached
            log.warning("no file-system notifications for %s (%s); polling every %ss", self.root, e, self.interval)

    async def _check(self) -> None:
        for message_id, (address, name, deadline) in list(self._watched.items()):
            state = await asyncio.to_thread(read_state, self.root, address, name)
            if state is False and datetime.now(timezone.utc) < deadline:
                continue
            self._watched.pop(message_id, None)  # fire once, whatever happens next
            await report_reading(message_id, state, self.on_read, self.on_gone, self.on_expired)


async def _end_notifications(stop: threading.Event, notifications: asyncio.Task[None]) -> None:
    stop.set()  # ends the watch thread within one step; a cancel alone waits for its timeout
    notifications.cancel()
    await asyncio.gather(notifications, return_exceptions=True)


async def report_reading(message_id: str, state: bool | None, on_read: Callable[[str], Awaitable[None]],
                         on_gone: Callable[[str], Awaitable[None]],
                         on_expired: Callable[[str], Awaitable[None]]) -> None:
    """The one callback a watched mail fires: read (True), gone (None) or still unread at its
    deadline (False). Shared by the Maildir and IMAP watchers."""
    callback = on_read if state else on_gone if state is None else on_expired
    # Awaited, not spawned: each is one short store write (or a notice), and a gateway that
    # stops by cancelling its watcher must not leave one writing to a closed store.
    try:
        await callback(message_id)
    except Exception:  # one broken entry must not stop read detection for the others
        log.exception("reading trigger for %s failed", message_id)


def _is_mail_change(change: watchfiles.Change, path: str) -> bool:
    """Only messages moving in the Maildir matter, not ``tmp/`` writes or an IMAP server's index files."""
    return os.path.basename(os.path.dirname(path)) in ("new", "cur")
