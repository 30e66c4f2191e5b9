"""A question by phone (``AmiPbx.ask``: Originate ``Application: Read``) against the simulator over
real TCP: the key each phone presses (phone book ``digit`` and the ``SimPhone`` action), a
question nobody answers, a phone that is busy, and the events on the wire (DTMFBegin/DTMFEnd,
VarSet of the variable, then READSTATUS, as Asterisk's app_read sets them)."""

from __future__ import annotations

import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mailgw.pbx.driver import AskState, check_prompt, decide_ask
from mailgw.pbx.phones import PhoneBookError, parse_phone_book
from mailgw.pbx.port import CallOutcome
from mailgw.pbx.simulator import AmiSimulator

from .pbx_helpers import RawAmi, phone_book

CALLER = '"mailgw" <100>'


def book() -> Any:
    return phone_book({
        "2001": {"behaviour": "answer", "answer_after": 0.5, "digit": "1"},
        "2002": {"behaviour": "answer", "digit": 2, "digit_after": 2},
        "2003": {"behaviour": "busy"},
        "2004": {"behaviour": "answer"},            # presses nothing
        "2005": {"behaviour": "no-answer"},
    })


def prompt(folder: Path, name: str = "connect-prompt", seconds: float = 1.0) -> str:
    with wave.open(str(folder / f"{name}.wav"), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(b"\0\0" * int(8000 * seconds))
    return str(folder / name)


async def test_phone_presses_its_key_after_hearing_the_prompt(make_sim: Callable[..., Any],
                                                               make_pbx: Callable[..., Any], tmp_path: Path) -> None:
    sim: AmiSimulator = await make_sim(book(), media_dirs=[tmp_path])
    pbx = await make_pbx(sim)
    sound = prompt(tmp_path)
    yes = await pbx.ask("q-1", "2001", sound, timeout=10, ring_timeout=20, caller_id=CALLER)
    no = await pbx.ask("q-2", "2002", sound, timeout=10, ring_timeout=20, caller_id=CALLER)
    assert (yes.outcome, yes.digit) == (CallOutcome.ANSWERED, "1") and yes.answered_at is not None
    assert (no.outcome, no.digit) == (CallOutcome.ANSWERED, "2")
    heard = [(r.kind, r.number, r.seconds) for r in sim.media_log]
    assert ("heard", "2001", 1.0) in heard and ("heard", "2002", 1.0) in heard
    record = sim.call("q-1")
    assert record is not None and record.application == "Read" and record.digits == "1"
    assert record.data == f"MAILGW_ANSWER,{sound},1,,1,10"


async def test_nobody_presses_a_key_the_question_times_out(make_sim: Callable[..., Any],
                                                           make_pbx: Callable[..., Any]) -> None:
    sim = await make_sim(book())
    pbx = await make_pbx(sim)
    result = await pbx.ask("q-3", "2004", "hello-world", timeout=3, ring_timeout=20, caller_id=CALLER)
    assert (result.outcome, result.digit) == (CallOutcome.ANSWERED, None)
    assert sim.call("q-3").digits == ""  # type: ignore[union-attr]


async def test_key_pressed_too_late_counts_as_no_key(make_sim: Callable[..., Any], make_pbx: Callable[..., Any]) -> None:
    sim = await make_sim(book())
    pbx = await make_pbx(sim)
    result = await pbx.ask("q-4", "2002", "hello-world", timeout=1, ring_timeout=20, caller_id=CALLER)
    assert result.outcome is CallOutcome.ANSWERED and result.digit is None


@pytest.mark.parametrize("number, outcome", [("2003", CallOutcome.BUSY), ("2005", CallOutcome.NO_ANSWER)])
async def test_a_phone_that_does_not_answer_gives_the_call_outcome(
        make_sim: Callable[..., Any], make_pbx: Callable[..., Any], number: str, outcome: CallOutcome) -> None:
    sim = await make_sim(book())
    pbx = await make_pbx(sim)
    result = await pbx.ask(f"q-{number}", number, "hello-world", timeout=5, ring_timeout=2, caller_id=CALLER)
    assert result.outcome is outcome and result.digit is None and result.answered_at is None


async def test_simphone_sets_the_key_a_phone_presses(make_sim: Callable[..., Any], make_pbx: Callable[..., Any]) -> None:
    sim = await make_sim(book())
    raw = await RawAmi.open(sim.port)
    try:
        await raw.login()
        raw.send(("Action", "SimPhone"), ("ActionID", "p1"), ("Phone", "2004"), ("Behaviour", "answer"),
                 ("Digit", "2"))
        reply, _ = await raw.until(lambda m: m.get("ActionID") == "p1")
        assert reply.get("Response") == "Success"
        raw.send(("Action", "SimPhone"), ("ActionID", "p2"), ("Phone", "2004"), ("Behaviour", "answer"),
                 ("Digit", "12"))
        bad, _ = await raw.until(lambda m: m.get("ActionID") == "p2")
        assert bad.get("Response") == "Error" and "DTMF" in (bad.get("Message") or "")
    finally:
        raw.close()
    pbx = await make_pbx(sim)
    result = await pbx.ask("q-5", "2004", "hello-world", timeout=5, ring_timeout=20, caller_id=CALLER)
    assert result.digit == "2"
    sim.set_phone("2004", "answer", digit="")
    again = await pbx.ask("q-6", "2004", "hello-world", timeout=1, ring_timeout=20, caller_id=CALLER)
    assert again.digit is None


async def test_wire_events_follow_app_read(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(book())
    raw = await RawAmi.open(sim.port)
    try:
        await raw.login()
        raw.send(("Action", "Originate"), ("ActionID", "o1"), ("Channel", "Local/2001@mailgw-dial"),
                 ("Application", "Read"), ("Data", "ANSWER,hello-world,1,,1,5"), ("Async", "true"),
                 ("ChannelId", "wire-1"), ("OtherChannelId", "wire-1-2"), ("Timeout", "20000"))
        last, seen = await raw.until(lambda m: m.event == "VarSet" and m.get("Variable") == "READSTATUS")
    finally:
        raw.close()
    names = [m.event for m in seen if m.get("Uniqueid") == "wire-1"]
    assert names.index("DTMFBegin") < names.index("DTMFEnd") < names.index("VarSet")
    var = next(m for m in seen if m.event == "VarSet" and m.get("Variable") == "ANSWER")
    assert var.get("Value") == "1" and var.get("Channel", "").endswith(";1")
    dtmf = next(m for m in seen if m.event == "DTMFEnd")
    assert dtmf.get("Digit") == "1" and dtmf.get("Direction") == "Received"
    assert last.get("Value") == "OK" and last.get("Uniqueid") == "wire-1"


def test_decide_ask_waits_for_the_cause_of_a_failed_ring() -> None:
    from datetime import UTC, datetime

    state = AskState("c", datetime.now(UTC), originate_ok=False, originate_reason=5)
    assert decide_ask(state, grace_over=False) is None
    assert decide_ask(state, grace_over=True) == (CallOutcome.BUSY, None, None)
    state.cause = 20
    assert decide_ask(state, grace_over=False) == (CallOutcome.UNREACHABLE, None, 20)
    answered = AskState("c", datetime.now(UTC), originate_ok=True, digits="9", read_status="OK")
    assert decide_ask(answered, grace_over=False) == (CallOutcome.ANSWERED, "9", None)
    answered.read_status = "HANGUP"
    assert decide_ask(answered, grace_over=False) == (CallOutcome.ANSWERED, None, None)


@pytest.mark.parametrize("bad", ["a,b", "x|y", "../etc/passwd", "with space", "", "pro(mpt)"])
def test_prompts_that_could_inject_read_arguments_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        check_prompt(bad)
    assert check_prompt("/var/spool/mailgw/media/req-1-s2") == "/var/spool/mailgw/media/req-1-s2"


def test_phone_book_digit_is_one_dtmf_key() -> None:
    assert parse_phone_book({"phones": {"2001": {"digit": "#"}}}).phones["2001"].digit == "#"
    with pytest.raises(PhoneBookError, match="phones.2001.digit"):
        parse_phone_book({"phones": {"2001": {"digit": "12"}}})


def test_phone_command_sets_the_key() -> None:
    import argparse

    from mailgw.pbx.phone_cli import build_action

    args = argparse.Namespace(words=["2004", "answer"], answer_after=None, talk_time=None, digit="2")
    assert build_action(args) == ("SimPhone", {"Phone": "2004", "Behaviour": "answer", "Digit": "2"})
