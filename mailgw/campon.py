"""Camp-on, cancel and the status monitor (seed 004, embodiments 1-3; FIG. 24-27).

A **camp-on** connects two phones as soon as it can, within the request's monitor window. It starts
from ``action: camp-on``, or from ``action: connect`` with ``retry: yes`` whose first attempt ended
busy / no answer (any temporary failure). Two modes:

* ``retry`` — redial at intervals: ``campon.retry_busy`` after busy, ``retry_no_answer`` after no
  answer, ``retry_other`` after congestion, unreachable and unknown failures;
* ``watch`` — follow the destination's line state (AMI ExtensionStatus / DeviceStateChange on its
  hint) and dial the moment it turns idle while the caller's phone is free too, the caller first.
  After an attempt nobody answered the next one waits ``retry_no_answer`` (someone who does not pick
  up should not be rung again the second the line is idle). A destination whose state the PBX
  cannot report (no hint: external numbers) is camped on in retry mode instead.

Rules (plain functions at the top of this module, tested without sockets):

* permanent causes end a camp-on at once: unallocated / invalid number, call rejected (Q.850 1, 3,
  21, 28; ``CallOutcome.INVALID`` / ``REJECTED``);
* the window: from ``max(received, at)`` for ``monitor`` seconds (the request's, else
  ``requests.monitor_default``, capped by ``requests.monitor_max``) — never "forever". Expiry ends
  the camp-on with an ``expired`` (4.4.7) mail; an attempt in progress at the deadline is let finish;
* first come, first served per destination: when it turns idle, the oldest camp-on on it whose
  caller is free is dialled (one at a time per destination);
* ``campon.max_concurrent_originates`` bounds camp-on calls in flight; waiting attempts go
  ``priority: express`` first, then in arrival order;
* limits: ``campon.max_per_caller`` / ``max_per_target`` pending camp-ons; one pending camp-on per
  (caller, destination) pair — checked at DATA (``550 5.7.1`` naming the rule or the pending
  request) and again when the camp-on starts (a unique index in the store is the last word).

Cancel: ``action: cancel`` + ``request: <id>`` from the original sender (or a ``campon.admins``
address), a reply whose first word is ``cancel`` / ``取消`` to one of its mails (``replies.py``),
or ``mailgw campons cancel ID`` (the running gateway sees it within ``campon.poll_interval``).
A cancel arriving during an attempt takes effect when the attempt ends (a call that connected
stays connected).

Status monitor (``action: monitor``, ``to`` = the watched phone): the sender is mailed when the
phone starts ringing, answers (in use) or hangs up (idle) — one mail per change, but at most one
per ``campon.monitor_mail_interval``; changes in between are batched into the next mail — until the
monitor time ends, then a final ``monitored`` mail.

Durability: the store is the truth. A ``campons`` row holds each pending camp-on (state, attempts,
next attempt, deadline, last outcome); timers are rebuilt from it at start, keeping the original
deadline. Every attempt is a ``calls`` row (``<request id>-<n>``) written with the ``dialling``
state BEFORE its Originate. After a restart, a camp-on found ``dialling`` was cut off mid-attempt:
if the PBX still shows that call it is ended as ``failed`` (interrupted; probably connected — not
dialled again), otherwise the attempt is recorded as interrupted and the camp-on goes on camping,
its next attempt ``retry_other`` later (the attempt's outcome is unknown; giving up would throw
away a request the sender still wants). Each state change is one transaction with its stage, the
attempt's outcome and the mail it causes.

Timers: no APScheduler. Its jobs are heavier than a camp-on's whole budget (< 4 KB) and its
persistent job store needs SQLAlchemy; the ``campons`` table already is the durable schedule.
In memory one heap of (time, id) and a single loop timer for its earliest entry serve all
camp-ons, so an idle gateway with 10,000 pending camp-ons wakes only for the next due one.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .config import CamponConfig, Config
from .directory import Directory, normalise_address
from .notify import OUTCOME_STATUS, Notifier, Result
from .outbound import Outbox
from .replies import parse_reply
from .pbx.port import CallOutcome, ConnectResult, LineState, PbxError, PbxPort, PbxUnavailable
from .request import Action, CamponMode, ExchangeRequest, Priority
from .status import Refused, field_error
from .store import MessageRow, MessageState, Store

log = logging.getLogger("mailgw.campon")

PERMANENT_OUTCOMES = frozenset({CallOutcome.INVALID, CallOutcome.REJECTED})
PERMANENT_CAUSES = frozenset({1, 3, 21, 28})  # unallocated, no route, call rejected, invalid number format
FREE = frozenset({LineState.IDLE})
CALLER_FREE = frozenset({LineState.IDLE, LineState.UNKNOWN})  # an external caller cannot be watched: try
PBX_RETRY_SECONDS = 5.0  # first wait when the PBX is down; doubles up to a minute
SYSTEM_REASONS = frozenset({"interrupted", "pbx-timeout"})  # failures the gateway caused: always told
KIND_CAMPON = "campon"
KIND_MONITOR = "monitor"


# --- decisions (plain functions over plain data) -------------------------------------------------

def starts_campon(request: ExchangeRequest) -> bool:
    """Whether a request is (or may turn into) a camp-on."""
    return request.action is Action.CAMP_ON or (request.action is Action.CONNECT and request.retry)


def is_permanent(outcome: str, cause: int | None) -> bool:
    """Causes that no waiting can cure: end the camp-on at once."""
    return outcome in PERMANENT_OUTCOMES or (cause is not None and cause in PERMANENT_CAUSES)


def should_camp(result: ConnectResult) -> bool:
    """After a ``retry: yes`` connect: camp on unless it connected or failed for good."""
    return result.outcome != CallOutcome.ANSWERED and not is_permanent(result.outcome, result.cause)


def retry_delay(outcome: str, config: CamponConfig) -> float:
    if outcome == CallOutcome.BUSY:
        return config.retry_busy
    if outcome == CallOutcome.NO_ANSWER:
        return config.retry_no_answer
    return config.retry_other


def next_attempt_after(outcome: str, mode: str, now: float, config: CamponConfig) -> float:
    """Earliest time of the next attempt after one that ended with ``outcome`` (epoch seconds).

    Watch mode after busy: at once — the next "idle" of the line is the trigger. After no answer
    (either party) it waits like retry mode: nobody should be rung again the second the line idles.
    """
    if mode == CamponMode.WATCH and outcome in (CallOutcome.BUSY, "interrupted-busy"):
        return now
    return now + retry_delay(outcome, config)


def window(received_at: datetime, at: datetime | None, monitor: float) -> tuple[datetime, datetime]:
    """(start, deadline) of a camp-on: ``at`` delays the start; the monitor time runs from the start."""
    start = max(received_at, at) if at is not None else received_at
    return start, start + timedelta(seconds=monitor)


def queue_key(priority: str, rowid: int) -> tuple[int, int]:
    """Order of attempts waiting for an originate slot: express first, then first come."""
    return (0 if priority == Priority.EXPRESS else 1, rowid)


@dataclass(frozen=True)
class PairView:
    """What the limit checks need to know of one pending camp-on."""

    id: str
    caller: str
    target: str


def check_limits(pending: Iterable[PairView], caller: str, target: str, config: CamponConfig,
                 *, ignore: str | None = None) -> None:
    """Refused (550 5.7.1, naming the rule) when a new camp-on caller -> target is not allowed."""
    per_caller = per_target = 0
    for other in pending:
        if other.id == ignore:
            continue
        if other.caller == caller and other.target == target:
            raise Refused(550, "5.7.1", f"a camp-on from {caller} to {target} is already pending as request "
                                        f"{other.id}; cancel it first (action: cancel, request: {other.id})")
        per_caller += other.caller == caller
        per_target += other.target == target
    if per_caller >= config.max_per_caller:
        raise Refused(550, "5.7.1", f"refused by policy: {caller} already has {per_caller} pending camp-ons "
                                    f"(limit campon.max_per_caller = {config.max_per_caller})")
    if per_target >= config.max_per_target:
        raise Refused(550, "5.7.1", f"refused by policy: {target} already has {per_target} pending camp-ons "
                                    f"(limit campon.max_per_target = {config.max_per_target})")


def may_cancel(who: str, owner: str, config: CamponConfig) -> bool:
    """Only the original sender (compared normalised) or an admin may cancel."""
    normalised = normalise_address(who) if who else None
    if not normalised:
        return False
    return normalised == (normalise_address(owner) or owner) or normalised in config.admins


def _epoch(moment: datetime) -> float:
    return moment.timestamp()


def _moment(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _span(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


# --- the runner ----------------------------------------------------------------------------------

class _Pending:
    """One pending camp-on or monitor in memory: only what the hot paths need (< 4 KB each)."""

    __slots__ = ("id", "rowid", "kind", "sender", "caller", "target", "mode", "priority", "state", "attempts",
                 "calls", "next_attempt", "deadline", "last_outcome", "cancel_by", "quiet", "line_known",
                 "queued", "done", "events", "reported_at", "notice_ids", "pbx_failures")

    def __init__(self, id: str, rowid: int, kind: str, sender: str, caller: str | None, target: str, mode: str,
                 priority: str, state: str, attempts: int, calls: int, next_attempt: float, deadline: float,
                 last_outcome: str | None, quiet: bool) -> None:
        self.id = id
        self.rowid = rowid
        self.kind = kind
        self.sender = sender
        self.caller = caller
        self.target = target
        self.mode = mode
        self.priority = priority
        self.state = state  # waiting | camping | dialling
        self.attempts = attempts
        self.calls = calls
        self.next_attempt = next_attempt
        self.deadline = deadline
        self.last_outcome = last_outcome
        self.cancel_by: str | None = None
        self.quiet = quiet  # confidential: keep numbers out of the log
        self.line_known = True  # watch mode: False when the PBX cannot report the target's state
        self.queued = False  # waiting for an originate slot
        self.done = False
        self.events: list[tuple[float, str]] | None = None  # monitor: changes not yet mailed
        self.reported_at = 0.0  # monitor: when the last mail went out
        self.notice_ids: list[str] | None = None
        self.pbx_failures = 0

    def label(self) -> str:
        if self.quiet:
            return f"{self.kind} {self.id}"
        return f"{self.kind} {self.id} ({self.caller or '-'} -> {self.target})"


class Campons:
    """Runs every pending camp-on and status monitor on the one event loop; see the module doc."""

    def __init__(self, config: Config, directory: Directory, store: Store, pbx: PbxPort, notifier: Notifier,
                 outbox: Outbox, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.directory = directory
        self.reply_address = normalise_address(config.sender_address) or config.sender_address.lower()
        self.cfg = config.campon
        self.store = store
        self.pbx = pbx
        self.notifier = notifier
        self.outbox = outbox
        self.clock = clock
        self._pending: dict[str, _Pending] = {}
        self._by_target: dict[str, list[_Pending]] = {}  # camp-ons, first come first
        self._by_caller: dict[str, list[_Pending]] = {}
        self._monitors: dict[str, list[_Pending]] = {}  # watched number -> status monitors
        self._line: dict[str, LineState] = {}  # last known state of every watched number
        self._unwatch: dict[str, Callable[[], None]] = {}
        self._notices: dict[str, str] = {}  # Message-ID of a mail we sent -> camp-on id (replies cancel)
        self._dialling: set[str] = set()  # numbers a camp-on attempt is ringing right now
        self._heap: list[tuple[float, str]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._queue: list[tuple[tuple[int, int], str]] = []  # attempts waiting for an originate slot
        self._in_flight = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._remove_resync: Callable[[], None] | None = None
        self._stopping = False
        self._seq = 0  # arrival order of camp-ons started by this process (after the resumed rowids)

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume every pending camp-on from the store, with its original deadline."""
        rows = await self.store.pending_campons()
        for row in rows:
            pending = _Pending(row.id, row.rowid, row.kind, row.sender, row.caller, row.target, row.mode,
                               row.priority, row.state, row.attempts, row.calls, _epoch(row.next_attempt),
                               _epoch(row.deadline), row.last_outcome, quiet=row.confidential)
            self._seq = max(self._seq, row.rowid)
            if row.notice_id:
                pending.notice_ids = [row.notice_id]
                self._notices[row.notice_id] = row.id
            if row.kind == KIND_MONITOR:
                pending.events = []
                pending.reported_at = _epoch(row.reported_at) if row.reported_at else 0.0
                for at, detail in await self.store.stages_since(row.id, "line-state", row.reported_at):
                    pending.events.append((_epoch(at), detail))
            self._index(pending)
            if row.cancel_requested:
                pending.cancel_by = row.cancel_requested
        if rows:
            log.info("resuming %d pending camp-on(s)/monitor(s)", len(rows))
        self._remove_resync = self.pbx.on_resync(self._resync)
        for pending in list(self._pending.values()):
            self._watch(pending)
        for pending in list(self._pending.values()):
            if pending.cancel_by is not None:
                self._spawn(self._finish_cancelled(pending))
            elif pending.state == "dialling":
                self._spawn(self._recover_interrupted(pending))
            else:
                self._schedule(pending, pending.next_attempt)
                self._schedule(pending, pending.deadline)
                if pending.kind == KIND_MONITOR and pending.events:
                    self._schedule(pending, pending.reported_at + self.cfg.monitor_mail_interval)
        await self._refresh_lines(list(self._unwatch))
        for pending in list(self._pending.values()):
            if pending.kind == KIND_CAMPON and pending.mode == CamponMode.WATCH:
                pending.line_known = self._line.get(pending.target, LineState.UNKNOWN) != LineState.UNKNOWN
        for target in list(self._by_target):
            self._evaluate_target(target)
        self._poller = asyncio.create_task(self._poll_cancels(), name="campon-cancel-poll")

    async def stop(self) -> None:
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._remove_resync is not None:
            self._remove_resync()
        tasks = list(self._tasks) + ([self._poller] if self._poller else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for unwatch in self._unwatch.values():
            unwatch()
        self._unwatch.clear()

    # --- what ingress asks (synchronous: decided from memory at DATA time) ----------------------

    def admit(self, request: ExchangeRequest) -> None:
        """Refused when a request would break a camp-on rule: duplicates, limits, who may cancel."""
        if starts_campon(request) and not request.dry_run:
            assert request.from_number is not None and request.to_number is not None
            check_limits(self._views(request.from_number, request.to_number), request.from_number,
                         request.to_number, self.cfg)
        elif request.action is Action.CANCEL:
            ref = request.request_ref or ""
            pending = self._pending.get(ref)
            if pending is None:
                raise field_error("request", f"{ref} is not a pending camp-on or monitor here (it has ended, "
                                             "or never existed)")
            if not may_cancel(request.sender, pending.sender, self.cfg):
                raise Refused(550, "5.7.1", f"only the sender of request {ref} (or an admin) may cancel it")

    def parse_reply(self, raw: bytes, mail_from: str, rcpt: str) -> ExchangeRequest | None:
        """A reply to one of our mails (to ``reply_address``): a cancel request, or None, or Refused."""
        request = parse_reply(raw, mail_from=mail_from, rcpt_to=rcpt, config=self.config, directory=self.directory,
                              lookup=self.request_for_reply)
        if request is not None:
            self.admit(request)
        return request

    def request_for_reply(self, message_ids: Iterable[str]) -> str | None:
        """The pending camp-on a reply refers to, by the Message-IDs it quotes (In-Reply-To, References)."""
        for message_id in message_ids:
            found = self._notices.get(message_id)
            if found is not None:
                return found
        return None

    def is_pending(self, request_id: str) -> bool:
        return request_id in self._pending

    def _views(self, caller: str, target: str) -> list[PairView]:
        """The pending camp-ons that share a number with caller -> target (all the limits look at)."""
        seen = {p.id: p for p in self._by_caller.get(caller, ())}
        seen.update((p.id, p) for p in self._by_target.get(target, ()))
        return [PairView(p.id, p.caller or "", p.target) for p in seen.values()]

    # --- what the dispatcher hands over ---------------------------------------------------------

    async def handle(self, row: MessageRow, request: ExchangeRequest) -> None:
        """A stored camp-on, monitor or cancel request, run for the first time (or again after a
        crash before its camp-on row was written)."""
        if row.id in self._pending or await self.store.get_campon(row.id) is not None:
            return  # already running (resumed from its row)
        if request.action is Action.CANCEL:
            await self._cancel_request(row, request)
        elif request.action is Action.MONITOR:
            await self._start(row, request, kind=KIND_MONITOR)
        else:
            await self._start(row, request, kind=KIND_CAMPON)

    async def after_first_attempt(self, row: MessageRow, request: ExchangeRequest, call_id: str,
                                  result: ConnectResult) -> None:
        """A ``retry: yes`` connect whose first attempt failed for a temporary reason: camp on.
        The attempt's outcome and the camp-on are stored in one transaction."""
        await self._start(row, request, kind=KIND_CAMPON, first=(call_id, result))

    async def cancel(self, request_id: str, by: str) -> str:
        """Cancel a pending camp-on: 'cancelled', 'cancelling' (an attempt is ringing; it ends
        the camp-on when it is over) or 'not-pending'."""
        pending = self._pending.get(request_id)
        if pending is None or pending.done:
            return "not-pending"
        if pending.cancel_by is None:
            pending.cancel_by = by
            await self.store.request_campon_cancel(request_id, by)
        if pending.state == "dialling":
            return "cancelling"
        await self._finish_cancelled(pending)
        return "cancelled"

    # --- starting -------------------------------------------------------------------------------

    async def _start(self, row: MessageRow, request: ExchangeRequest, *, kind: str,
                     first: tuple[str, ConnectResult] | None = None) -> None:
        now = self.clock()
        start, deadline = window(row.received_at, request.at, request.monitor)
        mode = str(request.mode) if kind == KIND_CAMPON else "monitor"
        finish_call = _finish_call_args(*first) if first is not None else None
        if kind == KIND_CAMPON:
            assert request.from_number is not None and request.to_number is not None
            try:
                check_limits(self._views(request.from_number, request.to_number), request.from_number,
                             request.to_number, self.cfg)
            except Refused as refusal:
                await self._refuse(row, request, refusal.reply.text, finish_call=finish_call,
                                   attempts=1 if first else 0)
                return
        attempts = calls = 1 if first is not None else 0
        last_outcome = str(first[1].outcome) if first is not None else None
        next_attempt = (next_attempt_after(last_outcome or "", mode, now, self.cfg) if first is not None
                        else max(now, _epoch(start)))
        state = "waiting" if next_attempt > now and first is None else "camping"
        pending = _Pending(row.id, 0, kind, request.sender, request.from_number if kind == KIND_CAMPON else None,
                           request.to_number or "", mode, str(request.priority), state, attempts, calls,
                           next_attempt, _epoch(deadline), last_outcome, quiet=request.confidential)
        if kind == KIND_MONITOR:
            pending.events = []
            pending.reported_at = now
        self._seq += 1
        pending.rowid = self._seq
        self._index(pending)  # reserved before the first await: the limit check above stays true
        try:
            await self.store.add_campon(
                id=row.id, kind=kind, sender=pending.sender, caller=pending.caller, target=pending.target,
                mode=mode, priority=pending.priority, state=state, next_attempt=_moment(next_attempt),
                deadline=deadline, attempts=attempts, calls=calls, last_outcome=last_outcome,
                finish_call=finish_call,
                stage_detail=f"{mode} until {deadline.astimezone():%Y-%m-%d %H:%M:%S}")
        except Exception as exc:
            self._unindex(pending)
            if "UNIQUE" in str(exc):
                other = next((p.id for p in self._by_caller.get(pending.caller or "", ())
                              if p.target == pending.target), "another request")
                await self._refuse(row, request, f"a camp-on from {pending.caller} to {pending.target} is already "
                                                 f"pending as request {other}", finish_call=finish_call,
                                   attempts=attempts)
                return
            raise
        log.info("%s started: %s, until %s", pending.label(), mode, deadline.astimezone().strftime("%H:%M:%S"))
        if first is not None:
            await self._notice(pending)
        self._watch(pending)
        if pending.kind == KIND_MONITOR or (pending.mode == CamponMode.WATCH):
            await self._refresh_lines([n for n in (pending.target, pending.caller) if n])
            if pending.kind == KIND_CAMPON:
                pending.line_known = self._line.get(pending.target, LineState.UNKNOWN) != LineState.UNKNOWN
            elif self._line.get(pending.target, LineState.UNKNOWN) == LineState.UNKNOWN:
                await self._finish(pending, "unwatchable",
                                   f"{self._shown(pending, pending.target)} cannot be monitored: the PBX reports no "
                                   "state for it (only internal extensions can be watched)")
                return
            if (pending.kind == KIND_CAMPON and pending.line_known and not pending.notice_ids
                    and (self._line.get(pending.target) not in FREE
                         or self._line.get(pending.caller or "", LineState.UNKNOWN) not in CALLER_FREE)):
                await self._notice(pending)  # not free now: say so, and how to cancel
        self._schedule(pending, pending.next_attempt)
        self._schedule(pending, pending.deadline)
        self._due(pending)

    def _index(self, pending: _Pending) -> None:
        self._pending[pending.id] = pending
        if pending.kind == KIND_CAMPON:
            self._by_target.setdefault(pending.target, []).append(pending)
            if pending.caller:
                self._by_caller.setdefault(pending.caller, []).append(pending)
        else:
            self._monitors.setdefault(pending.target, []).append(pending)

    def _unindex(self, pending: _Pending) -> None:
        self._pending.pop(pending.id, None)
        for index, key in ((self._by_target, pending.target), (self._by_caller, pending.caller),
                           (self._monitors, pending.target)):
            if key is None:
                continue
            members = index.get(key)
            if members and pending in members:
                members.remove(pending)
                if not members:
                    del index[key]
        for notice in pending.notice_ids or ():
            self._notices.pop(notice, None)
        for number in (pending.target, pending.caller):
            if number and number in self._unwatch and not self._watched(number):
                self._unwatch.pop(number)()
                self._line.pop(number, None)

    def _watched(self, number: str) -> bool:
        if number in self._monitors:
            return True
        if any(p.mode == CamponMode.WATCH for p in self._by_target.get(number, ())):
            return True
        return any(p.mode == CamponMode.WATCH for p in self._by_caller.get(number, ()))

    def _watch(self, pending: _Pending) -> None:
        if pending.kind == KIND_CAMPON and pending.mode != CamponMode.WATCH:
            return
        for number in (pending.target, pending.caller):
            if number and number not in self._unwatch:
                self._unwatch[number] = self.pbx.watch_line(number, self._on_line)

    async def _refresh_lines(self, numbers: list[str]) -> None:
        """Ask the PBX for the state of ``numbers`` (at start, and after a reconnect)."""
        semaphore = asyncio.Semaphore(32)

        async def one(number: str) -> None:
            async with semaphore:
                try:
                    state = await self.pbx.line_state(number)
                except (PbxError, ValueError) as exc:
                    log.debug("line state of %s unknown: %s", number, exc)
                    return
                self._line[number] = state

        await asyncio.gather(*(one(n) for n in numbers))

    def _resync(self) -> None:
        """A new AMI session: events may have been missed while it was down; ask again."""
        if self._stopping or not self._unwatch:
            return

        async def run() -> None:
            await self._refresh_lines(list(self._unwatch))
            for target in list(self._by_target):
                self._evaluate_target(target)

        self._spawn(run())

    # --- timers ---------------------------------------------------------------------------------

    def _schedule(self, pending: _Pending, when: float) -> None:
        heapq.heappush(self._heap, (when, pending.id))
        if when < self._timer_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = when
        self._timer = loop.call_at(loop.time() + max(0.0, when - self.clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        now = self.clock()
        due: dict[str, None] = {}
        while self._heap and self._heap[0][0] <= now + 0.001:
            due[heapq.heappop(self._heap)[1]] = None
        for request_id in due:
            pending = self._pending.get(request_id)
            if pending is not None:
                self._due(pending)
        if self._heap:
            self._arm(self._heap[0][0])

    def _due(self, pending: _Pending) -> None:
        """Whatever is due for a camp-on or monitor now (called by its timers and events)."""
        if pending.done or pending.state == "dialling" or self._stopping:
            return
        now = self.clock()
        if pending.kind == KIND_MONITOR:
            if now >= pending.deadline:
                self._spawn(self._finish_monitor(pending))
            elif pending.events and now >= pending.reported_at + self.cfg.monitor_mail_interval:
                self._spawn(self._monitor_mail(pending))
            return
        if now >= pending.deadline:
            if not pending.queued:
                self._spawn(self._expire(pending))
            return
        if now < pending.next_attempt:
            return
        if pending.state == "waiting":
            pending.state = "camping"
            self._spawn(self.store.update_campon(pending.id, state="camping", stage="camping",
                                                 detail="the time given with 'at' has come"))
        if pending.mode == CamponMode.WATCH and pending.line_known:
            self._evaluate_target(pending.target)
        elif pending.target not in self._dialling and (pending.caller or "") not in self._dialling:
            self._want_attempt(pending)

    # --- watch mode -----------------------------------------------------------------------------

    def _on_line(self, number: str, state: LineState) -> None:
        """One listener for every watched number (called in the AMI reader: quick, no I/O here)."""
        self._line[number] = state
        for monitor in self._monitors.get(number, ()):
            self._monitor_change(monitor, state)
        if state is not LineState.IDLE:
            return
        if number in self._by_target:
            self._evaluate_target(number)
        for pending in self._by_caller.get(number, ()):
            if pending.mode == CamponMode.WATCH:
                self._evaluate_target(pending.target)

    def _evaluate_target(self, target: str) -> None:
        """The destination may be free: dial the oldest due watch camp-on on it whose caller is free."""
        if self._stopping or target in self._dialling or self._line.get(target) not in FREE:
            return
        now = self.clock()
        for pending in self._by_target.get(target, ()):
            if pending.queued:
                return  # one is already on its way to this destination
            if pending.mode != CamponMode.WATCH or not pending.line_known or pending.state != "camping":
                continue
            if now < pending.next_attempt or now >= pending.deadline:
                continue
            caller = pending.caller or ""
            if caller in self._dialling or self._line.get(caller, LineState.UNKNOWN) not in CALLER_FREE:
                continue
            self._want_attempt(pending)
            return

    # --- attempts -------------------------------------------------------------------------------

    def _want_attempt(self, pending: _Pending) -> None:
        if pending.queued or pending.done or pending.state == "dialling":
            return
        pending.queued = True
        heapq.heappush(self._queue, (queue_key(pending.priority, pending.rowid), pending.id))
        self._pump()

    def _pump(self) -> None:
        while self._queue and self._in_flight < self.cfg.max_concurrent_originates:
            _, request_id = heapq.heappop(self._queue)
            pending = self._pending.get(request_id)
            if pending is None or not pending.queued:
                continue
            pending.queued = False
            if pending.done or self._stopping:
                continue
            if self.clock() >= pending.deadline:
                self._spawn(self._expire(pending))
                continue
            if pending.target in self._dialling or (pending.caller or "") in self._dialling:
                continue  # another attempt rings one of them; its end looks at this camp-on again
            self._in_flight += 1
            pending.state = "dialling"
            self._dialling.add(pending.target)
            if pending.caller:
                self._dialling.add(pending.caller)
            self._spawn(self._attempt(pending))

    async def _attempt(self, pending: _Pending) -> None:
        call_id = f"{pending.id}-{pending.calls + 1}"
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._in_flight -= 1
            self._dialling.discard(pending.target)
            if pending.caller:
                self._dialling.discard(pending.caller)

        try:
            pending.calls += 1
            await self.store.update_campon(pending.id, state="dialling", calls=pending.calls,
                                           add_call=(call_id, pending.caller or "", pending.target),
                                           stage="executing", detail=f"attempt {pending.attempts + 1}: call {call_id}")
            log.info("%s: attempt %d (call %s)", pending.label(), pending.attempts + 1, call_id)
            try:
                result = await self.pbx.connect(call_id, pending.caller or "", pending.target,
                                                ring_timeout=self.config.pbx.ring_timeout,
                                                caller_id=self.config.pbx.caller_id)
            except PbxUnavailable as exc:
                release()
                await self._pbx_down(pending, call_id, exc)
                return
            except PbxError as exc:
                release()
                await self._unknown_outcome(pending, call_id, f"the PBX did not report the call's end ({exc})")
                return
            release()
            await self._after_attempt(pending, call_id, result)
        finally:
            release()
            self._pump()
            if not pending.done and pending.state == "dialling" and not self._stopping:
                pending.state = "camping"
            if not self._stopping:
                self._kick(pending)

    def _kick(self, pending: _Pending) -> None:
        """An attempt ended: camp-ons held back by it (same numbers) may go now."""
        for number in (pending.target, pending.caller):
            for other in list(self._by_target.get(number or "", ())) + list(self._by_caller.get(number or "", ())):
                if other is not pending:
                    self._due(other)

    async def _after_attempt(self, pending: _Pending, call_id: str, result: ConnectResult) -> None:
        pending.attempts += 1
        pending.last_outcome = str(result.outcome)
        finish_call = _finish_call_args(call_id, result)
        now = self.clock()
        if result.outcome == CallOutcome.ANSWERED:
            await self._finish(pending, "answered", f"both parties answered (attempt {pending.attempts})",
                               finish_call=finish_call, answered_at=result.to_answered_at or result.ended_at)
            return
        if is_permanent(result.outcome, result.cause):
            await self._finish(pending, str(result.outcome), self._failure_sentence(pending, result) +
                               "; a camp-on cannot help with that", finish_call=finish_call,
                               failed_party=str(result.failed_party) if result.failed_party else None,
                               cause=result.cause)
            return
        if pending.cancel_by is not None:
            await self._finish_cancelled(pending, finish_call=finish_call)
            return
        if now >= pending.deadline:
            await self._expire(pending, finish_call=finish_call)
            return
        pending.next_attempt = next_attempt_after(pending.last_outcome, pending.mode if pending.line_known
                                                  else CamponMode.RETRY, now, self.cfg)
        pending.state = "camping"
        await self.store.update_campon(pending.id, state="camping", attempts=pending.attempts,
                                       next_attempt=_moment(pending.next_attempt), last_outcome=pending.last_outcome,
                                       finish_call=finish_call, stage="attempt",
                                       detail=f"attempt {pending.attempts}: {pending.last_outcome}")
        log.info("%s: attempt %d %s; camping on", pending.label(), pending.attempts, pending.last_outcome)
        if not pending.notice_ids:
            await self._notice(pending)
        self._schedule(pending, pending.next_attempt)

    async def _pbx_down(self, pending: _Pending, call_id: str, exc: Exception) -> None:
        """Nothing reached the PBX: that call row says so, and the camp-on tries again soon."""
        pending.pbx_failures += 1
        delay = min(PBX_RETRY_SECONDS * 2 ** (pending.pbx_failures - 1), 60.0)
        pending.next_attempt = self.clock() + delay
        pending.state = "camping"
        await self.store.update_campon(
            pending.id, state="camping", next_attempt=_moment(pending.next_attempt),
            finish_call=dict(call_id=call_id, outcome="not-placed", failed_party=None, cause=None,
                             from_answered_at=None, to_answered_at=None, ended_at=_moment(self.clock())),
            stage="waiting", detail=f"PBX unavailable ({exc}); retry in {delay:.0f}s")
        self._schedule(pending, pending.next_attempt)

    async def _unknown_outcome(self, pending: _Pending, call_id: str, why: str) -> None:
        """An attempt whose end we did not see (PBX timeout, lost session, gateway restart)."""
        try:
            still_up = await self.pbx.find_call(call_id)
        except (PbxError, ValueError):
            still_up = False
        interrupted = dict(call_id=call_id, outcome="interrupted", failed_party=None, cause=None,
                           from_answered_at=None, to_answered_at=None, ended_at=_moment(self.clock()))
        if still_up:
            await self._finish(pending, "failed", f"{why}; the call is still up on the PBX (probably connected), "
                                                  "so it was not dialled again", finish_call=interrupted,
                               reason="interrupted")
            return
        pending.next_attempt = self.clock() + self.cfg.retry_other
        pending.last_outcome = "interrupted"
        pending.state = "camping"
        await self.store.update_campon(pending.id, state="camping", next_attempt=_moment(pending.next_attempt),
                                       last_outcome="interrupted", finish_call=interrupted, stage="attempt",
                                       detail=f"{why}; the call is gone; camping on")
        log.warning("%s: %s; camping on", pending.label(), why)
        self._schedule(pending, pending.next_attempt)
        self._schedule(pending, pending.deadline)

    async def _recover_interrupted(self, pending: _Pending) -> None:
        """Resumed in state 'dialling': the gateway stopped during attempt ``calls``."""
        pending.state = "camping"
        await self._unknown_outcome(pending, f"{pending.id}-{pending.calls}",
                                    "the gateway restarted while this camp-on was calling")

    # --- cancel ---------------------------------------------------------------------------------

    async def _cancel_request(self, row: MessageRow, request: ExchangeRequest) -> None:
        ref = request.request_ref or ""
        pending = self._pending.get(ref)
        if pending is not None and not may_cancel(request.sender, pending.sender, self.cfg):
            await self._end_request(row, request, "refused",
                                    f"only the sender of request {ref} (or an admin) may cancel it")
            return
        outcome = await self.cancel(ref, request.sender) if pending is not None else "not-pending"
        if outcome == "not-pending":
            found = await self.store.get_message(ref)
            how = f"it had already ended ({found.outcome})" if found and found.outcome else "no such request is pending"
            await self._end_request(row, request, "already-ended", f"nothing to cancel: request {ref}: {how}")
            return
        detail = (f"camp-on {ref} cancelled" if outcome == "cancelled"
                  else f"camp-on {ref} will end when its current attempt is over")
        await self.store.finish_request(row.id, MessageState.DONE, outcome="cancelled", status="2.0.0",
                                        detail=detail, notification=None)

    async def _end_request(self, row: MessageRow, request: ExchangeRequest, outcome: str, detail: str) -> None:
        result = Result(row.id, outcome, detail, row.received_at)
        mail = self.notifier.result_mail(request, result)
        notification = await self.outbox.prepare(mail, rcpt_to=request.sender, request_id=row.id)
        await self.store.finish_request(row.id, MessageState.FAILED, outcome=outcome, status=result.status,
                                        detail=detail, notification=notification)
        self.outbox.wake()

    async def _finish_cancelled(self, pending: _Pending, finish_call: dict[str, Any] | None = None) -> None:
        await self._finish(pending, "cancelled", f"cancelled by {pending.cancel_by or 'request'} after "
                                                 f"{pending.attempts} attempt(s)", finish_call=finish_call)

    async def _poll_cancels(self) -> None:
        """`mailgw campons cancel` writes the store from another process; look for it now and then."""
        while True:
            await asyncio.sleep(self.cfg.poll_interval)
            try:
                for request_id, by in await self.store.campon_cancels():
                    pending = self._pending.get(request_id)
                    if pending is not None and not pending.done:
                        pending.cancel_by = pending.cancel_by or by
                        if pending.state != "dialling":
                            await self._finish_cancelled(pending)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("camp-on cancel poll failed")

    # --- ending ---------------------------------------------------------------------------------

    async def _expire(self, pending: _Pending, finish_call: dict[str, Any] | None = None) -> None:
        if pending.done:
            return
        window_text = _span(pending.deadline - _epoch(await self._received_at(pending)))
        last = f"; last attempt: {pending.last_outcome}" if pending.last_outcome else ""
        why = ("the destination was not free" if pending.attempts == 0
               else f"{pending.attempts} attempt(s) did not connect{last}")
        await self._finish(pending, "expired", f"the monitor time ({window_text}) ran out: {why}",
                           finish_call=finish_call, reason="campon-expired")

    async def _received_at(self, pending: _Pending) -> datetime:
        row = await self.store.get_message(pending.id)
        return row.received_at if row is not None else _moment(pending.deadline)

    async def _refuse(self, row: MessageRow, request: ExchangeRequest, why: str, *,
                      finish_call: dict[str, Any] | None, attempts: int) -> None:
        result = Result(row.id, "refused", f"refused by policy: {why}", row.received_at, attempts=attempts)
        # A refusal the sender could not foresee at DATA time: always told, even with notify: no.
        mail = self.notifier.result_mail(request, result)
        notification = await self.outbox.prepare(mail, rcpt_to=request.sender, request_id=row.id)
        if finish_call is not None:
            await self.store.finish_call(**finish_call)
        await self.store.finish_request(row.id, MessageState.FAILED, outcome="refused", status=result.status,
                                        detail=result.detail, notification=notification)
        log.info("request %s refused: %s", row.id, why)
        self.outbox.wake()

    async def _finish(self, pending: _Pending, outcome: str, detail: str, *,
                      finish_call: dict[str, Any] | None = None, answered_at: datetime | None = None,
                      reason: str | None = None, failed_party: str | None = None, cause: int | None = None,
                      events: tuple[tuple[datetime, str], ...] = ()) -> None:
        if pending.done:
            return
        pending.done = True
        row = await self.store.get_message(pending.id)
        request = ExchangeRequest.from_json(row.request) if row is not None and row.request else None
        received_at = row.received_at if row is not None else _moment(self.clock())
        if request is not None:
            pending.quiet = request.confidential
        result = Result(pending.id, outcome, detail, received_at, answered_at=answered_at, reason=reason,
                        attempts=pending.attempts if pending.kind == KIND_CAMPON else None,
                        deadline=_moment(pending.deadline), last_outcome=pending.last_outcome,
                        failed_party=failed_party, cause=cause,
                        failed_number=(self._shown(pending, pending.target) if failed_party == "to" else
                                       self._shown(pending, pending.caller) if failed_party == "from" else None),
                        events=events)
        notification = None
        if request is not None and (request.notify or reason in SYSTEM_REASONS):
            mail = self.notifier.result_mail(request, result)
            notification = await self.outbox.prepare(mail, rcpt_to=request.sender, request_id=pending.id)
        ok = outcome in ("answered", "monitored")
        try:
            await self.store.finish_campon(pending.id, MessageState.DONE if ok else MessageState.FAILED,
                                           outcome=outcome, status=result.status, detail=detail,
                                           notification=notification, finish_call=finish_call,
                                           attempts=pending.attempts)
        finally:
            self._unindex(pending)
        log.info("request %s outcome: %s (%s) %s", pending.id, outcome, result.status,
                 "" if pending.quiet else detail)
        if notification is not None:
            self.outbox.wake()

    async def _notice(self, pending: _Pending) -> None:
        """Tell the sender the camp-on is on, and how to cancel it (a reply saying "cancel")."""
        row = await self.store.get_message(pending.id)
        if row is None or row.request is None:
            return
        request = ExchangeRequest.from_json(row.request)
        if not request.notify:
            return
        status = OUTCOME_STATUS.get(pending.last_outcome) if pending.last_outcome else None
        result = Result(pending.id, "camping", "camping on", row.received_at, attempts=pending.attempts,
                        deadline=_moment(pending.deadline), last_outcome=pending.last_outcome,
                        status_code=status)
        mail = self.notifier.result_mail(request, result, kind="campon")
        await self._send_tracked(pending, mail, request)

    async def _send_tracked(self, pending: _Pending, mail: Any, request: ExchangeRequest) -> None:
        message_id = str(mail["Message-ID"]).strip()
        entry = await self.outbox.prepare(mail, rcpt_to=request.sender, request_id=pending.id)
        await self.store.update_campon(pending.id, notice_id=message_id, notification=entry,
                                       **({"reported_at": _moment(pending.reported_at)}
                                          if pending.kind == KIND_MONITOR else {}))
        if not pending.done:
            pending.notice_ids = (pending.notice_ids or []) + [message_id]
            self._notices[message_id] = pending.id
        self.outbox.wake()

    # --- status monitor ---------------------------------------------------------------------------

    def _monitor_change(self, pending: _Pending, state: LineState) -> None:
        if pending.done or pending.events is None:
            return
        now = self.clock()
        pending.events.append((now, str(state)))
        self._spawn(self.store.add_stage(pending.id, "line-state", str(state)))
        when = max(now, pending.reported_at + self.cfg.monitor_mail_interval)
        if when <= now:
            self._spawn(self._monitor_mail(pending))
        else:
            self._schedule(pending, when)

    async def _monitor_mail(self, pending: _Pending) -> None:
        if pending.done or not pending.events:
            return
        events, pending.events = pending.events, []
        pending.reported_at = self.clock()
        row = await self.store.get_message(pending.id)
        if row is None or row.request is None:
            return
        request = ExchangeRequest.from_json(row.request)
        result = Result(pending.id, "line-state", f"{pending.target}: {events[-1][1]}", row.received_at,
                        deadline=_moment(pending.deadline),
                        events=tuple((_moment(at), state) for at, state in events))
        mail = self.notifier.result_mail(request, result, kind="monitor")
        await self._send_tracked(pending, mail, request)

    async def _finish_monitor(self, pending: _Pending) -> None:
        events = tuple((_moment(at), state) for at, state in pending.events or ())
        await self._finish(pending, "monitored", "the monitor time is over"
                           + (f"; {len(events)} change(s) not mailed before are listed below" if events else ""),
                           events=events)

    # --- helpers --------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("camp-on task failed", exc_info=task.exception())

    def _shown(self, pending: _Pending, number: str | None) -> str:
        return "(confidential)" if pending.quiet else (number or "-")

    def _failure_sentence(self, pending: _Pending, result: ConnectResult) -> str:
        who = "your phone" if str(result.failed_party) == "from" else "the destination"
        number = pending.caller if str(result.failed_party) == "from" else pending.target
        what = {CallOutcome.INVALID: "is not a number in service", CallOutcome.REJECTED: "rejected the call"}.get(
            result.outcome, f"failed ({result.outcome})")
        cause = f" (cause {result.cause})" if result.cause is not None else ""
        return f"{who} ({self._shown(pending, number)}) {what}{cause}"

    def snapshot(self) -> list[dict[str, Any]]:
        """The pending camp-ons as the running gateway sees them (for tests and diagnostics)."""
        return [{"id": p.id, "kind": p.kind, "state": p.state, "attempts": p.attempts, "caller": p.caller,
                 "target": p.target, "mode": p.mode, "next_attempt": p.next_attempt, "deadline": p.deadline}
                for p in self._pending.values()]


def _finish_call_args(call_id: str, result: ConnectResult) -> dict[str, Any]:
    return dict(call_id=call_id, outcome=str(result.outcome),
                failed_party=str(result.failed_party) if result.failed_party else None, cause=result.cause,
                from_answered_at=result.from_answered_at, to_answered_at=result.to_answered_at,
                ended_at=result.ended_at)
