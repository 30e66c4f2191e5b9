"""Camp-on end to end: real SMTP in, AMI over TCP to the simulator, result mails out.

Timers are short (config) and the simulated phones fast (time_scale), so every test awaits a stage
the gateway records or a mail that arrives — never a sleep — and asserts on what the simulator
dialled, the rows stored and the mails delivered.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest

from mailgw.cli import main as cli_main
from mailgw.config import CamponConfig, Config, HostPort
from mailgw.gateway import Gateway
from mailgw.store import Store

from .conftest import Sink, maildir_messages, placed_calls, request_mail, submit

FAST = CamponConfig(retry_busy=0.3, retry_no_answer=0.3, retry_other=0.3, max_per_caller=5, max_per_target=5,
                    max_concurrent_originates=10, admins=("admin@a.example",), poll_interval=0.05,
                    monitor_mail_interval=0.2)


def fast_config(make_config: Callable[..., Config], sink: Sink, **campon: object) -> Config:
    config = make_config()
    return replace(config, campon=replace(FAST, **campon),
                   outbound=replace(config.outbound, smarthost=HostPort("127.0.0.1", sink.port)))


@pytest.fixture
async def gw(make_config: Callable[..., Config], sink: Sink) -> AsyncIterator[Gateway]:
    gateway = Gateway(fast_config(make_config, sink))
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


async def wait_for(store: Store, request_id: str, stage: str | tuple[str, ...], predicate: Callable[[str], bool] = lambda d: True,
                   timeout: float = 15.0) -> str:
    """Await a recorded stage (one of ``stage``) of ``request_id`` whose detail satisfies ``predicate``."""
    stages = (stage,) if isinstance(stage, str) else stage
    loop = asyncio.get_running_loop()
    seen: asyncio.Future[str] = loop.create_future()

    def listener(rid: str, recorded: str, detail: str) -> None:
        if rid == request_id and recorded in stages and predicate(detail) and not seen.done():
            seen.set_result(detail)

    store.stage_listeners.append(listener)
    try:
        for _, recorded, detail in await store.stages(request_id):
            if recorded in stages and predicate(detail):
                return detail
        return await asyncio.wait_for(seen, timeout)
    finally:
        store.stage_listeners.remove(listener)


async def send(gateway: Gateway, sender: str, recipient: str, body: str, **kwargs: object) -> str:
    reply = await submit(gateway.smtp_port, request_mail(sender, recipient, body, **kwargs))
    assert reply.code == 250, reply
    return reply.queue_id


async def mails_for(gateway: Gateway, request_id: str, address: str, outcome: str, count: int = 1,
                    timeout: float = 15.0) -> list[email.message.EmailMessage]:
    """The mails with X-CTI-Outcome ``outcome`` for ``request_id`` in ``address``'s Maildir (awaited)."""
    async def poll() -> list[email.message.EmailMessage]:
        while True:
            found = [m for m in maildir_messages(gateway, address)
                     if m["X-CTI-Request"] == request_id and m["X-CTI-Outcome"] == outcome]
            if len(found) >= count:
                return found
            await wait_for(gateway.store, request_id, "notified",
                           lambda d, n=len(found): True)  # at least one delivery; loop re-reads the Maildir
            await asyncio.sleep(0)  # the Maildir file is in place once 'notified' is recorded

    return await asyncio.wait_for(poll(), timeout)


def calls_between(gateway: Gateway, a: str, b: str):
    return [c for c in placed_calls(gateway) if c.from_number == a and c.exten == b]


# --- watch mode -----------------------------------------------------------------------------------

async def test_watch_mode_connects_on_the_first_idle_event(gw: Gateway) -> None:
    request_id = await send(gw, "alice@a.example", "carol@a.example", "action: camp-on\nmode: watch\nmonitor: 1m\n")
    await wait_for(gw.store, request_id, "camping")
    notice = (await mails_for(gw, request_id, "alice@a.example", "camping"))[0]
    assert notice["Subject"].startswith("Camping on Carol Chen") and "reply to this mail with the word: cancel" in \
        notice.get_content()
    assert calls_between(gw, "2000", "2003") == []  # Carol's phone is busy: nothing dialled yet

    assert gw.simulator is not None
    gw.simulator.set_phone("2003", "answer")  # Carol hangs up: ExtensionStatus 0 / NOT_INUSE
    await wait_for(gw.store, request_id, "outcome")

    [call] = calls_between(gw, "2000", "2003")
    assert call.outcome == "answered"
    rows = await gw.store.calls_for(request_id)
    assert [(r.id, r.outcome) for r in rows] == [(f"{request_id}-1", "answered")]
    message = await gw.store.get_message(request_id)
    assert (message.state, message.outcome, message.status) == ("done", "answered", "2.0.0")
    [mail] = await mails_for(gw, request_id, "alice@a.example", "answered")
    assert "It took 1 attempt." in mail.get_content()
    assert (await gw.store.get_campon(request_id)).state == "done"


async def test_watch_mode_waits_for_the_caller_too(gw: Gateway) -> None:
    assert gw.simulator is not None
    gw.simulator.set_phone("2000", "busy")  # Alice is on the phone herself
    request_id = await send(gw, "alice@a.example", "bob@a.example", "action: camp-on\nmode: watch\nmonitor: 1m\n")
    await mails_for(gw, request_id, "alice@a.example", "camping")
    assert calls_between(gw, "2000", "2001") == []
    gw.simulator.set_phone("2000", "answer")
    await wait_for(gw.store, request_id, "outcome")
    assert [c.outcome for c in calls_between(gw, "2000", "2001")] == ["answered"]


# --- retry mode ------------------------------------------------------------------------------------

async def test_retry_mode_redials_at_the_configured_interval(gw: Gateway) -> None:
    request_id = await send(gw, "alice@a.example", "carol@a.example", "action: camp-on\nmode: retry\nmonitor: 1m\n")
    await wait_for(gw.store, request_id, "attempt", lambda d: d.startswith("attempt 3:"))
    assert gw.simulator is not None
    gw.simulator.set_phone("2003", "answer")
    await wait_for(gw.store, request_id, "outcome")

    calls = calls_between(gw, "2000", "2003")
    assert [c.outcome for c in calls] == ["busy", "busy", "busy", "answered"]
    gaps = [later.started_at - earlier.ended_at for earlier, later in zip(calls, calls[1:])]
    assert all(gap >= FAST.retry_busy - 0.02 for gap in gaps[:2]), gaps  # busy -> retry_busy later
    rows = await gw.store.calls_for(request_id)
    assert [r.id for r in rows] == [f"{request_id}-{n}" for n in range(1, 5)]
    campon = await gw.store.get_campon(request_id)
    assert (campon.attempts, campon.outcome) == (4, "answered")
    [mail] = await mails_for(gw, request_id, "alice@a.example", "answered")
    assert "It took 4 attempts." in mail.get_content()


async def test_connect_with_retry_camps_on_after_a_busy_first_attempt(gw: Gateway) -> None:
    request_id = await send(gw, "alice@a.example", "carol@a.example", "retry: yes\nmonitor: 1m\n")
    await wait_for(gw.store, request_id, "camping")
    notice = (await mails_for(gw, request_id, "alice@a.example", "camping"))[0]
    assert notice["X-CTI-Status"] == "4.2.0" and "was busy" in notice.get_content()
    assert gw.simulator is not None
    gw.simulator.set_phone("2003", "answer")
    await wait_for(gw.store, request_id, "outcome")
    assert [c.outcome for c in calls_between(gw, "2000", "2003")][-1] == "answered"
    assert (await gw.store.get_message(request_id)).outcome == "answered"


async def test_permanent_cause_ends_the_camp_on_at_once(make_config, sink: Sink, tmp_path: Path) -> None:
    book = tmp_path / "phones.yaml"
    book.write_text('phones:\n  "2000": {behaviour: answer}\n')  # no default: other numbers are unallocated
    config = fast_config(make_config, sink)
    config = replace(config, pbx=replace(config.pbx, simulator=replace(config.pbx.simulator, phones=book)))
    gateway = Gateway(config)
    await gateway.start()
    try:
        request_id = await send(gateway, "alice@a.example", "cti@a.example",
                                "action: camp-on\nto: 03-1234-5678\nmonitor: 1m\n")
        await wait_for(gateway.store, request_id, "outcome")
        calls = placed_calls(gateway)
        assert len(calls) == 1  # one attempt only: an unallocated number stays unallocated
        message = await gateway.store.get_message(request_id)
        assert (message.outcome, message.status) == ("invalid-number", "5.1.1")
        assert "cause 1" in message.detail
    finally:
        await gateway.stop()


# --- expiry ----------------------------------------------------------------------------------------

async def test_expiry_ends_the_camp_on_with_4_4_7(gw: Gateway) -> None:
    request_id = await send(gw, "alice@a.example", "carol@a.example", "action: camp-on\nmode: watch\nmonitor: 1s\n")
    await wait_for(gw.store, request_id, "outcome")
    message = await gw.store.get_message(request_id)
    assert (message.state, message.outcome, message.status) == ("failed", "expired", "4.4.7")
    [mail] = await mails_for(gw, request_id, "alice@a.example", "expired")
    assert mail["X-CTI-Status"] == "4.4.7" and "monitor time" in mail.get_content()
    assert calls_between(gw, "2000", "2003") == []
    row = await gw.store.get_campon(request_id)
    assert row.ended_at >= row.deadline


# --- cancel ----------------------------------------------------------------------------------------

async def test_cancel_by_mail_only_by_the_sender(gw: Gateway) -> None:
    request_id = await send(gw, "alice@a.example", "carol@a.example", "action: camp-on\nmode: watch\nmonitor: 1m\n")
    await wait_for(gw.store, request_id, "camping")

    refused = await submit(gw.smtp_port, request_mail("bob@a.example", "cti@a.example",
                                                      f"action: cancel\nrequest: {request_id}\n"))
    assert (refused.code, refused.stage) == (550, "DATA") and refused.text.startswith("5.7.1")
    assert f"only the sender of request {request_id}" in refused.text

    cancel_id = await send(gw, "alice@a.example", "cti@a.example", f"action: cancel\nrequest: {request_id}\n")
    await wait_for(gw.store, request_id, "outcome")
    message = await gw.store.get_message(request_id)
    assert (message.outcome, message.status) == ("cancelled", "5.0.0")
    [mail] = await mails_for(gw, request_id, "alice@a.example", "cancelled")
    assert mail["Subject"].startswith("Camp-on cancelled")
    await wait_for(gw.store, cancel_id, "outcome")
    assert (await gw.store.get_message(cancel_id)).state == "done"
    assert gw.simulator is not None
    gw.simulator.set_phone("2003", "answer")  # free now, but nobody camps any more
    assert calls_between(gw, "2000", "2003") == []


async def test_an_admin_may_cancel_anyones_camp_on(gw: Gateway) -> None:
    request_id = await send(gw, "alice@a.example", "carol@a.example", "action: camp-on\nmode: watch\nmonitor: 1m\n")
    await wait_for(gw.store, request_id, "camping")
    await send(gw, "admin@a.example", "cti@a.example", f"action: cancel\nrequest: {request_id}\n")
    await wait_for(gw.store, request_id, "outcome")
    assert (await gw.store.get_message(request_id)).outcome == "cancelled"


def reply_to(notice: email.message.EmailMessage, sender: str, body: str) -> email.message.EmailMessage:
    reply = request_mail(sender, str(notice["From"].addresses[0].addr_spec), body,
                         subject=f"Re: {notice['Subject']}")
    reply["In-Reply-To"] = notice["Message-ID"]
    reply["References"] = notice["Message-ID"]
    return reply


async def test_cancel_by_replying_to_the_camp_on_mail(gw: Gateway) -> None:
    request_id = await send(gw, "alice@a.example", "carol@a.example", "action: camp-on\nmode: watch\nmonitor: 1m\n")
    [notice] = await mails_for(gw, request_id, "alice@a.example", "camping")
    assert notice["From"].addresses[0].addr_spec == "mailgw@a.example"

    bob = await submit(gw.smtp_port, reply_to(notice, "bob@a.example", "cancel\n"))
    assert (bob.code, bob.stage) == (550, "DATA") and bob.text.startswith("5.7.1")
    unclear = await submit(gw.smtp_port, reply_to(notice, "alice@a.example", "thanks!\n\n> quoted\n"))
    assert (unclear.code, unclear.stage) == (550, "DATA") and "write only the word 'cancel'" in unclear.text

    reply = await submit(gw.smtp_port, reply_to(notice, "alice@a.example",
                                                "取消\n\nOn Monday mailgw wrote:\n> Camping on Carol\n"))
    assert reply.code == 250, reply
    await wait_for(gw.store, request_id, "outcome")
    assert (await gw.store.get_message(request_id)).outcome == "cancelled"


async def test_cancel_from_the_command_line_while_the_gateway_runs(gw: Gateway) -> None:
    request_id = await send(gw, "alice@a.example", "carol@a.example", "action: camp-on\nmode: watch\nmonitor: 1m\n")
    await wait_for(gw.store, request_id, "camping")
    data = ["--data", str(gw.config.data_dir)]

    code, listing = await run_cli(["campons", "--json", *data])
    assert code == 0
    [entry] = json.loads(listing)
    assert (entry["id"], entry["caller"], entry["target"], entry["mode"], entry["state"]) == \
        (request_id, "2000", "2003", "watch", "camping")

    code, out = await run_cli(["campons", "cancel", request_id, *data])
    assert code == 0 and "recorded" in out
    await wait_for(gw.store, request_id, "outcome")  # the running gateway polls the table
    assert (await gw.store.get_message(request_id)).outcome == "cancelled"
    code, listing = await run_cli(["campons", "--json", *data])
    assert json.loads(listing) == []
    assert (await run_cli(["campons", "cancel", request_id, *data]))[0] == 1


async def run_cli(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    def run() -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli_main(argv)
        return code, out.getvalue()

    return await asyncio.to_thread(run)


# --- durability ------------------------------------------------------------------------------------

async def test_restart_in_the_middle_of_a_camp_on_keeps_its_deadline_and_connects_once(
        make_config, sink: Sink) -> None:
    config = fast_config(make_config, sink, retry_busy=0.5)
    first = Gateway(config)
    await first.start()
    try:
        request_id = await send(first, "alice@a.example", "carol@a.example",
                                "action: camp-on\nmode: retry\nmonitor: 1m\n")
        await wait_for(first.store, request_id, "attempt", lambda d: d.startswith("attempt 1:"))
        before = await first.store.get_campon(request_id)
    finally:
        await first.stop()
    first_calls = placed_calls(first)
    assert [c.outcome for c in first_calls] == ["busy"]

    second = Gateway(config)
    await second.start()
    try:
        assert [p["id"] for p in second.campons.snapshot()] == [request_id]
        # Resumed with the request's own confidential flag (not confidential here): numbers shown.
        assert [(r.id, r.confidential) for r in await second.store.pending_campons()] == [(request_id, False)]
        await wait_for(second.store, request_id, "attempt", lambda d: d.startswith("attempt 2:"))
        assert second.simulator is not None
        second.simulator.set_phone("2003", "answer")
        await wait_for(second.store, request_id, "outcome")
        after = await second.store.get_campon(request_id)
        assert after.deadline == before.deadline and after.created_at == before.created_at
        assert after.outcome == "answered" and after.attempts >= 3
        answered = [c for c in first_calls + placed_calls(second) if c.outcome == "answered"]
        assert len(answered) == 1
        [mail] = await mails_for(second, request_id, "alice@a.example", "answered")
        assert mail["X-CTI-Request"] == request_id
    finally:
        await second.stop()


async def test_restart_while_dialling_records_the_attempt_as_interrupted_and_camps_on(
        make_config, sink: Sink) -> None:
    config = fast_config(make_config, sink)
    config = replace(config, pbx=replace(config.pbx, ring_timeout=300.0))  # Dave rings 6 s at this time scale
    first = Gateway(config)
    await first.start()
    try:
        request_id = await send(first, "alice@a.example", "dave@a.example", "action: camp-on\nmonitor: 1m\n")
        await wait_for(first.store, request_id, "executing", lambda d: d.startswith("attempt 1"))
        assert (await first.store.get_campon(request_id)).state == "dialling"
    finally:
        await first.stop()

    second = Gateway(config)
    await second.start()
    try:
        await wait_for(second.store, request_id, "attempt", lambda d: "camping on" in d)
        rows = await second.store.calls_for(request_id)
        assert rows[0].id == f"{request_id}-1" and rows[0].outcome == "interrupted"
        assert second.simulator is not None
        second.simulator.set_phone("2004", "answer")
        await wait_for(second.store, request_id, "outcome")
        assert (await second.store.get_message(request_id)).outcome == "answered"
        assert [r.id for r in await second.store.calls_for(request_id)][-1] == f"{request_id}-2"
    finally:
        await second.stop()


async def test_two_identical_mails_make_one_camp_on(gw: Gateway) -> None:
    body = "action: camp-on\nmode: watch\nmonitor: 1m\n"
    replies = await asyncio.gather(*(submit(gw.smtp_port, request_mail("alice@a.example", "carol@a.example", body))
                                     for _ in range(2)))
    accepted = [r.queue_id for r in replies if r.code == 250]
    for r in replies:
        assert r.code == 250 or (r.code == 550 and r.text.startswith("5.7.1") and "already pending" in r.text)
    for request_id in accepted:
        await wait_for(gw.store, request_id, ("camping", "outcome"))
    [pending] = await gw.store.list_campons()
    # Both may pass DATA at once; then the one that starts second is refused by policy.
    others = [await gw.store.get_message(i) for i in accepted if i != pending.id]
    assert [(m.outcome, m.status) for m in others] in ([], [("refused", "5.7.1")])
    again = await submit(gw.smtp_port, request_mail("alice@a.example", "carol@a.example", body))
    assert again.code == 550 and f"already pending as request {pending.id}" in again.text
    assert gw.simulator is not None
    gw.simulator.set_phone("2003", "answer")
    await wait_for(gw.store, pending.id, "outcome")
    assert len(calls_between(gw, "2000", "2003")) == 1


# --- limits, priority, time specification --------------------------------------------------------

async def test_limit_per_target_refuses_at_data_naming_the_rule(make_config, sink: Sink) -> None:
    gateway = Gateway(fast_config(make_config, sink, max_per_target=2))
    await gateway.start()
    try:
        for sender in ("alice@a.example", "bob@a.example"):
            request_id = await send(gateway, sender, "carol@a.example", "action: camp-on\nmode: watch\nmonitor: 1m\n")
            await wait_for(gateway.store, request_id, "camping")
        third = await submit(gateway.smtp_port, request_mail("yamada@a.example", "carol@a.example",
                                                             "action: camp-on\nmode: watch\nmonitor: 1m\n"))
        assert (third.code, third.stage) == (550, "DATA")
        assert third.text.startswith("5.7.1") and "campon.max_per_target = 2" in third.text
    finally:
        await gateway.stop()


async def test_first_come_first_served_per_target(gw: Gateway) -> None:
    first = await send(gw, "bob@a.example", "carol@a.example", "action: camp-on\nmode: watch\nmonitor: 1m\n")
    await wait_for(gw.store, first, "camping")
    second = await send(gw, "alice@a.example", "carol@a.example", "action: camp-on\nmode: watch\nmonitor: 1m\n")
    await wait_for(gw.store, second, "camping")
    assert gw.simulator is not None
    gw.simulator.set_phone("2003", "answer")
    await wait_for(gw.store, first, "outcome")
    await wait_for(gw.store, second, "outcome")  # Carol is free again after the first call
    calls = [c for c in placed_calls(gw) if c.exten == "2003"]
    assert [(c.from_number, c.outcome) for c in calls][0] == ("2001", "answered")
    assert calls[-1].from_number == "2000" and calls[-1].outcome == "answered"


async def test_express_goes_first_when_originates_are_limited(make_config, sink: Sink) -> None:
    gateway = Gateway(fast_config(make_config, sink, max_concurrent_originates=1))
    await gateway.start()
    try:
        sim = gateway.simulator
        assert sim is not None
        for target in ("2004", "2005"):
            sim.set_phone(target, "busy")
        ids = []
        for sender, recipient, extra in (("alice@a.example", "carol@a.example", ""),
                                         ("bob@a.example", "dave@a.example", ""),
                                         ("yamada@a.example", "erin@a.example", "priority: express\n")):
            ids.append(await send(gateway, sender, recipient, f"action: camp-on\nmode: watch\nmonitor: 1m\n{extra}"))
            await wait_for(gateway.store, ids[-1], "camping")
        for target in ("2003", "2004", "2005"):  # all free at once: one originate slot
            sim.set_phone(target, "answer")
        for request_id in ids:
            await wait_for(gateway.store, request_id, "outcome")
        order = [c.from_number for c in placed_calls(gateway)]
        assert order == ["2000", "2002", "2001"]  # the express one overtook the normal one waiting
    finally:
        await gateway.stop()


async def test_at_delays_the_first_attempt(gw: Gateway) -> None:
    at = datetime.now(timezone.utc) + timedelta(seconds=1)
    request_id = await send(gw, "alice@a.example", "bob@a.example",
                            f"action: camp-on\nmonitor: 1m\nat: {at.isoformat()}\n")
    await wait_for(gw.store, request_id, "camping")
    assert (await gw.store.get_campon(request_id)).state == "waiting"
    await wait_for(gw.store, request_id, "outcome")
    [call] = calls_between(gw, "2000", "2001")
    assert call.started_at >= at.timestamp() - 0.01 and call.outcome == "answered"


# --- status monitor --------------------------------------------------------------------------------

async def test_status_monitor_mails_ringing_answered_hung_up_then_ends(make_config, sink: Sink) -> None:
    gateway = Gateway(fast_config(make_config, sink, monitor_mail_interval=0.05))
    await gateway.start()
    try:
        monitor_id = await send(gateway, "alice@a.example", "cti@a.example", "action: monitor\nto: 2001\nmonitor: 2s\n")
        await wait_for(gateway.store, monitor_id, "monitoring")
        call_id = await send(gateway, "yamada@a.example", "bob@a.example", "action: connect\n")
        await wait_for(gateway.store, call_id, "outcome")
        await wait_for(gateway.store, monitor_id, "line-state", lambda d: d == "idle")  # the call ended
        await wait_for(gateway.store, monitor_id, "outcome", timeout=10)
        mails = [m for m in maildir_messages(gateway, "alice@a.example") if m["X-CTI-Request"] == monitor_id]
        await wait_for(gateway.store, monitor_id, "notified")
        states = []
        for mail in sorted(mails, key=lambda m: email.utils.parsedate_to_datetime(m["Date"])):
            if mail["X-CTI-Outcome"] == "line-state":
                states += [line.split("  ", 1)[1] for line in mail.get_content().splitlines() if "  " in line
                           and line[:2].isdigit()]
        assert states[:3] == ["ringing", "in use (answered)", "free (hung up)"], states
        message = await gateway.store.get_message(monitor_id)
        assert (message.outcome, message.status) == ("monitored", "2.0.0")
    finally:
        await gateway.stop()


async def test_monitoring_a_number_without_state_is_refused_politely(gw: Gateway) -> None:
    request_id = await send(gw, "alice@a.example", "cti@a.example", "action: monitor\nto: 03-1234-5678\nmonitor: 1m\n")
    await wait_for(gw.store, request_id, "outcome")
    message = await gw.store.get_message(request_id)
    assert (message.outcome, message.status) == ("unwatchable", "5.3.3")
