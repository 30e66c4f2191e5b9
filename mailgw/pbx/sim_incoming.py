"""Simulator-only: incoming calls from outside (a trunk call to an extension or a ring group).

``Action: SimIncoming`` (not an Asterisk action; the ``Sim`` prefix cannot collide):

* ``CallerID``: the caller's number, ``"Name" <number>``, or empty / ``withheld``.
* ``To``: an extension or a ring group ``2000&2001``. Call forwarding applies per extension:
  AstDB ``CF/<ext>`` (set with DBPut, as Asterisk stores it) sends the call to that number.
* ``Answer``: ``<ext>`` (that phone answers, after its ``answer_after``), ``nobody``, or absent
  (each phone does what its behaviour says; the first to answer wins).
* ``RingTime`` (seconds the caller lets it ring, default 20), ``TalkTime`` (default: the phone's).
* ``Message``: an audio file (absolute path) the caller leaves as a voice message when nobody
  answers: the dial plan goes on with ``Answer()`` and ``Record(<dir>/<Uniqueid>.<ext>)`` on the
  trunk channel, as ``exten => s,n,Record(...)`` after a ``Dial`` would. The simulator copies the
  file there (``recording_dir``) and emits what Asterisk's Record() does: Newstate Up of the
  trunk, VarSet ``RECORDED_FILE`` (the path without extension), after ``MESSAGE_SECONDS`` VarSet
  ``RECORD_STATUS`` ``HANGUP`` and the caller's Hangup (cause 16).

Reply: ``Response: Success``, ``Message: Incoming call queued``, ``Channel``, ``Uniqueid``
(the trunk channel ``PJSIP/trunk-0000000N``). Then the events a real Asterisk emits for a trunk
call running ``Dial(PJSIP/2000&PJSIP/2001,<ring time>)`` in the incoming context: Newchannel of
the trunk channel (CallerIDNum/CallerIDName, ``<unknown>`` when withheld), NewCallerid with
``CID-CallingPres`` (``0 (Presentation Allowed, Not Screened)`` or ``32 (Presentation
Prohibited, Not Screened)``), per rung phone Newchannel/DialBegin/Newstate Ringing, then DialEnd
with DialStatus ANSWER / CANCEL (the others, hangup cause 26 "Answered elsewhere") / NOANSWER /
BUSY / CHANUNAVAIL, BridgeCreate/BridgeEnter/BridgeLeave/BridgeDestroy when answered, Hangup with
causes; the phones' ExtensionStatus/DeviceStateChange follow their ringing and talking. DND
phones act busy. The call log (SimCalls) gets an entry with ``Direction: incoming``.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .ami import Field, Message
from .phones import CallAttempt, attempt_for
from .port import CallOutcome

if TYPE_CHECKING:
    from .simulator import Channel, _Session

INCOMING_CONTEXT = "from-trunk"
DEFAULT_RING_TIME = 20.0
MESSAGE_SECONDS = 5.0  # how long the caller speaks a voice message (times time_scale)
PRES_ALLOWED = "0 (Presentation Allowed, Not Screened)"
PRES_PROHIBITED = "32 (Presentation Prohibited, Not Screened)"


@dataclass(eq=False)
class _Rung:
    extension: str  # the number dialled (after call forwarding)
    channel: Channel
    phone: Any
    attempt: CallAttempt
    done: bool = False


class IncomingCalls:
    """Mixin of AmiSimulator: the SimIncoming action."""

    async def _action_sim_incoming(self: Any, session: _Session, msg: Message) -> None:
        from .simulator import CallRecord, OriginateRequest, _Call, parse_caller_id

        to = [t.strip() for t in (msg.get("To") or "").split("&") if t.strip()]
        if not to:
            session.respond(msg, "Error", ("Message", "To not specified"))
            return
        raw_cid = (msg.get("CallerID") or "").strip()
        withheld = raw_cid.lower() in ("", "withheld", "anonymous", "private")
        name, number = ("<unknown>", "<unknown>") if withheld else parse_caller_id(raw_cid)
        try:
            ring_time = float(msg.get("RingTime") or DEFAULT_RING_TIME)
            talk_text = msg.get("TalkTime")
            talk_time = float(talk_text) if talk_text else None
        except ValueError:
            session.respond(msg, "Error", ("Message", "Invalid RingTime or TalkTime"))
            return
        answer = (msg.get("Answer") or "").strip()
        message_file = (msg.get("Message") or "").strip()
        message = None
        if message_file:
            try:
                message = (await asyncio.to_thread(Path(message_file).read_bytes), Path(message_file).suffix or ".wav")
            except OSError as exc:
                session.respond(msg, "Error", ("Message", f"Message file not readable: {exc.strerror or exc}"))
                return
        request = OriginateRequest(
            channel="PJSIP/trunk", context=INCOMING_CONTEXT, exten=to[0], priority=1, application=None,
            data=None, timeout=ring_time, caller_id=(name, number), channel_id=None, other_channel_id=None,
            variables={}, action_id=msg.get("ActionID"), is_async=True)
        record = CallRecord(call_id="", action_id=request.action_id, from_number=number, context=INCOMING_CONTEXT,
                            exten=to[0], application=None, data=None, started_at=time.time(),
                            to_number="&".join(to))
        record.direction = "incoming"
        call = _Call(request, record, asyncio.get_running_loop().create_future())
        trunk = self._trunk_channel(call, to[0], name, number)
        record.call_id = trunk.uniqueid
        self.calls.append(record)
        self._calls.add(call)
        session.respond(msg, "Success", ("Message", "Incoming call queued"), ("Channel", trunk.name),
                        ("Uniqueid", trunk.uniqueid))
        call.task = asyncio.create_task(
            self._run_incoming(call, trunk, to, answer, ring_time, talk_time, withheld, message))

    def _trunk_channel(self: Any, call: Any, exten: str, name: str, number: str) -> Channel:
        from .simulator import Channel

        self._trunk_seq = getattr(self, "_trunk_seq", 0) + 1
        uid = self._next_uniqueid()
        channel = Channel(f"PJSIP/trunk-{self._trunk_seq:08x}", uid, uid, INCOMING_CONTEXT, exten, state=4,
                          call=call, caller_num=number, caller_name=name)
        self._channels[channel.name] = channel
        return channel

    async def _run_incoming(self: Any, call: Any, trunk: Channel, to: list[str], answer: str,
                            ring_time: float, talk_time: float | None, withheld: bool,
                            message: tuple[bytes, str] | None = None) -> None:
        from .simulator import channel_event

        try:
            self._broadcast(channel_event("Newchannel", trunk))
            self._broadcast(channel_event("NewCallerid", trunk, (
                "CID-CallingPres", PRES_PROHIBITED if withheld else PRES_ALLOWED)))
            trunk.application, trunk.app_data = "Dial", "&".join(f"PJSIP/{t}" for t in to)
            rungs = [self._ring_extension(call, trunk, self.forwarded(t)) for t in to]
            winner = await self._wait_for_answer(call, trunk, rungs, answer, ring_time)
            if winner is None:
                await self._nobody_answered(call, trunk, rungs, message)
                return
            await self._talk(call, trunk, winner, rungs, talk_time)
        finally:
            for ch in list(self._channels.values()):
                if ch.call is call:
                    self._channels.pop(ch.name, None)
            if call.record.ended_at is None:
                call.record.ended_at = time.time()
            self._calls.discard(call)
            self._processed_calls += 1

    def _ring_extension(self: Any, call: Any, trunk: Channel, extension: str) -> _Rung:
        from .simulator import Channel, dial_event

        self._trunk_seq += 1
        uid = self._next_uniqueid()
        phone = self._phone(extension)
        channel = Channel(f"PJSIP/{extension}-{self._trunk_seq:08x}", uid, trunk.linkedid, INCOMING_CONTEXT,
                          extension, state=0, call=call, caller_num=trunk.caller_num,
                          caller_name=trunk.caller_name)
        self._channels[channel.name] = channel
        attempt = attempt_for(phone.spec if phone else None, line_free=phone.line_free if phone else True)
        rung = _Rung(extension, channel, phone, attempt)
        self._broadcast(channel_event_of(self, "Newchannel", channel))
        self._broadcast(dial_event("DialBegin", trunk, channel, ("DialString", extension)))
        if attempt in (CallAttempt.RING_THEN_ANSWER, CallAttempt.RING_FOREVER):
            self._phone_activity(phone, ringing=+1)
            self._set_state(channel, 5)
        else:
            status, cause = {CallAttempt.BUSY: ("BUSY", 17), CallAttempt.CONGESTION: ("CONGESTION", 34),
                             CallAttempt.UNREACHABLE: ("CHANUNAVAIL", 20)}.get(attempt, ("CHANUNAVAIL", 1))
            self._broadcast(dial_event("DialEnd", trunk, channel, ("DialStatus", status)))
            self._hangup(channel, cause)
            rung.done = True
        return rung

    async def _wait_for_answer(self: Any, call: Any, trunk: Channel, rungs: list[_Rung], answer: str,
                               ring_time: float) -> _Rung | None:
        ringing = [r for r in rungs if not r.done]
        if not ringing or answer.lower() == "nobody":
            if ringing:
                await self._pause(call, ring_time)
            return None
        if answer:
            chosen = [r for r in ringing if r.extension == answer]
            after = {id(r): (r.phone.spec.answer_after if r.phone else 0.0) for r in chosen}
        else:
            chosen = [r for r in ringing if r.attempt is CallAttempt.RING_THEN_ANSWER]
            after = {id(r): r.phone.spec.answer_after for r in chosen}
        if not chosen:
            await self._pause(call, ring_time)
            return None
        winner = min(chosen, key=lambda r: after[id(r)])
        wait = after[id(winner)]
        if wait > ring_time or not await self._pause(call, wait):
            if wait > ring_time:
                await self._pause(call, ring_time)
            return None
        return winner

    async def _nobody_answered(self: Any, call: Any, trunk: Channel, rungs: list[_Rung],
                               message: tuple[bytes, str] | None = None) -> None:
        from .simulator import dial_event

        caller_gone = call.hangup.done()
        for rung in rungs:
            if not rung.done:
                status = "CANCEL" if caller_gone else "NOANSWER"
                self._broadcast(dial_event("DialEnd", trunk, rung.channel, ("DialStatus", status)))
                self._hangup(rung.channel, 16 if caller_gone else 19)
                self._phone_activity(rung.phone, ringing=-1)
                rung.done = True
        busy = all(r.attempt is CallAttempt.BUSY for r in rungs)
        cause = 16 if caller_gone else (17 if busy else 19)
        if message is not None and not caller_gone:
            await self._record_message(call, trunk, *message)
            cause = 16  # the caller hangs up after speaking
        self._hangup(trunk, cause)
        rec = call.record
        rec.to_outcome = CallOutcome.BUSY if busy else CallOutcome.NO_ANSWER
        rec.from_outcome = rec.to_outcome
        rec.to_cause = cause
        rec.ended_at = time.time()

    async def _record_message(self: Any, call: Any, trunk: Channel, audio: bytes, suffix: str) -> None:
        """``Answer()`` then ``Record(<dir>/<Uniqueid><suffix>)``: the caller leaves a voice message."""
        from .simulator import channel_fields

        def var_set(name: str, value: str) -> list[Field]:
            return [("Event", "VarSet"), ("Privilege", "dialplan,all"), *channel_fields(trunk),
                    ("Variable", name), ("Value", value)]

        base = self.recording_dir / trunk.uniqueid
        await asyncio.to_thread(_write_recording, base.with_name(base.name + suffix), audio)
        self._set_state(trunk, 6)
        trunk.application, trunk.app_data = "Record", f"{base}{suffix}"
        self._broadcast(var_set("RECORDED_FILE", str(base)))  # Record() sets it without the extension
        await self._pause(call, MESSAGE_SECONDS)
        self._broadcast(var_set("RECORD_STATUS", "HANGUP"))

    async def _talk(self: Any, call: Any, trunk: Channel, winner: _Rung, rungs: list[_Rung],
                    talk_time: float | None) -> None:
        from .simulator import bridge_fields, channel_fields, dial_event

        for rung in rungs:
            if rung is not winner and not rung.done:
                self._broadcast(dial_event("DialEnd", trunk, rung.channel, ("DialStatus", "CANCEL")))
                self._hangup(rung.channel, 26)
                self._phone_activity(rung.phone, ringing=-1)
                rung.done = True
        self._phone_activity(winner.phone, ringing=-1, talking=+1)
        self._set_state(winner.channel, 6)
        self._broadcast(dial_event("DialEnd", trunk, winner.channel, ("DialStatus", "ANSWER")))
        self._set_state(trunk, 6)
        rec = call.record
        rec.from_outcome = rec.to_outcome = CallOutcome.ANSWERED
        rec.to_answered_at = rec.from_answered_at = time.time()
        rec.answered_by = winner.extension
        bridge_id = str(uuid.uuid4())
        self._broadcast([("Event", "BridgeCreate"), ("Privilege", "call,all"), *bridge_fields(bridge_id, 0)])
        for count, ch in enumerate((trunk, winner.channel), start=1):
            ch.bridge_id = bridge_id
            self._broadcast([("Event", "BridgeEnter"), ("Privilege", "call,all"), *bridge_fields(bridge_id, count),
                             *channel_fields(ch)])
        talk = talk_time if talk_time is not None else (winner.phone.spec.talk_time if winner.phone else 0.0)
        completed = await self._pause(call, talk if talk >= 0 else math.inf)
        for count, ch in enumerate((winner.channel, trunk)):
            self._broadcast([("Event", "BridgeLeave"), ("Privilege", "call,all"),
                             *bridge_fields(bridge_id, 1 - count), *channel_fields(ch)])
            ch.bridge_id = ""
        self._broadcast([("Event", "BridgeDestroy"), ("Privilege", "call,all"), *bridge_fields(bridge_id, 0)])
        cause = 16 if completed else call.hangup.result() or 16
        self._hangup(winner.channel, cause)
        self._hangup(trunk, cause)
        self._phone_activity(winner.phone, talking=-1)
        rec.to_cause = cause
        rec.ended_at = time.time()


def _write_recording(path: Path, audio: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(audio)


def channel_event_of(sim: Any, name: str, channel: Channel, *extra: Field) -> list[Field]:
    from .simulator import channel_event

    return channel_event(name, channel, *extra)
