"""Call history: every incoming call from outside, recorded from the PBX's events as it happens.

``CallHistory`` listens to ``AmiPbx.watch_incoming`` and writes each call's latest state to the
``incoming_calls`` table: when it started, the caller (or withheld), the customer if known, the
extensions rung, who answered, when it ended. Snapshots that arrive together are written in one
transaction, the latest per call. When a call ends, the absence rule (``absence.missed_call_notice``)
decides whether it needs a missed-call mail; the notice row is committed with the call's end, and
the mailer (``absence_mail.AbsenceMailer``) sends it.

After a restart (and after every AMI reconnect) the calls recorded as still going are looked up on
the PBX again: those still up are followed on; those gone ended while the gateway could not see
them, and are decided on what was recorded (nobody answered unless an answer was seen).

A follow-up: when an extension calls a number from which calls were missed and the far end answers
(``AmiPbx.watch_outgoing``), those missed calls are marked called back (``callbacks`` table); the
digest, the next mails' caller history and ``mailgw calls`` say so.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any, Callable

from .absence import Absence, EndedCall, Recipients, absent_now, missed_call_notice
from .config import Config
from .customers import number_key
from .directory import Directory
from .pbx.driver import AmiPbx
from .pbx.outgoing import AnsweredOutgoing
from .pbx.port import IncomingCall, PbxError
from .store import IncomingRow, NoticeRow, Store

log = logging.getLogger("mailgw.callhistory")


class CallHistory:
    def __init__(self, config: Config, directory: Directory, store: Store, pbx: AmiPbx,
                 on_notice: Callable[[], None]) -> None:
        self.config = config
        self.directory = directory
        self.store = store
        self.pbx = pbx
        self.on_notice = on_notice
        self._queue: asyncio.Queue[IncomingCall | AnsweredOutgoing] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._removers: list[Callable[[], None]] = []
        self._idle = asyncio.Event()
        self._idle.set()
        # Called on the event loop after calls are durably recorded (tests and benches await ends).
        self.listeners: list[Callable[[list[IncomingRow], list[NoticeRow]], None]] = []
        # Called after missed calls were marked called back: (their ids, the answered outgoing call).
        self.callback_listeners: list[Callable[[list[str], AnsweredOutgoing], None]] = []

    async def start(self) -> None:
        self._removers = [self.pbx.watch_incoming(self._queue.put_nowait),
                          self.pbx.watch_outgoing(self._queue.put_nowait),
                          self.pbx.on_resync(lambda: asyncio.get_running_loop().create_task(self.reconcile()))]
        self._task = asyncio.create_task(self._run(), name="call-history")
        await self.reconcile()

    async def stop(self) -> None:
        for remove in self._removers:
            remove()
        self._removers = []
        await self.settled()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def settled(self) -> None:
        """Return once every snapshot received so far is written."""
        while not self._queue.empty() or not self._idle.is_set():
            await self._idle.wait()
            await asyncio.sleep(0)

    async def reconcile(self) -> None:
        """Follow the calls recorded as still going; those the PBX no longer shows end now."""
        rows = await self.store.open_incoming()
        if not rows:
            return
        known = [IncomingCall(call_id=r.id, started_at=r.started_at, caller=r.caller, caller_name=r.caller_name,
                              exten=r.exten, rung=r.rung, answered_by=r.answered_by, answered_at=r.answered_at)
                 for r in rows]
        try:
            ended = await self.pbx.reconcile_incoming(known)
        except PbxError as exc:
            log.warning("cannot look up %d unfinished incoming call(s) on the PBX yet (%s); trying again "
                        "after the next AMI login", len(known), exc)
            return
        for call in ended:
            log.info("incoming call %s ended while the gateway could not see it", call.call_id)

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            self._idle.clear()
            try:
                batch = [first]
                while not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                incoming = [c for c in batch if isinstance(c, IncomingCall)]
                if incoming:
                    await self._record(incoming)
                for answered in batch:
                    if isinstance(answered, AnsweredOutgoing):
                        await self._called_back(answered)
            except Exception:  # the store failed: log, keep listening (the restart reconcile catches up)
                log.exception("recording %d incoming-call event(s) failed", len(batch))
            finally:
                self._idle.set()

    async def _record(self, batch: list[IncomingCall]) -> None:
        latest: dict[str, IncomingCall] = {}
        for call in batch:
            latest[call.call_id] = call
        region = self.config.numbering.region
        rows: list[IncomingRow] = []
        notices: list[NoticeRow] = []
        recordings = {call.call_id: call.recording for call in latest.values() if call.recording}
        absent: frozenset[str] | None = None
        for call in latest.values():
            key = number_key(call.caller, region)
            customer = await self.store.customer(number=key) if key else None
            rows.append(IncomingRow(
                id=call.call_id, started_at=call.started_at, caller=call.caller, caller_key=key,
                caller_name=call.caller_name, exten=call.exten, rung=call.rung, answered_by=call.answered_by,
                answered_at=call.answered_at, ended_at=call.ended_at, cause=call.cause,
                ended_unseen=call.ended_unseen, customer_id=customer["id"] if customer else None))
            if call.ended_at is None:
                continue
            if absent is None:
                absent = absent_now([Absence(a, since, until, note, source)
                                     for a, since, until, note, source in await self.store.absences()],
                                    datetime.now(UTC))
            notice = self.decide(call, key, customer, absent | await self._in_dnd(call))
            if notice is not None:
                notices.append(notice)
            log.info("incoming call %s from %s ended: %s%s", call.call_id, "withheld" if call.caller is None else
                     call.caller, f"answered by {call.answered_by}" if call.answered_by else "nobody answered",
                     f"; missed-call mail to {notice.recipient}" if notice else "")
        await self.store.record_incoming(rows, notices, recordings)
        if notices:
            self.on_notice()
        for listener in tuple(self.listeners):
            listener(rows, notices)

    async def _called_back(self, call: AnsweredOutgoing) -> None:
        """``call.extension`` reached a number: that caller's missed calls are followed up."""
        region = self.config.numbering.region
        key = next((k for number in call.numbers if (k := number_key(number, region))), None)
        marked = await self.store.mark_called_back(key, call.extension, call.answered_at) if key else []
        if marked:
            log.info("%s called %s back: %d missed call(s) followed up", call.extension, key, len(marked))
        for listener in tuple(self.callback_listeners):
            listener(marked, call)

    async def _in_dnd(self, call: IncomingCall) -> frozenset[str]:
        """People whose rung phone is set to do-not-disturb on the PBX: absent too."""
        if call.answered_by is not None:
            return frozenset()
        people = set()
        for extension in call.rung:
            person = self.directory.by_extension(extension)
            if person is None:
                continue
            try:
                if await self.pbx.dnd(extension):
                    people.add(person.address)
            except (PbxError, ValueError) as exc:  # the PBX is away: absence mode from the store only
                log.warning("cannot ask the PBX whether %s is in do-not-disturb: %s", extension, exc)
        return frozenset(people)

    def decide(self, call: IncomingCall, key: str | None, customer: dict[str, Any] | None,
               absent: frozenset[str]) -> NoticeRow | None:
        told = recipients(self.config, self.directory, customer)
        rung_people = {ext: p.address for ext in call.rung if (p := self.directory.by_extension(ext))}

        def decide_for(representative: str | None) -> Any:
            return missed_call_notice(
                EndedCall(call.call_id, key, call.rung, call.answered_by), owner=told.owner,
                owner_language=told.owner_language, rung_people=rung_people, absent=absent,
                representative=representative, representative_language=told.representative_language,
                notify_unanswered=self.config.absence.notify_unanswered)

        notice = decide_for(told.representative)
        if notice is None:
            if decide_for("representative@unset") is not None:  # a mail was due, but to nobody
                log.warning("incoming call %s needs a missed-call mail but there is no representative address "
                            "(absence.representative or the directory's representative)", call.call_id)
            return None
        return NoticeRow(notice.call_id, notice.recipient, notice.language, notice.reason.value)


def recipients(config: Config, directory: Directory, customer: dict[str, Any] | None) -> Recipients:
    """Who is told about a call from ``customer`` (None: unknown or withheld), in which language."""
    owner = customer.get("owner_address") if customer else None
    owner_person = directory.by_address(owner) if owner else None
    representative = config.absence.representative or directory.representative
    rep_person = directory.by_address(representative) if representative else None
    return Recipients(
        owner=owner,
        owner_language=(owner_person.language if owner_person else None) or (customer or {}).get("language"),
        representative=representative,
        representative_language=rep_person.language if rep_person else config.language)
