"""A missed call followed up: the person calls the customer back (the simulator's phone dialling
out, SimOutgoing, or the gateway's own connect after a reply "call"), the missed call is marked
called back, and the digest and `mailgw calls` say so."""

from __future__ import annotations

import asyncio
import contextlib
import io
from pathlib import Path
from typing import Callable

import yaml

from mailgw.cli import main
from mailgw.config import Config
from mailgw.gateway import Gateway
from mailgw.pbx.outgoing import AnsweredOutgoing, dialled

from .absence_helpers import CallEnds, import_customers, missed_call, place_incoming
from .conftest import Sink, request_mail, running_gateway, submit, wait_stage
from .test_absence_e2e import absence_config, set_absent


class Followups:
    """Await the gateway's handling of answered outgoing calls (after the store was updated)."""

    def __init__(self, gw: Gateway) -> None:
        assert gw.call_history is not None
        self.seen: asyncio.Queue[tuple[list[str], AnsweredOutgoing]] = asyncio.Queue()
        gw.call_history.callback_listeners.append(lambda ids, call: self.seen.put_nowait((ids, call)))

    async def next(self, timeout: float = 10.0) -> tuple[list[str], AnsweredOutgoing]:
        return await asyncio.wait_for(self.seen.get(), timeout)


def dial(gw: Gateway, extension: str, number: str, *options: str) -> list[str]:
    return ["phone", "--ami", f"127.0.0.1:{gw.ami_port}", "dial", extension, number, *options]


async def test_calling_the_customer_back_marks_the_missed_call_and_the_digest_says_so(
        make_config: Callable[..., Config], sink: Sink, tmp_path: Path) -> None:
    config = absence_config(make_config, tmp_path, digests=(("tanaka@b.example", 2, None),))
    async with running_gateway(config, sink) as gw:
        await import_customers(gw, tmp_path)
        await set_absent(gw, "tanaka@b.example")
        ends, followups = CallEnds(gw), Followups(gw)
        first = await place_incoming(gw, "0312345678", "2000", answer="nobody")
        await ends.wait(first)

        # Tanaka dials XX Corp from the desk phone; nobody picks up: no follow-up yet.
        assert gw.pbx is not None and gw.call_history is not None
        dial_ends: asyncio.Queue[str] = asyncio.Queue()
        gw.pbx.client.add_listener(lambda msg: dial_ends.put_nowait(msg.get("DialStatus") or ""), "DialEnd")
        assert await asyncio.to_thread(main, dial(gw, "2000", "03-1234-5678", "--nobody-answers",
                                                 "--ring-time", "1")) == 0
        assert await asyncio.wait_for(dial_ends.get(), 10) == "NOANSWER"
        await gw.call_history.settled()
        assert followups.seen.empty() and await gw.store.callbacks_of([first]) == {}
        # Then someone answers: the missed call is followed up.
        assert await asyncio.to_thread(main, dial(gw, "2000", "03-1234-5678")) == 0
        marked, call = await followups.next()
        assert marked == [first] and call.extension == "2000" and "03-1234-5678" in call.numbers
        [(at, by)] = (await gw.store.callbacks_of([first])).values()
        assert by == "2000"

        second = await place_incoming(gw, "0312345679", "2000", answer="nobody")  # XX Corp's fax line, later
        await ends.wait(second)
        _, rcpt_tos, digest = await sink.next()
        assert rcpt_tos == ["tanaka@b.example"] and set(digest["X-CTI-Calls"].split(", ")) == {first, second}
        body = digest.get_body(("plain",)).get_content()
        assert body.count("called back ") == 1
        assert f"called back {at.astimezone():%Y-%m-%d %H:%M} by Tanaka Ichiro (2000)" in body, body

        cli_config = tmp_path / "gateway.yaml"
        cli_config.write_text(yaml.safe_dump({"data_dir": str(gw.config.data_dir),
                                              "directory": str(gw.config.directory)}))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert await asyncio.to_thread(main, ["calls", "--ids", "--config", str(cli_config)]) == 0
        lines = {line.rsplit("  ", 1)[1]: line for line in out.getvalue().splitlines()}
        assert f"missed, called back {at.astimezone():%H:%M} by 2000" in lines[first]
        assert "called back" not in lines[second]


async def test_an_answered_call_and_other_numbers_are_not_marked(make_config: Callable[..., Config], sink: Sink,
                                                                 tmp_path: Path) -> None:
    async with running_gateway(absence_config(make_config, tmp_path), sink) as gw:
        await import_customers(gw, tmp_path)
        ends, followups = CallEnds(gw), Followups(gw)
        answered = await place_incoming(gw, "0312345678", "2001", answer="2001")
        missed = await place_incoming(gw, "0611112222", "2002", answer="nobody")
        await asyncio.gather(ends.wait(answered), ends.wait(missed))
        assert await asyncio.to_thread(main, dial(gw, "2000", "0312345678")) == 0
        marked, _ = await followups.next()
        assert marked == []  # Bob had answered that call: nothing to follow up
        assert await asyncio.to_thread(main, dial(gw, "2000", "2001")) == 0  # an internal call
        marked, call = await followups.next()
        assert marked == [] and await gw.store.callbacks_of([answered, missed]) == {}


async def test_calling_back_by_reply_through_the_gateway_marks_the_missed_call(
        make_config: Callable[..., Config], sink: Sink, tmp_path: Path) -> None:
    async with running_gateway(absence_config(make_config, tmp_path), sink) as gw:
        followups = Followups(gw)
        call_id = await missed_call(gw, tmp_path)
        _, _, missed = await sink.next()
        reply = request_mail("tanaka@b.example", gw.config.sender_address, "call\n", subject="Re: missed")
        reply["In-Reply-To"] = missed["Message-ID"]
        accepted = await submit(gw.smtp_port, reply)
        assert accepted.code == 250, accepted
        assert (await wait_stage(gw.store, accepted.queue_id, "outcome")).startswith("answered")
        marked, call = await followups.next()
        assert marked == [call_id] and call.extension == "2000"
        assert [by for _, by in (await gw.store.callbacks_of([call_id])).values()] == ["2000"]


def test_the_number_is_read_from_the_dial_string() -> None:
    assert dialled("0312345678@trunk") == "0312345678"
    assert dialled("trunk/sip:+81312345678@sip.example.net") == "+81312345678"
    assert dialled("PJSIP/0312345678@trunk,30") == "0312345678"
