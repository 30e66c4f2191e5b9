"""A restart mid-call loses no missed-call notice and sends none twice.

The PBX (a simulator of its own here) keeps the calls going while the gateway is stopped: one call
ends while the gateway is down (its voice message, named before the restart, still attached),
another one rings on across the restart and ends after it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from mailgw.config import Config
from mailgw.pbx.driver import AmiClient
from mailgw.pbx.simulator import AmiSimulator
from mailgw.resources import shipped

from .absence_helpers import CallEnds, import_customers, place_incoming, write_directory
from .conftest import TIME_SCALE, Sink, running_gateway

LONG_RING = 3000.0  # seconds (x TIME_SCALE = 60 s): rings until the test hangs it up


async def hang_up(client: AmiClient, trunk: str) -> None:
    """The caller gives up: Hangup of the trunk channel, awaited until the PBX says it is gone."""
    with client.subscribe("Hangup") as hangups:
        reply = await client.action("Hangup", Channel=trunk)
        assert reply.ok, reply
        await hangups.wait_for(lambda m: m.get("Channel") == trunk, timeout=10)


async def test_calls_ending_during_and_after_a_restart_each_give_one_mail(
        make_config: Callable[..., Config], sink: Sink, tmp_path: Path) -> None:
    sim = AmiSimulator(phones=shipped("pbx", "phones.yaml"), username="mailgw", secret="mailgw-secret",
                       time_scale=TIME_SCALE)
    port = await sim.start("127.0.0.1", 0)
    base = make_config(directory=write_directory(tmp_path))
    config = replace(base, pbx=replace(base.pbx, ami=replace(base.pbx.ami, port=port),
                                       simulator=replace(base.pbx.simulator, enabled=False)))
    caller = AmiClient("127.0.0.1", port, "mailgw", "mailgw-secret")
    await caller.start()
    try:
        async with running_gateway(config, sink) as gw:
            await import_customers(gw, tmp_path)
            for address in ("tanaka@b.example", "dave@b.example"):
                await gw.store.set_absence(address, until=None, note="", source="test")
            recorded = CallEnds(gw)
            first = await place_incoming(gw, "0312345678", "2000", answer="nobody", ring_time=LONG_RING)
            second = await place_incoming(gw, None, "2004", answer="nobody", ring_time=LONG_RING)
            for call_id in (first, second):  # both recorded as ringing before the gateway goes
                row, _ = await recorded.wait(call_id, until=lambda row: bool(row.rung))
                assert row.ended_at is None
            channel = {ch.uniqueid: ch.name for ch in sim._channels.values()}
            # The dial plan names a voice message for the first call: recorded before the restart.
            voice = config.data_dir / "sim-recordings" / "first.wav"
            voice.parent.mkdir(parents=True)
            voice.write_bytes(b"RIFF-voice-message")
            assert gw.pbx is not None and gw.call_history is not None
            with gw.pbx.client.subscribe("VarSet") as var_sets:
                reply = await caller.action("Setvar", Channel=channel[first], Variable="MAILGW_RECORDING",
                                            Value=str(voice))
                assert reply.ok, reply
                await var_sets.wait_for(lambda m: m.get("Value") == str(voice), timeout=10)
            await gw.call_history.settled()
            assert await gw.store.recording_of(first) == str(voice)

        await hang_up(caller, channel[first])  # ends while the gateway is down

        async with running_gateway(config, sink) as gw:
            ends = CallEnds(gw)
            _, rcpt_tos, message = await sink.next()
            assert rcpt_tos == ["tanaka@b.example"] and message["X-CTI-Call"] == first
            assert [a.get_content() for a in message.iter_attachments()] == [b"RIFF-voice-message"]
            row = await gw.store.incoming_call(first)
            assert row is not None and row.ended_unseen and row.answered_by is None
            await hang_up(caller, channel[second])  # still ringing across the restart: followed on
            row, notice = await ends.wait(second)
            assert not row.ended_unseen and notice is not None and notice.recipient == "desk@b.example"
            _, rcpt_tos, message = await sink.next()
            assert rcpt_tos == ["desk@b.example"] and message["X-CTI-Call"] == second

        async with running_gateway(config, sink) as gw:  # a further restart sends nothing again
            assert [(n.call_id, n.state) for n in await gw.store.notices()] == [(first, "queued"), (second, "queued")]
            assert await gw.store.open_incoming() == []
        assert sink.received.empty()
    finally:
        await caller.close()
        await sim.stop()
