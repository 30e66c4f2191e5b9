"""Outgoing mail is never lost: a result mail for an outside sender waits in the durable outbox
while the smarthost is down, and arrives exactly once when it comes back."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace
from email.header import Header
from email.message import EmailMessage
from email.mime.text import MIMEText

from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgw.config import Config, HostPort
from mailgw.gateway import Gateway
from mailgw.outbound import _Held, as_bytes

from .conftest import _SinkHandler, maildir_messages, request_mail, submit, wait_stage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_smarthost(config: Config, port: int) -> Config:
    """Outside mail goes to a smarthost on ``port`` (none listening yet), retried quickly."""
    return replace(config, outbound=replace(config.outbound, smarthost=HostPort("127.0.0.1", port),
                                            retry_interval=0.05, max_retry_interval=0.2))


async def submit_for_outside_sender(gw: Gateway) -> str:
    """A dry-run request from outside: its result mail must go out through the smarthost."""
    reply = await submit(gw.smtp_port, request_mail("partner@b.example", "cti@a.example",
                                                    "to: 2001\nfrom: 03-1234-5678\ndry-run: yes\n"))
    return reply.queue_id


async def test_result_mail_waits_for_the_smarthost_and_is_delivered_once(make_config) -> None:
    port = free_port()
    gw = Gateway(with_smarthost(make_config(), port))
    await gw.start()
    try:
        request_id = await submit_for_outside_sender(gw)
        detail = await wait_stage(gw.store, request_id, "mail-deferred")  # the smarthost is down
        assert detail.startswith("to partner@b.example:")

        received: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        sink = await loop.create_server(lambda: SMTP(_SinkHandler(received), loop=loop), "127.0.0.1", port)
        try:
            await wait_stage(gw.store, request_id, "notified")
            _, rcpts, mail = await asyncio.wait_for(received.get(), 5)
            assert rcpts == ["partner@b.example"] and mail["X-CTI-Request"] == request_id
            [row] = await gw.store.outbox_for(request_id)
            assert row.state == "sent" and row.attempts >= 2
            assert received.empty()
        finally:
            sink.close()
    finally:
        await gw.stop()


async def test_a_queued_result_mail_is_kept_in_the_store_and_sent_after_a_restart(make_config) -> None:
    port = free_port()
    config = with_smarthost(make_config(), port)
    gw = Gateway(config)
    await gw.start()
    try:
        request_id = await submit_for_outside_sender(gw)
        await wait_stage(gw.store, request_id, "mail-deferred")
        [row] = await gw.store.outbox_for(request_id)
        # No file of its own: the mail is a row, committed with the request's outcome.
        assert not row.path.exists()
        assert b"X-CTI-Request: " + request_id.encode() in await gw.store.outbox_content(row.id)
    finally:
        await gw.stop()

    received: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    sink = await loop.create_server(lambda: SMTP(_SinkHandler(received), loop=loop), "127.0.0.1", port)
    gw = Gateway(config)
    await gw.start()
    try:
        await wait_stage(gw.store, request_id, "notified")
        _, rcpts, mail = await asyncio.wait_for(received.get(), 5)
        assert rcpts == ["partner@b.example"] and mail["X-CTI-Request"] == request_id
        assert await gw.store.outbox_content(row.id) is None  # sent: its content is not kept
    finally:
        await gw.stop()
        sink.close()


async def test_mail_written_to_a_file_is_not_kept_in_the_store_as_well(make_config) -> None:
    # Outbox.prepare (bounces, absence mail with a recording of several MB) writes a file; only
    # result mails, composed and stored with their outcome, live in the store instead.
    gw = Gateway(make_config())
    await gw.start()
    try:
        notice = MIMEText("hello\n", "plain", "us-ascii")
        notice["Subject"] = "a notice"
        entry = await gw.outbox.prepare(notice, rcpt_to="alice@a.example", request_id=None)
        assert entry.path.read_bytes() == as_bytes(notice) and entry.content is None
        await gw.store.add_outbox(entry)
        assert await gw.store.outbox_content(entry.id) is None
    finally:
        await gw.stop()


async def test_a_kept_session_the_smarthost_dropped_is_replaced_at_once(make_config) -> None:
    """The outbox keeps its SMTP session open for the next mail; when the server has closed it in
    between (its idle timeout, a restart), the next mail goes out on a new session at once instead
    of waiting for a retry, and arrives once."""
    received: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    sessions: list[SMTP] = []

    def session() -> SMTP:
        sessions.append(SMTP(_SinkHandler(received), loop=loop))
        return sessions[-1]

    sink = await loop.create_server(session, "127.0.0.1", 0)
    config = make_config()
    smarthost = HostPort("127.0.0.1", sink.sockets[0].getsockname()[1])
    config = replace(config, outbound=replace(config.outbound, smarthost=smarthost, retry_interval=30))
    gw = Gateway(config)
    await gw.start()
    try:
        ids = []
        for number in ("2001", "2002"):
            reply = await submit(gw.smtp_port, request_mail("partner@b.example", "cti@a.example",
                                                            f"to: {number}\nfrom: 03-1234-5678\ndry-run: yes\n"))
            ids.append(reply.queue_id)
            await wait_stage(gw.store, reply.queue_id, "notified")
            _, _, mail = await asyncio.wait_for(received.get(), 5)
            assert mail["X-CTI-Request"] == reply.queue_id
            if len(ids) == 1:
                assert len(sessions) == 1
                sessions[0].transport.close()  # the server hangs up on the session the outbox kept
        assert len(sessions) == 2 and received.empty()
        for request_id in ids:
            [row] = await gw.store.outbox_for(request_id)
            assert (row.state, row.attempts) == ("sent", 1)
            assert "mail-deferred" not in [stage for _, stage, _ in await gw.store.stages(request_id)]
    finally:
        await gw.stop()
        sink.close()


def test_copies_held_for_their_first_attempt_are_bounded() -> None:
    """Past its byte limit the outbox keeps no more contents in memory: those are read back from disk."""
    held = _Held(10)
    held.put("a", b"12345678")
    held.put("b", b"123")  # would pass the limit
    assert (held.pop("b"), held.size) == (None, 8)
    assert (held.pop("a"), held.size) == (b"12345678", 0)
    held.put("b", b"123")
    assert (held.pop("b"), held.pop("b")) == (b"123", None)


async def test_a_backlog_larger_than_one_look_is_delivered_without_spinning_on_the_table(make_config) -> None:
    """More mail due than one look at the table takes (200): the outbox delivers what it took and
    looks again when those deliveries end, instead of reading the table in a tight loop (which
    starved every other stage of the event loop)."""
    gw = Gateway(make_config())
    await gw.start()
    looks = 0
    due_outbox = gw.store.due_outbox

    async def counted(*args, **kwargs):  # the real query, counted
        nonlocal looks
        looks += 1
        return await due_outbox(*args, **kwargs)

    gw.store.due_outbox = counted  # type: ignore[method-assign]
    try:
        entries = []
        for i in range(260):
            message = EmailMessage()
            message["Subject"], message["To"] = f"backlog {i}", "bob@a.example"
            message.set_content("x")
            entries.append(await gw.outbox.prepare(message, rcpt_to="bob@a.example", request_id="backlog"))
        await asyncio.gather(*(gw.store.add_outbox(entry) for entry in entries))
        gw.outbox.wake()
        await wait_stage(gw.store, "backlog", "notified", 30, count=260)  # one per mail delivered
        assert sorted(m["Subject"] for m in maildir_messages(gw, "bob@a.example")) == sorted(
            f"backlog {i}" for i in range(260))
        assert looks < 40  # a spinning loop looks thousands of times while 260 mails go out
    finally:
        await gw.stop()


_BODY_PIECES = st.sampled_from(["a", " ", "\n", "\r\n", "From ", ">From", "é", ".", "\t", "x" * 80, "日本"])
_SUBJECTS = st.one_of(st.text(alphabet=st.sampled_from(list("ab \t:=?") + ["é", "日"]), max_size=90),
                      st.just("x " * 50))


@settings(max_examples=300, deadline=None)
@given(st.lists(_BODY_PIECES, max_size=40).map("".join), _SUBJECTS, st.integers(50, 100))
def test_a_result_mail_is_written_as_the_email_package_writes_it(body: str, subject: str, width: int) -> None:
    message = MIMEText(body, "plain", "us-ascii" if body.isascii() else "utf-8")
    message["From"] = "mailgw <mailgw@a.example>"
    message["Subject"] = subject if subject.isascii() else Header(subject, "utf-8")
    message["X-Long"] = "y" * width
    message["In-Reply-To"] = "<bench-1234-4294967295@bench.example>"
    assert as_bytes(message) == message.as_bytes()
