"""trigger: on-read through a real Dovecot serving the gateway's Maildirs: the recipient reads the
request mail with a real IMAP client (imaplib), Dovecot sets \\Seen in the Maildir, and the call
happens, exactly once. Deleting it unread over IMAP ends the request without a call."""

from __future__ import annotations

import asyncio
import email
import email.policy
import imaplib
from typing import AsyncIterator, Callable

import pytest

from mailgw.config import Config
from mailgw.gateway import Gateway

from .conftest import Sink, maildir_messages, placed_calls, request_mail, running_gateway, submit, wait_stage
from .dovecot import Dovecot, dovecot  # noqa: F401  (the fixture)


@pytest.fixture
async def shared_gateway(make_config: Callable[..., Config], sink: Sink, dovecot: Dovecot) -> AsyncIterator[Gateway]:  # noqa: F811
    async with running_gateway(make_config(mailbox_root=dovecot.mail_root, mailbox_group=dovecot.group), sink) as gw:
        yield gw


def imap_session(dv: Dovecot, address: str) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", dv.port, timeout=10)
    client.login(address, dv.password(address))
    client.select("INBOX")
    return client


def read_first_message(dv: Dovecot, address: str) -> email.message.EmailMessage:
    """What a mail program does when its user opens the message: FETCH BODY[] (not PEEK)."""
    client = imap_session(dv, address)
    try:
        status, data = client.fetch("1", "(BODY[])")
        assert status == "OK", data
        return email.message_from_bytes(data[0][1], policy=email.policy.default)  # type: ignore[index,return-value]
    finally:
        client.logout()


def flags_of_first_message(dv: Dovecot, address: str) -> str:
    client = imap_session(dv, address)
    try:
        status, data = client.fetch("1", "(FLAGS)")
        assert status == "OK", data
        return data[0].decode()  # type: ignore[union-attr]
    finally:
        client.logout()


def delete_first_message(dv: Dovecot, address: str) -> None:
    client = imap_session(dv, address)
    try:
        assert client.store("1", "+FLAGS", "(\\Deleted)")[0] == "OK"
        assert client.expunge()[0] == "OK"
    finally:
        client.logout()


async def send_on_read(gateway: Gateway) -> str:
    reply = await submit(gateway.smtp_port, request_mail("alice@a.example", "bob@a.example", "trigger: on-read\n",
                                                         subject="call me when you read this"))
    assert reply.code == 250, reply
    await wait_stage(gateway.store, reply.queue_id, "awaiting-read")
    return reply.queue_id


async def test_reading_through_dovecot_places_the_call_once(shared_gateway: Gateway, dovecot: Dovecot) -> None:  # noqa: F811
    request_id = await send_on_read(shared_gateway)
    assert "\\Seen" not in await asyncio.to_thread(flags_of_first_message, dovecot, "bob@a.example")
    assert placed_calls(shared_gateway) == []

    opened = await asyncio.to_thread(read_first_message, dovecot, "bob@a.example")
    assert opened["Subject"] == "call me when you read this"
    assert opened["X-CTI-On-Read"] is not None

    await wait_stage(shared_gateway.store, request_id, "outcome")
    assert [(c.from_number, c.to_number, c.outcome) for c in placed_calls(shared_gateway)] == \
        [("2000", "2001", "answered")]
    assert "\\Seen" in await asyncio.to_thread(flags_of_first_message, dovecot, "bob@a.example")

    # Opening it again in the mail program calls nobody again.
    await asyncio.to_thread(read_first_message, dovecot, "bob@a.example")
    await wait_stage(shared_gateway.store, request_id, "notified", count=2)  # delivered notice + result
    outcomes = sorted(m["X-CTI-Outcome"] for m in maildir_messages(shared_gateway, "alice@a.example")
                      if m["X-CTI-Request"] == request_id)
    assert outcomes == ["answered", "delivered"]
    assert len(placed_calls(shared_gateway)) == 1


async def test_deleting_unread_through_dovecot_ends_the_request(shared_gateway: Gateway, dovecot: Dovecot) -> None:  # noqa: F811
    request_id = await send_on_read(shared_gateway)
    await asyncio.to_thread(delete_first_message, dovecot, "bob@a.example")
    await wait_stage(shared_gateway.store, request_id, "outcome")
    row = await shared_gateway.store.get_message(request_id)
    assert row is not None and row.outcome == "deleted"
    assert placed_calls(shared_gateway) == []
