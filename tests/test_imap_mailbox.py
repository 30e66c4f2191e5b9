"""trigger: on-read for a person whose mailbox is on a remote IMAP server (a real Dovecot): the
gateway delivers with IMAP APPEND, watches \\Seen over IDLE (or by polling when the server offers
no IDLE), reconnects when the server goes away, and places the call once when the mail is read."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest

from mailgw.config import Config
from mailgw.directory import DirectoryError, load_directory
from mailgw.gateway import Gateway

from .conftest import (Sink, directory_with_mailbox, maildir_messages, placed_calls, request_mail, running_gateway,
                       submit, wait_stage)
from .dovecot import Dovecot, running_dovecot
from .test_dovecot import delete_first_message, flags_of_first_message, read_first_message, send_on_read


@contextlib.asynccontextmanager
async def imap_gateway(make_config: Callable[..., Config], sink: Sink, tmp_path: Path,
                       dv: Dovecot) -> AsyncIterator[Gateway]:
    """A gateway for which Bob's mailbox is in the Dovecot ``dv``."""
    directory = directory_with_mailbox(tmp_path, "bob@a.example", {
        "backend": "imap", "host": "127.0.0.1", "port": dv.port, "username": "bob@a.example",
        "password": dv.password("bob@a.example")})
    async with running_gateway(make_config(directory=directory), sink) as gw:
        assert gw.dispatcher is not None
        gw.dispatcher.imap_reading.interval = 0.2  # poll and back-off period; IDLE pushes come at once
        gw.dispatcher.imap_reading.timeout = 2.0  # a server that went away mid-greeting is given up sooner
        yield gw


@pytest.fixture(params=["idle", "no-idle"])
async def setup(request: pytest.FixtureRequest, make_config: Callable[..., Config], sink: Sink,
                tmp_path: Path) -> AsyncIterator[tuple[Gateway, Dovecot]]:
    # Without IDLE in its capabilities Dovecot is a server the watcher must poll.
    extra = "imap_capability = IMAP4rev1 LITERAL+ UIDPLUS\n" if request.param == "no-idle" else ""
    with running_dovecot(extra) as dv:
        async with imap_gateway(make_config, sink, tmp_path, dv) as gw:
            yield gw, dv


async def test_delivered_by_append_and_called_once_when_read(setup: tuple[Gateway, Dovecot]) -> None:
    gateway, dv = setup
    request_id = await send_on_read(gateway)
    # It is in Bob's IMAP inbox, not in any Maildir of the gateway's, and nobody was called.
    assert "\\Seen" not in await asyncio.to_thread(flags_of_first_message, dv, "bob@a.example")
    assert maildir_messages(gateway, "bob@a.example") == []
    row = await gateway.store.get_message(request_id)
    assert row is not None and row.detail is not None and row.detail.startswith("imap:")
    assert placed_calls(gateway) == []

    opened = await asyncio.to_thread(read_first_message, dv, "bob@a.example")
    assert opened["Subject"] == "call me when you read this" and opened["X-CTI-On-Read"] is not None
    await wait_stage(gateway.store, request_id, "outcome")
    assert [(c.from_number, c.to_number, c.outcome) for c in placed_calls(gateway)] == [("2000", "2001", "answered")]
    await asyncio.to_thread(read_first_message, dv, "bob@a.example")  # read again: no second call
    await wait_stage(gateway.store, request_id, "notified", count=2)
    assert len(placed_calls(gateway)) == 1


async def test_deleted_unread_on_the_server_ends_the_request(setup: tuple[Gateway, Dovecot]) -> None:
    gateway, dv = setup
    request_id = await send_on_read(gateway)
    await asyncio.to_thread(delete_first_message, dv, "bob@a.example")
    await wait_stage(gateway.store, request_id, "outcome")
    row = await gateway.store.get_message(request_id)
    assert row is not None and row.outcome == "deleted"
    assert placed_calls(gateway) == []


async def test_the_watcher_reconnects_when_the_server_goes_away(make_config: Callable[..., Config], sink: Sink,
                                                                tmp_path: Path) -> None:
    with running_dovecot() as dv:
        async with imap_gateway(make_config, sink, tmp_path, dv) as gateway:
            request_id = await send_on_read(gateway)
            await asyncio.to_thread(dv.stop)  # the watcher's connection drops
            await asyncio.to_thread(dv.start)
            await asyncio.to_thread(read_first_message, dv, "bob@a.example")
            await wait_stage(gateway.store, request_id, "outcome")
            assert [c.outcome for c in placed_calls(gateway)] == ["answered"]


async def test_the_server_down_at_delivery_delays_it(make_config: Callable[..., Config], sink: Sink,
                                                     tmp_path: Path) -> None:
    with running_dovecot() as dv:
        async with imap_gateway(make_config, sink, tmp_path, dv) as gateway:
            await asyncio.to_thread(dv.stop)
            reply = await submit(gateway.smtp_port, request_mail("alice@a.example", "bob@a.example",
                                                                 "trigger: on-read\n"))
            assert reply.code == 250
            detail = await wait_stage(gateway.store, reply.queue_id, "waiting")
            assert "mailbox unavailable" in detail
            row = await gateway.store.get_message(reply.queue_id)
            assert row is not None and row.state == "queued"


def test_the_directory_refuses_an_unusable_imap_mailbox(tmp_path: Path) -> None:
    path = tmp_path / "directory.yaml"
    path.write_text("people:\n  - {address: bob@a.example, extension: '2001', "
                    "mailbox: {backend: imap, host: h, username: u}}\n")
    with pytest.raises(DirectoryError, match=r"mailbox.password is required"):
        load_directory(path)
    path.write_text("people:\n  - {address: bob@a.example, extension: '2001', mailbox: {backend: pop3}}\n")
    with pytest.raises(DirectoryError, match="maildir, imap or mdn"):
        load_directory(path)
