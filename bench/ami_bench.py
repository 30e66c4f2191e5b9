"""PBX-layer benchmark: our AMI driver (``AmiClient``) against panoramisk, on the built-in simulator.

    .venv/bin/python bench/ami_bench.py                       # full run (well under 2 minutes)
    .venv/bin/python bench/ami_bench.py --originates 500      # quicker

Everything runs on 127.0.0.1 with ``AmiSimulator`` (1,000 hinted phones 3000-3999, all "answer",
time_scale 0.001) as the PBX.

1. **Originates/s.** The simulator runs in a child process (its own core, so the clients' own cost
   shows). N async Originates (``Channel: Local/<phone>@mailgw-dial``, ``Application: Wait``,
   ``Data: 0``, ``Async: true``; phones rotate so none is ever busy; ~21 AMI messages per call) at
   concurrency 1, 10 and 100; an Originate is done when its ``OriginateResponse`` (matched by
   ActionID) arrives. (a) our ``AmiClient`` (``action()`` for the response, a listener on
   OriginateResponse resolving a future per ActionID), (b) panoramisk 1.4 (``send_action`` of an
   Async Originate resolves by itself with [response, OriginateResponse]). Per concurrency level
   each client gets its own session in turn (only one logged in at a time, since every session
   receives every event), after a 200-originate warm-up. Also printed: CPU time per originate of
   this process (the client) and of the simulator process (/proc), to show which side limits.
2. **Event latency.** A simulator in this process; our ``AmiClient`` subscribed
   (``subscribe("ExtensionStatus")``) to it; the device states of all 1,000 phones are changed in-process with
   ``sim.set_phone(number, busy|answer)`` (the simulator queues ExtensionStatus +
   DeviceStateChange and sends them at the end of that loop iteration, coalesced), ``time.perf_counter()`` taken
   just before each change; the delay runs to the moment the subscriber's consumer task has the
   event (``await sub.get()``), also noted where the listener sees it in the reader. Two patterns,
   5 rounds × 1,000 changes each: **paced** (one change per ~1 ms, the realistic case) and
   **burst** (all 1,000 changes in one loop iteration, i.e. 2,000 events in one flood). Both
   timestamps are this process's ``perf_counter()``.

Targets (issue: PBX layer): our originates/s ≥ panoramisk's; event latency p99 < 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import machine  # bench/machine.py: run as `python bench/<name>.py`

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailgw.pbx.driver import AmiClient  # noqa: E402
from mailgw.pbx.phones import parse_phone_book  # noqa: E402
from mailgw.pbx.simulator import AmiSimulator  # noqa: E402

USER, SECRET = "bench", "bench-secret"
PHONE0, PHONES = 3000, 1000
CONCURRENCY = (1, 10, 100)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Phones:
    """Hands out phone numbers in rotation, so a phone is never called twice at once."""

    def __init__(self) -> None:
        self._seq = itertools.count()

    def next(self) -> str:
        return str(PHONE0 + next(self._seq) % PHONES)


# --- (a) ours ------------------------------------------------------------------------------------

class Ours:
    name = "AmiClient"

    def __init__(self, port: int, phones: Phones) -> None:
        self.client = AmiClient("127.0.0.1", port, USER, SECRET, action_timeout=30.0)
        self.phones = phones
        self.waiting: dict[str, asyncio.Future] = {}
        self.failed = 0

    async def start(self) -> None:
        await self.client.start(wait=True)
        self.client.add_listener(self._on_response, "OriginateResponse")

    def _on_response(self, msg) -> None:  # noqa: ANN001
        future = self.waiting.pop(msg.get("ActionID") or "", None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def originate(self) -> None:
        action_id = self.client.next_action_id()
        future = asyncio.get_running_loop().create_future()
        self.waiting[action_id] = future
        reply = await self.client.action("Originate", Channel=f"Local/{self.phones.next()}@mailgw-dial",
                                         Application="Wait", Data="0", Async="true", ActionID=action_id)
        if not reply.ok:
            self.waiting.pop(action_id, None)
            self.failed += 1
            return
        event = await asyncio.wait_for(future, 30.0)
        if event.get("Response") != "Success":
            self.failed += 1

    async def close(self) -> None:
        await self.client.close()


# --- (b) panoramisk ------------------------------------------------------------------------------

class Panoramisk:
    name = "panoramisk"

    def __init__(self, port: int, phones: Phones) -> None:
        self.port = port
        self.phones = phones
        self.failed = 0
        self.manager = None

    async def start(self) -> None:
        import panoramisk

        loop = asyncio.get_running_loop()
        logged_in = loop.create_future()

        def on_login(manager) -> None:  # noqa: ANN001
            if not logged_in.done():
                logged_in.set_result(None)

        self.manager = panoramisk.Manager(loop=loop, host="127.0.0.1", port=self.port, username=USER,
                                          secret=SECRET, ping_delay=0, ping_interval=20, on_login=on_login)
        await self.manager.connect()
        await asyncio.wait_for(logged_in, 10.0)

    async def originate(self) -> None:
        assert self.manager is not None
        replies = await asyncio.wait_for(self.manager.send_action({
            "Action": "Originate", "Channel": f"Local/{self.phones.next()}@mailgw-dial",
            "Application": "Wait", "Data": "0", "Async": "true"}), 30.0)
        last = replies[-1] if isinstance(replies, list) else replies
        if len(replies) < 2 or last.get("Event") != "OriginateResponse" or last.get("Response") != "Success":
            self.failed += 1

    async def close(self) -> None:
        if self.manager is not None:
            self.manager.close()


async def drive(client: Ours | Panoramisk, n: int, concurrency: int) -> float:
    """Originates per second: n originates by `concurrency` workers, each one at a time."""
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            await client.originate()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t0)


# --- 2. event latency ------------------------------------------------------------------------------

async def event_latency(sim: AmiSimulator, port: int, rounds: int, paced: bool,
                        behaviour0: int) -> tuple[list[float], list[float], int, int]:
    client = AmiClient("127.0.0.1", port, USER, SECRET)
    await client.start(wait=True)
    sub = client.subscribe("ExtensionStatus", maxsize=10_000)
    sent: dict[str, float] = {}
    at_listener: list[float] = []
    at_subscriber: list[float] = []
    seen = 0
    round_done: asyncio.Future | None = None

    def on_listener(msg) -> None:  # noqa: ANN001  (registered after the subscription: runs after _put)
        t = sent.get(msg.get("Exten") or "")
        if t is not None:
            at_listener.append(time.perf_counter() - t)

    client.add_listener(on_listener, "ExtensionStatus")

    async def consume() -> None:
        nonlocal seen
        while True:
            msg = await sub.get()
            now = time.perf_counter()
            t = sent.pop(msg.get("Exten") or "", None)
            if t is None:
                continue
            at_subscriber.append(now - t)
            seen += 1
            if not sent and round_done is not None and not round_done.done():
                round_done.set_result(None)

    consumer = asyncio.create_task(consume())
    numbers = [str(PHONE0 + i) for i in range(PHONES)]
    missing = 0
    try:
        for r in range(rounds):
            behaviour = "busy" if (r + behaviour0) % 2 == 0 else "answer"
            round_done = asyncio.get_running_loop().create_future()
            for number in numbers:
                sent[number] = time.perf_counter()
                sim.set_phone(number, behaviour)
                if paced:
                    await asyncio.sleep(0.001)
            try:
                await asyncio.wait_for(round_done, 10.0)
            except TimeoutError:
                missing += len(sent)
                sent.clear()
            await asyncio.sleep(0.1)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        dropped = sub.dropped
        sub.close()
        await client.close()
    return at_listener, at_subscriber, missing, dropped


# --- main ----------------------------------------------------------------------------------------------

def run_simulator(conn) -> None:  # noqa: ANN001
    """Child process for part 1: the simulator on its own core, so the clients' cost shows."""
    async def serve() -> None:
        sim = AmiSimulator(phones=phone_book(), username=USER, secret=SECRET, time_scale=0.001)
        conn.send(await sim.start("127.0.0.1", 0))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, conn.recv)  # any message (or EOF) = stop
        await sim.stop()

    try:
        asyncio.run(serve())
    except EOFError:
        pass


def phone_book():  # noqa: ANN201
    return parse_phone_book({"talk_time": 1, "phones": {str(PHONE0 + i): "answer" for i in range(PHONES)}})


def cpu_seconds(pid: int) -> float:
    """utime + stime of another process (the simulator child), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def originates(port: int, n: int, sim_pid: int) -> tuple[list[str], tuple[int, int]]:
    phones = Phones()
    rows: list[str] = []
    failed = {"AmiClient": 0, "panoramisk": 0}
    for conc in CONCURRENCY:
        rates, cpu, sim_cpu = {}, {}, {}
        for cls in (Ours, Panoramisk):  # one session at a time: the other would parse every event too
            client = cls(port, phones)
            await client.start()
            await drive(client, min(200, n), 10)  # warm-up
            client.failed = 0
            cpu0, sim0 = time.process_time(), cpu_seconds(sim_pid)
            rates[cls.name] = await drive(client, n, conc)
            cpu[cls.name] = (time.process_time() - cpu0) / n * 1e6
            sim_cpu[cls.name] = (cpu_seconds(sim_pid) - sim0) / n * 1e6
            failed[cls.name] += client.failed
            await client.close()
            await asyncio.sleep(0.3)  # the simulator's calls end
        ratio = rates["AmiClient"] / rates["panoramisk"]
        rows.append(f"concurrency {conc:>3}   {rates['AmiClient']:>9.0f}  {rates['panoramisk']:>10.0f}  {ratio:>5.2f}x"
                    f"   {cpu['AmiClient']:>8.0f}  {cpu['panoramisk']:>8.0f}"
                    f"  {cpu['AmiClient'] / cpu['panoramisk']:>5.2f}x"
                    f"   {sim_cpu['AmiClient']:>5.0f} {sim_cpu['panoramisk']:>5.0f}")
        print("   " + rows[-1], flush=True)
    return rows, (failed["AmiClient"], failed["panoramisk"])


async def main(n: int, rounds: int) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=run_simulator, args=(child,), daemon=True)
    proc.start()
    try:
        port = await asyncio.get_running_loop().run_in_executor(None, parent.recv)
        print(f"1. Originate -> OriginateResponse, {n} per run, simulator in a child process, 127.0.0.1",
              flush=True)
        rows, failures = await originates(port, n, proc.pid)
    finally:
        parent.send("stop")
        await asyncio.get_running_loop().run_in_executor(None, proc.join, 10)
        if proc.is_alive():
            proc.terminate()

    sim = AmiSimulator(phones=phone_book(), username=USER, secret=SECRET, time_scale=0.001)
    port = await sim.start("127.0.0.1", 0)
    try:
        print(f"2. ExtensionStatus latency, {rounds} x {PHONES} changes (set_phone in-process, "
              "perf_counter in this process)", flush=True)
        latency_rows = []
        flip = 0
        for label, paced in (("paced ~1/ms", True), ("burst 1000", False)):
            listener, subscriber, missing, dropped = await event_latency(sim, port, rounds, paced, flip)
            flip += rounds
            for where, values in (("subscriber", subscriber), ("listener", listener)):
                ms = [v * 1000 for v in values]
                latency_rows.append(
                    f"{label:<12} at {where:<10} {len(ms):>6}  {pct(ms, 0.50):>7.2f}  {pct(ms, 0.99):>7.2f}  "
                    f"{max(ms):>7.2f}  {statistics.fmean(ms):>7.2f}")
            latency_rows.append(f"{label:<12} missing {missing}, dropped by the subscription {dropped}")
            print(f"   {label} done", flush=True)
    finally:
        await sim.stop()

    print()
    print(machine.describe())
    print(f"simulator: {PHONES} phones, time_scale 0.001; part 1 in a child process, part 2 in this process")
    print()
    print("Originates/s (done at OriginateResponse)              client CPU us/originate    simulator CPU")
    print("                  AmiClient  panoramisk   ours/      ours      pano   ours/    us/orig ours pano")
    for row in rows:
        print(row)
    print(f"failed OriginateResponses: AmiClient {failures[0]}, panoramisk {failures[1]}")
    print()
    print("ExtensionStatus latency (ms)            events      p50      p99      max     mean")
    for row in latency_rows:
        print(row)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--originates", type=int, default=2000, help="originates per run (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of 1,000 state changes (default 5)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    asyncio.run(main(args.originates, args.rounds))
    print(f"\n(total {time.perf_counter() - t0:.1f} s)")
