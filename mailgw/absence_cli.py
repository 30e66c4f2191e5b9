"""``mailgw customers``, ``mailgw absence`` and ``mailgw calls``: the missed-call mail's data.

    mailgw customers import FILE       replace the customer database with a CSV or YAML file;
                                       prints how many were imported and every rejected row
    mailgw customers [--json]          list the customer database
    mailgw absence set USER [--until TIME] [--note TEXT]   put a person in absence mode
    mailgw absence clear USER          end it
    mailgw absence                     who is absent now
    mailgw calls [--limit N]           recent incoming calls (call history)
    mailgw memo CALL [--phrase N]... [--text TEXT] [--by NAME]
                                       a memo about a call (CALL: its id from `mailgw calls`, or
                                       `last`), mailed to the customer's person in charge;
                                       `mailgw memo --phrases` lists the fixed phrases

``USER`` is a mail address or a directory person's local part (``yamada``). ``--until`` takes an
ISO 8601 time (``2026-12-24T18:00``, local time unless it says otherwise) or a duration (``2h``).
All of them work on the store, with or without a running gateway; a running gateway sees a change
at the next call. Every command takes ``--config FILE`` and ``--data DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .campon_cli import _options
from .config import load_config
from .customers import parse_customers, read_entries
from .directory import load_directory, normalise_address

EX_DATAERR = 65


def register(subparsers: Any) -> None:
    customers = subparsers.add_parser("customers", help="import or list the customer database",
                                      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _options(customers)
    customers.add_argument("--json", action="store_true", help="machine-readable output")
    customers.set_defaults(run=_list_customers)
    actions = customers.add_subparsers(dest="customers_action", metavar="ACTION")
    load = actions.add_parser("import", help="replace the customer database with a CSV or YAML file")
    load.add_argument("file", type=Path)
    _options(load)
    load.set_defaults(run=_import)

    absence = subparsers.add_parser("absence", help="absence mode: who gets missed-call mail",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _options(absence)
    absence.set_defaults(run=_list_absent)
    modes = absence.add_subparsers(dest="absence_action", metavar="ACTION")
    put = modes.add_parser("set", help="put a person in absence mode")
    put.add_argument("user", help="mail address or directory local part")
    put.add_argument("--until", metavar="TIME", help="ISO 8601 time or a duration such as 2h (default: until cleared)")
    put.add_argument("--note", default="", help="a note shown in their missed-call mail")
    _options(put)
    put.set_defaults(run=_set_absent)
    clear = modes.add_parser("clear", help="end a person's absence mode")
    clear.add_argument("user")
    _options(clear)
    clear.set_defaults(run=_clear_absent)

    memo = subparsers.add_parser("memo", help="a memo about a call, mailed to the person in charge",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    memo.add_argument("call", nargs="?", help="the call's id (mailgw calls --ids) or 'last'")
    memo.add_argument("--phrase", type=int, action="append", default=[], metavar="N",
                      help="a fixed phrase by its number (repeatable; see --phrases)")
    memo.add_argument("--text", default="", help="free text")
    memo.add_argument("--by", default="", help="who took the call (default: the extension that answered)")
    memo.add_argument("--phrases", action="store_true", help="list the fixed phrases and exit")
    _options(memo)
    memo.set_defaults(run=_memo)

    calls = subparsers.add_parser("calls", help="recent incoming calls (call history)")
    calls.add_argument("--limit", type=int, default=20)
    calls.add_argument("--ids", action="store_true", help="show each call's id (for mailgw memo)")
    _options(calls)
    calls.set_defaults(run=_calls)


async def _with_store(args: argparse.Namespace, work: Any) -> Any:
    from .store import Store

    config = load_config(args.config, data_dir=args.data)
    store = Store(config.data_dir / "mailgw.sqlite3")
    await store.open()
    try:
        return await work(store)
    finally:
        await store.close()


def _import(args: argparse.Namespace) -> int:
    config = load_config(args.config, data_dir=args.data)
    try:
        result = parse_customers(read_entries(args.file), config.numbering.region)
    except (OSError, ValueError) as exc:
        print(f"mailgw customers import: {exc}", file=sys.stderr)
        return EX_DATAERR
    asyncio.run(_with_store(args, lambda store: store.replace_customers([c.row() for c in result.customers])))
    print(f"imported {len(result.customers)} customer(s) from {args.file}; rejected {len(result.rejected)} row(s)")
    for rejected in result.rejected:
        print(f"  {args.file}: {rejected.where}: {rejected.reason}")
    return 0 if not result.rejected else 1


def _list_customers(args: argparse.Namespace) -> int:
    async def work(store: Any) -> list[dict[str, Any]]:
        count = await store.count_customers()
        return [c for i in range(1, count + 1) if (c := await store.customer(id=i))]

    rows = asyncio.run(_with_store(args, work))
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return 0
    if not rows:
        print("no customers (mailgw customers import FILE)")
    for c in rows:
        print(f"{c['name']:24} {c['contact'] or '-':16} {c['phone'] or '-':16} in charge: {c['owner_address'] or '-'}")
    return 0


def resolve_user(args: argparse.Namespace) -> str | None:
    """A mail address for ``args.user``: as given, or a directory person's by local part."""
    if "@" in args.user:
        return normalise_address(args.user)
    directory = load_directory(load_config(args.config, data_dir=args.data).directory)
    for person in directory.people:
        if person.local_part.lower() == args.user.lower():
            return person.address
    return None


def parse_until(text: str, now: datetime) -> datetime:
    """``2h`` → now + 2 h; ``18:00`` → the next 18:00; ``2026-12-24T18:00`` → then (local time
    unless an offset is given). As the ``absent until ...`` mail command reads it."""
    from .absence_mailcmd import parse_until as read_until

    until = read_until(text.split(), now)
    if until is None:
        raise ValueError("no time given")
    return until


def _set_absent(args: argparse.Namespace) -> int:
    address = resolve_user(args)
    if address is None:
        print(f"mailgw absence: {args.user!r} is not a mail address or a person in the directory", file=sys.stderr)
        return EX_DATAERR
    until = None
    if args.until:
        try:
            until = parse_until(args.until, datetime.now(UTC))
        except ValueError:
            print(f"mailgw absence: --until {args.until!r}: use an ISO 8601 time or a duration such as 2h",
                  file=sys.stderr)
            return EX_DATAERR
    asyncio.run(_with_store(args, lambda s: s.set_absence(address, until=until, note=args.note, source="cli")))
    print(f"{address} is absent{f' until {until.astimezone():%Y-%m-%d %H:%M}' if until else ' until cleared'}")
    return 0


def _clear_absent(args: argparse.Namespace) -> int:
    address = resolve_user(args)
    if address is None:
        print(f"mailgw absence: {args.user!r} is not a mail address or a person in the directory", file=sys.stderr)
        return EX_DATAERR
    was = asyncio.run(_with_store(args, lambda store: store.clear_absence(address)))
    print(f"{address} is back" if was else f"{address} was not absent")
    return 0


def _list_absent(args: argparse.Namespace) -> int:
    rows = asyncio.run(_with_store(args, lambda store: store.absences()))
    now = datetime.now(UTC)
    current = [r for r in rows if r[2] is None or r[2] > now]
    if not current:
        print("nobody is absent")
    for address, since, until, note, source in current:
        ends = f"{until.astimezone():%Y-%m-%d %H:%M}" if until else "cleared"
        print(f"{address:32} since {since.astimezone():%Y-%m-%d %H:%M}  until {ends}  ({source}) {note}".rstrip())
    return 0


def _calls(args: argparse.Namespace) -> int:
    async def work(store: Any) -> tuple[list[Any], dict[str, tuple[datetime, str]]]:
        rows = await store.list_incoming(limit=args.limit)
        return rows, await store.callbacks_of([r.id for r in rows])

    rows, callbacks = asyncio.run(_with_store(args, work))
    if not rows:
        print("no incoming calls recorded")
    for r in rows:
        outcome = (f"answered by {r.answered_by}" if r.answered_by else
                   "ringing" if r.ended_at is None else "missed")
        if r.id in callbacks:  # followed up: the caller was called back
            at, by = callbacks[r.id]
            outcome += f", called back {at.astimezone():%H:%M} by {by}"
        length = f"{(r.ended_at - r.started_at).total_seconds():.0f} s" if r.ended_at else "-"
        print(f"{r.started_at.astimezone():%Y-%m-%d %H:%M:%S}  {r.caller or 'withheld':16} "
              f"rang {','.join(r.rung) or '-':12} {outcome:24} {length}" + (f"  {r.id}" if args.ids else ""))
    return 0


def _memo(args: argparse.Namespace) -> int:
    from .absence_memo import prepare_memo

    config = load_config(args.config, data_dir=args.data)
    if args.phrases:
        for language, phrases in config.absence.memo_phrases:
            for number, phrase in enumerate(phrases, start=1):
                print(f"{language} {number}: {phrase}")
        return 0
    if not args.call:
        print("mailgw memo: name the call (its id from `mailgw calls --ids`, or 'last')", file=sys.stderr)
        return EX_DATAERR
    directory = load_directory(config.directory)

    async def work(store: Any) -> tuple[int, str]:
        if args.call == "last":
            latest = await store.list_incoming(limit=1)
            call = latest[0] if latest else None
        else:
            call = await store.incoming_call(args.call)
        if call is None:
            return EX_DATAERR, f"mailgw memo: no incoming call {args.call!r} (see mailgw calls --ids)"
        try:
            row = await prepare_memo(store, config, directory, call, args.phrase, args.text, args.by)
        except ValueError as exc:
            return EX_DATAERR, f"mailgw memo: {exc}"
        if not await store.add_memo(row):
            return 1, f"mailgw memo: call {call.id} already has a memo"
        return 0, f"memo on call {call.id} for {row.recipient} recorded; the gateway mails it within seconds"

    code, message = asyncio.run(_with_store(args, work))
    print(message, file=sys.stderr if code else sys.stdout)
    return code
