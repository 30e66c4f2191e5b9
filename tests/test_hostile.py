"""A corpus of hostile mail (tests/hostile/*.eml and generated monsters): each gets its exact
refusal, and nothing is stored, dialled or relayed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mailgw.gateway import Gateway

from .conftest import Sink, placed_calls, request_mail, submit

CORPUS = Path(__file__).parent / "hostile"
EXPECTED: dict[str, list] = yaml.safe_load((CORPUS / "expected.yaml").read_text())


def test_every_corpus_file_has_an_expectation() -> None:
    assert sorted(EXPECTED) == sorted(p.name for p in CORPUS.glob("*.eml"))


async def assert_nothing_happened(gateway: Gateway, sink: Sink) -> None:
    assert await gateway.store.list_messages() == []
    assert placed_calls(gateway) == []
    assert sink.received.empty()


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_corpus_mail_is_refused_exactly(gateway: Gateway, sink: Sink, name: str) -> None:
    code, text = EXPECTED[name]
    reply = await submit(gateway.smtp_port, (CORPUS / name).read_bytes(), mail_from="alice@a.example",
                         rcpt_to=["cti@a.example"])
    assert (reply.code, reply.text) == (code, text)
    await assert_nothing_happened(gateway, sink)


def nested(depth: int) -> bytes:
    head = b"From: alice@a.example\r\nTo: cti@a.example\r\nSubject: deep\r\nMIME-Version: 1.0\r\n"
    body = b"Content-Type: text/plain\r\n\r\nto: 2001\r\n"
    for level in range(depth):
        boundary = f"b{level}".encode()
        body = (b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"\r\n\r\n--" + boundary + b"\r\n"
                + body + b"\r\n--" + boundary + b"--\r\n")
    return head + body


def many_parts(count: int) -> bytes:
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(count))
    return (b"From: alice@a.example\r\nTo: cti@a.example\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nto: 2001\r\n"
            + parts + b"--b--\r\n")


@pytest.mark.parametrize(("raw", "code", "text"), [
    (nested(30), 552, "5.3.4 MIME nesting deeper than 10 levels"),
    (many_parts(150), 552, "5.3.4 more than 100 MIME parts"),
    (request_mail("alice@a.example", "cti@a.example", "to: 2001\n" + "x" * 200 + "\n").as_bytes()
     + (b"y" * 76 + b"\r\n") * (11 * 1024 * 1024 // 78), 552, "5.3.4 message too big: the limit is 10485760 bytes"),
], ids=["deep-nesting", "too-many-parts", "oversize"])
async def test_generated_monsters_are_refused(gateway: Gateway, sink: Sink, raw: bytes, code: int, text: str) -> None:
    reply = await submit(gateway.smtp_port, raw, mail_from="alice@a.example", rcpt_to=["cti@a.example"])
    assert (reply.code, reply.text) == (code, text)
    await assert_nothing_happened(gateway, sink)


@pytest.mark.parametrize(("rcpt", "code", "status"), [
    ("bob@b.example", 550, "5.7.1"),
    ("bob%b.example@a.example", 550, "5.1.1"),
    ('"bob@b.example"@a.example', 501, "5.1.3"),   # quoted local parts are not taken at all
    ("bob@b.example@a.example", 553, "5.1.3"),     # aiosmtpd's own refusal of a malformed address
    ("@a.example:bob@b.example", 553, "5.1.3"),    # source routes (RFC 5321 obsolete syntax)
    ("bob@a.example.b.example", 550, "5.7.1"),
])
async def test_open_relay_probes_are_refused_at_rcpt(gateway: Gateway, sink: Sink, rcpt: str, code: int,
                                                     status: str) -> None:
    reply = await submit(gateway.smtp_port, request_mail("alice@a.example", "bob@a.example", "hi\n").as_bytes(),
                         mail_from="alice@a.example", rcpt_to=[rcpt])
    assert (reply.stage, reply.code) == ("RCPT", code) and reply.text.startswith(status), reply
    await assert_nothing_happened(gateway, sink)


async def test_a_burst_over_the_sender_rate_is_refused(gateway: Gateway, sink: Sink) -> None:
    limit = gateway.config.policy.per_sender_per_hour
    codes = [(await submit(gateway.smtp_port, request_mail("alice@a.example", "cti@a.example",
                                                           f"to: 03-1234-{i:04d}\ndry-run: yes\n"))).code
             for i in range(limit + 3)]
    assert codes == [250] * limit + [550] * 3
    assert len(await gateway.store.audit_entries()) == 3


ODD_BUT_READABLE = {
    # compat32 hands back a Header object, not a string, for a header with raw 8-bit bytes
    "auto-submitted-8bit": b"Auto-Submitted: n\xe9\r\nContent-Type: text/plain; charset=utf-8\r\n",
    # a codec that exists but takes no errors="replace" (the mail-command hooks read leniently)
    "charset-idna": b"Content-Type: text/plain; charset=idna\r\n",
}


@pytest.mark.parametrize("name", sorted(ODD_BUT_READABLE))
async def test_odd_but_readable_mail_to_the_service_mailbox_is_a_request_not_a_451(gateway: Gateway,
                                                                                     name: str) -> None:
    raw = (b"From: alice@a.example\r\nTo: cti@a.example\r\nSubject: call\r\nMIME-Version: 1.0\r\n"
           + ODD_BUT_READABLE[name] + b"\r\nto: 2001\r\ndry-run: yes\r\n")
    reply = await submit(gateway.smtp_port, raw, mail_from="alice@a.example", rcpt_to=["cti@a.example"])
    assert reply.code == 250, reply
    row = await gateway.store.get_message(reply.queue_id)
    assert row is not None and row.kind == "request" and row.request["to_number"] == "2001"
