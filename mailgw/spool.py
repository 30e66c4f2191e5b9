"""Durable files: the spool of accepted messages and the one way mailgw writes a file it promised
to keep (spooled mail, outgoing mail, Maildir deliveries).

A file is written under a temporary name, fsynced, renamed into place and its folder fsynced:
after ``write_durably`` returns, a power cut cannot lose it or leave half of it.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path


_issued: dict[str, set[str]] = {}  # this second's ids: three random bytes alone repeat within
_issuing = threading.Lock()         # a second more often than not at a few thousand ids a second
_random = bytearray()  # secure random bytes fetched a few KB at a time: one system call per ~1,300 ids
_stamp: tuple[int, str] = (0, "")  # the last second an id was issued in, and its text
_drawing = threading.Lock()
os.register_at_fork(after_in_child=_random.clear)  # a forked child must not issue its parent's ids


def new_id() -> str:
    """A request/queue id: sortable by time, unique, short enough to read out or type in a reply."""
    global _stamp
    with _issuing:
        second = int(time.time())
        if _stamp[0] != second:
            _stamp = (second, f"{datetime.fromtimestamp(second, UTC):%Y%m%d%H%M%S}")
        stamp = _stamp[1]
        if stamp not in _issued:
            _issued.clear()
            _issued[stamp] = set()
        seen = _issued[stamp]
        while (candidate := f"{stamp}-{random_hex(3)}") in seen:
            pass
        seen.add(candidate)
    return candidate


def random_hex(count: int) -> str:
    """``secrets.token_hex(count)`` from the same source, without a system call each time."""
    with _drawing:
        if len(_random) < count:
            _random.extend(os.urandom(4096))
        text = _random[-count:].hex()
        del _random[-count:]
    return text


def write_durably(path: Path, data: bytes, *, tmp_dir: Path | None = None, gid: int | None = None,
                  make_dirs: bool = True, sync_folder: bool = True) -> Path:
    """Write ``data`` to ``path`` so that it survives a crash once this returns. With ``gid`` the
    file is readable and writable by that group (0660) before it appears under its name. Not
    ``make_dirs``: the caller knows both folders exist (FileNotFoundError when not). Not
    ``sync_folder``: the caller fsyncs ``path.parent`` itself (``fsync_folder``), once for several
    files, before it counts any of them as written."""
    tmp = (tmp_dir or path.parent) / f".{path.name}.{random_hex(4)}.tmp"
    if make_dirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if gid is not None:
            os.fchown(fd, -1, gid)
            os.fchmod(fd, 0o660)  # after the chown: the umask cannot narrow an explicit fchmod
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    if sync_folder:
        fsync_folder(path.parent)
    return path


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a pipe or a file may take part of it)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_folder(folder: Path) -> None:
    """Make the names of the files just renamed into ``folder`` survive a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Accepted raw messages, one file per message, under ``<data>/spool``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, message_id: str) -> Path:
        return self.root / f"{message_id}.eml"

    def store(self, message_id: str, raw: bytes) -> Path:
        return write_durably(self.path_for(message_id), raw)
