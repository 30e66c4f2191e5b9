"""``mailgw campons``: list pending camp-ons and status monitors, or cancel one.

    mailgw campons [--json] [--all] [--config FILE] [--data DIR]   pending ones (state, next attempt, deadline)
    mailgw campons cancel ID [--config FILE] [--data DIR]          cancel one (as an admin)

It works on the store, so it works whether or not the gateway runs: ``cancel`` records the request
durably; a running gateway acts on it within ``campon.poll_interval`` (its runner polls the table),
a stopped one when it starts. The sender gets the usual ``cancelled`` mail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import load_config


def register(subparsers: Any) -> None:
    campons = subparsers.add_parser("campons", help="pending camp-ons and status monitors; cancel one")
    _options(campons)
    campons.add_argument("--json", action="store_true", help="machine-readable output")
    campons.add_argument("--all", action="store_true", help="also those that have ended (the latest 1000)")
    campons.set_defaults(run=_list)
    actions = campons.add_subparsers(dest="campon_action", metavar="ACTION")
    cancel = actions.add_parser("cancel", help="cancel a pending camp-on or monitor")
    cancel.add_argument("id", help="the request id (as in the result mail)")
    _options(cancel)
    cancel.add_argument("--by", default="admin (mailgw campons cancel)", help=argparse.SUPPRESS)
    cancel.set_defaults(run=_cancel)


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="gateway.yaml (default: embedded defaults)")
    parser.add_argument("--data", type=Path, help="data directory (default: $MAILGW_HOME or ./var)")


async def _with_store(args: argparse.Namespace, work: Any) -> Any:
    from .store import Store

    config = load_config(args.config, data_dir=args.data)
    path = config.data_dir / "mailgw.sqlite3"
    if not path.exists():
        return None
    store = Store(path)
    await store.open()
    try:
        return await work(store)
    finally:
        await store.close()


def _when(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _list(args: argparse.Namespace) -> int:
    rows = asyncio.run(_with_store(args, lambda store: store.list_campons(include_done=args.all))) or []
    rows = list(reversed(rows))  # oldest first: the order they are served in
    if args.json:
        print(json.dumps([{
            "id": r.id, "kind": r.kind, "sender": r.sender, "caller": r.caller, "target": r.target, "mode": r.mode,
            "priority": r.priority, "state": r.state, "attempts": r.attempts, "last_outcome": r.last_outcome,
            "next_attempt": r.next_attempt.isoformat(), "deadline": r.deadline.isoformat(),
            "created_at": r.created_at.isoformat(), "cancel_requested": r.cancel_requested, "outcome": r.outcome,
        } for r in rows], indent=2))
        return 0
    if not rows:
        print("no pending camp-ons")
        return 0
    print(f"{'ID':24} {'CALLER':>12} {'TARGET':>12} {'MODE':7} {'STATE':9} {'TRIES':>5} {'NEXT ATTEMPT':19}  DEADLINE")
    for r in rows:
        state = r.outcome if r.state == "done" else r.state + ("*" if r.cancel_requested else "")
        print(f"{r.id:24} {(r.caller or '-'):>12} {r.target:>12} {r.mode:7} {state:9} {r.attempts:>5} "
              f"{_when(r.next_attempt):19}  {_when(r.deadline)}")
    if any(r.cancel_requested and r.state != "done" for r in rows):
        print("* cancel requested; the gateway ends it within a few seconds (or when it starts)")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    done = asyncio.run(_with_store(args, lambda store: store.request_campon_cancel(args.id, args.by)))
    if not done:
        print(f"mailgw campons: no pending camp-on or monitor {args.id}", file=sys.stderr)
        return 1
    print(f"cancel of {args.id} recorded; the gateway ends it within a few seconds")
    return 0
