"""What the simulated phones "heard" (Playback) and what the simulated faxes "received" (SendFAX).

Asterisk's ``Playback(name)`` takes a sound name without extension, looked up in its sounds
directory or as an absolute path (``/var/spool/mailgw/media/req-12`` plays ``req-12.wav``);
``SendFAX(/path/file.tif)`` takes a TIFF path. The simulator resolves the same names in its
``media_dirs`` (and as absolute paths), measures WAV durations with the stdlib ``wave`` module and
counts TIFF pages by walking the TIFF's chain of image directories (IFDs), so it needs no
imaging library. A file it cannot find is still recorded, by name, with no duration/pages.
"""

from __future__ import annotations

import struct
import time
import wave
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

SOUND_EXTENSIONS = (".wav", ".WAV")
DEFAULT_PLAY_SECONDS = 2.0  # a prompt the simulator cannot find (e.g. Asterisk's hello-world)
FAX_SECONDS_PER_PAGE = 2.0
_MAX_PAGES = 10_000  # guards against IFD loops in a hostile file


@dataclass
class MediaRecord:
    """One Playback or fax transfer, as the call log shows it."""

    kind: str  # "heard" (Playback), "fax-received" (SendFAX to a phone), "fax-refused"
    number: str  # the phone that heard / received it
    channel: str
    name: str  # what the dial plan or Originate gave (sound name or TIFF path)
    path: str = ""  # the file the simulator found, "" if none
    seconds: float | None = None  # WAV duration
    pages: int | None = None  # TIFF pages
    call_id: str = ""
    at: float = field(default_factory=time.time)


def resolve(name: str, media_dirs: Iterable[Path], extensions: tuple[str, ...] = ()) -> Path | None:
    """The file Asterisk would open for ``name``: absolute, or under a media directory; with
    ``extensions`` tried in turn when the name has none (Playback names carry no extension)."""
    candidates = [Path(name)] if Path(name).is_absolute() else [Path(d) / name for d in media_dirs]
    for base in candidates:
        for candidate in [base, *(base.with_name(base.name + ext) for ext in extensions)]:
            if candidate.is_file():
                return candidate
    return None


def wav_seconds(path: Path) -> float | None:
    try:
        with wave.open(str(path), "rb") as wav:
            rate = wav.getframerate()
            return wav.getnframes() / rate if rate else None
    except (wave.Error, EOFError, OSError):
        return None


def tiff_pages(path: Path) -> int | None:
    """Number of pages (IFDs) in a TIFF file, or None when it is not a TIFF."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if data[:4] == b"II*\x00":
        endian = "<"
    elif data[:4] == b"MM\x00*":
        endian = ">"
    else:
        return None
    (offset,) = struct.unpack_from(endian + "I", data, 4)
    pages, seen = 0, set()
    while offset and offset not in seen and pages < _MAX_PAGES:
        if offset + 2 > len(data):
            return None
        seen.add(offset)
        (entries,) = struct.unpack_from(endian + "H", data, offset)
        next_at = offset + 2 + 12 * entries
        if next_at + 4 > len(data):
            return None
        pages += 1
        (offset,) = struct.unpack_from(endian + "I", data, next_at)
    return pages


def describe_media(kind: str, name: str, media_dirs: Iterable[Path], *, number: str, channel: str,
                   call_id: str) -> MediaRecord:
    record = MediaRecord(kind=kind, number=number, channel=channel, name=name, call_id=call_id)
    if kind == "heard":
        path = resolve(name, media_dirs, SOUND_EXTENSIONS)
        if path is not None:
            record.path, record.seconds = str(path), wav_seconds(path)
    else:
        path = resolve(name, media_dirs)
        if path is not None:
            record.path, record.pages = str(path), tiff_pages(path)
    return record


def play_seconds(record: MediaRecord) -> float:
    """How long the simulated application runs for this record."""
    if record.seconds is not None:
        return record.seconds
    if record.pages is not None:
        return FAX_SECONDS_PER_PAGE * max(1, record.pages)
    return DEFAULT_PLAY_SECONDS
