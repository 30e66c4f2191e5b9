"""mailgw.media: every accepted voice and FAX type converted and checked by decoding the output
(rate, channels, sample width, duration; TIFF compression, resolution, width, pages), bad media
refused with a MediaError naming the part, and bad media refused at DATA over real SMTP."""

from __future__ import annotations

import io
import wave
from email.message import EmailMessage
from pathlib import Path

import numpy as np
import pypdfium2 as pdfium
import pytest
import soundfile
from PIL import Image

from mailgw.gateway import Gateway
from mailgw.media import (FAX_WIDTH, MediaError, MediaLimits, check_part, part_bytes, prepare_fax,
                          prepare_voice)
from mailgw.request import Part, part_kind

from .conftest import placed_calls, request_mail, submit

LIMITS = MediaLimits(max_voice_seconds=10, max_fax_pages=5, max_part_bytes=2 * 1024 * 1024)


def part(content_type: str, filename: str, index: int = 2, data: bytes = b"") -> Part:
    return Part(index=index, content_type=content_type, filename=filename, content_id=None, size=len(data),
                kind=part_kind(content_type))


# --- inputs, made here -----------------------------------------------------------------------------

def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.5 * np.sin(2 * np.pi * 440 * t)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


def sound(seconds: float, rate: int, channels: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, tone(seconds, rate, channels), rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def image(fmt: str, size: tuple[int, int] = (850, 1100), mode: str = "L", dpi: tuple[int, int] | None = None,
          frames: int = 1) -> bytes:
    pages = [Image.new(mode, size, 255 if mode == "L" else (255, 255, 255, 0)) for _ in range(frames)]
    for number, page in enumerate(pages):  # something black to see on each page
        page.paste(0 if mode == "L" else (0, 0, 0, 255), (50, 50 + 10 * number, size[0] - 50, 150 + 10 * number))
    buf = io.BytesIO()
    extra: dict = {"dpi": dpi} if dpi else {}
    if fmt == "TIFF":
        extra["compression"] = "tiff_lzw"
    if frames > 1:
        extra.update(save_all=True, append_images=pages[1:])
    pages[0].save(buf, format=fmt, **extra)
    return buf.getvalue()


def g3_tiff() -> bytes:
    """Two Class F pages as a fax machine sends them: 1728 wide, 204x196 dpi, G3."""
    pages = [Image.new("1", (1728, 1000), 1) for _ in range(2)]
    for page in pages:
        page.paste(0, (100, 50, 1628, 150))
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", compression="group3", dpi=(204, 196), save_all=True, append_images=pages[1:])
    return buf.getvalue()


def pdf(pages: list[tuple[float, float]]) -> bytes:
    document = pdfium.PdfDocument.new()
    for width, height in pages:
        document.new_page(width, height)
    buf = io.BytesIO()
    document.save(buf)
    return buf.getvalue()


def encrypted_pdf() -> bytes:
    """A PDF under the standard security handler whose user password is not empty."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] >>",
               b"<< /Filter /Standard /V 1 /R 2 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32 + b"> /P -4 >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += (b"trailer\n<< /Size %d /Root 1 0 R /Encrypt 4 0 R /ID [<00112233445566778899aabbccddeeff> "
            b"<00112233445566778899aabbccddeeff>] >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return bytes(out)


# --- voice ---------------------------------------------------------------------------------------------

VOICES = [
    ("audio/wav", "memo.wav", sound(1.5, 44100, 2, "WAV", "PCM_24"), 1.5),
    ("audio/x-wav", "u8.wav", sound(2.0, 16000, 1, "WAV", "PCM_U8"), 2.0),
    ("audio/wav", "float.wav", sound(1.0, 48000, 1, "WAV", "FLOAT"), 1.0),
    ("audio/wav", "ulaw.wav", sound(1.0, 8000, 1, "WAV", "ULAW"), 1.0),
    ("audio/mpeg", "memo.mp3", sound(2.0, 22050, 1, "MP3"), 2.0),
    ("audio/ogg", "memo.ogg", sound(1.0, 32000, 2, "OGG", "VORBIS"), 1.0),
    ("audio/flac", "memo.flac", sound(1.0, 96000, 1, "FLAC"), 1.0),
]


@pytest.mark.parametrize("content_type, filename, data, seconds", VOICES, ids=[v[1] for v in VOICES])
def test_voice_becomes_8khz_mono_16bit_pcm_wav(tmp_path: Path, content_type: str, filename: str, data: bytes,
                                               seconds: float) -> None:
    memo = part(content_type, filename)
    check_part(memo, data, LIMITS)
    prepared = prepare_voice(memo, data, tmp_path, "req-1-part-2", LIMITS)
    assert prepared.path == tmp_path / "req-1-part-2.wav"
    with wave.open(str(prepared.path), "rb") as wav:  # the stdlib reader, as a PBX-side check
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth(), wav.getcomptype()) == (8000, 1, 2, "NONE")
        frames = wav.getnframes()
        samples = np.frombuffer(wav.readframes(frames), dtype="<i2")
    assert frames / 8000 == pytest.approx(seconds, abs=0.06)  # MP3 encoders pad a frame
    assert prepared.seconds == pytest.approx(frames / 8000)
    assert 0.3 * 32767 < np.abs(samples).max() <= 32767  # the tone survived (not silence, not clipped to 0)
    assert list(tmp_path.iterdir()) == [prepared.path]  # no temporary file left behind


BAD_VOICES = [
    ("corrupt", b"RIFF\x24\x00\x00\x00WAVEjunkjunkjunk", "part 2 (memo.wav): not a readable WAV file: "),
    ("not-sound", b"hello, this is text", "part 2 (memo.wav): not a readable WAV file: Format not recognised"),
    ("empty", b"", "part 2 (memo.wav): empty"),
    ("too-long", sound(11, 8000, 1, "WAV", "PCM_16"), "part 2 (memo.wav): 11.0 seconds long, over the limit of 10 seconds"),
    ("silent-zero-length", sound(0, 8000, 1, "WAV", "PCM_16"), "part 2 (memo.wav): holds no sound (0 seconds)"),
]


@pytest.mark.parametrize("case, data, message", BAD_VOICES, ids=[b[0] for b in BAD_VOICES])
def test_bad_voice_is_refused_naming_the_part(tmp_path: Path, case: str, data: bytes, message: str) -> None:
    memo = part("audio/wav", "memo.wav")
    for attempt in (lambda: check_part(memo, data, LIMITS),
                    lambda: prepare_voice(memo, data, tmp_path, "v", LIMITS)):
        with pytest.raises(MediaError) as caught:
            attempt()
        assert str(caught.value).startswith(message), caught.value
    assert list(tmp_path.iterdir()) == []


def test_part_over_the_size_limit_is_refused() -> None:
    data = sound(8, 48000, 2, "WAV", "PCM_24")  # 2.3 MB, 8 s
    with pytest.raises(MediaError, match=r"^part 2 \(memo.wav\): \d+ bytes, over the limit of 2097152 bytes$"):
        check_part(part("audio/wav", "memo.wav"), data, LIMITS)


# --- FAX -------------------------------------------------------------------------------------------------

def decoded_fax(path: Path) -> list[Image.Image]:
    tiff = Image.open(path)
    pages = []
    for number in range(tiff.n_frames):
        tiff.seek(number)
        assert tiff.mode == "1"
        assert tiff.tag_v2[259] == 3, "compression must be CCITT T.4 (group3)"
        assert (tiff.tag_v2[282], tiff.tag_v2[283], tiff.tag_v2[296]) == (204, 196, 2)  # dpi, unit inch
        assert tiff.tag_v2[262] == 0, "TIFF Class F is WhiteIsZero: paper goes out as white runs"
        assert tiff.size[0] == FAX_WIDTH
        pages.append(tiff.copy())
    return pages


FAXES = [
    ("image/png", "page.png", image("PNG"), 1, round(1100 * 1728 / 850 * 196 / 204)),
    ("image/png", "alpha.png", image("PNG", mode="RGBA"), 1, round(1100 * 1728 / 850 * 196 / 204)),
    ("image/jpeg", "scan.jpg", image("JPEG", size=(1700, 1100), dpi=(200, 100)), 1,
     round(1100 * 1728 / 1700 * 2 * 196 / 204)),
    ("image/tiff", "three.tif", image("TIFF", frames=3), 3, round(1100 * 1728 / 850 * 196 / 204)),
    ("application/pdf", "doc.pdf", pdf([(595, 842), (612, 792)]), 2, round(842 * 1728 / 595 * 196 / 204)),
    ("image/gif", "page.gif", image("GIF"), 1, round(1100 * 1728 / 850 * 196 / 204)),
    ("image/bmp", "page.bmp", image("BMP"), 1, round(1100 * 1728 / 850 * 196 / 204)),
    ("image/tiff", "received.tif", g3_tiff(), 2, 1000),  # a received fax, sent on as it is
]


@pytest.mark.parametrize("content_type, filename, data, pages, lines", FAXES, ids=[f[1] for f in FAXES])
def test_fax_becomes_tiff_class_f(tmp_path: Path, content_type: str, filename: str, data: bytes, pages: int,
                                  lines: int) -> None:
    doc = part(content_type, filename)
    check_part(doc, data, LIMITS)
    prepared = prepare_fax(doc, data, tmp_path, "req-1-part-2", LIMITS)
    assert (prepared.path, prepared.pages) == (tmp_path / "req-1-part-2.tif", pages)
    decoded = decoded_fax(prepared.path)
    assert len(decoded) == pages
    assert abs(decoded[0].size[1] - lines) <= 2  # proportions kept at 204x196 dpi
    if content_type.startswith("image/"):
        first = np.asarray(decoded[0].convert("L"))
        assert first[first.shape[0] // 2, FAX_WIDTH // 2] == 255  # white paper (transparent too) ...
        assert (first[: first.shape[0] // 4] == 0).any()  # ... with the black bar near the top
    assert list(tmp_path.iterdir()) == [prepared.path]


def test_a_very_long_page_is_fitted_not_refused(tmp_path: Path) -> None:
    prepared = prepare_fax(part("image/png", "receipt.png"), image("PNG", size=(400, 20000)), tmp_path, "r", LIMITS)
    [page] = decoded_fax(prepared.path)
    assert page.size == (FAX_WIDTH, 2 * 2292)


BAD_FAXES = [
    ("password", "application/pdf", "doc.pdf", encrypted_pdf(), "part 2 (doc.pdf): the PDF is password-protected"),
    ("zero-pages", "application/pdf", "doc.pdf", pdf([]), "part 2 (doc.pdf): has no pages"),
    ("corrupt-pdf", "application/pdf", "doc.pdf", b"%PDF-1.4 garbage",
     "part 2 (doc.pdf): not a readable PDF (damaged or truncated)"),
    ("too-many", "application/pdf", "doc.pdf", pdf([(595, 842)] * 6),
     "part 2 (doc.pdf): 6 pages, over the limit of 5 pages"),
    ("too-many-tiff", "image/tiff", "fax.tif", image("TIFF", size=(100, 100), frames=6),
     "part 2 (fax.tif): 6 pages, over the limit of 5 pages"),
    ("truncated-png", "image/png", "page.png", image("PNG")[:200], "part 2 (page.png): not a readable image: "),
    ("not-an-image", "image/jpeg", "scan.jpg", b"this is no jpeg", "part 2 (scan.jpg): not a readable image: "),
]


@pytest.mark.parametrize("case, content_type, filename, data, message", BAD_FAXES, ids=[b[0] for b in BAD_FAXES])
def test_bad_fax_is_refused_naming_the_part(tmp_path: Path, case: str, content_type: str, filename: str,
                                            data: bytes, message: str) -> None:
    doc = part(content_type, filename)
    for attempt in (lambda: check_part(doc, data, LIMITS), lambda: prepare_fax(doc, data, tmp_path, "f", LIMITS)):
        with pytest.raises(MediaError) as caught:
            attempt()
        assert str(caught.value).startswith(message), caught.value
    assert list(tmp_path.iterdir()) == []


def test_names_that_are_paths_are_refused(tmp_path: Path) -> None:
    data = sound(1, 8000, 1, "WAV", "PCM_16")
    with pytest.raises(ValueError):
        prepare_voice(part("audio/wav", "m.wav"), data, tmp_path, "../escape", LIMITS)


# --- from the mail ---------------------------------------------------------------------------------------

def mail_with(body: str, *attachments: tuple[bytes, str, str, str]) -> EmailMessage:
    message = request_mail("alice@a.example", "cti@a.example", body)
    for data, maintype, subtype, filename in attachments:
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return message


def test_part_bytes_finds_the_decoded_payload() -> None:
    wav = sound(1, 8000, 1, "WAV", "PCM_16")
    png = image("PNG")
    raw = bytes(mail_with("to: 2001\n", (wav, "audio", "wav", "memo.wav"), (png, "image", "png", "p.png")))
    assert part_bytes(raw, part("audio/wav", "memo.wav", index=2)) == wav
    assert part_bytes(raw, part("image/png", "p.png", index=3)) == png
    with pytest.raises(MediaError, match=r"part 9 \(x.wav\): not found"):
        part_bytes(raw, part("audio/wav", "x.wav", index=9))


@pytest.mark.parametrize("attachment, code, text", [
    ((b"RIFF\x24\x00\x00\x00WAVEjunkjunkjunk", "audio", "wav", "memo.wav"), 550,
     "5.6.1 part 2 (memo.wav): not a readable WAV file: "),
    ((encrypted_pdf(), "application", "pdf", "contract.pdf"), 550,
     "5.6.1 part 2 (contract.pdf): the PDF is password-protected"),
    ((pdf([]), "application", "pdf", "empty.pdf"), 550, "5.6.1 part 2 (empty.pdf): has no pages"),
    ((sound(301, 8000, 1, "WAV", "PCM_16"), "audio", "wav", "long.wav"), 552,
     "5.3.4 part 2 (long.wav): 301.0 seconds long, over the limit of 300 seconds"),
])
async def test_bad_media_is_refused_at_data(gateway: Gateway, attachment: tuple[bytes, str, str, str], code: int,
                                            text: str) -> None:
    reply = await submit(gateway.smtp_port, mail_with("to: 2001\n", attachment))
    assert (reply.code, reply.stage) == (code, "DATA")
    assert reply.text.startswith(text), reply
    assert await gateway.store.list_messages() == []
    assert placed_calls(gateway) == []


async def test_good_media_is_accepted(gateway: Gateway) -> None:
    reply = await submit(gateway.smtp_port, mail_with("to: 2001\n", (sound(1, 44100, 2, "WAV"), "audio", "wav",
                                                                     "memo.wav"),
                                                      (pdf([(595, 842)]), "application", "pdf", "doc.pdf"),
                                                      (image("PNG"), "image", "png", "page.png")))
    assert reply.code == 250, reply
    [stored] = await gateway.store.list_messages()
    assert stored.kind == "request"


def test_the_sample_media_convert(tmp_path: Path) -> None:
    media = Path(__file__).resolve().parent.parent / "media"
    wav = (media / "sample-voice.wav").read_bytes()
    voice = prepare_voice(part("audio/wav", "sample-voice.wav"), wav, tmp_path, "v", LIMITS)
    assert voice.seconds == pytest.approx(1.2)
    page = (media / "sample-fax-page.png").read_bytes()
    fax = prepare_fax(part("image/png", "sample-fax-page.png"), page, tmp_path, "f", LIMITS)
    [decoded] = decoded_fax(fax.path)
    assert abs(decoded.size[1] - round(1169 * 1728 / 827 * 196 / 204)) <= 2


async def test_the_gateway_pbx_plays_and_faxes_from_the_media_spool(gateway: Gateway) -> None:
    """What the scenario steps do: convert into the configured spool, then play / send_fax."""
    import asyncio

    from mailgw.media import spool_dir
    from mailgw.pbx.port import CallOutcome

    spool = spool_dir(gateway.config)
    assert gateway.pbx is not None and gateway.simulator is not None
    voice = await asyncio.to_thread(prepare_voice, part("audio/mpeg", "memo.mp3"), sound(1.0, 22050, 1, "MP3"),
                                    spool, "req-9-part-2", LIMITS)
    doc = await asyncio.to_thread(prepare_fax, part("application/pdf", "doc.pdf"), pdf([(595, 842)] * 2),
                                  spool, "req-9-part-3", LIMITS)
    played = await asyncio.wait_for(gateway.pbx.play("req-9-play", "2000", voice.path, ring_timeout=5,
                                                     caller_id='"mailgw" <mailgw>'), 10)
    faxed = await asyncio.wait_for(gateway.pbx.send_fax("req-9-fax", "2009", doc.path, ring_timeout=5,
                                                        caller_id='"mailgw" <mailgw>'), 10)
    assert (played.outcome, faxed.outcome, faxed.pages) == (CallOutcome.ANSWERED, CallOutcome.ANSWERED, 2)
    log = {r.call_id: r for r in gateway.simulator.media_log}
    assert (log["req-9-play"].kind, log["req-9-play"].path) == ("heard", str(voice.path))
    assert log["req-9-play"].seconds == pytest.approx(voice.seconds)
    assert (log["req-9-fax"].kind, log["req-9-fax"].pages) == ("fax-received", 2)
