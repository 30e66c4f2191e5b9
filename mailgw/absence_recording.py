"""The voice recording of a call, read for its missed-call mail (attached, or a note saying why not).

The PBX names the recording in a channel variable (``pbx/incoming.py``: ``RECORDED_FILE`` of
``Record()``, ``VM_MESSAGEFILE``, ``MIXMONITOR_FILENAME``, or ``MAILGW_RECORDING``): a path on a
file system the gateway shares with the PBX, or an ``http(s)://`` URL. Only places listed in
``absence.recordings`` are read (a channel variable must not make the gateway mail out its own
files or fetch arbitrary URLs); the default is the simulator's ``<data_dir>/sim-recordings`` and
Asterisk's ``/var/spool/asterisk``. ``Record()`` and ``VoiceMail()`` give the path without its
extension, so the usual ones are tried. A recording bigger than ``absence.recording_max_bytes``,
unreadable or outside those places is not attached and the mail says so; it never stops the mail.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import humanfriendly

from .config import Config

# Asterisk's file formats, in the order Record()/VoiceMail() commonly write them, and their MIME types.
CONTENT_TYPES = {
    ".wav": "audio/wav", ".WAV": "audio/wav", ".mp3": "audio/mpeg", ".ogg": "audio/ogg", ".opus": "audio/ogg",
    ".gsm": "audio/x-gsm", ".ulaw": "audio/basic", ".ul": "audio/basic", ".alaw": "audio/x-alaw-basic",
    ".g722": "audio/G722", ".sln": "application/octet-stream",
}
FETCH_TIMEOUT = 10.0   # seconds per network operation
FETCH_DEADLINE = 30.0  # seconds for the whole body: a server dripping bytes must not hold the mailer


@dataclass(frozen=True)
class Recording:
    """A call's recording as read for a mail: ``data`` when it can be attached, else why not."""

    location: str                # as shown in the mail (without any password in a URL)
    state: str                   # attached | too_big | unreadable | refused
    data: bytes = b""
    content_type: str = "application/octet-stream"
    suffix: str = ".wav"
    size: int | None = None      # bytes, when known
    reason: str = ""

    @property
    def attached(self) -> bool:
        return self.state == "attached"

    def context(self, limit: int, filename: str) -> dict[str, Any]:
        """The template's ``recording`` variable."""
        return {"attached": self.attached, "state": self.state, "filename": filename if self.attached else "",
                "size": humanfriendly.format_size(self.size) if self.size is not None else "",
                "limit": humanfriendly.format_size(limit), "location": self.location, "reason": self.reason}


def sim_recordings(config: Config) -> Path:
    """Where the built-in simulator's Record() writes voice messages: an absolute path, as
    Asterisk names its recordings (a relative data_dir, the default ``var``, would otherwise give
    the PBX's variable a relative path, which the gateway rightly refuses to read)."""
    return (config.data_dir / "sim-recordings").absolute()


def allowed_places(config: Config) -> tuple[str, ...]:
    return config.absence.recordings or (str(sim_recordings(config)), "/var/spool/asterisk")


async def read_recording(location: str, config: Config, max_bytes: int | None = None) -> Recording:
    """The recording at ``location``, read off the event loop; never raises."""
    limit = config.absence.recording_max_bytes if max_bytes is None else max_bytes
    return await asyncio.to_thread(_read, location, allowed_places(config), limit)


def shown(location: str) -> str:
    """``location`` fit for a mail and the log: a URL's user name and password left out."""
    parts = urllib.parse.urlsplit(location)
    if parts.scheme in ("http", "https") and "@" in parts.netloc:
        return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return location


def _read(location: str, places: tuple[str, ...], limit: int) -> Recording:
    if location.startswith(("http://", "https://")):
        return _fetch(location, places, limit)
    if location.startswith("file://"):
        location = urllib.parse.unquote(urllib.parse.urlsplit(location).path)
    path = Path(location)
    if not path.is_absolute():
        return Recording(location, "refused", reason="not an absolute path")
    found = _existing(path)
    if found is None:
        return Recording(location, "unreadable", reason="no such file")
    real = Path(os.path.realpath(found))
    directories = [Path(os.path.realpath(p)) for p in places if p.startswith("/")]
    if not any(real.is_relative_to(d) for d in directories):
        return Recording(location, "refused", reason="not in a place absence.recordings allows")
    suffix = found.suffix if found.suffix in CONTENT_TYPES else ".wav"
    content_type = CONTENT_TYPES.get(found.suffix, "application/octet-stream")
    try:
        # Not following a symlink swapped in after the check, and not blocking on a FIFO: someone
        # who may write into an allowed place must not make the mailer read elsewhere or hang.
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as file:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                return Recording(location, "refused", reason="not a regular file")
            if not _opened_inside(fd, directories):
                return Recording(location, "refused", reason="not in a place absence.recordings allows")
            if status.st_size > limit:
                return Recording(location, "too_big", size=status.st_size, suffix=suffix)
            data = file.read(limit + 1)
    except OSError as exc:
        return Recording(location, "unreadable", reason=exc.strerror or str(exc))
    if len(data) > limit:  # it grew while being read
        return Recording(location, "too_big", size=len(data), suffix=suffix)
    return Recording(location, "attached", data=data, content_type=content_type, suffix=suffix, size=len(data))


def _opened_inside(fd: int, directories: list[Path]) -> bool:
    """Whether the open file really is in one of ``directories`` (a folder on its path may have
    been swapped for a symlink after the check); where /proc is missing, the check above stands."""
    try:
        opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return True
    return any(opened.is_relative_to(d) for d in directories)


def _allowed_url(url: str, places: tuple[str, ...]) -> bool:
    """``url`` is under one of the http(s) ``places``: the same scheme, host and port, and a path
    below the place's path at a ``/`` boundary, with no ``..`` (also percent-encoded) on the way."""
    try:
        target = urllib.parse.urlsplit(url)
        target_port = target.port
    except ValueError:
        return False
    path = urllib.parse.unquote(target.path)
    if ".." in path.split("/") or "\\" in path:
        return False
    for place in places:
        if not place.startswith(("http://", "https://")):
            continue
        allowed = urllib.parse.urlsplit(place)
        try:
            allowed_port = allowed.port
        except ValueError:
            continue
        default = 443 if allowed.scheme == "https" else 80
        prefix = allowed.path if allowed.path.endswith("/") else allowed.path + "/"
        if (target.scheme == allowed.scheme and (target.hostname or "") == (allowed.hostname or "")
                and (target_port or default) == (allowed_port or default)
                and (path + "/").startswith(prefix)):
            return True
    return False


def _existing(path: Path) -> Path | None:
    """``path``, or ``path`` with one of Asterisk's extensions (Record() names it without)."""
    if path.is_file():
        return path
    for suffix in CONTENT_TYPES:
        candidate = path.with_name(path.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def _read_within(response: Any, limit: int, deadline: float) -> bytes:
    """Up to ``limit`` bytes of the body, or TimeoutError once ``deadline`` has passed."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the recording took longer than {FETCH_DEADLINE:.0f} s to fetch")
        chunk = response.read(min(65536, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect could lead anywhere; the URL must be in an allowed place itself."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _fetch(url: str, places: tuple[str, ...], limit: int) -> Recording:
    where = shown(url)
    if not _allowed_url(url, places):
        return Recording(where, "refused", reason="not in a place absence.recordings allows")
    suffix = Path(urllib.parse.urlsplit(url).path).suffix
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=FETCH_TIMEOUT) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > limit:
                return Recording(where, "too_big", size=int(length))
            data = _read_within(response, limit + 1, time.monotonic() + FETCH_DEADLINE)
            header_type = response.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        return Recording(where, "unreadable", reason=f"HTTP {exc.code} {exc.reason}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return Recording(where, "unreadable", reason=str(reason))
    if len(data) > limit:
        return Recording(where, "too_big", reason=f"more than {humanfriendly.format_size(limit)}")
    content_type = header_type if header_type.startswith("audio/") else CONTENT_TYPES.get(suffix, header_type)
    suffix = suffix if suffix in CONTENT_TYPES else ".wav" if content_type == "audio/wav" else suffix or ".bin"
    return Recording(where, "attached", data=data, content_type=content_type, suffix=suffix, size=len(data))
