"""Our AMI driver against the simulator over real TCP: login, ActionID correlation, lists,
bounded event queues, reconnect, and ``AmiPbx.connect`` for every outcome (checked against the
simulator's own call log)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from mailgw.pbx.ami import Message, Parser
from mailgw.pbx.driver import AmiClient, AmiLoginError, AmiPbx, ConnectState, apply, decide
from mailgw.pbx.port import CallOutcome, ConnectResult, Party, PbxError, PbxUnavailable
from mailgw.pbx.simulator import AmiSimulator

from .pbx_helpers import SECRET, USER, WAIT, pbx_config, phone_book

CALLER = '"mailgw" <100>'


# --- AmiClient -----------------------------------------------------------------------------------------


async def test_login_and_banner(sim: AmiSimulator, make_client: Callable[..., Any]) -> None:
    client = await make_client(sim.port)
    assert client.connected and client.banner == "Asterisk Call Manager/11.0.0"
    reply = await client.action("Ping")
    assert reply.ok and reply["Ping"] == "Pong"


async def test_md5_login(sim: AmiSimulator, make_client: Callable[..., Any]) -> None:
    client = await make_client(sim.port, auth="md5")
    assert (await client.action("Ping")).ok


async def test_refused_login_raises_and_never_logs_the_secret(
        sim: AmiSimulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = AmiClient("127.0.0.1", sim.port or 0, USER, "wrong-secret-value", reconnect_min=0.01)
    with pytest.raises(AmiLoginError):
        await client.start()
    assert not client.connected
    good = AmiClient("127.0.0.1", sim.port or 0, USER, SECRET)
    await good.start()
    await good.close()
    assert caplog.records, "the login attempts should have been logged"
    assert "wrong-secret-value" not in caplog.text and SECRET not in caplog.text


async def test_unreachable_pbx_raises_pbx_error() -> None:
    client = AmiClient("127.0.0.1", 1, USER, SECRET, connect_timeout=1.0)
    with pytest.raises(PbxError):
        await client.start()


async def test_replies_are_matched_by_action_id_not_order() -> None:
    """A scripted server answers five actions in reverse order, after an event that carries
    ``Response:`` and the first action's ActionID: each caller must still get its own reply."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"Asterisk Call Manager/11.0.0\r\n")
        parser, waiting = Parser(), []
        while data := await reader.read(65536):
            for msg in parser.feed(data):
                if msg.action in ("Login", "Logoff"):
                    writer.write(Message([("Response", "Success"), ("ActionID", msg.action_id or "")]).encode())
                    continue
                waiting.append(msg)
                if len(waiting) == 5:
                    writer.write(Message([("Event", "OriginateResponse"), ("Privilege", "call,all"),
                                          ("ActionID", waiting[0].action_id or ""), ("Response", "Failure"),
                                          ("Reason", "5")]).encode())
                    for request in reversed(waiting):
                        writer.write(Message([("Response", "Success"), ("ActionID", request.action_id or ""),
                                              ("Echo", request["Echo"])]).encode())
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    client = AmiClient("127.0.0.1", server.sockets[0].getsockname()[1], USER, SECRET, keepalive_interval=None)
    try:
        await client.start()
        events = client.subscribe("OriginateResponse")
        replies = await asyncio.wait_for(
            asyncio.gather(*[client.action("Test", Echo=str(i)) for i in range(5)]), WAIT)
        assert [r["Echo"] for r in replies] == ["0", "1", "2", "3", "4"]
        event = await events.get(WAIT)
        assert event.action_id == replies[0].action_id and event["Response"] == "Failure"
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def test_concurrent_actions_get_their_own_answers(sim: AmiSimulator, make_client: Callable[..., Any]) -> None:
    client = await make_client(sim.port)
    states = await asyncio.gather(*[
        client.action("ExtensionState", Exten=exten, Context="mailgw-dial")
        for exten in ["2000", "2003", "2005", "0312", "2004"] * 10
    ])
    assert [s["Exten"] for s in states] == ["2000", "2003", "2005", "0312", "2004"] * 10
    assert [s["Status"] for s in states[:5]] == ["0", "1", "4", "-1", "0"]
    assert len({s.action_id for s in states}) == 50


async def test_own_action_id_and_repeated_headers(sim: AmiSimulator, make_client: Callable[..., Any]) -> None:
    client = await make_client(sim.port)
    reply = await client.action("Originate", [("Variable", "A=1"), ("Variable", "MAILGW_RING_TIMEOUT=5")],
                                ActionID="mine-1", Channel="Local/2003@mailgw-dial", Context="x", Exten="1",
                                Async=True)
    assert reply.action_id == "mine-1" and reply.ok
    with pytest.raises(ValueError):
        await client.action("Ping", ActionID="x\r\nAction: Originate")


async def test_list_action_returns_items(sim: AmiSimulator, make_client: Callable[..., Any]) -> None:
    client = await make_client(sim.port)
    reply = await client.list_action("ExtensionStateList")
    assert reply.response.ok and reply.complete is not None
    assert [e["Exten"] for e in reply.events] == ["2000", "2001", "2002", "2003", "2004", "2005", "2009"]
    assert reply.complete["ListItems"] == "7"
    # Plain actions still work afterwards: the list's ActionID was released.
    empty = await client.list_action("CoreShowChannels")
    assert empty.events == [] and empty.complete is not None and empty.complete["ListItems"] == "0"


async def test_subscription_is_bounded_and_drops_the_oldest(sim: AmiSimulator,
                                                           make_client: Callable[..., Any]) -> None:
    client = await make_client(sim.port)
    with client.subscribe("ExtensionStatus", maxsize=3) as small, client.subscribe("ExtensionStatus") as full:
        for behaviour in ["busy", "answer", "dnd", "answer", "unreachable", "answer"]:
            await client.action("SimPhone", Phone="2000", Behaviour=behaviour)
        # Events follow each reply; a Ping answered afterwards means all of them were read.
        await client.action("Ping")
        assert len(full) == 6 and full.dropped == 0
        assert len(small) == 3 and small.dropped == 3
        kept = [small.get_nowait() for _ in range(3)]
        assert [m["StatusText"] for m in kept] == ["Idle", "Unavailable", "Idle"]
        with pytest.raises(PbxError):
            await small.get(timeout=0.05)


async def test_several_clients_receive_the_same_events(sim: AmiSimulator, make_client: Callable[..., Any]) -> None:
    watchers = [await make_client(sim.port) for _ in range(3)]
    subscriptions = [w.subscribe("OriginateResponse") for w in watchers]
    caller = await make_client(sim.port)
    await caller.action("Originate", ActionID="seen-by-all", Channel="Local/2003@mailgw-dial",
                        Context="mailgw-connect", Exten="2000", Async=True)
    seen = [await s.wait_for(lambda m: m.action_id == "seen-by-all", WAIT) for s in subscriptions]
    assert all(m == seen[0] for m in seen) and seen[0]["Reason"] == "5"


async def test_reconnect_after_the_pbx_restarts(make_sim: Callable[..., Any], make_client: Callable[..., Any]) -> None:
    sim = await make_sim()
    port = sim.port
    client = await make_client(port)
    pbx = AmiPbx(pbx_config(port or 0), client=client)
    await pbx.start()
    in_flight = asyncio.create_task(
        pbx.connect("lost-1", "2004", "2000", ring_timeout=600, caller_id=CALLER))  # rings a long time
    await client.subscribe("DialState").get(WAIT)  # the first party is ringing
    await sim.stop()
    with pytest.raises(PbxError, match="lost"):
        await asyncio.wait_for(in_flight, WAIT)  # promptly, not after 2 x 600 s
    with pytest.raises(PbxUnavailable):
        await client.action("Ping")
    with pytest.raises(PbxUnavailable):
        await pbx.connect("lost-2", "2000", "2001", ring_timeout=5, caller_id=CALLER)

    restarted = await make_sim(port=port)
    await client.wait_connected(WAIT)
    assert client.sessions == 2
    assert (await client.action("Ping")).ok
    result = await asyncio.wait_for(pbx.connect("back-1", "2000", "2001", ring_timeout=5, caller_id=CALLER), WAIT)
    assert result.outcome is CallOutcome.ANSWERED
    assert [r.call_id for r in restarted.calls] == ["back-1"]


async def test_action_in_flight_fails_fast_when_the_connection_drops(
        make_sim: Callable[..., Any], make_client: Callable[..., Any]) -> None:
    sim = await make_sim()
    client = await make_client(sim.port)
    watcher = await make_client(sim.port)
    ringing = watcher.subscribe("DialState")
    # A sync Originate to a phone that never answers keeps its reply back (Timeout 600 s); the
    # other session sees the phone ringing, so the action is in flight when the PBX goes away.
    pending = asyncio.create_task(client.action("Originate", Channel="Local/2004@mailgw-dial", Context="x",
                                                Exten="1", Timeout=600_000, timeout=600))
    await ringing.get(WAIT)
    await sim.stop()
    with pytest.raises(PbxError):
        await asyncio.wait_for(pending, WAIT)


async def test_action_timeout_is_bounded(sim: AmiSimulator, make_client: Callable[..., Any]) -> None:
    client = await make_client(sim.port)
    with pytest.raises(PbxError, match="no response"):
        # Held back by a sync Originate ringing a phone that never answers.
        await client.action("Originate", Channel="Local/2004@mailgw-dial", Context="x", Exten="1",
                            Timeout=600_000, timeout=0.2)
    await sim.stop()  # ends the blocked session at once


# --- AmiPbx.connect, one test per outcome -------------------------------------------------------------


async def connect(pbx: AmiPbx, call_id: str, a: str, b: str, ring_timeout: float = 5) -> ConnectResult:
    return await asyncio.wait_for(pbx.connect(call_id, a, b, ring_timeout=ring_timeout, caller_id=CALLER), WAIT)


OUTCOMES = [
    # call id, from, to, outcome, failed party, cause, (from outcome, to outcome) in the simulator's log
    ("answered", "2000", "2001", CallOutcome.ANSWERED, None, None, ("answered", "answered")),
    ("from-busy", "2003", "2001", CallOutcome.BUSY, Party.FROM, 17, ("busy", None)),
    ("from-dnd", "2006", "2001", CallOutcome.BUSY, Party.FROM, 17, ("busy", None)),
    ("from-noanswer", "2004", "2001", CallOutcome.NO_ANSWER, Party.FROM, 19, ("no-answer", None)),
    ("from-unreachable", "2005", "2001", CallOutcome.UNREACHABLE, Party.FROM, 20, ("unreachable", None)),
    ("from-congestion", "2007", "2001", CallOutcome.CONGESTION, Party.FROM, 34, ("congestion", None)),
    ("from-invalid", "2999", "2001", CallOutcome.INVALID, Party.FROM, 1, ("invalid-number", None)),
    ("to-busy", "2000", "2003", CallOutcome.BUSY, Party.TO, 17, ("answered", "busy")),
    ("to-noanswer", "2000", "2004", CallOutcome.NO_ANSWER, Party.TO, None, ("answered", "no-answer")),
    ("to-unreachable", "2000", "2005", CallOutcome.UNREACHABLE, Party.TO, 20, ("answered", "unreachable")),
    ("to-congestion", "2000", "2007", CallOutcome.CONGESTION, Party.TO, 34, ("answered", "congestion")),
    ("to-invalid", "2000", "2999", CallOutcome.INVALID, Party.TO, 1, ("answered", "invalid-number")),
    ("external", "2000", "0312345678", CallOutcome.ANSWERED, None, None, ("answered", "answered")),
]


@pytest.mark.parametrize("call_id, a, b, outcome, party, cause, logged", OUTCOMES, ids=[o[0] for o in OUTCOMES])
async def test_connect_outcome(make_sim: Callable[..., Any], make_pbx: Callable[..., Any], call_id: str,
                               a: str, b: str, outcome: CallOutcome, party: Party | None, cause: int | None,
                               logged: tuple[str | None, str | None]) -> None:
    book = phone_book({
        "2000": {"answer_after": 1}, "2001": {"answer_after": 2}, "2003": "busy", "2004": "no-answer",
        "2005": "unreachable", "2006": "dnd", "2007": "congestion",
    }, default={"answer_after": 3} if b == "0312345678" else None)  # else unknown numbers are unallocated
    sim = await make_sim(book)
    pbx = await make_pbx(sim)
    result = await connect(pbx, call_id, a, b)
    assert (result.call_id, result.outcome, result.failed_party, result.cause) == (call_id, outcome, party, cause)
    assert result.started_at <= result.ended_at
    assert (result.from_answered_at is not None) == (logged[0] == "answered")
    assert (result.to_answered_at is not None) == (outcome is CallOutcome.ANSWERED)
    if result.to_answered_at is not None:
        assert result.from_answered_at <= result.to_answered_at  # type: ignore[operator]

    record = sim.call(call_id)
    assert record is not None, "the simulator saw no such call"
    assert record.from_number == a
    assert record.to_number == (b if logged[0] == "answered" else None)  # only dialled once a answered
    assert (record.from_outcome, record.to_outcome) == logged
    assert record.outcome == outcome
    assert len(sim.calls) == 1


async def test_connect_result_is_also_visible_over_ami(sim: AmiSimulator, make_pbx: Callable[..., Any]) -> None:
    pbx = await make_pbx(sim)
    result = await connect(pbx, "over-ami", "2000", "2003")
    assert result.outcome is CallOutcome.BUSY
    calls = await pbx.client.list_action("SimCalls", CallId="over-ami")
    assert [(e["From"], e["To"], e["Outcome"], e["ToCause"]) for e in calls.events] == [("2000", "2003", "busy", "17")]


async def test_find_call_while_up_and_after(sim: AmiSimulator, make_pbx: Callable[..., Any]) -> None:
    pbx = await make_pbx(sim)
    ended = pbx.client.subscribe("Hangup")
    result = await connect(pbx, "find-me", "2000", "2001")
    assert result.outcome is CallOutcome.ANSWERED
    assert await pbx.find_call("find-me") is True
    assert await pbx.find_call("someone-else") is False
    await ended.wait_for(lambda m: m.get("Uniqueid") == "find-me", WAIT)  # talk time over
    assert await pbx.find_call("find-me") is False


@pytest.mark.parametrize("number", ["", "+", "2000&Local/1@x", "20 00", "2000\r\nAction: Hangup",
                                    "１２３", "1" * 21, "20,00", "2000@mailgw-dial", "*21"])
async def test_connect_refuses_what_is_not_a_number(sim: AmiSimulator, make_pbx: Callable[..., Any],
                                                    number: str) -> None:
    pbx = await make_pbx(sim)
    with pytest.raises(ValueError):
        await pbx.connect("bad-1", number, "2001", ring_timeout=5, caller_id=CALLER)
    with pytest.raises(ValueError):
        await pbx.connect("bad-2", "2000", number, ring_timeout=5, caller_id=CALLER)
    with pytest.raises(ValueError):
        await pbx.connect("bad id", "2000", "2001", ring_timeout=5, caller_id=CALLER)
    assert sim.calls == []  # nothing reached the PBX


async def test_twenty_connects_at_once_on_one_session(make_sim: Callable[..., Any],
                                                      make_pbx: Callable[..., Any]) -> None:
    phones: dict[str, Any] = {}
    expected = {}
    for i in range(20):
        a, b = f"3{i:03d}", f"4{i:03d}"
        phones[a] = {"answer_after": (i % 4) * 0.5}
        phones[b] = ["busy", "no-answer", "unreachable"][i % 3] if i % 2 else {"answer_after": (i % 5) * 0.5}
        expected[f"many-{i}"] = (a, b, CallOutcome.ANSWERED if i % 2 == 0 else
                                 [CallOutcome.BUSY, CallOutcome.NO_ANSWER, CallOutcome.UNREACHABLE][i % 3])
    sim = await make_sim(phone_book(phones))
    pbx = await make_pbx(sim)
    sessions_before = pbx.client.sessions
    results = await asyncio.wait_for(asyncio.gather(*[
        pbx.connect(call_id, a, b, ring_timeout=3, caller_id=CALLER) for call_id, (a, b, _) in expected.items()
    ]), WAIT * 2)
    assert pbx.client.sessions == sessions_before == 1
    for result in results:
        a, b, outcome = expected[result.call_id]
        assert result.outcome is outcome, result
        assert result.failed_party is (None if outcome is CallOutcome.ANSWERED else Party.TO)
        record = sim.call(result.call_id)
        assert record is not None and (record.from_number, record.to_number, record.outcome) == (a, b, outcome)
    assert len(sim.calls) == 20


async def test_connect_times_out_with_pbx_error(make_sim: Callable[..., Any], make_pbx: Callable[..., Any]) -> None:
    # A PBX that takes longer than the driver's bound (2 x ring timeout): real time here, and
    # the second party rings for the dial plan's minimum of 1 s while the bound is 0.2 s.
    sim = await make_sim(phone_book({"2000": {"answer_after": 0}, "2004": "no-answer"}), time_scale=1.0)
    pbx = await make_pbx(sim, connect_margin=0.0)
    with pytest.raises(PbxError, match="no outcome"):
        await pbx.connect("slow-1", "2000", "2004", ring_timeout=0.1, caller_id=CALLER)


async def test_pbx_start_survives_an_absent_pbx_and_connects_later(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim()
    port = sim.port
    await sim.stop()
    client = AmiClient("127.0.0.1", port or 0, USER, SECRET, connect_timeout=0.5, reconnect_min=0.02,
                       reconnect_max=0.1)
    pbx = AmiPbx(pbx_config(port or 0), client=client)
    try:
        await pbx.start()  # logs a warning, keeps trying
        with pytest.raises(PbxUnavailable):
            await pbx.connect("early", "2000", "2001", ring_timeout=5, caller_id=CALLER)
        await make_sim(port=port)
        await client.wait_connected(WAIT)
        assert (await connect(pbx, "later", "2000", "2001")).outcome is CallOutcome.ANSWERED
    finally:
        await pbx.stop()


async def test_panoramisk_can_use_the_simulator(sim: AmiSimulator) -> None:
    """A third-party AMI client logs in, originates and gets OriginateResponse."""
    from panoramisk import Manager

    logged_in: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    manager = Manager(host="127.0.0.1", port=sim.port, username=USER, secret=SECRET, ping_delay=60,
                      on_login=lambda _: logged_in.set_result(None))
    responses: asyncio.Queue[Message] = asyncio.Queue()
    manager.register_event("OriginateResponse", lambda _, event: responses.put_nowait(event))
    try:
        await asyncio.wait_for(manager.connect(), WAIT)
        await asyncio.wait_for(logged_in, WAIT)
        assert manager.authenticated
        reply = await asyncio.wait_for(manager.send_action({
            "Action": "Originate", "Channel": "Local/2000@mailgw-dial", "Context": "mailgw-connect",
            "Exten": "2001", "Priority": "1", "Async": "true", "ChannelId": "pano-1"}), WAIT)
        # panoramisk files the OriginateResponse (it carries the action's ActionID) with the reply.
        messages = reply if isinstance(reply, list) else [reply]
        assert messages[0]["Response"] == "Success"
        events = [m for m in messages if m.get("Event") == "OriginateResponse"]
        event = events[0] if events else await asyncio.wait_for(responses.get(), WAIT)
        assert (event["Response"], event["Reason"], event["Uniqueid"]) == ("Success", "4", "pano-1")
        assert sim.call("pano-1") is not None
    finally:
        manager.close()


# --- the decision function on its own (orders a real Asterisk may produce) -----------------------------


def _events(*specs: dict[str, str]) -> list[Message]:
    return [Message(list(spec.items())) for spec in specs]


@pytest.mark.parametrize("order", ["cause-first", "cause-last"])
def test_decide_waits_for_the_cause_in_either_order(order: str) -> None:
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    response = {"Event": "OriginateResponse", "Response": "Failure", "Reason": "1"}
    hangup = {"Event": "Hangup", "Uniqueid": "c-2", "Channel": "Local/2005@d-1;2", "Cause": "20"}
    state = ConnectState("c", now)
    for msg in _events(*([hangup, response] if order == "cause-first" else [response, hangup])):
        before = decide(state, grace_over=False)
        apply(state, msg, now)
    assert before is None
    assert decide(state, grace_over=False) == (CallOutcome.UNREACHABLE, Party.FROM, 20)


def test_decide_second_party_and_grace() -> None:
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    state = ConnectState("c", now)
    for msg in _events(
        {"Event": "DialEnd", "DestUniqueid": "c", "DialStatus": "ANSWER"},
        {"Event": "DialBegin", "Uniqueid": "c", "DestChannel": "Local/2003@d-0000000a;1"},
        {"Event": "DialEnd", "Uniqueid": "c", "DestChannel": "Local/2003@d-0000000a;1", "DialStatus": "BUSY"},
    ):
        apply(state, msg, now)
    assert state.from_answered_at is not None
    assert decide(state, grace_over=False) is None  # waiting briefly for the cause
    assert decide(state, grace_over=True) == (CallOutcome.BUSY, Party.TO, None)
    apply(state, Message([("Event", "Hangup"), ("Channel", "Local/2003@d-0000000a;2"), ("Cause", "21")]), now)
    assert decide(state, grace_over=False) == (CallOutcome.REJECTED, Party.TO, 21)


# --- calls disturbed from outside ------------------------------------------------------------------------


async def test_a_phone_in_a_call_is_busy_for_the_next_caller(sim: AmiSimulator, make_pbx: Callable[..., Any]) -> None:
    pbx = await make_pbx(sim)
    first = await connect(pbx, "talking", "2000", "2001")
    assert first.outcome is CallOutcome.ANSWERED
    second = await connect(pbx, "camp-on-me", "2002", "2000")  # 2000 is still talking to 2001
    assert (second.outcome, second.failed_party, second.cause) == (CallOutcome.BUSY, Party.TO, 17)


async def test_first_party_hung_up_while_the_second_rings(sim: AmiSimulator, make_pbx: Callable[..., Any]) -> None:
    pbx = await make_pbx(sim)
    with pbx.client.subscribe("DialState") as ringing:
        call = asyncio.create_task(pbx.connect("gave-up", "2000", "2004", ring_timeout=600, caller_id=CALLER))
        second_rings = await ringing.wait_for(lambda m: m.get("Uniqueid") == "gave-up", WAIT)
    reply = await pbx.client.action("Hangup", Channel=second_rings["Channel"])
    assert reply["Message"] == "Channel Hungup"
    result = await asyncio.wait_for(call, WAIT)
    assert (result.outcome, result.failed_party) == (CallOutcome.NO_ANSWER, Party.TO)
    record = sim.call("gave-up")
    assert record is not None and record.to_outcome is CallOutcome.FAILED


async def test_first_party_call_cancelled_while_it_rings(sim: AmiSimulator, make_pbx: Callable[..., Any]) -> None:
    pbx = await make_pbx(sim)
    with pbx.client.subscribe("DialState") as ringing:
        call = asyncio.create_task(pbx.connect("cancelled", "2004", "2000", ring_timeout=600, caller_id=CALLER))
        first_rings = await ringing.wait_for(lambda m: m.get("DestUniqueid") == "cancelled", WAIT)
    await pbx.client.action("Hangup", Channel=first_rings["DestChannel"])
    result = await asyncio.wait_for(call, WAIT)
    assert (result.outcome, result.failed_party, result.cause) == (CallOutcome.FAILED, Party.FROM, None)
