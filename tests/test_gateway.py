"""End to end on real sockets: SMTP in -> store -> AMI over TCP -> simulator -> result mail out.

Each test sends a real request mail to a gateway on ephemeral ports, awaits the stage the gateway
records, and asserts on outcomes: the call the simulator saw, the row the store holds, the mail
that arrived in a Maildir or the SMTP sink.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import replace

import pytest

from mailgw import dispatch
from mailgw.gateway import Gateway
from mailgw.mailbox import maildir_for

from .conftest import Sink, maildir_messages, placed_calls, request_mail, submit, wait_stage


async def run_request(gateway: Gateway, sender: str, recipient: str, body: str, **kwargs) -> str:
    reply = await submit(gateway.smtp_port, request_mail(sender, recipient, body, **kwargs))
    assert reply.code == 250, reply
    request_id = reply.queue_id
    await wait_stage(gateway.store, request_id, "outcome")
    return request_id


async def result_mail_in_maildir(gateway: Gateway, request_id: str, address: str):
    await wait_stage(gateway.store, request_id, "notified")
    mails = [m for m in maildir_messages(gateway, address) if m["X-CTI-Request"] == request_id]
    assert len(mails) == 1, f"expected exactly one result mail for {request_id}, found {len(mails)}"
    return mails[0]


async def test_connect_answered_places_the_call_and_mails_the_result(gateway: Gateway) -> None:
    request_id = await run_request(gateway, "alice@a.example", "bob@a.example", "action: connect\n")

    calls = placed_calls(gateway)
    assert [(c.from_number, c.to_number) for c in calls] == [("2000", "2001")]
    assert calls[0].outcome == "answered"

    rows = await gateway.store.calls_for(request_id)
    assert len(rows) == 1 and rows[0].outcome == "answered"
    assert rows[0].placed_at <= rows[0].from_answered_at <= rows[0].to_answered_at <= rows[0].ended_at

    mail = await result_mail_in_maildir(gateway, request_id, "alice@a.example")
    assert mail["X-CTI-Outcome"] == "answered"
    assert mail["X-CTI-Status"] == "2.0.0"
    assert mail["Subject"].startswith("Connected: Bob Baker")
    assert mail["Auto-Submitted"] == "auto-replied"
    assert "Bob Baker (2001)" in mail.get_content()
    stages = [stage for _, stage, _ in await gateway.store.stages(request_id)]
    assert stages[:3] == ["received", "executing", "outcome"] and "notified" in stages


@pytest.mark.parametrize(("recipient", "outcome", "status"), [
    ("carol@a.example", "busy", "4.2.0"),          # 2003 is busy
    ("dave@a.example", "no-answer", "4.4.1"),      # 2004 never answers
    ("erin@a.example", "unreachable", "4.4.4"),    # 2005 is switched off
])
async def test_destination_that_does_not_answer_gives_a_failure_mail(
        gateway: Gateway, recipient: str, outcome: str, status: str) -> None:
    request_id = await run_request(gateway, "alice@a.example", recipient, "action: connect\n")

    rows = await gateway.store.calls_for(request_id)
    assert [(r.outcome, r.failed_party) for r in rows] == [(outcome, "to")]
    message = await gateway.store.get_message(request_id)
    assert (message.state, message.outcome, message.status) == ("failed", outcome, status)

    mail = await result_mail_in_maildir(gateway, request_id, "alice@a.example")
    assert mail["X-CTI-Outcome"] == outcome
    assert mail["X-CTI-Status"] == status
    assert f"Call not connected ({outcome})" in mail["Subject"]
    assert "the destination" in mail.get_content()


async def test_callers_own_phone_busy_is_reported_as_such(gateway: Gateway) -> None:
    request_id = await run_request(gateway, "carol@a.example", "bob@a.example", "action: connect\n")
    rows = await gateway.store.calls_for(request_id)
    assert [(r.outcome, r.failed_party) for r in rows] == [("busy", "from")]
    [call] = placed_calls(gateway)
    assert (call.from_number, call.exten) == ("2003", "2001")
    assert call.to_number is None  # Bob's phone never rang: the caller's own phone was busy
    mail = await result_mail_in_maildir(gateway, request_id, "carol@a.example")
    assert "your phone (2003) was busy" in mail.get_content()


async def test_call_forward_in_astdb_is_followed_by_the_two_point_connection(gateway: Gateway) -> None:
    assert gateway.pbx is not None
    reply = await gateway.pbx.client.action("DBPut", Family="CF", Key="2004", Val="2001")  # as `mailgw phone forward`
    assert reply.get("Response") == "Success"
    request_id = await run_request(gateway, "alice@a.example", "dave@a.example", "action: connect\n")
    # Dave's phone never answers; Bob's (where Dave forwards) does.
    assert [(r.outcome, r.failed_party) for r in await gateway.store.calls_for(request_id)] == [("answered", None)]


async def test_japanese_sender_gets_a_japanese_result_mail(gateway: Gateway) -> None:
    request_id = await run_request(gateway, "yamada@a.example", "bob@a.example", "動作：connect\n")
    mail = await result_mail_in_maildir(gateway, request_id, "yamada@a.example")
    assert mail["Subject"].startswith("接続しました")
    assert "接続しました" in mail.get_content()
    assert mail.get_content_charset() == "utf-8"


async def test_japanese_failure_mail_is_japanese_throughout(gateway: Gateway) -> None:
    request_id = await run_request(gateway, "yamada@a.example", "carol@a.example", "動作：connect\n")
    mail = await result_mail_in_maildir(gateway, request_id, "yamada@a.example")
    assert mail["Subject"].startswith("接続できませんでした（話し中）")
    assert "相手先（2003）が話し中のため、接続できませんでした。" in mail.get_content()
    assert "busy" not in mail.get_content().split("結果")[0]  # no English sentence in the Japanese text


async def test_foreign_sender_gets_the_result_through_the_smarthost(gateway: Gateway, sink: Sink) -> None:
    request_id = await run_request(gateway, "partner@b.example", "cti@a.example",
                                   "to: 2001\nfrom: 03-1234-5678\n")
    calls = placed_calls(gateway)
    assert [(c.from_number, c.to_number, c.outcome) for c in calls] == [("0312345678", "2001", "answered")]
    mail_from, rcpts, mail = await sink.next()
    assert rcpts == ["partner@b.example"]
    assert mail["X-CTI-Request"] == request_id and mail["X-CTI-Outcome"] == "answered"


async def test_dry_run_dials_nothing_and_says_what_would_happen(gateway: Gateway) -> None:
    request_id = await run_request(gateway, "alice@a.example", "bob@a.example", "dry-run: yes\n")
    assert placed_calls(gateway) == []
    mail = await result_mail_in_maildir(gateway, request_id, "alice@a.example")
    assert mail["X-CTI-Outcome"] == "dry-run"
    assert "ring 2000" in mail.get_content() and "ring 2001" in mail.get_content()


async def test_notify_no_sends_no_result_mail(gateway: Gateway) -> None:
    request_id = await run_request(gateway, "alice@a.example", "bob@a.example", "notify: no\n")
    assert [c.outcome for c in placed_calls(gateway)] == ["answered"]
    assert await gateway.store.outbox_for(request_id) == []


async def test_confidential_request_keeps_its_numbers_out_of_logs_and_mail(gateway: Gateway, caplog) -> None:
    caplog.set_level("INFO")
    request_id = await run_request(gateway, "alice@a.example", "cti@a.example",
                                   "to: 03-5555-0101\nfrom: 03-5555-0202\nconfidential: yes\n")
    mail = await result_mail_in_maildir(gateway, request_id, "alice@a.example")
    assert [(c.from_number, c.to_number) for c in placed_calls(gateway)] == [("0355550202", "0355550101")]
    for secret in ("0355550101", "0355550202", "5555"):
        assert secret not in caplog.text
        assert secret not in mail.as_string()
    assert "(confidential)" in mail.get_content()


async def test_ordinary_mail_to_a_person_is_delivered_not_dialled(gateway: Gateway) -> None:
    reply = await submit(gateway.smtp_port, request_mail("alice@a.example", "bob@a.example",
                                                         "Lunch at noon?\n", subject="lunch"))
    assert reply.code == 250
    await wait_stage(gateway.store, reply.queue_id, "delivered")
    assert [m["Subject"] for m in maildir_messages(gateway, "bob@a.example")] == ["lunch"]
    assert placed_calls(gateway) == []


async def test_mail_still_arrives_after_the_maildir_was_removed(gateway: Gateway) -> None:
    """Delivery checks a Maildir's folders once; a Maildir an admin removed since is made again."""
    first = await submit(gateway.smtp_port, request_mail("alice@a.example", "bob@a.example", "one\n", subject="one"))
    await wait_stage(gateway.store, first.queue_id, "delivered")
    shutil.rmtree(maildir_for(gateway.config.mailbox_root, "bob@a.example"))
    second = await submit(gateway.smtp_port, request_mail("alice@a.example", "bob@a.example", "two\n", subject="two"))
    await wait_stage(gateway.store, second.queue_id, "delivered")
    assert [m["Subject"] for m in maildir_messages(gateway, "bob@a.example")] == ["two"]


async def test_mail_a_maildir_cannot_take_now_is_kept_and_delivered_later(gateway: Gateway,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed delivery (here a file where bob's Maildir should be) leaves the mail queued and
    tried again, not dropped."""
    monkeypatch.setattr(dispatch, "MAILBOX_RETRY_SECONDS", 0.2)
    folder = maildir_for(gateway.config.mailbox_root, "bob@a.example")
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("in the way")
    reply = await submit(gateway.smtp_port, request_mail("alice@a.example", "bob@a.example", "hi\n", subject="later"))
    assert reply.code == 250
    await wait_stage(gateway.store, reply.queue_id, "waiting")
    [(state, detail)] = [(row.state, row.detail) for row in [await gateway.store.get_message(reply.queue_id)]]
    assert "mailbox unavailable" in (detail or "") and "FileExistsError" in (detail or ""), (state, detail)
    folder.unlink()
    await wait_stage(gateway.store, reply.queue_id, "delivered")
    assert [m["Subject"] for m in maildir_messages(gateway, "bob@a.example")] == ["later"]


@pytest.mark.parametrize(("recipient", "body", "code", "status", "text", "stage"), [
    ("nobody@a.example", "to: 2001\n", 550, "5.1.1", "no such user here: nobody@a.example", "RCPT"),
    ("someone@elsewhere.example", "to: 2001\n", 550, "5.7.1", "relaying denied", "RCPT"),
    ("cti@a.example", "to: 2001\nmonitor: 5 minutes later\n", 550, "5.6.0",
     "field 'monitor': '5 minutes later' is not a duration", "DATA"),
    ("cti@a.example", "to: 0990123456\n", 550, "5.7.1", "not allowed by policy", "DATA"),
    ("cti@a.example", "to: 2001&Local/9999\n", 550, "5.6.0", "field 'to'", "DATA"),
    ("cti@a.example", "action: cancel\nrequest: nosuch-1\n", 550, "5.6.0",
     "field 'request': nosuch-1 is not a pending camp-on or monitor", "DATA"),
    ("cti@a.example", "to: 2001\ntrigger: on-read\n", 550, "5.3.3",
     "field 'trigger': 'on-read' needs action 'connect' and a person as the recipient", "DATA"),
])
async def test_bad_requests_are_refused_with_a_reason_and_nothing_is_dialled(
        gateway: Gateway, recipient: str, body: str, code: int, status: str, text: str, stage: str) -> None:
    reply = await submit(gateway.smtp_port, request_mail("alice@a.example", recipient, body))
    assert (reply.code, reply.stage) == (code, stage)
    assert reply.text.startswith(status) and text in reply.text, reply
    assert await gateway.store.list_messages() == []
    assert placed_calls(gateway) == []


async def test_too_big_message_is_refused_with_552_5_3_4(make_config, sink: Sink) -> None:
    config = make_config()
    gw = Gateway(replace(config, smtp=replace(config.smtp, max_message_size=4096)))
    await gw.start()
    try:
        reply = await submit(gw.smtp_port, request_mail("alice@a.example", "bob@a.example", "x" * 8000))
        assert (reply.code, reply.stage) == (552, "DATA")
        assert reply.text.startswith("5.3.4") and "4096" in reply.text
        assert await gw.store.list_messages() == []
    finally:
        await gw.stop()


async def test_overlong_line_is_refused_with_an_enhanced_code(gateway: Gateway) -> None:
    raw = (b"From: alice@a.example\r\nTo: bob@a.example\r\nSubject: x\r\n\r\nto: 2001\r\n" + b"y" * 5000 + b"\r\n")
    reply = await submit(gateway.smtp_port, raw, mail_from="alice@a.example", rcpt_to=["bob@a.example"])
    assert (reply.code, reply.stage) == (500, "DATA")
    assert reply.text.startswith("5.6.0 line too long")
    assert await gateway.store.list_messages() == [] and placed_calls(gateway) == []


async def test_rate_limit_refuses_the_request_over_the_limit(make_config, sink: Sink) -> None:
    config = make_config()
    gw = Gateway(replace(config, policy=replace(config.policy, per_sender_per_hour=2)))
    await gw.start()
    try:
        replies = [await submit(gw.smtp_port, request_mail("alice@a.example", "bob@a.example", "dry-run: yes\n"))
                   for _ in range(3)]
        assert [r.code for r in replies] == [250, 250, 550]
        assert replies[2].text.startswith("5.7.1") and "rate limit" in replies[2].text
    finally:
        await gw.stop()


async def test_many_requests_at_once_each_get_their_own_call(gateway: Gateway) -> None:
    replies = await asyncio.gather(*[
        submit(gateway.smtp_port, request_mail("alice@a.example", "cti@a.example",
                                               f"to: 03-5555-000{i}\nfrom: 03-6666-000{i}\n"))
        for i in range(9)])
    ids = [r.queue_id for r in replies]
    for request_id in ids:
        await wait_stage(gateway.store, request_id, "outcome")
    calls = placed_calls(gateway)
    assert len(calls) == 9 and {c.outcome for c in calls} == {"answered"}
    assert sorted(c.to_number for c in calls) == sorted(f"035555000{i}" for i in range(9))
