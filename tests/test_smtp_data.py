"""The DATA phase: the body is taken as it arrives, not line by line, and gives exactly what
aiosmtpd's line-by-line reading gives: the same message (dot transparency removed), the same
refusals (too long a line, too much data), and pipelined commands after the lone dot kept."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgw.gateway import Gateway
from mailgw.ingress import DataBody

LINE_LIMIT = 1001  # aiosmtpd's line_length_limit, CRLF included


def line_by_line(stream: bytes, size_limit: int | None) -> tuple[bytes | None, set[str], bytes]:
    """aiosmtpd 1.4's ``smtp_DATA`` loop, on a whole stream: the message, the reasons to refuse it
    (either may be the one given when both apply), and what follows the lone dot."""
    lines, rest = [], stream
    while True:
        at = rest.find(b"\r\n")
        assert at >= 0, "the stream ends with the lone dot"
        line, rest = rest[:at + 2], rest[at + 2:]
        if line == b".\r\n":
            break
        lines.append(line)
    reasons = {"size"} if size_limit and sum(map(len, lines)) > size_limit else set()
    if any(len(line) > LINE_LIMIT for line in lines):
        reasons.add("line")
    if reasons:
        return None, reasons, rest
    return b"".join(line[1:] if line.startswith(b".") else line for line in lines), reasons, rest


def read_in_chunks(stream: bytes, cuts: list[int], size_limit: int | None) -> tuple[bytes | None, str | None, bytes]:
    body = DataBody(size_limit, LINE_LIMIT)
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)]) if stream[a:b]]
    for index, piece in enumerate(pieces):
        if body.feed(piece):
            rest = body.rest + b"".join(pieces[index + 1:])
            return (body.content() if body.refusal is None else None), body.refusal, rest
    raise AssertionError("the lone dot was not seen")


_LINES = st.lists(st.one_of(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"a\rb", b"a\nb", b"\r", b"\n.",
                                             b"x" * 999, b"x" * 1000, b"to: 2001"]),
                            st.binary(max_size=40).map(lambda b: b.replace(b"\r\n", b""))),
                  max_size=12)


@settings(max_examples=2000, deadline=None)
@given(_LINES, st.lists(st.integers(min_value=0, max_value=12000), max_size=6),
       st.sampled_from([None, 50, 1000, 3000]), st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<a@b.c>\r\nRCPT"]))
def test_a_body_read_as_it_arrives_is_read_as_aiosmtpd_reads_it(lines: list[bytes], cuts: list[int],
                                                                 size_limit: int | None, after: bytes) -> None:
    stream = b"".join(line + b"\r\n" for line in lines) + b".\r\n" + after
    message, refusal, rest = read_in_chunks(stream, sorted(cuts), size_limit)
    expected, reasons, expected_rest = line_by_line(stream, size_limit)
    assert (message, rest) == (expected, expected_rest)
    assert refusal in reasons if reasons else refusal is None


def test_a_refused_body_is_not_kept_while_the_client_goes_on_sending() -> None:
    body = DataBody(10_000, LINE_LIMIT)
    for _ in range(1000):
        assert not body.feed((b"y" * 98 + b"\r\n") * 50)
    assert body.refusal == "size" and len(body.data) <= 4
    assert body.feed(b".\r\nQUIT\r\n") and body.rest == b"QUIT\r\n"


async def open_session(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await reply(reader))[0] == 220
    writer.write(b"EHLO client.example\r\n")
    assert (await reply(reader))[0] == 250
    return reader, writer


async def reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        assert line, "the server closed the connection"
        if line[3:4] != b"-":
            return int(line[:3]), line[4:].decode().strip()


def mail(subject: str, body: bytes) -> bytes:
    return b"From: alice@a.example\r\nTo: bob@a.example\r\nSubject: " + subject.encode() + b"\r\n\r\n" + body


def stuffed(message: bytes) -> bytes:
    """The message as a client sends it after DATA: each line's leading dot doubled, then the lone dot."""
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in message.split(b"\r\n")) + b".\r\n"


async def stored(gateway: Gateway) -> dict[str, bytes]:
    rows = await gateway.store.list_messages()
    return {row.id: await gateway.store.raw_message(row) for row in rows}


async def test_pipelined_mails_after_the_lone_dot_are_each_accepted_as_sent(gateway: Gateway) -> None:
    first = mail("one", b"hello\r\n.dot line\r\n..two dots\r\n")
    second = mail("two", b"second\r\n")
    reader, writer = await open_session(gateway.smtp_port)
    try:
        writer.write(b"MAIL FROM:<alice@a.example>\r\nRCPT TO:<bob@a.example>\r\nDATA\r\n")
        assert [(await reply(reader))[0] for _ in range(3)] == [250, 250, 354]
        # The first body, its lone dot and the whole next transaction in one write (RFC 2920).
        writer.write(stuffed(first) + b"MAIL FROM:<alice@a.example>\r\nRCPT TO:<bob@a.example>\r\nDATA\r\n")
        first_reply = await reply(reader)
        assert [(await reply(reader))[0] for _ in range(3)] == [250, 250, 354]
        writer.write(stuffed(second) + b"QUIT\r\n")
        second_reply = await reply(reader)
        assert (await reply(reader))[0] == 221
    finally:
        writer.close()
    assert first_reply[0] == 250 and second_reply[0] == 250
    ids = [text.rsplit("queued as ", 1)[1] for _, text in (first_reply, second_reply)]
    assert await stored(gateway) == {ids[0]: first, ids[1]: second}


async def test_a_body_that_arrives_a_few_bytes_at_a_time_is_stored_whole(gateway: Gateway) -> None:
    message = mail("slow", b"line one\r\n.\r\n\r\n..\r\nlast\r\n")  # a dot-only line, stuffed, is no end
    reader, writer = await open_session(gateway.smtp_port)
    try:
        writer.write(b"MAIL FROM:<alice@a.example>\r\nRCPT TO:<bob@a.example>\r\nDATA\r\n")
        assert [(await reply(reader))[0] for _ in range(3)] == [250, 250, 354]
        data = stuffed(message)
        for at in range(0, len(data), 3):
            writer.write(data[at:at + 3])
            await writer.drain()
            await asyncio.sleep(0)  # let each piece arrive on its own (not a wait for an event)
        code, text = await reply(reader)
    finally:
        writer.close()
    assert code == 250
    assert await stored(gateway) == {text.rsplit("queued as ", 1)[1]: message}


@pytest.mark.parametrize(("body", "code", "status"), [
    (b"y" * 2000 + b"\r\n", 500, "5.6.0 line too long"),
    ((b"z" * 900 + b"\r\n") * 20_000, 552, "5.3.4 message too big"),
])
async def test_after_a_refused_body_the_session_goes_on(gateway: Gateway, body: bytes, code: int, status: str) -> None:
    good = mail("after", b"fine\r\n")
    reader, writer = await open_session(gateway.smtp_port)
    try:
        writer.write(b"MAIL FROM:<alice@a.example>\r\nRCPT TO:<bob@a.example>\r\nDATA\r\n")
        assert [(await reply(reader))[0] for _ in range(3)] == [250, 250, 354]
        writer.write(stuffed(mail("refused", body)))
        refused = await reply(reader)
        writer.write(b"MAIL FROM:<alice@a.example>\r\nRCPT TO:<bob@a.example>\r\nDATA\r\n")
        assert [(await reply(reader))[0] for _ in range(3)] == [250, 250, 354]
        writer.write(stuffed(good))
        accepted = await reply(reader)
    finally:
        writer.close()
    assert refused[0] == code and refused[1].startswith(status)
    assert accepted[0] == 250
    assert await stored(gateway) == {accepted[1].rsplit("queued as ", 1)[1]: good}
