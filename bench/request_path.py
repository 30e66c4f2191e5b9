"""Request-path benchmark: mailgw against the aiosmtpd floor, in one run, on loopback.

    .venv/bin/python bench/request_path.py                 # full run (a few minutes)
    .venv/bin/python bench/request_path.py --mails 500     # quicker

It starts, each in its own process:

(a) the floor: a bare aiosmtpd server whose handler parses the message with the stdlib ``email``
    package and writes + fsyncs it to a file before answering 250, which is the least any
    durable gateway must do;
(b) ``mailgw serve`` on its embedded defaults with the built-in AMI simulator (phones act 1000x
    faster so calls never pile up; every mail names its own pair of numbers so no phone is busy).

A load generator (this process, a minimal SMTP client on raw sockets so it costs little) sends
N request mails of ~4 KB at concurrency C to each, then a run with ~200 KB voice attachments, and
prints one table: mails/s, the ratio, p50/p99 from end of DATA to the 250, and for mailgw p50/p99
from end of DATA to the Originate action arriving at the PBX (the simulator notes when each
Originate arrives; both clocks are this machine's ``time.time()``). A last run sends at half of
mailgw's measured maximum rate, where the < 25 ms DATA->Originate target applies. Finally it checks
that every accepted mail became exactly one call.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import signal
import socket
import sys
import tempfile
import time
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

    @property
    def accepted(self) -> list[Sample]:
        return [s for s in self.samples if s.code == 250]

    @property
    def rate(self) -> float:
        return len(self.accepted) / self.elapsed if self.elapsed else 0.0

    def reply_ms(self) -> list[float]:
        return [(s.reply_at - s.end_of_data) * 1000 for s in self.accepted]


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


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        proc.kill()


def mailgw_config(folder: Path, smtp_port: int, ami_port: int) -> Path:
    config = folder / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(folder / "var"),
        "mailbox": {"root": str(folder / "mailbox")},
        "smtp": {"listen": f"127.0.0.1:{smtp_port}"},
        "pbx": {"ami": {"port": ami_port}, "simulator": {"time_scale": 0.001}, "max_concurrent_calls": 500},
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
    latencies, calls = [], 0
    for sample in result.accepted:
        request_id = sample.text.rsplit("queued as ", 1)[-1].strip()
        at = started.get(f"{request_id}-1")
        if at is not None:
            calls += 1
            latencies.append((at - sample.end_of_data) * 1000)
    return latencies, calls


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mails", type=int, default=3000, help="4 KB mails per run")
    parser.add_argument("--big-mails", type=int, default=300, help="200 KB mails per run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[10, 50])
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="mailgw-bench-"))
    (folder / "floor").mkdir()
    floor_port, gw_port, ami_port = free_port(), free_port(), free_port()
    floor = await start_process(sys.executable, __file__, "--serve-floor", str(floor_port), str(folder / "floor"),
                                ready="ready")
    gateway = await start_process(sys.executable, "-m", "mailgw.cli", "serve", "--log-level", "WARNING",
                                  "--config", str(mailgw_config(folder, gw_port, ami_port)), ready=None)
    await wait_for_port(gw_port)

    small = [request_mail(i, None) for i in range(args.mails)]
    voice = os.urandom(150 * 1024)  # ~200 KB once base64-encoded
    big = [request_mail(args.mails + i, voice) for i in range(args.big_mails)]
    rows: list[tuple[str, RunResult, RunResult]] = []
    try:
        await closed_loop("warm-up", gw_port, small[:200], 10)
        await closed_loop("warm-up", floor_port, small[:200], 10)
        for concurrency in args.concurrency:
            a = await closed_loop(f"4 KB, C={concurrency}", floor_port, small, concurrency)
            b = await closed_loop(f"4 KB, C={concurrency}", gw_port, small, concurrency)
            rows.append((a.label, a, b))
        a = await closed_loop("200 KB, C=10", floor_port, big, 10)
        b = await closed_loop("200 KB, C=10", gw_port, big, 10)
        rows.append((a.label, a, b))
        best = max(r[2].rate for r in rows[:-1])
        half = await open_loop(f"4 KB at {best / 2:.0f}/s", gw_port, small, best / 2, 64)
        started = await originate_times(ami_port)
    finally:
        await stop_process(gateway)
        await stop_process(floor)

    print()
    print(machine.describe())
    print(f"{'run':18} {'floor mails/s':>13} {'mailgw mails/s':>14} {'ratio':>6} "
          f"{'floor 250 p50/p99 ms':>21} {'mailgw 250 p50/p99 ms':>22} {'DATA->Originate p50/p99 ms':>27} {'calls/accepted':>15}")
    for label, a, b in rows:
        orig, calls = originate_ms(b, started)
        print(f"{label:18} {a.rate:13.0f} {b.rate:14.0f} {b.rate / a.rate:6.0%} "
              f"{pct(a.reply_ms(), 50):10.1f}/{pct(a.reply_ms(), 99):<10.1f} "
              f"{pct(b.reply_ms(), 50):11.1f}/{pct(b.reply_ms(), 99):<10.1f} "
              f"{pct(orig, 50):13.1f}/{pct(orig, 99):<13.1f} {calls:>7}/{len(b.accepted):<7}")
    orig, calls = originate_ms(half, started)
    print(f"{half.label:18} {'':13} {half.rate:14.0f} {'':6} {'':21} "
          f"{pct(half.reply_ms(), 50):11.1f}/{pct(half.reply_ms(), 99):<10.1f} "
          f"{pct(orig, 50):13.1f}/{pct(orig, 99):<13.1f} {calls:>7}/{len(half.accepted):<7}")
    refused = sum(len(r.samples) - len(r.accepted) for _, _, r in rows) + len(half.samples) - len(half.accepted)
    print(f"refused by mailgw: {refused}")


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
        asyncio.run(main())
