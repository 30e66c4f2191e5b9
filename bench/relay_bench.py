"""Relay throughput: mails/s through gateway a to a sink, against a bare aiosmtpd relay, in one run.

    .venv/bin/python bench/relay_bench.py                  # 600 mails at C=10
    .venv/bin/python bench/relay_bench.py --n 2000 -c 20
    .venv/bin/python bench/relay_bench.py --json out.json  # figures for scripts (tests/test_relay_bench.py)
    .venv/bin/python bench/relay_bench.py --profile var/relay-profile   # mailgw under py-spy (.[bench])

It starts, each in its own process:

(a) the baseline: a bare aiosmtpd relay whose handler forwards each mail to the sink with
    aiosmtplib before answering 250 (no spool, no queue, nothing durable: the least a relay does);
(b) ``mailgw serve`` for a.example whose destination DB sends ``sink.example`` to the sink
    (``tls: none``): every mail is fsynced, recorded, answered 250, then relayed by the outbox.

This process is the load generator (C clients, one SMTP connection each, plain ~4 KB mails from
alice@a.example to someone@sink.example) and the sink (aiosmtpd, counts what arrives). Throughput
is N divided by the time from the first MAIL to the N-th mail arriving at the sink. The target:
mailgw relays at least 70 % of the baseline's rate. Then it checks that every mail arrived once
(exit status 1 if not, or if a server answered 4xx: the mail is then sent again and counted).
CPU per mail is the server process's (all its threads) and this process's (load and sink) over
the same interval, from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib
import yaml
from aiosmtpd.smtp import SMTP

import machine  # bench/machine.py: run as `python bench/<name>.py`
from request_path import (cpu_seconds, free_port, gateway_pid, profile_summary, start_process, stop_process,
                          wait_for_port)

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.70


# --- (a) the baseline ---------------------------------------------------------------------------

def serve_baseline(port: int, sink_port: int) -> None:
    class Forward:
        async def handle_DATA(self, server, session, envelope) -> str:  # noqa: ANN001
            await aiosmtplib.send(envelope.original_content, sender=envelope.mail_from,
                                  recipients=envelope.rcpt_tos, hostname="127.0.0.1", port=sink_port,
                                  start_tls=False, timeout=30)
            return "250 2.0.0 relayed"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: SMTP(Forward(), loop=loop), "127.0.0.1", port)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# --- (b) mailgw ---------------------------------------------------------------------------------

def mailgw_config(folder: Path, port: int, sink_port: int) -> Path:
    destinations = folder / "destinations.yaml"
    destinations.write_text(yaml.safe_dump({"destinations": {
        "sink.example": {"host": f"127.0.0.1:{sink_port}", "tls": "none"}}}))
    config = folder / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(folder / "var"), "mailbox": {"root": str(folder / "mailbox")},
        "smtp": {"listen": f"127.0.0.1:{port}"}, "destinations": str(destinations),
        "pbx": {"ami": {"port": 0}},
    }))
    return config


# --- the sink and the load ----------------------------------------------------------------------

class Sink:
    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.arrived = asyncio.Event()
        self.expect = 0

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: ANN001
        tag = envelope.rcpt_tos[0]
        self.seen[tag] = self.seen.get(tag, 0) + 1
        if len(self.seen) >= self.expect:
            self.arrived.set()
        return "250 2.0.0 sunk"


def mail(run: str, number: int) -> tuple[str, bytes]:
    rcpt = f"{run}-{number}@sink.example"
    body = "".join(f"line {i} of a plain mail that only passes through this office's gateway\r\n" for i in range(50))
    raw = (f"From: alice@a.example\r\nTo: {rcpt}\r\nSubject: relay {number}\r\n"
           f"Message-ID: <{run}.{number}@a.example>\r\n\r\n{body}").encode()
    return rcpt, raw


async def load(port: int, sink: Sink, run: str, n: int, concurrency: int) -> tuple[float, float, int, int]:
    """Send n mails on ``concurrency`` connections: seconds until all arrived, until all were
    accepted (250), how many were, and how many 4xx replies came (each mail is sent again then,
    on a new connection, as an MTA would)."""
    sink.seen, sink.expect = {}, n
    sink.arrived.clear()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    accepted = deferred = 0

    async def client() -> None:
        nonlocal accepted, deferred
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60, start_tls=False)
        await smtp.connect()
        try:
            while not queue.empty():
                number = queue.get_nowait()
                rcpt, raw = mail(run, number)
                try:
                    await smtp.sendmail("alice@a.example", [rcpt], raw)
                except aiosmtplib.SMTPResponseException as exc:
                    if exc.code >= 500:
                        raise
                    deferred += 1
                    queue.put_nowait(number)
                    smtp.close()
                    await smtp.connect()
                    continue
                accepted += 1
        finally:
            smtp.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    all_accepted = time.perf_counter() - start
    await asyncio.wait_for(sink.arrived.wait(), 300)
    return time.perf_counter() - start, all_accepted, accepted, deferred


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=600, help="mails per run")
    parser.add_argument("-c", "--concurrency", type=int, default=10)
    parser.add_argument("--warm-up", type=int, default=50)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="run mailgw under py-spy, write its profile here")
    args = parser.parse_args()

    loop = asyncio.get_running_loop()
    sink = Sink()
    sink_server = await loop.create_server(lambda: SMTP(sink, loop=loop), "127.0.0.1", 0)
    sink_port = sink_server.sockets[0].getsockname()[1]
    folder = Path(tempfile.mkdtemp(prefix="mailgw-relay-bench-"))
    base_port, gw_port = free_port(), free_port()
    baseline = await start_process(sys.executable, __file__, "--serve-baseline", str(base_port), str(sink_port),
                                   ready="ready")
    gateway_cmd = [sys.executable, "-m", "mailgw.cli", "serve", "--log-level", "WARNING",
                   "--config", str(mailgw_config(folder, gw_port, sink_port))]
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        gateway_cmd = [str(Path(sys.executable).with_name("py-spy")), "record", "--rate", "200", "--nonblocking",
                       "--gil", "--format", "raw", "--output", str(args.profile / "mailgw.folded"), "--", *gateway_cmd]
    gateway = await start_process(*gateway_cmd, ready=None)
    runs = []
    try:
        await wait_for_port(gw_port)
        for name, port in (("baseline", base_port), ("mailgw", gw_port)):
            await load(port, sink, f"warm-{name}", args.warm_up, args.concurrency)
            server_pid = baseline.pid if name == "baseline" else gateway_pid(gateway, under_profiler=bool(args.profile))
            cpu_server, cpu_here = cpu_seconds([server_pid]), time.process_time()
            seconds, accepting, accepted, deferred = await load(port, sink, name, args.n, args.concurrency)
            cpu_server, cpu_here = cpu_seconds([server_pid]) - cpu_server, time.process_time() - cpu_here
            runs.append({"server": name, "sent": args.n, "accepted": accepted, "deferred": deferred,
                         "arrived": len(sink.seen),
                         "accepted_per_s": round(args.n / accepting, 1),
                         "duplicates": sum(c - 1 for c in sink.seen.values()), "seconds": round(seconds, 3),
                         "mails_per_s": round(args.n / seconds, 1),
                         "server_cpu_ms_per_mail": round(1000 * cpu_server / args.n, 2),
                         "load_cpu_ms_per_mail": round(1000 * cpu_here / args.n, 2)})
    finally:
        await stop_process(gateway, under_profiler=bool(args.profile))
        await stop_process(baseline)
        sink_server.close()
        shutil.rmtree(folder, ignore_errors=True)

    ratio = runs[1]["mails_per_s"] / runs[0]["mails_per_s"]
    print(machine.describe())
    print(f"relay of {args.n} plain 4 KB mails at C={args.concurrency}, loopback, one sink")
    print(f"{'server':10} {'relayed/s':>9} {'250s/s':>8} {'seconds':>8} {'CPU ms/mail server/load+sink':>29}"
          "  accepted/arrived/duplicates/4xx")
    for r in runs:
        cpu = f"{r['server_cpu_ms_per_mail']:.2f} / {r['load_cpu_ms_per_mail']:.2f}"
        print(f"{r['server']:10} {r['mails_per_s']:>9} {r['accepted_per_s']:>8} {r['seconds']:>8} {cpu:>29}  "
              f"{r['accepted']}/{r['arrived']}/{r['duplicates']}/{r['deferred']}")
    print(f"mailgw / baseline: {ratio:.0%} (target >= {TARGET:.0%}: {'met' if ratio >= TARGET else 'NOT met'})")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine.describe(), "runs": runs, "ratio": round(ratio, 3)}))
    if args.profile:
        (args.profile / "mailgw-top.txt").write_text(profile_summary(args.profile / "mailgw.folded"))
        print(f"profile: {args.profile / 'mailgw.folded'} (collapsed stacks), {args.profile / 'mailgw-top.txt'}")
    failed = any(r["arrived"] != r["sent"] or r["duplicates"] or r["deferred"] for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-baseline":
        serve_baseline(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(asyncio.run(main()))
