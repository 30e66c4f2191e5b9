"""Scenarios carried out end to end: real SMTP in, real AMI to the simulator (which records what each
phone heard and each fax received), the inquiry mail and its reply through real SMTP, one summary
mail to the sender. Seed 004, FIG. 42 and FIG. 43, and each step type."""

from __future__ import annotations

import asyncio
import base64
import email.header
from email.message import EmailMessage
from pathlib import Path
from typing import Callable

from mailgw import mailbox
from mailgw.config import Config
from mailgw.gateway import Gateway
from mailgw.inquiry import answer_token
from mailgw.scenario_run import INTERRUPTED

from .conftest import Sink, maildir_messages, placed_calls, request_mail, running_gateway, submit, wait_stage

MEDIA = Path(__file__).parent.parent / "media"
VOICE = (MEDIA / "sample-voice.wav").read_bytes()
FAX_PAGE = (MEDIA / "sample-fax-page.png").read_bytes()


def scenario_mail(fields: str, *, voice: bool = True, fax: bool = False, sender: str = "alice@a.example",
                  to: str = "bob@a.example") -> EmailMessage:
    """A request whose part 2 is the YAML part (fields and/or scenario), then voice / FAX parts:
    the layout of FIG. 42 ("message 3" is the voice) and FIG. 43 (voice 2... see the tests)."""
    message = request_mail(sender, to, "Please see the attachments.")
    message.add_attachment(fields.encode(), maintype="application", subtype="x-cti+yaml", filename="request.yaml")
    if voice:
        message.add_attachment(VOICE, maintype="audio", subtype="wav", filename="memo.wav")
    if fax:
        message.add_attachment(FAX_PAGE, maintype="image", subtype="png", filename="page.png")
    return message


async def mail_in(gateway: Gateway, request_id: str, address: str, wanted: Callable[[EmailMessage], bool],
                  timeout: float = 15.0) -> EmailMessage:
    """The first mail about ``request_id`` in ``address``'s Maildir that ``wanted`` accepts, awaited
    through the store's 'notified' stages (one per mail sent), never by sleeping."""
    async with asyncio.timeout(timeout):
        sent = 0
        while True:
            for message in maildir_messages(gateway, address):
                if message["X-CTI-Request"] == request_id and wanted(message):
                    return message
            sent += 1
            await wait_stage(gateway.store, request_id, "notified", timeout, count=sent)


def is_inquiry(message: EmailMessage) -> bool:
    return message["Reply-To"] is not None


def outcome(name: str) -> Callable[[EmailMessage], bool]:
    return lambda message: message["X-CTI-Outcome"] == name


async def answer(gateway: Gateway, inquiry: EmailMessage, text: str, *, sender: str = "bob@a.example") -> int:
    reply = request_mail(sender, str(inquiry["Reply-To"]), f"{text}\n\n> {inquiry['Subject']}",
                         subject=f"Re: {inquiry['Subject']}", headers={"In-Reply-To": str(inquiry["Message-ID"])})
    result = await submit(gateway.smtp_port, reply)
    return result.code


def heard(gateway: Gateway) -> list[tuple[str, str]]:
    assert gateway.simulator is not None
    return [(r.kind, r.number) for r in gateway.simulator.media_log]


async def test_fig42_plays_voice_message_3_asks_by_mail_then_connects(gateway: Gateway) -> None:
    reply = await submit(gateway.smtp_port, scenario_mail("from: '2000'\nscenario: fig42\n"))
    assert reply.code == 250, reply
    request_id = reply.queue_id
    inquiry = await mail_in(gateway, request_id, "bob@a.example", is_inquiry)
    # Before the answer: the voice message was played to bob's phone, nobody was connected yet.
    assert heard(gateway) == [("heard", "2001")]
    assert [c for c in placed_calls(gateway) if c.to_number] == []
    assert answer_token(str(inquiry["Reply-To"]), gateway.config.sender_address) is not None
    assert "alice@a.example left you a voice message. Connect Alice Archer (2000) now?" in inquiry.get_content()
    assert await answer(gateway, inquiry, "OK") == 250
    summary = await mail_in(gateway, request_id, "alice@a.example", outcome("completed"))
    body = summary.get_content()
    assert "1. play: answered" in body and "2. confirm: yes" in body and "3. connect: answered" in body, body
    connected = [c for c in placed_calls(gateway) if c.to_number]
    assert [(c.from_number, c.to_number) for c in connected] == [("2000", "2001")]


def fig43_mail(fields: str = "from: 2000\nscenario: fig43\n") -> EmailMessage:
    """FIG. 43's mail: the fields in the text (part 1), voice message 2 and FAX message 3."""
    message = request_mail("alice@a.example", "bob@a.example", fields)
    message.add_attachment(VOICE, maintype="audio", subtype="wav", filename="memo.wav")
    message.add_attachment(FAX_PAGE, maintype="image", subtype="png", filename="page.png")
    return message


async def test_fig43_voice_and_fax_at_once_then_ng_stops_before_connecting(gateway: Gateway) -> None:
    reply = await submit(gateway.smtp_port, fig43_mail())
    assert reply.code == 250, reply
    inquiry = await mail_in(gateway, reply.queue_id, "bob@a.example", is_inquiry)
    # Both went out before the question: the voice to bob's phone, the FAX to bob's fax machine.
    assert sorted(heard(gateway)) == [("fax-received", "2009"), ("heard", "2001")]
    fax = next(r for r in gateway.simulator.media_log if r.kind == "fax-received")  # type: ignore[union-attr]
    assert fax.pages == 1
    plays = [c for c in placed_calls(gateway) if c.application in ("Playback", "SendFAX")]
    overlap = max(c.started_at for c in plays) < min(c.ended_at or 1e18 for c in plays)
    assert len(plays) == 2 and overlap, [(c.application, c.started_at, c.from_answered_at, c.ended_at) for c in plays]
    assert await answer(gateway, inquiry, "NG") == 250
    summary = await mail_in(gateway, reply.queue_id, "alice@a.example", outcome("declined"))
    assert summary["X-CTI-Status"] == "5.0.0"
    body = summary.get_content()
    assert "stopped" in str(summary["Subject"]) and "the recipient answered NG" in body, body
    assert "1.b2.1. fax: answered - the fax of Bob Baker (2009) received 1 of 1 page" in body
    assert [c for c in placed_calls(gateway) if c.to_number] == []  # not connected


async def test_answer_from_someone_else_is_ignored_and_a_wrong_word_is_refused(gateway: Gateway) -> None:
    reply = await submit(gateway.smtp_port, scenario_mail("from: '2000'\nscenario: fig42\n"))
    inquiry = await mail_in(gateway, reply.queue_id, "bob@a.example", is_inquiry)
    refused = await submit(gateway.smtp_port, request_mail("bob@a.example", str(inquiry["Reply-To"]), "maybe later"))
    assert (refused.code, refused.text) == (550, "5.6.0 reply not understood: write OK at the top of your reply to "
                                                 "go ahead, or NG to decline")
    assert await answer(gateway, inquiry, "OK", sender="carol@a.example") == 250  # not the person asked
    ignored = await wait_stage_detail(gateway, "answer")
    assert "ignored: the inquiry was sent to bob@a.example" in ignored
    assert await answer(gateway, inquiry, "はい") == 250
    summary = await mail_in(gateway, reply.queue_id, "alice@a.example", outcome("completed"))
    assert "confirm: yes" in summary.get_content()
    assert len([c for c in placed_calls(gateway) if c.to_number]) == 1


async def wait_stage_detail(gateway: Gateway, stage: str) -> str:
    """The detail of the first ``stage`` recorded for any mail the gateway stored (answers are mails)."""
    async with asyncio.timeout(10):
        while True:
            for row in await gateway.store.list_messages():
                for _, recorded, detail in await gateway.store.stages(row.id):
                    if recorded == stage:
                        return detail
            await asyncio.sleep(0.02)


INLINE_PHONE = """\
to: '2001'
from: '2000'
scenario:
  steps:
    - confirm:
        ask: "Connect {{ from }}?"
        via: phone
        timeout: 5s
    - connect
"""


async def test_confirm_by_phone_reads_the_key_then_connects(gateway: Gateway) -> None:
    reply = await submit(gateway.smtp_port, scenario_mail(INLINE_PHONE, voice=False, to="cti@a.example"))
    assert reply.code == 250, reply
    summary = await mail_in(gateway, reply.queue_id, "alice@a.example", outcome("completed"))
    assert "1. confirm: yes - Bob Baker (2001) pressed 1 (yes)" in summary.get_content()
    asked = [c for c in placed_calls(gateway) if c.application == "Read"]
    assert [c.from_number for c in asked] == ["2001"]
    assert [(c.from_number, c.to_number) for c in placed_calls(gateway) if c.to_number] == [("2000", "2001")]


BUSY_BRANCH = """\
to: '2003'
from: '2000'
scenario:
  steps:
    - play: voice
      on-failure: retry 2
      on:
        busy:
          - notify: "{{ to }} was busy; the voice message was not played."
    - wait: 1s
    - notify: {to: sender, text: "Finished for {{ to }}."}
"""


async def test_busy_branch_runs_after_the_retries_and_notes_reach_the_sender(gateway: Gateway) -> None:
    reply = await submit(gateway.smtp_port, scenario_mail(BUSY_BRANCH, to="cti@a.example"))
    assert reply.code == 250, reply
    summary = await mail_in(gateway, reply.queue_id, "alice@a.example", outcome("completed"))
    body = summary.get_content()
    assert "1. play: busy - Carol Chen (2003) was busy (cause 17) (after 3 attempts)" in body, body
    assert "1.B.1. notify: done" in body and "2. wait: done" in body and "3. notify: done" in body
    plays = [c for c in placed_calls(gateway) if c.application == "Playback"]
    assert len(plays) == 3  # the first try and two retries
    notes = [m for m in maildir_messages(gateway, "alice@a.example")
             if m["X-CTI-Request"] == reply.queue_id and m["X-CTI-Outcome"] is None]
    assert sorted(m.get_content().splitlines()[0] for m in notes) == [
        "Carol Chen (2003) was busy; the voice message was not played.", "Finished for Carol Chen (2003)."]


async def test_no_answer_to_the_inquiry_ends_unconfirmed(gateway: Gateway) -> None:
    fields = ("to: '2001'\nfrom: '2000'\nscenario:\n  steps:\n    - confirm: {ask: 'Now?', timeout: 1s}\n"
              "    - connect\n")
    reply = await submit(gateway.smtp_port, scenario_mail(fields, voice=False, to="cti@a.example"))
    summary = await mail_in(gateway, reply.queue_id, "alice@a.example", outcome("unconfirmed"))
    assert summary["X-CTI-Status"] == "4.4.7"
    assert "no answer to the inquiry" in summary.get_content()
    assert [c for c in placed_calls(gateway) if c.to_number] == []


# --- restarts: done steps are not repeated, waits and inquiries go on, no call is placed twice -----

async def test_restart_during_a_call_step_does_not_dial_it_again(make_config: Callable[..., Config],
                                                                  sink: Sink) -> None:
    config = make_config()
    fields = "to: '2004'\nfrom: '2000'\nscenario:\n  steps:\n    - play: voice\n      on-failure: retry 2\n"
    async with running_gateway(config, sink) as first:
        reply = await submit(first.smtp_port, scenario_mail(fields, to="cti@a.example"))
        assert reply.code == 250, reply
        await wait_stage(first.store, reply.queue_id, "executing")  # the call row is written, the phone rings
    async with running_gateway(config, sink) as second:
        summary = await mail_in(second, reply.queue_id, "alice@a.example", outcome("failed"))
        assert "1. play: failed - " + INTERRUPTED in summary.get_content()
        assert placed_calls(second) == []  # not rung again, not retried


async def test_restart_while_waiting_for_the_answer_keeps_waiting(make_config: Callable[..., Config],
                                                                  sink: Sink) -> None:
    config = make_config()
    async with running_gateway(config, sink) as first:
        reply = await submit(first.smtp_port, scenario_mail("from: '2000'\nscenario: fig42\n"))
        inquiry = await mail_in(first, reply.queue_id, "bob@a.example", is_inquiry)
        assert heard(first) == [("heard", "2001")]
    async with running_gateway(config, sink) as second:
        assert await answer(second, inquiry, "OK") == 250
        summary = await mail_in(second, reply.queue_id, "alice@a.example", outcome("completed"))
        assert "1. play: answered" in summary.get_content()
        assert heard(second) == []  # the voice message was not played again
        assert [(c.from_number, c.to_number) for c in placed_calls(second) if c.to_number] == [("2000", "2001")]
        inquiries = [m for m in maildir_messages(second, "bob@a.example") if is_inquiry(m)]
        assert len(inquiries) == 1  # asked once


async def test_dry_run_lists_the_scenario_steps(gateway: Gateway) -> None:
    reply = await submit(gateway.smtp_port, scenario_mail("from: '2000'\nscenario: fig42\ndry-run: yes\n"))
    summary = await mail_in(gateway, reply.queue_id, "alice@a.example", outcome("dry-run"))
    body = summary.get_content()
    assert "1. play message 3 to Bob Baker (2001)" in body, body
    assert "2. ask Bob Baker (2001) by mail" in body and "3. connect Alice Archer (2000) and Bob Baker (2001)" in body
    assert placed_calls(gateway) == []


async def test_on_read_the_scenario_runs_when_the_recipient_reads_the_mail(gateway: Gateway) -> None:
    fields = "trigger: on-read\nfrom: '2000'\nscenario:\n  steps:\n    - play: voice\n    - connect\n"
    reply = await submit(gateway.smtp_port, scenario_mail(fields))
    assert reply.code == 250, reply
    await wait_stage(gateway.store, reply.queue_id, "awaiting-read")
    [delivered] = mailbox.list_mail(gateway.config.mailbox_root, "bob@a.example")
    note = str(email.header.make_header(email.header.decode_header(delivered.message()["X-CTI-On-Read"])))
    assert note == "Opening this message will play you a voice message, then connect you with Alice Archer (2000)"
    assert placed_calls(gateway) == []
    mailbox.mark_seen(delivered)
    summary = await mail_in(gateway, reply.queue_id, "alice@a.example", outcome("completed"))
    assert "1. play: answered" in summary.get_content() and "2. connect: answered" in summary.get_content()
    assert heard(gateway) == [("heard", "2001")]


async def test_a_japanese_reader_is_asked_in_japanese_and_answers_hai(gateway: Gateway) -> None:
    reply = await submit(gateway.smtp_port, scenario_mail("from: '2000'\nscenario: fig42\n", to="yamada@a.example"))
    assert reply.code == 250, reply
    inquiry = await mail_in(gateway, reply.queue_id, "yamada@a.example", is_inquiry)
    assert str(inquiry["Subject"]).startswith("OK / NG でご返信ください")  # decoded from RFC 2047 by the parser
    assert inquiry.get_content_charset() == "utf-8" and "「はい」" in inquiry.get_content()
    assert await answer(gateway, inquiry, "はい", sender="yamada@a.example") == 250
    summary = await mail_in(gateway, reply.queue_id, "alice@a.example", outcome("completed"))
    assert "2. confirm: yes" in summary.get_content()


def documented_example(heading: str) -> bytes:
    """The mail under ``heading`` in docs/request-format.md, as a user would copy it."""
    text = (Path(__file__).parent.parent / "docs" / "request-format.md").read_text(encoding="utf-8")
    block = text.split(heading, 1)[1].split("```", 2)[1]
    return block.lstrip("\n").replace("\n", "\r\n").encode("utf-8")


async def test_the_documented_inline_scenario_runs_once_it_has_a_real_recording(gateway: Gateway) -> None:
    example = documented_example("### (c) A YAML part, with an inline scenario")
    reply = await submit(gateway.smtp_port, example, mail_from="alice@a.example",
                         rcpt_to=["bob@a.example"])
    assert (reply.code, reply.text) == (550, "5.6.1 part 3 (message.wav): holds no sound (0 seconds)")
    recording = base64.encodebytes(VOICE).decode().replace("\n", "\r\n").encode()
    placeholder = b"UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAIA+AAACABAAZGF0YQAAAAA=\r\n"
    assert placeholder in example
    reply = await submit(gateway.smtp_port, example.replace(placeholder, recording), mail_from="alice@a.example",
                         rcpt_to=["bob@a.example"])
    assert reply.code == 250, reply
    inquiry = await mail_in(gateway, reply.queue_id, "bob@a.example", is_inquiry)
    assert heard(gateway) == [("heard", "2001")] and "Connect Alice Archer (2000) now?" in inquiry.get_content()


async def test_pbx_down_at_a_step_waits_and_places_the_call_once_it_is_back(gateway: Gateway) -> None:
    simulator = gateway.simulator
    assert simulator is not None
    host, port = gateway.config.pbx.ami.host, gateway.ami_port
    await simulator.stop()
    fields = "to: '2001'\nfrom: '2000'\nscenario:\n  steps:\n    - play: voice\n    - connect\n"
    reply = await submit(gateway.smtp_port, scenario_mail(fields, to="cti@a.example"))
    assert reply.code == 250, reply
    assert "PBX unavailable" in await wait_stage(gateway.store, reply.queue_id, "waiting")
    await simulator.start(host, port)
    summary = await mail_in(gateway, reply.queue_id, "alice@a.example", outcome("completed"), timeout=30)
    assert "1. play: answered" in summary.get_content()
    assert heard(gateway) == [("heard", "2001")]
    calls = await gateway.store.calls_for(reply.queue_id)
    assert [c.outcome for c in calls] == ["not-placed", "answered", "answered"]
