"""Absence decisions and the incoming-call tracker as plain functions, and ``mailgw absence``."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailgw.absence import Absence, EndedCall, Reason, absent_now, missed_call_notice, subject_name
from mailgw.absence_cli import parse_until
from mailgw.cli import main
from mailgw.pbx.ami import Message
from mailgw.pbx.incoming import endpoint, track
from mailgw.pbx.port import IncomingCall
from mailgw.store import Store

NOW = datetime(2026, 12, 3, 15, 4, tzinfo=UTC)
PEOPLE = {"2000": "tanaka@b.example", "2001": "bob@b.example"}


def decide(call: EndedCall, *, owner: str | None = "tanaka@b.example", absent: frozenset[str] = frozenset(),
           notify_unanswered: bool = False, representative: str | None = "desk@b.example"):  # noqa: ANN202
    return missed_call_notice(call, owner=owner, owner_language="ja", rung_people=PEOPLE, absent=absent,
                              representative=representative, representative_language="en",
                              notify_unanswered=notify_unanswered)


def test_answered_calls_never_give_a_notice() -> None:
    call = EndedCall("c1", "+81312345678", ("2000", "2001"), answered_by="2001")
    assert decide(call, absent=frozenset(PEOPLE.values()), notify_unanswered=True) is None


def test_absent_owner_of_a_known_caller_is_told_in_their_language() -> None:
    notice = decide(EndedCall("c1", "+81312345678", ("2001",), None), absent=frozenset({"tanaka@b.example"}))
    assert notice is not None and (notice.recipient, notice.language, notice.reason) == (
        "tanaka@b.example", "ja", Reason.ABSENT)


def test_unknown_or_withheld_callers_go_to_the_representative_when_a_rung_person_is_absent() -> None:
    for key in ("+81455556666", None):
        notice = decide(EndedCall("c1", key, ("2000",), None), owner=None, absent=frozenset({"tanaka@b.example"}))
        assert notice is not None and (notice.recipient, notice.language) == ("desk@b.example", "en")
    assert decide(EndedCall("c1", None, ("2001",), None), owner=None, absent=frozenset({"tanaka@b.example"})) is None


def test_nobody_absent_gives_a_notice_only_with_notify_unanswered() -> None:
    call = EndedCall("c1", "+81312345678", ("2000",), None)
    assert decide(call) is None
    notice = decide(call, notify_unanswered=True)
    assert notice is not None and notice.reason is Reason.UNANSWERED
    assert decide(call, owner=None, representative=None, notify_unanswered=True) is None


def test_absence_is_active_between_since_and_until() -> None:
    absences = [Absence("a@x", NOW - timedelta(hours=1)), Absence("b@x", NOW - timedelta(hours=2), NOW),
                Absence("c@x", NOW + timedelta(hours=1))]
    assert absent_now(absences, NOW) == {"a@x"}


def test_subject_names_fit_a_phone_screen() -> None:
    assert subject_name(contact="Yamada Taro", customer="XX Corp", number="03", withheld=False,
                        language="en") == "Yamada Taro (XX Corp)"
    assert subject_name(contact="", customer="", number="03-1234-5678", withheld=False, language="en") == "03-1234-5678"
    assert subject_name(contact="x", customer="y", number="", withheld=True, language="ja") == "番号非通知"


def event(name: str, **fields: str) -> Message:
    return Message([("Event", name), *fields.items()])


def test_tracker_follows_a_trunk_call_and_ignores_other_channels() -> None:
    calls: dict[str, IncomingCall] = {}
    ctx = "from-trunk"
    assert track(calls, event("Newchannel", Channel="Local/2000@mailgw-dial-00000001;1", Context="mailgw-dial",
                              Uniqueid="9.1", Linkedid="9.1", CallerIDNum="2000"), ctx, NOW) is None
    started = track(calls, event("Newchannel", Channel="PJSIP/trunk-00000001", Context=ctx, Exten="0312340000",
                                 Uniqueid="1.1", Linkedid="1.1", CallerIDNum="0312345678",
                                 CallerIDName="<unknown>"), ctx, NOW)
    assert started is not None and started.caller == "0312345678" and started.caller_name is None
    hidden = track(calls, event("NewCallerid", Uniqueid="1.1", CallerIDNum="0312345678",
                                **{"CID-CallingPres": "32 (Presentation Prohibited, Not Screened)"}), ctx, NOW)
    assert hidden is not None and hidden.caller is None
    for ext in ("2000", "2001"):
        track(calls, event("DialBegin", Uniqueid="1.1", DestChannel=f"PJSIP/{ext}-0000000{ext[-1]}",
                           DestUniqueid=f"1.{ext}", DialString=ext), ctx, NOW)
    assert track(calls, event("DialEnd", Uniqueid="1.1", DestChannel="PJSIP/2000-00000000",
                              DialStatus="CANCEL"), ctx, NOW) is None
    answered = track(calls, event("DialEnd", Uniqueid="1.1", DestChannel="PJSIP/2001-00000001",
                                  DialStatus="ANSWER"), ctx, NOW)
    assert answered is not None and answered.rung == ("2000", "2001") and answered.answered_by == "2001"
    assert track(calls, event("Hangup", Uniqueid="1.2000", Channel="PJSIP/2000-00000000", Cause="26"), ctx, NOW) is None
    ended = track(calls, event("Hangup", Uniqueid="1.1", Channel="PJSIP/trunk-00000001", Cause="16"), ctx, NOW)
    assert ended is not None and ended.ended_at == NOW and ended.cause == 16 and calls == {}


@pytest.mark.parametrize("channel, name", [("PJSIP/2000-0000000a", "2000"), ("Local/2001@ami-test-0000001f;1", "2001"),
                                           ("SIP/alice-00000001", "alice"), ("PJSIP/2002", "2002")])
def test_endpoint_of_a_channel_name(channel: str, name: str) -> None:
    assert endpoint(channel) == name


def test_until_takes_durations_and_times() -> None:
    assert parse_until("2h", NOW) == NOW + timedelta(hours=2)
    evening = parse_until("18:00", NOW)  # the next 18:00 local time, not 18 minutes
    assert evening.astimezone().strftime("%H:%M") == "18:00" and NOW < evening <= NOW + timedelta(days=1)
    assert parse_until("2026-12-24T18:00+09:00", NOW) == datetime(2026, 12, 24, 9, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_until("someday", NOW)


async def test_absence_command_sets_and_clears_by_address_or_local_part(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data", str(tmp_path / "var")]
    assert await asyncio.to_thread(main, ["absence", "set", "yamada", "--until", "2h", "--note", "on leave", *data]) == 0
    assert "yamada@a.example is absent until " in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["absence", *data]) == 0
    assert "yamada@a.example" in capsys.readouterr().out
    store = Store(tmp_path / "var" / "mailgw.sqlite3")
    await store.open()
    try:
        [(address, _, until, note, source)] = await store.absences()
        assert (address, note, source) == ("yamada@a.example", "on leave", "cli") and until is not None
    finally:
        await store.close()
    assert await asyncio.to_thread(main, ["absence", "clear", "Yamada@A.example", *data]) == 0
    assert "yamada@a.example is back" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["absence", *data]) == 0
    assert "nobody is absent" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["absence", "set", "nobody-here", *data]) == 65
    assert "not a mail address or a person in the directory" in capsys.readouterr().err


def test_sending_plan_batches_missed_calls_of_people_with_a_digest() -> None:
    from mailgw.absence import DigestPreference, Pending, plan_sending

    def p(n: int, recipient: str, kind: str = "missed", age: float = 0.0) -> Pending:
        return Pending((f"c{n}", kind), recipient, kind, NOW - timedelta(seconds=age))

    digests = {"t@x": DigestPreference(calls=3, every=600.0)}
    batches, next_due = plan_sending([p(1, "t@x", age=60), p(2, "d@x"), p(3, "t@x", kind="memo")], digests, NOW)
    assert [(b.keys, b.digest) for b in batches] == [((("c2", "missed"),), False), ((("c3", "memo"),), False)]
    assert next_due == NOW + timedelta(seconds=540)
    batches, _ = plan_sending([p(1, "t@x"), p(2, "t@x"), p(3, "t@x")], digests, NOW)  # by count
    assert [(len(b.keys), b.digest) for b in batches] == [(3, True)]
    batches, _ = plan_sending([p(1, "t@x", age=601)], digests, NOW)  # by period
    assert [(len(b.keys), b.digest) for b in batches] == [(1, True)]


def test_digest_preferences_in_the_config(tmp_path: Path) -> None:
    from mailgw.config import ConfigError, load_config

    path = tmp_path / "gateway.yaml"
    path.write_text("absence: {digests: {Tanaka@B.example: {calls: 5, every: 1h}, bob@b.example: {every: 30m}}}\n")
    assert load_config(path).absence.digests == (("tanaka@b.example", 5, 3600.0), ("bob@b.example", None, 1800.0))
    path.write_text("absence: {digests: {bob@b.example: {hourly: true}}}\n")
    with pytest.raises(ConfigError, match="absence.digests.bob@b.example: give calls"):
        load_config(path)
