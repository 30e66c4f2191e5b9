"""Request-path benchmark: mailgw against the aiosmtpd floor, in one run, on loopback.

    .venv/bin/python bench/request_path.py                          # default run (about 1-2 minutes)
    .venv/bin/python bench/request_path.py --n 3000 --big-n 300     # longer, steadier figures
    .venv/bin/python bench/request_path.py --concurrency 10 --n 500 # one concurrency, quicker
    .venv/bin/python bench/request_path.py --profile var/profile    # also profile mailgw (py-spy)

It starts, each in its own process:

(a) the floor: a bare aiosmtpd server whose handler parses the message with the stdlib ``email``
    package and writes + fsyncs it to a file before answering 250, which is the least any
    durable gateway must do;
(b) ``mailgw serve`` on its embedded defaults with the built-in AMI simulator (phones act 1000x
    faster so calls never pile up; every mail names its own pair of numbers so no phone is busy).
    The simulator runs in a child process of mailgw, as by default (``pbx.simulator.process``),
    and its CPU counts as mailgw's; ``--simulator loop`` runs it in mailgw's event loop instead.

A load generator (this process, a minimal SMTP client on raw sockets so it costs little) sends
N request mails of ~4 KB at each concurrency C to each server, then N/10 mails with a ~200 KB WAV
voice attachment, and prints one table: mails/s, the ratio, p50/p99 from end of DATA to the 250,
and for mailgw p50/p99 from end of DATA to the Originate action arriving at the PBX (the
simulator notes when each Originate arrives; both clocks are this machine's ``time.time()``). A
last run sends at half of mailgw's measured maximum rate, where the < 25 ms DATA->Originate target
applies. Finally it checks that every accepted mail became exactly one call (exit status 1 if not).

``--profile DIR`` runs mailgw under py-spy (``pip install -e '.[bench]'``) and writes
``DIR/mailgw.speedscope.json`` (open it in speedscope.app) and a text summary of the hottest
functions, ``DIR/mailgw-top.txt``. ``--json FILE`` writes the figures for programs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import shutil
import struct
import os
import random
import signal
import socket
import sys
import tempfile
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import machine  # bench/machine.py: run as `python bench/<name>.py`

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mailgw.pbx.driver import AmiClient  # noqa: E402


# --- (a) the floor ------------------------------------------------------------------------------

def serve_floor(port: int, folder: Path) -> None:
    import email
    import email.policy

    from aiosmtpd.smtp import SMTP

    counter = 0

    def store(raw: bytes) -> None:
        nonlocal counter
        counter += 1
        fd = os.open(folder / f"{os.getpid()}-{counter}.eml", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.write(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: ANN001
            email.message_from_bytes(envelope.original_content, policy=email.policy.default)
            await asyncio.to_thread(store, envelope.original_content)  # durable before 250
            return "250 2.0.0 stored"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(Handler(), data_size_limit=10 * 2**20, loop=loop),
                                          "127.0.0.1", port)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        server.close()

    asyncio.run(main())


# --- load generator -----------------------------------------------------------------------------

@dataclass
class Sample:
    end_of_data: float  # time.time() when the final "." was written
    reply_at: float
    code: int
    text: str


@dataclass
class RunResult:
    label: str
    samples: list[Sample] = field(default_factory=list)
    elapsed: float = 0.0
    cpu: float = 0.0  # CPU seconds the server's processes used for this run, until they were idle again

    @property
    def accepted(self) -> list[Sample]:
        return [s for s in self.samples if s.code == 250]

    @property
    def rate(self) -> float:
        return len(self.accepted) / self.elapsed if self.elapsed else 0.0

    def reply_ms(self) -> list[float]:
        return [(s.reply_at - s.end_of_data) * 1000 for s in self.accepted]

    @property
    def cpu_ms_per_mail(self) -> float:
        return 1000 * self.cpu / len(self.accepted) if self.accepted else float("nan")


class SmtpSession:
    """The smallest SMTP client that is still honest: one command, one reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "SmtpSession":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        session = cls(reader, writer)
        await session.reply()
        await session.command(b"EHLO bench.example")
        return session

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            lines.append(line.decode("ascii", "replace").rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(lines[-1][:3]), lines[-1][4:]

    async def command(self, line: bytes) -> tuple[int, str]:
        self.writer.write(line + b"\r\n")
        return await self.reply()

    async def send(self, sender: str, rcpt: str, data: bytes) -> Sample:
        await self.command(b"MAIL FROM:<" + sender.encode() + b">")
        code, text = await self.command(b"RCPT TO:<" + rcpt.encode() + b">")
        if code != 250:
            now = time.time()
            return Sample(now, now, code, text)
        code, text = await self.command(b"DATA")
        assert code == 354, (code, text)
        self.writer.write(data)
        self.writer.write(b".\r\n")
        end = time.time()
        code, text = await self.reply()
        return Sample(end, time.time(), code, text)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.command(b"QUIT"), 5)
        except Exception:
            pass
        self.writer.close()


def request_mail(index: int, attachment: bytes | None) -> bytes:
    """A request mail: its own pair of numbers, filler text to ~4 KB, optionally a voice part."""
    to, caller = f"03-5555-{index % 10000:04d}", f"03-6666-{index % 10000:04d}"
    filler = "\r\n".join(["Please connect me; this line pads the mail to a realistic size."] * 56)
    block = f"to: {to}\r\nfrom: {caller}\r\n\r\n{filler}\r\n"
    headers = (f"From: alice@a.example\r\nTo: cti@a.example\r\nSubject: bench {index}\r\n"
               f"Message-ID: <bench-{index}-{random.getrandbits(32)}@bench.example>\r\nMIME-Version: 1.0\r\n")
    if attachment is None:
        mail = headers + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + block
        return mail.encode()
    encoded = base64.encodebytes(attachment).replace(b"\n", b"\r\n").decode()
    mail = (headers + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
            "Content-Type: text/plain; charset=utf-8\r\n\r\n" + block + "--b\r\n"
            'Content-Type: audio/wav\r\nContent-Disposition: attachment; filename="memo.wav"\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\n" + encoded + "--b--\r\n")
    return mail.encode()


def voice_wav(size: int = 200 * 1024) -> bytes:
    """A real voice-like WAV of about ``size`` bytes (8 kHz 16-bit mono, a wavering tone): the
    gateway checks voice parts at DATA, so random bytes would be refused."""
    frames = (size - 44) // 2
    samples = b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * (300 + 100 * math.sin(i / 800)) * i / 8000)))
                       for i in range(frames))
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(samples)
    return out.getvalue()


async def closed_loop(label: str, port: int, mails: list[bytes], concurrency: int) -> RunResult:
    """C sessions, each sending its next mail as soon as the previous one was answered."""
    result = RunResult(label)
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for mail in mails:
        queue.put_nowait(mail)

    async def worker() -> None:
        session = await SmtpSession.open(port)
        try:
            while not queue.empty():
                result.samples.append(await session.send("alice@a.example", "cti@a.example", queue.get_nowait()))
        finally:
            await session.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - start
    return result


async def open_loop(label: str, port: int, mails: list[bytes], rate: float, sessions: int) -> RunResult:
    """Mails arrive at a fixed rate whatever the server does (the latency target's condition)."""
    result = RunResult(label)
    pool: asyncio.Queue[SmtpSession] = asyncio.Queue()
    for _ in range(sessions):
        pool.put_nowait(await SmtpSession.open(port))

    async def one(mail: bytes) -> None:
        session = await pool.get()
        try:
            result.samples.append(await session.send("alice@a.example", "cti@a.example", mail))
        finally:
            pool.put_nowait(session)

    start = time.perf_counter()
    tasks = []
    for i, mail in enumerate(mails):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the load generator, not synchronisation
        tasks.append(asyncio.create_task(one(mail)))
    await asyncio.gather(*tasks)
    result.elapsed = time.perf_counter() - start
    while not pool.empty():
        await pool.get_nowait().close()
    return result


def child_pids(pid: int) -> list[int]:
    return [int(p) for task in Path(f"/proc/{pid}/task").iterdir() for p in (task / "children").read_text().split()]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads), from /proc."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


async def until_idle(pids: list[int], quiet: float = 0.02, step: float = 0.25) -> float:
    """Wait until the server has finished what the run caused (calls, result mails); its CPU then."""
    before = cpu_seconds(pids)
    while True:
        await asyncio.sleep(step)  # sampling a process's CPU clock; there is no event to await
        now = cpu_seconds(pids)
        if now - before < quiet:
            return now
        before = now


async def measured(run, pids: list[int]) -> RunResult:  # noqa: ANN001
    """One run against a server, with the CPU its processes spent on it."""
    start = await until_idle(pids)
    result = await run
    result.cpu = await until_idle(pids) - start
    return result


# --- processes ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_process(*args: str, ready: str | None) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, cwd=ROOT)
    assert proc.stdout is not None
    while ready is not None:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not line:
            raise RuntimeError(f"{args} exited before it was ready")
        if ready in line.decode():
            break
    asyncio.create_task(_drain(proc))
    return proc


async def _drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    while await proc.stdout.readline():
        pass


def gateway_pid(proc: asyncio.subprocess.Process, *, under_profiler: bool) -> int:
    """The gateway's own process: under py-spy it is py-spy's child."""
    if not under_profiler:
        return proc.pid
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return int(children[0])


async def stop_process(proc: asyncio.subprocess.Process, *, under_profiler: bool = False) -> None:
    """SIGTERM and wait. Under py-spy, stopping the gateway makes py-spy write its profile and exit."""
    try:
        os.kill(gateway_pid(proc, under_profiler=under_profiler), signal.SIGTERM)
    except (OSError, IndexError):
        pass
    try:
        await asyncio.wait_for(proc.wait(), 60)
    except TimeoutError:
        proc.kill()


def mailgw_config(folder: Path, smtp_port: int, ami_port: int, simulator_process: bool = True) -> Path:
    config = folder / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(folder / "var"),
        "mailbox": {"root": str(folder / "mailbox")},
        "smtp": {"listen": f"127.0.0.1:{smtp_port}"},
        "pbx": {"ami": {"port": ami_port}, "simulator": {"time_scale": 0.001, "process": simulator_process}, "max_concurrent_calls": 500},
        # The bench sends thousands of requests from one sender to a few thousand numbers; the
        # rate limits (tested on their own) would refuse most of them.
        "policy": {"per_sender_per_hour": 10_000_000, "per_number_per_minute": 10_000_000,
                   "per_number_per_hour": 10_000_000},
    }))
    return config


async def originate_times(ami_port: int) -> dict[str, float]:
    """call id -> when the simulator received its Originate (simulator-only SimCalls action)."""
    client = AmiClient("127.0.0.1", ami_port, "mailgw", "mailgw-secret", action_timeout=60)
    await client.start(wait=True)
    try:
        reply = await client.list_action("SimCalls")
        return {e["CallId"]: float(e["StartedAt"]) for e in reply.events}
    finally:
        await client.close()


# --- report -------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def originate_ms(result: RunResult, started: dict[str, float]) -> tuple[list[float], int]:
    """DATA->Originate latencies, and how many accepted mails became exactly one call."""
    latencies, calls = [], 0
    for sample in result.accepted:
        request_id = sample.text.rsplit("queued as ", 1)[-1].strip()
        at = started.get(f"{request_id}-1")
        if at is not None and f"{request_id}-2" not in started:
            calls += 1
            latencies.append((at - sample.end_of_data) * 1000)
    return latencies, calls


@dataclass
class Row:
    label: str
    floor: RunResult | None
    mailgw: RunResult

    def figures(self, started: dict[str, float]) -> dict[str, object]:
        orig, calls = originate_ms(self.mailgw, started)
        a, b = self.floor, self.mailgw
        return {
            "run": self.label, "sent": len(b.samples), "accepted": len(b.accepted), "calls": calls,
            "floor_per_s": a.rate if a else None, "mailgw_per_s": b.rate,
            "ratio": b.rate / a.rate if a and a.rate else None,
            "floor_250_ms": [pct(a.reply_ms(), 50), pct(a.reply_ms(), 99)] if a else None,
            "mailgw_250_ms": [pct(b.reply_ms(), 50), pct(b.reply_ms(), 99)],
            "originate_ms": [pct(orig, 50), pct(orig, 99)],
            "floor_cpu_ms_per_mail": a.cpu_ms_per_mail if a else None, "mailgw_cpu_ms_per_mail": b.cpu_ms_per_mail,
        }


def print_table(figures: list[dict]) -> None:
    def pair(values: list[float] | None) -> str:
        return f"{values[0]:.1f} / {values[1]:.1f}" if values else ""

    def num(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else ""

    print(machine.describe())
    print(f"{'run':26} {'floor/s':>8} {'mailgw/s':>9} {'ratio':>6} {'floor 250 p50/p99':>18} "
          f"{'mailgw 250 p50/p99':>19} {'DATA->Originate p50/p99':>24} {'CPU ms/mail floor/mailgw':>25} "
          f"{'calls/accepted/sent':>20}")
    for f in figures:
        print(f"{f['run']:26} {num(f['floor_per_s'], '8.0f'):>8} {f['mailgw_per_s']:9.0f} "
              f"{num(f['ratio'], '6.0%'):>6} {pair(f['floor_250_ms']):>18} {pair(f['mailgw_250_ms']):>19} "
              f"{pair(f['originate_ms']):>24} {num(f['floor_cpu_ms_per_mail'], '.2f'):>17} / "
              f"{f['mailgw_cpu_ms_per_mail']:<5.2f} {f['calls']:>8}/{f['accepted']}/{f['sent']}")
    print("latencies in ms")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", "--mails", type=int, default=1000, help="4 KB mails per run (default 1000)")
    parser.add_argument("--big-n", "--big-mails", type=int, default=None,
                        help="mails with a 200 KB WAV per run (default N/10)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--warm-up", type=int, default=100, help="mails sent to each server first, not counted")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="run mailgw under py-spy, write its profile here")
    parser.add_argument("--simulator", choices=["process", "loop"], default="process",
                        help="the built-in simulator in a child process of mailgw (its default, "
                             "pbx.simulator.process) or in mailgw's own event loop")
    parser.add_argument("--rates", type=float, nargs="*", default=[], metavar="MAILS_PER_S",
                        help="also send 4 KB mails at these fixed rates (latency at a known load)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    big_n = args.n // 10 if args.big_n is None else args.big_n

    folder = Path(tempfile.mkdtemp(prefix="mailgw-bench-"))
    (folder / "floor").mkdir()
    floor_port, gw_port, ami_port = free_port(), free_port(), free_port()
    gateway_cmd = [sys.executable, "-m", "mailgw.cli", "serve", "--log-level", "WARNING",
                   "--config", str(mailgw_config(folder, gw_port, ami_port, args.simulator == "process"))]
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        gateway_cmd = [str(Path(sys.executable).with_name("py-spy")), "record", "--rate", "200", "--nonblocking",
                       "--gil", "--format", "raw", "--output", str(args.profile / "mailgw.folded"), "--", *gateway_cmd]
    floor = await start_process(sys.executable, __file__, "--serve-floor", str(floor_port), str(folder / "floor"),
                                ready="ready")
    gateway = await start_process(*gateway_cmd, ready=None)
    rows: list[Row] = []
    try:
        await wait_for_port(gw_port)
        main_pid = gateway_pid(gateway, under_profiler=bool(args.profile))
        gateway_pids = [main_pid, *child_pids(main_pid)]  # its CPU includes the simulator's process
        small = [request_mail(i, None) for i in range(args.warm_up + args.n)]
        voice = voice_wav()
        big = [request_mail(len(small) + i, voice) for i in range(big_n)]

        async def both(label: str, mails: list[bytes], concurrency: int) -> Row:
            return Row(label, await measured(closed_loop(label, floor_port, mails, concurrency), [floor.pid]),
                       await measured(closed_loop(label, gw_port, mails, concurrency), gateway_pids))

        await both("warm-up", small[:args.warm_up], 10)
        # The mailbox agent starts with the first result mail: its CPU counts as mailgw's too.
        gateway_pids = [main_pid, *child_pids(main_pid)]
        small = small[args.warm_up:]
        for concurrency in args.concurrency:
            rows.append(await both(f"4 KB, C={concurrency}", small, concurrency))
        if big:
            for concurrency in args.concurrency:
                rows.append(await both(f"200 KB WAV, C={concurrency}", big, concurrency))
        best = max(r.mailgw.rate for r in rows if r.label.startswith("4 KB"))
        label = f"4 KB at {best / 2:.0f}/s (half max)"
        rows.append(Row(label, None, await measured(open_loop(label, gw_port, small, best / 2, 64), gateway_pids)))
        for rate in args.rates:
            label = f"4 KB at {rate:.0f}/s"
            rows.append(Row(label, None, await measured(open_loop(label, gw_port, small, rate, 64), gateway_pids)))
        started = await originate_times(ami_port)
    finally:
        await stop_process(gateway, under_profiler=bool(args.profile))
        await stop_process(floor)
        shutil.rmtree(folder, ignore_errors=True)

    figures = [row.figures(started) for row in rows]
    print()
    print_table(figures)
    lost = sum(f["accepted"] - f["calls"] for f in figures)
    refused = sum(f["sent"] - f["accepted"] for f in figures)
    print(f"accepted mails without exactly one call (lost): {lost}; refused by mailgw: {refused}")
    if args.profile:
        summary = profile_summary(args.profile / "mailgw.folded")
        (args.profile / "mailgw-top.txt").write_text(summary)
        print(f"profile: {args.profile / 'mailgw.folded'} (collapsed stacks), {args.profile / 'mailgw-top.txt'}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine.describe(), "runs": figures, "lost": lost,
                                         "refused": refused}, indent=2))
    return 1 if lost or refused else 0


def profile_summary(folded: Path, top: int = 40) -> str:
    """The functions mailgw spent its samples in: own time and time including what they call."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f.split(" (", 1)[0] + " " + f.rsplit("/", 1)[-1].split(":", 1)[0].rstrip(")")
                  for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    lines = [f"{total} samples"]
    for title, table in (("own time", own), ("including callees", inclusive)):
        lines.append(f"\n--- {title} ---")
        for frame, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"{100 * n / total:5.1f}%  {frame}")
    return "\n".join(lines) + "\n"


async def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            session = await SmtpSession.open(port)
            await session.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)  # the gateway is starting; nothing to await but its socket


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-floor":
        serve_floor(int(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(asyncio.run(main()))
