"""The store and the spool keep what they were given, across a close and reopen."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta
from pathlib import Path

from mailgw import mailbox
from mailgw.spool import Spool, new_id, write_durably
from mailgw.store import MessageState, NewMessage, OutboxEntry, Store, utcnow


async def test_messages_calls_and_notifications_survive_reopening(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    path = spool.store("q1", b"Subject: hi\r\n\r\nbody\r\n")
    store = Store(tmp_path / "db.sqlite3")
    await store.open()
    [stored] = await store.add_messages([NewMessage("q1", "a@x.example", "b@a.example", path, 22, "request",
                                                    "a@x.example", {"action": "connect"})])
    assert stored == await store.get_message("q1")  # what ingress hands the dispatcher is what is stored
    await store.add_call("q1-1", "q1", "2000", "2001")
    await store.close()

    store = Store(tmp_path / "db.sqlite3")
    await store.open()
    try:
        [row] = await store.unfinished_messages()
        assert (row.id, row.state, row.request, row.spool_path.read_bytes()) == (
            "q1", MessageState.QUEUED, {"action": "connect"}, b"Subject: hi\r\n\r\nbody\r\n")
        [call] = await store.calls_for("q1")
        assert call.outcome is None  # placed, no outcome: what a restart treats as "cut off mid-call"

        notice = OutboxEntry("o1", "q1", "mailgw@a.example", "a@x.example", write_durably(tmp_path / "o1.eml", b"x"))
        await store.finish_request("q1", MessageState.DONE, outcome="answered", status="2.0.0", detail="ok",
                                   notification=notice)
        assert await store.unfinished_messages() == []
        [queued], later = await store.due_outbox(utcnow())
        assert later is None
        assert (queued.id, queued.rcpt_to, queued.request_id) == ("o1", "a@x.example", "q1")
        assert await store.due_outbox(utcnow(), skip={"o1"}) == ([], None)  # under way: not read again
        assert [s for _, s, _ in await store.stages("q1")] == ["received", "outcome", "mail-queued"]
        by_sender, by_number = await store.recent_counts(["a@x.example"], ["2001"], utcnow())
        assert by_sender == {"a@x.example": 1} and by_number == {"2001": (0, 0)}  # its request has no to_number
    finally:
        await store.close()


async def test_group_commit_keeps_each_transaction_atomic(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite3")
    await store.open()
    try:
        await store.add_messages([NewMessage(f"q{i}", "a@x.example", "b@a.example", tmp_path / "x", 1, "request",
                                             "a@x.example", {}) for i in range(3)])
        await store.add_call("q0-1", "q0", "2000", "2001")
        # Submitted together, these share one batch; the duplicate call id must fail alone.
        results = await asyncio.gather(
            store.add_call("q1-1", "q1", "2000", "2001"),
            store.add_call("q0-1", "q2", "2000", "2001"),
            store.add_stage("q2", "waiting", "x"),
            return_exceptions=True)
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], sqlite3.IntegrityError)
        assert [c.id for c in await store.calls_for("q1")] == ["q1-1"]
        assert await store.calls_for("q2") == []
        assert [s for _, s, _ in await store.stages("q2")] == ["received", "waiting"]
    finally:
        await store.close()


async def test_a_write_waits_for_the_lock_another_process_holds_then_commits(tmp_path: Path) -> None:
    """The event loop never waits for SQLite's write lock; the writer thread does, for a while."""
    store = Store(tmp_path / "db.sqlite3")
    await store.open()
    other = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)  # as `mailgw` run beside it
    try:
        await store.add_messages([NewMessage("q1", "a@x.example", "b@a.example", tmp_path / "x", 1, "request",
                                             "a@x.example", {})])
        other.execute("BEGIN IMMEDIATE")
        writing = asyncio.create_task(store.add_stage("q1", "waiting", "x"))
        done, _ = await asyncio.wait({writing}, timeout=0.3)
        assert not done  # neither failed at once nor written past the lock
        assert (await store.recent_counts(["a@x.example"], [], utcnow()))[0] == {"a@x.example": 1}  # reads go on
        other.execute("COMMIT")
        await asyncio.wait_for(writing, 5)
        assert [s for _, s, _ in await store.stages("q1")] == ["received", "waiting"]
    finally:
        other.close()
        await store.close()


def test_maildir_delivery_and_reading_marks_seen(tmp_path: Path) -> None:
    delivered = mailbox.deliver(tmp_path, "bob@a.example", b"Subject: hello\r\n\r\nhi\r\n")
    assert delivered.parent.name == "new"
    [mail] = mailbox.list_mail(tmp_path, "bob@a.example")
    assert not mail.seen and mail.message()["Subject"] == "hello"
    seen = mailbox.mark_seen(mail)
    assert seen.path.parent.name == "cur" and seen.path.name.endswith(":2,S")
    assert [m.seen for m in mailbox.list_mail(tmp_path, "bob@a.example")] == [True]
    assert not list((tmp_path / "bob@a.example" / "tmp").iterdir())


def test_ids_do_not_repeat_within_a_second() -> None:
    """Three random bytes alone repeat within a second more often than not at a few thousand ids."""
    ids = [new_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)


async def test_relayed_copies_are_kept_in_the_store_with_their_rows(tmp_path: Path) -> None:
    """A relayed copy is stored in its rows' transaction (no file); one queued before that (a file)
    has no stored content, and is read from its path."""
    from datetime import timedelta

    store = Store(tmp_path / "db.sqlite3")
    await store.open()
    try:
        deadline = utcnow() + timedelta(minutes=15)
        kept = OutboxEntry("r1", "r1", "a@a.example", "b@b.example", tmp_path / "r1.eml",
                           content=b"Received: x\r\n\r\nhi")
        old = OutboxEntry("r2", "r2", "a@a.example", "b@b.example", tmp_path / "r2.eml")
        await store.add_messages([], relayed=[(kept, "b.example", deadline), (old, "b.example", deadline)])
        assert await store.relay_content("r1") == b"Received: x\r\n\r\nhi"
        assert await store.relay_content("r2") is None
        assert not (tmp_path / "r1.eml").exists()
        [(row, destination)] = [q for q in await store.outbox_queue() if q[0].id == "r1"]
        assert (destination, row.deadline is not None) == ("b.example", True)
    finally:
        await store.close()


async def test_received_mail_is_kept_in_the_store_and_older_spool_files_still_read(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    store = Store(tmp_path / "db.sqlite3")
    await store.open()
    try:
        new = NewMessage("q1", "a@x.example", "b@a.example", spool.path_for("q1"), 7, "mail", "a@x.example", None)
        old = NewMessage("q0", "a@x.example", "b@a.example", spool.path_for("q0"), 7, "mail", "a@x.example", None)
        await store.add_messages([new], contents=[(spool.path_for("q1"), b"mail q1")])
        write_durably(spool.path_for("q0"), b"mail q0")  # as an older version did: a spool file
        await store.add_messages([old])
        assert not spool.path_for("q1").exists()  # no file: the row's transaction holds the mail
    finally:
        await store.close()
    store = Store(tmp_path / "db.sqlite3")
    await store.open()
    try:
        rows = {row.id: row for row in await store.unfinished_messages()}
        assert [await store.raw_message(rows[i]) for i in ("q0", "q1")] == [b"mail q0", b"mail q1"]
    finally:
        await store.close()


async def test_rate_counts_cover_the_last_hour_and_survive_an_upgrade(tmp_path: Path) -> None:
    def request(i: int, sender: str, kind: str = "request", rings: tuple[str, ...] = ()) -> NewMessage:
        return NewMessage(f"q{i}", sender, "cti@a.example", tmp_path / "x", 1, kind, sender, {}, rings)

    store = Store(tmp_path / "db.sqlite3")
    await store.open()
    try:
        await store.add_messages([request(1, "a@x.example", rings=("2001",)), request(2, "a@x.example"),
                                  request(3, "a@x.example", kind="mail"), request(4, "b@x.example", rings=("2001", "2002"))])
        now = utcnow()
        counts = await store.recent_counts(["a@x.example", "b@x.example", "c@x.example"], ["2001", "2002", "2003"], now)
        assert counts == ({"a@x.example": 2, "b@x.example": 1, "c@x.example": 0},
                          {"2001": (2, 2), "2002": (1, 1), "2003": (0, 0)})
        assert await store.recent_counts(["a@x.example"], ["2001"], now + timedelta(minutes=30)) == (
            {"a@x.example": 2}, {"2001": (0, 2)})
        assert await store.recent_counts(["a@x.example"], ["2001"], now + timedelta(minutes=62)) == (
            {"a@x.example": 0}, {"2001": (0, 0)})
    finally:
        await store.close()
    # A store last written by a version that kept no per-minute counts: the last hour is counted
    # from the requests themselves when it is opened.
    with sqlite3.connect(tmp_path / "db.sqlite3") as db:
        db.execute("DROP TABLE sender_minutes")
    store = Store(tmp_path / "db.sqlite3")
    await store.open()
    try:
        by_sender, _ = await store.recent_counts(["a@x.example", "b@x.example"], [], utcnow())
        assert by_sender == {"a@x.example": 2, "b@x.example": 1}
    finally:
        await store.close()
