"""Stored scenarios: ``scenarios/NAME.yaml``, named by senders as ``scenario: NAME``, reloaded while
the gateway runs.

The running gateway looks at the folder every ``scenarios.reload_interval`` (file modification
time, size and inode): a new or edited file that reads cleanly replaces the version in force; one
that does not is refused with a logged ``file:line:column: message`` and the previous version
stays in force (a typo in an edit must not break the requests that use the scenario). A deleted
file's scenario is gone.

``scenario_for`` is the check ingress makes at DATA: the request's stored or inline scenario, read
and tied to the request (its parts, its numbers, the policy), or ``Refused`` naming the problem.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .config import Config
from .request import ExchangeRequest
from .scenario import NAME, LIMITS, Scenario, ScenarioError, ScenarioLimits, check_scenario, parse_scenario, \
    refusal, stored_scenario
from .status import Refused

log = logging.getLogger("mailgw.scenario")

INLINE = "inline scenario (line:column of the application/x-cti+yaml part)"


@dataclass(frozen=True)
class Change:
    name: str
    outcome: str  # "loaded", "refused" (the previous version stays), "removed"
    detail: str = ""


class ScenarioLibrary:
    def __init__(self, directory: Path, *, interval: float = 2.0, limits: ScenarioLimits = LIMITS) -> None:
        self.directory = Path(directory)
        self.interval = interval
        self.limits = limits
        self._scenarios: dict[str, Scenario] = {}
        self._texts: dict[str, str] = {}
        self._seen: dict[str, tuple[int, int, int]] = {}
        self._listeners: list[Callable[[Change], None]] = []

    def get(self, name: str) -> Scenario | None:
        return self._scenarios.get(name)

    def frozen(self, request: ExchangeRequest) -> ExchangeRequest:
        """``request`` carrying the text of the stored scenario it names, as in force now: an
        admin's later edit does not change a request already accepted (or one half-way through)."""
        text = self._texts.get(request.scenario_name or "")
        return replace(request, scenario_inline=text) if text is not None else request

    def names(self) -> list[str]:
        return sorted(self._scenarios)

    def listen(self, listener: Callable[[Change], None]) -> Callable[[], None]:
        """Call ``listener`` for every change a scan finds; returns the function that stops it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def scan(self) -> list[Change]:
        """Look at the folder once (blocking: run it off the loop) and apply what changed."""
        changes: list[Change] = []
        present: set[str] = set()
        try:
            paths = sorted(self.directory.glob("*.yaml"))
        except OSError as exc:
            log.error("scenarios: cannot list %s: %s", self.directory, exc)
            return changes
        for path in paths:
            name = path.stem
            if not NAME.fullmatch(name):
                continue  # not a name a sender could use (and the schema file is .json)
            present.add(name)
            try:
                stat = path.stat()
            except OSError:
                continue
            signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if self._seen.get(name) == signature:
                continue
            self._seen[name] = signature
            changes.append(self._load(name, path))
        for name in sorted(set(self._seen) - present):
            del self._seen[name]
            self._texts.pop(name, None)
            if self._scenarios.pop(name, None) is not None:
                log.info("scenario %s removed (%s is gone)", name, self.directory / f"{name}.yaml")
                changes.append(Change(name, "removed"))
        for change in changes:
            for listener in list(self._listeners):
                listener(change)
        return changes

    def _load(self, name: str, path: Path) -> Change:
        try:
            text = path.read_text(encoding="utf-8")
            scenario = stored_scenario(text, path, self.limits)
        except ScenarioError as exc:
            problems = "; ".join(p.show(str(path)) for p in exc.problems)
            kept = "the previous version stays in force" if name in self._scenarios else "it is not available"
            log.error("scenario %s refused, %s: %s", name, kept, problems)
            return Change(name, "refused", problems)
        except (OSError, UnicodeDecodeError) as exc:
            log.error("scenario %s: cannot read %s: %s", name, path, exc)
            return Change(name, "refused", str(exc))
        replaced = name in self._scenarios
        self._scenarios[name] = scenario
        self._texts[name] = text
        log.info("scenario %s %s from %s (%d steps)", name, "reloaded" if replaced else "loaded", path,
                 len(scenario.steps))
        return Change(name, "loaded")

    async def run(self) -> None:
        """Rescan every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await asyncio.to_thread(self.scan)
            except Exception:  # a bug must not stop reloading for good
                log.exception("scenarios: scan of %s failed", self.directory)


def scenario_for(request: ExchangeRequest, library: ScenarioLibrary, config: Config) -> Scenario | None:
    """The scenario ``request`` asks for, checked against it; ``Refused`` (550) naming the problem."""
    if request.scenario_name is not None:
        scenario = library.get(request.scenario_name)
        if scenario is None:
            known = ", ".join(library.names()) or "none"
            raise Refused(550, "5.6.0", f"field 'scenario': there is no stored scenario named "
                                        f"'{request.scenario_name}' (stored: {known})")
        where = f"stored scenario '{request.scenario_name}'"
    elif request.scenario_inline is not None:
        try:
            scenario = parse_scenario(request.scenario_inline, library.limits)
        except ScenarioError as exc:
            raise _refusal_for(exc, INLINE) from None
        where = INLINE
    else:
        return None
    problems = check_scenario(scenario, request, config)
    if problems:
        raise refusal(problems, where)
    return scenario


def _refusal_for(error: ScenarioError, where: str) -> Refused:
    refused = refusal(error.problems, where)
    if any("larger than" in p.message or "more than" in p.message or "nested" in p.message
           or "could take" in p.message for p in error.problems):
        return Refused(552, "5.3.4", refused.reply.text)
    return refused
