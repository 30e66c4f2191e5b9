"""Maildir deliveries in a child process of the gateway (``mailbox.agent``, Postfix's local(8)).

Why a process: one delivery is about eight system calls, two of them fsyncs. Made by a thread of
the gateway, each one gives up the GIL and then has to win it back from the busy event loop, and
every hand-over costs both threads. In bench/request_path.py at 231 mails/s on a 2-core VM, with
the deliveries on a thread the gateway's process took 6.1-6.4 ms of CPU per request, with the
agent 4.7-5.2 (and the agent 0.6-1.6), and in four runs taken in turns the p99 from DATA to the
Originate was 21-48 ms on a thread, 20-30 ms with the agent (docs/performance.md). The child has
a GIL of its own, and the other core.

``MailboxAgent.deliver`` sends a frame down the child's stdin, a JSON line (root, address, group,
size) and then the message; the child answers each frame, in order, with a JSON line: the path
it delivered to, or the error. The child takes the frames that have arrived together as one
batch: it writes and fsyncs each file, renames it into ``new/``, fsyncs each ``new/`` folder once
and only then answers them all, so a burst of result mails shares the folder fsyncs.

The child is started at the first delivery. If it dies, the deliveries it had not answered fail
(the outbox tries them again later; a file it wrote but did not answer may then arrive twice,
as after a crash of the gateway) and the next delivery starts a new child. It ends when its
stdin closes, after the frames it has, so a gateway that stops, or is killed, leaves none behind.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import select
import signal
import sys
from pathlib import Path

from .mailbox import MailboxError, deliver
from .spool import fsync_folder, write_all

log = logging.getLogger("mailgw.mailbox")

READY_TIMEOUT = 30.0  # s for the child to import (a cold start on a slow machine)
STOP_TIMEOUT = 10.0   # s for the child to finish the deliveries it has once its stdin closes
READ_CHUNK = 1 << 20


class MailboxAgent:
    """The gateway's side: ``deliver`` as ``mailbox.InThread.deliver``, made by the child."""

    def __init__(self) -> None:
        self._child: _Child | None = None
        self._starting = asyncio.Lock()

    async def deliver(self, root: Path, address: str, raw: bytes, *, group: str | None = None) -> Path:
        child = await self._running()
        answer: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        header = {"root": str(root), "address": address, "group": group, "size": len(raw)}
        child.send(json.dumps(header).encode() + b"\n", raw, answer)
        with contextlib.suppress(ConnectionError):  # the child died: its reader fails ``answer``
            await child.stdin.drain()
        reply = await answer
        if "error" in reply:
            raise MailboxError(f"delivery to the mailbox of {address} failed: {reply['error']}")
        return Path(reply["path"])

    async def _running(self) -> _Child:
        async with self._starting:
            if self._child is None or self._child.ended:
                self._child = _Child(await _spawn())
            return self._child

    async def stop(self) -> None:
        """Close the child's stdin: it answers what it has and exits."""
        if self._child is not None:
            await self._child.stop()
            self._child = None

    @property
    def pid(self) -> int | None:
        return None if self._child is None or self._child.ended else self._child.proc.pid


class _Child:
    """One agent process and the deliveries it has not answered yet, oldest first."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None
        self.proc = proc
        self.stdin = proc.stdin
        self.waiting: collections.deque[asyncio.Future[dict[str, str]]] = collections.deque()
        self.reader = asyncio.create_task(self._read_answers(), name=f"mailbox-agent-{proc.pid}")

    @property
    def ended(self) -> bool:
        return self.reader.done() or self.proc.returncode is not None

    def send(self, header: bytes, raw: bytes, answer: asyncio.Future[dict[str, str]]) -> None:
        # Frame and waiter are queued together, with no await between: answers come in this order.
        self.waiting.append(answer)
        self.stdin.write(header)
        self.stdin.write(raw)

    async def _read_answers(self) -> None:
        assert self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                answer = self.waiting.popleft()
                if not answer.done():  # else its caller was cancelled
                    answer.set_result(json.loads(line))
        finally:
            status = await self.proc.wait()
            if self.waiting:
                log.error("the mailbox agent process ended (exit status %s) with %d deliveries unanswered",
                          status, len(self.waiting))
            while self.waiting:
                answer = self.waiting.popleft()
                if not answer.done():
                    answer.set_exception(MailboxError(f"the mailbox agent process ended (exit status {status})"))

    async def stop(self) -> None:
        self.stdin.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.reader), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.reader


async def _spawn() -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "mailgw.mailbox_agent",
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT)
    except TimeoutError:
        line = b""
    if line != b"ready\n":
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise MailboxError(f"the mailbox agent process did not start (exit status {proc.returncode}; "
                           "its error is in the log above)")
    return proc


# --- the child ---------------------------------------------------------------------------------

def serve(fd_in: int, fd_out: int) -> None:
    """Answer frames from ``fd_in`` until it closes."""
    buffer = bytearray()
    while True:
        frames = _take_frames(buffer)
        if not frames or _readable(fd_in):  # nothing whole yet, or more has come: into this batch
            data = os.read(fd_in, READ_CHUNK)
            if not data and not frames:
                return  # closed (a frame cut off by the parent's end has nobody waiting for it)
            buffer += data
            frames += _take_frames(buffer)
            if not frames:
                continue
        write_all(fd_out, b"".join(json.dumps(a).encode() + b"\n" for a in deliver_batch(frames)))


def deliver_batch(frames: list[tuple[dict[str, object], bytes]]) -> list[dict[str, str]]:
    """Deliver each frame; the answers, in order, once every delivered file and folder is synced."""
    answers: list[dict[str, str]] = []
    folders: dict[Path, list[int]] = {}
    for header, raw in frames:
        try:
            path = deliver(Path(str(header["root"])), str(header["address"]), raw,
                           group=header["group"] and str(header["group"]), sync_folder=False)
        except Exception as exc:  # noqa: BLE001 - the parent gets the error and tells its caller
            answers.append({"error": f"{type(exc).__name__}: {exc}"})
            continue
        folders.setdefault(path.parent, []).append(len(answers))
        answers.append({"path": str(path)})
    for folder, indexes in folders.items():
        try:
            fsync_folder(folder)
        except OSError as exc:  # the names may not be durable: none of them counts as delivered
            for i in indexes:
                answers[i] = {"error": f"{type(exc).__name__}: {exc}"}
    return answers


def _take_frames(buffer: bytearray) -> list[tuple[dict[str, object], bytes]]:
    """The whole frames at the start of ``buffer``, removed from it."""
    frames = []
    start = 0
    while (end := buffer.find(b"\n", start)) >= 0:
        header = json.loads(buffer[start:end])
        size = int(header["size"])
        if len(buffer) < end + 1 + size:
            break
        frames.append((header, bytes(buffer[end + 1:end + 1 + size])))
        start = end + 1 + size
    del buffer[:start]
    return frames


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def main() -> None:
    # Ctrl-C reaches the whole process group: the gateway stops first, then closes our stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    fd_in, fd_out = sys.stdin.fileno(), sys.stdout.fileno()
    write_all(fd_out, b"ready\n")
    serve(fd_in, fd_out)


if __name__ == "__main__":
    main()
