"""Answers to a scenario's inquiry mail (confirm via mail): OK / NG in English and Japanese."""

from __future__ import annotations

import pytest

from mailgw.replies import confirm_answer


@pytest.mark.parametrize("text, answer", [
    ("OK\n\n> Connect Alice now? Reply OK or NG", "yes"),
    ("ｏｋ です", "yes"),                     # full-width, NFKC-folded
    ("はい、お願いします", "yes"),
    ("> quoted OK\n\nNG. Not now.", "no"),  # the quoted part is skipped
    ("いいえ", "no"),
    ("no thanks", "no"),
    ("maybe later", None),
    ("", None),
    ("> OK", None),                          # only quoted text: no answer
])
def test_confirm_answer(text: str, answer: str | None) -> None:
    assert confirm_answer(text) == answer
