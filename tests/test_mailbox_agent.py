"""The mailbox agent: Maildir deliveries made by a child process, answered in order."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from mailgw.mailbox import MailboxError, list_mail
from mailgw.mailbox_agent import MailboxAgent, deliver_batch

from .conftest import exited

WAIT = 20.0


async def test_deliveries_under_way_together_each_land_whole_in_their_maildir(tmp_path: Path) -> None:
    agent = MailboxAgent()
    try:
        mails = [(f"{who}@a.example", f"Subject: {i}\r\n\r\n{'x' * 70_000 * i}\r\n".encode())
                 for i, who in enumerate(["alice", "bob", "alice", "carol", "alice"])]
        paths = await asyncio.wait_for(asyncio.gather(*(agent.deliver(tmp_path, who, raw) for who, raw in mails)),
                                       WAIT)
        # Each caller gets the path of its own mail, whatever the batch it went in.
        assert [p.read_bytes() for p in paths] == [raw for _, raw in mails]
        assert [p.parent for p in paths] == [tmp_path / who / "new" for who, _ in mails]
        assert sorted(m.message()["Subject"] for m in list_mail(tmp_path, "alice@a.example")) == ["0", "2", "4"]
        assert not any(list((tmp_path / who / "tmp").iterdir()) for who in ("alice@a.example", "bob@a.example"))
    finally:
        await agent.stop()


async def test_a_delivery_that_cannot_be_made_names_why_and_the_next_one_goes_through(tmp_path: Path) -> None:
    agent = MailboxAgent()
    try:
        with pytest.raises(MailboxError, match=r"mailbox of \.\./evil failed: ValueError: not a mailbox name"):
            await asyncio.wait_for(agent.deliver(tmp_path, "../evil", b"Subject: no\r\n\r\n"), WAIT)
        (tmp_path / "file").write_text("not a folder")
        with pytest.raises(MailboxError, match="NotADirectoryError"):
            await asyncio.wait_for(agent.deliver(tmp_path / "file", "bob@a.example", b"Subject: no\r\n\r\n"), WAIT)
        path = await asyncio.wait_for(agent.deliver(tmp_path, "bob@a.example", b"Subject: yes\r\n\r\n"), WAIT)
        assert path.read_bytes() == b"Subject: yes\r\n\r\n"
        assert not (tmp_path.parent / "evil").exists()
    finally:
        await agent.stop()


async def test_a_killed_agent_fails_nothing_silently_and_the_next_delivery_starts_a_new_one(tmp_path: Path) -> None:
    agent = MailboxAgent()
    try:
        await asyncio.wait_for(agent.deliver(tmp_path, "bob@a.example", b"Subject: 1\r\n\r\n"), WAIT)
        first = agent.pid
        assert first is not None and first != os.getpid()
        os.kill(first, signal.SIGKILL)
        await exited(first)
        try:  # sent before the agent saw its child end: it fails (the outbox tries it again later)
            await asyncio.wait_for(agent.deliver(tmp_path, "bob@a.example", b"Subject: 2\r\n\r\n"), WAIT)
        except MailboxError as exc:
            assert "mailbox agent process ended (exit status -9)" in str(exc)
        path = await asyncio.wait_for(agent.deliver(tmp_path, "bob@a.example", b"Subject: 3\r\n\r\n"), WAIT)
        assert path.read_bytes() == b"Subject: 3\r\n\r\n"
        assert agent.pid not in (None, first)
    finally:
        await agent.stop()


async def test_stop_answers_what_was_sent_and_ends_the_process(tmp_path: Path) -> None:
    agent = MailboxAgent()
    await asyncio.wait_for(agent.deliver(tmp_path, "bob@a.example", b"Subject: warm\r\n\r\n"), WAIT)
    pid = agent.pid
    assert pid is not None
    under_way = [asyncio.create_task(agent.deliver(tmp_path, "bob@a.example", f"Subject: {i}\r\n\r\n".encode()))
                 for i in range(20)]
    await asyncio.sleep(0)  # every frame is written to the pipe before stop() closes it
    await asyncio.wait_for(agent.stop(), WAIT)
    assert all(t.done() and t.exception() is None for t in under_way)
    assert len(list_mail(tmp_path, "bob@a.example")) == 21
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert agent.pid is None


def test_a_batch_answers_in_order_and_one_bad_frame_spoils_only_its_own_answer(tmp_path: Path) -> None:
    frames = [({"root": str(tmp_path), "address": "bob@a.example", "group": None}, b"one"),
              ({"root": str(tmp_path), "address": "/etc/passwd", "group": None}, b"bad"),
              ({"root": str(tmp_path), "address": "carol@a.example", "group": None}, b"two")]
    answers = deliver_batch(frames)
    assert [Path(answers[0]["path"]).read_bytes(), Path(answers[2]["path"]).read_bytes()] == [b"one", b"two"]
    assert answers[1] == {"error": "ValueError: not a mailbox name: '/etc/passwd'"}
