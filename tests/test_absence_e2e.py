"""Missed-call mail end to end: incoming calls on the simulator (real AMI over TCP), the gateway's
call history, absence mode, and the mail arriving at a real SMTP sink."""

from __future__ import annotations

import asyncio
import email
import email.policy
from dataclasses import replace
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Callable

import yaml

from mailgw.cli import main
from mailgw.config import Config

from .absence_helpers import CallEnds, import_customers, place_incoming, write_directory
from .conftest import Sink, placed_calls, request_mail, running_gateway, submit, wait_stage


def absence_config(make_config: Callable[..., Config], tmp_path: Path, **absence: object) -> Config:
    config = make_config(directory=write_directory(tmp_path))
    return replace(config, absence=replace(config.absence, **absence))


async def set_absent(gw, address: str) -> None:  # noqa: ANN001
    await gw.store.set_absence(address, until=None, note="", source="test")


async def test_known_caller_with_absent_owner_gets_one_mail_with_the_call_details(
        make_config: Callable[..., Config], sink: Sink, tmp_path: Path) -> None:
    async with running_gateway(absence_config(make_config, tmp_path), sink) as gw:
        await import_customers(gw, tmp_path)
        await set_absent(gw, "tanaka@b.example")
        ends = CallEnds(gw)
        earlier = await place_incoming(gw, "0312345678", "2001", answer="2001")  # history: answered by Bob
        await ends.wait(earlier)
        call_id = await place_incoming(gw, '"XX Corp" <+81312345678>', "2000", answer="nobody")
        row, notice = await ends.wait(call_id)
        assert notice is not None and notice.recipient == "tanaka@b.example" and notice.reason == "absent"
        assert row.caller_key == "+81312345678" and row.customer_id is not None
        assert row.rung == ("2000",) and row.answered_by is None and row.ended_at is not None

        mail_from, rcpt_tos, message = await sink.next()
        assert rcpt_tos == ["tanaka@b.example"]
        started = row.started_at.astimezone().strftime("%H:%M")
        assert message["Subject"] == f"Missed call: Yamada Taro (XX Corp) {started}"
        assert message["X-CTI-Call"] == call_id and message["X-CTI-Caller"] == "+81312345678"
        assert message["Auto-Submitted"] == "auto-generated"
        body = message.get_body(("plain",)).get_content()
        assert "tel:+81312345678" in body and "03-1234-5678" in body
        assert row.started_at.astimezone().strftime("%Y-%m-%d %H:%M:%S") in body  # the time of the call
        assert "Importance: A" in body and "1-2-3 Chiyoda, Tokyo" in body and "Fax:        03-1234-5679" in body
        assert "Tanaka Ichiro (2000), nobody answered" in body
        assert "answered by Bob Baker (2001)" in body  # the earlier call, in this caller's history
        assert [n.state for n in await gw.store.notices()] == ["queued"]
        assert sink.received.empty()


async def test_unknown_caller_goes_to_the_representative(make_config: Callable[..., Config], sink: Sink,
                                                         tmp_path: Path) -> None:
    async with running_gateway(absence_config(make_config, tmp_path), sink) as gw:
        await import_customers(gw, tmp_path)
        await set_absent(gw, "tanaka@b.example")
        ends = CallEnds(gw)
        call_id = await place_incoming(gw, "0455556666", "2000", answer="nobody")
        _, notice = await ends.wait(call_id)
        assert notice is not None and notice.recipient == "desk@b.example"
        _, rcpt_tos, message = await sink.next()
        assert rcpt_tos == ["desk@b.example"]
        assert message["Subject"].startswith("Missed call: 045-555-6666 ")
        assert "tel:+81455556666" in message.get_body(("plain",)).get_content()


async def test_withheld_number_goes_to_the_representative(make_config: Callable[..., Config], sink: Sink,
                                                          tmp_path: Path) -> None:
    async with running_gateway(absence_config(make_config, tmp_path), sink) as gw:
        await set_absent(gw, "tanaka@b.example")
        ends = CallEnds(gw)
        call_id = await place_incoming(gw, None, "2000", answer="nobody")
        row, notice = await ends.wait(call_id)
        assert row.caller is None and notice is not None and notice.recipient == "desk@b.example"
        _, rcpt_tos, message = await sink.next()
        assert rcpt_tos == ["desk@b.example"] and message["X-CTI-Caller"] == "withheld"
        assert message["Subject"].startswith("Missed call: withheld number ")
        body = message.get_body(("plain",)).get_content()
        assert "withheld by the caller" in body and "tel:" not in body


async def test_a_colleague_answering_means_no_mail(make_config: Callable[..., Config], sink: Sink,
                                                   tmp_path: Path) -> None:
    async with running_gateway(absence_config(make_config, tmp_path, notify_unanswered=True), sink) as gw:
        await import_customers(gw, tmp_path)
        await set_absent(gw, "tanaka@b.example")
        ends = CallEnds(gw)
        call_id = await place_incoming(gw, "0312345678", "2001", answer="2001")
        row, notice = await ends.wait(call_id)
        assert row.answered_by == "2001" and notice is None
        assert await gw.store.notices() == []


async def test_ring_group_answered_by_one_member_means_no_mail(make_config: Callable[..., Config], sink: Sink,
                                                               tmp_path: Path) -> None:
    async with running_gateway(absence_config(make_config, tmp_path), sink) as gw:
        await import_customers(gw, tmp_path)
        for address in ("tanaka@b.example", "bob@b.example"):
            await set_absent(gw, address)
        ends = CallEnds(gw)
        call_id = await place_incoming(gw, "0312345678", "2000&2001&2002", answer="2002")
        row, notice = await ends.wait(call_id)
        assert row.rung == ("2000", "2001", "2002") and row.answered_by == "2002" and notice is None
        assert await gw.store.notices() == []


async def test_unanswered_ring_group_gives_one_mail_not_one_per_member(
        make_config: Callable[..., Config], sink: Sink, tmp_path: Path) -> None:
    async with running_gateway(absence_config(make_config, tmp_path), sink) as gw:
        await import_customers(gw, tmp_path)
        for address in ("tanaka@b.example", "bob@b.example", "yamada@b.example"):
            await set_absent(gw, address)
        ends = CallEnds(gw)
        call_id = await place_incoming(gw, "0312345678", "2000&2001&2002", answer="nobody")
        _, notice = await ends.wait(call_id)
        assert notice is not None and notice.recipient == "tanaka@b.example"
        _, rcpt_tos, _ = await sink.next()
        assert rcpt_tos == ["tanaka@b.example"]
        assert len(await gw.store.notices()) == 1


async def test_nobody_absent_means_no_mail_unless_notify_unanswered(
        make_config: Callable[..., Config], sink: Sink, tmp_path: Path) -> None:
    async with running_gateway(absence_config(make_config, tmp_path), sink) as gw:
        await import_customers(gw, tmp_path)
        ends = CallEnds(gw)
        _, notice = await ends.wait(await place_incoming(gw, "0312345678", "2000", answer="nobody"))
        assert notice is None
        # Absent until a time already past: not absent any more.
        await gw.store.set_absence("tanaka@b.example", until=datetime(2000, 1, 1, tzinfo=UTC), note="", source="t")
        _, notice = await ends.wait(await place_incoming(gw, "0312345678", "2000", answer="nobody"))
        assert notice is None and await gw.store.notices() == []
    async with running_gateway(absence_config(make_config, tmp_path, notify_unanswered=True), sink) as gw:
        ends = CallEnds(gw)
        _, notice = await ends.wait(await place_incoming(gw, "0312345678", "2000", answer="nobody"))
        assert notice is not None and notice.reason == "unanswered" and notice.recipient == "tanaka@b.example"
        _, _, message = await sink.next()
        assert "nobody answered" in message.get_body(("plain",)).get_content()


async def test_japanese_mail_is_utf8_and_reads_back_in_a_mail_parser(
        make_config: Callable[..., Config], sink: Sink, tmp_path: Path) -> None:
    async with running_gateway(absence_config(make_config, tmp_path), sink) as gw:
        await import_customers(gw, tmp_path)
        await set_absent(gw, "yamada@b.example")
        ends = CallEnds(gw)
        call_id = await place_incoming(gw, "0611112222", "2002", answer="nobody")
        row, notice = await ends.wait(call_id)
        assert notice is not None and notice.recipient == "yamada@b.example" and notice.language == "ja", row
        _, _, received = await sink.next()
        raw = received.as_bytes()
        assert b"ISO-2022-JP" not in raw.upper()
        parsed = email.message_from_bytes(raw, policy=email.policy.default)  # what a mail program sees
        started = row.started_at.astimezone().strftime("%H:%M")
        assert parsed["Subject"] == f"不在着信: 鈴木 花子（ＹＹ商事） {started}"
        part = parsed.get_body(("plain",))
        assert part.get_content_charset() == "utf-8"
        body = part.get_content()
        assert "不在時に電話がありました。" in body and "tel:+81611112222" in body and "06-1111-2222" in body
        assert "ご担当:   鈴木 花子 様" in body and "大阪市北区" in body


async def test_memo_on_an_answered_call_is_mailed_to_the_person_in_charge(
        make_config: Callable[..., Config], sink: Sink, tmp_path: Path) -> None:
    config = absence_config(make_config, tmp_path, poll_interval=0.05)
    cli_config = tmp_path / "gateway.yaml"  # what `mailgw memo` reads: the same store and directory
    cli_config.write_text(yaml.safe_dump({"data_dir": str(config.data_dir), "directory": str(config.directory)}))
    async with running_gateway(config, sink) as gw:
        await import_customers(gw, tmp_path)
        ends = CallEnds(gw)
        call_id = await place_incoming(gw, "0312345678", "2001", answer="2001")
        _, notice = await ends.wait(call_id)
        assert notice is None  # Bob answered: no automatic mail
        args = ["memo", "last", "--phrase", "1", "--text", "About the invoice.", "--config", str(cli_config)]
        assert await asyncio.to_thread(main, args) == 0
        assert await asyncio.to_thread(main, args) == 1  # one memo per call
        assert await asyncio.to_thread(main, ["memo", "last", "--phrase", "9", "--config", str(cli_config)]) == 65
        _, rcpt_tos, message = await sink.next()
        assert rcpt_tos == ["tanaka@b.example"] and message["X-CTI-Call"] == call_id
        assert message["Subject"].startswith("Call memo: Yamada Taro (XX Corp) ")
        body = message.get_body(("plain",)).get_content().replace("\r\n", "\n")
        assert body.startswith("Please call the customer back.\nAbout the invoice.\n")
        assert "(taken by Bob Baker (2001))" in body and "nobody answered" not in body
        assert [(n.kind, n.state) for n in await gw.store.notices()] == [("memo", "queued")]


async def test_digest_by_count_sends_one_mail_for_every_n_missed_calls(
        make_config: Callable[..., Config], sink: Sink, tmp_path: Path) -> None:
    config = absence_config(make_config, tmp_path, digests=(("tanaka@b.example", 2, None),))
    async with running_gateway(config, sink) as gw:
        await import_customers(gw, tmp_path)
        await set_absent(gw, "tanaka@b.example")
        ends = CallEnds(gw)
        first = await place_incoming(gw, "0312345678", "2000", answer="nobody")
        await ends.wait(first)
        assert [n.state for n in await gw.store.notices()] == ["pending"]  # waits for a second call
        second = await place_incoming(gw, None, "2000", answer="nobody")  # withheld: the representative's
        third = await place_incoming(gw, "0312345679", "2000", answer="nobody")  # XX Corp's fax line
        await ends.wait(second)
        await ends.wait(third)
        mails = {tuple(rcpt_tos): message for _, rcpt_tos, message in [await sink.next(), await sink.next()]}
        assert set(mails) == {("desk@b.example",), ("tanaka@b.example",)}
        assert mails[("desk@b.example",)]["X-CTI-Call"] == second  # the desk has no digest preference
        digest = mails[("tanaka@b.example",)]
        assert digest["X-CTI-Calls"] == f"{first}, {third}"
        assert digest["Subject"].startswith("Missed calls: 2 (")
        body = digest.get_body(("plain",)).get_content()
        assert "1. " in body and "2. " in body and body.count("Yamada Taro (XX Corp)") == 2
        assert "tel:+81312345678" in body and "tel:+81312345679" in body
        assert {n.state for n in await gw.store.notices()} == {"queued"}


async def test_digest_by_period_sends_what_has_waited_long_enough(
        make_config: Callable[..., Config], sink: Sink, tmp_path: Path) -> None:
    config = absence_config(make_config, tmp_path, digests=(("tanaka@b.example", 10, 0.3),))
    async with running_gateway(config, sink) as gw:
        await import_customers(gw, tmp_path)
        await set_absent(gw, "tanaka@b.example")
        ends = CallEnds(gw)
        call_id = await place_incoming(gw, "0312345678", "2000", answer="nobody")
        _, notice = await ends.wait(call_id)
        assert notice is not None
        _, rcpt_tos, digest = await sink.next()  # one call of ten, sent once 0.3 s have passed
        assert rcpt_tos == ["tanaka@b.example"] and digest["X-CTI-Calls"] == call_id
        assert digest["Subject"].startswith("Missed calls: 1 (")


async def test_do_not_disturb_on_the_phone_counts_as_absent(make_config: Callable[..., Config], sink: Sink,
                                                            tmp_path: Path) -> None:
    async with running_gateway(absence_config(make_config, tmp_path), sink) as gw:
        await import_customers(gw, tmp_path)
        assert gw.pbx is not None
        reply = await gw.pbx.client.action("SimPhone", Phone="2000", Behaviour="dnd")  # Tanaka presses DND
        assert reply.ok, reply
        assert await gw.pbx.dnd("2000") and not await gw.pbx.dnd("2001")  # AstDB DND/2000, over AMI
        ends = CallEnds(gw)
        call_id = await place_incoming(gw, "0312345678", "2000")
        _, notice = await ends.wait(call_id)
        assert notice is not None and notice.recipient == "tanaka@b.example" and notice.reason == "absent"
        _, rcpt_tos, message = await sink.next()
        assert rcpt_tos == ["tanaka@b.example"] and message["X-CTI-Call"] == call_id
        assert (await gw.pbx.client.action("SimPhone", Phone="2000", Behaviour="no-answer")).ok  # DND off
        _, notice = await ends.wait(await place_incoming(gw, "0312345678", "2000"))
        assert notice is None


async def test_absent_and_back_by_mail_to_the_service_mailbox(make_config: Callable[..., Config], sink: Sink,
                                                              tmp_path: Path) -> None:
    async with running_gateway(absence_config(make_config, tmp_path), sink) as gw:
        reply = await submit(gw.smtp_port, request_mail("tanaka@b.example", "cti@a.example", "absent until 18:00\n"))
        assert reply.code == 250, reply
        [(address, _, until, _, source)] = await gw.store.absences()
        assert (address, source) == ("tanaka@b.example", "mail") and until is not None
        assert until.astimezone().strftime("%H:%M") == "18:00"
        _, rcpt_tos, confirmation = await sink.next()
        assert rcpt_tos == ["tanaka@b.example"]
        assert confirmation["Subject"].startswith("Absence mode on until ") and confirmation["Subject"].endswith("18:00")

        reply = await submit(gw.smtp_port, request_mail("yamada@b.example", "cti@a.example", "ｆｕｚａｉ\n不在　２ｈ\n"))
        assert reply.code == 550 and "5.6.0" in reply.text  # "fuzai" is not a command: no request either
        reply = await submit(gw.smtp_port, request_mail("yamada@b.example", "cti@a.example", "不在 2h\n"))
        assert reply.code == 250, reply
        _, rcpt_tos, confirmation = await sink.next()
        assert rcpt_tos == ["yamada@b.example"] and confirmation["Subject"].startswith("不在モード開始（")
        reply = await submit(gw.smtp_port, request_mail("stranger@c.example", "cti@a.example", "absent\n"))
        assert reply.code == 550 and "only people in the directory" in reply.text
        reply = await submit(gw.smtp_port, request_mail("tanaka@b.example", "cti@a.example", "absent until noon\n"))
        assert reply.code == 550 and "5.6.0" in reply.text

        reply = await submit(gw.smtp_port, request_mail("tanaka@b.example", "cti@a.example", "back\n"))
        assert reply.code == 250, reply
        assert [a[0] for a in await gw.store.absences()] == ["yamada@b.example"]
        _, _, confirmation = await sink.next()
        assert confirmation["Subject"] == "Absence mode off: welcome back"


async def test_absence_by_mail_needs_a_known_sender(make_config: Callable[..., Config], sink: Sink,
                                                    tmp_path: Path) -> None:
    config = absence_config(make_config, tmp_path)
    config = replace(config, security=replace(config.security, trusted_networks=()))  # loopback is no proof
    async with running_gateway(config, sink) as gw:
        reply = await submit(gw.smtp_port, request_mail("tanaka@b.example", "cti@a.example", "absent\n"))
        assert reply.code == 550 and "5.7.1" in reply.text and "SMTP AUTH" in reply.text
        assert await gw.store.absences() == []


async def test_reply_call_to_a_missed_call_mail_connects_the_person_with_the_caller(
        make_config: Callable[..., Config], sink: Sink, tmp_path: Path) -> None:
    async with running_gateway(absence_config(make_config, tmp_path), sink) as gw:
        await import_customers(gw, tmp_path)
        await set_absent(gw, "tanaka@b.example")
        ends = CallEnds(gw)
        call_id = await place_incoming(gw, "0312345678", "2000", answer="nobody")
        await ends.wait(call_id)
        _, _, missed = await sink.next()
        assert missed["Message-ID"].startswith(f"<missed-81312345678-{call_id}-")

        def reply(body: str, sender: str = "tanaka@b.example") -> EmailMessage:
            message = request_mail(sender, gw.config.sender_address, body + "\n\n> " + missed["Subject"],
                                   subject="Re: " + missed["Subject"])
            message["In-Reply-To"] = missed["Message-ID"]
            return message

        refused = await submit(gw.smtp_port, reply("thanks"))
        assert refused.code == 550 and "write only the word 'call'" in refused.text
        accepted = await submit(gw.smtp_port, reply("call"))
        assert accepted.code == 250, accepted
        outcome = await wait_stage(gw.store, accepted.queue_id, "outcome")
        assert outcome.startswith("answered"), outcome
        placed = [c for c in placed_calls(gw) if c.direction != "incoming"]
        assert [(c.from_number, c.to_number) for c in placed] == [("2000", "0312345678")]  # Tanaka, then the caller
        _, rcpt_tos, result = await sink.next()
        assert rcpt_tos == ["tanaka@b.example"] and result["X-CTI-Outcome"] == "answered"


async def test_reply_call_to_a_withheld_callers_mail_is_refused(make_config: Callable[..., Config], sink: Sink,
                                                                tmp_path: Path) -> None:
    async with running_gateway(absence_config(make_config, tmp_path), sink) as gw:
        await set_absent(gw, "tanaka@b.example")
        ends = CallEnds(gw)
        await ends.wait(await place_incoming(gw, None, "2000", answer="nobody"))
        _, _, missed = await sink.next()
        message = request_mail("desk@b.example", gw.config.sender_address, "call\n", subject="Re: missed")
        message["In-Reply-To"] = missed["Message-ID"]
        refused = await submit(gw.smtp_port, message)
        assert refused.code == 550 and "withheld their number" in refused.text
