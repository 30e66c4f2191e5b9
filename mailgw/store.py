"""The durable store: every request, call attempt, stage and outgoing mail, in SQLite.

All SQL lives here, so a later PostgreSQL store replaces this one module. SQLite runs on one
dedicated thread (``sqlite3`` objects must stay on the thread that made them, and its calls block),
so the event loop never waits on the disk; callers ``await`` plain methods. WAL with
``synchronous=FULL`` makes every commit durable before the awaiting caller goes on: ingress may
only answer 250 after ``add_message`` returned.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")
Statements = list[tuple[str, tuple[Any, ...]]]

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
CREATE INDEX IF NOT EXISTS messages_sender ON messages(sender, received_at);

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
"""


class MessageState(StrEnum):
    QUEUED = "queued"          # stored, waiting for its stage to run
    EXECUTING = "executing"    # the PBX is being asked
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


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat(timespec="microseconds") if value else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


class Store:
    """One SQLite database file; every method is a coroutine run on the store's own thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailgw-store")
        self._db: sqlite3.Connection | None = None
        # Called on the event loop after a stage is durably recorded: (request_id, stage, detail).
        self.stage_listeners: list[Callable[[str, str, str], None]] = []
        self._pending: list[tuple[Statements, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await self._run(self._open)

    def _open(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(SCHEMA)
        self._db = db

    async def close(self) -> None:
        if self._flusher is not None:
            await self._flusher
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _commit(self, statements: Statements) -> None:
        """Commit ``statements`` as one atomic transaction, durably, then tell stage listeners.

        Group commit: transactions that arrive while a batch is being written wait for the next
        batch and share its single fsync. Each keeps its own atomicity through a SAVEPOINT, so one
        failing transaction does not take the others with it.
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
            try:
                errors = await self._run(self._write_batch, [statements for statements, _ in batch])
            except BaseException as exc:  # the COMMIT itself failed: nothing of the batch is durable
                errors = [exc] * len(batch)
            for (_, done), error in zip(batch, errors):
                if done.done():
                    continue
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)

    def _write_batch(self, batch: list[Statements]) -> list[BaseException | None]:
        assert self._db is not None
        errors: list[BaseException | None] = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statements in batch:
                self._db.execute("SAVEPOINT one")
                try:
                    for sql, params in statements:
                        self._db.execute(sql, params)
                except sqlite3.Error as exc:
                    self._db.execute("ROLLBACK TO one")
                    errors.append(exc)
                else:
                    errors.append(None)
                self._db.execute("RELEASE one")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return errors

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        assert self._db is not None
        return self._db.execute(sql, params).fetchall()

    # --- messages -------------------------------------------------------------------------------

    async def add_messages(self, messages: list[NewMessage]) -> None:
        """Record accepted messages durably (with their 'received' stage), all or nothing."""
        now = _ts(utcnow())
        statements: list[tuple[str, tuple[Any, ...]]] = []
        for m in messages:
            statements.append((
                "INSERT INTO messages (id, received_at, mail_from, rcpt_to, spool_path, size, kind, state,"
                " sender, request, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (m.id, now, m.mail_from, m.rcpt_to, str(m.spool_path), m.size, m.kind, MessageState.QUEUED,
                 m.sender, json.dumps(m.request, ensure_ascii=False) if m.request is not None else None, now),
            ))
            statements.append(("INSERT INTO stages VALUES (?,?,?,?)", (m.id, now, "received", "")))
        await self._commit(statements)

    async def get_message(self, message_id: str) -> MessageRow | None:
        rows = await self._run(self._query, "SELECT * FROM messages WHERE id = ?", (message_id,))
        return _message(rows[0]) if rows else None

    async def unfinished_messages(self) -> list[MessageRow]:
        """Everything a restarted gateway must pick up again, oldest first."""
        rows = await self._run(
            self._query, "SELECT * FROM messages WHERE state IN (?, ?) ORDER BY received_at, id",
            (MessageState.QUEUED, MessageState.EXECUTING))
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
        rows = await self._run(self._query, "SELECT at, stage, detail FROM stages WHERE request_id = ?"
                               " ORDER BY rowid", (message_id,))
        return [(_dt(r["at"]), r["stage"], r["detail"]) for r in rows]  # type: ignore[misc]

    async def count_requests_since(self, sender: str, since: datetime) -> int:
        rows = await self._run(self._query, "SELECT COUNT(*) FROM messages WHERE sender = ? AND kind = 'request'"
                               " AND received_at >= ?", (sender, _ts(since)))
        return int(rows[0][0])

    async def list_messages(self, limit: int = 50) -> list[MessageRow]:
        rows = await self._run(self._query, "SELECT * FROM messages ORDER BY received_at DESC, id DESC LIMIT ?",
                               (limit,))
        return [_message(r) for r in rows]

    # --- calls ----------------------------------------------------------------------------------

    async def add_call(self, call_id: str, request_id: str, from_number: str, to_number: str) -> None:
        await self._commit([(
            "INSERT INTO calls (id, request_id, from_number, to_number, placed_at) VALUES (?,?,?,?,?)",
            (call_id, request_id, from_number, to_number, _ts(utcnow())))])

    async def finish_call(self, call_id: str, *, outcome: str, failed_party: str | None, cause: int | None,
                          from_answered_at: datetime | None, to_answered_at: datetime | None,
                          ended_at: datetime) -> None:
        await self._commit([(
            "UPDATE calls SET outcome = ?, failed_party = ?, cause = ?, from_answered_at = ?, to_answered_at = ?,"
            " ended_at = ? WHERE id = ?",
            (outcome, failed_party, cause, _ts(from_answered_at), _ts(to_answered_at), _ts(ended_at), call_id))])

    async def calls_for(self, request_id: str) -> list[CallRow]:
        rows = await self._run(self._query, "SELECT * FROM calls WHERE request_id = ? ORDER BY placed_at, id",
                               (request_id,))
        return [_call(r) for r in rows]

    # --- outbox ---------------------------------------------------------------------------------

    async def add_outbox(self, entry: "OutboxEntry") -> None:
        await self._commit(_outbox_insert(entry))

    async def finish_request(self, message_id: str, state: MessageState, *, outcome: str, status: str,
                             detail: str, notification: "OutboxEntry | None") -> None:
        """Record how a request ended and queue its notification in one transaction, so a crash
        can neither lose the notification nor send it twice."""
        now = _ts(utcnow())
        statements: list[tuple[str, tuple[Any, ...]]] = [
            ("UPDATE messages SET state = ?, outcome = ?, status = ?, detail = ?, updated_at = ? WHERE id = ?",
             (state, outcome, status, detail, now, message_id)),
            ("INSERT INTO stages VALUES (?,?,?,?)", (message_id, now, "outcome", f"{outcome} ({status}) {detail}")),
        ]
        if notification is not None:
            statements += _outbox_insert(notification)
        await self._commit(statements)

    async def due_outbox(self, now: datetime) -> list[OutboxRow]:
        rows = await self._run(self._query, "SELECT * FROM outbox WHERE state = 'queued' AND next_try <= ?"
                               " ORDER BY next_try, id", (_ts(now),))
        return [_outbox(r) for r in rows]

    async def next_outbox_time(self) -> datetime | None:
        rows = await self._run(self._query, "SELECT MIN(next_try) FROM outbox WHERE state = 'queued'")
        return _dt(rows[0][0])

    async def outbox_sent(self, outbox_id: str) -> None:
        await self._commit([("UPDATE outbox SET state = 'sent', attempts = attempts + 1,"
                                       " last_error = NULL WHERE id = ?", (outbox_id,))])

    async def outbox_retry(self, outbox_id: str, error: str, next_try: datetime | None) -> None:
        """Record a failed attempt; with no next_try the mail has failed for good."""
        if next_try is None:
            sql, params = ("UPDATE outbox SET state = 'failed', attempts = attempts + 1, last_error = ?"
                           " WHERE id = ?", (error, outbox_id))
        else:
            sql, params = ("UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_try = ? WHERE id = ?",
                           (error, _ts(next_try), outbox_id))
        await self._commit([(sql, params)])

    async def outbox_for(self, request_id: str) -> list[OutboxRow]:
        rows = await self._run(self._query, "SELECT * FROM outbox WHERE request_id = ? ORDER BY created_at, id",
                               (request_id,))
        return [_outbox(r) for r in rows]


@dataclass(frozen=True)
class OutboxEntry:
    id: str
    request_id: str | None
    mail_from: str
    rcpt_to: str
    path: Path  # already written durably


def _outbox_insert(entry: OutboxEntry) -> list[tuple[str, tuple[Any, ...]]]:
    now = _ts(utcnow())
    statements: list[tuple[str, tuple[Any, ...]]] = [(
        "INSERT INTO outbox (id, created_at, request_id, mail_from, rcpt_to, path, state, next_try)"
        " VALUES (?,?,?,?,?,?,'queued',?)",
        (entry.id, now, entry.request_id, entry.mail_from, entry.rcpt_to, str(entry.path), now))]
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
    )


def hour_ago(now: datetime | None = None) -> datetime:
    return (now or utcnow()) - timedelta(hours=1)
