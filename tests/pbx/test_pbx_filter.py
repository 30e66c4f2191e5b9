"""AMI event filters (the Filter action) on real sockets: what the simulator sends a filtered
session, what it refuses, and the driver asking for the events its listeners read, widening the
filter for a later listener and reading everything when the PBX refuses to filter."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from mailgw.pbx.driver import AmiPbx
from mailgw.pbx.eventfilter import EventFilters, FilterError, parse_filter
from mailgw.pbx.port import CallOutcome
from mailgw.pbx.simulator import AmiSimulator

from .pbx_helpers import WAIT, RawAmi, pbx_config

CALLER = '"mailgw" <100>'
CALL_EVENTS = ("Newchannel", "Newstate", "DialBegin", "DialState", "DialEnd", "OriginateResponse", "Hangup")


async def filtered_session(sim: AmiSimulator, *filters: tuple[str, str]) -> RawAmi:
    """A logged-in raw session with ``filters`` added: (Filter, MatchCriteria or "")."""
    raw = await RawAmi.open(sim.port or 0)
    await raw.login()
    for index, (expression, criteria) in enumerate(filters):
        raw.send(("Action", "Filter"), ("ActionID", f"f{index}"), ("Operation", "Add"),
                 *([("MatchCriteria", criteria)] if criteria else []), *([("Filter", expression)] if expression else []))
        reply, _ = await raw.response(f"f{index}")
        assert reply.ok, reply
    return raw


async def call_seen_by(raw: RawAmi, watcher: RawAmi, call_id: str) -> Counter[str]:
    """Place an answered two-point call from ``watcher`` (unfiltered); the events ``raw`` got."""
    watcher.send(("Action", "Originate"), ("ActionID", call_id), ("Channel", "Local/2000@mailgw-dial"),
                 ("Context", "mailgw-connect"), ("Exten", "2001"), ("Priority", "1"), ("Async", "true"),
                 ("ChannelId", call_id), ("OtherChannelId", f"{call_id}-2"))
    await watcher.response(call_id)
    await watcher.event("Hangup", Uniqueid=call_id)  # the first party's end: the call ran
    # Events go to every session at once, so ``raw`` has them all by now; a Ping's reply marks the end.
    raw.send(("Action", "Ping"), ("ActionID", "end"))
    _, got = await raw.response("end")
    return Counter(m.event for m in got if m.event)


async def test_a_session_filtered_by_name_gets_only_those_events(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim()
    watcher = await RawAmi.open(sim.port or 0)
    await watcher.login()
    raw = await filtered_session(sim, ("", "name(DialBegin)"), ("", "action(include),name(Hangup)"))
    names = await call_seen_by(raw, watcher, "f-1")
    assert set(names) == {"DialBegin", "Hangup"} and names["DialBegin"] == 2
    raw.close()
    watcher.close()


async def test_exclude_filters_and_legacy_regular_expressions(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim()
    watcher = await RawAmi.open(sim.port or 0)
    await watcher.login()
    raw = await filtered_session(sim, ("!Event: Newstate", ""), ("", "action(exclude),name(DialState)"),
                                 ("Local/2001", "action(exclude),header(Channel),method(starts_with)"))
    names = await call_seen_by(raw, watcher, "f-2")
    assert "Newstate" not in names and "DialState" not in names
    assert {"Newchannel", "DialBegin", "DialEnd", "OriginateResponse", "Hangup"} <= set(names)
    raw.close()
    watcher.close()


@pytest.mark.parametrize(("fields", "message"), [
    ((("Operation", "Remove"), ("Filter", "Event: Hangup")), "Unknown operation"),
    ((("Operation", "Add"), ("MatchCriteria", "colour(red)")), "Invalid match criteria"),
    ((("Operation", "Add"), ("Filter", "Event: [Hangup")), "Filter did not compile."),
])
async def test_a_bad_filter_is_refused_saying_why(raw: RawAmi, fields: tuple[tuple[str, str], ...],
                                                   message: str) -> None:
    await raw.login()
    raw.send(("Action", "Filter"), ("ActionID", "f"), *fields)
    reply, _ = await raw.response("f")
    assert reply.response == "Error" and message in (reply.message or ""), reply


async def test_filter_needs_the_system_write_class(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(write="call,originate")
    raw = await RawAmi.open(sim.port or 0)
    await raw.login()
    raw.send(("Action", "Filter"), ("ActionID", "f"), ("Operation", "Add"), ("MatchCriteria", "name(Hangup)"))
    reply, _ = await raw.response("f")
    assert (reply.response, reply.message) == ("Error", "Permission denied")
    raw.close()


def session_filter_names(sim: AmiSimulator) -> set[str]:
    [session] = [s for s in sim._sessions if s.authenticated]
    return {f.name for f in session.filters.filters if f.name is not None}


async def test_the_driver_asks_for_what_its_listeners_read_and_widens_it_for_a_new_one(
        make_sim: Callable[..., Any]) -> None:
    sim = await make_sim()
    pbx = AmiPbx(pbx_config(sim.port or 0))  # the product's own client: filter_events
    await pbx.start()
    try:
        assert session_filter_names(sim) == set(AmiPbx.PRODUCT_EVENTS)
        with pbx.client.subscribe("DialState") as ringing:
            result = await pbx.connect("w-1", "2000", "2001", ring_timeout=5, caller_id=CALLER)
            assert result.outcome is CallOutcome.ANSWERED
            assert (await ringing.get(WAIT)).event == "DialState"
        assert session_filter_names(sim) == {*AmiPbx.PRODUCT_EVENTS, "DialState"}
    finally:
        await pbx.stop()


async def test_a_pbx_that_will_not_filter_still_serves_every_listener(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(write="call,originate")
    pbx = AmiPbx(pbx_config(sim.port or 0))
    await pbx.start()
    try:
        result = await pbx.connect("w-2", "2000", "2001", ring_timeout=5, caller_id=CALLER)
        assert result.outcome is CallOutcome.ANSWERED
        assert not pbx.client.filter_events and pbx.client.sessions == 1
        assert session_filter_names(sim) == set()
    finally:
        await pbx.stop()


def test_filter_evaluation_follows_asterisk() -> None:
    def passes(*filters: tuple[str, str | None], name: str = "Hangup",
               text: str = "Event: Hangup\r\nChannel: Local/2000@mailgw-dial-0001;1\r\nCause: 16") -> bool:
        chosen = EventFilters()
        for expression, criteria in filters:
            chosen.add(parse_filter(expression, criteria))
        return chosen.passes(name, lambda: text)

    assert passes()  # no filters: everything
    assert passes(("", "name(Hangup)")) and not passes(("", "name(hangup)"))  # names compare exactly
    assert not passes(("", "name(DialBegin)"))  # include filters only: one must match
    assert passes(("!Event: Newstate", None)) and not passes(("!Cause: 16", None))  # exclude only
    assert not passes(("", "name(Hangup)"), ("", "action(exclude),name(Hangup)"))  # exclude wins
    assert passes(("Event: Hang", None))  # legacy: a regex searched in the whole text
    assert passes(("2000@", "header(Channel),method(contains)"))
    assert not passes(("2001", "header(Channel),method(contains)"))
    assert not passes(("16", "header(Uniqueid),method(exact)"))  # no such header: no match
    assert passes(("16", "header(Cause),method(exact)"), ("", "name(DialBegin)"))
    with pytest.raises(FilterError):
        parse_filter("", "name(Hangup),name(Newstate)")  # one of each criterion
    with pytest.raises(FilterError):
        parse_filter("", "method(contains)")  # a method compares an expression
