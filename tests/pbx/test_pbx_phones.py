"""The simulator's phone model and phone book: plain data, no sockets."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from mailgw.config import PbxConfig, SimulatorConfig, load_config
from mailgw.pbx.phones import (
    Behaviour,
    CallAttempt,
    DeviceState,
    Phone,
    PhoneBookError,
    PhoneSpec,
    attempt_for,
    load_phone_book,
    parse_phone_book,
)
from mailgw.pbx.simulator import AmiSimulator
from mailgw.resources import shipped


def test_the_demo_phone_book_is_exactly_the_documented_one() -> None:
    book = load_phone_book(shipped("pbx", "phones.yaml"))
    assert book.phones == {
        "2000": PhoneSpec(Behaviour.ANSWER, 1.0, 20.0),
        "2001": PhoneSpec(Behaviour.ANSWER, 2.0, 20.0, digit="1"),  # presses 1 (yes) when asked
        "2002": PhoneSpec(Behaviour.ANSWER, 1.0, 20.0),
        "2003": PhoneSpec(Behaviour.BUSY, 0.0, 20.0),
        "2004": PhoneSpec(Behaviour.NO_ANSWER, 0.0, 20.0),
        "2005": PhoneSpec(Behaviour.UNREACHABLE, 0.0, 20.0),
        "2009": PhoneSpec(Behaviour.ANSWER, 1.0, 20.0, fax=True),
    }
    assert book.default == PhoneSpec(Behaviour.ANSWER, 3.0, 20.0)
    assert book.lookup("0312345678") == book.default
    assert load_config(None).pbx.simulator.phones == shipped("pbx", "phones.yaml")


def test_entries_shorthand_durations_and_no_default() -> None:
    book = parse_phone_book({"talk_time": "1m", "phones": {2000: "dnd", "2001": {"answer_after": "1.5s",
                                                                                  "talk_time": 5}}})
    assert book.phones["2000"] == PhoneSpec(Behaviour.DND, 0.0, 60.0)
    assert book.phones["2001"] == PhoneSpec(Behaviour.ANSWER, 1.5, 5.0)
    assert book.lookup("0312345678") is None  # unallocated


@pytest.mark.parametrize("raw, message", [
    ({"phones": {"2000": {"behaviour": "sleepy"}}}, "phones.2000: 'sleepy' is not a behaviour"),
    ({"phones": {"2000": {"answer_afer": 1}}}, "phones.2000.answer_afer: unknown key"),
    ({"phones": {"20x0": "answer"}}, "phones.20x0: a number may hold only digits"),
    ({"default": {"answer_after": -1}}, "default.answer_after: -1 is not a duration"),
    ({"phone": {}}, "phone: unknown key"),
    ([], "the top level must be a mapping"),
])
def test_phone_book_errors_name_the_entry(raw: object, message: str) -> None:
    with pytest.raises(PhoneBookError, match=message):
        parse_phone_book(raw)


def test_unreadable_phone_book(tmp_path: Path) -> None:
    with pytest.raises(PhoneBookError, match="no-such.yaml"):
        load_phone_book(tmp_path / "no-such.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("phones: [", encoding="utf-8")
    with pytest.raises(PhoneBookError, match="not valid YAML"):
        load_phone_book(bad)


@pytest.mark.parametrize("behaviour, free, attempt", [
    (Behaviour.ANSWER, True, CallAttempt.RING_THEN_ANSWER),
    (Behaviour.ANSWER, False, CallAttempt.BUSY),  # a single line: ringing or talking = busy
    (Behaviour.NO_ANSWER, True, CallAttempt.RING_FOREVER),
    (Behaviour.BUSY, True, CallAttempt.BUSY),
    (Behaviour.DND, True, CallAttempt.BUSY),
    (Behaviour.UNREACHABLE, False, CallAttempt.UNREACHABLE),
    (Behaviour.CONGESTION, True, CallAttempt.CONGESTION),
])
def test_what_a_call_attempt_meets(behaviour: Behaviour, free: bool, attempt: CallAttempt) -> None:
    assert attempt_for(PhoneSpec(behaviour), line_free=free) is attempt
    assert attempt_for(None, line_free=True) is CallAttempt.UNALLOCATED


def test_device_state_follows_activity_and_behaviour() -> None:
    phone = Phone("2000", PhoneSpec(Behaviour.ANSWER), hinted=True)
    assert phone.device_state is DeviceState.NOT_INUSE and phone.device == "PJSIP/2000"
    phone.ringing = 1
    assert phone.device_state is DeviceState.RINGING
    phone.ringing, phone.talking = 0, 1
    assert phone.device_state is DeviceState.INUSE
    phone.talking = 0
    for behaviour, state in [(Behaviour.BUSY, DeviceState.INUSE), (Behaviour.DND, DeviceState.BUSY),
                             (Behaviour.UNREACHABLE, DeviceState.UNAVAILABLE)]:
        phone.spec = PhoneSpec(behaviour)
        assert phone.device_state is state


async def test_simulator_from_gateway_config(tmp_path: Path) -> None:
    book = tmp_path / "phones.yaml"
    book.write_text('phones: {"7000": busy}\n', encoding="utf-8")
    config = replace(PbxConfig(), dial_context="d", connect_context="c",
                     simulator=SimulatorConfig(phones=book, time_scale=0.5))
    sim = AmiSimulator.from_config(config)
    assert (sim.dial_context, sim.connect_context, sim.time_scale) == ("d", "c", 0.5)
    assert sim.book.phones["7000"].behaviour is Behaviour.BUSY and sim.book.default is None
    assert sim.username == config.ami.username
    port = await sim.start("127.0.0.1", 0)
    try:
        assert port == sim.port and port > 0
    finally:
        await sim.stop()
