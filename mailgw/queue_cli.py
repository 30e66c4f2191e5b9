"""``mailgw queue``: the outbound queue (mail relayed to other offices, result mails, bounces).

    mailgw queue [--json] [--all] [--config FILE] [--data DIR]   queued mail: destination, attempts, next try, last error
    mailgw queue retry ID [--config FILE] [--data DIR]           try it again now
    mailgw queue drop ID [--config FILE] [--data DIR]            take it out of the queue for good (no bounce)

It works on the store, so it works whether or not the gateway runs; a running gateway looks at the
queue at least every two seconds, so ``retry`` takes effect at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from .campon_cli import _options, _when, _with_store


def register(subparsers: Any) -> None:
    queue = subparsers.add_parser("queue", help="the outbound queue (relayed mail, result mails); retry or drop one")
    _options(queue)
    queue.add_argument("--json", action="store_true", help="machine-readable output")
    queue.add_argument("--all", action="store_true", help="also mail that was sent, failed or dropped (latest 1000)")
    queue.set_defaults(run=_list)
    actions = queue.add_subparsers(dest="queue_action", metavar="ACTION")
    for name, run, text in (("retry", _retry, "try a queued mail again now"),
                            ("drop", _drop, "take a queued mail out of the queue for good")):
        action = actions.add_parser(name, help=text)
        action.add_argument("id", help="the queue id (first column of `mailgw queue`)")
        _options(action)
        action.set_defaults(run=run)


def _list(args: argparse.Namespace) -> int:
    rows = asyncio.run(_with_store(args, lambda store: store.outbox_queue(include_done=args.all))) or []
    if args.json:
        print(json.dumps([{
            "id": r.id, "state": r.state, "from": r.mail_from, "to": r.rcpt_to, "relay_to": domain,
            "attempts": r.attempts, "next_try": r.next_try.isoformat() if r.state == "queued" else None,
            "deadline": r.deadline.isoformat() if r.deadline else None, "last_error": r.last_error,
            "created_at": r.created_at.isoformat(),
        } for r, domain in rows], indent=2))
        return 0
    if not rows:
        print("the outbound queue is empty")
        return 0
    print(f"{'ID':24} {'STATE':7} {'TO':28} {'VIA':14} {'TRIES':>5} {'NEXT TRY':19}  LAST ERROR")
    for r, domain in rows:
        next_try = _when(r.next_try) if r.state == "queued" else "-"
        print(f"{r.id:24} {r.state:7} {r.rcpt_to[:28]:28} {(domain or 'notice')[:14]:14} {r.attempts:>5} "
              f"{next_try:19}  {(r.last_error or '-')[:80]}")
    return 0


def _retry(args: argparse.Namespace) -> int:
    return _act(args, lambda store: store.outbox_retry_now(args.id), "will be tried again now")


def _drop(args: argparse.Namespace) -> int:
    return _act(args, lambda store: store.outbox_drop(args.id, "dropped by an admin (mailgw queue drop)"),
                "dropped from the queue")


def _act(args: argparse.Namespace, work: Any, done: str) -> int:
    if not asyncio.run(_with_store(args, work)):
        print(f"mailgw queue: no queued mail {args.id}", file=sys.stderr)
        return 1
    print(f"{args.id} {done}")
    return 0
