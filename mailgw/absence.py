"""Absence mode and the missed-call mail: who is told about a call nobody answered (seed 002).

Plain decisions over plain data; the call history (``callhistory.py``) feeds them, the mailer
(``absence_mail.py``) sends what they decide.

The rule (claims 1-3 and 8 of seed 002):

* A call somebody answered produces no mail (a colleague took it).
* A call nobody answered produces **one** mail when one of the people it was meant for is in
  absence mode: the customer's person in charge, or a person whose extension it rang (a ring group
  rings several: still one mail). With ``absence.notify_unanswered`` (claim 8) every unanswered
  call produces one, absent or not.
* The mail goes to the customer's person in charge when the caller is a known customer with one
  (claim 1); else, when the number is unknown (claim 2) or withheld (claim 3), to the
  representative address.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum


class Reason(StrEnum):
    ABSENT = "absent"          # someone the call was for is in absence mode
    UNANSWERED = "unanswered"  # nobody answered and absence.notify_unanswered is on
    MEMO = "memo"              # a colleague wrote a memo about the call


@dataclass(frozen=True)
class Recipients:
    """Who may be told about a call: the customer's person in charge, else the representative."""

    owner: str | None
    owner_language: str | None
    representative: str | None
    representative_language: str


@dataclass(frozen=True)
class Absence:
    address: str
    since: datetime
    until: datetime | None = None  # None: until cleared
    note: str = ""
    source: str = "cli"            # cli, mail, pbx

    def active(self, now: datetime) -> bool:
        return self.since <= now and (self.until is None or now < self.until)


@dataclass(frozen=True)
class EndedCall:
    """What the decision needs of an incoming call that has ended."""

    call_id: str
    caller_key: str | None        # E.164; None when withheld
    rung: tuple[str, ...]         # extensions
    answered_by: str | None


@dataclass(frozen=True)
class Notice:
    call_id: str
    recipient: str
    language: str
    reason: Reason


def absent_now(absences: list[Absence], now: datetime) -> frozenset[str]:
    return frozenset(a.address for a in absences if a.active(now))


def missed_call_notice(call: EndedCall, *, owner: str | None, owner_language: str | None,
                       rung_people: dict[str, str], absent: frozenset[str], representative: str | None,
                       representative_language: str, notify_unanswered: bool) -> Notice | None:
    """The one notice ``call`` needs, or None.

    ``owner`` is the customer's person in charge (None: unknown caller, withheld number or no
    owner on record); ``rung_people`` maps rung extensions to the people's addresses;
    ``absent`` holds the addresses in absence mode now.
    """
    if call.answered_by is not None:
        return None
    meant_for = {owner} if owner else set()
    meant_for |= {rung_people[ext] for ext in call.rung if ext in rung_people}
    if meant_for & absent:
        reason = Reason.ABSENT
    elif notify_unanswered:
        reason = Reason.UNANSWERED
    else:
        return None
    if owner:
        return Notice(call.call_id, owner, owner_language or representative_language, reason)
    if representative:
        return Notice(call.call_id, representative, representative_language, reason)
    return None


def memo_notice(call_id: str, told: Recipients, text: str) -> Notice | None:
    """A colleague's memo goes to the customer's person in charge, else the representative (seed
    002, FIG. 10: the representative's address stands in when the customer has nobody)."""
    if told.owner:
        return Notice(call_id, told.owner, told.owner_language or told.representative_language, Reason.MEMO)
    if told.representative:
        return Notice(call_id, told.representative, told.representative_language, Reason.MEMO)
    return None


def memo_text(phrases: tuple[str, ...], picked: list[int], text: str) -> str:
    """The memo: the fixed phrases picked (1-based numbers into ``phrases``), then free text.
    ValueError naming a number that is not in the list, or when the memo would be empty."""
    lines = []
    for number in picked:
        if not 1 <= number <= len(phrases):
            raise ValueError(f"there is no phrase {number}; the phrases are 1-{len(phrases)}")
        lines.append(phrases[number - 1])
    if text.strip():
        lines.append(text.strip())
    if not lines:
        raise ValueError("the memo is empty: give a phrase's number or some text")
    return "\n".join(lines)


@dataclass(frozen=True)
class DigestPreference:
    """A person's wish to get missed calls batched: one mail per ``calls`` missed calls, or for
    what has waited ``every`` seconds, whichever comes first (``absence.digests``)."""

    calls: int | None = None
    every: float | None = None


@dataclass(frozen=True)
class Pending:
    """What the sending plan needs of a pending notice."""

    key: tuple[str, str]  # (call id, kind)
    recipient: str
    kind: str             # missed | memo
    created_at: datetime


@dataclass(frozen=True)
class Batch:
    keys: tuple[tuple[str, str], ...]
    digest: bool


def plan_sending(pending: list[Pending], digests: dict[str, DigestPreference],
                 now: datetime) -> tuple[list[Batch], datetime | None]:
    """Which pending notices to send now (alone, or together as a digest), and when the next
    digest falls due. Memos, and missed calls of people without a digest preference, go at once."""
    batches: list[Batch] = []
    waiting: dict[str, list[Pending]] = {}
    for p in pending:
        if p.kind == "missed" and p.recipient in digests:
            waiting.setdefault(p.recipient, []).append(p)
        else:
            batches.append(Batch((p.key,), digest=False))
    next_due: datetime | None = None
    for recipient, group in waiting.items():
        pref = digests[recipient]
        oldest = min(p.created_at for p in group)
        due_at = oldest + timedelta(seconds=pref.every) if pref.every is not None else None
        if (pref.calls is not None and len(group) >= pref.calls) or (due_at is not None and now >= due_at):
            batches.append(Batch(tuple(p.key for p in group), digest=True))
        elif due_at is not None:
            next_due = due_at if next_due is None else min(next_due, due_at)
    return batches, next_due


def subject_name(*, contact: str, customer: str, number: str, withheld: bool, language: str) -> str:
    """Who called, short enough for a phone's subject line: "Yamada Taro (XX Corp)"."""
    if withheld:
        return "番号非通知" if language == "ja" else "withheld number"
    if contact and customer:
        return f"{contact}（{customer}）" if language == "ja" else f"{contact} ({customer})"
    return contact or customer or number or ("不明" if language == "ja" else "unknown")
