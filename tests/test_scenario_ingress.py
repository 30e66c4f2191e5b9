"""Scenarios at the door: a request naming an unknown stored scenario, or carrying one that does not
fit its mail, is refused at DATA naming the problem; stored scenarios are reloaded while the
gateway runs, and an invalid edit leaves the previous version in force."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from email.message import EmailMessage
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest

from mailgw.config import Config, HostPort
from mailgw.gateway import Gateway
from mailgw.scenario import Where, parse_scenario
from mailgw.scenario_library import Change

from .conftest import Sink, placed_calls, request_mail, submit

SHIPPED = Path(__file__).parent.parent / "scenarios"


@pytest.fixture
async def edited(make_config: Callable[..., Config], sink: Sink, tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway whose scenario folder the test edits (rescanned every 50 ms)."""
    folder = tmp_path / "scenarios"
    folder.mkdir()
    shutil.copy(SHIPPED / "fig42.yaml", folder / "fig42.yaml")
    config = make_config()
    config = replace(config, outbound=replace(config.outbound, smarthost=HostPort("127.0.0.1", sink.port)),
                     scenarios=replace(config.scenarios, dir=folder, reload_interval=0.05))
    gateway = Gateway(config)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


async def next_change(gateway: Gateway, name: str, write: Callable[[], None]) -> Change:
    """Make an edit and await the gateway noticing it (no sleeps: the library says when)."""
    seen: asyncio.Queue[Change] = asyncio.Queue()
    stop = gateway.scenarios.listen(lambda change: seen.put_nowait(change) if change.name == name else None)
    try:
        await asyncio.to_thread(write)
        return await asyncio.wait_for(seen.get(), 10)
    finally:
        stop()


SAMPLE_VOICE = (Path(__file__).parent.parent / "media" / "sample-voice.wav").read_bytes()


def named(scenario: str, *, voice: bool = False, sound: bytes = b"RIFF\x24\x00\x00\x00WAVE") -> EmailMessage:
    message = request_mail("alice@a.example", "cti@a.example", f"to: 2001\nscenario: {scenario}\n")
    if voice:
        message.add_attachment(sound, maintype="audio", subtype="wav", filename="m.wav")
    return message


async def test_unknown_stored_scenario_is_refused_naming_the_ones_there(gateway: Gateway, sink: Sink) -> None:
    reply = await submit(gateway.smtp_port, named("voice-then-konnect"))
    assert (reply.code, reply.text) == (550, "5.6.0 field 'scenario': there is no stored scenario named "
                                             "'voice-then-konnect' (stored: fax-then-confirm, fig42, fig43, "
                                             "voice-then-connect)")
    assert await gateway.store.list_messages() == [] and placed_calls(gateway) == []


async def test_stored_scenario_must_fit_the_mails_parts(gateway: Gateway) -> None:
    reply = await submit(gateway.smtp_port, named("voice-then-connect"))
    assert (reply.code, reply.text) == (550, "5.6.0 field 'scenario': stored scenario 'voice-then-connect': "
                                             "5:5: play 'voice': the mail has no voice part")
    # A voice part that is no sound is refused naming the part; a real one makes the request fit.
    reply = await submit(gateway.smtp_port, named("voice-then-connect", voice=True))
    assert (reply.code, reply.text) == (550, "5.6.1 part 2 (m.wav): not a readable WAV file: Error in WAV file. "
                                             "No 'data' chunk marker.")
    assert await gateway.store.list_messages() == []
    reply = await submit(gateway.smtp_port, named("voice-then-connect", voice=True, sound=SAMPLE_VOICE))
    assert reply.code == 250, reply


def test_inline_scenario_problems_point_into_the_yaml_part() -> None:
    from .test_request import yaml_request
    request = yaml_request("to: '2002'\nscenario:\n  steps:\n    - wait: 1s\n    - play: voice\n")
    assert parse_scenario(request.scenario_inline).steps[1].where == Where(5, 7)


async def test_edits_are_reloaded_and_a_bad_edit_keeps_the_previous_version(
        edited: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    folder = edited.config.scenarios.dir
    assert edited.scenarios.names() == ["fig42"]
    reply = await submit(edited.smtp_port, named("memo"))
    assert reply.text.startswith("5.6.0 field 'scenario': there is no stored scenario named 'memo' (stored: fig42)")

    good = "name: memo\nsteps:\n  - play: voice\n  - connect\n"
    change = await next_change(edited, "memo", lambda: (folder / "memo.yaml").write_text(good))
    assert change.outcome == "loaded" and edited.scenarios.names() == ["fig42", "memo"]
    reply = await submit(edited.smtp_port, named("memo"))  # now known: its own check runs
    assert reply.text == "5.6.0 field 'scenario': stored scenario 'memo': 3:5: play 'voice': the mail has no voice part"

    caplog.set_level(logging.ERROR, logger="mailgw.scenario")
    broken = "name: memo\nsteps:\n  - play: voice\n  - wait: forever\n  - connect\n"
    change = await next_change(edited, "memo", lambda: (folder / "memo.yaml").write_text(broken))
    assert change.outcome == "refused"
    assert f"{folder / 'memo.yaml'}:4:11: 'wait': 'forever' is not a duration" in caplog.text
    assert "the previous version stays in force" in caplog.text
    assert [s.kind for s in edited.scenarios.get("memo").steps] == ["play", "connect"]  # the previous one
    reply = await submit(edited.smtp_port, named("memo"))
    assert reply.text.endswith("3:5: play 'voice': the mail has no voice part")

    change = await next_change(edited, "memo", lambda: os.remove(folder / "memo.yaml"))
    assert change.outcome == "removed" and edited.scenarios.names() == ["fig42"]
