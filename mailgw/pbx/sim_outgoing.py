"""Simulator-only: a phone calls outside by itself (someone dials a customer from their desk).

``Action: SimOutgoing`` (not an Asterisk action; the ``Sim`` prefix cannot collide):

* ``Phone``: the extension that dials; ``To``: the number it dials (as the person keys it in).
* ``Answer``: ``yes`` (default: the far end answers after ``ANSWER_AFTER`` seconds) or ``nobody``
  (it rings until ``RingTime``, default 20 s); ``TalkTime``: seconds of talk (default 5).

Reply: ``Response: Success``, ``Message: Outgoing call queued``, ``Channel``, ``Uniqueid`` (the
phone's channel ``PJSIP/<ext>-0000000N``). Then what a real Asterisk emits for a phone whose call
runs ``Dial(PJSIP/${EXTEN}@trunk,<ring time>)`` in ``OUTGOING_CONTEXT``: Newchannel of the phone's
channel (CallerIDNum the extension, Exten the dialled number), Newchannel of the trunk channel,
DialBegin (``DialString: <number>@trunk``), then DialEnd ``ANSWER`` with Newstate Up,
BridgeCreate/BridgeEnter ×2 … BridgeLeave ×2/BridgeDestroy and Hangup (cause 16) of both, or
DialEnd ``NOANSWER`` and the Hangups. The call log (SimCalls) gets ``Direction: outgoing``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Any

from .ami import Message
from .port import CallOutcome

if TYPE_CHECKING:
    from .simulator import Channel, _Session

OUTGOING_CONTEXT = "from-internal"
ANSWER_AFTER = 2.0
DEFAULT_TALK_TIME = 5.0
DEFAULT_RING_TIME = 20.0


class OutgoingCalls:
    """Mixin of AmiSimulator: the SimOutgoing action."""

    async def _action_sim_outgoing(self: Any, session: _Session, msg: Message) -> None:
        from .simulator import CallRecord, Channel, OriginateRequest, _Call

        extension, number = (msg.get("Phone") or "").strip(), (msg.get("To") or "").strip()
        if not extension or not number:
            session.respond(msg, "Error", ("Message", "Phone and To are required"))
            return
        try:
            ring_time = float(msg.get("RingTime") or DEFAULT_RING_TIME)
            talk_time = float(msg.get("TalkTime") or DEFAULT_TALK_TIME)
        except ValueError:
            session.respond(msg, "Error", ("Message", "Invalid RingTime or TalkTime"))
            return
        answered = (msg.get("Answer") or "yes").strip().lower() != "nobody"
        request = OriginateRequest(
            channel=f"PJSIP/{extension}", context=OUTGOING_CONTEXT, exten=number, priority=1, application=None,
            data=None, timeout=ring_time, caller_id=("", extension), channel_id=None, other_channel_id=None,
            variables={}, action_id=msg.get("ActionID"), is_async=True)
        record = CallRecord(call_id="", action_id=request.action_id, from_number=extension,
                            context=OUTGOING_CONTEXT, exten=number, application=None, data=None,
                            started_at=time.time(), to_number=number)
        record.direction = "outgoing"
        call = _Call(request, record, asyncio.get_running_loop().create_future())
        self._trunk_seq = getattr(self, "_trunk_seq", 0) + 1
        uid = self._next_uniqueid()
        phone_channel = Channel(f"PJSIP/{extension}-{self._trunk_seq:08x}", uid, uid, OUTGOING_CONTEXT, number,
                                state=4, call=call, caller_num=extension, caller_name=extension)
        self._channels[phone_channel.name] = phone_channel
        record.call_id = uid
        self.calls.append(record)
        self._calls.add(call)
        session.respond(msg, "Success", ("Message", "Outgoing call queued"), ("Channel", phone_channel.name),
                        ("Uniqueid", uid))
        call.task = asyncio.create_task(self._run_outgoing(call, phone_channel, extension, number, answered,
                                                           ring_time, talk_time))

    async def _run_outgoing(self: Any, call: Any, caller: Channel, extension: str, number: str, answered: bool,
                            ring_time: float, talk_time: float) -> None:
        from .simulator import Channel, bridge_fields, channel_event, channel_fields, dial_event

        rec = call.record
        phone = self.phones.get(extension)
        try:
            self._broadcast(channel_event("Newchannel", caller))
            self._phone_activity(phone, talking=+1)
            self._trunk_seq += 1
            trunk = Channel(f"PJSIP/trunk-{self._trunk_seq:08x}", self._next_uniqueid(), caller.linkedid,
                            OUTGOING_CONTEXT, number, state=0, call=call, caller_num=extension,
                            caller_name=extension)
            self._channels[trunk.name] = trunk
            caller.application, caller.app_data = "Dial", f"PJSIP/{number}@trunk,{ring_time:g}"
            self._broadcast(channel_event("Newchannel", trunk))
            self._broadcast(dial_event("DialBegin", caller, trunk, ("DialString", f"{number}@trunk")))
            self._set_state(trunk, 5)
            picked_up = answered and ANSWER_AFTER <= ring_time and await self._pause(call, ANSWER_AFTER)
            if not picked_up:
                if not answered:
                    await self._pause(call, ring_time)  # Dial's timeout, unless hung up before
                status = "CANCEL" if call.hangup.done() else "NOANSWER"
                self._broadcast(dial_event("DialEnd", caller, trunk, ("DialStatus", status)))
                self._hangup(trunk, 16)
                self._hangup(caller, 16)
                rec.from_outcome = rec.to_outcome = CallOutcome.NO_ANSWER
                return
            self._set_state(trunk, 6)
            self._broadcast(dial_event("DialEnd", caller, trunk, ("DialStatus", "ANSWER")))
            self._set_state(caller, 6)
            rec.from_outcome = rec.to_outcome = CallOutcome.ANSWERED
            rec.from_answered_at = rec.to_answered_at = time.time()
            bridge_id = str(uuid.uuid4())
            self._broadcast([("Event", "BridgeCreate"), ("Privilege", "call,all"), *bridge_fields(bridge_id, 0)])
            for count, ch in enumerate((caller, trunk), start=1):
                self._broadcast([("Event", "BridgeEnter"), ("Privilege", "call,all"),
                                 *bridge_fields(bridge_id, count), *channel_fields(ch)])
            await self._pause(call, talk_time)
            for count, ch in enumerate((trunk, caller)):
                self._broadcast([("Event", "BridgeLeave"), ("Privilege", "call,all"),
                                 *bridge_fields(bridge_id, 1 - count), *channel_fields(ch)])
            self._broadcast([("Event", "BridgeDestroy"), ("Privilege", "call,all"), *bridge_fields(bridge_id, 0)])
            self._hangup(trunk, 16)
            self._hangup(caller, 16)
            rec.to_cause = 16
        finally:
            for ch in list(self._channels.values()):
                if ch.call is call:
                    self._channels.pop(ch.name, None)
            self._phone_activity(phone, talking=-1)
            rec.ended_at = rec.ended_at or time.time()
            self._calls.discard(call)
            self._processed_calls += 1
