"""Nothing accepted is lost: the real ``mailgw serve`` process is killed (SIGKILL) after it answered
250 and restarted; the request then runs exactly once, and a further restart does not run it again.

The PBX is down while the first gateway holds the request, so the kill lands deterministically
between "accepted" and "dialled" without any timing games.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
from pathlib import Path

import yaml

from mailgw.mailbox import list_mail
from mailgw.pbx.simulator import AmiSimulator
from mailgw.resources import shipped

from .conftest import TIME_SCALE, request_mail, sim_calls, submit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``mailgw serve`` in a child process, with its log read line by line as events."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    @classmethod
    async def start(cls, config: Path) -> "ServeProcess":
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mailgw.cli", "serve", "--config", str(config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        serve = cls(proc)
        await serve.wait_for(r"listening for SMTP")
        return serve

    async def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        regex = re.compile(pattern)
        for line in self.lines:
            if match := regex.search(line):
                return match

        async def read() -> re.Match[str]:
            assert self.proc.stderr is not None
            while True:
                raw = await self.proc.stderr.readline()
                if not raw:
                    raise AssertionError(f"gateway exited before logging {pattern!r}:\n" + "".join(self.lines))
                line = raw.decode("utf-8", "replace")
                self.lines.append(line)
                if match := regex.search(line):
                    return match

        return await asyncio.wait_for(read(), timeout)

    async def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), 10)

    async def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        await self.wait_for(r"mailgw stopped")
        return await asyncio.wait_for(self.proc.wait(), 10)


async def test_request_accepted_before_a_crash_runs_exactly_once_after_restart(tmp_path: Path) -> None:
    smtp_port, ami_port = free_port(), free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "domains": ["a.example"],
        "data_dir": str(tmp_path / "var"),
        "smtp": {"listen": f"127.0.0.1:{smtp_port}"},
        "mailbox": {"root": str(tmp_path / "mailbox")},
        "directory": str(shipped("config", "directory.yaml")),
        # The PBX is an external one here, so it can be down while the gateway holds the request.
        "pbx": {"ami": {"host": "127.0.0.1", "port": ami_port}, "simulator": {"enabled": False},
                "ring_timeout": "30s"},
    }))

    started: list[ServeProcess] = []

    async def serve() -> ServeProcess:
        started.append(await ServeProcess.start(config))
        return started[-1]

    first = await serve()
    reply = await submit(smtp_port, request_mail("alice@a.example", "bob@a.example", "action: connect\n"))
    assert reply.code == 250, reply
    request_id = reply.queue_id
    await first.wait_for(rf"request {request_id}: PBX unavailable")
    await first.kill()

    simulator = AmiSimulator(phones=shipped("pbx", "phones.yaml"), username="mailgw", secret="mailgw-secret",
                             time_scale=TIME_SCALE)
    await simulator.start("127.0.0.1", ami_port)
    try:
        second = await serve()
        await second.wait_for(rf"request {request_id} outcome: answered")
        await second.wait_for(rf"delivered to alice@a.example \(request {request_id}\)")
        assert await second.terminate() == 0

        third = await serve()
        assert not any("resuming" in line for line in third.lines)
        assert await third.terminate() == 0

        calls = sim_calls(simulator)
        assert [(c.from_number, c.to_number, c.outcome) for c in calls] == [("2000", "2001", "answered")]
        results = [m.message() for m in list_mail(tmp_path / "mailbox", "alice@a.example")]
        assert [m["X-CTI-Request"] for m in results] == [request_id]
    finally:
        await simulator.stop()
        for process in started:
            if process.proc.returncode is None:
                process.proc.kill()
