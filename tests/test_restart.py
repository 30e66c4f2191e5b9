"""Nothing accepted is lost: the real ``mailgw serve`` process is killed (SIGKILL) after it answered
250 and restarted; the request then runs exactly once, and a further restart does not run it again.

The PBX is down while the first gateway holds the request, so the kill lands deterministically
between "accepted" and "dialled" without any timing games.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path

import yaml

from mailgw.mailbox import list_mail
from mailgw.pbx.driver import AmiClient
from mailgw.pbx.simulator import AmiSimulator
from mailgw.resources import shipped

from .conftest import TIME_SCALE, exited, request_mail, sim_calls, submit

WAIT = 10.0


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

    async def wait_for(self, pattern: str, timeout: float = 20.0, *, after: int = 0) -> re.Match[str]:
        """The first log line matching ``pattern``, of those from line ``after`` on."""
        regex = re.compile(pattern)
        for line in self.lines[after:]:
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


def child_pids(pid: int, module: str = "mailgw.pbx.sim_process") -> list[int]:
    """The children of ``pid`` that run ``python -m module`` (the simulator, the mailbox agent)."""
    children = [int(p) for task in Path(f"/proc/{pid}/task").iterdir()
                for p in (task / "children").read_text().split()]
    return [c for c in children if module in _command_line(c)]


def _command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except FileNotFoundError:
        return []


async def test_the_built_in_simulator_is_a_process_of_its_own_and_comes_back_after_a_crash(tmp_path: Path) -> None:
    """The embedded default: the simulator runs in a child of ``mailgw serve``; killed, it is
    started again and calls go on; the gateway killed, the simulator ends with it."""
    smtp_port, ami_port = free_port(), free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "domains": ["a.example"], "data_dir": str(tmp_path / "var"), "smtp": {"listen": f"127.0.0.1:{smtp_port}"},
        "mailbox": {"root": str(tmp_path / "mailbox")}, "directory": str(shipped("config", "directory.yaml")),
        "pbx": {"ami": {"host": "127.0.0.1", "port": ami_port}, "simulator": {"time_scale": TIME_SCALE}},
        "policy": {"per_number_per_minute": 10},  # the same two phones are called twice
    }))
    gateway = await ServeProcess.start(config)
    try:
        await gateway.wait_for(rf"built-in AMI simulator listening on 127.0.0.1:{ami_port} .*its own process")
        [simulator] = child_pids(gateway.proc.pid)
        first = await submit(smtp_port, request_mail("alice@a.example", "bob@a.example", "action: connect\n"))
        await gateway.wait_for(rf"request {first.queue_id} outcome: answered")

        os.kill(simulator, signal.SIGKILL)
        await gateway.wait_for(r"AMI simulator process ended")
        await gateway.wait_for(r"AMI: logged in", after=len(gateway.lines))  # the driver is back, on the new one
        [restarted] = child_pids(gateway.proc.pid)
        assert restarted != simulator
        second = await submit(smtp_port, request_mail("alice@a.example", "bob@a.example", "action: connect\n"))
        await gateway.wait_for(rf"request {second.queue_id} outcome: answered")
        client = AmiClient("127.0.0.1", ami_port, "mailgw", "mailgw-secret")
        await client.start()
        try:
            calls = await client.list_action("SimCalls")
            # The restarted simulator knows only the call placed since.
            assert [(e["From"], e["To"], e["Outcome"]) for e in calls.events] == [("2000", "2001", "answered")]
        finally:
            await client.close()

        await gateway.kill()
        await exited(restarted)  # stdin closed with the gateway: no simulator left behind
        assert gateway.proc.stderr is not None
        rest = await asyncio.wait_for(gateway.proc.stderr.read(), WAIT)  # what the simulator said last
        assert b"AMI simulator stopped" in rest and b"Fatal" not in rest and b"Traceback" not in rest

        gateway = await ServeProcess.start(config)  # and stopped as an admin does: both end cleanly
        [simulator] = child_pids(gateway.proc.pid)
        assert await gateway.terminate() == 0
        await exited(simulator)
        said = "".join(gateway.lines)
        assert "AMI simulator stopped" in said and "Fatal" not in said and "Traceback" not in said
    finally:
        if gateway.proc.returncode is None:
            gateway.proc.kill()


async def test_the_mailbox_agent_is_a_process_of_its_own_and_comes_back_after_a_crash(tmp_path: Path) -> None:
    """The embedded default (``mailbox.agent``): result mails are written into the Maildir by a
    child of ``mailgw serve``; killed, the next delivery starts a new one and no mail is lost;
    the gateway killed, the agent ends with it."""
    smtp_port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "domains": ["a.example"], "data_dir": str(tmp_path / "var"), "smtp": {"listen": f"127.0.0.1:{smtp_port}"},
        "mailbox": {"root": str(tmp_path / "mailbox")}, "directory": str(shipped("config", "directory.yaml")),
        "pbx": {"ami": {"host": "127.0.0.1", "port": free_port()}, "simulator": {"time_scale": TIME_SCALE}},
        "policy": {"per_number_per_minute": 10},  # the same two phones are called twice
    }))
    gateway = await ServeProcess.start(config)
    try:
        await gateway.wait_for(r"mailgw listening for SMTP")
        assert child_pids(gateway.proc.pid, "mailgw.mailbox_agent") == []  # started by the first delivery
        first = await submit(smtp_port, request_mail("alice@a.example", "bob@a.example", "action: connect\n"))
        await gateway.wait_for(rf"delivered to alice@a.example \(request {first.queue_id}\)")
        [agent] = child_pids(gateway.proc.pid, "mailgw.mailbox_agent")

        os.kill(agent, signal.SIGKILL)
        await exited(agent)
        second = await submit(smtp_port, request_mail("alice@a.example", "bob@a.example", "action: connect\n"))
        await gateway.wait_for(rf"delivered to alice@a.example \(request {second.queue_id}\)")
        [restarted] = child_pids(gateway.proc.pid, "mailgw.mailbox_agent")
        assert restarted != agent
        results = [m.message() for m in list_mail(tmp_path / "mailbox", "alice@a.example")]
        assert sorted(m["X-CTI-Request"] for m in results) == sorted([first.queue_id, second.queue_id])

        await gateway.kill()
        await exited(restarted)  # its stdin closed with the gateway: no agent left behind
    finally:
        if gateway.proc.returncode is None:
            gateway.proc.kill()
