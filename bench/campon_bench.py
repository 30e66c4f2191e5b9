"""Camp-on benchmark: 10,000 pending watch-mode camp-ons against the built-in AMI simulator.

    .venv/bin/python bench/campon_bench.py                    # 10,000 camp-ons, 400 latency samples
    .venv/bin/python bench/campon_bench.py --campons 2000     # quicker

Everything runs in this one process on loopback, on one event loop, as ``mailgw serve`` does: the
gateway (store, AMI driver, camp-on runner) and the simulator, whose phone book holds 2 × N hinted
extensions — callers 1xxxx (free) and destinations 3xxxx (busy). It measures:

1. **memory per pending camp-on**: the growth of the Python heap (tracemalloc, after a full GC)
   while N watch-mode camp-ons are created and reach their steady state, divided by N; also the
   process RSS growth (which includes SQLite's page cache);
2. **idle CPU**: process CPU time over 10 s of wall time with N camp-ons pending and no PBX events;
3. **idle event → Originate**: a destination is made free (``set_phone``, which writes the
   ExtensionStatus/DeviceStateChange events to the AMI socket at once); the simulator notes when
   the Originate for that destination arrives. Both timestamps are ``time.perf_counter()`` in this
   process. Samples are spaced so that the calls never queue behind each other
   (``max_concurrent_originates``); p50/p99/max are printed.

Targets (issue 4): < 4 KB per pending camp-on, p99 < 50 ms, idle CPU < 1 % of a core.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

import yaml

import machine  # bench/machine.py: run as `python bench/<name>.py`

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailgw.config import HostPort, load_config  # noqa: E402
from mailgw.gateway import Gateway  # noqa: E402
from mailgw.request import parse_request  # noqa: E402
from mailgw.store import NewMessage  # noqa: E402

CALLER0, TARGET0 = 10000, 30000


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def phone_book(path: Path, n: int) -> None:
    phones = {str(CALLER0 + i): {"behaviour": "answer"} for i in range(n)}
    phones.update({str(TARGET0 + i): {"behaviour": "busy"} for i in range(n)})
    path.write_text(yaml.safe_dump({"talk_time": 0.2, "phones": phones}))


async def create(gateway: Gateway, n: int, monitor: str) -> list[str]:
    """N pending watch-mode camp-ons, created the way the dispatcher hands them over (no SMTP:
    the request path has its own benchmark), notify: no so no mails are written."""
    config, store, campons = gateway.config, gateway.store, gateway.campons
    assert campons is not None
    raw = (f"From: alice@a.example\r\nTo: cti@a.example\r\nSubject: x\r\nMessage-ID: <b@x>\r\n\r\n"
           f"action: camp-on\r\nmode: watch\r\nnotify: no\r\nmonitor: {monitor}\r\nto: {TARGET0}\r\n"
           f"from: {CALLER0}\r\n").encode()
    template = parse_request(raw, mail_from="alice@a.example", rcpt_to="cti@a.example",
                             directory=gateway.directory, config=config)
    assert template is not None
    ids = []
    chunk = 250
    for start in range(0, n, chunk):
        requests, news = [], []
        for i in range(start, min(n, start + chunk)):
            request = replace(template, from_number=str(CALLER0 + i), to_number=str(TARGET0 + i))
            request_id = f"bench-{i:05d}"
            requests.append((request_id, request))
            news.append(NewMessage(request_id, "alice@a.example", "cti@a.example", Path("/dev/null"), len(raw),
                                   "request", "alice@a.example", request.to_json()))
        await store.add_messages(news)
        rows = await asyncio.gather(*(store.get_message(rid) for rid, _ in requests))
        await asyncio.gather(*(campons.handle(row, request) for row, (_, request) in zip(rows, requests)))
        ids += [rid for rid, _ in requests]
    return ids


async def main(n: int, samples: int, idle_seconds: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="mailgw-campon-bench-"))
    book = tmp / "phones.yaml"
    phone_book(book, n)
    base = load_config(None)
    config = replace(
        base, data_dir=tmp / "var", mailbox_root=tmp / "mailbox", smtp=replace(base.smtp, listen=HostPort("127.0.0.1", 0)),
        pbx=replace(base.pbx, ami=replace(base.pbx.ami, port=0), max_concurrent_calls=200,
                    # in this loop: the bench changes phones and reads their events in-process
                    simulator=replace(base.pbx.simulator, phones=book, time_scale=1.0, process=False)),
        campon=replace(base.campon, max_concurrent_originates=50))
    gateway = Gateway(config)
    await gateway.start()
    sim = gateway.simulator
    assert sim is not None and gateway.campons is not None
    originate_at: dict[str, float] = {}
    handler = sim._actions["originate"]

    async def noting_originate(session, msg):  # noqa: ANN001
        originate_at.setdefault(msg.get("Exten") or "", time.perf_counter())
        await handler(session, msg)

    sim._actions["originate"] = noting_originate
    try:
        # 1. memory
        gc.collect()
        tracemalloc.start()
        heap0, rss0 = tracemalloc.get_traced_memory()[0], rss_kib()
        t0 = time.perf_counter()
        await create(gateway, n, "2h")
        created_s = time.perf_counter() - t0
        await asyncio.sleep(1.0)  # let the stage listeners, commits and AMI replies settle
        gc.collect()
        heap1, rss1 = tracemalloc.get_traced_memory()[0], rss_kib()
        tracemalloc.stop()
        pending = len(gateway.campons.snapshot())
        assert pending == n, f"{pending} pending, expected {n}"
        assert not originate_at, "nothing may be dialled while every destination is busy"
        per_campon = (heap1 - heap0) / n
        rss_per = (rss1 - rss0) * 1024 / n

        # 2. idle CPU
        await asyncio.sleep(1.0)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(idle_seconds)
        idle_cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0)

        # 3. idle event -> Originate
        latencies = []
        step = max(1, n // samples)
        chosen = list(range(0, n, step))[:samples]
        for i in chosen:
            target = str(TARGET0 + i)
            before = time.perf_counter()
            sim.set_phone(target, "answer")
            deadline = before + 5.0
            while target not in originate_at and time.perf_counter() < deadline:
                await asyncio.sleep(0.001)
            if target in originate_at:
                latencies.append((originate_at[target] - before) * 1000)
            await asyncio.sleep(0.025)  # spacing: each call (talk 0.2 s) is over before the slots fill
        answered = len(originate_at)
    finally:
        await gateway.stop()

    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    print(machine.describe())
    print(f"command: .venv/bin/python bench/campon_bench.py --campons {n} --samples {samples}")
    print(f"pending watch-mode camp-ons: {n} (created in {created_s:.1f} s, {n / created_s:.0f}/s)")
    print(f"memory per pending camp-on: {per_campon:.0f} B Python heap (tracemalloc), "
          f"{rss_per:.0f} B RSS growth incl. SQLite cache   [target < 4096 B]")
    print(f"idle CPU with {n} pending: {idle_cpu * 100:.2f} % of a core over {idle_seconds:.0f} s   [target < 1 %]")
    print(f"idle event -> Originate on the wire: {len(latencies)} samples ({answered} originated): "
          f"p50 {statistics.median(latencies):.2f} ms, p99 {p(0.99):.2f} ms, max {latencies[-1]:.2f} ms   "
          f"[target p99 < 50 ms]")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--campons", type=int, default=10000)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measurement")
    args = parser.parse_args()
    asyncio.run(main(args.campons, args.samples, args.idle))
