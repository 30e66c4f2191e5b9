"""The caller's voice message attached to the missed-call mail: recorded by the simulator the way
Asterisk's Record() does (VarSet RECORDED_FILE on the trunk channel), named by a dial-plan variable
(Setvar over AMI), served over HTTP; too big, missing or outside the allowed places: a note."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import io
import os
import threading
import wave
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest

from mailgw.absence_recording import _allowed_url, _read
from mailgw.cli import main
from mailgw.config import Config
from mailgw.gateway import Gateway

from .absence_helpers import CallEnds, import_customers, missed_call, place_incoming
from .conftest import Sink, running_gateway
from .test_absence_e2e import absence_config, set_absent


def voice_message(path: Path, seconds: float = 0.2) -> bytes:
    """A real WAV file (8 kHz, 16 bit, mono: what Asterisk records), written to ``path``."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(bytes(range(256)) * int(seconds * 8000 * 2 / 256))
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


async def test_voice_message_left_on_the_simulator_is_attached_byte_for_byte(
        make_config: Callable[..., Config], sink: Sink, tmp_path: Path) -> None:
    audio = voice_message(tmp_path / "hello.wav")
    async with running_gateway(absence_config(make_config, tmp_path), sink) as gw:
        await import_customers(gw, tmp_path)
        await set_absent(gw, "tanaka@b.example")
        ends = CallEnds(gw)
        assert gw.simulator is not None
        command = ["phone", "--ami", f"127.0.0.1:{gw.ami_port}", "call", "--from", "0312345678", "--to", "2000",
                   "--nobody-answers", "--leaves-message", str(tmp_path / "hello.wav")]
        assert await asyncio.to_thread(main, command) == 0  # what a user types, over AMI
        call_id = gw.simulator.calls[-1].call_id
        _, notice = await ends.wait(call_id)
        assert notice is not None and notice.recipient == "tanaka@b.example"
        # Record() wrote it into the simulator's spool; RECORDED_FILE named it without extension.
        location = await gw.store.recording_of(call_id)
        assert location == str(gw.config.data_dir / "sim-recordings" / call_id)
        _, rcpt_tos, message = await sink.next()
        assert rcpt_tos == ["tanaka@b.example"] and message.get_content_type() == "multipart/mixed"
        body = message.get_body(("plain",)).get_content()
        assert "left a voice message, attached (voice-message-" in body and "tel:+81312345678" in body
        [attachment] = list(message.iter_attachments())
        assert attachment.get_content_type() == "audio/wav"
        assert attachment.get_filename().startswith("voice-message-") and attachment.get_filename().endswith(".wav")
        assert attachment.get_content() == audio


async def test_voice_message_is_attached_with_a_relative_data_dir_as_make_serve_uses(
        make_config: Callable[..., Config], sink: Sink, tmp_path: Path, monkeypatch) -> None:
    """``make serve`` runs with ``data_dir: var``: the simulator still names its recording by an
    absolute path, as Asterisk does, so the gateway may read and attach it."""
    audio = voice_message(tmp_path / "hello.wav")
    monkeypatch.chdir(tmp_path)
    config = replace(absence_config(make_config, tmp_path), data_dir=Path("var"))
    async with running_gateway(config, sink) as gw:
        call_id = await missed_call(gw, tmp_path, message=tmp_path / "hello.wav")
        assert await gw.store.recording_of(call_id) == str(tmp_path / "var" / "sim-recordings" / call_id)
        _, _, message = await sink.next()
        [attachment] = list(message.iter_attachments())
        assert attachment.get_content() == audio


async def test_too_big_recording_is_not_attached_and_the_mail_says_so(
        make_config: Callable[..., Config], sink: Sink, tmp_path: Path) -> None:
    voice_message(tmp_path / "long.wav", seconds=1.0)  # 16 kB
    config = absence_config(make_config, tmp_path, recording_max_bytes=4096)
    async with running_gateway(config, sink) as gw:
        call_id = await missed_call(gw, tmp_path, message=tmp_path / "long.wav")
        _, _, message = await sink.next()
        assert message.get_content_type() == "text/plain" and message["X-CTI-Call"] == call_id
        body = message.get_content()
        assert "too big to attach (limit 4.1 KB)" in body, body
        assert str(gw.config.data_dir / "sim-recordings" / call_id) in body  # where it can be fetched


async def setvar_while_ringing(gw: Gateway, tmp_path: Path, value: str) -> str:
    """The dial plan names a recording (Set(MAILGW_RECORDING=...)) on the trunk channel while the
    call rings: Setvar over AMI, which emits the VarSet Asterisk would."""
    await import_customers(gw, tmp_path)
    await set_absent(gw, "tanaka@b.example")
    ends = CallEnds(gw)
    assert gw.pbx is not None
    call_id = await place_incoming(gw, "0312345678", "2000", answer="nobody", ring_time=1.0)
    await ends.wait(call_id, until=lambda row: row.rung == ("2000",))
    [trunk] = [c for c in gw.simulator._channels.values() if c.uniqueid == call_id]  # type: ignore[union-attr]
    reply = await gw.pbx.client.action("Setvar", Channel=trunk.name, Variable="MAILGW_RECORDING", Value=value)
    assert reply.ok, reply
    await ends.wait(call_id)
    return call_id


async def test_recording_outside_the_allowed_places_or_missing_gets_a_note(
        make_config: Callable[..., Config], sink: Sink, tmp_path: Path) -> None:
    secret = tmp_path / "directory.yaml"  # a file of the gateway's own: never mailed out
    async with running_gateway(absence_config(make_config, tmp_path), sink) as gw:
        call_id = await setvar_while_ringing(gw, tmp_path, str(secret))
        assert await gw.store.recording_of(call_id) == str(secret)
        _, _, message = await sink.next()
        assert list(message.iter_attachments()) == []
        body = message.get_content()
        assert "could not be attached (not in a place absence.recordings allows)" in body, body

        gone = gw.config.data_dir / "sim-recordings" / "nothing-here"
        await setvar_while_ringing(gw, tmp_path, str(gone))
        _, _, message = await sink.next()
        assert "could not be attached (no such file)" in message.get_content()


@contextlib.contextmanager
def http_server(files: dict[str, bytes]) -> Iterator[int]:
    """A real HTTP server on loopback serving ``files`` (path -> bytes) as audio/wav."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            data = files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "audio/wav")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


async def test_recording_named_by_url_is_fetched_and_attached(make_config: Callable[..., Config], sink: Sink,
                                                              tmp_path: Path) -> None:
    audio = voice_message(tmp_path / "x.wav")
    with http_server({"/vm/1.wav": audio}) as port:
        base = f"http://127.0.0.1:{port}/vm/"
        config = absence_config(make_config, tmp_path, recordings=(base,))
        async with running_gateway(config, sink) as gw:
            await setvar_while_ringing(gw, tmp_path, base + "1.wav")
            _, _, message = await sink.next()
            [attachment] = list(message.iter_attachments())
            assert attachment.get_content_type() == "audio/wav" and attachment.get_content() == audio

            await setvar_while_ringing(gw, tmp_path, base + "2.wav")  # not there: HTTP 404
            _, _, message = await sink.next()
            assert "could not be attached (HTTP 404" in message.get_content()
            await setvar_while_ringing(gw, tmp_path, f"http://127.0.0.1:{port}/elsewhere.wav")
            _, _, message = await sink.next()
            assert "not in a place absence.recordings allows" in message.get_content()


async def test_digest_attaches_each_calls_voice_message(make_config: Callable[..., Config], sink: Sink,
                                                        tmp_path: Path) -> None:
    first_audio = voice_message(tmp_path / "a.wav", 0.1)
    second_audio = voice_message(tmp_path / "b.wav", 0.2)
    config = absence_config(make_config, tmp_path, digests=(("tanaka@b.example", 2, None),))
    async with running_gateway(config, sink) as gw:
        await import_customers(gw, tmp_path)
        await set_absent(gw, "tanaka@b.example")
        ends = CallEnds(gw)
        first = await place_incoming(gw, "0312345678", "2000", answer="nobody", message=tmp_path / "a.wav")
        second = await place_incoming(gw, "0312345679", "2000", answer="nobody", message=tmp_path / "b.wav")
        await asyncio.gather(ends.wait(first), ends.wait(second))
        _, _, digest = await sink.next()
        assert set(digest["X-CTI-Calls"].split(", ")) == {first, second}
        assert sorted(a.get_content() for a in digest.iter_attachments()) == sorted([first_audio, second_audio])
        assert digest.get_body(("plain",)).get_content().count("voice message attached: voice-message-") == 2


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://pbx/vm/1.wav", True),
    ("https://user:secret@pbx/vm/1.wav", True),          # credentials for the PBX's web server
    ("https://pbx:443/vm/1.wav", True),
    ("https://pbx.attacker.example/vm/1.wav", False),    # a longer host with the same start
    ("https://pbx/vmx/1.wav", False),                    # the place is a folder, not a prefix
    ("https://pbx/vm/../admin/secrets", False),
    ("https://pbx/vm/%2e%2e/admin/secrets", False),
    ("http://pbx/vm/1.wav", False),                      # another scheme
    ("https://pbx:8443/vm/1.wav", False),                # another port
    ("https://pbx:notaport/vm/1.wav", False),
])
def test_a_recording_url_must_be_under_an_allowed_place(url: str, allowed: bool) -> None:
    assert _allowed_url(url, ("/var/spool/asterisk", "https://pbx/vm")) is allowed


def test_a_fifo_or_a_symlink_out_of_an_allowed_place_is_not_read(tmp_path: Path) -> None:
    place = tmp_path / "recordings"
    place.mkdir()
    os.mkfifo(place / "fifo.wav")  # opening it for reading would block the mailer for ever
    assert _read(str(place / "fifo.wav"), (str(place),), 1024).state in ("unreadable", "refused")  # returns
    (tmp_path / "directory.yaml").write_text("secret")
    (place / "link.wav").symlink_to(tmp_path / "directory.yaml")
    assert _read(str(place / "link.wav"), (str(place),), 1024).state == "refused"
    (place / "ok.wav").write_bytes(b"RIFF")
    assert _read(str(place / "ok"), (str(place),), 1024).data == b"RIFF"  # Record() names it without .wav
