"""The embedded mailbox store: one Maildir per person under ``mailbox.root``.

Delivery follows the Maildir convention (write in ``tmp/``, fsync, rename into ``new/``), so any
Maildir reader (Dovecot, mutt, ``mailgw inbox``) sees whole messages only. Reading through
``mailgw inbox`` moves a message to ``cur/`` with the ``S`` (Seen) flag, like any IMAP server would.
"""

from __future__ import annotations

import email
import email.policy
import os
import secrets
import socket
import time
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

from .spool import write_durably


def maildir_for(root: Path, address: str) -> Path:
    """The Maildir of one person; the folder is named by their (validated, normalised) address."""
    if "/" in address or address.startswith(".") or "\0" in address:
        raise ValueError(f"not a mailbox name: {address!r}")
    return Path(root) / address


def deliver(root: Path, address: str, raw: bytes) -> Path:
    """Deliver one message durably into ``address``'s Maildir; returns its path in ``new/``."""
    folder = maildir_for(root, address)
    for sub in ("tmp", "new", "cur"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns() // 1000}.M{secrets.token_hex(6)}P{os.getpid()}.{socket.gethostname().replace('/', '-')}"
    return write_durably(folder / "new" / name, raw, tmp_dir=folder / "tmp")


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
