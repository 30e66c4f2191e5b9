"""The simulator on the wire, through a raw socket: it must answer like Asterisk 22 does in the
captures (banner, login, ActionID echo, errors, Originate sync/async, lists, event order)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

from mailgw.pbx.ami import Message
from mailgw.pbx.port import CallOutcome
from mailgw.pbx.simulator import AmiSimulator

from .pbx_helpers import CAPTURES, SCALE, SECRET, USER, WAIT, RawAmi, phone_book

DIAL, CONNECT = "mailgw-dial", "mailgw-connect"


def originate(raw: RawAmi, action_id: str, channel: str, *extra: tuple[str, str], is_async: bool = True) -> None:
    pairs = [("Action", "Originate"), ("ActionID", action_id), ("Channel", channel), *extra]
    if is_async:
        pairs.append(("Async", "true"))
    raw.send(*pairs)


# --- sessions -----------------------------------------------------------------------------------------


async def test_banner_then_login_then_fully_booted(sim: AmiSimulator) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    try:
        banner = await asyncio.wait_for(reader.readuntil(b"\r\n"), WAIT)
        assert banner == b"Asterisk Call Manager/11.0.0\r\n"
        writer.write(b"Action: Login\r\nActionID: l1\r\nUsername: mailgw\r\nSecret: mailgw-secret\r\n\r\n")
        reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert reply == b"Response: Success\r\nActionID: l1\r\nMessage: Authentication accepted\r\n\r\n"
        booted = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert booted.startswith(b"Event: FullyBooted\r\nPrivilege: system,all\r\n")
        assert b"Status: Fully Booted\r\n" in booted
        auth = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert auth.startswith(b"Event: SuccessfulAuth\r\nPrivilege: security,all\r\n")
    finally:
        writer.close()


async def test_login_failure_is_delayed_then_closed_and_seen_by_others(sim: AmiSimulator, raw: RawAmi) -> None:
    await raw.login()
    intruder = await RawAmi.open(sim.port)
    try:
        started = time.monotonic()
        intruder.send(("Action", "Login"), ("ActionID", "bad"), ("Username", USER), ("Secret", "wrong"))
        reply, _ = await intruder.response("bad")
        assert time.monotonic() - started >= 0.9 * SCALE  # Asterisk waits 1 s (here scaled)
        assert reply.lines() == ["Response: Error", "ActionID: bad", "Message: Authentication failed"]
        await intruder.wait_closed()
        assert intruder.eof
        seen = await raw.event("InvalidPassword")
        assert seen["AccountID"] == USER and seen["Service"] == "AMI"
    finally:
        intruder.close()


async def test_permission_denied_before_login_and_the_session_stays_open(raw: RawAmi) -> None:
    raw.send(("Action", "Ping"), ("ActionID", "p0"))
    reply, _ = await raw.response("p0")
    assert reply.lines() == ["Response: Error", "ActionID: p0", "Message: Permission denied"]
    raw.send(("Action", "Originate"), ("ActionID", "o0"), ("Channel", f"Local/2000@{DIAL}"))
    reply, _ = await raw.response("o0")
    assert reply["Message"] == "Permission denied"
    await raw.login()


async def test_md5_challenge_login(raw: RawAmi) -> None:
    raw.send(("Action", "Challenge"), ("ActionID", "c1"), ("AuthType", "MD5"))
    reply, _ = await raw.response("c1")
    challenge = reply["Challenge"]
    assert challenge.isdigit()
    key = hashlib.md5((challenge + SECRET).encode()).hexdigest()
    raw.send(("Action", "Login"), ("ActionID", "l2"), ("AuthType", "MD5"), ("Username", USER), ("Key", key))
    reply, _ = await raw.response("l2")
    assert reply["Message"] == "Authentication accepted"


async def test_action_id_is_echoed_second_and_left_out_when_absent(raw: RawAmi) -> None:
    await raw.login()
    raw.send(("Action", "Ping"), ("ActionID", "ping-1"))
    reply, _ = await raw.response()
    assert reply.keys() == ["Response", "ActionID", "Ping", "Timestamp"]
    assert reply["ActionID"] == "ping-1" and reply["Ping"] == "Pong"
    raw.send(("Action", "Ping"))
    reply, _ = await raw.response()
    assert reply.keys() == ["Response", "Ping", "Timestamp"]
    raw.send(("action", "ping"), ("actionid", "lower-case-1"))
    reply, _ = await raw.response()
    assert reply.items()[:2] == [("Response", "Success"), ("ActionID", "lower-case-1")]


async def test_unknown_and_missing_action(raw: RawAmi) -> None:
    await raw.login()
    raw.send(("Action", "NoSuchAction"), ("ActionID", "bogus-1"))
    reply, _ = await raw.response("bogus-1")
    assert reply.lines() == ["Response: Error", "ActionID: bogus-1", "Message: Invalid/unknown command: "
                             "NoSuchAction. Use Action: ListCommands to show available commands."]
    raw.send(("ActionID", "no-action-1"))
    reply, _ = await raw.response("no-action-1")
    assert reply.lines() == ["Response: Error", "ActionID: no-action-1", "Message: Missing action in request"]


async def test_logoff_says_goodbye_and_closes(raw: RawAmi) -> None:
    await raw.login()
    raw.send(("Action", "Logoff"), ("ActionID", "bye"))
    reply, _ = await raw.response("bye")
    assert reply.lines() == ["Response: Goodbye", "ActionID: bye", "Message: Thanks for all the fish."]
    await raw.wait_closed()
    assert raw.eof


async def test_events_off_at_login_and_by_action(sim: AmiSimulator, raw: RawAmi) -> None:
    """A session with events off gets none, while another session sees the call's events.

    The simulator writes an event to every session when it happens, so anything meant for the
    quiet session would be in its stream before the reply to a Ping sent afterwards."""
    await raw.login()
    quiet = await RawAmi.open(sim.port)
    muted = await RawAmi.open(sim.port)
    try:
        await quiet.login(events="off")
        await muted.login()
        muted.send(("Action", "Events"), ("ActionID", "ev"), ("EventMask", "off"))
        reply, _ = await muted.response("ev")
        assert reply.lines() == ["Response: Success", "ActionID: ev", "Events: Off"]
        originate(raw, "o1", f"Local/2003@{DIAL}", ("Context", CONNECT), ("Exten", "2000"))
        await raw.event("OriginateResponse", ActionID="o1")
        for session in (quiet, muted):
            session.send(("Action", "Ping"), ("ActionID", "after"))
            _, before = await session.response("after")
            assert [m for m in before if m.is_event] == []
    finally:
        quiet.close()
        muted.close()


async def test_several_sessions_receive_the_same_events(sim: AmiSimulator, raw: RawAmi) -> None:
    await raw.login()
    others = [await RawAmi.open(sim.port) for _ in range(2)]
    try:
        for other in others:
            await other.login()
        originate(raw, "shared", f"Local/2003@{DIAL}", ("Context", CONNECT), ("Exten", "2000"))
        seen = [await s.event("OriginateResponse", ActionID="shared") for s in (raw, *others)]
        assert all(m == seen[0] for m in seen)
        assert seen[0]["Reason"] == "5"
    finally:
        for other in others:
            other.close()


# --- Originate ---------------------------------------------------------------------------------------


async def test_async_originate_replies_at_once_then_reports_by_event(raw: RawAmi) -> None:
    await raw.login()
    originate(raw, "a1", f"Local/2000@{DIAL}", ("Context", "elsewhere"), ("Exten", "s"), ("Priority", "1"),
              ("CallerID", '"Mail GW" <100>'), ("ChannelId", "cid-1"), ("OtherChannelId", "cid-1-2"))
    reply, before = await raw.response("a1")
    assert reply.lines() == ["Response: Success", "ActionID: a1", "Message: Originate successfully queued"]
    assert [m.event for m in before if m.is_event and m.event == "Newchannel"] == []
    result = await raw.event("OriginateResponse", ActionID="a1")
    assert result.keys() == ["Event", "Privilege", "ActionID", "Response", "Channel", "Context", "Exten",
                             "Reason", "Uniqueid", "CallerIDNum", "CallerIDName"]
    assert result["Response"] == "Success" and result["Reason"] == "4"
    assert result["Uniqueid"] == "cid-1"
    assert result["Channel"].startswith(f"Local/2000@{DIAL}-") and result["Channel"].endswith(";1")
    assert (result["CallerIDNum"], result["CallerIDName"]) == ("100", "Mail GW")


async def test_sync_originate_holds_back_events_until_the_response(raw: RawAmi) -> None:
    await raw.login()
    originate(raw, "s1", f"Local/2001@{DIAL}", ("Context", "elsewhere"), ("Exten", "s"), is_async=False)
    reply, before = await raw.response("s1")
    assert reply.lines() == ["Response: Success", "ActionID: s1", "Message: Originate successfully queued"]
    assert [m for m in before if m.event in ("Newchannel", "DialBegin", "DialEnd")] == []
    held = [await raw.next() for _ in range(3)]
    assert [m.event for m in held] == ["Newchannel", "Newchannel", "LocalBridge"]
    await raw.event("DialEnd", DialStatus="ANSWER")


async def test_sync_originate_failure_says_originate_failed(raw: RawAmi) -> None:
    await raw.login()
    originate(raw, "s2", f"Local/2003@{DIAL}", ("Context", CONNECT), ("Exten", "2000"), is_async=False)
    reply, before = await raw.response("s2")
    assert reply.lines() == ["Response: Error", "ActionID: s2", "Message: Originate failed"]
    assert [m for m in before if m.is_event and m.event != "FullyBooted" and m.event != "SuccessfulAuth"] == []
    hangup = await raw.event("Hangup", Cause="17")
    assert hangup["Cause-txt"] == "User busy"
    raw.send(("Action", "Ping"), ("ActionID", "p"))
    _, rest = await raw.response("p")
    assert "OriginateResponse" not in [m.event for m in rest]


async def test_originate_validation_errors(raw: RawAmi) -> None:
    await raw.login()
    cases = [
        ("nochan", [("Context", "x"), ("Exten", "1")], "Channel not specified"),
        ("noslash", [("Channel", "Local2000"), ("Exten", "1")], "Invalid channel"),
        ("badprio", [("Channel", f"Local/2000@{DIAL}"), ("Exten", "1"), ("Priority", "abc")], "Invalid priority"),
    ]
    for action_id, fields, message in cases:
        raw.send(("Action", "Originate"), ("ActionID", action_id), *fields, ("Async", "true"))
        reply, _ = await raw.response(action_id)
        assert reply.lines() == ["Response: Error", f"ActionID: {action_id}", f"Message: {message}"]
    originate(raw, "badtimeout", f"Local/2000@{DIAL}", ("Context", "x"), ("Exten", "1"), ("Timeout", "-5"))
    reply, _ = await raw.response("badtimeout")
    assert reply["Response"] == "Success"  # 03i: a negative timeout is accepted


async def test_unknown_technology_fails_with_reason_0_and_no_channel_events(raw: RawAmi) -> None:
    await raw.login()
    originate(raw, "foo", "Foo/1234", ("Context", "x"), ("Exten", "1"))
    result, before = await raw.until(lambda m: m.event == "OriginateResponse")
    assert [m.event for m in before if m.is_event and m.event not in ("FullyBooted", "SuccessfulAuth")] == []
    assert (result["Response"], result["Channel"], result["Reason"], result["Uniqueid"]) == (
        "Failure", "Foo/1234", "0", "<unknown>")


async def test_local_channel_into_a_missing_extension(raw: RawAmi) -> None:
    await raw.login()
    originate(raw, "miss", "Local/9999@no-such-context", ("Context", "x"), ("Exten", "1"))
    result = await raw.event("OriginateResponse", ActionID="miss")
    assert (result["Response"], result["Reason"], result["Channel"]) == ("Failure", "0", "Local/9999@no-such-context")
    state = await raw.event("DeviceStateChange", Device="Local/9999@no-such-context")
    assert state["State"] == "INVALID"


async def test_application_playback(sim: AmiSimulator, raw: RawAmi) -> None:
    await raw.login()
    originate(raw, "play", f"Local/2000@{DIAL}", ("Application", "Playback"), ("Data", "hello-world"))
    result = await raw.event("OriginateResponse", ActionID="play")
    assert result.keys()[5:8] == ["Application", "Data", "Reason"]
    assert (result["Application"], result["Data"], result["Reason"]) == ("Playback", "hello-world", "4")
    status = await raw.event("VarSet", Variable="PLAYBACKSTATUS")
    assert status["Value"] == "SUCCESS"
    await raw.event("Hangup", Uniqueid=result["Uniqueid"])
    record = sim.call(result["Uniqueid"])
    assert record is not None and (record.application, record.data) == ("Playback", "hello-world")
    assert record.from_outcome is CallOutcome.ANSWERED


async def test_bridged_call_ends_after_the_talk_time(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(phone_book({"3000": {"answer_after": 0}, "3001": {"answer_after": 0.5}}, talk_time=2))
    raw = await RawAmi.open(sim.port)
    try:
        await raw.login()
        originate(raw, "c1", f"Local/3000@{DIAL}", ("Context", CONNECT), ("Exten", "3001"), ("ChannelId", "talk-1"))
        await raw.event("BridgeEnter", BridgeNumChannels="2")
        answered = sim.call("talk-1")
        assert answered is not None and answered.to_answered_at is not None and answered.ended_at is None
        names = []
        while "Hangup" not in names or names.count("Hangup") < 4:
            names.append((await raw.next()).event)
        assert [n for n in names if n.startswith("Bridge")] == ["BridgeLeave", "BridgeLeave", "BridgeDestroy"]
        record = sim.call("talk-1")
        assert record is not None and record.ended_at is not None
        assert record.ended_at - record.to_answered_at >= 2 * SCALE * 0.9
    finally:
        raw.close()


# --- Hangup, lists, device state -------------------------------------------------------------------


async def test_hangup_action_and_core_show_channels(raw: RawAmi) -> None:
    await raw.login()
    raw.send(("Action", "CoreShowChannels"), ("ActionID", "csc-empty"))
    reply, _ = await raw.response("csc-empty")
    assert reply.lines() == ["Response: Success", "ActionID: csc-empty", "EventList: start",
                             "Message: Channels will follow"]
    complete = await raw.next()
    assert complete.lines() == ["Event: CoreShowChannelsComplete", "ActionID: csc-empty",
                                "EventList: Complete", "ListItems: 0"]

    originate(raw, "up", f"Local/2000@{DIAL}", ("Context", "elsewhere"), ("Exten", "s"), ("ChannelId", "live-1"),
              ("OtherChannelId", "live-1-2"))
    result = await raw.event("OriginateResponse", ActionID="up")
    raw.send(("Action", "CoreShowChannels"), ("ActionID", "csc-live"))
    await raw.response("csc-live")
    items = []
    while True:
        msg = await raw.next()
        if msg.action_id != "csc-live":
            continue
        if msg.event == "CoreShowChannelsComplete":
            break
        items.append(msg)
    assert msg["ListItems"] == "2"
    assert [m.keys()[:3] for m in items] == [["Event", "ActionID", "Channel"]] * 2
    assert all("Privilege" not in m for m in items)
    assert {m["Uniqueid"] for m in items} == {"live-1", "live-1-2"}
    assert items[0].keys()[-4:] == ["Application", "ApplicationData", "Duration", "BridgeId"]

    raw.send(("Action", "Hangup"), ("ActionID", "hup-1"), ("Channel", result["Channel"]))
    reply, _ = await raw.response("hup-1")
    assert reply.lines() == ["Response: Success", "ActionID: hup-1", "Message: Channel Hungup"]
    hangup = await raw.event("Hangup", Uniqueid="live-1")
    assert hangup["Cause"] == "0"  # 06b: a Hangup action without Cause
    raw.send(("Action", "Hangup"), ("ActionID", "hup-bad"), ("Channel", "Local/nope-00000000;1"))
    reply, _ = await raw.response("hup-bad")
    assert reply.lines() == ["Response: Error", "ActionID: hup-bad", "Message: No such channel"]


async def test_extension_state_and_phone_state_changes(sim: AmiSimulator, raw: RawAmi) -> None:
    await raw.login()

    async def state(exten: str) -> Message:
        raw.send(("Action", "ExtensionState"), ("ActionID", f"es-{exten}"), ("Exten", exten), ("Context", DIAL))
        reply, _ = await raw.response(f"es-{exten}")
        return reply

    idle = await state("2000")
    assert idle.lines() == ["Response: Success", "ActionID: es-2000", "Message: Extension Status", "Exten: 2000",
                            f"Context: {DIAL}", "Hint: PJSIP/2000", "Status: 0", "StatusText: Idle"]
    assert ((await state("2003"))["Status"], (await state("2005"))["Status"]) == ("1", "4")
    unknown = await state("0312345678")
    assert (unknown["Response"], unknown["Status"], unknown["StatusText"], unknown["Hint"]) == (
        "Success", "-1", "Unknown", "")

    # Camp-on: the busy phone becomes free -> ExtensionStatus Idle and DeviceStateChange.
    raw.send(("Action", "SimPhone"), ("ActionID", "free"), ("Phone", "2003"), ("Behaviour", "answer"),
             ("AnswerAfter", "1"))
    reply, _ = await raw.response("free")
    assert reply["Response"] == "Success" and reply["StatusText"] == "Idle"
    status = await raw.event("ExtensionStatus", Exten="2003")
    assert status.lines()[2:] == ["Exten: 2003", f"Context: {DIAL}", "Hint: PJSIP/2003", "Status: 0",
                                  "StatusText: Idle"]
    change = await raw.event("DeviceStateChange", Device="PJSIP/2003")
    assert change["State"] == "NOT_INUSE"
    assert (await state("2003"))["Status"] == "0"

    raw.send(("Action", "SimPhone"), ("ActionID", "bad"), ("Phone", "2003"), ("Behaviour", "sleepy"))
    reply, _ = await raw.response("bad")
    assert reply["Response"] == "Error" and "sleepy" in reply["Message"]

    raw.send(("Action", "ExtensionStateList"), ("ActionID", "esl"))
    reply, _ = await raw.response("esl")
    assert reply["EventList"] == "start"
    items = []
    while (msg := await raw.next()).event != "ExtensionStateListComplete":
        if msg.action_id == "esl":
            items.append(msg)
    assert [m["Exten"] for m in items] == ["2000", "2001", "2002", "2003", "2004", "2005", "2009"]
    assert msg["ListItems"] == "7" and items[0].keys()[:2] == ["Event", "ActionID"]


async def test_ringing_phone_shows_ringing_then_in_use(sim: AmiSimulator, raw: RawAmi) -> None:
    await raw.login()
    originate(raw, "ring", f"Local/2001@{DIAL}", ("Context", "elsewhere"), ("Exten", "s"))
    states = []
    while len(states) < 3:
        msg = await raw.event("ExtensionStatus", Exten="2001")
        states.append(msg["StatusText"])
    assert states == ["Ringing", "InUse", "Idle"]


async def test_sim_calls_lists_the_call_log_over_ami(sim: AmiSimulator, raw: RawAmi) -> None:
    await raw.login()
    originate(raw, "log", f"Local/2000@{DIAL}", ("Context", CONNECT), ("Exten", "2003"), ("ChannelId", "log-1"),
              ("OtherChannelId", "log-1-2"))
    await raw.event("Hangup", Uniqueid="log-1")
    raw.send(("Action", "SimCalls"), ("ActionID", "calls"), ("CallId", "log-1"))
    await raw.response("calls")
    item = await raw.event("SimCall")
    assert item.action_id == "calls"
    assert (item["CallId"], item["From"], item["To"], item["Outcome"], item["FromOutcome"], item["ToOutcome"],
            item["ToCause"]) == ("log-1", "2000", "2003", "busy", "answered", "busy", "17")
    assert item["FromAnsweredAt"] and not item["ToAnsweredAt"] and item["EndedAt"]
    complete = await raw.next()
    assert (complete.event, complete["ListItems"]) == ("SimCallsComplete", "1")
    assert sim.call("log-1") is not None and sim.call("log-1").to_outcome is CallOutcome.BUSY


# --- event order compared with a real Asterisk ------------------------------------------------------

# Left out of the comparison: dial-plan noise the simulator does not emulate (Newexten, VarSet,
# NewCallerid, NewConnectedLine), and device-state events (DeviceStateChange, ExtensionStatus),
# whose number Asterisk varies and which the capture's set-up (no phones, no hints) lacks.
NOISE = {"Newexten", "VarSet", "NewCallerid", "NewConnectedLine", "DeviceStateChange", "ExtensionStatus",
         "FullyBooted", "SuccessfulAuth"}


def shape(messages: list[Message]) -> list[tuple[Any, ...]]:
    """Each event as (name, legs involved, key values, field names), with channel names reduced
    to roles: A1/A2 for the first Local pair seen, B1/B2 for the second."""
    roles: dict[str, str] = {}

    def role(channel: str | None) -> str | None:
        if not channel or ";" not in channel:
            return channel if channel is None else "requested"
        base, leg = channel.rsplit(";", 1)
        if base not in roles:
            roles[base] = "AB"[len(roles)]
        return roles[base] + leg

    result = []
    for msg in messages:
        if not msg.is_event or msg.event in NOISE:
            continue
        keys = tuple(k for k in msg.keys() if k != "ActionID")
        result.append((msg.event, role(msg.get("Channel")), role(msg.get("DestChannel")), msg.get("Cause"),
                       msg.get("DialStatus"), msg.get("Reason"), msg.get("ChannelStateDesc"), keys))
    return result


def captured(name: str) -> list[Message]:
    """The server's messages of a capture, after its Originate was answered."""
    lines = (CAPTURES / f"{name}.txt").read_text(encoding="utf-8").split("\n")
    messages, current, started = [], [], False
    for line in lines:
        if line.startswith(">>> Action: Originate"):
            started = True
        if not started:
            continue
        if line.startswith(">>> Action: Logoff"):
            break
        if line == "<<<":
            messages.append(Message([tuple(x.split(": ", 1)) for x in current]))  # type: ignore[misc]
            current = []
        elif line.startswith("<<< "):
            current.append(line[4:])
    return [m for m in messages if m.is_event]


async def run_and_collect(raw: RawAmi, channel: str, exten: str, until: Callable[[list[Message]], bool],
                          on_bridged: Callable[[Message], None] | None = None) -> list[Message]:
    originate(raw, "seq", channel, ("Context", CONNECT), ("Exten", exten), ("Priority", "1"),
              ("CallerID", '"Mail GW" <100>'), ("Timeout", "5000"))
    events: list[Message] = []
    originate_response: Message | None = None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not until(events):
        msg = await raw.next(max(0.01, deadline - loop.time()))
        if msg.is_event:
            events.append(msg)
        if msg.event == "OriginateResponse":
            originate_response = msg
        if on_bridged and msg.event == "BridgeEnter" and msg["BridgeNumChannels"] == "2":
            assert originate_response is not None
            on_bridged(originate_response)
    return events


def hangups(count: int) -> Callable[[list[Message]], bool]:
    return lambda events: sum(e.event == "Hangup" for e in events) >= count


async def test_busy_sequence_matches_capture_03a(raw: RawAmi) -> None:
    await raw.login()
    events = await run_and_collect(raw, f"Local/2003@{DIAL}", "2300", hangups(2))
    assert [s[:7] for s in shape(events)] == [s[:7] for s in shape(captured("03a-originate-busy"))]
    assert [s[7] for s in shape(events)] == [s[7] for s in shape(captured("03a-originate-busy"))]


async def test_no_answer_sequence_matches_capture_03b(raw: RawAmi) -> None:
    await raw.login()
    events = await run_and_collect(raw, f"Local/2004@{DIAL}", "2300", hangups(2))
    expected = shape(captured("03b-originate-noanswer-timeout"))
    assert shape(events) == expected


async def test_answered_two_point_sequence_matches_capture_02c(make_sim: Callable[..., Any]) -> None:
    # As in 02c: the first party rings, then answers; the second answers at once; then the first
    # party's ;1 is hung up by a Hangup action.
    sim = await make_sim(phone_book({"2006": {"answer_after": 2}, "2004": {"answer_after": 0}}))
    raw = await RawAmi.open(sim.port)
    try:
        await raw.login()

        def hang_up(originate_response: Message) -> None:
            raw.send(("Action", "Hangup"), ("ActionID", "c2d-hup"), ("Channel", originate_response["Channel"]))

        events = await run_and_collect(raw, f"Local/2006@{DIAL}", "2004", hangups(4), on_bridged=hang_up)
        expected = shape(captured("02c-originate-click-to-dial-bridged"))
        assert shape(events) == expected
    finally:
        raw.close()
