"""Dispatch: run each stored request once, record how it ended, and tell the sender.

The dispatcher works only from what the store holds, so a restarted gateway picks up exactly where
the last one stopped:

* ``queued`` entries run (again) from the start; nothing was dialled for them yet;
* an ``executing`` request whose call row exists but has no outcome was cut off mid-call by a
  crash: it is NOT dialled again (a second call is worse than a failure notice); the sender is told;
* a PBX that cannot be reached leaves the request queued and retried until its monitor window
  closes; then the sender gets a failure notice;
* camp-on, status monitor and cancel requests — and a ``retry: yes`` connect whose first attempt
  failed for a temporary reason — are handed to ``campon.Campons``, which keeps their state in its
  own table and resumes them itself.

Decisions (what to do with a request, what a call result means for the sender) are plain functions
at the bottom; the class only moves data between the store, the PBX port and the outbox.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
from email.header import Header
from email.message import Message
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Callable

from . import imapbox, inquiry, mailbox, mdn
from .campon import Campons, should_camp
from .config import Config
from .notify import Notifier, Result
from .outbound import Outbox
from .pbx.port import CallOutcome, ConnectResult, Party, PbxError, PbxPort, PbxUnavailable
from .request import Action, ExchangeRequest, Trigger, describe
from .scenario import Scenario, ScenarioError, describe_steps, parse_scenario
from .scenario_run import ScenarioRunner
from .status import Refused
from .store import CallEnd, MessageRow, MessageState, Store, utcnow

log = logging.getLogger("mailgw.dispatch")

PBX_RETRY_SECONDS = 5.0  # first wait when the PBX is down; doubles up to a minute
MAILBOX_RETRY_SECONDS = 30.0  # a remote IMAP mailbox that refused or could not be reached


class Dispatcher:
    def __init__(self, config: Config, store: Store, pbx: PbxPort, notifier: Notifier, outbox: Outbox) -> None:
        self.config = config
        self.store = store
        self.pbx = pbx
        self.notifier = notifier
        self.outbox = outbox
        self._calls = asyncio.Semaphore(config.pbx.max_concurrent_calls)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._pbx_failures = 0
        self.campons: Campons | None = None  # set by the gateway; without it camp-ons are not run
        self.reading = mailbox.ReadWatcher(config.mailbox_root, on_read=self._on_read, on_gone=self._on_gone,
                                           on_expired=self._on_unread_expired)
        self.imap_reading = imapbox.ImapReadWatcher(on_read=self._on_read, on_gone=self._on_gone,
                                                    on_expired=self._on_unread_expired)
        self.receipt_deadlines = mdn.ReceiptDeadlines(on_expired=self._on_unread_expired)
        self._read_fired: set[str] = set()  # two paths (receipt and flag, read twice) run it once
        self.scenarios = ScenarioRunner(config, store, pbx, notifier, outbox, self._calls)
        self.mailboxes: mailbox.Deliveries = mailbox.InThread()  # the gateway's MailboxAgent by default

    def submit(self, rows: list[MessageRow]) -> None:
        """Called by ingress after the 250 with the rows it stored: start working on them (without
        reading back what ingress has just written; a fresh entry has no calls yet either)."""
        for row in rows:
            self._start(row.id, fresh=row)

    async def resume(self) -> None:
        """Pick up everything a previous run left unfinished."""
        unfinished = await self.store.unfinished_messages()
        if unfinished:
            log.info("resuming %d unfinished entries", len(unfinished))
        for row in unfinished:
            self._start(row.id)

    async def stop(self) -> None:
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, message_id: str, delay: float = 0.0, fresh: MessageRow | None = None) -> None:
        if message_id in self._running:
            return
        task = asyncio.create_task(self._work(message_id, delay, fresh), name=f"dispatch-{message_id}")
        self._running[message_id] = task
        task.add_done_callback(lambda done: self._forget(message_id, done))

    def _forget(self, message_id: str, task: asyncio.Task[None]) -> None:
        # A task that rescheduled itself has already been replaced; keep the replacement.
        if self._running.get(message_id) is task:
            del self._running[message_id]

    async def _work(self, message_id: str, delay: float, fresh: MessageRow | None) -> None:
        if delay:
            await asyncio.sleep(delay)
        try:
            row = fresh or await self.store.get_message(message_id)
            if row is None or row.state in (MessageState.DONE, MessageState.FAILED):
                return
            if row.kind == "mail":
                await self._deliver_mail(row)
            else:
                await self._run_request(row, fresh=fresh is not None)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug must not silently drop the entry: it stays queued and is retried on restart.
            log.exception("entry %s: unexpected error; left queued", message_id)

    async def _deliver_mail(self, row: MessageRow) -> None:
        raw = await self.store.raw_message(row)
        token = mdn.token_of(row.rcpt_to, self.config.sender_address)
        if token is not None:
            await self._take_receipt(row, token, raw)
            return
        token = inquiry.answer_token(row.rcpt_to, self.config.sender_address)
        if token is not None:
            await self._take_answer(row, token, raw)
            return
        try:
            await self.mailboxes.deliver(self.config.mailbox_root, row.rcpt_to, raw, group=self.config.mailbox_group)
        except (mailbox.MailboxError, OSError) as exc:  # a full disk, the agent gone: not lost, tried again
            await self.store.set_state(row.id, MessageState.QUEUED, stage="waiting",
                                       detail=f"mailbox unavailable ({exc}); retry in {MAILBOX_RETRY_SECONDS:.0f}s",
                                       not_before=utcnow() + timedelta(seconds=MAILBOX_RETRY_SECONDS))
            log.warning("mail %s: could not deliver to the mailbox of %s (%s); retry in %.0fs", row.id, row.rcpt_to,
                        exc, MAILBOX_RETRY_SECONDS)
            self._start_later(row.id, MAILBOX_RETRY_SECONDS)
            return
        await self.store.set_state(row.id, MessageState.DONE, stage="delivered", detail=f"to {row.rcpt_to}")
        log.info("mail %s delivered to the mailbox of %s", row.id, row.rcpt_to)

    async def _take_receipt(self, row: MessageRow, token: str, raw: bytes) -> None:
        """A read receipt (MDN) for an on-read request: displayed runs it, deleted ends it."""
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
        waiting = await self.store.awaiting_read_by_link(mdn.LINK_PREFIX + token)
        mailbox_address = self._receipt_mailbox(waiting.rcpt_to) if waiting is not None else None
        receipt, verdict = mdn.judge(message, row.mail_from, mailbox_address)
        await self.store.set_state(row.id, MessageState.DONE, stage="receipt", detail=verdict)
        log.info("read receipt %s: %s", row.id, verdict)
        if receipt is None or waiting is None:
            return
        if receipt.disposition == "displayed":
            await self._on_read(waiting.id)
        elif receipt.disposition == "deleted":
            self.receipt_deadlines.forget(waiting.id)
            await self._on_gone(waiting.id)

    async def _take_answer(self, row: MessageRow, token: str, raw: bytes) -> None:
        """A reply to a scenario's inquiry mail: OK / NG from the person asked goes to the waiting step."""
        message = email.message_from_bytes(raw, policy=email.policy.default)
        step = await self.store.step_by_token(token)
        waiting = step is not None and step.state == "running"
        answer, verdict = inquiry.judge_answer(message, row.mail_from, step.asked if waiting and step else None)
        if answer is not None and step is not None:
            if not await self.store.answer_step(step.request_id, step.path, answer.answer, answer.sender):
                answer, verdict = None, f"{verdict}, but the inquiry was answered already"
        await self.store.set_state(row.id, MessageState.DONE, stage="answer", detail=verdict)
        log.info("inquiry answer %s: %s", row.id, verdict)
        if answer is not None:
            self.scenarios.answered(token, answer.answer)

    async def _run_request(self, row: MessageRow, *, fresh: bool = False) -> None:
        assert row.request is not None
        request = ExchangeRequest.from_json(row.request)
        if self.campons is not None:
            if self.campons.is_pending(row.id):
                return  # a camp-on resumed from its own row
            if request.action in CAMPON_ACTIONS and not request.dry_run:
                await self.campons.handle(row, request)
                return
        if request.trigger == Trigger.ON_READ and not request.dry_run and not await self._was_read(row):
            await self._await_reading(row, request)
            return
        now = utcnow()
        decision = decide(request, row, now, label=lambda n: self.notifier.label(n, request.confidential))
        if isinstance(decision, Wait):
            self._start_later(row.id, decision.seconds)
            return
        if isinstance(decision, Finish):
            await self._finish(row, request, decision.result)
            return
        if request.scenario_inline is not None:
            await self._run_scenario(row, request)
            return

        calls = [] if fresh else await self.store.calls_for(row.id)
        interrupted = next((c for c in calls if c.outcome is None), None)
        if interrupted is not None:
            still_up = await self._still_up(interrupted.id)
            detail = ("the gateway restarted while this call was being placed"
                      + ("; the call is still up on the PBX" if still_up else "")
                      + "; it was not dialled again so that nobody is called twice")
            await self._finish(row, request, Result(row.id, "failed", detail, row.received_at, reason="interrupted"),
                               call=CallEnd(interrupted.id, "failed", ended_at=now))
            return

        call_id = f"{row.id}-{len(calls) + 1}"
        log.info("request %s executing: %s (call %s)", row.id, describe(request), call_id)
        async with self._calls:
            await self.store.start_call(row.id, call_id, request.from_number, request.to_number)  # type: ignore[arg-type]
            try:
                result = await self.pbx.connect(call_id, request.from_number, request.to_number,  # type: ignore[arg-type]
                                                ring_timeout=self.config.pbx.ring_timeout,
                                                caller_id=self.config.pbx.caller_id)
            except PbxUnavailable as exc:
                await self._pbx_down(row, call_id, exc)
                return
            except PbxError as exc:
                # The Originate may have reached the PBX: do not dial again.
                await self._finish(row, request, Result(row.id, "failed", f"the PBX did not answer in time ({exc})",
                                                        row.received_at, reason="pbx-timeout"),
                                   call=CallEnd(call_id, "failed"))
                return
        self._pbx_failures = 0
        if self.campons is not None and request.retry and should_camp(result):
            await self.campons.after_first_attempt(row, request, call_id, result)
            return
        await self._finish(row, request, call_result(row, request, result),
                           call=CallEnd(call_id, str(result.outcome), result.failed_party and str(result.failed_party),
                                        result.cause, result.from_answered_at, result.to_answered_at,
                                        result.ended_at))

    async def _run_scenario(self, row: MessageRow, request: ExchangeRequest) -> None:
        """The request's scenario (FIG. 39-43), step by step; resumed where a restart left it."""
        try:
            scenario = scenario_of(request)
        except ScenarioError as exc:  # accepted under other limits (an upgrade): say so, do nothing
            await self._finish(row, request, Result(row.id, "failed", f"the scenario cannot be run: {exc}",
                                                    row.received_at))
            return
        log.info("request %s executing scenario %s (%d steps)", row.id, scenario.name, len(scenario.steps))
        try:
            result = await self.scenarios.run(row, request, scenario)
        except PbxUnavailable as exc:
            await self._pbx_unavailable(row, exc)
            return
        self._pbx_failures = 0
        await self._finish(row, request, result)

    # --- user-reception trigger (seed 004, FIG. 34/36): run when the recipient reads the mail ---

    async def _was_read(self, row: MessageRow) -> bool:
        return any(stage == "read" for _, stage, _ in await self.store.stages(row.id))

    async def _await_reading(self, row: MessageRow, request: ExchangeRequest) -> None:
        """Deliver the request to its recipient's mailbox (once) and watch for it being read."""
        deadline = row.received_at + timedelta(seconds=request.monitor)
        account = self._imap_account(row.rcpt_to)
        if row.state == MessageState.AWAITING_READ and row.detail:  # resumed after a restart
            self._watch(row.id, row.rcpt_to, account, row.detail, deadline)
            return
        raw = await self.store.raw_message(row)
        note = on_read_header(request, self.notifier)
        marked = f"X-CTI-On-Read: {note}\r\n".encode("utf-8") + raw
        forward = None
        receipt_mailbox = self._receipt_mailbox(row.rcpt_to)
        if receipt_mailbox is not None:
            token = mdn.new_token()
            forward = await self.outbox.prepare(asking_for_receipt(marked, self.config.sender_address, token),
                                                rcpt_to=receipt_mailbox, request_id=row.id)
            link = mdn.LINK_PREFIX + token
        elif account is not None:
            try:
                link = await imapbox.append(account, marked)
            except imapbox.ImapError as exc:
                # Nothing was delivered: try again later, within the request's monitor window.
                await self._mailbox_down(row, request, deadline, exc)
                return
        else:
            try:
                path = await self.mailboxes.deliver(self.config.mailbox_root, row.rcpt_to, marked,
                                                    group=self.config.mailbox_group)
            except (mailbox.MailboxError, OSError) as exc:
                await self._mailbox_down(row, request, deadline, exc)
                return
            link = path.name
        mails = [forward] if forward is not None else []
        if request.notify:
            mail = self.notifier.result_mail(request, Result(row.id, "delivered", f"delivered to {row.rcpt_to}",
                                                             row.received_at, deadline=deadline))
            mails.append(await self.outbox.prepare(mail, rcpt_to=request.sender, request_id=row.id))
        await self.store.await_read(row.id, link, mails)
        self._watch(row.id, row.rcpt_to, account, link, deadline)
        log.info("request %s delivered to the mailbox of %s; runs when it is read (until %s)", row.id,
                 row.rcpt_to, deadline.astimezone().strftime("%H:%M:%S"))
        if mails:
            self.outbox.wake()

    def _receipt_mailbox(self, address: str) -> str | None:
        person = self.notifier.directory.by_address(address)
        return person.receipt_mailbox if person is not None else None

    def _imap_account(self, address: str) -> imapbox.ImapAccount | None:
        person = self.notifier.directory.by_address(address)
        return person.imap if person is not None else None

    def _watch(self, message_id: str, address: str, account: imapbox.ImapAccount | None, link: str,
               deadline: datetime) -> None:
        if link.startswith(mdn.LINK_PREFIX):
            self.receipt_deadlines.watch(message_id, deadline)
        elif account is not None and imapbox.parse_link(link) is not None:
            self.imap_reading.watch(message_id, account, link, deadline)
        else:
            self.reading.watch(message_id, address, link, deadline)

    async def _mailbox_down(self, row: MessageRow, request: ExchangeRequest, deadline: datetime,
                            exc: Exception) -> None:
        if utcnow() >= deadline:
            await self._finish(row, request, Result(row.id, "failed", f"could not deliver to the mailbox of "
                                                    f"{row.rcpt_to} ({exc})", row.received_at, reason="expired"))
            return
        delay = min(MAILBOX_RETRY_SECONDS, max((deadline - utcnow()).total_seconds(), 0.0))
        await self.store.set_state(row.id, MessageState.QUEUED, stage="waiting",
                                   detail=f"mailbox unavailable ({exc}); retry in {delay:.0f}s",
                                   not_before=utcnow() + timedelta(seconds=delay))
        log.warning("request %s: mailbox of %s unavailable (%s); retry in %.0fs", row.id, row.rcpt_to, exc, delay)
        self._start_later(row.id, delay)

    async def _on_read(self, message_id: str) -> None:
        if message_id in self._read_fired:
            return
        self._read_fired.add(message_id)
        row = await self.store.get_message(message_id)
        if row is None or row.state != MessageState.AWAITING_READ:
            return  # already read (another path, or before a restart) or ended
        self.receipt_deadlines.forget(message_id)
        await self.store.set_state(message_id, MessageState.QUEUED, stage="read")
        log.info("request %s: its mail was read; executing", message_id)
        self._start(message_id)

    async def _on_gone(self, message_id: str) -> None:
        await self._end_unread(message_id, "deleted", "the recipient deleted the message without reading it")

    async def _on_unread_expired(self, message_id: str) -> None:
        await self._end_unread(message_id, "expired", "the recipient did not read the message within its "
                                                      "monitor time", reason="expired")

    async def _end_unread(self, message_id: str, outcome: str, detail: str, reason: str | None = None) -> None:
        row = await self.store.get_message(message_id)
        if row is None or row.state != MessageState.AWAITING_READ or row.request is None:
            return
        await self._finish(row, ExchangeRequest.from_json(row.request),
                           Result(row.id, outcome, detail, row.received_at, reason=reason))

    async def _pbx_down(self, row: MessageRow, call_id: str, exc: Exception) -> None:
        """Nothing was dialled: forget the attempt and try again later, within the monitor window."""
        await self.store.finish_call(call_id, outcome="not-placed", failed_party=None, cause=None,
                                     from_answered_at=None, to_answered_at=None, ended_at=utcnow())
        await self._pbx_unavailable(row, exc)

    async def _pbx_unavailable(self, row: MessageRow, exc: Exception) -> None:
        self._pbx_failures += 1
        delay = min(PBX_RETRY_SECONDS * 2 ** (self._pbx_failures - 1), 60.0)
        await self.store.set_state(row.id, MessageState.QUEUED, stage="waiting",
                                   detail=f"PBX unavailable ({exc}); retry in {delay:.0f}s",
                                   not_before=utcnow() + timedelta(seconds=delay))
        log.warning("request %s: PBX unavailable (%s); retry in %.0fs", row.id, exc, delay)
        self._start_later(row.id, delay)

    def _start_later(self, message_id: str, seconds: float) -> None:
        self._running.pop(message_id, None)
        self._start(message_id, delay=max(seconds, 0.0))

    async def _still_up(self, call_id: str) -> bool:
        try:
            return await self.pbx.find_call(call_id)
        except PbxError:
            return False

    async def _finish(self, row: MessageRow, request: ExchangeRequest, result: Result,
                      call: CallEnd | None = None) -> None:
        ok = result.outcome in ("answered", "dry-run", "completed")
        notification, content = None, b""
        if should_notify(request, result):
            mail = self.notifier.result_mail(request, result)
            notification, content = self.outbox.compose(mail, rcpt_to=request.sender, request_id=row.id)
        # The result mail is stored in the same transaction as the outcome, and then handed to the
        # outbox in memory: no file to fsync, no read of the table.
        await self.store.finish_request(row.id, MessageState.DONE if ok else MessageState.FAILED,
                                        outcome=result.outcome, status=result.status, detail=result.detail,
                                        notification=notification, call=call)
        log.info("request %s outcome: %s (%s) %s", row.id, result.outcome, result.status,
                 "" if request.confidential else result.detail)
        if notification is not None:
            self.outbox.take_stored([(notification, content, None)])


# --- decisions ----------------------------------------------------------------------------------

CAMPON_ACTIONS = (Action.CAMP_ON, Action.MONITOR, Action.CANCEL)


def check_supported(request: ExchangeRequest, *, to_person: bool = True) -> None:
    """Refuse at DATA what this gateway cannot carry out yet, rather than accept and fail later."""
    if request.action not in (Action.CONNECT, *CAMPON_ACTIONS):
        raise Refused(550, "5.3.3", f"field 'action': '{request.action}' is not available on this gateway yet")
    if request.trigger == Trigger.ON_READ and (request.action != Action.CONNECT or not to_person):
        raise Refused(550, "5.3.3", "field 'trigger': 'on-read' needs action 'connect' and a person as the "
                                    "recipient (someone who reads the mail)")
    if (request.scenario_name or request.scenario_inline) and request.action != Action.CONNECT:
        raise Refused(550, "5.3.3", f"field 'scenario': a scenario runs with action 'connect', not "
                                    f"'{request.action}'")


def scenario_of(request: ExchangeRequest) -> Scenario:
    """The scenario a stored request carries (a stored one's text was frozen into it at DATA)."""
    assert request.scenario_inline is not None
    scenario = parse_scenario(request.scenario_inline)
    return replace(scenario, name=request.scenario_name or scenario.name or "inline")


@dataclass(frozen=True)
class Wait:
    seconds: float


@dataclass(frozen=True)
class Finish:
    result: Result


@dataclass(frozen=True)
class Dial:
    pass


def decide(request: ExchangeRequest, row: MessageRow, now: datetime,
           label: Callable[[str], str] = str) -> Wait | Finish | Dial:
    """What to do with a stored request right now (``label`` shows a number in a dry-run plan)."""
    if request.dry_run:
        return Finish(Result(row.id, "dry-run", "dry run: nothing was dialled", row.received_at,
                             dry_run_plan=plan(request, label)))
    window_opens = max(row.received_at, request.at) if request.at else row.received_at
    deadline = window_opens + timedelta(seconds=request.monitor)
    start = max(window_opens, row.not_before or window_opens)
    if start > now:
        return Wait((start - now).total_seconds())
    if now > deadline:
        return Finish(Result(row.id, "expired",
                             f"the request could not be carried out within its monitor time "
                             f"({_minutes(request.monitor)})", row.received_at, reason="expired"))
    return Dial()


def asking_for_receipt(raw: bytes, gateway_address: str, token: str) -> Message:
    """The request mail as sent on to a receipt mailbox: its read receipt comes to the gateway."""
    # compat32 keeps the sender's headers as they came; no folding of the one header we add.
    message = email.message_from_bytes(raw, policy=email.policy.compat32.clone(max_line_length=998))
    del message["Disposition-Notification-To"]  # the sender's own request for a receipt, if any
    message["Disposition-Notification-To"] = f"<{mdn.receipt_address(gateway_address, token)}>"
    return message


def on_read_header(request: ExchangeRequest, notifier: Notifier) -> str:
    """What the reader is told will happen when they open the mail (one header line, ASCII-safe)."""
    who = notifier.label(request.from_number, request.confidential)
    text = f"Opening this message will connect you with {who}"
    if request.scenario_inline is not None:
        kinds = [READER_SEES.get(step.kind, step.kind) for step in scenario_of(request).steps]
        text = "Opening this message will " + ", then ".join(kinds).replace("{who}", who)
    return Header(text, "utf-8").encode()  # RFC 2047 if needed


# What each top-level step means for the reader of an on-read scenario's mail.
READER_SEES = {"play": "play you a voice message", "fax": "send you a FAX", "connect": "connect you with {who}",
               "confirm": "ask you first", "wait": "wait", "parallel": "do several things at once",
               "notify": "send a note"}


def plan(request: ExchangeRequest, label: Callable[[str], str] = str) -> str:
    """The steps a request would take, for dry-run answers."""
    if request.scenario_inline is not None:
        return "\n".join(describe_steps(scenario_of(request).steps, request, label))
    steps = [f"1. ring {request.from_number} (your phone) for up to the ring timeout;",
             f"2. when it is answered, ring {request.to_number} and put you through."]
    if request.action is Action.CAMP_ON or request.retry:
        how = ("watch the destination's line and call as soon as both phones are free" if request.mode == "watch"
               else "redial at intervals")
        steps.append(f"3. if the destination is busy or does not answer: {how}, for up to {_minutes(request.monitor)}.")
    if request.action is Action.MONITOR:
        steps = [f"1. watch {request.to_number} for {_minutes(request.monitor)} and mail you when it rings, "
                 "answers or hangs up."]
    if request.action is Action.CANCEL:
        steps = [f"1. cancel request {request.request_ref}."]
    if request.at is not None:
        steps.insert(0, f"0. wait until {request.at.astimezone():%Y-%m-%d %H:%M};")
    return "\n".join(steps)


def call_result(row: MessageRow, request: ExchangeRequest, result: ConnectResult) -> Result:
    """The sender's view of a finished two-point connection."""
    if result.outcome == CallOutcome.ANSWERED:
        return Result(row.id, "answered", "both parties answered", row.received_at,
                      answered_at=result.to_answered_at or result.ended_at)
    who = "your phone" if result.failed_party == Party.FROM else "the destination"
    number = request.from_number if result.failed_party == Party.FROM else request.to_number
    if request.confidential:
        number = "(confidential)"
    sentence = {
        CallOutcome.BUSY: f"{who} ({number}) was busy",
        CallOutcome.NO_ANSWER: f"{who} ({number}) did not answer",
        CallOutcome.UNREACHABLE: f"{who} ({number}) could not be reached (switched off or not registered)",
        CallOutcome.CONGESTION: f"the network was congested when calling {who} ({number})",
        CallOutcome.INVALID: f"{who} ({number}) is not a number in service",
        CallOutcome.REJECTED: f"{who} ({number}) rejected the call",
    }.get(result.outcome, f"the call to {who} ({number}) failed")
    if result.cause is not None:
        sentence += f" (cause {result.cause})"
    return Result(row.id, str(result.outcome), sentence, row.received_at,
                  failed_party=str(result.failed_party) if result.failed_party else None,
                  failed_number=number, cause=result.cause)


SYSTEM_FAILURES = {"failed", "expired"}


def should_notify(request: ExchangeRequest, result: Result) -> bool:
    """notify: no silences results, but never a failure the gateway itself caused."""
    return request.notify or result.outcome in SYSTEM_FAILURES


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"
