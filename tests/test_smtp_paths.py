"""MAIL FROM / RCPT TO paths: the fast reading of plain ``<local@domain>`` paths gives exactly
what aiosmtpd's RFC 5322 parser gives, and leaves everything else to that parser."""

from __future__ import annotations

import asyncio
import smtplib
from email._header_value_parser import get_angle_addr
from email.errors import HeaderParseError

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgw.gateway import Gateway
from mailgw.ingress import plain_path

# Paths shaped like <local@domain> params, each part drawn with characters that must send the
# path to the full parser (quotes, comments, brackets, spaces, dots in odd places, non-ASCII).
_PATHS = st.builds("{}<{}@{}>{}".format,
                   st.sampled_from(["", " ", "\t", "x"]),
                   st.text(alphabet='ab.Z09-+_"\\ (é', max_size=6),
                   st.text(alphabet="ab.Z09-[]:", max_size=8),
                   st.text(alphabet=" \tSIZE=1()a", max_size=8))


def reference(arg: str) -> tuple[str, str] | None:
    try:
        address, rest = get_angle_addr(arg)
    except (HeaderParseError, IndexError, AttributeError):  # AttributeError: a stdlib bug, e.g. <0@[>
        return None
    return address.addr_spec, rest


@settings(max_examples=1000, deadline=None)
@given(_PATHS)
def test_a_path_read_fast_is_read_as_the_full_parser_reads_it(arg: str) -> None:
    fast = plain_path(arg)
    if fast is not None:
        assert fast == reference(arg)


@pytest.mark.parametrize(("arg", "expected"), [
    ("<alice@a.example>", ("alice@a.example", "")),
    ("<alice@a.example> SIZE=100 BODY=8BITMIME", ("alice@a.example", "SIZE=100 BODY=8BITMIME")),
    (" <user+tag@sub.example.com>\tSMTPUTF8", ("user+tag@sub.example.com", "SMTPUTF8")),
])
def test_plain_paths_are_read_fast(arg: str, expected: tuple[str, str]) -> None:
    assert plain_path(arg) == expected == reference(arg)


@pytest.mark.parametrize("arg", ['<"a b"@a.example>', "<a@b.example> (comment)", "<@relay:a@b.example>",
                                 "<a@[192.0.2.1]>", "<a..b@a.example>", "<a@b.example.>", "<>", "alice@a.example"])
def test_anything_unusual_is_left_to_the_full_parser(arg: str) -> None:
    assert plain_path(arg) is None


async def test_a_path_the_stdlib_parser_trips_on_gets_a_refusal_not_a_traceback(make_config) -> None:
    gw = Gateway(make_config())
    await gw.start()
    try:
        def dialogue() -> list[tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=10) as client:
                client.ehlo("client.example")
                return [client.docmd("MAIL FROM:<0@[>"), client.docmd("MAIL FROM:<alice@a.example>"),
                        client.docmd("RCPT TO:<0@[>"), client.docmd("RCPT TO:<cti@a.example>")]
        replies = await asyncio.to_thread(dialogue)
    finally:
        await gw.stop()
    assert [code for code, _ in replies] == [553, 250, 553, 250], replies
    assert b"malformed address" in replies[0][1]
    assert b"AttributeError" not in b"".join(text for _, text in replies)
