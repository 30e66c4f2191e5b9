"""The first-word gate of the mail commands (``absent``, ``back``, ``memo``): a mail whose first
word is no command word skips the command parsers, so the gate must never turn away a mail either
parser would read as a command."""

from __future__ import annotations

from email.message import Message

from hypothesis import given, settings
from hypothesis import strategies as st

from mailgw.absence_mailcmd import COMMAND_WORDS, command_words, first_word
from mailgw.absence_memo import read_memo

_PIECES = st.sampled_from(["absent", "ＡＢＳＥＮＴ", "Back", "memo", "メモ", "伝言メモ", "不在", "until", "2h",
                           ":", "：", " ", "\u3000", "\t", "\r\n", "\n", "\r", "\x0c", "\u2028", "\x1c", ">",
                           "to: 2001", "x", "、", "1"])


def message_with(text: str) -> Message:
    message = Message()
    message["Content-Type"] = "text/plain; charset=utf-8"
    message.set_payload(text.encode("utf-8"))
    return message


@settings(max_examples=3000, deadline=None)
@given(st.lists(_PIECES, max_size=8).map("".join))
def test_the_gate_lets_through_every_mail_a_command_parser_reads(text: str) -> None:
    words = command_words(message_with(text))
    is_command = read_memo(text) is not None or bool(words and words[0] in COMMAND_WORDS)
    if is_command:
        assert first_word(text) in COMMAND_WORDS


def test_a_request_is_turned_away_by_the_gate() -> None:
    assert first_word("to: 2001\r\nfrom: 2002\r\n") == "to"
    assert first_word("\r\n  ＭＥＭＯ：call back\r\n") == "memo"
    assert first_word("") is None and first_word(None) is None
