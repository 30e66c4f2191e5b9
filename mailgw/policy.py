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
from collections.abc import Iterable
from enum import StrEnum
from functools import lru_cache
from typing import TYPE_CHECKING

from .auth import Sender, Trust, same_person
from .config import GroupPolicy, PolicyConfig
from .status import Refused

if TYPE_CHECKING:  # request.py imports this module to check numbers while parsing
    from .request import ExchangeRequest


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


# --- who may ask for what ------------------------------------------------------------------------
#
# The office policy above applies to every request. A directory group may narrow it (never widen
# it): its own allow/deny patterns must be passed as well, and its action list replaces the
# office's. The first group of the sender that has a policy is the one used.


class Verdict(StrEnum):
    EXECUTE = "execute"            # the request may make the PBX act
    DELIVER_ONLY = "deliver-only"  # an unauthenticated request to a person: delivered, not executed


def group_policy(policy: PolicyConfig, groups: Iterable[str]) -> tuple[str, GroupPolicy] | None:
    by_name = dict(policy.groups)
    for group in groups:
        if group in by_name:
            return group, by_name[group]
    return None


def authorise(request: ExchangeRequest, sender: Sender, *, to_person: bool, groups: tuple[str, ...],
              policy: PolicyConfig, dkim_domains: frozenset[str] = frozenset(),
              signed_by: str | None = None) -> Verdict:
    """May this request make the PBX act? Raises Refused (550 5.7.1) naming the rule when not.

    ``dkim_domains`` must sign their mail (security.dkim); ``signed_by`` is the domain whose valid
    DKIM signature the mail carries, if any."""
    domain = request.sender.rpartition("@")[2].lower()
    if domain in dkim_domains:
        if signed_by != domain:
            raise Refused(550, "5.7.1", f"mail from {domain} must carry a valid DKIM signature by {domain} "
                                        "(security.dkim)")
        sender = Sender(Trust.AUTHENTICATED, sender.peer, request.sender)
    if sender.trust == Trust.PEER:
        if domain != (sender.login or ""):
            raise Refused(550, "5.7.1", f"peer gateway {sender.login} may only relay requests from its own "
                                        f"domain, not from {domain}")
        sender = Sender(Trust.AUTHENTICATED, sender.peer, request.sender)  # as from the original sender
    if sender.trust == Trust.NONE:
        if to_person:
            return Verdict.DELIVER_ONLY
        raise Refused(550, "5.7.1", "authentication required to place calls: use SMTP AUTH after STARTTLS, "
                                    "or send from a trusted network (security.trusted_networks)")
    if sender.trust == Trust.AUTHENTICATED and not same_person(sender.login or "", request.sender):
        raise Refused(550, "5.7.1", f"authenticated as {sender.login} but the mail is from {request.sender}")
    chosen = group_policy(policy, groups)
    actions, where = policy.actions, "policy.actions"
    if chosen is not None and chosen[1].actions is not None:
        actions, where = chosen[1].actions, f"policy.groups.{chosen[0]}.actions"
    if str(request.action) not in actions:
        raise Refused(550, "5.7.1", f"field 'action': '{request.action}' is not allowed for {request.sender} ({where})")
    if chosen is not None:
        name, group = chosen
        narrowed = PolicyConfig(allow=group.allow if group.allow is not None else policy.allow,
                                deny=group.deny if group.deny is not None else (),
                                per_sender_per_hour=policy.per_sender_per_hour)
        for field, number in (("to", request.to_number), ("from", request.from_number)):
            if number is not None:
                try:
                    check_number(number, narrowed, field=field)
                except Refused as refusal:
                    raise Refused(refusal.reply.code, refusal.reply.status,
                                  f"{refusal.reply.text} [policy.groups.{name}]") from None
    return Verdict.EXECUTE


def sender_limit(policy: PolicyConfig, groups: tuple[str, ...]) -> int:
    chosen = group_policy(policy, groups)
    if chosen is not None and chosen[1].per_sender_per_hour is not None:
        return chosen[1].per_sender_per_hour
    return policy.per_sender_per_hour


def check_number_rate(number: str, last_minute: int, last_hour: int, policy: PolicyConfig) -> None:
    """Refuse a request that would ring ``number`` more often than the policy allows.

    The counts are of earlier requests (dry runs excluded: they ring nobody). This protects the
    people at the other end: nobody's phone can be made to ring every few seconds by mail.
    """
    if last_minute >= policy.per_number_per_minute:
        raise Refused(550, "5.7.1", f"rate limit: {number} was already called in the last minute "
                                    f"(policy.per_number_per_minute = {policy.per_number_per_minute})")
    if last_hour >= policy.per_number_per_hour:
        raise Refused(550, "5.7.1", f"rate limit: {number} was already called {last_hour} times in the last hour "
                                    f"(policy.per_number_per_hour = {policy.per_number_per_hour})")
