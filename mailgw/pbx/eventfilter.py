"""AMI event filters: which events a manager session is sent, as Asterisk decides it.

A session adds filters with the ``Filter`` action (``Operation: Add``) or gets them from
``eventfilter`` lines in ``manager.conf``. Two forms, both from Asterisk 22's manager.c:

* **Advanced** (``MatchCriteria: action(include|exclude),name(<Event>),header(<Header>),
  method(regex|exact|starts_with|ends_with|contains|none)`` with an optional ``Filter:``
  expression): ``name`` compares the event name exactly, ``header`` restricts the expression
  to that header's value, ``method`` says how the expression is compared (``regex`` when an
  expression is given without one).
* **Legacy** (no ``MatchCriteria``): ``Filter:`` is a regular expression searched for in the
  whole event text (``Event: Newchannel\\r\\nPrivilege: ...``); a leading ``!`` excludes.

Replies: ``Success``; ``Unknown operation`` (only ``Add`` exists, any case); ``Filter did not
compile.  Check the syntax of the filter given.`` (manager.c's texts). A malformed
``MatchCriteria`` gets ``Invalid match criteria: ...``, which is this module's wording: no
capture shows Asterisk's. Asterisk compiles legacy expressions as POSIX basic regular
expressions; this module uses Python's, which agree on the plain names and prefixes clients
write (``Event: Newchannel``, ``!Channel: DAHDI.*``).

Evaluation, as Asterisk documents it: no filters, every event; include filters only, an event
must match one of them; exclude filters only, every event but those matching one; both, an event
must match an include filter and no exclude filter.

The simulator keeps a session's filters in ``EventFilters`` and asks ``passes`` for each event;
name-only filters (what mailgw's driver adds) are answered from two sets without building the
event's text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum


class Method(StrEnum):
    NONE = "none"
    REGEX = "regex"
    EXACT = "exact"
    STARTS_WITH = "starts_with"
    ENDS_WITH = "ends_with"
    CONTAINS = "contains"


@dataclass(frozen=True)
class EventFilter:
    include: bool
    name: str | None = None  # the event's name, compared exactly
    header: str | None = None  # the expression applies to this header's value only
    method: Method = Method.NONE
    expression: str = ""
    pattern: re.Pattern[str] | None = None  # the compiled expression (method regex)

    @property
    def by_name_only(self) -> bool:
        return self.header is None and self.method is Method.NONE

    def matches(self, name: str, text: str) -> bool:
        """``text``: the event as on the wire, CRLF lines without the final blank line."""
        if self.name is not None and self.name != name:
            return False
        if self.header is not None:
            values = [line.partition(": ")[2] for line in text.split("\r\n")
                      if line.partition(": ")[0].lower() == self.header.lower()]
            if not values:
                return False
            return any(self._compare(v) for v in values)
        return self._compare(text)

    def _compare(self, value: str) -> bool:
        method = self.method
        if method is Method.NONE:
            return True
        if method is Method.REGEX:
            assert self.pattern is not None
            return self.pattern.search(value) is not None
        if method is Method.EXACT:
            return value == self.expression
        if method is Method.STARTS_WITH:
            return value.startswith(self.expression)
        if method is Method.ENDS_WITH:
            return value.endswith(self.expression)
        return self.expression in value


class FilterError(ValueError):
    """A Filter action Asterisk would refuse; the message is the reply's text."""


_CRITERION = re.compile(r"\s*(action|name|header|method)\(([^()]*)\)\s*")


def parse_filter(expression: str, criteria: str | None) -> EventFilter:
    """One filter from a Filter action's ``Filter`` and ``MatchCriteria`` headers."""
    if not criteria:
        include = not expression.startswith("!")
        regex = expression if include else expression[1:]
        return EventFilter(include, method=Method.REGEX, expression=regex, pattern=_compile(regex))
    found: dict[str, str] = {}
    for part in criteria.split(","):
        match = _CRITERION.fullmatch(part)
        if match is None or match.group(1) in found:
            raise FilterError(f"Invalid match criteria: {criteria}")
        found[match.group(1)] = match.group(2).strip()
    action = found.get("action", "include").lower()
    if action not in ("include", "exclude"):
        raise FilterError(f"Invalid match criteria: {criteria}")
    try:
        method = Method(found["method"].lower()) if "method" in found else (Method.REGEX if expression else Method.NONE)
    except ValueError:
        raise FilterError(f"Invalid match criteria: {criteria}") from None
    if method is not Method.NONE and not expression:
        raise FilterError("Filter expression is required with a match method")
    return EventFilter(action == "include", name=found.get("name") or None, header=found.get("header") or None,
                       method=method, expression=expression,
                       pattern=_compile(expression) if method is Method.REGEX else None)


def _compile(regex: str) -> re.Pattern[str]:
    try:
        return re.compile(regex)
    except re.error:
        raise FilterError("Filter did not compile.  Check the syntax of the filter given.") from None


@dataclass
class EventFilters:
    """One session's filters, in the order they were added."""

    filters: list[EventFilter] = field(default_factory=list)
    # Name-only filters, kept apart so most events are decided without their text.
    _included: set[str] = field(default_factory=set)
    _excluded: set[str] = field(default_factory=set)
    _others: list[EventFilter] = field(default_factory=list)
    _any_include: bool = False

    def add(self, event_filter: EventFilter) -> None:
        self.filters.append(event_filter)
        self._any_include |= event_filter.include
        if event_filter.by_name_only and event_filter.name is not None:
            (self._included if event_filter.include else self._excluded).add(event_filter.name)
        else:
            self._others.append(event_filter)

    def passes(self, name: str, text: Callable[[], str]) -> bool:
        """Whether the session is sent the event ``name``; ``text()`` gives its wire text."""
        if not self.filters:
            return True
        if name in self._excluded:
            return False
        others = self._others
        if not others:
            return name in self._included or not self._any_include
        payload = text()
        if self._any_include and name not in self._included and not any(
                f.include and f.matches(name, payload) for f in others):
            return False
        return not any(not f.include and f.matches(name, payload) for f in others)
