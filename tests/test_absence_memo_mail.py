"""Memos by mail, over real SMTP: the colleague who took a call writes "memo 1 3 ..." to the service
mailbox, or replies "memo ..." to the gateway's mail about a call; the person in charge gets the
memo mail; bad phrase numbers, unknown calls, strangers are refused at DATA saying why."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from mailgw.config import Config

from .absence_helpers import CallEnds, import_customers, missed_call, place_incoming
from .conftest import Sink, request_mail, running_gateway, submit
from .test_absence_e2e import absence_config


async def test_memo_to_the_service_mailbox_goes_to_the_person_in_charge(
        make_config: Callable[..., Config], sink: Sink, tmp_path: Path) -> None:
    async with running_gateway(absence_config(make_config, tmp_path), sink) as gw:
        await import_customers(gw, tmp_path)
        ends = CallEnds(gw)
        call_id = await place_incoming(gw, "0312345678", "2001", answer="2001")  # Bob takes XX Corp's call
        _, notice = await ends.wait(call_id)
        assert notice is None

        memo = "memo 1 3 About the invoice.\nThey will send it again on Monday.\n\n-- \nBob\n"
        reply = await submit(gw.smtp_port, request_mail("bob@b.example", "cti@a.example", memo, subject="memo"))
        assert reply.code == 250, reply
        _, rcpt_tos, message = await sink.next()
        assert rcpt_tos == ["tanaka@b.example"] and message["X-CTI-Call"] == call_id
        assert message["Subject"].startswith("Call memo: Yamada Taro (XX Corp) ")
        body = message.get_body(("plain",)).get_content().replace("\r\n", "\n")
        assert body.startswith("Please call the customer back.\nThe customer will call again.\n"
                               "About the invoice.\nThey will send it again on Monday.\n-- Bob Baker\n"), body
        assert "(taken by Bob Baker (2001))" in body
        assert [(n.kind, n.call_id, n.state) for n in await gw.store.notices()] == [("memo", call_id, "queued")]

        # The same memo again (an MTA retrying after a 451 it got once the memo was stored) is
        # taken, and not sent a second time; a different one is refused.
        resent = await submit(gw.smtp_port, request_mail("bob@b.example", "cti@a.example", memo, subject="memo"))
        assert resent.code == 250, resent
        assert [(n.kind, n.call_id) for n in await gw.store.notices()] == [("memo", call_id)]
        again = await submit(gw.smtp_port, request_mail("bob@b.example", "cti@a.example", "memo 2\n"))
        assert again.code == 550 and "5.6.0" in again.text and "already has a memo" in again.text
        again = await submit(gw.smtp_port, request_mail("bob@b.example", "cti@a.example", "memo 7\n"))
        assert again.code == 550 and "there is no phrase 7" in again.text  # the mistake is named first

        # Japanese: the phrases come in the recipient's language; full-width digits count.
        other = await place_incoming(gw, "0611112222", "2001", answer="2001")  # YY Shoji, 山田's customer
        await ends.wait(other)
        reply = await submit(gw.smtp_port, request_mail("bob@b.example", "cti@a.example", "メモ　２\n"))
        assert reply.code == 250, reply
        _, rcpt_tos, message = await sink.next()
        assert rcpt_tos == ["yamada@b.example"] and message["Subject"].startswith("伝言メモ: 鈴木 花子（ＹＹ商事） ")
        assert message.get_body(("plain",)).get_content().startswith("会社に電話してください。\n-- Bob Baker")


async def test_bad_memos_are_refused_saying_why(make_config: Callable[..., Config], sink: Sink,
                                                tmp_path: Path) -> None:
    async with running_gateway(absence_config(make_config, tmp_path), sink) as gw:
        await import_customers(gw, tmp_path)
        ends = CallEnds(gw)
        await ends.wait(await place_incoming(gw, "0312345678", "2001", answer="2001"))

        async def memo(sender: str, body: str):  # noqa: ANN202
            return await submit(gw.smtp_port, request_mail(sender, "cti@a.example", body))

        refused = await memo("bob@b.example", "memo 9\n")
        assert refused.code == 550 and "5.6.0" in refused.text and "there is no phrase 9; the phrases are 1-4" in refused.text
        refused = await memo("bob@b.example", "memo\n")
        assert refused.code == 550 and "the memo is empty" in refused.text
        refused = await memo("dave@b.example", "memo 1\n")  # Dave answered no call
        assert refused.code == 550 and "5.6.0" in refused.text and "answered no incoming call" in refused.text
        refused = await memo("stranger@c.example", "memo 1\n")
        assert refused.code == 550 and "5.7.1" in refused.text
        assert await gw.store.notices() == []
    config = absence_config(make_config, tmp_path)
    config = replace(config, security=replace(config.security, trusted_networks=()))  # loopback is no proof
    async with running_gateway(config, sink) as gw:
        refused = await submit(gw.smtp_port, request_mail("bob@b.example", "cti@a.example", "memo 1\n"))
        assert refused.code == 550 and "5.7.1" in refused.text and "SMTP AUTH" in refused.text


async def test_memo_in_reply_to_a_missed_call_mail(make_config: Callable[..., Config], sink: Sink,
                                                   tmp_path: Path) -> None:
    async with running_gateway(absence_config(make_config, tmp_path), sink) as gw:
        call_id = await missed_call(gw, tmp_path)
        _, _, missed = await sink.next()

        def reply(body: str, in_reply_to: str):  # noqa: ANN202
            message = request_mail("bob@b.example", gw.config.sender_address, body, subject="Re: " + missed["Subject"])
            message["In-Reply-To"] = in_reply_to
            return message

        quoted = "memo 4 I spoke to them already.\n\nOn Thu, Tanaka wrote:\n> You had a call while you were away.\n"
        accepted = await submit(gw.smtp_port, reply(quoted, missed["Message-ID"]))
        assert accepted.code == 250, accepted
        _, rcpt_tos, message = await sink.next()
        assert rcpt_tos == ["tanaka@b.example"] and message["X-CTI-Call"] == call_id
        body = message.get_body(("plain",)).get_content().replace("\r\n", "\n")
        assert body.startswith("No need to call back.\nI spoke to them already.\n-- Bob Baker\n"), body
        assert "wrote:" not in body and "> You had" not in body

        forged = "<missed-81312345678-999.9-deadbeef@a.example>"
        refused = await submit(gw.smtp_port, reply("memo 1\n", forged))
        assert refused.code == 550 and "call 999.9 is not in the call history" in refused.text
