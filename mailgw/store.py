"""The durable store: every request, call attempt, stage and outgoing mail, in SQLite.

All SQL lives here, so a later PostgreSQL store replaces this one module. SQLite runs on one
dedicated thread (``sqlite3`` objects must stay on the thread that made them, and its calls block),
so the event loop never waits on the disk; callers ``await`` plain methods. WAL with
``synchronous=FULL`` makes every commit durable before the awaiting caller goes on: ingress may
only answer 250 after ``add_message`` returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar


T = TypeVar("T")
Statements = list[tuple[str, tuple[Any, ...]]]
Contents = Sequence[tuple[Path, bytes]]  # raw mail by the spool path its rows name (mail_content)

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id          TEXT PRIMARY KEY,      -- the request id the sender sees ("queued as ...")
    received_at TEXT NOT NULL,
    mail_from   TEXT NOT NULL,         -- envelope sender
    rcpt_to     TEXT NOT NULL,         -- the one local recipient this entry is for
    spool_path  TEXT NOT NULL,         -- the raw message, fsynced before the row was written
    size        INTEGER NOT NULL,
    kind        TEXT NOT NULL,         -- 'request' (make the PBX act) or 'mail' (just deliver)
    state       TEXT NOT NULL,         -- see MessageState
    sender      TEXT,                  -- who is answered (From header), for rate limits
    request     TEXT,                  -- the parsed ExchangeRequest as JSON
    outcome     TEXT,
    status      TEXT,                  -- RFC 3463 code of the outcome
    detail      TEXT,                  -- a human sentence about the outcome
    not_before  TEXT,                  -- do not work on it before this time (PBX down: retry later)
    updated_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_state ON messages(state);
-- Replaced by sender_minutes: counting a busy sender's last hour from here read every one of its
-- rows (20 ms a check at 20,000 requests an hour).
DROP INDEX IF EXISTS messages_sender;
CREATE INDEX IF NOT EXISTS messages_received ON messages(received_at);

-- Numbers accepted requests will ring, for per-number rate limits: an index range per check
-- instead of reading every request of the last hour.
CREATE TABLE IF NOT EXISTS rings (
    number     TEXT NOT NULL,
    at         TEXT NOT NULL,
    request_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rings_number ON rings(number, at);

-- Each sender's accepted requests by the minute (UTC, 'YYYY-MM-DDTHH:MM'), written with them, for
-- the per-sender rate limit: a check sums at most 61 rows however busy the sender is.
CREATE TABLE IF NOT EXISTS sender_minutes (
    sender TEXT NOT NULL,
    minute TEXT NOT NULL,
    n      INTEGER NOT NULL,
    PRIMARY KEY (sender, minute)
) WITHOUT ROWID;

-- The raw mail as received, in the same transaction as its rows (one WAL fsync for a whole group
-- commit instead of a file's fsync, rename and folder fsync per mail); one row per DATA, shared by
-- its recipients' entries through spool_path. Mail stored before this table existed is the file
-- at messages.spool_path.
CREATE TABLE IF NOT EXISTS mail_content (
    spool_path TEXT PRIMARY KEY,
    content    BLOB NOT NULL
);

CREATE TABLE IF NOT EXISTS audit (
    at      TEXT NOT NULL,
    peer    TEXT NOT NULL,                 -- client IP address
    login   TEXT,                          -- SMTP AUTH identity, if any
    sender  TEXT,                          -- envelope / From address
    what    TEXT NOT NULL,                 -- what was asked (one line, numbers masked if confidential)
    rule    TEXT NOT NULL,                 -- the rule that decided
    reply   TEXT NOT NULL                  -- what the client was told
);

CREATE TABLE IF NOT EXISTS calls (
    id               TEXT PRIMARY KEY,  -- ChannelId on the PBX: <request id>-<attempt>
    request_id       TEXT NOT NULL REFERENCES messages(id),
    from_number      TEXT NOT NULL,
    to_number        TEXT NOT NULL,
    placed_at        TEXT NOT NULL,     -- written BEFORE the Originate goes out
    outcome          TEXT,
    failed_party     TEXT,
    cause            INTEGER,
    from_answered_at TEXT,
    to_answered_at   TEXT,
    ended_at         TEXT
);
CREATE INDEX IF NOT EXISTS calls_request ON calls(request_id);

CREATE TABLE IF NOT EXISTS stages (
    request_id TEXT NOT NULL,
    at         TEXT NOT NULL,
    stage      TEXT NOT NULL,           -- received, parsed, executing, outcome, notified, ...
    detail     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS stages_request ON stages(request_id);

CREATE TABLE IF NOT EXISTS outbox (
    id          TEXT PRIMARY KEY,
    created_at  TEXT NOT NULL,
    request_id  TEXT,
    mail_from   TEXT NOT NULL,
    rcpt_to     TEXT NOT NULL,
    path        TEXT NOT NULL,          -- the composed mail, fsynced before the row was written
    state       TEXT NOT NULL,          -- queued, sent, failed
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_try    TEXT NOT NULL,
    last_error  TEXT
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox(state, next_try);

-- Mail the gateway writes itself (result mails), in the same transaction as the rows that queue
-- it: no file of its own to fsync. Deleted once sent. Mail queued before this table existed, and
-- what Outbox.prepare writes, is the file at outbox.path.
CREATE TABLE IF NOT EXISTS outbox_content (
    id       TEXT PRIMARY KEY REFERENCES outbox(id),
    content  BLOB NOT NULL
);
"""


class MessageState(StrEnum):
    QUEUED = "queued"          # stored, waiting for its stage to run
    EXECUTING = "executing"    # the PBX is being asked
    AWAITING_READ = "awaiting-read"  # delivered to the recipient's mailbox; runs when they read it
    DONE = "done"              # finished; the outcome (if any) is recorded
    FAILED = "failed"          # finished without doing what was asked; the sender was told


@dataclass(frozen=True)
class MessageRow:
    id: str
    received_at: datetime
    mail_from: str
    rcpt_to: str
    spool_path: Path
    size: int
    kind: str
    state: MessageState
    sender: str | None
    request: dict[str, Any] | None
    outcome: str | None
    status: str | None
    detail: str | None
    not_before: datetime | None


@dataclass(frozen=True)
class CallRow:
    id: str
    request_id: str
    from_number: str
    to_number: str
    placed_at: datetime
    outcome: str | None
    failed_party: str | None
    cause: int | None
    from_answered_at: datetime | None
    to_answered_at: datetime | None
    ended_at: datetime | None


@dataclass(frozen=True)
class OutboxRow:
    id: str
    created_at: datetime
    request_id: str | None
    mail_from: str
    rcpt_to: str
    path: Path
    state: str
    attempts: int
    next_try: datetime
    last_error: str | None
    deadline: datetime | None = None  # relayed mail (RELAY_SCHEMA): give up and bounce after this


@dataclass(frozen=True)
class NewMessage:
    id: str
    mail_from: str
    rcpt_to: str
    spool_path: Path
    size: int
    kind: str
    sender: str | None
    request: dict[str, Any] | None
    rings: tuple[str, ...] = ()  # numbers the request will make ring (per-number rate limits)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is not UTC:  # most times are utcnow()'s already (a dozen a request)
        value = value.astimezone(UTC)
    return value.isoformat(timespec="microseconds")


def _fill_sender_minutes(db: sqlite3.Connection, now: datetime) -> None:
    """At open: ``sender_minutes`` kept to the last two hours (``add_messages`` prunes it once a
    minute); a store last used by a version without it gets its last hour counted from the
    requests themselves, so an upgrade resets no limit."""
    db.execute("DELETE FROM sender_minutes WHERE minute < ?", (_minute(_ts(now - timedelta(hours=2))),))
    if db.execute("SELECT 1 FROM sender_minutes LIMIT 1").fetchone() is None:
        db.execute("INSERT INTO sender_minutes SELECT sender, substr(received_at, 1, 16), COUNT(*) FROM messages"
                   " WHERE kind = 'request' AND sender IS NOT NULL AND received_at >= ?"
                   " GROUP BY sender, substr(received_at, 1, 16)", (_ts(now - timedelta(hours=1)),))


def _minute(stamp: str) -> str:
    """The minute of a stored timestamp, as ``sender_minutes`` keys it."""
    return stamp[:16]


BUSY_TIMEOUT = 5.0  # s the writer thread waits for the write lock another process holds
LOOP_BATCH_BYTES = 512 * 1024  # a group commit carrying more content runs on the writer thread


@contextlib.contextmanager
def _patient(db: sqlite3.Connection) -> Iterator[None]:
    """On the writer thread: wait up to BUSY_TIMEOUT for a lock, as the event loop never does."""
    db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
    try:
        yield
    finally:
        db.execute("PRAGMA busy_timeout=0")


def _settle(batch: list[tuple[Statements, asyncio.Future[None]]], errors: list[BaseException | None]) -> None:
    for (_, done), error in zip(batch, errors):
        if done.done():
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)


def _content_bytes(statements: Statements) -> int:
    return sum(len(p) for _, params in statements for p in params if type(p) is bytes)


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


class Store:
    """One SQLite database file; every method is a coroutine run on one of the store's two threads.

    Writes (group commits) run on the writer thread; plain queries on a reader thread with its
    own connection, so a lookup never queues behind a batch that is waiting for its fsync. WAL
    lets the reader see every transaction committed before the query started, so a caller that
    awaited a write reads it back.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailgw-store")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailgw-store-read")
        self._db: sqlite3.Connection | None = None
        # .db: the reader thread's connection, and on the event loop's thread its own (``_read_here``)
        self._reading = threading.local()
        # Called on the event loop after a stage is durably recorded: (request_id, stage, detail).
        self.stage_listeners: list[Callable[[str, str, str], None]] = []
        self._pending: list[tuple[Statements, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()  # the writer connection: one user at a time, loop or thread
        self._counted_minute = ""  # the minute sender_minutes was last pruned in

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await self._run(self._open)
        await self._read(self._open_reader)
        self._open_reader(timeout=0.0)

    def _open_reader(self, timeout: float = BUSY_TIMEOUT) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True, timeout=timeout)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA query_only=ON")
        self._reading.db = db

    def _close_reader(self) -> None:
        db = getattr(self._reading, "db", None)
        if db is not None:
            db.close()
            self._reading.db = None

    def _open(self) -> None:
        # Used by the event loop and the writer thread in turns, never at once (``_writing``).
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(SCHEMA)
        db.executescript(CAMPON_SCHEMA)
        db.executescript(SCENARIO_SCHEMA)
        db.executescript(RELAY_SCHEMA)
        db.executescript(ABSENCE_SCHEMA)
        _fill_sender_minutes(db, utcnow())
        db.execute("PRAGMA busy_timeout=0")  # the loop must never wait for a lock: _patient()
        self._db = db

    async def close(self) -> None:
        if self._flusher is not None:
            await self._flusher
        await self._read(self._close_reader)
        self._close_reader()
        if self._db is not None:
            async with self._writing:
                await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """On the writer thread (its connection is ``self._db``)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """On the reader thread: ``fn`` may only query (``self._query``)."""
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, *args)

    async def _read_here(self, fn: Callable[..., T], *args: Any) -> T:
        """A few indexed lookups on the request path, run on the event loop itself: they take
        microseconds, while the trip to the reader thread and back waited milliseconds for the
        busy loop to hand the GIL over. A lock held by another process (WAL recovery, say) makes
        it raise at once (timeout 0), and then the reader thread does it."""
        try:
            return fn(*args)
        except sqlite3.OperationalError:
            return await self._read(fn, *args)

    async def _commit(self, statements: Statements) -> None:
        """Commit ``statements`` as one atomic transaction, durably, then tell stage listeners.

        Group commit: transactions that arrive while a batch is being written wait for the next
        batch and share its single fsync. Each keeps
        its own atomicity through a SAVEPOINT, so one failing transaction does not take the
        others with it.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((statements, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="store-group-commit")
        await done
        for sql, params in statements:
            if sql.startswith("INSERT INTO stages"):
                for listener in list(self.stage_listeners):
                    listener(params[0], params[2], params[3])

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            transactions = [statements for statements, _ in batch]
            async with self._writing:
                try:
                    if self._stage_on_loop(transactions):
                        await self._commit_staged_and_settle(batch)
                        continue
                    errors = await self._run(self._write_batch, transactions)
                except BaseException as exc:  # the COMMIT itself failed: nothing of the batch is durable
                    errors = [exc] * len(batch)
            _settle(batch, errors)

    async def _commit_staged_and_settle(self, batch: list[tuple[Statements, asyncio.Future[None]]]) -> None:
        """COMMIT on the writer thread, whose callback on the loop settles the batch's callers at
        once: through ``run_in_executor`` they would wake one loop iteration later (the future
        is copied, then this task wakes, then it settles them), and under load an iteration
        takes milliseconds."""
        loop = asyncio.get_running_loop()
        settled = loop.create_future()

        def commit() -> None:
            try:
                self._commit_staged()
                error: BaseException | None = None
            except BaseException as exc:  # nothing of the batch is durable: every caller gets it
                error = exc
            loop.call_soon_threadsafe(settle, error)

        def settle(error: BaseException | None) -> None:
            _settle(batch, [error] * len(batch))
            settled.set_result(None)

        self._executor.submit(commit)
        await settled

    def _stage_on_loop(self, batch: list[Statements]) -> bool:
        """Run a batch's statements here, on the event loop, leaving only the COMMIT (the fsync) to
        the writer thread; True when that worked and the transaction is open.

        Why: SQLite gives up the GIL in every statement, and a thread that gave it up waits for
        the busy event loop to hand it back, so a batch of a hundred statements on the thread took
        tens of milliseconds under load. Here they cost microseconds each: the pages they touch
        are in the connection's cache. Not here, and False (nothing written): a batch carrying
        large contents (copying and spilling megabytes would stall the loop), and a batch meeting
        the write lock held by another process (the thread waits for it instead) or a failing
        statement (the thread redoes the batch with a savepoint per transaction)."""
        if sum(_content_bytes(statements) for statements in batch) > LOOP_BATCH_BYTES:
            return False
        try:
            return self._stage(batch)
        except sqlite3.OperationalError:  # BEGIN met another process's lock: busy_timeout 0 here
            return False

    def _stage(self, batch: list[Statements]) -> bool:
        """BEGIN IMMEDIATE and every statement of ``batch``, the transaction left open for
        ``_commit_staged``; False, and rolled back, when a statement failed."""
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            for statements in batch:
                for sql, params in statements:
                    db.execute(sql, params)
        except sqlite3.Error:
            db.execute("ROLLBACK")
            return False
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return True

    def _commit_staged(self) -> None:
        assert self._db is not None
        try:
            self._db.execute("COMMIT")
        except BaseException:  # nothing of the batch is durable: every caller gets the error
            self._db.execute("ROLLBACK")
            raise

    def _write_batch(self, batch: list[Statements]) -> list[BaseException | None]:
        assert self._db is not None
        with _patient(self._db):
            errors: list[BaseException | None] = [None] * len(batch)
            # Optimistic first: the whole batch as one transaction, without a SAVEPOINT per
            # caller. Here on the thread each statement hands the GIL over twice (SQLite runs
            # without it), so fewer statements make a much shorter batch. Only when a statement
            # fails is the batch rolled back and redone with savepoints.
            if self._stage(batch):
                self._commit_staged()
            else:
                self._write_isolated(batch, errors)
            return errors

    def _write_isolated(self, batch: list[Statements], errors: list[BaseException | None]) -> None:
        """The transactions of ``batch`` in one COMMIT, each in a SAVEPOINT: a failing one is
        rolled back alone and its error put in ``errors``."""
        assert self._db is not None
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for index, statements in enumerate(batch):
                self._db.execute("SAVEPOINT one")
                try:
                    for sql, params in statements:
                        self._db.execute(sql, params)
                except sqlite3.Error as exc:
                    self._db.execute("ROLLBACK TO one")
                    errors[index] = exc
                self._db.execute("RELEASE one")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._commit_staged()

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        db = getattr(self._reading, "db", None) or self._db  # the connection of this thread (reader or loop)
        assert db is not None
        return db.execute(sql, params).fetchall()

    # --- messages -------------------------------------------------------------------------------

    async def add_messages(self, messages: list[NewMessage],
                           relayed: Iterable[tuple[OutboxEntry, str, datetime]] = (),
                           contents: Contents = ()) -> list[MessageRow]:
        """Record accepted messages durably (with their 'received' stage), and the copies relayed
        to other offices (outbox entry, peer domain, deadline), all or nothing. ``contents`` (the
        raw mail, by the spool path its entries name) go into the same transaction (``raw_message``
        reads them). Returns the rows as ``get_message`` would read them back."""
        now = _ts(utcnow())
        statements: list[tuple[str, tuple[Any, ...]]] = _relay_inserts(relayed)
        statements += [("INSERT INTO mail_content (spool_path, content) VALUES (?,?)", (str(path), content))
                       for path, content in contents]
        for m in messages:
            statements.append((
                "INSERT INTO messages (id, received_at, mail_from, rcpt_to, spool_path, size, kind, state,"
                " sender, request, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (m.id, now, m.mail_from, m.rcpt_to, str(m.spool_path), m.size, m.kind, MessageState.QUEUED,
                 m.sender, json.dumps(m.request, ensure_ascii=False) if m.request is not None else None, now),
            ))
            statements.append(("INSERT INTO stages VALUES (?,?,?,?)", (m.id, now, "received", "")))
            statements += [("INSERT INTO rings VALUES (?,?,?)", (number, now, m.id)) for number in m.rings]
            if m.kind == "request" and m.sender is not None:
                statements.append(("INSERT INTO sender_minutes VALUES (?,?,1)"
                                   " ON CONFLICT (sender, minute) DO UPDATE SET n = n + 1", (m.sender, _minute(now))))
        if _minute(now) != self._counted_minute:  # once a minute: counts older than two hours go
            self._counted_minute = _minute(now)
            statements.append(("DELETE FROM sender_minutes WHERE minute < ?",
                               (_minute(_ts(utcnow() - timedelta(hours=2))),)))
        await self._commit(statements)
        received_at = _dt(now)
        return [MessageRow(id=m.id, received_at=received_at, mail_from=m.mail_from, rcpt_to=m.rcpt_to,  # type: ignore[arg-type]
                           spool_path=Path(str(m.spool_path)), size=m.size, kind=m.kind, state=MessageState.QUEUED,
                           sender=m.sender, request=m.request, outcome=None, status=None, detail=None,
                           not_before=None) for m in messages]

    async def raw_message(self, row: MessageRow) -> bytes:
        """The mail an entry was made from, as received: kept in the store, or (stored by an
        older version) the file at its spool path. OSError when neither is there."""
        rows = await self._read(self._query, "SELECT content FROM mail_content WHERE spool_path = ?",
                                (str(row.spool_path),))
        if rows:
            return bytes(rows[0][0])
        return await asyncio.to_thread(row.spool_path.read_bytes)

    async def get_message(self, message_id: str) -> MessageRow | None:
        rows = await self._read(self._query, "SELECT * FROM messages WHERE id = ?", (message_id,))
        return _message(rows[0]) if rows else None

    async def unfinished_messages(self) -> list[MessageRow]:
        """Everything a restarted gateway must pick up again, oldest first."""
        rows = await self._read(
            self._query, "SELECT * FROM messages WHERE state IN (?, ?, ?) ORDER BY received_at, id",
            (MessageState.QUEUED, MessageState.EXECUTING, MessageState.AWAITING_READ))
        return [_message(r) for r in rows]

    async def set_state(self, message_id: str, state: MessageState, *, stage: str, detail: str = "",
                        outcome: str | None = None, status: str | None = None,
                        not_before: datetime | None = None) -> None:
        now = _ts(utcnow())
        await self._commit([
            ("UPDATE messages SET state = ?, outcome = COALESCE(?, outcome), status = COALESCE(?, status),"
             " detail = CASE WHEN ? != '' THEN ? ELSE detail END, not_before = ?, updated_at = ? WHERE id = ?",
             (state, outcome, status, detail, detail, _ts(not_before), now, message_id)),
            ("INSERT INTO stages VALUES (?,?,?,?)", (message_id, now, stage, detail)),
        ])

    async def add_stage(self, message_id: str, stage: str, detail: str = "") -> None:
        await self._commit([("INSERT INTO stages VALUES (?,?,?,?)",
                                       (message_id, _ts(utcnow()), stage, detail))])

    async def stages(self, message_id: str) -> list[tuple[datetime, str, str]]:
        rows = await self._read(self._query, "SELECT at, stage, detail FROM stages WHERE request_id = ?"
                               " ORDER BY rowid", (message_id,))
        return [(_dt(r["at"]), r["stage"], r["detail"]) for r in rows]  # type: ignore[misc]

    async def recent_counts(self, senders: list[str], numbers: list[str],
                            now: datetime) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
        """For rate limits, in a few indexed lookups on the loop (``_read_here``): each sender's
        requests in the last hour, and for each number the requests that rang it in the last
        minute and hour.

        A sender's hour is counted by the minute, the oldest minute whole: up to a minute more
        than the hour, never less."""
        hour, minute = _ts(now - timedelta(hours=1)), _ts(now - timedelta(minutes=1))

        def count() -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
            by_sender = {s: int(self._query("SELECT COALESCE(SUM(n), 0) FROM sender_minutes"
                                            " WHERE sender = ? AND minute >= ? AND minute <= ?",
                                            (s, _minute(hour), _minute(_ts(now))))[0][0]) for s in senders}
            by_number = {n: (0, 0) for n in numbers}
            if numbers:  # one statement for all numbers and both windows
                marks = ",".join("?" * len(numbers))
                for number, last_minute, last_hour in self._query(
                        f"SELECT number, SUM(at >= ?), COUNT(*) FROM rings WHERE number IN ({marks}) AND at >= ?"
                        " GROUP BY number", (minute, *numbers, hour)):
                    by_number[number] = (int(last_minute), int(last_hour))
            return by_sender, by_number
        return await self._read_here(count)

    async def add_audit(self, *, peer: str, login: str | None, sender: str | None, what: str, rule: str,
                        reply: str) -> None:
        await self._commit([("INSERT INTO audit VALUES (?,?,?,?,?,?,?)",
                             (_ts(utcnow()), peer, login, sender, what, rule, reply))])

    async def audit_entries(self, limit: int = 100) -> list[dict[str, str | None]]:
        rows = await self._read(self._query, "SELECT * FROM audit ORDER BY rowid DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]

    async def list_messages(self, limit: int = 50) -> list[MessageRow]:
        rows = await self._read(self._query, "SELECT * FROM messages ORDER BY received_at DESC, id DESC LIMIT ?",
                               (limit,))
        return [_message(r) for r in rows]

    # --- calls ----------------------------------------------------------------------------------

    async def add_call(self, call_id: str, request_id: str, from_number: str, to_number: str) -> None:
        await self._commit([_call_insert(call_id, request_id, from_number, to_number)])

    async def start_call(self, message_id: str, call_id: str, from_number: str, to_number: str) -> None:
        """The request is executing and this call is about to be placed: one transaction, written
        before the Originate goes out (a restart finds the call row and will not dial again)."""
        now = _ts(utcnow())
        await self._commit([
            ("UPDATE messages SET state = ?, updated_at = ? WHERE id = ?", (MessageState.EXECUTING, now, message_id)),
            ("INSERT INTO stages VALUES (?,?,?,?)", (message_id, now, "executing", f"call {call_id}")),
            _call_insert(call_id, message_id, from_number, to_number),
        ])

    async def finish_call(self, call_id: str, *, outcome: str, failed_party: str | None, cause: int | None,
                          from_answered_at: datetime | None, to_answered_at: datetime | None,
                          ended_at: datetime) -> None:
        await self._commit([_call_finish(CallEnd(call_id, outcome, failed_party, cause, from_answered_at,
                                                 to_answered_at, ended_at))])

    async def calls_for(self, request_id: str) -> list[CallRow]:
        rows = await self._read(self._query, "SELECT * FROM calls WHERE request_id = ? ORDER BY placed_at, id",
                               (request_id,))
        return [_call(r) for r in rows]

    # --- outbox ---------------------------------------------------------------------------------

    async def add_outbox(self, entry: "OutboxEntry") -> None:
        await self._commit(_outbox_insert(entry))

    async def finish_request(self, message_id: str, state: MessageState, *, outcome: str, status: str,
                             detail: str, notification: "OutboxEntry | None", call: "CallEnd | None" = None) -> None:
        """Record how a request (and its last call) ended and queue its notification in one
        transaction, so a crash can neither lose the notification nor send it twice (its content,
        from ``Outbox.compose``, is in the same transaction)."""
        now = _ts(utcnow())
        statements: list[tuple[str, tuple[Any, ...]]] = [_call_finish(call)] if call is not None else []
        statements += [
            ("UPDATE messages SET state = ?, outcome = ?, status = ?, detail = ?, updated_at = ? WHERE id = ?",
             (state, outcome, status, detail, now, message_id)),
            ("INSERT INTO stages VALUES (?,?,?,?)", (message_id, now, "outcome", f"{outcome} ({status}) {detail}")),
        ]
        if notification is not None:
            statements += _outbox_insert(notification)
        await self._commit(statements)

    async def await_read(self, message_id: str, link: str, mails: list["OutboxEntry"]) -> None:
        """The request's mail is in the recipient's mailbox (the "mail link": a Maildir name, an
        IMAP UID, a receipt token): record that and queue ``mails`` (the sender's "delivered"
        notice, the copy sent on to a receipt mailbox) in one transaction."""
        now = _ts(utcnow())
        statements: Statements = [
            ("UPDATE messages SET state = ?, detail = ?, updated_at = ? WHERE id = ?",
             (MessageState.AWAITING_READ, link, now, message_id)),
            ("INSERT INTO stages VALUES (?,?,?,?)", (message_id, now, "awaiting-read", link)),
        ]
        for mail in mails:
            statements += _outbox_insert(mail)
        await self._commit(statements)

    async def awaiting_read_by_link(self, link: str) -> MessageRow | None:
        """The request waiting to be read whose mail link is ``link``."""
        rows = await self._read(self._query, "SELECT * FROM messages WHERE state = ? AND detail = ?",
                               (MessageState.AWAITING_READ, link))
        return _message(rows[0]) if rows else None

    async def due_outbox(self, now: datetime, limit: int = 200,
                         skip: Collection[str] = ()) -> tuple[list[OutboxRow], datetime | None]:
        """Queued mail due by ``now`` (at most ``limit``), and when the next one after them is due.
        ``skip``: ids already under way, left out so that a backlog of them does not fill the
        limit and hold back mail for other recipients."""
        rows = [_outbox(r) for r in await self._read(
            self._query, f"{OUTBOX_SELECT} WHERE state = 'queued' AND id NOT IN (SELECT value FROM json_each(?))"
                         " ORDER BY next_try, id LIMIT ?", (json.dumps(list(skip)), limit + 1))]
        due = [r for r in rows[:limit] if r.next_try <= now]
        rest = rows[len(due):]
        return due, rest[0].next_try if rest else None

    async def outbox_sent(self, row: OutboxRow) -> None:
        statements: Statements = [("UPDATE outbox SET state = 'sent', attempts = attempts + 1, last_error = NULL"
                                   " WHERE id = ?", (row.id,)),
                                  # sent: its content is not needed again
                                  (f"DELETE FROM {'relay_content' if row.deadline else 'outbox_content'}"
                                   " WHERE id = ?", (row.id,))]
        if row.request_id:
            statements.append(("INSERT INTO stages VALUES (?,?,?,?)",
                               (row.request_id, _ts(utcnow()), "relayed" if row.deadline else "notified",
                                f"to {row.rcpt_to}")))
        await self._commit(statements)

    async def outbox_retry(self, row: OutboxRow, error: str, next_try: datetime | None) -> None:
        """Record a failed attempt; with no next_try the mail has failed for good."""
        if next_try is None:
            statements: Statements = [("UPDATE outbox SET state = 'failed', attempts = attempts + 1,"
                                       " last_error = ? WHERE id = ?", (error, row.id))]
        else:
            statements = [("UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_try = ? WHERE id = ?",
                           (error, _ts(next_try), row.id))]
        if row.request_id:
            stage = "mail-failed" if next_try is None else "mail-deferred"
            statements.append(("INSERT INTO stages VALUES (?,?,?,?)",
                               (row.request_id, _ts(utcnow()), stage, f"to {row.rcpt_to}: {error}")))
        await self._commit(statements)

    async def outbox_for(self, request_id: str) -> list[OutboxRow]:
        rows = await self._read(self._query, f"{OUTBOX_SELECT} WHERE request_id = ? ORDER BY created_at, id",
                               (request_id,))
        return [_outbox(r) for r in rows]

    # --- relay (mailgw/relay.py; RELAY_SCHEMA at the end of this module) ---------------------------

    async def outbox_queue(self, *, include_done: bool = False, limit: int = 1000) -> list[tuple[OutboxRow, str | None]]:
        """Outbound mail with its relay destination (None for notices): the latest ``limit``, oldest first."""
        where = "" if include_done else "WHERE state = 'queued'"
        rows = await self._read(self._query, f"{OUTBOX_SELECT} {where} ORDER BY created_at DESC, id DESC LIMIT ?",
                               (limit,))
        return [(_outbox(r), r["destination"]) for r in reversed(rows)]

    async def relay_content(self, outbox_id: str) -> bytes | None:
        """A relayed copy kept in the store (RELAY_SCHEMA), or None (a file at its outbox path)."""
        rows = await self._read(self._query, "SELECT content FROM relay_content WHERE id = ?", (outbox_id,))
        return bytes(rows[0][0]) if rows else None

    async def outbox_content(self, outbox_id: str) -> bytes | None:
        """Mail the gateway wrote itself, kept in the store, or None (a file at its outbox path)."""
        rows = await self._read(self._query, "SELECT content FROM outbox_content WHERE id = ?", (outbox_id,))
        return bytes(rows[0][0]) if rows else None

    async def outbox_retry_now(self, outbox_id: str) -> bool:
        """Make a queued entry due at once (``mailgw queue retry``)."""
        rows = await self._read(self._query, "SELECT id FROM outbox WHERE id = ? AND state = 'queued'", (outbox_id,))
        if not rows:
            return False
        await self._commit([("UPDATE outbox SET next_try = ? WHERE id = ?", (_ts(utcnow()), outbox_id))])
        return True

    async def outbox_drop(self, outbox_id: str, reason: str) -> bool:
        """Take a queued entry out of the queue for good (``mailgw queue drop``)."""
        rows = await self._read(self._query, "SELECT id FROM outbox WHERE id = ? AND state = 'queued'", (outbox_id,))
        if not rows:
            return False
        await self._commit([("UPDATE outbox SET state = 'dropped', last_error = ? WHERE id = ?", (reason, outbox_id))])
        return True

    # --- camp-on (mailgw/campon.py; tables in CAMPON_SCHEMA at the end of this module) -------------

    async def add_campon(self, *, id: str, kind: str, sender: str, caller: str | None, target: str,
                         mode: str, priority: str, state: str, next_attempt: datetime, deadline: datetime,
                         attempts: int = 0, calls: int = 0, last_outcome: str | None = None,
                         finish_call: dict[str, Any] | None = None, stage_detail: str = "") -> None:
        """Start a camp-on: its row, the request marked executing and a 'camping' stage, in one
        transaction (with ``finish_call``, also the outcome of the attempt that led to it — so a crash
        can neither lose the camp-on nor redial at once). IntegrityError: the pair already camps."""
        now = _ts(utcnow())
        statements: Statements = []
        if finish_call is not None:
            statements.append(_finish_call_sql(**finish_call))
        statements += [
            ("INSERT INTO campons (id, kind, sender, caller, target, mode, priority, state, attempts, calls,"
             " created_at, next_attempt, deadline, last_outcome, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
             (id, kind, sender, caller, target, mode, priority, state, attempts, calls, now, _ts(next_attempt),
              _ts(deadline), last_outcome, now)),
            ("UPDATE messages SET state = ?, updated_at = ? WHERE id = ?", (MessageState.EXECUTING, now, id)),
            ("INSERT INTO stages VALUES (?,?,?,?)", (id, now, "monitoring" if kind == "monitor" else "camping",
                                                     stage_detail)),
        ]
        await self._commit(statements)


    async def update_campon(self, campon_id: str, *, stage: str | None = None, detail: str = "",
                            finish_call: dict[str, Any] | None = None, add_call: tuple[str, str, str] | None = None,
                            notification: OutboxEntry | None = None, **columns: Any) -> None:
        """Change a pending camp-on's columns (CAMPON_COLUMNS), optionally with a stage, a call's
        outcome, a new call row (``add_call`` = (call id, from, to): written before its Originate)
        and a queued mail, in one transaction."""
        unknown = set(columns) - set(CAMPON_COLUMNS)
        if unknown:
            raise ValueError(f"not a camp-on column: {sorted(unknown)}")
        now = _ts(utcnow())
        statements: Statements = []
        if finish_call is not None:
            statements.append(_finish_call_sql(**finish_call))
        if add_call is not None:
            statements.append(("INSERT INTO calls (id, request_id, from_number, to_number, placed_at) VALUES (?,?,?,?,?)",
                               (add_call[0], campon_id, add_call[1], add_call[2], now)))
        if columns:
            sets = ", ".join(f"{name} = ?" for name in columns)
            statements.append((f"UPDATE campons SET {sets}, updated_at = ? WHERE id = ?",
                               (*(_campon_value(k, v) for k, v in columns.items()), now, campon_id)))
        if stage is not None:
            statements.append(("INSERT INTO stages VALUES (?,?,?,?)", (campon_id, now, stage, detail)))
        if notification is not None:
            statements += _outbox_insert(notification)
        await self._commit(statements)


    async def finish_campon(self, campon_id: str, state: MessageState, *, outcome: str, status: str,
                            detail: str, notification: OutboxEntry | None,
                            finish_call: dict[str, Any] | None = None, attempts: int | None = None) -> None:
        """End a camp-on: its row done, the request's outcome, the attempt's outcome and the result
        mail, in one transaction (a crash can neither lose the notification nor send it twice)."""
        now = _ts(utcnow())
        statements: Statements = []
        if finish_call is not None:
            statements.append(_finish_call_sql(**finish_call))
        statements += [
            ("UPDATE campons SET state = 'done', outcome = ?, attempts = COALESCE(?, attempts), ended_at = ?,"
             " updated_at = ? WHERE id = ?", (outcome, attempts, now, now, campon_id)),
            ("UPDATE messages SET state = ?, outcome = ?, status = ?, detail = ?, updated_at = ? WHERE id = ?",
             (state, outcome, status, detail, now, campon_id)),
            ("INSERT INTO stages VALUES (?,?,?,?)", (campon_id, now, "outcome", f"{outcome} ({status}) {detail}")),
        ]
        if notification is not None:
            statements += _outbox_insert(notification)
        await self._commit(statements)


    async def get_campon(self, campon_id: str) -> CamponRow | None:
        rows = await self._read(self._query, "SELECT rowid, * FROM campons WHERE id = ?", (campon_id,))
        return _campon(rows[0]) if rows else None


    async def pending_campons(self) -> list[CamponRow]:
        """Every camp-on and monitor not yet done, first come first."""
        rows = await self._read(self._query, """
            SELECT c.rowid, c.*, COALESCE(json_extract(m.request, '$.confidential'), 1) AS confidential
              FROM campons c LEFT JOIN messages m ON m.id = c.id
             WHERE c.state != 'done' ORDER BY c.rowid""")
        return [_campon(r) for r in rows]


    async def list_campons(self, *, include_done: bool = False, limit: int = 1000) -> list[CamponRow]:
        where = "" if include_done else "WHERE state != 'done' "
        rows = await self._read(self._query, f"SELECT rowid, * FROM campons {where}ORDER BY rowid DESC LIMIT ?",
                               (limit,))
        return [_campon(r) for r in rows]


    async def request_campon_cancel(self, campon_id: str, by: str) -> bool:
        """Ask (durably) for a pending camp-on to be cancelled; False when none is pending under that id.
        The runner acts on it: at once when it is the running gateway's own cancel, else at its next poll."""
        rows = await self._read(self._query, "SELECT 1 FROM campons WHERE id = ? AND state != 'done'", (campon_id,))
        if not rows:
            return False
        now = _ts(utcnow())
        await self._commit([
            ("UPDATE campons SET cancel_requested = COALESCE(cancel_requested, ?), updated_at = ?"
             " WHERE id = ? AND state != 'done'", (by, now, campon_id)),
            ("INSERT INTO stages VALUES (?,?,?,?)", (campon_id, now, "cancel-requested", f"by {by}")),
        ])
        return True


    async def campon_cancels(self) -> list[tuple[str, str]]:
        """(id, by) of pending camp-ons somebody asked to cancel."""
        rows = await self._read(self._query, "SELECT id, cancel_requested FROM campons"
                               " WHERE state != 'done' AND cancel_requested IS NOT NULL")
        return [(r[0], r[1]) for r in rows]


    async def stages_since(self, message_id: str, stage: str, since: datetime | None) -> list[tuple[datetime, str]]:
        rows = await self._read(self._query, "SELECT at, detail FROM stages WHERE request_id = ? AND stage = ?"
                               " AND at > ? ORDER BY rowid", (message_id, stage, _ts(since) or ""))
        return [(_dt(r[0]), r[1]) for r in rows]  # type: ignore[misc]

    # --- scenario steps (mailgw/scenario_run.py) ----------------------------------------------------

    async def scenario_steps(self, request_id: str) -> list[StepRow]:
        rows = await self._read(self._query, "SELECT * FROM scenario_steps WHERE request_id = ? ORDER BY rowid",
                               (request_id,))
        return [_step(r) for r in rows]

    async def start_step(self, request_id: str, path: str, kind: str) -> None:
        """A step begins (written before it dials or mails anything); a second start is a no-op."""
        await self._commit([("INSERT OR IGNORE INTO scenario_steps (request_id, path, kind, state, started_at)"
                             " VALUES (?,?,?,?,?)", (request_id, path, kind, "running", _ts(utcnow())))])

    async def step_attempt(self, request_id: str, path: str, attempts: int) -> None:
        await self._commit([("UPDATE scenario_steps SET attempts = ? WHERE request_id = ? AND path = ?",
                             (attempts, request_id, path))])

    async def finish_step(self, request_id: str, path: str, *, outcome: str, ok: bool, detail: str,
                          mails: tuple["OutboxEntry", ...] | list["OutboxEntry"] = ()) -> None:
        """A step ended; ``mails`` (a notify step's note) are queued in the same transaction, so a
        crash neither loses nor repeats them."""
        now = _ts(utcnow())
        statements: Statements = [
            ("UPDATE scenario_steps SET state = 'done', outcome = ?, ok = ?, detail = ?, ended_at = ?"
             " WHERE request_id = ? AND path = ?", (outcome, int(ok), detail, now, request_id, path)),
            ("INSERT INTO stages VALUES (?,?,?,?)", (request_id, now, "step", f"{path} {outcome} {detail}")),
        ]
        for mail in mails:
            statements += _outbox_insert(mail)
        await self._commit(statements)

    async def ask_by_mail(self, request_id: str, path: str, *, token: str, asked: str,
                          inquiry: "OutboxEntry") -> None:
        """A confirm step's inquiry mail is queued and its reply token recorded, together."""
        statements: Statements = [("UPDATE scenario_steps SET token = ?, asked = ? WHERE request_id = ? AND path = ?",
                                   (token, asked, request_id, path))]
        await self._commit(statements + _outbox_insert(inquiry))

    async def step_by_token(self, token: str) -> StepRow | None:
        rows = await self._read(self._query, "SELECT * FROM scenario_steps WHERE token = ?", (token,))
        return _step(rows[0]) if rows else None

    async def answer_step(self, request_id: str, path: str, answer: str, by: str) -> bool:
        """Record the answer to a waiting confirm step; False when it had one already or has ended."""
        def write() -> bool:
            assert self._db is not None
            with _patient(self._db):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    changed = self._db.execute(
                        "UPDATE scenario_steps SET answer = ?, answered_by = ? WHERE request_id = ? AND path = ?"
                        " AND state = 'running' AND answer IS NULL", (answer, by, request_id, path)).rowcount
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            return changed == 1
        async with self._writing:
            return await self._run(write)


    # --- call history, customers, absence (mailgw/callhistory.py, customers.py, absence.py) ------
    # Tables in ABSENCE_SCHEMA at the end of this module.

    async def record_incoming(self, calls: list["IncomingRow"], notices: list["NoticeRow"],
                              recordings: dict[str, str] | None = None) -> None:
        """Write the latest snapshot of each incoming call, and the missed-call notices decided
        for the ones that ended, in one transaction (a notice exists iff its call's end does);
        ``recordings``: call id -> where the PBX put its recording."""
        statements: Statements = [(
            "INSERT INTO incoming_calls (id, started_at, caller, caller_key, caller_name, exten, rung, answered_by,"
            " answered_at, ended_at, cause, ended_unseen, customer_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT(id) DO UPDATE SET caller = excluded.caller, caller_key = excluded.caller_key,"
            " caller_name = excluded.caller_name, rung = excluded.rung, answered_by = excluded.answered_by,"
            " answered_at = excluded.answered_at, ended_at = excluded.ended_at, cause = excluded.cause,"
            " ended_unseen = excluded.ended_unseen, customer_id = excluded.customer_id"
            " WHERE incoming_calls.ended_at IS NULL",
            (c.id, _ts(c.started_at), c.caller, c.caller_key, c.caller_name, c.exten, ",".join(c.rung),
             c.answered_by, _ts(c.answered_at), _ts(c.ended_at), c.cause, int(c.ended_unseen), c.customer_id))
            for c in calls]
        statements += [("INSERT OR REPLACE INTO incoming_recordings VALUES (?, ?)", item)
                       for item in (recordings or {}).items()]
        now = _ts(utcnow())
        statements += [_notice_insert(n, now) for n in notices]
        await self._commit(statements)

    async def recording_of(self, call_id: str) -> str | None:
        """Where the PBX put the call's recording (a path or URL), if it made one."""
        rows = await self._read(self._query, "SELECT location FROM incoming_recordings WHERE call_id = ?", (call_id,))
        return rows[0][0] if rows else None

    async def mark_called_back(self, caller_key: str, extension: str, at: datetime) -> list[str]:
        """The missed calls from ``caller_key`` (nobody answered, ended before ``at``, not yet
        followed up) are marked called back by ``extension``; their ids. Every answered call asks,
        so the lookup (indexed by caller) runs on the loop (``_read_here``)."""
        rows = await self._read_here(self._query, "SELECT id FROM incoming_calls i WHERE caller_key = ?"
                                     " AND answered_by IS NULL AND ended_at IS NOT NULL AND ended_at <= ?"
                                     " AND NOT EXISTS (SELECT 1 FROM callbacks c WHERE c.call_id = i.id)",
                                     (caller_key, _ts(at)))
        ids = [r[0] for r in rows]
        if ids:
            await self._commit([("INSERT OR IGNORE INTO callbacks VALUES (?, ?, ?)", (i, _ts(at), extension))
                                for i in ids])
        return ids

    async def callbacks_of(self, call_ids: list[str]) -> dict[str, tuple[datetime, str]]:
        """call id -> (when, by which extension) it was called back, for those of ``call_ids`` that were."""
        if not call_ids:
            return {}
        rows = await self._read(self._query, f"SELECT * FROM callbacks WHERE call_id IN ({','.join('?' * len(call_ids))})",
                               tuple(call_ids))
        return {r["call_id"]: (_dt(r["at"]), r["by_extension"]) for r in rows}  # type: ignore[misc]

    async def open_incoming(self) -> list["IncomingRow"]:
        """Incoming calls recorded as not yet ended (the gateway lost sight of them)."""
        rows = await self._read(self._query, "SELECT * FROM incoming_calls WHERE ended_at IS NULL ORDER BY started_at")
        return [_incoming(r) for r in rows]

    async def incoming_call(self, call_id: str) -> "IncomingRow | None":
        rows = await self._read(self._query, "SELECT * FROM incoming_calls WHERE id = ?", (call_id,))
        return _incoming(rows[0]) if rows else None

    async def list_incoming(self, *, caller_key: str | None = None, before: datetime | None = None,
                            limit: int = 20) -> list["IncomingRow"]:
        """Newest first; only from ``caller_key`` and started before ``before`` when given."""
        where, params = ["1"], []
        if caller_key is not None:
            where.append("caller_key = ?")
            params.append(caller_key)
        if before is not None:
            where.append("started_at < ?")
            params.append(_ts(before))
        rows = await self._read(self._query, f"SELECT * FROM incoming_calls WHERE {' AND '.join(where)}"
                               " ORDER BY started_at DESC LIMIT ?", (*params, limit))
        return [_incoming(r) for r in rows]

    async def replace_customers(self, customers: list[dict[str, Any]]) -> None:
        """The customer database becomes ``customers`` (each a mapping of CUSTOMER_COLUMNS plus
        ``numbers``: normalised phone and fax numbers), in one transaction."""
        statements: Statements = [("DELETE FROM customer_numbers", ()), ("DELETE FROM customers", ())]
        for index, customer in enumerate(customers, start=1):
            statements.append((f"INSERT INTO customers (id, {', '.join(CUSTOMER_COLUMNS)}) VALUES "
                               f"(?, {', '.join('?' for _ in CUSTOMER_COLUMNS)})",
                               (index, *(customer.get(c) for c in CUSTOMER_COLUMNS))))
            statements += [("INSERT INTO customer_numbers VALUES (?, ?)", (number, index))
                           for number in customer["numbers"]]
        await self._commit(statements)

    async def customer(self, *, number: str | None = None, id: int | None = None) -> dict[str, Any] | None:
        if number is not None:
            sql, param = ("SELECT c.* FROM customers c JOIN customer_numbers n ON n.customer_id = c.id"
                          " WHERE n.number = ?"), number
        else:
            sql, param = "SELECT * FROM customers WHERE id = ?", id
        rows = await self._read(self._query, sql, (param,))
        return dict(rows[0]) if rows else None

    async def count_customers(self) -> int:
        rows = await self._read(self._query, "SELECT COUNT(*) FROM customers")
        return int(rows[0][0])

    async def set_absence(self, address: str, *, until: datetime | None, note: str, source: str,
                          mail: OutboxEntry | None = None) -> None:
        """Absence mode on (with ``mail``, its confirmation queued in the same transaction)."""
        now = _ts(utcnow())
        statements: Statements = [(
            "INSERT INTO absences (address, since, until, note, source) VALUES (?,?,?,?,?)"
            " ON CONFLICT(address) DO UPDATE SET since = excluded.since, until = excluded.until,"
            " note = excluded.note, source = excluded.source", (address, now, _ts(until), note, source))]
        await self._commit(statements + (_outbox_insert(mail) if mail else []))

    async def clear_absence(self, address: str, *, mail: OutboxEntry | None = None) -> bool:
        rows = await self._read(self._query, "SELECT 1 FROM absences WHERE address = ?", (address,))
        await self._commit([("DELETE FROM absences WHERE address = ?", (address,)),
                            *(_outbox_insert(mail) if mail else [])])
        return bool(rows)

    async def absences(self) -> list[tuple[str, datetime, datetime | None, str, str]]:
        """(address, since, until, note, source) of everyone marked absent (expired ones too)."""
        rows = await self._read(self._query, "SELECT * FROM absences ORDER BY address")
        return [(r["address"], _dt(r["since"]), _dt(r["until"]), r["note"], r["source"]) for r in rows]  # type: ignore[misc]

    async def pending_notices(self, limit: int = 2000) -> list["NoticeRow"]:
        rows = await self._read(self._query, "SELECT * FROM absence_notices WHERE state = 'pending'"
                               " ORDER BY created_at, call_id LIMIT ?", (limit,))  # oldest first
        return [_notice(r) for r in rows]

    async def memo_of(self, call_id: str) -> str | None:
        """The memo written on a call (with who wrote it), or None."""
        rows = await self._read(self._query, "SELECT memo FROM absence_notices WHERE call_id = ? AND kind = 'memo'",
                               (call_id,))
        return rows[0][0] if rows else None

    async def last_answered_by(self, extension: str, since: datetime) -> "IncomingRow | None":
        """The latest incoming call ``extension`` answered that started after ``since``."""
        rows = await self._read(self._query, "SELECT * FROM incoming_calls WHERE answered_by = ? AND started_at >= ?"
                               " ORDER BY started_at DESC LIMIT 1", (extension, _ts(since)))
        return _incoming(rows[0]) if rows else None

    async def add_memo(self, notice: "NoticeRow") -> bool:
        """Record a colleague's memo on a call (sent by the mailer); False if the call has one already."""
        rows = await self._read(self._query, "SELECT 1 FROM absence_notices WHERE call_id = ? AND kind = 'memo'",
                               (notice.call_id,))
        if rows:
            return False
        await self._commit([_notice_insert(notice, _ts(utcnow()))])
        return True

    async def notice_queued(self, notices: list["NoticeRow"], mail: OutboxEntry | None, *, state: str = "queued",
                            detail: str = "") -> None:
        """The notices' mail (one each, or one digest for all) is in the outbox: one transaction
        with the outbox row. Or, with ``mail`` None, they failed."""
        now = _ts(utcnow())
        statements: Statements = [("UPDATE absence_notices SET state = ?, outbox_id = ?, detail = ?, updated_at = ?"
                                   " WHERE call_id = ? AND kind = ? AND state = 'pending'",
                                   (state, mail.id if mail else None, detail, now, n.call_id, n.kind))
                                  for n in notices]
        if mail is not None:
            statements += _outbox_insert(mail)
        await self._commit(statements)

    async def notices(self) -> list["NoticeRow"]:
        rows = await self._read(self._query, "SELECT * FROM absence_notices ORDER BY created_at, call_id")
        return [_notice(r) for r in rows]


@dataclass(frozen=True)
class CallEnd:
    """How one placed call ended, as the calls table records it."""

    call_id: str
    outcome: str
    failed_party: str | None = None
    cause: int | None = None
    from_answered_at: datetime | None = None
    to_answered_at: datetime | None = None
    ended_at: datetime | None = None


def _call_insert(call_id: str, request_id: str, from_number: str, to_number: str) -> tuple[str, tuple[Any, ...]]:
    return ("INSERT INTO calls (id, request_id, from_number, to_number, placed_at) VALUES (?,?,?,?,?)",
            (call_id, request_id, from_number, to_number, _ts(utcnow())))


def _call_finish(end: CallEnd) -> tuple[str, tuple[Any, ...]]:
    return ("UPDATE calls SET outcome = ?, failed_party = ?, cause = ?, from_answered_at = ?, to_answered_at = ?,"
            " ended_at = ? WHERE id = ?",
            (end.outcome, end.failed_party, end.cause, _ts(end.from_answered_at), _ts(end.to_answered_at),
             _ts(end.ended_at or utcnow()), end.call_id))


@dataclass(frozen=True)
class OutboxEntry:
    id: str
    request_id: str | None
    mail_from: str
    rcpt_to: str
    path: Path  # already written durably
    # instead: the mail itself, kept in the store (relay_content for a relayed copy, else outbox_content)
    content: bytes | None = field(default=None, repr=False)


def _outbox_insert(entry: OutboxEntry, *, content_table: str = "outbox_content") -> list[tuple[str, tuple[Any, ...]]]:
    now = _ts(utcnow())
    statements: list[tuple[str, tuple[Any, ...]]] = [(
        "INSERT INTO outbox (id, created_at, request_id, mail_from, rcpt_to, path, state, next_try)"
        " VALUES (?,?,?,?,?,?,'queued',?)",
        (entry.id, now, entry.request_id, entry.mail_from, entry.rcpt_to, str(entry.path), now))]
    if entry.content is not None:
        statements.append((f"INSERT INTO {content_table} (id, content) VALUES (?,?)", (entry.id, entry.content)))
    if entry.request_id is not None:
        statements.append(("INSERT INTO stages VALUES (?,?,?,?)",
                           (entry.request_id, now, "mail-queued", f"to {entry.rcpt_to}")))
    return statements


def _message(r: sqlite3.Row) -> MessageRow:
    return MessageRow(
        id=r["id"], received_at=_dt(r["received_at"]), mail_from=r["mail_from"], rcpt_to=r["rcpt_to"],  # type: ignore[arg-type]
        spool_path=Path(r["spool_path"]), size=r["size"], kind=r["kind"], state=MessageState(r["state"]),
        sender=r["sender"], request=json.loads(r["request"]) if r["request"] else None,
        outcome=r["outcome"], status=r["status"], detail=r["detail"], not_before=_dt(r["not_before"]),
    )


def _call(r: sqlite3.Row) -> CallRow:
    return CallRow(
        id=r["id"], request_id=r["request_id"], from_number=r["from_number"], to_number=r["to_number"],
        placed_at=_dt(r["placed_at"]), outcome=r["outcome"], failed_party=r["failed_party"], cause=r["cause"],  # type: ignore[arg-type]
        from_answered_at=_dt(r["from_answered_at"]), to_answered_at=_dt(r["to_answered_at"]),
        ended_at=_dt(r["ended_at"]),
    )


def _outbox(r: sqlite3.Row) -> OutboxRow:
    return OutboxRow(
        id=r["id"], created_at=_dt(r["created_at"]), request_id=r["request_id"], mail_from=r["mail_from"],  # type: ignore[arg-type]
        rcpt_to=r["rcpt_to"], path=Path(r["path"]), state=r["state"], attempts=r["attempts"],
        next_try=_dt(r["next_try"]), last_error=r["last_error"],  # type: ignore[arg-type]
        deadline=_dt(r["deadline"]) if "deadline" in r.keys() else None,
    )



# --- camp-on (mailgw/campon.py) ---------------------------------------------------------------------
# Kept apart from the core tables above: the camp-on runner's durable state. A pending camp-on is a
# row whose state is not 'done'; its timers are next_attempt and deadline. Every attempt is also a
# row in ``calls`` (id <request id>-<attempt>), written before the Originate like any other call.

CAMPON_SCHEMA = """
CREATE TABLE IF NOT EXISTS campons (
    id               TEXT PRIMARY KEY REFERENCES messages(id),  -- the request id
    kind             TEXT NOT NULL,       -- 'campon' (connect when free) or 'monitor' (status monitor)
    sender           TEXT NOT NULL,       -- normalised address of the requester: who may cancel
    caller           TEXT,                -- the number called first; NULL for a monitor
    target           TEXT NOT NULL,       -- the destination (camp-on) or the watched phone (monitor)
    mode             TEXT NOT NULL,       -- retry | watch | monitor
    priority         TEXT NOT NULL,       -- normal | express
    state            TEXT NOT NULL,       -- waiting (before 'at') | camping | dialling | done
    attempts         INTEGER NOT NULL DEFAULT 0,  -- calls that reached the PBX
    calls            INTEGER NOT NULL DEFAULT 0,  -- call rows written: the last call id is <id>-<calls>
    created_at       TEXT NOT NULL,
    next_attempt     TEXT NOT NULL,       -- not before this time (retry: the next redial)
    deadline         TEXT NOT NULL,       -- the end of the monitor window
    last_outcome     TEXT,                -- outcome of the last attempt (busy, no-answer, ...)
    cancel_requested TEXT,                -- who asked to cancel (mail or `mailgw campons cancel`)
    outcome          TEXT,                -- how it ended (answered, expired, cancelled, ...)
    ended_at         TEXT,
    notice_id        TEXT,                -- Message-ID of the "camping on" mail: replies cancel
    reported_at      TEXT,                -- status monitor: when the last mail went out
    updated_at       TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS campons_pair ON campons(caller, target) WHERE state != 'done' AND kind = 'campon';
CREATE INDEX IF NOT EXISTS campons_pending ON campons(state) WHERE state != 'done';
"""

CAMPON_COLUMNS = ("state", "attempts", "calls", "next_attempt", "last_outcome", "cancel_requested", "notice_id",
                  "reported_at")


@dataclass(frozen=True)
class CamponRow:
    id: str
    rowid: int                  # arrival order: first come, first served
    kind: str
    sender: str
    caller: str | None
    target: str
    mode: str
    priority: str
    state: str
    attempts: int
    calls: int
    created_at: datetime
    next_attempt: datetime
    deadline: datetime
    last_outcome: str | None
    cancel_requested: str | None
    outcome: str | None
    ended_at: datetime | None
    notice_id: str | None
    reported_at: datetime | None
    confidential: bool = True  # from the request; unknown counts as confidential


def _campon(r: sqlite3.Row) -> CamponRow:
    return CamponRow(
        id=r["id"], rowid=r["rowid"], kind=r["kind"], sender=r["sender"], caller=r["caller"], target=r["target"],
        mode=r["mode"], priority=r["priority"], state=r["state"], attempts=r["attempts"], calls=r["calls"],
        created_at=_dt(r["created_at"]), next_attempt=_dt(r["next_attempt"]),  # type: ignore[arg-type]
        deadline=_dt(r["deadline"]), last_outcome=r["last_outcome"],  # type: ignore[arg-type]
        cancel_requested=r["cancel_requested"], outcome=r["outcome"], ended_at=_dt(r["ended_at"]),
        notice_id=r["notice_id"], reported_at=_dt(r["reported_at"]),
        confidential=bool(r["confidential"]) if "confidential" in r.keys() else True,
    )


def _campon_value(column: str, value: Any) -> Any:
    return _ts(value) if isinstance(value, datetime) else value


def _finish_call_sql(call_id: str, *, outcome: str, failed_party: str | None, cause: int | None,
                     from_answered_at: datetime | None, to_answered_at: datetime | None,
                     ended_at: datetime) -> tuple[str, tuple[Any, ...]]:
    return ("UPDATE calls SET outcome = ?, failed_party = ?, cause = ?, from_answered_at = ?, to_answered_at = ?,"
            " ended_at = ? WHERE id = ?",
            (outcome, failed_party, cause, _ts(from_answered_at), _ts(to_answered_at), _ts(ended_at), call_id))


# --- call history, customers and absence (mailgw/callhistory.py, customers.py, absence.py) ----------
# Every incoming call from outside is a row of incoming_calls, written when it starts and updated as
# it rings, is answered and ends. A missed call that needs a mail gets its absence_notices row in
# the same transaction as its end; the mailer turns 'pending' into 'queued' together with the
# outbox row, so a restart neither loses nor repeats one.

ABSENCE_SCHEMA = """
CREATE TABLE IF NOT EXISTS incoming_calls (
    id           TEXT PRIMARY KEY,   -- the trunk channel's Uniqueid (Linkedid of the call)
    started_at   TEXT NOT NULL,
    caller       TEXT,               -- the number as the network gave it; NULL: withheld
    caller_key   TEXT,               -- the same in E.164 (phonenumbers), to match customers and history
    caller_name  TEXT,
    exten        TEXT NOT NULL,      -- the number it came in on
    rung         TEXT NOT NULL DEFAULT '',  -- extensions rung, comma-separated, in order
    answered_by  TEXT,               -- extension that answered; NULL: nobody (yet)
    answered_at  TEXT,
    ended_at     TEXT,
    cause        INTEGER,            -- Q.850 cause of the caller's hang-up
    ended_unseen INTEGER NOT NULL DEFAULT 0,  -- found gone after a restart/reconnect: end time approximate
    customer_id  INTEGER
);
CREATE INDEX IF NOT EXISTS incoming_calls_caller ON incoming_calls(caller_key, started_at);
CREATE INDEX IF NOT EXISTS incoming_calls_open ON incoming_calls(ended_at) WHERE ended_at IS NULL;

CREATE TABLE IF NOT EXISTS customers (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL,     -- the customer (company)
    department    TEXT,
    contact       TEXT,              -- the customer's contact person
    phone         TEXT,              -- as written in the imported file
    fax           TEXT,
    address       TEXT,
    importance    TEXT,
    owner         TEXT,              -- our person in charge
    owner_address TEXT,              -- their mail address (normalised)
    language      TEXT               -- language of the missed-call mail (default: the owner's)
);
CREATE TABLE IF NOT EXISTS customer_numbers (
    number      TEXT PRIMARY KEY,    -- E.164
    customer_id INTEGER NOT NULL REFERENCES customers(id)
);

CREATE TABLE IF NOT EXISTS absences (
    address TEXT PRIMARY KEY,        -- normalised mail address of the person
    since   TEXT NOT NULL,
    until   TEXT,                    -- NULL: until cleared
    note    TEXT NOT NULL DEFAULT '',
    source  TEXT NOT NULL            -- cli, mail, pbx
);

CREATE TABLE IF NOT EXISTS absence_notices (
    call_id    TEXT NOT NULL REFERENCES incoming_calls(id),
    kind       TEXT NOT NULL DEFAULT 'missed',  -- missed (one per missed call) | memo (a colleague's note)
    recipient  TEXT NOT NULL,
    language   TEXT NOT NULL,
    reason     TEXT NOT NULL,        -- absent | unanswered | memo
    memo       TEXT NOT NULL DEFAULT '',  -- the memo text (kind memo), with who wrote it
    state      TEXT NOT NULL,        -- pending (to compose) | queued (in the outbox) | failed
    outbox_id  TEXT,
    detail     TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (call_id, kind)
);
CREATE INDEX IF NOT EXISTS absence_notices_pending ON absence_notices(state) WHERE state = 'pending';

CREATE TABLE IF NOT EXISTS callbacks (  -- a missed call followed up: its caller was called back
    call_id      TEXT PRIMARY KEY REFERENCES incoming_calls(id),
    at           TEXT NOT NULL,      -- when the outgoing call was answered
    by_extension TEXT NOT NULL       -- the extension that called
);

CREATE TABLE IF NOT EXISTS incoming_recordings (
    call_id  TEXT PRIMARY KEY REFERENCES incoming_calls(id),
    location TEXT NOT NULL           -- path or URL of the recording, as the PBX's channel variable gave it
);
"""

CUSTOMER_COLUMNS = ("name", "department", "contact", "phone", "fax", "address", "importance", "owner",
                    "owner_address", "language")


@dataclass(frozen=True)
class IncomingRow:
    id: str
    started_at: datetime
    caller: str | None
    caller_key: str | None
    caller_name: str | None
    exten: str
    rung: tuple[str, ...]
    answered_by: str | None
    answered_at: datetime | None
    ended_at: datetime | None
    cause: int | None
    ended_unseen: bool
    customer_id: int | None


@dataclass(frozen=True)
class NoticeRow:
    call_id: str
    recipient: str
    language: str
    reason: str
    state: str = "pending"
    kind: str = "missed"  # or memo
    memo: str = ""
    created_at: datetime | None = None


def _notice_insert(n: NoticeRow, now: str | None) -> tuple[str, tuple[Any, ...]]:
    return ("INSERT OR IGNORE INTO absence_notices (call_id, kind, recipient, language, reason, memo, state,"
            " created_at, updated_at) VALUES (?,?,?,?,?,?,'pending',?,?)",
            (n.call_id, n.kind, n.recipient, n.language, n.reason, n.memo, now, now))


def _notice(r: sqlite3.Row) -> NoticeRow:
    return NoticeRow(r["call_id"], r["recipient"], r["language"], r["reason"], r["state"], r["kind"], r["memo"],
                     _dt(r["created_at"]))


def _incoming(r: sqlite3.Row) -> IncomingRow:
    return IncomingRow(
        id=r["id"], started_at=_dt(r["started_at"]), caller=r["caller"], caller_key=r["caller_key"],  # type: ignore[arg-type]
        caller_name=r["caller_name"], exten=r["exten"], rung=tuple(x for x in r["rung"].split(",") if x),
        answered_by=r["answered_by"], answered_at=_dt(r["answered_at"]), ended_at=_dt(r["ended_at"]),
        cause=r["cause"], ended_unseen=bool(r["ended_unseen"]), customer_id=r["customer_id"],
    )



# --- scenario steps --------------------------------------------------------------------------------
# One row per step of a request's scenario (path "1", "2.b1.1" for parallel branch 1, "1.B.1" for
# the `on: busy` branch), written when the step starts and again when it ends. A restarted gateway
# skips done steps, resumes waits and inquiries, and never dials a step's call again.

SCENARIO_SCHEMA = """
CREATE TABLE IF NOT EXISTS scenario_steps (
    request_id  TEXT NOT NULL REFERENCES messages(id),
    path        TEXT NOT NULL,
    kind        TEXT NOT NULL,           -- play, fax, connect, confirm, wait, parallel, notify
    state       TEXT NOT NULL,           -- running, done
    attempts    INTEGER NOT NULL DEFAULT 0,
    outcome     TEXT,                    -- answered, busy, ..., yes, no, timeout, done, failed
    ok          INTEGER,
    detail      TEXT NOT NULL DEFAULT '',
    token       TEXT,                    -- confirm by mail: the reply address's token
    asked       TEXT,                    -- confirm by mail: who was asked (only they may answer)
    answer      TEXT,                    -- confirm: yes / no, once it came
    answered_by TEXT,
    started_at  TEXT NOT NULL,
    ended_at    TEXT,
    PRIMARY KEY (request_id, path)
);
CREATE INDEX IF NOT EXISTS scenario_steps_token ON scenario_steps(token);
"""


@dataclass(frozen=True)
class StepRow:
    request_id: str
    path: str
    kind: str
    state: str
    attempts: int
    outcome: str | None
    ok: bool
    detail: str
    token: str | None
    asked: str | None
    answer: str | None
    answered_by: str | None
    started_at: datetime
    ended_at: datetime | None


def _step(r: sqlite3.Row) -> StepRow:
    return StepRow(request_id=r["request_id"], path=r["path"], kind=r["kind"], state=r["state"],
                   attempts=r["attempts"], outcome=r["outcome"], ok=bool(r["ok"]), detail=r["detail"],
                   token=r["token"], asked=r["asked"], answer=r["answer"], answered_by=r["answered_by"],
                   started_at=_dt(r["started_at"]), ended_at=_dt(r["ended_at"]))  # type: ignore[arg-type]
# --- relay (mailgw/relay.py) ------------------------------------------------------------------------
# Relayed mail is an outbox row (the outbox worker delivers it) plus this row: where it goes and the
# moment it is stale (the request's monitor time), after which it is bounced to its sender.

RELAY_SCHEMA = """
CREATE TABLE IF NOT EXISTS relay (
    id           TEXT PRIMARY KEY REFERENCES outbox(id),
    destination  TEXT NOT NULL,          -- the peer domain (destination DB or MX)
    deadline     TEXT NOT NULL           -- give up (and send a DSN) after this
);

-- The relayed copy itself (trace headers, the mail as received), in the same transaction as its
-- rows: one WAL fsync instead of a file's fsync, rename and folder fsync per copy. Copies queued
-- before this table existed are files at outbox.path.
CREATE TABLE IF NOT EXISTS relay_content (
    id       TEXT PRIMARY KEY REFERENCES outbox(id),
    content  BLOB NOT NULL
);
"""



def _relay_inserts(entries: Iterable[tuple[OutboxEntry, str, datetime]]) -> Statements:
    statements: Statements = []
    for entry, destination, deadline in entries:
        statements += _outbox_insert(entry, content_table="relay_content")
        statements.append(("INSERT INTO relay (id, destination, deadline) VALUES (?,?,?)",
                           (entry.id, destination, _ts(deadline))))
    return statements


OUTBOX_SELECT = "SELECT outbox.*, relay.destination, relay.deadline FROM outbox LEFT JOIN relay USING (id)"
