"""Missed-call mail benchmark: 1,000 missed calls within 10 s, every notification to an SMTP sink.

    .venv/bin/python bench/absence_bench.py                 # 1,000 calls over 10 s
    .venv/bin/python bench/absence_bench.py --calls 200     # quicker

Everything runs in this one process on loopback, on one event loop, as ``mailgw serve`` does: the
gateway (store, AMI driver, call history, missed-call mailer, outbox) with its built-in AMI
simulator, and a real SMTP sink (aiosmtpd) that the gateway's smarthost points at. A customer list
of N customers is imported, their person in charge (an address outside the gateway's domain, so the
mail leaves by SMTP) is put in absence mode, and N incoming calls (``SimIncoming`` over AMI, one
caller per customer, nobody answers, 1 s of ringing at time_scale 0.05 = 50 ms) are started at an
even rate over ``--seconds``. It checks that every call gives exactly one mail (none lost, none
duplicated: the sink counts ``X-CTI-Call`` headers) and prints the time from the caller's hang-up
(the simulator's record of the call's end) to the sink's acceptance of the mail (``250`` at DATA):
p50, p99, max, both stamps from ``time.time()`` in this process.

Target (issue 8): 1,000 missed calls within 10 s, none lost, none duplicated; p50/p99 recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import yaml
from aiosmtpd.smtp import SMTP

import machine  # bench/machine.py: run as `python bench/<name>.py`

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailgw.config import HostPort, load_config  # noqa: E402
from mailgw.customers import Customer  # noqa: E402
from mailgw.gateway import Gateway  # noqa: E402

TIME_SCALE = 0.05
RING_SECONDS = 1.0  # simulated: 50 ms of real ringing


class Sink:
    def __init__(self) -> None:
        self.accepted: dict[str, list[float]] = {}
        self.done = asyncio.Event()
        self.expected = 0

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: ANN001
        at = time.time()
        call_id = ""
        for line in envelope.original_content.split(b"\r\n"):
            if not line:
                break
            if line.lower().startswith(b"x-cti-call:"):
                call_id = line.split(b":", 1)[1].strip().decode()
        self.accepted.setdefault(call_id, []).append(at)
        if sum(len(v) for v in self.accepted.values()) >= self.expected:
            self.done.set()
        return "250 2.0.0 sunk"


async def run(calls: int, seconds: float) -> int:
    loop = asyncio.get_running_loop()
    sink = Sink()
    sink.expected = calls
    server = await loop.create_server(lambda: SMTP(sink, loop=loop), "127.0.0.1", 0)
    sink_port = server.sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        directory = root / "directory.yaml"
        directory.write_text(yaml.safe_dump({"representative": "desk@b.example", "people": [
            {"address": "owner@b.example", "name": "Owner", "extension": "2000"}]}))
        base = load_config(None)
        config = replace(
            base, data_dir=root / "var", mailbox_root=root / "mailbox", directory=directory,
            smtp=replace(base.smtp, listen=HostPort("127.0.0.1", 0)),
            outbound=replace(base.outbound, smarthost=HostPort("127.0.0.1", sink_port)),
            pbx=replace(base.pbx, ami=replace(base.pbx.ami, port=0), max_concurrent_calls=calls,
                        # in this loop: the bench reads the simulator's own record of each call
                        simulator=replace(base.pbx.simulator, time_scale=TIME_SCALE, process=False)))
        gw = Gateway(config)
        await gw.start()
        try:
            numbers = [f"03{5000_0000 + i:08d}" for i in range(calls)]
            await gw.store.replace_customers([
                Customer(name=f"Customer {i}", contact=f"Contact {i}", phone=n, owner="Owner",
                         owner_address="owner@b.example", numbers=(f"+81{n[1:]}",)).row()
                for i, n in enumerate(numbers)])
            await gw.store.set_absence("owner@b.example", until=None, note="", source="bench")
            assert gw.pbx is not None and gw.simulator is not None
            started = time.perf_counter()
            interval = seconds / calls

            async def place(i: int) -> str:
                await asyncio.sleep(max(0.0, started + i * interval - time.perf_counter()))
                reply = await gw.pbx.client.action("SimIncoming", [
                    ("CallerID", numbers[i]), ("To", "2000"), ("Answer", "nobody"),
                    ("RingTime", f"{RING_SECONDS:g}")])
                assert reply.ok, reply
                return reply.get("Uniqueid") or ""

            call_ids = await asyncio.gather(*(place(i) for i in range(calls)))
            placed = time.perf_counter() - started
            try:
                await asyncio.wait_for(sink.done.wait(), timeout=seconds + 60)
            except TimeoutError:
                pass
            finished = time.perf_counter() - started
            ended = {r.call_id: r.ended_at for r in gw.simulator.calls if r.ended_at}
            notices = await gw.store.notices()
        finally:
            await gw.stop()
            server.close()
    lost = [c for c in call_ids if c not in sink.accepted]
    duplicated = [c for c, times in sink.accepted.items() if len(times) > 1]
    stray = [c for c in sink.accepted if c not in set(call_ids)]
    latencies = sorted((sink.accepted[c][0] - ended[c]) * 1000 for c in call_ids if c in sink.accepted and c in ended)
    print(machine.describe())
    print("note: the machine is shared with other work right now; figures are indicative")
    print(f"calls: {calls} started in {placed:.2f} s (target window {seconds:g} s); last mail at {finished:.2f} s")
    print(f"mails: {sum(len(v) for v in sink.accepted.values())} accepted by the sink; lost {len(lost)}, "
          f"duplicated {len(duplicated)}, stray {len(stray)}; notices recorded {len(notices)}")
    if latencies:
        p99 = latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))]
        print(f"hang-up -> accepted by sink: p50 {statistics.median(latencies):.1f} ms, p99 {p99:.1f} ms, "
              f"max {latencies[-1]:.1f} ms")
    return 0 if not (lost or duplicated or stray) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0, help="window the calls are started in")
    args = parser.parse_args()
    return asyncio.run(run(args.calls, args.seconds))


if __name__ == "__main__":
    sys.exit(main())
