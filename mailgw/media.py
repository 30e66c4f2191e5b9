"""Voice and FAX parts of a request mail, turned into what the PBX plays and sends.

* Voice: any sound libsndfile reads (WAV of any rate/channels/width, MP3, Ogg Vorbis/Opus,
  FLAC, AIFF, AU, ...) is mixed to mono, resampled with soxr and written as **8 kHz mono 16-bit
  PCM WAV**, the format Asterisk's ``Playback`` plays without transcoding.
* FAX: PDF (rendered with PDFium), TIFF (every page), PNG, JPEG, GIF, BMP become one
  **TIFF Class F** file: CCITT T.4 (``group3``) 1-bit pages, 1728 pixels wide at 204x196 dpi
  (fine resolution, A4/letter width), as Asterisk's ``SendFAX`` takes it.

``check_part`` is the fast look at DATA time (size, can it be opened, duration, page count,
password); ``prepare_voice`` / ``prepare_fax`` do the conversion (blocking: callers use
``asyncio.to_thread``). Every problem is a ``MediaError`` whose text names the part, e.g.
``part 2 (memo.wav): not a readable WAV file: Format not recognised``. Which parts are voice
and which are FAX is decided once, by ``request.part_kind``.
"""

from __future__ import annotations

import email
import email.policy
import io
import math
import os
import re
import struct
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pypdfium2 as pdfium
import soundfile
import soxr
from PIL import Image, ImageOps, ImageSequence

from .request import Part, PartKind, walk_leaves

if TYPE_CHECKING:
    from .config import Config, MediaConfig

VOICE_RATE = 8000  # Hz: what Asterisk plays natively (slin)
FAX_WIDTH = 1728  # pixels: a T.4 scan line for A4 and letter at 204 dpi
FAX_DPI = (204, 196)  # fine resolution: 8 lines/mm horizontally, 7.7 lines/mm vertically
FAX_MAX_LINES = 2 * 2292  # two A4 lengths at 196 dpi; taller pages are scaled down to fit
PDF_POINTS_PER_INCH = 72
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_PIXEL_LIMIT = 60_000_000  # a decoded image larger than this is refused, not decoded (bomb guard)
_NO_PAGES = re.compile(rb"/Count\s*0(?![0-9])")
_SOME_PAGES = re.compile(rb"/Count\s*[1-9]")
_PDFIUM = threading.Lock()  # PDFium is not thread-safe, and callers convert in worker threads

_SOUND_NAMES = {"wav": "WAV", "x-wav": "WAV", "wave": "WAV", "vnd.wave": "WAV", "mpeg": "MP3", "mp3": "MP3",
                "ogg": "Ogg", "opus": "Ogg Opus", "flac": "FLAC", "x-flac": "FLAC", "aiff": "AIFF",
                "x-aiff": "AIFF", "basic": "AU"}


class MediaError(ValueError):
    """A voice or FAX part that cannot be used; the text names the part and the problem.

    ``over_limit`` tells a part that is fine but too big/long/many-paged from a broken one."""

    def __init__(self, text: str, *, over_limit: bool = False) -> None:
        super().__init__(text)
        self.over_limit = over_limit


@dataclass(frozen=True)
class MediaLimits:
    max_voice_seconds: float = 300.0
    max_fax_pages: int = 20
    max_part_bytes: int = 10 * 1024 * 1024

    @classmethod
    def of(cls, config: MediaConfig) -> MediaLimits:
        return cls(config.max_voice_seconds, config.max_fax_pages, config.max_part_bytes)


@dataclass(frozen=True)
class PreparedVoice:
    path: Path  # 8 kHz mono 16-bit PCM WAV (what Asterisk plays)
    seconds: float


@dataclass(frozen=True)
class PreparedFax:
    path: Path  # TIFF Class F: G3 (CCITT T.4), 204x196 dpi, 1728 px wide
    pages: int


def spool_dir(config: Config) -> Path:
    """Where converted media go: ``media.spool``, else ``<data dir>/media``; absolute, because
    the PBX opens the files by the path it is given."""
    return (config.media.spool or config.data_dir / "media").resolve()


def label(part: Part) -> str:
    return f"part {part.index} ({part.filename or part.content_type})"


def part_bytes(raw_message: bytes, part: Part) -> bytes:
    """The decoded payload of ``part`` (as ``request.parse_request`` numbered it) in ``raw_message``."""
    return _payloads(raw_message, [part])[part.index]


def _payloads(raw_message: bytes, parts: list[Part]) -> dict[int, bytes]:
    wanted = {part.index: part for part in parts}
    found: dict[int, bytes] = {}
    message = email.message_from_bytes(raw_message, policy=email.policy.compat32)
    for index, entity in walk_leaves(message):
        if index in wanted:
            data = entity.get_payload(decode=True)
            if isinstance(data, bytes):
                found[index] = data
    for index, part in wanted.items():
        if index not in found:
            raise MediaError(f"{label(part)}: not found in the message")
    return found


def check_message(raw_message: bytes, parts: tuple[Part, ...] | list[Part], limits: MediaLimits) -> None:
    """``check_part`` for every voice and FAX part of one mail (parsed once)."""
    media = [p for p in parts if p.kind in (PartKind.VOICE, PartKind.FAX)]
    if media:
        payloads = _payloads(raw_message, media)
        for part in media:
            check_part(part, payloads[part.index], limits)


# --- the DATA-time check ---------------------------------------------------------------------------

def check_part(part: Part, data: bytes, limits: MediaLimits) -> None:
    """Refuse a voice or FAX part that cannot be delivered; other kinds pass unchecked."""
    if part.kind not in (PartKind.VOICE, PartKind.FAX):
        return
    _check_size(part, data, limits)
    if part.kind is PartKind.VOICE:
        _check_seconds(part, _sound_seconds(part, data), limits)
    else:
        _check_pages(part, _page_count(part, data), limits)


def _check_size(part: Part, data: bytes, limits: MediaLimits) -> None:
    if not data:
        raise MediaError(f"{label(part)}: empty")
    if len(data) > limits.max_part_bytes:
        raise MediaError(f"{label(part)}: {len(data)} bytes, over the limit of {limits.max_part_bytes} bytes",
                         over_limit=True)


def _check_seconds(part: Part, seconds: float, limits: MediaLimits) -> None:
    if not seconds > 0:
        raise MediaError(f"{label(part)}: holds no sound (0 seconds)")
    if seconds > limits.max_voice_seconds:
        raise MediaError(f"{label(part)}: {seconds:.1f} seconds long, over the limit of "
                         f"{limits.max_voice_seconds:g} seconds", over_limit=True)


def _check_pages(part: Part, pages: int, limits: MediaLimits) -> None:
    if pages < 1:
        raise MediaError(f"{label(part)}: has no pages")
    if pages > limits.max_fax_pages:
        raise MediaError(f"{label(part)}: {pages} pages, over the limit of {limits.max_fax_pages} pages",
                         over_limit=True)


def _sound_name(part: Part) -> str:
    subtype = part.content_type.partition("/")[2]
    return _SOUND_NAMES.get(subtype, subtype.upper() or "sound")


def _sound_error(part: Part, exc: Exception) -> MediaError:
    detail = str(exc).rpartition(": ")[2] or type(exc).__name__  # drop libsndfile's "Error opening <BytesIO>"
    return MediaError(f"{label(part)}: not a readable {_sound_name(part)} file: {detail}")


def _sound_seconds(part: Part, data: bytes) -> float:
    try:
        info = soundfile.info(io.BytesIO(data))
    except Exception as exc:  # libsndfile says what is wrong; anything else is just as unreadable
        raise _sound_error(part, exc) from None
    return info.frames / info.samplerate if info.samplerate else 0.0


def _is_pdf(part: Part, data: bytes) -> bool:
    return data[:5] == b"%PDF-" or part.content_type == "application/pdf"


def _open_pdf(part: Part, data: bytes) -> pdfium.PdfDocument:
    try:
        return pdfium.PdfDocument(data)
    except pdfium.PdfiumError:
        # PDFium's error code is process-wide and can be stale, so the bytes say what went wrong.
        if b"/Encrypt" in data:
            raise MediaError(f"{label(part)}: the PDF is password-protected") from None
        if _NO_PAGES.search(data) and not _SOME_PAGES.search(data):
            raise MediaError(f"{label(part)}: has no pages") from None  # PDFium will not open an empty PDF
        raise MediaError(f"{label(part)}: not a readable PDF (damaged or truncated)") from None


def _open_image(part: Part, data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MediaError(f"{label(part)}: the image is too large to decode") from None
    except Exception as exc:  # Pillow raises many kinds on garbage
        raise MediaError(f"{label(part)}: not a readable image: {exc}") from None
    if width * height > _PIXEL_LIMIT:
        raise MediaError(f"{label(part)}: {width}x{height} pixels is too large an image")
    return image


def _page_count(part: Part, data: bytes) -> int:
    if _is_pdf(part, data):
        with _PDFIUM:
            document = _open_pdf(part, data)
            try:
                return len(document)
            finally:
                document.close()
    image = _open_image(part, data)
    try:
        pages = getattr(image, "n_frames", 1)
        image.load()  # a truncated or corrupt first page shows here, not at delivery
    except Exception as exc:
        raise MediaError(f"{label(part)}: not a readable image: {exc}") from None
    return pages


# --- conversion ------------------------------------------------------------------------------------

def _destination(dest_dir: Path, name: str, suffix: str) -> Path:
    if not _NAME.fullmatch(name):
        raise ValueError(f"media name must be 1-100 of [A-Za-z0-9._-]: {name!r}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    return dest_dir / f"{name}{suffix}"


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write next to ``path`` and rename, so the PBX never opens a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # the PBX runs as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare_voice(part: Part, data: bytes, dest_dir: Path, name: str, limits: MediaLimits) -> PreparedVoice:
    """``dest_dir/<name>.wav``: the part as 8 kHz mono 16-bit PCM WAV."""
    _check_size(part, data, limits)
    _check_seconds(part, _sound_seconds(part, data), limits)
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:
        raise _sound_error(part, exc) from None
    mono = samples.mean(axis=1) if samples.size else np.zeros(0, dtype=np.float32)
    if rate != VOICE_RATE and mono.size:
        mono = soxr.resample(mono, rate, VOICE_RATE, quality="HQ")
    if mono.size == 0:
        raise MediaError(f"{label(part)}: holds no sound (0 seconds)")
    pcm = np.clip(np.round(mono * 32767.0), -32768, 32767).astype(np.int16)
    path = _destination(dest_dir, name, ".wav")
    _write_atomically(path, lambda tmp: soundfile.write(str(tmp), pcm, VOICE_RATE, subtype="PCM_16", format="WAV"))
    return PreparedVoice(path=path, seconds=len(pcm) / VOICE_RATE)


def prepare_fax(part: Part, data: bytes, dest_dir: Path, name: str, limits: MediaLimits) -> PreparedFax:
    """``dest_dir/<name>.tif``: every page of the part as TIFF Class F (G3, 204x196 dpi, 1728 wide)."""
    _check_size(part, data, limits)
    _check_pages(part, _page_count(part, data), limits)
    try:
        if _is_pdf(part, data):
            with _PDFIUM:
                pages = [fax_page(page) for page in _pages(part, data)]
        else:
            pages = [fax_page(page) for page in _pages(part, data)]
    except MediaError:
        raise
    except Exception as exc:  # a page that opened but cannot be decoded
        raise MediaError(f"{label(part)}: a page cannot be read: {exc}") from None
    if not pages:
        raise MediaError(f"{label(part)}: has no pages")
    path = _destination(dest_dir, name, ".tif")

    def write(tmp: Path) -> None:
        pages[0].save(tmp, format="TIFF", compression="group3", dpi=FAX_DPI, save_all=True,
                      append_images=pages[1:])
        _mark_min_is_white(tmp)

    _write_atomically(path, write)
    return PreparedFax(path=path, pages=len(pages))


def _pages(part: Part, data: bytes) -> Iterator[tuple[Image.Image, float, float]]:
    """Each page as a greyscale image with its horizontal and vertical resolution (dpi)."""
    if _is_pdf(part, data):
        document = _open_pdf(part, data)
        try:
            for page in document:
                width_points = page.get_width() or 1.0
                scale = FAX_WIDTH / width_points  # render straight at fax width
                # A very tall page is rendered smaller; fax_page fits it on the page anyway.
                scale = min(scale, 1.1 * FAX_MAX_LINES / (page.get_height() or 1.0))
                dpi = scale * PDF_POINTS_PER_INCH
                bitmap = page.render(scale=scale, grayscale=True)
                yield bitmap.to_pil().convert("L"), dpi, dpi
        finally:
            document.close()
        return
    image = _open_image(part, data)
    for frame in ImageSequence.Iterator(image):
        x_dpi, y_dpi = _image_dpi(frame)
        yield _greyscale(frame), x_dpi, y_dpi


def _image_dpi(image: Image.Image) -> tuple[float, float]:
    dpi = image.info.get("dpi")
    try:
        x_dpi, y_dpi = float(dpi[0]), float(dpi[1])
    except (TypeError, ValueError, IndexError):
        return 1.0, 1.0  # unknown: square pixels, scaled to the page width
    return (x_dpi, y_dpi) if x_dpi > 0 and y_dpi > 0 else (1.0, 1.0)


def _greyscale(image: Image.Image) -> Image.Image:
    """Transparent parts become white paper, not black."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(paper, rgba).convert("L")
    return image.convert("L")


def fax_page(page: tuple[Image.Image, float, float]) -> Image.Image:
    """One greyscale page → a 1-bit 1728-pixel-wide page at 204x196 dpi, keeping its proportions."""
    image, x_dpi, y_dpi = page
    width, height = image.size
    lines = max(1, math.ceil(height * (FAX_WIDTH / width) * (x_dpi / y_dpi) * (FAX_DPI[1] / FAX_DPI[0])))
    if lines > FAX_MAX_LINES:  # too tall: fit the height and centre it on a full-width line
        scaled_width = max(1, round(FAX_WIDTH * FAX_MAX_LINES / lines))
        resized = image.resize((scaled_width, FAX_MAX_LINES), Image.Resampling.LANCZOS)
        canvas = Image.new("L", (FAX_WIDTH, FAX_MAX_LINES), 255)
        canvas.paste(resized, ((FAX_WIDTH - scaled_width) // 2, 0))
        resized = canvas
    elif (width, height) != (FAX_WIDTH, lines):
        resized = image.resize((FAX_WIDTH, lines), Image.Resampling.LANCZOS)
    else:
        resized = image
    # 1 bits are ink: T.4 codes 0 bits as white runs, so paper must be 0 (see _mark_min_is_white).
    return ImageOps.invert(resized).convert("1", dither=Image.Dither.NONE)


def _mark_min_is_white(path: Path) -> None:
    """Say PhotometricInterpretation 0 (WhiteIsZero) in every page, as TIFF Class F requires.

    Pillow writes 1-bit pages as BlackIsZero and its G3 encoder (libtiff) codes the bits as they
    are, so the pages are drawn with ink = 1 and the tag is set here: a fax receiver then gets
    paper as white runs. (Pillow's own ``tiffinfo={262: 0}`` garbles G3 pages.)
    """
    data = bytearray(path.read_bytes())
    if data[:4] != b"II*\x00":
        raise ValueError("expected a little-endian TIFF from Pillow")
    (offset,) = struct.unpack_from("<I", data, 4)
    seen: set[int] = set()
    while offset and offset not in seen:
        seen.add(offset)
        (entries,) = struct.unpack_from("<H", data, offset)
        for entry in range(entries):
            at = offset + 2 + 12 * entry
            tag, kind = struct.unpack_from("<HH", data, at)
            if tag == 262 and kind == 3:  # SHORT, value kept in the entry itself
                struct.pack_into("<H", data, at + 8, 0)
        (offset,) = struct.unpack_from("<I", data, offset + 2 + 12 * entries)
    path.write_bytes(bytes(data))
