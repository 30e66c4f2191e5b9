"""The simulator's newer parts on real sockets: AstDB and call forwarding, incoming calls from
outside (SimIncoming), BridgeList, Playback/SendFAX media log, Custom device states, and the
``mailgw phone`` CLI as a subprocess."""

from __future__ import annotations

import asyncio
import struct
import sys
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailgw.pbx.media import tiff_pages
from mailgw.pbx.simulator import AmiSimulator

from .pbx_helpers import RawAmi, phone_book

DIALPLAN = Path(__file__).resolve().parents[2] / "pbx" / "dialplans" / "ami-test.yaml"
ROOT = Path(__file__).resolve().parents[2]


def book() -> Any:
    return phone_book({"2000": {"behaviour": "answer", "answer_after": 1},
                       "2001": {"behaviour": "answer", "answer_after": 2},
                       "2002": "busy",
                       "2009": {"behaviour": "answer", "fax": True}},
                      default={"behaviour": "answer", "answer_after": 1})


async def logged_in(sim: AmiSimulator) -> RawAmi:
    raw = await RawAmi.open(sim.port or 0)
    await raw.login()
    return raw


async def test_astdb_put_get_tree_del(make_sim: Callable[..., Any]) -> None:
    raw = await logged_in(await make_sim(book()))
    raw.send(("Action", "DBPut"), ("ActionID", "p"), ("Family", "CF"), ("Key", "2000"), ("Val", "2001"))
    assert (await raw.response("p"))[0]["Message"] == "Updated database successfully"
    raw.send(("Action", "DBGet"), ("ActionID", "g"), ("Family", "CF"), ("Key", "2000"))
    assert (await raw.response("g"))[0]["Message"] == "Result will follow"
    item = await raw.event("DBGetResponse")
    assert item.keys() == ["Event", "Family", "Key", "Val", "ActionID"] and item["Val"] == "2001"
    raw.send(("Action", "DBDel"), ("ActionID", "d"), ("Family", "CF"), ("Key", "2000"))
    assert (await raw.response("d"))[0]["Message"] == "Key deleted successfully"
    raw.send(("Action", "DBGet"), ("ActionID", "g2"), ("Family", "CF"), ("Key", "2000"))
    assert (await raw.response("g2"))[0]["Message"] == "Database entry not found"
    raw.close()


async def incoming(raw: RawAmi, action_id: str, *fields: tuple[str, str]) -> tuple[Any, list[Any]]:
    raw.send(("Action", "SimIncoming"), ("ActionID", action_id), *fields)
    reply, _ = await raw.response(action_id)
    assert reply.ok, reply
    trunk = reply["Channel"]
    hangup, events = await raw.until(lambda m: m.event == "Hangup" and m.get("Channel") == trunk)
    return reply, [*events, hangup]


async def test_incoming_call_to_a_ring_group_answered_by_one(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(book())
    raw = await logged_in(sim)
    reply, events = await incoming(raw, "in1", ("CallerID", "0312345678"), ("To", "2000&2001"),
                                   ("Answer", "2001"), ("TalkTime", "1"))
    trunk = next(m for m in events if m.event == "Newchannel" and m["Channel"] == reply["Channel"])
    assert trunk["CallerIDNum"] == "0312345678" and trunk["Channel"].startswith("PJSIP/trunk-")
    status = {m["DestChannel"].split("-")[0]: m["DialStatus"] for m in events if m.event == "DialEnd"}
    assert status == {"PJSIP/2000": "CANCEL", "PJSIP/2001": "ANSWER"}
    assert [m.event for m in events if m.event.startswith("Bridge")][:3] == ["BridgeCreate", "BridgeEnter", "BridgeEnter"]
    record = sim.call(reply["Uniqueid"])
    assert record.direction == "incoming" and record.answered_by == "2001"
    raw.close()


async def test_incoming_withheld_nobody_answers(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(book())
    raw = await logged_in(sim)
    reply, events = await incoming(raw, "in2", ("CallerID", "withheld"), ("To", "2000"), ("Answer", "nobody"),
                                   ("RingTime", "2"))
    caller_id = next(m for m in events if m.event == "NewCallerid")
    assert caller_id["CallerIDNum"] == "<unknown>"
    assert caller_id["CID-CallingPres"].startswith("32 ")
    assert [m["DialStatus"] for m in events if m.event == "DialEnd"] == ["NOANSWER"]
    assert sim.call(reply["Uniqueid"]).outcome.value == "no-answer"
    raw.close()


async def test_call_forward_from_astdb_and_busy(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(book())
    raw = await logged_in(sim)
    raw.send(("Action", "DBPut"), ("ActionID", "cf"), ("Family", "CF"), ("Key", "2000"), ("Val", "2002"))
    await raw.response("cf")
    reply, events = await incoming(raw, "in3", ("CallerID", "0312345678"), ("To", "2000"))
    dial_end = next(m for m in events if m.event == "DialEnd")
    assert dial_end["DestChannel"].startswith("PJSIP/2002-") and dial_end["DialStatus"] == "BUSY"
    assert next(m for m in events if m.event == "Hangup" and m["Channel"] == reply["Channel"])["Cause"] == "17"
    raw.close()


async def test_bridge_list_during_a_connected_call(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(book())
    raw = await logged_in(sim)
    raw.send(("Action", "Originate"), ("ActionID", "o"), ("Channel", "Local/2000@mailgw-dial"),
             ("Context", "mailgw-connect"), ("Exten", "2001"), ("Priority", "1"), ("Async", "true"))
    await raw.event("BridgeEnter", BridgeNumChannels="2")
    raw.send(("Action", "BridgeList"), ("ActionID", "bl"))
    assert (await raw.response("bl"))[0]["Message"] == "Bridge listing will follow"
    item = await raw.event("BridgeListItem")
    assert item["BridgeNumChannels"] == "2" and item["ActionID"] == "bl"
    raw.close()


def write_tiff(path: Path, pages: int) -> None:
    """A minimal little-endian TIFF with ``pages`` empty image directories."""
    data = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for page in range(pages):
        offset = len(data)
        next_ifd = offset + 2 + 12 + 4 if page < pages - 1 else 0
        data += struct.pack("<H", 1) + struct.pack("<HHII", 256, 4, 1, 1) + struct.pack("<I", next_ifd)
    path.write_bytes(bytes(data))


async def test_sendfax_and_playback_are_logged(make_sim: Callable[..., Any], tmp_path: Path) -> None:
    write_tiff(tmp_path / "doc.tif", 3)
    with wave.open(str(tmp_path / "msg.wav"), "wb") as wav:
        wav.setnchannels(1), wav.setsampwidth(2), wav.setframerate(8000)
        wav.writeframes(b"\x00\x00" * 12000)  # 1.5 s
    assert tiff_pages(tmp_path / "doc.tif") == 3
    sim = await make_sim(book(), media_dirs=[tmp_path])
    raw = await logged_in(sim)
    for action_id, number, app, data in (("fax", "2009", "SendFAX", str(tmp_path / "doc.tif")),
                                         ("nofax", "2000", "SendFAX", str(tmp_path / "doc.tif")),
                                         ("play", "0311111111", "Playback", "msg")):
        raw.send(("Action", "Originate"), ("ActionID", action_id), ("Channel", f"Local/{number}@mailgw-dial"),
                 ("Application", app), ("Data", data), ("Async", "true"))
        await raw.event("OriginateResponse", ActionID=action_id)
    kinds = {(r.kind, r.number): r for r in sim.media_log}
    assert kinds[("fax-received", "2009")].pages == 3
    assert ("fax-refused", "2000") in kinds
    assert abs((kinds[("heard", "0311111111")].seconds or 0) - 1.5) < 0.01
    raw.close()


async def test_custom_device_state_from_the_ami_test_dialplan(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(phone_book({}), dialplans=[DIALPLAN])
    raw = await logged_in(sim)
    raw.send(("Action", "Command"), ("ActionID", "c"), ("Command", "devstate change Custom:3000 BUSY"))
    reply, _ = await raw.response("c")
    assert reply.getall("Output") == ["Changing 3000 to BUSY"]
    status = await raw.event("ExtensionStatus", Exten="3000")
    assert status["Status"] == "2" and status["Hint"] == "Custom:3000"
    raw.send(("Action", "Getvar"), ("ActionID", "g"), ("Variable", "DEVICE_STATE(Custom:3000)"))
    assert (await raw.response("g"))[0]["Value"] == "BUSY"
    raw.close()


async def phone_cli(port: int, *words: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailgw.cli", "phone", "--ami", f"127.0.0.1:{port}", *words,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode()


async def test_phone_cli_against_the_simulator(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(book())
    port = sim.port or 0
    code, out = await phone_cli(port, "2000", "dnd")
    assert code == 0 and "StatusText: Busy" in out
    code, out = await phone_cli(port, "list")
    assert code == 0 and "2000" in out and "Busy" in out
    code, _ = await phone_cli(port, "forward", "2001", "2000")
    assert code == 0 and sim.astdb["/CF/2001"] == "2000"
    code, out = await phone_cli(port, "call", "--from", "0312345678", "--to", "2001", "--nobody-answers",
                                "--ring-time", "1")
    assert code == 0 and "Incoming call queued" in out
    code, _ = await phone_cli(port, "unforward", "2001")
    assert code == 0 and "/CF/2001" not in sim.astdb
    code, out = await phone_cli(port, "unforward", "2001")
    assert code == 1 and "could not be deleted" in out
    code, out = await phone_cli(port, "frobnicate")
    assert code == 2
