"""The built-in AMI simulator in a child process of the gateway (``pbx.simulator.process``).

A real PBX is a process of its own, usually on another machine. Run in the gateway's event loop,
the simulator's phones took 13-16 % of the loop's time under load (bench/request_path.py at
concurrency 50: 56-61 % of the aiosmtpd floor with the simulator in the loop, 69-82 % with it in
a child process; docs/performance.md). The gateway talks to it over AMI on ``pbx.ami`` exactly
as it would to Asterisk.

``SimulatorProcess.start()`` runs ``python -m mailgw.pbx.sim_process``, hands it its settings
on stdin (the AMI secret never appears in the process list), and returns once the child says
``ready <port>``. If the child dies, it is started again after a second, like a PBX coming back
after a crash: its phones are reset, and the driver reconnects by itself. The child ends when
told (SIGTERM) or when its stdin closes, so a gateway killed with SIGKILL leaves no simulator
behind; Ctrl-C, which reaches both, is left to the gateway, which stops first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mailgw.pbx.simulator")

READY_TIMEOUT = 30.0  # s for the child to import and listen (a cold start on a slow machine)
RESTART_DELAY = 1.0  # s before a child that died is started again


@dataclass(frozen=True)
class SimulatorSettings:
    host: str
    port: int
    phones: str
    username: str
    secret: str
    time_scale: float
    dial_context: str
    connect_context: str
    media_dirs: tuple[str, ...]
    recording_dir: str


class SimulatorProcess:
    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.port = settings.port
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> int:
        """Start the child; its port once it listens (``settings.port`` 0: the one it chose)."""
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="simulator-process")
        return self.port

    async def _spawn(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mailgw.pbx.sim_process",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        # A restart keeps the port first chosen; the child logs at the gateway's level.
        settings = {**self.settings.__dict__, "port": self.port,
                    "log_level": logging.getLevelName(logging.getLogger("mailgw").getEffectiveLevel())}
        proc.stdin.write(json.dumps(settings).encode() + b"\n")
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT)
        except TimeoutError:
            line = b""
        word, _, port = line.decode(errors="replace").strip().partition(" ")
        if word != "ready" or not port.isdigit():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise RuntimeError(f"the AMI simulator process did not start (exit status {proc.returncode}; "
                               "its error is in the log above)")
        self._proc, self.port = proc, int(port)

    async def _supervise(self) -> None:
        while not self._stopping:
            assert self._proc is not None
            status = await self._proc.wait()
            if self._stopping:
                return
            log.error("the AMI simulator process ended (exit status %s); starting it again in %g s",
                      status, RESTART_DELAY)
            await asyncio.sleep(RESTART_DELAY)
            try:
                await self._spawn()
            except (RuntimeError, OSError) as exc:
                log.error("%s", exc)

    async def stop(self) -> None:
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)


async def _child(settings: dict[str, object]) -> None:
    from .simulator import AmiSimulator

    sim = AmiSimulator(
        phones=Path(str(settings["phones"])), username=str(settings["username"]), secret=str(settings["secret"]),
        time_scale=float(settings["time_scale"]),  # type: ignore[arg-type]
        dial_context=str(settings["dial_context"]), connect_context=str(settings["connect_context"]),
        media_dirs=[Path(str(d)) for d in settings["media_dirs"]],  # type: ignore[attr-defined]
        recording_dir=Path(str(settings["recording_dir"])))
    port = await sim.start(str(settings["host"]), int(settings["port"]))  # type: ignore[call-overload]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Ctrl-C reaches the whole process group: the gateway stops first, then ends this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f"ready {port}", flush=True)
    def watch_parent() -> None:  # stdin at EOF: the gateway is gone (even after a SIGKILL)
        # os.read, not sys.stdin: a daemon thread blocked inside the buffered reader holds its
        # lock, and the interpreter's shutdown then aborts on it.
        while os.read(sys.stdin.fileno(), 4096):
            pass
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    await stop.wait()
    await sim.stop()


def main() -> None:
    settings = json.loads(sys.stdin.buffer.readline())
    logging.basicConfig(level=str(settings.pop("log_level", "INFO")),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    asyncio.run(_child(settings))
    sys.exit(0)


if __name__ == "__main__":
    main()
