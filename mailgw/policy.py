"""Dialling policy: which numbers a mail may make the PBX call, and how often a sender may ask.

Toll fraud is the classic attack on anything that dials, so every number a request would dial —
``to`` and ``from`` alike — is checked here against ``policy.allow`` and ``policy.deny``.

Number patterns (Asterisk-like; the whole number must match):

=========  ==============================================  ==================
pattern    matches                                         example
=========  ==============================================  ==================
``0``-``9``  that digit                                    ``2001``
``X`` ``x``  any digit 0-9                                 ``2XXX``
``N``      any digit 2-9                                   ``NXX``
``Z``      any digit 1-9                                   ``0Z*``
``[...]``  one digit of a class: digits and ranges         ``0[1-9]*``, ``[125]XX``
``*``      any remaining digits, zero or more (last only)  ``0990*``
``.``      one or more remaining digits (last only)        ``0.``
``+``      a literal ``+`` (E.164 numbers)                 ``+*``
=========  ==============================================  ==================

Deny wins over allow; a number that matches no allow pattern is refused too. Both refusals are
``550 5.7.1`` and name the pattern (or its absence), so the sender and the admin see why.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .config import PolicyConfig
from .status import Refused


class PatternError(ValueError):
    """A number pattern that cannot be compiled; the message says where."""


@lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The regular expression for one number pattern (compiled once, then cached)."""
    pieces: list[str] = []
    position = 0
    while position < len(pattern):
        char = pattern[position]
        if char in "0123456789":
            pieces.append(char)
        elif char in "Xx":
            pieces.append("[0-9]")
        elif char == "N":
            pieces.append("[2-9]")
        elif char == "Z":
            pieces.append("[1-9]")
        elif char == "+":
            pieces.append(r"\+")
        elif char == "[":
            end = pattern.find("]", position)
            if end < 0:
                raise PatternError(f"pattern {pattern!r}: '[' without ']'")
            pieces.append(_digit_class(pattern, pattern[position + 1:end]))
            position = end
        elif char in "*.":
            if position != len(pattern) - 1:
                raise PatternError(f"pattern {pattern!r}: {char!r} may only come last")
            pieces.append("[0-9]*" if char == "*" else "[0-9]+")
        else:
            raise PatternError(f"pattern {pattern!r}: {char!r} is not pattern syntax")
        position += 1
    if not pieces:
        raise PatternError("an empty pattern matches nothing")
    return re.compile("".join(pieces))


def _digit_class(pattern: str, inside: str) -> str:
    if not re.fullmatch(r"(?:[0-9](?:-[0-9])?)+", inside):
        raise PatternError(f"pattern {pattern!r}: [{inside}] is not a class of digits like [1-9] or [125]")
    for low, high in re.findall(r"([0-9])-([0-9])", inside):
        if low > high:
            raise PatternError(f"pattern {pattern!r}: range {low}-{high} is backwards")
    return f"[{inside}]"


def matches(number: str, pattern: str) -> bool:
    return compile_pattern(pattern).fullmatch(number) is not None


def check_number(number: str, policy: PolicyConfig, *, field: str) -> None:
    """Refuse (550 5.7.1) a number the policy does not allow; ``field`` names it in the reply."""
    try:
        denied_by = next((p for p in policy.deny if matches(number, p)), None)
        allowed = any(matches(number, p) for p in policy.allow)
    except PatternError as exc:
        # A broken configuration is the operator's trouble, not the sender's: answer with a
        # temporary failure so the mail is retried once the pattern is fixed, and fail closed.
        raise Refused(451, "4.3.5", f"the dialling policy is misconfigured ({exc})") from None
    if denied_by is not None:
        raise Refused(550, "5.7.1", f"field '{field}': number {number} is not allowed by policy (deny '{denied_by}')")
    if not allowed:
        raise Refused(550, "5.7.1",
                      f"field '{field}': number {number} is not allowed by policy (it matches no allow pattern)")


def check_rate(recent_count: int, policy: PolicyConfig, *, sender: str | None = None) -> None:
    """Refuse a request when its sender already made ``policy.per_sender_per_hour`` in the last hour.

    ``recent_count`` counts the sender's earlier requests in the past hour, not this one.

    The refusal is permanent (550) on purpose: a 4xx would make the sending MTA retry, and a call
    placed hours later, when the MTA finally gets through, would surprise everyone — the sender
    can simply send again when they still want the call.
    """
    limit = policy.per_sender_per_hour
    if recent_count >= limit:
        who = f" from {sender}" if sender else ""
        raise Refused(550, "5.7.1", f"rate limit: at most {limit} requests per hour{who}")
