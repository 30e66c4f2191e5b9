"""trigger: on-read with the embedded Maildir: the request waits in the recipient's mailbox and runs
when they read it (the Seen flag any Maildir reader sets), exactly once; deleted or unread mail ends
with a notice. Real SMTP, real files, AMI over TCP to the simulator."""

from __future__ import annotations

import asyncio
import email.header
import os
from dataclasses import replace
from datetime import datetime, timedelta, timezone

from mailgw import mailbox
from mailgw.gateway import Gateway

from .conftest import maildir_messages, placed_calls, request_mail, submit, wait_stage


async def send_on_read(gateway: Gateway, body: str = "trigger: on-read\n") -> str:
    reply = await submit(gateway.smtp_port, request_mail("alice@a.example", "bob@a.example", body,
                                                         subject="call me when you read this"))
    assert reply.code == 250, reply
    await wait_stage(gateway.store, reply.queue_id, "awaiting-read")
    return reply.queue_id


def bobs_mail(gateway: Gateway) -> mailbox.StoredMail:
    [mail] = mailbox.list_mail(gateway.config.mailbox_root, "bob@a.example")
    return mail


def results(gateway: Gateway, request_id: str) -> list[str]:
    return [m["X-CTI-Outcome"] for m in maildir_messages(gateway, "alice@a.example")
            if m["X-CTI-Request"] == request_id]


async def test_the_call_happens_when_the_recipient_reads_the_mail_and_only_once(gateway: Gateway) -> None:
    request_id = await send_on_read(gateway)
    await wait_stage(gateway.store, request_id, "notified")  # the "delivered" notice
    assert placed_calls(gateway) == []
    assert results(gateway, request_id) == ["delivered"]
    delivered = bobs_mail(gateway).message()
    assert delivered["Subject"] == "call me when you read this"
    note = str(email.header.make_header(email.header.decode_header(delivered["X-CTI-On-Read"])))
    assert note == "Opening this message will connect you with Alice Archer (2000)"

    seen = mailbox.mark_seen(bobs_mail(gateway))  # what `mailgw inbox --read` or an IMAP reader does
    await wait_stage(gateway.store, request_id, "outcome")
    assert [(c.from_number, c.to_number, c.outcome) for c in placed_calls(gateway)] == [("2000", "2001", "answered")]

    # Reading it again (marked unread, then read) does not call again.
    unread = seen.path.parent.parent / "new" / seen.path.name.split(":2,")[0]
    os.rename(seen.path, unread)
    mailbox.mark_seen(bobs_mail(gateway))
    await wait_stage(gateway.store, request_id, "notified", count=2)  # the result mail
    assert len(placed_calls(gateway)) == 1
    assert sorted(results(gateway, request_id)) == ["answered", "delivered"]


async def test_a_mail_deleted_unread_ends_the_request_without_a_call(gateway: Gateway) -> None:
    request_id = await send_on_read(gateway)
    bobs_mail(gateway).path.unlink()
    await wait_stage(gateway.store, request_id, "outcome")
    message = await gateway.store.get_message(request_id)
    assert (message.outcome, message.status) == ("deleted", "5.0.0")
    assert placed_calls(gateway) == []


async def test_a_mail_still_unread_at_its_deadline_expires(gateway: Gateway) -> None:
    request_id = await send_on_read(gateway, "trigger: on-read\nmonitor: 1s\n")
    await wait_stage(gateway.store, request_id, "outcome")
    message = await gateway.store.get_message(request_id)
    assert (message.outcome, message.status) == ("expired", "4.4.7")
    assert placed_calls(gateway) == []


async def test_a_restarted_gateway_still_calls_when_the_mail_is_read(make_config, sink) -> None:
    config = make_config()
    first = Gateway(config)
    await first.start()
    try:
        request_id = await send_on_read(first)
    finally:
        await first.stop()
    second = Gateway(replace(config))
    await second.start()
    try:
        mailbox.mark_seen(bobs_mail(second))
        await wait_stage(second.store, request_id, "outcome")
        assert [(c.from_number, c.to_number) for c in placed_calls(second)] == [("2000", "2001")]
        assert len(mailbox.list_mail(config.mailbox_root, "bob@a.example")) == 1  # not delivered twice
    finally:
        await second.stop()


async def test_a_read_is_noticed_by_file_system_notification_not_only_by_polling(tmp_path) -> None:
    """With an hour between polls, only the watcher's inotify notification can see the read."""
    root = tmp_path / "mailboxes"  # not there yet: the watcher makes it, as the first delivery would
    read: asyncio.Queue[str] = asyncio.Queue()
    gone: list[str] = []

    async def on_gone(message_id: str) -> None:
        gone.append(message_id)

    watcher = mailbox.ReadWatcher(root, on_read=read.put, on_gone=on_gone, on_expired=on_gone, interval=3600)
    running = asyncio.create_task(watcher.run())
    deadline = datetime.now(timezone.utc) + timedelta(hours=1)

    async def deliver_watch_and_read(message_id: str) -> None:
        path = mailbox.deliver(root, "bob@a.example", f"Subject: {message_id}\r\n\r\nhi\r\n".encode())
        watcher.watch(message_id, "bob@a.example", path.name, deadline)
        [mail] = [m for m in mailbox.list_mail(root, "bob@a.example") if m.path.name.startswith(path.name)]
        mailbox.mark_seen(mail)

    try:
        # The notifications start with the watcher's task: probe until one gets through (bounded).
        # A probe read before they were in place is seen with the next one.
        for attempt in range(20):
            await deliver_watch_and_read(f"probe-{attempt}")
            try:
                assert (await asyncio.wait_for(read.get(), 0.5)).startswith("probe-")
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError("no file-system notification arrived")
        await deliver_watch_and_read("request")
        while (message_id := await asyncio.wait_for(read.get(), 10)) != "request":
            assert message_id.startswith("probe-")
        assert gone == []
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
