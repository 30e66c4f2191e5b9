"""trigger: on-read for a mailbox the gateway cannot watch: the request goes on to the person's
own address asking for a read receipt (RFC 8098 MDN) to a one-off gateway address; the receipt
arriving by SMTP places the call, once. Receipts from anyone else are kept, not obeyed."""

from __future__ import annotations

from email.message import EmailMessage
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest

from mailgw import mdn
from mailgw.config import Config
from mailgw.gateway import Gateway

from .conftest import Sink, directory_with_mailbox, placed_calls, request_mail, running_gateway, submit, wait_stage

BOB_ELSEWHERE = "bob@mail.elsewhere.example"


@pytest.fixture
async def gateway(make_config: Callable[..., Config], sink: Sink, tmp_path: Path) -> AsyncIterator[Gateway]:
    directory = directory_with_mailbox(tmp_path, "bob@a.example", {"backend": "mdn", "address": BOB_ELSEWHERE})
    async with running_gateway(make_config(directory=directory), sink) as gw:
        yield gw


def receipt(sent: EmailMessage, *, disposition: str = "displayed", sender: str = BOB_ELSEWHERE) -> MIMEMultipart:
    """An MDN as a mail program writes it (RFC 8098 section 9 example)."""
    report = MIMEMultipart("report", report_type="disposition-notification")
    report["From"] = sender
    report["To"] = str(sent["Disposition-Notification-To"])
    report["Subject"] = f"Read: {sent['Subject']}"
    report.attach(MIMEText("The message was displayed."))
    notification = MIMEBase("message", "disposition-notification")
    notification.set_payload(f"Reporting-UA: mail.elsewhere.example; Mailer 1.0\r\n"
                             f"Final-Recipient: rfc822;{BOB_ELSEWHERE}\r\n"
                             f"Original-Message-ID: {sent['Message-ID']}\r\n"
                             f"Disposition: manual-action/MDN-sent-manually; {disposition}\r\n")
    report.attach(notification)
    return report


async def forwarded(gateway: Gateway, sink: Sink) -> tuple[str, EmailMessage]:
    reply = await submit(gateway.smtp_port, request_mail("alice@a.example", "bob@a.example", "trigger: on-read\n",
                                                         subject="call me when you read this"))
    assert reply.code == 250, reply
    await wait_stage(gateway.store, reply.queue_id, "awaiting-read")
    _, rcpts, sent = await sink.next()
    assert rcpts == [BOB_ELSEWHERE]
    return reply.queue_id, sent


async def send_receipt(gateway: Gateway, sent: EmailMessage, report: MIMEMultipart) -> None:
    reply = await submit(gateway.smtp_port, report.as_bytes(), mail_from=report["From"],
                         rcpt_to=[mdn._bare(str(sent["Disposition-Notification-To"]))])
    assert reply.code == 250, reply
    await wait_stage(gateway.store, reply.queue_id, "receipt")


async def test_the_read_receipt_places_the_call_once(gateway: Gateway, sink: Sink) -> None:
    request_id, sent = await forwarded(gateway, sink)
    asked = str(sent["Disposition-Notification-To"])
    assert asked.startswith("<mailgw+mdn.") and asked.endswith("@a.example>")
    assert sent["X-CTI-On-Read"] is not None and sent["Subject"] == "call me when you read this"
    assert placed_calls(gateway) == []

    await send_receipt(gateway, sent, receipt(sent))
    await wait_stage(gateway.store, request_id, "outcome")
    assert [(c.from_number, c.to_number, c.outcome) for c in placed_calls(gateway)] == [("2000", "2001", "answered")]

    await send_receipt(gateway, sent, receipt(sent))  # the mail program sends it again
    assert len(placed_calls(gateway)) == 1


async def test_a_receipt_from_someone_else_is_not_obeyed(gateway: Gateway, sink: Sink) -> None:
    request_id, sent = await forwarded(gateway, sink)
    await send_receipt(gateway, sent, receipt(sent, sender="mallory@evil.example"))
    row = await gateway.store.get_message(request_id)
    assert row is not None and row.state == "awaiting-read"
    assert placed_calls(gateway) == []


async def test_a_deleted_disposition_ends_the_request(gateway: Gateway, sink: Sink) -> None:
    request_id, sent = await forwarded(gateway, sink)
    await send_receipt(gateway, sent, receipt(sent, disposition="deleted"))
    await wait_stage(gateway.store, request_id, "outcome")
    row = await gateway.store.get_message(request_id)
    assert row is not None and row.outcome == "deleted"
    assert placed_calls(gateway) == []


async def test_unknown_receipt_addresses_are_refused(gateway: Gateway) -> None:
    reply = await submit(gateway.smtp_port, request_mail("x@b.example", "mailgw+other@a.example", "hi"))
    assert (reply.code, reply.stage) == (550, "RCPT")


def test_parse_receipt_reads_the_disposition() -> None:
    sent = EmailMessage()
    sent["Disposition-Notification-To"] = "<mailgw+mdn.0123456789abcdef0123456789abcdef@a.example>"
    sent["Subject"], sent["Message-ID"] = "s", "<m@x>"
    found = mdn.parse_receipt(receipt(sent, disposition="deleted"))
    assert found == mdn.Receipt("deleted", BOB_ELSEWHERE, "<m@x>")
    assert mdn.parse_receipt(request_mail("a@b.example", "c@d.example", "not a report")) is None
