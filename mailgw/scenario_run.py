"""Running a scenario: the steps of one request's scenario, in order, each recorded as it goes.

Every step is a row in ``scenario_steps`` (see store.py), written when the step starts and when it
ends, so a gateway restarted in the middle goes on where it stopped:

* a finished step is not run again (its outcome is taken from the row);
* a ``wait`` sleeps only what is left of it; a ``confirm`` by mail keeps waiting for the answer to
  the inquiry it already sent (until the same deadline); a ``notify`` whose mail was not queued yet
  is sent (mail and step end are one transaction, so never twice);
* a call step (``play``, ``fax``, ``connect``, ``confirm`` by phone) whose call was placed but has no
  recorded end is NOT dialled again: it counts as failed ("interrupted"), because calling somebody
  twice is worse than telling the sender. A call that never left the gateway (the PBX was down) is
  placed normally.

What a step's outcome means for the scenario (``after_step``) is a plain function: an ``on:``
branch for the outcome runs instead of the failure rule; a confirm answered NG or not at all
follows ``on-no`` / ``on-timeout``; a failed step follows ``on-failure`` (``retry N`` retries the
call up to N more times). The run ends with one ``Result`` whose ``steps`` list every step, for the
sender's single summary mail.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Awaitable, Callable, Union

from . import media
from .config import Config
from .inquiry import answer_address
from .mdn import new_token
from .notify import Notifier, Result
from .numbering import normalise_number
from .outbound import Outbox
from .pbx.port import AskResult, CallOutcome, ConnectResult, DeliveryResult, PbxError, PbxPort, PbxUnavailable
from .request import ExchangeRequest, Part
from .scenario import (Afterwards, Confirm, Connect, Failure, Fax, Notify, Outcome, Parallel, Play, Scenario,
                       Step, Via, Wait, render, resolve_part, walk)
from .store import CallRow, MessageRow, StepRow, Store, utcnow

CallResult = Union[ConnectResult, DeliveryResult, AskResult]
Prepared = Union[media.PreparedVoice, media.PreparedFax]

log = logging.getLogger("mailgw.scenario")

# A call step's outcome -> the letter its `on:` branch gets in step paths ("1.B.2": the second step
# of the `on: busy` branch of step 1); short, because paths end up in call ids (at most 64 chars).
BRANCH_CODE = {Outcome.BUSY: "B", Outcome.NO_ANSWER: "N", Outcome.ANSWERED: "A", Outcome.FAILED: "F"}
INTERRUPTED = "the gateway restarted while this call was being placed; it was not dialled again"


@dataclass(frozen=True)
class StepResult:
    outcome: str  # answered, busy, no-answer, unreachable, ..., failed | yes, no, timeout | done
    ok: bool
    detail: str
    retryable: bool = False  # a call that may work when tried again (busy, no answer, ...)


@dataclass(frozen=True)
class Stop:
    """The scenario ends early: ``outcome`` and a sentence naming the step."""

    outcome: str
    detail: str


def branch_outcome(outcome: str) -> Outcome | None:
    """Which ``on:`` key a call outcome falls under (unreachable, congestion, ... count as failed)."""
    if outcome in (Outcome.ANSWERED, Outcome.BUSY, Outcome.NO_ANSWER):
        return Outcome(outcome)
    if outcome in ("yes", "no", "timeout", "done"):
        return None
    return Outcome.FAILED


def after_step(step: Step, path: str, result: StepResult) -> Stop | None:
    """Whether the scenario goes on after ``step`` ended with ``result`` (branches aside)."""
    action = step.action
    if isinstance(action, Confirm) and result.outcome in ("yes", "no", "timeout"):
        if result.outcome == "yes":
            return None
        rule = action.on_no if result.outcome == "no" else action.on_timeout
        if rule == Afterwards.CONTINUE:
            return None
        return Stop("declined" if result.outcome == "no" else "unconfirmed", f"step {path} ({step.kind}): {result.detail}")
    if result.ok or step.on_failure.action == Failure.CONTINUE:
        return None
    return Stop(result.outcome, f"step {path} ({step.kind}): {result.detail}")


def outcome_of(stop: Stop | None) -> tuple[str, str]:
    if stop is None:
        return "completed", "every step of the scenario was carried out"
    return stop.outcome, stop.detail


@dataclass
class _Run:
    """One request's scenario on its way; lives as long as the dispatcher works on the request."""

    runner: ScenarioRunner
    row: MessageRow
    request: ExchangeRequest
    scenario: Scenario
    records: dict[str, StepRow] = field(default_factory=dict)
    calls: dict[str, list[CallRow]] = field(default_factory=dict)  # step path -> its calls, as stored
    numbered: dict[str, int] = field(default_factory=dict)  # step path -> calls numbered so far
    prepared: dict[tuple[int, bool], Prepared] = field(default_factory=dict)  # (part, voice?) -> converted

    @property
    def config(self) -> Config:
        return self.runner.config

    async def go(self) -> Result:
        store = self.runner.store
        self.records = {r.path: r for r in await store.scenario_steps(self.row.id)}
        for call in await store.calls_for(self.row.id):
            path = _path_of_call(call.id, self.row.id)
            if path is not None:
                self.calls.setdefault(path, []).append(call)
        try:
            await self.prepare_media()
        except media.MediaError as exc:  # before anybody is called: the notice names the part
            stop: Stop | None = Stop("failed", f"a part cannot be played or sent: {exc}")
        else:
            stop = await self.sequence(self.scenario.steps, "")
        outcome, detail = outcome_of(stop)
        steps = tuple(_summary_line(r) for r in sorted(await store.scenario_steps(self.row.id),
                                                         key=lambda r: _sort_key(r.path)))
        return Result(self.row.id, outcome, detail, self.row.received_at, steps=steps,
                      scenario=self.scenario.name or "inline")

    async def sequence(self, steps: tuple[Step, ...], prefix: str) -> Stop | None:
        for number, step in enumerate(steps, start=1):
            stop = await self.step(step, f"{prefix}{number}")
            if stop is not None:
                return stop
        return None

    async def step(self, step: Step, path: str) -> Stop | None:
        result = await self.result_of(step, path)
        key = branch_outcome(result.outcome)
        branch = step.branch(key) if key is not None else None
        if branch is not None:
            return await self.sequence(branch, f"{path}.{BRANCH_CODE[key]}.")
        return after_step(step, path, result)

    async def result_of(self, step: Step, path: str) -> StepResult:
        """The step's result: recalled when it already ended, else carried out (with its retries)."""
        store = self.runner.store
        record = self.records.get(path)
        if record is not None and record.state == "done":
            return StepResult(record.outcome or "failed", record.ok, record.detail)
        if record is None:
            await store.start_step(self.row.id, path, step.kind)
        placed = [c for c in self.calls.get(path, []) if c.outcome != "not-placed"]
        if any(c.outcome is None for c in placed):
            result = StepResult("failed", False, INTERRUPTED)
            await store.finish_step(self.row.id, path, outcome=result.outcome, ok=False, detail=result.detail)
            return result
        attempts = len(placed)
        retries = step.on_failure.retries if step.on_failure.action == Failure.RETRY else 0
        while True:
            result = await self.perform(step, path, record)
            attempts += 1 if _places_calls(step) else 0
            if result.ok or not result.retryable or attempts > retries:
                break
            log.info("request %s step %s: %s; retry %d of %d", self.row.id, path, result.outcome, attempts, retries)
        if attempts > 1:
            result = StepResult(result.outcome, result.ok, f"{result.detail} (after {attempts} attempts)")
        if not isinstance(step.action, (Notify,)):  # a note ends together with its mail (see notify)
            await store.finish_step(self.row.id, path, outcome=result.outcome, ok=result.ok, detail=result.detail)
        return result

    async def perform(self, step: Step, path: str, record: StepRow | None) -> StepResult:
        action = step.action
        if isinstance(action, Play):
            return await self.play(action, path)
        if isinstance(action, Fax):
            return await self.fax(action, path)
        if isinstance(action, Connect):
            return await self.connect(action, path)
        if isinstance(action, Confirm):
            if action.via == Via.PHONE:
                return await self.ask_by_phone(action, path)
            return await self.ask_by_mail(action, path, record)
        if isinstance(action, Wait):
            return await self.wait(action, record)
        if isinstance(action, Parallel):
            return await self.parallel(action, path)
        assert isinstance(action, Notify)
        return await self.notify(action, path)

    # --- call steps ---

    def destination(self, written: str | None) -> str:
        if written:
            return normalise_number(written, region=self.config.numbering.region)
        assert self.request.to_number is not None  # check_scenario refused a scenario without 'to'
        return self.request.to_number

    def fax_destination(self, written: str | None) -> tuple[str, str]:
        """(the number to fax, how mails show it): the destination person's fax machine by default."""
        if written:
            number = self.destination(written)
            return number, self.show(number)
        person = self.runner.notifier.directory.by_extension(self.destination(None))
        if person is not None and person.fax:
            shown = "(confidential)" if self.request.confidential else f"the fax of {person.name} ({person.fax})"
            return person.fax, shown
        return self.destination(None), self.show(self.destination(None))

    async def play(self, action: Play, path: str) -> StepResult:
        number = self.destination(action.to)
        prepared = self.media_for(action)
        call = lambda call_id: self.runner.pbx.play(call_id, number, prepared.path, **self.ring())  # noqa: E731
        result = await self.place(path, number, call)
        if isinstance(result, StepResult):
            return result
        if result.outcome == CallOutcome.ANSWERED:
            return StepResult("answered", True, f"{self.show(number)} heard {_part_name(action.part.written)} "
                                                f"({prepared.seconds:.0f} s)")
        return self.failed_call(result.outcome, number, result.cause)

    async def fax(self, action: Fax, path: str) -> StepResult:
        number, shown = self.fax_destination(action.to)
        prepared = self.media_for(action)
        call = lambda call_id: self.runner.pbx.send_fax(call_id, number, prepared.path, **self.ring())  # noqa: E731
        result = await self.place(path, number, call)
        if isinstance(result, StepResult):
            return result
        if result.outcome == CallOutcome.ANSWERED and result.pages:
            return StepResult("answered", True, f"{shown} received {result.pages} of {prepared.pages} "
                                                f"page{'s' if prepared.pages != 1 else ''}")
        if result.outcome == CallOutcome.ANSWERED:
            return StepResult("failed", False, f"{shown} answered but took no page (not a fax machine?)")
        return self.failed_call(result.outcome, number, result.cause)

    async def connect(self, action: Connect, path: str) -> StepResult:
        number = self.destination(action.to)
        caller = normalise_number(action.from_, region=self.config.numbering.region) if action.from_ \
            else self.request.from_number
        if caller is None:
            return StepResult("failed", False, "the request says no 'from' number to connect")
        call = lambda call_id: self.runner.pbx.connect(call_id, caller, number, **self.ring())  # noqa: E731
        result = await self.place(path, number, call, caller=caller)
        if isinstance(result, StepResult):
            return result
        if result.outcome == CallOutcome.ANSWERED:
            return StepResult("answered", True, f"{self.show(caller)} and {self.show(number)} were put through")
        failed = caller if str(result.failed_party) == "from" else number
        return self.failed_call(result.outcome, failed, result.cause)

    async def ask_by_phone(self, action: Confirm, path: str) -> StepResult:
        number = self.destination(None)
        prompt = self.config.scenarios.confirm_prompt
        call = lambda call_id: self.runner.pbx.ask(call_id, number, prompt, timeout=action.timeout,  # noqa: E731
                                                   **self.ring())
        result = await self.place(path, number, call)
        if isinstance(result, StepResult):
            return result
        if result.outcome != CallOutcome.ANSWERED:
            return self.failed_call(result.outcome, number, result.cause)
        if result.digit == "1":
            return StepResult("yes", True, f"{self.show(number)} pressed 1 (yes)")
        if result.digit == "2":
            return StepResult("no", False, f"{self.show(number)} pressed 2 (no)")
        pressed = f"pressed {result.digit}" if result.digit else "pressed nothing"
        return StepResult("timeout", False, f"{self.show(number)} answered but {pressed}")

    def ring(self) -> dict[str, Any]:
        return {"ring_timeout": self.config.pbx.ring_timeout, "caller_id": self.config.pbx.caller_id}

    async def place(self, path: str, number: str, call: Callable[[str], Awaitable[CallResult]], *,
                    caller: str | None = None) -> CallResult | StepResult:
        """One call of a step: its row is written before the Originate; the PBX's answer recorded.
        Call ids count every call of the step, the ones that never left the gateway too."""
        store = self.runner.store
        self.numbered[path] = self.numbered.get(path, len(self.calls.get(path, []))) + 1
        call_id = f"{self.row.id}-s{path}-{self.numbered[path]}"
        async with self.runner.call_slots:
            await store.start_call(self.row.id, call_id, caller or "", number)
            try:
                result = await call(call_id)
            except PbxUnavailable:
                await store.finish_call(call_id, outcome="not-placed", failed_party=None, cause=None,
                                        from_answered_at=None, to_answered_at=None, ended_at=utcnow())
                raise  # nothing was dialled: the dispatcher tries the request again later
            except PbxError as exc:
                await store.finish_call(call_id, outcome="failed", failed_party=None, cause=None,
                                        from_answered_at=None, to_answered_at=None, ended_at=utcnow())
                return StepResult("failed", False, f"the PBX did not answer in time ({exc})")
        answered = getattr(result, "answered_at", None) or getattr(result, "to_answered_at", None)
        await store.finish_call(call_id, outcome=str(result.outcome),
                                failed_party=str(getattr(result, "failed_party", None) or "") or None,
                                cause=result.cause, from_answered_at=getattr(result, "from_answered_at", None),
                                to_answered_at=answered, ended_at=result.ended_at)
        return result

    def failed_call(self, outcome: CallOutcome, number: str, cause: int | None) -> StepResult:
        sentence = {
            CallOutcome.BUSY: "was busy", CallOutcome.NO_ANSWER: "did not answer",
            CallOutcome.UNREACHABLE: "could not be reached", CallOutcome.CONGESTION: "could not be reached "
            "(network congested)", CallOutcome.INVALID: "is not a number in service",
            CallOutcome.REJECTED: "rejected the call",
        }.get(outcome, "could not be called")
        detail = f"{self.show(number)} {sentence}" + (f" (cause {cause})" if cause is not None else "")
        retryable = outcome in (CallOutcome.BUSY, CallOutcome.NO_ANSWER, CallOutcome.UNREACHABLE,
                                CallOutcome.CONGESTION, CallOutcome.FAILED)
        return StepResult(str(outcome), False, detail, retryable=retryable)

    def show(self, number: str) -> str:
        return self.runner.notifier.label(number, self.request.confidential)

    async def prepare_media(self) -> None:
        """Convert every voice and FAX part the scenario uses, once, before its first call: a
        broken part fails the request before anybody is rung, and parallel branches start their
        calls together instead of one waiting for a conversion."""
        wanted: dict[tuple[int, bool], Part] = {}
        for step in walk(self.scenario.steps):
            if isinstance(step.action, (Play, Fax)):
                part = resolve_part(step.action.part, self.request.parts)
                if isinstance(part, str):  # checked at DATA; only limits changed since can get here
                    raise media.MediaError(f"{step.action.part.written}: {part}")
                wanted[(part.index, isinstance(step.action, Play))] = part
        raw = await self.runner.store.raw_message(self.row) if wanted else b""
        for (index, voice), part in sorted(wanted.items()):
            self.prepared[(index, voice)] = await asyncio.to_thread(_convert, raw, part, self.row.id, voice, self.config)

    def media_for(self, action: Play | Fax) -> Prepared:
        part = resolve_part(action.part, self.request.parts)
        assert not isinstance(part, str)  # prepare_media resolved it already
        return self.prepared[(part.index, isinstance(action, Play))]

    # --- other steps ---

    async def ask_by_mail(self, action: Confirm, path: str, record: StepRow | None) -> StepResult:
        started = record.started_at if record is not None else utcnow()
        deadline = started + timedelta(seconds=action.timeout)
        token = record.token if record is not None else None
        waiter = None
        if token is None:
            asked = self.asked_address()
            if asked is None:
                return StepResult("failed", False, "nobody to ask by mail: the destination has no mail address "
                                                   "in the directory")
            token = new_token()
            waiter = self.runner.expect_answer(token)
            person = self.runner.notifier.directory.by_address(asked)
            mail = self.runner.notifier.inquiry_mail(
                self.request, self.row.id, to=asked, language=person.language if person else self.config.language,
                ask=render(action.ask, self.request, self.row.id, label=self.show), deadline=deadline,
                reply_to=answer_address(self.config.sender_address, token))
            entry = await self.runner.outbox.prepare(mail, rcpt_to=asked, request_id=self.row.id)
            await self.runner.store.ask_by_mail(self.row.id, path, token=token, asked=asked, inquiry=entry)
            self.runner.outbox.wake()
            log.info("request %s step %s: asked %s by mail (until %s)", self.row.id, path, asked,
                     deadline.astimezone().strftime("%H:%M:%S"))
        else:
            waiter = self.runner.expect_answer(token)
        try:
            fresh = {r.path: r for r in await self.runner.store.scenario_steps(self.row.id)}.get(path)
            answer = fresh.answer if fresh is not None else None
            if answer is None:
                left = (deadline - utcnow()).total_seconds()
                try:
                    answer = await asyncio.wait_for(asyncio.shield(waiter), timeout=max(left, 0.0))
                except asyncio.TimeoutError:
                    return StepResult("timeout", False, f"no answer to the inquiry by "
                                                        f"{deadline.astimezone():%H:%M}")
        finally:
            self.runner.forget_answer(token)
        if answer == "yes":
            return StepResult("yes", True, "the recipient answered OK")
        return StepResult("no", False, "the recipient answered NG")

    def asked_address(self) -> str | None:
        directory = self.runner.notifier.directory
        person = directory.by_extension(self.request.to_number or "") or directory.by_address(self.request.recipient)
        return person.address if person is not None else None

    async def wait(self, action: Wait, record: StepRow | None) -> StepResult:
        started = record.started_at if record is not None else utcnow()
        left = (started + timedelta(seconds=action.seconds) - utcnow()).total_seconds()
        if left > 0:
            await asyncio.sleep(left)
        return StepResult("done", True, f"waited {action.seconds:g} s")

    async def parallel(self, action: Parallel, path: str) -> StepResult:
        stops = await asyncio.gather(*(self.sequence(branch, f"{path}.b{number}.")
                                       for number, branch in enumerate(action.branches, start=1)))
        failed = [stop for stop in stops if stop is not None]
        if failed:
            return StepResult(failed[0].outcome, False, failed[0].detail)
        return StepResult("done", True, f"{len(action.branches)} branches done")

    async def notify(self, action: Notify, path: str) -> StepResult:
        text = render(action.text, self.request, self.row.id, label=self.show)
        to = {"sender": self.request.sender, "recipient": self.asked_address() or self.request.recipient}.get(
            action.to, action.to)
        person = self.runner.notifier.directory.by_address(to)
        language = person.language if person else (self.request.language if to == self.request.sender
                                                   else self.config.language)
        mail = self.runner.notifier.note_mail(self.request, self.row.id, to=to, language=language, text=text)
        entry = await self.runner.outbox.prepare(mail, rcpt_to=to, request_id=self.row.id)
        result = StepResult("done", True, f"note mailed to {to}")
        await self.runner.store.finish_step(self.row.id, path, outcome=result.outcome, ok=True, detail=result.detail,
                                            mails=[entry])
        self.runner.outbox.wake()
        return result


class ScenarioRunner:
    """Runs scenarios for the dispatcher; holds the answers awaited from inquiry mails."""

    def __init__(self, config: Config, store: Store, pbx: PbxPort, notifier: Notifier, outbox: Outbox,
                 call_slots: asyncio.Semaphore) -> None:
        self.config = config
        self.store = store
        self.pbx = pbx
        self.notifier = notifier
        self.outbox = outbox
        self.call_slots = call_slots
        self._answers: dict[str, asyncio.Future[str]] = {}

    async def run(self, row: MessageRow, request: ExchangeRequest, scenario: Scenario) -> Result:
        """Carry out (or go on with) ``scenario`` for the stored request ``row``; PbxUnavailable when the
        PBX could not be reached for a step (nothing dialled: try the request again later)."""
        return await _Run(self, row, request, scenario).go()

    def expect_answer(self, token: str) -> asyncio.Future[str]:
        future = self._answers.get(token)
        if future is None or future.done():
            future = asyncio.get_running_loop().create_future()
            self._answers[token] = future
        return future

    def forget_answer(self, token: str) -> None:
        self._answers.pop(token, None)

    def answered(self, token: str, answer: str) -> None:
        """An answer was recorded in the store: wake the step waiting for it (if this run has one)."""
        future = self._answers.get(token)
        if future is not None and not future.done():
            future.set_result(answer)


def _convert(raw: bytes, part: Part, request_id: str, voice: bool, config: Config) -> Prepared:
    data = media.part_bytes(raw, part)
    limits = media.MediaLimits.of(config.media)
    name = f"{request_id}-part{part.index}"
    if voice:
        return media.prepare_voice(part, data, media.spool_dir(config), name, limits)
    return media.prepare_fax(part, data, media.spool_dir(config), name, limits)


def _places_calls(step: Step) -> bool:
    return isinstance(step.action, (Play, Fax, Connect)) or (isinstance(step.action, Confirm)
                                                            and step.action.via == Via.PHONE)


def _path_of_call(call_id: str, request_id: str) -> str | None:
    """``<request>-s1.b2.1-3`` -> ``1.b2.1`` (the step), None for calls that are no scenario step's."""
    prefix = f"{request_id}-s"
    if not call_id.startswith(prefix):
        return None
    path, _, attempt = call_id[len(prefix):].rpartition("-")
    return path if path and attempt.isdigit() else None


def _sort_key(path: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (0, p) for p in path.split(".")]


def _summary_line(record: StepRow) -> str:
    return f"{record.path}. {record.kind}: {record.outcome or 'not finished'} - {record.detail}"


def _part_name(written: str) -> str:
    return f"the voice message ({written})"

