"""``AmiPbx.play`` and ``AmiPbx.send_fax`` over real AMI to the simulator: the Originate with
Application Playback / SendFAX (capture 04), the outcome for answered, busy and no-answer phones,
and what the simulated phone heard or the simulated fax received."""

from __future__ import annotations

import asyncio
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mailgw.pbx.driver import AmiPbx
from mailgw.pbx.port import CallOutcome, DeliveryResult

from .pbx_helpers import WAIT, phone_book

CALLER = '"mailgw" <100>'


def book() -> Any:
    return phone_book({"2000": {"answer_after": 1}, "2003": "busy", "2004": "no-answer",
                       "2009": {"answer_after": 1, "fax": True}})


def voice(path: Path, seconds: float) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1), wav.setsampwidth(2), wav.setframerate(8000)
        wav.writeframes(b"\x00\x00" * int(8000 * seconds))
    return path


def fax(path: Path, pages: int) -> Path:
    images = [Image.new("1", (1728, 200), 1) for _ in range(pages)]
    images[0].save(path, format="TIFF", compression="group3", dpi=(204, 196), save_all=True,
                   append_images=images[1:])
    return path


async def play(pbx: AmiPbx, call_id: str, number: str, media: Path) -> DeliveryResult:
    return await asyncio.wait_for(pbx.play(call_id, number, media, ring_timeout=2, caller_id=CALLER), WAIT)


async def send_fax(pbx: AmiPbx, call_id: str, number: str, tiff: Path) -> DeliveryResult:
    return await asyncio.wait_for(pbx.send_fax(call_id, number, tiff, ring_timeout=2, caller_id=CALLER), WAIT)


async def test_play_to_an_answering_phone_is_heard(make_sim: Callable[..., Any], make_pbx: Callable[..., Any],
                                                   tmp_path: Path) -> None:
    sim = await make_sim(book())
    pbx = await make_pbx(sim)
    memo = voice(tmp_path / "req-1.wav", 1.5)
    result = await play(pbx, "play-1", "2000", memo)
    assert (result.call_id, result.outcome, result.pages) == ("play-1", CallOutcome.ANSWERED, None)
    assert result.answered_at is not None and result.started_at <= result.answered_at <= result.ended_at
    [heard] = [r for r in sim.media_log if r.call_id == "play-1"]
    # Playback got the spool path without ".wav", and the simulator found the file as Asterisk would.
    assert (heard.kind, heard.number, heard.name, heard.path) == ("heard", "2000", str(tmp_path / "req-1"),
                                                                  str(memo))
    assert heard.seconds == pytest.approx(1.5)
    record = sim.call("play-1")
    assert record is not None and (record.application, record.data) == ("Playback", str(tmp_path / "req-1"))


@pytest.mark.parametrize("number, outcome, cause", [("2003", CallOutcome.BUSY, 17),
                                                    ("2004", CallOutcome.NO_ANSWER, 19)])
async def test_play_to_a_phone_that_does_not_answer(make_sim: Callable[..., Any], make_pbx: Callable[..., Any],
                                                    tmp_path: Path, number: str, outcome: CallOutcome,
                                                    cause: int) -> None:
    sim = await make_sim(book())
    pbx = await make_pbx(sim)
    result = await play(pbx, f"play-{number}", number, voice(tmp_path / "memo.wav", 1))
    assert (result.outcome, result.cause, result.answered_at) == (outcome, cause, None)
    assert not [r for r in sim.media_log if r.call_id == f"play-{number}"], "nobody heard anything"


async def test_send_fax_to_a_fax_machine(make_sim: Callable[..., Any], make_pbx: Callable[..., Any],
                                         tmp_path: Path) -> None:
    sim = await make_sim(book())
    pbx = await make_pbx(sim)
    tiff = fax(tmp_path / "req-2.tif", 3)
    result = await send_fax(pbx, "fax-1", "2009", tiff)
    assert (result.outcome, result.pages) == (CallOutcome.ANSWERED, 3)
    [received] = [r for r in sim.media_log if r.call_id == "fax-1"]
    assert (received.kind, received.number, received.path, received.pages) == ("fax-received", "2009",
                                                                               str(tiff), 3)


async def test_send_fax_to_a_phone_that_is_no_fax_fails(make_sim: Callable[..., Any],
                                                        make_pbx: Callable[..., Any], tmp_path: Path) -> None:
    sim = await make_sim(book())
    pbx = await make_pbx(sim)
    result = await send_fax(pbx, "fax-2", "2000", fax(tmp_path / "doc.tif", 1))
    assert (result.outcome, result.pages) == (CallOutcome.FAILED, 0)
    assert result.answered_at is not None  # a person picked up; no fax tone answered
    assert [r.kind for r in sim.media_log if r.call_id == "fax-2"] == ["fax-refused"]


async def test_send_fax_busy(make_sim: Callable[..., Any], make_pbx: Callable[..., Any], tmp_path: Path) -> None:
    sim = await make_sim(book())
    pbx = await make_pbx(sim)
    result = await send_fax(pbx, "fax-3", "2003", fax(tmp_path / "doc.tif", 1))
    assert (result.outcome, result.cause, result.pages) == (CallOutcome.BUSY, 17, 0)


@pytest.mark.parametrize("path", ["relative/file.wav", "/tmp/a,b.wav", "/tmp/x|y.wav", "/tmp/../etc/passwd"])
async def test_media_paths_that_could_inject_are_refused(sim: Any, make_pbx: Callable[..., Any], path: str) -> None:
    pbx = await make_pbx(sim)
    with pytest.raises(ValueError):
        await play(pbx, "bad", "2000", Path(path))
    assert sim.call("bad") is None
