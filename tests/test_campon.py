"""Camp-on decisions without sockets, the reply parser, and line-state watching over real AMI."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from mailgw.campon import (PairView, check_limits, is_permanent, may_cancel, next_attempt_after, queue_key,
                           retry_delay, should_camp, window)
from mailgw.config import CamponConfig, load_config
from mailgw.directory import load_directory
from mailgw.pbx.driver import AmiPbx
from mailgw.pbx.port import CallOutcome, ConnectResult, LineState, Party, line_state_of_device, line_state_of_status
from mailgw.pbx.simulator import AmiSimulator
from mailgw.replies import first_word, parse_reply
from mailgw.request import Action
from mailgw.resources import shipped
from mailgw.routing import RouteKind, route_recipient
from mailgw.status import Refused

CFG = CamponConfig(retry_busy=180, retry_no_answer=300, retry_other=120, max_per_caller=2, max_per_target=2)
NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def result(outcome: CallOutcome, cause: int | None = None) -> ConnectResult:
    return ConnectResult("c-1", outcome, Party.TO, cause, NOW, NOW, None, NOW)


@pytest.mark.parametrize(("outcome", "cause", "permanent"), [
    (CallOutcome.BUSY, 17, False), (CallOutcome.NO_ANSWER, 19, False), (CallOutcome.UNREACHABLE, 20, False),
    (CallOutcome.CONGESTION, 34, False), (CallOutcome.FAILED, None, False),
    (CallOutcome.INVALID, 1, True), (CallOutcome.INVALID, 28, True), (CallOutcome.REJECTED, 21, True),
    (CallOutcome.FAILED, 21, True),  # the cause decides even when the summary is vague
])
def test_permanent_causes_end_a_camp_on(outcome: CallOutcome, cause: int | None, permanent: bool) -> None:
    assert is_permanent(outcome, cause) is permanent
    assert should_camp(result(outcome, cause)) is (not permanent)
    assert not should_camp(result(CallOutcome.ANSWERED))


def test_next_attempt_per_cause_and_mode() -> None:
    assert retry_delay("busy", CFG) == 180 and retry_delay("no-answer", CFG) == 300
    assert retry_delay("congestion", CFG) == 120 and retry_delay("unreachable", CFG) == 120
    assert next_attempt_after("busy", "retry", 1000.0, CFG) == 1180.0
    assert next_attempt_after("busy", "watch", 1000.0, CFG) == 1000.0  # the idle event is the trigger
    assert next_attempt_after("no-answer", "watch", 1000.0, CFG) == 1300.0  # nobody picks up: wait anyway


def test_window_starts_at_the_time_specification() -> None:
    assert window(NOW, None, 600) == (NOW, NOW + timedelta(minutes=10))
    later = NOW + timedelta(hours=1)
    assert window(NOW, later, 600) == (later, later + timedelta(minutes=10))
    assert window(NOW, NOW - timedelta(seconds=30), 60)[0] == NOW


def test_express_first_then_first_come() -> None:
    keys = sorted([(queue_key("normal", 1), "a"), (queue_key("normal", 2), "b"), (queue_key("express", 3), "c")])
    assert [name for _, name in keys] == ["c", "a", "b"]


def test_limits_and_duplicates_are_refused_naming_the_rule() -> None:
    pending = [PairView("r1", "2000", "2003"), PairView("r2", "2000", "2004"), PairView("r3", "2001", "2005")]
    with pytest.raises(Refused, match="already pending as request r1") as dup:
        check_limits(pending, "2000", "2003", CFG)
    assert (dup.value.reply.code, dup.value.reply.status) == (550, "5.7.1")
    with pytest.raises(Refused, match=r"campon.max_per_caller = 2"):
        check_limits(pending, "2000", "2006", CFG)
    with pytest.raises(Refused, match=r"campon.max_per_target = 2"):
        check_limits(pending + [PairView("r4", "2002", "2005")], "2009", "2005", CFG)
    check_limits(pending, "2001", "2003", CFG)  # fine
    check_limits(pending, "2000", "2003", CFG, ignore="r1")  # itself does not count


def test_only_the_sender_or_an_admin_may_cancel() -> None:
    cfg = replace(CFG, admins=("boss@a.example",))
    assert may_cancel("Alice@A.EXAMPLE", "alice@a.example", cfg)
    assert may_cancel("boss@a.example", "alice@a.example", cfg)
    assert not may_cancel("bob@a.example", "alice@a.example", cfg)
    assert not may_cancel("", "alice@a.example", cfg)


def test_line_states_from_both_event_kinds() -> None:
    assert [line_state_of_status(s) for s in (-1, 0, 1, 2, 4, 8, 9, 16)] == [
        LineState.UNKNOWN, LineState.IDLE, LineState.IN_USE, LineState.BUSY, LineState.UNAVAILABLE,
        LineState.RINGING, LineState.IN_USE, LineState.IN_USE]
    assert line_state_of_device("NOT_INUSE") is LineState.IDLE and line_state_of_device("INVALID") is LineState.UNAVAILABLE


# --- replies ---------------------------------------------------------------------------------------

CONFIG = load_config(None)
DIRECTORY = load_directory(CONFIG.directory)


def reply(body: str, *, sender: str = "alice@a.example", extra: str = "", subject: str = "Re: Camping [r-1]") -> bytes:
    return (f"From: {sender}\r\nTo: mailgw@a.example\r\nSubject: {subject}\r\nMessage-ID: <x@y>\r\n{extra}"
            f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}").encode()


def parse(raw: bytes, mail_from: str = "alice@a.example", known: dict[str, str] | None = None):
    return parse_reply(raw, mail_from=mail_from, rcpt_to="mailgw@a.example", config=CONFIG, directory=DIRECTORY,
                       lookup=lambda ids: next((known[i] for i in ids if i in (known or {})), None))


def test_a_reply_saying_cancel_is_a_cancel_request() -> None:
    request = parse(reply("Cancel.\r\n\r\n> On Monday mailgw wrote:\r\n", extra="In-Reply-To: <n1@a.example>\r\n"),
                    known={"<n1@a.example>": "r-2"})
    assert request is not None and request.action is Action.CANCEL
    assert (request.request_ref, request.sender) == ("r-2", "alice@a.example")  # the header wins over the subject
    assert parse(reply("取消\r\n")).request_ref == "r-1"  # found through the subject's [id]
    assert first_word("> quoted\n\n  ＣＡＮＣＥＬ please") == "cancel"


def test_replies_that_are_not_understood_are_refused_saying_what_to_write() -> None:
    with pytest.raises(Refused, match="write only the word 'cancel'"):
        parse(reply("thanks, talk later\r\n"))
    with pytest.raises(Refused, match="only reads replies"):
        parse(reply("cancel\r\n", subject="hello"))


def test_bounces_and_auto_replies_are_not_replies() -> None:
    assert parse(reply("cancel\r\n"), mail_from="") is None
    assert parse(reply("cancel\r\n", extra="Auto-Submitted: auto-replied\r\n")) is None


def test_the_gateway_address_is_routed_as_such() -> None:
    assert route_recipient("MailGW@a.example", CONFIG, DIRECTORY).kind is RouteKind.GATEWAY


# --- line state over AMI (driver against the simulator) --------------------------------------------

async def test_line_state_and_one_listener_for_every_watched_number() -> None:
    sim = AmiSimulator(phones=shipped("pbx", "phones.yaml"), time_scale=0.02)
    port = await sim.start("127.0.0.1", 0)
    config = load_config(None).pbx
    pbx = AmiPbx(replace(config, ami=replace(config.ami, port=port)))
    await pbx.start()
    try:
        assert await pbx.line_state("2003") is LineState.IN_USE  # busy in the phone book
        assert await pbx.line_state("2000") is LineState.IDLE
        assert await pbx.line_state("0312345678") is LineState.UNKNOWN  # no hint
        seen: asyncio.Queue[tuple[str, LineState]] = asyncio.Queue()
        remove = [pbx.watch_line(n, lambda number, state: seen.put_nowait((number, state))) for n in ("2003", "2005")]
        sim.set_phone("2003", "answer")
        sim.set_phone("2004", "busy")  # not watched: not reported
        sim.set_phone("2005", "answer")
        got = [await asyncio.wait_for(seen.get(), 5) for _ in range(2)]
        assert got == [("2003", LineState.IDLE), ("2005", LineState.IDLE)]
        await pbx.client.action("Ping")  # its response follows every event sent before it
        assert seen.empty()  # each change reported once, though ExtensionStatus and DeviceStateChange both came
        for r in remove:
            r()
        sim.set_phone("2003", "busy")
        assert await pbx.line_state("2003") is LineState.IN_USE and seen.empty()
    finally:
        await pbx.stop()
        await sim.stop()
