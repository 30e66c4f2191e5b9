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
FETCH_TIMEOUT = 10.0


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
        with open(real, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > limit:
                return Recording(location, "too_big", size=size, suffix=suffix)
            data = file.read(limit + 1)
    except OSError as exc:
        return Recording(location, "unreadable", reason=exc.strerror or str(exc))
    if len(data) > limit:  # it grew while being read
        return Recording(location, "too_big", size=len(data), suffix=suffix)
    return Recording(location, "attached", data=data, content_type=content_type, suffix=suffix, size=len(data))


def _existing(path: Path) -> Path | None:
    """``path``, or ``path`` with one of Asterisk's extensions (Record() names it without)."""
    if path.is_file():
        return path
    for suffix in CONTENT_TYPES:
        candidate = path.with_name(path.name + suffix)
        if candidate.is_file():
            return candidate
    return None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect could lead anywhere; the URL must be in an allowed place itself."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _fetch(url: str, places: tuple[str, ...], limit: int) -> Recording:
    where = shown(url)
    if not any(url.startswith(p) or where.startswith(p) for p in places if p.startswith(("http://", "https://"))):
        return Recording(where, "refused", reason="not in a place absence.recordings allows")
    suffix = Path(urllib.parse.urlsplit(url).path).suffix
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=FETCH_TIMEOUT) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > limit:
                return Recording(where, "too_big", size=int(length))
            data = response.read(limit + 1)
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
